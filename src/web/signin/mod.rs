//! The sign-in page and the OAuth callback (the design's "sign-in flow"), served on their own port.
//!
//! 1. The controller puts `status.signIn.url` = `{public-url}/sign-in?ticket=T` on resources without
//!    a grant ([`SignIn`] implements [`SignInLinks`]). The ticket is signed, names the resource,
//!    is bound to its UID and expires (default one hour).
//! 2. `GET /sign-in` shows the integration and the three prompt choices; the form posts to
//!    `/oauth2/start`.
//! 3. `POST /oauth2/start` checks the ticket again, issues a one-time signed `state` bound to the
//!    browser (cookie `mio_signin`, `Path=/oauth2`, HttpOnly, SameSite=Lax, Secure with https),
//!    and answers 303 to the provider's authorization endpoint (PKCE S256, `login_hint`, prompt).
//! 4. `GET /oauth2/callback` checks the state (signature, expiry, same browser, one use), the
//!    `iss` parameter (RFC 9207), exchanges the code with the PKCE verifier, checks that the
//!    signed-in account is `spec.mailbox.address`, stores the grant Secret, and shows the result.
//!
//! Failures end on a page that says what happened and what to do. When the resource is known from
//! something the operator signed, the failure is also recorded in `status.lastSignInFailure` (the
//! controller, which owns the conditions, reports it as Authorized=False / Ready=False with that
//! reason while a sign-in is needed) and as a Warning event with action `SignIn`.
//!
//! No open redirects: the only redirect goes to the authorization endpoint of the resource's
//! provider. Tickets, states, codes, verifiers and tokens are never logged or shown.

// A `Failure` (the page and the report of a failed step) is returned only on the cold path of a
// request; boxing it would buy nothing.
#![allow(clippy::result_large_err)]

pub mod backend;
pub mod counting;
pub mod failure;
mod finish;
mod grant_checks;
pub mod key;
pub mod limit;
pub mod page;
mod start;
pub mod store;
pub mod token;

#[cfg(test)]
mod tests;

pub use backend::{Backend, KubeBackend, Report};
pub use failure::{Failure, Subject};
pub use grant_checks::{
    account_from_id_token, account_id, check_account_id, check_grant, check_id_token, check_issuer,
    grant_record,
};
pub use token::{Signer, StateClaims, Ticket};

use crate::api::{MailIntegration, ProviderKind, SignInStatus};
use crate::oauth::binding::Refusal;
use crate::oauth::{Bound, Carrying, OAuthClient};
use crate::provider::{self, FailureClass, ProviderEndpoints, ProviderResolver};
use crate::reason::Reason;
use crate::reconcile::context::SignInLinks;
use crate::reconcile::observed::{self, ClientCredentials};
use crate::secret::SecretValue;
use axum::{
    Router,
    extract::{Query, State, rejection::QueryRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use store::{Consumed, StateRecord, StateStore};
use tracing::warn;
use url::Url;

/// The cookie that binds a sign-in to the browser.
pub const COOKIE: &str = "mio_signin";
/// Default lifetime of a sign-in link.
pub const DEFAULT_LINK_TTL: Duration = Duration::from_secs(60 * 60);
/// How long the operator waits for the provider's answer after "Sign in".
pub const DEFAULT_STATE_TTL: Duration = Duration::from_secs(15 * 60);

/// Most read of a request body: the only one is the sign-in form (a ticket and a prompt, well under
/// 1 KiB); larger bodies get 413 before any handler runs.
pub const MAX_REQUEST_BODY: usize = 16 * 1024;

/// The signing purpose of tickets.
pub const TICKET: &str = "ticket";
/// The signing purpose of states.
pub const STATE: &str = "state";
/// The derivation purpose of PKCE verifiers.
const PKCE: &str = "pkce-verifier";

/// Settings of the sign-in server.
#[derive(Clone, Debug)]
pub struct SignInConfig {
    /// The externally reachable base URL (scheme, host, optional path prefix).
    pub public_url: Url,
    pub link_ttl: Duration,
    pub state_ttl: Duration,
    pub store_capacity: usize,
    /// Requests per source address ([`limit`]).
    pub per_source: limit::SourceLimit,
    /// The sign-in server's request timeout ([`crate::web::serve::Limits::request_timeout`]): the
    /// callback answers before it, and finishes storing a grant past it.
    pub request_timeout: Duration,
}

impl SignInConfig {
    pub fn new(public_url: Url) -> Self {
        Self {
            public_url,
            link_ttl: DEFAULT_LINK_TTL,
            state_ttl: DEFAULT_STATE_TTL,
            store_capacity: store::DEFAULT_CAPACITY,
            per_source: limit::SourceLimit::default(),
            request_timeout: crate::web::serve::Limits::default().request_timeout,
        }
    }
}

/// Check `--public-url`: http(s), a host, no query, fragment or credentials.
pub fn parse_public_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s.trim()).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{s:?} must be an http:// or https:// URL"));
    }
    if url.host().is_none() {
        return Err(format!("{s:?} has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{s:?} must not have a query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("the public URL must not carry credentials".to_owned());
    }
    Ok(url)
}

struct Inner {
    config: SignInConfig,
    /// `public_url` without a trailing slash.
    base: String,
    /// The path prefix of `public_url` ("" or "/prefix").
    prefix: String,
    secure: bool,
    signer: Signer,
    store: StateStore,
    backend: Arc<dyn Backend>,
    oauth: OAuthClient,
    providers: ProviderResolver,
}

/// The sign-in server. Cheap to clone.
#[derive(Clone)]
pub struct SignIn {
    inner: Arc<Inner>,
}

fn unix(t: Timestamp) -> i64 {
    t.as_second()
}

fn fmt_time(t: Timestamp) -> String {
    t.strftime("%Y-%m-%d %H:%M UTC").to_string()
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

impl SignIn {
    pub fn new(
        config: SignInConfig,
        signer: Signer,
        backend: Arc<dyn Backend>,
        oauth: OAuthClient,
        providers: ProviderResolver,
    ) -> Self {
        let base = config.public_url.as_str().trim_end_matches('/').to_owned();
        let prefix = config.public_url.path().trim_end_matches('/').to_owned();
        let secure = config.public_url.scheme() == "https";
        let store = StateStore::with_capacity(config.store_capacity);
        Self {
            inner: Arc::new(Inner {
                config,
                base,
                prefix,
                secure,
                signer,
                store,
                backend,
                oauth,
                providers,
            }),
        }
    }

    /// The routes (under the public URL's path prefix, if any).
    pub fn router(&self) -> Router {
        let routes = Router::new()
            .route("/sign-in", get(sign_in_page))
            .route("/oauth2/start", post(start::start))
            .route("/oauth2/callback", get(callback))
            .fallback(not_found)
            .with_state(self.clone());
        let app = if self.inner.prefix.is_empty() {
            routes
        } else {
            Router::new()
                .nest(&self.inner.prefix, routes)
                .fallback(not_found)
        };
        app.layer(tower_http::limit::RequestBodyLimitLayer::new(
            MAX_REQUEST_BODY,
        ))
        .layer(axum::middleware::from_fn_with_state(
            self.inner.config.per_source.clone(),
            limit::limit,
        ))
        .layer(axum::middleware::map_response(security_headers))
    }

    /// The operator's callback URL: `{public-url}/oauth2/callback`.
    pub fn callback_url(&self) -> String {
        format!("{}/oauth2/callback", self.inner.base)
    }

    /// The redirect URL of `mi`: `spec.oauth.redirectURL`, or the operator's callback URL.
    pub fn redirect_url(&self, mi: &MailIntegration) -> String {
        mi.spec
            .oauth
            .redirect_url
            .clone()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| self.callback_url())
    }

    /// A sign-in link for the resource `ns/name` with `uid`, valid from `now` for the link TTL.
    pub fn link_for(&self, ns: &str, name: &str, uid: &str, now: Timestamp) -> SignInStatus {
        let expires = add(now, self.inner.config.link_ttl);
        let ticket = self.inner.signer.sign(
            TICKET,
            &Ticket {
                ns: ns.to_owned(),
                name: name.to_owned(),
                uid: uid.to_owned(),
                exp: unix(expires),
                iat: unix(now),
            },
        );
        SignInStatus {
            url: format!("{}/sign-in?ticket={ticket}", self.inner.base),
            expires_at: Time(expires),
        }
    }

    fn cookie_path(&self) -> String {
        format!("{}/oauth2", self.inner.prefix)
    }

    fn public_origin(&self) -> String {
        self.inner.config.public_url.origin().ascii_serialization()
    }

    /// Verify a ticket and find its resource.
    async fn check_ticket(
        &self,
        raw: Option<&str>,
        now: Timestamp,
    ) -> Result<(Ticket, MailIntegration), Failure> {
        let invalid = |what: &str| {
            Failure::new(
                Reason::SignInLinkInvalid,
                StatusCode::BAD_REQUEST,
                "This sign-in link is not valid",
                what,
                "Open the current link from the resource: kubectl get mailint NAME -n NAMESPACE -o jsonpath='{.status.signIn.url}'",
            )
        };
        let raw = raw
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid("The link has no ticket: it was cut short when copied."))?;
        let ticket: Ticket = self.inner.signer.verify(TICKET, raw).map_err(|_| {
            invalid("The link's ticket is damaged, or was not made by this operator (or its sign-in key was replaced since).")
        })?;
        // Signature and expiry before any API call: an expired link (even a genuine one) costs
        // nothing but this page, and is not reported on the resource.
        if ticket.exp <= unix(now) {
            return Err(Failure::new(
                Reason::SignInLinkExpired,
                StatusCode::GONE,
                "This sign-in link has expired",
                format!(
                    "The link expired at {}. Links work for {} minutes after the operator made them.",
                    Timestamp::from_second(ticket.exp)
                        .map(fmt_time)
                        .unwrap_or_default(),
                    self.inner.config.link_ttl.as_secs() / 60
                ),
                format!(
                    "Open the current link: kubectl get mailint {} -n {} -o jsonpath='{{.status.signIn.url}}' (the operator renews it before it expires)",
                    ticket.name, ticket.ns
                ),
            ));
        }
        let mi = self.find(&ticket.ns, &ticket.name).await?;
        let subject = subject_of(&mi);
        if mi.uid().as_deref() != Some(ticket.uid.as_str()) {
            return Err(Failure::new(
                Reason::SignInLinkInvalid,
                StatusCode::GONE,
                "This sign-in link is for another MailIntegration",
                format!(
                    "The link was made for an earlier MailIntegration named {}/{}, which was deleted since; the one that exists now has another UID.",
                    ticket.ns, ticket.name
                ),
                "Open the current link from the resource: kubectl get mailint NAME -n NAMESPACE -o jsonpath='{.status.signIn.url}'",
            )
            .on(Some(subject)));
        }
        self.check_one_time(&ticket, &mi).await?;
        Ok((ticket, mi))
    }

    /// A link is one-time: a sign-in that succeeded since it was made (the grant's `issued_at`)
    /// ends it.
    async fn check_one_time(&self, ticket: &Ticket, mi: &MailIntegration) -> Result<(), Failure> {
        let ns = mi.namespace().unwrap_or_default();
        let secret = self
            .inner
            .backend
            .secret(&ns, &mi.grant_secret_name())
            .await
            .map_err(|e| {
                warn!(error = %e, "reading the grant Secret failed");
                api_unavailable()
            })?;
        let signed_in = secret
            .filter(|s| observed::grant_belongs_to(s, mi))
            .and_then(|s| observed::grant(Some(&s)))
            .and_then(|g| g.issued_at)
            .filter(|at| at.as_second() >= ticket.iat);
        let Some(at) = signed_in else {
            return Ok(());
        };
        Err(Failure::new(
            Reason::SignInLinkExpired,
            StatusCode::GONE,
            "This sign-in link was used already",
            format!(
                "A sign-in with this link succeeded at {}; a link works for one sign-in.",
                fmt_time(at)
            ),
            format!(
                "Nothing needs to be done if the mailbox is connected. To sign in again, open the current link: kubectl get mailint {} -n {} -o jsonpath='{{.status.signIn.url}}'",
                ticket.name, ticket.ns
            ),
        ))
    }

    async fn find(&self, ns: &str, name: &str) -> Result<MailIntegration, Failure> {
        match self.inner.backend.integration(ns, name).await {
            Ok(Some(mi)) => Ok(mi),
            Ok(None) => Err(Failure::new(
                Reason::SignInLinkInvalid,
                StatusCode::NOT_FOUND,
                "No such Mail Integration",
                format!("The MailIntegration {ns}/{name} does not exist (any more)."),
                "Check the name with kubectl get mailint -A; if it was deleted, create it again and use its new sign-in link.",
            )),
            Err(e) => {
                warn!(error = %e, integration = %format!("{ns}/{name}"), "reading the MailIntegration failed");
                Err(api_unavailable())
            }
        }
    }

    async fn client_credentials(&self, mi: &MailIntegration) -> Result<ClientCredentials, Failure> {
        let ns = mi.namespace().unwrap_or_default();
        let r = &mi.spec.oauth.client_secret_ref;
        let secret = self.inner.backend.secret(&ns, &r.name).await.map_err(|e| {
            warn!(error = %e, "reading the client Secret failed");
            api_unavailable()
        })?;
        // A client that authenticates with a certificate exchanges the code with its assertion.
        let certificate = match &mi.spec.oauth.client_certificate_ref {
            None => None,
            Some(c) => self.inner.backend.secret(&ns, &c.name).await.map_err(|e| {
                warn!(error = %e, "reading the client certificate Secret failed");
                api_unavailable()
            })?,
        };
        observed::client(&mi.spec, secret.as_ref(), certificate.as_ref()).map_err(|p| {
            let reason = p.reason();
            Failure::new(
                reason,
                StatusCode::CONFLICT,
                "The OAuth client is not set up",
                p.to_string(),
                reason.hint(),
            )
            .on(Some(subject_of(mi)))
        })
    }

    /// The binding check of a code exchange at `dest` ([`crate::oauth::binding`]).
    fn bind<'a>(
        &self,
        endpoints: &'a ProviderEndpoints,
        creds: &'a ClientCredentials,
        carrying: Carrying<'_>,
        dest: &Url,
    ) -> Result<Bound<'a>, Refusal> {
        self.inner.providers.bind(
            provider::TokenOperation::CodeExchange,
            dest,
            endpoints,
            creds,
            carrying,
        )
    }

    async fn endpoints(&self, mi: &MailIntegration) -> Result<ProviderEndpoints, Failure> {
        self.inner
            .providers
            .resolve(&mi.spec)
            .await
            .map_err(|class| provider_failure(&class).on(Some(subject_of(mi))))
    }

    /// Report a failure on its resource (when trusted) and log it; returns its page.
    async fn fail(&self, f: Failure, mi: Option<&MailIntegration>) -> Response {
        let integration = f
            .subject
            .as_ref()
            .map(|s| format!("{}/{}", s.ns, s.name))
            .unwrap_or_else(|| "-".into());
        warn!(reason = f.reason.as_str(), %integration, what = %f.what, "sign-in failed");
        if let Some(s) = &f.subject {
            let found;
            let mi = match mi {
                Some(mi) if mi.uid().as_deref() == Some(s.uid.as_str()) => Some(mi),
                _ => {
                    found = self
                        .inner
                        .backend
                        .integration(&s.ns, &s.name)
                        .await
                        .ok()
                        .flatten();
                    found
                        .as_ref()
                        .filter(|m| m.uid().as_deref() == Some(s.uid.as_str()))
                }
            };
            if let Some(mi) = mi {
                self.inner
                    .backend
                    .report(
                        mi,
                        Report::Failed {
                            reason: f.reason,
                            message: f.message(),
                        },
                    )
                    .await;
            }
        }
        html(f.status, page::failure_page(&f), &[])
    }
}

impl SignInLinks for SignIn {
    fn link(&self, mi: &MailIntegration, now: Timestamp) -> Option<SignInStatus> {
        let ns = mi.namespace()?;
        let uid = mi.uid()?;
        Some(self.link_for(&ns, &mi.name_any(), &uid, now))
    }
}

fn subject_of(mi: &MailIntegration) -> Subject {
    Subject {
        ns: mi.namespace().unwrap_or_default(),
        name: mi.name_any(),
        uid: mi.uid().unwrap_or_default(),
    }
}

fn api_unavailable() -> Failure {
    Failure::new(
        Reason::SignInFailed,
        StatusCode::SERVICE_UNAVAILABLE,
        "The operator cannot reach the Kubernetes API",
        "The operator could not read the resource from the Kubernetes API.",
        "Try again in a minute; if it repeats, check the operator's log and its RBAC permissions.",
    )
}

/// The page of a call the binding check refused.
fn refused(r: Refusal) -> Failure {
    Failure::new(
        r.reason,
        StatusCode::CONFLICT,
        "The sign-in cannot go on",
        r.message,
        r.reason.hint(),
    )
}

fn provider_failure(class: &FailureClass) -> Failure {
    let reason = match class.reason() {
        // "Sign in again" is what the user is doing: call it a failed sign-in.
        Reason::SignInRequired | Reason::ReauthRequired => Reason::SignInFailed,
        r => r,
    };
    let status = if class.is_permanent() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::BAD_GATEWAY
    };
    Failure::new(
        reason,
        status,
        "Sign-in failed",
        class.message(),
        if class.is_permanent() {
            reason.hint().to_owned()
        } else {
            "This is probably temporary: wait a minute, then open the sign-in link from status.signIn.url again.".to_owned()
        },
    )
}

/// A label for the provider on the page: Google, Microsoft, or the OIDC provider's host.
pub fn provider_label(kind: ProviderKind, endpoints: &ProviderEndpoints) -> String {
    match kind {
        ProviderKind::Oidc => endpoints
            .issuer
            .as_deref()
            .and_then(|i| Url::parse(i).ok())
            .unwrap_or_else(|| endpoints.authorization.clone())
            .host_str()
            .map(str::to_owned)
            .unwrap_or_else(|| provider::display_name(kind).to_owned()),
        _ => provider::display_name(kind).to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

fn html(status: StatusCode, body: String, form_action: &[&str]) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&page::csp(form_action)) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    r
}

/// Headers on every response of the sign-in port.
async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    if !h.contains_key(header::REFERRER_POLICY) {
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CONTENT_SECURITY_POLICY)
        && let Ok(v) = HeaderValue::from_str(&page::csp(&[]))
    {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    r
}

async fn not_found() -> Response {
    let f = Failure::new(
        Reason::SignInLinkInvalid,
        StatusCode::NOT_FOUND,
        "Page not found",
        "This address is not a page of the Mail Integration operator.",
        "Open the sign-in link from the resource: kubectl get mailint NAME -n NAMESPACE -o jsonpath='{.status.signIn.url}'",
    );
    html(f.status, page::failure_page(&f), &[])
}

// ---------------------------------------------------------------------------------------------
// GET /sign-in
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct TicketQuery {
    #[serde(default)]
    ticket: Option<String>,
}

async fn sign_in_page(
    State(s): State<SignIn>,
    query: Result<Query<TicketQuery>, QueryRejection>,
) -> Response {
    let now = Timestamp::now();
    let raw = query.ok().and_then(|Query(q)| q.ticket);
    let (ticket, mi) = match s.check_ticket(raw.as_deref(), now).await {
        Ok(v) => v,
        Err(f) => return s.fail(f, None).await,
    };
    let endpoints = match s.endpoints(&mi).await {
        Ok(e) => e,
        Err(f) => return s.fail(f, Some(&mi)).await,
    };
    let provider = provider_label(mi.spec.provider, &endpoints);
    let redirect_url = s.redirect_url(&mi);
    let action = format!("{}/oauth2/start", s.inner.prefix);
    let expires = Timestamp::from_second(ticket.exp)
        .map(fmt_time)
        .unwrap_or_default();
    let body = page::sign_in_page(&page::SignInView {
        namespace: &ticket.ns,
        name: &ticket.name,
        provider: &provider,
        mailbox: &mi.spec.mailbox.address,
        prompt: mi.spec.prompt(),
        ticket: raw.as_deref().unwrap_or_default().trim(),
        action: &action,
        redirect_url: &redirect_url,
        link_expires: &expires,
    });
    // The form posts here; the 303 that follows goes to the provider, which form-action must allow.
    let provider_origin = endpoints.authorization.origin().ascii_serialization();
    let mut r = html(StatusCode::OK, body, &["'self'", &provider_origin]);
    // The form's POST carries the operator's own origin (under no-referrer, browsers send
    // `Origin: null`, which /oauth2/start refuses); nothing leaves for another site.
    r.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

// ---------------------------------------------------------------------------------------------
// POST /oauth2/start
// ---------------------------------------------------------------------------------------------

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// The browser's sign-in nonce, if its cookie holds a well-formed one.
fn browser_nonce(headers: &HeaderMap) -> Option<&str> {
    cookie_value(headers, COOKIE).filter(|v| {
        v.len() == 43
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

// ---------------------------------------------------------------------------------------------
// GET /oauth2/callback
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct CallbackQuery {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
    #[serde(default)]
    iss: Option<String>,
}

fn state_failure(reason: Reason, title: &str, what: &str, todo: &str) -> Failure {
    Failure::new(reason, StatusCode::BAD_REQUEST, title, what, todo)
}

/// The checks of the `state` parameter and the browser cookie. On success, the resource.
async fn check_state(
    s: &SignIn,
    raw: Option<&str>,
    headers: &HeaderMap,
    now: Timestamp,
) -> Result<(StateClaims, MailIntegration), Failure> {
    const RESTART: &str = "Open the sign-in link from status.signIn.url again and start the sign-in from the operator's page.";
    let raw = raw.map(str::trim).filter(|v| !v.is_empty()).ok_or_else(|| {
        state_failure(
            Reason::SignInStateInvalid,
            "This answer has no state",
            "The provider sent the browser back without the state parameter the operator gave it, so it cannot be matched to a sign-in.",
            RESTART,
        )
    })?;
    let claims: StateClaims = match s.inner.signer.verify(STATE, raw) {
        Ok(c) => c,
        Err(_) => {
            // Altered: if it still carries the ID of a state this replica issued, the failure is
            // reported on the resource of that record (the payload itself is not trusted).
            let subject = token::unverified_payload::<StateClaims>(raw)
                .and_then(|c| s.inner.store.get(&c.id))
                .map(|r| Subject {
                    ns: r.ns,
                    name: r.name,
                    uid: r.uid,
                });
            return Err(state_failure(
                Reason::SignInStateInvalid,
                "This answer does not match a sign-in",
                "The state parameter is damaged or was not issued by this operator, so the answer was not used.",
                RESTART,
            )
            .on(subject));
        }
    };
    let subject = Some(Subject {
        ns: claims.ns.clone(),
        name: claims.name.clone(),
        uid: claims.uid.clone(),
    });
    if claims.exp <= unix(now) {
        return Err(state_failure(
            Reason::SignInStateExpired,
            "This sign-in took too long",
            &format!(
                "The operator waits {} minutes for the provider's answer; this one came later.",
                s.inner.config.state_ttl.as_secs() / 60
            ),
            "Open the sign-in link from status.signIn.url again and finish within a few minutes.",
        )
        .on(subject));
    }
    let same_browser = browser_nonce(headers)
        .is_some_and(|n| token::constant_time_eq(&token::browser_binding(n), &claims.b));
    if !same_browser {
        return Err(Failure::new(
            Reason::SignInBrowserMismatch,
            StatusCode::FORBIDDEN,
            "This sign-in was started in another browser",
            "The answer reached a browser that did not start this sign-in (or that blocks the operator's cookie), so it was not used.",
            "Open the sign-in link from status.signIn.url in this browser, allow cookies for the operator's address, and finish the sign-in here.",
        )
        .on(subject));
    }
    let record = StateRecord {
        ns: claims.ns.clone(),
        name: claims.name.clone(),
        uid: claims.uid.clone(),
        expires: Timestamp::from_second(claims.exp).unwrap_or(now),
        used: true,
    };
    if s.inner.store.consume(&claims.id, record, now) == Consumed::Used {
        return Err(state_failure(
            Reason::SignInStateReused,
            "This answer was used already",
            "The provider's answer to this sign-in was already used (the page was reloaded, or the address was opened again).",
            "Nothing was changed. If the sign-in did not finish, open the sign-in link from status.signIn.url again.",
        )
        .on(subject));
    }
    let mi = s.find(&claims.ns, &claims.name).await?;
    if mi.uid().as_deref() != Some(claims.uid.as_str()) {
        return Err(Failure::new(
            Reason::SignInLinkInvalid,
            StatusCode::GONE,
            "This sign-in is for another MailIntegration",
            format!(
                "The sign-in was started for an earlier MailIntegration named {}/{}, which was deleted since.",
                claims.ns, claims.name
            ),
            "Open the current sign-in link of the resource and sign in again.",
        )
        .on(Some(subject_of(&mi))));
    }
    Ok((claims, mi))
}

async fn callback(
    State(s): State<SignIn>,
    headers: HeaderMap,
    query: Result<Query<CallbackQuery>, QueryRejection>,
) -> Response {
    let started = tokio::time::Instant::now();
    let now = Timestamp::now();
    let q = query.map(|Query(q)| q).unwrap_or_default();
    let (claims, mi) = match check_state(&s, q.state.as_deref(), &headers, now).await {
        Ok(v) => v,
        Err(f) => return s.fail(f, None).await,
    };
    let subject = Some(subject_of(&mi));
    let prompt = page::parse_prompt(&claims.p);
    let redirect_url = s.redirect_url(&mi);
    let endpoints = match s.endpoints(&mi).await {
        Ok(e) => e,
        Err(f) => return s.fail(f, Some(&mi)).await,
    };
    let provider = provider_label(mi.spec.provider, &endpoints);
    if let Err(f) = check_issuer(q.iss.as_deref(), &endpoints, &provider) {
        return s.fail(f.on(subject), Some(&mi)).await;
    }
    if let Some(error) = q.error.as_deref() {
        let f = failure::provider_error(
            error,
            q.error_description.as_deref(),
            prompt,
            &provider,
            &redirect_url,
        );
        return s.fail(f.on(subject), Some(&mi)).await;
    }
    let Some(code) = q.code.filter(|c| !c.trim().is_empty()) else {
        let f = Failure::new(
            Reason::AuthorizationCodeMissing,
            StatusCode::BAD_REQUEST,
            "The provider sent no authorization code",
            format!("{provider} sent the browser back without an authorization code and without an error."),
            Reason::AuthorizationCodeMissing.hint(),
        )
        .on(subject);
        return s.fail(f, Some(&mi)).await;
    };
    let code = SecretValue::new(code);
    let creds = match s.client_credentials(&mi).await {
        Ok(c) => c,
        Err(f) => return s.fail(f, Some(&mi)).await,
    };
    // Exactly the token endpoint and client that /oauth2/start bound (signed into the state).
    let carrying = Carrying::Code {
        token_endpoint: &claims.t,
        client_id: &claims.c,
    };
    let bound = match s.bind(&endpoints, &creds, carrying, &endpoints.token) {
        Ok(b) => b,
        Err(refusal) => return s.fail(refused(refusal).on(subject), Some(&mi)).await,
    };
    let verifier = SecretValue::new(s.inner.signer.derive(PKCE, &claims.id));
    let grant = match s
        .inner
        .oauth
        .exchange_code(&bound, &code, &verifier, &redirect_url, now)
        .await
    {
        Ok(g) => g,
        Err(e) => {
            let f = if e.class.message().contains("redirect_uri_mismatch") {
                failure::redirect_mismatch(
                    &format!("{provider} refused the code exchange"),
                    &provider,
                    &redirect_url,
                )
            } else {
                provider_failure(&e.class)
            };
            return s.fail(f.on(subject), Some(&mi)).await;
        }
    };
    // The provider has issued a grant: from here on, whatever happens to this request (the
    // request timeout, the browser going away), the grant is checked and stored to the end.
    let exchanged = finish::Exchanged {
        mi,
        prompt,
        endpoints,
        provider,
        client_id: creds.client_id,
        grant,
        subject,
        now,
    };
    finish::answer(&s, started, exchanged).await
}
