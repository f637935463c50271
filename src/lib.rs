//! artemis-sync keeps the ActiveMQ Artemis journal of a hot/cold pair of Corda nodes where both
//! VMs can reach it, and makes sure only one node writes it. This library holds all of the
//! logic; the binaries in `src/main.rs` and `src/bin/` parse arguments and map errors to exit
//! codes. See ARCHITECTURE.md for the roles, the data path and the invariants.
//!
//! The tree follows the two storage modes: [`shared`] (a network share, a lock and a lease on
//! it), [`replicated`] (each VM's own disk, the journal streamed hot to cold), and [`daemon`],
//! what the agents of both modes are made of. [`lease`] is the lease
//! both agents contend for and where it is kept (the share, or a PostgreSQL row). [`config`],
//! [`sys`], [`cli`], [`link`] and [`doctor`] serve both. `shared` and `replicated` never import each other.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod lease;
pub mod link;
pub mod logging;
pub mod replicated;
pub mod shared;
pub mod sys;

/// An error and its causes on one line, `: `-separated, leaving out a cause whose text the
/// message before it already quotes.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    text
}
