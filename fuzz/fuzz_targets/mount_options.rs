//! Mount option strings (`[storage] options`, fstab's fourth field): parsed or refused, and
//! what parses prints back to a string that parses to the same options.
#![no_main]

use artemis_sync::config::mount_options::MountOptions;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(options) = MountOptions::parse(text) {
        let printed = options.to_string();
        let again = MountOptions::parse(&printed).expect("printed options parse");
        assert_eq!(again.to_string(), printed);
    }
});
