//! Integration tests: every test runs the real `artemis-sync` and `mount-artemis-sync` binaries
//! as separate processes on temporary directories. Tests that need root (real bind and tmpfs
//! mounts, root-owned credentials files) print `skipped: <test>: <reason>` and pass when run
//! by hand without root; under CI (`CI=true`) they fail instead, so a green CI ran them all.

mod agent;
mod cli;
mod cold_disk;
mod drill;
mod exact;
mod failover;
mod failover_pg;
mod faultfs;
mod fuse;
mod fuse_faults;
mod helper;
mod lease_pg;
mod link;
mod listen;
mod metrics;
mod overflow;
mod pg;
mod progress;
mod replication;
mod root;
mod scale;
mod util;
mod watchdog;
