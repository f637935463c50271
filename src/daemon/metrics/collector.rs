//! The state metrics, made at scrape time from one status snapshot: the agent's role, epoch,
//! lease age, node, and in replicated mode the stream's connection, sync state, lag and
//! totals. Made from the very status `artemis-sync status` shows, they cannot disagree with
//! it. prometheus-client's [`Collector`] with const gauges and counters: nothing is kept
//! between scrapes.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use super::{health_verdict, role_name};
use crate::daemon::protocol::{
    AgentStatus, NodeHealth, NodeState, ReplicatedStatus, SharedStatus, SyncProgress,
};

/// Every role an agent can report, shared mode's and replicated mode's (`hot`, `cold`).
const ROLES: [&str; 5] = ["cold", "starting", "hot", "fenced", "stopping"];
/// Milliseconds in a second, for the `_seconds` metrics.
const MS_PER_S: f64 = 1000.0;

/// The state metrics of one status snapshot.
#[derive(Debug)]
pub struct StatusCollector {
    status: AgentStatus,
}

impl StatusCollector {
    /// Metrics for `status`.
    pub fn new(status: AgentStatus) -> StatusCollector {
        StatusCollector { status }
    }
}

/// Writes one metric family after another into the scrape.
struct Out<'a> {
    enc: DescriptorEncoder<'a>,
}

impl Out<'_> {
    fn gauge(&mut self, name: &str, help: &str, unit: Option<Unit>, v: impl Into<f64>) -> Fmt {
        let g = ConstGauge::new(v.into());
        let m = self
            .enc
            .encode_descriptor(name, help, unit.as_ref(), g.metric_type())?;
        g.encode(m)
    }

    fn flag(&mut self, name: &str, help: &str, v: bool) -> Fmt {
        self.int(name, help, i64::from(v))
    }

    fn int(&mut self, name: &str, help: &str, v: i64) -> Fmt {
        let g = ConstGauge::new(v);
        let m = self
            .enc
            .encode_descriptor(name, help, None, g.metric_type())?;
        g.encode(m)
    }

    fn seconds_ms(&mut self, name: &str, help: &str, ms: u64) -> Fmt {
        self.gauge(name, help, Some(Unit::Seconds), ms_to_s(ms))
    }

    fn counter(&mut self, name: &str, help: &str, unit: Option<Unit>, v: u64) -> Fmt {
        let c = ConstCounter::new(v);
        let m = self
            .enc
            .encode_descriptor(name, help, unit.as_ref(), c.metric_type())?;
        c.encode(m)
    }

    /// One gauge per label value, 1 for `current`, 0 for the others.
    fn one_of(&mut self, name: &str, help: &str, label: &str, all: &[&str], current: &str) -> Fmt {
        let g = ConstGauge::new(0i64);
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, g.metric_type())?;
        for value in all {
            let labels = [(label, *value)];
            ConstGauge::new(i64::from(*value == current)).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn info(&mut self, labels: &[(&str, &str)]) -> Fmt {
        let g = ConstGauge::new(1i64);
        let mut m = self.enc.encode_descriptor(
            "agent_info",
            "The agent's mode and holder id (always 1)",
            None,
            g.metric_type(),
        )?;
        g.encode(m.encode_family(&labels)?)
    }
}

type Fmt = Result<(), std::fmt::Error>;

#[allow(clippy::cast_precision_loss)] // milliseconds below 2^53 (285 000 years) are exact
fn ms_to_s(ms: u64) -> f64 {
    ms as f64 / MS_PER_S
}

impl Collector for StatusCollector {
    fn encode(&self, enc: DescriptorEncoder) -> Fmt {
        let mut out = Out { enc };
        let s = &self.status;
        let role = role_name(s);
        out.one_of(
            "role",
            "The agent's role: 1 for the current one (shared mode: cold, starting, hot, fenced, stopping; replicated: hot, cold)",
            "role",
            &ROLES,
            &role,
        )?;
        out.flag(
            "healthy",
            "1 when /health answers 200: hot, node running, lease renewed within the wait interval",
            health_verdict(s).is_ok(),
        )?;
        match s {
            AgentStatus::Shared(sh) => shared(&mut out, sh),
            AgentStatus::Replicated(r) => replicated(&mut out, r),
        }
    }
}

/// The watchdog's states, for the `state` label of `node_health_state`.
const HEALTH_STATES: [&str; 6] = [
    "none",
    "starting",
    "healthy",
    "unhealthy",
    "restarting",
    "gave_up",
];

fn common(out: &mut Out<'_>, node: NodeState, health: &NodeHealth, error: bool) -> Fmt {
    out.flag(
        "node_up",
        "1 while the node this agent supervises runs",
        node == NodeState::Running,
    )?;
    out.one_of(
        "node_health_state",
        "The node health watchdog's view: 1 for the current state (none, starting, healthy, unhealthy, restarting, gave_up)",
        "state",
        &HEALTH_STATES,
        &health.state.to_string(),
    )?;
    out.int(
        "node_probe_consecutive_failures",
        "Failed node probe rounds in a row (outside the start-up grace)",
        i64::from(health.consecutive_failures),
    )?;
    out.counter(
        "node_probe_failures",
        "Failed node probe rounds since the agent started",
        None,
        health.probe_failures_total,
    )?;
    out.counter(
        "node_restarts",
        "Local restarts of the node by the watchdog since the agent started",
        None,
        health.restarts_total,
    )?;
    out.flag(
        "node_gave_up",
        "1 while the watchdog has given up on this VM (it stays out of the contention)",
        health.gave_up.is_some(),
    )?;
    out.flag(
        "error",
        "1 while the agent reports a problem (see `artemis-sync status`)",
        error,
    )
}

fn shared(out: &mut Out<'_>, s: &SharedStatus) -> Fmt {
    out.info(&[("mode", "shared"), ("holder", &s.holder)])?;
    if let Some(epoch) = s.epoch {
        out.int(
            "epoch",
            "The lease's epoch (fencing token)",
            saturating_i64(epoch),
        )?;
    }
    out.seconds_ms(
        "lease_renewal_age",
        "Hot: since the start of the last good lease renewal; otherwise since the lease last changed as this agent saw it",
        s.last_renewal_age_ms,
    )?;
    out.seconds_ms(
        "lease_wait_interval",
        "The lease's wait interval: a renewal older than this lets the other VM take over",
        s.wait_interval_ms,
    )?;
    out.flag(
        "lock_held",
        "1 while this agent holds the lock file's lock",
        s.lock_held,
    )?;
    common(out, s.node_state, &s.node_health, s.error.is_some())
}

#[allow(clippy::cast_precision_loss)] // a byte count below 2^53 (8 PiB) is exact
fn ms_u64(v: u64) -> f64 {
    v as f64
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn replicated(out: &mut Out<'_>, r: &ReplicatedStatus) -> Fmt {
    out.info(&[("mode", "replicated"), ("holder", &r.holder)])?;
    out.int(
        "epoch",
        "The highest epoch this host has held or accepted",
        saturating_i64(r.epoch),
    )?;
    if let Some(l) = &r.lease {
        out.seconds_ms(
            "lease_renewal_age",
            "Database lease: hot, since the last good renewal; cold, since the row last changed",
            l.age_ms,
        )?;
        out.seconds_ms(
            "lease_wait_interval",
            "The lease's wait interval: a renewal older than this lets the other VM take over",
            l.wait_interval_ms,
        )?;
    }
    out.flag(
        "connected",
        "1 while a replication stream is connected",
        r.connected,
    )?;
    if let Some(synced) = r.synced {
        out.flag(
            "synced",
            "Hot: 1 when the cold side has everything seen so far",
            synced,
        )?;
    }
    out.flag(
        "degraded",
        "Hot, durable acks: 1 while syncs return without the cold side",
        r.degraded.is_some(),
    )?;
    out.flag(
        "blocked",
        "Hot, on_peer_loss = block: 1 while a sync waits for the cold side past peer_timeout_ms",
        r.blocked.is_some(),
    )?;
    out.flag(
        "waiting",
        "Hot: 1 while the node waits for the peer's confirmation that no newer epoch exists",
        r.waiting_for.is_some(),
    )?;
    if let Some(lag) = r.lag_ms {
        out.seconds_ms("replication_lag", "How far behind the cold copy is: the age of the oldest unacknowledged batch (hot), or what the hot's last heartbeat said (cold)", lag)?;
    }
    if let Some(bytes) = r.unacked_bytes {
        out.gauge(
            "replication_unacknowledged",
            "Hot: bytes sent and not yet acknowledged by the cold side (the window in use)",
            Some(Unit::Bytes),
            ms_u64(bytes),
        )?;
    }
    if let Some(age) = r.last_ack_age_ms {
        out.seconds_ms("last_ack_age", "Since the last acknowledgement", age)?;
    }
    if r.synced.is_some() {
        sync_progress(out, r.sync_progress.as_ref())?;
    }
    totals(out, r)?;
    common(out, r.node_state, &r.node_health, r.error.is_some())
}

/// The hot side's initial sync or resync: whether one runs, and while it does how far it is.
fn sync_progress(out: &mut Out<'_>, p: Option<&SyncProgress>) -> Fmt {
    out.flag(
        "sync_in_progress",
        "Hot: 1 while an initial sync or resync runs (the cold copy has not caught up)",
        p.is_some(),
    )?;
    let Some(p) = p else { return Ok(()) };
    let bytes =
        |out: &mut Out<'_>, name, help, v| out.gauge(name, help, Some(Unit::Bytes), ms_u64(v));
    bytes(out, "sync_done", "Hot, during a sync: bytes the cold side is known to have (equal, or sent and acknowledged)", p.bytes_done)?;
    bytes(
        out,
        "sync_total",
        "Hot, during a sync: bytes of the tree being compared",
        p.bytes_total,
    )?;
    out.int(
        "sync_files_done",
        "Hot, during a sync: files compared whose differences are acknowledged",
        saturating_i64(p.files_done),
    )?;
    out.int(
        "sync_files_total",
        "Hot, during a sync: files of the tree being compared",
        saturating_i64(p.files_total),
    )?;
    if let Some(rate) = p.bytes_per_s {
        let unit = Unit::Other("bytes_per_second".into());
        out.gauge(
            "sync_rate",
            "Hot, during a sync: bytes done per second over the last seconds",
            Some(unit),
            ms_u64(rate),
        )?;
    }
    if let Some(eta) = p.eta_s {
        out.gauge(
            "sync_eta",
            "Hot, during a sync: seconds left at that rate",
            Some(Unit::Seconds),
            ms_u64(eta),
        )?;
    }
    Ok(())
}

/// Replicated mode's counters: what went over the stream, and its faults.
fn totals(out: &mut Out<'_>, r: &ReplicatedStatus) -> Fmt {
    let (dir, side) = match r.role {
        crate::config::ReplRole::Hot => ("sent", "hot: sent"),
        crate::config::ReplRole::Cold => ("received", "cold: applied"),
    };
    out.counter(
        "replication_data",
        &format!("Bytes of pages ({side}) in the current role"),
        Some(Unit::Bytes),
        r.data_bytes,
    )?;
    out.counter(
        "replication_batches",
        &format!("Batches ({side}) in the current role"),
        None,
        r.batches,
    )?;
    out.counter(
        &format!("wire_{dir}"),
        &format!("Bytes on the wire ({dir})"),
        Some(Unit::Bytes),
        r.wire_bytes,
    )?;
    if let Some(back) = r.wire_out_bytes {
        out.counter(
            "wire_sent",
            "Bytes on the wire (sent)",
            Some(Unit::Bytes),
            back,
        )?;
    }
    out.counter(
        "reconnects",
        "Hot: replication connections made again after one was lost",
        None,
        r.reconnects,
    )?;
    out.counter(
        "resends",
        "Hot: batches resent after the cold side rejected them",
        None,
        r.resends,
    )?;
    out.counter(
        "checksum_failures",
        "Cold: batches rejected for a bad page checksum",
        None,
        r.checksum_failures,
    )?;
    out.counter(
        "apply_failures",
        "Cold: batches that could not be applied (a full, read-only or failing disk; a failed check)",
        None,
        r.apply_failures,
    )?;
    out.flag(
        "apply_failing",
        "Cold: 1 while batches cannot be applied (status apply_error says why)",
        r.apply_error.is_some(),
    )
}
