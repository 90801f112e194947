//! The operator against a changing control plane: it manages only the namespaces it is
//! told to watch, and it keeps working through a kube-apiserver restart whose watches
//! come back expired (410 Gone): it lists again, writes nothing to what did not change,
//! and rolls out what did.

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use sluice::api::{DataResidencyPolicy, TransferServer, TransferUser};
use sluice::operator::OperatorArgs;

use support::cluster::{
    Operator, apply_all, changed_keys, eventually, install_crds, mainland_policy, move_sftp_port,
    policy_governs, settled_state, sftp_server, sftp_server_converged, written_state,
};
use support::controlplane::ControlPlane;
use support::http::{get, sample};

const WATCHED: &str = "watched";
const IGNORED: &str = "ignored";
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_watched_namespaces_are_managed_and_an_api_server_restart_writes_nothing() -> Result<()>
{
    let mut control_plane = ControlPlane::start().await?;
    let client = control_plane.client();
    install_crds(&client).await?;
    apply_all(&client, &mainland_policy()).await?;
    apply_all(&client, &sftp_server(WATCHED, 1)).await?;
    apply_all(&client, &sftp_server(IGNORED, 1)).await?;
    let mut args = OperatorArgs::local();
    args.watch_namespaces = vec![WATCHED.into()];
    let operator = Operator::start_with(client.clone(), args);
    let metrics = operator.metrics_addr().await?;

    sftp_server_converged(&client, WATCHED).await?;
    policy_governs(&client, 1).await?;
    a_server_in_an_unwatched_namespace_is_left_alone(&client).await?;

    let before = settled_state(&client, WATCHED).await?;
    control_plane.restart_apiserver_expiring_watches().await?;
    eventually("a watch answered 410 Gone", WAIT, || async {
        let (_, exposition) = get(metrics, "/metrics").await?;
        let expired = ["server", "user", "policy"].iter().any(|controller| {
            let labels = format!(r#"controller="{controller}",error="expired""#);
            sample(&exposition, "sluice_watch_errors_total", &labels).unwrap_or(0.0) >= 1.0
        });
        Ok(expired.then_some(()))
    })
    .await?;
    // Time for the lists that follow and the reconciles they trigger.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = written_state(&client, WATCHED).await?;
    let changed = changed_keys(&before, &after);
    ensure!(
        changed.is_empty(),
        "the restart led to writes to {changed:?}"
    );

    a_changed_server_is_rolled_out_and_nothing_else_is_written(&client, &after).await?;
    a_server_in_an_unwatched_namespace_is_left_alone(&client).await?;
    let (status, _) = get(metrics, "/readyz").await?;
    ensure!(status == 200, "not ready after the restart");
    operator.stop().await
}

async fn a_server_in_an_unwatched_namespace_is_left_alone(client: &Client) -> Result<()> {
    // Long enough for the watched namespace's reconciles to have reached it, were it
    // watched.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let server = Api::<TransferServer>::namespaced(client.clone(), IGNORED)
        .get("files")
        .await?;
    ensure!(
        server.status.is_none(),
        "status written: {:?}",
        server.status
    );
    let user = Api::<TransferUser>::namespaced(client.clone(), IGNORED)
        .get("alice")
        .await?;
    ensure!(user.status.is_none(), "status written: {:?}", user.status);
    let secrets: Vec<String> = Api::<Secret>::namespaced(client.clone(), IGNORED)
        .list(&ListParams::default())
        .await?
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    ensure!(secrets == ["alice-password"], "Secrets: {secrets:?}");
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), IGNORED)
        .list(&ListParams::default())
        .await?;
    ensure!(statefulsets.items.is_empty(), "a StatefulSet was created");
    let services = Api::<Service>::namespaced(client.clone(), IGNORED)
        .list(&ListParams::default())
        .await?;
    ensure!(services.items.is_empty(), "a Service was created");
    let policy = Api::<DataResidencyPolicy>::all(client.clone())
        .get("mainland")
        .await?;
    let governed: Vec<String> = policy
        .status
        .iter()
        .flat_map(|s| s.servers.iter().map(|g| g.namespace.clone()))
        .collect();
    ensure!(governed == [WATCHED], "the policy reports {governed:?}");
    Ok(())
}

async fn a_changed_server_is_rolled_out_and_nothing_else_is_written(
    client: &Client,
    before: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    move_sftp_port(client, WATCHED, "files", 2022, WAIT)
        .await
        .context("the change was not rolled out")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = written_state(client, WATCHED).await?;
    let changed = changed_keys(before, &after);
    // The server (spec and status) and its Service; the endpoint in the status names
    // the new port.
    let expected = [
        format!("Service/{WATCHED}/files"),
        format!("TransferServer/{WATCHED}/files"),
    ];
    ensure!(changed == expected, "written: {changed:?}");
    Ok(())
}
