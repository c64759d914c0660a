//! IMAP LOGOUT answered by the gateway itself, when that cannot differ from the server's answer.
//!
//! Relaying LOGOUT costs the app one more round trip through the gateway to the mail server and
//! back, for an answer that is always the same (`* BYE`, then the tagged `OK`): LOGOUT commits
//! nothing in IMAP (no implicit expunge, unlike CLOSE; RFC 9051 6.1.3) and cannot fail. So when an
//! app sends LOGOUT with nothing else outstanding, the gateway answers it at once, closes the app's
//! connection, and then sends the server the app's LOGOUT and waits (bounded) for it to close its
//! side ([`super::prelogin::Conn::relay`]). The server sees the same session as before; the app
//! sees the same answer, earlier. Only unsolicited untagged data the server might have sent in
//! between (new-mail counts) is not passed on; a client that logs out discards it anyway.
//!
//! "Nothing else outstanding" is decided from the bytes the relay passes, conservatively:
//! [`LogoutWatch`] follows both directions' message boundaries (lines, and literals `{n}`/`{n+}`,
//! whose contents are skipped, so mail content cannot fake a reply) and matches the app's commands
//! with the server's tagged replies by tag (a reply it cannot place stops the watch). LOGOUT is
//! answered here only when it arrives as one whole read, at a command boundary, with every earlier
//! command answered and the server's side at a reply boundary. Whenever the watch cannot be sure (a synchronizing literal, which the server
//! may refuse; COMPRESS, after which the bytes are not lines; a line it cannot read as a command),
//! it stops watching and the session's LOGOUT is relayed as before, for the rest of the session.
//!
//! POP3's QUIT is not answered here and stays relayed: it is when the server removes the messages
//! marked with DELE (RFC 1939 6, the UPDATE state), and the server may answer `-ERR` if it could
//! not: the app must get the server's own answer. SMTP's QUIT is answered by the gateway's SMTP
//! side already (`smtp/driver.rs`): after the server accepted a message (`250` after DATA) QUIT
//! commits nothing.

/// Bytes of a server message's first line kept: enough for a tag and a status.
const HEAD: usize = 96;
/// Bytes of an app command's first line kept: the whole line of nearly every command, for the
/// reuse decision's look at its arguments ([`super::reuse::effect`]; a longer line counts as not
/// reset-safe). Kept only while the line comes in.
const APP_HEAD: usize = 1024;
use super::reuse::Reset;

/// Bytes of a line's end kept: enough for a literal's marker (`{` 20 digits `+}` CRLF).
const TAIL: usize = 26;

/// The app's answer to a LOGOUT the gateway answers itself.
pub fn answer(tag: &str) -> String {
    format!("* BYE Logging out\r\n{tag} OK LOGOUT completed\r\n")
}

/// One direction's message boundaries: a message is a command (app) or a reply (server), one line
/// or lines joined by literals.
struct Scan {
    /// The most of a first line kept in `head`.
    limit: usize,
    /// Inside a literal: bytes of it still to come.
    literal: u64,
    /// The message's first line so far (at most [`HEAD`] bytes).
    head: Vec<u8>,
    /// The first line ended (the message went on with a literal).
    head_done: bool,
    /// The current line's last bytes (at most [`TAIL`]).
    tail: Vec<u8>,
    /// Some bytes of a message seen and its end not yet.
    open: bool,
}

/// A literal's marker at the end of a line.
#[derive(Debug, PartialEq, Eq)]
enum Marker {
    /// `{n}` (or `~{n}`): the sender waits for a continuation (app side) or sends `n` bytes.
    Sync(u64),
    /// `{n+}` / `{n-}` (LITERAL+ / LITERAL-): `n` bytes follow at once.
    NonSync(u64),
}

/// The largest non-synchronizing literal every server with one takes: LITERAL- (RFC 7888) allows
/// 4096 bytes.
const NON_SYNC_LITERAL_MAX: u64 = 4096;

/// The marker `line` (a whole line's end, with its CRLF) ends with, if any.
fn marker(line: &[u8]) -> Option<Marker> {
    let body = line.strip_suffix(b"}\r\n")?;
    let open = body.iter().rposition(|b| *b == b'{')?;
    let inner = body.get(open.saturating_add(1)..)?;
    // `{n+}` is the non-synchronizing literal of LITERAL+ and LITERAL- alike (RFC 7888); `{n-}`
    // is no literal at all, and a server reads the bytes after it as commands.
    let (digits, sync) = match inner.last() {
        Some(b'+') => (inner.get(..inner.len().saturating_sub(1))?, false),
        _ => (inner, true),
    };
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(if sync {
        Marker::Sync(n)
    } else {
        Marker::NonSync(n)
    })
}

impl Scan {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            literal: 0,
            head: Vec::new(),
            head_done: false,
            tail: Vec::new(),
            open: false,
        }
    }

    /// Follow `data`; `message` is called with the first line (at most `limit` bytes) of each
    /// message that ends and whether a literal followed that line, `literal` with each literal's
    /// marker; either may say to stop (`false`).
    fn feed(
        &mut self,
        mut data: &[u8],
        message: &mut dyn FnMut(&[u8], bool) -> bool,
        literal: &mut dyn FnMut(&Marker) -> bool,
    ) -> bool {
        while !data.is_empty() {
            if self.literal > 0 {
                let skip = usize::try_from(self.literal)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.literal = self.literal.saturating_sub(skip as u64);
                data = data.get(skip..).unwrap_or_default();
                continue;
            }
            self.open = true;
            let (part, end) = match data.iter().position(|b| *b == b'\n') {
                Some(i) => (data.get(..=i).unwrap_or_default(), true),
                None => (data, false),
            };
            data = data.get(part.len()..).unwrap_or_default();
            if !self.head_done && self.head.len() < self.limit {
                let room = self.limit.saturating_sub(self.head.len());
                self.head
                    .extend_from_slice(part.get(..room.min(part.len())).unwrap_or_default());
            }
            let keep = part.len().min(TAIL);
            self.tail.extend_from_slice(
                part.get(part.len().saturating_sub(keep)..)
                    .unwrap_or_default(),
            );
            let over = self.tail.len().saturating_sub(TAIL);
            self.tail.drain(..over);
            if !end {
                continue;
            }
            let found = marker(&self.tail);
            self.tail.clear();
            match found {
                Some(m) => {
                    self.head_done = true;
                    self.literal = match m {
                        Marker::Sync(n) | Marker::NonSync(n) => n,
                    };
                    if !literal(&m) {
                        return false;
                    }
                }
                None => {
                    let go_on = message(&self.head, self.head_done);
                    // Between messages (where an idle session waits) nothing is kept.
                    self.head = Vec::new();
                    self.tail = Vec::new();
                    self.head_done = false;
                    self.open = false;
                    if !go_on {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// At a message boundary (not inside a line or a literal).
    fn at_boundary(&self) -> bool {
        !self.open && self.literal == 0
    }
}

/// Whether `tag` is an IMAP tag (RFC 9051: ASTRING-CHAR except `+`), as the gateway echoes it.
fn is_tag(tag: &[u8]) -> bool {
    !tag.is_empty()
        && tag.len() <= 64
        && tag
            .iter()
            .all(|b| b.is_ascii_graphic() && !b"(){%*\"\\+".contains(b))
}

/// Commands the app may have outstanding while the watch follows; past it (an app pipelining
/// without reading) the watch stops.
const MAX_OUTSTANDING: usize = 64;

/// What an app's command line (its first line) means for the watch.
#[derive(Debug, PartialEq, Eq)]
enum AppLine<'a> {
    /// A command (its tag): the server will answer it with a reply of that tag.
    Command(&'a [u8]),
    /// `DONE`, ending IDLE: no reply of its own (IDLE's tagged reply follows it).
    Done,
    /// Something after which the bytes cannot be followed, or not a command.
    Unknown,
}

fn app_line(head: &[u8]) -> AppLine<'_> {
    let line = head
        .strip_suffix(b"\r\n")
        .or_else(|| head.strip_suffix(b"\n"))
        .unwrap_or(head);
    if line.eq_ignore_ascii_case(b"DONE") {
        return AppLine::Done;
    }
    let mut words = line.split(|b| *b == b' ');
    let (Some(tag), Some(name)) = (words.next(), words.next()) else {
        return AppLine::Unknown;
    };
    if !is_tag(tag) || name.is_empty() || !name.iter().all(u8::is_ascii_alphabetic) {
        return AppLine::Unknown;
    }
    // COMPRESS: what follows is deflated. STARTTLS and AUTHENTICATE have no place after login
    // and change the stream or its exchange.
    let changes_stream = ["COMPRESS", "STARTTLS", "AUTHENTICATE"]
        .iter()
        .any(|c| name.eq_ignore_ascii_case(c.as_bytes()));
    if changes_stream {
        AppLine::Unknown
    } else {
        AppLine::Command(tag)
    }
}

/// What a server's reply (its first line) means for the watch.
#[derive(Debug, PartialEq, Eq)]
enum ServerLine<'a> {
    /// Untagged data or a continuation request.
    Untagged,
    /// The completion of the command of this tag (`OK`, `NO` or `BAD`).
    Tagged(&'a [u8]),
    /// Not a reply the watch can place.
    Unknown,
}

fn server_line(head: &[u8]) -> ServerLine<'_> {
    if matches!(head.first(), Some(b'*' | b'+')) {
        return ServerLine::Untagged;
    }
    let mut words = head.split(|b| matches!(b, b' ' | b'\r' | b'\n'));
    let (Some(tag), Some(status)) = (words.next(), words.next()) else {
        return ServerLine::Unknown;
    };
    let done = ["OK", "NO", "BAD"]
        .iter()
        .any(|w| status.eq_ignore_ascii_case(w.as_bytes()));
    if is_tag(tag) && done {
        ServerLine::Tagged(tag)
    } else {
        ServerLine::Unknown
    }
}

/// The tag of `chunk` if it is exactly one `tag LOGOUT` line.
fn logout_tag(chunk: &[u8]) -> Option<&str> {
    let line = chunk.strip_suffix(b"\r\n")?;
    let (tag, name) = line.split_at(line.iter().position(|b| *b == b' ')?);
    (is_tag(tag) && name.eq_ignore_ascii_case(b" LOGOUT"))
        .then(|| std::str::from_utf8(tag).ok())
        .flatten()
}

/// Follows a relayed IMAP session to tell when a LOGOUT may be answered by the gateway (module
/// doc). Pure: fed the bytes, it decides; the relay acts. It also follows what the app's
/// commands did to the session ([`Reset`], for the reuse decision).
pub struct LogoutWatch {
    /// The tags of the app's commands the server has not answered yet (at most
    /// [`MAX_OUTSTANDING`]; empty, and no allocation, when nothing is outstanding).
    outstanding: Vec<Box<[u8]>>,
    app: Scan,
    server: Scan,
    /// The watch could not follow the session: never answer a LOGOUT here again.
    lost: bool,
    /// The tag of the LOGOUT answered here.
    answered: Option<String>,
    /// What the app's commands did to the session.
    reset: Reset,
    /// The outstanding CLOSE and UNSELECT commands: their tags and [`Reset::command`]'s marks.
    unselects: Vec<(Box<[u8]>, u64)>,
}

impl Default for LogoutWatch {
    fn default() -> Self {
        Self {
            outstanding: Vec::new(),
            app: Scan::new(APP_HEAD),
            server: Scan::new(HEAD),
            lost: false,
            answered: None,
            reset: Reset::default(),
            unselects: Vec::new(),
        }
    }
}

impl LogoutWatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// What the app's commands did to the session: tainted too when the watch lost the session
    /// (it could not tell what the app sent).
    pub fn reset(&self) -> Reset {
        let mut reset = self.reset;
        if self.lost {
            reset.taint();
        }
        reset
    }

    /// Whether the watch still follows the session.
    pub fn following(&self) -> bool {
        !self.lost
    }

    /// The tag of the LOGOUT [`Self::app_chunk`] took.
    pub fn answered(&self) -> Option<&str> {
        self.answered.as_deref()
    }

    /// Bytes the server sent towards the app (after its login reply).
    pub fn from_server(&mut self, data: &[u8]) {
        if self.lost {
            return;
        }
        let outstanding = &mut self.outstanding;
        let unselects = &mut self.unselects;
        let reset = &mut self.reset;
        let mut lost = false;
        let mut message = |head: &[u8], _literal: bool| {
            match server_line(head) {
                ServerLine::Untagged => {
                    // The server ends the session: never to be parked.
                    if head
                        .get(..5)
                        .is_some_and(|w| w.eq_ignore_ascii_case(b"* BYE"))
                    {
                        reset.taint();
                    }
                }
                ServerLine::Tagged(tag) => match outstanding.iter().position(|t| **t == *tag) {
                    Some(i) => {
                        outstanding.remove(i);
                        if outstanding.is_empty() {
                            *outstanding = Vec::new();
                        }
                        if let Some(u) = unselects.iter().position(|(t, _)| **t == *tag) {
                            let (_, mark) = unselects.remove(u);
                            if unselects.is_empty() {
                                *unselects = Vec::new();
                            }
                            let ok = head
                                .get(tag.len().saturating_add(1)..)
                                .and_then(|rest| rest.get(..2))
                                .is_some_and(|w| w.eq_ignore_ascii_case(b"OK"));
                            if ok {
                                reset.unselected(mark);
                            }
                        }
                    }
                    // A reply to no command the watch saw.
                    None => lost = true,
                },
                ServerLine::Unknown => lost = true,
            }
            !lost
        };
        if !self.server.feed(data, &mut message, &mut |_| true) || lost {
            self.lost = true;
        }
    }

    /// Bytes the app sent towards the server.
    pub fn from_app(&mut self, data: &[u8]) {
        if self.lost {
            return;
        }
        let outstanding = &mut self.outstanding;
        let unselects = &mut self.unselects;
        let reset = &mut self.reset;
        let mut lost = false;
        let mut message = |head: &[u8], literal: bool| {
            match app_line(head) {
                AppLine::Done => {}
                AppLine::Command(tag) if outstanding.len() < MAX_OUTSTANDING => {
                    // Two commands under one tag: which answer is whose is unknown (an OK
                    // of one could pass for an UNSELECT of the other).
                    if outstanding.iter().any(|t| &**t == tag) {
                        reset.taint();
                    }
                    if let Some(mark) = reset.command(head, literal) {
                        unselects.push((tag.into(), mark));
                    }
                    outstanding.push(tag.into());
                }
                AppLine::Command(_) => lost = true,
                AppLine::Unknown => lost = true,
            }
            !lost
        };
        // A synchronizing literal waits for the server's go-ahead, which it may refuse (then
        // the literal is never sent): not followed. Nor is a non-synchronizing one over 4096
        // bytes, which a server with LITERAL- only (Gmail) refuses, reading its bytes as
        // commands.
        let mut literal =
            |m: &Marker| matches!(m, Marker::NonSync(n) if *n <= NON_SYNC_LITERAL_MAX);
        if !self.app.feed(data, &mut message, &mut literal) || lost {
            self.lost = true;
        }
    }

    /// `chunk`, one read from the app: `true` if it is a LOGOUT to answer here (it is then not to
    /// be forwarded, and its tag is kept); otherwise it is followed as sent on (`false`).
    /// `to_app_idle`: nothing the server sent is still waiting to be written to the app.
    pub fn app_chunk(&mut self, chunk: &[u8], to_app_idle: bool) -> bool {
        if let Some(tag) = self.would_take(chunk, to_app_idle) {
            self.answered = Some(tag.to_owned());
            return true;
        }
        self.from_app(chunk);
        false
    }

    /// Whether [`Self::app_chunk`] would take `chunk` now (its tag), without following it.
    pub fn would_take<'c>(&self, chunk: &'c [u8], to_app_idle: bool) -> Option<&'c str> {
        let quiet = !self.lost
            && to_app_idle
            && self.outstanding.is_empty()
            && self.app.at_boundary()
            && self.server.at_boundary();
        quiet.then(|| logout_tag(chunk)).flatten()
    }
}

#[cfg(test)]
mod tests;
