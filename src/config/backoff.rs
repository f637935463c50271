//! The retry schedule of a mount at boot: bounded exponential backoff with jitter. It lives
//! with the config because validation checks that the schedule the config asks for fits inside
//! `x-systemd.mount-timeout`, and the mount helper follows the same schedule.

use std::time::Duration;

use crate::config::{DEFAULT_MOUNT_ATTEMPTS, DEFAULT_MOUNT_RETRY_MAX_MS};

/// How long each attempt's reachability probe waits for the server's port (while the network
/// is not up, every attempt may wait this long besides its pause).
pub const MOUNT_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

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
        // An exponent past i32::MAX grows past any cap anyway.
        let exponent = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let grown = RETRY_INITIAL_MS as f64 * RETRY_FACTOR.powi(exponent);
        ms_from_f64(grown.min(self.max_ms as f64))
    }

    /// The pause after failed attempt `n`, with jitter drawn from `unit` in `[0, 1)`.
    pub fn delay(&self, n: u32, unit: f64) -> Duration {
        let base = self.base_delay_ms(n) as f64;
        Duration::from_millis(ms_from_f64(base * (1.0 + RETRY_JITTER * unit)))
    }

    /// The longest the pauses can add up to, jitter included (saturating). Once the pauses
    /// reach `max_ms` the rest are counted at once, so a huge `attempts` costs no time here.
    pub fn total_ms(&self) -> u64 {
        let with_jitter = |n| ms_from_f64(self.base_delay_ms(n) as f64 * (1.0 + RETRY_JITTER));
        let mut total = 0u64;
        for n in 1..self.attempts {
            if self.base_delay_ms(n) >= self.max_ms {
                let rest = u64::from(self.attempts - n);
                return total.saturating_add(rest.saturating_mul(with_jitter(n)));
            }
            total = total.saturating_add(with_jitter(n));
        }
        total
    }
}

/// Whole milliseconds from a pause computed in floating point, rounded down. The pauses are
/// finite and non-negative (a `u64` cap times at most 1.2); `as` saturates anyway (a negative
/// or NaN value gives 0, one past `u64::MAX` gives `u64::MAX`), which is the bound a pause
/// wants.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn ms_from_f64(ms: f64) -> u64 {
    ms as u64
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(DEFAULT_MOUNT_ATTEMPTS, DEFAULT_MOUNT_RETRY_MAX_MS)
    }
}
