//! The config file: parsed and validated, or refused with an error; never a panic. What is
//! accepted serializes back to TOML that is accepted again.
//! The check is `artemis_sync_tools::fuzz_checks::config`, which CI also replays on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| artemis_sync_tools::fuzz_checks::config(data));
