//! The checks every loaded config passes before anything uses it: absolute paths, one mode
//! with its own keys, a source of the backend's form, mount options that keep locks on the
//! server and no secret on a command line, a private root-owned credentials file, lease
//! intervals the node's stop fits into, and mount retries that fit in systemd's timeout.
//! Each failure names the file and the key.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::config::backoff::{Backoff, MOUNT_PROBE_TIMEOUT};
use crate::config::mount_options::{self, MountOptions};
use crate::config::{fence_margin_ms, Backend, Config, ConfigError, Mode};

/// A maker of [`ConfigError::Invalid`] for the config file at `path`.
pub(super) fn invalid_in(path: &Path) -> impl Fn(&'static str, String) -> ConfigError + '_ {
    move |key, reason| ConfigError::Invalid {
        path: path.to_owned(),
        key,
        reason,
    }
}

impl Config {
    /// Every check, in a fixed order; the first failure is the one reported.
    pub(super) fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        self.validate_paths(path)?;
        self.validate_mode(path)?;
        self.validate_source(path)?;
        self.validate_options(path)?;
        self.validate_credentials(path)?;
        self.validate_lock(path)?;
        self.validate_lease(path)?;
        super::health::validate(&self.node, path)?;
        self.validate_metrics(path)?;
        self.validate_mount_retries(path)
    }

    /// `node.base_dir` and `storage.mount_point`: absolute, the mount point a real directory
    /// other than the link.
    fn validate_paths(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = invalid_in(path);
        let s = &self.storage;
        absolute("node.base_dir", &self.node.base_dir).map_err(|r| invalid("node.base_dir", r))?;
        absolute("storage.mount_point", &s.mount_point)
            .map_err(|r| invalid("storage.mount_point", r))?;
        if s.mount_point.is_symlink() {
            return Err(invalid(
                "storage.mount_point",
                format!(
                    "= {:?} is a symlink; systemd cannot mount on a symlink: use the real \
                     directory it points to",
                    s.mount_point
                ),
            ));
        }
        if s.mount_point == self.artemis_link() {
            return Err(invalid(
                "storage.mount_point",
                "must not be base_dir/artemis itself: that path becomes the link to the mount point"
                    .into(),
            ));
        }
        not_inside_link(&s.mount_point, &self.artemis_link())
            .map_err(|r| invalid("storage.mount_point", r))?;
        if self.storage.mode == Mode::Shared {
            not_over_base_dir(&s.mount_point, &self.node.base_dir, MOUNT_HIDES)
                .map_err(|r| invalid("storage.mount_point", r))?;
        }
        Ok(())
    }

    /// `storage.mode`, `storage.backend` and `[replication]` agree: shared mode has a backend
    /// and no `[replication]`; replicated mode has `[replication]`, valid, and no backend.
    fn validate_mode(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = invalid_in(path);
        match (self.storage.mode, &self.replication, self.storage.backend) {
            (Mode::Replicated, None, _) => Err(invalid(
                "storage.mode",
                "= \"replicated\" needs a [replication] section".into(),
            )),
            (Mode::Replicated, Some(r), None) => self.validate_replication(path, r),
            (Mode::Replicated, Some(_), Some(_)) => Err(invalid(
                "storage.backend",
                "is for mode = \"shared\"; replicated mode mounts nothing".into(),
            )),
            (Mode::Shared, Some(_), _) => Err(invalid(
                "replication",
                "is only used with [storage] mode = \"replicated\"".into(),
            )),
            (Mode::Shared, None, None) => Err(invalid(
                "storage.backend",
                "is required: efs, azure-smb, azure-nfs, nfs, cifs, bind or premounted".into(),
            )),
            (Mode::Shared, None, Some(_)) => Ok(()),
        }
    }

    /// `storage.source`: present, and of the backend's form (anything for `premounted`, where
    /// it is only documentation).
    fn validate_source(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = invalid_in(path);
        let s = &self.storage;
        if s.backend() == Backend::Premounted {
            Ok(())
        } else if s.source.is_empty() {
            Err(invalid(
                "storage.source",
                format!("is required for backend \"{}\"", s.backend()),
            ))
        } else {
            s.backend()
                .check_source(&s.source)
                .map_err(|r| invalid("storage.source", r))
        }
    }

    /// `storage.options`: they parse, set nothing the fstab line writes from other keys, and
    /// neither break locking nor carry a password.
    fn validate_options(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = invalid_in(path);
        let s = &self.storage;
        let opts = MountOptions::parse(&s.options)
            .map_err(|e| invalid("storage.options", e.to_string()))?;
        if let Some(key) = RESERVED_OPTIONS
            .iter()
            .find(|k| opts.contains(k))
            .copied()
            .or_else(|| opts.keys().find(|k| k.starts_with("x-")).map(|_| "x-*"))
        {
            return Err(invalid(
                "storage.options",
                format!("may not set `{key}`: artemis-sync writes it itself from the config (backend, mount_attempts, mount_retry_max_ms, mount_timeout_s, credentials_file)"),
            ));
        }
        check_user_options(s.backend(), &opts).map_err(|r| invalid("storage.options", r))
    }

    /// `storage.credentials_file`: required for azure-smb, only for the SMB backends, and a
    /// private root-owned file.
    fn validate_credentials(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = invalid_in(path);
        let s = &self.storage;
        if s.credentials_file.as_os_str().is_empty() {
            if s.backend() == Backend::AzureSmb {
                return Err(invalid(
                    "storage.credentials_file",
                    "is required for backend \"azure-smb\" (a root-owned 0600 file with \
                     `username=` and `password=` lines)"
                        .into(),
                ));
            }
            return Ok(());
        }
        if !s.backend().is_smb() {
            return Err(invalid(
                "storage.credentials_file",
                format!("is only used by the SMB backends, not \"{}\"", s.backend()),
            ));
        }
        // the path is the value of the mount option `credentials=`, in the fstab line and on
        // mount's command line: a `,` would end it, a `=` the helper refuses, a `"` opens a
        // quote that mount(8) and the helper read to the end of the options
        let text = s.credentials_file.to_string_lossy();
        if let Some(c) = text.chars().find(|c| matches!(c, ',' | '=' | '"')) {
            return Err(invalid(
                "storage.credentials_file",
                format!(
                    "= {text:?} holds `{c}`, which a mount option's value (`credentials=`) \
                     cannot carry; move the file to a path without `,` or `=`"
                ),
            ));
        }
        check_credentials_file(&s.credentials_file)
            .map_err(|r| invalid("storage.credentials_file", r))
    }

    /// `storage.mount_attempts` at least one, and all their pauses and reachability probes
    /// shorter than `storage.mount_timeout_s`, so that systemd does not kill a mount still
    /// retrying.
    fn validate_mount_retries(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = invalid_in(path);
        let s = &self.storage;
        if s.mount_attempts == 0 {
            return Err(invalid(
                "storage.mount_attempts",
                "must be at least 1".into(),
            ));
        }
        let pauses_ms = Backoff::new(s.mount_attempts, s.mount_retry_max_ms).total_ms();
        let probe_ms = u64::try_from(MOUNT_PROBE_TIMEOUT.as_millis()).unwrap_or(u64::MAX);
        let probes_ms = u64::from(s.mount_attempts).saturating_mul(probe_ms);
        let budget_ms = pauses_ms.saturating_add(probes_ms);
        if budget_ms >= s.mount_timeout_s.saturating_mul(1000) {
            return Err(invalid(
                "storage.mount_timeout_s",
                format!(
                    "= {} is shorter than the {} ms that {} attempts with \
                     mount_retry_max_ms = {} may need ({} ms of pauses and {} ms of \
                     reachability probes while the network is down); raise it or lower the \
                     attempts",
                    s.mount_timeout_s,
                    budget_ms,
                    s.mount_attempts,
                    s.mount_retry_max_ms,
                    pauses_ms,
                    probes_ms
                ),
            ));
        }
        Ok(())
    }

    /// `[lock]` and `[agent]`: absolute paths, a machine name, intervals as Corda's, and a
    /// node stop that fits between the last renewal and a contender's takeover.
    fn validate_lock(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = invalid_in(path);
        let l = &self.lock;
        absolute("lock.dir", &l.dir).map_err(|r| invalid("lock.dir", r))?;
        absolute("agent.control_socket", &self.agent.control_socket)
            .map_err(|r| invalid("agent.control_socket", r))?;
        if l.machine_name.is_empty() || l.machine_name.contains(char::is_whitespace) {
            return Err(invalid(
                "lock.machine_name",
                format!("= {:?} must be a non-empty name without spaces (the host name has none to offer)", l.machine_name),
            ));
        }
        if l.update_interval_ms == 0 {
            return Err(invalid("lock.update_interval_ms", "must be above 0".into()));
        }
        if l.wait_interval_ms <= l.update_interval_ms {
            return Err(invalid(
                "lock.wait_interval_ms",
                format!(
                    "= {} must exceed update_interval_ms = {} (as Corda's waitInterval must exceed updateInterval)",
                    l.wait_interval_ms, l.update_interval_ms
                ),
            ));
        }
        // The node must be down before a contender may take over: within wait_interval_ms of
        // the start of the last good renewal, less the margin, while leaving room for at least
        // one renewal attempt before that deadline.
        let margin = fence_margin_ms(l.wait_interval_ms);
        let room = l
            .wait_interval_ms
            .saturating_sub(l.update_interval_ms + margin);
        if self.node.stop_timeout_ms >= room {
            return Err(invalid(
                "node.stop_timeout_ms",
                format!(
                    "= {} does not fit: the node must be down within wait_interval_ms = {} of the last renewal; \
                     after update_interval_ms = {} and a margin of {} ms, {} ms remain for stopping it. \
                     Lower stop_timeout_ms or raise wait_interval_ms",
                    self.node.stop_timeout_ms, l.wait_interval_ms, l.update_interval_ms, margin, room
                ),
            ));
        }
        for (key, cmd) in [
            ("node.command", &self.node.command),
            ("node.on_acquire", &self.node.on_acquire),
            ("node.on_release", &self.node.on_release),
        ] {
            if cmd.first().is_some_and(|p| p.is_empty()) {
                return Err(invalid(key, "names an empty program".into()));
            }
        }
        if !self.node.systemd_unit.is_empty() && !self.node.command.is_empty() {
            return Err(invalid(
                "node.systemd_unit",
                format!(
                    "= {:?} and `node.command` both say how to run the node: set one, not both \
                     (the agent would start the unit and never the command)",
                    self.node.systemd_unit
                ),
            ));
        }
        Ok(())
    }
}

/// `p` does not lie below `link` (`base_dir/artemis`): that directory becomes the link to `p`,
/// and `link` would find it holding `p`, or a migration would copy `p` into itself.
pub(super) fn not_inside_link(p: &Path, link: &Path) -> Result<(), String> {
    if p != link && p.starts_with(link) {
        Err(format!(
            "= {p:?} is inside base_dir/artemis ({}), which becomes the link to it: choose a \
             path outside it",
            link.display()
        ))
    } else {
        Ok(())
    }
}

/// `p` is not `base_dir` nor a directory above it. A mount there hides the node's own files
/// (and `base_dir/artemis`, which becomes a link on the mount); a replicated `data_dir` there
/// is made an exact copy of the hot side's, so the cold side would remove the node's files
/// from under it. `what` says which of the two `p` is.
pub(super) fn not_over_base_dir(p: &Path, base_dir: &Path, what: &str) -> Result<(), String> {
    if base_dir.starts_with(p) {
        Err(format!(
            "= {p:?} is base_dir ({}) or a directory above it: {what}; choose a path outside \
             base_dir",
            base_dir.display()
        ))
    } else {
        Ok(())
    }
}

/// `p` is set and absolute; `key` names it in the reason.
pub(super) fn absolute(key: &str, p: &Path) -> Result<(), String> {
    if p.as_os_str().is_empty() {
        Err("is required".into())
    } else if !p.is_absolute() {
        Err(format!("= {p:?} must be an absolute path ({key} is resolved by systemd at boot, with no working directory)"))
    } else {
        Ok(())
    }
}

/// Why a mount point may not be `base_dir` or above it ([`not_over_base_dir`]).
pub(super) const MOUNT_HIDES: &str = "a mount there hides the node's own files";

/// Options the fstab line gets from other config keys, so `[storage] options` may not set them.
const RESERVED_OPTIONS: &[&str] = &[
    "backend",
    "mount_attempts",
    "mount_retry_max_ms",
    "_netdev",
    "nofail",
    "credentials",
    // mount.cifs' other name for `credentials`
    "cred",
];

/// Options an operator may not set, whatever the backend: ones that break locking or would put a
/// secret on a command line.
pub fn check_user_options(backend: Backend, opts: &MountOptions) -> Result<(), String> {
    for secret in mount_options::SECRET_OPTIONS {
        if opts.contains(secret) {
            return Err(format!(
                "`{secret}=` would show the password to every user through ps and \
                 /proc/*/cmdline; put it in a credentials file (`credentials_file`)"
            ));
        }
    }
    // mount.cifs reads what follows a `%` in the user name as its password
    let smb = backend
        .fs_type()
        .is_some_and(|t| t == "cifs" || t == "smb3");
    for user in ["username", "user"] {
        if smb && opts.value(user).is_some_and(|v| v.contains('%')) {
            return Err(format!(
                "`{user}=` with a `%`: mount.cifs reads what follows it as the password, which \
                 would show to every user through ps and /proc/*/cmdline; put it in a \
                 credentials file (`credentials_file`)"
            ));
        }
    }
    if let Some(fs_type) = backend.fs_type() {
        if let Some(h) = mount_options::lock_hazard(fs_type, opts) {
            return Err(format!("`{}`: {}; {}", h.option, h.effect, h.fix));
        }
    }
    Ok(())
}

/// A secret file (key, PSK) must be a regular file that neither group nor others can read.
pub fn check_private_file(path: &Path) -> Result<(), String> {
    absolute("", path)?;
    let meta = std::fs::metadata(path).map_err(|e| format!("= {path:?}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("= {path:?} is not a regular file"));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "= {path:?} has mode {mode:04o}: others can read the secret; fix with `chmod 600 {}`",
            path.display()
        ));
    }
    Ok(())
}

/// A credentials file must exist, be a regular file owned by root, and be readable by nobody else.
pub fn check_credentials_file(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("= {path:?}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("= {path:?} is not a regular file"));
    }
    if meta.uid() != 0 {
        return Err(format!(
            "= {path:?} is owned by uid {}, not root: fix with `chown root:root {}`",
            meta.uid(),
            path.display()
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "= {path:?} has mode {mode:04o}: other users can read the password; fix with `chmod 600 {}`",
            path.display()
        ));
    }
    Ok(())
}
