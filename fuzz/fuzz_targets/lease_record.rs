//! The lease file on the share (written by the other VM, or damaged): decoded and checked, or
//! refused; what is accepted encodes back to a record that decodes to the same lease.
//! The check is `artemis_sync_tools::fuzz_checks::lease_record`, which CI also replays on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| artemis_sync_tools::fuzz_checks::lease_record(data));
