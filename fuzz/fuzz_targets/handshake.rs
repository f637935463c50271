//! The accepting side of the handshake against whatever a stranger sends (with a pre-shared
//! key, and without authentication): it fails or succeeds, never panics or hangs.
#![no_main]

use artemis_sync::replicated::channel::{accept, Auth};
use artemis_sync::replicated::wire::{FrameReader, FrameWriter, Psk};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let auth = if mode & 1 == 1 {
        Auth::Psk(Psk::from_hex(&"ab".repeat(32)).expect("a valid key"))
    } else {
        Auth::Insecure
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let mut reader = FrameReader::new(stream);
        let mut writer = FrameWriter::new(tokio::io::sink());
        let _ = accept(&auth, &mut reader, &mut writer).await;
    });
});
