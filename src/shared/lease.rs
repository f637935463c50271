//! The lease record `<lock dir>/lease.json`: who holds the share, under which epoch (the
//! fencing token, +1 on every takeover), and how many times it has renewed. The holder
//! rewrites it atomically on every renewal (temporary file, fsync, rename, fsync of the
//! directory). A contender never compares clocks with the holder: it watches the record and
//! calls it stale only when it has not changed for `wait_interval_ms` of its own monotonic
//! clock. A record that cannot be read or fails its checksum is an error, never a reason to
//! take over.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// The lease file's name inside the lock directory.
pub const LEASE_FILE: &str = "lease.json";
/// The lock file's name inside the lock directory.
pub const LOCK_FILE: &str = "lock";
/// The longest lease file read; a real one is about 250 bytes.
pub const LEASE_MAX_BYTES: u64 = 64 * 1024;

/// Errors reading or writing the lease.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum LeaseError {
    /// cannot read lease {path:?}: {source}
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// lease {path:?} is corrupt ({reason}); no takeover will be based on it. If no node runs on either VM, move the file away and the agents start over after wait_interval_ms
    Corrupt { path: PathBuf, reason: String },
    /// cannot write lease {path:?}: {source}
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub use crate::lease::{Lease, LeaseState, LEASE_VERSION};

impl Lease {
    fn checksum(&self) -> String {
        let body = format!(
            "{}\n{}\n{}\n{}\n{:?}\n{}\n{}",
            self.version,
            self.holder,
            self.epoch,
            self.renewals,
            self.state,
            self.update_interval_ms,
            self.wait_interval_ms
        );
        blake3::hash(body.as_bytes()).to_hex()[..32].to_owned()
    }

    /// The record as written: JSON with its checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut sealed = self.clone();
        sealed.check = self.checksum();
        let mut out = serde_json::to_vec_pretty(&sealed).expect("a lease always serializes");
        out.push(b'\n');
        out
    }

    /// Parses and checks a record; the error says what is wrong with it.
    pub fn decode(bytes: &[u8]) -> Result<Lease, String> {
        if bytes.is_empty() {
            return Err("the file is empty".into());
        }
        let lease: Lease = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if lease.version != LEASE_VERSION {
            return Err(format!("version {} is not {LEASE_VERSION}", lease.version));
        }
        if lease.holder.is_empty() {
            return Err("no holder".into());
        }
        if lease.check != lease.checksum() {
            return Err(format!(
                "checksum {:?} does not match the fields",
                lease.check
            ));
        }
        Ok(Lease {
            check: String::new(),
            ..lease
        })
    }
}

/// Where the lease of a config lives: `<lock dir>/lease.json`.
pub fn path(config: &crate::config::Config) -> PathBuf {
    config.lock.dir.join(LEASE_FILE)
}

/// Reads the lease at `path`: `Ok(None)` when there is none.
pub fn read(path: &Path) -> Result<Option<Lease>, LeaseError> {
    let unreadable = |source| LeaseError::Unreadable {
        path: path.to_owned(),
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unreadable(e)),
    };
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(file, LEASE_MAX_BYTES + 1), &mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > LEASE_MAX_BYTES {
        return Err(LeaseError::Corrupt {
            path: path.to_owned(),
            reason: format!("longer than {LEASE_MAX_BYTES} bytes"),
        });
    }
    Lease::decode(&bytes)
        .map(Some)
        .map_err(|reason| LeaseError::Corrupt {
            path: path.to_owned(),
            reason,
        })
}

/// Replaces the lease at `path` atomically: a temporary file beside it, fsynced, renamed over
/// it, and the directory fsynced, so a reader sees the old record or the new, never a mix.
pub fn write(path: &Path, lease: &Lease) -> Result<(), LeaseError> {
    crate::sys::write_atomic(path, &lease.encode()).map_err(|source| LeaseError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn round_trips_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEASE_FILE);
        assert_eq!(read(&path).unwrap(), None);
        let mut lease = Lease::new("vm1:/opt/corda", 7, 20_000, 40_000);
        lease.renewals = 3;
        write(&path, &lease).unwrap();
        assert_eq!(read(&path).unwrap(), Some(lease.clone()));
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );

        // a changed digit without a new checksum is caught
        let text = String::from_utf8(lease.encode())
            .unwrap()
            .replace("\"epoch\": 7", "\"epoch\": 9");
        fs::write(&path, text).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(
            err.contains("checksum") && err.contains("no takeover"),
            "{err}"
        );
    }

    #[test]
    fn truncated_garbage_empty_and_unreadable_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEASE_FILE);
        let full = Lease::new("vm1:/opt/corda", 1, 200, 1000).encode();
        for (what, bytes) in [
            ("truncated", &full[..full.len() / 2]),
            ("garbage", &b"\x00\xffnot json"[..]),
            ("empty", &b""[..]),
        ] {
            fs::write(&path, bytes).unwrap();
            let err = read(&path).unwrap_err();
            assert!(matches!(err, LeaseError::Corrupt { .. }), "{what}: {err}");
            assert!(
                err.to_string().contains(&*path.to_string_lossy()),
                "{what}: {err}"
            );
        }
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        assert!(matches!(
            read(&path).unwrap_err(),
            LeaseError::Unreadable { .. }
        ));
    }
}
