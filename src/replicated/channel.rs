//! Authenticating the replication peer before anything about files crosses the wire.
//!
//! TLS mode (the default once certificates are configured): mutual TLS with rustls. Each side
//! presents a certificate signed by the pair's own CA (`artemis-sync certs init`) and accepts
//! only a peer whose certificate that CA signed; both certificates carry the name
//! [`TLS_NAME`], which is what the connecting side checks, so the pair's private CA, not DNS
//! or IP addresses, is the trust anchor. TLS also encrypts.
//!
//! PSK mode: a challenge-response on fresh nonces from both sides proves that each side knows
//! the key (without sending it), then every frame in both directions carries a MAC under a
//! session key derived from the key and the nonces (see [`crate::replicated::wire`]). Frames are
//! authenticated, not encrypted: the journal crosses the wire in clear, which the operator
//! accepts by choosing PSK over TLS.
//!
//! Insecure mode runs the same exchange with no key and no MACs; configuration allows it
//! only between loopback addresses.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::replicated::wire::{
    mac_eq, nonce, Frame, FrameMac, FrameReader, FrameWriter, ProtoError, Psk, VERSION,
};

/// How long the handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The name every certificate of a pair carries and every client checks.
pub const TLS_NAME: &str = "artemis-sync";
/// TCP keepalive on every replication connection: after this many seconds without traffic
/// the kernel probes the peer host,
const KEEPALIVE_IDLE_SECS: libc::c_int = 5;
/// every this many seconds,
const KEEPALIVE_INTERVAL_SECS: libc::c_int = 1;
/// and gives the connection up after this many probes go unanswered. A side that waits
/// without sending (the hot side reading the cold side's index, which may be long and
/// silent) thus notices a peer host that is gone (powered off, rebooted, cut off) within
/// about 10 s, instead of never: no data of its own is in flight for TCP to time out.
const KEEPALIVE_PROBES: libc::c_int = 5;

/// The read half of a connection, TLS or not.
pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a connection, TLS or not.
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Errors loading TLS material, naming the file.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum TlsError {
    /// TLS file {path:?}: {reason}
    File { path: PathBuf, reason: String },
    /// TLS configuration: {0}
    Config(String),
    /// TLS certificate {cert:?} and key {key:?} do not go together: {reason}
    Pair {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// Mutual-TLS configurations for both directions.
#[derive(Debug)]
pub struct TlsPair {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

impl TlsPair {
    /// Loads this host's certificate chain and key and the pair's CA (PEM files).
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<TlsPair, TlsError> {
        let file_err = |path: &Path, e: &dyn std::fmt::Display| TlsError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| file_err(cert, &e))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_err(cert, &e))?;
        if certs.is_empty() {
            return Err(file_err(cert, &"holds no certificate"));
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, &e))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(|e| file_err(ca, &e))? {
            roots
                .add(c.map_err(|e| file_err(ca, &e))?)
                .map_err(|e| file_err(ca, &e))?;
        }
        if roots.is_empty() {
            return Err(file_err(ca, &"holds no certificate"));
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
        let pair = |e: rustls::Error| TlsError::Pair {
            cert: cert.to_owned(),
            key: key.to_owned(),
            reason: e.to_string(),
        };
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(cfg)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(certs.clone(), key_der.clone_key())
            .map_err(pair)?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(cfg)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key_der)
            .map_err(pair)?;
        Ok(TlsPair {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

/// How a connection is authenticated.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Mutual TLS with the pair's CA.
    Tls(Arc<TlsPair>),
    /// A pre-shared key; every frame carries a MAC.
    Psk(Psk),
    /// Nothing (loopback only).
    Insecure,
}

/// Sets `SO_KEEPALIVE` and its timing ([`KEEPALIVE_IDLE_SECS`], [`KEEPALIVE_INTERVAL_SECS`],
/// [`KEEPALIVE_PROBES`]) on `tcp`.
fn keep_alive(tcp: &TcpStream) -> std::io::Result<()> {
    set_options(
        tcp,
        &[
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_SECS),
            (
                libc::IPPROTO_TCP,
                libc::TCP_KEEPINTVL,
                KEEPALIVE_INTERVAL_SECS,
            ),
            (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES),
        ],
    )
}

/// Sets `TCP_USER_TIMEOUT` on `tcp` (tcp(7)): data the peer leaves unacknowledged, or that
/// its shut receive window leaves unsent, for `limit` ends the connection, so a write to a
/// peer that stopped reading (a frozen agent, a paused VM) does not wait for ever.
pub(crate) fn set_user_timeout(tcp: &TcpStream, limit: Duration) -> std::io::Result<()> {
    let ms = libc::c_int::try_from(limit.as_millis()).unwrap_or(libc::c_int::MAX);
    set_options(tcp, &[(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)])
}

/// Sets each `(level, name, value)` socket option of C int value on `tcp`.
fn set_options(
    tcp: &TcpStream,
    options: &[(libc::c_int, libc::c_int, libc::c_int)],
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = tcp.as_raw_fd();
    let len = libc::socklen_t::try_from(size_of::<libc::c_int>())
        .expect("the size of a C int fits a socklen_t");
    for &(level, name, value) in options {
        // SAFETY: `fd` is open while `tcp` is borrowed; the option's value is a c_int that
        // lives through the call, and its size is passed with it.
        let rc =
            unsafe { libc::setsockopt(fd, level, name, std::ptr::from_ref(&value).cast(), len) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Prepares a replication connection, either way: no Nagle delay, and keepalives.
fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    if let Err(e) = keep_alive(tcp) {
        let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::warn!(%peer, "cannot set TCP keepalive on the replication connection (a peer host that is gone may go unnoticed): {e}");
    }
}

fn boxed<S: AsyncRead + AsyncWrite + Send + 'static>(s: S) -> (BoxRead, BoxWrite) {
    let (r, w) = tokio::io::split(s);
    (Box::new(r), Box::new(w))
}

/// Wraps an outgoing connection (TLS handshake in TLS mode) and splits it.
pub async fn wrap_connect(auth: &Auth, tcp: TcpStream) -> Result<(BoxRead, BoxWrite), ProtoError> {
    tune(&tcp);
    match auth {
        Auth::Tls(pair) => {
            let name = ServerName::try_from(TLS_NAME).expect("a valid DNS name");
            let connector = tokio_rustls::TlsConnector::from(pair.client.clone());
            let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
                .await
                .map_err(|_| ProtoError::Unexpected("the TLS handshake timed out".into()))?
                .map_err(|e| ProtoError::Unexpected(format!("TLS: {e}")))?;
            Ok(boxed(tls))
        }
        _ => {
            let (r, w) = tcp.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

/// Wraps an incoming connection (TLS handshake in TLS mode) and splits it.
pub async fn wrap_accept(auth: &Auth, tcp: TcpStream) -> Result<(BoxRead, BoxWrite), ProtoError> {
    tune(&tcp);
    match auth {
        Auth::Tls(pair) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(pair.server.clone());
            let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                .await
                .map_err(|_| ProtoError::Unexpected("the TLS handshake timed out".into()))?
                .map_err(|e| ProtoError::Unexpected(format!("TLS: {e}")))?;
            Ok(boxed(tls))
        }
        _ => {
            let (r, w) = tcp.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

/// The connecting side's half of the handshake.
pub async fn connect<R, W>(
    auth: &Auth,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
) -> Result<(), ProtoError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mine = nonce()?;
        writer
            .send(&Frame::Hello {
                version: VERSION,
                nonce: mine,
            })
            .await?;
        writer.flush().await?;
        let (theirs, proof) = match reader.recv().await? {
            Frame::Challenge { nonce, mac } => (nonce, mac),
            Frame::Reject { reason, .. } => {
                return Err(ProtoError::Unexpected(format!("refused: {reason}")))
            }
            other => {
                return Err(ProtoError::Unexpected(format!(
                    "{other:?} instead of Challenge"
                )))
            }
        };
        match auth {
            Auth::Psk(psk) => {
                if !mac_eq(&psk.server_proof(&mine, &theirs), &proof) {
                    return Err(ProtoError::AuthFailed);
                }
                writer
                    .send(&Frame::Proof {
                        mac: psk.client_proof(&mine, &theirs),
                    })
                    .await?;
                writer.flush().await?;
                let session = psk.session(&mine, &theirs);
                writer.set_mac(FrameMac::new(session, 0));
                reader.set_mac(FrameMac::new(session, 1));
            }
            Auth::Insecure | Auth::Tls(_) => {
                writer.send(&Frame::Proof { mac: [0; 32] }).await?;
                writer.flush().await?;
            }
        }
        reader.authenticated();
        Ok(())
    })
    .await
    .map_err(|_| ProtoError::Unexpected("the handshake timed out".into()))?
}

/// The accepting side's half of the handshake.
pub async fn accept<R, W>(
    auth: &Auth,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
) -> Result<(), ProtoError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let theirs = match reader.recv().await? {
            Frame::Hello { version, nonce } if version == VERSION => nonce,
            Frame::Hello { version, .. } => {
                return Err(ProtoError::Unexpected(format!(
                    "protocol version {version}, we speak {VERSION}"
                )))
            }
            other => {
                return Err(ProtoError::Unexpected(format!(
                    "{other:?} instead of Hello"
                )))
            }
        };
        let mine = nonce()?;
        let mac = match auth {
            Auth::Psk(psk) => psk.server_proof(&theirs, &mine),
            Auth::Insecure | Auth::Tls(_) => [0; 32],
        };
        writer.send(&Frame::Challenge { nonce: mine, mac }).await?;
        writer.flush().await?;
        let proof = match reader.recv().await? {
            Frame::Proof { mac } => mac,
            other => {
                return Err(ProtoError::Unexpected(format!(
                    "{other:?} instead of Proof"
                )))
            }
        };
        if let Auth::Psk(psk) = auth {
            if !mac_eq(&psk.client_proof(&theirs, &mine), &proof) {
                return Err(ProtoError::AuthFailed);
            }
            let session = psk.session(&theirs, &mine);
            writer.set_mac(FrameMac::new(session, 1));
            reader.set_mac(FrameMac::new(session, 0));
        }
        reader.authenticated();
        Ok(())
    })
    .await
    .map_err(|_| ProtoError::Unexpected("the handshake timed out".into()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicated::wire::HotState;

    async fn pair(client: Auth, server: Auth) -> (Result<(), ProtoError>, Result<(), ProtoError>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let c = tokio::spawn(async move {
            let (mut r, mut w) = (FrameReader::new(ar), FrameWriter::new(aw));
            let res = connect(&client, &mut r, &mut w).await;
            if res.is_ok() {
                w.send(&Frame::Heartbeat(HotState::default()))
                    .await
                    .unwrap();
                w.flush().await.unwrap();
            }
            res
        });
        let s = tokio::spawn(async move {
            let (mut r, mut w) = (FrameReader::new(br), FrameWriter::new(bw));
            accept(&server, &mut r, &mut w).await?;
            // the first MAC'd frame must verify
            match r.recv().await? {
                Frame::Heartbeat(_) => Ok(()),
                other => Err(ProtoError::Unexpected(format!("{other:?}"))),
            }
        });
        (c.await.unwrap(), s.await.unwrap())
    }

    #[tokio::test]
    async fn same_key_authenticates_and_macs_verify() {
        let k = Psk::from_hex(&"11".repeat(32)).unwrap();
        let (c, s) = pair(Auth::Psk(k.clone()), Auth::Psk(k)).await;
        c.unwrap();
        s.unwrap();
    }

    #[tokio::test]
    async fn a_wrong_key_is_refused_by_both_sides() {
        let (c, _s) = pair(
            Auth::Psk(Psk::from_hex(&"11".repeat(32)).unwrap()),
            Auth::Psk(Psk::from_hex(&"22".repeat(32)).unwrap()),
        )
        .await;
        assert!(matches!(c, Err(ProtoError::AuthFailed)), "{c:?}");
        // a client without the key cannot pass the server either
        let (_c, s) = pair(
            Auth::Insecure,
            Auth::Psk(Psk::from_hex(&"22".repeat(32)).unwrap()),
        )
        .await;
        assert!(s.is_err(), "{s:?}");
    }
}
