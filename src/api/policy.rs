//! `DataResidencyPolicy`: where the data of governed servers may live.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A cluster-wide rule for the regions that TransferServers in matching namespaces may
/// use. When several policies govern one server, the server must satisfy every one of
/// them (the strictest wins): a region is allowed only if all of them allow it, and a
/// violation is enforced if any violated policy is in `Enforce` mode.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "DataResidencyPolicy",
    status = "DataResidencyPolicyStatus",
    shortname = "drp",
    category = "sluice",
    doc = "Cluster-wide rule for the regions in which TransferServers may store data.",
    printcolumn = r#"{"name":"Enforcement","type":"string","jsonPath":".spec.enforcement"}"#,
    printcolumn = r#"{"name":"Governed","type":"integer","jsonPath":".status.governedServers"}"#,
    printcolumn = r#"{"name":"Compliant","type":"integer","jsonPath":".status.compliantServers"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.namespaceSelector.matchExpressions) || self.namespaceSelector.matchExpressions.all(e, e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'])",
        "message": "namespaceSelector.matchExpressions[].operator must be In, NotIn, Exists or DoesNotExist"
    },
    {
        "rule": "!has(self.namespaceSelector.matchExpressions) || self.namespaceSelector.matchExpressions.all(e, (e.operator in ['In', 'NotIn']) == (has(e.values) && size(e.values) > 0))",
        "message": "namespaceSelector.matchExpressions[]: In and NotIn need values, Exists and DoesNotExist take none"
    }
]))]
pub struct DataResidencyPolicySpec {
    /// Namespaces whose TransferServers this policy governs. An empty selector (`{}`)
    /// selects every namespace.
    pub namespace_selector: LabelSelector,

    /// Regions data may be stored in, as region ids such as `cn-shanghai`.
    #[schemars(length(min = 1))]
    pub allowed_regions: Vec<String>,

    /// `Enforce`: a non-compliant server is not rolled out. `Audit`: it is rolled out and
    /// reported. Defaults to `Enforce`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,

    /// Node label whose value is a node's region. Defaults to
    /// `topology.kubernetes.io/region`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_label: Option<String>,

    /// Whether governed servers may offer FTP without TLS (`ftps.allowPlaintext`), which
    /// sends passwords and files in the clear. Defaults to false: such a server violates
    /// the policy (not rolled out under `Enforce`, reported under `Audit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_plaintext_ftp: Option<bool>,
}

/// How strictly a policy is applied. `Enforce` (the default): a server that does not
/// comply is not rolled out, and its status and a Warning Event say why. `Audit`: it is
/// rolled out and reported as non-compliant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Enforcement {
    /// Non-compliant servers are not rolled out.
    #[default]
    Enforce,
    /// Non-compliant servers run and are reported.
    Audit,
}

/// Observed state of a DataResidencyPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataResidencyPolicyStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Number of TransferServers this policy governs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub governed_servers: Option<i32>,

    /// Number of governed TransferServers that comply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compliant_servers: Option<i32>,

    /// Governed servers and their verdicts, sorted by namespace and name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<GovernedServer>,
}

/// One governed server and its verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GovernedServer {
    /// Namespace of the TransferServer.
    pub namespace: String,
    /// Name of the TransferServer.
    pub name: String,
    /// Region the server declares.
    pub region: String,
    /// Whether the server complies with this policy.
    pub compliant: bool,
}
