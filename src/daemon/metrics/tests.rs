//! The health verdict, the scrape's two formats, and the endpoint over a real socket.

use std::io::{Read, Write};
use std::time::Duration;

use crossbeam_channel::bounded;

use super::http::{run, Endpoint};
use super::*;
use crate::daemon::control::Incoming;
use crate::daemon::protocol::{ObservedLeaseState, Reply, Request, SharedStatus};

fn shared(role: LeaseRole, node: NodeState, age_ms: u64) -> AgentStatus {
    let state = match node {
        NodeState::Running => HealthState::Healthy,
        _ => HealthState::None,
    };
    with_health(role, node, age_ms, state)
}

fn with_health(role: LeaseRole, node: NodeState, age_ms: u64, state: HealthState) -> AgentStatus {
    AgentStatus::Shared(Box::new(SharedStatus {
        role,
        holder: "a:/srv/corda".into(),
        lease_holder: Some("a:/srv/corda".into()),
        epoch: Some(3),
        lease_state: Some(ObservedLeaseState::Held),
        last_renewal_age_ms: age_ms,
        lock_held: true,
        node_pid: None,
        node_state: node,
        error: None,
        wait_interval_ms: 1000,
        metrics_error: None,
        node_health: NodeHealth {
            state,
            restarts_total: 2,
            ..NodeHealth::default()
        },
    }))
}

#[test]
fn issue14_health_needs_hot_a_running_node_and_a_recent_renewal() {
    assert_eq!(
        health_verdict(&shared(LeaseRole::Hot, NodeState::Running, 10)),
        Ok(())
    );
    let no = |s: AgentStatus| health_verdict(&s).unwrap_err();
    assert!(no(shared(LeaseRole::Cold, NodeState::Stopped, 10)).contains("cold, not hot"));
    assert!(no(shared(LeaseRole::Starting, NodeState::Running, 10)).contains("starting"));
    assert!(no(shared(LeaseRole::Hot, NodeState::Stopped, 10)).contains("node is not running"));
    assert!(no(shared(LeaseRole::Hot, NodeState::Running, 1000)).contains("1000 ms ago"));
    // the watchdog's view: a running node that is not healthy is not sent traffic
    for state in [
        HealthState::Starting,
        HealthState::Unhealthy,
        HealthState::Restarting,
    ] {
        let why = no(with_health(LeaseRole::Hot, NodeState::Running, 10, state));
        assert!(why.contains(&format!("the node is {state}")), "{why}");
    }
}

fn encode(status: AgentStatus, openmetrics: bool) -> String {
    let m = Metrics::new();
    m.fence_events.inc();
    m.lease_renewal_seconds.observe(0.002);
    m.verified(true);
    m.mount_checked(false);
    let r = m.registry(Some(status));
    let mut out = String::new();
    if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &r).unwrap();
    }
    out
}

#[test]
fn issue15_a_sync_in_progress_is_in_the_metrics_and_gone_once_caught_up() {
    let hot = |progress: serde_json::Value| -> AgentStatus {
        let mut v = serde_json::json!({
            "mode": "replicated", "role": "hot", "epoch": 1, "holder": "a", "data_dir": "/d",
            "listen": "127.0.0.1:1", "peer": "127.0.0.1:2", "connected": true, "synced": false,
            "wire_bytes": 0, "data_bytes": 0, "batches": 0, "node_state": "none",
        });
        if !progress.is_null() {
            v["sync_progress"] = progress;
        }
        serde_json::from_value(v).unwrap()
    };
    let text = encode(
        hot(serde_json::json!({
            "phase": "resync", "bytes_done": 1024, "bytes_total": 4096, "files_done": 1,
            "files_total": 4, "bytes_sent": 512, "bytes_per_s": 2048, "eta_s": 2,
            "elapsed_ms": 500,
        })),
        false,
    );
    for line in [
        "artemis_sync_sync_in_progress 1",
        "artemis_sync_sync_done_bytes 1024.0",
        "artemis_sync_sync_total_bytes 4096.0",
        "artemis_sync_sync_files_done 1",
        "artemis_sync_sync_files_total 4",
        "artemis_sync_sync_rate_bytes_per_second 2048.0",
        "artemis_sync_sync_eta_seconds 2.0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }
    let text = encode(hot(serde_json::Value::Null), false);
    assert!(
        text.lines().any(|l| l == "artemis_sync_sync_in_progress 0"),
        "{text}"
    );
    assert!(!text.contains("sync_done_bytes"), "{text}");
}

#[test]
fn issue14_state_and_event_metrics_in_both_formats() {
    let text = encode(shared(LeaseRole::Hot, NodeState::Running, 250), false);
    for line in [
        "artemis_sync_role{role=\"hot\"} 1",
        "artemis_sync_role{role=\"cold\"} 0",
        "artemis_sync_healthy 1",
        "artemis_sync_epoch 3",
        "artemis_sync_lease_renewal_age_seconds 0.25",
        "artemis_sync_fence_events_total 1",
        "artemis_sync_mount_checks_total{result=\"failed\"} 1",
        "artemis_sync_last_verify_identical 1",
        "artemis_sync_lease_renewal_duration_seconds_count 1",
        "artemis_sync_status_answered 1",
        "artemis_sync_node_health_state{state=\"healthy\"} 1",
        "artemis_sync_node_health_state{state=\"unhealthy\"} 0",
        "artemis_sync_node_restarts_total 2",
        "artemis_sync_node_gave_up 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }
    assert!(!text.contains("# EOF"), "{text}");
    let om = encode(shared(LeaseRole::Cold, NodeState::Stopped, 5), true);
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("artemis_sync_healthy 0"), "{om}");
}

fn get(addr: std::net::SocketAddr, path: &str, accept: &str) -> (u16, String, String) {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, head.to_owned(), body.to_owned())
}

/// An endpoint on 127.0.0.1:0 whose "main loop" answers `status` with `answer` (none: never).
fn serve(answer: Option<AgentStatus>) -> std::net::SocketAddr {
    let (tx, rx) = bounded::<Incoming>(8);
    std::thread::spawn(move || {
        for req in rx.iter() {
            assert_eq!(req.request, Request::Status);
            if let Some(s) = &answer {
                let _ = req.reply.send(Ok(Reply::Status(s.clone())));
            } else {
                std::mem::forget(req); // never answered, never dropped
            }
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let ep = Endpoint {
        requests: tx,
        metrics: Metrics::new(),
    };
    std::thread::spawn(move || rt.block_on(run(listener, ep, std::future::pending())));
    addr
}

#[test]
fn issue14_the_endpoint_answers_health_status_and_metrics_over_http() {
    let hot = serve(Some(shared(LeaseRole::Hot, NodeState::Running, 10)));
    let (code, _, body) = get(hot, "/health", "*/*");
    assert_eq!(
        (code, body.trim()),
        (200, r#"{"healthy":true,"role":"hot"}"#)
    );
    let (code, _, body) = get(hot, "/status", "*/*");
    assert_eq!(code, 200);
    let s: AgentStatus = serde_json::from_str(&body).unwrap();
    assert_eq!(s, shared(LeaseRole::Hot, NodeState::Running, 10));
    let (code, head, body) = get(hot, "/metrics", "text/plain");
    assert_eq!(code, 200);
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(body.contains("artemis_sync_role{role=\"hot\"} 1"), "{body}");
    let (_, head, body) = get(
        hot,
        "/metrics",
        "application/openmetrics-text;version=1.0.0",
    );
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert_eq!(get(hot, "/nope", "*/*").0, 404);

    let cold = serve(Some(shared(LeaseRole::Cold, NodeState::Stopped, 10)));
    let (code, _, body) = get(cold, "/health", "*/*");
    assert_eq!(code, 503);
    assert!(body.contains(r#""healthy":false,"role":"cold""#), "{body}");
    assert!(body.contains("not hot"), "{body}");
}

#[test]
fn issue14_a_main_loop_that_does_not_answer_gives_503() {
    let silent = serve(None);
    let (code, _, body) = get(silent, "/health", "*/*");
    assert_eq!(code, 503);
    assert!(body.contains("agent not answering"), "{body}");
    let (code, _, body) = get(silent, "/metrics", "*/*");
    assert_eq!(code, 200);
    assert!(body.contains("artemis_sync_status_answered 0"), "{body}");
    assert!(!body.contains("artemis_sync_role"), "{body}");
}
