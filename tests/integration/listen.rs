//! Starting an agent with its replication listener handed over (systemd socket-activation
//! style, see `artemis_sync::daemon::listen_fds`): the test binds port 0 and keeps the socket,
//! so the port is never free between choosing it and the agent listening on it, and a
//! restarted agent gets the same socket again.

use std::net::TcpListener;
use std::process::{Command, Stdio};

use artemis_sync::daemon::listen_fds::command_with_listener;

/// A listener on a free loopback port, kept open by the test.
pub(crate) fn loopback_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")
}

/// `cmd` (program, arguments, environment changes) run with `listener` as its fd 3 and
/// `LISTEN_FDS=1`, `LISTEN_PID=<its pid>`; stdin is /dev/null.
pub(crate) fn with_listener(cmd: &Command, listener: &TcpListener) -> Command {
    let mut wrapped = command_with_listener(cmd.get_program(), listener);
    wrapped.args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => wrapped.env(key, v),
            None => wrapped.env_remove(key),
        };
    }
    wrapped.stdin(Stdio::null());
    wrapped
}
