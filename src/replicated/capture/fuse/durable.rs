//! Durable acks (`ack = "durable"`): an `fsync`/`fdatasync` through the mount (also the one
//! `msync(MS_SYNC)` and an `O_DSYNC` write make) returns only once the cold side has
//! acknowledged, so fsynced, every op made from the calls before it.
//!
//! After the local sync, the FUSE thread waits until the scanner has flushed the events of
//! those calls and the cold side has acknowledged the batches that carried them, told by the
//! scanner and the connection's reader ([`crate::replicated::ack_watch`]). Without a
//! connection, or when it changes meanwhile, it queues [`FsEvent::Sync`] behind those events
//! instead: the scanner flushes its batch and hands the reply to the network task, which
//! answers when the ack of the last batch sent arrives. With the cold side gone or slow for
//! `peer_timeout_ms`, `on_peer_loss = "degrade"` goes on as async (logged once, and
//! [`SenderStats::degraded_since_unix_ms`] set for `status`) until the stream is connected and
//! the resync after it done, when the next sync that is acknowledged in time makes syncs
//! durable again; `"block"` keeps waiting. With the database lease, degrading waits until the
//! lease row says the cold copy is behind ([`crate::replicated::witness`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError};

use crate::replicated::ack_watch::Waited;
use crate::replicated::capture::fuse::passthrough::Passthrough;
use crate::replicated::capture::watch::FsEvent;
use crate::replicated::stats::SenderStats;
use crate::replicated::witness::WitnessHandle;

/// How soon a sync asks again after finding the stream disconnected.
const SYNC_RETRY: Duration = Duration::from_millis(20);

/// What durable acks need to know.
#[derive(Debug, Clone)]
pub struct DurableConfig {
    /// How long a sync waits for the cold side before `block` decides.
    pub peer_timeout: Duration,
    /// Whether a sync waits for the cold side however long (`on_peer_loss = "block"`).
    pub block: bool,
    /// With the database lease: told before any sync returns without the cold side
    /// ([`crate::replicated::witness`]); degrading waits until it has recorded it.
    pub witness: Option<WitnessHandle>,
    /// Where each sync's wait is recorded.
    pub metrics: Arc<crate::daemon::metrics::Metrics>,
}

/// Marks the sender degraded (syncs return without the cold side) and says so once.
pub(crate) fn mark_degraded(stats: &SenderStats) {
    let now = crate::sys::now_unix_ms();
    if stats.degraded_since_unix_ms.swap(now, Ordering::AcqRel) == 0 {
        tracing::error!(
            "DEGRADED: the cold side did not acknowledge a sync in time; syncs return without it (async) until it is back and caught up: the cold copy may lack data"
        );
    }
}

/// Durable acks of one mount: the settings and the sender's counters.
#[derive(Debug)]
pub(super) struct Durable {
    pub(super) cfg: DurableConfig,
    pub(super) stats: Arc<SenderStats>,
}

impl Passthrough {
    /// Returns once the cold side has acknowledged everything queued so far, or (degrade) once
    /// it has not within the timeout; at once when acks are async or already degraded.
    pub(super) fn wait_durable(&self) {
        let Some(d) = &self.durable else { return };
        let began = Instant::now();
        self.wait_durable_of(d);
        d.cfg
            .metrics
            .durable_sync_wait_seconds
            .observe(began.elapsed().as_secs_f64());
    }

    fn wait_durable_of(&self, d: &Durable) {
        let stats = &d.stats;
        let degraded = stats.degraded_since_unix_ms.load(Ordering::Acquire) != 0;
        let resynced =
            stats.connected.load(Ordering::Acquire) && stats.initial_done.load(Ordering::Acquire);
        if degraded && !resynced {
            return;
        }
        // every call that returned before this sync began has queued its event by now
        let events = stats.acks.queued();
        let mut deadline = Instant::now() + d.cfg.peer_timeout;
        loop {
            let waited = match stats.acks.wait(events, deadline) {
                Waited::Acked => Ok(()),
                Waited::TimedOut => Err(RecvTimeoutError::Timeout),
                // no connection, or it changed: the long way, behind the scanner's events
                Waited::Lost => {
                    let (tx, rx) = bounded(1);
                    self.send(FsEvent::Sync(tx));
                    rx.recv_deadline(deadline)
                }
            };
            match waited {
                Ok(()) => {
                    stats.blocked_since_unix_ms.store(0, Ordering::Release);
                    if degraded {
                        stats.degraded_since_unix_ms.store(0, Ordering::Release);
                        tracing::warn!(
                            "the cold side is back and has caught up: syncs are durable again"
                        );
                    }
                    return;
                }
                Err(RecvTimeoutError::Disconnected) if Instant::now() < deadline => {
                    std::thread::sleep(SYNC_RETRY);
                }
                Err(_) if d.cfg.block => {
                    // when this sync began to wait, one timeout ago
                    let began = crate::sys::now_unix_ms().saturating_sub(
                        u64::try_from(d.cfg.peer_timeout.as_millis()).unwrap_or(u64::MAX),
                    );
                    let _ = stats.blocked_since_unix_ms.compare_exchange(
                        0,
                        began,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    tracing::warn!(
                        waited_ms = d.cfg.peer_timeout.as_millis(),
                        "a durable sync is still waiting for the cold side (on_peer_loss = \"block\")"
                    );
                    deadline = Instant::now() + d.cfg.peer_timeout;
                }
                Err(_) => match &d.cfg.witness {
                    None => return mark_degraded(stats),
                    // the database hears first that the cold copy is behind
                    Some(w) => match w.outdate() {
                        Ok(()) => return,
                        Err(e) => {
                            tracing::error!(
                                "a durable sync keeps waiting for the cold side: it may not return without it before the lease database records that the cold copy is behind ({e})"
                            );
                            deadline = Instant::now() + d.cfg.peer_timeout;
                        }
                    },
                },
            }
        }
    }
}
