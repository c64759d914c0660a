//! `POST /oauth2/start`: the sign-in page's form. Checks that the form came from the operator's own
//! page and names a valid ticket, that the integration's client and provider are usable, issues a
//! one-time signed state bound to this browser, and sends the browser to the provider's
//! authorization endpoint (PKCE S256, `login_hint`, the chosen prompt).

use super::{
    COOKIE, Failure, PKCE, STATE, SignIn, StateClaims, add, browser_nonce, page, refused,
    store::StateRecord, subject_of, token, unix,
};
use crate::api::{MailIntegration, Prompt};
use crate::oauth::{self, AuthorizationRequest, Carrying};
use crate::provider::{self, ProviderEndpoints};
use crate::reason::Reason;
use crate::reconcile::observed::ClientCredentials;
use crate::secret::SecretValue;
use axum::{
    extract::{Form, State, rejection::FormRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use jiff::Timestamp;
use kube::ResourceExt;
use serde::Deserialize;
use tracing::info;
use url::Url;

#[derive(Debug, Default, Deserialize)]
pub(super) struct StartForm {
    #[serde(default)]
    ticket: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
}

/// A failure of the start, and the integration it is about when it is known (then reported on it).
type Refused = (Failure, Option<MailIntegration>);

pub(super) async fn start(
    State(s): State<SignIn>,
    headers: HeaderMap,
    form: Result<Form<StartForm>, FormRejection>,
) -> Response {
    let form = form.map(|Form(f)| f).unwrap_or_default();
    match begin(&s, &headers, form, Timestamp::now()).await {
        Ok(r) => r,
        Err((f, mi)) => s.fail(f, mi.as_ref()).await,
    }
}

async fn begin(
    s: &SignIn,
    headers: &HeaderMap,
    form: StartForm,
    now: Timestamp,
) -> Result<Response, Refused> {
    same_origin(s, headers).map_err(|f| (f, None))?;
    let (ticket, mi) = s
        .check_ticket(form.ticket.as_deref(), now)
        .await
        .map_err(|f| (f, None))?;
    let prompt = form
        .prompt
        .as_deref()
        .and_then(page::parse_prompt)
        .unwrap_or_else(|| mi.spec.prompt());
    let on_mi = |f: Failure| (f, Some(mi.clone()));
    let creds = s.client_credentials(&mi).await.map_err(on_mi)?;
    let endpoints = s.endpoints(&mi).await.map_err(on_mi)?;
    // The callback exchanges the code at this token endpoint with this client, or nowhere: checked
    // now, before the browser is sent to the provider, and bound into the signed state.
    let carrying = Carrying::Code {
        token_endpoint: endpoints.token.as_str(),
        client_id: &creds.client_id,
    };
    s.bind(&endpoints, &creds, carrying, &endpoints.token)
        .map_err(|r| on_mi(refused(r).on(Some(subject_of(&mi)))))?;
    // One nonce per browser, kept while sign-ins go on, so that two tabs do not undo each other.
    let nonce = browser_nonce(headers)
        .map(str::to_owned)
        .unwrap_or_else(|| token::random_b64(32));
    let record = StateRecord {
        ns: ticket.ns,
        name: ticket.name,
        uid: ticket.uid,
        expires: add(now, s.inner.config.state_ttl),
        used: false,
    };
    let (id, state) =
        issue_state(s, record, &nonce, prompt, &endpoints, &creds, now).map_err(|f| (f, None))?;
    let url = authorization_url(s, &mi, &endpoints, &creds, prompt, &id, &state).map_err(on_mi)?;
    info!(
        integration = %format!("{}/{}", mi.namespace().unwrap_or_default(), mi.name_any()),
        prompt = page::prompt_value(prompt),
        "sign-in started; sending the browser to the provider"
    );
    Ok(to_provider(s, &url, &nonce))
}

/// A form posted from another site is refused (login CSRF): browsers send Origin on POST.
/// `Origin: null` (a sandboxed frame, a data: URL, a privacy-stripped request) is refused too: the
/// sign-in page's own form sends the operator's origin (its Referrer-Policy is same-origin).
fn same_origin(s: &SignIn, headers: &HeaderMap) -> Result<(), Failure> {
    let Some(origin) = headers
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("(not text)"))
    else {
        return Ok(());
    };
    if origin == s.public_origin() {
        return Ok(());
    }
    Err(Failure::new(
        Reason::SignInLinkInvalid,
        StatusCode::FORBIDDEN,
        "This sign-in did not start on the operator's page",
        format!(
            "The sign-in form was sent from {origin}, not from the operator's address {}.",
            s.public_origin()
        ),
        "Open the sign-in link from status.signIn.url (it points to the operator's public URL, --public-url) and start there.",
    ))
}

/// Keeps `record` under a new one-time id and signs the state that carries it: (id, state).
fn issue_state(
    s: &SignIn,
    record: StateRecord,
    nonce: &str,
    prompt: Prompt,
    endpoints: &ProviderEndpoints,
    creds: &ClientCredentials,
    now: Timestamp,
) -> Result<(String, String), Failure> {
    let id = token::random_b64(18);
    let claims = StateClaims {
        id: id.clone(),
        ns: record.ns.clone(),
        name: record.name.clone(),
        uid: record.uid.clone(),
        exp: unix(record.expires),
        b: token::browser_binding(nonce),
        p: page::prompt_value(prompt).to_owned(),
        t: endpoints.token.to_string(),
        c: creds.client_id.clone(),
    };
    if s.inner.store.insert(&id, record, now).is_err() {
        return Err(Failure::new(
            Reason::SignInFailed,
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many sign-ins in progress",
            "The operator is waiting for the answers of too many sign-ins at once.",
            "Wait a few minutes, then open the sign-in link again.",
        ));
    }
    let state = s.inner.signer.sign(STATE, &claims);
    Ok((id, state))
}

/// The provider's authorization URL for this sign-in (its PKCE verifier derived from the state's
/// id, so that nothing more is kept).
fn authorization_url(
    s: &SignIn,
    mi: &MailIntegration,
    endpoints: &ProviderEndpoints,
    creds: &ClientCredentials,
    prompt: Prompt,
    id: &str,
    state: &str,
) -> Result<Url, Failure> {
    let verifier = SecretValue::new(s.inner.signer.derive(PKCE, id));
    let redirect_url = s.redirect_url(mi);
    let scopes = provider::sign_in_scopes(&mi.spec);
    oauth::authorization_url(&AuthorizationRequest {
        endpoints,
        client_id: &creds.client_id,
        redirect_url: &redirect_url,
        scopes: &scopes,
        prompt,
        state,
        pkce_verifier: &verifier,
        login_hint: Some(mi.spec.sign_in_account()),
    })
    .map_err(|e| {
        Failure::new(
            Reason::InvalidEndpoint,
            StatusCode::BAD_REQUEST,
            "The redirect URL is not valid",
            format!("The redirect URL {redirect_url:?} is not a URL ({e})."),
            "Fix spec.oauth.redirectURL (or the operator's --public-url).",
        )
        .on(Some(subject_of(mi)))
    })
}

/// 303 to the provider, with the cookie that binds the sign-in to this browser.
fn to_provider(s: &SignIn, url: &Url, nonce: &str) -> Response {
    let mut cookie = format!(
        "{COOKIE}={nonce}; Path={}; Max-Age={}; HttpOnly; SameSite=Lax",
        s.cookie_path(),
        s.inner.config.state_ttl.as_secs()
    );
    if s.inner.secure {
        cookie.push_str("; Secure");
    }
    let mut r = StatusCode::SEE_OTHER.into_response();
    let h = r.headers_mut();
    if let (Ok(loc), Ok(c)) = (
        HeaderValue::from_str(url.as_str()),
        HeaderValue::from_str(&cookie),
    ) {
        h.insert(header::LOCATION, loc);
        h.insert(header::SET_COOKIE, c);
    }
    r
}
