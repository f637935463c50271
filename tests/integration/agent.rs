//! Issue 3: two real `artemis-sync agent` processes contend for one share (a premounted temp
//! directory), each supervising a node script that logs its start and stop. Timing assertions
//! use the intervals below with generous margins; measured figures are printed to stderr
//! (`cargo test -- --nocapture` shows them).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::{artemis_sync, main_cmd, spawn, toml_path, wait_bounded, write_script, Fixture};

/// Renewal period of the test agents.
const UPDATE_MS: u64 = 300;
/// Takeover delay of the test agents.
const WAIT_MS: u64 = 1500;
/// SIGTERM-to-SIGKILL time of the test nodes.
const STOP_MS: u64 = 300;

/// Two agents (`a`, `b`) configured on one share, with a node log.
pub(crate) struct Pair {
    pub(crate) fx: Fixture,
    log: PathBuf,
    agents: Vec<(String, Child)>,
    /// Extra environment for the agents.
    env: Vec<(String, PathBuf)>,
}

fn config_path(fx: &Fixture, name: &str) -> PathBuf {
    fx.path(&format!("{name}.toml"))
}

impl Pair {
    /// Starts `a` and waits until it is hot, then `b` until it is cold.
    fn start_a_hot_then_b_cold(&mut self) {
        self.start("a");
        assert!(
            wait_until(Duration::from_millis(WAIT_MS * 3), || self.role("a")
                == "hot"),
            "{}",
            self.stderr_of()
        );
        self.start("b");
        assert!(wait_until(Duration::from_secs(5), || self.role("b") == "cold"));
    }

    fn new() -> Pair {
        Pair::with(UPDATE_MS, WAIT_MS, |_, _| String::new())
    }

    /// Two agents renewing every `update_ms`, taking over after `wait_ms`, each config ending
    /// with what `extra` gives for the fixture and the agent's name (a `[lease]` section).
    pub(crate) fn with(
        update_ms: u64,
        wait_ms: u64,
        extra: impl Fn(&Fixture, &str) -> String,
    ) -> Pair {
        Pair::with_node(update_ms, wait_ms, |_, _| String::new(), extra)
    }

    /// As [`Pair::with`], with `node` giving more `[node]` keys for the fixture and the agent's
    /// name (a `command = ...` there replaces the logging node script).
    pub(crate) fn with_node(
        update_ms: u64,
        wait_ms: u64,
        node_keys: impl Fn(&Fixture, &str) -> String,
        extra: impl Fn(&Fixture, &str) -> String,
    ) -> Pair {
        let fx = Fixture::new();
        let share = fx.mkdir("share");
        let log = fx.path("nodes.log");
        let node = write_script(
            &fx.path("node.sh"),
            &format!(
                "trap 'echo \"stop $1 $(date +%s%N) $$\" >> {log}; exit 0' TERM\n\
                 echo \"start $1 $ARTEMIS_SYNC_EPOCH $(date +%s%N) $$\" >> {log}\n\
                 while :; do sleep 0.05 & wait $!; done",
                log = log.display()
            ),
        );
        for name in ["a", "b"] {
            let base = fx.mkdir(name);
            let keys = node_keys(&fx, name);
            let command = if keys.lines().any(|l| l.starts_with("command =")) {
                String::new()
            } else {
                format!("command = [{}, \"{name}\"]\n", toml_path(&node))
            };
            let text = format!(
                "[node]\nbase_dir = {}\n{command}{keys}\nstop_timeout_ms = {STOP_MS}\n\n\
                 [storage]\nbackend = \"premounted\"\nmount_point = {}\n\n\
                 [lock]\nmachine_name = \"{name}\"\nupdate_interval_ms = {update_ms}\nwait_interval_ms = {wait_ms}\n\
                 allow_local_locks = true\n\n[agent]\ncontrol_socket = {}\n{}",
                toml_path(&base),
                toml_path(&share),
                toml_path(&fx.path(&format!("{name}.sock"))),
                extra(&fx, name),
            );
            fs::write(config_path(&fx, name), text).unwrap();
        }
        Pair {
            fx,
            log,
            agents: Vec::new(),
            env: Vec::new(),
        }
    }

    pub(crate) fn config(&self, name: &str) -> PathBuf {
        config_path(&self.fx, name)
    }

    fn lease_path(&self) -> PathBuf {
        self.fx.path("share/.artemis-sync/lease.json")
    }

    /// Starts agent `name` in its own process group, stderr to `<name>.<n>.err`.
    pub(crate) fn start(&mut self, name: &str) -> u32 {
        let n = self.agents.len();
        let err = fs::File::create(self.fx.path(&format!("{name}.{n}.err"))).unwrap();
        let mut cmd = main_cmd();
        cmd.arg("-c")
            .arg(self.config(name))
            .arg("agent")
            .stdout(Stdio::null())
            .stderr(err)
            .process_group(0);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = spawn(&mut cmd);
        let pid = child.id();
        self.agents.push((name.to_owned(), child));
        pid
    }

    /// Adds `key=value` to the environment of the agents started from now on (their nodes
    /// inherit it).
    pub(crate) fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_owned(), PathBuf::from(value)));
    }

    /// The pid of the last agent started as `name`.
    pub(crate) fn agent_pid(&self, name: &str) -> u32 {
        self.agents
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .expect("agent started")
            .1
            .id()
    }

    pub(crate) fn child(&mut self, pid: u32) -> &mut Child {
        &mut self
            .agents
            .iter_mut()
            .find(|(_, c)| c.id() == pid)
            .expect("agent pid")
            .1
    }

    /// Sends `sig` to agent `pid` and, for a terminating signal, waits for it to exit.
    pub(crate) fn signal(&mut self, pid: u32, sig: libc::c_int) {
        kill(pid_t(pid), sig);
        if sig == libc::SIGTERM || sig == libc::SIGKILL {
            let status = wait_bounded(self.child(pid), Duration::from_secs(10));
            assert!(
                status.is_some(),
                "agent {pid} did not exit after signal {sig}"
            );
        }
    }

    pub(crate) fn status(&self, name: &str) -> serde_json::Value {
        let out = artemis_sync(&self.config(name), ["status", "--json"]);
        serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("status is not JSON ({e}):\n{out}"))
    }

    pub(crate) fn role(&self, name: &str) -> String {
        self.status(name)["role"].as_str().unwrap_or("?").to_owned()
    }

    pub(crate) fn events(&self) -> Vec<Event> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(Event::parse)
            .collect()
    }

    pub(crate) fn stderr_of(&self) -> String {
        let mut all = String::new();
        for (i, (name, _)) in self.agents.iter().enumerate() {
            let text =
                fs::read_to_string(self.fx.path(&format!("{name}.{i}.err"))).unwrap_or_default();
            all.push_str(&format!("--- agent {name} #{i} ---\n{text}"));
        }
        all
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for (_, child) in &mut self.agents {
            let _ = child.kill(); // the nodes die with them (PR_SET_PDEATHSIG)
            let _ = child.wait();
        }
    }
}

/// A process id as `kill(2)` takes it (pids are below 2^22 on Linux).
pub(crate) fn pid_t(pid: u32) -> libc::pid_t {
    libc::pid_t::try_from(pid).expect("a pid fits in pid_t")
}

pub(crate) fn kill(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

pub(crate) fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid_t(pid), 0) == 0 };
    // a zombie still "exists": look at its state
    exists
        && fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
}

#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub(crate) start: bool,
    pub(crate) name: String,
    pub(crate) epoch: Option<u64>,
    /// When it happened (ns since the epoch), for the failure report.
    #[allow(dead_code)]
    pub(crate) t_ns: u128,
    pub(crate) pid: u32,
}

impl Event {
    fn parse(line: &str) -> Event {
        let f: Vec<&str> = line.split_whitespace().collect();
        let bad = || -> ! { panic!("bad node log line {line:?}") };
        match f.as_slice() {
            ["start", name, epoch, t, pid] => Event {
                start: true,
                name: name.to_string(),
                epoch: epoch.parse().ok(),
                t_ns: t.parse().unwrap_or_else(|_| bad()),
                pid: pid.parse().unwrap_or_else(|_| bad()),
            },
            ["stop", name, t, pid] => Event {
                start: false,
                name: name.to_string(),
                epoch: None,
                t_ns: t.parse().unwrap_or_else(|_| bad()),
                pid: pid.parse().unwrap_or_else(|_| bad()),
            },
            _ => bad(),
        }
    }
}

/// Polls `cond` every 10 ms for at most `limit`.
pub(crate) fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts that node runs never overlap: every start comes after the previous run's stop.
#[track_caller]
pub(crate) fn assert_one_at_a_time(events: &[Event]) {
    let mut running: Option<&Event> = None;
    for e in events {
        if e.start {
            assert!(
                running.is_none(),
                "node {} (pid {}) started while {:?} was running: {events:#?}",
                e.name,
                e.pid,
                running
            );
            running = Some(e);
        } else {
            let r = running
                .take()
                .unwrap_or_else(|| panic!("stop without start: {e:?}"));
            assert_eq!(
                r.pid, e.pid,
                "the stop is not of the running node: {events:#?}"
            );
        }
    }
}

#[test]
fn issue3_exactly_one_node_over_start_stop_cycles_and_simultaneous_starts() {
    const CYCLES: usize = 4;
    let mut p = Pair::new();
    for cycle in 0..CYCLES {
        // both at once
        let a = p.start("a");
        let b = p.start("b");
        let limit = Duration::from_millis(WAIT_MS * 3);
        assert!(
            wait_until(limit, || p.role("a") == "hot" || p.role("b") == "hot"),
            "cycle {cycle}: nobody became hot\n{}",
            p.stderr_of()
        );
        let (hot, cold, cold_name) = if p.role("a") == "hot" {
            (a, b, "b")
        } else {
            (b, a, "a")
        };
        assert_ne!(p.role(cold_name), "hot", "cycle {cycle}: both hot");
        let started = |p: &Pair, n: usize| {
            wait_until(limit, || p.events().iter().filter(|e| e.start).count() == n)
        };
        assert!(
            started(&p, 2 * cycle + 1),
            "cycle {cycle}: the node did not start"
        );
        // stop the hot one: the cold one takes the released lease
        p.signal(hot, libc::SIGTERM);
        assert!(
            wait_until(limit, || p.role(cold_name) == "hot"),
            "cycle {cycle}: no handover\n{}",
            p.stderr_of()
        );
        assert!(
            started(&p, 2 * cycle + 2),
            "cycle {cycle}: the second node did not start"
        );
        p.signal(cold, libc::SIGTERM);
    }
    let events = p.events();
    assert_eq!(
        events.iter().filter(|e| e.start).count(),
        2 * CYCLES,
        "{events:#?}"
    );
    assert_eq!(
        events.iter().filter(|e| !e.start).count(),
        2 * CYCLES,
        "every node was stopped: {events:#?}"
    );
    assert_one_at_a_time(&events);
    // epochs only go up
    let epochs: Vec<u64> = events.iter().filter_map(|e| e.epoch).collect();
    assert!(
        epochs.windows(2).all(|w| w[1] == w[0] + 1),
        "epochs {epochs:?}"
    );
}

/// Watches the lease file's bytes every 2 ms until `until` holds for the new content; returns
/// when it last changed before that and when the final change was seen.
fn watch_lease(
    path: &Path,
    limit: Duration,
    mut until: impl FnMut(&str) -> bool,
) -> Option<(Instant, Instant)> {
    let deadline = Instant::now() + limit;
    let mut last = fs::read(path).unwrap_or_default();
    let mut last_change = Instant::now();
    while Instant::now() < deadline {
        let now_bytes = fs::read(path).unwrap_or_default();
        if now_bytes != last {
            let seen = Instant::now();
            if until(&String::from_utf8_lossy(&now_bytes)) {
                return Some((last_change, seen));
            }
            last = now_bytes;
            last_change = seen;
        }
        thread::sleep(Duration::from_millis(2));
    }
    None
}

#[test]
fn issue3_kill9_of_the_hot_agent_kills_its_node_and_the_cold_takes_over_after_wait_interval() {
    let mut p = Pair::new();
    let a = p.start("a");
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 3), || p.role("a") == "hot"),
        "{}",
        p.stderr_of()
    );
    let _b = p.start("b");
    assert!(wait_until(Duration::from_secs(5), || p.role("b") == "cold"));
    let node = u32::try_from(p.status("a")["node_pid"].as_u64().expect("node pid")).expect("a pid");
    assert!(alive(node));

    let lease = p.lease_path();
    let watcher = thread::spawn(move || {
        watch_lease(&lease, Duration::from_millis(WAIT_MS * 4), |text| {
            text.contains("\"holder\": \"b:")
        })
    });
    thread::sleep(Duration::from_millis(UPDATE_MS)); // let the watcher see a renewal or two
    let killed = Instant::now();
    p.signal(a, libc::SIGKILL);
    // the node must not outlive its agent (PR_SET_PDEATHSIG)
    assert!(
        wait_until(Duration::from_secs(2), || !alive(node)),
        "node {node} survived the agent's kill -9"
    );
    let node_gone = killed.elapsed();

    let (last_renewal, takeover) = watcher
        .join()
        .unwrap()
        .unwrap_or_else(|| panic!("no takeover\n{}", p.stderr_of()));
    let gap = takeover.duration_since(last_renewal);
    eprintln!("kill -9: node gone after {node_gone:?}; takeover {gap:?} after the last renewal (wait_interval {WAIT_MS} ms, bound {} ms)", WAIT_MS + 2 * UPDATE_MS);
    assert!(
        gap >= Duration::from_millis(WAIT_MS - 25),
        "took over too early: {gap:?}"
    );
    assert!(
        gap <= Duration::from_millis(WAIT_MS + 2 * UPDATE_MS),
        "took over too late: {gap:?}\n{}",
        p.stderr_of()
    );
    assert!(
        wait_until(Duration::from_secs(2), || p.role("b") == "hot"),
        "{}",
        p.stderr_of()
    );
    assert_eq!(p.status("b")["epoch"], 2);
    assert!(wait_until(Duration::from_secs(2), || p
        .events()
        .iter()
        .any(|e| e.start && e.name == "b")));
}

#[test]
fn issue3_a_frozen_hot_is_replaced_and_fences_itself_on_waking_without_writing_the_lease() {
    let mut p = Pair::new();
    let a = p.start("a");
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 3), || p.role("a") == "hot"),
        "{}",
        p.stderr_of()
    );
    let _b = p.start("b");
    assert!(wait_until(Duration::from_secs(5), || p.role("b") == "cold"));
    let node = libc::pid_t::try_from(p.status("a")["node_pid"].as_u64().unwrap()).expect("a pid");

    // A hung VM: the agent and its node both stop. On two VMs the NFS server then drops the
    // hung client's locks when its lease expires; on one host a stopped process keeps its
    // lock, so the test does what the server would: the lock file the hot locked is replaced,
    // and the cold can lock the new one. The lease still decides: b must see it unchanged
    // for wait_interval_ms before taking over.
    kill(pid_t(a), libc::SIGSTOP);
    kill(-node, libc::SIGSTOP);
    let frozen = Instant::now();
    let lock = p.fx.path("share/.artemis-sync/lock");
    fs::remove_file(&lock).unwrap();
    fs::write(&lock, b"").unwrap();
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 3), || p.role("b") == "hot"),
        "{}",
        p.stderr_of()
    );
    let took = frozen.elapsed();
    assert!(
        took >= Duration::from_millis(WAIT_MS - 25),
        "b took over {took:?} after the freeze"
    );
    assert_eq!(p.status("b")["epoch"], 2);
    let lease_b = fs::read(p.lease_path()).unwrap();

    kill(-node, libc::SIGCONT);
    kill(pid_t(a), libc::SIGCONT);
    let woke = Instant::now();
    let stopped = wait_until(Duration::from_millis(STOP_MS + 2000), || {
        p.events().iter().any(|e| !e.start && e.name == "a")
    });
    assert!(
        stopped,
        "the old hot did not fence its node\n{}",
        p.stderr_of()
    );
    eprintln!(
        "SIGSTOP: b took over {took:?} after the freeze; a fenced its node {:?} after SIGCONT",
        woke.elapsed()
    );
    assert_ne!(p.role("a"), "hot");
    // a never writes the lease again: over several renewal periods only b's renewals appear
    thread::sleep(Duration::from_millis(UPDATE_MS * 4));
    let now = fs::read_to_string(p.lease_path()).unwrap();
    assert!(
        now.contains("\"holder\": \"b:") && now.contains("\"epoch\": 2"),
        "{now}"
    );
    assert_ne!(now.as_bytes(), lease_b.as_slice(), "b keeps renewing");
    let log = p.stderr_of();
    assert!(log.contains("FENCING"), "{log}");
}

#[test]
fn issue3_an_unreadable_truncated_or_garbage_lease_is_never_a_reason_to_take_over() {
    let mut p = Pair::new();
    let a = p.start("a");
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 3), || p.role("a") == "hot"),
        "{}",
        p.stderr_of()
    );
    let good = fs::read(p.lease_path()).unwrap();
    let _b = p.start("b");
    assert!(wait_until(Duration::from_secs(5), || p.role("b") == "cold"));
    p.signal(a, libc::SIGKILL);
    let lease = p.lease_path();
    for (what, damage) in [
        (
            "garbage",
            Box::new(|p: &Path| fs::write(p, b"\x00\x01 not a lease").unwrap())
                as Box<dyn Fn(&Path)>,
        ),
        (
            "truncated",
            Box::new(move |p: &Path| fs::write(p, &good[..good.len() / 2]).unwrap()),
        ),
        (
            "unreadable",
            Box::new(|p: &Path| {
                fs::remove_file(p).unwrap();
                fs::create_dir(p).unwrap();
            }),
        ),
    ] {
        damage(&lease);
        // well past the takeover delay: b must still be cold, saying why
        thread::sleep(Duration::from_millis(WAIT_MS + 3 * UPDATE_MS));
        let status = p.status("b");
        assert_eq!(status["role"], "cold", "{what}: {status}");
        let error = status["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(&*lease.to_string_lossy()),
            "{what}: the error names the lease: {status}"
        );
        assert!(
            !p.events().iter().any(|e| e.start && e.name == "b"),
            "{what}: b started a node"
        );
        if lease.is_dir() {
            fs::remove_dir(&lease).unwrap();
        }
    }
    // The operator moves the damaged record away: b takes over after a full wait_interval.
    let _ = fs::remove_file(&lease);
    let removed = Instant::now();
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 3), || p.role("b") == "hot"),
        "{}",
        p.stderr_of()
    );
    assert!(removed.elapsed() >= Duration::from_millis(WAIT_MS - 25));
    assert!(p.stderr_of().contains("corrupt"), "{}", p.stderr_of());
}

#[test]
fn issue3_release_hands_over_in_well_under_wait_interval() {
    let mut p = Pair::new();
    p.start_a_hot_then_b_cold();
    let started = Instant::now();
    let out = artemis_sync(&p.config("a"), ["release"]);
    out.code(0).stdout_has(&["released epoch 1"]);
    assert!(
        wait_until(Duration::from_millis(WAIT_MS), || p.role("b") == "hot"),
        "{}",
        p.stderr_of()
    );
    let handover = started.elapsed();
    eprintln!(
        "release: b hot {handover:?} after `artemis-sync release` (wait_interval {WAIT_MS} ms)"
    );
    assert!(
        handover < Duration::from_millis(WAIT_MS / 2),
        "handover took {handover:?}"
    );
    assert_eq!(p.status("b")["epoch"], 2);
    assert_ne!(p.role("a"), "hot");
    assert_one_at_a_time(&p.events());
    // a released agent does not take it back at once
    thread::sleep(Duration::from_millis(UPDATE_MS * 2));
    assert_eq!(p.role("b"), "hot");
    // release on a cold agent is harmless
    artemis_sync(&p.config("a"), ["release"])
        .code(0)
        .stdout_has(&["nothing to release"]);
}

#[test]
fn issue3_a_replaced_lock_file_fences_the_node() {
    let mut p = Pair::new();
    p.start("a");
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 3), || p.role("a") == "hot"),
        "{}",
        p.stderr_of()
    );
    let lock = p.fx.path("share/.artemis-sync/lock");
    fs::remove_file(&lock).unwrap();
    fs::write(&lock, b"").unwrap();
    assert!(
        wait_until(Duration::from_millis(UPDATE_MS * 3 + STOP_MS), || p
            .events()
            .iter()
            .any(|e| !e.start)),
        "the node was not fenced\n{}",
        p.stderr_of()
    );
    assert!(p.stderr_of().contains("was replaced"), "{}", p.stderr_of());
    assert_eq!(p.role("a"), "fenced");
}

#[test]
fn issue3_status_reports_the_fields_and_a_missing_agent() {
    let mut p = Pair::new();
    let out = artemis_sync(&p.config("a"), ["status", "--json"]);
    out.code(1);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["role"], "down");
    assert!(v["error"].as_str().unwrap().contains("a.sock"), "{v}");
    p.start("a");
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 3), || p.role("a") == "hot"),
        "{}",
        p.stderr_of()
    );
    let s = p.status("a");
    for key in [
        "role",
        "holder",
        "lease_holder",
        "epoch",
        "lease_state",
        "last_renewal_age_ms",
        "lock_held",
        "node_pid",
        "node_state",
    ] {
        assert!(s.get(key).is_some(), "status lacks {key}: {s}");
    }
    assert_eq!(s["holder"], format!("a:{}", p.fx.path("a").display()));
    assert_eq!(s["node_state"], "running");
    assert!(
        s["last_renewal_age_ms"].as_u64().unwrap() <= UPDATE_MS * 3,
        "{s}"
    );
    // the text form too
    artemis_sync(&p.config("a"), ["status"])
        .code(0)
        .stdout_has(&["role", "hot", "epoch"]);
    // a second agent with the same config is refused
    let out = artemis_sync(&p.config("a"), ["agent"]);
    out.code(1).stderr_has(&["another agent already answers"]);
}

#[test]
fn issue3_refuses_a_local_filesystem_unless_allowed() {
    let p = Pair::new();
    let cfg = p.config("a");
    let text = fs::read_to_string(&cfg)
        .unwrap()
        .replace("allow_local_locks = true", "allow_local_locks = false");
    fs::write(&cfg, text).unwrap();
    let out = artemis_sync(&cfg, ["agent"]);
    out.code(4)
        .stderr_has(&["refusing to run", "local", "allow_local_locks"]);
    assert!(p.events().is_empty());
}

#[test]
fn issue3_a_stop_timeout_that_cannot_fit_is_refused() {
    let p = Pair::new();
    let cfg = p.config("a");
    let text = fs::read_to_string(&cfg).unwrap().replace(
        &format!("stop_timeout_ms = {STOP_MS}"),
        "stop_timeout_ms = 1200",
    );
    fs::write(&cfg, text).unwrap();
    artemis_sync(&cfg, ["check-config"])
        .code(3)
        .stderr_has(&["node.stop_timeout_ms", "does not fit"]);
}

/// Starts `a` alone and waits until it is hot with its node logged; returns the time of the
/// last lease change seen before `fault` ran, and the fault's time.
fn hot_then(p: &mut Pair, fault: impl FnOnce(&Pair)) -> (Instant, Instant) {
    p.start("a");
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 3), || p.role("a") == "hot"),
        "{}",
        p.stderr_of()
    );
    assert!(wait_until(Duration::from_secs(2), || p
        .events()
        .iter()
        .any(|e| e.start)));
    // find the moment of a renewal, then break the share right after it
    let lease = p.lease_path();
    let (_, renewed) =
        watch_lease(&lease, Duration::from_millis(UPDATE_MS * 3), |_| true).expect("a renewal");
    fault(p);
    (renewed, Instant::now())
}

/// Waits for the node's stop line and returns when the test saw it.
fn node_stopped(p: &Pair, limit: Duration) -> Option<Instant> {
    wait_until(limit, || p.events().iter().any(|e| !e.start)).then(Instant::now)
}

#[test]
fn issue3_a_renewal_that_hangs_on_the_share_does_not_delay_fencing() {
    // A FIFO in place of the lease: the renewal's open() blocks for ever, as a read on a hung
    // NFS mount does. The fence must not wait for it.
    let mut p = Pair::new();
    let (renewed, _) = hot_then(&mut p, |p| {
        let lease = p.lease_path();
        fs::remove_file(&lease).unwrap();
        let c = std::ffi::CString::new(lease.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    });
    let stopped = node_stopped(&p, Duration::from_millis(WAIT_MS * 2))
        .unwrap_or_else(|| panic!("not fenced\n{}", p.stderr_of()));
    let down = stopped.duration_since(renewed);
    eprintln!("hung share: node down {down:?} after the last good renewal (must be < wait_interval {WAIT_MS} ms)");
    assert!(
        down < Duration::from_millis(WAIT_MS),
        "node still up {down:?} after the last renewal"
    );
    // the agent still answers while its share worker is stuck
    assert_eq!(p.role("a"), "fenced");
    assert!(
        p.stderr_of().contains("FENCING: no successful renewal"),
        "{}",
        p.stderr_of()
    );
}

#[test]
fn issue3_renewals_failing_on_a_full_share_fence_the_node_before_wait_interval() {
    if !crate::util::require_root("issue3 full share", "mounting a tmpfs needs root") {
        return;
    }
    let mut p = Pair::new();
    let share = p.fx.path("share");
    crate::util::system(
        "mount",
        &[
            "-t".as_ref(),
            "tmpfs".as_ref(),
            "-o".as_ref(),
            "size=256k".as_ref(),
            "tmpfs".as_ref(),
            share.as_os_str(),
        ],
    );
    let _guard = crate::util::MountGuard::new(&share);
    let (renewed, _) = hot_then(&mut p, |p| {
        // fill the share: the next lease write fails with ENOSPC
        let filler = p.fx.path("share/filler");
        let _ = fs::write(&filler, vec![0u8; 512 * 1024]);
    });
    let stopped = node_stopped(&p, Duration::from_millis(WAIT_MS * 2))
        .unwrap_or_else(|| panic!("not fenced\n{}", p.stderr_of()));
    let down = stopped.duration_since(renewed);
    eprintln!("full share: node down {down:?} after the last good renewal (must be < wait_interval {WAIT_MS} ms)");
    assert!(
        down < Duration::from_millis(WAIT_MS),
        "node still up {down:?} after the last renewal"
    );
    let log = p.stderr_of();
    assert!(
        log.contains("renewal failed") && log.contains("No space left on device"),
        "{log}"
    );
    // the lease on the share is intact: the failed write never replaced it
    let text = fs::read_to_string(p.lease_path()).unwrap();
    assert!(text.contains("\"holder\": \"a:"), "{text}");
    assert!(
        fs::read_dir(p.fx.path("share/.artemis-sync"))
            .unwrap()
            .all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp")),
        "no temporary left"
    );
}

#[test]
fn issue3_a_node_that_dies_gives_the_lease_to_the_other_vm() {
    // the watchdog gives up on the first failure (issue 14's local restarts are off)
    let mut p = Pair::with_node(
        UPDATE_MS,
        WAIT_MS,
        |_, _| "max_local_restarts = 0\n".into(),
        |_, _| String::new(),
    );
    p.start_a_hot_then_b_cold();
    let node = libc::pid_t::try_from(p.status("a")["node_pid"].as_u64().unwrap()).expect("a pid");
    let crashed = Instant::now();
    kill(node, libc::SIGKILL);
    assert!(
        wait_until(Duration::from_millis(WAIT_MS), || p.role("b") == "hot"),
        "{}",
        p.stderr_of()
    );
    eprintln!(
        "node crash: b hot {:?} after a's node was killed",
        crashed.elapsed()
    );
    assert!(
        p.stderr_of().contains("killed by signal 9"),
        "{}",
        p.stderr_of()
    );
    assert_ne!(p.role("a"), "hot");
}

#[test]
fn issue6_a_systemd_unit_node_is_started_watched_and_stopped_through_systemctl() {
    let mut p = Pair::new();
    let calls = p.fx.path("systemctl.log");
    let active = p.fx.path("corda.active");
    let fake = write_script(
        &p.fx.path("systemctl"),
        &format!(
            "echo \"$*\" >> {calls}\ncase \"$1\" in\n  start) touch {active} ;;\n  stop) rm -f {active} ;;\n  is-active) if [ -e {active} ]; then echo active; else echo inactive; exit 3; fi ;;\nesac",
            calls = calls.display(),
            active = active.display()
        ),
    );
    p.env.push(("ARTEMIS_SYNC_SYSTEMCTL".into(), fake));
    let cfg = p.config("a");
    let text = fs::read_to_string(&cfg).unwrap();
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("command = ") {
                // the watchdog gives up on the first failure (no local restarts, issue 14)
                // and contends again 100 ms later (the lone agent takes the lease back)
                "systemd_unit = \"corda.service\"\nmax_local_restarts = 0\ncooldown_ms = 100"
                    .to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(&cfg, text).unwrap();
    let a = p.start("a");
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 3), || p.role("a") == "hot"),
        "{}",
        p.stderr_of()
    );
    assert!(wait_until(Duration::from_secs(2), || fs::read_to_string(
        &calls
    )
    .unwrap_or_default()
    .contains("start corda.service")));
    assert_eq!(p.status("a")["node_state"], "running");
    // the unit dies: the agent notices and gives the lease up
    fs::remove_file(&active).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || p.role("a") != "hot"),
        "{}",
        p.stderr_of()
    );
    assert!(
        p.status("a")["error"]
            .as_str()
            .unwrap_or_default()
            .contains("the node"),
        "{}",
        p.status("a")
    );
    // a new takeover starts it again; stopping the agent stops the unit
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 4), || p.role("a") == "hot"),
        "{}",
        p.stderr_of()
    );
    assert!(active.exists());
    p.signal(a, libc::SIGTERM);
    assert!(!active.exists(), "the unit was not stopped");
    let log = fs::read_to_string(&calls).unwrap();
    assert!(log.contains("stop corda.service"), "{log}");
    assert!(log.contains("is-active --quiet corda.service"), "{log}");
}

#[test]
fn issue10_a_unit_node_left_running_by_a_killed_agent_is_stopped_when_the_agent_restarts() {
    let mut p = Pair::new();
    let calls = p.fx.path("systemctl.log");
    let active = p.fx.path("corda.active");
    with_fake_unit(
        &mut p,
        "a",
        &format!(
            "echo \"$*\" >> {calls}\ncase \"$1\" in\n  start) touch {active} ;;\n  stop) rm -f {active} ;;\n  is-active) if [ -e {active} ]; then echo active; else echo inactive; exit 3; fi ;;\nesac",
            calls = calls.display(),
            active = active.display()
        ),
        "",
    );
    let a = p.start("a");
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 3), || p.role("a") == "hot"),
        "{}",
        p.stderr_of()
    );
    assert!(wait_until(Duration::from_secs(2), || active.exists()));
    // the agent dies (kill -9, systemd's watchdog abort, a crash): the unit is not in its
    // cgroup and gets no death signal, so the node runs on without anyone renewing the lease
    p.signal(a, libc::SIGKILL);
    assert!(active.exists());
    let before = fs::read_to_string(&calls).unwrap().len();
    p.start("a");
    assert!(
        wait_until(Duration::from_secs(5), || p.status("a")["role"]
            .as_str()
            .is_some_and(|r| r != "down")),
        "{}",
        p.stderr_of()
    );
    let log = fs::read_to_string(&calls).unwrap();
    let since = &log[before..];
    let stop = since.find("stop corda.service");
    assert!(
        stop.is_some_and(|s| since.find("start corda.service").is_none_or(|t| s < t)),
        "the restarted agent did not stop the unit it had no right to run before anything else:\n{since}\n{}",
        p.stderr_of()
    );
}

#[test]
fn issue10_hooks_run_on_acquire_and_on_release_with_epoch_and_holder() {
    let mut p = Pair::new();
    let hooks = p.fx.path("hooks.log");
    for name in ["a", "b"] {
        let hook = |what: &str| {
            format!(
                "[\"/bin/sh\", \"-c\", \"echo {what} $ARTEMIS_SYNC_EPOCH $ARTEMIS_SYNC_HOLDER >> {}\"]",
                hooks.display()
            )
        };
        let path = p.config(name);
        let text = fs::read_to_string(&path).unwrap().replacen(
            "[node]\n",
            &format!(
                "[node]\non_acquire = {}\non_release = {}\n",
                hook("acquire"),
                hook("release")
            ),
            1,
        );
        fs::write(&path, text).unwrap();
    }
    p.start_a_hot_then_b_cold();
    artemis_sync(&p.config("a"), ["release"]).code(0);
    assert!(
        wait_until(Duration::from_millis(WAIT_MS), || p.role("b") == "hot"),
        "{}",
        p.stderr_of()
    );
    let base = |name: &str| p.fx.path(name).display().to_string();
    let want = format!(
        "acquire 1 a:{a}\nrelease 1 a:{a}\nacquire 2 b:{b}\n",
        a = base("a"),
        b = base("b")
    );
    assert!(
        wait_until(Duration::from_secs(2), || fs::read_to_string(&hooks)
            .is_ok_and(|t| t == want)),
        "hooks ran as {:?}, want {want:?}\n{}",
        fs::read_to_string(&hooks),
        p.stderr_of()
    );
}

/// Issue 10: systemd's watchdog keeps hearing from the agent while a hook runs on its main
/// thread (as while the node starts or stops there). Those steps block the main loop for as
/// long as their own timeouts allow: a hook up to the renewal interval, a unit's start up to
/// three stop timeouts, a stop up to a stop timeout and the SIGKILL's wait. With the defaults
/// that can pass the unit's `WatchdogSec=30s`, and systemd aborted the agent in the middle of
/// a takeover or a release. Here the watchdog is 2 s and `on_acquire` takes 3 s: no gap
/// between the agent's pings may reach 2 s.
#[test]
fn issue10_the_watchdog_hears_from_the_agent_while_a_hook_runs() {
    use std::os::unix::net::UnixDatagram;
    const WATCHDOG_MS: u64 = 2000;
    let done = |fx: &Fixture| fx.path("hook.done");
    let mut p = Pair::with_node(
        4000,
        12_000,
        |fx, _| {
            format!(
                "on_acquire = [\"/bin/sh\", \"-c\", \"sleep 3; touch {}\"]\n",
                done(fx).display()
            )
        },
        |_, _| String::new(),
    );
    let sock_path = p.fx.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    p.set_env("NOTIFY_SOCKET", sock_path.to_str().unwrap());
    p.set_env("WATCHDOG_USEC", &(WATCHDOG_MS * 1000).to_string());
    p.start("a");
    let started = Instant::now();
    let mut pings = Vec::new();
    let mut ended = None;
    let mut buf = [0u8; 4096];
    while started.elapsed() < Duration::from_secs(20)
        && ended.is_none_or(|e: Instant| e.elapsed() < Duration::from_secs(1))
    {
        if let Ok(n) = sock.recv(&mut buf) {
            if buf[..n].split(|&b| b == b'\n').any(|l| l == b"WATCHDOG=1") {
                pings.push(Instant::now());
            }
        }
        if ended.is_none() && done(&p.fx).exists() {
            ended = Some(Instant::now());
        }
    }
    assert!(ended.is_some(), "the hook never ended\n{}", p.stderr_of());
    let longest = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(Duration::MAX);
    assert!(
        pings.len() >= 3 && longest < Duration::from_millis(WATCHDOG_MS),
        "{} pings, the longest gap {longest:?} (systemd aborts after {WATCHDOG_MS} ms)\n{}",
        pings.len(),
        p.stderr_of()
    );
}

/// A systemd unit whose stop outlasts `stop_timeout_ms` (systemd's own `TimeoutStopSec` is
/// 90 s by default, and its stop goes on after our `systemctl` is gone): the agent kills the
/// unit (`systemctl kill --signal=SIGKILL`) and waits until it is down before the lease is
/// given up. It gave the lease up with the unit still stopping, and the other VM started its
/// node beside it.
#[test]
fn issue3_a_unit_still_stopping_is_killed_before_the_lease_is_released() {
    let mut p = Pair::new();
    let active = p.fx.path("corda.active");
    with_fake_unit(
        &mut p,
        "a",
        &format!(
            "case \"$1\" in\n  start) touch {active} ;;\n  stop) (sleep 15; rm -f {active}) & sleep 15 ;;\n  kill) rm -f {active} ;;\n  is-active) if [ -e {active} ]; then echo active; else echo inactive; exit 3; fi ;;\nesac",
            active = active.display()
        ),
        "",
    );
    p.start("a");
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 3), || p.role("a") == "hot"),
        "{}",
        p.stderr_of()
    );
    assert!(active.exists());
    p.start("b");
    assert!(wait_until(Duration::from_secs(5), || p.role("b") == "cold"));
    let cfg_a = p.config("a");
    let release = thread::spawn(move || artemis_sync(&cfg_a, ["release"]));
    let started = Instant::now();
    let b_hot = wait_until(Duration::from_secs(12), || p.role("b") == "hot");
    let a_unit_active = active.exists();
    eprintln!(
        "b hot: {b_hot} after {:?}; a's unit still active then: {a_unit_active}",
        started.elapsed()
    );
    let _ = release.join();
    assert!(
        !(b_hot && a_unit_active),
        "b took over while a's node (unit) was still active:\n{}",
        p.stderr_of()
    );
}

/// A unit still `deactivating` after its SIGKILL (processes stuck in the kernel, or a slow
/// `ExecStopPost=`): `systemctl is-active` exits non-zero for it as for a stopped unit, and
/// the agent took that for down and gave the lease up while the unit's processes ran. It now
/// reads the state `is-active` prints and waits (up to 5 s) for the unit to be down.
#[test]
fn issue3_a_unit_still_deactivating_is_not_taken_for_stopped() {
    let mut p = Pair::new();
    let state = p.fx.path("corda.state");
    with_fake_unit(
        &mut p,
        "a",
        &format!(
            "case \"$1\" in\n  start) echo active > {state} ;;\n  stop) echo deactivating > {state}; (sleep 3; echo inactive > {state}) & sleep 15 ;;\n  kill) ;;\n  is-active) s=$(cat {state} 2>/dev/null || echo inactive); echo \"$s\"; [ \"$s\" = active ] ;;\nesac",
            state = state.display()
        ),
        "",
    );
    p.start_a_hot_then_b_cold();
    let cfg_a = p.config("a");
    let release = thread::spawn(move || artemis_sync(&cfg_a, ["release"]));
    let b_hot = wait_until(Duration::from_secs(12), || p.role("b") == "hot");
    let a_state = fs::read_to_string(&state).unwrap();
    let _ = release.join();
    assert!(b_hot, "{}", p.stderr_of());
    assert_eq!(
        a_state.trim(),
        "inactive",
        "b took over while a's unit was still deactivating:\n{}",
        p.stderr_of()
    );
}

/// A node whose first process exits by itself (a wrapper that started the JVM without `exec`,
/// killed by the OOM killer): the rest of its process group is killed before the watchdog
/// restarts it or gives the lease up. It ran on, and the other VM started its node beside it.
#[test]
fn issue14_the_leftovers_of_a_node_that_exited_are_killed_before_the_lease_is_given_up() {
    let fx_pid =
        std::env::temp_dir().join(format!("artemis-sync-grandchild-{}", std::process::id()));
    let _ = fs::remove_file(&fx_pid);
    let pidfile = fx_pid.clone();
    let mut p = Pair::with_node(
        UPDATE_MS,
        WAIT_MS,
        move |fx, name| {
            if name == "a" {
                let script = write_script(
                    &fx.path("wrapper.sh"),
                    &format!("sleep 300 &\necho $! > {}\nwait", pidfile.display()),
                );
                format!(
                    "command = [{}]\nmax_local_restarts = 0\n",
                    toml_path(&script)
                )
            } else {
                String::new()
            }
        },
        |_, _| String::new(),
    );
    p.start_a_hot_then_b_cold();
    assert!(wait_until(Duration::from_secs(5), || fs::read_to_string(
        &fx_pid
    )
    .is_ok_and(|s| !s.trim().is_empty())));
    let grandchild: u32 = fs::read_to_string(&fx_pid).unwrap().trim().parse().unwrap();
    let wrapper = u32::try_from(p.status("a")["node_pid"].as_u64().expect("node pid")).unwrap();
    // the wrapper dies (OOM killer, a bug in it); the JVM it started runs on
    kill(pid_t(wrapper), libc::SIGKILL);
    let b_hot = wait_until(Duration::from_millis(WAIT_MS * 3), || p.role("b") == "hot");
    let survivor = alive(grandchild);
    kill(pid_t(grandchild), libc::SIGKILL);
    let _ = fs::remove_file(&fx_pid);
    assert!(b_hot, "{}", p.stderr_of());
    assert!(
        !survivor,
        "b is hot while a process of a's node (pid {grandchild}) still runs:\n{}",
        p.stderr_of()
    );
}

/// Makes agent `name` run its node as `corda.service` through the fake `systemctl` `script`,
/// with the `[node]` lines `more` after it.
pub(crate) fn with_fake_unit(p: &mut Pair, name: &str, script: &str, more: &str) {
    let fake = write_script(&p.fx.path("systemctl"), script);
    p.env.push(("ARTEMIS_SYNC_SYSTEMCTL".into(), fake));
    let cfg = p.config(name);
    let text = fs::read_to_string(&cfg)
        .unwrap()
        .lines()
        .map(|l| {
            if l.starts_with("command = ") {
                format!("systemd_unit = \"corda.service\"\n{more}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(&cfg, text).unwrap();
}

/// A unit whose `systemctl start` outlasts the agent's limit: systemd's start job goes on
/// after our `systemctl` is killed, and the unit turns active a second later. The agent gave
/// the lease up without cancelling the job, and the unit ran beside the other VM's node.
#[test]
fn a_unit_whose_start_times_out_is_stopped_before_the_lease_is_given_up() {
    let mut p = Pair::new();
    let (pending, active) = (p.fx.path("corda.pending"), p.fx.path("corda.active"));
    with_fake_unit(
        &mut p,
        "a",
        &format!(
            "case \"$1\" in\n  start) touch {pending}; (sleep 4; [ -e {pending} ] && touch {active}) & sleep 30 ;;\n  stop|kill) rm -f {pending} {active} ;;\n  is-active) if [ -e {active} ]; then echo active; else echo inactive; exit 3; fi ;;\nesac",
            pending = pending.display(),
            active = active.display()
        ),
        // no local restarts: the first failure gives the lease up
        "max_local_restarts = 0",
    );
    p.start("a");
    assert!(wait_until(Duration::from_secs(5), || pending.exists()));
    p.start("b");
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 4), || p.role("b") == "hot"),
        "{}",
        p.stderr_of()
    );
    // the start job's moment to turn the unit active comes and goes
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        assert!(
            !active.exists(),
            "a's unit is active while b is hot:\n{}",
            p.stderr_of()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        p.stderr_of().contains("did not finish"),
        "{}",
        p.stderr_of()
    );
}

/// A unit whose main process exited while the rest of its cgroup still runs (`deactivating`:
/// systemd's SIGTERM to the leftovers, up to `TimeoutStopSec`): `is-active` already says not
/// active. The agent gave the lease up at once, and the other VM's node ran beside the
/// leftovers; now it stops the unit first.
#[test]
fn a_unit_that_stopped_by_itself_is_stopped_before_the_lease_is_given_up() {
    let mut p = Pair::new();
    let (leftover, active) = (p.fx.path("corda.leftover"), p.fx.path("corda.active"));
    with_fake_unit(
        &mut p,
        "a",
        &format!(
            "case \"$1\" in\n  start) touch {active} ;;\n  stop|kill) rm -f {active} {leftover} ;;\n  is-active) if [ -e {active} ]; then echo active; else echo inactive; exit 3; fi ;;\nesac",
            leftover = leftover.display(),
            active = active.display()
        ),
        // no local restarts: the first failure gives the lease up
        "max_local_restarts = 0",
    );
    p.start_a_hot_then_b_cold();
    // the main process exits; the leftovers run on while the unit is deactivating
    fs::write(&leftover, "").unwrap();
    fs::remove_file(&active).unwrap();
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 4), || p.role("b") == "hot"),
        "{}",
        p.stderr_of()
    );
    assert!(
        !leftover.exists(),
        "b is hot while a's unit was never stopped:\n{}",
        p.stderr_of()
    );
}
