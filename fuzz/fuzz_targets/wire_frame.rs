//! A frame body from the peer (after the length prefix and the MAC): decoding never panics,
//! and whatever decodes encodes back to a body that decodes to the same frame.
#![no_main]

use artemis_sync::replicated::wire::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(frame) = Frame::decode(body) {
        let mut again = Vec::new();
        frame.encode(&mut again).expect("a decoded frame encodes");
        let back = Frame::decode(&again).expect("an encoded frame decodes");
        assert_eq!(back, frame);
    }
});
