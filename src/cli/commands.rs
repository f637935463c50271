//! What each `artemis-sync` command does, as one library call per command returning what to
//! print: each result's `Display` is the command's text output, and `status`'s also serializes
//! as its `--json` form. The binary (`src/main.rs`) maps the command line to these calls, prints
//! the results and turns errors into exit codes.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{Backend, Config, Mode};
use crate::daemon::control::{self, ControlError};
use crate::daemon::protocol::{write_fields, AgentStatus};
use crate::daemon::{client, sdnotify, ShutdownReason};
use crate::doctor;
use crate::link::{self, LinkError, LinkOptions, LinkOutcome};
use crate::replicated::agent::ReplicaError;
use crate::replicated::certs::{self, CertsError, Written};
use crate::shared::agent::{self as shared_agent, AgentError};
use crate::shared::lease::{self, LeaseState};
use crate::shared::mount::{self, MountError, MountOutcome, MountRequest};
use crate::sys::RealSys;

/// The checks `mount` runs after mounting.
pub const CHECKS_AFTER_MOUNT: [&str; 4] = ["mount", "locks", "writable", "free_space"];

/// Errors of `mount` (the command), naming the path involved.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum MountCommandError {
    /// cannot create mount point {path}: {source}
    MountPoint {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// {0}
    Mount(#[from] MountError),
}

/// What `mount` did, and the checks after it.
#[derive(Debug)]
pub struct MountReport {
    /// What was mounted, if anything was to be mounted.
    pub outcome: Option<String>,
    /// The checks in [`CHECKS_AFTER_MOUNT`].
    pub checks: doctor::Report,
}

impl MountReport {
    /// Whether a check failed.
    pub fn failed(&self) -> bool {
        self.checks
            .checks
            .iter()
            .any(|c| c.status == doctor::Status::Fail)
    }
}

impl fmt::Display for MountReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = &self.outcome {
            writeln!(f, "{line}")?;
        }
        f.write_str(&self.checks.to_text())
    }
}

/// `mount`: creates the mount point, mounts the share unless it is premounted (progress to
/// `out`), then runs the checks in [`CHECKS_AFTER_MOUNT`].
pub fn mount(
    config: &Config,
    config_path: &Path,
    out: &mut dyn Write,
) -> Result<MountReport, MountCommandError> {
    let dir = &config.storage.mount_point;
    let mut outcome = None;
    if config.storage.backend() != Backend::Premounted {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|source| MountCommandError::MountPoint {
                path: dir.display().to_string(),
                source,
            })?;
            tracing::info!(dir = %dir.display(), "created the mount point");
        }
        let source = &config.storage.source;
        outcome = match mount::mount(
            &RealSys::from_env(),
            &MountRequest::from_config(config),
            out,
        )? {
            MountOutcome::AlreadyMounted => {
                Some(format!("{source} is already mounted on {}", dir.display()))
            }
            MountOutcome::Mounted { attempts } => Some(format!(
                "mounted {source} on {} (attempt {attempts})",
                dir.display()
            )),
            MountOutcome::Remounted => Some(format!("remounted {source} on {}", dir.display())),
            MountOutcome::Faked { .. } => None,
        };
    }
    let mut checks = doctor::run(Ok(config), config_path, &RealSys::from_env());
    checks
        .checks
        .retain(|c| CHECKS_AFTER_MOUNT.contains(&c.name));
    Ok(MountReport { outcome, checks })
}

/// What `link` did.
#[derive(Debug)]
pub struct LinkReport {
    /// `${BASE_DIR}/artemis`.
    pub path: PathBuf,
    /// The mount point it links to.
    pub target: PathBuf,
    /// What was done.
    pub outcome: LinkOutcome,
}

impl fmt::Display for LinkReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (path, target) = (self.path.display(), self.target.display());
        match &self.outcome {
            LinkOutcome::AlreadyLinked => {
                writeln!(f, "{path} already links to {target}; nothing to do")
            }
            LinkOutcome::Created => writeln!(f, "linked {path} -> {target}"),
            LinkOutcome::Replaced { previous } => writeln!(
                f,
                "linked {path} -> {target} (it pointed to {})",
                previous.display()
            ),
            LinkOutcome::Migrated(r) => {
                writeln!(
                    f,
                    "migrated {} files ({} bytes, every file verified by blake3; {} copied, {} already in the share)",
                    r.copied + r.already_present, r.bytes, r.copied, r.already_present
                )?;
                writeln!(f, "old directory kept at {}", r.aside.display())?;
                writeln!(f, "linked {path} -> {target}")
            }
        }
    }
}

/// `link`: makes `${BASE_DIR}/artemis` link to the mount point (replicated mode: to the FUSE
/// mount or `data_dir`, as the hot agent does).
pub fn link(config: &Config, options: LinkOptions) -> Result<LinkReport, LinkError> {
    let path = config.artemis_link();
    let target = config.link_target();
    if options.migrate {
        check_share_mounted(config, &path, &target)?;
    }
    let outcome = link::link(&path, &target, options)?;
    Ok(LinkReport {
        path,
        target,
        outcome,
    })
}

/// Before `--migrate` copies a journal directory into a share that a backend mounts (shared
/// mode, not `premounted`): the share must be mounted there from its source, or the copy
/// lands in the local directory beneath the mount point, hidden once the share is mounted.
fn check_share_mounted(config: &Config, link: &Path, target: &Path) -> Result<(), LinkError> {
    let s = &config.storage;
    if config.replication.is_some() || s.backend() == Backend::Premounted {
        return Ok(());
    }
    if !matches!(link::inspect(link, target)?, link::LinkState::Directory(n) if n > 0) {
        return Ok(());
    }
    // a missing mount point is link's own TargetMissing
    let Ok(dir) = target.canonicalize() else {
        return Ok(());
    };
    let not_mounted = |reason: String| LinkError::ShareNotMounted {
        share: target.to_owned(),
        reason,
    };
    match mount::is_mounted(&RealSys::from_env(), s.backend(), &s.source, &dir) {
        Ok(true) => Ok(()),
        Ok(false) => Err(not_mounted(format!(
            "nothing is mounted on {}",
            dir.display()
        ))),
        Err(e) => Err(not_mounted(e.to_string())),
    }
}

/// Errors that stop `artemis-sync agent`.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum AgentRunError {
    /// {0}
    Control(#[from] ControlError),
    /// cannot install signal handlers: {0}
    Signals(#[source] std::io::Error),
    /// {0}
    Shared(#[from] AgentError),
    /// {0}
    Replicated(#[from] ReplicaError),
}

/// `agent`: binds the control socket, runs the agent of the configured mode until SIGTERM,
/// SIGINT or SIGHUP, and removes the socket.
pub fn agent(config: Config) -> Result<ShutdownReason, AgentRunError> {
    let listener = control::bind(&config.agent.control_socket)?;
    // (only once the socket is ours: a second agent refused above must not stop the first's)
    crate::daemon::node::stop_stray_unit(&config.node);
    let (tx, shutdown) = crossbeam_channel::bounded(1);
    let mut signals =
        signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
            .map_err(AgentRunError::Signals)?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let _ = tx.send(ShutdownReason::Signal(sig));
        }
    });
    let socket = config.agent.control_socket.clone();
    let result = if config.storage.mode == Mode::Replicated {
        crate::replicated::agent::run(config, listener, shutdown).map_err(AgentRunError::from)
    } else {
        shared_agent::run(config, listener, shutdown).map_err(AgentRunError::from)
    };
    sdnotify::stopping();
    let _ = std::fs::remove_file(&socket);
    result
}

/// What `status` found: the running agent's status, or why none answers and what the lease
/// says.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum StatusReport {
    /// The agent answered.
    Running(AgentStatus),
    /// No agent answered.
    Down(DownStatus),
}

/// `status` when no agent answers.
#[derive(Debug, Serialize)]
pub struct DownStatus {
    /// Always `down`.
    pub role: &'static str,
    /// This host's holder id.
    pub holder: String,
    /// Why no agent answered.
    pub error: String,
    /// The holder the lease names, if it could be read.
    pub lease_holder: Option<String>,
    /// The lease's epoch, if it could be read.
    pub epoch: Option<u64>,
    /// The lease's state, if it could be read.
    pub lease_state: Option<LeaseState>,
    /// Why the lease could not be read.
    pub lease_error: Option<String>,
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_fields(f, self)
    }
}

/// `status`: asks the agent; when none answers, says so and shows what the lease says.
pub fn status(config: &Config) -> StatusReport {
    let error = match client::status(config) {
        Ok(status) => return StatusReport::Running(status),
        Err(e) => crate::error_chain(&e),
    };
    let read = lease::read(&lease::path(config));
    let lease = read.as_ref().ok().and_then(Option::as_ref);
    StatusReport::Down(DownStatus {
        role: "down",
        holder: config.holder_id(),
        error,
        lease_holder: lease.map(|l| l.holder.clone()),
        epoch: lease.map(|l| l.epoch),
        lease_state: lease.map(|l| l.state),
        lease_error: read.as_ref().err().map(ToString::to_string),
    })
}

/// What `certs init` wrote, and where each file goes.
#[derive(Debug)]
pub struct CertsReport(pub Written);

impl fmt::Display for CertsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.0;
        writeln!(
            f,
            "CA certificate: {} (copy to both hosts; [replication] tls_ca)",
            w.ca_cert.display()
        )?;
        writeln!(
            f,
            "CA key:         {} (keep it offline: only needed to make more certificates)",
            w.ca_key.display()
        )?;
        for (h, c, k) in &w.hosts {
            writeln!(f, "{h}: tls_cert = {c:?}, tls_key = {k:?} (copy both to {h}; the key stays mode 0600)")?;
        }
        Ok(())
    }
}

/// `certs init`: a CA and one certificate per host in `dir`.
pub fn certs_init(dir: &Path, hosts: &[String]) -> Result<CertsReport, CertsError> {
    certs::init(dir, hosts).map(CertsReport)
}

/// `lease init`: creates the database lease table if it is missing.
pub fn lease_init(config: &Config) -> Result<String, crate::lease::pg::PgError> {
    if config.lease_backend() != Some(crate::config::LeaseBackend::Postgres) {
        return Err(crate::lease::pg::PgError::NotPostgres);
    }
    crate::lease::pg::PgStore::open(config)?.init_table()
}
