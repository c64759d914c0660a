//! Reading HTTP response bodies with a size cap.
//!
//! Every HTTP server the operator calls (token, revocation, userinfo and OIDC discovery endpoints)
//! is named in a MailIntegration spec, so it is not trusted: `reqwest::Response::bytes()` buffers
//! whatever it is sent, and one spec naming an endless or huge response could take the pod past its
//! memory limit. Every body is read here instead, with a cap per kind of answer.
//!
//! The loop over `Response::chunk()` rather than `http_body_util::Limited`: the crate is only a
//! transitive dependency, reqwest's `stream` feature is off, and `chunk()` keeps reqwest's own
//! error (so that a timeout is still told from a reset) where `Limited` boxes it. Each chunk is one
//! read of hyper's bounded buffer, and responses are never decompressed (reqwest's gzip features
//! are off), so what is held stays near the cap. Time is bounded by the client's request timeout,
//! which covers reading the body.

use std::fmt;

/// Most read of a token endpoint's answer (refresh, code exchange): real ones are a few KiB, the
/// ID token included.
pub(crate) const TOKEN_RESPONSE_LIMIT: usize = 64 * 1024;
/// Most read of a userinfo or revocation endpoint's answer: a handful of claims, or an error.
pub(crate) const USERINFO_LIMIT: usize = 64 * 1024;
/// Most read of an OIDC discovery document (real ones are under 10 KiB; the slack is for providers
/// that list many algorithms, claims and locales).
pub(crate) const DISCOVERY_LIMIT: usize = 1024 * 1024;

/// Why a body could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The body is, or says it is, longer than `limit` bytes; nothing past the limit was read.
    TooLarge { limit: usize },
    /// The connection failed or timed out while reading.
    Transport(reqwest::Error),
}

/// Read `response`'s body, failing as soon as it is known to be longer than `limit` bytes: from
/// `Content-Length` before reading anything, else when a chunk would pass the limit.
pub(crate) async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, ReadError> {
    let announced = response.content_length();
    let limit_u64 = u64::try_from(limit).unwrap_or(u64::MAX);
    if announced.is_some_and(|n| n > limit_u64) {
        return Err(ReadError::TooLarge { limit });
    }
    let capacity = announced
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0)
        .min(limit);
    let mut body = Vec::with_capacity(capacity);
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Transport)? {
        if chunk.len() > limit.saturating_sub(body.len()) {
            return Err(ReadError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `limit` for people: `64 KiB`, `1 MiB`, or bytes when it is not a round number.
pub(crate) struct Size(pub usize);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const KIB: usize = 1024;
        const MIB: usize = 1024 * 1024;
        match self.0 {
            n if n >= MIB && n % MIB == 0 => write!(f, "{} MiB", n / MIB),
            n if n >= KIB && n % KIB == 0 => write!(f, "{} KiB", n / KIB),
            n => write!(f, "{n} bytes"),
        }
    }
}

/// The sentence for a body over its limit, e.g. "the token endpoint's answer is larger than
/// 64 KiB; the operator reads at most that". Never quotes the body (it may hold tokens).
pub(crate) fn too_large(what: &str, limit: usize) -> String {
    format!(
        "{what}'s answer is larger than {}; the operator reads at most that",
        Size(limit)
    )
}

#[cfg(test)]
mod tests;
