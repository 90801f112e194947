//! Red-team checks of the operator on the real local control plane: case C21 (an operator
//! restart after convergence writes nothing) for the servers the happy-path test does not
//! cover, those whose writes are suspended or that are refused, with every owned kind
//! counted (the NetworkPolicy included), across more than one periodic recheck.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use sluice::api::{DataResidencyPolicy, TransferServer};

use support::cluster::{
    Operator, apply_all, install_crds, install_storage_classes, wait_server_condition,
};
use support::controlplane::ControlPlane;
use support::kubelet::FakeKubelet;

const NS: &str = "churn";
const REGION_LABEL: &str = "topology.kubernetes.io/region";

fn policy(spec: Value) -> Value {
    let mut full = json!({
        "namespaceSelector": {"matchLabels": {"sluice.dev/residency": "cn"}},
        "enforcement": "Enforce",
    });
    for (key, value) in spec.as_object().expect("an object") {
        full[key] = value.clone();
    }
    json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "DataResidencyPolicy",
           "metadata": {"name": "mainland"}, "spec": full})
}

fn server(name: &str, region: &str) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "TransferServer",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "region": region,
            "protocols": {"sftp": {}},
            "storage": {"volume": {"storageClassName": "regional", "size": "1Gi"}},
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_restart_writes_nothing_for_suspended_and_refused_servers() -> Result<()> {
    let control_plane = ControlPlane::start().await?;
    let client = control_plane.client();
    install_crds(&client).await?;
    install_storage_classes(&client, &["regional"]).await?;
    let _kubelet = FakeKubelet::register(
        client.clone(),
        "node-sh-1",
        &[(REGION_LABEL, "cn-shanghai")],
    )
    .await?;
    let operator = Operator::start(client.clone());
    apply_all(
        &client,
        &[
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": NS, "labels": {"sluice.dev/residency": "cn"}}}),
            policy(json!({"jurisdictions": ["CN"]})),
            server("suspended", "cn-shanghai"),
            server("refused", "ap-east-1"),
        ],
    )
    .await?;
    wait_server_condition(&client, NS, "suspended", "ResidencyCompliant", "True").await?;
    wait_server_condition(&client, NS, "refused", "Stalled", "True").await?;
    // The policy narrows under the rolled-out server: its writes are suspended.
    apply_all(
        &client,
        &[policy(json!({"allowedRegions": ["cn-beijing"]}))],
    )
    .await?;
    wait_server_condition(&client, NS, "suspended", "Stalled", "True").await?;
    // Let the controllers settle (events, the policy status, the 30 s rechecks).
    tokio::time::sleep(Duration::from_secs(40)).await;

    let before = resource_versions(&client).await?;
    for watched in [
        "NetworkPolicy/suspended-gateway",
        "Secret/suspended-gateway-config",
        "StatefulSet.generation/suspended-gateway",
        "TransferServer/refused",
        "DataResidencyPolicy/mainland",
    ] {
        ensure!(
            before.contains_key(watched),
            "{watched} is not watched: {before:?}"
        );
    }
    operator.stop().await?;
    let operator = Operator::start(client.clone());
    // Start-up pass plus more than one 30 s recheck.
    tokio::time::sleep(Duration::from_secs(70)).await;
    let after = resource_versions(&client).await?;
    operator.stop().await?;

    let changed: Vec<String> = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(v))
        .map(|(k, v)| format!("{k} {v} -> {:?}", after.get(k)))
        .collect();
    let appeared: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    if !changed.is_empty() || !appeared.is_empty() {
        bail!("an operator restart wrote to {changed:?}, created {appeared:?}");
    }
    Ok(())
}

async fn resource_versions(client: &Client) -> Result<BTreeMap<String, String>> {
    let mut versions = BTreeMap::new();
    record(
        &mut versions,
        Api::<TransferServer>::namespaced(client.clone(), NS),
    )
    .await?;
    record(
        &mut versions,
        Api::<DataResidencyPolicy>::all(client.clone()),
    )
    .await?;
    record(&mut versions, Api::<Secret>::namespaced(client.clone(), NS)).await?;
    record(
        &mut versions,
        Api::<Service>::namespaced(client.clone(), NS),
    )
    .await?;
    record(
        &mut versions,
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), NS),
    )
    .await?;
    record(
        &mut versions,
        Api::<NetworkPolicy>::namespaced(client.clone(), NS),
    )
    .await?;
    for o in Api::<StatefulSet>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await?
    {
        let generation = o.metadata.generation.map(|g| g.to_string());
        versions.insert(
            format!("StatefulSet.generation/{}", o.name_any()),
            generation.unwrap_or_default(),
        );
    }
    Ok(versions)
}

async fn record<K>(versions: &mut BTreeMap<String, String>, api: Api<K>) -> Result<()>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    for o in api.list(&ListParams::default()).await? {
        let key = format!("{}/{}", K::kind(&()), o.name_any());
        versions.insert(key, o.resource_version().unwrap_or_default());
    }
    Ok(())
}
