//! The database lease's connection string: read from `[lease] dsn_file` (root-owned, mode
//! 0600, checked on load), in libpq's `key=value` form. It holds the password, so it never
//! appears on a command line or in a log: [`Dsn`]'s `Debug` and every error show it with the
//! password replaced by `***`.
//!
//! TLS follows the DSN's `sslmode`: `disable` (plaintext), or `require` / `verify-full`, both
//! of which encrypt with rustls and check the server's certificate against `sslrootcert` and
//! its name against `host`. libpq's `require` does not verify the server; here it does,
//! because a lease answered by a man in the middle could run two nodes. `prefer`, `allow` and
//! `verify-ca` are refused rather than silently weaker.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// The longest DSN file read, in bytes.
const DSN_MAX_BYTES: u64 = 8 * 1024;
/// What a password is shown as.
const HIDDEN: &str = "***";

/// Errors reading the DSN file or building its TLS set-up. None carries the password.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum DsnError {
    /// cannot read DSN file {path:?}: {source}
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// DSN file {path:?}: {reason}
    Invalid { path: PathBuf, reason: String },
}

/// How the connection is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// `sslmode=disable`: plaintext.
    Disable,
    /// `sslmode=require` or `verify-full`: TLS, the server checked against this CA file.
    Verify(PathBuf),
}

/// A parsed DSN: the client's config (password inside), the TLS mode, and a redacted text.
pub struct Dsn {
    /// What tokio-postgres connects with.
    pub config: tokio_postgres::Config,
    /// How the connection is protected.
    pub tls: TlsMode,
    /// The DSN with its password hidden, for messages.
    pub shown: String,
}

impl std::fmt::Debug for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dsn")
            .field("dsn", &self.shown)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Splits a libpq `key=value` string into pairs: spaces around `=` allowed, values in single
/// quotes with `\'` and `\\` escapes.
fn pairs(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    // each round consumes at least one character or ends
    for _ in 0..=text.len() {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && !c.is_whitespace())).collect();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') || key.is_empty() {
            // the text is not quoted: it may hold a password
            return Err("expected `key=value` pairs (libpq's form; URIs are not read here)".into());
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(format!("the value of `{key}` has no closing quote")),
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            value.extend(std::iter::from_fn(|| chars.next_if(|c| !c.is_whitespace())));
        }
        out.push((key, value));
    }
    Ok(out)
}

/// The DSN `text` with every password value replaced by `***`.
pub fn redact(text: &str) -> String {
    match pairs(text) {
        Ok(p) => p
            .iter()
            .map(|(k, v)| {
                let v = if k == "password" { HIDDEN } else { v.as_str() };
                format!("{k}={v}")
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => "(unparsable DSN, not shown)".into(),
    }
}

/// Parses a DSN; `path` names it in errors.
pub fn parse(path: &Path, text: &str) -> Result<Dsn, DsnError> {
    let invalid = |reason: String| DsnError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let mut kept = Vec::new();
    let (mut sslmode, mut root) = (String::from("disable"), None);
    let mut password = None;
    for (k, v) in pairs(text).map_err(invalid)? {
        match k.as_str() {
            "sslmode" => sslmode = v,
            "sslrootcert" => root = Some(PathBuf::from(v)),
            "password" => password = Some(v),
            _ => kept.push((k, v)),
        }
    }
    let tls = match (sslmode.as_str(), root) {
        ("disable", _) => TlsMode::Disable,
        ("require" | "verify-full", Some(r)) => TlsMode::Verify(r),
        ("require" | "verify-full", None) => {
            return Err(invalid(format!(
                "sslmode={sslmode} needs sslrootcert=<the database's CA file>: the server is \
                 always verified"
            )))
        }
        (other, _) => {
            return Err(invalid(format!(
                "sslmode={other} is not supported: use disable, require or verify-full"
            )))
        }
    };
    let quoted = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut rebuilt: Vec<String> = kept
        .iter()
        .map(|(k, v)| format!("{k}={}", quoted(v)))
        .collect();
    rebuilt.push(format!(
        "sslmode={}",
        if tls == TlsMode::Disable {
            "disable"
        } else {
            "require"
        }
    ));
    let mut config: tokio_postgres::Config = rebuilt
        .join(" ")
        .parse()
        .map_err(|e: tokio_postgres::Error| invalid(format!("{e}")))?;
    if let Some(p) = password {
        config.password(p);
    }
    Ok(Dsn {
        config,
        tls,
        shown: redact(text),
    })
}

/// Reads and parses the DSN file at `path`.
pub fn load(path: &Path) -> Result<Dsn, DsnError> {
    let read = |source| DsnError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, DSN_MAX_BYTES), &mut text)
        .map_err(read)?;
    parse(path, text.trim())
}

/// The rustls client config for [`TlsMode::Verify`]: the CA file's certificates as roots.
pub fn tls_config(ca: &Path) -> Result<rustls::ClientConfig, DsnError> {
    let invalid = |reason: String| DsnError::Invalid {
        path: ca.to_owned(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca).map_err(|e| invalid(format!("sslrootcert: {e}")))?
    {
        let cert = cert.map_err(|e| invalid(format!("sslrootcert: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| invalid(format!("sslrootcert: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_never_shown() {
        let text = "host=db.example port=5432 user=corda password='s3 cr\\'et' dbname=corda";
        let dsn = parse(Path::new("/etc/x.dsn"), text).unwrap();
        let shown = format!("{dsn:?}");
        assert!(
            !shown.contains("s3") && shown.contains("password=***"),
            "{shown}"
        );
        assert_eq!(dsn.config.get_password(), Some(&b"s3 cr'et"[..]));
        assert_eq!(dsn.config.get_user(), Some("corda"));
        assert_eq!(dsn.tls, TlsMode::Disable);
        // an error about another key does not quote the password either
        let err = parse(Path::new("/etc/x.dsn"), "password=hunter2 port=notaport")
            .unwrap_err()
            .to_string();
        assert!(
            !err.contains("hunter2") && err.contains("/etc/x.dsn"),
            "{err}"
        );
    }

    #[test]
    fn tls_modes() {
        let p = Path::new("/etc/x.dsn");
        let d = parse(p, "host=h sslmode=verify-full sslrootcert=/etc/ca.pem").unwrap();
        assert_eq!(d.tls, TlsMode::Verify(PathBuf::from("/etc/ca.pem")));
        let err = parse(p, "host=h sslmode=require").unwrap_err().to_string();
        assert!(err.contains("sslrootcert"), "{err}");
        let err = parse(p, "host=h sslmode=prefer").unwrap_err().to_string();
        assert!(err.contains("not supported"), "{err}");
        let err = parse(p, "postgresql://u:pw@h/db").unwrap_err().to_string();
        assert!(err.contains("key=value") && !err.contains("pw@"), "{err}");
    }
}
