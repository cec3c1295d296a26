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
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ring::{hkdf, hmac};

use crate::error::TokenError;
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

/// Mints and checks the address-validation tokens the server puts in its
/// Retry packets (RFC 9000 8.1.2).
///
/// ```text
/// token = 0x01 | expiry (u64 BE) | odcid len (u8) | odcid | tag (32)
/// tag   = HMAC-SHA256(retry key, instance | client IP (16, v4 mapped) | client port
///                                | retry SCID len | retry SCID | token[..10 + len])
/// ```
///
/// `expiry` counts milliseconds from this minter's *epoch*, the first `now`
/// it was given (the core has no wall clock). `instance` is drawn at random
/// for each minter, so a token is only good for the server process that made
/// it: a restarted server refuses it and the client simply connects again.
/// The tag binds the client's address and port, the original destination
/// connection ID (handed back to quiche), the connection ID we chose in the
/// Retry (the client's next destination, which becomes the connection's own
/// ID) and the expiry.
#[derive(Clone)]
pub struct RetryTokens {
    key: hmac::Key,
    instance: [u8; 16],
    epoch: Option<Instant>,
    lifetime: Duration,
}

impl fmt::Debug for RetryTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryTokens")
            .field("epoch", &self.epoch)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// Token format version (the first byte).
const TOKEN_FORMAT: u8 = 1;
/// Bytes before the original destination connection ID.
const TOKEN_HEAD: usize = 1 + 8 + 1;
/// Length of the HMAC-SHA256 tag.
const TOKEN_TAG: usize = 32;
/// Longest connection ID in QUIC version 1.
const MAX_CID: usize = 20;

impl RetryTokens {
    /// A minter signing with `keys`' retry key; `instance` separates this
    /// process's tokens from every other's (draw it at random).
    pub fn new(keys: &SecretKeys, instance: [u8; 16], lifetime: Duration) -> RetryTokens {
        RetryTokens {
            key: keys.retry.clone(),
            instance,
            epoch: None,
            lifetime,
        }
    }

    /// Milliseconds from the epoch to `now` (the first call fixes the epoch).
    fn millis(&mut self, now: Instant) -> u64 {
        let epoch = *self.epoch.get_or_insert(now);
        u64::try_from(now.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// What the tag signs.
    fn message(&self, peer: SocketAddr, retry_scid: &[u8], body: &[u8]) -> Vec<u8> {
        let ip = match peer.ip() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            std::net::IpAddr::V6(v6) => v6,
        };
        let mut m = Vec::with_capacity(16 + 16 + 2 + 1 + retry_scid.len() + body.len());
        m.extend_from_slice(&self.instance);
        m.extend_from_slice(&ip.octets());
        m.extend_from_slice(&peer.port().to_be_bytes());
        // A connection ID is at most 20 bytes (quiche checks), so its
        // length fits a byte.
        m.push(retry_scid.len().min(255) as u8);
        m.extend_from_slice(retry_scid);
        m.extend_from_slice(body);
        m
    }

    /// A token for a client at `peer` whose first Initial was addressed to
    /// `odcid`, told in our Retry to use `retry_scid` from now on. Returns
    /// `None` if `odcid` is longer than QUIC allows (20 bytes).
    pub fn mint(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        odcid: &[u8],
        retry_scid: &[u8],
    ) -> Option<Vec<u8>> {
        if odcid.len() > MAX_CID {
            return None;
        }
        let lifetime = u64::try_from(self.lifetime.as_millis()).unwrap_or(u64::MAX);
        let expiry = self.millis(now).saturating_add(lifetime);
        let mut t = Vec::with_capacity(TOKEN_HEAD + odcid.len() + TOKEN_TAG);
        t.push(TOKEN_FORMAT);
        t.extend_from_slice(&expiry.to_be_bytes());
        t.push(odcid.len() as u8);
        t.extend_from_slice(odcid);
        let tag = hmac::sign(&self.key, &self.message(peer, retry_scid, &t));
        t.extend_from_slice(tag.as_ref());
        Some(t)
    }

    /// Checks a token that came in an Initial from `peer` addressed to
    /// `retry_scid`; returns the original destination connection ID it
    /// carries. The tag is checked before the expiry, so
    /// [`TokenError::Expired`] means "ours, but too old".
    pub fn verify(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        retry_scid: &[u8],
        token: &[u8],
    ) -> Result<Vec<u8>, TokenError> {
        if token.len() < TOKEN_HEAD + TOKEN_TAG || token[0] != TOKEN_FORMAT {
            return Err(TokenError::Malformed);
        }
        let odcid_len = usize::from(token[TOKEN_HEAD - 1]);
        if odcid_len > MAX_CID || token.len() != TOKEN_HEAD + odcid_len + TOKEN_TAG {
            return Err(TokenError::Malformed);
        }
        let (body, tag) = token.split_at(TOKEN_HEAD + odcid_len);
        // Constant time.
        hmac::verify(&self.key, &self.message(peer, retry_scid, body), tag)
            .map_err(|_| TokenError::Forged)?;
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&body[1..9]);
        if self.millis(now) > u64::from_be_bytes(expiry) {
            return Err(TokenError::Expired);
        }
        Ok(body[TOKEN_HEAD..].to_vec())
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

    /// Any instant: the tests only ever add to it.
    #[allow(clippy::disallowed_methods)]
    fn base_instant() -> Instant {
        Instant::now()
    }

    fn minter(instance: u8, secs: u64) -> RetryTokens {
        let keys = ServerSecret::from_bytes([3; 32]).keys();
        RetryTokens::new(&keys, [instance; 16], Duration::from_secs(secs))
    }

    #[test]
    fn retry_token_round_trip_and_bindings() {
        let t0 = base_instant();
        let peer: SocketAddr = "192.0.2.1:4000".parse().expect("address");
        let mut m = minter(1, 10);
        let tok = m
            .mint(t0, peer, b"original-dcid", b"retry-scid")
            .expect("minted");
        assert_eq!(
            m.verify(t0, peer, b"retry-scid", &tok),
            Ok(b"original-dcid".to_vec())
        );
        let later = t0 + Duration::from_secs(10);
        assert!(
            m.verify(later, peer, b"retry-scid", &tok).is_ok(),
            "valid up to the expiry"
        );
        let other_port: SocketAddr = "192.0.2.1:4001".parse().expect("address");
        let other_ip: SocketAddr = "192.0.2.2:4000".parse().expect("address");
        assert_eq!(
            m.verify(t0, other_port, b"retry-scid", &tok),
            Err(TokenError::Forged)
        );
        assert_eq!(
            m.verify(t0, other_ip, b"retry-scid", &tok),
            Err(TokenError::Forged)
        );
        assert_eq!(
            m.verify(t0, peer, b"retry-scie", &tok),
            Err(TokenError::Forged)
        );
        let mut flipped = tok.clone();
        flipped[3] ^= 1; // the expiry
        assert_eq!(
            m.verify(t0, peer, b"retry-scid", &flipped),
            Err(TokenError::Forged)
        );
        let mut other = minter(2, 10);
        other.millis(t0);
        assert_eq!(
            other.verify(t0, peer, b"retry-scid", &tok),
            Err(TokenError::Forged),
            "another process (instance) refuses it"
        );
        assert_eq!(
            m.verify(t0, peer, b"retry-scid", &tok[..tok.len() - 1]),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            m.verify(t0, peer, b"retry-scid", b""),
            Err(TokenError::Malformed)
        );
        assert!(m.mint(t0, peer, &[0; 21], b"x").is_none(), "odcid too long");
    }

    #[test]
    fn retry_token_expires() {
        let t0 = base_instant();
        let peer: SocketAddr = "[2001:db8::1]:443".parse().expect("address");
        let mut m = minter(1, 1);
        m.millis(t0); // the epoch
        let minted_at = t0 + Duration::from_secs(5);
        let tok = m.mint(minted_at, peer, b"o", b"s").expect("minted");
        let ok = minted_at + Duration::from_millis(1000);
        assert!(m.verify(ok, peer, b"s", &tok).is_ok());
        let late = minted_at + Duration::from_millis(1001);
        assert_eq!(m.verify(late, peer, b"s", &tok), Err(TokenError::Expired));
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
