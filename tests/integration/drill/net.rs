//! The network drills (issue 16 item 1): each fault is held for a while under the durable
//! writer's load, then healed, and [`Drill::check`] runs. The short versions run in CI; the
//! `#[ignore]`d full versions (longer holds, more flaps) run from `tests/drills.sh`.

use std::time::{Duration, Instant};

use crate::drill::faults::{NetFault, CAP_BYTES_PER_S, CAP_QUEUE};
use crate::drill::proxy::{DELAY_MS, JITTER_MS};
use crate::drill::{mb, Drill, DrillOpts, Table};
use crate::failover_pg::WAIT_MS;
use crate::util::artemis_sync;

/// How often the invariants are sampled while a fault is held.
const SAMPLE: Duration = Duration::from_millis(200);

/// A fault as a drill holds it.
#[derive(Clone, Copy)]
enum Held {
    /// One [`NetFault`] for the time given.
    Net(NetFault, Duration),
    /// The agents' link cut and restored, `n` times, each state held the time given.
    Flap(u32, Duration),
    /// Every chunk through the proxies delayed by 50 ms +- 20 ms, for the time given.
    Delay(Duration),
}

impl Held {
    fn name(self) -> String {
        match self {
            Held::Net(f, d) => format!("{f}, {:.1} s", d.as_secs_f64()),
            Held::Flap(n, d) => format!("link flapping, {n} x {:.1} s down/up", d.as_secs_f64()),
            Held::Delay(d) => format!(
                "delay {DELAY_MS} +- {JITTER_MS} ms (proxy), {:.1} s",
                d.as_secs_f64()
            ),
        }
    }
}

/// What a drill saw while its fault was held.
#[derive(Default)]
struct Seen {
    max_lag_ms: u64,
    degraded: bool,
    /// The old hot's node gone, and the other VM's node started, since the fault began.
    fenced_at: Option<Duration>,
    took_over_at: Option<Duration>,
    /// The bandwidth drill's burst.
    burst: Option<Burst>,
    /// The loss drill: packets the rules dropped.
    dropped: u64,
}

/// Samples the invariants and figures until `until`.
fn watch(dr: &Drill, hot: &str, start: Instant, until: Instant, seen: &mut Seen) {
    let cold = Drill::other(hot);
    while Instant::now() < until {
        dr.assert_one_node("during the fault");
        let h = dr.d.p.status(hot);
        seen.max_lag_ms = seen.max_lag_ms.max(h["lag_ms"].as_u64().unwrap_or(0));
        seen.degraded |= h.get("degraded").is_some();
        if seen.fenced_at.is_none() && h["node_pid"].is_null() {
            seen.fenced_at = Some(start.elapsed());
        }
        if seen.took_over_at.is_none() && dr.d.node_pid(cold).is_some() {
            seen.took_over_at = Some(start.elapsed());
        }
        std::thread::sleep(SAMPLE);
    }
}

/// Holds `held` on the pair, heals, checks the invariants, and adds the figures to `table`.
fn drill(dr: &Drill, held: Held, table: &mut Table) {
    let hot = dr.hot().expect("a hot VM before the fault");
    let cold = Drill::other(hot);
    let synced = dr.d.synced().len();
    let before = |key| (dr.figure(hot, key), dr.figure(cold, key));
    let ((wire, _), (sent, applied), (reconnects, _)) = (
        before("wire_bytes"),
        before("data_bytes"),
        before("reconnects"),
    );
    let mut seen = Seen::default();
    let start = Instant::now();
    match held {
        Held::Net(fault, hold) => {
            dr.topo.apply(fault, dr.vm(hot));
            if fault == NetFault::Cap {
                seen.burst = Some(burst(dr, hot));
            }
            watch(dr, hot, start, start + hold, &mut seen);
        }
        Held::Flap(n, hold) => {
            for _ in 0..n {
                dr.topo.apply(NetFault::Partition, dr.vm(hot));
                watch(dr, hot, start, Instant::now() + hold, &mut seen);
                dr.topo.heal();
                watch(dr, hot, start, Instant::now() + hold, &mut seen);
            }
        }
        Held::Delay(hold) => {
            dr.proxies.iter().for_each(|p| p.set_delay(true));
            watch(dr, hot, start, start + hold, &mut seen);
            dr.proxies.iter().for_each(|p| p.set_delay(false));
        }
    }
    let held_for = start.elapsed();
    let wire_during = dr.figure(hot, "wire_bytes").saturating_sub(wire);
    let synced_during = dr.d.synced().len() - synced;
    if let Held::Net(NetFault::Loss, _) = held {
        seen.dropped = dr.topo.dropped(&dr.topo.a) + dr.topo.dropped(&dr.topo.b);
    }
    dr.topo.heal();
    let healed = Instant::now();
    expect(dr, held, hot, &seen, wire_during, held_for, synced_during);
    let c = dr.check(&held.name(), healed);
    let failed_over = dr.hot() != Some(hot);
    let (resent, reconnected) = if failed_over {
        // the counters are the new hot's, from its start: not comparable
        ("-".to_owned(), "-".to_owned())
    } else {
        (
            mb((c.sent_bytes - sent).saturating_sub(c.applied_bytes - applied)),
            (dr.figure(hot, "reconnects") - reconnects).to_string(),
        )
    };
    table.row(vec![
        held.name(),
        seen.max_lag_ms.to_string(),
        yes_no(seen.degraded),
        match (failed_over, seen.took_over_at, seen.fenced_at) {
            (true, Some(t), Some(f)) => format!(
                "yes: old node fenced at {:.2} s, new one ran at {:.2} s",
                f.as_secs_f64(),
                t.as_secs_f64()
            ),
            _ => yes_no(failed_over),
        },
        format!("{:.2}", c.converge.as_secs_f64()),
        mb(wire_during),
        resent,
        reconnected,
        synced_during.to_string(),
        c.lost.to_string(),
        c.violations.to_string(),
    ]);
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

/// Bytes written at once through the hot's mount, with fdatasync, in the bandwidth drill.
const BURST_BYTES: usize = 45_000_000;

/// Writes [`BURST_BYTES`] of random bytes to a file through `hot`'s mount and fdatasyncs it
/// (durable: the sync returns once the cold VM has it all, or after `peer_timeout_ms` having
/// degraded).
fn burst(dr: &Drill, hot: &str) -> Burst {
    use std::io::Write;
    let mut rng = crate::drill::Rng::new(BURST_BYTES as u64);
    let data: Vec<u8> = (0..BURST_BYTES / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    let path = dr.d.p.fx.path(&format!("{hot}/mnt/large-message.bin"));
    let wire = dr.figure(hot, "wire_bytes");
    let started = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&data).unwrap();
    f.sync_data().unwrap();
    let took = started.elapsed();
    let status = dr.d.p.status(hot);
    let wire = status["wire_bytes"].as_u64().unwrap_or(0) - wire;
    Burst {
        took,
        wire,
        degraded: status.get("degraded").is_some(),
    }
}

/// What the bandwidth drill's burst did.
#[derive(Clone, Copy)]
struct Burst {
    /// Until its fdatasync returned.
    took: Duration,
    /// Bytes the hot put on the wire meanwhile.
    wire: u64,
    /// Whether the hot was degraded (syncs returning without the cold) when it returned.
    degraded: bool,
}

/// What each fault must have done (besides the invariants every fault keeps).
#[track_caller]
fn expect(
    dr: &Drill,
    held: Held,
    hot: &str,
    seen: &Seen,
    wire: u64,
    held_for: Duration,
    synced: usize,
) {
    if let Held::Net(NetFault::HotIsolated, _) = held {
        // fenced on its own clock, before the other VM's node started
        let fenced = seen
            .fenced_at
            .expect("the isolated hot never stopped its node");
        let took = seen.took_over_at.expect("the cold VM never took over");
        assert!(
            fenced <= took,
            "the cold VM's node ran at {took:?}, before the hot fenced at {fenced:?}"
        );
        assert!(
            took <= Duration::from_millis(WAIT_MS + 2000) + SAMPLE,
            "the takeover took {took:?}"
        );
        return;
    }
    // every other fault is between the VMs only: the hot keeps the lease and its node
    assert!(
        seen.took_over_at.is_none(),
        "{}: the cold VM ran a node\n{}",
        held.name(),
        dr.d.p.logs()
    );
    assert!(
        dr.d.node_pid(hot).is_some(),
        "{}: the hot's node stopped",
        held.name()
    );
    // and the fault was real
    match held {
        Held::Net(NetFault::Cap, _) => {
            let b = seen.burst.expect("the burst ran");
            let cap = CAP_BYTES_PER_S as f64 * 1.1;
            let (rate, burst_rate) = (
                wire as f64 / held_for.as_secs_f64(),
                b.wire as f64 / b.took.as_secs_f64(),
            );
            eprintln!(
                "issue16 cap: {:.1} MB/s on the wire during the cap; a {} MB burst's fdatasync returned after {:?} ({:.1} MB/s on the wire meanwhile), {}",
                rate / 1e6,
                BURST_BYTES / 1_000_000,
                b.took,
                burst_rate / 1e6,
                if b.degraded { "degraded (it could not be durable within peer_timeout_ms)" } else { "durable" }
            );
            // over the burst's second, what the hot wrote to its socket may run ahead of the
            // link by what tbf queues (its 200 ms of latency at the rate) and the socket
            // buffers hold: a run met 16.6 MB/s against 16.5 that way; without the cap the
            // 45 MB would be written in a fraction of that time
            let queued = CAP_BYTES_PER_S as f64 * CAP_QUEUE.as_secs_f64();
            assert!(
                rate <= cap && (b.wire as f64) <= cap * b.took.as_secs_f64() + queued,
                "more than 15 MB/s went through the cap (over the burst: {} bytes in {:?})",
                b.wire,
                b.took
            );
            // a sync that returned durable faster than the link could carry it would be a lie
            let least = Duration::from_secs_f64(BURST_BYTES as f64 / cap);
            assert!(
                b.degraded || b.took >= least,
                "the burst's sync returned durable after {:?}, faster than the cap allows ({least:?})",
                b.took
            );
        }
        Held::Net(NetFault::Loss, _) => {
            eprintln!("issue16 loss: {} packets dropped", seen.dropped);
            assert!(seen.dropped > 0, "the loss rules dropped nothing");
        }
        Held::Delay(_) => {
            // a durable sync waits a round trip: at least twice the least delay
            let rate = synced as f64 / held_for.as_secs_f64();
            let most = 1000.0 / (2 * (DELAY_MS - JITTER_MS)) as f64;
            eprintln!("issue16 delay: {rate:.1} durable syncs/s (at most {most:.1} possible)");
            assert!(
                rate <= most,
                "{rate:.1} syncs/s through a delay allowing {most:.1}"
            );
        }
        _ => {}
    }
}

/// The faults of a run, `scale` times as long as the short run's (1: CI).
fn faults(scale: u32) -> Vec<Held> {
    let s = |ms: u64| Duration::from_millis(ms * u64::from(scale));
    vec![
        Held::Net(NetFault::Partition, Duration::from_millis(400)),
        Held::Net(NetFault::Partition, s(5000)),
        Held::Net(NetFault::HotToColdDropped, s(4000)),
        Held::Net(NetFault::ColdToHotDropped, s(4000)),
        Held::Net(NetFault::Loss, s(6000)),
        Held::Net(NetFault::Cap, s(6000)),
        Held::Flap(3 * scale, Duration::from_millis(1500)),
        // last: the pair fails over
        Held::Net(
            NetFault::HotIsolated,
            Duration::from_millis(WAIT_MS * 2 + 2000),
        ),
    ]
}

/// The table every network drill prints.
fn table() -> Table {
    Table::new(&[
        "fault",
        "max lag ms",
        "degraded",
        "failed over",
        "converged s after heal",
        "wire MB during",
        "resent MB",
        "reconnects",
        "records synced during",
        "records lost",
        "two-node violations",
    ])
}

/// The pair of the network drills: `proxied` through the delaying proxies.
fn start(test: &str, proxied: bool) -> Option<Drill> {
    Drill::start(
        test,
        &DrillOpts {
            proxied,
            tmpfs_mib: None,
            seed_mib: if proxied { 8 } else { 32 },
            bulk_every: 10,
        },
    )
}

fn run_network(test: &str, scale: u32) {
    let Some(dr) = start(test, false) else {
        return;
    };
    let mut t = table();
    for held in faults(scale) {
        drill(&dr, held, &mut t);
    }
    let hot = dr.hot().unwrap();
    artemis_sync(dr.d.p.config_of(hot), ["verify"]).code(0);
    eprintln!("\n{test} (scale {scale}):\n{}", t.render());
}

fn run_delay(test: &str, scale: u32) {
    let Some(dr) = start(test, true) else {
        return;
    };
    let mut t = table();
    drill(
        &dr,
        Held::Delay(Duration::from_secs(8 * u64::from(scale))),
        &mut t,
    );
    drill(
        &dr,
        Held::Net(
            NetFault::Partition,
            Duration::from_secs(3 * u64::from(scale)),
        ),
        &mut t,
    );
    eprintln!("\n{test} (scale {scale}):\n{}", t.render());
}

#[test]
fn issue16_drill_network_faults_short() {
    run_network("issue16_drill_network_faults_short", 1);
}

#[test]
fn issue16_drill_delay_through_a_proxy_short() {
    run_delay("issue16_drill_delay_through_a_proxy_short", 1);
}

#[test]
#[ignore = "the full network drills (minutes): tests/drills.sh"]
fn issue16_drill_network_faults_full() {
    run_network("issue16_drill_network_faults_full", 4);
}

#[test]
#[ignore = "the full delay drill: tests/drills.sh"]
fn issue16_drill_delay_through_a_proxy_full() {
    run_delay("issue16_drill_delay_through_a_proxy_full", 4);
}
