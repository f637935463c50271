//! The lease state machine both modes run: when to observe, take over, renew and fence, over
//! any [`LeaseStore`] (through the [`super::worker`] thread). It owns no node: it tells its
//! owner what happened as [`Event`]s, and the owner starts or stops the node at once.
//!
//! Timeline (defaults 20 s / 40 s / 10 s): a renewal starts every `update_interval_ms`. The
//! fence deadline is the start of the last good renewal + `wait_interval_ms` −
//! `stop_timeout_ms` − a tenth of `wait_interval_ms`; at that moment, whatever the worker is
//! doing, the machine says [`Event::Fence`], so the node is down before a contender, which
//! needs to see the lease unchanged for `wait_interval_ms` of its own monotonic clock, may
//! take over. A contender takes over only what its owner's [`Eligible`] rule allows
//! (replicated mode: only with a complete copy), and an owner that held the lease under an
//! epoch before a restart may resume it ([`LeaseMachine::resume`]) by renewing it, which
//! succeeds only if nobody changed it meanwhile.

use std::time::{Duration, Instant};

use crate::daemon::duration_ms;
use crate::daemon::protocol::LeaseRole;
use crate::lease::worker::{Done, Job, Jobs, Results};
use crate::lease::{Lease, LeaseState, Obs, RenewFail};

/// The shortest pause between two observations of the lease by a cold agent.
pub const MIN_POLL: Duration = Duration::from_millis(20);
/// The longest pause between two observations of the lease by a cold agent.
pub const MAX_POLL: Duration = Duration::from_millis(1000);
/// The observation an agent starts with, before it has read the lease once.
pub const NOT_READ_YET: &str = "not read yet";

/// Whether this side may take the lease it observes (`None`: there is no lease yet); the
/// error says why not, for `status` and the log.
pub type Eligible = Box<dyn FnMut(Option<&Lease>) -> Result<(), String> + Send>;

/// What the owner must act on, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The lease is ours under this epoch: run the node.
    Acquired(u64),
    /// Stop the node now: the lease is lost or may be, under this epoch.
    Fence { epoch: Option<u64>, why: String },
    /// Something failed; for `status`.
    Error(String),
    /// A renewal or takeover succeeded: clear the error.
    Healthy,
}

/// The timing, from `[lock]` and `[node]`.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub update: Duration,
    pub wait: Duration,
    pub stop_timeout: Duration,
    pub margin: Duration,
}

/// The state machine; see the module doc.
pub struct LeaseMachine {
    holder: String,
    t: Timing,
    poll: Duration,
    role: LeaseRole,
    jobs: Jobs,
    replies: Results,
    /// The job in flight: its number and when it was sent.
    outstanding: Option<(u64, Instant)>,
    seq: u64,
    lock_held: bool,
    obs: Obs,
    obs_changed: Instant,
    /// The highest epoch seen, so a takeover always moves past it.
    epoch_seen: u64,
    /// Our lease as last written, while Starting or Hot.
    lease: Option<Lease>,
    /// The lease a Renew in flight will write.
    renewing: Option<Lease>,
    /// When the first attempt at writing `renewing` was sent: a retry that succeeds counts
    /// from it, since the first may have landed with its answer lost (a contender's wait
    /// began when it saw that write, and a retry of it changes nothing the contender sees).
    renew_first: Option<Instant>,
    /// Starting by renewing a lease we held before a restart (not by a takeover).
    resuming: bool,
    /// An epoch we held before a restart and may resume if the lease still names us under it.
    resume: Option<u64>,
    /// Start of the last good renewal (or of the takeover).
    last_good: Instant,
    next_renew: Instant,
    next_poll: Instant,
    holdoff_until: Option<Instant>,
    split_warned: Option<Instant>,
    want_unlock: bool,
    /// Whether the store has a lock (the share) besides the lease (false: the database).
    has_lock: bool,
    eligible: Option<Eligible>,
    /// Why the last takeover this side could have made was not made.
    not_eligible: Option<String>,
    /// The next takeover skips [`Eligible`] (the operator's `promote --force`).
    forced: bool,
    /// Why this side does not contend at all (the node health watchdog gave up): it neither
    /// takes the lock nor the lease, so the other VM can.
    stay_out: Option<String>,
    /// A takeover in flight when the machine fenced: released if it turns out written.
    orphan: Option<Lease>,
    events: Vec<Event>,
}

impl std::fmt::Debug for LeaseMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseMachine")
            .field("holder", &self.holder)
            .field("role", &self.role)
            .field("lease", &self.lease)
            .field("obs", &self.obs)
            .finish_non_exhaustive()
    }
}

impl LeaseMachine {
    /// A cold machine for `holder`, talking to a worker; `eligible` limits takeovers.
    pub fn new(
        holder: String,
        t: Timing,
        (jobs, replies): (Jobs, Results),
        has_lock: bool,
        eligible: Option<Eligible>,
    ) -> LeaseMachine {
        let now = Instant::now();
        LeaseMachine {
            holder,
            poll: (t.update / 4).clamp(MIN_POLL, MAX_POLL),
            t,
            role: LeaseRole::Cold,
            jobs,
            replies,
            outstanding: None,
            seq: 0,
            lock_held: false,
            obs: Obs::Error(NOT_READ_YET.into()),
            obs_changed: now,
            epoch_seen: 0,
            lease: None,
            renewing: None,
            renew_first: None,
            resuming: false,
            resume: None,
            last_good: now,
            next_renew: now,
            next_poll: now,
            holdoff_until: None,
            split_warned: None,
            want_unlock: false,
            has_lock,
            eligible,
            not_eligible: None,
            forced: false,
            stay_out: None,
            orphan: None,
            events: Vec::new(),
        }
    }

    /// The events since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }
    /// The worker's replies, for the owner's select.
    pub fn replies(&self) -> Results {
        self.replies.clone()
    }
    pub fn role(&self) -> LeaseRole {
        self.role
    }
    pub fn obs(&self) -> &Obs {
        &self.obs
    }
    /// Our lease while starting or hot.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }
    /// The epoch of the lease we hold or are taking.
    pub fn held_epoch(&self) -> Option<u64> {
        self.lease.as_ref().map(|l| l.epoch)
    }
    /// Whether we hold the lock (always false without one).
    pub fn lock_held(&self) -> bool {
        self.has_lock && self.lock_held
    }
    /// Whether the first observation has been made.
    pub fn has_read(&self) -> bool {
        !matches!(self.obs, Obs::Error(ref e) if e == NOT_READ_YET)
    }
    /// Why this side did not take a lease it could have taken, if it did not.
    pub fn not_eligible(&self) -> Option<&str> {
        self.stay_out.as_deref().or(self.not_eligible.as_deref())
    }
    /// How long ago our last good renewal started (hot), or the lease last changed (cold).
    pub fn age(&self) -> Duration {
        if self.role == LeaseRole::Hot {
            self.last_good.elapsed()
        } else {
            self.obs_changed.elapsed()
        }
    }
    /// An epoch seen elsewhere (the replication epoch): takeovers move past it.
    pub fn see_epoch(&mut self, epoch: u64) {
        self.epoch_seen = self.epoch_seen.max(epoch);
    }
    /// We held the lease under `epoch` before a restart: if it still names us under it,
    /// renew it rather than wait for it to expire.
    pub fn resume(&mut self, epoch: Option<u64>) {
        self.resume = epoch;
    }
    /// The next takeover ignores [`Eligible`]; the lease itself still decides.
    pub fn force_next(&mut self) {
        self.forced = true;
        self.next_poll = Instant::now();
    }
    /// Withdraws [`LeaseMachine::force_next`] (the operator's request ended unserved).
    pub fn cancel_force(&mut self) {
        self.forced = false;
    }
    /// Whether a node may start now: hot, and before the fence deadline.
    pub fn may_run_node(&self) -> bool {
        self.role == LeaseRole::Hot && Instant::now() < self.fence_at()
    }

    /// Until when a node may run: the fence deadline while hot, already passed otherwise.
    pub fn may_run_until(&self) -> Instant {
        if self.role == LeaseRole::Hot {
            self.fence_at()
        } else {
            Instant::now()
        }
    }

    fn fence_at(&self) -> Instant {
        self.last_good + self.t.wait - self.t.stop_timeout - self.t.margin
    }

    /// When [`LeaseMachine::tick`] has something to do next.
    pub fn next_deadline(&self) -> Instant {
        match self.role {
            LeaseRole::Hot if self.outstanding.is_none() => self.next_renew.min(self.fence_at()),
            LeaseRole::Hot | LeaseRole::Starting => self.fence_at(),
            // the worker holds a job: its reply wakes the owner, which looks again a poll
            // later at the latest (a store slow to answer is waited for, not polled at once)
            _ if self.outstanding.is_some() => self.next_poll.max(Instant::now() + self.poll),
            _ => self.next_poll,
        }
    }

    fn send(&mut self, job: Job) -> bool {
        if self.outstanding.is_some() {
            return false;
        }
        self.seq += 1;
        match self.jobs.try_send((self.seq, job)) {
            Ok(()) => {
                self.outstanding = Some((self.seq, Instant::now()));
                true
            }
            Err(_) => false,
        }
    }

    /// Keeps this side out of the contention while `why` is `Some` (the owner sets it on every
    /// turn from the node health watchdog): it still observes the lease, but takes neither the
    /// lock nor the lease. The owner releases a lease it holds first.
    pub fn stay_out(&mut self, why: Option<String>) {
        if why != self.stay_out {
            match &why {
                Some(w) => tracing::warn!("not contending for the lease: {w}"),
                None => tracing::info!("contending for the lease again"),
            }
            if why.is_some() && self.lock_held {
                self.want_unlock = true;
            }
            self.stay_out = why;
        }
    }

    /// Fences, renews or observes, whichever is due.
    pub fn tick(&mut self) {
        let now = Instant::now();
        match self.role {
            LeaseRole::Hot | LeaseRole::Starting if now >= self.fence_at() => {
                let since = now.duration_since(self.last_good).as_millis();
                self.fence(&format!("no successful renewal for {since} ms; the node must be down before the other VM may take over"));
            }
            LeaseRole::Hot if now >= self.next_renew && self.outstanding.is_none() => {
                let current = self.lease.clone().expect("hot means a lease");
                let next = current.renewed();
                self.renewing = Some(next.clone());
                if self.send(Job::Renew { current, next }) && self.renew_first.is_none() {
                    self.renew_first = self.outstanding.map(|(_, sent)| sent);
                }
            }
            LeaseRole::Cold | LeaseRole::Fenced if now >= self.next_poll => {
                if self.holdoff_until.is_some_and(|t| now >= t) {
                    self.holdoff_until = None;
                    if self.role == LeaseRole::Fenced {
                        self.role = LeaseRole::Cold;
                    }
                }
                if self.want_unlock && self.send(Job::Unlock) {
                    self.want_unlock = false;
                } else if self.send(Job::Observe {
                    try_lock: self.holdoff_until.is_none()
                        && self.stay_out.is_none()
                        && !self.lock_held,
                }) {
                    self.next_poll = now + self.poll;
                } else if self.outstanding.is_none() {
                    // the worker's queue is full: a job a release gave up waiting for still
                    // runs (a hung store) with the release's behind it; try again a poll later
                    self.next_poll = now + self.poll;
                }
            }
            _ => {}
        }
    }

    /// A worker's reply; a late one (not the job in flight) is dropped.
    pub fn handle_reply(&mut self, seq: u64, done: Done) {
        let Some((expected, sent)) = self.outstanding else {
            return;
        };
        if seq != expected {
            return;
        }
        self.outstanding = None;
        match done {
            Done::Observed { locked, obs } => self.observed(locked, obs),
            Done::TookOver(result) => self.took_over(sent, result),
            Done::Renewed(result) if self.resuming => self.resumed(sent, result),
            Done::Renewed(result) => self.renewed(sent, result),
            Done::Released(_) | Done::Unlocked => self.lock_held = false,
        }
    }

    fn observed(&mut self, locked: Result<bool, String>, obs: Obs) {
        let now = Instant::now();
        match locked {
            Ok(l) => self.lock_held = l,
            Err(e) => self.events.push(Event::Error(e)),
        }
        if obs != self.obs {
            if let Obs::Error(e) = &obs {
                self.events.push(Event::Error(e.clone()));
            }
            if let Obs::Lease(l) = &obs {
                self.epoch_seen = self.epoch_seen.max(l.epoch);
            }
            self.obs = obs;
            self.obs_changed = now;
        }
        if self.role != LeaseRole::Cold
            || !self.lock_held
            || self.holdoff_until.is_some()
            || self.stay_out.is_some()
        {
            return;
        }
        let unchanged = now.duration_since(self.obs_changed);
        match self.obs.clone() {
            Obs::Error(_) => {}
            Obs::Lease(l)
                if l.holder == self.holder
                    && l.state == LeaseState::Held
                    && self.resume == Some(l.epoch) =>
            {
                self.start_resume(l);
            }
            Obs::Lease(l) if l.state == LeaseState::Released => {
                if self.may_take(Some(&l)) {
                    tracing::info!(previous = %l.holder, epoch = l.epoch, "the lease was released; taking over");
                    self.take_over();
                }
            }
            obs if unchanged >= self.t.wait => {
                let lease = match &obs {
                    Obs::Lease(l) => Some(l),
                    _ => None,
                };
                if self.may_take(lease) {
                    let what = match lease {
                        Some(l) => format!("lease of {} (epoch {}) unchanged", l.holder, l.epoch),
                        None => "no lease".into(),
                    };
                    tracing::warn!(
                        unchanged_ms = duration_ms(unchanged),
                        "{what} for wait_interval_ms; taking over"
                    );
                    self.take_over();
                }
            }
            // The lock was granted while another holder renews: the lock does not exclude the
            // other VM (local-only locks, or its server dropped the holder's lock).
            Obs::Lease(l)
                if self.has_lock
                    && l.holder != self.holder
                    && unchanged < self.t.update * 2
                    && self
                        .split_warned
                        .is_none_or(|t| now.duration_since(t) >= self.t.wait) =>
            {
                self.split_warned = Some(now);
                tracing::error!(holder = %l.holder, epoch = l.epoch,
                    "SPLIT-BRAIN RISK: we were granted the lock while {} renews the lease; the lock does not \
                     exclude the other VM. Not taking over while the lease is live. Check the mount's lock \
                     options (artemis-sync doctor) on both VMs", l.holder);
            }
            _ => self.not_eligible = None,
        }
    }

    /// Whether the owner's rule lets us take `lease` now (always after `promote --force`).
    fn may_take(&mut self, lease: Option<&Lease>) -> bool {
        if std::mem::take(&mut self.forced) {
            self.not_eligible = None;
            return true;
        }
        let Some(rule) = self.eligible.as_mut() else {
            return true;
        };
        match rule(lease) {
            Ok(()) => {
                self.not_eligible = None;
                true
            }
            Err(why) => {
                if self.not_eligible.as_deref() != Some(&why) {
                    tracing::error!(
                        "NOT TAKING OVER: the lease could be taken, but {why}; `artemis-sync promote --force` takes it anyway"
                    );
                }
                self.not_eligible = Some(why);
                false
            }
        }
    }

    fn take_over(&mut self) {
        let epoch = self.epoch_seen + 1;
        let lease = Lease::new(
            &self.holder,
            epoch,
            duration_ms(self.t.update),
            duration_ms(self.t.wait),
        );
        let settle = self.poll.min(Duration::from_millis(200));
        if self.send(Job::Takeover {
            expect: self.obs.clone(),
            lease: lease.clone(),
            settle,
        }) {
            self.role = LeaseRole::Starting;
            self.lease = Some(lease);
            self.last_good = self.outstanding.map_or_else(Instant::now, |(_, t)| t);
        }
    }

    /// Renews the lease we held before a restart; [`LeaseMachine::resumed`] takes the answer.
    fn start_resume(&mut self, current: Lease) {
        let next = current.renewed();
        if self.send(Job::Renew {
            current: current.clone(),
            next: next.clone(),
        }) {
            tracing::info!(
                epoch = current.epoch,
                "the lease still names us: resuming it"
            );
            self.role = LeaseRole::Starting;
            self.resuming = true;
            self.lease = Some(current);
            self.renewing = Some(next);
            self.last_good = self.outstanding.map_or_else(Instant::now, |(_, t)| t);
        }
    }

    fn resumed(&mut self, sent: Instant, result: Result<(), RenewFail>) {
        self.resuming = false;
        self.resume = None;
        if self.role != LeaseRole::Starting {
            return;
        }
        match result {
            Ok(()) => {
                self.lease = self.renewing.take();
                self.became_hot(sent);
            }
            Err(RenewFail::Lost(why) | RenewFail::Io(why)) => {
                tracing::warn!("could not resume the lease: {why}");
                self.events.push(Event::Error(why));
                self.role = LeaseRole::Cold;
                self.lease = None;
                self.renewing = None;
            }
        }
    }

    fn became_hot(&mut self, sent: Instant) {
        let epoch = self.lease.as_ref().expect("starting means a lease").epoch;
        self.epoch_seen = self.epoch_seen.max(epoch);
        self.last_good = sent;
        self.renew_first = None;
        self.next_renew = sent + self.t.update;
        self.role = LeaseRole::Hot;
        tracing::info!(holder = %self.holder, epoch, "took over: hot");
        self.events.push(Event::Healthy);
        self.events.push(Event::Acquired(epoch));
    }

    fn took_over(&mut self, sent: Instant, result: Result<(), (bool, String)>) {
        if self.role != LeaseRole::Starting {
            // fenced while the takeover ran: never start on it, and give back what it wrote,
            // or the row would name us unrenewed until someone waits it out
            let written = matches!(result, Ok(()) | Err((true, _)));
            if let (true, Some(current)) = (written, self.orphan.take()) {
                tracing::warn!(
                    epoch = current.epoch,
                    "a takeover finished after the fence deadline; releasing it"
                );
                self.send(Job::Release { current });
            }
            return;
        }
        match result {
            Ok(()) => self.became_hot(sent),
            Err((written, message)) => {
                let epoch = self.held_epoch();
                tracing::error!(epoch, "takeover failed: {message}");
                self.events.push(Event::Error(message));
                if written {
                    self.role = LeaseRole::Hot; // release() expects to hold it
                    self.release("takeover failed");
                } else {
                    self.role = LeaseRole::Cold;
                    self.lease = None;
                }
            }
        }
    }

    fn renewed(&mut self, sent: Instant, result: Result<(), RenewFail>) {
        if self.role != LeaseRole::Hot {
            return; // fenced while it was in flight: never act on it
        }
        match result {
            Ok(()) => {
                self.lease = self.renewing.take();
                self.last_good = self.renew_first.take().unwrap_or(sent).min(sent);
                self.next_renew = sent + self.t.update;
                self.events.push(Event::Healthy);
            }
            Err(RenewFail::Lost(why)) => self.fence(&why),
            Err(RenewFail::Io(why)) => {
                let left = self.fence_at().saturating_duration_since(Instant::now());
                tracing::warn!(
                    epoch = self.held_epoch(),
                    fence_in_ms = duration_ms(left),
                    "renewal failed: {why}; retrying"
                );
                self.events.push(Event::Error(why));
                self.next_renew = Instant::now() + self.poll;
            }
        }
    }

    /// Gives the lease up without writing it (someone else owns it, or the store cannot be
    /// trusted), and tells the owner to stop the node at once.
    fn fence(&mut self, why: &str) {
        let epoch = self.held_epoch();
        tracing::error!(epoch, "FENCING: {why}; stopping the node");
        if self.role == LeaseRole::Starting && !self.resuming && self.outstanding.is_some() {
            self.orphan = self.lease.clone();
        }
        self.events.push(Event::Fence {
            epoch,
            why: why.to_owned(),
        });
        self.role = LeaseRole::Fenced;
        self.lease = None;
        self.renewing = None;
        self.renew_first = None;
        self.resuming = false;
        self.holdoff_until = Some(Instant::now() + self.t.wait);
        self.want_unlock = true;
        self.lock_held = false;
        self.next_poll = Instant::now();
    }

    /// Marks the lease released if we hold it, and unlocks, waiting (bounded by
    /// `wait_interval_ms`) for the store. The owner stops the node first. Afterwards the
    /// machine is cold and, if it held the lease, does not contend for `wait_interval_ms`, so
    /// the other VM gets it first.
    pub fn release(&mut self, why: &str) {
        let holding =
            matches!(self.role, LeaseRole::Hot | LeaseRole::Starting) && self.lease.is_some();
        self.role = LeaseRole::Stopping;
        let deadline = Instant::now() + self.t.wait;
        if let Some((seq, _)) = self.outstanding.take() {
            // let the job in flight finish first; a renewal it wrote is the row to release
            // (releasing the one before it would find the row changed and leave it held)
            while let Ok((s, done)) = crate::daemon::sdnotify::recv_pinging(
                &self.replies,
                deadline.saturating_duration_since(Instant::now()),
            ) {
                if s == seq {
                    if let (Done::Renewed(Ok(())), Some(renewed)) = (done, self.renewing.take()) {
                        self.lease = Some(renewed);
                    }
                    break;
                }
            }
        }
        let job = match (holding, self.lease.take()) {
            (true, Some(current)) => Job::Release { current },
            _ => Job::Unlock,
        };
        if self.send(job) {
            match crate::daemon::sdnotify::recv_pinging(
                &self.replies,
                deadline.saturating_duration_since(Instant::now()),
            ) {
                Ok((_, Done::Released(Ok(())))) => tracing::info!(why, "lease released"),
                Ok((_, Done::Released(Err(e)))) => {
                    tracing::warn!(why, "could not mark the lease released: {e}")
                }
                Ok(_) => {}
                Err(_) => tracing::warn!(
                    why,
                    "the lease store did not answer; the lease was not marked released"
                ),
            }
            self.outstanding = None;
        }
        if holding {
            self.holdoff_until = Some(Instant::now() + self.t.wait);
        }
        self.role = LeaseRole::Cold;
        self.renewing = None;
        self.renew_first = None;
        self.resuming = false;
        self.lock_held = false;
        self.want_unlock = false;
        self.next_poll = Instant::now();
    }
}

#[cfg(test)]
mod tests;
