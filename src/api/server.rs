//! `TransferServer`: one gateway, its protocols, region and storage.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A file-transfer gateway pinned to one region.
///
/// The operator runs it as a Deployment of `sluice gateway` pods scheduled only onto
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
    doc = "A file-transfer gateway (SFTP) pinned to one region, with its storage.",
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
    /// has this value, and the governing DataResidencyPolicy must allow it.
    #[schemars(length(min = 1, max = 63))]
    pub region: String,

    /// Protocols the gateway serves. At least one must be enabled.
    pub protocols: Protocols,

    /// Where the gateway stores files.
    pub storage: Storage,

    /// Number of gateway pods. Defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 32))]
    pub replicas: Option<i32>,

    /// How the gateway is exposed. Defaults to a ClusterIP Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceExposure>,
}

/// Protocols served by the gateway.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.sftp)",
    "message": "at least one protocol must be enabled (protocols.sftp)"
}]))]
pub struct Protocols {
    /// SFTP (SSH File Transfer Protocol). Present means enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sftp: Option<SftpProtocol>,
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

/// A Kubernetes resource quantity, as the API server parses it.
const QUANTITY_PATTERN: &str = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

/// Where files are stored. Exactly one backend must be given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.volume)",
    "message": "a storage backend is required (storage.volume)"
}]))]
pub struct Storage {
    /// A PersistentVolumeClaim created and owned by the operator, mounted into every
    /// gateway pod. With more than one replica the StorageClass must support
    /// ReadWriteMany.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeStorage>,
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

    /// Ready, Reconciling, Stalled and ResidencyCompliant conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Enabled protocols, comma-separated, for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<String>,

    /// Address clients connect to, for example
    /// `sftp://cucm-backup.telephony.svc:22`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// SHA256 fingerprints of the gateway's SSH host keys, as `ssh-keygen -l` prints
    /// them. Compare them with what a client shows on first connection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_key_fingerprints: Vec<HostKeyFingerprint>,

    /// Number of TransferUsers attached to this server and ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<i32>,
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
