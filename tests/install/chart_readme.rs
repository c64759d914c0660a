//! The chart's README.md (what `helm show readme` prints), generated from Chart.yaml and the `# --`
//! comments of values.yaml, in the manner of helm-docs: `MIO_UPDATE_DOCS=1 cargo test --test
//! install chart_readme` writes it; the test fails when the checked-in file differs.

use crate::support::helm::{chart_dir, helm_offline};
use serde_json::Value;

/// The `# --` descriptions of values.yaml by key path (`a.b`), in file order, with the continuation
/// comment lines that follow each (up to its key).
fn described_keys(values_yaml: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut pending: Option<String> = None;
    for line in values_yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        let t = line.trim();
        if let Some(text) = t.strip_prefix("# --") {
            pending = Some(text.trim().to_owned());
            continue;
        }
        if let Some(text) = t.strip_prefix('#') {
            if let Some(p) = pending.as_mut() {
                p.push(' ');
                p.push_str(text.trim());
            }
            continue;
        }
        if t.is_empty() || t.starts_with('-') {
            continue;
        }
        let Some((key, _)) = t.split_once(':') else {
            continue;
        };
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key.trim().to_owned()));
        let path: Vec<&str> = stack.iter().map(|(_, k)| k.as_str()).collect();
        out.push((path.join("."), pending.take().unwrap_or_default()));
    }
    out
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_i64() || n.is_u64() => "int",
        Value::Number(_) => "float",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

/// The README: the chart's description, how to install, and one row per value that is described
/// or is a leaf (a mapping with keys of its own gets its keys' rows instead).
pub fn generate() -> String {
    let chart: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    let text = std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap();
    let values: Value = serde_saphyr::from_str(&text).unwrap();
    let mut out = format!(
        "<!-- Generated from Chart.yaml and values.yaml by tests/install/chart_readme.rs \
         (MIO_UPDATE_DOCS=1 cargo test --test install chart_readme); do not edit. -->\n\
         # {name}\n\n{description}\n\n\
         Version {version}, operator {app}, Kubernetes {kube}. License: Apache-2.0.\n\n\
         ## Installing\n\n\
         ```sh\n\
         git clone https://github.com/mail-integration-operator/mail-integration-operator\n\
         helm install mail-integration-operator mail-integration-operator/charts/mail-integration-operator \\\n  \
         --namespace mail-integration-operator --create-namespace \\\n  \
         --set publicURL=https://<the host your browsers reach>\n\
         ```\n\n\
         No chart has been published to a registry yet (the release workflow will push it as an OCI\n\
         artifact). \
         Then follow the NOTES it prints. The whole guide (RBAC, the CRD, the callback URL, alerts):\n\
         <https://github.com/mail-integration-operator/mail-integration-operator/blob/main/docs/install.md>;\n\
         upgrading: `CHANGELOG.md` and `docs/upgrading.md` in the repository.\n\n\
         ## Values\n\n\
         `values.schema.json` checks every key: a misspelt key or a wrong type fails `helm install`.\n\n\
         | Key | Type | Default | Description |\n|-----|------|---------|-------------|\n",
        name = chart["name"].as_str().unwrap(),
        description = chart["description"].as_str().unwrap().trim(),
        version = chart["version"].as_str().unwrap(),
        app = chart["appVersion"].as_str().unwrap(),
        kube = chart["kubeVersion"].as_str().unwrap(),
    );
    // A described mapping is one row; its keys get none of their own.
    let mut whole: Vec<String> = Vec::new();
    for (path, description) in described_keys(&text) {
        if whole.iter().any(|w| path.starts_with(&format!("{w}."))) {
            continue;
        }
        let mut v = &values;
        for k in path.split('.') {
            v = &v[k];
        }
        let has_keys = v.as_object().is_some_and(|o| !o.is_empty());
        if has_keys && description.is_empty() {
            continue;
        }
        if has_keys {
            whole.push(path.clone());
        }
        let default = serde_json::to_string(v).unwrap().replace('|', "\\|");
        out.push_str(&format!(
            "| `{path}` | {} | `{default}` | {} |\n",
            type_of(v),
            description.replace('|', "\\|")
        ));
    }
    out
}

#[test]
fn chart_readme_is_generated_from_the_values() {
    let fresh = generate();
    let path = chart_dir().join("README.md");
    if std::env::var_os("MIO_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "charts/mail-integration-operator/README.md differs from values.yaml; regenerate it:\n  \
         MIO_UPDATE_DOCS=1 cargo test --test install chart_readme"
    );
    // Every value of the schema has its row.
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("values.schema.json")).unwrap(),
    )
    .unwrap();
    for key in schema["properties"].as_object().unwrap().keys() {
        assert!(
            fresh.contains(&format!("| `{key}` |")) || fresh.contains(&format!("| `{key}.")),
            "{key} has no row in the chart README"
        );
    }
    // `helm show readme` prints it.
    let shown = helm_offline(&["show", "readme", chart_dir().to_str().unwrap()]);
    assert_eq!(shown.trim_end(), fresh.trim_end());
}
