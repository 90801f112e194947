//! The residency policy engine on a real control plane: jurisdictions, compliant and
//! refused servers, a policy changed under a running gateway (writes suspended, nothing
//! deleted), Enforce and Audit, a region without nodes, a volume bound outside the
//! region, the egress NetworkPolicy, and the evidence on the policy's status and Events.

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use sluice::api::{DataResidencyPolicy, TransferServer};

use support::cluster::{
    Operator, apply_all, condition, eventually, gateway_config, install_crds,
    install_storage_classes, refused, volume_server, wait_for_gateway_users, wait_server_condition,
};
use support::controlplane::ControlPlane;
use support::kubelet::FakeKubelet;
use support::sftp::{Auth, SftpClient, random_file, sha256_file};

const NS: &str = "telco";
const WAIT: Duration = Duration::from_secs(60);
const REGION_LABEL: &str = "topology.kubernetes.io/region";
const PASSWORD: &str = "residency-test-7c1e";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn residency_is_enforced_before_and_after_roll_out_and_reported_as_evidence() -> Result<()> {
    let control_plane = ControlPlane::start().await?;
    let client = control_plane.client();
    install_crds(&client).await?;
    install_storage_classes(&client, &["regional"]).await?;
    let kubelet = FakeKubelet::register(
        client.clone(),
        "node-sh-1",
        &[(REGION_LABEL, "cn-shanghai")],
    )
    .await?;
    let operator = Operator::start(client.clone());
    a_policy_must_name_where_data_may_live(&client).await?;
    apply_all(
        &client,
        &[
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": NS, "labels": {"sluice.dev/residency": "cn"}}}),
            mainland_policy("Enforce", json!({"jurisdictions": ["CN"]})),
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "alice-password", "namespace": NS},
                   "stringData": {"password": PASSWORD}}),
            json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "TransferUser",
                   "metadata": {"name": "alice", "namespace": NS},
                   "spec": {"serverRef": {"name": "files"},
                            "passwordSecretRef": {"name": "alice-password", "key": "password"},
                            "homeDirectory": "/alice",
                            "permissions": ["list", "read", "write", "delete", "mkdir",
                                            "rename"]}}),
            server("files", "cn-shanghai"),
        ],
    )
    .await?;

    wait_for_gateway_users(&client, NS, "files", &["alice"]).await?;
    let pod = kubelet
        .run_pod(NS, "app.kubernetes.io/instance=files")
        .await
        .context("the gateway pod of a compliant server did not run")?;
    let files = wait_condition(&client, "files", "Ready", "True").await?;
    let (_, reason, message) = condition(&files, "ResidencyCompliant").context("no condition")?;
    ensure!(reason == "RegionAllowed", "{reason}: {message}");
    let (status, reason, _) = condition(&files, "Schedulable").context("no Schedulable")?;
    ensure!(
        status == "True" && reason == "NodesInRegion",
        "{status} {reason}"
    );
    egress_is_limited_to_dns(&client).await?;

    let scratch = tempfile::tempdir()?;
    let sftp_addr = *pod.ports.get(&2222).context("no SFTP port")?;
    let sftp = SftpClient::new(
        sftp_addr,
        "alice",
        Auth::Password(PASSWORD.into()),
        scratch.path(),
    )?;
    let upload = scratch.path().join("before.bin");
    let uploaded = random_file(&upload, 64 * 1024, 7)?;
    sftp.run(&format!("put {} before.bin\n", upload.display()))
        .with_context(|| pod.log())?;

    hong_kong_is_refused_and_named_in_the_evidence(&client).await?;
    a_region_without_nodes_is_reported(&client).await?;

    // The policy narrows under the running gateway: the server falls out of compliance.
    apply_all(
        &client,
        &[mainland_policy(
            "Enforce",
            json!({"allowedRegions": ["cn-beijing"]}),
        )],
    )
    .await?;
    let files = wait_condition(&client, "files", "Stalled", "True").await?;
    let (_, reason, message) = condition(&files, "Ready").context("no Ready")?;
    ensure!(reason == "WritesSuspended", "{reason}: {message}");
    ensure!(
        message.contains("region cn-shanghai is not allowed by DataResidencyPolicy mainland")
            && message.contains("no longer accepts writes"),
        "{message}"
    );
    let stamp = gateway_config(&client, NS, "files").await?.residency;
    ensure!(
        !stamp.compliant && stamp.enforced,
        "the running gateway's stamp must stop writes: {stamp:?}"
    );
    ensure!(
        stamp.writes_refused(0).is_some(),
        "the stamp must refuse writes: {stamp:?}"
    );
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), NS);
    ensure!(
        statefulsets.get_opt("files-gateway").await?.is_some(),
        "the gateway must keep running"
    );
    // The kubelet would swap the mounted Secret; the gateway re-reads it by itself.
    pod.sync_secrets().await?;
    the_running_gateway_refuses_writes_and_serves_reads(&sftp, scratch.path(), &uploaded)
        .await
        .with_context(|| pod.log())?;
    the_audit_log_holds_both_uploads(&pod.volume_dir("data"), &uploaded)?;
    ensure!(
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), NS)
            .get_opt("files-data")
            .await?
            .is_some(),
        "the data must never be deleted"
    );
    ensure!(
        sha256_file(&pod.volume_dir("data").join("alice/before.bin"))? == uploaded,
        "the stored file must stay"
    );
    warning_event_names(&client, "files", "RegionNotAllowed", "mainland").await?;

    // Audit: the server rolls out again and is reported; the gateway may write again.
    apply_all(
        &client,
        &[mainland_policy(
            "Audit",
            json!({"allowedRegions": ["cn-beijing"]}),
        )],
    )
    .await?;
    let files = wait_condition(&client, "files", "Stalled", "False").await?;
    let (status, reason, _) = condition(&files, "ResidencyCompliant").context("no condition")?;
    ensure!(
        status == "False" && reason == "AuditOnly",
        "{status} {reason}"
    );
    let stamp = gateway_config(&client, NS, "files").await?.residency;
    ensure!(!stamp.compliant && !stamp.enforced, "{stamp:?}");
    ensure!(
        stamp.writes_refused(0).is_none(),
        "Audit must not stop writes"
    );

    // Back to the mainland policy: compliant, writes allowed.
    apply_all(
        &client,
        &[mainland_policy("Enforce", json!({"jurisdictions": ["CN"]}))],
    )
    .await?;
    wait_condition(&client, "files", "ResidencyCompliant", "True").await?;
    wait_condition(&client, "files", "Ready", "True").await?;
    let stamp = gateway_config(&client, NS, "files").await?.residency;
    ensure!(stamp.compliant && stamp.enforced, "{stamp:?}");

    a_volume_bound_outside_the_region_suspends_writes(&client).await?;
    the_policy_status_lists_every_governed_server(&client).await?;
    drop(pod);
    operator.stop().await
}

/// The policy's own shape is validated by the API server (CEL), with messages a person
/// understands.
async fn a_policy_must_name_where_data_may_live(client: &Client) -> Result<()> {
    let nowhere = mainland_policy("Enforce", json!({}));
    refused(client, nowhere, "name the allowed regions").await?;
    let unknown = mainland_policy("Enforce", json!({"jurisdictions": ["XX"]}));
    refused(client, unknown, "spec.jurisdictions[0]").await?;
    let operator = mainland_policy(
        "Enforce",
        json!({"jurisdictions": ["CN"],
               "serverSelector": {"matchExpressions": [{"key": "a", "operator": "in",
                                                         "values": ["b"]}]}}),
    );
    refused(
        client,
        operator,
        "serverSelector.matchExpressions[].operator",
    )
    .await
}

/// Over SFTP, against the gateway that was running when its server fell out of
/// compliance: an upload is refused with the policy's reason, the file stored before can
/// still be downloaded.
async fn the_running_gateway_refuses_writes_and_serves_reads(
    sftp: &SftpClient,
    dir: &std::path::Path,
    uploaded: &str,
) -> Result<()> {
    let local = dir.join("after.bin");
    random_file(&local, 4096, 8)?;
    let refused = eventually("the gateway refuses uploads", WAIT, || async {
        let output = sftp.batch(&format!("put {} after.bin\n", local.display()))?;
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        Ok((!output.status.success()).then_some(stderr))
    })
    .await?;
    ensure!(
        refused.contains("Permission denied") || refused.contains("permission denied"),
        "{refused}"
    );
    let back = dir.join("before-again.bin");
    sftp.run(&format!("get before.bin {}\n", back.display()))?;
    ensure!(
        sha256_file(&back)? == uploaded,
        "the stored file must still be served"
    );
    Ok(())
}

/// The evidence in the server's own storage: the allowed upload with its hash and
/// region, and the refused one with the reason.
fn the_audit_log_holds_both_uploads(data: &std::path::Path, uploaded: &str) -> Result<()> {
    let mut records = Vec::new();
    for day in std::fs::read_dir(data.join(".sluice-audit"))? {
        let day = day?.path();
        if !day.is_dir() || day.file_name().is_some_and(|n| n == "usage") {
            continue;
        }
        for file in std::fs::read_dir(&day)? {
            for line in std::fs::read_to_string(file?.path())?.lines() {
                records.push(serde_json::from_str::<Value>(line)?);
            }
        }
    }
    let upload = |path: &str| {
        records
            .iter()
            .find(|r| r["operation"] == "upload" && r["path"] == path)
            .cloned()
            .with_context(|| format!("no upload record for {path}: {records:#?}"))
    };
    let before = upload("/before.bin")?;
    ensure!(
        before["decision"] == "allowed"
            && before["sha256"] == uploaded
            && before["user"] == "alice"
            && before["region"] == "cn-shanghai"
            && before["server"] == "telco/files",
        "{before}"
    );
    // Uploads tried before the gateway re-read its configuration may have been stored;
    // the one that was refused must be there with the reason.
    let refused = records.iter().find(|r| {
        let error = r["error"].as_str().unwrap_or_default();
        r["operation"] == "upload"
            && r["path"] == "/after.bin"
            && r["decision"] == "denied"
            && error.contains("writes are suspended")
            && error.contains("mainland")
    });
    ensure!(
        refused.is_some(),
        "no refused upload recorded: {records:#?}"
    );
    Ok(())
}

fn mainland_policy(enforcement: &str, regions: Value) -> Value {
    let mut spec = json!({
        "namespaceSelector": {"matchLabels": {"sluice.dev/residency": "cn"}},
        "enforcement": enforcement,
    });
    for (key, value) in regions.as_object().expect("an object") {
        spec[key] = value.clone();
    }
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "DataResidencyPolicy",
        "metadata": {"name": "mainland"},
        "spec": spec,
    })
}

fn server(name: &str, region: &str) -> Value {
    volume_server(NS, name, region, "regional")
}

async fn wait_condition(
    client: &Client,
    name: &str,
    type_: &str,
    status: &str,
) -> Result<TransferServer> {
    wait_server_condition(client, NS, name, type_, status).await
}

async fn egress_is_limited_to_dns(client: &Client) -> Result<()> {
    let policy = Api::<NetworkPolicy>::namespaced(client.clone(), NS)
        .get("files-gateway")
        .await
        .context("no NetworkPolicy for the gateway")?;
    let spec = serde_json::to_value(policy.spec)?;
    ensure!(spec["policyTypes"] == json!(["Egress"]), "{spec}");
    ensure!(
        spec["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "files",
        "{spec}"
    );
    let egress = spec["egress"].as_array().context("no egress rules")?;
    ensure!(egress.len() == 1, "a volume gateway needs only DNS: {spec}");
    ensure!(egress[0]["ports"][0]["port"] == 53, "{spec}");
    Ok(())
}

async fn hong_kong_is_refused_and_named_in_the_evidence(client: &Client) -> Result<()> {
    apply_all(client, &[server("hk", "cn-hongkong")]).await?;
    let hk = wait_condition(client, "hk", "Stalled", "True").await?;
    let (status, reason, message) = condition(&hk, "ResidencyCompliant").context("none")?;
    ensure!(
        status == "False" && reason == "RegionNotAllowed",
        "{reason}"
    );
    ensure!(
        message
            == "region cn-hongkong is not allowed by DataResidencyPolicy mainland (allowed: \
                jurisdiction CN (mainland China))",
        "{message}"
    );
    for name in ["hk-gateway-config", "hk-host-keys"] {
        ensure!(
            Api::<Secret>::namespaced(client.clone(), NS)
                .get_opt(name)
                .await?
                .is_none(),
            "{name} must not be created for a refused server"
        );
    }
    ensure!(
        Api::<StatefulSet>::namespaced(client.clone(), NS)
            .get_opt("hk-gateway")
            .await?
            .is_none(),
        "no workload for a refused server"
    );
    policy_event(
        client,
        "ServerNotCompliant",
        "TransferServer telco/hk does not comply",
    )
    .await?;
    Api::<TransferServer>::namespaced(client.clone(), NS)
        .delete("hk", &Default::default())
        .await?;
    Ok(())
}

async fn a_region_without_nodes_is_reported(client: &Client) -> Result<()> {
    apply_all(client, &[server("bj", "cn-beijing")]).await?;
    let bj = wait_condition(client, "bj", "Schedulable", "False").await?;
    let (_, reason, message) = condition(&bj, "Schedulable").context("none")?;
    ensure!(reason == "NoNodeInRegion", "{reason}");
    ensure!(
        message.contains("no node carries topology.kubernetes.io/region=cn-beijing"),
        "{message}"
    );
    let (status, reason, _) = condition(&bj, "Ready").context("no Ready")?;
    ensure!(status == "False" && reason == "NoNodeInRegion", "{reason}");

    // A node of that region appears: the operator notices without any change to the server.
    let _beijing =
        FakeKubelet::register(client.clone(), "node-bj-1", &[(REGION_LABEL, "cn-beijing")]).await?;
    wait_condition(client, "bj", "Schedulable", "True").await?;
    Api::<TransferServer>::namespaced(client.clone(), NS)
        .delete("bj", &Default::default())
        .await?;
    Ok(())
}

/// A volume bound in Hong Kong (a pre-bound PersistentVolume, as an administrator or a
/// misconfigured provisioner could create) makes the server non-compliant: writes stop.
async fn a_volume_bound_outside_the_region_suspends_writes(client: &Client) -> Result<()> {
    let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), NS)
        .get("files-data")
        .await?;
    let volume = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": "disk-in-hong-kong"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "regional",
            "csi": {"driver": "disk.csi.sluice.test", "volumeHandle": "d-hk-1"},
            "claimRef": {"namespace": NS, "name": "files-data", "uid": claim.uid()},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": REGION_LABEL, "operator": "In", "values": ["cn-hongkong"]}
            ]}]}},
        },
    });
    apply_all(client, &[volume]).await?;
    let files = match wait_condition(client, "files", "Stalled", "True").await {
        Ok(files) => files,
        Err(error) => {
            let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), NS)
                .get("files-data")
                .await?;
            let server = Api::<TransferServer>::namespaced(client.clone(), NS)
                .get("files")
                .await?;
            anyhow::bail!("{error}: claim {:?} server {:?}", claim.spec, server.status);
        }
    };
    let (_, reason, message) = condition(&files, "ResidencyCompliant").context("none")?;
    ensure!(reason == "VolumeOutsideRegion", "{reason}: {message}");
    ensure!(
        message.contains(
            "the bound PersistentVolume disk-in-hong-kong is in cn-hongkong, which is not allowed"
        ),
        "{message}"
    );
    let stamp = gateway_config(client, NS, "files").await?.residency;
    ensure!(stamp.writes_refused(0).is_some(), "{stamp:?}");
    Ok(())
}

async fn the_policy_status_lists_every_governed_server(client: &Client) -> Result<()> {
    let api = Api::<DataResidencyPolicy>::all(client.clone());
    let status = eventually("the policy status lists files", WAIT, || async {
        let policy = api.get("mainland").await?;
        let status = policy.status.context("no status")?;
        let listed = status
            .servers
            .iter()
            .any(|s| s.name == "files" && s.rule.as_deref() == Some("Volume"));
        Ok(listed.then_some(status))
    })
    .await?;
    ensure!(status.governed_servers == Some(1), "{status:?}");
    ensure!(status.compliant_servers == Some(0), "{status:?}");
    let files = &status.servers[0];
    ensure!(
        files.namespace == NS && !files.compliant && files.region == "cn-shanghai",
        "{files:?}"
    );
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .context("no Ready")?;
    ensure!(
        ready.message.contains("the strictest wins"),
        "{}",
        ready.message
    );
    Ok(())
}

async fn policy_event(client: &Client, reason: &str, note: &str) -> Result<()> {
    let events = Api::<Event>::namespaced(client.clone(), "default");
    eventually(&format!("policy Event {reason}"), WAIT, || async {
        let found = events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .any(|e| {
                let about_policy = e
                    .regarding
                    .as_ref()
                    .is_some_and(|r| r.kind.as_deref() == Some("DataResidencyPolicy"));
                about_policy
                    && e.reason.as_deref() == Some(reason)
                    && e.note.as_deref().is_some_and(|n| n.contains(note))
            });
        Ok(found.then_some(()))
    })
    .await
}

async fn warning_event_names(
    client: &Client,
    server: &str,
    reason: &str,
    policy: &str,
) -> Result<()> {
    let events = Api::<Event>::namespaced(client.clone(), NS);
    eventually(&format!("Warning {reason} on {server}"), WAIT, || async {
        let found = events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .any(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(server)
                    && e.type_.as_deref() == Some("Warning")
                    && e.reason.as_deref() == Some(reason)
                    && e.note.as_deref().is_some_and(|n| n.contains(policy))
            });
        Ok(found.then_some(()))
    })
    .await
}
