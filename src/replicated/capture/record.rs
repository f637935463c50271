//! The record: what the last comparison learned of the hot tree's pages, kept across a
//! disconnection so that the next pre-hash (`prehash.rs`) reads only the pages written since,
//! as DRBD's bitmap does. When a connection drops after its comparison finished, the table
//! holds, for every file, the hashes of the hot file's pages as last read (the comparison
//! read or proved each of them, and every event handled since read the pages it names); the
//! record keeps those with each file's metadata ([`Seen`]) then. While disconnected, a write
//! through the mount (`FsEvent::Wrote`) marks the pages it touched dirty and moves the
//! record's metadata to the file's new one; anything else that may change a file drops it
//! from the record (`Changed`: it and everything below it; a rename: the whole record). The
//! next pre-hash takes a file from the record when its metadata is still the recorded one,
//! reading and hashing only its dirty pages, and the pre-hash's own rule then applies (held
//! still through the reading, both times older than the racy window). One pre-hash uses the
//! record up; a comparison starting clears what is left.
//!
//! Trust: with the FUSE capture every write to the hot tree goes through the mount and is an
//! event, as the stream relies on between deep rescans. Each such write's event is handled
//! either before the disconnection (its pages read into the table), or after it and before
//! the pre-hash is done with the file (its pages marked dirty, or the file's reading, if the
//! event came meanwhile, thrown away), or after that (it drops the file's pre-hash, or is
//! sent by the stream): no write through the mount is missed, however late its event. A
//! write that bypasses the mount is caught by the metadata check when it comes after the
//! last event handled for the file (for a file not written since, after the disconnection,
//! when its metadata was taken) and moves its times past them; otherwise only by the deep
//! rescan, as in steady state. Only a comparison that finished is trusted: `Disconnected`
//! is handled on the scanner's thread, so it is read after `resync()` returns, and the
//! comparison, once started, always compares every file (dropped batches do not matter:
//! the record is of the hot tree, and the next comparison is against the cold side's fresh
//! index). A file whose pass failed to read it is dirty, and dirty files are not recorded;
//! nor is a path a rename put an entry at that is not yet reconciled (the entry may be a
//! reading of what later calls left on the disk: another file's pages, under this one's
//! metadata).
//! The watch capture never keeps a record: a store through an `mmap` of `data_dir` raises no
//! event and moves no timestamp until written back.
//!
//! It is memory the size of the hot table's pages, at most
//! [`PREHASH_MAX_PAGES`](super::prehash::PREHASH_MAX_PAGES) of them (a larger tree keeps no
//! record: every file is hashed in full, as without one).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::Instant;

use crate::replicated::capture::paged::{Paged, PagedFiles};
use crate::replicated::capture::prehash::PREHASH_MAX_PAGES;
use crate::replicated::capture::scan::INVALID;
use crate::replicated::capture::watch::FsEvent;
use crate::replicated::capture::{Scanner, Seen};
use crate::replicated::pages::{open_nofollow, page_hash, read_full_at, FileState, PageHash};

/// One file as the record knows it.
#[derive(Debug)]
pub(super) struct Recorded {
    /// The file's metadata after the last change the record knows of (its length and inode
    /// are the ones `pages` and `dirty` describe).
    seen: Seen,
    /// The hash of each page as last read; a dirty page's is a placeholder.
    pages: Vec<PageHash>,
    /// Pages to read again: written since, or never known.
    dirty: Vec<bool>,
    /// Writes recorded so far: a pre-hash that read the file while one came throws away
    /// what it read.
    writes: u64,
}

impl Paged for Recorded {
    fn page_count(&self) -> usize {
        self.pages.len()
    }
}

/// The files of the record and their pages in all.
pub(super) type Record = PagedFiles<Recorded>;

impl Record {
    #[cfg(test)]
    pub(super) fn contains(&self, rel: &str) -> bool {
        self.files.contains_key(rel)
    }

    /// `len` bytes at `offset` of `rel` were written (allocated, punched) through a file
    /// whose metadata is now `meta`: their pages are dirty, and so is the old last page when
    /// the write began past it (the gap is zero-filled). The entry goes if the file is not
    /// the recorded one, or its length is not what the recorded writes make it (the write
    /// left it shorter, or a later change is still to come: be conservative).
    fn wrote(&mut self, rel: &str, meta: Option<fs::Metadata>, offset: u64, len: u64, ps: u64) {
        let Some(r) = self.files.get_mut(rel) else {
            return;
        };
        let end = offset.saturating_add(len);
        let new_len = r.seen.len.max(end);
        let meta = meta.filter(|m| m.ino() == r.seen.ino && m.len() == new_len);
        let range = (
            usize::try_from(offset.min(r.seen.len) / ps),
            usize::try_from(end.div_ceil(ps)),
            usize::try_from(new_len.div_ceil(ps)),
        );
        let (Some(meta), (Ok(first), Ok(last), Ok(pages))) = (meta, range) else {
            self.remove(rel);
            return;
        };
        let grown = pages.saturating_sub(r.pages.len());
        if self.pages + grown > PREHASH_MAX_PAGES {
            self.remove(rel);
            return;
        }
        r.pages.resize(pages, INVALID);
        r.dirty.resize(pages, true);
        r.dirty[first.min(pages)..last.min(pages)].fill(true);
        r.seen = Seen::of(&meta);
        r.writes += 1;
        self.pages += grown;
    }
}

/// What one pre-hash did, logged at its end.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct PrehashCounts {
    /// Files whose pages came from the record, with only their dirty pages read.
    pub(super) recorded_files: u64,
    /// The dirty pages read and hashed for them.
    pub(super) dirty_pages: u64,
    /// Files read and hashed in full.
    pub(super) full_files: u64,
    /// Pages read and hashed, all files.
    pub(super) pages_hashed: u64,
}

impl Scanner {
    /// On a disconnection: keeps a record of the table's files if this connection's
    /// comparison finished (with the FUSE capture only). Otherwise the record of an earlier
    /// disconnection, kept up to date by the events since, stays as it is.
    pub(super) fn keep_record(&mut self) {
        if !std::mem::take(&mut self.compared) || !self.exact_events {
            return;
        }
        self.record.clear();
        let total: usize = self.table.files.values().map(|f| f.pages.len()).sum();
        if total > PREHASH_MAX_PAGES {
            tracing::debug!(
                pages = total,
                "too many pages to keep a record of: the next pre-hash reads every file"
            );
            return;
        }
        let start = Instant::now();
        let mut record = Record::default();
        for (rel, state) in &self.table.files {
            if self.dirty.contains(rel) {
                continue; // its last window did not see every page
            }
            if self.unreconciled(rel) {
                continue; // a rename moved a reading ahead there: maybe another file's pages
            }
            if let Some(r) = self.recorded(rel, state) {
                record.insert(rel.clone(), r);
            }
        }
        tracing::debug!(
            files = record.files.len(),
            of = self.table.files.len(),
            pages = record.pages,
            took_ms = start.elapsed().as_millis(),
            "kept a record of the hot tree's pages for the next pre-hash"
        );
        self.record = record;
    }

    /// Whether a rename put `rel` (or a directory above it) where the table's entry may be a
    /// reading of what later calls left on the disk, not yet brought in line with it
    /// ([`Scanner::reconcile_renamed`], which a disconnection makes drop the marks).
    fn unreconciled(&self, rel: &str) -> bool {
        self.renamed.contains(rel)
            || rel
                .match_indices('/')
                .any(|(i, _)| self.renamed.contains(&rel[..i]))
    }

    /// The record of `rel` from its table entry, if the file is still the length the table
    /// says (else the table is behind an event still queued: left out).
    fn recorded(&self, rel: &str, state: &FileState) -> Option<Recorded> {
        let file = open_nofollow(&self.root.join(rel)).ok()?;
        let meta = file.metadata().ok()?;
        let pages = usize::try_from(meta.len().div_ceil(self.page_size as u64)).ok()?;
        if !meta.is_file() || meta.len() != state.len || state.pages.len() != pages {
            return None;
        }
        Some(Recorded {
            seen: Seen::of(&meta),
            pages: state.pages.clone(),
            // a page the table marks for resending is unknown: read again
            dirty: state.pages.iter().map(|p| *p == INVALID).collect(),
            writes: 0,
        })
    }

    /// Brings the record in line with an event handled while disconnected.
    pub(super) fn record_event(&mut self, ev: &FsEvent) {
        match ev {
            FsEvent::Wrote {
                path,
                file,
                offset,
                len,
            } => {
                let meta = file.metadata().ok();
                let ps = self.page_size as u64;
                self.record.wrote(path, meta, *offset, *len, ps);
            }
            // (its length is not what the record's writes make it)
            FsEvent::Changed(path)
            | FsEvent::Removed(path)
            | FsEvent::MadeDir { path, .. }
            | FsEvent::Linked { path, .. }
            | FsEvent::AttrsSet { path, .. }
            | FsEvent::Resized { path, .. } => self.record.forget(path),
            FsEvent::Renamed { .. } | FsEvent::Event(_) | FsEvent::Rescan(_) => {
                self.record.clear();
            }
            FsEvent::Sync(_) | FsEvent::WatchLimit | FsEvent::Nudge => {}
        }
    }

    /// Whether the record vouches for `rel`, opened with metadata `seen` (of `pages` pages):
    /// it has the file with that very metadata.
    pub(super) fn recorded_as(&self, rel: &str, seen: &Seen, pages: usize) -> bool {
        self.record
            .files
            .get(rel)
            .is_some_and(|r| r.seen == *seen && r.pages.len() == pages)
    }

    /// The pages of `rel` (through `file`, whose metadata was `seen`) from its record, with
    /// only the dirty pages read, in runs, as the pre-hash reads a file; the record's entry
    /// is used up. `None` if reading failed, or if an event for the file came meanwhile
    /// (events are handled between reads).
    pub(super) fn hash_recorded(
        &mut self,
        rel: &str,
        file: &fs::File,
        seen: &Seen,
    ) -> Option<Vec<PageHash>> {
        let (dirty, writes) = {
            let r = self.record.files.get(rel)?;
            let dirty: Vec<usize> = (0..r.dirty.len()).filter(|&i| r.dirty[i]).collect();
            (dirty, r.writes)
        };
        let mut fresh = Vec::with_capacity(dirty.len());
        for run in dirty.chunk_by(|a, b| a + 1 == *b) {
            self.hash_run(file, run[0], run.len(), seen.len, &mut fresh)?;
        }
        // the entry stays in the record while its pages are read, so that an event for the
        // file handled meanwhile is seen here
        let mut r = self.record.remove(rel)?;
        if r.writes != writes || r.seen != *seen {
            return None;
        }
        for (i, hash) in dirty.into_iter().zip(fresh) {
            r.pages[i] = hash;
        }
        self.prehash_counts.recorded_files += 1;
        Some(r.pages)
    }

    /// Reads and hashes the `count` pages from page `first` (of a file of `len` bytes) into
    /// `out`, a buffer at a time; `None` if reading failed or the file is shorter than
    /// recorded.
    fn hash_run(
        &mut self,
        file: &fs::File,
        first: usize,
        count: usize,
        len: u64,
        out: &mut Vec<PageHash>,
    ) -> Option<()> {
        let ps = self.page_size;
        let per_read = (self.buf.len() / ps).max(1);
        let (mut page, end) = (first, first + count);
        while page < end {
            // (a control message waiting does not stop it: see `prehash_one`)
            self.handle_queued_events();
            let n_pages = per_read.min(end - page);
            let off = page as u64 * ps as u64;
            let want = usize::try_from(len.saturating_sub(off))
                .unwrap_or(usize::MAX)
                .min(n_pages * ps);
            let n = read_full_at(file, &mut self.buf[..want], off).ok()?;
            if n < want {
                return None; // shorter than recorded: its event follows
            }
            out.extend(self.buf[..n].chunks(ps).map(page_hash));
            self.prehash_counts.dirty_pages += n_pages as u64;
            self.prehash_counts.pages_hashed += n_pages as u64;
            page += n_pages;
        }
        Some(())
    }
}
