//! Durable acks (`ack = "durable"`): an `fsync`/`fdatasync` through the mount (also the one
//! `msync(MS_SYNC)` and an `O_DSYNC` write make) returns only once the cold side has
//! acknowledged, so fsynced, every op made from the calls before it.
//!
//! After the local sync, the FUSE thread registers the sync's reply with the
//! [`crate::replicated::ack_watch`]: the reply goes out as soon as the scanner has flushed the
//! events of the calls before it and the cold side has acknowledged the batches that carried
//! them, given by whichever thread learns it first (usually the connection's reader as it
//! reads the ack). The FUSE thread goes on serving the kernel; a settling thread
//! ([`SETTLE_THREADS`]) waits out the sync's deadline and does what the ack watch cannot.
//! Without a connection, or when it changes meanwhile, it queues [`FsEvent::Sync`] behind those
//! events instead: the scanner flushes its batch and hands the reply to the network task, which
//! answers when the ack of the last batch sent arrives. With the cold side gone or slow for
//! `peer_timeout_ms`, `on_peer_loss = "degrade"` goes on as async (logged once, and
//! [`SenderStats::degraded_since_unix_ms`] set for `status`) until the stream is connected and
//! the resync after it done, when the next sync that is acknowledged in time makes syncs
//! durable again; `"block"` keeps waiting. With the database lease, degrading waits until the
//! lease row says the cold copy is behind ([`crate::replicated::witness`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError, SendError, Sender};

use crate::replicated::ack_watch::{Answer, Ticket, Waited};
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

/// Threads that wait out durable syncs: as many syncs as wait for the cold side at once
/// without queueing behind each other (a sync is answered on its ack whether or not a thread
/// has taken it up yet).
const SETTLE_THREADS: usize = 4;
/// Syncs handed over and not yet taken up; beyond, the FUSE thread waits for room.
const SETTLE_QUEUE: usize = 256;

/// Durable acks of one mount: the settings and the sender's counters, shared with the
/// settling threads, and the queue to them.
#[derive(Debug)]
pub(super) struct Durable {
    shared: Arc<Shared>,
    settle: Sender<Pending>,
}

#[derive(Debug)]
struct Shared {
    cfg: DurableConfig,
    stats: Arc<SenderStats>,
    /// The scanner's event queue (the long way).
    events: Sender<FsEvent>,
    /// Set once the mount is gone: a sync still waiting has nobody to answer, and its
    /// settling thread stops waiting (`block` would wait forever).
    stopped: AtomicBool,
}

/// A sync handed to a settling thread.
struct Pending {
    /// Events counted when its local sync was done.
    events: u64,
    began: Instant,
    /// Whether syncs were degraded when it began.
    degraded: bool,
    /// Registered with the ack watch, or (no connection) its answer.
    ticket: Result<Ticket, Option<Answer>>,
}

impl Durable {
    /// Durable acks with `cfg`, counted in `stats`; the long way through `events`. Starts the
    /// settling threads, which end once this is dropped and they are idle.
    pub(super) fn start(
        cfg: DurableConfig,
        stats: Arc<SenderStats>,
        events: Sender<FsEvent>,
    ) -> std::io::Result<Durable> {
        let shared = Arc::new(Shared {
            cfg,
            stats,
            events,
            stopped: AtomicBool::new(false),
        });
        let (settle, jobs) = bounded::<Pending>(SETTLE_QUEUE);
        for i in 0..SETTLE_THREADS {
            let shared = shared.clone();
            let jobs = jobs.clone();
            std::thread::Builder::new()
                .name(format!("durable-{i}"))
                .spawn(move || {
                    for p in jobs {
                        shared.settle(p);
                    }
                })?;
        }
        Ok(Durable { shared, settle })
    }

    /// The sender's counters.
    pub(super) fn stats(&self) -> &SenderStats {
        &self.shared.stats
    }

    /// Answers a sync whose local part is done once the cold side has acknowledged everything
    /// queued so far, or (degrade) once it has not within the timeout; at once when already
    /// degraded. Does not wait for the cold side itself (see the module doc).
    pub(super) fn answer(&self, answer: Answer) {
        let began = Instant::now();
        // each sync's wait is timed when it is answered, wherever that is
        let metrics = self.shared.cfg.metrics.clone();
        let answer: Answer = Box::new(move || {
            answer();
            metrics
                .durable_sync_wait_seconds
                .observe(began.elapsed().as_secs_f64());
        });
        let stats = &self.shared.stats;
        let degraded = stats.degraded_since_unix_ms.load(Ordering::Acquire) != 0;
        let resynced =
            stats.connected.load(Ordering::Acquire) && stats.initial_done.load(Ordering::Acquire);
        if degraded && !resynced {
            return answer();
        }
        // every call that returned before this sync began has queued its event by now
        let events = stats.acks.queued();
        let ticket = stats.acks.register(events, Some(answer));
        let p = Pending {
            events,
            began,
            degraded,
            ticket,
        };
        if let Err(SendError(p)) = self.settle.send(p) {
            // no settling thread left (they only end with this): wait here
            self.shared.settle(p);
        }
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Release);
    }
}

impl Shared {
    /// Waits a sync out (see [`Durable::answer`]) and answers it if nobody has.
    fn settle(&self, p: Pending) {
        let stats = &self.stats;
        let mut deadline = p.began + self.cfg.peer_timeout;
        let (mut waited, mut answer) = match p.ticket {
            Ok(t) => stats.acks.wait_ticket(t, deadline),
            Err(a) => (Waited::Lost, a),
        };
        loop {
            if waited != Waited::Acked && self.stopped.load(Ordering::Acquire) {
                // the mount is gone: its reply has nowhere to go
                tracing::warn!("the mount stopped while a durable sync waited for the cold side");
                return;
            }
            let outcome = match waited {
                Waited::Acked => Ok(()),
                Waited::TimedOut => Err(RecvTimeoutError::Timeout),
                // no connection, or it changed: the long way, behind the scanner's events
                Waited::Lost => {
                    let (tx, rx) = bounded(1);
                    // counted before it is queued, as every event (see `ack_watch`)
                    stats.acks.count_event();
                    let _ = self.events.send(FsEvent::Sync(tx));
                    rx.recv_deadline(deadline)
                }
            };
            match outcome {
                Ok(()) => {
                    stats.blocked_since_unix_ms.store(0, Ordering::Release);
                    if p.degraded {
                        stats.degraded_since_unix_ms.store(0, Ordering::Release);
                        tracing::warn!(
                            "the cold side is back and has caught up: syncs are durable again"
                        );
                    }
                    break;
                }
                Err(RecvTimeoutError::Disconnected) if Instant::now() < deadline => {
                    std::thread::sleep(SYNC_RETRY);
                }
                Err(_) if self.cfg.block => {
                    // when this sync began to wait, one timeout ago
                    let began = crate::sys::now_unix_ms().saturating_sub(
                        u64::try_from(self.cfg.peer_timeout.as_millis()).unwrap_or(u64::MAX),
                    );
                    let _ = stats.blocked_since_unix_ms.compare_exchange(
                        0,
                        began,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    tracing::warn!(
                        waited_ms = self.cfg.peer_timeout.as_millis(),
                        "a durable sync is still waiting for the cold side (on_peer_loss = \"block\")"
                    );
                    deadline = Instant::now() + self.cfg.peer_timeout;
                }
                Err(_) => match &self.cfg.witness {
                    None => {
                        mark_degraded(stats);
                        break;
                    }
                    // the database hears first that the cold copy is behind
                    Some(w) => match w.outdate() {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::error!(
                                "a durable sync keeps waiting for the cold side: it may not return without it before the lease database records that the cold copy is behind ({e})"
                            );
                            deadline = Instant::now() + self.cfg.peer_timeout;
                        }
                    },
                },
            }
            waited = stats.acks.wait(p.events, deadline, &mut answer);
        }
        if let Some(answer) = answer {
            answer();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue12_a_sync_blocked_on_a_gone_cold_side_lets_its_thread_go_once_the_mount_stops() {
        let stats = Arc::new(SenderStats::default());
        stats.acks.connected(1);
        let cfg = DurableConfig {
            peer_timeout: Duration::from_millis(30),
            block: true,
            witness: None,
            metrics: crate::daemon::metrics::Metrics::new(),
        };
        let (events, _scanner) = bounded(16);
        let durable = Durable::start(cfg, stats, events).unwrap();
        let settling = Arc::downgrade(&durable.shared);
        let (tx, given) = bounded(1);
        durable.answer(Box::new(move || tx.send(()).unwrap()));
        // "block": still waiting after several timeouts
        std::thread::sleep(Duration::from_millis(150));
        assert!(given.try_recv().is_err(), "answered without the cold side");
        drop(durable);
        let until = Instant::now() + Duration::from_secs(5);
        while settling.upgrade().is_some() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            settling.upgrade().is_none(),
            "a settling thread still waits for a mount that is gone"
        );
        // dropped unanswered (a FUSE reply dropped tells the kernel EIO)
        assert!(matches!(
            given.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        ));
    }
}
