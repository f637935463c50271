//! Walking the whole tree: the periodic rescan (files whose metadata changed since their
//! last full hash), the deep rescan and the comparison after a connection (every file), with
//! that comparison's progress for `status` and the log. What the table has and the walk did
//! not find is removed.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use crate::daemon::protocol::SyncPhase;
use crate::replicated::capture::fold::{WalkPos, FOLD_EVERY};
use crate::replicated::capture::scan::{keys_below, sorted_names};
use crate::replicated::capture::{Scanner, Seen};
use crate::replicated::pages::Attrs;
use crate::replicated::progress::Counts;

impl Scanner {
    /// Walks the tree: files whose metadata changed since their last full hash (all files when
    /// `deep`) are hashed in full; what is gone is removed. The watch set is rebuilt first if
    /// events were lost; events arriving during the walk are folded into it (`fold.rs`).
    pub(super) fn full_scan(&mut self, deep: bool) {
        if !self.connected {
            return;
        }
        self.ensure_watches();
        if deep {
            // this walk starts after every loss notice read so far: it covers them
            self.rescan_due = None;
        }
        self.walk = Some(WalkPos::start());
        self.walk(deep);
        self.finish_walk();
        // on the write path the events during the walk were not folded into it: they wait,
        // and the walk may have read what they made (a file renamed on and another made in
        // its place): their renames are reconciled at the next quiet point
        self.walked |= self.exact_events;
    }

    /// Scans every directory whose attributes the table does not have, every symlink, and
    /// every file that may have changed; removes, directory by directory, what the table has
    /// and the listing lacks (so that no set of every path is ever built).
    fn walk(&mut self, deep: bool) {
        let mut stack = vec![String::new()];
        let mut since_fold = 0;
        while let Some(rel) = stack.pop() {
            self.fold_events();
            let dir = if rel.is_empty() {
                self.root.clone()
            } else {
                self.root.join(&rel)
            };
            let w = self.walk.get_or_insert_with(WalkPos::start);
            w.pending.remove(&rel);
            w.names = Vec::new();
            // gone, or no longer a directory, since its parent was listed: a symlink is not
            // listed (read_dir would follow it out of the tree)
            let real = |s: &Self| {
                rel.is_empty()
                    || (s.beneath(&rel) && fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()))
            };
            let Some(names) = real(self).then(|| sorted_names(&dir)).flatten() else {
                if !real(self) {
                    self.remove(&rel);
                }
                continue;
            };
            self.remove_gone(&rel, &names);
            // the names live in the walk's position, where folding looks them up
            let w = self.walk.get_or_insert_with(WalkPos::start);
            w.dir.clone_from(&rel);
            w.names = names;
            w.next = 0;
            let count = w.names.len();
            for i in 0..count {
                since_fold += 1;
                if since_fold >= FOLD_EVERY {
                    since_fold = 0;
                    self.fold_events();
                }
                let Some(w) = &mut self.walk else { break };
                w.next = i + 1;
                let name = &w.names[i];
                let child = if rel.is_empty() {
                    name.clone()
                } else {
                    format!("{rel}/{name}")
                };
                if let Some(sub) = self.walk_entry(&child, deep) {
                    if let Some(w) = &mut self.walk {
                        w.pending.insert(sub.clone());
                    }
                    stack.push(sub);
                }
            }
        }
    }

    /// One entry of the walk; a directory to list later is returned. An entry that went
    /// away between the listing and now is removed (its event, if folded into this walk, was
    /// dropped because the walk was still to read it).
    fn walk_entry(&mut self, child: &str, deep: bool) -> Option<String> {
        let Ok(meta) = fs::symlink_metadata(self.root.join(child)) else {
            self.remove(child);
            return None;
        };
        if meta.is_dir() {
            let attrs = Attrs::of(&meta);
            if self.table.dirs.get(child) != Some(&attrs) {
                self.ensure_parents(child);
                self.model_dir(child, attrs);
            }
            return Some(child.to_owned());
        }
        if meta.file_type().is_symlink() {
            // scan_link compares target and owner with the table
            self.scan_link(child, &meta);
        } else if meta.is_file() {
            // a dirty file is hashed whatever its metadata says: its window left pages
            // unexplained, and the walk stands for the dirty pass
            let dirty = self.dirty.remove(child);
            let unchanged = !deep
                && !dirty
                && self.seen.get(child) == Some(&Seen::of(&meta))
                && self.table.files.contains_key(child);
            if !unchanged {
                self.scan_file(child, true);
            }
            self.flush_if_full();
        }
        None
    }

    /// Removes what the table has in directory `dir` whose name there its sorted listing
    /// `names` lacks: directories first, with everything below them, then files and symlinks
    /// (below a directory the table lacks too, in a table that has one, at their own path).
    fn remove_gone(&mut self, dir: &str, names: &[String]) {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let listed = |name: &str| names.binary_search_by(|n| n.as_str().cmp(name)).is_ok();
        let mut gone: Vec<String> = Vec::new();
        gone.extend(gone_children(&self.table.dirs, &prefix, listed));
        gone.extend(gone_children(&self.table.files, &prefix, listed));
        gone.extend(gone_children(&self.table.links, &prefix, listed));
        for path in gone {
            self.remove(&path);
        }
    }

    /// The full scan after a (re)connection (`initial`: against an empty copy), its last
    /// batch emitted, with its progress in the tracker (`SenderStats::sync`): `status`, the
    /// metrics and the log follow it.
    pub(super) fn full_scan_with_progress(&mut self, initial: bool) {
        if let Some(st) = &self.stats {
            let phase = if initial {
                SyncPhase::Initial
            } else {
                SyncPhase::Resync
            };
            st.sync.start(phase, walk_sizes(&self.root));
            self.tracking = true;
        }
        self.full_scan(true);
        self.flush();
        if self.tracking {
            self.tracking = false;
            if let Some(st) = &self.stats {
                st.sync.compare_finished();
            }
        }
    }

    /// The comparison after a connection covered `bytes` more and finished `files` more files.
    pub(super) fn compared(&self, bytes: u64, files: u64) {
        if let Some(st) = self.stats.as_ref().filter(|_| self.tracking) {
            st.sync.compared(bytes, files);
        }
    }

    /// The comparison after a connection found something to send (the tracker keeps the
    /// first one of each batch).
    pub(super) fn change_found(&self) {
        if let Some(st) = self.stats.as_ref().filter(|_| self.tracking) {
            st.sync.change_found();
        }
    }
}

/// The paths in `map` below `prefix` (a directory and `/`, or empty for the root) whose
/// name in that directory (their first component below it) is not `listed`: the entries of
/// `prefix` and below are one range of the map.
fn gone_children<V>(
    map: &BTreeMap<String, V>,
    prefix: &str,
    listed: impl Fn(&str) -> bool,
) -> Vec<String> {
    keys_below(map, prefix)
        .filter(|path| {
            let below = &path[prefix.len()..];
            !listed(below.split('/').next().unwrap_or(below))
        })
        .cloned()
        .collect()
}

/// Files and bytes under `root`, for the progress of the comparison after a connection.
fn walk_sizes(root: &Path) -> Counts {
    let (mut files, mut total) = (0, 0);
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                files += 1;
                total += m.len();
            }
        }
    }
    Counts {
        bytes: total,
        files,
    }
}
