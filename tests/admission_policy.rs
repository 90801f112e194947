//! The generated ValidatingAdmissionPolicies on a real API server: they type-check, stay
//! within the CEL cost limits, and admit, refuse or warn about TransferServers exactly as
//! the operator's evaluation judges them, with the same words.
//!
//! Every expectation is computed twice: written out for the cases a person reads, and
//! derived from `sluice::residency::evaluate` for all of them (each breach of an `Enforce`
//! policy as `[Rule] message`, joined with `; `), so the CEL cannot drift from the Rust.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, Client};
use serde_json::{Value, json};
use sluice::api::{DataResidencyPolicy, Enforcement, TransferServer};
use sluice::residency::admission::{AUDIT, ENFORCE, MAX_MESSAGE_CHARS, TRUNCATED};
use sluice::residency::region::{self, CATALOGUES, Provider};
use sluice::residency::{self, Subject};

use support::cluster::{apply, apply_all, eventually, install_crds, read_yaml_dir, volume_server};
use support::controlplane::ControlPlane;

const WAIT: Duration = Duration::from_secs(60);
const RESIDENCY: &str = "sluice.dev/residency";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_admits_refuses_and_warns_as_the_residency_policies_say() -> Result<()> {
    let control_plane = ControlPlane::start().await?;
    let client = control_plane.client();
    install_crds(&client).await?;
    install_admission_policies(&client).await?;
    let mut cluster = Cluster::new(client);
    cluster.namespace("telephony", &[(RESIDENCY, "cn")]).await?;
    without_policies_everything_is_admitted(&cluster).await?;
    cluster.namespace("analytics", &[(RESIDENCY, "eu")]).await?;
    cluster.namespace("scratch", &[]).await?;
    cluster
        .namespace("catalogue", &[(RESIDENCY, "catalogue")])
        .await?;
    cluster.policy(mainland_china()).await?;
    cluster.policy(personal_data()).await?;
    cluster.policy(eu_audit()).await?;
    cluster.policy(catalogue_cn()).await?;
    cluster.wait_for_policies().await?;

    named_cases_are_judged_with_the_operators_words(&cluster).await?;
    an_expired_allowance_is_left_to_the_operator(&cluster).await?;
    an_update_is_judged_like_a_create(&cluster).await?;
    every_node_region_of_the_catalogue_is_placed_as_the_operator_places_it(&cluster).await?;
    every_storage_region_of_the_catalogue_is_placed_by_its_own_provider(&cluster).await?;
    endpoints_are_read_as_the_operator_reads_them(&cluster).await?;
    a_policy_at_the_schema_limits_stays_within_the_cel_cost_budget(&mut cluster).await?;
    Ok(())
}

/// Mainland China by jurisdiction, with StorageClass and endpoint rules and a
/// cross-border allowance.
fn mainland_china() -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "DataResidencyPolicy",
        "metadata": {"name": "mainland-china"},
        "spec": {
            "namespaceSelector": {"matchLabels": {RESIDENCY: "cn"}},
            "jurisdictions": ["CN"],
            "allowedStorageClasses": ["cn-ssd"],
            "allowedEndpoints": ["*.aliyuncs.com", "*.amazonaws.com.cn"],
            "crossBorderTransfers": [
                {
                    "destinationRegion": "eu-central-1",
                    "assessmentReference": "CAC-2026-0042",
                    "expires": "2099-12-31T00:00:00Z",
                },
                {
                    "destinationRegion": "eu-west-1",
                    "assessmentReference": "CAC-2024-0007",
                    "expires": "2025-06-30T00:00:00Z",
                },
            ],
        },
    })
}

/// A stricter policy for the servers labelled as holding personal data: Shanghai only.
fn personal_data() -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "DataResidencyPolicy",
        "metadata": {"name": "personal-data"},
        "spec": {
            "namespaceSelector": {"matchExpressions": [
                {"key": RESIDENCY, "operator": "In", "values": ["cn"]},
            ]},
            "serverSelector": {"matchLabels": {"sluice.dev/data": "personal"}},
            "allowedRegions": ["cn-shanghai"],
            "enforcement": "Enforce",
        },
    })
}

fn eu_audit() -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "DataResidencyPolicy",
        "metadata": {"name": "eu-audit"},
        "spec": {
            "namespaceSelector": {"matchLabels": {RESIDENCY: "eu"}},
            "jurisdictions": ["EU"],
            "enforcement": "Audit",
        },
    })
}

fn catalogue_cn() -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "DataResidencyPolicy",
        "metadata": {"name": "catalogue-cn"},
        "spec": {
            "namespaceSelector": {"matchLabels": {RESIDENCY: "catalogue"}},
            "jurisdictions": ["CN"],
        },
    })
}

fn server(namespace: &str, name: &str, region: &str) -> Value {
    volume_server(namespace, name, region, "cn-ssd")
}

fn in_bucket(
    mut server: Value,
    provider: &str,
    endpoint: Option<&str>,
    region: Option<&str>,
) -> Value {
    let mut store = json!({
        "provider": provider,
        "bucket": "backups",
        "credentials": {"secretRef": {"name": "store-credentials"}},
    });
    if let Some(endpoint) = endpoint {
        store["endpoint"] = json!(endpoint);
    }
    if let Some(region) = region {
        store["region"] = json!(region);
    }
    server["spec"]["storage"] = json!({"objectStore": store});
    server
}

fn with(mut object: Value, at: &str, value: Value) -> Value {
    let (parent, key) = at.rsplit_once('/').expect("a JSON pointer");
    object
        .pointer_mut(parent)
        .expect("the parent exists")
        .as_object_mut()
        .expect("the parent is an object")
        .insert(key.to_string(), value);
    object
}

const DENIED: &str = "ValidatingAdmissionPolicy 'sluice-residency-enforce' with binding \
                      'sluice-residency-enforce' denied request: ";
const WARNED: &str = "Validation failed for ValidatingAdmissionPolicy 'sluice-residency-audit' \
                      with binding 'sluice-residency-audit': ";

/// The whole message of a denial of server `name`, as `kubectl apply` shows it.
fn denial(name: &str, text: &str) -> String {
    format!("transferservers.sluice.dev \"{name}\" is forbidden: {DENIED}{text}")
}

/// What the API server did with a request.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    /// The denial's message, `None` when admitted.
    denied: Option<String>,
    /// Warnings, sorted.
    warnings: Vec<String>,
}

struct Cluster {
    client: Client,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    policies: Vec<DataResidencyPolicy>,
}

impl Cluster {
    fn new(client: Client) -> Self {
        Self {
            client,
            namespaces: BTreeMap::new(),
            policies: Vec::new(),
        }
    }

    async fn namespace(&mut self, name: &str, labels: &[(&str, &str)]) -> Result<()> {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let namespace = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
        });
        apply_all(&self.client, &[namespace]).await?;
        self.namespaces.insert(name.to_string(), labels);
        Ok(())
    }

    async fn policy(&mut self, policy: Value) -> Result<()> {
        apply_all(&self.client, std::slice::from_ref(&policy)).await?;
        self.policies.push(serde_json::from_value(policy)?);
        Ok(())
    }

    /// Waits until admission sees every policy: the API server reads parameters from an
    /// informer, so a new policy takes effect a moment after it is stored.
    async fn wait_for_policies(&self) -> Result<()> {
        eventually("admission to see every policy", WAIT, || async {
            for policy in &self.policies {
                let name = policy.metadata.name.clone().unwrap_or_default();
                let Some(namespace) = self.namespace_governed_by(policy) else {
                    continue;
                };
                // A region no policy allows.
                let probe = server(&namespace, "probe", "nowhere-1");
                let outcome = self.create(&probe).await?;
                let words = format!("DataResidencyPolicy {name} ");
                let seen = outcome
                    .denied
                    .iter()
                    .chain(&outcome.warnings)
                    .any(|m| m.contains(&words));
                // Not yet seen: an error, so that a timeout shows the last outcome.
                ensure!(seen, "{name} is not judging yet: {outcome:?}");
            }
            Ok(Some(()))
        })
        .await
    }

    /// A namespace the policy governs servers without labels in, if any.
    fn namespace_governed_by(&self, policy: &DataResidencyPolicy) -> Option<String> {
        self.namespaces
            .iter()
            .find(|(_, labels)| residency::governs(policy, labels, &BTreeMap::new()) == Ok(true))
            .map(|(name, _)| name.clone())
    }

    /// Creates `server` with `dryRun=All`, so admission judges it and nothing is stored.
    async fn create(&self, server: &Value) -> Result<Outcome> {
        let namespace = server["metadata"]["namespace"]
            .as_str()
            .context("a namespace")?;
        let uri =
            format!("/apis/sluice.dev/v1alpha1/namespaces/{namespace}/transferservers?dryRun=All");
        self.send(http::Method::POST, &uri, "application/json", server)
            .await
    }

    async fn send(
        &self,
        method: http::Method,
        uri: &str,
        content_type: &str,
        body: &Value,
    ) -> Result<Outcome> {
        let request = http::Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", content_type)
            .body(kube::client::Body::from(serde_json::to_vec(body)?))?;
        let response = self.client.send(request).await?;
        let status = response.status();
        let mut warnings: Vec<String> = response
            .headers()
            .get_all("warning")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(warning_text)
            .collect();
        warnings.sort();
        let body = response.into_body().collect_bytes().await?;
        let body: Value = serde_json::from_slice(&body)?;
        let denied = match status.as_u16() {
            200 | 201 => None,
            403 => Some(body["message"].as_str().unwrap_or_default().to_string()),
            other => bail!("unexpected HTTP {other}: {body}"),
        };
        Ok(Outcome { denied, warnings })
    }

    /// What admission should do with `server`, from the operator's evaluation of the
    /// rules admission can check: each denying message that may come first (the API
    /// server reports one policy's), and the warnings.
    fn expected(&self, server: &Value) -> (Vec<String>, Vec<String>) {
        let server: TransferServer = serde_json::from_value(server.clone()).expect("a server");
        let name = server.metadata.name.clone().unwrap_or_default();
        let namespace = server.metadata.namespace.clone().unwrap_or_default();
        // A StorageClass whose volumes follow the pod: only `allowedStorageClasses`
        // judges it, as at admission.
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": {"name": "any"},
            "provisioner": "example.com/disk",
            "volumeBindingMode": "WaitForFirstConsumer",
        }))
        .expect("a StorageClass");
        let subject = Subject::of(&server).with_placement(&server, Some(&class), None, &[]);
        let labels = self.namespaces.get(&namespace).cloned().unwrap_or_default();
        let verdict = residency::evaluate(subject, &labels, &self.policies, Timestamp::now());
        let mut denials = Vec::new();
        let mut warnings = Vec::new();
        for violation in &verdict.violations {
            let breaches: Vec<String> = violation
                .breaches
                .iter()
                .map(|b| format!("[{}] {}", b.rule.as_str(), b.message))
                .collect();
            let mut text = breaches.join("; ");
            if text.chars().count() > MAX_MESSAGE_CHARS {
                text = text.chars().take(MAX_MESSAGE_CHARS).collect::<String>() + TRUNCATED;
            }
            match violation.enforcement {
                Enforcement::Enforce => denials.push(denial(&name, &text)),
                Enforcement::Audit => warnings.push(format!("{WARNED}{text}")),
            }
        }
        warnings.sort();
        (denials, warnings)
    }

    /// Creates `server` (dry run) and checks the outcome against the operator's
    /// evaluation; returns it for further checks.
    async fn judged_alike(&self, server: &Value) -> Result<Outcome> {
        let outcome = self.create(server).await?;
        let (denials, warnings) = self.expected(server);
        let name = &server["metadata"]["name"];
        match &outcome.denied {
            None => ensure!(
                denials.is_empty(),
                "{name}: admitted, but the operator would refuse it: {denials:?}"
            ),
            Some(message) => ensure!(
                denials.contains(message),
                "{name}: denied with\n  {message}\nbut the operator says\n  {denials:?}"
            ),
        }
        // Warnings come only with an admitted request.
        if outcome.denied.is_none() {
            ensure!(
                outcome.warnings == warnings,
                "{name}: warnings {:?}, expected {warnings:?}",
                outcome.warnings
            );
        }
        Ok(outcome)
    }
}

/// `299 - "text"` as `text`.
fn warning_text(header: &str) -> String {
    let quoted = header.splitn(3, ' ').nth(2).unwrap_or(header);
    let inner = quoted
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .unwrap_or(quoted);
    inner.replace("\\\"", "\"").replace("\\\\", "\\")
}

/// Applies `deploy/admission/` and waits until the API server has type-checked every
/// expression, with no warning.
async fn install_admission_policies(client: &Client) -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/admission");
    for object in read_yaml_dir(&dir)? {
        apply(client, &object).await?;
    }
    let api = Api::<ValidatingAdmissionPolicy>::all(client.clone());
    for name in [ENFORCE, AUDIT] {
        let policy = eventually(&format!("{name} type-checked"), WAIT, || async {
            let policy = api.get(name).await?;
            let status = policy.status.as_ref();
            let checked = status.and_then(|s| s.observed_generation) == policy.metadata.generation;
            Ok((checked && status.is_some_and(|s| s.type_checking.is_some())).then_some(policy))
        })
        .await?;
        let status = policy.status.unwrap_or_default();
        let warnings = status
            .type_checking
            .and_then(|t| t.expression_warnings)
            .unwrap_or_default();
        ensure!(
            warnings.is_empty(),
            "{name} has type-checking warnings: {warnings:#?}"
        );
        let conditions = status.conditions.unwrap_or_default();
        ensure!(
            conditions.iter().all(|c| c.status != "False"),
            "{name}: {conditions:#?}"
        );
    }
    Ok(())
}

async fn named_cases_are_judged_with_the_operators_words(cluster: &Cluster) -> Result<()> {
    let mainland = "(allowed: jurisdiction CN (mainland China))";
    let telephony = |name: &str, region: &str| server("telephony", name, region);
    let cases: Vec<(&str, Value, Option<String>)> = vec![
        ("compliant", telephony("shanghai", "cn-shanghai"), None),
        (
            "Hong Kong is not mainland China",
            telephony("hong-kong", "cn-hongkong"),
            Some(format!(
                "[Region] region cn-hongkong is not allowed by DataResidencyPolicy \
                 mainland-china {mainland}"
            )),
        ),
        (
            "an OSS bucket in Hong Kong",
            in_bucket(
                telephony("oss-hk", "cn-shanghai"),
                "OSS",
                Some("https://oss-cn-hongkong.aliyuncs.com"),
                None,
            ),
            Some(format!(
                "[StorageRegion] storage region cn-hongkong is not allowed by \
                 DataResidencyPolicy mainland-china {mainland}"
            )),
        ),
        (
            "an OSS bucket in Shanghai",
            in_bucket(
                telephony("oss-sh", "cn-shanghai"),
                "OSS",
                Some("https://oss-cn-shanghai-internal.aliyuncs.com"),
                Some("cn-shanghai"),
            ),
            None,
        ),
        (
            "an accelerated S3 endpoint",
            in_bucket(
                telephony("accelerated", "cn-north-1"),
                "S3",
                Some("https://backups.s3-accelerate.amazonaws.com"),
                Some("cn-north-1"),
            ),
            Some(
                "[StorageRegion] the storage region cannot be resolved \
                 (backups.s3-accelerate.amazonaws.com is an accelerated endpoint: data passes \
                 through edge locations worldwide, so it cannot be pinned to a region; use \
                 the regional endpoint), so DataResidencyPolicy mainland-china cannot allow \
                 it; [Endpoint] object-store endpoint backups.s3-accelerate.amazonaws.com is \
                 not allowed by DataResidencyPolicy mainland-china (allowed: *.aliyuncs.com, \
                 *.amazonaws.com.cn)"
                    .to_string(),
            ),
        ),
        (
            "a declared region contradicting the endpoint",
            in_bucket(
                telephony("contradiction", "cn-shanghai"),
                "OSS",
                Some("https://oss-cn-hongkong.aliyuncs.com"),
                Some("cn-shanghai"),
            ),
            Some(
                "[StorageRegion] the storage region cannot be resolved (the declared region \
                 cn-shanghai contradicts the endpoint, which is in cn-hongkong), so \
                 DataResidencyPolicy mainland-china cannot allow it"
                    .to_string(),
            ),
        ),
        (
            "a mainland COS bucket at an endpoint the policy does not list",
            in_bucket(
                telephony("cos", "cn-shanghai"),
                "COS",
                None,
                Some("ap-guangzhou"),
            ),
            Some(
                "[Endpoint] object-store endpoint cos.ap-guangzhou.myqcloud.com is not \
                 allowed by DataResidencyPolicy mainland-china (allowed: *.aliyuncs.com, \
                 *.amazonaws.com.cn)"
                    .to_string(),
            ),
        ),
        (
            "plaintext FTP",
            with(
                telephony("plaintext", "cn-shanghai"),
                "/spec/protocols/ftps",
                json!({
                    "explicit": {"port": 21},
                    "allowPlaintext": true,
                    "tlsSecretRef": {"name": "tls"},
                }),
            ),
            Some(
                "[PlaintextFtp] plaintext FTP (ftps.allowPlaintext) is not allowed by \
                 DataResidencyPolicy mainland-china (the policy would need \
                 allowPlaintextFtp: true)"
                    .to_string(),
            ),
        ),
        (
            "an audit log on standard output",
            with(
                telephony("stdout", "cn-shanghai"),
                "/spec/auditLog",
                json!({"stdout": true}),
            ),
            Some(
                "[AuditLogStdout] an audit log on standard output (auditLog.stdout) is not \
                 allowed by DataResidencyPolicy mainland-china (the policy would need \
                 allowAuditLogStdout: true)"
                    .to_string(),
            ),
        ),
        (
            "a StorageClass the policy does not list",
            with(
                telephony("hdd", "cn-shanghai"),
                "/spec/storage/volume/storageClassName",
                json!("hdd-anywhere"),
            ),
            Some(
                "[StorageClass] StorageClass hdd-anywhere is not allowed (allowed: cn-ssd) \
                 (DataResidencyPolicy mainland-china)"
                    .to_string(),
            ),
        ),
        (
            "Beijing, outside the personal-data policy's serverSelector",
            telephony("beijing", "cn-beijing"),
            None,
        ),
        (
            "Beijing with personal data: the stricter policy denies",
            with(
                telephony("beijing-personal", "cn-beijing"),
                "/metadata/labels",
                json!({"sluice.dev/data": "personal"}),
            ),
            Some(
                "[Region] region cn-beijing is not allowed by DataResidencyPolicy \
                 personal-data (allowed: cn-shanghai)"
                    .to_string(),
            ),
        ),
        (
            "Shanghai with personal data: both policies allow",
            with(
                telephony("shanghai-personal", "cn-shanghai"),
                "/metadata/labels",
                json!({"sluice.dev/data": "personal"}),
            ),
            None,
        ),
        (
            "the destination of a cross-border allowance",
            telephony("frankfurt", "eu-central-1"),
            None,
        ),
        (
            "no policy governs the namespace",
            server("scratch", "anywhere", "cn-hongkong"),
            None,
        ),
    ];
    for (case, server, denied) in cases {
        let outcome = cluster
            .judged_alike(&server)
            .await
            .with_context(|| case.to_string())?;
        let name = server["metadata"]["name"].as_str().unwrap_or_default();
        let expected = denied.map(|d| denial(name, &d));
        ensure!(
            outcome.denied == expected,
            "{case}: {:?}, expected {expected:?}",
            outcome.denied
        );
        ensure!(
            outcome.warnings.is_empty(),
            "{case}: {:?}",
            outcome.warnings
        );
    }

    // Audit: admitted, and kubectl shows the warning.
    let outcome = cluster
        .judged_alike(&server("analytics", "virginia", "us-east-1"))
        .await?;
    let warning = format!(
        "{WARNED}[Region] region us-east-1 is not allowed by DataResidencyPolicy eu-audit \
         (allowed: EU)"
    );
    ensure!(
        outcome
            == Outcome {
                denied: None,
                warnings: vec![warning]
            },
        "{outcome:?}"
    );
    let outcome = cluster
        .judged_alike(&server("analytics", "frankfurt", "eu-central-1"))
        .await?;
    ensure!(
        outcome.denied.is_none() && outcome.warnings.is_empty(),
        "{outcome:?}"
    );
    Ok(())
}

async fn without_policies_everything_is_admitted(cluster: &Cluster) -> Result<()> {
    let outcome = cluster
        .create(&server("telephony", "hong-kong", "cn-hongkong"))
        .await?;
    ensure!(
        outcome
            == Outcome {
                denied: None,
                warnings: vec![]
            },
        "{outcome:?}"
    );
    Ok(())
}

/// CEL has no clock: an allowance counts at admission until the operator, which has one,
/// finds it expired.
async fn an_expired_allowance_is_left_to_the_operator(cluster: &Cluster) -> Result<()> {
    let dublin = server("telephony", "dublin", "eu-west-1");
    let outcome = cluster.create(&dublin).await?;
    ensure!(outcome.denied.is_none(), "{outcome:?}");
    let (denials, _) = cluster.expected(&dublin);
    ensure!(
        denials
            == [denial(
                "dublin",
                "[CrossBorderTransfer] cross-border transfer CAC-2024-0007 of \
                 DataResidencyPolicy mainland-china to eu-west-1 expired at 2025-06-30T00:00:00Z"
            )],
        "{denials:?}"
    );
    Ok(())
}

async fn an_update_is_judged_like_a_create(cluster: &Cluster) -> Result<()> {
    let compliant = server("telephony", "moving", "cn-shanghai");
    apply_all(&cluster.client, std::slice::from_ref(&compliant)).await?;
    let uri = "/apis/sluice.dev/v1alpha1/namespaces/telephony/transferservers/moving?dryRun=All";
    let patch = json!({"spec": {"region": "cn-hongkong"}});
    let outcome = cluster
        .send(
            http::Method::PATCH,
            uri,
            "application/merge-patch+json",
            &patch,
        )
        .await?;
    let expected = denial(
        "moving",
        "[Region] region cn-hongkong is not allowed by DataResidencyPolicy mainland-china \
         (allowed: jurisdiction CN (mainland China))",
    );
    ensure!(outcome.denied == Some(expected), "{outcome:?}");
    // The status is not a residency decision: the operator may always write it.
    let status = json!({"status": {"observedGeneration": 1}});
    let outcome = cluster
        .send(
            http::Method::PATCH,
            "/apis/sluice.dev/v1alpha1/namespaces/telephony/transferservers/moving/status",
            "application/merge-patch+json",
            &status,
        )
        .await?;
    ensure!(outcome.denied.is_none(), "{outcome:?}");
    Ok(())
}

fn catalogue_ids() -> Vec<&'static str> {
    let mut ids: Vec<&str> = CATALOGUES
        .iter()
        .flat_map(|(_, catalogue)| catalogue.iter().map(|(id, _)| *id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

async fn every_node_region_of_the_catalogue_is_placed_as_the_operator_places_it(
    cluster: &Cluster,
) -> Result<()> {
    let ids = catalogue_ids();
    let mut admitted = 0;
    for id in &ids {
        let outcome = cluster
            .judged_alike(&server("catalogue", "node", id))
            .await?;
        let mainland = region::node_jurisdiction(id) == Some(sluice::api::Jurisdiction::Cn);
        ensure!(
            outcome.denied.is_none() == mainland,
            "node region {id}: {outcome:?}"
        );
        admitted += usize::from(mainland);
    }
    // Ambiguous ids (ap-southeast-1: Singapore or Hong Kong) are in no jurisdiction.
    let outcome = cluster
        .create(&server("catalogue", "node", "ap-southeast-1"))
        .await?;
    ensure!(outcome.denied.is_some(), "{outcome:?}");
    ensure!(
        admitted > 30,
        "only {admitted} of {} ids admitted",
        ids.len()
    );
    Ok(())
}

async fn every_storage_region_of_the_catalogue_is_placed_by_its_own_provider(
    cluster: &Cluster,
) -> Result<()> {
    for (provider, catalogue) in CATALOGUES {
        for (id, jurisdiction) in catalogue {
            let endpoint = match provider {
                Provider::AzureBlob if id.starts_with("china") => {
                    Some("https://backups.blob.core.chinacloudapi.cn")
                }
                Provider::AzureBlob => Some("https://backups.blob.core.windows.net"),
                _ => None,
            };
            let name = provider_name(provider);
            let bucket = in_bucket(
                server("catalogue", "bucket", "cn-shanghai"),
                &name,
                endpoint,
                Some(id),
            );
            let outcome = cluster
                .judged_alike(&bucket)
                .await
                .with_context(|| format!("{name} {id}"))?;
            ensure!(
                outcome.denied.is_none() == (*jurisdiction == "CN"),
                "{name} {id}: {outcome:?}"
            );
        }
    }
    Ok(())
}

fn provider_name(provider: Provider) -> String {
    serde_json::to_value(provider)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

async fn endpoints_are_read_as_the_operator_reads_them(cluster: &Cluster) -> Result<()> {
    // (provider, endpoint, declared region)
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("S3", "https://s3.cn-north-1.amazonaws.com.cn", None),
        (
            "S3",
            "https://s3.cn-northwest-1.amazonaws.com.cn/",
            Some("cn-northwest-1"),
        ),
        ("S3", "https://s3.eu-central-1.amazonaws.com", None),
        ("S3", "https://s3-eu-west-1.amazonaws.com", None),
        ("S3", "https://s3.dualstack.us-west-2.amazonaws.com", None),
        ("S3", "https://s3-fips.us-east-2.amazonaws.com", None),
        ("S3", "https://logs.s3.ap-east-1.amazonaws.com", None),
        (
            "S3",
            "https://bucket.vpce-0a1b2c3d-4e5f6a7b.s3.cn-north-1.vpce.amazonaws.com.cn",
            None,
        ),
        ("S3", "https://s3.amazonaws.com", None),
        ("S3", "https://backups.s3.amazonaws.com", Some("cn-north-1")),
        (
            "S3",
            "https://s3-eu-west-1.s3.cn-north-1.amazonaws.com.cn",
            None,
        ),
        (
            "S3",
            "https://s3-backups.s3.dualstack.ap-east-1.amazonaws.com",
            None,
        ),
        (
            "S3",
            "https://bucket.s3-accelerate.dualstack.amazonaws.com",
            Some("cn-north-1"),
        ),
        (
            "S3",
            "https://s3.cn-north-1.amazonaws.com.cn",
            Some("eu-west-1"),
        ),
        ("S3", "https://S3.CN-NORTH-1.AMAZONAWS.COM.CN:443", None),
        ("S3", "https://files.example.cn", None),
        ("S3", "https://files.example.cn", Some("cn-north-1")),
        ("OSS", "https://oss-cn-beijing-internal.aliyuncs.com", None),
        ("OSS", "https://backups.oss-cn-beijing.aliyuncs.com", None),
        (
            "OSS",
            "https://oss-cn-shanghai.oss-cn-hongkong.aliyuncs.com",
            None,
        ),
        (
            "OSS",
            "https://oss-data.oss-cn-beijing.aliyuncs.com",
            Some("cn-beijing"),
        ),
        ("OSS", "https://oss-ap-southeast-1.aliyuncs.com", None),
        (
            "OSS",
            "https://bucket.oss-accelerate.aliyuncs.com",
            Some("cn-shanghai"),
        ),
        (
            "OSS",
            "https://oss-accelerate-overseas.aliyuncs.com",
            Some("cn-shanghai"),
        ),
        ("OSS", "https://oss-cn-hangzhou.aliyuncs.com.", None),
        (
            "COS",
            "https://examplebucket-1250000000.cos.ap-guangzhou.myqcloud.com",
            None,
        ),
        ("COS", "https://cos.ap-shanghai.tencentcos.cn", None),
        (
            "COS",
            "https://backups-1250000000.cos-internal.ap-beijing.tencentcos.cn",
            None,
        ),
        ("COS", "https://cos.cos.ap-hongkong.myqcloud.com", None),
        (
            "COS",
            "https://examplebucket-1250000000.cos.accelerate.myqcloud.com",
            Some("ap-beijing"),
        ),
        (
            "COS",
            "https://cos.ap-hongkong.myqcloud.com",
            Some("ap-guangzhou"),
        ),
        ("OBS", "https://obs.cn-east-3.myhuaweicloud.com", None),
        (
            "OBS",
            "https://backups.obs.cn-north-4.myhuaweicloud.com",
            None,
        ),
        (
            "OBS",
            "https://obs.obs.ap-southeast-1.myhuaweicloud.com",
            None,
        ),
        (
            "OBS",
            "https://obs.ap-southeast-1.myhuaweicloud.com",
            Some("cn-east-3"),
        ),
        (
            "AzureBlob",
            "https://acct.blob.core.chinacloudapi.cn",
            Some("chinanorth3"),
        ),
        (
            "AzureBlob",
            "https://acct.blob.core.chinacloudapi.cn",
            Some("westeurope"),
        ),
        (
            "AzureBlob",
            "https://acct.blob.core.windows.net",
            Some("eastasia"),
        ),
        ("GCS", "https://storage.googleapis.com", Some("asia-east1")),
        ("S3Compatible", "http://127.0.0.1:8333", Some("cn-shanghai")),
        // Forms an adversarial review found trusted to the declaration before.
        (
            "OSS",
            "https://cn-hongkong.oss.aliyuncs.com",
            Some("cn-shanghai"),
        ),
        ("OSS", "https://bucket.cn-shanghai.oss.aliyuncs.com", None),
        ("OSS", "https://oss.aliyuncs.com", Some("cn-shanghai")),
        (
            "OBS",
            "https://obs.eu-west-101.myhuaweicloud.eu",
            Some("cn-east-3"),
        ),
        (
            "S3",
            "https://s3-external-1.amazonaws.com",
            Some("cn-north-1"),
        ),
        ("S3", "https://bucket.amazonaws.com", Some("eu-central-1")),
        (
            "S3",
            "https://mfzwi23gnjvgw.mrap.accesspoint.s3-global.amazonaws.com",
            Some("eu-central-1"),
        ),
        (
            "AzureBlob",
            "https://acct.blob.core.windows.net",
            Some("chinaeast2"),
        ),
        (
            "S3Compatible",
            "http://127.0.0.1:8333",
            Some("ap-southeast-1"),
        ),
        ("S3Compatible", "http://[::1]:8333", Some("cn-shanghai")),
    ];
    let mut denied = 0;
    for (provider, endpoint, declared) in cases {
        let bucket = in_bucket(
            server("catalogue", "endpoint", "cn-shanghai"),
            provider,
            Some(endpoint),
            *declared,
        );
        let outcome = cluster
            .judged_alike(&bucket)
            .await
            .with_context(|| format!("{provider} {endpoint} {declared:?}"))?;
        denied += usize::from(outcome.denied.is_some());
    }
    // Both outcomes are exercised.
    ensure!((10..cases.len() - 5).contains(&denied), "{denied} denied");
    Ok(())
}

/// A policy as large as its schema allows where it bounds lists, and far larger than
/// anyone writes where it does not, still evaluates (the API server cancels an expression
/// over its cost limit, which would deny with a cost error).
async fn a_policy_at_the_schema_limits_stays_within_the_cel_cost_budget(
    cluster: &mut Cluster,
) -> Result<()> {
    let values: Vec<String> = (0..50).map(|v| format!("value-{v}")).collect();
    let expressions: Vec<Value> = (0..50)
        .map(|k| json!({"key": format!("k{k}"), "operator": "In", "values": values}))
        .collect();
    let labels: Vec<(String, String)> = (0..50)
        .map(|k| (format!("k{k}"), "value-49".to_string()))
        .collect();
    let labels: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    cluster.namespace("bulk", &labels).await?;
    let regions: Vec<String> = (0..255).map(|r| format!("region-{r}")).collect();
    let mut regions_and_shanghai = regions.clone();
    regions_and_shanghai.push("cn-shanghai".to_string());
    let transfers: Vec<Value> = (0..64)
        .map(|t| {
            json!({
                "destinationRegion": format!("elsewhere-{t}"),
                "assessmentReference": format!("REF-{t}"),
                "expires": "2099-01-01T00:00:00Z",
            })
        })
        .collect();
    let classes: Vec<String> = (0..1000).map(|c| format!("class-{c}")).collect();
    let endpoints: Vec<String> = (0..1000).map(|e| format!("*.e{e}.example.cn")).collect();
    let jurisdictions: Vec<&str> = sluice::api::Jurisdiction::ALL
        .iter()
        .filter(|j| **j != sluice::api::Jurisdiction::Cn)
        .map(|j| j.as_str())
        .collect();
    cluster
        .policy(json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "DataResidencyPolicy",
            "metadata": {"name": "bulk"},
            "spec": {
                "namespaceSelector": {"matchExpressions": expressions},
                "serverSelector": {"matchExpressions": [
                    {"key": "sluice.dev/data", "operator": "DoesNotExist"},
                ]},
                "allowedRegions": regions_and_shanghai,
                "jurisdictions": jurisdictions,
                "allowedStorageClasses": classes,
                "allowedEndpoints": endpoints,
                "crossBorderTransfers": transfers,
            },
        }))
        .await?;
    cluster.wait_for_policies().await?;

    // Every list is walked to its end: nothing matches until the last entry, or at all.
    let bucket = in_bucket(
        server("bulk", "bulk", "cn-shanghai"),
        "S3Compatible",
        Some("https://files.e999.example.cn"),
        Some("region-254"),
    );
    let outcome = cluster.judged_alike(&bucket).await?;
    ensure!(outcome.denied.is_none(), "{outcome:?}");
    let far = in_bucket(
        server("bulk", "far", "cn-shanghai"),
        "S3Compatible",
        Some("https://files.example.com"),
        Some("nowhere-1"),
    );
    let outcome = cluster.judged_alike(&far).await?;
    let denied = outcome.denied.unwrap_or_default();
    ensure!(
        denied.contains("[StorageRegion] storage region nowhere-1 is not allowed")
            && denied.contains("[Endpoint] object-store endpoint files.example.com"),
        "{denied}"
    );
    Ok(())
}
