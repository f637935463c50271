//! Directory listings through the mount. Each open directory handle keeps its backing
//! directory stream and the offset of the next entry, so a listing is one pass over the
//! backing directory however many `readdir` calls the kernel makes (each fills one reply of
//! about a hundred names); and entries added or removed while a listing goes on do not make
//! it give another entry twice or skip one, as re-reading the directory for each call did
//! (an offset into a new listing). A `readdir` at another offset than the handle's next (a
//! rewind, a seek) reads the directory again from its start.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::DirEntryExt;
use std::sync::atomic::Ordering;

use fuser::{Errno, FileHandle, FileType, INodeNo, ReplyDirectory};

use crate::replicated::capture::fuse::inodes::child;
use crate::replicated::capture::fuse::passthrough::{Passthrough, Res};

/// Where an open directory handle is in its listing.
#[derive(Debug, Default)]
pub(super) struct DirStream {
    /// The backing directory's stream, opened by the first `readdir`.
    entries: Option<fs::ReadDir>,
    /// The offset of the next entry to give: 0 is `.`, 1 is `..`, then the stream's.
    next: u64,
    /// The entry read from the stream that did not fit in the last reply.
    held: Option<Listed>,
}

/// An entry of the backing directory: its backing inode, type and name.
#[derive(Debug)]
struct Listed(u64, FileType, OsString);

/// The next entry of `entries`, if any.
fn next_entry(entries: &mut fs::ReadDir) -> Res<Option<Listed>> {
    let Some(e) = entries.next().transpose()? else {
        return Ok(None);
    };
    let ft = e.file_type()?;
    let kind = match () {
        () if ft.is_dir() => FileType::Directory,
        () if ft.is_symlink() => FileType::Symlink,
        () => FileType::RegularFile,
    };
    Ok(Some(Listed(e.ino(), kind, e.file_name())))
}

impl Passthrough {
    /// `opendir`: a handle with its listing not yet begun.
    pub(super) fn open_dir(&self) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs
            .lock()
            .expect("directory table")
            .insert(fh, DirStream::default());
        fh
    }

    /// `releasedir`.
    pub(super) fn release_dir(&self, fh: FileHandle) {
        self.dirs.lock().expect("directory table").remove(&fh.0);
    }

    /// `readdir` of directory node `ino` through handle `fh`, from `offset`: as many entries
    /// as `reply` takes.
    pub(super) fn read_dir(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: &mut ReplyDirectory,
    ) -> Res<()> {
        let rel = self.rel(ino)?;
        // taken out while it is read (the table is not held across the backing reads), and
        // put back whatever happens
        let taken = self.dirs.lock().expect("directory table").remove(&fh.0);
        let mut stream = match taken {
            Some(s) if s.entries.is_some() && s.next == offset => s,
            Some(_) => DirStream::default(),
            None => return Err(Errno::EBADF),
        };
        let filled = self
            .start_at(&rel, &mut stream, offset)
            .and_then(|()| self.fill(ino, &rel, &mut stream, reply));
        self.dirs
            .lock()
            .expect("directory table")
            .insert(fh.0, stream);
        filled
    }

    /// Opens `stream` at `offset` of the listing of `rel` unless it is open there already.
    fn start_at(&self, rel: &str, stream: &mut DirStream, offset: u64) -> Res<()> {
        if stream.entries.is_some() {
            return Ok(());
        }
        let mut entries = fs::read_dir(self.abs(rel))?;
        for _ in 2..offset {
            if next_entry(&mut entries)?.is_none() {
                break;
            }
        }
        stream.entries = Some(entries);
        stream.next = offset;
        Ok(())
    }

    /// Adds `stream`'s entries to `reply` until it is full or the listing ends.
    fn fill(
        &self,
        ino: INodeNo,
        rel: &str,
        stream: &mut DirStream,
        reply: &mut ReplyDirectory,
    ) -> Res<()> {
        let entries = stream.entries.as_mut().expect("opened above");
        loop {
            let entry = match stream.next {
                0 => Listed(ino.0, FileType::Directory, ".".into()),
                1 => Listed(ino.0, FileType::Directory, "..".into()),
                _ => match stream.held.take() {
                    Some(e) => e,
                    None => match next_entry(entries)? {
                        Some(e) => e,
                        None => return Ok(()),
                    },
                },
            };
            let Listed(backing, kind, name) = &entry;
            // the node id the kernel knows for it, else the backing inode (never looked up)
            let node = match stream.next {
                0 | 1 => ino.0,
                _ => name
                    .to_str()
                    .and_then(|n| {
                        let t = self.inodes.lock().expect("inode table");
                        t.ino_of(&child(rel, n))
                    })
                    .unwrap_or(*backing),
            };
            if reply.add(INodeNo(node), stream.next + 1, *kind, name) {
                if stream.next > 1 {
                    stream.held = Some(entry);
                }
                return Ok(());
            }
            stream.next += 1;
        }
    }
}
