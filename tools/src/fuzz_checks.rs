//! The property each fuzz target checks, one function per decoder of untrusted input, shared by
//! the coverage-guided targets in `fuzz/` (cargo-fuzz, nightly) and the stable replay test
//! that CI runs (`tools/tests/integration/fuzz_replay.rs`: the seed corpus, every kept crash
//! and a bounded number of mutations of them). A check returns for input the decoder refuses
//! or accepts correctly and panics when the decoder panics or breaks its round trip, which is
//! what both fuzzers report.

use std::path::Path;

use artemis_sync::config::mount_options::MountOptions;
use artemis_sync::config::Config;
use artemis_sync::daemon::protocol::{decode_answer, decode_request};
use artemis_sync::lease::Lease;
use artemis_sync::replicated::channel::{accept, Auth};
use artemis_sync::replicated::state::{load_state, save_state};
use artemis_sync::replicated::wire::{Frame, FrameMac, FrameReader, FrameWriter, Psk};
use artemis_sync::shared::mountinfo;

/// A target's check: returns, or panics on a bug.
pub type Check = fn(&[u8]);

/// Every target by name (the name of its folder in `fuzz/seeds/` and of its binary in `fuzz/`).
pub const TARGETS: &[(&str, Check)] = &[
    ("wire_frame", wire_frame),
    ("frame_stream", frame_stream),
    ("handshake", handshake),
    ("config", config),
    ("mount_options", mount_options),
    ("mountinfo", mountinfo_text),
    ("lease_record", lease_record),
    ("state_file", state_file),
    ("control_protocol", control_protocol),
];

/// A frame body from the peer (after the length prefix and the MAC): decoding never panics,
/// decoding in place (writes sharing the body) gives what decoding with copies gives, and
/// whatever decodes encodes back, whole or in parts, to a body that decodes to the same frame.
pub fn wire_frame(body: &[u8]) {
    let decoded = Frame::decode(body);
    let shared = Frame::decode_shared(&bytes::Bytes::copy_from_slice(body));
    assert_eq!(
        decoded.as_ref().ok(),
        shared.as_ref().ok(),
        "decoded in place differs"
    );
    if let Ok(frame) = decoded {
        let mut again = Vec::new();
        frame.encode(&mut again).expect("a decoded frame encodes");
        let back = Frame::decode(&again).expect("an encoded frame decodes");
        assert_eq!(back, frame);
        let mut head = Vec::new();
        let tail = frame
            .encode_parts(&mut head)
            .expect("a decoded frame encodes");
        tail.iter().for_each(|part| head.extend_from_slice(part));
        assert_eq!(head, again, "encoded in parts differs");
    }
}

/// The byte stream of a connection (length prefixes, bodies, MACs), read as the receiver reads
/// it: every frame is refused or decoded, never a panic, never an allocation beyond the frame
/// limit. The first byte chooses a MAC (bit 0) and an authenticated reader (bit 1).
pub fn frame_stream(data: &[u8]) {
    let Some((&flags, stream)) = data.split_first() else {
        return;
    };
    current_thread().block_on(async {
        let mut reader = FrameReader::new(stream);
        if flags & 1 == 1 {
            reader.set_mac(FrameMac::new([7; 32], 0));
        }
        if flags & 2 == 2 {
            reader.authenticated();
        }
        while reader.recv().await.is_ok() {}
    });
}

/// The accepting side of the handshake against whatever a stranger sends (the first byte's
/// bit 0: with a pre-shared key, else without authentication): it fails or succeeds, never
/// panics or hangs.
pub fn handshake(data: &[u8]) {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let auth = if mode & 1 == 1 {
        Auth::Psk(Psk::from_hex(&"ab".repeat(32)).expect("a valid key"))
    } else {
        Auth::Insecure
    };
    current_thread().block_on(async {
        let mut reader = FrameReader::new(stream);
        let mut writer = FrameWriter::new(tokio::io::sink());
        let _ = accept(&auth, &mut reader, &mut writer).await;
    });
}

/// The config file: parsed and validated, or refused with an error; never a panic. What is
/// accepted serializes back to TOML that is accepted again.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/artemis-sync/agent.toml");
    if let Ok(config) = Config::from_toml(path, text) {
        let again = config.to_toml();
        Config::from_toml(path, &again).expect("a valid config's TOML is valid");
    }
}

/// Mount option strings (`[storage] options`, fstab's fourth field): parsed or refused, and
/// what parses prints back to a string that parses to the same options.
pub fn mount_options(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(options) = MountOptions::parse(text) {
        let printed = options.to_string();
        let again = MountOptions::parse(&printed).expect("printed options parse");
        assert_eq!(again.to_string(), printed);
    }
}

/// `/proc/self/mountinfo` text: parsed or refused with the line named; never a panic.
pub fn mountinfo_text(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = mountinfo::parse(text);
    }
}

/// The lease file on the share (written by the other VM, or damaged): decoded and checked, or
/// refused; what is accepted encodes back to a record that decodes to the same lease.
pub fn lease_record(data: &[u8]) {
    if let Ok(lease) = Lease::decode(data) {
        let again = Lease::decode(&lease.encode()).expect("an encoded lease decodes");
        assert_eq!(again, lease);
    }
}

/// The replication state file (a damaged disk, a hand edit): loaded or refused with the path
/// named; what loads saves back to a file that loads the same. The file lives in a temporary
/// directory of this process and thread, removed before returning.
pub fn state_file(data: &[u8]) {
    /// Removes the directory when the check ends, a failing one (a panic) too.
    struct Removed(std::path::PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Removed(state_dir());
    let path = dir.0.join("state.json");
    std::fs::create_dir_all(&dir.0).expect("a temp dir");
    std::fs::write(&path, data).expect("write the input");
    if let Ok(Some(state)) = load_state(&path) {
        save_state(&path, &state).expect("save");
        assert_eq!(load_state(&path).expect("load again"), Some(state));
    }
}

/// The temporary directory [`state_file`] uses on this thread.
fn state_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "artemis-sync-fuzz-state-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ))
}

/// Lines on the control socket (any local client) and the agent's answers (as the CLI reads
/// them): decoded or refused with an error naming what was wrong; never a panic.
pub fn control_protocol(data: &[u8]) {
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = decode_request(line);
        let _ = decode_answer(line);
    }
}

/// A single-threaded runtime for the async decoders (the handshake's timers included).
fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: every run of the checks left a directory in the temp dir.
    #[test]
    fn the_state_file_check_leaves_no_directory_behind() {
        for input in [&br#"{"epoch": 2, "role": "cold"}"#[..], b"not json", b""] {
            state_file(input);
            assert!(!state_dir().exists(), "after {input:?}");
        }
    }
}
