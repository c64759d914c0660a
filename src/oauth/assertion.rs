//! JWT assertions signed with a key the user keeps in a Secret (RFC 7523), with the `jsonwebtoken`
//! crate over ring:
//!
//! - a client assertion (`private_key_jwt`, RFC 7523 §2.2): the OAuth client proves who it is with
//!   a certificate's key instead of a client secret (Microsoft Entra certificate credentials, any
//!   OIDC server with `private_key_jwt`);
//! - a JWT-bearer grant (RFC 7523 §2.1): a Google service account with domain-wide delegation
//!   asks for a token for the mailbox `sub`.
//!
//! The keys never leave this module except as signatures: [`SigningKey`]'s `Debug` names the
//! certificate's thumbprint or the service account, never key material, and a signed assertion is a
//! [`SecretValue`] (a bearer credential for its few minutes of life).

use crate::secret::SecretValue;
use base64::Engine as _;
use jiff::{SignedDuration, Timestamp};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls_pki_types::{CertificateDer, pem::PemObject as _};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::fmt;

/// The JWT-bearer grant type (RFC 7523 §2.1).
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The client assertion type of `private_key_jwt` (RFC 7523 §2.2).
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long a client assertion is valid: it is used once, right away. Microsoft accepts up to 10
/// minutes; short keeps a leaked one useless.
const CLIENT_ASSERTION_LIFETIME: SignedDuration = SignedDuration::from_secs(5 * 60);
/// How long a JWT-bearer assertion is valid: Google takes at most one hour.
const JWT_BEARER_LIFETIME: SignedDuration = SignedDuration::from_secs(3600);
/// Largest key material read (a 4096-bit key and a certificate chain are a few KiB).
pub const MAX_KEY_BYTES: usize = 64 * 1024;

/// Why a key from a Secret cannot be used. Messages never carry key material.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error("it is larger than {MAX_KEY_BYTES} bytes")]
    TooLarge,
    #[error("it holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate,
    #[error("it holds no usable RSA private key (PEM, PKCS#1 or PKCS#8, at least 2048 bits): {0}")]
    BadPrivateKey(String),
    #[error("it is not a service-account key file (JSON with type service_account): {0}")]
    NotServiceAccountJson(String),
    #[error("the service-account key file has no {0}")]
    ServiceAccountFieldMissing(&'static str),
    /// A field that appears in conditions (the service account's address and client ID) holding
    /// control characters: it would forge lines in the messages that quote it.
    #[error("the service-account key file's {0} holds control characters")]
    ServiceAccountFieldInvalid(&'static str),
}

/// The signature algorithm of client assertions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AssertionAlgorithm {
    #[default]
    RS256,
    PS256,
}

impl AssertionAlgorithm {
    fn jwt(self) -> Algorithm {
        match self {
            AssertionAlgorithm::RS256 => Algorithm::RS256,
            AssertionAlgorithm::PS256 => Algorithm::PS256,
        }
    }
}

/// A certificate credential: the certificate's thumbprints (which tell the provider which uploaded
/// certificate to check the signature with) and its private key.
#[derive(Clone)]
pub struct CertificateKey {
    key: EncodingKey,
    algorithm: AssertionAlgorithm,
    /// base64url SHA-1 of the DER certificate (`x5t`, what Microsoft Entra matches on).
    x5t: String,
    /// base64url SHA-256 of the DER certificate (`x5t#S256`).
    x5t_s256: String,
    fingerprint: [u8; 32],
}

impl CertificateKey {
    /// From a `kubernetes.io/tls` Secret's `tls.crt` (the first certificate is the client's) and
    /// `tls.key`.
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        algorithm: AssertionAlgorithm,
    ) -> Result<Self, KeyProblem> {
        if cert_pem.len() > MAX_KEY_BYTES || key_pem.len() > MAX_KEY_BYTES {
            return Err(KeyProblem::TooLarge);
        }
        let cert = CertificateDer::pem_slice_iter(cert_pem)
            .next()
            .and_then(Result::ok)
            .ok_or(KeyProblem::NoCertificate)?;
        let key = rsa_key(key_pem)?;
        let b64 = |d: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d);
        Ok(Self {
            key,
            algorithm,
            x5t: b64(&sha1::Sha1::digest(cert.as_ref())),
            x5t_s256: b64(&sha2::Sha256::digest(cert.as_ref())),
            fingerprint: fingerprint(&[cert_pem, key_pem]),
        })
    }

    /// The certificate's SHA-1 thumbprint in hex, upper case, as the Entra admin center shows it.
    pub fn thumbprint_hex(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&self.x5t)
            .unwrap_or_default()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect()
    }

    /// A client assertion for `client_id` at the token endpoint `audience`.
    pub fn client_assertion(
        &self,
        client_id: &str,
        audience: &str,
        now: Timestamp,
    ) -> Result<SecretValue, String> {
        let mut header = Header::new(self.algorithm.jwt());
        header.x5t = Some(self.x5t.clone());
        header.x5t_s256 = Some(self.x5t_s256.clone());
        let claims = Claims {
            iss: client_id,
            sub: Some(client_id),
            aud: audience,
            scope: None,
            jti: Some(jti()),
            iat: now.as_second(),
            nbf: Some(now.as_second()),
            exp: expiry(now, CLIENT_ASSERTION_LIFETIME)?,
        };
        sign(&header, &claims, &self.key)
    }
}

/// A Google service account's key (the JSON file the Cloud console downloads).
#[derive(Clone)]
pub struct ServiceAccountKey {
    /// The service account's address: the assertion's issuer.
    pub client_email: String,
    /// The numeric OAuth client ID that the Admin console's domain-wide delegation lists.
    pub client_id: String,
    private_key_id: Option<String>,
    key: EncodingKey,
    fingerprint: [u8; 32],
}

#[derive(Deserialize)]
struct ServiceAccountJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    client_email: Option<String>,
    client_id: Option<String>,
    private_key_id: Option<String>,
    private_key: Option<String>,
}

impl ServiceAccountKey {
    /// From the key file's JSON.
    pub fn from_json(json: &[u8]) -> Result<Self, KeyProblem> {
        if json.len() > MAX_KEY_BYTES {
            return Err(KeyProblem::TooLarge);
        }
        // serde's message can quote the input: only its position is kept.
        let parsed: ServiceAccountJson = serde_json::from_slice(json).map_err(|e| {
            KeyProblem::NotServiceAccountJson(format!(
                "invalid JSON at line {} column {}",
                e.line(),
                e.column()
            ))
        })?;
        if parsed.kind.as_deref() != Some("service_account") {
            return Err(KeyProblem::NotServiceAccountJson(
                "its \"type\" is not \"service_account\"".to_owned(),
            ));
        }
        let text = |v: Option<String>, name| {
            let v = v
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty() && s.len() <= 320)
                .ok_or(KeyProblem::ServiceAccountFieldMissing(name))?;
            if v.chars().any(char::is_control) {
                return Err(KeyProblem::ServiceAccountFieldInvalid(name));
            }
            Ok(v)
        };
        let private_key = parsed
            .private_key
            .map(SecretValue::new)
            .filter(|k| !k.is_empty())
            .ok_or(KeyProblem::ServiceAccountFieldMissing("private_key"))?;
        let key = rsa_key(private_key.expose().as_bytes())?;
        Ok(Self {
            client_email: text(parsed.client_email, "client_email")?,
            client_id: text(parsed.client_id, "client_id")?,
            private_key_id: parsed.private_key_id.filter(|k| k.len() <= 128),
            key,
            fingerprint: fingerprint(&[json]),
        })
    }

    /// A JWT-bearer assertion for the mailbox `subject` with `scopes`, at the token endpoint
    /// `audience`, valid for one hour (Google's limit).
    pub fn grant_assertion(
        &self,
        subject: &str,
        scopes: &[String],
        audience: &str,
        now: Timestamp,
    ) -> Result<SecretValue, String> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.private_key_id.clone();
        let scope = scopes.join(" ");
        let claims = Claims {
            iss: &self.client_email,
            sub: Some(subject),
            aud: audience,
            scope: Some(&scope),
            jti: None,
            iat: now.as_second(),
            nbf: None,
            exp: expiry(now, JWT_BEARER_LIFETIME)?,
        };
        sign(&header, &claims, &self.key)
    }
}

/// The key an app-only grant signs with.
#[derive(Clone)]
pub enum SigningKey {
    Certificate(CertificateKey),
    ServiceAccount(ServiceAccountKey),
}

impl SigningKey {
    fn fingerprint(&self) -> &[u8; 32] {
        match self {
            SigningKey::Certificate(c) => &c.fingerprint,
            SigningKey::ServiceAccount(s) => &s.fingerprint,
        }
    }
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint() == other.fingerprint()
    }
}

impl Eq for SigningKey {}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SigningKey::Certificate(c) => f
                .debug_struct("Certificate")
                .field("thumbprint", &c.thumbprint_hex())
                .field("algorithm", &c.algorithm)
                .field("key", &"[redacted]")
                .finish(),
            SigningKey::ServiceAccount(s) => f
                .debug_struct("ServiceAccount")
                .field("client_email", &s.client_email)
                .field("key", &"[redacted]")
                .finish(),
        }
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
    aud: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    iat: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
    exp: i64,
}

/// An RSA private key, tried once: `jsonwebtoken` parses the DER only when signing, and a key that
/// cannot sign should be reported when the Secret is read, not at the first token request.
fn rsa_key(pem: &[u8]) -> Result<EncodingKey, KeyProblem> {
    let key = EncodingKey::from_rsa_pem(pem)
        .map_err(|e| KeyProblem::BadPrivateKey(describe(e.kind())))?;
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &Probe { probe: true }, &key)
        .map_err(|e| KeyProblem::BadPrivateKey(describe(e.kind())))?;
    Ok(key)
}

#[derive(Serialize)]
struct Probe {
    probe: bool,
}

/// The error's kind only: none of `jsonwebtoken`'s kinds carries key material, but naming the
/// kind keeps it so whatever the crate adds later.
fn describe(kind: &jsonwebtoken::errors::ErrorKind) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match kind {
        ErrorKind::InvalidKeyFormat => "not an RSA key in a format that can be read".to_owned(),
        ErrorKind::InvalidRsaKey(_) => "the RSA key is malformed or too short".to_owned(),
        ErrorKind::InvalidEcdsaKey => "an EC key, not an RSA key".to_owned(),
        ErrorKind::Base64(_) => "the PEM is not valid base64".to_owned(),
        _ => "the key could not be used".to_owned(),
    }
}

fn sign(header: &Header, claims: &Claims<'_>, key: &EncodingKey) -> Result<SecretValue, String> {
    jsonwebtoken::encode(header, claims, key)
        .map(SecretValue::new)
        .map_err(|e| format!("signing the assertion failed: {}", describe(e.kind())))
}

fn expiry(now: Timestamp, lifetime: SignedDuration) -> Result<i64, String> {
    now.checked_add(lifetime)
        .map(|t| t.as_second())
        .map_err(|_| "the clock is out of range".to_owned())
}

fn jti() -> String {
    let bytes: [u8; 16] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn fingerprint(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

#[cfg(test)]
pub(crate) mod tests;
