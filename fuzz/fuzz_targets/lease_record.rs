//! The lease file on the share (written by the other VM, or damaged): decoded and checked, or
//! refused; what is accepted encodes back to a record that decodes to the same lease.
#![no_main]

use artemis_sync::lease::Lease;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(lease) = Lease::decode(data) {
        let again = Lease::decode(&lease.encode()).expect("an encoded lease decodes");
        assert_eq!(again, lease);
    }
});
