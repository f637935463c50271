//! The namespace calls of the passthrough: create, mknod, mkdir, symlink, unlink, rmdir,
//! rename. Each holds the ordering lock exclusively from the backing call until its event is
//! queued. What they create is given the caller's owner (`req.uid()`, `req.gid()`, or the
//! directory's group under a set-group-id directory) and exactly the mode asked for (the
//! kernel has already applied the caller's umask; a directory made in a set-group-id one
//! also gets that bit): the node, not root, owns its journal.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use fuser::{Errno, FileAttr, INodeNo, RenameFlags, Request};

use crate::replicated::capture::fuse::passthrough::{utf8, Passthrough, Res};
use crate::replicated::capture::fuse::sys::{self, MODE_BITS};
use crate::replicated::capture::watch::FsEvent;
use crate::replicated::pages::Attrs;

/// Open flags the backing file never gets: the kernel has dealt with them (`O_CREAT`,
/// `O_EXCL`, `O_TRUNC`, `O_NOCTTY`), offsets come with each write (`O_APPEND`), and the
/// daemon's buffers are not aligned for `O_DIRECT` (the data reaches the backing page cache,
/// and a write through an `O_DIRECT` handle is written out to the device, and with durable
/// acks acknowledged, before it is answered: Artemis' libaio journal never calls fdatasync).
pub(super) const STRIPPED_OPEN_FLAGS: i32 = libc::O_CREAT
    | libc::O_EXCL
    | libc::O_TRUNC
    | libc::O_NOCTTY
    | libc::O_APPEND
    | libc::O_DIRECT
    | libc::O_ACCMODE;

/// Opens the backing `path` for the access mode and sync flags in `flags`; a file opened
/// for writing is also opened for reading (the kernel has checked the caller's access), since
/// the scanner reads what was written through the same handle.
pub(super) fn open_backing(path: &Path, flags: i32, create: Option<u32>) -> Res<File> {
    let mut o = OpenOptions::new();
    o.read(true);
    if flags & libc::O_ACCMODE != libc::O_RDONLY {
        o.write(true);
    }
    if let Some(mode) = create {
        o.write(true).create_new(true).mode(mode & MODE_BITS);
    }
    o.custom_flags((flags & !STRIPPED_OPEN_FLAGS) | libc::O_NOFOLLOW);
    Ok(o.open(path)?)
}

/// What a namespace call made, for its event ([`Passthrough::finish_new`]).
enum Made<'a> {
    /// A regular file, open through this handle (`create`, `mknod`).
    File(&'a Arc<File>),
    /// A directory.
    Dir,
    /// A symlink to this target.
    Link(&'a str),
}

impl Passthrough {
    /// Who owns what `req` creates in the backing directory `dir`.
    fn owner(&self, req: &Request, dir: &Path) -> Res<(u32, u32)> {
        let m = fs::metadata(dir)?;
        let gid = if m.mode() & libc::S_ISGID != 0 {
            m.gid()
        } else {
            req.gid()
        };
        Ok((req.uid(), gid))
    }

    /// After a new entry at `rel`: its owner and exact mode (`None` for a symlink, which has
    /// none), then its event and attributes. A failure removes what was made. The event says
    /// what was made, as the call left it (the scanner handles it later, when the path may
    /// name what later calls made there): a file made open (`file`) is queued as resized from
    /// nothing, read through that handle; a directory with its attributes; a symlink with its
    /// target and owner.
    fn finish_new(
        &self,
        req: &Request,
        rel: &str,
        mode: Option<u32>,
        made: Made<'_>,
    ) -> Res<FileAttr> {
        let abs = self.abs(rel);
        let parent = abs.parent().unwrap_or(&abs).to_owned();
        let result = (|| {
            let (uid, gid) = self.owner(req, &parent)?;
            sys::lchown(&abs, Some(uid), Some(gid))?;
            if let Some(mode) = mode {
                fs::set_permissions(&abs, fs::Permissions::from_mode(mode & MODE_BITS))?;
            }
            self.entry_with_meta(rel)
        })();
        match result {
            Ok((a, meta)) => {
                let path = rel.to_owned();
                let attrs = Attrs::of(&meta);
                self.send(match made {
                    Made::File(file) => FsEvent::Resized {
                        path,
                        file: file.clone(),
                        edge: 0,
                    },
                    Made::Dir => FsEvent::MadeDir { path, attrs },
                    Made::Link(target) => FsEvent::Linked {
                        path,
                        target: target.to_owned(),
                        attrs,
                    },
                });
                Ok(a)
            }
            Err(e) => {
                let _ = fs::remove_dir(&abs).or_else(|_| fs::remove_file(&abs));
                Err(e)
            }
        }
    }

    /// `mknod`: regular files only (the op stream has no devices, pipes or sockets). The node
    /// is made as `create` makes a file, and its event carries the open handle: the scanner
    /// reads the new, empty file through it, not whatever later calls put at its path.
    pub(super) fn make_node(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
    ) -> Res<FileAttr> {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Errno::EPERM);
        }
        let _order = self.order.write().expect("order lock");
        let rel = self.child_of(parent, name)?;
        let file = Arc::new(open_backing(&self.abs(&rel), libc::O_RDONLY, Some(mode))?);
        self.finish_new(req, &rel, Some(mode), Made::File(&file))
    }

    pub(super) fn make_dir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
    ) -> Res<FileAttr> {
        let _order = self.order.write().expect("order lock");
        let rel = self.child_of(parent, name)?;
        let abs = self.abs(&rel);
        fs::create_dir(&abs)?;
        // in a set-group-id directory a new directory is set-group-id too, as `owner` gives
        // it the group (the mode the kernel asks for never has the bit)
        let dir = abs.parent().unwrap_or(&abs);
        let inherited = fs::metadata(dir).map_or(0, |m| m.mode() & libc::S_ISGID);
        self.finish_new(req, &rel, Some(mode | inherited), Made::Dir)
    }

    pub(super) fn make_symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        target: &Path,
    ) -> Res<FileAttr> {
        // a target the op stream cannot carry is refused, as such a name is
        let target = utf8(target.as_os_str())?;
        let _order = self.order.write().expect("order lock");
        let rel = self.child_of(parent, name)?;
        std::os::unix::fs::symlink(target, self.abs(&rel))?;
        self.finish_new(req, &rel, None, Made::Link(target))
    }

    /// `create`: a new file, opened; or, without `O_EXCL`, the existing one opened as it is.
    pub(super) fn create_file(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Res<(FileAttr, u64)> {
        let _order = self.order.write().expect("order lock");
        let rel = self.child_of(parent, name)?;
        let abs = self.abs(&rel);
        let file = match open_backing(&abs, flags, Some(mode)) {
            Ok(f) => Arc::new(f),
            Err(e) if e == Errno::EEXIST && flags & libc::O_EXCL == 0 => {
                let f = Arc::new(open_backing(&abs, flags, None)?);
                if flags & libc::O_TRUNC != 0 && f.metadata()?.len() > 0 {
                    f.set_len(0)?;
                    self.send(FsEvent::Resized {
                        path: rel.clone(),
                        file: f.clone(),
                        edge: 0,
                    });
                }
                let attr = self.entry(&rel)?;
                return Ok((attr, self.keep(f)));
            }
            Err(e) => return Err(e),
        };
        let attr = self.finish_new(req, &rel, Some(mode), Made::File(&file))?;
        Ok((attr, self.keep(file)))
    }

    /// `unlink` (`dir` false) or `rmdir`.
    pub(super) fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Res<()> {
        let _order = self.order.write().expect("order lock");
        let rel = self.child_of(parent, name)?;
        let abs = self.abs(&rel);
        if dir {
            fs::remove_dir(abs)?;
        } else {
            fs::remove_file(abs)?;
        }
        self.inodes.lock().expect("inode table").unlinked(&rel);
        self.send(FsEvent::Removed(rel));
        Ok(())
    }

    /// `rename`, also over an existing name; `RENAME_NOREPLACE` is honoured, an exchange
    /// refused (the op stream cannot say it).
    pub(super) fn rename_entry(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Res<()> {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return Err(Errno::EINVAL);
        }
        let _order = self.order.write().expect("order lock");
        let from = self.child_of(parent, name)?;
        let to = self.child_of(newparent, newname)?;
        if flags.is_empty() {
            fs::rename(self.abs(&from), self.abs(&to))?;
        } else {
            sys::rename2(&self.abs(&from), &self.abs(&to), flags.bits())?;
        }
        self.inodes.lock().expect("inode table").renamed(&from, &to);
        self.send(FsEvent::Renamed { from, to });
        Ok(())
    }
}
