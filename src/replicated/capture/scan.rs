//! Hashing what is on disk against the table, and queueing the ops that make the cold side
//! match: a path ([`Scanner::check_path`]), a directory, a file (its append window or all of
//! it), and the whole tree (the rescans and the comparison after a connection).
//!
//! A file's scan, step by step: open it (or take it from the cache of open files), model in
//! the table what the cold side will do with its new length and mode, hash pages from the
//! window's start and compare them with the table, queue each run of changed pages as one
//! `Write`, then move the file's cursor (and mark it dirty when the window did not see every
//! page).
//! Walking the whole tree is [`super::rescan`]'s.

use std::fs::{self, File};
use std::path::Path;
use std::time::SystemTime;

use crate::replicated::capture::{Scanner, Seen, BATCH_DATA_BYTES, RACY_WINDOW};
use crate::replicated::ops::Op;
use crate::replicated::pages::{
    fully_allocated, link_target, open_nofollow, page_digests, page_hash, read_full_at, truncated,
    Attrs, LinkState, PageHash, BATCH_PAGES, READ_PAGES,
};

/// Marks a table entry that must be re-sent whatever the content.
pub(super) const INVALID: PageHash = [0xff; 16];
/// Pages an append window reads first; each further read doubles, up to [`READ_PAGES`].
const WINDOW_FIRST_READ_PAGES: usize = 8;
/// Unchanged pages past the cursor that end an append window.
const WINDOW_CLEAN_PAGES: usize = 2;
/// Pages past its start after which a window that found no change gives up (the file goes
/// to the dirty set).
const WINDOW_GIVE_UP_PAGES: usize = 4;
/// A read of at least this many pages whose changed pages fill half of it is sent from its own
/// buffer rather than copied (see [`Scanner::compare_read`]); an append window's first reads
/// are shorter.
const SHARE_READ_PAGES: usize = 64;

/// Contiguous changed pages, queued as one `Write` once the run ends.
struct PageRun {
    offset: u64,
    data: Vec<u8>,
    hashes: Vec<[u8; 32]>,
}

impl PageRun {
    fn into_write(mut self, rel: &str) -> Op {
        // a run is sized for the rest of its read; one that ended early gives the rest back
        // rather than holding it in the queue and the window
        if self.data.capacity() > self.data.len() + self.data.len() / 4 {
            self.data.shrink_to_fit();
            self.hashes.shrink_to_fit();
        }
        Op::Write {
            path: rel.to_owned(),
            offset: self.offset,
            data: self.data.into(),
            hashes: self.hashes,
        }
    }
}

/// One pass over a file's pages: all of them (`full`), or a window from the page before the
/// cursor (where the file last changed) until [`WINDOW_CLEAN_PAGES`] unchanged pages past it.
struct Pass {
    full: bool,
    cursor: usize,
    start: usize,
    /// Pages in the file.
    pages: usize,
    /// The next page to read.
    page: usize,
    chunk_pages: usize,
    clean_run: usize,
    stop_after_clean: usize,
    last_changed: Option<usize>,
    /// One past the last page compared.
    compared_to: usize,
    /// Whether a changed page is all zeros (written as zeros, it allocates its blocks).
    zeroed: bool,
    /// Clean pages end a window only from this page on: a file that grew may have been
    /// written anywhere up to its new end.
    reach: usize,
    run: Option<PageRun>,
    /// The file's pages as the pre-hash saw them (`prehash.rs`), still true of the file:
    /// pages where it equals the table are not read.
    hint: Option<Vec<PageHash>>,
}

impl Pass {
    fn new(full: bool, cursor: usize, pages: usize, reach: usize) -> Pass {
        let (start, stop_after_clean, chunk_pages) = if full {
            (0, usize::MAX, READ_PAGES)
        } else {
            (
                cursor.saturating_sub(1),
                WINDOW_CLEAN_PAGES,
                WINDOW_FIRST_READ_PAGES,
            )
        };
        Pass {
            full,
            cursor,
            start,
            pages,
            page: start,
            chunk_pages,
            clean_run: 0,
            stop_after_clean,
            last_changed: None,
            compared_to: start,
            zeroed: false,
            reach,
            run: None,
            hint: None,
        }
    }

    fn run_bytes(&self) -> usize {
        self.run.as_ref().map_or(0, |r| r.data.len())
    }
}

impl Scanner {
    /// Brings the table (and the cold side) in line with whatever is at `rel` now.
    pub(super) fn check_path(&mut self, rel: &str) {
        if self.exact_events {
            self.read_ahead.insert(rel.to_owned());
        }
        if !self.beneath(rel) {
            return self.remove(rel);
        }
        let path = self.root.join(rel);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => self.scan_dir(rel),
            Ok(m) if m.is_file() => self.scan_file(rel, false),
            Ok(m) if m.file_type().is_symlink() => self.scan_link(rel, &m),
            _ => self.remove(rel),
        }
    }

    /// A symlink: its target (text, never followed) and owner, replacing whatever the table
    /// had at `rel`.
    pub(super) fn scan_link(&mut self, rel: &str, meta: &fs::Metadata) {
        let target = match link_target(&self.root.join(rel)) {
            Ok(Some(t)) => t,
            // skipped (the op stream cannot carry it): whatever the table had there is gone
            // from the hot tree, so it goes from the cold one
            Ok(None) | Err(_) => return self.remove(rel),
        };
        self.model_link(rel, target, Attrs::of(meta));
    }

    /// Queues what makes the table's `rel` a symlink to `target` owned as `attrs`, replacing
    /// whatever the table had there.
    pub(super) fn model_link(&mut self, rel: &str, target: String, attrs: Attrs) {
        if self.table.files.contains_key(rel) || self.table.dirs.contains_key(rel) {
            self.remove(rel); // a file or directory became a symlink
        }
        self.ensure_parents(rel);
        let known = self.table.links.get(rel).cloned();
        if known.as_ref().is_none_or(|k| k.target != target) {
            self.push(Op::Symlink {
                path: rel.to_owned(),
                target: target.clone(),
            });
        }
        if known
            .as_ref()
            .is_none_or(|k| k.target != target || k.attrs != attrs)
        {
            // a new link is the cold agent's own until its owner is set
            self.push(Op::SetAttrs {
                path: rel.to_owned(),
                attrs,
            });
        }
        self.table
            .links
            .insert(rel.to_owned(), LinkState { target, attrs });
    }

    /// The write path set the mode or owner of `rel`, which then had `attrs`: the table's
    /// entry takes them, and the cold side's, if they differ. An entry the table lacks (lost
    /// to a reading ahead) is read as it is now.
    pub(super) fn model_attrs(&mut self, rel: &str, attrs: Attrs) {
        let changed = if let Some(entry) = self.table.files.get_mut(rel) {
            std::mem::replace(&mut entry.attrs, attrs) != attrs
        } else if let Some(link) = self.table.links.get_mut(rel) {
            std::mem::replace(&mut link.attrs, attrs) != attrs
        } else if self.table.dirs.contains_key(rel) {
            return self.model_dir(rel, attrs);
        } else {
            return self.check_path(rel);
        };
        if changed {
            self.push(Op::SetAttrs {
                path: rel.to_owned(),
                attrs,
            });
        }
    }

    /// Removes `rel` and everything below it from the table and queues the removal.
    pub(super) fn remove(&mut self, rel: &str) {
        let prefix = format!("{rel}/");
        let was_file = self.table.files.remove(rel).is_some();
        let was_dir = self.table.dirs.remove(rel).is_some();
        let was_link = self.table.links.remove(rel).is_some();
        if !(was_file || was_dir || was_link) {
            return;
        }
        self.seen.remove(rel);
        self.cursors.remove(rel);
        if was_dir {
            // only a directory has entries below it: a whole-table pass per removed file
            // would make removing n files cost n times the table
            remove_below(&mut self.table.files, &prefix);
            remove_below(&mut self.table.dirs, &prefix);
            remove_below(&mut self.table.links, &prefix);
            self.seen.retain(|k, _| !k.starts_with(&prefix));
            self.cursors.retain(|k, _| !k.starts_with(&prefix));
        }
        self.push(Op::Remove {
            path: rel.to_owned(),
        });
    }

    /// Whether every directory between the root and `rel` is a real directory. A path through
    /// a symlink is not in the tree, whatever it names outside it (a link to `..` would
    /// otherwise bring the data directory's parent into the copy); the change that put the
    /// symlink there has its own event.
    pub(super) fn beneath(&self, rel: &str) -> bool {
        let mut end = 0;
        while let Some(i) = rel[end..].find('/') {
            end += i;
            if !fs::symlink_metadata(self.root.join(&rel[..end])).is_ok_and(|m| m.is_dir()) {
                return false;
            }
            end += 1;
        }
        true
    }

    /// Queues a `Mkdir` for every parent of `rel` the table does not have (a parent the table
    /// has as a file or symlink is removed first: a path is in one of its maps at most).
    pub(super) fn ensure_parents(&mut self, rel: &str) {
        let mut parts: Vec<&str> = rel.split('/').collect();
        parts.pop();
        let mut cur = String::new();
        for part in parts {
            if !cur.is_empty() {
                cur.push('/');
            }
            cur.push_str(part);
            if !self.table.dirs.contains_key(&cur) {
                if self.table.files.contains_key(&cur) || self.table.links.contains_key(&cur) {
                    self.remove(&cur);
                }
                let attrs = fs::symlink_metadata(self.root.join(&cur))
                    .ok()
                    .filter(fs::Metadata::is_dir)
                    .map_or(
                        Attrs {
                            mode: 0o755,
                            ..Attrs::default()
                        },
                        |m| Attrs::of(&m),
                    );
                self.new_dir(&cur, attrs);
            }
        }
    }

    /// A directory and everything in it.
    pub(super) fn scan_dir(&mut self, rel: &str) {
        if !self.beneath(rel) {
            return self.remove(rel);
        }
        let path = self.root.join(rel);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            return self.remove(rel);
        };
        if !meta.is_dir() {
            return self.check_path(rel);
        }
        self.ensure_parents(rel);
        self.model_dir(rel, Attrs::of(&meta));
        let Some(names) = sorted_names(&path) else {
            return;
        };
        for name in names {
            self.check_path(&format!("{rel}/{name}"));
            self.flush_if_full();
        }
    }

    /// Queues what makes the table's directory `rel` have `attrs`: a `Mkdir` and `SetAttrs`
    /// for a new one (replacing a file or symlink), a `SetAttrs` for a changed one.
    pub(super) fn model_dir(&mut self, rel: &str, attrs: Attrs) {
        if self.table.files.contains_key(rel) || self.table.links.contains_key(rel) {
            self.remove(rel); // a file or symlink became a directory
        }
        match self.table.dirs.get(rel) {
            None => self.new_dir(rel, attrs),
            Some(a) if *a != attrs => {
                self.table.dirs.insert(rel.to_owned(), attrs);
                self.push(Op::SetAttrs {
                    path: rel.to_owned(),
                    attrs,
                });
            }
            Some(_) => {}
        }
    }

    /// A directory the table does not have: created, then given its owner (the cold agent
    /// owns what it creates) and mode.
    fn new_dir(&mut self, rel: &str, attrs: Attrs) {
        self.table.dirs.insert(rel.to_owned(), attrs);
        self.push(Op::Mkdir {
            path: rel.to_owned(),
            mode: attrs.mode,
        });
        self.push(Op::SetAttrs {
            path: rel.to_owned(),
            attrs,
        });
    }

    /// Sends what changed in the file at `rel`: everything when `full`, else the window from
    /// where it last changed.
    pub(super) fn scan_file(&mut self, rel: &str, full: bool) {
        let Some(file) = self.open_for_scan(rel, full) else {
            return;
        };
        let Ok(meta) = file.metadata() else { return };
        if !meta.is_file() {
            return;
        }
        if self.table.dirs.contains_key(rel) || self.table.links.contains_key(rel) {
            self.remove(rel); // a directory or symlink became a file
        }
        self.ensure_parents(rel);
        let Ok(pages) = usize::try_from(meta.len().div_ceil(self.page_size as u64)) else {
            tracing::warn!(
                file = rel,
                len = meta.len(),
                "too large to scan on this platform"
            );
            return;
        };
        let (attrs, allocated) = (Attrs::of(&meta), fully_allocated(&meta));
        let (grew, allocate) = self.model_set_file(rel, meta.len(), attrs, allocated, pages);
        let cursor = self.cursors.get(rel).copied().unwrap_or(0);
        let reach = if grew { pages } else { 0 };
        let mut pass = Pass::new(full, cursor, pages, reach);
        if full && !self.prehash.is_empty() {
            pass.hint = self
                .take_prehash(rel, &meta)
                .filter(|hint| hint.len() == pages);
        }
        self.compare_pass(rel, &file, &mut pass);
        if pass.zeroed && !allocated {
            // zeros written where the hot file may have a hole would give the cold side
            // blocks the hot file lacks: regrown sparse, every page that is not zeros resent
            self.regrow_sparse(rel, attrs.mode);
            // not allocated: no `Allocate` comes back
            let _ = self.model_set_file(rel, meta.len(), attrs, allocated, pages);
            let hint = pass.hint.take();
            pass = Pass::new(true, 0, pages, pages);
            pass.hint = hint;
            self.compare_pass(rel, &file, &mut pass);
        }
        self.push_allocate(allocate);
        self.finish_pass(rel, file, &meta, &pass);
    }

    /// Sends what changed in the pages of `rel` that `len` bytes at `offset` touch (the FUSE
    /// capture's write, allocation or punched hole), read through `file` (whose metadata is
    /// `meta`), after modelling its length, mode, owner and allocation as
    /// [`Scanner::scan_file`] does.
    pub(super) fn scan_range(
        &mut self,
        rel: &str,
        file: &File,
        meta: &fs::Metadata,
        offset: u64,
        len: u64,
    ) {
        self.scan_range_as(rel, file, meta, (offset, len), fully_allocated(meta));
    }

    /// [`Scanner::scan_range`] of the `(offset, len)` range, with the file's allocation taken
    /// as `allocated` instead of from `meta` (a length change models the blocks the cold side
    /// has after it, not the ones later writes gave the file since).
    pub(super) fn scan_range_as(
        &mut self,
        rel: &str,
        file: &File,
        meta: &fs::Metadata,
        (offset, len): (u64, u64),
        allocated: bool,
    ) {
        if self.table.dirs.contains_key(rel) || self.table.links.contains_key(rel) {
            self.remove(rel); // a directory or symlink became a file
        }
        self.ensure_parents(rel);
        let ps = self.page_size as u64;
        let (Ok(pages), Ok(first), Ok(end)) = (
            usize::try_from(meta.len().div_ceil(ps)),
            usize::try_from(offset / ps),
            usize::try_from(offset.saturating_add(len).div_ceil(ps)),
        ) else {
            tracing::warn!(file = rel, "too large to scan on this platform");
            return;
        };
        let attrs = Attrs::of(meta);
        // a file that lost blocks is regrown sparse by model_set_file: all of it is resent
        let regrown =
            !allocated && meta.len() > 0 && self.table.files.get(rel).is_some_and(|e| e.allocated);
        let (_, allocate) = self.model_set_file(rel, meta.len(), attrs, allocated, pages);
        let mut pass = Pass::new(true, 0, end.min(pages), 0);
        if regrown {
            pass = Pass::new(true, 0, pages, pages);
        } else {
            (pass.start, pass.page, pass.compared_to) = (first, first, first);
        }
        self.compare_pass(rel, file, &mut pass);
        if pass.zeroed && !allocated {
            // as in scan_file: zeros must not allocate blocks the hot file may lack
            self.regrow_sparse(rel, attrs.mode);
            // not allocated: no `Allocate` comes back
            let _ = self.model_set_file(rel, meta.len(), attrs, allocated, pages);
            pass = Pass::new(true, 0, pages, pages);
            self.compare_pass(rel, file, &mut pass);
        }
        self.push_allocate(allocate);
        if let Some(c) = pass.last_changed {
            self.cursors.insert(rel.to_owned(), c);
        }
    }

    /// An empty file at `rel` with `attrs` (a create on the write path), replacing a
    /// directory or symlink the table has there.
    pub(super) fn model_new_file(&mut self, rel: &str, attrs: Attrs) {
        if self.table.dirs.contains_key(rel) || self.table.links.contains_key(rel) {
            self.remove(rel);
        }
        self.ensure_parents(rel);
        let (_, allocate) = self.model_set_file(rel, 0, attrs, false, 0);
        debug_assert!(allocate.is_none(), "an empty file has no blocks");
    }

    /// The file at `rel` ends at `edge` at this point of the stream (the FUSE capture's
    /// length change, [`FsEvent::Resized`]): the table's entry, and the cold side's file, are
    /// cut there when longer. The page the cut leaves partial is unknown until compared.
    ///
    /// [`FsEvent::Resized`]: crate::replicated::capture::watch::FsEvent::Resized
    pub(super) fn cut_at(&mut self, rel: &str, edge: u64) {
        let ps = self.page_size as u64;
        let Some(entry) = self.table.files.get_mut(rel) else {
            return;
        };
        let Ok(pages) = usize::try_from(edge.div_ceil(ps)) else {
            return;
        };
        if entry.len <= edge {
            return;
        }
        entry.pages.truncate(pages);
        if !edge.is_multiple_of(ps) {
            if let Some(last) = entry.pages.last_mut() {
                *last = INVALID;
            }
        }
        entry.len = edge;
        let mode = entry.attrs.mode;
        if let Some(c) = self.cursors.get_mut(rel) {
            *c = (*c).min(pages);
        }
        self.push(Op::SetFile {
            path: rel.to_owned(),
            len: edge,
            mode,
        });
    }

    /// Empties the file on the cold side (it regrows sparse with the next `SetFile`), and
    /// models it empty: what the cold side had allocated is gone.
    fn regrow_sparse(&mut self, rel: &str, mode: u32) {
        if let Some(entry) = self.table.files.get_mut(rel) {
            entry.pages.clear();
            entry.len = 0;
        }
        self.cursors.remove(rel);
        self.push(Op::SetFile {
            path: rel.to_owned(),
            len: 0,
            mode,
        });
    }

    /// The file to scan: the cached handle for a window, a fresh one for a full pass (the
    /// file at the path may have been replaced). `None` (after queueing its removal) if the
    /// file is gone.
    fn open_for_scan(&mut self, rel: &str, full: bool) -> Option<File> {
        let cached = if full {
            None
        } else {
            self.open_files.take(rel)
        };
        if cached.is_some() {
            return cached;
        }
        if !self.beneath(rel) {
            self.remove(rel);
            return None;
        }
        let path = self.root.join(rel);
        match open_nofollow(&path) {
            Ok(f) => Some(f),
            Err(_) => {
                match fs::symlink_metadata(&path) {
                    // it became a symlink: never followed, sent as one
                    Ok(m) if m.file_type().is_symlink() => self.scan_link(rel, &m),
                    _ => self.remove(rel),
                }
                None
            }
        }
    }

    /// When the file's length or mode differs from the table's: queues a `SetFile`, and
    /// models in the table what the cold side does with it (truncate or zero-extend); then
    /// queues what its owner needs. Whether the file grew, and the `Allocate` its allocation
    /// needs, for the caller to queue after the pages it sends ([`Scanner::push_allocate`]).
    #[must_use = "the allocation is the caller's to queue"]
    fn model_set_file(
        &mut self,
        rel: &str,
        len: u64,
        attrs: Attrs,
        allocated: bool,
        pages: usize,
    ) -> (bool, Option<Op>) {
        let ps = self.page_size as u64;
        let zero_hash = self.zero_hash;
        let known = self.table.files.contains_key(rel);
        let entry = self.table.files.entry(rel.to_owned()).or_default();
        let (mut old_len, old_attrs, old_allocated) = (entry.len, entry.attrs, entry.allocated);
        if known && old_len == len && old_attrs == attrs && old_allocated == allocated {
            return (false, None);
        }
        if known && old_allocated && !allocated && len > 0 {
            // the cold side keeps blocks the hot file no longer has (it shrank and grew again
            // meanwhile, or a rename brought another file's entry): the pass from page 0 to
            // the end resends every page that is not zeros
            old_len = 0;
            self.regrow_sparse(rel, attrs.mode);
        }
        let entry = self.table.files.get_mut(rel).expect("inserted above");
        if !known || old_len != len || old_attrs.mode != attrs.mode {
            let old_pages = entry.pages.len();
            if !old_len.is_multiple_of(ps) && len != old_len {
                // the cold side keeps the old partial page's bytes: content unknown here
                if let Some(last) = entry.pages.last_mut() {
                    *last = INVALID;
                }
            }
            entry.pages.resize(pages, zero_hash);
            if !len.is_multiple_of(ps) && pages > old_pages {
                // a new short last page: zeros on the cold side
                let tail = usize::try_from(len % ps).expect("less than the page size, a usize");
                if let Some(last) = entry.pages.last_mut() {
                    *last = page_hash(&vec![0u8; tail]);
                }
            }
            self.push(Op::SetFile {
                path: rel.to_owned(),
                len,
                mode: attrs.mode,
            });
        }
        let entry = self.table.files.get_mut(rel).expect("inserted above");
        entry.len = len;
        entry.attrs = attrs;
        entry.allocated = allocated;
        if !known || (old_attrs.uid, old_attrs.gid) != (attrs.uid, attrs.gid) {
            // a new file is the cold agent's own until its owner is set
            self.push(Op::SetAttrs {
                path: rel.to_owned(),
                attrs,
            });
        }
        let grew = known && len > old_len;
        // allocate what the cold side lacks: the part gained, or all of it
        let allocate = (allocated && (!old_allocated || !known || grew)).then(|| {
            let offset = if known && old_allocated { old_len } else { 0 };
            Op::Allocate {
                path: rel.to_owned(),
                offset,
                len: len - offset,
            }
        });
        (len > old_len, allocate)
    }

    /// Queues a file's `Allocate` after the pages of it just queued: the cold side then
    /// allocates only what those writes left unwritten. Before them, tmpfs zeroed every page
    /// (`clear_page_erms` was two thirds of the cold apply thread's time in an initial sync)
    /// only for the writes to overwrite it; the file's blocks end the same either way.
    fn push_allocate(&mut self, allocate: Option<Op>) {
        if let Some(op) = allocate {
            self.push(op);
        }
    }

    /// Reads the pass's pages, growing reads as the window goes on, and compares them with
    /// the table; flushes a batch's worth of changed pages as it goes.
    fn compare_pass(&mut self, rel: &str, file: &File, pass: &mut Pass) {
        while pass.page < pass.pages && pass.clean_run < pass.stop_after_clean {
            let off = pass.page as u64 * self.page_size as u64;
            // never past the pass's end: a range scan of one 4 KiB write read (and hashed)
            // 1 MiB after it
            let mut want = pass.chunk_pages.min(pass.pages - pass.page);
            if let Some(hint) = &pass.hint {
                let table = self.table.files.get(rel).map_or(&[][..], |e| &e.pages[..]);
                let equal = agreeing(table, hint, pass.page, pass.pages, true);
                if equal > 0 {
                    // proven equal without reading: an unchanged page ends the run
                    let len = self.table.files.get(rel).map_or(0, |e| e.len);
                    let end = ((pass.page + equal) as u64 * self.page_size as u64).min(len);
                    self.queue_run(rel, pass.run.take());
                    self.proven_pages += equal as u64;
                    pass.page += equal;
                    pass.compared_to = pass.page;
                    self.compared(end.saturating_sub(off), 0);
                    continue;
                }
                want = agreeing(table, hint, pass.page, pass.page + want, false);
            }
            // never past the length the table models (the cold side's, once the `SetFile`
            // queued is applied): a file grown since its length was read would have its last
            // page read, and written on the cold side, as far as it reaches now, and a cut
            // back to the modelled length before its event is read sends no `SetFile`
            let len = self.table.files.get(rel).map_or(0, |e| e.len);
            let want = (want * self.page_size)
                .min(usize::try_from(len.saturating_sub(off)).unwrap_or(usize::MAX));
            pass.chunk_pages = (pass.chunk_pages * 2).min(READ_PAGES);
            #[cfg(test)]
            if let Some(hook) = &mut self.read_hook {
                hook();
            }
            let n = match read_full_at(file, &mut self.buf[..want], off) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(file = %self.root.join(rel).display(), "cannot read: {e}");
                    // the pages not read are unknown: tried again with the dirty files (and
                    // never taken into a record, `record.rs`)
                    self.dirty.insert(rel.to_owned());
                    break;
                }
            };
            if !self.compare_read(rel, n, pass) {
                break;
            }
            if pass.full {
                self.compared(n as u64, 0);
            }
            pass.page += n.div_ceil(self.page_size);
            if n < want {
                break;
            }
            if self.data + pass.run_bytes() >= BATCH_DATA_BYTES {
                self.queue_run(rel, pass.run.take());
                self.send_batch();
            }
            if !pass.full
                && pass.last_changed.is_none()
                && pass.page >= pass.reach
                && pass.page > pass.start + WINDOW_GIVE_UP_PAGES
            {
                pass.stop_after_clean = 0; // nothing near the cursor changed: leave the rest to the rescan
            }
        }
        self.queue_run(rel, pass.run.take());
    }

    /// Compares the `n` bytes just read into the buffer (from page `pass.page`) with the
    /// table, page by page: a changed page joins the current run and updates the table; an
    /// unchanged one ends the run. `false` if the file left the table meanwhile.
    ///
    /// A run that fills at least half of a large read ([`SHARE_READ_PAGES`]) is not copied:
    /// its `Write` shares the read buffer itself, and the scanner reads on into another from
    /// its pool. An initial sync or a large resync is such runs, so each page is read once
    /// into memory that is used again, rather than copied a second time into new memory
    /// (the copy and the new memory's page faults were a sixth of the hot side's CPU there).
    fn compare_read(&mut self, rel: &str, n: usize, pass: &mut Pass) -> bool {
        let Some(entry) = self.table.files.get_mut(rel) else {
            return false;
        };
        let table = &mut entry.pages;
        let ps = self.page_size;
        // the runs of changed pages in this read: first page (of the read), their hashes
        let mut runs: Vec<(usize, Vec<[u8; 32]>)> = Vec::new();
        let mut looked = 0;
        // hashed side by side, a batch at a time: a window pass may stop after a few pages
        let mut digests = Vec::with_capacity(BATCH_PAGES);
        'pages: for (g, group) in self.buf[..n].chunks(ps * BATCH_PAGES).enumerate() {
            digests.clear();
            page_digests(group, ps, &mut digests);
            for (k, (chunk, full_hash)) in group.chunks(ps).zip(&digests).enumerate() {
                let i = g * BATCH_PAGES + k;
                let idx = pass.page + i;
                if idx >= table.len() || pass.clean_run >= pass.stop_after_clean {
                    break 'pages;
                }
                looked = i + 1;
                pass.compared_to = idx + 1;
                let short = truncated(full_hash);
                if table[idx] == short {
                    // clean pages end the window only once past the cursor: the next append
                    // lands after it
                    if pass.full || (idx > pass.cursor && idx >= pass.reach) {
                        pass.clean_run += 1;
                    }
                    continue;
                }
                pass.clean_run = 0;
                pass.zeroed |= chunk.iter().all(|&b| b == 0);
                table[idx] = short;
                pass.last_changed = Some(idx);
                match runs.last_mut() {
                    Some((first, hashes)) if *first + hashes.len() == i => {
                        hashes.push(*full_hash.as_bytes());
                    }
                    _ => runs.push((i, vec![*full_hash.as_bytes()])),
                }
            }
        }
        if looked == 0 {
            return true;
        }
        // the pass's open run goes on only into a changed first page
        let continued = runs.first().is_some_and(|(first, _)| *first == 0) && pass.run.is_some();
        if !continued {
            if let Some(run) = pass.run.take() {
                self.queue_in_read(run.into_write(rel));
            }
        }
        if (continued && runs.len() > 1) || (!continued && !runs.is_empty()) {
            self.change_found();
        }
        // a run's bytes in the read (a last page may be short)
        let span = |first: usize, pages: usize| first * ps..((first + pages) * ps).min(n);
        let shares = |bytes: &std::ops::Range<usize>| 2 * bytes.len() >= n;
        let shared = (n >= SHARE_READ_PAGES * ps
            && runs.iter().any(|(first, h)| shares(&span(*first, h.len()))))
        .then(|| {
            let buf = std::mem::replace(&mut self.buf, self.pool.take(ps * READ_PAGES));
            self.pool.share(buf, n)
        });
        for (first, hashes) in runs {
            let offset = (pass.page + first) as u64 * ps as u64;
            let bytes = span(first, hashes.len());
            // an open run (it reaches the last page looked at) may go on into the next read
            let open = first + hashes.len() == looked;
            if let Some(data) = shared.as_ref().filter(|_| shares(&bytes)) {
                if let Some(run) = pass.run.take() {
                    self.queue_in_read(run.into_write(rel));
                }
                self.queue_in_read(Op::Write {
                    path: rel.to_owned(),
                    offset,
                    data: data.slice(bytes),
                    hashes,
                });
                continue;
            }
            let src = shared.as_deref().unwrap_or(&self.buf[..n]);
            // (the open run was queued above unless this run goes on from it)
            let (run, before) = match pass.run.take() {
                Some(mut run) if first == 0 => {
                    run.data.extend_from_slice(&src[bytes]);
                    run.hashes.extend(hashes);
                    (run, None)
                }
                before => {
                    // sized for the rest of this read: a run of many pages does not regrow
                    // page by page
                    let mut data = Vec::with_capacity(n - bytes.start);
                    data.extend_from_slice(&src[bytes]);
                    let run = PageRun {
                        offset,
                        data,
                        hashes,
                    };
                    (run, before)
                }
            };
            if let Some(before) = before {
                self.queue_in_read(before.into_write(rel));
            }
            if open {
                pass.run = Some(run);
            } else {
                self.queue_in_read(run.into_write(rel));
            }
        }
        true
    }

    /// Queues a `Write` found in the middle of a read: counted in the batch's bytes, not yet
    /// flushed (the pass flushes between reads).
    fn queue_in_read(&mut self, op: Op) {
        self.data += op.data_len();
        self.ops.push(op);
    }

    fn queue_run(&mut self, rel: &str, run: Option<PageRun>) {
        if let Some(run) = run {
            self.push(run.into_write(rel));
        }
    }

    /// After a pass: the cursor moves to the last changed page; a window that did not compare
    /// every page marks the file dirty (an event says "modified", not where: a write may have
    /// begun before the window, and its pages up to the window may differ although the
    /// window's first page does not, when that page was rewritten with the bytes it had); a
    /// full pass records the file's metadata, a window keeps the file open for the next event.
    fn finish_pass(&mut self, rel: &str, file: File, meta: &fs::Metadata, pass: &Pass) {
        if let Some(c) = pass.last_changed {
            self.cursors.insert(rel.to_owned(), c);
        }
        if !pass.full {
            // a window that compared every page saw all there was to see
            let saw_all = pass.start == 0 && pass.compared_to >= pass.pages;
            if !saw_all {
                tracing::trace!(
                    file = rel,
                    cursor = pass.cursor,
                    found = pass.last_changed.is_some(),
                    "window: dirty"
                );
                self.dirty.insert(rel.to_owned());
            }
        }
        if pass.full {
            self.remember_seen(rel, meta);
            self.compared(0, 1);
        } else {
            self.open_files.keep(rel, file);
        }
    }

    /// "Racily clean" (as git calls it): timestamps are coarse (a jiffy), so a write in the
    /// same tick as this hash would leave them unchanged. Remember a file as seen only once
    /// its mtime is safely in the past; until then every rescan rehashes it.
    fn remember_seen(&mut self, rel: &str, meta: &fs::Metadata) {
        if meta.modified().is_ok_and(settled_at) {
            self.seen.insert(rel.to_owned(), Seen::of(meta));
        } else {
            self.seen.remove(rel);
        }
    }
}

/// Whether a timestamp `at` is older than [`RACY_WINDOW`]: a change from now on sets one the
/// coarse clock tells apart from it.
pub(super) fn settled_at(at: SystemTime) -> bool {
    SystemTime::now()
        .duration_since(at)
        .is_ok_and(|age| age > RACY_WINDOW)
}

/// How many pages from `from` (up to `to`) in a row have `table` and `hint` equal (`equal`),
/// or different.
fn agreeing(table: &[PageHash], hint: &[PageHash], from: usize, to: usize, equal: bool) -> usize {
    (from..to)
        .take_while(|&i| (table.get(i) == hint.get(i)) == equal)
        .count()
}

/// The UTF-8 names in `dir`, sorted; `None` if it cannot be listed (it vanished meanwhile).
pub(super) fn sorted_names(dir: &Path) -> Option<Vec<String>> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    Some(names)
}

/// The keys of `map` that start with `prefix`: one range of the sorted map (a directory's
/// entries, all levels below it, when `prefix` is the directory and `/`).
pub(super) fn keys_below<'a, V>(
    map: &'a std::collections::BTreeMap<String, V>,
    prefix: &'a str,
) -> impl Iterator<Item = &'a String> {
    map.range::<str, _>((
        std::ops::Bound::Included(prefix),
        std::ops::Bound::Unbounded,
    ))
    .map(|(k, _)| k)
    .take_while(move |k| k.starts_with(prefix))
}

/// Removes the keys of `map` that start with `prefix`.
pub(super) fn remove_below<V>(map: &mut std::collections::BTreeMap<String, V>, prefix: &str) {
    let below: Vec<String> = keys_below(map, prefix).cloned().collect();
    for k in below {
        map.remove(&k);
    }
}
