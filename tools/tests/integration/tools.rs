//! The workspace's tools (`tools/`): the demo runs end to end, and the benchmark's `--quick`
//! mode runs every workload against real agents (the write-path ones through a FUSE mount, as
//! root), so neither can rot. Benchmark figures are not asserted here (timing belongs to the
//! benchmark, not to tests); keys, that they are numbers, convergence and identity are.

use std::fs;

use crate::tool_cmd;
use crate::util::*;

/// The figures of `initial_sync` and `initial_sync_tls`.
const SYNC_KEYS: &[&str] = &[
    "mb_per_s",
    "plain_copy_mb_per_s",
    "cp_mb_per_s",
    "rsync_mb_per_s",
    "ratio_vs_rsync",
    "ratio_vs_plain_copy",
    "hot_cpu_s_per_gib",
    "cold_cpu_s_per_gib",
];

/// The keys `--json` must have: (workload, figures), and whether they need FUSE (root and
/// /dev/fuse): those are numbers when it is there, null with a reason when it is not.
const KEYS: &[(&str, &[&str], bool)] = &[
    ("initial_sync", SYNC_KEYS, false),
    ("initial_sync_tls", SYNC_KEYS, false),
    (
        "resync",
        &[
            "seconds",
            "wire_bytes",
            "changed_bytes",
            "summary_bytes",
            "rsync_seconds",
            "rsync_wire_bytes",
            "ratio_vs_rsync",
        ],
        false,
    ),
    (
        "durable_fsync",
        &["local_p50_us", "rtt_us", "cold_fdatasync_us"],
        false,
    ),
    ("durable_fsync", &["p50_added_us", "p99_added_us"], true),
    (
        "append_lag",
        &["p50_ms", "p99_ms", "max_ms", "hot_cpu_pct", "cold_cpu_pct"],
        true,
    ),
    ("append_lag", &["lsyncd_p50_ms"], false),
    ("append_max", &["mb_per_s", "p99_ms"], true),
    ("random_writes", &["p50_ms", "p99_ms"], true),
    (
        "capture_watch",
        &["append_lag_p99_ms", "hot_cpu_pct"],
        false,
    ),
    (
        "journal_load",
        &[
            "mb_per_s",
            "direct_mb_per_s",
            "data_dir_mb_per_s",
            "ratio_vs_data_dir",
        ],
        true,
    ),
];

/// Whether this machine can serve a FUSE mount (as the benchmark decides it).
fn fuse_here() -> bool {
    is_root() && std::path::Path::new("/dev/fuse").exists()
}

#[test]
fn issue12_quick_benchmark_prints_every_key() {
    let mut cmd = tool_cmd("artemis-sync-bench");
    cmd.args(["--quick", "--json"]);
    let out = run(&mut cmd);
    out.code(0);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"));
    let fuse = fuse_here();
    for (w, figs, needs_fuse) in KEYS {
        for f in *figs {
            assert!(v[w].get(f).is_some(), "{w}.{f} missing:\n{v:#}");
            if *needs_fuse && !fuse {
                assert!(v[w][f].is_null(), "{w}.{f} without FUSE: {v:#}");
                assert!(v[w]["null_reason"].is_string(), "{w}: no reason: {v:#}");
            } else if *needs_fuse || !["rsync", "lsyncd"].iter().any(|t| f.contains(t)) {
                assert!(v[w][f].is_number(), "{w}.{f} is not a number:\n{v:#}");
            }
        }
    }
    // each workload says what the host took meanwhile (its figures are read beside it)
    for (w, _, _) in KEYS {
        for f in ["steal_pct", "busy_pct"] {
            let x = v[w]["host"][f].as_f64();
            assert!(
                x.is_some_and(|x| (0.0..=100.0).contains(&x)),
                "{w}.host.{f}: {v:#}"
            );
        }
    }
    if !fuse {
        skip(
            "issue12_quick_benchmark_prints_every_key: FUSE figures",
            "needs root and /dev/fuse",
        );
    }
    assert!(
        v["hot_rss_mb"].as_f64().is_some() && v["cold_rss_mb"].as_f64().is_some(),
        "{v:#}"
    );
    // a null baseline says why. A missing tool is a test that cannot run (a failure in CI,
    // which installs rsync and lsyncd); a tool that ran and delivered nothing in the quick
    // run's few seconds is a figure (lsyncd syncs a journal file only once it is closed).
    for (w, f, why) in [
        ("initial_sync", "rsync_mb_per_s", "rsync_null_reason"),
        ("initial_sync_tls", "rsync_mb_per_s", "rsync_null_reason"),
        ("append_lag", "lsyncd_p50_ms", "lsyncd_null_reason"),
    ] {
        if v[w][f].is_null() {
            let reason = v[w][why]
                .as_str()
                .unwrap_or_else(|| panic!("{w}.{f} is null without a reason: {v:#}"));
            if reason.contains("not installed") {
                skip(
                    &format!("issue12_quick_benchmark_prints_every_key: baseline {w}.{f}"),
                    reason,
                );
            }
        }
    }
    for w in [
        "initial_sync",
        "initial_sync_tls",
        "resync",
        "capture_watch",
    ] {
        assert_eq!(v[w]["identical"], true, "{w}: copies differ: {v:#}");
    }
    assert_eq!(v["capture_watch"]["lost"], 0, "{v:#}");
    if fuse {
        for w in ["append_lag", "append_max"] {
            assert_eq!(v[w]["identical"], true, "{w}: copies differ: {v:#}");
        }
        assert_eq!(v["random_writes"]["converged"], true, "{v:#}");
        assert_eq!(v["append_lag"]["lost"], 0, "{v:#}");
        // durable: the cold copy held every byte when the last sync returned
        assert_eq!(v["durable_fsync"]["on_cold_when_synced"], true, "{v:#}");
        assert_eq!(v["durable_fsync"]["degraded"], false, "{v:#}");
        // the agent's mount reads ahead as far as it asked
        assert_eq!(
            v["journal_load"]["read_ahead_kb"],
            artemis_sync::replicated::capture::fuse::READ_AHEAD_KB,
            "{v:#}"
        );
    }
}

#[test]
fn issue2_demo_runs_end_to_end_and_cleans_up() {
    let fx = Fixture::new();
    let tmp = fx.mkdir("tmp");
    let out = run(tool_cmd("artemis-sync-demo").env("TMPDIR", &tmp));
    out.code(0);
    let last = out.stdout.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("Done: the journal lives in the share")
            && last.contains("the replicated copy is identical"),
        "{out}"
    );
    out.stdout_has(&["identical:", "lag p50"]);
    let doctor: Vec<&str> = out
        .stdout
        .lines()
        .skip_while(|l| !l.contains("`artemis-sync doctor`"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect();
    let checks: Vec<&str> = doctor
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(
        checks,
        ["config", "mount", "locks", "link", "writable", "free_space"],
        "{out}"
    );
    assert!(
        doctor.iter().all(|l| l.trim_start().starts_with("ok ")),
        "{out}"
    );
    out.stdout_has(&["refused:", "--migrate", "3/3 journal files identical"]);
    // The temporary directory was removed.
    assert!(
        names(&tmp).is_empty(),
        "demo left {:?} in TMPDIR",
        names(&tmp)
    );
}

#[test]
fn demo_dir_keeps_the_migrated_tree() {
    let fx = Fixture::new();
    let dir = fx.path("demo");
    let out = run(tool_cmd("artemis-sync-demo").arg("--dir").arg(&dir));
    out.code(0).stdout_has(&["Done:"]);
    let link = dir.join("corda/artemis");
    let share = dir.join("share");
    assert_eq!(fs::read_link(&link).unwrap(), share);
    let aside: Vec<String> = names(&dir.join("corda"))
        .into_iter()
        .filter(|n| n.starts_with("artemis.pre-artemis-sync."))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let through_link = snapshot(&link);
    let kept = snapshot(&dir.join("corda").join(&aside[0]));
    assert_eq!(through_link, kept);
    for i in 1..=3 {
        let rel = format!("journal/activemq-data-{i}.amq");
        assert_eq!(
            fs::metadata(share.join(&rel)).unwrap().len(),
            10 << 20,
            "{rel}"
        );
    }
    assert!(share
        .join("bindings/activemq-bindings-1.bindings")
        .is_file());
    // The config it wrote is valid and describes that tree.
    artemis_sync(&dir.join("agent.toml"), ["doctor"]).code(0);
}
