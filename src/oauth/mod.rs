//! The OAuth 2.0 calls: token refresh, code exchange with PKCE, revocation (RFC 7009) and userinfo,
//! over the `oauth2` crate with a reqwest-backed HTTP client that keeps what `oauth2` drops (the
//! HTTP status, `Retry-After`, the content type) so that failures can be classified by
//! [`crate::provider::classify`].
//!
//! Credentials travel as [`SecretValue`]s and never appear in `Debug`, `Display` or error messages.
//! Clients authenticate with `client_secret_post` (credentials in the form body), or with a
//! certificate's client assertion (`private_key_jwt`, RFC 7523; see [`assertion`]).

use crate::api::{Prompt, ProviderKind};
use crate::http_limit::{self, ReadError};
use crate::provider::{
    self, ErrorBody, FailureCause, FailureClass, ProviderEndpoints, ProviderErrorBody,
    TokenEndpointFailure, TokenOperation,
};
use crate::reason::Reason;
use crate::secret::SecretValue;
use crate::sync::LockExt as _;
use base64::Engine as _;
use jiff::{SignedDuration, Timestamp};
use oauth2::basic::{BasicTokenIntrospectionResponse, BasicTokenType};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet,
    EndpointSet, ExtraTokenFields, HttpRequest, HttpResponse, PkceCodeChallenge, PkceCodeVerifier,
    RedirectUrl, RefreshToken, RequestTokenError, Scope, StandardRevocableToken,
    StandardTokenResponse, TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;
use url::Url;

mod app_only;
pub mod assertion;
pub mod binding;
pub use assertion::SigningKey;
pub use binding::{Bound, Carrying, CredentialOwner, GrantOrigin, bind};

/// Default TCP/TLS connect timeout towards providers.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default timeout of a whole request towards providers.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Lifetime assumed when a token response has no `expires_in` (RFC 6749 makes it only
/// RECOMMENDED). One hour is what Google, Microsoft and most servers issue; assuming longer could
/// hand workloads an expired token, and the refresh schedule corrects itself on the next refresh.
pub const ASSUMED_EXPIRES_IN: Duration = Duration::from_secs(3600);
/// Longest `expires_in` believed (a year); guards the timestamp arithmetic against nonsense.
const MAX_EXPIRES_IN: u64 = 366 * 24 * 3600;

/// The OAuth client's ID and secret, from the user's client Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCredentials {
    pub client_id: String,
    /// Empty when the client authenticates with a key instead (`signing_key`).
    pub client_secret: SecretValue,
    /// A certificate's key (client assertions, `private_key_jwt`) or a Google service account's
    /// key (the JWT-bearer grant), from a Secret the user marked.
    pub signing_key: Option<std::sync::Arc<SigningKey>>,
    /// The Secret holding the credential, and the servers its owner lets it go to (see
    /// [`binding`]).
    pub owner: CredentialOwner,
}

/// What a token endpoint granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenGrant {
    pub access_token: SecretValue,
    /// `Bearer` for every provider the operator supports.
    pub token_type: String,
    /// `now + expires_in` (one hour when the provider did not say; see [`ASSUMED_EXPIRES_IN`]).
    pub expires_at: Timestamp,
    /// A refresh token, when issued: on code exchange, and on every refresh with rotation
    /// (Microsoft, oidc-provider). A new one replaces the old one, which must be discarded.
    pub refresh_token: Option<SecretValue>,
    /// The granted scopes, when the provider listed them.
    pub scopes: Option<Vec<String>>,
    /// The OIDC ID token, when an identity scope was asked.
    pub id_token: Option<SecretValue>,
    /// When the refresh token ends, if the provider announced it (Google's
    /// `refresh_token_expires_in` for time-limited grants).
    pub refresh_token_expires_at: Option<Timestamp>,
}

impl TokenGrant {
    /// An access token alone, as a token Secret publishes it (no refresh token, scopes or ID token).
    pub fn access_only(
        access_token: SecretValue,
        token_type: String,
        expires_at: Timestamp,
    ) -> Self {
        Self {
            access_token,
            token_type,
            expires_at,
            refresh_token: None,
            scopes: None,
            id_token: None,
            refresh_token_expires_at: None,
        }
    }

    /// The claims of the ID token, if there is one (see [`decode_id_token_claims`]).
    pub fn id_token_claims(&self) -> Option<Result<IdTokenClaims, IdTokenError>> {
        self.id_token.as_ref().map(decode_id_token_claims)
    }
}

/// A failed call to a provider: what was done, with which provider, and what it means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenError {
    pub provider: ProviderKind,
    pub operation: TokenOperation,
    pub class: FailureClass,
}

impl TokenError {
    /// The reason users see.
    pub fn reason(&self) -> Reason {
        self.class.reason()
    }

    /// Whether only a human can fix it.
    pub fn is_permanent(&self) -> bool {
        self.class.is_permanent()
    }

    /// The provider's requested wait, for transient failures.
    pub fn retry_after(&self) -> Option<Duration> {
        self.class.retry_after()
    }

    fn permanent(
        provider: ProviderKind,
        operation: TokenOperation,
        reason: Reason,
        message: String,
    ) -> Self {
        Self {
            provider,
            operation,
            class: FailureClass::Permanent { reason, message },
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class.reason(), self.class.message())
    }
}

impl std::error::Error for TokenError {}

/// Which kind of token is revoked (RFC 7009 `token_type_hint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenTypeHint {
    AccessToken,
    RefreshToken,
}

impl TokenTypeHint {
    fn as_str(self) -> &'static str {
        match self {
            TokenTypeHint::AccessToken => "access_token",
            TokenTypeHint::RefreshToken => "refresh_token",
        }
    }
}

/// How a revocation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokeOutcome {
    /// The provider confirmed (RFC 7009 answers 200 also for unknown tokens).
    Revoked,
    /// The provider said the token was already invalid (Google answers 400 `invalid_token`).
    AlreadyInvalid,
    /// The provider has no revocation endpoint (Microsoft): nothing was sent; report that the
    /// grant must be removed at the provider (e.g. Entra ID → Enterprise applications).
    NoRevocationEndpoint,
}

// ---------------------------------------------------------------------------------------------
// The oauth2 crate's types, specialised
// ---------------------------------------------------------------------------------------------

/// Token-response fields beyond RFC 6749 §5.1 that the operator reads.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct GrantExtraFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token_expires_in: Option<u64>,
}

impl fmt::Debug for GrantExtraFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrantExtraFields")
            .field("id_token", &self.id_token.as_ref().map(|_| "[redacted]"))
            .field("refresh_token_expires_in", &self.refresh_token_expires_in)
            .finish()
    }
}

impl ExtraTokenFields for GrantExtraFields {}

type GrantResponse = StandardTokenResponse<GrantExtraFields, BasicTokenType>;

type TokenClient = oauth2::Client<
    ProviderErrorBody,
    GrantResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    ProviderErrorBody,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

fn token_client(bound: &Bound<'_>) -> TokenClient {
    let creds = bound.creds();
    let client = oauth2::Client::new(ClientId::new(creds.client_id.clone()))
        .set_auth_type(AuthType::RequestBody)
        .set_token_uri(TokenUrl::from_url(bound.url().clone()));
    if creds.client_secret.is_empty() {
        client
    } else {
        client.set_client_secret(ClientSecret::new(creds.client_secret.expose().to_owned()))
    }
}

/// A [`Bound`] is checked for one operation: it is not used for another.
fn check_op(bound: &Bound<'_>, op: TokenOperation) -> Result<(), TokenError> {
    if bound.op() == op {
        return Ok(());
    }
    Err(TokenError::permanent(
        bound.endpoints().kind,
        op,
        Reason::OAuthServerNotAllowed,
        format!(
            "the destination was checked for {}, not for {}",
            bound.op().describe(),
            op.describe()
        ),
    ))
}

/// A client assertion for this request when the client authenticates with a certificate
/// (`private_key_jwt`): addressed to the token endpoint, as Microsoft Entra and oidc-provider
/// require for the token and revocation endpoints alike.
fn client_assertion(
    endpoints: &ProviderEndpoints,
    creds: &ClientCredentials,
    op: TokenOperation,
    now: Timestamp,
) -> Result<Option<SecretValue>, TokenError> {
    match creds.signing_key.as_deref() {
        Some(SigningKey::Certificate(cert)) => cert
            .client_assertion(&creds.client_id, endpoints.token.as_str(), now)
            .map(Some)
            .map_err(|m| {
                TokenError::permanent(
                    endpoints.kind,
                    op,
                    Reason::ClientKeyInvalid,
                    format!("{m}: check the certificate Secret"),
                )
            }),
        _ => Ok(None),
    }
}

/// What the HTTP layer saw of the last response (the `oauth2` crate keeps only the body).
#[derive(Clone, Debug, Default)]
struct ResponseMeta {
    status: u16,
    retry_after: Option<String>,
    content_type: Option<String>,
    www_authenticate: Option<String>,
}

impl ResponseMeta {
    fn of(status: reqwest::StatusCode, headers: &reqwest::header::HeaderMap) -> Self {
        let header = |name: reqwest::header::HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Self {
            status: status.as_u16(),
            retry_after: header(reqwest::header::RETRY_AFTER),
            content_type: header(reqwest::header::CONTENT_TYPE),
            www_authenticate: header(reqwest::header::WWW_AUTHENTICATE),
        }
    }
}

/// Why the HTTP layer produced no response. Messages never contain the URL's query or body.
#[derive(Debug, thiserror::Error)]
enum HttpError {
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Connect(String),
    /// The body passed [`http_limit::TOKEN_RESPONSE_LIMIT`]; the status and headers were kept.
    #[error("the answer is larger than {limit} bytes")]
    TooLarge { limit: usize },
}

impl HttpError {
    fn of(e: &reqwest::Error) -> Self {
        if e.is_timeout() {
            HttpError::Timeout
        } else {
            HttpError::Connect(provider::describe_reqwest_error(e))
        }
    }

    fn of_read(e: ReadError) -> Self {
        match e {
            ReadError::TooLarge { limit } => HttpError::TooLarge { limit },
            ReadError::Transport(e) => HttpError::of(&e),
        }
    }
}

/// The `oauth2::AsyncHttpClient` behind every token request: reqwest, remembering the metadata.
/// It takes owned handles (both are cheap `Arc` clones) so that its future borrows nothing: a
/// borrowing closure makes the caller's future fail rustc's higher-ranked `Send` check inside
/// kube-runtime's controller.
async fn send(
    http: reqwest::Client,
    request: HttpRequest,
    meta: std::sync::Arc<Mutex<Option<ResponseMeta>>>,
) -> Result<HttpResponse, HttpError> {
    let request = reqwest::Request::try_from(request).map_err(|e| {
        HttpError::Connect(format!(
            "could not build the request: {}",
            provider::describe_reqwest_error(&e)
        ))
    })?;
    let response = http.execute(request).await.map_err(|e| HttpError::of(&e))?;
    let status = response.status();
    let headers = response.headers().clone();
    *meta.locked() = Some(ResponseMeta::of(status, &headers));
    let body = http_limit::read_capped(response, http_limit::TOKEN_RESPONSE_LIMIT)
        .await
        .map_err(HttpError::of_read)?;
    let mut builder = http::Response::builder().status(status);
    for (name, value) in &headers {
        builder = builder.header(name, value);
    }
    builder
        .body(body)
        .map_err(|e| HttpError::Connect(format!("could not read the response: {e}")))
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// Build the HTTP client used towards providers: rustls, the given timeouts, and no redirects
/// (following redirects from a token endpoint would forward credentials elsewhere).
pub fn build_http_client(
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!(
            "mail-integration-operator/",
            env!("CARGO_PKG_VERSION")
        ))
        .build()
}

/// Whether `ip` is inside the operator's own pod or host, as a name in a spec may lead: loopback,
/// unspecified (0.0.0.0 and :: reach loopback on Linux) or link-local (169.254.0.0/16 with the
/// cloud metadata address, fe80::/10).
pub fn is_own_host(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_unspecified() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// The system's resolver, refusing a name that leads to [its own host](is_own_host): in an
/// operator without `--allow-loopback`, a spec's `https://name-of-mine.example` that resolves to
/// 127.0.0.1 must not reach the pod's sidecars any more than `https://127.0.0.1` may.
#[derive(Debug)]
struct NotOwnHost;

impl reqwest::dns::Resolve for NotOwnHost {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some(bad) = addrs.iter().find(|a| is_own_host(a.ip())) {
                return Err(format!(
                    "{} resolves to {}, inside the operator's own pod or host, which the operator calls only when started with --allow-loopback",
                    crate::reason::quoted(&host),
                    bad.ip()
                )
                .into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// [`DEFAULT_REQUEST_TIMEOUT`] at the test-only protocol scale
/// ([`crate::reconcile::inflight::set_test_scale`]): a part of the write-ahead mark's window.
fn request_timeout() -> Duration {
    crate::reconcile::inflight::scaled(DEFAULT_REQUEST_TIMEOUT)
}

/// Calls the provider's token, revocation and userinfo endpoints. Cheap to clone.
#[derive(Clone, Debug)]
pub struct OAuthClient {
    http: reqwest::Client,
}

impl OAuthClient {
    /// A client with the default timeouts (10 s connect, 30 s per request).
    pub fn new() -> Result<Self, reqwest::Error> {
        Self::with_timeouts(DEFAULT_CONNECT_TIMEOUT, request_timeout())
    }

    /// A client with the given timeouts.
    pub fn with_timeouts(connect: Duration, request: Duration) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: build_http_client(connect, request)?,
        })
    }

    /// A client with the default timeouts whose names may not lead to loopback or link-local
    /// addresses (an operator without `--allow-loopback`).
    pub fn not_to_own_host() -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: reqwest::Client::builder()
                .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
                .timeout(request_timeout())
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!(
                    "mail-integration-operator/",
                    env!("CARGO_PKG_VERSION")
                ))
                .dns_resolver(std::sync::Arc::new(NotOwnHost))
                .build()?,
        })
    }

    /// A client over an existing reqwest client (which should not follow redirects).
    pub fn from_http_client(http: reqwest::Client) -> Self {
        Self { http }
    }

    /// The underlying HTTP client (to share with [`provider::ProviderResolver`]).
    pub fn http_client(&self) -> &reqwest::Client {
        &self.http
    }

    /// Refresh the access token (RFC 6749 §6). `scopes` is sent only when non-empty: Google and
    /// oidc-provider keep the original grant's scopes (see [`provider::refresh_scopes`]).
    /// A returned `refresh_token` replaces the old one, which must be persisted first.
    pub async fn refresh(
        &self,
        bound: &Bound<'_>,
        refresh_token: &SecretValue,
        scopes: &[String],
        now: Timestamp,
    ) -> Result<TokenGrant, TokenError> {
        let (endpoints, creds) = (bound.endpoints(), bound.creds());
        let op = TokenOperation::Refresh;
        check_op(bound, op)?;
        let assertion = client_assertion(endpoints, creds, op, now)?;
        let client = token_client(bound);
        let token = RefreshToken::new(refresh_token.expose().to_owned());
        let mut request = client.exchange_refresh_token(&token);
        if !scopes.is_empty() {
            request = request.add_scopes(scopes.iter().map(|s| Scope::new(s.clone())));
        }
        if let Some(a) = &assertion {
            request = request
                .add_extra_param("client_assertion_type", assertion::CLIENT_ASSERTION_TYPE)
                .add_extra_param("client_assertion", a.expose());
        }
        let meta = std::sync::Arc::new(Mutex::new(None));
        let call = |r: HttpRequest| send(self.http.clone(), r, meta.clone());
        let result = request.request_async(&call).await;
        let meta = meta.locked().take();
        let mut secrets = vec![creds.client_secret.expose(), refresh_token.expose()];
        secrets.extend(assertion.as_ref().map(SecretValue::expose));
        token_result(endpoints.kind, op, result, meta, now, &secrets)
    }

    /// Exchange an authorization code (RFC 6749 §4.1.3) with its PKCE verifier (RFC 7636).
    pub async fn exchange_code(
        &self,
        bound: &Bound<'_>,
        code: &SecretValue,
        pkce_verifier: &SecretValue,
        redirect_url: &str,
        now: Timestamp,
    ) -> Result<TokenGrant, TokenError> {
        let (endpoints, creds) = (bound.endpoints(), bound.creds());
        let op = TokenOperation::CodeExchange;
        check_op(bound, op)?;
        let redirect = RedirectUrl::new(redirect_url.to_owned()).map_err(|e| {
            TokenError::permanent(
                endpoints.kind,
                op,
                Reason::InvalidEndpoint,
                format!("the redirect URL {redirect_url:?} is not a URL ({e}): check spec.oauth.redirectURL"),
            )
        })?;
        let assertion = client_assertion(endpoints, creds, op, now)?;
        let client = token_client(bound).set_redirect_uri(redirect);
        let mut request = client
            .exchange_code(AuthorizationCode::new(code.expose().to_owned()))
            .set_pkce_verifier(PkceCodeVerifier::new(pkce_verifier.expose().to_owned()));
        if let Some(a) = &assertion {
            request = request
                .add_extra_param("client_assertion_type", assertion::CLIENT_ASSERTION_TYPE)
                .add_extra_param("client_assertion", a.expose());
        }
        let meta = std::sync::Arc::new(Mutex::new(None));
        let call = |r: HttpRequest| send(self.http.clone(), r, meta.clone());
        let result = request.request_async(&call).await;
        let meta = meta.locked().take();
        let mut secrets = vec![
            creds.client_secret.expose(),
            code.expose(),
            pkce_verifier.expose(),
        ];
        secrets.extend(assertion.as_ref().map(SecretValue::expose));
        token_result(endpoints.kind, op, result, meta, now, &secrets)
    }

    /// Revoke a token (RFC 7009) with `client_secret_post`. Revoking a refresh token ends the
    /// grant. Done with reqwest directly: `oauth2` 5 refuses non-https revocation URLs, which
    /// rules out loopback test servers.
    pub async fn revoke(
        &self,
        bound: &Bound<'_>,
        token: &SecretValue,
        hint: TokenTypeHint,
        now: Timestamp,
    ) -> Result<RevokeOutcome, TokenError> {
        let (endpoints, creds) = (bound.endpoints(), bound.creds());
        let op = TokenOperation::Revocation;
        check_op(bound, op)?;
        let url = bound.url();
        let assertion = client_assertion(endpoints, creds, op, now)?;
        let mut form = vec![
            ("token", token.expose()),
            ("token_type_hint", hint.as_str()),
            ("client_id", creds.client_id.as_str()),
        ];
        if !creds.client_secret.is_empty() {
            form.push(("client_secret", creds.client_secret.expose()));
        }
        if let Some(a) = &assertion {
            form.push(("client_assertion_type", assertion::CLIENT_ASSERTION_TYPE));
            form.push(("client_assertion", a.expose()));
        }
        let mut secrets = vec![creds.client_secret.expose(), token.expose()];
        secrets.extend(assertion.as_ref().map(SecretValue::expose));
        let response = self
            .http
            .post(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                return Err(token_error(
                    endpoints.kind,
                    op,
                    transport_failure(&e),
                    &secrets,
                ));
            }
        };
        if response.status().is_success() {
            return Ok(RevokeOutcome::Revoked);
        }
        let cause = http_failure(response, now).await;
        if let FailureCause::Http {
            body: ErrorBody::OAuth(b),
            ..
        } = &cause
            && b.error == "invalid_token"
        {
            return Ok(RevokeOutcome::AlreadyInvalid);
        }
        Err(token_error(endpoints.kind, op, cause, &secrets))
    }

    /// Read the OIDC userinfo endpoint with the access token.
    pub async fn userinfo(
        &self,
        endpoints: &ProviderEndpoints,
        access_token: &SecretValue,
        now: Timestamp,
    ) -> Result<serde_json::Value, TokenError> {
        let op = TokenOperation::UserInfo;
        let Some(url) = &endpoints.userinfo else {
            return Err(TokenError::permanent(
                endpoints.kind,
                op,
                Reason::ProviderError,
                format!(
                    "{} has no userinfo endpoint for this token: read the account from the ID token, or set spec.oauth.endpoints.userinfo",
                    provider::display_name(endpoints.kind)
                ),
            ));
        };
        let secrets = [access_token.expose()];
        let body = send_and_read(
            self.http
                .get(url.clone())
                .bearer_auth(access_token.expose()),
            http_limit::USERINFO_LIMIT,
            "the userinfo endpoint",
            (endpoints.kind, op),
            &secrets,
            now,
        )
        .await?;
        serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .filter(serde_json::Value::is_object)
            .ok_or_else(|| {
                token_error(
                    endpoints.kind,
                    op,
                    FailureCause::InvalidResponse {
                        detail: "the userinfo response is not a JSON object".to_owned(),
                    },
                    &secrets,
                )
            })
    }
}

/// What [`OAuthClient::refresh`] makes of the token endpoint's answer `response`, without the
/// network: the `oauth2` crate's reading of the answer, then the same interpretation as a real
/// refresh (the grant, or the classified failure with `creds`' client secret and `refresh_token`
/// scrubbed from its message). Public for the property tests (tests/properties.rs), which feed it
/// arbitrary statuses, headers and bodies.
pub async fn interpret_refresh_response(
    endpoints: &ProviderEndpoints,
    creds: &ClientCredentials,
    refresh_token: &SecretValue,
    response: HttpResponse,
    now: Timestamp,
) -> Result<TokenGrant, TokenError> {
    // Nothing is sent: the answer is given.
    let bound = Bound::offline(endpoints, creds, TokenOperation::Refresh);
    let client = token_client(&bound);
    let token = RefreshToken::new(refresh_token.expose().to_owned());
    let meta = ResponseMeta::of(response.status(), response.headers());
    let answer = |_: HttpRequest| std::future::ready(Ok::<_, HttpError>(response.clone()));
    let result = client
        .exchange_refresh_token(&token)
        .request_async(&answer)
        .await;
    token_result(
        endpoints.kind,
        TokenOperation::Refresh,
        result,
        Some(meta),
        now,
        &[creds.client_secret.expose(), refresh_token.expose()],
    )
}

/// The grant of a token response, or its failure classified and scrubbed of `secrets`.
fn token_result(
    kind: ProviderKind,
    operation: TokenOperation,
    result: Result<GrantResponse, RequestTokenError<HttpError, ProviderErrorBody>>,
    meta: Option<ResponseMeta>,
    now: Timestamp,
    secrets: &[&str],
) -> Result<TokenGrant, TokenError> {
    match result {
        Ok(response) => Ok(grant_from(&response, now)),
        Err(e) => Err(token_error(
            kind,
            operation,
            failure_from(e, meta, now),
            secrets,
        )),
    }
}

fn token_error(
    kind: ProviderKind,
    operation: TokenOperation,
    cause: FailureCause,
    secrets: &[&str],
) -> TokenError {
    // Scrubbed before classification too: the message keeps only the first 300 characters of
    // what the provider said, which can end inside a credential that it echoed.
    let cause = cause.scrub(secrets);
    let class = provider::classify(kind, &TokenEndpointFailure { operation, cause }).scrub(secrets);
    TokenError {
        provider: kind,
        operation,
        class,
    }
}

fn transport_failure(e: &reqwest::Error) -> FailureCause {
    if e.is_timeout() {
        FailureCause::Timeout
    } else {
        FailureCause::Connect {
            detail: provider::describe_reqwest_error(e),
        }
    }
}

/// A successful response whose body could not be read.
fn read_failure(e: ReadError, endpoint: &str) -> FailureCause {
    match e {
        ReadError::TooLarge { limit } => FailureCause::InvalidResponse {
            detail: http_limit::too_large(endpoint, limit),
        },
        ReadError::Transport(e) => transport_failure(&e),
    }
}

/// Send a request made with reqwest directly (userinfo, app-only and JWT-bearer token requests) and
/// read its successful body, at most `limit` bytes; every failure classified for `op`, with
/// `secrets` scrubbed from its message.
async fn send_and_read(
    request: reqwest::RequestBuilder,
    limit: usize,
    endpoint: &str,
    (kind, op): (ProviderKind, TokenOperation),
    secrets: &[&str],
    now: Timestamp,
) -> Result<Vec<u8>, TokenError> {
    let response = request
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| token_error(kind, op, transport_failure(&e), secrets))?;
    if !response.status().is_success() {
        let cause = http_failure(response, now).await;
        return Err(token_error(kind, op, cause, secrets));
    }
    http_limit::read_capped(response, limit)
        .await
        .map_err(|e| token_error(kind, op, read_failure(e, endpoint), secrets))
}

/// Read a failed response made with reqwest directly (revocation, userinfo).
async fn http_failure(response: reqwest::Response, now: Timestamp) -> FailureCause {
    let meta = ResponseMeta::of(response.status(), response.headers());
    let body = match http_limit::read_capped(response, http_limit::USERINFO_LIMIT).await {
        Ok(b) => error_body(&meta, &b),
        Err(ReadError::TooLarge { .. }) => oversized_error_body(&meta),
        Err(ReadError::Transport(e)) if e.is_timeout() => return FailureCause::Timeout,
        Err(ReadError::Transport(_)) => error_body(&meta, &[]),
    };
    FailureCause::Http {
        status: meta.status,
        retry_after: meta
            .retry_after
            .as_deref()
            .and_then(|v| parse_retry_after(v, now)),
        body,
    }
}

/// An error status whose body is over the limit: the status still says what happened (a 503 is
/// still worth a retry, a 401 still means bad credentials), so it is classified as usual with a
/// body that is not an OAuth error (unless `WWW-Authenticate` carries one).
fn oversized_error_body(meta: &ResponseMeta) -> ErrorBody {
    match error_body(meta, &[]) {
        ErrorBody::Empty => ErrorBody::Other {
            content_type: meta.content_type.clone(),
        },
        other => other,
    }
}

/// Interpret an error response body: an OAuth error (JSON, or the `WWW-Authenticate` header of a
/// bearer-token error, RFC 6750 §3), an HTML page, nothing, or something else.
fn error_body(meta: &ResponseMeta, body: &[u8]) -> ErrorBody {
    if let Ok(b) = serde_json::from_slice::<ProviderErrorBody>(body)
        && !b.error.is_empty()
    {
        return ErrorBody::OAuth(b);
    }
    if let Some(b) = meta
        .www_authenticate
        .as_deref()
        .and_then(parse_www_authenticate)
    {
        return ErrorBody::OAuth(b);
    }
    let is_html = meta
        .content_type
        .as_deref()
        .is_some_and(|ct| ct.to_ascii_lowercase().contains("html"))
        || body.trim_ascii_start().starts_with(b"<");
    if is_html {
        ErrorBody::Html
    } else if body.trim_ascii().is_empty() {
        ErrorBody::Empty
    } else {
        ErrorBody::Other {
            content_type: meta.content_type.clone(),
        }
    }
}

/// `Bearer realm="x", error="invalid_token", error_description="..."` → the error parameters.
fn parse_www_authenticate(value: &str) -> Option<ProviderErrorBody> {
    let param = |name: &str| {
        let start = value
            .find(&format!("{name}=\""))?
            .checked_add(name.len())?
            .checked_add(2)?;
        let rest = value.get(start..)?;
        let end = rest.find('"')?;
        rest.get(..end).map(str::to_owned)
    };
    let error = param("error")?;
    Some(ProviderErrorBody::new(
        error,
        param("error_description").as_deref(),
    ))
}

/// Turn an `oauth2` error plus what the HTTP layer saw into a [`FailureCause`]. Never copies the
/// response body (a malformed success response may carry tokens).
fn failure_from(
    e: RequestTokenError<HttpError, ProviderErrorBody>,
    meta: Option<ResponseMeta>,
    now: Timestamp,
) -> FailureCause {
    let meta = meta.unwrap_or_default();
    let retry_after = meta
        .retry_after
        .as_deref()
        .and_then(|v| parse_retry_after(v, now));
    let http = |body| FailureCause::Http {
        status: meta.status,
        retry_after,
        body,
    };
    match e {
        RequestTokenError::Request(HttpError::Timeout) => FailureCause::Timeout,
        RequestTokenError::Request(HttpError::Connect(detail)) => FailureCause::Connect { detail },
        RequestTokenError::Request(HttpError::TooLarge { .. }) if meta.status >= 400 => {
            http(oversized_error_body(&meta))
        }
        RequestTokenError::Request(HttpError::TooLarge { limit }) => {
            FailureCause::InvalidResponse {
                detail: http_limit::too_large("the token endpoint", limit),
            }
        }
        RequestTokenError::ServerResponse(b) => http(ErrorBody::OAuth(b)),
        RequestTokenError::Parse(_, body) if meta.status != 200 => http(error_body(&meta, &body)),
        RequestTokenError::Parse(err, body) => {
            // Some servers answer errors with 200; read them as errors.
            if let Ok(b) = serde_json::from_slice::<ProviderErrorBody>(&body)
                && !b.error.is_empty()
            {
                return http(ErrorBody::OAuth(b));
            }
            // Name the field only: serde's message can quote the offending value.
            FailureCause::InvalidResponse {
                detail: format!(
                    "the token response could not be read at field `{}`",
                    err.path()
                ),
            }
        }
        RequestTokenError::Other(_) if meta.status != 200 => http(ErrorBody::Empty),
        RequestTokenError::Other(msg) => FailureCause::InvalidResponse { detail: msg },
    }
}

fn grant_from(response: &GrantResponse, now: Timestamp) -> TokenGrant {
    let after = |d: Duration| {
        let secs = d.as_secs().min(MAX_EXPIRES_IN) as i64;
        now.checked_add(SignedDuration::from_secs(secs))
            .unwrap_or(now)
    };
    let extra = response.extra_fields();
    TokenGrant {
        access_token: SecretValue::new(response.access_token().secret().clone()),
        token_type: match response.token_type() {
            BasicTokenType::Bearer => "Bearer".to_owned(),
            BasicTokenType::Mac => "MAC".to_owned(),
            BasicTokenType::Extension(s) => s.clone(),
        },
        // expires_in is only RECOMMENDED (RFC 6749 §5.1): assume an hour when it is missing.
        expires_at: after(response.expires_in().unwrap_or(ASSUMED_EXPIRES_IN)),
        refresh_token: response
            .refresh_token()
            .map(|t| SecretValue::new(t.secret().clone())),
        scopes: response
            .scopes()
            .map(|v| v.iter().map(|s| s.to_string()).collect()),
        id_token: extra.id_token.clone().map(SecretValue::new),
        refresh_token_expires_at: extra
            .refresh_token_expires_in
            .map(|s| after(Duration::from_secs(s))),
    }
}

/// Parse `Retry-After` (RFC 9110 §10.2.3): delay seconds, or an HTTP date relative to `now`
/// (a date in the past means "now").
pub fn parse_retry_after(value: &str, now: Timestamp) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(value)
        .ok()?;
    let secs = at.as_second().saturating_sub(now.as_second());
    Some(Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

// ---------------------------------------------------------------------------------------------
// Sign-in helpers: PKCE, authorization URL, ID token claims
// ---------------------------------------------------------------------------------------------

/// A fresh PKCE pair (RFC 7636): the verifier (43 characters, kept secret until the code
/// exchange) and its S256 challenge (sent in the authorization request).
pub fn pkce_pair() -> (SecretValue, String) {
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    (
        SecretValue::new(verifier.secret().clone()),
        challenge.as_str().to_owned(),
    )
}

/// The S256 challenge of a verifier: `BASE64URL(SHA256(verifier))`.
pub fn pkce_challenge_s256(verifier: &SecretValue) -> String {
    use sha2::Digest as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.expose().as_bytes()))
}

/// Everything the sign-in page needs to send the browser to the provider.
#[derive(Clone, Debug)]
pub struct AuthorizationRequest<'a> {
    pub endpoints: &'a ProviderEndpoints,
    pub client_id: &'a str,
    pub redirect_url: &'a str,
    pub scopes: &'a [String],
    pub prompt: Prompt,
    /// The one-time `state`, bound to the browser by the caller.
    pub state: &'a str,
    pub pkce_verifier: &'a SecretValue,
    /// Pre-fills the account at the provider (the mailbox address).
    pub login_hint: Option<&'a str>,
}

/// The provider URL to send the browser to: `response_type=code`, the scopes, `state`, PKCE S256,
/// `login_hint`, and the provider's own parameters ([`provider::authorization_params`]).
pub fn authorization_url(req: &AuthorizationRequest<'_>) -> Result<Url, url::ParseError> {
    let client: oauth2::basic::BasicClient<EndpointSet> =
        oauth2::basic::BasicClient::new(ClientId::new(req.client_id.to_owned()))
            .set_auth_uri(AuthUrl::from_url(req.endpoints.authorization.clone()))
            .set_redirect_uri(RedirectUrl::new(req.redirect_url.to_owned())?);
    let verifier = PkceCodeVerifier::new(req.pkce_verifier.expose().to_owned());
    let state = req.state.to_owned();
    let mut builder = client
        .authorize_url(move || CsrfToken::new(state))
        .add_scopes(req.scopes.iter().map(|s| Scope::new(s.clone())))
        .set_pkce_challenge(PkceCodeChallenge::from_code_verifier_sha256(&verifier));
    for (name, value) in provider::authorization_params(req.endpoints.kind, req.prompt) {
        builder = builder.add_extra_param(name, value);
    }
    if let Some(hint) = req.login_hint {
        builder = builder.add_extra_param("login_hint", hint.to_owned());
    }
    Ok(builder.url().0)
}

/// The ID token claims the operator reads to learn who signed in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct IdTokenClaims {
    #[serde(default)]
    pub iss: Option<String>,
    #[serde(default)]
    pub sub: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default, deserialize_with = "bool_or_string")]
    pub email_verified: Option<bool>,
    /// Microsoft: the user principal name, present even without an `email` claim.
    #[serde(default)]
    pub preferred_username: Option<String>,
    /// The client(s) the token was issued for (a string or an array).
    #[serde(default, deserialize_with = "string_or_strings")]
    pub aud: Vec<String>,
    /// Expiry, seconds since the epoch.
    #[serde(default)]
    pub exp: Option<i64>,
    /// Microsoft: the directory (tenant) ID of the account.
    #[serde(default)]
    pub tid: Option<String>,
    /// Microsoft: the account's object ID in its directory (immutable, unlike `email`).
    #[serde(default)]
    pub oid: Option<String>,
}

fn string_or_strings<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match Option::<serde_json::Value>::deserialize(d)? {
        Some(serde_json::Value::String(s)) => vec![s],
        Some(serde_json::Value::Array(a)) => a
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    })
}

fn bool_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    Ok(match Option::<serde_json::Value>::deserialize(d)? {
        Some(serde_json::Value::Bool(b)) => Some(b),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    })
}

/// Why an ID token's claims could not be read. Never contains the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdTokenError {
    #[error("the ID token is not a JWT (three dot-separated parts)")]
    NotAJwt,
    #[error("the ID token's payload is not base64url")]
    NotBase64,
    #[error("the ID token's payload is not a JSON object of claims")]
    NotJson,
}

/// Read the claims of an ID token without verifying its signature. That is allowed here because
/// the token came straight from the token endpoint over TLS, authenticated by the client
/// secret (OpenID Connect Core 1.0 §3.1.3.7, item 6). Never use this for an ID token from
/// anywhere else.
pub fn decode_id_token_claims(id_token: &SecretValue) -> Result<IdTokenClaims, IdTokenError> {
    let parts: Vec<&str> = id_token.expose().split('.').collect();
    let [_, payload, _] = parts.as_slice() else {
        return Err(IdTokenError::NotAJwt);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| IdTokenError::NotBase64)?;
    serde_json::from_slice(&bytes).map_err(|_| IdTokenError::NotJson)
}

#[cfg(test)]
mod tests;
