//! The workloads on the write path (issue 12), through the hot agent's FUSE mount: append lag
//! at a steady rate with async acks, sustained 1 MiB appends, random in-place writes; the
//! same append workload with the watch capture writing `data_dir`, kept as a baseline line;
//! and the journal read back through the mount, as a node starting after a failover reads it.
//! Without root or /dev/fuse the FUSE workloads report their figures as null with the reason.

use super::*;

/// The p99 lag `append_max` must keep.
pub(super) const APPEND_MAX_P99: Duration = Duration::from_millis(20);
/// `append_max`: the first rate, in 1 MiB writes per second (16.8 MB/s).
const APPEND_MAX_FIRST_RATE: u32 = 16;
/// `append_max`: the last rate tried (537 MB/s).
const APPEND_MAX_LAST_RATE: u32 = 512;
/// Steps halfway between the highest rate that held and the lowest that did not, after the
/// doubling (so a target between two doublings is tried, not guessed).
const APPEND_MAX_BISECTIONS: u32 = 3;
/// `append_max`: bytes per write.
pub(super) const APPEND_MAX_RECORD_BYTES: usize = 1 << 20;
/// `append_max`: journal files kept (older ones deleted), so that a run does not fill tmpfs.
const APPEND_MAX_KEEP_FILES: u64 = 32;
/// How long a fresh pair may take to send its initial sync.
const START_LIMIT: Duration = Duration::from_secs(60);

/// A workload's figures as nulls, with the reason they could not be measured.
pub(super) fn unavailable(figures: &[&str], reason: &str) -> Value {
    let mut m = serde_json::Map::new();
    for f in figures {
        m.insert((*f).to_owned(), Value::Null);
    }
    m.insert("null_reason".into(), json!(reason));
    Value::Object(m)
}

/// Stops and removes pair `p`; returns the hot agent's peak RSS in MiB (both sides' go into
/// `rss`, the run's peaks).
pub(super) fn finish(p: Pair, rss: &mut (f64, f64)) -> Value {
    let r = p.finish();
    *rss = (rss.0.max(r.0), rss.1.max(r.1));
    json!(round(r.0, 1))
}

/// A fresh pair with `capture`, started and in sync.
pub(super) fn start_pair(s: &Settings, name: &str, capture: Capture) -> Result<Pair, BenchError> {
    let mut p = Pair::new(s, name, capture)?;
    p.start_cold()?;
    p.start_hot()?;
    p.wait_synced(START_LIMIT)?;
    Ok(p)
}

/// The writer's settings for an append run into `p` (through the mount with FUSE).
fn writer(p: &Pair, rate: Option<u32>, record_bytes: usize, seconds: u64) -> WriterConfig {
    WriterConfig {
        dir: p.write_dir.clone(),
        rate_per_s: rate,
        duration: Duration::from_secs(seconds),
        file_bytes: workload::JOURNAL_FILE_BYTES,
        record_bytes,
        sample_every: 1,
        paging: record_bytes == workload::RECORD_BYTES,
        keep_files: (record_bytes != workload::RECORD_BYTES).then_some(APPEND_MAX_KEEP_FILES),
        first_file: 1,
    }
}

/// An append run with its probe on the cold copy; returns the report and the hot and cold
/// agents' CPU as % of a core over the run (the benchmark's own, writer and probe, goes to
/// `p.bench_cpu_pct`: on two cores it competes with the agents). `per_second` hears each
/// second's MB.
fn append_run(
    p: &mut Pair,
    cfg: &WriterConfig,
    rss: &mut (f64, f64),
    per_second: &mut Vec<f64>,
) -> Result<(workload::Report, f64, f64), BenchError> {
    let me = cpu_time(std::process::id());
    let (h0, c0) = p.cpu();
    let report = workload::run(cfg, Some(&p.cold_data), |t| {
        per_second.push(t.records as f64 * cfg.record_bytes as f64 / 1e6)
    })
    .map_err(err("writer"))?;
    let (h1, c1) = p.cpu();
    let wall = report.elapsed.as_secs_f64();
    p.bench_cpu_pct = (cpu_time(std::process::id()) - me).as_secs_f64() / wall * 100.0;
    p.note_rss();
    *rss = (rss.0.max(p.peak_hot_mb), rss.1.max(p.peak_cold_mb));
    Ok((
        report,
        (h1 - h0).as_secs_f64() / wall * 100.0,
        (c1 - c0).as_secs_f64() / wall * 100.0,
    ))
}

/// The figures every append run reports.
fn append_figures(
    r: &workload::Report,
    hot_cpu: f64,
    cold_cpu: f64,
    bench_cpu: f64,
) -> serde_json::Map<String, Value> {
    let v = json!({
        "records": r.records,
        "samples": r.lags.len(),
        "lost": r.lost,
        "p50_ms": ms(quantile(&r.lags, 0.5)),
        "p99_ms": ms(quantile(&r.lags, 0.99)),
        "max_ms": ms(r.lags.last().copied()),
        "p50_from_write_ms": ms(quantile(&r.lags_from_write, 0.5)),
        "p99_from_write_ms": ms(quantile(&r.lags_from_write, 0.99)),
        "hot_cpu_pct": round(hot_cpu, 1),
        "cold_cpu_pct": round(cold_cpu, 1),
        "bench_cpu_pct": round(bench_cpu, 1),
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("json! of an object literal"),
    }
}

/// `append_lag`: 4 KiB records + fdatasync at `s.rate` through the mount, async acks; lsyncd
/// behind the same writer as the baseline.
pub(super) fn append_lag(
    s: &Settings,
    rss: &mut (f64, f64),
    curves: &mut Curves,
) -> Result<Value, BenchError> {
    let (p50, figures) = match fuse_unavailable() {
        Some(why) => (
            None,
            unavailable(
                &["p50_ms", "p99_ms", "max_ms", "hot_cpu_pct", "cold_cpu_pct"],
                &why,
            ),
        ),
        None => {
            let mut p = start_pair(s, "append_lag", Capture::FuseAsync)?;
            let cfg = writer(&p, Some(s.rate), workload::RECORD_BYTES, s.seconds);
            let (r, hot, cold) = append_run(&mut p, &cfg, rss, &mut Vec::new())?;
            let mut m = append_figures(&r, hot, cold, p.bench_cpu_pct);
            m.insert("identical".into(), json!(p.verify()));
            m.insert("hot_rss_mb".into(), finish(p, rss));
            curves.lags = r.lags.clone();
            (quantile(&r.lags, 0.5), Value::Object(m))
        }
    };
    let root = s.dir.join("append_lag");
    fs::create_dir_all(&root).map_err(err("lsyncd dir"))?;
    let (lsyncd, reason) = lsyncd_lag(s, &root)?;
    let _ = fs::remove_dir_all(&root);
    let lsyncd_ratio = match (&lsyncd, p50) {
        (Some(Value::Number(l)), Some(o)) if !o.is_zero() => Some(round(
            l.as_f64().unwrap_or(0.0) / (o.as_secs_f64() * 1e3),
            1,
        )),
        _ => None,
    };
    let mut v = figures;
    v["rate_per_s"] = json!(s.rate);
    v["capture"] = json!("fuse");
    v["lsyncd_p50_ms"] = json!(lsyncd);
    v["lsyncd_ratio"] = json!(lsyncd_ratio);
    v["lsyncd_null_reason"] = json!(reason);
    Ok(v)
}

/// `capture_watch`: the same append workload with the watch capture (writers write
/// `data_dir`, the agent watches it with inotify and rescans): the baseline line.
pub(super) fn capture_watch(s: &Settings, rss: &mut (f64, f64)) -> Result<Value, BenchError> {
    let mut p = start_pair(s, "capture_watch", Capture::Watch)?;
    let cfg = writer(&p, Some(s.rate), workload::RECORD_BYTES, s.seconds);
    let (r, hot, cold) = append_run(&mut p, &cfg, rss, &mut Vec::new())?;
    let mut m = append_figures(&r, hot, cold, p.bench_cpu_pct);
    m.insert("identical".into(), json!(p.verify()));
    m.insert("hot_rss_mb".into(), finish(p, rss));
    let mut v = Value::Object(m);
    v["append_lag_p50_ms"] = v["p50_ms"].clone();
    v["append_lag_p99_ms"] = v["p99_ms"].clone();
    v["rate_per_s"] = json!(s.rate);
    v["capture"] = json!("watch");
    Ok(v)
}

/// One step of `append_max` at `rate` writes per second: its figures, whether its p99 kept the
/// bound, and whether the writer kept the rate.
fn append_max_step(
    p: &mut Pair,
    rate: Option<u32>,
    step: Duration,
    next_file: &mut u64,
    rss: &mut (f64, f64),
    curves: &mut Curves,
) -> Result<(Value, bool, bool), BenchError> {
    let mut cfg = writer(p, rate, APPEND_MAX_RECORD_BYTES, step.as_secs());
    cfg.first_file = *next_file;
    let (r, hot, _) = append_run(p, &cfg, rss, &mut curves.throughput)?;
    *next_file += r.files;
    let mbs = r.bytes as f64 / 1e6 / r.elapsed.as_secs_f64();
    let p99 = quantile(&r.lags, 0.99);
    let ok = r.lost == 0 && p99.is_some_and(|d| d <= APPEND_MAX_P99);
    let kept_up =
        rate.is_none_or(|w| r.records as f64 >= 0.9 * f64::from(w) * r.elapsed.as_secs_f64());
    let v = json!({
        "rate_per_s": rate,
        "mb_per_s": round(mbs, 1),
        "p50_ms": ms(quantile(&r.lags, 0.5)),
        "p99_ms": ms(p99),
        "lost": r.lost,
        "hot_cpu_pct": round(hot, 1),
        "ok": ok,
        "kept_up": kept_up,
    });
    Ok((v, ok, kept_up))
}

/// `append_max`: 1 MiB writes + fdatasync through the mount (async acks) at rates doubling
/// from [`APPEND_MAX_FIRST_RATE`] while the p99 lag stays within [`APPEND_MAX_P99`] and the
/// writer keeps the rate, then up to [`APPEND_MAX_BISECTIONS`] steps halfway between the best
/// rate that held and the lowest that did not: the figure is the best such step's MB/s. A last step without a rate gives the ceiling.
pub(super) fn append_max(
    s: &Settings,
    rss: &mut (f64, f64),
    curves: &mut Curves,
) -> Result<Value, BenchError> {
    if let Some(why) = fuse_unavailable() {
        return Ok(unavailable(
            &["mb_per_s", "p50_ms", "p99_ms", "hot_cpu_pct"],
            &why,
        ));
    }
    let mut p = start_pair(s, "append_max", Capture::FuseAsync)?;
    let step = Duration::from_secs((s.seconds / 4).max(1));
    let (h0, c0) = p.cpu();
    let t0 = Instant::now();
    let (mut steps, mut best, mut next_file) = (Vec::new(), None::<Value>, 1u64);
    let mut rate = APPEND_MAX_FIRST_RATE;
    // the highest rate that held and the lowest that did not, so far
    let (mut good, mut bad) = (None::<u32>, None::<u32>);
    let mut bisections = APPEND_MAX_BISECTIONS;
    loop {
        let (v, ok, kept_up) =
            append_max_step(&mut p, Some(rate), step, &mut next_file, rss, curves)?;
        steps.push(v.clone());
        if ok && kept_up {
            best = Some(v);
            good = Some(rate);
            if bad.is_none() {
                if rate >= APPEND_MAX_LAST_RATE {
                    break;
                }
                rate *= 2;
                continue;
            }
        } else {
            bad = Some(bad.map_or(rate, |b| b.min(rate)));
        }
        // halfway between the two, while they are more than an eighth apart
        match (good, bad) {
            (Some(g), Some(b)) if bisections > 0 && b - g > g / 8 => {
                bisections -= 1;
                rate = g + (b - g) / 2;
            }
            _ => break,
        }
    }
    // the ceiling: as fast as the writer goes, whatever the lag
    let (ceiling, _, _) = append_max_step(&mut p, None, step, &mut next_file, rss, curves)?;
    let wall = t0.elapsed().as_secs_f64();
    let (h1, c1) = p.cpu();
    let identical = p.verify();
    let hot_rss = finish(p, rss);
    // no good step: the first one's figures (its p99 shows the miss)
    let best = best.unwrap_or_else(|| steps[0].clone());
    Ok(json!({
        "mb_per_s": best["mb_per_s"],
        "p50_ms": best["p50_ms"],
        "p99_ms": best["p99_ms"],
        "rate_per_s": best["rate_per_s"],
        "record_bytes": APPEND_MAX_RECORD_BYTES,
        "p99_within_bound": best["ok"],
        "steps": steps,
        "unthrottled_mb_per_s": ceiling["mb_per_s"],
        "unthrottled_p99_ms": ceiling["p99_ms"],
        "hot_cpu_pct": round((h1 - h0).as_secs_f64() / wall * 100.0, 1),
        "cold_cpu_pct": round((c1 - c0).as_secs_f64() / wall * 100.0, 1),
        "identical": identical,
        "hot_rss_mb": hot_rss,
    }))
}

/// `random_writes`: 4 KiB pages written in place at random offsets of preallocated files
/// through the mount, each + fdatasync; the delay until each is on the cold disk.
pub(super) fn random_writes(s: &Settings, rss: &mut (f64, f64)) -> Result<Value, BenchError> {
    if let Some(why) = fuse_unavailable() {
        return Ok(unavailable(&["p50_ms", "p99_ms", "converged"], &why));
    }
    let mut p = Pair::new(s, "random_writes", Capture::FuseAsync)?;
    let files = (s.random_mib / 10).max(1);
    make_tree(&p.hot_data, files, s.random_mib.min(10))?;
    p.start_cold()?;
    p.start_hot()?;
    p.wait_synced(Duration::from_secs(120))?;
    let handles: Vec<File> = (0..files)
        .map(|i| p.write_dir.join(format!("journal/activemq-data-{i}.amq")))
        .map(|x| OpenOptions::new().write(true).open(x))
        .collect::<Result<_, _>>()
        .map_err(err("random writes"))?;
    let pages_per_file = (s.random_mib.min(10) << 20) as u64 / 4096;
    let (tx, rx) = crossbeam_channel::bounded::<RandomSample>(65536);
    let cold = p.cold_data.clone();
    let probe = std::thread::spawn(move || random_probe(&cold, files, &rx));
    let (h0, _) = p.cpu();
    let t0 = Instant::now();
    let n = random_write_loop(s, &handles, pages_per_file, &tx)?;
    let hot_cpu = (p.cpu().0 - h0).as_secs_f64() / t0.elapsed().as_secs_f64() * 100.0;
    drop(tx);
    let (mut lags, superseded, lost) = probe.join().map_err(|_| BenchError::Step {
        step: "random writes".into(),
        message: "probe panicked".into(),
    })?;
    lags.sort();
    drop(handles);
    let converged = p.verify();
    let hot_rss = finish(p, rss);
    Ok(json!({
        "writes": n,
        "samples": lags.len(),
        "superseded": superseded,
        "lost": lost,
        "p50_ms": ms(quantile(&lags, 0.5)),
        "p99_ms": ms(quantile(&lags, 0.99)),
        "max_ms": ms(lags.last().copied()),
        "hot_cpu_pct": round(hot_cpu, 1),
        "converged": converged,
        "hot_rss_mb": hot_rss,
        "capture": "fuse",
    }))
}

/// `journal_load`: bytes per read, as Artemis reads a journal file it loads (whole files of
/// 10 MiB by default, through a buffer).
const JOURNAL_LOAD_READ_BYTES: usize = 1 << 20;

/// Reads every file of the tree under `dir` to its end, [`JOURNAL_LOAD_READ_BYTES`] at a
/// time, opened with `flags` (`O_DIRECT`: into a page-aligned buffer); the MB/s, or an error
/// if the files did not hold the tree's `expected` bytes.
fn read_tree(dir: &Path, files: usize, flags: i32, expected: u64) -> Result<f64, BenchError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut backing = vec![0u8; JOURNAL_LOAD_READ_BYTES + 4096];
    let skip = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[skip..skip + JOURNAL_LOAD_READ_BYTES];
    let t0 = Instant::now();
    let mut bytes = 0u64;
    for i in 0..files {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(dir.join(format!("journal/activemq-data-{i}.amq")))
            .map_err(err("journal load: open"))?;
        let mut at = 0u64;
        loop {
            let n = f.read_at(buf, at).map_err(err("journal load: read"))?;
            if n == 0 {
                break;
            }
            at += n as u64;
        }
        bytes += at;
    }
    let took = t0.elapsed();
    if bytes != expected {
        return Err(BenchError::Step {
            step: "journal load".into(),
            message: format!("read {bytes} bytes of {expected} from {}", dir.display()),
        });
    }
    Ok(bytes as f64 / 1e6 / took.as_secs_f64())
}

/// `journal_load`: the tree of `initial_sync` read whole through the hot side's mount, as a
/// node starting after a failover loads its journal: buffered (Artemis' NIO journal; its
/// MAPPED journal faults pages in through the same read-ahead) and with `O_DIRECT` (its
/// ASYNCIO journal), against the same buffered read of `data_dir` itself. Each open through
/// the mount reads through the agent again (the kernel drops the file's cached pages on
/// open). `s.rounds` rounds, medians; memory is touched before each round (see
/// [`warm_memory`]).
pub(super) fn journal_load(s: &Settings, rss: &mut (f64, f64)) -> Result<Value, BenchError> {
    let figures = [
        "mb_per_s",
        "direct_mb_per_s",
        "data_dir_mb_per_s",
        "ratio_vs_data_dir",
    ];
    if let Some(why) = fuse_unavailable() {
        return Ok(unavailable(&figures, &why));
    }
    let mut p = Pair::new(s, "journal_load", Capture::FuseAsync)?;
    let bytes = make_tree(&p.hot_data, s.files, s.file_mib)?;
    p.start_cold()?;
    p.start_hot()?;
    p.wait_synced(START_LIMIT)?;
    let read_ahead_kb = artemis_sync::replicated::capture::fuse::read_ahead_kb(&p.write_dir).ok();
    let (mut mount, mut direct, mut local) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..s.rounds.max(1) {
        warm_memory(&p.root, bytes)?;
        mount.push(read_tree(&p.write_dir, s.files, 0, bytes)?);
        direct.push(read_tree(&p.write_dir, s.files, libc::O_DIRECT, bytes)?);
        local.push(read_tree(&p.hot_data, s.files, 0, bytes)?);
    }
    let ratios: Vec<f64> = mount.iter().zip(&local).map(|(m, l)| m / l).collect();
    let hot_rss = finish(p, rss);
    Ok(json!({
        "bytes": bytes,
        "rounds": mount.len(),
        "mb_per_s": median(mount).map(|m| round(m, 1)),
        "direct_mb_per_s": median(direct).map(|m| round(m, 1)),
        "data_dir_mb_per_s": median(local).map(|m| round(m, 1)),
        "ratio_vs_data_dir": median(ratios).map(|m| round(m, 2)),
        "read_ahead_kb": read_ahead_kb,
        "hot_rss_mb": hot_rss,
    }))
}
