//! The replication state file (a damaged disk, a hand edit): loaded or refused with the path
//! named; what loads saves back to a file that loads the same.
#![no_main]

use artemis_sync::replicated::state::{load_state, save_state};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("artemis-sync-fuzz-state-{}", std::process::id()));
    let path = dir.join("state.json");
    std::fs::create_dir_all(&dir).expect("a temp dir");
    std::fs::write(&path, data).expect("write the input");
    if let Ok(Some(state)) = load_state(&path) {
        save_state(&path, &state).expect("save");
        assert_eq!(load_state(&path).expect("load again"), Some(state));
    }
});
