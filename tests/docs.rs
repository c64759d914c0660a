//! The docs that are generated or linked from code: docs/reasons.md is generated from
//! src/reason.rs (`MIO_UPDATE_DOCS=1 cargo test --test docs` rewrites it), and every runbook link
//! of the alert rules lands on a heading that exists.

mod support;

use mail_integration_operator::reason::{Reason, markdown};
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
