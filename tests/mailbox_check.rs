//! The mailbox check against a real mail server: Debian's Dovecot, started by the test, validating
//! tokens through its `oauth2` passdb.
//!
//! Dovecot asks a small introspection endpoint written here (axum on 127.0.0.1) about each token, so
//! that these tests do not wait for the OAuth server fixture: Dovecot is the real server under test,
//! only the token validator is local. The end-to-end tests point the same Dovecot fixture at
//! oidc-provider's introspection endpoint instead (`DovecotConfig::new(<its URL>)`).

mod support;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Form, Json, Router, http::HeaderMap, http::StatusCode, routing::post};
use base64::Engine as _;
use mail_integration_operator::{
    api::TlsMode,
    mailbox::{
        CheckProtocol, CheckTarget, MailboxError, SaslMechanism, check, oauthbearer, xoauth2,
    },
    secret::SecretValue,
};
use support::dovecot::{Dovecot, DovecotConfig, TestCa};

const USER: &str = "user@example.com";
const GOOD_TOKEN: &str = "ya29.mio-test-good-access-token.0123456789abcdefghij";
const REVOKED_TOKEN: &str = "ya29.mio-test-revoked-access-token.9876543210zyxwvu";
/// Used only where the check must stop before authenticating: Dovecot must never see it.
const UNSENT_TOKEN: &str = "ya29.mio-test-never-sent-token.ABCDEFGHIJ0123456789";
const INTROSPECTION_CLIENT: &str = "mail-server";
const INTROSPECTION_SECRET: &str = "introspection-secret";

/// A stand-in for the OAuth server's RFC 7662 introspection endpoint: `GOOD_TOKEN` is active for
/// `USER`, everything else is `{"active":false}`. Requests without the introspecting client's
/// credentials get 401.
struct Introspection {
    url: String,
    calls: Arc<Mutex<HashMap<String, usize>>>,
    unauthenticated: Arc<AtomicUsize>,
}

impl Introspection {
    fn calls_for(&self, token: &str) -> usize {
        self.calls.lock().unwrap().get(token).copied().unwrap_or(0)
    }
}

fn start_introspection() -> Introspection {
    let calls: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let unauthenticated = Arc::new(AtomicUsize::new(0));
    let expected_auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("{INTROSPECTION_CLIENT}:{INTROSPECTION_SECRET}"))
    );
    let (c, u) = (calls.clone(), unauthenticated.clone());
    let app = Router::new().route(
        "/token/introspection",
        post(
            move |headers: HeaderMap, Form(form): Form<HashMap<String, String>>| {
                let (calls, unauthenticated, expected_auth) =
                    (c.clone(), u.clone(), expected_auth.clone());
                async move {
                    let authorized = headers.get("authorization").and_then(|v| v.to_str().ok())
                        == Some(expected_auth.as_str());
                    if !authorized {
                        unauthenticated.fetch_add(1, Ordering::SeqCst);
                        return (
                            StatusCode::UNAUTHORIZED,
                            Json(serde_json::json!({"error": "invalid_client"})),
                        );
                    }
                    let token = form.get("token").cloned().unwrap_or_default();
                    *calls.lock().unwrap().entry(token.clone()).or_default() += 1;
                    let body = if token == GOOD_TOKEN {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap()
                            .as_secs();
                        serde_json::json!({
                            "active": true,
                            "sub": USER,
                            "email": USER,
                            "client_id": "mail-integration-operator",
                            "scope": "openid email offline_access mail",
                            "token_type": "Bearer",
                            "iat": now,
                            "exp": now + 3600,
                        })
                    } else {
                        serde_json::json!({"active": false})
                    };
                    (StatusCode::OK, Json(body))
                }
            },
        ),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    // Its own runtime on its own thread: it serves every test of this binary, whose runtimes come and go.
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            })
    });
    Introspection {
        url: format!(
            "http://{INTROSPECTION_CLIENT}:{INTROSPECTION_SECRET}@127.0.0.1:{port}/token/introspection"
        ),
        calls,
        unauthenticated,
    }
}

struct Stand {
    introspection: Introspection,
    dovecot: Dovecot,
    /// A CA that did not sign Dovecot's certificate.
    other_ca_pem: Vec<u8>,
    _other_ca_dir: tempfile::TempDir,
}

/// Dovecot and the introspection endpoint, shared by the tests of this binary.
fn stand() -> &'static Stand {
    static STAND: OnceLock<Stand> = OnceLock::new();
    STAND.get_or_init(|| {
        let introspection = start_introspection();
        let dovecot = Dovecot::start(DovecotConfig::new(introspection.url.clone()));
        dovecot.deliver(
            USER,
            "From: a@example.com\nTo: user@example.com\nSubject: hello\n\nfirst message\n",
        );
        let dir = tempfile::tempdir().unwrap();
        let other = TestCa::generate(dir.path(), "other");
        Stand {
            introspection,
            dovecot,
            other_ca_pem: other.cert_pem,
            _other_ca_dir: dir,
        }
    })
}

fn port(d: &Dovecot, protocol: CheckProtocol, tls: TlsMode) -> u16 {
    match (protocol, tls) {
        (CheckProtocol::Imap, TlsMode::Implicit) => d.imaps_port,
        (CheckProtocol::Imap, _) => d.imap_port,
        (CheckProtocol::Pop3, TlsMode::Implicit) => d.pop3s_port,
        (CheckProtocol::Pop3, _) => d.pop3_port,
        (CheckProtocol::Smtp, TlsMode::Implicit) => d.submissions_port,
        (CheckProtocol::Smtp, _) => d.submission_port,
    }
}

fn target(
    d: &Dovecot,
    protocol: CheckProtocol,
    tls: TlsMode,
    mechanism: SaslMechanism,
) -> CheckTarget {
    CheckTarget::new("127.0.0.1", port(d, protocol, tls), protocol, USER)
        .with_tls(tls)
        .with_mechanism(mechanism)
        .with_extra_ca_pem(d.ca_pem.clone())
}

async fn expect_ok(protocol: CheckProtocol, tls: TlsMode, mechanism: SaslMechanism) {
    let s = stand();
    let before = s.introspection.calls_for(GOOD_TOKEN);
    let t = target(&s.dovecot, protocol, tls, mechanism);
    let ok = check(&t, &SecretValue::new(GOOD_TOKEN))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{protocol} {mechanism} over {tls:?} should pass, got {} ({e}). Dovecot log:\n{}",
                e.reason(),
                s.dovecot.log_tail(15)
            )
        });
    assert_eq!(
        (ok.protocol, ok.mechanism, ok.tls),
        (protocol, mechanism, tls)
    );
    let expected_messages = match protocol {
        CheckProtocol::Smtp => None,
        // The one message delivered when the stand started.
        _ => Some(1),
    };
    assert_eq!(ok.messages, expected_messages, "{ok}");
    assert!(ok.elapsed < t.timeout, "{:?}", ok.elapsed);
    assert!(
        s.introspection.calls_for(GOOD_TOKEN) > before,
        "Dovecot did not introspect the token: it cannot have validated it"
    );
}

async fn expect_auth_failed(
    protocol: CheckProtocol,
    tls: TlsMode,
    mechanism: SaslMechanism,
) -> MailboxError {
    let s = stand();
    let t = target(&s.dovecot, protocol, tls, mechanism);
    let err = check(&t, &SecretValue::new(REVOKED_TOKEN))
        .await
        .expect_err("a revoked token must fail");
    let MailboxError::AuthFailed { detail } = &err else {
        panic!("{protocol} {mechanism}: expected AuthFailed, got {err:?}");
    };
    assert_eq!(err.reason(), "MailboxAuthFailed");
    // Dovecot 2.3's error challenges, decoded.
    let challenge: serde_json::Value = serde_json::from_str(detail)
        .unwrap_or_else(|_| panic!("detail should be the challenge JSON: {detail}"));
    let expected_status = match mechanism {
        SaslMechanism::XOAuth2 => "401",
        SaslMechanism::OAuthBearer => "invalid_token",
    };
    assert_eq!(challenge["status"], expected_status, "{detail}");
    assert_no_secret(&err, REVOKED_TOKEN, &t);
    err
}

/// Neither Display nor Debug of an error holds the token or a SASL string made from it.
fn assert_no_secret(err: &MailboxError, token: &str, t: &CheckTarget) {
    let token_value = SecretValue::new(token);
    let secrets = [
        token.to_owned(),
        xoauth2(&t.username, &token_value).expose().to_owned(),
        oauthbearer(&t.username, &t.host, t.port, &token_value)
            .expose()
            .to_owned(),
        // A distinctive part of the token, in case it was cut or re-encoded.
        token[5..25].to_owned(),
    ];
    for text in [format!("{err}"), format!("{err:?}")] {
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "error text contains a secret: {text}"
            );
        }
    }
}

use CheckProtocol::{Imap, Pop3, Smtp};
use SaslMechanism::{OAuthBearer, XOAuth2};

#[tokio::test]
async fn imap_implicit_tls_xoauth2() {
    expect_ok(Imap, TlsMode::Implicit, XOAuth2).await;
}

#[tokio::test]
async fn imap_implicit_tls_oauthbearer() {
    expect_ok(Imap, TlsMode::Implicit, OAuthBearer).await;
}

#[tokio::test]
async fn imap_starttls_xoauth2() {
    expect_ok(Imap, TlsMode::StartTls, XOAuth2).await;
}

#[tokio::test]
async fn imap_starttls_oauthbearer() {
    expect_ok(Imap, TlsMode::StartTls, OAuthBearer).await;
}

#[tokio::test]
async fn imap_plain_loopback() {
    expect_ok(Imap, TlsMode::None, XOAuth2).await;
}

#[tokio::test]
async fn pop3_implicit_tls_xoauth2() {
    expect_ok(Pop3, TlsMode::Implicit, XOAuth2).await;
}

#[tokio::test]
async fn pop3_implicit_tls_oauthbearer() {
    expect_ok(Pop3, TlsMode::Implicit, OAuthBearer).await;
}

#[tokio::test]
async fn pop3_starttls_xoauth2() {
    expect_ok(Pop3, TlsMode::StartTls, XOAuth2).await;
}

#[tokio::test]
async fn pop3_starttls_oauthbearer() {
    expect_ok(Pop3, TlsMode::StartTls, OAuthBearer).await;
}

#[tokio::test]
async fn smtp_implicit_tls_xoauth2() {
    expect_ok(Smtp, TlsMode::Implicit, XOAuth2).await;
}

#[tokio::test]
async fn smtp_implicit_tls_oauthbearer() {
    expect_ok(Smtp, TlsMode::Implicit, OAuthBearer).await;
}

#[tokio::test]
async fn smtp_starttls_xoauth2() {
    expect_ok(Smtp, TlsMode::StartTls, XOAuth2).await;
}

#[tokio::test]
async fn smtp_starttls_oauthbearer() {
    expect_ok(Smtp, TlsMode::StartTls, OAuthBearer).await;
}

#[tokio::test]
async fn revoked_token_is_auth_failed_with_the_decoded_challenge() {
    for protocol in [Imap, Pop3, Smtp] {
        for mechanism in [XOAuth2, OAuthBearer] {
            let tls = if protocol == Pop3 {
                TlsMode::StartTls
            } else {
                TlsMode::Implicit
            };
            expect_auth_failed(protocol, tls, mechanism).await;
        }
    }
    assert!(stand().introspection.calls_for(REVOKED_TOKEN) >= 6);
    assert_eq!(
        stand().introspection.unauthenticated.load(Ordering::SeqCst),
        0,
        "Dovecot must introspect with the client's credentials"
    );
}

#[tokio::test]
async fn revoked_token_error_says_why_in_display() {
    let err = expect_auth_failed(Imap, TlsMode::Implicit, OAuthBearer).await;
    assert_eq!(
        err.to_string(),
        r#"the mail server rejected the access token: {"status":"invalid_token"}"#
    );
}

#[tokio::test]
async fn token_of_another_account_is_refused() {
    let s = stand();
    for protocol in [Imap, Pop3, Smtp] {
        let mut t = target(&s.dovecot, protocol, TlsMode::Implicit, XOAuth2);
        t.username = "someone-else@example.com".into();
        let err = check(&t, &SecretValue::new(GOOD_TOKEN)).await.unwrap_err();
        assert_eq!(err.reason(), "MailboxAuthFailed", "{protocol}: {err}");
        assert_no_secret(&err, GOOD_TOKEN, &t);
    }
}

#[tokio::test]
async fn certificate_from_another_ca_is_a_tls_error() {
    let s = stand();
    for protocol in [Imap, Pop3, Smtp] {
        for tls in [TlsMode::Implicit, TlsMode::StartTls] {
            let t = target(&s.dovecot, protocol, tls, XOAuth2)
                .with_extra_ca_pem(s.other_ca_pem.clone());
            let err = check(&t, &SecretValue::new(UNSENT_TOKEN))
                .await
                .unwrap_err();
            let MailboxError::Tls { detail } = &err else {
                panic!("{protocol} {tls:?}: expected Tls, got {err:?}");
            };
            assert!(
                detail.contains("certificate not trusted") && detail.contains("(UnknownIssuer)"),
                "{protocol} {tls:?}: {detail}"
            );
            assert_eq!(err.reason(), "TLSError");
            assert_no_secret(&err, UNSENT_TOKEN, &t);
        }
    }
    // The token never reached the server.
    assert_eq!(s.introspection.calls_for(UNSENT_TOKEN), 0);
}

#[tokio::test]
async fn without_the_test_ca_the_public_roots_do_not_trust_dovecot() {
    let s = stand();
    let mut t = target(&s.dovecot, Imap, TlsMode::Implicit, XOAuth2);
    t.extra_ca_pem = None;
    let err = check(&t, &SecretValue::new(UNSENT_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "TLSError", "{err}");
    assert!(err.to_string().contains("(UnknownIssuer)"), "{err}");
    assert_no_secret(&err, UNSENT_TOKEN, &t);
}

#[tokio::test]
async fn certificate_for_another_name_is_a_tls_error() {
    let s = stand();
    // The certificate names localhost and 127.0.0.1. Dovecot's implicit-TLS IMAP listener also
    // listens on 127.0.0.2, which the certificate does not name.
    let mut t = target(&s.dovecot, Imap, TlsMode::Implicit, XOAuth2);
    t.host = "127.0.0.2".into();
    let err = check(&t, &SecretValue::new(UNSENT_TOKEN))
        .await
        .unwrap_err();
    let MailboxError::Tls { detail } = &err else {
        panic!("expected Tls, got {err:?}");
    };
    assert!(
        detail.contains("certificate is for another host name (NotValidForName)"),
        "{detail}"
    );
    assert_no_secret(&err, UNSENT_TOKEN, &t);
    // The same server by a name that the certificate holds passes.
    t.host = "localhost".into();
    let ok = check(&t, &SecretValue::new(GOOD_TOKEN)).await;
    assert!(ok.is_ok(), "{ok:?}");
}

#[tokio::test]
async fn implicit_tls_to_a_plain_port_is_a_tls_error() {
    let s = stand();
    let mut t = target(&s.dovecot, Imap, TlsMode::Implicit, XOAuth2);
    t.port = s.dovecot.imap_port;
    let err = check(&t, &SecretValue::new(UNSENT_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "TLSError", "{err}");
    assert!(err.to_string().contains("plain-text port"), "{err}");
    assert_no_secret(&err, UNSENT_TOKEN, &t);
    assert_eq!(stand().introspection.calls_for(UNSENT_TOKEN), 0);
}

#[tokio::test]
async fn nothing_listening_is_unreachable() {
    let s = stand();
    let closed = support::process::CLOSED_PORT;
    for protocol in [Imap, Pop3, Smtp] {
        for tls in [TlsMode::Implicit, TlsMode::StartTls] {
            let mut t = target(&s.dovecot, protocol, tls, XOAuth2);
            t.port = closed;
            let err = check(&t, &SecretValue::new(UNSENT_TOKEN))
                .await
                .unwrap_err();
            let MailboxError::Unreachable { detail } = &err else {
                panic!("{protocol} {tls:?}: expected Unreachable, got {err:?}");
            };
            assert!(
                detail.contains("Connection refused") && detail.contains(&format!(":{closed}")),
                "{protocol} {tls:?}: {detail}"
            );
            assert_eq!(err.reason(), "MailboxUnreachable");
            assert_no_secret(&err, UNSENT_TOKEN, &t);
        }
    }
}

#[tokio::test]
async fn silent_server_times_out_as_unreachable() {
    // Accepted by the kernel's backlog, never answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    for protocol in [Imap, Pop3, Smtp] {
        let t = CheckTarget::new("127.0.0.1", port, protocol, USER)
            .with_tls(TlsMode::StartTls)
            .with_timeout(Duration::from_millis(700));
        let started = std::time::Instant::now();
        let err = check(&t, &SecretValue::new(UNSENT_TOKEN))
            .await
            .unwrap_err();
        let elapsed = started.elapsed();
        assert_eq!(err.reason(), "MailboxUnreachable", "{protocol}: {err}");
        // At least the timeout; at most the timeout plus 2.3 s of margin (a loopback connect and
        // a timer): a check that ignored its timeout would hang far longer.
        assert!(
            elapsed >= Duration::from_millis(700) && elapsed < Duration::from_secs(3),
            "{elapsed:?}"
        );
        assert!(
            err.to_string().contains("no answer within 0.7s"),
            "{protocol}: {err}"
        );
        assert_no_secret(&err, UNSENT_TOKEN, &t);
    }
    drop(silent);
}

#[tokio::test]
async fn stopped_dovecot_is_unreachable_then_recovers() {
    // Its own Dovecot: stopping the shared one would break the tests running beside this one.
    let s = stand();
    let mut dovecot = Dovecot::start(DovecotConfig::new(s.introspection.url.clone()));
    let t = target(&dovecot, Imap, TlsMode::Implicit, OAuthBearer);
    let token = SecretValue::new(GOOD_TOKEN);
    let ok = check(&t, &token)
        .await
        .expect("running Dovecot accepts the token");
    assert_eq!(ok.messages, Some(0), "a new, empty mailbox");

    dovecot.stop();
    let err = check(&t, &token).await.unwrap_err();
    assert_eq!(err.reason(), "MailboxUnreachable", "{err}");
    assert!(err.to_string().contains("refused"), "{err}");
    assert_no_secret(&err, GOOD_TOKEN, &t);

    dovecot.start_again();
    let ok = check(&t, &token).await.unwrap_or_else(|e| {
        panic!(
            "after the restart the check should pass again: {e}\n{}",
            dovecot.log_tail(15)
        )
    });
    assert_eq!(ok.protocol, Imap);
}

/// A scripted IMAP server that accepts any AUTHENTICATE and then refuses every command, as
/// Microsoft 365 does for "User is authenticated but not connected".
#[tokio::test]
async fn authenticated_but_not_connected_is_auth_failed() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write
            .write_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push(line.clone());
            let tag = line.split(' ').next().unwrap_or("*").to_owned();
            let reply = if line.contains("AUTHENTICATE") {
                "+ \r\n".to_owned()
            } else if !line.contains(' ') {
                // The SASL response line.
                "A0001 OK AUTHENTICATE completed.\r\n".to_owned()
            } else if line.contains("EXAMINE") || line.contains("SELECT") {
                format!("{tag} NO User is authenticated but not connected.\r\n")
            } else if line.contains("LOGOUT") {
                format!("* BYE\r\n{tag} OK LOGOUT completed.\r\n")
            } else {
                format!("{tag} BAD unexpected\r\n")
            };
            write.write_all(reply.as_bytes()).await.unwrap();
        }
        seen
    });
    let t = CheckTarget::new("127.0.0.1", port, Imap, USER).with_tls(TlsMode::None);
    let err = check(&t, &SecretValue::new(GOOD_TOKEN)).await.unwrap_err();
    assert_eq!(err.reason(), "MailboxAuthFailed", "{err:?}");
    assert_eq!(
        err.to_string(),
        "the mail server rejected the access token: the token was accepted, but EXAMINE INBOX \
         failed: NO User is authenticated but not connected."
    );
    let seen = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    assert!(
        seen.iter().any(|l| l.ends_with("AUTHENTICATE XOAUTH2")),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|l| l.ends_with("EXAMINE \"INBOX\"")),
        "{seen:?}"
    );
}
