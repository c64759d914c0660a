//! A token endpoint that behaves as Google's or Microsoft's does on success, for what oidc-provider
//! does differently: Google never rotates the refresh token and answers with its own scope;
//! Microsoft returns a new refresh token on every refresh **and the previous one keeps working**
//! (Entra ID does not invalidate it), so a client that goes on using an old refresh token is never
//! punished by the provider — only a count of what was presented can catch it
//! ([`ProviderStandIn::presented`]).
//!
//! Put a [`FaultProxy`](super::fault_proxy::FaultProxy) in front of it for the providers' error
//! bodies: `FaultProxy::start(&standin.url())`.
//!
//! Refresh tokens are issued by [`ProviderStandIn::issue_refresh_token`] (the "sign-in"); unknown
//! ones get the provider's `invalid_grant` body. `grant_type=refresh_token` is served, and for
//! Google the JWT-bearer grant of service accounts with domain-wide delegation ([`jwt_bearer`]:
//! the assertion's signature really verified with the service account's public key), whose
//! access tokens `/introspect` answers for (RFC 7662), so that Dovecot can check them.

mod jwt_bearer;

use axum::{
    Router,
    extract::{Form, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Google,
    Microsoft,
}

#[derive(Default)]
struct Inner {
    /// Refresh tokens that work, each with how often it was presented.
    valid: HashMap<String, u32>,
    /// Every refresh token presented, in order (valid or not).
    presented: Vec<String>,
    /// Scope strings sent with refreshes, in order (`None`: no `scope` parameter).
    scopes_sent: Vec<Option<String>>,
    issued: u64,
    /// The scope the answer carries (Google: what was granted); `None`: echo the request's.
    scope: Option<String>,
    expires_in: u64,
    /// Domain-wide delegation (Google's JWT-bearer grant).
    dwd: jwt_bearer::Delegation,
}

pub struct ProviderStandIn {
    url: String,
    flavour: Flavour,
    inner: Arc<Mutex<Inner>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl ProviderStandIn {
    /// Start on 127.0.0.1:0 (the listener is bound before this returns: no port race).
    pub fn start(flavour: Flavour) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let inner = Arc::new(Mutex::new(Inner {
            scope: (flavour == Flavour::Google).then(|| "https://mail.google.com/".to_owned()),
            expires_in: 3599,
            dwd: jwt_bearer::Delegation::new(format!("{url}/token")),
            ..Inner::default()
        }));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let state = (flavour, inner.clone());
        std::thread::Builder::new()
            .name("provider-standin".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let app = Router::new()
                        .route("/token", post(token))
                        .route("/introspect", post(jwt_bearer::introspect))
                        .with_state(state);
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    tokio::select! {
                        _ = rx => {}
                        r = axum::serve(listener, app) => r.unwrap(),
                    }
                });
            })
            .unwrap();
        Self {
            url,
            flavour,
            inner,
            shutdown: Some(tx),
        }
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// A new refresh token that works from now on (what a sign-in would give).
    pub fn issue_refresh_token(&self) -> String {
        let mut i = self.inner.lock().unwrap();
        i.issued += 1;
        let rt = format!("{:?}-rt-{}-{}", self.flavour, i.issued, uuid_like());
        i.valid.insert(rt.clone(), 0);
        rt
    }

    /// Every refresh token presented so far, in order.
    pub fn presented(&self) -> Vec<String> {
        self.inner.lock().unwrap().presented.clone()
    }

    /// The `scope` parameter of every refresh so far, in order.
    pub fn scopes_sent(&self) -> Vec<Option<String>> {
        self.inner.lock().unwrap().scopes_sent.clone()
    }

    /// Access tokens live this long from now on (`expires_in`, seconds).
    pub fn set_expires_in(&self, secs: u64) {
        self.inner.lock().unwrap().expires_in = secs;
    }

    /// A service account whose assertions verify with `public_key_pem` (Google Cloud's key).
    pub fn add_service_account(&self, client_email: &str, client_id: &str, public_key_pem: &[u8]) {
        self.inner
            .lock()
            .unwrap()
            .dwd
            .add_service_account(client_email, client_id, public_key_pem);
    }

    /// Domain-wide delegation of `scope` to `client_id` (the Admin console's entry).
    pub fn delegate(&self, client_id: &str, scope: &str) {
        self.inner.lock().unwrap().dwd.delegate(client_id, scope);
    }

    /// A user of the Workspace domain.
    pub fn add_user(&self, email: &str) {
        self.inner.lock().unwrap().dwd.add_user(email);
    }

    /// What each JWT-bearer request got (`ok sub=…` or the error and its description), in order.
    pub fn jwt_bearer_answers(&self) -> Vec<String> {
        self.inner.lock().unwrap().dwd.answers.clone()
    }

    /// Answer with this scope from now on (e.g. a grant whose user unticked the mail scope).
    pub fn set_scope(&self, scope: &str) {
        self.inner.lock().unwrap().scope = Some(scope.to_owned());
    }
}

impl Drop for ProviderStandIn {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn uuid_like() -> String {
    use rand::Rng as _;
    let n: u128 = rand::rng().random();
    format!("{n:032x}")
}

async fn token(
    State((flavour, inner)): State<(Flavour, Arc<Mutex<Inner>>)>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if flavour == Flavour::Google
        && form.get("grant_type").map(String::as_str) == Some(jwt_bearer::GRANT_TYPE)
    {
        let mut i = inner.lock().unwrap();
        let expires_in = i.expires_in;
        return i.dwd.answer(&form, expires_in);
    }
    if form.get("grant_type").map(String::as_str) != Some("refresh_token") {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({"error": "unsupported_grant_type"})),
        )
            .into_response();
    }
    let rt = form.get("refresh_token").cloned().unwrap_or_default();
    let mut i = inner.lock().unwrap();
    i.presented.push(rt.clone());
    i.scopes_sent.push(form.get("scope").cloned());
    let Some(n) = i.valid.get_mut(&rt) else {
        let body = match flavour {
            Flavour::Google => serde_json::json!({
                "error": "invalid_grant",
                "error_description": "Token has been expired or revoked."
            }),
            Flavour::Microsoft => serde_json::json!({
                "error": "invalid_grant",
                "error_description": "AADSTS9002313: Invalid request. Request is malformed or invalid.",
                "error_codes": [9002313],
            }),
        };
        return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
    };
    *n += 1;
    i.issued += 1;
    let access_token = format!("{flavour:?}-at-{}-{}", i.issued, uuid_like());
    let scope = i
        .scope
        .clone()
        .or_else(|| form.get("scope").cloned())
        .unwrap_or_default();
    let mut body = serde_json::json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": i.expires_in,
        "scope": scope,
    });
    if flavour == Flavour::Microsoft {
        // A new refresh token on every refresh; the presented one stays valid.
        i.issued += 1;
        let next = format!("{flavour:?}-rt-{}-{}", i.issued, uuid_like());
        i.valid.insert(next.clone(), 0);
        body["refresh_token"] = next.into();
        body["ext_expires_in"] = i.expires_in.into();
    }
    (
        StatusCode::OK,
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        axum::Json(body),
    )
        .into_response()
}
