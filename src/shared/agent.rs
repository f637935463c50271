//! The agent of the shared-storage mode: holds the lock and the lease, runs the node only
//! while it holds them, and fences (stops) its own node before the other VM may take over.
//!
//! Threads and channels:
//! - the **main thread** owns the state machine and the node process (it must: the node's
//!   death signal is tied to the thread that spawned it). It waits on a `crossbeam` select of
//!   shutdown signals, control requests, share-worker replies and the node's exit, with a
//!   timeout at the next deadline (poll, renewal, fence);
//! - the **share worker** does every operation on the share (lock, read and write the lease,
//!   mount, link) one at a time from a bounded queue. An NFS call can block for minutes; the
//!   main thread never waits on one past its fence deadline, it fences instead;
//! - the **control thread** serves the Unix socket (`status`, `release`).
//!
//! Timeline (defaults 20 s / 40 s / 10 s): a renewal starts every `update_interval_ms`. The
//! fence deadline is the start of the last good renewal + `wait_interval_ms` −
//! `stop_timeout_ms` − a tenth of `wait_interval_ms`; at that moment, whatever the share
//! worker is doing, the node gets SIGTERM, and SIGKILL `stop_timeout_ms` later, so it is down
//! before a contender, which needs to see the lease unchanged for `wait_interval_ms`, may
//! take over.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, never, select, Receiver, Sender};
use serde::Serialize;

use crate::config::{fence_margin_ms, Backend, Config};
use crate::daemon::control::{self, Request};
use crate::daemon::node::{self, Node};
use crate::daemon::{ShutdownReason, CONTROL_REPLY_TIMEOUT};
use crate::link::{self, LinkOptions};
use crate::shared::lease::{self, Lease, LeaseError, LeaseState, LOCK_FILE};
use crate::shared::lock::LockFile;
use crate::shared::mount::{self, MountRequest};
use crate::shared::mountinfo;
use crate::sys::RealSys;
use crate::{doctor, error_chain};

/// The shortest pause between two observations of the lease by a cold agent.
pub const MIN_POLL: Duration = Duration::from_millis(20);
/// The longest pause between two observations of the lease by a cold agent.
pub const MAX_POLL: Duration = Duration::from_millis(1000);

/// Errors that stop the agent, each naming the path involved.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum AgentError {
    /// cannot create lock directory {path:?}: {source}
    LockDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// refusing to run: {detail} (lock directory {dir:?}). Fix: {fix}
    LockUnsafe {
        dir: PathBuf,
        detail: String,
        fix: String,
    },
    /// cannot read the mount table: {0}
    MountTable(String),
    /// cannot start a thread: {0}
    Thread(#[source] std::io::Error),
}

/// What the agent is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Waiting: another VM holds the lease, or it is not stale yet.
    Cold,
    /// Took the lease, preparing the share and starting the node.
    Starting,
    /// Holds the lease; the node runs.
    Hot,
    /// Lost the lease and stopped its node; waiting before contending again.
    Fenced,
    /// Giving the lease up.
    Stopping,
}

/// The answer to `status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// What the agent is doing.
    pub role: Role,
    /// This agent's holder id.
    pub holder: String,
    /// The holder the lease names, if it could be read.
    pub lease_holder: Option<String>,
    /// The lease's epoch, if it could be read.
    pub epoch: Option<u64>,
    /// `held` or `released`, if the lease could be read.
    pub lease_state: Option<LeaseState>,
    /// Hot: since the start of our last good renewal. Otherwise: since the lease last changed
    /// as this agent saw it.
    pub last_renewal_age_ms: u64,
    /// Whether this agent holds the lock file's lock.
    pub lock_held: bool,
    /// The node's pid, while it runs.
    pub node_pid: Option<u32>,
    /// `running`, `stopped`, or `none` when no `[node] command` is configured.
    pub node_state: &'static str,
    /// The last problem seen with the share or the lease, if any.
    pub error: Option<String>,
}

/// The lease as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Obs {
    Missing,
    Lease(Lease),
    Error(String),
}

impl Obs {
    fn from_read(r: Result<Option<Lease>, LeaseError>) -> Obs {
        match r {
            Ok(None) => Obs::Missing,
            Ok(Some(l)) => Obs::Lease(l),
            Err(e) => Obs::Error(e.to_string()),
        }
    }
}

enum Job {
    Observe {
        try_lock: bool,
    },
    Takeover {
        expect: Obs,
        lease: Lease,
        settle: Duration,
    },
    Renew {
        current: Lease,
        next: Lease,
    },
    Release {
        current: Lease,
    },
    Unlock,
}

enum Reply {
    Observed {
        locked: Result<bool, String>,
        obs: Obs,
    },
    /// `Err((written, message))`: whether our lease was written before the failure.
    TookOver(Result<(), (bool, String)>),
    Renewed(Result<(), RenewFail>),
    Released(Result<(), String>),
    Unlocked,
}

enum RenewFail {
    /// Someone else changed the lease or the lock: fence now.
    Lost(String),
    /// The share did not answer properly: retry until the fence deadline.
    Io(String),
}

/// Does the share operations, one at a time, in its own thread.
struct Worker {
    config: Arc<Config>,
    lock_path: PathBuf,
    lease_path: PathBuf,
    lock: Option<LockFile>,
}

impl Worker {
    fn handle(&mut self, job: Job) -> Reply {
        match job {
            Job::Observe { try_lock } => {
                let mut locked = Ok(self.lock.is_some());
                if try_lock && self.lock.is_none() {
                    locked = match LockFile::try_acquire(&self.lock_path) {
                        Ok(l) => {
                            self.lock = l;
                            Ok(self.lock.is_some())
                        }
                        Err(e) => Err(e.to_string()),
                    };
                }
                Reply::Observed {
                    locked,
                    obs: Obs::from_read(lease::read(&self.lease_path)),
                }
            }
            Job::Takeover {
                expect,
                lease,
                settle,
            } => Reply::TookOver(self.take_over(expect, lease, settle)),
            Job::Renew { current, next } => Reply::Renewed(self.renew(&current, &next)),
            Job::Release { current } => {
                let result = match lease::read(&self.lease_path) {
                    Ok(Some(l)) if l == current => {
                        let released = Lease {
                            state: LeaseState::Released,
                            renewals: current.renewals + 1,
                            ..current
                        };
                        lease::write(&self.lease_path, &released).map_err(|e| e.to_string())
                    }
                    Ok(other) => Err(format!(
                        "the lease is no longer ours ({other:?}); not marking it released"
                    )),
                    Err(e) => Err(e.to_string()),
                };
                self.lock = None;
                Reply::Released(result)
            }
            Job::Unlock => {
                self.lock = None;
                Reply::Unlocked
            }
        }
    }

    fn take_over(
        &mut self,
        expect: Obs,
        lease: Lease,
        settle: Duration,
    ) -> Result<(), (bool, String)> {
        let now = Obs::from_read(lease::read(&self.lease_path));
        if now != expect {
            return Err((false, "the lease changed just before takeover".into()));
        }
        lease::write(&self.lease_path, &lease).map_err(|e| (false, e.to_string()))?;
        // A second writer (locks that do not reach the other VM) would show up here.
        std::thread::sleep(settle);
        match lease::read(&self.lease_path) {
            Ok(Some(l)) if l == lease => {}
            other => {
                return Err((
                    true,
                    format!("our new lease was replaced right after takeover: {other:?}"),
                ))
            }
        }
        ensure_share(&self.config).map_err(|m| (true, m))
    }

    fn renew(&mut self, current: &Lease, next: &Lease) -> Result<(), RenewFail> {
        match self.lock.as_ref().map(LockFile::still_ours) {
            None => return Err(RenewFail::Lost("the lock is not held".into())),
            Some(Ok(true)) => {}
            Some(Ok(false)) => {
                return Err(RenewFail::Lost(format!(
                    "the lock file {} was replaced",
                    self.lock_path.display()
                )))
            }
            Some(Err(e)) => {
                return Err(RenewFail::Io(format!(
                    "lock file {}: {e}",
                    self.lock_path.display()
                )))
            }
        }
        match lease::read(&self.lease_path) {
            Ok(Some(l)) if l == *current => {}
            Ok(Some(l)) => {
                return Err(RenewFail::Lost(format!(
                    "the lease now names {} under epoch {} (renewal {}), not us under epoch {}",
                    l.holder, l.epoch, l.renewals, current.epoch
                )))
            }
            Ok(None) => {
                return Err(RenewFail::Lost(format!(
                    "the lease {} disappeared",
                    self.lease_path.display()
                )))
            }
            Err(e @ LeaseError::Corrupt { .. }) => return Err(RenewFail::Lost(e.to_string())),
            Err(e) => return Err(RenewFail::Io(e.to_string())),
        }
        lease::write(&self.lease_path, next).map_err(|e| RenewFail::Io(e.to_string()))
    }
}

/// Mounts the share if it is not, and makes `${BASE_DIR}/artemis` link to it.
fn ensure_share(config: &Config) -> Result<(), String> {
    if config.storage.backend() != Backend::Premounted {
        mount::mount(
            &RealSys::from_env(),
            &MountRequest::from_config(config),
            &mut std::io::sink(),
        )
        .map_err(|e| error_chain(&e))?;
    }
    link::link(
        &config.artemis_link(),
        &config.storage.mount_point,
        LinkOptions::default(),
    )
    .map(|_| ())
    .map_err(|e| error_chain(&e))
}

/// Refuses a lock directory on a mount whose locks stay on this host (see `doctor`).
pub fn check_lock_safety(config: &Config) -> Result<(), AgentError> {
    let dir = &config.lock.dir;
    std::fs::create_dir_all(dir).map_err(|source| AgentError::LockDir {
        path: dir.clone(),
        source,
    })?;
    let canonical = dir.canonicalize().map_err(|source| AgentError::LockDir {
        path: dir.clone(),
        source,
    })?;
    let text = std::fs::read_to_string(crate::sys::MOUNTINFO_PATH)
        .map_err(|e| AgentError::MountTable(e.to_string()))?;
    let table = mountinfo::parse(&text).map_err(|e| AgentError::MountTable(e.to_string()))?;
    let Some(entry) = mountinfo::containing(&table, &canonical) else {
        return Err(AgentError::MountTable(format!(
            "no mount holds {}",
            canonical.display()
        )));
    };
    let check = doctor::locks_check(config, entry);
    match check.status {
        doctor::Status::Fail => Err(AgentError::LockUnsafe {
            dir: dir.clone(),
            detail: check.detail,
            fix: check.fix.unwrap_or_default(),
        }),
        doctor::Status::Warn => {
            tracing::warn!(dir = %dir.display(), "{}", check.detail);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The state machine; see the module doc.
struct Agent {
    config: Arc<Config>,
    holder: String,
    update: Duration,
    wait: Duration,
    stop_timeout: Duration,
    margin: Duration,
    poll: Duration,
    role: Role,
    jobs: Sender<(u64, Job)>,
    replies: Receiver<(u64, Reply)>,
    /// The job in flight: its number and when it was sent.
    outstanding: Option<(u64, Instant)>,
    seq: u64,
    lock_held: bool,
    obs: Obs,
    obs_changed: Instant,
    /// The highest epoch seen, so a takeover always moves past it.
    epoch_seen: u64,
    /// Our lease as last written, while Starting or Hot.
    lease: Option<Lease>,
    /// The lease a Renew in flight will write.
    renewing: Option<Lease>,
    /// Start of the last good renewal (or of the takeover).
    last_good: Instant,
    next_renew: Instant,
    next_poll: Instant,
    holdoff_until: Option<Instant>,
    split_warned: Option<Instant>,
    want_unlock: bool,
    node: Option<Node>,
    last_error: Option<String>,
}

/// Runs the agent until `shutdown` delivers a reason; serves control requests on `listener`.
/// On the way out it stops the node and releases the lease, so the other VM can take over at
/// once.
pub fn run(
    config: Config,
    listener: UnixListener,
    shutdown: Receiver<ShutdownReason>,
) -> Result<ShutdownReason, AgentError> {
    check_lock_safety(&config)?;
    let config = Arc::new(config);
    let (jobs_tx, jobs_rx) = bounded::<(u64, Job)>(1);
    let (replies_tx, replies_rx) = bounded::<(u64, Reply)>(1);
    let mut worker = Worker {
        config: config.clone(),
        lock_path: config.lock.dir.join(LOCK_FILE),
        lease_path: lease::path(&config),
        lock: None,
    };
    std::thread::Builder::new()
        .name("share-worker".into())
        .spawn(move || {
            for (seq, job) in jobs_rx.iter() {
                if replies_tx.send((seq, worker.handle(job))).is_err() {
                    break;
                }
            }
        })
        .map_err(AgentError::Thread)?;
    let (requests_tx, requests_rx) = bounded::<Request>(8);
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || control::serve(listener, requests_tx, CONTROL_REPLY_TIMEOUT))
        .map_err(AgentError::Thread)?;

    let l = &config.lock;
    let now = Instant::now();
    let update = Duration::from_millis(l.update_interval_ms);
    let mut agent = Agent {
        holder: config.holder_id(),
        update,
        wait: Duration::from_millis(l.wait_interval_ms),
        stop_timeout: Duration::from_millis(config.node.stop_timeout_ms),
        margin: Duration::from_millis(fence_margin_ms(l.wait_interval_ms)),
        poll: (update / 4).clamp(MIN_POLL, MAX_POLL),
        config: config.clone(),
        role: Role::Cold,
        jobs: jobs_tx,
        replies: replies_rx,
        outstanding: None,
        seq: 0,
        lock_held: false,
        obs: Obs::Error(NOT_READ_YET.into()),
        obs_changed: now,
        epoch_seen: 0,
        lease: None,
        renewing: None,
        last_good: now,
        next_renew: now,
        next_poll: now,
        holdoff_until: None,
        split_warned: None,
        want_unlock: false,
        node: None,
        last_error: None,
    };
    tracing::info!(holder = %agent.holder, dir = %config.lock.dir.display(),
        update_interval_ms = l.update_interval_ms, wait_interval_ms = l.wait_interval_ms, "agent started, cold");
    // systemd: READY once the first observation gave us a role, STATUS on every change, and
    // watchdog pings (a frozen agent is restarted with its cgroup, node included).
    let watchdog = crate::daemon::sdnotify::watchdog_interval();
    let mut announced: Option<(Role, Option<u64>)> = None;
    loop {
        let mut timeout = agent
            .next_deadline()
            .saturating_duration_since(Instant::now());
        if let Some(w) = watchdog {
            timeout = timeout.min(w);
        }
        let node_exit = agent.node.as_ref().map_or(never(), |n| n.exited().clone());
        select! {
            recv(shutdown) -> reason => {
                let reason = reason.unwrap_or(ShutdownReason::Signal(libc::SIGTERM));
                tracing::info!(%reason, "stopping");
                agent.release("the agent is stopping");
                return Ok(reason);
            }
            recv(requests_rx) -> req => if let Ok(req) = req { agent.handle_request(req) },
            recv(agent.replies.clone()) -> msg => if let Ok((seq, reply)) = msg { agent.handle_reply(seq, reply) },
            recv(node_exit) -> status => if let Ok(status) = status { agent.node_exited(status) },
            default(timeout) => {}
        }
        agent.tick();
        if watchdog.is_some() {
            crate::daemon::sdnotify::watchdog();
        }
        let now = (agent.role, agent.lease.as_ref().map(|l| l.epoch));
        if !matches!(agent.obs, Obs::Error(ref e) if e == NOT_READ_YET) && announced != Some(now) {
            let text = match now {
                (Role::Hot, Some(e)) => format!("hot at epoch {e}"),
                (role, _) => format!("{role:?}").to_lowercase(),
            };
            if announced.is_none() {
                crate::daemon::sdnotify::ready(&text);
            } else {
                crate::daemon::sdnotify::status(&text);
            }
            announced = Some(now);
        }
    }
}

/// The observation an agent starts with, before it has read the lease once.
const NOT_READ_YET: &str = "not read yet";

impl Agent {
    fn fence_at(&self) -> Instant {
        self.last_good + self.wait - self.stop_timeout - self.margin
    }

    fn next_deadline(&self) -> Instant {
        match self.role {
            Role::Hot if self.outstanding.is_none() => self.next_renew.min(self.fence_at()),
            Role::Hot => self.fence_at(),
            Role::Starting => self.fence_at(),
            _ => self.next_poll,
        }
    }

    fn send(&mut self, job: Job) -> bool {
        if self.outstanding.is_some() {
            return false;
        }
        self.seq += 1;
        match self.jobs.try_send((self.seq, job)) {
            Ok(()) => {
                self.outstanding = Some((self.seq, Instant::now()));
                true
            }
            Err(_) => false,
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        match self.role {
            Role::Hot | Role::Starting if now >= self.fence_at() => {
                let since = now.duration_since(self.last_good).as_millis();
                self.fence(&format!("no successful renewal for {since} ms; the node must be down before the other VM may take over"));
            }
            Role::Hot if now >= self.next_renew && self.outstanding.is_none() => {
                let current = self.lease.clone().expect("hot means a lease");
                let next = Lease {
                    renewals: current.renewals + 1,
                    ..current.clone()
                };
                self.renewing = Some(next.clone());
                self.send(Job::Renew { current, next });
            }
            Role::Cold | Role::Fenced if now >= self.next_poll => {
                if self.holdoff_until.is_some_and(|t| now >= t) {
                    self.holdoff_until = None;
                    if self.role == Role::Fenced {
                        self.role = Role::Cold;
                    }
                }
                if self.want_unlock && self.send(Job::Unlock) {
                    self.want_unlock = false;
                } else if self.send(Job::Observe {
                    try_lock: self.holdoff_until.is_none() && !self.lock_held,
                }) {
                    self.next_poll = now + self.poll;
                }
            }
            _ => {}
        }
    }

    fn handle_reply(&mut self, seq: u64, reply: Reply) {
        let Some((expected, sent)) = self.outstanding else {
            return;
        };
        if seq != expected {
            return;
        }
        self.outstanding = None;
        match reply {
            Reply::Observed { locked, obs } => self.observed(locked, obs),
            Reply::TookOver(result) => self.took_over(sent, result),
            Reply::Renewed(result) => self.renewed(sent, result),
            Reply::Released(_) | Reply::Unlocked => self.lock_held = false,
        }
    }

    fn observed(&mut self, locked: Result<bool, String>, obs: Obs) {
        let now = Instant::now();
        match locked {
            Ok(l) => self.lock_held = l,
            Err(e) => self.note_error(e),
        }
        if obs != self.obs {
            if let Obs::Error(e) = &obs {
                self.note_error(e.clone());
            }
            if let Obs::Lease(l) = &obs {
                self.epoch_seen = self.epoch_seen.max(l.epoch);
            }
            self.obs = obs;
            self.obs_changed = now;
        }
        if self.role != Role::Cold || !self.lock_held || self.holdoff_until.is_some() {
            return;
        }
        let unchanged = now.duration_since(self.obs_changed);
        match &self.obs {
            Obs::Error(_) => {}
            Obs::Lease(l) if l.state == LeaseState::Released => {
                tracing::info!(previous = %l.holder, epoch = l.epoch, "the lease was released; taking over");
                self.take_over();
            }
            _ if unchanged >= self.wait => {
                let what = match &self.obs {
                    Obs::Lease(l) => format!("lease of {} (epoch {}) unchanged", l.holder, l.epoch),
                    _ => "no lease".into(),
                };
                tracing::warn!(
                    unchanged_ms = unchanged.as_millis() as u64,
                    "{what} for wait_interval_ms; taking over"
                );
                self.take_over();
            }
            // The lock was granted while another holder renews: the lock does not exclude the
            // other VM (local-only locks, or its server dropped the holder's lock).
            Obs::Lease(l)
                if l.holder != self.holder
                    && unchanged < self.update * 2
                    && self
                        .split_warned
                        .is_none_or(|t| now.duration_since(t) >= self.wait) =>
            {
                self.split_warned = Some(now);
                tracing::error!(holder = %l.holder, epoch = l.epoch,
                    "SPLIT-BRAIN RISK: we were granted the lock while {} renews the lease; the lock does not \
                     exclude the other VM. Not taking over while the lease is live. Check the mount's lock \
                     options (artemis-sync doctor) on both VMs", l.holder);
            }
            _ => {}
        }
    }

    fn take_over(&mut self) {
        let epoch = self.epoch_seen + 1;
        let lease = Lease::new(
            &self.holder,
            epoch,
            self.update.as_millis() as u64,
            self.wait.as_millis() as u64,
        );
        let settle = self.poll.min(Duration::from_millis(200));
        if self.send(Job::Takeover {
            expect: self.obs.clone(),
            lease: lease.clone(),
            settle,
        }) {
            self.role = Role::Starting;
            self.lease = Some(lease);
            self.last_good = self.outstanding.map_or_else(Instant::now, |(_, t)| t);
        }
    }

    fn took_over(&mut self, sent: Instant, result: Result<(), (bool, String)>) {
        if self.role != Role::Starting {
            return; // fenced while the takeover ran: never start on it
        }
        let lease = self.lease.clone().expect("starting means a lease");
        match result {
            Ok(()) => {
                self.epoch_seen = lease.epoch;
                self.last_good = sent;
                self.next_renew = sent + self.update;
                self.role = Role::Hot;
                self.last_error = None;
                tracing::info!(holder = %self.holder, epoch = lease.epoch, "took over: hot");
                if let Err(e) = self.start_node(&lease) {
                    tracing::error!(epoch = lease.epoch, "{e}; giving the lease up");
                    self.note_error(e);
                    self.release("the node could not start");
                }
            }
            Err((written, message)) => {
                tracing::error!(epoch = lease.epoch, "takeover failed: {message}");
                self.note_error(message);
                if written {
                    self.role = Role::Hot; // release() expects to hold it
                    self.release("takeover failed");
                } else {
                    self.role = Role::Cold;
                    self.lease = None;
                }
            }
        }
    }

    fn start_node(&mut self, lease: &Lease) -> Result<(), String> {
        let env = [
            ("ARTEMIS_SYNC_EPOCH", lease.epoch.to_string()),
            ("ARTEMIS_SYNC_HOLDER", self.holder.clone()),
        ];
        let n = &self.config.node;
        if !n.on_acquire.is_empty() {
            node::run_hook(&n.on_acquire, &env, self.update).map_err(|e| e.to_string())?;
        }
        if let Some(node) = Node::start(n, &env).map_err(|e| e.to_string())? {
            tracing::info!(
                pid = node.pid(),
                unit = n.systemd_unit,
                epoch = lease.epoch,
                "node started"
            );
            self.node = Some(node);
        }
        Ok(())
    }

    fn renewed(&mut self, sent: Instant, result: Result<(), RenewFail>) {
        if self.role != Role::Hot {
            return; // fenced while it was in flight: never act on it
        }
        match result {
            Ok(()) => {
                self.lease = self.renewing.take();
                self.last_good = sent;
                self.next_renew = sent + self.update;
                self.last_error = None;
            }
            Err(RenewFail::Lost(why)) => self.fence(&why),
            Err(RenewFail::Io(why)) => {
                let left = self.fence_at().saturating_duration_since(Instant::now());
                tracing::warn!(
                    epoch = self.lease.as_ref().map(|l| l.epoch),
                    fence_in_ms = left.as_millis() as u64,
                    "renewal failed: {why}; retrying"
                );
                self.note_error(why);
                self.next_renew = Instant::now() + self.poll;
            }
        }
    }

    /// Stops the node at once and gives up the lease without writing it: someone else owns it,
    /// or the share cannot be trusted.
    fn fence(&mut self, why: &str) {
        let epoch = self.lease.as_ref().map(|l| l.epoch);
        tracing::error!(epoch, "FENCING: {why}; stopping the node");
        self.note_error(why.to_owned());
        self.stop_node();
        self.role = Role::Fenced;
        self.lease = None;
        self.renewing = None;
        self.holdoff_until = Some(Instant::now() + self.wait);
        self.want_unlock = true;
        self.lock_held = false;
        self.next_poll = Instant::now();
    }

    fn stop_node(&mut self) {
        if let Some(node) = self.node.take() {
            let pid = node.pid();
            let outcome = node.stop(self.stop_timeout);
            match outcome {
                node::Stopped::Stuck => {
                    tracing::error!(pid, "the node did not die even after SIGKILL")
                }
                other => tracing::info!(pid, ?other, "node stopped"),
            }
        }
    }

    /// Stops the node, marks the lease released if we hold it, and unlocks, waiting (bounded
    /// by `wait_interval_ms`) for the share. Afterwards the agent is cold and, if it held the
    /// lease, does not contend for `wait_interval_ms`, so the other VM gets it first.
    fn release(&mut self, why: &str) {
        self.stop_node();
        let holding = matches!(self.role, Role::Hot | Role::Starting) && self.lease.is_some();
        self.role = Role::Stopping;
        let deadline = Instant::now() + self.wait;
        if let Some((seq, _)) = self.outstanding.take() {
            // let the job in flight finish first; its result no longer matters
            while let Ok((s, _)) = crate::daemon::sdnotify::recv_pinging(
                &self.replies,
                deadline.saturating_duration_since(Instant::now()),
            ) {
                if s == seq {
                    break;
                }
            }
        }
        let job = match (holding, self.lease.take()) {
            (true, Some(current)) => Job::Release { current },
            _ => Job::Unlock,
        };
        if self.send(job) {
            match crate::daemon::sdnotify::recv_pinging(
                &self.replies,
                deadline.saturating_duration_since(Instant::now()),
            ) {
                Ok((_, Reply::Released(Ok(())))) => tracing::info!(why, "lease released"),
                Ok((_, Reply::Released(Err(e)))) => {
                    tracing::warn!(why, "could not mark the lease released: {e}")
                }
                Ok(_) => {}
                Err(_) => tracing::warn!(
                    why,
                    "the share did not answer; the lease was not marked released"
                ),
            }
            self.outstanding = None;
        }
        if holding {
            self.holdoff_until = Some(Instant::now() + self.wait);
        }
        self.role = Role::Cold;
        self.renewing = None;
        self.lock_held = false;
        self.want_unlock = false;
        self.next_poll = Instant::now();
    }

    fn node_exited(&mut self, status: std::process::ExitStatus) {
        let pid = self.node.as_ref().map(Node::pid);
        self.node = None;
        tracing::error!(
            pid,
            "the node {}; giving the lease up so the other VM can take over",
            node::describe(status)
        );
        self.note_error(format!("the node {}", node::describe(status)));
        self.release("the node exited");
    }

    fn handle_request(&mut self, req: Request) {
        let answer = match req.command.as_str() {
            "status" => Ok(serde_json::to_string(&self.status()).expect("status serializes")),
            "release" => {
                if matches!(self.role, Role::Hot | Role::Starting) {
                    let epoch = self.lease.as_ref().map_or(0, |l| l.epoch);
                    self.release("release requested");
                    Ok(format!(
                        "released epoch {epoch}; not contending for {} ms",
                        self.wait.as_millis()
                    ))
                } else {
                    Ok(format!("nothing to release: this agent is {:?}", self.role).to_lowercase())
                }
            }
            other => Err(format!(
                "unknown command {other:?} (expected status or release)"
            )),
        };
        let _ = req.reply.send(answer);
    }

    fn status(&self) -> Status {
        let now = Instant::now();
        let (lease_holder, epoch, lease_state) = match (&self.role, &self.lease, &self.obs) {
            (Role::Hot | Role::Starting, Some(l), _) | (_, _, Obs::Lease(l)) => {
                (Some(l.holder.clone()), Some(l.epoch), Some(l.state))
            }
            _ => (None, None, None),
        };
        let age = if self.role == Role::Hot {
            now.duration_since(self.last_good)
        } else {
            now.duration_since(self.obs_changed)
        };
        Status {
            role: self.role,
            holder: self.holder.clone(),
            lease_holder,
            epoch,
            lease_state,
            last_renewal_age_ms: age.as_millis() as u64,
            lock_held: self.lock_held,
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
