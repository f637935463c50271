//! The config file: parsed and validated, or refused with an error; never a panic. What is
//! accepted serializes back to TOML that is accepted again.
#![no_main]

use std::path::Path;

use artemis_sync::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/artemis-sync/agent.toml");
    if let Ok(config) = Config::from_toml(path, text) {
        let again = config.to_toml();
        Config::from_toml(path, &again).expect("a valid config's TOML is valid");
    }
});
