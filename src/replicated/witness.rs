//! The hot side's reports to the database lease (`[lease] backend = "postgres"`): how far
//! behind the cold copy is, written into the lease row (`cold_lag_ms`) so that the cold VM,
//! when the hot goes silent, knows by itself whether it may take over (issue 13, rule 4).
//!
//! - **Durable acks**: the row says 0 (in sync) while the stream is connected, past the resync
//!   (its comparison done and every batch it sent acknowledged: a resync may empty a file to
//!   regrow it) and not degraded, "unknown" otherwise
//!   (checked every `update_interval_ms`). Before a sync may
//!   return without the cold side's ack (`on_peer_loss = "degrade"`), [`WitnessHandle::outdate`]
//!   writes "unknown" into the row and only then marks the sender degraded, on this thread,
//!   so no report of "in sync" can slip in between. If the database cannot be told, the sync
//!   does not degrade: it keeps waiting (and the hot fences on time if the database stays
//!   away). This is DRBD's "outdate the peer before going on alone".
//! - **Async acks**: every `update_interval_ms` the row gets an estimate: 0 when everything
//!   sent is acknowledged, else the time since the last acknowledgement, "unknown" while no
//!   cold side is connected or the resync is not yet acknowledged. Writes in the last report's window are not covered: RPO is at
//!   most that lag plus `update_interval_ms`.
//!
//! One thread per sender (per epoch), with its own database connection, so that a report
//! never waits behind a renewal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, select, Receiver, Sender};

use crate::lease::pg::PgStore;
use crate::replicated::stats::SenderStats;

/// Requests waiting for the witness thread.
const WITNESS_QUEUE: usize = 4;

/// What the witness thread is asked.
#[derive(Debug)]
enum Msg {
    /// Record "behind by an unknown amount", then mark the sender degraded.
    Outdate(Sender<Result<(), String>>),
    /// Record "in sync" now (after a drain).
    InSync(Sender<Result<(), String>>),
    /// Record "behind by an unknown amount" (a hand-over without a drain).
    Behind(Sender<Result<(), String>>),
}

/// What [`WitnessHandle::reported`] holds before the first report, or after "unknown".
const NOT_REPORTED: u64 = u64::MAX;

/// A handle for the FUSE threads (degrade) and the agent (drain, `status`).
#[derive(Debug, Clone)]
pub struct WitnessHandle {
    tx: Sender<Msg>,
    /// The lag last written into the row ([`NOT_REPORTED`]: unknown).
    reported: Arc<AtomicU64>,
    /// How long a caller waits for the thread's answer.
    timeout: Duration,
}

impl WitnessHandle {
    fn ask(&self, make: fn(Sender<Result<(), String>>) -> Msg) -> Result<(), String> {
        let (tx, rx) = bounded(1);
        self.tx
            .send_timeout(make(tx), self.timeout)
            .map_err(|_| "the lease witness thread is not running".to_string())?;
        rx.recv_timeout(self.timeout).map_err(|_| {
            format!(
                "the lease database did not take the report within {} ms",
                self.timeout.as_millis()
            )
        })?
    }

    /// Writes "the cold copy is behind" into the lease row, then marks the sender degraded;
    /// an error means neither happened and the sync must keep waiting.
    pub fn outdate(&self) -> Result<(), String> {
        self.ask(Msg::Outdate)
    }

    /// The lag the row says, as far as this host wrote it: `None` unknown.
    pub fn reported(&self) -> Option<u64> {
        let v = self.reported.load(Ordering::Acquire);
        (v != NOT_REPORTED).then_some(v)
    }

    /// Writes "the cold copy is in sync" (the stream was just drained).
    pub fn in_sync(&self) -> Result<(), String> {
        self.ask(Msg::InSync)
    }

    /// Writes "the cold copy is behind by an unknown amount" (a hand-over without a drain).
    pub fn behind(&self) -> Result<(), String> {
        self.ask(Msg::Behind)
    }
}

/// The witness thread's end of the channel, taken by [`spawn`].
#[derive(Debug)]
pub struct Inbox {
    rx: Receiver<Msg>,
    reported: Arc<AtomicU64>,
}

/// The handle, and the end the thread takes once the sender's counters exist.
pub fn channel(timeout: Duration) -> (WitnessHandle, Inbox) {
    let (tx, rx) = bounded(WITNESS_QUEUE);
    let reported = Arc::new(AtomicU64::new(NOT_REPORTED));
    (
        WitnessHandle {
            tx,
            timeout,
            reported: reported.clone(),
        },
        Inbox { rx, reported },
    )
}

/// Who reports, under which epoch, how often, about which sender.
#[derive(Debug)]
pub struct WitnessConfig {
    pub store: PgStore,
    pub holder: String,
    pub epoch: u64,
    pub durable: bool,
    pub period: Duration,
    pub stats: Arc<SenderStats>,
}

/// The running thread; dropping [`Witness::stop`]'s sender ends it.
#[derive(Debug)]
pub struct Witness {
    stop: Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Witness {
    /// Stops the thread and waits for it (at most one database call).
    pub fn stop(mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the witness thread on `rx` (from [`channel`]).
pub fn spawn(cfg: WitnessConfig, Inbox { rx, reported }: Inbox) -> std::io::Result<Witness> {
    let (stop_tx, stop_rx) = bounded(1);
    let thread = std::thread::Builder::new()
        .name("lease-witness".into())
        .spawn(move || Reporter::new(cfg, reported).run(&rx, &stop_rx))?;
    Ok(Witness {
        stop: stop_tx,
        thread: Some(thread),
    })
}

/// What the sender's counters say the row should say: `Some(0)` in sync, `Some(ms)` behind by
/// about that much, `None` unknown.
fn estimate(s: &SenderStats, durable: bool) -> Option<u64> {
    // until the resync's batches are on the cold disk, a file may be there only in part
    if !s.resync_acked() {
        return None;
    }
    if durable {
        // every confirmed sync is on the cold disk unless syncs stopped waiting for it
        let degraded = s.degraded_since_unix_ms.load(Ordering::Acquire) != 0;
        return (!degraded).then_some(0);
    }
    if s.synced() {
        return Some(0);
    }
    // (by the monotonic clock: a wall clock stepped back would make the lag look smaller)
    let last_ack = s.last_ack_mono_ms.load(Ordering::Acquire);
    (s.last_ack_unix_ms.load(Ordering::Acquire) != 0)
        .then(|| crate::sys::monotonic_ms().saturating_sub(last_ack))
}

/// The thread's state.
struct Reporter {
    cfg: WitnessConfig,
    /// What the row says as far as we know (`None` inside: unknown), once written.
    written: Option<Option<u64>>,
    /// The last report error logged, so a database outage is logged once.
    logged: Option<String>,
    /// Shared with the handles: what was last written.
    reported: Arc<AtomicU64>,
}

impl Reporter {
    fn new(cfg: WitnessConfig, reported: Arc<AtomicU64>) -> Reporter {
        Reporter {
            cfg,
            written: None,
            logged: None,
            reported,
        }
    }

    fn run(mut self, rx: &Receiver<Msg>, stop: &Receiver<()>) {
        loop {
            select! {
                recv(stop) -> _ => return,
                recv(rx) -> msg => match msg {
                    Ok(Msg::Outdate(reply)) => {
                        let r = self.write(None);
                        if r.is_ok() {
                            crate::replicated::capture::fuse::mark_degraded(&self.cfg.stats);
                        }
                        let _ = reply.send(r);
                    }
                    Ok(Msg::InSync(reply)) => {
                        let _ = reply.send(self.write(Some(0)));
                    }
                    Ok(Msg::Behind(reply)) => {
                        let _ = reply.send(self.write(None));
                    }
                    Err(_) => return,
                },
                default(self.cfg.period) => self.periodic(),
            }
        }
    }

    fn periodic(&mut self) {
        let want = estimate(&self.cfg.stats, self.cfg.durable);
        // an async estimate changes all the time: write when it crosses "in sync", or moves
        // by more than a period
        let period_ms = crate::daemon::duration_ms(self.cfg.period);
        let stale = match (self.written, want) {
            (Some(Some(a)), Some(b)) => (a == 0) != (b == 0) || a.abs_diff(b) > period_ms,
            (Some(a), b) => a != b,
            (None, _) => true,
        };
        if stale {
            if let Err(e) = self.write(want) {
                if self.logged.as_deref() != Some(&e) {
                    tracing::warn!(
                        epoch = self.cfg.epoch,
                        "cannot report the cold copy's lag to the lease database: {e}"
                    );
                    self.logged = Some(e);
                }
            } else {
                self.logged = None;
            }
        }
    }

    fn write(&mut self, lag_ms: Option<u64>) -> Result<(), String> {
        let c = &mut self.cfg;
        c.store.report_cold_lag(&c.holder, c.epoch, lag_ms)?;
        self.written = Some(lag_ms);
        self.reported
            .store(lag_ms.unwrap_or(NOT_REPORTED), Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected sender whose comparison emitted `resync` batches, `acked` of them
    /// acknowledged, and `emitted` batches in all.
    fn sender(resync: u64, acked: u64, emitted: u64) -> SenderStats {
        let s = SenderStats::default();
        s.connected.store(true, Ordering::Release);
        s.resync_batches.store(resync, Ordering::Release);
        s.initial_done.store(true, Ordering::Release);
        s.emitted.store(emitted, Ordering::Release);
        s.sent_seq.store(emitted, Ordering::Release);
        s.acked_seq.store(acked, Ordering::Release);
        s.last_ack_unix_ms
            .store(crate::sys::now_unix_ms(), Ordering::Release);
        s.last_ack_mono_ms
            .store(crate::sys::monotonic_ms(), Ordering::Release);
        s
    }

    #[test]
    fn issue10_a_wall_clock_stepped_back_does_not_shrink_the_async_lag() {
        // batches after the resync wait for an ack that does not come (the cold disk hangs),
        // and the wall clock steps back an hour after the last ack (NTP, a VM migration):
        // the report must still grow with the time since that ack, not say "in sync"
        let s = sender(5, 6, 8);
        s.last_ack_unix_ms.fetch_add(3_600_000, Ordering::AcqRel);
        std::thread::sleep(Duration::from_millis(50));
        let lag = estimate(&s, false);
        assert!(lag.is_some_and(|l| l >= 50), "{lag:?}");
    }

    #[test]
    fn issue13_not_in_sync_while_the_resync_is_not_acknowledged() {
        // the comparison is done, but its last two batches (which may regrow an emptied
        // file) are not on the cold disk: a hot that dies now leaves a copy that must not be
        // promoted as in sync, durable or not
        let s = sender(5, 3, 5);
        assert_eq!(estimate(&s, true), None);
        assert_eq!(
            estimate(&s, false),
            None,
            "a recent ack is no estimate mid-resync"
        );
        s.acked_seq.store(5, Ordering::Release);
        assert_eq!(estimate(&s, true), Some(0));
        assert_eq!(estimate(&s, false), Some(0));
    }

    #[test]
    fn issue13_after_the_resync_durable_is_in_sync_and_async_is_the_time_since_an_ack() {
        // batches after the resync that wait for an ack: durable syncs still wait for them,
        // async ones do not
        let s = sender(5, 6, 8);
        assert_eq!(estimate(&s, true), Some(0));
        let lag = estimate(&s, false).expect("an estimate");
        assert!(lag < 60_000, "{lag}");
        s.degraded_since_unix_ms
            .store(crate::sys::now_unix_ms(), Ordering::Release);
        assert_eq!(
            estimate(&s, true),
            None,
            "degraded: syncs returned without the peer"
        );
        s.connected.store(false, Ordering::Release);
        assert_eq!(estimate(&s, false), None);
        let s = sender(5, 5, 5);
        s.initial_done.store(false, Ordering::Release);
        assert_eq!(
            estimate(&s, true),
            None,
            "a new connection's comparison runs"
        );
    }
}
