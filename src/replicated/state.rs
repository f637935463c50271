//! What the replicated agent keeps across restarts (the epoch and the role, in
//! `[replication] state_file`) and the epoch gate it shares with the receiver: which hot side
//! the cold side admits, and when a hot side must step down for a newer one.
//!
//! The rules: a cold side accepts a hot side whose epoch is at least the highest it has seen,
//! and records it; a hot side refuses every stream, except that a hot side at a newer epoch
//! makes it step down (fence its node, become cold) so that the newer one can resync it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use crate::config::ReplRole;
use crate::replicated::receiver::Gate;

/// Errors reading or writing the state file, naming it.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum StateError {
    /// state file {path:?}: {reason}
    State { path: PathBuf, reason: String },
}

/// What survives a restart: the epoch and the role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplState {
    /// The highest epoch this host has held or accepted.
    pub epoch: u64,
    /// Hot or cold.
    pub role: ReplRole,
}

/// Reads the state file; `None` if there is none yet.
pub fn load_state(path: &Path) -> Result<Option<ReplState>, StateError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::State { path: path.to_owned(), reason: format!("is corrupt ({e}); it holds the epoch: restore it, or remove it only if you know which host is hot") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StateError::State { path: path.to_owned(), reason: e.to_string() }),
    }
}

/// Writes the state file atomically (temporary file, fsync, rename).
pub fn save_state(path: &Path, state: &ReplState) -> Result<(), StateError> {
    let fail = |e: std::io::Error| StateError::State {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let mut text = serde_json::to_vec_pretty(state).expect("state serializes");
    text.push(b'\n');
    crate::sys::write_atomic(path, &text).map_err(fail)
}

/// The state shared between the agent and the receiver's gate, saved on every change.
#[derive(Debug)]
pub struct EpochGate {
    state: Mutex<ReplState>,
    path: PathBuf,
    step_down: Sender<u64>,
}

impl EpochGate {
    /// The gate over `state`, saved at `path`; a newer hot side is reported on `step_down`.
    pub fn new(state: ReplState, path: PathBuf, step_down: Sender<u64>) -> EpochGate {
        EpochGate {
            state: Mutex::new(state),
            path,
            step_down,
        }
    }

    /// The current state.
    pub fn get(&self) -> ReplState {
        *self.state.lock().expect("state lock")
    }

    /// Saves `new`, then makes it current.
    pub fn set(&self, new: ReplState) -> Result<(), StateError> {
        let mut st = self.state.lock().expect("state lock");
        save_state(&self.path, &new)?;
        *st = new;
        Ok(())
    }
}

impl Gate for EpochGate {
    fn still_admitted(&self, peer_epoch: u64) -> bool {
        let st = self.state.lock().expect("state lock");
        st.role == ReplRole::Cold && st.epoch == peer_epoch
    }

    fn admit(&self, peer_epoch: u64, node: &str) -> Result<u64, (u64, String)> {
        let mut st = self.state.lock().expect("state lock");
        match st.role {
            ReplRole::Cold if peer_epoch < st.epoch => Err((
                st.epoch,
                format!("stale epoch {peer_epoch}: this side has seen epoch {}; {node} must demote and resync from the current hot", st.epoch),
            )),
            ReplRole::Cold => {
                if peer_epoch != st.epoch {
                    let new = ReplState { epoch: peer_epoch, role: ReplRole::Cold };
                    save_state(&self.path, &new).map_err(|e| (st.epoch, e.to_string()))?;
                    *st = new;
                }
                Ok(st.epoch)
            }
            ReplRole::Hot if peer_epoch > st.epoch => {
                let _ = self.step_down.try_send(peer_epoch);
                Err((st.epoch, format!("this side was hot at the older epoch {} and is stepping down; retry", st.epoch)))
            }
            ReplRole::Hot => Err((
                st.epoch,
                format!("this side is hot at epoch {} (yours is {peer_epoch}): demote and resync from it", st.epoch),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_admits_newer_epochs_when_cold_and_steps_down_when_hot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/state.json");
        assert_eq!(load_state(&path).unwrap(), None);
        let (tx, rx) = crossbeam_channel::bounded(4);
        let cold = ReplState {
            epoch: 2,
            role: ReplRole::Cold,
        };
        let gate = EpochGate::new(cold, path.clone(), tx);
        let err = gate.admit(1, "old-hot").unwrap_err();
        assert!(err.1.contains("stale epoch 1"), "{err:?}");
        assert_eq!(gate.admit(3, "hot").unwrap(), 3);
        assert!(gate.still_admitted(3));
        assert_eq!(load_state(&path).unwrap().unwrap().epoch, 3);
        gate.set(ReplState {
            epoch: 4,
            role: ReplRole::Hot,
        })
        .unwrap();
        assert!(gate
            .admit(4, "twin")
            .unwrap_err()
            .1
            .contains("hot at epoch 4"));
        assert!(gate.admit(5, "newer").is_err());
        assert_eq!(rx.try_recv(), Ok(5));
        std::fs::write(&path, "{").unwrap();
        let err = load_state(&path).unwrap_err().to_string();
        assert!(err.contains("is corrupt"), "{err}");
    }
}
