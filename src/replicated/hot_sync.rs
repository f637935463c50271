//! What the cold side knows of the hot side's sync state: the [`HotState`] of the last
//! heartbeat it received, with when it arrived ([`HotSync`]), and what that means for the copy
//! if the hot went silent right after it: the RPO `status` shows and `promote` reports.
//!
//! A durable hot side that is caught up and not degraded confirmed no sync we do not have; it
//! can confirm one without us only `peer_timeout_ms` after it lost us (when it degrades), and
//! never with `on_peer_loss = "block"`. A degraded or async hot side may have confirmed what
//! is not here: the heartbeat says since when, and how old its oldest unacknowledged batch was.

use std::time::{Duration, Instant, UNIX_EPOCH};

use crate::replicated::wire::HotState;

/// The last heartbeat of a hot side, as the cold side received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotSync {
    /// What the heartbeat said.
    pub state: HotState,
    /// The hot side's epoch.
    pub epoch: u64,
    /// When the heartbeat arrived (our monotonic clock).
    pub received: Instant,
}

/// What the copy may lack if the hot side went silent right after its last heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpo {
    /// Durable, caught up, not degraded, `block`: every sync it confirmed is here.
    Zero,
    /// Durable, caught up, not degraded: every sync it confirmed is here, unless it ran on
    /// for more than `peer_timeout` after it lost us (it then degraded and confirmed syncs
    /// without us).
    ZeroUnlessRanOn { peer_timeout: Duration },
    /// Durable but degraded since then (ms since the Unix epoch): syncs it confirmed since
    /// may be missing.
    Degraded { since_unix_ms: u64 },
    /// Async acks: whatever it had not had acknowledged may be missing.
    Async,
    /// Durable, not degraded, but its comparison since it connected was not done: what
    /// differed when it connected may be missing.
    CatchingUp,
}

impl HotSync {
    /// The state a heartbeat carried, received now from a hot side at `epoch`.
    pub fn new(state: HotState, epoch: u64) -> Self {
        HotSync {
            state,
            epoch,
            received: Instant::now(),
        }
    }

    /// What the copy may lack if the hot side went silent right after this heartbeat.
    pub fn rpo(&self) -> Rpo {
        if !self.state.durable {
            Rpo::Async
        } else if self.state.degraded_since_unix_ms != 0 {
            Rpo::Degraded {
                since_unix_ms: self.state.degraded_since_unix_ms,
            }
        } else if !self.state.caught_up {
            Rpo::CatchingUp
        } else if self.state.block {
            Rpo::Zero
        } else {
            Rpo::ZeroUnlessRanOn {
                peer_timeout: Duration::from_millis(self.state.peer_timeout_ms),
            }
        }
    }

    /// Whether every sync the hot side confirmed up to this heartbeat is here.
    pub fn in_sync(&self) -> bool {
        matches!(self.rpo(), Rpo::Zero | Rpo::ZeroUnlessRanOn { .. })
    }

    /// Milliseconds since the heartbeat arrived.
    pub fn age_ms(&self) -> u64 {
        u64::try_from(self.received.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// One line for the cold side's `status`.
    pub fn status_text(&self) -> String {
        let at = format!("at last contact {} ms ago", self.age_ms());
        match self.rpo() {
            Rpo::Zero => format!("in sync (durable, on_peer_loss = block) {at}"),
            Rpo::ZeroUnlessRanOn { .. } => format!("in sync (durable) {at}"),
            Rpo::Degraded { since_unix_ms } => format!(
                "degraded since {}: the hot side's syncs returned without us; oldest unacknowledged batch {} ms old {at}",
                utc(since_unix_ms),
                self.state.unacked_ms
            ),
            Rpo::Async => format!("async, {} ms behind {at}", self.state.unacked_ms),
            Rpo::CatchingUp => format!("catching up (resync after connecting not done) {at}"),
        }
    }

    /// What `promote` says of the copy, the hot side having gone silent after this heartbeat.
    pub fn promote_text(&self) -> String {
        let at = format!(
            "at its last heartbeat ({} ms ago, epoch {})",
            self.age_ms(),
            self.epoch
        );
        match self.rpo() {
            Rpo::Zero => format!(
                "RPO 0: the old hot was durable and in sync {at}, with on_peer_loss = block: every sync it confirmed is here"
            ),
            Rpo::ZeroUnlessRanOn { peer_timeout } => format!(
                "RPO 0: the old hot was durable and in sync {at}: every sync it confirmed is here, unless it ran on for more than its peer_timeout_ms ({} ms) after it lost us (it then degraded and confirmed syncs without us)",
                peer_timeout.as_millis()
            ),
            Rpo::Degraded { since_unix_ms } => format!(
                "NOT in sync: the old hot was degraded since {} {at}: syncs it confirmed since then may be missing; its oldest unacknowledged batch was {} ms old",
                utc(since_unix_ms),
                self.state.unacked_ms
            ),
            Rpo::Async => format!(
                "NOT in sync: the old hot acked async; {at} it was {} ms behind: that much, and whatever it wrote after, may be missing",
                self.state.unacked_ms
            ),
            Rpo::CatchingUp => format!(
                "NOT in sync: the old hot was still resyncing after it connected {at}: what differed then may be missing"
            ),
        }
    }
}

/// `unix_ms` as a UTC time stamp, with the raw value.
fn utc(unix_ms: u64) -> String {
    let stamp = crate::link::utc_stamp(UNIX_EPOCH + Duration::from_millis(unix_ms));
    format!("{stamp} (unix ms {unix_ms})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(durable: bool, block: bool, caught_up: bool, degraded: u64) -> HotSync {
        HotSync::new(
            HotState {
                durable,
                block,
                caught_up,
                degraded_since_unix_ms: degraded,
                unacked_ms: 37,
                peer_timeout_ms: 2000,
            },
            4,
        )
    }

    #[test]
    fn the_rpo_follows_the_hot_sides_state() {
        let in_sync = hs(true, false, true, 0);
        assert_eq!(
            in_sync.rpo(),
            Rpo::ZeroUnlessRanOn {
                peer_timeout: Duration::from_millis(2000)
            }
        );
        assert!(in_sync.in_sync());
        assert!(in_sync
            .status_text()
            .starts_with("in sync (durable) at last contact "));
        let text = in_sync.promote_text();
        assert!(
            text.starts_with("RPO 0: ") && text.contains("(2000 ms)"),
            "{text}"
        );
        assert_eq!(hs(true, true, true, 0).rpo(), Rpo::Zero);
        assert!(hs(true, true, true, 0)
            .promote_text()
            .contains("on_peer_loss = block"));
        // 2026-11-30 12:00:00 UTC
        let degraded = hs(true, false, true, 1_796_040_000_000);
        assert!(!degraded.in_sync());
        let text = degraded.status_text();
        assert!(
            text.starts_with("degraded since 20261130T120000Z (unix ms 1796040000000)"),
            "{text}"
        );
        assert!(degraded
            .promote_text()
            .starts_with("NOT in sync: the old hot was degraded since 20261130T120000Z"));
        let asynchronous = hs(false, false, true, 0);
        assert_eq!(asynchronous.rpo(), Rpo::Async);
        assert!(asynchronous
            .status_text()
            .starts_with("async, 37 ms behind at last contact "));
        assert!(asynchronous.promote_text().contains("37 ms behind"));
        assert_eq!(hs(true, false, false, 0).rpo(), Rpo::CatchingUp);
        assert!(!hs(true, false, false, 0).in_sync());
    }
}
