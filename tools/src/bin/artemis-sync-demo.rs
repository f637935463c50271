//! `artemis-sync-demo`: the walk-through of both modes on local directories (see
//! `artemis_sync_tools::demo`). Exit 0 when every step ran, 1 when one failed (the error names
//! the step), 2 for usage.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Shows both storage modes on local directories: no config, root or network needed.
#[derive(Debug, Parser)]
#[command(name = "artemis-sync-demo", version)]
struct Args {
    /// Work in this directory and keep it (default: a temporary directory, removed after)
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// A temporary directory for the demo, removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    artemis_sync::logging::init(None, "warn");
    let mut stdout = std::io::stdout();
    let (path, _guard) = match args.dir {
        Some(d) => (d, None),
        None => {
            let path =
                std::env::temp_dir().join(format!("artemis-sync-demo.{}", std::process::id()));
            if let Err(e) = std::fs::create_dir(&path) {
                eprintln!(
                    "artemis-sync-demo: error: cannot create {}: {e}",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
            (path.clone(), Some(TempDir(path)))
        }
    };
    match artemis_sync_tools::demo::run(&path, &mut stdout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = stdout.flush();
            eprintln!(
                "artemis-sync-demo: error: {}",
                artemis_sync::error_chain(&e)
            );
            ExitCode::FAILURE
        }
    }
}
