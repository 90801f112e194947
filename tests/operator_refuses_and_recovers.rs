//! The operator against bad and changing input on a real control plane: residency
//! refusal and recovery, broken users that do not disturb good ones, delete and
//! recreate, garbage collection of owned objects, and CRDs that do not drift.

mod support;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Event, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DeleteParams, DynamicObject, ListParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use sluice::api::{TransferServer, TransferUser};

use support::cluster::{
    Operator, apply, apply_all, condition, eventually, gateway_config, install_crds,
    install_storage_classes, parse_yaml, read_yaml_dir, refused, volume_server,
    wait_server_condition,
};
use support::controlplane::ControlPlane;

const NS: &str = "payments";
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_refuses_bad_input_clearly_and_recovers_when_it_is_fixed() -> Result<()> {
    let control_plane = ControlPlane::start().await?;
    let client = control_plane.client();
    install_crds(&client).await?;
    install_storage_classes(&client, &["ssd", "cn-shanghai-ssd"]).await?;
    crds_show_no_drift_after_apply(&client).await?;
    let operator = Operator::start(client.clone());
    let namespace = json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NS, "labels": {"sluice.dev/residency": "cn"}},
    });
    // Nodes in the regions the servers move between, so their pods are schedulable
    // (there is no kubelet: they never run, and servers stay Reconciling).
    let node = |name: &str, region: &str| {
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/region": region}},
        })
    };
    let nodes = [
        node("node-sh", "cn-shanghai"),
        node("node-bj", "cn-beijing"),
    ];
    apply_all(&client, &nodes).await?;
    apply_all(&client, &[namespace]).await?;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/01-policy.yaml");
    for policy in parse_yaml(&std::fs::read_to_string(examples)?)? {
        apply(&client, &policy).await?;
    }

    malformed_servers_are_rejected_or_stalled(&client).await?;
    objects_of_others_are_never_taken_over(&client).await?;
    hong_kong_server_is_refused_without_workload(&client).await?;
    a_user_of_a_stalled_server_waits_for_it(&client, "False", "ServerNotReady").await?;
    moving_to_an_allowed_region_rolls_it_out(&client).await?;
    a_user_of_a_stalled_server_waits_for_it(&client, "True", "Reconciled").await?;
    Api::<TransferUser>::namespaced(client.clone(), NS)
        .delete("waiting", &Default::default())
        .await?;
    broken_users_are_reported_and_do_not_disturb_good_ones(&client).await?;
    recreated_server_is_fully_reconciled(&client).await?;
    deleting_the_server_removes_what_it_owned(&client).await?;
    operator.stop().await
}

fn server(name: &str, region: &str) -> Value {
    volume_server(NS, name, region, "ssd")
}

fn password_secret(name: &str, password: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "stringData": {"password": password},
    })
}

/// `object` with the value at JSON pointer `at` replaced by `value`.
fn with(mut object: Value, at: &str, value: Value) -> Value {
    *object.pointer_mut(at).expect("the fixture has that field") = value;
    object
}

async fn wait_condition(
    client: &Client,
    name: &str,
    type_: &str,
    status: &str,
) -> Result<TransferServer> {
    wait_server_condition(client, NS, name, type_, status).await
}

async fn exists<K>(client: &Client, name: &str) -> Result<bool>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Ok(Api::<K>::namespaced(client.clone(), NS)
        .get_opt(name)
        .await?
        .is_some())
}

async fn malformed_servers_are_rejected_or_stalled(client: &Client) -> Result<()> {
    let size = "/spec/storage/volume/size";
    let bad_size = with(server("bad-size", "cn-shanghai"), size, json!("lots"));
    refused(client, bad_size, "spec.storage.volume.size").await?;
    // An integer would pass an int-or-string schema but not the operator's types, and
    // one such object would stop every watch; the schema must refuse it.
    let integer_size = with(server("int-size", "cn-shanghai"), size, json!(1073741824));
    refused(client, integer_size, "spec.storage.volume.size").await?;
    let no_protocol = with(
        server("no-protocol", "cn-shanghai"),
        "/spec/protocols",
        json!({}),
    );
    refused(client, no_protocol, "at least one protocol").await?;

    // Valid to the API server, but too long to derive the owned objects' names from.
    let long = "a".repeat(50);
    apply_all(client, &[server(&long, "cn-shanghai")]).await?;
    let server = wait_condition(client, &long, "Stalled", "True").await?;
    let (_, reason, message) = condition(&server, "Stalled").context("no Stalled condition")?;
    ensure!(
        reason == "InvalidSpec" && message.contains("48"),
        "{reason}: {message}"
    );
    Api::<TransferServer>::namespaced(client.clone(), NS)
        .delete(&long, &DeleteParams::default())
        .await?;
    Ok(())
}

/// A server named after someone else's Service must not redirect, adopt or (through
/// garbage collection) delete it.
async fn objects_of_others_are_never_taken_over(client: &Client) -> Result<()> {
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]},
    });
    apply_all(client, &[service, server("web", "cn-shanghai")]).await?;
    let server = wait_condition(client, "web", "Stalled", "True").await?;
    let (_, reason, message) = condition(&server, "Stalled").context("no Stalled condition")?;
    ensure!(
        reason == "NameConflict" && message.contains("Service web"),
        "{reason}: {message}"
    );
    ensure!(
        !exists::<StatefulSet>(client, "web-gateway").await?,
        "a StatefulSet was created"
    );

    let servers = Api::<TransferServer>::namespaced(client.clone(), NS);
    servers.delete("web", &DeleteParams::default()).await?;
    eventually("web server gone", WAIT, || async {
        Ok(servers.get_opt("web").await?.is_none().then_some(()))
    })
    .await?;
    let service = Api::<Service>::namespaced(client.clone(), NS)
        .get("web")
        .await?;
    ensure!(
        service.owner_references().is_empty(),
        "the Service was adopted"
    );
    let selector = service.spec.and_then(|s| s.selector).unwrap_or_default();
    ensure!(selector.get("app").map(String::as_str) == Some("web") && selector.len() == 1);

    // A policy whose selector cannot be evaluated is refused by the API server.
    let typo = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "DataResidencyPolicy",
        "metadata": {"name": "typo"},
        "spec": {
            "namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "in", "values": ["b"]}]},
            "allowedRegions": ["cn-shanghai"],
        },
    });
    refused(client, typo, "must be In, NotIn, Exists or DoesNotExist").await?;
    Ok(())
}

async fn hong_kong_server_is_refused_without_workload(client: &Client) -> Result<()> {
    apply_all(client, &[server("hk-gw", "cn-hongkong")]).await?;
    let server = wait_condition(client, "hk-gw", "ResidencyCompliant", "False").await?;
    let (_, reason, message) = condition(&server, "ResidencyCompliant").context("no condition")?;
    ensure!(reason == "RegionNotAllowed", "reason {reason}");
    ensure!(
        message.contains("cn-hongkong") && message.contains("mainland-china"),
        "message {message}"
    );
    ensure!(condition(&server, "Stalled").is_some_and(|c| c.0 == "True"));
    ensure!(condition(&server, "Ready").is_some_and(|c| c.0 == "False"));

    let events = Api::<Event>::namespaced(client.clone(), NS);
    eventually("a Warning Event for hk-gw", WAIT, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list.items.into_iter().find(|e| {
            e.involved_object.name.as_deref() == Some("hk-gw")
                && e.type_.as_deref() == Some("Warning")
                && e.reason.as_deref() == Some("RegionNotAllowed")
                && e.message
                    .as_deref()
                    .is_some_and(|m| m.contains("mainland-china"))
        }))
    })
    .await?;

    // Give the operator a moment in which it could wrongly create something.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        !exists::<StatefulSet>(client, "hk-gw-gateway").await?,
        "a StatefulSet was created"
    );
    ensure!(
        !exists::<Service>(client, "hk-gw").await?,
        "a Service was created"
    );
    ensure!(
        !exists::<PersistentVolumeClaim>(client, "hk-gw-data").await?,
        "a PVC was created"
    );
    ensure!(
        !exists::<Secret>(client, "hk-gw-gateway-config").await?,
        "a config Secret was created"
    );
    Ok(())
}

/// A valid user of a stalled server is not Ready (its login cannot reach a gateway), but
/// waits for the server rather than stalling itself; it is Ready once the server rolls
/// out.
async fn a_user_of_a_stalled_server_waits_for_it(
    client: &Client,
    status: &str,
    reason: &str,
) -> Result<()> {
    let user = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "TransferUser",
        "metadata": {"name": "waiting", "namespace": NS},
        "spec": {
            "serverRef": {"name": "hk-gw"},
            "homeDirectory": "/waiting",
            "permissions": ["list"],
            "sshPublicKeys": [
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
            ],
        },
    });
    apply_all(client, &[user]).await?;
    let users = Api::<TransferUser>::namespaced(client.clone(), NS);
    let what = format!("user waiting Ready={status} ({reason})");
    let conditions = eventually(&what, WAIT, || async {
        let user = users.get("waiting").await?;
        let conditions = user.status.map(|s| s.conditions).unwrap_or_default();
        let ready = conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == status && c.reason == reason);
        Ok(ready.then_some(conditions))
    })
    .await?;
    let stalled = conditions.iter().find(|c| c.type_ == "Stalled");
    ensure!(
        stalled.is_some_and(|c| c.status == "False"),
        "{conditions:?}"
    );
    if reason == "ServerNotReady" {
        let ready = conditions.iter().find(|c| c.type_ == "Ready");
        let message = ready.map(|c| c.message.as_str()).unwrap_or_default();
        ensure!(
            message.contains("hk-gw is stalled (RegionNotAllowed)"),
            "{message}"
        );
    }
    Ok(())
}

async fn moving_to_an_allowed_region_rolls_it_out(client: &Client) -> Result<()> {
    apply_all(client, &[server("hk-gw", "cn-beijing")]).await?;
    let server = wait_condition(client, "hk-gw", "ResidencyCompliant", "True").await?;
    ensure!(condition(&server, "Stalled").is_some_and(|c| c.0 == "False"));
    ensure!(
        condition(&server, "Reconciling").is_some_and(|c| c.0 == "True"),
        "no kubelet: still rolling out"
    );
    let statefulset = Api::<StatefulSet>::namespaced(client.clone(), NS)
        .get("hk-gw-gateway")
        .await?;
    let affinity = serde_json::to_value(
        statefulset
            .spec
            .and_then(|s| s.template.spec)
            .and_then(|p| p.affinity),
    )?;
    ensure!(
        affinity.to_string().contains("cn-beijing"),
        "affinity {affinity}"
    );
    Ok(())
}

async fn gateway_users(client: &Client) -> Result<Vec<String>> {
    let config = gateway_config(client, NS, "hk-gw").await?;
    Ok(config.users.into_iter().map(|u| u.name).collect())
}

async fn broken_users_are_reported_and_do_not_disturb_good_ones(client: &Client) -> Result<()> {
    let user = |name: &str, credentials: Value| {
        let mut spec = json!({
            "serverRef": {"name": "hk-gw"},
            "homeDirectory": format!("/{name}"),
            "permissions": ["list", "read"],
        });
        spec.as_object_mut()
            .unwrap()
            .extend(credentials.as_object().unwrap().clone());
        json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "TransferUser",
            "metadata": {"name": name, "namespace": NS},
            "spec": spec,
        })
    };
    let key = json!({"sshPublicKeys": [
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a@b"
    ]});
    let objects = [
        password_secret("good-pw", "s3cret-Value"),
        user("good", json!({"passwordSecretRef": {"name": "good-pw"}})),
        user(
            "nosecret",
            json!({"passwordSecretRef": {"name": "does-not-exist"}}),
        ),
        user(
            "badkey",
            json!({"sshPublicKeys": ["ssh-ed25519 not-base64!"]}),
        ),
        with(
            user("escape", key.clone()),
            "/spec/homeDirectory",
            json!("/a/../../etc"),
        ),
        with(
            user("orphan", key),
            "/spec/serverRef/name",
            json!("no-such-server"),
        ),
    ];
    apply_all(client, &objects).await?;

    let users = Api::<TransferUser>::namespaced(client.clone(), NS);
    let expected = [
        ("good", "True", "Reconciled"),
        ("nosecret", "False", "SecretNotFound"),
        ("badkey", "False", "InvalidPublicKey"),
        ("escape", "False", "InvalidHomeDirectory"),
        ("orphan", "False", "ServerNotFound"),
    ];
    for (name, status, reason) in expected {
        eventually(
            &format!("user {name} Ready={status} ({reason})"),
            WAIT,
            || async {
                let user = users.get(name).await?;
                let ready = user
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready").cloned());
                Ok(ready
                    .filter(|c| c.status == status && c.reason == reason)
                    .map(|_| ()))
            },
        )
        .await?;
    }
    let events = Api::<Event>::namespaced(client.clone(), NS);
    eventually("Warning Events for the broken users", WAIT, || async {
        let list = events.list(&ListParams::default()).await?;
        let warned = |name: &str| {
            list.items.iter().any(|e| {
                e.involved_object.name.as_deref() == Some(name)
                    && e.type_.as_deref() == Some("Warning")
            })
        };
        Ok(["nosecret", "badkey", "escape", "orphan"]
            .iter()
            .all(|n| warned(n))
            .then_some(()))
    })
    .await?;
    for event in events.list(&ListParams::default()).await?.items {
        ensure!(
            !event.message.unwrap_or_default().contains("s3cret-Value"),
            "an Event carries a password"
        );
    }

    eventually(
        "the good user, only, in the gateway config",
        WAIT,
        || async { Ok((gateway_users(client).await? == ["good"]).then_some(())) },
    )
    .await?;

    // Fixing a user brings it in without touching the others.
    apply_all(
        client,
        &[password_secret("does-not-exist", "another-Value")],
    )
    .await?;
    eventually("the fixed user in the gateway config", WAIT, || async {
        Ok((gateway_users(client).await? == ["good", "nosecret"]).then_some(()))
    })
    .await?;
    Ok(())
}

/// Case C22: delete a server and recreate it with the same name and spec.
async fn recreated_server_is_fully_reconciled(client: &Client) -> Result<()> {
    let servers = Api::<TransferServer>::namespaced(client.clone(), NS);
    let old_uid = servers.get("hk-gw").await?.uid();
    servers.delete("hk-gw", &DeleteParams::foreground()).await?;
    eventually("hk-gw gone", WAIT, || async {
        Ok(servers.get_opt("hk-gw").await?.is_none().then_some(()))
    })
    .await?;
    apply_all(client, &[server("hk-gw", "cn-beijing")]).await?;
    let server = wait_condition(client, "hk-gw", "ResidencyCompliant", "True").await?;
    ensure!(server.uid() != old_uid, "the server was not recreated");
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), NS);
    eventually("a StatefulSet owned by the new server", WAIT, || async {
        let Some(d) = statefulsets.get_opt("hk-gw-gateway").await? else {
            return Ok(None);
        };
        let owner = d.owner_references().first().map(|o| o.uid.clone());
        Ok((owner == server.uid()).then_some(()))
    })
    .await?;
    ensure!(
        !server
            .status
            .as_ref()
            .context("status")?
            .host_key_fingerprints
            .is_empty()
    );
    Ok(())
}

async fn deleting_the_server_removes_what_it_owned(client: &Client) -> Result<()> {
    Api::<TransferServer>::namespaced(client.clone(), NS)
        .delete("hk-gw", &DeleteParams::default())
        .await?;
    eventually(
        "owned objects garbage-collected",
        Duration::from_secs(90),
        || async {
            let left = [
                exists::<StatefulSet>(client, "hk-gw-gateway").await?,
                exists::<Service>(client, "hk-gw").await?,
                exists::<PersistentVolumeClaim>(client, "hk-gw-data").await?,
                exists::<Secret>(client, "hk-gw-host-keys").await?,
                exists::<Secret>(client, "hk-gw-gateway-config").await?,
            ];
            Ok((!left.contains(&true)).then_some(()))
        },
    )
    .await
}

/// Case C20: what the API server stores is what we committed, and re-applying changes
/// nothing.
async fn crds_show_no_drift_after_apply(client: &Client) -> Result<()> {
    // Read as raw JSON: the typed CRD would turn every schema bound into a float.
    let resource = ApiResource::erase::<CustomResourceDefinition>(&());
    let crds = Api::<DynamicObject>::all_with(client.clone(), &resource);
    let committed = read_yaml_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds"))?;
    for object in committed {
        let name = object.name_any();
        let live = serde_json::to_value(crds.get(&name).await?)?;
        let ours = serde_json::to_value(&object)?;
        let mut differences = Vec::new();
        subset_differences("", &ours["spec"], &live["spec"], &mut differences);
        ensure!(differences.is_empty(), "{name} drifted at {differences:?}");

        let version = live["metadata"]["resourceVersion"].clone();
        apply(client, &object).await?;
        let again = serde_json::to_value(crds.get(&name).await?)?;
        ensure!(
            again["metadata"]["resourceVersion"] == version,
            "re-applying {name} wrote to it"
        );
    }
    Ok(())
}

/// Paths where `ours` has a value that `live` does not equal.
fn subset_differences(path: &str, ours: &Value, live: &Value, out: &mut Vec<String>) {
    match (ours, live) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                subset_differences(
                    &format!("{path}.{key}"),
                    value,
                    b.get(key).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                subset_differences(&format!("{path}[{i}]"), x, y, out);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {
            if a.is_f64() != b.is_f64() {
                out.push(format!("{path} (number type {a} vs {b})"));
            }
        }
        _ if ours == live => {}
        _ => out.push(path.to_string()),
    }
}
