//! The progress of an initial sync or a resync as the hot agent's `status` reports it
//! ([`SyncProgress`], absent once the cold copy has caught up) and the last one that finished
//! ([`SyncDone`], kept while the connection lasts), with their text: the plain line the agent logs and `artemis-sync progress`
//! prints when its output is not a terminal, and the bar it draws when it is.
//!
//! "Done" counts what the cold side is known to have: bytes and files the hot side compared
//! with the cold side's index and found equal, or sent and had acknowledged. The totals are
//! the hot tree's regular files as the comparison began.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Bytes in a KiB.
const KIB: u64 = 1 << 10;
/// Percent in a whole.
const PERCENT: u64 = 100;
/// The terminal bar's width in cells, at most.
const BAR_MAX_CELLS: usize = 40;
/// The bar's width in cells, at least (on a very narrow terminal the line wraps anyway).
const BAR_MIN_CELLS: usize = 10;

/// Which kind of comparison runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncPhase {
    /// The cold side's copy was empty: everything goes over.
    Initial,
    /// The cold side had a copy (after a restart or an outage): what differs goes over.
    Resync,
}

impl fmt::Display for SyncPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SyncPhase::Initial => "initial sync",
            SyncPhase::Resync => "resync",
        })
    }
}

/// An initial sync or resync in progress (hot side).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncProgress {
    /// Initial sync or resync.
    pub phase: SyncPhase,
    /// Bytes of the tree the cold side is known to have (equal, or sent and acknowledged).
    pub bytes_done: u64,
    /// Bytes of the hot tree's regular files when the comparison began (at least `bytes_done`).
    pub bytes_total: u64,
    /// Files compared whose differences are acknowledged.
    pub files_done: u64,
    /// Regular files in the hot tree when the comparison began (at least `files_done`).
    pub files_total: u64,
    /// Page data sent in this sync (a resync of a mostly equal tree sends little).
    pub bytes_sent: u64,
    /// Bytes done per second over the last few seconds; `None` until it can be measured.
    pub bytes_per_s: Option<u64>,
    /// Seconds left at that rate; `None` while the rate is unknown or zero.
    pub eta_s: Option<u64>,
    /// Since the comparison began.
    pub elapsed_ms: u64,
}

/// An initial sync or resync that finished (hot side).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncDone {
    /// Initial sync or resync.
    pub phase: SyncPhase,
    /// Bytes of the tree compared and on the cold side at the end.
    pub bytes: u64,
    /// Files compared.
    pub files: u64,
    /// Page data sent.
    pub bytes_sent: u64,
    /// From the start of the comparison to the last acknowledgement.
    pub elapsed_ms: u64,
    /// When it finished (ms since the Unix epoch).
    pub finished_unix_ms: u64,
}

impl SyncProgress {
    /// Percent of the bytes done (files when the tree holds no bytes).
    pub fn percent(&self) -> u64 {
        let (done, total) = if self.bytes_total > 0 {
            (self.bytes_done, self.bytes_total)
        } else {
            (self.files_done, self.files_total)
        };
        if total == 0 {
            return PERCENT;
        }
        // u128: no overflow for any u64 byte count
        u64::try_from(u128::from(done.min(total)) * u128::from(PERCENT) / u128::from(total))
            .unwrap_or(PERCENT)
    }

    /// The progress bar for a terminal `width` columns wide (the caller rewrites the line).
    pub fn bar(&self, width: usize) -> String {
        let tail = format!(" {:>3}% {}", self.percent(), self.figures("/"));
        let head = format!("{} ", self.phase);
        let room = width.saturating_sub(head.len() + tail.len() + 2);
        let cells = room.clamp(BAR_MIN_CELLS, BAR_MAX_CELLS);
        let filled = usize::try_from(self.percent()).unwrap_or(0) * cells / 100;
        let mut bar = "#".repeat(filled);
        if filled < cells {
            bar.push('>');
            bar.push_str(&".".repeat(cells - filled - 1));
        }
        format!("{head}[{bar}]{tail}")
    }

    /// Bytes, files, rate and ETA, with `of` between done and total.
    fn figures(&self, of: &str) -> String {
        let rate = self
            .bytes_per_s
            .map_or_else(|| "-".to_owned(), |r| format!("{}/s", human_bytes(r)));
        let eta = self.eta_s.map_or_else(|| "?".to_owned(), human_duration);
        format!(
            "{}{of}{} {}{of}{} files {rate} ETA {eta}",
            human_bytes(self.bytes_done),
            human_bytes(self.bytes_total),
            self.files_done,
            self.files_total,
        )
    }
}

/// The plain line (logs, `status`, `progress` when not on a terminal).
impl fmt::Display for SyncProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = self.bytes_per_s.map_or_else(
            || "rate unknown".to_owned(),
            |r| format!("{}/s", human_bytes(r)),
        );
        let eta = self
            .eta_s
            .map_or_else(|| "unknown".to_owned(), human_duration);
        write!(
            f,
            "{}: {} of {} ({}%), {} of {} files, {} sent, {rate}, ETA {eta}",
            self.phase,
            human_bytes(self.bytes_done),
            human_bytes(self.bytes_total),
            self.percent(),
            self.files_done,
            self.files_total,
            human_bytes(self.bytes_sent),
        )
    }
}

impl fmt::Display for SyncDone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.elapsed_ms.max(1);
        let rate = u64::try_from(u128::from(self.bytes) * 1000 / u128::from(ms)).unwrap_or(0);
        write!(
            f,
            "{} done: {} files, {} in {} ({}/s), {} sent",
            self.phase,
            self.files,
            human_bytes(self.bytes),
            human_duration_ms(self.elapsed_ms),
            human_bytes(rate),
            human_bytes(self.bytes_sent),
        )
    }
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`: binary units, one decimal.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < KIB {
        return format!("{n} B");
    }
    // tenths of the unit, in integers: exact, and no float formatting surprises
    let mut unit = 0;
    let mut scale = KIB;
    while unit + 1 < UNITS.len() && n / scale >= KIB {
        unit += 1;
        scale *= KIB;
    }
    let tenths = u128::from(n) * 10 / u128::from(scale);
    format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
}

/// `42s`, `3m07s`, `2h05m`.
fn human_duration(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// `0.8s` below a minute (one decimal), else as [`human_duration`].
fn human_duration_ms(ms: u64) -> String {
    if ms < 60_000 {
        format!("{}.{}s", ms / 1000, ms % 1000 / 100)
    } else {
        human_duration(ms / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(done: u64, total: u64) -> SyncProgress {
        SyncProgress {
            phase: SyncPhase::Initial,
            bytes_done: done,
            bytes_total: total,
            files_done: 3,
            files_total: 10,
            bytes_sent: done,
            bytes_per_s: Some(2 << 20),
            eta_s: Some(75),
            elapsed_ms: 1500,
        }
    }

    #[test]
    fn units_and_durations_read_as_people_write_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(40 << 20), "40.0 MiB");
        assert_eq!(human_bytes((3 << 30) + (1 << 29)), "3.5 GiB");
        assert_eq!(human_bytes(u64::MAX), "15.9 EiB");
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(187), "3m07s");
        assert_eq!(human_duration(7500), "2h05m");
        assert_eq!(human_duration_ms(850), "0.8s");
        assert_eq!(human_duration_ms(61_000), "1m01s");
    }

    #[test]
    fn percent_is_of_bytes_bounded_and_of_files_for_an_empty_tree() {
        assert_eq!(progress(0, 100).percent(), 0);
        assert_eq!(progress(42, 100).percent(), 42);
        assert_eq!(progress(100, 100).percent(), 100);
        assert_eq!(progress(u64::MAX, u64::MAX).percent(), 100);
        let mut empty = progress(0, 0);
        assert_eq!(empty.percent(), 30, "3 of 10 files");
        empty.files_total = 0;
        empty.files_done = 0;
        assert_eq!(empty.percent(), 100);
    }

    #[test]
    fn the_plain_line_and_the_bar_carry_bytes_files_rate_and_eta() {
        let p = progress(10 << 20, 40 << 20);
        assert_eq!(
            p.to_string(),
            "initial sync: 10.0 MiB of 40.0 MiB (25%), 3 of 10 files, 10.0 MiB sent, 2.0 MiB/s, ETA 1m15s"
        );
        let bar = p.bar(100);
        assert!(bar.starts_with("initial sync ["), "{bar}");
        assert!(
            bar.ends_with("]  25% 10.0 MiB/40.0 MiB 3/10 files 2.0 MiB/s ETA 1m15s"),
            "{bar}"
        );
        assert!(bar.len() <= 100, "{bar}");
        let inner = &bar[bar.find('[').unwrap() + 1..bar.find(']').unwrap()];
        assert_eq!(inner.len(), inner.chars().count());
        assert_eq!(inner.matches('#').count(), inner.len() / 4, "{inner}");
        let unknown = SyncProgress {
            bytes_per_s: None,
            eta_s: None,
            ..p
        };
        assert!(unknown.to_string().ends_with("rate unknown, ETA unknown"));
        let full = progress(40 << 20, 40 << 20).bar(20);
        assert!(
            full.contains(&format!("[{}]", "#".repeat(BAR_MIN_CELLS))),
            "{full}"
        );
    }

    #[test]
    fn a_finished_sync_says_how_long_and_how_fast() {
        let d = SyncDone {
            phase: SyncPhase::Resync,
            bytes: 100 << 20,
            files: 7,
            bytes_sent: 5 << 20,
            elapsed_ms: 2000,
            finished_unix_ms: 1,
        };
        assert_eq!(
            d.to_string(),
            "resync done: 7 files, 100.0 MiB in 2.0s (50.0 MiB/s), 5.0 MiB sent"
        );
    }
}
