//! What the sign-in server reads and writes in the cluster, behind a trait so that the HTTP layer is
//! testable without an API server.

use crate::api::{MailIntegration, SignInFailure};
use crate::reason::Reason;
use crate::reconcile::{controller::FIELD_MANAGER, secrets};
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
}

impl KubeBackend {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            reporter: Reporter {
                controller: FIELD_MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        }
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
            // Optimistic concurrency: the replace carries the resourceVersion read just before; on
            // a conflict (the controller stored a rotated token meanwhile) read again and retry.
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
                    Ok(_) => return Ok(()),
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
            let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
            if let Err(e) = recorder.publish(&event, &mi.object_ref(&())).await {
                warn!(error = %describe(&e), "could not publish the sign-in event");
            }
        })
    }
}
