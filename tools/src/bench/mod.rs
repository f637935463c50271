//! `artemis-sync-bench`: throughput and lag of replicated mode, each figure next to a baseline
//! measured in the same run (a plain TCP copy, `cp -a`, an rsync daemon, lsyncd, the same loop
//! on a local directory, a loopback round trip, the watch capture, a read of `data_dir`
//! itself), so that noise on a shared machine moves both.
//!
//! Every workload starts a fresh pair of real `artemis-sync agent` processes (the binary beside
//! this one) on 127.0.0.1, in directories under `--dir` (default: a new directory in /dev/shm),
//! and removes them afterwards. The write-path workloads write through the hot agent's FUSE
//! mount (issue 12); without root or /dev/fuse they, like baselines whose tool is missing, are
//! reported as null with the reason.
//!
//! The pieces: `pair` starts and measures the two agents, `baselines` runs the same-run
//! baselines (a plain TCP copy, `cp -a`, an rsync daemon, lsyncd), `workloads` the scanner's
//! workloads (initial sync, resync), `fuse_workloads` the write-path ones (append lag,
//! sustained appends, random writes through the mount, the watch capture's baseline line, and
//! the journal read back through the mount), `durable` the durable-ack fsync latency, and
//! `report` prints the table and draws the SVG.

mod baselines;
mod durable;
mod fuse_workloads;
mod host;
mod pair;
mod report;
mod workloads;

use baselines::*;
use durable::*;
use fuse_workloads::*;
use pair::*;
pub use report::{svg, table};
use workloads::*;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::workload::{self, quantile, WriterConfig};

/// Errors of the benchmark, naming the step.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum BenchError {
    /// {step}: {message}
    Step { step: String, message: String },
}

fn err<E: std::fmt::Display>(step: &str) -> impl FnOnce(E) -> BenchError + '_ {
    move |e| BenchError::Step {
        step: step.to_owned(),
        message: e.to_string(),
    }
}

/// How the agents authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Pre-shared key: every frame carries a keyed-blake3 MAC.
    Psk,
    /// Mutual TLS (rustls), certificates from `certs init`.
    Tls,
    /// No authentication (loopback only).
    Insecure,
}

/// The workloads.
pub const WORKLOADS: [&str; 9] = [
    "initial_sync",
    "initial_sync_tls",
    "resync",
    "durable_fsync",
    "append_lag",
    "append_max",
    "random_writes",
    "capture_watch",
    "journal_load",
];

/// What to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the trees go.
    pub dir: PathBuf,
    /// Authentication of the agents.
    pub auth: AuthMode,
    /// The workloads to run.
    pub workloads: Vec<String>,
    /// `initial_sync`/`resync`/`journal_load` tree: files.
    pub files: usize,
    /// `initial_sync`/`resync` tree: MiB per file.
    pub file_mib: usize,
    /// `append_lag`, `durable_fsync` and `capture_watch` records per second.
    pub rate: u32,
    /// Seconds of `append_lag`, `append_max`, `random_writes`, `durable_fsync`, `capture_watch`.
    pub seconds: u64,
    /// `random_writes`: MiB of files written into.
    pub random_mib: usize,
    /// `random_writes` writes per second.
    pub random_rate: u32,
    /// `initial_sync`, `journal_load`: rounds of ours and every baseline in turn; figures are
    /// medians.
    pub rounds: u32,
    /// The agent binary.
    pub agent_bin: PathBuf,
    /// Both rescan periods of the agents, when not the product's defaults (a diagnosis: how
    /// much of a figure the periodic rescans cost).
    pub rescan_ms: Option<u64>,
}

/// Results, as one JSON object.
pub type Results = Value;

// ------------------------------------------------------------------------------ helpers

/// Fills `buf` with fast pseudo-random bytes (xorshift64*), different for each `seed`.
fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn make_tree(dir: &Path, files: usize, mib: usize) -> Result<u64, BenchError> {
    fs::create_dir_all(dir.join("journal")).map_err(err("create the tree"))?;
    let mut buf = vec![0u8; mib << 20];
    for i in 0..files {
        fill_random(&mut buf, i as u64 + 1);
        fs::write(dir.join(format!("journal/activemq-data-{i}.amq")), &buf)
            .map_err(err("write the tree"))?;
    }
    Ok((files * (mib << 20)) as u64)
}

/// Writes `bytes` of zeros into a scratch file in `dir` and removes it, just before a copy of
/// that size: the copy then writes into memory the guest has just touched. This VM reports
/// freed memory to its host (virtio-balloon free page reporting, about 2 s after the free),
/// and the first write to a page the host took back faults there: measured here, a copy into
/// such memory ran at 70 to 300 MB/s against 1 to 1.5 GB/s into memory just freed, and
/// which copy of a run met it was a matter of timing.
fn warm_memory(dir: &Path, bytes: u64) -> Result<(), BenchError> {
    let path = dir.join("warm-up.scratch");
    let mut f = File::create(&path).map_err(err("warm up"))?;
    let buf = vec![0u8; 4 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        f.write_all(&buf[..n]).map_err(err("warm up"))?;
        left -= n as u64;
    }
    drop(f);
    fs::remove_file(&path).map_err(err("warm up"))
}

fn tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The median of `v` (the upper of the middle two of an even count); `None` if it is empty.
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

fn ms(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(round(d.as_secs_f64() * 1e3, 3)))
}

/// Data for the SVG report.
#[derive(Debug, Default)]
pub struct Curves {
    /// `append_lag` lags, sorted.
    pub lags: Vec<Duration>,
    /// `append_max` MB/s per second.
    pub throughput: Vec<f64>,
}

/// Runs the selected workloads; `progress` hears about each one as it starts.
pub fn run(s: &Settings, mut progress: impl FnMut(&str)) -> Result<(Results, Curves), BenchError> {
    fs::create_dir_all(&s.dir).map_err(err("create --dir"))?;
    let mut out = serde_json::Map::new();
    let mut rss = (0.0f64, 0.0f64);
    let mut curves = Curves::default();
    for w in &s.workloads {
        progress(w);
        let before = host::CpuTimes::now();
        let mut v = match w.as_str() {
            "initial_sync" => initial_sync(s, w, s.auth, &mut rss)?,
            "initial_sync_tls" => initial_sync(s, w, AuthMode::Tls, &mut rss)?,
            "resync" => resync(s, &mut rss)?,
            "durable_fsync" => durable_fsync(s, &mut rss)?,
            "append_lag" => append_lag(s, &mut rss, &mut curves)?,
            "append_max" => append_max(s, &mut rss, &mut curves)?,
            "random_writes" => random_writes(s, &mut rss)?,
            "capture_watch" => capture_watch(s, &mut rss)?,
            "journal_load" => journal_load(s, &mut rss)?,
            other => {
                return Err(BenchError::Step {
                    step: "workloads".into(),
                    message: format!(
                        "unknown workload {other:?}; known: {}",
                        WORKLOADS.join(", ")
                    ),
                })
            }
        };
        if let (Some(b), Some(a), Value::Object(m)) = (before, host::CpuTimes::now(), &mut v) {
            m.insert("host".into(), a.since(&b));
        }
        out.insert(w.clone(), v);
    }
    let tree = (s.files * (s.file_mib << 20)) as f64;
    out.insert("hot_rss_mb".into(), json!(round(rss.0, 1)));
    out.insert("cold_rss_mb".into(), json!(round(rss.1, 1)));
    out.insert(
        "rss_target_mb".into(),
        json!(round(64.0 + tree / 1048576.0 / 100.0, 1)),
    );
    out.insert("auth".into(), json!(s.auth));
    out.insert(
        "rescan_interval_ms".into(),
        json!(s
            .rescan_ms
            .unwrap_or(artemis_sync::config::DEFAULT_RESCAN_INTERVAL_MS)),
    );
    out.insert("dir".into(), json!(s.dir));
    Ok((Value::Object(out), curves))
}
