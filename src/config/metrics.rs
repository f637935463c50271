//! `[metrics]`: the agent's HTTP endpoint for Prometheus and load balancers (`/metrics`,
//! `/health`, `/status`). On by default on the loopback interface; `listen = ""` turns it off;
//! an address other than loopback must be asked for with `allow_remote = true` (the endpoint
//! has no authentication, and `/status` names hosts and paths). Checked once on load.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::validate::invalid_in;
use crate::config::{Config, ConfigError};

/// Where the endpoint listens when `[metrics] listen` is not set.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9465";

/// `[metrics]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `address:port` of the HTTP endpoint; empty: no endpoint.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Allow an address other than loopback (the endpoint has no authentication).
    #[serde(default)]
    pub allow_remote: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_listen(),
            allow_remote: false,
        }
    }
}

fn default_listen() -> String {
    DEFAULT_METRICS_LISTEN.to_owned()
}

impl MetricsConfig {
    /// The address to serve on; `None` when the endpoint is off (validated on load).
    pub fn address(&self) -> Option<SocketAddr> {
        (!self.listen.is_empty()).then(|| self.listen.parse().expect("validated on load"))
    }
}

impl Config {
    /// `[metrics] listen`: empty, or an `address:port` on loopback unless `allow_remote`.
    pub(super) fn validate_metrics(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = invalid_in(path);
        let m = &self.metrics;
        if m.listen.is_empty() {
            return Ok(());
        }
        let addr: SocketAddr = m.listen.parse().map_err(|e| {
            invalid(
                "metrics.listen",
                format!(
                    "{:?} is not an address:port ({e}); empty turns the endpoint off",
                    m.listen
                ),
            )
        })?;
        if !addr.ip().is_loopback() && !m.allow_remote {
            return Err(invalid(
                "metrics.listen",
                format!(
                    "{addr} is not a loopback address: the endpoint has no authentication; set `metrics.allow_remote = true` to serve it there"
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    const BASE: &str = "[node]\nbase_dir = \"/opt/corda\"\n[storage]\nmode = \"shared\"\nbackend = \"bind\"\nsource = \"/srv/share\"\nmount_point = \"/mnt/share\"\n";

    fn load(metrics: &str) -> Result<Config, String> {
        Config::from_toml(Path::new("agent.toml"), &format!("{BASE}{metrics}"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_endpoint_is_on_loopback_by_default_and_empty_turns_it_off() {
        let c = load("").unwrap();
        assert_eq!(c.metrics.address(), Some("127.0.0.1:9465".parse().unwrap()));
        let c = load("[metrics]\nlisten = \"\"\n").unwrap();
        assert_eq!(c.metrics.address(), None);
        let c = load("[metrics]\nlisten = \"[::1]:9000\"\n").unwrap();
        assert_eq!(c.metrics.address(), Some("[::1]:9000".parse().unwrap()));
    }

    #[test]
    fn issue14_a_remote_address_needs_allow_remote_and_errors_name_the_key() {
        let err = load("[metrics]\nlisten = \"0.0.0.0:9465\"\n").unwrap_err();
        assert!(
            err.contains("`metrics.listen`") && err.contains("allow_remote"),
            "{err}"
        );
        load("[metrics]\nlisten = \"0.0.0.0:9465\"\nallow_remote = true\n").unwrap();
        let err = load("[metrics]\nlisten = \"localhost\"\n").unwrap_err();
        assert!(err.contains("`metrics.listen`"), "{err}");
        let err = load("[metrics]\nport = 1\n").unwrap_err();
        assert!(err.contains("unknown field `port`"), "{err}");
    }
}
