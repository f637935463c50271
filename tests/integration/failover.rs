//! Issue 11, items 3 to 5, with real agents in replicated mode (PSK, loopback), each running a
//! node script that logs its start and stop and, every 50 ms while it runs, whether the other
//! side's node is alive too (`OVERLAP`): at most one node runs, whatever is killed, paused or
//! restarted; an acknowledged batch is on the cold disk; a batch the cold side cannot apply
//! (a name that changed type, a full disk) is resynced, said once, and never loops.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use crate::faultfs::FaultFs;
use crate::replication::{content, cuttable_pair, seed_tree, wait_until, Pair};
use crate::util::{artemis_sync, require_root, toml_path, write_script};

/// How long a node script takes to stop on TERM, at most.
const NODE_STOP_MS: u64 = 2000;

/// Gives both sides of `p` a node script; returns the log both scripts append to.
fn with_nodes(p: &Pair) -> PathBuf {
    let log = p.fx.path("nodes.log");
    let pids = p.fx.mkdir("node-pids");
    let node = write_script(
        &p.fx.path("node.sh"),
        &format!(
            "me=$1; other=$2; pids={pids}; log={log}\n\
             alive() {{ [ -f $pids/$1 ] && p=$(cat $pids/$1) && [ -d /proc/$p ] && ! grep -q '^State:.*Z' /proc/$p/status; }}\n\
             echo $$ > $pids/$me\n\
             trap 'rm -f $pids/$me; echo \"stop $me $(date +%s%N)\" >> $log; exit 0' TERM\n\
             echo \"start $me $ARTEMIS_SYNC_EPOCH $(date +%s%N)\" >> $log\n\
             while :; do\n\
               if alive $other; then echo \"OVERLAP $me $other $(date +%s%N)\" >> $log; fi\n\
               sleep 0.05 & wait $!\n\
             done",
            pids = pids.display(),
            log = log.display()
        ),
    );
    for (side, other) in [(&p.hot, "cold"), (&p.cold, "hot")] {
        let me = if other == "cold" { "hot" } else { "cold" };
        let text = fs::read_to_string(&side.config).unwrap().replacen(
            "[node]\n",
            &format!(
                "[node]\ncommand = [{}, \"{me}\", \"{other}\"]\nstop_timeout_ms = {NODE_STOP_MS}\n",
                toml_path(&node)
            ),
            1,
        );
        fs::write(&side.config, text).unwrap();
    }
    log
}

fn node_log(log: &Path) -> String {
    fs::read_to_string(log).unwrap_or_default()
}

/// How often `name`'s node started.
fn starts(log: &Path, name: &str) -> usize {
    node_log(log)
        .lines()
        .filter(|l| l.starts_with(&format!("start {name} ")))
        .count()
}

#[track_caller]
fn assert_never_two_nodes(p: &Pair, log: &Path) {
    let text = node_log(log);
    assert!(
        !text.contains("OVERLAP"),
        "two nodes ran at once:\n{text}\n{}",
        p.logs()
    );
}

fn running(p: &Pair, name: &str) -> bool {
    p.status(name)["node_state"] == "running"
}

fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("a pid fits a pid_t");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

/// A pair that converged, the hot node running.
fn running_pair() -> (Pair, PathBuf) {
    let mut p = Pair::new("psk", None);
    let log = with_nodes(&p);
    start_converged(&mut p, 2);
    (p, log)
}

/// Starts both sides on a tree of `files` files, waits until they converge and the hot node
/// runs.
fn start_converged(p: &mut Pair, files: usize) {
    seed_tree(&p.hot.data, files);
    p.start("cold");
    p.start("hot");
    p.assert_converges(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(10), || running(p, "hot")),
        "{}",
        p.logs()
    );
}

#[test]
fn issue11_a_restarted_superseded_hot_waits_for_its_peer_and_turns_cold() {
    let (mut p, log) = running_pair();
    // the hot VM dies; the operator forces the cold one up
    p.kill9("hot");
    artemis_sync(&p.cold.config, ["promote", "--force"])
        .code(0)
        .stdout_has(&["hot at epoch 2"]);
    assert!(
        wait_until(Duration::from_secs(10), || running(&p, "cold")),
        "{}",
        p.logs()
    );
    // the new hot's agent stops (its node with it): the old hot comes back cut off
    p.stop("cold");
    assert!(!running(&p, "cold"));
    p.start("hot");
    thread::sleep(Duration::from_secs(3));
    let st = p.status("hot");
    assert_eq!(st["role"], "hot", "{st}");
    assert_ne!(st["node_state"], "running", "{st}\n{}", p.logs());
    assert!(
        st["waiting_for"]
            .as_str()
            .is_some_and(|w| w.contains("confirm") && w.contains("promote --force")),
        "status does not say why the node waits: {st}"
    );
    assert_eq!(starts(&log, "hot"), 1, "{}", node_log(&log));
    assert!(
        p.logs().contains("hot, but the node waits for"),
        "{}",
        p.logs()
    );
    // the peer is back: the old hot learns of epoch 2, records it, turns cold, is resynced
    p.start("cold");
    assert!(
        wait_until(Duration::from_secs(20), || p.status("hot")["role"]
            == "cold"
            && running(&p, "cold")),
        "{}",
        p.logs()
    );
    let state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(p.fx.path("hot/state.json")).unwrap()).unwrap();
    assert_eq!(state["epoch"], 2, "{state}");
    assert_eq!(state["role"], "cold", "{state}");
    fs::write(
        p.cold.data.join("journal/after-failover.amq"),
        vec![5u8; 8192],
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || content(&p.cold.data)
            == content(&p.hot.data)),
        "{}",
        p.logs()
    );
    assert_eq!(starts(&log, "hot"), 1, "{}", node_log(&log));
    assert_never_two_nodes(&p, &log);
}

#[test]
fn issue11_a_paused_hot_is_not_superseded_without_force() {
    let (mut p, log) = running_pair();
    let agent = p.hot.child.as_ref().unwrap().id();
    let node = u32::try_from(p.status("hot")["node_pid"].as_u64().unwrap()).unwrap();
    signal(node, libc::SIGSTOP);
    signal(agent, libc::SIGSTOP);
    thread::sleep(Duration::from_secs(5));
    let refused = artemis_sync(&p.cold.config, ["promote"]);
    refused.code(1).stderr_has(&["promote --force", "demote"]);
    signal(agent, libc::SIGCONT);
    signal(node, libc::SIGCONT);
    assert_eq!(p.status("cold")["role"], "cold");
    assert_eq!(p.status("cold")["epoch"], 1);
    thread::sleep(Duration::from_millis(500));
    assert!(running(&p, "hot"), "{}", p.logs());
    assert_eq!(starts(&log, "cold"), 0, "{}", node_log(&log));
    assert_never_two_nodes(&p, &log);
    // a clean hand-over still works
    p.hand_over("hot", "cold", 2);
    assert!(
        wait_until(Duration::from_secs(10), || running(&p, "cold")),
        "{}",
        p.logs()
    );
    p.kill9("hot");
    assert_never_two_nodes(&p, &log);
}

#[test]
fn issue11_what_the_hot_side_saw_acknowledged_is_on_the_cold_disk_after_kill9() {
    // on one host a kill does not lose the page cache: this proves the ack follows the
    // writes, not the fsyncs (apply.rs's unit test checks those against every change)
    let mut p = Pair::new("psk", None);
    seed_tree(&p.hot.data, 2);
    p.start("cold");
    p.start("hot");
    p.assert_converges(Duration::from_secs(30));
    let j = p.hot.data.join("journal");
    for i in 0..20u8 {
        fs::create_dir_all(j.join(format!("d{i}/e"))).unwrap();
        fs::write(j.join(format!("d{i}/e/f.amq")), vec![i; 5000]).unwrap();
    }
    fs::rename(j.join("d0"), j.join("renamed")).unwrap();
    let synced = || {
        let st = p.status("hot");
        st["synced"] == true && st["last_ack_age_ms"].as_u64().is_some()
    };
    assert!(
        wait_until(Duration::from_secs(20), || synced()
            && content(&p.hot.data) == content(&p.cold.data)),
        "{}",
        p.logs()
    );
    p.kill9("cold");
    assert_eq!(content(&p.hot.data), content(&p.cold.data));
}

#[test]
fn issue11_a_name_that_changed_type_on_the_cold_side_is_resynced_not_resent_for_ever() {
    let mut p = Pair::new("psk", None);
    seed_tree(&p.hot.data, 2);
    // the cold side has a file where the hot side has a directory with files below it: the
    // batch that replaces it cannot pass a check made against the disk before it ran
    fs::create_dir_all(&p.cold.data).unwrap();
    fs::write(p.cold.data.join("paging"), b"a file, not a directory").unwrap();
    p.start("cold");
    p.start("hot");
    p.assert_converges(Duration::from_secs(20));
}

/// Unmounts the tmpfs when the test ends, however it ends (after the agents are killed).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn issue11_a_full_cold_disk_is_said_once_then_converges_when_space_is_freed() {
    const TEST: &str = "issue11_a_full_cold_disk_is_said_once_then_converges_when_space_is_freed";
    if !require_root(TEST, "mounts a small tmpfs as the cold data directory") {
        return;
    }
    let mut p = Pair::new("psk", None);
    fs::create_dir_all(&p.cold.data).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "artemis-sync-test"])
        .arg(&p.cold.data)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs");
    let _unmount = Unmount(p.cold.data.clone());
    seed_tree(&p.hot.data, 4);
    p.start("cold");
    p.start("hot");
    let full_since = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || p
            .logs()
            .contains("No space left")),
        "{}",
        p.logs()
    );
    thread::sleep(Duration::from_secs(6).saturating_sub(full_since.elapsed()));
    assert_ne!(p.status("hot")["synced"], true, "{}", p.logs());
    let said = |logs: &str| logs.lines().filter(|l| l.contains("No space left")).count();
    let logs = p.logs();
    // once by the cold side, once by the hot side (its peer's Nack)
    assert!(
        said(&logs) <= 2,
        "a full disk is said {} times in 6 s:\n{logs}",
        said(&logs)
    );
    let remounted = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&p.cold.data)
        .status()
        .unwrap();
    assert!(remounted.success(), "remount tmpfs");
    p.assert_converges(Duration::from_secs(30));
    artemis_sync(&p.hot.config, ["verify"])
        .code(0)
        .stdout_has(&["identical"]);
    p.kill9("cold");
}

/// Which ways the two hot sides of [`two_hots_at_one_epoch`] can reach each other once the cut
/// is over.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reach {
    Both,
    /// Only the side that must step down reaches the other: the refusal it gets decides.
    LoserToWinner,
    /// Only the side that stays hot reaches the other: the loser's gate decides.
    WinnerToLoser,
}

/// Issue 10: two hot sides at one epoch. A pair converged, its hot node running; each side
/// reaches the other through a proxy. The link is cut both ways; the operator forces the cold
/// VM up (`promote --force`: epoch 2), and on the old hot `demote --force` then
/// `promote --force`: epoch 2 as well, both nodes running, each copy with writes of its own.
/// Then the link comes back (`reach`). Within a bounded time exactly one side is hot with
/// its node running, the other cold with its node stopped, saying why, and stays so. The
/// tie-break keeps the greater holder id: "hot:<dir>" over "cold:<dir>".
fn two_hots_at_one_epoch(reach: Reach) {
    let (mut p, hot_to_cold, cold_to_hot) = cuttable_pair();
    let log = with_nodes(&p);
    start_converged(&mut p, 1);

    // the cut; the cold VM forced up (its gate ends the old stream, which cannot come back)
    hot_to_cold.store(true, Ordering::SeqCst);
    cold_to_hot.store(true, Ordering::SeqCst);
    artemis_sync(&p.cold.config, ["promote", "--force"])
        .code(0)
        .stdout_has(&["hot at epoch 2"]);
    assert!(
        wait_until(Duration::from_secs(10), || running(&p, "cold")),
        "{}",
        p.logs()
    );
    // the old hot, still at epoch 1 and cut off, forced down and up again: epoch 2 too
    assert!(
        wait_until(Duration::from_secs(10), || p.status("hot")["connected"]
            != true),
        "{}",
        p.status("hot")
    );
    artemis_sync(&p.hot.config, ["demote", "--force"]).code(0);
    artemis_sync(&p.hot.config, ["promote", "--force"])
        .code(0)
        .stdout_has(&["hot at epoch 2"]);
    assert!(
        wait_until(Duration::from_secs(10), || running(&p, "hot")),
        "{}",
        p.logs()
    );
    for (side, name) in [("hot", "winner"), ("cold", "loser")] {
        let st = p.status(side);
        assert_eq!(
            (&st["role"], &st["epoch"]),
            (&"hot".into(), &2.into()),
            "{st}"
        );
        fs::write(
            p.fx.path(&format!("{side}/data/journal/{name}-only.amq")),
            vec![9u8; 8192],
        )
        .unwrap();
    }

    // the link comes back
    if reach != Reach::WinnerToLoser {
        cold_to_hot.store(false, Ordering::SeqCst);
    }
    if reach != Reach::LoserToWinner {
        hot_to_cold.store(false, Ordering::SeqCst);
    }
    let settled = || {
        let (h, c) = (p.status("hot"), p.status("cold"));
        h["role"] == "hot"
            && h["node_state"] == "running"
            && c["role"] == "cold"
            && c["node_state"] != "running"
    };
    assert!(
        wait_until(Duration::from_secs(20), settled),
        "two hot sides at one epoch were not settled: hot {}\ncold {}\n{}\n{}",
        p.status("hot"),
        p.status("cold"),
        node_log(&log),
        p.logs()
    );
    // the loser says why, in status and in its log
    let st = p.status("cold");
    assert_eq!(st["epoch"], 2, "{st}");
    let error = st["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("stepped down: two hot sides at epoch 2")
            && error.contains("this side steps down"),
        "{st}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(p.fx.path("cold/state.json")).unwrap()).unwrap();
    assert_eq!(
        (&state["epoch"], &state["role"]),
        (&2.into(), &"cold".into()),
        "{state}"
    );
    let logs = p.logs();
    assert!(logs.contains("FENCING: two hot sides at epoch 2"), "{logs}");
    // and it stays so: no node runs beside the winner's any more
    let overlaps = |text: &str| text.matches("OVERLAP").count();
    let before = overlaps(&node_log(&log));
    thread::sleep(Duration::from_secs(2));
    assert!(settled(), "{}", p.logs());
    assert_eq!(overlaps(&node_log(&log)), before, "{}", node_log(&log));
    assert_eq!(starts(&log, "cold"), 1, "{}", node_log(&log));
    if reach != Reach::LoserToWinner {
        // the winner resyncs the loser: the loser's own writes are gone
        p.assert_converges(Duration::from_secs(20));
        assert!(!p.cold.data.join("journal/loser-only.amq").exists());
        assert!(p.cold.data.join("journal/winner-only.amq").exists());
    }
}

#[test]
fn issue10_two_hots_at_one_epoch_leave_exactly_one_running() {
    two_hots_at_one_epoch(Reach::Both);
}

#[test]
fn issue10_two_hots_at_one_epoch_settled_by_the_refusal_the_loser_gets() {
    two_hots_at_one_epoch(Reach::LoserToWinner);
}

#[test]
fn issue10_two_hots_at_one_epoch_settled_by_the_gate_of_the_loser() {
    two_hots_at_one_epoch(Reach::WinnerToLoser);
}

/// How long the cold disk stalls after `promote` has answered: the old hot restarts, is
/// turned cold and welcomes the new hot's stream meanwhile.
const STALL_HELD: Duration = Duration::from_secs(4);

/// Regression (review of issue 10): a `promote` whose fence timed out (the apply thread was
/// still in a batch of the old stream, held by a stalled disk) left the node waiting, but in
/// the same place a restarted hot waits for its peer's welcome, so the old hot's welcome
/// started the node while the apply thread could still write into `data_dir`: two writers.
/// Only the apply thread's answer to the fence ends that wait.
#[test]
fn issue10_a_promote_whose_fence_timed_out_starts_the_node_only_once_the_apply_thread_is_done() {
    const TEST: &str = "issue10_a_promote_whose_fence_timed_out";
    if !require_root(TEST, "a FUSE fault filesystem as the cold data directory") {
        return;
    }
    let mut p = Pair::new("psk", None);
    let log = with_nodes(&p);
    let faultfs = FaultFs::mount(&p.fx.path("cold/backing"), &p.cold.data);
    seed_tree(&p.hot.data, 2);
    let journal = p.hot.data.join("journal/activemq-data-0.amq");
    p.start("cold");
    p.start("hot");
    p.assert_converges(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(10), || running(&p, "hot")),
        "{}",
        p.logs()
    );
    // the cold disk stops answering; a large write (whole batches past the size applied on
    // the connection's task) reaches the apply thread, which hangs in it. The file exists on
    // both sides: only its inode is held, not its directory.
    faultfs.set_stalling(true);
    p.signal("hot", libc::SIGSTOP);
    fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap()
        .write_all_at(&vec![0x5a; 4 << 20], 0)
        .unwrap();
    p.signal("hot", libc::SIGCONT);
    assert!(
        wait_until(Duration::from_secs(20), || faultfs.stalled_calls() > 0),
        "the apply thread never reached the stalled disk\n{}",
        p.logs()
    );
    // the hot VM dies; the operator forces the cold one up: its fence times out
    p.kill9("hot");
    let promoted = artemis_sync(&p.cold.config, ["promote", "--force"]);
    promoted
        .code(1)
        .stderr_has(&["hot at epoch 2", "waits for the apply thread", "in sync"]);
    let waits = |p: &Pair| {
        let st = p.status("cold");
        st["role"] == "hot"
            && st["node_state"] != "running"
            && st["waiting_for"]
                .as_str()
                .is_some_and(|w| w.contains("apply thread"))
    };
    assert!(waits(&p), "{}\n{}", p.status("cold"), p.logs());
    // the old hot comes back: it hears of epoch 2, turns cold and welcomes the new stream
    p.start("hot");
    assert!(
        wait_until(Duration::from_secs(20), || p.status("hot")["role"]
            == "cold"
            && p.status("cold")["connected"] == true),
        "the old hot did not turn cold and welcome the new hot's stream\n{}",
        p.logs()
    );
    thread::sleep(STALL_HELD);
    assert!(faultfs.stalled_calls() > 0, "{}", p.logs());
    assert!(
        waits(&p),
        "the old hot's welcome ended the wait for the apply thread\n{}\n{}\n{}",
        p.status("cold"),
        node_log(&log),
        p.logs()
    );
    assert_eq!(starts(&log, "cold"), 0, "{}\n{}", node_log(&log), p.logs());
    // the disk answers again: the apply thread finishes its batch, then the node starts
    faultfs.set_stalling(false);
    assert!(
        wait_until(Duration::from_secs(20), || running(&p, "cold")),
        "the node did not start once the apply thread was done\n{}\n{}",
        p.status("cold"),
        p.logs()
    );
    assert!(p.status("cold").get("waiting_for").is_none());
    assert!(
        p.logs()
            .contains("the apply thread finished its batch and writes nothing more"),
        "{}",
        p.logs()
    );
    assert_eq!(starts(&log, "cold"), 1, "{}", node_log(&log));
    assert_eq!(starts(&log, "hot"), 1, "{}", node_log(&log));
    assert_never_two_nodes(&p, &log);
}
