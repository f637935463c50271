//! Durable acks (`ack = "durable"`): an `fsync`/`fdatasync` through the mount, of a file or a
//! directory (also the one `msync(MS_SYNC)` and an `O_DSYNC` write make), and every write
//! through an `O_DIRECT` handle (Artemis' ASYNCIO journal syncs no other way), returns only
//! once the cold side has acknowledged, so fsynced, every op made from the calls before it.
//!
//! After the local sync, the FUSE thread registers the sync's reply with the
//! [`crate::replicated::ack_watch`]: the reply goes out as soon as the scanner has flushed the
//! events of the calls before it and the cold side has acknowledged the batches that carried
//! them, given by whichever thread learns it first (usually the connection's reader as it
//! reads the ack). The FUSE thread goes on serving the kernel and parks the sync's ticket; no
//! thread wakes for a sync answered in time. A watcher looks at the parked tickets every
//! twentieth of `peer_timeout_ms` ([`watch_period`]) and hands a sync whose deadline passed or
//! whose connection ended to a settling thread ([`SETTLE_THREADS`]), which does what the ack
//! watch cannot. A sync that began degraded goes to a settling thread at once: its ack ends the
//! degradation, and the thread wakes for it. Without a connection, or when it changes
//! meanwhile, the settling thread queues [`FsEvent::Sync`] behind those events instead: the
//! scanner flushes its batch and hands the reply to the network task, which answers when the
//! ack of the last batch sent arrives. With the cold side gone or slow for
//! `peer_timeout_ms`, `on_peer_loss = "degrade"` goes on as async (logged once, and
//! [`SenderStats::degraded_since_unix_ms`] set for `status`) until the stream is connected and
//! the resync after it done, when the next sync that is acknowledged in time, and whose calls
//! include every call before a sync that returned without the cold side, makes syncs durable
//! again; `"block"` keeps waiting. With the database lease, degrading waits until the
//! lease row says the cold copy is behind ([`crate::replicated::witness`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
/// Syncs parked with the watcher; beyond, a sync goes to the settling threads at once.
const PARKED_MAX: usize = 256;
/// The watcher's period: bounds of a twentieth of `peer_timeout_ms`, so that a sync's
/// deadline passes at most 5% late, and the watcher does not spin on a short timeout.
const WATCH_PERIOD_MIN: Duration = Duration::from_millis(1);
const WATCH_PERIOD_MAX: Duration = Duration::from_millis(20);

/// How often the watcher looks at the parked syncs, for a `peer_timeout`.
fn watch_period(peer_timeout: Duration) -> Duration {
    (peer_timeout / 20).clamp(WATCH_PERIOD_MIN, WATCH_PERIOD_MAX)
}

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
    /// Syncs registered with the ack watch, oldest first, for the watcher to look at.
    parked: Mutex<Vec<DurableSync>>,
    /// The most events counted before a sync that returned without the cold side (degraded):
    /// a degradation ends only on the ack of a sync whose calls include them all. Held while a
    /// sync returns without the cold side and while a degradation ends.
    unconfirmed: Mutex<u64>,
}

/// A durable sync whose local part is done.
#[derive(Debug)]
struct DurableSync<T = Ticket> {
    info: SyncInfo,
    /// Parked: its ticket. Handed to a settling thread: a ticket to wait on, or what the
    /// ack watch already said.
    stage: T,
}

/// What a durable sync was when its local part was done.
#[derive(Debug, Clone, Copy)]
struct SyncInfo {
    /// Events counted then.
    events: u64,
    began: Instant,
    /// Whether syncs were degraded then.
    degraded: bool,
}

/// What a settling thread is given of a sync.
enum Stage {
    /// Registered with the ack watch: wait on it.
    Waiting(Ticket),
    /// The ack watch's outcome (`Lost` without a connection), and the answer unless given.
    Found(Waited, Option<Answer>),
}

/// A sync handed to a settling thread.
type Pending = DurableSync<Stage>;

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
            parked: Mutex::new(Vec::new()),
            unconfirmed: Mutex::new(0),
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
        let watcher = (shared.clone(), settle.clone());
        std::thread::Builder::new()
            .name("durable-watch".into())
            .spawn(move || watcher.0.watch(&watcher.1))?;
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
        let mut degraded = stats.degraded_since_unix_ms.load(Ordering::Acquire) != 0;
        let resynced =
            stats.connected.load(Ordering::Acquire) && stats.initial_done.load(Ordering::Acquire);
        if degraded && !resynced {
            // (under the lock: no degradation ends between this look and the answer)
            let mut unconfirmed = self.shared.unconfirmed();
            degraded = stats.degraded_since_unix_ms.load(Ordering::Acquire) != 0;
            if degraded {
                // the calls before it are on no cold disk yet: only the ack of a sync after
                // them all ends the degradation
                *unconfirmed = (*unconfirmed).max(stats.acks.queued());
                drop(unconfirmed);
                return answer();
            }
        }
        // every call that returned before this sync began has queued its event by now
        let events = stats.acks.queued();
        let info = SyncInfo {
            events,
            began,
            degraded,
        };
        let stage = match stats.acks.register(events, Some(answer)) {
            // one that began degraded ends the degradation on its ack: a settling thread
            // waits for it, and wakes at once
            Ok(ticket) if degraded => Stage::Waiting(ticket),
            Ok(ticket) => match self.shared.park(DurableSync {
                info,
                stage: ticket,
            }) {
                Ok(()) => return,
                Err(ticket) => Stage::Waiting(ticket),
            },
            // no connection: the long way
            Err(answer) => Stage::Found(Waited::Lost, answer),
        };
        self.shared
            .hand_over(&self.settle, DurableSync { info, stage });
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Release);
    }
}

impl Shared {
    fn parked(&self) -> std::sync::MutexGuard<'_, Vec<DurableSync>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unconfirmed(&self) -> std::sync::MutexGuard<'_, u64> {
        self.unconfirmed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A sync of the first `events` events returns without the cold side: degraded (marked
    /// here unless `marked` by the witness) until a sync after them is acknowledged.
    fn unacknowledged(&self, events: u64, marked: bool) {
        let mut unconfirmed = self.unconfirmed();
        *unconfirmed = (*unconfirmed).max(events);
        // (a degradation that ended since the witness marked it begins again)
        if !marked || self.stats.degraded_since_unix_ms.load(Ordering::Acquire) == 0 {
            mark_degraded(&self.stats);
        }
    }

    /// Gives `p` to a settling thread through `settle` (waiting for room), or settles it here
    /// if none is left (they only end with the mount).
    fn hand_over(&self, settle: &Sender<Pending>, p: Pending) {
        if let Err(SendError(p)) = settle.send(p) {
            self.settle(p);
        }
    }

    /// Parks `sync` for the watcher; its ticket back if [`PARKED_MAX`] are parked already.
    fn park(&self, sync: DurableSync) -> Result<(), Ticket> {
        let mut parked = self.parked();
        if parked.len() >= PARKED_MAX {
            return Err(sync.stage);
        }
        parked.push(sync);
        Ok(())
    }

    /// The watcher: every [`watch_period`], hands each parked sync that the cold side did
    /// not acknowledge in time, or whose connection ended, to a settling thread; once the
    /// mount is gone, drops the replies still parked (the kernel has nobody to give them to).
    fn watch(&self, settle: &Sender<Pending>) {
        let period = watch_period(self.cfg.peer_timeout);
        while !self.stopped.load(Ordering::Acquire) {
            std::thread::sleep(period);
            let parked = std::mem::take(&mut *self.parked());
            let mut waiting = Vec::new();
            for DurableSync { info, stage } in parked {
                match self
                    .stats
                    .acks
                    .try_ticket(stage, info.began + self.cfg.peer_timeout)
                {
                    Err(ticket) => waiting.push(DurableSync {
                        info,
                        stage: ticket,
                    }),
                    Ok((Waited::Acked, answer)) => {
                        if let Some(answer) = answer {
                            answer();
                        }
                        self.acked(&info);
                    }
                    Ok((waited, answer)) => {
                        let stage = Stage::Found(waited, answer);
                        self.hand_over(settle, DurableSync { info, stage });
                    }
                }
            }
            // syncs parked meanwhile are younger: after these
            let mut parked = self.parked();
            waiting.append(&mut parked);
            *parked = waiting;
        }
        for sync in std::mem::take(&mut *self.parked()) {
            // taken out of the watch, the reply is dropped: the kernel tells the caller EIO
            let _ = self.stats.acks.try_ticket(sync.stage, Instant::now());
        }
    }

    /// A sync was acknowledged in time: nothing blocks, and a sync that began degraded ends
    /// the degradation, unless a sync that returned without the cold side had calls after
    /// its own (it may have begun waiting before a reconnection, and those calls' ops may
    /// still be on their way).
    fn acked(&self, info: &SyncInfo) {
        self.stats.blocked_since_unix_ms.store(0, Ordering::Release);
        if info.degraded {
            let unconfirmed = self.unconfirmed();
            if info.events >= *unconfirmed
                && self.stats.degraded_since_unix_ms.swap(0, Ordering::AcqRel) != 0
            {
                tracing::warn!("the cold side is back and has caught up: syncs are durable again");
            }
        }
    }

    /// Waits a sync out (see [`Durable::answer`]) and answers it if nobody has.
    fn settle(&self, p: Pending) {
        let stats = &self.stats;
        let mut deadline = p.info.began + self.cfg.peer_timeout;
        let (mut waited, mut answer) = match p.stage {
            Stage::Waiting(t) => stats.acks.wait_ticket(t, deadline),
            Stage::Found(waited, answer) => (waited, answer),
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
                    self.acked(&p.info);
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
                        self.unacknowledged(p.info.events, false);
                        break;
                    }
                    // the database hears first that the cold copy is behind
                    Some(w) => match w.outdate() {
                        Ok(()) => {
                            self.unacknowledged(p.info.events, true);
                            break;
                        }
                        Err(e) => {
                            tracing::error!(
                                "a durable sync keeps waiting for the cold side: it may not return without it before the lease database records that the cold copy is behind ({e})"
                            );
                            deadline = Instant::now() + self.cfg.peer_timeout;
                        }
                    },
                },
            }
            waited = stats.acks.wait(p.info.events, deadline, &mut answer);
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

    fn durable(peer_timeout_ms: u64, stats: &Arc<SenderStats>) -> Durable {
        let cfg = DurableConfig {
            peer_timeout: Duration::from_millis(peer_timeout_ms),
            block: false,
            witness: None,
            metrics: crate::daemon::metrics::Metrics::new(),
        };
        let (events, _scanner) = bounded(16);
        Durable::start(cfg, stats.clone(), events).unwrap()
    }

    /// Polls `f` for up to 5 s.
    fn eventually(f: impl Fn() -> bool) -> bool {
        let until = Instant::now() + Duration::from_secs(5);
        while !f() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        f()
    }

    /// A connected sender with durable acks after `peer_timeout_ms`, one event queued, and a
    /// sync after it: whether its answer was given comes on the channel.
    fn one_sync(
        peer_timeout_ms: u64,
    ) -> (Arc<SenderStats>, Durable, crossbeam_channel::Receiver<()>) {
        let stats = Arc::new(SenderStats::default());
        stats.acks.connected(1);
        let durable = durable(peer_timeout_ms, &stats);
        stats.acks.count_event();
        let (tx, given) = bounded(1);
        durable.answer(Box::new(move || tx.send(()).unwrap()));
        (stats, durable, given)
    }

    #[test]
    fn issue12_a_sync_acknowledged_in_time_is_answered_by_the_ack_and_leaves_nothing_parked() {
        let (stats, durable, given) = one_sync(40);
        assert!(given.try_recv().is_err(), "answered before the ack");
        stats.acks.flushed(1, 1, 1);
        stats.acks.acked(1, 1);
        // given by the ack's own call, before any other thread ran
        assert!(given.try_recv().is_ok(), "not answered by the ack");
        assert!(eventually(|| durable.shared.parked().is_empty()));
        assert_eq!(stats.acks.waiting(), 0);
        // well past its deadline: not degraded, not answered twice
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(stats.degraded_since_unix_ms.load(Ordering::Acquire), 0);
        assert!(given.try_recv().is_err());
    }

    #[test]
    fn issue12_a_sync_that_waited_across_a_reconnection_does_not_end_a_degradation_it_does_not_cover(
    ) {
        // degraded, on connection 1, resynced
        let stats = Arc::new(SenderStats::default());
        stats.acks.connected(1);
        stats.connected.store(true, Ordering::Release);
        stats.initial_done.store(true, Ordering::Release);
        stats.degraded_since_unix_ms.store(1, Ordering::Release);
        let durable = durable(5_000, &stats);
        // S: a write, then a sync that began degraded (its ack would end the degradation)
        stats.acks.count_event();
        let (tx, given_s) = bounded(1);
        durable.answer(Box::new(move || tx.send(()).unwrap()));
        assert!(given_s.try_recv().is_err());
        // connection 1 ends: S takes the long way, finds no connection, and waits again
        stats.connected.store(false, Ordering::Release);
        stats.acks.disconnected(1);
        std::thread::sleep(Duration::from_millis(60));
        // connection 2: its comparison runs
        stats.acks.connected(2);
        stats.initial_done.store(false, Ordering::Release);
        stats.connected.store(true, Ordering::Release);
        // S2: a write behind the comparison's walk, and its sync, answered without the cold
        // side (degraded, not resynced)
        stats.acks.count_event();
        let (tx, given_s2) = bounded(1);
        durable.answer(Box::new(move || tx.send(()).unwrap()));
        assert!(given_s2.try_recv().is_ok(), "a degraded sync waited");
        let s2_events = stats.acks.queued();
        // the comparison is done; its flush has handled the events before S2's write only
        // (that write's event is still queued), and its batch is acknowledged
        std::thread::sleep(Duration::from_millis(60));
        stats.initial_done.store(true, Ordering::Release);
        stats.acks.flushed(2, s2_events - 1, 1);
        stats.acks.acked(2, 1);
        assert!(
            given_s.recv_timeout(Duration::from_secs(5)).is_ok(),
            "S was not answered by its ack"
        );
        std::thread::sleep(Duration::from_millis(100));
        // S2's write is on no cold disk, and S2 returned: still degraded (not RPO 0)
        assert_ne!(
            stats.degraded_since_unix_ms.load(Ordering::Acquire),
            0,
            "the degradation ended while a sync answered without the cold side is not acknowledged"
        );
        // the next sync, after S2's write, ends it once acknowledged
        let (tx, given_s3) = bounded(1);
        durable.answer(Box::new(move || tx.send(()).unwrap()));
        stats.acks.flushed(2, stats.acks.queued(), 2);
        stats.acks.acked(2, 2);
        assert!(given_s3.recv_timeout(Duration::from_secs(5)).is_ok());
        assert!(eventually(|| stats
            .degraded_since_unix_ms
            .load(Ordering::Acquire)
            == 0));
        drop(durable);
    }

    #[test]
    fn issue12_a_parked_sync_the_cold_side_does_not_acknowledge_degrades_after_its_timeout() {
        let began = Instant::now();
        let (stats, durable, given) = one_sync(60);
        given
            .recv_timeout(Duration::from_secs(5))
            .expect("a sync never acknowledged was not answered after its timeout");
        let waited = began.elapsed();
        assert!(
            waited >= Duration::from_millis(60),
            "answered after {waited:?}"
        );
        // a twentieth late at most, with room for a busy machine
        assert!(
            waited < Duration::from_millis(1000),
            "answered after {waited:?}"
        );
        assert_ne!(stats.degraded_since_unix_ms.load(Ordering::Acquire), 0);
        assert_eq!(stats.acks.waiting(), 0);
        assert!(durable.shared.parked().is_empty());
    }
}
