//! The operator's credentials and the gateway process together (issue 22; docs/gateway.md): the
//! operator signs an integration in and writes its app Secret and gateway Secret, the gateway
//! (the built binary) reads only the latter, Dovecot is the mail server. What an app sees through
//! a real client (Python's imaplib, curl), what reaches Dovecot (its own log counts the logins),
//! and what reaches `gateway.json`.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use mail_integration_operator::gateway::config::{GatewayConfig, username};

use crate::credentials::{app_config, app_password, gateway_config, merge, started};
use crate::imap_pop3::{MAILBOX, curl_args, dovecot, imaplib, message, run, server};
use crate::support::{
    self,
    api_proxy::{ApiProxy, Match},
    dovecot::{Dovecot, TestCa},
    gateway::{self as gw, Gateway},
    operator::Operator,
    world::{Env, tail},
};

const WAIT: Duration = Duration::from_secs(60);

const BAD_CREDENTIAL: &str =
    r#"mailintegration_gateway_logins_total{protocol="IMAP",result="bad_credential"}"#;

/// The CA Secret `name` an integration's caSecretRef may name: marked for the operator, `pem` as
/// its `ca.crt`.
async fn ca_secret(env: &Env, name: &str, pem: &str) {
    env.put_secret_labelled(
        name,
        &[("ca.crt", pem)],
        serde_json::json!({"mailintegration.dev/oauth-client": "true"}),
    )
    .await;
}

/// Dovecot, and the operator with the integration `inbox` of alice's mailbox at Dovecot's IMAPS
/// (trusted through the CA Secret `mail-ca`) and `gateway` as its spec.gateway, Ready.
pub(crate) struct OperatorWorld {
    pub dovecot: Dovecot,
    pub env: Env,
    pub op: Operator,
}

impl OperatorWorld {
    pub async fn start(prefix: &str, gateway: serde_json::Value) -> Self {
        let dovecot = dovecot(server());
        let env = Env::new(prefix, server()).await;
        let op = env.operator("operator");
        env.client_secret(env.server.client_secret()).await;
        ca_secret(&env, "mail-ca", &String::from_utf8_lossy(&dovecot.ca_pem)).await;
        env.grant("inbox", "alice").await;
        env.integration_with(
            "inbox",
            MAILBOX,
            serde_json::json!({
                "mailbox": {
                    "protocol": "IMAP",
                    "server": {"host": "127.0.0.1", "port": dovecot.imaps_port, "tls": "Implicit"},
                    "caSecretRef": {"name": "mail-ca"},
                },
                "gateway": gateway,
            }),
        )
        .await;
        env.wait_for("inbox", "Ready", WAIT, &op, support::world::is_ready)
            .await;
        Self { dovecot, env, op }
    }

    /// The gateway process watching this world's namespace.
    pub fn gateway(&self, name: &str) -> Gateway {
        let cert = gw::certificate(self.env.log_dir.path());
        Gateway::start(
            name,
            &self.env.cp.kubeconfig,
            &self.env.ns,
            &cert,
            &[],
            self.env.log_dir.path(),
        )
    }

    /// `app`'s username and password from its Secret, once the gateway Secret exists too.
    pub async fn credential(&self, app: &str) -> (String, String) {
        let deadline = Instant::now() + WAIT;
        let secret = format!("inbox-gateway-{app}");
        loop {
            let user = self.env.data(&secret, "username").await;
            let password = self.env.data(&secret, "password").await;
            let gateway_secret = self.env.secrets().get_opt("inbox-gateway").await.unwrap();
            if let (Some(u), Some(p), Some(_)) = (user, password, gateway_secret) {
                return (u, p);
            }
            assert!(
                Instant::now() < deadline,
                "the operator wrote no gateway credential:\n{}",
                self.op.process.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The verifiers' retirement times of `app` in `gateway.json` now.
    async fn retirements(&self, app: &str) -> Vec<Option<Timestamp>> {
        app_config(&self.env, "inbox", app)
            .await
            .map(|a| a.verifiers.iter().map(|v| v.retires_at).collect())
            .unwrap_or_default()
    }
}

/// Log in to the gateway's IMAPS with imaplib: `Ok(output)` when it logged in, `Err(output)` when
/// it was refused.
async fn imap_login(gw: &Gateway, user: &str, password: &str) -> Result<String, String> {
    let (ok, out) = imaplib(gw, gw.imaps_port, user, password, "ssl").await;
    if ok { Ok(out) } else { Err(out) }
}

/// The whole path with the operator's own Secrets: the operator signs the integration in, writes
/// the app's credential and the gateway Secret; the app's `username` and `password` from its Secret
/// open the mailbox through the gateway; removing the app from `spec.gateway` closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_credentials_open_the_mailbox_through_the_gateway() {
    let w = OperatorWorld::start(
        "gw-imap-operator",
        serde_json::json!({"apps": [{"name": "helpdesk", "protocols": ["IMAP"]}]}),
    )
    .await;
    let (user, password) = w.credential("helpdesk").await;
    assert_eq!(user, username(&w.env.ns, "inbox", "helpdesk"));
    w.dovecot.deliver(MAILBOX, &message("from-the-operator"));
    let gw = w.gateway("gateway");
    let url = format!("imaps://localhost:{}/INBOX;UID=1", gw.imaps_port);
    let user_pass = format!("{user}:{password}");
    let (ok, out) = run("curl", &curl_args(&gw, &user_pass, &url)).await;
    assert!(
        ok && out.contains("Subject: from-the-operator"),
        "curl imaps: {out}\n{}",
        gw.log()
    );

    // The app removed: its credential stops working at the gateway.
    merge(
        &w.env,
        "inbox",
        serde_json::json!({"spec": {"gateway": {"apps": [
                {"name": "other", "protocols": ["SMTP"]}]}}}),
    )
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        match imap_login(&gw, &user, &password).await {
            Err(out) if out.contains("AUTHENTICATIONFAILED") => break,
            out => assert!(
                Instant::now() < deadline,
                "the removed app still logs in: {out:?}"
            ),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A rotation (the annotation) with a grace period of 20 s: through the gateway, with a real IMAP
/// client, the old password logs in during the grace and the new one too; after `retiresAt` the
/// old one is refused with `AUTHENTICATIONFAILED` and no login reaches Dovecot, both while the
/// retired verifier is still in `gateway.json` (the operator stopped: the gateway's own check of
/// `retiresAt`) and once the operator has dropped it; the new one still logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_password_is_refused_through_the_gateway_after_its_grace() {
    let mut w = OperatorWorld::start(
        "gw-retire",
        serde_json::json!({
            "apps": [{"name": "helpdesk", "protocols": ["IMAP"]}],
            "rotationGracePeriod": "20s",
        }),
    )
    .await;
    let (user, old) = w.credential("helpdesk").await;
    let gw = w.gateway("gateway");
    imap_login(&gw, &user, &old)
        .await
        .unwrap_or_else(|out| panic!("the first password: {out}\n{}", gw.log()));

    let value = format!("{}/helpdesk", Timestamp::now());
    merge(
        &w.env,
        "inbox",
        serde_json::json!({"metadata": {"annotations": {
            "mailintegration.dev/rotate-gateway-credentials": value,
        }}}),
    )
    .await;
    let new = {
        let deadline = Instant::now() + WAIT;
        loop {
            let p = app_password(&w.env, &w.op, "inbox", "helpdesk").await;
            if p != old {
                break p;
            }
            assert!(Instant::now() < deadline, "no new password");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let retirements = w.retirements("helpdesk").await;
    let retires_at = retirements
        .iter()
        .flatten()
        .copied()
        .next()
        .unwrap_or_else(|| panic!("the old verifier retires: {retirements:?}"));

    // During the grace: the new password (once the gateway has read it) and the old one.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(out) = imap_login(&gw, &user, &new).await {
        assert!(
            Instant::now() < deadline,
            "the new password: {out}\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    imap_login(&gw, &user, &old)
        .await
        .unwrap_or_else(|out| panic!("the old password during its grace: {out}"));
    assert!(
        Timestamp::now() < retires_at,
        "the grace of 20 s was over before the old password was tried ({retires_at})"
    );

    // After retiresAt, with the retired verifier still in gateway.json (the operator stopped, so
    // that only the gateway's own check of retiresAt stands between the old password and the
    // mailbox): refused, nothing upstream.
    w.op.process.stop();
    let wait = Duration::try_from(retires_at.duration_since(Timestamp::now()))
        .unwrap_or_default()
        .saturating_add(Duration::from_millis(200));
    tokio::time::sleep(wait).await;
    assert_eq!(w.retirements("helpdesk").await.len(), 2, "both verifiers");
    let before = w.dovecot.logins(MAILBOX);
    let refused = gw.metric(BAD_CREDENTIAL);
    let out = imap_login(&gw, &user, &old)
        .await
        .expect_err("the old password after its grace");
    assert!(
        out.contains("REFUSED") && out.contains("AUTHENTICATIONFAILED"),
        "{out}"
    );
    // The operator back: it drops the retired verifier; still refused.
    w.op = w.env.operator("operator-2");
    let deadline = Instant::now() + WAIT;
    while w.retirements("helpdesk").await.len() != 1 {
        assert!(
            Instant::now() < deadline,
            "the operator kept the retired verifier\n{}",
            tail(&w.op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let out = imap_login(&gw, &user, &old)
        .await
        .expect_err("the old password once its verifier is gone");
    assert!(out.contains("AUTHENTICATIONFAILED"), "{out}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        w.dovecot.logins(MAILBOX),
        before,
        "a refused login reached Dovecot\n{}",
        w.dovecot.log_tail(20)
    );
    assert_eq!(gw.metric(BAD_CREDENTIAL), refused + 2.0);
    let out = imap_login(&gw, &user, &new)
        .await
        .unwrap_or_else(|out| panic!("the new password after the grace: {out}"));
    assert!(!out.contains("REFUSED"), "{out}");
    assert_eq!(
        w.dovecot.logins_reaching(MAILBOX, before + 1).await,
        before + 1
    );
    let log = gw.log();
    assert!(
        !log.contains(&old) && !log.contains(&new),
        "a password in the log"
    );
}

/// The CA Secret an integration names (spec.mailbox.caSecretRef) changes: the new PEM reaches
/// `gateway.json` within seconds, with no other change of the integration (no mail server here,
/// so the main controller's reconcile of it changes nothing of the MailIntegration); removing the
/// Secret's mark (the operator may no longer read it) removes it from `gateway.json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_the_ca_secret_reaches_the_gateway_secret() {
    let (env, op) = started(
        "gw-ca",
        serde_json::json!({"apps": [{"name": "helpdesk", "protocols": ["IMAP"]}]}),
    )
    .await;
    let first = TestCa::generate(env.log_dir.path(), "first-ca").cert_pem;
    let second = TestCa::generate(env.log_dir.path(), "second-ca").cert_pem;
    let (first, second) = (
        String::from_utf8(first).unwrap(),
        String::from_utf8(second).unwrap(),
    );
    ca_secret(&env, "mail-ca", &first).await;
    merge(
        &env,
        "inbox",
        serde_json::json!({"spec": {"mailbox": {
            "caSecretRef": {"name": "mail-ca"},
        }}}),
    )
    .await;
    let ca_of = |c: Option<GatewayConfig>| c.and_then(|c| c.ca_pem);
    let wait_ca = |want: Option<String>, what: &'static str| {
        let env = &env;
        let op = &op;
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let ca = ca_of(gateway_config(env, "inbox").await);
                if ca == want {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what} not in gateway.json within 20 s: {ca:?}\n{}",
                    tail(&op.log(), 30)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    wait_ca(Some(first.clone()), "the first CA").await;
    let generation = env.get("inbox").await.metadata.generation;

    ca_secret(&env, "mail-ca", &second).await;
    wait_ca(Some(second.clone()), "the changed CA").await;

    // Unmarked: the operator may not read it any more.
    let unmark =
        serde_json::json!({"metadata": {"labels": {"mailintegration.dev/oauth-client": null}}});
    env.secrets()
        .patch("mail-ca", &PatchParams::default(), &Patch::Merge(&unmark))
        .await
        .unwrap();
    wait_ca(None, "no CA").await;
    assert_eq!(env.get("inbox").await.metadata.generation, generation);
    let secret: Secret = env.secrets().get("mail-ca").await.unwrap();
    assert!(
        secret.metadata.owner_references.is_none(),
        "not the operator's"
    );
}

/// The gateway's Kubernetes client is the operator's: a 429 with Retry-After of the API server
/// (here, the first three requests for Secrets at an API proxy) is sent again after it, each
/// retry counted (`mailintegration_gateway_kube_api_*`), and the gateway becomes ready and serves;
/// its request rate is the adaptive limit under `--kube-api-qps` (20 by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_sends_a_throttled_request_again_after_its_retry_after() {
    let w = OperatorWorld::start(
        "gw-kube-client",
        serde_json::json!({"apps": [{"name": "helpdesk", "protocols": ["IMAP"]}]}),
    )
    .await;
    let (user, password) = w.credential("helpdesk").await;
    let api = ApiProxy::start();
    let kubeconfig = w
        .env
        .log_dir
        .path()
        .join("gateway-through-proxy.kubeconfig");
    api.kubeconfig(&kubeconfig);
    let throttled = api.fail(Match::contains("GET", "/secrets"), 429, Some(3));
    let cert = gw::certificate(w.env.log_dir.path());
    let started = Instant::now();
    let gw = Gateway::start(
        "gateway",
        &kubeconfig,
        &w.env.ns,
        &cert,
        &[],
        w.env.log_dir.path(),
    );
    assert_eq!(throttled.hits(), 3, "{}", api.requests_log_text());
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "three Retry-After: 1 waited for: {:?}",
        started.elapsed()
    );
    let metric = |name: &str| gw.metric(&format!("mailintegration_gateway_kube_api_{name}"));
    assert_eq!(
        metric("throttled_total"),
        3.0,
        "{}",
        gw.get("/metrics").unwrap_or_default()
    );
    assert_eq!(metric("retries_total"), 3.0);
    let limit = metric("limit");
    assert!(
        limit > 0.0 && limit <= 20.0,
        "the limit under the cap: {limit}"
    );
    imap_login(&gw, &user, &password)
        .await
        .unwrap_or_else(|out| panic!("a login through the gateway: {out}\n{}", gw.log()));
}
