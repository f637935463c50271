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
            ack_every: 4,
        },
        Frame::Welcome { epoch: 9 },
        Frame::Reject {
            epoch: 10,
            hot: true,
            node: "vm2:/opt/corda".into(),
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
                    data: data.clone().into(),
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
    // the bytes themselves (version 6: owners, symlinks and allocation; the heartbeat's sync
    // state; a batch's page data after its header; a refusal's role and holder id; the
    // introduction's acknowledgement interval), so that an encoding change cannot pass
    // unnoticed: a peer of the same version must read ours
    let mut all = Vec::new();
    for f in &frames {
        f.encode(&mut all).unwrap();
    }
    assert_eq!(all.len(), 9080);
    assert_eq!(
        blake3::hash(&all).to_hex().as_str(),
        "83025e2f3cfaf45ccdc93e91374b124ab3cc2ec03f45a044dbb21a4b9ebcb19d"
    );
}

/// Version 5's refusal: the refusing side's role and holder id, read strictly. A version 4
/// refusal (epoch and reason only) is malformed here: the two versions never get this far,
/// since the handshake's `Hello` refuses a peer of another version first.
#[test]
fn issue10_a_refusal_names_the_refusing_side_and_whether_it_is_hot() {
    let refusal = Frame::Reject {
        epoch: 3,
        hot: true,
        node: "b:/opt/corda".into(),
        reason: "two hot sides".into(),
    };
    let mut body = Vec::new();
    refusal.encode(&mut body).unwrap();
    let mut expected = vec![6];
    expected.extend_from_slice(&3u64.to_le_bytes());
    expected.push(1);
    expected.extend_from_slice(&12u32.to_le_bytes());
    expected.extend_from_slice(b"b:/opt/corda");
    expected.extend_from_slice(&13u32.to_le_bytes());
    expected.extend_from_slice(b"two hot sides");
    assert_eq!(body, expected);
    assert_eq!(Frame::decode(&body).unwrap(), refusal);
    let mut not_a_flag = body.clone();
    not_a_flag[9] = 2;
    assert!(
        matches!(Frame::decode(&not_a_flag), Err(ProtoError::Malformed(m)) if m.contains("not 0 or 1"))
    );
    let mut trailing = body.clone();
    trailing.push(0);
    assert!(Frame::decode(&trailing).is_err());
    let mut v4 = vec![6];
    v4.extend_from_slice(&3u64.to_le_bytes());
    v4.extend_from_slice(&5u32.to_le_bytes());
    v4.extend_from_slice(b"stale");
    assert!(Frame::decode(&v4).is_err());
}

#[test]
fn hostile_counts_and_lengths_are_refused_before_allocation() {
    // a batch claiming 4 billion ops in a 12-byte header
    let mut body = vec![10];
    body.extend_from_slice(&12u32.to_le_bytes());
    body.extend_from_slice(&1u64.to_le_bytes());
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(
        matches!(Frame::decode(&body), Err(ProtoError::Malformed(m)) if m.contains("cannot fit"))
    );
    // a batch of more (short) ops than a batch may hold: 6 B each on the wire, it fits the
    // frame, but decoded it would take some 20 times that; the most allowed round-trips
    let removals = |n: usize| {
        let mut header = 1u64.to_le_bytes().to_vec();
        header.extend_from_slice(&u32::try_from(n).unwrap().to_le_bytes());
        for _ in 0..n {
            header.extend_from_slice(&[5, 1, 0, 0, 0, b'a']);
        }
        let mut body = vec![10];
        body.extend_from_slice(&u32::try_from(header.len()).unwrap().to_le_bytes());
        body.extend_from_slice(&header);
        body
    };
    let over = removals(MAX_BATCH_OPS + 1);
    assert!(over.len() < MAX_FRAME_BYTES);
    assert!(
        matches!(Frame::decode(&over), Err(ProtoError::Malformed(m)) if m.contains("the limit is")),
    );
    let most = Frame::decode(&removals(MAX_BATCH_OPS)).unwrap();
    let Frame::Batch { ops, .. } = &most else {
        panic!("{most:?}")
    };
    assert_eq!(ops.len(), MAX_BATCH_OPS);
    let mut out = Vec::new();
    most.encode(&mut out).unwrap();
    let Frame::Batch { mut ops, .. } = most else {
        unreachable!()
    };
    ops.push(Op::Remove { path: "a".into() });
    assert!(Frame::Batch { seq: 1, ops }.encode(&mut out).is_err());
    // a batch header longer than the body, a write whose data the tail lacks, a tail with
    // bytes no write takes
    let write = Frame::Batch {
        seq: 1,
        ops: vec![Op::Write {
            path: "a".into(),
            offset: 0,
            data: vec![7; 10].into(),
            hashes: vec![[1; 32]],
        }],
    };
    let mut out = Vec::new();
    write.encode(&mut out).unwrap();
    let mut long_header = out.clone();
    long_header[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
    let short_tail = out[..out.len() - 1].to_vec();
    let mut long_tail = out.clone();
    long_tail.push(0);
    for body in [long_header, short_tail, long_tail] {
        assert!(
            matches!(Frame::decode(&body), Err(ProtoError::Malformed(_))),
            "{body:?}"
        );
    }
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
        "f8cb2c89f0e8a41790754c8c1e9f2701fe75c7e9900dc95302d6967db95077f7",
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

#[tokio::test]
async fn issue15_a_batch_mac_covers_header_and_length_and_its_page_hashes_bind_the_data() {
    let session = Psk::from_hex(&"ab".repeat(32))
        .unwrap()
        .session(&[1; 32], &[2; 32]);
    let page = vec![0x42u8; 4096];
    let batch = Frame::Batch {
        seq: 7,
        ops: vec![Op::Write {
            path: "journal/a".into(),
            offset: 0,
            hashes: vec![*blake3::hash(&page).as_bytes()],
            data: page.clone().into(),
        }],
    };
    let mut wire = Vec::new();
    let mut w = FrameWriter::new(&mut wire);
    w.set_mac(FrameMac::new(session, 0));
    w.send(&batch).await.unwrap();
    w.flush().await.unwrap();
    let read = |wire: Vec<u8>| async move {
        let mut r = FrameReader::new(&wire[..]);
        r.authenticated();
        r.set_mac(FrameMac::new(session, 0));
        r.recv().await
    };
    assert_eq!(read(wire.clone()).await.unwrap(), batch);
    // the page data is the body's tail, before the 16-byte MAC: altered there, the frame
    // passes the MAC, and its page no longer matches its hash, which the cold side checks
    // before it writes anything (apply.rs; the integration test flips a page in transit)
    let mut data_flipped = wire.clone();
    let in_page = data_flipped.len() - MAC_BYTES - 100;
    data_flipped[in_page] ^= 1;
    let Frame::Batch { ops, .. } = read(data_flipped).await.unwrap() else {
        panic!("not a batch")
    };
    let Op::Write { data, hashes, .. } = &ops[0] else {
        panic!("not a write")
    };
    assert_ne!(blake3::hash(data).as_bytes(), &hashes[0]);
    // anything in the header (the path, offset, lengths, page hashes) fails the MAC
    let header_len = u32::from_le_bytes(wire[5..9].try_into().unwrap()) as usize;
    for at in [4 + 1, 4 + 5, 4 + 5 + header_len - 1] {
        let mut flipped = wire.clone();
        flipped[at] ^= 1;
        let got = read(flipped).await;
        assert!(
            matches!(
                got,
                Err(ProtoError::BadMac { seq: 0 }) | Err(ProtoError::Malformed(_))
            ),
            "byte {at}: {got:?}"
        );
    }
    let mut flipped = wire.clone();
    flipped[4 + 5 + header_len - 1] ^= 1; // the last byte of the last page hash
    assert!(matches!(
        read(flipped).await,
        Err(ProtoError::BadMac { seq: 0 })
    ));
    // a page cut short (the length prefix adjusted) fails the MAC: the length is covered
    let mut cut = wire[..wire.len() - MAC_BYTES - 1].to_vec();
    cut.extend_from_slice(&wire[wire.len() - MAC_BYTES..]);
    let len = u32::from_le_bytes(cut[..4].try_into().unwrap()) - 1;
    cut[..4].copy_from_slice(&len.to_le_bytes());
    assert!(matches!(
        read(cut).await,
        Err(ProtoError::BadMac { seq: 0 })
    ));
}

#[tokio::test]
async fn issue15_a_long_batch_sent_in_parts_and_read_in_place_is_the_same_frame_on_the_same_bytes()
{
    let session = [9u8; 32];
    // long enough for the reader's own buffer; two writes, a metadata op between
    let pages: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 4096]).collect();
    let write = |path: &str, ps: &[Vec<u8>]| Op::Write {
        path: path.into(),
        offset: 0,
        hashes: ps.iter().map(|p| *blake3::hash(p).as_bytes()).collect(),
        data: ps.concat().into(),
    };
    let batch = Frame::Batch {
        seq: 3,
        ops: vec![
            write("journal/a", &pages[..25]),
            Op::Remove { path: "x".into() },
            write("journal/b", &pages[25..]),
        ],
    };
    let mut whole = Vec::new();
    let mut w = FrameWriter::new(&mut whole);
    w.set_mac(FrameMac::new(session, 0));
    w.send(&batch).await.unwrap();
    let mut parts = Vec::new();
    let mut w = FrameWriter::new(&mut parts);
    w.set_mac(FrameMac::new(session, 0));
    let encoded = framed::encode_body(&batch).unwrap();
    assert_eq!(encoded.tail.len(), 2, "the page data is shared, not copied");
    w.send_encoded(&encoded).await.unwrap();
    assert_eq!(parts, whole, "the same bytes on the wire");
    let read = |wire: Vec<u8>| async move {
        let mut r = FrameReader::new(&wire[..]);
        r.authenticated();
        r.set_mac(FrameMac::new(session, 0));
        r.recv().await
    };
    assert_eq!(read(parts.clone()).await.unwrap(), batch);
    // the stream ends in the middle of the body
    let cut = parts[..parts.len() / 2].to_vec();
    assert!(matches!(read(cut).await, Err(ProtoError::Closed)));
    // a page byte altered in transit: the frame decodes, the page fails its hash
    let mut flipped = parts.clone();
    let at = flipped.len() - MAC_BYTES - 5000;
    flipped[at] ^= 1;
    let Frame::Batch { ops, .. } = read(flipped).await.unwrap() else {
        panic!("not a batch")
    };
    let Op::Write { data, hashes, .. } = &ops[2] else {
        panic!("not a write")
    };
    let bad = data
        .chunks(4096)
        .zip(hashes)
        .filter(|(p, h)| blake3::hash(p).as_bytes() != *h)
        .count();
    assert_eq!(bad, 1);
    // the header altered: the MAC fails
    let mut flipped = parts.clone();
    flipped[4 + 5 + 10] ^= 1;
    assert!(matches!(
        read(flipped).await,
        Err(ProtoError::BadMac { seq: 0 })
    ));
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
        let f = Frame::Batch { seq: offset, ops: vec![Op::Write { path, offset, hashes: vec![[1; 32]], data: data.into() }] };
        round_trip(&f);
    }
}

/// A long frame is read into a buffer from the reader's pool, and its writes share it; once
/// they are dropped (applied) the next long frame is read into the same memory, not into new
/// memory that faults in page by page. A buffer still shared is not read into again.
#[tokio::test]
async fn issue15_a_long_frames_buffer_is_used_again_once_its_writes_are_dropped() {
    let session = [4u8; 32];
    let batch = |byte: u8| Frame::Batch {
        seq: u64::from(byte),
        ops: vec![Op::Write {
            path: "journal/a".into(),
            offset: 0,
            hashes: vec![*blake3::hash(&[byte; 4096]).as_bytes(); 32],
            data: vec![byte; 32 * 4096].into(),
        }],
    };
    let mut wire = Vec::new();
    let mut w = FrameWriter::new(&mut wire);
    w.set_mac(FrameMac::new(session, 0));
    for byte in 1..=3 {
        w.send(&batch(byte)).await.unwrap();
    }
    let mut r = FrameReader::new(&wire[..]);
    r.authenticated();
    r.set_mac(FrameMac::new(session, 0));
    let data_of = |f: &Frame| match f {
        Frame::Batch { ops, .. } => match &ops[0] {
            Op::Write { data, .. } => data.clone(),
            other => panic!("not a write: {other:?}"),
        },
        other => panic!("not a batch: {other:?}"),
    };
    let first = r.recv().await.unwrap();
    assert_eq!(first, batch(1));
    let at = data_of(&first).as_ptr();
    let second = r.recv().await.unwrap();
    assert_eq!(second, batch(2));
    assert_ne!(
        data_of(&second).as_ptr(),
        at,
        "the first frame's writes still hold it"
    );
    assert_eq!(r.pool.kept(), 0);
    drop(first);
    assert_eq!(
        r.pool.kept(),
        1,
        "back in the pool once its writes are dropped"
    );
    let third = r.recv().await.unwrap();
    assert_eq!(third, batch(3));
    assert_eq!(
        data_of(&third).as_ptr(),
        at,
        "read into the first frame's buffer again"
    );
    assert_eq!(r.pool.kept(), 0);
}
