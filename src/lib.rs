//! artemis-sync keeps the ActiveMQ Artemis journal of a hot/cold pair of Corda nodes where both
//! VMs can reach it, and makes sure only one node writes it. This library holds all of the
//! logic; the binaries in `src/main.rs` and `src/bin/` parse arguments and map errors to exit
//! codes. See ARCHITECTURE.md for the roles, the data path and the invariants.

pub mod agent;
pub mod bench;
pub mod certs;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod doctor;
pub mod lease;
pub mod link;
pub mod lock;
pub mod logging;
pub mod mount;
pub mod mountinfo;
pub mod node;
pub mod options;
pub mod pages;
pub mod proto;
pub mod receiver;
pub mod replica;
pub mod sdnotify;
pub mod secure;
pub mod sender;
pub mod sys;
pub mod watch;
pub mod workload;

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
