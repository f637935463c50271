//! The node health watchdog's view for `status` (both modes): [`NodeHealth`].

use std::fmt;

use serde::{Deserialize, Serialize};

/// What the watchdog makes of the node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// No node runs (and none waits for a restart).
    #[default]
    None,
    /// The node runs within its start-up grace, no probe has passed yet.
    Starting,
    /// The node runs and its last probe round passed (or no probe is configured).
    Healthy,
    /// The node runs and its last probe round failed.
    Unhealthy,
    /// The node was stopped (or exited); a local restart waits out the back-off.
    Restarting,
    /// The watchdog gave up on this VM; it stays out of the contention.
    GaveUp,
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HealthState::None => "none",
            HealthState::Starting => "starting",
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
            HealthState::Restarting => "restarting",
            HealthState::GaveUp => "gave_up",
        })
    }
}

/// Why and since when the watchdog gave up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GaveUp {
    /// The last failure and the count that made it give up.
    pub reason: String,
    /// When, in ms since the Unix epoch.
    pub since_unix_ms: u64,
    /// How much of `cooldown_ms` is left; `None`: until `artemis-sync resume`.
    pub cooldown_left_ms: Option<u64>,
}

/// The node health watchdog, for `status` and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeHealth {
    /// `none`, `starting`, `healthy`, `unhealthy`, `restarting` or `gave_up`.
    pub state: HealthState,
    /// Failed probe rounds in a row (outside the grace period).
    pub consecutive_failures: u32,
    /// Failed probe rounds since the agent started.
    pub probe_failures_total: u64,
    /// Local restarts since the agent started.
    pub restarts_total: u64,
    /// Local restarts within `restart_window_ms`.
    pub restarts_in_window: u32,
    /// While `restarting`: how long until the node starts again.
    pub next_restart_in_ms: Option<u64>,
    /// Why and since when the watchdog gave up, if it did.
    pub gave_up: Option<GaveUp>,
    /// The last failed probe's error.
    pub last_probe_error: Option<String>,
    /// Replicated mode without a lease, past `max_local_restarts`: why it keeps restarting
    /// instead of giving up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cannot_fail_over: Option<String>,
}

impl fmt::Display for NodeHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, {} failures in a row ({} total), {} restarts ({} in window)",
            self.state,
            self.consecutive_failures,
            self.probe_failures_total,
            self.restarts_total,
            self.restarts_in_window
        )?;
        if let Some(ms) = self.next_restart_in_ms {
            write!(f, ", next restart in {ms} ms")?;
        }
        if let Some(g) = &self.gave_up {
            match g.cooldown_left_ms {
                Some(ms) => write!(f, ", gave up ({}), out for {ms} ms more", g.reason)?,
                None => write!(
                    f,
                    ", gave up ({}), out until `artemis-sync resume`",
                    g.reason
                )?,
            }
        }
        if let Some(why) = &self.cannot_fail_over {
            write!(f, ", {why}")?;
        }
        if let Some(e) = &self.last_probe_error {
            write!(f, "; last probe error: {e}")?;
        }
        Ok(())
    }
}
