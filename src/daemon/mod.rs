//! What the agents of both modes are made of: [`node`] supervises the Corda node (a process or
//! a systemd unit), [`control`] serves the Unix socket that `status`, `release`, `promote` and
//! the other commands talk to, and [`sdnotify`] reports readiness, status and watchdog pings to
//! systemd.

pub mod control;
pub mod node;
pub mod sdnotify;

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
