//! The counters each side of the stream keeps for `status`, `promote` and the benchmark: the
//! hot side's ([`SenderStats`], written by the scanner and the network task) and the cold
//! side's ([`ReceiverStats`], written by the connection task).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::replicated::ack_watch::AckWatch;
use crate::replicated::hot_sync::HotSync;
use crate::replicated::progress::SyncTracker;

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
    /// Highest batch sent on the current connection (stored as its write begins, so no ack a
    /// cold side may send is above it).
    pub sent_seq: AtomicU64,
    /// Batches rejected by the cold side and resent.
    pub nacks: AtomicU64,
    /// Connections made again after one was lost.
    pub reconnects: AtomicU64,
    /// Bytes sent and not yet acknowledged (the window in use).
    pub window_bytes: AtomicU64,
    /// When the oldest batch sent and not yet acknowledged was sent (ms since the Unix
    /// epoch); 0 when none is.
    pub oldest_unacked_unix_ms: AtomicU64,
    /// When the last acknowledgement arrived (ms since the Unix epoch), 0 if none.
    pub last_ack_unix_ms: AtomicU64,
    /// The same on [`crate::sys::monotonic_ms`]'s clock, for the lag the witness reports.
    pub last_ack_mono_ms: AtomicU64,
    /// Batches the scanner emitted for the current connection.
    pub emitted: AtomicU64,
    /// Whether the full comparison after the current connection's index is done.
    pub initial_done: AtomicBool,
    /// How many batches that comparison emitted (set before [`Self::initial_done`]): until
    /// the cold side has acknowledged them all it may hold a file half resynced.
    pub resync_batches: AtomicU64,
    /// The inotify limit that keeps some directories unwatched, with the sysctl to raise.
    pub watch_limit: Mutex<Option<String>>,
    /// The initial sync or resync in progress, or this connection's once finished.
    pub sync: SyncTracker,
    /// Durable acks: since when (ms since the Unix epoch) syncs no longer wait for the cold
    /// side because it did not answer in time; 0 while durable.
    pub degraded_since_unix_ms: AtomicU64,
    /// Durable acks with `on_peer_loss = "block"`: since when (ms since the Unix epoch) a sync
    /// has waited for the cold side longer than `peer_timeout_ms`; 0 while none has.
    pub blocked_since_unix_ms: AtomicU64,
    /// Durable acks: where a sync through the mount waits for the cold side's ack of its
    /// calls' ops without passing through the scanner and the network task.
    pub acks: AckWatch,
}

impl SenderStats {
    /// Whether the cold side has everything the scanner has seen: the first full comparison is
    /// done, and every batch emitted since was sent and acknowledged.
    pub fn synced(&self) -> bool {
        let emitted = self.emitted.load(Ordering::Acquire);
        self.connected.load(Ordering::Acquire)
            && self.caught_up()
            && self.acked_seq.load(Ordering::Acquire) == emitted
    }

    /// Whether the first full comparison is done and every batch the scanner emitted since
    /// has reached the network task's window (what the heartbeat tells the cold side, with
    /// the age of the oldest unacknowledged batch). A batch still in the channel between
    /// them counts: the scanner counts it before it sends it, and marks the comparison done
    /// only after its last batch.
    pub fn caught_up(&self) -> bool {
        self.initial_done.load(Ordering::Acquire)
            && self.sent_seq.load(Ordering::Acquire) == self.emitted.load(Ordering::Acquire)
    }

    /// Whether the cold copy is past this connection's resync: the comparison is done and
    /// the cold side has acknowledged (so fsynced) every batch it emitted. Before that a file
    /// may be there only in part (a resync may empty a file to regrow it), so nothing may
    /// call the copy in sync, however recent the last acknowledgement.
    pub fn resync_acked(&self) -> bool {
        self.connected.load(Ordering::Acquire)
            && self.initial_done.load(Ordering::Acquire)
            && self.acked_seq.load(Ordering::Acquire) >= self.resync_batches.load(Ordering::Acquire)
    }
}

/// Counters for `status`, `promote` and the benchmark.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    /// Whether a hot side is connected and streaming.
    pub connected: AtomicBool,
    /// The connected hot side's epoch.
    pub hot_epoch: AtomicU64,
    /// Highest batch applied on the current connection (acknowledged at once, or within
    /// `receiver::ACK_HOLD` under a steady stream of batches with async acks).
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
    /// When the last batch was applied (ms since the Unix epoch; its acknowledgement goes out
    /// then, or within `receiver::ACK_HOLD`).
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
    /// The hot side's sync state, from the last heartbeat received (kept after it left).
    pub hot_sync: Mutex<Option<HotSync>>,
    /// How long the last index of the data directory took (ms).
    pub index_ms: AtomicU64,
    /// Batches that could not be applied (a full, read-only or failing disk; a failed check).
    pub apply_failures: AtomicU64,
    /// Why batches cannot be applied, since the first failure; cleared once one applies.
    pub apply_error: Mutex<Option<ApplyError>>,
}

/// The last part of an error chain: the errno ("No space left on device (os error 28)"), or
/// the whole text when it has one part.
fn cause(reason: &str) -> &str {
    reason.rsplit(": ").next().unwrap_or(reason)
}

/// The cold side cannot apply batches: the latest reason, and since when it fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyError {
    /// The latest failure: the op, the file and the errno ("cannot write /data/j: No space
    /// left on device (os error 28)"), or the check that failed.
    pub reason: String,
    /// When the first failure of this run of failures happened (ms since the Unix epoch).
    pub since_unix_ms: u64,
    /// Batches that failed in this run of failures.
    pub failures: u32,
}

impl ReceiverStats {
    /// Records that a batch could not be applied for `reason`; whether it is news: the first
    /// failure since batches last applied, or one with another cause (a full disk that turns
    /// read-only; not the same errno on another file, which the next resync may well meet).
    pub fn apply_failed(&self, reason: &str) -> bool {
        self.apply_failures.fetch_add(1, Ordering::Relaxed);
        let mut current = self.apply_error.lock().unwrap_or_else(|p| p.into_inner());
        match current.as_mut() {
            Some(e) => {
                e.failures = e.failures.saturating_add(1);
                let new = cause(&e.reason) != cause(reason);
                reason.clone_into(&mut e.reason);
                new
            }
            None => {
                *current = Some(ApplyError {
                    reason: reason.to_owned(),
                    since_unix_ms: crate::sys::now_unix_ms(),
                    failures: 1,
                });
                true
            }
        }
    }

    /// A batch applied: the failure before it, if there was one, is over.
    pub fn applied_again(&self) -> Option<ApplyError> {
        self.apply_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The current failure, if batches cannot be applied.
    pub fn apply_error(&self) -> Option<ApplyError> {
        self.apply_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue16_an_apply_failure_is_news_once_per_cause_and_cleared_by_a_success() {
        let s = ReceiverStats::default();
        assert!(s.apply_failed("cannot write \"/d/a\": No space left on device (os error 28)"));
        assert!(!s.apply_failed("cannot allocate \"/d/b\": No space left on device (os error 28)"));
        let e = s.apply_error().unwrap();
        assert!(e.reason.contains("/d/b"), "the latest file: {e:?}");
        assert_eq!(e.failures, 2);
        assert!(s.apply_failed("cannot open \"/d/b\": Read-only file system (os error 30)"));
        assert_eq!(s.applied_again().map(|e| e.failures), Some(3));
        assert!(s.apply_error().is_none());
        assert!(s.apply_failed("cannot open \"/d/b\": Read-only file system (os error 30)"));
        assert_eq!(s.apply_failures.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn issue16_not_caught_up_while_an_emitted_batch_has_not_reached_the_window() {
        // the comparison is done, but its last batch is still in the channel to the network
        // task: a heartbeat saying "caught up" with an empty window made the cold side
        // declare a failure over before that batch failed again
        let s = SenderStats::default();
        s.initial_done.store(true, Ordering::Release);
        s.emitted.store(3, Ordering::Release);
        s.sent_seq.store(2, Ordering::Release);
        assert!(!s.caught_up());
        s.sent_seq.store(3, Ordering::Release);
        assert!(s.caught_up());
        s.initial_done.store(false, Ordering::Release);
        assert!(!s.caught_up());
    }
}
