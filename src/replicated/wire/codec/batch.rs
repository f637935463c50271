//! A batch frame's body: `type | header length (u32) | header | tail`. The header holds the
//! sequence number and every op with its fields, a `Write`'s data length and the blake3 of
//! each of its pages; the tail holds the `Write`s' data, one after the other in op order.
//!
//! Under a PSK the frame MAC covers the body's length and everything but the tail
//! ([`authenticated`]): the tail's bytes are bound to the header by the page hashes, which the
//! cold side checks for every page before it writes anything (`apply.rs`), so a MAC pass over
//! the page data would only repeat that check (ARCHITECTURE.md, "Authenticated framing").

use crate::replicated::ops::Op;
use crate::replicated::wire::{Frame, ProtoError, MAX_BATCH_OPS};

use super::{Dec, Enc};

/// Frame type of [`Frame::Batch`].
pub(super) const BATCH: u8 = 10;
/// Bytes of the type and the header length before a batch's header.
const HEADER_AT: usize = 1 + 4;
/// The fewest bytes an op takes: its type and an empty path's length (a `Remove` of a short
/// name is 6 bytes; counting 9, as before, refused a batch ending with one).
const OP_MIN_BYTES: usize = 1 + 4;

/// The part of a frame body its MAC covers: all of it, except a batch's tail (a body that
/// does not hold the header it announces is covered whole, and fails to decode).
pub(crate) fn authenticated(body: &[u8]) -> &[u8] {
    if body.first() != Some(&BATCH) || body.len() < HEADER_AT {
        return body;
    }
    let len = u32::from_le_bytes(body[1..HEADER_AT].try_into().expect("4 bytes"));
    usize::try_from(len)
        .ok()
        .and_then(|len| HEADER_AT.checked_add(len))
        .and_then(|end| body.get(..end))
        .unwrap_or(body)
}

/// Appends batch `seq` of `ops`.
pub(super) fn encode(seq: u64, ops: &[Op], e: &mut Enc<'_>) -> Result<(), ProtoError> {
    encode_header(seq, ops, e)?;
    for op in ops {
        if let Op::Write { data, .. } = op {
            e.0.extend_from_slice(data);
        }
    }
    Ok(())
}

/// Appends batch `seq` of `ops` but its tail: the type, the header length and the header.
pub(super) fn encode_header(seq: u64, ops: &[Op], e: &mut Enc<'_>) -> Result<(), ProtoError> {
    e.u8(BATCH);
    let at = e.0.len();
    e.u32(0);
    e.u64(seq);
    if ops.len() > MAX_BATCH_OPS {
        return Err(ProtoError::Malformed(format!(
            "a batch of {} ops (the limit is {MAX_BATCH_OPS})",
            ops.len()
        )));
    }
    e.count(ops.len())?;
    for op in ops {
        encode_op(op, e)?;
    }
    let header = e.0.len() - at - 4;
    let header = u32::try_from(header).map_err(|_| ProtoError::TooLarge(header))?;
    e.0[at..at + 4].copy_from_slice(&header.to_le_bytes());
    Ok(())
}

/// A batch after its type byte: the header, then the data its `Write`s take from the tail,
/// which they must take whole.
pub(super) fn decode(d: &mut Dec<'_>) -> Result<Frame, ProtoError> {
    let len = d.len("batch header length")?;
    let mut h = Dec {
        buf: d.take(len, "batch header")?,
        pos: 0,
        shared: None,
    };
    let seq = h.u64("seq")?;
    let n = h.count("ops", OP_MIN_BYTES)?;
    if n > MAX_BATCH_OPS {
        return Err(ProtoError::Malformed(format!(
            "batch {seq}: {n} ops (the limit is {MAX_BATCH_OPS})"
        )));
    }
    let ops = h.items(n, |h| decode_op(h, d))?;
    h.end()?;
    Ok(Frame::Batch { seq, ops })
}

fn encode_op(op: &Op, e: &mut Enc<'_>) -> Result<(), ProtoError> {
    match op {
        Op::Mkdir { path, mode } => {
            e.u8(1);
            e.str(path)?;
            e.u32(*mode);
        }
        Op::SetFile { path, len, mode } => {
            e.u8(2);
            e.str(path)?;
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
            e.str(path)?;
            e.u64(*offset);
            // the bytes themselves go in the tail
            e.count(data.len())?;
            e.count(hashes.len())?;
            hashes.iter().for_each(|h| e.arr(h));
        }
        Op::Rename { from, to } => {
            e.u8(4);
            e.str(from)?;
            e.str(to)?;
        }
        Op::Remove { path } => {
            e.u8(5);
            e.str(path)?;
        }
        Op::Barrier { id } => {
            e.u8(6);
            e.u64(*id);
        }
        Op::SetAttrs { path, attrs } => {
            e.u8(7);
            e.str(path)?;
            e.attrs(attrs);
        }
        Op::Symlink { path, target } => {
            e.u8(8);
            e.str(path)?;
            e.str(target)?;
        }
        Op::Allocate { path, offset, len } => {
            e.u8(9);
            e.str(path)?;
            e.u64(*offset);
            e.u64(*len);
        }
    }
    Ok(())
}

fn decode_op(d: &mut Dec<'_>, tail: &mut Dec<'_>) -> Result<Op, ProtoError> {
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
            let len = d.len("write data length")?;
            let data = tail.take_bytes(len, "write data")?;
            let n = d.count("write hashes", 32)?;
            let hashes = d.items(n, |d| d.arr::<32>("write hash"))?;
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
        7 => Op::SetAttrs {
            path: d.str("setattrs path")?,
            attrs: d.attrs("setattrs attributes")?,
        },
        8 => Op::Symlink {
            path: d.str("symlink path")?,
            target: d.str("symlink target")?,
        },
        9 => Op::Allocate {
            path: d.str("allocate path")?,
            offset: d.u64("allocate offset")?,
            len: d.u64("allocate len")?,
        },
        t => return Err(ProtoError::Malformed(format!("unknown op type {t}"))),
    })
}
