use std::net::TcpListener;

use super::*;

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

/// A listener answering every connection with `answer` on its own thread.
fn server(answer: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten().take(16) {
            let mut buf = [0u8; 512];
            let _ = c.read(&mut buf);
            let _ = c.write_all(answer.as_bytes());
        }
    });
    addr
}

#[test]
fn issue14_an_http_probe_wants_a_2xx_answer() {
    let ok = server("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
    http_get(&format!("http://{ok}/health"), Duration::from_secs(2)).unwrap();
    let bad = server("HTTP/1.1 503 Service Unavailable\r\n\r\n");
    let err = http_get(&format!("http://{bad}/health"), Duration::from_secs(2)).unwrap_err();
    assert!(err.contains("answered 503"), "{err}");
    let junk = server("SSH-2.0-OpenSSH\r\n");
    let err = http_get(&format!("http://{junk}/"), Duration::from_secs(2)).unwrap_err();
    assert!(err.contains("not an HTTP answer"), "{err}");
}

#[test]
fn issue14_a_probe_that_never_gets_an_answer_times_out() {
    // accepted into the backlog by the kernel, never read or answered
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let started = Instant::now();
    let err = Probe::Http {
        url: format!("http://{addr}/health"),
    }
    .run(Duration::from_millis(300))
    .unwrap_err();
    let took = started.elapsed();
    assert!(err.contains("no answer within 300 ms"), "{err}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // a TCP connect succeeds against the same silent listener
    Probe::Tcp(addr.to_string())
        .run(Duration::from_millis(300))
        .unwrap();
    drop(l);
    let err = Probe::Tcp(addr.to_string())
        .run(Duration::from_millis(300))
        .unwrap_err();
    assert!(err.contains("connect"), "{err}");
}

#[test]
fn issue14_a_probe_command_must_exit_0_in_time() {
    let t = Duration::from_secs(5);
    Probe::Command(sh("exit 0")).run(t).unwrap();
    let err = Probe::Command(sh("exit 2")).run(t).unwrap_err();
    assert!(err.contains("exited with code 2"), "{err}");
    let started = Instant::now();
    let err = Probe::Command(sh("sleep 10"))
        .run(Duration::from_millis(200))
        .unwrap_err();
    assert!(err.contains("killed"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn issue14_a_round_runs_its_probes_at_once_and_names_every_failure() {
    let probes = [
        Probe::Command(sh("sleep 10")),
        Probe::Command(sh("sleep 10")),
        Probe::Command(sh("exit 3")),
    ];
    let started = Instant::now();
    let err = round(&probes, Duration::from_millis(300)).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(err.matches("killed").count(), 2, "{err}");
    assert!(err.contains("code 3"), "{err}");
}

#[test]
fn issue14_the_probe_thread_sends_rounds_until_dropped() {
    let (tx, rx) = channel();
    let t = ProbeThread::start(
        vec![Probe::Command(sh("exit 0"))],
        7,
        Duration::from_millis(50),
        Duration::from_secs(2),
        tx,
    )
    .unwrap();
    let r = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        r,
        Round {
            generation: 7,
            result: Ok(())
        }
    );
    drop(t);
    // the thread ends: the channel disconnects once its sender is gone
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            _ => assert!(Instant::now() < deadline, "the probe thread did not end"),
        }
    }
}

/// A name may resolve to several addresses (`localhost`: `::1` and `127.0.0.1`) while the node
/// listens on one of them: the probe tries each in turn, not only the first, and a failure
/// names every address tried.
#[test]
fn issue14_a_tcp_probe_tries_every_address_a_name_resolves_to() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let live = TcpListener::bind("127.0.0.1:0").unwrap();
    let open = live.local_addr().unwrap();
    connect_any(&[closed, open], Duration::from_secs(2)).unwrap();
    let err = connect_any(&[closed, closed], Duration::from_secs(2)).unwrap_err();
    assert!(
        err.contains(&closed.to_string()) && err.contains("refused"),
        "{err}"
    );
    assert_eq!(
        connect_any(&[], Duration::from_secs(1)).unwrap_err(),
        "resolves to no address"
    );
}
