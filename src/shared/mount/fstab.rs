//! The `/etc/fstab` line that makes mount(8) run the helper at boot, with the config's
//! retries and timeout carried as options, escaped as fstab(5) reads them.

use crate::config::mount_options::MountOptions;
use crate::config::{Backend, Config, DEFAULT_MOUNT_ATTEMPTS, DEFAULT_MOUNT_RETRY_MAX_MS};
use crate::shared::mount::{MountError, FSTAB_TYPE};

/// The `/etc/fstab` line that mounts the configured share at boot through the helper.
pub fn fstab_line(config: &Config) -> Result<String, MountError> {
    let s = &config.storage;
    if s.backend() == Backend::Premounted {
        return Err(MountError::Premounted {
            dir: s.mount_point.clone(),
        });
    }
    let mut opts = MountOptions::default();
    opts.push("backend", Some(s.backend().name()));
    opts.push("_netdev", None);
    opts.push("nofail", None);
    opts.push(
        "x-systemd.mount-timeout",
        Some(&s.mount_timeout_s.to_string()),
    );
    if s.mount_attempts != DEFAULT_MOUNT_ATTEMPTS {
        opts.push("mount_attempts", Some(&s.mount_attempts.to_string()));
    }
    if s.mount_retry_max_ms != DEFAULT_MOUNT_RETRY_MAX_MS {
        opts.push(
            "mount_retry_max_ms",
            Some(&s.mount_retry_max_ms.to_string()),
        );
    }
    if !s.credentials_file.as_os_str().is_empty() {
        opts.push("credentials", Some(&s.credentials_file.to_string_lossy()));
    }
    let opts = opts.overridden_by(&config.user_options());
    Ok(format!(
        "{} {} {} {} 0 0",
        fstab_escape(&s.source),
        fstab_escape(&s.mount_point.to_string_lossy()),
        FSTAB_TYPE,
        fstab_escape(&opts.to_string())
    ))
}

/// Escapes white space and `\` the way fstab(5) reads them.
fn fstab_escape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    for c in field.chars() {
        match c {
            ' ' => out.push_str("\\040"),
            '\t' => out.push_str("\\011"),
            '\n' => out.push_str("\\012"),
            '\\' => out.push_str("\\134"),
            c => out.push(c),
        }
    }
    out
}
