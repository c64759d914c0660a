//! Reading lines of bounded length from a client or a server.
//!
//! Hand-written rather than smtp-proto's `RequestReceiver`: that one has a fixed 4096-byte limit,
//! where the gateway needs one limit per phase (512 octets for a command, RFC 5321 §4.5.3.1.4;
//! 12288 for an `AUTH` line, RFC 4954 §4; 1000 octets plus slack for a line of a message), and it
//! must know whether more input is already buffered (commands pipelined behind `STARTTLS`).

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// One line as read: its bytes without the line end.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A line ended by LF (a CR before it is removed). `bare_lf` says the CR was missing.
    Complete { bytes: Vec<u8>, bare_lf: bool },
    /// The line was longer than the limit: its bytes up to the next LF were read and dropped.
    TooLong,
    /// The peer closed the connection (possibly in the middle of a line).
    Closed,
}

/// Read one line of at most `limit` bytes (the line end not counted). A longer line is consumed up
/// to its LF and reported as [`Line::TooLong`], so that the reader stays in step with the peer;
/// what it held is never kept (at most `limit` bytes are buffered).
pub async fn read_line<R>(reader: &mut R, limit: usize) -> std::io::Result<Line>
where
    R: AsyncBufRead + Unpin,
{
    let mut bytes = Vec::new();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(Line::Closed);
        }
        let (chunk, found) = match memchr_lf(available) {
            Some(at) => (available.get(..at).unwrap_or_default(), true),
            None => (available, false),
        };
        if !too_long {
            if bytes.len().saturating_add(chunk.len()) > limit.saturating_add(1) {
                // One more byte than the limit is allowed here for the CR before the LF.
                too_long = true;
                bytes = Vec::new();
            } else {
                bytes.extend_from_slice(chunk);
            }
        }
        let consumed = chunk.len().saturating_add(usize::from(found));
        reader.consume(consumed);
        if found {
            if too_long {
                return Ok(Line::TooLong);
            }
            let bare_lf = bytes.last() != Some(&b'\r');
            if !bare_lf {
                bytes.pop();
            }
            if bytes.len() > limit {
                return Ok(Line::TooLong);
            }
            return Ok(Line::Complete { bytes, bare_lf });
        }
    }
}

fn memchr_lf(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|b| *b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], limit: usize) -> Vec<Line> {
        // A reader that hands out 3 bytes at a time, so that lines arrive in pieces.
        let mut reader = tokio::io::BufReader::with_capacity(3, input);
        let mut out = Vec::new();
        loop {
            let line = read_line(&mut reader, limit).await.unwrap();
            let done = line == Line::Closed;
            out.push(line);
            if done {
                return out;
            }
        }
    }

    fn complete(s: &str, bare_lf: bool) -> Line {
        Line::Complete {
            bytes: s.as_bytes().to_vec(),
            bare_lf,
        }
    }

    #[tokio::test]
    async fn lines_end_at_lf_and_long_ones_are_skipped_whole() {
        assert_eq!(
            lines(b"EHLO a\r\nNOOP\n0123456789\r\nQUIT\r\nhalf", 8).await,
            vec![
                complete("EHLO a", false),
                complete("NOOP", true),
                Line::TooLong,
                complete("QUIT", false),
                Line::Closed,
            ]
        );
        // Exactly the limit, with and without CR; one over it.
        assert_eq!(
            lines(b"12345678\r\n12345678\n123456789\r\n", 8).await[..3],
            [
                complete("12345678", false),
                complete("12345678", true),
                Line::TooLong
            ]
        );
        assert_eq!(lines(b"\r\n", 0).await[0], complete("", false));
    }
}
