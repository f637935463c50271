//! Request -> plan: the checks a mount must pass before anything runs (a source of the
//! backend's form, no lock-breaking option, no password, a credentials file only for SMB and
//! only a private root-owned one), then the mount program's arguments and the server to
//! probe.

use std::ffi::OsString;
use std::path::Path;

use crate::config::mount_options::MountOptions;
use crate::config::{check_credentials_file, check_user_options, nfs_host, smb_host, Backend};
use crate::shared::mount::{MountError, MountRequest};

/// The command that performs a mount, and the server to probe first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPlan {
    /// Arguments to the mount program.
    pub args: Vec<OsString>,
    /// `(host, port)` that must accept a TCP connection before mounting is worth trying.
    pub probe: Option<(String, u16)>,
}

/// Builds the mount command for `req`: the backend's filesystem type, its default options with
/// the user's on top, and checks that nothing in them breaks locking or leaks a secret.
pub fn plan(req: &MountRequest) -> Result<MountPlan, MountError> {
    check_request(req)?;
    let backend = req.backend;
    let mut args: Vec<OsString> = Vec::new();
    for (on, flag) in [(req.sloppy, "-s"), (req.no_mtab, "-n"), (req.verbose, "-v")] {
        if on {
            args.push(flag.into());
        }
    }
    let defaults = MountOptions::parse(backend.default_options()).expect("built-in options parse");
    let options = defaults.overridden_by(&req.options);
    match backend.fs_type() {
        Some(fs_type) => {
            args.extend(["-t".into(), fs_type.into()]);
        }
        None => args.push("--bind".into()),
    }
    let options = if req.remount {
        let mut remount = MountOptions::parse("remount").expect("a flag parses");
        remount.extend(options);
        remount
    } else {
        options
    };
    if !options.is_empty() {
        args.extend(["-o".into(), options.to_string().into()]);
    }
    args.push(req.spec.clone().into());
    args.push(req.dir.clone().into());
    let host = nfs_host(&req.spec).or(smb_host(&req.spec));
    // (a remount changes a mount the server already serves: nothing to wait for)
    let probe = match (host, backend.server_port()) {
        (Some(h), Some(port)) if !req.remount => Some((h.to_owned(), port)),
        _ => None,
    };
    Ok(MountPlan { args, probe })
}

/// The checks a request must pass before any command is built: something to mount, a source
/// of the backend's form, no lock-breaking option or password, a credentials file only for
/// SMB (required for azure-smb), private and owned by root.
fn check_request(req: &MountRequest) -> Result<(), MountError> {
    let backend = req.backend;
    if backend == Backend::Premounted {
        return Err(MountError::Premounted {
            dir: req.dir.clone(),
        });
    }
    if req.spec.is_empty() {
        return Err(MountError::BadSource {
            spec: req.spec.clone(),
            backend,
            reason: "the source is empty".into(),
        });
    }
    backend
        .check_source(&req.spec)
        .map_err(|reason| MountError::BadSource {
            spec: req.spec.clone(),
            backend,
            reason,
        })?;
    check_user_options(backend, &req.options).map_err(|reason| MountError::Refused {
        spec: req.spec.clone(),
        dir: req.dir.clone(),
        reason,
    })?;
    if let Some(cred) = req
        .options
        .value("credentials")
        .or(req.options.value("cred"))
    {
        if !backend.is_smb() {
            return Err(MountError::Refused {
                spec: req.spec.clone(),
                dir: req.dir.clone(),
                reason: format!("`credentials=` is only for the SMB backends, not {backend}"),
            });
        }
        check_credentials_file(Path::new(cred)).map_err(|reason| MountError::Credentials {
            path: cred.into(),
            reason,
        })?;
    } else if backend == Backend::AzureSmb {
        return Err(MountError::Refused {
            spec: req.spec.clone(),
            dir: req.dir.clone(),
            reason: "backend=azure-smb needs `credentials=<file>` (root-owned, mode 0600, with \
                     `username=` and `password=` lines)"
                .into(),
        });
    }
    Ok(())
}
