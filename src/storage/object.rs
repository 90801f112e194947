//! Object stores behind the gateway: what the operator renders into the gateway
//! configuration ([`ObjectStoreConfig`]), the credentials mounted next to it
//! ([`Credentials`]), and the OpenDAL operator both build from them ([`build_operator`]).
//!
//! Contract:
//! - The configuration is complete: the operator fills in the effective endpoint (the
//!   provider's public regional endpoint unless the spec overrides it) and the region it
//!   resolved, so the gateway never guesses, and [`ObjectStoreConfig::check_region`]
//!   re-resolves the region from exactly what the gateway will connect to.
//! - Credentials are read from files (the mounted Secret), one key per file, and never
//!   printed: [`Credentials`]'s `Debug` shows which keys are present, not their values.
//! - With workload identity the provider's credential chain reads what the platform
//!   injects into the pod (environment variables, token files). For S3, EC2 instance
//!   metadata is always disabled, so a pod never borrows its node's role.
//! - Keys handed to the operator are relative to the configured prefix, as with the
//!   volume: the operator's root is `/PREFIX/`.
//! - Requests go through an HTTP client of the operator's own ([`http_client`]) that ignores
//!   proxy environment variables, follows no redirect (a store's answer cannot send the
//!   signed request elsewhere) and gives up on a connection after
//!   [`CONNECT_TIMEOUT`] and on a silent response after [`READ_TIMEOUT`].

use std::fmt;
use std::path::Path;
use std::time::Duration;

use opendal::{HttpTransporter, OperationContext, Operator};
use opendal_http_transport_reqwest::ReqwestTransport;
use serde::{Deserialize, Serialize};

pub use crate::api::{AddressingStyle, ObjectStoreProvider as Provider};
use crate::residency::region::{self, RegionError, ResolvedRegion};

/// A bucket as the gateway reaches it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectStoreConfig {
    /// The provider.
    pub provider: Provider,
    /// Bucket (container, for Azure Blob).
    pub bucket: String,
    /// Key prefix, empty or ending in `/`, never starting with one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// The endpoint URL the gateway connects to.
    pub endpoint: String,
    /// The region the operator resolved (and judged against the policy).
    pub region: String,
    /// How object URLs are formed (S3 and S3-compatible stores only).
    #[serde(default, skip_serializing_if = "is_virtual_hosted")]
    pub addressing_style: AddressingStyle,
    /// Whether credentials come from the pod's workload identity instead of files.
    #[serde(default, skip_serializing_if = "is_false")]
    pub workload_identity: bool,
}

fn is_virtual_hosted(style: &AddressingStyle) -> bool {
    *style == AddressingStyle::VirtualHosted
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Why an object store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ObjectStoreError {
    /// The region cannot be resolved from the endpoint and the declaration.
    #[error("storage region: {0}")]
    Region(#[from] RegionError),
    /// The region resolved from the configuration is not the one stamped in it.
    #[error("the store resolves to region {resolved}, but the configuration says {stamped}")]
    RegionMismatch {
        /// Region resolved from the endpoint and declaration.
        resolved: String,
        /// Region written into the configuration.
        stamped: String,
    },
    /// A credential the provider needs is missing.
    #[error("the storage credentials lack {0}")]
    MissingCredential(&'static str),
    /// A credentials file could not be read.
    #[error("failed to read storage credential {key}")]
    ReadCredential {
        /// The key (file name).
        key: &'static str,
        /// What the filesystem reported.
        #[source]
        source: std::io::Error,
    },
    /// OpenDAL refused the configuration.
    #[error("invalid object store configuration: {0}")]
    Build(#[source] opendal::Error),
    /// The HTTP client could not be built.
    #[error("failed to build the HTTP client for the object store")]
    HttpClient(#[source] reqwest::Error),
}

/// How long connecting to the store may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the store may leave a request without an answer (no byte received).
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A new HTTP client for one operator. Each operator has its own: a client's pooled
/// connections belong to the runtime that opened them.
pub fn http_client() -> Result<reqwest::Client, ObjectStoreError> {
    // reqwest's rustls needs a process-wide provider; Sluice uses ring throughout.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .build()
        .map_err(ObjectStoreError::HttpClient)
}

/// Secret keys the credentials are read from.
pub mod keys {
    /// Access key id (S3, OSS, COS, OBS, S3-compatible).
    pub const ACCESS_KEY_ID: &str = "accessKeyId";
    /// Secret access key (S3, OSS, COS, OBS, S3-compatible).
    pub const SECRET_ACCESS_KEY: &str = "secretAccessKey";
    /// Optional session token for temporary credentials.
    pub const SESSION_TOKEN: &str = "sessionToken";
    /// Azure storage account key.
    pub const ACCOUNT_KEY: &str = "accountKey";
    /// Optional Azure storage account name (otherwise the endpoint's first label).
    pub const ACCOUNT_NAME: &str = "accountName";
    /// A Google service account's JSON key.
    pub const SERVICE_ACCOUNT_KEY: &str = "serviceAccountKey";
}

/// The keys a provider's Secret must hold.
pub fn required_keys(provider: Provider) -> &'static [&'static str] {
    match provider {
        Provider::AzureBlob => &[keys::ACCOUNT_KEY],
        Provider::Gcs => &[keys::SERVICE_ACCOUNT_KEY],
        _ => &[keys::ACCESS_KEY_ID, keys::SECRET_ACCESS_KEY],
    }
}

/// Static credentials. `Debug` names the keys present, never their values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    values: Vec<(&'static str, String)>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let present: Vec<_> = self.values.iter().map(|(k, _)| *k).collect();
        f.debug_struct("Credentials")
            .field("keys", &present)
            .finish()
    }
}

/// Every key [`Credentials`] reads.
pub const ALL_KEYS: [&str; 6] = [
    keys::ACCESS_KEY_ID,
    keys::SECRET_ACCESS_KEY,
    keys::SESSION_TOKEN,
    keys::ACCOUNT_KEY,
    keys::ACCOUNT_NAME,
    keys::SERVICE_ACCOUNT_KEY,
];

impl Credentials {
    /// Credentials from `(key, value)` pairs, such as a Secret's data. Unknown keys are
    /// ignored; surrounding whitespace (a trailing newline from `kubectl create secret
    /// --from-file`) is trimmed.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Self {
        let mut values = Vec::new();
        for (key, value) in pairs {
            let Some(known) = ALL_KEYS.iter().find(|k| **k == key) else {
                continue;
            };
            let value = String::from_utf8_lossy(value).trim().to_owned();
            if !value.is_empty() {
                values.push((*known, value));
            }
        }
        values.sort();
        Self { values }
    }

    /// Reads the known keys from files in `dir` (a mounted Secret). Missing files are
    /// absent keys.
    pub fn read_dir(dir: &Path) -> Result<Self, ObjectStoreError> {
        let mut read = Vec::new();
        for key in ALL_KEYS {
            match std::fs::read(dir.join(key)) {
                Ok(bytes) => read.push((key, bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(ObjectStoreError::ReadCredential { key, source }),
            }
        }
        Ok(Self::from_pairs(
            read.iter().map(|(k, v)| (*k, v.as_slice())),
        ))
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    fn require(&self, key: &'static str) -> Result<&str, ObjectStoreError> {
        self.get(key)
            .ok_or(ObjectStoreError::MissingCredential(key))
    }

    /// The first key `provider` needs that is missing.
    pub fn missing(&self, provider: Provider) -> Option<&'static str> {
        required_keys(provider)
            .iter()
            .copied()
            .find(|k| self.get(k).is_none())
    }
}

/// The endpoint a bucket is reached at when the spec does not override it: the
/// provider's public regional endpoint. `None` where there is no such default (Azure
/// Blob, S3-compatible stores).
pub fn default_endpoint(provider: Provider, region: &str) -> Option<String> {
    match provider {
        Provider::S3 if region.starts_with("cn-") => {
            Some(format!("https://s3.{region}.amazonaws.com.cn"))
        }
        Provider::S3 => Some(format!("https://s3.{region}.amazonaws.com")),
        Provider::Oss => Some(format!("https://oss-{region}.aliyuncs.com")),
        Provider::Cos => Some(format!("https://cos.{region}.myqcloud.com")),
        Provider::Obs => Some(format!("https://obs.{region}.myhuaweicloud.com")),
        Provider::Gcs => Some("https://storage.googleapis.com".to_owned()),
        Provider::AzureBlob | Provider::S3Compatible => None,
    }
}

impl ObjectStoreConfig {
    /// Resolves the region of exactly this configuration (its endpoint and its stamped
    /// region as the declaration) and checks it is the stamped region.
    pub fn check_region(&self) -> Result<ResolvedRegion, ObjectStoreError> {
        let resolved =
            region::resolve_region(self.provider, Some(&self.endpoint), Some(&self.region))?;
        if resolved.region != self.region {
            return Err(ObjectStoreError::RegionMismatch {
                resolved: resolved.region,
                stamped: self.region.clone(),
            });
        }
        Ok(resolved)
    }

    /// Root of the operator: `/PREFIX/`.
    pub fn root(&self) -> String {
        format!("/{}", self.prefix)
    }
}

/// Builds the OpenDAL operator for `config`. `credentials` is ignored with workload
/// identity. Makes no network request.
pub fn build_operator(
    config: &ObjectStoreConfig,
    credentials: &Credentials,
) -> Result<Operator, ObjectStoreError> {
    let root = config.root();
    let static_keys = !config.workload_identity;
    let operator = match config.provider {
        Provider::S3 | Provider::S3Compatible => {
            let mut builder = opendal::services::S3::default()
                .bucket(&config.bucket)
                .root(&root)
                .endpoint(&config.endpoint)
                .region(&config.region)
                .disable_ec2_metadata();
            if config.addressing_style == AddressingStyle::VirtualHosted {
                builder = builder.enable_virtual_host_style();
            }
            if static_keys {
                builder = builder
                    .disable_config_load()
                    .access_key_id(credentials.require(keys::ACCESS_KEY_ID)?)
                    .secret_access_key(credentials.require(keys::SECRET_ACCESS_KEY)?);
                if let Some(token) = credentials.get(keys::SESSION_TOKEN) {
                    builder = builder.session_token(token);
                }
            }
            Operator::new(builder)
        }
        Provider::Oss => {
            let mut builder = opendal::services::Oss::default()
                .bucket(&config.bucket)
                .root(&root)
                .endpoint(&config.endpoint);
            if static_keys {
                builder = builder
                    .access_key_id(credentials.require(keys::ACCESS_KEY_ID)?)
                    .access_key_secret(credentials.require(keys::SECRET_ACCESS_KEY)?);
                if let Some(token) = credentials.get(keys::SESSION_TOKEN) {
                    builder = builder.security_token(token);
                }
            }
            Operator::new(builder)
        }
        Provider::Cos => {
            let mut builder = opendal::services::Cos::default()
                .bucket(&config.bucket)
                .root(&root)
                .endpoint(&config.endpoint)
                .disable_config_load()
                .secret_id(credentials.require(keys::ACCESS_KEY_ID)?)
                .secret_key(credentials.require(keys::SECRET_ACCESS_KEY)?);
            if let Some(token) = credentials.get(keys::SESSION_TOKEN) {
                builder = builder.security_token(token);
            }
            Operator::new(builder)
        }
        Provider::Obs => {
            let builder = opendal::services::Obs::default()
                .bucket(&config.bucket)
                .root(&root)
                .endpoint(&config.endpoint)
                .access_key_id(credentials.require(keys::ACCESS_KEY_ID)?)
                .secret_access_key(credentials.require(keys::SECRET_ACCESS_KEY)?);
            Operator::new(builder)
        }
        Provider::AzureBlob => {
            let mut builder = opendal::services::Azblob::default()
                .container(&config.bucket)
                .root(&root)
                .endpoint(&config.endpoint);
            if static_keys {
                let account = match credentials.get(keys::ACCOUNT_NAME) {
                    Some(name) => name.to_owned(),
                    None => account_of(&config.endpoint)
                        .ok_or(ObjectStoreError::MissingCredential(keys::ACCOUNT_NAME))?,
                };
                builder = builder
                    .account_name(&account)
                    .account_key(credentials.require(keys::ACCOUNT_KEY)?);
            }
            Operator::new(builder)
        }
        Provider::Gcs => {
            let mut builder = opendal::services::Gcs::default()
                .bucket(&config.bucket)
                .root(&root)
                .endpoint(&config.endpoint);
            if static_keys {
                use base64::Engine as _;
                let key = credentials.require(keys::SERVICE_ACCOUNT_KEY)?;
                let encoded = base64::engine::general_purpose::STANDARD.encode(key);
                builder = builder
                    .disable_config_load()
                    .disable_vm_metadata()
                    .credential(&encoded);
            }
            Operator::new(builder)
        }
    };
    let transport = HttpTransporter::new(ReqwestTransport::new(http_client()?));
    let context = OperationContext::new().with_http_transport(transport);
    Ok(operator
        .map_err(ObjectStoreError::Build)?
        .with_context(context))
}

/// The storage account an Azure Blob endpoint names: the first label of its host.
fn account_of(endpoint: &str) -> Option<String> {
    let host = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .split(['/', ':'])
        .next()?;
    let (account, _) = host.split_once('.')?;
    (!account.is_empty()).then(|| account.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(provider: Provider, endpoint: &str, region: &str) -> ObjectStoreConfig {
        ObjectStoreConfig {
            provider,
            bucket: "backups".into(),
            prefix: "gateways/cucm/".into(),
            endpoint: endpoint.into(),
            region: region.into(),
            addressing_style: AddressingStyle::VirtualHosted,
            workload_identity: false,
        }
    }

    fn s3_keys() -> Credentials {
        Credentials::from_pairs([
            (keys::ACCESS_KEY_ID, b"AKIDEXAMPLE\n".as_slice()),
            (keys::SECRET_ACCESS_KEY, b"wJalrXUtnFEMI/K7MDENG".as_slice()),
            ("unrelated", b"x".as_slice()),
        ])
    }

    #[test]
    fn credentials_never_show_their_values() {
        let shown = format!("{:?}", s3_keys());
        assert_eq!(
            shown,
            r#"Credentials { keys: ["accessKeyId", "secretAccessKey"] }"#
        );
        assert_eq!(s3_keys().get(keys::ACCESS_KEY_ID), Some("AKIDEXAMPLE"));
        assert_eq!(s3_keys().missing(Provider::Oss), None);
        assert_eq!(
            s3_keys().missing(Provider::AzureBlob),
            Some(keys::ACCOUNT_KEY)
        );
        assert_eq!(
            s3_keys().missing(Provider::Gcs),
            Some(keys::SERVICE_ACCOUNT_KEY)
        );
    }

    #[test]
    fn default_endpoints_are_the_regional_public_ones() {
        let cases = [
            (
                Provider::S3,
                "eu-central-1",
                Some("https://s3.eu-central-1.amazonaws.com"),
            ),
            (
                Provider::S3,
                "cn-north-1",
                Some("https://s3.cn-north-1.amazonaws.com.cn"),
            ),
            (
                Provider::Oss,
                "cn-shanghai",
                Some("https://oss-cn-shanghai.aliyuncs.com"),
            ),
            (
                Provider::Cos,
                "ap-guangzhou",
                Some("https://cos.ap-guangzhou.myqcloud.com"),
            ),
            (
                Provider::Obs,
                "cn-east-3",
                Some("https://obs.cn-east-3.myhuaweicloud.com"),
            ),
            (
                Provider::Gcs,
                "europe-west3",
                Some("https://storage.googleapis.com"),
            ),
            (Provider::AzureBlob, "chinaeast2", None),
            (Provider::S3Compatible, "cn-shanghai", None),
        ];
        for (provider, region, expected) in cases {
            assert_eq!(
                default_endpoint(provider, region).as_deref(),
                expected,
                "{provider:?} {region}"
            );
        }
    }

    #[test]
    fn every_default_endpoint_resolves_to_its_own_region() {
        let cases = [
            (Provider::S3, "eu-central-1"),
            (Provider::S3, "cn-northwest-1"),
            (Provider::Oss, "cn-hangzhou"),
            (Provider::Cos, "ap-shanghai"),
            (Provider::Obs, "cn-north-4"),
            (Provider::Gcs, "asia-east2"),
        ];
        for (provider, region) in cases {
            let endpoint = default_endpoint(provider, region).unwrap();
            let config = config(provider, &endpoint, region);
            assert_eq!(config.check_region().unwrap().region, region, "{endpoint}");
        }
    }

    #[test]
    fn a_stamped_region_the_endpoint_contradicts_is_refused() {
        let config = config(
            Provider::Oss,
            "https://oss-cn-hongkong.aliyuncs.com",
            "cn-shanghai",
        );
        assert!(matches!(
            config.check_region(),
            Err(ObjectStoreError::Region(RegionError::Contradiction { .. }))
        ));
    }

    #[test]
    fn operators_build_for_every_provider_without_network() {
        let s3 = s3_keys();
        let azure = Credentials::from_pairs([(keys::ACCOUNT_KEY, b"a2V5".as_slice())]);
        let gcs = Credentials::from_pairs([(
            keys::SERVICE_ACCOUNT_KEY,
            br#"{"type":"service_account","client_email":"a@b.iam.gserviceaccount.com","private_key":"-----BEGIN PRIVATE KEY-----\nMA==\n-----END PRIVATE KEY-----\n"}"#
                .as_slice(),
        )]);
        let cases = [
            (
                Provider::S3,
                "https://s3.cn-north-1.amazonaws.com.cn",
                "cn-north-1",
                &s3,
                "s3",
            ),
            (
                Provider::S3Compatible,
                "http://127.0.0.1:8333",
                "cn-shanghai",
                &s3,
                "s3",
            ),
            (
                Provider::Oss,
                "https://oss-cn-shanghai.aliyuncs.com",
                "cn-shanghai",
                &s3,
                "oss",
            ),
            (
                Provider::Cos,
                "https://cos.ap-beijing.myqcloud.com",
                "ap-beijing",
                &s3,
                "cos",
            ),
            (
                Provider::Obs,
                "https://obs.cn-east-3.myhuaweicloud.com",
                "cn-east-3",
                &s3,
                "obs",
            ),
            (
                Provider::AzureBlob,
                "https://acct.blob.core.chinacloudapi.cn",
                "chinaeast2",
                &azure,
                "azblob",
            ),
            (
                Provider::Gcs,
                "https://storage.googleapis.com",
                "europe-west3",
                &gcs,
                "gcs",
            ),
        ];
        for (provider, endpoint, region, credentials, scheme) in cases {
            let operator = build_operator(&config(provider, endpoint, region), credentials)
                .unwrap_or_else(|e| panic!("{provider:?}: {e}"));
            let info = operator.info();
            assert_eq!(info.scheme().to_string(), scheme, "{provider:?}");
            assert_eq!(info.root(), "/gateways/cucm/", "{provider:?}");
            assert_eq!(info.name(), "backups", "{provider:?}");
        }
    }

    #[test]
    fn missing_keys_are_named() {
        let config = config(
            Provider::S3Compatible,
            "http://127.0.0.1:8333",
            "cn-shanghai",
        );
        let only_id = Credentials::from_pairs([(keys::ACCESS_KEY_ID, b"id".as_slice())]);
        let error = build_operator(&config, &only_id).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the storage credentials lack secretAccessKey"
        );
    }

    #[test]
    fn azure_accounts_come_from_the_endpoint() {
        assert_eq!(
            account_of("https://acct.blob.core.windows.net/").as_deref(),
            Some("acct")
        );
        assert_eq!(
            account_of("https://chinaacct.blob.core.chinacloudapi.cn").as_deref(),
            Some("chinaacct")
        );
    }
}
