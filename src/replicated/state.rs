//! What the replicated agent keeps across restarts (the epoch and the role, in
//! `[replication] state_file`) and the epoch gate it shares with the receiver: which hot side
//! the cold side admits, and when a hot side must step down for a newer one.
//!
//! The rules: a cold side accepts a hot side whose epoch is at least the highest it has seen,
//! and records it; a hot side refuses every stream, except that a hot side at a newer epoch
//! makes it step down (fence its node, become cold) so that the newer one can resync it. Two
//! hot sides at one epoch (forced promotions on both sides of a cut) are settled by
//! [`tie_break`]: the greater holder id stays hot, the other steps down; the same holder id on
//! both makes both step down.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use std::cmp::Ordering;

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use crate::config::ReplRole;
use crate::replicated::receiver::{Gate, Refusal};

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

/// Two hot sides at one epoch: which of them stays hot, seen from one of them. Both compute
/// it from the same two holder ids (`machine_name:base_dir`, the intro's and the refusal's
/// `node`), so they reach opposite answers, or both [`Tie::Both`]: exactly one stays hot, or
/// none does, never two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tie {
    /// Ours is the greater holder id: this side stays hot; the peer steps down.
    Stay,
    /// The peer's is the greater: this side steps down, and is resynced from the peer.
    StepDown,
    /// Both have the same holder id (two VMs with one `[lock] machine_name`): neither can be
    /// told from the other, so both step down, and no node runs until an operator promotes one.
    Both,
}

/// The tie-break between two hot sides at one epoch, `ours` and `theirs` their holder ids:
/// `(epoch, holder id)` compared as a pair, bytewise, the greater stays hot.
pub fn tie_break(ours: &str, theirs: &str) -> Tie {
    match ours.as_bytes().cmp(theirs.as_bytes()) {
        Ordering::Greater => Tie::Stay,
        Ordering::Less => Tie::StepDown,
        Ordering::Equal => Tie::Both,
    }
}

impl Tie {
    /// What happened and what happens now, as this side (holder id `ours`) sees it: the
    /// log line and `status` error of the side that refused and of the side refused alike.
    pub fn explain(self, epoch: u64, ours: &str, theirs: &str) -> String {
        let two = format!("two hot sides at epoch {epoch} ({ours} here, {theirs} there: forced promotions on both sides of a cut)");
        match self {
            Tie::Stay => format!("{two}; the greater holder id stays hot: this side stays, {theirs} steps down and is resynced from it"),
            Tie::StepDown => format!("{two}; the greater holder id stays hot: this side steps down, {theirs} stays hot and resyncs it"),
            Tie::Both => format!("{two}; both sides have the same holder id, so neither can be chosen: both step down and no node runs; give each VM its own [lock] machine_name, then promote one with `artemis-sync promote --force`"),
        }
    }
}

/// The gate's word to the agent: stop the node and turn cold at `epoch`, for `why`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepDown {
    /// The peer's epoch: newer than ours, or ours (a tie lost, [`tie_break`]).
    pub epoch: u64,
    /// The peer's holder id.
    pub peer: String,
    /// Why, for the log and `status`.
    pub why: String,
}

/// The state shared between the agent and the receiver's gate, saved on every change.
#[derive(Debug)]
pub struct EpochGate {
    state: Mutex<ReplState>,
    path: PathBuf,
    /// Our holder id, for the tie-break and our refusals.
    node: String,
    step_down: Sender<StepDown>,
}

impl EpochGate {
    /// The gate over `state`, saved at `path`, of the agent whose holder id is `node`; a hot
    /// side this one must step down for is reported on `step_down`.
    pub fn new(
        state: ReplState,
        path: PathBuf,
        node: String,
        step_down: Sender<StepDown>,
    ) -> EpochGate {
        EpochGate {
            state: Mutex::new(state),
            path,
            node,
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
    fn node(&self) -> &str {
        &self.node
    }

    fn still_admitted(&self, peer_epoch: u64) -> bool {
        let st = self.state.lock().expect("state lock");
        st.role == ReplRole::Cold && st.epoch == peer_epoch
    }

    fn admit(&self, peer_epoch: u64, node: &str) -> Result<u64, Refusal> {
        let mut st = self.state.lock().expect("state lock");
        let refuse = |st: &ReplState, reason: String| Refusal {
            epoch: st.epoch,
            hot: st.role == ReplRole::Hot,
            reason,
        };
        match st.role {
            ReplRole::Cold if peer_epoch < st.epoch => Err(refuse(
                &st,
                format!("stale epoch {peer_epoch}: this side has seen epoch {}; {node} must demote and resync from the current hot", st.epoch),
            )),
            ReplRole::Cold => {
                if peer_epoch != st.epoch {
                    let new = ReplState { epoch: peer_epoch, role: ReplRole::Cold };
                    save_state(&self.path, &new).map_err(|e| refuse(&st, e.to_string()))?;
                    *st = new;
                }
                Ok(st.epoch)
            }
            ReplRole::Hot if peer_epoch > st.epoch => {
                let _ = self.step_down.try_send(StepDown {
                    epoch: peer_epoch,
                    peer: node.to_owned(),
                    why: format!("{node}, a hot side at the newer epoch {peer_epoch}, connected"),
                });
                Err(refuse(&st, format!("this side was hot at the older epoch {} and is stepping down; retry", st.epoch)))
            }
            ReplRole::Hot if peer_epoch == st.epoch => {
                // two writers: the one thing never allowed; both sides settle it alike
                let tie = tie_break(&self.node, node);
                let why = tie.explain(st.epoch, &self.node, node);
                if tie != Tie::Stay {
                    let _ = self.step_down.try_send(StepDown {
                        epoch: peer_epoch,
                        peer: node.to_owned(),
                        why: why.clone(),
                    });
                }
                Err(refuse(&st, why))
            }
            ReplRole::Hot => Err(refuse(
                &st,
                format!("this side is hot at epoch {} (yours is {peer_epoch}): demote and resync from it", st.epoch),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate_at(
        dir: &tempfile::TempDir,
        node: &str,
        state: ReplState,
    ) -> (EpochGate, crossbeam_channel::Receiver<StepDown>) {
        let (tx, rx) = crossbeam_channel::bounded(4);
        let path = dir.path().join("state/state.json");
        (EpochGate::new(state, path, node.into(), tx), rx)
    }

    #[test]
    fn the_gate_admits_newer_epochs_when_cold_and_steps_down_when_hot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/state.json");
        assert_eq!(load_state(&path).unwrap(), None);
        let cold = ReplState {
            epoch: 2,
            role: ReplRole::Cold,
        };
        let (gate, rx) = gate_at(&dir, "b:/opt/corda", cold);
        let err = gate.admit(1, "old-hot").unwrap_err();
        assert!(err.reason.contains("stale epoch 1"), "{err:?}");
        assert_eq!((err.epoch, err.hot), (2, false));
        assert_eq!(gate.admit(3, "hot").unwrap(), 3);
        assert!(gate.still_admitted(3));
        assert_eq!(load_state(&path).unwrap().unwrap().epoch, 3);
        gate.set(ReplState {
            epoch: 4,
            role: ReplRole::Hot,
        })
        .unwrap();
        let err = gate.admit(3, "older").unwrap_err();
        assert!(err.reason.contains("hot at epoch 4"), "{err:?}");
        assert_eq!((err.epoch, err.hot), (4, true));
        assert!(
            rx.try_recv().is_err(),
            "an older hot side made it step down"
        );
        assert!(gate.admit(5, "newer").is_err());
        assert_eq!(
            rx.try_recv().map(|s| (s.epoch, s.peer)),
            Ok((5, "newer".into()))
        );
        std::fs::write(&path, "{").unwrap();
        let err = load_state(&path).unwrap_err().to_string();
        assert!(err.contains("is corrupt"), "{err}");
    }

    #[test]
    fn issue10_two_hots_at_one_epoch_the_greater_holder_id_stays_the_same_id_makes_both_step_down()
    {
        // the rule: opposite answers from the two sides, or both step down; never both stay
        let ids = [
            "vm1:/opt/corda",
            "vm2:/opt/corda",
            "vm1:/opt/corda2",
            "vm10:/opt/corda",
            "",
        ];
        for a in ids {
            for b in ids {
                let (ab, ba) = (tie_break(a, b), tie_break(b, a));
                match ab {
                    Tie::Stay => assert_eq!(ba, Tie::StepDown, "{a:?} {b:?}"),
                    Tie::StepDown => assert_eq!(ba, Tie::Stay, "{a:?} {b:?}"),
                    Tie::Both => assert!(a == b && ba == Tie::Both, "{a:?} {b:?}"),
                }
            }
        }
        assert_eq!(tie_break("vm2:/opt/corda", "vm1:/opt/corda"), Tie::Stay);
        assert_eq!(tie_break("vm1:/opt/corda", "vm2:/opt/corda"), Tie::StepDown);
        assert_eq!(tie_break("vm1:/opt/corda", "vm1:/opt/corda"), Tie::Both);

        // the gate of a hot side applies it to an intro at its own epoch
        let hot = ReplState {
            epoch: 7,
            role: ReplRole::Hot,
        };
        let dir = tempfile::tempdir().unwrap();
        let (winner, rx) = gate_at(&dir, "vm2:/opt/corda", hot);
        let err = winner.admit(7, "vm1:/opt/corda").unwrap_err();
        assert_eq!((err.epoch, err.hot), (7, true));
        assert!(
            err.reason.contains("two hot sides at epoch 7")
                && err.reason.contains("vm1:/opt/corda steps down"),
            "{err:?}"
        );
        assert!(rx.try_recv().is_err(), "the winner was told to step down");

        let (loser, rx) = gate_at(&dir, "vm1:/opt/corda", hot);
        let err = loser.admit(7, "vm2:/opt/corda").unwrap_err();
        assert_eq!((err.epoch, err.hot), (7, true));
        assert!(err.reason.contains("this side steps down"), "{err:?}");
        let told = rx.try_recv().unwrap();
        assert_eq!((told.epoch, told.peer.as_str()), (7, "vm2:/opt/corda"));
        assert!(told.why.contains("two hot sides at epoch 7"), "{told:?}");

        let (twin, rx) = gate_at(&dir, "vm1:/opt/corda", hot);
        let err = twin.admit(7, "vm1:/opt/corda").unwrap_err();
        assert!(err.reason.contains("same holder id"), "{err:?}");
        assert!(err.reason.contains("machine_name"), "{err:?}");
        assert_eq!(rx.try_recv().unwrap().epoch, 7);
        // the gate records nothing itself: the agent turns cold (state file first)
        assert_eq!(twin.get(), hot);
    }
}
