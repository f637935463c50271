//! Lines on the control socket (any local client) and the agent's answers (as the CLI reads
//! them): decoded or refused with an error naming what was wrong; never a panic.
//! The check is `artemis_sync_tools::fuzz_checks::control_protocol`, which CI also replays on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| artemis_sync_tools::fuzz_checks::control_protocol(data));
