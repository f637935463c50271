//! The replication state file (a damaged disk, a hand edit): loaded or refused with the path
//! named; what loads saves back to a file that loads the same.
//! The check is `artemis_sync_tools::fuzz_checks::state_file`, which CI also replays on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| artemis_sync_tools::fuzz_checks::state_file(data));
