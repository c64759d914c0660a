//! The client's commands, parsed with smtp-proto (Stalwart's RFC 5321 parser), and the two SASL
//! mechanisms the gateway offers its clients (PLAIN, RFC 4616; LOGIN), decoded here by hand: they are
//! a base64 decode and a split at NUL, and the parser crates that exist for them bring whole SASL
//! frameworks (server-side SCRAM, GSSAPI) the gateway does not offer.

use std::borrow::Cow;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use smtp_proto::{
    AUTH_LOGIN, AUTH_PLAIN, Error as ParseError, MAIL_BODY_7BIT, MAIL_BODY_8BITMIME, Request,
};

use crate::secret::SecretValue;

/// A client command the gateway acts on.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Ehlo {
        host: String,
    },
    Helo {
        host: String,
    },
    StartTls,
    /// `AUTH <mechanism> [initial-response]`; the response stays base64 here.
    Auth {
        mechanism: Mechanism,
        initial: Option<String>,
    },
    Mail(MailFrom),
    Rcpt {
        to: String,
    },
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    /// BDAT (CHUNKING is not offered), ETRN, ATRN, EXPN, BURL, LHLO: known, not offered.
    NotOffered(&'static str),
}

/// The SASL mechanisms offered to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
    /// Any other mechanism (refused with 504).
    Other,
}

/// `MAIL FROM` with the parameters the gateway knows.
#[derive(Debug, PartialEq, Eq)]
pub struct MailFrom {
    /// The reverse path; empty for the null sender `<>`.
    pub address: String,
    /// `SIZE=`, when given.
    pub size: Option<u64>,
    /// `BODY=8BITMIME`.
    pub eight_bit: bool,
    /// A parameter the gateway does not offer (SMTPUTF8, RET, ENVID, BODY=BINARYMIME, ...).
    pub unsupported: Option<&'static str>,
}

/// Why a line is not a command the gateway takes; each is a 5xx reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Unknown,
    Syntax(&'static str),
    BadAddress,
    Parameter(String),
}

impl Refused {
    /// The reply line (without CRLF).
    pub fn reply(&self) -> String {
        match self {
            Refused::Unknown => "500 5.5.2 Command not recognised".into(),
            Refused::Syntax(syntax) => format!("501 5.5.4 Syntax: {syntax}"),
            Refused::BadAddress => "553 5.1.7 The address is not a valid mailbox".into(),
            Refused::Parameter(p) => format!(
                "555 5.5.4 Parameter {} is not supported",
                crate::reason::outside_text(p, 64)
            ),
        }
    }
}

/// Parse one command line (without its line end).
pub fn parse(line: &[u8]) -> Result<Command, Refused> {
    // smtp-proto reads up to the LF; the line's own end was removed by the line reader.
    let mut bytes = Vec::with_capacity(line.len().saturating_add(2));
    bytes.extend_from_slice(line);
    bytes.extend_from_slice(b"\r\n");
    let request = Request::parse(&mut bytes.iter()).map_err(|e| match e {
        ParseError::UnknownCommand => Refused::Unknown,
        ParseError::InvalidSenderAddress | ParseError::InvalidRecipientAddress => {
            Refused::BadAddress
        }
        ParseError::SyntaxError { syntax } => Refused::Syntax(syntax),
        ParseError::InvalidParameter { param } => Refused::Parameter(param.to_owned()),
        ParseError::UnsupportedParameter { param } => Refused::Parameter(param),
        ParseError::NeedsMoreData { .. }
        | ParseError::ResponseTooLong
        | ParseError::InvalidResponse { .. } => Refused::Syntax("a command line"),
    })?;
    Ok(match request {
        Request::Ehlo { host } => Command::Ehlo { host: text(host) },
        Request::Helo { host } => Command::Helo { host: text(host) },
        Request::StartTls => Command::StartTls,
        Request::Auth {
            mechanism,
            initial_response,
        } => Command::Auth {
            mechanism: match mechanism {
                AUTH_PLAIN => Mechanism::Plain,
                AUTH_LOGIN => Mechanism::Login,
                _ => Mechanism::Other,
            },
            initial: (!initial_response.is_empty()).then(|| text(initial_response)),
        },
        Request::Mail { from } => Command::Mail(MailFrom {
            unsupported: unsupported_mail_parameter(&from),
            size: (from.size != 0).then_some(from.size as u64),
            eight_bit: from.flags & MAIL_BODY_8BITMIME != 0,
            address: text(from.address),
        }),
        Request::Rcpt { to } => {
            if to.orcpt.is_some() || to.flags != 0 || to.rrvs != 0 {
                return Err(Refused::Parameter("NOTIFY/ORCPT/RRVS".into()));
            }
            Command::Rcpt {
                to: text(to.address),
            }
        }
        Request::Data => Command::Data,
        Request::Rset => Command::Rset,
        Request::Noop { .. } => Command::Noop,
        Request::Quit => Command::Quit,
        Request::Vrfy { .. } => Command::Vrfy,
        Request::Help { .. } => Command::Help,
        other => Command::NotOffered(other.name()),
    })
}

fn text(s: Cow<'_, str>) -> String {
    s.into_owned()
}

/// The first `MAIL FROM` parameter the gateway does not offer (EHLO names SIZE, and 8BITMIME when
/// the upstream has it; nothing else).
fn unsupported_mail_parameter(from: &smtp_proto::MailFrom<Cow<'_, str>>) -> Option<&'static str> {
    let known = MAIL_BODY_7BIT | MAIL_BODY_8BITMIME;
    if from.flags & !known != 0 {
        return Some("(BODY=BINARYMIME, SMTPUTF8, RET, REQUIRETLS, BY or CONPERM)");
    }
    if from.env_id.is_some() {
        return Some("ENVID");
    }
    if from.trans_id.is_some() || from.solicit.is_some() || from.mtrk.is_some() {
        return Some("(TRANSID, SOLICIT or MTRK)");
    }
    if from.auth.is_some() {
        return Some("AUTH");
    }
    if from.hold_for != 0 || from.hold_until != 0 || from.by != 0 || from.mt_priority != 0 {
        return Some("(HOLDFOR, HOLDUNTIL, BY or MT-PRIORITY)");
    }
    None
}

/// A decoded `AUTH PLAIN` message (RFC 4616): `[authzid] NUL authcid NUL passwd`.
#[derive(Debug)]
pub struct Credentials {
    pub username: String,
    pub password: SecretValue,
}

/// Why a SASL message was refused (501 5.5.2).
#[derive(Debug, PartialEq, Eq)]
pub enum SaslRefused {
    /// The client sent `*` (RFC 4954 §4: cancel).
    Cancelled,
    NotBase64,
    Malformed,
}

/// Decode a client's base64 SASL line.
pub fn decode(line: &str) -> Result<Vec<u8>, SaslRefused> {
    let line = line.trim();
    if line == "*" {
        return Err(SaslRefused::Cancelled);
    }
    if line == "=" {
        // RFC 4954 §4: an empty initial response.
        return Ok(Vec::new());
    }
    STANDARD.decode(line).map_err(|_| SaslRefused::NotBase64)
}

/// Split a decoded PLAIN message. An authorization identity other than the authentication identity
/// is refused: an app acts only as itself.
pub fn plain(message: &[u8]) -> Result<Credentials, SaslRefused> {
    let mut parts = message.split(|b| *b == 0);
    let (Some(authzid), Some(authcid), Some(passwd), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslRefused::Malformed);
    };
    let username = String::from_utf8(authcid.to_vec()).map_err(|_| SaslRefused::Malformed)?;
    if username.is_empty() || !(authzid.is_empty() || authzid == authcid) {
        return Err(SaslRefused::Malformed);
    }
    let password = String::from_utf8(passwd.to_vec()).map_err(|_| SaslRefused::Malformed)?;
    Ok(Credentials {
        username,
        password: SecretValue::new(password),
    })
}

/// A decoded LOGIN user name or password (UTF-8, no NUL).
pub fn login_field(message: Vec<u8>) -> Result<String, SaslRefused> {
    if message.contains(&0) {
        return Err(SaslRefused::Malformed);
    }
    String::from_utf8(message).map_err(|_| SaslRefused::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_parsed_by_smtp_proto() {
        assert_eq!(
            parse(b"EHLO client.example").unwrap(),
            Command::Ehlo {
                host: "client.example".into()
            }
        );
        assert_eq!(
            parse(b"AUTH PLAIN AGJveABwdw==").unwrap(),
            Command::Auth {
                mechanism: Mechanism::Plain,
                initial: Some("AGJveABwdw==".into())
            }
        );
        assert_eq!(
            parse(b"auth login").unwrap(),
            Command::Auth {
                mechanism: Mechanism::Login,
                initial: None
            }
        );
        assert_eq!(
            parse(b"AUTH CRAM-MD5").unwrap(),
            Command::Auth {
                mechanism: Mechanism::Other,
                initial: None
            }
        );
        assert_eq!(
            parse(b"MAIL FROM:<box@example.com> SIZE=1000 BODY=8BITMIME").unwrap(),
            Command::Mail(MailFrom {
                address: "box@example.com".into(),
                size: Some(1000),
                eight_bit: true,
                unsupported: None
            })
        );
        assert_eq!(
            parse(b"MAIL FROM:<> ").unwrap(),
            Command::Mail(MailFrom {
                address: "".into(),
                size: None,
                eight_bit: false,
                unsupported: None
            })
        );
        let Command::Mail(m) = parse(b"MAIL FROM:<a@b> SMTPUTF8").unwrap() else {
            panic!()
        };
        assert!(m.unsupported.is_some());
        assert_eq!(
            parse(b"RCPT TO:<x@y.example>").unwrap(),
            Command::Rcpt {
                to: "x@y.example".into()
            }
        );
        assert!(parse(b"RCPT TO:<x@y> NOTIFY=NEVER").is_err());
        assert_eq!(parse(b"BDAT 10 LAST").unwrap(), Command::NotOffered("BDAT"));
        assert_eq!(parse(b"XYZZY").unwrap_err(), Refused::Unknown);
        assert!(matches!(
            parse(b"MAIL FROM:box@example.com").unwrap_err(),
            Refused::Syntax(_)
        ));
    }

    #[test]
    fn plain_and_login_messages() {
        let c = plain(b"\0ns/mi/app\0secret").unwrap();
        assert_eq!(c.username, "ns/mi/app");
        assert_eq!(c.password.expose(), "secret");
        assert!(plain(b"ns/mi/app\0ns/mi/app\0secret").is_ok());
        assert!(plain(b"other\0ns/mi/app\0secret").is_err());
        assert!(plain(b"\0\0secret").is_err());
        assert!(plain(b"\0a\0b\0c").is_err());
        assert!(plain(b"no nul").is_err());
        assert_eq!(decode("*").unwrap_err(), SaslRefused::Cancelled);
        assert_eq!(decode("=").unwrap(), b"");
        assert_eq!(decode("!!").unwrap_err(), SaslRefused::NotBase64);
        assert_eq!(login_field(b"user".to_vec()).unwrap(), "user");
        assert!(login_field(b"a\0b".to_vec()).is_err());
    }
}
