//! Dereference: read everything a TransferServer points at.
//!
//! Reads only; never writes. Missing referenced objects are not errors here: they are
//! recorded as `None` and judged by the validate step. Only failed API calls are errors.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    Namespace, Node, PersistentVolume, PersistentVolumeClaim, Secret, Service,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use super::names;
use crate::api::{DataResidencyPolicy, TransferServer, TransferUser};
use crate::operator::Error;
use crate::residency;

/// What a server's reconcile reads from the cluster.
pub struct ServerInputs {
    /// The server itself.
    pub server: Arc<TransferServer>,
    /// Labels of the server's namespace, for policy selection.
    pub namespace_labels: BTreeMap<String, String>,
    /// Every DataResidencyPolicy in the cluster.
    pub policies: Vec<DataResidencyPolicy>,
    /// The users that name this server, sorted by name, with their password material.
    pub users: Vec<UserInputs>,
    /// The existing host-key Secret, if any.
    pub host_keys: Option<Secret>,
    /// The existing gateway StatefulSet, for status.
    pub statefulset: Option<StatefulSet>,
    /// The existing Service, for the endpoint and its load-balancer address.
    pub service: Option<Service>,
    /// The existing per-pod Services `NAME-gateway-ORDINAL`, by ordinal up to the
    /// declared number of replicas (read only for a server whose passive FTPS range is
    /// split between pods, the only servers that want them).
    pub pod_services: Vec<Option<Service>>,
    /// Names of the per-pod Services this server owns, including any beyond the declared
    /// replicas, so that those left over from a larger scale can be removed.
    pub owned_pod_services: Vec<String>,
    /// The TLS Secret `ftps.tlsSecretRef` names: `None` without FTPS, `Some(None)` when
    /// it does not exist.
    pub tls_secret: Option<Option<Secret>>,
    /// The object store's credentials Secret: `None` without one, `Some(None)` when it
    /// does not exist.
    pub storage_secret: Option<Option<Secret>>,
    /// The name of a gateway Deployment this server owns, which versions before the
    /// StatefulSet rendered.
    pub legacy_deployment: Option<String>,
    /// The name of the NetworkPolicy this server owns, if any.
    pub network_policy: Option<String>,
    /// The name of the PodDisruptionBudget this server owns, if any (it is removed when
    /// no longer wanted).
    pub owned_disruption_budget: Option<String>,
    /// The gateway-config Secret rendered before, if any: a gateway that falls out of
    /// compliance gets its residency stamp changed in it, not a new configuration.
    pub gateway_config: Option<Secret>,
    /// Where the server's volume lies, when it keeps files on one.
    pub volume: Option<VolumeInputs>,
    /// Whether some node carries the server's region under every label the governing
    /// policies pin it by.
    pub nodes_in_region: bool,
    /// Metadata of every object that already has one of the names this server's owned
    /// objects take, as `(kind, metadata)`, so validation can refuse to take over
    /// objects that belong to someone else.
    pub existing: Vec<(&'static str, ObjectMeta)>,
}

/// What the cluster says about where a server's volume is.
pub struct VolumeInputs {
    /// The StorageClass the volume is claimed from, `None` when it does not exist.
    pub storage_class: Option<StorageClass>,
    /// The PersistentVolume bound to the server's claim, once bound.
    pub bound: Option<PersistentVolume>,
    /// Labels of the nodes in the zones the bound volume names, to find their regions
    /// when it names no region itself.
    pub zone_nodes: Vec<BTreeMap<String, String>>,
}

/// One user and the Secret its password comes from.
pub struct UserInputs {
    /// The user.
    pub user: TransferUser,
    /// The Secret named by `passwordSecretRef`: `None` when the user names none,
    /// `Some(None)` when it is missing.
    pub password_secret: Option<Option<Secret>>,
}

/// Reads the inputs of `server`'s reconcile.
pub async fn dereference(
    client: &Client,
    server: Arc<TransferServer>,
) -> Result<ServerInputs, Error> {
    let namespace = server.namespace().unwrap_or_default();
    let name = server.name_any();

    let namespace_labels = Api::<Namespace>::all(client.clone())
        .get(&namespace)
        .await
        .map_err(Error::kube("read Namespace"))?
        .metadata
        .labels
        .unwrap_or_default();
    let policies = Api::<DataResidencyPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list DataResidencyPolicies"))?
        .items;
    let users = users_of(client, &namespace, &name).await?;

    let secrets = Api::<Secret>::namespaced(client.clone(), &namespace);
    let host_keys = secrets
        .get_opt(&names::host_keys(&name))
        .await
        .map_err(Error::kube("read host-key Secret"))?;
    let statefulset = Api::<StatefulSet>::namespaced(client.clone(), &namespace)
        .get_opt(&names::statefulset(&name))
        .await
        .map_err(Error::kube("read gateway StatefulSet"))?;
    let services = Api::<Service>::namespaced(client.clone(), &namespace);
    let service = services
        .get_opt(&names::service(&name))
        .await
        .map_err(Error::kube("read gateway Service"))?;
    let ftps = server.spec.protocols.ftps.as_ref();
    let mut pod_services = Vec::new();
    if super::ftps::splits_passive_range(&server) {
        let replicas = usize::try_from(server.spec.replicas.unwrap_or(1)).unwrap_or(0);
        for ordinal in 0..replicas {
            let pod_service = services
                .get_opt(&names::pod(&name, ordinal))
                .await
                .map_err(Error::kube("read per-pod Service"))?;
            pod_services.push(pod_service);
        }
    }
    let owned_pod_services = owned_pod_services(&services, &server).await?;
    let legacy_deployment = Api::<Deployment>::namespaced(client.clone(), &namespace)
        .get_metadata_opt(&names::statefulset(&name))
        .await
        .map_err(Error::kube("read legacy gateway Deployment"))?
        .filter(|d| controlled_by(&d.metadata, &server))
        .map(|d| d.name_any());
    let tls_secret = match ftps {
        Some(ftps) => Some(
            secrets
                .get_opt(&ftps.tls_secret_ref.name)
                .await
                .map_err(Error::kube("read TLS Secret"))?,
        ),
        None => None,
    };
    let storage_secret = match storage_secret_name(&server) {
        Some(name) => Some(
            secrets
                .get_opt(name)
                .await
                .map_err(Error::kube("read storage credentials Secret"))?,
        ),
        None => None,
    };
    let disruption_budget = Api::<PodDisruptionBudget>::namespaced(client.clone(), &namespace)
        .get_metadata_opt(&names::disruption_budget(&name))
        .await
        .map_err(Error::kube("read PodDisruptionBudget"))?;
    let owned_disruption_budget = disruption_budget
        .as_ref()
        .filter(|b| controlled_by(&b.metadata, &server))
        .map(|b| b.name_any());
    let gateway_config = secrets
        .get_opt(&names::gateway_config(&name))
        .await
        .map_err(Error::kube("read gateway-config Secret"))?;
    let volume_claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &namespace)
        .get_opt(&names::volume_claim(&name))
        .await
        .map_err(Error::kube("read PersistentVolumeClaim"))?;
    let volume = match &server.spec.storage.volume {
        Some(spec) => {
            let claimed = volume_claim
                .as_ref()
                .filter(|c| controlled_by(&c.metadata, &server));
            Some(volume_inputs(client, &spec.storage_class_name, claimed).await?)
        }
        None => None,
    };
    let nodes_in_region = nodes_in_region(client, &server, &policies, &namespace_labels).await?;
    let network_policy_meta = Api::<NetworkPolicy>::namespaced(client.clone(), &namespace)
        .get_metadata_opt(&names::network_policy(&name))
        .await
        .map_err(Error::kube("read gateway NetworkPolicy"))?;
    let network_policy = network_policy_meta
        .as_ref()
        .filter(|p| controlled_by(&p.metadata, &server))
        .map(|p| p.name_any());
    let existing = [
        ("Secret", host_keys.as_ref().map(|o| o.metadata.clone())),
        (
            "Secret",
            gateway_config.as_ref().map(|o| o.metadata.clone()),
        ),
        ("PersistentVolumeClaim", volume_claim.map(|o| o.metadata)),
        (
            "StatefulSet",
            statefulset.as_ref().map(|o| o.metadata.clone()),
        ),
        ("Service", service.as_ref().map(|o| o.metadata.clone())),
        ("NetworkPolicy", network_policy_meta.map(|o| o.metadata)),
        ("PodDisruptionBudget", disruption_budget.map(|o| o.metadata)),
    ]
    .into_iter()
    .chain(
        pod_services
            .iter()
            .map(|s| ("Service", s.as_ref().map(|s| s.metadata.clone()))),
    )
    .filter_map(|(kind, meta)| Some((kind, meta?)))
    .collect();

    Ok(ServerInputs {
        server,
        namespace_labels,
        policies,
        users,
        host_keys,
        statefulset,
        service,
        pod_services,
        owned_pod_services,
        tls_secret,
        storage_secret,
        legacy_deployment,
        network_policy,
        owned_disruption_budget,
        gateway_config,
        volume,
        nodes_in_region,
        existing,
    })
}

/// Reads the StorageClass, the bound PersistentVolume and, for a volume that names only
/// zones, the nodes in those zones.
async fn volume_inputs(
    client: &Client,
    storage_class: &str,
    claim: Option<&PersistentVolumeClaim>,
) -> Result<VolumeInputs, Error> {
    let storage_class = Api::<StorageClass>::all(client.clone())
        .get_opt(storage_class)
        .await
        .map_err(Error::kube("read StorageClass"))?;
    let bound_name = claim
        .and_then(|c| c.spec.as_ref())
        .and_then(|s| s.volume_name.clone())
        .filter(|n| !n.is_empty());
    let bound = match bound_name {
        Some(name) => Api::<PersistentVolume>::all(client.clone())
            .get_opt(&name)
            .await
            .map_err(Error::kube("read bound PersistentVolume"))?,
        None => None,
    };
    let zone_nodes = match &bound {
        Some(volume) => zone_nodes(client, volume).await?,
        None => Vec::new(),
    };
    Ok(VolumeInputs {
        storage_class,
        bound,
        zone_nodes,
    })
}

/// Labels of the nodes in the zones `volume`'s required node affinity names (none when
/// it names no zone), to find the regions of a volume that names only zones.
pub async fn zone_nodes(
    client: &Client,
    volume: &PersistentVolume,
) -> Result<Vec<BTreeMap<String, String>>, Error> {
    let zones = volume_zones(volume);
    if zones.is_empty() {
        return Ok(Vec::new());
    }
    let selector = format!("{} in ({})", residency::ZONE_LABEL, zones.join(","));
    Ok(Api::<Node>::all(client.clone())
        .list_metadata(&ListParams::default().labels(&selector))
        .await
        .map_err(Error::kube("list Nodes in the volume's zones"))?
        .items
        .into_iter()
        .map(|n| n.metadata.labels.unwrap_or_default())
        .collect())
}

/// The zones a PersistentVolume's required node affinity names.
fn volume_zones(volume: &PersistentVolume) -> Vec<String> {
    let mut zones: Vec<String> = volume
        .spec
        .iter()
        .filter_map(|s| s.node_affinity.as_ref()?.required.as_ref())
        .flat_map(|r| r.node_selector_terms.iter())
        .flat_map(|t| t.match_expressions.iter().flatten())
        .filter(|e| e.key == residency::ZONE_LABEL && e.operator == "In")
        .flat_map(|e| e.values.iter().flatten().cloned())
        .collect();
    zones.sort();
    zones.dedup();
    zones
}

/// Whether some node carries the server's region under every label the governing
/// policies pin it by (one node is enough, so the question lists at most one).
async fn nodes_in_region(
    client: &Client,
    server: &TransferServer,
    policies: &[DataResidencyPolicy],
    namespace_labels: &BTreeMap<String, String>,
) -> Result<bool, Error> {
    let labels = residency::region_labels_of(policies, namespace_labels, server.labels());
    let selector: Vec<String> = labels
        .iter()
        .map(|label| format!("{label}={}", server.spec.region))
        .collect();
    let found = Api::<Node>::all(client.clone())
        .list_metadata(&ListParams::default().labels(&selector.join(",")).limit(1))
        .await
        .map_err(Error::kube("list Nodes in the region"))?;
    Ok(!found.items.is_empty())
}

/// The Secret holding the object store's credentials, if the server names one.
pub fn storage_secret_name(server: &TransferServer) -> Option<&str> {
    let store = server.spec.storage.object_store.as_ref()?;
    store
        .credentials
        .secret_ref
        .as_ref()
        .map(|r| r.name.as_str())
}

/// Whether `server` is the controller of the object with `meta`.
fn controlled_by(meta: &ObjectMeta, server: &TransferServer) -> bool {
    let uid = server.uid();
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref())
}

/// Names of the per-pod Services that `server` controls.
async fn owned_pod_services(
    services: &Api<Service>,
    server: &TransferServer,
) -> Result<Vec<String>, Error> {
    let name = server.name_any();
    let selector = format!("app.kubernetes.io/instance={name},app.kubernetes.io/managed-by=sluice");
    let prefix = format!("{}-", names::statefulset(&name));
    let mut owned: Vec<String> = services
        .list_metadata(&ListParams::default().labels(&selector))
        .await
        .map_err(Error::kube("list gateway Services"))?
        .items
        .into_iter()
        .filter(|s| {
            let controlled = controlled_by(&s.metadata, server);
            let numbered = s.name_any().strip_prefix(&prefix).is_some_and(|ordinal| {
                !ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit())
            });
            controlled && numbered
        })
        .map(|s| s.name_any())
        .collect();
    owned.sort();
    Ok(owned)
}

async fn users_of(
    client: &Client,
    namespace: &str,
    server: &str,
) -> Result<Vec<UserInputs>, Error> {
    let mut users: Vec<TransferUser> = Api::<TransferUser>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list TransferUsers"))?
        .items
        .into_iter()
        .filter(|u| u.spec.server_ref.name == server && u.metadata.deletion_timestamp.is_none())
        .collect();
    users.sort_by_key(|u| u.name_any());

    let mut inputs = Vec::with_capacity(users.len());
    for user in users {
        let password_secret = password_secret(client, &user).await?;
        inputs.push(UserInputs {
            user,
            password_secret,
        });
    }
    Ok(inputs)
}

/// Reads the Secret a user's `passwordSecretRef` names: `None` when it names none,
/// `Some(None)` when the Secret does not exist.
pub async fn password_secret(
    client: &Client,
    user: &TransferUser,
) -> Result<Option<Option<Secret>>, Error> {
    let Some(reference) = &user.spec.password_secret_ref else {
        return Ok(None);
    };
    let namespace = user.namespace().unwrap_or_default();
    let secret = Api::<Secret>::namespaced(client.clone(), &namespace)
        .get_opt(&reference.name)
        .await
        .map_err(Error::kube("read password Secret"))?;
    Ok(Some(secret))
}
