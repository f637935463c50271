//! The network drills (issue 16 item 1): each fault is held for a while under the durable
//! writer's load, then healed, and [`Drill::check`] runs. The short versions run in CI; the
//! `#[ignore]`d full versions (longer holds, more flaps) run from `tests/drills.sh`.

use std::time::{Duration, Instant};

use crate::drill::faults::{NetFault, CAP_BYTES_PER_S};
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
    let synced = dr.d.synced().len();
    let (wire, reconnects, resends) = (
        dr.figure(hot, "wire_bytes"),
        dr.figure(hot, "reconnects"),
        dr.figure(hot, "resends"),
    );
    let mut seen = Seen::default();
    let start = Instant::now();
    match held {
        Held::Net(fault, hold) => {
            dr.topo.apply(fault, dr.vm(hot));
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
    dr.topo.heal();
    let healed = Instant::now();
    expect(dr, held, hot, &seen, wire_during, held_for);
    let c = dr.check(&held.name(), healed);
    let now_hot = dr.hot().unwrap_or("none");
    table.row(vec![
        held.name(),
        seen.max_lag_ms.to_string(),
        if seen.degraded { "yes" } else { "no" }.to_owned(),
        if now_hot == hot {
            "no".to_owned()
        } else {
            format!(
                "yes, after {:.2} s (old node fenced after {:.2} s)",
                seen.took_over_at.unwrap_or_default().as_secs_f64(),
                seen.fenced_at.unwrap_or_default().as_secs_f64()
            )
        },
        format!("{:.2}", c.converge.as_secs_f64()),
        mb(wire_during),
        (dr.figure(now_hot, "reconnects")
            .saturating_sub(if now_hot == hot { reconnects } else { 0 }))
        .to_string(),
        (dr.figure(now_hot, "resends")
            .saturating_sub(if now_hot == hot { resends } else { 0 }))
        .to_string(),
        (c.synced - synced).to_string(),
        "0".to_owned(),
        "held".to_owned(),
    ]);
}

/// What each fault must have done (besides the invariants every fault keeps).
#[track_caller]
fn expect(dr: &Drill, held: Held, hot: &str, seen: &Seen, wire: u64, held_for: Duration) {
    match held {
        Held::Net(NetFault::HotIsolated, _) => {
            // fenced on its own clock, before the other VM's node started
            let (fenced, took) = (
                seen.fenced_at
                    .expect("the isolated hot never stopped its node"),
                seen.took_over_at.expect("the cold VM never took over"),
            );
            assert!(
                fenced <= took,
                "the cold VM's node ran at {took:?}, before the hot fenced at {fenced:?}"
            );
            assert!(
                took <= Duration::from_millis(WAIT_MS + 2000) + SAMPLE,
                "the takeover took {took:?}"
            );
        }
        Held::Net(NetFault::Cap, _) => {
            // the cap was real: the hot sent no faster than it allows (plus one burst)
            let rate = wire as f64 / held_for.as_secs_f64();
            assert!(
                rate <= CAP_BYTES_PER_S as f64 * 1.1,
                "{:.1} MB/s went through a 15 MB/s cap",
                rate / 1e6
            );
            eprintln!(
                "issue16 cap: {:.1} MB/s on the wire during the cap",
                rate / 1e6
            );
            assert!(
                seen.took_over_at.is_none(),
                "a capped link failed the pair over"
            );
        }
        _ => {
            // faults between the VMs only: the hot keeps the lease and its node
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
        }
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
        "reconnects",
        "resent batches",
        "records synced",
        "records lost",
        "one node",
    ])
}

fn run_network(test: &str, scale: u32) {
    let Some(dr) = Drill::start(
        test,
        &DrillOpts {
            proxied: false,
            tmpfs_mib: None,
            seed_mib: 32,
            bulk_every: 10,
        },
    ) else {
        return;
    };
    let mut t = table();
    for held in faults(scale) {
        drill(&dr, held, &mut t);
    }
    let hot = dr.hot().unwrap();
    artemis_sync(&dr.d.p.config_of(hot), ["verify"]).code(0);
    eprintln!("\n{test} (scale {scale}):\n{}", t.render());
}

fn run_delay(test: &str, scale: u32) {
    let Some(dr) = Drill::start(
        test,
        &DrillOpts {
            proxied: true,
            tmpfs_mib: None,
            seed_mib: 8,
            bulk_every: 10,
        },
    ) else {
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
