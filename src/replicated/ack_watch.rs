//! A durable sync's short way to the cold side's acknowledgement (`ack = "durable"`).
//!
//! A sync through the FUSE mount returns only once the cold side has fsynced every op made
//! from the calls before it. The long way, an [`FsEvent::Sync`] queued behind those calls'
//! events, wakes the scanner (which flushes and passes the sync on) and the network task
//! (which answers once the ack of its last batch arrives) on the sync's path: two thread
//! wake-ups there and two on the way back, each tens of microseconds on a busy VM. This watch
//! tells the sync's reply the same fact directly:
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
//! the sync is answered on its ack. The sync registers its reply ([`AckWatch::register`]);
//! whoever makes the fact true gives it (the reader, as it reads the ack; the scanner, when the
//! ack came before its flush was published), and takes the sync out of the watch as it does, so
//! nobody else wakes for it; whoever holds the [`Ticket`] looks now and then whether the
//! deadline passed ([`AckWatch::try_ticket`]) or sleeps until it ([`AckWatch::wait_ticket`]).
//! A connection that ends or changes meanwhile sends the sync the long way
//! ([`Waited::Lost`]), which knows how to wait for the next one; acks of a later connection
//! never answer it.
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

/// A sync's answer to its caller (for the FUSE mount: the reply to the kernel's `fsync`).
/// Whoever finds the sync's batch acknowledged first gives it: the connection's reader as it
/// reads the ack, the scanner as it publishes a flush, or the waiting thread itself. So the
/// caller hears back without waiting for the waiting thread to wake.
pub type Answer = Box<dyn FnOnce() + Send>;

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
    /// The syncs waiting (an acknowledged one is taken out as it is answered).
    waiting: Vec<Waiter>,
    /// Threads asleep in [`AckWatch::wait_ticket`]: only while there are any is anyone woken.
    sleepers: usize,
    /// Names the next waiter.
    next_id: u64,
}

/// One waiting sync.
struct Waiter {
    id: u64,
    /// The connection it waits on.
    gen: u64,
    /// The events whose ops it waits for.
    events: u64,
    /// The batch carrying the last of them, once a flush has covered them.
    seq: Option<u64>,
    /// Its answer, until given.
    answer: Option<Answer>,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter")
            .field("id", &self.id)
            .field("gen", &self.gen)
            .field("events", &self.events)
            .field("seq", &self.seq)
            .field("answer", &self.answer.is_some())
            .finish()
    }
}

impl State {
    /// Takes out the waiters of `gen` whose batch is acknowledged; returns their answers, and
    /// whether there were any such waiters. A waiter taken out was acknowledged: its ticket,
    /// not found, says so ([`AckWatch::try_ticket`]).
    fn ripe(&mut self) -> (Vec<Answer>, bool) {
        let (gen, published, handled) = (self.gen, self.published, self.handled);
        let (flushed_seq, acked) = (self.flushed_seq, self.acked);
        let mut answers = Vec::new();
        let mut any = false;
        self.waiting.retain_mut(|w| {
            if w.gen != gen {
                return true;
            }
            if w.seq.is_none() && published && handled >= w.events {
                w.seq = Some(flushed_seq);
            }
            if w.seq.is_some_and(|s| acked >= s) {
                any = true;
                answers.extend(w.answer.take());
                return false;
            }
            true
        });
        (answers, any)
    }

    /// What became of `ticket`'s sync, if anything has by now: acknowledged, its connection
    /// ended or changed, or `deadline` passed (then it is taken out, its answer back unless it
    /// was given). `None` while it still waits.
    fn outcome(&mut self, ticket: &Ticket, deadline: Instant) -> Option<(Waited, Option<Answer>)> {
        let Some(at) = self.waiting.iter().position(|w| w.id == ticket.id) else {
            return Some((Waited::Acked, None));
        };
        let waited = if self.gen != ticket.gen {
            Waited::Lost
        } else if Instant::now() >= deadline {
            Waited::TimedOut
        } else {
            return None;
        };
        Some((waited, self.waiting.swap_remove(at).answer))
    }
}

impl AckWatch {
    /// A FUSE thread is about to queue an event.
    pub fn count_event(&self) {
        self.queued.fetch_add(1, Ordering::SeqCst);
    }

    /// An event its maker hands the scanner at once instead of queuing it
    /// ([`crate::replicated::capture::InlineScan`]): counted only if `handled`, the number of
    /// events the scanner has handled (read under its lock), is every event counted so far,
    /// so it takes the next place in order with nothing queued ahead of it. `false` when
    /// another was counted first: queue it then, counted as usual.
    pub fn count_handled_now(&self, handled: u64) -> bool {
        self.queued
            .compare_exchange(handled, handled + 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
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
        st.gen = gen;
        st.published = false;
        st.handled = 0;
        st.flushed_seq = 0;
        st.acked = 0;
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

    /// After a change of `st`: gives the answers of the syncs it released (the lock let go
    /// first), then wakes the threads waiting for them.
    fn release(&self, mut st: MutexGuard<'_, State>) {
        if st.waiting.is_empty() {
            return;
        }
        let (answers, any) = st.ripe();
        let sleepers = st.sleepers;
        drop(st);
        for answer in answers {
            answer();
        }
        if any && sleepers > 0 {
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
        self.release(st);
    }

    /// The cold side acknowledged batch `seq` of connection `gen` and every one before it.
    pub fn acked(&self, gen: u64, seq: u64) {
        let mut st = self.lock();
        if st.gen != gen || seq <= st.acked {
            return;
        }
        st.acked = seq;
        self.release(st);
    }

    /// Waits until the cold side has acknowledged the ops of the first `events` events, on
    /// the connection there is now. An `answer` given is called as soon as they are (by
    /// whichever thread finds out first, this one or another); one not called is left in
    /// `answer` for the caller: always unless the outcome is [`Waited::Acked`].
    pub fn wait(&self, events: u64, deadline: Instant, answer: &mut Option<Answer>) -> Waited {
        let ticket = match self.register(events, answer.take()) {
            Ok(t) => t,
            Err(a) => {
                *answer = a;
                return Waited::Lost;
            }
        };
        let (waited, left) = self.wait_ticket(ticket, deadline);
        *answer = left;
        waited
    }

    /// Registers a sync for the ops of the first `events` events on the connection there is
    /// now, without waiting: its `answer` is given as soon as they are acknowledged. Without a
    /// connection, the answer back. The ticket must be waited for ([`AckWatch::wait_ticket`],
    /// [`AckWatch::try_ticket`]).
    pub fn register(&self, events: u64, answer: Option<Answer>) -> Result<Ticket, Option<Answer>> {
        let mut st = self.lock();
        let gen = st.gen;
        if gen == 0 {
            return Err(answer);
        }
        let id = st.next_id;
        st.next_id += 1;
        st.waiting.push(Waiter {
            id,
            gen,
            events,
            seq: None,
            answer,
        });
        // already acknowledged (or there is nobody else to tell it)
        self.release(st);
        Ok(Ticket { id, gen })
    }

    /// Waits for a registered sync until it is acknowledged, its connection ends or changes,
    /// or `deadline`; its answer back unless it was given.
    pub fn wait_ticket(&self, ticket: Ticket, deadline: Instant) -> (Waited, Option<Answer>) {
        let mut st = self.lock();
        loop {
            // (every change that can ripen a sync, `register`, `flushed` and `acked`, has
            // released it already)
            if let Some(outcome) = st.outcome(&ticket, deadline) {
                return outcome;
            }
            st.sleepers += 1;
            st = self
                .changed
                .wait_timeout(st, deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            st.sleepers -= 1;
        }
    }

    /// Syncs registered and not yet answered or taken out.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// [`AckWatch::wait_ticket`] without waiting: what became of the sync by now, or (it
    /// still waits, and `deadline` has not passed) the ticket back.
    pub fn try_ticket(
        &self,
        ticket: Ticket,
        deadline: Instant,
    ) -> Result<(Waited, Option<Answer>), Ticket> {
        self.lock().outcome(&ticket, deadline).ok_or(ticket)
    }
}

/// A sync registered with [`AckWatch::register`].
#[derive(Debug)]
#[must_use = "a registered sync stays in the watch until it is waited for"]
pub struct Ticket {
    id: u64,
    gen: u64,
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
        std::thread::spawn(move || w.wait(events, soon(), &mut None))
    }

    #[test]
    fn without_a_connection_a_sync_takes_the_long_way() {
        let w = AckWatch::default();
        assert_eq!(w.wait(0, soon(), &mut None), Waited::Lost);
        w.connected(1);
        w.disconnected(1);
        assert_eq!(w.wait(0, soon(), &mut None), Waited::Lost);
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
        let out = w.wait(1, Instant::now() + Duration::from_millis(30), &mut None);
        assert_eq!(out, Waited::TimedOut);
        assert!(began.elapsed() >= Duration::from_millis(30));
        // acknowledged: at once
        w.acked(1, 1);
        assert_eq!(w.wait(1, soon(), &mut None), Waited::Acked);
    }

    #[test]
    fn a_new_connection_forgets_the_last_ones_flushes() {
        let w = AckWatch::default();
        w.connected(1);
        w.flushed(1, 5, 2);
        w.acked(1, 2);
        w.connected(2);
        // nothing flushed on connection 2 yet: not acknowledged
        let out = w.wait(5, Instant::now() + Duration::from_millis(20), &mut None);
        assert_eq!(out, Waited::TimedOut);
    }

    /// An answer that records, on a channel, that it was given.
    fn answer() -> (Option<Answer>, crossbeam_channel::Receiver<()>) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        (Some(Box::new(move || tx.send(()).unwrap())), rx)
    }

    #[test]
    fn issue12_the_ack_answers_a_registered_sync_on_the_readers_thread() {
        let w = AckWatch::default();
        w.connected(1);
        w.count_event();
        let (a, given) = answer();
        let ticket = w.register(w.queued(), a).ok().unwrap();
        w.flushed(1, 1, 2);
        w.acked(1, 1);
        assert!(given.try_recv().is_err(), "answered before its batch's ack");
        // the reader's call itself answers, before any waiting thread has run
        w.acked(1, 2);
        assert!(given.try_recv().is_ok(), "not answered by the ack");
        let (waited, left) = w.wait_ticket(ticket, soon());
        assert_eq!(waited, Waited::Acked);
        assert!(left.is_none());
        assert!(given.try_recv().is_err(), "answered twice");
    }

    #[test]
    fn issue12_a_sync_registered_after_its_ack_is_answered_at_once() {
        let w = AckWatch::default();
        w.connected(4);
        w.flushed(4, 3, 7);
        w.acked(4, 7);
        let (a, given) = answer();
        let ticket = w.register(3, a).ok().unwrap();
        assert!(given.try_recv().is_ok());
        assert_eq!(w.wait_ticket(ticket, soon()).0, Waited::Acked);
    }

    #[test]
    fn issue12_an_unanswered_sync_gets_its_answer_back() {
        let w = AckWatch::default();
        // no connection: back at once
        let (a, given) = answer();
        let back = w.register(1, a).err().unwrap();
        assert!(back.is_some());
        // timed out: back, not given
        w.connected(1);
        let (a, given2) = answer();
        let ticket = w.register(1, a).ok().unwrap();
        let (waited, back) = w.wait_ticket(ticket, Instant::now() + Duration::from_millis(20));
        assert_eq!(waited, Waited::TimedOut);
        assert!(back.is_some());
        // its connection replaced: the new one's flushes and acks do not answer it
        let (a, given3) = answer();
        let ticket = w.register(1, a).ok().unwrap();
        w.connected(2);
        w.flushed(2, 5, 1);
        w.acked(2, 1);
        let (waited, back) = w.wait_ticket(ticket, soon());
        assert_eq!(waited, Waited::Lost);
        assert!(back.is_some());
        for g in [given, given2, given3] {
            assert!(g.try_recv().is_err(), "an answer was given without its ack");
        }
    }

    #[test]
    fn issue12_an_acknowledged_sync_leaves_the_watch_as_it_is_answered() {
        let w = AckWatch::default();
        w.connected(1);
        w.count_event();
        let (a, given) = answer();
        let ticket = w.register(1, a).ok().unwrap();
        // still waiting, deadline ahead: the ticket back, nothing given
        let ticket = w.try_ticket(ticket, soon()).err().unwrap();
        assert_eq!(w.waiting(), 1);
        w.flushed(1, 1, 1);
        w.acked(1, 1);
        assert!(given.try_recv().is_ok(), "not answered by the ack");
        // taken out by the ack itself: nobody needs to wake for it
        assert_eq!(w.waiting(), 0);
        let (waited, left) = w.try_ticket(ticket, soon()).ok().unwrap();
        assert_eq!(waited, Waited::Acked);
        assert!(left.is_none());
        // one whose deadline passed comes out with its answer
        let (a, _given) = answer();
        let ticket = w.register(2, a).ok().unwrap();
        let (waited, left) = w.try_ticket(ticket, Instant::now()).ok().unwrap();
        assert_eq!(waited, Waited::TimedOut);
        assert!(left.is_some());
        assert_eq!(w.waiting(), 0);
    }
}
