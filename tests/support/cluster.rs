//! Cluster-side helpers for end-to-end tests: applying YAML, installing the CRDs,
//! running the operator in-process and waiting for conditions.

#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use kube::{Api, Client, ResourceExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Field manager of everything the tests apply, distinct from the operator's.
pub const TEST_MANAGER: &str = "sluice-e2e";

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last_error = Some(error),
        }
        if Instant::now() > deadline {
            match last_error {
                Some(error) => bail!("timed out waiting for {what}; last error: {error:#}"),
                None => bail!("timed out waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Moves the TransferServer `name`'s SFTP port to `port` and waits until the operator has
/// rolled that out: the Service listens on it and the status has seen the generation.
pub async fn move_sftp_port(
    client: &Client,
    namespace: &str,
    name: &str,
    port: i32,
    timeout: Duration,
) -> Result<()> {
    use k8s_openapi::api::core::v1::Service;
    use sluice::api::TransferServer;
    let servers = Api::<TransferServer>::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({"spec": {"protocols": {"sftp": {"port": port}}}});
    let params = PatchParams {
        field_manager: Some(TEST_MANAGER.into()),
        ..PatchParams::default()
    };
    servers.patch(name, &params, &Patch::Merge(&patch)).await?;
    let services = Api::<Service>::namespaced(client.clone(), namespace);
    eventually(&format!("the Service on port {port}"), timeout, || async {
        let service = services.get(name).await?;
        let ports = service.spec.and_then(|s| s.ports).unwrap_or_default();
        let server = servers.get(name).await?;
        let observed = server.status.and_then(|s| s.observed_generation);
        let moved = ports.iter().any(|p| p.port == port);
        Ok((moved && observed == server.metadata.generation).then_some(()))
    })
    .await
}

/// Parses a multi-document YAML stream into objects.
pub fn parse_yaml(yaml: &str) -> Result<Vec<DynamicObject>> {
    use serde::Deserialize;
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(document)?;
        if value.is_null() {
            continue;
        }
        objects.push(serde_yaml::from_value(value)?);
    }
    Ok(objects)
}

/// Reads every `*.yaml` file of a directory, in name order.
pub fn read_yaml_dir(dir: &Path) -> Result<Vec<DynamicObject>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    paths.sort();
    let mut objects = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        objects.extend(parse_yaml(&text).with_context(|| format!("{}", path.display()))?);
    }
    Ok(objects)
}

/// Server-side applies `object` as [`TEST_MANAGER`], discovering its resource.
pub async fn apply(client: &Client, object: &DynamicObject) -> Result<DynamicObject> {
    let types = object
        .types
        .as_ref()
        .context("object without apiVersion/kind")?;
    let gvk = GroupVersionKind::try_from(types)?;
    let (resource, capabilities) = discovery::pinned_kind(client, &gvk).await?;
    let api: Api<DynamicObject> = match (capabilities.scope, object.namespace()) {
        (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), &ns, &resource),
        (Scope::Namespaced, None) => Api::default_namespaced_with(client.clone(), &resource),
        (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
    };
    let params = PatchParams::apply(TEST_MANAGER).force();
    api.patch(&object.name_any(), &params, &Patch::Apply(object))
        .await
        .with_context(|| format!("cannot apply {} {}", gvk.kind, object.name_any()))
}

/// Applies each object, given as JSON, in order.
pub async fn apply_all(client: &Client, objects: &[serde_json::Value]) -> Result<()> {
    for object in objects {
        apply(client, &serde_json::from_value(object.clone())?).await?;
    }
    Ok(())
}

/// Applies `object` and checks that the API server refuses it with `needle` in the error.
pub async fn refused(client: &Client, object: serde_json::Value, needle: &str) -> Result<()> {
    let Err(error) = apply_all(client, &[object]).await else {
        bail!("an object that should be refused ({needle}) was accepted");
    };
    anyhow::ensure!(format!("{error:#}").contains(needle), "{error:#}");
    Ok(())
}

/// `(status, reason, message)` of a server's condition `type_`.
pub fn condition(
    server: &sluice::api::TransferServer,
    type_: &str,
) -> Option<(String, String, String)> {
    let status = server.status.as_ref()?;
    let c = status.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until the TransferServer `namespace/name` reports condition `type_` with
/// `status` for its current generation, and returns it.
pub async fn wait_server_condition(
    client: &Client,
    namespace: &str,
    name: &str,
    type_: &str,
    status: &str,
) -> Result<sluice::api::TransferServer> {
    let api = Api::<sluice::api::TransferServer>::namespaced(client.clone(), namespace);
    eventually(
        &format!("{name} {type_}={status}"),
        Duration::from_secs(60),
        || async {
            let server = api.get(name).await?;
            let fresh = server.status.as_ref().and_then(|s| s.observed_generation)
                == server.metadata.generation;
            let matches = condition(&server, type_).is_some_and(|c| c.0 == status);
            Ok((fresh && matches).then_some(server))
        },
    )
    .await
}

/// Applies the committed CRDs from `crds/` and waits until they are established.
pub async fn install_crds(client: &Client) -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for object in read_yaml_dir(&dir)? {
        apply(client, &object).await?;
        let name = object.name_any();
        eventually(
            &format!("CRD {name} established"),
            Duration::from_secs(30),
            || {
                let crds = crds.clone();
                let name = name.clone();
                async move {
                    let crd = crds.get(&name).await?;
                    let established = crd
                        .status
                        .and_then(|s| s.conditions)
                        .into_iter()
                        .flatten()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    Ok(established.then_some(()))
                }
            },
        )
        .await?;
    }
    Ok(())
}

/// Creates StorageClasses `names` as a region-pinned cluster would have them: volumes
/// bound only once the (region-pinned) pod is scheduled. Nothing provisions them; the
/// stand-in kubelet mounts a directory instead.
pub async fn install_storage_classes(client: &Client, names: &[&str]) -> Result<()> {
    for name in names {
        apply(client, &serde_json::from_value(storage_class(name))?).await?;
    }
    Ok(())
}

/// The operator running in-process, as `sluice operator` would.
pub struct Operator {
    context: std::sync::Arc<sluice::operator::Context>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Operator {
    /// Starts the operator's controllers with `client`.
    pub fn start(client: Client) -> Self {
        Self::start_with(client, sluice::operator::OperatorArgs::local())
    }

    /// Starts the operator's controllers with `client` and `args` (metrics must bind
    /// 127.0.0.1).
    pub fn start_with(client: Client, args: sluice::operator::OperatorArgs) -> Self {
        let context = sluice::operator::Context::new(client, args);
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(sluice::operator::run_with(context.clone(), shutdown));
        Self {
            context,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Where the operator serves `/metrics`, `/healthz` and `/readyz`, once it does.
    pub async fn metrics_addr(&self) -> Result<std::net::SocketAddr> {
        eventually("the metrics listener", Duration::from_secs(10), || async {
            Ok(self.context.metrics_addr())
        })
        .await
    }

    /// Waits until each of `controllers` (`server`, `user`, `policy`) has finished a
    /// reconcile successfully: after a start, the first pass over what they list.
    pub async fn first_pass_done(&self, controllers: &[&str]) -> Result<()> {
        let metrics = self.metrics_addr().await?;
        eventually(
            "the operator's first pass",
            Duration::from_secs(60),
            || async {
                let (_, exposition) = super::http::get(metrics, "/metrics").await?;
                let done = controllers.iter().all(|controller| {
                    let labels = format!(r#"controller="{controller}",result="success""#);
                    super::http::sample(&exposition, "sluice_reconciles_total", &labels)
                        .is_some_and(|count| count >= 1.0)
                });
                Ok(done.then_some(()))
            },
        )
        .await
    }

    /// Stops the controllers and waits for them to finish.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task).await???;
        }
        Ok(())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Waits for a Warning Event with `reason` about the object `name` in `namespace` and
/// returns its message.
pub async fn warning_event(
    client: &Client,
    namespace: &str,
    name: &str,
    reason: &str,
    timeout: Duration,
) -> Result<String> {
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), namespace);
    let what = format!("a Warning Event {reason} for {name}");
    eventually(&what, timeout, || async {
        let list = events.list(&kube::api::ListParams::default()).await?;
        Ok(list.items.into_iter().find_map(|e| {
            let matches = e.involved_object.name.as_deref() == Some(name)
                && e.type_.as_deref() == Some("Warning")
                && e.reason.as_deref() == Some(reason);
            matches.then(|| e.message.unwrap_or_default())
        }))
    })
    .await
}

/// What the operator writes in `namespace` and cluster-wide, as
/// `Kind/namespace/name -> resourceVersion` (the StatefulSets' generations, since their
/// status is the statefulset controller's, and the operator's own managed fields of the
/// PVCs), plus its Events with the instance that published them: equal before and after
/// means the operator wrote nothing.
pub async fn written_state(
    client: &Client,
    namespace: &str,
) -> Result<std::collections::BTreeMap<String, String>> {
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret, Service};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use sluice::api::{DataResidencyPolicy, TransferServer, TransferUser};

    let mut state = std::collections::BTreeMap::new();
    let ns = namespace;
    record(
        &mut state,
        Api::<TransferServer>::namespaced(client.clone(), ns),
    )
    .await?;
    record(
        &mut state,
        Api::<TransferUser>::namespaced(client.clone(), ns),
    )
    .await?;
    record(&mut state, Api::<DataResidencyPolicy>::all(client.clone())).await?;
    record(&mut state, Api::<Secret>::namespaced(client.clone(), ns)).await?;
    record(&mut state, Api::<Service>::namespaced(client.clone(), ns)).await?;
    // The PVCs' own writes by the operator: the PV controller binds them (status and
    // annotations) whenever it gets to it, also while the operator restarts.
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns);
    for claim in claims.list(&kube::api::ListParams::default()).await? {
        let key = format!("PersistentVolumeClaim.sluice/{ns}/{}", claim.name_any());
        state.insert(key, operator_writes(&claim.metadata));
    }
    record(
        &mut state,
        Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
    )
    .await?;
    record(
        &mut state,
        Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(client.clone(), ns),
    )
    .await?;
    // The operator's Events only: the controller-manager's come and go on their own.
    let events = Api::<k8s_openapi::api::events::v1::Event>::all(client.clone());
    for event in events.list(&kube::api::ListParams::default()).await? {
        if event.reporting_controller.as_deref() == Some("sluice.dev/operator") {
            let instance = event.reporting_instance.clone().unwrap_or_default();
            state.insert(format!("Event/{}", event.name_any()), instance);
        }
    }
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), ns);
    for statefulset in statefulsets.list(&kube::api::ListParams::default()).await? {
        let generation = statefulset.metadata.generation.unwrap_or_default();
        let key = format!("StatefulSet.generation/{ns}/{}", statefulset.name_any());
        state.insert(key, generation.to_string());
    }
    Ok(state)
}

async fn record<K>(
    state: &mut std::collections::BTreeMap<String, String>,
    api: Api<K>,
) -> Result<()>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    for object in api.list(&kube::api::ListParams::default()).await? {
        let key = format!(
            "{}/{}/{}",
            K::kind(&()),
            object.namespace().unwrap_or_default(),
            object.name_any()
        );
        state.insert(key, object.resource_version().unwrap_or_default());
    }
    Ok(())
}

/// [`written_state`] once it has stayed the same for 3 s (within 60 s): the state to
/// compare a later one with, after the operator's last reactions to what other
/// controllers did (the StatefulSet controller's status, the PVC protection finalizer).
pub async fn settled_state(
    client: &Client,
    namespace: &str,
) -> Result<std::collections::BTreeMap<String, String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = written_state(client, namespace).await?;
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = written_state(client, namespace).await?;
        if now == last {
            return Ok(now);
        }
        if Instant::now() > deadline {
            bail!("still writing after 60 s: {:?}", changed_keys(&last, &now));
        }
        last = now;
    }
}

/// The operator's entries in `metadata.managedFields` (manager `sluice`): what it last
/// wrote of the object, and when, to the second.
fn operator_writes(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> String {
    let entries: Vec<String> = metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|entry| entry.manager.as_deref() == Some(sluice::operator::FIELD_MANAGER))
        .map(|entry| {
            format!(
                "{:?} {:?} {:?} {}",
                entry.operation,
                entry.subresource,
                entry.time,
                serde_json::to_string(&entry.fields_v1).unwrap_or_default()
            )
        })
        .collect();
    entries.join("; ")
}

/// The keys whose values differ between `before` and `after`, or are in only one.
pub fn changed_keys(
    before: &std::collections::BTreeMap<String, String>,
    after: &std::collections::BTreeMap<String, String>,
) -> Vec<String> {
    let mut keys: Vec<String> = before
        .keys()
        .chain(after.keys())
        .filter(|key| before.get(*key) != after.get(*key))
        .cloned()
        .collect();
    keys.dedup();
    keys.sort();
    keys.dedup();
    keys
}

/// A StorageClass `name` whose volumes are provisioned where the (region-pinned) pod is
/// scheduled, which residency policies accept.
pub fn storage_class(name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name},
        "provisioner": "example.com/none",
        "volumeBindingMode": "WaitForFirstConsumer",
    })
}

/// The StorageClass `ssd` ([`storage_class`]), and the policy `mainland` that allows
/// `cn-shanghai` to namespaces labelled `sluice.dev/residency: cn`.
pub fn mainland_policy() -> Vec<serde_json::Value> {
    vec![
        storage_class("ssd"),
        serde_json::json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "DataResidencyPolicy",
            "metadata": {"name": "mainland"},
            "spec": {
                "namespaceSelector": {"matchLabels": {"sluice.dev/residency": "cn"}},
                "allowedRegions": ["cn-shanghai"],
                "enforcement": "Enforce",
            },
        }),
    ]
}

/// An SFTP TransferServer `name` in `region` on a 1 GiB volume of `storage_class`.
pub fn volume_server(
    namespace: &str,
    name: &str,
    region: &str,
    storage_class: &str,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "TransferServer",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "region": region,
            "protocols": {"sftp": {}},
            "storage": {"volume": {"storageClassName": storage_class, "size": "1Gi"}},
        },
    })
}

/// Namespace `namespace` under [`mainland_policy`], an SFTP server `files` there with
/// `replicas` pods on an `ssd` volume, and its user `alice` with a password Secret.
pub fn sftp_server(namespace: &str, replicas: i32) -> Vec<serde_json::Value> {
    vec![
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": namespace, "labels": {"sluice.dev/residency": "cn"}},
        }),
        serde_json::json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "TransferServer",
            "metadata": {"name": "files", "namespace": namespace},
            "spec": {
                "region": "cn-shanghai",
                "replicas": replicas,
                "protocols": {"sftp": {}},
                "storage": {"volume": {"storageClassName": "ssd", "size": "1Gi"}},
            },
        }),
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "alice-password", "namespace": namespace},
            "stringData": {"password": "correct horse"},
        }),
        serde_json::json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "TransferUser",
            "metadata": {"name": "alice", "namespace": namespace},
            "spec": {
                "serverRef": {"name": "files"},
                "passwordSecretRef": {"name": "alice-password", "key": "password"},
                "homeDirectory": "/alice",
                "permissions": ["list", "read", "write"],
            },
        }),
    ]
}

/// Waits until server `files` and user `alice` in `namespace` report their current
/// generation, the server with one user.
pub async fn sftp_server_converged(client: &Client, namespace: &str) -> Result<()> {
    let servers = Api::<sluice::api::TransferServer>::namespaced(client.clone(), namespace);
    let users = Api::<sluice::api::TransferUser>::namespaced(client.clone(), namespace);
    eventually(
        "server and user reconciled",
        Duration::from_secs(60),
        || async {
            let server = servers.get("files").await?;
            let user = users.get("alice").await?;
            let server_done = server.status.as_ref().is_some_and(|s| {
                s.observed_generation == server.metadata.generation && s.users == Some(1)
            });
            let user_done = user
                .status
                .as_ref()
                .is_some_and(|s| s.observed_generation == user.metadata.generation);
            Ok((server_done && user_done).then_some(()))
        },
    )
    .await
}

/// The gateway configuration (`config.json` of Secret `SERVER-gateway-config`) the
/// operator wrote for `server`.
pub async fn gateway_config(
    client: &Client,
    namespace: &str,
    server: &str,
) -> Result<sluice::gateway::config::GatewayConfig> {
    let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), namespace)
        .get(&format!("{server}-gateway-config"))
        .await?;
    let json = secret
        .data
        .as_ref()
        .and_then(|d| d.get("config.json"))
        .context("the gateway configuration Secret has no config.json")?;
    Ok(serde_json::from_slice(&json.0)?)
}

/// Waits until the gateway configuration of `server` names exactly `users` (in any
/// order), and returns that configuration.
///
/// A pod mounts the configuration of the moment it starts, and a TransferUser applied in
/// the same batch as its server can reach the configuration one reconcile after the
/// StatefulSet exists; so a test that logs in right after its pod starts calls this
/// first (the fake kubelet, unlike the real one, does not refresh Secret volumes by
/// itself: see `RunningPod::sync_secrets`).
pub async fn wait_for_gateway_users(
    client: &Client,
    namespace: &str,
    server: &str,
    users: &[&str],
) -> Result<sluice::gateway::config::GatewayConfig> {
    let what = format!("users {users:?} in the configuration of {namespace}/{server}");
    let mut wanted = users.to_vec();
    wanted.sort_unstable();
    eventually(&what, Duration::from_secs(60), || async {
        let Ok(config) = gateway_config(client, namespace, server).await else {
            return Ok(None);
        };
        let mut names: Vec<&str> = config.users.iter().map(|u| u.name.as_str()).collect();
        names.sort_unstable();
        Ok((names == wanted).then_some(config))
    })
    .await
}

/// Waits until policy `mainland` reports governing `count` servers.
pub async fn policy_governs(client: &Client, count: i32) -> Result<()> {
    let policies = Api::<sluice::api::DataResidencyPolicy>::all(client.clone());
    let what = format!("the policy governing {count} servers");
    eventually(&what, Duration::from_secs(60), || async {
        let policy = policies.get("mainland").await?;
        let governed = policy.status.and_then(|s| s.governed_servers);
        Ok((governed == Some(count)).then_some(()))
    })
    .await
}
