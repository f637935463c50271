//! The accepting side of the handshake against whatever a stranger sends (with a pre-shared
//! key, and without authentication): it fails or succeeds, never panics or hangs.
//! The check is `artemis_sync_tools::fuzz_checks::handshake`, which CI also replays on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| artemis_sync_tools::fuzz_checks::handshake(data));
