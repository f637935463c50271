//! The agent's control socket: a Unix stream socket (default `/run/artemis-sync/agent.sock`,
//! mode 0600) where the running agent answers one request per connection, one line each way:
//! `status` (a JSON object) and `release` (stop the node, give the lease up).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crossbeam_channel::{bounded, Sender};

/// The longest request or reply line accepted.
pub const MAX_LINE_BYTES: u64 = 64 * 1024;
/// How long the client waits for a `status` reply.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the control socket, naming it.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ControlError {
    /// no agent answers on {path:?} (is `artemis-sync agent` running with this config?): {source}
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// control socket {path:?}: {source}
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// another agent already answers on {0:?}; only one agent may run per config
    InUse(PathBuf),
    /// the agent on {path:?} answered with an error: {message}
    Refused { path: PathBuf, message: String },
}

/// A request from a client, with where to send the one-line answer.
#[derive(Debug)]
pub struct Request {
    /// `status` or `release`.
    pub command: String,
    /// The answer: `Ok(line)` or `Err(message)`.
    pub reply: Sender<Result<String, String>>,
}

/// Binds the socket at `path`, replacing a stale one left by a dead agent, refusing when a
/// live agent still answers there.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves connections until the process ends: each request goes to `requests`, and the reply
/// (or a timeout after `reply_timeout`) back to the client.
pub fn serve(listener: UnixListener, requests: Sender<Request>, reply_timeout: Duration) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(STATUS_TIMEOUT));
        let mut line = String::new();
        if BufReader::new((&conn).take_bounded())
            .read_line(&mut line)
            .is_err()
        {
            continue;
        }
        let (tx, rx) = bounded(1);
        let answer = if requests
            .send(Request {
                command: line.trim().to_owned(),
                reply: tx,
            })
            .is_err()
        {
            Err("the agent is shutting down".to_owned())
        } else {
            rx.recv_timeout(reply_timeout)
                .unwrap_or_else(|_| Err("the agent did not answer in time".into()))
        };
        let text = match answer {
            Ok(s) => format!("ok {s}\n"),
            Err(e) => format!("error {e}\n"),
        };
        let _ = conn.write_all(text.as_bytes());
    }
}

trait TakeBounded: std::io::Read + Sized {
    fn take_bounded(self) -> std::io::Take<Self> {
        self.take(MAX_LINE_BYTES)
    }
}
impl<R: std::io::Read> TakeBounded for R {}

/// Sends `command` to the agent at `path` and returns its answer.
pub fn request(path: &Path, command: &str, timeout: Duration) -> Result<String, ControlError> {
    let mut conn = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    conn.set_read_timeout(Some(timeout)).map_err(io)?;
    conn.write_all(format!("{command}\n").as_bytes())
        .map_err(io)?;
    let mut line = String::new();
    BufReader::new((&conn).take_bounded())
        .read_line(&mut line)
        .map_err(io)?;
    let line = line.trim_end();
    if let Some(ok) = line.strip_prefix("ok ") {
        Ok(ok.to_owned())
    } else {
        Err(ControlError::Refused {
            path: path.to_owned(),
            message: line.strip_prefix("error ").unwrap_or(line).to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusal_of_a_second_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/agent.sock");
        let listener = bind(&path).unwrap();
        assert!(matches!(bind(&path), Err(ControlError::InUse(_))));
        let (tx, rx) = bounded::<Request>(1);
        std::thread::spawn(move || serve(listener, tx, Duration::from_secs(5)));
        std::thread::spawn(move || {
            for r in rx.iter() {
                let answer = if r.command == "status" {
                    Ok("{}".into())
                } else {
                    Err(format!("unknown command {:?}", r.command))
                };
                let _ = r.reply.send(answer);
            }
        });
        assert_eq!(request(&path, "status", STATUS_TIMEOUT).unwrap(), "{}");
        let err = request(&path, "dance", STATUS_TIMEOUT)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown command \"dance\""), "{err}");
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_missing_agent_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        drop(UnixListener::bind(&path).unwrap()); // leaves the socket file, nobody listening
        let err = request(&path, "status", STATUS_TIMEOUT)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no agent answers") && err.contains("agent.sock"),
            "{err}"
        );
        bind(&path).unwrap();
    }
}
