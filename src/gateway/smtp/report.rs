//! Refusals of the mail server that only the mailbox's owner can fix, reported on the
//! MailIntegration: Microsoft's `535 5.7.139 ... SmtpClientAuthentication is disabled` becomes
//! reason `SmtpClientAuthenticationDisabled` in `status.gateway.apps[].lastError` (server-side
//! apply, field manager `mail-integration-gateway`) and a Warning Event, at most once an hour per app.
//!
//! Written here rather than through the gateway's usage writer (src/gateway/usage.rs, which writes
//! `lastUsedTime`) and under a field manager of its own: a server-side apply removes the fields its
//! manager applied before and leaves out now, so one manager writing `lastUsedTime` at one time and
//! `lastError` at another would remove each with the other. The list is keyed by name, so both
//! managers' entries for one app are one entry.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType},
};

use crate::{
    api::MailIntegration,
    gateway::session::{AppId, Authorized},
    reason::Reason,
    reconcile::events::EventPublisher,
};

/// The field manager of the gateway's `lastError` writes.
pub const FIELD_MANAGER: &str = "mail-integration-gateway-errors";
/// How often one app's error is written at most.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(3600);

/// Where the SMTP handler reports what only the mailbox's owner can fix.
pub trait Report: Send + Sync {
    /// The mail server said SMTP AUTH is switched off for the mailbox (Microsoft 5.7.139).
    fn smtp_auth_disabled(&self, authorized: &Authorized, detail: &str);
}

/// Reports nothing (tests, or a gateway without API access).
pub struct NoReport;

impl Report for NoReport {
    fn smtp_auth_disabled(&self, _: &Authorized, _: &str) {}
}

/// The condition message of [`Reason::SmtpClientAuthenticationDisabled`] for `mailbox`.
pub fn message(mailbox: &str, detail: &str) -> String {
    format!(
        "{} The server said: {}. {}",
        Reason::SmtpClientAuthenticationDisabled.what_happened(),
        crate::reason::outside_text(detail, 300),
        Reason::SmtpClientAuthenticationDisabled
            .hint()
            .replace("<mailbox>", &crate::reason::outside_text(mailbox, 254))
    )
}

/// The status patch for one app's last error (server-side apply; `apps` is a list keyed by name).
pub fn status_patch(
    app: &str,
    reason: Reason,
    message: &str,
    now: jiff::Timestamp,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "mailintegration.dev/v1alpha1",
        "kind": "MailIntegration",
        "status": { "gateway": { "apps": [ {
            "name": app,
            "lastError": { "reason": reason.as_str(), "message": message, "time": now.round(jiff::Unit::Second).unwrap_or(now).to_string() }
        } ] } }
    })
}

/// Reports to the API server: a status patch and an Event, at most once per [`REPORT_INTERVAL`] per app.
pub struct KubeReport {
    client: Client,
    events: EventPublisher,
    last: Mutex<HashMap<AppId, Instant>>,
}

impl KubeReport {
    pub fn new(client: Client, events: EventPublisher) -> Self {
        Self {
            client,
            events,
            last: Mutex::new(HashMap::new()),
        }
    }

    fn due(&self, app: &AppId) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last
            .get(app)
            .is_some_and(|at| now.saturating_duration_since(*at) < REPORT_INTERVAL)
        {
            return false;
        }
        // Bounded by the apps the gateway serves; forget old entries when it grows.
        if last.len() > 10_000 {
            last.retain(|_, at| now.saturating_duration_since(*at) < REPORT_INTERVAL);
        }
        last.insert(app.clone(), now);
        true
    }
}

impl Report for KubeReport {
    fn smtp_auth_disabled(&self, authorized: &Authorized, detail: &str) {
        if !self.due(&authorized.app) {
            return;
        }
        let app = authorized.app.clone();
        let uid = authorized.entry.config.uid.clone();
        let message = message(&authorized.entry.config.mailbox, detail);
        let client = self.client.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let reason = Reason::SmtpClientAuthenticationDisabled;
            let api: Api<MailIntegration> = Api::namespaced(client, &app.namespace);
            let patch = status_patch(&app.app, reason, &message, jiff::Timestamp::now());
            if let Err(e) = api
                .patch_status(
                    &app.integration,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                tracing::warn!(app = %app, error = %e, "gateway: cannot write status.gateway.apps[].lastError");
            }
            let reference = ObjectReference {
                api_version: Some("mailintegration.dev/v1alpha1".into()),
                kind: Some("MailIntegration".into()),
                namespace: Some(app.namespace.clone()),
                name: Some(app.integration.clone()),
                uid: Some(uid),
                ..Default::default()
            };
            let event = Event {
                type_: EventType::Warning,
                reason: reason.as_str().into(),
                note: Some(format!("App {}: {message}", app.app)),
                action: "GatewaySMTP".into(),
                secondary: None,
            };
            if let Err(e) = events.publish(&event, &reference).await {
                tracing::warn!(app = %app, error = %e, "gateway: cannot publish the SmtpClientAuthenticationDisabled event");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_fix_for_the_mailbox() {
        let m = message(
            "box@contoso.com",
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox.",
        );
        assert!(
            m.contains(
                "Set-CASMailbox -Identity box@contoso.com -SmtpClientAuthenticationDisabled $false"
            ),
            "{m}"
        );
        assert!(m.contains("5.7.139"), "{m}");
        let p = status_patch(
            "grafana",
            Reason::SmtpClientAuthenticationDisabled,
            &m,
            jiff::Timestamp::UNIX_EPOCH,
        );
        assert_eq!(
            p["status"]["gateway"]["apps"][0]["lastError"]["reason"],
            "SmtpClientAuthenticationDisabled"
        );
    }
}
