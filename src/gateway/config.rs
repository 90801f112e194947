//! The contract between the operator and the gateway.
//!
//! The operator renders a [`GatewayConfig`] as JSON into the gateway-config Secret
//! (key [`CONFIG_KEY`]); the gateway reads it from the mounted file and reloads it when
//! the kubelet swaps the file. It carries only salted password hashes, never a password.
//! Serialisation is deterministic: fields in declaration order, users sorted by name.
//! Optional sections are left out when absent, so a configuration without FTPS renders
//! exactly as it did before FTPS existed.

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
    /// FTPS, if the server offers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ftps: Option<FtpsSettings>,
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

/// How the gateway serves FTPS. Present only when the server offers FTPS; without it the
/// gateway serves SFTP alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FtpsSettings {
    /// Serve explicit FTPS: plain TCP on the control port, upgraded with `AUTH TLS`.
    pub explicit: bool,
    /// Serve implicit FTPS: TLS from the first byte, on a port of its own.
    pub implicit: bool,
    /// Ports handed out for passive data connections.
    pub passive_ports: PassivePorts,
    /// Address advertised in `PASV` replies (an IPv4 address or a DNS name resolving to
    /// one), for a gateway behind NAT or a load balancer. Without it the address the client
    /// reached the control port on is advertised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive_address: Option<String>,
    /// Allow logins and data transfers without TLS. Off unless explicitly enabled.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// Whether data connections may or must resume the control connection's TLS session.
    #[serde(default)]
    pub session_reuse: SessionReuse,
    /// Oldest TLS version accepted.
    #[serde(default)]
    pub min_tls_version: TlsVersion,
}

/// A range of TCP ports: `first`, `first + 1`, ..., `first + count - 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PassivePorts {
    /// First port of the range.
    pub first: u16,
    /// Number of ports in the range.
    pub count: u16,
}

impl PassivePorts {
    /// The last port of the range, or `None` if the range is empty or passes 65535.
    pub fn last(&self) -> Option<u16> {
        self.count
            .checked_sub(1)
            .and_then(|extra| self.first.checked_add(extra))
    }
}

/// TLS session resumption on data connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionReuse {
    /// Sessions are never resumed: every data connection makes a full handshake.
    Off,
    /// Data connections may resume the control connection's session (what common clients
    /// such as curl, lftp and FileZilla do), or make a full handshake.
    #[default]
    Allow,
    /// Data connections must resume the control connection's session; any other data
    /// connection is refused. This proves the data connection comes from the client that
    /// logged in.
    Require,
}

/// A TLS protocol version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2.
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    /// TLS 1.3.
    #[serde(rename = "1.3")]
    V1_3,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> serde_json::Value {
        serde_json::json!({
            "server": "ns/s",
            "region": "cn-shanghai",
            "residency": {"compliant": true},
            "users": [],
        })
    }

    #[test]
    fn a_configuration_without_ftps_round_trips_unchanged() {
        let config: GatewayConfig = serde_json::from_value(minimal()).unwrap();
        assert_eq!(config.ftps, None);
        assert_eq!(serde_json::to_value(&config).unwrap(), minimal());
    }

    #[test]
    fn the_ftps_section_is_camel_case_with_defaults_for_the_policy_fields() {
        let mut value = minimal();
        value["ftps"] = serde_json::json!({
            "explicit": true,
            "implicit": false,
            "passivePorts": {"first": 30000, "count": 100},
        });
        let config: GatewayConfig = serde_json::from_value(value).unwrap();
        let ftps = config.ftps.unwrap();
        assert_eq!(ftps.passive_ports.last(), Some(30099));
        assert_eq!(ftps.session_reuse, SessionReuse::Allow);
        assert_eq!(ftps.min_tls_version, TlsVersion::V1_2);
        assert!(!ftps.allow_plaintext);
        assert_eq!(ftps.passive_address, None);

        let rendered = serde_json::to_value(&ftps).unwrap();
        assert_eq!(rendered["sessionReuse"], "Allow");
        assert_eq!(rendered["minTlsVersion"], "1.2");
        assert_eq!(rendered["passivePorts"]["count"], 100);
    }

    #[test]
    fn unknown_ftps_fields_and_versions_are_rejected() {
        let mut value = minimal();
        value["ftps"] = serde_json::json!({
            "explicit": true,
            "implicit": true,
            "passivePorts": {"first": 1, "count": 1},
            "minTlsVersion": "1.1",
        });
        assert!(serde_json::from_value::<GatewayConfig>(value.clone()).is_err());
        value["ftps"]["minTlsVersion"] = "1.3".into();
        value["ftps"]["bounce"] = true.into();
        assert!(serde_json::from_value::<GatewayConfig>(value).is_err());
    }

    #[test]
    fn a_passive_range_past_the_last_port_has_no_last_port() {
        let ports = PassivePorts {
            first: 65535,
            count: 2,
        };
        assert_eq!(ports.last(), None);
        let empty = PassivePorts { first: 1, count: 0 };
        assert_eq!(empty.last(), None);
    }
}
