//! systemd readiness and watchdog notifications (`sd_notify(3)`), written out: a datagram to
//! `$NOTIFY_SOCKET` (a path, or an abstract name starting with `@`). Without the variable (not
//! under systemd, or `Type=simple`) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

fn send(msg: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = target.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(msg.as_bytes(), &addr))
    } else {
        sock.send_to(msg.as_bytes(), &target)
    };
    if let Err(e) = result {
        tracing::debug!("sd_notify: {e}");
    }
}

/// Tells systemd the service is up, with a one-line status.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={status}"));
}

/// Updates the one-line status `systemctl status` shows.
pub fn status(status: &str) {
    send(&format!("STATUS={status}"));
}

/// Tells systemd the service is stopping.
pub fn stopping() {
    send("STOPPING=1");
}

/// Keeps systemd's watchdog from restarting us.
pub fn watchdog() {
    send("WATCHDOG=1");
}

/// How often to ping the watchdog (half its timeout), if systemd set one for this process.
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings systemd's watchdog from a thread of its own while it lives, for at most the bound it
/// was started with: held by the main thread around a step that blocks it for a time bounded
/// by the step's own timeouts (a hook, a node's start or stop), so that a slow but healthy step
/// is not taken for a hung agent and aborted half done (in the middle of a takeover or of a
/// release). Past the bound the pings stop, so a step that hangs for good is still caught.
/// Nothing without a watchdog.
#[derive(Debug)]
pub struct Pinging {
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pinging {
    /// Starts pinging at the watchdog's interval, for at most `bound`.
    pub fn start(bound: Duration) -> Pinging {
        let none = Pinging {
            stop: None,
            thread: None,
        };
        let Some(step) = watchdog_interval() else {
            return none;
        };
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let deadline = std::time::Instant::now() + bound;
        let spawned = std::thread::Builder::new()
            .name("watchdog-ping".into())
            .spawn(move || {
                while std::time::Instant::now() < deadline {
                    watchdog();
                    if !matches!(
                        stopped.recv_timeout(step),
                        Err(crossbeam_channel::RecvTimeoutError::Timeout)
                    ) {
                        return;
                    }
                }
            });
        match spawned {
            Ok(thread) => Pinging {
                stop: Some(stop),
                thread: Some(thread),
            },
            Err(e) => {
                tracing::warn!("cannot start the watchdog ping thread: {e}");
                none
            }
        }
    }
}

impl Drop for Pinging {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for `rx` at most `timeout`, pinging the watchdog meanwhile, so that a long but healthy
/// wait (a drain, a verify, a release on a slow share) does not get the agent killed.
pub fn recv_pinging<T>(
    rx: &crossbeam_channel::Receiver<T>,
    timeout: Duration,
) -> Result<T, crossbeam_channel::RecvTimeoutError> {
    let deadline = std::time::Instant::now() + timeout;
    let step = watchdog_interval().unwrap_or(timeout);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left.min(step)) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) if !left.is_zero() && left > step => {
                watchdog()
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recv_pinging_returns_the_message_or_times_out() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let _ = tx.send(7);
        });
        assert_eq!(recv_pinging(&rx, Duration::from_secs(5)), Ok(7));
        let (_tx, rx) = crossbeam_channel::bounded::<u8>(1);
        let started = std::time::Instant::now();
        assert_eq!(
            recv_pinging(&rx, Duration::from_millis(100)),
            Err(crossbeam_channel::RecvTimeoutError::Timeout)
        );
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn sends_to_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // the environment is process-wide: this is the only test that sets it
        std::env::set_var("NOTIFY_SOCKET", &path);
        ready("hot at epoch 3");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=hot at epoch 3");
    }
}
