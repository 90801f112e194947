//! The DataResidencyPolicy controller: reports which servers each policy governs.
//!
//! Evaluates every TransferServer with the same [`crate::residency::evaluate`] the
//! server controller uses, so the counts here always agree with the servers' own
//! `ResidencyCompliant` conditions.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::Stream;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};

use super::reconciler::{
    RESYNC, apply_status, error_policy, every_object_in, log_outcomes, object_key,
};
use super::{Context, Error};
use crate::api::{
    ConditionType, DataResidencyPolicy, DataResidencyPolicyStatus, GovernedServer, Reason,
    TransferServer, set_condition,
};
use crate::residency;

/// The controller's stream of reconcile results; drive it to run the controller.
pub fn controller(
    context: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> impl Stream<Item = ()> {
    let client = context.client.clone();
    let controller = Controller::new(
        Api::<DataResidencyPolicy>::all(client.clone()),
        watcher::Config::default(),
    );
    let policies = controller.store();
    let results = controller
        .watches(
            Api::<TransferServer>::all(client.clone()),
            watcher::Config::default(),
            every_object_in(policies.clone()),
        )
        .watches(
            Api::<Namespace>::all(client),
            watcher::Config::default(),
            every_object_in(policies),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context);
    log_outcomes(results)
}

async fn reconcile(
    policy: Arc<DataResidencyPolicy>,
    context: Arc<Context>,
) -> Result<Action, Error> {
    let client = &context.client;
    let servers = Api::<TransferServer>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list TransferServers"))?
        .items;
    let namespaces: BTreeMap<String, BTreeMap<String, String>> =
        Api::<Namespace>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(Error::kube("list Namespaces"))?
            .items
            .into_iter()
            .map(|ns| (ns.name_any(), ns.metadata.labels.unwrap_or_default()))
            .collect();

    let selector_error =
        residency::matches(&policy.spec.namespace_selector, &BTreeMap::new()).err();
    let governed = governed_servers(&policy, &servers, &namespaces);
    let new_status = compute_status(
        &policy,
        governed,
        selector_error.map(|e| e.to_string()),
        Timestamp::now(),
    );
    let api = Api::<DataResidencyPolicy>::all(client.clone());
    apply_status(&api, policy.as_ref(), new_status).await?;
    context.backoff.succeed(&object_key(policy.as_ref()));
    Ok(Action::requeue(RESYNC))
}

/// The servers `policy` governs, with this policy's verdict on each, sorted.
pub fn governed_servers(
    policy: &DataResidencyPolicy,
    servers: &[TransferServer],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
) -> Vec<GovernedServer> {
    let name = policy.name_any();
    let empty = BTreeMap::new();
    let mut governed: Vec<GovernedServer> = servers
        .iter()
        .filter_map(|server| {
            let namespace = server.namespace().unwrap_or_default();
            let labels = namespaces.get(&namespace).unwrap_or(&empty);
            let subject = residency::Subject::of(&server.spec);
            let verdict = residency::evaluate(subject, labels, std::slice::from_ref(policy));
            verdict.governing.contains(&name).then(|| GovernedServer {
                namespace,
                name: server.name_any(),
                region: server.spec.region.clone(),
                compliant: verdict.compliant(),
            })
        })
        .collect();
    governed.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    governed
}

fn compute_status(
    policy: &DataResidencyPolicy,
    servers: Vec<GovernedServer>,
    selector_error: Option<String>,
    now: Timestamp,
) -> DataResidencyPolicyStatus {
    let current = policy.status.clone().unwrap_or_default();
    let generation = policy.metadata.generation;
    let mut conditions = current.conditions;
    let governed = servers.len();
    let compliant = servers.iter().filter(|s| s.compliant).count();
    match selector_error {
        Some(error) => set_condition(
            &mut conditions,
            ConditionType::Ready,
            false,
            Reason::InvalidSpec,
            error,
            generation,
            now,
        ),
        None => {
            let message = format!("{compliant} of {governed} governed servers comply");
            set_condition(
                &mut conditions,
                ConditionType::Ready,
                true,
                Reason::Evaluated,
                message,
                generation,
                now,
            )
        }
    }
    DataResidencyPolicyStatus {
        observed_generation: generation,
        conditions,
        governed_servers: Some(i32::try_from(governed).unwrap_or(i32::MAX)),
        compliant_servers: Some(i32::try_from(compliant).unwrap_or(i32::MAX)),
        servers,
    }
}
