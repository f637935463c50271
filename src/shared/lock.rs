//! The exclusive advisory lock on `<lock dir>/lock`.
//!
//! It is an open-file-description (OFD) `fcntl` write lock over the whole file, not `flock(2)`
//! (which std's `File::try_lock` uses):
//! - on NFS the kernel turns both into POSIX byte-range locks held by the server, so they are
//!   equivalent there;
//! - on CIFS `flock` is local to the host before Linux 5.5, while POSIX and OFD locks become SMB
//!   byte-range locks on every kernel (unless the mount has `nobrl`, which the doctor refuses);
//! - unlike classic POSIX locks, an OFD lock belongs to the open file, not the process: two
//!   opens in one process conflict, and closing another descriptor of the same file in the
//!   process does not silently drop it.
//!
//! A lock alone cannot prove exclusion (an NFS server drops the locks of a client it lost
//! contact with, and the holder is not told), so the lease in [`crate::shared::lease`] is checked on
//! top of it. [`LockFile::still_ours`] catches the lock file being replaced under us.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Errors taking the lock.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum LockError {
    /// cannot open lock file {path:?}: {source}
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// cannot lock {path:?}: {source}
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A held lock; dropping it closes the file, which releases the lock.
#[derive(Debug)]
pub struct LockFile {
    file: File,
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl LockFile {
    /// Tries to take the exclusive lock on `path` (created if missing) without waiting.
    /// `Ok(None)` when another open file holds it.
    pub fn try_acquire(path: &Path) -> Result<Option<LockFile>, LockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| LockError::Open {
                path: path.to_owned(),
                source,
            })?;
        let fl = whole_file_write_lock(); // its l_pid is 0, as OFD locks require

        // SAFETY: the descriptor is open for the duration of the call and `fl` is a valid,
        // initialised flock that outlives it.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(None),
                _ => Err(LockError::Lock {
                    path: path.to_owned(),
                    source: err,
                }),
            };
        }
        let meta = file.metadata().map_err(|source| LockError::Lock {
            path: path.to_owned(),
            source,
        })?;
        Ok(Some(LockFile {
            file,
            path: path.to_owned(),
            dev_ino: (meta.dev(), meta.ino()),
        }))
    }

    /// Whether the path still names the file we locked (it was not deleted or replaced).
    pub fn still_ours(&self) -> io::Result<bool> {
        let meta = std::fs::metadata(&self.path)?;
        // also make sure our descriptor still answers (a stale NFS handle errors here)
        self.file.metadata()?;
        Ok((meta.dev(), meta.ino()) == self.dev_ino)
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// An `fcntl(2)` write-lock record over the whole file: from offset 0 to its end, however
/// long it grows (length 0), with no pid.
pub(crate) fn whole_file_write_lock() -> libc::flock {
    // SAFETY: flock is plain old data; all-zero bytes are a valid value of it.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = short_constant(libc::F_WRLCK);
    fl.l_whence = short_constant(libc::SEEK_SET);
    fl
}

/// An `fcntl(2)` lock type or `whence` constant (libc declares them `int`) as the `short` the
/// `flock` record stores: they are 0 to 2, so nothing is lost.
#[allow(clippy::cast_possible_truncation)]
pub(crate) fn short_constant(value: libc::c_int) -> libc::c_short {
    value as libc::c_short
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_a_second_open_even_in_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = LockFile::try_acquire(&path).unwrap().expect("first lock");
        assert!(
            LockFile::try_acquire(&path).unwrap().is_none(),
            "second open must not get it"
        );
        assert!(held.still_ours().unwrap());
        drop(held);
        assert!(
            LockFile::try_acquire(&path).unwrap().is_some(),
            "free after drop"
        );
    }

    #[test]
    fn notices_a_replaced_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = LockFile::try_acquire(&path).unwrap().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(held.still_ours().is_err(), "deleted");
        std::fs::write(&path, b"").unwrap();
        assert!(!held.still_ours().unwrap(), "replaced");
    }

    #[test]
    fn names_the_path_it_cannot_open() {
        let err = LockFile::try_acquire(Path::new("/no/such/dir/lock")).unwrap_err();
        assert!(err.to_string().contains("/no/such/dir/lock"), "{err}");
    }
}
