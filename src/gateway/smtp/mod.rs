//! SMTP submission for apps (issue 22 points 3 and 4; docs/gateway.md "SMTP rules"): the app
//! authenticates with its gateway credential (AUTH PLAIN or LOGIN, after STARTTLS on 587 or on the
//! implicit-TLS port 465); the gateway authenticates upstream with the integration's access token
//! (XOAUTH2/OAUTHBEARER) and relays `MAIL`/`RCPT`/`DATA`, checking who the app sends as
//! ([`rules`]) and how large the message is ([`data`]) before the provider completes anything.
//!
//! Parsers: commands with smtp-proto (Stalwart), headers with mail-parser (Stalwart), the server's
//! replies with smtp-proto; hand-written: the bounded line reader ([`line`]), the SASL PLAIN/LOGIN
//! decoding ([`command`]) and the DATA line handling ([`data`]), each saying why.

pub mod command;
pub mod data;
pub mod driver;
pub mod line;
pub mod report;
pub mod rules;
pub mod state;
pub mod upstream;

pub use driver::{Connection, Ended, Io, SmtpServer};
pub use state::Limits;
