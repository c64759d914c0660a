//! The sign-in flow as an admin goes through it: headless Chromium opens `status.signIn.url` of a
//! MailIntegration on the real API server, picks a prompt, signs in and consents on oidc-provider's
//! own pages, and lands on the operator's result page; the resource then goes Ready with a token
//! Secret. Every failure ends on its page and in the Authorized condition, and stores no grant.
//!
//! Needs Debian's Chromium: `apt-get install -y --no-install-recommends chromium chromium-driver fonts-dejavu-core`.

mod support;

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, PostParams},
};
use mail_integration_operator::{
    api::MailIntegration,
    web::signin::{STATE, StateClaims, TICKET, Ticket, key, token},
};
use std::time::{Duration, Instant};
use support::{
    browser::Browser,
    ensure_crd,
    oauth::{Account, ClientConfig, OAuthServer, OAuthServerConfig},
    operator::Operator,
    process::reserve_port,
    unique_namespace,
    world::{condition, condition_message},
};

const CONNECTED: &str = "Your Mail Integration is connected to the mailbox";
const ALICE: &str = "alice@example.test";
const BOB: &str = "bob@example.test";

struct Env {
    cp: &'static support::control_plane::ControlPlane,
    port: u16,
    ns: String,
    client: kube::Client,
    oauth: OAuthServer,
    op: Operator,
    log_dir: tempfile::TempDir,
}

/// The browser tests run one at a time: each starts Chromium, oidc-provider and an operator, and
/// together on two cores they starve each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Env {
    /// A namespace, an oidc-provider whose clients redirect to the operator's callback, and the
    /// operator (watching that namespace) with its sign-in server on a reserved port.
    async fn new(prefix: &str) -> Env {
        Self::with_config(prefix, |_| {}, &[]).await
    }

    /// `refresh_token_without_consent`: false follows OpenID Connect Core §11 as oidc-provider
    /// does by default (a refresh token only when the consent prompt was shown), as Google does.
    async fn with_refresh_policy(prefix: &str, refresh_token_without_consent: bool) -> Env {
        Self::with_config(
            prefix,
            |c| c.refresh_token_without_consent = refresh_token_without_consent,
            &[],
        )
        .await
    }

    /// [`Self::new`] with the OAuth server's configuration changed by `configure` and extra
    /// operator flags.
    async fn with_config(
        prefix: &str,
        configure: impl FnOnce(&mut OAuthServerConfig),
        operator_args: &[&str],
    ) -> Env {
        let cp = ensure_crd();
        let ns = unique_namespace(prefix);
        let client = cp.client().await;
        let log_dir = tempfile::Builder::new()
            .prefix("mio-sign-in-")
            .tempdir()
            .unwrap();
        // Reserved, not bound: the OAuth server must know the callback before the operator starts.
        let port = reserve_port();
        let callback = format!("http://127.0.0.1:{port}/oauth2/callback");
        let secret = || format!("secret-{}", token::random_b64(12));
        let mut config = OAuthServerConfig {
            clients: vec![
                ClientConfig {
                    client_id: "mio-browser".into(),
                    client_secret: secret(),
                    redirect_uris: vec![callback.clone()],
                    certificate: None,
                },
                ClientConfig {
                    client_id: "mio-browser-2".into(),
                    client_secret: secret(),
                    redirect_uris: vec![callback.clone()],
                    certificate: None,
                },
            ],
            // The login is the account's address, so login_hint fills it in.
            accounts: [ALICE, BOB]
                .iter()
                .map(|a| Account {
                    sub: (*a).into(),
                    email: (*a).into(),
                })
                .collect(),
            access_token_ttl: Duration::from_secs(600),
            select_account_prompt: true,
            refresh_token_without_consent: true,
            ..Default::default()
        };
        configure(&mut config);
        let oauth = OAuthServer::start(config);
        let op = start_operator_with(cp, "operator", &ns, port, log_dir.path(), operator_args);
        let env = Env {
            cp,
            port,
            ns,
            client,
            oauth,
            op,
            log_dir,
        };
        for (i, name) in ["client", "client2"].iter().enumerate() {
            let c = &env.oauth.config.clients[i];
            env.secret(
                name,
                &[
                    ("client_id", &c.client_id),
                    ("client_secret", &c.client_secret),
                ],
            )
            .await;
        }
        env
    }

    fn integrations(&self) -> Api<MailIntegration> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn secret(&self, name: &str, pairs: &[(&str, &str)]) {
        let s: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "labels": {"mailintegration.dev/oauth-client": "true"},
                // The issuer, and the server itself (the Microsoft-shaped issuer is not its URL).
                "annotations": {"mailintegration.dev/oauth-servers": format!("{},{}", self.oauth.issuer(), self.oauth.base_url)},
            },
            "stringData": pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
        }))
        .unwrap();
        self.secrets()
            .create(&PostParams::default(), &s)
            .await
            .unwrap();
    }

    /// An OIDC MailIntegration for `address`, discovering the test server's endpoints; the redirect
    /// URL is the operator's default ({public-url}/oauth2/callback).
    async fn integration(&self, name: &str, address: &str, client: &str, prompt: Option<&str>) {
        self.integration_with(name, address, client, prompt, serde_json::json!({}))
            .await
    }

    /// [`Self::integration`] with more `spec.oauth` fields (e.g. scopes).
    async fn integration_with(
        &self,
        name: &str,
        address: &str,
        client: &str,
        prompt: Option<&str>,
        more_oauth: serde_json::Value,
    ) {
        let mut oauth = serde_json::json!({
            "clientSecretRef": {"name": client},
            "issuerURL": self.oauth.issuer(),
        });
        if let Some(p) = prompt {
            oauth["prompt"] = p.into();
        }
        for (k, v) in more_oauth.as_object().into_iter().flatten() {
            oauth[k] = v.clone();
        }
        let mi: MailIntegration = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailintegration.dev/v1alpha1",
            "kind": "MailIntegration",
            "metadata": {"name": name},
            "spec": {
                "provider": "OIDC",
                "mailbox": {"address": address},
                "oauth": oauth,
                "tokenSecret": {"name": format!("{name}-token")},
            }
        }))
        .unwrap();
        self.integrations()
            .create(&PostParams::default(), &mi)
            .await
            .unwrap();
    }

    async fn get(&self, name: &str) -> MailIntegration {
        self.integrations().get(name).await.unwrap()
    }

    async fn wait_for(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&MailIntegration) -> bool,
    ) -> MailIntegration {
        let timeout = Duration::from_secs(30);
        let deadline = Instant::now() + timeout;
        loop {
            let mi = self.get(name).await;
            if pred(&mi) {
                return mi;
            }
            if Instant::now() > deadline {
                panic!(
                    "{name}: {what} not reached within {timeout:?}.\nstatus: {}\n--- operator log ---\n{}",
                    serde_json::to_string_pretty(&mi.status).unwrap(),
                    self.op.process.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `status.signIn.url`, once the operator has put it there.
    async fn sign_in_url(&self, name: &str) -> String {
        let mi = self
            .wait_for(name, "status.signIn.url", |mi| {
                mi.status.as_ref().is_some_and(|s| s.sign_in.is_some())
            })
            .await;
        let url = mi.status.unwrap().sign_in.unwrap().url;
        assert!(
            url.starts_with(&format!("{}/sign-in?ticket=", self.op.sign_in_url())),
            "{url}"
        );
        url
    }

    /// Open the sign-in link of `name` in `b` and wait for the operator's page.
    async fn open_sign_in(&self, b: &Browser, name: &str) {
        b.goto(&self.sign_in_url(name).await).await;
        b.wait_text("Sign in with", Duration::from_secs(10)).await;
    }

    /// Wait for Authorized=False with `reason` (the controller reports the sign-in failure).
    async fn wait_failure(&self, name: &str, reason: &str) -> MailIntegration {
        let mi = self
            .wait_for(name, &format!("Authorized=False reason {reason}"), |mi| {
                condition(mi, "Authorized") == Some(("False", reason))
            })
            .await;
        assert_eq!(condition(&mi, "Ready"), Some(("False", reason)));
        let s = mi.status.as_ref().unwrap();
        assert_eq!(
            s.last_sign_in_failure.as_ref().map(|f| f.reason.as_str()),
            Some(reason)
        );
        assert!(
            s.sign_in.is_some(),
            "a new sign-in link stays on the resource"
        );
        mi
    }

    async fn wait_ready(&self, name: &str) -> MailIntegration {
        self.wait_for(name, "Ready=True", |mi| {
            condition(mi, "Ready").is_some_and(|c| c.0 == "True")
        })
        .await
    }

    async fn data(&self, secret: &str, key: &str) -> Option<String> {
        let s = self.secrets().get_opt(secret).await.unwrap()?;
        s.data
            .and_then(|d| d.get(key).map(|b| String::from_utf8(b.0.clone()).unwrap()))
    }

    /// A refused sign-in: Authorized=False with `reason`, its message naming `says`, no grant.
    async fn refused(&self, name: &str, reason: &str, says: &str) {
        let mi = self.wait_failure(name, reason).await;
        let authorized = mi
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Authorized"))
            .map(|c| c.message.clone())
            .unwrap_or_default();
        assert!(authorized.contains(says), "{says:?} in {authorized}");
        self.no_grant(name).await;
    }

    async fn no_grant(&self, name: &str) {
        assert!(
            self.secrets()
                .get_opt(&format!("{name}-oauth-grant"))
                .await
                .unwrap()
                .is_none(),
            "a failed sign-in must not write the grant Secret of {name}"
        );
    }

    /// The operator's signing key, read from its Secret (to make tickets and states the way the
    /// operator does: expired ones, or ones for a given browser).
    async fn signer(&self) -> mail_integration_operator::web::signin::Signer {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), "default");
        let s = secrets.get(key::DEFAULT_KEY_SECRET).await.unwrap();
        mail_integration_operator::web::signin::Signer::new(key::key_from_secret(&s).unwrap())
            .unwrap()
    }

    async fn browser(&self) -> Browser {
        Browser::start(self.log_dir.path()).await
    }

    /// Sign in at oidc-provider's devInteractions pages: the login form (prefilled by login_hint
    /// with the mailbox address; `login` overrides it), then the consent form if it is shown.
    async fn provider_sign_in(&self, b: &Browser, login: Option<&str>) {
        b.wait_text("Sign-in", Duration::from_secs(15)).await;
        assert!(
            b.url().await.as_str().starts_with(&self.oauth.base_url),
            "at the provider"
        );
        match login {
            Some(login) => b.fill("input[name=login]", login).await,
            // login_hint (the mailbox address) filled the form in.
            None => assert!(
                b.value("input[name=login]")
                    .await
                    .is_some_and(|v| v.contains('@')),
                "the login form is prefilled with the mailbox address"
            ),
        }
        b.fill("input[name=password]", "any password").await;
        b.click("button[type=submit]").await;
        self.consent_if_asked(b).await;
    }

    /// Approve the provider's consent page if it shows, until the browser is back at the
    /// operator's callback. (Right after a click on the operator's page the browser may not have
    /// reached the provider yet: being "not at the provider" is not the same as having left it.)
    async fn consent_if_asked(&self, b: &Browser) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let url = b.url().await;
            if url.path().ends_with("/oauth2/callback") {
                return;
            }
            if !url.as_str().starts_with(&self.oauth.base_url) {
                assert!(
                    Instant::now() < deadline,
                    "never reached the callback: {url}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            if b.exists("input[name=prompt][value=consent]").await {
                assert!(
                    Instant::now() < deadline,
                    "the consent page did not go away within 30 s: {url}"
                );
                // A click that lands while the page is still settling can be lost: click, then
                // look again until the browser has left the provider.
                b.click("button[type=submit]").await;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                continue;
            }
            assert!(Instant::now() < deadline, "stuck at the provider: {url}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn start_operator(
    cp: &support::control_plane::ControlPlane,
    name: &str,
    ns: &str,
    port: u16,
    log_dir: &std::path::Path,
) -> Operator {
    start_operator_with(cp, name, ns, port, log_dir, &[])
}

fn start_operator_with(
    cp: &support::control_plane::ControlPlane,
    name: &str,
    ns: &str,
    port: u16,
    log_dir: &std::path::Path,
    extra: &[&str],
) -> Operator {
    let addr = format!("--sign-in-addr=127.0.0.1:{port}");
    let public = format!("--public-url=http://127.0.0.1:{port}");
    let mut args = vec!["--namespace", ns, &addr, &public];
    args.extend_from_slice(extra);
    Operator::start(name, &cp.kubeconfig, &args, log_dir)
}

fn param(url: &url::Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_prompt_choice_signs_in_and_the_resource_goes_ready() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = Env::new("sign-in").await;
    env.integration("consent", ALICE, "client", None).await;
    env.integration("select", ALICE, "client", Some("SelectAccount"))
        .await;
    env.integration("silent", ALICE, "client", Some("None"))
        .await;
    env.integration("silent-new-client", ALICE, "client2", Some("None"))
        .await;
    let b = env.browser().await;

    // 1. "Consent" (the default): login and consent pages, then the result page.
    b.goto(&env.sign_in_url("consent").await).await;
    let text = b
        .wait_text("Sign in with 127.0.0.1", Duration::from_secs(10))
        .await;
    let name = format!("{}/consent", env.ns);
    for needle in [
        name.as_str(),
        ALICE,
        "No prompt",
        "Consent",
        "Select account",
        "How should 127.0.0.1 ask?",
    ] {
        assert!(text.contains(needle), "{needle:?} in\n{text}");
    }
    assert!(
        b.is_selected("#prompt-consent").await,
        "the default prompt is preselected"
    );
    assert!(!b.is_selected("#prompt-none").await);
    b.screenshot("sign-in-page.png").await;
    b.click("label[for=prompt-consent]").await;
    b.click("button[type=submit]").await;
    env.provider_sign_in(&b, None).await;
    let text = b.wait_text(CONNECTED, Duration::from_secs(20)).await;
    assert!(text.contains(ALICE), "{text}");
    assert!(b.url().await.path().ends_with("/oauth2/callback"));
    b.screenshot("connected-page.png").await;
    let mi = env.wait_ready("consent").await;
    assert_eq!(condition(&mi, "Authorized"), Some(("True", "Authorized")));
    let status = mi.status.unwrap();
    assert!(status.sign_in.is_none() && status.last_sign_in_failure.is_none());
    assert_eq!(
        env.data("consent-oauth-grant", "account").await.as_deref(),
        Some(ALICE)
    );
    assert!(
        env.data("consent-oauth-grant", "refresh_token")
            .await
            .is_some()
    );
    assert!(env.data("consent-oauth-grant", "issued_at").await.is_some());
    assert!(env.data("consent-token", "access_token").await.is_some());

    // 2. "No prompt" with a client this account has not consented to (the provider session from
    // step 1 exists): the provider refuses without showing a page.
    env.open_sign_in(&b, "silent-new-client").await;
    assert!(b.is_selected("#prompt-none").await);
    b.click("button[type=submit]").await;
    let text = b.wait_text("Consent needed", Duration::from_secs(20)).await;
    assert!(text.contains("choose \"Consent\""), "{text}");
    assert!(text.contains("ConsentRequired"), "{text}");
    b.screenshot("consent-required-page.png").await;
    let mi = env
        .wait_failure("silent-new-client", "ConsentRequired")
        .await;
    let authorized = condition_message(&mi, "Authorized");
    assert!(authorized.contains("Consent"), "{authorized}");
    env.no_grant("silent-new-client").await;

    // 3. "Select account": the provider asks which account (its login form), then back.
    env.open_sign_in(&b, "select").await;
    assert!(b.is_selected("#prompt-selectaccount").await);
    b.click("button[type=submit]").await;
    env.provider_sign_in(&b, None).await;
    let text = b.wait_text(CONNECTED, Duration::from_secs(20)).await;
    assert!(text.contains(ALICE));
    env.wait_ready("select").await;

    // 4. "No prompt" for an account that consented before: no provider page at all.
    env.open_sign_in(&b, "silent").await;
    assert!(b.is_selected("#prompt-none").await);
    b.click("button[type=submit]").await;
    let text = b.wait_text(CONNECTED, Duration::from_secs(20)).await;
    assert!(text.contains(ALICE));
    env.wait_ready("silent").await;

    // 5. The same resource signs in again, now with "Consent": the failure is gone.
    env.open_sign_in(&b, "silent-new-client").await;
    b.click("label[for=prompt-consent]").await;
    b.click("button[type=submit]").await;
    env.consent_if_asked(&b).await;
    b.wait_text(CONNECTED, Duration::from_secs(20)).await;
    let mi = env.wait_ready("silent-new-client").await;
    assert!(mi.status.unwrap().last_sign_in_failure.is_none());

    // 6. The grant is revoked at the provider: the next refresh fails with GrantRevoked, the resource
    // offers the sign-in link again, and signing in again makes it Ready.
    let rt = env
        .data("consent-oauth-grant", "refresh_token")
        .await
        .unwrap();
    env.oauth.revoke(&rt).await;
    let patch = serde_json::json!({"metadata": {"annotations": {
        mail_integration_operator::api::REFRESH_REQUESTED_ANNOTATION: "after-revocation"
    }}});
    env.integrations()
        .patch(
            "consent",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let mi = env
        .wait_for("consent", "GrantRevoked with a sign-in link", |mi| {
            condition(mi, "Authorized") == Some(("False", "GrantRevoked"))
                && mi.status.as_ref().is_some_and(|s| s.sign_in.is_some())
        })
        .await;
    b.goto(&mi.status.unwrap().sign_in.unwrap().url).await;
    b.wait_text("Sign in with", Duration::from_secs(10)).await;
    b.click("button[type=submit]").await;
    env.consent_if_asked(&b).await;
    b.wait_text(CONNECTED, Duration::from_secs(20)).await;
    let mi = env.wait_ready("consent").await;
    assert!(mi.status.unwrap().sign_in.is_none());
    assert_ne!(
        env.data("consent-oauth-grant", "refresh_token")
            .await
            .unwrap(),
        rt,
        "the new grant replaced the revoked one"
    );

    // Nothing secret reached the operator's log.
    let log = env.op.log();
    for secret in [
        &env.oauth.config.clients[0].client_secret,
        &env.oauth.config.clients[1].client_secret,
    ] {
        assert!(!log.contains(secret.as_str()));
    }
    for s in ["code_verifier", "ticket=", "refresh_token\":"] {
        assert!(!log.contains(s), "{s:?} in the operator log");
    }
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_gets_its_page_and_condition_and_stores_no_grant() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = Env::new("sign-in-fail").await;
    env.integration("inbox", ALICE, "client", None).await;
    let b = env.browser().await;

    // Account mismatch: bob signs in for alice's mailbox.
    env.open_sign_in(&b, "inbox").await;
    b.click("button[type=submit]").await;
    env.provider_sign_in(&b, Some(BOB)).await;
    let text = b
        .wait_text("Another account signed in", Duration::from_secs(20))
        .await;
    assert!(
        text.contains(BOB) && text.contains("Select account"),
        "{text}"
    );
    b.screenshot("account-mismatch-page.png").await;
    env.wait_failure("inbox", "AccountMismatch").await;
    env.no_grant("inbox").await;
    let answer = b.url().await;
    assert!(param(&answer, "code").is_some() && param(&answer, "state").is_some());

    // Replayed: the provider's answer again.
    b.goto(answer.as_str()).await;
    b.wait_text("This answer was used already", Duration::from_secs(10))
        .await;
    env.wait_failure("inbox", "SignInStateReused").await;

    // Tampered: the state's signature altered.
    let state = param(&answer, "state").unwrap();
    let (payload, sig) = state.split_once('.').unwrap();
    let flipped: String = sig.chars().rev().collect();
    let mut tampered = answer.clone();
    tampered
        .query_pairs_mut()
        .clear()
        .append_pair("code", "x")
        .append_pair("state", &format!("{payload}.{flipped}"));
    b.goto(tampered.as_str()).await;
    b.wait_text(
        "This answer does not match a sign-in",
        Duration::from_secs(10),
    )
    .await;
    env.wait_failure("inbox", "SignInStateInvalid").await;

    // The provider's error parameters: the user cancels at the provider (access_denied).
    env.open_sign_in(&b, "inbox").await;
    b.click("button[type=submit]").await;
    // The session from the last sign-in exists: the provider goes straight to its consent page.
    b.wait_text("[ Cancel ]", Duration::from_secs(15)).await;
    b.click("a[href*='/abort']").await;
    b.wait_text("Access was not granted", Duration::from_secs(15))
        .await;
    env.wait_failure("inbox", "SignInDenied").await;

    // States made with the operator's key for this browser: no code, and other error parameters.
    let signer = env.signer().await;
    let nonce = b
        .cookie("mio_signin")
        .await
        .expect("the browser has the sign-in cookie");
    let mi = env.get("inbox").await;
    let state = |id: &str, exp_in: i64| {
        signer.sign(
            STATE,
            &StateClaims {
                id: id.into(),
                ns: env.ns.clone(),
                name: "inbox".into(),
                uid: mi.uid().unwrap(),
                exp: jiff::Timestamp::now().as_second() + exp_in,
                b: token::browser_binding(&nonce),
                p: "None".into(),
                t: String::new(),
                c: String::new(),
            },
        )
    };
    let callback = format!("{}/oauth2/callback", env.op.sign_in_url());
    let url = |pairs: &[(&str, &str)]| {
        let mut u = url::Url::parse(&callback).unwrap();
        u.query_pairs_mut().extend_pairs(pairs);
        u.to_string()
    };
    b.goto(&url(&[
        ("state", &state("no-code", 600)),
        ("iss", env.oauth.issuer()),
    ]))
    .await;
    b.wait_text(
        "The provider sent no authorization code",
        Duration::from_secs(10),
    )
    .await;
    env.wait_failure("inbox", "AuthorizationCodeMissing").await;

    b.goto(&url(&[
        ("state", &state("interaction", 600)),
        ("error", "interaction_required"),
        ("error_description", "<script>alert(1)</script>"),
    ]))
    .await;
    let text = b
        .wait_text(
            "The provider needs to ask you something",
            Duration::from_secs(10),
        )
        .await;
    assert!(
        text.contains("\"No prompt\"") && text.contains("<script>alert(1)</script>"),
        "shown as text: {text}"
    );
    env.wait_failure("inbox", "InteractionRequired").await;

    b.goto(&url(&[
        ("state", &state("mixup", 600)),
        ("code", "x"),
        ("iss", "http://127.0.0.1:1"),
    ]))
    .await;
    b.wait_text(
        "The answer came from another provider",
        Duration::from_secs(10),
    )
    .await;
    env.wait_failure("inbox", "IssuerMismatch").await;

    b.goto(&url(&[("state", &state("late", -1)), ("code", "x")]))
        .await;
    b.wait_text("This sign-in took too long", Duration::from_secs(10))
        .await;
    env.wait_failure("inbox", "SignInStateExpired").await;

    // An expired sign-in link.
    let ticket = signer.sign(
        TICKET,
        &Ticket {
            ns: env.ns.clone(),
            name: "inbox".into(),
            uid: mi.uid().unwrap(),
            exp: jiff::Timestamp::now().as_second() - 60,
            iat: 0,
        },
    );
    b.goto(&format!("{}/sign-in?ticket={ticket}", env.op.sign_in_url()))
        .await;
    b.wait_text("This sign-in link has expired", Duration::from_secs(10))
        .await;
    // An expired link costs a page only: no API read, no report on the resource (issue 21).
    let after = env.integrations().get("inbox").await.unwrap();
    assert_eq!(
        after
            .status
            .as_ref()
            .and_then(|s| s.last_sign_in_failure.as_ref())
            .map(|f| f.reason.as_str()),
        Some("SignInStateExpired")
    );

    // A link of a resource that was deleted and created again under the same name.
    env.integration("again", ALICE, "client", None).await;
    let old_link = env.sign_in_url("again").await;
    env.integrations()
        .delete("again", &DeleteParams::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.integrations().get_opt("again").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the resource was not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.integration("again", ALICE, "client", None).await;
    env.sign_in_url("again").await;
    b.goto(&old_link).await;
    b.wait_text(
        "This sign-in link is for another MailIntegration",
        Duration::from_secs(10),
    )
    .await;
    env.wait_failure("again", "SignInLinkInvalid").await;

    // A damaged link, and one of a resource that does not exist: pages only.
    b.goto(&format!(
        "{}/sign-in?ticket=garbage.garbage",
        env.op.sign_in_url()
    ))
    .await;
    b.wait_text("This sign-in link is not valid", Duration::from_secs(10))
        .await;
    let gone = signer.sign(
        TICKET,
        &Ticket {
            ns: env.ns.clone(),
            name: "never-existed".into(),
            uid: "x".into(),
            exp: jiff::Timestamp::now().as_second() + 600,
            iat: 0,
        },
    );
    b.goto(&format!("{}/sign-in?ticket={gone}", env.op.sign_in_url()))
        .await;
    b.wait_text("does not exist", Duration::from_secs(10)).await;

    env.no_grant("inbox").await;
    env.no_grant("again").await;
    // Neither the provider's code nor the state reached the operator's log.
    let log = env.op.log();
    for v in [
        param(&answer, "code").unwrap(),
        param(&answer, "state").unwrap(),
    ] {
        assert!(!log.contains(&v), "a code or state in the operator log");
    }
    // Each failure left a Warning event with its reason.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), &env.ns);
    let reasons: Vec<String> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.action.as_deref() == Some("SignIn"))
        .filter_map(|e| e.reason)
        .collect();
    for r in [
        "AccountMismatch",
        "SignInStateReused",
        "SignInStateInvalid",
        "SignInDenied",
        "AuthorizationCodeMissing",
    ] {
        assert!(
            reasons.iter().any(|x| x == r),
            "no SignIn event {r}: {reasons:?}"
        );
    }
    b.close().await;
}

/// Replicas share the signing key through its Secret and keep no state another replica would need
/// (the PKCE verifier is derived from the key and the state): a sign-in started by one operator
/// process finishes on another one (here: the first is stopped while the browser is at the provider,
/// and a new process takes over the same address, as after a restart or behind a Service).
/// What the provider grants is checked before anything is stored, against oidc-provider's own
/// answers: a "No prompt" sign-in of an account that consented before gets no refresh token (OpenID
/// Connect Core §11: offline_access only with the consent prompt, as at Google), and a scope the
/// provider does not offer is left out of the grant. Each gets its page, its condition with what to
/// do, a Warning event, and no grant Secret; "Consent" then connects the first one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_without_a_refresh_token_or_a_requested_scope_is_refused() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = Env::with_refresh_policy("sign-in-grant", false).await;
    env.integration("first", ALICE, "client", None).await;
    env.integration("silent", ALICE, "client", Some("None"))
        .await;
    env.integration_with(
        "scoped",
        ALICE,
        "client",
        None,
        serde_json::json!({"scopes": ["mail", "archive"]}),
    )
    .await;
    let b = env.browser().await;

    // The account consents once (a session and a grant at the provider).
    env.open_sign_in(&b, "first").await;
    b.click("button[type=submit]").await;
    env.provider_sign_in(&b, None).await;
    b.wait_text(CONNECTED, Duration::from_secs(20)).await;
    env.wait_ready("first").await;

    // "No prompt": the provider answers at once, without a refresh token.
    env.open_sign_in(&b, "silent").await;
    assert!(b.is_selected("#prompt-none").await);
    b.click("button[type=submit]").await;
    let text = b
        .wait_text("No refresh token was returned", Duration::from_secs(20))
        .await;
    assert!(
        text.contains("choose \"Consent\"") && text.contains("NoRefreshToken"),
        "{text}"
    );
    b.screenshot("no-refresh-token-page.png").await;
    env.refused("silent", "NoRefreshToken", "Consent").await;

    // A scope the provider does not offer ("archive"): signed in, but not granted.
    env.open_sign_in(&b, "scoped").await;
    b.click("label[for=prompt-consent]").await;
    b.click("button[type=submit]").await;
    env.consent_if_asked(&b).await;
    let text = b
        .wait_text("A permission was not granted", Duration::from_secs(20))
        .await;
    assert!(
        text.contains("archive") && !text.contains("mail,") && text.contains("ScopeMissing"),
        "{text}"
    );
    b.screenshot("scope-missing-page.png").await;
    env.refused("scoped", "ScopeMissing", "archive").await;

    // Each refusal left a Warning event with its reason.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), &env.ns);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reasons: Vec<String> = events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .filter_map(|e| e.reason)
            .collect();
        if ["NoRefreshToken", "ScopeMissing"]
            .iter()
            .all(|r| reasons.iter().any(|x| x == r))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Warning events NoRefreshToken and ScopeMissing within 20 s: {reasons:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // "Consent" on the same integration: a refresh token this time.
    env.open_sign_in(&b, "silent").await;
    b.click("label[for=prompt-consent]").await;
    b.click("button[type=submit]").await;
    env.consent_if_asked(&b).await;
    b.wait_text(CONNECTED, Duration::from_secs(20)).await;
    env.wait_ready("silent").await;
    assert!(
        env.data("silent-oauth-grant", "refresh_token")
            .await
            .is_some()
    );
    b.close().await;
}

/// Microsoft's identity checks at the sign-in page, against answers shaped as Entra ID gives them
/// (oidc-provider under the tenant's issuer, no RFC 9207 `iss` in the authorization response, ID
/// tokens with `tid` and `preferred_username` and no `email`): the account is taken from
/// `preferred_username`, another account than the mailbox is refused by it, and an account of
/// another directory than `spec.oauth.tenant` is refused by the ID token's `tid`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsoft_sign_ins_check_the_account_and_the_directory() {
    const TENANT: &str = "8f6c1e2a-3b4d-4e5f-9a0b-1c2d3e4f5a6b";
    const OTHER_TENANT: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    const IMPOSTOR: &str = "successor";
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = Env::with_config(
        "sign-in-microsoft",
        |c| {
            c.microsoft_tenant = Some(TENANT.into());
            c.issuer = Some(format!("https://login.microsoftonline.com/{TENANT}/v2.0"));
            // Another account of the directory that was given alice's address (another `oid`).
            c.accounts.push(Account {
                sub: IMPOSTOR.into(),
                email: ALICE.into(),
            });
        },
        &["--allow-endpoint-overrides"],
    )
    .await;
    let base = env.oauth.base_url.clone();
    let integrations = env.integrations();
    let microsoft = |name: &'static str, tenant: &'static str| {
        let (base, integrations) = (base.clone(), integrations.clone());
        async move {
            let mi: MailIntegration = serde_json::from_value(serde_json::json!({
                "apiVersion": "mailintegration.dev/v1alpha1",
                "kind": "MailIntegration",
                "metadata": {"name": name},
                "spec": {
                    "provider": "Microsoft",
                    "mailbox": {
                        "address": ALICE,
                        // Nothing listens there: the mailbox check is not what this test is about.
                        "server": {"host": "127.0.0.1", "port": support::process::CLOSED_PORT, "tls": "None"},
                    },
                    "oauth": {
                        "clientSecretRef": {"name": "client"},
                        "tenant": tenant,
                        "scopes": ["mail"],
                        "endpoints": {"authorization": format!("{base}/auth"), "token": format!("{base}/token")},
                    },
                    "tokenSecret": {"name": format!("{name}-token")},
                }
            }))
            .unwrap();
            integrations
                .create(&PostParams::default(), &mi)
                .await
                .unwrap();
        }
    };
    microsoft("mismatch", TENANT).await;
    microsoft("inbox", TENANT).await;
    microsoft("elsewhere", OTHER_TENANT).await;
    let b = env.browser().await;

    // bob signs in for alice's mailbox: refused by preferred_username.
    env.open_sign_in(&b, "mismatch").await;
    b.click("button[type=submit]").await;
    env.provider_sign_in(&b, Some(BOB)).await;
    let text = b
        .wait_text("Another account signed in", Duration::from_secs(20))
        .await;
    assert!(text.contains(BOB), "{text}");
    env.refused("mismatch", "AccountMismatch", BOB).await;

    // alice (chosen with "Select account"): connected, the account from preferred_username.
    env.open_sign_in(&b, "inbox").await;
    b.click("label[for=prompt-selectaccount]").await;
    b.click("button[type=submit]").await;
    env.provider_sign_in(&b, Some(ALICE)).await;
    let text = b.wait_text(CONNECTED, Duration::from_secs(20)).await;
    assert!(text.contains(ALICE), "{text}");
    let mi = env
        .wait_for("inbox", "Authorized=True", |mi| {
            condition(mi, "Authorized") == Some(("True", "Authorized"))
        })
        .await;
    assert_eq!(
        mi.status.as_ref().and_then(|s| s.account.as_deref()),
        Some(ALICE)
    );
    assert_eq!(
        env.data("inbox-oauth-grant", "account").await.as_deref(),
        Some(ALICE)
    );
    // alice again, for an integration of another directory: refused by tid.
    env.open_sign_in(&b, "elsewhere").await;
    b.click("label[for=prompt-consent]").await;
    b.click("button[type=submit]").await;
    env.consent_if_asked(&b).await;
    let text = b
        .wait_text(
            "The account is from another directory",
            Duration::from_secs(20),
        )
        .await;
    assert!(
        text.contains(TENANT) && text.contains(OTHER_TENANT),
        "{text}"
    );
    env.refused("elsewhere", "AccountMismatch", OTHER_TENANT)
        .await;

    // The grant records alice's immutable identity, <tid>/<oid>.
    let alice_id = env.data("inbox-oauth-grant", "account_id").await.unwrap();
    let oid = alice_id
        .strip_prefix(&format!("{TENANT}/"))
        .unwrap_or_else(|| panic!("account_id {alice_id:?} is not <tid>/<oid>"));
    assert_eq!(oid.len(), 36, "{alice_id}");
    let grant_before = env.data("inbox-oauth-grant", "refresh_token").await;
    assert!(grant_before.is_some());

    // Another account of the same directory whose preferred_username is alice's address signs in
    // for alice's mailbox: refused by its object ID, the grant unchanged. (A link made the way
    // the operator makes them, as an administrator's `kubectl mailint sign-in` does: the status
    // offers none while the integration is authorized.)
    let signer = env.signer().await;
    let ticket = signer.sign(
        TICKET,
        &Ticket {
            ns: env.ns.clone(),
            name: "inbox".into(),
            uid: env.get("inbox").await.uid().unwrap(),
            exp: jiff::Timestamp::now().as_second() + 600,
            iat: jiff::Timestamp::now().as_second(),
        },
    );
    b.goto(&format!("{}/sign-in?ticket={ticket}", env.op.sign_in_url()))
        .await;
    b.wait_text("Sign in with", Duration::from_secs(10)).await;
    b.click("label[for=prompt-selectaccount]").await;
    b.click("button[type=submit]").await;
    env.provider_sign_in(&b, Some(IMPOSTOR)).await;
    let text = b
        .wait_text("Another account signed in", Duration::from_secs(20))
        .await;
    assert!(
        text.contains(&alice_id) && text.contains("even though it names the same address"),
        "{text}"
    );
    // alice's grant is still usable, so the integration stays authorized as alice.
    let mi = env
        .wait_for("inbox", "Authorized=True as alice", |mi| {
            condition(mi, "Authorized") == Some(("True", "Authorized"))
        })
        .await;
    assert_eq!(
        mi.status.as_ref().and_then(|s| s.account.as_deref()),
        Some(ALICE)
    );
    assert_eq!(
        env.data("inbox-oauth-grant", "refresh_token").await,
        grant_before,
        "the grant of alice was replaced by another account's"
    );
    assert_eq!(
        env.data("inbox-oauth-grant", "account_id").await.as_deref(),
        Some(alice_id.as_str())
    );
    assert_eq!(
        env.data("inbox-oauth-grant", "account").await.as_deref(),
        Some(ALICE)
    );
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_started_on_one_replica_finishes_on_another() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut env = Env::new("sign-in-replica").await;
    env.integration("inbox", ALICE, "client", None).await;
    let b = env.browser().await;
    env.open_sign_in(&b, "inbox").await;
    b.click("button[type=submit]").await;
    b.wait_text("Sign-in", Duration::from_secs(15)).await;

    env.op.process.stop();
    env.op = start_operator(env.cp, "replica-2", &env.ns, env.port, env.log_dir.path());

    b.fill("input[name=password]", "any password").await;
    b.click("button[type=submit]").await;
    env.consent_if_asked(&b).await;
    let text = b.wait_text(CONNECTED, Duration::from_secs(20)).await;
    assert!(text.contains(ALICE), "{text}");
    env.wait_ready("inbox").await;
    assert!(
        env.op.log().contains("sign-in succeeded"),
        "the second process finished the sign-in"
    );
    b.close().await;
}

/// 5. A sign-in that completes while a refresh of the old grant is in flight (the provider holds
/// the refresh for seconds): the new grant survives. The refresh, finding another refresh token
/// than it presented, keeps the sign-in's grant; no refresh token is presented twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_during_a_refresh_of_the_old_grant_wins() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = Env::new("sign-in-during-refresh").await;
    let proxy = support::fault_proxy::FaultProxy::start(&env.oauth.base_url);
    // Discovery from the issuer, but the token endpoint (refreshes and the code exchange) through
    // the fault proxy, which the client Secret's owner lists too.
    let servers = format!("{},{}", env.oauth.issuer(), proxy.url());
    let patch = serde_json::json!({"metadata": {"annotations": {"mailintegration.dev/oauth-servers": servers}}});
    env.secrets()
        .patch(
            "client",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let mi: MailIntegration = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailintegration.dev/v1alpha1",
        "kind": "MailIntegration",
        "metadata": {"name": "inbox"},
        "spec": {
            "provider": "OIDC",
            "mailbox": {"address": ALICE},
            "oauth": {
                "clientSecretRef": {"name": "client"},
                "issuerURL": env.oauth.issuer(),
                "endpoints": {"token": proxy.token_url()},
            },
            "tokenSecret": {"name": "inbox-token"},
        }
    }))
    .unwrap();
    env.integrations()
        .create(&PostParams::default(), &mi)
        .await
        .unwrap();
    let b = env.browser().await;
    env.open_sign_in(&b, "inbox").await;
    b.click("button[type=submit]").await;
    env.provider_sign_in(&b, None).await;
    b.wait_text(CONNECTED, Duration::from_secs(20)).await;
    env.wait_ready("inbox").await;
    let first = env
        .data("inbox-oauth-grant", "refresh_token")
        .await
        .unwrap();
    let first_issued = env.data("inbox-oauth-grant", "issued_at").await.unwrap();

    // A refresh of that grant, held at the provider for 8 s (only that request: the sign-in's code
    // exchange goes through at once).
    proxy.set_fault_times(support::fault_proxy::Fault::Slow(Duration::from_secs(8)), 1);
    let before = proxy.refresh_requests();
    let patch = serde_json::json!({"metadata": {"annotations": {"mailintegration.dev/refresh-requested-at": "during-sign-in"}}});
    env.integrations()
        .patch(
            "inbox",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while proxy.refresh_requests() == before {
        assert!(
            Instant::now() < deadline,
            "the refresh never reached the provider:\n{}",
            env.op.process.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refresh_started = Instant::now();

    // Meanwhile the admin signs in again (a link made the way the operator makes them: the status
    // offers none while the integration is Ready).
    let signer = env.signer().await;
    let mi = env.get("inbox").await;
    let ticket = signer.sign(
        TICKET,
        &Ticket {
            ns: env.ns.clone(),
            name: "inbox".into(),
            uid: mi.uid().unwrap(),
            exp: jiff::Timestamp::now().as_second() + 600,
            iat: jiff::Timestamp::now().as_second(),
        },
    );
    b.goto(&format!("{}/sign-in?ticket={ticket}", env.op.sign_in_url()))
        .await;
    b.wait_text("Sign in with", Duration::from_secs(10)).await;
    b.click("label[for=prompt-consent]").await;
    b.click("button[type=submit]").await;
    let tokens_before = proxy.token_requests();
    // When the sign-in's code exchange reaches the token endpoint (its callback then waits for the
    // refresh to finish with the grant).
    let exchanged = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while proxy.token_requests() <= tokens_before {
            assert!(
                Instant::now() < deadline,
                "the sign-in never exchanged its code"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        refresh_started.elapsed()
    };
    let ((), exchanged_after) = tokio::join!(env.consent_if_asked(&b), exchanged);
    assert!(
        exchanged_after < Duration::from_secs(8),
        "the sign-in exchanged its code {exchanged_after:?} after the refresh started, when the refresh was over: the test proves nothing"
    );
    b.wait_text(CONNECTED, Duration::from_secs(30)).await;
    proxy.clear_fault();
    // Both are done: the refresh's answer arrived (8 s) and the sign-in stored its grant.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let grant = env.secrets().get("inbox-oauth-grant").await.unwrap();
        let in_flight = grant
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("mailintegration.dev/refresh-in-flight"));
        if !in_flight && refresh_started.elapsed() > Duration::from_secs(9) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the refresh never finished:\n{}",
            env.op.process.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let issued = env.data("inbox-oauth-grant", "issued_at").await.unwrap();
    let stored = env
        .data("inbox-oauth-grant", "refresh_token")
        .await
        .unwrap();
    assert_ne!(issued, first_issued, "the grant is the new sign-in's");
    assert_ne!(stored, first, "not the old grant's refresh token");
    // The stored grant works: one more refresh with it, Ready, and nothing presented twice (a
    // rotated-out token presented again would make oidc-provider revoke the grant).
    let patch = serde_json::json!({"metadata": {"annotations": {"mailintegration.dev/refresh-requested-at": "after-sign-in"}}});
    let n = proxy.refresh_requests();
    env.integrations()
        .patch(
            "inbox",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let mi = env
        .wait_for("inbox", "refreshed with the new grant", |mi| {
            proxy.refresh_requests() > n
                && mi
                    .status
                    .as_ref()
                    .and_then(|s| s.last_refresh_request.as_deref())
                    == Some("after-sign-in")
        })
        .await;
    assert_eq!(
        condition(&mi, "Ready").map(|c| c.0),
        Some("True"),
        "{:?}",
        mi.status
    );
    assert_eq!(condition(&mi, "Authorized"), Some(("True", "Authorized")));
    assert_eq!(
        env.data("inbox-oauth-grant", "issued_at").await.unwrap(),
        issued
    );
    let reused = proxy.reused_refresh_tokens();
    assert!(
        reused.is_empty(),
        "refresh tokens presented twice: {reused:?}"
    );
    eprintln!(
        "sign-in during refresh: {} refreshes, 0 presented twice; the sign-in's grant kept",
        proxy.refresh_requests()
    );
    b.close().await;
}
