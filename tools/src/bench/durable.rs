//! `durable_fsync` (issue 12): 4 KiB records, each followed by `fdatasync`, at a steady rate
//! through the mount with `ack = "durable"`, against the same loop on a local directory of the
//! same filesystem without replication, a loopback TCP round trip and the cold filesystem's
//! `fdatasync` alone, all measured in the same run. The figure is the latency durable acks
//! add; the target is p50 added <= round trip + cold fdatasync + 100 us. The same loop through
//! a mount with `ack = "async"` splits that figure: what the FUSE round trips (the write's and
//! the sync's) cost, and what waiting for the cold side adds on top.

use super::*;

/// Bytes of each record.
const RECORD_BYTES: usize = 4096;
/// The file the loop writes is preallocated to this and written round and round (as an Artemis
/// journal file is written into its preallocated length).
const FILE_BYTES: u64 = 10 << 20;
/// The reply of the round trip (an ack's size).
const ACK_BYTES: usize = 64;
/// Round trips measured.
const RTT_ROUNDS: usize = 2000;
/// `fdatasync` calls timed on the cold side's filesystem.
const FSYNC_ROUNDS: usize = 500;
/// The slack of the target, in microseconds.
const TARGET_SLACK_US: f64 = 100.0;

fn us(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(round(d.as_secs_f64() * 1e6, 1)))
}

fn us_f(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64() * 1e6)
}

/// Writes 4 KiB records + `fdatasync` into `path` at `rate` per second for `seconds`; returns
/// each record's latency (before the write to after the sync), sorted, and the elapsed time.
fn fsync_loop(
    path: &Path,
    rate: u32,
    seconds: u64,
) -> Result<(Vec<Duration>, Duration), BenchError> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .map_err(err("durable loop: open"))?;
    f.set_len(FILE_BYTES)
        .map_err(err("durable loop: preallocate"))?;
    f.sync_all().map_err(err("durable loop: preallocate"))?;
    let slots = FILE_BYTES / RECORD_BYTES as u64;
    let mut record = vec![0u8; RECORD_BYTES];
    let limit = u64::from(rate) * seconds;
    let mut lat = Vec::with_capacity(usize::try_from(limit).unwrap_or(0));
    let start = Instant::now();
    let mut n = 0u64;
    while n < limit && start.elapsed() < Duration::from_secs(seconds + 5) {
        fill_random(&mut record, n + 1);
        let t = Instant::now();
        f.write_all_at(&record, (n % slots) * RECORD_BYTES as u64)
            .map_err(err("durable loop: write"))?;
        f.sync_data().map_err(err("durable loop: fdatasync"))?;
        lat.push(t.elapsed());
        n += 1;
        let due = start + Duration::from_secs_f64(n as f64 / f64::from(rate));
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
    }
    let elapsed = start.elapsed();
    lat.sort();
    Ok((lat, elapsed))
}

/// Round trips on 127.0.0.1: a 4 KiB record out, a 64-byte reply back (what a durable sync
/// crosses at least), and 64 bytes each way; returns both, sorted.
fn loopback_rtt() -> Result<(Vec<Duration>, Vec<Duration>), BenchError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(err("rtt: bind"))?;
    let addr = listener.local_addr().map_err(err("rtt: bind"))?;
    let echo = std::thread::spawn(move || -> io::Result<()> {
        let (mut c, _) = listener.accept()?;
        c.set_nodelay(true)?;
        let mut buf = vec![0u8; RECORD_BYTES];
        for len in [RECORD_BYTES, ACK_BYTES] {
            for _ in 0..RTT_ROUNDS {
                c.read_exact(&mut buf[..len])?;
                c.write_all(&buf[..ACK_BYTES])?;
            }
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr).map_err(err("rtt: connect"))?;
    c.set_nodelay(true).map_err(err("rtt"))?;
    let out = vec![7u8; RECORD_BYTES];
    let mut back = [0u8; ACK_BYTES];
    let mut both = Vec::new();
    for len in [RECORD_BYTES, ACK_BYTES] {
        let mut v = Vec::with_capacity(RTT_ROUNDS);
        for _ in 0..RTT_ROUNDS {
            let t = Instant::now();
            c.write_all(&out[..len]).map_err(err("rtt: send"))?;
            c.read_exact(&mut back).map_err(err("rtt: receive"))?;
            v.push(t.elapsed());
        }
        v.sort();
        both.push(v);
    }
    drop(c);
    echo.join()
        .map_err(|_| BenchError::Step {
            step: "rtt".into(),
            message: "the echo thread panicked".into(),
        })?
        .map_err(err("rtt: echo"))?;
    let small = both.pop().unwrap_or_default();
    let record = both.pop().unwrap_or_default();
    Ok((record, small))
}

/// `fdatasync` alone after a 4 KiB write, in `dir` (the cold side's filesystem); sorted.
fn fdatasync_cost(dir: &Path) -> Result<Vec<Duration>, BenchError> {
    let path = dir.join("fdatasync-probe");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(err("cold fdatasync"))?;
    let mut record = vec![0u8; RECORD_BYTES];
    let mut v = Vec::with_capacity(FSYNC_ROUNDS);
    for i in 0..FSYNC_ROUNDS {
        fill_random(&mut record, i as u64 + 1);
        f.write_all_at(&record, (i * RECORD_BYTES) as u64)
            .map_err(err("cold fdatasync"))?;
        let t = Instant::now();
        f.sync_data().map_err(err("cold fdatasync"))?;
        v.push(t.elapsed());
    }
    drop(f);
    let _ = fs::remove_file(&path);
    v.sort();
    Ok(v)
}

/// The durable loop through a fresh pair's mount: latencies (sorted), elapsed, whether the
/// hot agent degraded meanwhile, and whether the cold file held every byte when the last sync
/// returned.
fn durable_run(
    s: &Settings,
    p: &mut Pair,
) -> Result<(Vec<Duration>, Duration, bool, bool), BenchError> {
    let (lat, elapsed) = fsync_loop(&p.write_dir.join("durable.amq"), s.rate, s.seconds)?;
    let on_cold = fs::read(p.cold_data.join("durable.amq")).ok()
        == fs::read(p.hot_data.join("durable.amq")).ok();
    let degraded = !p.hot_status()["degraded"].is_null();
    Ok((lat, elapsed, degraded, on_cold))
}

pub(super) fn durable_fsync(s: &Settings, rss: &mut (f64, f64)) -> Result<Value, BenchError> {
    let (rtt, rtt_small) = loopback_rtt()?;
    let mut p = Pair::new(s, "durable_fsync", Capture::FuseDurable)?;
    let local_dir = p.root.join("local");
    fs::create_dir_all(&local_dir).map_err(err("durable: local dir"))?;
    let cold_fsync = fdatasync_cost(&p.root.join("cold"))?;
    let (local, _) = fsync_loop(&local_dir.join("local.amq"), s.rate, s.seconds)?;
    let _ = fs::remove_dir_all(&local_dir);
    let rtt_us = us_f(quantile(&rtt, 0.5));
    let cold_us = us_f(quantile(&cold_fsync, 0.5));
    let target = rtt_us.zip(cold_us).map(|(r, c)| r + c + TARGET_SLACK_US);
    let mut v = json!({
        "rate_per_s": s.rate,
        "local_p50_us": us(quantile(&local, 0.5)),
        "local_p99_us": us(quantile(&local, 0.99)),
        "rtt_us": us(quantile(&rtt, 0.5)),
        "rtt_p99_us": us(quantile(&rtt, 0.99)),
        "rtt_small_us": us(quantile(&rtt_small, 0.5)),
        "cold_fdatasync_us": us(quantile(&cold_fsync, 0.5)),
        "target_p50_added_us": target.map(|t| round(t, 1)),
    });
    if let Some(why) = fuse_unavailable() {
        for k in [
            "p50_added_us",
            "p99_added_us",
            "p50_us",
            "p99_us",
            "target_met",
            "fuse_async_p50_us",
            "fuse_async_p99_us",
            "p50_added_over_async_us",
        ] {
            v[k] = Value::Null;
        }
        v["null_reason"] = json!(why);
        return Ok(v);
    }
    p.start_cold()?;
    p.start_hot()?;
    p.wait_synced(Duration::from_secs(60))?;
    let (h0, _) = p.cpu();
    let (lat, elapsed, degraded, on_cold) = durable_run(s, &mut p)?;
    let hot_cpu = (p.cpu().0 - h0).as_secs_f64() / elapsed.as_secs_f64() * 100.0;
    v["hot_rss_mb"] = finish(p, rss);
    // the same loop through a mount with async acks: what the FUSE round trips cost alone
    let p = start_pair(s, "durable_fsync_async", Capture::FuseAsync)?;
    let (fuse, _) = fsync_loop(&p.write_dir.join("async.amq"), s.rate, s.seconds)?;
    finish(p, rss);
    v["fuse_async_p50_us"] = us(quantile(&fuse, 0.5));
    v["fuse_async_p99_us"] = us(quantile(&fuse, 0.99));
    v["p50_added_over_async_us"] = json!(us_f(quantile(&lat, 0.5))
        .zip(us_f(quantile(&fuse, 0.5)))
        .map(|(d, a)| round(d - a, 1)));
    let added = |q: f64| {
        us_f(quantile(&lat, q))
            .zip(us_f(quantile(&local, q)))
            .map(|(d, l)| round(d - l, 1))
    };
    v["records"] = json!(lat.len());
    v["achieved_rate_per_s"] = json!(round(lat.len() as f64 / elapsed.as_secs_f64(), 1));
    v["p50_us"] = us(quantile(&lat, 0.5));
    v["p99_us"] = us(quantile(&lat, 0.99));
    v["p50_added_us"] = json!(added(0.5));
    v["p99_added_us"] = json!(added(0.99));
    v["target_met"] = json!(added(0.5).zip(target).map(|(a, t)| a <= t));
    v["hot_cpu_pct"] = json!(round(hot_cpu, 1));
    v["degraded"] = json!(degraded);
    v["on_cold_when_synced"] = json!(on_cold);
    Ok(v)
}
