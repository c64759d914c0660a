//! The gateway credentials in `kubectl mailint status NAME` (app, username, Secret, protocols,
//! last use from status.gateway.apps) and `kubectl mailint rotate-gateway NAME [--app APP]`.
//! Pure, like [`super::report`]; nothing here reads a Secret's data.

use super::report::Style;
use crate::api::{MailIntegration, ROTATE_GATEWAY_ANNOTATION};
use crate::gateway::config::username;
use crate::gateway::credentials::secrets::app_secret_name;
use anyhow::bail;
use jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;

/// One app's gateway credential.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayCredentialReport {
    pub app: String,
    pub username: String,
    /// The Secret the app mounts.
    pub secret: String,
    pub protocols: Vec<String>,
    /// When the gateway last saw the app log in (to the hour; status.gateway.apps[].lastUsedTime).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used: Option<Timestamp>,
    /// The last error the gateway met for the app, `reason: message`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The credentials of every app of spec.gateway, in the spec's order.
pub fn credentials(mi: &MailIntegration) -> Vec<GatewayCredentialReport> {
    let Some(gateway) = &mi.spec.gateway else {
        return vec![];
    };
    let ns = mi.namespace().unwrap_or_default();
    let name = mi.name_any();
    let usage = mi
        .status
        .as_ref()
        .and_then(|s| s.gateway.as_ref())
        .map(|g| g.apps.as_slice())
        .unwrap_or_default();
    gateway
        .apps
        .iter()
        .map(|app| {
            let used = usage.iter().find(|u| u.name == app.name);
            GatewayCredentialReport {
                app: app.name.clone(),
                username: username(&ns, &name, &app.name),
                secret: app_secret_name(&name, &app.name),
                protocols: app.protocols.iter().map(|p| p.name().to_owned()).collect(),
                last_used: used.and_then(|u| u.last_used_time.as_ref()).map(|t| t.0),
                last_error: used
                    .and_then(|u| u.last_error.as_ref())
                    .map(|e| format!("{}: {}", e.reason, e.message)),
            }
        })
        .collect()
}

/// The report's "Gateway credentials:" section (nothing without spec.gateway).
pub fn render(
    creds: &[GatewayCredentialReport],
    now: Timestamp,
    style: Style,
    relative: impl Fn(Timestamp, Timestamp) -> String,
) -> Vec<String> {
    if creds.is_empty() {
        return vec![];
    }
    let mut out = vec![String::new(), style.bold("Gateway credentials:")];
    for c in creds {
        let used = c
            .last_used
            .map(|t| format!("last used {}", relative(t, now)))
            .unwrap_or_else(|| "not used yet".into());
        out.push(format!(
            "  {:<16} {:<40} {:<12} Secret {}  {used}",
            c.app,
            c.username,
            c.protocols.join(","),
            c.secret
        ));
        if let Some(e) = &c.last_error {
            out.push(format!("      {}", style.bad(e)));
        }
    }
    out
}

/// The annotation value `rotate-gateway` writes: the time, and the app when one is named (which
/// spec.gateway must list).
pub fn rotation_value(
    mi: &MailIntegration,
    app: Option<&str>,
    now: Timestamp,
) -> anyhow::Result<String> {
    let id = format!("{}/{}", mi.namespace().unwrap_or_default(), mi.name_any());
    let Some(gateway) = &mi.spec.gateway else {
        bail!("{id} has no spec.gateway: it has no gateway credentials to rotate");
    };
    let now = now.round(jiff::Unit::Second).unwrap_or(now);
    match app {
        None => Ok(now.to_string()),
        Some(a) if gateway.apps.iter().any(|x| x.name == a) => Ok(format!("{now}/{a}")),
        Some(a) => bail!(
            "{id} has no app {a:?} in spec.gateway.apps (it lists: {})",
            gateway
                .apps
                .iter()
                .map(|x| x.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The merge patch setting the rotation annotation.
pub fn rotation_patch(value: &str) -> serde_json::Value {
    serde_json::json!({"metadata": {"annotations": {ROTATE_GATEWAY_ANNOTATION: value}}})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mi() -> MailIntegration {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "mailintegration.dev/v1alpha1",
            "kind": "MailIntegration",
            "metadata": {"name": "inbox", "namespace": "team"},
            "spec": {
                "provider": "Google",
                "mailbox": {"address": "box@example.com"},
                "oauth": {"clientSecretRef": {"name": "client"}},
                "tokenSecret": {"name": "inbox-token"},
                "gateway": {"apps": [
                    {"name": "grafana", "protocols": ["SMTP"]},
                    {"name": "helpdesk", "protocols": ["IMAP", "POP3"]},
                ]},
            },
            "status": {"gateway": {"apps": [{
                "name": "grafana",
                "lastUsedTime": "2026-12-06T20:00:00Z",
                "lastError": {"reason": "SmtpClientAuthenticationDisabled", "message": "535 5.7.139", "time": "2026-12-06T20:00:00Z"},
            }]}},
        }))
        .unwrap()
    }

    #[test]
    fn the_status_shows_each_apps_credential_and_last_use() {
        let creds = credentials(&mi());
        assert_eq!(creds.len(), 2);
        assert_eq!(creds[0].username, "team/inbox/grafana");
        assert_eq!(creds[0].secret, "inbox-gateway-grafana");
        assert_eq!(creds[1].protocols, ["IMAP", "POP3"]);
        assert_eq!(creds[1].last_used, None);
        let now: Timestamp = "2026-12-06T23:00:00Z".parse().unwrap();
        let lines = render(&creds, now, Style { colour: false }, |_, _| "3h ago".into());
        let text = lines.join("\n");
        assert!(text.contains("Gateway credentials:"), "{text}");
        assert!(
            text.contains("team/inbox/grafana") && text.contains("last used 3h ago"),
            "{text}"
        );
        assert!(
            text.contains("SmtpClientAuthenticationDisabled: 535 5.7.139"),
            "{text}"
        );
        assert!(
            text.contains("Secret inbox-gateway-helpdesk  not used yet"),
            "{text}"
        );
        let mut none = mi();
        none.spec.gateway = None;
        assert!(
            render(&credentials(&none), now, Style { colour: false }, |_, _| {
                String::new()
            })
            .is_empty()
        );
    }

    #[test]
    fn rotate_gateway_names_a_time_and_an_app_the_spec_lists() {
        let now: Timestamp = "2026-12-06T23:00:00.123Z".parse().unwrap();
        assert_eq!(
            rotation_value(&mi(), None, now).unwrap(),
            "2026-12-06T23:00:00Z"
        );
        assert_eq!(
            rotation_value(&mi(), Some("grafana"), now).unwrap(),
            "2026-12-06T23:00:00Z/grafana"
        );
        let e = rotation_value(&mi(), Some("nobody"), now)
            .unwrap_err()
            .to_string();
        assert!(e.contains("grafana, helpdesk"), "{e}");
        let mut none = mi();
        none.spec.gateway = None;
        assert!(rotation_value(&none, None, now).is_err());
    }
}
