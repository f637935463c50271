//! Issue 13: automatic failover in replicated mode, with the lease in a real PostgreSQL
//! database (`pg.rs`) as the witness. Two real agents, FUSE capture with durable acks, each
//! running a node script that appends numbered records through `${BASE_DIR}/artemis` (the
//! mount) with `dd conv=fdatasync` and logs every record whose sync returned. Faults are
//! provoked for real: kill -9 of the hot agent, SIGSTOP of the hot agent and its node, the
//! database stopped and restarted, the database cut from one agent (a proxy), the two agents
//! cut from each other (a proxy on the stream). Each test asserts who runs the node and that
//! no record whose sync returned is missing from the copy of the VM that runs it next.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::agent::{alive, kill, pid_t, wait_until};
use crate::faultfs::FaultFs;
use crate::pg::{CutProxy, PgCluster};
use crate::replication::Pair;
use crate::util::{artemis_sync, require_root, toml_path, write_script, Fixture, MountGuard};

/// Renewal period of the test agents.
const UPDATE_MS: u64 = 500;
/// Takeover delay of the test agents.
pub(crate) const WAIT_MS: u64 = 3000;
/// SIGTERM-to-SIGKILL time of the test nodes.
const STOP_MS: u64 = 300;
/// A durable sync's wait for the peer before it degrades.
const PEER_TIMEOUT_MS: u64 = 1000;
/// What the issue allows between the hot's death and the cold's node: wait + 2 s.
const TAKEOVER_LIMIT: Duration = Duration::from_millis(WAIT_MS + 2000);
/// Records a node writes at most (its loop is bounded).
const MAX_RECORDS: usize = 100_000;

/// The database, a pair of replicated agents leasing in it, and the node logs.
pub(crate) struct Duo {
    pub(crate) pg: PgCluster,
    pub(crate) p: Pair,
    /// Node starts and stops: `start <side> <epoch> <ns> <pid>` / `stop <side> <ns> <pid>`.
    events: PathBuf,
    /// Records whose sync returned: `<side> <pid> <index>`.
    records: PathBuf,
    /// A line per node that started while another held the nodes' shared lock.
    pub(crate) violations: PathBuf,
    _guards: [MountGuard; 2],
}

/// What a [`Duo`] is made with besides its database and pair.
pub(crate) struct DuoSpec<'a> {
    /// The `ack = ...` line of `[replication]`.
    pub(crate) ack: &'a str,
    /// Lines at the end of `[lease]`.
    pub(crate) lease: &'a str,
    /// Every this many records the node also writes 1 MiB of random bytes to one of
    /// [`BULK_FILES`] page files with fdatasync (0: never).
    pub(crate) bulk_every: usize,
}

/// Page files a node with bulk writes rotates over.
const BULK_FILES: usize = 4;

/// The node: takes the lock shared by both VMs' nodes (`flock -n`; a line in `violations`
/// if another node holds it: two nodes at once), logs its start, appends numbered 9-byte
/// records to `rec.<pid>` through `$2/artemis` with `dd conv=fdatasync` and logs each whose
/// sync returned to `records` (outside the mount); every `bulk_every` records also 1 MiB of
/// page data. Neither `dd` nor `sleep` inherits the lock's descriptor, so that the lock goes
/// with the node. Bounded: at most [`MAX_RECORDS`] records.
fn write_node_script(
    fx: &Fixture,
    events: &Path,
    records: &Path,
    violations: &Path,
    bulk_every: usize,
) -> PathBuf {
    let bulk = if bulk_every == 0 {
        String::new()
    } else {
        format!(
            "if [ $((i % {bulk_every})) -eq 0 ]; then \
             dd if=/dev/urandom of=\"$2/artemis/page.$$.$((i / {bulk_every} % {BULK_FILES}))\" \
             bs=1M count=1 conv=fdatasync status=none 9>&- 2>/dev/null; fi\n"
        )
    };
    write_script(
        &fx.path("node.sh"),
        &format!(
            "trap 'echo \"stop $1 $(date +%s%N) $$\" >> {ev}; exit 0' TERM\n\
             exec 9>>{lock}\n\
             flock -n -x 9 || echo \"$1 $$ $(date +%s%N)\" >> {viol}\n\
             echo \"start $1 $ARTEMIS_SYNC_EPOCH $(date +%s%N) $$\" >> {ev}\n\
             i=0\n\
             while [ $i -lt {MAX_RECORDS} ]; do\n\
               if printf '%08d\\n' $i | dd of=\"$2/artemis/rec.$$\" bs=9 seek=$i conv=notrunc,fdatasync status=none 9>&- 2>/dev/null; then\n\
                 echo \"$1 $$ $i\" >> {rec}\n\
                 {bulk}\
                 i=$((i+1))\n\
               else\n\
                 sleep 0.05 9>&- & wait $!\n\
               fi\n\
             done\n\
             while :; do sleep 0.05 9>&- & wait $!; done",
            ev = events.display(),
            rec = records.display(),
            lock = fx.path("node.lock").display(),
            viol = violations.display(),
        ),
    )
}

/// What `[replication]` gets besides the FUSE lines and the ack level.
const REPLICATION: &str = "rescan_interval_ms = 600000\ndeep_rescan_interval_ms = 600000\n\
                           capture = \"fuse\"";

impl Duo {
    /// `proxy_of(side)`: the database port that side's DSN names (a proxy, or the database's).
    /// `hot_peer`: where the initially hot side connects to stream (a proxy), if not direct.
    fn start(
        test: &str,
        proxy_of: &dyn Fn(&str, u16) -> u16,
        hot_peer: Option<u16>,
    ) -> Option<Duo> {
        Duo::start_with(test, "ack = \"durable\"", "", proxy_of, hot_peer)
    }

    /// As [`Duo::start`], with `ack` in `[replication]` and `lease` at the end of `[lease]`.
    fn start_with(
        test: &str,
        ack: &str,
        lease: &str,
        proxy_of: &dyn Fn(&str, u16) -> u16,
        hot_peer: Option<u16>,
    ) -> Option<Duo> {
        if !require_root(test, "FUSE mounts") {
            return None;
        }
        let pg = PgCluster::start(test)?;
        let spec = DuoSpec {
            ack,
            lease,
            bulk_every: 0,
        };
        Some(Duo::build(
            pg,
            Fixture::new(),
            &spec,
            &|side, port| format!("host=127.0.0.1 port={}", proxy_of(side, port)),
            |fx, extra| Pair::new_in("psk", hot_peer, fx, extra),
        ))
    }

    /// The duo in `fx` leasing in `pg`: `dsn_of(side, port)` is the host and port part of
    /// that side's DSN (`port`: the database's), `pair_of(fx, extra)` makes the pair with
    /// `extra` as the `[replication]` section's last lines.
    pub(crate) fn build(
        pg: PgCluster,
        fx: Fixture,
        spec: &DuoSpec,
        dsn_of: &dyn Fn(&str, u16) -> String,
        pair_of: impl FnOnce(Fixture, &str) -> Pair,
    ) -> Duo {
        let events = fx.path("node-events.log");
        let records = fx.path("records.log");
        let violations = fx.path("violations.log");
        let node = write_node_script(&fx, &events, &records, &violations, spec.bulk_every);
        let extra = format!(
            "{REPLICATION}\n{}\npeer_timeout_ms = {PEER_TIMEOUT_MS}\nmount_point = __MNT__",
            spec.ack
        );
        let p = pair_of(fx, &extra);
        for (name, cfg) in [("hot", &p.hot.config), ("cold", &p.cold.config)] {
            let dsn = p.fx.path(&format!("{name}.dsn"));
            PgCluster::write_dsn_with(&dsn, &dsn_of(name, pg.port));
            let base = p.fx.path(&format!("{name}/base"));
            let text = fs::read_to_string(cfg)
                .unwrap()
                .replace("__MNT__", &toml_path(&p.fx.path(&format!("{name}/mnt"))))
                .replacen(
                    "[node]\n",
                    &format!(
                        "[node]\ncommand = [{}, \"{name}\", {}]\nstop_timeout_ms = {STOP_MS}\n",
                        toml_path(&node),
                        toml_path(&base)
                    ),
                    1,
                )
                .replacen(
                    "[lock]\n",
                    &format!(
                        "[lock]\nupdate_interval_ms = {UPDATE_MS}\nwait_interval_ms = {WAIT_MS}\n"
                    ),
                    1,
                );
            fs::write(
                cfg,
                format!(
                    "{text}\n[lease]\nbackend = \"postgres\"\ndsn_file = {}\npair = \"corda-repl\"\n{}\n",
                    toml_path(&dsn),
                    spec.lease
                ),
            )
            .unwrap();
        }
        artemis_sync(&p.hot.config, ["lease", "init"]).code(0);
        let guards = [
            MountGuard::new(&p.fx.path("hot/mnt")),
            MountGuard::new(&p.fx.path("cold/mnt")),
        ];
        Duo {
            pg,
            p,
            events,
            records,
            violations,
            _guards: guards,
        }
    }

    pub(crate) fn direct(test: &str) -> Option<Duo> {
        Duo::start(test, &|_, port| port, None)
    }

    /// Makes the initially hot side stream through `proxy` (rewrites its `peer`).
    fn stream_via(&self, proxy: &CutProxy) {
        let text = fs::read_to_string(&self.p.hot.config).unwrap().replace(
            &format!("peer = \"127.0.0.1:{}\"", self.p.cold.port),
            &format!("peer = \"127.0.0.1:{}\"", proxy.port),
        );
        fs::write(&self.p.hot.config, text).unwrap();
    }

    pub(crate) fn role(&self, side: &str) -> String {
        self.p.status(side)["role"]
            .as_str()
            .unwrap_or("down")
            .to_owned()
    }

    pub(crate) fn epoch(&self, side: &str) -> Option<u64> {
        self.p.status(side)["epoch"].as_u64()
    }

    pub(crate) fn node_pid(&self, side: &str) -> Option<u32> {
        self.p.status(side)["node_pid"]
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
    }

    pub(crate) fn agent_pid(&self, side: &str) -> libc::pid_t {
        let s = if side == "hot" {
            &self.p.hot
        } else {
            &self.p.cold
        };
        pid_t(s.child.as_ref().expect("running").id())
    }

    pub(crate) fn data(&self, side: &str) -> &Path {
        if side == "hot" {
            &self.p.hot.data
        } else {
            &self.p.cold.data
        }
    }

    /// Node starts, in order: (side, epoch, pid).
    pub(crate) fn starts(&self) -> Vec<(String, Option<u64>, u32)> {
        fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f.as_slice() {
                    ["start", side, epoch, _, pid] => {
                        Some((side.to_string(), epoch.parse().ok(), pid.parse().ok()?))
                    }
                    _ => None,
                }
            })
            .collect()
    }

    /// Records whose sync returned: (pid, index).
    pub(crate) fn synced(&self) -> Vec<(u32, usize)> {
        fs::read_to_string(&self.records)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f.as_slice() {
                    [_, pid, i] => Some((pid.parse().ok()?, i.parse().ok()?)),
                    _ => None,
                }
            })
            .collect()
    }

    /// The synced records missing from `side`'s copy.
    pub(crate) fn missing_on(&self, side: &str) -> Vec<(u32, usize)> {
        let mut files = std::collections::HashMap::new();
        self.synced()
            .into_iter()
            .filter(|(pid, i)| {
                let data = files.entry(*pid).or_insert_with(|| {
                    fs::read(self.data(side).join(format!("rec.{pid}"))).unwrap_or_default()
                });
                let slot = data.get(i * 9..i * 9 + 9);
                slot != Some(format!("{i:08}\n").as_bytes())
            })
            .collect()
    }

    /// Waits until `side` runs its node and has written a few records since.
    pub(crate) fn wait_node_writing(&self, side: &str, limit: Duration) -> u32 {
        let mut pid = None;
        assert!(
            wait_until(limit, || {
                pid = self.node_pid(side);
                pid.is_some_and(|n| self.synced().iter().filter(|(p, _)| *p == n).count() >= 5)
            }),
            "{side} does not run a writing node\n{}",
            self.p.logs()
        );
        pid.unwrap()
    }

    /// Starts the initially hot side, waits for its node, then the cold one, in sync.
    pub(crate) fn hot_then_cold(&mut self) -> u32 {
        self.p.start("hot");
        let node = self.wait_node_writing("hot", Duration::from_millis(WAIT_MS * 3));
        self.p.start("cold");
        self.wait_in_sync("cold");
        node
    }

    /// Waits until `cold` reads in the row that its copy is in sync.
    pub(crate) fn wait_in_sync(&self, cold: &str) {
        assert!(
            wait_until(Duration::from_secs(30), || self.p.status(cold)["lease"]
                ["cold_lag_ms"]
                == 0),
            "the cold copy never reported in sync\n{}\n{}",
            self.p.status(cold),
            self.p.logs()
        );
    }

    /// Waits until `side` runs its node, at most the issue's takeover limit (plus slack for
    /// the report); returns how long after `since` it was seen, checked against the limit.
    #[track_caller]
    pub(crate) fn wait_runs_node(&self, side: &str, since: Instant) -> Duration {
        let mut took = Duration::ZERO;
        assert!(
            wait_until(TAKEOVER_LIMIT + Duration::from_secs(3), || {
                took = since.elapsed();
                self.node_pid(side).is_some()
            }),
            "{side} never ran the node\n{}",
            self.p.logs()
        );
        assert!(
            took <= TAKEOVER_LIMIT,
            "{side}'s node started {took:?} after the fault"
        );
        took
    }

    /// kill -9 of `hot`'s agent: its node dies with it, `cold` runs the node within the limit
    /// under the next epoch, and every record whose sync returned is in `cold`'s copy.
    fn kill9_and_fail_over(&mut self, hot: &str, cold: &str) -> Duration {
        let epoch = self.epoch(hot).expect("hot has an epoch");
        let node = self.node_pid(hot).expect("hot runs its node");
        let starts_before = self.starts().len();
        let killed = Instant::now();
        self.p.kill9(hot);
        assert!(
            wait_until(Duration::from_secs(2), || !alive(node)),
            "node {node} survived its agent's kill -9"
        );
        assert_eq!(
            self.starts().len(),
            starts_before,
            "a node started before the old one was dead"
        );
        let took = self.wait_runs_node(cold, killed);
        assert_eq!(self.epoch(cold), Some(epoch + 1), "epochs are consecutive");
        let missing = self.missing_on(cold);
        assert!(
            missing.is_empty(),
            "synced records missing on {cold}: {missing:?}"
        );
        took
    }
}

impl Drop for Duo {
    fn drop(&mut self) {
        for s in [&mut self.p.hot, &mut self.p.cold] {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

#[test]
fn issue13_replicated_kill9_of_the_hot_the_cold_runs_the_node_with_every_synced_record() {
    let Some(mut d) = Duo::direct("issue13_repl_kill9") else {
        return;
    };
    d.hot_then_cold();
    let took = d.kill9_and_fail_over("hot", "cold");
    eprintln!(
        "issue13 replicated kill -9: the cold node ran {took:?} after the kill (wait {WAIT_MS} ms), {} synced records, none missing",
        d.synced().len()
    );
    // the old hot restarts, sees the newer epoch in the database, and turns cold
    d.p.start("hot");
    assert!(
        wait_until(Duration::from_secs(15), || d.role("hot") == "cold"),
        "{}",
        d.p.logs()
    );
    assert!(d.node_pid("hot").is_none());
    d.wait_in_sync("hot");
    // verify on the new hot keeps its lease renewed while it compares (its node stays up)
    let node = d.node_pid("cold");
    artemis_sync(&d.p.cold.config, ["verify"]).code(0);
    assert_eq!(d.node_pid("cold"), node);
}

#[test]
fn issue13_replicated_twenty_alternating_failovers_one_node_at_a_time_nothing_lost() {
    const CYCLES: usize = 20;
    let Some(mut d) = Duo::direct("issue13_repl_cycles") else {
        return;
    };
    d.hot_then_cold();
    let first = d.epoch("hot").unwrap();
    let mut took = Vec::new();
    let (mut hot, mut cold) = ("hot", "cold");
    for cycle in 0..CYCLES {
        took.push(d.kill9_and_fail_over(hot, cold));
        d.p.start(hot);
        assert!(
            wait_until(Duration::from_secs(15), || d.role(hot) == "cold"),
            "cycle {cycle}: the old hot did not turn cold\n{}",
            d.p.logs()
        );
        d.wait_node_writing(cold, Duration::from_secs(10));
        d.wait_in_sync(hot);
        std::mem::swap(&mut hot, &mut cold);
    }
    let epochs: Vec<_> = d.starts().iter().map(|s| s.1.unwrap()).collect();
    let want: Vec<_> = (first..=first + u64::try_from(CYCLES).unwrap()).collect();
    assert_eq!(epochs, want, "one node start per epoch, consecutive");
    took.sort();
    eprintln!(
        "issue13 replicated: {CYCLES} alternating kill -9 failovers, takeover median {:?} max {:?}, {} synced records, none lost",
        took[CYCLES / 2],
        took[CYCLES - 1],
        d.synced().len()
    );
}

#[test]
fn issue13_replicated_a_frozen_hot_is_replaced_and_on_waking_fences_and_turns_cold() {
    let Some(mut d) = Duo::direct("issue13_repl_sigstop") else {
        return;
    };
    let node = d.hot_then_cold();
    let agent = d.agent_pid("hot");
    kill(agent, libc::SIGSTOP);
    kill(-pid_t(node), libc::SIGSTOP);
    let took = d.wait_runs_node("cold", Instant::now());
    let epoch = d.epoch("cold").unwrap();
    kill(-pid_t(node), libc::SIGCONT);
    kill(agent, libc::SIGCONT);
    // on waking it is past its fence deadline: the node goes, and the newer epoch turns it cold
    assert!(
        wait_until(Duration::from_secs(5), || !alive(node)),
        "the woken hot's node still runs"
    );
    assert!(
        wait_until(Duration::from_secs(15), || d.role("hot") == "cold"),
        "{}",
        d.p.logs()
    );
    assert_eq!(d.epoch("hot"), Some(epoch));
    assert!(
        d.node_pid("cold").is_some(),
        "the new hot still runs its node"
    );
    d.wait_in_sync("hot");
    let missing = d.missing_on("cold");
    assert!(missing.is_empty(), "synced records missing: {missing:?}");
    eprintln!("issue13 replicated SIGSTOP: the cold node ran {took:?} after the freeze");
}

#[test]
fn issue13_replicated_a_database_restart_within_the_wait_fails_nobody_over() {
    let Some(mut d) = Duo::direct("issue13_repl_db_restart") else {
        return;
    };
    let node = d.hot_then_cold();
    let epoch = d.epoch("hot");
    let before = d.synced().len();
    let down = Instant::now();
    d.pg.stop();
    std::thread::sleep(Duration::from_millis(WAIT_MS / 4));
    d.pg.restart();
    let outage = down.elapsed();
    std::thread::sleep(Duration::from_millis(WAIT_MS + 1000));
    assert!(alive(node), "the hot's node was stopped\n{}", d.p.logs());
    assert_eq!(d.node_pid("hot"), Some(node));
    assert!(d.node_pid("cold").is_none(), "the cold side ran a node");
    assert_eq!(d.epoch("hot"), epoch);
    assert!(d.synced().len() > before, "the node kept writing");
    assert_eq!(d.role("cold"), "cold");
    d.wait_in_sync("cold");
    let missing = d.missing_on("hot");
    assert!(missing.is_empty(), "synced records missing: {missing:?}");
    eprintln!("issue13 replicated database restart: down {outage:?}, nobody failed over");
}

#[test]
fn issue13_replicated_the_hot_cut_from_the_database_fences_and_the_cold_takes_over() {
    let proxy = std::sync::OnceLock::new();
    let Some(mut d) = Duo::start(
        "issue13_repl_db_cut",
        &|side, port| {
            if side == "hot" {
                proxy.get_or_init(|| CutProxy::start(port)).port
            } else {
                port
            }
        },
        None,
    ) else {
        return;
    };
    let node = d.hot_then_cold();
    let cut = Instant::now();
    proxy.get().unwrap().set_cut(true);
    // fenced on its own clock, before the cold side may take over
    assert!(
        wait_until(Duration::from_millis(WAIT_MS), || !alive(node)),
        "the hot cut from the database still runs its node\n{}",
        d.p.logs()
    );
    let fenced = cut.elapsed();
    assert!(
        d.node_pid("cold").is_none(),
        "the cold side ran its node before the hot was fenced"
    );
    let took = d.wait_runs_node("cold", cut);
    let missing = d.missing_on("cold");
    assert!(missing.is_empty(), "synced records missing: {missing:?}");
    proxy.get().unwrap().set_cut(false);
    assert!(
        wait_until(Duration::from_secs(15), || d.role("hot") == "cold"),
        "{}",
        d.p.logs()
    );
    assert!(d.node_pid("hot").is_none());
    eprintln!("issue13 replicated, hot cut from the database: fenced after {fenced:?}, the cold node ran after {took:?}");
}

#[test]
fn issue13_replicated_hot_and_cold_cut_apart_the_hot_degrades_and_the_cold_never_takes_over_alone()
{
    let Some(mut d) = Duo::direct("issue13_repl_partition") else {
        return;
    };
    let proxy = CutProxy::start(d.p.cold.port);
    d.stream_via(&proxy);
    let node = d.hot_then_cold();
    proxy.set_cut(true);
    // the hot keeps the lease and its node, degrades, and says so in the row first
    assert!(
        wait_until(Duration::from_secs(10), || d.p.status("cold")["lease"]
            ["cold_lag_ms"]
            .is_null()
            && d.p.status("hot").get("degraded").is_some()),
        "{}\n{}",
        d.p.status("cold"),
        d.p.logs()
    );
    std::thread::sleep(Duration::from_millis(WAIT_MS + 1000));
    assert!(alive(node), "the hot was stopped by a cut from its peer");
    assert!(d.node_pid("cold").is_none(), "the cold side took over");
    let after_degrade = d.synced().len();
    // the hot dies while degraded: the cold copy may lack confirmed records, so it waits
    d.p.kill9("hot");
    std::thread::sleep(TAKEOVER_LIMIT + Duration::from_secs(1));
    assert!(
        d.node_pid("cold").is_none(),
        "the cold side took over with an incomplete copy\n{}",
        d.p.logs()
    );
    let why = d.p.status("cold")["lease"]["not_taking_over"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(why.contains("unknown amount"), "{}", d.p.status("cold"));
    // the operator decides
    artemis_sync(&d.p.cold.config, ["promote", "--force"]).code(0);
    assert!(d.node_pid("cold").is_some(), "{}", d.p.logs());
    eprintln!(
        "issue13 replicated partition: {after_degrade} records synced, the hot degraded; the cold waited for promote --force"
    );
}

#[test]
fn issue13_replicated_demote_hands_the_lease_over_without_the_wait() {
    let Some(mut d) = Duo::direct("issue13_repl_demote") else {
        return;
    };
    let node = d.hot_then_cold();
    let epoch = d.epoch("hot").unwrap();
    let asked = Instant::now();
    artemis_sync(&d.p.hot.config, ["demote"]).code(0);
    assert!(!alive(node), "demote stopped the node");
    assert!(
        wait_until(Duration::from_millis(WAIT_MS), || d
            .node_pid("cold")
            .is_some()),
        "{}",
        d.p.logs()
    );
    let took = asked.elapsed();
    assert!(
        took < Duration::from_millis(WAIT_MS / 2),
        "the hand-over took {took:?}"
    );
    assert_eq!(d.epoch("cold"), Some(epoch + 1));
    assert_eq!(d.role("hot"), "cold");
    let missing = d.missing_on("cold");
    assert!(missing.is_empty(), "synced records missing: {missing:?}");
    // and back with `release`, the same planned hand-over under the shared mode's name
    d.wait_in_sync("hot");
    let node = d.node_pid("cold").unwrap();
    let asked = Instant::now();
    artemis_sync(&d.p.cold.config, ["release"]).code(0);
    assert!(!alive(node), "release stopped the node");
    assert!(
        wait_until(Duration::from_millis(WAIT_MS), || d
            .node_pid("hot")
            .is_some()),
        "{}",
        d.p.logs()
    );
    let back = asked.elapsed();
    assert_eq!(d.epoch("hot"), Some(epoch + 2));
    let missing = d.missing_on("hot");
    assert!(missing.is_empty(), "synced records missing: {missing:?}");
    eprintln!("issue13 replicated demote: the cold node ran {took:?} after the request; release handed it back in {back:?}");
}

#[test]
fn issue13_replicated_async_acks_fail_over_within_max_failover_lag() {
    let Some(mut d) = Duo::start_with(
        "issue13_repl_async",
        "ack = \"async\"",
        "max_failover_lag_ms = 2000",
        &|_, port| port,
        None,
    ) else {
        return;
    };
    d.hot_then_cold();
    let node = d.node_pid("hot").unwrap();
    let killed = Instant::now();
    d.p.kill9("hot");
    assert!(wait_until(Duration::from_secs(2), || !alive(node)));
    let took = d.wait_runs_node("cold", killed);
    // async: what the old hot confirmed in its last lag window may be missing, no more
    let synced = d.synced();
    let missing = d.missing_on("cold");
    let last = synced.iter().map(|r| r.1).max().unwrap_or(0);
    assert!(
        missing.iter().all(|(_, i)| last - i < 200),
        "records missing from before the lag window: {missing:?}"
    );
    eprintln!(
        "issue13 replicated async: the cold node ran {took:?} after the kill; {} of {} synced records missing (RPO of async acks)",
        missing.len(),
        synced.len()
    );
}

/// CPU time (user + system) of `pid` in clock ticks, from /proc/pid/stat.
fn cpu_ticks(pid: libc::pid_t) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // fields 14 and 15 (utime, stime): indices 11 and 12 after the state field
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Regression: the lease fences the node while the agent waits on a `verify`
/// (`run_lease_until`): the wait's node-exit receiver, taken once before the loop, belonged to
/// the node just stopped, whose channel was then disconnected; `select!` found it ready at
/// every turn and the agent spun on a core until the verify gave up (5 minutes).
#[test]
fn a_fence_during_a_verify_does_not_spin_the_agent() {
    let Some(mut d) = Duo::direct("a_fence_during_a_verify_does_not_spin_the_agent") else {
        return;
    };
    let node = d.hot_then_cold();
    d.p.signal("cold", libc::SIGSTOP);
    let config = d.p.hot.config.clone();
    let _verify = std::thread::spawn(move || artemis_sync(&config, ["verify"]));
    std::thread::sleep(Duration::from_secs(1)); // the verify waits for the cold side's digest
    d.pg.stop();
    assert!(
        wait_until(Duration::from_millis(WAIT_MS * 2), || !alive(node)),
        "the hot cut from the database still runs its node\n{}",
        d.p.logs()
    );
    std::thread::sleep(Duration::from_millis(500));
    let hot = d.agent_pid("hot");
    let before = cpu_ticks(hot);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(hot) - before;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap();
    d.p.signal("cold", libc::SIGCONT);
    assert!(
        used * 1000 / hz < 1000,
        "the hot agent used {} ms of CPU in 3 s after its node was fenced during a verify",
        used * 1000 / hz
    );
}

/// How long the test watches the cold VM's takeovers against its stalled disk.
const STALLED_TAKEOVERS: Duration = Duration::from_secs(20);

/// Regression (review of issue 10): a takeover under the lease whose fence timed out (the
/// apply thread held in a batch of the old stream by a stalled disk) gave the lease back, but
/// its state file already said hot; the next takeover skipped the fence, since it fenced only
/// a host that was cold, and started the node while the apply thread could still write into
/// `data_dir`. Every takeover now fences; the node starts once the disk answers again.
#[test]
fn issue10_a_takeover_after_one_whose_fence_timed_out_fences_again() {
    let Some(mut d) = Duo::direct("issue10_a_takeover_after_a_timed_out_fence") else {
        return;
    };
    let faultfs = FaultFs::mount(&d.p.fx.path("cold/backing"), &d.p.cold.data);
    d.hot_then_cold();
    // the cold disk stops answering; a large write through the hot mount reaches the apply
    // thread, which hangs in it (the records of the node may hang in it first)
    faultfs.set_stalling(true);
    let bulk = d.p.fx.path("hot/base/artemis/bulk");
    fs::write(&bulk, vec![0x5a; 4 << 20]).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || faultfs.stalled_calls() > 0),
        "the apply thread never reached the stalled disk\n{}",
        d.p.logs()
    );
    // the hot VM dies; the copy is behind, so only a forced promotion takes the lease
    d.p.kill9("hot");
    let promoted = artemis_sync(&d.p.cold.config, ["promote", "--force"]);
    eprintln!("promote --force against the stalled disk: {promoted}");
    let began = Instant::now();
    while began.elapsed() < STALLED_TAKEOVERS {
        assert!(
            d.node_pid("cold").is_none() && d.starts().iter().all(|(side, _, _)| side != "cold"),
            "the node started while the apply thread could still write\n{}\n{}",
            d.p.status("cold"),
            d.p.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(faultfs.stalled_calls() > 0, "{}", d.p.logs());
    let logs = d.p.logs();
    assert!(
        logs.matches("the apply thread did not finish its batch within")
            .count()
            >= 2,
        "no takeover after the first one that fenced again\n{logs}"
    );
    // (status waits while a takeover's fence does)
    assert!(
        wait_until(Duration::from_secs(15), || d.p.status("cold")
            ["waiting_for"]
            .as_str()
            .is_some_and(|w| w.contains("apply thread"))),
        "{}",
        d.p.status("cold")
    );
    // the disk answers again: the next takeover's fence passes and the node starts
    faultfs.set_stalling(false);
    assert!(
        wait_until(Duration::from_secs(30), || d.node_pid("cold").is_some()),
        "the node did not start once the disk answered\n{}\n{}",
        d.p.status("cold"),
        d.p.logs()
    );
    assert_eq!(d.role("cold"), "hot");
    assert!(d.p.status("cold").get("waiting_for").is_none());
}
