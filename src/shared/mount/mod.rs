//! Mounting the share: turns a backend, a source and user options into the real mount command
//! (nfs4, cifs or a bind mount, with the backend's recommended options), waits with bounded
//! exponential backoff and jitter while the server or its DNS name is not reachable yet, and
//! treats "already mounted from the same source" as success; `-o remount` (what mount(8)
//! passes on for `mount -o remount,...` of an fstab entry) changes the options of the share
//! mounted there, once, and is an error when it is not mounted. Both `mount.artemis-sync` (what
//! mount(8) runs at boot) and `artemis-sync mount` go through [`mount`]; `artemis-sync fstab`
//! writes the line that leads mount(8) here.
//!
//! This file holds the request (from mount(8)'s arguments or from the config) and the errors;
//! `plan` turns a request into the mount program's arguments, `run` performs it with retries,
//! `fstab` writes the boot-time line. All of it is re-exported here.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::config::backoff::{Backoff, RETRY_FACTOR, RETRY_INITIAL_MS, RETRY_JITTER};
use crate::config::mount_options::{MountOptions, OptionsError};
use crate::config::{Backend, Config};
use crate::shared::mountinfo::MountinfoError;

mod fstab;
mod plan;
mod run;

pub use fstab::fstab_line;
pub use plan::{plan, MountPlan};
pub use run::{is_mounted, mount, same_file, MountOutcome};

/// mount(8)'s exit code for a wrong call: bad options, unknown backend, missing argument.
pub const EXIT_USAGE: u8 = 1;
/// mount(8)'s exit code for a mount that failed.
pub const EXIT_MOUNT_FAILURE: u8 = 32;
/// The fstab type that makes mount(8) run `/sbin/mount.artemis-sync`.
pub const FSTAB_TYPE: &str = "artemis-sync";
/// How long the reachability probe waits for the server's port (the config's validation
/// counts it in the retries' budget).
pub const PROBE_TIMEOUT: Duration = crate::config::backoff::MOUNT_PROBE_TIMEOUT;

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
    /// cannot remount {dir:?}: {spec} is not mounted there (mount it first, without `remount`)
    NotMounted { spec: String, dir: PathBuf },
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
    pub fn exit_code(&self) -> u8 {
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
    /// `-o remount`: change the options of the share already mounted on `dir`.
    pub remount: bool,
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
        let remount = options.take("remount").is_some();
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
        // `user=NAME` is mount.cifs' user name (`username=`); only the flag `user` is mount(8)'s
        let smb = backend.is_smb();
        options.retain(|k, v| {
            (smb && k == "user" && v.is_some())
                || (!USERSPACE_KEYS.contains(&k) && !k.starts_with("x-"))
        });
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
            remount,
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
            remount: false,
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

#[cfg(test)]
mod tests;
