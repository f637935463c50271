//! `/proc/self/mountinfo` text: parsed or refused with the line named; never a panic.
#![no_main]

use artemis_sync::shared::mountinfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = mountinfo::parse(text);
    }
});
