//! `status.gateway.apps[].lastUsedTime` of the MailIntegrations: which apps used the gateway
//! recently. Written by server-side apply with the field manager [`FIELD_MANAGER`] (only that field
//! of that app: the list is a map keyed by `name`, so the operator's and other replicas' fields
//! stay), at most once per [`Usage::period`] per app per replica, and only when the stored value
//! is older than the period: no write per login. A login only marks the app; a background task
//! writes.
//!
//! The status is read and written as JSON (`DynamicObject`), in the shape GATEWAY.md fixes:
//! `status.gateway.apps: [{name, lastUsedTime, lastError}]`.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use jiff::Timestamp;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};

use super::{metrics::GatewayMetrics, metrics::KindLabels, session::AppId};
use crate::api::MailIntegration;

/// The field manager of the gateway's status writes.
pub const FIELD_MANAGER: &str = "mail-integration-gateway";
/// How often marked apps are written out.
pub const FLUSH_PERIOD: Duration = Duration::from_secs(10);
/// Most apps marked and remembered at once (a bound on memory; more wait for the next period).
pub const MAX_TRACKED: usize = 100_000;

/// Apps used since their last write.
pub struct Usage {
    client: Client,
    metrics: Arc<GatewayMetrics>,
    /// At most one write per app per this.
    pub period: Duration,
    marked: Mutex<HashMap<AppId, Timestamp>>,
    /// When this replica last wrote (or found fresh) each app's time.
    written: Mutex<HashMap<AppId, Instant>>,
}

/// Whether a stored `lastUsedTime` is older than `period` at `now` (absent or unreadable: yes).
pub fn stale(stored: Option<&str>, now: Timestamp, period: Duration) -> bool {
    let Some(at) = stored.and_then(|s| s.parse::<Timestamp>().ok()) else {
        return true;
    };
    let Ok(period) = jiff::SignedDuration::try_from(period) else {
        return true;
    };
    at.checked_add(period)
        .map_or(true, |fresh_until| fresh_until <= now)
}

/// The stored `lastUsedTime` of `app` in a MailIntegration's JSON.
pub fn stored_last_used<'a>(object: &'a serde_json::Value, app: &str) -> Option<&'a str> {
    object
        .pointer("/status/gateway/apps")?
        .as_array()?
        .iter()
        .find(|a| a.get("name").and_then(|n| n.as_str()) == Some(app))?
        .get("lastUsedTime")?
        .as_str()
}

/// The server-side apply body that sets one app's `lastUsedTime`.
pub fn apply_body(integration: &str, app: &str, at: Timestamp) -> serde_json::Value {
    let resource = ApiResource::erase::<MailIntegration>(&());
    serde_json::json!({
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": { "name": integration },
        "status": { "gateway": { "apps": [ { "name": app, "lastUsedTime": at.to_string() } ] } },
    })
}

impl Usage {
    pub fn new(client: Client, metrics: Arc<GatewayMetrics>, period: Duration) -> Self {
        Self {
            client,
            metrics,
            period,
            marked: Mutex::default(),
            written: Mutex::default(),
        }
    }

    /// An app logged in now.
    pub fn record(&self, app: &AppId) {
        let recent = self
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(app)
            .is_some_and(|at| at.elapsed() < self.period);
        if recent {
            return;
        }
        let mut marked = self.marked.lock().unwrap_or_else(|e| e.into_inner());
        if marked.len() < MAX_TRACKED || marked.contains_key(app) {
            marked.insert(app.clone(), Timestamp::now());
        }
    }

    /// Write the marked apps out, every [`FLUSH_PERIOD`], until the process ends.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(FLUSH_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.flush().await;
        }
    }

    async fn flush(&self) {
        let marked: Vec<(AppId, Timestamp)> =
            std::mem::take(&mut *self.marked.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .collect();
        let mut done = HashSet::new();
        for (app, at) in marked {
            let result = self.write(&app, at).await;
            let kind = match &result {
                Ok(true) => "written",
                Ok(false) => "fresh",
                Err(_) => "error",
            };
            self.metrics
                .usage_writes
                .get_or_create(&KindLabels { kind: kind.into() })
                .inc();
            match result {
                Ok(_) => {
                    done.insert(app);
                }
                Err(e) => {
                    tracing::warn!(app = %app, error = %e, "writing the app's last use failed")
                }
            }
        }
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if written.len() >= MAX_TRACKED {
            let period = self.period;
            written.retain(|_, at| at.elapsed() < period);
        }
        let now = Instant::now();
        for app in done {
            if written.len() < MAX_TRACKED {
                written.insert(app, now);
            }
        }
    }

    /// Write `app`'s time unless the stored one is fresh; `Ok(true)` when written.
    async fn write(&self, app: &AppId, at: Timestamp) -> Result<bool, kube::Error> {
        let resource = ApiResource::erase::<MailIntegration>(&());
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &app.namespace, &resource);
        let object = api.get(&app.integration).await?;
        let json = serde_json::to_value(&object).unwrap_or_default();
        if !stale(stored_last_used(&json, &app.app), at, self.period) {
            return Ok(false);
        }
        api.patch_status(
            &app.integration,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(apply_body(&app.integration, &app.app, at)),
        )
        .await?;
        tracing::debug!(app = %app, "wrote the app's last use");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stored_time_older_than_the_period_is_rewritten() {
        let now: Timestamp = "2026-12-06T12:00:00Z".parse().unwrap();
        let hour = Duration::from_secs(3600);
        assert!(stale(None, now, hour));
        assert!(stale(Some("garbage"), now, hour));
        assert!(stale(Some("2026-12-06T11:00:00Z"), now, hour));
        assert!(!stale(Some("2026-12-06T11:00:01Z"), now, hour));
        let object = serde_json::json!({"status": {"gateway": {"apps": [
            {"name": "a", "lastUsedTime": "2026-12-06T11:30:00Z"}, {"name": "b"}]}}});
        assert_eq!(stored_last_used(&object, "a"), Some("2026-12-06T11:30:00Z"));
        assert_eq!(stored_last_used(&object, "b"), None);
        assert_eq!(stored_last_used(&object, "c"), None);
        let body = apply_body("inbox", "a", now);
        assert_eq!(body["kind"], "MailIntegration");
        assert_eq!(
            body["status"]["gateway"]["apps"][0]["lastUsedTime"],
            "2026-12-06T12:00:00Z"
        );
    }
}
