//! What a failed call to a provider means: permanent (only a human can fix it; stop calling) or
//! transient (back off and retry, keeping the current access token), with the reason users see
//! and a message that says what happened and what to do.
//!
//! Providers word their errors loosely and change the words: classification keys on the RFC 6749
//! `error` code, HTTP status, Google's documented `error_subtype` and Microsoft's AADSTS codes
//! (from `error_codes`, else from the description); the description is shown only as a hint.

use super::display_name;
use crate::api::ProviderKind;
use crate::reason::Reason;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

mod vendors;

/// What the operator was doing when the provider failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenOperation {
    /// Refreshing the access token with the refresh token.
    Refresh,
    /// Exchanging an authorization code after sign-in.
    CodeExchange,
    /// Revoking a token (RFC 7009).
    Revocation,
    /// Reading the OIDC userinfo endpoint.
    UserInfo,
    /// Requesting an app-only access token with the client-credentials grant.
    ClientCredentials,
    /// Requesting a mailbox's access token with a service account's JWT-bearer grant (Google
    /// Workspace domain-wide delegation).
    JwtBearer,
}

impl TokenOperation {
    /// A phrase for messages ("while refreshing the access token").
    pub fn describe(self) -> &'static str {
        match self {
            TokenOperation::Refresh => "refreshing the access token",
            TokenOperation::CodeExchange => "exchanging the sign-in code for tokens",
            TokenOperation::Revocation => "revoking the grant",
            TokenOperation::UserInfo => "reading the signed-in account from the userinfo endpoint",
            TokenOperation::ClientCredentials => {
                "requesting an app-only access token (client credentials)"
            }
            TokenOperation::JwtBearer => {
                "requesting the mailbox's access token with the service account (domain-wide delegation)"
            }
        }
    }

    fn endpoint(self) -> &'static str {
        match self {
            TokenOperation::Refresh
            | TokenOperation::CodeExchange
            | TokenOperation::ClientCredentials
            | TokenOperation::JwtBearer => "token",
            TokenOperation::Revocation => "revocation",
            TokenOperation::UserInfo => "userinfo",
        }
    }
}

impl fmt::Display for TokenOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// An OAuth error response body (RFC 6749 §5.2) with the provider extensions the operator reads:
/// Google's `error_subtype` (e.g. `invalid_rapt`) and Microsoft's `error_codes` (AADSTS numbers).
/// Used as the `oauth2` crate's error response type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_subtype: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub error_codes: Vec<u64>,
}

impl ProviderErrorBody {
    /// A body with just an error code and description.
    pub fn new(error: impl Into<String>, description: Option<&str>) -> Self {
        Self {
            error: error.into(),
            error_description: description.map(str::to_owned),
            ..Self::default()
        }
    }

    /// Microsoft's AADSTS codes: `error_codes`, else the `AADSTS<n>` numbers in the description.
    pub fn aadsts_codes(&self) -> Vec<u64> {
        if !self.error_codes.is_empty() {
            return self.error_codes.clone();
        }
        let Some(d) = &self.error_description else {
            return Vec::new();
        };
        d.match_indices("AADSTS")
            .filter_map(|(i, m)| {
                let digits: String = d
                    .get(i.saturating_add(m.len())..)
                    .unwrap_or_default()
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse().ok()
            })
            .collect()
    }

    /// The provider's words, cleaned for a condition message: one line, at most 300 characters.
    pub fn hint(&self) -> String {
        let mut s = self.error.clone();
        if let Some(sub) = &self.error_subtype {
            s.push_str(&format!(" ({sub})"));
        }
        if let Some(d) = &self.error_description {
            s.push_str(": ");
            s.push_str(d);
        }
        one_line(&s, 300)
    }
}

impl fmt::Display for ProviderErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hint())
    }
}

impl oauth2::ErrorResponse for ProviderErrorBody {}

/// Collapse whitespace and control characters, then [`crate::reason::outside_text`] with `max`.
fn one_line(s: &str, max: usize) -> String {
    let words: Vec<&str> = s
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect();
    crate::reason::outside_text(&words.join(" "), max)
}

/// The body of a failed HTTP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorBody {
    /// An OAuth error response (JSON, or parsed from a `WWW-Authenticate` header).
    OAuth(ProviderErrorBody),
    /// An HTML page (Google answers 403 with one under load).
    Html,
    /// No body.
    Empty,
    /// Something else that is not an OAuth error.
    Other { content_type: Option<String> },
}

/// Why a call to a provider failed, before interpretation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureCause {
    /// No answer in time.
    Timeout,
    /// No connection (DNS, refused, TLS handshake); `detail` never contains the URL's query.
    Connect { detail: String },
    /// An HTTP error status.
    Http {
        status: u16,
        /// From `Retry-After` (seconds or HTTP date), relative to when the answer came.
        retry_after: Option<Duration>,
        body: ErrorBody,
    },
    /// HTTP 200, but not a usable response (`detail` names the problem, never the content).
    InvalidResponse { detail: String },
}

/// Replace every occurrence of `secrets` (those of 8 characters or more) in `text`.
fn scrub_text(text: &mut String, secrets: &[&str]) {
    for s in secrets.iter().filter(|s| s.len() >= 8) {
        if text.contains(*s) {
            *text = text.replace(*s, "[redacted]");
        }
    }
}

impl FailureCause {
    /// Replace the given secrets by `[redacted]` in every text of the cause (what the provider
    /// said, the connection error), before [`classify`] cuts that text to length: scrubbing only
    /// the finished message ([`FailureClass::scrub`]) misses a credential that the cut left
    /// partly in it.
    pub fn scrub(mut self, secrets: &[&str]) -> Self {
        match &mut self {
            FailureCause::Timeout => {}
            FailureCause::Connect { detail } | FailureCause::InvalidResponse { detail } => {
                scrub_text(detail, secrets)
            }
            FailureCause::Http { body, .. } => match body {
                ErrorBody::OAuth(b) => {
                    scrub_text(&mut b.error, secrets);
                    for text in [
                        &mut b.error_description,
                        &mut b.error_uri,
                        &mut b.error_subtype,
                    ]
                    .into_iter()
                    .flatten()
                    {
                        scrub_text(text, secrets);
                    }
                }
                ErrorBody::Other {
                    content_type: Some(ct),
                } => scrub_text(ct, secrets),
                ErrorBody::Html | ErrorBody::Empty | ErrorBody::Other { .. } => {}
            },
        }
        self
    }
}

/// A failed call to a provider endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenEndpointFailure {
    pub operation: TokenOperation,
    pub cause: FailureCause,
}

/// What a failure means for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureClass {
    /// Only a human can fix it: report, set Stalled, stop calling the provider until something changes.
    Permanent { reason: Reason, message: String },
    /// Retry with backoff (at least `retry_after` when given); keep the current access token.
    Transient {
        reason: Reason,
        message: String,
        retry_after: Option<Duration>,
    },
}

impl FailureClass {
    /// The reason users see.
    pub fn reason(&self) -> Reason {
        match self {
            FailureClass::Permanent { reason, .. } | FailureClass::Transient { reason, .. } => {
                *reason
            }
        }
    }

    /// What happened and what to do.
    pub fn message(&self) -> &str {
        match self {
            FailureClass::Permanent { message, .. } | FailureClass::Transient { message, .. } => {
                message
            }
        }
    }

    /// Whether only a human can fix it.
    pub fn is_permanent(&self) -> bool {
        matches!(self, FailureClass::Permanent { .. })
    }

    /// The provider's requested wait, for transient failures.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FailureClass::Transient { retry_after, .. } => *retry_after,
            FailureClass::Permanent { .. } => None,
        }
    }

    /// Replace every occurrence of the given secrets in the message by `[redacted]`: a last line
    /// of defence should a provider ever echo a credential in its error description. Values
    /// shorter than 8 characters are not real credentials and are left alone.
    pub fn scrub(mut self, secrets: &[&str]) -> Self {
        let message = match &mut self {
            FailureClass::Permanent { message, .. } | FailureClass::Transient { message, .. } => {
                message
            }
        };
        scrub_text(message, secrets);
        self
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for FailureClass {}

fn permanent(reason: Reason, message: String) -> FailureClass {
    FailureClass::Permanent { reason, message }
}

fn transient(reason: Reason, message: String, retry_after: Option<Duration>) -> FailureClass {
    FailureClass::Transient {
        reason,
        message,
        retry_after,
    }
}

fn wait_phrase(retry_after: Option<Duration>) -> String {
    match retry_after {
        Some(d) => format!("retrying after {}s", d.as_secs()),
        None => "retrying with backoff".to_owned(),
    }
}

/// Interpret a failed call to a provider endpoint.
pub fn classify(kind: ProviderKind, failure: &TokenEndpointFailure) -> FailureClass {
    let mut class = classify_inner(kind, failure);
    if let FailureClass::Permanent { message, .. } | FailureClass::Transient { message, .. } =
        &mut class
        && let Some(first) = message.chars().next()
    {
        *message = first
            .to_uppercase()
            .chain(message.chars().skip(1))
            .collect();
    }
    class
}

fn classify_inner(kind: ProviderKind, failure: &TokenEndpointFailure) -> FailureClass {
    let p = display_name(kind);
    let op = failure.operation.describe();
    match &failure.cause {
        FailureCause::Timeout => transient(
            Reason::ProviderUnavailable,
            format!("{p} did not answer in time while {op}; retrying with backoff."),
            None,
        ),
        FailureCause::Connect { detail } => transient(
            Reason::ProviderUnavailable,
            format!(
                "could not reach {p} while {op} ({}); retrying with backoff. If this persists, check DNS, egress network policies and proxies.",
                one_line(detail, 300)
            ),
            None,
        ),
        FailureCause::InvalidResponse { detail } => transient(
            Reason::ProviderError,
            format!(
                "{p}'s answer while {op} is not a valid response ({}); retrying with backoff. A proxy in between may be answering instead of {p}.",
                one_line(detail, 200)
            ),
            None,
        ),
        FailureCause::Http {
            status,
            retry_after,
            body,
        } => classify_http(kind, failure.operation, *status, *retry_after, body),
    }
}

fn classify_http(
    kind: ProviderKind,
    operation: TokenOperation,
    status: u16,
    retry_after: Option<Duration>,
    body: &ErrorBody,
) -> FailureClass {
    let p = display_name(kind);
    let op = operation.describe();
    let said = match body {
        ErrorBody::OAuth(b) => format!(" ({p} said: {})", b.hint()),
        _ => String::new(),
    };
    if status == 429 {
        return transient(
            Reason::RateLimited,
            format!(
                "{p} is rate limiting requests (HTTP 429) while {op}; {}, keeping the current access token.{said}",
                wait_phrase(retry_after)
            ),
            retry_after,
        );
    }
    if let ErrorBody::OAuth(b) = body
        && is_oauth_error_code(&b.error)
    {
        let specific = match kind {
            ProviderKind::Google => google(operation, b),
            ProviderKind::Microsoft => microsoft(operation, b, retry_after),
            ProviderKind::Oidc => None,
        };
        // A server error is never the final word, whatever its body says: a 5xx with a body that
        // would be permanent (a proxy's, or a provider failing while it answers) is retried.
        if let Some(c) = specific
            && !(status >= 500 && c.is_permanent())
        {
            return c;
        }
        if status >= 500 {
            return transient(
                Reason::ProviderUnavailable,
                format!(
                    "{p} failed with HTTP {status} while {op}; {}.{said}",
                    wait_phrase(retry_after)
                ),
                retry_after,
            );
        }
        return by_error_code(kind, operation, b, retry_after);
    }
    // JSON with an `error` that no OAuth specification defines is a proxy's or a firewall's as
    // likely as the server's: not the final word, whatever vendor codes come with it.
    match (not_oauth(kind, operation, status, retry_after, body), body) {
        (
            FailureClass::Transient {
                reason,
                message,
                retry_after,
            },
            ErrorBody::OAuth(b),
        ) => transient(
            reason,
            format!("{message} ({p} said: {})", b.hint()),
            retry_after,
        ),
        (class, _) => class,
    }
}

/// The `error` codes OAuth defines (RFC 6749 §4.1.2.1 and §5.2, RFC 6750 §3.1, OpenID Connect Core
/// §3.1.2.6, RFC 8628 §3.5, RFC 8707 §2) and Microsoft's `invalid_resource`: the only codes whose
/// answer may end retrying.
pub const OAUTH_ERROR_CODES: &[&str] = &[
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "access_denied",
    "unsupported_response_type",
    "server_error",
    "temporarily_unavailable",
    "invalid_token",
    "insufficient_scope",
    "interaction_required",
    "login_required",
    "account_selection_required",
    "consent_required",
    "authorization_pending",
    "slow_down",
    "expired_token",
    "invalid_target",
    "invalid_resource",
];

fn is_oauth_error_code(code: &str) -> bool {
    OAUTH_ERROR_CODES.contains(&code)
}

/// An error status without an OAuth error body: whatever answered, it was not the OAuth server
/// speaking RFC 6749 (an ingress while the server restarts, an egress proxy, a firewall, a
/// gateway), so it is never the final word on the grant or the client: always transient, with a
/// message that says what was seen — never the body itself, only its kind (and a cleaned,
/// bounded content type). What persists is escalated by [`after_long_run`].
fn not_oauth(
    kind: ProviderKind,
    operation: TokenOperation,
    status: u16,
    retry_after: Option<Duration>,
    body: &ErrorBody,
) -> FailureClass {
    let p = display_name(kind);
    let op = operation.describe();
    let what = match body {
        ErrorBody::Html => "an HTML body".to_owned(),
        ErrorBody::Empty => "an empty body".to_owned(),
        ErrorBody::Other {
            content_type: Some(ct),
        } => format!(
            "a body of type {} that is not an OAuth error",
            media_type(ct)
        ),
        ErrorBody::Other { content_type: None } => "a body that is not an OAuth error".to_owned(),
        ErrorBody::OAuth(_) => "a JSON body whose error code is not an OAuth one".to_owned(),
    };
    let wait = wait_phrase(retry_after);
    match status {
        403 => transient(
            Reason::RateLimited,
            format!(
                "{p} refused with HTTP 403 and {what} while {op}, as it does under load; {wait}, keeping the current access token."
            ),
            retry_after,
        ),
        408 | 500.. => transient(
            Reason::ProviderUnavailable,
            format!(
                "{p} failed with HTTP {status} ({what}) while {op}; {wait}, keeping the current access token."
            ),
            retry_after,
        ),
        _ => {
            let endpoint = operation.endpoint();
            let (who, check) = match status {
                404 | 410 => (
                    "an ingress or proxy answered, not the OAuth server (it may be restarting)",
                    "If this persists, check the endpoint URL (spec.oauth.endpoints, issuerURL or tenant).",
                ),
                405 => (
                    "the URL does not take the request: an ingress answered, or it is not the endpoint",
                    "If this persists, check the endpoint URL (spec.oauth.endpoints, issuerURL or tenant).",
                ),
                407 => (
                    "an egress proxy between the operator and the provider wants credentials",
                    "Check the operator's HTTPS_PROXY and NO_PROXY settings and the proxy's rules.",
                ),
                401 => (
                    "the refusal carries no OAuth error (neither body nor WWW-Authenticate): a proxy or front end refused",
                    "If this persists, check client_id and client_secret, and any authenticating proxy in between.",
                ),
                _ => (
                    "a proxy or web application firewall may have answered instead of the OAuth server",
                    "If this persists, check the proxies and firewalls between the operator and the provider.",
                ),
            };
            transient(
                Reason::NotAnOAuthAnswer,
                format!(
                    "the {endpoint} endpoint answered HTTP {status} with {what} while {op}: {who}; {wait}, keeping the current access token. {check}"
                ),
                retry_after,
            )
        }
    }
}

/// A content type for a message: its media type only (no parameters), cleaned, at most 60
/// characters.
fn media_type(ct: &str) -> String {
    let media = ct.split(';').next().unwrap_or_default();
    let cleaned: String = media
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(60)
        .collect();
    if cleaned.is_empty() {
        "(unnamed)".to_owned()
    } else {
        cleaned
    }
}

/// How long the answers of a run of failures may all be [`Reason::NotAnOAuthAnswer`] before the
/// message says that the endpoint URL is the likely cause (see [`after_long_run`]).
pub const NOT_OAUTH_ESCALATION: Duration = Duration::from_secs(3600);

/// The long-run rule for answers that are not OAuth answers: they stay transient (retried with the
/// capped backoff, at most every 5 minutes) however long they last, because only the OAuth server
/// may end a grant; but once the integration has been failing for [`NOT_OAUTH_ESCALATION`] and the
/// latest answer is still not an OAuth answer, the message says `InvalidEndpoint`: an ingress that
/// answers 404 for an hour is more likely a wrong URL than a restart. `failing_for`: since when
/// this run of failures lasts (the Reconciling condition's transition), `None` if unknown.
pub fn after_long_run(class: FailureClass, failing_for: Option<Duration>) -> FailureClass {
    match class {
        FailureClass::Transient {
            reason: Reason::NotAnOAuthAnswer,
            message,
            retry_after,
        } if failing_for.is_some_and(|d| d >= NOT_OAUTH_ESCALATION) => {
            let minutes = failing_for.unwrap_or_default().as_secs() / 60;
            transient(
                Reason::NotAnOAuthAnswer,
                format!(
                    "Likely InvalidEndpoint: refreshing has failed for {minutes} minutes and the latest answer is still not an OAuth answer, so the endpoint URL is probably wrong (spec.oauth.endpoints, issuerURL or tenant) or a proxy is in the way; the operator keeps retrying, at most every 5 minutes. {message}"
                ),
                retry_after,
            )
        }
        other => other,
    }
}

use vendors::{SIGN_IN_AGAIN, google, microsoft};

fn by_error_code(
    kind: ProviderKind,
    operation: TokenOperation,
    b: &ProviderErrorBody,
    retry_after: Option<Duration>,
) -> FailureClass {
    let p = display_name(kind);
    let op = operation.describe();
    let said = format!(" ({p} said: {})", b.hint());
    match b.error.as_str() {
        "invalid_grant" if operation == TokenOperation::CodeExchange => permanent(
            Reason::SignInRequired,
            format!(
                "{p} rejected the sign-in code: it expired, was already used, or the redirect URI or PKCE verifier did not match. Sign in again.{said}"
            ),
        ),
        "invalid_grant" => permanent(
            Reason::GrantRevoked,
            format!(
                "{p} rejected the refresh token: the grant was revoked or expired, or (with refresh-token rotation) an older refresh token was used again, which ends the whole grant. {SIGN_IN_AGAIN}{said}"
            ),
        ),
        "invalid_client" => permanent(
            Reason::InvalidClient,
            format!(
                "{p} rejected the OAuth client: wrong or expired client secret, wrong client ID, or the client was deleted. Check the client Secret against the provider's console.{said}"
            ),
        ),
        "unauthorized_client" if operation == TokenOperation::ClientCredentials => permanent(
            Reason::UnauthorizedClient,
            format!(
                "{p} does not let this client use the client-credentials grant (app-only). Allow the grant type for the client at the provider, or use grantType Interactive.{said}"
            ),
        ),
        "unauthorized_client" => permanent(
            Reason::UnauthorizedClient,
            format!(
                "{p} says this client may not use this grant: the grant belongs to another OAuth client, or the client may not use this grant type. Check client_id, then sign in again.{said}"
            ),
        ),
        "invalid_scope" | "insufficient_scope" => permanent(
            Reason::ScopeMissing,
            format!(
                "{p} did not grant the requested scopes. Check spec.oauth.scopes and the scopes enabled for the client, then sign in again with prompt Consent.{said}"
            ),
        ),
        "interaction_required" | "login_required" | "consent_required" => permanent(
            Reason::ReauthRequired,
            format!("{p} requires the user to sign in again interactively. {SIGN_IN_AGAIN}{said}"),
        ),
        "temporarily_unavailable" | "server_error" => transient(
            Reason::ProviderUnavailable,
            format!(
                "{p} is temporarily unavailable while {op}; {}.{said}",
                wait_phrase(retry_after)
            ),
            retry_after,
        ),
        "invalid_token" => permanent(
            Reason::ProviderError,
            format!(
                "{p} did not accept the token while {op}. Sign in again if this persists.{said}"
            ),
        ),
        "slow_down" => transient(
            Reason::RateLimited,
            format!(
                "{p} asked to slow down while {op}; {}.{said}",
                wait_phrase(retry_after)
            ),
            retry_after,
        ),
        // The rest of the codes OAuth defines: a refusal of the request itself.
        _ => permanent(
            Reason::ProviderError,
            format!("{p} refused while {op}.{said}"),
        ),
    }
}

/// What the operator remembers of a grant, to explain an `invalid_grant` better.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantHistory {
    /// When the grant was obtained (the sign-in).
    pub issued_at: Option<jiff::Timestamp>,
    /// When the provider said the refresh token ends (`refresh_token_expires_in`), if it did.
    pub refresh_token_expires_at: Option<jiff::Timestamp>,
}

const SEVEN_DAYS: i64 = 7 * 24 * 3600;

/// Google's body for a revoked grant and for a Testing app's expired grant is the same
/// ("Token has been expired or revoked."), and no documented field tells them apart. When the
/// grant's own history matches the 7-day limit — it died 7 days (up to one more day) after
/// sign-in, or Google had announced a refresh-token lifetime of at most 7 days that has now
/// passed — report [`Reason::TestingAppGrantExpired`] instead of [`Reason::GrantRevoked`].
/// Anything else is returned unchanged.
pub fn refine_with_grant_history(
    kind: ProviderKind,
    class: FailureClass,
    history: &GrantHistory,
    now: jiff::Timestamp,
) -> FailureClass {
    if kind != ProviderKind::Google
        || class.reason() != Reason::GrantRevoked
        || !class.is_permanent()
    {
        return class;
    }
    let secs = |a: jiff::Timestamp, b: jiff::Timestamp| b.as_second().saturating_sub(a.as_second());
    let announced_short_and_passed = match (history.issued_at, history.refresh_token_expires_at) {
        (Some(issued), Some(end)) => secs(issued, end) <= SEVEN_DAYS + 3600 && end <= now,
        _ => false,
    };
    let died_after_seven_days = history.issued_at.is_some_and(|issued| {
        (SEVEN_DAYS - 3600..=SEVEN_DAYS + 24 * 3600).contains(&secs(issued, now))
    });
    if !(announced_short_and_passed || died_after_seven_days) {
        return class;
    }
    let age = history
        .issued_at
        .map(|issued| {
            format!(
                " {:.1} days after sign-in",
                secs(issued, now) as f64 / 86400.0
            )
        })
        .unwrap_or_default();
    permanent(
        Reason::TestingAppGrantExpired,
        format!(
            "Google ended the grant{age} (\"Token has been expired or revoked.\"), which matches the 7-day limit Google puts on grants of apps whose OAuth consent screen is in \"Testing\" publishing status. Publish the app (Google Auth Platform → Audience → Publish app) and sign in again; otherwise sign in again every week."
        ),
    )
}
