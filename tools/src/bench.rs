//! `artemis-sync-bench`: throughput and lag of replicated mode, each figure next to a baseline
//! measured in the same run (a plain TCP copy, an rsync daemon, lsyncd), so that noise on a
//! shared machine moves both.
//!
//! Every workload starts a fresh pair of real `artemis-sync agent` processes (the binary beside
//! this one) on 127.0.0.1, in directories under `--dir` (default: a new directory in /dev/shm),
//! and removes them afterwards. Baselines whose tool is missing are reported as null with the
//! reason.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use artemis_sync::daemon::listen_fds::command_with_listener;
use artemis_sync::daemon::protocol::{Reply, Request};
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
pub const WORKLOADS: [&str; 5] = [
    "initial_sync",
    "resync",
    "append_lag",
    "append_max",
    "random_writes",
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
    /// `initial_sync`/`resync` tree: files.
    pub files: usize,
    /// `initial_sync`/`resync` tree: MiB per file.
    pub file_mib: usize,
    /// `append_lag` records per second.
    pub rate: u32,
    /// Seconds of `append_lag`, `append_max`, `random_writes`.
    pub seconds: u64,
    /// `random_writes`: MiB of files written into.
    pub random_mib: usize,
    /// `random_writes` writes per second.
    pub random_rate: u32,
    /// The agent binary.
    pub agent_bin: PathBuf,
}

/// Results, as one JSON object.
pub type Results = Value;

// ------------------------------------------------------------------------------ agents

struct Agent {
    child: Child,
    sock: PathBuf,
}

impl Agent {
    fn status(&self) -> Value {
        match artemis_sync::daemon::control::request(
            &self.sock,
            &Request::Status,
            Duration::from_secs(5),
        ) {
            Ok(Reply::Status(s)) => serde_json::to_value(s).unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory (VmHWM) in MiB.
    fn peak_rss_mb(&self) -> f64 {
        proc_status_kb(self.pid(), "VmHWM:").map_or(0.0, |kb| kb as f64 / 1024.0)
    }

    /// User + system CPU time so far.
    fn cpu(&self) -> Duration {
        cpu_time(self.pid())
    }

    fn stop(mut self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our live child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // after the command: state is field 3, utime 14, stime 15 (1-based in proc(5))
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// A hot and a cold agent on fresh directories.
struct Pair {
    root: PathBuf,
    hot_data: PathBuf,
    cold_data: PathBuf,
    hot_cfg: PathBuf,
    cold_cfg: PathBuf,
    bin: PathBuf,
    hot: Option<Agent>,
    cold: Option<Agent>,
    peak_hot_mb: f64,
    peak_cold_mb: f64,
    /// The hot agent's replication listener, handed to each hot agent started.
    hot_listener: TcpListener,
    /// The cold agent's.
    cold_listener: TcpListener,
}

impl Pair {
    fn new(s: &Settings, name: &str) -> Result<Pair, BenchError> {
        let root = s.dir.join(name);
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).map_err(err("create the workload directory"))?;
        // bound here and handed to each agent as its fd 3, so no other process can take the
        // ports in between (see artemis_sync::daemon::listen_fds)
        let hot_listener = TcpListener::bind("127.0.0.1:0").map_err(err("bind ports"))?;
        let cold_listener = TcpListener::bind("127.0.0.1:0").map_err(err("bind ports"))?;
        let ports = (
            hot_listener.local_addr().map_err(err("bind ports"))?.port(),
            cold_listener
                .local_addr()
                .map_err(err("bind ports"))?
                .port(),
        );
        let auth = match s.auth {
            AuthMode::Insecure => "insecure_loopback = true".to_owned(),
            AuthMode::Psk => {
                let psk = root.join("psk");
                let key = artemis_sync::replicated::wire::nonce().map_err(err("make a key"))?;
                let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                artemis_sync::sys::write_atomic(&psk, hex.as_bytes())
                    .map_err(err("write the psk"))?;
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&psk, fs::Permissions::from_mode(0o600))
                    .map_err(err("chmod the psk"))?;
                format!("psk_file = {psk:?}")
            }
            AuthMode::Tls => {
                let certs = root.join("certs");
                artemis_sync::replicated::certs::init(&certs, &["hot".into(), "cold".into()])
                    .map_err(err("certs init"))?;
                "TLS".to_owned()
            }
        };
        let mut cfgs = Vec::new();
        for (side, listen, peer) in [("hot", ports.0, ports.1), ("cold", ports.1, ports.0)] {
            let dir = root.join(side);
            fs::create_dir_all(dir.join("base")).map_err(err("create a side"))?;
            fs::create_dir_all(dir.join("data")).map_err(err("create a side"))?;
            let auth = if auth == "TLS" {
                let c = root.join("certs");
                format!(
                    "tls_cert = {:?}\ntls_key = {:?}\ntls_ca = {:?}",
                    c.join(format!("{side}.pem")),
                    c.join(format!("{side}.key")),
                    c.join("ca.pem")
                )
            } else {
                auth.clone()
            };
            let text = format!(
                "[node]\nbase_dir = {:?}\n\n[storage]\nmode = \"replicated\"\n\n[replication]\nrole = \"{side}\"\ndata_dir = {:?}\n\
                 listen = \"127.0.0.1:{listen}\"\npeer = \"127.0.0.1:{peer}\"\n{auth}\nstate_file = {:?}\n\n\
                 [lock]\nmachine_name = \"{side}\"\n\n[agent]\ncontrol_socket = {:?}\n",
                dir.join("base"), dir.join("data"), dir.join("state.json"), dir.join("agent.sock")
            );
            let cfg = dir.join("agent.toml");
            fs::write(&cfg, text).map_err(err("write a config"))?;
            cfgs.push(cfg);
        }
        Ok(Pair {
            hot_data: root.join("hot/data"),
            cold_data: root.join("cold/data"),
            hot_cfg: cfgs[0].clone(),
            cold_cfg: cfgs[1].clone(),
            root,
            bin: s.agent_bin.clone(),
            hot: None,
            cold: None,
            peak_hot_mb: 0.0,
            peak_cold_mb: 0.0,
            hot_listener,
            cold_listener,
        })
    }

    fn spawn(&self, cfg: &Path, log: &str, listener: &TcpListener) -> Result<Agent, BenchError> {
        let log = File::create(self.root.join(log)).map_err(err("create an agent log"))?;
        let child = command_with_listener(&self.bin, listener)
            .arg("-c")
            .arg(cfg)
            .arg("agent")
            .env(
                "ARTEMIS_SYNC_LOG",
                std::env::var("ARTEMIS_SYNC_BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| BenchError::Step {
                step: "start an agent".into(),
                message: format!("{}: {e}", self.bin.display()),
            })?;
        let sock = cfg.parent().expect("config dir").join("agent.sock");
        let agent = Agent { child, sock };
        let deadline = Instant::now() + Duration::from_secs(10);
        while agent.status().is_null() {
            if Instant::now() > deadline {
                return Err(BenchError::Step {
                    step: "start an agent".into(),
                    message: format!(
                        "no answer on {} (log in {})",
                        agent.sock.display(),
                        self.root.display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(agent)
    }

    fn start_cold(&mut self) -> Result<(), BenchError> {
        self.cold = Some(self.spawn(&self.cold_cfg, "cold.log", &self.cold_listener)?);
        Ok(())
    }

    fn start_hot(&mut self) -> Result<(), BenchError> {
        self.hot = Some(self.spawn(&self.hot_cfg, "hot.log", &self.hot_listener)?);
        Ok(())
    }

    fn note_rss(&mut self) {
        if let Some(h) = &self.hot {
            self.peak_hot_mb = self.peak_hot_mb.max(h.peak_rss_mb());
        }
        if let Some(c) = &self.cold {
            self.peak_cold_mb = self.peak_cold_mb.max(c.peak_rss_mb());
        }
    }

    fn stop_cold(&mut self) {
        self.note_rss();
        if let Some(c) = self.cold.take() {
            c.stop();
        }
    }

    fn hot_status(&self) -> Value {
        self.hot.as_ref().map_or(Value::Null, Agent::status)
    }

    fn cold_status(&self) -> Value {
        self.cold.as_ref().map_or(Value::Null, Agent::status)
    }

    /// Waits until the hot side says the cold side has everything.
    fn wait_synced(&self, limit: Duration) -> Result<Duration, BenchError> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.hot_status()["synced"] == true {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Err(BenchError::Step {
            step: "wait for the sync".into(),
            message: format!(
                "not in sync after {limit:?}; logs in {}",
                self.root.display()
            ),
        })
    }

    fn verify(&self) -> bool {
        let Some(h) = &self.hot else { return false };
        matches!(
            artemis_sync::daemon::control::request(&h.sock, &Request::Verify, Duration::from_secs(300)),
            Ok(Reply::Verified(v)) if v.identical
        )
    }

    fn finish(mut self) -> (f64, f64) {
        self.note_rss();
        if let Some(h) = self.hot.take() {
            h.stop();
        }
        if let Some(c) = self.cold.take() {
            c.stop();
        }
        if std::env::var_os("ARTEMIS_SYNC_BENCH_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.root);
        }
        (self.peak_hot_mb, self.peak_cold_mb)
    }
}

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

fn tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

fn ms(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(round(d.as_secs_f64() * 1e3, 3)))
}

/// An rsync daemon on 127.0.0.1 serving `dir` as module `bench`.
struct RsyncDaemon {
    child: Child,
    port: u16,
}

impl RsyncDaemon {
    fn start(rsync: &Path, work: &Path, dir: &Path) -> Result<RsyncDaemon, BenchError> {
        let port = TcpListener::bind("127.0.0.1:0")
            .map_err(err("pick a port"))?
            .local_addr()
            .map_err(err("pick a port"))?
            .port();
        let conf = work.join("rsyncd.conf");
        fs::write(&conf, format!("use chroot = no\npid file = {}\n[bench]\npath = {}\nread only = no\nuid = root\ngid = root\n", work.join("rsyncd.pid").display(), dir.display()))
            .map_err(err("write rsyncd.conf"))?;
        let child = Command::new(rsync)
            .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--config={}", conf.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(err("start the rsync daemon"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(BenchError::Step {
                    step: "start the rsync daemon".into(),
                    message: "it does not listen".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(RsyncDaemon { child, port })
    }

    /// Runs `rsync <args> src/ rsync://127.0.0.1:port/bench/`; returns the time and the bytes
    /// it moved over the wire (sent + received, from `--stats`).
    fn push(&self, rsync: &Path, src: &Path, args: &[&str]) -> Result<(Duration, u64), BenchError> {
        let start = Instant::now();
        let out = Command::new(rsync)
            .args(args)
            .arg("--stats")
            .arg(format!("{}/", src.display()))
            .arg(format!("rsync://127.0.0.1:{}/bench/", self.port))
            .output()
            .map_err(err("run rsync"))?;
        let took = start.elapsed();
        if !out.status.success() {
            return Err(BenchError::Step {
                step: "rsync".into(),
                message: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let num = |key: &str| -> u64 {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l[key.len()..].split_whitespace().next())
                .map(|v| v.replace(',', "").parse().unwrap_or(0))
                .unwrap_or(0)
        };
        Ok((
            took,
            num("Total bytes sent:") + num("Total bytes received:"),
        ))
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies every file of `src` over a plain loopback TCP socket into `dst`.
fn raw_tcp_copy(src: &Path, dst: &Path) -> Result<Duration, BenchError> {
    fs::create_dir_all(dst).map_err(err("raw copy"))?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(err("raw copy"))?;
    let port = listener.local_addr().map_err(err("raw copy"))?.port();
    let mut files: Vec<(PathBuf, u64)> = Vec::new();
    for e in fs::read_dir(src.join("journal"))
        .map_err(err("raw copy"))?
        .flatten()
    {
        files.push((e.path(), e.metadata().map_err(err("raw copy"))?.len()));
    }
    files.sort();
    let plan: Vec<(String, u64)> = files
        .iter()
        .map(|(p, l)| {
            (
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                *l,
            )
        })
        .collect();
    let dst = dst.to_owned();
    let start = Instant::now();
    let receiver = std::thread::spawn(move || -> io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        for (name, len) in plan {
            let mut f = File::create(dst.join(name))?;
            let mut left = len;
            while left > 0 {
                let n = s.read(&mut buf[..(left as usize).min(1 << 20)])?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                f.write_all(&buf[..n])?;
                left -= n as u64;
            }
        }
        Ok(())
    });
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(err("raw copy"))?;
    let mut buf = vec![0u8; 1 << 20];
    for (p, _) in &files {
        let mut f = File::open(p).map_err(err("raw copy"))?;
        loop {
            let n = f.read(&mut buf).map_err(err("raw copy"))?;
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).map_err(err("raw copy"))?;
        }
    }
    drop(s);
    receiver
        .join()
        .map_err(|_| BenchError::Step {
            step: "raw copy".into(),
            message: "receiver panicked".into(),
        })?
        .map_err(err("raw copy"))?;
    Ok(start.elapsed())
}

// ------------------------------------------------------------------------------ workloads

fn initial_sync(s: &Settings, rss: &mut (f64, f64)) -> Result<Value, BenchError> {
    let mut p = Pair::new(s, "initial_sync")?;
    let bytes = make_tree(&p.hot_data, s.files, s.file_mib)?;
    let mb = bytes as f64 / 1e6;
    p.start_cold()?;
    let start = Instant::now();
    p.start_hot()?;
    p.wait_synced(Duration::from_secs(600))?;
    let ours = start.elapsed();
    let identical = p.verify();
    let raw = raw_tcp_copy(&p.hot_data, &p.root.join("raw-dst"))?;
    let _ = fs::remove_dir_all(p.root.join("raw-dst"));
    let (rsync_mbs, rsync_reason) = match tool("rsync") {
        None => (
            None,
            Some("rsync is not installed (benches/compare.sh installs it)".to_owned()),
        ),
        Some(rsync) => {
            let dst = p.root.join("rsync-dst");
            fs::create_dir_all(&dst).map_err(err("rsync dir"))?;
            let d = RsyncDaemon::start(&rsync, &p.root, &dst)?;
            let (t, _) = d.push(&rsync, &p.hot_data, &["-a", "--whole-file"])?;
            drop(d);
            let _ = fs::remove_dir_all(&dst);
            (Some(mb / t.as_secs_f64()), None)
        }
    };
    let r = p.finish();
    *rss = (rss.0.max(r.0), rss.1.max(r.1));
    let ours_mbs = mb / ours.as_secs_f64();
    let raw_mbs = mb / raw.as_secs_f64();
    Ok(json!({
        "bytes": bytes,
        "seconds": round(ours.as_secs_f64(), 3),
        "mb_per_s": round(ours_mbs, 1),
        "identical": identical,
        "raw_tcp_mb_per_s": round(raw_mbs, 1),
        "rsync_mb_per_s": rsync_mbs.map(|v| round(v, 1)),
        "ratio_vs_rsync": rsync_mbs.map(|r| round(ours_mbs / r, 2)),
        "ratio_vs_raw_tcp": round(ours_mbs / raw_mbs, 2),
        "rsync_null_reason": rsync_reason,
    }))
}

/// Rewrites `fraction` of the 4 KiB pages of the tree at random; returns the distinct pages.
fn rewrite_pages(dir: &Path, fraction: f64, seed: u64) -> Result<usize, BenchError> {
    let mut files: Vec<(PathBuf, u64)> = fs::read_dir(dir.join("journal"))
        .map_err(err("resync"))?
        .flatten()
        .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
        .collect();
    files.sort();
    let total_pages: u64 = files.iter().map(|(_, l)| l / 4096).sum();
    let want = (total_pages as f64 * fraction) as usize;
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

fn resync(s: &Settings, rss: &mut (f64, f64)) -> Result<Value, BenchError> {
    let mut p = Pair::new(s, "resync")?;
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
    let pages = rewrite_pages(&p.hot_data, 0.05, 0x5eed)?;
    let changed = pages as u64 * 4096;
    let hot_before = p.hot_status()["wire_bytes"].as_u64().unwrap_or(0);
    let start = Instant::now();
    p.start_cold()?;
    // wait for the new connection's comparison to finish
    std::thread::sleep(Duration::from_millis(20));
    p.wait_synced(Duration::from_secs(600))?;
    let ours = start.elapsed();
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
    let bound = 1.05 * changed as f64 + 0.01 * bytes as f64;
    Ok(json!({
        "tree_bytes": bytes,
        "changed_bytes": changed,
        "seconds": round(ours.as_secs_f64(), 3),
        "wire_bytes": wire,
        "wire_bound_bytes": bound as u64,
        "identical": identical,
        "rsync_seconds": rsync_s.map(|v| round(v, 3)),
        "rsync_wire_bytes": rsync_wire,
        "ratio_vs_rsync": rsync_s.map(|r| round(r / ours.as_secs_f64(), 2)),
        "rsync_null_reason": reason,
    }))
}

fn lag_figures(r: &workload::Report) -> (Value, Value, Value) {
    (
        ms(quantile(&r.lags, 0.5)),
        ms(quantile(&r.lags, 0.99)),
        ms(r.lags.last().copied()),
    )
}

/// Runs lsyncd (delay 0, rsync -I) from `src` to `dst` for the writer; returns its p50 lag.
fn lsyncd_lag(s: &Settings, root: &Path) -> Result<(Option<Value>, Option<String>), BenchError> {
    let (Some(lsyncd), Some(_rsync)) = (tool("lsyncd"), tool("rsync")) else {
        return Ok((
            None,
            Some("lsyncd or rsync is not installed (benches/compare.sh installs them)".into()),
        ));
    };
    let src = root.join("lsyncd-src");
    let dst = root.join("lsyncd-dst");
    fs::create_dir_all(&src).map_err(err("lsyncd"))?;
    fs::create_dir_all(&dst).map_err(err("lsyncd"))?;
    let conf = root.join("lsyncd.lua");
    fs::write(
        &conf,
        format!(
            "settings {{ nodaemon = true, insist = true }}\n\
             sync {{ default.rsync, source = {:?}, target = {:?}, delay = 0,\n  rsync = {{ binary = \"/usr/bin/rsync\", archive = true, _extra = {{ \"-I\" }} }} }}\n",
            src.display().to_string(),
            dst.display().to_string()
        ),
    )
    .map_err(err("lsyncd"))?;
    let log_path = root.join("lsyncd.log");
    let log = File::create(&log_path).map_err(err("lsyncd log"))?;
    let log2 = log.try_clone().map_err(err("lsyncd log"))?;
    let mut child = Command::new(lsyncd)
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(err("start lsyncd"))?;
    // ready once a marker written to the source shows up in the target
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0u32;
    while !dst.join(format!("ready.{n}")).exists() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok((
                None,
                Some("lsyncd did not start syncing within 20 s".into()),
            ));
        }
        n += 1;
        fs::write(src.join(format!("ready.{n}")), b"x").map_err(err("lsyncd"))?;
        std::thread::sleep(Duration::from_millis(200));
    }
    let cfg = WriterConfig {
        dir: src,
        rate_per_s: Some(s.rate),
        duration: Duration::from_secs(s.seconds.min(10)),
        file_bytes: workload::JOURNAL_FILE_BYTES,
        sample_every: 10,
        paging: false,
        first_file: 1,
    };
    let r = workload::run(&cfg, Some(&dst), |_| {}).map_err(err("lsyncd writer"));
    let _ = child.kill();
    let _ = child.wait();
    let r = r?;
    if r.lags.is_empty() {
        let tail: String = fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .join(" | ");
        return Ok((
            None,
            Some(format!(
                "lsyncd delivered none of the {} sampled records within {} s of their write (last log lines: {tail})",
                r.lost,
                workload::PROBE_TIMEOUT.as_secs()
            )),
        ));
    }
    Ok((Some(ms(quantile(&r.lags, 0.5))), None))
}

fn append(
    s: &Settings,
    rss: &mut (f64, f64),
    rate: Option<u32>,
    name: &str,
    per_second: &mut Vec<f64>,
) -> Result<(workload::Report, f64, f64, Pair), BenchError> {
    let mut p = Pair::new(s, name)?;
    p.start_cold()?;
    p.start_hot()?;
    p.wait_synced(Duration::from_secs(60))?;
    let (h0, c0) = (
        p.hot.as_ref().map(Agent::cpu).unwrap_or_default(),
        p.cold.as_ref().map(Agent::cpu).unwrap_or_default(),
    );
    let cfg = WriterConfig {
        dir: p.hot_data.clone(),
        rate_per_s: rate,
        duration: Duration::from_secs(s.seconds),
        file_bytes: workload::JOURNAL_FILE_BYTES,
        sample_every: 1,
        paging: true,
        first_file: 1,
    };
    let report = workload::run(&cfg, Some(&p.cold_data), |t| {
        per_second.push(t.records as f64 * workload::RECORD_BYTES as f64 / 1e6)
    })
    .map_err(err("writer"))?;
    let wall = report.elapsed.as_secs_f64();
    let (h1, c1) = (
        p.hot.as_ref().map(Agent::cpu).unwrap_or_default(),
        p.cold.as_ref().map(Agent::cpu).unwrap_or_default(),
    );
    let hot_cpu = (h1 - h0).as_secs_f64() / wall * 100.0;
    let cold_cpu = (c1 - c0).as_secs_f64() / wall * 100.0;
    p.note_rss();
    *rss = (rss.0.max(p.peak_hot_mb), rss.1.max(p.peak_cold_mb));
    Ok((report, hot_cpu, cold_cpu, p))
}

fn append_lag(
    s: &Settings,
    rss: &mut (f64, f64),
    curves: &mut Curves,
) -> Result<Value, BenchError> {
    let mut per_second = Vec::new();
    let (r, hot_cpu, cold_cpu, p) = append(s, rss, Some(s.rate), "append_lag", &mut per_second)?;
    let identical = p.verify();
    let root = p.root.clone();
    let (p50, p99, max) = lag_figures(&r);
    let _ = p.finish();
    fs::create_dir_all(&root).map_err(err("lsyncd dir"))?;
    let (lsyncd, reason) = lsyncd_lag(s, &root)?;
    let _ = fs::remove_dir_all(&root);
    curves.lags = r.lags.clone();
    let lsyncd_ratio = match (&lsyncd, p50.as_f64()) {
        (Some(Value::Number(l)), Some(o)) if o > 0.0 => {
            Some(round(l.as_f64().unwrap_or(0.0) / o, 1))
        }
        _ => None,
    };
    Ok(json!({
        "rate_per_s": s.rate,
        "records": r.records,
        "samples": r.lags.len(),
        "lost": r.lost,
        "p50_ms": p50, "p99_ms": p99, "max_ms": max,
        "p50_from_write_ms": ms(quantile(&r.lags_from_write, 0.5)),
        "p99_from_write_ms": ms(quantile(&r.lags_from_write, 0.99)),
        "hot_cpu_pct": round(hot_cpu, 1),
        "cold_cpu_pct": round(cold_cpu, 1),
        "identical": identical,
        "lsyncd_p50_ms": lsyncd,
        "lsyncd_ratio": lsyncd_ratio,
        "lsyncd_null_reason": reason,
    }))
}

/// The p99 lag `append_max` must keep.
pub const APPEND_MAX_P99: Duration = Duration::from_millis(20);

fn append_max(
    s: &Settings,
    rss: &mut (f64, f64),
    curves: &mut Curves,
    quick: bool,
) -> Result<Value, BenchError> {
    let mut p = Pair::new(s, "append_max")?;
    p.start_cold()?;
    p.start_hot()?;
    p.wait_synced(Duration::from_secs(60))?;
    // Double the rate while p99 stays within the bound; the figure is the best sustained rate.
    let step = if quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs((s.seconds / 4).max(2))
    };
    let mut rate = 2000u32;
    let mut steps = Vec::new();
    let mut best: Option<(f64, Value, u32)> = None;
    let (h0, c0, t0) = (
        p.hot.as_ref().map(Agent::cpu).unwrap_or_default(),
        p.cold.as_ref().map(Agent::cpu).unwrap_or_default(),
        Instant::now(),
    );
    let mut next_file = 1;
    loop {
        let cfg = WriterConfig {
            dir: p.hot_data.clone(),
            rate_per_s: Some(rate),
            duration: step,
            file_bytes: workload::JOURNAL_FILE_BYTES,
            sample_every: 4,
            paging: false,
            first_file: next_file,
        };
        let mut per_second = Vec::new();
        let r = workload::run(&cfg, Some(&p.cold_data), |t| {
            per_second.push(t.records as f64 * workload::RECORD_BYTES as f64 / 1e6)
        })
        .map_err(err("writer"))?;
        next_file += r.files;
        let mbs = r.bytes as f64 / 1e6 / r.elapsed.as_secs_f64();
        let p99 = quantile(&r.lags, 0.99);
        let ok = r.lost == 0 && p99.is_some_and(|d| d <= APPEND_MAX_P99);
        steps.push(
            json!({"rate_per_s": rate, "mb_per_s": round(mbs, 1), "p99_ms": ms(p99), "ok": ok}),
        );
        curves.throughput.extend(per_second);
        let kept_up = r.records as f64 >= 0.9 * f64::from(rate) * r.elapsed.as_secs_f64();
        if ok {
            best = Some((mbs, ms(p99), rate));
        }
        if !ok || !kept_up || rate >= 256_000 || (quick && steps.len() >= 3) {
            break;
        }
        rate *= 2;
    }
    let wall = t0.elapsed().as_secs_f64();
    let (h1, c1) = (
        p.hot.as_ref().map(Agent::cpu).unwrap_or_default(),
        p.cold.as_ref().map(Agent::cpu).unwrap_or_default(),
    );
    let identical = p.verify();
    let r = p.finish();
    *rss = (rss.0.max(r.0), rss.1.max(r.1));
    Ok(json!({
        "mb_per_s": best.as_ref().map(|b| round(b.0, 1)),
        "p99_ms": best.as_ref().map_or(Value::Null, |b| b.1.clone()),
        "rate_per_s": best.as_ref().map(|b| b.2),
        "steps": steps,
        "hot_cpu_pct": round((h1 - h0).as_secs_f64() / wall * 100.0, 1),
        "cold_cpu_pct": round((c1 - c0).as_secs_f64() / wall * 100.0, 1),
        "identical": identical,
    }))
}

fn random_writes(s: &Settings, rss: &mut (f64, f64)) -> Result<Value, BenchError> {
    let mut p = Pair::new(s, "random_writes")?;
    let files = (s.random_mib / 10).max(1);
    make_tree(&p.hot_data, files, s.random_mib.min(10))?;
    p.start_cold()?;
    p.start_hot()?;
    p.wait_synced(Duration::from_secs(120))?;
    let paths: Vec<PathBuf> = (0..files)
        .map(|i| p.hot_data.join(format!("journal/activemq-data-{i}.amq")))
        .collect();
    let handles: Vec<File> = paths
        .iter()
        .map(|x| OpenOptions::new().write(true).open(x))
        .collect::<Result<_, _>>()
        .map_err(err("random writes"))?;
    let pages_per_file = (s.random_mib.min(10) << 20) as u64 / 4096;
    let (tx, rx) = crossbeam_channel::bounded::<(usize, u64, [u8; 16], Instant)>(65536);
    let cold = p.cold_data.clone();
    let probe = std::thread::spawn(move || {
        // keyed by page: a page written again before the first write arrived only ever shows
        // the second content, so the first sample is superseded, not lost
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
    });
    let start = Instant::now();
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut n = 0u64;
    let mut page = vec![0u8; 4096];
    while start.elapsed() < Duration::from_secs(s.seconds) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let f = (x % files as u64) as usize;
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
    drop(tx);
    let (mut lags, superseded, lost) = probe.join().map_err(|_| BenchError::Step {
        step: "random writes".into(),
        message: "probe panicked".into(),
    })?;
    lags.sort();
    let converged = p.verify();
    let r = p.finish();
    *rss = (rss.0.max(r.0), rss.1.max(r.1));
    Ok(json!({
        "writes": n,
        "samples": lags.len(),
        "superseded": superseded,
        "lost": lost,
        "p50_ms": ms(quantile(&lags, 0.5)),
        "p99_ms": ms(quantile(&lags, 0.99)),
        "max_ms": ms(lags.last().copied()),
        "converged": converged,
        "rescan_interval_ms": artemis_sync::config::DEFAULT_RESCAN_INTERVAL_MS,
    }))
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
        let v = match w.as_str() {
            "initial_sync" => initial_sync(s, &mut rss)?,
            "resync" => resync(s, &mut rss)?,
            "append_lag" => append_lag(s, &mut rss, &mut curves)?,
            "append_max" => append_max(s, &mut rss, &mut curves, s.seconds <= 2)?,
            "random_writes" => random_writes(s, &mut rss)?,
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
    out.insert("dir".into(), json!(s.dir));
    Ok((Value::Object(out), curves))
}

/// The results as a table, each figure next to its baseline and target.
pub fn table(v: &Value) -> String {
    let mut t = String::new();
    let f = |x: &Value| match x {
        Value::Null => "null".to_owned(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    };
    let _ = writeln!(
        t,
        "{:<14} {:<20} {:>12}   {:<44} target",
        "workload", "figure", "value", "baseline (same run)"
    );
    let mut row = |w: &str, fig: &str, base: String, target: &str| {
        let val = &v[w][fig];
        if !v[w].is_null() {
            let _ = writeln!(
                t,
                "{:<14} {:<20} {:>12}   {:<44} {}",
                w,
                fig,
                f(val),
                base,
                target
            );
        }
    };
    row(
        "initial_sync",
        "mb_per_s",
        format!(
            "rsync {} MB/s, raw TCP {} MB/s",
            f(&v["initial_sync"]["rsync_mb_per_s"]),
            f(&v["initial_sync"]["raw_tcp_mb_per_s"])
        ),
        "",
    );
    row(
        "initial_sync",
        "ratio_vs_rsync",
        String::new(),
        ">= 3 (PSK), >= 2 (TLS)",
    );
    row(
        "initial_sync",
        "ratio_vs_raw_tcp",
        String::new(),
        ">= 0.5 (PSK)",
    );
    row(
        "resync",
        "seconds",
        format!("rsync {} s", f(&v["resync"]["rsync_seconds"])),
        "",
    );
    row(
        "resync",
        "wire_bytes",
        format!(
            "rsync {} bytes; changed {}",
            f(&v["resync"]["rsync_wire_bytes"]),
            f(&v["resync"]["changed_bytes"])
        ),
        &format!("<= {}", f(&v["resync"]["wire_bound_bytes"])),
    );
    row("resync", "ratio_vs_rsync", String::new(), ">= 2");
    row(
        "append_lag",
        "p50_ms",
        format!(
            "lsyncd p50 {} ms ({}x ours)",
            f(&v["append_lag"]["lsyncd_p50_ms"]),
            f(&v["append_lag"]["lsyncd_ratio"])
        ),
        "<= 1; lsyncd >= 20x",
    );
    row("append_lag", "p99_ms", String::new(), "<= 5");
    row(
        "append_lag",
        "p50_from_write_ms",
        "from before the write (upper bound)".into(),
        "",
    );
    row("append_lag", "p99_from_write_ms", String::new(), "");
    row("append_lag", "max_ms", String::new(), "");
    row("append_lag", "hot_cpu_pct", String::new(), "<= 15");
    row("append_lag", "cold_cpu_pct", String::new(), "");
    row(
        "append_max",
        "mb_per_s",
        format!(
            "at {} records/s, p99 {} ms",
            f(&v["append_max"]["rate_per_s"]),
            f(&v["append_max"]["p99_ms"])
        ),
        ">= 150 (p99 <= 20 ms)",
    );
    row("random_writes", "p50_ms", String::new(), "");
    row(
        "random_writes",
        "p99_ms",
        String::new(),
        "<= rescan interval (1000)",
    );
    row("random_writes", "converged", String::new(), "true");
    let _ = writeln!(
        t,
        "{:<14} {:<20} {:>12}   {:<44} <= {} each",
        "memory",
        "hot_rss_mb",
        f(&v["hot_rss_mb"]),
        format!("cold {} MiB", f(&v["cold_rss_mb"])),
        f(&v["rss_target_mb"])
    );
    t
}

/// An SVG with the `append_lag` CDF and the `append_max` throughput per second.
pub fn svg(c: &Curves) -> String {
    let (w, h, pad) = (900.0, 320.0, 50.0);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n", h * 2.0 + 40.0);
    // CDF
    let max = c
        .lags
        .last()
        .map_or(1.0, |d| d.as_secs_f64() * 1e3)
        .max(0.001);
    let _ = writeln!(s, "<text x=\"{pad}\" y=\"20\">append_lag: fraction of records on the cold disk within x ms (n = {})</text>", c.lags.len());
    let _ = writeln!(
        s,
        "<rect x=\"{pad}\" y=\"30\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888\"/>",
        w - 2.0 * pad,
        h - 60.0
    );
    let mut pts = String::new();
    for (i, d) in c
        .lags
        .iter()
        .enumerate()
        .step_by((c.lags.len() / 2000).max(1))
    {
        let x = pad + d.as_secs_f64() * 1e3 / max * (w - 2.0 * pad);
        let y = 30.0 + (h - 60.0) * (1.0 - (i + 1) as f64 / c.lags.len() as f64);
        let _ = write!(pts, "{x:.1},{y:.1} ");
    }
    let _ = writeln!(
        s,
        "<polyline points=\"{pts}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\"/>"
    );
    let _ = writeln!(s, "<text x=\"{pad}\" y=\"{}\">0 ms</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{max:.2} ms</text>", h - 15.0, w - pad, h - 15.0);
    // throughput
    let top = h + 20.0;
    let peak = c.throughput.iter().cloned().fold(1.0, f64::max);
    let _ = writeln!(s, "<text x=\"{pad}\" y=\"{}\">append_max: MB/s written (and replicated) per second, peak {peak:.0}</text>", top + 10.0);
    let _ = writeln!(
        s,
        "<rect x=\"{pad}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888\"/>",
        top + 20.0,
        w - 2.0 * pad,
        h - 60.0
    );
    let n = c.throughput.len().max(2) as f64 - 1.0;
    let pts: String = c
        .throughput
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{:.1},{:.1} ",
                pad + i as f64 / n * (w - 2.0 * pad),
                top + 20.0 + (h - 60.0) * (1.0 - v / peak)
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "<polyline points=\"{pts}\" fill=\"none\" stroke=\"#d62728\" stroke-width=\"1.5\"/>"
    );
    s.push_str("</svg>\n");
    s
}
