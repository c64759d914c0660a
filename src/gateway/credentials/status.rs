//! What the gateway credentials report on the MailIntegration (pure): the GatewayCredentials
//! condition and status.gateway.rotationHandled, written by server-side apply under a field manager
//! of their own, so that neither the main status write nor the gateway's (status.gateway.apps)
//! takes them over or removes them.

use super::decide::Rotation;
use crate::{
    api::{MailIntegration, MailIntegrationStatus, condition::GATEWAY_CREDENTIALS},
    reason::Reason,
};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The field manager of the credentials' status fields.
pub const FIELD_MANAGER: &str = "mail-integration-operator-gateway-credentials";

/// The status fields the credentials own, as they should be.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub rotation_handled: Option<String>,
    /// The GatewayCredentials condition; `None`: no condition.
    pub condition: Option<Cond>,
}

/// The GatewayCredentials condition, as compared (its transition time aside).
#[derive(Clone, Debug, PartialEq)]
pub struct Cond {
    pub ok: bool,
    pub reason: String,
    pub message: String,
    pub generation: Option<i64>,
}

/// The report of a reconcile: which apps have credentials, which Secret names are taken, whether
/// the rotation request could be read.
pub fn report(
    mi: &MailIntegration,
    issued: &[String],
    conflicts: &[String],
    gateway_conflict: bool,
    rotation: &Rotation,
    handled_before: Option<&str>,
) -> Report {
    let name = mi.name_any_str();
    let rotation_handled = rotation
        .value()
        .map(str::to_owned)
        .or_else(|| handled_before.map(str::to_owned));
    let (ok, reason, message) = if gateway_conflict {
        (
            false,
            Reason::GatewaySecretConflict,
            format!(
                "Secret {:?} already exists and the operator did not create it for this integration: the operator writes only Secrets it owns, so no app can use the gateway. Delete or rename that Secret if it is left over",
                super::secrets::gateway_secret_name(name)
            ),
        )
    } else if !conflicts.is_empty() {
        let names: Vec<String> = conflicts
            .iter()
            .map(|a| format!("{:?}", super::secrets::app_secret_name(name, a)))
            .collect();
        (
            false,
            Reason::GatewaySecretConflict,
            format!(
                "Secret {} already exists and the operator did not create it for this integration: the app has no gateway credential (the operator writes only Secrets it owns). Delete or rename that Secret if it is left over, or rename the app in spec.gateway.apps",
                names.join(", ")
            ),
        )
    } else if let Rotation::Invalid(value, why) = rotation {
        (
            false,
            Reason::GatewayRotationInvalid,
            format!(
                "annotation {} is {value:?}: {why}; nothing was rotated. Use kubectl mailint rotate-gateway {name} [--app APP]",
                crate::api::ROTATE_GATEWAY_ANNOTATION
            ),
        )
    } else {
        (
            true,
            Reason::GatewayCredentialsIssued,
            if issued.is_empty() {
                "spec.gateway lists no apps".to_owned()
            } else {
                format!(
                    "gateway credentials in Secrets {}",
                    issued
                        .iter()
                        .map(|a| super::secrets::app_secret_name(name, a))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        )
    };
    Report {
        rotation_handled,
        condition: Some(Cond {
            ok,
            reason: reason.as_str().to_owned(),
            message,
            generation: mi.metadata.generation,
        }),
    }
}

/// What the status holds of the credentials' fields now.
pub fn reported(mi: &MailIntegration) -> Report {
    let status = mi.status.as_ref();
    Report {
        rotation_handled: status
            .and_then(|s| s.gateway.as_ref())
            .and_then(|g| g.rotation_handled.clone()),
        condition: status
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == GATEWAY_CREDENTIALS))
            .map(|c| Cond {
                ok: c.status == "True",
                reason: c.reason.clone(),
                message: c.message.clone(),
                generation: c.observed_generation,
            }),
    }
}

/// What the credentials' watch cache keeps of an integration: all of one with `spec.gateway`; of
/// one without, its metadata and spec and, of its status, only what [`reported`] reads (to
/// remove what an earlier `spec.gateway` left). This part watches every MailIntegration, most of
/// them without a gateway, and their conditions, sign-in links and failures were a second copy
/// of the main controller's cache (≈ 58 MiB more RSS at 10,000 integrations).
pub fn trim_for_cache(mi: &mut MailIntegration) {
    crate::reconcile::cache::trim_integration(mi);
    if mi.spec.gateway.is_some() {
        return;
    }
    mi.status = mi.status.take().and_then(|status| {
        let conditions: Vec<Condition> = status
            .conditions
            .into_iter()
            .filter(|c| c.type_ == GATEWAY_CREDENTIALS)
            .collect();
        (!conditions.is_empty() || status.gateway.is_some()).then(|| MailIntegrationStatus {
            conditions,
            gateway: status.gateway,
            ..Default::default()
        })
    });
}

/// The server-side apply patch of `report` (an empty one removes what this manager wrote).
pub fn patch(mi: &MailIntegration, report: &Report, now: Timestamp) -> serde_json::Value {
    let mut status = serde_json::Map::new();
    if let Some(v) = &report.rotation_handled {
        status.insert(
            "gateway".into(),
            serde_json::json!({ "rotationHandled": v }),
        );
    }
    if let Some(Cond {
        ok,
        reason,
        message,
        generation,
    }) = &report.condition
    {
        let previous = mi
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == GATEWAY_CREDENTIALS));
        let status_text = if *ok { "True" } else { "False" };
        let since = previous
            .filter(|c| c.status == status_text)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        let c = Condition {
            type_: GATEWAY_CREDENTIALS.into(),
            status: status_text.into(),
            reason: reason.clone(),
            message: message.clone(),
            observed_generation: *generation,
            last_transition_time: since,
        };
        status.insert("conditions".into(), serde_json::json!([c]));
    }
    serde_json::json!({
        "apiVersion": "mailintegration.dev/v1alpha1",
        "kind": "MailIntegration",
        "status": status,
    })
}

trait NameStr {
    fn name_any_str(&self) -> &str;
}

impl NameStr for MailIntegration {
    fn name_any_str(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn integration(
        gateway: Option<serde_json::Value>,
        status: serde_json::Value,
    ) -> MailIntegration {
        let mut spec = serde_json::json!({
            "provider": "Google",
            "mailbox": {"address": "box@example.com"},
            "oauth": {"clientSecretRef": {"name": "client"}},
            "tokenSecret": {"name": "inbox-token"},
        });
        if let Some(g) = gateway {
            spec["gateway"] = g;
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "mailintegration.dev/v1alpha1",
            "kind": "MailIntegration",
            "metadata": {"name": "inbox", "namespace": "team", "uid": "uid-1"},
            "spec": spec,
            "status": status,
        }))
        .unwrap()
    }

    fn condition(type_: &str, message: &str) -> serde_json::Value {
        serde_json::json!({"type": type_, "status": "False", "reason": "R", "message": message,
            "lastTransitionTime": "2026-12-01T00:00:00Z"})
    }

    fn full_status(with_gateway_fields: bool) -> serde_json::Value {
        let mut conditions = vec![
            condition("Ready", &"a long message ".repeat(40)),
            condition("Authorized", "sign in"),
        ];
        let mut status = serde_json::json!({
            "account": "box@example.com",
            "signIn": {"url": format!("https://sign-in.example/{}", "x".repeat(300)),
                "expiresAt": "2026-12-01T01:00:00Z"},
        });
        if with_gateway_fields {
            conditions.push(condition(GATEWAY_CREDENTIALS, "app gone"));
            status["gateway"] = serde_json::json!({"rotationHandled": "2026-12-01T00:00:00Z"});
        }
        status["conditions"] = serde_json::Value::Array(conditions);
        status
    }

    #[test]
    fn an_integration_without_a_gateway_keeps_only_what_the_credentials_read() {
        for with_gateway_fields in [false, true] {
            let original = integration(None, full_status(with_gateway_fields));
            let mut trimmed = original.clone();
            trim_for_cache(&mut trimmed);
            assert_eq!(reported(&trimmed), reported(&original));
            assert_eq!(trimmed.spec, original.spec);
            assert_eq!(trimmed.metadata.uid, original.metadata.uid);
            match trimmed.status {
                None => assert!(!with_gateway_fields),
                Some(s) => {
                    assert!(with_gateway_fields);
                    assert_eq!(s.conditions.len(), 1);
                    assert!(s.account.is_none() && s.sign_in.is_none());
                }
            }
        }
    }

    #[test]
    fn an_integration_with_a_gateway_is_kept_whole() {
        let gateway = serde_json::json!({"apps": [{"name": "grafana", "protocols": ["SMTP"]}]});
        let original = integration(Some(gateway), full_status(true));
        let mut trimmed = original.clone();
        trim_for_cache(&mut trimmed);
        assert_eq!(trimmed.status, original.status);
    }
}
