//! An admitted hot side's stream on the cold side: the index out (streamed from the apply
//! thread as it walks the tree), batches in (to the apply thread, waiting for room in its
//! queue while forwarding digest parts), and answers out: `Ack`, `Nack`, and each barrier's
//! digest as the apply thread walks it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::replicated::apply::{Job, Jobs, Outlet, APPLY_QUEUE};
use crate::replicated::hot_sync::HotSync;
use crate::replicated::ops::{Applied, DigestPart};
use crate::replicated::pages::{Entry, IndexPart};
use crate::replicated::receiver::{
    failing_pause, Gate, Reader, ReceiveError, ReceiverStats, Writer, ACK_HOLD, IDLE_TIMEOUT,
};
use crate::replicated::wire::codec::ENTRY_MIN_BYTES;
use crate::replicated::wire::framed::ReadTask;
use crate::replicated::wire::{Frame, ProtoError, DIGEST_CHUNK_BYTES, INDEX_CHUNK_PAGES};

/// Index parts waiting to be written (each up to [`INDEX_CHUNK_PAGES`] page hashes).
const INDEX_PARTS_QUEUE: usize = 4;
/// Digest parts waiting to be written (each up to [`DIGEST_CHUNK_BYTES`] of entries).
const DIGEST_PARTS_QUEUE: usize = 2;

/// The bytes an entry takes in a digest frame.
fn entry_wire_bytes(path: &str, entry: &Entry) -> usize {
    path.len() + entry.target.len() + ENTRY_MIN_BYTES
}

/// An admitted hot side's stream: index out, batches in, answers out.
pub(super) struct Inbound<'a> {
    pub(super) writer: Writer,
    pub(super) jobs: &'a Jobs,
    /// Told each time the apply thread takes a job: room in its queue.
    pub(super) taken: &'a tokio::sync::Notify,
    pub(super) stats: &'a Arc<ReceiverStats>,
    pub(super) gate: &'a dyn Gate,
    pub(super) epoch: u64,
    /// A `Nack` is out and its batch not yet applied: further failures are not answered.
    pub(super) rejecting: bool,
    /// Writer bytes already added to the statistics.
    pub(super) counted: u64,
    /// Batches handed to the apply thread whose outcome has not come back.
    pub(super) in_flight: u64,
    /// Acknowledge after this many applied batches (the hot side's `ack_every`, at least 1).
    pub(super) ack_every: u64,
    /// Applied and not yet acknowledged: the last such batch, how many, and when the
    /// acknowledgement is due ([`ACK_HOLD`] after the first of them).
    pub(super) held: Option<Held>,
    /// When the last acknowledgement went out: a batch applied [`ACK_HOLD`] or more after it
    /// is acknowledged at once, so only a steady stream has its acknowledgements held (and the
    /// hot side's time since an acknowledgement, what its witness reports as the async lag,
    /// stays under twice the hold while batches are coming).
    pub(super) last_ack: Option<tokio::time::Instant>,
}

/// Batches applied whose acknowledgement waits for the next few ([`Inbound::held`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Held {
    seq: u64,
    count: u64,
    due: tokio::time::Instant,
}

impl Inbound<'_> {
    pub(super) async fn run(mut self, reader: Reader) -> Result<(), ReceiveError> {
        pause_while_failing(self.stats).await;
        let (digests_tx, mut digests) = mpsc::channel(DIGEST_PARTS_QUEUE);
        let began = tokio::time::Instant::now();
        self.send_index(digests_tx).await?;
        let took = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.stats.index_ms.store(took, Ordering::Relaxed);
        self.stats.applied_seq.store(0, Ordering::Relaxed);
        let read_stats = self.stats.clone();
        let mut frames = ReadTask::spawn(
            reader,
            APPLY_QUEUE,
            move |_, bytes| read_stats.wire_bytes.store(bytes, Ordering::Relaxed),
            |e| !matches!(e, ProtoError::BadMac { .. }),
        );
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Applied>();
        loop {
            let ack_due = self.held.map(|h| h.due);
            tokio::select! {
                () = tokio::time::sleep_until(ack_due.unwrap_or_else(tokio::time::Instant::now)),
                    if ack_due.is_some() => self.send_held_ack().await?,
                frame = tokio::time::timeout(IDLE_TIMEOUT, frames.frames.recv()) => {
                    let Ok(frame) = frame else { return Err(ReceiveError::Idle(IDLE_TIMEOUT)) };
                    let Some(frame) = frame else { return Ok(()) };
                    if !self.on_frame(frame, &done_tx, &mut digests).await? {
                        return Ok(());
                    }
                }
                done = done_rx.recv() => self.on_applied(done.expect("we hold a sender")).await?,
                part = digests.recv() => {
                    let Some(part) = part else { return Err(ReceiveError::ApplyGone) };
                    self.send_digest_part(part).await?;
                }
            }
        }
    }

    /// Our index first, as the apply thread walks the tree: the hot side diffs against it.
    async fn send_index(&mut self, digests: mpsc::Sender<DigestPart>) -> Result<(), ReceiveError> {
        let (parts_tx, mut parts) = mpsc::channel(INDEX_PARTS_QUEUE);
        let (done_tx, done) = oneshot::channel();
        let job = Job::Index {
            parts: parts_tx,
            done: done_tx,
            outlet: Outlet {
                digests,
                index_chunk_pages: INDEX_CHUNK_PAGES,
                digest_chunk: (DIGEST_CHUNK_BYTES, entry_wire_bytes),
            },
        };
        tokio::task::block_in_place(|| self.jobs.send(job)).map_err(|_| ReceiveError::ApplyGone)?;
        while let Some(part) = parts.recv().await {
            self.writer.send(&index_frame(part)).await?;
        }
        if let Err(e) = done.await.map_err(|_| ReceiveError::ApplyGone)? {
            if self.stats.apply_error().is_some() {
                // the disk that failed a batch (an fsync the index retries) fails the index
                // too: it counts as a failure, so the pause before the next index grows
                let reason = crate::error_chain(&e);
                if self.stats.apply_failed(&reason) {
                    tracing::error!("cannot index the tree for the hot side: {reason}");
                }
            }
            return Err(ReceiveError::Index(e));
        }
        self.writer.send(&Frame::IndexEnd).await?;
        self.writer.flush().await?;
        self.count_out();
        Ok(())
    }

    /// Hands a batch to the apply thread. Its queue is bounded: waiting for room is the
    /// back-pressure; meanwhile the parts of a digest the apply thread is walking go out
    /// (it waits for them to, so it would never take the batch otherwise).
    async fn submit(
        &mut self,
        mut job: Job,
        digests: &mut mpsc::Receiver<DigestPart>,
    ) -> Result<(), ReceiveError> {
        loop {
            match self.jobs.try_send(job) {
                Ok(()) => return Ok(()),
                Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                    return Err(ReceiveError::ApplyGone)
                }
                Err(crossbeam_channel::TrySendError::Full(j)) => job = j,
            }
            tokio::select! {
                () = self.taken.notified() => {}
                part = digests.recv() => {
                    let Some(part) = part else { return Err(ReceiveError::ApplyGone) };
                    self.send_digest_part(part).await?;
                }
            }
        }
    }

    /// Acknowledges the batches applied and held back ([`Inbound::held`]), if any: one `Ack`
    /// of the last of them (acknowledgements are cumulative).
    async fn send_held_ack(&mut self) -> Result<(), ProtoError> {
        if let Some(Held { seq, .. }) = self.held.take() {
            self.writer.send(&Frame::Ack { seq }).await?;
            self.writer.flush().await?;
            self.count_out();
            self.last_ack = Some(tokio::time::Instant::now());
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
        digests: &mut mpsc::Receiver<DigestPart>,
    ) -> Result<bool, ReceiveError> {
        let stats = self.stats;
        stats
            .last_frame_unix_ms
            .store(crate::sys::now_unix_ms(), Ordering::Relaxed);
        match frame {
            // any frame, not only a batch: a heartbeat or a drained goodbye of a stream this
            // side no longer admits (it was promoted) must not count, and ending the stream
            // makes an idle old hot reconnect, be refused at the new epoch and step down
            Ok(_) if !self.gate.still_admitted(self.epoch) => {
                return Err(ReceiveError::NoLongerAdmitted);
            }
            Ok(Frame::Batch { seq, ops }) => {
                let job = Job::Batch {
                    seq,
                    epoch: self.epoch,
                    ops,
                    reply: done.clone(),
                    pages: None,
                };
                // with every earlier outcome in hand, a small batch may be applied right here
                let now = if self.in_flight == 0 {
                    self.jobs.apply_now(job)
                } else {
                    Err(job)
                };
                self.in_flight += 1;
                match now {
                    Ok(applied) => self.on_applied(applied).await?,
                    Err(job) => self.submit(job, digests).await?,
                }
            }
            Ok(Frame::Heartbeat(state)) => {
                if state.caught_up && state.unacked_ms == 0 && self.in_flight == 0 {
                    self.complete_again();
                }
                let hs = HotSync::new(state, self.epoch);
                *stats.hot_sync.lock().unwrap_or_else(|p| p.into_inner()) = Some(hs);
            }
            Ok(Frame::Drained { seq }) => {
                // the hot side sends it once every batch it sent was acknowledged: only then is
                // the copy complete, and only such a marker lets `promote` go without --force
                let applied = stats.applied_seq.load(Ordering::Relaxed);
                if seq == applied && self.in_flight == 0 && !self.rejecting {
                    stats.drained.store(true, Ordering::Relaxed);
                    tracing::info!(seq, "the hot side drained its stream: the copy is complete");
                } else {
                    let in_hand = match self.in_flight {
                        0 => String::new(),
                        n => format!(" and {n} more are being applied"),
                    };
                    tracing::error!(
                        seq,
                        applied,
                        in_flight = self.in_flight,
                        "the hot side says it drained its stream at batch {seq}, but batch {applied} is the last applied here{in_hand}: not taken as a hand-over"
                    );
                }
            }
            Ok(other) => {
                let what = format!("{other:?} from the hot side");
                return Err(ProtoError::Unexpected(what).into());
            }
            Err(ProtoError::Closed) => return Ok(false),
            Err(ProtoError::BadMac { seq }) => {
                stats.mac_failures.fetch_add(1, Ordering::Relaxed);
                let next = stats.applied_seq.load(Ordering::Relaxed) + 1;
                if self.rejecting {
                    // a Nack is out and unanswered by an applied batch: the resent batch may be
                    // the frame that failed, and the batches after it are skipped unanswered
                    // until it applies. Asking again cannot be told apart from the first
                    // request; a new connection, whose index the hot side resyncs from, can
                    tracing::error!(frame = seq, "another frame failed its authentication code while batch {next} was asked for again; ending the stream");
                    return Err(ReceiveError::BadMacAgain { seq: next });
                }
                tracing::error!(frame = seq, "a frame failed its authentication code and was dropped; asking for batch {next} again");
                let reason = "a frame failed its authentication code".into();
                self.nack(next, reason).await?;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(true)
    }

    /// The hot side compared everything on this stream and has nothing unacknowledged, and no
    /// batch of ours is out: a failure to apply, if one was recorded, is over, even if no batch
    /// has applied since (an idle node after an fsync that failed although its data was
    /// written: the index found the copy equal, so nothing was sent again). A batch that
    /// failed would have ended the stream.
    fn complete_again(&self) {
        if let Some(was) = self.stats.applied_again() {
            let failed_ms = crate::sys::now_unix_ms().saturating_sub(was.since_unix_ms);
            tracing::warn!(
                failed_ms,
                "the hot side finds the copy complete: batches apply again after failing for {failed_ms} ms (last: {})",
                was.reason
            );
        }
    }

    /// The apply thread's outcome for a batch.
    async fn on_applied(&mut self, applied: Applied) -> Result<(), ReceiveError> {
        let stats = self.stats;
        self.in_flight = self.in_flight.saturating_sub(1);
        match applied {
            Applied::Done { seq, bytes } => {
                self.rejecting = false;
                if let Some(was) = stats.applied_again() {
                    let failed_ms = crate::sys::now_unix_ms().saturating_sub(was.since_unix_ms);
                    tracing::warn!(seq, failed_ms, "batch {seq} applied: batches apply again after failing for {failed_ms} ms (last: {})", was.reason);
                }
                stats.data_bytes.fetch_add(bytes, Ordering::Relaxed);
                stats.applied_seq.store(seq, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats
                    .last_ack_unix_ms
                    .store(crate::sys::now_unix_ms(), Ordering::Relaxed);
                let held = match self.held {
                    Some(h) => Held {
                        seq,
                        count: h.count + 1,
                        due: h.due,
                    },
                    None => Held {
                        seq,
                        count: 1,
                        due: tokio::time::Instant::now() + ACK_HOLD,
                    },
                };
                self.held = Some(held);
                let quiet = self.last_ack.is_none_or(|at| at.elapsed() >= ACK_HOLD);
                if quiet || held.count >= self.ack_every {
                    self.send_held_ack().await?;
                }
            }
            Applied::Skipped { .. } => {}
            Applied::Rejected { seq, reason } => {
                // damaged in transit or not allowed (a page's blake3, a path): not the disk's
                // fault, so not an apply failure (no `apply_error`, no pause)
                stats.checksum_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    seq,
                    "refused batch {seq}: {reason}; nothing of it was written; the hot side resyncs from our index"
                );
                self.nack(seq, reason).await?;
                return Err(ReceiveError::Resync { seq });
            }
            Applied::Failed { seq, reason } => {
                let what = "what it wrote is not acknowledged";
                return Err(self.cannot_apply(seq, reason, what).await);
            }
        }
        Ok(())
    }

    /// Batch `seq` failed a check or could not be applied: resending it unchanged could fail
    /// for ever (a name that changed type, a missing parent, a full disk). Records it for
    /// `status` (cleared once a batch applies), says why once (again only for another cause,
    /// the errno, or after batches applied meanwhile), answers `Nack`, and ends the stream: the
    /// hot side reconnects, our fresh index becomes its table, and it sends the paths involved
    /// (and whatever else differs) as they are now.
    async fn cannot_apply(&mut self, seq: u64, reason: String, written: &str) -> ReceiveError {
        if self.stats.apply_failed(&reason) {
            tracing::error!(
                seq,
                "cannot apply batch {seq}: {reason}; {written}; the hot side resyncs from our index (said again only for another cause)"
            );
        } else {
            tracing::debug!(seq, "cannot apply batch {seq} again: {reason}");
        }
        if let Err(e) = self.nack(seq, reason).await {
            return e;
        }
        ReceiveError::Resync { seq }
    }

    /// A part of a barrier's digest: [`Frame::DigestFiles`], or the [`Frame::Digest`] with the
    /// root for the last part.
    async fn send_digest_part(&mut self, part: DigestPart) -> Result<(), ProtoError> {
        let DigestPart { id, root, files } = part;
        let frame = match root {
            Some(root) => Frame::Digest { id, root, files },
            None => Frame::DigestFiles { id, files },
        };
        self.writer.send(&frame).await?;
        if root.is_some() {
            self.writer.flush().await?;
            self.count_out();
        }
        Ok(())
    }

    /// Asks for `seq` again, unless a request is already out.
    async fn nack(&mut self, seq: u64, reason: String) -> Result<(), ReceiveError> {
        if !self.rejecting {
            self.rejecting = true;
            // what was applied before it is acknowledged first
            self.send_held_ack().await?;
            self.writer.send(&Frame::Nack { seq, reason }).await?;
            self.writer.flush().await?;
        }
        Ok(())
    }
}

/// While batches cannot be applied, waits [`failing_pause`] before indexing the tree
/// again for the hot side: a disk that stays full costs an index every half minute at
/// most, not a core. The hot side waits for our index meanwhile (not in sync).
async fn pause_while_failing(stats: &ReceiverStats) {
    let Some(failing) = stats.apply_error() else {
        return;
    };
    let took = Duration::from_millis(stats.index_ms.load(Ordering::Relaxed));
    let pause = failing_pause(failing.failures, took);
    tracing::debug!(
        failures = failing.failures,
        "batches cannot be applied: waiting {} ms before indexing for the hot side",
        pause.as_millis()
    );
    tokio::time::sleep(pause).await;
}

/// The frame of an index part.
fn index_frame(part: IndexPart) -> Frame {
    match part {
        IndexPart::Dir { path, attrs } => Frame::IndexDir { path, attrs },
        IndexPart::File {
            path,
            len,
            attrs,
            allocated,
            pages,
        } => Frame::IndexFile {
            path,
            len,
            attrs,
            allocated,
            pages,
        },
        IndexPart::Pages {
            path,
            first_page,
            pages,
        } => Frame::IndexPages {
            path,
            first_page,
            pages,
        },
        IndexPart::Link {
            path,
            target,
            attrs,
        } => Frame::IndexLink {
            path,
            target,
            attrs,
        },
    }
}
