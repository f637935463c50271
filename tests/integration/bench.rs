//! Issue 5: the benchmark's `--quick` mode runs every workload against real agents, so the
//! benchmark cannot rot. Figures are not asserted here (timing belongs to the benchmark, not
//! to tests); keys, convergence and identity are.

use crate::util::run;

#[test]
fn issue5_quick_benchmark_prints_every_key() {
    let bench = env!("CARGO_BIN_EXE_artemis-sync-bench");
    let mut cmd = std::process::Command::new(bench);
    cmd.args(["--quick", "--json"]);
    let out = run(&mut cmd);
    out.code(0);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"));
    let keys: &[(&str, &[&str])] = &[
        (
            "initial_sync",
            &[
                "mb_per_s",
                "raw_tcp_mb_per_s",
                "rsync_mb_per_s",
                "ratio_vs_rsync",
                "ratio_vs_raw_tcp",
            ],
        ),
        (
            "resync",
            &[
                "seconds",
                "wire_bytes",
                "changed_bytes",
                "rsync_seconds",
                "rsync_wire_bytes",
                "ratio_vs_rsync",
            ],
        ),
        (
            "append_lag",
            &[
                "p50_ms",
                "p99_ms",
                "max_ms",
                "hot_cpu_pct",
                "cold_cpu_pct",
                "lsyncd_p50_ms",
            ],
        ),
        ("append_max", &["mb_per_s", "p99_ms"]),
        ("random_writes", &["p50_ms", "p99_ms", "converged"]),
    ];
    for (w, figs) in keys {
        for f in *figs {
            assert!(v[w].get(f).is_some(), "{w}.{f} missing:\n{v:#}");
        }
    }
    assert!(
        v["hot_rss_mb"].as_f64().is_some() && v["cold_rss_mb"].as_f64().is_some(),
        "{v:#}"
    );
    // a null baseline says why
    for (w, f, why) in [
        ("initial_sync", "rsync_mb_per_s", "rsync_null_reason"),
        ("append_lag", "lsyncd_p50_ms", "lsyncd_null_reason"),
    ] {
        if v[w][f].is_null() {
            assert!(
                v[w][why].is_string(),
                "{w}.{f} is null without a reason: {v:#}"
            );
        }
    }
    for w in ["initial_sync", "resync", "append_lag"] {
        assert_eq!(v[w]["identical"], true, "{w}: copies differ: {v:#}");
    }
    assert_eq!(v["random_writes"]["converged"], true, "{v:#}");
    assert_eq!(v["append_lag"]["lost"], 0, "{v:#}");
}
