//! A durable sync's short way to the cold side's acknowledgement (`ack = "durable"`).
//!
//! A sync through the FUSE mount returns only once the cold side has fsynced every op made
//! from the calls before it. The long way, an [`FsEvent::Sync`] queued behind those calls'
//! events, wakes the scanner (which flushes and passes the sync on) and the network task
//! (which answers once the ack of its last batch arrives) on the sync's path: two thread
//! wake-ups there and two on the way back, each tens of microseconds on a busy VM. This watch
//! lets the FUSE thread wait for the same fact itself:
//! - the FUSE threads count each event **before** they queue it ([`AckWatch::count_event`]);
//! - after each flush the scanner publishes how many events it has handled and the last batch
//!   it has emitted on the connection ([`AckWatch::flushed`]);
//! - the connection's reader publishes each ack as it reads it ([`AckWatch::acked`]).
//!
//! A sync reads the count once its local fsync is done ([`AckWatch::queued`]): every call that
//! returned before the sync began was counted by then. The event channel is first in, first
//! out, and an event is counted before it is queued, so once the scanner has handled that many
//! events it has handled every event queued before the count was read, the sync's own calls
//! among them; the batch published with that count (or an earlier one) carries their ops, and
//! the sync waits for its ack. A connection that ends or changes meanwhile sends the sync the
//! long way ([`Waited::Lost`]), which knows how to wait for the next one.
//!
//! [`FsEvent::Sync`]: crate::replicated::capture::watch::FsEvent::Sync

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// What [`AckWatch::wait`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// The cold side acknowledged every batch carrying the events asked for.
    Acked,
    /// No connection, or it changed before that: take the long way.
    Lost,
    /// The deadline passed first.
    TimedOut,
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct AckWatch {
    /// Events the FUSE threads have queued for the scanner (counted before each is queued).
    queued: AtomicU64,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// The connection whose flushes and acks count; 0 while there is none.
    gen: u64,
    /// Whether the scanner has flushed on `gen` (after its comparison with `gen`'s index).
    published: bool,
    /// Events the scanner had handled at its last flush on `gen`.
    handled: u64,
    /// The last batch it had emitted on `gen` then (0: none).
    flushed_seq: u64,
    /// The highest batch of `gen` the cold side acknowledged.
    acked: u64,
    /// Syncs waiting: only then is anyone woken.
    waiters: usize,
}

impl AckWatch {
    /// A FUSE thread is about to queue an event.
    pub fn count_event(&self) {
        self.queued.fetch_add(1, Ordering::SeqCst);
    }

    /// Events counted so far.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::SeqCst)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connection `gen` begins: nothing of it is flushed or acknowledged yet.
    pub fn connected(&self, gen: u64) {
        let mut st = self.lock();
        *st = State {
            gen,
            waiters: st.waiters,
            ..State::default()
        };
        self.changed.notify_all();
    }

    /// Connection `gen` ended: its waiters take the long way.
    pub fn disconnected(&self, gen: u64) {
        let mut st = self.lock();
        if st.gen == gen {
            st.gen = 0;
            self.changed.notify_all();
        }
    }

    /// The scanner flushed on connection `gen` having handled `handled` events; `seq` is the
    /// last batch it emitted on it.
    pub fn flushed(&self, gen: u64, handled: u64, seq: u64) {
        let mut st = self.lock();
        if st.gen != gen {
            return;
        }
        st.published = true;
        st.handled = handled;
        st.flushed_seq = seq;
        if st.waiters > 0 {
            self.changed.notify_all();
        }
    }

    /// The cold side acknowledged batch `seq` of connection `gen` and every one before it.
    pub fn acked(&self, gen: u64, seq: u64) {
        let mut st = self.lock();
        if st.gen != gen || seq <= st.acked {
            return;
        }
        st.acked = seq;
        if st.waiters > 0 {
            self.changed.notify_all();
        }
    }

    /// Waits until the cold side has acknowledged the ops of the first `events` events, on
    /// the connection there is now.
    pub fn wait(&self, events: u64, deadline: Instant) -> Waited {
        let mut st = self.lock();
        let gen = st.gen;
        if gen == 0 {
            return Waited::Lost;
        }
        st.waiters += 1;
        let mut seq = None;
        let outcome = loop {
            if st.gen != gen {
                break Waited::Lost;
            }
            if seq.is_none() && st.published && st.handled >= events {
                seq = Some(st.flushed_seq);
            }
            if seq.is_some_and(|s| st.acked >= s) {
                break Waited::Acked;
            }
            let now = Instant::now();
            if now >= deadline {
                break Waited::TimedOut;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        st.waiters -= 1;
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// A sync waiting for the first `events` events on a thread of its own.
    fn waiting(w: &Arc<AckWatch>, events: u64) -> std::thread::JoinHandle<Waited> {
        let w = w.clone();
        std::thread::spawn(move || w.wait(events, soon()))
    }

    #[test]
    fn without_a_connection_a_sync_takes_the_long_way() {
        let w = AckWatch::default();
        assert_eq!(w.wait(0, soon()), Waited::Lost);
        w.connected(1);
        w.disconnected(1);
        assert_eq!(w.wait(0, soon()), Waited::Lost);
    }

    #[test]
    fn a_sync_waits_for_the_scanner_then_for_the_ack_of_the_batch_it_published() {
        let w = Arc::new(AckWatch::default());
        w.connected(3);
        w.count_event();
        w.count_event();
        let waiter = waiting(&w, w.queued());
        // the scanner has handled one of the two: its flush does not release the sync
        w.flushed(3, 1, 4);
        w.acked(3, 4);
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiter.is_finished(),
            "released before its events were flushed"
        );
        w.flushed(3, 2, 6);
        w.acked(3, 5);
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiter.is_finished(),
            "released before batch 6 was acknowledged"
        );
        w.acked(3, 6);
        assert_eq!(waiter.join().unwrap(), Waited::Acked);
    }

    #[test]
    fn flushes_and_acks_of_another_connection_do_not_count() {
        let w = Arc::new(AckWatch::default());
        w.connected(2);
        let waiter = waiting(&w, 1);
        w.flushed(1, 10, 1);
        w.acked(1, 1);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished());
        // the connection ends: the sync goes the long way
        w.disconnected(2);
        assert_eq!(waiter.join().unwrap(), Waited::Lost);
    }

    #[test]
    fn a_sync_waits_no_longer_than_its_deadline() {
        let w = AckWatch::default();
        w.connected(1);
        w.flushed(1, 1, 1);
        let began = Instant::now();
        let out = w.wait(1, Instant::now() + Duration::from_millis(30));
        assert_eq!(out, Waited::TimedOut);
        assert!(began.elapsed() >= Duration::from_millis(30));
        // acknowledged: at once
        w.acked(1, 1);
        assert_eq!(w.wait(1, soon()), Waited::Acked);
    }

    #[test]
    fn a_new_connection_forgets_the_last_ones_flushes() {
        let w = AckWatch::default();
        w.connected(1);
        w.flushed(1, 5, 2);
        w.acked(1, 2);
        w.connected(2);
        // nothing flushed on connection 2 yet: not acknowledged
        let out = w.wait(5, Instant::now() + Duration::from_millis(20));
        assert_eq!(out, Waited::TimedOut);
    }
}
