//! The apply thread's ops on what is not file data: owners and modes (`SetAttrs`), symlinks
//! (`Symlink`), allocation (`Allocate`), and the check made again right before each op runs
//! that no parent of its path is a symlink (an earlier op of the same batch may have made
//! one: validation saw the tree before the batch).

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use crate::replicated::apply::{io_err, Applier, Touched};
use crate::replicated::ops::Op;
use crate::replicated::pages::{self, no_symlinks_below, Attrs, PagesError};

/// The paths an op acts on.
pub(super) fn op_paths(op: &Op) -> Vec<&str> {
    match op {
        Op::Mkdir { path, .. }
        | Op::SetFile { path, .. }
        | Op::Remove { path }
        | Op::Write { path, .. }
        | Op::SetAttrs { path, .. }
        | Op::Symlink { path, .. }
        | Op::Allocate { path, .. } => vec![path],
        Op::Rename { from, to } => vec![from, to],
        Op::Barrier { .. } => vec![],
    }
}

/// A symlink's target from the peer: any text (it is data), but not empty and without NUL.
pub(super) fn check_target(op: &Op) -> Result<(), String> {
    match op {
        Op::Symlink { path, target } if target.is_empty() || target.contains('\0') => Err(format!(
            "symlink {path:?}: an empty target or one with a NUL byte"
        )),
        _ => Ok(()),
    }
}

impl Applier {
    /// Right before `op` runs: no parent of its paths is a symlink now.
    pub(super) fn guard(&self, op: &Op) -> Result<(), PagesError> {
        if let Op::Write { path, .. } = op {
            if self.files.get(path).is_some() {
                return Ok(()); // opened (and checked) before; renames and removals drop it
            }
        }
        for p in op_paths(op) {
            no_symlinks_below(&self.root, &self.root.join(p), p)?;
        }
        Ok(())
    }

    /// Owner and group of `path` itself, then its mode (a change of owner clears set-id
    /// bits). Without the privilege to give a file away (an agent not run as root) the owner
    /// is left as it is, with a warning: `verify` names the difference.
    pub(super) fn set_attrs(
        &mut self,
        path: &str,
        attrs: Attrs,
        touched: &mut Touched,
    ) -> Result<(), PagesError> {
        let full = self.root.join(path);
        // a chown or chmod moves the ctime: stamped again after the batch
        self.memo.changing(path);
        let meta = match fs::symlink_metadata(&full) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("cannot inspect", &full)(e)),
        };
        if (meta.uid(), meta.gid()) != (attrs.uid, attrs.gid) {
            match pages::set_owner(&full, attrs.uid, attrs.gid) {
                Ok(()) => {}
                Err(PagesError::Io { source, .. })
                    if source.raw_os_error() == Some(libc::EPERM) =>
                {
                    tracing::warn!(
                        path = %full.display(),
                        uid = attrs.uid,
                        gid = attrs.gid,
                        "not permitted to set the owner (the agent does not run as root)"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        if !meta.file_type().is_symlink() {
            // always: a chown may have cleared set-id bits the mode has
            fs::set_permissions(
                &full,
                std::os::unix::fs::PermissionsExt::from_mode(attrs.mode),
            )
            .map_err(io_err("cannot set mode of", &full))?;
        }
        // owner and mode are inode metadata: a full fsync of the inode (of its directory for a
        // symlink), not the fdatasync a data write gets
        touched.meta(&full);
        Ok(())
    }

    /// Makes `path` a symlink to `target`, replacing a file, symlink or directory tree there.
    /// The link is created (`symlinkat`), never written through.
    pub(super) fn symlink(
        &mut self,
        path: &str,
        target: &str,
        touched: &mut Touched,
    ) -> Result<(), PagesError> {
        let full = self.root.join(path);
        self.remove(path, touched)?;
        std::os::unix::fs::symlink(target, &full)
            .map_err(io_err("cannot create symlink", &full))?;
        touched.entries(&self.parent_of(&full));
        Ok(())
    }

    /// Allocates `len` bytes at `offset` of the file (`fallocate`, mode 0: the length grows
    /// if the range passes it). A filesystem that cannot allocate is warned about, not failed.
    pub(super) fn allocate(
        &mut self,
        path: &str,
        offset: u64,
        len: u64,
        touched: &mut Touched,
    ) -> Result<(), PagesError> {
        let full = self.root.join(path);
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io_err("cannot allocate", &full)(io::Error::from(
                io::ErrorKind::InvalidInput,
            )));
        };
        if n == 0 {
            return Ok(());
        }
        self.memo.changing(path);
        let f = self.open(path, false)?;
        // SAFETY: the descriptor is open for as long as `f` is borrowed; fallocate takes
        // plain integers.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, off, n) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                tracing::warn!(path = %full.display(), "the filesystem cannot preallocate");
                return Ok(());
            }
            return Err(io_err("cannot allocate", &full)(e));
        }
        self.memo.allocate(path, offset, len);
        touched.data(path, &full);
        Ok(())
    }
}
