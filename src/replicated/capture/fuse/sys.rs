//! The system calls the passthrough makes that `std` lacks (owners without following links,
//! times, `fallocate`, `sync_file_range`, `statvfs`, `renameat2`), and the backing `stat` as FUSE
//! attributes. Every error is the real errno.

use std::ffi::CString;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};

/// The permission and set-id bits of a mode.
pub(super) const MODE_BITS: u32 = 0o7777;

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A time from seconds and nanoseconds since the epoch (before it too).
fn time(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = u32::try_from(nsecs.clamp(0, 999_999_999)).expect("clamped below 1e9");
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::new(s, nanos),
        Err(_) => UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::new(0, nanos),
    }
}

/// The backing file's metadata as the attributes of node `ino`.
pub(super) fn attr(ino: u64, m: &Metadata) -> FileAttr {
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_fifo() {
        FileType::NamedPipe
    } else if ft.is_socket() {
        FileType::Socket
    } else if ft.is_char_device() {
        FileType::CharDevice
    } else if ft.is_block_device() {
        FileType::BlockDevice
    } else {
        FileType::RegularFile
    };
    FileAttr {
        ino: INodeNo(ino),
        size: m.size(),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind,
        perm: u16::try_from(m.mode() & MODE_BITS).expect("masked to 12 bits"),
        nlink: u32::try_from(m.nlink()).unwrap_or(u32::MAX),
        uid: m.uid(),
        gid: m.gid(),
        rdev: u32::try_from(m.rdev()).unwrap_or(0),
        blksize: u32::try_from(m.blksize()).unwrap_or(4096),
        flags: 0,
    }
}

/// Sets the owner of `path` itself (a symlink is not followed).
pub(super) fn lchown(path: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let p = cstr(path)?;
    // u32::MAX is (uid_t)-1: leave that id as it is
    let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
    // SAFETY: `p` is a valid NUL-terminated string for the duration of the call.
    check(unsafe { libc::lchown(p.as_ptr(), u, g) })
}

/// Sets the mode of `path` itself: a symlink is refused with `EOPNOTSUPP`, as
/// `fchmodat(AT_SYMLINK_NOFOLLOW)` does. Kernels before 6.6 let a user reach a mode change of a
/// symlink they own (`chmod` of `/proc/self/fd/N` opened `O_PATH | O_NOFOLLOW`); `chmod(2)` as
/// root would follow it and change the mode of any file it names. (The caller holds the
/// ordering lock, so no call through the mount replaces the name between the two calls.)
pub(super) fn set_mode_nofollow(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::symlink_metadata(path)?.file_type().is_symlink() {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    let (tv_sec, tv_nsec) = match t {
        None => (0, libc::UTIME_OMIT),
        Some(TimeOrNow::Now) => (0, libc::UTIME_NOW),
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => (
                i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                i64::from(d.subsec_nanos()),
            ),
            Err(e) => (
                -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
                0,
            ),
        },
    };
    libc::timespec { tv_sec, tv_nsec }
}

/// Sets the access and modification times of `path` itself (`None` leaves one alone).
pub(super) fn set_times(
    path: &Path,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
) -> io::Result<()> {
    let p = cstr(path)?;
    let ts = [timespec(atime), timespec(mtime)];
    // SAFETY: `p` is NUL-terminated and `ts` holds the two timespecs utimensat reads.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// Sets the access and modification times of an open file (`None` leaves one alone).
pub(super) fn set_file_times(
    file: &File,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
) -> io::Result<()> {
    let ts = [timespec(atime), timespec(mtime)];
    // SAFETY: the descriptor is open for the duration of the call, and `ts` holds the two
    // timespecs futimens reads.
    check(unsafe { libc::futimens(file.as_raw_fd(), ts.as_ptr()) })
}

/// `fallocate(2)` on an open file.
pub(super) fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    let off = i64::try_from(offset).map_err(|_| einval())?;
    let len = i64::try_from(len).map_err(|_| einval())?;
    // SAFETY: the descriptor is open for the duration of the call; no memory is passed.
    check(unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) })
}

/// Writes the backing pages of `len` bytes at `offset` to the device and waits for them
/// (`sync_file_range(2)` with `WAIT_BEFORE | WRITE | WAIT_AFTER`): what an `O_DIRECT` write
/// gives its caller (the data on the device, no cache flush, no metadata), with the pages
/// left in the page cache for the scanner to read. Falls back to `fdatasync` where the call is
/// not supported for the file; a write-back error is the real errno.
pub(super) fn write_out(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        // a length of 0 would mean "to the end of the file"
        return Ok(());
    }
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    let off = i64::try_from(offset).map_err(|_| einval())?;
    let len = i64::try_from(len).map_err(|_| einval())?;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: the descriptor is open for the duration of the call; no memory is passed.
    match check(unsafe { libc::sync_file_range(file.as_raw_fd(), off, len, flags) }) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::ENOSYS | libc::ESPIPE | libc::EOPNOTSUPP)
            ) =>
        {
            file.sync_data()
        }
        r => r,
    }
}

/// `renameat2(2)` with `flags` (`RENAME_NOREPLACE`).
pub(super) fn rename2(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: both strings are NUL-terminated and live for the duration of the call.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    })
}

/// `statvfs(2)` of `path`.
pub(super) fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let p = cstr(path)?;
    // SAFETY: statvfs is plain data, for which all zeros is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `p` is NUL-terminated and `st` is a valid statvfs to fill.
    check(unsafe { libc::statvfs(p.as_ptr(), &mut st) })?;
    Ok(st)
}

/// `umount2(2)` of `path` with `flags` (`MNT_DETACH` for a lazy unmount).
pub(super) fn umount(path: &Path, flags: libc::c_int) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: `p` is a valid NUL-terminated string for the duration of the call.
    check(unsafe { libc::umount2(p.as_ptr(), flags) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_before_and_after_the_epoch() {
        assert_eq!(time(1, 5), UNIX_EPOCH + Duration::new(1, 5));
        assert_eq!(time(-2, 0), UNIX_EPOCH - Duration::from_secs(2));
        let t = timespec(Some(TimeOrNow::SpecificTime(
            UNIX_EPOCH + Duration::new(3, 7),
        )));
        assert_eq!((t.tv_sec, t.tv_nsec), (3, 7));
        assert_eq!(timespec(None).tv_nsec, libc::UTIME_OMIT);
    }

    #[test]
    fn issue9_a_mode_change_of_a_symlink_is_refused_and_its_target_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (target, link) = (dir.path().join("shadow"), dir.path().join("link"));
        std::fs::write(&target, b"x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = set_mode_nofollow(&link, 0o777).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP));
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o600);
        set_mode_nofollow(&target, 0o640).unwrap();
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o640);
    }
}
