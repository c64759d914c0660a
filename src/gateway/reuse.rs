//! Reuse of authenticated upstream IMAP sessions, per credential: the decisions (pure).
//!
//! Apps that poll (help desks, fetchmail, cron jobs) log in, fetch and log out again and again;
//! each cycle costs the mail server a login (Gmail and Microsoft throttle logins and cap
//! connections per mailbox). When the gateway answers an app's LOGOUT itself
//! ([`super::logout`]), the upstream session it relayed is still logged in; instead of logging it
//! out, the gateway may park it ([`super::parked`]) for the same credential's next login, as
//! UP-ImapProxy does for webmail.
//!
//! A parked session must look to its next app exactly like a fresh login. So only sessions whose
//! every command is on [`RESET_SAFE`] are parked: commands that leave nothing behind in the
//! authenticated state but a selected mailbox, which the gateway ends with UNSELECT before parking
//! (and only when the server advertised UNSELECT at its login). Anything that changes the
//! session for its remaining life is never parked: ENABLE (CONDSTORE, QRESYNC, UTF8=ACCEPT),
//! COMPRESS, NOTIFY, LANGUAGE, anything unknown, and the arguments that enable CONDSTORE
//! implicitly (RFC 7162 3.1: `SELECT … (CONDSTORE)`, `FETCH … (MODSEQ)`, `CHANGEDSINCE`,
//! `UNCHANGEDSINCE`, `SEARCH MODSEQ`, `STATUS … (HIGHESTMODSEQ)`), which are looked for in the
//! whole first line of every command. A command with a literal other than APPEND's message has
//! arguments after the literal the watch does not see: not reset-safe.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use sha2::{Digest, Sha256};

use super::session::Entry;

/// Commands after which an authenticated session is as a fresh one, but for the selected mailbox
/// (`UID` is followed by its subcommand, which must be one of these too).
pub const RESET_SAFE: &[&str] = &[
    "CAPABILITY",
    "NOOP",
    "CHECK",
    "SELECT",
    "EXAMINE",
    "CLOSE",
    "UNSELECT",
    "LIST",
    "LSUB",
    "STATUS",
    "NAMESPACE",
    "FETCH",
    "STORE",
    "SEARCH",
    "SORT",
    "THREAD",
    "COPY",
    "MOVE",
    "EXPUNGE",
    "APPEND",
    "CREATE",
    "DELETE",
    "RENAME",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "IDLE",
    "GETQUOTA",
    "GETQUOTAROOT",
    "ID",
];

/// Words in a command's arguments that enable CONDSTORE for the rest of the session (RFC 7162
/// 3.1): `CHANGEDSINCE` also matches `UNCHANGEDSINCE`, `MODSEQ` also `HIGHESTMODSEQ`.
const STATEFUL_ARGUMENTS: &[&str] = &["CONDSTORE", "MODSEQ", "CHANGEDSINCE", "QRESYNC"];

/// What one command of the app does to the session's reusability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Reset-safe, and leaves the selection as it was.
    Safe,
    /// Reset-safe, and may leave a mailbox selected (SELECT, EXAMINE).
    Selects,
    /// Reset-safe, and leaves no mailbox selected (CLOSE, UNSELECT).
    Unselects,
    /// Not reset-safe: the session is never parked.
    Unsafe,
}

fn contains_word(haystack: &[u8], word: &str) -> bool {
    let word = word.as_bytes();
    haystack
        .windows(word.len())
        .any(|w| w.eq_ignore_ascii_case(word))
}

/// The effect of a command whose first line is `line` (with its CRLF if it ended; a line that
/// did not end within what the watch keeps is not reset-safe). `literal`: the command went on
/// with a literal after this line.
pub fn effect(line: &[u8], literal: bool) -> Effect {
    // A line that ends in a bare LF may be two commands to one server and one to another: not
    // reset-safe.
    let Some(body) = line.strip_suffix(b"\r\n") else {
        return Effect::Unsafe;
    };
    let mut words = body.split(|b| *b == b' ');
    let _tag = words.next();
    let Some(mut name) = words.next() else {
        return Effect::Unsafe;
    };
    if name.eq_ignore_ascii_case(b"UID") {
        let Some(sub) = words.next() else {
            return Effect::Unsafe;
        };
        name = sub;
    }
    let Some(known) = RESET_SAFE
        .iter()
        .find(|c| name.eq_ignore_ascii_case(c.as_bytes()))
    else {
        return Effect::Unsafe;
    };
    if literal && *known != "APPEND" {
        return Effect::Unsafe;
    }
    if STATEFUL_ARGUMENTS.iter().any(|w| contains_word(body, w)) {
        return Effect::Unsafe;
    }
    match *known {
        "SELECT" | "EXAMINE" => Effect::Selects,
        "CLOSE" | "UNSELECT" => Effect::Unselects,
        _ => Effect::Safe,
    }
}

/// What the app's commands have done to the session so far (fed by [`super::logout::LogoutWatch`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reset {
    /// A command that is not reset-safe was sent (or the server said BYE, or the watch could not
    /// follow the session).
    pub tainted: bool,
    /// A mailbox may be selected: a SELECT or EXAMINE was sent and no CLOSE or UNSELECT sent after
    /// it was answered OK.
    pub maybe_selected: bool,
    /// SELECTs and EXAMINEs sent.
    selects: u64,
}

impl Reset {
    /// Follow one command (its first line, and whether a literal followed it). For a CLOSE or
    /// UNSELECT, the mark to give [`Self::unselected`] when the server answers it OK: it
    /// unselects only then (a server without UNSELECT answers BAD and the mailbox stays selected).
    pub fn command(&mut self, line: &[u8], literal: bool) -> Option<u64> {
        match effect(line, literal) {
            Effect::Safe => None,
            Effect::Selects => {
                self.maybe_selected = true;
                self.selects = self.selects.wrapping_add(1);
                None
            }
            Effect::Unselects => Some(self.selects),
            Effect::Unsafe => {
                self.tainted = true;
                None
            }
        }
    }

    /// The CLOSE or UNSELECT of `mark` was answered OK: no mailbox is selected, unless a SELECT
    /// or EXAMINE was sent after it.
    pub fn unselected(&mut self, mark: u64) {
        if mark == self.selects {
            self.maybe_selected = false;
        }
    }

    /// Never to be parked.
    pub fn taint(&mut self) {
        self.tainted = true;
    }
}

/// Everything the decision to park a session looks at, when the app's LOGOUT came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParkInput {
    /// Reuse is on (`--imap-reuse-idle` not 0) and the gateway is not shutting down.
    pub enabled: bool,
    /// The gateway answered the LOGOUT itself (nothing outstanding, no literal or IDLE running).
    pub answered_here: bool,
    /// The session's credential was revoked.
    pub revoked: bool,
    /// What the app's commands did.
    pub reset: Reset,
    /// The server listed UNSELECT in its capabilities at login.
    pub unselect_offered: bool,
    /// The access token the session authenticated with is the integration's current one and not
    /// within [`TOKEN_MARGIN`] of its expiry.
    pub token_fresh: bool,
}

/// What to do with the upstream session after the app's LOGOUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Park it as it is.
    Park,
    /// Send UNSELECT; park on its tagged OK, else log out.
    UnselectThenPark,
    /// Log it out upstream (the reason, a metrics label).
    LogOut(&'static str),
}

/// The park decision (pure): a session is parked only when every rule holds.
pub fn decide(input: ParkInput) -> Decision {
    if !input.enabled {
        return Decision::LogOut("off");
    }
    if !input.answered_here {
        return Decision::LogOut("logout_relayed");
    }
    if input.revoked {
        return Decision::LogOut("revoked");
    }
    if input.reset.tainted {
        return Decision::LogOut("command");
    }
    if !input.token_fresh {
        return Decision::LogOut("token");
    }
    if input.reset.maybe_selected {
        if !input.unselect_offered {
            return Decision::LogOut("no_unselect");
        }
        return Decision::UnselectThenPark;
    }
    Decision::Park
}

/// A parked session is not handed out (nor parked) within this of its token's expiry: Microsoft
/// ends sessions whose token expired (`BYE ... AccessTokenExpired`).
pub const TOKEN_MARGIN: Duration = Duration::from_secs(5 * 60);

/// How long before the token's expiry (less [`TOKEN_MARGIN`]) a session may stay parked: `None`
/// when no time is left; `Some(Duration::MAX)` without a known expiry.
pub fn token_time_left(expiry: Option<Timestamp>, now: Timestamp) -> Option<Duration> {
    let Some(expiry) = expiry else {
        return Some(Duration::MAX);
    };
    let margin = SignedDuration::try_from(TOKEN_MARGIN).ok()?;
    let left = expiry.duration_since(now).checked_sub(margin)?;
    Duration::try_from(left).ok().filter(|d| !d.is_zero())
}

/// What an upstream session was authenticated with and to, as a digest: the access token, the
/// integration (uid), the mailbox, the mechanism, the IMAP server and its CA. A parked session
/// goes only to a login whose entry gives the same digest. The token is not kept, only this
/// (salted per process, so the digest is no token verifier outside it).
pub fn fingerprint(entry: &Entry, salt: &[u8]) -> [u8; 32] {
    let config = &entry.config;
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(salt);
    field(entry.access_token.expose().as_bytes());
    field(config.uid.as_bytes());
    field(config.namespace.as_bytes());
    field(config.integration.as_bytes());
    field(config.mailbox.as_bytes());
    field(format!("{:?}", config.mechanism).as_bytes());
    match &config.imap {
        Some(s) => field(format!("{}:{}:{:?}", s.host, s.port, s.tls).as_bytes()),
        None => field(b"-"),
    }
    field(config.ca_pem.as_deref().unwrap_or("-").as_bytes());
    h.finalize().into()
}

/// Whether the server's login answer lists its capabilities at all (`* CAPABILITY ...` or
/// `OK [CAPABILITY ...]`).
pub fn lists_capabilities(untagged: &[u8], reply: &str) -> bool {
    capability_lists(untagged, reply).next().is_some()
}

/// The capability lists (their words after `CAPABILITY`) in a server's answer: its untagged lines
/// and its tagged reply's text.
fn capability_lists<'a>(
    untagged: &'a [u8],
    reply: &'a str,
) -> impl Iterator<Item = Vec<String>> + 'a {
    let untagged = String::from_utf8_lossy(untagged).into_owned();
    let from_untagged: Vec<Vec<String>> = untagged
        .lines()
        .filter_map(|line| {
            let mut words = line.split_ascii_whitespace();
            (words.next() == Some("*")
                && words
                    .next()
                    .is_some_and(|w| w.eq_ignore_ascii_case("CAPABILITY")))
            .then(|| words.map(str::to_owned).collect())
        })
        .collect();
    let from_reply = reply
        .split_once('[')
        .and_then(|(_, code)| code.split(']').next())
        .and_then(|code| {
            let mut words = code.split_ascii_whitespace();
            words
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case("CAPABILITY"))
                .then(|| words.map(str::to_owned).collect::<Vec<String>>())
        });
    from_untagged.into_iter().chain(from_reply)
}

/// Whether the server's login answer (its untagged lines and its tagged reply's text) lists
/// UNSELECT among its capabilities (`* CAPABILITY ...` or `OK [CAPABILITY ...]`).
pub fn offers_unselect(untagged: &[u8], reply: &str) -> bool {
    capability_lists(untagged, reply)
        .any(|list| list.iter().any(|w| w.eq_ignore_ascii_case("UNSELECT")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fine() -> ParkInput {
        ParkInput {
            enabled: true,
            answered_here: true,
            revoked: false,
            reset: Reset::default(),
            unselect_offered: true,
            token_fresh: true,
        }
    }

    #[test]
    fn commands_are_reset_safe_only_from_the_list_and_without_stateful_arguments() {
        for (line, want) in [
            (&b"a1 NOOP\r\n"[..], Effect::Safe),
            (b"a1 select INBOX\r\n", Effect::Selects),
            (b"a1 EXAMINE \"Sent Items\"\r\n", Effect::Selects),
            (b"a1 UID fetch 1:* (FLAGS)\r\n", Effect::Safe),
            (b"a1 uid expunge 4\r\n", Effect::Safe),
            (b"a1 CLOSE\r\n", Effect::Unselects),
            (b"a1 UNSELECT\r\n", Effect::Unselects),
            (b"a1 ID (\"name\" \"x\")\r\n", Effect::Safe),
            (b"a1 ENABLE CONDSTORE\r\n", Effect::Unsafe),
            (b"a1 COMPRESS DEFLATE\r\n", Effect::Unsafe),
            (b"a1 NOTIFY SET (selected MessageNew)\r\n", Effect::Unsafe),
            (b"a1 LANGUAGE DE\r\n", Effect::Unsafe),
            (b"a1 XLIST \"\" *\r\n", Effect::Unsafe),
            (b"a1 SELECT INBOX (CONDSTORE)\r\n", Effect::Unsafe),
            (b"a1 FETCH 1:* (FLAGS MODSEQ)\r\n", Effect::Unsafe),
            (
                b"a1 UID FETCH 1:* (FLAGS) (CHANGEDSINCE 5)\r\n",
                Effect::Unsafe,
            ),
            (
                b"a1 STORE 1 (UNCHANGEDSINCE 5) +FLAGS (\\Seen)\r\n",
                Effect::Unsafe,
            ),
            (b"a1 STATUS INBOX (HIGHESTMODSEQ)\r\n", Effect::Unsafe),
            (b"a1 UID\r\n", Effect::Unsafe),
            (b"a1 UID ENABLE\r\n", Effect::Unsafe),
            (b"a1\r\n", Effect::Unsafe),
            // A bare LF: one command to the watch, maybe two to the server.
            (b"a1 NOOP\n", Effect::Unsafe),
            // A first line the watch could not keep whole.
            (b"a1 FETCH 1:* (FLAGS", Effect::Unsafe),
        ] {
            assert_eq!(
                effect(line, false),
                want,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(effect(b"a1 APPEND INBOX {12+}\r\n", true), Effect::Safe);
        assert_eq!(effect(b"a1 SEARCH SUBJECT {3+}\r\n", true), Effect::Unsafe);
    }

    #[test]
    fn the_selection_follows_the_last_select_and_a_close_answered_ok() {
        let mut r = Reset::default();
        assert_eq!(r.command(b"a SELECT INBOX\r\n", false), None);
        assert!(r.maybe_selected);
        let close = r.command(b"b CLOSE\r\n", false).unwrap();
        assert!(r.maybe_selected, "not before the server's OK");
        r.unselected(close);
        assert!(!r.maybe_selected);
        r.command(b"c EXAMINE INBOX\r\n", false);
        let unselect = r.command(b"d UNSELECT\r\n", false).unwrap();
        r.command(b"e SELECT Sent\r\n", false);
        r.unselected(unselect);
        assert!(r.maybe_selected, "SELECT sent after the UNSELECT");
        assert!(!r.tainted);
        r.command(b"f ENABLE UTF8=ACCEPT\r\n", false);
        let close = r.command(b"g CLOSE\r\n", false).unwrap();
        r.unselected(close);
        assert!(r.tainted, "a taint stays");
    }

    #[test]
    fn a_session_is_parked_only_when_every_rule_holds() {
        assert_eq!(decide(fine()), Decision::Park);
        let selected = Reset {
            maybe_selected: true,
            ..Reset::default()
        };
        assert_eq!(
            decide(ParkInput {
                reset: selected,
                ..fine()
            }),
            Decision::UnselectThenPark
        );
        assert_eq!(
            decide(ParkInput {
                reset: selected,
                unselect_offered: false,
                ..fine()
            }),
            Decision::LogOut("no_unselect")
        );
        for (input, why) in [
            (
                ParkInput {
                    enabled: false,
                    ..fine()
                },
                "off",
            ),
            (
                ParkInput {
                    answered_here: false,
                    ..fine()
                },
                "logout_relayed",
            ),
            (
                ParkInput {
                    revoked: true,
                    ..fine()
                },
                "revoked",
            ),
            (
                ParkInput {
                    reset: Reset {
                        tainted: true,
                        ..Reset::default()
                    },
                    ..fine()
                },
                "command",
            ),
            (
                ParkInput {
                    token_fresh: false,
                    ..fine()
                },
                "token",
            ),
        ] {
            assert_eq!(decide(input), Decision::LogOut(why));
        }
    }

    #[test]
    fn the_token_margin_and_the_capabilities_are_read_safely() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let at = |s: i64| Some(Timestamp::from_second(1_000_000 + s).unwrap());
        assert_eq!(token_time_left(None, now), Some(Duration::MAX));
        assert_eq!(token_time_left(at(300), now), None);
        assert_eq!(token_time_left(at(-50), now), None);
        assert_eq!(token_time_left(at(360), now), Some(Duration::from_secs(60)));
        assert_eq!(
            token_time_left(Some(Timestamp::MAX), Timestamp::MIN).map(|d| d > Duration::ZERO),
            Some(true)
        );
        assert!(offers_unselect(
            b"",
            "OK [CAPABILITY IMAP4rev1 SASL-IR UNSELECT IDLE] Logged in"
        ));
        assert!(offers_unselect(
            b"* CAPABILITY IMAP4rev1 unselect\r\n",
            "OK authenticated (Success)"
        ));
        assert!(!offers_unselect(
            b"",
            "OK [CAPABILITY IMAP4rev1 IDLE] UNSELECT"
        ));
        assert!(!offers_unselect(b"* OK UNSELECT\r\n", "OK Logged in"));
        assert!(lists_capabilities(b"", "OK [CAPABILITY IMAP4rev1] x"));
        assert!(!lists_capabilities(b"", "OK AUTHENTICATE completed."));
    }
}
