//! Pre-shared-key authentication: the key derived from the PSK file ([`Psk`]), the proofs both
//! sides exchange in the handshake, the session key, and the per-frame MAC of one direction
//! ([`FrameMac`]), keyed blake3 over the direction, a frame counter, the body's length and the
//! body (but a batch's page data, bound by its page hashes).

use std::io;

use crate::replicated::wire::{codec, MAC_BYTES};

/// The blake3 key-derivation context for the PSK.
const PSK_CONTEXT: &str = "artemis-sync 2026-11 replication psk v1";

/// A key from the PSK file's hex text.
#[derive(Clone)]
pub struct Psk([u8; 32]);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(..)")
    }
}

impl Psk {
    /// The key for the PSK file's text (see [`crate::config::psk_material`]).
    pub fn from_hex(text: &str) -> Result<Psk, String> {
        Ok(Psk(blake3::derive_key(
            PSK_CONTEXT,
            &crate::config::psk_material(text)?,
        )))
    }

    fn mac(&self, label: &[u8], a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(label);
        h.update(a);
        h.update(b);
        *h.finalize().as_bytes()
    }

    /// The acceptor's proof for the nonces.
    pub fn server_proof(&self, client: &[u8; 32], server: &[u8; 32]) -> [u8; 32] {
        self.mac(b"acceptor", client, server)
    }

    /// The connector's proof for the nonces.
    pub fn client_proof(&self, client: &[u8; 32], server: &[u8; 32]) -> [u8; 32] {
        self.mac(b"connector", client, server)
    }

    /// The session key for the nonces.
    pub fn session(&self, client: &[u8; 32], server: &[u8; 32]) -> [u8; 32] {
        self.mac(b"session", client, server)
    }
}

/// Compares two MACs without an early exit.
pub fn mac_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 random bytes from the kernel.
pub fn nonce() -> io::Result<[u8; 32]> {
    let mut n = [0u8; 32];
    io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut n)?;
    Ok(n)
}

/// The per-frame MAC state of one direction.
#[derive(Debug, Clone)]
pub struct FrameMac {
    key: [u8; 32],
    direction: u8,
    seq: u64,
}

impl FrameMac {
    /// Frames sent by the connector use direction 0, by the acceptor 1.
    pub fn new(session: [u8; 32], direction: u8) -> Self {
        FrameMac {
            key: session,
            direction,
            seq: 0,
        }
    }

    /// The tag of the next frame's `body`, and the frame counter it was computed for; the
    /// counter then moves on, whether or not the frame turns out to be valid. It covers the
    /// body's length and all of the body but a batch's page data, which its page hashes (in
    /// the part covered) bind ([`codec::authenticated`]).
    pub(crate) fn next_tag(&mut self, body: &[u8]) -> ([u8; MAC_BYTES], u64) {
        self.next_tag_of(body.len(), codec::authenticated(body))
    }

    /// [`FrameMac::next_tag`] of a body `len` bytes long whose covered part is `covered`.
    pub(crate) fn next_tag_of(&mut self, len: usize, covered: &[u8]) -> ([u8; MAC_BYTES], u64) {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&[self.direction]);
        h.update(&self.seq.to_le_bytes());
        h.update(&(len as u64).to_le_bytes());
        h.update(covered);
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(&h.finalize().as_bytes()[..MAC_BYTES]);
        let seq = self.seq;
        self.seq += 1;
        (out, seq)
    }
}
