//! Who an app may send as: the envelope sender (`MAIL FROM`) and the `From:` and `Sender:` headers
//! must each be the integration's mailbox or an address of the app's `sendAs`
//! ([`GatewayAppConfig::may_send_as`]); anything else is refused with `550 5.7.1` naming the allowed
//! addresses, before the message goes to the provider.
//!
//! The header block is parsed with mail-parser (Stalwart's RFC 5322 parser: groups, comments,
//! encoded words, folding). On top of it the check is strict, so that a header the gateway reads one
//! way cannot reach the provider read another way: exactly one `From:`, at most one `Sender:`,
//! every address of a list allowed (one foreign address refuses the message), and the raw header
//! names are counted independently of the parser (a `From :` the parser would not see, or a line
//! that is no header field at all before the blank line, refuses the message).

use mail_parser::{Address, HeaderName, HeaderValue, MessageParser};

use crate::gateway::config::GatewayAppConfig;

/// How much of the allowed list a refusal names before "and N more" (a reply line stays well under
/// RFC 5321's 512 octets).
const LISTED_CHARS: usize = 240;

/// The addresses the app may send as, for a refusal: `a@x, b@y and 3 more`.
pub fn allowed_list(app: &GatewayAppConfig, mailbox: &str) -> String {
    let all: Vec<&str> = std::iter::once(mailbox)
        .chain(
            app.send_as
                .iter()
                .map(String::as_str)
                .filter(|a| !a.eq_ignore_ascii_case(mailbox)),
        )
        .collect();
    let mut out = String::new();
    let mut listed: usize = 0;
    for address in &all {
        let address = crate::reason::outside_text(address, 254);
        if !out.is_empty() && out.len().saturating_add(address.len()) > LISTED_CHARS {
            break;
        }
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(&address);
        listed = listed.saturating_add(1);
    }
    if listed < all.len() {
        out.push_str(&format!(" and {} more", all.len().saturating_sub(listed)));
    }
    out
}

fn refusal(app: &GatewayAppConfig, mailbox: &str, what: &str) -> String {
    format!(
        "550 5.7.1 {what}: app {} may send only as {} (spec.gateway.apps[].sendAs)",
        crate::reason::outside_text(&app.name, 64),
        allowed_list(app, mailbox)
    )
}

/// Check the envelope sender of `MAIL FROM`; `Err` is the reply line.
pub fn check_envelope(app: &GatewayAppConfig, mailbox: &str, address: &str) -> Result<(), String> {
    if address.is_empty() {
        return Err(refusal(app, mailbox, "The null sender <> is not allowed"));
    }
    if app.may_send_as(mailbox, address) {
        Ok(())
    } else {
        Err(refusal(
            app,
            mailbox,
            &format!(
                "Sender <{}> is not allowed",
                crate::reason::outside_text(address, 254)
            ),
        ))
    }
}

/// Check the `From:` and `Sender:` headers of a message's header block (the lines before the first
/// empty line, dot-unstuffed, CRLF-ended); `Err` is the reply line.
pub fn check_headers(
    app: &GatewayAppConfig,
    mailbox: &str,
    header_block: &[u8],
) -> Result<(), String> {
    let raw = raw_counts(header_block).map_err(|line| {
        format!("554 5.6.0 Line {line} of the message header is not a header field (name: value)")
    })?;
    let unreadable = |name: &str| {
        format!(
            "554 5.6.0 The {name}: header cannot be read as a list of addresses; nothing was sent"
        )
    };
    if raw.from != 1 {
        return Err(format!(
            "554 5.6.0 The message has {} From: headers; exactly one is required (RFC 5322 §3.6)",
            raw.from
        ));
    }
    if raw.sender > 1 {
        return Err(format!(
            "554 5.6.0 The message has {} Sender: headers; at most one is allowed (RFC 5322 §3.6)",
            raw.sender
        ));
    }
    let message = MessageParser::new()
        .parse_headers(header_block)
        .ok_or_else(|| unreadable("From"))?;
    for (name, header, expected) in [
        ("From", HeaderName::From, raw.from),
        ("Sender", HeaderName::Sender, raw.sender),
    ] {
        let values: Vec<&HeaderValue<'_>> = message.header_values(header).collect();
        if values.len() != expected {
            return Err(unreadable(name));
        }
        for value in values {
            let addresses = addresses(value).ok_or_else(|| unreadable(name))?;
            if addresses.is_empty() {
                return Err(unreadable(name));
            }
            for (address, display) in addresses {
                let address = address.ok_or_else(|| unreadable(name))?;
                if !plausible(address) {
                    return Err(unreadable(name));
                }
                // A display name (or group name, or comment) that reads like an address is what a
                // reader sees: it must be allowed too ("ceo@example.com" <box@example.com>).
                let shown = display
                    .iter()
                    .flat_map(|d| address_like(d))
                    .find(|a| !app.may_send_as(mailbox, a));
                if let Some(shown) = shown {
                    return Err(refusal(
                        app,
                        mailbox,
                        &format!(
                            "{name}: the display name shows {}, which is not allowed",
                            crate::reason::outside_text(shown, 254)
                        ),
                    ));
                }
                if !app.may_send_as(mailbox, address) {
                    return Err(refusal(
                        app,
                        mailbox,
                        &format!(
                            "{name}: {} is not allowed",
                            crate::reason::outside_text(address, 254)
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Every address of a header value (`None` for a member without one), with the texts shown beside
/// it (its display name, its group's name).
type Member<'a> = (Option<&'a str>, Vec<&'a str>);

fn addresses<'a>(value: &'a HeaderValue<'_>) -> Option<Vec<Member<'a>>> {
    match value {
        HeaderValue::Address(Address::List(list)) => Some(
            list.iter()
                .map(|a| {
                    (
                        a.address.as_deref(),
                        a.name.as_deref().into_iter().collect(),
                    )
                })
                .collect(),
        ),
        HeaderValue::Address(Address::Group(groups)) => Some(
            groups
                .iter()
                .flat_map(|g| {
                    // An empty group is a member without an address: refused as unreadable.
                    let empty = g
                        .addresses
                        .is_empty()
                        .then(|| (None, g.name.as_deref().into_iter().collect()));
                    g.addresses
                        .iter()
                        .map(move |a| {
                            let shown = a.name.as_deref().into_iter().chain(g.name.as_deref());
                            (a.address.as_deref(), shown.collect())
                        })
                        .chain(empty)
                })
                .collect(),
        ),
        _ => None,
    }
}

/// The words of a display text that read like an address (`x@y`), without the punctuation around.
fn address_like(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| c.is_whitespace() || "<>\"'(),;:[]".contains(c))
        .filter(|w| w.contains('@'))
}

/// One `@`, something on each side, no space or control character.
fn plausible(address: &str) -> bool {
    let mut parts = address.rsplitn(2, '@');
    let (Some(domain), Some(local)) = (parts.next(), parts.next()) else {
        return false;
    };
    !domain.is_empty()
        && !local.is_empty()
        && !domain.contains('@')
        && !address.chars().any(|c| c.is_whitespace() || c.is_control())
}

struct RawCounts {
    from: usize,
    sender: usize,
}

/// Count `From`/`Sender` fields by their raw names (case-insensitive, white space before the colon
/// ignored, as RFC 5322's obsolete syntax allows); `Err` is the 1-based number of a line that is
/// neither a field nor a continuation.
fn raw_counts(header_block: &[u8]) -> Result<RawCounts, usize> {
    let mut counts = RawCounts { from: 0, sender: 0 };
    for (n, line) in header_block.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            // The split leaves one empty piece after the last CRLF.
            continue;
        }
        if matches!(line.first(), Some(b' ' | b'\t')) {
            if n == 0 {
                return Err(1);
            }
            continue;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            return Err(n.saturating_add(1));
        };
        let name = line.get(..colon).unwrap_or_default().trim_ascii_end();
        if name.is_empty() || !name.iter().all(|b| (33..=126).contains(b)) {
            return Err(n.saturating_add(1));
        }
        if name.eq_ignore_ascii_case(b"from") {
            counts.from = counts.from.saturating_add(1);
        } else if name.eq_ignore_ascii_case(b"sender") {
            counts.sender = counts.sender.saturating_add(1);
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAILBOX: &str = "box@example.com";

    fn app() -> GatewayAppConfig {
        GatewayAppConfig {
            name: "alertmanager".into(),
            username: "ns/mi/alertmanager".into(),
            protocols: vec![],
            send_as: vec!["alerts@example.com".into()],
            verifiers: vec![],
        }
    }

    fn headers(text: &str) -> Result<(), String> {
        check_headers(&app(), MAILBOX, text.replace('\n', "\r\n").as_bytes())
    }

    #[test]
    fn the_envelope_sender_must_be_the_mailbox_or_a_send_as_address() {
        assert!(check_envelope(&app(), MAILBOX, "Box@Example.com").is_ok());
        assert!(check_envelope(&app(), MAILBOX, "alerts@example.com").is_ok());
        let e = check_envelope(&app(), MAILBOX, "ceo@example.com").unwrap_err();
        assert!(
            e.starts_with("550 5.7.1 Sender <ceo@example.com> is not allowed"),
            "{e}"
        );
        assert!(e.contains("box@example.com, alerts@example.com"), "{e}");
        assert!(
            check_envelope(&app(), MAILBOX, "")
                .unwrap_err()
                .starts_with("550 5.7.1")
        );
    }

    #[test]
    fn from_and_sender_headers_are_checked_strictly() {
        assert_eq!(headers("From: Box <box@example.com>\nSubject: x\n"), Ok(()));
        assert_eq!(
            headers("From: \"Alerts\" <alerts@example.com>\nSender: box@example.com\n"),
            Ok(())
        );
        assert_eq!(headers("FROM : alerts@example.com\n"), Ok(()));
        assert_eq!(
            headers("From: \"Alerts (alerts@example.com)\" <box@example.com>\n"),
            Ok(())
        );
        assert_eq!(
            headers("From: =?utf-8?q?Grafana?= <alerts@example.com>\n"),
            Ok(())
        );
        // A foreign address, alone, in a list, in a group, in Sender:.
        for bad in [
            "From: ceo@example.com\n",
            "From: box@example.com, ceo@example.com\n",
            "From: team: box@example.com, ceo@example.com;\n",
            "From: box@example.com\nSender: ceo@example.com\n",
            "From: \"box@example.com\" <ceo@example.com>\n",
            "From: box@example.com\n (folded)\nSender:\n ceo@example.com\n",
            "From: \"ceo@example.com\" <box@example.com>\n",
            "From: ceo@example.com: box@example.com;\n",
            "From: box@example.com (ceo@example.com)\n",
            "From: =?utf-8?q?ceo=40example.com?= <box@example.com>\n",
        ] {
            let e = headers(bad).unwrap_err();
            assert!(e.starts_with("550 5.7.1 "), "{bad}: {e}");
            assert!(e.contains("ceo@example.com"), "{bad}: {e}");
        }
        // Ambiguous or missing.
        for bad in [
            "Subject: no from\n",
            "From: box@example.com\nFrom: box@example.com\n",
            "From: box@example.com\nSender: box@example.com\nsender: box@example.com\n",
            "From: \n",
            "From: not an address\n",
            "garbage line\nFrom: box@example.com\n",
            "From: box@example.com\nSender: ceo@example.com: ;\n",
            "From: box@example.com\nSender: x: ; box@example.com\n",
            " continuation first\nFrom: box@example.com\n",
        ] {
            let e = headers(bad).unwrap_err();
            assert!(e.starts_with("554 5.6.0 "), "{bad}: {e}");
        }
    }

    #[test]
    fn a_long_allowed_list_is_cut() {
        let mut app = app();
        app.send_as = (0..32)
            .map(|i| format!("sender-{i:02}@example.com"))
            .collect();
        let list = allowed_list(&app, MAILBOX);
        assert!(list.len() < LISTED_CHARS + 40, "{list}");
        assert!(list.ends_with(" more"), "{list}");
    }
}
