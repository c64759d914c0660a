//! The docs that are generated or linked from code: docs/reasons.md is generated from
//! src/reason.rs (`MIO_UPDATE_DOCS=1 cargo test --test docs` rewrites it), and every runbook link
//! of the alert rules lands on a heading that exists.

mod support;

use mail_integration_operator::reason::{Reason, markdown};
use std::collections::BTreeSet;
use std::path::Path;

fn docs_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/docs"))
}

/// GitHub's anchor of a Markdown heading: lower case, spaces to dashes, punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(doc: &str) -> Vec<String> {
    let text =
        std::fs::read_to_string(docs_dir().join(doc)).unwrap_or_else(|e| panic!("docs/{doc}: {e}"));
    text.lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

#[test]
fn reasons_md_is_generated_from_src_reason_rs() {
    let path = docs_dir().join("reasons.md");
    let fresh = markdown();
    if std::env::var_os("MIO_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "docs/reasons.md differs from src/reason.rs: run MIO_UPDATE_DOCS=1 cargo test --test docs"
    );
    let anchors = anchors("reasons.md");
    for r in Reason::ALL {
        assert!(anchors.contains(&r.anchor()), "no section for {r}");
    }
}

#[test]
fn every_runbook_link_of_the_alerts_lands_on_a_heading() {
    let rules = support::helm::template("mio", "ops", &["prometheusRule.enabled=true"]);
    let base =
        "https://github.com/mail-integration-operator/mail-integration-operator/blob/main/docs/";
    let links: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .map(|l| l.trim_matches('"'))
        .collect();
    assert_eq!(links.len(), 7, "every alert has a runbook link: {links:?}");
    for link in links {
        let rest = link
            .strip_prefix(base)
            .unwrap_or_else(|| panic!("{link} is not under {base}"));
        let (doc, anchor) = rest.split_once('#').expect("an anchor");
        let known = anchors(doc);
        if anchor == "{{ $labels.reason | toLower }}" {
            // Filled in by Prometheus with the Ready reason: every reason has its section.
            for r in Reason::ALL {
                assert!(known.contains(&r.anchor()), "{doc} lacks {r}");
            }
        } else {
            assert!(
                known.contains(&anchor.to_owned()),
                "{doc}#{anchor} does not exist: {known:?}"
            );
        }
    }
}

/// Every query of the Grafana dashboard (as the chart's ConfigMap ships it) is valid PromQL:
/// promtool checks them as recording rules.
#[test]
fn every_dashboard_query_passes_promtool() {
    let rendered = support::helm::template("mio", "ops", &["grafanaDashboard.enabled=true"]);
    let start = rendered
        .find("mail-integration-operator.json: |-")
        .expect("the dashboard ConfigMap");
    let json: String = rendered[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let dashboard: serde_json::Value = serde_json::from_str(&json).expect("the dashboard is JSON");
    let on_disk: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/charts/mail-integration-operator/dashboards/mail-integration-operator.json"
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(dashboard, on_disk, "the ConfigMap ships the file");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap().replace("$namespace", ".*");
            n += 1;
            rules.push_str(&format!(
                "      - record: dashboard:query_{n}\n        expr: {}\n",
                serde_json::to_string(&expr).unwrap()
            ));
        }
    }
    assert!(n >= 15, "{n} queries");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yaml");
    std::fs::write(&file, &rules).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool (apt-get install prometheus; tools/test.sh installs it)");
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every metric family the operator serves, as a query names it (counters with `_total`), with its
/// type and label names: the exposition of [`Metrics`] with one integration in the controller's
/// cache that has every status field, and each pushed family counted once (the label structs are
/// written out, so a new label fails to compile here until it is counted).
fn served_metrics()
-> std::collections::BTreeMap<String, (String, std::collections::BTreeSet<String>)> {
    use kube::runtime::{reflector::store, watcher::Event};
    use mail_integration_operator::{
        api::MailIntegration,
        metrics::{Metrics, ReconcileLabels, RefreshLabels},
    };
    let mut metrics = Metrics::default();
    // The Kubernetes client's series, registered as `run` registers them.
    let api = mail_integration_operator::kube_client::ApiMetrics::default();
    api.register(&mut metrics.registry);
    api.decreases
        .get_or_create(&mail_integration_operator::kube_client::SignalLabels {
            signal: "throttled".into(),
        })
        .inc();
    let mi: MailIntegration = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailintegration.dev/v1alpha1", "kind": "MailIntegration",
        "metadata": {"name": "inbox", "namespace": "team", "uid": "u1"},
        "spec": {"provider": "Google", "mailbox": {"address": "a@example.test"},
            "oauth": {"clientSecretRef": {"name": "c"}}, "tokenSecret": {"name": "t"}},
        "status": {
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Refreshed", "message": "",
                    "lastTransitionTime": "2026-12-01T00:00:00Z"},
                {"type": "MailboxConnected", "status": "True", "reason": "Connected", "message": "",
                    "lastTransitionTime": "2026-12-01T00:00:00Z"}],
            "accessTokenExpiresAt": "2026-12-01T01:00:00Z",
            "lastRefreshTime": "2026-12-01T00:00:00Z",
            "nextRefreshTime": "2026-12-01T00:50:00Z",
            "clientSecretExpiresAt": "2027-06-01T00:00:00Z",
            "grantExpiresAt": "2026-12-08T00:00:00Z"
        }
    }))
    .unwrap();
    let (reader, mut writer) = store::<MailIntegration>();
    writer.apply_watcher_event(&Event::Apply(mi));
    let _registered = metrics.objects.register(reader);
    metrics
        .refreshes
        .get_or_create(&RefreshLabels {
            result: "success".into(),
            reason: "Refreshed".into(),
        })
        .inc();
    metrics
        .reconciles
        .get_or_create(&ReconcileLabels {
            result: "ok".into(),
        })
        .inc();
    let _watching =
        metrics
            .watches
            .start(mail_integration_operator::metrics::watches::WatchLabels {
                namespace: "team".into(),
                watch: "integrations".into(),
            });
    metrics.count_write("status");
    metrics.count_read("secret");
    metrics.count_deferred("namespace_share");
    metrics.refresh_duration.observe(0.1);
    metrics.reconcile_duration.observe(0.1);

    exposition_families(&metrics.encode())
}

/// (name as a query names it, (type, label names)) of each family of a text exposition.
fn exposition_families(
    text: &str,
) -> std::collections::BTreeMap<String, (String, std::collections::BTreeSet<String>)> {
    let mut families = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            let name = match kind {
                "counter" => format!("{name}_total"),
                _ => name.to_owned(),
            };
            families.insert(name, (kind.to_owned(), std::collections::BTreeSet::new()));
        }
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let series = line.split_once(' ').unwrap().0;
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let family = families
            .keys()
            .filter(|f| {
                name == f.as_str()
                    || ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(f.as_str()))
            })
            .max_by_key(|f| f.len())
            .unwrap_or_else(|| panic!("a series of no family: {line}"))
            .clone();
        let labels = labels.trim_end_matches('}');
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let key = pair.split_once('=').unwrap().0;
            if key != "le" {
                families.get_mut(&family).unwrap().1.insert(key.to_owned());
            }
        }
    }
    families
}

/// The metrics table of docs/operations.md (`## Metrics`): name, type and labels of each row.
fn documented_metrics()
-> std::collections::BTreeMap<String, (String, std::collections::BTreeSet<String>)> {
    let text = std::fs::read_to_string(docs_dir().join("operations.md")).unwrap();
    let section = text
        .split_once("\n## Metrics\n")
        .expect("docs/operations.md has a ## Metrics section")
        .1;
    let section = section.split("\n## ").next().unwrap();
    let mut out = std::collections::BTreeMap::new();
    for row in section
        .lines()
        .filter(|l| l.starts_with("| `mailintegration_"))
    {
        let cells: Vec<&str> = row
            .split(" | ")
            .map(|c| c.trim_matches(['|', ' ']))
            .collect();
        let name = cells[0].trim_matches('`').to_owned();
        let labels = cells[2]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_owned())
            .filter(|l| !l.is_empty() && l != "none")
            .collect();
        assert!(
            out.insert(name.clone(), (cells[1].to_owned(), labels))
                .is_none(),
            "{name} is in the table twice"
        );
    }
    out
}

#[test]
fn every_metric_served_is_documented_with_its_labels_and_no_other() {
    let served = served_metrics();
    assert!(served.len() >= 20, "{served:?}");
    let documented = documented_metrics();
    let mut problems = Vec::new();
    for (name, (kind, labels)) in &served {
        match documented.get(name) {
            None => problems.push(format!(
                "{name} ({kind}, labels {labels:?}) is served but not in docs/operations.md#metrics"
            )),
            Some(d) if d != &(kind.clone(), labels.clone()) => problems.push(format!(
                "{name}: served as {kind} with labels {labels:?}, documented as {} with {:?}",
                d.0, d.1
            )),
            Some(_) => {}
        }
    }
    for name in documented.keys().filter(|n| !served.contains_key(*n)) {
        problems.push(format!(
            "docs/operations.md#metrics documents {name}, which the operator does not serve"
        ));
    }
    // No other text names a metric that does not exist (histograms by their series' suffixes):
    // the operator's, or the mail gateway's (its own process, `mailintegration_gateway_*`).
    // CHANGELOG.md is left out: it names the metrics a version removed.
    let gateway = exposition_families(
        &mail_integration_operator::gateway::metrics::GatewayMetrics::default().encode(),
    );
    let served: std::collections::BTreeMap<_, _> = served.into_iter().chain(gateway).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for dir in ["docs", "charts/mail-integration-operator/templates"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            files.push(e.unwrap().path());
        }
    }
    files.push(
        root.join("charts/mail-integration-operator/dashboards/mail-integration-operator.json"),
    );
    let known = |m: &str| {
        served.contains_key(m)
            || ["_bucket", "_sum", "_count"].iter().any(|s| {
                m.strip_suffix(s)
                    .is_some_and(|f| served.get(f).is_some_and(|(k, _)| k == "histogram"))
            })
    };
    for file in files.iter().filter(|f| f.is_file()) {
        let text = std::fs::read_to_string(file).unwrap();
        for (at, _) in text.match_indices("mailintegration_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            // `mailintegration_kube_api_*`: a family of names.
            let prefix = text[at + name.len()..].starts_with('*');
            if !(known(&name) || prefix && served.keys().any(|k| k.starts_with(&name))) {
                problems.push(format!(
                    "{} names {name}, which the operator does not serve",
                    file.strip_prefix(root).unwrap().display()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The long flags and environment variables `mail-integration-operator <subcommand> --help`
/// lists (hidden test-only settings are not listed there, so they are not asked for).
fn help_flags_and_env(subcommand: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let bin = env!("CARGO_BIN_EXE_mail-integration-operator");
    let out = std::process::Command::new(bin)
        .args([subcommand, "--help"])
        .output()
        .expect("run the operator binary");
    assert!(out.status.success(), "{subcommand} --help failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut flags = BTreeSet::new();
    let mut env = BTreeSet::new();
    for line in text.lines() {
        let t = line.trim_start();
        let t = t.strip_prefix("-h, ").unwrap_or(t);
        if let Some(rest) = t.strip_prefix("--") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if name != "help" {
                flags.insert(format!("--{name}"));
            }
        }
        let mut rest = line;
        while let Some(at) = rest.find("[env: ") {
            let tail = &rest[at + 6..];
            let name: String = tail.chars().take_while(|c| *c != '=').collect();
            env.insert(name);
            rest = tail;
        }
    }
    assert!(
        flags.len() > 5,
        "{subcommand} --help lists no flags:\n{text}"
    );
    (flags, env)
}

/// The rows of the table under `heading` (up to the next heading of any level) in `doc`.
fn table_under<'a>(doc: &'a str, heading: &str) -> Vec<&'a str> {
    let start = doc
        .find(heading)
        .unwrap_or_else(|| panic!("the docs have no heading {heading:?}"));
    let after = &doc[start + heading.len()..];
    let end = after.find("\n#").unwrap_or(after.len());
    after[..end]
        .lines()
        .filter(|l| l.starts_with('|'))
        .collect()
}

fn missing_from_rows(rows: &[&str], names: &BTreeSet<String>) -> Vec<String> {
    names
        .iter()
        .filter(|n| !rows.iter().any(|r| r.contains(&format!("`{n}`"))))
        .cloned()
        .collect()
}

/// Every flag and environment variable of `run --help` has its row in docs/install.md's table, and
/// every one of `gateway --help` in docs/gateway.md's: a new setting cannot ship undocumented.
#[test]
fn every_flag_and_environment_variable_is_documented() {
    for (subcommand, doc, heading) in [
        ("run", "install.md", "## Flags and environment variables"),
        (
            "gateway",
            "gateway.md",
            "### Flags and environment variables",
        ),
    ] {
        let (flags, env) = help_flags_and_env(subcommand);
        let text = std::fs::read_to_string(docs_dir().join(doc)).unwrap();
        let rows = table_under(&text, heading);
        let mut missing = missing_from_rows(&rows, &flags);
        missing.extend(missing_from_rows(&rows, &env));
        assert!(
            missing.is_empty(),
            "`mail-integration-operator {subcommand} --help` has settings docs/{doc} \
             ({heading}) lacks: {missing:?}"
        );
    }
}

/// Every printer column of `kubectl get mailint` and every condition type is explained in
/// docs/troubleshooting.md, "Reading the status".
#[test]
fn every_printer_column_and_condition_is_documented() {
    let crd = serde_json::to_value(mail_integration_operator::api::crd()).unwrap();
    let columns: BTreeSet<String> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .expect("the CRD has printer columns")
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_uppercase())
        .chain(["NAME".to_owned()])
        .collect();
    use mail_integration_operator::api::condition;
    let conditions: BTreeSet<String> = [
        condition::READY,
        condition::AUTHORIZED,
        condition::TOKEN_VALID,
        condition::MAILBOX_CONNECTED,
        condition::RECONCILING,
        condition::STALLED,
        condition::CLIENT_SECRET_EXPIRING_SOON,
        condition::GATEWAY_CREDENTIALS,
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    // The list above must be the module's whole list: count its constants in the source.
    let source =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api/status.rs"))
            .unwrap();
    let module = &source[source
        .find("pub mod condition {")
        .expect("src/api/status.rs")..];
    let module = &module[..module.find("\n}").unwrap()];
    assert_eq!(
        module.matches("pub const ").count(),
        conditions.len(),
        "a condition type was added to src/api/status.rs: add it to this test and the docs"
    );
    let text = std::fs::read_to_string(docs_dir().join("troubleshooting.md")).unwrap();
    let mut missing = missing_from_rows(
        &table_under(&text, "### Columns of `kubectl get mailint`"),
        &columns,
    );
    missing.extend(missing_from_rows(
        &table_under(&text, "### Conditions"),
        &conditions,
    ));
    assert!(
        missing.is_empty(),
        "docs/troubleshooting.md lacks rows for: {missing:?}"
    );
}
