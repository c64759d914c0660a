//! Operating the operator: `kubectl mailint` (the plugin binary, run as a user runs it, against the
//! real kube-apiserver and a running operator) and the per-object metrics served on /metrics.

mod support;

use k8s_openapi::api::core::v1::Secret;
use kube::api::DeleteParams;
use std::{
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};
use support::{
    oauth::OAuthServer,
    operator::Operator,
    world::{Env, condition, is_ready},
};

/// Access tokens that live 10 minutes: nothing is due during a test unless asked for.
fn server() -> &'static OAuthServer {
    support::oauth::with_token_ttl(600)
}

fn plugin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kubectl-mailint"))
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from(out: Output) -> Self {
        Run {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// `kubectl-mailint --kubeconfig … -n NS ARGS`.
fn mailint(env: &Env, args: &[&str]) -> Run {
    let out = Command::new(plugin())
        .arg("--kubeconfig")
        .arg(&env.cp.kubeconfig)
        .args(["-n", &env.ns])
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .expect("run kubectl-mailint");
    Run::from(out)
}

/// The same, and it must succeed.
fn mailint_ok(env: &Env, args: &[&str]) -> String {
    let r = mailint(env, args);
    assert!(
        r.ok,
        "kubectl mailint {} failed:\n{}{}",
        args.join(" "),
        r.stdout,
        r.stderr
    );
    r.stdout
}

async fn secret_values(env: &Env) -> Vec<String> {
    let mut values = vec![env.server.client_secret().to_owned()];
    for s in env.secrets().list(&Default::default()).await.unwrap().items {
        let s: Secret = s;
        // The keys that hold credentials (the others, such as account or username, are not secret).
        for (k, v) in s.data.unwrap_or_default() {
            if [
                "access_token",
                "refresh_token",
                "xoauth2",
                "oauthbearer",
                "client_secret",
            ]
            .contains(&k.as_str())
            {
                values.push(String::from_utf8_lossy(&v.0).into_owned());
            }
        }
    }
    values.retain(|v| v.len() >= 12);
    assert!(
        values.len() >= 5,
        "the check compares real values: {}",
        values.len()
    );
    values
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_mailint_drives_a_running_operator() {
    let started = Instant::now();
    let env = Env::new("cli", server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    env.grant("inbox", "alice").await;
    env.integration("inbox", "alice@example.test").await;
    // No grant: waits for a sign-in.
    env.integration("fresh", "bob@example.test").await;
    let inbox = env
        .wait_for("inbox", "Ready", Duration::from_secs(30), &op, is_ready)
        .await;
    let fresh = env
        .wait_for(
            "fresh",
            "a sign-in link",
            Duration::from_secs(30),
            &op,
            |mi| mi.status.as_ref().is_some_and(|s| s.sign_in.is_some()),
        )
        .await;
    let ns = env.ns.clone();

    // status NAME: one screen, no colour when stdout is not a terminal.
    let text = mailint_ok(&env, &["status", "inbox"]);
    eprintln!("--- kubectl mailint status inbox ---\n{text}");
    for expected in [
        format!("MailIntegration {ns}/inbox: Ready"),
        "Provider:   OIDC   Mailbox: alice@example.test".to_owned(),
        "Account:    alice@example.test".to_owned(),
        "Ready             True    Ready".to_owned(),
        "Authorized        True    Authorized".to_owned(),
        "TokenValid        True    TokenValid".to_owned(),
        "Expires:       ".to_owned(),
        "Last refresh:  ".to_owned(),
        "Next refresh:  ".to_owned(),
        "client client                           exists".to_owned(),
        "grant  inbox-oauth-grant                exists".to_owned(),
        "token  inbox-token                      exists".to_owned(),
        "Events:".to_owned(),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
    }
    assert!(!text.contains('\x1b'), "colour only on a terminal:\n{text}");
    assert!(!text.contains("Sign in:"), "no link when none is needed");
    // The operator's first Ready is an event of the object.
    assert!(
        text.lines()
            .skip_while(|l| !l.starts_with("Events:"))
            .any(|l| l.contains("Normal") && l.contains("Ready")),
        "{text}"
    );

    // The resource that needs a sign-in: what to do, and the link.
    let url = fresh
        .status
        .as_ref()
        .unwrap()
        .sign_in
        .as_ref()
        .unwrap()
        .url
        .clone();
    let text = mailint_ok(&env, &["status", "fresh"]);
    eprintln!("--- kubectl mailint status fresh ---\n{text}");
    for expected in [
        format!("MailIntegration {ns}/fresh: Not ready: SignInRequired"),
        "Account:    (nobody signed in yet)".to_owned(),
        "What to do: Open the link in status.signIn.url and sign in as the mailbox account."
            .to_owned(),
        "grant  fresh-oauth-grant                none yet: sign in, or bring a refresh token"
            .to_owned(),
        "token  fresh-token                      not written yet".to_owned(),
        "Open this link and sign in as bob@example.test".to_owned(),
        url.clone(),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
    }

    // -o json / yaml: the same report as data.
    let json: serde_json::Value =
        serde_json::from_str(&mailint_ok(&env, &["status", "inbox", "-o", "json"])).unwrap();
    assert_eq!(json["name"], "inbox");
    assert_eq!(json["account"], "alice@example.test");
    assert_eq!(json["conditions"][0]["type"], "Ready");
    assert_eq!(json["conditions"][0]["status"], "True");
    assert_eq!(
        json["accessTokenExpiresAt"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .unwrap(),
        inbox
            .status
            .as_ref()
            .unwrap()
            .access_token_expires_at
            .as_ref()
            .unwrap()
            .0
    );
    let secrets = json["secrets"].as_array().unwrap();
    assert_eq!(secrets.len(), 3);
    assert!(secrets.iter().all(|s| s["exists"] == true), "{secrets:?}");
    let yaml = mailint_ok(&env, &["status", "fresh", "-o", "yaml"]);
    let yaml: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(yaml["signIn"]["url"], url.as_str());
    assert_eq!(yaml["conditions"][0]["reason"], "SignInRequired");

    // status without a name: one line per integration; -A adds the namespace column.
    let table = mailint_ok(&env, &["status"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("READY"),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("fresh") && l.contains("False") && l.contains("SignInRequired")),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("inbox") && l.contains("True")),
        "{table}"
    );
    let all = mailint_ok(&env, &["status", "-A"]);
    assert!(
        all.lines().next().unwrap().starts_with("NAMESPACE"),
        "{all}"
    );
    assert!(
        all.lines()
            .any(|l| l.split_whitespace().take(2).eq([ns.as_str(), "inbox"])),
        "{all}"
    );

    // Nothing a Secret holds is ever printed.
    for v in secret_values(&env).await {
        for args in [
            &["status", "inbox"][..],
            &["status", "inbox", "-o", "yaml"],
            &["status", "fresh", "-o", "json"],
        ] {
            let out = mailint_ok(&env, args);
            assert!(
                !out.contains(&v),
                "a Secret value appears in `status {args:?}`"
            );
        }
    }

    // sign-in: the link on stdout alone (for `open $(kubectl mailint sign-in NAME)`), or why none.
    let r = mailint(&env, &["sign-in", "fresh"]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), url);
    assert!(
        r.stderr.contains("Sign in as bob@example.test"),
        "{}",
        r.stderr
    );
    let r = mailint(&env, &["sign-in", "inbox"]);
    assert!(!r.ok);
    assert!(r.stdout.is_empty());
    assert!(
        r.stderr.contains(&format!(
            "{ns}/inbox needs no sign-in: it is authorized as alice@example.test"
        )),
        "{}",
        r.stderr
    );

    // refresh NAME: the annotation the operator honours; a new token follows.
    let before = inbox
        .status
        .as_ref()
        .unwrap()
        .last_refresh_time
        .clone()
        .unwrap()
        .0;
    let refreshes = || {
        op.metric(r#"mailintegration_refreshes_total{result="success",reason="TokenRefreshed"}"#)
            .unwrap_or(0.0)
    };
    let n = refreshes();
    let out = mailint_ok(&env, &["refresh", "inbox"]);
    assert_eq!(out.trim(), format!("Refresh requested for {ns}/inbox"));
    let mi = env
        .wait_for(
            "inbox",
            "a requested refresh",
            Duration::from_secs(30),
            &op,
            |mi| {
                mi.status
                    .as_ref()
                    .and_then(|s| s.last_refresh_time.as_ref())
                    .is_some_and(|t| t.0 > before)
            },
        )
        .await;
    let requested = mi
        .metadata
        .annotations
        .as_ref()
        .unwrap()
        .get("mailintegration.dev/refresh-requested-at")
        .cloned()
        .unwrap();
    assert_eq!(
        mi.status.as_ref().unwrap().last_refresh_request.as_deref(),
        Some(requested.as_str())
    );
    assert_eq!(refreshes(), n + 1.0);

    // refresh -l SELECTOR and --all pick by label / every one; a name and --all together is refused.
    env.cp
        .kubectl(&["label", "mailint", "inbox", "team=mail", "-n", &ns]);
    let out = mailint_ok(&env, &["refresh", "-l", "team=mail"]);
    assert_eq!(out.trim(), format!("Refresh requested for {ns}/inbox"));
    let out = mailint_ok(&env, &["refresh", "--all"]);
    assert!(
        out.contains(&format!("{ns}/inbox")) && out.contains(&format!("{ns}/fresh")),
        "{out}"
    );
    let r = mailint(&env, &["refresh", "inbox", "--all"]);
    assert!(!r.ok && r.stderr.contains("not both"), "{}", r.stderr);
    let r = mailint(&env, &["refresh", "-l", "team=nobody"]);
    assert!(
        !r.ok && r.stderr.contains("no MailIntegration matches"),
        "{}",
        r.stderr
    );

    // suspend / resume: spec.suspend, which the operator reports as Ready's reason.
    let out = mailint_ok(&env, &["suspend", "inbox"]);
    assert_eq!(out.trim(), format!("MailIntegration {ns}/inbox suspended"));
    let mi = env
        .wait_for("inbox", "Suspended", Duration::from_secs(30), &op, |mi| {
            condition(mi, "Ready").is_some_and(|c| c.1 == "Suspended")
        })
        .await;
    assert_eq!(mi.spec.suspend, Some(true));
    let text = mailint_ok(&env, &["status", "inbox"]);
    assert!(text.contains("Suspended:  spec.suspend is true"), "{text}");
    let out = mailint_ok(&env, &["resume", "inbox"]);
    assert_eq!(out.trim(), format!("MailIntegration {ns}/inbox resumed"));
    let mi = env
        .wait_for("inbox", "Ready again", Duration::from_secs(30), &op, |mi| {
            condition(mi, "Ready") == Some(("True", "Ready"))
        })
        .await;
    assert_eq!(mi.spec.suspend, Some(false));

    // explain: the text of src/reason.rs, case-insensitive; an unknown reason is an error.
    let out = mailint_ok(&env, &["explain", "testingappgrantexpired"]);
    let r = mail_integration_operator::reason::Reason::TestingAppGrantExpired;
    assert!(
        out.contains(r.what_happened()) && out.contains(r.hint()),
        "{out}"
    );
    assert!(
        out.contains("docs/reasons.md#testingappgrantexpired"),
        "{out}"
    );
    let all = mailint_ok(&env, &["explain"]);
    for r in mail_integration_operator::reason::Reason::ALL {
        assert!(all.contains(r.as_str()), "{r} missing from `explain`");
    }
    let r = mailint(&env, &["explain", "NoSuchReason"]);
    assert!(
        !r.ok && r.stderr.contains("is not a reason"),
        "{}",
        r.stderr
    );

    // Errors name the object.
    let r = mailint(&env, &["status", "nope"]);
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains(&format!("MailIntegration {ns}/nope not found")),
        "{}",
        r.stderr
    );

    // As a kubectl plugin: kubectl finds `kubectl-mailint` on PATH; KUBECONFIG is honoured.
    let path = format!(
        "{}:{}",
        plugin().parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Run::from(
        Command::new(support::control_plane::bin_dir().join("kubectl"))
            .args(["mailint", "status", "inbox", "-n", &ns])
            .env("PATH", path)
            .env("KUBECONFIG", &env.cp.kubeconfig)
            .output()
            .unwrap(),
    );
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains(&format!("MailIntegration {ns}/inbox: Ready")),
        "{}",
        out.stdout
    );
    eprintln!("kubectl mailint test took {:?}", started.elapsed());
}

/// Per-object series come from the controller's cache at scrape time: an integration's series are
/// there while it exists and gone at the first scrape after it was deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_object_metrics_follow_the_objects() {
    let env = Env::new("metrics", server()).await;
    let op: Operator = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    env.grant("inbox", "alice").await;
    env.integration("inbox", "alice@example.test").await;
    env.integration("fresh", "bob@example.test").await;
    let inbox = env
        .wait_for("inbox", "Ready", Duration::from_secs(30), &op, is_ready)
        .await;
    env.wait_for(
        "fresh",
        "SignInRequired",
        Duration::from_secs(30),
        &op,
        |mi| condition(mi, "Ready").is_some_and(|c| c.1 == "SignInRequired"),
    )
    .await;
    let ns = env.ns.clone();
    let sel = |name: &str| format!(r#"namespace="{ns}",name="{name}""#);
    let ready = |name: &str, status: &str| {
        format!(
            r#"mailintegration_ready_status{{{},condition="{status}"}}"#,
            sel(name)
        )
    };
    // Give the scrape a moment to see the cache catch up with the status written last.
    let deadline = Instant::now() + Duration::from_secs(10);
    while op.metric(&ready("fresh", "False")) != Some(1.0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(op.metric(&ready("inbox", "True")), Some(1.0));
    assert_eq!(op.metric(&ready("inbox", "False")), Some(0.0));
    assert_eq!(op.metric(&ready("inbox", "Unknown")), Some(0.0));
    assert_eq!(op.metric(&ready("fresh", "False")), Some(1.0));
    assert_eq!(
        op.metric(&format!(
            r#"mailintegration_ready_reason_info{{{},reason="SignInRequired"}}"#,
            sel("fresh")
        )),
        Some(1.0)
    );
    let expiry = inbox
        .status
        .as_ref()
        .unwrap()
        .access_token_expires_at
        .as_ref()
        .unwrap()
        .0;
    assert_eq!(
        op.metric(&format!(
            "mailintegration_access_token_expiry_timestamp_seconds{{{}}}",
            sel("inbox")
        )),
        Some(expiry.as_second() as f64)
    );
    assert!(
        op.metric(&format!(
            "mailintegration_next_refresh_timestamp_seconds{{{}}}",
            sel("inbox")
        ))
        .is_some()
    );
    assert_eq!(
        op.metric(&format!("mailintegration_suspended{{{}}}", sel("inbox"))),
        Some(0.0)
    );
    assert_eq!(
        op.metric(r#"mailintegration_integrations{status="True"}"#),
        Some(1.0)
    );
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        op.metric(&format!(
            r#"mailintegration_build_info{{version="{version}"}}"#
        )),
        Some(1.0)
    );

    // Every metric the chart's alert rules and Grafana dashboard use is one the operator serves.
    let body = op.get("/metrics").unwrap();
    let chart = support::helm::template(
        "mio",
        "ops",
        &[
            "prometheusRule.enabled=true",
            "grafanaDashboard.enabled=true",
        ],
    );
    let used = metric_names(&chart);
    assert!(used.len() >= 12, "{used:?}");
    for name in &used {
        // Counters and histograms are declared without their sample suffixes.
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            body.contains(&format!("# TYPE {family} ")),
            "the chart's rules or dashboard use {name}, which the operator does not serve:\n{body}"
        );
    }

    // Deleted: its series are gone at the next scrape (the watch removes it from the cache).
    env.integrations()
        .delete("inbox", &DeleteParams::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.integrations().get_opt("inbox").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "inbox was not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The API server has removed it; the operator's watch sees the deletion within moments.
    let deadline = Instant::now() + Duration::from_secs(5);
    let body = loop {
        let body = op.get("/metrics").unwrap();
        if !body.contains(r#"name="inbox""#) || Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let left: Vec<&str> = body
        .lines()
        .filter(|l| l.contains(r#"name="inbox""#))
        .collect();
    assert!(
        left.is_empty(),
        "series of the deleted integration remain:\n{}",
        left.join("\n")
    );
    assert_eq!(
        op.metric(&ready("fresh", "False")),
        Some(1.0),
        "the other stays"
    );
    assert_eq!(
        op.metric(r#"mailintegration_integrations{status="True"}"#),
        Some(0.0)
    );
}

/// The `mailintegration_*` metric names in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("mailintegration_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Every query of the Grafana dashboard, evaluated by a real Prometheus (Debian's) scraping a
/// running operator: each one is valid and the fleet panels show the integrations. (Grafana itself
/// is not in Debian or any registry this project uses, so the dashboard is not rendered here; this
/// is what its panels would show.) Writes the table to tests/artifacts/dashboard-queries.md
/// (docs/dashboard.md holds one such run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_evaluate_against_a_running_operator() {
    let env = Env::new("dashboard", server()).await;
    let op: Operator = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    // The client secret expires in 10 days (its annotation): every integration using it exports
    // the expiry series, and the expiry alert is due for each.
    let expires = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(10 * 24))
        .unwrap();
    let annotate = serde_json::json!({"metadata": {"annotations": {"mailintegration.dev/client-secret-expires": expires.to_string()}}});
    env.secrets()
        .patch(
            "client",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&annotate),
        )
        .await
        .unwrap();
    env.grant("inbox", "alice").await;
    env.integration("inbox", "alice@example.test").await;
    env.integration("fresh", "bob@example.test").await;
    // A mailbox whose server cannot be reached: its check fails (the alerts read that series).
    env.grant("unreachable", "bob").await;
    env.integration_with(
        "unreachable",
        "bob@example.test",
        serde_json::json!({"mailbox": {"server": {"host": "127.0.0.1", "port": support::process::CLOSED_PORT, "tls": "None"}}}),
    )
    .await;
    env.wait_for("inbox", "Ready", Duration::from_secs(30), &op, is_ready)
        .await;
    env.wait_for(
        "unreachable",
        "MailboxUnreachable",
        Duration::from_secs(30),
        &op,
        |mi| condition(mi, "MailboxConnected").is_some_and(|c| c.1 == "MailboxUnreachable"),
    )
    .await;
    env.wait_for(
        "fresh",
        "SignInRequired",
        Duration::from_secs(30),
        &op,
        |mi| condition(mi, "Ready").is_some_and(|c| c.1 == "SignInRequired"),
    )
    .await;

    let prometheus = Path::new("/usr/bin/prometheus");
    assert!(
        prometheus.is_file(),
        "prometheus is missing: tools/install-test-deps.sh installs Debian's prometheus package"
    );
    let dir = tempfile::tempdir().unwrap();
    // The chart's alert rules, evaluated by this Prometheus on the real scrape: without the
    // NotReady and SignInRequired delays (15m and 1h by default), and with TokenExpiring due while
    // a token has less than 100 refresh margins left (its refresh margin is refreshBefore 1m plus
    // the spread, the tokens live 10 minutes), so that every alert is due at once for the
    // integrations it concerns.
    let rendered = support::helm::template(
        "mio",
        "ops",
        &[
            "prometheusRule.enabled=true",
            "prometheusRule.notReadyFor=0s",
            "prometheusRule.signInRequiredFor=0s",
            "prometheusRule.tokenExpiringShare=100",
        ],
    );
    let rule = serde_saphyr::from_multiple::<serde_json::Value>(&rendered)
        .expect("helm template renders YAML")
        .into_iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("the chart renders a PrometheusRule");
    let rules = dir.path().join("rules.json");
    std::fs::write(&rules, rule["spec"].to_string()).unwrap();
    let config = dir.path().join("prometheus.yml");
    // The job and namespace a ServiceMonitor of the chart's metrics Service would give `up`.
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: ['{}']\nscrape_configs:\n  - job_name: mio-mail-integration-operator-metrics\n    honor_labels: true\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n        labels: {{namespace: ops}}\n",
            rules.display(),
            op.health_port
        ),
    )
    .unwrap();
    let port = support::process::reserve_port();
    let _prom = support::process::Supervised::spawn(
        "prometheus",
        prometheus,
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
        ],
        &[],
        dir.path().join("prometheus.log"),
    );
    let http = reqwest::Client::new();
    let query = |q: String| {
        let http = http.clone();
        async move {
            let url = url::Url::parse_with_params(
                &format!("http://127.0.0.1:{port}/api/v1/query"),
                &[("query", q.as_str())],
            )
            .unwrap();
            let r = http.get(url).send().await.ok()?;
            r.json::<serde_json::Value>().await.ok()
        }
    };
    let ns = env.ns.clone();
    // Two scrapes with the integrations in them (rates need two samples).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = query(format!(
            "count_over_time(mailintegration_ready_status{{namespace=\"{ns}\",name=\"inbox\",condition=\"True\"}}[1m])"
        ))
        .await;
        let samples = r
            .as_ref()
            .and_then(|r| r["data"]["result"][0]["value"][1].as_str())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if samples >= 3.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape the operator: {r:?}\n{}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    alerts_follow_the_scrape(&env, &op, &query, port).await;
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/charts/mail-integration-operator/dashboards/mail-integration-operator.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut table =
        String::from("| panel | query ($namespace = the test's) | result |\n|---|---|---|\n");
    let mut by_title = std::collections::BTreeMap::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap_or("?").to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap().replace("$namespace", &ns);
            let r = query(expr.clone())
                .await
                .unwrap_or_else(|| panic!("no answer for {expr}"));
            assert_eq!(r["status"], "success", "{title}: {expr}: {r}");
            let result = r["data"]["result"].as_array().cloned().unwrap_or_default();
            let shown: Vec<String> = result
                .iter()
                .map(|s| {
                    let labels: Vec<String> = s["metric"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter(|(k, _)| !["instance", "job", "namespace"].contains(&k.as_str()))
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect();
                    let value = s["value"][1].as_str().unwrap_or("");
                    let value = value
                        .parse::<f64>()
                        .map(|v| {
                            format!("{v:.3}")
                                .trim_end_matches('0')
                                .trim_end_matches('.')
                                .to_owned()
                        })
                        .unwrap_or_else(|_| value.to_owned());
                    if labels.is_empty() {
                        value
                    } else {
                        format!("{{{}}} {value}", labels.join(","))
                    }
                })
                .collect();
            let shown = if shown.is_empty() {
                "(no data)".to_owned()
            } else {
                shown.join("; ")
            };
            table.push_str(&format!(
                "| {title} | `{}` | {shown} |\n",
                expr.replace(&ns, "$namespace").replace('|', "\\|")
            ));
            by_title.entry(title.clone()).or_insert(shown);
        }
    }
    assert_eq!(by_title["Ready"], "1", "{table}");
    // fresh (no sign-in yet) and unreachable (its mailbox check fails).
    assert_eq!(by_title["Not ready"], "2", "{table}");
    assert!(
        by_title["Not ready, by reason"].contains("SignInRequired"),
        "{table}"
    );
    assert!(
        by_title["Access tokens expiring soonest"].contains("name=inbox"),
        "{table}"
    );
    assert!(by_title["Operator"].contains("version="), "{table}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dashboard-queries.md"), &table).unwrap();
    eprintln!("{table}");
}

/// The chart's alerts as Prometheus evaluates them on the running operator's scrape name exactly
/// the integrations the API server's objects say they should: NotReady those with Ready=False (with
/// their reason) but SignInRequired, SignInRequired those waiting for their first sign-in,
/// TokenExpiring those with a token and an announced refresh that are not suspended (the share is
/// above the tokens' lifetime here), MailboxCheckFailing those with MailboxConnected=False,
/// ClientSecretExpiringSoon those whose client
/// Secret is annotated to expire within 30 days; OperatorDown stays silent while the
/// target is up, and every rule evaluates without error. And the series the promtool test of the
/// alerts feeds (tests/install.rs) carry the label sets this scrape shows.
async fn alerts_follow_the_scrape<F, Fut>(env: &Env, op: &Operator, query: &F, prometheus_port: u16)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Option<serde_json::Value>>,
{
    let ns = &env.ns;
    let scraped = reqwest::get(format!("http://127.0.0.1:{}/metrics", op.health_port))
        .await
        .expect("scrape /metrics")
        .text()
        .await
        .unwrap();
    for (metric, labels) in support::alert_series::ALERT_INPUTS {
        let seen: Vec<Vec<String>> = scraped
            .lines()
            .filter_map(support::alert_series::series_labels)
            .filter(|(n, _)| n == metric)
            .map(|(_, l)| l)
            .collect();
        assert!(
            !seen.is_empty() && seen.iter().all(|l| l == labels),
            "{metric}: the alert test feeds labels {labels:?}, the operator serves {seen:?}"
        );
    }

    // What each alert must name, from the objects.
    let api: kube::Api<mail_integration_operator::api::MailIntegration> =
        kube::Api::namespaced(env.client.clone(), ns);
    let objects = api.list(&Default::default()).await.unwrap().items;
    let names =
        |keep: &dyn Fn(&mail_integration_operator::api::MailIntegration) -> Option<String>| {
            let mut v: Vec<(String, String)> = objects
                .iter()
                .filter_map(|mi| Some((kube::ResourceExt::name_any(mi), keep(mi)?)))
                .collect();
            v.sort();
            v
        };
    let expected: Vec<(&str, Vec<(String, String)>)> = vec![
        (
            "MailIntegrationNotReady",
            names(&|mi| {
                condition(mi, "Ready")
                    .filter(|c| c.0 == "False" && c.1 != "SignInRequired")
                    .map(|c| c.1.to_owned())
            }),
        ),
        (
            "MailIntegrationSignInRequired",
            names(&|mi| {
                condition(mi, "Ready")
                    .filter(|c| c.0 == "False" && c.1 == "SignInRequired")
                    .map(|_| String::new())
            }),
        ),
        (
            "MailIntegrationTokenExpiring",
            names(&|mi| {
                let status = mi.status.as_ref()?;
                status.access_token_expires_at.as_ref()?;
                status.next_refresh_time.as_ref()?;
                (mi.spec.suspend != Some(true)).then(String::new)
            }),
        ),
        (
            "MailIntegrationMailboxCheckFailing",
            names(&|mi| {
                condition(mi, "MailboxConnected")
                    .filter(|c| c.0 == "False")
                    .map(|_| String::new())
            }),
        ),
        (
            "MailIntegrationClientSecretExpiringSoon",
            names(&|mi| {
                mi.status.as_ref()?.client_secret_expires_at.as_ref()?;
                Some(String::new())
            }),
        ),
        ("MailIntegrationOperatorDown", vec![]),
        // No grant here has an announced end (Google apps in Testing status only).
        ("MailIntegrationGrantEnding", vec![]),
    ];
    assert!(
        expected.iter().take(5).all(|(_, v)| !v.is_empty()),
        "the test's integrations give every per-object alert something to name: {expected:?}"
    );

    // Alerts as Prometheus holds them (pending or firing), by alert name: (name, reason).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = query("ALERTS".into()).await;
        let mut got: std::collections::BTreeMap<String, Vec<(String, String)>> = Default::default();
        for a in r
            .as_ref()
            .and_then(|r| r["data"]["result"].as_array().cloned())
            .unwrap_or_default()
        {
            let l = |k: &str| a["metric"][k].as_str().unwrap_or("").to_owned();
            if l("namespace") == *ns || l("alertname") == "MailIntegrationOperatorDown" {
                got.entry(l("alertname"))
                    .or_default()
                    .push((l("name"), l("reason")));
            }
        }
        for v in got.values_mut() {
            v.sort();
            v.dedup();
        }
        let matches = expected
            .iter()
            .all(|(alert, want)| got.get(*alert).cloned().unwrap_or_default() == *want);
        if matches {
            eprintln!("alerts from the scrape: {got:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "within 60 s the alerts name what the objects say:\nexpected {expected:?}\ngot {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rules: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:{prometheus_port}/api/v1/rules"))
            .await
            .expect("Prometheus rules API")
            .json()
            .await
            .unwrap();
    let evaluated: Vec<(String, String)> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("").to_owned(),
                r["health"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        evaluated.len(),
        7,
        "the chart's seven alerts are loaded: {rules}"
    );
    assert!(
        evaluated.iter().all(|(_, health)| health == "ok"),
        "every rule evaluates: {rules}"
    );
}
