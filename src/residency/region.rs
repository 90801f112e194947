//! Region resolution for object storage: from a provider, an endpoint and a declared
//! region to the region the data lives in and the jurisdiction that region belongs to.
//!
//! Pure: no I/O. The operator, the offline checker and the gateway's start-up check are
//! meant to call [`resolve_region`] alike, so they agree on where a bucket is.
//!
//! Rules:
//! - A region named in the endpoint (`s3.cn-north-1.amazonaws.com.cn`,
//!   `oss-cn-hangzhou-internal.aliyuncs.com`, `bucket-1250000000.cos.ap-guangzhou.
//!   myqcloud.com`, `obs.cn-east-3.myhuaweicloud.com`) is what counts; a declared region
//!   that contradicts it is an error, never silently preferred.
//! - Endpoints that do not name a region (Azure Blob, Google Cloud Storage, custom
//!   domains, S3-compatible stores) take the declared region, which is then required.
//! - Accelerated endpoints (S3 Transfer Acceleration, OSS and COS global acceleration)
//!   carry data through edge locations worldwide, so they cannot be pinned and are
//!   refused.
//! - Jurisdictions come from a catalogue per provider, because region ids are not unique
//!   across providers (`ap-southeast-1` is Singapore at AWS and Alibaba Cloud, Hong Kong
//!   at Huawei Cloud). Hong Kong, Macau and Taiwan are jurisdictions of their own, never
//!   mainland China (`CN`). A region the catalogue does not know resolves with no
//!   jurisdiction, which a policy naming a jurisdiction must treat as not allowed. An
//!   S3-compatible store's declared region is placed like a node region
//!   ([`node_jurisdiction`]): only where every provider using the id agrees.

use std::fmt;

use crate::api::Jurisdiction;

pub use crate::api::ObjectStoreProvider as Provider;

/// Where a region was learnt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionSource {
    /// The endpoint names it.
    Endpoint,
    /// Only the declaration gives it.
    Declared,
}

/// A resolved storage region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedRegion {
    /// The provider's region id, for example `cn-hangzhou`.
    pub region: String,
    /// The jurisdiction the region lies in (`CN` is mainland China; `HK`, `MO`, `TW`,
    /// `EU`, `GB`, `US`, ... as ISO 3166 codes, `EU` for the union), if the catalogue
    /// knows the region.
    pub jurisdiction: Option<&'static str>,
    /// Whether the endpoint or only the declaration gave the region.
    pub source: RegionSource,
}

/// Why a storage region cannot be resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionError {
    /// The declared region is not the one the endpoint names.
    Contradiction {
        /// The region declared.
        declared: String,
        /// The region the endpoint names.
        endpoint: String,
    },
    /// Neither the endpoint nor a declaration gives a region.
    RegionRequired,
    /// The endpoint routes data through edge locations anywhere in the world.
    Accelerated(String),
    /// The endpoint routes data to several regions (an S3 Multi-Region Access Point).
    MultiRegion(String),
    /// The endpoint is not `http(s)://HOST[:PORT]`.
    InvalidEndpoint(String),
    /// The endpoint is in the provider's own domain, in a form whose region is not known.
    UnknownEndpoint(String),
}

impl fmt::Display for RegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Contradiction { declared, endpoint } => write!(
                f,
                "the declared region {declared} contradicts the endpoint, which is in {endpoint}"
            ),
            Self::RegionRequired => {
                f.write_str("the endpoint does not name a region, so the region must be declared")
            }
            Self::Accelerated(host) => write!(
                f,
                "{host} is an accelerated endpoint: data passes through edge locations \
                 worldwide, so it cannot be pinned to a region; use the regional endpoint"
            ),
            Self::MultiRegion(host) => write!(
                f,
                "{host} is a multi-region endpoint: data may be stored in any of several \
                 regions, so it cannot be pinned to one; use the regional endpoint"
            ),
            Self::InvalidEndpoint(endpoint) => write!(
                f,
                "the endpoint {endpoint:?} must be http(s)://HOST[:PORT] with a DNS name or IP \
                 address and nothing else (no user, path, query or backslash)"
            ),
            Self::UnknownEndpoint(host) => write!(
                f,
                "{host} is in the provider's own domain but not in a form whose region Sluice \
                 can read, so where it stores data is unknown; use the provider's regional \
                 endpoint"
            ),
        }
    }
}

impl std::error::Error for RegionError {}

/// Resolves where `provider`'s bucket at `endpoint` (a host name or URL; `None` for the
/// provider's default) stores data, given the `declared` region.
pub fn resolve_region(
    provider: Provider,
    endpoint: Option<&str>,
    declared: Option<&str>,
) -> Result<ResolvedRegion, RegionError> {
    let host = endpoint.map(endpoint_host).transpose()?;
    if let Some(host) = &host {
        if is_accelerated(provider, host) {
            return Err(RegionError::Accelerated(host.clone()));
        }
        if is_multi_region(provider, host) {
            return Err(RegionError::MultiRegion(host.clone()));
        }
    }
    let named = host
        .as_deref()
        .and_then(|h| region_in_endpoint(provider, h));
    if let Some(host) = &host
        && named.is_none()
        && in_provider_domain(provider, host)
    {
        return Err(RegionError::UnknownEndpoint(host.clone()));
    }
    let declared = declared.map(str::trim).filter(|d| !d.is_empty());
    let (region, source) = match (named, declared) {
        (Some(named), Some(declared)) if named != declared => {
            return Err(RegionError::Contradiction {
                declared: declared.to_string(),
                endpoint: named,
            });
        }
        (Some(named), _) => (named, RegionSource::Endpoint),
        (None, Some(declared)) => (declared.to_string(), RegionSource::Declared),
        (None, None) => return Err(RegionError::RegionRequired),
    };
    if let Some(host) = &host
        && let Some(error) = host_contradicts(provider, host, &region)
    {
        return Err(error);
    }
    Ok(ResolvedRegion {
        jurisdiction: jurisdiction(provider, &region),
        region,
        source,
    })
}

/// The lower-case host of an endpoint written `[http[s]://]HOST[:PORT][/]`, where HOST is
/// a DNS name (letters, digits, dots, dashes) or an IP address (IPv6 in brackets), or
/// why it is not one.
///
/// Nothing else is accepted (no user, path, query, fragment, percent-encoding or
/// backslash): HTTP clients disagree with naive parsers about such URLs (WHATWG URL
/// parsing, which reqwest follows, reads `https://a\.b.example` as host `a`), and the
/// host judged here must be the host the gateway connects to.
pub fn endpoint_host(endpoint: &str) -> Result<String, RegionError> {
    let invalid = || RegionError::InvalidEndpoint(endpoint.to_string());
    let trimmed = endpoint.trim();
    let rest = match trimmed.split_once("://") {
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("http") =>
        {
            rest
        }
        Some(_) => return Err(invalid()),
        None => trimmed,
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => {
            let (address, after) = bracketed.split_once(']').ok_or_else(invalid)?;
            let ipv6 = address
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| invalid())?;
            (ipv6.to_string(), after.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), Some(port)),
            None => (authority.to_string(), None),
        },
    };
    if let Some(port) = port
        && !port.parse::<u16>().is_ok_and(|p| p > 0)
    {
        return Err(invalid());
    }
    let name = host.trim_end_matches('.');
    let is_name = !name.is_empty()
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !authority.starts_with('[') && !is_name {
        return Err(invalid());
    }
    Ok(name.to_ascii_lowercase())
}

/// The lower-case host of a URL the code itself made (a default endpoint, possibly with a
/// placeholder for the region), without [`endpoint_host`]'s checks: never for endpoints
/// from a spec.
pub(crate) fn host_of(endpoint: &str) -> String {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let host = rest.split(['/', ':']).next().unwrap_or_default();
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// The domains and labels by which the providers' endpoints are read. The admission
/// policy's CEL (`residency::admission`) is generated from these, so the API server reads
/// an endpoint as [`resolve_region`] does.
pub mod endpoints {
    use super::Provider;

    /// Amazon S3 outside China.
    pub const AWS: &str = "amazonaws.com";
    /// Amazon S3 in the AWS China partition.
    pub const AWS_CHINA: &str = "amazonaws.com.cn";
    /// The legacy global S3 endpoint (also with a bucket label in front of it)...
    pub const S3_GLOBAL_HOST: &str = "s3.amazonaws.com";
    /// ...which serves this region.
    pub const S3_GLOBAL_REGION: &str = "us-east-1";
    /// The legacy endpoint `s3-external-1.amazonaws.com`...
    pub const S3_EXTERNAL_LABEL: &str = "s3-external-1";
    /// ...which also serves this region.
    pub const S3_EXTERNAL_REGION: &str = "us-east-1";
    /// The label of S3 Transfer Acceleration endpoints.
    pub const S3_ACCELERATE: &str = "s3-accelerate";
    /// Labels of S3 Multi-Region Access Points (`ALIAS.mrap.accesspoint.s3-global.
    /// amazonaws.com`), which spread data over several regions.
    pub const S3_MULTI_REGION: [&str; 2] = ["s3-global", "mrap"];
    /// Alibaba Cloud.
    pub const ALIBABA: &str = "aliyuncs.com";
    /// Labels of OSS global acceleration endpoints.
    pub const OSS_ACCELERATE: [&str; 2] = ["oss-accelerate", "oss-accelerate-overseas"];
    /// What the region label of an OSS endpoint starts with...
    pub const OSS_PREFIX: &str = "oss-";
    /// ...and may end with (VPC endpoints).
    pub const OSS_INTERNAL: &str = "-internal";
    /// The service label after the region label of OSS dual-stack endpoints
    /// (`[bucket.]REGION.oss.aliyuncs.com`).
    pub const OSS_DUAL_STACK: &str = "oss";
    /// Tencent Cloud's two domains.
    pub const TENCENT: [&str; 2] = ["myqcloud.com", "tencentcos.cn"];
    /// The service label in front of a COS region label.
    pub const COS_SERVICES: [&str; 2] = ["cos", "cos-internal"];
    /// COS global acceleration.
    pub const COS_ACCELERATE: &str = "accelerate.myqcloud.com";
    /// Huawei Cloud's two domains (`.eu` for its European regions).
    pub const HUAWEI: [&str; 2] = ["myhuaweicloud.com", "myhuaweicloud.eu"];
    /// The service label in front of an OBS region label.
    pub const OBS_SERVICE: &str = "obs";

    /// Partitions that serve only their own regions: the provider, the partition's
    /// domain, what its region ids start with, and its name.
    pub const PARTITIONS: [(Provider, &str, &str, &str); 2] = [
        (Provider::S3, AWS_CHINA, "cn-", "AWS China"),
        (
            Provider::AzureBlob,
            "chinacloudapi.cn",
            "china",
            "Azure China",
        ),
    ];

    /// The providers' global clouds, which serve no region of the partitions above: the
    /// provider, the domain, the region prefix they never serve, and the name.
    pub const GLOBAL_CLOUDS: [(Provider, &str, &str, &str); 2] = [
        (Provider::S3, AWS, "cn-", "AWS global"),
        (
            Provider::AzureBlob,
            "core.windows.net",
            "china",
            "Azure global",
        ),
    ];

    /// The domains in which each provider's endpoints have a form Sluice reads: an
    /// endpoint there whose region cannot be read is refused rather than trusted to be
    /// where the declaration says.
    pub fn provider_domains(provider: Provider) -> &'static [&'static str] {
        match provider {
            Provider::S3 => &[AWS, AWS_CHINA],
            Provider::Oss => &[ALIBABA],
            Provider::Cos => &TENCENT,
            Provider::Obs => &HUAWEI,
            Provider::AzureBlob | Provider::Gcs | Provider::S3Compatible => &[],
        }
    }

    /// How a contradicting partition is named in [`super::RegionError::Contradiction`].
    pub fn partition_text(name: &str) -> String {
        format!("the {name} partition")
    }
}

fn is_accelerated(provider: Provider, host: &str) -> bool {
    use endpoints::*;
    let labels: Vec<&str> = host.split('.').collect();
    match provider {
        Provider::S3 => in_domain(host, AWS) && labels.contains(&S3_ACCELERATE),
        Provider::Oss => {
            in_domain(host, ALIBABA) && OSS_ACCELERATE.iter().any(|l| labels.contains(l))
        }
        Provider::Cos => in_domain(host, COS_ACCELERATE),
        _ => false,
    }
}

/// Whether the endpoint spreads data over several regions.
fn is_multi_region(provider: Provider, host: &str) -> bool {
    use endpoints::*;
    provider == Provider::S3
        && in_domain(host, AWS)
        && host.split('.').any(|l| S3_MULTI_REGION.contains(&l))
}

/// Whether `host` is in one of the domains where `provider`'s endpoints name regions.
fn in_provider_domain(provider: Provider, host: &str) -> bool {
    endpoints::provider_domains(provider)
        .iter()
        .any(|d| in_domain(host, d))
}

/// Whether `host` is a name under `domain`.
fn in_domain(host: &str, domain: &str) -> bool {
    host.strip_suffix(domain)
        .is_some_and(|rest| rest.ends_with('.'))
}

/// The region a provider's endpoint names, if it names one.
fn region_in_endpoint(provider: Provider, host: &str) -> Option<String> {
    use endpoints::*;
    let labels: Vec<&str> = host.split('.').collect();
    match provider {
        Provider::S3 => s3_region(host, &labels),
        // The region is always the label just before the provider's domain; labels
        // further left are the bucket's, which may look like anything (`oss-cn-shanghai.
        // oss-cn-hongkong.aliyuncs.com` is a bucket in Hong Kong).
        Provider::Oss => {
            // [bucket.]oss-REGION[-internal].aliyuncs.com, or dual-stack
            // [bucket.]REGION.oss.aliyuncs.com
            let label = before_domain(host, ALIBABA, 0)?;
            if label == OSS_DUAL_STACK {
                return before_domain(host, ALIBABA, 1).map(str::to_string);
            }
            let region = label.strip_prefix(OSS_PREFIX)?;
            let region = region.strip_suffix(OSS_INTERNAL).unwrap_or(region);
            Some(region.to_string())
        }
        Provider::Cos => {
            // [bucket-appid.]cos[-internal].REGION.(myqcloud.com|tencentcos.cn)
            let domain = TENCENT.into_iter().find(|d| in_domain(host, d))?;
            let service = before_domain(host, domain, 1)?;
            COS_SERVICES
                .contains(&service)
                .then(|| before_domain(host, domain, 0).map(str::to_string))?
        }
        Provider::Obs => {
            // [bucket.]obs.REGION.(myhuaweicloud.com|myhuaweicloud.eu)
            let domain = HUAWEI.into_iter().find(|d| in_domain(host, d))?;
            (before_domain(host, domain, 1)? == OBS_SERVICE)
                .then(|| before_domain(host, domain, 0).map(str::to_string))?
        }
        Provider::AzureBlob | Provider::Gcs | Provider::S3Compatible => None,
    }
}

/// The label `skip` places left of the label just before `.domain` in `host`, if `host`
/// ends in `.domain`.
fn before_domain<'a>(host: &'a str, domain: &str, skip: usize) -> Option<&'a str> {
    let rest = host.strip_suffix(domain)?.strip_suffix('.')?;
    rest.rsplit('.').nth(skip).filter(|l| !l.is_empty())
}

fn s3_region(host: &str, labels: &[&str]) -> Option<String> {
    use endpoints::*;
    if !in_domain(host, AWS) && !in_domain(host, AWS_CHINA) {
        return None;
    }
    if host == S3_GLOBAL_HOST || in_domain(host, S3_GLOBAL_HOST) {
        return Some(S3_GLOBAL_REGION.into());
    }
    if labels.contains(&S3_EXTERNAL_LABEL) && in_domain(host, AWS) {
        return Some(S3_EXTERNAL_REGION.into());
    }
    // s3.REGION..., s3-REGION..., s3.dualstack.REGION..., s3-fips.REGION...,
    // bucket.vpce-ID.s3.REGION.vpce.amazonaws.com
    // The last `s3` label: a bucket name left of it may itself start with `s3-`.
    let at = labels
        .iter()
        .rposition(|l| *l == "s3" || l.starts_with("s3-"))?;
    let label = labels[at];
    if let Some(region) = label.strip_prefix("s3-")
        && looks_like_aws_region(region)
    {
        return Some(region.to_string());
    }
    labels[at + 1..]
        .iter()
        .find(|l| looks_like_aws_region(l))
        .map(|r| r.to_string())
}

/// `cn-north-1`, `eu-central-2`, `us-gov-west-1`: letters, dashes, a final number.
fn looks_like_aws_region(label: &str) -> bool {
    let parts: Vec<&str> = label.split('-').collect();
    parts.len() >= 3
        && parts
            .last()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
}

/// An endpoint family that contradicts the region: the AWS China partition serves only
/// the China regions, and Azure China only its own; the global clouds serve none of
/// them.
fn host_contradicts(provider: Provider, host: &str, region: &str) -> Option<RegionError> {
    let contradiction = |name| RegionError::Contradiction {
        declared: region.to_string(),
        endpoint: endpoints::partition_text(name),
    };
    if let Some((_, _, prefix, name)) = endpoints::PARTITIONS
        .into_iter()
        .find(|(p, domain, _, _)| *p == provider && in_domain(host, domain))
    {
        return (!region.starts_with(prefix)).then(|| contradiction(name));
    }
    let (_, _, prefix, name) = endpoints::GLOBAL_CLOUDS
        .into_iter()
        .find(|(p, domain, _, _)| *p == provider && in_domain(host, domain))?;
    region.starts_with(prefix).then(|| contradiction(name))
}

/// The jurisdiction of `region` at `provider`, from the catalogue.
pub fn jurisdiction(provider: Provider, region: &str) -> Option<&'static str> {
    // An S3-compatible store's region is only declared, as trusted as the server's own
    // region, and placed the same way: where every provider using that id agrees.
    let Some((_, catalogue)) = CATALOGUES.iter().find(|(p, _)| *p == provider) else {
        return node_jurisdiction(region).map(Jurisdiction::as_str);
    };
    catalogue
        .iter()
        .find(|(id, _)| *id == region)
        .map(|(_, jurisdiction)| *jurisdiction)
}

/// The jurisdiction of a node region id, whatever the provider: the one every provider
/// that uses the id places it in. An id that providers place in different jurisdictions
/// (`ap-southeast-1`: Singapore at AWS and Alibaba Cloud, Hong Kong at Huawei Cloud) or
/// that no catalogue knows is in none, so a policy allows it only by listing it.
pub fn node_jurisdiction(region: &str) -> Option<Jurisdiction> {
    let mut found = CATALOGUES
        .iter()
        .flat_map(|(_, catalogue)| catalogue.iter())
        .filter(|(id, _)| *id == region)
        .map(|(_, code)| *code);
    let first = found.next()?;
    if found.all(|code| code == first) {
        Jurisdiction::from_code(first)
    } else {
        None
    }
}

/// Every provider's catalogue of region ids and the jurisdictions they lie in.
pub const CATALOGUES: [(Provider, &[(&str, &str)]); 6] = [
    (Provider::S3, AWS),
    (Provider::Oss, ALIBABA),
    (Provider::Cos, TENCENT),
    (Provider::Obs, HUAWEI),
    (Provider::AzureBlob, AZURE),
    (Provider::Gcs, GOOGLE),
];

/// Amazon Web Services (node labels of EKS, S3 regions).
const AWS: &[(&str, &str)] = &[
    ("cn-north-1", "CN"),
    ("cn-northwest-1", "CN"),
    ("ap-east-1", "HK"),
    ("ap-east-2", "TW"),
    ("ap-northeast-1", "JP"),
    ("ap-northeast-2", "KR"),
    ("ap-northeast-3", "JP"),
    ("ap-south-1", "IN"),
    ("ap-south-2", "IN"),
    ("ap-southeast-1", "SG"),
    ("ap-southeast-2", "AU"),
    ("ap-southeast-3", "ID"),
    ("ap-southeast-4", "AU"),
    ("ap-southeast-5", "MY"),
    ("ap-southeast-7", "TH"),
    ("af-south-1", "ZA"),
    ("ca-central-1", "CA"),
    ("ca-west-1", "CA"),
    ("eu-central-1", "EU"),
    ("eu-central-2", "CH"),
    ("eu-north-1", "EU"),
    ("eu-south-1", "EU"),
    ("eu-south-2", "EU"),
    ("eu-west-1", "EU"),
    ("eu-west-2", "GB"),
    ("eu-west-3", "EU"),
    ("il-central-1", "IL"),
    ("me-central-1", "AE"),
    ("me-south-1", "BH"),
    ("mx-central-1", "MX"),
    ("sa-east-1", "BR"),
    ("us-east-1", "US"),
    ("us-east-2", "US"),
    ("us-west-1", "US"),
    ("us-west-2", "US"),
    ("us-gov-east-1", "US"),
    ("us-gov-west-1", "US"),
];

/// Alibaba Cloud (ACK node labels, OSS regions).
const ALIBABA: &[(&str, &str)] = &[
    ("cn-hangzhou", "CN"),
    ("cn-shanghai", "CN"),
    ("cn-nanjing", "CN"),
    ("cn-fuzhou", "CN"),
    ("cn-wuhan-lr", "CN"),
    ("cn-qingdao", "CN"),
    ("cn-beijing", "CN"),
    ("cn-zhangjiakou", "CN"),
    ("cn-huhehaote", "CN"),
    ("cn-wulanchabu", "CN"),
    ("cn-shenzhen", "CN"),
    ("cn-heyuan", "CN"),
    ("cn-guangzhou", "CN"),
    ("cn-chengdu", "CN"),
    ("cn-hongkong", "HK"),
    ("ap-northeast-1", "JP"),
    ("ap-northeast-2", "KR"),
    ("ap-southeast-1", "SG"),
    ("ap-southeast-3", "MY"),
    ("ap-southeast-5", "ID"),
    ("ap-southeast-6", "PH"),
    ("ap-southeast-7", "TH"),
    ("eu-central-1", "EU"),
    ("eu-west-1", "GB"),
    ("me-east-1", "AE"),
    ("me-central-1", "SA"),
    ("us-east-1", "US"),
    ("us-west-1", "US"),
];

/// Tencent Cloud (COS regions).
const TENCENT: &[(&str, &str)] = &[
    ("ap-beijing", "CN"),
    ("ap-nanjing", "CN"),
    ("ap-shanghai", "CN"),
    ("ap-guangzhou", "CN"),
    ("ap-chengdu", "CN"),
    ("ap-chongqing", "CN"),
    ("ap-shenzhen-fsi", "CN"),
    ("ap-shanghai-fsi", "CN"),
    ("ap-beijing-fsi", "CN"),
    ("ap-hongkong", "HK"),
    ("ap-taipei", "TW"),
    ("ap-singapore", "SG"),
    ("ap-jakarta", "ID"),
    ("ap-bangkok", "TH"),
    ("ap-tokyo", "JP"),
    ("ap-seoul", "KR"),
    ("ap-mumbai", "IN"),
    ("eu-frankfurt", "EU"),
    ("na-siliconvalley", "US"),
    ("na-ashburn", "US"),
    ("na-toronto", "CA"),
    ("sa-saopaulo", "BR"),
];

/// Huawei Cloud (CCE node labels, OBS regions).
const HUAWEI: &[(&str, &str)] = &[
    ("cn-north-1", "CN"),
    ("cn-north-4", "CN"),
    ("cn-north-9", "CN"),
    ("cn-east-2", "CN"),
    ("cn-east-3", "CN"),
    ("cn-south-1", "CN"),
    ("cn-southwest-2", "CN"),
    // Huawei Cloud's ap-southeast-1 is Hong Kong, not Singapore as at AWS and Alibaba.
    ("ap-southeast-1", "HK"),
    ("ap-southeast-2", "TH"),
    ("ap-southeast-3", "SG"),
    ("ap-southeast-4", "ID"),
    ("af-south-1", "ZA"),
    ("la-north-2", "MX"),
    ("la-south-2", "CL"),
    ("sa-brazil-1", "BR"),
    ("tr-west-1", "TR"),
    ("me-east-1", "SA"),
    ("eu-west-0", "EU"),
    ("eu-west-101", "EU"),
];

/// Microsoft Azure, including Azure China (AKS node labels, Blob regions).
const AZURE: &[(&str, &str)] = &[
    ("chinaeast", "CN"),
    ("chinaeast2", "CN"),
    ("chinaeast3", "CN"),
    ("chinanorth", "CN"),
    ("chinanorth2", "CN"),
    ("chinanorth3", "CN"),
    ("eastasia", "HK"),
    ("southeastasia", "SG"),
    ("japaneast", "JP"),
    ("japanwest", "JP"),
    ("koreacentral", "KR"),
    ("koreasouth", "KR"),
    ("centralindia", "IN"),
    ("australiaeast", "AU"),
    ("northeurope", "EU"),
    ("westeurope", "EU"),
    ("francecentral", "EU"),
    ("germanywestcentral", "EU"),
    ("swedencentral", "EU"),
    ("italynorth", "EU"),
    ("polandcentral", "EU"),
    ("spaincentral", "EU"),
    ("uksouth", "GB"),
    ("ukwest", "GB"),
    ("switzerlandnorth", "CH"),
    ("canadacentral", "CA"),
    ("brazilsouth", "BR"),
    ("uaenorth", "AE"),
    ("eastus", "US"),
    ("eastus2", "US"),
    ("centralus", "US"),
    ("southcentralus", "US"),
    ("westus", "US"),
    ("westus2", "US"),
    ("westus3", "US"),
];

/// Google Cloud (GKE node labels, GCS locations in lower case).
const GOOGLE: &[(&str, &str)] = &[
    ("asia-east1", "TW"),
    ("asia-east2", "HK"),
    ("asia-northeast1", "JP"),
    ("asia-northeast2", "JP"),
    ("asia-northeast3", "KR"),
    ("asia-southeast1", "SG"),
    ("asia-southeast2", "ID"),
    ("asia-south1", "IN"),
    ("asia-south2", "IN"),
    ("australia-southeast1", "AU"),
    ("australia-southeast2", "AU"),
    ("europe-central2", "EU"),
    ("europe-north1", "EU"),
    ("europe-southwest1", "EU"),
    ("europe-west1", "EU"),
    ("europe-west2", "GB"),
    ("europe-west3", "EU"),
    ("europe-west4", "EU"),
    ("europe-west6", "CH"),
    ("europe-west8", "EU"),
    ("europe-west9", "EU"),
    ("me-west1", "IL"),
    ("northamerica-northeast1", "CA"),
    ("northamerica-northeast2", "CA"),
    ("southamerica-east1", "BR"),
    ("us-central1", "US"),
    ("us-east1", "US"),
    ("us-east4", "US"),
    ("us-east5", "US"),
    ("us-south1", "US"),
    ("us-west1", "US"),
    ("us-west2", "US"),
    ("us-west3", "US"),
    ("us-west4", "US"),
    // The last five are multi- and dual-regions that stay inside one jurisdiction
    // (`asia` spans several and is in none).
    ("eu", "EU"),
    ("us", "US"),
    ("eur4", "EU"),
    ("nam4", "US"),
    ("asia1", "JP"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use Provider::*;

    /// (provider, endpoint, declared) → (region, jurisdiction, source)
    type Case = (
        Provider,
        Option<&'static str>,
        Option<&'static str>,
        &'static str,
        Option<&'static str>,
        RegionSource,
    );

    #[test]
    fn real_endpoints_resolve_to_their_region_and_jurisdiction() {
        use RegionSource::{Declared, Endpoint};
        let cases: &[Case] = &[
            // Amazon S3: regional, legacy dash, dual-stack, FIPS, virtual-hosted, VPC
            // interface endpoint, the global legacy endpoint, and AWS China.
            (
                S3,
                Some("s3.eu-central-1.amazonaws.com"),
                None,
                "eu-central-1",
                Some("EU"),
                Endpoint,
            ),
            (
                S3,
                Some("s3-eu-west-1.amazonaws.com"),
                None,
                "eu-west-1",
                Some("EU"),
                Endpoint,
            ),
            (
                S3,
                Some("s3.dualstack.us-west-2.amazonaws.com"),
                None,
                "us-west-2",
                Some("US"),
                Endpoint,
            ),
            (
                S3,
                Some("s3-fips.us-east-2.amazonaws.com"),
                None,
                "us-east-2",
                Some("US"),
                Endpoint,
            ),
            (
                S3,
                Some("https://logs.s3.ap-east-1.amazonaws.com/"),
                None,
                "ap-east-1",
                Some("HK"),
                Endpoint,
            ),
            (
                S3,
                Some("bucket.vpce-0a1b2c3d-4e5f6a7b.s3.eu-west-3.vpce.amazonaws.com"),
                None,
                "eu-west-3",
                Some("EU"),
                Endpoint,
            ),
            (
                S3,
                Some("s3.amazonaws.com"),
                None,
                "us-east-1",
                Some("US"),
                Endpoint,
            ),
            (
                S3,
                Some("s3.cn-north-1.amazonaws.com.cn"),
                None,
                "cn-north-1",
                Some("CN"),
                Endpoint,
            ),
            (
                S3,
                Some("https://backups.s3.cn-northwest-1.amazonaws.com.cn:443"),
                Some("cn-northwest-1"),
                "cn-northwest-1",
                Some("CN"),
                Endpoint,
            ),
            (
                S3,
                None,
                Some("cn-north-1"),
                "cn-north-1",
                Some("CN"),
                Declared,
            ),
            // Alibaba Cloud OSS: public, internal, virtual-hosted; Hong Kong is not CN.
            (
                Oss,
                Some("oss-cn-hangzhou.aliyuncs.com"),
                None,
                "cn-hangzhou",
                Some("CN"),
                Endpoint,
            ),
            (
                Oss,
                Some("oss-cn-shanghai-internal.aliyuncs.com"),
                None,
                "cn-shanghai",
                Some("CN"),
                Endpoint,
            ),
            (
                Oss,
                Some("https://backups.oss-cn-beijing.aliyuncs.com"),
                None,
                "cn-beijing",
                Some("CN"),
                Endpoint,
            ),
            (
                Oss,
                Some("oss-cn-hongkong.aliyuncs.com"),
                None,
                "cn-hongkong",
                Some("HK"),
                Endpoint,
            ),
            (
                Oss,
                Some("oss-ap-southeast-1.aliyuncs.com"),
                None,
                "ap-southeast-1",
                Some("SG"),
                Endpoint,
            ),
            // Tencent COS: bucket-APPID hosts on both domains, internal.
            (
                Cos,
                Some("examplebucket-1250000000.cos.ap-guangzhou.myqcloud.com"),
                None,
                "ap-guangzhou",
                Some("CN"),
                Endpoint,
            ),
            (
                Cos,
                Some("cos.ap-shanghai.tencentcos.cn"),
                None,
                "ap-shanghai",
                Some("CN"),
                Endpoint,
            ),
            (
                Cos,
                Some("cos-internal.ap-beijing.tencentcos.cn"),
                None,
                "ap-beijing",
                Some("CN"),
                Endpoint,
            ),
            (
                Cos,
                Some("cos.ap-hongkong.myqcloud.com"),
                None,
                "ap-hongkong",
                Some("HK"),
                Endpoint,
            ),
            // Huawei Cloud OBS, where ap-southeast-1 is Hong Kong.
            (
                Obs,
                Some("obs.cn-east-3.myhuaweicloud.com"),
                None,
                "cn-east-3",
                Some("CN"),
                Endpoint,
            ),
            (
                Obs,
                Some("backups.obs.cn-north-4.myhuaweicloud.com"),
                None,
                "cn-north-4",
                Some("CN"),
                Endpoint,
            ),
            (
                Obs,
                Some("obs.ap-southeast-1.myhuaweicloud.com"),
                None,
                "ap-southeast-1",
                Some("HK"),
                Endpoint,
            ),
            // Azure and Google name no region in the host: the declaration counts.
            (
                AzureBlob,
                Some("acct.blob.core.chinacloudapi.cn"),
                Some("chinanorth3"),
                "chinanorth3",
                Some("CN"),
                Declared,
            ),
            (
                AzureBlob,
                Some("acct.blob.core.windows.net"),
                Some("westeurope"),
                "westeurope",
                Some("EU"),
                Declared,
            ),
            (
                AzureBlob,
                Some("acct.blob.core.windows.net"),
                Some("eastasia"),
                "eastasia",
                Some("HK"),
                Declared,
            ),
            (
                Gcs,
                Some("storage.googleapis.com"),
                Some("asia-east1"),
                "asia-east1",
                Some("TW"),
                Declared,
            ),
            // An S3-compatible store: the declared id, placed like a node region.
            (
                S3Compatible,
                Some("http://127.0.0.1:8333"),
                Some("us-east-1"),
                "us-east-1",
                Some("US"),
                Declared,
            ),
            (
                S3Compatible,
                Some("http://127.0.0.1:8333"),
                Some("dc-shanghai-2"),
                "dc-shanghai-2",
                None,
                Declared,
            ),
        ];
        for (provider, endpoint, declared, region, jurisdiction, source) in cases {
            let resolved = resolve_region(*provider, *endpoint, *declared)
                .unwrap_or_else(|e| panic!("{provider:?} {endpoint:?}: {e}"));
            assert_eq!(
                (
                    resolved.region.as_str(),
                    resolved.jurisdiction,
                    resolved.source
                ),
                (*region, *jurisdiction, *source),
                "{provider:?} {endpoint:?} {declared:?}"
            );
        }
    }

    #[test]
    fn bucket_labels_that_look_like_endpoints_are_not_taken_for_the_region() {
        let cases = [
            (
                Oss,
                "oss-cn-shanghai.oss-cn-hongkong.aliyuncs.com",
                "cn-hongkong",
            ),
            (Oss, "oss-data.oss-cn-beijing.aliyuncs.com", "cn-beijing"),
            (Oss, "oss-cn-beijing-internal.aliyuncs.com", "cn-beijing"),
            (Cos, "cos.cos.ap-hongkong.myqcloud.com", "ap-hongkong"),
            (
                Cos,
                "backups-1250000000.cos-internal.ap-beijing.tencentcos.cn",
                "ap-beijing",
            ),
            (
                Obs,
                "obs.obs.ap-southeast-1.myhuaweicloud.com",
                "ap-southeast-1",
            ),
            (
                S3,
                "s3-eu-west-1.s3.cn-north-1.amazonaws.com.cn",
                "cn-north-1",
            ),
            (
                S3,
                "s3-backups.s3.dualstack.ap-east-1.amazonaws.com",
                "ap-east-1",
            ),
        ];
        for (provider, endpoint, region) in cases {
            let resolved = resolve_region(provider, Some(endpoint), None)
                .unwrap_or_else(|e| panic!("{endpoint}: {e}"));
            assert_eq!(resolved.region, region, "{endpoint}");
        }
        // A correct declaration is not refused because of a bucket's name.
        let declared = resolve_region(
            Oss,
            Some("https://oss-data.oss-cn-beijing.aliyuncs.com"),
            Some("cn-beijing"),
        );
        assert_eq!(declared.unwrap().region, "cn-beijing");
    }

    #[test]
    fn a_declared_region_that_contradicts_the_endpoint_is_an_error() {
        let cases = [
            (
                Oss,
                "oss-cn-hongkong.aliyuncs.com",
                "cn-shanghai",
                "cn-hongkong",
            ),
            (S3, "s3.eu-west-1.amazonaws.com", "cn-north-1", "eu-west-1"),
            (
                Cos,
                "cos.ap-hongkong.myqcloud.com",
                "ap-guangzhou",
                "ap-hongkong",
            ),
            (
                Obs,
                "obs.ap-southeast-1.myhuaweicloud.com",
                "cn-east-3",
                "ap-southeast-1",
            ),
        ];
        for (provider, endpoint, declared, named) in cases {
            let error = resolve_region(provider, Some(endpoint), Some(declared)).unwrap_err();
            assert_eq!(
                error,
                RegionError::Contradiction {
                    declared: declared.into(),
                    endpoint: named.into()
                },
                "{provider:?} {endpoint}"
            );
        }
        // A partition serves only its own regions.
        let outside = resolve_region(
            AzureBlob,
            Some("a.blob.core.chinacloudapi.cn"),
            Some("westeurope"),
        );
        assert!(
            matches!(outside, Err(RegionError::Contradiction { .. })),
            "{outside:?}"
        );
    }

    #[test]
    fn accelerated_endpoints_cannot_be_pinned() {
        let cases = [
            (S3, "bucket.s3-accelerate.amazonaws.com"),
            (S3, "bucket.s3-accelerate.dualstack.amazonaws.com"),
            (Oss, "bucket.oss-accelerate.aliyuncs.com"),
            (Oss, "oss-accelerate-overseas.aliyuncs.com"),
            (Cos, "examplebucket-1250000000.cos.accelerate.myqcloud.com"),
        ];
        for (provider, endpoint) in cases {
            let error = resolve_region(provider, Some(endpoint), Some("cn-shanghai")).unwrap_err();
            assert!(
                matches!(error, RegionError::Accelerated(_)),
                "{provider:?} {endpoint}: {error}"
            );
        }
    }

    #[test]
    fn without_a_region_in_the_endpoint_one_must_be_declared() {
        for (provider, endpoint) in [
            (AzureBlob, Some("acct.blob.core.windows.net")),
            (Gcs, Some("storage.googleapis.com")),
            (S3Compatible, Some("https://minio.example.cn")),
            (S3, None),
            (Oss, Some("files.example.cn")),
        ] {
            assert_eq!(
                resolve_region(provider, endpoint, None),
                Err(RegionError::RegionRequired),
                "{provider:?} {endpoint:?}"
            );
            assert_eq!(
                resolve_region(provider, endpoint, Some("  ")),
                Err(RegionError::RegionRequired)
            );
        }
    }

    #[test]
    fn hong_kong_macau_and_taiwan_regions_are_never_mainland_china() {
        for (provider, region) in [
            (S3, "ap-east-1"),
            (Oss, "cn-hongkong"),
            (Cos, "ap-hongkong"),
            (Obs, "ap-southeast-1"),
            (AzureBlob, "eastasia"),
            (Gcs, "asia-east1"),
            (Gcs, "asia-east2"),
        ] {
            let jurisdiction = jurisdiction(provider, region);
            assert!(
                jurisdiction.is_some(),
                "{provider:?} {region} is in the catalogue"
            );
            assert_ne!(jurisdiction, Some("CN"), "{provider:?} {region}");
        }
        // The same id means different places at different providers.
        assert_eq!(jurisdiction(S3, "ap-southeast-1"), Some("SG"));
        assert_eq!(jurisdiction(Obs, "ap-southeast-1"), Some("HK"));
        // A declared S3-compatible region is placed like a node region.
        assert_eq!(jurisdiction(S3Compatible, "cn-north-1"), Some("CN"));
        assert_eq!(jurisdiction(S3Compatible, "ap-southeast-1"), None);
        assert_eq!(jurisdiction(S3Compatible, "dc-frankfurt-2"), None);
    }

    #[test]
    fn node_regions_are_placed_only_where_every_provider_agrees() {
        use crate::api::Jurisdiction::{Cn, Eu, Hk, Tw, Us};
        let cases = [
            ("cn-north-1", Some(Cn)), // AWS China and Huawei Cloud
            ("cn-shanghai", Some(Cn)),
            ("ap-guangzhou", Some(Cn)),
            ("us-east-1", Some(Us)), // AWS and Alibaba Cloud
            ("eu-central-1", Some(Eu)),
            ("ap-east-1", Some(Hk)),
            ("asia-east1", Some(Tw)),
            ("ap-southeast-1", None), // SG at AWS and Alibaba, HK at Huawei
            ("ap-southeast-3", None), // ID at AWS, MY at Alibaba, SG at Huawei
            ("eu-west-1", None),      // Ireland at AWS, London at Alibaba
            ("me-east-1", None),      // UAE at Alibaba, Saudi Arabia at Huawei
            ("not-a-region", None),
        ];
        for (region, expected) in cases {
            assert_eq!(node_jurisdiction(region), expected, "{region}");
        }
    }

    #[test]
    fn every_catalogue_entry_names_a_known_jurisdiction_once() {
        for (provider, catalogue) in CATALOGUES {
            let mut seen = std::collections::BTreeSet::new();
            for (region, code) in catalogue {
                assert!(
                    Jurisdiction::from_code(code).is_some(),
                    "{provider:?} {region}: {code} is not a Jurisdiction"
                );
                assert!(seen.insert(*region), "{provider:?} lists {region} twice");
                let mainland = *code == "CN";
                let greater_china = ["HK", "MO", "TW"].contains(code);
                assert!(!(mainland && greater_china));
                if region.contains("hongkong") || region.contains("taipei") {
                    assert!(greater_china, "{provider:?} {region} is not mainland China");
                }
            }
        }
    }

    #[test]
    fn every_endpoint_form_of_a_providers_domain_names_its_region_or_is_refused() {
        use RegionError::{Contradiction, MultiRegion, UnknownEndpoint};
        let resolves = [
            (Oss, "https://cn-hongkong.oss.aliyuncs.com", "cn-hongkong"),
            (
                Oss,
                "https://bucket.cn-shanghai.oss.aliyuncs.com",
                "cn-shanghai",
            ),
            (
                Obs,
                "https://obs.eu-west-101.myhuaweicloud.eu",
                "eu-west-101",
            ),
            (
                Obs,
                "https://b.obs.cn-east-3.myhuaweicloud.com",
                "cn-east-3",
            ),
            (S3, "https://s3-external-1.amazonaws.com", "us-east-1"),
            (
                S3,
                "https://ap-123456789012.s3-accesspoint.eu-west-1.amazonaws.com",
                "eu-west-1",
            ),
        ];
        for (provider, endpoint, region) in resolves {
            let resolved = resolve_region(provider, Some(endpoint), None);
            assert_eq!(
                resolved.map(|r| r.region).as_deref(),
                Ok(region),
                "{endpoint}"
            );
        }
        let unknown = [
            (Oss, "https://oss.aliyuncs.com"),
            (Oss, "https://bucket.aliyuncs.com"),
            (S3, "https://bucket.amazonaws.com"),
            (Cos, "https://service.cos.myqcloud.com"),
            (Obs, "https://obs.myhuaweicloud.com"),
        ];
        for (provider, endpoint) in unknown {
            let resolved = resolve_region(provider, Some(endpoint), Some("cn-shanghai"));
            assert!(
                matches!(resolved, Err(UnknownEndpoint(_))),
                "{endpoint}: {resolved:?}"
            );
        }
        let mrap = "https://mfzwi23gnjvgw.mrap.accesspoint.s3-global.amazonaws.com";
        let resolved = resolve_region(S3, Some(mrap), Some("eu-central-1"));
        assert!(matches!(resolved, Err(MultiRegion(_))), "{resolved:?}");
        // A global cloud never serves a China partition's region.
        let resolved = resolve_region(
            AzureBlob,
            Some("https://acct.blob.core.windows.net"),
            Some("chinaeast2"),
        );
        assert!(
            matches!(resolved, Err(Contradiction { .. })),
            "{resolved:?}"
        );
        // Custom domains still take the declared region.
        let resolved = resolve_region(Oss, Some("https://files.example.cn"), Some("cn-shanghai"));
        assert_eq!(resolved.map(|r| r.region).as_deref(), Ok("cn-shanghai"));
    }

    #[test]
    fn endpoints_are_plain_hosts_with_an_optional_scheme_and_port() {
        let accepted = [
            (
                "https://S3.CN-NORTH-1.amazonaws.com.cn:443/",
                "s3.cn-north-1.amazonaws.com.cn",
            ),
            (
                "oss-cn-hangzhou.aliyuncs.com.",
                "oss-cn-hangzhou.aliyuncs.com",
            ),
            ("http://127.0.0.1:8333", "127.0.0.1"),
            ("https://[fd00::5]:9000", "fd00::5"),
        ];
        for (endpoint, host) in accepted {
            assert_eq!(endpoint_host(endpoint).as_deref(), Ok(host), "{endpoint}");
        }
        let refused = [
            "https://user@s3.cn-north-1.amazonaws.com.cn",
            "https://s3.cn-north-1.amazonaws.com.cn/bucket",
            "https://s3.cn-north-1.amazonaws.com.cn?x=1",
            r"https://203.0.113.7\.s3.eu-central-1.amazonaws.com",
            r"https://169.254.169.254\.oss-cn-shanghai.aliyuncs.com",
            "https://a%2eb.example",
            "ftp://s3.example",
            "https://s3.example:0",
            "https://s3.example:99999",
            "https://[fd00::5",
            "https://",
            "https://a..b",
        ];
        for endpoint in refused {
            assert!(
                matches!(
                    endpoint_host(endpoint),
                    Err(RegionError::InvalidEndpoint(_))
                ),
                "{endpoint}"
            );
        }
    }
}
