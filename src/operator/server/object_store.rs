//! Object storage on the operator's side: the plan a spec gives (where the bucket is and
//! how the gateway reaches it), and the probe that proves the bucket takes writes.
//!
//! - [`plan`] is pure. It resolves the region with the same
//!   [`crate::residency::region::resolve_region`] the policy evaluation uses, fills in
//!   the provider's regional endpoint when the spec gives none, and normalises the
//!   prefix, producing the [`ObjectStoreConfig`] the gateway receives.
//! - [`probe`] writes one small object, `PREFIX.sluice-probe/UID`, and deletes it, with
//!   the credentials the gateway will use (checking that the bucket exists would not
//!   show that the credentials may write), then looks up a missing key and lists the
//!   probe directory, which the gateway needs too: without list rights S3 answers a
//!   missing key with 403, and every upload would fail. Its result becomes the `StorageAvailable`
//!   condition. Messages are the operator's own words plus the provider's error code
//!   (`NoSuchBucket`, `InvalidAccessKeyId`, ...): nothing from a response body is
//!   repeated, so no signature material or key id reaches a status.
//! - [`ProbeMemo`] keeps results so that a burst of watch events does not write the
//!   bucket on every reconcile: a success is reused for [`PROBE_SUCCESS_TTL`], a failure
//!   for [`PROBE_FAILURE_TTL`] (the server is requeued to probe again after that).
//!   Entries are keyed by server and by a digest of the configuration and credentials,
//!   so a changed Secret or spec is probed afresh.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use sha2::{Digest, Sha256};

use crate::api::{
    AddressingStyle, ObjectStorage, ObjectStoreProvider as Provider, Reason, TransferServer,
};
use crate::residency::region::{ResolvedRegion, resolve_region};
use crate::storage::object::{
    Credentials, ObjectStoreConfig, build_operator, default_endpoint, required_keys,
};

pub use crate::storage::PROBE_DIR;
/// How long a successful probe is trusted.
pub const PROBE_SUCCESS_TTL: Duration = Duration::from_secs(300);
/// How long a failed probe is reported before probing again.
pub const PROBE_FAILURE_TTL: Duration = Duration::from_secs(25);
/// How long one probe may take in all.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// How a server's object store is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectStorePlan {
    /// What the gateway is given.
    pub config: ObjectStoreConfig,
    /// The resolved region and its jurisdiction.
    pub resolved: ResolvedRegion,
    /// The credentials Secret, unless workload identity is used.
    pub secret: Option<String>,
    /// The ServiceAccount pods run as with workload identity.
    pub service_account: Option<String>,
}

/// The object store `server` declares, planned; `Ok(None)` for a server on a volume. An
/// error is a spec problem, explained.
pub fn plan(server: &TransferServer) -> Result<Option<ObjectStorePlan>, String> {
    let Some(store) = server.spec.storage.object_store.as_ref() else {
        return Ok(None);
    };
    plan_store(store).map(Some)
}

fn plan_store(store: &ObjectStorage) -> Result<ObjectStorePlan, String> {
    let resolved = resolve_region(
        store.provider,
        store.endpoint.as_deref(),
        store.region.as_deref(),
    )
    .map_err(|e| format!("storage.objectStore: {e}"))?;
    if let Some(endpoint) = &store.endpoint
        && let Some(host) = link_local_host(endpoint)
    {
        return Err(format!(
            "storage.objectStore.endpoint: {host} is a link-local address (where cloud \
             metadata services answer), not an object store"
        ));
    }
    let endpoint = match &store.endpoint {
        Some(endpoint) => endpoint.trim_end_matches('/').to_owned(),
        None => default_endpoint(store.provider, &resolved.region).ok_or_else(|| {
            format!(
                "storage.objectStore: {:?} has no default endpoint; set endpoint",
                store.provider
            )
        })?,
    };
    if let Some(endpoint) = &store.endpoint
        && virtual_hosted(store)
        && crate::residency::region::endpoint_host(endpoint)
            .is_ok_and(|host| host.parse::<std::net::IpAddr>().is_ok())
    {
        return Err(format!(
            "storage.objectStore.endpoint: {endpoint} names an IP address, and virtual-hosted \
             addressing puts the bucket in the host name; set addressingStyle: Path, or use \
             the store's DNS name"
        ));
    }
    if let Some(problem) = store.prefix.as_deref().and_then(prefix_problem) {
        return Err(format!("storage.objectStore.prefix: {problem}"));
    }
    let prefix = match store.prefix.as_deref().map(|p| p.trim_end_matches('/')) {
        None | Some("") => String::new(),
        Some(prefix) => format!("{prefix}/"),
    };
    let workload_identity = store.credentials.workload_identity == Some(true);
    Ok(ObjectStorePlan {
        config: ObjectStoreConfig {
            provider: store.provider,
            bucket: store.bucket.clone(),
            prefix,
            endpoint,
            region: resolved.region.clone(),
            addressing_style: store.addressing_style.unwrap_or_default(),
            workload_identity,
        },
        resolved,
        secret: store
            .credentials
            .secret_ref
            .as_ref()
            .map(|r| r.name.clone()),
        service_account: store
            .credentials
            .service_account_name
            .clone()
            .filter(|_| workload_identity),
    })
}

/// Whether requests name the bucket in the host: S3 and S3-compatible stores unless
/// `addressingStyle: Path`, and always OSS, COS and OBS.
fn virtual_hosted(store: &ObjectStorage) -> bool {
    match store.provider {
        Provider::S3 | Provider::S3Compatible => {
            store.addressing_style.unwrap_or_default() == AddressingStyle::VirtualHosted
        }
        Provider::Oss | Provider::Cos | Provider::Obs => true,
        Provider::AzureBlob | Provider::Gcs => false,
    }
}

/// Why a prefix cannot be a server's storage root: a segment that is, or could become, a
/// directory Sluice reserves (`.sluice-audit`, `.sluice-uploads`, ... of a server whose
/// prefix is the part before it), or characters some stores rewrite (a backslash becomes
/// `/` in SeaweedFS, so `a\b` would be another server's `a/b`).
fn prefix_problem(prefix: &str) -> Option<String> {
    if let Some(segment) = prefix.split('/').find(|s| s.starts_with(".sluice-")) {
        return Some(format!(
            "{segment:?} is a name Sluice reserves inside a server's storage (audit log, \
             uploads, probes); another server's users would reach it"
        ));
    }
    prefix
        .chars()
        .any(|c| c == '\\' || c.is_control())
        .then(|| "a prefix may not hold a backslash or control characters".to_string())
}

/// The host of `endpoint` if it is a link-local address (169.254.0.0/16, fe80::/10) or a
/// well-known cloud metadata name. Neither the operator's probe nor the gateway may be
/// pointed there.
fn link_local_host(endpoint: &str) -> Option<String> {
    // The host every HTTP client connects to; an endpoint that is not a plain host was
    // refused when its region was resolved.
    let host = crate::residency::region::endpoint_host(endpoint).ok()?;
    let link_local = match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => v4.is_link_local(),
        Ok(std::net::IpAddr::V6(v6)) => {
            v6.is_unicast_link_local() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_link_local())
        }
        Err(_) => matches!(host.as_str(), "metadata.google.internal" | "metadata"),
    };
    link_local.then_some(host)
}

/// Whether the object store works, as far as the operator can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageState {
    /// A probe object was written and deleted.
    Available,
    /// The pods' workload identity cannot be used from the operator, so nothing was
    /// probed; the gateway's own errors tell.
    NotProbed,
    /// Something is wrong; the reason and an explanation for the status.
    Unavailable(Reason, String),
}

/// The credentials `plan` needs, from `secret` (`Some(None)`: it does not exist).
pub fn credentials(
    plan: &ObjectStorePlan,
    secret: Option<&Option<Secret>>,
) -> Result<Credentials, StorageState> {
    let Some(name) = &plan.secret else {
        return Ok(Credentials::default());
    };
    let Some(Some(secret)) = secret else {
        let message = format!("the credentials Secret {name} does not exist");
        return Err(StorageState::Unavailable(
            Reason::StorageCredentialsMissing,
            message,
        ));
    };
    let data = secret.data.iter().flatten();
    let credentials = Credentials::from_pairs(data.map(|(k, v)| (k.as_str(), v.0.as_slice())));
    if let Some(key) = credentials.missing(plan.config.provider) {
        let needed = required_keys(plan.config.provider).join(", ");
        let message =
            format!("the credentials Secret {name} has no non-empty key {key} (needs {needed})");
        return Err(StorageState::Unavailable(
            Reason::StorageCredentialsMissing,
            message,
        ));
    }
    Ok(credentials)
}

/// Writes and deletes `PREFIX.sluice-probe/NAME` with `credentials`.
pub async fn probe(plan: &ObjectStorePlan, credentials: &Credentials, name: &str) -> StorageState {
    if plan.config.workload_identity {
        return StorageState::NotProbed;
    }
    let operator = match build_operator(&plan.config, credentials) {
        Ok(operator) => operator,
        Err(error) => {
            return StorageState::Unavailable(Reason::StorageProbeFailed, error.to_string());
        }
    };
    let key = format!("{PROBE_DIR}/{name}");
    // What the gateway needs besides writing and deleting: a look-up of a missing key
    // must say "not found" (S3 answers 403 instead when the credentials may not list),
    // and a directory must list.
    let attempt = async {
        operator
            .write(&key, b"sluice storage probe\n".to_vec())
            .await?;
        operator.delete(&key).await?;
        match operator.stat(&format!("{key}.absent")).await {
            Ok(_) => {}
            Err(error) if error.kind() == opendal::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        operator
            .list_with(&format!("{PROBE_DIR}/"))
            .limit(1)
            .await
            .map(drop)
    };
    let outcome = tokio::time::timeout(PROBE_TIMEOUT, attempt).await;
    let where_ = format!("bucket {} at {}", plan.config.bucket, plan.config.endpoint);
    match outcome {
        Ok(Ok(())) => StorageState::Available,
        Ok(Err(error)) => {
            let (reason, message) = classify(&error, &where_);
            StorageState::Unavailable(reason, message)
        }
        Err(_) => StorageState::Unavailable(
            Reason::StorageUnreachable,
            format!(
                "{where_} did not answer a probe write within {} s",
                PROBE_TIMEOUT.as_secs()
            ),
        ),
    }
}

/// Error codes providers send for credentials that are wrong, expired or lack rights.
const ACCESS_CODES: [&str; 9] = [
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthenticationFailed",
    "AuthorizationFailure",
    "InvalidSecurity",
];

/// Codes for a bucket (or container) that does not exist.
const MISSING_BUCKET_CODES: [&str; 2] = ["NoSuchBucket", "ContainerNotFound"];

/// A sanitised reason and message for a failed probe.
fn classify(error: &opendal::Error, where_: &str) -> (Reason, String) {
    // The rendered error can contain the response body; only a known code is taken
    // from it, never free text.
    let rendered = format!("{error:?}");
    let code = |codes: &[&'static str]| codes.iter().copied().find(|c| rendered.contains(c));
    if let Some(code) = code(&MISSING_BUCKET_CODES) {
        return (
            Reason::BucketNotFound,
            format!("{where_} does not exist ({code})"),
        );
    }
    if let Some(code) = code(&ACCESS_CODES) {
        return (
            Reason::StorageAccessDenied,
            format!(
                "{where_} refused the credentials ({code}): check that they are current and \
                 may write and delete objects"
            ),
        );
    }
    match error.kind() {
        opendal::ErrorKind::PermissionDenied => (
            Reason::StorageAccessDenied,
            format!("{where_} refused the credentials: check that they may write and delete"),
        ),
        opendal::ErrorKind::NotFound => {
            (Reason::BucketNotFound, format!("{where_} does not exist"))
        }
        _ if is_connection_error(error) => (
            Reason::StorageUnreachable,
            format!("{where_} cannot be reached"),
        ),
        kind => (
            Reason::StorageProbeFailed,
            format!("a probe write to {where_} failed ({kind})"),
        ),
    }
}

/// Whether the request never got an answer: DNS, connect, TLS or a reset.
fn is_connection_error(error: &opendal::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if current.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        source = current.source();
    }
    let rendered = format!("{error:?}");
    [
        "error sending request",
        "connect",
        "dns error",
        "Connection refused",
    ]
    .iter()
    .any(|marker| rendered.contains(marker))
}

/// A remembered probe: the digest of what was probed, when, and the result.
type Probed = (Vec<u8>, Instant, StorageState);

/// Recent probe results by server.
#[derive(Default)]
pub struct ProbeMemo {
    entries: Mutex<HashMap<String, Probed>>,
}

impl ProbeMemo {
    /// The state of `plan` for the server `key`: a remembered probe result if it is
    /// recent and for the same configuration and credentials, else a new probe.
    pub async fn state(
        &self,
        key: &str,
        plan: &ObjectStorePlan,
        credentials: &Credentials,
        probe_name: &str,
    ) -> StorageState {
        let digest = digest(plan, credentials);
        if let Some(state) = self.recent(key, &digest) {
            return state;
        }
        let state = probe(plan, credentials, probe_name).await;
        self.entries
            .lock()
            .expect("probe memo lock")
            .insert(key.to_owned(), (digest, Instant::now(), state.clone()));
        state
    }

    fn recent(&self, key: &str, digest: &[u8]) -> Option<StorageState> {
        let entries = self.entries.lock().expect("probe memo lock");
        let (seen, at, state) = entries.get(key)?;
        let ttl = match state {
            StorageState::Unavailable(..) => PROBE_FAILURE_TTL,
            _ => PROBE_SUCCESS_TTL,
        };
        (seen == digest && at.elapsed() < ttl).then(|| state.clone())
    }

    /// Forgets `key` (a deleted server).
    pub fn forget(&self, key: &str) {
        self.entries.lock().expect("probe memo lock").remove(key);
    }
}

fn digest(plan: &ObjectStorePlan, credentials: &Credentials) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(serde_json::to_vec(&plan.config).unwrap_or_default());
    for key in crate::storage::object::ALL_KEYS {
        hasher.update([0]);
        hasher.update(key);
        hasher.update([0]);
        hasher.update(credentials.get(key).unwrap_or_default());
    }
    hasher.finalize().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ObjectStoreProvider as Provider, TransferServerSpec};

    fn server(store_yaml: &str) -> TransferServer {
        let spec: TransferServerSpec = serde_yaml::from_str(&format!(
            "region: cn-shanghai\nprotocols: {{sftp: {{}}}}\nstorage:\n  objectStore:\n{store_yaml}"
        ))
        .unwrap();
        TransferServer::new("files", spec)
    }

    #[test]
    fn the_regional_endpoint_is_filled_in_and_the_prefix_normalised() {
        let plan = plan(&server(
            "    provider: OSS\n    bucket: backups\n    region: cn-shanghai\n    \
             prefix: gateways/cucm\n    credentials: {secretRef: {name: oss}}\n",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(plan.config.endpoint, "https://oss-cn-shanghai.aliyuncs.com");
        assert_eq!(plan.config.prefix, "gateways/cucm/");
        assert_eq!(plan.config.region, "cn-shanghai");
        assert_eq!(plan.resolved.jurisdiction, Some("CN"));
        assert_eq!(plan.secret.as_deref(), Some("oss"));
        assert_eq!(plan.config.check_region().unwrap().region, "cn-shanghai");
    }

    #[test]
    fn an_internal_endpoint_gives_the_region() {
        let plan = plan(&server(
            "    provider: OSS\n    bucket: backups\n    \
             endpoint: https://oss-cn-beijing-internal.aliyuncs.com/\n    \
             credentials: {secretRef: {name: oss}}\n",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(plan.config.region, "cn-beijing");
        assert_eq!(
            plan.config.endpoint,
            "https://oss-cn-beijing-internal.aliyuncs.com"
        );
        assert_eq!(plan.config.prefix, "");
    }

    #[test]
    fn a_contradicting_region_is_a_spec_problem() {
        let error = plan(&server(
            "    provider: COS\n    bucket: backups-1250000000\n    region: ap-shanghai\n    \
             endpoint: https://cos.ap-hongkong.myqcloud.com\n    \
             credentials: {secretRef: {name: cos}}\n",
        ))
        .unwrap_err();
        assert!(
            error.contains("ap-shanghai contradicts the endpoint"),
            "{error}"
        );
    }

    #[test]
    fn workload_identity_keeps_its_service_account() {
        let plan = plan(&server(
            "    provider: S3\n    bucket: backups\n    region: cn-northwest-1\n    \
             credentials: {workloadIdentity: true, serviceAccountName: uploads}\n",
        ))
        .unwrap()
        .unwrap();
        assert!(plan.config.workload_identity);
        assert_eq!(plan.config.provider, Provider::S3);
        assert_eq!(plan.service_account.as_deref(), Some("uploads"));
        assert_eq!(
            plan.config.endpoint,
            "https://s3.cn-northwest-1.amazonaws.com.cn"
        );
        assert_eq!(plan.secret, None);
    }

    #[test]
    fn missing_credentials_are_named_without_values() {
        let plan = plan(&server(
            "    provider: S3Compatible\n    bucket: backups\n    region: cn-shanghai\n    \
             endpoint: http://127.0.0.1:9\n    addressingStyle: Path\n    \
             credentials: {secretRef: {name: s3}}\n",
        ))
        .unwrap()
        .unwrap();
        let missing = credentials(&plan, Some(&None)).unwrap_err();
        assert_eq!(
            missing,
            StorageState::Unavailable(
                Reason::StorageCredentialsMissing,
                "the credentials Secret s3 does not exist".into()
            )
        );
        let secret = Secret {
            data: Some(
                [(
                    "accessKeyId".to_string(),
                    k8s_openapi::ByteString(b"id".to_vec()),
                )]
                .into(),
            ),
            ..Secret::default()
        };
        let StorageState::Unavailable(reason, message) =
            credentials(&plan, Some(&Some(secret))).unwrap_err()
        else {
            panic!("expected a missing key");
        };
        assert_eq!(reason, Reason::StorageCredentialsMissing);
        assert_eq!(
            message,
            "the credentials Secret s3 has no non-empty key secretAccessKey \
             (needs accessKeyId, secretAccessKey)"
        );
    }

    #[test]
    fn probe_failures_are_classified_without_repeating_the_response() {
        let body = "<Error><Code>SignatureDoesNotMatch</Code>\
                    <AWSAccessKeyId>AKIAEXAMPLEKEYID</AWSAccessKeyId>\
                    <StringToSign>AWS4-HMAC-SHA256 20261204T000000Z</StringToSign></Error>";
        let cases = [
            (
                opendal::ErrorKind::Unexpected,
                body,
                Reason::StorageAccessDenied,
            ),
            (
                opendal::ErrorKind::Unexpected,
                "<Error><Code>NoSuchBucket</Code><BucketName>b-123</BucketName></Error>",
                Reason::BucketNotFound,
            ),
            (
                opendal::ErrorKind::PermissionDenied,
                "forbidden",
                Reason::StorageAccessDenied,
            ),
            (
                opendal::ErrorKind::NotFound,
                "no such thing",
                Reason::BucketNotFound,
            ),
            (
                opendal::ErrorKind::RateLimited,
                "<Error><Code>SlowDown</Code></Error>",
                Reason::StorageProbeFailed,
            ),
        ];
        for (kind, response, expected) in cases {
            let error = opendal::Error::new(kind, response);
            let (reason, message) = classify(&error, "bucket b-123 at https://s3.example");
            assert_eq!(reason, expected, "{response}");
            for leaked in ["AKIAEXAMPLEKEYID", "StringToSign", "<Error>", "forbidden"] {
                assert!(!message.contains(leaked), "{message}");
            }
        }
    }

    #[test]
    fn link_local_endpoints_are_refused() {
        for endpoint in [
            "http://169.254.169.254",
            "http://169.254.170.2:80",
            "http://[fe80::1]:9000",
            "http://[::ffff:169.254.169.254]/",
            "http://metadata.google.internal/",
        ] {
            let store = format!(
                "    provider: S3Compatible\n    bucket: backups\n    region: cn-shanghai\n    \
                 endpoint: \"{endpoint}\"\n    addressingStyle: Path\n    \
                 credentials: {{secretRef: {{name: s3}}}}\n"
            );
            let error = plan(&server(&store)).unwrap_err();
            assert!(error.contains("link-local"), "{endpoint}: {error}");
        }
        for endpoint in ["http://127.0.0.1:8333", "https://minio.storage.svc:9000"] {
            let store = format!(
                "    provider: S3Compatible\n    bucket: backups\n    region: cn-shanghai\n    \
                 endpoint: \"{endpoint}\"\n    addressingStyle: Path\n    \
                 credentials: {{secretRef: {{name: s3}}}}\n"
            );
            assert!(plan(&server(&store)).is_ok(), "{endpoint}");
        }
    }

    #[test]
    fn virtual_hosted_addressing_needs_a_dns_name() {
        let store = "    provider: S3Compatible\n    bucket: backups\n    region: cn-shanghai\n    \
                     endpoint: \"http://127.0.0.1:8333\"\n    \
                     credentials: {secretRef: {name: s3}}\n";
        let error = plan(&server(store)).unwrap_err();
        assert!(error.contains("set addressingStyle: Path"), "{error}");
        let path = format!("{store}    addressingStyle: Path\n");
        assert!(plan(&server(&path)).is_ok());
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        {
            let store = format!(
                "    provider: S3Compatible\n    bucket: backups\n    region: cn-shanghai\n    \
                 endpoint: \"http://{closed}\"\n    addressingStyle: Path\n    \
                 credentials: {{secretRef: {{name: s3}}}}\n"
            );
            let plan = plan(&server(&store)).unwrap().unwrap();
            let credentials = Credentials::from_pairs([
                ("accessKeyId", b"AKID".as_slice()),
                ("secretAccessKey", b"secret".as_slice()),
            ]);
            let state = probe(&plan, &credentials, "uid").await;
            assert!(
                matches!(
                    state,
                    StorageState::Unavailable(Reason::StorageUnreachable, _)
                ),
                "{state:?}"
            );
        }
    }
}
