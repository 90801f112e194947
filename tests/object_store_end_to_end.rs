//! The operator and a gateway with object storage, on a real control plane and a real
//! S3-compatible server (SeaweedFS on 127.0.0.1): what the operator renders for a bucket,
//! how it probes it, how it reports a missing bucket, wrong credentials, an unreachable
//! endpoint and a missing Secret, how the policy judges the bucket's region, and a
//! gateway pod (run by the stand-in kubelet) storing an SFTP upload in the bucket.

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Event, PersistentVolumeClaim};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use sluice::api::TransferServer;
use sluice::storage::object::Provider;

use support::cluster::{
    Operator, apply, apply_all, condition, eventually, gateway_config, install_crds,
    install_storage_classes, parse_yaml, refused, wait_for_gateway_users, warning_event,
};
use support::controlplane::ControlPlane;
use support::kubelet::FakeKubelet;
use support::s3::{
    ACCESS_KEY_ID as ACCESS_KEY, SECRET_ACCESS_KEY as SECRET_KEY, SeaweedFs, all_keys,
};
use support::sftp::{Auth, SftpClient, random_file, sha256_file, sha256_hex};

const NS: &str = "archives";
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_servers_are_rendered_probed_and_judged() -> Result<()> {
    let s3 = SeaweedFs::start()?;
    let bucket = s3.bucket("cucm-backups")?;
    let control_plane = ControlPlane::start().await?;
    let client = control_plane.client();
    install_crds(&client).await?;
    install_storage_classes(&client, &["ssd", "cn-shanghai-ssd"]).await?;
    let operator = Operator::start(client.clone());
    let namespace = json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NS, "labels": {"sluice.dev/residency": "cn"}},
    });
    apply_all(
        &client,
        &[namespace, credentials("s3-credentials", SECRET_KEY)],
    )
    .await?;
    let policy = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/01-policy.yaml"),
    )?;
    for object in parse_yaml(&policy)? {
        apply(&client, &object).await?;
    }

    malformed_stores_are_refused_by_the_api_server(&client, &s3, &bucket).await?;
    a_bucket_is_rendered_and_probed(&client, &s3, &bucket).await?;
    wrong_credentials_are_reported_without_secrets(&client, &bucket).await?;
    a_missing_bucket_an_unreachable_endpoint_and_a_missing_secret_are_told_apart(
        &client, &s3, &bucket,
    )
    .await?;
    storage_outside_the_policy_is_not_rolled_out(&client, &s3, &bucket).await?;
    the_gateway_keeps_uploads_in_the_bucket(&client, &s3, &bucket).await?;
    operator.stop().await
}

fn credentials(name: &str, secret_key: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "stringData": {"accessKeyId": ACCESS_KEY, "secretAccessKey": secret_key},
    })
}

fn server(name: &str, store: Value) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "TransferServer",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "region": "cn-shanghai",
            "protocols": {"sftp": {}},
            "storage": {"objectStore": store},
        },
    })
}

fn seaweed_store(s3: &SeaweedFs, bucket: &str, secret: &str) -> Value {
    json!({
        "provider": "S3Compatible",
        "bucket": bucket,
        "prefix": "gateways/cucm",
        "region": "cn-shanghai",
        "endpoint": s3.endpoint(),
        "addressingStyle": "Path",
        "credentials": {"secretRef": {"name": secret}},
    })
}

async fn wait_for_condition(
    client: &Client,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> Result<(TransferServer, String)> {
    let api = Api::<TransferServer>::namespaced(client.clone(), NS);
    let what = format!("{name}: {type_}={status} ({reason})");
    let last = std::sync::Mutex::new(None);
    let found = eventually(&what, WAIT, || async {
        let server = api.get(name).await?;
        let seen = condition(&server, type_);
        *last.lock().unwrap() = seen.clone();
        Ok(match seen {
            Some((s, r, message)) if s == status && r == reason => Some((server, message)),
            _ => None,
        })
    })
    .await;
    found.with_context(|| format!("last seen: {:?}", last.lock().unwrap()))
}

async fn malformed_stores_are_refused_by_the_api_server(
    client: &Client,
    s3: &SeaweedFs,
    bucket: &str,
) -> Result<()> {
    let mut no_endpoint = seaweed_store(s3, bucket, "s3-credentials");
    no_endpoint.as_object_mut().unwrap().remove("endpoint");
    refused(
        client,
        server("no-endpoint", no_endpoint),
        "an S3Compatible store needs both endpoint and region",
    )
    .await?;

    let mut both = server("both", seaweed_store(s3, bucket, "s3-credentials"));
    both["spec"]["storage"]["volume"] = json!({"storageClassName": "ssd", "size": "1Gi"});
    refused(client, both, "exactly one storage backend is required").await?;

    let cos_identity = json!({
        "provider": "COS",
        "bucket": "backups-1250000000",
        "region": "ap-shanghai",
        "credentials": {"workloadIdentity": true},
    });
    refused(
        client,
        server("cos-identity", cos_identity),
        "workload identity is supported for S3, OSS, AzureBlob and GCS only",
    )
    .await?;

    let plain_http = json!({
        "provider": "OSS",
        "bucket": "backups",
        "endpoint": "http://oss-cn-shanghai.aliyuncs.com",
        "credentials": {"secretRef": {"name": "s3-credentials"}},
    });
    refused(
        client,
        server("plain-http", plain_http),
        "a cloud provider's endpoint must use https://",
    )
    .await?;

    // Turning workload identity off explicitly is not using it. A dry run: the CEL
    // rules are checked, and no operator ever sees a server pointing at a real cloud.
    let cos_keys = json!({
        "provider": "COS",
        "bucket": "backups-1250000000",
        "region": "ap-shanghai",
        "credentials": {"secretRef": {"name": "cos"}, "workloadIdentity": false},
    });
    let params = kube::api::PatchParams::apply("sluice-e2e").dry_run();
    Api::<TransferServer>::namespaced(client.clone(), NS)
        .patch(
            "cos-keys",
            &params,
            &kube::api::Patch::Apply(server("cos-keys", cos_keys)),
        )
        .await
        .context("workloadIdentity: false with a Secret was refused")?;

    let mut escaping = seaweed_store(s3, bucket, "s3-credentials");
    escaping["prefix"] = json!("gateways/../other");
    refused(client, server("escaping", escaping), "prefix").await
}

async fn a_bucket_is_rendered_and_probed(
    client: &Client,
    s3: &SeaweedFs,
    bucket: &str,
) -> Result<()> {
    apply_all(
        client,
        &[server(
            "bucketed",
            seaweed_store(s3, bucket, "s3-credentials"),
        )],
    )
    .await?;
    let (server, message) = wait_for_condition(
        client,
        "bucketed",
        "StorageAvailable",
        "True",
        "StorageReachable",
    )
    .await?;
    ensure!(
        message == "a probe object was written and deleted",
        "{message}"
    );
    let status = server.status.clone().unwrap_or_default();
    let storage = status.storage.context("status.storage")?;
    ensure!(storage.region == "cn-shanghai", "{storage:?}");
    ensure!(storage.endpoint == s3.endpoint(), "{storage:?}");
    let residency = condition(&server, "ResidencyCompliant").context("ResidencyCompliant")?;
    ensure!(
        residency.0 == "True" && residency.1 == "RegionAllowed",
        "{residency:?}"
    );

    // The probe object is gone again, and nothing else was written.
    let uid = server.uid().context("uid")?;
    let keys = all_keys(&s3.bucket_operator(bucket)?).await?;
    ensure!(
        !keys.iter().any(|k| k.ends_with(&uid)),
        "the probe object was left behind: {keys:?}"
    );
    ensure!(
        keys.iter()
            .all(|k| k.starts_with("gateways/cucm/.sluice-probe")),
        "unexpected objects: {keys:?}"
    );

    // No claim; the configuration names the bucket; the pods mount the credentials.
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), NS);
    ensure!(
        claims.get_opt("bucketed-data").await?.is_none(),
        "a claim was created"
    );
    let config = gateway_config(client, NS, "bucketed").await?;
    let store = config
        .object_store
        .context("objectStore in the configuration")?;
    ensure!(store.provider == Provider::S3Compatible, "{store:?}");
    ensure!(
        (
            store.bucket.as_str(),
            store.prefix.as_str(),
            store.region.as_str()
        ) == (bucket, "gateways/cucm/", "cn-shanghai"),
        "{store:?}"
    );
    let rendered = serde_json::to_string(&store)?;
    ensure!(
        !rendered.contains(SECRET_KEY),
        "the configuration holds the secret key"
    );

    let statefulset = Api::<StatefulSet>::namespaced(client.clone(), NS)
        .get("bucketed-gateway")
        .await?;
    let pod = statefulset
        .spec
        .and_then(|s| s.template.spec)
        .context("pod template")?;
    let volumes: Vec<(String, Option<String>)> = pod
        .volumes
        .unwrap_or_default()
        .into_iter()
        .map(|v| (v.name, v.secret.and_then(|s| s.secret_name)))
        .collect();
    ensure!(
        volumes.contains(&("storage-credentials".into(), Some("s3-credentials".into()))),
        "{volumes:?}"
    );
    ensure!(!volumes.iter().any(|(n, _)| n == "data"), "{volumes:?}");
    let args = pod.containers[0].args.clone().unwrap_or_default();
    ensure!(
        args.windows(2)
            .any(|w| w == ["--storage-credentials", "/etc/sluice/storage-credentials"]),
        "{args:?}"
    );
    ensure!(!args.iter().any(|a| a == "--data-dir"), "{args:?}");
    Ok(())
}

async fn wrong_credentials_are_reported_without_secrets(
    client: &Client,
    bucket: &str,
) -> Result<()> {
    let before = storage_revision(client, "bucketed").await?;
    let wrong = "not-the-secret-key-at-all";
    apply_all(client, &[credentials("s3-credentials", wrong)]).await?;
    let (server, message) = wait_for_condition(
        client,
        "bucketed",
        "StorageAvailable",
        "False",
        "StorageAccessDenied",
    )
    .await?;
    ensure!(
        message.contains("refused the credentials") && message.contains(bucket),
        "{message}"
    );
    let ready = condition(&server, "Ready").context("Ready")?;
    ensure!(ready.0 == "False", "{ready:?}");
    let warned = warning_event(client, NS, "bucketed", "StorageAccessDenied", WAIT).await?;
    ensure!(warned == message, "{warned}");
    let events = Api::<Event>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await?;
    let everything = format!("{:?}{:?}", server.status, events.items);
    for secret in [wrong, SECRET_KEY, ACCESS_KEY] {
        ensure!(
            !everything.contains(secret),
            "{secret} appears in the status or Events"
        );
    }

    // The gateway opens its store once: new credentials roll the pods.
    let rotated = storage_revision(client, "bucketed").await?;
    ensure!(
        rotated != before,
        "the pod template did not change with the credentials"
    );

    apply_all(client, &[credentials("s3-credentials", SECRET_KEY)]).await?;
    wait_for_condition(
        client,
        "bucketed",
        "StorageAvailable",
        "True",
        "StorageReachable",
    )
    .await?;
    let restored = storage_revision(client, "bucketed").await?;
    ensure!(
        restored == before,
        "the revision is not a function of the credentials"
    );
    Ok(())
}

/// The pod template's storage revision annotation.
async fn storage_revision(client: &Client, server: &str) -> Result<String> {
    let statefulset = Api::<StatefulSet>::namespaced(client.clone(), NS)
        .get(&format!("{server}-gateway"))
        .await?;
    let template = statefulset.spec.context("spec")?.template.metadata;
    let annotations = template.and_then(|m| m.annotations).unwrap_or_default();
    let revision = annotations.get("sluice.dev/storage-revision").cloned();
    let revision = revision.context("no storage revision on the pod template")?;
    ensure!(revision.len() == 24, "{revision}");
    Ok(revision)
}

async fn a_missing_bucket_an_unreachable_endpoint_and_a_missing_secret_are_told_apart(
    client: &Client,
    s3: &SeaweedFs,
    bucket: &str,
) -> Result<()> {
    apply_all(
        client,
        &[server(
            "no-bucket",
            seaweed_store(s3, "not-created", "s3-credentials"),
        )],
    )
    .await?;
    let (_, message) = wait_for_condition(
        client,
        "no-bucket",
        "StorageAvailable",
        "False",
        "BucketNotFound",
    )
    .await?;
    ensure!(message.contains("not-created"), "{message}");

    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut unreachable = seaweed_store(s3, bucket, "s3-credentials");
    unreachable["endpoint"] = json!(format!("http://{closed}"));
    apply_all(client, &[server("unreachable", unreachable)]).await?;
    let (_, message) = wait_for_condition(
        client,
        "unreachable",
        "StorageAvailable",
        "False",
        "StorageUnreachable",
    )
    .await?;
    ensure!(message.contains("cannot be reached"), "{message}");

    apply_all(
        client,
        &[server("no-secret", seaweed_store(s3, bucket, "later"))],
    )
    .await?;
    let (_, message) = wait_for_condition(
        client,
        "no-secret",
        "StorageAvailable",
        "False",
        "StorageCredentialsMissing",
    )
    .await?;
    ensure!(
        message == "the credentials Secret later does not exist",
        "{message}"
    );
    // Creating the Secret is enough: its watch brings the server back.
    apply_all(client, &[credentials("later", SECRET_KEY)]).await?;
    wait_for_condition(
        client,
        "no-secret",
        "StorageAvailable",
        "True",
        "StorageReachable",
    )
    .await?;
    Ok(())
}

async fn storage_outside_the_policy_is_not_rolled_out(
    client: &Client,
    s3: &SeaweedFs,
    bucket: &str,
) -> Result<()> {
    let mut hong_kong = seaweed_store(s3, bucket, "s3-credentials");
    hong_kong["region"] = json!("cn-hongkong");
    apply_all(client, &[server("hong-kong", hong_kong)]).await?;
    let (stalled, message) = wait_for_condition(
        client,
        "hong-kong",
        "Stalled",
        "True",
        "StorageRegionNotAllowed",
    )
    .await?;
    ensure!(
        message.contains("storage region cn-hongkong is not allowed by DataResidencyPolicy"),
        "{message}"
    );
    let residency = condition(&stalled, "ResidencyCompliant").context("ResidencyCompliant")?;
    ensure!(residency.1 == "StorageRegionNotAllowed", "{residency:?}");
    warning_event(client, NS, "hong-kong", "StorageRegionNotAllowed", WAIT).await?;
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), NS);
    ensure!(
        statefulsets.get_opt("hong-kong-gateway").await?.is_none(),
        "a gateway was rolled out for storage outside the policy"
    );

    let contradiction = json!({
        "provider": "OSS",
        "bucket": "backups",
        "region": "cn-shanghai",
        "endpoint": "https://oss-cn-hongkong.aliyuncs.com",
        "credentials": {"secretRef": {"name": "s3-credentials"}},
    });
    apply_all(client, &[server("contradiction", contradiction)]).await?;
    let (_, message) =
        wait_for_condition(client, "contradiction", "Stalled", "True", "InvalidSpec").await?;
    ensure!(
        message.contains("cn-shanghai contradicts the endpoint, which is in cn-hongkong"),
        "{message}"
    );
    ensure!(
        statefulsets
            .get_opt("contradiction-gateway")
            .await?
            .is_none(),
        "a gateway was rolled out for an unresolvable store"
    );
    Ok(())
}

const PASSWORD: &str = "bucket-user-password-1";

async fn the_gateway_keeps_uploads_in_the_bucket(
    client: &Client,
    s3: &SeaweedFs,
    bucket: &str,
) -> Result<()> {
    let kubelet = FakeKubelet::register(
        client.clone(),
        "node-sh-1",
        &[("topology.kubernetes.io/region", "cn-shanghai")],
    )
    .await?;
    let user = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "TransferUser",
        "metadata": {"name": "cucm", "namespace": NS},
        "spec": {
            "serverRef": {"name": "bucketed"},
            "passwordSecretRef": {"name": "cucm-password"},
            "homeDirectory": "/backups",
            "permissions": ["list", "read", "write", "delete", "mkdir", "rename"],
        },
    });
    let password = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "cucm-password", "namespace": NS},
        "stringData": {"password": PASSWORD},
    });
    apply_all(client, &[password, user]).await?;
    // The configuration carries the user before the pod starts, so it reads it at once.
    wait_for_gateway_users(client, NS, "bucketed", &["cucm"]).await?;
    let mut pod = kubelet
        .run_pod(NS, "app.kubernetes.io/instance=bucketed")
        .await
        .context("the gateway pod did not run")?;
    wait_for_condition(client, "bucketed", "Ready", "True", "RolledOut")
        .await
        .with_context(|| pod.log())?;

    let scratch = tempfile::tempdir()?;
    let local = scratch.path().join("config.tar");
    let digest = random_file(&local, 3 * 1024 * 1024 + 17, 4)?;
    let sftp = SftpClient::new(
        pod.ports[&2222],
        "cucm",
        Auth::Password(PASSWORD.into()),
        &scratch.path().join("sftp"),
    )?;
    sftp.run(&format!("put {} config.tar\n", local.display()))
        .with_context(|| pod.log())?;

    // The upload is one object under the prefix and the user's home, and nothing else
    // (no temporary object) is left beside it.
    let objects = s3.bucket_operator(bucket)?;
    let keys = all_keys(&objects).await?;
    // The operator's write-and-delete probe may be under way at any time.
    let files: Vec<&String> = keys
        .iter()
        .filter(|k| !k.ends_with('/') && !k.contains("/.sluice-probe/"))
        .collect();
    ensure!(
        files == ["gateways/cucm/backups/config.tar"],
        "objects in the bucket: {keys:?}"
    );
    let stored = objects
        .read("gateways/cucm/backups/config.tar")
        .await?
        .to_vec();
    ensure!(
        sha256_hex(&stored) == digest,
        "the stored object differs from the upload"
    );

    let fetched = scratch.path().join("fetched.tar");
    sftp.run(&format!("get config.tar {}\n", fetched.display()))?;
    ensure!(
        sha256_file(&fetched)? == digest,
        "the download differs from the upload"
    );
    pod.stop().await;
    Ok(())
}
