//! A byte budget on a mail server connection, and a guard against IMAP literals announced larger
//! than what is left of it.
//!
//! The mail server is named in the spec, so it is not trusted, and the clients under the check do
//! not bound what they buffer:
//!
//! - async-imap 0.12 (`imap_stream.rs`) grows its buffer 4 KiB at a time for a line without end, up
//!   to 512 MiB, and on a literal announcement `{N}\r\n` (imap-proto answers `Needed::Size(N)`)
//!   resizes it to N zeroed bytes at once, before any of the literal has arrived: one line from
//!   the server commits up to 512 MiB.
//! - lettre 0.11 (`AsyncSmtpConnection::read_response`) checks its 1000-byte line limit only after
//!   `read_line` has returned, so a reply line without CRLF is buffered without end.
//!
//! [`Bounded`] sits under either client and fails every read once the check has received
//! [`SESSION_BUDGET`] bytes, which bounds what any buffer built from them can hold. For IMAP it
//! also reads each `{N}` as it passes and fails before async-imap sees it when N is more than what
//! is left of the budget: such a literal could never be read in full, and the failure comes before
//! the allocation rather than after it. A `{digits}` inside a literal's own data is read the same
//! way; a check never asks for message data, so at worst that fails a check that would have
//! failed anyway.
//!
//! Written by hand: tokio's `take` bounds only a reader (the clients need one stream that reads
//! and writes), and no crate watches IMAP literal announcements. Time is bounded separately: the
//! whole check runs under [`super::CheckTarget::timeout`].

use std::{
    fmt, io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::MailboxError;
use crate::http_limit::Size;

/// Most bytes read from a mail server in one check. A check reads a greeting, capabilities, a few
/// short replies and a TLS handshake's certificates: a few KiB.
pub(crate) const SESSION_BUDGET: usize = 1024 * 1024;

/// Why a read was refused. Reads fail with an `io::Error` holding this; [`find`] gets it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Overrun {
    /// More than `budget` bytes in all.
    Bytes { budget: usize },
    /// An IMAP literal of `size` bytes announced with less than that left of `budget`.
    Literal { size: u64, budget: usize },
    /// A reply line longer than `max` (POP3).
    Line { max: usize },
}

impl fmt::Display for Overrun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Overrun::Bytes { budget } => write!(
                f,
                "sent more than the operator reads (at most {} in one check)",
                Size(*budget)
            ),
            Overrun::Literal { size, budget } => write!(
                f,
                "announced a literal of {size} bytes, more than the operator reads (at most {} in one check)",
                Size(*budget)
            ),
            Overrun::Line { max } => write!(
                f,
                "sent more than the operator reads (a line longer than {})",
                Size(*max)
            ),
        }
    }
}

impl std::error::Error for Overrun {}

impl Overrun {
    /// The check's error: the server is not one the operator can talk to, like one that does not
    /// answer (the same hint applies: check the host and port).
    pub(crate) fn error(self, host: &str, when: &str) -> MailboxError {
        MailboxError::Unreachable {
            detail: format!("{host} {self} {when}"),
        }
    }
}

/// The [`Overrun`] somewhere in an error's chain (an `io::Error` hides it behind `get_ref`).
pub(crate) fn find<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Overrun> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(o) = e.downcast_ref::<Overrun>() {
            return Some(o);
        }
        if let Some(io) = e.downcast_ref::<io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(o) = find(inner)
        {
            return Some(o);
        }
        current = e.source();
    }
    None
}

/// Where the literal scanner is: `{`, then digits, then `}`.
#[derive(Clone, Copy, Debug, Default)]
enum Scan {
    #[default]
    Text,
    Open,
    Digits(u64),
}

impl Scan {
    /// Feed one byte; a complete `{N}` gives N (saturated at `u64::MAX`).
    fn step(&mut self, byte: u8) -> Option<u64> {
        let (next, announced) = match (*self, byte) {
            (_, b'{') => (Scan::Open, None),
            (Scan::Open, b'0'..=b'9') => (Scan::Digits(u64::from(byte.saturating_sub(b'0'))), None),
            (Scan::Digits(n), b'0'..=b'9') => (
                Scan::Digits(
                    n.saturating_mul(10)
                        .saturating_add(u64::from(byte.saturating_sub(b'0'))),
                ),
                None,
            ),
            (Scan::Digits(n), b'}') => (Scan::Text, Some(n)),
            _ => (Scan::Text, None),
        };
        *self = next;
        announced
    }
}

/// A stream that fails reads past a byte budget (and, for IMAP, oversized literal announcements).
/// Writes pass through.
#[derive(Debug)]
pub(crate) struct Bounded<S> {
    inner: S,
    budget: usize,
    remaining: usize,
    literals: Option<Scan>,
    /// Once refused, every later read is refused the same way (a client that reads on after an
    /// error, to send QUIT say, gets no more bytes).
    tripped: Option<Overrun>,
}

impl<S> Bounded<S> {
    /// `inner` with [`SESSION_BUDGET`].
    pub(crate) fn new(inner: S) -> Self {
        Self::with_remaining(inner, SESSION_BUDGET)
    }

    /// `inner` with `remaining` of [`SESSION_BUDGET`] left (after STARTTLS, say).
    pub(crate) fn with_remaining(inner: S, remaining: usize) -> Self {
        Self {
            inner,
            budget: SESSION_BUDGET,
            remaining: remaining.min(SESSION_BUDGET),
            literals: None,
            tripped: None,
        }
    }

    /// Also refuse IMAP literals announced larger than what is left.
    pub(crate) fn imap(mut self) -> Self {
        self.literals = Some(Scan::default());
        self
    }

    /// What is left of the budget.
    pub(crate) fn remaining(&self) -> usize {
        self.remaining
    }

    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }

    pub(crate) fn into_inner(self) -> S {
        self.inner
    }

    fn trip(&mut self, overrun: Overrun) -> io::Error {
        self.tripped = Some(overrun);
        self.remaining = 0;
        io::Error::other(overrun)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Bounded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(overrun) = this.tripped {
            return Poll::Ready(Err(io::Error::other(overrun)));
        }
        if this.remaining == 0 {
            // The budget is spent: a server that now closes has sent no more than it, one that
            // sends a byte more has not.
            let mut probe = [0u8; 1];
            let mut probe = ReadBuf::new(&mut probe);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut probe))?;
            if probe.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            let budget = this.budget;
            return Poll::Ready(Err(this.trip(Overrun::Bytes { budget })));
        }
        let start = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let read = buf.filled().len().saturating_sub(start);
        if read > this.remaining {
            // Hand over nothing of a read that passes the budget.
            buf.set_filled(start);
            let budget = this.budget;
            return Poll::Ready(Err(this.trip(Overrun::Bytes { budget })));
        }
        this.remaining = this.remaining.saturating_sub(read);
        if let Some(scan) = &mut this.literals {
            let remaining = u64::try_from(this.remaining).unwrap_or(u64::MAX);
            let oversized = buf
                .filled()
                .get(start..)
                .unwrap_or_default()
                .iter()
                .filter_map(|&b| scan.step(b))
                .find(|&size| size > remaining);
            if let Some(size) = oversized {
                // Taken back before the client parses it: async-imap sizes its buffer from it.
                buf.set_filled(start);
                let budget = this.budget;
                return Poll::Ready(Err(this.trip(Overrun::Literal { size, budget })));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Bounded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests;
