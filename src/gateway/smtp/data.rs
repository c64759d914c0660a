//! The DATA phase, without I/O: the message's lines in, what to do with each out.
//!
//! The header block (up to the first empty line) is held until it is complete and its `From:` and
//! `Sender:` are checked ([`super::rules::check_headers`]); only then does the driver open `DATA`
//! upstream and stream the rest line by line. A refused message is read to its end and dropped, the
//! provider never saw `DATA`. A message that grows over the limit after `DATA` went upstream makes
//! the driver close the upstream connection without the final dot: the provider completes nothing.
//!
//! Lines are forwarded as the app sent them (still dot-stuffed), each ended by CRLF: a line the app
//! ended with a bare LF is ended with CRLF upstream, so the gateway and the provider see the same
//! lines and the same end of the message (no "SMTP smuggling" past the header check), and a CR
//! anywhere but before the LF refuses the message.

use super::rules;
use crate::gateway::config::GatewayAppConfig;

/// The longest line of a message: RFC 5322 §2.1.1 allows 998 characters; some software writes longer
/// lines, so a few times that (what happens over it: the message is refused with 554 5.6.0).
pub const DATA_LINE: usize = 4096;
/// The most a header block may hold (it is held in memory until it is checked).
pub const HEADER_BLOCK: usize = 256 * 1024;
/// How much of a refused message is read and dropped, beyond the size limit, before the session is
/// closed instead.
pub const DISCARD_SLACK: u64 = 1024 * 1024;

/// What the driver does after a line.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing to send (held, or dropped).
    Nothing,
    /// The headers passed: send `DATA` upstream; if it answers 354, send `head` (CRLF-ended lines),
    /// then call [`DataPhase::opened`].
    Open { head: Vec<u8> },
    /// Send this line upstream.
    Forward(Vec<u8>),
    /// Close the upstream connection now (without the final dot), the message will be refused.
    Abort,
    /// The final dot: [`DataPhase::end`] says what to answer.
    End,
    /// Too much of a refused message: answer this and close the session.
    Close(String),
}

/// How the message ends, asked for at the final dot.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Send the final dot upstream and relay the answer.
    Finish,
    /// The headers passed at the end (no body): send `DATA`, `head`, the final dot, relay the answer.
    OpenAndFinish { head: Vec<u8> },
    /// Answer this (the message was refused; nothing was completed upstream).
    Refuse(String),
}

#[derive(Debug)]
enum Mode {
    Headers { raw: Vec<u8> },
    Streaming,
    Refused { reply: String, dropped: u64 },
}

/// One message's DATA phase.
#[derive(Debug)]
pub struct DataPhase {
    limit: u64,
    size: u64,
    mode: Mode,
    app: GatewayAppConfig,
    mailbox: String,
}

impl DataPhase {
    pub fn new(app: GatewayAppConfig, mailbox: String, limit: u64) -> Self {
        Self {
            limit,
            size: 0,
            mode: Mode::Headers { raw: Vec::new() },
            app,
            mailbox,
        }
    }

    /// Whether `DATA` is open upstream (lines go there).
    pub fn is_streaming(&self) -> bool {
        matches!(self.mode, Mode::Streaming)
    }

    /// A line longer than [`DATA_LINE`] was skipped.
    pub fn line_too_long(&mut self) -> Action {
        self.refuse(format!(
            "554 5.6.0 A line of the message is longer than {DATA_LINE} bytes; nothing was sent\r\n"
        ))
    }

    /// One line of the message, without its line end (`bare_lf`: it ended with LF alone).
    pub fn line(&mut self, bytes: Vec<u8>) -> Action {
        if bytes == b"." {
            return Action::End;
        }
        let unstuffed = bytes
            .len()
            .saturating_sub(usize::from(bytes.first() == Some(&b'.')));
        self.size = self
            .size
            .saturating_add((unstuffed as u64).saturating_add(2));
        if let Mode::Refused { reply, dropped } = &mut self.mode {
            *dropped = dropped.saturating_add((bytes.len() as u64).saturating_add(2));
            if *dropped > self.limit.saturating_add(DISCARD_SLACK) {
                return Action::Close(std::mem::take(reply));
            }
            return Action::Nothing;
        }
        if self.size > self.limit {
            return self.refuse(super::state::size_refusal(self.limit));
        }
        if bytes.contains(&b'\r') {
            return self.refuse(
                "554 5.6.0 The message has a CR that does not end a line; nothing was sent\r\n"
                    .into(),
            );
        }
        match &mut self.mode {
            Mode::Streaming => Action::Forward(bytes),
            Mode::Headers { raw } => {
                let end_of_headers = bytes.is_empty();
                raw.extend_from_slice(&bytes);
                raw.extend_from_slice(b"\r\n");
                if end_of_headers {
                    return self.check();
                }
                if raw.len() > HEADER_BLOCK {
                    return self.refuse(format!(
                        "552 5.3.4 The message header is larger than {HEADER_BLOCK} bytes\r\n"
                    ));
                }
                Action::Nothing
            }
            Mode::Refused { .. } => Action::Nothing,
        }
    }

    /// The upstream answered `DATA`: with 354 (`Ok`), or with a refusal to relay at the end.
    pub fn opened(&mut self, result: Result<(), String>) {
        if let Err(reply) = result {
            self.mode = Mode::Refused { reply, dropped: 0 };
        }
    }

    /// The upstream connection broke while streaming: the message will be answered with `reply`.
    pub fn upstream_lost(&mut self, reply: String) {
        self.mode = Mode::Refused { reply, dropped: 0 };
    }

    /// The final dot arrived.
    pub fn end(&mut self) -> End {
        match std::mem::replace(&mut self.mode, Mode::Streaming) {
            Mode::Streaming => End::Finish,
            Mode::Refused { reply, .. } => End::Refuse(reply),
            Mode::Headers { raw } => match self.verdict(&raw) {
                Ok(()) => End::OpenAndFinish { head: raw },
                Err(reply) => End::Refuse(reply),
            },
        }
    }

    fn check(&mut self) -> Action {
        let Mode::Headers { raw } = std::mem::replace(&mut self.mode, Mode::Streaming) else {
            return Action::Nothing;
        };
        match self.verdict(&raw) {
            Ok(()) => Action::Open { head: raw },
            Err(reply) => {
                self.mode = Mode::Refused { reply, dropped: 0 };
                Action::Nothing
            }
        }
    }

    fn verdict(&self, raw: &[u8]) -> Result<(), String> {
        let block = unstuff(raw);
        rules::check_headers(&self.app, &self.mailbox, &block).map_err(|r| format!("{r}\r\n"))
    }

    fn refuse(&mut self, reply: String) -> Action {
        let was_streaming = self.is_streaming();
        if !matches!(self.mode, Mode::Refused { .. }) {
            self.mode = Mode::Refused { reply, dropped: 0 };
        }
        if was_streaming {
            Action::Abort
        } else {
            Action::Nothing
        }
    }
}

/// The header lines with their dot-stuffing removed (RFC 5321 §4.5.2).
fn unstuff(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut at_line_start = true;
    for &b in raw {
        if at_line_start && b == b'.' {
            at_line_start = false;
            continue;
        }
        at_line_start = b == b'\n';
        out.push(b);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(limit: u64) -> DataPhase {
        DataPhase::new(
            GatewayAppConfig {
                name: "app".into(),
                username: "ns/mi/app".into(),
                protocols: vec![],
                send_as: vec![],
                verifiers: vec![],
            },
            "box@example.com".into(),
            limit,
        )
    }

    fn feed(p: &mut DataPhase, lines: &[&str]) -> Vec<Action> {
        lines
            .iter()
            .map(|l| p.line(l.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn headers_are_held_until_checked_then_lines_stream() {
        let mut p = phase(1000);
        let actions = feed(
            &mut p,
            &["From: box@example.com", "Subject: x", "", "body", "..dot"],
        );
        assert_eq!(actions[0], Action::Nothing);
        assert_eq!(actions[1], Action::Nothing);
        assert_eq!(
            actions[2],
            Action::Open {
                head: b"From: box@example.com\r\nSubject: x\r\n\r\n".to_vec()
            }
        );
        p.opened(Ok(()));
        assert_eq!(actions[3], Action::Forward(b"body".to_vec()));
        assert_eq!(actions[4], Action::Forward(b"..dot".to_vec()));
        assert_eq!(p.line(b".".to_vec()), Action::End);
        assert_eq!(p.end(), End::Finish);
    }

    #[test]
    fn a_foreign_from_is_refused_before_anything_goes_upstream() {
        let mut p = phase(1000);
        let actions = feed(&mut p, &["From: ceo@example.com", "", "body"]);
        assert!(actions.iter().all(|a| *a == Action::Nothing), "{actions:?}");
        let End::Refuse(reply) = p.end() else {
            panic!()
        };
        assert!(
            reply.starts_with("550 5.7.1 From: ceo@example.com"),
            "{reply}"
        );
        // A message that is all header, with no blank line: checked at the end.
        let mut p = phase(1000);
        feed(&mut p, &["From: box@example.com"]);
        assert_eq!(
            p.end(),
            End::OpenAndFinish {
                head: b"From: box@example.com\r\n".to_vec()
            }
        );
    }

    #[test]
    fn a_message_over_the_limit_aborts_the_upstream_data() {
        let mut p = phase(60);
        feed(&mut p, &["From: box@example.com", ""]);
        p.opened(Ok(()));
        assert_eq!(p.line(vec![b'x'; 20]), Action::Forward(vec![b'x'; 20]));
        assert_eq!(p.line(vec![b'x'; 20]), Action::Abort);
        assert_eq!(p.line(vec![b'x'; 20]), Action::Nothing);
        let End::Refuse(reply) = p.end() else {
            panic!()
        };
        assert!(reply.starts_with("552 5.3.4 "), "{reply}");
        // Before DATA went upstream, nothing to abort; an endless refused message closes.
        let mut p = phase(10);
        assert_eq!(p.line(vec![b'x'; 20]), Action::Nothing);
        let mut closed = None;
        for _ in 0..100_000 {
            if let Action::Close(reply) = p.line(vec![b'x'; 100]) {
                closed = Some(reply);
                break;
            }
        }
        assert!(closed.unwrap().starts_with("552 "));
    }

    #[test]
    fn a_bare_cr_refuses_and_dot_stuffing_is_undone_for_the_check() {
        let mut p = phase(1000);
        assert_eq!(p.line(b".From: box@example.com".to_vec()), Action::Nothing);
        assert!(matches!(p.line(b"".to_vec()), Action::Open { .. }));
        p.opened(Ok(()));
        assert_eq!(p.line(b"a\rb".to_vec()), Action::Abort);
        let End::Refuse(reply) = p.end() else {
            panic!()
        };
        assert!(reply.starts_with("554 5.6.0"), "{reply}");
    }
}
