//! `artemis-sync`: the operator's command line. Parses arguments, makes one library call per
//! command ([`artemis_sync::cli::commands`], [`artemis_sync::daemon::client`]), prints its
//! result, and maps errors to the exit codes listed in `--help` and the README.

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use artemis_sync::cli::commands::{self, StatusReport};
use artemis_sync::cli::progress::{self, Output};
use artemis_sync::cli::{CertsAction, Cli, Command, LeaseAction};
use artemis_sync::config::{Config, ConfigError};
use artemis_sync::daemon::client;
use artemis_sync::doctor;
use artemis_sync::link::{LinkError, LinkOptions};
use artemis_sync::shared::lock_safety::LockSafetyError;
use artemis_sync::shared::mount;
use artemis_sync::sys::{self, RealSys};
use clap::Parser;

/// Success.
const EXIT_OK: u8 = 0;
/// A runtime failure: I/O error, mount failed.
const EXIT_FAILURE: u8 = 1;
// 2 is bad command-line usage, which clap reports and exits with itself.
/// The config file is missing, unreadable or invalid.
const EXIT_CONFIG: u8 = 3;
/// A check failed (`doctor`, or the checks after `mount`).
const EXIT_CHECK: u8 = 4;
/// Refused, to protect data: a journal directory where the link should be, a foreign file in
/// the share, not enough space.
const EXIT_REFUSED: u8 = 5;
/// The width assumed for a terminal that does not say its own.
const DEFAULT_COLUMNS: usize = 80;

fn main() -> ExitCode {
    let cli = Cli::parse();
    artemis_sync::logging::init(cli.log_level.as_deref(), "info");
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let _ = std::io::stdout().flush();
            eprintln!(
                "artemis-sync: error: {}",
                artemis_sync::error_chain(err.as_ref())
            );
            ExitCode::from(exit_code(&err))
        }
    }
}

/// The documented exit code for an error that reached `main`.
fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<ConfigError>().is_some() {
        return EXIT_CONFIG;
    }
    // the agent refusing a lock-unsafe share, however deep in the chain
    if err
        .chain()
        .any(|e| matches!(e.downcast_ref(), Some(LockSafetyError::Unsafe { .. })))
    {
        return EXIT_CHECK;
    }
    match err.downcast_ref::<LinkError>() {
        Some(
            LinkError::NotEmpty { .. }
            | LinkError::PointsElsewhere { .. }
            | LinkError::NotALinkOrDirectory(_)
            | LinkError::Unsupported(_)
            | LinkError::ReservedName(_)
            | LinkError::LinkLeavesJournal { .. }
            | LinkError::InsufficientSpace { .. }
            | LinkError::Conflict { .. }
            | LinkError::SourceChanged(_)
            | LinkError::OwnerRefused { .. }
            | LinkError::BrokerRunning { .. }
            | LinkError::ShareNotMounted { .. },
        ) => EXIT_REFUSED,
        _ => EXIT_FAILURE,
    }
}

fn load(path: &Path) -> Result<Config, ConfigError> {
    Config::load(path)
}

/// `EXIT_OK` when `ok`, else `failed`.
fn code(ok: bool, failed: u8) -> u8 {
    if ok {
        EXIT_OK
    } else {
        failed
    }
}

fn run(cli: &Cli) -> anyhow::Result<u8> {
    let path = &cli.config;
    match &cli.command {
        Command::CheckConfig => {
            print!("# {}: valid\n{}", path.display(), load(path)?.to_toml());
            Ok(EXIT_OK)
        }
        Command::Fstab => {
            println!("{}", mount::fstab_line(&load(path)?)?);
            Ok(EXIT_OK)
        }
        Command::Mount => {
            let report = commands::mount(&load(path)?, path, &mut std::io::stdout())?;
            print!("{report}");
            Ok(code(!report.failed(), EXIT_CHECK))
        }
        Command::Link { migrate, force } => {
            let options = LinkOptions {
                migrate: *migrate,
                force: *force,
            };
            print!("{}", commands::link(&load(path)?, options)?);
            Ok(EXIT_OK)
        }
        Command::Doctor { json } => {
            let report = doctor::run(load(path).as_ref(), path, &RealSys::from_env());
            if *json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(code(report.ok, EXIT_CHECK))
        }
        Command::Agent => {
            let reason = commands::agent(load(path)?)?;
            tracing::info!(%reason, "agent stopped");
            Ok(EXIT_OK)
        }
        Command::Status { json } => {
            let report = commands::status(&load(path)?);
            if *json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{report}");
            }
            Ok(code(
                matches!(report, StatusReport::Running(_)),
                EXIT_FAILURE,
            ))
        }
        Command::Release => {
            print!("{}", client::release(&load(path)?)?);
            Ok(EXIT_OK)
        }
        Command::Resume => {
            print!("{}", client::resume(&load(path)?)?);
            Ok(EXIT_OK)
        }
        Command::Promote { force } => {
            print!("{}", client::promote(&load(path)?, *force)?);
            Ok(EXIT_OK)
        }
        Command::Demote { force } => {
            print!("{}", client::demote(&load(path)?, *force)?);
            Ok(EXIT_OK)
        }
        Command::Verify { json } => {
            let report = client::verify(&load(path)?)?;
            if *json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{report}");
            }
            Ok(code(report.identical, EXIT_CHECK))
        }
        Command::Progress { interval_ms } => {
            let stdout = std::io::stdout();
            let columns = stdout
                .is_terminal()
                .then(|| sys::terminal_columns(stdout.as_fd()).unwrap_or(DEFAULT_COLUMNS));
            let mut lock = stdout.lock();
            let mut out = Output::new(&mut lock, columns, Duration::from_millis(*interval_ms));
            progress::progress(&load(path)?, &mut out)?;
            Ok(EXIT_OK)
        }
        Command::Certs {
            action: CertsAction::Init { dir, hosts },
        } => {
            print!("{}", commands::certs_init(dir, hosts)?);
            Ok(EXIT_OK)
        }
        Command::Lease {
            action: LeaseAction::Init,
        } => {
            println!("{}", commands::lease_init(&load(path)?)?);
            Ok(EXIT_OK)
        }
    }
}
