//! `sluice check` reaches the operator's verdicts: the example manifests are applied to a
//! real control plane, the operator judges them, and every server's `ResidencyCompliant`
//! condition (status, reason and message) is what `sluice check --output json` said of it
//! beforehand; a server the check reports as invalid is stalled as `InvalidSpec`.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kube::api::DynamicObject;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use sluice::api::TransferServer;

use support::cluster::read_yaml_dir;
use support::cluster::{Operator, apply, apply_all, condition, eventually, install_crds};
use support::controlplane::ControlPlane;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_reaches_the_verdicts_sluice_check_reported_for_the_compliant_examples()
-> Result<()> {
    check_agrees_with_the_operator("examples/check/compliant").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_reaches_the_verdicts_sluice_check_reported_for_the_violation_examples()
-> Result<()> {
    check_agrees_with_the_operator("examples/check/violations").await
}

async fn check_agrees_with_the_operator(dir: &str) -> Result<()> {
    let report = sluice_check(dir)?;
    let servers = report["servers"].as_array().context("servers")?.clone();
    ensure!(servers.len() >= 5, "{report}");

    let control_plane = ControlPlane::start().await?;
    let client = control_plane.client();
    install_crds(&client).await?;
    let objects = read_yaml_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join(dir))?;
    // Credentials would let the operator probe the examples' buckets at real cloud
    // endpoints; without the Secrets it reports them missing and connects nowhere.
    ensure!(
        objects.iter().all(|o| kind(o) != "Secret"),
        "{dir} must not hold Secrets"
    );
    create_missing_namespaces(&client, &objects).await?;
    for object in &objects {
        apply(&client, object).await?;
    }
    let operator = Operator::start(client.clone());

    for expected in &servers {
        let namespace = expected["namespace"].as_str().context("namespace")?;
        let name = expected["name"].as_str().context("name")?;
        let server = judged(&client, namespace, name).await?;
        let residency = condition(&server, "ResidencyCompliant");
        match &expected["condition"] {
            Value::Null => {
                ensure!(residency.is_none(), "{namespace}/{name}: {residency:?}");
                let stalled = condition(&server, "Stalled").context("no Stalled condition")?;
                ensure!(
                    (stalled.0.as_str(), stalled.1.as_str()) == ("True", "InvalidSpec"),
                    "{namespace}/{name}: {stalled:?}"
                );
            }
            condition => {
                let (status, reason, message) =
                    residency.context(format!("{namespace}/{name}: no ResidencyCompliant"))?;
                let actual = json!({"status": status, "reason": reason, "message": message});
                ensure!(
                    actual == *condition,
                    "{namespace}/{name}: the operator says\n  {actual}\nsluice check said\n  \
                     {condition}"
                );
            }
        }
    }
    operator.stop().await
}

/// `sluice check --output json DIR`, run from the repository root.
fn sluice_check(dir: &str) -> Result<Value> {
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "--output", "json", dir])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()?;
    ensure!(
        matches!(output.status.code(), Some(0 | 1)),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

fn kind(object: &DynamicObject) -> &str {
    object.types.as_ref().map_or("", |t| t.kind.as_str())
}

/// Namespaces the manifests use without declaring them, created without labels, as
/// `sluice check` evaluates them.
async fn create_missing_namespaces(client: &Client, objects: &[DynamicObject]) -> Result<()> {
    let declared: BTreeSet<String> = objects
        .iter()
        .filter(|o| kind(o) == "Namespace")
        .map(|o| o.name_any())
        .collect();
    let used: BTreeSet<String> = objects.iter().filter_map(|o| o.namespace()).collect();
    for namespace in used.difference(&declared) {
        let object =
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
        apply_all(client, &[object]).await?;
    }
    Ok(())
}

/// The server once the operator has judged its current generation.
async fn judged(client: &Client, namespace: &str, name: &str) -> Result<TransferServer> {
    let api = Api::<TransferServer>::namespaced(client.clone(), namespace);
    eventually(&format!("{namespace}/{name} judged"), WAIT, || async {
        let server = api.get(name).await?;
        let fresh = server.status.as_ref().and_then(|s| s.observed_generation)
            == server.metadata.generation;
        let judged = condition(&server, "Ready").is_some();
        Ok((fresh && judged).then_some(server))
    })
    .await
}
