//! Dereference: read everything a TransferServer points at.
//!
//! Reads only; never writes. Missing referenced objects are not errors here: they are
//! recorded as `None` and judged by the validate step. Only failed API calls are errors.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use super::names;
use crate::api::{DataResidencyPolicy, TransferServer, TransferUser};
use crate::operator::Error;

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
    /// Metadata of every object that already has one of the names this server's owned
    /// objects take, as `(kind, metadata)`, so validation can refuse to take over
    /// objects that belong to someone else.
    pub existing: Vec<(&'static str, ObjectMeta)>,
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
    let config = secrets
        .get_metadata_opt(&names::gateway_config(&name))
        .await
        .map_err(Error::kube("read gateway-config Secret"))?;
    let volume_claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &namespace)
        .get_metadata_opt(&names::volume_claim(&name))
        .await
        .map_err(Error::kube("read PersistentVolumeClaim"))?;
    let existing = [
        ("Secret", host_keys.as_ref().map(|o| o.metadata.clone())),
        ("Secret", config.map(|o| o.metadata)),
        ("PersistentVolumeClaim", volume_claim.map(|o| o.metadata)),
        (
            "StatefulSet",
            statefulset.as_ref().map(|o| o.metadata.clone()),
        ),
        ("Service", service.as_ref().map(|o| o.metadata.clone())),
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
        existing,
    })
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
