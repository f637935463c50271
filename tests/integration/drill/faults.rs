//! The network faults, made with what this kernel has (no netem): nftables rules in a VM's
//! namespace (a table of its own, `inet artemis_drill`, with an input and an output chain)
//! for partitions and random loss, and a `tc tbf` qdisc for a bandwidth cap. [`Faults::heal`]
//! removes every one of them; the namespaces' deletion removes whatever a failure left.

use std::fmt;

use crate::drill::netns::{run_in, Topology, Vm};

/// An Azure Standard file share's throughput, the cap of the bandwidth drill: 15 MB/s.
pub(crate) const CAP_BYTES_PER_S: u64 = 15_000_000;
/// How long tbf may queue packets behind the cap (its `latency`).
pub(crate) const CAP_QUEUE: std::time::Duration = std::time::Duration::from_millis(200);
/// The random loss of the loss drill, in percent of packets, each way.
pub(crate) const LOSS_PERCENT: u32 = 5;

/// One fault on the network between the VMs (and the database).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NetFault {
    /// The agents' link drops everything, both ways.
    Partition,
    /// The agents' link drops what the hot VM sends (the cold still sends, unanswered).
    HotToColdDropped,
    /// The agents' link drops what the cold VM sends (acknowledgements are lost).
    ColdToHotDropped,
    /// The hot VM is cut from the cold VM and from the database.
    HotIsolated,
    /// Each VM drops [`LOSS_PERCENT`] % of the packets it receives on the agents' link.
    Loss,
    /// The hot VM sends at most [`CAP_BYTES_PER_S`] on the agents' link.
    Cap,
}

impl fmt::Display for NetFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetFault::Partition => "partition, both ways",
            NetFault::HotToColdDropped => "partition, hot->cold only",
            NetFault::ColdToHotDropped => "partition, cold->hot only",
            NetFault::HotIsolated => "hot cut from cold and database",
            NetFault::Loss => "5% random loss each way",
            NetFault::Cap => "15 MB/s cap (tc tbf)",
        })
    }
}

/// The nft script making this module's table (empty chains) in a namespace, from scratch.
const TABLE: &str = "table inet artemis_drill\ndelete table inet artemis_drill\n\
                     table inet artemis_drill {\n\
                       chain input { type filter hook input priority 0; policy accept; }\n\
                       chain output { type filter hook output priority 0; policy accept; }\n\
                     }\n";

impl Topology {
    /// `fault`, with `hot` the VM whose agent is hot now.
    pub(crate) fn apply(&self, fault: NetFault, hot: &Vm) {
        let cold = if hot.name == self.a.name {
            &self.b
        } else {
            &self.a
        };
        let drop_out = |vm: &Vm, dev: &str| {
            nft(
                vm,
                &format!("add rule inet artemis_drill output oifname {dev} drop"),
            )
        };
        let drop_in = |vm: &Vm, dev: &str| {
            nft(
                vm,
                &format!("add rule inet artemis_drill input iifname {dev} drop"),
            )
        };
        match fault {
            NetFault::Partition => {
                drop_out(hot, &hot.link_dev);
                drop_in(hot, &hot.link_dev);
            }
            NetFault::HotToColdDropped => drop_out(hot, &hot.link_dev),
            NetFault::ColdToHotDropped => drop_out(cold, &cold.link_dev),
            NetFault::HotIsolated => {
                for dev in [&hot.link_dev, &hot.db_dev] {
                    drop_out(hot, dev);
                    drop_in(hot, dev);
                }
            }
            NetFault::Loss => {
                for vm in [hot, cold] {
                    nft(
                        vm,
                        &format!(
                            "add rule inet artemis_drill input iifname {} numgen random mod 100 < {LOSS_PERCENT} counter drop",
                            vm.link_dev
                        ),
                    );
                }
            }
            NetFault::Cap => {
                let rate = format!("{}bit", CAP_BYTES_PER_S * 8);
                run_in(
                    &hot.path(),
                    "tc",
                    &[
                        "qdisc",
                        "add",
                        "dev",
                        &hot.link_dev,
                        "root",
                        "tbf",
                        "rate",
                        &rate,
                        "burst",
                        "64kb",
                        "latency",
                        &format!("{}ms", CAP_QUEUE.as_millis()),
                    ],
                    "",
                );
            }
        }
    }

    /// Packets the rules with a counter dropped in `vm` (the loss rule).
    pub(crate) fn dropped(&self, vm: &Vm) -> u64 {
        let out = run_in(
            &vm.path(),
            "nft",
            &["list", "chain", "inet", "artemis_drill", "input"],
            "",
        );
        out.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Removes every rule and qdisc of this module from both VMs.
    pub(crate) fn heal(&self) {
        for vm in [&self.a, &self.b] {
            run_in(&vm.path(), "nft", &["-f", "-"], TABLE);
            // a qdisc may or may not be there: `tc qdisc del` fails when none is
            let _ = crate::util::run(&mut crate::drill::netns::in_netns(
                std::process::Command::new("tc").args([
                    "qdisc",
                    "del",
                    "dev",
                    &vm.link_dev,
                    "root",
                ]),
                &vm.path(),
            ));
        }
    }
}

/// Adds one nft rule (a command line) in `vm`'s namespace.
#[track_caller]
fn nft(vm: &Vm, rule: &str) {
    run_in(&vm.path(), "nft", &["-f", "-"], &format!("{rule}\n"));
}
