//! Pages and trees: the per-page blake3 table that tells what changed ([`hash_pages`], the
//! pages hashed side by side by [`page_digests`], `many.rs`), the tree index the cold side
//! reports on connect (every directory, file and symlink with its mode, owner and group, a
//! file's allocation, a link's target), the whole-tree digest
//! `verify` compares (`entry.rs`), the confinement of paths received from the network to the
//! data directory, and the cache of open files (`FileCache`) the scanner and the apply thread
//! keep.
//!
//! Symlinks are data: their target is read as text (`readlink`) and never followed; every
//! file is opened with `O_NOFOLLOW`.
//!
//! Files are read with positional reads (`pread`), never through `mmap`: a file truncated by
//! Artemis while we read it then gives a short read instead of a SIGBUS that would kill the
//! agent. A page's table entry is the first 16 bytes of its blake3 digest (enough to detect a
//! change; the wire carries the full 32 bytes for verification).

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;

mod entry;
mod many;
mod walk;

pub use entry::{compare_entries, Comparison, DigestCompare, Entry, EntryKind};
pub use walk::{
    digest_parts, file_index_parts, file_parts_from, hash_pages_chunked, index_parts, index_tree,
    other_index_part, walk_sorted, IndexPart, Node, RootAndLast, UNREAD_PAGE,
};

/// The unit of allocation a file's length is rounded up to when telling whether it is fully
/// allocated (the smallest block of the filesystems the journal lives on).
pub const ALLOC_UNIT_BYTES: u64 = 4096;
/// Bytes per unit of `st_blocks`.
const ST_BLOCK_BYTES: u64 = 512;

/// A page's entry in a table: the first 16 bytes of its blake3 digest.
pub type PageHash = [u8; 16];

/// Pages read and hashed per read call.
pub const READ_PAGES: usize = 256;

/// Open files a `FileCache` keeps: the scanner's (read handles for append windows) and the
/// apply thread's (write handles). Well above the journal files Artemis writes at a time, and
/// far below the default descriptor limit (1024) with both caches full.
pub const OPEN_FILES_CACHED: usize = 128;

/// Errors about paths and trees, each naming the path.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum PagesError {
    /// refusing path {path:?} from the peer: {reason}
    Unconfined { path: String, reason: &'static str },
    /// {op} {path:?}: {source}
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PagesError + 'a {
    move |source| PagesError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The truncated blake3 of one page.
pub fn page_hash(data: &[u8]) -> PageHash {
    truncated(&page_digest(data))
}

/// A page's table entry from its full digest.
pub fn truncated(full: &blake3::Hash) -> PageHash {
    let mut out = [0u8; 16];
    out.copy_from_slice(&full.as_bytes()[..16]);
    out
}

/// The blake3 of one page. A page of zeros (a preallocated journal file, a hole) gets the
/// hash of zeros of its length, kept from the last such page: finding the zeros reads the
/// page at memory speed, hashing it costs about twenty times that. Either way the result is
/// `blake3::hash(data)`.
pub fn page_digest(data: &[u8]) -> blake3::Hash {
    if !is_zeros(data) {
        return blake3::hash(data);
    }
    thread_local! {
        static ZEROS: Cell<Option<(usize, blake3::Hash)>> = const { Cell::new(None) };
    }
    ZEROS.with(|last| match last.get() {
        Some((len, hash)) if len == data.len() => hash,
        _ => {
            let hash = blake3::hash(data);
            last.set(Some((data.len(), hash)));
            hash
        }
    })
}

/// Appends to `out` the blake3 of each `page_size` page of `data` (the last may be
/// shorter), each as [`page_digest`] gives it, with the pages hashed side by side
/// (`many.rs`): several times faster than one by one.
pub fn page_digests(data: &[u8], page_size: usize, out: &mut Vec<blake3::Hash>) {
    many::page_digests(data, page_size, out, &mut |page| {
        is_zeros(page).then(|| page_digest(page))
    });
}

/// Pages [`page_digests`] hashes side by side: a caller that may stop early hashes this
/// many at a time.
pub use many::BATCH_PAGES;

/// Whether `data` is all zeros.
fn is_zeros(data: &[u8]) -> bool {
    /// Bytes looked at first: a page that is not zeros almost always says so in them.
    const HEAD_BYTES: usize = 32;
    /// Bytes OR-ed together at a time (a loop without early exit, which the compiler
    /// vectorizes).
    const BLOCK_BYTES: usize = 256;
    let (head, rest) = data.split_at(data.len().min(HEAD_BYTES));
    head.iter().all(|&b| b == 0)
        && rest
            .chunks(BLOCK_BYTES)
            .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// What every entry has besides its content: permission bits, owner and group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attrs {
    /// Permission bits (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

impl Attrs {
    /// The attributes in `m` (from `lstat` or `fstat`).
    pub fn of(m: &fs::Metadata) -> Attrs {
        Attrs {
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        }
    }
}

/// Whether the file in `m` has every block of its length allocated (a preallocated journal
/// file, or any file written throughout), as opposed to sparse. An empty file is not.
pub fn fully_allocated(m: &fs::Metadata) -> bool {
    let len = m.len();
    len > 0 && m.blocks().saturating_mul(ST_BLOCK_BYTES) >= len.next_multiple_of(ALLOC_UNIT_BYTES)
}

/// What the table knows of one file: its length, attributes, allocation, and a hash per page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileState {
    /// Length in bytes.
    pub len: u64,
    /// Mode, owner and group.
    pub attrs: Attrs,
    /// Whether every block of its length is allocated ([`fully_allocated`]).
    pub allocated: bool,
    /// One entry per `page_size` bytes; the last page may be short.
    pub pages: Vec<PageHash>,
}

/// What the table knows of one symlink: its target (text, never followed) and attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkState {
    /// The target, as `readlink` returns it.
    pub target: String,
    /// Owner and group (the mode of a symlink is always `0o777` on Linux).
    pub attrs: Attrs,
}

/// What a file's metadata says of its contents without reading them: device, inode, length,
/// mtime, ctime and allocated blocks. Any write, truncation, chmod, chown or rename moves at
/// least the ctime, which no one can set back; so a stamp taken when the contents were known
/// and still the file's now proves them unchanged, unless a change came within the same tick
/// of the coarse clock as the stamp (see [`Stamp::settled`]). The hot scanner's `Seen`, the
/// pre-hash, the record and the cold side's page memo all decide by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    pub blocks: u64,
}

impl Stamp {
    /// The stamp in `m` (from `lstat` or `fstat`).
    pub fn of(m: &fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            blocks: m.blocks(),
        }
    }

    /// Whether both its times are older than `window` now: a change from now on gives the
    /// file times that differ from them.
    pub fn settled(&self, window: std::time::Duration) -> bool {
        let at = |(s, ns): (i64, i64)| {
            u64::try_from(s)
                .ok()
                .zip(u32::try_from(ns).ok())
                .map(|(s, ns)| std::time::UNIX_EPOCH + std::time::Duration::new(s, ns))
        };
        let now = std::time::SystemTime::now();
        [self.mtime, self.ctime]
            .into_iter()
            .all(|t| at(t).is_some_and(|t| now.duration_since(t).is_ok_and(|age| age > window)))
    }
}

/// Opens `path` for reading without following a symlink at its last component, and without
/// waiting: a FIFO put where a file was opens at once (a blocking open would wait for a
/// writer, holding up the scanner for ever), for the caller to find it is no file. Reads of
/// a regular file do not heed `O_NONBLOCK`.
pub fn open_nofollow(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// The target of the symlink at `path` as text; `None` (logged) if it is not UTF-8.
pub fn link_target(path: &Path) -> io::Result<Option<String>> {
    let target = fs::read_link(path)?;
    match target.into_os_string().into_string() {
        Ok(t) => Ok(Some(t)),
        Err(_) => {
            tracing::warn!(link = %path.display(), "skipping a symlink whose target is not UTF-8");
            Ok(None)
        }
    }
}

impl FileState {
    /// The hasher of a content digest ([`FileState::digest`]) of a file of `len` bytes, to
    /// which its page hashes are added in order.
    pub fn content_hasher(len: u64) -> blake3::Hasher {
        let mut h = blake3::Hasher::new();
        h.update(&len.to_le_bytes());
        h
    }

    /// A digest of the file's content as the table sees it: its length and page hashes.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = FileState::content_hasher(self.len);
        for p in &self.pages {
            h.update(p);
        }
        *h.finalize().as_bytes()
    }
}

/// The page table of the file at `path`: its length, attributes, allocation and the hash of
/// every page (read with `pread`, [`READ_PAGES`] pages at a time). A symlink at `path` is not
/// followed (`ELOOP`).
pub fn hash_pages(path: &Path, page_size: usize) -> Result<FileState, PagesError> {
    let file = open_nofollow(path).map_err(io_err("cannot open", path))?;
    let meta = file.metadata().map_err(io_err("cannot inspect", path))?;
    // only a capacity hint: a length beyond the address space starts from an empty table
    let pages = usize::try_from(meta.len()).map_or(0, |len| len.div_ceil(page_size));
    let mut state = FileState {
        len: 0,
        attrs: Attrs::of(&meta),
        allocated: fully_allocated(&meta),
        pages: Vec::with_capacity(pages),
    };
    let mut buf = ReadBuf::with_len(page_size * READ_PAGES);
    let mut digests = Vec::with_capacity(READ_PAGES);
    let mut off = 0u64;
    loop {
        let n = read_full_at(&file, &mut buf, off).map_err(io_err("cannot read", path))?;
        digests.clear();
        page_digests(&buf[..n], page_size, &mut digests);
        state.pages.extend(digests.iter().map(truncated));
        off += n as u64;
        if n < buf.len() {
            break;
        }
    }
    state.len = off;
    Ok(state)
}

/// Where a [`ReadBuf`]'s bytes begin: on a page boundary.
const READ_ALIGN_BYTES: usize = 4096;

/// A buffer to `pread` into whose first byte is page-aligned. The kernel's copy into user
/// memory runs at a third of its speed on this project's machines (AMD EPYC, `rep movsb`) when
/// the destination is not 64-byte aligned, and the allocator hands out large blocks 16 bytes
/// past a page: 1 MiB `pread`s from tmpfs measured 2.2 GB/s into such a block, 7.8 GB/s into
/// an aligned one. (The source of a `pwrite` or a `send` does not matter: measured the same.)
#[derive(Debug, Default)]
pub struct ReadBuf {
    raw: Vec<u8>,
    at: usize,
    len: usize,
}

impl ReadBuf {
    /// A buffer of `len` zeroed bytes.
    pub fn with_len(len: usize) -> ReadBuf {
        let mut b = ReadBuf::default();
        b.set_len(len);
        b
    }

    /// Makes the buffer `len` bytes long (what it held is kept up to the old length; bytes
    /// beyond it may be anything).
    pub fn set_len(&mut self, len: usize) {
        if self.raw.len() < len + READ_ALIGN_BYTES {
            self.raw.resize(len + READ_ALIGN_BYTES, 0);
            let at = to_page_boundary(self.raw.as_ptr());
            if at != self.at {
                // the block moved: the kept bytes move with it to the new boundary
                let old = self.at..self.at + self.len;
                self.raw.copy_within(old, at);
                self.at = at;
            }
        }
        self.len = len;
    }
}

impl AsRef<[u8]> for ReadBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

/// The size a pooled buffer is rounded up to.
const POOL_GRAIN_BYTES: usize = 64 << 10;

/// Read buffers whose bytes are passed on as they are ([`BufPool::share`]): the hot side's
/// page reads that become a batch's data, the cold side's frames whose writes are applied
/// from them. Each comes back once the last share of it is dropped (its frame acknowledged,
/// or its writes applied), to be read into again; the pool keeps a few, none larger than it
/// was made for. Memory used again is memory that does not fault in anew: on this project's
/// VMs a page the host has taken back costs microseconds at its first touch.
#[derive(Debug, Clone)]
pub struct BufPool {
    back: crossbeam_channel::Sender<ReadBuf>,
    free: crossbeam_channel::Receiver<ReadBuf>,
    keep_bytes: usize,
}

impl BufPool {
    /// A pool that keeps at most `keep` unused buffers of at most `keep_bytes` bytes each.
    pub fn new(keep: usize, keep_bytes: usize) -> BufPool {
        let (back, free) = crossbeam_channel::bounded(keep);
        BufPool {
            back,
            free,
            keep_bytes,
        }
    }

    /// A buffer from the pool, or a new one, `len` bytes long (what it held is not kept). A
    /// new one has room for the next [`POOL_GRAIN_BYTES`] multiple, so that frames a little
    /// longer or shorter than the last fit the buffers the pool keeps.
    pub fn take(&self, len: usize) -> ReadBuf {
        let mut buf = self.free.try_recv().unwrap_or_default();
        if buf.raw.len() < len + READ_ALIGN_BYTES {
            // (zeros asked of the allocator: memory it maps in anew needs no pass of ours)
            buf.raw = vec![0; len.next_multiple_of(POOL_GRAIN_BYTES) + READ_ALIGN_BYTES];
            buf.at = to_page_boundary(buf.raw.as_ptr());
        }
        buf.len = len;
        buf
    }

    /// A block from the pool, or a new one: empty, with room for `room` bytes after a page
    /// boundary, to be read into through its spare capacity (nothing is zeroed first: a new
    /// block's pages are touched only by the read that fills them).
    pub fn take_block(&self, room: usize) -> Vec<u8> {
        match self.free.try_recv() {
            Ok(b) if b.raw.capacity() >= room + READ_ALIGN_BYTES => {
                let mut block = b.raw;
                block.clear();
                block
            }
            _ => Vec::with_capacity(room.next_multiple_of(POOL_GRAIN_BYTES) + READ_ALIGN_BYTES),
        }
    }

    /// `block[range]`, shared: `block` comes back to the pool as [`BufPool::share`] says.
    pub fn share_block(&self, block: Vec<u8>, range: std::ops::Range<usize>) -> Bytes {
        let len = block.len();
        self.share(
            ReadBuf {
                raw: block,
                at: 0,
                len,
            },
            len,
        )
        .slice(range)
    }

    /// Buffers kept, unused.
    #[cfg(test)]
    pub(crate) fn kept(&self) -> usize {
        self.free.len()
    }

    /// The first `n` bytes of `buf`, shared: `buf` comes back to the pool (if it has room,
    /// and `buf` is not larger than the pool keeps) when the last share is dropped.
    pub fn share(&self, buf: ReadBuf, n: usize) -> Bytes {
        let n = n.min(buf.len());
        let largest = self.keep_bytes.next_multiple_of(POOL_GRAIN_BYTES) + READ_ALIGN_BYTES;
        let back = (buf.raw.capacity() <= largest).then(|| self.back.clone());
        Bytes::from_owner(Pooled { buf, back }).slice(..n)
    }
}

/// A pooled buffer while its bytes are shared.
struct Pooled {
    buf: ReadBuf,
    /// The pool it goes back to, if any.
    back: Option<crossbeam_channel::Sender<ReadBuf>>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // (a full pool lets it go)
        if let Some(back) = &self.back {
            let _ = back.try_send(std::mem::take(&mut self.buf));
        }
    }
}

/// How many bytes past `p` the next page boundary is (0 if `p` is on one): where a buffer
/// the kernel copies into should begin (see [`ReadBuf`]).
pub fn to_page_boundary(p: *const u8) -> usize {
    (READ_ALIGN_BYTES - p.addr() % READ_ALIGN_BYTES) % READ_ALIGN_BYTES
}

impl std::ops::Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.at..self.at + self.len]
    }
}

impl std::ops::DerefMut for ReadBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.at..self.at + self.len]
    }
}

/// Reads at `off` until `buf` is full or the file ends; returns the bytes read.
pub fn read_full_at(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Open files by relative path, kept between uses (an open per use costs a path walk, and on
/// the hot side an inotify event of its own). Holds at most [`OPEN_FILES_CACHED`]: when full,
/// it starts over empty.
#[derive(Debug, Default)]
pub(crate) struct FileCache(HashMap<String, File>);

impl FileCache {
    /// The open file for `rel`, if cached.
    pub(crate) fn get(&self, rel: &str) -> Option<&File> {
        self.0.get(rel)
    }

    /// Takes the open file for `rel` out of the cache.
    pub(crate) fn take(&mut self, rel: &str) -> Option<File> {
        self.0.remove(rel)
    }

    /// Keeps `file` open for `rel` (emptying the cache first if it is full).
    pub(crate) fn keep(&mut self, rel: &str, file: File) -> &File {
        if self.0.len() >= OPEN_FILES_CACHED {
            self.0.clear();
        }
        self.0.entry(rel.to_owned()).insert_entry(file).into_mut()
    }

    /// Closes `rel` and everything below it: the path may now name another file, or a
    /// directory.
    pub(crate) fn forget(&mut self, rel: &str) {
        let prefix = format!("{rel}/");
        self.0.retain(|k, _| k != rel && !k.starts_with(&prefix));
    }

    /// Closes every file.
    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }
}

/// A whole tree: directories, files and symlinks with their states, by relative path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeIndex {
    /// Directories (relative, `/`-separated) and their attributes.
    pub dirs: BTreeMap<String, Attrs>,
    /// Files (relative, `/`-separated).
    pub files: BTreeMap<String, FileState>,
    /// Symlinks (relative, `/`-separated).
    pub links: BTreeMap<String, LinkState>,
}

/// Checks a relative path received from the network: `/`-separated normal components only,
/// no `..`, no `.`, no empty component, no NUL, not absolute. Returns it joined to `root`.
pub fn confine(root: &Path, rel: &str) -> Result<PathBuf, PagesError> {
    let bad = |reason| {
        Err(PagesError::Unconfined {
            path: rel.to_owned(),
            reason,
        })
    };
    if rel.is_empty() {
        return bad("empty path");
    }
    if rel.contains('\0') {
        return bad("NUL byte in path");
    }
    if rel.starts_with('/') {
        return bad("absolute path");
    }
    for part in rel.split('/') {
        match part {
            "" => return bad("empty path component"),
            "." | ".." => return bad("`.` or `..` component"),
            _ => {}
        }
    }
    let joined = root.join(rel);
    if !joined
        .components()
        .skip(root.components().count())
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return bad("not a plain relative path");
    }
    Ok(joined)
}

/// Checks that no existing parent component of `path` below `root` is a symlink or anything
/// but a directory, so that an op on `path` stays inside `root`, and that `path` itself is not
/// a device, socket or pipe. `path` itself may be a symlink: ops act on the link, never
/// through it (files are opened with `O_NOFOLLOW`). Missing components are fine (they will
/// be created as real directories).
pub fn no_symlinks_below(root: &Path, path: &Path, rel: &str) -> Result<(), PagesError> {
    let mut cur = root.to_owned();
    let parts: Vec<_> = path
        .strip_prefix(root)
        .map(|p| p.components().collect())
        .unwrap_or_default();
    for (i, part) in parts.iter().enumerate() {
        cur.push(part);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() && i + 1 == parts.len() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(PagesError::Unconfined {
                    path: rel.to_owned(),
                    reason: "a component is a symlink",
                })
            }
            Ok(m) if i + 1 < parts.len() && !m.is_dir() => {
                return Err(PagesError::Unconfined {
                    path: rel.to_owned(),
                    reason: "a parent component is not a directory",
                })
            }
            Ok(m) if i + 1 == parts.len() && !(m.is_dir() || m.is_file()) => {
                return Err(PagesError::Unconfined {
                    path: rel.to_owned(),
                    reason: "the target is a device, socket or pipe",
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("cannot inspect", &cur)(e)),
        }
    }
    Ok(())
}

/// Sets the permission bits of `path` if they differ.
pub fn set_mode(path: &Path, mode: u32) -> Result<(), PagesError> {
    let meta = fs::symlink_metadata(path).map_err(io_err("cannot inspect", path))?;
    if meta.mode() & 0o7777 != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(io_err("cannot set mode of", path))?;
    }
    Ok(())
}

/// Sets the owner and group of `path` itself (`fchownat` with `AT_SYMLINK_NOFOLLOW`: a
/// symlink's own owner, never its target's).
pub fn set_owner(path: &Path, uid: u32, gid: u32) -> Result<(), PagesError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| PagesError::Io {
        op: "cannot change the owner of",
        path: path.to_owned(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call; fchownat reads it
    // and keeps no reference.
    let rc = unsafe {
        libc::fchownat(
            libc::AT_FDCWD,
            c.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io_err("cannot change the owner of", path)(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A shared buffer comes back to the pool when its last share is dropped, and is handed
    /// out again (the same memory, page-aligned, its length set); the pool keeps no more than
    /// it was made to, and no buffer larger than its bound.
    #[test]
    fn issue15_a_pooled_buffer_comes_back_when_its_last_share_is_dropped() {
        let pool = BufPool::new(2, 8192);
        let mut buf = pool.take(8192);
        buf[..3].copy_from_slice(b"abc");
        let at = buf.as_ptr();
        let shared = pool.share(buf, 3);
        let part = shared.slice(1..);
        assert_eq!(&shared[..], b"abc");
        drop(shared);
        assert_eq!(pool.kept(), 0, "a share still holds it");
        drop(part);
        assert_eq!(pool.kept(), 1);
        let again = pool.take(4096);
        assert_eq!((again.as_ptr(), again.len()), (at, 4096));
        assert_eq!(to_page_boundary(again.as_ptr()), 0);
        // larger than the pool keeps: let go
        drop(pool.share(pool.take(1 << 20), 10));
        assert_eq!(pool.kept(), 0);
        // a full pool lets the rest go
        let three: Vec<Bytes> = (0..3).map(|_| pool.share(pool.take(100), 100)).collect();
        drop(three);
        assert_eq!(pool.kept(), 2);
        drop(again);
    }

    /// Issue 12: the shortcut for pages of zeros gives blake3's hash whatever the length,
    /// and a single byte that is not zero, wherever it is (in the first bytes, in a block, at
    /// the very end), makes it hash the page.
    #[test]
    fn issue12_a_page_digest_is_blake3_with_or_without_the_zeros_shortcut() {
        for len in [0, 1, 31, 32, 33, 100, 4095, 4096, 8192, 16384] {
            let zeros = vec![0u8; len];
            assert_eq!(page_digest(&zeros), blake3::hash(&zeros), "{len} zeros");
            // again, from the kept hash
            assert_eq!(
                page_digest(&zeros),
                blake3::hash(&zeros),
                "{len} zeros, kept"
            );
            for at in [0, 1, 31, 32, 255, 256, 288, len / 2, len.saturating_sub(1)] {
                if at >= len {
                    continue;
                }
                let mut one = zeros.clone();
                one[at] = 0x80;
                assert_eq!(page_digest(&one), blake3::hash(&one), "{len}: byte {at}");
                assert_ne!(page_digest(&one), page_digest(&zeros));
            }
        }
    }

    #[test]
    fn a_read_buffer_starts_on_a_page_and_keeps_its_bytes_when_it_grows() {
        let mut b = ReadBuf::with_len(100);
        assert_eq!(b.len(), 100);
        assert_eq!(b.as_ptr().addr() % READ_ALIGN_BYTES, 0);
        b.iter_mut().zip(0u8..).for_each(|(x, i)| *x = i);
        for len in [3 << 20, 50, 9 << 20] {
            b.set_len(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr().addr() % READ_ALIGN_BYTES, 0, "{len}");
            assert!(b[..50].iter().zip(0u8..).all(|(x, i)| *x == i), "{len}");
        }
    }

    #[test]
    fn confinement_refuses_escapes() {
        let root = Path::new("/data");
        assert_eq!(
            confine(root, "journal/a.amq").unwrap(),
            Path::new("/data/journal/a.amq")
        );
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/.",
            "a\0b",
            "a/",
        ] {
            let err = confine(root, bad).unwrap_err().to_string();
            assert!(err.contains("refusing path"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn symlinked_and_special_components_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("evil")).unwrap();
        let ok = confine(root, "real/x").unwrap();
        no_symlinks_below(root, &ok, "real/x").unwrap();
        let p = confine(root, "evil/passwd").unwrap();
        let err = no_symlinks_below(root, &p, "evil/passwd")
            .unwrap_err()
            .to_string();
        assert!(err.contains("symlink"), "{err}");
        let c = std::ffi::CString::new(root.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let p = confine(root, "fifo").unwrap();
        assert!(no_symlinks_below(root, &p, "fifo")
            .unwrap_err()
            .to_string()
            .contains("device, socket or pipe"));
    }

    #[test]
    fn hashes_pages_and_trees() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("journal")).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| i.to_le_bytes()[0]).collect();
        fs::write(dir.path().join("journal/a"), &data).unwrap();
        let s = hash_pages(&dir.path().join("journal/a"), 4096).unwrap();
        assert_eq!(s.len, 10_000);
        assert_eq!(s.pages.len(), 3);
        assert_eq!(s.pages[2], page_hash(&data[8192..]));
        let idx = index_tree(dir.path(), 4096).unwrap();
        assert!(idx.dirs.contains_key("journal"));
        assert_eq!(idx.files["journal/a"], s);
        let (root1, _) = idx.digest();
        fs::write(dir.path().join("journal/a"), &data[..9999]).unwrap();
        let (root2, files) = index_tree(dir.path(), 4096).unwrap().digest();
        assert_ne!(root1, root2);
        assert_eq!(files.len(), 2, "the directory and the file");
    }

    #[test]
    fn the_index_has_owners_symlinks_and_allocation_and_verify_names_each_difference() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("zeros"), vec![0u8; 64 << 10]).unwrap();
        File::create(root.join("sparse"))
            .unwrap()
            .set_len(64 << 10)
            .unwrap();
        std::os::unix::fs::symlink("../outside", root.join("link")).unwrap();
        let idx = index_tree(root, 4096).unwrap();
        assert_eq!(idx.links["link"].target, "../outside");
        assert!(idx.files["zeros"].allocated);
        assert!(!idx.files["sparse"].allocated);
        let mut cold = idx.clone();
        cold.links.get_mut("link").unwrap().target = "b".into();
        cold.files.get_mut("zeros").unwrap().attrs.uid = 4321;
        cold.files.get_mut("zeros").unwrap().allocated = false;
        cold.files.remove("sparse");
        let (hot_root, hot) = idx.digest();
        let (cold_root, cold) = cold.digest();
        assert_ne!(hot_root, cold_root);
        let diff = compare_entries(&hot, &cold);
        assert_eq!(
            diff,
            [
                "link link: target ../outside vs b",
                "sparse: missing on cold",
                &format!(
                    "zeros: owner {}:{} vs 4321:{}",
                    idx.files["zeros"].attrs.uid,
                    idx.files["zeros"].attrs.gid,
                    idx.files["zeros"].attrs.gid
                ),
                "zeros: fully allocated vs sparse",
            ]
        );
    }

    proptest! {
        /// Any path that confine accepts stays below the root.
        #[test]
        fn confined_paths_stay_inside(rel in "[a-z./]{0,12}") {
            if let Ok(p) = confine(Path::new("/data"), &rel) {
                prop_assert!(p.starts_with("/data/"));
                prop_assert!(!p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)));
            }
        }
    }
}
