//! The agent of the shared-storage mode: holds the lock and the lease, runs the node only
//! while it holds them, and fences (stops) its own node before the other VM may take over.
//!
//! Threads and channels:
//! - the **main thread** owns the state machine and, through its
//!   [`Supervisor`], the node process (it must: the node's death signal is tied to the thread
//!   that spawned it). It waits on a `crossbeam` select of shutdown signals, control requests,
//!   share-worker replies, the node's exit and the node's probe rounds, with a timeout at the
//!   next deadline (poll, renewal, fence, a local restart of the node);
//! - the **lease worker** ([`crate::lease::worker`]) does every operation on the share (lock,
//!   read and write the lease, then mount and link after a takeover) or the database, one at a
//!   time from a bounded queue. An NFS call can block for minutes; the main thread never waits
//!   on one past its fence deadline, it fences instead. The decisions are the
//!   [`crate::lease::machine`]'s; this agent turns its events into starting and stopping the
//!   node;
//! - the **control thread** serves the Unix socket (`status`, `release`, `resume`);
//! - the **probe thread**, while a node runs and probes are configured
//!   ([`crate::daemon::probe`]).
//!
//! The node health watchdog ([`crate::daemon::health`]) restarts an unhealthy or exited node
//! locally while this VM holds the lease; when it gives up, the agent releases the lease and
//! stays out of the contention (neither lock nor lease) until the cool-down passes or the
//! operator runs `artemis-sync resume`, so the other VM takes over.
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
use crate::daemon::metrics::http::EndpointState;
use crate::daemon::metrics::Metrics;
use crate::daemon::protocol::{
    AgentStatus, LeaseRole, ObservedLeaseState, Released, Reply, Request, Resumed, SharedStatus,
};
use crate::daemon::supervisor::Supervisor;
use crate::daemon::{duration_ms, ShutdownReason};
use crate::lease::machine::{Event, LeaseMachine, Timing};
use crate::lease::pg::{PgError, PgStore};
use crate::lease::{worker, LeaseStore, Obs};
use crate::shared::lease::LeaseState;
use crate::shared::lock_safety::{self, LockSafetyError};
use crate::shared::share_worker::{ensure_share, ShareStore};

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

/// The agent: the lease machine and the node; see the module doc.
struct Agent {
    holder: String,
    wait: Duration,
    machine: LeaseMachine,
    /// The node, its hooks, the last error, systemd.
    sup: Supervisor,
    /// The event metrics (fences here).
    metrics: Arc<Metrics>,
    /// The metrics endpoint, for its bind error in `status`.
    endpoint: EndpointState,
}

/// The lease machine's timing from `[lock]` and `[node]`.
pub fn timing(config: &Config) -> Timing {
    let l = &config.lock;
    Timing {
        update: Duration::from_millis(l.update_interval_ms),
        wait: Duration::from_millis(l.wait_interval_ms),
        stop_timeout: Duration::from_millis(config.node.stop_timeout_ms),
        margin: Duration::from_millis(fence_margin_ms(l.wait_interval_ms)),
    }
}

/// Runs the agent until `shutdown` delivers a reason; serves control requests on `listener`.
/// On the way out it stops the node and releases the lease, so the other VM can take over at
/// once.
pub fn run(
    config: Config,
    listener: UnixListener,
    shutdown: Receiver<ShutdownReason>,
) -> Result<ShutdownReason, AgentError> {
    let config = Arc::new(config);
    let store: Box<dyn LeaseStore> = match config.lease_backend() {
        Some(LeaseBackend::Postgres) => Box::new(PgStore::open(&config)?),
        _ => {
            lock_safety::check_lock_dir(&config)?;
            Box::new(ShareStore::new(&config))
        }
    };
    // whichever store keeps the lease, the node needs the share mounted and linked
    let c = config.clone();
    let metrics = Metrics::new();
    let m = metrics.clone();
    let after: Option<worker::AfterTakeover> = Some(Box::new(move || {
        let checked = ensure_share(&c);
        m.mount_checked(checked.is_ok());
        checked
    }));
    let has_lock = store.has_lock();
    let channels = worker::start(store, after, metrics.clone()).map_err(AgentError::Thread)?;
    let (requests, endpoint) =
        Supervisor::serve_control(listener, &config.metrics, metrics.clone())
            .map_err(AgentError::Thread)?;
    let t = timing(&config);
    let mut agent = Agent {
        holder: config.holder_id(),
        wait: t.wait,
        machine: LeaseMachine::new(config.holder_id(), t, channels, has_lock, None),
        // a hook runs while the fence deadline runs: one renewal period at most
        sup: Supervisor::new(&config.node, config.holder_id(), t.update),
        metrics,
        endpoint,
    };
    let l = &config.lock;
    tracing::info!(holder = %agent.holder, dir = %l.dir.display(), backend = ?config.lease_backend(),
        update_interval_ms = l.update_interval_ms, wait_interval_ms = l.wait_interval_ms, "agent started, cold");
    let replies = agent.machine.replies();
    loop {
        let timeout = agent.sup.wait_limit(
            agent
                .machine
                .next_deadline()
                .saturating_duration_since(Instant::now()),
        );
        let node_exit = agent.sup.node_exit();
        let rounds = agent.sup.probe_rounds();
        select! {
            recv(shutdown) -> reason => {
                let reason = reason.unwrap_or(ShutdownReason::Signal(libc::SIGTERM));
                tracing::info!(%reason, "stopping");
                agent.release("the agent is stopping");
                return Ok(reason);
            }
            recv(requests) -> req => if let Ok(req) = req { agent.handle_request(req) },
            recv(replies) -> msg => if let Ok((seq, done)) = msg { agent.machine.handle_reply(seq, done) },
            recv(node_exit) -> status => if let Ok(status) = status { agent.node_exited(status) },
            recv(rounds) -> round => if let Some(why) = round.ok().and_then(|r| agent.sup.probed(r)) {
                agent.give_up(&why);
            },
            default(timeout) => {}
        }
        agent.act();
        agent.health_turn();
        agent.machine.tick();
        agent.act();
        // systemd: READY once the first observation gave us a role, STATUS on every change,
        // and watchdog pings (a frozen agent is restarted with its cgroup, node included)
        agent.sup.ping_watchdog();
        if agent.machine.has_read() {
            let text = match (agent.machine.role(), agent.machine.held_epoch()) {
                (LeaseRole::Hot, Some(e)) => format!("hot at epoch {e}"),
                (role, _) => role.to_string(),
            };
            agent.sup.announce(text);
        }
    }
}

impl Agent {
    /// Carries out the machine's events: the node follows the lease.
    fn act(&mut self) {
        for event in self.machine.take_events() {
            match event {
                Event::Acquired(epoch) => {
                    let until = self.machine.may_run_until();
                    if let Err(e) = self.sup.acquire_until(epoch, Some(until)) {
                        tracing::error!(epoch, "{e}; giving the lease up");
                        self.sup.note_error(e.to_string());
                        self.release("the node could not start");
                    }
                }
                Event::Fence { epoch, why } => {
                    self.metrics.fence_events.inc();
                    self.sup.note_error(why);
                    self.sup.release(epoch);
                }
                Event::Error(e) => self.sup.note_error(e),
                Event::Healthy => self.sup.clear_error(),
            }
        }
    }

    /// Stops the node, then gives the lease up (see [`LeaseMachine::release`]).
    fn release(&mut self, why: &str) {
        self.sup.release(self.machine.held_epoch());
        self.machine.release(why);
    }

    fn node_exited(&mut self, status: std::process::ExitStatus) {
        if let Some(why) = self.sup.node_exited(status) {
            self.give_up(&why);
        }
    }

    /// The watchdog gave up (`why`): the node is down; give the lease up so the other VM can
    /// take over, and stay out of the contention.
    fn give_up(&mut self, why: &str) {
        tracing::error!(
            epoch = self.machine.held_epoch(),
            "{why}; giving the lease up so the other VM can take over"
        );
        self.release("the node health watchdog gave up");
        self.machine.stay_out(self.sup.staying_out());
    }

    /// The watchdog's turn: a due local restart (only while the lease is ours and renewed),
    /// and whether this VM stays out of the contention.
    fn health_turn(&mut self) {
        let may_run = self.machine.may_run_node();
        let until = self.machine.may_run_until();
        if let Some(why) = self.sup.health_turn(may_run, Some(until)) {
            self.give_up(&why);
        }
        self.machine.stay_out(self.sup.staying_out());
    }

    fn handle_request(&mut self, req: Incoming) {
        let answer = match req.request {
            Request::Status => Ok(Reply::Status(AgentStatus::Shared(Box::new(self.status())))),
            Request::Release => Ok(Reply::Released(self.release_requested())),
            Request::Resume => Ok(Reply::Resumed(Resumed {
                gave_up: self.sup.resume(),
            })),
            other => Err(other.not_in_mode(
                "shared",
                "promote, demote and verify are for replicated mode; `release` hands the lease over",
            )),
        };
        let _ = req.reply.send(answer);
    }

    fn release_requested(&mut self) -> Released {
        let role = self.machine.role();
        if !matches!(role, LeaseRole::Hot | LeaseRole::Starting) {
            return Released {
                epoch: None,
                role,
                holdoff_ms: 0,
            };
        }
        let epoch = self.machine.held_epoch().unwrap_or(0);
        self.release("release requested");
        Released {
            epoch: Some(epoch),
            role,
            holdoff_ms: duration_ms(self.wait),
        }
    }

    fn status(&self) -> SharedStatus {
        let m = &self.machine;
        let (lease_holder, epoch, lease_state) = match (m.role(), m.lease(), m.obs()) {
            (LeaseRole::Hot | LeaseRole::Starting, Some(l), _) | (_, _, Obs::Lease(l)) => (
                Some(l.holder.clone()),
                Some(l.epoch),
                Some(observed(l.state)),
            ),
            _ => (None, None, None),
        };
        SharedStatus {
            role: m.role(),
            holder: self.holder.clone(),
            lease_holder,
            epoch,
            lease_state,
            last_renewal_age_ms: duration_ms(m.age()),
            lock_held: m.lock_held(),
            node_pid: self.sup.node_pid(),
            node_state: self.sup.node_state(),
            error: self.sup.last_error(),
            node_health: self.sup.node_health(),
            wait_interval_ms: duration_ms(self.wait),
            metrics_error: self.endpoint.error(),
        }
    }
}

/// The lease record's state as `status` reports it.
pub fn observed(state: LeaseState) -> ObservedLeaseState {
    match state {
        LeaseState::Held => ObservedLeaseState::Held,
        LeaseState::Released => ObservedLeaseState::Released,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::supervisor::Hooks;
    use crate::lease::{Lease, LeaseState, RenewFail};
    use std::sync::Mutex;

    /// A lease in memory whose takeover answers late (a slow database, or a share's mount
    /// after the takeover).
    #[derive(Clone)]
    struct Slow(Arc<Mutex<Option<Lease>>>, Duration);

    impl LeaseStore for Slow {
        fn has_lock(&self) -> bool {
            false
        }
        fn observe(&mut self, _: bool) -> (Result<bool, String>, Obs) {
            let obs = self
                .0
                .lock()
                .unwrap()
                .clone()
                .map_or(Obs::Missing, Obs::Lease);
            (Ok(true), obs)
        }
        fn take_over(&mut self, _: &Obs, lease: &Lease, _: Duration) -> Result<(), (bool, String)> {
            *self.0.lock().unwrap() = Some(lease.clone());
            std::thread::sleep(self.1);
            Ok(())
        }
        fn renew(&mut self, current: &Lease, next: &Lease) -> Result<(), RenewFail> {
            let mut cur = self.0.lock().unwrap();
            if cur.as_ref() != Some(current) {
                return Err(RenewFail::Lost("changed".into()));
            }
            *cur = Some(next.clone());
            Ok(())
        }
        fn release(&mut self, _: &Lease) -> Result<(), String> {
            Ok(())
        }
        fn unlock(&mut self) {}
    }

    #[test]
    fn issue10_a_node_never_starts_after_the_fence_deadline_an_acquire_hook_ran_into() {
        // fence deadline: takeover + 600 - 100 - 60 = 440 ms; the takeover's answer comes at
        // 200 ms, and the on_acquire hook (within one renewal period, 300 ms) ends at ~480 ms
        let t = Timing {
            update: Duration::from_millis(300),
            wait: Duration::from_millis(600),
            stop_timeout: Duration::from_millis(100),
            margin: Duration::from_millis(60),
        };
        let released = Lease {
            state: LeaseState::Released,
            ..Lease::new("other", 3, 300, 600)
        };
        let store = Slow(
            Arc::new(Mutex::new(Some(released))),
            Duration::from_millis(200),
        );
        let metrics = Metrics::new();
        let channels = worker::start(Box::new(store), None, metrics.clone()).unwrap();
        let node: crate::config::NodeConfig = toml::from_str(
            "base_dir = \"/tmp\"\ncommand = [\"sleep\", \"30\"]\nstop_timeout_ms = 100\n",
        )
        .unwrap();
        let sh = |s: &str| vec!["/bin/sh".to_string(), "-c".into(), s.into()];
        let mut agent = Agent {
            holder: "me".into(),
            wait: t.wait,
            machine: LeaseMachine::new("me".into(), t, channels, false, None),
            sup: Supervisor::new(&node, "me".into(), t.update).with_hooks(Hooks {
                on_acquire: sh("sleep 0.28"),
                on_release: Vec::new(),
            }),
            metrics,
            endpoint: EndpointState::default(),
        };
        let replies = agent.machine.replies();
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut acquired = false;
        while Instant::now() < deadline && !acquired {
            agent.machine.tick();
            agent.act();
            if let Ok((seq, done)) = replies.recv_timeout(Duration::from_millis(5)) {
                agent.machine.handle_reply(seq, done);
            }
            // the machine turns hot in handle_reply, and act() carries out its Acquired
            acquired = agent.machine.role() == LeaseRole::Hot;
            agent.act();
        }
        assert!(acquired, "the takeover did not happen");
        let running = agent.sup.node_pid().is_some();
        agent.sup.release(None);
        assert!(
            !running || agent.machine.may_run_node(),
            "the node was started after the lease's fence deadline"
        );
    }
}
