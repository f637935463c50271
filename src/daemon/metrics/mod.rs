//! The agent's HTTP endpoint for operators' tools (`[metrics] listen`, see [`http`]):
//! `/metrics` for Prometheus, `/health` for a load balancer's probe, `/status` as
//! `artemis-sync status --json` prints it.
//!
//! One source of truth: every answer starts from the agent's own status, asked of its main
//! loop through the control socket's channel ([`super::control::Incoming`]), so what the
//! endpoint says can never disagree with `status`. State (role, epoch, lease age, lag, totals)
//! becomes metrics at scrape time ([`collector`]); what must be counted where it happens
//! (renewal latency, fences, durable sync waits, verify results, mount checks) is recorded
//! into [`Metrics`], shared by the threads that see it.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use super::protocol::{AgentStatus, HealthState, LeaseRole, NodeHealth, NodeState};
use crate::config::ReplRole;

pub mod collector;
pub mod http;

/// Every metric's name starts with this (and `_`).
pub const PREFIX: &str = "artemis_sync";
/// The smallest bucket of the latency histograms, in seconds (100 us).
const LATENCY_FIRST_BUCKET_S: f64 = 0.0001;
/// How many buckets, each twice the one before (up to ~3.3 s ... 26 s).
const LATENCY_BUCKETS: u16 = 16;

/// The event metrics: recorded where the events happen, by the threads that hold an
/// `Arc<Metrics>`; their values are kept from one scrape to the next.
#[derive(Debug)]
pub struct Metrics {
    /// How long a lease renewal (one store call) took.
    pub lease_renewal_seconds: Histogram,
    /// Times this agent stopped its node because it lost or could not renew the right to run
    /// it (a lease fence, or a step-down for a newer epoch).
    pub fence_events: Counter,
    /// How long a durable sync waited for the cold side.
    pub durable_sync_wait_seconds: Histogram,
    /// The last `verify`: 1 identical, 0 differing (absent before the first).
    pub last_verify_identical: Gauge,
    /// When the last `verify` finished, in seconds since the Unix epoch (0: none yet).
    pub last_verify_timestamp_seconds: Gauge,
    /// The share's mount and link checks after a takeover, by result (`ok`, `failed`).
    pub mount_checks: Family<[(&'static str, &'static str); 1], Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let latency = || {
            Histogram::new(exponential_buckets(
                LATENCY_FIRST_BUCKET_S,
                2.0,
                LATENCY_BUCKETS,
            ))
        };
        Metrics {
            lease_renewal_seconds: latency(),
            fence_events: Counter::default(),
            durable_sync_wait_seconds: latency(),
            last_verify_identical: Gauge::default(),
            last_verify_timestamp_seconds: Gauge::default(),
            mount_checks: Family::default(),
        }
    }
}

impl Metrics {
    /// A fresh set, to share between the agent's threads.
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// Records a finished `verify`.
    pub fn verified(&self, identical: bool) {
        self.last_verify_identical.set(i64::from(identical));
        let now_s = crate::sys::now_unix_ms() / 1000;
        self.last_verify_timestamp_seconds
            .set(i64::try_from(now_s).unwrap_or(i64::MAX));
    }

    /// Records one check of the share's mount and link.
    pub fn mount_checked(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.mount_checks.get_or_create(&[("result", result)]).inc();
    }

    /// A registry holding these metrics (shared, not copied) and, when the agent answered,
    /// the status snapshot's (see [`collector::StatusCollector`]).
    pub fn registry(&self, status: Option<AgentStatus>) -> Registry {
        let mut r = Registry::with_prefix(PREFIX);
        r.register_with_unit(
            "lease_renewal_duration",
            "How long one lease renewal (one call to the store) took",
            Unit::Seconds,
            self.lease_renewal_seconds.clone(),
        );
        r.register(
            "fence_events",
            "Times this agent stopped its node because it lost the right to run it (lease fence, or a step-down for a newer epoch)",
            self.fence_events.clone(),
        );
        r.register_with_unit(
            "durable_sync_wait",
            "How long a durable sync (fsync, fdatasync, msync through the FUSE mount) waited for the cold side",
            Unit::Seconds,
            self.durable_sync_wait_seconds.clone(),
        );
        r.register(
            "last_verify_identical",
            "The last verify on this host: 1 both copies identical, 0 they differ (0 also before the first verify, see the timestamp)",
            self.last_verify_identical.clone(),
        );
        r.register_with_unit(
            "last_verify_timestamp",
            "When the last verify on this host finished, seconds since the Unix epoch (0: none yet)",
            Unit::Seconds,
            self.last_verify_timestamp_seconds.clone(),
        );
        r.register(
            "mount_checks",
            "Checks of the share's mount and link after a takeover, by result",
            self.mount_checks.clone(),
        );
        let answered = Gauge::<i64>::default();
        answered.set(i64::from(status.is_some()));
        r.register(
            "status_answered",
            "Whether the agent's main loop answered this scrape's status request in time (the other state metrics are absent when not)",
            answered,
        );
        if let Some(status) = status {
            r.register_collector(Box::new(collector::StatusCollector::new(status)));
        }
        r
    }
}

/// Whether a load balancer should send traffic to this VM: `Ok` only when it is hot, its node
/// runs (or none is configured), and its lease was renewed recently (shared: within the wait
/// interval; replicated with the database lease: likewise; replicated without a lease: hot and
/// not waiting for the peer's confirmation). `Err` says why not. The one place the verdict is
/// made: `/health` and the `artemis_sync_healthy` metric both use it.
pub fn health_verdict(status: &AgentStatus) -> Result<(), String> {
    match status {
        AgentStatus::Shared(s) => {
            if s.role != LeaseRole::Hot {
                return Err(format!("this VM is {}, not hot", s.role));
            }
            node_runs(s.node_state)?;
            node_healthy(&s.node_health)?;
            if s.last_renewal_age_ms >= s.wait_interval_ms {
                return Err(format!(
                    "the lease was last renewed {} ms ago, not within the wait interval ({} ms)",
                    s.last_renewal_age_ms, s.wait_interval_ms
                ));
            }
            Ok(())
        }
        AgentStatus::Replicated(r) => {
            if r.role != ReplRole::Hot {
                return Err("this VM is cold, not hot".to_owned());
            }
            if let Some(w) = &r.waiting_for {
                return Err(format!("hot but waiting: {w}"));
            }
            node_runs(r.node_state)?;
            node_healthy(&r.node_health)?;
            if let Some(l) = &r.lease {
                if l.role != LeaseRole::Hot {
                    return Err(format!("the database lease is {}, not hot", l.role));
                }
                if l.age_ms >= l.wait_interval_ms {
                    return Err(format!(
                        "the database lease was last renewed {} ms ago, not within the wait interval ({} ms)",
                        l.age_ms, l.wait_interval_ms
                    ));
                }
            }
            Ok(())
        }
    }
}

fn node_runs(state: NodeState) -> Result<(), String> {
    match state {
        NodeState::Running | NodeState::None => Ok(()),
        NodeState::Stopped => Err("the node is not running".to_owned()),
    }
}

/// The watchdog's view: a node that runs but has not passed its probes yet (starting), fails
/// them, or waits for a local restart is not one to send traffic to. `none`: no node is
/// configured (the verdict rests on the role and the lease).
fn node_healthy(h: &NodeHealth) -> Result<(), String> {
    match h.state {
        HealthState::Healthy | HealthState::None => Ok(()),
        state => Err(format!("the node is {state}: {h}")),
    }
}

/// The role a status shows, for `/health`'s body and the `role` label.
pub fn role_name(status: &AgentStatus) -> String {
    match status {
        AgentStatus::Shared(s) => s.role.to_string(),
        AgentStatus::Replicated(r) => match r.role {
            ReplRole::Hot => "hot".to_owned(),
            ReplRole::Cold => "cold".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests;
