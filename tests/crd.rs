//! The MailIntegration CRD on a real kube-apiserver: it installs, accepts the examples, rejects bad
//! resources with messages that say what to fix, and prints the columns users look at.

mod support;

use std::path::Path;
use support::{ensure_crd, unique_namespace};

#[test]
fn checked_in_crd_matches_the_types() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/mailintegration.yaml");
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == mail_integration_operator::api::crd_yaml(),
        "{} differs from the CRD generated from src/api. Regenerate it with:\n  \
         cargo run -- crd > crds/mailintegration.yaml",
        path.display()
    );
}

#[test]
fn crd_is_established_and_examples_apply() {
    let cp = ensure_crd();
    let names = cp.kubectl(&[
        "get",
        "crd",
        "mailintegrations.mailintegration.dev",
        "-o",
        "jsonpath={.spec.names}",
    ]);
    assert!(
        names.contains("\"mailint\"") && names.contains("\"mail\""),
        "short name and category: {names}"
    );

    let ns = unique_namespace("examples");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    let mut applied = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = cp.kubectl(&["apply", "-n", &ns, "-f", path.to_str().unwrap()]);
            assert!(
                out.contains("mailintegration.mailintegration.dev/"),
                "{}: {out}",
                path.display()
            );
            applied += 1;
        }
    }
    assert_eq!(applied, 3, "one example per provider under deploy/examples");
    let listed = cp.kubectl(&["get", "mailint", "-n", &ns, "-o", "name"]);
    assert_eq!(listed.lines().count(), 3, "{listed}");
}

#[test]
fn kubectl_get_shows_printer_columns() {
    let cp = ensure_crd();
    let ns = unique_namespace("columns");
    let out = cp.kubectl_stdin(&["apply", "-n", &ns, "-f", "-"], &valid("columns", ""));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = cp.kubectl(&["get", "mailint", "-n", &ns]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "READY", "REASON", "ACCOUNT", "EXPIRES", "MAILBOX", "AGE"
        ],
        "{table}"
    );
    let all = cp.kubectl(&["get", "mail", "-n", &ns, "-o", "name"]);
    assert!(
        all.contains("mailintegration.mailintegration.dev/columns"),
        "category 'mail' lists it: {all}"
    );
}

/// A valid Google integration; `extra` is spliced into `spec.oauth` (YAML, 4-space indented).
fn valid(name: &str, extra: &str) -> String {
    resource(
        name,
        "Google",
        "redirectURL: https://mail-operator.example.com/oauth2/callback",
        extra,
        "",
    )
}

fn resource(
    name: &str,
    provider: &str,
    oauth: &str,
    oauth_extra: &str,
    spec_extra: &str,
) -> String {
    format!(
        "apiVersion: mailintegration.dev/v1alpha1
kind: MailIntegration
metadata:
  name: {name}
spec:
  provider: {provider}
  mailbox:
    address: support@example.com
  oauth:
    clientSecretRef: {{name: client}}
    {oauth}
{oauth_extra}
  tokenSecret: {{name: token}}
{spec_extra}"
    )
}

/// Apply `yaml` and expect the API server to refuse it with `message` (the user-visible text).
fn assert_rejected(ns: &str, yaml: &str, message: &str) {
    let cp = ensure_crd();
    let out = cp.kubectl_stdin(&["apply", "-n", ns, "-f", "-"], yaml);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected the API server to reject:\n{yaml}\nbut it was accepted"
    );
    assert!(
        stderr.contains(message),
        "expected the rejection to say {message:?}, it said:\n{stderr}"
    );
}

#[test]
fn cel_rules_reject_bad_resources_with_clear_messages() {
    ensure_crd();
    let ns = unique_namespace("cel");
    let redirect = "redirectURL: https://mail-operator.example.com/oauth2/callback";

    // Sanity: the base resource of every case below is accepted.
    let cp = ensure_crd();
    let out = cp.kubectl_stdin(
        &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
        &valid("ok", ""),
    );
    assert!(
        out.status.success(),
        "base resource rejected: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_rejected(
        &ns,
        &resource("oidc-no-issuer", "OIDC", redirect, "", ""),
        "provider OIDC needs spec.oauth.issuerURL",
    );
    // OIDC with explicit endpoints instead of discovery is fine.
    let out = cp.kubectl_stdin(
        &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
        &resource(
            "oidc-endpoints",
            "OIDC",
            redirect,
            "    endpoints: {authorization: 'https://id.example.org/auth', token: 'https://id.example.org/token'}",
            "",
        ),
    );
    assert!(
        out.status.success(),
        "OIDC with endpoints rejected: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_rejected(
        &ns,
        &resource("ms-no-tenant", "Microsoft", redirect, "", ""),
        "provider Microsoft needs spec.oauth.tenant",
    );
    // spec.grantDeletionPolicy: Delete or Retain; Retain keeps what revokeOnDelete would revoke.
    assert_rejected(
        &ns,
        &resource(
            "retain-revoke",
            "Google",
            redirect,
            "",
            "  grantDeletionPolicy: Retain\n  revokeOnDelete: true",
        ),
        "spec.grantDeletionPolicy Retain keeps the grant for a re-created integration, spec.revokeOnDelete revokes it: choose one",
    );
    assert_rejected(
        &ns,
        &resource(
            "keep",
            "Google",
            redirect,
            "",
            "  grantDeletionPolicy: Keep",
        ),
        "supported values: \"Delete\", \"Retain\"",
    );
    for ok in [
        "  grantDeletionPolicy: Retain",
        "  grantDeletionPolicy: Delete\n  revokeOnDelete: true",
    ] {
        let out = cp.kubectl_stdin(
            &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
            &resource("policy", "Google", redirect, "", ok),
        );
        assert!(
            out.status.success(),
            "{ok:?} rejected: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_rejected(
        &ns,
        &resource(
            "google-tenant",
            "Google",
            redirect,
            "    tenant: common",
            "",
        ),
        "spec.oauth.tenant is only used with provider Microsoft",
    );
    assert_rejected(
        &ns,
        &resource(
            "http-redirect",
            "Google",
            "redirectURL: http://mail-operator.example.com/cb",
            "",
            "",
        ),
        "redirectURL must be an https:// URL",
    );
    // http is fine on loopback, for development.
    let out = cp.kubectl_stdin(
        &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
        &resource(
            "loopback",
            "Google",
            "redirectURL: http://127.0.0.1:8080/oauth2/callback",
            "",
            "",
        ),
    );
    assert!(
        out.status.success(),
        "loopback http rejected: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_rejected(
        &ns,
        &resource("not-a-url", "Google", "redirectURL: 'not a url'", "", ""),
        "redirectURL must be an https:// URL",
    );
    assert_rejected(
        &ns,
        &valid("bad-prompt", "    prompt: Always"),
        "supported values: \"None\", \"Consent\", \"SelectAccount\"",
    );
    assert_rejected(
        &ns,
        &resource("bad-port", "Google", redirect, "", "").replace(
            "address: support@example.com",
            "address: support@example.com\n    server: {host: imap.example.com, port: 70000}",
        ),
        "port must be between 1 and 65535",
    );
    assert_rejected(
        &ns,
        &resource("zero-port", "Google", redirect, "", "").replace(
            "address: support@example.com",
            "address: support@example.com\n    smtp: {host: smtp.example.com, port: 0}",
        ),
        "port must be between 1 and 65535",
    );
    assert_rejected(
        &ns,
        &resource("plain-remote", "Google", redirect, "", "").replace(
            "address: support@example.com",
            "address: support@example.com\n    server: {host: imap.example.com, port: 143, tls: None}",
        ),
        "tls: None (no encryption) is allowed only for localhost",
    );
    for bad in ["30s", "51m", "2h", "ten minutes"] {
        assert_rejected(
            &ns,
            &resource(
                "refresh",
                "Google",
                redirect,
                "",
                &format!("  refreshBefore: '{bad}'"),
            ),
            "refreshBefore must be a duration between 1m and 50m",
        );
    }
    for good in ["1m", "50m", "15m30s"] {
        let out = cp.kubectl_stdin(
            &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
            &resource(
                "refresh",
                "Google",
                redirect,
                "",
                &format!("  refreshBefore: '{good}'"),
            ),
        );
        assert!(
            out.status.success(),
            "refreshBefore {good} rejected: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_rejected(
        &ns,
        &resource("empty-secret", "Google", redirect, "", "").replace(
            "clientSecretRef: {name: client}",
            "clientSecretRef: {name: ''}",
        ),
        "clientSecretRef.name must name a Secret in the same namespace",
    );
    assert_rejected(
        &ns,
        &resource("no-secret-name", "Google", redirect, "", "").replace(
            "clientSecretRef: {name: client}",
            "clientSecretRef: {clientIdKey: id}",
        ),
        "spec.oauth.clientSecretRef.name: Required value",
    );
    assert_rejected(
        &ns,
        &resource("bad-address", "Google", redirect, "", "")
            .replace("support@example.com", "support"),
        "mailbox.address must be an email address",
    );
    assert_rejected(
        &ns,
        &resource("empty-token", "Google", redirect, "", "")
            .replace("tokenSecret: {name: token}", "tokenSecret: {name: ''}"),
        "tokenSecret.name must name the Secret",
    );
}

#[test]
fn the_crd_sets_no_defaults_so_gitops_sees_no_drift() {
    let cp = ensure_crd();
    let ns = unique_namespace("nodefaults");
    let yaml = valid("minimal", "");
    let out = cp.kubectl_stdin(&["apply", "--server-side", "-n", &ns, "-f", "-"], &yaml);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spec = cp.kubectl(&[
        "get",
        "mailint",
        "minimal",
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec}",
    ]);
    let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    let keys: Vec<&String> = spec.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["mailbox", "oauth", "provider", "tokenSecret"],
        "stored spec is exactly what was applied: {spec}"
    );
    let diff = cp.kubectl_stdin(&["diff", "--server-side", "-n", &ns, "-f", "-"], &yaml);
    assert!(
        diff.status.success() && diff.stdout.is_empty(),
        "kubectl diff shows drift: {}",
        String::from_utf8_lossy(&diff.stdout)
    );
}

#[test]
fn app_only_grants_need_a_specific_microsoft_tenant_and_service_accounts_are_googles() {
    let cp = ensure_crd();
    let ns = unique_namespace("cel-app-only");
    for tenant in ["common", "organizations", "Consumers"] {
        assert_rejected(
            &ns,
            &resource(
                "ms-app-only-common",
                "Microsoft",
                "grantType: ClientCredentials",
                &format!("    tenant: {tenant}"),
                "",
            ),
            "grantType ClientCredentials (app-only) needs a specific spec.oauth.tenant",
        );
    }
    assert_rejected(
        &ns,
        &resource(
            "google-app-only",
            "Google",
            "grantType: ClientCredentials",
            "",
            "",
        ),
        "grantType ClientCredentials is not offered by Google",
    );
    assert_rejected(
        &ns,
        &resource(
            "app-only-delegate",
            "OIDC",
            "grantType: ClientCredentials",
            "    issuerURL: https://id.example.org\n    signInAccount: alice@example.org",
            "",
        ),
        "spec.oauth.signInAccount is for interactive sign-in only",
    );
    assert_rejected(
        &ns,
        &resource("bad-delegate", "Google", "signInAccount: alice", "", ""),
        "oauth.signInAccount must be an email address",
    );
    assert_rejected(
        &ns,
        &resource(
            "ms-service-account",
            "Microsoft",
            "grantType: ServiceAccount",
            "    tenant: contoso.onmicrosoft.com",
            "",
        ),
        "grantType ServiceAccount (domain-wide delegation with a service-account key) is for provider Google only",
    );
    assert_rejected(
        &ns,
        &resource(
            "dwd-cert",
            "Google",
            "grantType: ServiceAccount",
            "    clientCertificateRef: {name: app-cert}",
            "",
        ),
        "spec.oauth.clientCertificateRef (certificate client authentication) is not used with grantType ServiceAccount",
    );
    assert_rejected(
        &ns,
        &resource(
            "dwd-delegate",
            "Google",
            "grantType: ServiceAccount",
            "    signInAccount: alice@example.com",
            "",
        ),
        "spec.oauth.signInAccount is for interactive sign-in only",
    );
    for (name, provider, oauth, extra) in [
        ("google-dwd", "Google", "grantType: ServiceAccount", ""),
        (
            "ms-interactive-cert",
            "Microsoft",
            "clientCertificateRef: {name: app-cert}",
            "    tenant: common",
        ),
        (
            "ms-app-only-cert",
            "Microsoft",
            "grantType: ClientCredentials",
            "    tenant: contoso.onmicrosoft.com\n    clientCertificateRef: {name: app-cert, algorithm: PS256}",
        ),
    ] {
        let out = cp.kubectl_stdin(
            &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
            &resource(name, provider, oauth, extra, ""),
        );
        assert!(
            out.status.success(),
            "{name} rejected: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (name, provider, extra) in [
        (
            "ms-app-only",
            "Microsoft",
            "    tenant: 8c3f1d5e-0000-4000-8000-000000000001",
        ),
        ("ms-interactive-common", "Microsoft", "    tenant: common"),
        (
            "oidc-app-only",
            "OIDC",
            "    issuerURL: https://id.example.org",
        ),
    ] {
        let grant = if name.contains("interactive") {
            "grantType: Interactive"
        } else {
            "grantType: ClientCredentials"
        };
        let out = cp.kubectl_stdin(
            &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
            &resource(name, provider, grant, extra, ""),
        );
        assert!(
            out.status.success(),
            "{name} rejected: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `spec.gateway` (docs/gateway.md): the API server keeps its lists and values within the bounds
/// the operator and the gateway count on, and says what to fix.
#[test]
fn the_gateway_spec_is_bounded() {
    let cp = ensure_crd();
    let ns = unique_namespace("cel-gateway");
    let with_gateway = |name: &str, gateway: &str| {
        resource(
            name,
            "Google",
            "redirectURL: https://mail-operator.example.com/oauth2/callback",
            "",
            &format!("  gateway:\n{gateway}"),
        )
    };
    let app = |name: &str| format!("    - name: {name}\n      protocols: [SMTP]\n");
    let ok = with_gateway(
        "gw-ok",
        &format!(
            "    apps:\n{}    - name: grafana\n      protocols: [IMAP, POP3, SMTP]\n      sendAs: [alerts@example.com]\n    rotationGracePeriod: 720h\n    maxMessageBytes: 36700160\n",
            app(&"a".repeat(40))
        ),
    );
    let out = cp.kubectl_stdin(&["apply", "--dry-run=server", "-n", &ns, "-f", "-"], &ok);
    assert!(
        out.status.success(),
        "a valid gateway rejected: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let apps: String = (0..33).map(|i| app(&format!("app{i}"))).collect();
    assert_rejected(
        &ns,
        &with_gateway("gw-many", &format!("    apps:\n{apps}")),
        "must have at most 32 items",
    );
    assert_rejected(
        &ns,
        &with_gateway("gw-dup", &format!("    apps:\n{}{}", app("a"), app("a"))),
        "Duplicate value",
    );
    assert_rejected(
        &ns,
        &with_gateway("gw-long", &format!("    apps:\n{}", app(&"a".repeat(41)))),
        "may not be more than 40",
    );
    for bad in ["Grafana", "-x", "x-", "a.b", "a_b"] {
        assert_rejected(
            &ns,
            &with_gateway("gw-name", &format!("    apps:\n{}", app(bad))),
            "a gateway app's name must be a DNS label",
        );
    }
    assert_rejected(
        &ns,
        &with_gateway(
            "gw-noproto",
            "    apps:\n    - name: a\n      protocols: []\n",
        ),
        "should have at least 1 items",
    );
    assert_rejected(
        &ns,
        &with_gateway(
            "gw-dupproto",
            "    apps:\n    - name: a\n      protocols: [SMTP, SMTP]\n",
        ),
        "Duplicate value",
    );
    assert_rejected(
        &ns,
        &with_gateway(
            "gw-proto",
            "    apps:\n    - name: a\n      protocols: [HTTP]\n",
        ),
        "Unsupported value",
    );
    let send_as: Vec<String> = (0..33).map(|i| format!("a{i}@example.com")).collect();
    assert_rejected(
        &ns,
        &with_gateway(
            "gw-sendas",
            &format!(
                "    apps:\n    - name: a\n      protocols: [SMTP]\n      sendAs: [{}]\n",
                send_as.join(", ")
            ),
        ),
        "must have at most 32 items",
    );
    assert_rejected(
        &ns,
        &with_gateway(
            "gw-sendas-bad",
            "    apps:\n    - name: a\n      protocols: [SMTP]\n      sendAs: [not-an-address]\n",
        ),
        "sendAs must list email addresses",
    );
    assert_rejected(
        &ns,
        &with_gateway("gw-grace", "    rotationGracePeriod: 721h\n"),
        "rotationGracePeriod must be a duration of at most 720h",
    );
    assert_rejected(
        &ns,
        &with_gateway("gw-grace-text", "    rotationGracePeriod: 1d\n"),
        "rotationGracePeriod must be a duration of at most 720h",
    );
    for bytes in ["1023", "157286401"] {
        assert_rejected(
            &ns,
            &with_gateway("gw-size", &format!("    maxMessageBytes: {bytes}\n")),
            "maxMessageBytes",
        );
    }
    assert_rejected(
        &ns,
        &with_gateway("gw-token", "    apps: []\n").replace(
            "tokenSecret: {name: token}",
            "tokenSecret: {name: gw-token-gateway-x}",
        ),
        "spec.tokenSecret.name must not start with <name>-gateway",
    );
}
