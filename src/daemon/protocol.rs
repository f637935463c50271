//! The control protocol: what `artemis-sync status`, `release`, `promote`, `demote`, `verify`
//! and `resume` send to the running agent of either mode, and what it answers, as serde types.
//!
//! On the socket ([`super::control`]) every message is one line of JSON carrying the protocol
//! version: a request `{"v":1,"request":"promote","force":true}`, an answer
//! `{"v":1,"ok":{"reply":"promoted",...}}` or `{"v":1,"error":"..."}`. A message of another
//! version, or a request this side does not know, is refused with an error naming it. Both
//! agents decode the same [`Request`]; a request the running mode has no use for (`release` in
//! replicated mode, `promote` in shared mode) is answered with an error saying so.
//!
//! The types the agents report (their status, the outcome of a promotion) are defined here, not
//! in the mode folders, so that the client and both agents share one definition and `daemon`
//! imports neither mode.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{Config, ReplRole};

mod node_health;
mod sync_progress;

pub use node_health::{GaveUp, HealthState, NodeHealth};
pub use sync_progress::{human_bytes, SyncDone, SyncPhase, SyncProgress};

/// The version every message carries as `"v"`.
pub const PROTOCOL_VERSION: u64 = 1;
/// How long the client waits for a `status` answer (and the base of the other waits).
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `demote` waits for the cold side to acknowledge everything.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `verify` may take.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the client waits for `promote` (linking, starting the node and its hook).
pub const PROMOTE_TIMEOUT: Duration = Duration::from_secs(120);

/// The names [`Request`] accepts, for the error that names an unknown one.
const REQUEST_NAMES: [&str; 6] = ["status", "release", "promote", "demote", "verify", "resume"];

/// Errors decoding a control message, naming what was wrong with it.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ProtocolError {
    /// not a control protocol message (one JSON object per line expected): {0:?}
    NotJson(String),
    /// the message {0:?} carries no protocol version ("v"); this side speaks version 1
    NoVersion(String),
    /// control protocol version {0} is not supported: this side speaks version 1 (are the client and the agent the same artemis-sync version?)
    Version(Value),
    /// unknown request {0} (expected one of: status, release, promote, demote, verify, resume)
    UnknownRequest(Value),
    /// malformed {what} {line:?}: {reason}
    Malformed {
        what: &'static str,
        line: String,
        reason: String,
    },
}

/// What a client asks the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Both modes: what the agent is doing ([`AgentStatus`]).
    Status,
    /// Shared mode: stop the node and give the lease up ([`Released`]).
    Release,
    /// Replicated mode, on the cold host: become hot at a new epoch ([`Promoted`]).
    Promote {
        /// Even though the hot side still streams.
        force: bool,
    },
    /// Replicated mode, on the hot host: stop the node, drain, turn cold ([`Demoted`]).
    Demote {
        /// Even if the stream cannot be drained.
        force: bool,
    },
    /// Replicated mode, on the hot host: compare both copies ([`Verified`]).
    Verify,
    /// Both modes: forget the node health watchdog's give-up and contend again ([`Resumed`]).
    Resume,
}

impl Request {
    /// The request's name on the wire and in messages.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Release => "release",
            Request::Promote { .. } => "promote",
            Request::Demote { .. } => "demote",
            Request::Verify => "verify",
            Request::Resume => "resume",
        }
    }

    /// How long a client waits for the answer: long enough for what the agent does first
    /// (stopping the node, waiting for the share, draining, comparing the copies).
    pub fn reply_timeout(&self, config: &Config) -> Duration {
        match self {
            Request::Status | Request::Resume => STATUS_TIMEOUT,
            Request::Release => {
                Duration::from_millis(
                    config
                        .node
                        .stop_timeout_ms
                        .saturating_add(config.lock.wait_interval_ms),
                ) + STATUS_TIMEOUT
            }
            Request::Promote { .. } => PROMOTE_TIMEOUT,
            Request::Demote { .. } => DRAIN_TIMEOUT + STATUS_TIMEOUT,
            // the agent's own limit, and time for its answer to arrive
            Request::Verify => VERIFY_TIMEOUT + STATUS_TIMEOUT,
        }
    }

    /// The refusal of a request that the agent's mode does not serve.
    pub fn not_in_mode(&self, mode: &str, hint: &str) -> String {
        format!("`{}` is not served in {mode} mode: {hint}", self.name())
    }
}

/// What the agent answers to a [`Request`] it carried out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// To [`Request::Status`].
    Status(AgentStatus),
    /// To [`Request::Release`].
    Released(Released),
    /// To [`Request::Promote`].
    Promoted(Promoted),
    /// To [`Request::Demote`].
    Demoted(Demoted),
    /// To [`Request::Verify`].
    Verified(Verified),
    /// To [`Request::Resume`].
    Resumed(Resumed),
}

impl Reply {
    /// The reply's name, for the error about an answer that does not fit the request.
    pub fn name(&self) -> &'static str {
        match self {
            Reply::Status(_) => "status",
            Reply::Released(_) => "released",
            Reply::Promoted(_) => "promoted",
            Reply::Demoted(_) => "demoted",
            Reply::Verified(_) => "verified",
            Reply::Resumed(_) => "resumed",
        }
    }
}

/// The status of a running agent, by mode (`"mode"` in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum AgentStatus {
    /// The agent of shared-storage mode.
    Shared(Box<SharedStatus>),
    /// The agent of replicated mode.
    Replicated(Box<ReplicatedStatus>),
}

/// What the shared-mode agent is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseRole {
    /// Waiting: another VM holds the lease, or it is not stale yet.
    Cold,
    /// Took the lease, preparing the share and starting the node.
    Starting,
    /// Holds the lease; the node runs.
    Hot,
    /// Lost the lease and stopped its node; waiting before contending again.
    Fenced,
    /// Giving the lease up.
    Stopping,
}

impl fmt::Display for LeaseRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LeaseRole::Cold => "cold",
            LeaseRole::Starting => "starting",
            LeaseRole::Hot => "hot",
            LeaseRole::Fenced => "fenced",
            LeaseRole::Stopping => "stopping",
        })
    }
}

/// The lease record's state as the agent last read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObservedLeaseState {
    /// Held and renewed.
    Held,
    /// Given up cleanly.
    Released,
}

/// Whether the supervised node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Started by this agent and not exited.
    Running,
    /// Not running.
    Stopped,
    /// No `[node] command` or `systemd_unit` is configured.
    None,
}

/// The answer to `status` in shared mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedStatus {
    /// What the agent is doing.
    pub role: LeaseRole,
    /// This agent's holder id.
    pub holder: String,
    /// The holder the lease names, if it could be read.
    pub lease_holder: Option<String>,
    /// The lease's epoch, if it could be read.
    pub epoch: Option<u64>,
    /// `held` or `released`, if the lease could be read.
    pub lease_state: Option<ObservedLeaseState>,
    /// Hot: since the start of our last good renewal. Otherwise: since the lease last changed
    /// as this agent saw it.
    pub last_renewal_age_ms: u64,
    /// Whether this agent holds the lock file's lock.
    pub lock_held: bool,
    /// The node's pid, while it runs.
    pub node_pid: Option<u32>,
    /// Whether the node runs.
    pub node_state: NodeState,
    /// The last problem seen with the share or the lease, if any.
    pub error: Option<String>,
    /// The node health watchdog.
    #[serde(default)]
    pub node_health: NodeHealth,
    /// `[lock] wait_interval_ms`: a hot whose last renewal is older is not healthy.
    #[serde(default)]
    pub wait_interval_ms: u64,
    /// The metrics endpoint cannot bind its address (it retries), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_error: Option<String>,
}

/// The answer to `status` in replicated mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicatedStatus {
    /// Hot or cold.
    pub role: ReplRole,
    /// The highest epoch this host has held or accepted.
    pub epoch: u64,
    /// This agent's holder id.
    pub holder: String,
    /// The data directory (canonical).
    pub data_dir: String,
    /// The address the agent's listener is bound to (`[replication] listen`, or the socket
    /// handed over by its parent).
    pub listen: String,
    /// The peer: the connected hot side's address on a cold host, else `[replication] peer`.
    pub peer: String,
    /// Whether a stream is connected.
    pub connected: bool,
    /// Hot: the cold side has everything seen so far (first comparison done, all acknowledged).
    pub synced: Option<bool>,
    /// Since the last acknowledgement, if there was one.
    pub last_ack_age_ms: Option<u64>,
    /// Cold: whether the hot side drained its stream before it left.
    pub drained: Option<bool>,
    /// Bytes on the wire (hot: sent; cold: received).
    pub wire_bytes: u64,
    /// Cold: bytes it sent back (index, acknowledgements).
    pub wire_out_bytes: Option<u64>,
    /// Bytes of pages (hot: sent; cold: applied).
    pub data_bytes: u64,
    /// Batches (hot: sent; cold: applied).
    pub batches: u64,
    /// The node's pid, while it runs.
    pub node_pid: Option<u32>,
    /// Whether the node runs.
    pub node_state: NodeState,
    /// Hot but the node may not run yet: what it waits for (the peer's confirmation that no
    /// newer epoch exists, after a restart), and the override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// Hot: an inotify limit keeps some directories unwatched (changes there wait for the
    /// periodic rescan), with the sysctl to raise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch_limit: Option<String>,
    /// Hot with durable acks: since when syncs no longer wait for the cold side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
    /// With `[lease] backend = "postgres"`: the lease as this host sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Box<ReplicatedLease>>,
    /// Hot with durable acks and `on_peer_loss = "block"`: a sync has waited for the cold
    /// side longer than `peer_timeout_ms`, since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
    /// Cold: the hot side's sync state at its last heartbeat (in sync, degraded, async and
    /// how far behind), and how long ago that was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_sync: Option<String>,
    /// How far behind the cold copy is, in ms: hot, the age of the oldest batch sent and not
    /// yet acknowledged (0: none); cold, what the hot's last heartbeat said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_ms: Option<u64>,
    /// Hot: bytes sent and not yet acknowledged (the window in use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unacked_bytes: Option<u64>,
    /// Hot: the initial sync or resync in progress; absent once the cold copy caught up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_progress: Option<SyncProgress>,
    /// Hot: this connection's initial sync or resync, once finished (the copy caught up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_done: Option<SyncDone>,
    /// Hot: connections to the cold side made again after one was lost.
    #[serde(default)]
    pub reconnects: u64,
    /// Hot: batches resent after the cold side rejected them.
    #[serde(default)]
    pub resends: u64,
    /// Cold: batches rejected for a bad page checksum.
    #[serde(default)]
    pub checksum_failures: u64,
    /// Cold: batches could not be applied since when, and the latest reason (the op, the
    /// file and the errno: a full, read-only or failing disk); cleared once one applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_error: Option<String>,
    /// Cold: batches that could not be applied since the agent started (each one is
    /// answered `Nack` and resynced).
    #[serde(default)]
    pub apply_failures: u64,
    /// The metrics endpoint cannot bind its address (it retries), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_error: Option<String>,
    /// The last problem seen, if any.
    pub error: Option<String>,
    /// The node health watchdog.
    #[serde(default)]
    pub node_health: NodeHealth,
}

/// The database lease in replicated mode, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicatedLease {
    /// This host's part in the contention.
    pub role: LeaseRole,
    /// Who the row names, and under which epoch (`None`: no row, or not read).
    pub holder: Option<String>,
    pub epoch: Option<u64>,
    /// Whether the row is released.
    pub released: Option<bool>,
    /// How far behind the hot's last report has the cold copy (0: in sync); `None`: unknown.
    pub cold_lag_ms: Option<u64>,
    /// Hot: since the last good renewal; cold: since the row last changed.
    pub age_ms: u64,
    /// Why this host did not take over a lease it could have taken.
    pub not_taking_over: Option<String>,
    /// `[lock] wait_interval_ms`: a hot whose last renewal is older is not healthy.
    #[serde(default)]
    pub wait_interval_ms: u64,
}

/// The answer to `release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    /// The epoch given up; `None` when the agent held no lease.
    pub epoch: Option<u64>,
    /// The agent's role when the request came (when it held nothing).
    pub role: LeaseRole,
    /// How long the agent now stays out of the contention.
    pub holdoff_ms: u64,
}

impl fmt::Display for Released {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.epoch {
            Some(epoch) => writeln!(
                f,
                "released epoch {epoch}; not contending for {} ms",
                self.holdoff_ms
            ),
            None => writeln!(f, "nothing to release: this agent is {}", self.role),
        }
    }
}

/// The answer to `resume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    /// What the watchdog had given up for; `None`: it had not given up.
    pub gave_up: Option<String>,
}

impl fmt::Display for Resumed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.gave_up {
            Some(why) => writeln!(
                f,
                "resumed: the node health watchdog's give-up is forgotten and this VM contends again (it had given up: {why})"
            ),
            None => writeln!(f, "nothing to resume: the node health watchdog has not given up"),
        }
    }
}

/// The answer to `promote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promoted {
    /// The new epoch.
    pub epoch: u64,
    /// Whether `--force` overrode a streaming hot side.
    pub forced: bool,
    /// Whether the old hot drained its stream before it left.
    pub drained: bool,
    /// How far behind the copy may be.
    pub behind: String,
    /// What `drained` means for the copy.
    pub summary: String,
    /// What the copy may lack: RPO 0 (drained, or durable and in sync when the hot went
    /// silent) or how far behind it may be (degraded, async).
    #[serde(default)]
    pub rpo: String,
}

impl fmt::Display for Promoted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "promoted: hot at epoch {}", self.epoch)?;
        writeln!(f, "{}", self.behind)?;
        writeln!(f, "{}", self.summary)?;
        if !self.rpo.is_empty() {
            writeln!(f, "{}", self.rpo)?;
        }
        Ok(())
    }
}

/// The answer to `demote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demoted {
    /// The epoch, unchanged.
    pub epoch: u64,
    /// Whether the cold side acknowledged everything.
    pub drained: bool,
    /// The last batch acknowledged, when drained.
    pub last_seq: Option<u64>,
}

impl fmt::Display for Demoted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.drained, self.last_seq) {
            (true, Some(seq)) => writeln!(
                f,
                "demoted: cold at epoch {}; the cold copy has everything (through batch {seq})",
                self.epoch
            ),
            _ => writeln!(
                f,
                "demoted (forced): cold at epoch {}; the stream was NOT drained, the other copy may be behind",
                self.epoch
            ),
        }
    }
}

/// The answer to `verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    /// Whether the trees are identical.
    pub identical: bool,
    /// The hot tree's root digest (hex).
    pub hot_root: String,
    /// The cold tree's root digest (hex).
    pub cold_root: String,
    /// Files in the trees.
    pub files: u64,
    /// Files that differ or exist on one side only.
    pub differing: Vec<String>,
}

impl fmt::Display for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "hot  {}", self.hot_root)?;
        writeln!(f, "cold {}", self.cold_root)?;
        if self.identical {
            writeln!(f, "identical: {} files", self.files)
        } else {
            self.differing
                .iter()
                .try_for_each(|d| writeln!(f, "differs: {d}"))
        }
    }
}

/// Writes `value` (a struct) as aligned `key value` lines, `-` for a missing value: the text
/// form of `status`.
pub fn write_fields(f: &mut fmt::Formatter<'_>, value: &impl Serialize) -> fmt::Result {
    let Ok(Value::Object(map)) = serde_json::to_value(value) else {
        return Ok(());
    };
    for (key, val) in map {
        let text = match val {
            Value::Null => "-".to_owned(),
            // one line: state, failures, restarts, give-up, last probe error
            other if key == "node_health" => as_text::<NodeHealth>(other),
            other if key == "sync_progress" => as_text::<SyncProgress>(other),
            other if key == "sync_done" => as_text::<SyncDone>(other),
            Value::String(s) => s,
            other => other.to_string(),
        };
        writeln!(f, "{key:<20} {text}")?;
    }
    Ok(())
}

/// A field that has its own one-line text.
fn as_text<T: serde::de::DeserializeOwned + fmt::Display>(v: Value) -> String {
    serde_json::from_value::<T>(v).map_or_else(|e| format!("? ({e})"), |t| t.to_string())
}

impl fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_fields(f, self)
    }
}

/// One request as a line (without the newline).
pub fn encode_request(request: &Request) -> String {
    envelope(serde_json::to_value(request).expect("a request serializes"))
}

/// An answer as a line (without the newline).
pub fn encode_answer(answer: &Result<Reply, String>) -> String {
    let mut map = Map::new();
    match answer {
        Ok(reply) => map.insert(
            "ok".into(),
            serde_json::to_value(reply).expect("a reply serializes"),
        ),
        Err(message) => map.insert("error".into(), Value::String(message.clone())),
    };
    envelope(Value::Object(map))
}

/// Decodes a request line; the error names an unknown version or request.
pub fn decode_request(line: &str) -> Result<Request, ProtocolError> {
    let body = open_envelope(line)?;
    match body.get("request") {
        Some(Value::String(name)) if REQUEST_NAMES.contains(&name.as_str()) => {}
        Some(other) => return Err(ProtocolError::UnknownRequest(other.clone())),
        None => return Err(malformed("request", line, "no \"request\" field")),
    }
    serde_json::from_value(Value::Object(body)).map_err(|e| malformed("request", line, e))
}

/// Decodes an answer line: `Ok(Ok(reply))`, or `Ok(Err(message))` when the agent refused.
pub fn decode_answer(line: &str) -> Result<Result<Reply, String>, ProtocolError> {
    let mut body = open_envelope(line)?;
    if let Some(reply) = body.remove("ok") {
        return serde_json::from_value(reply)
            .map(Ok)
            .map_err(|e| malformed("answer", line, e));
    }
    match body.remove("error") {
        Some(Value::String(message)) => Ok(Err(message)),
        _ => Err(malformed("answer", line, "neither \"ok\" nor \"error\"")),
    }
}

fn envelope(body: Value) -> String {
    let mut map = match body {
        Value::Object(map) => map,
        other => Map::from_iter([("body".to_owned(), other)]),
    };
    map.insert("v".into(), Value::from(PROTOCOL_VERSION));
    Value::Object(map).to_string()
}

/// Checks the version and returns the message without it.
fn open_envelope(line: &str) -> Result<Map<String, Value>, ProtocolError> {
    let Ok(Value::Object(mut map)) = serde_json::from_str::<Value>(line) else {
        return Err(ProtocolError::NotJson(line.to_owned()));
    };
    match map.remove("v") {
        Some(v) if v.as_u64() == Some(PROTOCOL_VERSION) => Ok(map),
        Some(v) => Err(ProtocolError::Version(v)),
        None => Err(ProtocolError::NoVersion(line.to_owned())),
    }
}

fn malformed(what: &'static str, line: &str, reason: impl fmt::Display) -> ProtocolError {
    ProtocolError::Malformed {
        what,
        line: line.to_owned(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests;
