//! The node health watchdog's keys in `[node]` (probes, grace, restart back-off, give-up and
//! cool-down): their defaults, named with units, and their checks on load. The watchdog itself
//! is [`crate::daemon::health`]; the probes are [`crate::daemon::probe`].

use std::path::Path;

use crate::config::validate::invalid_in;
use crate::config::{ConfigError, NodeConfig};

/// How often the probes run, in milliseconds.
pub const DEFAULT_PROBE_INTERVAL_MS: u64 = 5_000;
/// How long one probe may take before it counts as failed, in milliseconds.
pub const DEFAULT_PROBE_TIMEOUT_MS: u64 = 2_000;
/// Consecutive failed probe rounds that make the node unhealthy.
pub const DEFAULT_PROBE_FAILURES: u32 = 3;
/// After each node start, how long failed probes do not count (a JVM takes a while), in ms.
pub const DEFAULT_PROBE_GRACE_MS: u64 = 60_000;
/// The first pause before a local restart, in milliseconds; it doubles on each restart.
pub const DEFAULT_RESTART_BACKOFF_MS: u64 = 1_000;
/// The longest pause before a local restart, in milliseconds.
pub const DEFAULT_RESTART_BACKOFF_MAX_MS: u64 = 60_000;
/// Local restarts within `restart_window_ms` after which the watchdog gives up.
pub const DEFAULT_MAX_LOCAL_RESTARTS: u32 = 3;
/// The window local restarts are counted in, in milliseconds.
pub const DEFAULT_RESTART_WINDOW_MS: u64 = 600_000;
/// How long a VM whose watchdog gave up stays out of the contention, in milliseconds; 0: until
/// the operator runs `artemis-sync resume`.
pub const DEFAULT_COOLDOWN_MS: u64 = 0;

pub(super) fn default_probe_interval_ms() -> u64 {
    DEFAULT_PROBE_INTERVAL_MS
}
pub(super) fn default_probe_timeout_ms() -> u64 {
    DEFAULT_PROBE_TIMEOUT_MS
}
pub(super) fn default_probe_failures() -> u32 {
    DEFAULT_PROBE_FAILURES
}
pub(super) fn default_probe_grace_ms() -> u64 {
    DEFAULT_PROBE_GRACE_MS
}
pub(super) fn default_restart_backoff_ms() -> u64 {
    DEFAULT_RESTART_BACKOFF_MS
}
pub(super) fn default_restart_backoff_max_ms() -> u64 {
    DEFAULT_RESTART_BACKOFF_MAX_MS
}
pub(super) fn default_max_local_restarts() -> u32 {
    DEFAULT_MAX_LOCAL_RESTARTS
}
pub(super) fn default_restart_window_ms() -> u64 {
    DEFAULT_RESTART_WINDOW_MS
}

/// `host:port` with a non-empty host and a port number; the host is resolved at probe time.
fn check_host_port(addr: &str) -> Result<(), String> {
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!(
            "has {addr:?}, which is not host:port (e.g. \"127.0.0.1:10002\")"
        )),
    }
}

/// A plain `http://host:port/path` URL, split into `host:port` (port 80 if absent) and the path.
pub fn split_http_url(url: &str) -> Result<(String, String), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!("has {url:?}: only plain http:// URLs are probed (no https, no credentials)")
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') || path.contains(char::is_whitespace) {
        return Err(format!("has {url:?}, which is not http://host[:port]/path"));
    }
    let authority = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.contains(']'))
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    check_host_port(&authority).map_err(|_| format!("has {url:?}, whose port is not a number"))?;
    Ok((authority, path.to_owned()))
}

/// A key whose value must not be 0.
fn positive(key: &'static str, value: u64) -> Result<(), (&'static str, String)> {
    if value == 0 {
        Err((key, "must be greater than 0".into()))
    } else {
        Ok(())
    }
}

/// The watchdog's checks, the first failure as (key, reason).
fn check(n: &NodeConfig) -> Result<(), (&'static str, String)> {
    for a in &n.probe_tcp {
        check_host_port(a).map_err(|r| ("node.probe_tcp", r))?;
    }
    for u in &n.probe_http {
        split_http_url(u).map_err(|r| ("node.probe_http", r))?;
    }
    if n.probe_command.first().is_some_and(String::is_empty) {
        return Err(("node.probe_command", "names no program".into()));
    }
    positive("node.probe_interval_ms", n.probe_interval_ms)?;
    positive("node.probe_timeout_ms", n.probe_timeout_ms)?;
    positive("node.probe_failures", u64::from(n.probe_failures))?;
    positive("node.restart_backoff_ms", n.restart_backoff_ms)?;
    positive("node.restart_window_ms", n.restart_window_ms)?;
    if n.probe_timeout_ms > n.probe_interval_ms {
        return Err((
            "node.probe_timeout_ms",
            format!(
                "= {} is longer than probe_interval_ms = {}: a round of probes must end before the next",
                n.probe_timeout_ms, n.probe_interval_ms
            ),
        ));
    }
    if n.restart_backoff_max_ms < n.restart_backoff_ms {
        return Err((
            "node.restart_backoff_max_ms",
            format!(
                "= {} is below restart_backoff_ms = {}",
                n.restart_backoff_max_ms, n.restart_backoff_ms
            ),
        ));
    }
    Ok(())
}

/// Checks the watchdog's keys of `[node]`; the error names the key.
pub(super) fn validate(n: &NodeConfig, path: &Path) -> Result<(), ConfigError> {
    check(n).map_err(|(key, reason)| invalid_in(path)(key, reason))
}

impl NodeConfig {
    /// Whether any probe is configured.
    pub fn has_probes(&self) -> bool {
        !self.probe_tcp.is_empty() || !self.probe_http.is_empty() || !self.probe_command.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_urls_split_into_address_and_path() {
        let ok = |u: &str| split_http_url(u).unwrap();
        assert_eq!(
            ok("http://127.0.0.1:8080/health"),
            ("127.0.0.1:8080".into(), "/health".into())
        );
        assert_eq!(ok("http://localhost"), ("localhost:80".into(), "/".into()));
        assert_eq!(ok("http://[::1]/x"), ("[::1]:80".into(), "/x".into()));
        assert_eq!(ok("http://[::1]:81/x"), ("[::1]:81".into(), "/x".into()));
        for bad in [
            "https://a/x",
            "a:1/x",
            "http://",
            "http://u@h/x",
            "http://h:x/",
        ] {
            assert!(split_http_url(bad).is_err(), "{bad}");
        }
    }
}
