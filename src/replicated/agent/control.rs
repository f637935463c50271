//! The replicated agent's answers to the operator (`status`, `promote`, `demote`, `verify`
//! over the control socket): each request is judged against the role and epoch on disk and
//! the peer's last word, and answered with what was done or why not.

use super::*;
use crate::daemon::protocol::{LeaseRole, Released, Resumed};
use crate::replicated::hot_sync::HotSync;

impl Replica {
    pub(super) fn handle(&mut self, req: Incoming) {
        let answer = match req.request {
            Request::Status => Ok(Reply::Status(AgentStatus::Replicated(Box::new(
                self.status(),
            )))),
            Request::Promote { force } => self.promote(force).map(Reply::Promoted),
            Request::Demote { force } => self.demote(force).map(Reply::Demoted),
            Request::Verify => self.verify().map(Reply::Verified),
            Request::Resume => Ok(Reply::Resumed(Resumed {
                gave_up: self.sup.resume(),
            })),
            // with the database lease, `release` is the planned hand-over: a demote
            Request::Release if self.lease.is_some() => self.release_lease().map(Reply::Released),
            Request::Release => Err(req.request.not_in_mode(
                "replicated",
                "there is no lease to release; use `artemis-sync demote` on the hot host",
            )),
        };
        let _ = req.reply.send(answer);
    }

    /// While the main thread waits on a long request (a verify, a forced promotion): answers
    /// `status` at once (the CLI's, and the metrics endpoint's for `/health`, which would
    /// otherwise call a hot VM down for the verify's duration), refuses the rest.
    pub(super) fn answer_while_busy(&mut self, req: Incoming) {
        let answer = match req.request {
            Request::Status => Ok(Reply::Status(AgentStatus::Replicated(Box::new(
                self.status(),
            )))),
            other => Err(format!(
                "`{}` cannot run now: the agent is busy with another request (a verify or a forced promotion); try again when it is done",
                other.name()
            )),
        };
        let _ = req.reply.send(answer);
    }

    /// Becomes hot at a new epoch. Without `force`, only after a clean hand-over: the old hot
    /// demoted (its drained goodbye arrived) and is no longer streaming. The new epoch is on
    /// disk, and the apply thread idle for good, before the node starts.
    fn promote(&mut self, force: bool) -> Result<Promoted, String> {
        if self.lease.is_some() {
            if let Some(why) = self.sup.staying_out() {
                // the lease machine stays out of the contention: a promotion could never win
                return Err(format!(
                    "the node health watchdog gave up on this VM ({why}): it stays out of the contention until its cool-down passes or `artemis-sync resume`; run resume first, then promote"
                ));
            }
            return self.lease_promote(force);
        }
        let st = self.gate.get();
        if st.role == ReplRole::Hot {
            return self.promote_waiting_hot(force);
        }
        let rs = &self.receiver.stats;
        let now = crate::sys::now_unix_ms();
        let last_frame = rs.last_frame_unix_ms.load(Ordering::Relaxed);
        let streaming = rs.connected.load(Ordering::Relaxed)
            && now.saturating_sub(last_frame) < duration_ms(STREAMING_WITHIN);
        let drained = rs.drained.load(Ordering::Relaxed);
        if streaming && !force {
            return Err(format!(
                "the hot side {} is connected and streaming (last frame {} ms ago): demote it first (`artemis-sync demote` there), or promote --force if it cannot be reached",
                self.peer(),
                now.saturating_sub(last_frame)
            ));
        }
        if !drained && !force {
            return Err(format!(
                "the hot side {} has not handed over (no `demote`, no drained goodbye since it last connected); silence alone may be a pause: demote it first (`artemis-sync demote` there), or, if it is down for good, promote --force (if it is only paused or cut off, it runs its node until it hears of the new epoch, and what it wrote after the last applied batch is lost)",
                self.peer()
            ));
        }
        let last_ack = rs.last_ack_unix_ms.load(Ordering::Relaxed);
        let rpo = self.promote_rpo(drained);
        let new = ReplState {
            epoch: st.epoch + 1,
            role: ReplRole::Hot,
        };
        self.gate.set(new).map_err(|e| e.to_string())?;
        // the old hot's drained goodbye is used up by this promotion: kept, it would let this
        // host, once cold again, be promoted over a later hot whose stream never reached it
        rs.drained.store(false, Ordering::Relaxed);
        // the gate no longer admits the old stream: once the batch being applied is done,
        // the apply thread writes nothing more
        if let Err(pending) = self.receiver.fence(FENCE_TIMEOUT) {
            // only that fence's answer ends this wait (`fence_turn`), not the old hot's welcome
            let wait = Waiting::ApplyThread {
                fence: pending,
                rpo: rpo.clone(),
            };
            let why = wait.why();
            self.become_hot(Some(wait)).map_err(|e| e.to_string())?;
            return Err(format!(
                "hot at epoch {}, but the node waits for {why} ({rpo})",
                new.epoch
            ));
        }
        self.become_hot(None).map_err(|e| e.to_string())?;
        let behind = if last_ack == 0 {
            "no batch was ever acknowledged here".to_string()
        } else {
            format!("last batch applied {} ms ago", now.saturating_sub(last_ack))
        };
        let summary = if drained {
            "the old hot drained its stream before leaving: the copy is complete"
        } else {
            "the old hot did NOT send a drained marker: writes after the last applied batch may be missing"
        };
        tracing::warn!(
            epoch = new.epoch,
            forced = force,
            drained,
            "PROMOTED: {behind}; {summary}; {rpo}"
        );
        Ok(Promoted {
            epoch: new.epoch,
            forced: force,
            drained,
            behind,
            summary: summary.to_owned(),
            rpo,
        })
    }

    /// What the copy may lack, for `promote`: nothing after a drained hand-over, else what the
    /// old hot's last heartbeat said ([`crate::replicated::hot_sync::HotSync::promote_text`]).
    pub(super) fn promote_rpo(&self, drained: bool) -> String {
        rpo_text(drained, self.receiver.hot_sync(), self.gate.get().epoch)
    }

    /// `promote` on a hot host: `--force` starts a node that waits (for its peer, after a
    /// restart; for the apply thread, after a promotion whose fence timed out) at a new epoch;
    /// otherwise it says what the node waits for.
    fn promote_waiting_hot(&mut self, force: bool) -> Result<Promoted, String> {
        let st = self.gate.get();
        let Some(why) = self.waiting_for.as_ref().map(Waiting::why) else {
            return Err(format!("this host is already hot (epoch {})", st.epoch));
        };
        if !force {
            return Err(format!(
                "this host is hot at epoch {} but its node waits for {why}",
                st.epoch
            ));
        }
        let new = ReplState {
            epoch: st.epoch + 1,
            role: ReplRole::Hot,
        };
        self.gate.set(new).map_err(|e| e.to_string())?;
        // (a promotion whose fence timed out: what it found the copy may lack still holds)
        let promoted_rpo = match &self.waiting_for {
            Some(Waiting::ApplyThread { rpo, .. }) => Some(rpo.clone()),
            _ => None,
        };
        let apply_thread = promoted_rpo.is_some();
        self.stop_sender();
        self.become_hot(None).map_err(|e| e.to_string())?;
        let summary = if apply_thread {
            "forced before the apply thread finished its batch: it may still write that batch of the old stream into the data directory under the node"
        } else {
            "forced without the peer's confirmation: if the peer was promoted meanwhile, this host turns cold when it hears of it (of two hot hosts at one epoch, the one with the greater holder id stays hot)"
        };
        tracing::warn!(
            epoch = new.epoch,
            "PROMOTED (--force, was waiting for {why}): {summary}"
        );
        Ok(Promoted {
            epoch: new.epoch,
            forced: true,
            drained: false,
            behind: "this host was already hot".into(),
            summary: summary.into(),
            rpo: promoted_rpo
                .unwrap_or_else(|| "this host was hot: it has what its own node wrote".into()),
        })
    }

    /// `release` with the database lease: `demote` (node stopped, stream drained, the row
    /// says in sync and is released), answered as shared mode answers it.
    fn release_lease(&mut self) -> Result<Released, String> {
        let role = self.lease.as_ref().map_or(LeaseRole::Cold, |m| m.role());
        if self.gate.get().role != ReplRole::Hot {
            return Ok(Released {
                epoch: None,
                role,
                holdoff_ms: 0,
            });
        }
        let demoted = self.demote(false)?;
        Ok(Released {
            epoch: Some(demoted.epoch),
            role,
            holdoff_ms: self.config.lock.wait_interval_ms,
        })
    }

    pub(super) fn demote(&mut self, force: bool) -> Result<Demoted, String> {
        let st = self.gate.get();
        if st.role != ReplRole::Hot {
            return Err(format!("this host is not hot (epoch {})", st.epoch));
        }
        self.sup.release(Some(st.epoch));
        let drained = self.drain();
        if let Err(e) = &drained {
            if !force {
                return Err(format!("the node is stopped, but the stream could not be drained ({e}); this host stays hot so nothing is lost: demote again once the cold side is connected, or demote --force"));
            }
        }
        self.hand_lease_over(drained.is_ok(), "demoted");
        self.stop_sender();
        self.waiting_for = None;
        self.gate
            .set(ReplState {
                epoch: st.epoch,
                role: ReplRole::Cold,
            })
            .map_err(|e| e.to_string())?;
        tracing::info!(epoch = st.epoch, "demoted: cold");
        Ok(Demoted {
            epoch: st.epoch,
            drained: drained.is_ok(),
            last_seq: drained.ok(),
        })
    }

    fn verify(&mut self) -> Result<Verified, String> {
        let Some(s) = &self.sender else {
            return Err("verify runs on the hot host (this one is cold)".into());
        };
        let (tx, rx) = bounded(1);
        s.ctl
            .send(ScanMsg::Verify(tx))
            .map_err(|_| "the scanner stopped".to_string())?;
        let report = self.wait_keeping_lease(&rx, VERIFY_TIMEOUT)??;
        self.metrics.verified(report.identical);
        Ok(Verified {
            identical: report.identical,
            hot_root: report.hot_root,
            cold_root: report.cold_root,
            files: u64::try_from(report.files).unwrap_or(u64::MAX),
            differing: report.differing,
        })
    }

    /// The connected hot side's address on a cold host, else `[replication] peer`.
    fn peer(&self) -> String {
        self.receiver
            .stats
            .peer
            .lock()
            .expect("peer lock")
            .clone()
            .unwrap_or_else(|| self.repl.peer.clone())
    }

    fn status(&self) -> ReplicatedStatus {
        let st = self.gate.get();
        let (sync_progress, sync_done) = self
            .sender
            .as_ref()
            .map_or((None, None), |s| s.stats.sync.snapshot());
        let now = crate::sys::now_unix_ms();
        let (connected, last_ack, drained, wire, data, batches) = match &self.sender {
            Some(s) => {
                let x = &s.stats;
                (
                    x.connected.load(Ordering::Relaxed),
                    x.last_ack_unix_ms.load(Ordering::Relaxed),
                    None,
                    x.wire_bytes.load(Ordering::Relaxed),
                    x.data_bytes.load(Ordering::Relaxed),
                    x.batches.load(Ordering::Relaxed),
                )
            }
            None => {
                let x = &self.receiver.stats;
                (
                    x.connected.load(Ordering::Relaxed),
                    x.last_ack_unix_ms.load(Ordering::Relaxed),
                    Some(x.drained.load(Ordering::Relaxed)),
                    x.wire_bytes.load(Ordering::Relaxed),
                    x.data_bytes.load(Ordering::Relaxed),
                    x.batches.load(Ordering::Relaxed),
                )
            }
        };
        ReplicatedStatus {
            role: st.role,
            epoch: st.epoch,
            holder: self.config.holder_id(),
            data_dir: self.repl.data_dir.display().to_string(),
            listen: self.listen.to_string(),
            peer: self.peer(),
            connected,
            synced: self.sender.as_ref().map(|s| s.stats.synced()),
            last_ack_age_ms: (last_ack > 0).then(|| now.saturating_sub(last_ack)),
            drained,
            wire_bytes: wire,
            wire_out_bytes: self
                .sender
                .is_none()
                .then(|| self.receiver.stats.wire_out_bytes.load(Ordering::Relaxed)),
            data_bytes: data,
            batches,
            node_pid: self.sup.node_pid(),
            node_state: self.sup.node_state(),
            waiting_for: self.waiting_for.as_ref().map(Waiting::why),
            watch_limit: self.sender.as_ref().and_then(|s| {
                s.stats
                    .watch_limit
                    .lock()
                    .expect("watch limit lock")
                    .clone()
            }),
            degraded: self.sender.as_ref().and_then(|s| {
                let since = s.stats.degraded_since_unix_ms.load(Ordering::Relaxed);
                (since > 0).then(|| {
                    format!(
                        "degraded since {} s ago (unix ms {since}): the cold copy may lack data",
                        now.saturating_sub(since) / 1000
                    )
                })
            }),
            lease: self.lease_status(),
            blocked: self.sender.as_ref().and_then(|s| {
                let since = s.stats.blocked_since_unix_ms.load(Ordering::Relaxed);
                (since > 0).then(|| {
                    format!(
                        "a durable sync has waited {} ms for the cold side (on_peer_loss = \"block\"): the node's syncs wait until it is back",
                        now.saturating_sub(since)
                    )
                })
            }),
            hot_sync: self.sender.is_none().then(|| {
                self.receiver.hot_sync().map_or_else(
                    || "no heartbeat from a hot side since this agent started".into(),
                    |h| h.status_text(),
                )
            }),
            lag_ms: self.lag_ms(),
            unacked_bytes: self
                .sender
                .as_ref()
                .map(|s| s.stats.window_bytes.load(Ordering::Relaxed)),
            sync_progress,
            sync_done,
            reconnects: self
                .sender
                .as_ref()
                .map_or(0, |s| s.stats.reconnects.load(Ordering::Relaxed)),
            resends: self
                .sender
                .as_ref()
                .map_or(0, |s| s.stats.nacks.load(Ordering::Relaxed)),
            checksum_failures: self.receiver.stats.checksum_failures.load(Ordering::Relaxed),
            apply_error: self.receiver.stats.apply_error().map(|e| {
                format!(
                    "batches cannot be applied since {} s ago (unix ms {}): {}; nothing unwritten is acknowledged, the hot side resyncs until they apply",
                    now.saturating_sub(e.since_unix_ms) / 1000,
                    e.since_unix_ms,
                    e.reason
                )
            }),
            apply_failures: self.receiver.stats.apply_failures.load(Ordering::Relaxed),
            metrics_error: self.endpoint.error(),
            error: self.sup.last_error(),
            node_health: self.sup.node_health(),
        }
    }

    /// Hot: the oldest unacknowledged batch's age (0: none); cold: the hot's last heartbeat's.
    fn lag_ms(&self) -> Option<u64> {
        match &self.sender {
            Some(s) => {
                let oldest = s.stats.oldest_unacked_unix_ms.load(Ordering::Relaxed);
                Some(if oldest == 0 {
                    0
                } else {
                    crate::sys::now_unix_ms().saturating_sub(oldest).max(1)
                })
            }
            None => self.receiver.hot_sync().map(|h| h.state.unacked_ms),
        }
    }
}

/// [`Replica::promote_rpo`] for a host at `epoch` whose last heartbeat was `hot_sync`: a
/// heartbeat of an older epoch says nothing of the copy (this host was hot since, or followed
/// a newer hot that it has not heard from).
fn rpo_text(drained: bool, hot_sync: Option<HotSync>, epoch: u64) -> String {
    if drained {
        return "RPO 0: the old hot drained its stream before it left".to_owned();
    }
    match hot_sync {
        None => "RPO unknown: no heartbeat from a hot side since this agent started".into(),
        Some(h) if h.epoch < epoch => format!(
            "RPO unknown: the last heartbeat was from a hot side at epoch {}, older than this host's epoch {epoch}; nothing was heard from the hot side of epoch {epoch} (this host may have been hot itself since)",
            h.epoch
        ),
        Some(h) => h.promote_text(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicated::wire::HotState;

    #[test]
    fn issue12_promote_reports_no_rpo_0_from_a_heartbeat_of_an_older_epoch() {
        let in_sync = HotSync::new(
            HotState {
                durable: true,
                block: true,
                caught_up: true,
                degraded_since_unix_ms: 0,
                unacked_ms: 0,
                peer_timeout_ms: 2000,
            },
            1,
        );
        assert!(rpo_text(false, Some(in_sync), 1).starts_with("RPO 0: "));
        // this host was promoted to epoch 2 since that heartbeat, and is cold again
        let text = rpo_text(false, Some(in_sync), 2);
        assert!(
            text.starts_with("RPO unknown: ")
                && text.contains("epoch 1, older than this host's epoch 2"),
            "{text}"
        );
        assert!(rpo_text(true, Some(in_sync), 2).starts_with("RPO 0: "));
        assert!(rpo_text(false, None, 2).starts_with("RPO unknown: "));
    }
}
