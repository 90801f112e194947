//! The walking skeleton end to end: the examples in `deploy/examples/` applied to a real
//! control plane, the operator reconciling them, and the gateway it renders serving SFTP
//! to real OpenSSH clients.
//!
//! One control plane serves the whole scenario; each step is a function named for the
//! behaviour it checks, run in order because later steps build on earlier ones.

mod support;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret, Service};
use kube::{Api, Client, ResourceExt};
use sluice::api::TransferServer;
use sluice::gateway::config::GatewayConfig;

use support::cluster::{
    Operator, apply, changed_keys, condition, eventually, install_crds, install_storage_classes,
    read_yaml_dir, settled_state, wait_for_gateway_users, written_state,
};
use support::controlplane::ControlPlane;
use support::ftp::{FtpClients, succeed};
use support::gateway::{TestPki, VALID_UNTIL};
use support::kubelet::{FakeKubelet, RunningPod};
use support::sftp::{
    Auth, SftpClient, generate_key, known_host_fingerprints, random_file, sha256_file,
};

const NAMESPACE: &str = "telephony";
const SERVER: &str = "cucm-backup";
const WAIT: Duration = Duration::from_secs(60);
const REGION_LABEL: &str = "topology.kubernetes.io/region";

struct Scenario {
    client: Client,
    scratch: tempfile::TempDir,
    ops_key: std::path::PathBuf,
    password: String,
    /// The CA of the FTPS certificate the test put in the example's TLS Secret.
    ca: std::path::PathBuf,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_roll_out_a_gateway_that_serves_sftp_and_converges_quietly() -> Result<()> {
    let control_plane = ControlPlane::start().await?;
    let client = control_plane.client();
    install_crds(&client).await?;
    install_storage_classes(&client, &["ssd", "cn-shanghai-ssd"]).await?;
    let kubelet = FakeKubelet::register(
        client.clone(),
        "node-sh-1",
        &[(REGION_LABEL, "cn-shanghai")],
    )
    .await?;
    let mut operator = Operator::start(client.clone());

    let scenario = apply_examples(client.clone()).await?;
    wait_for_gateway_users(&client, NAMESPACE, SERVER, &["cucm", "ops"]).await?;
    let mut pod = kubelet
        .run_pod(NAMESPACE, "app.kubernetes.io/instance=cucm-backup")
        .await
        .context("the gateway pod did not run")?;
    server_becomes_ready_with_fingerprints(&client).await?;
    owned_objects_carry_labels_owner_and_affinity(&client).await?;
    config_holds_hashes_never_passwords(&client, &scenario).await?;

    both_users_transfer_files_over_sftp(&scenario, &pod)
        .await
        .with_context(|| pod.log())?;
    the_password_user_transfers_over_explicit_and_implicit_ftps(&scenario, &pod)
        .await
        .with_context(|| pod.log())?;
    host_key_survives_a_gateway_restart(&scenario, &mut pod)
        .await
        .with_context(|| pod.log())?;
    policy_counts_the_compliant_server(&client).await?;

    operator = restart_operator_writes_nothing(&client, operator).await?;
    operator.stop().await?;
    Ok(())
}

async fn apply_examples(client: Client) -> Result<Scenario> {
    let scratch = tempfile::tempdir()?;
    let (ops_key, ops_public) = generate_key(scratch.path(), "ops_ed25519")?;
    let examples = read_yaml_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples"))?;
    let mut password = None;
    for mut object in examples {
        // The example's key belongs to nobody; log in with one this test holds.
        if object.name_any() == "ops" {
            object.data["spec"]["sshPublicKeys"] = serde_json::json!([ops_public]);
        }
        if object.name_any() == "cucm-password" {
            password = object.data["stringData"]["password"]
                .as_str()
                .map(str::to_string);
        }
        apply(&client, &object).await?;
    }
    let password = password.context("the example password Secret has no stringData.password")?;
    // What cert-manager would write for the example's tlsSecretRef.
    let pki = TestPki::new()?;
    let ca = scratch.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem)?;
    let (cert, key) = pki.issue(VALID_UNTIL)?;
    let tls = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "cucm-backup-tls", "namespace": NAMESPACE},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": cert, "tls.key": key},
    });
    apply(&client, &serde_json::from_value(tls)?).await?;
    Ok(Scenario {
        client,
        scratch,
        ops_key,
        password,
        ca,
    })
}

async fn server(client: &Client) -> Result<TransferServer> {
    Ok(Api::<TransferServer>::namespaced(client.clone(), NAMESPACE)
        .get(SERVER)
        .await?)
}

async fn server_becomes_ready_with_fingerprints(client: &Client) -> Result<()> {
    let server = eventually("TransferServer Ready=True", WAIT, || async {
        let server = server(client).await?;
        let ready = condition(&server, "Ready").is_some_and(|(s, _, _)| s == "True");
        Ok(ready.then_some(server))
    })
    .await?;
    let status = server.status.as_ref().context("no status")?;
    ensure!(
        status.observed_generation == server.metadata.generation,
        "observedGeneration lags"
    );
    ensure!(
        condition(&server, "ResidencyCompliant")
            .map(|c| c.0)
            .as_deref()
            == Some("True")
    );
    ensure!(condition(&server, "Reconciling").map(|c| c.0).as_deref() == Some("False"));
    ensure!(condition(&server, "Stalled").map(|c| c.0).as_deref() == Some("False"));
    let algorithms: Vec<&str> = status
        .host_key_fingerprints
        .iter()
        .map(|f| f.algorithm.as_str())
        .collect();
    ensure!(
        algorithms.contains(&"ssh-ed25519"),
        "fingerprints: {algorithms:?}"
    );
    ensure!(
        algorithms
            .iter()
            .any(|a| a.starts_with("rsa") || *a == "ssh-rsa"),
        "fingerprints: {algorithms:?}"
    );
    ensure!(
        status.endpoint.as_deref() == Some("sftp://cucm-backup.telephony.svc:22"),
        "endpoint {:?}",
        status.endpoint
    );
    ensure!(
        status.endpoints
            == [
                "sftp://cucm-backup.telephony.svc:22",
                "ftpes://cucm-backup.telephony.svc:21",
                "ftps://cucm-backup.telephony.svc:990",
            ],
        "endpoints {:?}",
        status.endpoints
    );
    ensure!(status.protocols.as_deref() == Some("SFTP,FTPS"));
    ensure!(
        condition(&server, "TlsCertificateValid")
            .map(|c| c.1)
            .as_deref()
            == Some("CertificateValid")
    );
    ensure!(
        status.tls_certificate.is_some(),
        "no certificate on the status"
    );
    ensure!(status.users == Some(2), "users {:?}", status.users);
    Ok(())
}

async fn owned_objects_carry_labels_owner_and_affinity(client: &Client) -> Result<()> {
    let uid = server(client).await?.uid().context("server without uid")?;
    let statefulset = Api::<StatefulSet>::namespaced(client.clone(), NAMESPACE)
        .get("cucm-backup-gateway")
        .await?;
    let pvc = Api::<PersistentVolumeClaim>::namespaced(client.clone(), NAMESPACE)
        .get("cucm-backup-data")
        .await?;
    let service = Api::<Service>::namespaced(client.clone(), NAMESPACE)
        .get("cucm-backup")
        .await?;
    let secrets = Api::<Secret>::namespaced(client.clone(), NAMESPACE);
    let metas = [
        statefulset.metadata.clone(),
        pvc.metadata.clone(),
        service.metadata.clone(),
        secrets.get("cucm-backup-host-keys").await?.metadata,
        secrets.get("cucm-backup-gateway-config").await?.metadata,
    ];
    for meta in metas {
        let name = meta.name.clone().unwrap_or_default();
        let owner = meta.owner_references.unwrap_or_default();
        ensure!(
            owner.len() == 1 && owner[0].uid == uid && owner[0].controller == Some(true),
            "{name}"
        );
        let labels = meta.labels.unwrap_or_default();
        ensure!(
            labels
                .get("app.kubernetes.io/managed-by")
                .map(String::as_str)
                == Some("sluice"),
            "{name}"
        );
        ensure!(
            labels.get("app.kubernetes.io/instance").map(String::as_str) == Some(SERVER),
            "{name}"
        );
        let managers: Vec<String> = meta
            .managed_fields
            .unwrap_or_default()
            .into_iter()
            .filter_map(|f| f.manager)
            .collect();
        ensure!(
            managers
                .iter()
                .all(|m| m == "sluice" || m.starts_with("kube-")),
            "{name}: {managers:?}"
        );
    }
    let pvc_spec = pvc.spec.context("pvc spec")?;
    ensure!(pvc_spec.storage_class_name.as_deref() == Some("cn-shanghai-ssd"));
    let pod = statefulset
        .spec
        .context("spec")?
        .template
        .spec
        .context("pod spec")?;
    let terms = pod
        .affinity
        .and_then(|a| a.node_affinity)
        .and_then(|n| n.required_during_scheduling_ignored_during_execution)
        .context("no required node affinity")?
        .node_selector_terms;
    let expression = &terms[0]
        .match_expressions
        .as_ref()
        .context("no expressions")?[0];
    ensure!(
        expression.key == REGION_LABEL
            && expression.values.as_deref() == Some(&["cn-shanghai".to_string()][..])
    );
    for volume in pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.secret.as_ref())
    {
        ensure!(
            volume.default_mode == Some(0o440),
            "secret volume mode {:?}",
            volume.default_mode
        );
    }
    let mounts = pod.containers[0].volume_mounts.clone().unwrap_or_default();
    for mount in mounts
        .iter()
        .filter(|m| m.name == "host-keys" || m.name == "config")
    {
        ensure!(mount.read_only == Some(true), "{} is writable", mount.name);
    }
    Ok(())
}

async fn config_holds_hashes_never_passwords(client: &Client, scenario: &Scenario) -> Result<()> {
    let secret = Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .get("cucm-backup-gateway-config")
        .await?;
    let raw = secret
        .data
        .context("no data")?
        .get("config.json")
        .context("no config.json")?
        .0
        .clone();
    let text = String::from_utf8(raw)?;
    ensure!(
        !text.contains(&scenario.password),
        "the plaintext password is in the gateway config"
    );
    let config: GatewayConfig = serde_json::from_str(&text)?;
    let names: Vec<&str> = config.users.iter().map(|u| u.name.as_str()).collect();
    ensure!(names == ["cucm", "ops"], "users {names:?}");
    let hash = config.users[0]
        .password_hash
        .as_deref()
        .context("cucm has no hash")?;
    ensure!(hash.starts_with("$argon2id$"), "hash format");
    ensure!(config.residency.compliant && config.residency.policies == ["mainland-china"]);
    Ok(())
}

/// curl uploads, downloads and deletes as `cucm` over explicit (`ftp://` with
/// `--ssl-reqd`) and implicit (`ftps://`) FTPS, comparing hashes.
async fn the_password_user_transfers_over_explicit_and_implicit_ftps(
    scenario: &Scenario,
    pod: &RunningPod,
) -> Result<()> {
    let dir = scenario.scratch.path();
    let local = dir.join("ftps-upload.bin");
    let expected = random_file(&local, 500_001, 21)?;
    let urls = [
        format!(
            "ftp://{}",
            pod.ports.get(&2121).context("no explicit FTPS port")?
        ),
        format!(
            "ftps://{}",
            pod.ports.get(&2990).context("no implicit FTPS port")?
        ),
    ];
    let stored = pod.volume_dir("data").join("cucm").join("ftps.bin");
    let clients = FtpClients {
        ca: scenario.ca.clone(),
        user: "cucm".into(),
        password: scenario.password.clone(),
    };
    let back = dir.join("ftps-download.bin");
    for url in urls {
        let mut upload = clients.curl();
        upload.arg("-T").arg(&local).arg(format!("{url}/ftps.bin"));
        succeed(upload).await?;
        ensure!(
            sha256_file(&stored)? == expected,
            "{url}: stored bytes differ"
        );
        let mut download = clients.curl();
        download.arg("-o").arg(&back).arg(format!("{url}/ftps.bin"));
        succeed(download).await?;
        ensure!(
            sha256_file(&back)? == expected,
            "{url}: downloaded bytes differ"
        );
        let mut delete = clients.curl();
        delete.args(["-Q", "DELE /ftps.bin"]).arg(format!("{url}/"));
        succeed(delete).await?;
        ensure!(!stored.exists(), "{url}: delete did not delete");
    }
    Ok(())
}

fn sftp_addr(pod: &RunningPod) -> Result<std::net::SocketAddr> {
    pod.ports
        .get(&2222)
        .copied()
        .context("the gateway container exposes no port 2222")
}

async fn both_users_transfer_files_over_sftp(scenario: &Scenario, pod: &RunningPod) -> Result<()> {
    let addr = sftp_addr(pod)?;
    let dir = scenario.scratch.path();
    let users = [
        ("cucm", Auth::Password(scenario.password.clone())),
        ("ops", Auth::Key(scenario.ops_key.clone())),
    ];
    for (seed, (user, auth)) in users.into_iter().enumerate() {
        let client = SftpClient::new(addr, user, auth, &dir.join(user))?;
        let local = dir.join(format!("{user}-upload.bin"));
        let expected = random_file(&local, 300_000 + seed * 7, seed as u64)?;
        let back = dir.join(format!("{user}-download.bin"));
        let listing = client.run(&format!(
            "mkdir incoming\nput {} incoming/report.bin\nls -l incoming\nget incoming/report.bin {}\n\
             rename incoming/report.bin incoming/final.bin\nls incoming\n",
            local.display(),
            back.display()
        ))?;
        ensure!(
            listing.contains("final.bin"),
            "{user}: rename not visible:\n{listing}"
        );
        ensure!(
            sha256_file(&back)? == expected,
            "{user}: downloaded bytes differ"
        );
        let stored = pod.volume_dir("data").join(user).join("incoming/final.bin");
        ensure!(
            sha256_file(&stored)? == expected,
            "{user}: stored bytes differ at {}",
            stored.display()
        );

        client.run("rm incoming/final.bin\nrmdir incoming\n")?;
        ensure!(!stored.exists(), "{user}: remove did not remove");

        let fingerprints = known_host_fingerprints(&client.known_hosts())?;
        let status = server(&scenario.client).await?.status.context("status")?;
        let published: Vec<&str> = status
            .host_key_fingerprints
            .iter()
            .map(|f| f.sha256.as_str())
            .collect();
        ensure!(
            fingerprints.iter().all(|f| published.contains(&f.as_str()))
                && !fingerprints.is_empty(),
            "client saw {fingerprints:?}, status publishes {published:?}"
        );
    }
    Ok(())
}

/// Case C19: the host key is the same after the gateway restarts.
async fn host_key_survives_a_gateway_restart(
    scenario: &Scenario,
    pod: &mut RunningPod,
) -> Result<()> {
    let dir = scenario.scratch.path().join("c19");
    let mut client = SftpClient::new(
        sftp_addr(pod)?,
        "ops",
        Auth::Key(scenario.ops_key.clone()),
        &dir,
    )?;
    client.run("ls\n")?;
    pod.restart().await?;
    client.strict_host_key_checking = "yes";
    client.set_addr(sftp_addr(pod)?);
    client
        .run("ls\n")
        .context("reconnecting with the pinned host key failed")?;
    Ok(())
}

async fn policy_counts_the_compliant_server(client: &Client) -> Result<()> {
    let policies = Api::<sluice::api::DataResidencyPolicy>::all(client.clone());
    eventually("policy status counts", WAIT, || async {
        let status = policies
            .get("mainland-china")
            .await?
            .status
            .unwrap_or_default();
        Ok(
            (status.governed_servers == Some(1) && status.compliant_servers == Some(1))
                .then_some(()),
        )
    })
    .await
}

/// Case C21: after convergence, an operator restart writes nothing.
async fn restart_operator_writes_nothing(client: &Client, operator: Operator) -> Result<Operator> {
    let before = settled_state(client, NAMESPACE).await?;
    operator.stop().await?;
    let operator = Operator::start(client.clone());
    // The new operator lists everything and reconciles every object once at start-up;
    // after that first pass, give any write it would make a few seconds to land.
    operator
        .first_pass_done(&["server", "user", "policy"])
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let changed = changed_keys(&before, &written_state(client, NAMESPACE).await?);
    if !changed.is_empty() {
        bail!("an operator restart wrote to {changed:?}");
    }
    Ok(operator)
}
