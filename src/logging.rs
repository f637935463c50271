//! Logging set-up shared by the binaries: `tracing` to stderr, the level from `--log-level` or
//! `ARTEMIS_SYNC_LOG` (an `EnvFilter` directive such as `debug` or `artemis_sync=trace`), and no
//! timestamps under systemd (when `JOURNAL_STREAM` is set journald adds its own). No log files.

use tracing_subscriber::EnvFilter;

/// The environment variable that sets the log filter when `--log-level` is not given.
pub const LOG_ENV: &str = "ARTEMIS_SYNC_LOG";

/// Installs the global subscriber. `level` wins over the environment; `default` applies when
/// neither is set. A filter that does not parse falls back to `default`, with a warning.
pub fn init(level: Option<&str>, default: &str) {
    let wanted = level
        .map(str::to_owned)
        .or_else(|| std::env::var(LOG_ENV).ok())
        .filter(|s| !s.is_empty());
    let (filter, bad) = match wanted.as_deref().map(EnvFilter::try_new) {
        Some(Ok(f)) => (f, None),
        Some(Err(e)) => (
            EnvFilter::new(default),
            Some(format!("{}: {e}", wanted.unwrap_or_default())),
        ),
        None => (EnvFilter::new(default), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let installed = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().with_ansi(false).try_init()
    } else {
        builder.try_init()
    };
    if installed.is_ok() {
        if let Some(bad) = bad {
            tracing::warn!("ignoring log filter {bad}; using `{default}`");
        }
    }
}
