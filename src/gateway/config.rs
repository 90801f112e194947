//! The contract between the operator and the gateway.
//!
//! The operator renders a [`GatewayConfig`] as JSON into the gateway-config Secret
//! (key [`CONFIG_KEY`]); the gateway reads it from the mounted file and reloads it when
//! the kubelet swaps the file. It carries only salted password hashes, never a password.
//! Serialisation is deterministic: fields in declaration order, users sorted by name.

use serde::{Deserialize, Serialize};

/// Key of the gateway-config Secret that holds the JSON document.
pub const CONFIG_KEY: &str = "config.json";

/// Everything the gateway needs to know about its server and its users.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayConfig {
    /// `namespace/name` of the TransferServer this gateway serves.
    pub server: String,
    /// Region the server is pinned to.
    pub region: String,
    /// The residency decision the operator reached for this server.
    pub residency: ResidencyStamp,
    /// Logins, sorted by name.
    pub users: Vec<GatewayUser>,
}

/// The operator's residency decision, stamped into the configuration so the data plane
/// can refuse to serve storage that does not match it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResidencyStamp {
    /// Whether the server complies with the policy that governs it.
    pub compliant: bool,
    /// Names of the DataResidencyPolicies that govern the server, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Regions the policy allows (empty when no policy governs the server).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_regions: Vec<String>,
}

/// One login.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayUser {
    /// Login name (the TransferUser's name).
    pub name: String,
    /// Argon2id hash in PHC string format, if the user may log in with a password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// Authorised public keys, one OpenSSH `authorized_keys` line each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public_keys: Vec<String>,
    /// Home directory relative to the storage root, normalised, starting with `/`.
    pub home: String,
    /// What the user may do inside the home directory.
    pub permissions: Vec<crate::api::Permission>,
}
