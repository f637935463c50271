//! What the steps of the data path hand each other, in one module every step imports (and
//! which imports none of them): the [`Op`]s a batch carries from the scanner to the apply
//! thread, the scanner's output to the network task (`Outgoing`) and its control messages
//! ([`ScanMsg`]), the apply thread's answer for a batch ([`Applied`]: ack, skip or nack), the
//! sender's events for the agent, and the `verify` report built from both sides' digests.

use crossbeam_channel::Sender;

use crate::replicated::pages::{Attrs, Comparison, Entry, TreeIndex};

/// One change to apply on the cold side, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a directory (and set its mode).
    Mkdir { path: String, mode: u32 },
    /// Make `path` a regular file of `len` bytes and `mode` (created if missing, truncated or
    /// extended with zeros).
    SetFile { path: String, len: u64, mode: u32 },
    /// Write whole pages at `offset` (a multiple of the page size); `hashes` holds the full
    /// blake3 of each page of `data`, checked before anything is written. `data` is shared,
    /// not copied: on the hot side between the scanner's run and the sender's window, on the
    /// cold side with the frame it arrived in.
    Write {
        path: String,
        offset: u64,
        data: bytes::Bytes,
        hashes: Vec<[u8; 32]>,
    },
    /// Rename a file, directory or symlink.
    Rename { from: String, to: String },
    /// Set the owner and group of `path` itself (never a symlink's target), then its mode
    /// (unless it is a symlink: changing the owner may clear set-id bits).
    SetAttrs { path: String, attrs: Attrs },
    /// Make `path` a symlink to `target` (text, never followed), replacing what is there.
    Symlink { path: String, target: String },
    /// Allocate `len` bytes of the file at `offset` (`fallocate`, mode 0): the hot file is
    /// fully allocated, so the cold one must not be sparse.
    Allocate { path: String, offset: u64, len: u64 },
    /// Remove a file or a directory tree.
    Remove { path: String },
    /// `verify`: reply with the digest of the tree as it stands after everything before this.
    Barrier { id: u64 },
}

impl Op {
    /// Bytes of file data this op carries.
    pub fn data_len(&self) -> usize {
        match self {
            Op::Write { data, .. } => data.len(),
            _ => 0,
        }
    }

    /// The op in a few words, without its data (for trace logs).
    pub fn describe(&self) -> String {
        match self {
            Op::Mkdir { path, mode } => format!("mkdir {path} {mode:o}"),
            Op::SetFile { path, len, mode } => format!("setfile {path} {len} {mode:o}"),
            Op::Write {
                path, offset, data, ..
            } => format!("write {path} @{offset}+{}", data.len()),
            Op::Rename { from, to } => format!("rename {from} -> {to}"),
            Op::SetAttrs { path, attrs } => format!("setattrs {path} {attrs:?}"),
            Op::Symlink { path, target } => format!("symlink {path} -> {target}"),
            Op::Allocate { path, offset, len } => format!("allocate {path} @{offset}+{len}"),
            Op::Remove { path } => format!("remove {path}"),
            Op::Barrier { id } => format!("barrier {id}"),
        }
    }
}

/// A part of the cold tree's digest at barrier `id`, streamed as the tree is walked: entries
/// in path order; the last part carries the root digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestPart {
    /// The barrier.
    pub id: u64,
    /// The root digest, in the last part only.
    pub root: Option<[u8; 32]>,
    /// The next entries, in path order.
    pub files: Vec<(String, Entry)>,
}

/// The apply thread's outcome for one batch: the connection answers `Ack` for `Done` (at once,
/// or with the next few: `receiver::ACK_HOLD`), nothing for `Skipped`, `Nack` for `Rejected`,
/// and drops the stream for `Failed`.
#[derive(Debug)]
pub enum Applied {
    /// Durable; page bytes written (the digests of any barriers in it went out before).
    Done { seq: u64, bytes: u64 },
    /// Not the next batch (a duplicate, or one after a rejected batch): ignored.
    Skipped { seq: u64 },
    /// Failed a check before anything was written: resend it.
    Rejected { seq: u64, reason: String },
    /// Failed while writing (disk full, permissions): the connection is dropped.
    Failed { seq: u64, reason: String },
}

/// Requests to the scanner: from the agent (verify, drain, stop) and from the network task
/// (a new connection's index, a lost connection).
#[derive(Debug)]
pub enum ScanMsg {
    /// Compare hot and cold at a barrier in the stream.
    Verify(Sender<Result<VerifyReport, String>>),
    /// Send everything, wait for the acks, send the drained marker.
    Drain(Sender<Result<u64, String>>),
    /// Stop scanning.
    Stop,
    // from the network task:
    /// The cold side is building its index: hash the tree meanwhile (the write path only).
    #[doc(hidden)]
    Prehash,
    #[doc(hidden)]
    Resync { gen: u64, index: TreeIndex },
    #[doc(hidden)]
    Disconnected,
}

/// What the scanner hands the network task, tagged with the connection (`gen`) it was made
/// for: anything made for an earlier connection is dropped (the new index resyncs it).
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// Ops to number, frame and send as one batch.
    Batch { gen: u64, ops: Vec<Op> },
    /// A verify whose barrier follows in the stream: the parts of the cold digest of barrier
    /// `id` go to `parts`, where the scanner compares them with its table as they come.
    Verify {
        gen: u64,
        id: u64,
        parts: Sender<DigestPart>,
    },
    /// Answer once every batch sent so far is acknowledged.
    Drain {
        gen: u64,
        reply: Sender<Result<u64, String>>,
    },
    /// A durable sync: answer once every batch sent so far is acknowledged (no marker is sent;
    /// dropped unanswered if the connection ends first).
    Synced { gen: u64, reply: Sender<()> },
}

/// What the sender tells the agent.
#[derive(Debug, Clone)]
pub enum SenderEvent {
    /// The peer refused us, at its `epoch`, hot at it or not, `node` its holder id: a newer
    /// epoch means we must stop being hot; a hot peer at our own epoch, that the tie-break
    /// ([`crate::replicated::state::tie_break`]) decides which of us steps down.
    Rejected {
        epoch: u64,
        hot: bool,
        node: String,
        reason: String,
    },
    /// The peer welcomed our stream: it is cold and has seen no epoch newer than ours
    /// (`epoch` is its own), so a hot side that waits for this may start its node.
    Welcomed { epoch: u64 },
}

/// The result of `verify`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// Whether the trees are identical.
    pub identical: bool,
    /// The hot tree's root digest (hex).
    pub hot_root: String,
    /// The cold tree's root digest (hex).
    pub cold_root: String,
    /// Entries (directories, files, symlinks) in the larger tree.
    pub files: usize,
    /// Each difference in words: "journal/a: owner 4321:4322 vs 0:0" (hot first),
    /// "link x: target a vs b", "x: missing on cold".
    pub differing: Vec<String>,
}

impl VerifyReport {
    /// The report of a comparison of the hot table with the cold side's digest.
    pub(crate) fn new(cmp: Comparison, cold_root: [u8; 32]) -> VerifyReport {
        let hex = |d: &[u8; 32]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        VerifyReport {
            identical: cmp.hot_root == cold_root && cmp.differing.is_empty(),
            hot_root: hex(&cmp.hot_root),
            cold_root: hex(&cold_root),
            files: cmp.hot_entries.max(cmp.cold_entries),
            differing: cmp.differing,
        }
    }
}
