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

/// One row of the table: the workload, the figure, what its baseline cell says (from the whole
/// results), and the target.
type Row = (
    &'static str,
    &'static str,
    fn(&Value) -> String,
    &'static str,
);

fn none(_: &Value) -> String {
    String::new()
}

/// The rows, in the order the README's table has them.
const ROWS: &[Row] = &[
    (
        "initial_sync",
        "mb_per_s",
        |v| {
            format!(
                "rsync {} MB/s, raw TCP {} MB/s",
                fig(&v["initial_sync"]["rsync_mb_per_s"]),
                fig(&v["initial_sync"]["raw_tcp_mb_per_s"])
            )
        },
        "",
    ),
    (
        "initial_sync",
        "ratio_vs_rsync",
        none,
        ">= 3 (PSK), >= 2 (TLS)",
    ),
    ("initial_sync", "ratio_vs_raw_tcp", none, ">= 0.5 (PSK)"),
    (
        "resync",
        "seconds",
        |v| format!("rsync {} s", fig(&v["resync"]["rsync_seconds"])),
        "",
    ),
    (
        "resync",
        "wire_bytes",
        |v| {
            format!(
                "rsync {} bytes; changed {}",
                fig(&v["resync"]["rsync_wire_bytes"]),
                fig(&v["resync"]["changed_bytes"])
            )
        },
        "<= wire_bound_bytes",
    ),
    ("resync", "ratio_vs_rsync", none, ">= 2"),
    (
        "append_lag",
        "p50_ms",
        |v| {
            format!(
                "lsyncd p50 {} ms ({}x ours)",
                fig(&v["append_lag"]["lsyncd_p50_ms"]),
                fig(&v["append_lag"]["lsyncd_ratio"])
            )
        },
        "<= 1; lsyncd >= 20x",
    ),
    ("append_lag", "p99_ms", none, "<= 5"),
    (
        "append_lag",
        "p50_from_write_ms",
        |_| "from before the write (upper bound)".into(),
        "",
    ),
    ("append_lag", "p99_from_write_ms", none, ""),
    ("append_lag", "max_ms", none, ""),
    ("append_lag", "hot_cpu_pct", none, "<= 15"),
    ("append_lag", "cold_cpu_pct", none, ""),
    (
        "append_max",
        "mb_per_s",
        |v| {
            format!(
                "at {} records/s, p99 {} ms",
                fig(&v["append_max"]["rate_per_s"]),
                fig(&v["append_max"]["p99_ms"])
            )
        },
        ">= 150 (p99 <= 20 ms)",
    ),
    ("random_writes", "p50_ms", none, ""),
    ("random_writes", "p99_ms", none, "<= rescan interval (1000)"),
    ("random_writes", "converged", none, "true"),
];

/// The results as a table, each figure next to its baseline and target.
pub fn table(v: &Value) -> String {
    let mut t = String::new();
    let mut line = |w: &str, figure: &str, value: String, base: String, target: String| {
        let _ = writeln!(t, "{w:<14} {figure:<20} {value:>12}   {base:<44} {target}");
    };
    line(
        "workload",
        "figure",
        "value".into(),
        "baseline (same run)".into(),
        "target".into(),
    );
    for (w, figure, base, target) in ROWS {
        if v[w].is_null() {
            continue;
        }
        let target = match *target {
            "<= wire_bound_bytes" => format!("<= {}", fig(&v[w]["wire_bound_bytes"])),
            t => t.to_owned(),
        };
        line(w, figure, fig(&v[w][figure]), base(v), target);
    }
    line(
        "memory",
        "hot_rss_mb",
        fig(&v["hot_rss_mb"]),
        format!("cold {} MiB", fig(&v["cold_rss_mb"])),
        format!("<= {} each", fig(&v["rss_target_mb"])),
    );
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
