//! The one binding check: every call that carries a grant or a client credential (refresh, code
//! exchange, client credentials, JWT bearer, revocation) is made only with a [`Bound`], and only
//! [`bind`] makes one. It checks two things about the destination URL:
//!
//! - **The client credential** (client secret, certificate assertion, service-account assertion)
//!   goes only where the client Secret's owner meant: the servers listed in its annotation
//!   `mailintegration.dev/oauth-servers` (URLs; a destination at or below one, or named by the
//!   discovery document of an issuer listed there); besides those, Google's and Microsoft's
//!   credentials go to their own endpoints (any, with `--allow-endpoint-overrides`), and an OIDC
//!   client's nowhere: whoever may edit a MailIntegration is not who decides where a client secret
//!   may be sent.
//! - **The grant** goes back only to where it was issued: a refresh to the token endpoint, client
//!   and account recorded with the grant; a revocation to the revocation endpoint recorded with it
//!   (or, for a grant recorded before that key existed, one on the same server as its token
//!   endpoint); an authorization code to the token endpoint and client that `/oauth2/start` bound
//!   when it sent the browser to the provider.

use super::ClientCredentials;
use crate::api::ProviderKind;
use crate::provider::{ProviderEndpoints, TokenOperation};
use crate::reason::Reason;
use url::Url;

/// The annotation on a client Secret listing the OAuth servers its credentials may be sent to:
/// comma-separated URLs (https, or http on loopback). A destination matches an entry on the same
/// scheme, host and port, with a path at or below the entry's; an entry that is an OIDC issuer
/// also allows the endpoints its discovery document names.
pub const OAUTH_SERVERS_ANNOTATION: &str = "mailintegration.dev/oauth-servers";

/// Where a client's credentials may go, as the Secret holding them says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CredentialOwner {
    /// The client Secret (for the message's `kubectl annotate`).
    pub secret: String,
    pub namespace: String,
    /// The entries of [`OAUTH_SERVERS_ANNOTATION`]; `None` without the annotation.
    pub servers: Option<Vec<Url>>,
}

/// Parse the annotation's value: every entry must be an https URL (http on loopback) without
/// credentials, query or fragment.
pub fn parse_servers(value: &str) -> Result<Vec<Url>, String> {
    let mut out = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let url = crate::provider::check_endpoint_url("listed", entry)
            .map_err(|e| crate::reason::clean(e.message()))?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "the entry {} has a query or fragment: list server URLs only",
                crate::reason::clean(entry)
            ));
        }
        out.push(url);
    }
    if out.is_empty() {
        return Err("it lists no server".to_owned());
    }
    Ok(out)
}

/// Where a stored grant was issued (the grant Secret's record).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantOrigin<'a> {
    pub token_endpoint: Option<&'a str>,
    pub revocation_endpoint: Option<&'a str>,
    pub client_id: Option<&'a str>,
    pub account: Option<&'a str>,
}

/// What a call carries besides the client's credential.
#[derive(Clone, Copy, Debug)]
pub enum Carrying<'a> {
    /// Nothing else (client credentials, JWT bearer).
    Client,
    /// A stored grant's refresh token, of the account that must be `mailbox` (refresh) or any
    /// (revocation: `mailbox` is not checked).
    Grant {
        origin: GrantOrigin<'a>,
        mailbox: &'a str,
    },
    /// An authorization code of a sign-in that `/oauth2/start` bound to this token endpoint and
    /// client.
    Code {
        token_endpoint: &'a str,
        client_id: &'a str,
    },
}

/// A call that passed [`bind`]: what it may send, and where.
#[derive(Debug)]
pub struct Bound<'a> {
    endpoints: &'a ProviderEndpoints,
    creds: &'a ClientCredentials,
    op: TokenOperation,
    url: Url,
}

impl<'a> Bound<'a> {
    pub fn endpoints(&self) -> &'a ProviderEndpoints {
        self.endpoints
    }
    pub fn creds(&self) -> &'a ClientCredentials {
        self.creds
    }
    pub fn op(&self) -> TokenOperation {
        self.op
    }
    /// The destination the check allowed.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// A call that sends nothing (reading a given answer, see
    /// [`super::interpret_refresh_response`]).
    pub(super) fn offline(
        endpoints: &'a ProviderEndpoints,
        creds: &'a ClientCredentials,
        op: TokenOperation,
    ) -> Self {
        Self::without_check(endpoints, creds, op)
    }

    /// A bound call without the check, for the unit tests of the HTTP layer.
    #[cfg(test)]
    pub(crate) fn unchecked(
        endpoints: &'a ProviderEndpoints,
        creds: &'a ClientCredentials,
        op: TokenOperation,
    ) -> Self {
        Self::without_check(endpoints, creds, op)
    }

    fn without_check(
        endpoints: &'a ProviderEndpoints,
        creds: &'a ClientCredentials,
        op: TokenOperation,
    ) -> Self {
        let url = match op {
            TokenOperation::Revocation => endpoints
                .revocation
                .clone()
                .unwrap_or_else(|| endpoints.token.clone()),
            _ => endpoints.token.clone(),
        };
        Self {
            endpoints,
            creds,
            op,
            url,
        }
    }
}

/// Why a call was not made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
}

fn same(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

fn same_server(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// Whether `dest` is at or below the entry `e`.
pub fn under(dest: &Url, e: &Url) -> bool {
    let base = e.path().trim_end_matches('/');
    same_server(dest, e)
        && (base.is_empty()
            || dest.path() == base
            || dest
                .path()
                .strip_prefix(base)
                .is_some_and(|rest| rest.starts_with('/')))
}

/// Google's own endpoints, or Microsoft's sign-in host.
fn providers_own(kind: ProviderKind, dest: &Url) -> bool {
    match kind {
        ProviderKind::Google => {
            let g = crate::provider::google_endpoints();
            [Some(&g.token), g.revocation.as_ref(), g.userinfo.as_ref()]
                .into_iter()
                .flatten()
                .any(|u| u == dest)
        }
        ProviderKind::Microsoft => {
            dest.scheme() == "https"
                && dest.host_str() == Some("login.microsoftonline.com")
                && dest.port().is_none()
        }
        ProviderKind::Oidc => false,
    }
}

/// What to add to the annotation so that `dest` is allowed: the issuer whose discovery named it,
/// else the destination's server.
fn suggestion(dest: &Url, endpoints: &ProviderEndpoints) -> String {
    if let Some(d) = &endpoints.discovered
        && d.urls.contains(dest)
    {
        return d.issuer_url.trim_end_matches('/').to_owned();
    }
    dest.origin().ascii_serialization()
}

fn credential_allows(
    dest: &Url,
    endpoints: &ProviderEndpoints,
    owner: &CredentialOwner,
    allow_overrides: bool,
) -> Result<(), Refusal> {
    let refuse = |message: String| {
        Err(Refusal {
            reason: Reason::OAuthServerNotAllowed,
            message,
        })
    };
    let (name, ns) = (&owner.secret, &owner.namespace);
    let servers = owner.servers.as_deref().unwrap_or_default();
    let listed_issuer = endpoints.discovered.as_ref().is_some_and(|d| {
        d.urls.contains(dest) && servers.iter().any(|s| same(s.as_str(), &d.issuer_url))
    });
    if listed_issuer || servers.iter().any(|s| under(dest, s)) {
        return Ok(());
    }
    // Google's and Microsoft's own endpoints need no list (nor, with --allow-endpoint-overrides,
    // the admin's choice of others); an OIDC client's credentials go only where its owner says.
    if endpoints.kind != ProviderKind::Oidc
        && (allow_overrides || providers_own(endpoints.kind, dest))
    {
        return Ok(());
    }
    if owner.servers.is_none() {
        return refuse(format!(
            "the OAuth client's credentials in Secret {name:?} would be sent to {dest}, but the Secret does not say which servers they may go to (an OIDC client's credentials go only to servers its owner lists on the Secret). If {dest} belongs to this client's OAuth server, whoever may write the Secret runs: kubectl annotate secret {name} -n {ns} {OAUTH_SERVERS_ANNOTATION}={}",
            suggestion(dest, endpoints)
        ));
    }
    let list = servers
        .iter()
        .map(|s| s.as_str().trim_end_matches('/'))
        .collect::<Vec<_>>()
        .join(",");
    refuse(format!(
        "the OAuth client's credentials in Secret {name:?} may be sent only to {list} (its annotation {OAUTH_SERVERS_ANNOTATION}), but the spec would send them to {dest}: nothing was sent. Point spec.oauth back at those servers, or, if {dest} belongs to this client's OAuth server, whoever may write the Secret runs: kubectl annotate --overwrite secret {name} -n {ns} {OAUTH_SERVERS_ANNOTATION}={list},{}",
        suggestion(dest, endpoints)
    ))
}

const SIGN_IN_AGAIN: &str =
    "sign in again (status.signIn.url): a grant is only ever sent back to where it was issued";

fn grant_allows(
    op: TokenOperation,
    dest: &Url,
    endpoints: &ProviderEndpoints,
    client_id: &str,
    carrying: Carrying<'_>,
) -> Result<(), Refusal> {
    let refuse = |message: String| {
        Err(Refusal {
            reason: Reason::GrantBoundElsewhere,
            message,
        })
    };
    match carrying {
        Carrying::Client => Ok(()),
        Carrying::Code {
            token_endpoint,
            client_id: bound_client,
        } => {
            if !same(dest.as_str(), token_endpoint) {
                return refuse(format!(
                    "this sign-in was started for the token endpoint {token_endpoint}, but the spec now names {dest}: the authorization code is not sent there. Open the sign-in link again"
                ));
            }
            if bound_client != client_id {
                return refuse(format!(
                    "this sign-in was started for the OAuth client {bound_client}, but the client Secret now holds {client_id}. Open the sign-in link again"
                ));
            }
            Ok(())
        }
        Carrying::Grant { origin, mailbox } => {
            if let Some(bound) = origin.client_id.filter(|b| *b != client_id) {
                return refuse(format!(
                    "the grant belongs to the OAuth client {bound}, but the client Secret now holds {client_id}; {SIGN_IN_AGAIN}"
                ));
            }
            if op == TokenOperation::Revocation {
                return revocation_allowed(dest, endpoints, origin);
            }
            if let Some(bound) = origin.token_endpoint.filter(|b| !same(b, dest.as_str())) {
                return refuse(format!(
                    "the grant was issued by the token endpoint {bound}, but the spec now names {dest}: its refresh token is not sent there; {SIGN_IN_AGAIN}"
                ));
            }
            if let Some(account) = origin.account.filter(|a| !a.eq_ignore_ascii_case(mailbox)) {
                return refuse(format!(
                    "the grant is of {account}, but spec.mailbox.address is now {mailbox}; {SIGN_IN_AGAIN}"
                ));
            }
            Ok(())
        }
    }
}

/// A revocation goes to the revocation endpoint recorded with the grant; a grant recorded without
/// one (before the key existed) is revoked only on the server of its token endpoint.
fn revocation_allowed(
    dest: &Url,
    endpoints: &ProviderEndpoints,
    origin: GrantOrigin<'_>,
) -> Result<(), Refusal> {
    let refuse = |why: String| {
        Err(Refusal {
            reason: Reason::GrantBoundElsewhere,
            message: format!(
                "the grant was not revoked at {dest}: {why}; the refresh token goes nowhere but where it was issued. Revoke the app's access for the account at the provider by hand"
            ),
        })
    };
    if let Some(bound) = origin.revocation_endpoint {
        if same(bound, dest.as_str()) {
            return Ok(());
        }
        return refuse(format!("the grant's issuer revokes at {bound}"));
    }
    // A grant not bound yet (brought by hand, never refreshed) belongs to the spec's token endpoint.
    let token = match origin.token_endpoint {
        Some(t) => match Url::parse(t) {
            Ok(u) => u,
            Err(_) => return refuse(format!("its recorded token endpoint {t:?} is not a URL")),
        },
        None => endpoints.token.clone(),
    };
    if same_server(dest, &token) {
        return Ok(());
    }
    refuse(format!(
        "it is not on the server of the token endpoint {token} that issued the grant"
    ))
}

/// The binding check. `dest` is where the call would go (the token endpoint, or for a revocation
/// the revocation endpoint); `allow_overrides` is the operator's `--allow-endpoint-overrides`.
pub fn bind<'a>(
    op: TokenOperation,
    dest: &Url,
    endpoints: &'a ProviderEndpoints,
    creds: &'a ClientCredentials,
    carrying: Carrying<'_>,
    allow_overrides: bool,
) -> Result<Bound<'a>, Refusal> {
    grant_allows(op, dest, endpoints, &creds.client_id, carrying)?;
    credential_allows(dest, endpoints, &creds.owner, allow_overrides)?;
    Ok(Bound {
        endpoints,
        creds,
        op,
        url: dest.clone(),
    })
}

#[cfg(test)]
mod tests;
