//! Whether a lock taken on a mounted filesystem excludes the other VM: lock-breaking mount
//! options (`nolock`, `local_lock=`, `nobrl`) and local filesystems make the lock exclude only
//! processes of this host. The agent refuses to run on such a lock directory
//! ([`check_lock_dir`]); `doctor` reports the same judgement ([`judge`]) as its `locks` check.

use std::path::{Path, PathBuf};

use crate::config::mount_options::lock_hazard;
use crate::config::Config;
use crate::shared::mountinfo::{self, MountEntry};

/// What [`judge`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockVerdict {
    /// Locks reach the server (or a local filesystem is allowed by `[lock] allow_local_locks`).
    Safe {
        /// What was found.
        detail: String,
    },
    /// Whether locks reach other hosts cannot be told (FUSE).
    Doubtful {
        /// What was found.
        detail: String,
        /// What to do about it.
        fix: String,
    },
    /// A lock here does not exclude the other VM.
    Unsafe {
        /// What was found.
        detail: String,
        /// What to do about it.
        fix: String,
    },
}

/// Errors of the agent's lock-safety check, naming the lock directory.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum LockSafetyError {
    /// cannot create lock directory {path:?}: {source}
    LockDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// refusing to run: {detail} (lock directory {dir:?}). Fix: {fix}
    Unsafe {
        dir: PathBuf,
        detail: String,
        fix: String,
    },
    /// cannot read the mount table: {0}
    MountTable(String),
}

/// Whether locks on the filesystem of `entry` reach the other VM: unsafe with lock-breaking
/// options and, unless `allow_local_locks`, on a local filesystem.
pub fn judge(entry: &MountEntry, allow_local_locks: bool) -> LockVerdict {
    let opts = entry.all_options();
    if let Some(h) = lock_hazard(&entry.fs_type, &opts) {
        return LockVerdict::Unsafe {
            detail: format!("{} mount has `{}`: {}", entry.fs_type, h.option, h.effect),
            fix: h.fix.to_owned(),
        };
    }
    if entry.is_network() {
        let how = opts
            .value("local_lock")
            .map_or(String::new(), |v| format!(" (local_lock={v})"));
        return LockVerdict::Safe {
            detail: format!("{} locks reach the server{how}", entry.fs_type),
        };
    }
    if entry.fs_type.starts_with("fuse") {
        return LockVerdict::Doubtful {
            detail: format!(
                "{}: whether locks reach other hosts depends on the FUSE filesystem",
                entry.fs_type
            ),
            fix: "use an NFS or SMB share, whose lock semantics are known".into(),
        };
    }
    if allow_local_locks {
        LockVerdict::Safe {
            detail: format!("local {} filesystem: locks exclude this host only ([lock] allow_local_locks = true)", entry.fs_type),
        }
    } else {
        LockVerdict::Unsafe {
            detail: format!("local {} filesystem: a lock here excludes only processes of this host, not the other VM", entry.fs_type),
            fix: "mount a network share there, or set `[lock] allow_local_locks = true` for a single-host set-up".into(),
        }
    }
}

/// The mount that holds the lock directory `dir` (before it is made, its nearest existing
/// parent, where it will be made): what the agent and `doctor` judge.
pub fn lock_dir_mount<'a>(table: &'a [MountEntry], dir: &Path) -> Option<&'a MountEntry> {
    let canonical = dir.ancestors().find_map(|d| d.canonicalize().ok())?;
    mountinfo::containing(table, &canonical)
}

/// Refuses a lock directory on a mount whose locks stay on this host (creating the directory
/// if needed); a doubtful one is logged as a warning.
pub fn check_lock_dir(config: &Config) -> Result<(), LockSafetyError> {
    let dir = &config.lock.dir;
    let lock_dir = |source| LockSafetyError::LockDir {
        path: dir.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(lock_dir)?;
    let text =
        crate::sys::read_mountinfo().map_err(|e| LockSafetyError::MountTable(e.to_string()))?;
    let table = mountinfo::parse(&text).map_err(|e| LockSafetyError::MountTable(e.to_string()))?;
    let Some(entry) = lock_dir_mount(&table, dir) else {
        return Err(LockSafetyError::MountTable(format!(
            "no mount holds {}",
            dir.display()
        )));
    };
    match judge(entry, config.lock.allow_local_locks) {
        LockVerdict::Unsafe { detail, fix } => Err(LockSafetyError::Unsafe {
            dir: dir.clone(),
            detail,
            fix,
        }),
        LockVerdict::Doubtful { detail, .. } => {
            tracing::warn!(dir = %dir.display(), "{detail}");
            Ok(())
        }
        LockVerdict::Safe { .. } => Ok(()),
    }
}
