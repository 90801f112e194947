//! The DataResidencyPolicy controller: reports which servers each policy governs.
//!
//! Evaluates every TransferServer with the same [`crate::residency::evaluate`] the
//! server controller uses, so the counts here always agree with the servers' own
//! `ResidencyCompliant` conditions.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};

use super::reconciler::{
    RESYNC, Running, WatchBackoff, apply_status, error_policy, every_object_in, instrumented,
    log_outcomes, object_key,
};
use super::server::{self, object_store};
use super::{Context, Error, scoped_api};
use crate::api::{
    ConditionType, DataResidencyPolicy, DataResidencyPolicyStatus, GovernedServer, Reason,
    TransferServer, set_condition,
};
use crate::residency;

/// The controller for every policy; it counts the servers of the watched namespaces.
pub fn controller(
    context: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Running {
    let client = context.client.clone();
    let mut controller = Controller::new(
        Api::<DataResidencyPolicy>::all(client.clone()),
        watcher::Config::default(),
    );
    let policies = controller.store();
    for namespace in context.args.watched() {
        controller = controller.watches(
            scoped_api::<TransferServer>(&client, namespace.as_deref()),
            watcher::Config::default(),
            every_object_in(policies.clone()),
        );
    }
    let results = controller
        .watches(
            Api::<Namespace>::all(client),
            watcher::Config::default(),
            every_object_in(policies.clone()),
        )
        .trigger_backoff(WatchBackoff::default())
        .graceful_shutdown_on(shutdown)
        .run(
            instrumented("policy", reconcile),
            error_policy,
            context.clone(),
        );
    Running::new(
        &context,
        "DataResidencyPolicy",
        policies,
        log_outcomes(&context, "policy", results),
    )
}

/// Every item `list` returns for each watched namespace (all namespaces for `None`).
async fn list_watched<K>(
    context: &Context,
    params: &ListParams,
    what: &str,
) -> Result<Vec<K>, Error>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let mut items = Vec::new();
    for namespace in context.args.watched() {
        let api = scoped_api::<K>(&context.client, namespace.as_deref());
        items.extend(api.list(params).await.map_err(Error::kube(what))?.items);
    }
    Ok(items)
}

async fn reconcile(
    policy: Arc<DataResidencyPolicy>,
    context: Arc<Context>,
) -> Result<Action, Error> {
    let client = &context.client;
    let servers: Vec<TransferServer> =
        list_watched(&context, &ListParams::default(), "list TransferServers").await?;
    let namespaces: BTreeMap<String, BTreeMap<String, String>> =
        Api::<Namespace>::all(client.clone())
            .list_metadata(&ListParams::default())
            .await
            .map_err(Error::kube("list Namespaces"))?
            .items
            .into_iter()
            .map(|ns| (ns.name_any(), ns.metadata.labels.unwrap_or_default()))
            .collect();
    let facts = cluster_facts(&context, &servers).await?;
    let policies = Api::<DataResidencyPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list DataResidencyPolicies"))?
        .items;

    let selector_error = [
        Some(&policy.spec.namespace_selector),
        policy.spec.server_selector.as_ref(),
    ]
    .into_iter()
    .flatten()
    .find_map(|selector| residency::matches(selector, &BTreeMap::new()).err());
    let now = Timestamp::now();
    let governed = governed_servers(&policy, &policies, &servers, &namespaces, &facts, now);
    announce_changes(&context, &policy, &governed).await;
    let next = next_expiry(&policy, now);
    let new_status = compute_status(
        &policy,
        governed,
        selector_error.map(|e| e.to_string()),
        now,
    );
    let api = Api::<DataResidencyPolicy>::all(client.clone());
    apply_status(&api, policy.as_ref(), new_status).await?;
    context.backoff.succeed(&object_key(policy.as_ref()));
    Ok(Action::requeue(next))
}

/// Until the next cross-border allowance of `policy` expires, or the resync if sooner.
fn next_expiry(policy: &DataResidencyPolicy, now: Timestamp) -> std::time::Duration {
    policy
        .spec
        .cross_border_transfers
        .iter()
        .map(|t| t.expires.0)
        .filter(|at| *at > now)
        .min()
        .map_or(RESYNC, |at| {
            let left = std::time::SystemTime::from(at)
                .duration_since(now.into())
                .unwrap_or_default();
            RESYNC.min(left + std::time::Duration::from_secs(1))
        })
}

/// What the cluster says about where servers' volumes are: StorageClasses, the volumes
/// bound to the servers' claims, and the nodes in those volumes' zones.
pub struct ClusterFacts {
    /// StorageClasses by name.
    pub storage_classes: BTreeMap<String, StorageClass>,
    /// The PersistentVolume bound to each server's claim, by `(namespace, server)`.
    pub bound: BTreeMap<(String, String), PersistentVolume>,
    /// Labels of the nodes in the bound volumes' zones.
    pub zone_nodes: Vec<BTreeMap<String, String>>,
}

async fn cluster_facts(
    context: &Context,
    servers: &[TransferServer],
) -> Result<ClusterFacts, Error> {
    let client = &context.client;
    let volumes = servers.iter().any(|s| s.spec.storage.volume.is_some());
    if !volumes {
        return Ok(ClusterFacts {
            storage_classes: BTreeMap::new(),
            bound: BTreeMap::new(),
            zone_nodes: Vec::new(),
        });
    }
    let storage_classes = Api::<StorageClass>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list StorageClasses"))?
        .items
        .into_iter()
        .map(|c| (c.name_any(), c))
        .collect();
    let owned = ListParams::default().labels("app.kubernetes.io/managed-by=sluice");
    let claims: Vec<PersistentVolumeClaim> =
        list_watched(context, &owned, "list PersistentVolumeClaims").await?;
    let pvs = Api::<PersistentVolume>::all(client.clone());
    let mut bound = BTreeMap::new();
    for server in servers.iter().filter(|s| s.spec.storage.volume.is_some()) {
        let namespace = server.namespace().unwrap_or_default();
        let claim_name = server::names::volume_claim(&server.name_any());
        let volume_name = claims
            .iter()
            .find(|c| c.namespace().as_deref() == Some(&namespace) && c.name_any() == claim_name)
            .and_then(|c| c.spec.as_ref()?.volume_name.clone())
            .filter(|n| !n.is_empty());
        if let Some(volume_name) = volume_name
            && let Some(pv) = pvs
                .get_opt(&volume_name)
                .await
                .map_err(Error::kube("read bound PersistentVolume"))?
        {
            bound.insert((namespace, server.name_any()), pv);
        }
    }
    let mut zone_nodes = Vec::new();
    for pv in bound.values() {
        zone_nodes.extend(server::dereference::zone_nodes(client, pv).await?);
    }
    Ok(ClusterFacts {
        storage_classes,
        bound,
        zone_nodes,
    })
}

/// The servers `policy` governs, with this policy's verdict on each, sorted. `policies`
/// are all policies, to name the others that govern each server too.
pub fn governed_servers(
    policy: &DataResidencyPolicy,
    policies: &[DataResidencyPolicy],
    servers: &[TransferServer],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    facts: &ClusterFacts,
    now: Timestamp,
) -> Vec<GovernedServer> {
    let name = policy.name_any();
    let empty = BTreeMap::new();
    let mut governed: Vec<GovernedServer> = servers
        .iter()
        .filter_map(|server| {
            let namespace = server.namespace().unwrap_or_default();
            let labels = namespaces.get(&namespace).unwrap_or(&empty);
            let key = (namespace.clone(), server.name_any());
            let class = server
                .spec
                .storage
                .volume
                .as_ref()
                .and_then(|v| facts.storage_classes.get(&v.storage_class_name));
            let subject = residency::Subject::of(server).with_placement(
                server,
                class,
                facts.bound.get(&key),
                &facts.zone_nodes,
            );
            let verdict =
                residency::evaluate(subject.clone(), labels, std::slice::from_ref(policy), now);
            if !verdict.governing.contains(&name) {
                return None;
            }
            let all = residency::evaluate(subject, labels, policies, now);
            let violation = verdict.violations.first();
            Some(GovernedServer {
                namespace,
                name: server.name_any(),
                region: server.spec.region.clone(),
                storage_region: object_store::plan(server)
                    .ok()
                    .flatten()
                    .map(|p| p.resolved.region),
                compliant: verdict.compliant(),
                rule: violation.map(|v| v.rule.as_str().to_string()),
                message: violation.map(|v| v.message.clone()),
                cross_border_transfer: verdict.allowances.first().map(|a| a.reference.clone()),
                also_governed_by: all.governing.into_iter().filter(|p| *p != name).collect(),
            })
        })
        .collect();
    governed.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    governed
}

/// Publishes an Event on the policy for every governed server whose verdict under it
/// changed since the last status: newly governed, no longer governed, or its compliance
/// flipped.
async fn announce_changes(
    context: &Context,
    policy: &DataResidencyPolicy,
    governed: &[GovernedServer],
) {
    let before = policy
        .status
        .as_ref()
        .map(|s| s.servers.as_slice())
        .unwrap_or_default();
    let find = |list: &[GovernedServer], s: &GovernedServer| {
        list.iter()
            .find(|o| o.namespace == s.namespace && o.name == s.name)
            .cloned()
    };
    for now in governed {
        let was = find(before, now);
        let server = format!("TransferServer {}/{}", now.namespace, now.name);
        match (was.map(|w| w.compliant), now.compliant) {
            (Some(a), b) if a == b => {}
            (_, true) => {
                let note = format!("{server} complies");
                context
                    .events
                    .normal(policy, Reason::ServerCompliant, note)
                    .await;
            }
            (_, false) => {
                let why = now.message.clone().unwrap_or_default();
                let note = format!("{server} does not comply: {why}");
                let reason = Reason::ServerNotCompliant;
                context.events.warning(policy, reason, note).await;
            }
        }
    }
    for was in before {
        if find(governed, was).is_none() {
            let note = format!(
                "TransferServer {}/{} is no longer governed by this policy",
                was.namespace, was.name
            );
            context
                .events
                .normal(policy, Reason::ServerReleased, note)
                .await;
        }
    }
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
            let message = format!(
                "{compliant} of {governed} governed servers comply; a server governed by \
                 several policies must satisfy all of them (the strictest wins)"
            );
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
