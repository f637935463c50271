//! Performing a planned mount: idempotent (the same source already mounted there is success,
//! another source is an error), retried with bounded backoff and jitter while the server is
//! unreachable or the mount program fails, and `-f`/`-v` output. A remount runs the mount
//! program once, on the share mounted there, and never reports a share it did not change as
//! changed.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::Backend;
use crate::shared::mount::{plan, MountError, MountPlan, MountRequest, PROBE_TIMEOUT};
use crate::shared::mountinfo;
use crate::sys::{shell_quote, Sys};

/// What [`mount`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountOutcome {
    /// The share was mounted, after this many attempts.
    Mounted { attempts: u32 },
    /// The same source was already mounted there; nothing was done.
    AlreadyMounted,
    /// `-o remount`: the options of the share mounted there were changed.
    Remounted,
    /// `-f`: this command would have run.
    Faked { command: String },
}

/// Mounts `req` unless the same source is already mounted there, retrying with backoff while
/// the server is unreachable or the mount program fails. `out` gets what `-f` and `-v` print.
pub fn mount(
    sys: &dyn Sys,
    req: &MountRequest,
    out: &mut dyn Write,
) -> Result<MountOutcome, MountError> {
    let plan = plan(req)?;
    if req.fake {
        let command = command_line(sys, &plan);
        let _ = writeln!(out, "{command}");
        return Ok(MountOutcome::Faked { command });
    }
    let dir = check_dir(&req.dir)?;
    if req.remount {
        return remount(sys, req, &plan, &dir, out);
    }
    if is_mounted(sys, req.backend, &req.spec, &dir)? {
        if req.verbose {
            let _ = writeln!(
                out,
                "mount.artemis-sync: {} is already mounted on {}",
                req.spec,
                dir.display()
            );
        }
        return Ok(MountOutcome::AlreadyMounted);
    }
    let mut rng = Jitter::seeded();
    let mut last = String::new();
    for attempt in 1..=req.backoff.attempts {
        if attempt > 1 {
            let pause = req.backoff.delay(attempt - 1, rng.next_unit());
            tracing::warn!(spec = %req.spec, dir = %dir.display(), attempt, of = req.backoff.attempts,
                "{last}; retrying in {:.1} s", pause.as_secs_f64());
            sys.sleep(pause);
        }
        match try_once(sys, req, &plan, attempt, out)? {
            Attempt::Mounted => {
                tracing::info!(spec = %req.spec, dir = %dir.display(), attempt, "mounted");
                return Ok(MountOutcome::Mounted { attempts: attempt });
            }
            Attempt::Unreachable(reason) => last = reason,
            Attempt::Failed(reason) => {
                last = reason;
                // A mount that raced us from elsewhere (systemd, a second helper) is success too.
                if is_mounted(sys, req.backend, &req.spec, &dir)? {
                    return Ok(MountOutcome::AlreadyMounted);
                }
            }
        }
    }
    Err(MountError::Failed {
        spec: req.spec.clone(),
        dir: req.dir.clone(),
        attempts: req.backoff.attempts,
        reason: last,
    })
}

/// `-o remount` of `req`, at `dir` (canonical): the mount program once, on the same source
/// mounted there. Nothing mounted there is an error, not a new mount: mount(8) asked to change
/// a mount, and mounting instead would leave the operator believing the options changed. No
/// retries: the server already serves the mount, and a refused option does not become
/// acceptable by asking again.
fn remount(
    sys: &dyn Sys,
    req: &MountRequest,
    plan: &MountPlan,
    dir: &Path,
    out: &mut dyn Write,
) -> Result<MountOutcome, MountError> {
    if !is_mounted(sys, req.backend, &req.spec, dir)? {
        return Err(MountError::NotMounted {
            spec: req.spec.clone(),
            dir: req.dir.clone(),
        });
    }
    match try_once(sys, req, plan, 1, out)? {
        Attempt::Mounted => {
            tracing::info!(spec = %req.spec, dir = %dir.display(), "remounted");
            Ok(MountOutcome::Remounted)
        }
        Attempt::Unreachable(reason) | Attempt::Failed(reason) => Err(MountError::Failed {
            spec: req.spec.clone(),
            dir: req.dir.clone(),
            attempts: 1,
            reason,
        }),
    }
}

/// How one attempt ended, short of an error that stops the retries.
#[derive(Debug)]
enum Attempt {
    /// The mount program succeeded.
    Mounted,
    /// The server's port did not answer; the mount program was not run.
    Unreachable(String),
    /// The mount program ran and failed.
    Failed(String),
}

/// One attempt: probe the server (if the plan has one), then run the mount program.
fn try_once(
    sys: &dyn Sys,
    req: &MountRequest,
    plan: &MountPlan,
    attempt: u32,
    out: &mut dyn Write,
) -> Result<Attempt, MountError> {
    if let Some((host, port)) = &plan.probe {
        if let Err(e) = sys.probe(host, *port, PROBE_TIMEOUT) {
            return Ok(Attempt::Unreachable(format!(
                "server {host} port {port} is not reachable: {e}"
            )));
        }
    }
    if req.verbose {
        let _ = writeln!(
            out,
            "mount.artemis-sync: attempt {attempt}/{}: {}",
            if req.remount { 1 } else { req.backoff.attempts },
            command_line(sys, plan)
        );
    }
    let outcome = sys
        .run_mount(&plan.args)
        .map_err(|source| MountError::Spawn {
            program: sys.mount_program(),
            source,
        })?;
    if outcome.success() {
        return Ok(Attempt::Mounted);
    }
    let program = sys.mount_program().to_string_lossy().into_owned();
    Ok(Attempt::Failed(
        match (outcome.code, outcome.stderr.is_empty()) {
            (Some(c), true) => format!("{program} exited {c}"),
            (Some(c), false) => format!("{program} exited {c}: {}", outcome.stderr),
            (None, _) => format!("{program} was killed by a signal"),
        },
    ))
}

/// The mount program and the plan's arguments, quoted for a shell.
fn command_line(sys: &dyn Sys, plan: &MountPlan) -> String {
    let mut words = vec![shell_quote(&sys.mount_program())];
    words.extend(plan.args.iter().map(|a| shell_quote(a)));
    words.join(" ")
}

/// `dir` must exist and be a directory; returns it without symlinks, as the mount table shows it.
fn check_dir(dir: &Path) -> Result<PathBuf, MountError> {
    let canonical = dir.canonicalize().map_err(|source| MountError::Dir {
        dir: dir.to_owned(),
        source,
    })?;
    if !canonical.is_dir() {
        return Err(MountError::NotADirectory {
            dir: dir.to_owned(),
        });
    }
    Ok(canonical)
}

/// Whether `spec` is already mounted on `dir` (canonical). A different source there is an error.
pub fn is_mounted(
    sys: &dyn Sys,
    backend: Backend,
    spec: &str,
    dir: &Path,
) -> Result<bool, MountError> {
    let text = sys.mountinfo().map_err(|source| MountError::MountTable {
        path: crate::sys::MOUNTINFO_PATH,
        source,
    })?;
    let table = mountinfo::parse(&text)?;
    let Some(entry) = mountinfo::mounted_at(&table, dir) else {
        return Ok(false);
    };
    let same = if backend == Backend::Bind {
        // A bind mount shows the device, not the directory, as its source: compare identities.
        same_file(Path::new(spec), dir)
    } else {
        mountinfo::same_source(&entry.source, spec)
    };
    if same {
        Ok(true)
    } else {
        Err(MountError::MountedElsewhere {
            dir: dir.to_owned(),
            spec: spec.to_owned(),
            current: if backend == Backend::Bind {
                format!("{} ({})", entry.source, entry.root.display())
            } else {
                entry.source.clone()
            },
        })
    }
}

/// Whether two paths are the same inode on the same device.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// A small xorshift generator for jitter: spreading retries needs no cryptographic randomness.
#[derive(Debug)]
pub(super) struct Jitter(u64);

impl Jitter {
    /// Seeded from the clock and the process id, so two VMs booting together differ.
    pub(super) fn seeded() -> Self {
        // The low 64 bits of the nanoseconds since the epoch: only their variety matters.
        #[allow(clippy::cast_possible_truncation)]
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Jitter(nanos ^ (u64::from(std::process::id()) << 32) | 1)
    }

    /// The next number, uniform in `[0, 1)`.
    pub(super) fn next_unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}
