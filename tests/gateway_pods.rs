//! What the operator renders for the gateway pods, checked on a real control plane:
//! resources as the spec gives them (admission refuses requests above limits), probes on
//! the health port only, a termination grace period that outlasts the gateway's own, the
//! restricted security context, and a PodDisruptionBudget that exists only with several
//! replicas. Quantities written in a non-canonical form (`1000m`, `0.25Gi`) are stored in
//! canonical form by the API server, and an operator restart still writes nothing (C21).

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Container;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use sluice::api::TransferServer;

use support::cluster::{
    Operator, TEST_MANAGER, apply_all, changed_keys, eventually, install_crds, mainland_policy,
    refused, settled_state, sftp_server, sftp_server_converged, written_state,
};
use support::controlplane::ControlPlane;

const NS: &str = "pods";
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_pods_get_resources_health_probes_a_grace_period_and_a_disruption_budget()
-> Result<()> {
    let control_plane = ControlPlane::start().await?;
    let client = control_plane.client();
    install_crds(&client).await?;
    apply_all(&client, &mainland_policy()).await?;
    requests_above_limits_are_refused_at_admission(&client).await?;

    apply_all(&client, &fixtures()).await?;
    let operator = Operator::start(client.clone());
    sftp_server_converged(&client, NS).await?;
    the_statefulset_renders_the_spec(&client).await?;
    the_budget_allows_one_pod_down(&client).await?;

    let before = settled_state(&client, NS).await?;
    operator.stop().await?;
    let operator = Operator::start(client.clone());
    operator.first_pass_done(&["server"]).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let changed = changed_keys(&before, &written_state(&client, NS).await?);
    ensure!(changed.is_empty(), "an operator restart wrote {changed:?}");

    one_replica_has_no_budget(&client).await?;
    operator.stop().await
}

/// The shared SFTP server, with two replicas on a ReadWriteMany volume, resources in
/// non-canonical forms and a 30 s grace period.
fn fixtures() -> Vec<Value> {
    let mut objects = sftp_server(NS, 2);
    let server = objects
        .iter_mut()
        .find(|o| o["kind"] == "TransferServer")
        .expect("a server");
    server["spec"]["storage"]["volume"]["accessMode"] = json!("ReadWriteMany");
    server["spec"]["shutdownGracePeriodSeconds"] = json!(30);
    server["spec"]["resources"] = json!({
        "requests": {"cpu": "1000m", "memory": "0.25Gi"},
        "limits": {"memory": "1024Mi", "ephemeral-storage": "2Gi"},
    });
    server["spec"]["pod"] = json!({
        "imagePullSecrets": [{"name": "registry"}],
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "transfer",
                         "effect": "NoSchedule"}],
        "nodeSelector": {"pool": "transfer", "topology.kubernetes.io/region": "elsewhere"},
        "priorityClassName": "transfer-gateways",
        "annotations": {"example.com/scrape": "true", "sluice.dev/storage-revision": "x"},
    });
    objects.push(json!({
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": {"name": "transfer-gateways"},
        "value": 1000,
    }));
    objects
}

async fn requests_above_limits_are_refused_at_admission(client: &Client) -> Result<()> {
    apply_all(client, &sftp_server(NS, 1)[..1]).await?;
    let server = |resources: Value| {
        json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "TransferServer",
            "metadata": {"name": "greedy", "namespace": NS},
            "spec": {
                "region": "cn-shanghai",
                "protocols": {"sftp": {}},
                "storage": {"volume": {"storageClassName": "ssd", "size": "1Gi"}},
                "resources": resources,
            },
        })
    };
    let memory = json!({"requests": {"memory": "2Gi"}, "limits": {"memory": "1024Mi"}});
    refused(
        client,
        server(memory),
        "requests.memory must not exceed limits.memory",
    )
    .await?;
    let storage = json!({
        "requests": {"ephemeral-storage": "3Gi"},
        "limits": {"ephemeral-storage": "2Gi"},
    });
    let message = "requests.ephemeral-storage must not exceed limits.ephemeral-storage";
    refused(client, server(storage), message).await?;
    let cpu = json!({"requests": {"cpu": "2"}, "limits": {"cpu": "1500m"}});
    refused(
        client,
        server(cpu),
        "requests.cpu must not exceed limits.cpu",
    )
    .await?;
    refused(
        client,
        server(json!({"limits": {"memory": "lots"}})),
        "spec.resources",
    )
    .await
}

async fn statefulset_pod_annotations(
    client: &Client,
) -> Result<std::collections::BTreeMap<String, String>> {
    let statefulset = Api::<StatefulSet>::namespaced(client.clone(), NS)
        .get("files-gateway")
        .await?;
    Ok(statefulset
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .unwrap_or_default())
}

async fn gateway_container(client: &Client) -> Result<(StatefulSet, Container)> {
    let statefulset = Api::<StatefulSet>::namespaced(client.clone(), NS)
        .get("files-gateway")
        .await?;
    let pod = statefulset
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .context("no pod spec")?;
    let container = pod.containers.first().cloned().context("no container")?;
    Ok((statefulset, container))
}

async fn the_statefulset_renders_the_spec(client: &Client) -> Result<()> {
    let (statefulset, container) = gateway_container(client).await?;
    let pod = statefulset
        .spec
        .and_then(|s| s.template.spec)
        .context("no pod")?;
    ensure!(pod.termination_grace_period_seconds == Some(40));
    // spec.pod, with the region left to the required affinity and Sluice's annotations
    // its own.
    let pulls: Vec<String> = pod
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|s| s.name.clone())
        .collect();
    ensure!(pulls == ["registry"], "{pulls:?}");
    let tolerations = pod.tolerations.clone().unwrap_or_default();
    ensure!(
        tolerations.len() == 1 && tolerations[0].key.as_deref() == Some("dedicated"),
        "{tolerations:?}"
    );
    let selector = pod.node_selector.clone().unwrap_or_default();
    ensure!(
        selector.len() == 1 && selector.get("pool").map(String::as_str) == Some("transfer"),
        "the region cannot be set by a node selector: {selector:?}"
    );
    ensure!(pod.priority_class_name.as_deref() == Some("transfer-gateways"));
    let annotations = statefulset_pod_annotations(client).await?;
    ensure!(
        annotations.get("example.com/scrape").map(String::as_str) == Some("true")
            && !annotations.contains_key("sluice.dev/storage-revision"),
        "{annotations:?}"
    );

    let resources = container.resources.clone().context("no resources")?;
    let amounts = |map: Option<std::collections::BTreeMap<String, _>>| -> Vec<(String, String)> {
        map.unwrap_or_default()
            .into_iter()
            .map(
                |(k, v): (
                    String,
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity,
                )| { (k, v.0) },
            )
            .collect()
    };
    let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
    // As the API server stores them: canonical forms of what the spec says.
    ensure!(
        amounts(resources.requests.clone()) == [pair("cpu", "1"), pair("memory", "256Mi")],
        "{resources:?}"
    );
    ensure!(
        amounts(resources.limits.clone())
            == [pair("ephemeral-storage", "2Gi"), pair("memory", "1Gi")],
        "{resources:?}"
    );

    let health = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("health"))
        .context("no health port")?;
    ensure!(health.container_port == 8081);
    for (probe, path) in [
        (&container.readiness_probe, "/readyz"),
        (&container.liveness_probe, "/healthz"),
    ] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref());
        let get = get.context("a probe that is not an HTTP GET")?;
        ensure!(get.port == IntOrString::String("health".into()));
        ensure!(get.path.as_deref() == Some(path));
    }
    let args = container.args.clone().unwrap_or_default();
    for pair in [
        ["--shutdown-grace", "30"],
        ["--health-listen", "0.0.0.0:8081"],
    ] {
        ensure!(args.windows(2).any(|w| w == pair), "{args:?}");
    }

    // What the Pod Security Standard `restricted` asks of the pod.
    let context = container.security_context.context("no security context")?;
    ensure!(context.allow_privilege_escalation == Some(false));
    ensure!(context.read_only_root_filesystem == Some(true));
    let dropped = context
        .capabilities
        .and_then(|c| c.drop)
        .unwrap_or_default();
    ensure!(dropped == ["ALL"]);
    let pod_context = pod.security_context.context("no pod security context")?;
    ensure!(pod_context.run_as_non_root == Some(true));
    let seccomp = pod_context.seccomp_profile.map(|p| p.type_);
    ensure!(seccomp.as_deref() == Some("RuntimeDefault"));
    Ok(())
}

async fn the_budget_allows_one_pod_down(client: &Client) -> Result<()> {
    let server = Api::<TransferServer>::namespaced(client.clone(), NS)
        .get("files")
        .await?;
    let budget = Api::<PodDisruptionBudget>::namespaced(client.clone(), NS)
        .get("files-gateway")
        .await?;
    let owner = budget
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .context("no controller reference")?;
    ensure!(Some(&owner.uid) == server.uid().as_ref());
    let spec = budget.spec.context("no spec")?;
    ensure!(spec.max_unavailable == Some(IntOrString::Int(1)));
    ensure!(spec.min_available.is_none());
    let labels = spec
        .selector
        .and_then(|s| s.match_labels)
        .unwrap_or_default();
    ensure!(labels.get("app.kubernetes.io/instance").map(String::as_str) == Some("files"));
    ensure!(spec.unhealthy_pod_eviction_policy.as_deref() == Some("AlwaysAllow"));
    Ok(())
}

async fn one_replica_has_no_budget(client: &Client) -> Result<()> {
    let servers = Api::<TransferServer>::namespaced(client.clone(), NS);
    let params = PatchParams {
        field_manager: Some(TEST_MANAGER.into()),
        ..PatchParams::default()
    };
    let patch = json!({"spec": {"replicas": 1}});
    servers
        .patch("files", &params, &Patch::Merge(&patch))
        .await?;
    let budgets = Api::<PodDisruptionBudget>::namespaced(client.clone(), NS);
    eventually("the budget removed", WAIT, || async {
        let gone = budgets.get_opt("files-gateway").await?.is_none();
        let (statefulset, _) = gateway_container(client).await?;
        let one = statefulset.spec.and_then(|s| s.replicas) == Some(1);
        Ok((gone && one).then_some(()))
    })
    .await
}
