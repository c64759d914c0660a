//! What the sign-in server reads and writes in the cluster, behind a trait so that the HTTP layer is
//! testable without an API server.

use crate::api::{MailIntegration, SignInFailure};
use crate::reason::Reason;
use crate::reconcile::{context::FIELD_MANAGER, secrets};
use crate::secret::SecretValue;
use futures::future::BoxFuture;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tracing::warn;

/// The field manager of the sign-in server's status writes (`status.lastSignInFailure`).
pub const SIGN_IN_FIELD_MANAGER: &str = "mail-integration-operator-sign-in";

/// What to report on a resource after a sign-in attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    /// Recorded as `status.lastSignInFailure` (the controller turns it into the Authorized and Ready
    /// conditions while a sign-in is needed) and a Warning event.
    Failed { reason: Reason, message: String },
    /// Clears `status.lastSignInFailure`; a Normal event.
    SignedIn { account: String },
}

/// The cluster, as the sign-in server sees it.
pub trait Backend: Send + Sync + 'static {
    /// The MailIntegration `ns/name`, or `None` when it does not exist.
    fn integration<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<MailIntegration>, String>>;

    /// The Secret `ns/name`, or `None`.
    fn secret<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Secret>, String>>;

    /// Store a new grant in the integration's grant Secret (creating it, or replacing the refresh
    /// token and `extra` keys of the current one).
    fn store_grant<'a>(
        &'a self,
        mi: &'a MailIntegration,
        refresh_token: &'a SecretValue,
        extra: Vec<(&'static str, String)>,
    ) -> BoxFuture<'a, Result<(), String>>;

    /// Report the outcome on the resource (best effort: errors are logged).
    fn report<'a>(&'a self, mi: &'a MailIntegration, report: Report) -> BoxFuture<'a, ()>;
}

/// The real cluster.
#[derive(Clone)]
pub struct KubeBackend {
    pub client: Client,
    pub reporter: Reporter,
    /// One recorder for every event: it aggregates repeats of the same event into one Event with
    /// a count instead of a new object each time.
    recorder: Recorder,
    /// When each (integration UID, reason) failure was last reported.
    reported:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<(String, Reason), Timestamp>>>,
    /// The per-grant locks of the controller in this process: a sign-in and a refresh of the same
    /// integration never write its grant at the same time.
    grant_locks: std::sync::Arc<crate::sync::GrantLocks>,
    /// The controller's record of this process's writes: a refresh waiting for the lock must see
    /// that a sign-in replaced the grant even before the watch cache does.
    written: std::sync::Arc<crate::reconcile::cache::WrittenVersions>,
}

/// A sign-in failure with the same reason on the same integration is written to its status and
/// events at most this often: a replayed or expired link opened in a loop costs one write a minute.
pub const FAILURE_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

impl KubeBackend {
    pub fn new(client: Client) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            client,
            reporter,
            reported: Default::default(),
            grant_locks: Default::default(),
            written: Default::default(),
        }
    }

    /// Share the controller's per-grant locks and its record of this process's writes
    /// ([`crate::reconcile::context::Context::grant_locks`] and `written`).
    pub fn with_grant_locks(
        mut self,
        locks: std::sync::Arc<crate::sync::GrantLocks>,
        written: std::sync::Arc<crate::reconcile::cache::WrittenVersions>,
    ) -> Self {
        self.grant_locks = locks;
        self.written = written;
        self
    }

    /// Whether a failure `reason` on `uid` at `now` should be written (and remember it if so).
    fn should_report(&self, uid: &str, reason: Reason, now: Timestamp) -> bool {
        use crate::sync::LockExt as _;
        let mut map = self.reported.locked();
        let since = crate::time::before(now, FAILURE_REPORT_INTERVAL);
        map.retain(|_, at| *at > since);
        if map.contains_key(&(uid.to_owned(), reason)) {
            return false;
        }
        // Bounded: at most one entry per (integration, reason) per interval.
        map.insert((uid.to_owned(), reason), now);
        true
    }
}

fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
        other => other.to_string(),
    }
}

impl Backend for KubeBackend {
    fn integration<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<MailIntegration>, String>> {
        Box::pin(async move {
            Api::<MailIntegration>::namespaced(self.client.clone(), ns)
                .get_opt(name)
                .await
                .map_err(|e| describe(&e))
        })
    }

    fn secret<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Secret>, String>> {
        Box::pin(async move {
            Api::<Secret>::namespaced(self.client.clone(), ns)
                .get_opt(name)
                .await
                .map_err(|e| describe(&e))
        })
    }

    fn store_grant<'a>(
        &'a self,
        mi: &'a MailIntegration,
        refresh_token: &'a SecretValue,
        extra: Vec<(&'static str, String)>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let ns = mi.namespace().unwrap_or_default();
            let api = Api::<Secret>::namespaced(self.client.clone(), &ns);
            let name = mi.grant_secret_name();
            let pp = PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            let mut last = String::new();
            let lock = self.grant_locks.get(&mi.uid().unwrap_or_default());
            let _guard = lock.lock().await;
            // Optimistic concurrency: the replace carries the resourceVersion read just before; on
            // a conflict (a refresh in another process stored a rotated token meanwhile) read
            // again and put the new grant on top: a sign-in wins over a refresh that started
            // before it (the refresh, finding another refresh token than it presented, keeps
            // this one). The write also removes a refresh's write-ahead mark: the grant is new.
            for _ in 0..5 {
                let base = api.get_opt(&name).await.map_err(|e| describe(&e))?;
                if base
                    .as_ref()
                    .is_some_and(|b| !crate::reconcile::observed::grant_belongs_to(b, mi))
                {
                    return Err(format!(
                        "a Secret named {name:?} exists and is not this integration's grant (the operator writes only Secrets it owns); delete or rename it, then sign in again"
                    ));
                }
                let desired = secrets::grant_secret(mi, base.as_ref(), refresh_token, &extra);
                let result = match base {
                    Some(_) => api.replace(&name, &pp, &desired).await,
                    None => api.create(&pp, &desired).await,
                };
                match result {
                    Ok(stored) => {
                        self.written.set(
                            &mi.uid().unwrap_or_default(),
                            crate::reconcile::cache::Kind::Grant,
                            stored.metadata.resource_version,
                        );
                        return Ok(());
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                        last = s.message.clone();
                    }
                    Err(e) => return Err(describe(&e)),
                }
            }
            Err(format!("the grant Secret kept changing: {last}"))
        })
    }

    fn report<'a>(&'a self, mi: &'a MailIntegration, report: Report) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Report::Failed { reason, .. } = &report
                && !self.should_report(&mi.uid().unwrap_or_default(), *reason, Timestamp::now())
            {
                return;
            }
            let ns = mi.namespace().unwrap_or_default();
            let api = Api::<MailIntegration>::namespaced(self.client.clone(), &ns);
            let (failure, event) = match &report {
                Report::Failed { reason, message } => (
                    serde_json::to_value(SignInFailure {
                        reason: reason.as_str().to_owned(),
                        message: message.clone(),
                        time: Time(Timestamp::now()),
                        observed_generation: mi.metadata.generation,
                    })
                    .unwrap_or(serde_json::Value::Null),
                    Event {
                        type_: EventType::Warning,
                        reason: reason.as_str().to_owned(),
                        note: Some(message.chars().take(1000).collect()),
                        action: "SignIn".into(),
                        secondary: None,
                    },
                ),
                Report::SignedIn { account } => (
                    serde_json::Value::Null,
                    Event {
                        type_: EventType::Normal,
                        reason: "SignedIn".into(),
                        note: Some(format!(
                            "{account} signed in; the grant is stored in Secret {:?}",
                            mi.grant_secret_name()
                        )),
                        action: "SignIn".into(),
                        secondary: None,
                    },
                ),
            };
            // Server-side apply under the sign-in server's own field manager: the controller applies
            // the rest of the status under its manager and never touches this field (it removes it
            // with a merge patch once a grant works or the spec changed). Applying no failure
            // removes the one this manager set.
            let mut status = serde_json::Map::new();
            if !failure.is_null() {
                status.insert("lastSignInFailure".into(), failure);
            }
            let patch = serde_json::json!({
                "apiVersion": "mailintegration.dev/v1alpha1",
                "kind": "MailIntegration",
                "status": status,
            });
            if let Err(e) = api
                .patch_status(
                    &mi.name_any(),
                    &PatchParams::apply(SIGN_IN_FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                warn!(error = %describe(&e), "could not record the sign-in outcome in the status");
            }
            if let Err(e) = self.recorder.publish(&event, &mi.object_ref(&())).await {
                warn!(error = %describe(&e), "could not publish the sign-in event");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_repeated_failure_is_reported_once_a_minute() {
        // The client is never used by should_report; any config builds one.
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let backend = KubeBackend::new(Client::try_from(config).unwrap());
        let t0: Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
        assert!(backend.should_report("uid-1", Reason::SignInLinkExpired, t0));
        let soon = crate::time::after(t0, std::time::Duration::from_secs(5));
        assert!(!backend.should_report("uid-1", Reason::SignInLinkExpired, soon));
        assert!(backend.should_report("uid-1", Reason::SignInStateReused, soon));
        assert!(backend.should_report("uid-2", Reason::SignInLinkExpired, soon));
        let later = crate::time::after(t0, std::time::Duration::from_secs(61));
        assert!(backend.should_report("uid-1", Reason::SignInLinkExpired, later));
    }
}
