//! Secrets at rest: the master key and the AES-256-GCM-SIV envelope around
//! every provider API key.
//!
//! - Each encryption draws a fresh random 96-bit nonce. GCM-SIV is
//!   nonce-misuse resistant, so even a (vanishingly unlikely) repeated nonce
//!   only reveals that two plaintexts are equal.
//! - The associated data binds a ciphertext to the record it belongs to (the
//!   backend id), so a ciphertext copied into another record does not open.
//! - Every ciphertext carries the [`KeyId`] of the key that sealed it, which
//!   is what makes online rotation ([`crate::catalog::Catalog::rotate_master_key`])
//!   and the start-up key check possible.
//!
//! Key material never appears in `Debug`, `Display` or logs: [`MasterKey`]
//! shows only its id.

use std::fmt;

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use base64::Engine as _;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

/// Length of a master key in bytes (AES-256).
pub const MASTER_KEY_LEN: usize = 32;
/// Length of a nonce in bytes (96 bits).
pub const NONCE_LEN: usize = 12;
/// Domain separation for key ids, so a key id can never be confused with any
/// other hash of the key.
const KEY_ID_DOMAIN: &[u8] = b"claw-gateway/master-key-id/v1\0";

/// Why a key could not be parsed or a secret could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The master key text is not 64 hex characters. Never contains the key.
    #[error("master key must be exactly 64 hex characters (32 bytes): {0}")]
    InvalidKey(&'static str),
    /// The ciphertext was sealed under a different master key.
    #[error("secret is sealed under master key {found}, not {expected}")]
    WrongKey {
        /// Key id recorded with the ciphertext.
        found: KeyId,
        /// Key id of the key that tried to open it.
        expected: KeyId,
    },
    /// Authentication failed: wrong key, wrong associated data or tampering.
    #[error("secret failed authentication (wrong key, wrong record, or corrupted)")]
    Open,
    /// Encryption failed (only possible for absurdly large inputs).
    #[error("secret could not be encrypted")]
    Seal,
    /// The decrypted secret is not UTF-8.
    #[error("decrypted secret is not valid UTF-8")]
    NotUtf8,
}

/// Public identifier of a master key: hex of the first 8 bytes of
/// SHA-256(domain ‖ key). Safe to log and to store.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    /// Wraps a stored key id.
    pub fn new(id: impl Into<String>) -> Self {
        KeyId(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The 256-bit key every provider secret is encrypted under.
#[derive(Clone)]
pub struct MasterKey {
    cipher: Aes256GcmSiv,
    id: KeyId,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl MasterKey {
    /// Parses 64 hex characters; surrounding whitespace is ignored. The error
    /// never contains any part of the input.
    pub fn from_hex(text: &str) -> Result<Self, CryptoError> {
        let text = text.trim();
        if text.len() != 2 * MASTER_KEY_LEN {
            return Err(CryptoError::InvalidKey("wrong length"));
        }
        let mut bytes = [0u8; MASTER_KEY_LEN];
        hex::decode_to_slice(text, &mut bytes)
            .map_err(|_| CryptoError::InvalidKey("not hexadecimal"))?;
        Ok(Self::from_bytes(&bytes))
    }

    /// Builds a key from raw bytes.
    pub fn from_bytes(bytes: &[u8; MASTER_KEY_LEN]) -> Self {
        let mut h = Sha256::new();
        h.update(KEY_ID_DOMAIN);
        h.update(bytes);
        let digest = h.finalize();
        MasterKey {
            cipher: Aes256GcmSiv::new(bytes.into()),
            id: KeyId(hex::encode(&digest[..8])),
        }
    }

    /// The key's public id.
    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// Encrypts `plaintext`, binding it to `aad` (the owning record's id).
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Sealed, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Seal)?;
        Ok(Sealed {
            key_id: self.id.clone(),
            nonce,
            ciphertext,
        })
    }

    /// Decrypts a [`Sealed`] secret that was sealed with the same `aad`.
    pub fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.key_id != self.id {
            return Err(CryptoError::WrongKey {
                found: sealed.key_id.clone(),
                expected: self.id.clone(),
            });
        }
        self.cipher
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Open)
    }

    /// [`MasterKey::open`] for secrets that are text (provider API keys).
    pub fn open_string(&self, sealed: &Sealed, aad: &[u8]) -> Result<String, CryptoError> {
        String::from_utf8(self.open(sealed, aad)?).map_err(|_| CryptoError::NotUtf8)
    }
}

/// A ciphertext with everything needed to open it except the key and the AAD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Id of the key that sealed it.
    pub key_id: KeyId,
    /// The random nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

/// A fresh random master key as 64 lowercase hex characters (`keygen`).
pub fn generate_master_key_hex() -> String {
    let mut bytes = [0u8; MASTER_KEY_LEN];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// A fresh random token (32 random bytes, base64url without padding, 43
/// characters), suitable for `CLAW_ADMIN_TOKEN` / `CLAW_PROXY_TOKEN`.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Lowercase hex SHA-256, the form in which client-key secrets are stored.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const K2: &str = "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn key(hex: &str) -> MasterKey {
        MasterKey::from_hex(hex).expect("test key is valid")
    }

    #[test]
    fn round_trip() {
        let k = key(K1);
        let sealed = k.seal(b"sk-secret", b"be_1").expect("seal");
        assert_eq!(sealed.key_id, *k.id());
        assert_ne!(sealed.ciphertext, b"sk-secret");
        assert_eq!(k.open_string(&sealed, b"be_1").expect("open"), "sk-secret");
    }

    #[test]
    fn nonces_are_fresh() {
        let k = key(K1);
        let a = k.seal(b"x", b"id").expect("seal");
        let b = k.seal(b"x", b"id").expect("seal");
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn wrong_key_or_aad_fails() {
        let k1 = key(K1);
        let k2 = key(K2);
        let sealed = k1.seal(b"sk-secret", b"be_1").expect("seal");
        assert!(matches!(
            k2.open(&sealed, b"be_1"),
            Err(CryptoError::WrongKey { .. })
        ));
        // Even with the id forged, the wrong key fails authentication.
        let forged = Sealed {
            key_id: k2.id().clone(),
            ..sealed.clone()
        };
        assert_eq!(k2.open(&forged, b"be_1"), Err(CryptoError::Open));
        assert_eq!(k1.open(&sealed, b"be_2"), Err(CryptoError::Open));
        let mut tampered = sealed;
        tampered.ciphertext[0] ^= 1;
        assert_eq!(k1.open(&tampered, b"be_1"), Err(CryptoError::Open));
    }

    #[test]
    fn key_ids_are_stable_and_distinct() {
        assert_eq!(key(K1).id(), key(&format!("  {K1}\n")).id());
        assert_ne!(key(K1).id(), key(K2).id());
        assert_eq!(key(K1).id().as_str().len(), 16);
        assert_eq!(key(K1).id(), key(&K1.to_uppercase()).id());
    }

    #[test]
    fn bad_keys_are_rejected_without_echo() {
        for bad in [
            "",
            "abc",
            &"zz".repeat(32),
            &"0".repeat(63),
            &"0".repeat(66),
        ] {
            let err = MasterKey::from_hex(bad).expect_err("invalid");
            assert!(err.to_string().contains("64 hex"));
        }
        let secretish = format!("{}zz", &K1[..62]);
        let err = MasterKey::from_hex(&secretish).expect_err("invalid");
        assert!(!err.to_string().contains(&K1[..20]));
    }

    #[test]
    fn debug_shows_only_the_id() {
        let k = key(K1);
        let dbg = format!("{k:?}");
        assert!(dbg.contains(k.id().as_str()));
        assert!(!dbg.contains(&K1[..16]));
        assert!(!dbg.contains("0001020304"));
    }

    #[test]
    fn generated_material_has_the_documented_shape() {
        let hex = generate_master_key_hex();
        assert_eq!(hex.len(), 64);
        assert!(MasterKey::from_hex(&hex).is_ok());
        assert_eq!(generate_token().len(), 43);
        assert_eq!(sha256_hex(b"").len(), 64);
    }
}
