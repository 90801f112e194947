//! The main job on one machine: the operator reconciling `deploy/examples/` and a
//! gateway serving real SFTP and FTPS transfers.
//!
//! With a reachable cluster (the current kubeconfig answers), the CRDs and examples are
//! applied there and the operator runs against it; the cluster's kubelets run the
//! gateway pods from the gateway image. Without one, a local control plane (etcd,
//! kube-apiserver, kube-controller-manager on 127.0.0.1) is started and the gateway pod
//! is run as a local process by the same stand-in kubelet the end-to-end tests use.
//! Prints how to connect, then runs until Ctrl-C and cleans up.
//!
//! Run it with `scripts/demo`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use kube::{Api, Client, ResourceExt};
use sluice::api::TransferServer;
use support::cluster::{
    Operator, apply, eventually, install_crds, install_storage_classes, read_yaml_dir,
};
use support::controlplane::ControlPlane;
use support::gateway::{TestPki, VALID_UNTIL};
use support::kubelet::FakeKubelet;
use support::sftp::generate_key;

#[tokio::main]
async fn main() -> Result<()> {
    let work = Path::new(env!("CARGO_MANIFEST_DIR")).join(".demo");
    std::fs::create_dir_all(&work)?;

    // Only with explicit consent: the demo installs CRDs, a cluster-wide policy and a
    // namespace wherever the current kubeconfig points.
    let use_current = std::env::args().any(|a| a == "--use-current-cluster");
    match use_current {
        true => {
            let client = existing_cluster()
                .await
                .context("the current cluster does not answer")?;
            run_on_cluster(client, &work).await
        }
        false => run_locally(&work).await,
    }
}

async fn existing_cluster() -> Option<Client> {
    let client = tokio::time::timeout(Duration::from_secs(5), Client::try_default())
        .await
        .ok()?
        .ok()?;
    let version = tokio::time::timeout(Duration::from_secs(5), client.apiserver_version())
        .await
        .ok()?
        .ok()?;
    eprintln!(
        "demo: using the current cluster (Kubernetes {}.{})",
        version.major, version.minor
    );
    Some(client)
}

/// Applies the CRDs and examples, with the `ops` user's key replaced by one generated
/// into `work`, and returns the key's path. The example server's FTPS certificate is
/// issued here by a throwaway CA written to `work/ca.pem` (in a real cluster
/// cert-manager writes that Secret); an existing Secret is left as it is.
async fn apply_examples(client: &Client, work: &Path) -> Result<std::path::PathBuf> {
    install_crds(client).await?;
    // The example server's StorageClass, as a region-pinned cluster would have it.
    install_storage_classes(client, &["cn-shanghai-ssd"]).await?;
    let key = work.join("ops_ed25519");
    if !key.exists() {
        generate_key(work, "ops_ed25519")?;
    }
    let public = std::fs::read_to_string(key.with_extension("pub"))?;
    let examples = read_yaml_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples"))?;
    for mut object in examples {
        if object.name_any() == "ops" {
            object.data["spec"]["sshPublicKeys"] = serde_json::json!([public.trim()]);
        }
        apply(client, &object).await?;
    }
    let secrets =
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), "telephony");
    if secrets.get_opt("cucm-backup-tls").await?.is_none() {
        let pki = TestPki::new()?;
        std::fs::write(work.join("ca.pem"), &pki.ca_pem)?;
        let (cert, key) = pki.issue(VALID_UNTIL)?;
        let tls = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "cucm-backup-tls", "namespace": "telephony"},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": cert, "tls.key": key},
        });
        apply(client, &serde_json::from_value(tls)?).await?;
    }
    Ok(key)
}

async fn run_on_cluster(client: Client, work: &Path) -> Result<()> {
    sluice::cli::init_logging(sluice::cli::LogFormat::Text);
    let key = apply_examples(&client, work).await?;
    let operator = Operator::start(client.clone());
    wait_ready(&client).await?;
    println!("\nThe gateway is running in your cluster. To connect from this machine:");
    println!("  kubectl -n telephony port-forward svc/cucm-backup 2222:22 &");
    print_sftp_commands(2222, &key);
    println!("Press Ctrl-C to stop.");
    wait_for_ctrl_c().await;
    operator.stop().await
}

async fn run_locally(work: &Path) -> Result<()> {
    eprintln!("demo: starting a local control plane on 127.0.0.1");
    let control_plane = ControlPlane::start().await?;
    // Logging starts only now: while the API server comes up, the client's readiness
    // polls fail by design and would be printed as errors.
    sluice::cli::init_logging(sluice::cli::LogFormat::Text);
    let client = control_plane.client();
    let region = [("topology.kubernetes.io/region", "cn-shanghai")];
    let kubelet = FakeKubelet::register(client.clone(), "demo-node-cn-shanghai", &region).await?;
    let operator = Operator::start(client.clone());
    let key = apply_examples(&client, work).await?;
    let pod = kubelet
        .run_pod("telephony", "app.kubernetes.io/instance=cucm-backup")
        .await?;
    wait_ready(&client).await?;

    let port = pod
        .ports
        .get(&2222)
        .context("the gateway exposes no SFTP port")?
        .port();
    println!("\nSluice is running: operator, local control plane and one gateway.");
    println!(
        "Files land in {} (removed when the demo stops)",
        pod.volume_dir("data").display()
    );
    println!("The gateway logs to {}", pod.log_path().display());
    println!("Inspect the resources with:");
    println!(
        "  kubectl --kubeconfig {} get sluice -A",
        control_plane.kubeconfig_path().display()
    );
    print_sftp_commands(port, &key);
    let ftps = [2121, 2990].map(|p| pod.ports.get(&p).map(|a| a.port()));
    if let [Some(explicit), Some(implicit)] = ftps {
        print_ftps_commands(explicit, implicit, &work.join("ca.pem"));
    }
    println!("Press Ctrl-C to stop.");
    // Like the kubelet, refresh the mounted Secrets, so users added or changed while the
    // demo runs reach the gateway (which reloads its configuration by itself).
    let ctrl_c = wait_for_ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                if let Err(error) = pod.sync_secrets().await {
                    eprintln!("demo: could not refresh the gateway's Secrets: {error:#}");
                }
            }
        }
    }
    drop(pod);
    operator.stop().await
}

async fn wait_ready(client: &Client) -> Result<()> {
    let servers = Api::<TransferServer>::namespaced(client.clone(), "telephony");
    eventually("cucm-backup Ready", Duration::from_secs(120), || async {
        let server = servers.get("cucm-backup").await?;
        let ready = server
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .any(|c| c.type_ == "Ready" && c.status == "True");
        Ok(ready.then_some(()))
    })
    .await
}

fn print_sftp_commands(port: u16, key: &Path) {
    println!("Connect as the password user (password: change-me-1f8e2c, from 03-users.yaml):");
    println!("  sftp -P {port} -o StrictHostKeyChecking=accept-new cucm@127.0.0.1");
    println!("Connect as the key user:");
    println!(
        "  sftp -P {port} -i {} -o StrictHostKeyChecking=accept-new ops@127.0.0.1",
        key.display()
    );
}

fn print_ftps_commands(explicit: u16, implicit: u16, ca: &Path) {
    let ca = ca.display();
    println!("FTPS as the password user, explicit (AUTH TLS) and implicit:");
    println!(
        "  curl --ssl-reqd --cacert {ca} -u cucm:change-me-1f8e2c ftp://127.0.0.1:{explicit}/"
    );
    println!("  curl --cacert {ca} -u cucm:change-me-1f8e2c ftps://127.0.0.1:{implicit}/");
    println!(
        "  lftp -e 'set ssl:ca-file {ca}; set ftp:ssl-force yes' -u cucm,change-me-1f8e2c \
         127.0.0.1:{explicit}"
    );
}

async fn wait_for_ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
    eprintln!("demo: stopping");
}
