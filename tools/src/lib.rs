//! The tools beside artemis-sync that an operator does not need on a VM to run the pair:
//! [`bench`](mod@bench), the standalone throughput benchmark (`artemis-sync-bench`), [`demo`], the
//! walk-through of both modes (`artemis-sync-demo`), [`workload`], the Artemis-like writer
//! and lag probe that both drive through real agents, and [`fuzz_checks`], the properties the
//! fuzz targets in `fuzz/` check, which the tests replay on stable.

pub mod bench;
pub mod demo;
pub mod fuzz_checks;
pub mod workload;

/// `x` rounded down to a whole number, as a `u64`: `as` from a float saturates (a negative or
/// NaN figure gives 0, an enormous one `u64::MAX`), which is what a measured figure wants.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn whole(x: f64) -> u64 {
    x as u64
}

/// The `artemis-sync` binary the tools run as real agents: the one beside the running tool
/// (`target/release/`, `/usr/bin/`), else whichever `PATH` finds.
pub fn agent_binary() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("artemis-sync")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| "artemis-sync".into())
}
