//! The hot side of replication: the scanner thread that turns file-system events into ordered
//! operations, and the network task that sends them to the cold side, keeps the unacknowledged
//! ones for resending, and reconnects.
//!
//! The scanner's table is a model of the **cold side's** disk. On every connection the cold
//! side sends its index; the table becomes that index, and a full scan sends exactly what
//! differs. Initial sync, catching up after either side restarts, and resyncing an old hot
//! after a promotion are therefore the same code.
//!
//! Detection, cheapest first:
//! - an event on a file scans a window from the page where the file last changed, forward
//!   until two unchanged pages: a journal append costs a page or two of hashing, not the file;
//! - a rename first sends every change of the file under its old name (a full scan of that
//!   one file), then the rename, so `x` never exists on the cold side without `x.tmp`'s data;
//! - an event whose window found nothing (a write elsewhere in the file) marks the file dirty;
//!   dirty files are hashed in full every half `rescan_interval_ms`;
//! - every `rescan_interval_ms`, files whose size, mtime, ctime or inode changed are hashed in
//!   full (random in-place writes, anything events missed);
//! - every `deep_rescan_interval_ms`, and on an event-queue overflow, everything is hashed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File};
use std::io;
use std::net::SocketAddr;
#[cfg(test)]
use std::os::unix::fs::FileExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use notify::event::{CreateKind, EventKind, ModifyKind, RemoveKind, RenameMode};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::replicated::channel::{self, Auth};
use crate::replicated::pages::{page_hash, read_full_at, FileState, PageHash, TreeIndex};
use crate::replicated::watch::FsEvent;
use crate::replicated::wire::{Frame, FrameReader, FrameWriter, Op, ProtoError};

/// Page data per batch before it is sent.
pub const BATCH_DATA_BYTES: usize = 1 << 20;
/// Files the scanner keeps open between window scans.
pub const OPEN_FILES: usize = 64;
/// Pages read and hashed per read call.
pub const READ_PAGES: usize = 256;
/// How long a lone "moved from" event waits for its "moved to" before it counts as a delete.
pub const RENAME_PAIR_WAIT: Duration = Duration::from_millis(50);
/// The hot sends a heartbeat after this long without other frames.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Connecting to the cold side gives up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnect pauses grow to this.
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// A file modified this recently is rehashed by every rescan (timestamps are coarse).
pub const RACY_WINDOW: Duration = Duration::from_millis(100);
/// How often initial-sync progress is logged.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Counters the agent reports in `status` and the benchmark reads.
#[derive(Debug, Default)]
pub struct SenderStats {
    /// Whether a cold side is connected and has sent its index.
    pub connected: AtomicBool,
    /// Bytes written to the wire.
    pub wire_bytes: AtomicU64,
    /// Page data bytes sent.
    pub data_bytes: AtomicU64,
    /// Batches sent (resends included).
    pub batches: AtomicU64,
    /// Highest batch acknowledged on the current connection.
    pub acked_seq: AtomicU64,
    /// Highest batch sent on the current connection.
    pub sent_seq: AtomicU64,
    /// Batches rejected by the cold side and resent.
    pub nacks: AtomicU64,
    /// When the last acknowledgement arrived (ms since the Unix epoch), 0 if none.
    pub last_ack_unix_ms: AtomicU64,
    /// Batches the scanner emitted for the current connection.
    pub emitted: AtomicU64,
    /// Whether the full comparison after the current connection's index is done.
    pub initial_done: AtomicBool,
}

impl SenderStats {
    /// Whether the cold side has everything the scanner has seen: the first full comparison is
    /// done, and every batch emitted since was sent and acknowledged.
    pub fn synced(&self) -> bool {
        let emitted = self.emitted.load(Ordering::Acquire);
        self.connected.load(Ordering::Acquire)
            && self.initial_done.load(Ordering::Acquire)
            && self.sent_seq.load(Ordering::Acquire) == emitted
            && self.acked_seq.load(Ordering::Acquire) == emitted
    }
}

/// What the sender tells the agent.
#[derive(Debug, Clone)]
pub enum SenderEvent {
    /// The cold side refused us: its epoch is newer. We must stop being hot.
    Rejected { epoch: u64, reason: String },
}

/// The result of `verify`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// Whether the trees are identical.
    pub identical: bool,
    /// The hot tree's root digest (hex).
    pub hot_root: String,
    /// The cold tree's root digest (hex).
    pub cold_root: String,
    /// Files in the trees.
    pub files: usize,
    /// Files that differ or exist on one side only.
    pub differing: Vec<String>,
}

/// Requests from the agent to the scanner.
#[derive(Debug)]
pub enum ScanMsg {
    /// Compare hot and cold at a barrier in the stream.
    Verify(Sender<Result<VerifyReport, String>>),
    /// Send everything, wait for the acks, send the drained marker.
    Drain(Sender<Result<u64, String>>),
    /// Stop scanning.
    Stop,
    // from the network task:
    #[doc(hidden)]
    Resync { gen: u64, index: TreeIndex },
    #[doc(hidden)]
    Disconnected,
}

enum Outgoing {
    Batch {
        gen: u64,
        ops: Vec<Op>,
    },
    Verify {
        gen: u64,
        id: u64,
        hot: TreeIndex,
        reply: Sender<Result<VerifyReport, String>>,
    },
    Drain {
        gen: u64,
        reply: Sender<Result<u64, String>>,
    },
}

/// What the sender needs to know.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// The data directory.
    pub root: PathBuf,
    /// Replication unit.
    pub page_size: usize,
    /// The cold side's address.
    pub peer: SocketAddr,
    /// How to authenticate.
    pub auth: Auth,
    /// Our holder id, for the cold side's logs.
    pub node: String,
    /// Our epoch.
    pub epoch: u64,
    /// Changed-file rescan period.
    pub rescan: Duration,
    /// Full rehash period.
    pub deep_rescan: Duration,
    /// Unacknowledged page data allowed in flight.
    pub window_bytes: usize,
}

/// A running sender: scanner thread, watcher and network task.
#[derive(Debug)]
pub struct SenderHandle {
    /// Requests to the scanner.
    pub ctl: Sender<ScanMsg>,
    /// Counters.
    pub stats: Arc<SenderStats>,
    /// Events for the agent.
    pub events: Receiver<SenderEvent>,
    stop: tokio::sync::watch::Sender<bool>,
    scanner: Option<std::thread::JoinHandle<()>>,
    _watcher: notify::RecommendedWatcher,
}

impl SenderHandle {
    /// Stops the scanner and the network task and waits for the scanner thread.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        let _ = self.ctl.send(ScanMsg::Stop);
        if let Some(t) = self.scanner.take() {
            let _ = t.join();
        }
    }
}

/// Starts watching, scanning and sending, on `rt` for the network part.
pub fn start(
    cfg: SenderConfig,
    rt: &tokio::runtime::Handle,
) -> Result<SenderHandle, crate::replicated::watch::WatchError> {
    let (fs_tx, fs_rx) = crossbeam_channel::bounded(crate::replicated::watch::EVENT_QUEUE);
    let watcher = crate::replicated::watch::watch(&cfg.root, fs_tx)?;
    let (ctl_tx, ctl_rx) = crossbeam_channel::bounded(64);
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(8);
    let (ev_tx, ev_rx) = crossbeam_channel::bounded(16);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stats = Arc::new(SenderStats::default());
    let mut scanner = Scanner::new(&cfg, out_tx);
    scanner.stats = Some(stats.clone());
    let scanner_thread = std::thread::Builder::new()
        .name("scanner".into())
        .spawn(move || scanner.run(fs_rx, ctl_rx))
        .expect("spawn the scanner thread");
    rt.spawn(run_net(
        cfg,
        out_rx,
        ctl_tx.clone(),
        stats.clone(),
        ev_tx,
        stop_rx,
    ));
    Ok(SenderHandle {
        ctl: ctl_tx,
        stats,
        events: ev_rx,
        stop: stop_tx,
        scanner: Some(scanner_thread),
        _watcher: watcher,
    })
}

// ------------------------------------------------------------------------------- scanner

/// The last metadata seen for a file after hashing it in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
}

impl Seen {
    fn of(m: &fs::Metadata) -> Seen {
        Seen {
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            ino: m.ino(),
        }
    }
}

struct Scanner {
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
    dirty: std::collections::BTreeSet<String>,
    next_dirty: Instant,
    /// Files kept open for window scans (an open per event costs a syscall and an inotify
    /// event of its own); dropped on any create, rename or remove event for the path.
    open_files: HashMap<String, File>,
}

/// Marks a table entry that must be re-sent whatever the content.
const INVALID: PageHash = [0xff; 16];

impl Scanner {
    fn new(cfg: &SenderConfig, out: mpsc::Sender<Outgoing>) -> Self {
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
            pending_from: Vec::new(),
            rescan: cfg.rescan,
            deep_rescan: cfg.deep_rescan,
            next_rescan: now + cfg.rescan,
            next_deep: now + cfg.deep_rescan,
            verify_id: 0,
            buf: vec![0u8; cfg.page_size * READ_PAGES],
            progress: None,
            dirty: std::collections::BTreeSet::new(),
            next_dirty: now + cfg.rescan / 2,
            open_files: HashMap::new(),
        }
    }

    fn run(&mut self, fs_rx: Receiver<FsEvent>, ctl_rx: Receiver<ScanMsg>) {
        loop {
            let mut wake = if self.pending_from.is_empty() {
                self.next_rescan
            } else {
                Instant::now() + Duration::from_millis(2)
            };
            if !self.dirty.is_empty() {
                wake = wake.min(self.next_dirty);
            }
            select! {
                recv(fs_rx) -> ev => {
                    let Ok(ev) = ev else { return };
                    self.fs_event(ev);
                    // take whatever else is already queued, then send once
                    while let Ok(ev) = fs_rx.try_recv() {
                        self.fs_event(ev);
                        if self.data >= BATCH_DATA_BYTES { self.flush(); }
                    }
                }
                recv(ctl_rx) -> msg => match msg {
                    Ok(ScanMsg::Stop) | Err(_) => return,
                    Ok(msg) => self.control(msg),
                },
                default(wake.saturating_duration_since(Instant::now())) => {}
            }
            self.expire_renames();
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
                for rel in std::mem::take(&mut self.dirty) {
                    self.scan_file(&rel, true);
                    if self.data >= BATCH_DATA_BYTES {
                        self.flush();
                    }
                }
            }
            self.flush();
        }
    }

    fn control(&mut self, msg: ScanMsg) {
        match msg {
            ScanMsg::Resync { gen, index } => {
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
            ScanMsg::Disconnected => {
                self.connected = false;
                self.ops.clear();
                self.data = 0;
            }
            ScanMsg::Verify(reply) => {
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

    fn rel(&self, p: &Path) -> Option<String> {
        let rel = p.strip_prefix(&self.root).ok()?;
        let s = rel.to_str()?;
        (!s.is_empty()).then(|| s.to_owned())
    }

    fn fs_event(&mut self, ev: FsEvent) {
        if !self.connected {
            return;
        }
        let ev = match ev {
            FsEvent::Rescan(why) => {
                tracing::warn!("{why}; rescanning everything");
                self.full_scan(true);
                return;
            }
            FsEvent::Event(e) => e,
        };
        tracing::trace!(kind = ?ev.kind, paths = ?ev.paths, "event");
        let tracker = ev.attrs.tracker();
        let paths: Vec<String> = ev.paths.iter().filter_map(|p| self.rel(p)).collect();
        if !matches!(
            ev.kind,
            EventKind::Access(_) | EventKind::Modify(ModifyKind::Data(_))
        ) {
            // the path may now name another file (or a directory, with files below it)
            for p in &paths {
                let prefix = format!("{p}/");
                self.open_files
                    .retain(|k, _| k != p && !k.starts_with(&prefix));
            }
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

    fn expire_renames(&mut self) {
        let now = Instant::now();
        let (old, keep): (Vec<_>, Vec<_>) = self
            .pending_from
            .drain(..)
            .partition(|(_, _, t)| now.duration_since(*t) >= RENAME_PAIR_WAIT);
        self.pending_from = keep;
        for (_, p, _) in old {
            self.check_path(&p); // moved out of the tree: gone
        }
    }

    fn push(&mut self, op: Op) {
        self.data += op.data_len();
        self.ops.push(op);
    }

    fn flush(&mut self) {
        if self.ops.is_empty() || !self.connected {
            return;
        }
        let ops = std::mem::take(&mut self.ops);
        self.data = 0;
        if let Some(st) = &self.stats {
            st.emitted.fetch_add(1, Ordering::AcqRel);
        }
        let _ = self
            .out
            .blocking_send(Outgoing::Batch { gen: self.gen, ops });
    }

    /// Brings the table (and the cold side) in line with whatever is at `rel` now.
    fn check_path(&mut self, rel: &str) {
        let path = self.root.join(rel);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => self.scan_dir(rel),
            Ok(m) if m.is_file() => self.scan_file(rel, false),
            _ => self.remove(rel),
        }
    }

    fn remove(&mut self, rel: &str) {
        let prefix = format!("{rel}/");
        let was_file = self.table.files.remove(rel).is_some();
        let was_dir = self.table.dirs.remove(rel).is_some();
        if !(was_file || was_dir) {
            return;
        }
        self.table.files.retain(|k, _| !k.starts_with(&prefix));
        self.table.dirs.retain(|k, _| !k.starts_with(&prefix));
        self.seen.retain(|k, _| k != rel && !k.starts_with(&prefix));
        self.cursors
            .retain(|k, _| k != rel && !k.starts_with(&prefix));
        self.push(Op::Remove {
            path: rel.to_owned(),
        });
    }

    fn ensure_parents(&mut self, rel: &str) {
        let mut parts: Vec<&str> = rel.split('/').collect();
        parts.pop();
        let mut cur = String::new();
        for part in parts {
            if !cur.is_empty() {
                cur.push('/');
            }
            cur.push_str(part);
            if !self.table.dirs.contains_key(&cur) {
                let mode = fs::metadata(self.root.join(&cur))
                    .map(|m| m.mode() & 0o7777)
                    .unwrap_or(0o755);
                self.table.dirs.insert(cur.clone(), mode);
                self.push(Op::Mkdir {
                    path: cur.clone(),
                    mode,
                });
            }
        }
    }

    fn scan_dir(&mut self, rel: &str) {
        let path = self.root.join(rel);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            return self.remove(rel);
        };
        if !meta.is_dir() {
            return self.check_path(rel);
        }
        self.ensure_parents(rel);
        let mode = meta.mode() & 0o7777;
        if self.table.files.contains_key(rel) {
            self.remove(rel); // a file became a directory
        }
        if self.table.dirs.get(rel) != Some(&mode) {
            self.table.dirs.insert(rel.to_owned(), mode);
            self.push(Op::Mkdir {
                path: rel.to_owned(),
                mode,
            });
        }
        let Some(names) = sorted_names(&path) else {
            return;
        };
        for name in names {
            let child = format!("{rel}/{name}");
            self.check_path(&child);
            if self.data >= BATCH_DATA_BYTES {
                self.flush();
            }
        }
    }

    /// Sends what changed in the file at `rel`: everything when `full`, else the window from
    /// where it last changed.
    fn scan_file(&mut self, rel: &str, full: bool) {
        let path = self.root.join(rel);
        let cached = if full {
            None
        } else {
            self.open_files.remove(rel)
        };
        let file = match cached {
            Some(f) => f,
            None => match File::open(&path) {
                Ok(f) => f,
                Err(_) => return self.remove(rel),
            },
        };
        let Ok(meta) = file.metadata() else { return };
        if !meta.is_file() {
            return;
        }
        if self.table.dirs.contains_key(rel) {
            self.remove(rel); // a directory became a file
        }
        self.ensure_parents(rel);
        let ps = self.page_size as u64;
        let len = meta.len();
        let mode = meta.mode() & 0o7777;
        let new_pages = len.div_ceil(ps) as usize;
        let zero_hash = self.zero_hash;
        let known = self.table.files.contains_key(rel);
        let entry = self.table.files.entry(rel.to_owned()).or_default();
        if !known || entry.len != len || entry.mode != mode {
            // The cold side truncates or zero-extends: model that in the table.
            let old_len = entry.len;
            if !old_len.is_multiple_of(ps) && len != old_len {
                if let Some(last) = entry.pages.last_mut() {
                    *last = INVALID;
                }
            }
            entry.pages.resize(new_pages, zero_hash);
            if !len.is_multiple_of(ps) && len > old_len {
                // a short zero tail page
                if let Some(last) = entry.pages.last_mut() {
                    *last = page_hash(&vec![0u8; (len % ps) as usize]);
                }
            }
            entry.len = len;
            entry.mode = mode;
            self.ops.push(Op::SetFile {
                path: rel.to_owned(),
                len,
                mode,
            });
        }
        let cursor = self.cursors.get(rel).copied().unwrap_or(0);
        let (start, mut stop_after_clean) = if full {
            (0, usize::MAX)
        } else {
            (cursor.saturating_sub(1), 2usize)
        };
        let mut page = start;
        let mut clean_run = 0usize;
        let mut last_changed = None;
        let mut run: Option<(u64, Vec<u8>, Vec<[u8; 32]>)> = None;
        // a window starts small (an append touches a page or two) and grows as it continues
        let mut chunk_pages = if full { READ_PAGES } else { 8 };
        while page < new_pages && clean_run < stop_after_clean {
            let off = page as u64 * ps;
            let want = chunk_pages * self.page_size;
            chunk_pages = (chunk_pages * 2).min(READ_PAGES);
            let n = match read_full_at(&file, &mut self.buf[..want], off) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(file = %path.display(), "cannot read: {e}");
                    break;
                }
            };
            let Some(entry) = self.table.files.get_mut(rel) else {
                break;
            };
            let table = &mut entry.pages;
            for (i, chunk) in self.buf[..n].chunks(self.page_size).enumerate() {
                let idx = page + i;
                if idx >= table.len() || clean_run >= stop_after_clean {
                    break;
                }
                let full_hash = blake3::hash(chunk);
                let mut short = [0u8; 16];
                short.copy_from_slice(&full_hash.as_bytes()[..16]);
                if table[idx] == short {
                    // clean pages end the window only once past the cursor: the next append
                    // lands after it
                    if full || idx > cursor {
                        clean_run += 1;
                    }
                    if let Some((o, d, h)) = run.take() {
                        self.data += d.len();
                        self.ops.push(Op::Write {
                            path: rel.to_owned(),
                            offset: o,
                            data: d,
                            hashes: h,
                        });
                    }
                    continue;
                }
                clean_run = 0;
                table[idx] = short;
                last_changed = Some(idx);
                let run = run.get_or_insert_with(|| (idx as u64 * ps, Vec::new(), Vec::new()));
                run.1.extend_from_slice(chunk);
                run.2.push(*full_hash.as_bytes());
            }
            page += n.div_ceil(self.page_size);
            if n < want {
                break;
            }
            if self.data + run.as_ref().map_or(0, |r| r.1.len()) >= BATCH_DATA_BYTES {
                if let Some((o, d, h)) = run.take() {
                    self.data += d.len();
                    self.ops.push(Op::Write {
                        path: rel.to_owned(),
                        offset: o,
                        data: d,
                        hashes: h,
                    });
                }
                self.flush();
            }
            if !full && last_changed.is_none() && page > start + 4 {
                stop_after_clean = 0; // nothing near the cursor changed: leave the rest to the rescan
            }
        }
        if let Some((o, d, h)) = run.take() {
            self.data += d.len();
            self.ops.push(Op::Write {
                path: rel.to_owned(),
                offset: o,
                data: d,
                hashes: h,
            });
        }
        match last_changed {
            Some(c) => {
                self.cursors.insert(rel.to_owned(), c);
            }
            None if !full => {
                tracing::trace!(file = rel, cursor, "window found no change: dirty");
                self.dirty.insert(rel.to_owned());
            }
            None => {}
        }
        if full {
            // "Racily clean" (as git calls it): timestamps are coarse (a jiffy), so a write in
            // the same tick as this hash would leave them unchanged. Remember a file as seen
            // only once its mtime is safely in the past; until then every rescan rehashes it.
            let settled = meta
                .modified()
                .ok()
                .and_then(|m| std::time::SystemTime::now().duration_since(m).ok())
                .is_some_and(|age| age > RACY_WINDOW);
            if settled {
                self.seen.insert(rel.to_owned(), Seen::of(&meta));
            } else {
                self.seen.remove(rel);
            }
            self.progress(len);
        } else {
            if self.open_files.len() >= OPEN_FILES {
                self.open_files.clear();
            }
            self.open_files.insert(rel.to_owned(), file);
        }
    }

    fn rename(&mut self, from: &str, to: &str) {
        let to_path = self.root.join(to);
        let is_dir = fs::symlink_metadata(&to_path)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if let Some(state) = self.table.files.get(from).cloned().filter(|_| !is_dir) {
            // Send the file's changes under its old name first (read from its new name).
            let cursor = self.cursors.remove(from);
            self.table.files.remove(from);
            self.table.files.insert(to.to_owned(), state);
            self.scan_file(to, true);
            // what scan_file just emitted for `to` belongs under `from`: the rename follows
            for op in self.ops.iter_mut() {
                match op {
                    Op::SetFile { path, .. } | Op::Write { path, .. } if path == to => {
                        *path = from.to_owned()
                    }
                    _ => {}
                }
            }
            if let Some(c) = cursor {
                self.cursors.insert(to.to_owned(), c);
            }
            self.seen.remove(from);
            self.push(Op::Rename {
                from: from.to_owned(),
                to: to.to_owned(),
            });
        } else if self.table.dirs.contains_key(from) && is_dir {
            let pf = format!("{from}/");
            let moved_files: Vec<_> = self
                .table
                .files
                .keys()
                .filter(|k| k.starts_with(&pf))
                .cloned()
                .collect();
            for k in moved_files {
                let v = self.table.files.remove(&k).expect("listed");
                self.table
                    .files
                    .insert(format!("{to}/{}", &k[pf.len()..]), v);
            }
            let moved_dirs: Vec<_> = self
                .table
                .dirs
                .keys()
                .filter(|k| *k == from || k.starts_with(&pf))
                .cloned()
                .collect();
            for k in moved_dirs {
                let v = self.table.dirs.remove(&k).expect("listed");
                let nk = if k == from {
                    to.to_owned()
                } else {
                    format!("{to}/{}", &k[pf.len()..])
                };
                self.table.dirs.insert(nk, v);
            }
            self.seen.clear();
            self.cursors.clear();
            self.push(Op::Rename {
                from: from.to_owned(),
                to: to.to_owned(),
            });
            self.scan_dir(to);
        } else {
            self.check_path(from);
            self.check_path(to);
        }
    }

    /// Walks the tree: files whose metadata changed since their last full hash (all files when
    /// `deep`) are hashed in full; what is gone is removed.
    fn full_scan(&mut self, deep: bool) {
        if !self.connected {
            return;
        }
        let mut present_dirs = Vec::new();
        let mut present_files = Vec::new();
        let mut stack = vec![String::new()];
        while let Some(rel) = stack.pop() {
            let dir = if rel.is_empty() {
                self.root.clone()
            } else {
                self.root.join(&rel)
            };
            let Some(names) = sorted_names(&dir) else {
                continue;
            };
            for name in names {
                let child = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                let Ok(meta) = fs::symlink_metadata(self.root.join(&child)) else {
                    continue;
                };
                if meta.is_dir() {
                    if self.table.dirs.get(&child) != Some(&(meta.mode() & 0o7777)) {
                        self.scan_dir_entry(&child, meta.mode() & 0o7777);
                    }
                    present_dirs.push(child.clone());
                    stack.push(child);
                } else if meta.is_file() {
                    let unchanged = !deep
                        && self.seen.get(&child) == Some(&Seen::of(&meta))
                        && self.table.files.contains_key(&child);
                    if !unchanged {
                        self.scan_file(&child, true);
                    }
                    present_files.push(child);
                    if self.data >= BATCH_DATA_BYTES {
                        self.flush();
                    }
                }
            }
        }
        let files: std::collections::HashSet<_> = present_files.into_iter().collect();
        let dirs: std::collections::HashSet<_> = present_dirs.into_iter().collect();
        let gone_files: Vec<String> = self
            .table
            .files
            .keys()
            .filter(|k| !files.contains(*k))
            .cloned()
            .collect();
        for f in gone_files {
            self.remove(&f);
        }
        let mut gone_dirs: Vec<String> = self
            .table
            .dirs
            .keys()
            .filter(|k| !dirs.contains(*k))
            .cloned()
            .collect();
        gone_dirs.sort_by_key(|d| std::cmp::Reverse(d.len()));
        for d in gone_dirs {
            self.remove(&d);
        }
    }

    fn scan_dir_entry(&mut self, rel: &str, mode: u32) {
        self.ensure_parents(rel);
        if self.table.files.contains_key(rel) {
            self.remove(rel);
        }
        self.table.dirs.insert(rel.to_owned(), mode);
        self.push(Op::Mkdir {
            path: rel.to_owned(),
            mode,
        });
    }

    /// The full scan after a (re)connection, with progress (bytes, files, ETA) logged every
    /// few seconds.
    fn full_scan_with_progress(&mut self) {
        let (files_total, bytes_total) = walk_sizes(&self.root);
        let now = Instant::now();
        self.progress = Some(Progress {
            files_total,
            bytes_total,
            files_done: 0,
            bytes_done: 0,
            started: now,
            last_log: now,
        });
        self.full_scan(true);
        if let Some(p) = self.progress.take() {
            tracing::info!(
                files = p.files_done,
                bytes = p.bytes_done,
                elapsed_ms = p.started.elapsed().as_millis() as u64,
                "initial comparison done; the cold side receives what differed"
            );
        }
    }

    fn progress(&mut self, bytes: u64) {
        let Some(p) = &mut self.progress else { return };
        p.files_done += 1;
        p.bytes_done += bytes;
        if p.last_log.elapsed() >= PROGRESS_EVERY {
            p.last_log = Instant::now();
            let secs = p.started.elapsed().as_secs_f64();
            let rate = p.bytes_done as f64 / secs.max(1e-3);
            let eta = (p.bytes_total.saturating_sub(p.bytes_done)) as f64 / rate.max(1.0);
            tracing::info!(
                files = format!("{}/{}", p.files_done, p.files_total),
                mib = format!("{}/{}", p.bytes_done >> 20, p.bytes_total >> 20),
                mib_per_s = (rate / 1048576.0) as u64,
                eta_s = eta.round() as u64,
                "initial sync"
            );
        }
    }
}

/// The UTF-8 names in `dir`, sorted; `None` if it cannot be listed (it vanished meanwhile).
fn sorted_names(dir: &Path) -> Option<Vec<String>> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    Some(names)
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

fn walk_sizes(root: &Path) -> (u64, u64) {
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
    (files, total)
}
// ------------------------------------------------------------------------------- network

async fn run_net(
    cfg: SenderConfig,
    mut out_rx: mpsc::Receiver<Outgoing>,
    scan_tx: Sender<ScanMsg>,
    stats: Arc<SenderStats>,
    events: Sender<SenderEvent>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut gen = 0u64;
    let mut pause = Duration::from_millis(50);
    loop {
        gen += 1;
        let result =
            stream_once(&cfg, gen, &mut out_rx, &scan_tx, &stats, &events, &mut stop).await;
        stats.connected.store(false, Ordering::Relaxed);
        let _ = scan_tx.send(ScanMsg::Disconnected);
        match result {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(peer = %cfg.peer, "replication connection: {}; reconnecting in {} ms", crate::error_chain(&e), pause.as_millis());
            }
        }
        // wait, dropping what the scanner sends meanwhile (the next index resyncs it)
        let deadline = tokio::time::Instant::now() + pause;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = stop.changed() => return,
                out = out_rx.recv() => match out {
                    None => return,
                    Some(Outgoing::Verify { reply, .. }) => { let _ = reply.send(Err("the connection to the cold side dropped".into())); }
                    Some(Outgoing::Drain { reply, .. }) => { let _ = reply.send(Err("the connection to the cold side dropped".into())); }
                    Some(Outgoing::Batch { .. }) => {}
                },
            }
        }
        pause = (pause * 2).min(RECONNECT_MAX);
    }
}

/// Errors of one connection of the sender, naming the peer.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum SendError {
    /// cannot connect to {peer}: {source}
    Connect {
        peer: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// peer {peer}: {source}
    Proto {
        peer: SocketAddr,
        #[source]
        source: ProtoError,
    },
    /// peer {peer} refused us (its epoch {epoch}): {reason}
    Rejected {
        peer: SocketAddr,
        epoch: u64,
        reason: String,
    },
}

#[allow(clippy::too_many_arguments)]
async fn stream_once(
    cfg: &SenderConfig,
    gen: u64,
    out_rx: &mut mpsc::Receiver<Outgoing>,
    scan_tx: &Sender<ScanMsg>,
    stats: &Arc<SenderStats>,
    events: &Sender<SenderEvent>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), SendError> {
    let peer = cfg.peer;
    let proto = |source| SendError::Proto { peer, source };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(peer))
        .await
        .map_err(|_| SendError::Connect {
            peer,
            source: io::Error::new(io::ErrorKind::TimedOut, "timed out"),
        })?
        .map_err(|source| SendError::Connect { peer, source })?;
    let (r, w) = channel::wrap_connect(&cfg.auth, stream)
        .await
        .map_err(proto)?;
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(tokio::io::BufWriter::with_capacity(1 << 20, w));
    channel::connect(&cfg.auth, &mut reader, &mut writer)
        .await
        .map_err(proto)?;
    writer
        .send(&Frame::Intro {
            epoch: cfg.epoch,
            hot: true,
            node: cfg.node.clone(),
            page_size: cfg.page_size as u32,
        })
        .await
        .map_err(proto)?;
    writer.flush().await.map_err(proto)?;
    match reader.recv().await.map_err(proto)? {
        Frame::Welcome { .. } => {}
        Frame::Reject { epoch, reason } => {
            let _ = events.send(SenderEvent::Rejected {
                epoch,
                reason: reason.clone(),
            });
            return Err(SendError::Rejected {
                peer,
                epoch,
                reason,
            });
        }
        other => {
            return Err(proto(ProtoError::Unexpected(format!(
                "{other:?} instead of Welcome"
            ))))
        }
    }
    let mut index = TreeIndex::default();
    loop {
        match reader.recv().await.map_err(proto)? {
            Frame::IndexDir { path, mode } => {
                index.dirs.insert(path, mode);
            }
            Frame::IndexFile {
                path,
                len,
                mode,
                pages,
            } => {
                index.files.insert(path, FileState { len, mode, pages });
            }
            Frame::IndexEnd => break,
            other => {
                return Err(proto(ProtoError::Unexpected(format!(
                    "{other:?} in the index"
                ))))
            }
        }
    }
    tracing::info!(%peer, files = index.files.len(), "connected to the cold side");
    stats.connected.store(true, Ordering::Relaxed);
    stats.acked_seq.store(0, Ordering::Relaxed);
    stats.sent_seq.store(0, Ordering::Relaxed);
    let _ = scan_tx.send(ScanMsg::Resync { gen, index });

    // frames from the cold side, read in their own task (reads are not cancel-safe)
    let (in_tx, mut in_rx) = mpsc::channel::<Result<Frame, ProtoError>>(64);
    let read_task = tokio::spawn(async move {
        loop {
            let f = reader.recv().await;
            let end = f.is_err();
            if in_tx.send(f).await.is_err() || end {
                return;
            }
        }
    });
    let _guard = AbortOnDrop(read_task);

    let mut window: VecDeque<(u64, Frame, usize)> = VecDeque::new();
    let mut window_bytes = 0usize;
    let mut next_seq = 1u64;
    let mut verifies: HashMap<u64, (TreeIndex, Sender<Result<VerifyReport, String>>)> =
        HashMap::new();
    let mut drains: Vec<Sender<Result<u64, String>>> = Vec::new();
    let mut last_sent = tokio::time::Instant::now();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            out = out_rx.recv(), if window_bytes < cfg.window_bytes => match out {
                None => return Ok(()),
                Some(Outgoing::Batch { gen: g, ops }) if g == gen => {
                    let seq = next_seq;
                    next_seq += 1;
                    let data: usize = ops.iter().map(Op::data_len).sum();
                    let frame = Frame::Batch { seq, ops };
                    let before = writer.bytes;
                    writer.send(&frame).await.map_err(proto)?;
                    writer.flush().await.map_err(proto)?;
                    stats.wire_bytes.fetch_add(writer.bytes - before, Ordering::Relaxed);
                    stats.data_bytes.fetch_add(data as u64, Ordering::Relaxed);
                    stats.batches.fetch_add(1, Ordering::Relaxed);
                    stats.sent_seq.store(seq, Ordering::Relaxed);
                    window_bytes += data;
                    window.push_back((seq, frame, data));
                    last_sent = tokio::time::Instant::now();
                }
                Some(Outgoing::Batch { .. }) => {}
                Some(Outgoing::Verify { gen: g, id, hot, reply }) => {
                    if g == gen { verifies.insert(id, (hot, reply)); } else { let _ = reply.send(Err("the connection changed during verify".into())); }
                }
                Some(Outgoing::Drain { gen: g, reply }) => {
                    if g != gen {
                        let _ = reply.send(Err("the connection changed during drain".into()));
                    } else if window.is_empty() {
                        let seq = next_seq - 1;
                        writer.send(&Frame::Drained { seq }).await.map_err(proto)?;
                        writer.flush().await.map_err(proto)?;
                        let _ = reply.send(Ok(seq));
                    } else {
                        drains.push(reply);
                    }
                }
            },
            frame = in_rx.recv() => {
                let Some(frame) = frame else { return Err(proto(ProtoError::Closed)) };
                match frame.map_err(proto)? {
                    Frame::Ack { seq } => {
                        while window.front().is_some_and(|(s, _, _)| *s <= seq) {
                            let (_, _, d) = window.pop_front().expect("front");
                            window_bytes -= d;
                        }
                        stats.acked_seq.store(seq, Ordering::Relaxed);
                        stats.last_ack_unix_ms.store(crate::sys::now_unix_ms(), Ordering::Relaxed);
                        if window.is_empty() && !drains.is_empty() {
                            let seq = next_seq - 1;
                            writer.send(&Frame::Drained { seq }).await.map_err(proto)?;
                            writer.flush().await.map_err(proto)?;
                            for d in drains.drain(..) { let _ = d.send(Ok(seq)); }
                        }
                    }
                    Frame::Nack { seq, reason } => {
                        stats.nacks.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%peer, seq, "the cold side rejected batch {seq}: {reason}; resending from it");
                        for (s, frame, _) in window.iter().filter(|(s, _, _)| *s >= seq) {
                            writer.send(frame).await.map_err(proto)?;
                            stats.batches.fetch_add(1, Ordering::Relaxed);
                            let _ = s;
                        }
                        writer.flush().await.map_err(proto)?;
                    }
                    Frame::Digest { id, root, files } => {
                        if let Some((hot, reply)) = verifies.remove(&id) {
                            let _ = reply.send(Ok(compare(&hot, root, files)));
                        }
                    }
                    Frame::Heartbeat => {}
                    Frame::Reject { epoch, reason } => {
                        let _ = events.send(SenderEvent::Rejected { epoch, reason: reason.clone() });
                        return Err(SendError::Rejected { peer, epoch, reason });
                    }
                    other => return Err(proto(ProtoError::Unexpected(format!("{other:?} from the cold side")))),
                }
            }
            _ = heartbeat.tick() => {
                if last_sent.elapsed() >= HEARTBEAT {
                    writer.send(&Frame::Heartbeat).await.map_err(proto)?;
                    writer.flush().await.map_err(proto)?;
                    last_sent = tokio::time::Instant::now();
                }
            }
            _ = stop.changed() => return Ok(()),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn compare(
    hot: &TreeIndex,
    cold_root: [u8; 32],
    cold_files: Vec<(String, [u8; 32])>,
) -> VerifyReport {
    let (hot_root, hot_files) = hot.digest();
    let cold: BTreeMap<String, [u8; 32]> = cold_files.into_iter().collect();
    let mut differing: Vec<String> = hot_files
        .iter()
        .filter(|(p, d)| cold.get(*p) != Some(d))
        .map(|(p, _)| p.clone())
        .collect();
    differing.extend(cold.keys().filter(|p| !hot_files.contains_key(*p)).cloned());
    differing.sort();
    let hex = |d: &[u8; 32]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    VerifyReport {
        identical: hot_root == cold_root && differing.is_empty(),
        hot_root: hex(&hot_root),
        cold_root: hex(&cold_root),
        files: hot_files.len().max(cold.len()),
        differing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicated::receiver::{Applied, Applier};
    use notify::event::{DataChange, ModifyKind};
    use proptest::prelude::*;

    /// A scanner wired to an applier on a second directory, with events delivered by hand.
    struct Rig {
        _tmp: tempfile::TempDir,
        hot: PathBuf,
        cold: PathBuf,
        scanner: Scanner,
        rx: mpsc::Receiver<Outgoing>,
        applier: Applier,
        seq: u64,
        sent: usize,
    }

    impl Rig {
        fn new() -> Rig {
            let tmp = tempfile::tempdir().unwrap();
            let hot = tmp.path().join("hot");
            let cold = tmp.path().join("cold");
            fs::create_dir_all(&hot).unwrap();
            fs::create_dir_all(&cold).unwrap();
            let cfg = SenderConfig {
                root: hot.clone(),
                page_size: 512,
                peer: "127.0.0.1:1".parse().unwrap(),
                auth: Auth::Insecure,
                node: "test".into(),
                epoch: 1,
                rescan: Duration::from_secs(3600),
                deep_rescan: Duration::from_secs(3600),
                window_bytes: 1 << 20,
            };
            let (tx, rx) = mpsc::channel(4096);
            let mut scanner = Scanner::new(&cfg, tx);
            let applier = Applier::new(&cold, 512);
            scanner.control(ScanMsg::Resync {
                gen: 1,
                index: TreeIndex::default(),
            });
            let mut rig = Rig {
                _tmp: tmp,
                hot,
                cold,
                scanner,
                rx,
                applier,
                seq: 0,
                sent: 0,
            };
            rig.pump();
            rig
        }

        fn pump(&mut self) {
            self.scanner.flush();
            while let Ok(out) = self.rx.try_recv() {
                if let Outgoing::Batch { ops, .. } = out {
                    self.seq += 1;
                    self.sent += ops.iter().map(Op::data_len).sum::<usize>();
                    match self.applier.batch(self.seq, ops) {
                        Applied::Done { .. } => {}
                        other => panic!("batch {} not applied: {other:?}", self.seq),
                    }
                }
            }
        }

        fn event(&mut self, kind: EventKind, paths: &[&str]) {
            let mut ev = notify::Event::new(kind);
            for p in paths {
                ev = ev.add_path(self.hot.join(p));
            }
            self.scanner.fs_event(FsEvent::Event(ev));
            self.pump();
        }

        fn modified(&mut self, p: &str) {
            self.event(EventKind::Modify(ModifyKind::Data(DataChange::Any)), &[p]);
        }

        fn same(&self) -> bool {
            let a = crate::replicated::pages::index_tree(&self.hot, 512).unwrap();
            let b = crate::replicated::pages::index_tree(&self.cold, 512).unwrap();
            a == b
        }
    }

    #[test]
    fn appends_are_found_by_events_alone_without_rehashing_the_file() {
        let mut r = Rig::new();
        let f = r.hot.join("j.amq");
        fs::write(&f, vec![0u8; 64 * 512]).unwrap();
        r.modified("j.amq");
        assert!(r.same());
        assert_eq!(
            r.sent, 0,
            "a zero-filled preallocated file costs no page data"
        );
        let file = fs::OpenOptions::new().write(true).open(&f).unwrap();
        for i in 0..40u64 {
            file.write_all_at(&[i as u8 + 1; 300], i * 300).unwrap();
            let before = r.sent;
            r.modified("j.amq");
            assert!(r.same(), "append {i} not replicated by its event");
            assert!(
                r.sent - before <= 2 * 512,
                "append {i} sent {} bytes",
                r.sent - before
            );
        }
    }

    #[test]
    fn page_sized_records_are_found_by_events_alone() {
        // Artemis writes whole pages: each append lands on the page after the cursor.
        let mut r = Rig::new();
        let f = r.hot.join("j.amq");
        fs::write(&f, vec![0u8; 64 * 512]).unwrap();
        r.modified("j.amq");
        let file = fs::OpenOptions::new().write(true).open(&f).unwrap();
        for i in 0..40u64 {
            file.write_all_at(&[i as u8 + 1; 512], i * 512).unwrap();
            let before = r.sent;
            r.modified("j.amq");
            assert!(r.same(), "page append {i} not replicated by its event");
            assert_eq!(r.sent - before, 512, "append {i}");
        }
    }

    #[test]
    fn a_rename_carries_the_data_first_and_moves_the_rest() {
        let mut r = Rig::new();
        fs::create_dir_all(r.hot.join("journal")).unwrap();
        fs::write(r.hot.join("journal/a.tmp"), vec![0u8; 8 * 512]).unwrap();
        r.event(EventKind::Create(CreateKind::File), &["journal/a.tmp"]);
        // data written, then renamed before any event for the write was seen
        fs::OpenOptions::new()
            .write(true)
            .open(r.hot.join("journal/a.tmp"))
            .unwrap()
            .write_all_at(&[7; 512], 3 * 512)
            .unwrap();
        fs::rename(r.hot.join("journal/a.tmp"), r.hot.join("journal/a")).unwrap();
        let sent = r.sent;
        r.event(
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
            &["journal/a.tmp", "journal/a"],
        );
        assert!(r.same());
        assert_eq!(r.sent - sent, 512, "one page of data, then the rename");
    }

    #[derive(Debug, Clone)]
    enum FsOp {
        Write {
            file: usize,
            offset: u64,
            len: usize,
            byte: u8,
        },
        Truncate {
            file: usize,
            len: u64,
        },
        Rename {
            from: usize,
            to: usize,
        },
        Delete {
            file: usize,
        },
        Rmdir {
            dir: usize,
        },
    }

    fn fs_op() -> impl Strategy<Value = FsOp> {
        prop_oneof![
            4 => (0..6usize, 0..4000u64, 1..1500usize, any::<u8>()).prop_map(|(file, offset, len, byte)| FsOp::Write { file, offset, len, byte }),
            1 => (0..6usize, 0..3000u64).prop_map(|(file, len)| FsOp::Truncate { file, len }),
            2 => (0..6usize, 0..6usize).prop_map(|(from, to)| FsOp::Rename { from, to }),
            1 => (0..6usize).prop_map(|file| FsOp::Delete { file }),
            1 => (0..2usize).prop_map(|dir| FsOp::Rmdir { dir }),
        ]
    }

    /// Six file names in two directories and the root.
    fn name(i: usize) -> String {
        ["a", "b", "d0/c", "d0/e", "d1/f", "d1/g"][i].to_owned()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

        /// Whatever the hot side does, events plus one periodic rescan leave the cold copy
        /// identical: files, sizes, contents, directories, modes.
        #[test]
        fn random_changes_converge(ops in proptest::collection::vec(fs_op(), 1..30)) {
            let mut r = Rig::new();
            for op in ops {
                match op {
                    FsOp::Write { file, offset, len, byte } => {
                        let n = name(file);
                        let p = r.hot.join(&n);
                        fs::create_dir_all(p.parent().unwrap()).unwrap();
                        let f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&p).unwrap();
                        f.write_all_at(&vec![byte; len], offset).unwrap();
                        r.modified(&n);
                    }
                    FsOp::Truncate { file, len } => {
                        let n = name(file);
                        if let Ok(f) = fs::OpenOptions::new().write(true).open(r.hot.join(&n)) {
                            f.set_len(len).unwrap();
                            r.modified(&n);
                        }
                    }
                    FsOp::Rename { from, to } => {
                        let (a, b) = (name(from), name(to));
                        if a != b && r.hot.join(&a).exists() {
                            fs::create_dir_all(r.hot.join(&b).parent().unwrap()).unwrap();
                            fs::rename(r.hot.join(&a), r.hot.join(&b)).unwrap();
                            r.event(EventKind::Modify(ModifyKind::Name(RenameMode::Both)), &[&a, &b]);
                        }
                    }
                    FsOp::Delete { file } => {
                        let n = name(file);
                        if fs::remove_file(r.hot.join(&n)).is_ok() {
                            r.event(EventKind::Remove(RemoveKind::File), &[&n]);
                        }
                    }
                    FsOp::Rmdir { dir } => {
                        let d = format!("d{dir}");
                        if fs::remove_dir_all(r.hot.join(&d)).is_ok() {
                            r.event(EventKind::Remove(RemoveKind::Folder), &[&d]);
                        }
                    }
                }
            }
            r.scanner.full_scan(false);
            r.pump();
            prop_assert!(r.same(), "hot and cold differ after events and a rescan");
        }
    }
}
