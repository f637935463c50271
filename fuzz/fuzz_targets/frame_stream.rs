//! The byte stream of an authenticated connection (length prefixes, bodies, MACs), read as the
//! receiver reads it: every frame is refused or decoded, never a panic, never an allocation
//! beyond the frame limit.
//! The check is `artemis_sync_tools::fuzz_checks::frame_stream`, which CI also replays on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| artemis_sync_tools::fuzz_checks::frame_stream(data));
