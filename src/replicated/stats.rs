//! The counters each side of the stream keeps for `status`, `promote` and the benchmark: the
//! hot side's ([`SenderStats`], written by the scanner and the network task) and the cold
//! side's ([`ReceiverStats`], written by the connection task).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

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
    /// Highest batch sent on the current connection.
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
    /// Batches the scanner emitted for the current connection.
    pub emitted: AtomicU64,
    /// Whether the full comparison after the current connection's index is done.
    pub initial_done: AtomicBool,
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
    /// The hot side's sync state, from the last heartbeat received (kept after it left).
    pub hot_sync: Mutex<Option<HotSync>>,
}
