//! The passthrough filesystem: `fuser`'s [`Filesystem`] calls, each turned into one call on
//! the backing `data_dir` (`names.rs`: the namespace; `data.rs`: open files and attributes)
//! and its answer. Reads and lookups pass through; each mutation, once applied, queues its
//! [`FsEvent`] before the caller hears back, so events are in the order the calls returned.
//!
//! Ordering across the worker threads: a namespace change (create, rename, unlink...) holds
//! `order` exclusively from the call on the backing tree until its event is queued; a data
//! call (write, setattr, fallocate) holds it shared. So a write's event always names the path
//! its file had when the write was queued: a rename is never queued between a write and the
//! path the write is reported under.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use crossbeam_channel::Sender;
use fuser::{
    Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};

use crate::replicated::capture::fuse::dirs::DirStream;
use crate::replicated::capture::fuse::durable::Durable;
use crate::replicated::capture::fuse::inodes::{child, Inodes};
use crate::replicated::capture::fuse::sys;
use crate::replicated::capture::watch::FsEvent;
use crate::replicated::capture::InlineScan;

/// How long the kernel may cache an entry or attributes: only this daemon changes the tree.
const TTL: Duration = Duration::from_secs(1);
/// The largest write the kernel sends in one request.
pub(super) const MAX_WRITE_BYTES: u32 = 1 << 20;

/// The filesystem; see the module doc.
#[derive(Debug)]
pub(super) struct Passthrough {
    root: PathBuf,
    pub(super) inodes: Mutex<Inodes>,
    pub(super) files: Mutex<HashMap<u64, Arc<File>>>,
    /// Open directory handles and where each is in its listing.
    pub(super) dirs: Mutex<HashMap<u64, DirStream>>,
    /// The next handle, of a file or a directory.
    pub(super) next_fh: AtomicU64,
    /// Held for writing by each call that changes the tree, until its event is sent; the
    /// scanner holds it for reading to know that none is in flight (shared with it).
    pub(super) order: Arc<RwLock<()>>,
    events: Sender<FsEvent>,
    /// Durable acks, when `ack = "durable"`.
    pub(super) durable: Option<Durable>,
    /// The scanner, for small writes' events with durable acks.
    inline: Option<InlineScan>,
}

/// A result with the errno the caller gets.
pub(super) type Res<T> = Result<T, Errno>;

/// A file name as the op stream's UTF-8 (anything else is refused with `EINVAL`).
pub(super) fn utf8(name: &OsStr) -> Res<&str> {
    name.to_str().ok_or(Errno::EINVAL)
}

impl Passthrough {
    /// Serves `root` (canonical); events go to `events`, or (durable acks) through `inline`.
    pub(super) fn new(
        root: PathBuf,
        events: Sender<FsEvent>,
        durable: Option<Durable>,
        inline: Option<InlineScan>,
    ) -> std::io::Result<Passthrough> {
        let backing = fs::metadata(&root)?.ino();
        Ok(Passthrough {
            root,
            inodes: Mutex::new(Inodes::new(backing)),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            order: Arc::new(RwLock::new(())),
            events,
            inline,
            durable,
        })
    }

    /// Shares `order` with the scanner ([`crate::replicated::capture::Scanner::namespace_lock`]).
    pub(super) fn with_namespace_lock(mut self, order: Arc<RwLock<()>>) -> Self {
        self.order = order;
        self
    }

    /// The backing path of `rel`.
    pub(super) fn abs(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    /// The path of node `ino`; `ENOENT` once it has none (unlinked).
    pub(super) fn rel(&self, ino: INodeNo) -> Res<String> {
        let t = self.inodes.lock().expect("inode table");
        t.path(ino.0).map(str::to_owned).ok_or(Errno::ENOENT)
    }

    /// The path of `name` in the directory node `parent`.
    pub(super) fn child_of(&self, parent: INodeNo, name: &OsStr) -> Res<String> {
        Ok(child(&self.rel(parent)?, utf8(name)?))
    }

    /// Looks `rel` up on the backing tree: its node (one more lookup) and attributes.
    pub(super) fn entry(&self, rel: &str) -> Res<FileAttr> {
        Ok(self.entry_with_meta(rel)?.0)
    }

    /// [`Passthrough::entry`], and the `lstat` it was made from.
    pub(super) fn entry_with_meta(&self, rel: &str) -> Res<(FileAttr, fs::Metadata)> {
        let m = fs::symlink_metadata(self.abs(rel))?;
        let ino = self.inodes.lock().expect("inode table").learn(rel, m.ino());
        Ok((sys::attr(ino, &m), m))
    }

    /// Queues an event for the scanner (blocks while its queue is full: back-pressure), or,
    /// with durable acks, has a small write's handled now when the scanner is free
    /// ([`InlineScan`]).
    pub(super) fn send(&self, ev: FsEvent) {
        let ev = match &self.inline {
            Some(inline) => match inline.try_handle(ev) {
                Ok(()) => return,
                Err(ev) => ev,
            },
            None => ev,
        };
        if let Some(d) = &self.durable {
            // counted before it is queued (see `ack_watch`)
            d.stats().acks.count_event();
        }
        // a stopped scanner has nothing to send to: the change is on disk regardless
        let _ = self.events.send(ev);
    }

    /// Keeps an open backing file; its handle for the kernel.
    pub(super) fn keep(&self, file: impl Into<Arc<File>>) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files
            .lock()
            .expect("file table")
            .insert(fh, file.into());
        fh
    }

    /// The open backing file of handle `fh`.
    pub(super) fn file(&self, fh: FileHandle) -> Res<Arc<File>> {
        let files = self.files.lock().expect("file table");
        files.get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    /// A backing file open on node `ino`: `fh`'s, else any open handle of it. A node unlinked
    /// or replaced while open has no path: its descriptors reach it only through a handle.
    pub(super) fn handle_of(&self, ino: INodeNo, fh: Option<FileHandle>) -> Option<Arc<File>> {
        if let Some(f) = fh.and_then(|fh| self.file(fh).ok()) {
            return Some(f);
        }
        let backing = self.inodes.lock().expect("inode table").backing(ino.0)?;
        let open: Vec<Arc<File>> = self
            .files
            .lock()
            .expect("file table")
            .values()
            .cloned()
            .collect();
        open.into_iter()
            .find(|f| f.metadata().is_ok_and(|m| m.ino() == backing))
    }

    fn getattr_of(&self, ino: INodeNo, fh: Option<FileHandle>) -> Res<FileAttr> {
        if let Some(f) = fh.and_then(|fh| self.file(fh).ok()) {
            return Ok(sys::attr(ino.0, &f.metadata()?));
        }
        match self.rel(ino) {
            Ok(rel) => Ok(sys::attr(ino.0, &fs::symlink_metadata(self.abs(&rel))?)),
            // unlinked or replaced while open (an `fstat`): read through a handle of it
            Err(e) => {
                let f = self.handle_of(ino, None).ok_or(e)?;
                Ok(sys::attr(ino.0, &f.metadata()?))
            }
        }
    }

    /// Answers a sync (of a file or a directory) whose local part is done: at once, or with
    /// durable acks once the cold side has acknowledged (given by whoever sees it first).
    fn synced(&self, reply: ReplyEmpty) {
        self.synced_then(Box::new(move || reply.ok()));
    }

    /// As [`Passthrough::synced`], for any answer (an `O_DIRECT` write's).
    fn synced_then(&self, answer: crate::replicated::ack_watch::Answer) {
        match &self.durable {
            None => answer(),
            Some(d) => d.answer(answer),
        }
    }

    fn statfs_of(&self) -> Res<libc::statvfs> {
        Ok(sys::statvfs(&self.root)?)
    }
}

/// Answers `reply` with `r`'s value through `ok`, or its errno.
macro_rules! answer {
    ($r:expr, $reply:ident, |$v:pat_param| $ok:expr) => {
        match $r {
            Ok($v) => $ok,
            Err(e) => $reply.error(e),
        }
    };
}

#[allow(clippy::too_many_arguments)] // the trait's signatures
impl Filesystem for Passthrough {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_write(MAX_WRITE_BYTES) {
            let _ = config.set_max_write(nearest);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.child_of(parent, name).and_then(|rel| self.entry(&rel));
        answer!(r, reply, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes
            .lock()
            .expect("inode table")
            .forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        answer!(self.getattr_of(ino, fh), reply, |a| reply.attr(&TTL, &a));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = super::data::AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        let r = self
            .set_attrs(req, ino, fh, &change)
            .and_then(|()| self.getattr_of(ino, fh));
        answer!(r, reply, |a| reply.attr(&TTL, &a));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self
            .rel(ino)
            .and_then(|rel| Ok(fs::read_link(self.abs(&rel))?));
        answer!(r, reply, |t| reply
            .data(std::os::unix::ffi::OsStrExt::as_bytes(t.as_os_str())));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.make_node(req, parent, name, mode);
        answer!(r, reply, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.make_dir(req, parent, name, mode);
        answer!(r, reply, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer!(self.remove(parent, name, false), reply, |_v| reply.ok());
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer!(self.remove(parent, name, true), reply, |_v| reply.ok());
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.make_symlink(req, parent, link_name, target);
        answer!(r, reply, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.rename_entry(parent, name, newparent, newname, flags);
        answer!(r, reply, |_v| reply.ok());
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        // the op stream has no hard links; link(2) documents EPERM for a filesystem without them
        reply.error(Errno::EPERM);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.open_file(ino, flags.0);
        answer!(r, reply, |fh| reply
            .opened(FileHandle(fh), FopenFlags::empty()));
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
        answer!(self.read_at(fh, offset, size), reply, |d| reply.data(&d));
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let written = self.write_at(ino, fh, offset, data);
        if flags.0 & libc::O_DIRECT == 0 {
            return answer!(written, reply, |n| reply.written(n));
        }
        // Artemis' ASYNCIO journal takes an `O_DIRECT` write's completion as its record on
        // the disk and never calls fdatasync: such a write is a sync of what it wrote. The
        // backing file is written through its page cache, so its pages are written out to
        // the device as `O_DIRECT` would have (no cache flush: an `fdatasync` cost twice as
        // much on a virtio disk), and the write is answered as a sync is
        match written.and_then(|n| self.write_out(fh, offset, n).map(|()| n)) {
            Ok(n) => self.synced_then(Box::new(move || reply.written(n))),
            Err(e) => reply.error(e),
        }
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
        self.files.lock().expect("file table").remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        answer!(self.sync(fh, datasync), reply, |_v| self.synced(reply));
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(self.open_dir()), FopenFlags::empty());
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.release_dir(fh);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        answer!(self.read_dir(ino, fh, offset, &mut reply), reply, |_v| {
            reply.ok()
        });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self
            .rel(ino)
            .and_then(|rel| Ok(File::open(self.abs(&rel))?.sync_all()?));
        // as a file's: the names made, moved or removed before it are synced on the cold side
        answer!(r, reply, |_v| self.synced(reply));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        answer!(self.statfs_of(), reply, |s| reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            u32::try_from(s.f_bsize).unwrap_or(4096),
            u32::try_from(s.f_namemax).unwrap_or(255),
            u32::try_from(s.f_frsize).unwrap_or(4096),
        ));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.create_file(req, parent, name, mode, flags);
        answer!(r, reply, |(a, fh)| reply.created(
            &TTL,
            &a,
            Generation(0),
            FileHandle(fh),
            FopenFlags::empty()
        ));
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.allocate(ino, fh, offset, length, mode);
        answer!(r, reply, |_v| reply.ok());
    }

    // Calls the passthrough does not serve answer ENOSYS without a log line: the kernel then
    // stops asking (extended attributes read as unsupported, `lseek` and `copy_file_range`
    // fall back to its generic code).

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: ReplyLseek,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::ENOSYS);
    }
}
