//! Round trips, versions and the printed form of the control protocol.

use super::*;

fn shared_status() -> AgentStatus {
    AgentStatus::Shared(Box::new(SharedStatus {
        role: LeaseRole::Hot,
        holder: "a:/srv/corda".into(),
        lease_holder: Some("a:/srv/corda".into()),
        epoch: Some(3),
        lease_state: Some(ObservedLeaseState::Held),
        last_renewal_age_ms: 12,
        lock_held: true,
        node_pid: Some(42),
        node_state: NodeState::Running,
        error: None,
        node_health: NodeHealth {
            state: HealthState::Restarting,
            consecutive_failures: 0,
            probe_failures_total: 7,
            restarts_total: 2,
            restarts_in_window: 1,
            next_restart_in_ms: Some(800),
            gave_up: None,
            last_probe_error: Some("http http://127.0.0.1:8080/health: answered 503".into()),
            cannot_fail_over: None,
        },
        wait_interval_ms: 40_000,
        metrics_error: None,
    }))
}

#[test]
fn every_request_and_reply_round_trips_with_its_version() {
    for request in [
        Request::Status,
        Request::Release,
        Request::Promote { force: true },
        Request::Demote { force: false },
        Request::Verify,
        Request::Resume,
    ] {
        let line = encode_request(&request);
        assert!(line.contains("\"v\":1"), "{line}");
        assert_eq!(decode_request(&line).unwrap(), request);
    }
    let replies = [
        Ok(Reply::Status(shared_status())),
        Ok(Reply::Verified(Verified {
            identical: false,
            hot_root: "ab".into(),
            cold_root: "cd".into(),
            files: 2,
            differing: vec!["journal/a.amq".into()],
        })),
        Ok(Reply::Resumed(Resumed {
            gave_up: Some("the node exited".into()),
        })),
        Err("this host is not hot (epoch 2)".to_owned()),
    ];
    for answer in replies {
        let line = encode_answer(&answer);
        assert!(!line.contains('\n'), "{line}");
        assert_eq!(decode_answer(&line).unwrap(), answer);
    }
}

#[test]
fn the_status_json_keeps_its_fields() {
    let v = serde_json::to_value(shared_status()).unwrap();
    assert_eq!(v["mode"], "shared");
    assert_eq!(v["role"], "hot");
    assert_eq!(v["lease_state"], "held");
    assert_eq!(v["node_state"], "running");
    assert!(v["error"].is_null());
    let text = shared_status().to_string();
    assert!(text.contains("role                 hot\n"), "{text}");
    assert!(text.contains("error                -\n"), "{text}");
    assert_eq!(v["node_health"]["state"], "restarting");
    assert_eq!(v["node_health"]["restarts_total"], 2);
    assert!(
        text.contains("node_health          restarting, 0 failures in a row (7 total), 2 restarts (1 in window), next restart in 800 ms; last probe error: http http://127.0.0.1:8080/health: answered 503\n"),
        "{text}"
    );
}

#[test]
fn issue14_a_status_without_node_health_still_decodes() {
    let mut v = serde_json::to_value(shared_status()).unwrap();
    v.as_object_mut().unwrap().remove("node_health");
    let status: AgentStatus = serde_json::from_value(v).unwrap();
    let AgentStatus::Shared(s) = status else {
        panic!("shared")
    };
    assert_eq!(s.node_health, NodeHealth::default());
    assert_eq!(s.node_health.state, HealthState::None);
}

#[test]
fn an_unknown_version_or_request_is_named() {
    let err = decode_request(r#"{"v":2,"request":"status"}"#).unwrap_err();
    assert!(
        err.to_string().contains("version 2 is not supported"),
        "{err}"
    );
    let err = decode_request(r#"{"request":"status"}"#).unwrap_err();
    assert!(err.to_string().contains("no protocol version"), "{err}");
    let err = decode_request(r#"{"v":1,"request":"dance"}"#).unwrap_err();
    assert!(
        err.to_string().contains("unknown request \"dance\""),
        "{err}"
    );
    let err = decode_request("status").unwrap_err();
    assert!(
        err.to_string().contains("not a control protocol message"),
        "{err}"
    );
    let err = decode_request(r#"{"v":1,"request":"promote"}"#).unwrap_err();
    assert!(err.to_string().contains("missing field `force`"), "{err}");
    let err = decode_answer(r#"{"v":7,"ok":{}}"#).unwrap_err();
    assert!(err.to_string().contains("version 7"), "{err}");
}

#[test]
fn replies_print_as_the_cli_always_did() {
    let released = Released {
        epoch: Some(4),
        role: LeaseRole::Hot,
        holdoff_ms: 40000,
    };
    assert_eq!(
        released.to_string(),
        "released epoch 4; not contending for 40000 ms\n"
    );
    let nothing = Released {
        epoch: None,
        role: LeaseRole::Fenced,
        holdoff_ms: 0,
    };
    assert_eq!(
        nothing.to_string(),
        "nothing to release: this agent is fenced\n"
    );
    let demoted = Demoted {
        epoch: 1,
        drained: true,
        last_seq: Some(9),
    };
    assert!(demoted
        .to_string()
        .starts_with("demoted: cold at epoch 1; the cold copy has everything (through batch 9)"));
}

#[test]
fn promote_prints_its_rpo_and_reads_an_answer_without_one() {
    let promoted = Promoted {
        epoch: 3,
        forced: true,
        drained: false,
        behind: "last batch applied 12 ms ago".into(),
        summary: "the old hot did NOT send a drained marker".into(),
        rpo: "RPO 0: the old hot was durable and in sync".into(),
    };
    assert_eq!(
        promoted.to_string(),
        "promoted: hot at epoch 3\nlast batch applied 12 ms ago\nthe old hot did NOT send a drained marker\nRPO 0: the old hot was durable and in sync\n"
    );
    let older = r#"{"v":1,"ok":{"reply":"promoted","epoch":3,"forced":false,"drained":true,"behind":"b","summary":"s"}}"#;
    match decode_answer(older).unwrap() {
        Ok(Reply::Promoted(p)) => assert!(p.rpo.is_empty() && !p.to_string().contains("RPO")),
        other => panic!("{other:?}"),
    }
}
