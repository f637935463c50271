use std::path::PathBuf;

use serde_json::json;

use super::*;

fn hot(connected: bool, progress: Option<(u64, u64)>, done: bool) -> AgentStatus {
    let mut v = json!({
        "mode": "replicated", "role": "hot", "epoch": 1, "holder": "a", "data_dir": "/d",
        "listen": "127.0.0.1:1", "peer": "127.0.0.1:2", "connected": connected, "synced": done,
        "wire_bytes": 0, "data_bytes": 0, "batches": 0, "node_state": "none",
    });
    if let Some((bytes_done, bytes_total)) = progress {
        v["sync_progress"] = json!({
            "phase": "initial", "bytes_done": bytes_done, "bytes_total": bytes_total,
            "files_done": 1, "files_total": 4, "bytes_sent": bytes_done,
            "bytes_per_s": 1 << 20, "eta_s": 3, "elapsed_ms": 1000,
        });
    }
    if done {
        v["sync_done"] = json!({
            "phase": "initial", "bytes": 4 << 20, "files": 4, "bytes_sent": 4 << 20,
            "elapsed_ms": 4000, "finished_unix_ms": 1,
        });
    }
    serde_json::from_value(v).unwrap()
}

/// Runs [`watch`] over `statuses` (then errors), returning the output and the polls made.
fn run(
    statuses: Vec<AgentStatus>,
    columns: Option<usize>,
) -> (Result<SyncDone, ProgressError>, String, usize) {
    let mut buf = Vec::new();
    let mut it = statuses.into_iter();
    let mut polls = 0;
    let result = {
        let mut out = Output::new(&mut buf, columns, Duration::ZERO);
        watch(
            || {
                polls += 1;
                it.next().ok_or(ControlError::InUse(PathBuf::from("/s")))
            },
            &mut out,
            |d| assert_eq!(d, POLL),
        )
    };
    (result, String::from_utf8(buf).unwrap(), polls)
}

#[test]
fn plain_lines_follow_the_sync_until_the_copy_caught_up() {
    let (result, out, polls) = run(
        vec![
            hot(false, None, false),
            hot(true, None, false),
            hot(true, Some((1 << 20, 4 << 20)), false),
            hot(true, Some((2 << 20, 4 << 20)), false),
            hot(true, None, true),
            hot(true, None, true),
        ],
        None,
    );
    assert_eq!(result.unwrap().bytes, 4 << 20);
    assert_eq!(polls, 5, "stops at the first status that says caught up");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "waiting: not connected to the cold side (127.0.0.1:2)",
            "connected: waiting for the comparison with the cold side's copy to begin",
            "initial sync: 1.0 MiB of 4.0 MiB (25%), 1 of 4 files, 1.0 MiB sent, 1.0 MiB/s, ETA 3s",
            "initial sync: 2.0 MiB of 4.0 MiB (50%), 1 of 4 files, 2.0 MiB sent, 1.0 MiB/s, ETA 3s",
            "in sync: initial sync done: 4 files, 4.0 MiB in 4.0s (1.0 MiB/s), 4.0 MiB sent",
        ]
    );
    assert!(!out.contains('\r') && !out.contains('\x1b'), "{out:?}");
}

#[test]
fn plain_lines_are_spaced_unless_the_state_changes() {
    let mut buf = Vec::new();
    let mut out = Output::new(&mut buf, None, Duration::from_secs(3600));
    let p = |d| View::of(hot(true, Some((d, 10)), false)).unwrap();
    for d in 1..5 {
        out.show(&p(d)).unwrap();
    }
    out.show(&View::of(hot(false, None, false)).unwrap())
        .unwrap();
    out.show(&p(6)).unwrap();
    let text = String::from_utf8(buf).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
}

#[test]
fn a_terminal_gets_one_bar_redrawn_in_place() {
    let (result, out, _) = run(
        vec![
            hot(true, Some((1 << 20, 4 << 20)), false),
            hot(true, Some((3 << 20, 4 << 20)), false),
            hot(true, None, true),
        ],
        Some(100),
    );
    result.unwrap();
    let frames: Vec<&str> = out.split('\r').filter(|f| !f.is_empty()).collect();
    assert_eq!(frames.len(), 3, "{out:?}");
    let bar = &frames[0][frames[0].find('[').unwrap() + 1..frames[0].find(']').unwrap()];
    assert_eq!(bar.matches('#').count(), bar.len() / 4, "{out:?}");
    assert!(frames[0].starts_with("initial sync [#") && bar.contains('>'));
    assert!(frames[1].contains(" 75% 3.0 MiB/4.0 MiB 1/4 files 1.0 MiB/s ETA 3s"));
    assert!(frames[..2]
        .iter()
        .all(|f| f.ends_with(ERASE_LINE) && !f.contains('\n')));
    assert!(frames[..2]
        .iter()
        .all(|f| f.len() - ERASE_LINE.len() <= 100));
    assert_eq!(
        frames[2],
        format!("{ERASE_LINE}in sync: initial sync done: 4 files, 4.0 MiB in 4.0s (1.0 MiB/s), 4.0 MiB sent\n")
    );
}

#[test]
fn a_cold_host_a_shared_agent_and_no_agent_are_errors() {
    let mut cold = hot(true, None, false);
    if let AgentStatus::Replicated(r) = &mut cold {
        r.role = ReplRole::Cold;
    }
    let (result, _, _) = run(vec![cold], None);
    assert!(matches!(result, Err(ProgressError::Cold)), "{result:?}");
    let (result, _, _) = run(vec![], None);
    assert!(
        matches!(result, Err(ProgressError::Control(_))),
        "{result:?}"
    );
    let shared: AgentStatus = serde_json::from_value(json!({
        "mode": "shared", "role": "hot", "holder": "a", "lease_holder": null, "epoch": null,
        "lease_state": null, "last_renewal_age_ms": 0, "lock_held": true, "node_pid": null,
        "node_state": "none", "error": null,
    }))
    .unwrap();
    let (result, _, _) = run(vec![shared], None);
    assert!(matches!(result, Err(ProgressError::Shared)), "{result:?}");
}
