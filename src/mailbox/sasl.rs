//! The two SASL mechanisms that carry an OAuth 2.0 bearer token to a mail server.
//!
//! Both strings contain the access token. They are returned as [`SecretValue`] so that they cannot be
//! logged or formatted into an error by accident; the operator also writes them into the token Secret
//! so that workloads can use them as they are.

use base64::{Engine as _, engine::general_purpose::STANDARD};

use crate::secret::SecretValue;

/// A SASL mechanism for OAuth 2.0 bearer tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SaslMechanism {
    /// Google's and Microsoft's `XOAUTH2` (offered by Gmail, Outlook/Microsoft 365, Dovecot).
    #[default]
    XOAuth2,
    /// `OAUTHBEARER`, RFC 7628 (offered by Gmail and Dovecot; not by Microsoft).
    OAuthBearer,
}

impl SaslMechanism {
    /// The mechanism's name on the wire (`XOAUTH2`, `OAUTHBEARER`).
    pub fn name(self) -> &'static str {
        match self {
            Self::XOAuth2 => "XOAUTH2",
            Self::OAuthBearer => "OAUTHBEARER",
        }
    }

    /// The client's first message, not yet base64-encoded.
    pub(crate) fn initial_response(
        self,
        user: &str,
        host: &str,
        port: u16,
        token: &SecretValue,
    ) -> SecretValue {
        match self {
            Self::XOAuth2 => xoauth2_raw(user, token),
            Self::OAuthBearer => oauthbearer_raw(user, host, port, token),
        }
    }

    /// What the client answers to an error challenge so that the server can finish the exchange with
    /// its failure reply: an empty response for XOAUTH2, a single `%x01` for OAUTHBEARER (RFC 7628 §3.2.3).
    pub(crate) fn failure_ack(self) -> &'static [u8] {
        match self {
            Self::XOAuth2 => b"",
            Self::OAuthBearer => b"\x01",
        }
    }
}

impl std::fmt::Display for SaslMechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn xoauth2_raw(user: &str, token: &SecretValue) -> SecretValue {
    SecretValue::new(format!(
        "user={user}\x01auth=Bearer {}\x01\x01",
        token.expose()
    ))
}

fn oauthbearer_raw(user: &str, host: &str, port: u16, token: &SecretValue) -> SecretValue {
    SecretValue::new(format!(
        "n,a={},\x01host={host}\x01port={port}\x01auth=Bearer {}\x01\x01",
        gs2_escape(user),
        token.expose()
    ))
}

/// RFC 5801 §4: in the GS2 header's authzid, `=` is written `=3D` and `,` is written `=2C`.
fn gs2_escape(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

/// The XOAUTH2 string as sent on the wire:
/// `base64("user=" + user + "\x01auth=Bearer " + token + "\x01\x01")`.
pub fn xoauth2(user: &str, token: &SecretValue) -> SecretValue {
    SecretValue::new(STANDARD.encode(xoauth2_raw(user, token).expose()))
}

/// The OAUTHBEARER (RFC 7628) string as sent on the wire:
/// `base64("n,a=" + user + ",\x01host=" + host + "\x01port=" + port + "\x01auth=Bearer " + token + "\x01\x01")`.
pub fn oauthbearer(user: &str, host: &str, port: u16, token: &SecretValue) -> SecretValue {
    SecretValue::new(STANDARD.encode(oauthbearer_raw(user, host, port, token).expose()))
}

/// Base64 of a raw SASL message, for the protocols that need it encoded by the caller.
pub(crate) fn encode(raw: &[u8]) -> String {
    STANDARD.encode(raw)
}

/// The server's error challenge (base64 JSON such as `{"status":"invalid_token"}`), decoded for a
/// condition message. It holds no token; it is still cut to a sane length and stripped of control
/// characters because it comes from the network. Public for the property tests.
pub fn decode_challenge(base64_text: &str) -> String {
    let text = base64_text.trim();
    match STANDARD.decode(text) {
        Ok(bytes) => printable(&String::from_utf8_lossy(&bytes)),
        Err(_) => format!("undecodable challenge ({} characters)", text.len()),
    }
}

/// Server text made safe for a status message ([`crate::reason::outside_text`]): control characters
/// made spaces, at most 512 characters.
/// Public for the property tests.
pub fn printable(text: &str) -> String {
    crate::reason::outside_text(text, 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(s: &SecretValue) -> String {
        String::from_utf8(STANDARD.decode(s.expose()).unwrap()).unwrap()
    }

    #[test]
    fn xoauth2_matches_the_documented_format() {
        let token = SecretValue::new("ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg");
        let s = xoauth2("someuser@example.com", &token);
        assert_eq!(
            decode(&s),
            "user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"
        );
        // Google's documented example of the encoded form.
        assert_eq!(
            s.expose(),
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
        );
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{s:?}"), "[redacted]");
    }

    #[test]
    fn oauthbearer_matches_rfc7628() {
        let token = SecretValue::new("vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==");
        let s = oauthbearer("user@example.com", "server.example.com", 143, &token);
        // RFC 7628 §4.1 example.
        assert_eq!(
            decode(&s),
            "n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
        );
        assert_eq!(
            s.expose(),
            "bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9MTQzAWF1dGg9QmVhcmVyIHZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB"
        );
    }

    #[test]
    fn oauthbearer_escapes_the_authzid() {
        let s = oauthbearer("a,b=c", "h", 1, &SecretValue::new("t"));
        assert!(decode(&s).starts_with("n,a=a=2Cb=3Dc,\x01"));
    }

    #[test]
    fn challenges_are_decoded_and_sanitised() {
        assert_eq!(
            decode_challenge("eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0="),
            r#"{"status":"invalid_token"}"#
        );
        assert_eq!(
            decode_challenge("not base64!"),
            "undecodable challenge (11 characters)"
        );
        // The one rule for outside text (crate::reason::outside_text): controls become spaces.
        assert_eq!(printable("a\r\nb\x01c"), "a  b c");
        assert_eq!(printable(&"x".repeat(2000)).chars().count(), 512);
    }

    #[test]
    fn printable_text_has_no_edge_spaces_left_by_removed_controls() {
        // Found by tests/properties.rs: the text was trimmed before its control characters went.
        assert_eq!(printable("\0 !"), "!");
        assert_eq!(printable("-ERR bad \x01"), "-ERR bad");
        assert_eq!(
            printable(&printable("\x1b x \r\n")),
            printable("\x1b x \r\n")
        );
    }
}
