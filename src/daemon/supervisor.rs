//! What the agents of both modes do alike, around their own state machines (the lease in
//! shared mode, the epoch in replicated mode): start the node when the mode acquires the right
//! to run it (after the `on_acquire` hook) and stop it when that right is given up or lost
//! (then the `on_release` hook), keep the last error for `status`, tell systemd about
//! readiness, status changes and liveness, and start the control socket's thread.
//!
//! A mode's agent owns one [`Supervisor`] on its main thread (the node's death signal is tied
//! to the thread that spawned it) and calls [`Supervisor::acquire`] and
//! [`Supervisor::release`] at its own transitions.
//!
//! The supervisor also carries out the node health watchdog ([`super::health`]): it runs the
//! probe thread ([`super::probe`]) while a node runs, stops an unhealthy or exited node and
//! restarts it after the back-off, but only when the mode says it still may run the node
//! ([`Supervisor::health_turn`]); when the watchdog gives up it tells the mode, which releases
//! the lease and asks [`Supervisor::staying_out`] before contending again.

use std::os::unix::net::UnixListener;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, never, Receiver, Sender};

use crate::config::{MetricsConfig, NodeConfig};

use super::control::{self, Incoming};
use super::health::{Decision, Policy, Watchdog};
use super::metrics::http::{self, Endpoint, EndpointState};
use super::metrics::Metrics;
use super::node::{self, Node, NodeError, Stopped};
use super::probe::{self, Probe, ProbeThread, Round};
use super::protocol::{NodeHealth, NodeState};
use super::{sdnotify, CONTROL_REPLY_TIMEOUT};

/// How many control requests may wait for the main thread.
pub const CONTROL_QUEUE: usize = 8;
/// How long the main loop waits at most when systemd set no watchdog.
pub const IDLE_WAKEUP: Duration = Duration::from_secs(1);

/// The commands run around the node: after acquiring, before the node starts; after the node
/// stopped on release.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    /// Run to completion before the node starts; a failure keeps the node from starting.
    pub on_acquire: Vec<String>,
    /// Run to completion after the node stopped; a failure is noted, nothing else.
    pub on_release: Vec<String>,
}

impl Hooks {
    /// The hooks `[node]` configures.
    pub fn from_config(node: &NodeConfig) -> Hooks {
        Hooks {
            on_acquire: node.on_acquire.clone(),
            on_release: node.on_release.clone(),
        }
    }
}

/// The node, its hooks, the last error, and what systemd was told; see the module doc.
#[derive(Debug)]
pub struct Supervisor {
    node_config: NodeConfig,
    hooks: Hooks,
    holder: String,
    hook_timeout: Duration,
    node: Option<Node>,
    last_error: Option<String>,
    /// The status text systemd last got; `None` before `READY=1`.
    announced: Option<String>,
    watchdog: Option<Duration>,
    /// The node health watchdog's state machine.
    health: Watchdog,
    probes: Vec<Probe>,
    rounds: (Sender<Round>, Receiver<Round>),
    /// Probes the running node; `None` while none runs or no probe is configured.
    probe_thread: Option<ProbeThread>,
    /// Counts node starts, so a late round of an earlier node is known.
    generation: u64,
    /// The epoch the node last started under (local restarts keep it).
    epoch: u64,
}

impl Supervisor {
    /// A supervisor for the node `node_config` describes, run as `holder` (given to the node and
    /// the hooks as `ARTEMIS_SYNC_HOLDER`); a hook that runs longer than `hook_timeout` is killed.
    pub fn new(node_config: &NodeConfig, holder: String, hook_timeout: Duration) -> Supervisor {
        Supervisor {
            node_config: node_config.clone(),
            hooks: Hooks::from_config(node_config),
            holder,
            hook_timeout,
            node: None,
            last_error: None,
            announced: None,
            watchdog: sdnotify::watchdog_interval(),
            health: Watchdog::new(Policy::from_config(node_config, true)),
            probes: Probe::from_config(node_config),
            rounds: probe::channel(),
            probe_thread: None,
            generation: 0,
            epoch: 0,
        }
    }

    /// Whether giving up lets another VM take over (false: replicated mode without a lease,
    /// where the watchdog keeps restarting at the longest back-off instead).
    pub fn with_fail_over(mut self, can_fail_over: bool) -> Supervisor {
        self.health = Watchdog::new(Policy::from_config(&self.node_config, can_fail_over));
        self
    }

    /// Replaces the hooks (those of the config by default).
    pub fn with_hooks(mut self, hooks: Hooks) -> Supervisor {
        self.hooks = hooks;
        self
    }

    /// Starts the control socket's thread and, unless `[metrics] listen` is empty, the metrics
    /// endpoint's ([`http::start`]); requests from both arrive on the returned channel. The
    /// endpoint's state says whether it could bind its address (it retries while it cannot).
    pub fn serve_control(
        listener: UnixListener,
        metrics_config: &MetricsConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Receiver<Incoming>, EndpointState)> {
        let (tx, rx) = bounded::<Incoming>(CONTROL_QUEUE);
        let endpoint = match metrics_config.address() {
            Some(addr) => http::start(
                addr,
                Endpoint {
                    requests: tx.clone(),
                    metrics,
                },
            )?,
            None => EndpointState::default(),
        };
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control::serve(listener, tx, CONTROL_REPLY_TIMEOUT))?;
        Ok((rx, endpoint))
    }

    /// Pings systemd's watchdog while the main thread runs a hook or starts or stops the node
    /// (see [`sdnotify::Pinging`]), for at most the longest any of them may take: a hook's
    /// timeout, a unit's start (three stop timeouts) and its stop after a late start (a stop
    /// timeout), each SIGKILL waited for.
    fn pinging(&self) -> sdnotify::Pinging {
        let stop = Duration::from_millis(self.node_config.stop_timeout_ms);
        sdnotify::Pinging::start(self.hook_timeout + 4 * stop + 2 * node::KILL_WAIT)
    }

    fn env(&self, epoch: u64) -> [(&'static str, String); 2] {
        [
            ("ARTEMIS_SYNC_EPOCH", epoch.to_string()),
            ("ARTEMIS_SYNC_HOLDER", self.holder.clone()),
        ]
    }

    /// The mode acquired the right to run the node at `epoch`: runs `on_acquire`, then starts
    /// the node if one is configured and it does not run yet.
    pub fn acquire(&mut self, epoch: u64) -> Result<(), NodeError> {
        self.acquire_until(epoch, None)
    }

    /// As [`Supervisor::acquire`], with the right to run the node ending at `until` (the
    /// lease's fence deadline): a node is not started once it has passed, however long the
    /// hook took.
    pub fn acquire_until(&mut self, epoch: u64, until: Option<Instant>) -> Result<(), NodeError> {
        if self.node.is_some() {
            return Ok(());
        }
        let env = self.env(epoch);
        if !self.hooks.on_acquire.is_empty() {
            let _pinging = self.pinging();
            node::run_hook(&self.hooks.on_acquire, &env, self.hook_timeout)?;
        }
        if until.is_some_and(|u| Instant::now() >= u) {
            return Err(NodeError::Late);
        }
        self.health.stopped(); // a restart pending from an earlier epoch is void
        self.start_node(epoch, false, until)
    }

    /// Starts the node (no hook) and, if probes are configured, its probe thread; a unit's
    /// start that has not finished by `until` is stopped.
    fn start_node(
        &mut self,
        epoch: u64,
        restart: bool,
        until: Option<Instant>,
    ) -> Result<(), NodeError> {
        let env = self.env(epoch);
        let limit = until.map(|u| u.saturating_duration_since(Instant::now()));
        let pinging = self.pinging();
        let started = Node::start(&self.node_config, &env, limit);
        drop(pinging);
        let Some(node) = started? else {
            return Ok(());
        };
        self.epoch = epoch;
        self.generation += 1;
        tracing::info!(
            pid = node.pid(),
            unit = self.node_config.systemd_unit,
            epoch,
            restart,
            "node started"
        );
        self.node = Some(node);
        self.health.started(Instant::now(), restart);
        if !self.probes.is_empty() {
            let n = &self.node_config;
            match ProbeThread::start(
                self.probes.clone(),
                self.generation,
                Duration::from_millis(n.probe_interval_ms),
                Duration::from_millis(n.probe_timeout_ms),
                self.rounds.0.clone(),
            ) {
                Ok(t) => self.probe_thread = Some(t),
                Err(e) => self.note_error(format!("cannot start the probe thread: {e}")),
            }
        }
        Ok(())
    }

    /// The mode gave up (or lost) the right to run the node: stops it, then runs `on_release`.
    pub fn release(&mut self, epoch: Option<u64>) {
        self.stop_node();
        if self.hooks.on_release.is_empty() {
            return;
        }
        let env = self.env(epoch.unwrap_or(0));
        let pinging = self.pinging();
        let ran = node::run_hook(&self.hooks.on_release, &env, self.hook_timeout);
        drop(pinging);
        if let Err(e) = ran {
            self.note_error(e.to_string());
        }
    }

    /// Stops the node, if it runs: SIGTERM, SIGKILL after `[node] stop_timeout_ms`. No
    /// local restart follows (the mode gave up or lost the right to run it).
    pub fn stop_node(&mut self) {
        self.health.stopped();
        self.halt_node();
    }

    /// Stops the node and its probe thread, leaving the watchdog's plans alone.
    fn halt_node(&mut self) {
        self.probe_thread = None;
        if let Some(node) = self.node.take() {
            let pid = node.pid();
            let _pinging = self.pinging();
            match node.stop(Duration::from_millis(self.node_config.stop_timeout_ms)) {
                Stopped::Stuck => tracing::error!(pid, "the node did not die even after SIGKILL"),
                how => tracing::info!(pid, ?how, "node stopped"),
            }
        }
    }

    /// Receives the node's exit status if it exits by itself (never, when none runs).
    pub fn node_exit(&self) -> Receiver<ExitStatus> {
        self.node.as_ref().map_or(never(), |n| n.exited().clone())
    }

    /// The node exited by itself: forgets it, notes what happened (`the node exited with
    /// code 1`) as the last error, and lets the watchdog decide; `Some(why)` when it gave up
    /// (the mode then releases the lease).
    pub fn node_exited(&mut self, status: ExitStatus) -> Option<String> {
        let pid = self.node_pid();
        self.probe_thread = None;
        if let Some(node) = self.node.take() {
            // (before a restart here or a release to the other VM: nothing of it may run on)
            let stop = Duration::from_millis(self.node_config.stop_timeout_ms);
            let _pinging = self.pinging();
            if !node.exited_kill_leftovers(stop) {
                tracing::error!(
                    pid,
                    "processes of the node's group did not die even after SIGKILL"
                );
            }
        }
        let what = format!("the node {}", node::describe(status));
        self.note_error(what.clone());
        let decision = self.health.exited(&what, Instant::now());
        self.carry_out(decision, pid)
    }

    /// The probe thread's rounds (never, while none runs).
    pub fn probe_rounds(&self) -> Receiver<Round> {
        if self.probe_thread.is_some() {
            self.rounds.1.clone()
        } else {
            never()
        }
    }

    /// A round of probes ended; `Some(why)` when the watchdog gave up.
    pub fn probed(&mut self, round: Round) -> Option<String> {
        if round.generation != self.generation || self.node.is_none() {
            return None;
        }
        let failed = round.result.is_err();
        let decision = self.health.probed(round.result, Instant::now());
        if failed && decision == Decision::Nothing {
            tracing::warn!(
                pid = self.node_pid(),
                epoch = self.epoch,
                failures = self.health.consecutive_failures(),
                error = self.health.last_probe_error(),
                "node probe failed"
            );
        }
        self.carry_out(decision, self.node_pid())
    }

    /// Stops the node for a restart or for good, as the watchdog decided.
    fn carry_out(&mut self, decision: Decision, pid: Option<u32>) -> Option<String> {
        let epoch = self.epoch;
        match decision {
            Decision::Nothing => None,
            Decision::Restart {
                why,
                failures,
                backoff,
            } => {
                let backoff_ms = super::duration_ms(backoff);
                tracing::error!(pid, epoch, failures, backoff_ms, "node unhealthy: {why}; stopping it and restarting it locally after the back-off");
                self.halt_node();
                self.health.halted(backoff, Instant::now());
                if let Some(note) = self.health.snapshot(Instant::now(), 0).cannot_fail_over {
                    tracing::error!(pid, epoch, backoff_ms, "{note}");
                }
                None
            }
            Decision::GiveUp { why, failures } => {
                tracing::error!(pid, epoch, failures, "node health watchdog GIVES UP: {why}; giving the right to run the node to the other VM");
                self.halt_node();
                self.note_error(format!("the node health watchdog gave up: {why}"));
                Some(why)
            }
        }
    }

    /// Restarts the node if the watchdog's back-off has passed and the mode says it `may_run`
    /// the node (holds the lease, is hot), until `until` at the latest (the lease's fence
    /// deadline: a unit's start not finished by then is stopped); a restart due while it may
    /// not is dropped.
    pub fn health_turn(&mut self, may_run: bool, until: Option<Instant>) -> Option<String> {
        if !self.health.restart_due(Instant::now()) {
            return None;
        }
        let epoch = self.epoch;
        if !may_run {
            tracing::warn!(
                epoch,
                "not restarting the node: this VM no longer may run it"
            );
            self.health.stopped();
            return None;
        }
        let restarts_total = self.health.snapshot(Instant::now(), 0).restarts_total + 1;
        tracing::info!(
            epoch,
            restarts_total,
            "restarting the node after the back-off"
        );
        if let Err(e) = self.start_node(epoch, true, until) {
            let what = format!("the node could not restart: {e}");
            self.note_error(what.clone());
            self.health.started(Instant::now(), true);
            let decision = self.health.exited(&what, Instant::now());
            return self.carry_out(decision, None);
        }
        None
    }

    /// Why this VM stays out of the contention (the watchdog gave up and the cool-down has not
    /// passed), if it does.
    pub fn staying_out(&mut self) -> Option<String> {
        self.health.staying_out(Instant::now())
    }

    /// The mode cannot hand the node over after the watchdog gave up (see
    /// [`super::health::Watchdog::cannot_give_up`]): the node is restarted at the longest
    /// back-off instead, and `why` is logged and kept for `status`.
    pub fn keep_restarting(&mut self, why: String) {
        tracing::error!(epoch = self.epoch, "{why}");
        self.health.cannot_give_up(why, Instant::now());
    }

    /// The operator's `resume`: forgets the watchdog's give-up; returns it, if there was one.
    pub fn resume(&mut self) -> Option<String> {
        let was = self.health.resume();
        if let Some(why) = &was {
            tracing::info!("resume: the watchdog's give-up ({why}) is forgotten; contending again");
        }
        was
    }

    /// The watchdog's view, for `status`.
    pub fn node_health(&self) -> NodeHealth {
        self.health
            .snapshot(Instant::now(), crate::sys::now_unix_ms())
    }

    /// The node's pid, while it runs.
    pub fn node_pid(&self) -> Option<u32> {
        self.node.as_ref().map(Node::pid)
    }

    /// Whether the node runs, for `status`.
    pub fn node_state(&self) -> NodeState {
        node::state(self.node.as_ref(), &self.node_config)
    }

    /// Logs `error` and keeps it for `status`; the same error again is not logged again.
    pub fn note_error(&mut self, error: impl Into<String>) {
        let error = error.into();
        if self.last_error.as_deref() != Some(&error) {
            tracing::error!("{error}");
            self.last_error = Some(error);
        }
    }

    /// Forgets the last error (after a success that shows it is over).
    pub fn clear_error(&mut self) {
        self.last_error = None;
    }

    /// The last error, for `status`.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.clone()
    }

    /// Tells systemd `text` (`hot at epoch 3`): `READY=1` with it the first time, then
    /// `STATUS=` whenever it changes.
    pub fn announce(&mut self, text: String) {
        if self.announced.as_ref() == Some(&text) {
            return;
        }
        if self.announced.is_none() {
            sdnotify::ready(&text);
        } else {
            sdnotify::status(&text);
        }
        self.announced = Some(text);
    }

    /// How long the main loop may wait for its next event when its own next deadline is
    /// `until_deadline` away: no longer than half of systemd's watchdog timeout.
    pub fn wait_limit(&self, until_deadline: Duration) -> Duration {
        let until = self.health.restart_at().map_or(until_deadline, |at| {
            until_deadline.min(at.saturating_duration_since(Instant::now()))
        });
        self.watchdog.map_or(until, |w| until.min(w))
    }

    /// Pings systemd's watchdog, if it set one: the main loop calls this on every turn.
    pub fn ping_watchdog(&self) {
        if self.watchdog.is_some() {
            sdnotify::watchdog();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::protocol::HealthState;

    fn node_config(command: &str) -> NodeConfig {
        let text = format!(
            "base_dir = \"/tmp\"\ncommand = [\"/bin/sh\", \"-c\", {command:?}]\nstop_timeout_ms = 2000\nmax_local_restarts = 0\n"
        );
        toml::from_str(&text).unwrap()
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn hooks_run_around_the_node_with_its_epoch_and_holder() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let append = |what: &str| {
            sh(&format!(
                "echo {what} $ARTEMIS_SYNC_EPOCH $ARTEMIS_SYNC_HOLDER >> {}",
                log.display()
            ))
        };
        let mut s = Supervisor::new(
            &node_config("sleep 30"),
            "a:/srv".into(),
            Duration::from_secs(5),
        )
        .with_hooks(Hooks {
            on_acquire: append("acquire"),
            on_release: append("release"),
        });
        assert_eq!(s.node_state(), NodeState::Stopped);
        s.acquire(7).unwrap();
        assert_eq!(s.node_state(), NodeState::Running);
        assert!(s.node_pid().is_some());
        s.acquire(7).unwrap(); // already running: neither the hook nor a second node
        s.release(Some(7));
        assert_eq!(s.node_state(), NodeState::Stopped);
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "acquire 7 a:/srv\nrelease 7 a:/srv\n"
        );
    }

    #[test]
    fn a_failing_acquire_hook_keeps_the_node_down_and_errors_are_kept() {
        let mut s = Supervisor::new(&node_config("sleep 30"), "a".into(), Duration::from_secs(5))
            .with_hooks(Hooks {
                on_acquire: sh("exit 3"),
                on_release: sh("exit 4"),
            });
        let err = s.acquire(1).unwrap_err().to_string();
        assert!(err.contains("exited with code 3"), "{err}");
        assert_eq!(s.node_state(), NodeState::Stopped);
        s.release(None);
        assert!(s.last_error().unwrap().contains("exited with code 4"));
        s.clear_error();
        assert_eq!(s.last_error(), None);
    }

    #[test]
    fn a_node_that_exits_is_reported_and_forgotten() {
        let mut s = Supervisor::new(&node_config("exit 5"), "a".into(), Duration::from_secs(5));
        s.acquire(1).unwrap();
        let status = s.node_exit().recv_timeout(Duration::from_secs(5)).unwrap();
        // max_local_restarts = 0: the watchdog gives up on the first exit
        let gave_up = s.node_exited(status).unwrap();
        assert!(gave_up.contains("the node exited with code 5"), "{gave_up}");
        assert!(s
            .last_error()
            .unwrap()
            .contains("the node exited with code 5"));
        assert_eq!(s.node_pid(), None);
    }

    #[test]
    fn issue14_an_exited_node_is_restarted_after_the_back_off_only_while_it_may_run() {
        let cfg: NodeConfig = toml::from_str(
            "base_dir = \"/tmp\"\ncommand = [\"/bin/sh\", \"-c\", \"exit 5\"]\n\
             max_local_restarts = 2\nrestart_backoff_ms = 50\n",
        )
        .unwrap();
        let mut s = Supervisor::new(&cfg, "a".into(), Duration::from_secs(5));
        s.acquire(3).unwrap();
        let first = s.node_pid().unwrap();
        let status = s.node_exit().recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(s.node_exited(status), None, "a restart, not a give-up");
        assert_eq!(s.node_health().state, HealthState::Restarting);
        assert!(s.wait_limit(Duration::from_secs(10)) <= Duration::from_millis(50));
        assert_eq!(s.health_turn(true, None), None);
        assert_eq!(s.node_pid(), None, "restarted before the back-off");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(s.health_turn(true, None), None);
        let second = s.node_pid().expect("restarted");
        assert_ne!(first, second);
        assert_eq!(s.node_health().restarts_total, 1);
        // the next exit waits twice as long, and a restart due while the mode may not run the
        // node is dropped
        let status = s.node_exit().recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(s.node_exited(status), None);
        assert!(s.node_health().next_restart_in_ms.unwrap() > 50);
        std::thread::sleep(Duration::from_millis(110));
        assert_eq!(s.health_turn(false, None), None);
        assert_eq!(s.node_pid(), None);
        assert_eq!(s.node_health().state, HealthState::None);
    }
}
