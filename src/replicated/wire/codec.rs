//! The binary encoding of frame bodies: little-endian integers, `u32`-length-prefixed byte
//! strings and counts, fixed-size arrays. A frame starts with its type byte; an op inside a
//! batch starts with its own. Encoding refuses a length that does not fit its `u32` prefix;
//! decoding checks every length and count against what is left of the body before it
//! allocates, and refuses trailing bytes.

use bytes::Bytes;

use crate::replicated::ops::Op;
use crate::replicated::pages::{Attrs, Entry, EntryKind};
use crate::replicated::wire::{Frame, HotState, ProtoError, MAX_PATH_BYTES};

mod batch;

pub(crate) use batch::authenticated;

/// Frame type of [`Frame::IndexLink`] (after the frame types 1 to 15, leaving room).
const INDEX_LINK: u8 = 20;
/// Bytes of an encoded [`Attrs`].
const ATTRS_BYTES: usize = 12;
/// The fewest bytes an entry of a [`Frame::Digest`] takes (empty path and target).
pub(crate) const ENTRY_MIN_BYTES: usize = 4 + 1 + ATTRS_BYTES + 8 + 1 + 32 + 4;

/// Appends to a frame body.
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
    /// A length or count as its `u32` prefix; one that does not fit makes the frame too large.
    fn count(&mut self, n: usize) -> Result<(), ProtoError> {
        self.u32(u32::try_from(n).map_err(|_| ProtoError::TooLarge(n))?);
        Ok(())
    }
    fn bytes(&mut self, b: &[u8]) -> Result<(), ProtoError> {
        self.count(b.len())?;
        self.0.extend_from_slice(b);
        Ok(())
    }
    fn str(&mut self, s: &str) -> Result<(), ProtoError> {
        self.bytes(s.as_bytes())
    }
    fn arr<const N: usize>(&mut self, a: &[u8; N]) {
        self.0.extend_from_slice(a);
    }
    fn attrs(&mut self, a: &Attrs) {
        self.u32(a.mode);
        self.u32(a.uid);
        self.u32(a.gid);
    }
    fn entry(&mut self, path: &str, e: &Entry) -> Result<(), ProtoError> {
        self.str(path)?;
        self.u8(e.kind.code());
        self.attrs(&e.attrs);
        self.u64(e.len);
        self.u8(u8::from(e.allocated));
        self.arr(&e.content);
        self.str(&e.target)
    }
}

/// Reads a frame body, checking every length against what is left.
struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
    /// The buffer `buf` lies in, when a write's data may share it rather than copy it.
    shared: Option<&'a Bytes>,
}

impl<'a> Dec<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ProtoError> {
        if self.left() < n {
            return Err(ProtoError::Malformed(format!(
                "{what}: needs {n} bytes, {} left",
                self.left()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    /// `n` bytes as their own buffer: a slice of the shared one, else a copy.
    fn take_bytes(&mut self, n: usize, what: &str) -> Result<Bytes, ProtoError> {
        let s = self.take(n, what)?;
        Ok(match self.shared {
            Some(b) => b.slice_ref(s),
            None => Bytes::copy_from_slice(s),
        })
    }
    fn u8(&mut self, what: &str) -> Result<u8, ProtoError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.arr(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ProtoError> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }
    /// A `u32` length or count as a `usize`.
    fn len(&mut self, what: &str) -> Result<usize, ProtoError> {
        let n = self.u32(what)?;
        usize::try_from(n)
            .map_err(|_| ProtoError::Malformed(format!("{what}: {n} does not fit in memory")))
    }
    fn bytes(&mut self, what: &str) -> Result<&'a [u8], ProtoError> {
        let n = self.len(what)?;
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
        let n = self.len(what)?;
        if n.saturating_mul(min_bytes.max(1)) > self.left() {
            return Err(ProtoError::Malformed(format!(
                "{what}: {n} items cannot fit in what is left of the frame"
            )));
        }
        Ok(n)
    }
    /// `n` items read by `item`.
    fn items<T>(
        &mut self,
        n: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, ProtoError>,
    ) -> Result<Vec<T>, ProtoError> {
        (0..n).map(|_| item(self)).collect()
    }
    fn attrs(&mut self, what: &str) -> Result<Attrs, ProtoError> {
        Ok(Attrs {
            mode: self.u32(what)?,
            uid: self.u32(what)?,
            gid: self.u32(what)?,
        })
    }
    fn flag(&mut self, what: &str) -> Result<bool, ProtoError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(ProtoError::Malformed(format!("{what}: {b} is not 0 or 1"))),
        }
    }
    fn entry(&mut self) -> Result<(String, Entry), ProtoError> {
        let path = self.str("entry path")?;
        let code = self.u8("entry kind")?;
        let kind = EntryKind::from_code(code)
            .ok_or_else(|| ProtoError::Malformed(format!("unknown entry kind {code}")))?;
        let e = Entry {
            kind,
            attrs: self.attrs("entry attributes")?,
            len: self.u64("entry len")?,
            allocated: self.flag("entry allocation")?,
            content: self.arr("entry digest")?,
            target: self.str("entry target")?,
        };
        Ok((path, e))
    }
    fn end(&self) -> Result<(), ProtoError> {
        if self.pos != self.buf.len() {
            return Err(ProtoError::Malformed(format!(
                "{} trailing bytes",
                self.left()
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- frames

impl Frame {
    /// Appends the frame's body to `out`; fails only for a string, a byte string or a list
    /// too long for its `u32` length prefix.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        let mut e = Enc(out);
        match self {
            Frame::Hello { .. }
            | Frame::Challenge { .. }
            | Frame::Proof { .. }
            | Frame::Intro { .. }
            | Frame::Welcome { .. }
            | Frame::Reject { .. } => self.encode_handshake(&mut e),
            Frame::IndexDir { .. }
            | Frame::IndexFile { .. }
            | Frame::IndexLink { .. }
            | Frame::IndexEnd => self.encode_index(&mut e),
            Frame::Batch { .. }
            | Frame::Ack { .. }
            | Frame::Nack { .. }
            | Frame::Digest { .. }
            | Frame::Drained { .. }
            | Frame::Heartbeat(_) => self.encode_stream(&mut e),
            Frame::IndexPages { .. } | Frame::DigestFiles { .. } => self.encode_chunk(&mut e),
        }
    }

    /// Frame types 16 and 17: the chunks that follow a long index entry or precede a long
    /// digest.
    fn encode_chunk(&self, e: &mut Enc<'_>) -> Result<(), ProtoError> {
        match self {
            Frame::IndexPages {
                path,
                first_page,
                pages,
            } => {
                e.u8(16);
                e.str(path)?;
                e.u64(*first_page);
                e.count(pages.len())?;
                pages.iter().for_each(|p| e.arr(p));
            }
            Frame::DigestFiles { id, files } => {
                e.u8(17);
                e.u64(*id);
                e.count(files.len())?;
                for (p, entry) in files {
                    e.entry(p, entry)?;
                }
            }
            other => unreachable!("{other:?} is not a chunk frame"),
        }
        Ok(())
    }

    fn decode_chunk(t: u8, d: &mut Dec<'_>) -> Result<Frame, ProtoError> {
        Ok(match t {
            16 => {
                let path = d.str("file path")?;
                let first_page = d.u64("first page")?;
                let n = d.count("page hashes", 16)?;
                let pages = d.items(n, |d| d.arr::<16>("page hash"))?;
                Frame::IndexPages {
                    path,
                    first_page,
                    pages,
                }
            }
            17 => {
                let id = d.u64("id")?;
                let n = d.count("entries", ENTRY_MIN_BYTES)?;
                let files = d.items(n, Dec::entry)?;
                Frame::DigestFiles { id, files }
            }
            t => return Err(unknown(t)),
        })
    }

    /// Frame types 1 to 6: authentication, introduction, admission.
    fn encode_handshake(&self, e: &mut Enc<'_>) -> Result<(), ProtoError> {
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
                ack_every,
            } => {
                e.u8(4);
                e.u64(*epoch);
                e.u8(u8::from(*hot));
                e.str(node)?;
                e.u32(*page_size);
                e.u16(*ack_every);
            }
            Frame::Welcome { epoch } => {
                e.u8(5);
                e.u64(*epoch);
            }
            Frame::Reject {
                epoch,
                hot,
                node,
                reason,
            } => {
                e.u8(6);
                e.u64(*epoch);
                e.u8(u8::from(*hot));
                e.str(node)?;
                e.str(reason)?;
            }
            other => unreachable!("{other:?} is not a handshake frame"),
        }
        Ok(())
    }

    /// Frame types 7 to 9 and [`INDEX_LINK`]: the cold side's index.
    fn encode_index(&self, e: &mut Enc<'_>) -> Result<(), ProtoError> {
        match self {
            Frame::IndexDir { path, attrs } => {
                e.u8(7);
                e.str(path)?;
                e.attrs(attrs);
            }
            Frame::IndexFile {
                path,
                len,
                attrs,
                allocated,
                pages,
            } => {
                e.u8(8);
                e.str(path)?;
                e.u64(*len);
                e.attrs(attrs);
                e.u8(u8::from(*allocated));
                e.count(pages.len())?;
                pages.iter().for_each(|p| e.arr(p));
            }
            Frame::IndexEnd => e.u8(9),
            Frame::IndexLink {
                path,
                target,
                attrs,
            } => {
                e.u8(INDEX_LINK);
                e.str(path)?;
                e.str(target)?;
                e.attrs(attrs);
            }
            other => unreachable!("{other:?} is not an index frame"),
        }
        Ok(())
    }

    /// Frame types 10 to 15: batches and what answers them.
    fn encode_stream(&self, e: &mut Enc<'_>) -> Result<(), ProtoError> {
        match self {
            Frame::Batch { seq, ops } => batch::encode(*seq, ops, e)?,
            Frame::Ack { seq } => {
                e.u8(11);
                e.u64(*seq);
            }
            Frame::Nack { seq, reason } => {
                e.u8(12);
                e.u64(*seq);
                e.str(reason)?;
            }
            Frame::Digest { id, root, files } => {
                e.u8(13);
                e.u64(*id);
                e.arr(root);
                e.count(files.len())?;
                for (p, entry) in files {
                    e.entry(p, entry)?;
                }
            }
            Frame::Drained { seq } => {
                e.u8(14);
                e.u64(*seq);
            }
            Frame::Heartbeat(h) => {
                e.u8(15);
                e.u8(u8::from(h.durable));
                e.u8(u8::from(h.block));
                e.u8(u8::from(h.caught_up));
                e.u64(h.degraded_since_unix_ms);
                e.u64(h.unacked_ms);
                e.u64(h.peer_timeout_ms);
            }
            other => unreachable!("{other:?} is not a stream frame"),
        }
        Ok(())
    }

    /// Parses a frame body; every length is checked against the body.
    pub fn decode(body: &[u8]) -> Result<Frame, ProtoError> {
        Frame::decode_from(Dec {
            buf: body,
            pos: 0,
            shared: None,
        })
    }

    /// [`Frame::decode`], each write's data a slice of `body` rather than a copy.
    pub fn decode_shared(body: &Bytes) -> Result<Frame, ProtoError> {
        Frame::decode_from(Dec {
            buf: body,
            pos: 0,
            shared: Some(body),
        })
    }

    /// A batch's body in two parts: everything but the tail, then the tail's parts (each
    /// write's data, shared with `ops`, not copied); any other frame whole, with no tail.
    /// Sent one after the other they are the body [`Frame::encode`] makes.
    pub fn encode_parts(&self, out: &mut Vec<u8>) -> Result<Vec<Bytes>, ProtoError> {
        match self {
            Frame::Batch { seq, ops } => {
                batch::encode_header(*seq, ops, &mut Enc(out))?;
                Ok(ops
                    .iter()
                    .filter_map(|op| match op {
                        Op::Write { data, .. } => Some(data.clone()),
                        _ => None,
                    })
                    .collect())
            }
            other => {
                other.encode(out)?;
                Ok(Vec::new())
            }
        }
    }

    fn decode_from(mut d: Dec<'_>) -> Result<Frame, ProtoError> {
        let frame = match d.u8("frame type")? {
            t @ 1..=6 => Frame::decode_handshake(t, &mut d)?,
            t @ (7..=9 | INDEX_LINK) => Frame::decode_index(t, &mut d)?,
            t @ 10..=15 => Frame::decode_stream(t, &mut d)?,
            t @ 16..=17 => Frame::decode_chunk(t, &mut d)?,
            t => return Err(unknown(t)),
        };
        d.end()?;
        Ok(frame)
    }

    fn decode_handshake(t: u8, d: &mut Dec<'_>) -> Result<Frame, ProtoError> {
        Ok(match t {
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
                ack_every: d.u16("acknowledgement interval")?,
            },
            5 => Frame::Welcome {
                epoch: d.u64("epoch")?,
            },
            6 => Frame::Reject {
                epoch: d.u64("epoch")?,
                hot: d.flag("refusing side hot")?,
                node: d.str("refusing side")?,
                reason: d.str("reason")?,
            },
            t => return Err(unknown(t)),
        })
    }

    fn decode_index(t: u8, d: &mut Dec<'_>) -> Result<Frame, ProtoError> {
        Ok(match t {
            7 => Frame::IndexDir {
                path: d.str("dir path")?,
                attrs: d.attrs("dir attributes")?,
            },
            8 => {
                let path = d.str("file path")?;
                let len = d.u64("file len")?;
                let attrs = d.attrs("file attributes")?;
                let allocated = d.flag("file allocation")?;
                let n = d.count("page hashes", 16)?;
                let pages = d.items(n, |d| d.arr::<16>("page hash"))?;
                Frame::IndexFile {
                    path,
                    len,
                    attrs,
                    allocated,
                    pages,
                }
            }
            9 => Frame::IndexEnd,
            INDEX_LINK => Frame::IndexLink {
                path: d.str("link path")?,
                target: d.str("link target")?,
                attrs: d.attrs("link attributes")?,
            },
            t => return Err(unknown(t)),
        })
    }

    fn decode_stream(t: u8, d: &mut Dec<'_>) -> Result<Frame, ProtoError> {
        Ok(match t {
            batch::BATCH => batch::decode(d)?,
            11 => Frame::Ack { seq: d.u64("seq")? },
            12 => Frame::Nack {
                seq: d.u64("seq")?,
                reason: d.str("reason")?,
            },
            13 => {
                let id = d.u64("id")?;
                let root = d.arr("root")?;
                let n = d.count("entries", ENTRY_MIN_BYTES)?;
                let files = d.items(n, Dec::entry)?;
                Frame::Digest { id, root, files }
            }
            14 => Frame::Drained { seq: d.u64("seq")? },
            15 => Frame::Heartbeat(HotState {
                durable: d.flag("heartbeat durable")?,
                block: d.flag("heartbeat block")?,
                caught_up: d.flag("heartbeat caught up")?,
                degraded_since_unix_ms: d.u64("heartbeat degraded since")?,
                unacked_ms: d.u64("heartbeat unacked age")?,
                peer_timeout_ms: d.u64("heartbeat peer timeout")?,
            }),
            t => return Err(unknown(t)),
        })
    }
}

fn unknown(t: u8) -> ProtoError {
    ProtoError::Malformed(format!("unknown frame type {t}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicated::ops::Op;

    #[test]
    fn a_batch_of_one_removal_of_a_short_name_decodes() {
        let f = Frame::Batch {
            seq: 1,
            ops: vec![Op::Remove { path: "d".into() }],
        };
        let mut out = Vec::new();
        f.encode(&mut out).unwrap();
        assert_eq!(Frame::decode(&out).unwrap(), f);
    }

    #[test]
    fn a_length_beyond_its_u32_prefix_is_refused_not_truncated() {
        let mut out = Vec::new();
        let mut e = Enc(&mut out);
        e.count(4096).unwrap();
        if let Ok(n) = usize::try_from(u64::from(u32::MAX) + 1) {
            assert!(matches!(e.count(n), Err(ProtoError::TooLarge(m)) if m == n));
        }
        assert_eq!(out, 4096u32.to_le_bytes());
    }
}
