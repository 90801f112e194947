//! FTPS end to end on a real control plane: a TransferServer with explicit and implicit
//! FTPS rendered by the operator, its certificate reported from the `kubernetes.io/tls`
//! Secret and renewed in place, real transfers with curl and lftp through the gateway
//! pod, passive ports split between the pods of a load-balanced server, and the
//! residency rule on plaintext FTP.
//!
//! One control plane serves the whole scenario; each step is a function named for the
//! behaviour it checks, run in order because later steps build on earlier ones.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::{Patch, PatchParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use sluice::api::TransferServer;
use sluice::gateway::ftps::certificate_info;

use support::cluster::{
    Operator, apply_all, condition, eventually, gateway_config, install_crds,
    install_storage_classes, refused, wait_for_gateway_users,
};
use support::controlplane::ControlPlane;
use support::ftp::{FtpClients, pasv_port, succeed, succeed_with_stderr};
use support::gateway::{TestPki, VALID_UNTIL};
use support::kubelet::{FakeKubelet, RunningPod};
use support::sftp::{random_file, sha256_file};

const NS: &str = "partners";
const SERVER: &str = "exchange";
const BALANCED: &str = "exchange-lb";
const TLS_SECRET: &str = "exchange-tls";
const USER: &str = "acme";
const BALANCED_USER: &str = "globex";
const PASSWORD: &str = "Ftps-e2e-7c1d";
const REGION_LABEL: &str = "topology.kubernetes.io/region";
const WAIT: Duration = Duration::from_secs(60);
/// Container ports of explicit and implicit FTPS, as the operator renders them.
const EXPLICIT: i32 = 2121;
const IMPLICIT: i32 = 2990;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ftps_server_serves_both_modes_with_a_renewable_certificate_and_per_pod_passive_ports()
-> Result<()> {
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
    let operator = Operator::start(client.clone());
    let scratch = tempfile::tempdir()?;

    apply_all(&client, &[namespace(), policy(false), password_secret()]).await?;
    malformed_ftps_specs_are_refused_or_stalled(&client).await?;
    plaintext_ftp_is_refused_until_the_policy_allows_it(&client).await?;

    // Passive ranges of parallel tests must not overlap: they are bound on 127.0.0.1.
    let passive = 40_000 + 100 * (rand::random::<u16>() % 100);
    apply_all(
        &client,
        &[
            server(SERVER, 1, "ClusterIP", passive, 16),
            user(USER, SERVER),
        ],
    )
    .await?;
    the_rendered_objects_expose_every_ftps_port(&client, passive).await?;
    a_missing_certificate_is_reported_with_a_warning(&client).await?;
    wait_for_gateway_users(&client, NS, SERVER, &[USER]).await?;
    let mut pod = kubelet
        .run_pod(NS, &format!("app.kubernetes.io/instance={SERVER}"))
        .await
        .context("the gateway pod did not run")?;

    let pki = TestPki::new()?;
    let ca = scratch.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem)?;
    let certificate = pki.issue(VALID_UNTIL)?;
    certificate_is_reported_once_the_secret_exists(&client, &pod, &certificate).await?;

    let clients = FtpClients {
        ca,
        user: USER.into(),
        password: PASSWORD.into(),
    };
    let explicit = format!("ftp://{}", pod.ports[&EXPLICIT]);
    let implicit = format!("ftps://{}", pod.ports[&IMPLICIT]);
    for (mode, url) in [("explicit", &explicit), ("implicit", &implicit)] {
        curl_round_trip(&clients, &pod, url, scratch.path())
            .await
            .with_context(|| format!("curl over {mode} FTPS\n{}", pod.log()))?;
        lftp_round_trip(&clients, &pod, url, scratch.path())
            .await
            .with_context(|| format!("lftp over {mode} FTPS\n{}", pod.log()))?;
    }
    let clients =
        a_renewed_certificate_is_served_without_a_restart(&client, &pod, &explicit, scratch.path())
            .await
            .with_context(|| pod.log())?;

    a_gateway_deployment_of_an_earlier_version_is_removed(&client).await?;
    node_ports_show_in_the_endpoints_and_a_taken_one_stalls_the_server(&client).await?;
    passive_ports_are_split_between_load_balanced_pods(&client, &kubelet, &clients, passive)
        .await?;
    an_expired_certificate_stops_ftps_with_a_condition_and_a_warning(&client, &pod, &pki)
        .await
        .with_context(|| pod.log())?;
    a_new_pod_template_is_not_ready_before_its_pods_are(&client, &pod, &pki, passive).await?;
    pod.stop().await;
    operator.stop().await?;
    Ok(())
}

fn namespace() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NS, "labels": {"sluice.dev/residency": "cn"}},
    })
}

fn policy(allow_plaintext: bool) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "DataResidencyPolicy",
        "metadata": {"name": "mainland-china"},
        "spec": {
            "namespaceSelector": {"matchLabels": {"sluice.dev/residency": "cn"}},
            "allowedRegions": ["cn-shanghai"],
            "enforcement": "Enforce",
            "allowPlaintextFtp": allow_plaintext,
        },
    })
}

fn password_secret() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "acme-password", "namespace": NS},
        "stringData": {"password": PASSWORD},
    })
}

fn tls_secret((cert, key): &(String, String)) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": TLS_SECRET, "namespace": NS},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": cert, "tls.key": key},
    })
}

fn server(name: &str, replicas: i32, service: &str, passive: u16, count: u16) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "TransferServer",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "region": "cn-shanghai",
            "replicas": replicas,
            "protocols": {
                "sftp": {},
                "ftps": {
                    "explicit": {},
                    "implicit": {"port": 9990},
                    "tlsSecretRef": {"name": TLS_SECRET},
                    "passivePorts": {"first": passive, "count": count},
                },
            },
            "storage": {"volume": {
                "storageClassName": "cn-shanghai-ssd",
                "size": "1Gi",
                "accessMode": "ReadWriteMany",
            }},
            "service": {"type": service},
        },
    })
}

fn user(name: &str, server: &str) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "TransferUser",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "serverRef": {"name": server},
            "passwordSecretRef": {"name": "acme-password"},
            "homeDirectory": format!("/{name}"),
            "permissions": ["list", "read", "write", "delete", "mkdir", "rename"],
        },
    })
}

async fn get_server(client: &Client, name: &str) -> Result<TransferServer> {
    Ok(Api::<TransferServer>::namespaced(client.clone(), NS)
        .get(name)
        .await?)
}

async fn wait_condition(
    client: &Client,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> Result<TransferServer> {
    let what = format!("{name}: {type_}={status} ({reason})");
    eventually(&what, WAIT, || async {
        let server = get_server(client, name).await?;
        let found = condition(&server, type_).is_some_and(|(s, r, _)| s == status && r == reason);
        Ok(found.then_some(server))
    })
    .await
}

async fn warning_event(client: &Client, name: &str, reason: &str) -> Result<String> {
    support::cluster::warning_event(client, NS, name, reason, WAIT).await
}

async fn malformed_ftps_specs_are_refused_or_stalled(client: &Client) -> Result<()> {
    let with = |pointer: &str, value: Value| {
        let mut object = server("bad", 1, "ClusterIP", 45_000, 4);
        let (parent, key) = pointer.rsplit_once('/').expect("a JSON pointer");
        let parent = object
            .pointer_mut(parent)
            .expect("the fixture has the parent");
        parent[key] = value;
        object
    };
    let ftps = "/spec/protocols/ftps";
    let no_mode = with(ftps, json!({"tlsSecretRef": {"name": TLS_SECRET}}));
    refused(client, no_mode, "ftps needs explicit, implicit or both").await?;
    let implicit_plaintext = with(
        ftps,
        json!({"implicit": {}, "allowPlaintext": true, "tlsSecretRef": {"name": TLS_SECRET}}),
    );
    refused(
        client,
        implicit_plaintext,
        "allowPlaintext applies to the explicit port",
    )
    .await?;
    let no_secret = with(ftps, json!({"explicit": {}}));
    refused(client, no_secret, "tlsSecretRef").await?;
    let past_the_end = with(
        &format!("{ftps}/passivePorts"),
        json!({"first": 65530, "count": 10}),
    );
    refused(client, past_the_end, "must end at or below port 65535").await?;
    let privileged = with(&format!("{ftps}/passivePorts/first"), json!(21));
    refused(client, privileged, "passivePorts.first").await?;
    // What kubectl sends for an unquoted `sessionReuse: Off` (YAML 1.1 reads a boolean).
    let boolean = with(&format!("{ftps}/sessionReuse"), json!(false));
    refused(client, boolean, "sessionReuse").await?;
    refused(
        client,
        with("/spec/protocols", json!({})),
        "at least one protocol",
    )
    .await?;

    // Shapes only the operator can judge stall the server with the reason.
    let node_port = server("bad-nodeport", 1, "NodePort", 31_000, 4);
    let crowded = server("bad-crowded", 3, "LoadBalancer", 45_000, 2);
    let mut clash = server("bad-clash", 1, "ClusterIP", 45_000, 4);
    clash["spec"]["protocols"]["sftp"]["port"] = 21.into();
    for (object, needle) in [
        (node_port, "passiveAddress"),
        (crowded, "at least replicas (3)"),
        (clash, "sftp.port and ftps.explicit.port are both 21"),
    ] {
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        apply_all(client, std::slice::from_ref(&object)).await?;
        let stalled = wait_condition(client, &name, "Stalled", "True", "InvalidSpec").await?;
        let message = condition(&stalled, "Stalled").unwrap_or_default().2;
        ensure!(message.contains(needle), "{name}: {message}");
        let secrets = Api::<Secret>::namespaced(client.clone(), NS);
        let config = secrets.get_opt(&format!("{name}-gateway-config")).await?;
        ensure!(config.is_none(), "{name}: rendered although it stalled");
        Api::<TransferServer>::namespaced(client.clone(), NS)
            .delete(&name, &Default::default())
            .await?;
    }
    Ok(())
}

async fn plaintext_ftp_is_refused_until_the_policy_allows_it(client: &Client) -> Result<()> {
    let mut plain = server("plain", 1, "ClusterIP", 45_000, 4);
    plain["spec"]["protocols"]["ftps"]["allowPlaintext"] = true.into();
    apply_all(client, &[plain]).await?;
    let refused = wait_condition(
        client,
        "plain",
        "ResidencyCompliant",
        "False",
        "PlaintextNotAllowed",
    )
    .await?;
    ensure!(condition(&refused, "Stalled").is_some_and(|c| c.0 == "True"));
    let message = warning_event(client, "plain", "PlaintextNotAllowed").await?;
    ensure!(
        message.contains("mainland-china") && message.contains("allowPlaintextFtp"),
        "{message}"
    );
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), NS);
    ensure!(
        statefulsets.get_opt("plain-gateway").await?.is_none(),
        "a refused server was rolled out"
    );

    apply_all(client, &[policy(true)]).await?;
    wait_condition(
        client,
        "plain",
        "ResidencyCompliant",
        "True",
        "RegionAllowed",
    )
    .await?;
    ensure!(
        gateway_config(client, NS, "plain")
            .await?
            .ftps
            .is_some_and(|f| f.allow_plaintext)
    );

    // Back to the default for the rest of the scenario; the plaintext server goes.
    apply_all(client, &[policy(false)]).await?;
    Api::<TransferServer>::namespaced(client.clone(), NS)
        .delete("plain", &Default::default())
        .await?;
    Ok(())
}

async fn the_rendered_objects_expose_every_ftps_port(client: &Client, passive: u16) -> Result<()> {
    let services = Api::<Service>::namespaced(client.clone(), NS);
    let service = eventually("the Service", WAIT, || async {
        services.get_opt(SERVER).await.map_err(Into::into)
    })
    .await?;
    let ports: Vec<(String, i32)> = service
        .spec
        .and_then(|s| s.ports)
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p.name.unwrap_or_default(), p.port))
        .collect();
    let mut expected = vec![
        ("sftp".to_string(), 22),
        ("ftps".to_string(), 21),
        ("ftps-implicit".to_string(), 9990),
    ];
    expected.extend((passive..passive + 16).map(|p| (format!("pasv-{p}"), i32::from(p))));
    ensure!(ports == expected, "Service ports {ports:?}");

    // The operator writes the Service before the StatefulSet.
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), NS);
    let name = format!("{SERVER}-gateway");
    let statefulset = eventually("the StatefulSet", WAIT, || async {
        statefulsets.get_opt(&name).await.map_err(Into::into)
    })
    .await?;
    let pod = statefulset
        .spec
        .and_then(|s| s.template.spec)
        .context("no pod template")?;
    let container = &pod.containers[0];
    let container_ports: Vec<i32> = container
        .ports
        .iter()
        .flatten()
        .map(|p| p.container_port)
        .collect();
    // Three control ports, sixteen passive ports and the health port.
    ensure!(container_ports.len() == 3 + 16 + 1, "{container_ports:?}");
    ensure!(container_ports.contains(&i32::from(passive + 15)));
    let tls = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "tls")
        .and_then(|v| v.secret.clone())
        .context("no TLS volume")?;
    ensure!(tls.secret_name.as_deref() == Some(TLS_SECRET));
    ensure!(
        tls.optional == Some(true),
        "a missing certificate must not block the pod"
    );

    let config = gateway_config(client, NS, SERVER).await?;
    let ftps = config.ftps.context("no ftps section")?;
    ensure!(ftps.explicit && ftps.implicit && !ftps.allow_plaintext);
    ensure!(ftps.passive_ports.first == passive && ftps.passive_ports.count == 16);
    ensure!(ftps.replicas.is_empty(), "one pod serves the whole range");
    ensure!(ftps.epsv, "one pod: EPSV reaches it");
    Ok(())
}

async fn a_missing_certificate_is_reported_with_a_warning(client: &Client) -> Result<()> {
    let server = wait_condition(
        client,
        SERVER,
        "TlsCertificateValid",
        "False",
        "CertificateMissing",
    )
    .await?;
    let message = condition(&server, "TlsCertificateValid")
        .unwrap_or_default()
        .2;
    ensure!(message.contains(TLS_SECRET), "{message}");
    warning_event(client, SERVER, "CertificateMissing").await?;
    ensure!(server.status.and_then(|s| s.tls_certificate).is_none());
    Ok(())
}

async fn certificate_is_reported_once_the_secret_exists(
    client: &Client,
    pod: &RunningPod,
    certificate: &(String, String),
) -> Result<()> {
    // Until then the gateway refuses FTPS with a clear reply.
    let refused = ftp_greeting(pod.ports[&EXPLICIT]).await?;
    ensure!(
        refused.starts_with("421"),
        "without a certificate: {refused}"
    );

    apply_all(client, &[tls_secret(certificate)]).await?;
    pod.sync_secrets().await?;
    let fingerprint = certificate_info(certificate.0.as_bytes())?.sha256_fingerprint;
    let server = eventually("the certificate on the status", WAIT, || async {
        let server = get_server(client, SERVER).await?;
        let shown = server
            .status
            .as_ref()
            .and_then(|s| s.tls_certificate.clone());
        Ok(shown
            .filter(|c| c.sha256 == fingerprint)
            .map(|c| (server, c)))
    })
    .await?;
    let (server, shown) = server;
    ensure!(shown.not_after == "2099-12-31T00:00:00Z", "{shown:?}");
    ensure!(condition(&server, "TlsCertificateValid").is_some_and(|c| c.1 == "CertificateValid"));
    let endpoints = server.status.map(|s| s.endpoints).unwrap_or_default();
    let host = format!("{SERVER}.{NS}.svc");
    ensure!(
        endpoints
            == [
                format!("sftp://{host}:22"),
                format!("ftpes://{host}:21"),
                format!("ftps://{host}:9990"),
            ],
        "{endpoints:?}"
    );
    wait_condition(client, SERVER, "Ready", "True", "RolledOut").await?;

    eventually("FTPS served", WAIT, || async {
        Ok(ftp_greeting(pod.ports[&EXPLICIT])
            .await?
            .starts_with("220")
            .then_some(()))
    })
    .await
}

/// The first reply on a plain control connection.
async fn ftp_greeting(addr: std::net::SocketAddr) -> Result<String> {
    use tokio::io::AsyncBufReadExt;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let mut lines = tokio::io::BufReader::new(stream).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await??;
    line.context("the connection closed without a reply")
}

fn stored(pod: &RunningPod, path: &str) -> PathBuf {
    pod.volume_dir("data").join(USER).join(path)
}

/// Login, upload (hash checked on the volume), list, download, resumed download, rename
/// and delete, with curl.
async fn curl_round_trip(
    clients: &FtpClients,
    pod: &RunningPod,
    base: &str,
    dir: &Path,
) -> Result<()> {
    let source = dir.join("batch.bin");
    let sha = random_file(&source, 2 * 1024 * 1024 + 5, 11)?;
    let mut upload = clients.curl();
    upload
        .arg("--ftp-create-dirs")
        .arg("-T")
        .arg(&source)
        .arg(format!("{base}/in/batch.bin"));
    succeed(upload).await?;
    ensure!(
        sha256_file(&stored(pod, "in/batch.bin"))? == sha,
        "stored copy differs"
    );

    let mut list = clients.curl();
    list.arg(format!("{base}/in/"));
    let listing = succeed(list).await?;
    ensure!(
        listing
            .lines()
            .any(|l| l.ends_with(" batch.bin") && l.contains("2097157")),
        "{listing}"
    );

    let back = dir.join("back.bin");
    let mut download = clients.curl();
    download
        .arg("-o")
        .arg(&back)
        .arg(format!("{base}/in/batch.bin"));
    succeed(download).await?;
    ensure!(sha256_file(&back)? == sha, "the download differs");

    let partial = dir.join("partial.bin");
    std::fs::write(&partial, &std::fs::read(&source)?[..700_001])?;
    let mut resume = clients.curl();
    resume
        .args(["-C", "-", "-o"])
        .arg(&partial)
        .arg(format!("{base}/in/batch.bin"));
    succeed(resume).await?;
    ensure!(
        sha256_file(&partial)? == sha,
        "the resumed download differs"
    );

    let mut rename = clients.curl();
    rename
        .args(["-Q", "RNFR /in/batch.bin", "-Q", "RNTO /in/done.bin"])
        .arg(format!("{base}/in/"));
    succeed(rename).await?;
    ensure!(sha256_file(&stored(pod, "in/done.bin"))? == sha);
    ensure!(!stored(pod, "in/batch.bin").exists());

    let mut delete = clients.curl();
    delete
        .args(["-Q", "DELE /in/done.bin", "-Q", "RMD /in"])
        .arg(format!("{base}/"));
    succeed(delete).await?;
    ensure!(!stored(pod, "in").exists(), "files were left behind");
    Ok(())
}

/// Upload, listing, download, rename and removal with lftp.
async fn lftp_round_trip(
    clients: &FtpClients,
    pod: &RunningPod,
    url: &str,
    dir: &Path,
) -> Result<()> {
    let source = dir.join("lftp.csv");
    let sha = random_file(&source, 300_007, 12)?;
    let back = dir.join("lftp-back.csv");
    let _ = std::fs::remove_file(&back);
    let commands = format!(
        "mkdir -p out; cd out; put {source} -o report.csv; cls -l; get report.csv -o {back}; \
         mv report.csv final.csv; cls",
        source = source.display(),
        back = back.display()
    );
    let output = succeed(clients.lftp(url, &commands)).await?;
    ensure!(
        output.contains("final.csv") && output.contains("300007"),
        "{output}"
    );
    ensure!(sha256_file(&back)? == sha, "lftp's download differs");
    ensure!(sha256_file(&stored(pod, "out/final.csv"))? == sha);
    succeed(clients.lftp(url, "rm out/final.csv; rmdir out")).await?;
    ensure!(!stored(pod, "out").exists(), "lftp left files behind");
    Ok(())
}

/// Returns clients that trust the renewed certificate's CA.
async fn a_renewed_certificate_is_served_without_a_restart(
    client: &Client,
    pod: &RunningPod,
    url: &str,
    dir: &Path,
) -> Result<FtpClients> {
    // A renewal from another CA: only the new certificate satisfies a client that
    // trusts only the new CA, so a successful listing proves it is served.
    let pki = TestPki::new()?;
    let ca = dir.join("renewed-ca.pem");
    std::fs::write(&ca, &pki.ca_pem)?;
    let renewed = pki.issue((2098, 6, 30))?;
    apply_all(client, &[tls_secret(&renewed)]).await?;
    pod.sync_secrets().await?;

    let clients = FtpClients {
        ca,
        user: USER.into(),
        password: PASSWORD.into(),
    };
    eventually("the renewed certificate served", WAIT, || async {
        let mut list = clients.curl();
        list.arg(format!("{url}/"));
        Ok(succeed(list).await.ok())
    })
    .await?;
    let fingerprint = certificate_info(renewed.0.as_bytes())?.sha256_fingerprint;
    eventually("the renewed certificate on the status", WAIT, || async {
        let server = get_server(client, SERVER).await?;
        let shown = server.status.and_then(|s| s.tls_certificate);
        Ok(shown.filter(|c| c.sha256 == fingerprint && c.not_after.starts_with("2098-06-30")))
    })
    .await?;
    ensure!(
        pod.log().matches("Gateway listening").count() == 1,
        "the gateway restarted"
    );
    Ok(clients)
}

/// Two pods behind LoadBalancer Services: each pod's share of the passive range has a
/// Service of its own, each pod announces its own load balancer's address (given here
/// as 127.0.0.1, as a cloud controller would write it), and transfers through either
/// pod use only ports of that pod's share. Scaling down removes the extra Service.
async fn passive_ports_are_split_between_load_balanced_pods(
    client: &Client,
    kubelet: &FakeKubelet,
    clients: &FtpClients,
    passive: u16,
) -> Result<()> {
    let first = passive + 50;
    let clients = FtpClients {
        user: BALANCED_USER.into(),
        ..clients.clone()
    };
    apply_all(
        client,
        &[
            server(BALANCED, 2, "LoadBalancer", first, 9),
            user(BALANCED_USER, BALANCED),
        ],
    )
    .await?;
    let services = Api::<Service>::namespaced(client.clone(), NS);
    let mut shares = Vec::new();
    for ordinal in 0..2u16 {
        let name = format!("{BALANCED}-gateway-{ordinal}");
        let service = eventually(&format!("Service {name}"), WAIT, || async {
            services.get_opt(&name).await.map_err(Into::into)
        })
        .await?;
        let spec = service.spec.context("no spec")?;
        let selector = spec.selector.unwrap_or_default();
        ensure!(
            selector.get("statefulset.kubernetes.io/pod-name") == Some(&name),
            "{selector:?}"
        );
        ensure!(spec.type_.as_deref() == Some("LoadBalancer"));
        let ports: Vec<i32> = spec.ports.iter().flatten().map(|p| p.port).collect();
        let start = i32::from(first + 4 * ordinal);
        ensure!(
            ports == (start..start + 4).collect::<Vec<_>>(),
            "{name}: {ports:?}"
        );
        shares.push(start..start + 4);
    }
    let main = services.get(BALANCED).await?;
    let main_ports: Vec<String> = main
        .spec
        .and_then(|s| s.ports)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| p.name)
        .collect();
    ensure!(
        main_ports == ["sftp", "ftps", "ftps-implicit"],
        "{main_ports:?}"
    );
    wait_condition(client, BALANCED, "Ready", "False", "WaitingForGateway").await?;

    let pods = [
        kubelet
            .run_pod(NS, &format!("app.kubernetes.io/instance={BALANCED}"))
            .await?,
        kubelet
            .run_pod(NS, &format!("app.kubernetes.io/instance={BALANCED}"))
            .await?,
    ];
    wait_condition(
        client,
        BALANCED,
        "Reconciling",
        "True",
        "WaitingForLoadBalancer",
    )
    .await?;
    for ordinal in 0..2 {
        assign_load_balancer(&services, &format!("{BALANCED}-gateway-{ordinal}")).await?;
    }
    assign_load_balancer(&services, BALANCED).await?;
    let config = eventually("per-pod passive addresses", WAIT, || async {
        let config = gateway_config(client, NS, BALANCED).await?;
        let ftps = config.ftps.clone().context("no ftps")?;
        let known = ftps.replicas.len() == 2
            && ftps
                .replicas
                .iter()
                .all(|r| r.passive_address.as_deref() == Some("127.0.0.1"));
        Ok(known.then_some(ftps))
    })
    .await?;
    ensure!(config.replicas[1].passive_ports.first == first + 4);
    ensure!(
        !config.epsv,
        "EPSV through the shared address could reach the other pod"
    );

    for pod in &pods {
        let ordinal: usize = pod.name.rsplit('-').next().unwrap_or_default().parse()?;
        let share = &shares[ordinal];
        // Each pod's configuration poll picks up the addresses; until then it announces
        // its local address, which is the same here, so wait only for the file.
        pod.sync_secrets().await?;
        let announced = eventually("a transfer through the pod", WAIT, || async {
            let mut list = clients.curl();
            list.args(["--verbose", "--disable-epsv", "--no-ftp-skip-pasv-ip"])
                .arg(format!("ftp://{}/", pod.ports[&EXPLICIT]));
            match succeed_with_stderr(list).await {
                Ok((_, verbose)) => Ok(pasv_port(&verbose)),
                Err(error) => {
                    eprintln!("not yet: {error:#}");
                    Ok(None)
                }
            }
        })
        .await
        .with_context(|| pod.log())?;
        ensure!(
            share.contains(&i32::from(announced)),
            "{} announced port {announced}, outside its share {share:?}",
            pod.name
        );
    }

    apply_all(client, &[server(BALANCED, 1, "LoadBalancer", first, 9)]).await?;
    eventually("the second pod's Service removed", WAIT, || async {
        let gone = services
            .get_opt(&format!("{BALANCED}-gateway-1"))
            .await?
            .is_none();
        Ok(gone.then_some(()))
    })
    .await?;
    eventually(
        "the passive ports back on the main Service",
        WAIT,
        || async {
            let service = services.get(BALANCED).await?;
            let count = service.spec.and_then(|s| s.ports).map_or(0, |p| p.len());
            let gone = services
                .get_opt(&format!("{BALANCED}-gateway-0"))
                .await?
                .is_none();
            Ok((count == 3 + 9 && gone).then_some(()))
        },
    )
    .await?;
    for mut pod in pods {
        pod.stop().await;
    }
    Ok(())
}

async fn an_expired_certificate_stops_ftps_with_a_condition_and_a_warning(
    client: &Client,
    pod: &RunningPod,
    pki: &TestPki,
) -> Result<()> {
    let expired = pki.issue((2021, 3, 1))?;
    apply_all(client, &[tls_secret(&expired)]).await?;
    pod.sync_secrets().await?;
    let server = wait_condition(
        client,
        SERVER,
        "TlsCertificateValid",
        "False",
        "CertificateExpired",
    )
    .await?;
    let ready = condition(&server, "Ready").unwrap_or_default();
    ensure!(
        ready.0 == "False" && ready.1 == "CertificateExpired" && ready.2.contains("2021-03-01"),
        "{ready:?}"
    );
    let message = warning_event(client, SERVER, "CertificateExpired").await?;
    ensure!(message.contains("expired"), "{message}");
    eventually(
        "FTPS refused with the expired certificate",
        WAIT,
        || async {
            let reply = ftp_greeting(pod.ports[&EXPLICIT]).await?;
            Ok(reply.starts_with("421").then_some(()))
        },
    )
    .await
}

/// Versions before the StatefulSet ran the gateway as a Deployment of the same name; its
/// pods would share the Service and hold the volume, so the operator removes it.
async fn a_gateway_deployment_of_an_earlier_version_is_removed(client: &Client) -> Result<()> {
    let server = get_server(client, SERVER).await?;
    let uid = server.metadata.uid.clone().context("no uid")?;
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": format!("{SERVER}-gateway"),
            "namespace": NS,
            "ownerReferences": [{
                "apiVersion": "sluice.dev/v1alpha1",
                "kind": "TransferServer",
                "name": SERVER,
                "uid": uid,
                "controller": true,
            }],
        },
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"legacy": SERVER}},
            "template": {
                "metadata": {"labels": {"legacy": SERVER}},
                "spec": {"containers": [{"name": "gateway", "image": "sluice"}]},
            },
        },
    });
    apply_all(client, &[deployment]).await?;
    // Any change to the server makes the operator look again.
    let touch = json!({"metadata": {"annotations": {"sluice.dev/test-touch": "1"}}});
    Api::<TransferServer>::namespaced(client.clone(), NS)
        .patch(SERVER, &PatchParams::default(), &Patch::Merge(&touch))
        .await?;
    let deployments = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), NS);
    eventually("the legacy Deployment removed", WAIT, || async {
        let gone = deployments
            .get_opt(&format!("{SERVER}-gateway"))
            .await?
            .is_none();
        Ok(gone.then_some(()))
    })
    .await
}

async fn node_ports_show_in_the_endpoints_and_a_taken_one_stalls_the_server(
    client: &Client,
) -> Result<()> {
    // Node ports belong to this test's own control plane, and nothing binds them here.
    let first = 30_000;
    let mut one = server("np-one", 1, "NodePort", first, 4);
    one["spec"]["protocols"]["ftps"]["passiveAddress"] = "127.0.0.1".into();
    let mut two = one.clone();
    two["metadata"]["name"] = "np-two".into();
    apply_all(client, &[one]).await?;

    let services = Api::<Service>::namespaced(client.clone(), NS);
    let (endpoints, node_port) = eventually("NodePort endpoints", WAIT, || async {
        let server = get_server(client, "np-one").await?;
        let endpoints = server.status.map(|s| s.endpoints).unwrap_or_default();
        let Some(service) = services.get_opt("np-one").await? else {
            return Ok(None);
        };
        let node_port = service
            .spec
            .and_then(|s| s.ports)
            .unwrap_or_default()
            .into_iter()
            .find(|p| p.name.as_deref() == Some("ftps"))
            .and_then(|p| p.node_port);
        let expected = node_port.map(|p| format!("ftpes://127.0.0.1:{p}"));
        let shown = expected.is_some_and(|e| endpoints.contains(&e));
        Ok(shown.then_some((endpoints, node_port)))
    })
    .await?;
    ensure!(
        endpoints.len() == 3,
        "{endpoints:?} (node port {node_port:?})"
    );

    apply_all(client, &[two.clone()]).await?;
    let stalled = wait_condition(client, "np-two", "Stalled", "True", "Rejected").await?;
    let message = condition(&stalled, "Stalled").unwrap_or_default().2;
    ensure!(
        message.contains("already allocated") && message.contains(&first.to_string()),
        "{message}"
    );
    warning_event(client, "np-two", "Rejected").await?;

    two["spec"]["protocols"]["ftps"]["passivePorts"]["first"] = (first + 10).into();
    apply_all(client, &[two]).await?;
    wait_condition(client, "np-two", "Stalled", "False", "Reconciled").await?;
    let servers = Api::<TransferServer>::namespaced(client.clone(), NS);
    for name in ["np-one", "np-two"] {
        servers.delete(name, &Default::default()).await?;
    }
    Ok(())
}

/// A change to the pod template (here the passive range) makes the StatefulSet replace
/// its pod; until the new pod is ready, the new generation must not be reported Ready
/// (`kubectl wait`, Flux and Argo CD would take it as rolled out). The stand-in kubelet
/// does not run the replacement, so the server must settle on WaitingForGateway.
async fn a_new_pod_template_is_not_ready_before_its_pods_are(
    client: &Client,
    pod: &RunningPod,
    pki: &TestPki,
    passive: u16,
) -> Result<()> {
    apply_all(client, &[tls_secret(&pki.issue(VALID_UNTIL)?)]).await?;
    pod.sync_secrets().await?;
    wait_condition(client, SERVER, "Ready", "True", "RolledOut").await?;

    // Watch every write of the server from now on, so no short-lived status is missed.
    let servers = Api::<TransferServer>::namespaced(client.clone(), NS);
    let before = get_server(client, SERVER).await?.metadata;
    let version = before.resource_version.context("no resourceVersion")?;
    let params = WatchParams::default().fields(&format!("metadata.name={SERVER}"));
    let mut writes = servers.watch(&params, &version).await?.boxed();
    apply_all(client, &[server(SERVER, 1, "ClusterIP", passive, 12)]).await?;

    // Every write until the new generation is reported waiting (however slow the
    // reconcile), and then 3 s more, must not call the new generation Ready.
    let mut seen = Vec::new();
    let mut deadline = tokio::time::Instant::now() + WAIT;
    let mut waiting = false;
    loop {
        let event = match tokio::time::timeout_at(deadline, writes.next()).await {
            Ok(Some(event)) => event?,
            Ok(None) => bail!("the watch of the server ended; seen {seen:?}"),
            Err(_) if waiting => break,
            Err(_) => bail!("the new generation was never reported WaitingForGateway: {seen:?}"),
        };
        let WatchEvent::Modified(server) = event else {
            continue;
        };
        let generation = server.metadata.generation;
        let observed = server.status.as_ref().and_then(|s| s.observed_generation);
        let ready = condition(&server, "Ready").unwrap_or_default();
        let new = generation > before.generation && observed == generation;
        ensure!(
            !(new && ready.0 == "True"),
            "generation {generation:?} reported Ready before its pod ran: {ready:?}"
        );
        if new && ready.1 == "WaitingForGateway" && !waiting {
            waiting = true;
            deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        }
        seen.push(ready.1);
    }
    Ok(())
}

/// Writes a load-balancer address into a Service's status, as a cloud controller would.
async fn assign_load_balancer(services: &Api<Service>, name: &str) -> Result<()> {
    let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": "127.0.0.1"}]}}});
    services
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}
