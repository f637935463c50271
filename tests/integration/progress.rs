//! Issue 15, item 4: the progress of an initial sync and of a resync, as the hot agent's
//! `status` reports it, as it logs it, and as `artemis-sync progress` prints it when its output
//! is not a terminal. A real pair on loopback (PSK); the stream goes through a proxy that
//! carries the hot-to-cold direction at a bounded rate, so that the sync of a few tens of MiB
//! lasts long enough to be watched.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::pg::pump;
use crate::replication::{port_of, Pair};
use crate::util::{main_cmd, run_within, Output};

/// Files in the tree, and the size of each.
const FILES: u64 = 12;
const FILE_BYTES: u64 = 4 << 20;
/// The proxy's rate, hot to cold: the 48 MiB take about 8 s.
const PROXY_BYTES_PER_S: u64 = 6 << 20;
/// How long a sync may take here, at most (a loaded machine included).
const SYNC_LIMIT: Duration = Duration::from_secs(120);
/// How often the test asks for `status` during the sync.
const STATUS_EVERY: Duration = Duration::from_millis(50);
/// The agent's progress log period (`replicated::progress::PROGRESS_LOG_EVERY`), with a margin.
const LOG_EVERY_WITH_MARGIN_MS: u64 = 6500;

/// Forwards what its listener accepts to a loopback port, the client-to-server direction at
/// about a fixed rate; stops when dropped.
struct SlowProxy {
    stop: Arc<AtomicBool>,
}

impl SlowProxy {
    fn start(listener: TcpListener, target: u16, bytes_per_s: u64) -> SlowProxy {
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let never_cut = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                pump(client, server, &never_cut, &s, Some(bytes_per_s));
                pump(s2, c2, &never_cut, &s, None);
            }
        });
        SlowProxy { stop }
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `FILES` files of `FILE_BYTES` bytes that do not repeat.
fn write_tree(root: &Path) {
    fs::create_dir_all(root.join("journal")).unwrap();
    let mut data = vec![0u8; usize::try_from(FILE_BYTES).unwrap()];
    for i in 0..FILES {
        let mut xof = blake3::Hasher::new()
            .update(&i.to_le_bytes())
            .finalize_xof();
        xof.fill(&mut data);
        fs::write(root.join(format!("journal/activemq-data-{i}.amq")), &data).unwrap();
    }
}

/// `artemis-sync progress` on the hot host, on a thread, its output captured (a pipe: not a
/// terminal).
fn progress_command(p: &Pair) -> thread::JoinHandle<Output> {
    let config = p.hot.config.clone();
    thread::spawn(move || {
        run_within(
            main_cmd()
                .arg("-c")
                .arg(&config)
                .args(["progress", "--interval-ms", "200"]),
            SYNC_LIMIT,
        )
    })
}

/// The hot's `sync_progress` objects until its status shows the sync done; returns them and
/// the `sync_done` object.
fn watch_status(p: &Pair) -> (Vec<Value>, Value) {
    let deadline = Instant::now() + SYNC_LIMIT;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let s = p.status("hot");
        if let Some(progress) = s.get("sync_progress") {
            seen.push(progress.clone());
        } else if s["connected"] == true && s["sync_done"].is_object() {
            return (seen, s["sync_done"].clone());
        }
        thread::sleep(STATUS_EVERY);
    }
    panic!(
        "no sync done within {SYNC_LIMIT:?}; seen {seen:?}\n{}",
        p.logs()
    );
}

/// The sync's lines from `progress`'s output: every one plain, the last one "in sync".
#[track_caller]
fn plain_lines(out: &Output, phase: &str) -> Vec<String> {
    out.code(0);
    assert!(
        !out.stdout.contains('\r') && !out.stdout.contains('\x1b'),
        "not plain:\n{out}"
    );
    let lines: Vec<String> = out.stdout.lines().map(str::to_owned).collect();
    let last = lines.last().expect("some output");
    assert!(
        last.starts_with(&format!("in sync: {phase} done: {FILES} files, ")),
        "{out}"
    );
    lines
}

#[test]
fn issue15_progress_of_an_initial_sync_and_a_resync_in_status_log_and_command() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut p = Pair::new("psk", Some(port_of(&listener)));
    let _proxy = SlowProxy::start(listener, p.cold.port, PROXY_BYTES_PER_S);
    write_tree(&p.hot.data);
    let total = FILES * FILE_BYTES;
    p.start("cold");
    p.start("hot");
    let command = progress_command(&p);
    let (seen, done) = watch_status(&p);

    // status: the initial sync, rising to the total
    assert!(seen.len() >= 5, "too few samples: {seen:?}\n{}", p.logs());
    let done_bytes: Vec<u64> = seen
        .iter()
        .map(|s| s["bytes_done"].as_u64().unwrap())
        .collect();
    for s in &seen {
        assert_eq!(s["phase"], "initial", "{s}");
        assert_eq!(s["bytes_total"], total, "{s}");
        assert_eq!(s["files_total"], FILES, "{s}");
        assert!(s["bytes_done"].as_u64().unwrap() <= total, "{s}");
    }
    assert!(
        done_bytes.windows(2).all(|w| w[0] <= w[1]),
        "done fell: {done_bytes:?}"
    );
    let mut distinct = done_bytes.clone();
    distinct.dedup();
    assert!(
        distinct.iter().filter(|d| **d > 0 && **d < total).count() >= 3,
        "not seen rising: {done_bytes:?}"
    );
    assert!(
        seen.iter()
            .any(|s| s["bytes_per_s"].as_u64().is_some_and(|r| r > 0) && s["eta_s"].is_u64()),
        "no rate and ETA: {seen:?}"
    );
    assert_eq!(done["phase"], "initial");
    assert_eq!(done["bytes"], total, "{done}");
    assert_eq!(done["files"], FILES, "{done}");
    assert_eq!(done["bytes_sent"], total, "{done}");

    // the command: plain lines, rising, then the totals
    let out = command.join().unwrap();
    let lines = plain_lines(&out, "initial sync");
    let progress: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("initial sync: ") && l.contains(" of 48.0 MiB ("))
        .collect();
    assert!(progress.len() >= 2, "{out}");
    assert!(lines.last().unwrap().contains(", 48.0 MiB in "), "{out}");

    // the log: the start, a line every few seconds, the end
    p.assert_converges(SYNC_LIMIT);
    let logs = p.logs();
    assert!(
        logs.contains("initial sync: comparing 12 files, 48.0 MiB with the cold side's copy"),
        "{logs}"
    );
    assert!(
        logs.contains("initial sync done: 12 files, 48.0 MiB in "),
        "{logs}"
    );
    if done["elapsed_ms"].as_u64().unwrap() > LOG_EVERY_WITH_MARGIN_MS {
        assert!(
            logs.lines().any(|l| l.contains("bytes_done=")
                && l.contains("bytes_total=50331648")
                && l.contains("eta_s=")),
            "no periodic progress line in\n{logs}"
        );
    }

    // a resync after the hot side restarts: 1 MiB rewritten, 1 MiB appended
    p.stop("hot");
    let journal = p.hot.data.join("journal");
    let f = fs::OpenOptions::new()
        .write(true)
        .open(journal.join("activemq-data-3.amq"))
        .unwrap();
    f.write_all_at(&[0x5a; 1 << 20], 1 << 20).unwrap();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(journal.join("activemq-data-5.amq"))
        .unwrap();
    f.write_all_at(&[0xa5; 1 << 20], FILE_BYTES).unwrap();
    p.start("hot");
    let command = progress_command(&p);
    let (seen, done) = watch_status(&p);
    assert!(seen.iter().all(|s| s["phase"] == "resync"), "{seen:?}");
    assert_eq!(done["phase"], "resync");
    assert_eq!(done["bytes"], total + (1 << 20), "{done}");
    assert_eq!(
        done["bytes_sent"],
        2 << 20,
        "only the changed pages: {done}"
    );
    let out = command.join().unwrap();
    let lines = plain_lines(&out, "resync");
    assert!(lines.last().unwrap().ends_with(", 2.0 MiB sent"), "{out}");
    p.assert_converges(SYNC_LIMIT);
}
