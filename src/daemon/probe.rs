//! The node's health probes (`[node] probe_tcp`, `probe_http`, `probe_command`), run on their
//! own thread so that a probe that hangs never blocks the agent's main loop.
//!
//! [`ProbeThread::start`] runs while a node runs: every `probe_interval_ms` it runs one round,
//! every probe of it at once (one scoped thread each), each bounded by `probe_timeout_ms`, and
//! sends the round's outcome on a bounded channel the main loop selects on. Dropping the
//! [`ProbeThread`] ends the thread (at the latest when the round in progress ends). Each round
//! carries the generation of the node it probed, so a late round of a stopped node is dropped.
//!
//! The HTTP probe is a small HTTP/1.1 GET written by hand over a `std` `TcpStream` with
//! timeouts: a health URL on loopback needs no TLS, redirects or pooling, and an HTTP client
//! crate would bring its own runtime into a thread that only needs one status line.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, Receiver, Sender};

use crate::config::health::split_http_url;
use crate::config::NodeConfig;

use super::node::{describe, Node};

/// How many rounds may wait for the main loop.
pub const PROBE_QUEUE: usize = 4;
/// The most of an HTTP answer read to find its status line, in bytes.
pub const HTTP_STATUS_LINE_MAX_BYTES: usize = 1024;

/// One round's outcome, for the node started as `generation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    pub generation: u64,
    /// `Ok`, or every failed probe's description, joined.
    pub result: Result<(), String>,
}

/// The probes `[node]` configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Tcp(String),
    Http { url: String },
    Command(Vec<String>),
}

impl Probe {
    /// Every probe `[node]` configures (none: no probe thread).
    pub fn from_config(n: &NodeConfig) -> Vec<Probe> {
        let tcp = n.probe_tcp.iter().cloned().map(Probe::Tcp);
        let http = n.probe_http.iter().map(|u| Probe::Http { url: u.clone() });
        let cmd = (!n.probe_command.is_empty()).then(|| Probe::Command(n.probe_command.clone()));
        tcp.chain(http).chain(cmd).collect()
    }

    /// Runs the probe, bounded by `timeout`; the error says what failed.
    pub fn run(&self, timeout: Duration) -> Result<(), String> {
        match self {
            Probe::Tcp(addr) => connect(addr, timeout)
                .map(drop)
                .map_err(|e| format!("tcp {addr}: {e}")),
            Probe::Http { url } => http_get(url, timeout).map_err(|e| format!("http {url}: {e}")),
            Probe::Command(cmd) => {
                command(cmd, timeout).map_err(|e| format!("command {}: {e}", cmd[0]))
            }
        }
    }
}

/// Connects to `addr` (resolved now) within `timeout`.
fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?
        .collect();
    connect_any(&addrs, timeout)
}

/// Connects to the first of `addrs` that accepts, in their order, all within `timeout`: a
/// name such as `localhost` may resolve to `::1` first while the node listens on IPv4 only.
fn connect_any(addrs: &[SocketAddr], timeout: Duration) -> Result<TcpStream, String> {
    let deadline = Instant::now() + timeout;
    let mut failures = Vec::new();
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            failures.push(format!("{addr}: not tried within the timeout"));
            break;
        }
        match TcpStream::connect_timeout(addr, left) {
            Ok(stream) => return Ok(stream),
            Err(e) => failures.push(format!("{addr}: {e}")),
        }
    }
    if failures.is_empty() {
        return Err("resolves to no address".into());
    }
    Err(format!("connect: {}", failures.join("; ")))
}

/// `GET path` on `url`: a 2xx status line within `timeout`, or why not.
pub fn http_get(url: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let (authority, path) = split_http_url(url)?;
    let mut stream = connect(&authority, timeout)?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    stream
        .set_write_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    let host = authority.trim_end_matches(":80");
    // one write: a server may answer (and close) after the first segment it reads
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: artemis-sync\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < HTTP_STATUS_LINE_MAX_BYTES {
        stream
            .set_read_timeout(Some(left()))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("no answer within {} ms", timeout.as_millis()))
            }
            Err(e) => return Err(format!("receive: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or("");
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP answer: {line:?}"))?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

/// Runs `cmd` (its own process group); it must exit 0 within `timeout`, else it is killed.
fn command(cmd: &[String], timeout: Duration) -> Result<(), String> {
    let child = Node::spawn(cmd, &[]).map_err(|e| e.to_string())?;
    match child.exited().recv_timeout(timeout) {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(describe(status)),
        Err(_) => {
            child.stop(Duration::ZERO);
            Err(format!(
                "did not finish within {} ms and was killed",
                timeout.as_millis()
            ))
        }
    }
}

/// Runs every probe at once, each bounded by `timeout`.
pub fn round(probes: &[Probe], timeout: Duration) -> Result<(), String> {
    let errors: Vec<String> = std::thread::scope(|s| {
        let runs: Vec<_> = probes
            .iter()
            .map(|p| s.spawn(move || p.run(timeout)))
            .collect();
        runs.into_iter()
            .filter_map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("the probe panicked".into()))
                    .err()
            })
            .collect()
    });
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// The running probe thread of one node; dropping it ends the thread.
#[derive(Debug)]
pub struct ProbeThread {
    _stop: Sender<()>,
}

impl ProbeThread {
    /// Starts probing the node started as `generation`: rounds every `interval`, each probe
    /// bounded by `timeout`, outcomes to `out`.
    pub fn start(
        probes: Vec<Probe>,
        generation: u64,
        interval: Duration,
        timeout: Duration,
        out: Sender<Round>,
    ) -> std::io::Result<ProbeThread> {
        let (stop_tx, stop) = bounded::<()>(0);
        std::thread::Builder::new()
            .name(format!("probe-{generation}"))
            .spawn(move || run(&probes, generation, interval, timeout, &out, &stop))?;
        Ok(ProbeThread { _stop: stop_tx })
    }
}

fn run(
    probes: &[Probe],
    generation: u64,
    interval: Duration,
    timeout: Duration,
    out: &Sender<Round>,
    stop: &Receiver<()>,
) {
    let mut next = Instant::now() + interval;
    loop {
        select! {
            recv(stop) -> _ => return,
            default(next.saturating_duration_since(Instant::now())) => {}
        }
        next += interval;
        let result = round(probes, timeout);
        select! {
            send(out, Round { generation, result }) -> sent => if sent.is_err() { return },
            recv(stop) -> _ => return,
        }
        // a round that ran late does not make the next one early
        next = next.max(Instant::now());
    }
}

/// A channel for the rounds of every probe thread of one supervisor.
pub fn channel() -> (Sender<Round>, Receiver<Round>) {
    bounded(PROBE_QUEUE)
}

#[cfg(test)]
mod tests;
