//! Kubernetes Events, published only when something changes.
//!
//! Events are created directly through `events.k8s.io/v1` rather than with kube-runtime's
//! `Recorder`: the Recorder (kube-runtime 5) merges events into a series by type, reason
//! and object but not by note, and keeps the first note, so a refusal for a second region
//! would be shown with the first region's message. Sluice publishes an Event only when a
//! condition changes, so there is no burst to aggregate and every Event keeps its text.

use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client, Resource};

/// Publishes Events for Sluice objects. Failures to publish are logged and otherwise
/// ignored: an Event is evidence for people, not part of the reconcile's outcome.
pub struct EventPublisher {
    client: Client,
    instance: String,
}

impl EventPublisher {
    /// A publisher reporting as controller `sluice`, instance `instance` (the pod name).
    pub(super) fn new(client: Client, instance: String) -> Self {
        Self { client, instance }
    }

    /// Publishes a Warning about `object`.
    pub async fn warning<K>(&self, object: &K, reason: crate::api::Reason, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        self.publish(object, "Warning", reason, note).await;
    }

    /// Publishes a Normal event about `object`.
    pub async fn normal<K>(&self, object: &K, reason: crate::api::Reason, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        self.publish(object, "Normal", reason, note).await;
    }

    async fn publish<K>(&self, object: &K, type_: &str, reason: crate::api::Reason, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let regarding = object.object_ref(&());
        // Cluster-scoped objects (policies) get their Events in `default`, as kubectl
        // describe looks for them there.
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = regarding.name.clone().unwrap_or_default();
        let event = Event {
            metadata: ObjectMeta {
                name: Some(event_name(&name)),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            action: Some("Reconcile".into()),
            event_time: Some(MicroTime(Timestamp::now())),
            note: Some(truncate(note)),
            reason: Some(reason.as_str().into()),
            regarding: Some(regarding),
            reporting_controller: Some("sluice.dev/operator".into()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some(type_.into()),
            ..Event::default()
        };
        let api = Api::<Event>::namespaced(self.client.clone(), &namespace);
        if let Err(error) = api.create(&PostParams::default(), &event).await {
            tracing::warn!(error = %error, "Failed to publish Event");
        }
    }
}

/// `<object>.<unique hex>`, the naming kubectl and client-go use (a `generateName` ending
/// in `.` is refused by the API server's validation).
fn event_name(object: &str) -> String {
    let object: String = object.chars().take(200).collect();
    let nanos = Timestamp::now().as_nanosecond() as u128;
    let unique = nanos ^ u128::from(rand::random::<u64>());
    format!("{object}.{:x}", unique & 0xffff_ffff_ffff_ffff)
}

/// The API server refuses notes longer than 1 kB.
fn truncate(mut note: String) -> String {
    const LIMIT: usize = 1024;
    if note.len() > LIMIT {
        let mut end = LIMIT - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    note
}
