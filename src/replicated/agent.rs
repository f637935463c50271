//! The agent of replicated mode: one per VM, hot or cold, with an epoch kept on disk.
//!
//! Every agent listens (`[replication] listen`) so that it can refuse, or step down for, a peer.
//! The hot one also runs the sender (connecting to `peer`) and the node. Promotion is manual:
//! `artemis-sync promote` on the cold host bumps the epoch, records it, becomes hot, links
//! `${BASE_DIR}/artemis` to the data directory and starts the node; `artemis-sync demote` on the
//! hot host stops the node, drains the stream, and becomes cold.
//!
//! Epoch rules (the gate): a cold side accepts a hot side whose epoch is at least the highest
//! it has seen, and records it; a hot side refuses every stream, except that a hot side at a
//! newer epoch makes it step down (fence its node, become cold) so that the newer one can
//! resync it. A sender told by its peer that a newer epoch exists does the same. An old hot
//! therefore never pushes its pages over a newer copy: it is turned cold and overwritten.

use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{bounded, never, select, Receiver, Sender};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ReplRole, ReplicationConfig};
use crate::daemon::control::{self, Request};
use crate::daemon::node::{self, Node};
use crate::daemon::ShutdownReason;
use crate::link::{self, LinkOptions};
use crate::replicated::channel::Auth;
use crate::replicated::receiver::{self, Gate, ReceiverConfig, ReceiverHandle};
use crate::replicated::sender::{
    self, ScanMsg, SenderConfig, SenderEvent, SenderHandle, VerifyReport,
};
use crate::replicated::wire::Psk;

/// A hot side that sent a frame this recently counts as connected and streaming for `promote`.
pub const STREAMING_WITHIN: Duration = Duration::from_secs(3);
/// How long `demote` waits for the cold side to acknowledge everything.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `verify` may take.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(300);

/// Errors that stop the replicated agent, each naming the file or address.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ReplicaError {
    /// state file {path:?}: {reason}
    State { path: PathBuf, reason: String },
    /// data directory {path:?}: {source}
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// cannot listen on {addr}: {source}
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// PSK file {path:?}: {reason}
    Psk { path: PathBuf, reason: String },
    /// cannot start: {0}
    Start(String),
}

/// What survives a restart: the epoch and the role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplState {
    /// The highest epoch this host has held or accepted.
    pub epoch: u64,
    /// Hot or cold.
    pub role: ReplRole,
}

/// Reads the state file; `None` if there is none yet.
pub fn load_state(path: &Path) -> Result<Option<ReplState>, ReplicaError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ReplicaError::State { path: path.to_owned(), reason: format!("is corrupt ({e}); it holds the epoch: restore it, or remove it only if you know which host is hot") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ReplicaError::State { path: path.to_owned(), reason: e.to_string() }),
    }
}

fn save_state(path: &Path, state: &ReplState) -> Result<(), ReplicaError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| ReplicaError::State {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    let mut text = serde_json::to_vec_pretty(state).expect("state serializes");
    text.push(b'\n');
    crate::sys::write_atomic(path, &text).map_err(|e| ReplicaError::State {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// The state shared between the agent and the receiver's gate.
struct Shared {
    state: Mutex<ReplState>,
    path: PathBuf,
    step_down: Sender<u64>,
}

impl Shared {
    fn get(&self) -> ReplState {
        *self.state.lock().expect("state lock")
    }

    fn set(&self, new: ReplState) -> Result<(), ReplicaError> {
        let mut st = self.state.lock().expect("state lock");
        save_state(&self.path, &new)?;
        *st = new;
        Ok(())
    }
}

impl Gate for Shared {
    fn still_admitted(&self, peer_epoch: u64) -> bool {
        let st = self.state.lock().expect("state lock");
        st.role == ReplRole::Cold && st.epoch == peer_epoch
    }

    fn admit(&self, peer_epoch: u64, node: &str) -> Result<u64, (u64, String)> {
        let mut st = self.state.lock().expect("state lock");
        match st.role {
            ReplRole::Cold if peer_epoch < st.epoch => Err((
                st.epoch,
                format!("stale epoch {peer_epoch}: this side has seen epoch {}; {node} must demote and resync from the current hot", st.epoch),
            )),
            ReplRole::Cold => {
                if peer_epoch != st.epoch {
                    let new = ReplState { epoch: peer_epoch, role: ReplRole::Cold };
                    save_state(&self.path, &new).map_err(|e| (st.epoch, e.to_string()))?;
                    *st = new;
                }
                Ok(st.epoch)
            }
            ReplRole::Hot if peer_epoch > st.epoch => {
                let _ = self.step_down.try_send(peer_epoch);
                Err((st.epoch, format!("this side was hot at the older epoch {} and is stepping down; retry", st.epoch)))
            }
            ReplRole::Hot => Err((
                st.epoch,
                format!("this side is hot at epoch {} (yours is {peer_epoch}): demote and resync from it", st.epoch),
            )),
        }
    }
}

/// The answer to `status` in replicated mode.
#[derive(Debug, Serialize)]
struct Status {
    mode: &'static str,
    role: ReplRole,
    epoch: u64,
    holder: String,
    data_dir: String,
    peer: String,
    connected: bool,
    /// Hot: the cold side has everything seen so far (first comparison done, all acknowledged).
    synced: Option<bool>,
    last_ack_age_ms: Option<u64>,
    drained: Option<bool>,
    wire_bytes: u64,
    /// Cold: bytes it sent back (index, acknowledgements).
    wire_out_bytes: Option<u64>,
    data_bytes: u64,
    batches: u64,
    node_pid: Option<u32>,
    node_state: &'static str,
    error: Option<String>,
}

struct Replica {
    config: Config,
    repl: ReplicationConfig,
    shared: Arc<Shared>,
    auth: Auth,
    rt: tokio::runtime::Runtime,
    receiver: ReceiverHandle,
    sender: Option<SenderHandle>,
    node: Option<Node>,
    last_error: Option<String>,
}

/// How the replication peers authenticate, from the config (files named in errors).
pub fn auth_from(repl: &ReplicationConfig) -> Result<Auth, ReplicaError> {
    if repl.insecure_loopback {
        return Ok(Auth::Insecure);
    }
    if !repl.tls_cert.as_os_str().is_empty() {
        return crate::replicated::channel::TlsPair::load(
            &repl.tls_cert,
            &repl.tls_key,
            &repl.tls_ca,
        )
        .map(|p| Auth::Tls(Arc::new(p)))
        .map_err(|e| ReplicaError::Start(e.to_string()));
    }
    let text = std::fs::read_to_string(&repl.psk_file).map_err(|e| ReplicaError::Psk {
        path: repl.psk_file.clone(),
        reason: e.to_string(),
    })?;
    Psk::from_hex(&text)
        .map(Auth::Psk)
        .map_err(|reason| ReplicaError::Psk {
            path: repl.psk_file.clone(),
            reason,
        })
}

/// Runs the replicated agent until `shutdown`; control requests on `control`.
pub fn run(
    config: Config,
    control_listener: UnixListener,
    shutdown: Receiver<ShutdownReason>,
) -> Result<ShutdownReason, ReplicaError> {
    let repl = config
        .replication
        .clone()
        .expect("validated: replicated mode has its section");
    std::fs::create_dir_all(&repl.data_dir).map_err(|source| ReplicaError::DataDir {
        path: repl.data_dir.clone(),
        source,
    })?;
    let data_dir = repl
        .data_dir
        .canonicalize()
        .map_err(|source| ReplicaError::DataDir {
            path: repl.data_dir.clone(),
            source,
        })?;
    let state = match load_state(&repl.state_file)? {
        Some(s) => s,
        None => {
            let s = ReplState {
                epoch: u64::from(repl.role == ReplRole::Hot),
                role: repl.role,
            };
            save_state(&repl.state_file, &s)?;
            s
        }
    };
    let auth = auth_from(&repl)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("replication-net")
        .enable_all()
        .build()
        .map_err(|e| ReplicaError::Start(format!("tokio runtime: {e}")))?;
    let (step_tx, step_rx) = bounded::<u64>(4);
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        path: repl.state_file.clone(),
        step_down: step_tx,
    });
    let std_listener =
        std::net::TcpListener::bind(&repl.listen).map_err(|source| ReplicaError::Listen {
            addr: repl.listen.clone(),
            source,
        })?;
    std_listener
        .set_nonblocking(true)
        .map_err(|source| ReplicaError::Listen {
            addr: repl.listen.clone(),
            source,
        })?;
    let listener = {
        let _enter = rt.enter();
        tokio::net::TcpListener::from_std(std_listener).map_err(|source| ReplicaError::Listen {
            addr: repl.listen.clone(),
            source,
        })?
    };
    let receiver = receiver::start(
        ReceiverConfig {
            root: data_dir.clone(),
            page_size: repl.page_size as usize,
            auth: auth.clone(),
            gate: shared.clone(),
        },
        listener,
        rt.handle(),
    );
    let (requests_tx, requests_rx) = bounded::<Request>(8);
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            control::serve(
                control_listener,
                requests_tx,
                crate::daemon::CONTROL_REPLY_TIMEOUT,
            )
        })
        .map_err(|e| ReplicaError::Start(format!("control thread: {e}")))?;
    let mut repl_cfg = repl.clone();
    repl_cfg.data_dir = data_dir;
    let mut me = Replica {
        config,
        repl: repl_cfg,
        shared,
        auth,
        rt,
        receiver,
        sender: None,
        node: None,
        last_error: None,
    };
    tracing::info!(role = ?state.role, epoch = state.epoch, listen = %me.repl.listen, peer = %me.repl.peer, "replication agent started");
    if state.role == ReplRole::Hot {
        me.become_hot()?;
    }
    crate::daemon::sdnotify::ready(
        &format!("{:?} at epoch {}", state.role, state.epoch).to_lowercase(),
    );
    let watchdog = crate::daemon::sdnotify::watchdog_interval();
    loop {
        let sender_events = me.sender.as_ref().map_or(never(), |s| s.events.clone());
        let node_exit = me.node.as_ref().map_or(never(), |n| n.exited().clone());
        select! {
            recv(shutdown) -> reason => {
                let reason = reason.unwrap_or(ShutdownReason::Signal(libc::SIGTERM));
                tracing::info!(%reason, "stopping");
                me.shutdown();
                return Ok(reason);
            }
            recv(requests_rx) -> req => if let Ok(req) = req { me.handle(req) },
            recv(step_rx) -> epoch => if let Ok(epoch) = epoch { me.step_down(epoch, "a hot side at a newer epoch connected") },
            recv(sender_events) -> ev => if let Ok(SenderEvent::Rejected { epoch, reason }) = ev {
                if epoch > me.shared.get().epoch {
                    me.step_down(epoch, &reason);
                } else {
                    me.note_error(format!("the peer refused our stream: {reason}"));
                }
            },
            recv(node_exit) -> status => if let Ok(status) = status {
                me.node = None;
                me.note_error(format!("the node {}", node::describe(status)));
            },
            default(watchdog.unwrap_or(Duration::from_secs(1))) => {}
        }
        if watchdog.is_some() {
            crate::daemon::sdnotify::watchdog();
        }
    }
}

impl Replica {
    fn become_hot(&mut self) -> Result<(), ReplicaError> {
        let st = self.shared.get();
        if let Err(e) = link::link(
            &self.config.artemis_link(),
            &self.repl.data_dir,
            LinkOptions {
                migrate: false,
                force: true,
            },
        ) {
            self.note_error(format!(
                "cannot link {}: {}",
                self.config.artemis_link().display(),
                crate::error_chain(&e)
            ));
        }
        let peer: SocketAddr = self
            .repl
            .peer
            .parse()
            .map_err(|e| ReplicaError::Start(format!("peer {}: {e}", self.repl.peer)))?;
        let cfg = SenderConfig {
            root: self.repl.data_dir.clone(),
            page_size: self.repl.page_size as usize,
            peer,
            auth: self.auth.clone(),
            node: self.config.holder_id(),
            epoch: st.epoch,
            rescan: Duration::from_millis(self.repl.rescan_interval_ms),
            deep_rescan: Duration::from_millis(self.repl.deep_rescan_interval_ms),
            window_bytes: (self.repl.window_mb as usize) << 20,
        };
        let sender = sender::start(cfg, self.rt.handle())
            .map_err(|e| ReplicaError::Start(crate::error_chain(&e)))?;
        self.sender = Some(sender);
        if self.node.is_none() {
            let env = [
                ("ARTEMIS_SYNC_EPOCH", st.epoch.to_string()),
                ("ARTEMIS_SYNC_HOLDER", self.config.holder_id()),
            ];
            match Node::start(&self.config.node, &env) {
                Ok(Some(n)) => {
                    tracing::info!(pid = n.pid(), epoch = st.epoch, "node started");
                    self.node = Some(n);
                }
                Ok(None) => {}
                Err(e) => self.note_error(e.to_string()),
            }
        }
        tracing::info!(epoch = st.epoch, peer = %self.repl.peer, "hot: streaming to the cold side");
        Ok(())
    }

    fn stop_node(&mut self) {
        if let Some(n) = self.node.take() {
            let pid = n.pid();
            let how = n.stop(Duration::from_millis(self.config.node.stop_timeout_ms));
            tracing::info!(pid, ?how, "node stopped");
        }
    }

    /// A newer epoch exists: stop the node and the sender, become cold, wait to be resynced.
    fn step_down(&mut self, epoch: u64, why: &str) {
        let st = self.shared.get();
        if st.role != ReplRole::Hot {
            return;
        }
        tracing::error!(
            epoch = st.epoch,
            newer = epoch,
            "FENCING: {why}; stopping the node and turning cold to be resynced"
        );
        self.stop_node();
        if let Some(s) = self.sender.take() {
            s.stop();
        }
        if let Err(e) = self.shared.set(ReplState {
            epoch: st.epoch,
            role: ReplRole::Cold,
        }) {
            self.note_error(e.to_string());
        }
        self.note_error(format!("stepped down: {why}"));
    }

    fn shutdown(&mut self) {
        if self.shared.get().role == ReplRole::Hot {
            self.stop_node();
            match self.drain() {
                Ok(seq) => tracing::info!(seq, "drained: the cold side has everything"),
                Err(e) => tracing::warn!("could not drain before stopping: {e}"),
            }
        }
        if let Some(s) = self.sender.take() {
            s.stop();
        }
        self.receiver.stop();
    }

    fn drain(&self) -> Result<u64, String> {
        let Some(s) = &self.sender else {
            return Err("no stream".into());
        };
        let (tx, rx) = bounded(1);
        s.ctl
            .send(ScanMsg::Drain(tx))
            .map_err(|_| "the scanner stopped".to_string())?;
        crate::daemon::sdnotify::recv_pinging(&rx, DRAIN_TIMEOUT)
            .map_err(|_| format!("no answer within {} s", DRAIN_TIMEOUT.as_secs()))?
    }

    fn handle(&mut self, req: Request) {
        let mut words = req.command.split_whitespace();
        let cmd = words.next().unwrap_or("");
        let force = words.any(|w| w == "--force");
        let answer = match cmd {
            "status" => Ok(serde_json::to_string(&self.status()).expect("status serializes")),
            "promote" => self.promote(force),
            "demote" => self.demote(force),
            "verify" => self.verify(),
            "release" => Err("replicated mode has no lease to release: use `artemis-sync demote` on the hot host".into()),
            other => Err(format!("unknown command {other:?} (expected status, promote, demote or verify)")),
        };
        let _ = req.reply.send(answer);
    }

    fn promote(&mut self, force: bool) -> Result<String, String> {
        let st = self.shared.get();
        if st.role == ReplRole::Hot {
            return Err(format!("this host is already hot (epoch {})", st.epoch));
        }
        let rs = &self.receiver.stats;
        let now = crate::sys::now_unix_ms();
        let last_frame = rs.last_frame_unix_ms.load(Ordering::Relaxed);
        let streaming = rs.connected.load(Ordering::Relaxed)
            && now.saturating_sub(last_frame) < STREAMING_WITHIN.as_millis() as u64;
        let peer = rs
            .peer
            .lock()
            .expect("peer lock")
            .clone()
            .unwrap_or_else(|| self.repl.peer.clone());
        if streaming && !force {
            return Err(format!(
                "the hot side {peer} is connected and streaming (last frame {} ms ago): demote it first (`artemis-sync demote` there), or promote --force if it cannot be reached",
                now.saturating_sub(last_frame)
            ));
        }
        let last_ack = rs.last_ack_unix_ms.load(Ordering::Relaxed);
        let drained = rs.drained.load(Ordering::Relaxed);
        let new = ReplState {
            epoch: st.epoch + 1,
            role: ReplRole::Hot,
        };
        self.shared.set(new).map_err(|e| e.to_string())?;
        if let Err(e) = self.become_hot() {
            return Err(e.to_string());
        }
        let behind = if last_ack == 0 {
            "no batch was ever acknowledged here".to_string()
        } else {
            format!("last batch applied {} ms ago", now.saturating_sub(last_ack))
        };
        let clean = if drained {
            "the old hot drained its stream before leaving: the copy is complete"
        } else {
            "the old hot did NOT send a drained marker: writes after the last applied batch may be missing"
        };
        tracing::warn!(
            epoch = new.epoch,
            forced = force,
            drained,
            "PROMOTED: {behind}; {clean}"
        );
        Ok(serde_json::json!({ "epoch": new.epoch, "forced": force, "drained": drained, "behind": behind, "summary": clean }).to_string())
    }

    fn demote(&mut self, force: bool) -> Result<String, String> {
        let st = self.shared.get();
        if st.role != ReplRole::Hot {
            return Err(format!("this host is not hot (epoch {})", st.epoch));
        }
        self.stop_node();
        let drained = self.drain();
        if let Err(e) = &drained {
            if !force {
                return Err(format!("the node is stopped, but the stream could not be drained ({e}); this host stays hot so nothing is lost: demote again once the cold side is connected, or demote --force"));
            }
        }
        if let Some(s) = self.sender.take() {
            s.stop();
        }
        self.shared
            .set(ReplState {
                epoch: st.epoch,
                role: ReplRole::Cold,
            })
            .map_err(|e| e.to_string())?;
        tracing::info!(epoch = st.epoch, "demoted: cold");
        Ok(serde_json::json!({ "epoch": st.epoch, "drained": drained.is_ok(), "last_seq": drained.ok() }).to_string())
    }

    fn verify(&self) -> Result<String, String> {
        let Some(s) = &self.sender else {
            return Err("verify runs on the hot host (this one is cold)".into());
        };
        let (tx, rx) = bounded(1);
        s.ctl
            .send(ScanMsg::Verify(tx))
            .map_err(|_| "the scanner stopped".to_string())?;
        let report: VerifyReport = crate::daemon::sdnotify::recv_pinging(&rx, VERIFY_TIMEOUT)
            .map_err(|_| "no answer in time".to_string())??;
        Ok(serde_json::to_string(&report).expect("report serializes"))
    }

    fn status(&self) -> Status {
        let st = self.shared.get();
        let now = crate::sys::now_unix_ms();
        let (connected, last_ack, drained, wire, data, batches) = match &self.sender {
            Some(s) => {
                let x = &s.stats;
                (
                    x.connected.load(Ordering::Relaxed),
                    x.last_ack_unix_ms.load(Ordering::Relaxed),
                    None,
                    x.wire_bytes.load(Ordering::Relaxed),
                    x.data_bytes.load(Ordering::Relaxed),
                    x.batches.load(Ordering::Relaxed),
                )
            }
            None => {
                let x = &self.receiver.stats;
                (
                    x.connected.load(Ordering::Relaxed),
                    x.last_ack_unix_ms.load(Ordering::Relaxed),
                    Some(x.drained.load(Ordering::Relaxed)),
                    x.wire_bytes.load(Ordering::Relaxed),
                    x.data_bytes.load(Ordering::Relaxed),
                    x.batches.load(Ordering::Relaxed),
                )
            }
        };
        Status {
            mode: "replicated",
            role: st.role,
            epoch: st.epoch,
            holder: self.config.holder_id(),
            data_dir: self.repl.data_dir.display().to_string(),
            peer: self
                .receiver
                .stats
                .peer
                .lock()
                .expect("peer lock")
                .clone()
                .unwrap_or_else(|| self.repl.peer.clone()),
            connected,
            synced: self.sender.as_ref().map(|s| s.stats.synced()),
            last_ack_age_ms: (last_ack > 0).then(|| now.saturating_sub(last_ack)),
            drained,
            wire_bytes: wire,
            wire_out_bytes: self
                .sender
                .is_none()
                .then(|| self.receiver.stats.wire_out_bytes.load(Ordering::Relaxed)),
            data_bytes: data,
            batches,
            node_pid: self.node.as_ref().map(Node::pid),
            node_state: node::state(self.node.as_ref(), &self.config.node),
            error: self.last_error.clone(),
        }
    }

    fn note_error(&mut self, e: String) {
        if self.last_error.as_deref() != Some(&e) {
            tracing::error!("{e}");
            self.last_error = Some(e);
        }
    }
}
