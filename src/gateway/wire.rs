//! Reading an app's commands before login: whole lines of at most a given length, exact-length
//! literals, and the bytes read ahead handed back for the relay (an app may pipeline commands
//! after its login) or refused before a TLS handshake (bytes sent before STARTTLS must not count
//! as sent under TLS).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why no line came.
#[derive(Debug)]
pub enum ReadError {
    /// The app closed the connection (or it failed).
    Closed,
    /// A line longer than the limit.
    TooLong,
}

pub struct Wire<S> {
    pub stream: S,
    buf: Vec<u8>,
    max_line: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    pub fn new(stream: S, max_line: usize) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            max_line: max_line.max(64),
        }
    }

    /// The next line with its line end.
    pub async fn line(&mut self) -> Result<Vec<u8>, ReadError> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                if end >= self.max_line {
                    return Err(ReadError::TooLong);
                }
                let rest = self.buf.split_off(end.saturating_add(1));
                return Ok(std::mem::replace(&mut self.buf, rest));
            }
            if self.buf.len() >= self.max_line {
                return Err(ReadError::TooLong);
            }
            self.fill(self.max_line.saturating_sub(self.buf.len()))
                .await?;
        }
    }

    /// Exactly `n` bytes (an IMAP literal; the caller bounds `n`).
    pub async fn exact(&mut self, n: usize) -> Result<Vec<u8>, ReadError> {
        while self.buf.len() < n {
            self.fill(n.saturating_sub(self.buf.len())).await?;
        }
        let rest = self.buf.split_off(n);
        Ok(std::mem::replace(&mut self.buf, rest))
    }

    async fn fill(&mut self, want: usize) -> Result<(), ReadError> {
        let room = want.clamp(1, 4096);
        match (&mut self.stream)
            .take(room as u64)
            .read_buf(&mut self.buf)
            .await
        {
            Ok(0) | Err(_) => Err(ReadError::Closed),
            Ok(_) => Ok(()),
        }
    }

    /// Write and flush; false when the app is gone.
    pub async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok() && self.stream.flush().await.is_ok()
    }

    /// Whether the app sent bytes not read yet.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The stream and what was read ahead.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        (self.stream, self.buf)
    }
}

/// A SASL PLAIN message (RFC 4616): `authzid NUL authcid NUL passwd`. The authorization identity
/// must be empty or the authentication identity (no acting as someone else). `None` when
/// malformed. Pure, for the property tests.
pub fn parse_plain(message: &[u8]) -> Option<(String, crate::secret::SecretValue)> {
    let mut parts = message.splitn(3, |b| *b == 0);
    let authzid = parts.next()?;
    let authcid = parts.next()?;
    let password = parts.next()?;
    if authcid.is_empty() || password.contains(&0) || (!authzid.is_empty() && authzid != authcid) {
        return None;
    }
    let user = std::str::from_utf8(authcid).ok()?.to_owned();
    let password = std::str::from_utf8(password).ok()?.to_owned();
    Some((user, crate::secret::SecretValue::new(password)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_messages() {
        let (u, p) = parse_plain(b"\0ns/mi/app\0pw").unwrap();
        assert_eq!((u.as_str(), p.expose()), ("ns/mi/app", "pw"));
        assert!(parse_plain(b"ns/mi/app\0ns/mi/app\0pw").is_some());
        assert!(parse_plain(b"other\0ns/mi/app\0pw").is_none());
        assert!(parse_plain(b"\0\0pw").is_none());
        assert!(parse_plain(b"\0u").is_none());
        assert!(parse_plain(b"\0u\0p\0w").is_none());
    }

    #[tokio::test]
    async fn lines_are_bounded_and_read_ahead_is_kept() {
        let (mut app, gw) = tokio::io::duplex(64 * 1024);
        app.write_all(b"A1 NOOP\r\nA2 LOGIN").await.unwrap();
        let mut w = Wire::new(gw, 100);
        assert_eq!(w.line().await.unwrap(), b"A1 NOOP\r\n");
        app.write_all(&[b'x'; 200]).await.unwrap();
        assert!(matches!(w.line().await, Err(ReadError::TooLong)));
        let (_, rest) = w.into_parts();
        assert!(rest.starts_with(b"A2 LOGIN"));
    }
}
