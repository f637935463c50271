//! Mounting the share: turns a backend, a source and user options into the real mount command
//! (nfs4, cifs or a bind mount, with the backend's recommended options), waits with bounded
//! exponential backoff and jitter while the server or its DNS name is not reachable yet, and
//! treats "already mounted from the same source" as success. Both `mount.artemis-sync` (what
//! mount(8) runs at boot) and `artemis-sync mount` go through [`mount`]; `artemis-sync fstab`
//! writes the line that leads mount(8) here.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use crate::config::backoff::{Backoff, RETRY_FACTOR, RETRY_INITIAL_MS, RETRY_JITTER};
use crate::config::mount_options::{MountOptions, OptionsError};
use crate::config::{
    check_credentials_file, check_user_options, nfs_host, smb_host, Backend, Config,
};
use crate::shared::mountinfo::{self, MountinfoError};
use crate::sys::{shell_quote, Sys};

/// mount(8)'s exit code for a wrong call: bad options, unknown backend, missing argument.
pub const EXIT_USAGE: i32 = 1;
/// mount(8)'s exit code for a mount that failed.
pub const EXIT_MOUNT_FAILURE: i32 = 32;
/// The fstab type that makes mount(8) run `/sbin/mount.artemis-sync`.
pub const FSTAB_TYPE: &str = "artemis-sync";
/// How long the reachability probe waits for the server's port.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Options for mount(8) and systemd, never for the kernel; the helper drops them (and `x-*`).
const USERSPACE_KEYS: &[&str] = &[
    "_netdev", "nofail", "noauto", "auto", "defaults", "user", "users", "nouser", "owner", "group",
    "comment",
];

/// Errors mounting the share. Each names the source or directory involved.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum MountError {
    /// {0}
    Options(#[from] OptionsError),
    /// no `backend=` in the mount options: add e.g. `-o backend=efs` (one of: efs, azure-smb, azure-nfs, nfs, cifs, bind)
    NoBackend,
    /// unknown backend `{0}`: expected one of efs, azure-smb, azure-nfs, nfs, cifs, bind
    UnknownBackend(String),
    /// mount option `{key}={value}`: {reason}
    BadHelperOption {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
    /// backend=premounted has nothing to mount: the share at {dir:?} is mounted by something else
    Premounted { dir: PathBuf },
    /// source `{spec}` does not fit backend {backend}: {reason}
    BadSource {
        spec: String,
        backend: Backend,
        reason: String,
    },
    /// refusing to mount {spec} on {dir:?}: {reason}
    Refused {
        spec: String,
        dir: PathBuf,
        reason: String,
    },
    /// credentials file {path:?}: {reason}
    Credentials { path: PathBuf, reason: String },
    /// mount point {dir:?}: {source}
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// mount point {dir:?} is not a directory
    NotADirectory { dir: PathBuf },
    /// {dir:?} is already mounted from `{current}`, not from `{spec}`: unmount it first
    MountedElsewhere {
        dir: PathBuf,
        spec: String,
        current: String,
    },
    /// cannot read the mount table {path}: {source}
    MountTable {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// {0}
    MountTableFormat(#[from] MountinfoError),
    /// cannot run the mount program {program:?}: {source}
    Spawn {
        program: OsString,
        #[source]
        source: std::io::Error,
    },
    /// mounting {spec} on {dir:?} failed after {attempts} attempt(s): {reason}
    Failed {
        spec: String,
        dir: PathBuf,
        attempts: u32,
        reason: String,
    },
}

impl MountError {
    /// The exit code mount(8) expects from a helper for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            MountError::Options(_)
            | MountError::NoBackend
            | MountError::UnknownBackend(_)
            | MountError::BadHelperOption { .. }
            | MountError::Premounted { .. }
            | MountError::BadSource { .. }
            | MountError::Refused { .. }
            | MountError::Credentials { .. } => EXIT_USAGE,
            _ => EXIT_MOUNT_FAILURE,
        }
    }
}

/// A mount to perform, as mount(8) asks for it or as the config describes it.
#[derive(Debug, Clone)]
pub struct MountRequest {
    /// The kind of share.
    pub backend: Backend,
    /// What to mount (`host:/path`, `//host/share`, a directory).
    pub spec: String,
    /// Where to mount it.
    pub dir: PathBuf,
    /// The user's options, without the helper's own (`backend=`...) and userspace ones.
    pub options: MountOptions,
    /// How long to keep trying.
    pub backoff: Backoff,
    /// `-f`: print the command, mount nothing.
    pub fake: bool,
    /// `-v`: say what is happening.
    pub verbose: bool,
    /// `-s`: tolerate options the filesystem does not know (passed on).
    pub sloppy: bool,
    /// `-n`: do not write to the mount table (passed on).
    pub no_mtab: bool,
}

impl MountRequest {
    /// The request mount(8) makes of the helper: `SPEC DIR -o OPTS`, where OPTS carries
    /// `backend=` and optionally `mount_attempts=`, `mount_retry_max_ms=`.
    pub fn from_helper_args(spec: &str, dir: &Path, opts: &str) -> Result<Self, MountError> {
        let mut options = MountOptions::parse(opts)?;
        let backend = match options.take("backend") {
            None => return Err(MountError::NoBackend),
            Some(None) => return Err(MountError::NoBackend),
            Some(Some(name)) => {
                Backend::from_name(&name).ok_or(MountError::UnknownBackend(name))?
            }
        };
        let mut backoff = Backoff::default();
        if let Some(v) = options.take("mount_attempts") {
            backoff.attempts = parse_number("mount_attempts", v)?;
            if backoff.attempts == 0 {
                return Err(MountError::BadHelperOption {
                    key: "mount_attempts",
                    value: "0".into(),
                    reason: "must be at least 1",
                });
            }
        }
        if let Some(v) = options.take("mount_retry_max_ms") {
            backoff.max_ms = parse_number("mount_retry_max_ms", v)?;
        }
        options.retain(|k| !USERSPACE_KEYS.contains(&k) && !k.starts_with("x-"));
        Ok(MountRequest {
            backend,
            spec: spec.to_owned(),
            dir: dir.to_owned(),
            options,
            backoff,
            fake: false,
            verbose: false,
            sloppy: false,
            no_mtab: false,
        })
    }

    /// The request `artemis-sync mount` makes from the config.
    pub fn from_config(config: &Config) -> Self {
        let s = &config.storage;
        let mut options = config.user_options();
        if !s.credentials_file.as_os_str().is_empty() {
            options.push("credentials", Some(&s.credentials_file.to_string_lossy()));
        }
        MountRequest {
            backend: s.backend(),
            spec: s.source.clone(),
            dir: s.mount_point.clone(),
            options,
            backoff: Backoff::new(s.mount_attempts, s.mount_retry_max_ms),
            fake: false,
            verbose: false,
            sloppy: false,
            no_mtab: false,
        }
    }
}

fn parse_number<T: std::str::FromStr>(
    key: &'static str,
    v: Option<String>,
) -> Result<T, MountError> {
    let value = v.unwrap_or_default();
    value.parse().map_err(|_| MountError::BadHelperOption {
        key,
        value,
        reason: "must be a whole number",
    })
}

/// The command that performs a mount, and the server to probe first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPlan {
    /// Arguments to the mount program.
    pub args: Vec<OsString>,
    /// `(host, port)` that must accept a TCP connection before mounting is worth trying.
    pub probe: Option<(String, u16)>,
}

/// Builds the mount command for `req`: the backend's filesystem type, its default options with
/// the user's on top, and checks that nothing in them breaks locking or leaks a secret.
pub fn plan(req: &MountRequest) -> Result<MountPlan, MountError> {
    let backend = req.backend;
    if backend == Backend::Premounted {
        return Err(MountError::Premounted {
            dir: req.dir.clone(),
        });
    }
    if req.spec.is_empty() {
        return Err(MountError::BadSource {
            spec: req.spec.clone(),
            backend,
            reason: "the source is empty".into(),
        });
    }
    backend
        .check_source(&req.spec)
        .map_err(|reason| MountError::BadSource {
            spec: req.spec.clone(),
            backend,
            reason,
        })?;
    check_user_options(backend, &req.options).map_err(|reason| MountError::Refused {
        spec: req.spec.clone(),
        dir: req.dir.clone(),
        reason,
    })?;
    if let Some(cred) = req
        .options
        .value("credentials")
        .or(req.options.value("cred"))
    {
        if !backend.is_smb() {
            return Err(MountError::Refused {
                spec: req.spec.clone(),
                dir: req.dir.clone(),
                reason: format!("`credentials=` is only for the SMB backends, not {backend}"),
            });
        }
        check_credentials_file(Path::new(cred)).map_err(|reason| MountError::Credentials {
            path: cred.into(),
            reason,
        })?;
    } else if backend == Backend::AzureSmb {
        return Err(MountError::Refused {
            spec: req.spec.clone(),
            dir: req.dir.clone(),
            reason: "backend=azure-smb needs `credentials=<file>` (root-owned, mode 0600, with \
                     `username=` and `password=` lines)"
                .into(),
        });
    }

    let mut args: Vec<OsString> = Vec::new();
    for (on, flag) in [(req.sloppy, "-s"), (req.no_mtab, "-n"), (req.verbose, "-v")] {
        if on {
            args.push(flag.into());
        }
    }
    let defaults = MountOptions::parse(backend.default_options()).expect("built-in options parse");
    let options = defaults.overridden_by(&req.options);
    match backend.fs_type() {
        Some(fs_type) => {
            args.extend(["-t".into(), fs_type.into()]);
        }
        None => args.push("--bind".into()),
    }
    if !options.is_empty() {
        args.extend(["-o".into(), options.to_string().into()]);
    }
    args.push(req.spec.clone().into());
    args.push(req.dir.clone().into());
    let host = nfs_host(&req.spec).or(smb_host(&req.spec));
    let probe = match (host, backend.server_port()) {
        (Some(h), Some(port)) => Some((h.to_owned(), port)),
        _ => None,
    };
    Ok(MountPlan { args, probe })
}

/// What [`mount`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountOutcome {
    /// The share was mounted, after this many attempts.
    Mounted { attempts: u32 },
    /// The same source was already mounted there; nothing was done.
    AlreadyMounted,
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
        let mut words = vec![shell_quote(&sys.mount_program())];
        words.extend(plan.args.iter().map(|a| shell_quote(a)));
        let command = words.join(" ");
        let _ = writeln!(out, "{command}");
        return Ok(MountOutcome::Faked { command });
    }
    let dir = check_dir(&req.dir)?;
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
        if let Some((host, port)) = &plan.probe {
            if let Err(e) = sys.probe(host, *port, PROBE_TIMEOUT) {
                last = format!("server {host} port {port} is not reachable: {e}");
                continue;
            }
        }
        if req.verbose {
            let mut words = vec![shell_quote(&sys.mount_program())];
            words.extend(plan.args.iter().map(|a| shell_quote(a)));
            let _ = writeln!(
                out,
                "mount.artemis-sync: attempt {attempt}/{}: {}",
                req.backoff.attempts,
                words.join(" ")
            );
        }
        let outcome = sys
            .run_mount(&plan.args)
            .map_err(|source| MountError::Spawn {
                program: sys.mount_program(),
                source,
            })?;
        if outcome.success() {
            tracing::info!(spec = %req.spec, dir = %dir.display(), attempt, "mounted");
            return Ok(MountOutcome::Mounted { attempts: attempt });
        }
        last = match (outcome.code, outcome.stderr.is_empty()) {
            (Some(c), true) => format!("{} exited {c}", sys.mount_program().to_string_lossy()),
            (Some(c), false) => format!(
                "{} exited {c}: {}",
                sys.mount_program().to_string_lossy(),
                outcome.stderr
            ),
            (None, _) => format!(
                "{} was killed by a signal",
                sys.mount_program().to_string_lossy()
            ),
        };
        // A mount that raced us from elsewhere (systemd, a second helper) is success too.
        if is_mounted(sys, req.backend, &req.spec, &dir)? {
            return Ok(MountOutcome::AlreadyMounted);
        }
    }
    Err(MountError::Failed {
        spec: req.spec.clone(),
        dir: req.dir.clone(),
        attempts: req.backoff.attempts,
        reason: last,
    })
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

/// The `/etc/fstab` line that mounts the configured share at boot through the helper.
pub fn fstab_line(config: &Config) -> Result<String, MountError> {
    let s = &config.storage;
    if s.backend() == Backend::Premounted {
        return Err(MountError::Premounted {
            dir: s.mount_point.clone(),
        });
    }
    let mut opts = MountOptions::default();
    opts.push("backend", Some(s.backend().name()));
    opts.push("_netdev", None);
    opts.push("nofail", None);
    opts.push(
        "x-systemd.mount-timeout",
        Some(&s.mount_timeout_s.to_string()),
    );
    if s.mount_attempts != crate::config::DEFAULT_MOUNT_ATTEMPTS {
        opts.push("mount_attempts", Some(&s.mount_attempts.to_string()));
    }
    if s.mount_retry_max_ms != crate::config::DEFAULT_MOUNT_RETRY_MAX_MS {
        opts.push(
            "mount_retry_max_ms",
            Some(&s.mount_retry_max_ms.to_string()),
        );
    }
    if !s.credentials_file.as_os_str().is_empty() {
        opts.push("credentials", Some(&s.credentials_file.to_string_lossy()));
    }
    let opts = opts.overridden_by(&config.user_options());
    Ok(format!(
        "{} {} {} {} 0 0",
        fstab_escape(&s.source),
        fstab_escape(&s.mount_point.to_string_lossy()),
        FSTAB_TYPE,
        fstab_escape(&opts.to_string())
    ))
}

/// Escapes white space and `\` the way fstab(5) reads them.
fn fstab_escape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    for c in field.chars() {
        match c {
            ' ' => out.push_str("\\040"),
            '\t' => out.push_str("\\011"),
            '\n' => out.push_str("\\012"),
            '\\' => out.push_str("\\134"),
            c => out.push(c),
        }
    }
    out
}

/// A small xorshift generator for jitter: spreading retries needs no cryptographic randomness.
#[derive(Debug)]
struct Jitter(u64);

impl Jitter {
    fn seeded() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Jitter(nanos ^ (u64::from(std::process::id()) << 32) | 1)
    }

    fn next_unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::CommandOutcome;
    use std::cell::RefCell;
    use std::io;

    /// A scripted system: probe and mount results in order, and a record of every call.
    #[derive(Default)]
    struct FakeSys {
        probes: RefCell<Vec<io::Result<()>>>,
        mounts: RefCell<Vec<i32>>,
        mountinfo: RefCell<String>,
        /// mountinfo after the first successful mount
        mountinfo_after: String,
        calls: RefCell<Vec<String>>,
        slept: RefCell<Vec<Duration>>,
    }

    impl Sys for FakeSys {
        fn run_mount(&self, args: &[OsString]) -> io::Result<CommandOutcome> {
            let line = args
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ");
            self.calls.borrow_mut().push(format!("mount {line}"));
            let code = self.mounts.borrow_mut().remove(0);
            if code == 0 {
                *self.mountinfo.borrow_mut() = self.mountinfo_after.clone();
            }
            Ok(CommandOutcome {
                code: Some(code),
                stderr: if code == 0 {
                    String::new()
                } else {
                    "mount.nfs4: Connection timed out".into()
                },
            })
        }
        fn probe(&self, host: &str, port: u16, _: Duration) -> io::Result<()> {
            self.calls.borrow_mut().push(format!("probe {host}:{port}"));
            self.probes.borrow_mut().remove(0)
        }
        fn mountinfo(&self) -> io::Result<String> {
            Ok(self.mountinfo.borrow().clone())
        }
        fn sleep(&self, d: Duration) {
            self.slept.borrow_mut().push(d);
        }
        fn mount_program(&self) -> OsString {
            "mount".into()
        }
    }

    const EFS_SPEC: &str = "fs-0123abcd.efs.eu-west-1.amazonaws.com:/";

    fn efs_request(dir: &Path, opts: &str) -> MountRequest {
        MountRequest::from_helper_args(EFS_SPEC, dir, &format!("backend=efs,{opts}")).unwrap()
    }

    fn args(plan: &MountPlan) -> String {
        plan.args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn efs_gets_the_amazon_efs_utils_options() {
        let p = plan(&efs_request(
            Path::new("/mnt/x"),
            "_netdev,nofail,x-systemd.mount-timeout=30",
        ))
        .unwrap();
        assert_eq!(
            args(&p),
            "-t nfs4 -o nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport \
             fs-0123abcd.efs.eu-west-1.amazonaws.com:/ /mnt/x"
        );
        assert_eq!(
            p.probe,
            Some(("fs-0123abcd.efs.eu-west-1.amazonaws.com".into(), 2049))
        );
    }

    #[test]
    fn every_backend_translates_to_its_mount() {
        let cases = [
            ("azure-nfs", "acct.file.core.windows.net:/acct/corda", "", "-t nfs4 -o vers=4,minorversion=1,sec=sys,hard,timeo=600,retrans=2 acct.file.core.windows.net:/acct/corda /m"),
            ("nfs", "[fd00::5]:/export", "vers=4.2", "-t nfs4 -o hard,timeo=600,retrans=2,vers=4.2 [fd00::5]:/export /m"),
            ("cifs", "//srv/share", "uid=1000", "-t cifs -o serverino,uid=1000 //srv/share /m"),
            ("bind", "/srv/share", "", "--bind /srv/share /m"),
            ("efs", EFS_SPEC, "soft,timeo=30", "-t nfs4 -o nfsvers=4.1,rsize=1048576,wsize=1048576,retrans=2,noresvport,soft,timeo=30 fs-0123abcd.efs.eu-west-1.amazonaws.com:/ /m"),
        ];
        for (backend, spec, user, want) in cases {
            let req = MountRequest::from_helper_args(
                spec,
                Path::new("/m"),
                &format!("backend={backend},{user}"),
            )
            .unwrap();
            assert_eq!(args(&plan(&req).unwrap()), want, "backend {backend}");
        }
    }

    #[test]
    fn azure_smb_needs_a_credentials_file_and_never_a_password() {
        let req = MountRequest::from_helper_args(
            "//acct.file.core.windows.net/corda",
            Path::new("/m"),
            "backend=azure-smb",
        )
        .unwrap();
        let err = plan(&req).unwrap_err();
        assert!(
            err.to_string().contains("needs `credentials=<file>`"),
            "{err}"
        );
        assert_eq!(err.exit_code(), EXIT_USAGE);
        let req = MountRequest::from_helper_args(
            "//srv/share",
            Path::new("/m"),
            "backend=cifs,username=u,password=p",
        )
        .unwrap();
        let err = plan(&req).unwrap_err();
        assert!(err.to_string().contains("credentials file"), "{err}");
        let req = MountRequest::from_helper_args(
            "//srv/share",
            Path::new("/m"),
            "backend=cifs,credentials=/nonexistent/cred",
        )
        .unwrap();
        let err = plan(&req).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cred"), "{err}");
    }

    #[test]
    fn helper_options_are_checked() {
        let bad = |opts: &str| {
            MountRequest::from_helper_args(EFS_SPEC, Path::new("/m"), opts).unwrap_err()
        };
        assert!(matches!(bad("hard"), MountError::NoBackend));
        assert!(bad("backend=gluster")
            .to_string()
            .contains("unknown backend `gluster`"));
        assert!(matches!(bad("backend=efs,sec=a=b"), MountError::Options(_)));
        assert!(bad("backend=efs,mount_attempts=lots")
            .to_string()
            .contains("mount_attempts=lots"));
        let req = MountRequest::from_helper_args(EFS_SPEC, Path::new("/m"), "backend=efs,nolock")
            .unwrap();
        let err = plan(&req).unwrap_err();
        assert!(
            err.to_string().contains("nolock") && err.exit_code() == EXIT_USAGE,
            "{err}"
        );
        let req =
            MountRequest::from_helper_args("nfs-server", Path::new("/m"), "backend=nfs").unwrap();
        assert!(plan(&req).unwrap_err().to_string().contains("host:/path"));
        let req =
            MountRequest::from_helper_args("", Path::new("/m"), "backend=premounted").unwrap();
        assert!(matches!(plan(&req), Err(MountError::Premounted { .. })));
    }

    #[test]
    fn retries_while_unreachable_then_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().canonicalize().unwrap();
        let sys = FakeSys {
            probes: RefCell::new(vec![
                Err(io::Error::new(io::ErrorKind::NotFound, "no such host")),
                Err(io::Error::new(io::ErrorKind::ConnectionRefused, "refused")),
                Ok(()),
                Ok(()),
            ]),
            mounts: RefCell::new(vec![32, 0]),
            mountinfo_after: format!(
                "1 0 0:5 / {} rw - nfs4 {EFS_SPEC} rw,local_lock=none\n",
                d.display()
            ),
            ..Default::default()
        };
        let out = mount(&sys, &efs_request(&d, ""), &mut Vec::new()).unwrap();
        assert_eq!(out, MountOutcome::Mounted { attempts: 4 });
        let calls = sys.calls.borrow();
        assert_eq!(calls.iter().filter(|c| c.starts_with("probe")).count(), 4);
        assert_eq!(calls.iter().filter(|c| c.starts_with("mount")).count(), 2);
        // pauses grow by 1.5 from 1 s, each with at most 20% jitter
        let slept = sys.slept.borrow();
        assert_eq!(slept.len(), 3);
        for (i, base) in [1000u64, 1500, 2250].iter().enumerate() {
            let ms = slept[i].as_millis() as u64;
            assert!(ms >= *base && ms <= base + base / 5, "pause {i}: {ms} ms");
        }
        // mounting again is a no-op
        assert_eq!(
            mount(&sys, &efs_request(&d, ""), &mut Vec::new()).unwrap(),
            MountOutcome::AlreadyMounted
        );
    }

    #[test]
    fn gives_up_after_the_bounded_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let sys = FakeSys {
            probes: RefCell::new(
                (0..3)
                    .map(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))
                    .collect(),
            ),
            ..Default::default()
        };
        let err = mount(
            &sys,
            &efs_request(dir.path(), "mount_attempts=3"),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(err.exit_code(), EXIT_MOUNT_FAILURE);
        let msg = err.to_string();
        assert!(
            msg.contains("after 3 attempt(s)") && msg.contains("port 2049 is not reachable"),
            "{msg}"
        );
        assert_eq!(sys.slept.borrow().len(), 2);
    }

    #[test]
    fn another_source_on_the_mount_point_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().canonicalize().unwrap();
        let sys = FakeSys {
            mountinfo: RefCell::new(format!("1 0 0:5 / {} rw - nfs4 other:/x rw\n", d.display())),
            ..Default::default()
        };
        let err = mount(&sys, &efs_request(&d, ""), &mut Vec::new()).unwrap_err();
        assert!(
            err.to_string().contains("already mounted from `other:/x`"),
            "{err}"
        );
        assert!(sys.calls.borrow().is_empty(), "nothing was run");
    }

    #[test]
    fn fake_prints_and_runs_nothing() {
        let sys = FakeSys::default();
        let mut req = efs_request(Path::new("/does/not/exist"), "");
        req.fake = true;
        let mut out = Vec::new();
        mount(&sys, &req, &mut out).unwrap();
        let printed = String::from_utf8(out).unwrap();
        assert!(
            printed.starts_with("mount -t nfs4 -o nfsvers=4.1,"),
            "{printed}"
        );
        assert!(sys.calls.borrow().is_empty());
    }

    #[test]
    fn missing_mount_point_is_named() {
        let err = mount(
            &FakeSys::default(),
            &efs_request(Path::new("/no/such/dir"), ""),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/no/such/dir"), "{err}");
        assert_eq!(err.exit_code(), EXIT_MOUNT_FAILURE);
    }

    #[test]
    fn backoff_is_bounded() {
        let b = Backoff::new(8, 20_000);
        assert_eq!(b.base_delay_ms(1), 1000);
        assert_eq!(b.base_delay_ms(20), 20_000);
        assert!(b.total_ms() < crate::config::DEFAULT_MOUNT_TIMEOUT_S * 1000);
        assert_eq!(Backoff::new(1, 20_000).total_ms(), 0);
        let mut j = Jitter::seeded();
        assert!((0..1000)
            .map(|_| j.next_unit())
            .all(|u| (0.0..1.0).contains(&u)));
    }

    #[test]
    fn fstab_line_carries_the_helper_type_and_escapes_spaces() {
        let text = r#"
[node]
base_dir = "/opt/corda"
[storage]
backend = "efs"
source = "fs-0123abcd.efs.eu-west-1.amazonaws.com:/"
mount_point = "/var/lib/artemis sync"
options = "timeo=300"
mount_attempts = 5
"#;
        let config = Config::from_toml(Path::new("t.toml"), text).unwrap();
        assert_eq!(
            fstab_line(&config).unwrap(),
            "fs-0123abcd.efs.eu-west-1.amazonaws.com:/ /var/lib/artemis\\040sync artemis-sync \
             backend=efs,_netdev,nofail,x-systemd.mount-timeout=180,mount_attempts=5,timeo=300 0 0"
        );
        // what mount(8) passes back from that line turns into the same request
        let req = MountRequest::from_helper_args(
            EFS_SPEC,
            Path::new("/m"),
            "backend=efs,_netdev,nofail,mount_attempts=5,timeo=300",
        )
        .unwrap();
        assert_eq!(req.backoff.attempts, 5);
        assert_eq!(req.options.to_string(), "timeo=300");
    }
}
