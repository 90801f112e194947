//! Red-team findings against the residency evaluation and the operator's rendering of it.
//! Pure: no cluster, no network (object-store URLs are built and parsed, never sent).
//! Each test asserts the right behaviour; those that fail demonstrate a hole.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use sluice::api::{DataResidencyPolicy, TransferServer};
use sluice::residency::region::{Provider, RegionError, resolve_region};
use sluice::residency::{Subject, evaluate, quantity_bytes};

fn policy(yaml: &str) -> DataResidencyPolicy {
    serde_yaml::from_str(yaml).expect("a DataResidencyPolicy")
}

fn server(region: &str, storage: &str) -> TransferServer {
    serde_yaml::from_str(&format!(
        "apiVersion: sluice.dev/v1alpha1
kind: TransferServer
metadata: {{name: files, namespace: ns}}
spec:
  region: {region}
  protocols: {{sftp: {{}}}}
  storage: {storage}
"
    ))
    .expect("a TransferServer")
}

fn now() -> Timestamp {
    "2026-12-01T00:00:00Z".parse().unwrap()
}

/// Mainland China only, with the endpoint restricted to Alibaba Cloud's domain.
const MAINLAND_ON_ALIYUN: &str = "apiVersion: sluice.dev/v1alpha1
kind: DataResidencyPolicy
metadata: {name: mainland}
spec:
  namespaceSelector: {}
  jurisdictions: [CN]
  allowedEndpoints: ['*.aliyuncs.com']
";

/// The host an `https://` endpoint really reaches, as the URL parser of the HTTP client
/// the gateway uses (reqwest, i.e. the WHATWG `url` crate) reads it.
fn host_reached(endpoint: &str) -> String {
    let url = reqwest::Url::parse(endpoint).expect("a URL");
    url.host_str().unwrap_or_default().to_owned()
}

/// An endpoint with a backslash is read by the policy as the host after it, and by the
/// HTTP client as the host before it (WHATWG URLs treat `\` as `/` in `https:` URLs). The
/// CRD's endpoint pattern (`^https?://[^/?#@\s]+/?$`) admits the backslash. The policy
/// must judge the host the gateway connects to, or refuse the endpoint.
#[test]
fn an_endpoint_is_judged_by_the_host_the_gateway_connects_to() {
    let endpoint = r"https://203.0.113.7\.oss-cn-shanghai.aliyuncs.com";
    assert_eq!(host_reached(endpoint), "203.0.113.7");

    let files = server(
        "cn-shanghai",
        &format!(
            "{{objectStore: {{provider: OSS, bucket: backups, endpoint: '{endpoint}', \
             credentials: {{secretRef: {{name: oss}}}}}}}}"
        ),
    );
    let verdict = evaluate(
        Subject::of(&files),
        &BTreeMap::new(),
        &[policy(MAINLAND_ON_ALIYUN)],
        now(),
    );
    assert!(
        !verdict.compliant(),
        "an object store reached at 203.0.113.7 passes a mainland-China policy that \
         allows only *.aliyuncs.com: {verdict:?}"
    );
}

/// The same differential takes a link-local address (cloud metadata) past the operator's
/// check that refuses one as an endpoint.
#[test]
fn a_link_local_endpoint_behind_a_backslash_is_refused() {
    let endpoint = r"https://169.254.169.254\.oss-cn-shanghai.aliyuncs.com";
    assert_eq!(host_reached(endpoint), "169.254.169.254");
    let files = server(
        "cn-shanghai",
        &format!(
            "{{objectStore: {{provider: OSS, bucket: backups, endpoint: '{endpoint}', \
             credentials: {{secretRef: {{name: oss}}}}}}}}"
        ),
    );
    let planned = sluice::operator::server::object_store::plan(&files);
    assert!(
        planned.is_err(),
        "the operator would probe 169.254.169.254 with the bucket's credentials: {:?}",
        planned.map(|p| p.map(|p| p.config.endpoint))
    );
}

/// Endpoint families that name their region in a form the parser does not know fall back
/// to the declared region, which then decides the jurisdiction although the endpoint says
/// otherwise. Each of these hosts is (or routes to) a region outside mainland China.
#[test]
fn an_endpoint_outside_the_declared_region_never_resolves_to_the_declared_region() {
    let cases = [
        // Alibaba Cloud OSS dual-stack endpoint of Hong Kong.
        (
            Provider::Oss,
            "https://cn-hongkong.oss.aliyuncs.com",
            "cn-shanghai",
        ),
        // Huawei Cloud Europe (Dublin) OBS.
        (
            Provider::Obs,
            "https://obs.eu-west-101.myhuaweicloud.eu",
            "cn-east-3",
        ),
        // The legacy us-east-1 endpoint of S3.
        (
            Provider::S3,
            "https://s3-external-1.amazonaws.com",
            "eu-central-1",
        ),
        // The AWS global partition never serves a China region.
        (
            Provider::S3,
            "https://s3-external-1.amazonaws.com",
            "cn-north-1",
        ),
        // Azure's global cloud never serves an Azure China region.
        (
            Provider::AzureBlob,
            "https://acct.blob.core.windows.net",
            "chinaeast2",
        ),
    ];
    let taken: Vec<String> = cases
        .into_iter()
        .filter_map(|(provider, endpoint, declared)| {
            let resolved = resolve_region(provider, Some(endpoint), Some(declared));
            matches!(&resolved, Ok(r) if r.region == declared)
                .then(|| format!("{provider:?} {endpoint} is taken to be in {declared}"))
        })
        .collect();
    assert!(taken.is_empty(), "{taken:#?}");
}

/// An S3 Multi-Region Access Point routes requests to buckets in several regions, like
/// an accelerated endpoint: it cannot be pinned, whatever region is declared.
#[test]
fn an_s3_multi_region_access_point_is_refused_like_an_accelerated_endpoint() {
    let endpoint = "https://mfzwi23gnjvgw.mrap.accesspoint.s3-global.amazonaws.com";
    let resolved = resolve_region(Provider::S3, Some(endpoint), Some("eu-central-1"));
    assert!(
        matches!(
            resolved,
            Err(RegionError::Accelerated(_) | RegionError::MultiRegion(_))
        ),
        "a multi-region access point resolves to {resolved:?}"
    );
}

/// `maxVolume` is checked against the Kubernetes quantity pattern, which admits `1000m`
/// (a typo for `1000M`) and negative numbers. Such a limit is read as no limit at all:
/// the gateway then counts nothing and refuses nothing.
#[test]
fn a_volume_limit_the_schema_accepts_is_never_read_as_no_limit() {
    let mut unlimited_by = Vec::new();
    for max_volume in ["1000m", "500u", "-1G"] {
        let yaml = format!(
            "apiVersion: sluice.dev/v1alpha1
kind: DataResidencyPolicy
metadata: {{name: mainland}}
spec:
  namespaceSelector: {{}}
  jurisdictions: [CN]
  crossBorderTransfers:
  - destinationRegion: eu-central-1
    assessmentReference: CAC-2026-0042
    expires: '2027-06-30T00:00:00Z'
    maxVolume: '{max_volume}'
"
        );
        let files = server(
            "cn-shanghai",
            "{objectStore: {provider: S3, bucket: b, region: eu-central-1, \
             credentials: {secretRef: {name: c}}}}",
        );
        let verdict = evaluate(
            Subject::of(&files),
            &BTreeMap::new(),
            &[policy(&yaml)],
            now(),
        );
        let unlimited = verdict.compliant()
            && verdict
                .allowances
                .iter()
                .any(|a| a.reference == "CAC-2026-0042" && a.max_bytes.is_none());
        if unlimited {
            unlimited_by.push(format!(
                "{max_volume} ({:?} bytes)",
                quantity_bytes(max_volume)
            ));
        }
    }
    assert!(
        unlimited_by.is_empty(),
        "these limits let the server upload without limit: {unlimited_by:?}"
    );
}

/// Two enforced policies govern one server, each naming its own node label for the
/// region. The server must satisfy both, so its pods must land only on nodes that both
/// labels place in the region; the rendered StatefulSet pins them under one label only
/// (that of the policy whose name sorts first), so the other policy's placement rule is
/// not enforced at all.
#[test]
fn a_server_governed_by_policies_with_different_region_labels_is_pinned_under_each() {
    use std::sync::Arc;

    use sluice::operator::server::build::{BuildSettings, build};
    use sluice::operator::server::dereference::{ServerInputs, VolumeInputs};
    use sluice::operator::server::host_keys::HostKeyMaterial;
    use sluice::operator::server::passwords::PasswordHashes;
    use sluice::operator::server::validate::validate;

    let policies = [
        policy(
            "apiVersion: sluice.dev/v1alpha1
kind: DataResidencyPolicy
metadata: {name: a-team-placement}
spec:
  namespaceSelector: {}
  allowedRegions: [cn-shanghai]
  regionLabel: example.com/team-region
",
        ),
        policy(
            "apiVersion: sluice.dev/v1alpha1
kind: DataResidencyPolicy
metadata: {name: b-legal-mainland}
spec:
  namespaceSelector: {}
  jurisdictions: [CN]
",
        ),
    ];
    let files = server(
        "cn-shanghai",
        "{volume: {storageClassName: regional, size: 1Gi}}",
    );
    let class: k8s_openapi::api::storage::v1::StorageClass = serde_yaml::from_str(
        "{apiVersion: storage.k8s.io/v1, kind: StorageClass, metadata: {name: regional}, \
         provisioner: x, volumeBindingMode: WaitForFirstConsumer}",
    )
    .unwrap();
    let inputs = ServerInputs {
        server: Arc::new(files),
        namespace_labels: BTreeMap::new(),
        policies: policies.to_vec(),
        users: vec![],
        host_keys: None,
        statefulset: None,
        service: None,
        pod_services: vec![],
        owned_pod_services: vec![],
        tls_secret: None,
        storage_secret: None,
        legacy_deployment: None,
        network_policy: None,
        owned_disruption_budget: None,
        gateway_config: None,
        volume: Some(VolumeInputs {
            storage_class: Some(class),
            bound: None,
            zone_nodes: vec![],
        }),
        nodes_in_region: true,
        existing: vec![],
    };
    let valid = match validate(inputs, now()) {
        Ok(valid) => valid,
        Err(_) => panic!("the server complies with both policies and is rolled out"),
    };
    let keys = HostKeyMaterial::generate().unwrap();
    let hashes = PasswordHashes::default();
    let settings = BuildSettings {
        image: "sluice:test",
        hashes: &hashes,
    };
    let objects = build(&valid, &keys, &settings);
    let pod = objects.statefulset.spec.unwrap().template.spec.unwrap();
    let terms = pod
        .affinity
        .and_then(|a| a.node_affinity)
        .and_then(|n| n.required_during_scheduling_ignored_during_execution)
        .map(|s| s.node_selector_terms)
        .unwrap_or_default();
    for label in ["example.com/team-region", "topology.kubernetes.io/region"] {
        let pinned = !terms.is_empty()
            && terms.iter().all(|term| {
                term.match_expressions.iter().flatten().any(|e| {
                    e.key == label
                        && e.operator == "In"
                        && e.values.as_deref() == Some(&["cn-shanghai".to_owned()][..])
                })
            });
        assert!(pinned, "pods are not pinned under {label}: {terms:?}");
    }
}

/// The gateway's own object-store client, built from the configuration the operator
/// renders for such an endpoint, addresses the host before the backslash: a presigned
/// request (computed locally, never sent) names it.
#[tokio::test]
async fn the_object_store_the_gateway_reaches_is_the_one_the_policy_judged() {
    use sluice::storage::object::{Credentials, build_operator};

    const EU_ON_AWS: &str = "apiVersion: sluice.dev/v1alpha1
kind: DataResidencyPolicy
metadata: {name: eu}
spec:
  namespaceSelector: {}
  jurisdictions: [EU]
  allowedEndpoints: ['*.amazonaws.com']
";
    let endpoint = r"https://203.0.113.7\.s3.eu-central-1.amazonaws.com";
    let files = server(
        "eu-central-1",
        &format!(
            "{{objectStore: {{provider: S3, bucket: backups, endpoint: '{endpoint}', \
             addressingStyle: Path, credentials: {{secretRef: {{name: s3}}}}}}}}"
        ),
    );
    let verdict = evaluate(
        Subject::of(&files),
        &BTreeMap::new(),
        &[policy(EU_ON_AWS)],
        now(),
    );
    // Refusing the endpoint outright is a right answer too: then nothing connects.
    let plan = match sluice::operator::server::object_store::plan(&files) {
        Err(refused) => {
            assert!(!verdict.compliant(), "refused ({refused}) yet compliant");
            return;
        }
        Ok(plan) => plan.expect("an object store"),
    };
    let credentials = Credentials::from_pairs([
        ("accessKeyId", b"AKIDEXAMPLE".as_slice()),
        ("secretAccessKey", b"secret".as_slice()),
    ]);
    let operator = build_operator(&plan.config, &credentials).expect("an operator");
    let request = operator
        .presign_read("probe", std::time::Duration::from_secs(60))
        .await
        .expect("a presigned request");
    let host = request.uri().host().unwrap_or_default().to_owned();
    assert!(
        !(verdict.compliant() && host == "203.0.113.7"),
        "judged compliant as {:?} in {}, but the gateway connects to {host} ({})",
        plan.resolved.region,
        plan.resolved.jurisdiction.unwrap_or("?"),
        request.uri()
    );
}

/// A prefix is the storage root of a server's users. One that passes through a reserved
/// directory (which the CRD's prefix pattern admits) makes another server's audit log,
/// usage counts or staged uploads in the same bucket the files of this server's users,
/// to read, overwrite and delete.
#[test]
fn a_prefix_that_enters_a_reserved_directory_is_refused() {
    for prefix in [
        "gateways/cucm/.sluice-audit",
        "gateways/cucm/.sluice-audit/usage/CAC-2026-0042",
        ".sluice-uploads",
    ] {
        let files = server(
            "cn-shanghai",
            &format!(
                "{{objectStore: {{provider: OSS, bucket: backups, region: cn-shanghai, \
                 prefix: '{prefix}', credentials: {{secretRef: {{name: oss}}}}}}}}"
            ),
        );
        let planned = sluice::operator::server::object_store::plan(&files);
        assert!(
            planned.is_err(),
            "prefix {prefix:?} is accepted: {:?}",
            planned.map(|p| p.map(|p| p.config.prefix))
        );
    }
}

/// A server that satisfies an enforced policy and breaks only one in `Audit` mode is
/// rolled out ("rolled out and reported"), but the stamp its gateway receives says
/// "non-compliant, enforced", which the gateway reads as "refuse every write": the audit
/// policy ends up enforced on the data plane while the control plane reports the server
/// as running.
#[test]
fn a_violation_of_an_audit_policy_alone_never_suspends_writes() {
    use sluice::operator::server::build::residency_stamp;

    let policies = [
        policy(
            "apiVersion: sluice.dev/v1alpha1
kind: DataResidencyPolicy
metadata: {name: legal-mainland}
spec:
  namespaceSelector: {}
  jurisdictions: [CN]
  enforcement: Enforce
",
        ),
        policy(
            "apiVersion: sluice.dev/v1alpha1
kind: DataResidencyPolicy
metadata: {name: trial-beijing-only}
spec:
  namespaceSelector: {}
  allowedRegions: [cn-beijing]
  enforcement: Audit
",
        ),
    ];
    let verdict = evaluate("cn-shanghai", &BTreeMap::new(), &policies, now());
    assert!(!verdict.blocks_rollout(), "{verdict:?}");
    let stamp = residency_stamp(&verdict, "cn-shanghai");
    assert_eq!(
        stamp.writes_refused(now().as_second()),
        None,
        "the gateway of a server that is rolled out refuses writes: {stamp:?}"
    );
}
