//! The agent of replicated mode: one per VM, hot or cold, with an epoch kept on disk
//! ([`super::state`]).
//!
//! Every agent listens (`[replication] listen`, or the socket its parent hands over, see
//! [`crate::daemon::listen_fds`]) so that it can refuse, or step down for, a peer. The hot one
//! also runs the sender (connecting to `peer`) and, through its [`Supervisor`], the node.
//! Without `[lease]` promotion is manual (with the database lease the cold VM also takes the
//! lease by itself when its copy is complete: `agent/lease.rs`): `artemis-sync promote` on the cold
//! host bumps the epoch, records it, becomes hot, links `${BASE_DIR}/artemis` to the FUSE
//! mount (to the data directory with `capture = "watch"`) and starts the node;
//! `artemis-sync demote` on the hot host stops the node, drains the stream, and becomes cold.
//!
//! Epoch rules (the gate, [`super::state::EpochGate`]): a cold side accepts a hot side whose
//! epoch is at least the highest it has seen, and records it; a hot side refuses every stream,
//! except that a hot side at a newer epoch makes it step down (fence its node, become cold) so
//! that the newer one can resync it. A sender told by its peer that a newer epoch exists does
//! the same. An old hot therefore never pushes its pages over a newer copy: it is turned cold
//! and overwritten. Two hot sides at one epoch (forced promotions on both sides of a cut) are
//! settled by holder id ([`super::state::tie_break`]), by whichever of them hears of the
//! other first, the one connected to (its gate) or the one connecting (the refusal it gets):
//! the greater stays hot, the other steps down; equal ids make both step down.

use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, never, select, Receiver};

use crate::config::{Ack, Capture, Config, PeerLoss, ReplRole, ReplicationConfig};
use crate::daemon::control::Incoming;
use crate::daemon::listen_fds::{self, ListenFdsError};
use crate::daemon::metrics::http::EndpointState;
use crate::daemon::metrics::Metrics;
use crate::daemon::protocol::{
    AgentStatus, Demoted, Promoted, ReplicatedStatus, Reply, Request, Verified, DRAIN_TIMEOUT,
    VERIFY_TIMEOUT,
};
use crate::daemon::supervisor::{Supervisor, IDLE_WAKEUP};
use crate::daemon::{duration_ms, sdnotify, ShutdownReason};
use crate::lease::machine::LeaseMachine;
use crate::link::{self, LinkOptions};
use crate::replicated::capture::fuse::DurableConfig;
use crate::replicated::channel::Auth;
use crate::replicated::receiver::{self, PendingFence, ReceiverConfig, ReceiverHandle};
use crate::replicated::sender::{self, ScanMsg, SenderConfig, SenderEvent, SenderHandle};
use crate::replicated::state::{
    load_state, save_state, tie_break, EpochGate, ReplState, StateError, StepDown, Tie,
};
use crate::replicated::wire::Psk;
use crate::replicated::witness::{self, Witness, WitnessHandle};

mod control;
mod lease;

/// A hot side that sent a frame this recently counts as connected and streaming for `promote`.
pub const STREAMING_WITHIN: Duration = Duration::from_secs(3);
/// How long `promote` waits for the apply thread to finish the batch it is applying.
pub const FENCE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a clean stop waits for the apply thread to finish its queue and write the page
/// memo (a few MiB per GiB of tree).
pub const MEMO_SAVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an `on_acquire` or `on_release` hook may run in replicated mode (no lease deadline
/// bounds it here; this keeps `promote` within its client's wait).
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(20);

/// Errors that stop the replicated agent, each naming the file or address.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ReplicaError {
    /// {0}
    State(#[from] StateError),
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
    /// cannot listen on {addr}: {source}
    HandedOver {
        addr: SocketAddr,
        #[source]
        source: ListenFdsError,
    },
    /// PSK file {path:?}: {reason}
    Psk { path: PathBuf, reason: String },
    /// cannot start: {0}
    Start(String),
}

/// What a hot host's node waits for before it may run: each wait is ended only by the event it
/// is for ([`Waiting::ended_by`]), or by `promote --force`.
#[derive(Debug)]
enum Waiting {
    /// Without the lease, after a restart as hot: the peer's welcome at our epoch (it is cold
    /// and knows no newer one).
    Peer { peer: String, epoch: u64 },
    /// With the lease, after a restart as hot or a fence: the database confirms that this host
    /// holds the epoch (`why` says which).
    Lease { why: String },
    /// After a promotion whose fence timed out (a stalled disk): the apply thread may still be
    /// writing a batch of the old stream into the data directory. Looked at again on each turn
    /// of the main loop ([`Replica::fence_turn`]). `rpo` is what the promotion found the copy
    /// may lack, for a `promote --force` that ends the wait.
    ApplyThread { fence: PendingFence, rpo: String },
}

/// An event that may end a [`Waiting`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitEnd {
    /// The peer welcomed our stream at our epoch.
    PeerWelcome,
    /// The lease machine acquired (or resumed) the lease under our epoch.
    Lease,
    /// The apply thread answered the promotion's fence: it writes nothing more.
    ApplyThreadDone,
}

impl Waiting {
    /// Whether `event` ends this wait; no other event does.
    fn ended_by(&self, event: WaitEnd) -> bool {
        matches!(
            (self, event),
            (Waiting::Peer { .. }, WaitEnd::PeerWelcome)
                | (Waiting::Lease { .. }, WaitEnd::Lease)
                | (Waiting::ApplyThread { .. }, WaitEnd::ApplyThreadDone)
        )
    }

    /// For `status` and messages: "the node waits for ...".
    fn why(&self) -> String {
        match self {
            Waiting::Peer { peer, epoch } => format!(
                "the peer {peer} to confirm that no epoch newer than {epoch} exists (this host was hot when it stopped); `artemis-sync promote --force` starts the node without it"
            ),
            Waiting::Lease { why } => why.clone(),
            Waiting::ApplyThread { .. } => format!(
                "the apply thread to finish the batch it was applying when this host was promoted (it did not within {} s: a stalled disk?); it may still write into the data directory. The node starts once it has; `artemis-sync promote --force` starts the node anyway",
                FENCE_TIMEOUT.as_secs()
            ),
        }
    }
}

/// The state machine's owner; see the module doc.
struct Replica {
    config: Config,
    repl: ReplicationConfig,
    gate: Arc<EpochGate>,
    auth: Auth,
    rt: tokio::runtime::Runtime,
    receiver: ReceiverHandle,
    /// The address the listener is bound to.
    listen: SocketAddr,
    sender: Option<SenderHandle>,
    /// Hot, but the node may not run yet: what it waits for (see [`Replica::become_hot`]).
    waiting_for: Option<Waiting>,
    /// The node, its hooks, the last error, systemd.
    sup: Supervisor,
    /// With `[lease] backend = "postgres"`: the lease, which then decides who is hot.
    lease: Option<LeaseMachine>,
    /// With the lease, while hot: the thread reporting the cold copy's lag into the row.
    witness: Option<(Witness, WitnessHandle)>,
    /// The event metrics (fences, durable waits, verify).
    metrics: Arc<Metrics>,
    /// The metrics endpoint, for its bind error in `status`.
    endpoint: EndpointState,
    /// Control requests (the socket's and the metrics endpoint's), so that waits on a long
    /// request can still answer `status`.
    requests: Receiver<Incoming>,
    /// The shutdown signal, so that waits on a long request end on it too.
    shutdown: Receiver<ShutdownReason>,
    /// A shutdown signal that arrived during such a wait, for the main loop to carry out.
    stopping: Option<ShutdownReason>,
    /// The node exited (or turned sick) during such a wait, which ended it: the watchdog's
    /// decision, when it gave up, for the main loop to carry out (restarts it makes itself).
    node_changed: Option<Option<String>>,
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

/// Runs the replicated agent until `shutdown`; control requests on `control_listener`.
pub fn run(
    config: Config,
    control_listener: UnixListener,
    shutdown: Receiver<ShutdownReason>,
) -> Result<ShutdownReason, ReplicaError> {
    let (step_tx, step_rx) = bounded::<StepDown>(4);
    let mut me = Replica::start(config, step_tx)?;
    let (requests, endpoint) =
        Supervisor::serve_control(control_listener, &me.config.metrics, me.metrics.clone())
            .map_err(|e| ReplicaError::Start(format!("control thread: {e}")))?;
    me.endpoint = endpoint;
    me.requests = requests.clone();
    me.shutdown = shutdown.clone();
    let state = me.gate.get();
    tracing::info!(role = ?state.role, epoch = state.epoch, listen = %me.listen, peer = %me.repl.peer,
        lease = me.lease.is_some(), "replication agent started");
    if state.role == ReplRole::Hot {
        // a restart or a reboot: a newer epoch may exist that this host has not heard of
        me.become_hot(Some(me.restart_wait()))?;
    }
    let lease_replies = me.lease.as_ref().map_or(never(), LeaseMachine::replies);
    loop {
        if let Some(reason) = me.stopping.take() {
            tracing::info!(%reason, "stopping (the signal came during a long request)");
            me.shutdown();
            return Ok(reason);
        }
        // (unless the lease's ticks during the wait turned this host cold already)
        if let Some(Some(why)) = me.node_changed.take() {
            if me.gate.get().role == ReplRole::Hot {
                me.give_up(&why);
            }
        }
        me.announce();
        let sender_events = me.sender.as_ref().map_or(never(), |s| s.events.clone());
        let node_exit = me.sup.node_exit();
        let rounds = me.sup.probe_rounds();
        let limit = me.lease.as_ref().map_or(IDLE_WAKEUP, |m| {
            m.next_deadline()
                .saturating_duration_since(std::time::Instant::now())
                .min(IDLE_WAKEUP)
        });
        select! {
            recv(shutdown) -> reason => {
                let reason = reason.unwrap_or(ShutdownReason::Signal(libc::SIGTERM));
                tracing::info!(%reason, "stopping");
                me.shutdown();
                return Ok(reason);
            }
            recv(requests) -> req => if let Ok(req) = req { me.handle(req) },
            recv(step_rx) -> sd => if let Ok(sd) = sd {
                // (one queued before a promotion past its epoch is stale)
                if sd.epoch >= me.gate.get().epoch {
                    me.step_down(sd.epoch, &sd.peer, &sd.why);
                }
            },
            recv(sender_events) -> ev => match ev {
                Ok(SenderEvent::Rejected { epoch, hot, node, reason }) => me.rejected(epoch, hot, &node, &reason),
                Ok(SenderEvent::Welcomed { epoch }) => me.confirmed(epoch),
                Err(_) => {}
            },
            recv(node_exit) -> status => if let Some(why) = status.ok().and_then(|s| me.sup.node_exited(s)) {
                me.give_up(&why);
            },
            recv(rounds) -> round => if let Some(why) = round.ok().and_then(|r| me.sup.probed(r)) {
                me.give_up(&why);
            },
            recv(lease_replies) -> msg => if let Ok((seq, done)) = msg {
                if let Some(m) = me.lease.as_mut() { m.handle_reply(seq, done) }
            },
            default(me.sup.wait_limit(limit)) => {}
        }
        me.fence_turn();
        me.health_turn();
        me.lease_tick();
        me.sup.ping_watchdog();
    }
}

/// The state file's content, made on the first start from `[replication] role`.
fn initial_state(repl: &ReplicationConfig) -> Result<ReplState, StateError> {
    if let Some(s) = load_state(&repl.state_file)? {
        return Ok(s);
    }
    let s = ReplState {
        epoch: u64::from(repl.role == ReplRole::Hot),
        role: repl.role,
    };
    save_state(&repl.state_file, &s)?;
    Ok(s)
}

/// The replication listener: the socket handed over by the parent if there is one (checked
/// against `[replication] listen`), else `listen` bound here; and the address it is bound to.
fn replication_listener(
    listen: &str,
    rt: &tokio::runtime::Runtime,
) -> Result<(tokio::net::TcpListener, SocketAddr), ReplicaError> {
    let failed = |source| ReplicaError::Listen {
        addr: listen.to_owned(),
        source,
    };
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| failed(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let handed_over = listen_fds::take_listener(addr)
        .map_err(|source| ReplicaError::HandedOver { addr, source })?;
    let std_listener = match handed_over {
        Some(l) => l,
        None => std::net::TcpListener::bind(addr).map_err(failed)?,
    };
    let bound = std_listener.local_addr().map_err(failed)?;
    std_listener.set_nonblocking(true).map_err(failed)?;
    let _enter = rt.enter();
    let listener = tokio::net::TcpListener::from_std(std_listener).map_err(failed)?;
    Ok((listener, bound))
}

/// `[replication] page_size` in bytes.
fn page_size(repl: &ReplicationConfig) -> usize {
    usize::try_from(repl.page_size).expect("a u32 fits a usize on the supported (64-bit) targets")
}

impl Replica {
    /// Prepares the data directory, the state, the listener and the receiver.
    fn start(
        config: Config,
        step_down: crossbeam_channel::Sender<StepDown>,
    ) -> Result<Replica, ReplicaError> {
        let mut repl = config
            .replication
            .clone()
            .expect("validated: replicated mode has its section");
        if repl.capture == Capture::Fuse {
            // a mount left by a killed agent fails every call (ENOTCONN): gone before anything
            crate::replicated::capture::fuse::detach_stale(&repl.mount_point)
                .map_err(|e| ReplicaError::Start(crate::error_chain(&e)))?;
        }
        let data_dir_error = |source| ReplicaError::DataDir {
            path: repl.data_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&repl.data_dir).map_err(data_dir_error)?;
        let data_dir = repl.data_dir.canonicalize().map_err(data_dir_error)?;
        let state = initial_state(&repl)?;
        let auth = auth_from(&repl)?;
        // one worker: a pair has one connection, and with two each wake of a task also woke the
        // idle worker to look for work (docs/performance-log.md, run 12); the blocking waits on
        // it (`block_in_place`) hand the worker's tasks to another thread meanwhile
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("replication-net")
            .enable_all()
            .build()
            .map_err(|e| ReplicaError::Start(format!("tokio runtime: {e}")))?;
        let gate = Arc::new(EpochGate::new(
            state,
            repl.state_file.clone(),
            config.holder_id(),
            step_down,
        ));
        let (listener, listen) = replication_listener(&repl.listen, &rt)?;
        let receiver = receiver::start(
            ReceiverConfig {
                root: data_dir.clone(),
                page_size: page_size(&repl),
                auth: auth.clone(),
                gate: gate.clone(),
                memo_file: Some(crate::replicated::apply::memo_path(&repl.state_file)),
            },
            listener,
            rt.handle(),
        );
        repl.data_dir = data_dir;
        let metrics = Metrics::new();
        let lease = lease::machine(&config, &gate, metrics.clone())?;
        // with the lease a hook runs while the fence deadline runs: one renewal period at most
        let hooks = if lease.is_some() {
            HOOK_TIMEOUT.min(Duration::from_millis(config.lock.update_interval_ms))
        } else {
            HOOK_TIMEOUT
        };
        // without a lease no other VM takes over: the watchdog never gives up then
        let sup = Supervisor::new(&config.node, config.holder_id(), hooks)
            .with_fail_over(lease.is_some());
        Ok(Replica {
            config,
            repl,
            gate,
            auth,
            rt,
            receiver,
            listen,
            sender: None,
            waiting_for: None,
            sup,
            lease,
            witness: None,
            metrics,
            endpoint: EndpointState::default(),
            requests: never(),
            shutdown: never(),
            stopping: None,
            node_changed: None,
        })
    }

    /// Tells systemd the role and epoch (`READY=1` the first time).
    fn announce(&mut self) {
        let st = self.gate.get();
        let role = match st.role {
            ReplRole::Hot => "hot",
            ReplRole::Cold => "cold",
        };
        self.sup.announce(format!("{role} at epoch {}", st.epoch));
    }

    /// Runs the sender and, unless it must wait (`wait`: for the peer's or the lease's
    /// confirmation after a restart, see [`Replica::restart_wait`], or for the apply thread),
    /// the node; waiting, it says why in `status`.
    fn become_hot(&mut self, wait: Option<Waiting>) -> Result<(), ReplicaError> {
        let st = self.gate.get();
        let fuse_mount =
            (self.repl.capture == Capture::Fuse).then(|| self.repl.mount_point.clone());
        let durable = self.repl.ack == Ack::Durable;
        let witness = self.witness_parts()?;
        let peer: SocketAddr = self
            .repl
            .peer
            .parse()
            .map_err(|e| ReplicaError::Start(format!("peer {}: {e}", self.repl.peer)))?;
        let cfg = SenderConfig {
            root: self.repl.data_dir.clone(),
            page_size: page_size(&self.repl),
            peer,
            auth: self.auth.clone(),
            node: self.config.holder_id(),
            epoch: st.epoch,
            rescan: Duration::from_millis(self.repl.rescan_interval_ms),
            deep_rescan: Duration::from_millis(self.repl.deep_rescan_interval_ms),
            window_bytes: usize::try_from(self.repl.window_mb.saturating_mul(1 << 20))
                .unwrap_or(usize::MAX),
            fuse_mount: fuse_mount.clone(),
            durable: durable.then(|| DurableConfig {
                peer_timeout: Duration::from_millis(self.repl.peer_timeout_ms),
                block: self.repl.on_peer_loss == PeerLoss::Block,
                witness: witness.as_ref().map(|(h, _, _)| h.clone()),
                metrics: self.metrics.clone(),
            }),
        };
        let sender = sender::start(cfg, self.rt.handle())
            .map_err(|e| ReplicaError::Start(crate::error_chain(&e)))?;
        if let Some(parts) = witness {
            if let Err(e) = self.start_witness(parts, st.epoch, durable, sender.stats.clone()) {
                sender.stop();
                return Err(ReplicaError::Start(format!("lease witness thread: {e}")));
            }
        }
        self.sender = Some(sender);
        // after the sender: in FUSE mode the link's target is the mount it has just served
        if let Err(e) = link::link(
            &self.config.artemis_link(),
            fuse_mount.as_ref().unwrap_or(&self.repl.data_dir),
            LinkOptions {
                migrate: false,
                force: true,
            },
        ) {
            self.sup.note_error(format!(
                "cannot link {}: {}",
                self.config.artemis_link().display(),
                crate::error_chain(&e)
            ));
        }
        match wait {
            None => {
                self.waiting_for = None;
                self.start_node(st.epoch);
            }
            Some(wait) => {
                let why = wait.why();
                tracing::warn!(epoch = st.epoch, waiting = ?wait, "hot, but the node waits for {why}");
                self.waiting_for = Some(wait);
            }
        }
        tracing::info!(epoch = st.epoch, peer = %self.repl.peer, "hot: streaming to the cold side");
        Ok(())
    }

    /// What a hot host that (re)starts waits for: a newer epoch may exist that it has not
    /// heard of. With the lease the database says, else the peer.
    fn restart_wait(&self) -> Waiting {
        let epoch = self.gate.get().epoch;
        if self.lease.is_some() {
            Waiting::Lease {
                why: format!("the lease database to confirm that this host still holds epoch {epoch} (it was hot when it stopped); if another VM took over meanwhile, this one turns cold"),
            }
        } else {
            Waiting::Peer {
                peer: self.repl.peer.clone(),
                epoch,
            }
        }
    }

    /// Ends the node's wait if `event` is what it waits for; whether it ended (and the node
    /// may start). Any other wait is left as it is.
    fn end_wait(&mut self, event: WaitEnd) -> bool {
        if !self.waiting_for.as_ref().is_some_and(|w| w.ended_by(event)) {
            return false;
        }
        self.waiting_for = None;
        true
    }

    /// Each turn of the main loop: a node that waits for the apply thread (a promotion whose
    /// fence timed out) starts once the apply thread has answered that fence.
    fn fence_turn(&mut self) {
        let Some(Waiting::ApplyThread { fence: pending, .. }) = self.waiting_for.as_mut() else {
            return;
        };
        if !self.receiver.fence_passed(pending, Duration::ZERO) {
            return;
        }
        let epoch = self.gate.get().epoch;
        self.end_wait(WaitEnd::ApplyThreadDone);
        tracing::warn!(
            epoch,
            "the apply thread finished its batch and writes nothing more: starting the node"
        );
        self.start_node(epoch);
    }

    fn start_node(&mut self, epoch: u64) {
        if self.lease.as_ref().is_some_and(|m| !m.may_run_node()) {
            // the set-up outlasted the lease's fence deadline: the next tick fences
            self.sup
                .note_error("the node did not start: the lease was not renewed in time");
            return;
        }
        let until = self.lease.as_ref().map(LeaseMachine::may_run_until);
        if let Err(e) = self.sup.acquire_until(epoch, until) {
            self.sup.note_error(e.to_string());
        }
    }

    /// The peer welcomed our stream at `epoch`: it is cold and knows nothing newer than
    /// ours. A hot that waited for this (and for nothing else) starts its node.
    fn confirmed(&mut self, epoch: u64) {
        let st = self.gate.get();
        // with the lease, the database confirms, not the peer; and a welcome says nothing of
        // the apply thread
        if st.role != ReplRole::Hot || self.lease.is_some() || !self.end_wait(WaitEnd::PeerWelcome)
        {
            return;
        }
        tracing::info!(
            epoch = st.epoch,
            peer_epoch = epoch,
            "the peer confirmed that no newer epoch exists: starting the node"
        );
        self.start_node(st.epoch);
    }

    /// The peer `node` refused our stream at its `epoch` (`hot` at it or not): a newer epoch
    /// exists, or the peer is hot at ours and the tie-break says which of us steps down.
    fn rejected(&mut self, epoch: u64, hot: bool, node: &str, reason: &str) {
        let st = self.gate.get();
        if st.role != ReplRole::Hot {
            return;
        }
        if epoch > st.epoch {
            return self.step_down(epoch, node, reason);
        }
        if !(hot && epoch == st.epoch) {
            return self
                .sup
                .note_error(format!("the peer refused our stream: {reason}"));
        }
        // the same rule the peer's gate applied, so the same answer (opposite roles)
        let ours = self.config.holder_id();
        let tie = tie_break(&ours, node);
        let why = tie.explain(epoch, &ours, node);
        if tie == Tie::Stay {
            // (logged once, at ERROR, while it stays the same)
            self.sup.note_error(format!("refused by the peer: {why}"));
        } else {
            self.step_down(epoch, node, &why);
        }
    }

    /// A newer epoch exists, or a hot side at ours won the tie-break
    /// ([`super::state::tie_break`]): stop the node and the sender, become cold, wait to be
    /// resynced. `peer` names the other side.
    fn step_down(&mut self, epoch: u64, peer: &str, why: &str) {
        let st = self.gate.get();
        if st.role != ReplRole::Hot {
            return;
        }
        self.metrics.fence_events.inc();
        tracing::error!(
            epoch = st.epoch,
            peer_epoch = epoch,
            peer,
            "FENCING: {why}; recording epoch {}, stopping the node and turning cold to be resynced",
            epoch.max(st.epoch)
        );
        // first on disk: cold at the newer epoch, so that no restart runs the node again
        if let Err(e) = self.gate.set(ReplState {
            epoch: epoch.max(st.epoch),
            role: ReplRole::Cold,
        }) {
            self.sup.note_error(e.to_string());
        }
        self.waiting_for = None;
        self.sup.release(Some(st.epoch));
        if let Some(m) = self.lease.as_mut() {
            m.see_epoch(epoch);
            m.resume(None);
            if m.held_epoch().is_some() {
                m.release("a newer epoch exists");
            }
        }
        self.stop_sender();
        self.sup.note_error(format!("stepped down: {why}"));
    }

    /// The watchdog's turn: a due local restart, only while this host is hot, confirmed, and
    /// (with the lease) renewed in time.
    fn health_turn(&mut self) {
        let may_run = self.gate.get().role == ReplRole::Hot
            && self.waiting_for.is_none()
            && self.lease.as_ref().is_none_or(LeaseMachine::may_run_node);
        let until = self.lease.as_ref().map(LeaseMachine::may_run_until);
        if let Some(why) = self.sup.health_turn(may_run, until) {
            self.give_up(&why);
        }
    }

    /// The watchdog gave up (only with the lease: without one it never does): hand the lease
    /// over as `demote` does (drained if the cold side is there) and stay out of the contention.
    fn give_up(&mut self, why: &str) {
        let epoch = self.gate.get().epoch;
        let connected = self
            .sender
            .as_ref()
            .is_some_and(|s| s.stats.connected.load(Ordering::Acquire));
        if !connected {
            // the hand-over could not drain: the lease would say "behind" and the other VM
            // would not take over, leaving the pair with no node at all
            self.sup.keep_restarting(format!(
                "{why}; but the cold VM is not connected, so it could not take over: restarting the node here at restart_backoff_max_ms instead of handing the lease over"
            ));
            return;
        }
        tracing::error!(
            epoch,
            "{why}; handing the lease over so the other VM can take over"
        );
        if let Err(e) = self.demote(true) {
            self.sup.note_error(format!(
                "could not turn cold after the watchdog gave up: {e}"
            ));
        }
        let out = self.sup.staying_out();
        if let Some(m) = self.lease.as_mut() {
            m.stay_out(out);
        }
    }

    fn shutdown(&mut self) {
        let st = self.gate.get();
        if st.role == ReplRole::Hot {
            self.sup.release(Some(st.epoch));
            let drained = self.drain();
            match &drained {
                Ok(seq) => tracing::info!(seq, "drained: the cold side has everything"),
                Err(e) => tracing::warn!("could not drain before stopping: {e}"),
            }
            self.hand_lease_over(drained.is_ok(), "the agent is stopping");
        }
        self.stop_sender();
        self.receiver.stop();
        if !self.receiver.save_memo(MEMO_SAVE_TIMEOUT) {
            tracing::warn!(
                "the apply thread did not write its page memo within {} s: the next start hashes the whole tree",
                MEMO_SAVE_TIMEOUT.as_secs()
            );
        }
    }

    /// Stops the sender and, with it, the lease witness.
    fn stop_sender(&mut self) {
        if let Some((w, _)) = self.witness.take() {
            w.stop();
        }
        if let Some(s) = self.sender.take() {
            s.stop();
        }
    }

    fn drain(&self) -> Result<u64, String> {
        let Some(s) = &self.sender else {
            return Err("no stream".into());
        };
        let (tx, rx) = bounded(1);
        s.ctl
            .send(ScanMsg::Drain(tx))
            .map_err(|_| "the scanner stopped".to_string())?;
        sdnotify::recv_pinging(&rx, DRAIN_TIMEOUT)
            .map_err(|_| format!("no answer within {} s", DRAIN_TIMEOUT.as_secs()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue10_each_wait_of_a_hot_node_is_ended_only_by_its_own_event() {
        let waits = [
            Waiting::Peer {
                peer: "127.0.0.1:1".into(),
                epoch: 3,
            },
            Waiting::Lease {
                why: "the lease".into(),
            },
            Waiting::ApplyThread {
                fence: PendingFence::unqueued(),
                rpo: String::new(),
            },
        ];
        let events = [
            WaitEnd::PeerWelcome,
            WaitEnd::Lease,
            WaitEnd::ApplyThreadDone,
        ];
        for (i, wait) in waits.iter().enumerate() {
            for (j, event) in events.iter().enumerate() {
                assert_eq!(wait.ended_by(*event), i == j, "{wait:?} ended by {event:?}");
            }
        }
        // the old hot's welcome in particular says nothing of the apply thread
        let why = waits[2].why();
        assert!(
            why.starts_with("the apply thread") && why.contains("promote --force"),
            "{why}"
        );
        assert!(waits[0].why().contains("127.0.0.1:1") && waits[0].why().contains("newer than 3"));
    }
}
