//! The scanner's workloads, initial sync and resync of a tree (the watch capture: both are the
//! scanner's work whatever the capture), and the writer and probe of random in-place writes
//! that `fuse_workloads` runs through the FUSE mount.

use super::*;

// ------------------------------------------------------------------------------ workloads

/// `initial_sync` (with `--auth`) and `initial_sync_tls` (with TLS, whatever `--auth` says):
/// a cold side with an empty directory takes the whole tree, against the same tree copied by
/// the plain TCP copy (the ceiling), `cp -a`, and the rsync daemon; with the CPU each agent
/// spent per GiB. `s.rounds` rounds of all four in turn: every figure is the median over the
/// rounds, each ratio the median of the rounds' ratios (each taken under the same conditions).
pub(super) fn initial_sync(
    s: &Settings,
    name: &str,
    auth: AuthMode,
    rss: &mut (f64, f64),
) -> Result<Value, BenchError> {
    let s = &Settings { auth, ..s.clone() };
    // the tree, made once and moved from round to round
    let stash = s.dir.join(format!("{name}.tree"));
    let _ = fs::remove_dir_all(&stash);
    let bytes = make_tree(&stash, s.files, s.file_mib)?;
    let mut runs = Vec::new();
    for round in 1..=s.rounds.max(1) {
        let run = initial_sync_round(s, &format!("{name}.{round}"), &stash, bytes, rss)?;
        runs.push(run);
    }
    let _ = fs::remove_dir_all(&stash);
    let med = |key: &str| -> Value {
        json!(median(
            runs.iter().filter_map(|r| r[key].as_f64()).collect()
        ))
    };
    let ours_s = med("seconds");
    let rsync_reason = runs
        .first()
        .map_or(Value::Null, |r| r["rsync_null_reason"].clone());
    Ok(json!({
        "auth": auth,
        "bytes": bytes,
        "rounds": runs.len(),
        "seconds": ours_s,
        "mb_per_s": med("mb_per_s"),
        "identical": runs.iter().all(|r| r["identical"] == true),
        "plain_copy_mb_per_s": med("plain_copy_mb_per_s"),
        "cp_mb_per_s": med("cp_mb_per_s"),
        "rsync_mb_per_s": med("rsync_mb_per_s"),
        "ratio_vs_rsync": med("ratio_vs_rsync"),
        "ratio_vs_plain_copy": med("ratio_vs_plain_copy"),
        "hot_cpu_s_per_gib": med("hot_cpu_s_per_gib"),
        "cold_cpu_s_per_gib": med("cold_cpu_s_per_gib"),
        "rsync_null_reason": rsync_reason,
        "runs": runs,
    }))
}

/// One round of [`initial_sync`]: the tree is taken from `stash` and put back.
fn initial_sync_round(
    s: &Settings,
    name: &str,
    stash: &Path,
    bytes: u64,
    rss: &mut (f64, f64),
) -> Result<Value, BenchError> {
    let mut p = Pair::new(s, name, Capture::Watch)?;
    let tree = p.hot_data.join("journal");
    fs::rename(stash.join("journal"), &tree).map_err(err("move the tree in"))?;
    let mb = bytes as f64 / 1e6;
    let gib = bytes as f64 / f64::from(1u32 << 30);
    warm_memory(&s.dir, bytes)?;
    p.start_cold()?;
    let start = SystemTime::now();
    let (h0, c0) = p.cpu();
    p.start_hot()?;
    let end = p.wait_synced(Duration::from_secs(600))?;
    let ours = end.duration_since(start).unwrap_or_default();
    let (h1, c1) = p.cpu();
    let identical = p.verify();
    p.stop_agents();
    // Every copy, ours and each baseline, starts as the last did: with nothing of the copies
    // before it left, and right after a scratch write of the tree's size (`warm_memory`), so
    // that none writes into memory the host took back and the others not. The plain copy once
    // ran beside ours' cold copy and paid for the run's new memory peak, every round.
    let _ = fs::remove_dir_all(&p.cold_data);
    warm_memory(&s.dir, bytes)?;
    let plain_dst = p.root.join("plain-dst");
    let plain = plain_copy(&p.hot_data, &plain_dst)?;
    let _ = fs::remove_dir_all(&plain_dst);
    warm_memory(&s.dir, bytes)?;
    let cp_dst = p.root.join("cp-dst");
    let cp = cp_copy(&p.hot_data, &cp_dst)?;
    let _ = fs::remove_dir_all(&cp_dst);
    let (rsync_mbs, rsync_reason) = match tool("rsync") {
        None => (
            None,
            Some("rsync is not installed (benches/compare.sh installs it)".to_owned()),
        ),
        Some(rsync) => {
            let dst = p.root.join("rsync-dst");
            fs::create_dir_all(&dst).map_err(err("rsync dir"))?;
            let d = RsyncDaemon::start(&rsync, &p.root, &dst)?;
            warm_memory(&s.dir, bytes)?;
            let (t, _) = d.push(&rsync, &p.hot_data, &["-a", "--whole-file"])?;
            drop(d);
            let _ = fs::remove_dir_all(&dst);
            (Some(mb / t.as_secs_f64()), None)
        }
    };
    fs::rename(&tree, stash.join("journal")).map_err(err("move the tree back"))?;
    let r = p.finish();
    *rss = (rss.0.max(r.0), rss.1.max(r.1));
    let ours_mbs = mb / ours.as_secs_f64();
    let plain_mbs = mb / plain.as_secs_f64();
    Ok(json!({
        "seconds": round(ours.as_secs_f64(), 3),
        "mb_per_s": round(ours_mbs, 1),
        "identical": identical,
        "plain_copy_mb_per_s": round(plain_mbs, 1),
        "cp_mb_per_s": round(mb / cp.as_secs_f64(), 1),
        "rsync_mb_per_s": rsync_mbs.map(|v| round(v, 1)),
        "ratio_vs_rsync": rsync_mbs.map(|r| round(ours_mbs / r, 2)),
        "ratio_vs_plain_copy": round(ours_mbs / plain_mbs, 2),
        "hot_cpu_s_per_gib": round(h1.saturating_sub(h0).as_secs_f64() / gib, 2),
        "cold_cpu_s_per_gib": round(c1.saturating_sub(c0).as_secs_f64() / gib, 2),
        "rsync_null_reason": rsync_reason,
    }))
}

/// Rewrites `fraction` of the 4 KiB pages of the tree at random; returns the distinct pages.
pub(super) fn rewrite_pages(dir: &Path, fraction: f64, seed: u64) -> Result<usize, BenchError> {
    let mut files: Vec<(PathBuf, u64)> = fs::read_dir(dir.join("journal"))
        .map_err(err("resync"))?
        .flatten()
        .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
        .collect();
    files.sort();
    let total_pages: u64 = files.iter().map(|(_, l)| l / 4096).sum();
    let want = usize::try_from(crate::whole(total_pages as f64 * fraction)).unwrap_or(usize::MAX);
    let mut x = seed | 1;
    let mut chosen = BTreeSet::new();
    while chosen.len() < want {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chosen.insert(x % total_pages);
    }
    let mut page = vec![0u8; 4096];
    let mut handles: Vec<File> = files
        .iter()
        .map(|(p, _)| OpenOptions::new().write(true).open(p))
        .collect::<Result<_, _>>()
        .map_err(err("resync"))?;
    for (n, g) in chosen.iter().enumerate() {
        let (mut idx, mut off) = (0usize, *g);
        while off >= files[idx].1 / 4096 {
            off -= files[idx].1 / 4096;
            idx += 1;
        }
        fill_random(&mut page, seed ^ (n as u64 + 7));
        handles[idx]
            .write_all_at(&page, off * 4096)
            .map_err(err("resync"))?;
    }
    for h in &mut handles {
        h.sync_all().map_err(err("resync"))?;
    }
    Ok(chosen.len())
}

pub(super) fn resync(s: &Settings, rss: &mut (f64, f64)) -> Result<Value, BenchError> {
    // the default capture where it can run: its resync hashes the hot tree while the cold
    // side indexes its own; the changes go through the mount as the broker's would
    let capture = if fuse_unavailable().is_none() {
        Capture::FuseAsync
    } else {
        Capture::Watch
    };
    let mut p = Pair::new(s, "resync", capture)?;
    let bytes = make_tree(&p.hot_data, s.files, s.file_mib)?;
    p.start_cold()?;
    p.start_hot()?;
    p.wait_synced(Duration::from_secs(600))?;
    // rsync's destination holds the same old copy
    let rsync = tool("rsync");
    let rsync_dst = p.root.join("rsync-dst");
    if let Some(r) = &rsync {
        let st = Command::new(r)
            .arg("-a")
            .arg(format!("{}/", p.cold_data.display()))
            .arg(&rsync_dst)
            .status()
            .map_err(err("copy for rsync"))?;
        if !st.success() {
            return Err(BenchError::Step {
                step: "copy for rsync".into(),
                message: format!("rsync exited {st}"),
            });
        }
    }
    p.stop_cold();
    let pages = rewrite_pages(&p.write_dir, 0.05, 0x5eed)?;
    let changed = pages as u64 * 4096;
    let hot_before = p.hot_status()["wire_bytes"].as_u64().unwrap_or(0);
    let started = Instant::now();
    p.start_cold()?;
    // timed from the connection: the hot side's pause between attempts to reach the stopped
    // cold side (doubling up to 2 s) is not the resync's work
    let start = p.wait_connected(Duration::from_secs(60))?;
    let start_wall = SystemTime::now();
    let reconnect_wait = start.duration_since(started);
    // wait for the new connection's comparison to finish
    std::thread::sleep(Duration::from_millis(20));
    let end = p.wait_synced(Duration::from_secs(600))?;
    let ours = end.duration_since(start_wall).unwrap_or_default();
    let identical = p.verify();
    let hot_after = p.hot_status()["wire_bytes"].as_u64().unwrap_or(0);
    let cold_out = p.cold_status()["wire_out_bytes"].as_u64().unwrap_or(0);
    let wire = hot_after.saturating_sub(hot_before) + cold_out;
    let (rsync_s, rsync_wire, reason) = match &rsync {
        None => (
            None,
            None,
            Some("rsync is not installed (benches/compare.sh installs it)".to_owned()),
        ),
        Some(r) => {
            let d = RsyncDaemon::start(r, &p.root, &rsync_dst)?;
            // -I: rsync's quick check (size and mtime to the second) would skip pages
            // rewritten within the second of the copy, the hazard lsyncd users meet
            let (t, w) = d.push(r, &p.hot_data, &["-a", "--no-whole-file", "-I"])?;
            (Some(t.as_secs_f64()), Some(w), None)
        }
    };
    let r = p.finish();
    *rss = (rss.0.max(r.0), rss.1.max(r.1));
    // the cold side's index (its page summaries) is what it sends back
    let bound = 1.05 * changed as f64 + cold_out as f64;
    Ok(json!({
        "capture": if capture == Capture::Watch { "watch" } else { "fuse" },
        "tree_bytes": bytes,
        "changed_bytes": changed,
        "seconds": round(ours.as_secs_f64(), 3),
        "reconnect_wait_seconds": round(reconnect_wait.as_secs_f64(), 3),
        "wire_bytes": wire,
        "summary_bytes": cold_out,
        "wire_bound_bytes": crate::whole(bound),
        "identical": identical,
        "rsync_seconds": rsync_s.map(|v| round(v, 3)),
        "rsync_wire_bytes": rsync_wire,
        "ratio_vs_rsync": rsync_s.map(|r| round(r / ours.as_secs_f64(), 2)),
        "rsync_null_reason": reason,
    }))
}

/// A sample of `random_writes`: file index, offset, the page's first 16 bytes, when written.
pub(super) type RandomSample = (usize, u64, [u8; 16], Instant);

/// Writes random pages at random offsets of `handles` at `s.random_rate` per second for
/// `s.seconds`, each followed by `fdatasync`, and tells the probe about each; returns the count.
pub(super) fn random_write_loop(
    s: &Settings,
    handles: &[File],
    pages_per_file: u64,
    tx: &crossbeam_channel::Sender<RandomSample>,
) -> Result<u64, BenchError> {
    let files = handles.len();
    let start = Instant::now();
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut n = 0u64;
    let mut page = vec![0u8; 4096];
    while start.elapsed() < Duration::from_secs(s.seconds) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let f = usize::try_from(x % files as u64).expect("below the file count");
        let off = ((x >> 20) % pages_per_file) * 4096;
        n += 1;
        fill_random(&mut page, x);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&page[..16]);
        handles[f]
            .write_all_at(&page, off)
            .map_err(err("random writes"))?;
        handles[f].sync_data().map_err(err("random writes"))?;
        let _ = tx.try_send((f, off, tag, Instant::now()));
        let due = start + Duration::from_secs_f64(n as f64 / f64::from(s.random_rate));
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
    }
    Ok(n)
}

/// Watches the cold copy for each written page (keyed by page: a page written again before the
/// first write arrived only ever shows the second content, so the first sample is superseded,
/// not lost); returns the lags, the superseded count and the pages that never arrived.
pub(super) fn random_probe(
    cold: &Path,
    files: usize,
    rx: &crossbeam_channel::Receiver<RandomSample>,
) -> (Vec<Duration>, u64, u64) {
    let mut pending: std::collections::HashMap<(usize, u64), ([u8; 16], Instant)> =
        std::collections::HashMap::new();
    let mut lags = Vec::new();
    let mut superseded = 0u64;
    let mut buf = [0u8; 16];
    let mut fds: Vec<Option<File>> = (0..files).map(|_| None).collect();
    let mut closed_at: Option<Instant> = None;
    loop {
        loop {
            match rx.try_recv() {
                Ok((f, off, tag, t)) => {
                    if pending.insert((f, off), (tag, t)).is_some() {
                        superseded += 1;
                    }
                }
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    closed_at.get_or_insert_with(Instant::now);
                    break;
                }
            }
        }
        pending.retain(|(f, off), (tag, t)| {
            if fds[*f].is_none() {
                fds[*f] = File::open(cold.join(format!("journal/activemq-data-{f}.amq"))).ok();
            }
            let got = fds[*f]
                .as_ref()
                .is_some_and(|h| h.read_exact_at(&mut buf, *off).is_ok() && buf == *tag);
            if got {
                lags.push(Instant::now().saturating_duration_since(*t));
            }
            !got
        });
        // after the writer stops, give the rescan two intervals to bring the rest
        if closed_at.is_some_and(|c| {
            pending.is_empty()
                || c.elapsed()
                    > Duration::from_millis(
                        2 * artemis_sync::config::DEFAULT_RESCAN_INTERVAL_MS + 1000,
                    )
        }) {
            return (lags, superseded, pending.len() as u64);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}
