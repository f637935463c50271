//! The hot side's network task: connects to the cold side, authenticates
//! ([`crate::replicated::channel`]), introduces itself (epoch, holder, page size), reads the
//! cold side's index and hands it to the scanner (which resyncs against it), then streams:
//! numbers each batch the scanner emits, frames and sends it, keeps it in a window bounded in
//! bytes until it is acknowledged, resends from a `Nack`ed batch, answers `verify` and `drain`,
//! and sends a heartbeat every second carrying our sync state ([`HotState`]: durable or async,
//! degraded since when, how old the oldest unacknowledged batch is), which a promoted cold side
//! reports as its RPO. A lost connection is retried with growing pauses; whatever the scanner
//! emitted meanwhile is dropped, because the next connection's index resyncs it.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::replicated::capture::fuse::DurableConfig;
use crate::replicated::capture::ScanControl;
use crate::replicated::channel::{self, Auth};
use crate::replicated::ops::{DigestPart, Op, Outgoing, ScanMsg, SenderEvent};
use crate::replicated::pages::{IndexPart, TreeIndex};
use crate::replicated::receiver::ADMIT_TIMEOUT;
use crate::replicated::stats::SenderStats;
use crate::replicated::wire::framed::{encode_body, Encoded, ReadTask};
use crate::replicated::wire::{Frame, FrameReader, FrameWriter, HotState, ProtoError};

/// The hot sends a heartbeat (with its sync state) this often, busy or not.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Connecting to the cold side gives up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The first pause before reconnecting; each failure in a row doubles it (a connection that
/// streamed starts it again).
pub const RECONNECT_FIRST: Duration = Duration::from_millis(50);
/// Reconnect pauses grow to this.
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// With async acks, how long the cold side may leave a batch unacknowledged while the window
/// is full (or keep its receive window shut) before the connection is given up. Durable acks
/// use `peer_timeout_ms` instead.
pub(crate) const ASYNC_STALL_LIMIT: Duration = Duration::from_secs(10);
/// The shortest stall limit (and `TCP_USER_TIMEOUT`) a connection gets, whatever
/// `peer_timeout_ms` says: Linux retransmits a lost segment after 200 ms at the soonest, then
/// after 400 ms, so a shorter limit would end a healthy connection at its first lost packet
/// (or a window briefly full) and resync, where a short `peer_timeout_ms` only means that
/// durable syncs stop waiting sooner.
pub(crate) const MIN_STALL_LIMIT: Duration = Duration::from_secs(1);
/// With async acks, the cold side acknowledges every this many batches (and a batch after
/// the last one at most `receiver::ACK_HOLD` later): an acknowledgement per batch was half of
/// this task's wake-ups under a steady stream of small writes (docs/performance-log.md, run
/// 28). Durable acks are asked for each batch at once: a sync waits for its batch's.
const ASYNC_ACK_EVERY: u16 = 4;
/// The stall check runs every quarter of the limit, but not more often than this.
const STALL_CHECK_MIN: Duration = Duration::from_millis(10);
/// The connection's write buffer (batches are up to a megabyte of pages).
const SEND_BUFFER_BYTES: usize = 1 << 20;
/// Frames from the cold side waiting for the network task: acknowledgements, and the parts
/// of a `verify` digest, which wait here while the scanner compares those before them (so
/// few of them, or a tree's digest could queue up decoded).
const ANSWER_QUEUE: usize = 4;

/// What the network task needs.
#[derive(Debug, Clone)]
pub(crate) struct StreamConfig {
    /// The cold side's address.
    pub(crate) peer: SocketAddr,
    /// How to authenticate.
    pub(crate) auth: Auth,
    /// Our holder id, for the cold side's logs.
    pub(crate) node: String,
    /// Our epoch.
    pub(crate) epoch: u64,
    /// Replication unit.
    pub(crate) page_size: usize,
    /// Unacknowledged page data allowed in flight.
    pub(crate) window_bytes: usize,
    /// Durable acks (`None`: async), for the heartbeat's sync state.
    pub(crate) durable: Option<DurableConfig>,
}

impl StreamConfig {
    /// How long a stalled cold side (a frozen agent or VM, whose kernel keeps the connection
    /// open but reads and acknowledges nothing) is waited for before the connection is given
    /// up: `peer_timeout_ms` with durable acks, [`ASYNC_STALL_LIMIT`] otherwise. Given up, the
    /// node's writes go on (they would block once the window and the queues behind it fill)
    /// and the next connection resyncs. With `on_peer_loss = "block"` syncs still wait. Never
    /// below [`MIN_STALL_LIMIT`].
    pub(crate) fn stall_limit(&self) -> Duration {
        self.durable
            .as_ref()
            .map_or(ASYNC_STALL_LIMIT, |d| d.peer_timeout)
            .max(MIN_STALL_LIMIT)
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
    /// peer {peer} did not answer our introduction within {limit:?}
    NoWelcome { peer: SocketAddr, limit: Duration },
    /// peer {peer} acknowledged nothing for {limit:?} with the window full: given up (it will be resynced)
    Stalled { peer: SocketAddr, limit: Duration },
    /// page size {0} does not fit the protocol's 32 bits
    PageSize(usize),
}

type Reader = FrameReader<channel::BoxRead>;
type Writer = FrameWriter<tokio::io::BufWriter<channel::BoxWrite>>;

/// The scanner's side of the network task.
pub(crate) struct ScannerLink {
    /// What the scanner emits.
    pub(crate) out: mpsc::Receiver<Outgoing>,
    /// Where a connection's index goes, and news of a lost connection.
    pub(crate) ctl: ScanControl,
}

/// The network task: one connection after another until stopped.
pub(crate) async fn run_net(
    cfg: StreamConfig,
    mut scanner: ScannerLink,
    stats: Arc<SenderStats>,
    events: Sender<SenderEvent>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut gen = 0u64;
    let mut pause = RECONNECT_FIRST;
    // the same failure again (a cold side that cannot apply a batch until it has room) is
    // said once, not at every reconnection
    let mut last_error = String::new();
    let mut last_nack = String::new();
    loop {
        gen += 1;
        let result = stream_once(
            &cfg,
            gen,
            &mut scanner,
            (&stats, &events, &mut last_nack),
            &mut stop,
        )
        .await;
        let streamed = stats.connected.swap(false, Ordering::Relaxed);
        stats.acks.disconnected(gen);
        stats.sync.abort();
        stats.window_bytes.store(0, Ordering::Relaxed);
        stats.oldest_unacked_unix_ms.store(0, Ordering::Relaxed);
        let _ = scanner.ctl.send(ScanMsg::Disconnected);
        if streamed {
            // the pauses grew with failures in a row, not with the agent's age: a stream lost
            // after hours is retried at once (durable syncs wait for it meanwhile)
            pause = RECONNECT_FIRST;
        }
        match result {
            Ok(()) => return,
            Err(e) => {
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
                let text = crate::error_chain(&e);
                if text == last_error {
                    tracing::debug!(peer = %cfg.peer, "replication connection: {text}; reconnecting in {} ms", pause.as_millis());
                } else {
                    tracing::warn!(peer = %cfg.peer, "replication connection: {text}; reconnecting in {} ms", pause.as_millis());
                    last_error = text;
                }
            }
        }
        if !pause_before_reconnect(pause, &mut scanner.out, &mut stop).await {
            return;
        }
        pause = (pause * 2).min(RECONNECT_MAX);
    }
}

/// Waits `pause`, dropping what the scanner sends meanwhile (the next index resyncs it) and
/// failing its verify and drain requests; `false` if told to stop.
async fn pause_before_reconnect(
    pause: Duration,
    out_rx: &mut mpsc::Receiver<Outgoing>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    let deadline = tokio::time::Instant::now() + pause;
    let dropped = "the connection to the cold side dropped";
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return true,
            _ = stop.changed() => return false,
            out = out_rx.recv() => match out {
                None => return false,
                // dropping its parts' channel fails the scanner's verify
                Some(Outgoing::Verify { .. }) => {}
                Some(Outgoing::Drain { reply, .. }) => { let _ = reply.send(Err(dropped.into())); }
                Some(Outgoing::Batch { .. } | Outgoing::Synced { .. }) => {}
            },
        }
    }
}

/// One connection, from connect to its end: `Ok` when stopped, an error when it broke.
async fn stream_once(
    cfg: &StreamConfig,
    gen: u64,
    scanner: &mut ScannerLink,
    (stats, events, last_nack): (&Arc<SenderStats>, &Sender<SenderEvent>, &mut String),
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), SendError> {
    let peer = cfg.peer;
    // the set-up heeds a stop too: the cold side's index of a large tree takes a while (and
    // a cold side that stopped answering part way is given up only by the socket's timeouts)
    let setup = async {
        let (mut reader, mut writer) = connect(cfg).await?;
        introduce(cfg, &mut reader, &mut writer, events).await?;
        // the cold side now walks its tree for the index; the scanner hashes ours meanwhile
        let _ = scanner.ctl.send(ScanMsg::Prehash);
        let index = receive_index(&mut reader)
            .await
            .map_err(|source| SendError::Proto { peer, source })?;
        Ok::<_, SendError>((reader, writer, index))
    };
    let (reader, writer, index) = tokio::select! {
        set_up = setup => set_up?,
        _ = stop.changed() => return Ok(()),
    };
    tracing::info!(%peer, files = index.files.len(), "connected to the cold side");
    stats.connected.store(true, Ordering::Relaxed);
    stats.acked_seq.store(0, Ordering::Relaxed);
    stats.sent_seq.store(0, Ordering::Relaxed);
    // not caught up until the scanner's comparison against this index is done (our first
    // heartbeat goes out before the scanner has even read the index)
    stats.initial_done.store(false, Ordering::Release);
    // (before the scanner can flush on this connection: see `ack_watch`)
    stats.acks.connected(gen);
    let _ = scanner.ctl.send(ScanMsg::Resync { gen, index });
    // durable syncs hear of each ack from the reader itself, not through this task
    let watch = Arc::clone(stats);
    let on_frame = move |frame: &mut Result<Frame, ProtoError>, _bytes| {
        // an ack of a batch never sent (a broken cold side) answers no sync, and is replaced
        // by the error that ends the connection: judged here once, against what was sent
        // when it was read (the network task may send that batch before it reads the ack)
        if let Ok(Frame::Ack { seq }) = frame {
            let seq = *seq;
            let sent = watch.sent_seq.load(Ordering::Acquire);
            if seq <= sent {
                watch.acks.acked(gen, seq);
            } else {
                *frame = Err(ProtoError::Unexpected(format!(
                    "an acknowledgement of batch {seq}, which was never sent (the last sent is {sent})"
                )));
            }
        }
    };
    let mut answers = ReadTask::spawn(reader, ANSWER_QUEUE, on_frame, |_| true);
    let mut outbound = Outbound {
        peer,
        gen,
        writer,
        stats,
        events,
        window: VecDeque::new(),
        window_bytes: 0,
        window_limit: cfg.window_bytes,
        next_seq: 1,
        verifies: HashMap::new(),
        drains: Vec::new(),
        syncs: Vec::new(),
        durable: cfg.durable.clone(),
        last_nack,
    };
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let stall_limit = cfg.stall_limit();
    let mut stall_check = tokio::time::interval((stall_limit / 4).max(STALL_CHECK_MIN));
    stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            out = scanner.out.recv(), if outbound.window_bytes < outbound.window_limit => match out {
                None => return Ok(()),
                Some(out) => outbound.on_outgoing(out).await?,
            },
            frame = answers.frames.recv() => {
                let Some(frame) = frame else { return Err(outbound.proto(ProtoError::Closed)) };
                let frame = frame.map_err(|e| outbound.proto(e))?;
                outbound.on_frame(frame).await?;
            }
            _ = heartbeat.tick() => outbound.heartbeat().await?,
            _ = stall_check.tick() => outbound.check_stall(stall_limit)?,
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// How often the cold side is asked to acknowledge ([`Frame::Intro`]): each batch with durable
/// acks (a sync waits for its batch's); with async acks every [`ASYNC_ACK_EVERY`] batches, or
/// fewer when the window holds fewer than twice that many full batches (a window held up by
/// acknowledgements would stall the stream).
fn ack_every(cfg: &StreamConfig) -> u16 {
    if cfg.durable.is_some() {
        return 1;
    }
    let batches = cfg.window_bytes / (2 * crate::replicated::capture::BATCH_DATA_BYTES);
    u16::try_from(batches)
        .unwrap_or(u16::MAX)
        .clamp(1, ASYNC_ACK_EVERY)
}

/// TCP (with a timeout), then TLS or not, then the handshake.
async fn connect(cfg: &StreamConfig) -> Result<(Reader, Writer), SendError> {
    let peer = cfg.peer;
    let proto = |source| SendError::Proto { peer, source };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(peer))
        .await
        .map_err(|_| SendError::Connect {
            peer,
            source: io::Error::new(io::ErrorKind::TimedOut, "timed out"),
        })?
        .map_err(|source| SendError::Connect { peer, source })?;
    if let Err(e) = channel::set_user_timeout(&stream, cfg.stall_limit()) {
        tracing::warn!(%peer, "cannot set TCP_USER_TIMEOUT on the replication connection (a stalled cold side may hold the writes up): {e}");
    }
    let (r, w) = channel::wrap_connect(&cfg.auth, stream)
        .await
        .map_err(proto)?;
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(tokio::io::BufWriter::with_capacity(SEND_BUFFER_BYTES, w));
    channel::connect(&cfg.auth, &mut reader, &mut writer)
        .await
        .map_err(proto)?;
    Ok((reader, writer))
}

/// Sends our epoch, holder and page size; the cold side welcomes us or refuses us (a newer
/// epoch: the agent hears of it and steps down).
async fn introduce(
    cfg: &StreamConfig,
    reader: &mut Reader,
    writer: &mut Writer,
    events: &Sender<SenderEvent>,
) -> Result<(), SendError> {
    let peer = cfg.peer;
    let proto = |source| SendError::Proto { peer, source };
    let page_size = u32::try_from(cfg.page_size).map_err(|_| SendError::PageSize(cfg.page_size))?;
    writer
        .send(&Frame::Intro {
            epoch: cfg.epoch,
            hot: true,
            node: cfg.node.clone(),
            page_size,
            ack_every: ack_every(cfg),
        })
        .await
        .map_err(proto)?;
    writer.flush().await.map_err(proto)?;
    // the cold side answers at once, or gives up on us itself by then: a peer stopped (or
    // gone) after the handshake must not keep us waiting for ever
    let limit = ADMIT_TIMEOUT;
    let answer = tokio::time::timeout(limit, reader.recv())
        .await
        .map_err(|_| SendError::NoWelcome { peer, limit })?;
    match answer.map_err(proto)? {
        // a cold side that admits us records our epoch and answers with it
        Frame::Welcome { epoch } if epoch == cfg.epoch => {
            // the peer is cold and knows no newer epoch: a hot that waits may start its node
            let _ = events.try_send(SenderEvent::Welcomed { epoch });
            Ok(())
        }
        // it knows a newer one after all: as a refusal (the agent steps down), never as a
        // confirmation that lets a waiting hot start its node
        Frame::Welcome { epoch } if epoch > cfg.epoch => {
            let reason = format!(
                "it welcomed us at epoch {epoch}, newer than ours ({})",
                cfg.epoch
            );
            Err(rejected(peer, (epoch, false, peer.to_string()), reason, events))
        }
        // it did not record ours: nothing it acknowledges could be trusted to be under it
        Frame::Welcome { epoch } => Err(proto(ProtoError::Unexpected(format!(
            "a welcome at epoch {epoch}, older than ours ({}): the cold side did not record our epoch",
            cfg.epoch
        )))),
        Frame::Reject {
            epoch,
            hot,
            node,
            reason,
        } => Err(rejected(peer, (epoch, hot, node), reason, events)),
        other => Err(proto(ProtoError::Unexpected(format!(
            "{other:?} instead of Welcome"
        )))),
    }
}

/// The peer refused us, at its epoch, hot at it or not, naming itself ([`Frame::Reject`]):
/// tells the agent, and ends the connection. Never waits on the agent (a network task blocked
/// here while the agent stops the sender would hold both): with its queue full the agent has
/// events still to read, and the next connection is refused again.
fn rejected(
    peer: SocketAddr,
    (epoch, hot, node): (u64, bool, String),
    reason: String,
    events: &Sender<SenderEvent>,
) -> SendError {
    let _ = events.try_send(SenderEvent::Rejected {
        epoch,
        hot,
        node,
        reason: reason.clone(),
    });
    SendError::Rejected {
        peer,
        epoch,
        reason,
    }
}

/// The cold side's tree, as it sends it after the welcome (streamed as it walks it, in path
/// order): a file's page hashes may continue in [`Frame::IndexPages`] frames right after its
/// [`Frame::IndexFile`].
async fn receive_index(reader: &mut Reader) -> Result<TreeIndex, ProtoError> {
    let mut index = TreeIndex::default();
    // the file whose pages may continue, and its state so far
    let mut open = None;
    loop {
        let part = match reader.recv().await? {
            Frame::IndexPages {
                path,
                first_page,
                pages,
            } => IndexPart::Pages {
                path,
                first_page,
                pages,
            },
            Frame::IndexDir { path, attrs } => IndexPart::Dir { path, attrs },
            Frame::IndexFile {
                path,
                len,
                attrs,
                allocated,
                pages,
            } => IndexPart::File {
                path,
                len,
                attrs,
                allocated,
                pages,
            },
            Frame::IndexLink {
                path,
                target,
                attrs,
            } => IndexPart::Link {
                path,
                target,
                attrs,
            },
            Frame::IndexEnd => {
                index.close_file(&mut open);
                return Ok(index);
            }
            other => return Err(ProtoError::Unexpected(format!("{other:?} in the index"))),
        };
        index
            .add_part(&mut open, part)
            .map_err(ProtoError::Unexpected)?;
    }
}

/// A connection's sending state: the window of unacknowledged batches, and the verify and
/// drain requests waiting for an answer.
struct Outbound<'a> {
    peer: SocketAddr,
    gen: u64,
    writer: Writer,
    stats: &'a SenderStats,
    events: &'a Sender<SenderEvent>,
    /// Sent and not yet acknowledged: sequence number, encoded frame, when it was sent.
    window: VecDeque<(u64, Encoded, tokio::time::Instant)>,
    window_bytes: usize,
    window_limit: usize,
    next_seq: u64,
    /// Verify requests by barrier id: where the parts of the cold side's digest go (the
    /// scanner compares them with its table as they come).
    verifies: HashMap<u64, Sender<DigestPart>>,
    drains: Vec<Sender<Result<u64, String>>>,
    /// Durable syncs waiting for the ack of the batch numbered with them.
    syncs: Vec<(u64, Sender<()>)>,
    /// Durable acks, for the heartbeat.
    durable: Option<DurableConfig>,
    /// The reason of the last `Nack`, across connections: the same one again is not logged.
    last_nack: &'a mut String,
}

impl Outbound<'_> {
    fn proto(&self, source: ProtoError) -> SendError {
        SendError::Proto {
            peer: self.peer,
            source,
        }
    }

    async fn send_flush(&mut self, frame: &Frame) -> Result<(), SendError> {
        self.writer.send(frame).await.map_err(|e| self.proto(e))?;
        self.writer.flush().await.map_err(|e| self.proto(e))
    }

    /// Something from the scanner; what was made for an earlier connection is dropped.
    async fn on_outgoing(&mut self, out: Outgoing) -> Result<(), SendError> {
        match out {
            Outgoing::Batch { gen, ops } if gen == self.gen => self.send_batch(ops).await?,
            Outgoing::Batch { .. } => {}
            Outgoing::Verify { gen, id, parts } => {
                // one made for an earlier connection is dropped: the scanner hears of it
                if gen == self.gen {
                    self.verifies.insert(id, parts);
                }
            }
            Outgoing::Drain { gen, reply } => {
                if gen != self.gen {
                    let _ = reply.send(Err("the connection changed during drain".into()));
                } else if self.window.is_empty() {
                    let seq = self.send_drained().await?;
                    let _ = reply.send(Ok(seq));
                } else {
                    self.drains.push(reply);
                }
            }
            Outgoing::Synced { gen, reply } if gen == self.gen => {
                if self.window.is_empty() {
                    let _ = reply.send(());
                } else {
                    self.syncs.push((self.next_seq - 1, reply));
                }
            }
            Outgoing::Synced { .. } => {}
        }
        Ok(())
    }

    /// Numbers, sends and keeps one batch: encoded, so that the window holds what it takes on
    /// the wire and no more (decoded, a batch of metadata ops is several times larger).
    async fn send_batch(&mut self, ops: Vec<Op>) -> Result<(), SendError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let data: usize = ops.iter().map(Op::data_len).sum();
        let body = encode_body(&Frame::Batch { seq, ops }).map_err(|e| self.proto(e))?;
        let before = self.writer.bytes;
        // before the write: the reader passes on only acks of batches handed to the socket
        self.stats.sent_seq.store(seq, Ordering::Release);
        self.writer
            .send_encoded(&body)
            .await
            .map_err(|e| self.proto(e))?;
        self.writer.flush().await.map_err(|e| self.proto(e))?;
        let stats = self.stats;
        let wire = self.writer.bytes - before;
        stats.wire_bytes.fetch_add(wire, Ordering::Relaxed);
        stats.data_bytes.fetch_add(data as u64, Ordering::Relaxed);
        stats.sync.sent(data as u64);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        // the window holds frames: count what they take, metadata included, not page data only
        self.window_bytes += body.len();
        self.window
            .push_back((seq, body, tokio::time::Instant::now()));
        self.publish_window();
        Ok(())
    }

    /// A full window whose oldest batch has waited `limit` for its ack: the cold side stalled.
    fn check_stall(&self, limit: Duration) -> Result<(), SendError> {
        let full = self.window_bytes >= self.window_limit;
        match self.window.front() {
            Some((_, _, sent)) if full && sent.elapsed() >= limit => Err(SendError::Stalled {
                peer: self.peer,
                limit,
            }),
            _ => Ok(()),
        }
    }

    /// The window's size and its oldest batch's send time, for `status` and the metrics.
    fn publish_window(&self) {
        let bytes = u64::try_from(self.window_bytes).unwrap_or(u64::MAX);
        self.stats.window_bytes.store(bytes, Ordering::Relaxed);
        let oldest = self.window.front().map_or(0, |(_, _, sent)| {
            let age = u64::try_from(sent.elapsed().as_millis()).unwrap_or(u64::MAX);
            crate::sys::now_unix_ms().saturating_sub(age).max(1)
        });
        self.stats
            .oldest_unacked_unix_ms
            .store(oldest, Ordering::Relaxed);
    }

    /// Tells the cold side that everything up to the last batch sent is acknowledged.
    async fn send_drained(&mut self) -> Result<u64, SendError> {
        let seq = self.next_seq - 1;
        self.send_flush(&Frame::Drained { seq }).await?;
        Ok(seq)
    }

    /// An answer from the cold side.
    async fn on_frame(&mut self, frame: Frame) -> Result<(), SendError> {
        match frame {
            Frame::Ack { seq } => self.on_ack(seq).await,
            Frame::Nack { seq, reason } => self.on_nack(seq, &reason).await,
            Frame::DigestFiles { id, files } => {
                self.digest_part(DigestPart {
                    id,
                    root: None,
                    files,
                });
                Ok(())
            }
            Frame::Digest { id, root, files } => {
                self.digest_part(DigestPart {
                    id,
                    root: Some(root),
                    files,
                });
                self.verifies.remove(&id);
                Ok(())
            }
            Frame::Heartbeat(_) => Ok(()),
            Frame::Reject {
                epoch,
                hot,
                node,
                reason,
            } => Err(rejected(self.peer, (epoch, hot, node), reason, self.events)),
            other => Err(self.proto(ProtoError::Unexpected(format!(
                "{other:?} from the cold side"
            )))),
        }
    }

    /// Hands a part of a barrier's digest to the scanner, waiting while it compares the parts
    /// before (so that no more than a few parts are ever held); a scanner that gave up
    /// forgets the verify.
    fn digest_part(&mut self, part: DigestPart) {
        let id = part.id;
        if let Some(parts) = self.verifies.get(&id) {
            if tokio::task::block_in_place(|| parts.send(part)).is_err() {
                self.verifies.remove(&id);
            }
        }
    }

    /// Batch `seq` and all before it are durable: out of the window; waiting drains are
    /// answered once the window is empty.
    async fn on_ack(&mut self, seq: u64) -> Result<(), SendError> {
        if seq >= self.next_seq {
            return Err(self.proto(ProtoError::Unexpected(format!(
                "an acknowledgement of batch {seq}, which was never sent (the last sent is {})",
                self.next_seq - 1
            ))));
        }
        while self.window.front().is_some_and(|(s, _, _)| *s <= seq) {
            let (_, body, _) = self.window.pop_front().expect("front");
            self.window_bytes -= body.len();
        }
        self.publish_window();
        self.stats.acked_seq.store(seq, Ordering::Relaxed);
        self.stats.sync.acked(seq);
        self.stats
            .last_ack_mono_ms
            .store(crate::sys::monotonic_ms(), Ordering::Relaxed);
        self.stats
            .last_ack_unix_ms
            .store(crate::sys::now_unix_ms(), Ordering::Relaxed);
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.syncs)
            .into_iter()
            .partition(|(s, _)| *s <= seq);
        self.syncs = waiting;
        for (_, reply) in done {
            let _ = reply.send(());
        }
        if self.window.is_empty() && !self.drains.is_empty() {
            let seq = self.send_drained().await?;
            for d in self.drains.drain(..) {
                let _ = d.send(Ok(seq));
            }
        }
        Ok(())
    }

    /// The cold side dropped batch `seq` (and all after it): resends them from the window.
    async fn on_nack(&mut self, seq: u64, reason: &str) -> Result<(), SendError> {
        self.stats.nacks.fetch_add(1, Ordering::Relaxed);
        if reason == self.last_nack.as_str() {
            tracing::debug!(peer = %self.peer, seq, "the cold side rejected batch {seq} again: {reason}");
        } else {
            tracing::warn!(peer = %self.peer, seq, "the cold side rejected batch {seq}: {reason}; resending from it (a batch it cannot apply ends the connection instead, and the next index resyncs its paths)");
            reason.clone_into(self.last_nack);
        }
        for (_, body, _) in self.window.iter().filter(|(s, _, _)| *s >= seq) {
            self.writer
                .send_encoded(body)
                .await
                .map_err(|source| SendError::Proto {
                    peer: self.peer,
                    source,
                })?;
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
        }
        self.writer.flush().await.map_err(|e| self.proto(e))
    }

    /// Still here, and our sync state as it is now; a progress line in the log every few
    /// seconds while an initial sync or resync runs.
    async fn heartbeat(&mut self) -> Result<(), SendError> {
        self.stats.sync.log_if_due();
        let state = self.hot_state();
        self.send_flush(&Frame::Heartbeat(state)).await
    }

    /// Durable or async, degraded since when, caught up, and the oldest unacknowledged
    /// batch's age.
    fn hot_state(&self) -> HotState {
        let unacked_ms = self.window.front().map_or(0, |(_, _, sent)| {
            u64::try_from(sent.elapsed().as_millis())
                .unwrap_or(u64::MAX)
                .max(1)
        });
        HotState {
            durable: self.durable.is_some(),
            block: self.durable.as_ref().is_some_and(|d| d.block),
            caught_up: self.stats.caught_up(),
            degraded_since_unix_ms: self.stats.degraded_since_unix_ms.load(Ordering::Acquire),
            unacked_ms,
            peer_timeout_ms: self.durable.as_ref().map_or(0, |d| {
                u64::try_from(d.peer_timeout.as_millis()).unwrap_or(u64::MAX)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicated::capture::watch::FsEvent;

    /// A short `peer_timeout_ms` (the config allows 1 ms) makes durable syncs stop waiting
    /// sooner; it set the connection's stall limit and `TCP_USER_TIMEOUT` too, below Linux's
    /// shortest retransmission timeout (200 ms), so one lost packet ended a healthy connection
    /// and the pair resynced. The limit has a floor of a second.
    #[test]
    fn issue13_a_short_peer_timeout_does_not_make_one_lost_packet_end_the_connection() {
        let with = |durable: Option<Duration>| StreamConfig {
            peer: "127.0.0.1:1".parse().unwrap(),
            auth: Auth::Insecure,
            node: "hot".into(),
            epoch: 1,
            page_size: 4096,
            window_bytes: 1 << 20,
            durable: durable.map(|peer_timeout| DurableConfig {
                peer_timeout,
                block: false,
                witness: None,
                metrics: Arc::new(crate::daemon::metrics::Metrics::default()),
            }),
        };
        assert_eq!(with(None).stall_limit(), ASYNC_STALL_LIMIT);
        let short = with(Some(Duration::from_millis(1))).stall_limit();
        assert!(short >= Duration::from_secs(1), "{short:?}");
        let long = Duration::from_secs(7);
        assert_eq!(with(Some(long)).stall_limit(), long);
    }

    /// Durable acks ask for each batch's acknowledgement; async acks for every fourth, or
    /// fewer when the window holds fewer than eight full batches (a window of one batch would
    /// otherwise wait out the cold side's hold after each).
    #[test]
    fn issue12_the_acknowledgement_interval_follows_the_ack_level_and_the_window() {
        let with = |window_mb: usize, durable: bool| StreamConfig {
            peer: "127.0.0.1:1".parse().unwrap(),
            auth: Auth::Insecure,
            node: "hot".into(),
            epoch: 1,
            page_size: 4096,
            window_bytes: window_mb << 20,
            durable: durable.then(|| DurableConfig {
                peer_timeout: Duration::from_secs(2),
                block: false,
                witness: None,
                metrics: Arc::new(crate::daemon::metrics::Metrics::default()),
            }),
        };
        let every = |window_mb, durable| ack_every(&with(window_mb, durable));
        assert_eq!(every(32, true), 1);
        assert_eq!(every(32, false), ASYNC_ACK_EVERY);
        assert_eq!(every(1, false), 1);
        assert_eq!(every(4, false), 2);
        assert_eq!(every(1 << 20, false), ASYNC_ACK_EVERY);
    }

    /// A hot side's network task (`run_net`, insecure, epoch 1) streaming to `listener`, where
    /// the test plays the cold side; the scanner's control messages arrive on `ctl_rx`.
    struct NetRig {
        rt: tokio::runtime::Runtime,
        listener: tokio::net::TcpListener,
        stop_tx: tokio::sync::watch::Sender<bool>,
        ctl_rx: crossbeam_channel::Receiver<ScanMsg>,
        net: tokio::task::JoinHandle<()>,
        /// The scanner's and the agent's ends of the other channels, kept open.
        _ends: (
            mpsc::Sender<Outgoing>,
            crossbeam_channel::Receiver<FsEvent>,
            crossbeam_channel::Receiver<SenderEvent>,
        ),
    }

    impl NetRig {
        fn start() -> NetRig {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let listener = rt
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            let cfg = StreamConfig {
                peer: listener.local_addr().unwrap(),
                auth: Auth::Insecure,
                node: "hot".into(),
                epoch: 1,
                page_size: 4096,
                window_bytes: 1 << 20,
                durable: None,
            };
            let (out_tx, out) = mpsc::channel(8);
            let (ctl_tx, ctl_rx) = crossbeam_channel::bounded(64);
            let (fs_tx, fs_rx) = crossbeam_channel::bounded::<FsEvent>(64);
            let link = ScannerLink {
                out,
                ctl: ScanControl::new(ctl_tx, fs_tx),
            };
            let (ev_tx, ev_rx) = crossbeam_channel::bounded(16);
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let stats = Arc::new(SenderStats::default());
            let net = rt.spawn(run_net(cfg, link, stats, ev_tx, stop_rx));
            NetRig {
                rt,
                listener,
                stop_tx,
                ctl_rx,
                net,
                _ends: (out_tx, fs_rx, ev_rx),
            }
        }
    }

    /// The cold side's part of the next connection on `listener`, up to its welcome at epoch 1
    /// (not flushed yet).
    async fn welcome(
        listener: &tokio::net::TcpListener,
    ) -> (
        FrameReader<tokio::net::tcp::OwnedReadHalf>,
        FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
    ) {
        let (tcp, _) = listener.accept().await.unwrap();
        let (r, w) = tcp.into_split();
        let (mut r, mut w) = (FrameReader::new(r), FrameWriter::new(w));
        channel::accept(&Auth::Insecure, &mut r, &mut w)
            .await
            .unwrap();
        assert!(matches!(r.recv().await.unwrap(), Frame::Intro { .. }));
        w.send(&Frame::Welcome { epoch: 1 }).await.unwrap();
        (r, w)
    }

    /// Pauses grow while connections fail one after the other, and start again from
    /// [`RECONNECT_FIRST`] once one has streamed: a connection lost after hours of streaming
    /// is not retried only after the longest pause the agent's start-up once reached (with
    /// durable acks, every sync waiting meanwhile degrades past `peer_timeout_ms`).
    #[test]
    fn issue13_a_connection_that_streamed_is_retried_at_once_when_lost() {
        let NetRig {
            rt,
            listener,
            stop_tx,
            _ends,
            ..
        } = NetRig::start();
        let lost_to_next = rt.block_on(async {
            // five failures in a row (the cold side not yet there): the pause reaches 1.6 s
            for _ in 0..5 {
                drop(listener.accept().await.unwrap());
            }
            // then a connection that streams
            let (mut r, mut w) = welcome(&listener).await;
            w.send(&Frame::IndexEnd).await.unwrap();
            w.flush().await.unwrap();
            assert!(matches!(r.recv().await.unwrap(), Frame::Heartbeat(_)));
            // lost
            drop((r, w));
            let lost = tokio::time::Instant::now();
            drop(listener.accept().await.unwrap());
            lost.elapsed()
        });
        let _ = stop_tx.send(true);
        assert!(
            lost_to_next < Duration::from_secs(1),
            "the hot side reconnected {lost_to_next:?} after losing a connection that streamed"
        );
    }

    /// The hot side heeded a stop only once streaming: while it waited for the cold side's
    /// index (a large tree's takes a while, and a cold side that stopped answering part way is
    /// given up only by the socket's timeouts) a `systemctl stop` or a demote waited with it.
    #[test]
    fn issue13_a_stop_is_heeded_while_the_cold_side_sends_its_index() {
        let NetRig {
            rt,
            listener,
            stop_tx,
            ctl_rx,
            net,
            _ends,
        } = NetRig::start();
        // a cold side that welcomes us and sends the start of an index that never ends
        let _cold = rt.block_on(async {
            let (r, mut w) = welcome(&listener).await;
            w.send(&Frame::IndexDir {
                path: "journal".into(),
                attrs: crate::replicated::pages::Attrs {
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                },
            })
            .await
            .unwrap();
            w.flush().await.unwrap();
            (r, w)
        });
        // the hot side is in the index: it told the scanner to pre-hash
        let prehash = ctl_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(matches!(prehash, ScanMsg::Prehash), "{prehash:?}");
        let _ = stop_tx.send(true);
        let stopped =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), net).await });
        assert!(
            stopped.is_ok(),
            "the network task was still waiting for the index 2 s after the stop"
        );
    }
}
