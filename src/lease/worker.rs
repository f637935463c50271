//! The lease worker: the one thread that calls the [`LeaseStore`] (and, after a takeover, the
//! owner's set-up, such as mounting the share), one job at a time from a bounded queue, each
//! reply numbered with its job. A store call can block for minutes (an NFS server gone, a
//! database that does not answer); only this thread blocks, and the [`super::machine`], which
//! never waits for a reply past its fence deadline, discards a late reply by its number.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::daemon::metrics::Metrics;
use crate::lease::{Lease, LeaseStore, Obs, RenewFail};

/// What the machine asks of the store.
#[derive(Debug)]
pub enum Job {
    /// Read the lease (and try the lock, where there is one).
    Observe { try_lock: bool },
    /// Write `lease` in place of `expect`.
    Takeover {
        expect: Obs,
        lease: Lease,
        settle: Duration,
    },
    /// One more renewal.
    Renew { current: Lease, next: Lease },
    /// Mark `current` released and let the lock go.
    Release { current: Lease },
    /// Let the lock go.
    Unlock,
}

/// How a [`Job`] went.
#[derive(Debug)]
pub enum Done {
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

/// Numbered jobs to the worker.
pub type Jobs = Sender<(u64, Job)>;
/// Their results, with the job's number.
pub type Results = Receiver<(u64, Done)>;
/// What the owner sets up once a takeover is written, before the machine calls it hot (the
/// share's mount and link); its error gives the lease up again.
pub type AfterTakeover = Box<dyn FnMut() -> Result<(), String> + Send>;

/// Starts the worker's thread: numbered jobs in, numbered results out, both bounded(1); each
/// renewal's duration goes into `metrics`.
pub fn start(
    mut store: Box<dyn LeaseStore>,
    mut after_takeover: Option<AfterTakeover>,
    metrics: Arc<Metrics>,
) -> std::io::Result<(Jobs, Results)> {
    let (jobs_tx, jobs_rx) = bounded::<(u64, Job)>(1);
    let (done_tx, done_rx) = bounded::<(u64, Done)>(1);
    std::thread::Builder::new()
        .name("lease-worker".into())
        .spawn(move || {
            for (seq, job) in jobs_rx.iter() {
                let renewal = matches!(job, Job::Renew { .. }).then(Instant::now);
                let done = handle(store.as_mut(), after_takeover.as_mut(), job);
                if let Some(began) = renewal {
                    metrics
                        .lease_renewal_seconds
                        .observe(began.elapsed().as_secs_f64());
                }
                if done_tx.send((seq, done)).is_err() {
                    break;
                }
            }
        })?;
    Ok((jobs_tx, done_rx))
}

fn handle(
    store: &mut dyn LeaseStore,
    after_takeover: Option<&mut AfterTakeover>,
    job: Job,
) -> Done {
    match job {
        Job::Observe { try_lock } => {
            let (locked, obs) = store.observe(try_lock);
            Done::Observed { locked, obs }
        }
        Job::Takeover {
            expect,
            lease,
            settle,
        } => Done::TookOver(store.take_over(&expect, &lease, settle).and_then(|()| {
            match after_takeover {
                Some(f) => f().map_err(|m| (true, m)),
                None => Ok(()),
            }
        })),
        Job::Renew { current, next } => Done::Renewed(store.renew(&current, &next)),
        Job::Release { current } => Done::Released(store.release(&current)),
        Job::Unlock => {
            store.unlock();
            Done::Unlocked
        }
    }
}
