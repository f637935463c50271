//! `artemis-sync certs init`: a private CA and a certificate per host for a new pair, for
//! mutual TLS. Every host certificate carries the name `artemis-sync` (what peers check) and
//! the host's own name. Keys are written with mode 0600; nothing is overwritten.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::replicated::channel::TLS_NAME;

/// Errors making certificates, naming the file.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum CertsError {
    /// {path:?} already exists; certs init never overwrites (remove it, or choose another --dir)
    Exists { path: PathBuf },
    /// cannot write {path:?}: {source}
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// host name {0:?} must be non-empty letters, digits, `-` and `.`
    BadHost(String),
    /// certificate generation: {0}
    Generate(String),
}

/// Files written by [`init`].
#[derive(Debug)]
pub struct Written {
    /// `ca.pem`: goes to both hosts as `tls_ca`.
    pub ca_cert: PathBuf,
    /// `ca.key`: keep it offline; it is only needed to make more certificates.
    pub ca_key: PathBuf,
    /// `(host, cert, key)` for each host.
    pub hosts: Vec<(String, PathBuf, PathBuf)>,
}

fn write_new(path: &Path, data: &str, mode: u32) -> Result<(), CertsError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                CertsError::Exists {
                    path: path.to_owned(),
                }
            } else {
                CertsError::Write {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
    f.write_all(data.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|source| CertsError::Write {
            path: path.to_owned(),
            source,
        })
}

/// Makes `ca.pem`, `ca.key` and `<host>.pem`, `<host>.key` for each host in `dir`.
pub fn init(dir: &Path, hosts: &[String]) -> Result<Written, CertsError> {
    for h in hosts {
        if h.is_empty()
            || !h
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(CertsError::BadHost(h.clone()));
        }
    }
    let gen = |e: rcgen::Error| CertsError::Generate(e.to_string());
    std::fs::create_dir_all(dir).map_err(|source| CertsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let planned: Vec<PathBuf> = ["ca.pem", "ca.key"]
        .iter()
        .map(|n| dir.join(n))
        .chain(
            hosts
                .iter()
                .flat_map(|h| [dir.join(format!("{h}.pem")), dir.join(format!("{h}.key"))]),
        )
        .collect();
    if let Some(p) = planned.iter().find(|p| p.exists()) {
        return Err(CertsError::Exists { path: p.clone() });
    }
    let ca_key = KeyPair::generate().map_err(gen)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "artemis-sync pair CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).map_err(gen)?;
    let written = Written {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        hosts: Vec::new(),
    };
    write_new(&written.ca_cert, &ca.pem(), 0o644)?;
    write_new(&written.ca_key, &ca_key.serialize_pem(), 0o600)?;
    let mut written = written;
    for h in hosts {
        let key = KeyPair::generate().map_err(gen)?;
        let mut params =
            CertificateParams::new(vec![TLS_NAME.to_owned(), h.clone()]).map_err(gen)?;
        params
            .distinguished_name
            .push(DnType::CommonName, h.as_str());
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &ca, &ca_key).map_err(gen)?;
        let (c, k) = (dir.join(format!("{h}.pem")), dir.join(format!("{h}.key")));
        write_new(&c, &cert.pem(), 0o644)?;
        write_new(&k, &key.serialize_pem(), 0o600)?;
        written.hosts.push((h.clone(), c, k));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn makes_a_pair_that_loads_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let w = init(dir.path(), &["vm1".into(), "vm2".into()]).unwrap();
        assert_eq!(w.hosts.len(), 2);
        let mode = std::fs::metadata(&w.hosts[0].2)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        crate::replicated::channel::TlsPair::load(&w.hosts[0].1, &w.hosts[0].2, &w.ca_cert)
            .unwrap();
        let err = init(dir.path(), &["vm1".into()]).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert!(matches!(
            init(dir.path(), &["bad name".into()]),
            Err(CertsError::BadHost(_))
        ));
    }

    /// A key that is not the certificate's (vm1's certificate, vm2's key: a copy slip) is
    /// refused naming both files, not as a bare "TLS configuration" error.
    #[test]
    fn a_key_that_does_not_match_its_certificate_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let w = init(dir.path(), &["vm1".into(), "vm2".into()]).unwrap();
        let (cert, key) = (&w.hosts[0].1, &w.hosts[1].2);
        let err = crate::replicated::channel::TlsPair::load(cert, key, &w.ca_cert)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&cert.display().to_string()) && err.contains(&key.display().to_string()),
            "{err}"
        );
    }
}
