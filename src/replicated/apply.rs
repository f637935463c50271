//! The last step of the cold side: the `Applier`, the only writer of the cold data
//! directory, held under a mutex by the apply thread for each job (or by the connection for a
//! small batch with nothing ahead of it, `Jobs::apply_now`). For each batch, in sequence
//! order: validate it whole (every path confined to the data directory, no symlink or special
//! file on the way, every page's blake3 matching), then apply its ops, fsync the files and
//! directories they touched, and answer with an [`Applied`] that the connection turns into
//! `Ack`, `Nack` or a dropped stream.
//!
//! Nothing from the network touches the disk before it is checked: a batch that fails a check
//! is answered `Rejected` with nothing of it written; batches after it are skipped until the
//! hot side resends it. Files are opened with `O_NOFOLLOW`.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{SendTimeoutError, Sender, TrySendError};
use tokio::sync::{mpsc, oneshot};

use crate::replicated::ops::{Applied, Op};
use crate::replicated::pages::{
    self, confine, no_symlinks_below, FileCache, IndexPart, PagesError,
};
use crate::replicated::receiver::Gate;

mod memo;
mod meta;
mod outlet;

pub use memo::memo_path;
use memo::PageMemo;

pub(crate) use outlet::Outlet;

use meta::op_paths;

/// Batches queued for the apply thread.
pub const APPLY_QUEUE: usize = 4;
/// Batches checked and waiting for the apply thread: one, written while the next is checked.
const CHECKED_QUEUE: usize = 1;
/// A batch with at most this much page data, sent while the check thread has nothing, is
/// checked by the sender (a durable sync's record: 4 KiB, microseconds of hashing) and goes
/// straight to the apply thread: a thread's wake-up less on the sync's path.
pub(crate) const DIRECT_BATCH_BYTES: usize = 64 << 10;

/// The way to the apply thread ([`Applier::spawn`]): every job passes the check thread, but
/// for a small batch sent while that thread has nothing queued or in hand, which is checked
/// on the caller's thread and queued for the apply thread directly, or, when the apply thread
/// has nothing either, applied on the caller's thread ([`Jobs::apply_now`]). Order holds: the
/// check thread counts a job out only after it has counted it in for the apply thread, which
/// counts it out only once done, so when both counts are 0 nothing sent before is waiting.
#[derive(Clone)]
pub(crate) struct Jobs {
    check: Sender<Job>,
    apply: Sender<Job>,
    /// Jobs sent to the check thread and not yet queued for the apply thread.
    checking: Arc<AtomicUsize>,
    /// Jobs queued for the apply thread and not yet done (1 until it has read the memo).
    applying: Arc<AtomicUsize>,
    /// The applier, held by the apply thread for each job, or by [`Jobs::apply_now`].
    applier: Arc<Mutex<Applier>>,
    page_size: usize,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs")
            .field("checking", &self.checking)
            .field("applying", &self.applying)
            .finish_non_exhaustive()
    }
}

impl Jobs {
    /// Queues `job` if there is room now (back-pressure: `Full` gives it back).
    pub(crate) fn try_send(&self, mut job: Job) -> Result<(), TrySendError<Job>> {
        if let Job::Batch { ops, pages, .. } = &mut job {
            let bytes: usize = ops.iter().map(Op::data_len).sum();
            if bytes <= DIRECT_BATCH_BYTES && self.checking.load(Ordering::Acquire) == 0 {
                *pages = Some(check_pages(ops, self.page_size));
                self.applying.fetch_add(1, Ordering::AcqRel);
                match self.apply.try_send(job) {
                    Ok(()) => return Ok(()),
                    Err(TrySendError::Disconnected(j)) => {
                        self.applying.fetch_sub(1, Ordering::AcqRel);
                        return Err(TrySendError::Disconnected(j));
                    }
                    // the apply thread is busy: behind the check thread's queue, checked
                    Err(TrySendError::Full(j)) => {
                        self.applying.fetch_sub(1, Ordering::AcqRel);
                        job = j;
                    }
                }
            }
        }
        self.counted_in(|| self.check.try_send(job))
    }

    /// Applies a small batch (at most [`DIRECT_BATCH_BYTES`] of pages, no barrier) on the
    /// caller's thread, when neither thread has a job queued or in hand: a durable sync's
    /// record is then written, fsynced and answered without waking the apply thread and
    /// waiting for it to answer (two wake-ups, tens of microseconds each on a busy VM). The
    /// caller must have every earlier batch's outcome in hand, so its answers stay in order.
    /// Anything else comes back, to be sent the usual way. It blocks the caller for the
    /// batch's writes and fsyncs, as long as the caller would have waited for its answer.
    pub(crate) fn apply_now(&self, job: Job) -> Result<Applied, Job> {
        let Job::Batch { ops, .. } = &job else {
            return Err(job);
        };
        let bytes: usize = ops.iter().map(Op::data_len).sum();
        let barrier = ops.iter().any(|op| matches!(op, Op::Barrier { .. }));
        if bytes > DIRECT_BATCH_BYTES
            || barrier
            || self.checking.load(Ordering::SeqCst) != 0
            || self.applying.load(Ordering::SeqCst) != 0
        {
            return Err(job);
        }
        let Ok(mut applier) = self.applier.try_lock() else {
            return Err(job);
        };
        let Job::Batch {
            seq, epoch, ops, ..
        } = job
        else {
            unreachable!("matched above");
        };
        let pages = check_pages(&ops, self.page_size);
        Ok(applier.admitted_batch(seq, epoch, ops, Some(pages)))
    }

    /// Queues `job` through the check thread, waiting for room.
    pub(crate) fn send(&self, job: Job) -> Result<(), crossbeam_channel::SendError<Job>> {
        self.counted_in(|| self.check.send(job))
    }

    /// [`Jobs::send`], waiting at most `limit`.
    pub(crate) fn send_timeout(
        &self,
        job: Job,
        limit: Duration,
    ) -> Result<(), SendTimeoutError<Job>> {
        self.counted_in(|| self.check.send_timeout(job, limit))
    }

    /// Counts a job in for the check thread around `send`, out again if it was not sent.
    fn counted_in<E>(&self, send: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
        self.checking.fetch_add(1, Ordering::AcqRel);
        send().inspect_err(|_| {
            self.checking.fetch_sub(1, Ordering::AcqRel);
        })
    }
}

/// Work for the apply thread.
pub(crate) enum Job {
    /// A new connection: stream the tree's index into `parts` as it is walked, answer `done`
    /// once it is complete, and expect batch 1 next; the digests of the connection's barriers
    /// go to `outlet`.
    Index {
        parts: mpsc::Sender<IndexPart>,
        done: oneshot::Sender<Result<(), PagesError>>,
        outlet: Outlet,
    },
    /// Validate and apply one batch of a stream admitted at `epoch`; the outcome goes to
    /// `reply`.
    Batch {
        seq: u64,
        epoch: u64,
        ops: Vec<Op>,
        reply: mpsc::UnboundedSender<Applied>,
        /// Whether every page of `ops` matches its hash, found by the check thread on the
        /// way to the apply thread (`None`: not checked yet; the apply thread checks).
        pages: Option<Result<(), String>>,
    },
    /// Answers once every job before it is done: after a promotion, the apply thread is idle
    /// and applies nothing more (its gate refuses the old stream).
    Fence(Sender<()>),
    /// A clean stop: writes the page memo for the next start, then answers.
    Save(Sender<()>),
}

/// A job's answer, sent once the apply thread has let the applier go.
enum Answer {
    /// A batch's outcome.
    Batch(mpsc::UnboundedSender<Applied>, Applied),
    /// A fence or a save is done.
    Done(Sender<()>),
}

/// What a batch changed and has not made durable yet: files whose data it wrote
/// (`fdatasync`), entries whose metadata it changed (mode, owner: `fsync` of the inode), and
/// directories whose entries it changed (`fsync` of the directory, which also covers its own
/// metadata). Every change goes through one of the three methods, so that [`Applier::sync`]
/// cannot miss it; tests read the log of changes and syncs ([`Durability`]).
#[derive(Default)]
struct Touched {
    files: HashSet<String>,
    meta: HashSet<PathBuf>,
    dirs: HashSet<PathBuf>,
    #[cfg(test)]
    log: Vec<Durability>,
}

/// A change or an fsync, in the order they happened (tests only).
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
enum Durability {
    /// The data of a file changed.
    Data(PathBuf),
    /// The metadata of an inode changed (mode, owner).
    Meta(PathBuf),
    /// The entries of a directory changed.
    Entries(PathBuf),
    /// `fdatasync` of a file.
    SyncedData(PathBuf),
    /// `fsync` of a file or directory (data and metadata).
    SyncedAll(PathBuf),
    /// `syncfs` of the file system holding a directory (everything on it).
    SyncedFs(PathBuf),
}

impl Touched {
    /// The batch wrote data into `rel` (relative to the root, `full` absolute).
    fn data(&mut self, rel: &str, full: &Path) {
        #[cfg(test)]
        self.log.push(Durability::Data(full.to_owned()));
        #[cfg(not(test))]
        let _ = full;
        self.files.insert(rel.to_owned());
    }

    /// The batch changed the metadata (mode, owner) of `full`.
    fn meta(&mut self, full: &Path) {
        #[cfg(test)]
        self.log.push(Durability::Meta(full.to_owned()));
        self.meta.insert(full.to_owned());
    }

    /// The batch created, removed or renamed an entry of directory `dir`.
    fn entries(&mut self, dir: &Path) {
        #[cfg(test)]
        self.log.push(Durability::Entries(dir.to_owned()));
        self.dirs.insert(dir.to_owned());
    }
}

/// Applies batches to the data directory, in order.
pub(crate) struct Applier {
    root: PathBuf,
    page_size: usize,
    files: FileCache,
    expected: u64,
    /// Admits each batch again just before it is applied (a promotion fences the stream).
    gate: Option<Arc<dyn Gate>>,
    /// Where the connection's barrier digests go.
    outlet: Option<Outlet>,
    /// Told each time a job is taken from the queue (the connection waits for room).
    taken: Option<Arc<tokio::sync::Notify>>,
    /// Files a failed batch wrote and did not make durable (its fsync failed, or the batch
    /// stopped before it): fsynced before the next index is walked ([`Applier::index`]).
    unsynced: HashSet<String>,
    /// Inodes whose metadata or directory entries a failed batch changed and did not fsync.
    unsynced_inodes: HashSet<PathBuf>,
    /// The data directory's file system was synced since this start: what an agent killed in
    /// the middle of a batch left in the page cache is on the disk before an index reads it.
    synced_at_start: bool,
    /// What the apply thread knows of its files' pages, so an index reads only the rest.
    memo: PageMemo,
    /// Where the memo is kept across restarts (`Job::Save` writes it, the start reads it).
    memo_file: Option<PathBuf>,
    /// Every change and fsync of the batches applied, in order, for tests.
    #[cfg(test)]
    log: Vec<Durability>,
    /// Runs after the index read a file's pages, with its path (tests change it there).
    #[cfg(test)]
    index_hook: Option<IndexHook>,
}

/// What a test runs after the index read a file (see `Applier::index_hook`).
#[cfg(test)]
type IndexHook = Box<dyn FnMut(&Path) + Send>;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PagesError {
    let path = path.to_owned();
    move |source| PagesError::Io { op, path, source }
}

impl Applier {
    /// An applier for `root`, expecting batch 1 first.
    pub(crate) fn new(root: &Path, page_size: usize) -> Self {
        Applier {
            root: root.to_owned(),
            page_size,
            files: FileCache::default(),
            expected: 1,
            gate: None,
            outlet: None,
            taken: None,
            unsynced: HashSet::new(),
            unsynced_inodes: HashSet::new(),
            synced_at_start: false,
            memo: PageMemo::new(page_size).at(root),
            memo_file: None,
            #[cfg(test)]
            log: Vec::new(),
            #[cfg(test)]
            index_hook: None,
        }
    }

    /// Keeps the page memo in `path` across restarts: read when the apply thread starts,
    /// written on [`Job::Save`] (a clean stop).
    pub(crate) fn with_memo_file(mut self, path: PathBuf) -> Self {
        self.memo_file = Some(path);
        self
    }

    /// Reads the memo a clean stop left, and removes it (durably) before anything is applied:
    /// a memo vouches only for the start right after the stop that wrote it. After a crash a
    /// page's new data may be on the disk while the file's new ctime is not (`fdatasync`
    /// leaves timestamps to the file system's journal), and an older memo whose stamp the
    /// old ctime matches would vouch for the page as it was. One that is missing costs
    /// nothing; one that cannot be used, or removed, is said and not used (the index hashes
    /// what it would have vouched for).
    fn load_memo(&mut self) {
        let Some(path) = self.memo_file.clone() else {
            return;
        };
        if !path.exists() {
            return;
        }
        let loaded = self.memo.load(&path);
        if let Err(e) = remove_durably(&path) {
            self.memo = PageMemo::new(self.page_size)
                .at(&self.root)
                .with_min_pages(self.memo.min_pages);
            tracing::warn!(
                file = %path.display(),
                "cannot remove the page memo after reading it, so it is not used (the next index hashes every file): {e}"
            );
            return;
        }
        match loaded {
            Ok(()) => {
                let (files, pages) = self.memo.size();
                tracing::info!(file = %path.display(), files, pages, "read the page memo the last clean stop left");
            }
            Err(e) => tracing::warn!(
                file = %path.display(),
                "cannot use the page memo, the next index hashes every file: {e}"
            ),
        }
    }

    /// Writes the memo for the next start (a clean stop).
    fn save_memo(&mut self) {
        let Some(path) = &self.memo_file else { return };
        match self.memo.save(&self.root, path) {
            Ok((files, pages)) => {
                tracing::info!(file = %path.display(), files, pages, "wrote the page memo for the next start");
            }
            Err(e) => tracing::warn!(
                file = %path.display(),
                "cannot write the page memo, the next start hashes every file: {e}"
            ),
        }
    }

    /// Checks each batch with `gate` (at the epoch its stream was admitted) before applying
    /// it: once this side is promoted, nothing queued before is applied.
    pub(crate) fn with_gate(mut self, gate: Arc<dyn Gate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Tells `taken` each time a job leaves the queue: whoever waits for room in it.
    pub(crate) fn with_taken(mut self, taken: Arc<tokio::sync::Notify>) -> Self {
        self.taken = Some(taken);
        self
    }

    /// Starts the apply thread, and before it the check thread, which takes each job off the
    /// returned [`Jobs`] (at most [`APPLY_QUEUE`] wait) and hashes a batch's pages (the apply
    /// thread's largest cost after its writes) while the apply thread writes the batch
    /// before: both serve until every sender is gone.
    pub(crate) fn spawn(self) -> Jobs {
        let (jobs_tx, jobs) = crossbeam_channel::bounded(APPLY_QUEUE);
        let (checked_tx, checked) = crossbeam_channel::bounded(CHECKED_QUEUE);
        let taken = self.taken.clone();
        let page_size = self.page_size;
        let checking = Arc::new(AtomicUsize::new(0));
        // (the memo's reading counts as a job: nothing is applied before it)
        let applying = Arc::new(AtomicUsize::new(1));
        let applier = Arc::new(Mutex::new(self));
        let front = Jobs {
            check: jobs_tx,
            apply: checked_tx.clone(),
            checking: checking.clone(),
            applying: applying.clone(),
            applier: applier.clone(),
            page_size,
        };
        let counted = applying.clone();
        std::thread::Builder::new()
            .name("apply-check".into())
            .spawn(move || {
                for mut job in jobs.iter() {
                    if let Some(taken) = &taken {
                        taken.notify_one();
                    }
                    // (a small batch the apply thread had no room for comes checked)
                    if let Job::Batch {
                        ops,
                        pages: pages @ None,
                        ..
                    } = &mut job
                    {
                        *pages = Some(check_pages(ops, page_size));
                    }
                    counted.fetch_add(1, Ordering::AcqRel);
                    if checked_tx.send(job).is_err() {
                        return;
                    }
                    // only now: a batch sent direct from here on is behind this one
                    checking.fetch_sub(1, Ordering::AcqRel);
                }
            })
            .expect("spawn the check thread");
        std::thread::Builder::new()
            .name("apply".into())
            .spawn(move || Applier::run(&applier, &checked, &applying))
            .expect("spawn the apply thread");
        front
    }

    /// The apply thread: each job with the applier held, counted out once done. A panic
    /// while the applier was held (here, or on the connection applying a batch) leaves its
    /// state unknown (a page written and not yet in the memo): the thread stops, as a panic in
    /// it always stopped it, and the connection finds the apply thread gone.
    fn run(
        applier: &Mutex<Applier>,
        jobs: &crossbeam_channel::Receiver<Job>,
        applying: &AtomicUsize,
    ) {
        let Ok(mut held) = applier.lock() else { return };
        held.load_memo();
        drop(held);
        applying.fetch_sub(1, Ordering::AcqRel);
        for job in jobs.iter() {
            let Ok(mut held) = applier.lock() else {
                tracing::error!("the apply thread stops: a batch panicked while being applied");
                return;
            };
            let answer = held.job(job);
            drop(held);
            // counted out and let go before the answer: whoever has every answer in hand finds
            // the applier free (`Jobs::apply_now`)
            applying.fetch_sub(1, Ordering::AcqRel);
            match answer {
                Some(Answer::Batch(reply, outcome)) => {
                    let _ = reply.send(outcome);
                }
                Some(Answer::Done(done)) => {
                    let _ = done.send(());
                }
                None => {}
            }
        }
    }

    /// Does one job; what it answers, if anything is left to answer.
    fn job(&mut self, job: Job) -> Option<Answer> {
        match job {
            Job::Index {
                parts,
                done,
                outlet,
            } => {
                self.index(&parts, done, outlet);
                None
            }
            Job::Batch {
                seq,
                epoch,
                ops,
                reply,
                pages,
            } => Some(Answer::Batch(
                reply,
                self.admitted_batch(seq, epoch, ops, pages),
            )),
            Job::Fence(done) => Some(Answer::Done(done)),
            Job::Save(done) => {
                self.save_memo();
                Some(Answer::Done(done))
            }
        }
    }

    /// Batch `seq` of a stream admitted at `epoch`, if the gate still admits it (once this
    /// side is promoted, nothing queued before is applied).
    fn admitted_batch(
        &mut self,
        seq: u64,
        epoch: u64,
        ops: Vec<Op>,
        pages: Option<Result<(), String>>,
    ) -> Applied {
        let admitted = self.gate.as_ref().is_none_or(|g| g.still_admitted(epoch));
        if admitted {
            self.batch_checked(seq, ops, pages)
        } else {
            Applied::Skipped { seq }
        }
    }

    /// Validates and applies batch `seq` if it is the next one.
    #[cfg(test)]
    pub(crate) fn batch(&mut self, seq: u64, ops: Vec<Op>) -> Applied {
        self.batch_checked(seq, ops, None)
    }

    /// [`Applier::batch`], whose pages were checked already if `pages` says how they fared.
    fn batch_checked(
        &mut self,
        seq: u64,
        ops: Vec<Op>,
        pages: Option<Result<(), String>>,
    ) -> Applied {
        if seq != self.expected {
            return Applied::Skipped { seq };
        }
        let pages = pages.unwrap_or_else(|| check_pages(&ops, self.page_size));
        if let Err(reason) = self.validate(&ops).and(pages) {
            return Applied::Rejected { seq, reason };
        }
        let bytes = ops.iter().map(|o| o.data_len() as u64).sum();
        match self.apply(ops) {
            Ok(()) => {
                self.expected += 1;
                self.memo.batch_done(&self.root);
                Applied::Done { seq, bytes }
            }
            Err(e) => {
                self.memo.batch_failed();
                self.files.clear();
                Applied::Failed {
                    seq,
                    reason: crate::error_chain(&e),
                }
            }
        }
    }

    /// Every path confined and free of symlinks (the pages are checked by [`check_pages`]).
    /// A path below (or at) one that an earlier op of the batch creates, removes or renames
    /// cannot be checked against the disk before the batch runs (a file that becomes a
    /// directory): it is checked just before its op runs ([`Applier::guard`], which checks
    /// every op again then).
    fn validate(&self, ops: &[Op]) -> Result<(), String> {
        let mut changed: HashSet<&str> = HashSet::new();
        for op in ops {
            meta::check_target(op)?;
            for p in op_paths(op) {
                let full = confine(&self.root, p).map_err(|e| e.to_string())?;
                if !ancestors_or_self(p).any(|a| changed.contains(a)) {
                    no_symlinks_below(&self.root, &full, p).map_err(|e| e.to_string())?;
                }
            }
            if !matches!(op, Op::Write { .. }) {
                changed.extend(op_paths(op));
            }
        }
        Ok(())
    }

    /// The open file for `rel` (opened with `O_NOFOLLOW`, created if `create`).
    fn open(&mut self, rel: &str, create: bool) -> Result<&File, PagesError> {
        if self.files.get(rel).is_none() {
            let path = self.root.join(rel);
            let f = OpenOptions::new()
                .write(true)
                .create(create)
                .truncate(false)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(io_err("cannot open", &path))?;
            return Ok(self.files.keep(rel, f));
        }
        Ok(self.files.get(rel).expect("cached"))
    }

    /// Applies a validated batch, then makes it durable; the digests of its barriers go to
    /// the connection as they are read.
    fn apply(&mut self, ops: Vec<Op>) -> Result<(), PagesError> {
        let mut touched = Touched::default();
        let result = self.apply_ops(ops, &mut touched);
        if result.is_err() {
            // What the batch wrote and did not fsync may be only in the page cache. After a
            // failed fsync Linux marks those pages clean although the disk never got them:
            // the next index would read them, find them equal to the hot's, and they would
            // never be sent again. Dropping them from the cache makes the index read what the
            // disk has; the next index fsyncs the rest first.
            for rel in touched.files.drain() {
                drop_cached(&self.root.join(&rel));
                self.unsynced.insert(rel);
            }
            self.unsynced_inodes
                .extend(touched.meta.drain().chain(touched.dirs.drain()));
        }
        #[cfg(test)]
        self.log.append(&mut touched.log);
        result
    }

    /// Fsyncs the files and inodes failed batches left unsynced (see [`Applier::apply`]); a
    /// file that still cannot be fsynced is dropped from the page cache again and fails the
    /// index, so that the hot side never compares against data the disk may not have.
    fn sync_unsynced(&mut self) -> Result<(), PagesError> {
        let mut pending: Vec<String> = self.unsynced.iter().cloned().collect();
        pending.sort();
        for rel in pending {
            let path = self.root.join(&rel);
            if let Some(f) = open_nofollow(&path)? {
                if let Err(e) = f.sync_data() {
                    drop_cached(&path);
                    return Err(io_err("cannot fsync", &path)(e));
                }
            }
            self.unsynced.remove(&rel);
        }
        let inodes: Vec<PathBuf> = self.unsynced_inodes.iter().cloned().collect();
        for p in inodes {
            self.sync_inode(&p)?;
            self.unsynced_inodes.remove(&p);
        }
        Ok(())
    }

    fn apply_ops(&mut self, ops: Vec<Op>, touched: &mut Touched) -> Result<(), PagesError> {
        for op in ops {
            self.guard(&op)?;
            if !matches!(op, Op::Write { .. }) {
                tracing::trace!(op = %op.describe(), "apply");
            }
            match op {
                Op::SetAttrs { path, attrs } => self.set_attrs(&path, attrs, touched)?,
                Op::Symlink { path, target } => self.symlink(&path, &target, touched)?,
                Op::Allocate { path, offset, len } => self.allocate(&path, offset, len, touched)?,
                Op::Mkdir { path, mode } => self.mkdir(&path, mode, touched)?,
                Op::SetFile { path, len, mode } => self.set_file(path, len, mode, touched)?,
                Op::Write {
                    path,
                    offset,
                    data,
                    hashes,
                } => {
                    let full = self.root.join(&path);
                    // noted first: a write that fails part way left what it wrote in the
                    // page cache, which a failed batch must not leave unsynced
                    touched.data(&path, &full);
                    self.memo.changing(&path);
                    let f = self.open(&path, true)?;
                    f.write_all_at(&data, offset)
                        .map_err(io_err("cannot write", &full))?;
                    self.memo.write(&path, offset, data.len(), &hashes);
                }
                Op::Rename { from, to } => self.rename(&from, &to, touched)?,
                Op::Remove { path } => self.remove(&path, touched)?,
                Op::Barrier { id } => {
                    self.sync(touched)?;
                    self.barrier_digest(id)?;
                }
            }
        }
        self.sync(touched)
    }

    /// The directory holding `full` (the root for a top-level entry).
    fn parent_of(&self, full: &Path) -> PathBuf {
        full.parent().unwrap_or(&self.root).to_owned()
    }

    /// `create_dir_all(dir)`, noting every directory it created and the parent of the first
    /// one: each new entry is made durable with the batch.
    fn create_dirs(&self, dir: &Path, touched: &mut Touched) -> Result<(), PagesError> {
        let mut missing = Vec::new();
        let mut cur = dir;
        while cur.starts_with(&self.root) && cur != self.root && fs::symlink_metadata(cur).is_err()
        {
            missing.push(cur.to_owned());
            match cur.parent() {
                Some(p) => cur = p,
                None => break,
            }
        }
        // noted first: a failure part way leaves the directories it made, which a failed
        // batch must not leave unsynced
        for d in missing {
            touched.entries(&self.parent_of(&d));
            touched.entries(&d);
        }
        fs::create_dir_all(dir).map_err(io_err("cannot create directory", dir))?;
        Ok(())
    }

    /// Sets the mode of `full` if it differs, noting the inode for an `fsync`.
    fn chmod(&self, full: &Path, mode: u32, touched: &mut Touched) -> Result<(), PagesError> {
        let old = fs::symlink_metadata(full).map_err(io_err("cannot inspect", full))?;
        if std::os::unix::fs::MetadataExt::mode(&old) & 0o7777 != mode {
            pages::set_mode(full, mode)?;
            touched.meta(full);
        }
        Ok(())
    }

    fn mkdir(&mut self, path: &str, mode: u32, touched: &mut Touched) -> Result<(), PagesError> {
        let full = self.root.join(path);
        if fs::symlink_metadata(&full).is_ok_and(|m| !m.is_dir()) {
            self.files.forget(path);
            self.memo.remove(path);
            fs::remove_file(&full).map_err(io_err("cannot remove", &full))?;
            touched.entries(&self.parent_of(&full));
        }
        self.create_dirs(&full, touched)?;
        self.chmod(&full, mode, touched)
    }

    fn set_file(
        &mut self,
        path: String,
        len: u64,
        mode: u32,
        touched: &mut Touched,
    ) -> Result<(), PagesError> {
        let full = self.root.join(&path);
        let existing = fs::symlink_metadata(&full).ok();
        self.memo.changing(&path);
        if existing.as_ref().is_some_and(|m| !m.is_file()) {
            self.memo.remove(&path);
        }
        if existing.as_ref().is_some_and(|m| m.is_dir()) {
            self.files.forget(&path);
            fs::remove_dir_all(&full).map_err(io_err("cannot remove", &full))?;
        } else if existing
            .as_ref()
            .is_some_and(|m| m.file_type().is_symlink())
        {
            // a symlink became a file: replace the link, never write through it
            self.files.forget(&path);
            fs::remove_file(&full).map_err(io_err("cannot remove", &full))?;
        }
        let created = existing.is_none_or(|m| !m.is_file());
        if created {
            // noted first: a failure after the open made the entry leaves it there
            touched.entries(&self.parent_of(&full));
        }
        let f = self.open(&path, true)?;
        f.set_len(len)
            .map_err(io_err("cannot set length of", &full))?;
        self.memo.set_file(&path, len, created);
        touched.data(&path, &full);
        self.chmod(&full, mode, touched)
    }

    /// Durability before the name: makes everything the batch changed so far durable (the
    /// data renamed, and entries of directories that may be renamed away), then renames.
    fn rename(&mut self, from: &str, to: &str, touched: &mut Touched) -> Result<(), PagesError> {
        self.sync(touched)?;
        let (a, b) = (self.root.join(from), self.root.join(to));
        self.files.forget(from);
        self.files.forget(to);
        self.create_dirs(&self.parent_of(&b), touched)?;
        self.memo.changing(from);
        self.memo.changing(to);
        fs::rename(&a, &b).map_err(io_err("cannot rename", &a))?;
        self.memo.rename(from, to);
        touched.entries(&self.parent_of(&a));
        touched.entries(&self.parent_of(&b));
        Ok(())
    }

    fn remove(&mut self, path: &str, touched: &mut Touched) -> Result<(), PagesError> {
        let full = self.root.join(path);
        self.files.forget(path);
        self.memo.remove(path);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => {
                fs::remove_dir_all(&full).map_err(io_err("cannot remove", &full))?
            }
            Ok(_) => fs::remove_file(&full).map_err(io_err("cannot remove", &full))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("cannot inspect", &full)(e)),
        }
        touched.entries(&self.parent_of(&full));
        Ok(())
    }

    /// Fsyncs the data of a file the batch wrote: through its cached handle or, when the
    /// cache dropped it meanwhile (it holds [`pages::OPEN_FILES_CACHED`]), a new one (an
    /// fsync covers the file, whichever descriptor asks). A file the batch removed since is
    /// skipped (its directory's entry is synced instead).
    fn sync_file(&mut self, rel: &str, touched: &mut Touched) -> Result<(), PagesError> {
        let path = self.root.join(rel);
        let reopened;
        let file = match self.files.get(rel) {
            Some(f) => f,
            None => match open_nofollow(&path)? {
                Some(f) => {
                    reopened = f;
                    &reopened
                }
                None => return Ok(()),
            },
        };
        file.sync_data().map_err(io_err("cannot fsync", &path))?;
        #[cfg(test)]
        touched.log.push(Durability::SyncedData(path));
        #[cfg(not(test))]
        let _ = touched;
        Ok(())
    }

    /// Fsyncs the files written, the inodes whose metadata changed, and the directories whose
    /// entries changed; what the batch removed since is skipped (its parent is synced).
    fn sync(&mut self, touched: &mut Touched) -> Result<(), PagesError> {
        let files: Vec<String> = touched.files.iter().cloned().collect();
        for p in files {
            self.sync_file(&p, touched)?;
            // kept until fsynced: a failure leaves the rest for [`Applier::apply`] to note
            touched.files.remove(&p);
        }
        let inodes: Vec<PathBuf> = touched.meta.iter().chain(&touched.dirs).cloned().collect();
        for p in inodes {
            let synced = self.sync_inode(&p)?;
            #[cfg(test)]
            if let Some(synced) = synced {
                touched.log.push(Durability::SyncedAll(synced));
            }
            #[cfg(not(test))]
            let _ = synced;
            // kept until fsynced, as the files are
            touched.meta.remove(&p);
            touched.dirs.remove(&p);
        }
        Ok(())
    }

    /// Fsyncs an inode whose metadata or entries changed (a symlink's own metadata is in its
    /// directory's entry: the directory is fsynced instead); what it fsynced, `None` if gone.
    fn sync_inode(&self, p: &Path) -> Result<Option<PathBuf>, PagesError> {
        let mut p = p.to_owned();
        if fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            p = self.parent_of(&p);
        }
        match open_nofollow(&p)? {
            Some(f) => {
                f.sync_all().map_err(io_err("cannot fsync", &p))?;
                Ok(Some(p))
            }
            None => Ok(None),
        }
    }
}

/// Makes everything on the file system holding `dir` durable (`syncfs`, which also reports a
/// write-back error of any file on it since Linux 5.8).
fn sync_fs(dir: &Path) -> Result<(), PagesError> {
    let f = File::open(dir).map_err(io_err("cannot open", dir))?;
    // SAFETY: syncfs only reads its argument; the descriptor is open for this call.
    let rc = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
    if rc != 0 {
        return Err(io_err("cannot sync the file system of", dir)(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// `a/b/c`, `a/b`, `a`.
/// Removes `path` and fsyncs its directory: gone for good, whatever happens next.
fn remove_durably(path: &Path) -> io::Result<()> {
    fs::remove_file(path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
}

fn ancestors_or_self(rel: &str) -> impl Iterator<Item = &str> {
    std::iter::successors(Some(rel), |p| p.rfind('/').map(|i| &p[..i]))
}

/// Drops the clean pages of `path` from the page cache (and starts writing back its dirty
/// ones), so that the next read comes from the disk: after a failed fsync the pages the disk
/// did not take are clean in the cache. Best effort: a file that cannot be opened is read
/// from wherever the kernel has it.
fn drop_cached(path: &Path) {
    let Ok(Some(f)) = open_nofollow(path) else {
        return;
    };
    // SAFETY: posix_fadvise only reads its arguments; the descriptor is open for this call.
    let rc = unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    if rc != 0 {
        tracing::warn!(
            file = %path.display(),
            "cannot drop the file's pages from the cache (posix_fadvise: {})",
            io::Error::from_raw_os_error(rc)
        );
    }
}

/// Opens `path` read-only without following a symlink (a file or a directory); `None` if
/// nothing there opens as itself (gone, a symlink, or below a non-directory).
fn open_nofollow(path: &Path) -> Result<Option<File>, PagesError> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        // nothing there to open as itself: gone, a symlink now (the file a failed batch
        // wrote is no longer under this name, so no index reads it through it), or below
        // something that is no longer a directory
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ELOOP | libc::ENOTDIR)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(io_err("cannot open", path)(e)),
    }
}

/// Every write of `ops` whole pages of `page_size`, each matching its blake3: what the check
/// thread finds before the apply thread writes anything of the batch.
fn check_pages(ops: &[Op], page_size: usize) -> Result<(), String> {
    let ps = page_size;
    let mut digests = Vec::new();
    for op in ops {
        let Op::Write {
            path,
            offset,
            data,
            hashes,
        } = op
        else {
            continue;
        };
        if !offset.is_multiple_of(ps as u64) || data.len().div_ceil(ps) != hashes.len() {
            return Err(format!(
                "write to {path:?} at {offset}: not whole pages with one hash each"
            ));
        }
        digests.clear();
        pages::page_digests(data, ps, &mut digests);
        for (i, (got, want)) in digests.iter().zip(hashes).enumerate() {
            if got.as_bytes() != want {
                return Err(format!(
                    "page at offset {} of {path:?} failed its blake3 check",
                    offset + (i * ps) as u64
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod durability_tests;

#[cfg(test)]
mod memo_tests;
