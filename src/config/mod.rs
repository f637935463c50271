//! The agent's one TOML config file (`/etc/artemis-sync/agent.toml` by default): its schema,
//! defaults, and the validation that runs once on load, so the rest of the program can trust
//! every value it reads (absolute paths, a known backend, a source of the backend's form,
//! a credentials file that only root can read).

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::mount_options::MountOptions;

pub mod backoff;
pub mod mount_options;

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
    /// Replicated mode: streaming the journal from the hot to the cold VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationConfig>,
}

/// Which side of the stream this host starts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplRole {
    /// Runs the node and streams its journal.
    Hot,
    /// Receives the stream.
    Cold,
}

/// `[replication]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// The role at first start; afterwards the state file (promote, demote) decides.
    pub role: ReplRole,
    /// The real directory `${BASE_DIR}/artemis` links to.
    pub data_dir: PathBuf,
    /// Where this host accepts the peer's connection (`host:port`).
    pub listen: String,
    /// Where the peer accepts ours.
    pub peer: String,
    /// Replication unit, a power of two.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Mutual TLS: this host's certificate (PEM).
    #[serde(default)]
    pub tls_cert: PathBuf,
    /// Mutual TLS: this host's key (PEM).
    #[serde(default)]
    pub tls_key: PathBuf,
    /// Mutual TLS: the pair's CA certificate (PEM).
    #[serde(default)]
    pub tls_ca: PathBuf,
    /// A pre-shared key (hex, mode 0600) authenticating every frame.
    #[serde(default)]
    pub psk_file: PathBuf,
    /// Plaintext and unauthenticated, allowed only when `listen` and `peer` are loopback
    /// addresses: for benchmarks and demos on one host.
    #[serde(default)]
    pub insecure_loopback: bool,
    /// Rescan files whose size or times changed this often (catches what events miss).
    #[serde(default = "default_rescan_interval_ms")]
    pub rescan_interval_ms: u64,
    /// Rehash every page of every file this often (catches writes that leave times alone).
    #[serde(default = "default_deep_rescan_interval_ms")]
    pub deep_rescan_interval_ms: u64,
    /// Bytes of page data sent but not yet acknowledged before the sender waits.
    #[serde(default = "default_window_mb")]
    pub window_mb: u64,
    /// Where the epoch and role are kept across restarts.
    #[serde(default = "default_state_file")]
    pub state_file: PathBuf,
}

fn default_page_size() -> u32 {
    DEFAULT_PAGE_SIZE
}
fn default_rescan_interval_ms() -> u64 {
    DEFAULT_RESCAN_INTERVAL_MS
}
fn default_deep_rescan_interval_ms() -> u64 {
    DEFAULT_DEEP_RESCAN_INTERVAL_MS
}
fn default_window_mb() -> u64 {
    DEFAULT_WINDOW_MB
}
fn default_state_file() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_FILE)
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
    /// SIGTERM, then SIGKILL after this long.
    #[serde(default = "default_stop_timeout_ms")]
    pub stop_timeout_ms: u64,
    /// Instead of `command`: a systemd unit (`corda.service`) the agent starts and stops with
    /// systemctl, for nodes that already have a unit.
    #[serde(default)]
    pub systemd_unit: String,
}

/// `[storage]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `shared` (a network filesystem) or `replicated`.
    #[serde(default)]
    pub mode: Mode,
    /// How the share is mounted (shared mode only; see [`StorageConfig::backend`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    /// What is mounted: `host:/path` for NFS, `//host/share` for SMB, a directory for `bind`.
    #[serde(default)]
    pub source: String,
    /// Where the share is mounted; must be a real directory, not a symlink.
    #[serde(default = "default_mount_point")]
    pub mount_point: PathBuf,
    /// Extra mount options, applied over the backend's defaults.
    #[serde(default)]
    pub options: String,
    /// SMB credentials (`username=`, `password=` lines), mode 0600 and owned by root.
    #[serde(default)]
    pub credentials_file: PathBuf,
    /// Mount attempts before giving up (the first one included).
    #[serde(default = "default_mount_attempts")]
    pub mount_attempts: u32,
    /// Longest pause between two mount attempts.
    #[serde(default = "default_mount_retry_max_ms")]
    pub mount_retry_max_ms: u64,
    /// What systemd allows the whole mount to take (`x-systemd.mount-timeout=`).
    #[serde(default = "default_mount_timeout_s")]
    pub mount_timeout_s: u64,
}

impl StorageConfig {
    /// The backend; in replicated mode, where nothing is mounted, `premounted`.
    pub fn backend(&self) -> Backend {
        self.backend.unwrap_or(Backend::Premounted)
    }
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

/// `[storage] mode`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Both VMs mount one network filesystem.
    #[default]
    Shared,
    /// The hot VM streams the journal to the cold VM's local disk.
    Replicated,
}

/// `[storage] backend`: the kind of share, which fixes the filesystem type, the default mount
/// options and the port the server must answer on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// AWS EFS over NFS 4.1.
    Efs,
    /// Azure Files over SMB 3.
    AzureSmb,
    /// Azure Files over NFS 4.1 (premium shares).
    AzureNfs,
    /// Any NFS 4 server.
    Nfs,
    /// Any SMB/CIFS server.
    Cifs,
    /// A directory bind-mounted onto the mount point (a share mounted elsewhere, or tests).
    Bind,
    /// Something else mounts the share; the agent only uses it.
    Premounted,
}

/// Every backend, in the order the docs list them.
pub const BACKENDS: [Backend; 7] = [
    Backend::Efs,
    Backend::AzureSmb,
    Backend::AzureNfs,
    Backend::Nfs,
    Backend::Cifs,
    Backend::Bind,
    Backend::Premounted,
];

impl Backend {
    /// The name used in the config and in `backend=` mount options.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Efs => "efs",
            Backend::AzureSmb => "azure-smb",
            Backend::AzureNfs => "azure-nfs",
            Backend::Nfs => "nfs",
            Backend::Cifs => "cifs",
            Backend::Bind => "bind",
            Backend::Premounted => "premounted",
        }
    }

    /// Parses a backend name as written in `backend=`.
    pub fn from_name(name: &str) -> Option<Backend> {
        BACKENDS.into_iter().find(|b| b.name() == name)
    }

    /// The kernel filesystem type the backend mounts, `None` for `bind` and `premounted`.
    pub fn fs_type(self) -> Option<&'static str> {
        match self {
            Backend::Efs | Backend::AzureNfs | Backend::Nfs => Some("nfs4"),
            Backend::AzureSmb | Backend::Cifs => Some("cifs"),
            Backend::Bind | Backend::Premounted => None,
        }
    }

    /// The TCP port the server must answer on before a mount is worth trying.
    pub fn server_port(self) -> Option<u16> {
        match self.fs_type() {
            Some("nfs4") => Some(2049),
            Some("cifs") => Some(445),
            _ => None,
        }
    }

    /// The recommended mount options (design-notes.md section 3); user options override them.
    pub fn default_options(self) -> &'static str {
        match self {
            Backend::Efs => {
                "nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport"
            }
            Backend::AzureNfs => "vers=4,minorversion=1,sec=sys,hard,timeo=600,retrans=2",
            Backend::Nfs => "hard,timeo=600,retrans=2",
            Backend::AzureSmb => "vers=3.1.1,serverino,nosharesock,actimeo=30,mfsymlinks",
            Backend::Cifs => "serverino",
            Backend::Bind | Backend::Premounted => "",
        }
    }

    /// Whether the backend talks SMB and so may carry a credentials file.
    pub fn is_smb(self) -> bool {
        self.fs_type() == Some("cifs")
    }

    /// Checks that `source` has the form this backend mounts, returning why not.
    pub fn check_source(self, source: &str) -> Result<(), String> {
        match self {
            Backend::Efs | Backend::AzureNfs | Backend::Nfs => match nfs_host(source) {
                Some(_) => Ok(()),
                None => Err(format!(
                    "`{source}` is not an NFS source: expected `host:/path` (for EFS \
                     `fs-0123abcd.efs.<region>.amazonaws.com:/`)"
                )),
            },
            Backend::AzureSmb | Backend::Cifs => match smb_host(source) {
                Some(_) => Ok(()),
                None => Err(format!(
                    "`{source}` is not an SMB source: expected `//host/share` (for Azure \
                     `//<account>.file.core.windows.net/<share>`)"
                )),
            },
            Backend::Bind => {
                if Path::new(source).is_absolute() {
                    Ok(())
                } else {
                    Err(format!(
                        "`{source}` must be the absolute path of the directory to bind"
                    ))
                }
            }
            Backend::Premounted => Ok(()),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The server host of an NFS source `host:/path` (`[v6addr]:/path` too).
pub fn nfs_host(source: &str) -> Option<&str> {
    let (host, path) = if let Some(rest) = source.strip_prefix('[') {
        let (host, rest) = rest.split_once(']')?;
        (host, rest.strip_prefix(':')?)
    } else {
        source.split_once(':')?
    };
    (!host.is_empty() && path.starts_with('/')).then_some(host)
}

/// The server host of an SMB source `//host/share`.
pub fn smb_host(source: &str) -> Option<&str> {
    let rest = source.strip_prefix("//")?;
    let (host, share) = rest.split_once('/')?;
    (!host.is_empty() && !share.is_empty()).then_some(host)
}

fn default_mount_point() -> PathBuf {
    PathBuf::from(DEFAULT_MOUNT_POINT)
}
fn default_mount_attempts() -> u32 {
    DEFAULT_MOUNT_ATTEMPTS
}
fn default_mount_retry_max_ms() -> u64 {
    DEFAULT_MOUNT_RETRY_MAX_MS
}
fn default_mount_timeout_s() -> u64 {
    DEFAULT_MOUNT_TIMEOUT_S
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

    /// Who this agent is in the lease: `machine_name:base_dir`.
    pub fn holder_id(&self) -> String {
        format!(
            "{}:{}",
            self.lock.machine_name,
            self.node.base_dir.display()
        )
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            reason,
        };
        let s = &self.storage;
        absolute("node.base_dir", &self.node.base_dir).map_err(|r| invalid("node.base_dir", r))?;
        absolute("storage.mount_point", &s.mount_point)
            .map_err(|r| invalid("storage.mount_point", r))?;
        if s.mount_point.is_symlink() {
            return Err(invalid(
                "storage.mount_point",
                format!(
                    "= {:?} is a symlink; systemd cannot mount on a symlink: use the real \
                     directory it points to",
                    s.mount_point
                ),
            ));
        }
        if s.mount_point == self.artemis_link() {
            return Err(invalid(
                "storage.mount_point",
                "must not be base_dir/artemis itself: that path becomes the link to the mount point"
                    .into(),
            ));
        }
        match (s.mode, &self.replication, s.backend) {
            (Mode::Replicated, None, _) => {
                return Err(invalid(
                    "storage.mode",
                    "= \"replicated\" needs a [replication] section".into(),
                ))
            }
            (Mode::Replicated, Some(r), None) => self.validate_replication(path, r)?,
            (Mode::Replicated, Some(_), Some(_)) => {
                return Err(invalid(
                    "storage.backend",
                    "is for mode = \"shared\"; replicated mode mounts nothing".into(),
                ))
            }
            (Mode::Shared, Some(_), _) => {
                return Err(invalid(
                    "replication",
                    "is only used with [storage] mode = \"replicated\"".into(),
                ))
            }
            (Mode::Shared, None, None) => {
                return Err(invalid(
                    "storage.backend",
                    "is required: efs, azure-smb, azure-nfs, nfs, cifs, bind or premounted".into(),
                ))
            }
            (Mode::Shared, None, Some(_)) => {}
        }
        if s.backend() == Backend::Premounted {
            // nothing is mounted, so the source is only documentation
        } else if s.source.is_empty() {
            return Err(invalid(
                "storage.source",
                format!("is required for backend \"{}\"", s.backend()),
            ));
        } else {
            s.backend()
                .check_source(&s.source)
                .map_err(|r| invalid("storage.source", r))?;
        }
        let opts = MountOptions::parse(&s.options)
            .map_err(|e| invalid("storage.options", e.to_string()))?;
        if let Some(key) = RESERVED_OPTIONS
            .iter()
            .find(|k| opts.contains(k))
            .copied()
            .or_else(|| {
                opts.to_string()
                    .split(',')
                    .find(|o| o.starts_with("x-"))
                    .map(|_| "x-*")
            })
        {
            return Err(invalid(
                "storage.options",
                format!("may not set `{key}`: artemis-sync writes it itself from the config (backend, mount_attempts, mount_retry_max_ms, mount_timeout_s)"),
            ));
        }
        check_user_options(s.backend(), &opts).map_err(|r| invalid("storage.options", r))?;
        if s.credentials_file.as_os_str().is_empty() {
            if s.backend() == Backend::AzureSmb {
                return Err(invalid(
                    "storage.credentials_file",
                    "is required for backend \"azure-smb\" (a root-owned 0600 file with \
                     `username=` and `password=` lines)"
                        .into(),
                ));
            }
        } else {
            if !s.backend().is_smb() {
                return Err(invalid(
                    "storage.credentials_file",
                    format!("is only used by the SMB backends, not \"{}\"", s.backend()),
                ));
            }
            check_credentials_file(&s.credentials_file)
                .map_err(|r| invalid("storage.credentials_file", r))?;
        }
        self.validate_lock(path)?;
        if s.mount_attempts == 0 {
            return Err(invalid(
                "storage.mount_attempts",
                "must be at least 1".into(),
            ));
        }
        let budget_ms = backoff::Backoff::new(s.mount_attempts, s.mount_retry_max_ms).total_ms();
        if budget_ms >= s.mount_timeout_s.saturating_mul(1000) {
            return Err(invalid(
                "storage.mount_timeout_s",
                format!(
                    "= {} is shorter than the {} ms of pauses that {} attempts with \
                     mount_retry_max_ms = {} need; raise it or lower the attempts",
                    s.mount_timeout_s, budget_ms, s.mount_attempts, s.mount_retry_max_ms
                ),
            ));
        }
        Ok(())
    }
}

impl Config {
    fn validate_replication(&self, path: &Path, r: &ReplicationConfig) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            reason,
        };
        absolute("replication.data_dir", &r.data_dir)
            .map_err(|e| invalid("replication.data_dir", e))?;
        absolute("replication.state_file", &r.state_file)
            .map_err(|e| invalid("replication.state_file", e))?;
        if r.data_dir == self.artemis_link() {
            return Err(invalid(
                "replication.data_dir",
                "must not be base_dir/artemis itself: that path becomes the link to it".into(),
            ));
        }
        let addr = |key: &'static str, v: &str| {
            v.parse::<std::net::SocketAddr>()
                .map_err(|e| invalid(key, format!("= {v:?} is not an address:port ({e})")))
        };
        let listen = addr("replication.listen", &r.listen)?;
        let peer = addr("replication.peer", &r.peer)?;
        if !r.page_size.is_power_of_two() || !(512..=1 << 20).contains(&r.page_size) {
            return Err(invalid(
                "replication.page_size",
                format!(
                    "= {} must be a power of two from 512 to 1048576",
                    r.page_size
                ),
            ));
        }
        for (key, v) in [
            ("replication.rescan_interval_ms", r.rescan_interval_ms),
            (
                "replication.deep_rescan_interval_ms",
                r.deep_rescan_interval_ms,
            ),
            ("replication.window_mb", r.window_mb),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be above 0".into()));
            }
        }
        let tls = [&r.tls_cert, &r.tls_key, &r.tls_ca]
            .iter()
            .filter(|p| !p.as_os_str().is_empty())
            .count();
        let psk = !r.psk_file.as_os_str().is_empty();
        match (tls, psk, r.insecure_loopback) {
            (3, false, false) => {
                for (key, p) in [("replication.tls_cert", &r.tls_cert), ("replication.tls_key", &r.tls_key), ("replication.tls_ca", &r.tls_ca)] {
                    absolute(key, p).map_err(|e| invalid(key, e))?;
                    if !p.is_file() {
                        return Err(invalid(key, format!("= {p:?} is not a readable file")));
                    }
                }
                check_private_file(&r.tls_key).map_err(|e| invalid("replication.tls_key", e))?;
            }
            (0, true, false) => {
                check_private_file(&r.psk_file).map_err(|e| invalid("replication.psk_file", e))?;
                let text = std::fs::read_to_string(&r.psk_file).map_err(|e| invalid("replication.psk_file", format!("= {:?}: {e}", r.psk_file)))?;
                psk_material(&text).map_err(|e| invalid("replication.psk_file", format!("= {:?} {e}", r.psk_file)))?;
            }
            (0, false, true) => {
                if !listen.ip().is_loopback() || !peer.ip().is_loopback() {
                    return Err(invalid("replication.insecure_loopback", "is allowed only when listen and peer are loopback addresses (127.0.0.0/8, ::1)".into()));
                }
            }
            (1 | 2, _, _) => {
                return Err(invalid("replication.tls_cert", "tls_cert, tls_key and tls_ca go together: set all three".into()))
            }
            (0, false, false) => {
                return Err(invalid("replication", "needs authentication: tls_cert/tls_key/tls_ca (`artemis-sync certs init` makes them) or psk_file".into()))
            }
            _ => {
                return Err(invalid("replication", "set exactly one of: the tls_* keys, psk_file, insecure_loopback".into()))
            }
        }
        Ok(())
    }

    fn validate_lock(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            reason,
        };
        let l = &self.lock;
        absolute("lock.dir", &l.dir).map_err(|r| invalid("lock.dir", r))?;
        absolute("agent.control_socket", &self.agent.control_socket)
            .map_err(|r| invalid("agent.control_socket", r))?;
        if l.machine_name.is_empty() || l.machine_name.contains(char::is_whitespace) {
            return Err(invalid(
                "lock.machine_name",
                format!("= {:?} must be a non-empty name without spaces (the host name has none to offer)", l.machine_name),
            ));
        }
        if l.update_interval_ms == 0 {
            return Err(invalid("lock.update_interval_ms", "must be above 0".into()));
        }
        if l.wait_interval_ms <= l.update_interval_ms {
            return Err(invalid(
                "lock.wait_interval_ms",
                format!(
                    "= {} must exceed update_interval_ms = {} (as Corda's waitInterval must exceed updateInterval)",
                    l.wait_interval_ms, l.update_interval_ms
                ),
            ));
        }
        // The node must be down before a contender may take over: within wait_interval_ms of
        // the start of the last good renewal, less the margin, while leaving room for at least
        // one renewal attempt before that deadline.
        let margin = fence_margin_ms(l.wait_interval_ms);
        let room = l
            .wait_interval_ms
            .saturating_sub(l.update_interval_ms + margin);
        if self.node.stop_timeout_ms >= room {
            return Err(invalid(
                "node.stop_timeout_ms",
                format!(
                    "= {} does not fit: the node must be down within wait_interval_ms = {} of the last renewal; \
                     after update_interval_ms = {} and a margin of {} ms, {} ms remain for stopping it. \
                     Lower stop_timeout_ms or raise wait_interval_ms",
                    self.node.stop_timeout_ms, l.wait_interval_ms, l.update_interval_ms, margin, room
                ),
            ));
        }
        for (key, cmd) in [
            ("node.command", &self.node.command),
            ("node.on_acquire", &self.node.on_acquire),
        ] {
            if cmd.first().is_some_and(|p| p.is_empty()) {
                return Err(invalid(key, "names an empty program".into()));
            }
        }
        Ok(())
    }
}

fn absolute(key: &str, p: &Path) -> Result<(), String> {
    if p.as_os_str().is_empty() {
        Err("is required".into())
    } else if !p.is_absolute() {
        Err(format!("= {p:?} must be an absolute path ({key} is resolved by systemd at boot, with no working directory)"))
    } else {
        Ok(())
    }
}

/// Options the fstab line gets from other config keys, so `[storage] options` may not set them.
const RESERVED_OPTIONS: &[&str] = &[
    "backend",
    "mount_attempts",
    "mount_retry_max_ms",
    "_netdev",
    "nofail",
    "credentials",
];

/// Options an operator may not set, whatever the backend: ones that break locking or would put a
/// secret on a command line.
pub fn check_user_options(backend: Backend, opts: &MountOptions) -> Result<(), String> {
    for secret in ["password", "pass", "password2"] {
        if opts.contains(secret) {
            return Err(format!(
                "`{secret}=` would show the password to every user through ps and \
                 /proc/*/cmdline; put it in a credentials file (`credentials_file`)"
            ));
        }
    }
    if let Some(fs_type) = backend.fs_type() {
        if let Some(h) = mount_options::lock_hazard(fs_type, opts) {
            return Err(format!("`{}`: {}; {}", h.option, h.effect, h.fix));
        }
    }
    Ok(())
}

/// A secret file (key, PSK) must be a regular file that neither group nor others can read.
pub fn check_private_file(path: &Path) -> Result<(), String> {
    absolute("", path)?;
    let meta = std::fs::metadata(path).map_err(|e| format!("= {path:?}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("= {path:?} is not a regular file"));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "= {path:?} has mode {mode:04o}: others can read the secret; fix with `chmod 600 {}`",
            path.display()
        ));
    }
    Ok(())
}

/// A credentials file must exist, be a regular file owned by root, and be readable by nobody else.
pub fn check_credentials_file(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("= {path:?}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("= {path:?} is not a regular file"));
    }
    if meta.uid() != 0 {
        return Err(format!(
            "= {path:?} is owned by uid {}, not root: fix with `chown root:root {}`",
            meta.uid(),
            path.display()
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "= {path:?} has mode {mode:04o}: other users can read the password; fix with `chmod 600 {}`",
            path.display()
        ));
    }
    Ok(())
}

/// The key material in a PSK file's hex text (white space ignored): at least 16 bytes.
pub fn psk_material(text: &str) -> Result<Vec<u8>, String> {
    let hex: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if !hex.len().is_multiple_of(2) || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err("is not hex text".into());
    }
    if hex.len() < 32 {
        return Err(format!(
            "holds {} bytes; at least 16 are needed",
            hex.len() / 2
        ));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("/etc/artemis-sync/agent.toml"), text)
    }

    const EFS: &str = r#"
[node]
base_dir = "/opt/corda"
[storage]
backend = "efs"
source = "fs-0123abcd.efs.eu-west-1.amazonaws.com:/"
"#;

    #[test]
    fn minimal_efs_config_gets_defaults() {
        let c = load(EFS).unwrap();
        assert_eq!(c.storage.mode, Mode::Shared);
        assert_eq!(c.storage.mount_point, Path::new(DEFAULT_MOUNT_POINT));
        assert_eq!(c.storage.mount_attempts, DEFAULT_MOUNT_ATTEMPTS);
        assert_eq!(c.artemis_link(), Path::new("/opt/corda/artemis"));
        // the printed effective config loads back to the same thing
        let again = load(&c.to_toml()).unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = load(&format!("{EFS}mount_pont = \"/x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/artemis-sync/agent.toml"), "{err}");
        assert!(err.contains("mount_pont"), "{err}");
        assert!(err.contains("line 7"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = load(&EFS.replace("[storage]", "[storage]\nmount_attempts = \"many\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 5") && err.contains("invalid type"),
            "{err}"
        );
    }

    #[test]
    fn unknown_backend_lists_the_known_ones() {
        let err = load(&EFS.replace("\"efs\"", "\"gluster\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gluster") && err.contains("azure-smb"),
            "{err}"
        );
    }

    #[test]
    fn relative_paths_are_refused() {
        let err = load(&EFS.replace("/opt/corda", "opt/corda"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`node.base_dir`") && err.contains("absolute"),
            "{err}"
        );
        let err = load(&format!("{EFS}mount_point = \"share\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`storage.mount_point`"), "{err}");
    }

    #[test]
    fn source_must_match_the_backend() {
        let err = load(&EFS.replace("fs-0123abcd.efs.eu-west-1.amazonaws.com:/", "//h/s"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`storage.source`") && err.contains("host:/path"),
            "{err}"
        );
        assert!(nfs_host("[fd00::1]:/export").is_some());
        assert_eq!(
            smb_host("//acct.file.core.windows.net/share"),
            Some("acct.file.core.windows.net")
        );
        assert!(smb_host("//host").is_none());
    }

    #[test]
    fn lock_breaking_and_secret_options_are_refused() {
        let err = load(&format!("{EFS}options = \"nolock\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`storage.options`") && err.contains("nolock"),
            "{err}"
        );
        let err = load(&format!("{EFS}options = \"a=b=c\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("may not contain `=`"), "{err}");
        let smb = EFS
            .replace("\"efs\"", "\"cifs\"")
            .replace("fs-0123abcd.efs.eu-west-1.amazonaws.com:/", "//srv/share");
        let err = load(&format!("{smb}options = \"username=u,password=hunter2\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("credentials file"), "{err}");
    }

    #[test]
    fn options_may_not_override_what_the_config_writes() {
        for opts in [
            "backend=nfs",
            "mount_attempts=100",
            "x-systemd.mount-timeout=5",
            "credentials=/x",
        ] {
            let err = load(&format!("{EFS}options = \"{opts}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("`storage.options` may not set"),
                "{opts}: {err}"
            );
        }
    }

    #[test]
    fn azure_smb_needs_a_private_root_owned_credentials_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cred = dir.path().join("azure.cred");
        std::fs::write(&cred, "username=acct\npassword=secret\n").unwrap();
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o644)).unwrap();
        let smb = EFS.replace("\"efs\"", "\"azure-smb\"").replace(
            "fs-0123abcd.efs.eu-west-1.amazonaws.com:/",
            "//acct.file.core.windows.net/corda",
        );
        let err = load(&smb).unwrap_err().to_string();
        assert!(
            err.contains("`storage.credentials_file` is required"),
            "{err}"
        );
        let with = format!("{smb}credentials_file = {:?}\n", cred);
        let err = load(&with).unwrap_err().to_string();
        if unsafe_is_root() {
            assert!(
                err.contains("mode 0644") && err.contains("chmod 600"),
                "{err}"
            );
            std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).unwrap();
            load(&with).unwrap();
        } else {
            assert!(err.contains("not root"), "{err}");
        }
    }

    fn unsafe_is_root() -> bool {
        crate::sys::is_root()
    }

    #[test]
    fn mount_point_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("share");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = load(&format!("{EFS}mount_point = {link:?}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a symlink"), "{err}");
    }

    #[test]
    fn timeout_must_cover_the_retries() {
        let err = load(&format!("{EFS}mount_attempts = 20\nmount_timeout_s = 10\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`storage.mount_timeout_s`"), "{err}");
    }

    #[test]
    fn lock_defaults_derive_from_the_mount_point_and_host() {
        let c = load(EFS).unwrap();
        assert_eq!(
            c.lock.dir,
            Path::new("/var/lib/artemis-sync/share/.artemis-sync")
        );
        assert_eq!(c.lock.machine_name, host_name());
        assert_eq!(c.holder_id(), format!("{}:/opt/corda", host_name()));
        assert_eq!(
            (c.lock.update_interval_ms, c.lock.wait_interval_ms),
            (20_000, 40_000)
        );
    }

    #[test]
    fn intervals_and_stop_timeout_must_fit() {
        let err = load(&format!(
            "{EFS}[lock]\nupdate_interval_ms = 5000\nwait_interval_ms = 5000\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`lock.wait_interval_ms`") && err.contains("must exceed"),
            "{err}"
        );
        // 40000 - 20000 - 4000 leaves 16000 ms: 15000 fits, 16000 does not
        let with = |stop: u64| EFS.replace("[node]", &format!("[node]\nstop_timeout_ms = {stop}"));
        load(&with(15_000)).unwrap();
        let err = load(&with(16_000)).unwrap_err().to_string();
        assert!(
            err.contains("`node.stop_timeout_ms`") && err.contains("16000 ms remain"),
            "{err}"
        );
    }

    #[test]
    fn replicated_mode_needs_its_section_and_authentication() {
        let err = load(&EFS.replace("[storage]", "[storage]\nmode = \"replicated\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`storage.mode`") && err.contains("[replication]"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let psk = dir.path().join("psk");
        std::fs::write(
            &psk,
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).unwrap();
        let base = "[node]\nbase_dir = \"/opt/corda\"\n[storage]\nmode = \"replicated\"\n[replication]\nrole = \"hot\"\n\
                    data_dir = \"/var/lib/artemis-sync/artemis\"\nlisten = \"127.0.0.1:7410\"\npeer = \"127.0.0.2:7410\"\n";
        let err = load(base).unwrap_err().to_string();
        assert!(err.contains("needs authentication"), "{err}");
        let c = load(&format!("{base}psk_file = {psk:?}\n")).unwrap();
        assert_eq!(c.storage.backend(), Backend::Premounted);
        assert_eq!(c.replication.as_ref().unwrap().page_size, 4096);
        load(&c.to_toml()).unwrap();
        std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(&format!("{base}psk_file = {psk:?}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`replication.psk_file`") && err.contains("chmod 600"),
            "{err}"
        );
        load(&format!("{base}insecure_loopback = true\n")).unwrap();
        let err = load(&format!(
            "{}insecure_loopback = true\n",
            base.replace("127.0.0.2", "10.0.0.2")
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("`replication.insecure_loopback`"), "{err}");
        let err = load(&format!(
            "{base}insecure_loopback = true\npage_size = 1000\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("`replication.page_size`"), "{err}");
        let err = load(
            &format!("{base}insecure_loopback = true\n")
                .replace("[storage]\n", "[storage]\nbackend = \"efs\"\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`storage.backend`"), "{err}");
    }
}
