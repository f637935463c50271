//! `[replication]`: the hot -> cold stream of replicated mode (addresses, page size, rescan
//! periods, window), how the pair authenticates (mutual TLS, a pre-shared key, or plaintext on
//! loopback only), and the checks of those keys on load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::validate::{
    absolute, check_private_file, invalid_in, not_inside_link, not_over_base_dir, MOUNT_HIDES,
};
use crate::config::{
    Config, ConfigError, DEFAULT_DEEP_RESCAN_INTERVAL_MS, DEFAULT_FUSE_MOUNT_POINT,
    DEFAULT_PAGE_SIZE, DEFAULT_PEER_TIMEOUT_MS, DEFAULT_RESCAN_INTERVAL_MS, DEFAULT_STATE_FILE,
    DEFAULT_WINDOW_MB,
};

/// The smallest `page_size`, in bytes.
const MIN_PAGE_SIZE_BYTES: u32 = 512;
/// The largest `page_size`, in bytes.
const MAX_PAGE_SIZE_BYTES: u32 = 1 << 20;
/// The shortest pre-shared key, in bytes.
const MIN_PSK_BYTES: usize = 16;

/// Which side of the stream this host starts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplRole {
    /// Runs the node and streams its journal.
    Hot,
    /// Receives the stream.
    Cold,
}

/// How the hot side sees what the node changes in `data_dir`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capture {
    /// inotify on `data_dir` plus rescans: misses native AIO on `O_DIRECT` files and stores
    /// through a shared mmap until the next rescan. The fallback where FUSE is unavailable.
    Watch,
    /// A FUSE passthrough of `data_dir` served at `mount_point`: every write is seen at the
    /// call (the default).
    #[default]
    Fuse,
}

/// When a sync (fsync of a file or a directory, fdatasync, msync, an `O_DSYNC` write) through
/// the FUSE mount returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ack {
    /// Once the local disk has it; the cold side follows within the lag.
    #[default]
    Async,
    /// Once the cold side has also fsynced everything before it (RPO 0).
    Durable,
}

/// What a durable sync does when the cold side does not answer within `peer_timeout_ms`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerLoss {
    /// Go on as async (said in the log and `status`) until the cold side is back and synced.
    #[default]
    Degrade,
    /// Wait for the cold side, however long (RPO 0 over availability).
    Block,
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
    /// How the hot side captures changes: `"fuse"` (the default: on the write path) or
    /// `"watch"` (inotify and rescans).
    #[serde(default)]
    pub capture: Capture,
    /// With `capture = "fuse"`: where the hot side serves `data_dir`; `${BASE_DIR}/artemis`
    /// links here instead of to `data_dir`. Default `/var/lib/artemis-sync/journal`.
    #[serde(default = "default_fuse_mount_point")]
    pub mount_point: PathBuf,
    /// With `capture = "fuse"`: `"async"` or `"durable"` (a sync waits for the cold side).
    #[serde(default)]
    pub ack: Ack,
    /// Durable: how long a sync waits for the cold side before `on_peer_loss` applies.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
    /// Durable: `"degrade"` (go on as async after `peer_timeout_ms`) or `"block"`.
    #[serde(default)]
    pub on_peer_loss: PeerLoss,
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
fn default_peer_timeout_ms() -> u64 {
    DEFAULT_PEER_TIMEOUT_MS
}
fn default_fuse_mount_point() -> PathBuf {
    PathBuf::from(DEFAULT_FUSE_MOUNT_POINT)
}
fn default_state_file() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_FILE)
}

/// The key material in a PSK file's hex text (white space ignored): at least 16 bytes.
pub fn psk_material(text: &str) -> Result<Vec<u8>, String> {
    let hex: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if !hex.len().is_multiple_of(2) || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err("is not hex text".into());
    }
    if hex.len() < 2 * MIN_PSK_BYTES {
        return Err(format!(
            "holds {} bytes; at least {MIN_PSK_BYTES} are needed",
            hex.len() / 2
        ));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

impl Config {
    /// The checks of `[replication]` (mode = "replicated"): paths, addresses, sizes, then
    /// authentication.
    pub(super) fn validate_replication(
        &self,
        path: &Path,
        r: &ReplicationConfig,
    ) -> Result<(), ConfigError> {
        let invalid = invalid_in(path);
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
        not_inside_link(&r.data_dir, &self.artemis_link())
            .map_err(|e| invalid("replication.data_dir", e))?;
        not_over_base_dir(
            &r.data_dir,
            &self.node.base_dir,
            "the cold side makes data_dir an exact copy of the hot side's and would remove the \
             node's own files from it",
        )
        .map_err(|e| invalid("replication.data_dir", e))?;
        let addr = |key: &'static str, v: &str| {
            v.parse::<SocketAddr>()
                .map_err(|e| invalid(key, format!("= {v:?} is not an address:port ({e})")))
        };
        let listen = addr("replication.listen", &r.listen)?;
        let peer = addr("replication.peer", &r.peer)?;
        if !r.page_size.is_power_of_two()
            || !(MIN_PAGE_SIZE_BYTES..=MAX_PAGE_SIZE_BYTES).contains(&r.page_size)
        {
            return Err(invalid(
                "replication.page_size",
                format!(
                    "= {} must be a power of two from {MIN_PAGE_SIZE_BYTES} to {MAX_PAGE_SIZE_BYTES}",
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
            ("replication.peer_timeout_ms", r.peer_timeout_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be above 0".into()));
            }
        }
        self.validate_capture(path, r)?;
        validate_authentication(path, r, listen, peer)
    }

    /// `capture = "fuse"` needs an absolute `mount_point` apart from `data_dir` (neither
    /// inside the other: the mount would serve itself) and from the link; `"watch"` takes none
    /// but the default.
    fn validate_capture(&self, path: &Path, r: &ReplicationConfig) -> Result<(), ConfigError> {
        let invalid = invalid_in(path);
        let key = "replication.mount_point";
        let mp = &r.mount_point;
        if r.ack == Ack::Durable && r.capture != Capture::Fuse {
            return Err(invalid(
                "replication.ack",
                "= \"durable\" needs capture = \"fuse\": only the FUSE mount sees the node's syncs"
                    .into(),
            ));
        }
        match r.capture {
            Capture::Watch if mp.as_os_str().is_empty() || *mp == default_fuse_mount_point() => {
                Ok(())
            }
            Capture::Watch => Err(invalid(
                key,
                "is used only with capture = \"fuse\" (remove it, or set capture = \"fuse\")"
                    .into(),
            )),
            Capture::Fuse if mp.as_os_str().is_empty() => Err(invalid(
                key,
                "is required with capture = \"fuse\": the directory where the hot host serves \
                 data_dir (e.g. \"/var/lib/artemis-sync/journal\")"
                    .into(),
            )),
            Capture::Fuse => {
                absolute(key, mp).map_err(|e| invalid(key, e))?;
                if mp.starts_with(&r.data_dir) || r.data_dir.starts_with(mp) {
                    return Err(invalid(
                        key,
                        format!(
                            "= {mp:?} must be apart from data_dir {:?} (neither inside the other)",
                            r.data_dir
                        ),
                    ));
                }
                if *mp == self.artemis_link() {
                    return Err(invalid(
                        key,
                        "must not be base_dir/artemis itself: that path becomes the link to it"
                            .into(),
                    ));
                }
                not_inside_link(mp, &self.artemis_link()).map_err(|e| invalid(key, e))?;
                not_over_base_dir(mp, &self.node.base_dir, MOUNT_HIDES).map_err(|e| invalid(key, e))
            }
        }
    }
}

/// Exactly one way to authenticate the pair, and its files usable: the three TLS files (the
/// key private), or a private PSK file holding enough key, or plaintext between loopback
/// addresses.
fn validate_authentication(
    path: &Path,
    r: &ReplicationConfig,
    listen: SocketAddr,
    peer: SocketAddr,
) -> Result<(), ConfigError> {
    let invalid = invalid_in(path);
    let tls = [&r.tls_cert, &r.tls_key, &r.tls_ca]
        .iter()
        .filter(|p| !p.as_os_str().is_empty())
        .count();
    let psk = !r.psk_file.as_os_str().is_empty();
    match (tls, psk, r.insecure_loopback) {
        (3, false, false) => {
            for (key, p) in [
                ("replication.tls_cert", &r.tls_cert),
                ("replication.tls_key", &r.tls_key),
                ("replication.tls_ca", &r.tls_ca),
            ] {
                absolute(key, p).map_err(|e| invalid(key, e))?;
                if !p.is_file() {
                    return Err(invalid(key, format!("= {p:?} is not a readable file")));
                }
            }
            check_private_file(&r.tls_key).map_err(|e| invalid("replication.tls_key", e))?;
        }
        (0, true, false) => {
            let key = "replication.psk_file";
            check_private_file(&r.psk_file).map_err(|e| invalid(key, e))?;
            let text = std::fs::read_to_string(&r.psk_file)
                .map_err(|e| invalid(key, format!("= {:?}: {e}", r.psk_file)))?;
            psk_material(&text).map_err(|e| invalid(key, format!("= {:?} {e}", r.psk_file)))?;
        }
        (0, false, true) => {
            if !listen.ip().is_loopback() || !peer.ip().is_loopback() {
                return Err(invalid(
                    "replication.insecure_loopback",
                    "is allowed only when listen and peer are loopback addresses \
                     (127.0.0.0/8, ::1)"
                        .into(),
                ));
            }
        }
        (1 | 2, _, _) => {
            return Err(invalid(
                "replication.tls_cert",
                "tls_cert, tls_key and tls_ca go together: set all three".into(),
            ))
        }
        (0, false, false) => {
            return Err(invalid(
                "replication",
                "needs authentication: tls_cert/tls_key/tls_ca (`artemis-sync certs init` \
                 makes them) or psk_file"
                    .into(),
            ))
        }
        _ => {
            return Err(invalid(
                "replication",
                "set exactly one of: the tls_* keys, psk_file, insecure_loopback".into(),
            ))
        }
    }
    Ok(())
}
