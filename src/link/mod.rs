//! `${BASE_DIR}/artemis` as a symlink to the share: created atomically (a new link under a
//! temporary name, renamed into place), never replacing data. A real `artemis/` directory with
//! files is refused, or with `--migrate` copied into the share, every file verified by blake3,
//! and only then moved aside to `artemis.pre-artemis-sync.<timestamp>`. Nothing is deleted, and
//! an interrupted migration completes when run again.
//!
//! This file holds the link itself and what both halves use; `migrate` holds the migration.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

mod migrate;

pub use migrate::MigrationReport;

/// The read and write unit when copying and hashing files.
pub const COPY_CHUNK_BYTES: usize = 1 << 20;
/// The suffix that marks a migrated file still being written.
pub const MIGRATE_TMP_SUFFIX: &str = ".artemis-sync-tmp";
/// Where the old directory goes: `artemis` + this + a UTC timestamp.
pub const ASIDE_INFIX: &str = ".pre-artemis-sync.";

/// Errors creating the link or migrating into the share. Each names the path involved.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum LinkError {
    /// base directory {0:?} does not exist: check `[node] base_dir`
    BaseDirMissing(PathBuf),
    /// the share {0:?} is not a directory that exists: mount it first (`artemis-sync mount`)
    TargetMissing(PathBuf),
    /// the share {share:?} is not mounted ({reason}): mount it first (`artemis-sync mount`); a journal migrated into the directory beneath the mount point would be hidden once the share is mounted. Nothing was changed
    ShareNotMounted { share: PathBuf, reason: String },
    /// {path:?} is a real directory holding {entries} entries; refusing to replace it with a link. Run `artemis-sync link --migrate` to move its files into the share (verified, old directory kept aside)
    NotEmpty { path: PathBuf, entries: usize },
    /// {path:?} is a link to {current:?}, not to the share {wanted:?}; run with --force to replace it
    PointsElsewhere {
        path: PathBuf,
        current: PathBuf,
        wanted: PathBuf,
    },
    /// {0:?} is neither a directory nor a symlink; move it away by hand
    NotALinkOrDirectory(PathBuf),
    /// {0:?} is a socket, device or pipe; a journal directory holds none, so nothing was migrated
    Unsupported(PathBuf),
    /// {path:?} is a symlink to {target:?}, outside the journal directory: what it leads to would stay on this VM, out of the share, and the other VM would find the link leading nowhere or to its own files. Move what it points to into the directory in its place, then run again: nothing was migrated
    LinkLeavesJournal { path: PathBuf, target: PathBuf },
    /// {0:?} ends in `.artemis-sync-tmp`, the suffix of the migration's temporary files, and a copy's temporary could overwrite it; rename or remove it: nothing was migrated
    ReservedName(PathBuf),
    /// not enough space on the share {share:?}: the migration needs {needed} bytes, {available} are free; nothing was changed
    InsufficientSpace {
        share: PathBuf,
        needed: u64,
        available: u64,
    },
    /// {dest:?} already exists in the share with other content than {original:?}; refusing to overwrite it (is the other VM's journal already there?)
    Conflict { original: PathBuf, dest: PathBuf },
    /// the copy {dest:?} does not match {original:?} after writing (blake3 {wrote} written, {read} read back); it was removed, the source is intact: run again
    VerifyMismatch {
        original: PathBuf,
        dest: PathBuf,
        wrote: String,
        read: String,
    },
    /// {0:?} changed, appeared or vanished while it was being migrated (is the node running?); stop the node and run again: the source is intact
    SourceChanged(PathBuf),
    /// the broker is running: {holder} holds a lock on {path:?} (ActiveMQ Artemis locks it while it runs); stop the node first, then run again: nothing was changed
    BrokerRunning { path: PathBuf, holder: String },
    /// the share refuses to give {path:?} its owner {uid}:{gid} (EPERM): it maps root to nobody (`root_squash`, the default of most NFS exports and of Azure Files over NFS), so a migration run as root cannot keep the journal's owners. Export the share with `no_root_squash` (Azure: root squash "No Root Squash"), or move the journal as its owner by hand; the source is intact
    OwnerRefused { path: PathBuf, uid: u32, gid: u32 },
    /// {op} {path:?}: {source}
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LinkError + 'a {
    move |source| LinkError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A chown in the share failed: refused to root by a root-squashing share, or another error.
fn chown_err(path: &Path, (uid, gid): (u32, u32)) -> impl FnOnce(io::Error) -> LinkError + '_ {
    move |source| match source.raw_os_error() {
        // (as another user, EPERM is the kernel's own rule, not the share's)
        Some(libc::EPERM) if crate::sys::is_root() => LinkError::OwnerRefused {
            path: path.to_owned(),
            uid,
            gid,
        },
        _ => io_err("cannot set owner of", path)(source),
    }
}

/// What [`link`] may do beyond creating a missing link.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkOptions {
    /// Move the files of a real directory into the share.
    pub migrate: bool,
    /// Replace a link that points elsewhere.
    pub force: bool,
}

/// What [`link`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkOutcome {
    /// The link already pointed at the share; nothing changed.
    AlreadyLinked,
    /// The link was created (in place of nothing or of an empty directory).
    Created,
    /// A link to `previous` was replaced (`--force`).
    Replaced { previous: PathBuf },
    /// The directory's files were migrated and the link created.
    Migrated(MigrationReport),
}

/// State of the link path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Nothing there.
    Missing,
    /// A symlink that resolves to the share.
    Correct,
    /// A symlink to something else.
    Elsewhere(PathBuf),
    /// A real directory with this many entries.
    Directory(usize),
    /// Something else (a regular file...).
    Other,
}

/// What is at `link` now, relative to `target`.
pub fn inspect(link: &Path, target: &Path) -> Result<LinkState, LinkError> {
    let meta = match fs::symlink_metadata(link) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(LinkState::Missing),
        Err(e) => return Err(io_err("cannot inspect", link)(e)),
    };
    if meta.file_type().is_symlink() {
        let current = fs::read_link(link).map_err(io_err("cannot read link", link))?;
        let resolves_same = match (fs::canonicalize(link), fs::canonicalize(target)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if current == target || resolves_same {
            Ok(LinkState::Correct)
        } else {
            Ok(LinkState::Elsewhere(current))
        }
    } else if meta.is_dir() {
        let entries = fs::read_dir(link)
            .map_err(io_err("cannot list", link))?
            .count();
        Ok(LinkState::Directory(entries))
    } else {
        Ok(LinkState::Other)
    }
}

/// Makes `link` a symlink to `target` (see the module doc for what it refuses).
pub fn link(link: &Path, target: &Path, opts: LinkOptions) -> Result<LinkOutcome, LinkError> {
    let base = link.parent().unwrap_or(Path::new("/"));
    if !base.is_dir() {
        return Err(LinkError::BaseDirMissing(base.to_owned()));
    }
    if !target.is_dir() {
        return Err(LinkError::TargetMissing(target.to_owned()));
    }
    match inspect(link, target)? {
        LinkState::Correct => Ok(LinkOutcome::AlreadyLinked),
        LinkState::Missing => {
            create_link(link, target)?;
            Ok(LinkOutcome::Created)
        }
        LinkState::Elsewhere(previous) if opts.force => {
            create_link(link, target)?;
            tracing::warn!(link = %link.display(), previous = %previous.display(), "replaced a link that pointed elsewhere");
            Ok(LinkOutcome::Replaced { previous })
        }
        LinkState::Elsewhere(current) => Err(LinkError::PointsElsewhere {
            path: link.to_owned(),
            current,
            wanted: target.to_owned(),
        }),
        LinkState::Directory(0) => {
            // rmdir fails, and changes nothing, if a file appeared meanwhile
            fs::remove_dir(link).map_err(io_err("cannot remove the empty directory", link))?;
            create_link(link, target)?;
            Ok(LinkOutcome::Created)
        }
        LinkState::Directory(entries) if !opts.migrate => Err(LinkError::NotEmpty {
            path: link.to_owned(),
            entries,
        }),
        LinkState::Directory(_) => migrate::migrate(link, target).map(LinkOutcome::Migrated),
        LinkState::Other => Err(LinkError::NotALinkOrDirectory(link.to_owned())),
    }
}

/// Creates the link under a temporary name beside it and renames it into place, so that
/// `link` is at every moment either absent, the old link, or the new one.
fn create_link(link: &Path, target: &Path) -> Result<(), LinkError> {
    let base = link.parent().unwrap_or(Path::new("/"));
    let name = link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = base.join(format!(".{name}.link-tmp.{}", std::process::id()));
    let _ = fs::remove_file(&tmp); // left by a crashed run that had our pid
    std::os::unix::fs::symlink(target, &tmp).map_err(io_err("cannot create link", &tmp))?;
    if let Err(e) = fs::rename(&tmp, link) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("cannot rename link into place at", link)(e));
    }
    sync_dir(base)
}

fn sync_dir(dir: &Path) -> Result<(), LinkError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot fsync directory", dir))
}

/// The blake3 digest of a whole file's content (the migration compares copies by it).
pub fn file_digest(path: &Path) -> Result<blake3::Hash, LinkError> {
    let mut hasher = blake3::Hasher::new();
    let file = File::open(path).map_err(io_err("cannot open", path))?;
    hasher
        .update_reader(file)
        .map_err(io_err("cannot read", path))?;
    Ok(hasher.finalize())
}

/// `YYYYMMDDTHHMMSSZ` in UTC, for names that sort by time.
pub fn utc_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // u64::MAX / 86 400 is far below i64::MAX: the conversion cannot fail.
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(i64::MAX));
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date `(year, month, day)` (H. Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests;
