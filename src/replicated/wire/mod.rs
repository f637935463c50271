//! The replication wire protocol: frames ([`Frame`]), their binary encoding ([`codec`]), the
//! pre-shared-key proofs and per-frame MACs ([`mac`]), and reading and writing frames on a
//! stream ([`framed`]).
//!
//! A frame on the wire is `len: u32 LE | body (len bytes) | mac (16 bytes, PSK mode only)`.
//! `len` is checked against [`MAX_FRAME_BYTES`] before anything is allocated, and every count
//! and string inside a body is checked against what remains of it, so a hostile peer cannot
//! make us allocate more than one frame's worth. In PSK mode the MAC is keyed blake3 over the
//! direction, a per-direction frame counter, the body's length and the body, under a session
//! key both sides derive from the PSK and two fresh nonces; a replayed, reordered or altered
//! frame fails it. A batch's page data (the tail of its body, `codec/batch.rs`) is left out of
//! the MAC: each page's blake3 is in the part covered, and the cold side checks every page
//! against it before anything is written, so altered page data is refused all the same (as a
//! checksum failure: the batch is rejected and resent) without a second pass over the bytes.
//!
//! Handshake: the connecting side sends [`Frame::Hello`] (its nonce); the accepting side answers
//! [`Frame::Challenge`] (its nonce and proof that it knows the PSK); the connecting side answers
//! [`Frame::Proof`]. Only then does either side say anything about files. With TLS, TLS does
//! this instead, and frames carry no MAC.

use std::io;

use crate::replicated::ops::Op;
use crate::replicated::pages::{Attrs, Entry, PageHash};

pub mod codec;
pub mod framed;
pub mod mac;

pub use framed::{FrameReader, FrameWriter};
pub use mac::{mac_eq, nonce, FrameMac, Psk};

#[cfg(test)]
mod tests;

/// The protocol version spoken (2: owners, symlinks and allocation in the index, ops and
/// digests; 3: the hot side's sync state in its heartbeat; 4: a batch's page data after its
/// header, outside the PSK MAC, which covers the page hashes and the body's length; 5: a
/// refusal says whether the refusing side is hot and names it, so that two hot sides at one
/// epoch settle which one steps down whichever of them connected; 6: the hot side's
/// introduction says how often the cold side acknowledges, `ack_every`).
pub const VERSION: u16 = 6;
/// The largest frame body accepted or sent once the peer is authenticated.
pub const MAX_FRAME_BYTES: usize = 8 << 20;
/// The largest frame body accepted before the peer is authenticated: the handshake's frames
/// (and a refusal's reason) take a few dozen bytes, so a stranger costs at most this much.
pub const MAX_HANDSHAKE_FRAME_BYTES: usize = 4 << 10;
/// The most page hashes one index frame ([`Frame::IndexFile`] or [`Frame::IndexPages`])
/// carries: 16 B each, 2 MiB of them, a quarter of a frame. A file with more is sent as its
/// `IndexFile` (the first chunk) followed by `IndexPages` frames for the rest.
pub const INDEX_CHUNK_PAGES: usize = 128 << 10;
/// The most bytes of file digests (paths plus 32-byte digests) one digest frame
/// ([`Frame::DigestFiles`] or [`Frame::Digest`]) carries: 256 KiB, so that the dozen parts in
/// flight between the cold side's walk and the hot side's comparison (queues, buffers) stay a
/// few MiB decoded (a reader accepts any digest frame under the frame limit).
pub const DIGEST_CHUNK_BYTES: usize = 256 << 10;
/// The most ops one batch carries. The scanner sends a batch once its ops' bound reaches
/// 1 MiB, counting at least 64 B per op, so its batches hold at most 16,385; an op takes as
/// few as 5 B on the wire but about 100 B decoded, so without this limit one 8 MiB frame of
/// short removals would decode into some 160 MiB.
pub const MAX_BATCH_OPS: usize = 64 << 10;
/// The longest path accepted.
pub const MAX_PATH_BYTES: usize = 4096;
/// Bytes of MAC after each frame in PSK mode.
pub const MAC_BYTES: usize = 16;

/// Errors on the wire, naming what was wrong.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ProtoError {
    /// connection: {0}
    Io(#[from] io::Error),
    /// the peer closed the connection
    Closed,
    /// frame of {0} bytes exceeds the limit of 8 MiB
    TooLarge(usize),
    /// frame of {0} bytes before authentication exceeds the handshake limit of 4 KiB
    TooLargeBeforeAuth(usize),
    /// frame {seq} failed its authentication code (altered in transit, or a different key)
    BadMac { seq: u64 },
    /// malformed frame: {0}
    Malformed(String),
    /// the peer could not prove it knows the pre-shared key
    AuthFailed,
    /// the peer broke the protocol: {0}
    Unexpected(String),
}

/// Everything that crosses the wire, in the order a connection uses them: the handshake, the
/// cold side's index, then the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Connector, first frame: who it is, and its nonce.
    Hello { version: u16, nonce: [u8; 32] },
    /// Acceptor: its nonce and proof of the PSK (zeros without PSK).
    Challenge { nonce: [u8; 32], mac: [u8; 32] },
    /// Connector: proof of the PSK.
    Proof { mac: [u8; 32] },
    /// Connector, once authenticated: its role (`hot`), epoch and holder id, and how often
    /// the acceptor acknowledges: after every `ack_every` batches applied (acknowledgements
    /// are cumulative), the batches between held back at most
    /// [`crate::replicated::receiver::ACK_HOLD`]. 1 (each batch at once) with durable acks.
    Intro {
        epoch: u64,
        hot: bool,
        node: String,
        page_size: u32,
        ack_every: u16,
    },
    /// Acceptor: accepted; its own epoch.
    Welcome { epoch: u64 },
    /// Acceptor: refused (a stale epoch, two hot sides), with its epoch, whether it is hot at
    /// it, its holder id and why. A hot connector refused by a hot side at its own epoch
    /// applies [`crate::replicated::state::tie_break`] to the two holder ids.
    Reject {
        epoch: u64,
        hot: bool,
        node: String,
        reason: String,
    },
    /// Cold: a directory of its tree.
    IndexDir { path: String, attrs: Attrs },
    /// Cold: a file of its tree with its allocation and page hashes.
    IndexFile {
        path: String,
        len: u64,
        attrs: Attrs,
        allocated: bool,
        pages: Vec<PageHash>,
    },
    /// Cold: a symlink of its tree.
    IndexLink {
        path: String,
        target: String,
        attrs: Attrs,
    },
    /// Cold: the index is complete.
    IndexEnd,
    /// Cold: more page hashes of the file the last [`Frame::IndexFile`] named, from page
    /// `first_page` on: a file with more than [`INDEX_CHUNK_PAGES`] pages is sent as its
    /// `IndexFile` (its first chunk) followed by these, in order, before any other frame.
    IndexPages {
        path: String,
        first_page: u64,
        pages: Vec<PageHash>,
    },
    /// Hot: changes to apply in order, then fsync, then ack `seq`.
    Batch { seq: u64, ops: Vec<Op> },
    /// Cold: batch `seq` and all before it are durable.
    Ack { seq: u64 },
    /// Cold: batch `seq` was rejected (failed a check) and dropped with all after it: resend.
    Nack { seq: u64, reason: String },
    /// Cold: a chunk of the file digests of barrier `id`; the [`Frame::Digest`] of the same
    /// id that follows carries the root and the last chunk. Each frame carries at most
    /// [`DIGEST_CHUNK_BYTES`] of them.
    DigestFiles {
        id: u64,
        files: Vec<(String, Entry)>,
    },
    /// Cold: the tree digest at a barrier, and every entry (the last chunk of its file digests).
    Digest {
        id: u64,
        root: [u8; 32],
        files: Vec<(String, Entry)>,
    },
    /// Hot: everything up to `seq` was sent and acked, and the hot is going away cleanly.
    Drained { seq: u64 },
    /// Hot: still here, and how far the cold copy may be behind (sent every second, busy or
    /// not).
    Heartbeat(HotState),
}

/// The hot side's sync state as its heartbeat carries it: what a promoted cold side may have
/// lost if the hot went silent right after sending it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HotState {
    /// `ack = "durable"`: a sync through the mount returns only once we have it.
    pub durable: bool,
    /// Durable with `on_peer_loss = "block"`: it never returns without us.
    pub block: bool,
    /// The first full comparison of this connection is done (before it, the copy may lack
    /// whatever differed when the connection began).
    pub caught_up: bool,
    /// Durable: since when (ms since the Unix epoch) syncs return without us; 0 while not.
    pub degraded_since_unix_ms: u64,
    /// How old the oldest batch sent and not yet acknowledged is, in ms; 0 if none.
    pub unacked_ms: u64,
    /// Durable: how long a sync waits for us before `on_peer_loss` applies, in ms.
    pub peer_timeout_ms: u64,
}
