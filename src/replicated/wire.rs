//! The replication wire protocol: frames, their binary encoding, and the pre-shared-key
//! authentication.
//!
//! A frame on the wire is `len: u32 LE | body (len bytes) | mac (16 bytes, PSK mode only)`.
//! `len` is checked against [`MAX_FRAME_BYTES`] before anything is allocated, and every count
//! and string inside a body is checked against what remains of it, so a hostile peer cannot
//! make us allocate more than one frame's worth. In PSK mode the MAC is keyed blake3 over the
//! direction, a per-direction frame counter and the body, under a session key both sides
//! derive from the PSK and two fresh nonces; a replayed, reordered or altered frame fails it.
//!
//! Handshake: the connecting side sends [`Frame::Hello`] (its nonce); the accepting side answers
//! [`Frame::Challenge`] (its nonce and proof that it knows the PSK); the connecting side answers
//! [`Frame::Proof`]. Only then does either side say anything about files. With TLS, TLS does
//! this instead, and frames carry no MAC.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::replicated::pages::PageHash;

/// The protocol version spoken.
pub const VERSION: u16 = 1;
/// The largest frame body accepted or sent.
pub const MAX_FRAME_BYTES: usize = 8 << 20;
/// The longest path accepted.
pub const MAX_PATH_BYTES: usize = 4096;
/// Bytes of MAC after each frame in PSK mode.
pub const MAC_BYTES: usize = 16;
/// The blake3 key-derivation context for the PSK.
const PSK_CONTEXT: &str = "artemis-sync 2026-11 replication psk v1";

/// Errors on the wire, naming what was wrong.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ProtoError {
    /// connection: {0}
    Io(#[from] io::Error),
    /// the peer closed the connection
    Closed,
    /// frame of {0} bytes exceeds the limit of 8 MiB
    TooLarge(usize),
    /// frame {seq} failed its authentication code (altered in transit, or a different key)
    BadMac { seq: u64 },
    /// malformed frame: {0}
    Malformed(String),
    /// the peer could not prove it knows the pre-shared key
    AuthFailed,
    /// the peer broke the protocol: {0}
    Unexpected(String),
}

/// One change to apply on the cold side, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a directory (and set its mode).
    Mkdir { path: String, mode: u32 },
    /// Make `path` a regular file of `len` bytes and `mode` (created if missing, truncated or
    /// extended with zeros).
    SetFile { path: String, len: u64, mode: u32 },
    /// Write whole pages at `offset` (a multiple of the page size); `hashes` holds the full
    /// blake3 of each page of `data`, checked before anything is written.
    Write {
        path: String,
        offset: u64,
        data: Vec<u8>,
        hashes: Vec<[u8; 32]>,
    },
    /// Rename a file or directory.
    Rename { from: String, to: String },
    /// Remove a file or a directory tree.
    Remove { path: String },
    /// `verify`: reply with the digest of the tree as it stands after everything before this.
    Barrier { id: u64 },
}

/// Everything that crosses the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Connector, first frame: who it is, and its nonce.
    Hello { version: u16, nonce: [u8; 32] },
    /// Acceptor: its nonce and proof of the PSK (zeros without PSK).
    Challenge { nonce: [u8; 32], mac: [u8; 32] },
    /// Connector: proof of the PSK.
    Proof { mac: [u8; 32] },
    /// Connector, once authenticated: its role (`hot`), epoch and holder id.
    Intro {
        epoch: u64,
        hot: bool,
        node: String,
        page_size: u32,
    },
    /// Acceptor: accepted; its own epoch.
    Welcome { epoch: u64 },
    /// Acceptor: refused (a stale epoch, two hot sides), with its epoch and why.
    Reject { epoch: u64, reason: String },
    /// Cold: a directory of its tree.
    IndexDir { path: String, mode: u32 },
    /// Cold: a file of its tree with its page hashes.
    IndexFile {
        path: String,
        len: u64,
        mode: u32,
        pages: Vec<PageHash>,
    },
    /// Cold: the index is complete.
    IndexEnd,
    /// Hot: changes to apply in order, then fsync, then ack `seq`.
    Batch { seq: u64, ops: Vec<Op> },
    /// Cold: batch `seq` and all before it are durable.
    Ack { seq: u64 },
    /// Cold: batch `seq` was rejected (failed a check) and dropped with all after it: resend.
    Nack { seq: u64, reason: String },
    /// Cold: the tree digest at a barrier.
    Digest {
        id: u64,
        root: [u8; 32],
        files: Vec<(String, [u8; 32])>,
    },
    /// Hot: everything up to `seq` was sent and acked, and the hot is going away cleanly.
    Drained { seq: u64 },
    /// Either: still here.
    Heartbeat,
}

// ---------------------------------------------------------------- encoding

struct Enc<'a>(&'a mut Vec<u8>);

impl Enc<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn arr<const N: usize>(&mut self, a: &[u8; N]) {
        self.0.extend_from_slice(a);
    }
}

struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() - self.pos < n {
            return Err(ProtoError::Malformed(format!(
                "{what}: needs {n} bytes, {} left",
                self.buf.len() - self.pos
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, ProtoError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self, what: &str) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ProtoError> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }
    fn bytes(&mut self, what: &str) -> Result<&'a [u8], ProtoError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    fn str(&mut self, what: &str) -> Result<String, ProtoError> {
        let b = self.bytes(what)?;
        if b.len() > MAX_PATH_BYTES {
            return Err(ProtoError::Malformed(format!(
                "{what}: {} bytes is longer than {MAX_PATH_BYTES}",
                b.len()
            )));
        }
        String::from_utf8(b.to_vec())
            .map_err(|_| ProtoError::Malformed(format!("{what}: not UTF-8")))
    }
    /// A count of items that each take at least `min_bytes`, checked against what is left.
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize, ProtoError> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_bytes.max(1)) > self.buf.len() - self.pos {
            return Err(ProtoError::Malformed(format!(
                "{what}: {n} items cannot fit in what is left of the frame"
            )));
        }
        Ok(n)
    }
    fn end(&self) -> Result<(), ProtoError> {
        if self.pos != self.buf.len() {
            return Err(ProtoError::Malformed(format!(
                "{} trailing bytes",
                self.buf.len() - self.pos
            )));
        }
        Ok(())
    }
}

impl Op {
    fn encode(&self, e: &mut Enc<'_>) {
        match self {
            Op::Mkdir { path, mode } => {
                e.u8(1);
                e.str(path);
                e.u32(*mode);
            }
            Op::SetFile { path, len, mode } => {
                e.u8(2);
                e.str(path);
                e.u64(*len);
                e.u32(*mode);
            }
            Op::Write {
                path,
                offset,
                data,
                hashes,
            } => {
                e.u8(3);
                e.str(path);
                e.u64(*offset);
                e.bytes(data);
                e.u32(hashes.len() as u32);
                for h in hashes {
                    e.arr(h);
                }
            }
            Op::Rename { from, to } => {
                e.u8(4);
                e.str(from);
                e.str(to);
            }
            Op::Remove { path } => {
                e.u8(5);
                e.str(path);
            }
            Op::Barrier { id } => {
                e.u8(6);
                e.u64(*id);
            }
        }
    }

    fn decode(d: &mut Dec<'_>) -> Result<Op, ProtoError> {
        Ok(match d.u8("op type")? {
            1 => Op::Mkdir {
                path: d.str("mkdir path")?,
                mode: d.u32("mkdir mode")?,
            },
            2 => Op::SetFile {
                path: d.str("setfile path")?,
                len: d.u64("setfile len")?,
                mode: d.u32("setfile mode")?,
            },
            3 => {
                let path = d.str("write path")?;
                let offset = d.u64("write offset")?;
                let data = d.bytes("write data")?.to_vec();
                let n = d.count("write hashes", 32)?;
                let hashes = (0..n)
                    .map(|_| d.arr::<32>("write hash"))
                    .collect::<Result<_, _>>()?;
                Op::Write {
                    path,
                    offset,
                    data,
                    hashes,
                }
            }
            4 => Op::Rename {
                from: d.str("rename from")?,
                to: d.str("rename to")?,
            },
            5 => Op::Remove {
                path: d.str("remove path")?,
            },
            6 => Op::Barrier {
                id: d.u64("barrier id")?,
            },
            t => return Err(ProtoError::Malformed(format!("unknown op type {t}"))),
        })
    }

    /// Bytes of file data this op carries.
    pub fn data_len(&self) -> usize {
        match self {
            Op::Write { data, .. } => data.len(),
            _ => 0,
        }
    }
}

impl Frame {
    /// Appends the frame's body to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut e = Enc(out);
        match self {
            Frame::Hello { version, nonce } => {
                e.u8(1);
                e.u16(*version);
                e.arr(nonce);
            }
            Frame::Challenge { nonce, mac } => {
                e.u8(2);
                e.arr(nonce);
                e.arr(mac);
            }
            Frame::Proof { mac } => {
                e.u8(3);
                e.arr(mac);
            }
            Frame::Intro {
                epoch,
                hot,
                node,
                page_size,
            } => {
                e.u8(4);
                e.u64(*epoch);
                e.u8(u8::from(*hot));
                e.str(node);
                e.u32(*page_size);
            }
            Frame::Welcome { epoch } => {
                e.u8(5);
                e.u64(*epoch);
            }
            Frame::Reject { epoch, reason } => {
                e.u8(6);
                e.u64(*epoch);
                e.str(reason);
            }
            Frame::IndexDir { path, mode } => {
                e.u8(7);
                e.str(path);
                e.u32(*mode);
            }
            Frame::IndexFile {
                path,
                len,
                mode,
                pages,
            } => {
                e.u8(8);
                e.str(path);
                e.u64(*len);
                e.u32(*mode);
                e.u32(pages.len() as u32);
                for p in pages {
                    e.arr(p);
                }
            }
            Frame::IndexEnd => e.u8(9),
            Frame::Batch { seq, ops } => {
                e.u8(10);
                e.u64(*seq);
                e.u32(ops.len() as u32);
                for op in ops {
                    op.encode(&mut e);
                }
            }
            Frame::Ack { seq } => {
                e.u8(11);
                e.u64(*seq);
            }
            Frame::Nack { seq, reason } => {
                e.u8(12);
                e.u64(*seq);
                e.str(reason);
            }
            Frame::Digest { id, root, files } => {
                e.u8(13);
                e.u64(*id);
                e.arr(root);
                e.u32(files.len() as u32);
                for (p, d) in files {
                    e.str(p);
                    e.arr(d);
                }
            }
            Frame::Drained { seq } => {
                e.u8(14);
                e.u64(*seq);
            }
            Frame::Heartbeat => e.u8(15),
        }
    }

    /// Parses a frame body; every length is checked against the body.
    pub fn decode(body: &[u8]) -> Result<Frame, ProtoError> {
        let mut d = Dec { buf: body, pos: 0 };
        let frame = match d.u8("frame type")? {
            1 => Frame::Hello {
                version: d.u16("version")?,
                nonce: d.arr("nonce")?,
            },
            2 => Frame::Challenge {
                nonce: d.arr("nonce")?,
                mac: d.arr("mac")?,
            },
            3 => Frame::Proof { mac: d.arr("mac")? },
            4 => Frame::Intro {
                epoch: d.u64("epoch")?,
                hot: d.u8("role")? != 0,
                node: d.str("node")?,
                page_size: d.u32("page size")?,
            },
            5 => Frame::Welcome {
                epoch: d.u64("epoch")?,
            },
            6 => Frame::Reject {
                epoch: d.u64("epoch")?,
                reason: d.str("reason")?,
            },
            7 => Frame::IndexDir {
                path: d.str("dir path")?,
                mode: d.u32("dir mode")?,
            },
            8 => {
                let path = d.str("file path")?;
                let len = d.u64("file len")?;
                let mode = d.u32("file mode")?;
                let n = d.count("page hashes", 16)?;
                let pages = (0..n)
                    .map(|_| d.arr::<16>("page hash"))
                    .collect::<Result<_, _>>()?;
                Frame::IndexFile {
                    path,
                    len,
                    mode,
                    pages,
                }
            }
            9 => Frame::IndexEnd,
            10 => {
                let seq = d.u64("seq")?;
                let n = d.count("ops", 9)?;
                let ops = (0..n)
                    .map(|_| Op::decode(&mut d))
                    .collect::<Result<_, _>>()?;
                Frame::Batch { seq, ops }
            }
            11 => Frame::Ack { seq: d.u64("seq")? },
            12 => Frame::Nack {
                seq: d.u64("seq")?,
                reason: d.str("reason")?,
            },
            13 => {
                let id = d.u64("id")?;
                let root = d.arr("root")?;
                let n = d.count("digests", 36)?;
                let files = (0..n)
                    .map(|_| Ok((d.str("path")?, d.arr::<32>("digest")?)))
                    .collect::<Result<_, ProtoError>>()?;
                Frame::Digest { id, root, files }
            }
            14 => Frame::Drained { seq: d.u64("seq")? },
            15 => Frame::Heartbeat,
            t => return Err(ProtoError::Malformed(format!("unknown frame type {t}"))),
        };
        d.end()?;
        Ok(frame)
    }
}

// ---------------------------------------------------------------- keys and MACs

/// A key from the PSK file's hex text.
#[derive(Clone)]
pub struct Psk([u8; 32]);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(..)")
    }
}

impl Psk {
    /// The key for the PSK file's text (see [`crate::config::psk_material`]).
    pub fn from_hex(text: &str) -> Result<Psk, String> {
        Ok(Psk(blake3::derive_key(
            PSK_CONTEXT,
            &crate::config::psk_material(text)?,
        )))
    }

    fn mac(&self, label: &[u8], a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(label);
        h.update(a);
        h.update(b);
        *h.finalize().as_bytes()
    }

    /// The acceptor's proof for the nonces.
    pub fn server_proof(&self, client: &[u8; 32], server: &[u8; 32]) -> [u8; 32] {
        self.mac(b"acceptor", client, server)
    }

    /// The connector's proof for the nonces.
    pub fn client_proof(&self, client: &[u8; 32], server: &[u8; 32]) -> [u8; 32] {
        self.mac(b"connector", client, server)
    }

    /// The session key for the nonces.
    pub fn session(&self, client: &[u8; 32], server: &[u8; 32]) -> [u8; 32] {
        self.mac(b"session", client, server)
    }
}

/// Compares two MACs without an early exit.
pub fn mac_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 random bytes from the kernel.
pub fn nonce() -> io::Result<[u8; 32]> {
    let mut n = [0u8; 32];
    io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut n)?;
    Ok(n)
}

/// The per-frame MAC state of one direction.
#[derive(Debug, Clone)]
pub struct FrameMac {
    key: [u8; 32],
    direction: u8,
    seq: u64,
}

impl FrameMac {
    /// Frames sent by the connector use direction 0, by the acceptor 1.
    pub fn new(session: [u8; 32], direction: u8) -> Self {
        FrameMac {
            key: session,
            direction,
            seq: 0,
        }
    }

    fn tag(&self, body: &[u8]) -> [u8; MAC_BYTES] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&[self.direction]);
        h.update(&self.seq.to_le_bytes());
        h.update(body);
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(&h.finalize().as_bytes()[..MAC_BYTES]);
        out
    }
}

// ---------------------------------------------------------------- framed I/O

/// Writes frames to a stream.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
    mac: Option<FrameMac>,
    /// Bytes written, for statistics.
    pub bytes: u64,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer without MAC (until [`FrameWriter::set_mac`]).
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            buf: Vec::with_capacity(1 << 20),
            mac: None,
            bytes: 0,
        }
    }

    /// From now on, every frame carries a MAC.
    pub fn set_mac(&mut self, mac: FrameMac) {
        self.mac = Some(mac);
    }

    /// Encodes and writes one frame (buffered; call [`FrameWriter::flush`]).
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ProtoError> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0; 4]);
        frame.encode(&mut self.buf);
        let body_len = self.buf.len() - 4;
        if body_len > MAX_FRAME_BYTES {
            return Err(ProtoError::TooLarge(body_len));
        }
        self.buf[..4].copy_from_slice(&(body_len as u32).to_le_bytes());
        if let Some(mac) = &mut self.mac {
            let tag = mac.tag(&self.buf[4..]);
            mac.seq += 1;
            self.buf.extend_from_slice(&tag);
        }
        self.inner.write_all(&self.buf).await?;
        self.bytes += self.buf.len() as u64;
        Ok(())
    }

    /// Sends buffered frames.
    pub async fn flush(&mut self) -> Result<(), ProtoError> {
        self.inner.flush().await?;
        Ok(())
    }

    /// The stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

/// Reads frames from a stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    mac: Option<FrameMac>,
    /// Bytes read, for statistics.
    pub bytes: u64,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader without MAC (until [`FrameReader::set_mac`]).
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            mac: None,
            bytes: 0,
        }
    }

    /// From now on, every frame must carry a valid MAC.
    pub fn set_mac(&mut self, mac: FrameMac) {
        self.mac = Some(mac);
    }

    /// Reads one frame. A frame whose MAC fails is consumed whole (the stream stays in step)
    /// and reported as [`ProtoError::BadMac`].
    pub async fn recv(&mut self) -> Result<Frame, ProtoError> {
        let mut len = [0u8; 4];
        match self.inner.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ProtoError::Closed),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME_BYTES {
            return Err(ProtoError::TooLarge(len));
        }
        let total = len + if self.mac.is_some() { MAC_BYTES } else { 0 };
        self.buf.resize(total, 0);
        self.inner.read_exact(&mut self.buf).await.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ProtoError::Closed
            } else {
                e.into()
            }
        })?;
        self.bytes += 4 + total as u64;
        if let Some(mac) = &mut self.mac {
            let want = mac.tag(&self.buf[..len]);
            let seq = mac.seq;
            mac.seq += 1;
            if !mac_eq(&want, &self.buf[len..]) {
                return Err(ProtoError::BadMac { seq });
            }
        }
        Frame::decode(&self.buf[..len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(f: &Frame) {
        let mut out = Vec::new();
        f.encode(&mut out);
        assert_eq!(&Frame::decode(&out).unwrap(), f);
    }

    #[test]
    fn every_frame_round_trips() {
        let data = vec![7u8; 8192];
        let frames = vec![
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
                mode: 0o755,
            },
            Frame::IndexFile {
                path: "journal/a".into(),
                len: 5,
                mode: 0o644,
                pages: vec![[9; 16]],
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
                files: vec![("a".into(), [6; 32])],
            },
            Frame::Drained { seq: 3 },
            Frame::Heartbeat,
        ];
        for f in &frames {
            round_trip(f);
        }
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
            mode: 0,
        }
        .encode(&mut out);
        assert!(Frame::decode(&out).is_err());
        // trailing garbage
        let mut out = Vec::new();
        Frame::Heartbeat.encode(&mut out);
        out.push(0);
        assert!(Frame::decode(&out).is_err());
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
        let frame_len = wire.len() / 3;
        wire[frame_len + 6] ^= 0x40; // inside the second frame's body
        let mut r = FrameReader::new(&wire[..]);
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
                f.encode(&mut out);
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
}
