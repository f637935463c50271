//! What the host did while a workload ran: how much of the vCPUs' time the hypervisor gave to
//! others (`steal`) and how busy the guest was, from the `cpu` line of `/proc/stat` before and
//! after. On a shared VM one run of the same code can take twice as long as the next; a
//! workload's figures read beside its steal say whether that run was the machine's.

use serde_json::{json, Value};

/// The `cpu` line of `/proc/stat`, in ticks (`USER_HZ`) summed over all CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CpuTimes {
    /// user, nice, system, irq and softirq (guest time is inside user and nice already).
    busy: u64,
    /// idle and iowait.
    idle: u64,
    /// Time a vCPU could have run but the hypervisor ran something else.
    steal: u64,
}

impl CpuTimes {
    /// The `cpu` line of a `/proc/stat` text; `None` if it has none or it is malformed.
    pub(crate) fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some("cpu"))?;
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice]
        let at = |i: usize| f.get(i).copied();
        Some(CpuTimes {
            busy: at(0)? + at(1)? + at(2)? + at(5)? + at(6)?,
            idle: at(3)? + at(4)?,
            steal: at(7)?,
        })
    }

    /// Now, from `/proc/stat`; `None` where there is none (the figures are then left out).
    pub(crate) fn now() -> Option<CpuTimes> {
        CpuTimes::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Since `before`: `steal_pct` and `busy_pct` of all CPUs' time (one decimal), or null
    /// when no time passed.
    pub(crate) fn since(&self, before: &CpuTimes) -> Value {
        let steal = self.steal.saturating_sub(before.steal);
        let busy = self.busy.saturating_sub(before.busy);
        let total = steal + busy + self.idle.saturating_sub(before.idle);
        if total == 0 {
            return Value::Null;
        }
        let pct = |x: u64| super::round(x as f64 * 100.0 / total as f64, 1);
        json!({"steal_pct": pct(steal), "busy_pct": pct(busy)})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "cpu  100 5 50 800 10 3 2 30 7 0\ncpu0 50 2 25 400 5 1 1 15 0 0\nintr 1\n";
    const AFTER: &str =
        "cpu  160 5 80 1040 20 3 12 80 9 0\ncpu0 80 2 40 520 10 1 6 40 0 0\nintr 2\n";

    #[test]
    fn issue12_steal_and_busy_are_shares_of_all_cpu_time_between_two_readings() {
        let (b, a) = (
            CpuTimes::parse(BEFORE).unwrap(),
            CpuTimes::parse(AFTER).unwrap(),
        );
        // busy +60 +30 +10 = 100, idle +240 +10 = 250, steal +50: 400 ticks
        assert_eq!(a.since(&b), json!({"steal_pct": 12.5, "busy_pct": 25.0}));
        assert_eq!(a.since(&a), Value::Null);
    }

    #[test]
    fn issue12_a_stat_without_a_whole_cpu_line_gives_nothing() {
        assert_eq!(CpuTimes::parse("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 2 3 4 5 6 7\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 2 x 4 5 6 7 8\n"), None);
        assert!(CpuTimes::now().is_some(), "this Linux has /proc/stat");
    }
}
