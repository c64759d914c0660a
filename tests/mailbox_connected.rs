//! "Your Mail Integration is connected to the mailbox" as a checked fact: the operator logs in to a
//! real Dovecot, which validates the token by introspection at the same oidc-provider the operator
//! refreshes against, and reports MailboxConnected on the resource.

mod support;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use mail_integration_operator::api::MailIntegration;
use std::time::Duration;
use support::{
    dovecot::{Dovecot, DovecotConfig},
    oauth::OAuthServer,
    world::{Env, annotate_refresh, condition, is_ready},
};

fn server() -> &'static OAuthServer {
    support::oauth::with_token_ttl(600)
}

/// Dovecot asking `server()` whether a token is active, naming the user by its `email` claim.
fn dovecot() -> Dovecot {
    let (id, secret) = server().introspection_client();
    let url =
        server()
            .introspection_url()
            .replacen("http://", &format!("http://{id}:{secret}@"), 1);
    Dovecot::start(DovecotConfig {
        username_attribute: "email".into(),
        ..DovecotConfig::new(url)
    })
}

async fn ca_secret(env: &Env, pem: &[u8]) {
    let s: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "mail-ca", "labels": {"mailintegration.dev/oauth-client": "true"}},
        "stringData": {"ca.crt": String::from_utf8(pem.to_vec()).unwrap()},
    }))
    .unwrap();
    env.secrets()
        .create(&PostParams::default(), &s)
        .await
        .unwrap();
}

fn mailbox_condition(mi: &MailIntegration) -> Option<(String, String, String)> {
    mi.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "MailboxConnected")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The test-only protocol scale of this binary's operators (`MIO_TEST_PROTOCOL_SCALE`,
/// docs/operations.md "Settings for tests only"): `spec.mailbox.checkInterval` is divided by it, so
/// that the CRD's smallest interval, 1m, is a periodic check every 15 s here.
const SCALE: u32 = 4;

async fn ready_world(prefix: &str) -> (Env, support::operator::Operator) {
    let mut env = Env::new(prefix, server()).await;
    env.operator_env
        .push(("MIO_TEST_PROTOCOL_SCALE", SCALE.to_string()));
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    (env, op)
}

/// `a1 AUTHENTICATE <mechanism> <initial_response>` at Dovecot's IMAPS port, with `openssl s_client`
/// as the mail client (a real TLS client, trusting Dovecot's CA), the initial response sent as it is.
/// Returns the server's tagged answer, or everything it said when there is none.
fn imap_authenticate(dovecot: &Dovecot, mechanism: &str, initial_response: &str) -> String {
    use std::io::Write as _;
    let ca = dovecot.dir.path().join("client-ca.pem");
    std::fs::write(&ca, &dovecot.ca_pem).unwrap();
    let mut child = std::process::Command::new("timeout")
        .args([
            "20",
            "openssl",
            "s_client",
            "-quiet",
            "-verify_return_error",
        ])
        .arg("-CAfile")
        .arg(&ca)
        .args(["-connect", &format!("127.0.0.1:{}", dovecot.imaps_port)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl is needed as the test's mail client (apt-get install openssl)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            format!("a1 AUTHENTICATE {mechanism} {initial_response}\r\na2 LOGOUT\r\n").as_bytes(),
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.starts_with("a1 "))
        .map(str::to_owned)
        .unwrap_or(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_pop3_and_smtp_accept_the_token_with_xoauth2_and_oauthbearer() {
    let dovecot = dovecot();
    let (env, op) = ready_world("mailbox-ok").await;
    ca_secret(&env, &dovecot.ca_pem).await;
    let cases = [
        (
            "imaps",
            "IMAP",
            dovecot.imaps_port,
            "Implicit",
            "XOAUTH2",
            Some((dovecot.submissions_port, "Implicit")),
        ),
        (
            "imap-starttls",
            "IMAP",
            dovecot.imap_port,
            "StartTLS",
            "OAUTHBEARER",
            Some((dovecot.submission_port, "StartTLS")),
        ),
        (
            "pop3s",
            "POP3",
            dovecot.pop3s_port,
            "Implicit",
            "OAUTHBEARER",
            None,
        ),
        (
            "pop3-starttls",
            "POP3",
            dovecot.pop3_port,
            "StartTLS",
            "XOAUTH2",
            None,
        ),
    ];
    for (name, protocol, port, tls, mechanism, smtp) in &cases {
        env.grant(name, "alice").await;
        let mut mailbox = serde_json::json!({
            "protocol": protocol,
            "server": {"host": "127.0.0.1", "port": port, "tls": tls},
            "mechanism": mechanism,
            "caSecretRef": {"name": "mail-ca"},
        });
        if let Some((p, t)) = smtp {
            mailbox["smtp"] = serde_json::json!({"host": "127.0.0.1", "port": p, "tls": t});
        }
        env.integration_with(
            name,
            "alice@example.test",
            serde_json::json!({ "mailbox": mailbox }),
        )
        .await;
    }
    for (name, protocol, _, _, mechanism, smtp) in &cases {
        let mi = env
            .wait_for(
                name,
                "MailboxConnected=True",
                Duration::from_secs(40),
                &op,
                |m| mailbox_condition(m).is_some_and(|c| c.0 == "True"),
            )
            .await;
        let (_, reason, message) = mailbox_condition(&mi).unwrap();
        assert_eq!(reason, "Connected");
        assert!(
            message.contains(protocol) && message.contains(mechanism),
            "{name}: {message}"
        );
        assert_eq!(
            smtp.is_some(),
            message.contains("SMTP"),
            "{name}: SMTP checked only when set: {message}"
        );
        assert!(is_ready(&mi), "{name}: {:?}", mi.status);
    }
    // kubectl shows it in the Mailbox column.
    let table = env.cp.kubectl(&["get", "mailint", "-n", &env.ns]);
    assert!(
        table.lines().skip(1).all(|l| l.contains("Connected")),
        "{table}"
    );
    // The token Secret's ready-made SASL strings, as a workload uses them: sent as they are by a mail
    // client of its own (openssl s_client), Dovecot lets them in; the same string with another token
    // in it is refused, so the check can fail.
    for (key, mechanism) in [("xoauth2", "XOAUTH2"), ("oauthbearer", "OAUTHBEARER")] {
        let ready_made = env
            .data("imap-starttls-token", key)
            .await
            .unwrap_or_else(|| panic!("the token Secret has no {key} key"));
        let answer = imap_authenticate(&dovecot, mechanism, &ready_made);
        assert!(answer.starts_with("a1 OK"), "{key}: {answer}");
        let forged = base64::engine::general_purpose::STANDARD.encode(
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(&ready_made)
                    .unwrap(),
            )
            .unwrap()
            .replace("auth=Bearer ", "auth=Bearer forged"),
        );
        let answer = imap_authenticate(&dovecot, mechanism, &forged);
        assert!(
            answer.starts_with("a1 NO") || answer.starts_with("a1 BAD"),
            "{key} with a forged token: {answer}"
        );
    }

    // The token never appears in the log.
    let token = env.data("imaps-token", "access_token").await.unwrap();
    assert!(
        !op.log().contains(&token),
        "the access token appears in the operator log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_have_exact_reasons_and_recover_when_fixed() {
    let mut dovecot = dovecot();
    let (env, op) = ready_world("mailbox-bad").await;
    env.grant("inbox", "alice").await;
    // No CA configured: Dovecot's certificate is not trusted.
    env.integration_with(
        "inbox",
        "alice@example.test",
        serde_json::json!({"mailbox": {"server": {"host": "127.0.0.1", "port": dovecot.imaps_port, "tls": "Implicit"}, "checkInterval": "1m"}}),
    )
    .await;
    let mi = env
        .wait_for("inbox", "TLSError", Duration::from_secs(30), &op, |m| {
            mailbox_condition(m).is_some_and(|c| c.1 == "TLSError")
        })
        .await;
    let (status, _, message) = mailbox_condition(&mi).unwrap();
    assert_eq!(status, "False");
    assert!(
        message.contains("certificate not trusted") && message.contains("caSecretRef"),
        "{message}"
    );
    assert_eq!(
        condition(&mi, "Ready"),
        Some(("False", "TLSError")),
        "Ready takes the mailbox into account"
    );
    assert_eq!(
        condition(&mi, "TokenValid"),
        Some(("True", "TokenValid")),
        "the token itself is fine"
    );

    // Fix: give the CA.
    ca_secret(&env, &dovecot.ca_pem).await;
    patch_mailbox(
        &env,
        "inbox",
        serde_json::json!({"caSecretRef": {"name": "mail-ca"}}),
    )
    .await;
    env.wait_for(
        "inbox",
        "Connected after adding the CA",
        Duration::from_secs(20),
        &op,
        |m| mailbox_condition(m).is_some_and(|c| c.1 == "Connected") && is_ready(m),
    )
    .await;

    // A wrong port: unreachable; fixed: connected.
    let closed = support::process::CLOSED_PORT;
    patch_mailbox(
        &env,
        "inbox",
        serde_json::json!({"server": {"host": "127.0.0.1", "port": closed, "tls": "Implicit"}}),
    )
    .await;
    let mi = env
        .wait_for(
            "inbox",
            "MailboxUnreachable",
            Duration::from_secs(30),
            &op,
            |m| mailbox_condition(m).is_some_and(|c| c.1 == "MailboxUnreachable"),
        )
        .await;
    assert!(
        mailbox_condition(&mi)
            .unwrap()
            .2
            .contains(&closed.to_string())
    );
    patch_mailbox(&env, "inbox", serde_json::json!({"server": {"host": "127.0.0.1", "port": dovecot.imaps_port, "tls": "Implicit"}})).await;
    env.wait_for(
        "inbox",
        "Connected again",
        Duration::from_secs(20),
        &op,
        |m| mailbox_condition(m).is_some_and(|c| c.1 == "Connected"),
    )
    .await;

    // Dovecot stops: the check after a refresh says unreachable.
    dovecot.stop();
    annotate_refresh(&env, "inbox", "dovecot-stopped").await;
    env.wait_for(
        "inbox",
        "unreachable while Dovecot is stopped",
        Duration::from_secs(30),
        &op,
        |m| mailbox_condition(m).is_some_and(|c| c.1 == "MailboxUnreachable"),
    )
    .await;
    // It comes back: the periodic check (checkInterval 1m: 15 s at the binary's SCALE, no refresh
    // in between) sees it.
    dovecot.start_again();
    let refreshes = env.proxy.token_requests();
    env.wait_for(
        "inbox",
        "Connected on the periodic check",
        Duration::from_secs(60) / SCALE + Duration::from_secs(30),
        &op,
        |m| mailbox_condition(m).is_some_and(|c| c.1 == "Connected"),
    )
    .await;
    assert_eq!(
        env.proxy.token_requests(),
        refreshes,
        "the recovery came from the periodic check, not a refresh"
    );

    // A revoked token: Dovecot's introspection says inactive, and the check says so precisely.
    let token = env.data("inbox-token", "access_token").await.unwrap();
    env.server.revoke(&token).await;
    patch_mailbox(&env, "inbox", serde_json::json!({"checkInterval": "2m"})).await;
    let mi = env
        .wait_for(
            "inbox",
            "MailboxAuthFailed",
            Duration::from_secs(30),
            &op,
            |m| mailbox_condition(m).is_some_and(|c| c.1 == "MailboxAuthFailed"),
        )
        .await;
    let message = mailbox_condition(&mi).unwrap().2;
    assert!(
        message.contains(r#""status":"401""#) || message.contains("invalid_token"),
        "the server's decoded challenge: {message}"
    );
    assert!(
        !op.log().contains(&token),
        "the access token appears in the operator log"
    );
}

async fn patch_mailbox(env: &Env, name: &str, mailbox: serde_json::Value) {
    let patch = serde_json::json!({"spec": {"mailbox": mailbox}});
    env.integrations()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// The last check's time and result are in the status, so a restarted operator does not log in to
/// every mailbox again at once: the next check is due an interval after the last one. Counted at
/// the mail server (Dovecot's login lines) and by the new operator's own metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_check_the_mailbox_again_before_it_is_due() {
    let dovecot = dovecot();
    let (env, mut op) = ready_world("mailbox-restart").await;
    ca_secret(&env, &dovecot.ca_pem).await;
    env.grant("inbox", "alice").await;
    let user = "alice@example.test";
    env.integration_with(
        "inbox",
        user,
        serde_json::json!({"mailbox": {
            "protocol": "IMAP",
            "server": {"host": "127.0.0.1", "port": dovecot.imaps_port, "tls": "Implicit"},
            "mechanism": "XOAUTH2",
            "caSecretRef": {"name": "mail-ca"},
        }}),
    )
    .await;
    let mi = env
        .wait_for(
            "inbox",
            "MailboxConnected=True with status.mailboxCheckedAt",
            Duration::from_secs(40),
            &op,
            |m| {
                mailbox_condition(m).is_some_and(|c| c.0 == "True")
                    && m.status
                        .as_ref()
                        .is_some_and(|s| s.mailbox_checked_at.is_some())
            },
        )
        .await;
    let checked_at = mi.status.as_ref().unwrap().mailbox_checked_at.clone();
    // Counted once the first operator is gone: what the restarted one does is the question here.
    op.process.stop();
    // Dovecot's log process writes a login line a moment after the login.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let logins = dovecot.logins(user);
    assert!(
        logins >= 1,
        "Dovecot logged no login of {user}, though the operator reports MailboxConnected:\n{}",
        dovecot.log_tail(20)
    );

    let op2 = env.operator("operator-2");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while op2
        .metric("mailintegration_reconciles_total{result=\"ok\"}")
        .unwrap_or(0.0)
        < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the new operator did not reconcile within 30 s:\n{}",
            support::world::tail(&op2.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A check at start-up is started by the first reconcile and takes well under a second against
    // this local Dovecot; 5 s leave room for a loaded machine.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        dovecot.logins(user),
        logins,
        "the restarted operator logged in to the mailbox again although the last check (at {checked_at:?}) is less than an interval old:\n{}",
        dovecot.log_tail(10)
    );
    let checks = op2.metric_sum("mailintegration_mailbox_checks_total{");
    assert_eq!(checks, 0.0, "mailbox checks by the restarted operator");
    let mi = env.get("inbox").await;
    assert!(is_ready(&mi), "{:?}", mi.status);
    assert_eq!(mailbox_condition(&mi).map(|c| c.0), Some("True".to_owned()));

    // A refresh a user asks for (the annotation) is checked at once: the login count above counts
    // checks.
    annotate_refresh(&env, "inbox", "after-restart").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while dovecot.logins(user) == logins {
        assert!(
            std::time::Instant::now() < deadline,
            "no mailbox check within 30 s of a refreshed token:\n{}",
            support::world::tail(&op2.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
