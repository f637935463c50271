//! Issue 14: the agent's HTTP endpoint on real agents of both modes. `promtool check metrics`
//! (from Debian's `prometheus` package, installed by `.ci/run`) reads what each live agent
//! serves; a real Prometheus server scrapes one; a load-balancer-style poll of both VMs'
//! `/health` runs through shared-mode failovers (a release, then kill -9); the rules file
//! passes `promtool check rules`; a bad `[metrics]` key is refused by name, and a port someone
//! else holds does not stop the agent. Each agent gets its own loopback port (chosen free by
//! binding port 0; the agent retries a bind that fails, so a port taken meanwhile only delays).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::agent::Pair as SharedPair;
use crate::replication::{wait_until, Pair as ReplicatedPair};
use crate::util::{artemis_sync, run, skip, spawn, Fixture};

/// Renewal period of the shared-mode test agents.
const UPDATE_MS: u64 = 200;
/// Takeover delay of the shared-mode test agents.
const WAIT_MS: u64 = 1000;
/// How often the load-balancer-style poll asks each VM's `/health`.
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// How long one HTTP request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an agent may take to become hot or cold.
const ROLE_LIMIT: Duration = Duration::from_secs(15);
/// How long the endpoint may take to listen: a few bind retries.
const ENDPOINT_LIMIT: Duration = Duration::from_secs(10);

/// Ports [`free_port`] handed out in this process: the kernel may give a port freed again
/// to the next bind to port 0, and two tests running at once must not share one.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A loopback port nobody listens on right now, and not handed out before in this process.
fn free_port() -> u16 {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().unwrap().port();
        if handed_out.insert(port) {
            return port;
        }
    }
    panic!("no fresh loopback port in 1000 tries")
}

/// Waits until the endpoint on `port` answers (the agent binds it on its own thread, and
/// retries every few seconds if something else held the port meanwhile).
#[track_caller]
fn wait_endpoint(port: u16) {
    assert!(
        wait_until(ENDPOINT_LIMIT, || get(port, "/health", "*/*").is_some()),
        "nothing answers on 127.0.0.1:{port}"
    );
}

fn metrics_section(port: u16) -> String {
    format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n")
}

/// `GET path` on `127.0.0.1:port`: the status code and body; `None` when nothing answers.
fn get(port: u16, path: &str, accept: &str) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut c = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).ok()?;
    c.set_read_timeout(Some(HTTP_TIMEOUT)).ok()?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    c.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// `/health`'s code, 0 when nothing answers.
fn health(port: u16) -> u16 {
    get(port, "/health", "*/*").map_or(0, |(c, _)| c)
}

/// A program of the `prometheus` package, or `None` after [`skip`]ping `test`.
fn prometheus_tool(test: &str, name: &str) -> Option<PathBuf> {
    let found = crate::util::on_path(name);
    if found.is_none() {
        skip(
            test,
            &format!("{name} is not installed (Debian package prometheus)"),
        );
    }
    found
}

/// Runs `promtool check metrics` on `text` and asserts that it finds no problem.
#[track_caller]
fn promtool_accepts(promtool: &Path, text: &str, what: &str) {
    let out = crate::util::run_with_input(Command::new(promtool).args(["check", "metrics"]), text);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics refused the {what} agent's /metrics: {said}\n{text}"
    );
}

/// The agent's live `/metrics` (Prometheus text, as curl asks), checked by promtool, with the
/// role it shows.
#[track_caller]
fn check_live(promtool: &Path, port: u16, role: &str, what: &str) -> String {
    wait_endpoint(port);
    let (code, text) = get(port, "/metrics", "text/plain").expect("the endpoint answers");
    assert_eq!(code, 200, "{text}");
    promtool_accepts(promtool, &text, what);
    let line = format!("artemis_sync_role{{role=\"{role}\"}} 1");
    assert!(
        text.lines().any(|l| l == line),
        "{what}: no {line}:\n{text}"
    );
    text
}

fn shared_pair(ports: [u16; 2]) -> SharedPair {
    SharedPair::with(UPDATE_MS, WAIT_MS, move |_, name| {
        metrics_section(if name == "a" { ports[0] } else { ports[1] })
    })
}

#[track_caller]
fn wait_role(pair: &SharedPair, name: &str, role: &str) {
    assert!(
        wait_until(ROLE_LIMIT, || pair.role(name) == role),
        "{name} did not become {role}\n{}",
        pair.stderr_of()
    );
}

#[test]
fn issue14_promtool_accepts_live_metrics_of_shared_hot_and_cold() {
    let test = "issue14_promtool_accepts_live_metrics_of_shared_hot_and_cold";
    let Some(promtool) = prometheus_tool(test, "promtool") else {
        return;
    };
    let ports = [free_port(), free_port()];
    let mut pair = shared_pair(ports);
    pair.start("a");
    wait_role(&pair, "a", "hot");
    pair.start("b");
    wait_role(&pair, "b", "cold");
    let hot = check_live(&promtool, ports[0], "hot", "shared hot");
    for line in [
        "artemis_sync_node_up 1",
        "artemis_sync_healthy 1",
        "artemis_sync_lock_held 1",
        // the share's mount and link were checked once, after the takeover
        "artemis_sync_mount_checks_total{result=\"ok\"} 1",
    ] {
        assert!(hot.lines().any(|l| l == line), "no {line}:\n{hot}");
    }
    // the lease worker times every renewal (one every UPDATE_MS)
    let renewals = || {
        get(ports[0], "/metrics", "text/plain")
            .and_then(|(_, t)| {
                t.lines()
                    .find_map(|l| {
                        l.strip_prefix("artemis_sync_lease_renewal_duration_seconds_count ")
                    })
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(5), || renewals() >= 2),
        "renewals are not timed: {}",
        renewals()
    );
    let cold = check_live(&promtool, ports[1], "cold", "shared cold");
    assert!(
        cold.lines().any(|l| l == "artemis_sync_node_up 0"),
        "{cold}"
    );
    // the same epoch the status shows, in the OpenMetrics form Prometheus asks for too
    let epoch = pair.status("a")["epoch"].as_u64().unwrap();
    let (_, om) = get(
        ports[0],
        "/metrics",
        "application/openmetrics-text; version=1.0.0",
    )
    .unwrap();
    assert!(
        om.lines()
            .any(|l| l == format!("artemis_sync_epoch {epoch}")),
        "{om}"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    // /status is what `status --json` prints
    let (code, body) = get(ports[1], "/status", "*/*").unwrap();
    assert_eq!(code, 200);
    let served: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(served["holder"], pair.status("b")["holder"]);
    assert_eq!(served["role"], "cold");
    assert_eq!((health(ports[0]), health(ports[1])), (200, 503));
}

#[test]
fn issue14_promtool_accepts_live_metrics_of_replicated_hot_and_cold() {
    let test = "issue14_promtool_accepts_live_metrics_of_replicated_hot_and_cold";
    let Some(promtool) = prometheus_tool(test, "promtool") else {
        return;
    };
    let mut pair = ReplicatedPair::new("psk", None);
    let ports = [free_port(), free_port()];
    for (cfg, port) in [(&pair.hot.config, ports[0]), (&pair.cold.config, ports[1])] {
        let mut text = std::fs::read_to_string(cfg).unwrap();
        text.push_str(&metrics_section(port));
        std::fs::write(cfg, text).unwrap();
    }
    std::fs::write(pair.hot.data.join("journal.amq"), vec![7u8; 64 * 1024]).unwrap();
    pair.start("cold");
    pair.start("hot");
    assert!(
        wait_until(ROLE_LIMIT, || pair.status("hot")["synced"] == true),
        "never synced\n{}",
        pair.logs()
    );
    let hot = check_live(&promtool, ports[0], "hot", "replicated hot");
    for line in [
        "artemis_sync_connected 1",
        "artemis_sync_synced 1",
        "artemis_sync_degraded 0",
        "artemis_sync_replication_lag_seconds 0.0",
        "artemis_sync_healthy 1",
    ] {
        assert!(hot.lines().any(|l| l == line), "no {line}:\n{hot}");
    }
    let cold = check_live(&promtool, ports[1], "cold", "replicated cold");
    let applied = pair.status("cold")["data_bytes"].as_u64().unwrap();
    assert!(applied >= 64 * 1024, "{applied}");
    assert!(
        cold.lines()
            .any(|l| l == format!("artemis_sync_replication_data_bytes_total {applied}")),
        "{cold}"
    );
    assert_eq!((health(ports[0]), health(ports[1])), (200, 503));
}

/// Both VMs' `/health` every [`PROBE_EVERY`] until `done`, as a load balancer does; panics
/// on a moment where both answered 200. Returns how many rounds were made.
fn poll_both(ports: [u16; 2], limit: Duration, mut done: impl FnMut([u16; 2]) -> bool) -> usize {
    let deadline = Instant::now() + limit;
    let mut rounds = 0;
    loop {
        let codes = [health(ports[0]), health(ports[1])];
        rounds += 1;
        assert!(codes != [200, 200], "both VMs answered /health 200 at once");
        if done(codes) {
            return rounds;
        }
        assert!(
            Instant::now() < deadline,
            "no takeover seen: last {codes:?}"
        );
        thread::sleep(PROBE_EVERY);
    }
}

#[test]
fn issue14_health_polled_through_failovers_never_shows_two_hot_vms() {
    let ports = [free_port(), free_port()];
    let mut pair = shared_pair(ports);
    pair.start("a");
    wait_role(&pair, "a", "hot");
    let b = pair.start("b");
    wait_role(&pair, "b", "cold");
    wait_endpoint(ports[0]);
    wait_endpoint(ports[1]);
    assert_eq!((health(ports[0]), health(ports[1])), (200, 503));

    // a planned hand-over: `release` on the hot VM
    let releaser = {
        let cfg = pair.config("a");
        thread::spawn(move || artemis_sync(&cfg, ["release"]))
    };
    let t0 = Instant::now();
    let rounds = poll_both(ports, ROLE_LIMIT, |c| c == [503, 200]);
    eprintln!(
        "release: b answered 200 after {:?} ({rounds} polls)",
        t0.elapsed()
    );
    releaser.join().unwrap().code(0);
    // once b's status says hot, its /health says so on the next probe
    assert_eq!(pair.role("b"), "hot");

    // a crash: kill -9 the hot agent (its node dies with it), a takes over
    pair.signal(b, libc::SIGKILL);
    let t0 = Instant::now();
    let rounds = poll_both(ports, ROLE_LIMIT, |c| c == [200, 0]);
    eprintln!(
        "kill -9: a answered 200 after {:?} ({rounds} polls)",
        t0.elapsed()
    );
    assert_eq!(pair.role("a"), "hot");
}

#[test]
fn issue14_a_real_prometheus_scrapes_the_agent() {
    let test = "issue14_a_real_prometheus_scrapes_the_agent";
    let Some(prometheus) = prometheus_tool(test, "prometheus") else {
        return;
    };
    let ports = [free_port(), free_port()];
    let mut pair = shared_pair(ports);
    pair.start("a");
    wait_role(&pair, "a", "hot");
    let web = free_port();
    let fx = Fixture::new();
    let config = fx.write(
        "prometheus.yml",
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: artemis-sync\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            ports[0]
        ),
    );
    let mut server = Server(spawn(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", fx.path("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(fx.path("prometheus.log")).unwrap()),
    ));
    let query = "/api/v1/query?query=artemis_sync_role%7Brole%3D%22hot%22%7D";
    let mut last = String::new();
    let seen = wait_until(Duration::from_secs(40), || {
        last = get(web, query, "*/*").map(|(_, b)| b).unwrap_or_default();
        last.contains("\"value\":[") && last.contains("\"1\"]")
    });
    let log = std::fs::read_to_string(fx.path("prometheus.log")).unwrap_or_default();
    assert!(
        seen,
        "Prometheus never had artemis_sync_role: {last}\n{log}"
    );
    let targets = get(web, "/api/v1/targets", "*/*")
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(targets.contains("\"health\":\"up\""), "{targets}");
    server.stop();
}

/// A server process stopped on drop.
struct Server(Child);

impl Server {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn issue14_the_rules_file_passes_promtool_and_names_served_metrics() {
    let test = "issue14_the_rules_file_passes_promtool_and_names_served_metrics";
    let Some(promtool) = prometheus_tool(test, "promtool") else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = root.join("packaging/prometheus-rules.yml");
    let out = run(Command::new(promtool).arg("check").arg("rules").arg(&rules));
    out.code(0).stdout_has(&["SUCCESS"]);
    // the dashboard is JSON, and every metric the rules and the dashboard use is one the
    // agent serves (names taken from the source of the collector and the registry)
    let dashboard = std::fs::read_to_string(root.join("packaging/grafana-dashboard.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let served = served_names(root);
    for (what, text) in [
        ("rules", std::fs::read_to_string(&rules).unwrap()),
        ("dashboard", dashboard),
    ] {
        for name in metric_names(&text) {
            assert!(
                served.contains(&name),
                "{what} uses {name}, which the agent does not serve ({served:?})"
            );
        }
    }
}

/// `artemis_sync_...` names in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("artemis_sync_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out.sort();
    out.dedup();
    out
}

/// The names a live shared agent and the collector's replicated metrics can serve: from a
/// scrape of a real agent plus the replicated-only names the collector's source declares.
fn served_names(root: &Path) -> Vec<String> {
    let ports = [free_port(), free_port()];
    let mut pair = shared_pair(ports);
    pair.start("a");
    wait_role(&pair, "a", "hot");
    wait_endpoint(ports[0]);
    let (_, text) = get(ports[0], "/metrics", "text/plain").unwrap();
    let mut names: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    let collector = std::fs::read_to_string(root.join("src/daemon/metrics/collector.rs")).unwrap();
    for base in [
        "connected",
        "synced",
        "degraded",
        "blocked",
        "waiting",
        "reconnects",
        "resends",
        "checksum_failures",
        "apply_failures",
        "apply_failing",
    ] {
        assert!(collector.contains(&format!("\"{base}\"")), "{base}");
        let name = format!("artemis_sync_{base}");
        names.push(
            if [
                "reconnects",
                "resends",
                "checksum_failures",
                "apply_failures",
            ]
            .contains(&base)
            {
                format!("{name}_total")
            } else {
                name
            },
        );
    }
    for n in [
        "artemis_sync_replication_lag_seconds",
        "artemis_sync_replication_unacknowledged_bytes",
        "artemis_sync_replication_data_bytes_total",
        "artemis_sync_replication_batches_total",
        "artemis_sync_wire_sent_bytes_total",
        "artemis_sync_wire_received_bytes_total",
        "artemis_sync_last_ack_age_seconds",
    ] {
        names.push(n.to_owned());
    }
    // histograms are used through their series
    for h in [
        "artemis_sync_lease_renewal_duration_seconds",
        "artemis_sync_durable_sync_wait_seconds",
    ] {
        names.push(h.to_owned());
    }
    names
}

#[test]
fn issue14_a_bad_metrics_config_is_refused_naming_the_key() {
    let fx = Fixture::new();
    let base = fx.mkdir("base");
    let share = fx.mkdir("share");
    for (metrics, key) in [
        ("listen = \"0.0.0.0:9465\"", "`metrics.listen`"),
        ("listen = \"nowhere\"", "`metrics.listen`"),
        (
            "listen = \"127.0.0.1:9465\"\nscrape = true",
            "unknown field `scrape`",
        ),
    ] {
        let cfg = fx.write(
            "agent.toml",
            format!(
                "{}\n[metrics]\n{metrics}\n",
                crate::util::premounted_config(&base, &share)
            ),
        );
        artemis_sync(&cfg, ["check-config"]).code(3);
        artemis_sync(&cfg, ["agent"]).code(3).stderr_has(&[key]);
    }
}

#[test]
fn issue14_a_taken_metrics_port_does_not_stop_the_agent() {
    let taken = TcpListener::bind(("127.0.0.1", free_port())).unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut pair = shared_pair([port, free_port()]);
    pair.start("a");
    // the agent and its node run although the endpoint cannot listen; status says why
    wait_role(&pair, "a", "hot");
    let st = pair.status("a");
    assert_eq!(st["node_state"], "running", "{st}");
    let err = st["metrics_error"].as_str().unwrap_or_default().to_owned();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{st}");
    assert!(pair
        .stderr_of()
        .contains(&format!("cannot listen on 127.0.0.1:{port}")));
    // the port is freed: the endpoint takes it at its next try
    drop(taken);
    assert!(
        wait_until(Duration::from_secs(10), || health(port) == 200),
        "the endpoint never bound the freed port\n{}",
        pair.stderr_of()
    );
    assert_eq!(pair.status("a")["metrics_error"], serde_json::Value::Null);
}

#[test]
fn issue14_durable_sync_waits_and_verify_results_are_recorded_where_they_happen() {
    let test = "issue14_durable_sync_waits_and_verify_results_are_recorded_where_they_happen";
    if !crate::util::require_root(test, "FUSE mounts") {
        return;
    }
    let Some(promtool) = prometheus_tool(test, "promtool") else {
        return;
    };
    let mut p =
        crate::fuse::fuse_pair(Fixture::new(), "ack = \"durable\"\npeer_timeout_ms = 10000");
    let port = free_port();
    let mut text = std::fs::read_to_string(&p.hot.config).unwrap();
    text.push_str(&metrics_section(port));
    std::fs::write(&p.hot.config, text).unwrap();
    let _guard = crate::util::MountGuard::new(&p.fx.path("hot/mnt"));
    crate::fuse::start_synced(&mut p);
    const SYNCS: usize = 20;
    let mut f = std::fs::File::create(crate::fuse::mount_point(&p).join("journal.amq")).unwrap();
    for i in 0..SYNCS {
        f.write_all(&[u8::try_from(i).unwrap(); 4096]).unwrap();
        f.sync_data().unwrap();
    }
    drop(f);
    artemis_sync(&p.hot.config, ["verify"])
        .code(0)
        .stdout_has(&["identical"]);
    let text = check_live(&promtool, port, "hot", "replicated durable hot");
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name}:\n{text}"))
            .parse()
            .unwrap()
    };
    let waits = value("artemis_sync_durable_sync_wait_seconds_count");
    assert!(
        waits >= SYNCS as f64,
        "{waits} durable waits recorded for {SYNCS} syncs"
    );
    assert_eq!(value("artemis_sync_last_verify_identical"), 1.0);
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let verified_at = value("artemis_sync_last_verify_timestamp_seconds");
    assert!(
        (now_s - verified_at).abs() < 60.0,
        "{verified_at} vs now {now_s}"
    );
}
