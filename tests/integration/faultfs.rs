//! A FUSE passthrough for fault tests (issue 16), served by a thread of the test process:
//! it serves a backing directory at a mount point, and while the test sets its flag every
//! call that changes the disk (write, fsync, create, mkdir, rename, unlink, setattr,
//! fallocate, symlink) fails with `EIO`, as a dying disk's would; reads and lookups still
//! work. There is no device-mapper here (no `/dev/mapper`), so this stands in for its
//! `error` target. Entry and attribute lifetimes are zero: the kernel asks for every path.
//! In its stall mode the same calls do not fail but wait until the test releases them, as
//! on a disk that stopped answering (its `delay` target with no end); reads still work.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow,
    WriteFlags,
};

use crate::util::MountGuard;

/// Entries and attributes are not cached by the kernel.
const TTL: Duration = Duration::ZERO;
/// Threads serving the kernel's requests.
const THREADS: usize = 2;

type Res<T> = Result<T, Errno>;

/// What the test and the serving threads share.
#[derive(Debug)]
struct Shared {
    backing: PathBuf,
    failing: AtomicBool,
    /// Calls answered `EIO` because of the flag.
    failed: AtomicU64,
    /// Every fsync fails and loses what was written since the file's last good one.
    losing: AtomicBool,
    /// Every fsync (of a file or a directory) fails; what was written stays written.
    fsync_failing: AtomicBool,
    /// Every change of owner fails with `EPERM`, as on an NFS share that maps root to nobody.
    squashing_root: AtomicBool,
    /// While true, every call that changes the disk waits (on `released`) until it is false.
    stalling: Mutex<bool>,
    /// Told when `stalling` turns false.
    released: Condvar,
    /// Calls waiting in a stall now.
    stalled: AtomicU64,
    /// Path below `backing` -> its content at its last good fsync (taken at the first write
    /// while `losing`).
    durable: Mutex<HashMap<PathBuf, Vec<u8>>>,
    /// Node id -> path below `backing`; backing inode -> node id.
    nodes: Mutex<(HashMap<u64, PathBuf>, HashMap<u64, u64>)>,
    files: Mutex<HashMap<u64, File>>,
    next: AtomicU64,
}

/// A served fault filesystem; unmounted (lazily) when dropped.
#[derive(Debug)]
pub(crate) struct FaultFs {
    shared: Arc<Shared>,
    _guard: MountGuard,
}

impl FaultFs {
    /// Serves `backing` at `mount_point` (both directories are created).
    pub(crate) fn mount(backing: &Path, mount_point: &Path) -> FaultFs {
        fs::create_dir_all(backing).unwrap();
        fs::create_dir_all(mount_point).unwrap();
        let root_ino = fs::metadata(backing).unwrap().ino();
        let shared = Arc::new(Shared {
            backing: backing.to_owned(),
            failing: AtomicBool::new(false),
            failed: AtomicU64::new(0),
            losing: AtomicBool::new(false),
            fsync_failing: AtomicBool::new(false),
            squashing_root: AtomicBool::new(false),
            stalling: Mutex::new(false),
            released: Condvar::new(),
            stalled: AtomicU64::new(0),
            durable: Mutex::new(HashMap::new()),
            nodes: Mutex::new((
                HashMap::from([(1, PathBuf::new())]),
                HashMap::from([(root_ino, 1)]),
            )),
            files: Mutex::new(HashMap::new()),
            next: AtomicU64::new(2),
        });
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            MountOption::FSName("faultfs".into()),
            MountOption::DefaultPermissions,
            MountOption::RW,
        ];
        cfg.acl = SessionACL::All;
        cfg.n_threads = Some(THREADS);
        let guard = MountGuard::new(mount_point);
        let session = fuser::Session::new(Fs(shared.clone()), mount_point, &cfg).unwrap();
        std::thread::Builder::new()
            .name("faultfs".into())
            .spawn(move || session.run())
            .unwrap();
        FaultFs {
            shared,
            _guard: guard,
        }
    }

    /// From now on, every change to the disk fails with `EIO` (`true`), or works again.
    pub(crate) fn set_failing(&self, on: bool) {
        self.shared.failing.store(on, Ordering::SeqCst);
    }

    /// From now on, every fsync fails with `EIO` and the file loses what was written since
    /// its last good fsync, as a disk whose writeback failed does, while the kernel's cache
    /// keeps it (files are opened with `FOPEN_KEEP_CACHE`): reads through the mount still see
    /// the lost data, the backing file does not. `false`: fsyncs work again.
    pub(crate) fn set_losing(&self, on: bool) {
        self.shared.losing.store(on, Ordering::SeqCst);
    }

    /// From now on, every fsync of a file or directory fails with `EIO` while the writes
    /// before it stay on the backing disk (a transient error whose data landed), or works
    /// again (`false`).
    pub(crate) fn set_fsync_failing(&self, on: bool) {
        self.shared.fsync_failing.store(on, Ordering::SeqCst);
    }

    /// From now on, every change of owner fails with `EPERM` (`root_squash`), or works again.
    pub(crate) fn set_squashing_root(&self, on: bool) {
        self.shared.squashing_root.store(on, Ordering::SeqCst);
    }

    /// Calls answered `EIO` so far.
    pub(crate) fn failed_calls(&self) -> u64 {
        self.shared.failed.load(Ordering::SeqCst)
    }

    /// From now on, every call that changes the disk waits, unanswered, until
    /// `set_stalling(false)` (or the drop) releases it and every later one, as a disk that
    /// stopped answering: the caller hangs in its write, not in an error.
    pub(crate) fn set_stalling(&self, on: bool) {
        *self.shared.stalling.lock().unwrap() = on;
        if !on {
            self.shared.released.notify_all();
        }
    }

    /// Calls waiting in a stall now.
    pub(crate) fn stalled_calls(&self) -> u64 {
        self.shared.stalled.load(Ordering::SeqCst)
    }
}

impl Drop for FaultFs {
    /// Releases stalled calls before the unmount: a caller is not left hanging on a test that
    /// failed while the disk stalled.
    fn drop(&mut self) {
        self.set_stalling(false);
    }
}

/// The filesystem the session serves.
struct Fs(Arc<Shared>);

fn errno(e: std::io::Error) -> Errno {
    Errno::from(e)
}

fn attr(ino: u64, m: &fs::Metadata) -> FileAttr {
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    };
    let time = |s: i64, ns: i64| {
        UNIX_EPOCH
            + Duration::new(
                u64::try_from(s).unwrap_or(0),
                u32::try_from(ns).unwrap_or(0),
            )
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
        perm: u16::try_from(m.mode() & 0o7777).unwrap(),
        nlink: u32::try_from(m.nlink()).unwrap_or(u32::MAX),
        uid: m.uid(),
        gid: m.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Fs {
    /// `EIO` while the test says so; first, while it stalls the disk, waits for the release.
    fn fault(&self) -> Res<()> {
        let mut stalling = self.0.stalling.lock().unwrap();
        if *stalling {
            self.0.stalled.fetch_add(1, Ordering::SeqCst);
            while *stalling {
                stalling = self.0.released.wait(stalling).unwrap();
            }
            self.0.stalled.fetch_sub(1, Ordering::SeqCst);
        }
        drop(stalling);
        if self.0.failing.load(Ordering::SeqCst) {
            self.0.failed.fetch_add(1, Ordering::SeqCst);
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// Whether fsyncs fail (and the failure is counted).
    fn fsync_fails(&self) -> bool {
        let on = self.0.fsync_failing.load(Ordering::SeqCst);
        if on {
            self.0.failed.fetch_add(1, Ordering::SeqCst);
        }
        on
    }

    /// While losing: the content of the file of `ino` before its first write since the last
    /// good fsync.
    fn remember_durable(&self, ino: INodeNo) -> Res<()> {
        if !self.0.losing.load(Ordering::SeqCst) {
            return Ok(());
        }
        let rel = self.rel(ino)?;
        if let std::collections::hash_map::Entry::Vacant(e) =
            self.0.durable.lock().unwrap().entry(rel)
        {
            let old = fs::read(self.abs(e.key())).map_err(errno)?;
            e.insert(old);
        }
        Ok(())
    }

    /// A failed fsync while losing: the file goes back to its content at the last good fsync,
    /// keeping its size and mtime (the kernel keeps its cached pages).
    fn lose(&self, ino: INodeNo) -> Res<()> {
        let rel = self.rel(ino)?;
        self.0.failed.fetch_add(1, Ordering::SeqCst);
        let Some(old) = self.0.durable.lock().unwrap().remove(&rel) else {
            return Err(Errno::EIO);
        };
        let path = self.abs(&rel);
        let mtime = fs::metadata(&path)
            .and_then(|m| m.modified())
            .map_err(errno)?;
        let f = OpenOptions::new().write(true).open(&path).map_err(errno)?;
        f.write_all_at(&old, 0).map_err(errno)?;
        f.set_modified(mtime).map_err(errno)?;
        Err(Errno::EIO)
    }

    fn rel(&self, ino: INodeNo) -> Res<PathBuf> {
        let nodes = self.0.nodes.lock().unwrap();
        nodes.0.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        self.0.backing.join(rel)
    }

    /// The node of `rel` (named now), with its attributes.
    fn node(&self, rel: PathBuf) -> Res<FileAttr> {
        let m = fs::symlink_metadata(self.abs(&rel)).map_err(errno)?;
        let mut nodes = self.0.nodes.lock().unwrap();
        let ino = match nodes.1.get(&m.ino()) {
            Some(i) => *i,
            None => {
                let i = self.0.next.fetch_add(1, Ordering::SeqCst);
                nodes.1.insert(m.ino(), i);
                i
            }
        };
        nodes.0.insert(ino, rel);
        Ok(attr(ino, &m))
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Res<PathBuf> {
        Ok(self.rel(parent)?.join(name))
    }

    /// The path of `name` in `parent`, which the call is about to change (`EIO` while failing).
    fn changed_child(&self, parent: INodeNo, name: &OsStr) -> Res<PathBuf> {
        self.fault()?;
        self.child(parent, name)
    }

    fn keep(&self, f: File) -> u64 {
        let fh = self.0.next.fetch_add(1, Ordering::SeqCst);
        self.0.files.lock().unwrap().insert(fh, f);
        fh
    }

    fn with_file<T>(&self, fh: FileHandle, f: impl FnOnce(&File) -> std::io::Result<T>) -> Res<T> {
        let files = self.0.files.lock().unwrap();
        f(files.get(&fh.0).ok_or(Errno::EBADF)?).map_err(errno)
    }

    fn open_path(&self, rel: &Path, flags: i32, create: Option<u32>) -> Res<File> {
        let acc = flags & libc::O_ACCMODE;
        let mut o = OpenOptions::new();
        o.read(acc != libc::O_WRONLY)
            .write(acc != libc::O_RDONLY)
            .custom_flags(flags & (libc::O_APPEND | libc::O_TRUNC) | libc::O_NOFOLLOW);
        if let Some(mode) = create {
            o.create(true).mode(mode);
        }
        o.open(self.abs(rel)).map_err(errno)
    }

    fn set_attrs(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        owner: [Option<u32>; 2],
        size: Option<u64>,
    ) -> Res<()> {
        let path = self.abs(&self.rel(ino)?);
        if let Some(mode) = mode {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777)).map_err(errno)?;
        }
        if owner.iter().any(Option::is_some) {
            if self.0.squashing_root.load(Ordering::SeqCst) {
                return Err(Errno::EPERM);
            }
            std::os::unix::fs::lchown(&path, owner[0], owner[1]).map_err(errno)?;
        }
        if let Some(len) = size {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .and_then(|f| f.set_len(len))
                .map_err(errno)?;
        }
        Ok(())
    }

    /// Sets the access and modification times asked for (a symlink's are left alone).
    fn set_times(
        &self,
        ino: INodeNo,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> Res<()> {
        if atime.is_none() && mtime.is_none() {
            return Ok(());
        }
        let path = self.abs(&self.rel(ino)?);
        if fs::symlink_metadata(&path).map_err(errno)?.is_symlink() {
            return Ok(());
        }
        let at = |t: TimeOrNow| match t {
            TimeOrNow::SpecificTime(t) => t,
            TimeOrNow::Now => std::time::SystemTime::now(),
        };
        let mut times = fs::FileTimes::new();
        if let Some(t) = atime {
            times = times.set_accessed(at(t));
        }
        if let Some(t) = mtime {
            times = times.set_modified(at(t));
        }
        File::open(&path)
            .and_then(|f| f.set_times(times))
            .map_err(errno)
    }

    fn list(&self, ino: INodeNo) -> Res<Vec<(u64, FileType, std::ffi::OsString)>> {
        let rel = self.rel(ino)?;
        let mut out = vec![
            (ino.0, FileType::Directory, ".".into()),
            (ino.0, FileType::Directory, "..".into()),
        ];
        for e in fs::read_dir(self.abs(&rel)).map_err(errno)? {
            let e = e.map_err(errno)?;
            let a = self.node(rel.join(e.file_name()))?;
            out.push((a.ino.0, a.kind, e.file_name()));
        }
        Ok(out)
    }
}

macro_rules! answer {
    ($r:expr, $reply:ident, |$v:pat_param| $ok:expr) => {
        match $r {
            Ok($v) => $ok,
            Err(e) => $reply.error(e),
        }
    };
}

#[allow(clippy::too_many_arguments)] // the trait's signatures
impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.child(parent, name).and_then(|rel| self.node(rel));
        answer!(r, reply, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = self.rel(ino).and_then(|rel| self.node(rel));
        answer!(r, reply, |a| reply.attr(&TTL, &a));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let changes = mode.is_some() || uid.is_some() || gid.is_some() || size.is_some();
        let r = (if changes { self.fault() } else { Ok(()) })
            .and_then(|()| self.set_attrs(ino, mode, [uid, gid], size))
            .and_then(|()| self.set_times(ino, atime, mtime))
            .and_then(|()| self.node(self.rel(ino)?));
        answer!(r, reply, |a| reply.attr(&TTL, &a));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self
            .rel(ino)
            .and_then(|rel| fs::read_link(self.abs(&rel)).map_err(errno));
        answer!(r, reply, |t| reply
            .data(std::os::unix::ffi::OsStrExt::as_bytes(t.as_os_str())));
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.changed_child(parent, name).and_then(|rel| {
            fs::create_dir(self.abs(&rel)).map_err(errno)?;
            fs::set_permissions(self.abs(&rel), fs::Permissions::from_mode(mode & 0o7777))
                .map_err(errno)?;
            self.node(rel)
        });
        answer!(r, reply, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self
            .changed_child(parent, name)
            .and_then(|rel| fs::remove_file(self.abs(&rel)).map_err(errno));
        answer!(r, reply, |()| reply.ok());
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self
            .changed_child(parent, name)
            .and_then(|rel| fs::remove_dir(self.abs(&rel)).map_err(errno));
        answer!(r, reply, |()| reply.ok());
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.changed_child(parent, link_name).and_then(|rel| {
            std::os::unix::fs::symlink(target, self.abs(&rel)).map_err(errno)?;
            self.node(rel)
        });
        answer!(r, reply, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.fault().and_then(|()| {
            let (from, to) = (self.child(parent, name)?, self.child(newparent, newname)?);
            fs::rename(self.abs(&from), self.abs(&to)).map_err(errno)?;
            self.node(to).map(|_| ())
        });
        answer!(r, reply, |()| reply.ok());
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self
            .rel(ino)
            .and_then(|rel| self.open_path(&rel, flags.0, None));
        answer!(r, reply, |f| reply
            .opened(FileHandle(self.keep(f)), FopenFlags::FOPEN_KEEP_CACHE));
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.with_file(fh, |f| {
            let mut buf = vec![0u8; size as usize];
            let mut n = 0;
            while n < buf.len() {
                match f.read_at(&mut buf[n..], offset + n as u64)? {
                    0 => break,
                    k => n += k,
                }
            }
            buf.truncate(n);
            Ok(buf)
        });
        answer!(r, reply, |d| reply.data(&d));
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self
            .fault()
            .and_then(|()| self.remember_durable(ino))
            .and_then(|()| self.with_file(fh, |f| f.write_all_at(data, offset)));
        answer!(r, reply, |()| reply
            .written(u32::try_from(data.len()).unwrap()));
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.0.files.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.0.losing.load(Ordering::SeqCst) {
            let r = self.lose(ino);
            answer!(r, reply, |()| reply.ok());
            return;
        }
        if self.fsync_fails() {
            return reply.error(Errno::EIO);
        }
        let r = self.fault().and_then(|()| {
            self.with_file(fh, |f| {
                if datasync {
                    f.sync_data()
                } else {
                    f.sync_all()
                }
            })?;
            // the disk has what was written: nothing to lose any more
            let rel = self.rel(ino)?;
            self.0.durable.lock().unwrap().remove(&rel);
            Ok(())
        });
        answer!(r, reply, |()| reply.ok());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.list(ino) {
            Ok(entries) => {
                let skip = usize::try_from(offset).unwrap();
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
                    if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.fsync_fails() {
            return reply.error(Errno::EIO);
        }
        let r = self.fault().and_then(|()| self.rel(ino)).and_then(|rel| {
            File::open(self.abs(&rel))
                .and_then(|f| f.sync_all())
                .map_err(errno)
        });
        answer!(r, reply, |()| reply.ok());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // SAFETY: statvfs is plain old data, filled by the call below.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        let path = std::ffi::CString::new(self.0.backing.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string and a valid out pointer.
        if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
            return reply.error(errno(std::io::Error::last_os_error()));
        }
        reply.statfs(
            s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, 4096, 255, 4096,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.changed_child(parent, name).and_then(|rel| {
            let f = self.open_path(&rel, flags, Some(mode & 0o7777))?;
            Ok((self.node(rel)?, f))
        });
        answer!(r, reply, |(a, f)| reply.created(
            &TTL,
            &a,
            Generation(0),
            FileHandle(self.keep(f)),
            FopenFlags::empty()
        ));
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.fault().and_then(|()| {
            self.with_file(fh, |f| {
                let (o, l) = (
                    i64::try_from(offset).unwrap(),
                    i64::try_from(length).unwrap(),
                );
                // SAFETY: fallocate on a descriptor this filesystem owns; no pointers.
                match unsafe { libc::fallocate(f.as_raw_fd(), mode, o, l) } {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                }
            })
        });
        answer!(r, reply, |()| reply.ok());
    }
}
