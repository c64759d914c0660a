use super::*;
use crate::provider::{Discovered, google_endpoints};
use crate::secret::SecretValue;

fn url(s: &str) -> Url {
    Url::parse(s).unwrap()
}

fn oidc(token: &str, revocation: Option<&str>) -> ProviderEndpoints {
    ProviderEndpoints {
        kind: ProviderKind::Oidc,
        authorization: url("https://id.example.com/auth"),
        token: url(token),
        revocation: revocation.map(url),
        userinfo: None,
        issuer: None,
        discovered: None,
    }
}

fn creds(servers: Option<&str>) -> ClientCredentials {
    ClientCredentials {
        client_id: "app-1".into(),
        client_secret: SecretValue::new("CLIENT-SECRET-binding-01"),
        signing_key: None,
        owner: CredentialOwner {
            secret: "client".into(),
            namespace: "team".into(),
            servers: servers.map(|s| parse_servers(s).unwrap()),
        },
    }
}

fn check(
    op: TokenOperation,
    dest: &str,
    e: &ProviderEndpoints,
    c: &ClientCredentials,
    carrying: Carrying<'_>,
) -> Result<(), Refusal> {
    bind(op, &url(dest), e, c, carrying, false).map(|_| ())
}

#[test]
fn an_oidc_credential_goes_only_where_the_secret_says() {
    let e = oidc("https://id.example.com/realms/a/token", None);
    let cc = TokenOperation::ClientCredentials;
    let err = check(cc, e.token.as_str(), &e, &creds(None), Carrying::Client).unwrap_err();
    assert_eq!(err.reason, Reason::OAuthServerNotAllowed);
    assert!(
        err.message.contains(
            "kubectl annotate secret client -n team mailintegration.dev/oauth-servers=https://id.example.com"
        ),
        "{}",
        err.message
    );
    assert!(!err.message.contains("CLIENT-SECRET"));
    let listed = creds(Some("https://id.example.com/realms/a"));
    assert!(check(cc, e.token.as_str(), &e, &listed, Carrying::Client).is_ok());
    // Not another realm, another port, a look-alike host or plain http.
    for dest in [
        "https://id.example.com/realms/b/token",
        "https://id.example.com/realms/a-evil/token",
        "https://id.example.com:8443/realms/a/token",
        "https://id.example.com.evil.test/realms/a/token",
        "http://id.example.com/realms/a/token",
    ] {
        let err = check(cc, dest, &e, &listed, Carrying::Client).unwrap_err();
        assert!(
            err.message
                .contains("kubectl annotate --overwrite secret client -n team"),
            "{dest}: {}",
            err.message
        );
    }
}

#[test]
fn a_listed_issuer_may_name_its_own_endpoints() {
    let mut e = oidc("https://oauth2.example.net/token", None);
    e.discovered = Some(Discovered {
        issuer_url: "https://accounts.example.com".into(),
        urls: vec![url("https://oauth2.example.net/token")],
    });
    let ok = creds(Some("https://accounts.example.com/"));
    let cc = TokenOperation::ClientCredentials;
    assert!(
        check(
            cc,
            "https://oauth2.example.net/token",
            &e,
            &ok,
            Carrying::Client
        )
        .is_ok()
    );
    // A URL the document did not name (a spec override) is not the issuer's.
    assert!(
        check(
            cc,
            "https://oauth2.example.net/other",
            &e,
            &ok,
            Carrying::Client
        )
        .is_err()
    );
    let err = check(
        cc,
        "https://oauth2.example.net/token",
        &e,
        &creds(None),
        Carrying::Client,
    )
    .unwrap_err();
    assert!(
        err.message
            .contains("oauth-servers=https://accounts.example.com"),
        "the issuer is what to list: {}",
        err.message
    );
}

#[test]
fn google_credentials_go_to_google_unless_the_admin_allows_overrides() {
    let g = google_endpoints();
    let c = creds(None);
    let r = TokenOperation::Refresh;
    let grant = Carrying::Grant {
        origin: GrantOrigin::default(),
        mailbox: "a@example.com",
    };
    assert!(check(r, g.token.as_str(), &g, &c, grant).is_ok());
    assert!(check(r, "https://evil.example/token", &g, &c, grant).is_err());
    assert!(bind(r, &url("https://evil.example/token"), &g, &c, grant, true).is_ok());
    // The Secret's list adds servers; Google's own stay allowed.
    let listed = creds(Some("https://other.example"));
    assert!(check(r, g.token.as_str(), &g, &listed, grant).is_ok());
    assert!(check(r, "https://other.example/token", &g, &listed, grant).is_ok());
    assert!(check(r, "https://evil.example/token", &g, &listed, grant).is_err());
}

#[test]
fn a_grant_goes_back_only_where_it_was_issued() {
    let e = oidc(
        "https://id.example.com/token",
        Some("https://evil.example/revoke"),
    );
    let c = creds(Some("https://id.example.com,https://evil.example"));
    let origin = GrantOrigin {
        token_endpoint: Some("https://id.example.com/token"),
        revocation_endpoint: None,
        client_id: Some("app-1"),
        account: Some("a@example.com"),
    };
    let grant = Carrying::Grant {
        origin,
        mailbox: "a@example.com",
    };
    let rev = TokenOperation::Revocation;
    // Not recorded: only on the server of the token endpoint.
    let err = check(rev, "https://evil.example/revoke", &e, &c, grant).unwrap_err();
    assert_eq!(err.reason, Reason::GrantBoundElsewhere);
    assert!(
        check(
            rev,
            "https://id.example.com/token/revocation",
            &e,
            &c,
            grant
        )
        .is_ok()
    );
    // Recorded: exactly there.
    let recorded = Carrying::Grant {
        origin: GrantOrigin {
            revocation_endpoint: Some("https://id.example.com/revoke"),
            ..origin
        },
        mailbox: "a@example.com",
    };
    assert!(check(rev, "https://id.example.com/revoke", &e, &c, recorded).is_ok());
    assert!(
        check(
            rev,
            "https://id.example.com/token/revocation",
            &e,
            &c,
            recorded
        )
        .is_err()
    );
    // Refresh: token endpoint, client and account.
    let r = TokenOperation::Refresh;
    assert!(check(r, "https://id.example.com/token/", &e, &c, grant).is_ok());
    assert!(check(r, "https://evil.example/token", &e, &c, grant).is_err());
    let other = Carrying::Grant {
        origin,
        mailbox: "b@example.com",
    };
    assert!(check(r, "https://id.example.com/token", &e, &c, other).is_err());
}

#[test]
fn a_code_goes_to_the_token_endpoint_bound_at_start() {
    let e = oidc("https://evil.example/token", None);
    let c = creds(Some("https://id.example.com,https://evil.example"));
    let code = Carrying::Code {
        token_endpoint: "https://id.example.com/token",
        client_id: "app-1",
    };
    let x = TokenOperation::CodeExchange;
    let err = check(x, "https://evil.example/token", &e, &c, code).unwrap_err();
    assert_eq!(err.reason, Reason::GrantBoundElsewhere);
    assert!(check(x, "https://id.example.com/token", &e, &c, code).is_ok());
    let other_client = Carrying::Code {
        token_endpoint: "https://id.example.com/token",
        client_id: "app-2",
    };
    assert!(check(x, "https://id.example.com/token", &e, &c, other_client).is_err());
}

#[test]
fn the_annotation_lists_server_urls_only() {
    assert!(parse_servers("https://a.example, http://127.0.0.1:8080/x").is_ok());
    for bad in [
        "",
        " , ",
        "http://a.example",
        "https://u:p@a.example",
        "https://a.example/?q=1",
        "ftp://a",
    ] {
        assert!(parse_servers(bad).is_err(), "{bad}");
    }
}
