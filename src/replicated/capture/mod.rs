//! Capture, the first step of the hot side: the FUSE mount (`fuse/`, the default) or [`watch`]
//! (inotify) feeds a bounded channel of events, and the scanner thread (here) turns events
//! into ordered [`Op`]s, flushed as batches to the network task
//! ([`crate::replicated::stream`]).
//!
//! The scanner's table is a model of the **cold side's** disk. On every connection the cold
//! side sends its index; the table becomes that index ([`ScanMsg::Resync`]), and a full scan
//! sends exactly what differs. Initial sync, catching up after either side restarts, and
//! resyncing an old hot after a promotion are therefore the same code. With the FUSE capture
//! the scanner hashes the tree while the cold side builds that index (`prehash.rs`), and the
//! full scan reads only the pages the pre-hash cannot prove equal to it; when this agent stayed
//! up across the disconnection, the pre-hash reads only the pages written through the mount
//! since the last comparison (`record.rs`).
//!
//! Detection, cheapest first (`events.rs` reads the events, `scan.rs` hashes a file,
//! `rescan.rs` walks the tree):
//! - an event on a file scans a window from the page where the file last changed, forward
//!   until two unchanged pages: a journal append costs a page or two of hashing, not the file;
//!   a file that grew is scanned at least to its new end (it may have been written anywhere
//!   in the part it gained);
//! - a rename first sends every change of the file under its old name (a full scan of that
//!   one file), then the rename, so `x` never exists on the cold side without `x.tmp`'s data;
//! - an event whose window did not compare every page marks the file dirty: an event says
//!   "modified", not where, and a write that began before the window may have changed pages
//!   there while rewriting the window's first page with the bytes it had; dirty files are
//!   hashed in full every half `rescan_interval_ms` (so the window gives the latency, the
//!   dirty pass the certainty);
//! - every `rescan_interval_ms`, dirty files and files whose size, mtime, ctime (a chmod or
//!   chown), inode or allocation changed are hashed in full (random in-place writes, anything
//!   events missed),
//!   and directories and symlinks whose attributes or target differ from the table are sent;
//! - owners, modes and allocation travel with the entry (`SetAttrs`, `Allocate`); a symlink
//!   is sent as its target text (`Symlink`) and never followed;
//!   With the FUSE capture, whose events are the calls themselves, this rescan does not run;
//! - every `deep_rescan_interval_ms`, and on an event-queue overflow, everything is hashed;
//!   overflows coalesce into one rescan, and events during a rescan are folded into it
//!   (`fold.rs`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, SendError, Sender, TryRecvError};
use tokio::sync::mpsc;

use crate::daemon::protocol::VERIFY_TIMEOUT;
use crate::replicated::ops::{DigestPart, Op, Outgoing, ScanMsg, VerifyReport};
use crate::replicated::pages::{
    page_hash, BufPool, DigestCompare, FileCache, PageHash, ReadBuf, TreeIndex, READ_PAGES,
};
use crate::replicated::stats::SenderStats;

/// The last metadata seen for a file after hashing it in full (see [`Stamp`](crate::replicated::pages::Stamp)).
use crate::replicated::pages::Stamp as Seen;

mod events;
mod fold;
pub mod fuse;
mod paged;
mod prehash;
mod record;
mod rescan;
mod scan;
pub mod watch;

#[cfg(test)]
mod fold_tests;
#[cfg(test)]
mod tests;

use fold::WalkPos;
use watch::{FsEvent, Limit, Watches};

/// Encoded bytes (page data, checksums, paths) per batch before it is sent: an eighth of the
/// frame limit, so a batch always fits one frame.
pub const BATCH_DATA_BYTES: usize = 1 << 20;

/// Read buffers the scanner keeps once the pages sent from them are acknowledged (a read's
/// worth each, [`READ_PAGES`] pages): enough to go on reading while the window drains.
const SHARED_READS_KEPT: usize = 4;
/// How long a lone "moved from" event waits for its "moved to" before it counts as a delete.
pub const RENAME_PAIR_WAIT: Duration = Duration::from_millis(50);
/// How often the scanner looks for expired "moved from" events while some are waiting.
const RENAME_POLL: Duration = Duration::from_millis(2);
/// A file modified this recently is rehashed by every rescan (timestamps are coarse).
pub const RACY_WINDOW: Duration = Duration::from_millis(100);
/// Parts of the cold side's digest waiting for the scanner's comparison during `verify`
/// (each at most [`crate::replicated::wire::DIGEST_CHUNK_BYTES`] on the wire).
const VERIFY_PARTS_QUEUE: usize = 2;
/// On the write path, how long the scanner lets further writes gather after one that followed
/// the previous send this closely, before sending them together: under a steady stream of
/// small writes each send (and each wake-up of the scanner and the network task) then carries
/// several, at the price of at most this much added lag. A sync is never held back.
pub const COALESCE_WINDOW: Duration = Duration::from_millis(1);

/// Bytes an op adds to a batch frame beyond its paths and data: type, lengths, offsets,
/// modes, with room for a few more fields.
const OP_OVERHEAD_BYTES: usize = 64;
// a batch is sent once its ops' bound reaches BATCH_DATA_BYTES: no batch has more ops than
// the cold side accepts
// (the op that reaches it included)
const _: () =
    assert!(BATCH_DATA_BYTES / OP_OVERHEAD_BYTES < crate::replicated::wire::MAX_BATCH_OPS);

/// Requests to the scanner thread ([`ScanMsg`]). Each is followed by a [`FsEvent::Nudge`] on
/// the event channel, the one channel the scanner waits on. (Waiting on both with `select!`
/// cost every event a second wake-up: the woken scanner unregistered from both channels and
/// blocked on the waker lock that the event's sender still held.) Dropping the last handle
/// nudges too, so the scanner sees its requests end at once.
#[derive(Debug, Clone)]
pub struct ScanControl(Arc<ControlInner>);

#[derive(Debug)]
struct ControlInner {
    ctl: Option<Sender<ScanMsg>>,
    nudge: Sender<FsEvent>,
}

impl ScanControl {
    /// The handle for requests on `ctl` to the scanner reading `events`.
    pub fn new(ctl: Sender<ScanMsg>, events: Sender<FsEvent>) -> ScanControl {
        ScanControl(Arc::new(ControlInner {
            ctl: Some(ctl),
            nudge: events,
        }))
    }

    /// Queues `msg` (waiting while the request queue is full) and wakes the scanner; an error
    /// when the scanner has stopped.
    pub fn send(&self, msg: ScanMsg) -> Result<(), SendError<ScanMsg>> {
        match &self.0.ctl {
            Some(ctl) => ctl.send(msg)?,
            None => return Err(SendError(msg)),
        }
        self.0.nudge_scanner();
        Ok(())
    }
}

impl ControlInner {
    fn nudge_scanner(&self) {
        // a full event queue wakes the scanner anyway
        let _ = self.nudge.try_send(FsEvent::Nudge);
    }
}

impl Drop for ControlInner {
    fn drop(&mut self) {
        drop(self.ctl.take());
        self.nudge_scanner();
    }
}

/// A write's event of at most this many bytes may be handled on the FUSE thread that made it
/// ([`InlineScan`]): hashing 64 KiB takes some 40 us here. A larger write is queued, so the
/// scanner hashes it while the writer goes on.
pub const INLINE_WRITE_BYTES: u64 = 64 * 1024;

/// The scanner as the FUSE threads see it with durable acks: a small write's event handled at
/// once on the FUSE thread that made it, when the scanner thread has nothing in hand and no
/// event is queued ahead of it. The scanner thread's wake-up was one of the hops on a durable
/// sync's path (FUSE thread, scanner, network task, cold side, back): on this project's VMs,
/// where each costs tens of microseconds, the largest part of the sync's wait that was ours.
///
/// Order holds: the event takes the number after the last one the scanner handled, and only
/// when no other event has been counted (so none is queued or in the scanner's hands, see
/// [`crate::replicated::ack_watch::AckWatch::count_handled_now`]); the scanner's lock is held
/// from that check to the flush, and the passthrough's ordering lock (shared, as for every
/// data call) keeps namespace changes out meanwhile. Handling it now is what the scanner
/// thread would have done had it been awake; otherwise the event is queued as always.
///
/// The scanner thread owns the scanner; this holds it weakly, so the scanner (and its channel
/// to the network task) still ends with its thread.
#[derive(Clone)]
pub struct InlineScan {
    scanner: Weak<Mutex<Scanner>>,
    nudge: Sender<FsEvent>,
}

impl std::fmt::Debug for InlineScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlineScan").finish_non_exhaustive()
    }
}

impl InlineScan {
    /// Handles `ev` now, counted and flushed, when it is a write of at most
    /// [`INLINE_WRITE_BYTES`], the scanner is free (see the type's doc) and the network task's
    /// channel has room for its batch; gives it back to be queued otherwise (with the channel
    /// full, the event queue then gives the node its usual slack before writes block). Never
    /// waits for the scanner thread or the network task.
    pub fn try_handle(&self, ev: FsEvent) -> Result<(), FsEvent> {
        let FsEvent::Wrote {
            path,
            file,
            offset,
            len,
        } = &ev
        else {
            return Err(ev);
        };
        if *len > INLINE_WRITE_BYTES {
            return Err(ev);
        }
        let Some(scanner) = self.scanner.upgrade() else {
            return Err(ev);
        };
        let Ok(mut s) = scanner.try_lock() else {
            return Err(ev);
        };
        // Only the write's own pages, in one batch, with room for it: the FUSE thread never
        // blocks, nor hashes a whole file, while it holds the scanner. (A file the table
        // lacks is compared in full: the scanner thread's work.) The call holds the
        // ordering lock, so `path` names `file`: the path is not looked at.
        if !s.idle_for_inline() || s.out.capacity() == 0 || !s.table.files.contains_key(path) {
            return Err(ev);
        }
        let Ok(meta) = file.metadata() else {
            return Err(ev);
        };
        let handled = s.handled;
        if !s
            .stats
            .as_ref()
            .is_some_and(|st| st.acks.count_handled_now(handled))
        {
            return Err(ev);
        }
        let wake = s.next_wake();
        s.wrote_now(path, file, &meta, *offset, *len);
        s.flush();
        s.publish_flushed();
        let sooner = s.next_wake() < wake;
        drop(s);
        if sooner {
            // the scanner thread waits until its old deadline: wake it to take the new one
            let _ = self.nudge.try_send(FsEvent::Nudge);
        }
        Ok(())
    }
}

/// A bound on the bytes `op` takes in a batch frame (its page data, page checksums, paths and
/// fields), for sizing batches and the buffer a batch is encoded into.
pub(crate) fn wire_bytes(op: &Op) -> usize {
    OP_OVERHEAD_BYTES
        + match op {
            Op::Write {
                path, data, hashes, ..
            } => path.len() + data.len() + hashes.len() * 32,
            Op::Rename { from, to } => from.len() + to.len(),
            Op::Symlink { path, target } => path.len() + target.len(),
            Op::Mkdir { path, .. }
            | Op::SetFile { path, .. }
            | Op::SetAttrs { path, .. }
            | Op::Allocate { path, .. }
            | Op::Remove { path } => path.len(),
            Op::Barrier { .. } => 0,
        }
}

/// What the scanner needs to know.
#[derive(Debug, Clone)]
pub(crate) struct ScanConfig {
    /// The data directory.
    pub(crate) root: PathBuf,
    /// Replication unit.
    pub(crate) page_size: usize,
    /// Changed-file rescan period.
    pub(crate) rescan: Duration,
    /// Full rehash period.
    pub(crate) deep_rescan: Duration,
}

/// The scanner thread's state: the table (the cold side's disk as it will be once every op
/// sent so far is applied), what it knows of each file, and the ops not yet flushed.
pub(crate) struct Scanner {
    root: PathBuf,
    page_size: usize,
    zero_hash: PageHash,
    out: mpsc::Sender<Outgoing>,
    stats: Option<Arc<SenderStats>>,
    table: TreeIndex,
    seen: HashMap<String, Seen>,
    cursors: HashMap<String, usize>,
    gen: u64,
    connected: bool,
    ops: Vec<Op>,
    /// Write-path events: the `Allocate`s modelled this round, queued after the round's
    /// other writes (see [`Scanner::push`]).
    allocations: Vec<Op>,
    data: usize,
    /// Batches flushed so far (a rename tells by it whether its scan went out in part).
    flushes: u64,
    /// When the last batch went to the network task (see [`COALESCE_WINDOW`]).
    last_send: Instant,
    /// "Moved from" events waiting for their "moved to": tracker, path, when.
    pending_from: Vec<(usize, String, Instant)>,
    rescan: Duration,
    deep_rescan: Duration,
    next_rescan: Instant,
    next_deep: Instant,
    verify_id: u64,
    buf: ReadBuf,
    /// Where `buf` is replaced from when a read's pages are sent from it (`scan.rs`).
    pool: BufPool,
    /// Whether the comparison after a connection runs: its progress goes to the tracker
    /// (`SenderStats::sync`).
    tracking: bool,
    /// Files with an event whose append window did not see every page (a write may have
    /// changed pages before it): rehashed in full every half rescan interval, not only at the
    /// next rescan.
    dirty: BTreeSet<String>,
    next_dirty: Instant,
    /// On the write path, where renames put entries: brought in line with the disk once the
    /// events queued are handled ([`Scanner::reconcile_renamed`]).
    renamed: BTreeSet<String>,
    /// On the write path, the paths read from the disk for an event since the queue was last
    /// empty: what a rename of one of them moves may be what later calls left there.
    read_ahead: BTreeSet<String>,
    /// On the write path, a walk (the comparison after a connection, the deep rescan, `verify`,
    /// `drain`) read the disk since the queue was last empty: its events wait behind the walk,
    /// which may have read what they made, so until then every rename is as one of a path in
    /// [`Scanner::read_ahead`].
    walked: bool,
    /// On the write path, the FUSE capture's namespace lock (held by every call that changes
    /// the tree, with its event sent): held for reading, nothing is in flight.
    namespace: Option<Arc<RwLock<()>>>,
    /// Files kept open for window scans; dropped on any create, rename or remove event for
    /// the path.
    open_files: FileCache,
    /// The event channel, read during walks too (`fold.rs`).
    fs_rx: Option<Receiver<FsEvent>>,
    /// The control channel, looked at during the pre-hash (the index ends it).
    ctl_rx: Option<Receiver<ScanMsg>>,
    /// The hot tree's pages hashed while the cold side indexed its own (`prehash.rs`).
    prehash: prehash::Prehashes,
    /// Pages the comparison after a connection did not read again: the pre-hash had proven
    /// them equal to the index.
    proven_pages: u64,
    /// What the last finished comparison learned of the hot tree's pages, kept while
    /// disconnected with the pages written since marked dirty (`record.rs`).
    record: record::Record,
    /// Whether this connection's comparison (`resync()`'s full scan) finished: only then is
    /// a record kept when it drops.
    compared: bool,
    /// What the last pre-hash did (files from the record, pages read).
    prehash_counts: record::PrehashCounts,
    /// The events are the write path's (FUSE): each is the change itself and keeps its
    /// place behind a walk (a sync must follow what came before it), so none is folded.
    exact_events: bool,
    /// Write-path events with async acks: a steady stream is sent in [`COALESCE_WINDOW`]s.
    coalesce: bool,
    /// Events handled so far (every kind, in the order queued): with durable acks each flush
    /// publishes it for the syncs waiting ([`crate::replicated::ack_watch`]).
    handled: u64,
    /// The watch thread; `None` in unit tests that deliver events by hand.
    watches: Option<Watches>,
    /// Whether the watch set must be rebuilt before the next walk (at start, after lost
    /// events, while a limit keeps directories unwatched).
    watch_stale: bool,
    /// The limit reached at the last rebuild, logged once.
    watch_limit: Option<Limit>,
    /// The last other failure to watch, logged once.
    watch_error: Option<String>,
    /// When an incomplete watch set is rebuilt again.
    next_limit_retry: Instant,
    /// Why a rescan is due (lost events); one rescan serves every request before it starts.
    rescan_due: Option<String>,
    /// Lost-event notices since the last rescan started, and rescans run for lost events.
    overflows: u64,
    rescans: u64,
    /// The walk in progress, for folding events into it.
    walk: Option<WalkPos>,
    /// Runs at each look at the event channel during a walk (tests make changes there).
    #[cfg(test)]
    fold_hook: Option<Box<dyn FnMut() + Send>>,
    /// Runs before each read of a file's pages (tests make changes there).
    #[cfg(test)]
    read_hook: Option<Box<dyn FnMut() + Send>>,
}

impl Scanner {
    pub(crate) fn new(cfg: &ScanConfig, out: mpsc::Sender<Outgoing>) -> Self {
        let now = Instant::now();
        Scanner {
            root: cfg.root.clone(),
            page_size: cfg.page_size,
            zero_hash: page_hash(&vec![0u8; cfg.page_size]),
            out,
            stats: None,
            table: TreeIndex::default(),
            seen: HashMap::new(),
            cursors: HashMap::new(),
            gen: 0,
            connected: false,
            ops: Vec::new(),
            allocations: Vec::new(),
            data: 0,
            flushes: 0,
            last_send: Instant::now(),
            pending_from: Vec::new(),
            rescan: cfg.rescan,
            deep_rescan: cfg.deep_rescan,
            next_rescan: now + cfg.rescan,
            next_deep: now + cfg.deep_rescan,
            verify_id: 0,
            buf: ReadBuf::with_len(cfg.page_size * READ_PAGES),
            pool: BufPool::new(SHARED_READS_KEPT, cfg.page_size * READ_PAGES),
            tracking: false,
            dirty: BTreeSet::new(),
            renamed: BTreeSet::new(),
            read_ahead: BTreeSet::new(),
            walked: false,
            namespace: None,
            next_dirty: now + cfg.rescan / 2,
            open_files: FileCache::default(),
            fs_rx: None,
            ctl_rx: None,
            prehash: prehash::Prehashes::default(),
            proven_pages: 0,
            record: record::Record::default(),
            compared: false,
            prehash_counts: record::PrehashCounts::default(),
            exact_events: false,
            coalesce: false,
            handled: 0,
            watches: None,
            watch_stale: true,
            watch_limit: None,
            watch_error: None,
            next_limit_retry: now,
            rescan_due: None,
            overflows: 0,
            rescans: 0,
            walk: None,
            #[cfg(test)]
            fold_hook: None,
            #[cfg(test)]
            read_hook: None,
        }
    }

    /// The watch thread whose watch set the scanner rebuilds before walks after lost events.
    pub(crate) fn with_watches(mut self, watches: Watches) -> Self {
        self.watches = Some(watches);
        self
    }

    /// Takes its events from the write path (the FUSE capture): no watches, and events wait
    /// for a walk to end instead of being folded into it. With `coalesce` (async acks), a
    /// steady stream of writes is sent at most once per [`COALESCE_WINDOW`].
    pub(crate) fn with_exact_events(mut self, coalesce: bool) -> Self {
        self.exact_events = true;
        self.coalesce = coalesce;
        self.namespace = Some(Arc::new(RwLock::new(())));
        self
    }

    /// The lock the FUSE capture holds for writing around each call that changes the tree
    /// and its event (write-path events only).
    pub(crate) fn namespace_lock(&self) -> Option<Arc<RwLock<()>>> {
        self.namespace.clone()
    }

    /// Starts the scanner thread: it reads `fs_rx` and `ctl_rx` until told to stop.
    pub(crate) fn spawn(
        self,
        stats: Arc<SenderStats>,
        fs_rx: Receiver<FsEvent>,
        ctl_rx: Receiver<ScanMsg>,
    ) -> std::thread::JoinHandle<()> {
        self.spawn_sharing(stats, fs_rx, ctl_rx, None).0
    }

    /// As [`Scanner::spawn`]; with durable acks on the write path and `nudge` (a sender on the
    /// event channel), also the handle through which the FUSE threads handle a small write's
    /// event themselves while the scanner has nothing in hand ([`InlineScan`]).
    pub(crate) fn spawn_sharing(
        mut self,
        stats: Arc<SenderStats>,
        fs_rx: Receiver<FsEvent>,
        ctl_rx: Receiver<ScanMsg>,
        nudge: Option<Sender<FsEvent>>,
    ) -> (std::thread::JoinHandle<()>, Option<InlineScan>) {
        self.stats = Some(stats);
        self.fs_rx = Some(fs_rx.clone());
        self.ctl_rx = Some(ctl_rx.clone());
        let inline_ok = self.exact_events && !self.coalesce;
        let shared = Arc::new(Mutex::new(self));
        let inline = nudge.filter(|_| inline_ok).map(|nudge| InlineScan {
            scanner: Arc::downgrade(&shared),
            nudge,
        });
        let thread = std::thread::Builder::new()
            .name("scanner".into())
            .spawn(move || Scanner::run(&shared, &fs_rx, &ctl_rx))
            .expect("spawn the scanner thread");
        (thread, inline)
    }

    /// The loop waits on the event channel alone and reads requests after each wake-up (a
    /// request comes with a [`FsEvent::Nudge`]): see [`ScanControl`]. It holds the scanner
    /// while it works, not while it waits (see [`InlineScan`]).
    fn run(shared: &Mutex<Scanner>, fs_rx: &Receiver<FsEvent>, ctl_rx: &Receiver<ScanMsg>) {
        // (a panic while handling an event, here or on a FUSE thread, poisons the scanner: the
        // thread ends, as a panic here always ended it)
        let Ok(first) = shared.lock() else { return };
        let mut wait = first.next_wake();
        drop(first);
        // (with async acks, while the stream is steady: when to look for the next writes)
        let mut poll_at: Option<Instant> = None;
        loop {
            let got = match poll_at {
                None => fs_rx.recv_timeout(wait.saturating_duration_since(Instant::now())),
                Some(at) => {
                    // Sleep out the window instead of waking for the first write in it: the
                    // writes that came meanwhile go in one send, and at 2000 writes a second
                    // the scanner wakes once per window instead of once per write, and
                    // never spins or yields in the channel's wait.
                    let at = at.min(wait);
                    std::thread::sleep(at.saturating_duration_since(Instant::now()));
                    fs_rx.try_recv().map_err(|e| match e {
                        TryRecvError::Empty => RecvTimeoutError::Timeout,
                        TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
                    })
                }
            };
            let Ok(mut s) = shared.lock() else { return };
            let handled = s.handled;
            match got {
                Ok(FsEvent::Nudge) | Err(RecvTimeoutError::Timeout) => {}
                Ok(ev) => {
                    // writes following the last send this closely are a steady stream
                    let dense =
                        poll_at.is_none() && s.coalesce && s.last_send.elapsed() < COALESCE_WINDOW;
                    s.fs_event(ev);
                    // take whatever else is already queued, then send once
                    s.drain_events(fs_rx);
                    if dense && !s.ops.is_empty() {
                        // let the next writes join this send, one window after the last
                        // (never with inline handling, so holding the scanner is harmless)
                        let due = s.last_send + COALESCE_WINDOW;
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                        s.drain_events(fs_rx);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
            // (after the events, or on the wake-up a reading still marked asked for)
            s.reconcile_renamed();
            loop {
                match ctl_rx.try_recv() {
                    Ok(ScanMsg::Stop) | Err(TryRecvError::Disconnected) => return,
                    Ok(msg) => s.control(msg),
                    Err(TryRecvError::Empty) => break,
                }
            }
            s.expire_renames();
            s.rescan_if_due();
            s.timers();
            s.flush();
            s.publish_flushed();
            wait = s.next_wake();
            // several writes in this round: a steady stream, so wait out the next window
            // before looking again; a round of one or none goes back to waiting on the channel
            poll_at = (s.coalesce && s.handled.saturating_sub(handled) >= 2)
                .then(|| s.last_send + COALESCE_WINDOW);
        }
    }

    /// Whether a write's event may be handled on a FUSE thread now: write-path events with
    /// durable acks, connected and compared, nothing unsent.
    fn idle_for_inline(&self) -> bool {
        self.exact_events
            && !self.coalesce
            && self.connected
            && self.compared
            && self.walk.is_none()
            && self.ops.is_empty()
            && self.allocations.is_empty()
            && self.renamed.is_empty()
    }

    /// With durable acks (write-path events, not coalesced): tells the syncs waiting how many
    /// events the batches emitted so far on this connection carry. Only once its comparison is
    /// done: before, the connection's index is not yet answered.
    fn publish_flushed(&self) {
        if !self.exact_events || self.coalesce || !self.connected || !self.compared {
            return;
        }
        if let Some(st) = &self.stats {
            let seq = st.emitted.load(Ordering::Acquire);
            st.acks.flushed(self.gen, self.handled, seq);
        }
    }

    /// Handles the events already queued, sending whenever a batch is full.
    fn drain_events(&mut self, fs_rx: &Receiver<FsEvent>) {
        while let Ok(ev) = fs_rx.try_recv() {
            self.fs_event(ev);
            self.flush_if_full();
        }
    }

    /// When the loop must wake up without an event: the next rescan (deep only, on the write
    /// path), the next pass over dirty files, or soon while a "moved from" waits for its pair.
    fn next_wake(&self) -> Instant {
        let mut wake = if !self.pending_from.is_empty()
            || !self.renamed.is_empty()
            || !self.read_ahead.is_empty()
            || self.walked
        {
            Instant::now() + RENAME_POLL
        } else if self.exact_events {
            self.next_deep
        } else {
            self.next_rescan
        };
        if !self.dirty.is_empty() {
            wake = wake.min(self.next_dirty);
        }
        wake
    }

    /// The periodic work: deep rescan, rescan, dirty files.
    fn timers(&mut self) {
        let now = Instant::now();
        if now >= self.next_deep {
            self.next_deep = now + self.deep_rescan;
            self.next_rescan = now + self.rescan;
            self.full_scan(true);
        } else if now >= self.next_rescan && !self.exact_events {
            // (on the write path every change is an event: only the deep rescan runs, a safety
            // net for writes that bypass the mount)
            self.next_rescan = now + self.rescan;
            self.full_scan(false);
        }
        if now >= self.next_dirty {
            self.next_dirty = now + self.rescan / 2;
            self.rehash_dirty();
        }
    }

    /// Hashes in full the files whose events the append window could not explain.
    fn rehash_dirty(&mut self) {
        for rel in std::mem::take(&mut self.dirty) {
            if self.exact_events {
                // (read now: ahead of the events queued, as `check_path` reads)
                self.read_ahead.insert(rel.clone());
            }
            self.scan_file(&rel, true);
            self.flush_if_full();
        }
    }

    fn control(&mut self, msg: ScanMsg) {
        match msg {
            ScanMsg::Prehash => self.prehash(),
            ScanMsg::Resync { gen, index } => self.resync(gen, index),
            ScanMsg::Disconnected => {
                // (read after any resync() running when the connection dropped has finished)
                self.keep_record();
                self.connected = false;
                self.tracking = false;
                self.ops.clear();
                self.allocations.clear();
                self.data = 0;
            }
            ScanMsg::Verify(reply) => self.verify(reply),
            ScanMsg::Drain(reply) => {
                if !self.connected {
                    let _ = reply.send(Err("not connected to the cold side".into()));
                    return;
                }
                self.full_scan(true);
                // a follow-up for events lost during that walk goes before the marker
                self.rescan_if_due();
                self.flush();
                let _ = self.out.blocking_send(Outgoing::Drain {
                    gen: self.gen,
                    reply,
                });
            }
            ScanMsg::Stop => {}
        }
    }

    /// A new connection: its index becomes the table, and a full scan sends what differs.
    fn resync(&mut self, gen: u64, index: TreeIndex) {
        self.gen = gen;
        self.connected = true;
        self.compared = false;
        // the pre-hash, the record's one use, is over
        self.record.clear();
        self.table = index;
        self.seen.clear();
        self.cursors.clear();
        // the events that would have closed them were dropped while disconnected: a path
        // may name another file by now, which a window must not read through the old one
        self.open_files.clear();
        // (the comparison below reads everything, and marks that it did)
        self.renamed.clear();
        self.read_ahead.clear();
        self.walked = false;
        self.ops.clear();
        self.allocations.clear();
        self.data = 0;
        if let Some(st) = &self.stats {
            st.emitted.store(0, Ordering::Release);
            st.initial_done.store(false, Ordering::Release);
        }
        let empty = self.table.files.is_empty()
            && self.table.dirs.is_empty()
            && self.table.links.is_empty();
        self.proven_pages = 0;
        self.full_scan_with_progress(empty);
        if self.proven_pages > 0 {
            tracing::info!(
                pages = self.proven_pages,
                "the comparison did not read again the pages the pre-hash proved equal"
            );
        }
        self.prehash.clear();
        self.compared = true;
        if let Some(st) = &self.stats {
            let emitted = st.emitted.load(Ordering::Acquire);
            st.resync_batches.store(emitted, Ordering::Release);
            st.initial_done.store(true, Ordering::Release);
        }
    }

    /// Sends everything, then a barrier; compares the cold side's digest at the barrier with
    /// the table as its parts arrive, and answers. Events wait meanwhile: the table must stay
    /// as it was at the barrier, and it is never copied (the cold side applies nothing else
    /// while it walks its tree for the digest either).
    fn verify(&mut self, reply: Sender<Result<VerifyReport, String>>) {
        if !self.connected {
            let _ = reply.send(Err("not connected to the cold side".into()));
            return;
        }
        self.full_scan(true);
        self.rescan_if_due();
        self.flush();
        // register the verify before the barrier goes out: the cold side's digest
        // can come back before the network task would otherwise see the registration
        self.verify_id += 1;
        let (parts_tx, parts) = crossbeam_channel::bounded(VERIFY_PARTS_QUEUE);
        let out = Outgoing::Verify {
            gen: self.gen,
            id: self.verify_id,
            parts: parts_tx,
        };
        let _ = self.out.blocking_send(out);
        self.push(Op::Barrier { id: self.verify_id });
        self.flush();
        let _ = reply.send(self.compare_with_cold(&parts));
    }

    /// Merges the cold digest's parts, in path order, with the table's entries.
    fn compare_with_cold(&self, parts: &Receiver<DigestPart>) -> Result<VerifyReport, String> {
        let deadline = Instant::now() + VERIFY_TIMEOUT;
        let mut cmp = DigestCompare::new(&self.table);
        loop {
            match parts.recv_deadline(deadline) {
                Ok(part) => {
                    cmp.feed(part.files)?;
                    if let Some(root) = part.root {
                        return Ok(VerifyReport::new(cmp.finish(), root));
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "the cold side sent no digest within {VERIFY_TIMEOUT:?}"
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("the connection to the cold side changed during verify".into())
                }
            }
        }
    }

    /// The path relative to the root, `None` for the root itself or anything outside it.
    fn rel(&self, p: &Path) -> Option<String> {
        let rel = p.strip_prefix(&self.root).ok()?;
        let s = rel.to_str()?;
        (!s.is_empty()).then(|| s.to_owned())
    }

    /// Adds an op to the batch; a batch that reaches [`BATCH_DATA_BYTES`] of encoded ops
    /// (page data, or metadata alone: 200,000 files to create) is sent at once, so no batch
    /// comes near the frame limit whatever the number of files.
    ///
    /// On the write path a file's `Allocate` waits for the end of the round of events (the
    /// next [`Scanner::flush`]), with only writes let past it: the events of a file filled
    /// before the scanner read them each find it allocated, and the cold side, given the
    /// allocation after the first write, zeroed the blocks the others then overwrote. Any
    /// other op (a length, a rename, a removal) goes after it, as it was modelled.
    fn push(&mut self, op: Op) {
        if self.exact_events {
            match op {
                Op::Allocate { .. } => return self.allocations.push(op),
                Op::Write { .. } => {}
                _ => self.push_allocations(),
            }
        }
        self.push_now(op);
    }

    /// Queues the allocations held back (see [`Scanner::push`]).
    fn push_allocations(&mut self) {
        for op in std::mem::take(&mut self.allocations) {
            self.push_now(op);
        }
    }

    fn push_now(&mut self, op: Op) {
        if self.ops.is_empty() {
            self.change_found();
        }
        self.data += wire_bytes(&op);
        self.ops.push(op);
        self.flush_if_full();
    }

    /// Sends the ops so far as one batch, the allocations held back last.
    fn flush(&mut self) {
        self.push_allocations();
        self.send_batch();
    }

    /// Sends the ops so far as one batch.
    fn send_batch(&mut self) {
        if self.ops.is_empty() || !self.connected {
            return;
        }
        let ops = std::mem::take(&mut self.ops);
        if tracing::enabled!(tracing::Level::TRACE) {
            let ops: Vec<String> = ops.iter().map(Op::describe).collect();
            tracing::trace!(gen = self.gen, ?ops, "batch");
        }
        self.data = 0;
        self.flushes += 1;
        self.last_send = Instant::now();
        if let Some(st) = &self.stats {
            let batch = st.emitted.fetch_add(1, Ordering::AcqRel) + 1;
            if self.tracking {
                st.sync.emitted(batch);
            }
        }
        let _ = self
            .out
            .blocking_send(Outgoing::Batch { gen: self.gen, ops });
    }

    /// Sends the ops so far once they make a batch's worth of bytes.
    fn flush_if_full(&mut self) {
        if self.data >= BATCH_DATA_BYTES {
            self.send_batch();
        }
    }
}
