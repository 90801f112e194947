//! FTPS exposure: which ports a server's pods and Services carry, how the passive range
//! is shared between pods, what each pod announces in `PASV` replies, and the state of
//! the certificate.
//!
//! Pure: needs no client. The clock is an argument.
//!
//! # Why passive ports are split between pods
//!
//! An FTP data connection must reach the pod whose control connection announced it. A
//! Service balances each connection on its own, and kube-proxy's `ClientIP` affinity is
//! kept per Service port, so it cannot tie a data port to the control port's pod. Inside
//! the cluster this needs nothing: each pod announces its own address (the one the client
//! reached through the ClusterIP Service) and the client connects to the pod directly.
//! Behind a NodePort or LoadBalancer Service, where pod addresses are unreachable, the
//! range is split evenly between the StatefulSet's pods and each pod's share is exposed by
//! a Service of its own (`NAME-gateway-ORDINAL`, selecting that one pod): pod `i` announces
//! only ports of share `i`, which only pod `i`'s Service forwards.

use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Secret, Service};

use crate::api::{FtpsProtocol, ServiceType, TlsCertificateStatus, TransferServer};
use crate::gateway::config::{FtpsSettings, PassivePorts, ReplicaPassive};
use crate::gateway::ftps::tls::{CertificateInfo, TlsError, check_pair};

/// Container port of explicit FTPS (unprivileged, so the gateway runs as non-root).
pub const EXPLICIT_CONTAINER_PORT: i32 = 2121;
/// Container port of implicit FTPS.
pub const IMPLICIT_CONTAINER_PORT: i32 = 2990;
/// Explicit FTPS port of the Service unless the spec names one.
pub const DEFAULT_EXPLICIT_PORT: i32 = 21;
/// Implicit FTPS port of the Service unless the spec names one.
pub const DEFAULT_IMPLICIT_PORT: i32 = 990;
/// Passive range unless the spec names one.
pub const DEFAULT_PASSIVE_PORTS: PassivePorts = PassivePorts {
    first: 30000,
    count: 16,
};
/// Where the TLS Secret is mounted.
pub const TLS_DIR: &str = "/etc/sluice/tls";
/// Ports a NodePort Service may use unless the cluster was configured otherwise.
const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;

/// How a server's FTPS is exposed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FtpsPlan {
    /// Service port of explicit FTPS, if served.
    pub explicit_port: Option<i32>,
    /// Service port of implicit FTPS, if served.
    pub implicit_port: Option<i32>,
    /// The whole passive range; every pod's container exposes all of it.
    pub passive: PassivePorts,
    /// Each pod's share of the range, by ordinal; empty when the range is not split.
    pub shares: Vec<PassivePorts>,
    /// Whether passive Service ports take the same node port (NodePort Services).
    pub node_ports: bool,
}

impl FtpsPlan {
    /// Every passive port, in order.
    pub fn passive_ports(&self) -> impl Iterator<Item = u16> {
        ports_of(self.passive)
    }
}

/// Every port of `range`, in order.
pub fn ports_of(range: PassivePorts) -> impl Iterator<Item = u16> {
    (0..range.count).filter_map(move |i| range.first.checked_add(i))
}

/// The server's FTPS section, if it offers FTPS.
pub fn spec(server: &TransferServer) -> Option<&FtpsProtocol> {
    server.spec.protocols.ftps.as_ref()
}

/// The Service type of a server.
pub fn service_type(server: &TransferServer) -> ServiceType {
    server
        .spec
        .service
        .as_ref()
        .and_then(|s| s.type_)
        .unwrap_or(ServiceType::ClusterIP)
}

/// The server's FTPS exposure, or why it cannot be exposed as written. `None` when the
/// server does not offer FTPS.
pub fn plan(server: &TransferServer) -> Result<Option<FtpsPlan>, String> {
    let Some(ftps) = spec(server) else {
        return Ok(None);
    };
    let passive = match ftps.passive_ports {
        Some(range) => PassivePorts {
            first: u16::try_from(range.first).map_err(|_| "passivePorts.first is too large")?,
            count: u16::try_from(range.count).map_err(|_| "passivePorts.count is too large")?,
        },
        None => DEFAULT_PASSIVE_PORTS,
    };
    if passive.last().is_none() {
        return Err("passivePorts must end at or below port 65535".into());
    }
    check_ports(server, ftps, passive)?;
    let type_ = service_type(server);
    let shares = match splits_passive_range(server) {
        true => split(passive, u16::try_from(replicas(server)).unwrap_or(u16::MAX))?,
        false => Vec::new(),
    };
    let node_ports = type_ == ServiceType::NodePort;
    if node_ports {
        if ftps.passive_address.is_none() {
            return Err(
                "a NodePort Service needs ftps.passiveAddress: the node address \
                        clients reach, which PASV replies announce"
                    .into(),
            );
        }
        let last = passive.last().unwrap_or(passive.first);
        if !NODE_PORT_RANGE.contains(&passive.first) || !NODE_PORT_RANGE.contains(&last) {
            return Err(format!(
                "with a NodePort Service, passive ports are node ports and must lie within \
                 {}-{}; passivePorts is {}-{last}",
                NODE_PORT_RANGE.start(),
                NODE_PORT_RANGE.end(),
                passive.first
            ));
        }
    }
    Ok(Some(FtpsPlan {
        explicit_port: ftps
            .explicit
            .as_ref()
            .map(|p| p.port.unwrap_or(DEFAULT_EXPLICIT_PORT)),
        implicit_port: ftps
            .implicit
            .as_ref()
            .map(|p| p.port.unwrap_or(DEFAULT_IMPLICIT_PORT)),
        passive,
        shares,
        node_ports,
    }))
}

/// Container ports of the gateway's own listeners, which passive ports must avoid.
const LISTENER_PORTS: [i32; 4] = [
    crate::operator::server::build::SFTP_CONTAINER_PORT,
    EXPLICIT_CONTAINER_PORT,
    IMPLICIT_CONTAINER_PORT,
    crate::operator::server::build::HEALTH_CONTAINER_PORT,
];

/// Refuses ports that would collide: two control ports on one Service port, a control
/// port inside the passive range, or a passive port on one of the gateway's own
/// listening ports.
fn check_ports(
    server: &TransferServer,
    ftps: &FtpsProtocol,
    passive: PassivePorts,
) -> Result<(), String> {
    let sftp = server.spec.protocols.sftp.as_ref().map(|_| {
        (
            "sftp.port",
            crate::operator::server::build::sftp_port(server),
        )
    });
    let explicit = ftps.explicit.as_ref().map(|p| {
        let port = p.port.unwrap_or(DEFAULT_EXPLICIT_PORT);
        ("ftps.explicit.port", port)
    });
    let implicit = ftps.implicit.as_ref().map(|p| {
        let port = p.port.unwrap_or(DEFAULT_IMPLICIT_PORT);
        ("ftps.implicit.port", port)
    });
    let control: Vec<(&str, i32)> = [sftp, explicit, implicit].into_iter().flatten().collect();
    for (i, (name, port)) in control.iter().enumerate() {
        if let Some((other, _)) = control[..i].iter().find(|(_, p)| p == port) {
            return Err(format!("{other} and {name} are both {port}"));
        }
    }
    let last = i32::from(passive.last().unwrap_or(passive.first));
    let range = i32::from(passive.first)..=last;
    if let Some((name, port)) = control.iter().find(|(_, p)| range.contains(p)) {
        return Err(format!(
            "{name} {port} lies inside passivePorts ({}-{last})",
            passive.first
        ));
    }
    if let Some(port) = LISTENER_PORTS.iter().find(|p| range.contains(p)) {
        return Err(format!(
            "passivePorts ({}-{last}) must not include {port}: ports {}, {}, {} and {} are \
             the gateway's own listeners",
            passive.first,
            LISTENER_PORTS[0],
            LISTENER_PORTS[1],
            LISTENER_PORTS[2],
            LISTENER_PORTS[3]
        ));
    }
    Ok(())
}

/// Whether the server's passive range is split between its pods: FTPS with more than
/// one pod behind a NodePort or LoadBalancer Service.
pub fn splits_passive_range(server: &TransferServer) -> bool {
    spec(server).is_some() && replicas(server) > 1 && service_type(server) != ServiceType::ClusterIP
}

fn replicas(server: &TransferServer) -> usize {
    usize::try_from(server.spec.replicas.unwrap_or(1)).unwrap_or(0)
}

/// Splits `range` into `pods` equal shares; ports left over at the end go unused.
fn split(range: PassivePorts, pods: u16) -> Result<Vec<PassivePorts>, String> {
    let per_pod = range.count / pods;
    if per_pod == 0 {
        return Err(format!(
            "passivePorts.count ({}) must be at least replicas ({pods}): each pod needs \
             passive ports of its own behind a NodePort or LoadBalancer Service",
            range.count
        ));
    }
    Ok((0..pods)
        .map(|i| PassivePorts {
            first: range.first + i * per_pod,
            count: per_pod,
        })
        .collect())
}

/// The address a Service's load balancer was given, if any: its first IPv4 address, or
/// else its first DNS name (PASV replies carry IPv4 only, so an IPv6 address is no use).
pub fn load_balancer_address(service: Option<&Service>) -> Option<String> {
    let status = service?.status.as_ref()?;
    let ingress = status.load_balancer.as_ref()?.ingress.as_ref()?;
    let ipv4 = ingress
        .iter()
        .filter_map(|i| i.ip.as_deref())
        .find(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok());
    let hostname = || ingress.iter().find_map(|i| i.hostname.as_deref());
    ipv4.or_else(hostname).map(String::from)
}

/// The `ftps` section of the gateway configuration. `service` is the server's Service
/// and `pod_services` the per-pod Services by ordinal, as last read: with a
/// LoadBalancer Service and no fixed `passiveAddress`, each pod announces the address its
/// load balancer was given.
pub fn settings(
    server: &TransferServer,
    plan: &FtpsPlan,
    service: Option<&Service>,
    pod_services: &[Option<Service>],
) -> FtpsSettings {
    let ftps = spec(server).expect("a plan exists only for a server that offers FTPS");
    let load_balanced = service_type(server) == ServiceType::LoadBalancer;
    let announced = |service: Option<&Service>| match &ftps.passive_address {
        Some(fixed) => Some(fixed.clone()),
        None if load_balanced => load_balancer_address(service),
        None => None,
    };
    let replicas = plan
        .shares
        .iter()
        .enumerate()
        .map(|(i, share)| ReplicaPassive {
            passive_ports: *share,
            passive_address: announced(pod_services.get(i).and_then(Option::as_ref))
                .filter(|a| Some(a) != ftps.passive_address.as_ref()),
        })
        .collect();
    FtpsSettings {
        explicit: plan.explicit_port.is_some(),
        implicit: plan.implicit_port.is_some(),
        passive_ports: plan.passive,
        passive_address: match plan.shares.is_empty() {
            true => announced(service),
            false => ftps.passive_address.clone(),
        },
        allow_plaintext: ftps.allow_plaintext.unwrap_or(false),
        session_reuse: ftps.session_reuse.unwrap_or_default(),
        min_tls_version: ftps.min_tls_version.unwrap_or_default(),
        epsv: epsv_reaches_the_pod(server),
        replicas,
    }
}

/// Whether an EPSV data connection, which goes to the address the client reached the
/// control port on, lands on the pod that announced it: with one pod, or behind node
/// ports (each passive node port leads to the one pod whose share it is). With several
/// pods behind a ClusterIP or LoadBalancer address it could reach any pod, so EPSV is
/// refused there and clients fall back to PASV.
pub fn epsv_reaches_the_pod(server: &TransferServer) -> bool {
    replicas(server) <= 1 || service_type(server) == ServiceType::NodePort
}

/// Whether every pod has an address to announce: false while a LoadBalancer Service
/// (or, with split ranges, a pod's) waits for its address.
pub fn addresses_known(settings: &FtpsSettings, server: &TransferServer) -> bool {
    if service_type(server) != ServiceType::LoadBalancer {
        return true;
    }
    match settings.replicas.is_empty() {
        true => settings.passive_address.is_some(),
        false => settings
            .replicas
            .iter()
            .all(|r| r.passive_address.is_some() || settings.passive_address.is_some()),
    }
}

/// What the operator found in the TLS Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertificateState {
    /// A certificate within its validity period, with its key.
    Valid(CertificateInfo),
    /// The certificate has expired.
    Expired(CertificateInfo),
    /// The certificate's validity has not begun.
    NotYetValid(CertificateInfo),
    /// The Secret or one of its keys is missing.
    Missing(String),
    /// The certificate does not parse.
    Invalid(String),
}

impl CertificateState {
    /// What the status shows of the certificate, when one was parsed.
    pub fn status(&self) -> Option<TlsCertificateStatus> {
        let info = match self {
            Self::Valid(info) | Self::Expired(info) | Self::NotYetValid(info) => info,
            Self::Missing(_) | Self::Invalid(_) => return None,
        };
        Some(TlsCertificateStatus {
            not_after: info.not_after_rfc3339(),
            sha256: info.sha256_fingerprint.clone(),
        })
    }
}

/// Judges the TLS Secret named `name` (`secret` is `None` when it does not exist) at
/// `now`, as the gateway will: the key must belong to the certificate and the
/// certificate must be within its validity period. Messages name the Secret and what is
/// wrong, never any key material.
pub fn certificate_state(name: &str, secret: Option<&Secret>, now: SystemTime) -> CertificateState {
    let Some(secret) = secret else {
        return CertificateState::Missing(format!("TLS Secret {name} does not exist"));
    };
    let value = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .filter(|v| !v.0.is_empty())
    };
    let (Some(certificate), Some(key)) = (value("tls.crt"), value("tls.key")) else {
        return CertificateState::Missing(format!(
            "TLS Secret {name} needs non-empty tls.crt and tls.key"
        ));
    };
    match check_pair(&certificate.0, &key.0) {
        Ok(info) if info.is_expired_at(now) => CertificateState::Expired(info),
        Ok(info) if !info.is_valid_at(now) => CertificateState::NotYetValid(info),
        Ok(info) => CertificateState::Valid(info),
        Err(error @ (TlsError::NoKey | TlsError::Key(_))) => CertificateState::Invalid(format!(
            "tls.key in TLS Secret {name} is not a private key for tls.crt: {error}"
        )),
        Err(error) => CertificateState::Invalid(format!(
            "tls.crt in TLS Secret {name} cannot be used: {error}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
    use sha2::Digest;

    use super::*;

    fn server(replicas: i32, service: &str, ftps: serde_json::Value) -> TransferServer {
        let spec = serde_json::json!({
            "region": "cn-shanghai",
            "replicas": replicas,
            "protocols": {"ftps": ftps},
            "storage": {"volume": {"storageClassName": "ssd", "size": "1Gi"}},
            "service": {"type": service},
        });
        TransferServer::new("files", serde_json::from_value(spec).unwrap())
    }

    fn explicit() -> serde_json::Value {
        serde_json::json!({"explicit": {}, "tlsSecretRef": {"name": "files-tls"}})
    }

    fn with_lb(ip: &str) -> Service {
        Service {
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![LoadBalancerIngress {
                        ip: Some(ip.into()),
                        ..LoadBalancerIngress::default()
                    }]),
                }),
                conditions: None,
            }),
            ..Service::default()
        }
    }

    #[test]
    fn one_pod_serves_the_default_range_on_the_default_ports() {
        let plan = plan(&server(1, "ClusterIP", explicit())).unwrap().unwrap();
        assert_eq!(plan.explicit_port, Some(21));
        assert_eq!(plan.implicit_port, None);
        assert_eq!(plan.passive, DEFAULT_PASSIVE_PORTS);
        assert!(plan.shares.is_empty());
        assert_eq!(plan.passive_ports().count(), 16);
    }

    #[test]
    fn the_tls_policy_of_the_spec_reaches_the_gateway_with_safe_defaults() {
        let defaults = server(1, "ClusterIP", explicit());
        let exposure = plan(&defaults).unwrap().unwrap();
        let defaulted = settings(&defaults, &exposure, None, &[]);
        assert_eq!(defaulted.session_reuse, crate::api::SessionReuse::Allow);
        assert_eq!(defaulted.min_tls_version, crate::api::TlsVersion::V1_2);
        assert!(!defaulted.allow_plaintext);
        assert!(defaulted.explicit && !defaulted.implicit);

        let mut ftps = explicit();
        ftps["implicit"] = serde_json::json!({});
        ftps["sessionReuse"] = "Require".into();
        ftps["minTlsVersion"] = "1.3".into();
        ftps["allowPlaintext"] = true.into();
        let strict = server(1, "ClusterIP", ftps);
        let exposure = plan(&strict).unwrap().unwrap();
        let rendered = settings(&strict, &exposure, None, &[]);
        assert_eq!(rendered.session_reuse, crate::api::SessionReuse::Require);
        assert_eq!(rendered.min_tls_version, crate::api::TlsVersion::V1_3);
        assert!(rendered.allow_plaintext && rendered.implicit);
    }

    #[test]
    fn pods_inside_the_cluster_share_the_whole_range_and_announce_themselves() {
        let server = server(3, "ClusterIP", explicit());
        let plan = plan(&server).unwrap().unwrap();
        assert!(plan.shares.is_empty());
        let settings = settings(&server, &plan, None, &[]);
        assert_eq!(settings.passive_address, None);
        assert!(settings.replicas.is_empty());
        assert!(addresses_known(&settings, &server));
        assert!(
            !settings.epsv,
            "EPSV through the ClusterIP could reach another pod"
        );
    }

    #[test]
    fn epsv_is_offered_only_where_it_reaches_the_announcing_pod() {
        let epsv = |replicas, service| {
            let mut ftps = explicit();
            ftps["passiveAddress"] = "192.0.2.1".into();
            ftps["passivePorts"] = serde_json::json!({"first": 31000, "count": 8});
            let server = server(replicas, service, ftps);
            let plan = plan(&server).unwrap().unwrap();
            settings(&server, &plan, None, &[]).epsv
        };
        assert!(epsv(1, "ClusterIP"));
        assert!(epsv(1, "LoadBalancer"));
        assert!(epsv(2, "NodePort"));
        assert!(!epsv(2, "LoadBalancer"));
        assert!(!epsv(2, "ClusterIP"));
    }

    #[test]
    fn behind_a_load_balancer_each_pod_gets_a_share_and_its_own_address() {
        let mut ftps = explicit();
        ftps["passivePorts"] = serde_json::json!({"first": 31000, "count": 10});
        let server = server(3, "LoadBalancer", ftps);
        let plan = plan(&server).unwrap().unwrap();
        let firsts: Vec<u16> = plan.shares.iter().map(|s| s.first).collect();
        assert_eq!(firsts, [31000, 31003, 31006]);
        assert!(plan.shares.iter().all(|s| s.count == 3));

        let pods = [
            Some(with_lb("198.51.100.1")),
            None,
            Some(with_lb("198.51.100.3")),
        ];
        let settings = settings(&server, &plan, Some(&with_lb("198.51.100.9")), &pods);
        let addresses: Vec<Option<&str>> = settings
            .replicas
            .iter()
            .map(|r| r.passive_address.as_deref())
            .collect();
        assert_eq!(
            addresses,
            [Some("198.51.100.1"), None, Some("198.51.100.3")]
        );
        assert_eq!(settings.passive_address, None);
        assert!(
            !addresses_known(&settings, &server),
            "pod 1 has no address yet"
        );
    }

    #[test]
    fn a_load_balancers_ipv4_address_is_preferred_to_ipv6_and_names() {
        let mut service = with_lb("2001:db8::1");
        let mut add = |ip: Option<&str>, hostname: Option<&str>| {
            let status = service
                .status
                .as_mut()
                .and_then(|s| s.load_balancer.as_mut());
            let ingress = status.and_then(|lb| lb.ingress.as_mut()).unwrap();
            ingress.push(LoadBalancerIngress {
                ip: ip.map(String::from),
                hostname: hostname.map(String::from),
                ..LoadBalancerIngress::default()
            });
            load_balancer_address(Some(&service))
        };
        assert_eq!(
            add(None, Some("lb.example.com")).as_deref(),
            Some("lb.example.com")
        );
        assert_eq!(
            add(Some("198.51.100.4"), None).as_deref(),
            Some("198.51.100.4")
        );
    }

    #[test]
    fn a_fixed_passive_address_is_announced_by_every_pod() {
        let mut ftps = explicit();
        ftps["passiveAddress"] = "ftp.example.com".into();
        let server = server(2, "LoadBalancer", ftps);
        let plan = plan(&server).unwrap().unwrap();
        let settings = settings(&server, &plan, None, &[None, None]);
        assert_eq!(settings.passive_address.as_deref(), Some("ftp.example.com"));
        assert!(
            settings
                .replicas
                .iter()
                .all(|r| r.passive_address.is_none())
        );
        assert!(addresses_known(&settings, &server));
    }

    #[test]
    fn a_single_load_balanced_pod_announces_the_services_address() {
        let server = server(1, "LoadBalancer", explicit());
        let plan = plan(&server).unwrap().unwrap();
        let pending = settings(&server, &plan, None, &[]);
        assert!(!addresses_known(&pending, &server));
        let assigned = settings(&server, &plan, Some(&with_lb("203.0.113.5")), &[]);
        assert_eq!(assigned.passive_address.as_deref(), Some("203.0.113.5"));
        assert!(addresses_known(&assigned, &server));
    }

    #[test]
    fn node_ports_need_an_address_and_ports_in_the_node_port_range() {
        let mut ftps = explicit();
        let refused = plan(&server(1, "NodePort", ftps.clone())).unwrap_err();
        assert!(refused.contains("passiveAddress"), "{refused}");

        ftps["passiveAddress"] = "192.0.2.10".into();
        ftps["passivePorts"] = serde_json::json!({"first": 20000, "count": 4});
        let refused = plan(&server(1, "NodePort", ftps.clone())).unwrap_err();
        assert!(refused.contains("30000-32767"), "{refused}");

        ftps["passivePorts"] = serde_json::json!({"first": 32000, "count": 4});
        let plan = plan(&server(2, "NodePort", ftps)).unwrap().unwrap();
        assert!(plan.node_ports);
        assert_eq!(plan.shares.len(), 2);
    }

    #[test]
    fn colliding_ports_are_refused_with_the_fields_that_collide() {
        let refused = |sftp: Option<i32>, ftps: serde_json::Value| {
            let mut server = server(1, "ClusterIP", ftps);
            if let Some(port) = sftp {
                server.spec.protocols.sftp = Some(crate::api::SftpProtocol { port: Some(port) });
            }
            plan(&server).unwrap_err()
        };
        let secret = serde_json::json!({"name": "files-tls"});
        let message = refused(
            Some(21),
            serde_json::json!({"explicit": {}, "tlsSecretRef": secret}),
        );
        assert_eq!(message, "sftp.port and ftps.explicit.port are both 21");
        let both = serde_json::json!({
            "explicit": {"port": 990}, "implicit": {}, "tlsSecretRef": secret,
        });
        assert_eq!(
            refused(None, both),
            "ftps.explicit.port and ftps.implicit.port are both 990"
        );
        let inside = serde_json::json!({
            "implicit": {"port": 30003}, "tlsSecretRef": secret,
        });
        assert_eq!(
            refused(None, inside),
            "ftps.implicit.port 30003 lies inside passivePorts (30000-30015)"
        );
        let listeners = serde_json::json!({
            "explicit": {}, "tlsSecretRef": secret,
            "passivePorts": {"first": 2100, "count": 200},
        });
        assert!(refused(None, listeners).contains("must not include 2222"));
    }

    #[test]
    fn more_pods_than_passive_ports_is_refused() {
        let mut ftps = explicit();
        ftps["passivePorts"] = serde_json::json!({"first": 31000, "count": 2});
        let refused = plan(&server(3, "LoadBalancer", ftps)).unwrap_err();
        assert!(refused.contains("at least replicas (3)"), "{refused}");
    }

    fn tls_secret(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> (Secret, String) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let fingerprint = sha2::Sha256::digest(cert.der())
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        let data = [
            ("tls.crt", cert.pem().into_bytes()),
            ("tls.key", key.serialize_pem().into_bytes()),
        ]
        .map(|(k, v)| (k.to_string(), k8s_openapi::ByteString(v)));
        let secret = Secret {
            data: Some(data.into()),
            ..Secret::default()
        };
        (secret, fingerprint)
    }

    #[test]
    fn a_current_certificate_is_valid_with_its_expiry_and_fingerprint_and_later_expired() {
        let (secret, fingerprint) = tls_secret((2020, 1, 1), (2030, 6, 1));
        let before = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let state = certificate_state("t", Some(&secret), before);
        let CertificateState::Valid(_) = &state else {
            panic!("{state:?}");
        };
        let shown = state.status().unwrap();
        assert_eq!(shown.not_after, "2030-06-01T00:00:00Z");
        assert_eq!(shown.sha256, fingerprint);

        let after = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_950_000_000);
        let expired = certificate_state("t", Some(&secret), after);
        assert!(
            matches!(expired, CertificateState::Expired(_)),
            "{expired:?}"
        );
        assert_eq!(expired.status(), Some(shown));
    }

    #[test]
    fn a_key_of_another_certificate_or_a_validity_yet_to_begin_is_not_valid() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let (mut secret, _) = tls_secret((2020, 1, 1), (2030, 6, 1));
        let (other, _) = tls_secret((2020, 1, 1), (2030, 6, 1));
        let data = secret.data.as_mut().unwrap();
        let other_key = other.data.unwrap()["tls.key"].clone();
        data.insert("tls.key".into(), other_key.clone());
        let CertificateState::Invalid(message) = certificate_state("t", Some(&secret), now) else {
            panic!("a mismatched key must be invalid");
        };
        assert!(message.starts_with("tls.key in TLS Secret t"), "{message}");
        let key_pem = String::from_utf8(other_key.0).unwrap();
        let key_body = key_pem.lines().nth(1).unwrap();
        assert!(!message.contains(key_body), "{message}");

        let (early, _) = tls_secret((2029, 1, 1), (2030, 6, 1));
        let state = certificate_state("t", Some(&early), now);
        assert!(
            matches!(state, CertificateState::NotYetValid(_)),
            "{state:?}"
        );
        assert!(state.status().is_some());
    }

    #[test]
    fn a_missing_or_keyless_secret_is_missing_and_never_shows_key_material() {
        let now = SystemTime::now();
        assert_eq!(
            certificate_state("t", None, now),
            CertificateState::Missing("TLS Secret t does not exist".into())
        );
        let keyless = Secret {
            data: Some(
                [(
                    "tls.crt".to_string(),
                    k8s_openapi::ByteString(b"x".to_vec()),
                )]
                .into(),
            ),
            ..Secret::default()
        };
        assert!(matches!(
            certificate_state("t", Some(&keyless), now),
            CertificateState::Missing(_)
        ));
        let garbage = Secret {
            data: Some(
                [
                    (
                        "tls.crt".to_string(),
                        k8s_openapi::ByteString(b"x".to_vec()),
                    ),
                    (
                        "tls.key".to_string(),
                        k8s_openapi::ByteString(b"SECRET".to_vec()),
                    ),
                ]
                .into(),
            ),
            ..Secret::default()
        };
        let CertificateState::Invalid(message) = certificate_state("t", Some(&garbage), now) else {
            panic!("garbage must be invalid");
        };
        assert!(!message.contains("SECRET"), "{message}");
    }
}
