//! `DataResidencyPolicy`: where the data of governed servers may live.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A cluster-wide rule for where the data of TransferServers may live, and how they may
/// run.
///
/// A policy governs the servers in the namespaces its `namespaceSelector` selects (and,
/// with a `serverSelector`, only those servers whose labels match). A governed server
/// complies when its region and its storage region are allowed (listed in
/// `allowedRegions`, inside one of `jurisdictions`, or the destination of an unexpired
/// `crossBorderTransfers` allowance), its volume comes from an allowed StorageClass, its
/// object-store endpoint is allowed, and it offers no plaintext FTP or stdout audit log
/// the policy does not allow.
///
/// When several policies govern one server, the strictest wins: the server must satisfy
/// every one of them, so a region is allowed only if all of them allow it, and a
/// violation blocks roll-out if any violated policy is in `Enforce` mode. The policy's
/// status lists every governed server with its verdict under this policy.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
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
        "rule": "(has(self.allowedRegions) && size(self.allowedRegions) > 0) || (has(self.jurisdictions) && size(self.jurisdictions) > 0)",
        "message": "name the allowed regions: allowedRegions, jurisdictions or both"
    },
    {
        "rule": "!has(self.namespaceSelector.matchExpressions) || self.namespaceSelector.matchExpressions.all(e, e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'])",
        "message": "namespaceSelector.matchExpressions[].operator must be In, NotIn, Exists or DoesNotExist"
    },
    {
        "rule": "!has(self.namespaceSelector.matchExpressions) || self.namespaceSelector.matchExpressions.all(e, (e.operator in ['In', 'NotIn']) == (has(e.values) && size(e.values) > 0))",
        "message": "namespaceSelector.matchExpressions[]: In and NotIn need values, Exists and DoesNotExist take none"
    },
    {
        "rule": "!has(self.serverSelector) || !has(self.serverSelector.matchExpressions) || self.serverSelector.matchExpressions.all(e, e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'])",
        "message": "serverSelector.matchExpressions[].operator must be In, NotIn, Exists or DoesNotExist"
    },
    {
        "rule": "!has(self.serverSelector) || !has(self.serverSelector.matchExpressions) || self.serverSelector.matchExpressions.all(e, (e.operator in ['In', 'NotIn']) == (has(e.values) && size(e.values) > 0))",
        "message": "serverSelector.matchExpressions[]: In and NotIn need values, Exists and DoesNotExist take none"
    }
]))]
pub struct DataResidencyPolicySpec {
    /// Namespaces whose TransferServers this policy governs. An empty selector (`{}`)
    /// selects every namespace.
    pub namespace_selector: LabelSelector,

    /// Within those namespaces, only the TransferServers whose labels match. Absent: every
    /// server in them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_selector: Option<LabelSelector>,

    /// Region ids data may be stored in, for example `cn-shanghai`, `cn-north-1`,
    /// `ap-guangzhou`, `cn-east-3`. Both a server's `region` (its nodes' region label) and
    /// the region its object store resolves to must be allowed. Together with
    /// `jurisdictions`, a region is allowed if either allows it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 63)))]
    pub allowed_regions: Vec<String>,

    /// Jurisdictions data may be stored in: every region the built-in catalogue places
    /// there is allowed. `CN` is mainland China only: Hong Kong (`HK`), Macau (`MO`) and
    /// Taiwan (`TW`) are jurisdictions of their own. The catalogue covers the regions of
    /// AWS, Alibaba Cloud, Tencent Cloud, Huawei Cloud, Azure and Google Cloud (the ids
    /// their Kubernetes nodes carry as region labels); an id it does not know, or one
    /// that means different places at different providers (`ap-southeast-1` is Singapore
    /// at AWS and Hong Kong at Huawei Cloud), is not in any jurisdiction and must be
    /// listed in `allowedRegions` to be allowed. An object store's region is placed by its
    /// own provider's catalogue.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jurisdictions: Vec<Jurisdiction>,

    /// `Enforce`: a non-compliant server is not rolled out, and a running gateway that
    /// falls out of compliance stops accepting writes. `Audit`: it is rolled out and
    /// reported. Defaults to `Enforce`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,

    /// Node label whose value is a node's region. Defaults to
    /// `topology.kubernetes.io/region`. Gateway pods get a required node affinity on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 316))]
    pub region_label: Option<String>,

    /// StorageClasses governed servers may claim volumes from. Absent or empty: any
    /// StorageClass whose volumes stay inside the allowed regions (its
    /// `allowedTopologies` name only allowed regions, or it binds with
    /// `WaitForFirstConsumer`, so the volume follows the region-pinned pod).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 253)))]
    pub allowed_storage_classes: Vec<String>,

    /// Object-store endpoint hosts governed servers may use, exactly
    /// (`oss-cn-shanghai-internal.aliyuncs.com`) or as a suffix after `*.`
    /// (`*.aliyuncs.com`). The host is the endpoint the server gives, or the provider's
    /// public regional endpoint when it gives none. Absent or empty: any endpoint whose
    /// region is allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 253)))]
    pub allowed_endpoints: Vec<String>,

    /// Whether governed servers may offer FTP without TLS (`ftps.allowPlaintext`), which
    /// sends passwords and files in the clear. Defaults to false: such a server violates
    /// the policy (not rolled out under `Enforce`, reported under `Audit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_plaintext_ftp: Option<bool>,

    /// Whether governed servers may also write their audit log to the gateway's standard
    /// output (`auditLog.stdout`), from where log collectors may carry it anywhere.
    /// Defaults to false. The audit log is always kept in the server's own storage, which
    /// this policy pins to the allowed regions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_audit_log_stdout: Option<bool>,

    /// Cross-border transfers this policy permits: each lets governed servers keep data in
    /// one region outside the allowed ones, under a security assessment, until it
    /// expires. None by default: data leaves the allowed regions only by an allowance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub cross_border_transfers: Vec<CrossBorderTransfer>,
}

/// A Kubernetes quantity without a minus sign: a volume limit is never negative.
const VOLUME_PATTERN: &str = r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

/// A jurisdiction of the built-in region catalogue (`sluice regions` prints it): ISO
/// 3166 country codes, and `EU` for the European Union.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum Jurisdiction {
    /// Mainland China (not Hong Kong, Macau or Taiwan).
    #[serde(rename = "CN")]
    Cn,
    /// Hong Kong.
    #[serde(rename = "HK")]
    Hk,
    /// Macau.
    #[serde(rename = "MO")]
    Mo,
    /// Taiwan.
    #[serde(rename = "TW")]
    Tw,
    /// The European Union.
    #[serde(rename = "EU")]
    Eu,
    /// The United Kingdom.
    #[serde(rename = "GB")]
    Gb,
    /// Switzerland.
    #[serde(rename = "CH")]
    Ch,
    /// Türkiye.
    #[serde(rename = "TR")]
    Tr,
    /// The United States.
    #[serde(rename = "US")]
    Us,
    /// Canada.
    #[serde(rename = "CA")]
    Ca,
    /// Mexico.
    #[serde(rename = "MX")]
    Mx,
    /// Brazil.
    #[serde(rename = "BR")]
    Br,
    /// Chile.
    #[serde(rename = "CL")]
    Cl,
    /// Singapore.
    #[serde(rename = "SG")]
    Sg,
    /// Japan.
    #[serde(rename = "JP")]
    Jp,
    /// South Korea.
    #[serde(rename = "KR")]
    Kr,
    /// Thailand.
    #[serde(rename = "TH")]
    Th,
    /// Indonesia.
    #[serde(rename = "ID")]
    Id,
    /// Malaysia.
    #[serde(rename = "MY")]
    My,
    /// The Philippines.
    #[serde(rename = "PH")]
    Ph,
    /// India.
    #[serde(rename = "IN")]
    In,
    /// Australia.
    #[serde(rename = "AU")]
    Au,
    /// The United Arab Emirates.
    #[serde(rename = "AE")]
    Ae,
    /// Saudi Arabia.
    #[serde(rename = "SA")]
    Sa,
    /// Bahrain.
    #[serde(rename = "BH")]
    Bh,
    /// Israel.
    #[serde(rename = "IL")]
    Il,
    /// South Africa.
    #[serde(rename = "ZA")]
    Za,
}

impl Jurisdiction {
    /// Every jurisdiction, in declaration order.
    pub const ALL: [Jurisdiction; 27] = [
        Self::Cn,
        Self::Hk,
        Self::Mo,
        Self::Tw,
        Self::Eu,
        Self::Gb,
        Self::Ch,
        Self::Tr,
        Self::Us,
        Self::Ca,
        Self::Mx,
        Self::Br,
        Self::Cl,
        Self::Sg,
        Self::Jp,
        Self::Kr,
        Self::Th,
        Self::Id,
        Self::My,
        Self::Ph,
        Self::In,
        Self::Au,
        Self::Ae,
        Self::Sa,
        Self::Bh,
        Self::Il,
        Self::Za,
    ];

    /// The code as written in YAML (`CN`, `EU`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cn => "CN",
            Self::Hk => "HK",
            Self::Mo => "MO",
            Self::Tw => "TW",
            Self::Eu => "EU",
            Self::Gb => "GB",
            Self::Ch => "CH",
            Self::Tr => "TR",
            Self::Us => "US",
            Self::Ca => "CA",
            Self::Mx => "MX",
            Self::Br => "BR",
            Self::Cl => "CL",
            Self::Sg => "SG",
            Self::Jp => "JP",
            Self::Kr => "KR",
            Self::Th => "TH",
            Self::Id => "ID",
            Self::My => "MY",
            Self::Ph => "PH",
            Self::In => "IN",
            Self::Au => "AU",
            Self::Ae => "AE",
            Self::Sa => "SA",
            Self::Bh => "BH",
            Self::Il => "IL",
            Self::Za => "ZA",
        }
    }

    /// What the code stands for.
    pub fn description(self) -> &'static str {
        match self {
            Self::Cn => "Mainland China (not Hong Kong, Macau or Taiwan)",
            Self::Hk => "Hong Kong",
            Self::Mo => "Macau",
            Self::Tw => "Taiwan",
            Self::Eu => "The European Union",
            Self::Gb => "The United Kingdom",
            Self::Ch => "Switzerland",
            Self::Tr => "Türkiye",
            Self::Us => "The United States",
            Self::Ca => "Canada",
            Self::Mx => "Mexico",
            Self::Br => "Brazil",
            Self::Cl => "Chile",
            Self::Sg => "Singapore",
            Self::Jp => "Japan",
            Self::Kr => "South Korea",
            Self::Th => "Thailand",
            Self::Id => "Indonesia",
            Self::My => "Malaysia",
            Self::Ph => "The Philippines",
            Self::In => "India",
            Self::Au => "Australia",
            Self::Ae => "The United Arab Emirates",
            Self::Sa => "Saudi Arabia",
            Self::Bh => "Bahrain",
            Self::Il => "Israel",
            Self::Za => "South Africa",
        }
    }

    /// The jurisdiction with code `code`.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|j| j.as_str() == code)
    }
}

impl std::fmt::Display for Jurisdiction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Permission to keep data in one region outside the allowed ones, for example under a
/// security assessment or standard contract filed with the Cyberspace Administration of
/// China (PIPL Art. 38-40) or a GDPR transfer mechanism. Until `expires`, a governed
/// server may use `destinationRegion` as its region or storage region; afterwards it
/// violates the policy again (rule `CrossBorderTransfer`), and under `Enforce` its gateway
/// stops accepting writes. The limits record the volume the assessment covers; thresholds
/// such as 1,000 GB of data or 500,000 individuals are typical values (check the rules
/// that apply to you).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CrossBorderTransfer {
    /// The region outside the allowed ones that data may go to, for example
    /// `eu-central-1`.
    #[schemars(length(min = 1, max = 63))]
    pub destination_region: String,

    /// The reference of the assessment, filing or contract that permits the transfer, as
    /// the regulator or the legal team knows it. Shown on the status and in the audit log.
    #[schemars(length(min = 1, max = 253))]
    pub assessment_reference: String,

    /// When the permission ends (RFC 3339, for example `2027-06-30T00:00:00Z`).
    pub expires: Time,

    /// Most data each governed server's gateways may accept under this allowance, as a
    /// quantity (`1000G` is 1,000 GB): the bytes of completed uploads, counted per server
    /// in its audit log's usage files. Once reached, that server's uploads are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = VOLUME_PATTERN))]
    pub max_volume: Option<String>,

    /// Most individuals whose personal information the assessment covers. A file gateway
    /// cannot count individuals, so this is recorded with the allowance (on the status and
    /// in the audit log) for the assessor, not enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_individuals: Option<i64>,
}

/// How strictly a policy is applied. `Enforce` (the default): a server that does not
/// comply is not rolled out, a running gateway that falls out of compliance stops
/// accepting writes (its files stay, and can still be read), and the server's status and a
/// Warning Event say why. `Audit`: it is rolled out and reported as non-compliant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Enforcement {
    /// Non-compliant servers are not rolled out; running ones stop accepting writes.
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

/// One governed server and its verdict under this policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GovernedServer {
    /// Namespace of the TransferServer.
    pub namespace: String,
    /// Name of the TransferServer.
    pub name: String,
    /// Region the server declares.
    pub region: String,
    /// Region its object store resolves to, when it keeps files in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_region: Option<String>,
    /// Whether the server complies with this policy.
    pub compliant: bool,
    /// The first rule of this policy the server breaks: `Region`, `StorageRegion`,
    /// `StorageClass`, `Endpoint`, `PlaintextFtp`, `AuditLogStdout`,
    /// `CrossBorderTransfer` or `Unevaluable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Why the server does not comply, naming the rule and the values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The assessment reference of the cross-border allowance the server relies on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_border_transfer: Option<String>,
    /// Other policies that govern the server too. It must satisfy all of them: the
    /// strictest wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_governed_by: Vec<String>,
}
