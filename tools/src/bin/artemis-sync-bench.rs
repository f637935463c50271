//! `artemis-sync-bench`: the standalone throughput benchmark. Parses arguments, runs
//! `artemis_sync::bench`, prints a table or one JSON object. Exit 0 when it ran (targets are
//! reported, not enforced), 1 when it could not run, 2 for usage.

use std::path::PathBuf;
use std::process::ExitCode;

use artemis_sync_tools::bench::{self, AuthMode, Settings, WORKLOADS};
use clap::Parser;

/// Measures artemis-sync replication against rsync, lsyncd and a plain TCP copy, in one run.
#[derive(Debug, Parser)]
#[command(name = "artemis-sync-bench", version)]
struct Args {
    /// Where to put the trees (default: a new directory in /dev/shm, or the temp dir)
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// One JSON object instead of a table
    #[arg(long)]
    json: bool,
    /// Small sizes and short runs (seconds): for the test suite
    #[arg(long)]
    quick: bool,
    /// How the agents authenticate
    #[arg(long, value_enum, default_value = "psk")]
    auth: AuthMode,
    /// Workloads to run, comma-separated
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "initial_sync,initial_sync_tls,resync,durable_fsync,append_lag,append_max,random_writes,capture_watch,journal_load"
    )]
    workloads: Vec<String>,
    /// Files in the initial_sync/resync/journal_load tree
    #[arg(long, default_value_t = 100)]
    files: usize,
    /// MiB per file in that tree
    #[arg(long, default_value_t = 10)]
    file_mib: usize,
    /// append_lag, durable_fsync, capture_watch: records per second
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Seconds of append_lag, append_max, random_writes, durable_fsync, capture_watch
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// random_writes: MiB of files written into
    #[arg(long, default_value_t = 100)]
    random_mib: usize,
    /// random_writes: writes per second
    #[arg(long, default_value_t = 500)]
    random_rate: u32,
    /// initial_sync, initial_sync_tls, journal_load: rounds of ours and every baseline, in turn;
    /// the figures are the medians (default 3, 1 with --quick)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=99))]
    rounds: Option<u32>,
    /// Also draw the lag CDF and throughput over time into this SVG file
    #[arg(long, value_name = "FILE.svg")]
    report: Option<PathBuf>,
    /// Both rescan periods of the agents in ms (default: the product's); a diagnosis of what
    /// the periodic rescans cost
    #[arg(long, value_name = "MS")]
    rescan_ms: Option<u64>,
    /// The artemis-sync binary (default: the one beside this program)
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Run nothing: print the table of a result saved from `--json`
    #[arg(long, value_name = "FILE.json")]
    table_of: Option<PathBuf>,
}

/// `--table-of`: the table of a saved `--json` result.
fn table_of(path: &std::path::Path) -> ExitCode {
    let parsed = std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).map_err(|e| e.to_string()));
    match parsed {
        Ok(v) => {
            print!("{}", bench::table(&v));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("artemis-sync-bench: {}: {e}", path.display());
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let mut a = Args::parse();
    artemis_sync::logging::init(None, "warn");
    if let Some(path) = &a.table_of {
        return table_of(path);
    }
    if a.quick {
        a.files = a.files.min(4);
        a.file_mib = a.file_mib.min(1);
        a.seconds = a.seconds.min(2);
        a.random_mib = a.random_mib.min(10);
        a.rate = a.rate.min(500);
        a.random_rate = a.random_rate.min(200);
    }
    for w in &a.workloads {
        if !WORKLOADS.contains(&w.as_str()) {
            eprintln!(
                "artemis-sync-bench: unknown workload {w:?}; known: {}",
                WORKLOADS.join(", ")
            );
            return ExitCode::from(2);
        }
    }
    let agent_bin = a
        .agent
        .clone()
        .unwrap_or_else(artemis_sync_tools::agent_binary);
    let (dir, remove) = match &a.dir {
        Some(d) => (d.clone(), false),
        None => {
            let base = if std::path::Path::new("/dev/shm").is_dir() {
                PathBuf::from("/dev/shm")
            } else {
                std::env::temp_dir()
            };
            (
                base.join(format!("artemis-sync-bench.{}", std::process::id())),
                true,
            )
        }
    };
    let settings = Settings {
        dir: dir.clone(),
        auth: a.auth,
        workloads: a.workloads.clone(),
        files: a.files,
        file_mib: a.file_mib,
        rate: a.rate,
        seconds: a.seconds,
        random_mib: a.random_mib,
        random_rate: a.random_rate,
        rounds: a.rounds.unwrap_or(if a.quick { 1 } else { 3 }),
        agent_bin,
        rescan_ms: a.rescan_ms,
    };
    let result = bench::run(&settings, |w| eprintln!("artemis-sync-bench: {w} ..."));
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    }
    match result {
        Ok((v, curves)) => {
            if let Some(path) = &a.report {
                if let Err(e) = std::fs::write(path, bench::svg(&curves)) {
                    eprintln!("artemis-sync-bench: cannot write {}: {e}", path.display());
                    return ExitCode::from(1);
                }
            }
            if a.json {
                println!("{v}");
            } else {
                print!("{}", bench::table(&v));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("artemis-sync-bench: {}", artemis_sync::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
