//! The hot side's progress through an initial sync or resync, for `status`, the metrics, the
//! log and `artemis-sync progress`: [`SyncTracker`], fed by the scanner (what it compared, when
//! a change to send was found, each batch it emitted) and the network task (page data sent,
//! acknowledgements), and [`RateWindow`], the rate over the last few seconds and the ETA.
//!
//! A byte counts as done once the cold side is known to have it: it was compared and nothing
//! found before it waits for an acknowledgement. So done is the comparison's position when the
//! oldest unacknowledged change was found, or the whole comparison so far when none waits. In
//! an initial sync that is what was sent and acknowledged; in a resync of a mostly equal tree,
//! what was compared. The sync ends (and `status` drops it) when the comparison is done and
//! every batch it emitted is acknowledged, and is kept as done until the connection ends; a
//! lost connection abandons it (the next connection's comparison starts over).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::daemon::protocol::{SyncDone, SyncPhase, SyncProgress};

/// The rate is measured over about this much of the recent past.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);
/// At most one rate sample per this long.
const RATE_SAMPLE: Duration = Duration::from_millis(250);
/// No rate is given from less than this much time.
const RATE_MIN_SPAN: Duration = Duration::from_millis(500);
/// How often the agent logs a progress line during a sync.
pub const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(5);
/// Milliseconds in a second.
const MS_PER_S: u128 = 1000;

/// Bytes and files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Bytes of regular files.
    pub bytes: u64,
    /// Regular files.
    pub files: u64,
}

/// Samples of a growing count, and its rate over the last [`RATE_WINDOW`].
#[derive(Debug, Clone, Default)]
pub struct RateWindow {
    /// (time since the start, count), oldest first; the first is at or before the window.
    samples: VecDeque<(Duration, u64)>,
}

impl RateWindow {
    /// Starts at count 0 at time 0.
    pub fn new() -> RateWindow {
        RateWindow {
            samples: VecDeque::from([(Duration::ZERO, 0)]),
        }
    }

    /// Notes `count` at `at` (time since the start): kept if the last sample is
    /// [`RATE_SAMPLE`] old; samples older than needed to span the window are dropped.
    pub fn record(&mut self, at: Duration, count: u64) {
        if self
            .samples
            .back()
            .is_none_or(|(t, _)| at.saturating_sub(*t) >= RATE_SAMPLE)
        {
            self.samples.push_back((at, count));
        }
        let start = at.saturating_sub(RATE_WINDOW);
        while self.samples.len() > 1 && self.samples[1].0 <= start {
            self.samples.pop_front();
        }
    }

    /// Count per second from the oldest kept sample to (`at`, `count`); `None` over less than
    /// [`RATE_MIN_SPAN`].
    pub fn per_s(&self, at: Duration, count: u64) -> Option<u64> {
        let (t0, c0) = *self.samples.front()?;
        let span = at.checked_sub(t0).filter(|s| *s >= RATE_MIN_SPAN)?;
        let grown = u128::from(count.saturating_sub(c0));
        u64::try_from(grown * MS_PER_S / span.as_millis()).ok()
    }
}

/// Seconds to do `left` at `per_s` (rounded up); `None` when the rate is unknown or zero
/// with something left.
pub fn eta_s(left: u64, per_s: Option<u64>) -> Option<u64> {
    if left == 0 {
        return Some(0);
    }
    per_s.filter(|r| *r > 0).map(|r| left.div_ceil(r))
}

/// One sync in progress.
#[derive(Debug)]
struct Run {
    phase: SyncPhase,
    started: Instant,
    total: Counts,
    compared: Counts,
    compare_done: bool,
    /// Where the comparison was when the oldest change not yet in a batch was found.
    pending: Option<Counts>,
    /// Emitted batches not yet acknowledged: number, and where the comparison was when
    /// their first change was found.
    batches: VecDeque<(u64, Counts)>,
    sent: u64,
    rate: RateWindow,
    last_log: Instant,
}

impl Run {
    fn done(&self) -> Counts {
        self.batches
            .front()
            .map(|(_, c)| *c)
            .or(self.pending)
            .unwrap_or(self.compared)
    }

    fn finished(&self) -> bool {
        self.compare_done && self.batches.is_empty() && self.pending.is_none()
    }

    fn snapshot(&mut self) -> SyncProgress {
        let done = self.done();
        let at = self.started.elapsed();
        self.rate.record(at, done.bytes);
        let per_s = self.rate.per_s(at, done.bytes);
        let total = Counts {
            bytes: self.total.bytes.max(done.bytes),
            files: self.total.files.max(done.files),
        };
        SyncProgress {
            phase: self.phase,
            bytes_done: done.bytes,
            bytes_total: total.bytes,
            files_done: done.files,
            files_total: total.files,
            bytes_sent: self.sent,
            bytes_per_s: per_s,
            eta_s: eta_s(total.bytes - done.bytes, per_s),
            elapsed_ms: millis(at),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Debug, Default)]
struct State {
    run: Option<Run>,
    last: Option<SyncDone>,
}

/// The sync in progress, and this connection's once it finished; shared by the scanner, the
/// network task and `status`.
#[derive(Debug, Default)]
pub struct SyncTracker {
    state: Mutex<State>,
}

impl SyncTracker {
    fn with_run(&self, f: impl FnOnce(&mut Run)) {
        let mut st = self.state.lock().expect("sync progress lock");
        if let Some(run) = &mut st.run {
            f(run);
            if run.finished() {
                finish(&mut st);
            }
        }
    }

    /// A comparison with the cold side's index begins, over `total`.
    pub(crate) fn start(&self, phase: SyncPhase, total: Counts) {
        let now = Instant::now();
        tracing::info!(
            phase = %phase,
            files_total = total.files,
            bytes_total = total.bytes,
            "{phase}: comparing {} files, {} with the cold side's copy",
            total.files,
            crate::daemon::protocol::human_bytes(total.bytes),
        );
        self.state.lock().expect("sync progress lock").run = Some(Run {
            phase,
            started: now,
            total,
            compared: Counts::default(),
            compare_done: false,
            pending: None,
            batches: VecDeque::new(),
            sent: 0,
            rate: RateWindow::new(),
            last_log: now,
        });
    }

    /// The comparison covered `bytes` more, and finished `files` more files.
    pub(crate) fn compared(&self, bytes: u64, files: u64) {
        self.with_run(|r| {
            r.compared.bytes += bytes;
            r.compared.files += files;
        });
    }

    /// The comparison found something the cold side lacks, at its current position.
    pub(crate) fn change_found(&self) {
        self.with_run(|r| {
            if !r.compare_done && r.pending.is_none() {
                r.pending = Some(r.compared);
            }
        });
    }

    /// The scanner emitted batch number `batch` (of this connection) with what was found.
    pub(crate) fn emitted(&self, batch: u64) {
        self.with_run(|r| {
            if let Some(from) = r.pending.take() {
                r.batches.push_back((batch, from));
            }
        });
    }

    /// The comparison is over (its last batch emitted).
    pub(crate) fn compare_finished(&self) {
        self.with_run(|r| {
            r.compare_done = true;
            // changes found and never emitted (the connection went) will not be acknowledged
            r.pending = None;
        });
    }

    /// `bytes` of page data went on the wire.
    pub(crate) fn sent(&self, bytes: u64) {
        self.with_run(|r| r.sent += bytes);
    }

    /// The cold side acknowledged batch `seq` and every one before it.
    pub(crate) fn acked(&self, seq: u64) {
        self.with_run(|r| {
            while r.batches.front().is_some_and(|(b, _)| *b <= seq) {
                r.batches.pop_front();
            }
            let at = r.started.elapsed();
            let done = r.done().bytes;
            r.rate.record(at, done);
        });
    }

    /// The connection ended: the sync in progress is abandoned, and the one finished is
    /// forgotten (the next connection compares again).
    pub(crate) fn abort(&self) {
        let mut st = self.state.lock().expect("sync progress lock");
        st.last = None;
        if let Some(mut run) = st.run.take() {
            let p = run.snapshot();
            tracing::info!(phase = %p.phase, bytes_done = p.bytes_done, bytes_total = p.bytes_total, "{} abandoned with the connection at {}%; the next connection compares again", p.phase, p.percent());
        }
    }

    /// The sync in progress, if any, and the one of this connection once finished.
    pub fn snapshot(&self) -> (Option<SyncProgress>, Option<SyncDone>) {
        let mut st = self.state.lock().expect("sync progress lock");
        let progress = st.run.as_mut().map(Run::snapshot);
        (progress, st.last.clone())
    }

    /// Logs a progress line if a sync runs and the last line is [`PROGRESS_LOG_EVERY`] old.
    pub(crate) fn log_if_due(&self) {
        let mut st = self.state.lock().expect("sync progress lock");
        let Some(run) = &mut st.run else { return };
        if run.last_log.elapsed() < PROGRESS_LOG_EVERY {
            return;
        }
        run.last_log = Instant::now();
        let p = run.snapshot();
        tracing::info!(
            phase = %p.phase,
            bytes_done = p.bytes_done,
            bytes_total = p.bytes_total,
            files_done = p.files_done,
            files_total = p.files_total,
            bytes_sent = p.bytes_sent,
            bytes_per_s = p.bytes_per_s,
            eta_s = p.eta_s,
            "{p}"
        );
    }
}

/// The run is over: logged, kept as the last one.
fn finish(st: &mut State) {
    let Some(run) = st.run.take() else { return };
    let done = SyncDone {
        phase: run.phase,
        bytes: run.compared.bytes,
        files: run.compared.files,
        bytes_sent: run.sent,
        elapsed_ms: millis(run.started.elapsed()),
        finished_unix_ms: crate::sys::now_unix_ms(),
    };
    tracing::info!(
        phase = %done.phase,
        bytes = done.bytes,
        files = done.files,
        bytes_sent = done.bytes_sent,
        elapsed_ms = done.elapsed_ms,
        "{done}; the cold copy has caught up"
    );
    st.last = Some(done);
}

#[cfg(test)]
mod tests;
