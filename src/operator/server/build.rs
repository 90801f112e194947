//! Build: the objects a TransferServer owns, as pure functions of validated input.
//!
//! Needs no client and no clock. The same inputs give byte-identical objects (maps are
//! ordered, users sorted, password salts derived rather than random), so a resync or an
//! operator restart applies exactly what is already there and writes nothing.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, KeyToPath,
    NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Service,
    ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use super::host_keys::HostKeyMaterial;
use super::names;
use super::passwords::PasswordHashes;
use super::validate::{ValidServer, ValidUser};
use crate::api::{ServiceType, TransferServer};
use crate::gateway::config::{CONFIG_KEY, GatewayConfig, GatewayUser, ResidencyStamp};

/// Port the gateway container listens on for SFTP (unprivileged, so it runs as non-root).
pub const SFTP_CONTAINER_PORT: i32 = 2222;
/// SFTP port of the Service unless the spec names one.
pub const DEFAULT_SFTP_PORT: i32 = 22;
/// Where the host-key Secret is mounted.
pub const HOST_KEYS_DIR: &str = "/etc/sluice/host-keys";
/// Where the gateway-config Secret is mounted.
pub const CONFIG_DIR: &str = "/etc/sluice/config";
/// Where the storage volume is mounted.
pub const DATA_DIR: &str = "/var/lib/sluice/data";
/// UID and GID the gateway runs as.
const GATEWAY_UID: i64 = 65532;

impl GatewayObjects {
    /// Size of the rendered gateway configuration in bytes.
    pub fn config_size(&self) -> usize {
        self.config
            .data
            .iter()
            .flatten()
            .map(|(_, v)| v.0.len())
            .sum()
    }
}

/// Everything a TransferServer owns. Apply destructures this without `..`, so adding an
/// object here fails to compile until it is applied.
pub struct GatewayObjects {
    /// SSH host keys and the password-salt seed.
    pub host_keys: Secret,
    /// The rendered [`GatewayConfig`].
    pub config: Secret,
    /// The storage volume claim.
    pub volume_claim: PersistentVolumeClaim,
    /// The gateway pods.
    pub deployment: Deployment,
    /// The SFTP Service.
    pub service: Service,
}

/// Operator-wide settings that shape the objects.
pub struct BuildSettings<'a> {
    /// Gateway container image.
    pub image: &'a str,
    /// Memo of password hashes; it never changes a result, only saves recomputing one.
    pub hashes: &'a PasswordHashes,
}

/// Largest rendered gateway configuration. Secrets are limited to 1 MiB in total; the
/// margin leaves room for metadata.
pub const MAX_CONFIG_BYTES: usize = 900 * 1024;

/// Builds every owned object of a validated server.
pub fn build(
    valid: &ValidServer,
    keys: &HostKeyMaterial,
    settings: &BuildSettings,
) -> GatewayObjects {
    let server = &valid.server;
    GatewayObjects {
        host_keys: build_host_keys(server, keys),
        config: build_config_secret(valid, keys, settings.hashes),
        volume_claim: build_volume_claim(server),
        deployment: build_deployment(server, &valid.verdict.region_label, settings),
        service: build_service(server),
    }
}

/// Metadata of an owned object: name, namespace, labels and a controller reference.
fn owned_meta(server: &TransferServer, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: server.namespace(),
        labels: Some(names::labels(&server.name_any())),
        owner_references: Some(vec![owner_reference(server)]),
        ..ObjectMeta::default()
    }
}

fn owner_reference(server: &TransferServer) -> OwnerReference {
    OwnerReference {
        api_version: TransferServer::api_version(&()).into_owned(),
        kind: TransferServer::kind(&()).into_owned(),
        name: server.name_any(),
        uid: server.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

pub(super) fn build_host_keys(server: &TransferServer, keys: &HostKeyMaterial) -> Secret {
    Secret {
        metadata: owned_meta(server, names::host_keys(&server.name_any())),
        type_: Some("Opaque".into()),
        data: Some(keys.to_secret_data()),
        ..Secret::default()
    }
}

fn build_config_secret(
    valid: &ValidServer,
    keys: &HostKeyMaterial,
    hashes: &PasswordHashes,
) -> Secret {
    let json = serde_json::to_vec_pretty(&gateway_config(valid, keys, hashes))
        .expect("the gateway configuration serialises to JSON");
    Secret {
        metadata: owned_meta(
            &valid.server,
            names::gateway_config(&valid.server.name_any()),
        ),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), ByteString(json))])),
        ..Secret::default()
    }
}

/// The configuration the gateway reads: users with salted hashes, and the verdict.
pub fn gateway_config(
    valid: &ValidServer,
    keys: &HostKeyMaterial,
    hashes: &PasswordHashes,
) -> GatewayConfig {
    let server = &valid.server;
    GatewayConfig {
        server: format!(
            "{}/{}",
            server.namespace().unwrap_or_default(),
            server.name_any()
        ),
        region: server.spec.region.clone(),
        residency: ResidencyStamp {
            compliant: valid.verdict.compliant(),
            policies: valid.verdict.governing.clone(),
            allowed_regions: valid.verdict.allowed_regions.clone(),
        },
        users: valid
            .users
            .iter()
            .map(|u| gateway_user(u, keys, hashes))
            .collect(),
        ftps: None,
    }
}

fn gateway_user(user: &ValidUser, keys: &HostKeyMaterial, hashes: &PasswordHashes) -> GatewayUser {
    let password_hash = user
        .password
        .as_ref()
        .map(|password| hashes.hash(keys, &user.uid, password));
    GatewayUser {
        name: user.name.clone(),
        password_hash,
        public_keys: user.public_keys.clone(),
        home: user.home.clone(),
        permissions: user.permissions.clone(),
    }
}

fn build_volume_claim(server: &TransferServer) -> PersistentVolumeClaim {
    let volume = server.spec.storage.volume.as_ref();
    let access_mode = volume
        .and_then(|v| v.access_mode.clone())
        .unwrap_or_else(|| default_access_mode(server).to_string());
    PersistentVolumeClaim {
        metadata: owned_meta(server, names::volume_claim(&server.name_any())),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![access_mode]),
            storage_class_name: volume.map(|v| v.storage_class_name.clone()),
            resources: Some(VolumeResourceRequirements {
                requests: volume
                    .map(|v| BTreeMap::from([("storage".to_string(), Quantity(v.size.clone()))])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

fn replicas(server: &TransferServer) -> i32 {
    server.spec.replicas.unwrap_or(1)
}

fn default_access_mode(server: &TransferServer) -> &'static str {
    if replicas(server) > 1 {
        "ReadWriteMany"
    } else {
        "ReadWriteOnce"
    }
}

fn build_deployment(
    server: &TransferServer,
    region_label: &str,
    settings: &BuildSettings,
) -> Deployment {
    let name = server.name_any();
    let single_writer = build_volume_claim(server)
        .spec
        .and_then(|s| s.access_modes)
        .is_some_and(|modes| {
            modes
                .iter()
                .any(|m| m == "ReadWriteOnce" || m == "ReadWriteOncePod")
        });
    // A ReadWriteOnce volume cannot be attached to an old and a new pod at once, so a
    // rolling update would wait forever; replace the pod instead.
    let strategy = single_writer.then(|| DeploymentStrategy {
        type_: Some("Recreate".into()),
        rolling_update: None,
    });
    Deployment {
        metadata: owned_meta(server, names::deployment(&name)),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas(server)),
            selector: LabelSelector {
                match_labels: Some(names::selector_labels(&name)),
                match_expressions: None,
            },
            strategy,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(names::labels(&name)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(server, region_label, settings)),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

fn pod_spec(server: &TransferServer, region_label: &str, settings: &BuildSettings) -> PodSpec {
    let name = server.name_any();
    PodSpec {
        affinity: Some(region_affinity(region_label, &server.spec.region)),
        automount_service_account_token: Some(false),
        containers: vec![gateway_container(settings)],
        enable_service_links: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(GATEWAY_UID),
            run_as_group: Some(GATEWAY_UID),
            fs_group: Some(GATEWAY_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..PodSecurityContext::default()
        }),
        volumes: Some(vec![
            secret_volume("host-keys", names::host_keys(&name), host_key_items()),
            secret_volume("config", names::gateway_config(&name), None),
            Volume {
                name: "data".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: names::volume_claim(&name),
                    read_only: None,
                }),
                ..Volume::default()
            },
            Volume {
                name: "tmp".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
        ]),
        ..PodSpec::default()
    }
}

/// Pods may run only on nodes whose region label has the server's region.
fn region_affinity(label: &str, region: &str) -> Affinity {
    let term = NodeSelectorTerm {
        match_expressions: Some(vec![NodeSelectorRequirement {
            key: label.to_string(),
            operator: "In".into(),
            values: Some(vec![region.to_string()]),
        }]),
        match_fields: None,
    };
    Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![term],
            }),
            preferred_during_scheduling_ignored_during_execution: None,
        }),
        ..Affinity::default()
    }
}

/// Only the key files are mounted; the salt seed stays in the Secret.
fn host_key_items() -> Option<Vec<KeyToPath>> {
    let files = [
        "ssh_host_ecdsa_key",
        "ssh_host_ed25519_key",
        "ssh_host_rsa_key",
    ];
    Some(
        files
            .iter()
            .map(|f| KeyToPath {
                key: f.to_string(),
                path: f.to_string(),
                mode: None,
            })
            .collect(),
    )
}

fn secret_volume(volume: &str, secret: String, items: Option<Vec<KeyToPath>>) -> Volume {
    Volume {
        name: volume.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            default_mode: Some(0o440),
            items,
            optional: None,
        }),
        ..Volume::default()
    }
}

fn gateway_container(settings: &BuildSettings) -> Container {
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    };
    let probe = Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String("sftp".into()),
            host: None,
        }),
        period_seconds: Some(10),
        ..Probe::default()
    };
    Container {
        name: "gateway".into(),
        image: Some(settings.image.to_string()),
        command: Some(vec!["sluice".into()]),
        args: Some(
            [
                "gateway",
                "--config",
                &format!("{CONFIG_DIR}/{CONFIG_KEY}"),
                "--host-keys",
                HOST_KEYS_DIR,
                "--data-dir",
                DATA_DIR,
                "--sftp-listen",
                &format!("0.0.0.0:{SFTP_CONTAINER_PORT}"),
            ]
            .map(String::from)
            .to_vec(),
        ),
        env: Some(vec![
            EnvVar {
                name: "RUST_LOG".into(),
                value: Some("info".into()),
                value_from: None,
            },
            EnvVar {
                name: "SLUICE_LOG_FORMAT".into(),
                value: Some("json".into()),
                value_from: None,
            },
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("sftp".into()),
            container_port: SFTP_CONTAINER_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(probe.clone()),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(10),
            ..probe
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            mount("host-keys", HOST_KEYS_DIR, true),
            mount("config", CONFIG_DIR, true),
            mount("data", DATA_DIR, false),
            mount("tmp", "/tmp", false),
        ]),
        ..Container::default()
    }
}

/// The SFTP port the Service exposes.
pub fn sftp_port(server: &TransferServer) -> i32 {
    server
        .spec
        .protocols
        .sftp
        .as_ref()
        .and_then(|s| s.port)
        .unwrap_or(DEFAULT_SFTP_PORT)
}

fn build_service(server: &TransferServer) -> Service {
    let name = server.name_any();
    let type_ = server
        .spec
        .service
        .as_ref()
        .and_then(|s| s.type_)
        .unwrap_or(ServiceType::ClusterIP);
    Service {
        metadata: owned_meta(server, names::service(&name)),
        spec: Some(ServiceSpec {
            type_: Some(type_.as_str().into()),
            selector: Some(names::selector_labels(&name)),
            ports: Some(vec![ServicePort {
                name: Some("sftp".into()),
                port: sftp_port(server),
                target_port: Some(IntOrString::String("sftp".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}
