//! `TransferServer`: one gateway, its protocols, region and storage.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A file-transfer gateway pinned to one region.
///
/// The operator runs it as a StatefulSet of `sluice gateway` pods scheduled only onto
/// nodes of `region`, stores its files in `storage`, and exposes it through a Service.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "TransferServer",
    namespaced,
    status = "TransferServerStatus",
    shortname = "tsrv",
    category = "sluice",
    doc = "A file-transfer gateway (SFTP, FTPS) pinned to one region, with its storage.",
    printcolumn = r#"{"name":"Region","type":"string","jsonPath":".spec.region"}"#,
    printcolumn = r#"{"name":"Protocols","type":"string","jsonPath":".status.protocols"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpoint"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TransferServerSpec {
    /// Region the gateway and its data are pinned to, for example `cn-shanghai`. Pods are
    /// scheduled only onto nodes whose region label (by default
    /// `topology.kubernetes.io/region`, or the one the governing DataResidencyPolicy names)
    /// has this value, and the governing DataResidencyPolicy must allow it. It must be a
    /// valid label value.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    )]
    pub region: String,

    /// Protocols the gateway serves. At least one must be enabled.
    pub protocols: Protocols,

    /// Where the gateway stores files.
    pub storage: Storage,

    /// Number of gateway pods. Defaults to 1. The pods form a StatefulSet
    /// (`NAME-gateway-0`, `NAME-gateway-1`, ...). With FTPS behind a NodePort or
    /// LoadBalancer Service and more than one pod, the passive port range is split evenly
    /// between the pods and each pod gets a Service of its own (`NAME-gateway-ORDINAL`)
    /// for its share, so a data connection always reaches the pod that announced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 32))]
    pub replicas: Option<i32>,

    /// How the gateway is exposed. Defaults to a ClusterIP Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceExposure>,

    /// Where the gateway keeps its audit log besides the server's own storage, where it
    /// always goes (one JSON line per login and file operation, under
    /// `.sluice-audit/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_log: Option<AuditLog>,

    /// The NetworkPolicy that limits where gateway pods may connect to. On by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicySettings>,

    /// CPU, memory and ephemeral storage of each gateway pod's container, in the shape of
    /// a container's `resources`. Without it the gateway requests `100m` CPU and `256Mi`
    /// memory and is limited to `512Mi` memory on a volume, `1280Mi` on an object store
    /// (whose uploads buffer up to 768 MiB per pod), with no CPU limit. When given it is
    /// used exactly as written: nothing is merged with those defaults, and what it leaves
    /// out is not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<GatewayResources>,

    /// Seconds a gateway pod that is being stopped (rolling update, scale-down, node
    /// drain) lets running transfers finish. It refuses new connections from the moment
    /// it is told to stop, and disconnects what is still running when this time is up;
    /// the pod's `terminationGracePeriodSeconds` is this plus 10. Defaults to 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub shutdown_grace_period_seconds: Option<i32>,

    /// Where and how the gateway pods run, besides the required node affinity on the
    /// region, which always applies: registry credentials, tolerations for tainted
    /// regional node pools, more node labels, priority, annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<GatewayPod>,
}

/// Settings of the gateway pods.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayPod {
    /// Secrets (of type `kubernetes.io/dockerconfigjson`, in the server's namespace) for
    /// pulling the gateway image from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<SecretReference>,

    /// Tolerations, for node pools of the region that carry taints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,

    /// Node labels the pods' nodes must also carry (a node pool, say). The region label is
    /// required anyway and cannot be set here.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub node_selector: std::collections::BTreeMap<String, String>,

    /// PriorityClass of the gateway pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,

    /// Annotations on the gateway pods (a service mesh's or a log collector's, say).
    /// Annotations Sluice sets itself (`sluice.dev/...`) win.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// The gateway pods' egress NetworkPolicy. It lets them reach only DNS (the cluster's
/// `kube-dns` pods, and `dnsCIDRs`) and their object store (on the endpoint's port, inside
/// `objectStore.endpointCIDRs` when given), so a compromised gateway cannot send files
/// anywhere else. Gateways need nothing else: they never call the Kubernetes API. Ingress
/// is not restricted (clients connect from wherever the Service is reachable). It takes
/// effect only where the cluster's network plugin enforces NetworkPolicies.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySettings {
    /// Render the NetworkPolicy. Defaults to true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,

    /// More addresses that answer DNS on port 53, in CIDR notation, for clusters with a
    /// node-local DNS cache (for example `169.254.20.10/32`).
    #[serde(default, rename = "dnsCIDRs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(min = 1, max = 43)))]
    pub dns_cidrs: Vec<String>,
}

/// Requests and limits of the gateway container: CPU, memory and ephemeral storage only.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.requests) || !has(self.limits) || !has(self.requests.cpu) || !has(self.limits.cpu) || quantity(self.requests.cpu).compareTo(quantity(self.limits.cpu)) <= 0",
        "message": "requests.cpu must not exceed limits.cpu"
    },
    {
        "rule": "!has(self.requests) || !has(self.limits) || !has(self.requests.memory) || !has(self.limits.memory) || quantity(self.requests.memory).compareTo(quantity(self.limits.memory)) <= 0",
        "message": "requests.memory must not exceed limits.memory"
    },
    {
        "rule": "!has(self.requests) || !has(self.limits) || !has(self.requests.ephemeral__dash__storage) || !has(self.limits.ephemeral__dash__storage) || quantity(self.requests.ephemeral__dash__storage).compareTo(quantity(self.limits.ephemeral__dash__storage)) <= 0",
        "message": "requests.ephemeral-storage must not exceed limits.ephemeral-storage"
    }
]))]
pub struct GatewayResources {
    /// What the scheduler reserves for the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<ResourceAmounts>,

    /// The most the container may use: over its memory limit it is killed, over its CPU
    /// limit it is throttled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceAmounts>,
}

/// Amounts of CPU, memory and ephemeral storage, as Kubernetes quantities. They reach the
/// pod template as written; the API server stores them in canonical form there (`1000m`
/// becomes `1`), which changes nothing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ResourceAmounts {
    /// CPU, for example `250m` or `2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), regex(pattern = QUANTITY_PATTERN))]
    pub cpu: Option<String>,

    /// Memory, for example `512Mi` or `2Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), regex(pattern = QUANTITY_PATTERN))]
    pub memory: Option<String>,

    /// Ephemeral storage: the container's writable `/tmp` and its logs, for example
    /// `1Gi`.
    #[serde(
        default,
        rename = "ephemeral-storage",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 64), regex(pattern = QUANTITY_PATTERN))]
    pub ephemeral_storage: Option<String>,
}

/// Audit log destinations besides the server's storage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditLog {
    /// Also write every audit record to the gateway's standard output, for a log
    /// collector. Defaults to false; a governing DataResidencyPolicy must allow it
    /// (`allowAuditLogStdout`), because collectors may ship logs out of the region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<bool>,
}

/// Protocols served by the gateway.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.sftp) || has(self.ftps)",
    "message": "at least one protocol must be enabled (protocols.sftp or protocols.ftps)"
}]))]
pub struct Protocols {
    /// SFTP (SSH File Transfer Protocol). Present means enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sftp: Option<SftpProtocol>,

    /// FTPS (FTP over TLS), explicit and/or implicit. Present means enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ftps: Option<FtpsProtocol>,
}

/// SFTP settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SftpProtocol {
    /// Port the Service exposes SFTP on. Defaults to 22.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

/// FTPS settings. Files, users and permissions are the same as over SFTP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.explicit) || has(self.implicit)",
        "message": "ftps needs explicit, implicit or both"
    },
    {
        "rule": "!has(self.allowPlaintext) || !self.allowPlaintext || has(self.explicit)",
        "message": "allowPlaintext applies to the explicit port only; enable ftps.explicit"
    }
]))]
pub struct FtpsProtocol {
    /// Explicit FTPS: clients connect in plain text and switch to TLS with `AUTH TLS`
    /// before logging in (curl `ftp://` with `--ssl-reqd`, lftp, FileZilla "Require
    /// explicit FTP over TLS"). Present means enabled; the port defaults to 21.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explicit: Option<FtpsPort>,

    /// Implicit FTPS: TLS from the first byte (curl `ftps://`, FileZilla "Require
    /// implicit FTP over TLS"). Present means enabled; the port defaults to 990.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub implicit: Option<FtpsPort>,

    /// The Secret of type `kubernetes.io/tls` (keys `tls.crt` and `tls.key`, as
    /// cert-manager writes them) holding the server certificate and its key. A renewed
    /// certificate is used for new connections within seconds, without a restart. While
    /// the Secret is missing or its certificate is expired, FTPS connections are refused
    /// and the server reports `TlsCertificateValid=False`; SFTP is not affected.
    pub tls_secret_ref: SecretReference,

    /// Ports for passive data connections. Every port is exposed on the gateway
    /// container and its Service. Defaults to 16 ports from 30000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive_ports: Option<PassivePortRange>,

    /// Address (IPv4 or DNS name) that `PASV` replies announce, for clients outside the
    /// cluster: a node address with a NodePort Service (required there), or a fixed
    /// load-balancer address. Without it a LoadBalancer Service's assigned address is
    /// announced once it is known, and inside the cluster the pod's own address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
    )]
    pub passive_address: Option<String>,

    /// Allow logins and transfers without TLS on the explicit port. Off by default; a
    /// DataResidencyPolicy refuses it unless the policy sets `allowPlaintextFtp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_plaintext: Option<bool>,

    /// TLS session reuse on data connections: `Allow` (the default), `Require` or
    /// `Never`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_reuse: Option<SessionReuse>,

    /// Oldest TLS version accepted: `"1.2"` (the default) or `"1.3"`. Only AEAD cipher
    /// suites are offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tls_version: Option<TlsVersion>,
}

/// An FTPS control port.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FtpsPort {
    /// Port the Service exposes it on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

/// A Secret in the server's namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A range of TCP ports: `first` to `first + count - 1`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.first + self.count - 1 <= 65535",
    "message": "the passive range must end at or below port 65535"
}]))]
pub struct PassivePortRange {
    /// First port. At least 1024, since the gateway does not run as root.
    #[schemars(range(min = 1024, max = 65535))]
    pub first: i32,
    /// Number of ports: how many passive transfers can be set up at once per pod.
    #[schemars(range(min = 1, max = 1024))]
    pub count: i32,
}

/// TLS session reuse on FTPS data connections. `Allow` (the default): a data connection
/// may resume the control connection's TLS session, as curl, lftp and FileZilla do, or
/// make a full handshake. `Require`: a data connection must resume the control
/// connection's session, which proves it comes from the client that logged in; any other
/// is refused with a clear reply (curl over TLS 1.3 cannot do this for a second transfer
/// in one command). `Never`: every data connection makes a full handshake.
//
// `Never` rather than `Off`: YAML 1.1, which kubectl's parser follows, reads an unquoted
// `Off` as the boolean false, so `sessionReuse: Off` would reach the API server as
// `false` and be refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SessionReuse {
    /// Sessions are never resumed: every data connection makes a full handshake.
    Never,
    /// Data connections may resume the control connection's session, or make a full
    /// handshake.
    #[default]
    Allow,
    /// Data connections must resume the control connection's session.
    Require,
}

/// Oldest TLS version accepted on FTPS: `"1.2"` (the default) or `"1.3"` (quote it, or
/// YAML reads a number). Only AEAD cipher suites are offered in either.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum TlsVersion {
    /// TLS 1.2.
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    /// TLS 1.3.
    #[serde(rename = "1.3")]
    V1_3,
}

/// A Kubernetes resource quantity, as the API server parses it.
pub(crate) const QUANTITY_PATTERN: &str = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

/// Where files are stored. Exactly one backend must be given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.volume) != has(self.objectStore)",
    "message": "exactly one storage backend is required (storage.volume or storage.objectStore)"
}]))]
pub struct Storage {
    /// A PersistentVolumeClaim created and owned by the operator, mounted into every
    /// gateway pod. With more than one replica the StorageClass must support
    /// ReadWriteMany.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeStorage>,

    /// A bucket (or container) in an object store. Every replica reads and writes it
    /// directly; no volume is claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_store: Option<ObjectStorage>,
}

/// A bucket in an object store, reached through Apache OpenDAL's service for the
/// provider. The operator resolves the bucket's region from the provider, the endpoint and
/// `region` (an endpoint that names a region wins, and a `region` contradicting it is
/// refused), checks it against the DataResidencyPolicy as it checks `spec.region`, and
/// probes the bucket by writing and deleting one small object under
/// `PREFIX.sluice-probe/`; the gateway checks the region again before it serves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.provider != 'S3Compatible' || (has(self.endpoint) && has(self.region))",
        "message": "an S3Compatible store needs both endpoint and region"
    },
    {
        "rule": "!(self.provider in ['AzureBlob', 'GCS', 'S3Compatible']) || has(self.region)",
        "message": "this provider's endpoints do not name a region, so region is required"
    },
    {
        "rule": "self.provider != 'AzureBlob' || has(self.endpoint)",
        "message": "AzureBlob needs the storage account's endpoint, for example https://ACCOUNT.blob.core.chinacloudapi.cn"
    },
    {
        "rule": "has(self.region) || has(self.endpoint)",
        "message": "give the region or a regional endpoint"
    },
    {
        "rule": "!(has(self.credentials.workloadIdentity) && self.credentials.workloadIdentity) || self.provider in ['S3', 'OSS', 'AzureBlob', 'GCS']",
        "message": "workload identity is supported for S3, OSS, AzureBlob and GCS only; use credentials.secretRef"
    },
    {
        "rule": "!has(self.endpoint) || self.provider == 'S3Compatible' || self.endpoint.startsWith('https://')",
        "message": "a cloud provider's endpoint must use https:// (only an S3Compatible store may be reached over plain http)"
    }
]))]
pub struct ObjectStorage {
    /// The provider: `S3` (including AWS China), `OSS` (Alibaba Cloud), `COS` (Tencent
    /// Cloud), `OBS` (Huawei Cloud), `AzureBlob` (including Azure China), `GCS`, or
    /// `S3Compatible` (any other S3 API, at an explicit endpoint and region).
    pub provider: ObjectStoreProvider,

    /// Bucket name (the container, for AzureBlob). For COS it includes the APPID:
    /// `backups-1250000000`.
    #[schemars(
        length(min = 3, max = 222),
        regex(pattern = r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$")
    )]
    pub bucket: String,

    /// Key prefix inside the bucket under which everything is stored, for example
    /// `gateways/cucm`. No leading `/`, no `.` or `..` segments; a trailing `/` is implied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 512),
        regex(
            pattern = r"^([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+)(/([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+))*/?$"
        )
    )]
    pub prefix: Option<String>,

    /// The provider's region id, for example `cn-shanghai`. Required when the endpoint
    /// does not name one (AzureBlob, GCS, S3Compatible, custom domains); otherwise it
    /// must agree with the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9][a-z0-9-]*[a-z0-9]$")
    )]
    pub region: Option<String>,

    /// Endpoint URL, overriding the provider's public regional endpoint, for example
    /// `https://oss-cn-shanghai-internal.aliyuncs.com` (internal/VPC endpoints keep traffic
    /// inside the cloud). Must be `https://` except for S3Compatible stores. Accelerated
    /// endpoints are refused: they cannot be pinned to a region. Link-local addresses
    /// (cloud metadata services) are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 253),
        regex(
            pattern = r"^https?://([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*\.?|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?/?$"
        )
    )]
    pub endpoint: Option<String>,

    /// `VirtualHosted` (the default; `https://BUCKET.ENDPOINT/KEY`, which OSS, COS and
    /// OBS require) or `Path` (`https://ENDPOINT/BUCKET/KEY`, for S3-compatible stores
    /// without wildcard DNS). Applies to `S3` and `S3Compatible`; OSS, COS and OBS always
    /// use virtual-hosted addressing, and AzureBlob and GCS have their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addressing_style: Option<AddressingStyle>,

    /// How the gateway authenticates to the store.
    pub credentials: ObjectStoreCredentials,

    /// The address ranges the endpoint resolves into (for example your VPC endpoint's
    /// subnets), in CIDR notation. The gateway pods' NetworkPolicy then lets them reach
    /// the store only there; without them the pods may reach any address on the
    /// endpoint's port, since a bucket's addresses are not known in advance.
    #[serde(
        default,
        rename = "endpointCIDRs",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 32), inner(length(min = 1, max = 43)))]
    pub endpoint_cidrs: Vec<String>,
}

/// An object-storage provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ObjectStoreProvider {
    /// Amazon S3, including the AWS China regions (`cn-north-1`, `cn-northwest-1`).
    S3,
    /// Alibaba Cloud Object Storage Service.
    #[serde(rename = "OSS")]
    Oss,
    /// Tencent Cloud Object Storage.
    #[serde(rename = "COS")]
    Cos,
    /// Huawei Cloud Object Storage Service.
    #[serde(rename = "OBS")]
    Obs,
    /// Azure Blob Storage, including Azure China.
    AzureBlob,
    /// Google Cloud Storage.
    #[serde(rename = "GCS")]
    Gcs,
    /// Any other store speaking the S3 API, at an explicit endpoint and region.
    S3Compatible,
}

/// How object URLs are formed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AddressingStyle {
    /// `https://BUCKET.ENDPOINT/KEY`.
    #[default]
    VirtualHosted,
    /// `https://ENDPOINT/BUCKET/KEY`.
    Path,
}

/// Credentials for an object store: exactly one of `secretRef` and `workloadIdentity`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.secretRef) != (has(self.workloadIdentity) && self.workloadIdentity)",
    "message": "give exactly one of secretRef and workloadIdentity: true"
}, {
    "rule": "!has(self.serviceAccountName) || (has(self.workloadIdentity) && self.workloadIdentity)",
    "message": "serviceAccountName is only used with workloadIdentity: true"
}]))]
pub struct ObjectStoreCredentials {
    /// A Secret in the server's namespace, mounted read-only into the gateway pods. Keys:
    /// `accessKeyId` and `secretAccessKey` (plus optional `sessionToken`) for S3, OSS,
    /// COS, OBS and S3Compatible; `accountKey` (plus optional `accountName`, otherwise
    /// taken from the endpoint) for AzureBlob; `serviceAccountKey` (a service account's
    /// JSON key) for GCS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretReference>,

    /// Use the pod's workload identity instead of a Secret: IAM Roles for Service
    /// Accounts or EKS Pod Identity (S3), RRSA (OSS), Microsoft Entra Workload ID
    /// (AzureBlob), GKE Workload Identity (GCS). The environment the platform injects into
    /// the pod is used; EC2 instance metadata never is, so pods cannot borrow the node's
    /// role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<bool>,

    /// With workload identity, the ServiceAccount the gateway pods run as: the one the
    /// platform binds to a cloud role (for example annotated `eks.amazonaws.com/role-arn`).
    /// Defaults to the namespace's `default` ServiceAccount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: Option<String>,
}

/// A volume claimed from a StorageClass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStorage {
    /// StorageClass to claim the volume from. Choose one whose volumes stay inside the
    /// server's region (allowed topologies, or `WaitForFirstConsumer` binding).
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: String,

    /// Requested size as a Kubernetes quantity string, for example `50Gi`.
    // A string rather than `Quantity`: `Quantity`'s schema is int-or-string, but its Rust
    // type only deserialises strings, so an integer the API server accepted would make
    // every list of TransferServers fail to deserialise and stop the operator's watch.
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub size: String,

    /// Access mode of the claim. Defaults to ReadWriteOnce for one replica and
    /// ReadWriteMany for more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<String>,
}

/// Service settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceExposure {
    /// Service type. Defaults to ClusterIP.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<ServiceType>,
}

/// Service type the gateway is exposed through: `ClusterIP` (the default; inside the
/// cluster only), `NodePort` (on every node's address) or `LoadBalancer` (through a cloud
/// load balancer; its address becomes the server's endpoint once assigned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    ClusterIP,
    /// Reachable on every node's address.
    NodePort,
    /// Reachable through a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The Service `spec.type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Observed state of a TransferServer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransferServerStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready, Reconciling, Stalled, ResidencyCompliant and (with FTPS) TlsCertificateValid
    /// conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Enabled protocols, comma-separated, for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<String>,

    /// Address clients connect to, for example
    /// `sftp://cucm-backup.telephony.svc:22` (the first of `endpoints`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// Every protocol's address: `sftp://HOST:PORT`, `ftpes://HOST:PORT` for explicit
    /// FTPS (connect with `ftp://` and require TLS) and `ftps://HOST:PORT` for implicit
    /// FTPS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,

    /// The FTPS certificate in `ftps.tlsSecretRef`, as last read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_certificate: Option<TlsCertificateStatus>,

    /// SHA256 fingerprints of the gateway's SSH host keys, as `ssh-keygen -l` prints
    /// them. Compare them with what a client shows on first connection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_key_fingerprints: Vec<HostKeyFingerprint>,

    /// Number of TransferUsers attached to this server and ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<i32>,

    /// Where an object store keeps this server's files, as the operator resolved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageStatus>,
}

/// The resolved location of an object store.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageStatus {
    /// The provider's region the bucket is in.
    pub region: String,
    /// The jurisdiction of that region (`CN` for mainland China; `HK`, `MO` and `TW` are
    /// their own), when the built-in catalogue knows the region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jurisdiction: Option<String>,
    /// The endpoint the gateway connects to.
    pub endpoint: String,
}

/// What is known of the FTPS server certificate. Never holds key material.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsCertificateStatus {
    /// End of the certificate's validity, RFC 3339.
    pub not_after: String,
    /// SHA-256 fingerprint of the (leaf) certificate, as `AB:CD:...`.
    pub sha256: String,
}

/// One SSH host key's fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostKeyFingerprint {
    /// Key algorithm, for example `ssh-ed25519`.
    pub algorithm: String,
    /// Fingerprint, for example `SHA256:...`.
    pub sha256: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Case C23: an empty status must not carry empty lists, which server-side apply
    /// would record as owned and later conflict on.
    #[test]
    fn empty_statuses_serialise_without_empty_lists() {
        let server = serde_json::to_value(TransferServerStatus::default()).unwrap();
        let user = serde_json::to_value(crate::api::TransferUserStatus::default()).unwrap();
        let policy =
            serde_json::to_value(crate::api::DataResidencyPolicyStatus::default()).unwrap();
        assert_eq!(server, serde_json::json!({}));
        assert_eq!(user, serde_json::json!({}));
        assert_eq!(policy, serde_json::json!({}));
    }
}
