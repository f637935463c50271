//! From file-system events to scans: which path each notify event concerns and what to look
//! at; renames paired by their tracker (a "moved from" alone for [`RENAME_PAIR_WAIT`] is a
//! removal); and the rename itself, which moves table entries instead of resending data.

use std::fs;
use std::time::Instant;

use notify::event::{CreateKind, EventKind, ModifyKind, RemoveKind, RenameMode};

use crate::replicated::capture::scan::keys_below;
use crate::replicated::capture::watch::FsEvent;
use crate::replicated::capture::{Scanner, RENAME_PAIR_WAIT};
use crate::replicated::ops::{Op, Outgoing};
use crate::replicated::pages::FileState;

impl Scanner {
    /// Brings the table (and the cold side) in line with what one event says changed.
    pub(super) fn fs_event(&mut self, ev: FsEvent) {
        if matches!(ev, FsEvent::Nudge) {
            // not an event (never counted as queued): the loop reads the request
            return;
        }
        // (counted as handled before it is: it is, by the next flush, which publishes it)
        self.handled += 1;
        if !self.prehash.is_empty() {
            self.prehash_forget(&ev);
        }
        // (kept only while disconnected: the writes it must hear of are dropped below)
        if !self.record.is_empty() {
            self.record_event(&ev);
        }
        let ev = match ev {
            // one rescan for all lost events, at the end of this round of events
            FsEvent::Rescan(why) => return self.request_rescan(why),
            FsEvent::WatchLimit => return self.watch_limit_hit(),
            FsEvent::Event(e) => e,
            FsEvent::Nudge => return,
            // the write path's events (the FUSE capture): the change itself, in call order
            _ if !self.connected => return,
            FsEvent::Wrote {
                path,
                file,
                offset,
                len,
            } => return self.wrote(&path, &file, offset, len),
            FsEvent::Resized { path, file, edge } => return self.resized(&path, &file, edge),
            FsEvent::Changed(path) => {
                self.open_files.forget(&path);
                return self.check_path(&path);
            }
            // what the call did, exactly: the disk is not read (by now it may hold what later
            // calls made there)
            FsEvent::Removed(path) => {
                self.open_files.forget(&path);
                return self.remove(&path);
            }
            FsEvent::MadeDir { path, attrs } => {
                self.open_files.forget(&path);
                self.ensure_parents(&path);
                return self.model_dir(&path, attrs);
            }
            FsEvent::Linked {
                path,
                target,
                attrs,
            } => {
                self.open_files.forget(&path);
                return self.model_link(&path, target, attrs);
            }
            FsEvent::AttrsSet { path, attrs } => return self.model_attrs(&path, attrs),
            FsEvent::Sync(reply) => {
                // everything before it goes out now; the network task answers on its ack
                self.flush();
                let gen = self.gen;
                let _ = self.out.blocking_send(Outgoing::Synced { gen, reply });
                return;
            }
            FsEvent::Renamed { from, to } => {
                self.open_files.forget(&from);
                self.open_files.forget(&to);
                return self.rename(&from, &to);
            }
        };
        if !self.connected {
            return;
        }
        tracing::trace!(kind = ?ev.kind, paths = ?ev.paths, "event");
        let tracker = ev.attrs.tracker();
        let paths: Vec<String> = ev.paths.iter().filter_map(|p| self.rel(p)).collect();
        if !matches!(
            ev.kind,
            EventKind::Access(_) | EventKind::Modify(ModifyKind::Data(_))
        ) {
            // the path may now name another file (or a directory, with files below it)
            paths.iter().for_each(|p| self.open_files.forget(p));
        }
        match ev.kind {
            EventKind::Access(_) => {}
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) if paths.len() == 2 => {
                self.pending_from.retain(|(t, _, _)| Some(*t) != tracker);
                self.rename(&paths[0], &paths[1]);
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
                if let (Some(t), Some(p)) = (tracker, paths.first()) {
                    self.pending_from.push((t, p.clone(), Instant::now()));
                } else {
                    paths.iter().for_each(|p| self.check_path(p));
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                // paired with a pending From, the Both event that follows does the work
                if tracker.is_none_or(|t| !self.pending_from.iter().any(|(pt, _, _)| *pt == t)) {
                    paths.iter().for_each(|p| self.check_path(p));
                }
            }
            EventKind::Create(CreateKind::Folder) => paths.iter().for_each(|p| self.scan_dir(p)),
            EventKind::Remove(RemoveKind::File | RemoveKind::Folder | RemoveKind::Any) => {
                paths.iter().for_each(|p| self.check_path(p))
            }
            _ => paths.iter().for_each(|p| self.check_path(p)),
        }
    }

    /// The FUSE capture wrote `len` bytes at `offset` of `rel` through `file`: those pages,
    /// read through `file`, are compared and sent. The capture queues each event under its
    /// namespace lock, in call order, so at this point of the stream `rel` names that file,
    /// whatever the path names on the disk by now (the renames since have their events still
    /// to come): the path is never read, so nothing another file holds is read for this one.
    /// What the file holds by now that later calls wrote is theirs to send; their events find
    /// it sent. A file the table lacks (an entry a reading ahead lost) is compared in full.
    fn wrote(&mut self, rel: &str, file: &fs::File, offset: u64, len: u64) {
        let Ok(meta) = file.metadata() else { return };
        if self.table.files.contains_key(rel) {
            self.scan_range(rel, file, &meta, offset, len);
        } else {
            self.scan_range(rel, file, &meta, 0, meta.len());
        }
    }

    /// The FUSE capture set the length of `rel` through `file`, from or to `edge`, or created
    /// it (`edge` 0): the cold side's file is cut at `edge` first, since what the file had
    /// past it is gone (a later call may have grown the file again, to the same length), then
    /// the rest is a write of no bytes at `edge` ([`Scanner::wrote`]). A new file is empty at
    /// this point of the stream, and modelled so: nothing is read, and neither its length nor
    /// its blocks by now are sent (later calls gave it those, and their events send them; a
    /// file already filled when its create was read had the cold side allocate its blocks,
    /// free them at the length change's cut, and allocate them again for the writes).
    fn resized(&mut self, rel: &str, file: &fs::File, edge: u64) {
        self.cut_at(rel, edge);
        let Ok(meta) = file.metadata() else { return };
        if let Some(entry) = self.table.files.get_mut(rel) {
            // Blocks as the cold side has them after the change: what a longer length adds is
            // a hole there as here. Blocks later writes gave the file since are their events'
            // to model, after their pages (an `Allocate` modelled here came before them, and
            // the cold side zeroed blocks the writes then overwrote).
            if meta.len() > entry.len {
                entry.allocated = false;
            }
            let allocated = entry.allocated;
            self.scan_range_as(rel, file, &meta, (edge, 0), allocated);
        } else if edge == 0 {
            self.model_new_file(rel, crate::replicated::pages::Attrs::of(&meta));
        } else {
            // (a file the table lost: compared in full)
            self.scan_range(rel, file, &meta, 0, meta.len());
        }
    }

    /// Whether `rel` or anything below it was read from the disk for an event, or by a walk,
    /// since the queue was last empty.
    fn read_ahead_at(&self, rel: &str) -> bool {
        let below = format!("{rel}/");
        self.walked
            || self.read_ahead.contains(rel)
            || self
                .read_ahead
                .range::<str, _>((
                    std::ops::Bound::Included(below.as_str()),
                    std::ops::Bound::Unbounded,
                ))
                .next()
                .is_some_and(|k| k.starts_with(&below))
    }

    /// A write's event handled on the FUSE thread that made it ([`super::InlineScan`]), whose
    /// path was just found to name the written file (`meta`): what [`Scanner::fs_event`] does
    /// for it while connected, where no pre-hash or record is kept once the comparison is done.
    pub(super) fn wrote_now(
        &mut self,
        rel: &str,
        file: &fs::File,
        meta: &fs::Metadata,
        offset: u64,
        len: u64,
    ) {
        debug_assert!(self.connected && self.prehash.is_empty() && self.record.is_empty());
        self.handled += 1;
        self.scan_range(rel, file, meta, offset, len);
    }

    /// "Moved from" events whose pair did not come in time: moved out of the tree, so gone.
    pub(super) fn expire_renames(&mut self) {
        let now = Instant::now();
        let (old, keep): (Vec<_>, Vec<_>) = self
            .pending_from
            .drain(..)
            .partition(|(_, _, t)| now.duration_since(*t) >= RENAME_PAIR_WAIT);
        self.pending_from = keep;
        for (_, p, _) in old {
            self.check_path(&p);
        }
    }

    /// A rename inside the tree: moves the table's entries and sends the rename, after the
    /// data the file had under its old name (the watch capture's events; the write path's
    /// are [`Scanner::rename_exact`]'s).
    pub(super) fn rename(&mut self, from: &str, to: &str) {
        if self.exact_events {
            return self.rename_exact(from, to);
        }
        if !self.beneath(to) {
            // `to` is below a directory that is gone or moved since (the watcher names a
            // moved directory's entries by its old name until it hears of the move): the
            // cold side would make its parents, unknown to the table and never removed.
            // `from` is gone from here; where it went has an event of its own
            self.check_path(from);
            return self.check_path(to);
        }
        // the cold side makes missing parents of `to`: the table must know them
        self.ensure_parents(to);
        let is_dir = fs::symlink_metadata(self.root.join(to))
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if let Some(state) = self.table.files.get(from).cloned().filter(|_| !is_dir) {
            self.rename_file(from, to, state);
        } else if self.table.dirs.contains_key(from) && is_dir {
            self.rename_dir(from, to);
        } else if let Some(link) = self.table.links.get(from).cloned() {
            // moved as it is; check_path then sends what differs (a retarget)
            self.clear_target(to, false);
            self.forget_target(to);
            self.table.links.remove(from);
            self.table.links.insert(to.to_owned(), link);
            self.push(Op::Rename {
                from: from.to_owned(),
                to: to.to_owned(),
            });
            self.check_path(to);
        } else {
            self.check_path(from);
            self.check_path(to);
        }
    }

    /// A rename on the write path, decided by the table alone: the call succeeded, so at
    /// this point of the stream `from` was what the table has there and `to`'s parents were
    /// directories, whatever the disk holds by now (reading it for the kind of entry at `to`
    /// found what later calls put there: a directory renamed on and another made in its
    /// place was taken for a replacement, and the cold side kept the old one's entries).
    /// Where the table's entry was read from the disk ahead of this rename, or is missing
    /// (lost to such a reading), `to` is noted for [`Scanner::reconcile_renamed`].
    fn rename_exact(&mut self, from: &str, to: &str) {
        if self.read_ahead_at(from) || !self.known(from) {
            self.renamed.insert(to.to_owned());
            self.read_ahead.insert(to.to_owned());
        }
        if let Some(state) = self.table.files.get(from).cloned() {
            self.ensure_parents(to);
            self.rename_file(from, to, state);
        } else if self.table.dirs.contains_key(from) {
            self.ensure_parents(to);
            self.rename_dir(from, to);
        } else if let Some(link) = self.table.links.remove(from) {
            // moved as it is: every later change to it is an event of its own
            self.ensure_parents(to);
            self.clear_target(to, false);
            self.forget_target(to);
            self.table.links.insert(to.to_owned(), link);
            self.push(Op::Rename {
                from: from.to_owned(),
                to: to.to_owned(),
            });
        }
    }

    /// Whether the table has an entry (file, directory or symlink) at `rel`.
    fn known(&self, rel: &str) -> bool {
        self.table.files.contains_key(rel)
            || self.table.dirs.contains_key(rel)
            || self.table.links.contains_key(rel)
    }

    /// Sends the file's changes under its old name first (read from its new name), then the
    /// rename: the cold side never has `to` without the data written to `from`. A file already
    /// gone from `to` (renamed on again: a chain) is removed under both names instead.
    fn rename_file(&mut self, from: &str, to: &str, state: FileState) {
        self.clear_target(to, false);
        self.forget_target(to);
        let cursor = self.cursors.remove(from);
        self.table.files.remove(from);
        if self.exact_events {
            self.table.files.insert(to.to_owned(), state);
            // the write path reports every call in order: each write before the rename was
            // handled before this event, so the table has `from` as the rename found it, and
            // writes after it come as events under `to`. Nothing to read here; scanning `to`
            // would send those later writes twice, and a scan long enough to flush part of
            // itself before the rename would have the whole file resent
            if self.dirty.remove(from) {
                self.dirty.insert(to.to_owned());
            }
            return self.send_rename(from, to, cursor);
        }
        self.table.files.insert(to.to_owned(), state.clone());
        let (first, flushes) = (self.ops.len(), self.flushes);
        self.scan_file(to, true);
        if !self.table.files.contains_key(to) {
            // not a file at `to` any more (a symlink, or gone): what the scan sent is for `to`
            // itself, and the cold side's `from` goes
            self.seen.remove(from);
            self.push(Op::Remove {
                path: from.to_owned(),
            });
            return;
        }
        if self.flushes != flushes {
            // part of the scan went out under `to` before the rename (to the file the rename
            // replaces): after the rename the cold side has `from` as the table had it, so
            // that is the model, and the file is hashed in full again (not from its cursor),
            // by the next rescan too: that scan's metadata vouches for nothing it sent
            if let Some(entry) = self.table.files.get_mut(to) {
                *entry = state;
                self.seen.remove(to);
                self.dirty.insert(to.to_owned());
            }
        } else {
            // what scan_file just emitted for `to` belongs under `from`: the rename follows
            for op in &mut self.ops[first..] {
                match op {
                    Op::SetFile { path, .. }
                    | Op::Write { path, .. }
                    | Op::SetAttrs { path, .. }
                    | Op::Allocate { path, .. }
                        if path == to =>
                    {
                        *path = from.to_owned()
                    }
                    _ => {}
                }
            }
        }
        self.send_rename(from, to, cursor);
    }

    /// On the write path, at a quiet point: brings every path where a rename put an entry
    /// read from the disk since the last quiet point (and everything below it) in line with
    /// the disk, files compared in full. An event is handled after its call, and reading the
    /// disk for it (a create's `check_path`) may find what later calls left there: a file
    /// swapped in through a temporary name, whose later renames then move that reading on as
    /// if it were the entry they move. A rename of what only events built reads nothing.
    ///
    /// A quiet point: no event queued, and no call that changes the tree in flight (the FUSE
    /// capture's namespace lock free), so the disk is where the events handled left it. Not
    /// quiet: the marks stay, and the loop comes back within [`super::RENAME_POLL`].
    pub(super) fn reconcile_renamed(&mut self) {
        if !self.connected {
            // (the next connection's comparison reads everything)
            self.renamed.clear();
            self.read_ahead.clear();
            self.walked = false;
            return;
        }
        if self.renamed.is_empty() && self.read_ahead.is_empty() && !self.walked {
            return;
        }
        let lock = self.namespace.clone();
        // (a call in flight: its event follows, and the loop comes back soon)
        let _quiet = match lock.as_deref().map(std::sync::RwLock::try_read) {
            None => None,
            Some(Ok(g)) => Some(g),
            Some(Err(std::sync::TryLockError::Poisoned(g))) => Some(g.into_inner()),
            Some(Err(std::sync::TryLockError::WouldBlock)) => return,
        };
        if self.fs_rx.as_ref().is_some_and(|rx| !rx.is_empty()) {
            return;
        }
        for rel in std::mem::take(&mut self.renamed) {
            self.reconcile(&rel);
            self.flush_if_full();
        }
        self.read_ahead.clear();
        self.walked = false;
    }

    /// `rel` and everything below it as the disk has them now.
    fn reconcile(&mut self, rel: &str) {
        let on_disk = self
            .beneath(rel)
            .then(|| fs::symlink_metadata(self.root.join(rel)).ok())
            .flatten();
        let Some(m) = on_disk else {
            // (gone since, by a later rename whose event found it: nothing to remove twice)
            if self.known(rel) {
                self.remove(rel);
            }
            return;
        };
        match m {
            m if m.is_file() => {
                self.open_files.forget(rel);
                self.scan_file(rel, true);
            }
            m if m.is_dir() => {
                self.scan_dir_attrs(rel, &m);
                let Some(names) = super::scan::sorted_names(&self.root.join(rel)) else {
                    return;
                };
                // what the table has below `rel` and the disk does not
                let prefix = format!("{rel}/");
                let listed = |k: &str| {
                    let name = k[prefix.len()..].split('/').next().unwrap_or_default();
                    names.binary_search_by(|n| n.as_str().cmp(name)).is_ok()
                };
                let gone: Vec<String> = keys_below(&self.table.files, &prefix)
                    .chain(keys_below(&self.table.dirs, &prefix))
                    .chain(keys_below(&self.table.links, &prefix))
                    .filter(|k| !listed(k))
                    .cloned()
                    .collect();
                for g in gone {
                    // (not again below a directory found gone just before)
                    if self.known(&g) {
                        self.check_path(&g);
                    }
                }
                for name in names {
                    self.reconcile(&format!("{rel}/{name}"));
                }
            }
            _ => self.check_path(rel),
        }
    }

    /// A directory's own entry (its attributes), replacing a file or symlink the table has.
    fn scan_dir_attrs(&mut self, rel: &str, meta: &fs::Metadata) {
        self.ensure_parents(rel);
        self.model_dir(rel, crate::replicated::pages::Attrs::of(meta));
    }

    /// The file's rename, its changes under `from` already queued: its append cursor moves
    /// with it.
    fn send_rename(&mut self, from: &str, to: &str, cursor: Option<usize>) {
        self.seen.remove(from);
        if let Some(c) = cursor {
            self.cursors.insert(to.to_owned(), c);
        }
        self.push(Op::Rename {
            from: from.to_owned(),
            to: to.to_owned(),
        });
    }

    /// Removes what the table has at `to` that the cold side's rename could not replace: a
    /// directory (a file or symlink is renamed onto it), or anything but an empty directory
    /// (a directory is). The rename succeeded here, so it is stale: its removal's event, or
    /// the rename that emptied it, is still queued (a swap through a temporary name whose
    /// events are read after all three renames leaves the table's `a` with b's files).
    fn clear_target(&mut self, to: &str, dir: bool) {
        let stale = if dir {
            let below = format!("{to}/");
            self.table.files.contains_key(to)
                || self.table.links.contains_key(to)
                || keys_below(&self.table.files, &below).next().is_some()
                || keys_below(&self.table.dirs, &below).next().is_some()
                || keys_below(&self.table.links, &below).next().is_some()
        } else {
            self.table.dirs.contains_key(to)
        };
        if stale {
            self.remove(to);
        }
    }

    /// A rename replaces a file or symlink at `to` on the cold side as it did here: the table
    /// forgets it without queueing a removal.
    fn forget_target(&mut self, to: &str) {
        self.table.files.remove(to);
        self.table.links.remove(to);
        self.seen.remove(to);
        self.cursors.remove(to);
    }

    /// Moves every table entry below `from` (files, directories and symlinks) to `to`, sends
    /// the rename, then scans `to` for whatever changed inside it (not on the write path,
    /// where every change inside it before the rename was an event handled before this one,
    /// and every change after it is an event still to come: a scan would read ahead of them).
    fn rename_dir(&mut self, from: &str, to: &str) {
        self.clear_target(to, true);
        let pf = format!("{from}/");
        let moved = |k: &str| -> String {
            if k == from {
                to.to_owned()
            } else {
                format!("{to}/{}", &k[pf.len()..])
            }
        };
        move_keys(&mut self.table.files, &pf, None, moved);
        move_keys(&mut self.table.dirs, &pf, Some(from), moved);
        move_keys(&mut self.table.links, &pf, None, moved);
        // a dirty file keeps its mark: the dirty pass reads it under its new name
        let dirty: Vec<String> = self
            .dirty
            .range::<str, _>((
                std::ops::Bound::Included(pf.as_str()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|k| k.starts_with(&pf))
            .cloned()
            .collect();
        for k in dirty {
            self.dirty.remove(&k);
            self.dirty.insert(moved(&k));
        }
        self.seen.clear();
        self.cursors.clear();
        self.push(Op::Rename {
            from: from.to_owned(),
            to: to.to_owned(),
        });
        if !self.exact_events {
            self.scan_dir(to);
        }
    }
}

/// Moves the keys of `map` that start with `prefix` (and `exact`, if given) to `moved(key)`.
fn move_keys<V>(
    map: &mut std::collections::BTreeMap<String, V>,
    prefix: &str,
    exact: Option<&str>,
    moved: impl Fn(&str) -> String,
) {
    let keys: Vec<String> = map
        .keys()
        .filter(|k| k.starts_with(prefix) || exact == Some(k.as_str()))
        .cloned()
        .collect();
    for k in keys {
        let v = map.remove(&k).expect("listed");
        map.insert(moved(&k), v);
    }
}
