//! The SMTP submission state machine, without I/O: a command line in, a [`Step`] out (a reply, or
//! something for the driver to do with the login layer or the mail server, whose outcome it reports
//! back). Greeting and EHLO/HELO, STARTTLS, AUTH PLAIN/LOGIN, MAIL/RCPT/DATA, RSET, NOOP, QUIT.

use super::{
    command::{self, Command, Credentials, Mechanism, SaslRefused},
    rules,
};
use crate::{gateway::config::GatewayAppConfig, secret::SecretValue};

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with its CRLF.
pub const COMMAND_LINE: usize = 510;
/// RFC 4954 §4: an `AUTH` line (and a SASL response line) may be up to 12288 octets.
pub const AUTH_LINE: usize = 12_286;

/// Where the session's connection stands, as the listener knows it.
#[derive(Clone, Debug)]
pub struct Listener {
    /// The name the gateway greets with.
    pub hostname: String,
    /// The connection is TLS (implicit TLS, or after STARTTLS).
    pub tls: bool,
    /// STARTTLS is offered (the submission port with a certificate).
    pub starttls: bool,
    /// AUTH is allowed without TLS (a plaintext port the admin enabled for in-cluster clients).
    pub plaintext_auth: bool,
}

/// Bounds of one session.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Command lines (SASL lines included) before a successful AUTH; then the session is closed.
    pub commands_before_login: u32,
    /// Recipients of one message (RFC 5321 §4.5.3.1.8: at least 100 must be taken).
    pub recipients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            commands_before_login: 10,
            recipients: 100,
        }
    }
}

/// What the session knows after a successful login.
#[derive(Clone, Debug)]
pub struct LoggedIn {
    pub app: GatewayAppConfig,
    pub mailbox: String,
    /// The message size limit: the entry's maxMessageBytes, or the server's SIZE if smaller.
    pub limit: u64,
    /// The server offers 8BITMIME.
    pub eight_bit: bool,
}

/// What the driver does next.
#[derive(Debug)]
pub enum Step {
    /// Send this (CRLF-ended) and read the next line.
    Reply(String),
    /// Send this and close the connection.
    Close(String),
    /// Send `220 2.0.0 Ready to start TLS`, run the handshake, then call [`Machine::tls_started`].
    StartTls,
    /// Check the credential and connect upstream, then call [`Machine::logged_in`] or
    /// [`Machine::login_failed`].
    Login(Credentials),
    /// Send `MAIL FROM` upstream (the sender is allowed), relay the answer, then
    /// [`Machine::mail_answered`].
    Mail {
        from: String,
        size: Option<u64>,
        eight_bit: bool,
    },
    /// Send `RCPT TO` upstream, relay the answer, then [`Machine::rcpt_answered`].
    Rcpt { to: String },
    /// Run the DATA phase (the driver answers 354 and relays), then [`Machine::data_done`].
    Data,
    /// Reset the upstream transaction (if any) and answer 250.
    Rset,
    /// Answer 221 and close.
    Quit,
}

#[derive(Debug)]
enum Auth {
    None,
    /// `AUTH PLAIN` without an initial response: waiting for it.
    Plain,
    /// `AUTH LOGIN`: waiting for the user name.
    LoginUser,
    /// `AUTH LOGIN`: waiting for the password.
    LoginPassword(String),
    Done(Box<LoggedIn>),
}

/// One client session's protocol state.
#[derive(Debug)]
pub struct Machine {
    listener: Listener,
    limits: Limits,
    greeted: bool,
    auth: Auth,
    commands: u32,
    sender: Option<String>,
    recipients: usize,
}

fn line(code: &str, text: &str) -> String {
    format!("{code} {text}\r\n")
}

impl Machine {
    pub fn new(listener: Listener, limits: Limits) -> Self {
        Self {
            listener,
            limits,
            greeted: false,
            auth: Auth::None,
            commands: 0,
            sender: None,
            recipients: 0,
        }
    }

    /// The greeting.
    pub fn greeting(&self) -> String {
        line(
            "220",
            &format!(
                "{} ESMTP mail-integration-operator gateway",
                self.listener.hostname
            ),
        )
    }

    /// The longest line the driver should read next.
    pub fn line_limit(&self) -> usize {
        AUTH_LINE
    }

    pub fn is_logged_in(&self) -> bool {
        matches!(self.auth, Auth::Done(_))
    }

    /// The login's facts, once logged in.
    pub fn logged_in_as(&self) -> Option<&LoggedIn> {
        match &self.auth {
            Auth::Done(l) => Some(l),
            _ => None,
        }
    }

    /// A line longer than [`Machine::line_limit`] was skipped; it counts as a command.
    pub fn line_too_long(&mut self) -> Step {
        if let Some(close) = self.count_before_login() {
            return close;
        }
        self.auth = match std::mem::replace(&mut self.auth, Auth::None) {
            done @ Auth::Done(_) => done,
            // A SASL exchange in progress is over.
            _ => Auth::None,
        };
        Step::Reply(line("500", "5.5.6 Line too long"))
    }

    fn count_before_login(&mut self) -> Option<Step> {
        if self.is_logged_in() {
            return None;
        }
        self.commands = self.commands.saturating_add(1);
        (self.commands > self.limits.commands_before_login).then(|| {
            Step::Close(line(
                "421",
                "4.7.0 Too many commands before authentication, closing",
            ))
        })
    }

    /// One line from the client.
    pub fn line(&mut self, bytes: &[u8]) -> Step {
        if let Some(close) = self.count_before_login() {
            return close;
        }
        match std::mem::replace(&mut self.auth, Auth::None) {
            Auth::Plain => return self.sasl_plain(bytes),
            Auth::LoginUser => return self.sasl_login_user(bytes),
            Auth::LoginPassword(user) => return self.sasl_login_password(bytes, user),
            other => self.auth = other,
        }
        let is_auth = bytes
            .get(..5)
            .is_some_and(|v| v.eq_ignore_ascii_case(b"AUTH "));
        if bytes.len() > COMMAND_LINE && !is_auth {
            return Step::Reply(line(
                "500",
                &format!("5.5.6 Line too long (at most {} octets)", COMMAND_LINE + 2),
            ));
        }
        match command::parse(bytes) {
            Ok(command) => self.command(command),
            Err(refused) => Step::Reply(format!("{}\r\n", refused.reply())),
        }
    }

    fn command(&mut self, command: Command) -> Step {
        match command {
            Command::Ehlo { .. } => {
                self.greeted = true;
                self.reset();
                Step::Reply(self.ehlo())
            }
            Command::Helo { .. } => {
                self.greeted = true;
                self.reset();
                Step::Reply(line("250", &self.listener.hostname))
            }
            Command::StartTls => {
                if self.listener.tls {
                    Step::Reply(line("503", "5.5.1 TLS is already active"))
                } else if !self.listener.starttls {
                    Step::Reply(line("502", "5.5.1 STARTTLS is not offered on this port"))
                } else {
                    Step::StartTls
                }
            }
            Command::Auth { mechanism, initial } => self.auth(mechanism, initial),
            Command::Mail(mail) => self.mail(mail),
            Command::Rcpt { to } => {
                if !self.is_logged_in() {
                    Step::Reply(auth_required())
                } else if self.sender.is_none() {
                    Step::Reply(line("503", "5.5.1 Need MAIL command first"))
                } else if self.recipients >= self.limits.recipients {
                    Step::Reply(line(
                        "452",
                        &format!(
                            "4.5.3 Too many recipients (at most {})",
                            self.limits.recipients
                        ),
                    ))
                } else {
                    Step::Rcpt { to }
                }
            }
            Command::Data => {
                if !self.is_logged_in() {
                    Step::Reply(auth_required())
                } else if self.sender.is_none() {
                    Step::Reply(line("503", "5.5.1 Need MAIL command first"))
                } else if self.recipients == 0 {
                    Step::Reply(line("554", "5.5.1 No valid recipients"))
                } else {
                    Step::Data
                }
            }
            Command::Rset => {
                self.reset();
                Step::Rset
            }
            Command::Noop => Step::Reply(line("250", "2.0.0 OK")),
            Command::Quit => Step::Quit,
            Command::Vrfy => Step::Reply(line("252", "2.5.0 Cannot VRFY user")),
            Command::Help => Step::Reply(line(
                "214",
                "2.0.0 EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA, RSET, NOOP, QUIT",
            )),
            Command::NotOffered(name) => {
                Step::Reply(line("502", &format!("5.5.1 {name} is not offered")))
            }
        }
    }

    fn ehlo(&self) -> String {
        let mut caps = vec![self.listener.hostname.clone(), "PIPELINING".into()];
        match self.logged_in_as() {
            Some(l) => {
                caps.push(format!("SIZE {}", l.limit));
                if l.eight_bit {
                    caps.push("8BITMIME".into());
                }
            }
            // The limit is the integration's, known after AUTH: until then SIZE without a number
            // (RFC 1870 §4: no fixed maximum announced), and 8BITMIME only once the server is known
            // to take it.
            None => caps.push("SIZE".into()),
        }
        caps.push("ENHANCEDSTATUSCODES".into());
        if self.listener.starttls && !self.listener.tls {
            caps.push("STARTTLS".into());
        }
        if !self.is_logged_in() && (self.listener.tls || self.listener.plaintext_auth) {
            caps.push("AUTH PLAIN LOGIN".into());
        }
        let last = caps.len().saturating_sub(1);
        caps.iter()
            .enumerate()
            .map(|(i, c)| format!("250{}{c}\r\n", if i == last { ' ' } else { '-' }))
            .collect()
    }

    fn auth(&mut self, mechanism: Mechanism, initial: Option<String>) -> Step {
        if self.is_logged_in() {
            return Step::Reply(line("503", "5.5.1 Already authenticated"));
        }
        if !self.greeted {
            return Step::Reply(line("503", "5.5.1 Send EHLO first"));
        }
        if !self.listener.tls && !self.listener.plaintext_auth {
            return Step::Reply(if self.listener.starttls {
                line("530", "5.7.0 Must issue a STARTTLS command first")
            } else {
                line(
                    "538",
                    "5.7.11 Encryption required for requested authentication mechanism",
                )
            });
        }
        match (mechanism, initial) {
            (Mechanism::Plain, Some(initial)) => self.sasl_plain(initial.as_bytes()),
            (Mechanism::Plain, None) => {
                self.auth = Auth::Plain;
                Step::Reply("334 \r\n".into())
            }
            (Mechanism::Login, Some(initial)) => self.sasl_login_user(initial.as_bytes()),
            (Mechanism::Login, None) => {
                self.auth = Auth::LoginUser;
                // base64("Username:")
                Step::Reply(line("334", "VXNlcm5hbWU6"))
            }
            (Mechanism::Other, _) => Step::Reply(line(
                "504",
                "5.5.4 Unrecognized authentication type (PLAIN or LOGIN)",
            )),
        }
    }

    fn sasl_plain(&mut self, bytes: &[u8]) -> Step {
        match sasl_text(bytes)
            .and_then(|t| command::decode(&t))
            .and_then(|m| command::plain(&m))
        {
            Ok(credentials) => Step::Login(credentials),
            Err(e) => Step::Reply(sasl_refused(e)),
        }
    }

    fn sasl_login_user(&mut self, bytes: &[u8]) -> Step {
        match sasl_text(bytes)
            .and_then(|t| command::decode(&t))
            .and_then(command::login_field)
        {
            Ok(user) if !user.is_empty() => {
                self.auth = Auth::LoginPassword(user);
                // base64("Password:")
                Step::Reply(line("334", "UGFzc3dvcmQ6"))
            }
            Ok(_) => Step::Reply(sasl_refused(SaslRefused::Malformed)),
            Err(e) => Step::Reply(sasl_refused(e)),
        }
    }

    fn sasl_login_password(&mut self, bytes: &[u8], username: String) -> Step {
        match sasl_text(bytes)
            .and_then(|t| command::decode(&t))
            .and_then(command::login_field)
        {
            Ok(password) => Step::Login(Credentials {
                username,
                password: SecretValue::new(password),
            }),
            Err(e) => Step::Reply(sasl_refused(e)),
        }
    }

    /// The login worked and the mail server took the token: answer 235.
    pub fn logged_in(&mut self, logged_in: LoggedIn) -> String {
        self.auth = Auth::Done(Box::new(logged_in));
        self.reset();
        line("235", "2.7.0 Authentication successful")
    }

    /// The login or the upstream connection failed; `reply` is what the app is told.
    pub fn login_failed(&mut self, reply: String) -> String {
        self.auth = Auth::None;
        reply
    }

    /// The TLS handshake after STARTTLS is done: the session starts over (RFC 3207 §4.2).
    pub fn tls_started(&mut self) {
        self.listener.tls = true;
        self.greeted = false;
        self.reset();
    }

    fn mail(&mut self, mail: command::MailFrom) -> Step {
        let Some(l) = self.logged_in_as() else {
            return Step::Reply(auth_required());
        };
        if self.sender.is_some() {
            return Step::Reply(line("503", "5.5.1 Nested MAIL command"));
        }
        if let Some(param) = mail.unsupported {
            return Step::Reply(line(
                "555",
                &format!("5.5.4 MAIL FROM parameter {param} is not supported"),
            ));
        }
        if mail.eight_bit && !l.eight_bit {
            return Step::Reply(line(
                "555",
                "5.5.4 BODY=8BITMIME is not supported by the mail server",
            ));
        }
        if let Some(size) = mail.size
            && size > l.limit
        {
            return Step::Reply(size_refusal(l.limit));
        }
        if let Err(reply) = rules::check_envelope(&l.app, &l.mailbox, &mail.address) {
            return Step::Reply(format!("{reply}\r\n"));
        }
        Step::Mail {
            from: mail.address,
            size: mail.size,
            eight_bit: mail.eight_bit,
        }
    }

    /// The server answered `MAIL FROM`; `accepted` when it was 2xx.
    pub fn mail_answered(&mut self, from: String, accepted: bool) {
        if accepted {
            self.sender = Some(from);
            self.recipients = 0;
        }
    }

    /// The server answered `RCPT TO`; `accepted` when it was 2xx.
    pub fn rcpt_answered(&mut self, accepted: bool) {
        if accepted {
            self.recipients = self.recipients.saturating_add(1);
        }
    }

    /// The DATA phase ended (delivered or not): the transaction is over.
    pub fn data_done(&mut self) {
        self.reset();
    }

    fn reset(&mut self) {
        self.sender = None;
        self.recipients = 0;
    }
}

/// The reply to a message (or an announced SIZE) over the limit.
pub fn size_refusal(limit: u64) -> String {
    line(
        "552",
        &format!("5.3.4 Message size exceeds fixed maximum message size ({limit} bytes)"),
    )
}

fn auth_required() -> String {
    line("530", "5.7.0 Authentication required")
}

fn sasl_text(bytes: &[u8]) -> Result<String, SaslRefused> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| SaslRefused::NotBase64)
}

fn sasl_refused(e: SaslRefused) -> String {
    match e {
        SaslRefused::Cancelled => line("501", "5.0.0 Authentication cancelled"),
        SaslRefused::NotBase64 => line("501", "5.5.2 Cannot decode the response (base64)"),
        SaslRefused::Malformed => line("501", "5.5.2 Malformed authentication response"),
    }
}

#[cfg(test)]
mod tests;
