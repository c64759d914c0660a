//! Everything that differs per OAuth provider (Google, Microsoft Entra ID, any OIDC provider):
//! endpoints, scopes, authorization-request parameters, default mail servers and what the token
//! endpoint's errors mean. The rest of the operator asks this module instead of matching on the
//! provider itself.

mod classify;

pub use classify::*;

use crate::api::{
    Endpoints, GrantType, MailIntegrationSpec, MailProtocol, MailServer, Prompt, ProviderKind,
    TlsMode,
};
use crate::sync::LockExt as _;
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use url::Url;

/// The scope Gmail needs for IMAP, POP and SMTP.
pub const GOOGLE_MAIL_SCOPE: &str = "https://mail.google.com/";
/// Microsoft: read mail over IMAP.
pub const MICROSOFT_IMAP_SCOPE: &str = "https://outlook.office.com/IMAP.AccessAsUser.All";
/// Microsoft: read mail over POP.
pub const MICROSOFT_POP_SCOPE: &str = "https://outlook.office.com/POP.AccessAsUser.All";
/// Microsoft: send mail over SMTP AUTH.
pub const MICROSOFT_SMTP_SCOPE: &str = "https://outlook.office.com/SMTP.Send";
/// Microsoft app-only (client credentials): every Exchange Online permission the app was granted
/// (IMAP.AccessAsApp, POP.AccessAsApp, SMTP.SendAsApp) in one token.
pub const MICROSOFT_APP_ONLY_SCOPE: &str = "https://outlook.office365.com/.default";
/// Ask for a refresh token (Microsoft, OIDC).
pub const OFFLINE_ACCESS_SCOPE: &str = "offline_access";

/// How long a fetched OIDC discovery document is reused.
pub const DEFAULT_DISCOVERY_TTL: Duration = Duration::from_secs(60 * 60);
/// How many issuers' endpoints are kept at most. Each entry is a few URLs of at most
/// [`MAX_URL_LEN`] characters (about 10 KiB at worst, 1 KiB for real providers), so the cache holds
/// at most a few MiB whatever the specs name; past the bound the oldest fetch is forgotten (and
/// fetched again when an integration needs it).
pub const MAX_DISCOVERY_ENTRIES: usize = 256;
/// The longest endpoint or issuer URL the operator uses, in bytes (the CRD's bound on the spec's
/// URLs; a discovery document may name no longer ones).
pub const MAX_URL_LEN: usize = 2048;

/// The endpoints of one provider for one integration, after defaults, discovery and overrides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderEndpoints {
    /// Which provider these belong to (decides how errors are read).
    pub kind: ProviderKind,
    /// Where the browser signs in.
    pub authorization: Url,
    /// Where codes and refresh tokens are exchanged.
    pub token: Url,
    /// RFC 7009 revocation; `None` when the provider has none (Microsoft).
    pub revocation: Option<Url>,
    /// OIDC userinfo; `None` when the access token cannot be used there (Microsoft mail tokens).
    pub userinfo: Option<Url>,
    /// The issuer ID tokens must carry, when it is known in advance.
    pub issuer: Option<String>,
    /// When the endpoints were discovered: from which issuer URL, and the URLs its document named
    /// (the binding check lets an issuer that a client Secret lists name its own endpoints).
    pub discovered: Option<Discovered>,
}

/// The issuer URL a discovery document was fetched from, and the endpoint URLs it named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovered {
    pub issuer_url: String,
    pub urls: Vec<Url>,
}

/// A human name of the provider for messages.
pub fn display_name(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Google => "Google",
        ProviderKind::Microsoft => "Microsoft",
        ProviderKind::Oidc => "the OIDC provider",
    }
}

// ---------------------------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------------------------

const GOOGLE_AUTHORIZATION: &str = "https://accounts.google.com/o/oauth2/v2/auth";
const GOOGLE_TOKEN: &str = "https://oauth2.googleapis.com/token";
const GOOGLE_REVOCATION: &str = "https://oauth2.googleapis.com/revoke";
const GOOGLE_USERINFO: &str = "https://openidconnect.googleapis.com/v1/userinfo";
const GOOGLE_ISSUER: &str = "https://accounts.google.com";
const MICROSOFT_LOGIN: &str = "https://login.microsoftonline.com";

// Only called with the constants above (covered by the provider tests).
#[allow(clippy::expect_used)]
fn fixed_url(s: &str) -> Url {
    Url::parse(s).expect("built-in endpoint URLs are valid")
}

/// Google's endpoints.
pub fn google_endpoints() -> ProviderEndpoints {
    ProviderEndpoints {
        kind: ProviderKind::Google,
        authorization: fixed_url(GOOGLE_AUTHORIZATION),
        token: fixed_url(GOOGLE_TOKEN),
        revocation: Some(fixed_url(GOOGLE_REVOCATION)),
        userinfo: Some(fixed_url(GOOGLE_USERINFO)),
        issuer: Some(GOOGLE_ISSUER.to_owned()),
        discovered: None,
    }
}

/// Microsoft Entra ID's v2.0 endpoints for `tenant` (common, organizations, consumers, a tenant ID
/// or a verified domain).
///
/// Microsoft has no RFC 7009 revocation endpoint: revoking is then a no-op the caller reports.
/// Its userinfo endpoint lives on Microsoft Graph and does not accept an access token issued for
/// outlook.office.com, so it is left out: the account is read from the ID token instead.
/// The issuer is known in advance only for a tenant ID (GUID); for `common`, `organizations`,
/// `consumers` or a domain, ID tokens carry the signed-in user's tenant ID.
pub fn microsoft_endpoints(tenant: &str) -> Result<ProviderEndpoints, FailureClass> {
    let tenant = tenant.trim();
    let valid = !tenant.is_empty()
        && tenant.len() <= 256
        && tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && !tenant.starts_with('.');
    if !valid {
        return Err(FailureClass::Permanent {
            reason: crate::reason::Reason::InvalidEndpoint,
            message: format!(
                "spec.oauth.tenant {tenant:?} is not a Microsoft tenant: use common, organizations, consumers, a tenant ID (GUID) or a verified domain"
            ),
        });
    }
    let url = |path: &str| fixed_url(&format!("{MICROSOFT_LOGIN}/{tenant}/{path}"));
    Ok(ProviderEndpoints {
        kind: ProviderKind::Microsoft,
        authorization: url("oauth2/v2.0/authorize"),
        token: url("oauth2/v2.0/token"),
        revocation: None,
        userinfo: None,
        issuer: is_guid(tenant).then(|| format!("{MICROSOFT_LOGIN}/{tenant}/v2.0")),
        discovered: None,
    })
}

/// Whether a Microsoft tenant is given by its directory ID (a GUID), not a name like `common`
/// or a domain.
pub fn is_tenant_id(s: &str) -> bool {
    is_guid(s)
}

fn is_guid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Parse an endpoint URL and refuse what would send credentials in clear text: `https` is
/// required, `http` is accepted only for loopback hosts (development and tests).
pub fn check_endpoint_url(what: &str, raw: &str) -> Result<Url, FailureClass> {
    let invalid = |why: String| FailureClass::Permanent {
        reason: crate::reason::Reason::InvalidEndpoint,
        message: format!("the {what} endpoint {why}"),
    };
    if raw.len() > MAX_URL_LEN {
        return Err(invalid(format!(
            "is {} bytes long, more than the {MAX_URL_LEN} the operator uses",
            raw.len()
        )));
    }
    let url = Url::parse(raw.trim()).map_err(|e| invalid(format!("is not a valid URL ({e})")))?;
    // The URL may come from a discovery document: quoted bounded, and never with credentials.
    let shown = {
        let mut bare = url.clone();
        let _ = bare.set_username("");
        let _ = bare.set_password(None);
        crate::reason::quoted(bare.as_str())
    };
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&url) => {}
        "http" => {
            return Err(invalid(format!(
                "{shown} uses http: use https (http is allowed only for localhost, 127.0.0.1 or [::1])"
            )));
        }
        other => {
            return Err(invalid(format!(
                "{shown} has scheme {}: use https",
                crate::reason::quoted(other)
            )));
        }
    }
    if url.host().is_none() {
        return Err(invalid(format!("{shown} has no host")));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Never echo credentials embedded in a URL.
        return Err(invalid(
            "URL carries credentials (user:password@); remove them".to_owned(),
        ));
    }
    Ok(url)
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Apply `spec.oauth.endpoints` over `base`.
pub fn apply_overrides(
    mut base: ProviderEndpoints,
    overrides: Option<&Endpoints>,
) -> Result<ProviderEndpoints, FailureClass> {
    let Some(o) = overrides else {
        return Ok(base);
    };
    if let Some(u) = &o.authorization {
        base.authorization = check_endpoint_url("authorization", u)?;
    }
    if let Some(u) = &o.token {
        base.token = check_endpoint_url("token", u)?;
    }
    if let Some(u) = &o.revocation {
        base.revocation = Some(check_endpoint_url("revocation", u)?);
    }
    if let Some(u) = &o.userinfo {
        base.userinfo = Some(check_endpoint_url("userinfo", u)?);
    }
    Ok(base)
}

/// The endpoints that need no network: Google, Microsoft, and OIDC when both the authorization
/// and token endpoints are given in `spec.oauth.endpoints` and no issuer is set. `Ok(None)` means
/// OIDC discovery is needed (see [`ProviderResolver::resolve`]).
pub fn static_endpoints(
    spec: &MailIntegrationSpec,
) -> Result<Option<ProviderEndpoints>, FailureClass> {
    let overrides = spec.oauth.endpoints.as_ref();
    let base = match spec.provider {
        ProviderKind::Google => google_endpoints(),
        ProviderKind::Microsoft => {
            // The CRD requires a tenant for Microsoft; an object from before that rule gets "common".
            microsoft_endpoints(spec.oauth.tenant.as_deref().unwrap_or("common"))?
        }
        ProviderKind::Oidc => {
            if spec.oauth.issuer_url.is_some() {
                return Ok(None);
            }
            let (Some(a), Some(t)) = (
                overrides.and_then(|o| o.authorization.as_deref()),
                overrides.and_then(|o| o.token.as_deref()),
            ) else {
                return Err(FailureClass::Permanent {
                    reason: crate::reason::Reason::InvalidEndpoint,
                    message: "provider OIDC needs spec.oauth.issuerURL, or both spec.oauth.endpoints.authorization and spec.oauth.endpoints.token".to_owned(),
                });
            };
            ProviderEndpoints {
                kind: ProviderKind::Oidc,
                authorization: check_endpoint_url("authorization", a)?,
                token: check_endpoint_url("token", t)?,
                revocation: None,
                userinfo: None,
                issuer: None,
                discovered: None,
            }
        }
    };
    apply_overrides(base, overrides).map(Some)
}

/// The parts of an OIDC discovery document (OpenID Connect Discovery 1.0 §3) the operator uses.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct DiscoveryDocument {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
    #[serde(default)]
    pub userinfo_endpoint: Option<String>,
}

impl DiscoveryDocument {
    /// Check the document against the issuer it was fetched for and turn it into endpoints.
    pub fn endpoints(&self, issuer_url: &str) -> Result<ProviderEndpoints, FailureClass> {
        let fail = |message: String| FailureClass::Permanent {
            reason: crate::reason::Reason::DiscoveryFailed,
            message,
        };
        // OIDC Discovery §4.3: the issuer in the document must be identical to the issuer URL the
        // document was fetched from (mix-up defence). Only a trailing slash is forgiven.
        if self.issuer.trim_end_matches('/') != issuer_url.trim_end_matches('/') {
            return Err(fail(format!(
                "the discovery document of {} names a different issuer, {}; spec.oauth.issuerURL must be exactly the provider's issuer",
                crate::reason::quoted(issuer_url),
                crate::reason::quoted(&self.issuer)
            )));
        }
        let wrap = |e: FailureClass| {
            fail(format!(
                "discovery document of {issuer_url}: {}",
                e.message()
            ))
        };
        let token = check_endpoint_url("token", &self.token_endpoint).map_err(wrap)?;
        let revocation = self
            .revocation_endpoint
            .as_deref()
            .map(|u| check_endpoint_url("revocation", u))
            .transpose()
            .map_err(wrap)?;
        let userinfo = self
            .userinfo_endpoint
            .as_deref()
            .map(|u| check_endpoint_url("userinfo", u))
            .transpose()
            .map_err(wrap)?;
        let urls = [Some(&token), revocation.as_ref(), userinfo.as_ref()]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        Ok(ProviderEndpoints {
            kind: ProviderKind::Oidc,
            authorization: check_endpoint_url("authorization", &self.authorization_endpoint)
                .map_err(wrap)?,
            token,
            revocation,
            userinfo,
            issuer: Some(self.issuer.clone()),
            discovered: Some(Discovered {
                issuer_url: issuer_url.to_owned(),
                urls,
            }),
        })
    }
}

/// The URL of the discovery document of `issuer_url`.
pub fn discovery_url(issuer_url: &str) -> Result<Url, FailureClass> {
    let base = check_endpoint_url("issuer", issuer_url).map_err(|e| FailureClass::Permanent {
        reason: crate::reason::Reason::DiscoveryFailed,
        message: format!("spec.oauth.issuerURL: {}", e.message()),
    })?;
    let s = format!(
        "{}/.well-known/openid-configuration",
        base.as_str().trim_end_matches('/')
    );
    Url::parse(&s).map_err(|e| FailureClass::Permanent {
        reason: crate::reason::Reason::DiscoveryFailed,
        message: format!("spec.oauth.issuerURL: {e}"),
    })
}

/// Resolves an integration's endpoints, fetching and caching OIDC discovery documents per
/// issuer URL. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct ProviderResolver {
    http: reqwest::Client,
    ttl: Duration,
    cache: Arc<Mutex<DiscoveryCache>>,
    allow_overrides: bool,
    allow_loopback: bool,
}

impl fmt::Debug for ProviderResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderResolver")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl ProviderResolver {
    /// A resolver that fetches discovery documents with `http`, caching them for an hour.
    pub fn new(http: reqwest::Client) -> Self {
        Self {
            http,
            ttl: DEFAULT_DISCOVERY_TTL,
            cache: Arc::default(),
            allow_overrides: false,
            allow_loopback: false,
        }
    }

    /// Whether endpoints and issuers on loopback may be used (`--allow-loopback`, for development
    /// and tests; off by default: on loopback are the pod's own sidecars, such as an Envoy admin
    /// API on 127.0.0.1:15000, and no spec may make the operator call them).
    pub fn with_loopback(mut self, allow: bool) -> Self {
        self.allow_loopback = allow;
        self
    }

    /// Refuse `url` (named as `what`) when it is on loopback and that is not allowed.
    fn check_loopback(&self, what: &str, url: &Url) -> Result<(), FailureClass> {
        let own_host = is_loopback(url)
            || match url.host() {
                Some(url::Host::Ipv4(ip)) => crate::oauth::is_own_host(ip.into()),
                Some(url::Host::Ipv6(ip)) => crate::oauth::is_own_host(ip.into()),
                _ => false,
            };
        if self.allow_loopback || !own_host {
            return Ok(());
        }
        Err(FailureClass::Permanent {
            reason: crate::reason::Reason::InvalidEndpoint,
            message: format!(
                "the {what} endpoint {} is on loopback, inside the operator's own pod, which the operator calls only when started with --allow-loopback (for development and tests): name the provider's own address",
                crate::reason::quoted(url.origin().ascii_serialization().as_str())
            ),
        })
    }

    /// Whether `spec.oauth.endpoints` may replace Google's or Microsoft's own endpoints (off by
    /// default: whoever may edit a MailIntegration could otherwise send its refresh token and
    /// client secret to a server of their choosing under the name of a well-known provider).
    pub fn with_endpoint_overrides(mut self, allow: bool) -> Self {
        self.allow_overrides = allow;
        self
    }

    /// The binding check ([`crate::oauth::binding::bind`]) with this operator's
    /// `--allow-endpoint-overrides`.
    pub fn bind<'a>(
        &self,
        op: TokenOperation,
        dest: &Url,
        endpoints: &'a ProviderEndpoints,
        creds: &'a crate::oauth::ClientCredentials,
        carrying: crate::oauth::Carrying<'_>,
    ) -> Result<crate::oauth::Bound<'a>, crate::oauth::binding::Refusal> {
        // A destination that did not come from `resolve` (a revocation endpoint recorded with a
        // grant) is held to the same loopback rule.
        let what = match op {
            TokenOperation::Revocation => "revocation",
            TokenOperation::UserInfo => "userinfo",
            _ => "token",
        };
        self.check_loopback(what, dest)
            .map_err(|class| crate::oauth::binding::Refusal {
                reason: class.reason(),
                message: class.message().to_owned(),
            })?;
        crate::oauth::bind(op, dest, endpoints, creds, carrying, self.allow_overrides)
    }

    /// Change how long discovery documents are reused.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The endpoints of `spec`: built-in ones, or discovered from `spec.oauth.issuerURL`, with
    /// `spec.oauth.endpoints` applied on top.
    pub async fn resolve(
        &self,
        spec: &MailIntegrationSpec,
    ) -> Result<ProviderEndpoints, FailureClass> {
        let overridden = spec.oauth.endpoints.as_ref().is_some_and(|e| {
            e.authorization.is_some()
                || e.token.is_some()
                || e.revocation.is_some()
                || e.userinfo.is_some()
        });
        if overridden && spec.provider != ProviderKind::Oidc && !self.allow_overrides {
            return Err(FailureClass::Permanent {
                reason: crate::reason::Reason::EndpointOverrideNotAllowed,
                message: format!(
                    "spec.oauth.endpoints replaces {}'s own endpoints, which this operator does not allow: remove spec.oauth.endpoints, use provider OIDC for another server, or start the operator with --allow-endpoint-overrides",
                    display_name(spec.provider)
                ),
            });
        }
        let endpoints = self.endpoints(spec).await?;
        self.check_loopback("authorization", &endpoints.authorization)?;
        self.check_loopback("token", &endpoints.token)?;
        for (what, url) in [
            ("revocation", &endpoints.revocation),
            ("userinfo", &endpoints.userinfo),
        ] {
            if let Some(url) = url {
                self.check_loopback(what, url)?;
            }
        }
        Ok(endpoints)
    }

    async fn endpoints(
        &self,
        spec: &MailIntegrationSpec,
    ) -> Result<ProviderEndpoints, FailureClass> {
        if let Some(endpoints) = static_endpoints(spec)? {
            return Ok(endpoints);
        }
        let Some(issuer) = spec.oauth.issuer_url.as_deref() else {
            // static_endpoints returns None only when an issuer URL is set.
            return Err(FailureClass::Permanent {
                reason: crate::reason::Reason::DiscoveryFailed,
                message: "spec.oauth.issuerURL is missing".to_owned(),
            });
        };
        let discovered = self.discover(issuer).await?;
        apply_overrides(discovered, spec.oauth.endpoints.as_ref())
    }

    /// The endpoints discovered from `issuer_url`, from the cache while it is fresh.
    pub async fn discover(&self, issuer_url: &str) -> Result<ProviderEndpoints, FailureClass> {
        self.check_loopback("issuer", &discovery_url(issuer_url)?)?;
        let key = issuer_url.trim_end_matches('/').to_owned();
        {
            let cache = self.cache.locked();
            if let Some((at, endpoints)) = cache.get(&key)
                && at.elapsed() < self.ttl
            {
                return Ok(endpoints.clone());
            }
        }
        let endpoints = self.fetch(issuer_url).await?;
        insert_bounded(
            &mut self.cache.locked(),
            key,
            endpoints.clone(),
            Instant::now(),
            self.ttl,
        );
        Ok(endpoints)
    }

    /// How many issuers' endpoints are cached.
    pub fn cached_issuers(&self) -> usize {
        self.cache.locked().len()
    }

    /// Forget the cached document of `issuer_url` (e.g. after the spec changed or a token
    /// endpoint answered 404).
    pub fn invalidate(&self, issuer_url: &str) {
        self.cache.locked().remove(issuer_url.trim_end_matches('/'));
    }

    async fn fetch(&self, issuer_url: &str) -> Result<ProviderEndpoints, FailureClass> {
        use crate::reason::Reason::DiscoveryFailed;
        let url = discovery_url(issuer_url)?;
        let transient = |message: String| FailureClass::Transient {
            reason: DiscoveryFailed,
            message,
            retry_after: None,
        };
        let permanent = |message: String| FailureClass::Permanent {
            reason: DiscoveryFailed,
            message,
        };
        let response = self
            .http
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| {
                transient(format!(
                    "could not fetch {url}: {}",
                    describe_reqwest_error(&e)
                ))
            })?;
        let status = response.status();
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(transient(format!(
                "{url} answered HTTP {status}; will retry"
            )));
        }
        if !status.is_success() {
            return Err(permanent(format!(
                "{url} answered HTTP {status}: check spec.oauth.issuerURL"
            )));
        }
        let body = crate::http_limit::read_capped(response, crate::http_limit::DISCOVERY_LIMIT)
            .await
            .map_err(|e| match e {
                crate::http_limit::ReadError::TooLarge { limit } => {
                    transient(crate::http_limit::too_large(url.as_str(), limit))
                }
                crate::http_limit::ReadError::Transport(e) => transient(format!(
                    "could not read {url}: {}",
                    describe_reqwest_error(&e)
                )),
            })?;
        let doc: DiscoveryDocument = serde_json::from_slice(&body).map_err(|e| {
            permanent(format!(
                "{url} is not an OpenID Connect discovery document ({e}): check spec.oauth.issuerURL"
            ))
        })?;
        doc.endpoints(issuer_url)
    }
}

type DiscoveryCache = HashMap<String, (Instant, ProviderEndpoints)>;

/// Insert into the discovery cache, bounded in age and entries: what has expired (older than
/// `ttl` at `now`) goes first, then the oldest fetches while [`MAX_DISCOVERY_ENTRIES`] are held.
fn insert_bounded(
    cache: &mut DiscoveryCache,
    key: String,
    endpoints: ProviderEndpoints,
    now: Instant,
    ttl: Duration,
) {
    cache.retain(|_, (at, _)| now.saturating_duration_since(*at) < ttl);
    while cache.len() >= MAX_DISCOVERY_ENTRIES && !cache.contains_key(&key) {
        let Some(oldest) = cache
            .iter()
            .min_by_key(|(_, (at, _))| *at)
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        cache.remove(&oldest);
    }
    cache.insert(key, (now, endpoints));
}

/// Describe a reqwest error without its URL (which is known to the caller) and with its causes.
pub fn describe_reqwest_error(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut s = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = e.source();
    let mut last = String::new();
    while let Some(cause) = source {
        let text = cause.to_string();
        // hyper and reqwest repeat their cause in their own message; print each text once.
        if !text.is_empty() && !last.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        last = text;
        source = cause.source();
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Scopes
// ---------------------------------------------------------------------------------------------

/// The provider's default scopes for this mailbox (what the mailbox needs, without identity
/// scopes): Google `https://mail.google.com/`; Microsoft the IMAP or POP scope, SMTP.Send when
/// `spec.mailbox.smtp` is set, and `offline_access`; OIDC `openid email offline_access`.
pub fn default_scopes(spec: &MailIntegrationSpec) -> Vec<String> {
    if spec.grant_type() == GrantType::ServiceAccount {
        // Domain-wide delegation is granted per client ID and scope: the mail scope, nothing else.
        return vec![GOOGLE_MAIL_SCOPE.to_owned()];
    }
    if spec.grant_type() == GrantType::ClientCredentials {
        // App-only: no identity and no refresh token to ask for. Microsoft takes the resource's
        // `.default`; an OIDC server's own scopes are whatever it defines (spec.oauth.scopes).
        return match spec.provider {
            ProviderKind::Microsoft => vec![MICROSOFT_APP_ONLY_SCOPE.to_owned()],
            ProviderKind::Google | ProviderKind::Oidc => Vec::new(),
        };
    }
    let v: Vec<&str> = match spec.provider {
        ProviderKind::Google => vec![GOOGLE_MAIL_SCOPE],
        ProviderKind::Microsoft => {
            let mut v = vec![match spec.protocol() {
                MailProtocol::Imap => MICROSOFT_IMAP_SCOPE,
                MailProtocol::Pop3 => MICROSOFT_POP_SCOPE,
            }];
            if spec.mailbox.smtp.is_some() {
                v.push(MICROSOFT_SMTP_SCOPE);
            }
            v.push(OFFLINE_ACCESS_SCOPE);
            v
        }
        ProviderKind::Oidc => vec!["openid", "email", OFFLINE_ACCESS_SCOPE],
    };
    v.into_iter().map(str::to_owned).collect()
}

/// The scopes this integration needs: `spec.oauth.scopes` when non-empty, else the defaults.
pub fn requested_scopes(spec: &MailIntegrationSpec) -> Vec<String> {
    let from_spec: Vec<String> = spec
        .oauth
        .scopes
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if from_spec.is_empty() {
        default_scopes(spec)
    } else {
        dedup(from_spec)
    }
}

/// The scopes the sign-in page asks for: [`requested_scopes`] plus the identity scopes that let
/// the operator check who signed in (Google `openid email`; Microsoft and OIDC
/// `openid email offline_access`).
pub fn sign_in_scopes(spec: &MailIntegrationSpec) -> Vec<String> {
    let identity: &[&str] = match spec.provider {
        ProviderKind::Google => &["openid", "email"],
        // Microsoft puts the user principal name (`preferred_username`) into the ID token with
        // `profile`: the account is read from it rather than from the mutable `email`.
        ProviderKind::Microsoft => &["openid", "email", "profile", OFFLINE_ACCESS_SCOPE],
        ProviderKind::Oidc => &["openid", "email", OFFLINE_ACCESS_SCOPE],
    };
    let mut v = requested_scopes(spec);
    v.extend(identity.iter().map(|s| (*s).to_owned()));
    dedup(v)
}

/// The scopes to send with a refresh: none for Google and OIDC (the grant keeps its scopes);
/// Microsoft's v2.0 endpoint documents `scope` as required on refresh, so its mail scopes.
pub fn refresh_scopes(spec: &MailIntegrationSpec) -> Vec<String> {
    match spec.provider {
        ProviderKind::Google | ProviderKind::Oidc => Vec::new(),
        ProviderKind::Microsoft => requested_scopes(spec),
    }
}

/// The requested scopes that `granted` lacks (users can untick scopes on Google's consent page).
/// Identity scopes are not checked: providers echo them differently (Google turns `email` into
/// `https://www.googleapis.com/auth/userinfo.email`, Microsoft omits `offline_access`).
pub fn missing_scopes(spec: &MailIntegrationSpec, granted: &[String]) -> Vec<String> {
    requested_scopes(spec)
        .into_iter()
        .filter(|s| {
            !matches!(
                s.as_str(),
                "openid" | "email" | "profile" | OFFLINE_ACCESS_SCOPE
            )
        })
        .filter(|s| !granted.iter().any(|g| g.eq_ignore_ascii_case(s)))
        .collect()
}

fn dedup(v: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(v.len());
    for s in v {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Authorization request
// ---------------------------------------------------------------------------------------------

/// The OAuth/OIDC `prompt` value of a sign-in prompt choice (the same for every provider here).
pub fn prompt_value(prompt: Prompt) -> &'static str {
    match prompt {
        Prompt::None => "none",
        Prompt::Consent => "consent",
        Prompt::SelectAccount => "select_account",
    }
}

/// The provider-specific authorization-request parameters, besides the standard ones
/// (`client_id`, `redirect_uri`, `response_type`, `scope`, `state`, PKCE, `login_hint`).
pub fn authorization_params(kind: ProviderKind, prompt: Prompt) -> Vec<(&'static str, String)> {
    let mut v = Vec::new();
    if kind == ProviderKind::Google {
        // Google returns a refresh token only with access_type=offline.
        v.push(("access_type", "offline".to_owned()));
        v.push(("include_granted_scopes", "true".to_owned()));
    }
    v.push(("prompt", prompt_value(prompt).to_owned()));
    v
}

// ---------------------------------------------------------------------------------------------
// Mail servers
// ---------------------------------------------------------------------------------------------

fn server(host: &str, port: i32, tls: TlsMode) -> MailServer {
    MailServer {
        host: host.to_owned(),
        port,
        tls: Some(tls),
    }
}

/// The provider's IMAP or POP3 server; `None` for OIDC (the spec must name it).
pub fn default_mail_server(kind: ProviderKind, protocol: MailProtocol) -> Option<MailServer> {
    match (kind, protocol) {
        (ProviderKind::Google, MailProtocol::Imap) => {
            Some(server("imap.gmail.com", 993, TlsMode::Implicit))
        }
        (ProviderKind::Google, MailProtocol::Pop3) => {
            Some(server("pop.gmail.com", 995, TlsMode::Implicit))
        }
        (ProviderKind::Microsoft, MailProtocol::Imap) => {
            Some(server("outlook.office365.com", 993, TlsMode::Implicit))
        }
        (ProviderKind::Microsoft, MailProtocol::Pop3) => {
            Some(server("outlook.office365.com", 995, TlsMode::Implicit))
        }
        (ProviderKind::Oidc, _) => None,
    }
}

/// The provider's SMTP submission server; `None` for OIDC.
pub fn default_smtp_server(kind: ProviderKind) -> Option<MailServer> {
    match kind {
        ProviderKind::Google => Some(server("smtp.gmail.com", 465, TlsMode::Implicit)),
        ProviderKind::Microsoft => Some(server("smtp.office365.com", 587, TlsMode::StartTls)),
        ProviderKind::Oidc => None,
    }
}

/// The server workloads read mail from: `spec.mailbox.server`, else the provider's default.
pub fn mail_server(spec: &MailIntegrationSpec) -> Option<MailServer> {
    spec.mailbox
        .server
        .clone()
        .or_else(|| default_mail_server(spec.provider, spec.protocol()))
}

#[cfg(test)]
mod tests;
