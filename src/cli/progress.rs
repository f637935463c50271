//! `artemis-sync progress`: follows the hot agent's initial sync or resync by polling its
//! `status` until the cold copy has caught up (the comparison done and every batch it sent
//! acknowledged). On a terminal it redraws one progress bar (bytes, files, rate, ETA) in place;
//! otherwise (a pipe, a log, systemd) it prints a plain line every `--interval-ms` and when
//! the state changes, and a last line with the sync's totals.

use std::fmt;
use std::io::{self, Write};
use std::time::{Duration, Instant};

use crate::config::{Config, ReplRole};
use crate::daemon::client;
use crate::daemon::control::ControlError;
use crate::daemon::protocol::{AgentStatus, SyncDone, SyncProgress};

/// How often the agent is asked.
pub const POLL: Duration = Duration::from_millis(250);
/// Erases from the cursor to the end of the line (ANSI, every terminal emulator).
const ERASE_LINE: &str = "\x1b[K";

/// Errors of `progress`.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ProgressError {
    /// {0}
    Control(#[from] ControlError),
    /// `progress` follows replicated mode's sync: this agent runs in shared mode
    Shared,
    /// this host is cold: the hot host's agent knows the sync's progress (run `artemis-sync progress` there)
    Cold,
    /// cannot write the progress: {0}
    Write(#[from] io::Error),
}

/// What the hot agent's status says about the sync.
#[derive(Debug)]
enum View {
    /// This connection's sync finished: the copy caught up.
    Done(SyncDone),
    /// A sync in progress.
    Running(SyncProgress),
    /// No sync yet, and why.
    Waiting(String),
}

impl View {
    fn of(status: AgentStatus) -> Result<View, ProgressError> {
        let AgentStatus::Replicated(r) = status else {
            return Err(ProgressError::Shared);
        };
        if r.role == ReplRole::Cold {
            return Err(ProgressError::Cold);
        }
        Ok(match (r.connected, r.sync_progress, r.sync_done) {
            (_, Some(p), _) => View::Running(p),
            (true, None, Some(done)) => View::Done(done),
            (false, None, _) => View::Waiting(format!(
                "waiting: not connected to the cold side ({})",
                r.peer
            )),
            (true, None, None) => View::Waiting(
                "connected: waiting for the comparison with the cold side's copy to begin".into(),
            ),
        })
    }
}

/// Where the lines go: a terminal `columns` wide (redrawn in place) or plain lines.
pub struct Output<'a> {
    out: &'a mut dyn Write,
    columns: Option<usize>,
    plain_every: Duration,
    /// When the last plain line was printed, and whether it was progress.
    last: Option<(Instant, bool)>,
}

impl fmt::Debug for Output<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Output")
            .field("columns", &self.columns)
            .field("plain_every", &self.plain_every)
            .finish_non_exhaustive()
    }
}

impl<'a> Output<'a> {
    /// `columns`: `Some(width)` when `out` is a terminal; `plain_every`: how often a plain
    /// line is printed otherwise.
    pub fn new(out: &'a mut dyn Write, columns: Option<usize>, plain_every: Duration) -> Self {
        Output {
            out,
            columns,
            plain_every,
            last: None,
        }
    }

    fn show(&mut self, view: &View) -> io::Result<()> {
        let running = matches!(view, View::Running(_));
        match (self.columns, view) {
            (Some(width), View::Running(p)) => self.redraw(&p.bar(width)),
            (Some(width), View::Waiting(why)) => self.redraw(
                &why.chars()
                    .take(width.saturating_sub(1))
                    .collect::<String>(),
            ),
            (None, View::Running(p)) => self.plain(running, p),
            (None, View::Waiting(why)) => self.plain(running, why),
            (_, View::Done(_)) => Ok(()),
        }
    }

    fn redraw(&mut self, line: &str) -> io::Result<()> {
        write!(self.out, "\r{line}{ERASE_LINE}")?;
        self.out.flush()
    }

    /// A line when the last one is `plain_every` old, or said something else.
    fn plain(&mut self, running: bool, text: &dyn fmt::Display) -> io::Result<()> {
        let due = self
            .last
            .is_none_or(|(at, was)| was != running || at.elapsed() >= self.plain_every);
        if due {
            self.last = Some((Instant::now(), running));
            writeln!(self.out, "{text}")?;
            self.out.flush()?;
        }
        Ok(())
    }

    fn done(&mut self, done: &SyncDone) -> io::Result<()> {
        if self.columns.is_some() {
            write!(self.out, "\r{ERASE_LINE}")?;
        }
        writeln!(self.out, "in sync: {done}")?;
        self.out.flush()
    }
}

/// Asks `ask` for the status every [`POLL`] (waiting with `pause`) and shows the sync on `out`
/// until the copy has caught up; returns that sync's totals.
pub fn watch(
    mut ask: impl FnMut() -> Result<AgentStatus, ControlError>,
    out: &mut Output<'_>,
    mut pause: impl FnMut(Duration),
) -> Result<SyncDone, ProgressError> {
    loop {
        match View::of(ask()?)? {
            View::Done(done) => {
                out.done(&done)?;
                return Ok(done);
            }
            view => out.show(&view)?,
        }
        pause(POLL);
    }
}

/// `progress`: [`watch`] on the agent of `config`.
pub fn progress(config: &Config, out: &mut Output<'_>) -> Result<SyncDone, ProgressError> {
    watch(|| client::status(config), out, std::thread::sleep)
}

#[cfg(test)]
mod tests;
