//! Supervising the Corda node process: started only while this VM holds the lease, in its own
//! process group so that stopping it reaches every process it started, and with
//! `PR_SET_PDEATHSIG(SIGKILL)` so that if the agent dies (even by `kill -9`) the node dies with
//! it instead of running on unfenced. Stopping is SIGTERM then SIGCONT to the group (a stopped
//! node dies too), then SIGKILL after `stop_timeout_ms`. A node run as a systemd unit
//! (`[node] systemd_unit`) is started and stopped with `systemctl` instead.
//!
//! The death signal fires when the *thread* that forked the child exits, so nodes must be
//! spawned from the agent's main thread, which lives as long as the process. It reaches the
//! direct child only: a wrapper script should `exec` the JVM (or run under systemd, whose
//! cgroup takes the whole tree down).

use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver};

use super::protocol::NodeState;

/// How long to wait for the group to die after SIGKILL before reporting it as stuck.
pub const KILL_WAIT: Duration = Duration::from_secs(5);

/// Errors starting or running node commands.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum NodeError {
    /// `[node] command` is empty
    Empty,
    /// cannot start node command `{program}`: {source}
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    /// hook `{program}` {outcome}
    Hook { program: String, outcome: String },
    /// the node was not started: the lease's fence deadline passed before it could be (during the takeover's set-up or the on_acquire hook)
    Late,
}

/// The environment variable that replaces `systemctl` (for tests).
pub const SYSTEMCTL_ENV: &str = "ARTEMIS_SYNC_SYSTEMCTL";
/// How often a node run as a systemd unit is checked for having stopped.
pub const UNIT_POLL: Duration = Duration::from_secs(1);

/// A running node: a process the agent started, or a systemd unit it started.
#[derive(Debug)]
pub struct Node {
    pid: u32,
    exited: Receiver<ExitStatus>,
    /// `Some(unit)` when the node is a systemd unit (started and stopped with systemctl).
    unit: Option<String>,
    /// Tells the unit watcher thread to stop watching.
    unit_done: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

fn systemctl() -> std::ffi::OsString {
    std::env::var_os(SYSTEMCTL_ENV)
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "systemctl".into())
}

/// Runs systemctl with `args`, bounded by `timeout`; `Ok(true)` when it exited 0.
fn run_systemctl(args: &[&str], timeout: Duration) -> Result<bool, NodeError> {
    run_systemctl_with(args, timeout, Stdio::null()).map(|(ok, _)| ok)
}

/// As [`run_systemctl`], with what it printed (its first line, trimmed).
fn run_systemctl_output(args: &[&str], timeout: Duration) -> Result<(bool, String), NodeError> {
    run_systemctl_with(args, timeout, Stdio::piped())
}

fn run_systemctl_with(
    args: &[&str],
    timeout: Duration,
    stdout: Stdio,
) -> Result<(bool, String), NodeError> {
    let program = systemctl();
    let mut child = Command::new(&program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .spawn()
        .map_err(|source| NodeError::Spawn {
            program: program.to_string_lossy().into_owned(),
            source,
        })?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            // (a line or two: what systemctl prints fits the pipe while it runs)
            let mut out = String::new();
            if let Some(mut pipe) = child.stdout.take() {
                let _ = io::Read::read_to_string(&mut pipe, &mut out);
            }
            let first = out.lines().next().unwrap_or("").trim().to_owned();
            return Ok((status.success(), first));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(NodeError::Hook {
                program: format!("{} {}", program.to_string_lossy(), args.join(" ")),
                outcome: format!(
                    "did not finish within {} ms and was killed",
                    timeout.as_millis()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How a stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The node had exited before we asked.
    AlreadyExited(ExitStatus),
    /// It exited after SIGTERM.
    Terminated(ExitStatus),
    /// It needed SIGKILL.
    Killed,
    /// It did not die even after SIGKILL (stuck in the kernel, e.g. on a hung NFS mount).
    Stuck,
}

impl Node {
    /// Starts `command` (program and arguments) with `env` added to the agent's environment.
    pub fn spawn(command: &[String], env: &[(&str, String)]) -> Result<Node, NodeError> {
        let (program, args) = command.split_first().ok_or(NodeError::Empty)?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAFETY of the closure: between fork and exec it calls only async-signal-safe
        // functions (getppid, prctl, _exit) and allocates nothing.
        let parent = libc::pid_t::try_from(std::process::id())
            .expect("Linux pids are below 2^22 and fit a pid_t");
        let death_signal =
            libc::c_ulong::try_from(libc::SIGKILL).expect("signal numbers are positive");
        // SAFETY: see above; the closure captures only plain integers.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // the agent may have died between fork and prctl: then nobody will fence us
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| NodeError::Spawn {
            program: program.clone(),
            source,
        })?;
        let pid = child.id();
        let (tx, exited) = bounded(1);
        std::thread::Builder::new()
            .name(format!("node-wait-{pid}"))
            .spawn(move || {
                if let Ok(status) = child.wait() {
                    let _ = tx.send(status);
                }
            })
            .map_err(|source| NodeError::Spawn {
                program: program.clone(),
                source,
            })?;
        Ok(Node {
            pid,
            exited,
            unit: None,
            unit_done: None,
        })
    }

    /// Starts the systemd unit `unit` (`systemctl start`), and watches it with
    /// `systemctl is-active` every [`UNIT_POLL`]: once it is no longer active, [`Node::exited`]
    /// reports it. The unit's own `TimeoutStartSec` bounds the start, and `timeout` ours. A
    /// start that fails or overruns is stopped as [`Node::stop`] stops a unit (`stop_timeout`
    /// before SIGKILL): systemd's start job goes on after our `systemctl` is killed, and would
    /// run the node after the mode gave the lease up.
    pub fn start_unit(
        unit: &str,
        timeout: Duration,
        stop_timeout: Duration,
    ) -> Result<Node, NodeError> {
        let started = run_systemctl(&["start", unit], timeout).and_then(|ok| {
            ok.then_some(()).ok_or_else(|| NodeError::Hook {
                program: format!("systemctl start {unit}"),
                outcome: "failed (see `systemctl status` and the journal of the unit)".into(),
            })
        });
        if let Err(e) = started {
            if !matches!(e, NodeError::Spawn { .. }) {
                let how = stop_unit(unit, stop_timeout);
                tracing::warn!(unit, ?how, "stopped the unit after its start failed: {e}");
            }
            return Err(e);
        }
        let (tx, exited) = bounded(1);
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (unit_name, watching) = (unit.to_owned(), done.clone());
        std::thread::Builder::new()
            .name("unit-watch".into())
            .spawn(move || loop {
                std::thread::sleep(UNIT_POLL);
                if watching.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                if let Ok(false) = run_systemctl(
                    &["is-active", "--quiet", &unit_name],
                    Duration::from_secs(10),
                ) {
                    let _ = tx.send(ExitStatus::from_raw(1 << 8));
                    return;
                }
            })
            .map_err(|source| NodeError::Spawn {
                program: "unit watcher".into(),
                source,
            })?;
        Ok(Node {
            pid: 0,
            exited,
            unit: Some(unit.to_owned()),
            unit_done: Some(done),
        })
    }

    /// Starts the configured node: `[node] systemd_unit` or `[node] command`, if either is set;
    /// a unit's start may take `limit` at most (the time left before the lease's fence
    /// deadline: its processes run while `systemctl start` waits).
    pub fn start(
        node: &crate::config::NodeConfig,
        env: &[(&str, String)],
        limit: Option<Duration>,
    ) -> Result<Option<Node>, NodeError> {
        if !node.systemd_unit.is_empty() {
            let timeout = Duration::from_millis(node.stop_timeout_ms.max(1000) * 3);
            Node::start_unit(
                &node.systemd_unit,
                limit.map_or(timeout, |l| l.min(timeout)),
                Duration::from_millis(node.stop_timeout_ms),
            )
            .map(Some)
        } else if !node.command.is_empty() {
            Node::spawn(&node.command, env).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The node's pid (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Receives the exit status once the node exits by itself.
    pub fn exited(&self) -> &Receiver<ExitStatus> {
        &self.exited
    }

    /// Stops the node: SIGTERM then SIGCONT to its process group (so that a stopped node dies
    /// gracefully too), SIGKILL after `timeout`; for a unit, `systemctl stop`, and after
    /// `timeout` (the unit's own `TimeoutStopSec`, 90 s by default, may be longer: its stop
    /// goes on after our `systemctl` is gone) `systemctl kill --signal=SIGKILL`, then until
    /// `systemctl is-active` says it is down, as long as a process node's SIGKILL is waited for.
    pub fn stop(self, timeout: Duration) -> Stopped {
        if let Some(unit) = &self.unit {
            if let Some(d) = &self.unit_done {
                d.store(true, std::sync::atomic::Ordering::Release);
            }
            return stop_unit(unit, timeout);
        }
        if let Ok(status) = self.exited.try_recv() {
            return match kill_leftovers(self.pid) {
                true => Stopped::AlreadyExited(status),
                false => Stopped::Stuck,
            };
        }
        signal_group(self.pid, libc::SIGTERM);
        // a stopped (SIGSTOPped, hung in a debugger) node only sees the SIGTERM once continued
        signal_group(self.pid, libc::SIGCONT);
        if let Ok(status) = self.exited.recv_timeout(timeout) {
            signal_group(self.pid, libc::SIGKILL);
            return Stopped::Terminated(status);
        }
        signal_group(self.pid, libc::SIGKILL);
        match self.exited.recv_timeout(KILL_WAIT) {
            Ok(_) => Stopped::Killed,
            Err(_) => Stopped::Stuck,
        }
    }

    /// The node exited by itself: what is left of its process group (a JVM a wrapper started
    /// without `exec`) is killed too, and waited for; false if some of it outlived SIGKILL.
    /// A unit no longer active may still be deactivating (the rest of its cgroup stopping, for
    /// up to its `TimeoutStopSec`) or about to be restarted by systemd (`Restart=`): it is
    /// stopped as [`Node::stop`] stops it, SIGKILL after `timeout`.
    pub fn exited_kill_leftovers(self, timeout: Duration) -> bool {
        match &self.unit {
            Some(unit) => !matches!(stop_unit(unit, timeout), Stopped::Stuck),
            None => kill_leftovers(self.pid),
        }
    }
}

/// At the agent's start, before it contends: stops `[node] systemd_unit` if it runs. A unit is
/// not in the agent's cgroup and gets no death signal, so one started by an agent that died
/// (kill -9, systemd's watchdog abort, a crash) runs on, unfenced, while this agent has not
/// (yet) the right to run it; it is stopped as [`Node::stop`] stops a unit. `None`: no unit is
/// configured, or it is down.
pub fn stop_stray_unit(node: &crate::config::NodeConfig) -> Option<Stopped> {
    let unit = node.systemd_unit.as_str();
    if unit.is_empty() || unit_down(unit) {
        return None;
    }
    tracing::warn!(
        unit,
        "the node's unit runs although this agent has just started (left by an agent that died?): stopping it before contending"
    );
    let how = stop_unit(unit, Duration::from_millis(node.stop_timeout_ms));
    match how {
        Stopped::Stuck => tracing::error!(unit, "the node's unit is still up after SIGKILL"),
        _ => tracing::info!(unit, ?how, "stopped the node's unit left running"),
    }
    Some(how)
}

/// `systemctl stop unit`, and after `timeout` `systemctl kill --signal=SIGKILL`, then until
/// `systemctl is-active` says it is down (at most [`KILL_WAIT`]).
fn stop_unit(unit: &str, timeout: Duration) -> Stopped {
    if let Ok(true) = run_systemctl(&["stop", unit], timeout) {
        if unit_down(unit) {
            return Stopped::Terminated(ExitStatus::from_raw(0));
        }
    }
    let _ = run_systemctl(&["kill", "--signal=SIGKILL", unit], KILL_WAIT);
    let deadline = std::time::Instant::now() + KILL_WAIT;
    while std::time::Instant::now() < deadline {
        if unit_down(unit) {
            return Stopped::Killed;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Stopped::Stuck
}

/// The states `systemctl is-active` prints for a unit none of whose processes runs. It exits
/// non-zero for others too: `deactivating` (its stop still going on), `activating` (a start,
/// a `Restart=`, on the way).
const UNIT_STATES_DOWN: &[&str] = &["inactive", "failed"];

/// Whether `systemctl is-active` says the unit is down ([`UNIT_STATES_DOWN`]). Unsure
/// (systemctl failed, or printed no state: no connection to systemd) counts as up.
fn unit_down(unit: &str) -> bool {
    match run_systemctl_output(&["is-active", unit], Duration::from_secs(10)) {
        Ok((false, state)) => UNIT_STATES_DOWN.contains(&state.as_str()),
        _ => false,
    }
}

/// SIGKILLs what is left of the process group `pgid` whose leader has exited, and waits up
/// to [`KILL_WAIT`] until none of it is left (zombies reaped by their new parent included);
/// false if some of it is still there.
fn kill_leftovers(pgid: u32) -> bool {
    signal_group(pgid, libc::SIGKILL);
    let deadline = std::time::Instant::now() + KILL_WAIT;
    loop {
        if !group_exists(pgid) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether a live process of group `pgid` is still there: one in `/proc` whose group it is
/// and that is not a zombie (a killed member is one until its new parent reaps it, which
/// may take a while; it runs nothing meanwhile).
fn group_exists(pgid: u32) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|e| {
        let is_pid = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        is_pid
            && std::fs::read_to_string(e.path().join("stat"))
                .is_ok_and(|stat| live_member(&stat, pgid))
    })
}

/// Whether a `/proc/<pid>/stat` line is of a live (not zombie) process of group `pgid`.
fn live_member(stat: &str, pgid: u32) -> bool {
    // `pid (comm) state ppid pgrp ...`: comm may hold spaces and parentheses
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let mut fields = rest.split_whitespace();
    let (Some(state), Some(_ppid), Some(pgrp)) = (fields.next(), fields.next(), fields.next())
    else {
        return false;
    };
    pgrp.parse::<u32>() == Ok(pgid) && !matches!(state, "Z" | "X")
}

fn signal_group(pgid: u32, signal: libc::c_int) {
    // never 0 or negative: kill(0) and kill(-1) would reach our own group or every process
    let Some(pgid) = libc::pid_t::try_from(pgid).ok().filter(|&p| p > 0) else {
        return;
    };
    // SAFETY: kill has no memory-safety preconditions; a negative pid names the process group
    // the node leads (it was started with process_group(0)). ESRCH (gone) is fine.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// `running`, `stopped`, or `none` when no node is configured: for `status`.
pub fn state(node: Option<&Node>, cfg: &crate::config::NodeConfig) -> NodeState {
    match node {
        _ if cfg.command.is_empty() && cfg.systemd_unit.is_empty() => NodeState::None,
        Some(_) => NodeState::Running,
        None => NodeState::Stopped,
    }
}

/// A short description of an exit status for logs.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "ended".into(),
    }
}

/// Runs a hook command to completion within `timeout`; a hook that overruns is killed.
pub fn run_hook(
    command: &[String],
    env: &[(&str, String)],
    timeout: Duration,
) -> Result<(), NodeError> {
    let node = Node::spawn(command, env)?;
    let program = command[0].clone();
    match node.exited.recv_timeout(timeout) {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(NodeError::Hook {
            program,
            outcome: describe(status),
        }),
        Err(_) => {
            node.stop(Duration::ZERO);
            Err(NodeError::Hook {
                program,
                outcome: format!(
                    "did not finish within {} ms and was killed",
                    timeout.as_millis()
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_zombie_or_another_group_is_no_live_member() {
        let stat = |state: &str, pgrp: u32| format!("42 (a (b) c) {state} 1 {pgrp} 42 0 -1");
        assert!(live_member(&stat("S", 7), 7));
        assert!(live_member(&stat("R", 7), 7));
        assert!(!live_member(&stat("Z", 7), 7));
        assert!(!live_member(&stat("S", 8), 7));
        assert!(!live_member("garbage", 7));
    }

    use super::*;
    use std::time::Instant;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    fn alive(pid: u32) -> bool {
        // SAFETY: signal 0 only checks for existence.
        unsafe { libc::kill(libc::pid_t::try_from(pid).unwrap(), 0) == 0 }
    }

    #[test]
    fn term_stops_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild");
        let node = Node::spawn(
            &sh(&format!("sleep 30 & echo $! > {}; wait", pidfile.display())),
            &[],
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pidfile.exists() || std::fs::read_to_string(&pidfile).unwrap().trim().is_empty() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        let grandchild: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(matches!(
            node.stop(Duration::from_secs(5)),
            Stopped::Terminated(_)
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(grandchild) {
            assert!(
                Instant::now() < deadline,
                "grandchild {grandchild} survived"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn kill_after_the_timeout_when_term_is_ignored() {
        let node = Node::spawn(&sh("trap '' TERM; while :; do sleep 0.05; done"), &[]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        assert_eq!(node.stop(Duration::from_millis(200)), Stopped::Killed);
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn issue14_a_stopped_node_gets_its_sigterm_once_continued() {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("termed");
        let node = Node::spawn(
            &sh(&format!(
                "trap 'touch {}; exit 0' TERM; while :; do sleep 0.05; done",
                mark.display()
            )),
            &[],
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        signal_group(node.pid(), libc::SIGSTOP);
        assert!(matches!(
            node.stop(Duration::from_secs(5)),
            Stopped::Terminated(_)
        ));
        assert!(mark.exists(), "the TERM trap did not run");
    }

    #[test]
    fn hooks_report_failure_and_overrun() {
        run_hook(&sh("exit 0"), &[], Duration::from_secs(5)).unwrap();
        let err = run_hook(&sh("exit 3"), &[], Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("exited with code 3"), "{err}");
        let err = run_hook(&sh("sleep 10"), &[], Duration::from_millis(100)).unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert!(matches!(Node::spawn(&[], &[]), Err(NodeError::Empty)));
        let err = Node::spawn(&["/no/such/program".into()], &[]).unwrap_err();
        assert!(err.to_string().contains("/no/such/program"), "{err}");
    }
}
