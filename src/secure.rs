//! Authenticating the replication peer before anything about files crosses the wire.
//!
//! PSK mode: a challenge-response on fresh nonces from both sides proves that each side knows
//! the key (without sending it), then every frame in both directions carries a MAC under a
//! session key derived from the key and the nonces (see [`crate::proto`]). Frames are
//! authenticated, not encrypted: the journal crosses the wire in clear, which the operator
//! accepts by choosing PSK over TLS.
//!
//! Insecure mode runs the same exchange with no key and no MACs; configuration allows it
//! only between loopback addresses.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::proto::{
    mac_eq, nonce, Frame, FrameMac, FrameReader, FrameWriter, ProtoError, Psk, VERSION,
};

/// How long the handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a connection is authenticated.
#[derive(Debug, Clone)]
pub enum Auth {
    /// A pre-shared key; every frame carries a MAC.
    Psk(Psk),
    /// Nothing (loopback only).
    Insecure,
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
            Auth::Insecure => {
                writer.send(&Frame::Proof { mac: [0; 32] }).await?;
                writer.flush().await?;
            }
        }
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
            Auth::Insecure => [0; 32],
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
        Ok(())
    })
    .await
    .map_err(|_| ProtoError::Unexpected("the handshake timed out".into()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(client: Auth, server: Auth) -> (Result<(), ProtoError>, Result<(), ProtoError>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let c = tokio::spawn(async move {
            let (mut r, mut w) = (FrameReader::new(ar), FrameWriter::new(aw));
            let res = connect(&client, &mut r, &mut w).await;
            if res.is_ok() {
                w.send(&Frame::Heartbeat).await.unwrap();
                w.flush().await.unwrap();
            }
            res
        });
        let s = tokio::spawn(async move {
            let (mut r, mut w) = (FrameReader::new(br), FrameWriter::new(bw));
            accept(&server, &mut r, &mut w).await?;
            // the first MAC'd frame must verify
            match r.recv().await? {
                Frame::Heartbeat => Ok(()),
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
