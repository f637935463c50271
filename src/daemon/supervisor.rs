//! What the agents of both modes do alike, around their own state machines (the lease in
//! shared mode, the epoch in replicated mode): start the node when the mode acquires the right
//! to run it (after the `on_acquire` hook) and stop it when that right is given up or lost
//! (then the `on_release` hook), keep the last error for `status`, tell systemd about
//! readiness, status changes and liveness, and start the control socket's thread.
//!
//! A mode's agent owns one [`Supervisor`] on its main thread (the node's death signal is tied
//! to the thread that spawned it) and calls [`Supervisor::acquire`] and
//! [`Supervisor::release`] at its own transitions.

use std::os::unix::net::UnixListener;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, never, Receiver};

use crate::config::{MetricsConfig, NodeConfig};

use super::control::{self, Incoming};
use super::metrics::http::{self, Endpoint, EndpointState};
use super::metrics::Metrics;
use super::node::{self, Node, NodeError, Stopped};
use super::protocol::NodeState;
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
        }
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

    fn env(&self, epoch: u64) -> [(&'static str, String); 2] {
        [
            ("ARTEMIS_SYNC_EPOCH", epoch.to_string()),
            ("ARTEMIS_SYNC_HOLDER", self.holder.clone()),
        ]
    }

    /// The mode acquired the right to run the node at `epoch`: runs `on_acquire`, then starts
    /// the node if one is configured and it does not run yet.
    pub fn acquire(&mut self, epoch: u64) -> Result<(), NodeError> {
        if self.node.is_some() {
            return Ok(());
        }
        let env = self.env(epoch);
        if !self.hooks.on_acquire.is_empty() {
            node::run_hook(&self.hooks.on_acquire, &env, self.hook_timeout)?;
        }
        if let Some(node) = Node::start(&self.node_config, &env)? {
            tracing::info!(
                pid = node.pid(),
                unit = self.node_config.systemd_unit,
                epoch,
                "node started"
            );
            self.node = Some(node);
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
        if let Err(e) = node::run_hook(&self.hooks.on_release, &env, self.hook_timeout) {
            self.note_error(e.to_string());
        }
    }

    /// Stops the node, if it runs: SIGTERM, SIGKILL after `[node] stop_timeout_ms`.
    pub fn stop_node(&mut self) {
        if let Some(node) = self.node.take() {
            let pid = node.pid();
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

    /// The node exited by itself: forgets it and returns what happened (`the node exited
    /// with code 1`), also noted as the last error.
    pub fn node_exited(&mut self, status: ExitStatus) -> String {
        self.node = None;
        let what = format!("the node {}", node::describe(status));
        self.note_error(what.clone());
        what
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
        self.watchdog
            .map_or(until_deadline, |w| until_deadline.min(w))
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

    fn node_config(command: &str) -> NodeConfig {
        let text = format!(
            "base_dir = \"/tmp\"\ncommand = [\"/bin/sh\", \"-c\", {command:?}]\nstop_timeout_ms = 2000\n"
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
        assert_eq!(s.node_exited(status), "the node exited with code 5");
        assert_eq!(
            s.last_error().as_deref(),
            Some("the node exited with code 5")
        );
        assert_eq!(s.node_pid(), None);
    }
}
