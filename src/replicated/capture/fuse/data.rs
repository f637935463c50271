//! The data calls of the passthrough: open, read, write, fsync, fallocate and setattr (length,
//! mode, owner, times). A write goes to the backing file the caller opened, at its offset;
//! only the bytes the backing file took are reported to the caller and queued (a disk that
//! fills mid-write queues the part written, or nothing and the caller gets `ENOSPC`).

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use fuser::{Errno, FileHandle, INodeNo, Request, TimeOrNow};

use crate::replicated::capture::fuse::names::open_backing;
use crate::replicated::capture::fuse::passthrough::{Passthrough, Res};
use crate::replicated::capture::fuse::sys;
use crate::replicated::capture::watch::FsEvent;
use crate::replicated::pages::Attrs;

/// What a `setattr` asks for.
#[derive(Debug)]
pub(super) struct AttrChange {
    pub(super) mode: Option<u32>,
    pub(super) uid: Option<u32>,
    pub(super) gid: Option<u32>,
    pub(super) size: Option<u64>,
    pub(super) atime: Option<TimeOrNow>,
    pub(super) mtime: Option<TimeOrNow>,
}

impl Passthrough {
    /// Opens node `ino`'s backing file as the caller asked (see `STRIPPED_OPEN_FLAGS`).
    pub(super) fn open_file(&self, ino: INodeNo, flags: i32) -> Res<u64> {
        let rel = self.rel(ino)?;
        let file = open_backing(&self.abs(&rel), flags, None)?;
        Ok(self.keep(file))
    }

    pub(super) fn read_at(&self, fh: FileHandle, offset: u64, size: u32) -> Res<Vec<u8>> {
        let file = self.file(fh)?;
        let mut buf = vec![0u8; usize::try_from(size).map_err(|_| Errno::EINVAL)?];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if got == 0 => return Err(e.into()),
                Err(_) => break,
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// Writes `data` at `offset`; queues and answers the bytes written.
    pub(super) fn write_at(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
    ) -> Res<u32> {
        let file = self.file(fh)?;
        let _order = self.order.read().expect("order lock");
        let mut done = 0;
        let mut failed = None;
        while done < data.len() {
            match file.write_at(&data[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if done == 0 {
            if let Some(e) = failed {
                return Err(e.into());
            }
        }
        if let Ok(path) = self.rel(ino) {
            self.send(FsEvent::Wrote {
                path,
                file,
                offset,
                len: done as u64,
            });
        }
        u32::try_from(done).map_err(|_| Errno::EINVAL)
    }

    pub(super) fn sync(&self, fh: FileHandle, datasync: bool) -> Res<()> {
        let file = self.file(fh)?;
        if datasync {
            file.sync_data()?;
        } else {
            file.sync_all()?;
        }
        Ok(())
    }

    /// An `O_DIRECT` write's `n` bytes at `offset` through `fh`, on the backing device
    /// ([`sys::write_out`]).
    pub(super) fn write_out(&self, fh: FileHandle, offset: u64, n: u32) -> Res<()> {
        let file = self.file(fh)?;
        Ok(sys::write_out(&file, offset, u64::from(n))?)
    }

    /// `fallocate` with any mode the backing filesystem supports (punching holes, zeroing);
    /// the range is rescanned, so what it did to the bytes and the allocation is sent. Also
    /// when it failed: one that ran out of space part way may have kept the blocks and the
    /// length it reached (ext4 does).
    pub(super) fn allocate(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        len: u64,
        mode: i32,
    ) -> Res<()> {
        let file = self.file(fh)?;
        let _order = self.order.read().expect("order lock");
        let result = sys::fallocate(&file, mode, offset, len);
        if let Ok(path) = self.rel(ino) {
            self.send(FsEvent::Wrote {
                path,
                file,
                offset,
                len,
            });
        }
        Ok(result?)
    }

    /// `setattr`: length (through the caller's handle when it has one), owner, mode, times,
    /// in that order (a chown may clear set-id bits the mode then sets). A new length that
    /// took, with nothing else failing, is queued as a `Resized` at the shorter of the old and
    /// new lengths: the scanner cuts the file there, models the length, owner and mode, and
    /// compares only the page the change left partial. Bytes a longer length adds are zeros
    /// on both sides (the cold side's `SetFile` extends the same way), so nothing reads them;
    /// a `Changed` made the scanner read and compare the whole file from its start (10 MiB
    /// for each of Artemis' new journal files). A change of mode, owner or times alone holds
    /// the ordering lock exclusively, so that its `lstat` after the change is the entry's state
    /// at this point of the stream, and is queued as an `AttrsSet` with it (two changes under
    /// the shared lock could queue their readings in the other order). Anything else (a
    /// failure part way) is queued as a `Changed`: the scanner reads what the path holds.
    pub(super) fn set_attrs(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: Option<FileHandle>,
        c: &AttrChange,
    ) -> Res<()> {
        let attrs_only = c.size.is_none();
        let _shared = (!attrs_only).then(|| self.order.read().expect("order lock"));
        let _exclusive = attrs_only.then(|| self.order.write().expect("order lock"));
        let rel = match self.rel(ino) {
            Ok(rel) => rel,
            // unlinked or replaced while open: changed through a handle, outside the tree
            Err(e) => return set_attrs_of(&*self.handle_of(ino, fh).ok_or(e)?, c),
        };
        let abs = self.abs(&rel);
        // the file whose length changed, and the shorter of its old and new lengths
        let mut resized = None;
        let result = (|| -> Res<()> {
            if let Some(size) = c.size {
                let file = match fh.map(|fh| self.file(fh)).transpose()? {
                    Some(f) => f,
                    None => Arc::new(open_backing(&abs, libc::O_WRONLY, None)?),
                };
                let old = file.metadata()?.len();
                file.set_len(size)?;
                resized = Some((file, old.min(size)));
            }
            if c.uid.is_some() || c.gid.is_some() {
                sys::lchown(&abs, c.uid, c.gid)?;
            }
            if let Some(mode) = c.mode {
                sys::set_mode_nofollow(&abs, mode & sys::MODE_BITS)?;
            }
            if c.atime.is_some() || c.mtime.is_some() {
                sys::set_times(&abs, c.atime, c.mtime)?;
            }
            Ok(())
        })();
        if rel.is_empty() {
            // the root is no entry of the op stream (the watch capture ignores it too)
            return result;
        }
        match (&result, resized) {
            (Ok(()), Some((file, edge))) => self.send(FsEvent::Resized {
                path: rel,
                file,
                edge,
            }),
            (Ok(()), None) => match fs::symlink_metadata(&abs) {
                Ok(m) => self.send(FsEvent::AttrsSet {
                    path: rel,
                    attrs: Attrs::of(&m),
                }),
                Err(_) => self.send(FsEvent::Changed(rel)),
            },
            // a part may have been applied before a failure: the scanner looks and sends what is
            _ => self.send(FsEvent::Changed(rel)),
        }
        result
    }
}

/// `setattr` of a file that has no path any more, through an open handle of it (`ftruncate`,
/// `fchmod`, `fchown`, `futimens` on a descriptor of a file unlinked or replaced since): in
/// the order [`Passthrough::set_attrs`] uses, with nothing queued (it is no longer in the tree).
fn set_attrs_of(file: &fs::File, c: &AttrChange) -> Res<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(size) = c.size {
        file.set_len(size)?;
    }
    if c.uid.is_some() || c.gid.is_some() {
        std::os::unix::fs::fchown(file, c.uid, c.gid)?;
    }
    if let Some(mode) = c.mode {
        file.set_permissions(fs::Permissions::from_mode(mode & sys::MODE_BITS))?;
    }
    if c.atime.is_some() || c.mtime.is_some() {
        sys::set_file_times(file, c.atime, c.mtime)?;
    }
    Ok(())
}
