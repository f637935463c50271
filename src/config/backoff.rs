//! The retry schedule of a mount at boot: bounded exponential backoff with jitter. It lives
//! with the config because validation checks that the schedule the config asks for fits inside
//! `x-systemd.mount-timeout`, and the mount helper follows the same schedule.

use std::time::Duration;

use crate::config::{DEFAULT_MOUNT_ATTEMPTS, DEFAULT_MOUNT_RETRY_MAX_MS};

/// The pause before the second attempt, in milliseconds.
pub const RETRY_INITIAL_MS: u64 = 1_000;
/// Each pause is this many times the one before (as amazon-efs-utils does).
pub const RETRY_FACTOR: f64 = 1.5;
/// Jitter adds up to this fraction to each pause, so two VMs booting together spread out.
pub const RETRY_JITTER: f64 = 0.2;

/// Bounded exponential backoff: `attempts` tries, pauses growing by [`RETRY_FACTOR`] from
/// [`RETRY_INITIAL_MS`] up to `max_ms`, each plus up to [`RETRY_JITTER`] of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// The longest pause, before jitter.
    pub max_ms: u64,
}

impl Backoff {
    /// A backoff of `attempts` tries with pauses capped at `max_ms`.
    pub fn new(attempts: u32, max_ms: u64) -> Self {
        Backoff { attempts, max_ms }
    }

    /// The pause after failed attempt `n` (1-based), before jitter.
    pub fn base_delay_ms(&self, n: u32) -> u64 {
        let grown = RETRY_INITIAL_MS as f64 * RETRY_FACTOR.powi(n.saturating_sub(1) as i32);
        (grown.min(self.max_ms as f64)) as u64
    }

    /// The pause after failed attempt `n`, with jitter drawn from `unit` in `[0, 1)`.
    pub fn delay(&self, n: u32, unit: f64) -> Duration {
        let base = self.base_delay_ms(n) as f64;
        Duration::from_millis((base * (1.0 + RETRY_JITTER * unit)) as u64)
    }

    /// The longest the pauses can add up to, jitter included.
    pub fn total_ms(&self) -> u64 {
        (1..self.attempts)
            .map(|n| (self.base_delay_ms(n) as f64 * (1.0 + RETRY_JITTER)) as u64)
            .sum()
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(DEFAULT_MOUNT_ATTEMPTS, DEFAULT_MOUNT_RETRY_MAX_MS)
    }
}
