use std::time::Duration;

use super::*;

const MIB: u64 = 1 << 20;

fn s(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

#[test]
fn a_steady_rate_is_measured_and_gives_the_eta() {
    let mut r = RateWindow::new();
    // 10 MiB/s, sampled every 100 ms for 3 s
    for t in (100..=3000).step_by(100) {
        r.record(s(t), t * 10 * MIB / 1000);
    }
    assert_eq!(r.per_s(s(3000), 30 * MIB), Some(10 * MIB));
    assert_eq!(eta_s(70 * MIB, Some(10 * MIB)), Some(7));
    // rounded up: 1 byte left is a second, not zero
    assert_eq!(eta_s(1, Some(10 * MIB)), Some(1));
    assert_eq!(eta_s(10 * MIB + 1, Some(10 * MIB)), Some(2));
}

#[test]
fn no_rate_from_too_short_a_span_and_no_eta_without_a_rate() {
    let mut r = RateWindow::new();
    r.record(s(100), MIB);
    assert_eq!(r.per_s(s(400), 4 * MIB), None, "0.4 s is too short");
    assert_eq!(r.per_s(s(500), 5 * MIB), Some(10 * MIB));
    assert_eq!(eta_s(5, None), None);
    assert_eq!(eta_s(5, Some(0)), None, "stalled: unknown, not infinite");
    assert_eq!(eta_s(0, None), Some(0), "nothing left is done now");
}

#[test]
fn the_rate_follows_the_last_window_not_the_whole_run() {
    let mut r = RateWindow::new();
    // 20 s at 1 MiB/s, then 20 s at 5 MiB/s
    let mut count = 0;
    for t in 1..=400u64 {
        count += if t <= 200 { MIB / 10 } else { MIB / 2 };
        r.record(s(t * 100), count);
    }
    assert_eq!(r.per_s(s(40_000), count), Some(5 * MIB));
    assert!(
        r.samples.len() <= 1 + (RATE_WINDOW.as_millis() / RATE_SAMPLE.as_millis()) as usize + 1,
        "samples kept: {}",
        r.samples.len()
    );
    // the oldest kept sample is at or before the window's start: the span covers it
    assert!(r.samples[0].0 <= s(30_000));
    // a stall shows as a falling rate, then zero once the window holds nothing else
    r.record(s(50_000), count);
    assert!(r.per_s(s(50_000), count).unwrap() < MIB / 10);
    r.record(s(61_000), count);
    assert_eq!(r.per_s(s(61_000), count), Some(0));
}

#[test]
fn samples_closer_than_the_sampling_period_are_not_kept() {
    let mut r = RateWindow::new();
    for t in 1..=100 {
        r.record(s(t), t);
    }
    assert_eq!(r.samples.len(), 1, "all within 250 ms of the start");
    r.record(s(250), 250);
    assert_eq!(r.samples.len(), 2);
}

fn counts(bytes: u64, files: u64) -> Counts {
    Counts { bytes, files }
}

fn done(t: &SyncTracker) -> (u64, u64) {
    let p = t.snapshot().0.expect("a sync in progress");
    (p.bytes_done, p.files_done)
}

#[test]
fn done_counts_what_the_cold_side_is_known_to_have() {
    let t = SyncTracker::default();
    assert_eq!(t.snapshot(), (None, None));
    t.start(SyncPhase::Resync, counts(300, 3));
    // file a (100 bytes) is equal: done as soon as compared
    t.compared(100, 1);
    assert_eq!(done(&t), (100, 1));
    // file b differs from its start: nothing of it is done until its batch is acknowledged
    t.change_found();
    t.compared(100, 1);
    assert_eq!(done(&t), (100, 1));
    t.emitted(1);
    t.sent(100);
    // file c is equal, but behind b's unacknowledged batch
    t.compared(100, 1);
    assert_eq!(done(&t), (100, 1));
    t.acked(1);
    let p = t.snapshot().0.unwrap();
    assert_eq!((p.bytes_done, p.files_done, p.bytes_sent), (300, 3, 100));
    assert_eq!((p.bytes_total, p.files_total), (300, 3));
    t.compare_finished();
    let (progress, last) = t.snapshot();
    assert_eq!(progress, None, "caught up: no progress shown");
    let last = last.expect("the finished sync is kept");
    assert_eq!(
        (last.phase, last.bytes, last.files, last.bytes_sent),
        (SyncPhase::Resync, 300, 3, 100)
    );
    // kept while the connection lasts, forgotten when it ends
    t.abort();
    assert_eq!(t.snapshot(), (None, None));
}

#[test]
fn a_sync_ends_at_the_last_ack_after_the_comparison() {
    let t = SyncTracker::default();
    t.start(SyncPhase::Initial, counts(200, 2));
    t.change_found();
    t.compared(100, 1);
    t.emitted(1);
    t.change_found();
    t.compared(100, 1);
    t.emitted(2);
    t.compare_finished();
    assert_eq!(done(&t), (0, 0));
    t.acked(1);
    assert_eq!(done(&t), (100, 1));
    // batches emitted after the comparison (events) do not hold the sync open
    t.emitted(3);
    t.acked(2);
    assert_eq!(t.snapshot().0, None);
    assert_eq!(t.snapshot().1.unwrap().bytes, 200);
}

#[test]
fn a_lost_connection_abandons_the_sync_and_the_totals_never_fall_below_done() {
    let t = SyncTracker::default();
    t.start(SyncPhase::Initial, counts(100, 1));
    // the file grew since the tree was sized
    t.compared(150, 1);
    let p = t.snapshot().0.unwrap();
    assert_eq!((p.bytes_done, p.bytes_total, p.percent()), (150, 150, 100));
    t.abort();
    assert_eq!(t.snapshot(), (None, None), "abandoned, not finished");
    // calls for a sync no longer running change nothing
    t.compared(1, 1);
    t.acked(9);
    assert_eq!(t.snapshot(), (None, None));
}
