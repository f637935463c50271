//! What the agents of both modes are made of. [`supervisor`] is the part both agents run
//! alike around their own state machines: the node ([`node`]: a process or a systemd unit) and
//! its hooks, error notes for `status`, and systemd notifications ([`sdnotify`]: readiness,
//! status, watchdog). [`protocol`] is the typed, versioned control protocol both agents and the
//! CLI speak, [`control`] the Unix socket that carries it and [`client`] the CLI's side of it.
//! [`listen_fds`] takes over a listening socket handed over by the parent (systemd socket
//! activation). [`metrics`] is the HTTP endpoint for Prometheus and load balancers, which
//! asks the agent's main loop for its status through the control socket's channel. Nothing
//! here knows either mode: `daemon` imports neither `shared` nor `replicated`.

pub mod client;
pub mod control;
pub mod health;
pub mod listen_fds;
pub mod metrics;
pub mod node;
pub mod probe;
pub mod protocol;
pub mod sdnotify;
pub mod supervisor;

use std::time::Duration;

/// How long the control socket waits for the agent to answer a request.
pub const CONTROL_REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Why the agent stopped; carried to `main` and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReason {
    /// SIGTERM, SIGINT or SIGHUP.
    Signal(i32),
}

impl std::fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShutdownReason::Signal(libc::SIGTERM) => f.write_str("SIGTERM"),
            ShutdownReason::Signal(libc::SIGINT) => f.write_str("SIGINT"),
            ShutdownReason::Signal(libc::SIGHUP) => f.write_str("SIGHUP"),
            ShutdownReason::Signal(n) => write!(f, "signal {n}"),
        }
    }
}

/// A duration in whole milliseconds, for logs and `status`; `u64::MAX` (585 million years)
/// for one too long to say.
pub fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
