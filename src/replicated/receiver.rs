//! The cold side of replication: accepts the hot side's connection, authenticates it, checks
//! its epoch, reports its own tree (the index), then applies batches in order on an apply
//! thread and acknowledges each once it is durable.
//!
//! Nothing from the network touches the disk before it is checked: a batch is validated whole
//! (every path confined to the data directory, no symlink or special file on the way, every
//! page's blake3 matching) before its first operation is applied. A batch that fails is dropped
//! and answered with `Nack`, and the hot side resends from it; batches that arrive after it are
//! skipped until the resend. Files are opened with `O_NOFOLLOW`.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::replicated::channel::{self, Auth};
use crate::replicated::pages::{self, confine, no_symlinks_below, PagesError, TreeIndex};
use crate::replicated::wire::{Frame, FrameReader, FrameWriter, Op, ProtoError};

/// A connection with no frame for this long is dead (the hot sends heartbeats every second).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Open files kept by the apply thread.
pub const OPEN_FILES: usize = 128;
/// Batches queued for the apply thread.
pub const APPLY_QUEUE: usize = 4;

/// Decides whether a hot side at a given epoch may stream to us.
pub trait Gate: Send + Sync {
    /// `Ok(our epoch)` to accept (the gate records the peer's epoch), `Err((our epoch, why))`
    /// to refuse.
    fn admit(&self, peer_epoch: u64, node: &str) -> Result<u64, (u64, String)>;
    /// Whether a stream admitted at `peer_epoch` may go on (false once this side is promoted).
    fn still_admitted(&self, peer_epoch: u64) -> bool;
}

/// Counters for `status`, `promote` and the benchmark.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    /// Whether a hot side is connected and streaming.
    pub connected: AtomicBool,
    /// The connected hot side's epoch.
    pub hot_epoch: AtomicU64,
    /// Highest batch applied and acknowledged on the current connection.
    pub applied_seq: AtomicU64,
    /// Batches applied.
    pub batches: AtomicU64,
    /// Page data bytes written.
    pub data_bytes: AtomicU64,
    /// Bytes read from the wire.
    pub wire_bytes: AtomicU64,
    /// Bytes written to the wire (index, acknowledgements, digests).
    pub wire_out_bytes: AtomicU64,
    /// When the last frame arrived (ms since the Unix epoch).
    pub last_frame_unix_ms: AtomicU64,
    /// When the last batch was acknowledged (ms since the Unix epoch).
    pub last_ack_unix_ms: AtomicU64,
    /// Whether the last hot side sent its drained marker before going away.
    pub drained: AtomicBool,
    /// Batches rejected for a bad page checksum.
    pub checksum_failures: AtomicU64,
    /// Frames rejected for a bad MAC.
    pub mac_failures: AtomicU64,
    /// Connections refused (authentication, epoch).
    pub refused: AtomicU64,
    /// The connected peer.
    pub peer: Mutex<Option<String>>,
}

/// What the receiver needs.
#[derive(Clone)]
pub struct ReceiverConfig {
    /// The data directory.
    pub root: PathBuf,
    /// Replication unit.
    pub page_size: usize,
    /// How peers authenticate.
    pub auth: Auth,
    /// Who may stream.
    pub gate: Arc<dyn Gate>,
}

impl std::fmt::Debug for ReceiverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverConfig")
            .field("root", &self.root)
            .field("page_size", &self.page_size)
            .finish()
    }
}

// ------------------------------------------------------------------------------- apply thread

enum Job {
    Index(oneshot::Sender<Result<TreeIndex, PagesError>>),
    Batch {
        seq: u64,
        ops: Vec<Op>,
        reply: mpsc::UnboundedSender<Applied>,
    },
}

/// The digest of the tree at a barrier: its id, the root, and each file's digest.
pub type BarrierDigest = (u64, [u8; 32], Vec<(String, [u8; 32])>);

/// The outcome of one batch.
#[derive(Debug)]
pub enum Applied {
    /// Durable; page bytes written, and the digests of any barriers in it.
    Done {
        seq: u64,
        bytes: u64,
        digests: Vec<BarrierDigest>,
    },
    /// Not the next batch (a duplicate, or one after a rejected batch): ignored.
    Skipped { seq: u64 },
    /// Failed a check before anything was written: resend it.
    Rejected { seq: u64, reason: String },
    /// Failed while writing (disk full, permissions): the connection is dropped.
    Failed { seq: u64, reason: String },
}

/// Applies batches to the data directory, in order.
pub(crate) struct Applier {
    root: PathBuf,
    page_size: usize,
    files: HashMap<String, File>,
    expected: u64,
}

impl Applier {
    /// An applier for `root`, expecting batch 1 first.
    pub(crate) fn new(root: &Path, page_size: usize) -> Self {
        Applier {
            root: root.to_owned(),
            page_size,
            files: HashMap::new(),
            expected: 1,
        }
    }

    fn run(mut self, jobs: crossbeam_channel::Receiver<Job>) {
        for job in jobs.iter() {
            match job {
                Job::Index(reply) => {
                    self.expected = 1;
                    self.files.clear();
                    let _ = reply.send(pages::index_tree(&self.root, self.page_size));
                }
                Job::Batch { seq, ops, reply } => {
                    let _ = reply.send(self.batch(seq, ops));
                }
            }
        }
    }

    pub(crate) fn batch(&mut self, seq: u64, ops: Vec<Op>) -> Applied {
        if seq != self.expected {
            return Applied::Skipped { seq };
        }
        if let Err(reason) = self.validate(&ops) {
            return Applied::Rejected { seq, reason };
        }
        let bytes = ops.iter().map(|o| o.data_len() as u64).sum();
        match self.apply(ops) {
            Ok(digests) => {
                self.expected += 1;
                Applied::Done {
                    seq,
                    bytes,
                    digests,
                }
            }
            Err(e) => {
                self.files.clear();
                Applied::Failed {
                    seq,
                    reason: crate::error_chain(&e),
                }
            }
        }
    }

    fn validate(&self, ops: &[Op]) -> Result<(), String> {
        let ps = self.page_size;
        for op in ops {
            let paths: Vec<&str> = match op {
                Op::Mkdir { path, .. } | Op::SetFile { path, .. } | Op::Remove { path } => {
                    vec![path]
                }
                Op::Write { path, .. } => vec![path],
                Op::Rename { from, to } => vec![from, to],
                Op::Barrier { .. } => vec![],
            };
            for p in paths {
                let full = confine(&self.root, p).map_err(|e| e.to_string())?;
                no_symlinks_below(&self.root, &full, p).map_err(|e| e.to_string())?;
            }
            if let Op::Write {
                path,
                offset,
                data,
                hashes,
            } = op
            {
                if offset % ps as u64 != 0 || data.len().div_ceil(ps) != hashes.len() {
                    return Err(format!(
                        "write to {path:?} at {offset}: not whole pages with one hash each"
                    ));
                }
                for (i, (page, want)) in data.chunks(ps).zip(hashes).enumerate() {
                    if blake3::hash(page).as_bytes() != want {
                        return Err(format!(
                            "page at offset {} of {path:?} failed its blake3 check",
                            offset + (i * ps) as u64
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn open(&mut self, rel: &str, create: bool) -> Result<&File, PagesError> {
        if !self.files.contains_key(rel) {
            if self.files.len() >= OPEN_FILES {
                self.files.clear();
            }
            let path = self.root.join(rel);
            let f = OpenOptions::new()
                .write(true)
                .create(create)
                .truncate(false)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|source| PagesError::Io {
                    op: "cannot open",
                    path: path.clone(),
                    source,
                })?;
            self.files.insert(rel.to_owned(), f);
        }
        Ok(&self.files[rel])
    }

    fn forget(&mut self, rel: &str) {
        let prefix = format!("{rel}/");
        self.files
            .retain(|k, _| k != rel && !k.starts_with(&prefix));
    }

    fn apply(&mut self, ops: Vec<Op>) -> Result<Vec<BarrierDigest>, PagesError> {
        let io = |op: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source: io::Error| PagesError::Io { op, path, source }
        };
        let mut dirty_files: HashSet<String> = HashSet::new();
        let mut dirty_dirs: HashSet<PathBuf> = HashSet::new();
        let mut digests = Vec::new();
        for op in ops {
            match op {
                Op::Mkdir { path, mode } => {
                    let full = self.root.join(&path);
                    if fs::symlink_metadata(&full).is_ok_and(|m| !m.is_dir()) {
                        self.forget(&path);
                        fs::remove_file(&full).map_err(io("cannot remove", &full))?;
                    }
                    fs::create_dir_all(&full).map_err(io("cannot create directory", &full))?;
                    pages::set_mode(&full, mode)?;
                    dirty_dirs.insert(full.parent().unwrap_or(&self.root).to_owned());
                }
                Op::SetFile { path, len, mode } => {
                    let full = self.root.join(&path);
                    if fs::symlink_metadata(&full).is_ok_and(|m| m.is_dir()) {
                        self.forget(&path);
                        fs::remove_dir_all(&full).map_err(io("cannot remove", &full))?;
                    }
                    let created = !full.exists();
                    let f = self.open(&path, true)?;
                    f.set_len(len).map_err(io("cannot set length of", &full))?;
                    pages::set_mode(&full, mode)?;
                    dirty_files.insert(path);
                    if created {
                        dirty_dirs.insert(full.parent().unwrap_or(&self.root).to_owned());
                    }
                }
                Op::Write {
                    path, offset, data, ..
                } => {
                    let full = self.root.join(&path);
                    let f = self.open(&path, true)?;
                    f.write_all_at(&data, offset)
                        .map_err(io("cannot write", &full))?;
                    dirty_files.insert(path);
                }
                Op::Rename { from, to } => {
                    // durability of the data before the name: sync what the batch wrote so far
                    for p in dirty_files.drain() {
                        if let Some(f) = self.files.get(&p) {
                            f.sync_data()
                                .map_err(io("cannot fsync", &self.root.join(&p)))?;
                        }
                    }
                    let (a, b) = (self.root.join(&from), self.root.join(&to));
                    self.forget(&from);
                    self.forget(&to);
                    if let Some(parent) = b.parent() {
                        fs::create_dir_all(parent)
                            .map_err(io("cannot create directory", parent))?;
                    }
                    fs::rename(&a, &b).map_err(io("cannot rename", &a))?;
                    dirty_dirs.insert(a.parent().unwrap_or(&self.root).to_owned());
                    dirty_dirs.insert(b.parent().unwrap_or(&self.root).to_owned());
                }
                Op::Remove { path } => {
                    let full = self.root.join(&path);
                    self.forget(&path);
                    match fs::symlink_metadata(&full) {
                        Ok(m) if m.is_dir() => {
                            fs::remove_dir_all(&full).map_err(io("cannot remove", &full))?
                        }
                        Ok(_) => fs::remove_file(&full).map_err(io("cannot remove", &full))?,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io("cannot inspect", &full)(e)),
                    }
                    dirty_dirs.insert(full.parent().unwrap_or(&self.root).to_owned());
                }
                Op::Barrier { id } => {
                    self.sync(&mut dirty_files, &mut dirty_dirs)?;
                    let (root, files) = pages::index_tree(&self.root, self.page_size)?.digest();
                    digests.push((id, root, files.into_iter().collect()));
                }
            }
        }
        self.sync(&mut dirty_files, &mut dirty_dirs)?;
        Ok(digests)
    }

    fn sync(
        &mut self,
        files: &mut HashSet<String>,
        dirs: &mut HashSet<PathBuf>,
    ) -> Result<(), PagesError> {
        for p in files.drain() {
            if let Some(f) = self.files.get(&p) {
                f.sync_data().map_err(|source| PagesError::Io {
                    op: "cannot fsync",
                    path: self.root.join(&p),
                    source,
                })?;
            }
        }
        for d in dirs.drain() {
            if let Ok(dir) = File::open(&d) {
                dir.sync_all().map_err(|source| PagesError::Io {
                    op: "cannot fsync directory",
                    path: d.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------- network

/// A running receiver.
#[derive(Debug)]
pub struct ReceiverHandle {
    /// Counters.
    pub stats: Arc<ReceiverStats>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl ReceiverHandle {
    /// Stops accepting and drops the connection.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Serves hot sides on `listener` until stopped.
pub fn start(
    cfg: ReceiverConfig,
    listener: TcpListener,
    rt: &tokio::runtime::Handle,
) -> ReceiverHandle {
    let stats = Arc::new(ReceiverStats::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(APPLY_QUEUE);
    let applier = Applier::new(&cfg.root, cfg.page_size);
    std::thread::Builder::new()
        .name("apply".into())
        .spawn(move || applier.run(jobs_rx))
        .expect("spawn the apply thread");
    rt.spawn(accept_loop(cfg, listener, jobs_tx, stats.clone(), stop_rx));
    ReceiverHandle {
        stats,
        stop: stop_tx,
    }
}

async fn accept_loop(
    cfg: ReceiverConfig,
    listener: TcpListener,
    jobs: crossbeam_channel::Sender<Job>,
    stats: Arc<ReceiverStats>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut current: Option<tokio::task::JoinHandle<()>> = None;
    let conn_lock = Arc::new(tokio::sync::Mutex::new(()));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { tracing::warn!("accept: {e}"); tokio::time::sleep(Duration::from_millis(100)).await; continue; }
            },
            _ = stop.changed() => { if let Some(c) = current.take() { c.abort(); } return; }
        };
        let cfg = cfg.clone();
        let jobs = jobs.clone();
        let stats = stats.clone();
        let lock = conn_lock.clone();
        let previous = current.take();
        current = Some(tokio::spawn(async move {
            // authenticate before touching the previous stream: a stranger cannot cut it off
            let Some((reader, writer, epoch, node)) = admit(&cfg, stream, peer, &stats).await
            else {
                return;
            };
            if let Some(p) = previous {
                p.abort();
            }
            let _one_at_a_time = lock.lock().await;
            tracing::info!(%peer, epoch, node, "hot side connected");
            stats.connected.store(true, Ordering::Relaxed);
            stats.drained.store(false, Ordering::Relaxed);
            stats.hot_epoch.store(epoch, Ordering::Relaxed);
            *stats.peer.lock().expect("peer lock") = Some(format!("{node} ({peer})"));
            let result = stream_in(reader, writer, &jobs, &stats, &*cfg.gate, epoch).await;
            stats.connected.store(false, Ordering::Relaxed);
            match result {
                Ok(()) => {
                    tracing::info!(%peer, drained = stats.drained.load(Ordering::Relaxed), "hot side went away")
                }
                Err(e) => tracing::warn!(%peer, "replication stream: {}", crate::error_chain(&e)),
            }
        }));
    }
}

type Reader = FrameReader<channel::BoxRead>;
type Writer = FrameWriter<tokio::io::BufWriter<channel::BoxWrite>>;

/// Handshake, epoch check and welcome; `None` (logged) when the peer is refused.
async fn admit(
    cfg: &ReceiverConfig,
    stream: TcpStream,
    peer: SocketAddr,
    stats: &ReceiverStats,
) -> Option<(Reader, Writer, u64, String)> {
    let (r, w) = match channel::wrap_accept(&cfg.auth, stream).await {
        Ok(x) => x,
        Err(e) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "refused a replication peer: {}", crate::error_chain(&e));
            return None;
        }
    };
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(tokio::io::BufWriter::with_capacity(1 << 16, w));
    if let Err(e) = channel::accept(&cfg.auth, &mut reader, &mut writer).await {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, "refused a replication peer: {}", crate::error_chain(&e));
        return None;
    }
    let intro = tokio::time::timeout(IDLE_TIMEOUT, reader.recv()).await;
    let (epoch, node, page_size) = match intro {
        Ok(Ok(Frame::Intro {
            epoch,
            hot: true,
            node,
            page_size,
        })) => (epoch, node, page_size),
        other => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "refused a replication peer: expected its introduction, got {other:?}");
            return None;
        }
    };
    let refuse = |reason: String, our: u64| Frame::Reject { epoch: our, reason };
    let answer = if page_size as usize != cfg.page_size {
        Err(refuse(
            format!(
                "page_size {page_size} differs from ours ({})",
                cfg.page_size
            ),
            0,
        ))
    } else {
        cfg.gate
            .admit(epoch, &node)
            .map_err(|(our, why)| refuse(why, our))
    };
    match answer {
        Ok(our) => {
            writer.send(&Frame::Welcome { epoch: our }).await.ok()?;
            writer.flush().await.ok()?;
            Some((reader, writer, epoch, node))
        }
        Err(frame) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            if let Frame::Reject { reason, epoch: our } = &frame {
                tracing::warn!(%peer, node, peer_epoch = epoch, epoch = our, "refused a hot side: {reason}");
            }
            let _ = writer.send(&frame).await;
            let _ = writer.flush().await;
            None
        }
    }
}

/// Errors of the incoming stream, naming what failed.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ReceiveError {
    /// {0}
    Proto(#[from] ProtoError),
    /// cannot index the data directory: {0}
    Index(#[source] PagesError),
    /// applying batch {seq} failed: {reason}
    Apply { seq: u64, reason: String },
    /// the apply thread is gone
    ApplyGone,
    /// no frame for {0:?}: the hot side is gone
    Idle(Duration),
    /// this side was promoted: the stream from the old hot side is cut
    NoLongerAdmitted,
}

async fn stream_in(
    mut reader: Reader,
    mut writer: Writer,
    jobs: &crossbeam_channel::Sender<Job>,
    stats: &Arc<ReceiverStats>,
    gate: &dyn Gate,
    epoch: u64,
) -> Result<(), ReceiveError> {
    // our index first: the hot side diffs against it
    let (tx, rx) = oneshot::channel();
    jobs.send(Job::Index(tx))
        .map_err(|_| ReceiveError::ApplyGone)?;
    let index = rx
        .await
        .map_err(|_| ReceiveError::ApplyGone)?
        .map_err(ReceiveError::Index)?;
    for (path, mode) in &index.dirs {
        writer
            .send(&Frame::IndexDir {
                path: path.clone(),
                mode: *mode,
            })
            .await?;
    }
    for (path, f) in index.files {
        writer
            .send(&Frame::IndexFile {
                path,
                len: f.len,
                mode: f.mode,
                pages: f.pages,
            })
            .await?;
    }
    writer.send(&Frame::IndexEnd).await?;
    writer.flush().await?;
    stats
        .wire_out_bytes
        .fetch_add(writer.bytes, Ordering::Relaxed);
    let mut counted = writer.bytes;
    stats.applied_seq.store(0, Ordering::Relaxed);

    let (in_tx, mut in_rx) = mpsc::channel::<Result<Frame, ProtoError>>(APPLY_QUEUE);
    let read_stats = stats.clone();
    let read_task = tokio::spawn(async move {
        loop {
            let f = reader.recv().await;
            read_stats.wire_bytes.store(reader.bytes, Ordering::Relaxed);
            let fatal = matches!(f, Err(ref e) if !matches!(e, ProtoError::BadMac { .. }));
            if in_tx.send(f).await.is_err() || fatal {
                return;
            }
        }
    });
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _guard = Abort(read_task);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Applied>();
    let mut rejecting = false;
    loop {
        tokio::select! {
            frame = tokio::time::timeout(IDLE_TIMEOUT, in_rx.recv()) => {
                let Ok(frame) = frame else { return Err(ReceiveError::Idle(IDLE_TIMEOUT)) };
                let Some(frame) = frame else { return Ok(()) };
                stats.last_frame_unix_ms.store(crate::sys::now_unix_ms(), Ordering::Relaxed);
                match frame {
                    Ok(Frame::Batch { .. }) if !gate.still_admitted(epoch) => {
                        return Err(ReceiveError::NoLongerAdmitted);
                    }
                    Ok(Frame::Batch { seq, ops }) => {
                        let jobs = jobs.clone();
                        let reply = done_tx.clone();
                        // the apply queue is bounded: waiting here is the back-pressure
                        tokio::task::block_in_place(|| jobs.send(Job::Batch { seq, ops, reply })).map_err(|_| ReceiveError::ApplyGone)?;
                    }
                    Ok(Frame::Heartbeat) => {}
                    Ok(Frame::Drained { seq }) => {
                        stats.drained.store(true, Ordering::Relaxed);
                        tracing::info!(seq, "the hot side drained its stream: the copy is complete");
                    }
                    Ok(other) => return Err(ProtoError::Unexpected(format!("{other:?} from the hot side")).into()),
                    Err(ProtoError::Closed) => return Ok(()),
                    Err(ProtoError::BadMac { seq }) => {
                        stats.mac_failures.fetch_add(1, Ordering::Relaxed);
                        let next = stats.applied_seq.load(Ordering::Relaxed) + 1;
                        tracing::error!(frame = seq, "a frame failed its authentication code and was dropped; asking for batch {next} again");
                        if !rejecting {
                            rejecting = true;
                            writer.send(&Frame::Nack { seq: next, reason: "a frame failed its authentication code".into() }).await?;
                            writer.flush().await?;
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            done = done_rx.recv() => match done.expect("we hold a sender") {
                Applied::Done { seq, bytes, digests } => {
                    rejecting = false;
                    stats.data_bytes.fetch_add(bytes, Ordering::Relaxed);
                    stats.applied_seq.store(seq, Ordering::Relaxed);
                    stats.batches.fetch_add(1, Ordering::Relaxed);
                    stats.last_ack_unix_ms.store(crate::sys::now_unix_ms(), Ordering::Relaxed);
                    for (id, root, files) in digests {
                        writer.send(&Frame::Digest { id, root, files }).await?;
                    }
                    writer.send(&Frame::Ack { seq }).await?;
                    writer.flush().await?;
                    stats.wire_out_bytes.fetch_add(writer.bytes - counted, Ordering::Relaxed);
                    counted = writer.bytes;
                }
                Applied::Skipped { .. } => {}
                Applied::Rejected { seq, reason } => {
                    stats.checksum_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(seq, "dropped batch {seq}: {reason}; nothing of it was written; asking for it again");
                    if !rejecting {
                        rejecting = true;
                        writer.send(&Frame::Nack { seq, reason }).await?;
                        writer.flush().await?;
                    }
                }
                Applied::Failed { seq, reason } => return Err(ReceiveError::Apply { seq, reason }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applier(root: &Path) -> Applier {
        Applier::new(root, 4096)
    }

    fn write(path: &str, offset: u64, data: Vec<u8>) -> Op {
        let hashes = data
            .chunks(4096)
            .map(|p| *blake3::hash(p).as_bytes())
            .collect();
        Op::Write {
            path: path.into(),
            offset,
            data,
            hashes,
        }
    }

    #[test]
    fn applies_in_order_and_skips_out_of_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = applier(dir.path());
        let ops = vec![
            Op::Mkdir {
                path: "journal".into(),
                mode: 0o750,
            },
            Op::SetFile {
                path: "journal/a.tmp".into(),
                len: 8192,
                mode: 0o600,
            },
            write("journal/a.tmp", 4096, vec![7; 4096]),
            Op::Rename {
                from: "journal/a.tmp".into(),
                to: "journal/a".into(),
            },
        ];
        assert!(matches!(
            a.batch(2, ops.clone()),
            Applied::Skipped { seq: 2 }
        ));
        assert!(matches!(a.batch(1, ops), Applied::Done { seq: 1, .. }));
        let data = fs::read(dir.path().join("journal/a")).unwrap();
        assert_eq!(data.len(), 8192);
        assert!(data[..4096].iter().all(|b| *b == 0) && data[4096..].iter().all(|b| *b == 7));
        assert!(matches!(
            a.batch(
                2,
                vec![Op::Remove {
                    path: "journal".into()
                }]
            ),
            Applied::Done { .. }
        ));
        assert!(!dir.path().join("journal").exists());
    }

    #[test]
    fn a_bad_page_rejects_the_whole_batch_before_any_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = applier(dir.path());
        let mut bad = write("f", 0, vec![1; 8192]);
        if let Op::Write { data, .. } = &mut bad {
            data[5000] ^= 1;
        }
        let ops = vec![
            Op::SetFile {
                path: "f".into(),
                len: 8192,
                mode: 0o644,
            },
            bad,
        ];
        let Applied::Rejected { reason, .. } = a.batch(1, ops) else {
            panic!()
        };
        assert!(
            reason.contains("offset 4096") && reason.contains("blake3"),
            "{reason}"
        );
        assert!(!dir.path().join("f").exists(), "nothing was written");
        assert_eq!(a.expected, 1);
    }

    #[test]
    fn escaping_paths_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("up")).unwrap();
        let mut a = applier(&root);
        for op in [
            Op::SetFile {
                path: "../escape".into(),
                len: 1,
                mode: 0o644,
            },
            Op::SetFile {
                path: "/etc/x".into(),
                len: 1,
                mode: 0o644,
            },
            Op::SetFile {
                path: "up/escape".into(),
                len: 1,
                mode: 0o644,
            },
            Op::Rename {
                from: "a".into(),
                to: "../b".into(),
            },
            write("up/x", 0, vec![0; 4096]),
        ] {
            let Applied::Rejected { reason, .. } = a.batch(1, vec![op.clone()]) else {
                panic!("{op:?} was not rejected")
            };
            assert!(reason.contains("refusing path"), "{reason}");
        }
        assert!(!dir.path().join("escape").exists());
    }
}
