//! The results as a table (each figure beside its same-run baseline and its target) and as an
//! SVG drawing of the lag distribution and the throughput per second.

use super::*;

/// A figure's value as the table prints it.
fn fig(x: &Value) -> String {
    match x {
        Value::Null => "null".to_owned(),
        other => other.to_string(),
    }
}

/// A target cell: what the target says, and whether the results meet it (`None`: no target,
/// or the figure is null).
type Target = (String, Option<bool>);

/// One row of the table: the workload, the figure, what its baseline cell says (from the whole
/// results), and its target.
type Row = (
    &'static str,
    &'static str,
    fn(&Value) -> String,
    fn(&Value) -> Target,
);

fn none(_: &Value) -> String {
    String::new()
}

fn no_target(_: &Value) -> Target {
    (String::new(), None)
}

/// `x <= limit`.
fn le(x: &Value, limit: f64) -> Target {
    (format!("<= {limit}"), x.as_f64().map(|x| x <= limit))
}

/// `x >= limit`.
fn ge(x: &Value, limit: f64) -> Target {
    (format!(">= {limit}"), x.as_f64().map(|x| x >= limit))
}

/// The initial sync's baselines cell: the same tree by rsync, by the plain copy (the ceiling),
/// and by `cp -a`, with the authentication ours ran with.
fn sync_baselines(v: &Value, w: &str) -> String {
    let x = &v[w];
    format!(
        "{}: rsync {} MB/s, plain copy {} MB/s, cp -a {} MB/s",
        x["auth"].as_str().unwrap_or("?"),
        fig(&x["rsync_mb_per_s"]),
        fig(&x["plain_copy_mb_per_s"]),
        fig(&x["cp_mb_per_s"])
    )
}

/// The reason a workload's figures are null, as its baseline cell says it.
fn why_null(v: &Value, w: &str) -> String {
    v[w]["null_reason"]
        .as_str()
        .map_or_else(String::new, |r| format!("null: {r}"))
}

/// The rows, in the order the README's table has them.
const ROWS: &[Row] = &[
    (
        "initial_sync",
        "mb_per_s",
        |v| sync_baselines(v, "initial_sync"),
        no_target,
    ),
    ("initial_sync", "ratio_vs_rsync", none, |v| {
        ge(&v["initial_sync"]["ratio_vs_rsync"], 2.0)
    }),
    ("initial_sync", "ratio_vs_plain_copy", none, |v| {
        ge(&v["initial_sync"]["ratio_vs_plain_copy"], 0.7)
    }),
    (
        "initial_sync",
        "hot_cpu_s_per_gib",
        |v| {
            format!(
                "cold {} s/GiB",
                fig(&v["initial_sync"]["cold_cpu_s_per_gib"])
            )
        },
        no_target,
    ),
    (
        "initial_sync_tls",
        "mb_per_s",
        |v| sync_baselines(v, "initial_sync_tls"),
        no_target,
    ),
    ("initial_sync_tls", "ratio_vs_rsync", none, |v| {
        ge(&v["initial_sync_tls"]["ratio_vs_rsync"], 2.0)
    }),
    ("initial_sync_tls", "ratio_vs_plain_copy", none, |v| {
        ge(&v["initial_sync_tls"]["ratio_vs_plain_copy"], 0.7)
    }),
    (
        "initial_sync_tls",
        "hot_cpu_s_per_gib",
        |v| {
            format!(
                "cold {} s/GiB",
                fig(&v["initial_sync_tls"]["cold_cpu_s_per_gib"])
            )
        },
        no_target,
    ),
    (
        "resync",
        "seconds",
        |v| format!("rsync {} s", fig(&v["resync"]["rsync_seconds"])),
        no_target,
    ),
    (
        "resync",
        "wire_bytes",
        |v| {
            format!(
                "rsync {} bytes; changed {}, summaries {}",
                fig(&v["resync"]["rsync_wire_bytes"]),
                fig(&v["resync"]["changed_bytes"]),
                fig(&v["resync"]["summary_bytes"])
            )
        },
        |v| {
            let bound = v["resync"]["wire_bound_bytes"].as_f64().unwrap_or(0.0);
            le(&v["resync"]["wire_bytes"], bound)
        },
    ),
    ("resync", "ratio_vs_rsync", none, |v| {
        ge(&v["resync"]["ratio_vs_rsync"], 5.0)
    }),
    (
        "durable_fsync",
        "p50_added_us",
        |v| {
            let d = &v["durable_fsync"];
            match d["null_reason"].as_str() {
                Some(r) => format!("null: {r}"),
                None => format!(
                    "durable p50 {} us - local p50 {} us",
                    fig(&d["p50_us"]),
                    fig(&d["local_p50_us"])
                ),
            }
        },
        |v| {
            let d = &v["durable_fsync"];
            (
                format!(
                    "<= rtt + cold fdatasync + 100 = {}",
                    fig(&d["target_p50_added_us"])
                ),
                d["target_met"].as_bool(),
            )
        },
    ),
    (
        "durable_fsync",
        "p99_added_us",
        |v| {
            let d = &v["durable_fsync"];
            format!(
                "durable p99 {} us - local p99 {} us",
                fig(&d["p99_us"]),
                fig(&d["local_p99_us"])
            )
        },
        no_target,
    ),
    (
        "durable_fsync",
        "local_p50_us",
        |_| "same loop, local dir, no replication".into(),
        no_target,
    ),
    (
        "durable_fsync",
        "fuse_async_p50_us",
        |v| {
            format!(
                "same loop through a mount with async acks: the FUSE round trips (p99 {} us)",
                fig(&v["durable_fsync"]["fuse_async_p99_us"])
            )
        },
        no_target,
    ),
    (
        "durable_fsync",
        "p50_added_over_async_us",
        |_| "durable p50 - async p50 through the mount: the wait for the cold side".into(),
        no_target,
    ),
    (
        "durable_fsync",
        "rtt_us",
        |v| {
            format!(
                "TCP loopback, 4 KiB out, 64 B back (64/64: {} us)",
                fig(&v["durable_fsync"]["rtt_small_us"])
            )
        },
        no_target,
    ),
    (
        "durable_fsync",
        "cold_fdatasync_us",
        |_| "fdatasync alone on the cold filesystem".into(),
        no_target,
    ),
    (
        "append_lag",
        "p50_ms",
        |v| {
            let reason = why_null(v, "append_lag");
            if !reason.is_empty() {
                return reason;
            }
            format!(
                "watch {} ms; lsyncd {} ms ({}x ours)",
                fig(&v["capture_watch"]["append_lag_p50_ms"]),
                fig(&v["append_lag"]["lsyncd_p50_ms"]),
                fig(&v["append_lag"]["lsyncd_ratio"])
            )
        },
        no_target,
    ),
    (
        "append_lag",
        "p99_ms",
        |v| format!("watch {} ms", fig(&v["capture_watch"]["append_lag_p99_ms"])),
        |v| le(&v["append_lag"]["p99_ms"], 2.0),
    ),
    (
        "append_lag",
        "p99_from_write_ms",
        |_| "from before the write (upper bound)".into(),
        no_target,
    ),
    ("append_lag", "max_ms", none, no_target),
    (
        "append_lag",
        "hot_cpu_pct",
        |v| format!("watch {} %", fig(&v["capture_watch"]["hot_cpu_pct"])),
        |v| le(&v["append_lag"]["hot_cpu_pct"], 10.0),
    ),
    (
        "append_lag",
        "cold_cpu_pct",
        |v| format!("watch {} %", fig(&v["capture_watch"]["cold_cpu_pct"])),
        no_target,
    ),
    (
        "append_max",
        "mb_per_s",
        |v| {
            let reason = why_null(v, "append_max");
            if !reason.is_empty() {
                return reason;
            }
            format!(
                "unthrottled {} MB/s (p99 {} ms)",
                fig(&v["append_max"]["unthrottled_mb_per_s"]),
                fig(&v["append_max"]["unthrottled_p99_ms"])
            )
        },
        |v| {
            let m = &v["append_max"];
            let met = m["mb_per_s"]
                .as_f64()
                .zip(m["p99_ms"].as_f64())
                .map(|(mbs, p99)| mbs >= 300.0 && p99 <= 20.0);
            (">= 300 with p99 <= 20 ms".into(), met)
        },
    ),
    ("append_max", "p99_ms", none, |v| {
        le(&v["append_max"]["p99_ms"], 20.0)
    }),
    ("append_max", "hot_cpu_pct", none, no_target),
    (
        "random_writes",
        "p50_ms",
        |v| why_null(v, "random_writes"),
        no_target,
    ),
    ("random_writes", "p99_ms", none, |v| {
        le(&v["random_writes"]["p99_ms"], 5.0)
    }),
    ("random_writes", "converged", none, |v| {
        ("true".into(), v["random_writes"]["converged"].as_bool())
    }),
    (
        "capture_watch",
        "append_lag_p99_ms",
        |_| "baseline: the watch capture".into(),
        no_target,
    ),
    ("capture_watch", "hot_cpu_pct", none, no_target),
    (
        "journal_load",
        "mb_per_s",
        |v| {
            let reason = why_null(v, "journal_load");
            if !reason.is_empty() {
                return reason;
            }
            format!(
                "data_dir {} MB/s (read-ahead {} KiB)",
                fig(&v["journal_load"]["data_dir_mb_per_s"]),
                fig(&v["journal_load"]["read_ahead_kb"])
            )
        },
        no_target,
    ),
    (
        "journal_load",
        "direct_mb_per_s",
        |_| "O_DIRECT through the mount".into(),
        no_target,
    ),
    ("journal_load", "ratio_vs_data_dir", none, no_target),
];

/// "met", "MISSED" or nothing.
fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "",
    }
}

/// The results as a table, each figure next to its baseline and target.
pub fn table(v: &Value) -> String {
    let mut t = String::new();
    let mut line = |w: &str, figure: &str, value: String, base: String, target: Target| {
        let (target, met) = target;
        let met = verdict(met);
        let _ = writeln!(
            t,
            "{w:<16} {figure:<19} {value:>10}   {base:<62} {target:<38} {met}"
        );
    };
    line(
        "workload",
        "figure",
        "value".into(),
        "baseline (same run)".into(),
        ("target".into(), None),
    );
    for (w, figure, base, target) in ROWS {
        if v[w].is_null() {
            continue;
        }
        line(w, figure, fig(&v[w][figure]), base(v), target(v));
    }
    let rss = v["rss_target_mb"].as_f64().unwrap_or(0.0);
    let met = v["hot_rss_mb"]
        .as_f64()
        .zip(v["cold_rss_mb"].as_f64())
        .filter(|(h, c)| h.max(*c) > 0.0) // no agent ran: nothing to judge
        .map(|(h, c)| h.max(c) <= rss);
    line(
        "memory",
        "hot_rss_mb",
        fig(&v["hot_rss_mb"]),
        format!("cold {} MiB", fig(&v["cold_rss_mb"])),
        (format!("<= {rss} each"), met),
    );
    // the host's share of the run: the worst workload first, then each
    let steal: Vec<(&str, f64)> = WORKLOADS
        .iter()
        .filter_map(|w| Some((*w, v[w]["host"]["steal_pct"].as_f64()?)))
        .collect();
    if let Some(worst) = steal.iter().map(|(_, s)| *s).reduce(f64::max) {
        let each: Vec<String> = steal.iter().map(|(w, s)| format!("{w} {s}")).collect();
        line(
            "host",
            "steal_pct (max)",
            worst.to_string(),
            format!("vCPU time the hypervisor took: {}", each.join(", ")),
            no_target(v),
        );
    }
    t
}

/// An SVG with the `append_lag` CDF and the `append_max` throughput per second.
pub fn svg(c: &Curves) -> String {
    let (w, h, pad) = (900.0, 320.0, 50.0);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n", h * 2.0 + 40.0);
    // CDF
    let max = c
        .lags
        .last()
        .map_or(1.0, |d| d.as_secs_f64() * 1e3)
        .max(0.001);
    let _ = writeln!(s, "<text x=\"{pad}\" y=\"20\">append_lag: fraction of records on the cold disk within x ms (n = {})</text>", c.lags.len());
    let _ = writeln!(
        s,
        "<rect x=\"{pad}\" y=\"30\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888\"/>",
        w - 2.0 * pad,
        h - 60.0
    );
    let mut pts = String::new();
    for (i, d) in c
        .lags
        .iter()
        .enumerate()
        .step_by((c.lags.len() / 2000).max(1))
    {
        let x = pad + d.as_secs_f64() * 1e3 / max * (w - 2.0 * pad);
        let y = 30.0 + (h - 60.0) * (1.0 - (i + 1) as f64 / c.lags.len() as f64);
        let _ = write!(pts, "{x:.1},{y:.1} ");
    }
    let _ = writeln!(
        s,
        "<polyline points=\"{pts}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\"/>"
    );
    let _ = writeln!(s, "<text x=\"{pad}\" y=\"{}\">0 ms</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{max:.2} ms</text>", h - 15.0, w - pad, h - 15.0);
    // throughput
    let top = h + 20.0;
    let peak = c.throughput.iter().cloned().fold(1.0, f64::max);
    let _ = writeln!(s, "<text x=\"{pad}\" y=\"{}\">append_max: MB/s written (and replicated) per second, peak {peak:.0}</text>", top + 10.0);
    let _ = writeln!(
        s,
        "<rect x=\"{pad}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888\"/>",
        top + 20.0,
        w - 2.0 * pad,
        h - 60.0
    );
    let n = c.throughput.len().max(2) as f64 - 1.0;
    let pts: String = c
        .throughput
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{:.1},{:.1} ",
                pad + i as f64 / n * (w - 2.0 * pad),
                top + 20.0 + (h - 60.0) * (1.0 - v / peak)
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "<polyline points=\"{pts}\" fill=\"none\" stroke=\"#d62728\" stroke-width=\"1.5\"/>"
    );
    s.push_str("</svg>\n");
    s
}
