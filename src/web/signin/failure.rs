//! Every way a sign-in can fail, as what the page says (title, what happened, what to do), the HTTP
//! status, and the reason recorded on the resource.

use crate::api::Prompt;
use crate::reason::Reason;
use axum::http::StatusCode;

/// The resource a failure is reported on: only when its identity comes from something the operator
/// signed (a ticket, a state, or this replica's own state record), never from bare request input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    pub ns: String,
    pub name: String,
    pub uid: String,
}

/// A failed step of the sign-in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub reason: Reason,
    pub status: StatusCode,
    /// The page's heading.
    pub title: String,
    /// What happened (plain text).
    pub what: String,
    /// What to do (plain text).
    pub todo: String,
    /// A value to show verbatim for copying (e.g. the redirect URL to register).
    pub copy: Option<(String, String)>,
    /// Where to report it, when known and trusted.
    pub subject: Option<Subject>,
}

impl Failure {
    pub fn new(
        reason: Reason,
        status: StatusCode,
        title: impl Into<String>,
        what: impl Into<String>,
        todo: impl Into<String>,
    ) -> Self {
        Self {
            reason,
            status,
            title: title.into(),
            what: what.into(),
            todo: todo.into(),
            copy: None,
            subject: None,
        }
    }

    pub fn on(mut self, subject: Option<Subject>) -> Self {
        self.subject = subject;
        self
    }

    pub fn with_copy(mut self, label: impl Into<String>, value: impl Into<String>) -> Self {
        self.copy = Some((label.into(), value.into()));
        self
    }

    /// The condition / event message: what happened and what to do, in one line.
    pub fn message(&self) -> String {
        let mut m = format!("{} {}", sentence(&self.what), sentence(&self.todo));
        if let Some((label, value)) = &self.copy {
            m.push_str(&format!(" {label}: {value}"));
        }
        m
    }
}

fn sentence(s: &str) -> String {
    let s = s.trim();
    if s.ends_with(['.', '!', '?']) {
        s.to_owned()
    } else {
        format!("{s}.")
    }
}

pub use crate::reason::clean;

const RETRY: &str = "Open the sign-in link from status.signIn.url again";

/// A provider's error response at the callback (RFC 6749 §4.1.2.1, OIDC Core §3.1.2.6).
pub fn provider_error(
    error: &str,
    description: Option<&str>,
    prompt: Option<Prompt>,
    provider: &str,
    redirect_url: &str,
) -> Failure {
    let said = match description.map(clean).filter(|d| !d.is_empty()) {
        Some(d) => format!("{provider} answered {} ({d})", clean(error)),
        None => format!("{provider} answered {}", clean(error)),
    };
    let after_none = if prompt == Some(Prompt::None) {
        " after the prompt choice \"No prompt\""
    } else {
        ""
    };
    let bad = StatusCode::BAD_REQUEST;
    match error {
        "access_denied" => Failure::new(
            Reason::SignInDenied,
            StatusCode::FORBIDDEN,
            "Access was not granted",
            format!(
                "{said}: the consent was refused or cancelled, or a policy of the provider blocks this app."
            ),
            format!(
                "{RETRY} and accept the requested permissions. If an administrator policy blocks the app, ask the {provider} administrator to allow it."
            ),
        ),
        "login_required" => Failure::new(
            Reason::LoginRequired,
            bad,
            "Sign-in needed at the provider",
            format!(
                "{said}{after_none}: nobody is signed in at {provider} in this browser, and the provider was asked not to show any page."
            ),
            format!("{RETRY} and choose \"Consent\" or \"Select account\"."),
        ),
        "consent_required" => Failure::new(
            Reason::ConsentRequired,
            bad,
            "Consent needed",
            format!(
                "{said}{after_none}: the account has not granted this app its permissions yet, and the provider was asked not to show any page."
            ),
            format!("{RETRY} and choose \"Consent\" (or \"Select account\")."),
        ),
        "interaction_required" | "account_selection_required" => Failure::new(
            Reason::InteractionRequired,
            bad,
            "The provider needs to ask you something",
            format!(
                "{said}{after_none}: {provider} must show a page (sign-in, account choice or consent), and was asked not to."
            ),
            format!("{RETRY} and choose \"Consent\" or \"Select account\"."),
        ),
        "redirect_uri_mismatch" => redirect_mismatch(&said, provider, redirect_url),
        "invalid_client" | "unauthorized_client" => Failure::new(
            if error == "invalid_client" {
                Reason::InvalidClient
            } else {
                Reason::UnauthorizedClient
            },
            bad,
            "The OAuth client was refused",
            format!(
                "{said}: the client ID in the client Secret is unknown to {provider}, disabled, or not allowed to use the authorization-code flow."
            ),
            "Check the client ID in the Secret named by spec.oauth.clientSecretRef against the provider's console (Web application client), then sign in again.",
        ),
        "temporarily_unavailable" | "server_error" => Failure::new(
            Reason::ProviderUnavailable,
            StatusCode::BAD_GATEWAY,
            "The provider is unavailable",
            format!("{said}: a temporary problem at {provider}."),
            format!("Wait a minute, then {}.", RETRY.to_lowercase()),
        ),
        _ => Failure::new(
            Reason::SignInFailed,
            bad,
            "Sign-in failed",
            format!("{said}."),
            format!(
                "{RETRY}. If it repeats, check the OAuth client's settings at {provider} (redirect URL, scopes, allowed users)."
            ),
        ),
    }
}

/// The provider does not accept the callback URL.
pub fn redirect_mismatch(said: &str, provider: &str, redirect_url: &str) -> Failure {
    Failure::new(
        Reason::RedirectURIMismatch,
        StatusCode::BAD_REQUEST,
        "The callback URL is not registered",
        format!("{said}: the OAuth client at {provider} does not list the operator's callback URL as an authorized redirect URI."),
        "Add exactly this URL to the OAuth client's authorized redirect URIs (or set spec.oauth.redirectURL to the one registered there), wait a few minutes, then open the sign-in link again",
    )
    .with_copy("Redirect URL to register", redirect_url)
}
