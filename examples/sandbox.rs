//! The local sandbox behind `tools/sandbox.sh`: a real kube-apiserver and etcd, oidc-provider as the
//! OAuth server, Dovecot validating tokens at it, the CRD and an example MailIntegration, and the
//! operator itself. It prints the sign-in URL, signs in by itself with `--auto-sign-in`, and shows the
//! example going Ready with MailboxConnected. Ctrl-C stops everything it started.
//!
//! It reuses the integration tests' fixtures (tests/support), so the sandbox runs exactly what the
//! tests run.

#[path = "../tests/support/mod.rs"]
mod support;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::PostParams};
use mail_integration_operator::api::MailIntegration;
use std::time::{Duration, Instant};
use support::{
    dovecot::{Dovecot, DovecotConfig},
    oauth::{ClientConfig, OAuthServer, OAuthServerConfig},
    operator::Operator,
    process::reserve_port,
};

const NS: &str = "sandbox";
const NAME: &str = "support-inbox";

#[tokio::main]
async fn main() {
    let auto = std::env::args().any(|a| a == "--auto-sign-in");
    let exit_when_ready = std::env::args().any(|a| a == "--exit-when-ready");
    let sign_in_port = reserve_port();
    let public_url = format!("http://127.0.0.1:{sign_in_port}");
    let callback = format!("{public_url}/oauth2/callback");

    let cp = support::ensure_crd();
    let oauth = OAuthServer::start(OAuthServerConfig {
        clients: vec![ClientConfig {
            client_id: "sandbox-client".into(),
            client_secret: "sandbox-client-secret".into(),
            redirect_uris: vec![callback.clone()],
            certificate: None,
        }],
        access_token_ttl: Duration::from_secs(120),
        ..Default::default()
    });
    let (id, secret) = oauth.introspection_client();
    let dovecot = Dovecot::start(DovecotConfig {
        username_attribute: "email".into(),
        ..DovecotConfig::new(oauth.introspection_url().replacen(
            "http://",
            &format!("http://{id}:{secret}@"),
            1,
        ))
    });
    dovecot.deliver(
        "alice@example.test",
        "Subject: Welcome to the sandbox\r\n\r\nHello from Dovecot.\r\n",
    );
    println!(
        "sandbox: oidc-provider at {} (accounts alice, bob), Dovecot IMAPS on 127.0.0.1:{}",
        oauth.issuer(),
        dovecot.imaps_port
    );

    cp.kubectl(&["create", "namespace", NS]);
    let client = cp.client().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    // Marked for the operator, which reads no other Secret of a namespace (docs/security.md).
    // The client Secret also names the server its secret may be sent to (the issuer).
    let secret = |name: &str, data: serde_json::Value| -> Secret {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "labels": {"mailintegration.dev/oauth-client": "true"},
                "annotations": {"mailintegration.dev/oauth-servers": oauth.issuer()},
            },
            "stringData": data,
        }))
        .unwrap()
    };
    secrets
        .create(&PostParams::default(), &secret("sandbox-client", serde_json::json!({"client_id": "sandbox-client", "client_secret": "sandbox-client-secret"})))
        .await
        .unwrap();
    secrets
        .create(
            &PostParams::default(),
            &secret(
                "mail-ca",
                serde_json::json!({"ca.crt": String::from_utf8(dovecot.ca_pem.clone()).unwrap()}),
            ),
        )
        .await
        .unwrap();
    let mi: MailIntegration = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailintegration.dev/v1alpha1", "kind": "MailIntegration",
        "metadata": {"name": NAME},
        "spec": {
            "provider": "OIDC",
            "mailbox": {
                "address": "alice@example.test",
                "server": {"host": "127.0.0.1", "port": dovecot.imaps_port, "tls": "Implicit"},
                "smtp": {"host": "127.0.0.1", "port": dovecot.submissions_port, "tls": "Implicit"},
                "caSecretRef": {"name": "mail-ca"},
            },
            "oauth": {
                "clientSecretRef": {"name": "sandbox-client"},
                "issuerURL": oauth.issuer(),
                "redirectURL": callback,
                "prompt": "Consent",
                "scopes": ["openid", "email", "offline_access", "mail"],
            },
            "tokenSecret": {"name": "support-inbox-token"},
        }
    }))
    .unwrap();
    let mis: Api<MailIntegration> = Api::namespaced(client.clone(), NS);
    mis.create(&PostParams::default(), &mi).await.unwrap();

    let log_dir = std::env::temp_dir();
    let op = Operator::start(
        "sandbox-operator",
        &cp.kubeconfig,
        &[
            &format!("--sign-in-addr=127.0.0.1:{sign_in_port}"),
            &format!("--public-url={public_url}"),
        ],
        &log_dir,
    );
    println!(
        "sandbox: operator running (log {}), metrics at http://127.0.0.1:{}/metrics",
        op.process.log_path.display(),
        op.health_port
    );

    let url = wait_for(&mis, "a sign-in link", Duration::from_secs(60), |m| {
        m.status.as_ref()?.sign_in.as_ref().map(|s| s.url.clone())
    })
    .await;
    println!(
        "\nsandbox: sign in at\n  {url}\n(log in as \"alice\" with any password at the OAuth server's page)\n"
    );
    if auto {
        auto_sign_in(&url, &public_url).await;
        println!("sandbox: signed in as alice (--auto-sign-in)");
    }
    wait_for(
        &mis,
        "Ready with MailboxConnected",
        Duration::from_secs(if auto { 60 } else { 3600 }),
        |m| {
            let conds = &m.status.as_ref()?.conditions;
            let ok = |t: &str| conds.iter().any(|c| c.type_ == t && c.status == "True");
            (ok("Ready") && ok("MailboxConnected")).then_some(())
        },
    )
    .await;
    println!("{}", cp.kubectl(&["get", "mailint", "-n", NS]));
    println!(
        "sandbox: {NAME} is Ready and the mailbox accepts its token. The token is in Secret {NS}/support-inbox-token."
    );
    println!(
        "  export KUBECONFIG={} PATH={}:$PATH",
        cp.kubeconfig.display(),
        cp.bin_dir.display()
    );
    println!("  kubectl get mailint -n {NS} -o yaml");
    if exit_when_ready {
        return;
    }
    println!("sandbox: press Ctrl-C to stop everything.");
    tokio::signal::ctrl_c().await.ok();
    println!("sandbox: stopping");
}

async fn wait_for<T>(
    api: &Api<MailIntegration>,
    what: &str,
    timeout: Duration,
    f: impl Fn(&MailIntegration) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let mi = api.get(NAME).await.unwrap();
        if let Some(v) = f(&mi) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "sandbox: no {what} within {timeout:?}; status: {}",
            serde_json::to_string_pretty(&mi.status).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Sign in as a person would, without a browser: the operator's page (prompt Consent), then
/// oidc-provider's login and consent forms, back to the operator's callback and its result page.
async fn auto_sign_in(url: &str, operator: &str) {
    let http = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut next = (
        reqwest::Method::GET,
        url::Url::parse(url).unwrap(),
        Vec::<(String, String)>::new(),
    );
    for _ in 0..15 {
        let (method, at, form) = next;
        let mut req = http.request(method.clone(), at.clone());
        if method == reqwest::Method::POST {
            req = req.form(&form);
        }
        let resp = req.send().await.unwrap();
        if resp.status().is_redirection() {
            let location = resp.headers()[reqwest::header::LOCATION]
                .to_str()
                .unwrap()
                .to_owned();
            next = (reqwest::Method::GET, at.join(&location).unwrap(), vec![]);
            continue;
        }
        let body = resp.text().await.unwrap();
        if at
            .as_str()
            .starts_with(&format!("{operator}/oauth2/callback"))
        {
            assert!(body.contains("connected"), "sign-in ended on:\n{body}");
            return;
        }
        let action = attr_after(&body, "<form", "action")
            .unwrap_or_else(|| panic!("no form at {at}:\n{body}"));
        let action = at.join(&action.replace("&amp;", "&")).unwrap();
        let fields: Vec<(String, String)> = if at.as_str().starts_with(operator) {
            let ticket = attr_after(&body, "name=\"ticket\"", "value")
                .expect("the sign-in page carries a ticket");
            vec![
                ("ticket".into(), ticket),
                ("prompt".into(), "consent".into()),
            ]
        } else if body.contains(r#"name="login""#) {
            vec![
                ("prompt".into(), "login".into()),
                ("login".into(), "alice".into()),
                ("password".into(), "sandbox".into()),
            ]
        } else {
            vec![("prompt".into(), "consent".into())]
        };
        next = (reqwest::Method::POST, action, fields);
    }
    panic!("sign-in did not come back to the operator");
}

/// The value of attribute `attr` in the first tag after `marker`.
fn attr_after(html: &str, marker: &str, attr: &str) -> Option<String> {
    let start = html.find(marker)?;
    let tag_start = html[..=start].rfind('<').unwrap_or(start);
    let tag = &html[tag_start..tag_start + html[tag_start..].find('>')?];
    let key = format!("{attr}=\"");
    let at = tag.find(&key)? + key.len();
    Some(tag[at..at + tag[at..].find('"')?].to_owned())
}
