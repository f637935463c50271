//! The lease both agents contend for, whatever keeps it: the record ([`Lease`]: holder, epoch,
//! renewals, held or released) and the [`LeaseStore`] trait the agent's worker thread drives.
//! Two stores implement it: the lock and lease file on the share (`shared::share_worker`) and
//! a row in a PostgreSQL table ([`pg`]). The agent's logic (when to take over, when to renew,
//! fencing at the start of the last good renewal + `wait_interval_ms` − margin on its own
//! monotonic clock) is the same over both, so it is written once, in the agent.
//!
//! A store's operations block (a share in D state, a database that does not answer); only the
//! worker thread calls them, and the agent never waits for one past its fence deadline.
//! This module imports no mode.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod dsn;
pub mod machine;
pub mod pg;
pub mod worker;

/// Whether the holder still holds the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    /// Held and renewed.
    Held,
    /// Given up cleanly: a contender may take over at once.
    Released,
}

/// The record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// Record format.
    pub version: u32,
    /// `machine_name:base_dir` of the holder.
    pub holder: String,
    /// The fencing token: +1 on every takeover.
    pub epoch: u64,
    /// Renewals under this epoch; changes on every write, which is what contenders watch.
    pub renewals: u64,
    /// Held or released.
    pub state: LeaseState,
    /// The holder's renewal period.
    pub update_interval_ms: u64,
    /// The holder's takeover delay.
    pub wait_interval_ms: u64,
    /// The database lease in replicated mode: how far behind the cold copy was at the hot's
    /// last report, in ms (0: in sync, every confirmed sync is on the cold disk); `None` when
    /// unknown or degraded. The cold side takes over by itself only on a report it accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_lag_ms: Option<u64>,
    /// blake3 of the fields above, to catch a record damaged in place (the file only).
    #[serde(default)]
    pub check: String,
}

/// The record format this version writes and reads.
pub const LEASE_VERSION: u32 = 1;

impl Lease {
    /// A held lease under `epoch`, not yet renewed.
    pub fn new(holder: &str, epoch: u64, update_interval_ms: u64, wait_interval_ms: u64) -> Self {
        Lease {
            version: LEASE_VERSION,
            holder: holder.to_owned(),
            epoch,
            renewals: 0,
            state: LeaseState::Held,
            update_interval_ms,
            wait_interval_ms,
            cold_lag_ms: None,
            check: String::new(),
        }
    }

    /// This lease renewed once more: what a renewal of it writes.
    pub fn renewed(&self) -> Lease {
        Lease {
            renewals: self.renewals + 1,
            ..self.clone()
        }
    }
}

/// The lease as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Obs {
    /// There is no lease yet.
    Missing,
    /// The record.
    Lease(Lease),
    /// It could not be read; never a reason to take over.
    Error(String),
}

/// Why a renewal failed.
#[derive(Debug)]
pub enum RenewFail {
    /// Someone else changed the lease or the lock: fence now.
    Lost(String),
    /// The store did not answer properly: retry until the fence deadline.
    Io(String),
}

/// Where the lease is kept. Every method may block; each is one conditional change (or one
/// read), so two agents can never both believe they took the same epoch.
pub trait LeaseStore: Send {
    /// Whether holding an exclusive lock is part of contending (the share), so that being
    /// granted it while another holder renews means the lock does not exclude the other VM.
    fn has_lock(&self) -> bool;
    /// Reads the lease; with `try_lock`, also tries to take the lock where there is one.
    /// Returns whether we hold the lock (always true where there is none) and the lease.
    fn observe(&mut self, try_lock: bool) -> (Result<bool, String>, Obs);
    /// Writes `lease` (held, a new epoch) in place of `expect`, only if that is still the
    /// lease. `Err((written, why))` says whether our lease was written before the failure.
    fn take_over(
        &mut self,
        expect: &Obs,
        lease: &Lease,
        settle: Duration,
    ) -> Result<(), (bool, String)>;
    /// Replaces `current` by `next` (one more renewal), only if the lease is still `current`,
    /// or `next` already (a retry of a renewal written although its answer was lost).
    fn renew(&mut self, current: &Lease, next: &Lease) -> Result<(), RenewFail>;
    /// Marks `current` released if it is still the lease, or the renewal after it (written
    /// although its answer was lost: the agent still believes `current`), and lets the lock go.
    fn release(&mut self, current: &Lease) -> Result<(), String>;
    /// Lets the lock go, if there is one.
    fn unlock(&mut self);
}
