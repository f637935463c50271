//! The byte stream of an authenticated connection (length prefixes, bodies, MACs), read as the
//! receiver reads it: every frame is refused or decoded, never a panic, never an allocation
//! beyond the frame limit.
#![no_main]

use artemis_sync::replicated::wire::{FrameMac, FrameReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&with_mac, stream)) = data.split_first() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let mut reader = FrameReader::new(stream);
        if with_mac & 1 == 1 {
            reader.set_mac(FrameMac::new([7; 32], 0));
        }
        if with_mac & 2 == 2 {
            reader.authenticated();
        }
        while reader.recv().await.is_ok() {}
    });
});
