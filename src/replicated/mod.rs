//! Replicated mode: each VM keeps the journal on its own disk and the hot VM streams it to the
//! cold one. Along the data path: [`watch`] and the scanner in [`sender`] capture changes as
//! page operations described in [`pages`]; [`wire`] frames them; [`channel`] authenticates the
//! connection (mutual TLS with [`certs`], or a pre-shared key); [`sender`] streams batches and
//! resends what is not acknowledged; [`receiver`] checks and applies them on the cold disk;
//! [`agent`] is the daemon that keeps the epoch and the role ([`state`], also the gate that
//! decides which hot side the cold side admits) and runs the node on the hot VM.

pub mod agent;
pub mod certs;
pub mod channel;
pub mod pages;
pub mod receiver;
pub mod sender;
pub mod state;
pub mod watch;
pub mod wire;
