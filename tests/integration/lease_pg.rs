//! Issue 13: the lease as a row in a real PostgreSQL database (a throwaway cluster started by
//! the test, `pg.rs`), shared mode: two real agents on one premounted share, each
//! supervising a node script that logs its start and stop. Faults are provoked for real:
//! kill -9 of the hot agent, SIGSTOP of the hot agent and its node then SIGCONT, the database
//! stopped and restarted within the wait interval, the database down for longer. Measured
//! figures go to stderr (`-- --nocapture`).

use std::thread;
use std::time::{Duration, Instant};

use crate::agent::{alive, assert_one_at_a_time, kill, pid_t, wait_until, with_fake_unit, Pair};
use crate::pg::{CutProxy, PgCluster, PG_PASSWORD};
use crate::util::{artemis_sync, toml_path};

/// Renewal period of the test agents.
const UPDATE_MS: u64 = 500;
/// Takeover delay of the test agents (room for a database restart inside it).
const WAIT_MS: u64 = 4000;
/// What the agents keep between their node being down and a takeover: a tenth of the wait.
const MARGIN_MS: u64 = WAIT_MS / 10;
/// SIGTERM-to-SIGKILL time of the test nodes (the Pair's).
const STOP_MS: u64 = 300;
/// Scheduling slack on a loaded 2-core machine.
const SLACK_MS: u64 = 1000;

/// The database, and two agents whose `[lease]` names it; the table is created unless `init`
/// is false.
fn pair_on(test: &str, init: bool) -> Option<(PgCluster, Pair)> {
    let pg = PgCluster::start(test)?;
    let port = pg.port;
    Some((pg, pair_via(&same_port(port), init)))
}

/// The port each agent reaches the database on, by agent name.
fn same_port(port: u16) -> impl Fn(&str) -> u16 {
    move |_| port
}

/// Two agents whose `[lease]` reaches the database on the port `port_of(agent)` gives.
fn pair_via(port_of: &dyn Fn(&str) -> u16, init: bool) -> Pair {
    let p = Pair::with(UPDATE_MS, WAIT_MS, |fx, name| {
        let dsn = fx.path(&format!("{name}.dsn"));
        PgCluster::write_dsn_on(&dsn, port_of(name));
        format!(
            "\n[lease]\nbackend = \"postgres\"\ndsn_file = {}\npair = \"corda-test\"\n",
            toml_path(&dsn)
        )
    });
    if init {
        artemis_sync(&p.config("a"), ["lease", "init"])
            .code(0)
            .stdout_has(&["artemis_sync_lease", "ready", "password=***"])
            .nowhere(PG_PASSWORD);
    }
    p
}

/// Starts `a`, waits for it to be hot, starts `b`, waits for it to be cold; returns a's pid
/// and its node's pid.
fn a_hot_b_cold(p: &mut Pair) -> (u32, u32) {
    let a = p.start("a");
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 3), || p.role("a") == "hot"),
        "{}",
        p.stderr_of()
    );
    p.start("b");
    assert!(wait_until(Duration::from_secs(10), || p.role("b") == "cold"));
    let node = p.status("a")["node_pid"].as_u64().expect("a runs its node");
    (a, u32::try_from(node).expect("a pid"))
}

fn epoch(p: &Pair, name: &str) -> Option<u64> {
    p.status(name)["epoch"].as_u64()
}

#[test]
fn issue13_lease_init_is_idempotent_and_a_missing_table_names_the_fix() {
    let Some((_pg, mut p)) = pair_on("issue13_lease_init", false) else {
        return;
    };
    p.start("a");
    let says_init = || {
        p.status("a")["error"]
            .as_str()
            .is_some_and(|e| e.contains("artemis-sync lease init"))
    };
    assert!(
        wait_until(Duration::from_secs(10), says_init),
        "{}",
        p.stderr_of()
    );
    assert_eq!(p.role("a"), "cold");
    for _ in 0..2 {
        artemis_sync(&p.config("b"), ["lease", "init"])
            .code(0)
            .stdout_has(&["ready"])
            .nowhere(PG_PASSWORD);
    }
    // a missing row: taken after wait_interval_ms of seeing it missing, at epoch 1
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 3), || p.role("a") == "hot"),
        "{}",
        p.stderr_of()
    );
    assert_eq!(epoch(&p, "a"), Some(1));
    let log = p.stderr_of();
    assert!(
        !log.contains(PG_PASSWORD),
        "the password is in a log:\n{log}"
    );
}

#[test]
fn issue13_kill9_of_the_hot_agent_the_cold_takes_the_database_lease_after_wait_interval() {
    let Some((_pg, mut p)) = pair_on("issue13_kill9", true) else {
        return;
    };
    let (a, node) = a_hot_b_cold(&mut p);
    assert_eq!(epoch(&p, "a"), Some(1));
    let killed = Instant::now();
    p.signal(a, libc::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(2), || !alive(node)),
        "node {node} survived the agent's kill -9"
    );
    // (killed with its agent, the node logs no stop; it was gone before b started)
    assert!(
        !p.events().iter().any(|e| e.name == "b"),
        "b started while a's node ran"
    );
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 3), || p
            .events()
            .iter()
            .any(|e| e.start && e.name == "b")),
        "b never ran the node\n{}",
        p.stderr_of()
    );
    let took = killed.elapsed();
    eprintln!(
        "issue13 kill -9 (postgres lease): b's node started {took:?} after the kill \
         (wait_interval {WAIT_MS} ms, update_interval {UPDATE_MS} ms)"
    );
    // the last renewal was at most one update before the kill, and the database says when
    assert!(
        took >= Duration::from_millis(WAIT_MS - UPDATE_MS),
        "took over too early: {took:?}"
    );
    assert!(
        took <= Duration::from_millis(WAIT_MS + 2 * UPDATE_MS + SLACK_MS),
        "took over too late: {took:?}\n{}",
        p.stderr_of()
    );
    assert_eq!(p.role("b"), "hot");
    assert_eq!(epoch(&p, "b"), Some(2));
}

#[test]
fn issue13_a_frozen_hot_is_replaced_and_on_waking_sees_the_newer_epoch_and_stays_down() {
    let Some((_pg, mut p)) = pair_on("issue13_sigstop", true) else {
        return;
    };
    let (a, node) = a_hot_b_cold(&mut p);
    kill(pid_t(a), libc::SIGSTOP);
    kill(-pid_t(node), libc::SIGSTOP);
    let frozen = Instant::now();
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 3), || p.role("b") == "hot"),
        "{}",
        p.stderr_of()
    );
    let took = frozen.elapsed();
    assert!(
        took >= Duration::from_millis(WAIT_MS - UPDATE_MS),
        "b took over {took:?} after the freeze"
    );
    assert_eq!(epoch(&p, "b"), Some(2));

    kill(-pid_t(node), libc::SIGCONT);
    kill(pid_t(a), libc::SIGCONT);
    let woke = Instant::now();
    assert!(
        wait_until(Duration::from_millis(STOP_MS + SLACK_MS), || !alive(node)),
        "the old hot did not fence its node\n{}",
        p.stderr_of()
    );
    let fenced = woke.elapsed();
    eprintln!(
        "issue13 SIGSTOP (postgres lease): b took over {took:?} after the freeze \
         (wait_interval {WAIT_MS} ms); a's node gone {fenced:?} after SIGCONT"
    );
    // a stays down: over more than a wait interval b keeps the lease and a never starts again
    thread::sleep(Duration::from_millis(WAIT_MS + 2 * UPDATE_MS));
    assert_ne!(p.role("a"), "hot");
    assert_eq!(p.role("b"), "hot");
    assert_eq!(epoch(&p, "b"), Some(2));
    let starts_a = p
        .events()
        .iter()
        .filter(|e| e.start && e.name == "a")
        .count();
    assert_eq!(starts_a, 1, "{:#?}", p.events());
    assert!(p.stderr_of().contains("FENCING"));
}

#[test]
fn issue13_a_database_restart_shorter_than_the_wait_interval_fails_nobody_over() {
    let Some((pg, mut p)) = pair_on("issue13_db_restart", true) else {
        return;
    };
    let (_a, node) = a_hot_b_cold(&mut p);
    let down = Instant::now();
    pg.stop();
    thread::sleep(Duration::from_millis(WAIT_MS / 4));
    pg.restart();
    let outage = down.elapsed();
    assert!(
        outage < Duration::from_millis(WAIT_MS - MARGIN_MS - STOP_MS),
        "the restart took {outage:?}: too slow a machine for this test's wait interval"
    );
    // renewals resume: the lease age drops back below one update interval
    let resumed = wait_until(Duration::from_millis(WAIT_MS), || {
        p.status("a")["last_renewal_age_ms"]
            .as_u64()
            .is_some_and(|ms| ms < UPDATE_MS * 2)
    });
    let back = down.elapsed();
    assert!(resumed, "renewals did not resume\n{}", p.stderr_of());
    eprintln!("issue13 database restart (postgres lease): down for {outage:?}, renewing again {back:?} after the stop; no failover");
    thread::sleep(Duration::from_millis(WAIT_MS + UPDATE_MS));
    assert_eq!(p.role("a"), "hot", "{}", p.stderr_of());
    assert_eq!(p.role("b"), "cold");
    assert_eq!(epoch(&p, "a"), Some(1));
    assert!(alive(node), "a's node was stopped");
    let events = p.events();
    assert_eq!(events.len(), 1, "one start, no stop: {events:#?}");
}

#[test]
fn issue13_a_database_down_longer_than_the_wait_interval_fences_the_holder_on_time() {
    let Some((pg, mut p)) = pair_on("issue13_db_down", true) else {
        return;
    };
    let (_a, node) = a_hot_b_cold(&mut p);
    let down = Instant::now();
    pg.stop();
    assert!(
        wait_until(Duration::from_millis(WAIT_MS + SLACK_MS), || !alive(node)),
        "a did not fence its node\n{}",
        p.stderr_of()
    );
    let fenced = down.elapsed();
    // the deadline is the start of the last good renewal (at most one update before the
    // stop) + wait − stop − margin
    let deadline = WAIT_MS - STOP_MS - MARGIN_MS;
    eprintln!(
        "issue13 database down (postgres lease): a's node gone {fenced:?} after the database \
         stopped (deadline {deadline} ms after the last renewal; wait_interval {WAIT_MS} ms)"
    );
    assert!(
        fenced >= Duration::from_millis(deadline - UPDATE_MS),
        "fenced early: {fenced:?}"
    );
    assert!(
        fenced <= Duration::from_millis(deadline + STOP_MS + 200),
        "fenced late: {fenced:?}"
    );
    assert_ne!(p.role("a"), "hot");
    pg.restart();
    // someone takes over at epoch 2, and never while a's node ran
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 4), || p.role("a") == "hot"
            || p.role("b") == "hot"),
        "nobody took over after the database came back\n{}",
        p.stderr_of()
    );
    let hot = if p.role("a") == "hot" { "a" } else { "b" };
    assert_eq!(epoch(&p, hot), Some(2));
    assert!(wait_until(Duration::from_secs(3), || p.events().len() >= 3));
    assert_one_at_a_time(&p.events());
}

#[test]
fn issue13_the_hot_cut_from_the_database_fences_on_time_and_the_cold_takes_over() {
    let Some(pg) = PgCluster::start("issue13_hot_cut_from_db") else {
        return;
    };
    let proxy = CutProxy::start(pg.port);
    let (via, direct) = (proxy.port, pg.port);
    // a reaches the database through the proxy, b directly
    let mut p = pair_via(&move |name| if name == "a" { via } else { direct }, true);
    let (_a, node) = a_hot_b_cold(&mut p);
    let cut = Instant::now();
    proxy.set_cut(true);
    assert!(
        wait_until(Duration::from_millis(WAIT_MS + SLACK_MS), || !alive(node)),
        "a did not fence its node\n{}",
        p.stderr_of()
    );
    let fenced = cut.elapsed();
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 3), || p.role("b") == "hot"),
        "b did not take over\n{}",
        p.stderr_of()
    );
    let took = cut.elapsed();
    eprintln!(
        "issue13 hot cut from the database (postgres lease): a's node gone {fenced:?} after \
         the cut, b hot {took:?} after it (wait_interval {WAIT_MS} ms)"
    );
    let deadline = WAIT_MS - STOP_MS - MARGIN_MS;
    assert!(
        fenced <= Duration::from_millis(deadline + STOP_MS + 200),
        "fenced late: {fenced:?}"
    );
    assert!(
        took >= Duration::from_millis(WAIT_MS - UPDATE_MS),
        "took over early: {took:?}"
    );
    assert_eq!(epoch(&p, "b"), Some(2));
    // the path comes back: a sees epoch 2 held by b and stays cold
    proxy.set_cut(false);
    thread::sleep(Duration::from_millis(WAIT_MS + 2 * UPDATE_MS));
    assert_ne!(p.role("a"), "hot");
    assert_eq!(p.role("b"), "hot");
    assert!(wait_until(Duration::from_secs(3), || p.events().len() >= 3));
    assert_one_at_a_time(&p.events());
}

#[test]
fn issue13_tls_verify_full_takes_the_lease_and_a_wrong_server_name_is_refused() {
    let Some((pg, ca)) = PgCluster::start_tls("issue13_tls") else {
        return;
    };
    let port = pg.port;
    let ca = toml_path(&ca);
    let ca = ca.trim_matches('"').to_owned();
    let mut p = Pair::with(UPDATE_MS, WAIT_MS, |fx, name| {
        let dsn = fx.path(&format!("{name}.dsn"));
        // a names the server as its certificate does; b by a name the certificate lacks
        let host = if name == "a" {
            "127.0.0.1"
        } else {
            "localhost"
        };
        PgCluster::write_dsn_with(
            &dsn,
            &format!("host={host} port={port} sslmode=verify-full sslrootcert={ca}"),
        );
        format!(
            "\n[lease]\nbackend = \"postgres\"\ndsn_file = {}\npair = \"corda-test\"\n",
            toml_path(&dsn)
        )
    });
    artemis_sync(&p.config("a"), ["lease", "init"])
        .code(0)
        .stdout_has(&["ready", "sslmode=verify-full"])
        .nowhere(PG_PASSWORD);
    let out = artemis_sync(&p.config("b"), ["lease", "init"]);
    out.failed().nowhere(PG_PASSWORD);
    assert!(
        out.stderr.to_lowercase().contains("certificate"),
        "a wrong server name is refused for its certificate:\n{out}"
    );
    p.start("a");
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 3), || p.role("a") == "hot"),
        "{}",
        p.stderr_of()
    );
    // the server logged the agent's sessions as encrypted
    assert!(pg.log().contains("SSL enabled"), "{}", pg.log());
    p.start("b");
    assert!(
        wait_until(Duration::from_secs(10), || {
            p.status("b")["error"]
                .as_str()
                .is_some_and(|e| e.contains("certificate"))
        }),
        "{}",
        p.stderr_of()
    );
    assert_eq!(p.role("b"), "cold");
}

#[test]
fn issue13_alternating_kill9_and_release_failovers_one_node_at_a_time_with_consecutive_epochs() {
    /// Faster intervals than the other tests: no database restart has to fit in the wait.
    const FAST_UPDATE_MS: u64 = 300;
    const FAST_WAIT_MS: u64 = 1500;
    const CYCLES: usize = 10;
    let Some(pg) = PgCluster::start("issue13_cycles") else {
        return;
    };
    let port = pg.port;
    let mut p = Pair::with(FAST_UPDATE_MS, FAST_WAIT_MS, |fx, name| {
        let dsn = fx.path(&format!("{name}.dsn"));
        PgCluster::write_dsn_on(&dsn, port);
        format!(
            "\n[lease]\nbackend = \"postgres\"\ndsn_file = {}\npair = \"corda-cycles\"\n",
            toml_path(&dsn)
        )
    });
    artemis_sync(&p.config("a"), ["lease", "init"]).code(0);
    let mut pids = [p.start("a"), 0];
    let limit = Duration::from_millis(FAST_WAIT_MS * 4);
    assert!(
        wait_until(limit, || p.role("a") == "hot"),
        "{}",
        p.stderr_of()
    );
    pids[1] = p.start("b");
    let mut handovers = Vec::new();
    for cycle in 0..CYCLES {
        let (hot, cold) = if cycle % 2 == 0 { (0, 1) } else { (1, 0) };
        let names = ["a", "b"];
        assert!(
            wait_until(limit, || p.role(names[cold]) == "cold"),
            "cycle {cycle}"
        );
        let old_node =
            u32::try_from(p.status(names[hot])["node_pid"].as_u64().expect("node")).expect("a pid");
        let new_epoch = u64::try_from(cycle).unwrap() + 2;
        let t = Instant::now();
        if cycle % 4 == 3 {
            // a planned hand-over: no wait
            artemis_sync(&p.config(names[hot]), ["release"]).code(0);
        } else {
            p.signal(pids[hot], libc::SIGKILL);
        }
        // the old node is gone before the new one starts
        assert!(
            wait_until(limit, || !alive(old_node)),
            "cycle {cycle}: old node lives"
        );
        assert!(
            !p.events().iter().any(|e| e.epoch == Some(new_epoch)),
            "cycle {cycle}: the new node started while the old one ran"
        );
        assert!(
            wait_until(limit, || p.role(names[cold]) == "hot"),
            "cycle {cycle}: no takeover\n{}",
            p.stderr_of()
        );
        handovers.push((cycle % 4 == 3, t.elapsed()));
        assert_eq!(
            epoch(&p, names[cold]),
            Some(u64::try_from(cycle).unwrap() + 2)
        );
        // the new node has run (written its line) before the next cycle kills its agent
        assert!(
            wait_until(limit, || p
                .events()
                .iter()
                .any(|e| e.epoch == Some(new_epoch))),
            "cycle {cycle}: no node started at epoch {new_epoch}\n{}",
            p.stderr_of()
        );
        if cycle % 4 != 3 {
            pids[hot] = p.start(names[hot]);
        }
    }
    eprintln!("issue13 cycles (postgres lease, update {FAST_UPDATE_MS} ms, wait {FAST_WAIT_MS} ms): (release?, hand-over) {handovers:?}");
    for (released, took) in &handovers {
        if *released {
            assert!(
                *took < Duration::from_millis(FAST_WAIT_MS),
                "release took {took:?}"
            );
        } else {
            assert!(
                *took >= Duration::from_millis(FAST_WAIT_MS - FAST_UPDATE_MS),
                "{took:?}"
            );
        }
    }
    let epochs: Vec<u64> = p.events().iter().filter_map(|e| e.epoch).collect();
    assert_eq!(
        epochs,
        (1..=u64::try_from(CYCLES).unwrap() + 1).collect::<Vec<_>>()
    );
}

/// A store of the database lease for holder `name`, through the library (the statements
/// themselves, without an agent's own rules on top).
fn store(fx: &crate::util::Fixture, port: u16, name: &str) -> artemis_sync::lease::pg::PgStore {
    let dsn = fx.path(&format!("{name}.dsn"));
    PgCluster::write_dsn_on(&dsn, port);
    // stop_timeout_ms must fit the short wait interval
    let text = format!(
        "{}machine_name = \"{name}\"\nupdate_interval_ms = {FAST_UPDATE_MS}\n\
         wait_interval_ms = {FAST_WAIT_MS}\n\n[lease]\nbackend = \"postgres\"\n\
         dsn_file = {}\npair = \"statements\"\n",
        crate::util::premounted_config(&fx.mkdir(name), &fx.mkdir("share")),
        toml_path(&dsn)
    )
    .replacen("[node]\n", "[node]\nstop_timeout_ms = 100\n", 1);
    let config = artemis_sync::config::Config::from_toml(&fx.path("x.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    artemis_sync::lease::pg::PgStore::open(&config).unwrap()
}

/// Renewal period of the statement test's holders.
const FAST_UPDATE_MS: u64 = 300;
/// Takeover delay of the statement test's holders.
const FAST_WAIT_MS: u64 = 1500;

#[test]
fn issue13_each_lease_statement_is_conditional_and_judged_by_the_database_clock() {
    use artemis_sync::lease::{Lease, LeaseState, LeaseStore, Obs, RenewFail};
    let Some(pg) = PgCluster::start("issue13_statements") else {
        return;
    };
    let fx = crate::util::Fixture::new();
    let (mut a, mut b) = (store(&fx, pg.port, "a"), store(&fx, pg.port, "b"));
    a.init_table().unwrap();
    let lease = |holder: &str, epoch, renewals| Lease {
        renewals,
        ..Lease::new(holder, epoch, FAST_UPDATE_MS, FAST_WAIT_MS)
    };
    let settle = Duration::ZERO;
    // a missing row is inserted once
    assert!(a
        .take_over(&Obs::Missing, &lease("a", 1, 0), settle)
        .is_ok());
    assert!(matches!(
        b.take_over(&Obs::Missing, &lease("b", 1, 0), settle),
        Err((false, _))
    ));
    let (_, seen) = b.observe(false);
    assert_eq!(seen, Obs::Lease(lease("a", 1, 0)));
    // fresh by the database's clock: refused whatever b believes
    let refused = b.take_over(&seen, &lease("b", 2, 0), settle).unwrap_err();
    assert!(!refused.0 && refused.1.contains("refused"), "{refused:?}");
    // renew: ours and our count, and a retry of the same renewal (its answer lost) is fine
    assert!(a.renew(&lease("a", 1, 0), &lease("a", 1, 1)).is_ok());
    assert!(a.renew(&lease("a", 1, 0), &lease("a", 1, 1)).is_ok());
    assert!(matches!(
        a.renew(&lease("a", 1, 5), &lease("a", 1, 6)),
        Err(RenewFail::Lost(_))
    ));
    // stale by the database's clock: b takes it, with a higher epoch only
    let (_, seen) = b.observe(false);
    thread::sleep(Duration::from_millis(FAST_WAIT_MS + 100));
    assert!(matches!(
        b.take_over(&seen, &lease("b", 1, 0), settle),
        Err((false, _))
    ));
    assert!(b.take_over(&seen, &lease("b", 2, 0), settle).is_ok());
    match a.renew(&lease("a", 1, 1), &lease("a", 1, 2)) {
        Err(RenewFail::Lost(why)) => {
            assert!(why.contains("names b") && why.contains("epoch 2"), "{why}")
        }
        other => panic!("a renewed a lease b holds: {other:?}"),
    }
    // release: only by the holder; then taken at once
    assert!(a.release(&lease("a", 1, 1)).is_err());
    assert!(b.release(&lease("b", 2, 0)).is_ok());
    let (_, seen) = a.observe(false);
    let Obs::Lease(l) = &seen else {
        panic!("{seen:?}")
    };
    assert_eq!((l.state, l.epoch), (LeaseState::Released, 2));
    assert!(a.take_over(&seen, &lease("a", 3, 0), settle).is_ok());
    assert_eq!(b.observe(false).1, Obs::Lease(lease("a", 3, 0)));
    // replicated mode's witness: only the holder reports the cold copy's lag, and a takeover
    // judged on "in sync" is refused once the holder has reported "behind" since
    assert!(b.report_cold_lag("b", 3, Some(0)).is_err());
    a.report_cold_lag("a", 3, Some(0)).unwrap();
    let (_, in_sync) = b.observe(false);
    let Obs::Lease(l) = &in_sync else {
        panic!("{in_sync:?}")
    };
    assert_eq!(l.cold_lag_ms, Some(0));
    a.report_cold_lag("a", 3, None).unwrap();
    thread::sleep(Duration::from_millis(FAST_WAIT_MS + 100));
    let refused = b
        .take_over(&in_sync, &lease("b", 4, 0), settle)
        .unwrap_err();
    assert!(!refused.0 && refused.1.contains("refused"), "{refused:?}");
    let (_, behind) = b.observe(false);
    assert!(b.take_over(&behind, &lease("b", 4, 0), settle).is_ok());
    // a renewal written although its answer was lost: b still believes renewal 0, the row
    // says 1; releasing from 0 releases it (the other VM takes over at once), from 3 not
    assert!(b.renew(&lease("b", 4, 0), &lease("b", 4, 1)).is_ok());
    assert!(b.release(&lease("b", 4, 3)).is_err());
    assert!(b.release(&lease("b", 4, 0)).is_ok());
    let (_, seen) = a.observe(false);
    let Obs::Lease(l) = &seen else {
        panic!("{seen:?}")
    };
    assert_eq!((l.state, l.epoch, l.renewals), (LeaseState::Released, 4, 2));
    assert!(a.take_over(&seen, &lease("a", 5, 0), settle).is_ok());
}

/// The database and two agents on it (renewal 500 ms, wait 2500 ms, `stop_timeout_ms` 1200:
/// a's fence deadline is 1050 ms after a renewal, its limit on a start 3600 ms), a running
/// its node as a unit through a fake `systemctl` whose `start` case is `start` (`{active}`
/// and `{started}` in it name marker files in the fixture: the unit is active while the
/// first exists), with the `[node]` lines `more`. `None` without PostgreSQL.
fn slow_unit_pair(test: &str, start: &str, more: &str) -> Option<(PgCluster, Pair)> {
    let pg = PgCluster::start(test)?;
    let port = pg.port;
    let mut p = Pair::with(500, 2500, |fx, name| {
        let dsn = fx.path(&format!("{name}.dsn"));
        PgCluster::write_dsn_on(&dsn, port);
        format!(
            "\n[lease]\nbackend = \"postgres\"\ndsn_file = {}\npair = \"corda-test\"\n",
            toml_path(&dsn)
        )
    });
    artemis_sync(&p.config("a"), ["lease", "init"]).code(0);
    let active = p.fx.path("corda.active").display().to_string();
    let started = p.fx.path("corda.started").display().to_string();
    let start = start
        .replace("{active}", &active)
        .replace("{started}", &started);
    with_fake_unit(
        &mut p,
        "a",
        &format!(
            "case \"$1\" in\n  {start}\n  stop|kill) rm -f {active} ;;\n  is-active) if [ -e \
             {active} ]; then echo active; else echo inactive; exit 3; fi ;;\nesac"
        ),
        more,
    );
    let cfg = p.config("a");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            &format!("stop_timeout_ms = {STOP_MS}"),
            "stop_timeout_ms = 1200",
        ),
    )
    .unwrap();
    Some((pg, p))
}

/// A unit whose `systemctl start` blocks while its processes already run (`Type=notify`, a
/// JVM slow to say it is ready) for less than the agent's limit on a start (3 x
/// `stop_timeout_ms`) but past the lease's fence deadline: the main thread, blocked in it,
/// neither renewed nor fenced, and the other VM took the lease over while the unit ran.
#[test]
fn issue10_a_unit_slow_to_start_is_stopped_by_the_fence_deadline() {
    let Some((_pg, mut p)) = slow_unit_pair(
        "issue10_slow_unit",
        "start) touch {active}; sleep 3.4 ;;",
        "max_local_restarts = 0",
    ) else {
        return;
    };
    let active = p.fx.path("corda.active");
    p.start("a");
    assert!(
        wait_until(Duration::from_secs(10), || active.exists()),
        "{}",
        p.stderr_of()
    );
    // b sees a's row from now on: it may take it over 2500 ms after, a's start still blocking
    p.start("b");
    let b_hot = wait_until(Duration::from_secs(8), || p.role("b") == "hot");
    let a_unit_active = active.exists();
    assert!(b_hot, "{}", p.stderr_of());
    assert!(
        !a_unit_active,
        "b took over while a's unit, still starting, ran:\n{}",
        p.stderr_of()
    );
}

/// As above, for the watchdog's local restart of a unit that stopped: that start blocked the
/// main thread as long, unbounded by the fence deadline.
#[test]
fn issue10_a_unit_slow_to_restart_is_stopped_by_the_fence_deadline() {
    // the first start is quick and the unit stops a second later; the restart hangs 3.4 s
    let Some((_pg, mut p)) = slow_unit_pair(
        "issue10_slow_restart",
        "start) if [ -e {started} ]; then touch {active}; sleep 3.4; else touch {started} \
         {active}; (sleep 1; rm -f {active}) >/dev/null 2>&1 & fi ;;",
        "max_local_restarts = 1\nrestart_backoff_ms = 100",
    ) else {
        return;
    };
    let (active, started) = (p.fx.path("corda.active"), p.fx.path("corda.started"));
    p.start("a");
    assert!(
        wait_until(Duration::from_secs(10), || started.exists()),
        "{}",
        p.stderr_of()
    );
    p.start("b");
    // the restart begins once a sees its unit stopped (within a second of the stop)
    assert!(
        wait_until(Duration::from_secs(10), || {
            p.stderr_of()
                .contains("restarting the node after the back-off")
        }),
        "{}",
        p.stderr_of()
    );
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline && p.role("b") != "hot" {
        assert!(
            !(active.exists() && p.role("b") == "hot"),
            "b took over while a's unit, restarting, ran:\n{}",
            p.stderr_of()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let a_unit_active = active.exists();
    assert_eq!(p.role("b"), "hot", "{}", p.stderr_of());
    assert!(
        !a_unit_active,
        "b took over while a's unit, restarting, ran:\n{}",
        p.stderr_of()
    );
}
