//! Lines on the control socket (any local client) and the agent's answers (as the CLI reads
//! them): decoded or refused with an error naming what was wrong; never a panic.
#![no_main]

use artemis_sync::daemon::protocol::{decode_answer, decode_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = decode_request(line);
        let _ = decode_answer(line);
    }
});
