//! The cold side's network: accepts the hot side's connection, authenticates it
//! ([`crate::replicated::channel`]), asks the [`Gate`] whether its epoch may stream, sends the
//! cold tree's index, then reads batches (a reader task) and hands them to the apply thread
//! ([`crate::replicated::apply`]), answering each with `Ack` once it is durable or `Nack` when it
//! failed a check. One hot side streams at a time; a newly authenticated one replaces it.
//!
//! [`start`] runs all of it; the agent keeps the [`ReceiverHandle`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::replicated::apply::{Applier, Job, APPLY_QUEUE};
use crate::replicated::channel::{self, Auth};
use crate::replicated::ops::Applied;
use crate::replicated::pages::{Entry, PageHash, PagesError};
use crate::replicated::wire::framed::ReadTask;
use crate::replicated::wire::{
    Frame, FrameReader, FrameWriter, ProtoError, DIGEST_CHUNK_BYTES, INDEX_CHUNK_PAGES,
};

pub use crate::replicated::stats::ReceiverStats;

/// A connection with no frame for this long is dead (the hot sends heartbeats every second).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// The write buffer of a connection (index, acknowledgements, digests).
const WRITE_BUFFER_BYTES: usize = 1 << 16;
/// The pause after a failed `accept` (out of descriptors, say) before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Connections still in their handshake at once; more are closed as soon as accepted.
pub const MAX_UNAUTHENTICATED: usize = 8;
/// A connection must be authenticated, introduced and admitted within this.
pub const ADMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections closed over [`MAX_UNAUTHENTICATED`] are logged at most this often.
const OVER_CAP_LOG_EVERY: Duration = Duration::from_secs(10);

/// Decides whether a hot side at a given epoch may stream to us.
pub trait Gate: Send + Sync {
    /// `Ok(our epoch)` to accept (the gate records the peer's epoch), `Err((our epoch, why))`
    /// to refuse.
    fn admit(&self, peer_epoch: u64, node: &str) -> Result<u64, (u64, String)>;
    /// Whether a stream admitted at `peer_epoch` may go on (false once this side is promoted).
    fn still_admitted(&self, peer_epoch: u64) -> bool;
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

/// A running receiver.
#[derive(Debug)]
pub struct ReceiverHandle {
    /// Counters.
    pub stats: Arc<ReceiverStats>,
    stop: tokio::sync::watch::Sender<bool>,
    jobs: crossbeam_channel::Sender<Job>,
}

impl ReceiverHandle {
    /// Waits until the apply thread has finished every batch queued so far; call it after the
    /// gate stopped admitting the stream (a promotion): the apply thread then applies nothing
    /// more. `false` if it did not answer within `limit`.
    pub fn fence(&self, limit: Duration) -> bool {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.jobs
            .send_timeout(Job::Fence(tx), limit)
            .is_ok_and(|()| rx.recv_timeout(limit).is_ok())
    }

    /// Stops accepting and drops the connection.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Serves hot sides on `listener` until stopped: the apply thread, and on `rt` the listener.
pub fn start(
    cfg: ReceiverConfig,
    listener: TcpListener,
    rt: &tokio::runtime::Handle,
) -> ReceiverHandle {
    let stats = Arc::new(ReceiverStats::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(APPLY_QUEUE);
    Applier::new(&cfg.root, cfg.page_size)
        .with_gate(cfg.gate.clone())
        .spawn(jobs_rx);
    rt.spawn(accept_loop(
        cfg,
        listener,
        jobs_tx.clone(),
        stats.clone(),
        stop_rx,
    ));
    ReceiverHandle {
        stats,
        stop: stop_tx,
        jobs: jobs_tx,
    }
}

/// Errors of the incoming stream, naming what failed.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ReceiveError {
    /// {0}
    Proto(#[from] ProtoError),
    /// cannot index the data directory: {0}
    Index(#[source] PagesError),
    /// batch {seq} could not be applied: the hot side resyncs from our index
    Resync { seq: u64 },
    /// the apply thread is gone
    ApplyGone,
    /// no frame for {0:?}: the hot side is gone
    Idle(Duration),
    /// this side was promoted: the stream from the old hot side is cut
    NoLongerAdmitted,
}

type Reader = FrameReader<channel::BoxRead>;
type Writer = FrameWriter<tokio::io::BufWriter<channel::BoxWrite>>;

/// What every connection shares.
#[derive(Clone)]
struct Shared {
    cfg: ReceiverConfig,
    jobs: crossbeam_channel::Sender<Job>,
    stats: Arc<ReceiverStats>,
    /// Held by the connection that streams: one at a time.
    streaming: Arc<tokio::sync::Mutex<()>>,
    /// The last reason a batch could not be applied (logged once while it stays the same).
    last_failure: Arc<std::sync::Mutex<Option<String>>>,
    /// The admitted connection's stream task: a newly admitted one aborts it.
    current: Arc<std::sync::Mutex<Option<tokio::task::AbortHandle>>>,
    /// One permit per connection not yet admitted: at most [`MAX_UNAUTHENTICATED`].
    handshakes: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    /// Replaces the admitted stream task (aborting the previous one); `None` aborts it only.
    fn replace_current(&self, next: Option<tokio::task::AbortHandle>) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(previous) = std::mem::replace(&mut *current, next) {
            previous.abort();
        }
    }
}

async fn accept_loop(
    cfg: ReceiverConfig,
    listener: TcpListener,
    jobs: crossbeam_channel::Sender<Job>,
    stats: Arc<ReceiverStats>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let shared = Shared {
        cfg,
        jobs,
        stats,
        streaming: Arc::new(tokio::sync::Mutex::new(())),
        last_failure: Arc::new(std::sync::Mutex::new(None)),
        current: Arc::new(std::sync::Mutex::new(None)),
        handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_UNAUTHENTICATED)),
    };
    let mut over_cap = OverCap::default();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            _ = stop.changed() => {
                shared.replace_current(None);
                return;
            }
        };
        let Ok(permit) = shared.handshakes.clone().try_acquire_owned() else {
            // dropping the stream closes it at once: a flood costs a descriptor for an instant
            over_cap.closed(peer);
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        tokio::spawn(serve(shared.clone(), stream, peer, permit));
    }
}

/// Connections closed because [`MAX_UNAUTHENTICATED`] handshakes were under way, logged at
/// most once per [`OVER_CAP_LOG_EVERY`].
#[derive(Default)]
struct OverCap {
    since_log: u64,
    last_log: Option<tokio::time::Instant>,
}

impl OverCap {
    fn closed(&mut self, peer: SocketAddr) {
        self.since_log += 1;
        if self
            .last_log
            .is_none_or(|t| t.elapsed() >= OVER_CAP_LOG_EVERY)
        {
            tracing::warn!(%peer, closed = self.since_log, "{MAX_UNAUTHENTICATED} replication handshakes are already under way: closed new connections at once");
            self.since_log = 0;
            self.last_log = Some(tokio::time::Instant::now());
        }
    }
}

/// One connection: authenticated and admitted within [`ADMIT_TIMEOUT`] (holding a handshake
/// permit meanwhile), it replaces the admitted stream and streams until it ends.
async fn serve(
    shared: Shared,
    stream: TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let stats = &shared.stats;
    // authenticate before touching the previous stream: a stranger cannot cut it off
    let admitted = tokio::time::timeout(ADMIT_TIMEOUT, admit(&shared.cfg, stream, peer, stats));
    let Some((reader, writer, epoch, node)) = (match admitted.await {
        Ok(x) => x,
        Err(_) => refused(
            stats,
            peer,
            &format!("no handshake within {ADMIT_TIMEOUT:?}"),
        ),
    }) else {
        return;
    };
    drop(permit);
    let task = tokio::spawn(stream_admitted(
        shared.clone(),
        reader,
        writer,
        peer,
        epoch,
        node,
    ));
    shared.replace_current(Some(task.abort_handle()));
}

/// An admitted hot side's stream, one at a time, until it ends.
async fn stream_admitted(
    shared: Shared,
    reader: Reader,
    writer: Writer,
    peer: SocketAddr,
    epoch: u64,
    node: String,
) {
    let stats = &shared.stats;
    let _one_at_a_time = shared.streaming.lock().await;
    tracing::info!(%peer, epoch, node, "hot side connected");
    stats.connected.store(true, Ordering::Relaxed);
    stats.drained.store(false, Ordering::Relaxed);
    stats.hot_epoch.store(epoch, Ordering::Relaxed);
    *stats.peer.lock().expect("peer lock") = Some(format!("{node} ({peer})"));
    let inbound = Inbound {
        writer,
        jobs: &shared.jobs,
        stats,
        gate: &*shared.cfg.gate,
        epoch,
        rejecting: false,
        last_failure: &shared.last_failure,
        counted: 0,
    };
    let result = inbound.run(reader).await;
    stats.connected.store(false, Ordering::Relaxed);
    match result {
        Ok(()) => {
            tracing::info!(%peer, drained = stats.drained.load(Ordering::Relaxed), "hot side went away")
        }
        Err(e @ ReceiveError::Resync { .. }) => tracing::info!(%peer, "{e}"),
        Err(e) => tracing::warn!(%peer, "replication stream: {}", crate::error_chain(&e)),
    }
}

/// Counts a refused peer and says why; `None`, for [`admit`] to return.
fn refused<T>(stats: &ReceiverStats, peer: SocketAddr, why: &str) -> Option<T> {
    stats.refused.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(%peer, "refused a replication peer: {why}");
    None
}

/// Handshake, epoch check and welcome; `None` (logged) when the peer is refused. Returns the
/// connection, and the hot side's epoch and holder id.
async fn admit(
    cfg: &ReceiverConfig,
    stream: TcpStream,
    peer: SocketAddr,
    stats: &ReceiverStats,
) -> Option<(Reader, Writer, u64, String)> {
    let (r, w) = match channel::wrap_accept(&cfg.auth, stream).await {
        Ok(x) => x,
        Err(e) => return refused(stats, peer, &crate::error_chain(&e)),
    };
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(tokio::io::BufWriter::with_capacity(WRITE_BUFFER_BYTES, w));
    if let Err(e) = channel::accept(&cfg.auth, &mut reader, &mut writer).await {
        return refused(stats, peer, &crate::error_chain(&e));
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
            let why = format!("expected its introduction, got {other:?}");
            return refused(stats, peer, &why);
        }
    };
    let answer = if usize::try_from(page_size).ok() != Some(cfg.page_size) {
        let why = format!(
            "page_size {page_size} differs from ours ({})",
            cfg.page_size
        );
        Err((0, why))
    } else {
        cfg.gate.admit(epoch, &node)
    };
    match answer {
        Ok(our) => {
            writer.send(&Frame::Welcome { epoch: our }).await.ok()?;
            writer.flush().await.ok()?;
            Some((reader, writer, epoch, node))
        }
        Err((our, reason)) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, node, peer_epoch = epoch, epoch = our, "refused a hot side: {reason}");
            let _ = writer.send(&Frame::Reject { epoch: our, reason }).await;
            let _ = writer.flush().await;
            None
        }
    }
}

/// An admitted hot side's stream: index out, batches in, answers out.
struct Inbound<'a> {
    writer: Writer,
    jobs: &'a crossbeam_channel::Sender<Job>,
    stats: &'a Arc<ReceiverStats>,
    gate: &'a dyn Gate,
    epoch: u64,
    /// A `Nack` is out and its batch not yet applied: further failures are not answered.
    rejecting: bool,
    /// The last reason a batch could not be applied, across connections: said once.
    last_failure: &'a std::sync::Mutex<Option<String>>,
    /// Writer bytes already added to the statistics.
    counted: u64,
}

impl Inbound<'_> {
    async fn run(mut self, reader: Reader) -> Result<(), ReceiveError> {
        self.send_index().await?;
        self.stats.applied_seq.store(0, Ordering::Relaxed);
        let read_stats = self.stats.clone();
        let mut frames = ReadTask::spawn(
            reader,
            APPLY_QUEUE,
            move |bytes| read_stats.wire_bytes.store(bytes, Ordering::Relaxed),
            |e| !matches!(e, ProtoError::BadMac { .. }),
        );
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Applied>();
        loop {
            tokio::select! {
                frame = tokio::time::timeout(IDLE_TIMEOUT, frames.frames.recv()) => {
                    let Ok(frame) = frame else { return Err(ReceiveError::Idle(IDLE_TIMEOUT)) };
                    let Some(frame) = frame else { return Ok(()) };
                    if !self.on_frame(frame, &done_tx).await? {
                        return Ok(());
                    }
                }
                done = done_rx.recv() => self.on_applied(done.expect("we hold a sender")).await?,
            }
        }
    }

    /// Our index first: the hot side diffs against it.
    async fn send_index(&mut self) -> Result<(), ReceiveError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Index(tx))
            .map_err(|_| ReceiveError::ApplyGone)?;
        let index = rx
            .await
            .map_err(|_| ReceiveError::ApplyGone)?
            .map_err(ReceiveError::Index)?;
        for (path, attrs) in &index.dirs {
            self.writer
                .send(&Frame::IndexDir {
                    path: path.clone(),
                    attrs: *attrs,
                })
                .await?;
        }
        for (path, mut f) in index.files {
            // the first chunk of pages goes with the file, the rest in IndexPages frames
            let rest = f.pages.split_off(f.pages.len().min(INDEX_CHUNK_PAGES));
            self.writer
                .send(&Frame::IndexFile {
                    path: path.clone(),
                    len: f.len,
                    attrs: f.attrs,
                    allocated: f.allocated,
                    pages: f.pages,
                })
                .await?;
            self.send_index_pages(&path, &rest).await?;
        }
        for (path, l) in index.links {
            self.writer
                .send(&Frame::IndexLink {
                    path,
                    target: l.target,
                    attrs: l.attrs,
                })
                .await?;
        }
        self.writer.send(&Frame::IndexEnd).await?;
        self.writer.flush().await?;
        self.count_out();
        Ok(())
    }

    /// The pages of a file beyond its [`Frame::IndexFile`]'s chunk, in chunks of
    /// [`INDEX_CHUNK_PAGES`].
    async fn send_index_pages(&mut self, path: &str, rest: &[PageHash]) -> Result<(), ProtoError> {
        let mut first_page = INDEX_CHUNK_PAGES;
        for chunk in rest.chunks(INDEX_CHUNK_PAGES) {
            self.writer
                .send(&Frame::IndexPages {
                    path: path.to_owned(),
                    first_page: first_page as u64,
                    pages: chunk.to_vec(),
                })
                .await?;
            first_page += chunk.len();
        }
        Ok(())
    }

    fn count_out(&mut self) {
        let out = self.writer.bytes - self.counted;
        self.stats.wire_out_bytes.fetch_add(out, Ordering::Relaxed);
        self.counted = self.writer.bytes;
    }

    /// One frame (or read error) from the hot side; `false` when the stream ended cleanly.
    async fn on_frame(
        &mut self,
        frame: Result<Frame, ProtoError>,
        done: &mpsc::UnboundedSender<Applied>,
    ) -> Result<bool, ReceiveError> {
        let stats = self.stats;
        stats
            .last_frame_unix_ms
            .store(crate::sys::now_unix_ms(), Ordering::Relaxed);
        match frame {
            Ok(Frame::Batch { .. }) if !self.gate.still_admitted(self.epoch) => {
                return Err(ReceiveError::NoLongerAdmitted);
            }
            Ok(Frame::Batch { seq, ops }) => {
                let reply = done.clone();
                // the apply queue is bounded: waiting here is the back-pressure
                let epoch = self.epoch;
                let job = Job::Batch {
                    seq,
                    epoch,
                    ops,
                    reply,
                };
                tokio::task::block_in_place(|| self.jobs.send(job))
                    .map_err(|_| ReceiveError::ApplyGone)?;
            }
            Ok(Frame::Heartbeat) => {}
            Ok(Frame::Drained { seq }) => {
                stats.drained.store(true, Ordering::Relaxed);
                tracing::info!(seq, "the hot side drained its stream: the copy is complete");
            }
            Ok(other) => {
                let what = format!("{other:?} from the hot side");
                return Err(ProtoError::Unexpected(what).into());
            }
            Err(ProtoError::Closed) => return Ok(false),
            Err(ProtoError::BadMac { seq }) => {
                stats.mac_failures.fetch_add(1, Ordering::Relaxed);
                let next = stats.applied_seq.load(Ordering::Relaxed) + 1;
                tracing::error!(frame = seq, "a frame failed its authentication code and was dropped; asking for batch {next} again");
                let reason = "a frame failed its authentication code".into();
                self.nack(next, reason).await?;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(true)
    }

    /// The apply thread's outcome for a batch.
    async fn on_applied(&mut self, applied: Applied) -> Result<(), ReceiveError> {
        let stats = self.stats;
        match applied {
            Applied::Done {
                seq,
                bytes,
                digests,
            } => {
                self.rejecting = false;
                stats.data_bytes.fetch_add(bytes, Ordering::Relaxed);
                stats.applied_seq.store(seq, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats
                    .last_ack_unix_ms
                    .store(crate::sys::now_unix_ms(), Ordering::Relaxed);
                for (id, root, files) in digests {
                    self.send_digest(id, root, files).await?;
                }
                self.writer.send(&Frame::Ack { seq }).await?;
                self.writer.flush().await?;
                self.count_out();
            }
            Applied::Skipped { .. } => {}
            Applied::Rejected { seq, reason } => {
                stats.checksum_failures.fetch_add(1, Ordering::Relaxed);
                return Err(self
                    .cannot_apply(seq, reason, "nothing of it was written")
                    .await);
            }
            Applied::Failed { seq, reason } => {
                let what = "what it wrote is not acknowledged";
                return Err(self.cannot_apply(seq, reason, what).await);
            }
        }
        Ok(())
    }

    /// Batch `seq` failed a check or could not be applied: resending it unchanged could fail
    /// for ever (a name that changed type, a missing parent, a full disk). Says why once
    /// (again only when the reason changes), answers `Nack`, and ends the stream: the hot side
    /// reconnects, our fresh index becomes its table, and it sends the paths involved (and
    /// whatever else differs) as they are now.
    async fn cannot_apply(&mut self, seq: u64, reason: String, written: &str) -> ReceiveError {
        let new = {
            let mut last = self.last_failure.lock().expect("failure lock");
            let new = last.as_deref() != Some(reason.as_str());
            *last = Some(reason.clone());
            new
        };
        if new {
            tracing::error!(
                seq,
                "cannot apply batch {seq}: {reason}; {written}; the hot side resyncs from our index (said once while the reason stays the same)"
            );
        } else {
            tracing::debug!(seq, "cannot apply batch {seq} again: {reason}");
        }
        if let Err(e) = self.nack(seq, reason).await {
            return e;
        }
        ReceiveError::Resync { seq }
    }

    /// A barrier's digest: [`Frame::DigestFiles`] chunks of at most [`DIGEST_CHUNK_BYTES`],
    /// then the [`Frame::Digest`] with the root and the last chunk.
    async fn send_digest(
        &mut self,
        id: u64,
        root: [u8; 32],
        files: Vec<(String, Entry)>,
    ) -> Result<(), ProtoError> {
        let mut chunk = Vec::new();
        let mut bytes = 0;
        for (path, digest) in files {
            let size =
                path.len() + digest.target.len() + crate::replicated::wire::codec::ENTRY_MIN_BYTES;
            if bytes + size > DIGEST_CHUNK_BYTES && !chunk.is_empty() {
                let files = std::mem::take(&mut chunk);
                self.writer.send(&Frame::DigestFiles { id, files }).await?;
                bytes = 0;
            }
            bytes += size;
            chunk.push((path, digest));
        }
        self.writer
            .send(&Frame::Digest {
                id,
                root,
                files: chunk,
            })
            .await
    }

    /// Asks for `seq` again, unless a request is already out.
    async fn nack(&mut self, seq: u64, reason: String) -> Result<(), ReceiveError> {
        if !self.rejecting {
            self.rejecting = true;
            self.writer.send(&Frame::Nack { seq, reason }).await?;
            self.writer.flush().await?;
        }
        Ok(())
    }
}
