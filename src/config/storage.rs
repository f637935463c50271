//! `[storage]`: where the journal lives (a network share, or replicated local disks), and the
//! `Backend` enum that fixes, for each kind of share, its filesystem type, default mount
//! options, server port and the form its source must have.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{
    DEFAULT_MOUNT_ATTEMPTS, DEFAULT_MOUNT_POINT, DEFAULT_MOUNT_RETRY_MAX_MS,
    DEFAULT_MOUNT_TIMEOUT_S,
};

/// `[storage]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `shared` (a network filesystem) or `replicated`.
    #[serde(default)]
    pub mode: Mode,
    /// How the share is mounted (shared mode only; see [`StorageConfig::backend`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    /// What is mounted: `host:/path` for NFS, `//host/share` for SMB, a directory for `bind`.
    #[serde(default)]
    pub source: String,
    /// Where the share is mounted; must be a real directory, not a symlink.
    #[serde(default = "default_mount_point")]
    pub mount_point: PathBuf,
    /// Extra mount options, applied over the backend's defaults.
    #[serde(default)]
    pub options: String,
    /// SMB credentials (`username=`, `password=` lines), mode 0600 and owned by root.
    #[serde(default)]
    pub credentials_file: PathBuf,
    /// Mount attempts before giving up (the first one included).
    #[serde(default = "default_mount_attempts")]
    pub mount_attempts: u32,
    /// Longest pause between two mount attempts.
    #[serde(default = "default_mount_retry_max_ms")]
    pub mount_retry_max_ms: u64,
    /// What systemd allows the whole mount to take (`x-systemd.mount-timeout=`).
    #[serde(default = "default_mount_timeout_s")]
    pub mount_timeout_s: u64,
}

impl StorageConfig {
    /// The backend; in replicated mode, where nothing is mounted, `premounted`.
    pub fn backend(&self) -> Backend {
        self.backend.unwrap_or(Backend::Premounted)
    }
}

/// `[storage] mode`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Both VMs mount one network filesystem.
    #[default]
    Shared,
    /// The hot VM streams the journal to the cold VM's local disk.
    Replicated,
}

/// `[storage] backend`: the kind of share, which fixes the filesystem type, the default mount
/// options and the port the server must answer on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// AWS EFS over NFS 4.1.
    Efs,
    /// Azure Files over SMB 3.
    AzureSmb,
    /// Azure Files over NFS 4.1 (premium shares).
    AzureNfs,
    /// Any NFS 4 server.
    Nfs,
    /// Any SMB/CIFS server.
    Cifs,
    /// A directory bind-mounted onto the mount point (a share mounted elsewhere, or tests).
    Bind,
    /// Something else mounts the share; the agent only uses it.
    Premounted,
}

/// Every backend, in the order the docs list them.
pub const BACKENDS: [Backend; 7] = [
    Backend::Efs,
    Backend::AzureSmb,
    Backend::AzureNfs,
    Backend::Nfs,
    Backend::Cifs,
    Backend::Bind,
    Backend::Premounted,
];

impl Backend {
    /// The name used in the config and in `backend=` mount options.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Efs => "efs",
            Backend::AzureSmb => "azure-smb",
            Backend::AzureNfs => "azure-nfs",
            Backend::Nfs => "nfs",
            Backend::Cifs => "cifs",
            Backend::Bind => "bind",
            Backend::Premounted => "premounted",
        }
    }

    /// Parses a backend name as written in `backend=`.
    pub fn from_name(name: &str) -> Option<Backend> {
        BACKENDS.into_iter().find(|b| b.name() == name)
    }

    /// The kernel filesystem type the backend mounts, `None` for `bind` and `premounted`.
    pub fn fs_type(self) -> Option<&'static str> {
        match self {
            Backend::Efs | Backend::AzureNfs | Backend::Nfs => Some("nfs4"),
            Backend::AzureSmb | Backend::Cifs => Some("cifs"),
            Backend::Bind | Backend::Premounted => None,
        }
    }

    /// The TCP port the server must answer on before a mount is worth trying.
    pub fn server_port(self) -> Option<u16> {
        match self.fs_type() {
            Some("nfs4") => Some(2049),
            Some("cifs") => Some(445),
            _ => None,
        }
    }

    /// The recommended mount options (README "Configuration", the table of backends); user
    /// options override them.
    pub fn default_options(self) -> &'static str {
        match self {
            Backend::Efs => {
                "nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport"
            }
            Backend::AzureNfs => "vers=4,minorversion=1,sec=sys,hard,timeo=600,retrans=2",
            Backend::Nfs => "hard,timeo=600,retrans=2",
            Backend::AzureSmb => "vers=3.1.1,serverino,nosharesock,actimeo=30,mfsymlinks",
            Backend::Cifs => "serverino",
            Backend::Bind | Backend::Premounted => "",
        }
    }

    /// Whether the backend talks SMB and so may carry a credentials file.
    pub fn is_smb(self) -> bool {
        self.fs_type() == Some("cifs")
    }

    /// Checks that `source` has the form this backend mounts, returning why not.
    pub fn check_source(self, source: &str) -> Result<(), String> {
        match self {
            Backend::Efs | Backend::AzureNfs | Backend::Nfs => match nfs_host(source) {
                Some(host) => check_host(source, host),
                None => Err(format!(
                    "`{source}` is not an NFS source: expected `host:/path` (for EFS \
                     `fs-0123abcd.efs.<region>.amazonaws.com:/`)"
                )),
            },
            Backend::AzureSmb | Backend::Cifs => match smb_host(source) {
                Some(host) => check_host(source, host),
                None => Err(format!(
                    "`{source}` is not an SMB source: expected `//host/share` (for Azure \
                     `//<account>.file.core.windows.net/<share>`)"
                )),
            },
            Backend::Bind => {
                if Path::new(source).is_absolute() {
                    Ok(())
                } else {
                    Err(format!(
                        "`{source}` must be the absolute path of the directory to bind"
                    ))
                }
            }
            Backend::Premounted => Ok(()),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Checks the server host of `source`: a name or an address, as DNS and the mount helpers
/// take them. A host starting with `-` is a command-line option to mount(8) and the helpers,
/// which take the source as an argument (`-v:/` mounted nothing and turned on verbose
/// output); a space, a `,` or a control character has no place in a host and breaks the
/// fstab line or the helper's options.
fn check_host(source: &str, host: &str) -> Result<(), String> {
    if host.starts_with('-') {
        return Err(format!(
            "`{source}`: the host `{host}` starts with `-`, which mount(8) would take for an \
             option"
        ));
    }
    // letters, digits, `.`, `-`, `_` for names and IPv4; `:` and `%` (a zone) for IPv6
    match host
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '%')))
    {
        Some(c) => Err(format!(
            "`{source}`: the host `{host}` holds {c:?}, which no host name or address has"
        )),
        None => Ok(()),
    }
}

/// The server host of an NFS source `host:/path` (`[v6addr]:/path` too).
pub fn nfs_host(source: &str) -> Option<&str> {
    let (host, path) = if let Some(rest) = source.strip_prefix('[') {
        let (host, rest) = rest.split_once(']')?;
        (host, rest.strip_prefix(':')?)
    } else {
        source.split_once(':')?
    };
    (!host.is_empty() && path.starts_with('/')).then_some(host)
}

/// The server host of an SMB source `//host/share`.
pub fn smb_host(source: &str) -> Option<&str> {
    let rest = source.strip_prefix("//")?;
    let (host, share) = rest.split_once('/')?;
    (!host.is_empty() && !share.is_empty()).then_some(host)
}

fn default_mount_point() -> PathBuf {
    PathBuf::from(DEFAULT_MOUNT_POINT)
}
fn default_mount_attempts() -> u32 {
    DEFAULT_MOUNT_ATTEMPTS
}
fn default_mount_retry_max_ms() -> u64 {
    DEFAULT_MOUNT_RETRY_MAX_MS
}
fn default_mount_timeout_s() -> u64 {
    DEFAULT_MOUNT_TIMEOUT_S
}
