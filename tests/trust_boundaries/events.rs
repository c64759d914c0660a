//! Event notes against the real API server: events.k8s.io/v1 takes a note of at most 1024 bytes,
//! and a longer one made the whole Event be refused (422), so that an event quoting outside text
//! (a provider's error in RevocationFailed, say) was lost.

use super::support::{self, world::Env};
use k8s_openapi::api::{core::v1::ObjectReference, events::v1::Event as K8sEvent};
use kube::{
    Api,
    api::ListParams,
    runtime::events::{Event, EventType, Reporter},
};
use mail_integration_operator::reconcile::events::EventPublisher;

/// A note of 1500 characters, 3000 bytes (the provider's words quoted in it are not ASCII): the
/// Event is stored, its note cut to what the API server takes (main: 422, no Event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_with_a_long_note_is_stored_with_its_note_cut() {
    let env = Env::new("evnote", support::oauth::with_token_ttl(600)).await;
    let publisher = EventPublisher::new(
        env.client.clone(),
        Reporter {
            controller: "mail-integration-operator".into(),
            instance: None,
        },
    );
    let reference = ObjectReference {
        api_version: Some("mailintegration.dev/v1alpha1".into()),
        kind: Some("MailIntegration".into()),
        name: Some("inbox".into()),
        namespace: Some(env.ns.clone()),
        ..Default::default()
    };
    let note = format!("the provider said: {}", "é".repeat(1500));
    publisher
        .publish(
            &Event {
                type_: EventType::Warning,
                reason: "RevocationFailed".into(),
                note: Some(note),
                action: "Revoke".into(),
                secondary: None,
            },
            &reference,
        )
        .await
        .expect("the API server takes the Event");
    let events = Api::<K8sEvent>::namespaced(env.client.clone(), &env.ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    let stored = events
        .items
        .iter()
        .find(|e| e.reason.as_deref() == Some("RevocationFailed"))
        .and_then(|e| e.note.clone())
        .expect("the Event is stored with its note");
    assert!(stored.len() <= 1024, "{} bytes", stored.len());
    assert!(stored.starts_with("the provider said: é"), "{stored}");
    assert!(stored.ends_with('…'), "{stored}");
}
