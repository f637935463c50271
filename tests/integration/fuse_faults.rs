//! The FUSE capture's faults (issue 12), with real agents as root: what a promoted cold side
//! says of the copy (RPO 0 after a durable hot in sync dies, not in sync after it degraded),
//! `on_peer_loss = "block"` with the cold agent stopped, and the node dying with a killed hot
//! agent while it writes through the mount.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use artemis_sync::replicated::ops::Op;
use artemis_sync::replicated::wire::Frame;

use crate::fuse::{cold_has, fuse_pair_started, fuse_pair_to, mount_point, record, RECORD_BYTES};
use crate::replication::{fake_cold_admits, port_of, rt, wait_until, Pair};
use crate::util::{
    artemis_sync, mounts_at, require_root, toml_path, write_script, Fixture, MountGuard,
};

/// How long a status may take to show a heartbeat's news (one is sent every second).
const HEARTBEAT_NEWS: Duration = Duration::from_secs(5);

/// Writes record `i` of writer `w` at its place in `f` and fdatasyncs it; how long the sync took.
fn write_sync(f: &fs::File, w: u8, i: usize) -> Duration {
    let at = u64::try_from(i * RECORD_BYTES).unwrap();
    f.write_all_at(&record(w, i), at).unwrap();
    let t = Instant::now();
    f.sync_data().unwrap();
    t.elapsed()
}

/// Waits until the cold side's `hot_sync` starts with `prefix`.
#[track_caller]
fn wait_hot_sync(p: &Pair, prefix: &str) {
    let ok = wait_until(HEARTBEAT_NEWS, || {
        p.status("cold")["hot_sync"]
            .as_str()
            .is_some_and(|s| s.starts_with(prefix))
    });
    assert!(ok, "hot_sync is not {prefix:?}: {}", p.status("cold"));
}

/// Kills the hot agent, promotes the cold one by force, and returns what `promote` printed.
fn kill_hot_and_promote(p: &mut Pair) -> String {
    p.kill9("hot");
    let out = artemis_sync(&p.cold.config, ["promote", "--force"]);
    out.code(0);
    out.stdout
}

#[test]
fn issue12_promote_after_a_durable_hot_in_sync_dies_reports_rpo_0() {
    if !require_root("issue12_promote_rpo0", "FUSE mounts") {
        return;
    }
    let (mut p, _guard, mnt) = fuse_pair_started("ack = \"durable\"\npeer_timeout_ms = 10000");
    // promoted, the cold side serves its own mount
    let _cold_guard = MountGuard::new(&p.fx.path("cold/mnt"));
    let f = fs::File::create(mnt.join("j")).unwrap();
    for i in 0..20 {
        write_sync(&f, 6, i);
    }
    assert!(cold_has(&p, "j", 6, 19), "durable");
    wait_hot_sync(&p, "in sync (durable) at last contact");
    drop(f);
    let said = kill_hot_and_promote(&mut p);
    assert!(
        said.contains("RPO 0: the old hot was durable and in sync at its last heartbeat")
            && said.contains("peer_timeout_ms (10000 ms)"),
        "{said}\n{}",
        p.logs()
    );
    for i in 0..20 {
        assert!(cold_has(&p, "j", 6, i), "record {i}");
    }
}

#[test]
fn issue12_promote_after_the_hot_degraded_says_the_copy_may_lack_data() {
    if !require_root("issue12_promote_degraded", "FUSE mounts") {
        return;
    }
    let (mut p, _guard, mnt) = fuse_pair_started("ack = \"durable\"\npeer_timeout_ms = 500");
    let _cold_guard = MountGuard::new(&p.fx.path("cold/mnt"));
    let f = fs::File::create(mnt.join("j")).unwrap();
    write_sync(&f, 7, 0);
    wait_hot_sync(&p, "in sync (durable)");
    // the cold agent frozen: the next sync degrades after the timeout
    p.signal("cold", libc::SIGSTOP);
    let waited = write_sync(&f, 7, 1);
    p.signal("cold", libc::SIGCONT);
    assert!(waited >= Duration::from_millis(450), "{waited:?}");
    assert!(
        p.status("hot")["degraded"]
            .as_str()
            .is_some_and(|s| s.contains("may lack data")),
        "{}",
        p.status("hot")
    );
    // awake again, the cold side hears that the hot side is degraded (no sync since cleared it)
    wait_hot_sync(&p, "degraded since ");
    drop(f);
    let said = kill_hot_and_promote(&mut p);
    assert!(
        said.contains("NOT in sync: the old hot was degraded since")
            && said.contains("syncs it confirmed since then may be missing"),
        "{said}\n{}",
        p.logs()
    );
}

/// A directory's fsync is a sync like a file's: with durable acks it returns once the cold
/// side has the names made and moved before it (a rename then an fsync of its directory, the
/// usual way to make a rename durable). With the cold agent stopped and `block`, it waits.
#[test]
fn issue12_durable_a_directory_fsync_waits_for_the_cold_side_as_a_file_fsync_does() {
    if !require_root("issue12_fsyncdir", "FUSE mounts") {
        return;
    }
    let (p, _guard, mnt) =
        fuse_pair_started("ack = \"durable\"\npeer_timeout_ms = 500\non_peer_loss = \"block\"");
    fs::create_dir(mnt.join("d")).unwrap();
    fs::File::open(mnt.join("d")).unwrap().sync_all().unwrap();
    assert!(
        p.cold.data.join("d").is_dir(),
        "the fsync of d returned before the cold side had d"
    );
    p.signal("cold", libc::SIGSTOP);
    fs::write(mnt.join("d/a.tmp"), b"renamed, then its directory synced").unwrap();
    fs::rename(mnt.join("d/a.tmp"), mnt.join("d/a")).unwrap();
    let dir = mnt.join("d");
    let syncer = std::thread::spawn(move || fs::File::open(dir).unwrap().sync_all());
    // three timeouts: a sync that did not wait would have returned long since
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !syncer.is_finished(),
        "the directory's fsync returned without the cold side"
    );
    p.signal("cold", libc::SIGCONT);
    assert!(
        wait_until(Duration::from_secs(10), || syncer.is_finished()),
        "the directory's fsync did not return once the cold side was back\n{}",
        p.logs()
    );
    syncer.join().unwrap().unwrap();
    // returned: the cold side has the rename
    assert_eq!(
        fs::read(p.cold.data.join("d/a")).unwrap(),
        b"renamed, then its directory synced"
    );
    assert!(!p.cold.data.join("d/a.tmp").exists());
}

#[test]
fn issue12_block_a_durable_sync_waits_for_a_stopped_cold_agent_and_returns_when_it_is_back() {
    if !require_root("issue12_block", "FUSE mounts") {
        return;
    }
    let (p, _guard, mnt) =
        fuse_pair_started("ack = \"durable\"\npeer_timeout_ms = 500\non_peer_loss = \"block\"");
    let f = fs::File::create(mnt.join("j")).unwrap();
    write_sync(&f, 8, 0);
    p.signal("cold", libc::SIGSTOP);
    let stopped = Instant::now();
    let writer = std::thread::spawn(move || write_sync(&f, 8, 1));
    // three timeouts: a degrading sync would have returned long since
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !writer.is_finished(),
        "the sync returned without the cold side"
    );
    let hot = p.status("hot");
    assert!(
        hot["blocked"]
            .as_str()
            .is_some_and(|s| s.contains("for the cold side (on_peer_loss = \"block\")")),
        "{hot}"
    );
    assert!(hot.get("degraded").is_none(), "{hot}");
    assert!(!cold_has(&p, "j", 8, 1), "the cold agent is stopped");
    p.signal("cold", libc::SIGCONT);
    assert!(
        wait_until(Duration::from_secs(10), || writer.is_finished()),
        "the sync did not return once the cold side was back\n{}",
        p.logs()
    );
    let waited = writer.join().unwrap();
    eprintln!(
        "block: the sync waited {waited:?} (cold agent stopped for {:?})",
        stopped.elapsed()
    );
    assert!(waited >= Duration::from_millis(1300), "{waited:?}");
    assert!(
        cold_has(&p, "j", 8, 1),
        "on the cold disk when the sync returned"
    );
    assert!(
        p.status("hot").get("blocked").is_none(),
        "{}",
        p.status("hot")
    );
}

/// The pid a node script wrote to `file`, once it has.
fn node_pid(file: &Path, not: Option<i32>) -> i32 {
    let mut pid = None;
    let ok = wait_until(Duration::from_secs(20), || {
        pid = fs::read_to_string(file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|p| Some(*p) != not);
        pid.is_some()
    });
    assert!(ok, "no node pid in {}", file.display());
    pid.unwrap()
}

/// Whether process `pid` is gone (or a zombie waiting for a reaper).
fn dead(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[test]
fn issue12_a_killed_hot_agent_takes_its_node_writing_through_the_mount_with_it() {
    if !require_root("issue12_node_dies", "FUSE mounts") {
        return;
    }
    let fx = Fixture::new();
    let pidfile = fx.path("node.pid");
    let base_link = fx.path("hot/base/artemis");
    let script = write_script(
        &fx.path("node.sh"),
        &format!(
            "echo $$ > {}\nwhile :; do date +%s%N >> {}/node.log; sleep 0.02; done",
            pidfile.display(),
            base_link.display()
        ),
    );
    let mut p = crate::fuse::fuse_pair(fx, "");
    let text = fs::read_to_string(&p.hot.config).unwrap();
    let node = format!("[node]\ncommand = [{}]\n", toml_path(&script));
    fs::write(&p.hot.config, text.replacen("[node]\n", &node, 1)).unwrap();
    let _guard = MountGuard::new(&p.fx.path("hot/mnt"));
    crate::fuse::start_synced(&mut p);
    let mnt = mount_point(&p);
    let first = node_pid(&pidfile, None);
    let on_cold = |p: &Pair| fs::metadata(p.cold.data.join("node.log")).map_or(0, |m| m.len());
    assert!(
        wait_until(Duration::from_secs(10), || on_cold(&p) > 0),
        "the node's writes through the mount reach the cold side\n{}",
        p.logs()
    );
    // the mount's root attributes fresh in the kernel's cache (1 s): a `stat` of the dead
    // mount at the next start answers from it
    fs::metadata(&mnt).unwrap();
    p.kill9("hot");
    assert!(
        wait_until(Duration::from_secs(5), || dead(first)),
        "the node {first} outlived its agent"
    );
    assert_eq!(mounts_at(&mnt).len(), 1, "the dead mount is left");
    p.start("hot");
    let second = node_pid(&pidfile, Some(first));
    assert!(!dead(second));
    assert_eq!(mounts_at(&mnt).len(), 1, "{:?}", mounts_at(&mnt));
    assert!(p
        .logs()
        .contains("detaching a FUSE mount left by an earlier agent"));
    fs::write(mnt.join("after"), b"written after the restart").unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || {
            fs::read(p.cold.data.join("after")).is_ok_and(|d| d == b"written after the restart")
        }),
        "{}",
        p.logs()
    );
    let before = on_cold(&p);
    assert!(
        wait_until(Duration::from_secs(10), || on_cold(&p) > before),
        "the restarted node's writes reach the cold side"
    );
    p.stop("hot");
    assert!(dead(second), "a clean stop stops the node");
}

/// Writes `count` pieces of `size` bytes to a file through the mount with the cold agent
/// frozen (its kernel keeps the connection open: nothing is read or acknowledged), each
/// followed by an fdatasync when `sync`; the writes must all return within `limit`, and the
/// copy converge once the cold agent is thawed.
fn writes_go_on_past_a_frozen_cold_agent(
    more: &str,
    (size, count, sync): (usize, u64, bool),
    limit: Duration,
) {
    let (p, _guard, mnt) = fuse_pair_started(more);
    let f = fs::File::create(mnt.join("j")).unwrap();
    write_sync(&f, 9, 0);
    p.signal("cold", libc::SIGSTOP);
    let began = Instant::now();
    let writer = std::thread::spawn(move || {
        let chunk: Vec<u8> = (0..size).map(|i| u8::try_from(i % 253).unwrap()).collect();
        let size = u64::try_from(size).unwrap();
        for i in 1..=count {
            f.write_all_at(&chunk, i * size).unwrap();
            if sync {
                f.sync_data().unwrap();
            }
        }
    });
    let done = wait_until(limit, || writer.is_finished());
    let took = began.elapsed();
    p.signal("cold", libc::SIGCONT);
    assert!(
        done,
        "{count} writes of {size} bytes did not return within {limit:?} with the cold agent frozen\n{}",
        p.logs()
    );
    writer.join().unwrap();
    eprintln!("{count} writes of {size} bytes past a frozen cold agent in {took:?}");
    // by the window's check, or by the kernel (TCP_USER_TIMEOUT) when the socket filled first
    let logs = p.logs();
    assert!(
        logs.contains("acknowledged nothing for") || logs.contains("Connection timed out"),
        "the connection was not given up\n{logs}"
    );
    p.assert_converges(Duration::from_secs(60));
}

/// A cold agent that stops answering must not stop the node's writes once the window is
/// full: with durable acks and `degrade`, the hot side gives the connection up after
/// `peer_timeout_ms` and syncs return at once; the copy converges when the cold side is back.
#[test]
fn issue12_degrade_a_frozen_cold_agent_does_not_hold_the_writes_up() {
    if !require_root("issue12_frozen_degrade", "FUSE mounts") {
        return;
    }
    // each sync would wait out the timeout: 96 of them 48 s
    writes_go_on_past_a_frozen_cold_agent(
        "ack = \"durable\"\npeer_timeout_ms = 500\nwindow_mb = 1",
        (1 << 20, 96, true),
        Duration::from_secs(15),
    );
}

/// The same with async acks: the writes fill the window, then the scanner's queue behind it
/// (8192 events), and would then wait; past the stall limit (10 s) the connection is given up.
#[test]
fn issue12_async_a_frozen_cold_agent_does_not_hold_the_writes_up() {
    if !require_root("issue12_frozen_async", "FUSE mounts") {
        return;
    }
    writes_go_on_past_a_frozen_cold_agent(
        "ack = \"async\"\nwindow_mb = 1",
        (4096, 20_000, false),
        Duration::from_secs(25),
    );
}

/// Regression: the connection's reader handed every ack it read to the durable syncs' watch,
/// an ack of a batch never sent too. A broken cold side that acknowledged ahead of what it
/// was sent made every sync waiting on that connection, and every one after it, return at
/// once: durable in name, with nothing on the cold disk. Such an ack now answers no sync,
/// and ends the connection.
#[test]
fn issue12_an_ack_of_a_batch_never_sent_answers_no_durable_sync() {
    if !require_root("issue12_bogus_ack", "FUSE mounts") {
        return;
    }
    let fake = crate::listen::loopback_listener();
    let mut p = fuse_pair_to(
        Fixture::new(),
        Some(port_of(&fake)),
        "ack = \"durable\"\npeer_timeout_ms = 2000\non_peer_loss = \"degrade\"",
    );
    let _guard = MountGuard::new(&mount_point(&p));
    p.start("hot");
    let rt = rt();
    rt.block_on(async {
        fake.set_nonblocking(true).unwrap();
        let fake = tokio::net::TcpListener::from_std(fake).unwrap();
        let (mut r, mut w) = fake_cold_admits(&fake, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("the hot side never connected\n{}", p.logs()));
        w.send(&Frame::Welcome { epoch: 1 }).await.unwrap();
        w.send(&Frame::IndexEnd).await.unwrap();
        w.flush().await.unwrap();
        let mnt = mount_point(&p);
        let writer = std::thread::spawn(move || {
            let f = fs::File::create(mnt.join("r")).unwrap();
            write_sync(&f, 1, 0)
        });
        // the record's batch arrives; the fake acknowledges far past it, fsyncing nothing
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sent = 0;
        while !writer.is_finished() {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, r.recv())
                .await
                .unwrap_or_else(|_| panic!("no batch with the record came\n{}", p.logs()))
                .unwrap();
            if let Frame::Batch { seq, ops } = frame {
                sent = seq;
                if ops
                    .iter()
                    .any(|op| matches!(op, Op::Write { path, .. } if path == "r"))
                {
                    break;
                }
            }
        }
        assert!(
            sent > 0,
            "the sync returned before its batch was sent\n{}",
            p.logs()
        );
        w.send(&Frame::Ack { seq: sent + 1000 }).await.unwrap();
        w.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(
            !writer.is_finished(),
            "a durable sync returned on an ack of a batch never sent\n{}",
            p.logs()
        );
        assert!(
            wait_until(Duration::from_secs(15), || writer.is_finished()),
            "the sync did not degrade and return\n{}",
            p.logs()
        );
        writer.join().unwrap();
    });
    let logs = p.logs();
    assert!(logs.contains("which was never sent"), "{logs}");
}
