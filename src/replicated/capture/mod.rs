//! Capture, the first step of the hot side: [`watch`] turns inotify into a bounded channel of
//! events, and the scanner thread (here) turns events into ordered [`Op`]s, flushed as batches
//! to the network task ([`crate::replicated::stream`]).
//!
//! The scanner's table is a model of the **cold side's** disk. On every connection the cold
//! side sends its index; the table becomes that index ([`ScanMsg::Resync`]), and a full scan
//! sends exactly what differs. Initial sync, catching up after either side restarts, and
//! resyncing an old hot after a promotion are therefore the same code.
//!
//! Detection, cheapest first (`events.rs` reads the events, `scan.rs` hashes a file,
//! `rescan.rs` walks the tree):
//! - an event on a file scans a window from the page where the file last changed, forward
//!   until two unchanged pages: a journal append costs a page or two of hashing, not the file;
//!   a file that grew is scanned at least to its new end (it may have been written anywhere
//!   in the part it gained);
//! - a rename first sends every change of the file under its old name (a full scan of that
//!   one file), then the rename, so `x` never exists on the cold side without `x.tmp`'s data;
//! - an event whose window found nothing (a write elsewhere in the file), or whose window's
//!   first page changed (a write that may have begun before it), marks the file dirty; dirty
//!   files are hashed in full every half `rescan_interval_ms`;
//! - every `rescan_interval_ms`, files whose size, mtime, ctime (a chmod or chown), inode or
//!   allocation changed are hashed in full (random in-place writes, anything events missed),
//!   and directories and symlinks whose attributes or target differ from the table are sent;
//! - owners, modes and allocation travel with the entry (`SetAttrs`, `Allocate`); a symlink
//!   is sent as its target text (`Symlink`) and never followed;
//! - every `deep_rescan_interval_ms`, and on an event-queue overflow, everything is hashed.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use tokio::sync::mpsc;

use crate::replicated::ops::{Op, Outgoing, ScanMsg, VerifyReport};
use crate::replicated::pages::{page_hash, FileCache, PageHash, TreeIndex, READ_PAGES};
use crate::replicated::stats::SenderStats;

mod events;
pub mod fuse;
mod rescan;
mod scan;
pub mod watch;

#[cfg(test)]
mod tests;

use watch::FsEvent;

/// Encoded bytes (page data, checksums, paths) per batch before it is sent: an eighth of the
/// frame limit, so a batch always fits one frame.
pub const BATCH_DATA_BYTES: usize = 1 << 20;
/// How long a lone "moved from" event waits for its "moved to" before it counts as a delete.
pub const RENAME_PAIR_WAIT: Duration = Duration::from_millis(50);
/// How often the scanner looks for expired "moved from" events while some are waiting.
const RENAME_POLL: Duration = Duration::from_millis(2);
/// A file modified this recently is rehashed by every rescan (timestamps are coarse).
pub const RACY_WINDOW: Duration = Duration::from_millis(100);
/// How often initial-sync progress is logged.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Bytes an op adds to a batch frame beyond its paths and data: type, lengths, offsets,
/// modes, with room for a few more fields.
const OP_OVERHEAD_BYTES: usize = 64;

/// A bound on the bytes `op` takes in a batch frame (its page data, page checksums, paths and
/// fields), for sizing batches.
fn wire_bytes(op: &Op) -> usize {
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

/// The last metadata seen for a file after hashing it in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    blocks: u64,
}

impl Seen {
    fn of(m: &fs::Metadata) -> Seen {
        Seen {
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            ino: m.ino(),
            blocks: m.blocks(),
        }
    }
}

/// Initial-sync progress.
struct Progress {
    files_total: u64,
    bytes_total: u64,
    files_done: u64,
    bytes_done: u64,
    started: Instant,
    last_log: Instant,
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
    data: usize,
    /// Batches flushed so far (a rename tells by it whether its scan went out in part).
    flushes: u64,
    /// "Moved from" events waiting for their "moved to": tracker, path, when.
    pending_from: Vec<(usize, String, Instant)>,
    rescan: Duration,
    deep_rescan: Duration,
    next_rescan: Instant,
    next_deep: Instant,
    verify_id: u64,
    buf: Vec<u8>,
    progress: Option<Progress>,
    /// Files with an event that the append window did not explain (a write elsewhere in the
    /// file): rehashed in full every half rescan interval, not only at the next rescan.
    dirty: BTreeSet<String>,
    next_dirty: Instant,
    /// Files kept open for window scans; dropped on any create, rename or remove event for
    /// the path.
    open_files: FileCache,
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
            data: 0,
            flushes: 0,
            pending_from: Vec::new(),
            rescan: cfg.rescan,
            deep_rescan: cfg.deep_rescan,
            next_rescan: now + cfg.rescan,
            next_deep: now + cfg.deep_rescan,
            verify_id: 0,
            buf: vec![0u8; cfg.page_size * READ_PAGES],
            progress: None,
            dirty: BTreeSet::new(),
            next_dirty: now + cfg.rescan / 2,
            open_files: FileCache::default(),
        }
    }

    /// Starts the scanner thread: it reads `fs_rx` and `ctl_rx` until told to stop.
    pub(crate) fn spawn(
        mut self,
        stats: Arc<SenderStats>,
        fs_rx: Receiver<FsEvent>,
        ctl_rx: Receiver<ScanMsg>,
    ) -> std::thread::JoinHandle<()> {
        self.stats = Some(stats);
        std::thread::Builder::new()
            .name("scanner".into())
            .spawn(move || self.run(fs_rx, ctl_rx))
            .expect("spawn the scanner thread")
    }

    fn run(&mut self, fs_rx: Receiver<FsEvent>, ctl_rx: Receiver<ScanMsg>) {
        loop {
            select! {
                recv(fs_rx) -> ev => {
                    let Ok(ev) = ev else { return };
                    self.fs_event(ev);
                    // take whatever else is already queued, then send once
                    while let Ok(ev) = fs_rx.try_recv() {
                        self.fs_event(ev);
                        self.flush_if_full();
                    }
                }
                recv(ctl_rx) -> msg => match msg {
                    Ok(ScanMsg::Stop) | Err(_) => return,
                    Ok(msg) => self.control(msg),
                },
                default(self.next_wake().saturating_duration_since(Instant::now())) => {}
            }
            self.expire_renames();
            self.timers();
            self.flush();
        }
    }

    /// When the loop must wake up without an event: the next rescan, the next pass over
    /// dirty files, or soon while a "moved from" waits for its pair.
    fn next_wake(&self) -> Instant {
        let mut wake = if self.pending_from.is_empty() {
            self.next_rescan
        } else {
            Instant::now() + RENAME_POLL
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
        } else if now >= self.next_rescan {
            self.next_rescan = now + self.rescan;
            self.dirty.clear();
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
            self.scan_file(&rel, true);
            self.flush_if_full();
        }
    }

    fn control(&mut self, msg: ScanMsg) {
        match msg {
            ScanMsg::Resync { gen, index } => self.resync(gen, index),
            ScanMsg::Disconnected => {
                self.connected = false;
                self.ops.clear();
                self.data = 0;
            }
            ScanMsg::Verify(reply) => self.verify(reply),
            ScanMsg::Drain(reply) => {
                if !self.connected {
                    let _ = reply.send(Err("not connected to the cold side".into()));
                    return;
                }
                self.full_scan(true);
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
        self.table = index;
        self.seen.clear();
        self.cursors.clear();
        self.ops.clear();
        self.data = 0;
        if let Some(st) = &self.stats {
            st.emitted.store(0, Ordering::Release);
            st.initial_done.store(false, Ordering::Release);
        }
        tracing::info!(
            files = self.table.files.len(),
            "cold index received; sending what differs"
        );
        self.full_scan_with_progress();
        self.flush();
        if let Some(st) = &self.stats {
            st.initial_done.store(true, Ordering::Release);
        }
    }

    /// Sends everything, then a barrier whose digest the network task compares with ours.
    fn verify(&mut self, reply: Sender<Result<VerifyReport, String>>) {
        if !self.connected {
            let _ = reply.send(Err("not connected to the cold side".into()));
            return;
        }
        self.full_scan(true);
        self.flush();
        // register the verify before the barrier goes out: the cold side's digest
        // can come back before the network task would otherwise see the registration
        self.verify_id += 1;
        let out = Outgoing::Verify {
            gen: self.gen,
            id: self.verify_id,
            hot: self.table.clone(),
            reply,
        };
        let _ = self.out.blocking_send(out);
        self.push(Op::Barrier { id: self.verify_id });
        self.flush();
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
    fn push(&mut self, op: Op) {
        self.data += wire_bytes(&op);
        self.ops.push(op);
        self.flush_if_full();
    }

    /// Sends the ops so far as one batch.
    fn flush(&mut self) {
        if self.ops.is_empty() || !self.connected {
            return;
        }
        let ops = std::mem::take(&mut self.ops);
        self.data = 0;
        self.flushes += 1;
        if let Some(st) = &self.stats {
            st.emitted.fetch_add(1, Ordering::AcqRel);
        }
        let _ = self
            .out
            .blocking_send(Outgoing::Batch { gen: self.gen, ops });
    }

    /// Sends the ops so far once they make a batch's worth of bytes.
    fn flush_if_full(&mut self) {
        if self.data >= BATCH_DATA_BYTES {
            self.flush();
        }
    }
}
