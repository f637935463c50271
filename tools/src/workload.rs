//! A synthetic Artemis-like writer, and a probe that measures how long its records take to
//! reach the cold copy. Used by `demo` and by the benchmark.
//!
//! The writer does what the Artemis NIO journal does: it creates each journal file as
//! `activemq-data-N.amq.tmp`, preallocated and zero-filled, renames it into place, appends
//! records with `fdatasync` after each, and moves to the next file when one is full. Now and
//! then it creates a paging file and deletes an old one. Every record starts with a unique
//! 16-byte tag; the probe polls the cold copy of the same file and offset until the tag is
//! there and reports the delay from the writer's `fdatasync` returning.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};

/// Artemis' default journal file size.
pub const JOURNAL_FILE_BYTES: u64 = 10 << 20;
/// One record (the default record size).
pub const RECORD_BYTES: usize = 4096;
/// The probe looks at its pending records this often (its resolution).
pub const PROBE_SWEEP: Duration = Duration::from_micros(100);
/// The probe gives a record up after this long.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What to write.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// The hot data directory (the writer uses `journal/` and `paging/` in it).
    pub dir: PathBuf,
    /// Records per second; `None` for as fast as possible.
    pub rate_per_s: Option<u32>,
    /// How long to write.
    pub duration: Duration,
    /// Size of each journal file.
    pub file_bytes: u64,
    /// Bytes per record (each written by one `pwrite`, then `fdatasync`ed).
    pub record_bytes: usize,
    /// Probe every n-th record (1 = all).
    pub sample_every: u64,
    /// Create and delete paging files too.
    pub paging: bool,
    /// Keep at most this many journal files: older ones are deleted at each rotation (as
    /// Artemis removes reclaimed files), so a long fast run does not fill the disk.
    pub keep_files: Option<u64>,
    /// Number of the first journal file (runs that follow each other continue the numbering,
    /// as Artemis does).
    pub first_file: u64,
}

/// One second of writing.
#[derive(Debug, Clone, Default)]
pub struct Tick {
    /// Seconds since the start.
    pub second: u64,
    /// Records written in this second.
    pub records: u64,
    /// Lags measured in this second (sorted).
    pub lags: Vec<Duration>,
}

/// The whole run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Records written.
    pub records: u64,
    /// Bytes of records written.
    pub bytes: u64,
    /// Journal files used.
    pub files: u64,
    /// Elapsed writing time.
    pub elapsed: Duration,
    /// Every measured lag from the writer's `fdatasync` returning, sorted.
    pub lags: Vec<Duration>,
    /// The same records' lags from before their `pwrite` (an upper bound that the writer
    /// being preempted after its `fdatasync` cannot shrink), sorted.
    pub lags_from_write: Vec<Duration>,
    /// Records the probe never saw arrive.
    pub lost: u64,
}

/// The `q`-quantile (0..=1) of sorted `v`.
pub fn quantile(v: &[Duration], q: f64) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    let i = usize::try_from(crate::whole(((v.len() - 1) as f64 * q).round())).unwrap_or(usize::MAX);
    let i = i.min(v.len() - 1);
    Some(v[i])
}

struct Sample {
    rel: String,
    offset: u64,
    tag: [u8; 16],
    /// Before the record's `pwrite`.
    started: Instant,
    /// After its `fdatasync` returned.
    done: Instant,
}

/// The journal files the writer appends to, rotated as Artemis rotates them: a new file is
/// made as `.tmp`, preallocated, fsynced and renamed into place; with `paging`, a page file is
/// created at each rotation and the one two rotations older deleted.
struct Journal<'a> {
    cfg: &'a WriterConfig,
    journal: PathBuf,
    paging: PathBuf,
    /// The current file and its path relative to the data directory.
    file: Option<(File, String)>,
    /// The next record's slot in the current file.
    slot: u64,
    records_per_file: u64,
    file_no: u64,
    page_no: u64,
}

impl<'a> Journal<'a> {
    fn new(cfg: &'a WriterConfig) -> io::Result<Self> {
        let journal = cfg.dir.join("journal");
        let paging = cfg.dir.join("paging/demo-address");
        fs::create_dir_all(&journal)?;
        if cfg.paging {
            fs::create_dir_all(&paging)?;
        }
        let records_per_file = (cfg.file_bytes / cfg.record_bytes as u64).max(1);
        Ok(Journal {
            cfg,
            journal,
            paging,
            file: None,
            slot: records_per_file,
            records_per_file,
            file_no: cfg.first_file.saturating_sub(1),
            page_no: 0,
        })
    }

    /// Opens the next journal file (and turns the paging files over).
    fn rotate(&mut self) -> io::Result<()> {
        self.file_no += 1;
        let name = format!("activemq-data-{}.amq", self.file_no);
        let tmp = self.journal.join(format!("{name}.tmp"));
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)?;
        f.set_len(self.cfg.file_bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, self.journal.join(&name))?;
        self.file = Some((f, format!("journal/{name}")));
        self.slot = 0;
        if let Some(keep) = self.cfg.keep_files {
            if self.file_no > keep {
                let old = format!("activemq-data-{}.amq", self.file_no - keep);
                let _ = fs::remove_file(self.journal.join(old));
            }
        }
        if self.cfg.paging {
            self.page_no += 1;
            let fill = u8::try_from(self.page_no % 256).unwrap_or_default();
            fs::write(
                self.paging.join(format!("{:09}.page", self.page_no)),
                vec![fill; 8192],
            )?;
            if self.page_no > 2 {
                let old = self.paging.join(format!("{:09}.page", self.page_no - 2));
                let _ = fs::remove_file(old);
            }
        }
        Ok(())
    }

    /// Writes `record` into the next slot and `fdatasync`s it, rotating first when the current
    /// file is full; returns whether it rotated, the file's relative path, the record's offset,
    /// and when the write started.
    fn append(&mut self, record: &[u8]) -> io::Result<(bool, String, u64, Instant)> {
        let rotated = self.slot >= self.records_per_file;
        if rotated {
            self.rotate()?;
        }
        let (f, rel) = self.file.as_ref().expect("a journal file is open");
        let offset = self.slot * self.cfg.record_bytes as u64;
        let started = Instant::now();
        f.write_all_at(record, offset)?;
        f.sync_data()?;
        self.slot += 1;
        Ok((rotated, rel.clone(), offset, started))
    }
}

/// Moves the lags the probe has measured so far into this second's tick and the report.
fn drain_lags(rx: &Receiver<Option<(Duration, Duration)>>, tick: &mut Tick, report: &mut Report) {
    while let Ok(l) = rx.try_recv() {
        match l {
            Some((d, w)) => {
                tick.lags.push(d);
                report.lags_from_write.push(w);
            }
            None => report.lost += 1,
        }
    }
}

/// A record for sequence number `seq`: a 16-byte tag (the number, and nanoseconds since
/// `start`) that the probe looks for on the cold side, then filler.
fn fill_record(record: &mut [u8], seq: u64, start: Instant) -> [u8; 16] {
    let mut tag = [0u8; 16];
    tag[..8].copy_from_slice(&seq.to_le_bytes());
    let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    tag[8..].copy_from_slice(&nanos.to_le_bytes());
    record[..16].copy_from_slice(&tag);
    record[16..].fill(u8::try_from(seq % 251).unwrap_or_default() + 1);
    tag
}

/// Writes for `cfg.duration`; with `cold`, probes arrival there. `tick` is called once a
/// second.
pub fn run(
    cfg: &WriterConfig,
    cold: Option<&Path>,
    mut tick: impl FnMut(&Tick),
) -> io::Result<Report> {
    let mut journal = Journal::new(cfg)?;
    let (tx, rx) = bounded::<Sample>(4096);
    let (lag_tx, lag_rx) = bounded::<Option<(Duration, Duration)>>(65536);
    let probe = cold.map(|c| {
        let c = c.to_owned();
        std::thread::spawn(move || probe(&c, rx, lag_tx))
    });
    let mut report = Report::default();
    let start = Instant::now();
    let mut next_tick = start + Duration::from_secs(1);
    let mut this_tick = Tick {
        second: 1,
        ..Tick::default()
    };
    let mut record = vec![0u8; cfg.record_bytes];
    let mut seq = 0u64;
    while start.elapsed() < cfg.duration {
        seq += 1;
        let tag = fill_record(&mut record, seq, start);
        let (rotated, rel, offset, started) = journal.append(&record)?;
        let done = Instant::now();
        report.files += u64::from(rotated);
        if probe.is_some() && seq.is_multiple_of(cfg.sample_every) {
            let _ = tx.try_send(Sample {
                rel,
                offset,
                tag,
                started,
                done,
            });
        }
        report.records += 1;
        report.bytes += cfg.record_bytes as u64;
        this_tick.records += 1;
        drain_lags(&lag_rx, &mut this_tick, &mut report);
        if Instant::now() >= next_tick {
            this_tick.lags.sort();
            tick(&this_tick);
            report.lags.extend_from_slice(&this_tick.lags);
            this_tick = Tick {
                second: this_tick.second + 1,
                ..Tick::default()
            };
            next_tick += Duration::from_secs(1);
        }
        if let Some(rate) = cfg.rate_per_s {
            let due = start + Duration::from_secs_f64(seq as f64 / f64::from(rate));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    report.elapsed = start.elapsed();
    drop(tx);
    if let Some(p) = probe {
        let _ = p.join();
    }
    drain_lags(&lag_rx, &mut this_tick, &mut report);
    report.lags.extend_from_slice(&this_tick.lags);
    report.lags.sort();
    report.lags_from_write.sort();
    Ok(report)
}

/// The probe's new sample `s`: waited for, and its file the newest.
fn take(s: Sample, pending: &mut Vec<Sample>, last: &mut Option<String>) {
    if last.as_deref() != Some(s.rel.as_str()) {
        *last = Some(s.rel.clone());
    }
    pending.push(s);
}

/// Polls the cold copy for each sample's tag; sends the lag, or `None` after the timeout.
fn probe(cold: &Path, rx: Receiver<Sample>, out: Sender<Option<(Duration, Duration)>>) {
    let mut pending: Vec<Sample> = Vec::new();
    // descriptors of the cold files, with their inodes: a file replaced by a rename on the cold
    // side must be reopened, or the probe would watch the old inode for ever
    let mut files: HashMap<String, (File, u64, Instant)> = HashMap::new();
    let mut buf = [0u8; 16];
    let mut open = true;
    let mut lag_log = LagLog::from_env();
    // the file of the newest sample: the one being written
    let mut last: Option<String> = None;
    while open || !pending.is_empty() {
        loop {
            match rx.try_recv() {
                Ok(s) => take(s, &mut pending, &mut last),
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let now = Instant::now();
        // files not there yet in this sweep: one `open` each, not one per sample waiting on
        // it (under a backlog, hundreds of samples wait on files the cold side has yet to
        // make, and their failed opens took 41% of the machine in `append_max`'s unthrottled
        // step)
        let mut missing: HashSet<String> = HashSet::new();
        pending.retain(|s| {
            let path = cold.join(&s.rel);
            let stale = files.get(&s.rel).is_none_or(|(_, ino, checked)| {
                checked.elapsed() > Duration::from_millis(1)
                    && fs::metadata(&path)
                        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                        .ok()
                        != Some(*ino)
            });
            if stale {
                files.remove(&s.rel);
                if !missing.contains(&s.rel) {
                    match File::open(&path).and_then(|f| Ok((f.metadata()?, f))) {
                        Ok((m, f)) => {
                            let ino = std::os::unix::fs::MetadataExt::ino(&m);
                            files.insert(s.rel.clone(), (f, ino, Instant::now()));
                        }
                        Err(_) => {
                            missing.insert(s.rel.clone());
                        }
                    }
                }
            } else if let Some(e) = files.get_mut(&s.rel) {
                if e.2.elapsed() > Duration::from_millis(1) {
                    e.2 = Instant::now();
                }
            }
            let arrived = files.get(&s.rel).is_some_and(|(f, _, _)| {
                f.read_exact_at(&mut buf, s.offset).is_ok() && buf == s.tag
            });
            if arrived {
                // stamped when seen, not when the sweep began: never earlier than the arrival
                let t = Instant::now();
                if let Some(log) = lag_log.as_mut() {
                    log.rows.push((
                        s.done,
                        t.saturating_duration_since(s.done),
                        s.rel.clone(),
                        s.offset,
                    ));
                }
                let _ = out.try_send(Some((
                    t.saturating_duration_since(s.done),
                    t.saturating_duration_since(s.started),
                )));
                false
            } else if now.duration_since(s.done) > PROBE_TIMEOUT {
                let _ = out.try_send(None);
                false
            } else {
                true
            }
        });
        // a file no sample waits on, and not the one written last, is closed now: the writer
        // has moved on, and the agent may delete it on the cold side soon. Held open, its
        // pages stayed allocated until the probe let go of dozens of such files at once, and
        // closing them (freeing every page) stalled the probe for 30 to 90 ms, a lag counted
        // against the agent (`append_max`, 1 MiB records in 10 MiB files, 32 kept)
        if files.len() > 1 {
            let waited: HashSet<&str> = pending
                .iter()
                .map(|s| s.rel.as_str())
                .chain(last.as_deref())
                .collect();
            files.retain(|rel, _| waited.contains(rel.as_str()));
        }
        if pending.is_empty() && open {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(s) => take(s, &mut pending, &mut last),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => open = false,
            }
        } else {
            std::thread::sleep(PROBE_SWEEP);
        }
    }
    if let Some(log) = lag_log {
        log.write();
    }
}

/// Every sample's lag, when `ARTEMIS_SYNC_BENCH_LAG_LOG` names a file: written at the end of
/// each probed run to that name with `.N` added (N counts the probed runs of the process),
/// one line per sample: when its sync returned (ms after the first sample's), its lag (ms),
/// its file and offset. For finding when a run's tail happens (file rotations, the host).
struct LagLog {
    path: std::ffi::OsString,
    rows: Vec<(Instant, Duration, String, u64)>,
}

impl LagLog {
    fn from_env() -> Option<LagLog> {
        std::env::var_os("ARTEMIS_SYNC_BENCH_LAG_LOG").map(|path| LagLog {
            path,
            rows: Vec::new(),
        })
    }

    fn write(self) {
        use std::fmt::Write as _;
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let first = self.rows.iter().map(|r| r.0).min();
        let mut text = String::new();
        for (done, lag, rel, offset) in &self.rows {
            let at = first.map_or(Duration::ZERO, |f| done.saturating_duration_since(f));
            let (at_ms, lag_ms) = (at.as_secs_f64() * 1e3, lag.as_secs_f64() * 1e3);
            let _ = writeln!(text, "{at_ms:.3} {lag_ms:.3} {rel} {offset}");
        }
        let mut path = self.path;
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        path.push(format!(".{n}"));
        if let Err(e) = fs::write(&path, text) {
            eprintln!(
                "ARTEMIS_SYNC_BENCH_LAG_LOG: cannot write {}: {e}",
                Path::new(&path).display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_rotates_and_probes_a_local_copy() {
        // on tmpfs where there is one: each record is `fdatasync`ed, and on a disk shared with
        // a build the 300 ms once held fewer than the 17 records that make a second file
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .unwrap();
        let cfg = WriterConfig {
            dir: dir.path().to_owned(),
            rate_per_s: None,
            duration: Duration::from_millis(300),
            file_bytes: 64 * 1024,
            record_bytes: RECORD_BYTES,
            sample_every: 1,
            paging: true,
            keep_files: None,
            first_file: 1,
        };
        // probing the hot directory itself: every record "arrives" at once
        let r = run(&cfg, Some(dir.path()), |_| {}).unwrap();
        assert!(r.records > 16 && r.files >= 2, "{r:?}");
        assert_eq!(r.lost, 0);
        assert!(!r.lags.is_empty());
        assert!(quantile(&r.lags, 0.5).unwrap() < Duration::from_secs(1));
        assert!(fs::read_dir(dir.path().join("journal")).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
