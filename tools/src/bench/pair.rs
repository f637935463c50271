//! A pair of real `artemis-sync agent` processes, hot and cold, on 127.0.0.1: started with a
//! config per side (the watch capture, or the FUSE capture with async or durable acks),
//! waited for, measured (CPU time, peak RSS) and removed, the FUSE mount detached with it.

use artemis_sync::daemon::listen_fds::command_with_listener;
use artemis_sync::daemon::protocol::{Reply, Request};

use super::*;

/// How often [`Pair::wait_synced`] asks the hot agent whether the cold copy caught up. Each
/// `status` is a connection and a thread on the agent: asked every 2 ms, as before, the asking
/// took about a tenth of the initial sync's throughput on this project's 2-vCPU VMs.
const SYNC_POLL: Duration = Duration::from_millis(25);

// ------------------------------------------------------------------------------ agents

pub(super) struct Agent {
    pub(super) child: Child,
    pub(super) sock: PathBuf,
}

impl Agent {
    pub(super) fn status(&self) -> Value {
        match artemis_sync::daemon::control::request(
            &self.sock,
            &Request::Status,
            Duration::from_secs(5),
        ) {
            Ok(Reply::Status(s)) => serde_json::to_value(s).unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory (VmHWM) in MiB.
    pub(super) fn peak_rss_mb(&self) -> f64 {
        proc_status_kb(self.pid(), "VmHWM:").map_or(0.0, |kb| kb as f64 / 1024.0)
    }

    /// User + system CPU time so far.
    pub(super) fn cpu(&self) -> Duration {
        cpu_time(self.pid())
    }

    pub(super) fn stop(mut self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our live child.
        unsafe {
            libc::kill(
                libc::pid_t::try_from(self.pid()).expect("a child's pid came from a pid_t"),
                libc::SIGTERM,
            );
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

pub(super) fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub(super) fn cpu_time(pid: u32) -> Duration {
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
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).unwrap_or(100).max(1);
    Duration::from_millis(ticks * 1000 / hz)
}

/// How the hot agent sees the writes, and when a sync through it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Capture {
    /// `capture = "watch"`: inotify and rescans of `data_dir`; writers write `data_dir`.
    Watch,
    /// `capture = "fuse"`, `ack = "async"`: writers write through the mount.
    FuseAsync,
    /// `capture = "fuse"`, `ack = "durable"`: a sync returns once the cold side has fsynced.
    FuseDurable,
}

impl Capture {
    /// The `[replication]` lines of this capture; `mnt` is the side's mount point.
    fn config_lines(self, mnt: &Path) -> String {
        let ack = match self {
            Capture::Watch => return "capture = \"watch\"\n".to_owned(),
            Capture::FuseAsync => "async",
            Capture::FuseDurable => "durable",
        };
        format!("capture = \"fuse\"\nmount_point = {mnt:?}\nack = \"{ack}\"\n")
    }
}

/// Why the FUSE workloads cannot run here, if they cannot: they need root and /dev/fuse.
pub(super) fn fuse_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (the hot agent mounts a FUSE filesystem)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing (modprobe fuse)".into());
    }
    None
}

/// The `[replication]` lines of `capture` (and of `--rescan-ms`) for a side mounting at `mnt`.
fn capture_lines(s: &Settings, capture: Capture, mnt: &Path) -> String {
    let mut lines = capture.config_lines(mnt);
    if let Some(ms) = s.rescan_ms {
        lines.push_str(&format!(
            "rescan_interval_ms = {ms}\ndeep_rescan_interval_ms = {ms}\n"
        ));
    }
    lines
}

/// Prepares the pair's authentication under `root`: the `[replication]` line of a PSK or of
/// `insecure`, or "TLS" once the certificates are made (each side then names its own).
fn auth_setup(mode: AuthMode, root: &Path) -> Result<String, BenchError> {
    let auth = match mode {
        AuthMode::Insecure => "insecure_loopback = true".to_owned(),
        AuthMode::Psk => {
            let psk = root.join("psk");
            let key = artemis_sync::replicated::wire::nonce().map_err(err("make a key"))?;
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            artemis_sync::sys::write_atomic(&psk, hex.as_bytes()).map_err(err("write the psk"))?;
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
    Ok(auth)
}

/// Lazily detaches whatever is mounted at `dir` (nothing when nothing is).
fn detach(dir: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    unsafe {
        libc::umount2(c.as_ptr(), libc::MNT_DETACH);
    }
}

/// A hot and a cold agent on fresh directories.
pub(super) struct Pair {
    pub(super) root: PathBuf,
    pub(super) hot_data: PathBuf,
    /// Where writers write: the mount point with the FUSE capture, else `hot_data`.
    pub(super) write_dir: PathBuf,
    pub(super) capture: Capture,
    pub(super) cold_data: PathBuf,
    pub(super) hot_cfg: PathBuf,
    pub(super) cold_cfg: PathBuf,
    pub(super) bin: PathBuf,
    pub(super) hot: Option<Agent>,
    pub(super) cold: Option<Agent>,
    pub(super) peak_hot_mb: f64,
    pub(super) peak_cold_mb: f64,
    /// The benchmark's own CPU (writer, probe) in its last append run, % of a core.
    pub(super) bench_cpu_pct: f64,
    /// The hot agent's replication listener, handed to each hot agent started.
    hot_listener: TcpListener,
    /// The cold agent's.
    cold_listener: TcpListener,
}

impl Pair {
    pub(super) fn new(s: &Settings, name: &str, capture: Capture) -> Result<Pair, BenchError> {
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
        let auth = auth_setup(s.auth, &root)?;
        let mut cfgs = Vec::new();
        for (side, listen, peer) in [("hot", ports.0, ports.1), ("cold", ports.1, ports.0)] {
            let dir = root.join(side);
            fs::create_dir_all(dir.join("base")).map_err(err("create a side"))?;
            fs::create_dir_all(dir.join("data")).map_err(err("create a side"))?;
            fs::create_dir_all(dir.join("mnt")).map_err(err("create a side"))?;
            let capture_lines = capture_lines(s, capture, &dir.join("mnt"));
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
            // both agents on one host: each serves its metrics on a port of its own (on the
            // default port the second one logged an error and retried every 3 s)
            let text = format!(
                "[node]\nbase_dir = {:?}\n\n[storage]\nmode = \"replicated\"\n\n[replication]\nrole = \"{side}\"\ndata_dir = {:?}\n\
                 listen = \"127.0.0.1:{listen}\"\npeer = \"127.0.0.1:{peer}\"\n{auth}\nstate_file = {:?}\n{capture_lines}\n\
                 [lock]\nmachine_name = \"{side}\"\n\n[agent]\ncontrol_socket = {:?}\n\n\
                 [metrics]\nlisten = \"127.0.0.1:0\"\n",
                dir.join("base"), dir.join("data"), dir.join("state.json"), dir.join("agent.sock")
            );
            let cfg = dir.join("agent.toml");
            fs::write(&cfg, text).map_err(err("write a config"))?;
            cfgs.push(cfg);
        }
        Ok(Pair {
            hot_data: root.join("hot/data"),
            write_dir: root.join(if capture == Capture::Watch {
                "hot/data"
            } else {
                "hot/mnt"
            }),
            capture,
            cold_data: root.join("cold/data"),
            hot_cfg: cfgs[0].clone(),
            cold_cfg: cfgs[1].clone(),
            root,
            bin: s.agent_bin.clone(),
            hot: None,
            cold: None,
            peak_hot_mb: 0.0,
            peak_cold_mb: 0.0,
            bench_cpu_pct: 0.0,
            hot_listener,
            cold_listener,
        })
    }

    pub(super) fn spawn(
        &self,
        cfg: &Path,
        log: &str,
        listener: &TcpListener,
    ) -> Result<Agent, BenchError> {
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

    pub(super) fn start_cold(&mut self) -> Result<(), BenchError> {
        self.cold = Some(self.spawn(&self.cold_cfg, "cold.log", &self.cold_listener)?);
        Ok(())
    }

    pub(super) fn start_hot(&mut self) -> Result<(), BenchError> {
        self.hot = Some(self.spawn(&self.hot_cfg, "hot.log", &self.hot_listener)?);
        Ok(())
    }

    pub(super) fn note_rss(&mut self) {
        if let Some(h) = &self.hot {
            self.peak_hot_mb = self.peak_hot_mb.max(h.peak_rss_mb());
        }
        if let Some(c) = &self.cold {
            self.peak_cold_mb = self.peak_cold_mb.max(c.peak_rss_mb());
        }
    }

    pub(super) fn stop_cold(&mut self) {
        self.note_rss();
        if let Some(c) = self.cold.take() {
            c.stop();
        }
    }

    pub(super) fn hot_status(&self) -> Value {
        self.hot.as_ref().map_or(Value::Null, Agent::status)
    }

    pub(super) fn cold_status(&self) -> Value {
        self.cold.as_ref().map_or(Value::Null, Agent::status)
    }

    /// Waits until the hot side says the cold side has everything; returns when that was, by
    /// the hot agent's own record of the end of its initial sync or resync
    /// (`sync_done.finished_unix_ms`), or when it first said so where it has none. Asked every
    /// [`SYNC_POLL`], so the asking costs the agents nothing measurable and the time loses no
    /// precision.
    pub(super) fn wait_synced(&self, limit: Duration) -> Result<SystemTime, BenchError> {
        let start = Instant::now();
        while start.elapsed() < limit {
            let status = self.hot_status();
            if status["synced"] == true {
                let finished = status["sync_done"]["finished_unix_ms"]
                    .as_u64()
                    .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
                return Ok(finished.unwrap_or_else(SystemTime::now));
            }
            std::thread::sleep(SYNC_POLL);
        }
        Err(BenchError::Step {
            step: "wait for the sync".into(),
            message: format!(
                "not in sync after {limit:?}; logs in {}",
                self.root.display()
            ),
        })
    }

    /// Waits until the cold side has the hot side's stream; when it did.
    pub(super) fn wait_connected(&self, limit: Duration) -> Result<Instant, BenchError> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.cold_status()["connected"] == true {
                return Ok(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Err(BenchError::Step {
            step: "wait for the connection".into(),
            message: format!(
                "the hot side did not connect within {limit:?}; logs in {}",
                self.root.display()
            ),
        })
    }

    pub(super) fn verify(&self) -> bool {
        let Some(h) = &self.hot else { return false };
        matches!(
            artemis_sync::daemon::control::request(&h.sock, &Request::Verify, Duration::from_secs(300)),
            Ok(Reply::Verified(v)) if v.identical
        )
    }

    /// Hot and cold CPU time so far.
    pub(super) fn cpu(&self) -> (Duration, Duration) {
        (
            self.hot.as_ref().map(Agent::cpu).unwrap_or_default(),
            self.cold.as_ref().map(Agent::cpu).unwrap_or_default(),
        )
    }

    /// Stops both agents (their peak RSS noted).
    pub(super) fn stop_agents(&mut self) {
        self.note_rss();
        if let Some(h) = self.hot.take() {
            h.stop();
        }
        if let Some(c) = self.cold.take() {
            c.stop();
        }
    }

    pub(super) fn finish(mut self) -> (f64, f64) {
        self.stop_agents();
        detach(&self.root.join("hot/mnt"));
        if std::env::var_os("ARTEMIS_SYNC_BENCH_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.root);
        }
        (self.peak_hot_mb, self.peak_cold_mb)
    }
}

impl Drop for Pair {
    /// On an error path: the agents are killed and a mount left behind detached.
    fn drop(&mut self) {
        drop(self.hot.take());
        drop(self.cold.take());
        if self.capture != Capture::Watch {
            detach(&self.root.join("hot/mnt"));
        }
    }
}
