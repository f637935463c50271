//! The client side of the control protocol, as the CLI uses it: one function per request,
//! each sending it to the agent the config names and returning the typed reply it expects.

use crate::config::Config;

use super::control::{self, ControlError};
use super::protocol::{
    AgentStatus, Demoted, Promoted, Released, Reply, Request, Resumed, Verified,
};

/// Sends `request` to the agent of `config` and returns its reply, whatever it is.
pub fn ask(config: &Config, request: Request) -> Result<Reply, ControlError> {
    control::request(
        &config.agent.control_socket,
        &request,
        request.reply_timeout(config),
    )
}

fn unexpected(config: &Config, request: Request, reply: &Reply) -> ControlError {
    ControlError::UnexpectedReply {
        path: config.agent.control_socket.clone(),
        request: request.name(),
        reply: reply.name(),
    }
}

/// `status`: what the agent is doing.
pub fn status(config: &Config) -> Result<AgentStatus, ControlError> {
    match ask(config, Request::Status)? {
        Reply::Status(status) => Ok(status),
        other => Err(unexpected(config, Request::Status, &other)),
    }
}

/// `release` (shared mode): the node stopped, the lease given up.
pub fn release(config: &Config) -> Result<Released, ControlError> {
    match ask(config, Request::Release)? {
        Reply::Released(released) => Ok(released),
        other => Err(unexpected(config, Request::Release, &other)),
    }
}

/// `promote` (replicated mode, cold host).
pub fn promote(config: &Config, force: bool) -> Result<Promoted, ControlError> {
    let request = Request::Promote { force };
    match ask(config, request)? {
        Reply::Promoted(promoted) => Ok(promoted),
        other => Err(unexpected(config, request, &other)),
    }
}

/// `demote` (replicated mode, hot host).
pub fn demote(config: &Config, force: bool) -> Result<Demoted, ControlError> {
    let request = Request::Demote { force };
    match ask(config, request)? {
        Reply::Demoted(demoted) => Ok(demoted),
        other => Err(unexpected(config, request, &other)),
    }
}

/// `verify` (replicated mode, hot host).
pub fn verify(config: &Config) -> Result<Verified, ControlError> {
    match ask(config, Request::Verify)? {
        Reply::Verified(verified) => Ok(verified),
        other => Err(unexpected(config, Request::Verify, &other)),
    }
}

/// `resume` (both modes): the watchdog's give-up forgotten.
pub fn resume(config: &Config) -> Result<Resumed, ControlError> {
    match ask(config, Request::Resume)? {
        Reply::Resumed(resumed) => Ok(resumed),
        other => Err(unexpected(config, Request::Resume, &other)),
    }
}
