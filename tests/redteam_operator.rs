//! Red-team checks of the operator on the real local control plane: case C21 (an operator
//! restart after convergence writes nothing) for the servers the happy-path test does not
//! cover, those whose writes are suspended or that are refused, with every owned kind
//! counted (the NetworkPolicy included), across more than one periodic recheck.

mod support;

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use serde_json::{Value, json};

use support::cluster::{
    Operator, apply_all, changed_keys, install_crds, install_storage_classes, settled_state,
    volume_server, wait_server_condition, written_state,
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
    volume_server(NS, name, region, "regional")
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

    let before = settled_state(&client, NS).await?;
    let watched = [
        format!("NetworkPolicy/{NS}/suspended-gateway"),
        format!("Secret/{NS}/suspended-gateway-config"),
        format!("StatefulSet.generation/{NS}/suspended-gateway"),
        format!("TransferServer/{NS}/refused"),
        "DataResidencyPolicy//mainland".to_string(),
    ];
    for watched in &watched {
        ensure!(
            before.contains_key(watched),
            "{watched} is not watched: {before:?}"
        );
    }
    operator.stop().await?;
    let operator = Operator::start(client.clone());
    // Start-up pass plus more than one 30 s recheck.
    tokio::time::sleep(Duration::from_secs(70)).await;
    let after = written_state(&client, NS).await?;
    operator.stop().await?;

    let changed: Vec<String> = changed_keys(&before, &after)
        .into_iter()
        .map(|k| format!("{k} {:?} -> {:?}", before.get(&k), after.get(&k)))
        .collect();
    if !changed.is_empty() {
        bail!("an operator restart wrote (or created) {changed:?}");
    }
    Ok(())
}
