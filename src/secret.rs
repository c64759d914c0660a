//! Credentials wrapped so that they cannot be logged, formatted into an error or a status by accident:
//! `Debug` and `Display` print `[redacted]`; the value comes out only through [`SecretValue::expose`].

use std::fmt;

/// A credential (client secret, refresh token, access token, authorization code, PKCE verifier).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SecretValue(String);

impl SecretValue {
    /// Wrap a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The credential itself, for the one place that must send or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the credential is empty (an empty Secret value counts as missing).
    pub fn is_empty(&self) -> bool {
        self.0.trim().is_empty()
    }

    /// Parse Secret data bytes; `None` when not UTF-8.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        std::str::from_utf8(bytes)
            .ok()
            .map(|s| Self(s.trim_end_matches(['\r', '\n']).to_owned()))
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for SecretValue {
    fn from(value: String) -> Self {
        Self(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = SecretValue::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some([redacted])");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn from_bytes_trims_trailing_newline_and_rejects_non_utf8() {
        assert_eq!(SecretValue::from_bytes(b"abc\n").unwrap().expose(), "abc");
        assert!(SecretValue::from_bytes(&[0xff, 0xfe]).is_none());
        assert!(SecretValue::from_bytes(b"  ").unwrap().is_empty());
    }
}
