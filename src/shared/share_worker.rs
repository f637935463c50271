//! The share as a lease store: [`ShareStore`] keeps the lock file and the lease file in the
//! lock directory on the share, behind [`LeaseStore`]; [`ensure_share`] mounts the share and
//! links `${BASE_DIR}/artemis` to it after a takeover. Both run on the lease worker's thread
//! ([`crate::lease::worker`]), the only one that touches the share.

use std::path::PathBuf;
use std::time::Duration;

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
            // `next`: a retry of a renewal that was written although it reported an error
            Ok(Some(l)) if l == *current || l == *next => {}
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
            // or one renewal on: written although it reported an error (a lost answer)
            Ok(Some(l)) if l == *current || l == current.renewed() => {
                let released = Lease {
                    state: LeaseState::Released,
                    renewals: l.renewals + 1,
                    ..l
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
pub(super) fn ensure_share(config: &Config) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Review of issue 16: a renewal written although it reported an error (its answer lost)
    /// left the agent with the lease before it; retrying the renewal fenced, and releasing
    /// it left the lease held, so the other VM waited out the whole takeover delay.
    #[test]
    fn issue16_a_renewal_written_whose_answer_was_lost_is_retried_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let lock_path = dir.path().join(LOCK_FILE);
        let lease_path = dir.path().join("lease.json");
        let mut store = ShareStore {
            lock: LockFile::try_acquire(&lock_path).unwrap(),
            lock_path,
            lease_path: lease_path.clone(),
        };
        let held = |renewals| Lease {
            renewals,
            ..Lease::new("vm1:/opt/corda", 4, 20_000, 40_000)
        };
        lease::write(&lease_path, &held(6)).unwrap();
        // renewal 6 -> 7 lands; the agent heard an error and still holds 6
        store.renew(&held(6), &held(7)).unwrap();
        store.renew(&held(6), &held(7)).unwrap();
        assert_eq!(lease::read(&lease_path).unwrap(), Some(held(7)));
        // two renewals on, or someone else's lease, is not ours to renew or release
        assert!(matches!(
            store.renew(&held(5), &held(6)),
            Err(RenewFail::Lost(_))
        ));
        assert!(store.release(&held(5)).is_err());
        store.lock = LockFile::try_acquire(&store.lock_path).unwrap();
        // released from what the agent believes (6), one renewal behind the file
        store.release(&held(6)).unwrap();
        let l = lease::read(&lease_path).unwrap().unwrap();
        assert_eq!((l.state, l.renewals, l.epoch), (LeaseState::Released, 8, 4));
    }
}
