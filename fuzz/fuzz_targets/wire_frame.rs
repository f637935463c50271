//! A frame body from the peer (after the length prefix and the MAC): decoding never panics,
//! and whatever decodes encodes back to a body that decodes to the same frame.
//! The check is `artemis_sync_tools::fuzz_checks::wire_frame`, which CI also replays on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| artemis_sync_tools::fuzz_checks::wire_frame(data));
