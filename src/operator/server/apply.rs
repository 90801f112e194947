//! Apply: write the built objects with server-side apply under one field manager.

use std::fmt::Debug;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::build::{GatewayObjects, build_host_keys};
use super::host_keys::HostKeyMaterial;
use crate::api::TransferServer;
use crate::operator::{Error, FIELD_MANAGER};

/// Returns the server's host-key material, generating and creating the Secret if it
/// does not exist. An existing Secret is never overwritten with new keys: creation uses
/// a plain create, which fails if another writer got there first, and then re-reads.
pub async fn ensure_host_keys(
    client: &Client,
    server: &TransferServer,
    existing: Option<&Secret>,
) -> Result<HostKeyMaterial, Error> {
    let secrets =
        Api::<Secret>::namespaced(client.clone(), &server.namespace().unwrap_or_default());
    if let Some(secret) = existing {
        return material_of(secret);
    }
    let material = tokio::task::spawn_blocking(HostKeyMaterial::generate)
        .await
        .map_err(|e| Error::HostKeys(e.into()))?
        .map_err(Error::HostKeys)?;
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    match secrets
        .create(&params, &build_host_keys(server, &material))
        .await
    {
        Ok(_) => {
            let secret = super::names::host_keys(&server.name_any());
            tracing::info!(%secret, "Generated SSH host keys");
            Ok(material)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let name = super::names::host_keys(&server.name_any());
            let secret = secrets
                .get(&name)
                .await
                .map_err(Error::kube("read host-key Secret"))?;
            material_of(&secret)
        }
        Err(e) => Err(Error::kube("create host-key Secret")(e)),
    }
}

fn material_of(secret: &Secret) -> Result<HostKeyMaterial, Error> {
    HostKeyMaterial::from_secret(secret).ok_or_else(|| {
        Error::HostKeys(anyhow::anyhow!(
            "host-key Secret {} exists but is incomplete; it is never regenerated in place, \
             delete it to generate new host keys",
            secret.name_any()
        ))
    })
}

/// What an earlier roll-out left that this one replaces.
pub struct Leftovers<'a> {
    /// Per-pod Services the server owns; those not wanted any more (after a scale-down,
    /// or when the passive range stops being split) are deleted.
    pub pod_services: &'a [String],
    /// The gateway Deployment of versions before the StatefulSet, if the server owns one.
    pub deployment: Option<&'a str>,
    /// The NetworkPolicy the server owns, if any; deleted when no longer wanted.
    pub network_policy: Option<&'a str>,
    /// The PodDisruptionBudget the server owns, if any; deleted when none is wanted.
    pub disruption_budget: Option<&'a str>,
}

/// Applies every owned object, then deletes the leftovers. Unchanged objects are not
/// written by the API server. Returns the StatefulSet as applied (its generation is the
/// one whose roll-out the status must wait for).
pub async fn apply(
    client: &Client,
    namespace: &str,
    objects: GatewayObjects,
    leftovers: Leftovers<'_>,
) -> Result<StatefulSet, Error> {
    let GatewayObjects {
        host_keys,
        config,
        volume_claim,
        statefulset,
        service,
        pod_services,
        network_policy,
        disruption_budget,
    } = objects;
    apply_one::<Secret>(client, namespace, &host_keys).await?;
    apply_one::<Secret>(client, namespace, &config).await?;
    // A claim from before a switch to an object store is kept: it holds files.
    if let Some(volume_claim) = &volume_claim {
        apply_one::<PersistentVolumeClaim>(client, namespace, volume_claim).await?;
    }
    apply_one::<Service>(client, namespace, &service).await?;
    for pod_service in &pod_services {
        apply_one::<Service>(client, namespace, pod_service).await?;
    }
    // The Deployment's pods would hold a ReadWriteOnce volume the StatefulSet's need.
    if let Some(deployment) = leftovers.deployment {
        let deployments = Api::<Deployment>::namespaced(client.clone(), namespace);
        delete(&deployments, deployment).await?;
        tracing::info!(%deployment, "Removed the gateway Deployment the StatefulSet replaces");
    }
    // The policy first, so that no pod of a new template runs without it.
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), namespace);
    match (&network_policy, leftovers.network_policy) {
        (Some(policy), _) => {
            apply_one::<NetworkPolicy>(client, namespace, policy).await?;
        }
        (None, Some(owned)) => {
            delete(&policies, owned).await?;
            tracing::info!(network_policy = %owned, "Removed the gateway NetworkPolicy");
        }
        (None, None) => {}
    }
    let applied = apply_one::<StatefulSet>(client, namespace, &statefulset).await?;
    match &disruption_budget {
        Some(budget) => {
            apply_one::<PodDisruptionBudget>(client, namespace, budget).await?;
        }
        None => {
            if let Some(name) = leftovers.disruption_budget {
                let budgets = Api::<PodDisruptionBudget>::namespaced(client.clone(), namespace);
                delete(&budgets, name).await?;
                tracing::info!(budget = %name, "Removed the PodDisruptionBudget no longer wanted");
            }
        }
    }

    let services = Api::<Service>::namespaced(client.clone(), namespace);
    let wanted: Vec<String> = pod_services.iter().map(ResourceExt::name_any).collect();
    for stale in leftovers
        .pod_services
        .iter()
        .filter(|n| !wanted.contains(n))
    {
        delete(&services, stale).await?;
        tracing::info!(service = %stale, "Removed per-pod Service");
    }
    Ok(applied)
}

/// Replaces the gateway configuration of a server that fell out of compliance with
/// `suspended`, the rendered one with a stamp that stops writes.
pub async fn suspend_writes(
    client: &Client,
    namespace: &str,
    suspended: &Secret,
) -> Result<(), Error> {
    apply_one::<Secret>(client, namespace, suspended).await?;
    tracing::info!(secret = %suspended.name_any(), "Suspended writes on the running gateway");
    Ok(())
}

/// Deletes `name`; one already gone is fine.
async fn delete<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(Error::kube(format!("delete {} {name}", K::kind(&())))(e)),
    }
}

async fn apply_one<K>(client: &Client, namespace: &str, object: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    let name = object.name_any();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&name, &params, &Patch::Apply(object))
        .await
        .map_err(Error::kube(format!("apply {} {name}", K::kind(&()))))
}
