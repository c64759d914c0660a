//! What the gateway credentials report on the MailIntegration (pure): the GatewayCredentials
//! condition and status.gateway.rotationHandled, written by server-side apply under a field manager
//! of their own, so that neither the main status write nor the gateway's (status.gateway.apps)
//! takes them over or removes them.

use super::decide::Rotation;
use crate::{
    api::{MailIntegration, condition::GATEWAY_CREDENTIALS},
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
