//! `[lease]`: where the pair keeps its lease. `backend = "share"` is today's lock and lease
//! file on the share (shared mode's default); `backend = "postgres"` is a row in a table of a
//! PostgreSQL database both VMs already reach (the Corda node's own database), keyed by
//! `pair`, reached through the libpq connection string in `dsn_file`. The timing stays in
//! `[lock]`. The checks of these keys run once on load.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::validate::{absolute, check_credentials_file, invalid_in};
use crate::config::{Config, ConfigError, Mode};

/// The table's name when `[lease] table` is not set.
pub const DEFAULT_LEASE_TABLE: &str = "artemis_sync_lease";
/// PostgreSQL's longest identifier, in bytes (NAMEDATALEN - 1).
const MAX_IDENTIFIER_BYTES: usize = 63;
/// The longest `pair`, in bytes.
const MAX_PAIR_BYTES: usize = 200;

/// Where the lease lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseBackend {
    /// The lock and lease files on the share (shared mode only).
    #[default]
    Share,
    /// A row in a PostgreSQL table, judged by the database's clock.
    Postgres,
}

/// `[lease]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseConfig {
    /// `share` or `postgres`.
    #[serde(default)]
    pub backend: LeaseBackend,
    /// postgres: a file holding the libpq connection string (root-owned, mode 0600: it holds
    /// the password).
    #[serde(default)]
    pub dsn_file: PathBuf,
    /// postgres: the table (`name` or `schema.name`), created by `artemis-sync lease init`.
    #[serde(default = "default_table")]
    pub table: String,
    /// postgres: the row's key, one per hot/cold pair.
    #[serde(default)]
    pub pair: String,
    /// Replicated mode, async acks: the cold VM takes the lease by itself only if the hot's
    /// last report had its copy at most this far behind, in ms (0: only fully caught up). With
    /// durable acks it takes over only in sync (RPO 0), whatever this says.
    #[serde(default)]
    pub max_failover_lag_ms: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            backend: LeaseBackend::Share,
            dsn_file: PathBuf::new(),
            table: default_table(),
            pair: String::new(),
            max_failover_lag_ms: 0,
        }
    }
}

fn default_table() -> String {
    DEFAULT_LEASE_TABLE.to_owned()
}

/// `name` or `schema.name`, each part a plain lower-case SQL identifier, so the table can be
/// written into a statement without quoting.
pub fn check_table_name(table: &str) -> Result<(), String> {
    let parts: Vec<&str> = table.split('.').collect();
    if parts.len() > 2 {
        return Err(format!(
            "= {table:?} has more than one dot (use `name` or `schema.name`)"
        ));
    }
    for part in parts {
        let mut chars = part.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !first_ok || !rest_ok || part.len() > MAX_IDENTIFIER_BYTES {
            return Err(format!(
                "= {table:?}: {part:?} is not a plain identifier (a lower-case letter or `_`, then \
                 lower-case letters, digits or `_`, at most {MAX_IDENTIFIER_BYTES} bytes)"
            ));
        }
    }
    Ok(())
}

impl Config {
    /// `[lease]`: the share backend only in shared mode; the postgres backend with a private
    /// root-owned DSN file, a plain table name and a pair.
    pub(super) fn validate_lease(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = invalid_in(path);
        let Some(l) = &self.lease else {
            return Ok(());
        };
        match l.backend {
            LeaseBackend::Share => {
                if self.storage.mode == Mode::Replicated {
                    return Err(invalid(
                        "lease.backend",
                        "= \"share\" needs a share (mode = \"shared\"); replicated mode leases \
                         with backend = \"postgres\", or without [lease] fails over by hand"
                            .into(),
                    ));
                }
                if !l.dsn_file.as_os_str().is_empty() || !l.pair.is_empty() {
                    return Err(invalid(
                        "lease.dsn_file",
                        "and `pair` are only used with backend = \"postgres\"".into(),
                    ));
                }
                // (each a setting the share backend would ignore without a word)
                if l.table != DEFAULT_LEASE_TABLE {
                    return Err(invalid(
                        "lease.table",
                        "is only used with backend = \"postgres\"".into(),
                    ));
                }
                if l.max_failover_lag_ms != 0 {
                    return Err(invalid(
                        "lease.max_failover_lag_ms",
                        "is only used with backend = \"postgres\" in replicated mode (a share \
                         has no lag)"
                            .into(),
                    ));
                }
                Ok(())
            }
            LeaseBackend::Postgres
                if self.storage.mode == Mode::Shared && l.max_failover_lag_ms != 0 =>
            {
                Err(invalid(
                    "lease.max_failover_lag_ms",
                    "is only used in replicated mode (a share has no lag)".into(),
                ))
            }
            LeaseBackend::Postgres => {
                absolute("lease.dsn_file", &l.dsn_file)
                    .map_err(|r| invalid("lease.dsn_file", r))?;
                check_credentials_file(&l.dsn_file).map_err(|r| invalid("lease.dsn_file", r))?;
                check_table_name(&l.table).map_err(|r| invalid("lease.table", r))?;
                if l.pair.is_empty() || l.pair.len() > MAX_PAIR_BYTES {
                    return Err(invalid(
                        "lease.pair",
                        format!(
                            "= {:?} must name the hot/cold pair (1 to {MAX_PAIR_BYTES} bytes), \
                             the same on both VMs",
                            l.pair
                        ),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The lease backend in force: `[lease] backend`, or the share when there is no `[lease]`.
    pub fn lease_backend(&self) -> Option<LeaseBackend> {
        match (&self.lease, self.storage.mode) {
            (Some(l), _) => Some(l.backend),
            (None, Mode::Shared) => Some(LeaseBackend::Share),
            (None, Mode::Replicated) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("/etc/artemis-sync/agent.toml"), text)
    }

    fn shared(lease: &str) -> String {
        format!(
            "[node]\nbase_dir = \"/opt/corda\"\n[storage]\nbackend = \"efs\"\n\
             source = \"fs-0123abcd.efs.eu-west-1.amazonaws.com:/\"\n[lease]\n{lease}"
        )
    }

    fn dsn_file(mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease.dsn");
        std::fs::write(&path, "host=127.0.0.1 user=corda password=secret").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, path)
    }

    #[test]
    fn postgres_lease_loads_with_defaults() {
        let (_dir, dsn) = dsn_file(0o600);
        if !crate::sys::is_root() {
            eprintln!("skipped: postgres_lease_loads_with_defaults: the DSN file must be root's");
            return;
        }
        let c = load(&shared(&format!(
            "backend = \"postgres\"\ndsn_file = {dsn:?}\npair = \"corda-a\"\n"
        )))
        .unwrap();
        let l = c.lease.as_ref().unwrap();
        assert_eq!(l.table, DEFAULT_LEASE_TABLE);
        assert_eq!(c.lease_backend(), Some(LeaseBackend::Postgres));
        assert_eq!(load(&c.to_toml()).unwrap().to_toml(), c.to_toml());
    }

    #[test]
    fn dsn_file_readable_by_others_is_refused_by_name() {
        let (_dir, dsn) = dsn_file(0o644);
        let err = load(&shared(&format!(
            "backend = \"postgres\"\ndsn_file = {dsn:?}\npair = \"corda-a\"\n"
        )))
        .unwrap_err()
        .to_string();
        assert!(err.contains("lease.dsn_file"), "{err}");
        assert!(err.contains(&*dsn.to_string_lossy()), "{err}");
        let missing = load(&shared(
            "backend = \"postgres\"\ndsn_file = \"/nonexistent/lease.dsn\"\npair = \"a\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(missing.contains("/nonexistent/lease.dsn"), "{missing}");
    }

    #[test]
    fn bad_table_pair_and_backend_mixes_are_named() {
        let (_dir, dsn) = dsn_file(0o600);
        if !crate::sys::is_root() {
            eprintln!("skipped: bad_table_pair_and_backend_mixes_are_named: not root");
            return;
        }
        let pg = |rest: &str| {
            load(&shared(&format!(
                "backend = \"postgres\"\ndsn_file = {dsn:?}\n{rest}"
            )))
            .unwrap_err()
            .to_string()
        };
        let err = pg("pair = \"a\"\ntable = \"lease; drop table x\"\n");
        assert!(err.contains("lease.table"), "{err}");
        assert!(pg("pair = \"a\"\ntable = \"a.b.c\"\n").contains("more than one dot"));
        assert!(pg("").contains("lease.pair"));
        assert!(check_table_name("corda.artemis_sync_lease").is_ok());
        let err = load(&shared("backend = \"share\"\npair = \"a\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("only used with backend"), "{err}");
        // what the share backend does not use is refused, not ignored
        let err = load(&shared("backend = \"share\"\ntable = \"corda.lease\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`lease.table`"), "{err}");
        let err = load(&shared("backend = \"share\"\nmax_failover_lag_ms = 500\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`lease.max_failover_lag_ms`"), "{err}");
        load(&shared("backend = \"share\"\n")).unwrap();
        let err = load(&shared("backend = \"etcd\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("etcd"), "{err}");
    }
}
