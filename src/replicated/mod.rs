//! Replicated mode: each VM keeps the journal on its own disk and the hot VM streams it to the
//! cold one. The files follow a journal write along the data path:
//!
//! Hot side:
//! 1. [`capture`]: the FUSE mount (`capture/fuse/`, the default capture: the node's calls
//!    themselves) or [`capture::watch`] (inotify) feeds a bounded channel of events; the
//!    scanner thread ([`capture`], hashing in `capture/scan.rs`, events in `capture/events.rs`)
//!    compares pages with its table, a model of the cold disk, and emits [`ops::Op`]s in
//!    batches. Page hashes, file states, the tree index and its digest are in [`pages`].
//! 2. [`stream`]: the network task numbers each batch, frames it ([`wire`]), sends it over a
//!    connection authenticated by [`channel`] (mutual TLS with certificates from [`certs`], or
//!    a pre-shared key), keeps it until acknowledged, resends, and reconnects.
//!
//! Cold side:
//! 3. [`receiver`]: the listener authenticates the hot side, asks the agent's epoch gate,
//!    sends the cold tree's index, and reads batches.
//! 4. [`apply`]: the check thread (`apply-check`) hashes a batch's pages against their
//!    checksums (a small batch: the connection task), the apply thread validates the whole
//!    batch (paths confined, no page failed), writes it, fsyncs, and answers; the connection
//!    acknowledges.
//!
//! [`ops`] holds what the steps hand each other (ops, the scanner's messages, the apply
//! outcome, the verify report), [`stats`] the counters both sides publish, [`progress`] the hot
//! side's progress through an initial sync or resync, [`hot_sync`] the
//! hot side's sync state as the cold side last heard it (the RPO `promote` reports). [`sender`] and
//! [`receiver`] are the two entry points the agent starts; [`agent`] is the daemon that keeps
//! the epoch and the role ([`state`]: the state file, and the gate that decides which hot side
//! the cold side admits), and runs the node on the hot VM. With the database lease
//! (`[lease] backend = "postgres"`) the agent also runs the [`crate::lease::machine`], whose
//! epoch is the replication epoch, and the hot side's [`witness`] reports in the lease row how
//! far behind the cold copy is, so that the cold VM can fail over by itself only when complete.

pub mod ack_watch;
pub mod agent;
pub mod apply;
pub mod capture;
pub mod certs;
pub mod channel;
pub mod hot_sync;
pub mod ops;
pub mod pages;
pub mod progress;
pub mod receiver;
pub mod sender;
pub mod state;
pub mod stats;
pub mod stream;
pub mod wire;
pub mod witness;
