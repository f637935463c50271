//! The lease machine against a lease kept in memory, in real time with short intervals.

use super::*;
use crate::lease::{worker, LeaseStore};
use std::sync::{Arc, Mutex};

/// The lease in memory, shared by the machines of a test.
#[derive(Clone, Default)]
struct Mem(Arc<Mutex<Option<Lease>>>);

impl LeaseStore for Mem {
    fn has_lock(&self) -> bool {
        false
    }
    fn observe(&mut self, _: bool) -> (Result<bool, String>, Obs) {
        let obs = match self.0.lock().unwrap().clone() {
            Some(l) => Obs::Lease(l),
            None => Obs::Missing,
        };
        (Ok(true), obs)
    }
    fn take_over(
        &mut self,
        expect: &Obs,
        lease: &Lease,
        _: Duration,
    ) -> Result<(), (bool, String)> {
        let mut cur = self.0.lock().unwrap();
        let now = match cur.clone() {
            Some(l) => Obs::Lease(l),
            None => Obs::Missing,
        };
        if now != *expect {
            return Err((false, "changed".into()));
        }
        *cur = Some(lease.clone());
        Ok(())
    }
    fn renew(&mut self, current: &Lease, next: &Lease) -> Result<(), RenewFail> {
        let mut cur = self.0.lock().unwrap();
        if cur.as_ref() != Some(current) {
            return Err(RenewFail::Lost(format!("now {cur:?}")));
        }
        *cur = Some(next.clone());
        Ok(())
    }
    fn release(&mut self, current: &Lease) -> Result<(), String> {
        let mut cur = self.0.lock().unwrap();
        if cur.as_ref() == Some(current) {
            *cur = Some(Lease {
                state: LeaseState::Released,
                ..current.clone()
            });
        }
        Ok(())
    }
    fn unlock(&mut self) {}
}

const T: Timing = Timing {
    update: Duration::from_millis(20),
    wait: Duration::from_millis(150),
    stop_timeout: Duration::from_millis(10),
    margin: Duration::from_millis(15),
};

fn machine(mem: &Mem, holder: &str, eligible: Option<Eligible>) -> LeaseMachine {
    let ch = worker::start(
        Box::new(mem.clone()),
        None,
        crate::daemon::metrics::Metrics::new(),
    )
    .unwrap();
    LeaseMachine::new(holder.into(), T, ch, false, eligible)
}

/// Drives `m` for at most `limit`; returns its events.
fn run(m: &mut LeaseMachine, limit: Duration, until: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + limit;
    let replies = m.replies();
    let mut all = Vec::new();
    while Instant::now() < deadline && !until(&all) {
        let left = m.next_deadline().saturating_duration_since(Instant::now());
        if let Ok((seq, done)) = replies.recv_timeout(left.min(Duration::from_millis(5))) {
            m.handle_reply(seq, done);
        }
        m.tick();
        all.extend(m.take_events());
    }
    all
}

fn acquired(ev: &[Event]) -> Option<u64> {
    ev.iter().find_map(|e| match e {
        Event::Acquired(n) => Some(*n),
        _ => None,
    })
}

#[test]
fn issue13_a_stale_lease_is_taken_only_when_eligible_or_forced() {
    let mem = Mem::default();
    *mem.0.lock().unwrap() = Some(Lease::new("old", 3, 20, 150));
    let mut m = machine(
        &mem,
        "me",
        Some(Box::new(|_| Err("copy incomplete".into()))),
    );
    let ev = run(&mut m, Duration::from_millis(600), |e| {
        acquired(e).is_some()
    });
    assert_eq!(acquired(&ev), None, "{ev:?}");
    assert_eq!(m.not_eligible(), Some("copy incomplete"));
    m.force_next();
    let ev = run(&mut m, Duration::from_secs(2), |e| acquired(e).is_some());
    assert_eq!(acquired(&ev), Some(4), "{ev:?}");
    assert_eq!(m.role(), LeaseRole::Hot);
}

#[test]
fn issue13_a_restarted_holder_resumes_its_live_lease_at_once_and_not_a_taken_one() {
    let mem = Mem::default();
    *mem.0.lock().unwrap() = Some(Lease::new("me", 7, 20, 150));
    let mut m = machine(
        &mem,
        "me",
        Some(Box::new(|_| Err("never by takeover".into()))),
    );
    m.resume(Some(7));
    let started = Instant::now();
    let ev = run(&mut m, Duration::from_secs(2), |e| acquired(e).is_some());
    assert_eq!(
        acquired(&ev),
        Some(7),
        "resumed under the same epoch: {ev:?}"
    );
    assert!(
        started.elapsed() < T.wait,
        "no wait for a lease that names us"
    );
    // another machine, whose epoch was taken meanwhile, does not resume it
    let mem = Mem::default();
    *mem.0.lock().unwrap() = Some(Lease::new("other", 8, 20, 150));
    let mut m = machine(&mem, "me", Some(Box::new(|_| Err("no".into()))));
    m.resume(Some(7));
    let ev = run(&mut m, Duration::from_millis(400), |e| {
        acquired(e).is_some()
    });
    assert_eq!(acquired(&ev), None, "{ev:?}");
}

#[test]
fn issue13_a_lost_renewal_fences_and_the_epoch_moves_past_one_seen_elsewhere() {
    let mem = Mem::default();
    let mut m = machine(&mem, "me", None);
    m.see_epoch(10);
    let ev = run(&mut m, Duration::from_secs(2), |e| acquired(e).is_some());
    assert_eq!(acquired(&ev), Some(11), "{ev:?}");
    *mem.0.lock().unwrap() = Some(Lease::new("thief", 12, 20, 150));
    let ev = run(&mut m, Duration::from_secs(1), |e| {
        e.iter().any(|x| matches!(x, Event::Fence { .. }))
    });
    assert!(
        ev.iter().any(|e| matches!(
            e,
            Event::Fence {
                epoch: Some(11),
                ..
            }
        )),
        "{ev:?}"
    );
    assert_eq!(m.role(), LeaseRole::Fenced);
}

#[test]
fn issue13_a_withdrawn_force_does_not_linger_until_the_holder_dies() {
    let mem = Mem::default();
    *mem.0.lock().unwrap() = Some(Lease::new("old", 3, 20, 150));
    let mut m = machine(
        &mem,
        "me",
        Some(Box::new(|_| Err("copy incomplete".into()))),
    );
    m.force_next();
    m.cancel_force();
    let ev = run(&mut m, Duration::from_millis(600), |e| {
        acquired(e).is_some()
    });
    assert_eq!(acquired(&ev), None, "{ev:?}");
}

#[test]
fn issue14_a_machine_told_to_stay_out_takes_no_lease_until_told_otherwise() {
    let mem = Mem::default();
    let mut released = Lease::new("other", 5, 20, 150);
    released.state = LeaseState::Released;
    *mem.0.lock().unwrap() = Some(released);
    let mut m = machine(&mem, "me", None);
    m.stay_out(Some("the node health watchdog gave up".into()));
    let ev = run(&mut m, Duration::from_millis(400), |e| {
        acquired(e).is_some()
    });
    assert_eq!(acquired(&ev), None, "{ev:?}");
    assert_eq!(m.role(), LeaseRole::Cold);
    assert_eq!(m.not_eligible(), Some("the node health watchdog gave up"));
    m.stay_out(None);
    let ev = run(&mut m, Duration::from_secs(2), |e| acquired(e).is_some());
    assert_eq!(acquired(&ev), Some(6), "{ev:?}");
}

#[test]
fn issue16_a_release_while_a_renewal_is_in_flight_releases_the_renewed_row() {
    let mem = Mem::default();
    let mut m = machine(&mem, "me", None);
    let ev = run(&mut m, Duration::from_secs(2), |e| acquired(e).is_some());
    let epoch = acquired(&ev).expect("acquired");
    // a renewal is due, sent, and written by the worker; its reply is not read yet
    std::thread::sleep(T.update * 2);
    m.tick();
    let renewals = |mem: &Mem| mem.0.lock().unwrap().as_ref().map(|l| l.renewals);
    let before = renewals(&mem);
    let deadline = Instant::now() + Duration::from_secs(2);
    while renewals(&mem) == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_ne!(renewals(&mem), before, "no renewal was in flight");
    m.release("demoted");
    let row = mem.0.lock().unwrap().clone().expect("a row");
    assert_eq!(
        (row.holder.as_str(), row.epoch, row.state),
        ("me", epoch, LeaseState::Released),
        "{row:?}"
    );
}

/// A holder's store whose first renewal lands but reports an error (its answer was lost); the
/// retries fail without writing until `ok_after`, when one finds the row already at `next`,
/// rewrites it (no visible change) and succeeds; after that the store is gone.
struct LostAnswer {
    mem: Mem,
    calls: u32,
    ok_after: Instant,
    done: bool,
}

impl LeaseStore for LostAnswer {
    fn has_lock(&self) -> bool {
        false
    }
    fn observe(&mut self, t: bool) -> (Result<bool, String>, Obs) {
        self.mem.observe(t)
    }
    fn take_over(&mut self, e: &Obs, l: &Lease, s: Duration) -> Result<(), (bool, String)> {
        self.mem.take_over(e, l, s)
    }
    fn renew(&mut self, current: &Lease, next: &Lease) -> Result<(), RenewFail> {
        self.calls += 1;
        if self.done {
            return Err(RenewFail::Io("store unreachable".into()));
        }
        if self.calls == 1 {
            self.mem.renew(current, next).unwrap();
            return Err(RenewFail::Io("answer lost".into()));
        }
        if Instant::now() < self.ok_after {
            return Err(RenewFail::Io("store unreachable".into()));
        }
        // a retry of the renewal already written: the row is `next`, rewritten as it is
        let mut cur = self.mem.0.lock().unwrap();
        assert_eq!(cur.as_ref(), Some(next));
        *cur = Some(next.clone());
        self.done = true;
        Ok(())
    }
    fn release(&mut self, c: &Lease) -> Result<(), String> {
        self.mem.release(c)
    }
    fn unlock(&mut self) {}
}

/// A renewal whose answer was lost is retried, and the retry that succeeds changes nothing a
/// contender sees: the fence counts from the first attempt, whose write started the
/// contender's wait. Counting from the retry put the fence after the contender's takeover.
#[test]
fn issue3_a_renewal_retried_after_its_answer_was_lost_counts_from_the_first_attempt() {
    let mem = Mem::default();
    *mem.0.lock().unwrap() = Some(Lease::new("me", 1, 20, 150));
    // the holder resumes its lease (a renewal), then renews under the lost-answer store
    let store = LostAnswer {
        mem: mem.clone(),
        calls: 0,
        ok_after: Instant::now() + Duration::from_secs(3600),
        done: false,
    };
    let shared = Arc::new(Mutex::new(store));
    struct Handle(Arc<Mutex<LostAnswer>>);
    impl LeaseStore for Handle {
        fn has_lock(&self) -> bool {
            false
        }
        fn observe(&mut self, t: bool) -> (Result<bool, String>, Obs) {
            self.0.lock().unwrap().observe(t)
        }
        fn take_over(&mut self, e: &Obs, l: &Lease, s: Duration) -> Result<(), (bool, String)> {
            self.0.lock().unwrap().take_over(e, l, s)
        }
        fn renew(&mut self, c: &Lease, n: &Lease) -> Result<(), RenewFail> {
            self.0.lock().unwrap().renew(c, n)
        }
        fn release(&mut self, c: &Lease) -> Result<(), String> {
            self.0.lock().unwrap().release(c)
        }
        fn unlock(&mut self) {}
    }
    let ch = worker::start(
        Box::new(Handle(shared.clone())),
        None,
        crate::daemon::metrics::Metrics::new(),
    )
    .unwrap();
    // the holder: it takes the (stale) lease the ordinary way first
    *mem.0.lock().unwrap() = None;
    let mut h = LeaseMachine::new("me".into(), T, ch, false, None);
    let ev = run(&mut h, Duration::from_secs(2), |e| acquired(e).is_some());
    assert_eq!(acquired(&ev), Some(1), "{ev:?}");
    // the contender starts watching now
    let mut c = machine(&mem, "other", None);
    {
        // the first renewal (due in `update`) lands with a lost answer; the retries fail
        // for 90 ms, then one succeeds without changing the row
        let mut s = shared.lock().unwrap();
        s.ok_after = Instant::now() + T.update + Duration::from_millis(90);
    }
    let (hr, cr) = (h.replies(), c.replies());
    let deadline = Instant::now() + Duration::from_secs(3);
    let (mut fenced_at, mut taken_at) = (None, None);
    while Instant::now() < deadline && (fenced_at.is_none() || taken_at.is_none()) {
        let next = h.next_deadline().min(c.next_deadline());
        let left = next
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(2));
        crossbeam_channel::select! {
            recv(hr) -> m => if let Ok((s, d)) = m { h.handle_reply(s, d) },
            recv(cr) -> m => if let Ok((s, d)) = m { c.handle_reply(s, d) },
            default(left) => {}
        }
        h.tick();
        c.tick();
        for e in h.take_events() {
            if matches!(e, Event::Fence { .. }) && fenced_at.is_none() {
                fenced_at = Some(Instant::now());
            }
        }
        if acquired(&c.take_events()).is_some() && taken_at.is_none() {
            taken_at = Some(Instant::now());
        }
    }
    let taken = taken_at.expect("the contender took over");
    // the holder's node is down at the latest stop_timeout after its fence
    let down = fenced_at.map(|f| f + T.stop_timeout);
    assert!(
        down.is_some_and(|d| d <= taken),
        "the contender took over {:?} before the holder's node was down (fenced {:?} after the takeover)",
        down.map(|d| d.saturating_duration_since(taken)),
        fenced_at.map(|f| f.saturating_duration_since(taken)),
    );
}

/// [`Mem`], each of whose calls takes the delay `.1` holds to answer (a database slow to
/// answer, an NFS server that hangs the lock file's calls).
#[derive(Clone)]
struct Slow(Mem, Arc<Mutex<Duration>>);

impl Slow {
    fn new(mem: &Mem, delay: Duration) -> Slow {
        Slow(mem.clone(), Arc::new(Mutex::new(delay)))
    }
    fn wait(&self) {
        let delay = *self.1.lock().unwrap();
        std::thread::sleep(delay);
    }
}

impl LeaseStore for Slow {
    fn has_lock(&self) -> bool {
        false
    }
    fn observe(&mut self, try_lock: bool) -> (Result<bool, String>, Obs) {
        self.wait();
        self.0.observe(try_lock)
    }
    fn take_over(
        &mut self,
        expect: &Obs,
        lease: &Lease,
        d: Duration,
    ) -> Result<(), (bool, String)> {
        self.wait();
        self.0.take_over(expect, lease, d)
    }
    fn renew(&mut self, current: &Lease, next: &Lease) -> Result<(), RenewFail> {
        self.wait();
        self.0.renew(current, next)
    }
    fn release(&mut self, current: &Lease) -> Result<(), String> {
        self.wait();
        self.0.release(current)
    }
    fn unlock(&mut self) {}
}

fn slow_machine(store: &Slow) -> LeaseMachine {
    let ch = worker::start(
        Box::new(store.clone()),
        None,
        crate::daemon::metrics::Metrics::new(),
    )
    .unwrap();
    LeaseMachine::new("me".into(), T, ch, false, None)
}

/// Turns of an owner's loop (wait for a reply until the machine's next deadline, then tick)
/// in `limit`.
fn turns(m: &mut LeaseMachine, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    let replies = m.replies();
    let mut turns = 0;
    while Instant::now() < deadline {
        let left = m
            .next_deadline()
            .min(deadline)
            .saturating_duration_since(Instant::now());
        if let Ok((seq, done)) = replies.recv_timeout(left) {
            m.handle_reply(seq, done);
        }
        m.tick();
        let _ = m.take_events();
        turns += 1;
    }
    turns
}

#[test]
fn issue10_a_slow_lease_store_is_waited_for_not_polled_in_a_busy_loop() {
    // an observation outlasting the poll interval: the loop once found its next deadline
    // passed while the worker still held the job, and turned without waiting until the reply
    let mem = Mem::default();
    *mem.0.lock().unwrap() = Some(Lease::new("other", 3, 20, 150));
    let mut m = slow_machine(&Slow::new(&mem, Duration::from_millis(200)));
    let n = turns(&mut m, Duration::from_millis(600));
    assert!(n < 100, "{n} turns of the loop in 600 ms");
}

#[test]
fn issue10_a_release_the_store_did_not_answer_leaves_no_busy_loop_behind() {
    // the release waits at most wait_interval_ms for a hung store; its job then still sits
    // in the worker's queue behind the renewal in hand, so the next observation cannot be
    // sent: the loop must wait, not try again at once for as long as the store hangs
    let mem = Mem::default();
    let store = Slow::new(&mem, Duration::ZERO);
    let mut m = slow_machine(&store);
    let ev = run(&mut m, Duration::from_secs(2), |e| acquired(e).is_some());
    assert!(acquired(&ev).is_some(), "{ev:?}");
    *store.1.lock().unwrap() = Duration::from_millis(700);
    let began = Instant::now();
    while m.outstanding.is_none() && began.elapsed() < Duration::from_secs(1) {
        m.tick();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(m.outstanding.is_some(), "a renewal in hand");
    m.release("test");
    assert_eq!(m.role(), LeaseRole::Cold);
    let n = turns(&mut m, Duration::from_millis(500));
    assert!(n < 100, "{n} turns of the loop in 500 ms");
}
