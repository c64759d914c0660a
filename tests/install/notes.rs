//! What `helm install` prints (the chart's NOTES.txt), followed by a new user: the callback URL
//! to register, and the numbered steps whose commands are run as written against the test API
//! server, up to a sign-in link (Google, whose sign-in no test server plays) and, for a generic
//! OIDC provider (`notes.provider=OIDC`, served by oidc-provider), through a sign-in in Chromium to
//! a Ready integration with its token Secret.

use crate::support::{
    browser::Browser,
    control_plane::ControlPlane,
    ensure_crd,
    helm::{self, ChartRelease, kubectl_as},
    oauth::{Account, ClientConfig, OAuthServer, OAuthServerConfig},
    operator::Operator,
    process::reserve_port,
    unique_namespace,
};
use std::{
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

#[test]
fn notes_tell_the_callback_url_to_register() {
    let out = notes_offline(&["publicURL=https://mail-operator.example.com/"]);
    assert!(
        out.contains("https://mail-operator.example.com/oauth2/callback"),
        "{out}"
    );
    let out = notes_offline(&[
        "ingress.enabled=true",
        "ingress.host=sso.example.org",
        "ingress.tlsSecretName=t",
    ]);
    assert!(
        out.contains("https://sso.example.org/oauth2/callback"),
        "{out}"
    );
    let out = notes_offline(&[]);
    assert!(
        out.contains("http://127.0.0.1:8080/oauth2/callback") && out.contains("port-forward"),
        "{out}"
    );
    // A cluster-wide install says what its ServiceAccount can read, and how to confine it.
    assert!(
        out.contains("every Secret in the cluster") && out.contains("watchNamespaces={"),
        "{out}"
    );
    // A value the chart no longer uses is accepted (helm upgrade --reuse-values) and named.
    let out = notes_offline(&["prometheusRule.tokenExpiryThresholdSeconds=300"]);
    assert!(
        out.contains("WARNING: prometheusRule.tokenExpiryThresholdSeconds is no longer used"),
        "{out}"
    );
    assert!(!notes_offline(&[]).contains("WARNING"));
    let out = notes_offline(&["watchNamespaces={team-a}"]);
    assert!(
        out.contains("It watches MailIntegrations in: team-a")
            && !out.contains("every Secret in the cluster"),
        "{out}"
    );
}

/// `helm install --dry-run=client` renders NOTES.txt without touching the cluster.
fn notes_offline(set: &[&str]) -> String {
    let chart = helm::chart_dir();
    let mut args = vec![
        "install",
        "notes",
        chart.to_str().unwrap(),
        "--dry-run=client",
        "--namespace",
        "ops",
    ];
    for s in set {
        args.extend(["--set", s]);
    }
    helm::helm_offline(&args)
}

/// `notes.provider` chooses the example the steps print: each provider's client Secret, and what
/// that provider needs besides (Microsoft a tenant, OIDC the issuer, in the Secret's
/// `oauth-servers` annotation too), each a placeholder the text tells the user to replace.
#[test]
fn notes_print_the_steps_for_the_chosen_provider() {
    for (provider, secret, needs) in [
        ("Google", "gmail-client", &[][..]),
        ("Microsoft", "m365-client", &["tenant: TENANT"][..]),
        (
            "OIDC",
            "oidc-client",
            &[
                "issuerURL: ISSUER_URL",
                "kubectl annotate secret oidc-client mailintegration.dev/oauth-servers=ISSUER_URL",
            ][..],
        ),
    ] {
        let out = notes_offline(&[&format!("notes.provider={provider}")]);
        let commands = notes_commands(&out);
        for want in [
            format!("kubectl create secret generic {secret} "),
            format!("kubectl label secret {secret} mailintegration.dev/oauth-client=true"),
        ] {
            assert!(
                commands.iter().any(|c| c.starts_with(&want)),
                "{provider}: no `{want}`:\n{out}"
            );
        }
        let apply = commands
            .iter()
            .find(|c| c.starts_with("kubectl apply -f -"))
            .unwrap_or_else(|| panic!("{provider}: no MailIntegration to apply:\n{out}"));
        assert!(
            apply.contains(&format!("provider: {provider}\n")),
            "{apply}"
        );
        for need in needs {
            assert!(out.contains(need), "{provider}: no `{need}`:\n{out}");
        }
        for placeholder in placeholders(&commands) {
            assert!(
                told_to_replace(&out, &placeholder),
                "{provider}: the commands hold {placeholder}, which the text does not say to replace:\n{out}"
            );
        }
    }
    // The default is Google, as before the value existed.
    let notes_part = |out: String| out.split_once("\nNOTES:\n").map(|(_, n)| n.to_owned());
    assert_eq!(
        notes_part(notes_offline(&[])),
        notes_part(notes_offline(&["notes.provider=Google"]))
    );
}

/// The shell commands of a NOTES text, in order: each line that starts with `kubectl ` (after its
/// indentation), and a `kubectl ... <<'EOF'` line together with the here-document up to `EOF`.
pub fn notes_commands(notes: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = notes.lines();
    while let Some(line) = lines.next() {
        let cmd = line.trim_start();
        if !cmd.starts_with("kubectl ") {
            continue;
        }
        let mut cmd = cmd.to_owned();
        if let Some((_, word)) = cmd.rsplit_once("<<") {
            let end = word.trim().trim_matches('\'').to_owned();
            for body in lines.by_ref() {
                cmd.push('\n');
                cmd.push_str(body);
                if body == end {
                    break;
                }
            }
            assert!(cmd.ends_with(&format!("\n{end}")), "unterminated: {cmd}");
        }
        out.push(cmd);
    }
    out
}

/// The placeholders in `commands`: words of capitals, digits and `_` (CLIENT_ID, TENANT), but for
/// the here-document's end (`EOF`) and the provider's name (`OIDC`).
fn placeholders(commands: &[String]) -> std::collections::BTreeSet<String> {
    commands
        .iter()
        .flat_map(|c| c.split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_')))
        .filter(|w| {
            w.len() >= 3
                && w.chars().any(|c| c.is_ascii_uppercase())
                && w.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                && !["EOF", "OIDC"].contains(w)
        })
        .map(str::to_owned)
        .collect()
}

/// The NOTES tell the user to replace each of `words`, and their commands hold no other
/// placeholder: every step the text leaves to the user is one it names.
fn assert_only_named_placeholders(what: &str, notes: &str, commands: &[String], words: &[&str]) {
    for word in words {
        assert!(
            told_to_replace(notes, word),
            "{what}: the NOTES do not tell the user to replace {word}:\n{notes}"
        );
    }
    let left: Vec<String> = placeholders(commands)
        .into_iter()
        .filter(|p| !words.contains(&p.as_str()))
        .collect();
    assert!(
        left.is_empty(),
        "{what}: the commands hold placeholders this test does not know to fill: {left:?}\n{notes}"
    );
}

/// Whether the prose of `notes` (all but its commands) tells the user to replace
/// `word`: a sentence with "replace" that names it.
fn told_to_replace(notes: &str, word: &str) -> bool {
    let mut prose = notes.to_owned();
    for cmd in notes_commands(notes) {
        prose = prose.replace(&cmd, " ");
    }
    let prose: Vec<&str> = prose.lines().map(str::trim).collect();
    prose.join(" ").split(['.', ';']).any(|sentence| {
        sentence.contains("replace")
            && sentence
                .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .any(|w| w == word)
    })
}

/// A new user's shell: kubectl (of the control plane) on PATH, and a kubeconfig whose context's
/// namespace is `ns` (as the NOTES ask: their commands act in the context's namespace).
struct UserShell {
    kubeconfig: PathBuf,
    path: String,
}

impl UserShell {
    fn new(cp: &ControlPlane, ns: &str) -> Self {
        let kubeconfig = cp.dir.path().join(format!("kubeconfig-user-{ns}"));
        std::fs::copy(&cp.kubeconfig, &kubeconfig).unwrap();
        let set_ns = kubectl_as(
            cp,
            &kubeconfig,
            &[
                "config",
                "set-context",
                "--current",
                &format!("--namespace={ns}"),
            ],
        );
        assert!(set_ns.status.success(), "{set_ns:?}");
        let path = format!(
            "{}:{}",
            cp.bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Self { kubeconfig, path }
    }

    fn sh(&self, cmd: &str) -> Output {
        Command::new("sh")
            .args(["-c", cmd])
            .env("PATH", &self.path)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .expect("sh")
    }

    /// The Ready condition of `support-inbox` (status, reason and message), or why it cannot be
    /// read.
    fn ready_condition(&self) -> String {
        let out = self.sh(
            "kubectl get mailintegration support-inbox -o \
             jsonpath='{range .status.conditions[?(@.type==\"Ready\")]}{.status} {.reason}: {.message}{end}'",
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Run `cmd`, a command as the NOTES print it; a read (`kubectl get`/`explain`) is asked again
    /// until `answered` says its output is what the text promises (within 60 s: the CRD's schema
    /// reaches `kubectl explain` a moment after the CRD, the sign-in link and Ready come once the
    /// operator has reconciled). Returns its output; panics when it fails.
    fn run_as_written(&self, cmd: &str, answered: impl Fn(&str) -> bool) -> String {
        let read = cmd.starts_with("kubectl get ") || cmd.starts_with("kubectl explain ");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.sh(cmd);
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let done = out.status.success() && answered(&stdout);
            if !read || done || Instant::now() > deadline {
                assert!(
                    out.status.success(),
                    "`{cmd}` as the NOTES print it failed:\n{stdout}{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(
                    done,
                    "`{cmd}` as the NOTES print it does not show what they say within 60 s:\n{stdout}\n\
                     support-inbox's Ready condition: {}",
                    self.ready_condition()
                );
                return stdout;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The Ready condition's reason and message of `support-inbox` in `ns`.
fn ready(cp: &ControlPlane, ns: &str, field: &str) -> String {
    cp.kubectl(&[
        "get",
        "mailintegration",
        "support-inbox",
        "-n",
        ns,
        "-o",
        &format!("jsonpath={{.status.conditions[?(@.type==\"Ready\")].{field}}}"),
    ])
}

/// A new user follows what `helm install` printed: the NOTES of an installed release (`helm get
/// notes`, the text `helm install` shows) are read for their commands, and each runs as written, in
/// a shell, against the API server, in the user's namespace (a kubectl context whose namespace is a
/// watched one, as the text asks). The only words replaced are those the text tells the user to
/// replace (CLIENT_ID and CLIENT_SECRET, and Microsoft's TENANT: checked against the text); the
/// port-forward is not run (no kubelet here: no pod to forward to). The operator runs as the
/// chart's ServiceAccount with the chart's flags. For Google (the default) and Microsoft, whose
/// sign-in pages no test server plays, the integration must end waiting for its first sign-in
/// (SignInRequired, with a sign-in link the printed command shows), not refused for an unmarked
/// client Secret (the NOTES once left the label out: ClientSecretNotMarked) or by the API server (a
/// Microsoft integration without its tenant).
#[test]
fn notes_commands_run_as_written_reach_a_sign_in_link() {
    for (provider, replaced) in [
        (
            "Google",
            &[
                ("CLIENT_ID", "1234567890-notes.apps.googleusercontent.com"),
                ("CLIENT_SECRET", "notes-client-secret"),
            ][..],
        ),
        (
            "Microsoft",
            &[
                ("CLIENT_ID", "00000000-0000-0000-0000-000000000001"),
                ("CLIENT_SECRET", "notes-client-secret"),
                ("TENANT", "contoso.onmicrosoft.com"),
            ][..],
        ),
    ] {
        follow_notes_to_a_sign_in_link(provider, replaced);
    }
}

fn follow_notes_to_a_sign_in_link(provider: &str, replaced: &[(&str, &str)]) {
    let cp = ensure_crd();
    let user_ns = unique_namespace("notes-user");
    let rel = ChartRelease::install_in_new_namespace(
        cp,
        "notes",
        &[
            &format!("watchNamespaces={{{user_ns}}}"),
            &format!("notes.provider={provider}"),
        ],
    );
    let notes = helm::helm(cp, &["get", "notes", &rel.release, "-n", &rel.namespace]);
    let commands = notes_commands(&notes);
    for want in [
        "kubectl create secret generic",
        "kubectl apply -f -",
        "kubectl get mailintegration",
    ] {
        assert!(
            commands.iter().any(|c| c.starts_with(want)),
            "{provider}: the NOTES have no `{want}` command:\n{notes}"
        );
    }
    let words: Vec<&str> = replaced.iter().map(|(w, _)| *w).collect();
    assert_only_named_placeholders(provider, &notes, &commands, &words);
    let shell = UserShell::new(cp, &user_ns);

    // The operator as the chart runs it.
    let sa_kubeconfig = rel.service_account_kubeconfig();
    let args: Vec<String> = rel.operator_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _op = Operator::start_with_env(
        &format!("notes-operator-{provider}"),
        &sa_kubeconfig,
        &args,
        &rel.operator_env(),
        cp.dir.path(),
    );

    let mut link = String::new();
    for cmd in &commands {
        if cmd.contains(" port-forward ") {
            continue;
        }
        let mut cmd = cmd.clone();
        for (word, value) in replaced {
            cmd = cmd.replace(word, value);
        }
        let out = shell.run_as_written(&cmd, |out| !out.is_empty());
        if cmd.contains("signIn.url") {
            link = out;
        }
    }
    let reason = ready(cp, &user_ns, "reason");
    assert_eq!(
        reason,
        "SignInRequired",
        "{provider}: after the NOTES' steps the integration waits for its first sign-in; it says: {}",
        ready(cp, &user_ns, "message")
    );
    assert!(
        link.starts_with("http://127.0.0.1:") && link.contains("/sign-in?"),
        "{provider}: the NOTES' command shows the sign-in link: {link:?}"
    );
    rel.uninstall();
}

/// The whole way a new user goes with a generic OIDC provider, from nothing but what `helm
/// install --set notes.provider=OIDC` printed: oidc-provider (a real OAuth 2.0 / OpenID Connect
/// server) is the provider, whose client is registered with the redirect URI the NOTES print (read
/// from the text, so a URI that is not the operator's callback makes the provider refuse the
/// sign-in); the operator runs as the chart's ServiceAccount with the Deployment's own flags,
/// public URL included (only its listen addresses move to loopback ports); the NOTES' commands run
/// as written in the user's shell, with only the words the text says to replace replaced
/// (CLIENT_ID, CLIENT_SECRET, ISSUER_URL: checked against the text); the sign-in link their command
/// shows is opened in Chromium, where the user keeps the preselected prompt and signs in as the
/// mailbox at the provider's own pages. The NOTES' last command must then show the integration
/// Ready, with a token Secret whose access token the provider says is live. A step the text leaves
/// out (the client Secret's label or its `oauth-servers` annotation, a key, the issuer) leaves the
/// integration short of Ready and fails here, naming the reason; a redirect URI that is not the
/// operator's callback fails at the provider (`invalid_redirect_uri`). The provider is on loopback,
/// so the operator runs with `--allow-loopback` (`MIO_ALLOW_LOOPBACK`, as in every test and the
/// sandbox); nothing else differs from the Deployment.
#[tokio::test]
async fn notes_commands_run_as_written_reach_ready_with_an_oidc_provider() {
    const MAILBOX: &str = "support@example.com";
    let cp = ensure_crd();
    let user_ns = unique_namespace("notes-oidc-user");
    // Where the operator's sign-in server listens, and so the release's public URL (as an Ingress
    // host would be).
    let port = reserve_port();
    let public_url = format!("http://127.0.0.1:{port}");
    let rel = ChartRelease::install_in_new_namespace(
        cp,
        "notes-oidc",
        &[
            &format!("watchNamespaces={{{user_ns}}}"),
            &format!("publicURL={public_url}"),
            "notes.provider=OIDC",
        ],
    );
    let notes = helm::helm(cp, &["get", "notes", &rel.release, "-n", &rel.namespace]);

    // Step 1: the redirect URI to register at the provider, as printed.
    let redirect_uri = notes
        .lines()
        .skip_while(|l| !l.contains("Register this redirect URI"))
        .map(str::trim)
        .find(|l| l.starts_with("http"))
        .unwrap_or_else(|| panic!("the NOTES print no redirect URI to register:\n{notes}"))
        .to_owned();
    let client_secret = format!("notes-secret-{:016x}", rand::random::<u64>());
    let oauth = OAuthServer::start(OAuthServerConfig {
        clients: vec![ClientConfig {
            client_id: "notes-oidc-client".into(),
            client_secret: client_secret.clone(),
            redirect_uris: vec![redirect_uri.clone()],
            certificate: None,
        }],
        accounts: vec![Account {
            sub: MAILBOX.into(),
            email: MAILBOX.into(),
        }],
        access_token_ttl: Duration::from_secs(600),
        ..Default::default()
    });

    // The operator as the chart's Deployment runs it: its args but the listen addresses.
    let args: Vec<String> = rel
        .deployment_args()
        .into_iter()
        .filter(|a| {
            a != "run" && !a.starts_with("--health-addr") && !a.starts_with("--sign-in-addr")
        })
        .chain([format!("--sign-in-addr=127.0.0.1:{port}")])
        .collect();
    assert!(
        args.contains(&format!("--public-url={public_url}")),
        "the chart passes publicURL: {args:?}"
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let op = Operator::start_with_env(
        "notes-oidc-operator",
        &rel.service_account_kubeconfig(),
        &args,
        &rel.operator_env(),
        cp.dir.path(),
    );

    let commands = notes_commands(&notes);
    let replaced = [
        ("CLIENT_ID", "notes-oidc-client".to_owned()),
        ("CLIENT_SECRET", client_secret),
        ("ISSUER_URL", oauth.issuer().to_owned()),
    ];
    let words: Vec<&str> = replaced.iter().map(|(w, _)| *w).collect();
    assert_only_named_placeholders("OIDC", &notes, &commands, &words);
    let shell = UserShell::new(cp, &user_ns);
    let mut signed_in = false;
    for cmd in &commands {
        if cmd.contains(" port-forward ") {
            continue;
        }
        let mut cmd = cmd.clone();
        for (word, value) in &replaced {
            cmd = cmd.replace(word, value);
        }
        if cmd.contains("signIn.url") {
            let link = shell.run_as_written(&cmd, |out| out.starts_with("http"));
            sign_in(&link, &oauth, MAILBOX).await;
            signed_in = true;
        } else if signed_in && cmd.starts_with("kubectl get mailintegration support-inbox") {
            // After the sign-in, the text promises READY True.
            let table = shell.run_as_written(&cmd, |out| {
                out.lines()
                    .nth(1)
                    .is_some_and(|row| row.split_whitespace().nth(1) == Some("True"))
            });
            assert!(table.starts_with("NAME"), "{table}");
        } else {
            shell.run_as_written(&cmd, |out| !out.is_empty());
        }
    }
    assert!(
        signed_in,
        "the NOTES print no command that shows the sign-in link:\n{notes}"
    );
    assert_eq!(
        ready(cp, &user_ns, "status"),
        "True",
        "after the NOTES' steps and a sign-in the integration is Ready; it says: {} ({})\n{}",
        ready(cp, &user_ns, "reason"),
        ready(cp, &user_ns, "message"),
        op.process.log_tail(20)
    );
    let token = cp.kubectl(&[
        "get",
        "secret",
        "support-inbox-token",
        "-n",
        &user_ns,
        "-o",
        "jsonpath={.data.access_token}",
    ]);
    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .expect("the token Secret holds an access_token");
    let token = String::from_utf8(token).unwrap();
    assert!(
        oauth.introspect(&token).await,
        "the token Secret's access token is live at the provider"
    );
    rel.uninstall();
}

/// What a user does with the sign-in link: open it, keep the operator page's preselected prompt,
/// sign in as the mailbox at the provider (oidc-provider's own login and consent pages), and land on
/// the operator's result page.
async fn sign_in(link: &str, oauth: &OAuthServer, mailbox: &str) {
    let log_dir = tempfile::Builder::new()
        .prefix("mio-notes-browser-")
        .tempdir()
        .unwrap();
    let b = Browser::start(log_dir.path()).await;
    b.goto(link.trim()).await;
    b.wait_text("Sign in with", Duration::from_secs(15)).await;
    b.click("button[type=submit]").await;
    b.wait_text("Sign-in", Duration::from_secs(15)).await;
    let at = b.url().await;
    assert!(
        at.as_str().starts_with(&oauth.base_url),
        "the operator's page sends the browser to the provider, not to {at}"
    );
    b.fill("input[name=login]", mailbox).await;
    b.fill("input[name=password]", "any password").await;
    b.click("button[type=submit]").await;
    // The consent page, when the provider shows one, until the browser is back at the callback.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let url = b.url().await;
        if url.path().ends_with("/oauth2/callback") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sign-in never came back to the operator's callback: at {url}\n{}\n{}",
            b.text().await,
            oauth.log_tail(20)
        );
        if url.as_str().starts_with(&oauth.base_url)
            && b.exists("input[name=prompt][value=consent]").await
        {
            b.click("button[type=submit]").await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            continue;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = b
        .wait_text(
            "Your Mail Integration is connected to the mailbox",
            Duration::from_secs(20),
        )
        .await;
    assert!(text.contains(mailbox), "{text}");
    b.close().await;
}
