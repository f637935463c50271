//! The node health watchdog's decisions, as a pure state machine (no threads, no clock: every
//! input carries its `Instant`), so that grace, back-off, the restart window, giving up and
//! the cool-down are unit-tested without processes. The [`super::supervisor::Supervisor`]
//! feeds it the node's starts, probe rounds ([`super::probe`]) and exits, and carries out
//! what it decides; the mode's agent asks it whether this VM stays out of the contention.
//!
//! A failure is `probe_failures` consecutive failed rounds outside the grace period (which
//! ends `probe_grace_ms` after a start, or at the first passing round), or the node exiting by
//! itself. Each failure stops the node and schedules a local restart after a back-off that
//! starts at `restart_backoff_ms` and doubles with each restart still inside
//! `restart_window_ms`, up to `restart_backoff_max_ms`. A failure with `max_local_restarts`
//! restarts already in the window gives up: the mode releases the lease and stays out for
//! `cooldown_ms` (0: until `resume`). Where no other VM can take over (replicated mode
//! without a lease), it never gives up: it keeps restarting at the longest back-off.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::NodeConfig;

use super::duration_ms;
use super::protocol::{GaveUp, HealthState, NodeHealth};

/// The watchdog's settings, from `[node]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Whether any probe runs (without one only exits are failures).
    pub probes: bool,
    pub failures: u32,
    pub grace: Duration,
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub max_restarts: u32,
    pub window: Duration,
    /// `None`: until the operator resumes.
    pub cooldown: Option<Duration>,
    /// Whether giving up lets another VM take over (false: replicated mode without a lease).
    pub can_fail_over: bool,
}

impl Policy {
    /// The policy `[node]` configures.
    pub fn from_config(n: &NodeConfig, can_fail_over: bool) -> Policy {
        Policy {
            probes: n.has_probes(),
            failures: n.probe_failures.max(1),
            grace: Duration::from_millis(n.probe_grace_ms),
            backoff: Duration::from_millis(n.restart_backoff_ms),
            backoff_max: Duration::from_millis(n.restart_backoff_max_ms),
            max_restarts: n.max_local_restarts,
            window: Duration::from_millis(n.restart_window_ms),
            cooldown: (n.cooldown_ms > 0).then(|| Duration::from_millis(n.cooldown_ms)),
            can_fail_over,
        }
    }
}

/// What the supervisor must do after an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing changes.
    Nothing,
    /// Stop the node (if it still runs) and start it again after `backoff`; `failures`: the
    /// consecutive failed rounds that made it unhealthy (0 when it exited).
    Restart {
        why: String,
        failures: u32,
        backoff: Duration,
    },
    /// Stop the node and give up on this VM: the mode releases the lease and stays out.
    GiveUp { why: String, failures: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// No node runs and none is due.
    Idle,
    /// The node runs since `since`; `proven` once a round passed.
    Running { since: Instant, proven: bool },
    /// Waiting to restart the node at `at`.
    Restarting { at: Instant },
    /// Gave up at `since` because of `why`.
    GaveUp { since: Instant, why: String },
}

/// The state machine; see the module doc.
#[derive(Debug, Clone)]
pub struct Watchdog {
    p: Policy,
    phase: Phase,
    consecutive: u32,
    failures_total: u64,
    restarts_total: u64,
    /// When each restart within the window happened, oldest first.
    restarts: VecDeque<Instant>,
    last_error: Option<String>,
    cannot_fail_over: Option<String>,
}

impl Watchdog {
    /// A watchdog with no node.
    pub fn new(p: Policy) -> Watchdog {
        Watchdog {
            p,
            phase: Phase::Idle,
            consecutive: 0,
            failures_total: 0,
            restarts_total: 0,
            restarts: VecDeque::new(),
            last_error: None,
            cannot_fail_over: None,
        }
    }

    /// The node started at `now`; `restart` when the watchdog started it (after a failure).
    pub fn started(&mut self, now: Instant, restart: bool) {
        if restart {
            self.restarts_total += 1;
            self.restarts.push_back(now);
        }
        self.consecutive = 0;
        self.phase = Phase::Running {
            since: now,
            proven: false,
        };
    }

    /// The mode stopped the node (it gave up or lost the lease): no restart is due any more.
    /// A give-up stays.
    pub fn stopped(&mut self) {
        if !matches!(self.phase, Phase::GaveUp { .. }) {
            self.phase = Phase::Idle;
        }
        self.consecutive = 0;
    }

    /// A round of probes ended at `now`: `Ok`, or the first failure's description.
    pub fn probed(&mut self, result: Result<(), String>, now: Instant) -> Decision {
        let Phase::Running { since, proven } = &mut self.phase else {
            return Decision::Nothing; // a late round of a node already stopped
        };
        let error = match result {
            Ok(()) => {
                *proven = true;
                self.consecutive = 0;
                return Decision::Nothing;
            }
            Err(e) => e,
        };
        self.failures_total += 1;
        self.last_error = Some(error.clone());
        if !*proven && now.duration_since(*since) < self.p.grace {
            return Decision::Nothing;
        }
        self.consecutive += 1;
        if self.consecutive < self.p.failures {
            return Decision::Nothing;
        }
        let failures = self.consecutive;
        let why = format!("{failures} consecutive probe failures, the last: {error}");
        self.failed(why, failures, now)
    }

    /// The node exited by itself at `now` (`what`: `the node exited with code 1`).
    pub fn exited(&mut self, what: &str, now: Instant) -> Decision {
        if !matches!(self.phase, Phase::Running { .. }) {
            return Decision::Nothing;
        }
        self.failed(what.to_owned(), 0, now)
    }

    fn failed(&mut self, why: String, failures: u32, now: Instant) -> Decision {
        self.expire(now);
        self.consecutive = 0;
        let in_window = self.restarts_in_window();
        if in_window >= self.p.max_restarts {
            if self.p.can_fail_over {
                let why = format!(
                    "{why}; {in_window} local restarts within restart_window_ms already (max_local_restarts = {})",
                    self.p.max_restarts
                );
                self.phase = Phase::GaveUp {
                    since: now,
                    why: why.clone(),
                };
                return Decision::GiveUp { why, failures };
            }
            self.cannot_fail_over = Some(format!(
                "max_local_restarts ({}) reached, but without a lease no other VM can take over: restarting every restart_backoff_max_ms",
                self.p.max_restarts
            ));
        }
        let backoff = self.backoff(in_window);
        self.phase = Phase::Restarting { at: now + backoff };
        Decision::Restart {
            why,
            failures,
            backoff,
        }
    }

    /// The node was stopped for a restart at `now`: the back-off runs from the end of the stop,
    /// so a stop that had to wait for the SIGKILL does not use it up.
    pub fn halted(&mut self, backoff: Duration, now: Instant) {
        if let Phase::Restarting { at } = &mut self.phase {
            *at = (*at).max(now + backoff);
        }
    }

    /// The mode cannot hand the node over after all (replicated: the cold copy is not there to
    /// take over): instead of giving up, restart at the longest back-off, saying `why`.
    pub fn cannot_give_up(&mut self, why: String, now: Instant) {
        self.cannot_fail_over = Some(why);
        self.phase = Phase::Restarting {
            at: now + self.p.backoff_max,
        };
    }

    /// The pause before the restart that follows `in_window` restarts in the window.
    fn backoff(&self, in_window: u32) -> Duration {
        if self.cannot_fail_over.is_some() {
            return self.p.backoff_max;
        }
        let factor = 1u32.checked_shl(in_window).unwrap_or(u32::MAX);
        self.p
            .backoff
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.p.backoff_max)
    }

    /// Forgets restarts older than the window.
    fn expire(&mut self, now: Instant) {
        while self
            .restarts
            .front()
            .is_some_and(|&t| now.duration_since(t) >= self.p.window)
        {
            self.restarts.pop_front();
        }
        if self.restarts.len() < self.p.max_restarts as usize {
            self.cannot_fail_over = None;
        }
    }

    fn restarts_in_window(&self) -> u32 {
        u32::try_from(self.restarts.len()).unwrap_or(u32::MAX)
    }

    /// When the pending restart is due, if one is.
    pub fn restart_at(&self) -> Option<Instant> {
        match self.phase {
            Phase::Restarting { at } => Some(at),
            _ => None,
        }
    }

    /// Whether a restart is due at `now`.
    pub fn restart_due(&self, now: Instant) -> bool {
        self.restart_at().is_some_and(|at| now >= at)
    }

    /// Why this VM stays out of the contention at `now`, if it does; a cool-down that has
    /// passed ends the give-up here.
    pub fn staying_out(&mut self, now: Instant) -> Option<String> {
        let Phase::GaveUp { since, why } = &self.phase else {
            return None;
        };
        match self.p.cooldown {
            Some(c) if now.duration_since(*since) >= c => {
                tracing::info!(
                    cooldown_ms = duration_ms(c),
                    "the watchdog's cool-down passed: contending again"
                );
                self.resume();
                None
            }
            _ => Some(format!("the node health watchdog gave up: {why}")),
        }
    }

    /// The operator's `resume`: forgets a give-up and the restart history. Returns what was
    /// forgotten, if the watchdog had given up.
    pub fn resume(&mut self) -> Option<String> {
        let Phase::GaveUp { why, .. } = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return None;
        };
        self.restarts.clear();
        self.consecutive = 0;
        self.cannot_fail_over = None;
        Some(why)
    }

    /// Consecutive failed rounds.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    /// The last failed round's error.
    pub fn last_probe_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// The view for `status` at `now` (`now_unix_ms` the same moment on the wall clock).
    pub fn snapshot(&self, now: Instant, now_unix_ms: u64) -> NodeHealth {
        let (state, next, gave_up) = match &self.phase {
            Phase::Idle => (HealthState::None, None, None),
            Phase::Running { proven, .. } => {
                let state = if self.consecutive > 0 {
                    HealthState::Unhealthy
                } else if self.p.probes && !proven {
                    HealthState::Starting
                } else {
                    HealthState::Healthy
                };
                (state, None, None)
            }
            Phase::Restarting { at } => (
                HealthState::Restarting,
                Some(duration_ms(at.saturating_duration_since(now))),
                None,
            ),
            Phase::GaveUp { since, why } => {
                let ago = now.duration_since(*since);
                let g = GaveUp {
                    reason: why.clone(),
                    since_unix_ms: now_unix_ms.saturating_sub(duration_ms(ago)),
                    cooldown_left_ms: self.p.cooldown.map(|c| duration_ms(c.saturating_sub(ago))),
                };
                (HealthState::GaveUp, None, Some(g))
            }
        };
        let mut restarts = self.restarts.clone();
        while restarts
            .front()
            .is_some_and(|&t| now.duration_since(t) >= self.p.window)
        {
            restarts.pop_front();
        }
        NodeHealth {
            state,
            consecutive_failures: self.consecutive,
            probe_failures_total: self.failures_total,
            restarts_total: self.restarts_total,
            restarts_in_window: u32::try_from(restarts.len()).unwrap_or(u32::MAX),
            next_restart_in_ms: next,
            gave_up,
            last_probe_error: self.last_error.clone(),
            cannot_fail_over: self.cannot_fail_over.clone(),
        }
    }
}

#[cfg(test)]
mod tests;
