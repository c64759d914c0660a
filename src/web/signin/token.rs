//! Signed tokens of the sign-in flow: the ticket in `status.signIn.url` and the OAuth `state`.
//!
//! A token is `BASE64URL(JSON payload) "." BASE64URL(HMAC-SHA256(key, purpose "\n" payload))`. The
//! purpose (`ticket`, `state`) is part of the MAC input, so a token of one kind is never accepted as
//! the other. Expiry is checked by the caller after the signature, so that an expired but genuine
//! token still names its resource (its failure can then be reported on that resource).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};
use std::fmt;

type HmacSha256 = Hmac<Sha256>;

/// The smallest key accepted (bytes).
pub const MIN_KEY_LEN: usize = 32;

/// Signs and verifies tokens with the operator's HMAC key. `Debug` never shows the key.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signer([redacted])")
    }
}

/// Why a token was refused before its content could be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenProblem {
    /// Not two base64url parts, or the payload is not the expected JSON.
    #[error("malformed")]
    Malformed,
    /// Well-formed, but the signature does not match (altered, or signed with another key).
    #[error("bad signature")]
    BadSignature,
}

impl Signer {
    /// A signer over `key` (at least [`MIN_KEY_LEN`] bytes).
    pub fn new(key: Vec<u8>) -> Result<Self, String> {
        if key.len() < MIN_KEY_LEN {
            return Err(format!(
                "the sign-in key has {} bytes; at least {MIN_KEY_LEN} are needed",
                key.len()
            ));
        }
        Ok(Self { key })
    }

    // HMAC accepts keys of any length: `new_from_slice` cannot fail.
    #[allow(clippy::expect_used)]
    fn mac(&self, purpose: &str, payload_b64: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(purpose.as_bytes());
        mac.update(b"\n");
        mac.update(payload_b64.as_bytes());
        mac
    }

    /// Sign `payload` for `purpose`.
    // The payloads are plain structs of strings and integers: serializing them cannot fail.
    #[allow(clippy::expect_used)]
    pub fn sign<T: Serialize>(&self, purpose: &str, payload: &T) -> String {
        let json = serde_json::to_vec(payload).expect("token payloads serialize");
        let payload_b64 = B64.encode(json);
        let tag = self.mac(purpose, &payload_b64).finalize().into_bytes();
        format!("{payload_b64}.{}", B64.encode(tag))
    }

    /// Verify a token of `purpose` and return its payload (not checking expiry).
    pub fn verify<T: DeserializeOwned>(
        &self,
        purpose: &str,
        token: &str,
    ) -> Result<T, TokenProblem> {
        let (payload_b64, tag_b64) = token
            .trim()
            .split_once('.')
            .ok_or(TokenProblem::Malformed)?;
        let tag = B64.decode(tag_b64).map_err(|_| TokenProblem::Malformed)?;
        // Constant-time comparison.
        self.mac(purpose, payload_b64)
            .verify_slice(&tag)
            .map_err(|_| TokenProblem::BadSignature)?;
        let json = B64
            .decode(payload_b64)
            .map_err(|_| TokenProblem::Malformed)?;
        serde_json::from_slice(&json).map_err(|_| TokenProblem::Malformed)
    }

    /// A secret derived from the key for `purpose` and `input` (HMAC-SHA256, base64url, 43 chars).
    pub fn derive(&self, purpose: &str, input: &str) -> String {
        B64.encode(self.mac(purpose, input).finalize().into_bytes())
    }
}

/// Read a token's payload WITHOUT verifying it: only to find the one-time state ID of an altered
/// state in the server's own store (whose record, not this payload, is then trusted).
pub fn unverified_payload<T: DeserializeOwned>(token: &str) -> Option<T> {
    let (payload_b64, _) = token.trim().split_once('.')?;
    serde_json::from_slice(&B64.decode(payload_b64).ok()?).ok()
}

/// The ticket of a sign-in link: which resource (bound to its UID) and until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub ns: String,
    pub name: String,
    pub uid: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// When the link was made, Unix seconds: a sign-in that succeeded at or after it ends the
    /// link (one-time).
    #[serde(default)]
    pub iat: i64,
}

/// The OAuth `state` of one sign-in attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateClaims {
    /// Random one-time ID (also the input of the PKCE verifier derivation).
    pub id: String,
    pub ns: String,
    pub name: String,
    pub uid: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Binding to the browser: hash of the browser cookie's nonce.
    pub b: String,
    /// The prompt chosen on the sign-in page (`None`, `Consent`, `SelectAccount`).
    pub p: String,
    /// The token endpoint `/oauth2/start` bound this sign-in to (the one that belongs to the
    /// authorization endpoint the browser was sent to): the code is exchanged there or nowhere.
    #[serde(default)]
    pub t: String,
    /// The OAuth client the sign-in was started for.
    #[serde(default)]
    pub c: String,
}

/// The browser binding of a cookie nonce: `BASE64URL(SHA-256("mio-browser\n" nonce))`.
pub fn browser_binding(nonce: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"mio-browser\n");
    h.update(nonce.as_bytes());
    B64.encode(h.finalize())
}

/// Compare two strings in constant time (for equal lengths).
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `n` random bytes, base64url.
pub fn random_b64(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::fill(&mut bytes[..]);
    B64.encode(bytes)
}
