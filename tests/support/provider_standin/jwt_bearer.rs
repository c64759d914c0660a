//! Google's token endpoint for service accounts with domain-wide delegation (RFC 7523 §2.1): the
//! assertion's RS256 signature is verified with the public key of the service account named by
//! `iss`, then `aud` (this token endpoint), `exp` (in the future, at most one hour after `iat`),
//! `scope` and `sub` are checked, and the answers are Google's own bodies:
//!
//! - bad or unknown signature: 400 `invalid_grant` "Invalid JWT Signature.";
//! - a lifetime over an hour or an expired assertion: 400 `invalid_grant` "Invalid JWT: Token must
//!   be a short-lived token (60 minutes) and in a reasonable timeframe. …";
//! - no delegation for the client ID and scope: 401 `unauthorized_client` "Client is unauthorized
//!   to retrieve access tokens using this method, or client not authorized for any of the scopes
//!   requested.";
//! - an unknown `sub`: 400 `invalid_grant` "Invalid email or User ID".

use axum::{
    extract::{Form, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

#[derive(Default)]
pub struct Delegation {
    token_url: String,
    /// client_email → (public key, client ID).
    accounts: HashMap<String, (DecodingKey, String)>,
    /// (client ID, scope) pairs an admin delegated.
    delegated: HashSet<(String, String)>,
    users: HashSet<String>,
    /// Issued access token → the mailbox it is for.
    tokens: HashMap<String, String>,
    pub answers: Vec<String>,
}

#[derive(serde::Deserialize)]
struct Claims {
    iss: String,
    sub: Option<String>,
    scope: Option<String>,
    iat: i64,
    exp: i64,
}

fn error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": error, "error_description": description})),
    )
        .into_response()
}

impl Delegation {
    pub fn new(token_url: String) -> Self {
        Self {
            token_url,
            ..Self::default()
        }
    }

    pub fn add_service_account(&mut self, email: &str, client_id: &str, public_key_pem: &[u8]) {
        let key = DecodingKey::from_rsa_pem(public_key_pem).expect("an RSA public key (PEM)");
        self.accounts
            .insert(email.to_owned(), (key, client_id.to_owned()));
    }

    pub fn delegate(&mut self, client_id: &str, scope: &str) {
        self.delegated
            .insert((client_id.to_owned(), scope.to_owned()));
    }

    pub fn add_user(&mut self, email: &str) {
        self.users.insert(email.to_ascii_lowercase());
    }

    pub fn answer(&mut self, form: &HashMap<String, String>, expires_in: u64) -> Response {
        let (status, err, description) = match self.check(form) {
            Ok(sub) => {
                let token = format!("ya29.dwd-{}", super::uuid_like());
                self.tokens.insert(token.clone(), sub.clone());
                self.answers.push(format!("ok sub={sub}"));
                // Google's answer to a JWT-bearer grant: no refresh token, no scope.
                return (
                    StatusCode::OK,
                    [(axum::http::header::CACHE_CONTROL, "no-store")],
                    axum::Json(serde_json::json!({
                        "access_token": token,
                        "expires_in": expires_in,
                        "token_type": "Bearer",
                    })),
                )
                    .into_response();
            }
            Err(e) => e,
        };
        self.answers.push(format!("{err}: {description}"));
        error(status, err, description)
    }

    fn check(
        &self,
        form: &HashMap<String, String>,
    ) -> Result<String, (StatusCode, &'static str, &'static str)> {
        const BAD_SIGNATURE: (StatusCode, &str, &str) = (
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "Invalid JWT Signature.",
        );
        const BAD_TIMES: (StatusCode, &str, &str) = (
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.",
        );
        let assertion = form.get("assertion").ok_or((
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Missing required parameter: assertion",
        ))?;
        // Which key to verify with comes from the (not yet trusted) issuer claim.
        let iss = unverified_issuer(assertion).ok_or(BAD_SIGNATURE)?;
        let (key, client_id) = self.accounts.get(&iss).ok_or(BAD_SIGNATURE)?;
        let mut v = Validation::new(Algorithm::RS256);
        v.set_audience(&[&self.token_url]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = 0;
        let claims = match jsonwebtoken::decode::<Claims>(assertion, key, &v) {
            Ok(d) => d.claims,
            Err(e) => {
                return Err(match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => BAD_TIMES,
                    jsonwebtoken::errors::ErrorKind::InvalidAudience => (
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "Invalid JWT: Failed audience check.",
                    ),
                    _ => BAD_SIGNATURE,
                });
            }
        };
        if claims.exp.saturating_sub(claims.iat) > 3600 {
            return Err(BAD_TIMES);
        }
        let scopes: Vec<&str> = claims
            .scope
            .as_deref()
            .unwrap_or_default()
            .split(' ')
            .filter(|s| !s.is_empty())
            .collect();
        if scopes.is_empty() {
            return Err((
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                "Invalid OAuth scope or ID token audience provided.",
            ));
        }
        if !scopes.iter().all(|s| {
            self.delegated
                .contains(&(client_id.clone(), (*s).to_owned()))
        }) {
            return Err((
                StatusCode::UNAUTHORIZED,
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.",
            ));
        }
        let sub = claims.sub.unwrap_or_default();
        if !self.users.contains(&sub.to_ascii_lowercase()) {
            return Err((
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "Invalid email or User ID",
            ));
        }
        Ok(sub)
    }
}

fn unverified_issuer(jwt: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss")?.as_str().map(str::to_owned)
}

/// RFC 7662 introspection of the access tokens issued above (for Dovecot's `oauth2` passdb).
pub async fn introspect(
    State((_, inner)): State<(super::Flavour, Arc<Mutex<super::Inner>>)>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let token = form.get("token").cloned().unwrap_or_default();
    let i = inner.lock().unwrap();
    let body = match i.dwd.tokens.get(&token) {
        Some(sub) => serde_json::json!({"active": true, "email": sub, "sub": sub}),
        None => serde_json::json!({"active": false}),
    };
    axum::Json(body).into_response()
}
