//! Tokens without a person signing in: the client-credentials grant (RFC 6749 §4.4, with a client
//! secret or a certificate's client assertion) and the JWT-bearer grant of a Google service account
//! with domain-wide delegation (RFC 7523 §2.1). Neither yields a refresh token: a new access token
//! is simply asked for whenever one is due.

use super::assertion::{CLIENT_ASSERTION_TYPE, JWT_BEARER_GRANT};
use super::*;

impl OAuthClient {
    /// Get an app-only access token with the client-credentials grant: the client authenticates
    /// with its secret, or with a client assertion signed by its certificate's key
    /// (`private_key_jwt`). A refresh token that comes back anyway is dropped (there is no grant to
    /// keep); `scopes` are sent only when non-empty.
    pub async fn client_credentials(
        &self,
        bound: &Bound<'_>,
        scopes: &[String],
        now: Timestamp,
    ) -> Result<TokenGrant, TokenError> {
        let (endpoints, creds) = (bound.endpoints(), bound.creds());
        let op = TokenOperation::ClientCredentials;
        check_op(bound, op)?;
        let assertion = client_assertion(endpoints, creds, op, now)?;
        let client = token_client(bound);
        let mut request = client
            .exchange_client_credentials()
            .add_scopes(scopes.iter().map(|s| Scope::new(s.clone())));
        if let Some(a) = &assertion {
            request = request
                .add_extra_param("client_assertion_type", CLIENT_ASSERTION_TYPE)
                .add_extra_param("client_assertion", a.expose());
        }
        let meta = std::sync::Arc::new(Mutex::new(None));
        let call = |r: HttpRequest| send(self.http.clone(), r, meta.clone());
        let result = request.request_async(&call).await;
        let meta = meta.locked().take();
        let mut secrets = vec![creds.client_secret.expose()];
        secrets.extend(assertion.as_ref().map(SecretValue::expose));
        token_result(endpoints.kind, op, result, meta, now, &secrets).map(|grant| TokenGrant {
            refresh_token: None,
            ..grant
        })
    }

    /// Get an access token for `subject` (the mailbox) with a service account's JWT-bearer grant:
    /// the assertion names the service account (`iss`), the mailbox (`sub`), the token endpoint
    /// (`aud`) and the scopes, and is signed with the service account's key.
    pub async fn jwt_bearer(
        &self,
        bound: &Bound<'_>,
        subject: &str,
        scopes: &[String],
        now: Timestamp,
    ) -> Result<TokenGrant, TokenError> {
        let (endpoints, creds) = (bound.endpoints(), bound.creds());
        let op = TokenOperation::JwtBearer;
        check_op(bound, op)?;
        let Some(SigningKey::ServiceAccount(account)) = creds.signing_key.as_deref() else {
            return Err(TokenError::permanent(
                endpoints.kind,
                op,
                Reason::ClientKeyInvalid,
                "no service-account key was read from the client Secret".to_owned(),
            ));
        };
        let assertion = account
            .grant_assertion(subject, scopes, bound.url().as_str(), now)
            .map_err(|m| signing_failed(endpoints.kind, op, m))?;
        let secrets = [assertion.expose()];
        let form = [
            ("grant_type", JWT_BEARER_GRANT),
            ("assertion", assertion.expose()),
        ];
        let body = send_and_read(
            self.http.post(bound.url().clone()).form(&form),
            http_limit::TOKEN_RESPONSE_LIMIT,
            "the token endpoint",
            (endpoints.kind, op),
            &secrets,
            now,
        )
        .await?;
        match serde_json::from_slice::<GrantResponse>(&body) {
            Ok(r) => Ok(TokenGrant {
                refresh_token: None,
                ..grant_from(&r, now)
            }),
            Err(_) => {
                // Some servers answer errors with 200; never quote the body (it may hold a token).
                let cause = match serde_json::from_slice::<ProviderErrorBody>(&body) {
                    Ok(b) if !b.error.is_empty() => FailureCause::Http {
                        status: 200,
                        retry_after: None,
                        body: ErrorBody::OAuth(b),
                    },
                    _ => FailureCause::InvalidResponse {
                        detail: "the token response is not a token (no access_token)".to_owned(),
                    },
                };
                Err(token_error(endpoints.kind, op, cause, &secrets))
            }
        }
    }
}

fn signing_failed(kind: ProviderKind, op: TokenOperation, message: String) -> TokenError {
    TokenError::permanent(
        kind,
        op,
        Reason::ClientKeyInvalid,
        format!("{message}: check the key in the Secret"),
    )
}
