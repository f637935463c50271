//! `/proc/self/mountinfo` text: parsed or refused with the line named; never a panic.
//! The check is `artemis_sync_tools::fuzz_checks::mountinfo_text`, which CI also replays on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| artemis_sync_tools::fuzz_checks::mountinfo_text(data));
