//! Kubernetes Events, published only when something changes.

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

/// Publishes Events for Sluice objects. Failures to publish are logged and otherwise
/// ignored: an Event is evidence for people, not part of the reconcile's outcome.
pub struct EventPublisher {
    recorder: Recorder,
}

impl EventPublisher {
    pub(super) fn new(client: kube::Client, reporter: Reporter) -> Self {
        Self {
            recorder: Recorder::new(client, reporter),
        }
    }

    /// Publishes a Warning about `object`.
    pub async fn warning<K>(&self, object: &K, reason: crate::api::Reason, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        self.publish(object, EventType::Warning, reason, note).await;
    }

    /// Publishes a Normal event about `object`.
    pub async fn normal<K>(&self, object: &K, reason: crate::api::Reason, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        self.publish(object, EventType::Normal, reason, note).await;
    }

    async fn publish<K>(
        &self,
        object: &K,
        type_: EventType,
        reason: crate::api::Reason,
        note: String,
    ) where
        K: Resource<DynamicType = ()>,
    {
        let event = Event {
            type_,
            reason: reason.as_str().to_string(),
            note: Some(note),
            action: "Reconcile".to_string(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(error = %error, "Failed to publish Event");
        }
    }
}
