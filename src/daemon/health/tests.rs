use super::*;

const MS: Duration = Duration::from_millis(1);

fn policy() -> Policy {
    Policy {
        probes: true,
        failures: 3,
        grace: 1000 * MS,
        backoff: 100 * MS,
        backoff_max: 500 * MS,
        max_restarts: 3,
        window: 10_000 * MS,
        cooldown: None,
        can_fail_over: true,
    }
}

fn fail(w: &mut Watchdog, t: Instant) -> Decision {
    w.probed(Err("connection refused".into()), t)
}

/// Fails `failures` rounds from `t` on, one per 10 ms; returns the last decision.
fn unhealthy(w: &mut Watchdog, t: Instant) -> Decision {
    (0..w.p.failures)
        .map(|i| fail(w, t + 10 * MS * i))
        .last()
        .unwrap()
}

fn backoff_of(d: &Decision) -> Duration {
    match d {
        Decision::Restart { backoff, .. } => *backoff,
        other => panic!("expected a restart, got {other:?}"),
    }
}

#[test]
fn failures_within_the_grace_do_not_count_until_a_round_passes() {
    let t0 = Instant::now();
    let mut w = Watchdog::new(policy());
    w.started(t0, false);
    assert_eq!(w.snapshot(t0, 0).state, HealthState::Starting);
    for i in 0..10 {
        assert_eq!(fail(&mut w, t0 + 50 * MS * i), Decision::Nothing);
    }
    let s = w.snapshot(t0, 0);
    assert_eq!((s.consecutive_failures, s.probe_failures_total), (0, 10));
    assert_eq!(s.last_probe_error.as_deref(), Some("connection refused"));
    // a passing round ends the grace: failures count from then on
    assert_eq!(w.probed(Ok(()), t0 + 600 * MS), Decision::Nothing);
    assert_eq!(w.snapshot(t0, 0).state, HealthState::Healthy);
    assert_eq!(fail(&mut w, t0 + 700 * MS), Decision::Nothing);
    assert_eq!(w.snapshot(t0, 0).state, HealthState::Unhealthy);
    assert_eq!(w.consecutive_failures(), 1);
}

#[test]
fn consecutive_failures_after_the_grace_restart_and_a_pass_resets_the_count() {
    let t0 = Instant::now();
    let mut w = Watchdog::new(policy());
    w.started(t0, false);
    let t = t0 + 1000 * MS;
    assert_eq!(fail(&mut w, t), Decision::Nothing);
    assert_eq!(fail(&mut w, t + 10 * MS), Decision::Nothing);
    assert_eq!(w.probed(Ok(()), t + 20 * MS), Decision::Nothing);
    assert_eq!(w.consecutive_failures(), 0);
    assert_eq!(fail(&mut w, t + 30 * MS), Decision::Nothing);
    assert_eq!(fail(&mut w, t + 40 * MS), Decision::Nothing);
    let d = fail(&mut w, t + 50 * MS);
    assert_eq!(backoff_of(&d), 100 * MS);
    assert!(
        matches!(&d, Decision::Restart { why, failures: 3, .. } if why.contains("3 consecutive probe failures")),
        "{d:?}"
    );
    let s = w.snapshot(t + 60 * MS, 0);
    assert_eq!(s.state, HealthState::Restarting);
    assert_eq!(s.next_restart_in_ms, Some(90));
    assert!(!w.restart_due(t + 149 * MS));
    assert!(w.restart_due(t + 150 * MS));
    // a round of the stopped node that arrives late changes nothing
    assert_eq!(fail(&mut w, t + 160 * MS), Decision::Nothing);
}

#[test]
fn the_back_off_doubles_up_to_its_cap_and_then_the_watchdog_gives_up() {
    let t0 = Instant::now();
    let mut w = Watchdog::new(Policy {
        max_restarts: 5,
        grace: Duration::ZERO,
        ..policy()
    });
    w.started(t0, false);
    let mut t = t0;
    let mut seen = Vec::new();
    for _ in 0..5 {
        let d = unhealthy(&mut w, t);
        seen.push(backoff_of(&d).as_millis());
        t = w.restart_at().unwrap();
        w.started(t, true);
    }
    assert_eq!(seen, [100, 200, 400, 500, 500]);
    let d = unhealthy(&mut w, t);
    assert!(
        matches!(&d, Decision::GiveUp { why, .. } if why.contains("5 local restarts")),
        "{d:?}"
    );
    let s = w.snapshot(t, 1_000_000);
    assert_eq!(s.state, HealthState::GaveUp);
    assert_eq!((s.restarts_total, s.restarts_in_window), (5, 5));
    assert_eq!(s.gave_up.as_ref().unwrap().cooldown_left_ms, None);
    assert!(
        w.staying_out(t + 3_600_000 * MS).is_some(),
        "no cool-down: out until resume"
    );
    // the mode stopping the node keeps the give-up
    w.stopped();
    assert!(w.staying_out(t).is_some());
    assert!(w.resume().is_some());
    assert_eq!(w.staying_out(t), None);
    assert_eq!(w.snapshot(t, 0).restarts_in_window, 0);
    assert_eq!(w.resume(), None);
}

#[test]
fn restarts_older_than_the_window_no_longer_count() {
    let t0 = Instant::now();
    let mut w = Watchdog::new(Policy {
        max_restarts: 2,
        grace: Duration::ZERO,
        ..policy()
    });
    w.started(t0, false);
    assert_eq!(
        w.exited("the node exited with code 1", t0),
        Decision::Restart {
            why: "the node exited with code 1".into(),
            failures: 0,
            backoff: 100 * MS,
        }
    );
    w.started(t0 + 100 * MS, true);
    assert_eq!(backoff_of(&w.exited("x", t0 + 200 * MS)), 200 * MS);
    w.started(t0 + 400 * MS, true);
    assert_eq!(w.snapshot(t0 + 500 * MS, 0).restarts_in_window, 2);
    // the first restart leaves the window: one left in it, so this failure restarts again
    let later = t0 + 10_100 * MS;
    assert_eq!(w.snapshot(later, 0).restarts_in_window, 1);
    assert_eq!(backoff_of(&w.exited("x", later)), 200 * MS);
    w.started(later + 200 * MS, true);
    assert!(matches!(
        w.exited("x", later + 250 * MS),
        Decision::GiveUp { .. }
    ));
}

#[test]
fn zero_max_local_restarts_gives_up_on_the_first_failure() {
    let t0 = Instant::now();
    let mut w = Watchdog::new(Policy {
        max_restarts: 0,
        ..policy()
    });
    w.started(t0, false);
    assert!(
        matches!(w.exited("the node exited with code 5", t0), Decision::GiveUp { why, .. } if why.contains("code 5"))
    );
}

#[test]
fn a_cool_down_ends_the_give_up_by_itself() {
    let t0 = Instant::now();
    let mut w = Watchdog::new(Policy {
        max_restarts: 0,
        cooldown: Some(2000 * MS),
        ..policy()
    });
    w.started(t0, false);
    assert!(matches!(w.exited("x", t0), Decision::GiveUp { .. }));
    let s = w.snapshot(t0 + 500 * MS, 10_000);
    let g = s.gave_up.unwrap();
    assert_eq!((g.since_unix_ms, g.cooldown_left_ms), (9_500, Some(1500)));
    assert!(w.staying_out(t0 + 1999 * MS).is_some());
    assert_eq!(w.staying_out(t0 + 2000 * MS), None);
    assert_eq!(w.snapshot(t0 + 2000 * MS, 0).state, HealthState::None);
}

#[test]
fn without_fail_over_it_keeps_restarting_at_the_longest_back_off() {
    let t0 = Instant::now();
    let mut w = Watchdog::new(Policy {
        max_restarts: 1,
        can_fail_over: false,
        ..policy()
    });
    w.started(t0, false);
    assert_eq!(backoff_of(&w.exited("x", t0)), 100 * MS);
    w.started(t0 + 100 * MS, true);
    for i in 0..3 {
        let t = t0 + 1000 * MS * (i + 1);
        assert_eq!(backoff_of(&w.exited("x", t)), 500 * MS);
        assert!(w.snapshot(t, 0).cannot_fail_over.is_some());
        assert_eq!(w.staying_out(t), None);
        w.started(t + 500 * MS, true);
    }
}

#[test]
fn a_stop_by_the_mode_cancels_a_pending_restart() {
    let t0 = Instant::now();
    let mut w = Watchdog::new(policy());
    w.started(t0, false);
    assert!(matches!(w.exited("x", t0), Decision::Restart { .. }));
    w.stopped();
    assert_eq!(w.restart_at(), None);
    assert_eq!(w.snapshot(t0, 0).state, HealthState::None);
    // an exit when nothing runs is not a failure
    assert_eq!(w.exited("x", t0), Decision::Nothing);
}

#[test]
fn issue14_the_back_off_runs_from_the_end_of_a_slow_stop() {
    let t0 = Instant::now();
    let mut w = Watchdog::new(policy());
    w.started(t0, false);
    let Decision::Restart { backoff, .. } = w.exited("the node exited with code 1", t0) else {
        panic!("not a restart");
    };
    // the stop took 10 s (SIGKILL after the stop timeout): the back-off starts after it
    let stopped = t0 + Duration::from_secs(10);
    w.halted(backoff, stopped);
    assert!(!w.restart_due(stopped));
    assert!(!w.restart_due(stopped + backoff - Duration::from_millis(1)));
    assert!(w.restart_due(stopped + backoff));
}

#[test]
fn issue14_a_give_up_the_mode_cannot_carry_out_keeps_restarting_at_the_longest_back_off() {
    let t0 = Instant::now();
    let p = policy();
    let max = p.backoff_max;
    let mut w = Watchdog::new(p);
    w.cannot_give_up("the cold VM is not connected".into(), t0);
    assert_eq!(w.staying_out(t0), None);
    assert!(!w.restart_due(t0 + max - Duration::from_millis(1)));
    assert!(w.restart_due(t0 + max));
    let h = w.snapshot(t0, 0);
    assert_eq!(
        h.cannot_fail_over.as_deref(),
        Some("the cold VM is not connected")
    );
}
