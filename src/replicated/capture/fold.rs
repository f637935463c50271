//! Lost events lead to one rescan, not a storm. An overflow (or a watcher error) only marks a
//! rescan due; however many arrive before it starts, one deep rescan runs, and the watch set
//! is rebuilt once, before its walk ([`Scanner::ensure_watches`]).
//!
//! While a walk runs, the scanner keeps reading the event channel (every [`FOLD_EVERY`]
//! entries), so notify's thread never blocks on it and the kernel's queue does not overflow
//! again because of the walk. Each event read is **folded** into the walk:
//! - if the walk will still read every path it names (a strict ancestor is a directory found
//!   and not yet listed, or the path or an ancestor is in the listing being walked and not yet
//!   reached), the walk sees the change: the event is dropped;
//! - otherwise (the walk passed it, or it is new in a directory already listed) it is kept and
//!   replayed through the usual event handling once the walk is over;
//! - an overflow read during the walk, or more kept events than [`FOLD_MAX_EVENTS`], cannot be
//!   vouched for: exactly one follow-up rescan is marked due (events lost before the overflow
//!   was read are covered by a walk that starts after it), and the kept events are dropped.
//!
//! So an event during a rescan is either covered by its walk, replayed after it, or covered
//! by the one follow-up; nothing is missed and rescans do not pile up.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crossbeam_channel::select;
use notify::EventKind;

use crate::replicated::capture::watch::{limit_message, FsEvent, Limit, WatchFailure, EVENT_QUEUE};
use crate::replicated::capture::Scanner;

/// Entries a walk visits between two looks at the event channel.
pub(super) const FOLD_EVERY: usize = 256;
/// Events kept for replay after a walk; beyond this a follow-up rescan covers them.
pub(super) const FOLD_MAX_EVENTS: usize = 16_384;
/// How long a rebuild of the watch set may take before the walk starts without it.
pub(super) const REBUILD_WAIT: Duration = Duration::from_secs(60);
/// How often a watch set that a limit (or an error) left incomplete is rebuilt again, unless
/// events are lost meanwhile: a rebuild stats every entry of the tree.
pub(super) const LIMIT_RETRY: Duration = Duration::from_secs(60);

/// Where a walk is, for deciding whether it will still see a path.
#[derive(Debug, Default)]
pub(super) struct WalkPos {
    /// Directories found and not yet listed.
    pub(super) pending: HashSet<String>,
    /// The directory being listed ("" for the root) and its names, sorted.
    pub(super) dir: String,
    pub(super) names: Vec<String>,
    /// `names[next..]` are not yet visited.
    pub(super) next: usize,
    /// Events the walk cannot vouch for, replayed after it.
    kept: Vec<notify::Event>,
    /// Why one more rescan must follow this walk.
    follow_up: Option<String>,
    /// Events dropped because the walk covers them.
    pub(super) folded: u64,
}

impl WalkPos {
    /// A walk about to list the root.
    pub(super) fn start() -> WalkPos {
        WalkPos {
            pending: HashSet::from([String::new()]),
            ..WalkPos::default()
        }
    }

    /// Whether the walk will still read `rel` (relative, not empty) after now.
    pub(super) fn covers(&self, rel: &str) -> bool {
        if self.pending.contains("") {
            return true;
        }
        let mut a = rel;
        loop {
            let (parent, name) = a.rsplit_once('/').unwrap_or(("", a));
            if a != rel && self.pending.contains(a) {
                return true;
            }
            if parent == self.dir
                && self
                    .names
                    .get(self.next..)
                    .is_some_and(|rest| rest.binary_search_by(|n| n.as_str().cmp(name)).is_ok())
            {
                return true;
            }
            if parent.is_empty() {
                return false;
            }
            a = parent;
        }
    }
}

impl Scanner {
    /// Marks a rescan due (folded with any already due); the watch set is rebuilt before it.
    pub(super) fn request_rescan(&mut self, why: String) {
        self.overflows += 1;
        self.watch_stale = true;
        // the lost events may have made a path name another file: a window must not read
        // it through the handle kept for the old one
        self.open_files.clear();
        tracing::debug!(reason = %why, "events lost; a rescan is due");
        self.rescan_due.get_or_insert(why);
    }

    /// Runs the rescan that lost events asked for, once for all of them.
    pub(super) fn rescan_if_due(&mut self) {
        let Some(why) = self.rescan_due.clone() else {
            return;
        };
        if !self.connected {
            // the connection's own full scan will cover it
            self.rescan_due = None;
            return;
        }
        self.rescans += 1;
        let started = Instant::now();
        tracing::warn!(
            reason = %why,
            overflows = self.overflows,
            rescan = self.rescans,
            "events were lost; rescanning everything once (events arriving meanwhile are folded in)"
        );
        self.overflows = 0;
        self.full_scan(true);
        tracing::info!(
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            follow_up = self.rescan_due.is_some(),
            "rescan after lost events done"
        );
    }

    /// Reads what is queued on the event channel into the running walk.
    pub(super) fn fold_events(&mut self) {
        #[cfg(test)]
        if let Some(hook) = &mut self.fold_hook {
            hook();
        }
        if self.exact_events {
            return;
        }
        let Some(rx) = self.fs_rx.clone() else { return };
        for _ in 0..EVENT_QUEUE {
            let Ok(ev) = rx.try_recv() else { break };
            self.fold(ev);
        }
    }

    fn fold(&mut self, ev: FsEvent) {
        let e = match ev {
            FsEvent::Rescan(why) => {
                self.overflows += 1;
                self.watch_stale = true;
                if let Some(w) = &mut self.walk {
                    if !w.pending.contains("") {
                        w.follow_up.get_or_insert(why);
                    }
                }
                return;
            }
            FsEvent::WatchLimit => return self.watch_limit_hit(),
            FsEvent::Event(e) => e,
            // the write path's events are never folded (`exact_events`); were one here, it
            // is the change itself and is applied where it stands
            exact => return self.fs_event(exact),
        };
        if matches!(e.kind, EventKind::Access(_)) {
            return; // ignored by the event handling too
        }
        let rels: Vec<String> = e.paths.iter().filter_map(|p| self.rel(p)).collect();
        let Some(w) = &mut self.walk else { return };
        if w.follow_up.is_some() || rels.iter().all(|r| w.covers(r)) {
            w.folded += 1;
        } else if w.kept.len() >= FOLD_MAX_EVENTS {
            w.kept = Vec::new();
            w.follow_up = Some(format!(
                "more than {FOLD_MAX_EVENTS} events arrived behind the rescan's walk"
            ));
        } else {
            w.kept.push(e);
        }
    }

    /// After a walk: replays the events it could not vouch for, or marks the one follow-up.
    pub(super) fn finish_walk(&mut self) {
        let Some(w) = self.walk.take() else { return };
        tracing::debug!(
            folded = w.folded,
            kept = w.kept.len(),
            follow_up = w.follow_up.is_some(),
            "events during the walk"
        );
        if let Some(why) = w.follow_up {
            self.rescan_due.get_or_insert(why);
            self.watch_stale = true;
            return;
        }
        for e in w.kept {
            self.fs_event(FsEvent::Event(e));
            self.flush_if_full();
        }
    }

    /// Before a walk that follows lost events: rebuilds the watch set, reading (and dropping:
    /// the walk that follows covers them) events meanwhile, so notify's thread can answer.
    pub(super) fn ensure_watches(&mut self) {
        if !self.watch_stale {
            return;
        }
        let incomplete = self.watch_limit.is_some() || self.watch_error.is_some();
        if incomplete && self.rescan_due.is_none() && Instant::now() < self.next_limit_retry {
            return;
        }
        let Some(reply) = self.watches.as_ref().and_then(|w| w.rebuild()) else {
            return;
        };
        let fs_rx = self.fs_rx.clone().unwrap_or_else(crossbeam_channel::never);
        let deadline = Instant::now() + REBUILD_WAIT;
        let outcome = loop {
            select! {
                recv(reply) -> r => break r.ok(),
                recv(fs_rx) -> ev => match ev {
                    Ok(FsEvent::WatchLimit) => self.watch_limit_hit(),
                    Ok(FsEvent::Rescan(why)) => self.request_rescan(why),
                    Ok(FsEvent::Event(_)) => {}
                    // only watch mode rebuilds watches; the write path's events are kept
                    Ok(exact) => self.fs_event(exact),
                    Err(_) => break None,
                },
                default(deadline.saturating_duration_since(Instant::now())) => break None,
            }
        };
        self.next_limit_retry = Instant::now() + LIMIT_RETRY;
        match outcome {
            Some(Ok(())) => {
                self.watch_stale = false;
                if self.watch_limit.take().is_some() || self.watch_error.take().is_some() {
                    tracing::info!("every directory is watched again");
                    self.set_status_limit(None);
                }
            }
            Some(Err(WatchFailure::Limit(l))) => self.note_limit(l),
            Some(Err(WatchFailure::Other(e))) => {
                if self.watch_error.as_ref() != Some(&e) {
                    tracing::warn!(
                        retry_s = LIMIT_RETRY.as_secs(),
                        "cannot watch the data directory: {e}; periodic rescans find changes meanwhile"
                    );
                    self.watch_error = Some(e);
                }
            }
            None => tracing::warn!(
                wait_s = REBUILD_WAIT.as_secs(),
                "the watch set was not rebuilt in time; walking without it"
            ),
        }
    }

    /// notify could not watch a new directory: the limit is reached.
    pub(super) fn watch_limit_hit(&mut self) {
        self.watch_stale = true;
        self.note_limit(Limit::Watches);
    }

    /// Logs a reached limit once (until a rebuild watches everything again); the watch set is
    /// rebuilt again every [`LIMIT_RETRY`], in case the limit was raised.
    fn note_limit(&mut self, limit: Limit) {
        self.watch_stale = true;
        if self.watch_limit == Some(limit) {
            return;
        }
        self.watch_limit = Some(limit);
        let msg = limit_message(limit, limit.current(), count_dirs(&self.root), self.rescan);
        tracing::error!(sysctl = limit.sysctl(), "{msg}");
        self.set_status_limit(Some(msg));
    }

    fn set_status_limit(&self, msg: Option<String>) {
        if let Some(st) = &self.stats {
            *st.watch_limit.lock().expect("watch limit lock") = msg;
        }
    }
}

/// Directories under `root`, itself included (each needs one watch).
fn count_dirs(root: &std::path::Path) -> u64 {
    let mut n = 0;
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        n += 1;
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::WalkPos;

    fn at(dir: &str, names: &[&str], next: usize, pending: &[&str]) -> WalkPos {
        WalkPos {
            pending: pending.iter().map(|s| (*s).to_owned()).collect(),
            dir: dir.to_owned(),
            names: names.iter().map(|s| (*s).to_owned()).collect(),
            next,
            ..WalkPos::default()
        }
    }

    #[test]
    fn a_walk_covers_what_it_will_still_read() {
        // before the root is listed, everything
        assert!(WalkPos::start().covers("a/b/c"));
        // listing "d" (names a, b, c), "b" next; "e" and "x/y" found and not yet listed
        let w = at("d", &["a", "b", "c"], 1, &["e", "x/y"]);
        assert!(!w.covers("d/a"), "visited");
        assert!(w.covers("d/b") && w.covers("d/c"), "in the listing, ahead");
        assert!(w.covers("d/c/deep/file"), "below an entry ahead");
        assert!(!w.covers("d/new"), "created after the listing");
        assert!(!w.covers("d/a/file"), "below a visited entry");
        assert!(
            w.covers("e/f") && w.covers("x/y/z/w"),
            "below a pending directory"
        );
        assert!(
            !w.covers("e"),
            "a pending directory's own attributes were read"
        );
        assert!(!w.covers("x/z"), "beside a pending directory");
        assert!(!w.covers("top"), "in the root, listed before");
        // listing the root
        let w = at("", &["j", "k"], 1, &[]);
        assert!(!w.covers("j") && w.covers("k") && w.covers("k/l"));
    }
}
