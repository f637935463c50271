//! Round trips, golden bytes, hostile lengths and MACs of the wire format.

use super::*;
use crate::replicated::ops::Op;
use crate::replicated::pages::{Attrs, Entry, EntryKind};

fn attrs(mode: u32) -> Attrs {
    Attrs {
        mode,
        uid: 4321,
        gid: 4322,
    }
}
use proptest::prelude::*;

fn round_trip(f: &Frame) {
    let mut out = Vec::new();
    f.encode(&mut out).unwrap();
    assert_eq!(&Frame::decode(&out).unwrap(), f);
}

/// One frame of every type, a batch with one op of every type.
fn every_frame() -> Vec<Frame> {
    let data = vec![7u8; 8192];
    vec![
        Frame::Hello {
            version: VERSION,
            nonce: [1; 32],
        },
        Frame::Challenge {
            nonce: [2; 32],
            mac: [3; 32],
        },
        Frame::Proof { mac: [4; 32] },
        Frame::Intro {
            epoch: 9,
            hot: true,
            node: "vm1:/opt/corda".into(),
            page_size: 4096,
        },
        Frame::Welcome { epoch: 9 },
        Frame::Reject {
            epoch: 10,
            reason: "stale".into(),
        },
        Frame::IndexDir {
            path: "journal".into(),
            attrs: attrs(0o755),
        },
        Frame::IndexFile {
            path: "journal/a".into(),
            len: 5,
            attrs: attrs(0o644),
            allocated: true,
            pages: vec![[9; 16]],
        },
        Frame::IndexLink {
            path: "journal/l".into(),
            target: "../elsewhere".into(),
            attrs: attrs(0o777),
        },
        Frame::IndexEnd,
        Frame::Batch {
            seq: 3,
            ops: vec![
                Op::Mkdir {
                    path: "d".into(),
                    mode: 0o700,
                },
                Op::SetFile {
                    path: "d/f".into(),
                    len: 8192,
                    mode: 0o600,
                },
                Op::Write {
                    path: "d/f".into(),
                    offset: 0,
                    hashes: vec![*blake3::hash(&data[..4096]).as_bytes(); 2],
                    data: data.clone(),
                },
                Op::Rename {
                    from: "d/f".into(),
                    to: "d/g".into(),
                },
                Op::Remove { path: "d".into() },
                Op::Barrier { id: 1 },
                Op::SetAttrs {
                    path: "d/g".into(),
                    attrs: attrs(0o640),
                },
                Op::Symlink {
                    path: "d/l".into(),
                    target: "/etc/passwd".into(),
                },
                Op::Allocate {
                    path: "d/g".into(),
                    offset: 4096,
                    len: 8192,
                },
            ],
        },
        Frame::Ack { seq: 3 },
        Frame::Nack {
            seq: 4,
            reason: "bad page".into(),
        },
        Frame::Digest {
            id: 1,
            root: [5; 32],
            files: vec![(
                "a".into(),
                Entry {
                    kind: EntryKind::Link,
                    attrs: attrs(0o777),
                    len: 0,
                    allocated: false,
                    content: [6; 32],
                    target: "b".into(),
                },
            )],
        },
        Frame::Drained { seq: 3 },
        Frame::Heartbeat(HotState {
            durable: true,
            block: false,
            caught_up: true,
            degraded_since_unix_ms: 1_764_500_000_000,
            unacked_ms: 12,
            peer_timeout_ms: 2000,
        }),
    ]
}

/// The frames that continue a long index entry and precede a long digest (version 2).
fn chunk_frames() -> Vec<Frame> {
    vec![
        Frame::IndexPages {
            path: "large-messages/1.msg".into(),
            first_page: 131_072,
            pages: vec![[7; 16], [8; 16]],
        },
        Frame::DigestFiles {
            id: 1,
            files: vec![(
                "b".into(),
                Entry {
                    kind: EntryKind::File,
                    attrs: attrs(0o640),
                    len: 4096,
                    allocated: true,
                    content: [9; 32],
                    target: String::new(),
                },
            )],
        },
    ]
}

#[test]
fn every_frame_round_trips() {
    let mut frames = every_frame();
    frames.extend(chunk_frames());
    for f in &frames {
        round_trip(f);
    }
    // the bytes themselves (version 3: owners, symlinks and allocation; the heartbeat's sync
    // state), so that an encoding change cannot pass unnoticed: a peer of the same version
    // must read ours
    let mut all = Vec::new();
    for f in &frames {
        f.encode(&mut all).unwrap();
    }
    assert_eq!(all.len(), 9055);
    assert_eq!(
        blake3::hash(&all).to_hex().as_str(),
        "a570165355a2fbf3ddc8fe9f4f8169c95af3dbf1a0b4e15a1d69bce7b2064aa1"
    );
}

#[test]
fn hostile_counts_and_lengths_are_refused_before_allocation() {
    // a batch claiming 4 billion ops in 13 bytes
    let mut body = vec![10];
    body.extend_from_slice(&1u64.to_le_bytes());
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(
        matches!(Frame::decode(&body), Err(ProtoError::Malformed(m)) if m.contains("cannot fit"))
    );
    // a path longer than allowed
    let mut out = Vec::new();
    Frame::IndexDir {
        path: "a".repeat(MAX_PATH_BYTES + 1),
        attrs: Attrs::default(),
    }
    .encode(&mut out)
    .unwrap();
    assert!(Frame::decode(&out).is_err());
    // trailing garbage
    let mut out = Vec::new();
    Frame::Heartbeat(HotState::default())
        .encode(&mut out)
        .unwrap();
    out.push(0);
    assert!(Frame::decode(&out).is_err());
    // a heartbeat whose flag is neither 0 nor 1, and one cut short
    let mut two = vec![15, 2, 0, 0];
    two.extend_from_slice(&[0; 24]);
    let short = vec![15, 1, 0, 1, 0, 0];
    for body in [two, short] {
        assert!(
            matches!(Frame::decode(&body), Err(ProtoError::Malformed(_))),
            "{body:?}"
        );
    }
}

#[tokio::test]
async fn before_authentication_only_handshake_sized_frames_are_read() {
    // a stranger announcing an 8 MiB frame is refused on its length, before any allocation
    let mut wire = (8u32 << 20).to_le_bytes().to_vec();
    wire.extend_from_slice(&[0; 64]);
    let mut r = FrameReader::new(&wire[..]);
    let e = r.recv().await.unwrap_err();
    assert!(
        matches!(e, ProtoError::TooLargeBeforeAuth(n) if n == 8 << 20),
        "{e:?}"
    );
    // once authenticated, the same frame is within limits (and short of bytes here)
    let mut r = FrameReader::new(&wire[..]);
    r.authenticated();
    assert!(matches!(r.recv().await, Err(ProtoError::Closed)));
}

#[tokio::test]
async fn macs_catch_flipped_bytes_and_keep_the_stream_in_step() {
    let psk = Psk::from_hex(&"ab".repeat(32)).unwrap();
    let session = psk.session(&[1; 32], &[2; 32]);
    let mut wire = Vec::new();
    let mut w = FrameWriter::new(&mut wire);
    w.set_mac(FrameMac::new(session, 0));
    w.send(&Frame::Ack { seq: 1 }).await.unwrap();
    w.send(&Frame::Ack { seq: 2 }).await.unwrap();
    w.send(&Frame::Ack { seq: 3 }).await.unwrap();
    w.flush().await.unwrap();
    assert_eq!(
        blake3::hash(&wire).to_hex().as_str(),
        "9586b4a6e0c30dc198d836c4c51941663f024a5b18e95cc03001f62a9aa0b0bd",
        "the framing and MACs changed"
    );
    let frame_len = wire.len() / 3;
    wire[frame_len + 6] ^= 0x40; // inside the second frame's body
    let mut r = FrameReader::new(&wire[..]);
    r.authenticated();
    r.set_mac(FrameMac::new(session, 0));
    assert_eq!(r.recv().await.unwrap(), Frame::Ack { seq: 1 });
    assert!(matches!(r.recv().await, Err(ProtoError::BadMac { seq: 1 })));
    assert_eq!(r.recv().await.unwrap(), Frame::Ack { seq: 3 });
    // a different key fails the first frame
    let mut r = FrameReader::new(&wire[..]);
    r.set_mac(FrameMac::new([0; 32], 0));
    assert!(matches!(r.recv().await, Err(ProtoError::BadMac { seq: 0 })));
}

#[test]
fn psk_parsing_and_proofs() {
    assert!(Psk::from_hex("zz").is_err());
    assert!(Psk::from_hex("abcd").unwrap_err().contains("at least 16"));
    let a = Psk::from_hex(&"01".repeat(32)).unwrap();
    let b = Psk::from_hex(&"02".repeat(32)).unwrap();
    assert_ne!(
        a.server_proof(&[0; 32], &[1; 32]),
        b.server_proof(&[0; 32], &[1; 32])
    );
    assert_ne!(
        a.server_proof(&[0; 32], &[1; 32]),
        a.client_proof(&[0; 32], &[1; 32])
    );
    assert!(mac_eq(&[1, 2], &[1, 2]) && !mac_eq(&[1, 2], &[1, 3]));
}

proptest! {
    /// Decoding arbitrary bytes never panics, and never yields a frame that re-encodes
    /// differently.
    #[test]
    fn decode_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(f) = Frame::decode(&body) {
            let mut out = Vec::new();
            f.encode(&mut out).unwrap();
            prop_assert_eq!(out, body);
        }
    }

    /// Writes of arbitrary content and offsets round-trip.
    #[test]
    fn batches_round_trip(data in proptest::collection::vec(any::<u8>(), 0..9000), offset in 0u64..1<<40, path in "[a-z]{1,8}(/[a-z]{1,8}){0,3}") {
        let f = Frame::Batch { seq: offset, ops: vec![Op::Write { path, offset, hashes: vec![[1; 32]], data }] };
        round_trip(&f);
    }
}
