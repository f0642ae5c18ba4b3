//! Keys and the handshake's DoS protection, WireGuard's constructions with
//! library primitives only: X25519 keys (snow's resolver), BLAKE2s hashes
//! and keyed MACs (`blake2`), XChaCha20-Poly1305 for cookies
//! (`chacha20poly1305`).
//!
//! * mac1 on every handshake message proves the sender knows the
//!   responder's public key and, when a network key is set, the network
//!   key: anything else is dropped before any Diffie-Hellman.
//! * mac2, under load, proves the sender can receive at its source address
//!   (it holds a cookie we sent there), so a flood from spoofed addresses
//!   costs us one MAC per datagram.
//!
//! Secrets held here (the static private key, the network key and what is
//! derived from it, cookie secrets) are wiped with `zeroize` when dropped
//! and never printed. What snow holds (its copies of the static and
//! ephemeral private keys, the PSK, chaining keys, session keys inside
//! ring's ChaCha20-Poly1305) it does not wipe: snow 0.10 has no zeroize,
//! and its states are opaque to us.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver, RingResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use zeroize::Zeroize;

pub const KEY_LEN: usize = 32;
pub const MAC_LEN: usize = 16;
/// A cookie is valid for two minutes, then the secret behind it rotates.
pub const COOKIE_SECRET_LIFETIME: Duration = Duration::from_secs(120);

type Blake2sMac128 = Blake2sMac<U16>;

pub type Key = [u8; KEY_LEN];

/// Where every random draw of an overlay comes from: a ChaCha stream
/// seeded once. The agent seeds it from the OS (256 bits, so the stream is
/// as good as the OS's for ephemeral keys, indices and cookie secrets);
/// tests and the simulator seed it from a number, which makes a run
/// replayable.
pub type Seed = [u8; 32];

/// A fresh seed from the OS CSPRNG (production).
pub fn os_seed() -> Seed {
    let mut s = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut s);
    s
}

/// A seed from a number (tests, the simulator): distinct numbers give
/// unrelated streams.
pub fn seed_from_u64(n: u64) -> Seed {
    let mut r = StdRng::seed_from_u64(n);
    r.gen()
}

/// snow's primitives with its randomness (ephemeral keys) taken from a
/// seeded stream: ring's ChaCha20-Poly1305 (about 3x RustCrypto's on x86
/// here), X25519 and BLAKE2s from the default resolver.
pub struct SeededResolver {
    seed: Seed,
}

impl SeededResolver {
    pub fn new(seed: Seed) -> SeededResolver {
        SeededResolver { seed }
    }
}

struct SeededRandom(StdRng);

impl Random for SeededRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoResolver for SeededResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(SeededRandom(StdRng::from_seed(self.seed))))
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        DefaultResolver.resolve_dh(choice)
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        RingResolver
            .resolve_cipher(choice)
            .or_else(|| DefaultResolver.resolve_cipher(choice))
    }
}

/// This node's static X25519 key pair. Not `Clone`: one copy of the private
/// key, wiped on drop.
pub struct StaticKeys {
    private: Key,
    public: Key,
}

impl std::fmt::Debug for StaticKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKeys")
            .field("public", &crate::crypto::b64(&self.public))
            .finish_non_exhaustive()
    }
}

impl Drop for StaticKeys {
    fn drop(&mut self) {
        // The key also lives in snow's handshake states, which we cannot
        // reach.
        self.private.zeroize();
    }
}

/// A 32-byte secret (a private key, the network key) on its way from a file
/// to where it is used: wiped on drop, never printed, not `Clone`.
pub struct Secret(Key);

impl Secret {
    pub fn new(key: Key) -> Secret {
        Secret(key)
    }

    pub fn expose(&self) -> &Key {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl StaticKeys {
    /// A new random key pair (the OS CSPRNG).
    pub fn generate() -> StaticKeys {
        let mut private = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut private);
        StaticKeys::from_private(&mut private)
    }

    /// A key pair drawn from `rng` (tests and the simulator: keys from a
    /// seed).
    pub fn from_rng(rng: &mut impl RngCore) -> StaticKeys {
        let mut private = [0u8; KEY_LEN];
        rng.fill_bytes(&mut private);
        StaticKeys::from_private(&mut private)
    }

    /// The pair for a stored private key. X25519 clamps the scalar, so any
    /// 32 bytes are a valid private key. The caller's copy is wiped.
    pub fn from_private(private: &mut Key) -> StaticKeys {
        let public = public_of(private);
        let keys = StaticKeys {
            private: *private,
            public,
        };
        private.zeroize();
        keys
    }

    pub fn public(&self) -> &Key {
        &self.public
    }

    pub fn private(&self) -> &Key {
        &self.private
    }
}

/// Whether `point` is of small order: X25519 with any clamped scalar (a
/// multiple of the cofactor) maps it to the all-zero output, so a Diffie-
/// Hellman with it contributes nothing secret. WireGuard refuses such
/// results; snow does not check.
pub fn low_order(point: &[u8]) -> bool {
    let Some(mut dh) = DefaultResolver.resolve_dh(&snow::params::DHChoice::Curve25519) else {
        return true;
    };
    if point.len() != KEY_LEN {
        return true;
    }
    dh.set(&[0x55; KEY_LEN]);
    let mut out = [0u8; KEY_LEN];
    dh.dh(point, &mut out).is_err() || out == [0u8; KEY_LEN]
}

fn public_of(private: &Key) -> Key {
    let mut out = [0u8; KEY_LEN];
    if let Some(mut dh) = DefaultResolver.resolve_dh(&DHChoice::Curve25519) {
        dh.set(private);
        out.copy_from_slice(&dh.pubkey()[..KEY_LEN]);
    }
    out
}

/// Standard base64, as `wg` prints keys.
pub fn b64(k: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// A 32-byte key from base64 text (surrounding whitespace allowed). The
/// decoding buffer is wiped: the text may be a private key's.
pub fn parse_key(text: &str) -> Option<Key> {
    use base64::Engine;
    let mut v = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()?;
    let key = Key::try_from(v.as_slice()).ok();
    v.zeroize();
    key
}

pub fn hash(parts: &[&[u8]]) -> Key {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

/// Keyed BLAKE2s-128 (the MAC of WireGuard's mac1/mac2 and cookies).
pub fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    // Keys here are 16 or 32 bytes, always accepted by BLAKE2s.
    let Ok(mut m) = <Blake2sMac128 as KeyInit>::new_from_slice(key) else {
        return [0; MAC_LEN];
    };
    for p in parts {
        Update::update(&mut m, p);
    }
    m.finalize_fixed().into()
}

/// Constant-time comparison, so a forged MAC learns nothing from timing.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The mac1 key of a responder: binds handshakes to its public key and to
/// the network key.
pub fn mac1_key(responder: &Key, network_key: &Key) -> Key {
    hash(&[b"mac1----", responder, network_key])
}

/// The key a responder encrypts cookies under for its initiators.
pub fn cookie_key(responder: &Key) -> Key {
    hash(&[b"cookie--", responder])
}

fn addr_bytes(src: SocketAddr) -> [u8; 18] {
    let mut b = [0u8; 18];
    let ip = match src.ip() {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    b[..16].copy_from_slice(&ip);
    b[16..].copy_from_slice(&src.port().to_be_bytes());
    b
}

/// The responder's side of cookies: a random secret rotated every two
/// minutes; a cookie is the MAC of the sender's address under it.
pub struct CookieJar {
    secret: Key,
    born: Option<Instant>,
    cookie_key: Key,
    rng: StdRng,
}

impl Drop for CookieJar {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl CookieJar {
    pub fn new(our_public: &Key, seed: Seed) -> CookieJar {
        CookieJar {
            secret: [0; KEY_LEN],
            born: None,
            cookie_key: cookie_key(our_public),
            rng: StdRng::from_seed(seed),
        }
    }

    fn secret(&mut self, now: Instant) -> &Key {
        let stale = self
            .born
            .is_none_or(|b| now.saturating_duration_since(b) >= COOKIE_SECRET_LIFETIME);
        if stale {
            self.rng.fill_bytes(&mut self.secret);
            self.born = Some(now);
        }
        &self.secret
    }

    pub fn cookie(&mut self, now: Instant, src: SocketAddr) -> [u8; MAC_LEN] {
        let a = addr_bytes(src);
        let s = *self.secret(now);
        mac(&s, &[&a])
    }

    /// Whether `mac2` over `msg` is right for a cookie of `src`.
    pub fn check_mac2(&mut self, now: Instant, src: SocketAddr, msg: &[u8], mac2: &[u8]) -> bool {
        let c = self.cookie(now, src);
        ct_eq(&mac(&c, &[msg]), mac2)
    }

    /// A cookie reply body: 24-byte nonce then the encrypted cookie (32
    /// bytes), authenticated with the mac1 of the message it answers.
    pub fn seal(&mut self, now: Instant, src: SocketAddr, mac1: &[u8], out: &mut [u8; 56]) {
        let mut cookie = self.cookie(now, src);
        let mut nonce = [0u8; 24];
        self.rng.fill_bytes(&mut nonce);
        let aead = XChaCha20Poly1305::new(&self.cookie_key.into());
        out[..24].copy_from_slice(&nonce);
        match aead.encrypt_in_place_detached(XNonce::from_slice(&nonce), mac1, &mut cookie) {
            Ok(tag) => {
                out[24..40].copy_from_slice(&cookie);
                out[40..56].copy_from_slice(&tag);
            }
            // Encryption of 16 bytes cannot fail; leave an unusable reply.
            Err(_) => out.iter_mut().for_each(|b| *b = 0),
        }
    }
}
/// The initiator's side: opens a cookie reply from `responder` for the
/// message whose mac1 was `mac1`.
pub fn open_cookie(responder: &Key, mac1: &[u8], body: &[u8]) -> Option<[u8; MAC_LEN]> {
    if body.len() != 56 {
        return None;
    }
    let aead = XChaCha20Poly1305::new(&cookie_key(responder).into());
    let mut cookie = [0u8; MAC_LEN];
    cookie.copy_from_slice(&body[24..40]);
    aead.decrypt_in_place_detached(
        XNonce::from_slice(&body[..24]),
        mac1,
        &mut cookie,
        Tag::from_slice(&body[40..56]),
    )
    .ok()?;
    Some(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_roundtrip_and_public_matches_snow() {
        let k = StaticKeys::generate();
        let again = StaticKeys::from_private(&mut k.private().clone());
        assert_eq!(k.public(), again.public());
        assert_ne!(k.public(), &[0u8; 32]);
        assert_eq!(parse_key(&b64(k.public())), Some(*k.public()));
        assert_eq!(
            parse_key(&format!("{}\n", b64(k.public()))),
            Some(*k.public())
        );
        assert_eq!(parse_key("c2hvcnQ="), None);
        assert_eq!(parse_key("not base64!"), None);
        // The same public key snow derives when it builds a handshake.
        let b = snow::Builder::new("Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s".parse().unwrap());
        let kp = b.generate_keypair().unwrap();
        let mut private: Key = kp.private.as_slice().try_into().unwrap();
        let mine = StaticKeys::from_private(&mut private);
        assert_eq!(private, [0; 32], "the caller's copy is wiped");
        assert_eq!(mine.public().as_slice(), kp.public.as_slice());
    }

    #[test]
    fn secrets_are_never_printed() {
        let s = Secret::new([0x41; 32]);
        assert_eq!(format!("{s:?}"), "Secret(..)");
        assert_eq!(s.expose(), &[0x41; 32]);
        let k = StaticKeys::generate();
        let shown = format!("{k:?}");
        assert!(shown.contains(&b64(k.public())) && !shown.contains(&b64(k.private())));
    }

    #[test]
    fn low_order_points_are_recognised() {
        // The small-order points of Curve25519 (the encodings libsodium and
        // WireGuard refuse), and a non-canonical one.
        let mut small: Vec<[u8; 32]> = vec![[0; 32]];
        let mut one = [0u8; 32];
        one[0] = 1;
        small.push(one);
        for hex in [
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
            "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
            "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        ] {
            let b: Vec<u8> = (0..32)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            small.push(b.try_into().unwrap());
        }
        for p in &small {
            assert!(low_order(p), "{p:02x?}");
        }
        for _ in 0..20 {
            assert!(!low_order(StaticKeys::generate().public()));
        }
        assert!(low_order(&[1, 2, 3]), "not a point at all");
    }

    #[test]
    fn blake2s_matches_reference_vectors() {
        // BLAKE2s-256("abc") from RFC 7693 appendix B.
        assert_eq!(
            b64(&hash(&[b"abc"])),
            b64(&[
                0x50, 0x8C, 0x5E, 0x8C, 0x32, 0x7C, 0x14, 0xE2, 0xE1, 0xA7, 0x2B, 0xA3, 0x4E, 0xEB,
                0x45, 0x2F, 0x37, 0x45, 0x8B, 0x20, 0x9E, 0xD6, 0x3A, 0x29, 0x4D, 0x99, 0x9B, 0x4C,
                0x86, 0x67, 0x59, 0x82
            ])
        );
        assert_eq!(hash(&[b"ab", b"c"]), hash(&[b"abc"]));
        let k = [7u8; 32];
        assert_eq!(mac(&k, &[b"x", b"y"]), mac(&k, &[b"xy"]));
        assert_ne!(mac(&k, &[b"xy"]), mac(&[8u8; 32], &[b"xy"]));
    }

    #[test]
    fn mac1_binds_responder_and_network_key() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        assert_ne!(mac1_key(&a, &[0; 32]), mac1_key(&b, &[0; 32]));
        assert_ne!(mac1_key(&a, &[0; 32]), mac1_key(&a, &[9; 32]));
    }

    #[test]
    fn cookies_roundtrip_bind_address_and_rotate() {
        let responder = StaticKeys::generate();
        let mut jar = CookieJar::new(responder.public(), seed_from_u64(1));
        let t0 = Instant::now();
        let src: SocketAddr = "203.0.113.7:5800".parse().unwrap();
        let mac1 = [5u8; 16];
        let mut body = [0u8; 56];
        jar.seal(t0, src, &mac1, &mut body);
        let cookie = open_cookie(responder.public(), &mac1, &body).expect("opens");
        assert_eq!(cookie, jar.cookie(t0, src));
        // Wrong mac1 (a reply to some other message) or tampering: refused.
        assert!(open_cookie(responder.public(), &[6u8; 16], &body).is_none());
        let mut bad = body;
        bad[30] ^= 1;
        assert!(open_cookie(responder.public(), &mac1, &bad).is_none());
        assert!(open_cookie(responder.public(), &mac1, &body[..55]).is_none());
        // mac2 with the cookie verifies for that address only.
        let msg = b"initiation up to mac2";
        let mac2 = mac(&cookie, &[msg]);
        assert!(jar.check_mac2(t0, src, msg, &mac2));
        let other: SocketAddr = "203.0.113.7:5801".parse().unwrap();
        assert!(!jar.check_mac2(t0, other, msg, &mac2));
        // After the secret rotates, old cookies stop working.
        let later = t0 + COOKIE_SECRET_LIFETIME + Duration::from_secs(1);
        assert!(!jar.check_mac2(later, src, msg, &mac2));
    }
}
