//! The pre-hash: while the cold side walks its tree for the index after a connection, the
//! scanner (otherwise idle then) hashes the hot tree's pages, so the comparison against the
//! index that follows reads only the pages whose pre-hash differs from the index instead of
//! every page again. On a resync where most pages are equal, hashing the two trees then
//! happens at once, one per side, instead of one after the other.
//!
//! A pre-hash is trusted only while it provably describes the file:
//! - only on the write path (the FUSE capture), where every write reaches the backing file
//!   through a `pwrite` that moves its ctime (a store through an `mmap` of `data_dir` itself
//!   does not, until written back: the watch capture never pre-hashes);
//! - the file's [`Seen`] (device, inode, length, mtime, ctime, blocks) is the same before and after
//!   hashing, and both its times were older than [`RACY_WINDOW`](super::RACY_WINDOW) then:
//!   any later change sets a ctime the coarse clock can tell apart;
//! - at the comparison the opened file's [`Seen`] is still that one, else it is read in full;
//! - an event for the path (or a directory above it) while disconnected drops it; a rename
//!   drops them all.
//!
//! A file the record vouches for (`record.rs`: this agent stayed up since the last comparison,
//! which learned its pages, and the file's metadata is the one the record last saw) is not
//! read in full: its pages come from the record, only those written through the mount since
//! read again, and the rule above applies to the result.
//!
//! It is memory the size of the hot tree's page table, for one comparison: at most
//! [`PREHASH_MAX_PAGES`] pages are kept (the rest is compared by reading), and all of it is
//! freed when the comparison ends.

use std::fs::{self, File};

use crate::replicated::capture::paged::{Paged, PagedFiles};
use crate::replicated::capture::record::PrehashCounts;
use crate::replicated::capture::scan::sorted_names;
use crate::replicated::capture::watch::FsEvent;
use crate::replicated::capture::{Scanner, Seen};
use crate::replicated::pages::{open_nofollow, page_hash, read_full_at, PageHash};

/// Pages whose pre-hash is kept at most: 16 bytes each, so 64 MiB, the table of a 16 GiB tree
/// of 4 KiB pages. Files beyond it are compared by reading them, as without a pre-hash.
pub(super) const PREHASH_MAX_PAGES: usize = 4 << 20;

/// One file's pre-hash: its pages as they were while its metadata was `seen`.
#[derive(Debug)]
pub(super) struct Prehashed {
    seen: Seen,
    pages: Vec<PageHash>,
}

impl Paged for Prehashed {
    fn page_count(&self) -> usize {
        self.pages.len()
    }
}

/// The pre-hashes of the files hashed since the last comparison, and their pages in all.
pub(super) type Prehashes = PagedFiles<Prehashed>;

impl Scanner {
    /// Hashes the tree's files the way the comparison will walk them, until a control
    /// message arrives (the index: the comparison starts with what is done) or the tree is
    /// done. Events read meanwhile are handled (disconnected, that drops their pre-hashes).
    pub(super) fn prehash(&mut self) {
        if !self.exact_events || self.connected {
            return;
        }
        self.prehash_counts = PrehashCounts::default();
        self.prehash_walk();
        if !self.interrupted() {
            // the walk is done (or the budget spent): what the record still has is gone
            // from the tree, or cannot be kept anyway. Cut short by a disconnection, the
            // rest stays for the next pre-hash (events keep it true meanwhile)
            self.record.clear();
        }
        let c = self.prehash_counts;
        tracing::debug!(
            files = self.prehash.files.len(),
            pages = self.prehash.pages,
            from_record = c.recorded_files,
            dirty_pages = c.dirty_pages,
            hashed_in_full = c.full_files,
            pages_hashed = c.pages_hashed,
            "pre-hashed the tree while the cold side indexed its own"
        );
    }

    /// Walks the tree for the pre-hash, until it is done or [`Scanner::prehash_file`] says
    /// stop.
    fn prehash_walk(&mut self) {
        let mut stack = vec![String::new()];
        while let Some(dir) = stack.pop() {
            let path = if dir.is_empty() {
                self.root.clone()
            } else {
                self.root.join(&dir)
            };
            let Some(names) = sorted_names(&path) else {
                continue;
            };
            for name in names {
                let rel = if dir.is_empty() {
                    name
                } else {
                    format!("{dir}/{name}")
                };
                let Ok(meta) = fs::symlink_metadata(self.root.join(&rel)) else {
                    continue;
                };
                if self.interrupted() && self.record.is_empty() {
                    return; // nothing left that is cheaper to pre-hash than to compare
                }
                if meta.is_dir() {
                    stack.push(rel);
                } else if meta.is_file() && !self.prehash_file(rel) {
                    return;
                }
            }
        }
    }

    /// Pre-hashes one file (kept only if it held still): from its record if the record
    /// vouches for it (only the dirty pages read), else all of it. The record's entry is
    /// used up either way. `false` to stop the walk (a control message is waiting, or the
    /// budget is spent).
    fn prehash_file(&mut self, rel: String) -> bool {
        let go_on = self.prehash_one(&rel);
        self.record.remove(&rel);
        go_on
    }

    fn prehash_one(&mut self, rel: &str) -> bool {
        let Ok(file) = open_nofollow(&self.root.join(rel)) else {
            return true;
        };
        let Ok(before) = file.metadata() else {
            return true;
        };
        let seen = Seen::of(&before);
        if !before.is_file() || self.prehash.files.get(rel).is_some_and(|p| p.seen == seen) {
            return true; // still what an earlier pre-hash saw
        }
        self.prehash.remove(rel);
        if !seen.settled(super::RACY_WINDOW) {
            return true; // compared by reading, like any file without a pre-hash
        }
        let Ok(pages) = usize::try_from(before.len().div_ceil(self.page_size as u64)) else {
            return true;
        };
        if self.prehash.pages + pages > PREHASH_MAX_PAGES {
            return false;
        }
        // once the index has come (or another control message), only what the record vouches
        // for is still pre-hashed: its dirty pages cost less than the full read the
        // comparison would otherwise make of the file
        let hashes = if self.recorded_as(rel, &seen, pages) {
            self.hash_recorded(rel, &file, &seen)
        } else if self.interrupted() {
            return true;
        } else {
            self.hash_file_pages(&file, pages)
        };
        let Some(hashes) = hashes else {
            return !self.interrupted();
        };
        let held_still = file.metadata().is_ok_and(|m| Seen::of(&m) == seen);
        if held_still && hashes.len() == pages {
            self.prehash.insert(
                rel.to_owned(),
                Prehashed {
                    seen,
                    pages: hashes,
                },
            );
        }
        true
    }

    /// Every page's hash, read as the comparison reads them; `None` if reading failed or a
    /// control message is waiting. Events are handled between reads.
    fn hash_file_pages(&mut self, file: &File, pages: usize) -> Option<Vec<PageHash>> {
        let mut hashes = Vec::with_capacity(pages);
        let mut off = 0u64;
        loop {
            self.handle_queued_events();
            if self.interrupted() {
                return None;
            }
            let n = read_full_at(file, &mut self.buf, off).ok()?;
            hashes.extend(self.buf[..n].chunks(self.page_size).map(page_hash));
            self.prehash_counts.pages_hashed += n.div_ceil(self.page_size) as u64;
            off += n as u64;
            if n < self.buf.len() {
                self.prehash_counts.full_files += 1;
                return Some(hashes);
            }
        }
    }

    /// Handles the events queued now (the write path's writers wait while it is full).
    pub(super) fn handle_queued_events(&mut self) {
        let Some(rx) = self.fs_rx.clone() else { return };
        while let Ok(ev) = rx.try_recv() {
            self.fs_event(ev);
        }
    }

    /// Whether a control message waits (the index has come: stop pre-hashing).
    pub(super) fn interrupted(&self) -> bool {
        self.ctl_rx.as_ref().is_some_and(|r| !r.is_empty())
    }

    /// Drops the pre-hashes an event may have made stale.
    pub(super) fn prehash_forget(&mut self, ev: &FsEvent) {
        match ev {
            FsEvent::Wrote { path, .. }
            | FsEvent::Resized { path, .. }
            | FsEvent::Changed(path)
            | FsEvent::Removed(path)
            | FsEvent::MadeDir { path, .. }
            | FsEvent::Linked { path, .. }
            | FsEvent::AttrsSet { path, .. } => self.prehash.forget(path),
            FsEvent::Renamed { .. } | FsEvent::Event(_) | FsEvent::Rescan(_) => {
                self.prehash.clear();
            }
            FsEvent::WatchLimit | FsEvent::Sync(_) | FsEvent::Nudge => {}
        }
    }

    /// The pages of `rel` as the pre-hash saw them, if the file (opened for the comparison,
    /// with `meta`) is still as it was then; the pre-hash is used up either way.
    pub(super) fn take_prehash(&mut self, rel: &str, meta: &fs::Metadata) -> Option<Vec<PageHash>> {
        let p = self.prehash.remove(rel)?;
        (p.seen == Seen::of(meta)).then_some(p.pages)
    }
}
