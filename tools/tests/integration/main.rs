//! Integration tests of the workspace's tools: the benchmark and the demo run as separate
//! processes against the real `artemis-sync` agent. They live in this package so that
//! `cargo test` builds this package's binaries; the helpers are the root package's
//! (`tests/integration/util.rs`), shared rather than copied.

// Each package's test binary uses a different part of the shared helpers.
#[allow(dead_code)]
#[path = "../../../tests/integration/util.rs"]
mod util;

mod fuzz_replay;
mod tools;

/// A binary of this package (the benchmark, the demo).
fn tool_cmd(name: &str) -> std::process::Command {
    std::process::Command::new(util::workspace_bin(name))
}
