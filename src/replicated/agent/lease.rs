//! The replicated agent with the database lease (`[lease] backend = "postgres"`): the lease
//! decides who is hot, and its epoch is the replication epoch. The machine
//! ([`crate::lease::machine`]) runs on the agent's main thread beside the stream:
//! - a cold host takes the lease only when its copy is complete ([`eligible`]: the hot's last
//!   report in the row, written by the [`crate::replicated::witness`], says in sync, or within
//!   `max_failover_lag_ms` with async acks), then turns hot under the lease's epoch;
//! - a hot host that restarts resumes its lease (a renewal that succeeds only if nobody took
//!   it meanwhile) before its node runs; one that sees a newer epoch in the row steps down;
//! - losing the lease, or the database for too long, fences the node on time; the stream goes
//!   on, so the cold copy stays current;
//! - `demote` and a stop drain the stream, report "in sync", and release the row, so the other
//!   VM takes over at once.

use std::time::Instant;

use super::*;
use crate::daemon::probe::Round;
use crate::daemon::protocol::{LeaseRole, ReplicatedLease, PROMOTE_TIMEOUT};
use crate::lease::machine::{Eligible, Event};
use crate::lease::pg::PgStore;
use crate::lease::{worker, Lease, LeaseState, Obs};
use crate::replicated::stats::SenderStats;
use crate::replicated::witness::{Inbox, WitnessConfig};

/// The answer to a request cut short by the agent's shutdown.
const STOPPING: &str = "the agent is stopping";
/// A long request's answer when the node's exit (or the watchdog's verdict) ended it.
const NODE_CHANGED: &str =
    "the node exited or failed its probes meanwhile: the agent deals with that first; try again";

/// The lease machine of a config with the database lease, else `None`.
pub(super) fn machine(
    config: &Config,
    gate: &Arc<EpochGate>,
    metrics: Arc<Metrics>,
) -> Result<Option<LeaseMachine>, ReplicaError> {
    if config.lease_backend() != Some(crate::config::LeaseBackend::Postgres) {
        return Ok(None);
    }
    let store = PgStore::open(config).map_err(|e| ReplicaError::Start(crate::error_chain(&e)))?;
    let channels = worker::start(Box::new(store), None, metrics)
        .map_err(|e| ReplicaError::Start(format!("lease worker thread: {e}")))?;
    let t = crate::shared::agent::timing(config);
    let mut m = LeaseMachine::new(
        config.holder_id(),
        t,
        channels,
        false,
        Some(eligible(config, gate.clone())),
    );
    let st = gate.get();
    m.see_epoch(st.epoch);
    if st.role == ReplRole::Hot {
        m.resume(Some(st.epoch));
    }
    Ok(Some(m))
}

/// Rule 4 of issue 13: this host may take the lease only with a complete copy.
fn eligible(config: &Config, gate: Arc<EpochGate>) -> Eligible {
    let max_lag = config.lease.as_ref().map_or(0, |l| l.max_failover_lag_ms);
    let durable = config
        .replication
        .as_ref()
        .is_some_and(|r| r.ack == Ack::Durable);
    let me = config.holder_id();
    Box::new(move |lease: Option<&Lease>| {
        let st = gate.get();
        let Some(l) = lease else {
            return if st.role == ReplRole::Hot {
                Ok(())
            } else {
                Err("there is no lease row yet: the VM that starts hot takes it first".into())
            };
        };
        if st.epoch >= 1 && l.epoch == st.epoch + 1 && l.holder == me {
            // A row naming this VM one epoch past its state is its own takeover whose answer
            // was lost (or that an agent stopped before writing its state): the statement
            // could only commit with the report this copy was found eligible under, and no
            // hot has streamed under that epoch since; it ran no node under it (the state is
            // written first). Refusing would leave the pair with no node until `promote
            // --force`: neither copy followed that epoch.
            return Ok(());
        }
        if st.epoch < l.epoch {
            return Err(format!(
                "this copy never received the stream of epoch {} (it is at epoch {}): it lacks that hot's writes",
                l.epoch, st.epoch
            ));
        }
        if st.role == ReplRole::Hot {
            return Ok(()); // this copy is the source of that epoch
        }
        match l.cold_lag_ms {
            Some(0) => Ok(()),
            Some(ms) if !durable && ms <= max_lag => Ok(()),
            Some(ms) => Err(format!(
                "the hot's last report had this copy {ms} ms behind ({})",
                if durable {
                    "durable acks take over only in sync".to_string()
                } else {
                    format!("max_failover_lag_ms = {max_lag}")
                }
            )),
            None => Err(
                "the hot's last report had this copy behind by an unknown amount (degraded, disconnected, or not yet caught up): it may lack writes the hot confirmed".into(),
            ),
        }
    })
}

impl Replica {
    /// How long a FUSE thread waits for the witness to record "behind".
    pub(super) fn witness_timeout(&self) -> Duration {
        Duration::from_millis(self.config.lock.update_interval_ms.max(1000) * 2)
    }

    /// The witness's channel and its own database store, made before the sender starts (so
    /// that a failure leaves nothing running).
    pub(super) fn witness_parts(
        &self,
    ) -> Result<Option<(WitnessHandle, Inbox, PgStore)>, ReplicaError> {
        if self.lease.is_none() {
            return Ok(None);
        }
        let store =
            PgStore::open(&self.config).map_err(|e| ReplicaError::Start(crate::error_chain(&e)))?;
        let (handle, inbox) = witness::channel(self.witness_timeout());
        Ok(Some((handle, inbox, store)))
    }

    pub(super) fn start_witness(
        &mut self,
        (handle, inbox, store): (WitnessHandle, Inbox, PgStore),
        epoch: u64,
        durable: bool,
        stats: Arc<SenderStats>,
    ) -> std::io::Result<()> {
        let w = witness::spawn(
            WitnessConfig {
                store,
                holder: self.config.holder_id(),
                epoch,
                durable,
                period: Duration::from_millis(self.config.lock.update_interval_ms),
                stats,
            },
            inbox,
        )?;
        self.witness = Some((w, handle));
        Ok(())
    }

    /// Runs the lease machine's due step and acts on what it says.
    pub(super) fn lease_tick(&mut self) {
        let epoch = self.gate.get().epoch;
        let out = self.sup.staying_out();
        let Some(m) = self.lease.as_mut() else { return };
        m.stay_out(out);
        m.see_epoch(epoch);
        m.tick();
        let events = m.take_events();
        for event in events {
            match event {
                Event::Acquired(e) => self.lease_acquired(e),
                Event::Fence { epoch, why } => {
                    self.metrics.fence_events.inc();
                    self.sup.note_error(why.clone());
                    self.sup.release(epoch);
                    // (a wait for the apply thread never arises with the lease: a takeover whose
                    // fence times out gives the lease back)
                    if self.gate.get().role == ReplRole::Hot {
                        self.waiting_for = Some(Waiting::Lease {
                            why: format!("the lease (fenced: {why})"),
                        });
                        if let Some(m) = self.lease.as_mut() {
                            m.resume(epoch);
                        }
                    }
                }
                Event::Error(e) => self.sup.note_error(e),
                Event::Healthy => self.sup.clear_error(),
            }
        }
        // after the events: a takeover just made moved our epoch past what the row said
        let st = self.gate.get();
        let newer = self.lease.as_ref().and_then(|m| match (m.role(), m.obs()) {
            (LeaseRole::Hot | LeaseRole::Starting, _) => None,
            (_, Obs::Lease(l)) if l.holder != self.config.holder_id() && l.epoch > st.epoch => {
                Some((l.epoch, l.holder.clone()))
            }
            _ => None,
        });
        if let Some((e, holder)) = newer {
            if st.role == ReplRole::Hot {
                self.step_down(
                    e,
                    &holder,
                    &format!("the lease database names {holder} under epoch {e}"),
                );
            }
        }
    }

    /// Waits for `rx` (a verify's answer) at most `limit`, renewing the lease meanwhile (the
    /// lease's deadlines do not wait for an operator's request).
    pub(super) fn wait_keeping_lease<T>(
        &mut self,
        rx: &Receiver<T>,
        limit: Duration,
    ) -> Result<T, String> {
        if self.lease.is_none() {
            return self.wait_answering_status(rx, limit);
        }
        match self.run_lease_until(rx, Instant::now() + limit, |_| false) {
            Some(Ok(v)) => Ok(v),
            Some(Err(_)) => Err("the request was dropped (the stream stopped)".into()),
            None if self.stopping.is_some() => Err(STOPPING.into()),
            None if self.node_changed.is_some() => Err(NODE_CHANGED.into()),
            None => Err("no answer in time".into()),
        }
    }

    /// Waits for `rx` at most `limit` without a lease, answering `status` meanwhile and
    /// pinging the watchdog; a shutdown signal ends the wait (the main loop then stops).
    fn wait_answering_status<T>(&mut self, rx: &Receiver<T>, limit: Duration) -> Result<T, String> {
        let deadline = Instant::now() + limit;
        let requests = self.requests.clone();
        let shutdown = self.shutdown.clone();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("no answer in time".into());
            }
            // taken at each turn, as in `run_lease_until`
            let (node_exit, rounds) = (self.sup.node_exit(), self.sup.probe_rounds());
            select! {
                recv(rx) -> v => return v.map_err(|_| "no answer in time".into()),
                recv(requests) -> req => if let Ok(req) = req { self.answer_while_busy(req) },
                recv(shutdown) -> reason => {
                    self.stopping = Some(reason.unwrap_or(ShutdownReason::Signal(libc::SIGTERM)));
                    return Err(STOPPING.into());
                }
                recv(node_exit) -> status => if let Ok(status) = status {
                    self.node_changed = Some(self.sup.node_exited(status));
                    return Err(NODE_CHANGED.into());
                },
                recv(rounds) -> round => if let Ok(round) = round {
                    if self.probed_while_busy(round) {
                        return Err(NODE_CHANGED.into());
                    }
                },
                default(self.sup.wait_limit(left.min(IDLE_WAKEUP))) => {}
            }
            self.sup.ping_watchdog();
        }
    }

    /// A probe round during a long request's wait: true, with `node_changed` set, when the
    /// watchdog stopped the node (to restart it, which the main loop does after its back-off)
    /// or gave up on it.
    fn probed_while_busy(&mut self, round: Round) -> bool {
        let why = self.sup.probed(round);
        if why.is_none() && self.sup.node_pid().is_some() {
            return false;
        }
        self.node_changed = Some(why);
        true
    }

    /// Runs the lease (its worker's replies, its ticks and what they decide, the watchdog)
    /// until `rx` answers, `done` holds, or `deadline`; returns `rx`'s answer if it came.
    /// `status` is answered meanwhile.
    fn run_lease_until<T>(
        &mut self,
        rx: &Receiver<T>,
        deadline: Instant,
        done: impl Fn(&Self) -> bool,
    ) -> Option<Result<T, crossbeam_channel::RecvError>> {
        let replies = self.lease.as_ref().map_or(never(), LeaseMachine::replies);
        let requests = self.requests.clone();
        let shutdown = self.shutdown.clone();
        while Instant::now() < deadline
            && !done(self)
            && self.stopping.is_none()
            && self.node_changed.is_none()
        {
            // taken at each turn: the lease's tick may have stopped the node (a fence, a step
            // down) or started one, and a stopped node's channel is disconnected (ready for
            // ever)
            let (node_exit, rounds) = (self.sup.node_exit(), self.sup.probe_rounds());
            let next = self.lease.as_ref().map_or(IDLE_WAKEUP, |m| {
                m.next_deadline()
                    .saturating_duration_since(Instant::now())
                    .min(IDLE_WAKEUP)
            });
            select! {
                recv(rx) -> v => return Some(v),
                recv(requests) -> req => if let Ok(req) = req { self.answer_while_busy(req) },
                recv(shutdown) -> reason => {
                    self.stopping = Some(reason.unwrap_or(ShutdownReason::Signal(libc::SIGTERM)));
                },
                recv(replies) -> msg => if let (Ok((seq, reply)), Some(m)) = (msg, self.lease.as_mut()) {
                    m.handle_reply(seq, reply);
                },
                recv(node_exit) -> status => if let Ok(status) = status {
                    self.node_changed = Some(self.sup.node_exited(status));
                },
                recv(rounds) -> round => if let Ok(round) = round {
                    self.probed_while_busy(round);
                },
                default(next) => {}
            }
            self.lease_tick();
            self.sup.ping_watchdog();
        }
        None
    }

    /// The lease is ours under `epoch`: hot under it (the stream restarted if the epoch is
    /// new), then the node. The apply thread is fenced first unless this host already streams
    /// as hot under `epoch`: a state file that says hot is no proof that it writes nothing (a
    /// takeover whose fence timed out wrote it before giving the lease back).
    fn lease_acquired(&mut self, epoch: u64) {
        let st = self.gate.get();
        if st.role == ReplRole::Hot && st.epoch == epoch && self.sender.is_some() {
            if self.waiting_for.is_some() && !self.end_wait(WaitEnd::Lease) {
                return; // it waits for something the lease does not vouch for
            }
            tracing::info!(epoch, "the lease confirms this host: starting the node");
            self.start_node(epoch);
            return;
        }
        let was_cold = st.role == ReplRole::Cold;
        if let Err(e) = self.gate.set(ReplState {
            epoch,
            role: ReplRole::Hot,
        }) {
            self.sup.note_error(e.to_string());
            self.lease_lost("the new epoch could not be recorded");
            return;
        }
        // the gate no longer admits the old stream: once the batch being applied is done,
        // the apply thread writes nothing more (at once if it is idle)
        if self.receiver.fence(FENCE_TIMEOUT).is_err() {
            tracing::error!(
                epoch,
                was_cold,
                "the apply thread did not finish its batch within {} s: giving the lease back",
                FENCE_TIMEOUT.as_secs()
            );
            self.sup
                .note_error("the apply thread did not finish its batch in time");
            self.lease_lost("the apply thread did not stop");
            // the state file says hot already: say why no node runs, and let `promote --force`
            // try again (the next takeover fences again)
            self.waiting_for = Some(Waiting::Lease {
                why: format!("the lease, given back after the takeover under epoch {epoch} because the apply thread did not finish its batch within {} s (a stalled disk?); the next takeover fences it again", FENCE_TIMEOUT.as_secs()),
            });
            return;
        }
        self.stop_sender();
        if let Err(e) = self.become_hot(None) {
            self.sup.note_error(e.to_string());
            self.lease_lost("the stream could not start");
            return;
        }
        tracing::warn!(epoch, was_cold, "TOOK THE LEASE: hot under epoch {epoch}");
    }

    /// Gives the lease back after a failed start (the node is not running).
    fn lease_lost(&mut self, why: &str) {
        self.sup
            .release(self.lease.as_ref().and_then(LeaseMachine::held_epoch));
        if let Some(m) = self.lease.as_mut() {
            m.release(why);
        }
    }

    /// A planned hand-over (demote, stop) with the node stopped: after a drain, the row says
    /// "in sync", then it is released, so the other VM takes over at once.
    pub(super) fn hand_lease_over(&mut self, drained: bool, why: &str) {
        if self.lease.is_none() {
            return;
        }
        if let Some((_, h)) = &self.witness {
            // drained: complete; not drained: the cold VM must not take it for complete
            let (said, what) = if drained {
                (h.in_sync(), "in sync")
            } else {
                (h.behind(), "behind")
            };
            if let Err(e) = said {
                tracing::warn!("cannot report the cold copy as {what}: {e}");
            }
        }
        if let Some(m) = self.lease.as_mut() {
            m.resume(None);
            m.release(why);
        }
    }

    /// `promote` with the database lease: the cold host takes over by itself when it may;
    /// `--force` takes the lease as soon as the database allows (released, or not renewed for
    /// `wait_interval_ms`), complete copy or not, and waits for it.
    pub(super) fn lease_promote(&mut self, force: bool) -> Result<Promoted, String> {
        let before = self.gate.get();
        if before.role == ReplRole::Hot && self.waiting_for.is_none() {
            return Err(format!("this host is already hot (epoch {})", before.epoch));
        }
        if !force {
            let why = self
                .lease
                .as_ref()
                .and_then(|m| m.not_eligible().map(str::to_owned))
                .unwrap_or_else(|| self.lease_holder_text());
            return Err(format!(
                "with the database lease this host takes over by itself when it may; now: {why}. `promote --force` takes the lease as soon as the database allows, with whatever this copy has"
            ));
        }
        // what the copy may lack, from the hot's last heartbeat, before this host turns hot
        let rpo = self.promote_rpo(false);
        let wait = Duration::from_millis(self.config.lock.wait_interval_ms);
        // within the client's wait for the answer
        let limit = (wait + FENCE_TIMEOUT).min(PROMOTE_TIMEOUT - FENCE_TIMEOUT);
        let deadline = Instant::now() + limit;
        if let Some(m) = self.lease.as_mut() {
            m.force_next();
        }
        let taken = |me: &Self| {
            let st = me.gate.get();
            st.role == ReplRole::Hot && st.epoch > before.epoch && me.waiting_for.is_none()
        };
        self.run_lease_until(&never::<()>(), deadline, taken);
        if taken(self) {
            let epoch = self.gate.get().epoch;
            let summary = "forced: the lease was taken without the check that this copy is complete; writes the old hot confirmed after this copy's last batch may be missing";
            tracing::warn!(epoch, "PROMOTED (--force): {summary}");
            return Ok(Promoted {
                epoch,
                forced: true,
                drained: false,
                behind: self.lease_holder_text(),
                summary: summary.into(),
                rpo,
            });
        }
        if let Some(m) = self.lease.as_mut() {
            m.cancel_force(); // an unserved --force must not linger until the hot dies
        }
        Err(format!(
            "the lease was not taken within {} ms (the database allows it once the row is released or not renewed for wait_interval_ms = {} ms): {}; run `promote --force` again",
            duration_ms(limit),
            duration_ms(wait),
            self.lease_holder_text()
        ))
    }

    /// Who the row names, for messages.
    fn lease_holder_text(&self) -> String {
        match self.lease.as_ref().map(LeaseMachine::obs) {
            Some(Obs::Lease(l)) => format!(
                "the row names {} under epoch {} ({}, changed {} ms ago)",
                l.holder,
                l.epoch,
                if l.state == LeaseState::Released {
                    "released"
                } else {
                    "held"
                },
                self.lease.as_ref().map_or(0, |m| duration_ms(m.age()))
            ),
            Some(Obs::Missing) => "there is no lease row".into(),
            Some(Obs::Error(e)) => e.clone(),
            None => "there is no lease".into(),
        }
    }

    /// The lease for `status`.
    pub(super) fn lease_status(&self) -> Option<Box<ReplicatedLease>> {
        let m = self.lease.as_ref()?;
        let row = match (m.role(), m.lease(), m.obs()) {
            (LeaseRole::Hot | LeaseRole::Starting, Some(l), _) | (_, _, Obs::Lease(l)) => Some(l),
            _ => None,
        };
        Some(Box::new(ReplicatedLease {
            role: m.role(),
            holder: row.map(|l| l.holder.clone()),
            epoch: row.map(|l| l.epoch),
            released: row.map(|l| l.state == LeaseState::Released),
            // hot: what this host last wrote (it does not read the row while it renews)
            cold_lag_ms: match (&self.witness, m.obs()) {
                (Some((_, h)), _) => h.reported(),
                (None, Obs::Lease(l)) => l.cold_lag_ms,
                _ => None,
            },
            age_ms: duration_ms(m.age()),
            not_taking_over: m.not_eligible().map(str::to_owned),
            wait_interval_ms: self.config.lock.wait_interval_ms,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(role: ReplRole, epoch: u64, ack: &str, max_lag: u64) -> (Eligible, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (tx, _rx) = bounded(1);
        let gate = Arc::new(EpochGate::new(
            ReplState { epoch, role },
            dir.path().join("state.json"),
            "h:/opt/corda".into(),
            tx,
        ));
        let text = format!(
            "[node]\nbase_dir = \"/opt/corda\"\n[lock]\nmachine_name = \"h\"\n[storage]\nmode = \"replicated\"\n\
             [replication]\nrole = \"cold\"\ndata_dir = \"/d\"\nlisten = \"127.0.0.1:1\"\n\
             peer = \"127.0.0.1:2\"\ninsecure_loopback = true\ncapture = \"fuse\"\nack = \"{ack}\"\n"
        );
        let mut config: Config = toml::from_str(&text).unwrap();
        config.lease = Some(crate::config::LeaseConfig {
            max_failover_lag_ms: max_lag,
            ..Default::default()
        });
        (eligible(&config, gate), dir)
    }

    fn row(epoch: u64, lag: Option<u64>) -> Lease {
        Lease {
            cold_lag_ms: lag,
            ..Lease::new("other", epoch, 500, 3000)
        }
    }

    #[test]
    fn issue13_a_cold_copy_takes_over_only_in_sync_or_within_the_async_lag() {
        let (mut durable, _d) = rule(ReplRole::Cold, 4, "durable", 5000);
        assert!(durable(Some(&row(4, Some(0)))).is_ok());
        let e = durable(Some(&row(4, Some(10)))).unwrap_err();
        assert!(e.contains("only in sync"), "{e}");
        let e = durable(Some(&row(4, None))).unwrap_err();
        assert!(e.contains("unknown amount"), "{e}");
        // a copy that never followed the row's epoch lacks that hot's writes
        let e = durable(Some(&row(5, Some(0)))).unwrap_err();
        assert!(e.contains("never received the stream of epoch 5"), "{e}");
        let e = durable(None).unwrap_err();
        assert!(e.contains("no lease row"), "{e}");

        let (mut lagging, _d) = rule(ReplRole::Cold, 4, "async", 200);
        assert!(lagging(Some(&row(4, Some(200)))).is_ok());
        let e = lagging(Some(&row(4, Some(201)))).unwrap_err();
        assert!(e.contains("max_failover_lag_ms = 200"), "{e}");
    }

    #[test]
    fn issue10_a_takeover_of_ours_whose_answer_was_lost_leaves_this_copy_eligible() {
        let (mut cold, _d) = rule(ReplRole::Cold, 4, "durable", 0);
        let me = |epoch: u64, state: LeaseState| Lease {
            holder: "h:/opt/corda".into(),
            state,
            cold_lag_ms: None,
            ..Lease::new("other", epoch, 500, 3000)
        };
        // our takeover to epoch 5 committed, its answer lost (then released, or not): the
        // row's report was cleared by it, and neither VM followed epoch 5
        assert!(cold(Some(&me(5, LeaseState::Held))).is_ok());
        assert!(cold(Some(&me(5, LeaseState::Released))).is_ok());
        // not ours, or further than one takeover past this copy's epoch
        let e = cold(Some(&row(5, None))).unwrap_err();
        assert!(e.contains("never received the stream of epoch 5"), "{e}");
        assert!(cold(Some(&me(6, LeaseState::Held))).is_err());
        // a copy that never followed any epoch (a VM set up again) is not vouched for
        let (mut fresh, _d) = rule(ReplRole::Cold, 0, "durable", 0);
        assert!(fresh(Some(&me(1, LeaseState::Released))).is_err());
    }

    #[test]
    fn issue13_a_hot_copy_is_the_source_of_its_own_epoch_only() {
        let (mut hot, _d) = rule(ReplRole::Hot, 4, "durable", 0);
        // whatever the row says of the cold copy: this copy is the source
        assert!(hot(Some(&row(4, None))).is_ok());
        assert!(hot(None).is_ok(), "the first start takes the first row");
        // a hot that slept through a failover is not
        assert!(hot(Some(&row(6, Some(0)))).is_err());
    }
}
