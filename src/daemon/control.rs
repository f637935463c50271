//! The agent's control socket: a Unix stream socket (default `/run/artemis-sync/agent.sock`,
//! mode 0600) where the running agent answers one request per connection, one line each way,
//! in the versioned JSON of [`super::protocol`]. A request line longer than [`MAX_LINE_BYTES`]
//! is cut there (and then fails to decode), a reply line at [`MAX_REPLY_BYTES`]; each connection has a thread of its own, so a client that
//! sends nothing (or trickles) holds up no other; a socket left by a dead agent is replaced,
//! one a live agent answers on is not.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, SendTimeoutError, Sender};

use super::protocol::{self, ProtocolError, Reply, Request};

/// The longest request line accepted.
pub const MAX_LINE_BYTES: u64 = 64 * 1024;
/// The longest reply line the client reads: a `verify` names every differing file, which for a
/// cold copy that lost its tree is one line of megabytes (the agent is the only writer).
pub const MAX_REPLY_BYTES: u64 = 64 * 1024 * 1024;
/// Connections served at once; one more is refused at once.
pub const MAX_CONNECTIONS: usize = 16;
/// How long the agent waits for a client to send its whole request line.
pub const REQUEST_READ_TIMEOUT: Duration = protocol::STATUS_TIMEOUT;

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
    /// the agent on {path:?} answered in a way this client does not understand: {source}
    Protocol {
        path: PathBuf,
        #[source]
        source: ProtocolError,
    },
    /// the agent on {path:?} answered `{request}` with a `{reply}` reply
    UnexpectedReply {
        path: PathBuf,
        request: &'static str,
        reply: &'static str,
    },
}

/// A decoded request from a client, with where to send the answer: `Ok(reply)`, or
/// `Err(message)` when the agent refuses.
#[derive(Debug)]
pub struct Incoming {
    /// What the client asks.
    pub request: Request,
    /// The answer.
    pub reply: Sender<Result<Reply, String>>,
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

/// Serves connections until the process ends, each on a thread of its own (at most
/// [`MAX_CONNECTIONS`] at once; one more is answered with an error at once), so that a client
/// that sends nothing, or a request the agent takes long over (a `verify`), holds up no other:
/// each request that decodes goes to `requests`, and the answer (or a timeout after
/// `reply_timeout`) back to the client; one that does not decode, or does not arrive whole
/// within [`REQUEST_READ_TIMEOUT`], is answered with the error at once.
pub fn serve(listener: UnixListener, requests: Sender<Incoming>, reply_timeout: Duration) {
    let open = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::AcqRel);
            let busy = format!(
                "the agent already serves {MAX_CONNECTIONS} control connections; try again"
            );
            answer(&conn, &Err(busy));
            continue;
        }
        let (requests, done) = (requests.clone(), open.clone());
        let spawned = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                serve_one(&conn, &requests, reply_timeout);
                done.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            open.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("control socket: cannot start a thread for a connection: {e}");
        }
    }
}

/// Reads one request from `conn`, has the agent answer it, and writes the answer.
fn serve_one(conn: &UnixStream, requests: &Sender<Incoming>, reply_timeout: Duration) {
    let answer_ = match read_request(conn, Instant::now() + REQUEST_READ_TIMEOUT) {
        Err(e) => Err(e),
        Ok(line) => match protocol::decode_request(&line) {
            Err(e) => Err(e.to_string()),
            Ok(request) => forward(requests, request, reply_timeout),
        },
    };
    answer(conn, &answer_);
}

/// Writes `answer` to the client as one line (a client gone meanwhile is no error).
fn answer(mut conn: &UnixStream, answer: &Result<Reply, String>) {
    let mut text = protocol::encode_answer(answer);
    text.push('\n');
    let _ = conn.set_write_timeout(Some(REQUEST_READ_TIMEOUT));
    let _ = conn.write_all(text.as_bytes());
}

/// The request line of at most [`MAX_LINE_BYTES`] (cut there), without its line end, read by
/// `deadline` however slowly it comes; bytes that are not UTF-8 are replaced (and then fail to
/// decode).
fn read_request(mut conn: &UnixStream, deadline: Instant) -> Result<String, String> {
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    let limit = usize::try_from(MAX_LINE_BYTES).unwrap_or(usize::MAX);
    while line.len() < limit && !line.contains(&b'\n') {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return Err(incomplete(&line));
        }
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(incomplete(&line)),
        }
    }
    let end = line
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(line.len())
        .min(limit);
    Ok(String::from_utf8_lossy(&line[..end]).trim_end().to_owned())
}

fn incomplete(line: &[u8]) -> String {
    format!(
        "no complete request line within {} s (got {} bytes)",
        REQUEST_READ_TIMEOUT.as_secs(),
        line.len()
    )
}

/// Whether a request is a `verify`, whose answer may take the agent longer than the others'.
enum RequestKind {
    Verify,
    Other,
}

/// Hands `request` to the agent's main thread and waits for its answer.
fn forward(
    requests: &Sender<Incoming>,
    request: Request,
    reply_timeout: Duration,
) -> Result<Reply, String> {
    let (tx, rx) = bounded(1);
    let request_kind = if matches!(request, Request::Verify) {
        RequestKind::Verify
    } else {
        RequestKind::Other
    };
    // a verify may take the agent its whole limit (hashing both trees): wait for that
    let limit = match request_kind {
        RequestKind::Verify => {
            reply_timeout.max(protocol::VERIFY_TIMEOUT + protocol::STATUS_TIMEOUT)
        }
        RequestKind::Other => reply_timeout,
    };
    // a main thread busy past the reply's limit (a takeover's hook, a node slow to stop) with
    // its queue full: the request is dropped, not carried out after the client was told the
    // agent did not answer
    match requests.send_timeout(Incoming { request, reply: tx }, limit) {
        Ok(()) => {}
        Err(SendTimeoutError::Timeout(_)) => {
            return Err(format!(
                "the agent is busy (its request queue stayed full for {} ms): the request was not carried out; ask again",
                limit.as_millis()
            ))
        }
        Err(SendTimeoutError::Disconnected(_)) => {
            return Err("the agent is shutting down".to_owned())
        }
    }
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| Err("the agent did not answer in time".into()))
}

/// One reply line of at most [`MAX_REPLY_BYTES`], without its line end.
fn read_line(conn: &UnixStream) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::new(conn.take(MAX_REPLY_BYTES)).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

/// Sends `request` to the agent at `path` and returns its reply, waiting at most `timeout`.
pub fn request(path: &Path, request: &Request, timeout: Duration) -> Result<Reply, ControlError> {
    let mut conn = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    conn.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut line = protocol::encode_request(request);
    line.push('\n');
    conn.write_all(line.as_bytes()).map_err(io)?;
    let answer = read_line(&conn).map_err(io)?;
    match protocol::decode_answer(&answer) {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(message)) => Err(ControlError::Refused {
            path: path.to_owned(),
            message,
        }),
        Err(source) => Err(ControlError::Protocol {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::protocol::{Verified, STATUS_TIMEOUT};

    fn verified() -> Verified {
        Verified {
            identical: true,
            hot_root: "ab".into(),
            cold_root: "ab".into(),
            files: 1,
            differing: Vec::new(),
        }
    }

    /// Issue 11: a request that finds the agent's queue full (its main thread busy with a
    /// takeover's hook or a node slow to stop, other clients ahead) gets an answer within its
    /// limit and is not carried out later. The connection's thread waited on the full queue
    /// without limit, and the request ran whenever the queue had room, after its client had
    /// been told the agent did not answer in time (a `release`, say).
    #[test]
    fn issue11_a_request_that_finds_the_queue_full_is_refused_in_time_not_run_later() {
        let (tx, rx) = bounded::<Incoming>(1);
        let (first, _first_reply) = bounded(1);
        tx.send(Incoming {
            request: Request::Status,
            reply: first,
        })
        .unwrap();
        let (done_tx, done) = bounded(1);
        let requests = tx.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(forward(
                &requests,
                Request::Release,
                Duration::from_millis(200),
            ));
        });
        let answer = done
            .recv_timeout(Duration::from_secs(3))
            .expect("the request still waits on the full queue");
        let message = answer.unwrap_err();
        assert!(message.contains("not carried out"), "{message}");
        assert!(matches!(rx.recv().unwrap().request, Request::Status));
        assert!(
            rx.try_recv().is_err(),
            "the refused request was queued after all"
        );
    }

    #[test]
    fn round_trip_and_refusal_of_a_second_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/agent.sock");
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(bind(&path), Err(ControlError::InUse(_))));
        let (tx, rx) = bounded::<Incoming>(1);
        std::thread::spawn(move || serve(listener, tx, Duration::from_secs(5)));
        std::thread::spawn(move || {
            for r in rx.iter() {
                let answer = match r.request {
                    Request::Verify => Ok(Reply::Verified(verified())),
                    other => Err(other.not_in_mode("test", "ask for verify")),
                };
                let _ = r.reply.send(answer);
            }
        });
        assert_eq!(
            request(&path, &Request::Verify, STATUS_TIMEOUT).unwrap(),
            Reply::Verified(verified())
        );
        let err = request(&path, &Request::Release, STATUS_TIMEOUT)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("answered with an error: `release` is not served in test mode"),
            "{err}"
        );
    }

    #[test]
    fn a_raw_line_of_another_version_or_request_gets_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = bind(&path).unwrap();
        let (tx, _rx) = bounded::<Incoming>(1);
        std::thread::spawn(move || serve(listener, tx, Duration::from_secs(5)));
        let ask = |line: &str| {
            let mut conn = UnixStream::connect(&path).unwrap();
            conn.write_all(format!("{line}\n").as_bytes()).unwrap();
            let answer = read_line(&conn).unwrap();
            protocol::decode_answer(&answer).unwrap().unwrap_err()
        };
        assert!(ask(r#"{"v":1,"request":"dance"}"#).contains("unknown request \"dance\""));
        assert!(ask(r#"{"v":9,"request":"status"}"#).contains("version 9 is not supported"));
        assert!(ask("status").contains("not a control protocol message"));
    }

    /// An agent that answers `status` at once and holds a `verify` until a `status` was
    /// answered (as the replicated agent's main thread does while it waits on a verify).
    fn agent_busy_with_verify(rx: crossbeam_channel::Receiver<Incoming>) {
        let mut held = None;
        for r in rx.iter() {
            match r.request {
                Request::Verify => held = Some(r.reply),
                Request::Status => {
                    let _ = r.reply.send(Err("status answered".into()));
                    if let Some(v) = held.take() {
                        let _ = v.send(Ok(Reply::Verified(verified())));
                    }
                }
                _ => {}
            }
        }
    }

    /// A control socket in a temporary directory (kept while the first value lives), served
    /// for [`agent_busy_with_verify`].
    fn serving_an_agent_busy_with_verify() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = bind(&path).unwrap();
        let (tx, rx) = bounded::<Incoming>(1);
        std::thread::spawn(move || serve(listener, tx, Duration::from_secs(30)));
        std::thread::spawn(move || agent_busy_with_verify(rx));
        (dir, path)
    }

    #[test]
    fn status_is_answered_while_a_verify_waits() {
        let (_dir, path) = serving_an_agent_busy_with_verify();
        let p = path.clone();
        let verify = std::thread::spawn(move || request(&p, &Request::Verify, STATUS_TIMEOUT));
        std::thread::sleep(Duration::from_millis(200)); // the verify is with the agent
        let err = request(&path, &Request::Status, Duration::from_secs(2))
            .unwrap_err()
            .to_string();
        assert!(err.contains("status answered"), "{err}");
        assert_eq!(verify.join().unwrap().unwrap(), Reply::Verified(verified()));
    }

    #[test]
    fn a_client_that_sends_nothing_or_garbage_holds_up_nobody() {
        let (_dir, path) = serving_an_agent_busy_with_verify();
        // connects and sends nothing; another sends a byte now and then, never a line end
        let _silent = UnixStream::connect(&path).unwrap();
        let mut trickle = UnixStream::connect(&path).unwrap();
        let p = path.clone();
        std::thread::spawn(move || {
            for _ in 0..20 {
                if trickle.write_all(b" ").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        let err = request(&p, &Request::Status, Duration::from_secs(2))
            .unwrap_err()
            .to_string();
        assert!(err.contains("status answered"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
        // a line that is not UTF-8 is answered with the error, not dropped
        let mut conn = UnixStream::connect(&path).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        conn.write_all(b"\xff\xfe{\n").unwrap();
        let answer = read_line(&conn).unwrap();
        let err = protocol::decode_answer(&answer).unwrap().unwrap_err();
        assert!(err.contains("not a control protocol message"), "{err}");
    }

    #[test]
    fn issue4_a_verify_naming_thousands_of_differing_files_reaches_the_client_whole() {
        // a cold copy that lost its journal: every file differs, far more than a request line
        let differing: Vec<String> = (0..5000)
            .map(|i| format!("journal/activemq-data-{i}.amq: missing on cold"))
            .collect();
        let report = Verified {
            identical: false,
            differing: differing.clone(),
            ..verified()
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = bind(&path).unwrap();
        let (tx, rx) = bounded::<Incoming>(1);
        std::thread::spawn(move || serve(listener, tx, Duration::from_secs(5)));
        let answer = report.clone();
        std::thread::spawn(move || {
            for r in rx.iter() {
                let _ = r.reply.send(Ok(Reply::Verified(answer.clone())));
            }
        });
        let got = request(&path, &Request::Verify, STATUS_TIMEOUT).unwrap();
        assert_eq!(got, Reply::Verified(report));
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_missing_agent_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        drop(UnixListener::bind(&path).unwrap()); // leaves the socket file, nobody listening
        let err = request(&path, &Request::Status, STATUS_TIMEOUT)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no agent answers") && err.contains("agent.sock"),
            "{err}"
        );
        bind(&path).unwrap();
    }
}
