//! Issue 14: the node health watchdog with real agents, real nodes and real probes on
//! loopback. The node of the probe tests is this test binary itself, run as an HTTP server
//! (`issue14_http_node`, an ignored test that serves only when `ISSUE14_HTTP_NODE_PORT` is set),
//! so SIGSTOP makes it stop answering while its port still accepts connections. Measured
//! figures go to stderr (`--nocapture`).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use crate::agent::{alive, kill, pid_t, wait_until, Pair};
use crate::util::{artemis_sync, toml_path, Fixture};

/// Renewal period of the test agents.
const UPDATE_MS: u64 = 300;
/// Takeover delay of the test agents.
const WAIT_MS: u64 = 1500;
/// How often the probes run.
const INTERVAL_MS: u64 = 200;
/// Failed rounds that make the node unhealthy.
const FAILURES: u64 = 2;
/// SIGTERM-to-SIGKILL time of the test nodes (the agent module's).
const STOP_MS: u64 = 300;
/// The environment variable that makes `issue14_http_node` serve, on this port.
const PORT_ENV: &str = "ISSUE14_HTTP_NODE_PORT";

/// Not a test: the node process of the probe tests (see the module doc).
#[test]
#[ignore = "the HTTP node of the issue14 tests; serves only with ISSUE14_HTTP_NODE_PORT set"]
fn issue14_http_node() {
    let Some(port) = std::env::var(PORT_ENV).ok() else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let listener = loop {
        match TcpListener::bind(format!("127.0.0.1:{port}")) {
            Ok(l) => break l,
            Err(e) if Instant::now() < deadline => {
                eprintln!("http node: bind {port}: {e}; retrying");
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("http node: bind {port}: {e}"),
        }
    };
    for mut conn in listener.incoming().flatten() {
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf);
        let _ =
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
    }
}

/// A free loopback port (bound and released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `[node]` keys running this binary as the HTTP node, probed over HTTP on `port`.
fn http_node_keys(port: u16, more: &str) -> String {
    let exe = std::env::current_exe().unwrap();
    format!(
        "command = [{}, \"--exact\", \"watchdog::issue14_http_node\", \"--ignored\", \"--test-threads=1\"]\n\
         probe_http = [\"http://127.0.0.1:{port}/health\"]\n\
         probe_interval_ms = {INTERVAL_MS}\nprobe_timeout_ms = 150\nprobe_failures = {FAILURES}\n\
         probe_grace_ms = 3000\n{more}",
        toml_path(&exe)
    )
}

fn node_pid(p: &Pair, name: &str) -> Option<u32> {
    p.status(name)["node_pid"]
        .as_u64()
        .map(|v| u32::try_from(v).unwrap())
}

fn health(p: &Pair, name: &str) -> serde_json::Value {
    p.status(name)["node_health"].clone()
}

/// Waits until `name` runs a node other than `old` that answers its probe; returns its pid.
fn new_healthy_node(p: &Pair, name: &str, old: Option<u32>, limit: Duration) -> Option<u32> {
    let mut pid = None;
    wait_until(limit, || {
        let st = p.status(name);
        pid = st["node_pid"].as_u64().map(|v| u32::try_from(v).unwrap());
        pid.is_some() && pid != old && st["node_health"]["state"] == "healthy"
    })
    .then_some(pid)
    .flatten()
}

#[test]
fn issue14_a_sigstopped_node_is_restarted_locally_with_a_growing_back_off() {
    let port = free_port();
    let mut p = Pair::with_node(
        UPDATE_MS,
        WAIT_MS,
        |_, _| {
            http_node_keys(
                port,
                "restart_backoff_ms = 300\nrestart_backoff_max_ms = 1200\nmax_local_restarts = 5\n",
            )
        },
        |_, _| String::new(),
    );
    p.set_env(PORT_ENV, &port.to_string());
    p.start("a");
    let mut pid = new_healthy_node(&p, "a", None, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no healthy node\n{}", p.stderr_of()));
    // detection: FAILURES rounds; the stop: SIGTERM, which a continued node obeys at once
    let limit = Duration::from_millis(FAILURES * INTERVAL_MS + STOP_MS);
    let mut gaps = Vec::new();
    for round in 1..=3u64 {
        let stopped = Instant::now();
        kill(pid_t(pid), libc::SIGSTOP);
        // the node is down (stopped by the watchdog), then a new one runs
        assert!(
            wait_until(limit + Duration::from_secs(2), || !alive(pid)),
            "round {round}: node {pid} still alive\n{}",
            p.stderr_of()
        );
        let down = Instant::now();
        let detected = down - stopped;
        let new = new_healthy_node(&p, "a", Some(pid), Duration::from_secs(10))
            .unwrap_or_else(|| panic!("round {round}: no new node\n{}", p.stderr_of()));
        let gap = down.elapsed();
        eprintln!("issue14 round {round}: node {pid} stopped {detected:?} after SIGSTOP (limit {limit:?}); new node {new} healthy {gap:?} later");
        assert!(
            detected <= limit + Duration::from_millis(3000),
            "round {round}: detection took {detected:?}, limit {limit:?}"
        );
        gaps.push(gap);
        let h = health(&p, "a");
        assert_eq!(h["restarts_total"], round, "{h}");
        assert_eq!(h["restarts_in_window"], round, "{h}");
        assert!(
            h["probe_failures_total"].as_u64().unwrap() >= FAILURES * round,
            "{h}"
        );
        pid = new;
    }
    // back-off 300, 600, 1200 ms (plus the node's start and first probe): each gap at least
    // its back-off (less the test's polling), so the back-off grew; an upper bound would only
    // measure the machine's load
    let poll = Duration::from_millis(50);
    assert!(
        gaps[0] + poll >= Duration::from_millis(300)
            && gaps[1] + poll >= Duration::from_millis(600)
            && gaps[2] + poll >= Duration::from_millis(1200),
        "the back-off did not grow: {gaps:?}"
    );
    assert_eq!(p.role("a"), "hot");
    let log = p.stderr_of();
    assert!(
        log.contains("consecutive probe failures") && log.contains("backoff_ms"),
        "{log}"
    );
    let text = artemis_sync(&p.config("a"), ["status"]);
    text.code(0)
        .stdout_has(&["node_health", "healthy", "3 restarts (3 in window)"]);
}

#[test]
fn issue14_a_node_that_exits_is_restarted_locally() {
    let mut p = Pair::with_node(
        UPDATE_MS,
        WAIT_MS,
        |fx, _| {
            // the first start exits with 3; the next ones run
            let mark = fx.path("started-once");
            format!(
                "command = [\"/bin/sh\", \"-c\", \"if [ -e {m} ]; then exec sleep 600; fi; touch {m}; sleep 0.3; exit 3\"]\n\
                 restart_backoff_ms = 200\n",
                m = mark.display()
            )
        },
        |_, _| String::new(),
    );
    p.start("a");
    let mut first = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            first = first.or(node_pid(&p, "a"));
            health(&p, "a")["restarts_total"] == 1 && node_pid(&p, "a").is_some()
        }),
        "{}",
        p.stderr_of()
    );
    let second = node_pid(&p, "a");
    assert_ne!(first, second);
    let st = p.status("a");
    assert_eq!(st["role"], "hot", "{st}");
    // no probes: a running node is healthy
    assert_eq!(st["node_health"]["state"], "healthy", "{st}");
    let log = p.stderr_of();
    assert!(log.contains("the node exited with code 3"), "{log}");
    assert!(
        log.contains("restarting the node after the back-off"),
        "{log}"
    );
}

#[test]
fn issue14_after_max_local_restarts_the_other_vm_runs_the_node_and_this_one_stays_out() {
    let mut p = Pair::with_node(
        UPDATE_MS,
        WAIT_MS,
        |fx, name| {
            let sick = fx.path(&format!("sick-{name}"));
            format!(
                "probe_command = [\"/bin/sh\", \"-c\", \"! test -e {}\"]\n\
                 probe_interval_ms = {INTERVAL_MS}\nprobe_timeout_ms = 150\nprobe_failures = {FAILURES}\n\
                 probe_grace_ms = 0\nrestart_backoff_ms = 200\nmax_local_restarts = 1\n",
                sick.display()
            )
        },
        |_, _| String::new(),
    );
    p.start("a");
    assert!(
        wait_until(Duration::from_secs(10), || p.role("a") == "hot"),
        "{}",
        p.stderr_of()
    );
    p.start("b");
    assert!(wait_until(Duration::from_secs(5), || p.role("b") == "cold"));
    let first = node_pid(&p, "a").unwrap();
    let sick = p.fx.write("sick-a", "");
    let t = Instant::now();
    // one local restart, then the watchdog gives up and b takes over
    assert!(
        wait_until(Duration::from_secs(10), || p.role("b") == "hot"
            && node_pid(&p, "b").is_some()),
        "{}",
        p.stderr_of()
    );
    eprintln!(
        "issue14 give-up: b runs the node {:?} after a's node turned sick",
        t.elapsed()
    );
    let h = health(&p, "a");
    assert_eq!(h["state"], "gave_up", "{h}");
    assert_eq!(h["restarts_total"], 1, "{h}");
    assert!(
        h["gave_up"]["reason"]
            .as_str()
            .unwrap()
            .contains("max_local_restarts = 1"),
        "{h}"
    );
    assert!(h["gave_up"]["cooldown_left_ms"].is_null(), "{h}");
    assert!(!alive(first));
    assert!(node_pid(&p, "a").is_none());
    // a stays out, even when b goes away and the lease is free
    std::fs::remove_file(&sick).unwrap();
    let b = p.status("b")["node_pid"].as_u64().unwrap();
    let b_pid = p.agent_pid("b");
    p.signal(b_pid, libc::SIGTERM);
    assert!(!alive(u32::try_from(b).unwrap()));
    thread::sleep(Duration::from_millis(WAIT_MS * 2));
    assert_eq!(p.role("a"), "cold", "{}", p.stderr_of());
    assert!(node_pid(&p, "a").is_none());
    // until the operator resumes it
    artemis_sync(&p.config("a"), ["resume"])
        .code(0)
        .stdout_has(&["resumed", "max_local_restarts = 1"]);
    assert!(
        wait_until(Duration::from_secs(10), || p.role("a") == "hot"
            && node_pid(&p, "a").is_some()),
        "{}",
        p.stderr_of()
    );
    artemis_sync(&p.config("a"), ["resume"])
        .code(0)
        .stdout_has(&["nothing to resume"]);
}

#[test]
fn issue14_watchdog_config_errors_name_the_key() {
    let fx = Fixture::new();
    let base = fx.mkdir("base");
    let share = fx.mkdir("share");
    let cases = [
        (
            "probe_http = [\"https://127.0.0.1/health\"]",
            "node.probe_http",
        ),
        ("probe_tcp = [\"127.0.0.1\"]", "node.probe_tcp"),
        (
            "probe_interval_ms = 100\nprobe_timeout_ms = 200",
            "node.probe_timeout_ms",
        ),
        (
            "restart_backoff_ms = 2000\nrestart_backoff_max_ms = 1000",
            "node.restart_backoff_max_ms",
        ),
        ("probe_failures = 0", "node.probe_failures"),
        ("restart_window_ms = 0", "node.restart_window_ms"),
        ("probe_command = [\"\"]", "node.probe_command"),
        ("probe_everything = true", "probe_everything"),
    ];
    for (i, (keys, named)) in cases.iter().enumerate() {
        let path = fx.write(
            &format!("bad{i}.toml"),
            format!(
                "[node]\nbase_dir = {}\n{keys}\n\n[storage]\nbackend = \"premounted\"\nmount_point = {}\n\n[lock]\nallow_local_locks = true\n",
                toml_path(&base),
                toml_path(&share)
            ),
        );
        artemis_sync(&path, ["check-config"])
            .code(3)
            .stderr_has(&[named]);
    }
    let path = fx.write(
        "good.toml",
        format!(
            "[node]\nbase_dir = {}\nprobe_tcp = [\"localhost:10002\"]\n\n[storage]\nbackend = \"premounted\"\nmount_point = {}\n\n[lock]\nallow_local_locks = true\n",
            toml_path(&base),
            toml_path(&share)
        ),
    );
    artemis_sync(&path, ["check-config"]).code(0).stdout_has(&[
        "probe_interval_ms = 5000",
        "probe_timeout_ms = 2000",
        "probe_failures = 3",
        "probe_grace_ms = 60000",
        "restart_backoff_ms = 1000",
        "restart_backoff_max_ms = 60000",
        "max_local_restarts = 3",
        "restart_window_ms = 600000",
        "cooldown_ms = 0",
    ]);
}

#[test]
fn issue14_replicated_without_a_lease_keeps_restarting_at_the_longest_back_off_and_says_why() {
    let mut p = crate::replication::Pair::new("insecure", None);
    add_node_keys(
        &p.hot.config,
        "command = [\"/bin/sh\", \"-c\", \"sleep 0.2; exit 4\"]\nstop_timeout_ms = 300\n\
         max_local_restarts = 1\nrestart_backoff_ms = 100\nrestart_backoff_max_ms = 300\n",
    );
    p.start("cold");
    p.start("hot");
    let started = Instant::now();
    let restarts = |p: &crate::replication::Pair| {
        p.status("hot")["node_health"]["restarts_total"]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(
        crate::replication::wait_until(Duration::from_secs(15), || restarts(&p) >= 4),
        "{}",
        p.logs()
    );
    let took = started.elapsed();
    let st = p.status("hot");
    eprintln!(
        "issue14 replicated: 4 local restarts in {took:?}: {}",
        st["node_health"]
    );
    assert_eq!(st["role"], "hot", "{st}");
    let h = &st["node_health"];
    assert!(h["gave_up"].is_null(), "{h}");
    assert!(
        h["cannot_fail_over"]
            .as_str()
            .is_some_and(|w| w.contains("no other VM can take over")),
        "{h}"
    );
    assert_eq!(p.status("cold")["role"], "cold");
    let logs = p.logs();
    assert!(
        logs.contains("without a lease no other VM can take over"),
        "{logs}"
    );
    assert!(logs.contains("backoff_ms=300"), "{logs}");
}

#[test]
fn issue14_replicated_with_the_lease_hands_it_over_after_max_local_restarts_and_stays_out() {
    use crate::failover_pg::{Duo, WAIT_MS as PG_WAIT_MS};
    let Some(mut d) = Duo::direct("issue14_repl_watchdog") else {
        return;
    };
    for cfg in [&d.p.hot.config, &d.p.cold.config] {
        add_node_keys(cfg, "max_local_restarts = 1\nrestart_backoff_ms = 100\n");
    }
    let first = d.hot_then_cold();
    kill(pid_t(first), libc::SIGKILL);
    // the first exit: a local restart, still hot
    assert!(
        wait_until(Duration::from_secs(5), || d
            .node_pid("hot")
            .is_some_and(|p| p != first)),
        "{}",
        d.p.logs()
    );
    assert_eq!(d.role("hot"), "hot");
    assert_eq!(d.p.status("hot")["node_health"]["restarts_total"], 1);
    // the second: the watchdog gives up and hands the lease over
    let second = d.node_pid("hot").unwrap();
    let t = Instant::now();
    kill(pid_t(second), libc::SIGKILL);
    let took = d.wait_runs_node("cold", t);
    eprintln!("issue14 replicated lease: the cold VM ran the node {took:?} after the hot's second node crash");
    let st = d.p.status("hot");
    assert_eq!(st["role"], "cold", "{st}");
    assert_eq!(st["node_health"]["state"], "gave_up", "{st}");
    // it stays out: the new hot dies, its lease goes stale, the old hot does not take it
    d.p.kill9("cold");
    thread::sleep(Duration::from_millis(PG_WAIT_MS * 2 + 1000));
    let st = d.p.status("hot");
    assert!(d.node_pid("hot").is_none(), "{st}\n{}", d.p.logs());
    assert!(
        st["lease"]["not_taking_over"]
            .as_str()
            .is_some_and(|w| w.contains("watchdog gave up")),
        "{st}"
    );
    artemis_sync(&d.p.hot.config, ["resume"])
        .code(0)
        .stdout_has(&[
            "resumed",
            "the node killed by signal 9",
            "max_local_restarts = 1",
        ]);
    let st = d.p.status("hot");
    assert_ne!(st["node_health"]["state"], "gave_up", "{st}");
}

#[test]
fn issue14_a_give_up_with_the_cold_vm_gone_keeps_the_node_here() {
    // handing the lease over with no cold VM connected would leave the pair with no node:
    // the hot keeps its lease and restarts the node at the longest back-off instead
    use crate::failover_pg::Duo;
    let Some(mut d) = Duo::direct("issue14_repl_watchdog_alone") else {
        return;
    };
    for cfg in [&d.p.hot.config, &d.p.cold.config] {
        add_node_keys(
            cfg,
            "max_local_restarts = 0\nrestart_backoff_ms = 100\nrestart_backoff_max_ms = 300\n",
        );
    }
    let first = d.hot_then_cold();
    d.p.kill9("cold");
    assert!(
        wait_until(Duration::from_secs(10), || d.p.status("hot")["connected"]
            == false),
        "{}",
        d.p.logs()
    );
    kill(pid_t(first), libc::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(5), || d
            .node_pid("hot")
            .is_some_and(|p| p != first)),
        "the node was not restarted here\n{}",
        d.p.logs()
    );
    let st = d.p.status("hot");
    assert_eq!(st["role"], "hot", "{st}");
    assert_ne!(st["node_health"]["state"], "gave_up", "{st}");
    assert!(
        st["node_health"]["cannot_fail_over"]
            .as_str()
            .is_some_and(|w| w.contains("cold VM is not connected")),
        "{st}"
    );
}

/// Adds `keys` (TOML lines) at the top of the `[node]` section of the config at `path`.
fn add_node_keys(path: &std::path::Path, keys: &str) {
    let text =
        std::fs::read_to_string(path)
            .unwrap()
            .replacen("[node]\n", &format!("[node]\n{keys}"), 1);
    std::fs::write(path, text).unwrap();
}
