//! The shared-mode agent's share worker: the one thread that touches the share (lock, lease,
//! mount, link) and the lease's store (the share's [`ShareStore`], or the database's
//! [`crate::lease::pg::PgStore`], behind [`LeaseStore`]), one job at a time from a bounded queue, each reply numbered with its job. An
//! NFS call can block for minutes; only this thread blocks, and the agent's main thread, which
//! never waits for a reply past its fence deadline, discards a late reply by its number.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::config::{Backend, Config};
use crate::error_chain;
use crate::lease::{LeaseStore, Obs, RenewFail};
use crate::link::{self, LinkOptions};
use crate::shared::lease::{self, Lease, LeaseError, LeaseState, LOCK_FILE};
use crate::shared::lock::LockFile;
use crate::shared::mount::{self, MountRequest};
use crate::sys::RealSys;

fn obs_from_read(r: Result<Option<Lease>, LeaseError>) -> Obs {
    match r {
        Ok(None) => Obs::Missing,
        Ok(Some(l)) => Obs::Lease(l),
        Err(e) => Obs::Error(e.to_string()),
    }
}

/// What the main thread asks of the share.
pub(super) enum Job {
    Observe {
        try_lock: bool,
    },
    Takeover {
        expect: Obs,
        lease: Lease,
        settle: Duration,
    },
    Renew {
        current: Lease,
        next: Lease,
    },
    Release {
        current: Lease,
    },
    Unlock,
}

/// How a [`Job`] went.
pub(super) enum Done {
    Observed {
        locked: Result<bool, String>,
        obs: Obs,
    },
    /// `Err((written, message))`: whether our lease was written before the failure.
    TookOver(Result<(), (bool, String)>),
    Renewed(Result<(), RenewFail>),
    Released(Result<(), String>),
    Unlocked,
}

/// Numbered jobs to the share worker.
pub(super) type Jobs = Sender<(u64, Job)>;
/// Their results, with the job's number.
pub(super) type Results = Receiver<(u64, Done)>;

/// Starts the share worker's thread: numbered jobs in, numbered results out, both bounded(1).
pub(super) fn start(
    config: Arc<Config>,
    store: Box<dyn LeaseStore>,
) -> std::io::Result<(Jobs, Results)> {
    let (jobs_tx, jobs_rx) = bounded::<(u64, Job)>(1);
    let (done_tx, done_rx) = bounded::<(u64, Done)>(1);
    let mut worker = Worker { config, store };
    std::thread::Builder::new()
        .name("share-worker".into())
        .spawn(move || {
            for (seq, job) in jobs_rx.iter() {
                if done_tx.send((seq, worker.handle(job))).is_err() {
                    break;
                }
            }
        })?;
    Ok((jobs_tx, done_rx))
}

/// Does the lease and share operations, one at a time, in its own thread.
struct Worker {
    config: Arc<Config>,
    store: Box<dyn LeaseStore>,
}

impl Worker {
    fn handle(&mut self, job: Job) -> Done {
        match job {
            Job::Observe { try_lock } => {
                let (locked, obs) = self.store.observe(try_lock);
                Done::Observed { locked, obs }
            }
            Job::Takeover {
                expect,
                lease,
                settle,
            } => Done::TookOver(
                self.store
                    .take_over(&expect, &lease, settle)
                    .and_then(|()| ensure_share(&self.config).map_err(|m| (true, m))),
            ),
            Job::Renew { current, next } => Done::Renewed(self.store.renew(&current, &next)),
            Job::Release { current } => Done::Released(self.store.release(&current)),
            Job::Unlock => {
                self.store.unlock();
                Done::Unlocked
            }
        }
    }
}

/// The lock file and the lease file in the lock directory on the share.
pub(super) struct ShareStore {
    lock_path: PathBuf,
    lease_path: PathBuf,
    lock: Option<LockFile>,
}

impl ShareStore {
    pub(super) fn new(config: &Config) -> ShareStore {
        ShareStore {
            lock_path: config.lock.dir.join(LOCK_FILE),
            lease_path: lease::path(config),
            lock: None,
        }
    }
}

impl LeaseStore for ShareStore {
    fn has_lock(&self) -> bool {
        true
    }

    fn observe(&mut self, try_lock: bool) -> (Result<bool, String>, Obs) {
        let mut locked = Ok(self.lock.is_some());
        if try_lock && self.lock.is_none() {
            locked = match LockFile::try_acquire(&self.lock_path) {
                Ok(l) => {
                    self.lock = l;
                    Ok(self.lock.is_some())
                }
                Err(e) => Err(e.to_string()),
            };
        }
        (locked, obs_from_read(lease::read(&self.lease_path)))
    }

    fn take_over(
        &mut self,
        expect: &Obs,
        lease: &Lease,
        settle: Duration,
    ) -> Result<(), (bool, String)> {
        let now = obs_from_read(lease::read(&self.lease_path));
        if now != *expect {
            return Err((false, "the lease changed just before takeover".into()));
        }
        lease::write(&self.lease_path, lease).map_err(|e| (false, e.to_string()))?;
        // A second writer (locks that do not reach the other VM) would show up here.
        std::thread::sleep(settle);
        match lease::read(&self.lease_path) {
            Ok(Some(l)) if l == *lease => Ok(()),
            other => Err((
                true,
                format!("our new lease was replaced right after takeover: {other:?}"),
            )),
        }
    }

    fn renew(&mut self, current: &Lease, next: &Lease) -> Result<(), RenewFail> {
        match self.lock.as_ref().map(LockFile::still_ours) {
            None => return Err(RenewFail::Lost("the lock is not held".into())),
            Some(Ok(true)) => {}
            Some(Ok(false)) => {
                return Err(RenewFail::Lost(format!(
                    "the lock file {} was replaced",
                    self.lock_path.display()
                )))
            }
            Some(Err(e)) => {
                return Err(RenewFail::Io(format!(
                    "lock file {}: {e}",
                    self.lock_path.display()
                )))
            }
        }
        match lease::read(&self.lease_path) {
            Ok(Some(l)) if l == *current => {}
            Ok(Some(l)) => {
                return Err(RenewFail::Lost(format!(
                    "the lease now names {} under epoch {} (renewal {}), not us under epoch {}",
                    l.holder, l.epoch, l.renewals, current.epoch
                )))
            }
            Ok(None) => {
                return Err(RenewFail::Lost(format!(
                    "the lease {} disappeared",
                    self.lease_path.display()
                )))
            }
            Err(e @ LeaseError::Corrupt { .. }) => return Err(RenewFail::Lost(e.to_string())),
            Err(e) => return Err(RenewFail::Io(e.to_string())),
        }
        lease::write(&self.lease_path, next).map_err(|e| RenewFail::Io(e.to_string()))
    }

    fn release(&mut self, current: &Lease) -> Result<(), String> {
        let result = match lease::read(&self.lease_path) {
            Ok(Some(l)) if l == *current => {
                let released = Lease {
                    state: LeaseState::Released,
                    renewals: current.renewals + 1,
                    ..current.clone()
                };
                lease::write(&self.lease_path, &released).map_err(|e| e.to_string())
            }
            Ok(other) => Err(format!(
                "the lease is no longer ours ({other:?}); not marking it released"
            )),
            Err(e) => Err(e.to_string()),
        };
        self.lock = None;
        result
    }

    fn unlock(&mut self) {
        self.lock = None;
    }
}

/// Mounts the share if it is not, and makes `${BASE_DIR}/artemis` link to it.
fn ensure_share(config: &Config) -> Result<(), String> {
    if config.storage.backend() != Backend::Premounted {
        mount::mount(
            &RealSys::from_env(),
            &MountRequest::from_config(config),
            &mut std::io::sink(),
        )
        .map_err(|e| error_chain(&e))?;
    }
    link::link(
        &config.artemis_link(),
        &config.storage.mount_point,
        LinkOptions::default(),
    )
    .map(|_| ())
    .map_err(|e| error_chain(&e))
}
