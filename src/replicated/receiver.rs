//! The cold side's network: accepts the hot side's connection, authenticates it
//! ([`crate::replicated::channel`]), asks the [`Gate`] whether its epoch may stream, sends the
//! cold tree's index, then reads batches (a reader task) and hands them to the apply thread
//! ([`crate::replicated::apply`]), answering with `Ack` once a batch is durable (cumulative: with
//! async acks, under a steady stream, every few batches; see [`ACK_HOLD`]) or `Nack` when it
//! failed a check. One hot side streams at a time; a newly authenticated one replaces it.
//!
//! [`start`] runs all of it; the agent keeps the [`ReceiverHandle`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::replicated::apply::{Applier, Job, Jobs};
use crate::replicated::channel::{self, Auth};
use crate::replicated::hot_sync::HotSync;
use crate::replicated::pages::PagesError;
use crate::replicated::wire::{Frame, FrameReader, FrameWriter, ProtoError};

mod inbound;

use inbound::Inbound;

pub use crate::replicated::stats::ReceiverStats;

/// How long an applied batch's acknowledgement may wait for the batches after it when the
/// hot side asks for one every few batches (`Frame::Intro`'s `ack_every`, with async acks),
/// and how soon after an acknowledgement a batch must come to be held: the first batch after
/// a quiet spell is acknowledged at once.
pub const ACK_HOLD: Duration = Duration::from_millis(5);
/// A connection with no frame for this long is dead (the hot sends heartbeats every second);
/// so is one that takes none of our bytes for this long (`TCP_USER_TIMEOUT`).
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
/// While batches cannot be applied (a full, read-only or failing disk), a new connection's
/// index waits first (not after a first failure, which the resync usually mends: a name that
/// changed type, a page damaged in transit): this long after the second failure in a row,
/// doubling with each failure after it,
pub const FAILING_PAUSE_FIRST: Duration = Duration::from_secs(2);
/// up to this (once the disk is fixed, the copy catches up within about this long),
pub const FAILING_PAUSE_MAX: Duration = Duration::from_secs(30);
/// and at least this many times as long as the last index took: each connection hashes the
/// whole tree again, and against a disk that stays full that must not keep a core busy.
pub const FAILING_PAUSE_INDEX_FACTOR: u32 = 4;

/// The pause before indexing for a new connection after `failures` batches in a row could
/// not be applied, the last index having taken `index_took`.
pub fn failing_pause(failures: u32, index_took: Duration) -> Duration {
    if failures < 2 {
        return Duration::ZERO;
    }
    let doublings = failures.saturating_sub(2).min(16);
    FAILING_PAUSE_FIRST
        .saturating_mul(1 << doublings)
        .max(index_took.saturating_mul(FAILING_PAUSE_INDEX_FACTOR))
        .min(FAILING_PAUSE_MAX)
}

/// A hot side refused: what [`Frame::Reject`] tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Our epoch.
    pub epoch: u64,
    /// Whether we are hot at it (two hot sides at one epoch settle it by holder id,
    /// [`crate::replicated::state::tie_break`]).
    pub hot: bool,
    /// Why.
    pub reason: String,
}

/// Decides whether a hot side at a given epoch may stream to us.
pub trait Gate: Send + Sync {
    /// Our holder id, named in our refusals.
    fn node(&self) -> &str;
    /// `Ok(our epoch)` to accept (the gate records the peer's epoch), `Err` to refuse; a hot
    /// side at our epoch, `node`, is settled by [`crate::replicated::state::tie_break`].
    fn admit(&self, peer_epoch: u64, node: &str) -> Result<u64, Refusal>;
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
    /// Where the apply thread keeps its page memo across restarts (`None`: only in memory).
    pub memo_file: Option<PathBuf>,
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
    jobs: Jobs,
}

impl ReceiverHandle {
    /// Waits until the apply thread has finished every batch queued so far; call it after the
    /// gate stopped admitting the stream (a promotion): the apply thread then applies nothing
    /// more. If it did not answer within `limit` (a stalled disk), the fence is handed back,
    /// for [`Self::fence_passed`] to check again later without queuing another.
    pub fn fence(&self, limit: Duration) -> Result<(), PendingFence> {
        let mut pending = PendingFence { answer: None };
        if self.fence_passed(&mut pending, limit) {
            Ok(())
        } else {
            Err(pending)
        }
    }

    /// Whether the apply thread has answered `pending` (every batch queued before it is done),
    /// waiting at most `limit` (zero: a look); first queues it if the queue had no room
    /// before. A gone apply thread never answers: `false`, as while it still writes.
    pub fn fence_passed(&self, pending: &mut PendingFence, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let answer = match &pending.answer {
            Some(rx) => rx,
            None => {
                let (tx, rx) = crossbeam_channel::bounded(1);
                if self.jobs.send_timeout(Job::Fence(tx), limit).is_err() {
                    return false;
                }
                pending.answer.insert(rx)
            }
        };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        answer.recv_timeout(left).is_ok()
    }

    /// The hot side's sync state from its last heartbeat, with when it arrived: whether a
    /// promotion now would lose confirmed syncs ([`HotSync::rpo`]). `None` before any.
    pub fn hot_sync(&self) -> Option<HotSync> {
        *self
            .stats
            .hot_sync
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Stops accepting and drops the connection.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// A clean stop, after [`Self::stop`]: once the batches queued are done, the apply
    /// thread writes its page memo for the next start. `false` if it did not within `limit`
    /// (the next start then hashes what the memo would have vouched for).
    pub fn save_memo(&self, limit: Duration) -> bool {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.jobs
            .send_timeout(Job::Save(tx), limit)
            .is_ok_and(|()| rx.recv_timeout(limit).is_ok())
    }
}

/// A fence ([`ReceiverHandle::fence`]) the apply thread has not answered yet: until it does,
/// the apply thread may still be writing a batch of the old stream into the data directory.
#[derive(Debug)]
pub struct PendingFence {
    /// Where the apply thread answers; `None` while the fence is not queued yet (the queue
    /// had no room).
    answer: Option<crossbeam_channel::Receiver<()>>,
}

#[cfg(test)]
impl PendingFence {
    /// A fence not queued yet, for tests of what waits on one.
    pub(crate) fn unqueued() -> PendingFence {
        PendingFence { answer: None }
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
    let taken = Arc::new(tokio::sync::Notify::new());
    let mut applier = Applier::new(&cfg.root, cfg.page_size)
        .with_gate(cfg.gate.clone())
        .with_taken(taken.clone());
    if let Some(path) = &cfg.memo_file {
        applier = applier.with_memo_file(path.clone());
    }
    let jobs_tx = applier.spawn();
    rt.spawn(accept_loop(
        cfg,
        listener,
        (jobs_tx.clone(), taken),
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
    /// frames kept failing their authentication code while batch {seq} was asked for again: the hot side resyncs from our index
    BadMacAgain { seq: u64 },
    /// the apply thread is gone
    ApplyGone,
    /// no frame for {0:?}: the hot side is gone
    Idle(Duration),
    /// this side was promoted: the stream from the old hot side is cut
    NoLongerAdmitted,
}

pub(crate) type Reader = FrameReader<channel::BoxRead>;
pub(crate) type Writer = FrameWriter<tokio::io::BufWriter<channel::BoxWrite>>;

/// What every connection shares.
#[derive(Clone)]
struct Shared {
    cfg: ReceiverConfig,
    jobs: Jobs,
    stats: Arc<ReceiverStats>,
    /// Held by the connection that streams: one at a time.
    streaming: Arc<tokio::sync::Mutex<()>>,
    /// The admitted connection's stream task: a newly admitted one aborts it.
    current: Arc<std::sync::Mutex<Option<tokio::task::AbortHandle>>>,
    /// One permit per connection not yet admitted: at most [`MAX_UNAUTHENTICATED`].
    handshakes: Arc<tokio::sync::Semaphore>,
    /// Told each time the apply thread takes a job.
    taken: Arc<tokio::sync::Notify>,
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
    (jobs, taken): (Jobs, Arc<tokio::sync::Notify>),
    stats: Arc<ReceiverStats>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let shared = Shared {
        cfg,
        jobs,
        stats,
        streaming: Arc::new(tokio::sync::Mutex::new(())),
        current: Arc::new(std::sync::Mutex::new(None)),
        handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_UNAUTHENTICATED)),
        taken,
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
    let Some((reader, writer, epoch, node, ack_every)) = (match admitted.await {
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
        ack_every,
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
    ack_every: u16,
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
        taken: &shared.taken,
        stats,
        gate: &*shared.cfg.gate,
        epoch,
        rejecting: false,
        counted: 0,
        in_flight: 0,
        ack_every: u64::from(ack_every.max(1)),
        held: None,
        last_ack: None,
    };
    let result = inbound.run(reader).await;
    stats.connected.store(false, Ordering::Relaxed);
    match result {
        Ok(()) => {
            tracing::info!(%peer, drained = stats.drained.load(Ordering::Relaxed), "hot side went away")
        }
        Err(e @ ReceiveError::Resync { .. }) => tracing::debug!(%peer, "{e}"),
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
/// connection, and the hot side's epoch, holder id and acknowledgement interval.
async fn admit(
    cfg: &ReceiverConfig,
    stream: TcpStream,
    peer: SocketAddr,
    stats: &ReceiverStats,
) -> Option<(Reader, Writer, u64, String, u16)> {
    // a write to a hot side that stopped reading (a frozen agent, a paused VM: its kernel
    // keeps the connection with a shut window) would wait for ever, and with the index or a
    // digest the apply thread waits with it (for room to hand over the next part), so that a
    // promotion's fence never passes
    if let Err(e) = channel::set_user_timeout(&stream, IDLE_TIMEOUT) {
        tracing::warn!(%peer, "cannot set TCP_USER_TIMEOUT on the replication connection (a hot side that stops reading may hold the apply thread): {e}");
    }
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
    let (epoch, node, page_size, ack_every) = match intro {
        Ok(Ok(Frame::Intro {
            epoch,
            hot: true,
            node,
            page_size,
            ack_every,
        })) => (epoch, node, page_size, ack_every),
        other => {
            let why = format!("expected its introduction, got {other:?}");
            return refused(stats, peer, &why);
        }
    };
    let answer = if usize::try_from(page_size).ok() != Some(cfg.page_size) {
        let reason = format!(
            "page_size {page_size} differs from ours ({})",
            cfg.page_size
        );
        Err(Refusal {
            epoch: 0,
            hot: false,
            reason,
        })
    } else {
        cfg.gate.admit(epoch, &node)
    };
    match answer {
        Ok(our) => {
            writer.send(&Frame::Welcome { epoch: our }).await.ok()?;
            writer.flush().await.ok()?;
            Some((reader, writer, epoch, node, ack_every))
        }
        Err(Refusal {
            epoch: our,
            hot,
            reason,
        }) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            if hot && our == epoch {
                tracing::error!(%peer, node, peer_epoch = epoch, epoch = our, "refused a hot side at our epoch: {reason}");
            } else {
                tracing::warn!(%peer, node, peer_epoch = epoch, epoch = our, "refused a hot side: {reason}");
            }
            let refusal = Frame::Reject {
                epoch: our,
                hot,
                node: cfg.gate.node().to_owned(),
                reason,
            };
            let _ = writer.send(&refusal).await;
            let _ = writer.flush().await;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue16_a_failing_disk_is_indexed_again_after_growing_pauses() {
        let ms =
            |f, i| u64::try_from(failing_pause(f, Duration::from_millis(i)).as_millis()).unwrap();
        let small: Vec<u64> = (1..=8).map(|f| ms(f, 10)).collect();
        assert_eq!(small, [0, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
        // a large tree: at most a fifth of the time spent indexing
        assert_eq!(ms(2, 5000), 20000);
        assert_eq!(ms(1, 5000), 0);
        assert_eq!(ms(u32::MAX, 0), 30000);
    }

    /// A hot side that stops reading while the cold side streams its index (a frozen agent, a
    /// paused VM: its kernel keeps the connection open with a shut receive window) must not
    /// hold the connection task in its write for ever, and with it the apply thread, which
    /// waits for room to hand over the next index part: a promotion's fence would never pass.
    #[test]
    fn issue13_a_hot_side_that_stops_reading_the_index_is_given_up_and_frees_the_apply_thread() {
        use crate::config::ReplRole;
        use crate::replicated::state::{EpochGate, ReplState};
        use crate::replicated::wire::Frame;

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        // an index of many megabytes, more than the socket buffers and the queues hold: long
        // paths (each file's index frame carries its whole path)
        let mut deep = root.clone();
        for level in 0..14 {
            deep.push(format!("{level:02}{}", "d".repeat(238)));
        }
        std::fs::create_dir_all(&deep).unwrap();
        for i in 0..4000 {
            std::fs::write(deep.join(format!("{i:05}{}", "f".repeat(95))), b"").unwrap();
        }
        let (step_tx, _step_rx) = crossbeam_channel::bounded(4);
        let cold = ReplState {
            epoch: 0,
            role: ReplRole::Cold,
        };
        let gate = Arc::new(EpochGate::new(
            cold,
            dir.path().join("state.json"),
            "cold".into(),
            step_tx,
        ));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = ReceiverConfig {
            root,
            page_size: 4096,
            auth: Auth::Insecure,
            gate,
            memo_file: None,
        };
        let handle = start(cfg, listener, rt.handle());
        // a hot side that is welcomed, then reads nothing more
        let _conn = rt.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            let (r, w) = socket.connect(addr).await.unwrap().into_split();
            let (mut r, mut w) = (FrameReader::new(r), FrameWriter::new(w));
            channel::connect(&Auth::Insecure, &mut r, &mut w)
                .await
                .unwrap();
            w.send(&Frame::Intro {
                epoch: 1,
                hot: true,
                node: "frozen".into(),
                page_size: 4096,
                ack_every: 1,
            })
            .await
            .unwrap();
            w.flush().await.unwrap();
            assert_eq!(r.recv().await.unwrap(), Frame::Welcome { epoch: 1 });
            (r, w)
        });
        // what `promote` does once the gate has turned: the apply thread answers in time
        let began = std::time::Instant::now();
        assert!(
            handle.fence(Duration::from_secs(20)).is_ok(),
            "the apply thread was still held by the index for the silent hot side after {:?}",
            began.elapsed()
        );
        handle.stop();
    }
}
