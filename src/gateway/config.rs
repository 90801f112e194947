//! The contract between the operator and the gateway.
//!
//! The operator renders a [`GatewayConfig`] as JSON into the gateway-config Secret
//! (key [`CONFIG_KEY`]); the gateway reads it from the mounted file and reloads it when
//! the kubelet swaps the file. It carries only salted password hashes, never a password.
//! Serialisation is deterministic: fields in declaration order, users sorted by name.
//! Optional sections are left out when absent, so a configuration without FTPS renders
//! exactly as it did before FTPS existed.

use serde::{Deserialize, Serialize};

pub use crate::api::{SessionReuse, TlsVersion};

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
    /// Whether the gateway serves SFTP. Left out (and so true) unless the server offers
    /// FTPS alone.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub sftp: bool,
    /// FTPS, if the server offers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ftps: Option<FtpsSettings>,
    /// The object store files live in; left out when they live on the mounted volume.
    /// Its credentials, unless it uses workload identity, are files in the directory the
    /// gateway is given (`--storage-credentials`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_store: Option<crate::storage::object::ObjectStoreConfig>,
    /// Audit log destinations besides the storage; left out when there are none.
    #[serde(default, skip_serializing_if = "is_default")]
    pub audit: AuditSettings,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

fn yes() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// The operator's residency decision, stamped into the configuration so the data plane
/// can refuse what the policy does not allow.
///
/// The operator never rolls out a new gateway for a server an enforced policy finds
/// non-compliant; `suspended: true` therefore reaches a gateway that was rolled out before
/// its server fell out of compliance, and that gateway must stop accepting writes
/// (uploads, deletes, renames, new directories) while it keeps serving reads, so nothing
/// stored is lost or hidden. A server that breaks only `Audit` policies is not suspended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResidencyStamp {
    /// Whether the server complies with every policy that governs it.
    pub compliant: bool,
    /// Whether some governing policy is enforced (informational: what the gateway
    /// enforces is `suspended` and each allowance's own `enforced`). Left out when false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub enforced: bool,
    /// Whether writes are suspended: an enforced policy the server violates. Left out
    /// when false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub suspended: bool,
    /// Names of the DataResidencyPolicies that govern the server, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Why the server does not comply, naming policy and rule; left out when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub violation: Option<String>,
    /// The cross-border allowances the server relies on: after one of an enforced policy
    /// expires, or once its volume is used up, the gateway stops accepting uploads even
    /// before the operator re-renders the stamp.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cross_border_transfers: Vec<CrossBorderStamp>,
}

impl ResidencyStamp {
    /// Why writes are refused at `now` (seconds since the Unix epoch), if they are: the
    /// server violates an enforced policy, or an allowance of an enforced policy it relies
    /// on has expired. Volume limits are checked by the audit log, which counts the bytes.
    pub fn writes_refused(&self, now: i64) -> Option<String> {
        if self.suspended {
            let why = self
                .violation
                .as_deref()
                .unwrap_or("it violates its residency policy");
            return Some(format!("writes are suspended: {why}"));
        }
        self.cross_border_transfers
            .iter()
            .find(|t| t.enforced && t.expires <= now)
            .map(|t| {
                format!(
                    "writes are suspended: cross-border transfer {} to {} has expired",
                    t.reference, t.region
                )
            })
    }
}

/// A cross-border allowance as the gateway enforces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CrossBorderStamp {
    /// The DataResidencyPolicy that grants it.
    pub policy: String,
    /// Whether that policy is enforced: only then do its expiry and volume limit refuse
    /// uploads. Left out when false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub enforced: bool,
    /// The assessment reference.
    pub reference: String,
    /// The region outside the allowed ones that it permits.
    pub region: String,
    /// When it ends, in seconds since the Unix epoch.
    pub expires: i64,
    /// Most bytes of completed uploads it covers, over all of the server's gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Most individuals it covers, recorded for the audit log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_individuals: Option<i64>,
}

/// Where the gateway writes its audit log besides the server's storage.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditSettings {
    /// Also write every record to standard output. Left out when false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stdout: bool,
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
    /// Whether `EPSV` is offered. An EPSV data connection goes to the address the client
    /// reached the control port on, so it is off where that address is a Service shared
    /// by several pods (the data connection could reach another pod); clients then use
    /// `PASV`, whose reply names the pod's own address. Left out (and so true) unless off.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub epsv: bool,
    /// With more than one gateway pod: the passive sub-range (and address) of each pod,
    /// indexed by the pod's ordinal. Each pod is reached on its own sub-range through a
    /// Service of its own, so a data connection always lands on the pod whose control
    /// connection announced it. Empty for a single pod, which serves all of
    /// `passive_ports`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaPassive>,
}

/// The passive ports and advertised address of one gateway pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicaPassive {
    /// The pod's share of the server's passive range.
    pub passive_ports: PassivePorts,
    /// Address this pod advertises in `PASV` replies, when it differs from the server's
    /// `passive_address` (each pod has a load balancer of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive_address: Option<String>,
}

/// Why a pod cannot tell which passive ports are its own.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    /// The configuration splits the range per pod, but the pod's ordinal is unknown.
    #[error(
        "the passive range is split between {0} pods but this pod's ordinal is unknown \
         (set SLUICE_POD_NAME to the pod name, which ends in -ORDINAL)"
    )]
    UnknownOrdinal(usize),
    /// The pod's ordinal has no share of the range (the server was scaled down and this
    /// pod is about to be removed, or the configuration is older than the scale-up).
    #[error("pod ordinal {ordinal} has no passive sub-range (the range is split {count} ways)")]
    NoShare {
        /// The pod's ordinal.
        ordinal: usize,
        /// Number of shares.
        count: usize,
    },
}

impl FtpsSettings {
    /// The settings pod `ordinal` serves: all of them for a single pod, or with its own
    /// passive sub-range and address when the range is split between pods.
    pub fn for_replica(&self, ordinal: Option<usize>) -> Result<FtpsSettings, ReplicaError> {
        if self.replicas.is_empty() {
            return Ok(self.clone());
        }
        let ordinal = ordinal.ok_or(ReplicaError::UnknownOrdinal(self.replicas.len()))?;
        let share = self.replicas.get(ordinal).ok_or(ReplicaError::NoShare {
            ordinal,
            count: self.replicas.len(),
        })?;
        Ok(FtpsSettings {
            passive_ports: share.passive_ports,
            passive_address: share
                .passive_address
                .clone()
                .or_else(|| self.passive_address.clone()),
            replicas: Vec::new(),
            ..self.clone()
        })
    }
}

/// The ordinal of a StatefulSet pod from its name (`NAME-gateway-3` is 3).
pub fn ordinal_of_pod(pod_name: &str) -> Option<usize> {
    let (_, digits) = pod_name.rsplit_once('-')?;
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if canonical { digits.parse().ok() } else { None }
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
        assert!(config.sftp);
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

    fn split_settings() -> FtpsSettings {
        let share = |first, address: Option<&str>| ReplicaPassive {
            passive_ports: PassivePorts { first, count: 8 },
            passive_address: address.map(String::from),
        };
        FtpsSettings {
            explicit: true,
            implicit: false,
            passive_ports: PassivePorts {
                first: 30000,
                count: 16,
            },
            passive_address: Some("203.0.113.9".into()),
            allow_plaintext: false,
            session_reuse: SessionReuse::Allow,
            min_tls_version: TlsVersion::V1_2,
            epsv: true,
            replicas: vec![share(30000, None), share(30008, Some("198.51.100.2"))],
        }
    }

    #[test]
    fn each_pod_serves_its_own_share_of_a_split_range() {
        let settings = split_settings();
        let first = settings.for_replica(Some(0)).unwrap();
        assert_eq!(
            first.passive_ports,
            PassivePorts {
                first: 30000,
                count: 8
            }
        );
        assert_eq!(first.passive_address.as_deref(), Some("203.0.113.9"));
        assert!(first.replicas.is_empty());
        let second = settings.for_replica(Some(1)).unwrap();
        assert_eq!(
            second.passive_ports,
            PassivePorts {
                first: 30008,
                count: 8
            }
        );
        assert_eq!(second.passive_address.as_deref(), Some("198.51.100.2"));
    }

    #[test]
    fn a_pod_without_a_share_or_an_ordinal_is_refused() {
        let settings = split_settings();
        assert_eq!(
            settings.for_replica(Some(2)),
            Err(ReplicaError::NoShare {
                ordinal: 2,
                count: 2
            })
        );
        assert_eq!(
            settings.for_replica(None),
            Err(ReplicaError::UnknownOrdinal(2))
        );
        let single = FtpsSettings {
            replicas: Vec::new(),
            ..settings
        };
        assert_eq!(single.for_replica(None).unwrap(), single);
    }

    #[test]
    fn pod_ordinals_come_from_the_last_dash_separated_number() {
        assert_eq!(ordinal_of_pod("files-gateway-0"), Some(0));
        assert_eq!(ordinal_of_pod("files-gateway-12"), Some(12));
        assert_eq!(ordinal_of_pod("files-gateway-012"), None);
        assert_eq!(ordinal_of_pod("files-gateway-7d9f8"), None);
        assert_eq!(ordinal_of_pod("files-gateway-"), None);
        assert_eq!(ordinal_of_pod("gateway"), None);
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
