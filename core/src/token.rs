//! The server's long-lived secret and what derives from it: stateless-reset
//! tokens (and the reset packets themselves), the session-ticket key, and
//! the retry-token key.
//!
//! ```text
//! TLS private key (PEM) ──HKDF──► ServerSecret (32 bytes)
//!                                   ├─ "reset"  ─► HMAC key: token(cid) = HMAC(cid)[..16]
//!                                   ├─ "ticket" ─► 48-byte TLS session-ticket key
//!                                   └─ "retry"  ─► HMAC key for retry tokens
//! ```
//!
//! Because the secret comes from the private key by default, a restarted
//! server issues the same reset token for a connection ID as the process it
//! replaced: a client of the old process gets a stateless reset on its next
//! packet and reconnects within one round trip, and resumes its TLS session
//! (with 0-RTT) because the ticket key is the same too.

use std::fmt;

use ring::{hkdf, hmac};

use crate::rng::CoreRng;

/// Domain separation for deriving the secret from a private key.
const SECRET_SALT: &[u8] = b"quic-report/1 server secret";

/// The server's long-lived secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerSecret([u8; 32]);

impl fmt::Debug for ServerSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerSecret(..)")
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl ServerSecret {
    /// The secret derived (HKDF-SHA256) from the bytes of a TLS private key
    /// file: stable across restarts, no extra file.
    pub fn from_private_key(key_file: &[u8]) -> ServerSecret {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SECRET_SALT).extract(key_file);
        let mut out = [0u8; 32];
        prk.expand(&[b"secret"], Len(32))
            .and_then(|okm| okm.fill(&mut out))
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        ServerSecret(out)
    }

    /// A secret from 32 bytes (e.g. a `--secret-file`).
    pub fn from_bytes(bytes: [u8; 32]) -> ServerSecret {
        ServerSecret(bytes)
    }

    /// A random secret (nothing survives a restart).
    pub fn random(rng: &mut CoreRng) -> ServerSecret {
        let mut b = [0u8; 32];
        rng.fill(&mut b);
        ServerSecret(b)
    }

    fn derive(&self, label: &[u8], out: &mut [u8]) {
        let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &self.0);
        prk.expand(&[b"quic-report/1 ", label], Len(out.len()))
            .and_then(|okm| okm.fill(out))
            .expect("short outputs are valid HKDF-SHA256 lengths");
    }

    /// The keys this secret gives.
    pub fn keys(&self) -> SecretKeys {
        let mut reset = [0u8; 32];
        self.derive(b"reset", &mut reset);
        let mut retry = [0u8; 32];
        self.derive(b"retry", &mut retry);
        let mut ticket = [0u8; 48];
        self.derive(b"ticket", &mut ticket);
        SecretKeys {
            reset: hmac::Key::new(hmac::HMAC_SHA256, &reset),
            retry: hmac::Key::new(hmac::HMAC_SHA256, &retry),
            ticket,
        }
    }
}

/// The keys derived from a [`ServerSecret`].
#[derive(Clone)]
pub struct SecretKeys {
    reset: hmac::Key,
    retry: hmac::Key,
    ticket: [u8; 48],
}

impl fmt::Debug for SecretKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKeys(..)")
    }
}

impl SecretKeys {
    /// The stateless-reset token of a connection ID we issued.
    pub fn reset_token(&self, cid: &[u8]) -> u128 {
        let tag = hmac::sign(&self.reset, cid);
        let mut t = [0u8; 16];
        t.copy_from_slice(&tag.as_ref()[..16]);
        u128::from_be_bytes(t)
    }

    /// The 48-byte TLS session-ticket key.
    pub fn ticket_key(&self) -> &[u8; 48] {
        &self.ticket
    }

    /// The retry-token HMAC key.
    pub fn retry_key(&self) -> &hmac::Key {
        &self.retry
    }
}

/// Smallest stateless reset we send (RFC 9000 10.3: at least 21 bytes).
pub const MIN_RESET_LEN: usize = 21;

/// Writes a stateless reset (RFC 9000 10.3) answering a short-header packet
/// of `received_len` bytes for connection ID `dcid`: random bytes with the
/// fixed bit set, ending in the token. It is smaller than the packet that
/// caused it (so two endpoints cannot loop) and at most 43 bytes. Returns
/// `None` when the received packet is too small to answer.
pub fn stateless_reset(
    keys: &SecretKeys,
    dcid: &[u8],
    received_len: usize,
    rng: &mut CoreRng,
) -> Option<Vec<u8>> {
    let len = received_len.checked_sub(1)?.min(43);
    if len < MIN_RESET_LEN {
        return None;
    }
    let mut out = vec![0u8; len];
    rng.fill(&mut out[..len - 16]);
    out[0] = 0b0100_0000 | (out[0] & 0b0011_1111);
    out[len - 16..].copy_from_slice(&keys.reset_token(dcid).to_be_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_secret_and_tokens() {
        let a = ServerSecret::from_private_key(b"-----BEGIN PRIVATE KEY----- one");
        let b = ServerSecret::from_private_key(b"-----BEGIN PRIVATE KEY----- one");
        let c = ServerSecret::from_private_key(b"-----BEGIN PRIVATE KEY----- two");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.keys().reset_token(b"cid"), b.keys().reset_token(b"cid"));
        assert_ne!(a.keys().reset_token(b"cid"), a.keys().reset_token(b"cie"));
        assert_ne!(a.keys().reset_token(b"cid"), c.keys().reset_token(b"cid"));
    }

    #[test]
    fn labels_separate_the_keys() {
        let k = ServerSecret::from_bytes([7; 32]).keys();
        let t = k.reset_token(b"");
        assert_ne!(&k.ticket_key()[..16], &t.to_be_bytes()[..]);
        assert_ne!(
            hmac::sign(k.retry_key(), b"x").as_ref(),
            hmac::sign(&k.reset, b"x").as_ref()
        );
    }

    #[test]
    fn reset_packet_shape() {
        let keys = ServerSecret::from_bytes([1; 32]).keys();
        let mut rng = CoreRng::from_seed(1);
        assert!(
            stateless_reset(&keys, b"c", 21, &mut rng).is_none(),
            "too small to answer"
        );
        for received in [22usize, 40, 1200] {
            let p = stateless_reset(&keys, b"cid", received, &mut rng).expect("answerable");
            assert!(p.len() < received && p.len() >= MIN_RESET_LEN && p.len() <= 43);
            assert_eq!(p[0] & 0xc0, 0x40, "short header with the fixed bit");
            assert_eq!(&p[p.len() - 16..], &keys.reset_token(b"cid").to_be_bytes());
        }
    }
}
