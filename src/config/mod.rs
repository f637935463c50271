//! The agent's one TOML config file (`/etc/artemis-sync/agent.toml` by default): its schema,
//! defaults, and the validation that runs once on load, so the rest of the program can trust
//! every value it reads (absolute paths, a known backend, a source of the backend's form,
//! a credentials file that only root can read).
//!
//! This file holds the whole file's type, `[node]`, `[lock]`, `[agent]`, the defaults and
//! loading; [`storage`] holds `[storage]` and the backends, [`replication`] `[replication]`,
//! [`lease`] `[lease]`, [`metrics`] `[metrics]`, and `validate` the checks run on load.
//! Everything is re-exported here, so users name
//! `crate::config::{Config, Backend, ...}`. This module imports nothing of the modes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::mount_options::MountOptions;

pub mod backoff;
pub mod health;
pub mod lease;
pub mod metrics;
pub mod mount_options;
pub mod replication;
pub mod storage;
mod validate;

pub use lease::{LeaseBackend, LeaseConfig, DEFAULT_LEASE_TABLE};
pub use metrics::{MetricsConfig, DEFAULT_METRICS_LISTEN};
pub use replication::{psk_material, Ack, Capture, PeerLoss, ReplRole, ReplicationConfig};
pub use storage::{nfs_host, smb_host, Backend, Mode, StorageConfig, BACKENDS};
pub use validate::{check_credentials_file, check_private_file, check_user_options};

/// Where the agent looks for its config when `-c` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/artemis-sync/agent.toml";
/// Where the share is mounted when `[storage] mount_point` is not set.
pub const DEFAULT_MOUNT_POINT: &str = "/var/lib/artemis-sync/share";
/// How many times the mount helper tries before it gives up.
pub const DEFAULT_MOUNT_ATTEMPTS: u32 = 8;
/// The longest pause between two mount attempts, in milliseconds.
pub const DEFAULT_MOUNT_RETRY_MAX_MS: u64 = 20_000;
/// How long systemd lets the whole mount (all attempts) run, in seconds.
pub const DEFAULT_MOUNT_TIMEOUT_S: u64 = 180;
/// Lease renewal period (Corda's `updateInterval`), in milliseconds.
pub const DEFAULT_UPDATE_INTERVAL_MS: u64 = 20_000;
/// Takeover delay after the last observed renewal (Corda's `waitInterval`), in milliseconds.
pub const DEFAULT_WAIT_INTERVAL_MS: u64 = 40_000;
/// Time the node gets between SIGTERM and SIGKILL, in milliseconds.
pub const DEFAULT_STOP_TIMEOUT_MS: u64 = 10_000;
/// The lock directory's name inside the mount point when `[lock] dir` is not set.
pub const DEFAULT_LOCK_SUBDIR: &str = ".artemis-sync";
/// Where the agent answers `status` and `release`.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/artemis-sync/agent.sock";
/// Replication unit, in bytes (Artemis writes in multiples of it).
pub const DEFAULT_PAGE_SIZE: u32 = 4096;
/// Rescan of changed files, in milliseconds.
pub const DEFAULT_RESCAN_INTERVAL_MS: u64 = 1000;
/// Rehash of every page, in milliseconds.
pub const DEFAULT_DEEP_RESCAN_INTERVAL_MS: u64 = 60_000;
/// Unacknowledged page data in flight, in MiB.
pub const DEFAULT_WINDOW_MB: u64 = 32;
/// How long a durable sync waits for the cold side before `on_peer_loss` applies, in ms.
pub const DEFAULT_PEER_TIMEOUT_MS: u64 = 2000;
/// Where the hot host serves `data_dir` with `capture = "fuse"` (the default capture).
pub const DEFAULT_FUSE_MOUNT_POINT: &str = "/var/lib/artemis-sync/journal";
/// Where replicated mode keeps its epoch and role.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/artemis-sync/replication-state.json";

/// Errors loading or validating the config file. Each names the file and, where there is one,
/// the key.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ConfigError {
    /// cannot read config file {path:?}: {source}
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// config file {path:?}: {message}
    Parse { path: PathBuf, message: String },
    /// config file {path:?}: `{key}` {reason}
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

/// The whole config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The Corda node this agent serves.
    pub node: NodeConfig,
    /// Where the Artemis journal lives.
    pub storage: StorageConfig,
    /// Mutual exclusion on the share.
    #[serde(default)]
    pub lock: LockConfig,
    /// The agent process itself.
    #[serde(default)]
    pub agent: AgentConfig,
    /// The HTTP endpoint for Prometheus and load balancers.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Where the lease lives (`share` or `postgres`); absent: the share in shared mode, no
    /// lease (manual failover) in replicated mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseConfig>,
    /// Replicated mode: streaming the journal from the hot to the cold VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationConfig>,
}

/// `[node]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// `${BASE_DIR}` of the Corda node; `base_dir/artemis` becomes the link to the share.
    pub base_dir: PathBuf,
    /// The node, started by the agent only while it holds the lease (program and arguments).
    #[serde(default)]
    pub command: Vec<String>,
    /// A command run to completion after each takeover, before the node starts.
    #[serde(default)]
    pub on_acquire: Vec<String>,
    /// A command run to completion each time the node has been stopped because this VM gave
    /// up or lost the right to run it.
    #[serde(default)]
    pub on_release: Vec<String>,
    /// SIGTERM, then SIGKILL after this long.
    #[serde(default = "default_stop_timeout_ms")]
    pub stop_timeout_ms: u64,
    /// Instead of `command`: a systemd unit (`corda.service`) the agent starts and stops with
    /// systemctl, for nodes that already have a unit.
    #[serde(default)]
    pub systemd_unit: String,
    /// Health probe: `host:port` addresses a TCP connect must reach.
    #[serde(default)]
    pub probe_tcp: Vec<String>,
    /// Health probe: plain `http://` URLs a GET must answer with a 2xx status.
    #[serde(default)]
    pub probe_http: Vec<String>,
    /// Health probe: a command (program and arguments) that must exit 0 within the timeout.
    #[serde(default)]
    pub probe_command: Vec<String>,
    /// How often a round of probes runs.
    #[serde(default = "health::default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// How long each probe of a round may take.
    #[serde(default = "health::default_probe_timeout_ms")]
    pub probe_timeout_ms: u64,
    /// Consecutive failed rounds that make the node unhealthy.
    #[serde(default = "health::default_probe_failures")]
    pub probe_failures: u32,
    /// After each node start, failed rounds do not count for this long (or until one passes).
    #[serde(default = "health::default_probe_grace_ms")]
    pub probe_grace_ms: u64,
    /// The first pause before a local restart; it doubles with each restart in the window.
    #[serde(default = "health::default_restart_backoff_ms")]
    pub restart_backoff_ms: u64,
    /// The longest pause before a local restart.
    #[serde(default = "health::default_restart_backoff_max_ms")]
    pub restart_backoff_max_ms: u64,
    /// Local restarts within `restart_window_ms` before the watchdog gives up (0: give up on
    /// the first failure).
    #[serde(default = "health::default_max_local_restarts")]
    pub max_local_restarts: u32,
    /// The window local restarts are counted in.
    #[serde(default = "health::default_restart_window_ms")]
    pub restart_window_ms: u64,
    /// After giving up, how long this VM stays out of the contention (0: until `resume`).
    #[serde(default)]
    pub cooldown_ms: u64,
}

/// `[lock]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockConfig {
    /// Directory of the lock and lease files; empty means `<mount_point>/.artemis-sync`.
    #[serde(default)]
    pub dir: PathBuf,
    /// This VM's name in the holder id; empty means the host name.
    #[serde(default)]
    pub machine_name: String,
    /// Renewal period (Corda's `updateInterval`).
    #[serde(default = "default_update_interval_ms")]
    pub update_interval_ms: u64,
    /// Takeover delay after the last observed renewal (Corda's `waitInterval`).
    #[serde(default = "default_wait_interval_ms")]
    pub wait_interval_ms: u64,
    /// Accept a share on a local filesystem, where a lock excludes only processes of this host
    /// (tests, single-host set-ups).
    #[serde(default)]
    pub allow_local_locks: bool,
}

impl Default for LockConfig {
    fn default() -> Self {
        LockConfig {
            dir: PathBuf::new(),
            machine_name: String::new(),
            update_interval_ms: DEFAULT_UPDATE_INTERVAL_MS,
            wait_interval_ms: DEFAULT_WAIT_INTERVAL_MS,
            allow_local_locks: false,
        }
    }
}

/// `[agent]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Unix socket where the running agent answers `status` and `release`.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            control_socket: default_control_socket(),
        }
    }
}

fn default_update_interval_ms() -> u64 {
    DEFAULT_UPDATE_INTERVAL_MS
}
fn default_wait_interval_ms() -> u64 {
    DEFAULT_WAIT_INTERVAL_MS
}
fn default_stop_timeout_ms() -> u64 {
    DEFAULT_STOP_TIMEOUT_MS
}
fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}

/// This host's name, from the kernel.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The safety margin kept between the node being down and a contender taking over: a tenth of
/// `wait_interval_ms`, for scheduling delays and clock-rate differences between the VMs.
pub fn fence_margin_ms(wait_interval_ms: u64) -> u64 {
    wait_interval_ms / 10
}

impl Config {
    /// Reads, parses and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(path, &text)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        if config.lock.dir.as_os_str().is_empty() {
            config.lock.dir = config.storage.mount_point.join(DEFAULT_LOCK_SUBDIR);
        }
        if config.lock.machine_name.is_empty() {
            config.lock.machine_name = host_name();
        }
        config.validate(path)?;
        Ok(config)
    }

    /// The config as TOML, every default filled in.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a validated config always serializes")
    }

    /// The extra mount options, parsed (validation guarantees they parse).
    pub fn user_options(&self) -> MountOptions {
        MountOptions::parse(&self.storage.options).expect("validated on load")
    }

    /// `base_dir/artemis`, the path the Corda node reads its journal through.
    pub fn artemis_link(&self) -> PathBuf {
        self.node.base_dir.join("artemis")
    }

    /// What `base_dir/artemis` links to: the share's mount point in shared mode; in
    /// replicated mode the FUSE mount (`capture = "fuse"`) or `data_dir` (`"watch"`), as the
    /// hot agent links it.
    pub fn link_target(&self) -> PathBuf {
        match &self.replication {
            Some(r) if r.capture == Capture::Fuse => r.mount_point.clone(),
            Some(r) => r.data_dir.clone(),
            None => self.storage.mount_point.clone(),
        }
    }

    /// Who this agent is in the lease: `machine_name:base_dir`.
    pub fn holder_id(&self) -> String {
        format!(
            "{}:{}",
            self.lock.machine_name,
            self.node.base_dir.display()
        )
    }
}

#[cfg(test)]
mod tests;
