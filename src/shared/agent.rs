//! The agent of the shared-storage mode: holds the lock and the lease, runs the node only
//! while it holds them, and fences (stops) its own node before the other VM may take over.
//!
//! Threads and channels:
//! - the **main thread** owns the state machine and, through its
//!   [`Supervisor`], the node process (it must: the node's death signal is tied to the thread
//!   that spawned it). It waits on a `crossbeam` select of shutdown signals, control requests,
//!   share-worker replies and the node's exit, with a timeout at the next deadline (poll,
//!   renewal, fence);
//! - the **share worker** (`share_worker.rs`) does every operation on the share (lock,
//!   read and write the lease, mount, link) one at a time from a bounded queue. An NFS call can
//!   block for minutes; the main thread never waits on one past its fence deadline, it fences
//!   instead;
//! - the **control thread** serves the Unix socket (`status`, `release`).
//!
//! Timeline (defaults 20 s / 40 s / 10 s): a renewal starts every `update_interval_ms`. The
//! fence deadline is the start of the last good renewal + `wait_interval_ms` −
//! `stop_timeout_ms` − a tenth of `wait_interval_ms`; at that moment, whatever the share
//! worker is doing, the node gets SIGTERM, and SIGKILL `stop_timeout_ms` later, so it is down
//! before a contender, which needs to see the lease unchanged for `wait_interval_ms`, may
//! take over.

use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver};

use crate::config::{fence_margin_ms, Config, LeaseBackend};
use crate::daemon::control::Incoming;
use crate::daemon::protocol::{
    AgentStatus, LeaseRole, ObservedLeaseState, Released, Reply, Request, SharedStatus,
};
use crate::daemon::supervisor::Supervisor;
use crate::daemon::{duration_ms, ShutdownReason};
use crate::lease::pg::{PgError, PgStore};
use crate::lease::{LeaseStore, Obs, RenewFail};
use crate::shared::lease::{Lease, LeaseState};
use crate::shared::lock_safety::{self, LockSafetyError};
use crate::shared::share_worker::{self, Done, Job, Jobs, Results, ShareStore};

/// The shortest pause between two observations of the lease by a cold agent.
pub const MIN_POLL: Duration = Duration::from_millis(20);
/// The longest pause between two observations of the lease by a cold agent.
pub const MAX_POLL: Duration = Duration::from_millis(1000);

/// Errors that stop the agent, each naming the path involved.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum AgentError {
    /// {0}
    LockSafety(#[from] LockSafetyError),
    /// cannot start a thread: {0}
    Thread(#[source] std::io::Error),
    /// {0}
    Pg(#[from] PgError),
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
    role: LeaseRole,
    jobs: Jobs,
    replies: Results,
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
    /// Whether the store has a lock (the share) besides the lease (false: the database).
    has_lock: bool,
    /// The node, its hooks, the last error, systemd.
    sup: Supervisor,
}

/// Runs the agent until `shutdown` delivers a reason; serves control requests on `listener`.
/// On the way out it stops the node and releases the lease, so the other VM can take over at
/// once.
pub fn run(
    config: Config,
    listener: UnixListener,
    shutdown: Receiver<ShutdownReason>,
) -> Result<ShutdownReason, AgentError> {
    let store: Box<dyn LeaseStore> = match config.lease_backend() {
        Some(LeaseBackend::Postgres) => Box::new(PgStore::open(&config)?),
        _ => {
            lock_safety::check_lock_dir(&config)?;
            Box::new(ShareStore::new(&config))
        }
    };
    let has_lock = store.has_lock();
    let config = Arc::new(config);
    let (jobs, replies) = share_worker::start(config.clone(), store).map_err(AgentError::Thread)?;
    let requests = Supervisor::serve_control(listener).map_err(AgentError::Thread)?;
    let mut agent = Agent::new(config, jobs, replies);
    agent.has_lock = has_lock;
    let l = &agent.config.lock;
    tracing::info!(holder = %agent.holder, dir = %l.dir.display(), backend = ?agent.config.lease_backend(),
        update_interval_ms = l.update_interval_ms, wait_interval_ms = l.wait_interval_ms, "agent started, cold");
    loop {
        let timeout = agent.sup.wait_limit(
            agent
                .next_deadline()
                .saturating_duration_since(Instant::now()),
        );
        let node_exit = agent.sup.node_exit();
        select! {
            recv(shutdown) -> reason => {
                let reason = reason.unwrap_or(ShutdownReason::Signal(libc::SIGTERM));
                tracing::info!(%reason, "stopping");
                agent.release("the agent is stopping");
                return Ok(reason);
            }
            recv(requests) -> req => if let Ok(req) = req { agent.handle_request(req) },
            recv(agent.replies.clone()) -> msg => if let Ok((seq, done)) = msg { agent.handle_reply(seq, done) },
            recv(node_exit) -> status => if let Ok(status) = status { agent.node_exited(status) },
            default(timeout) => {}
        }
        agent.tick();
        // systemd: READY once the first observation gave us a role, STATUS on every change,
        // and watchdog pings (a frozen agent is restarted with its cgroup, node included)
        agent.sup.ping_watchdog();
        if !matches!(agent.obs, Obs::Error(ref e) if e == NOT_READ_YET) {
            let text = match (agent.role, agent.lease.as_ref().map(|l| l.epoch)) {
                (LeaseRole::Hot, Some(e)) => format!("hot at epoch {e}"),
                (role, _) => role.to_string(),
            };
            agent.sup.announce(text);
        }
    }
}

/// The observation an agent starts with, before it has read the lease once.
const NOT_READ_YET: &str = "not read yet";

impl Agent {
    fn new(config: Arc<Config>, jobs: Jobs, replies: Results) -> Agent {
        let l = &config.lock;
        let now = Instant::now();
        let update = Duration::from_millis(l.update_interval_ms);
        Agent {
            holder: config.holder_id(),
            update,
            wait: Duration::from_millis(l.wait_interval_ms),
            stop_timeout: Duration::from_millis(config.node.stop_timeout_ms),
            margin: Duration::from_millis(fence_margin_ms(l.wait_interval_ms)),
            poll: (update / 4).clamp(MIN_POLL, MAX_POLL),
            // a hook runs while the fence deadline runs: one renewal period at most
            sup: Supervisor::new(&config.node, config.holder_id(), update),
            config,
            role: LeaseRole::Cold,
            jobs,
            replies,
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
            has_lock: true,
        }
    }

    fn fence_at(&self) -> Instant {
        self.last_good + self.wait - self.stop_timeout - self.margin
    }

    fn next_deadline(&self) -> Instant {
        match self.role {
            LeaseRole::Hot if self.outstanding.is_none() => self.next_renew.min(self.fence_at()),
            LeaseRole::Hot => self.fence_at(),
            LeaseRole::Starting => self.fence_at(),
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
            LeaseRole::Hot | LeaseRole::Starting if now >= self.fence_at() => {
                let since = now.duration_since(self.last_good).as_millis();
                self.fence(&format!("no successful renewal for {since} ms; the node must be down before the other VM may take over"));
            }
            LeaseRole::Hot if now >= self.next_renew && self.outstanding.is_none() => {
                let current = self.lease.clone().expect("hot means a lease");
                let next = Lease {
                    renewals: current.renewals + 1,
                    ..current.clone()
                };
                self.renewing = Some(next.clone());
                self.send(Job::Renew { current, next });
            }
            LeaseRole::Cold | LeaseRole::Fenced if now >= self.next_poll => {
                if self.holdoff_until.is_some_and(|t| now >= t) {
                    self.holdoff_until = None;
                    if self.role == LeaseRole::Fenced {
                        self.role = LeaseRole::Cold;
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

    fn handle_reply(&mut self, seq: u64, done: Done) {
        let Some((expected, sent)) = self.outstanding else {
            return;
        };
        if seq != expected {
            return;
        }
        self.outstanding = None;
        match done {
            Done::Observed { locked, obs } => self.observed(locked, obs),
            Done::TookOver(result) => self.took_over(sent, result),
            Done::Renewed(result) => self.renewed(sent, result),
            Done::Released(_) | Done::Unlocked => self.lock_held = false,
        }
    }

    fn observed(&mut self, locked: Result<bool, String>, obs: Obs) {
        let now = Instant::now();
        match locked {
            Ok(l) => self.lock_held = l,
            Err(e) => self.sup.note_error(e),
        }
        if obs != self.obs {
            if let Obs::Error(e) = &obs {
                self.sup.note_error(e.clone());
            }
            if let Obs::Lease(l) = &obs {
                self.epoch_seen = self.epoch_seen.max(l.epoch);
            }
            self.obs = obs;
            self.obs_changed = now;
        }
        if self.role != LeaseRole::Cold || !self.lock_held || self.holdoff_until.is_some() {
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
                    unchanged_ms = duration_ms(unchanged),
                    "{what} for wait_interval_ms; taking over"
                );
                self.take_over();
            }
            // The lock was granted while another holder renews: the lock does not exclude the
            // other VM (local-only locks, or its server dropped the holder's lock).
            Obs::Lease(l)
                if self.has_lock
                    && l.holder != self.holder
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
            duration_ms(self.update),
            duration_ms(self.wait),
        );
        let settle = self.poll.min(Duration::from_millis(200));
        if self.send(Job::Takeover {
            expect: self.obs.clone(),
            lease: lease.clone(),
            settle,
        }) {
            self.role = LeaseRole::Starting;
            self.lease = Some(lease);
            self.last_good = self.outstanding.map_or_else(Instant::now, |(_, t)| t);
        }
    }

    fn took_over(&mut self, sent: Instant, result: Result<(), (bool, String)>) {
        if self.role != LeaseRole::Starting {
            return; // fenced while the takeover ran: never start on it
        }
        let lease = self.lease.clone().expect("starting means a lease");
        match result {
            Ok(()) => {
                self.epoch_seen = lease.epoch;
                self.last_good = sent;
                self.next_renew = sent + self.update;
                self.role = LeaseRole::Hot;
                self.sup.clear_error();
                tracing::info!(holder = %self.holder, epoch = lease.epoch, "took over: hot");
                if let Err(e) = self.sup.acquire(lease.epoch) {
                    tracing::error!(epoch = lease.epoch, "{e}; giving the lease up");
                    self.sup.note_error(e.to_string());
                    self.release("the node could not start");
                }
            }
            Err((written, message)) => {
                tracing::error!(epoch = lease.epoch, "takeover failed: {message}");
                self.sup.note_error(message);
                if written {
                    self.role = LeaseRole::Hot; // release() expects to hold it
                    self.release("takeover failed");
                } else {
                    self.role = LeaseRole::Cold;
                    self.lease = None;
                }
            }
        }
    }

    fn renewed(&mut self, sent: Instant, result: Result<(), RenewFail>) {
        if self.role != LeaseRole::Hot {
            return; // fenced while it was in flight: never act on it
        }
        match result {
            Ok(()) => {
                self.lease = self.renewing.take();
                self.last_good = sent;
                self.next_renew = sent + self.update;
                self.sup.clear_error();
            }
            Err(RenewFail::Lost(why)) => self.fence(&why),
            Err(RenewFail::Io(why)) => {
                let left = self.fence_at().saturating_duration_since(Instant::now());
                tracing::warn!(
                    epoch = self.lease.as_ref().map(|l| l.epoch),
                    fence_in_ms = duration_ms(left),
                    "renewal failed: {why}; retrying"
                );
                self.sup.note_error(why);
                self.next_renew = Instant::now() + self.poll;
            }
        }
    }

    /// Stops the node at once and gives up the lease without writing it: someone else owns it,
    /// or the share cannot be trusted.
    fn fence(&mut self, why: &str) {
        let epoch = self.lease.as_ref().map(|l| l.epoch);
        tracing::error!(epoch, "FENCING: {why}; stopping the node");
        self.sup.note_error(why.to_owned());
        self.sup.release(epoch);
        self.role = LeaseRole::Fenced;
        self.lease = None;
        self.renewing = None;
        self.holdoff_until = Some(Instant::now() + self.wait);
        self.want_unlock = true;
        self.lock_held = false;
        self.next_poll = Instant::now();
    }

    /// Stops the node, marks the lease released if we hold it, and unlocks, waiting (bounded
    /// by `wait_interval_ms`) for the share. Afterwards the agent is cold and, if it held the
    /// lease, does not contend for `wait_interval_ms`, so the other VM gets it first.
    fn release(&mut self, why: &str) {
        self.sup.release(self.lease.as_ref().map(|l| l.epoch));
        let holding =
            matches!(self.role, LeaseRole::Hot | LeaseRole::Starting) && self.lease.is_some();
        self.role = LeaseRole::Stopping;
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
                Ok((_, Done::Released(Ok(())))) => tracing::info!(why, "lease released"),
                Ok((_, Done::Released(Err(e)))) => {
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
        self.role = LeaseRole::Cold;
        self.renewing = None;
        self.lock_held = false;
        self.want_unlock = false;
        self.next_poll = Instant::now();
    }

    fn node_exited(&mut self, status: std::process::ExitStatus) {
        let pid = self.sup.node_pid();
        let what = self.sup.node_exited(status);
        tracing::error!(
            pid,
            "{what}; giving the lease up so the other VM can take over"
        );
        self.release("the node exited");
    }

    fn handle_request(&mut self, req: Incoming) {
        let answer = match req.request {
            Request::Status => Ok(Reply::Status(AgentStatus::Shared(self.status()))),
            Request::Release => Ok(Reply::Released(self.release_requested())),
            other => Err(other.not_in_mode(
                "shared",
                "promote, demote and verify are for replicated mode; `release` hands the lease over",
            )),
        };
        let _ = req.reply.send(answer);
    }

    fn release_requested(&mut self) -> Released {
        let role = self.role;
        if !matches!(role, LeaseRole::Hot | LeaseRole::Starting) {
            return Released {
                epoch: None,
                role,
                holdoff_ms: 0,
            };
        }
        let epoch = self.lease.as_ref().map_or(0, |l| l.epoch);
        self.release("release requested");
        Released {
            epoch: Some(epoch),
            role,
            holdoff_ms: duration_ms(self.wait),
        }
    }

    fn status(&self) -> SharedStatus {
        let now = Instant::now();
        let (lease_holder, epoch, lease_state) = match (&self.role, &self.lease, &self.obs) {
            (LeaseRole::Hot | LeaseRole::Starting, Some(l), _) | (_, _, Obs::Lease(l)) => (
                Some(l.holder.clone()),
                Some(l.epoch),
                Some(observed(l.state)),
            ),
            _ => (None, None, None),
        };
        let age = if self.role == LeaseRole::Hot {
            now.duration_since(self.last_good)
        } else {
            now.duration_since(self.obs_changed)
        };
        SharedStatus {
            role: self.role,
            holder: self.holder.clone(),
            lease_holder,
            epoch,
            lease_state,
            last_renewal_age_ms: duration_ms(age),
            lock_held: self.lock_held,
            node_pid: self.sup.node_pid(),
            node_state: self.sup.node_state(),
            error: self.sup.last_error(),
        }
    }
}

/// The lease record's state as `status` reports it.
fn observed(state: LeaseState) -> ObservedLeaseState {
    match state {
        LeaseState::Held => ObservedLeaseState::Held,
        LeaseState::Released => ObservedLeaseState::Released,
    }
}
