//! Events of the reconciler, created without kube's [`Recorder`](kube::runtime::events::Recorder)
//! cache: that cache keeps every published Event object for six minutes and is swept only when the
//! next event is published, so after the first Ready of 10,000 integrations it held about 20,000
//! Events (tens of MiB) for as long as nothing else happened. The reconciler publishes only on a
//! change of Ready, Authorized or Reconciling, so repeats that the cache would have folded into a
//! series are rare; each is its own Event (the API server expires Events after an hour).

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event as K8sEvent},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client,
    api::PostParams,
    runtime::events::{Event, EventType, Reporter},
};

/// The longest note events.k8s.io/v1 takes, in bytes: the API server refuses a whole Event whose
/// note is longer (422, "can have at most 1024 characters", counted in bytes).
pub const MAX_NOTE_BYTES: usize = 1024;

/// `text` as an Event's note: [`crate::reason::outside_text`], then cut on a character boundary to
/// [`MAX_NOTE_BYTES`] (ending in `…` when cut).
pub fn note(text: &str) -> String {
    let mut note = crate::reason::outside_text(text, MAX_NOTE_BYTES);
    if note.len() > MAX_NOTE_BYTES {
        let room = MAX_NOTE_BYTES.saturating_sub('…'.len_utf8());
        let end = note
            .char_indices()
            .map(|(i, c)| i.saturating_add(c.len_utf8()))
            .take_while(|end| *end <= room)
            .last()
            .unwrap_or(0);
        note.truncate(end);
        note.truncate(note.trim_end().len());
        note.push('…');
    }
    note
}

/// Publishes events.k8s.io/v1 Events as kube's Recorder does, without keeping them.
#[derive(Clone)]
pub struct EventPublisher {
    client: Client,
    reporter: Reporter,
}

impl EventPublisher {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self { client, reporter }
    }

    pub async fn publish(
        &self,
        ev: &Event,
        reference: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = jiff::Timestamp::now();
        let namespace = reference
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let event = K8sEvent {
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            event_time: Some(MicroTime(now)),
            regarding: Some(reference.clone()),
            // Every event note passes here: bounded, whatever outside text it quotes.
            note: ev.note.as_deref().map(note),
            metadata: ObjectMeta {
                namespace: Some(namespace.clone()),
                name: Some(format!(
                    "{}.{:x}",
                    reference.name.as_ref().unwrap_or(&self.reporter.controller),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            type_: Some(
                match ev.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            related: ev.secondary.clone(),
            ..Default::default()
        };
        Api::<K8sEvent>::namespaced(self.client.clone(), &namespace)
            .create(&PostParams::default(), &event)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_fits_what_the_api_server_takes_in_bytes() {
        let long = format!("said: {}", "é".repeat(1500));
        let n = note(&long);
        assert!(n.len() <= MAX_NOTE_BYTES, "{} bytes", n.len());
        assert!(n.starts_with("said: é") && n.ends_with('…'), "{n}");
        let ascii = "x".repeat(5000);
        assert_eq!(note(&ascii).len(), MAX_NOTE_BYTES);
        assert_eq!(note("short\nnote"), "short note");
    }
}
