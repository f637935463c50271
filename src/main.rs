//! `artemis-sync`: the operator's command line. Parses arguments, calls the library, prints
//! results, and maps errors to the exit codes listed in `--help` and the README.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use artemis_sync::cli::{CertsAction, Cli, Command};
use artemis_sync::config::{Backend, Config, ConfigError};
use artemis_sync::daemon::control;
use artemis_sync::link::{LinkError, LinkOptions, LinkOutcome};
use artemis_sync::replicated::agent as replica;
use artemis_sync::shared::agent;
use artemis_sync::shared::mount::{self, MountOutcome, MountRequest};
use artemis_sync::sys::RealSys;
use artemis_sync::{doctor, link};
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
    if let Some(agent::AgentError::LockUnsafe { .. }) = err.downcast_ref() {
        return EXIT_CHECK;
    }
    match err.downcast_ref::<LinkError>() {
        Some(
            LinkError::NotEmpty { .. }
            | LinkError::PointsElsewhere { .. }
            | LinkError::NotALinkOrDirectory(_)
            | LinkError::Unsupported(_)
            | LinkError::InsufficientSpace { .. }
            | LinkError::Conflict { .. }
            | LinkError::SourceChanged(_),
        ) => EXIT_REFUSED,
        _ => EXIT_FAILURE,
    }
}

fn load(path: &Path) -> Result<Config, ConfigError> {
    Config::load(path)
}

fn run(cli: &Cli) -> anyhow::Result<u8> {
    let mut stdout = std::io::stdout();
    match &cli.command {
        Command::CheckConfig => {
            let config = load(&cli.config)?;
            print!("# {}: valid\n{}", cli.config.display(), config.to_toml());
            Ok(EXIT_OK)
        }
        Command::Fstab => {
            let config = load(&cli.config)?;
            println!("{}", mount::fstab_line(&config)?);
            Ok(EXIT_OK)
        }
        Command::Mount => {
            let config = load(&cli.config)?;
            let dir = &config.storage.mount_point;
            if config.storage.backend() != Backend::Premounted && !dir.exists() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create mount point {}", dir.display()))?;
                tracing::info!(dir = %dir.display(), "created the mount point");
            }
            if config.storage.backend() != Backend::Premounted {
                let sys = RealSys::from_env();
                match mount::mount(&sys, &MountRequest::from_config(&config), &mut stdout)? {
                    MountOutcome::AlreadyMounted => println!(
                        "{} is already mounted on {}",
                        config.storage.source,
                        dir.display()
                    ),
                    MountOutcome::Mounted { attempts } => println!(
                        "mounted {} on {} (attempt {attempts})",
                        config.storage.source,
                        dir.display()
                    ),
                    MountOutcome::Faked { .. } => {}
                }
            }
            let report = doctor::run(Ok(&config), &cli.config, &RealSys::from_env());
            let mut failed = false;
            for c in report
                .checks
                .iter()
                .filter(|c| matches!(c.name, "mount" | "locks" | "writable" | "free_space"))
            {
                failed |= c.status == doctor::Status::Fail;
                let one = doctor::Report {
                    ok: true,
                    checks: vec![c.clone()],
                };
                print!("{}", one.to_text());
            }
            Ok(if failed { EXIT_CHECK } else { EXIT_OK })
        }
        Command::Link { migrate, force } => {
            let config = load(&cli.config)?;
            let path = config.artemis_link();
            let target = &config.storage.mount_point;
            let outcome = link::link(
                &path,
                target,
                LinkOptions {
                    migrate: *migrate,
                    force: *force,
                },
            )?;
            match outcome {
                LinkOutcome::AlreadyLinked => println!(
                    "{} already links to {}; nothing to do",
                    path.display(),
                    target.display()
                ),
                LinkOutcome::Created => {
                    println!("linked {} -> {}", path.display(), target.display())
                }
                LinkOutcome::Replaced { previous } => {
                    println!(
                        "linked {} -> {} (it pointed to {})",
                        path.display(),
                        target.display(),
                        previous.display()
                    )
                }
                LinkOutcome::Migrated(r) => {
                    println!(
                        "migrated {} files ({} bytes, every file verified by blake3; {} copied, {} already in the share)",
                        r.copied + r.already_present, r.bytes, r.copied, r.already_present
                    );
                    println!("old directory kept at {}", r.aside.display());
                    println!("linked {} -> {}", path.display(), target.display());
                }
            }
            Ok(EXIT_OK)
        }
        Command::Doctor { json } => {
            let loaded = load(&cli.config);
            let report = doctor::run(loaded.as_ref(), &cli.config, &RealSys::from_env());
            if *json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(if report.ok { EXIT_OK } else { EXIT_CHECK })
        }
        Command::Agent => {
            let config = load(&cli.config)?;
            let listener = control::bind(&config.agent.control_socket)?;
            let (tx, shutdown) = crossbeam_channel::bounded(1);
            let mut signals =
                signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
                    .context("cannot install signal handlers")?;
            std::thread::spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    let _ = tx.send(artemis_sync::daemon::ShutdownReason::Signal(sig));
                }
            });
            let socket = config.agent.control_socket.clone();
            let result = if config.storage.mode == artemis_sync::config::Mode::Replicated {
                replica::run(config, listener, shutdown).map_err(anyhow::Error::from)
            } else {
                agent::run(config, listener, shutdown).map_err(anyhow::Error::from)
            };
            artemis_sync::daemon::sdnotify::stopping();
            let _ = std::fs::remove_file(&socket);
            let reason = result?;
            tracing::info!(%reason, "agent stopped");
            Ok(EXIT_OK)
        }
        Command::Status { json } => {
            let config = load(&cli.config)?;
            let socket = &config.agent.control_socket;
            match control::request(socket, "status", control::STATUS_TIMEOUT) {
                Ok(answer) => {
                    if *json {
                        println!("{answer}");
                    } else {
                        let v: serde_json::Value = serde_json::from_str(&answer)
                            .context("the agent's status is not JSON")?;
                        print_status(&v);
                    }
                    Ok(EXIT_OK)
                }
                Err(e) => {
                    // No agent: say so, and show what the share says.
                    let lease = artemis_sync::shared::lease::read(
                        &artemis_sync::shared::lease::path(&config),
                    );
                    let v = serde_json::json!({
                        "role": "down",
                        "holder": config.holder_id(),
                        "error": artemis_sync::error_chain(&e),
                        "lease_holder": lease.as_ref().ok().and_then(|l| l.as_ref().map(|l| l.holder.clone())),
                        "epoch": lease.as_ref().ok().and_then(|l| l.as_ref().map(|l| l.epoch)),
                        "lease_state": lease.as_ref().ok().and_then(|l| l.as_ref().map(|l| l.state)),
                        "lease_error": lease.as_ref().err().map(|e| e.to_string()),
                    });
                    if *json {
                        println!("{v}");
                    } else {
                        print_status(&v);
                    }
                    Ok(EXIT_FAILURE)
                }
            }
        }
        Command::Release => {
            let config = load(&cli.config)?;
            let timeout = std::time::Duration::from_millis(
                config.node.stop_timeout_ms + config.lock.wait_interval_ms,
            ) + control::STATUS_TIMEOUT;
            println!(
                "{}",
                control::request(&config.agent.control_socket, "release", timeout)?
            );
            Ok(EXIT_OK)
        }
        Command::Promote { force } => {
            let config = load(&cli.config)?;
            let cmd = if *force { "promote --force" } else { "promote" };
            let answer = control::request(
                &config.agent.control_socket,
                cmd,
                control::STATUS_TIMEOUT * 6,
            )?;
            let v: serde_json::Value =
                serde_json::from_str(&answer).context("the agent's answer is not JSON")?;
            println!("promoted: hot at epoch {}", v["epoch"]);
            println!("{}", v["behind"].as_str().unwrap_or_default());
            println!("{}", v["summary"].as_str().unwrap_or_default());
            Ok(EXIT_OK)
        }
        Command::Demote { force } => {
            let config = load(&cli.config)?;
            let cmd = if *force { "demote --force" } else { "demote" };
            let answer = control::request(
                &config.agent.control_socket,
                cmd,
                replica::DRAIN_TIMEOUT + control::STATUS_TIMEOUT,
            )?;
            let v: serde_json::Value =
                serde_json::from_str(&answer).context("the agent's answer is not JSON")?;
            if v["drained"] == true {
                println!(
                    "demoted: cold at epoch {}; the cold copy has everything (through batch {})",
                    v["epoch"], v["last_seq"]
                );
            } else {
                println!("demoted (forced): cold at epoch {}; the stream was NOT drained, the other copy may be behind", v["epoch"]);
            }
            Ok(EXIT_OK)
        }
        Command::Verify { json } => {
            let config = load(&cli.config)?;
            let answer = control::request(
                &config.agent.control_socket,
                "verify",
                replica::VERIFY_TIMEOUT,
            )?;
            let report: serde_json::Value =
                serde_json::from_str(&answer).context("the agent's answer is not JSON")?;
            let identical = report["identical"] == true;
            if *json {
                println!("{answer}");
            } else {
                println!("hot  {}", report["hot_root"].as_str().unwrap_or_default());
                println!("cold {}", report["cold_root"].as_str().unwrap_or_default());
                if identical {
                    println!("identical: {} files", report["files"]);
                } else {
                    for f in report["differing"].as_array().into_iter().flatten() {
                        println!("differs: {}", f.as_str().unwrap_or_default());
                    }
                }
            }
            Ok(if identical { EXIT_OK } else { EXIT_CHECK })
        }
        Command::Certs {
            action: CertsAction::Init { dir, hosts },
        } => {
            let w = artemis_sync::replicated::certs::init(dir, hosts)?;
            println!(
                "CA certificate: {} (copy to both hosts; [replication] tls_ca)",
                w.ca_cert.display()
            );
            println!(
                "CA key:         {} (keep it offline: only needed to make more certificates)",
                w.ca_key.display()
            );
            for (h, c, k) in &w.hosts {
                println!("{h}: tls_cert = {:?}, tls_key = {:?} (copy both to {h}; the key stays mode 0600)", c, k);
            }
            Ok(EXIT_OK)
        }
    }
}

/// `status` as aligned `key: value` lines.
fn print_status(v: &serde_json::Value) {
    let Some(map) = v.as_object() else { return };
    for (k, val) in map {
        let text = match val {
            serde_json::Value::Null => "-".to_owned(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!("{k:<20} {text}");
    }
}
