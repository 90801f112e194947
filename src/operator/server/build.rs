//! Build: the objects a TransferServer owns, as pure functions of validated input.
//!
//! Needs no client and no clock. The same inputs give byte-identical objects (maps are
//! ordered, users sorted, password salts derived rather than random), so a resync or an
//! operator restart applies exactly what is already there and writes nothing.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, LocalObjectReference, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource,
    SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use super::ftps::{self, EXPLICIT_CONTAINER_PORT, FtpsPlan, IMPLICIT_CONTAINER_PORT, TLS_DIR};
use super::host_keys::HostKeyMaterial;
use super::names;
use super::object_store::ObjectStorePlan;
use super::passwords::PasswordHashes;
use super::validate::{ValidServer, ValidUser};
use crate::api::{ObjectStoreProvider as Provider, ResourceAmounts, TransferServer, VolumeStorage};
use crate::gateway::config::{
    AuditSettings, CONFIG_KEY, CrossBorderStamp, GatewayConfig, GatewayUser, PassivePorts,
    ResidencyStamp,
};
use crate::residency::ResidencyVerdict;

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
/// Where the object store's credentials Secret is mounted.
pub const STORAGE_CREDENTIALS_DIR: &str = "/etc/sluice/storage-credentials";
/// UID and GID the gateway runs as.
const GATEWAY_UID: i64 = 65532;
/// Port of the gateway's HTTP health listener (`/healthz`, `/readyz`), which the probes
/// use so that they never touch, or show up in the logs of, the protocol ports.
pub const HEALTH_CONTAINER_PORT: i32 = 8081;
/// Seconds a stopping gateway lets running transfers finish, unless the spec says.
pub const DEFAULT_SHUTDOWN_GRACE_SECONDS: i32 = 60;
/// Seconds the kubelet waits beyond the gateway's own grace period before killing it:
/// time to disconnect what is still running and exit.
const TERMINATION_MARGIN_SECONDS: i64 = 10;
/// Memory limit of a gateway on a volume unless the spec says.
const DEFAULT_MEMORY_LIMIT: &str = "512Mi";
/// Memory limit of a gateway on an object store unless the spec says: the volume
/// gateway's 512 MiB plus the 768 MiB its uploads may buffer (32 × 24 MiB, see
/// `storage::object`).
const DEFAULT_OBJECT_STORE_MEMORY_LIMIT: &str = "1280Mi";

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
    /// The storage volume claim; none when files live in an object store.
    pub volume_claim: Option<PersistentVolumeClaim>,
    /// The gateway pods.
    pub statefulset: StatefulSet,
    /// The Service clients connect to.
    pub service: Service,
    /// One Service per pod for its share of the passive FTPS ports, by ordinal; empty
    /// unless the range is split between pods.
    pub pod_services: Vec<Service>,
    /// The gateway pods' egress NetworkPolicy; none when the spec turns it off.
    pub network_policy: Option<NetworkPolicy>,
    /// At most one gateway pod down at a time for voluntary disruptions (node drains);
    /// none with a single replica, where it could only block drains or do nothing.
    pub disruption_budget: Option<PodDisruptionBudget>,
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
        volume_claim: server
            .spec
            .storage
            .volume
            .as_ref()
            .map(|volume| build_volume_claim(server, volume)),
        statefulset: build_statefulset(valid, keys, settings),
        service: build_service(server, valid.ftps.as_ref()),
        pod_services: build_pod_services(server, valid.ftps.as_ref()),
        network_policy: build_network_policy(server, valid.object_store.as_ref()),
        disruption_budget: build_disruption_budget(server),
    }
}

/// `maxUnavailable: 1` over the gateway pods when there are several; pods that are not
/// ready may always be evicted, so a broken pod never blocks a node drain.
fn build_disruption_budget(server: &TransferServer) -> Option<PodDisruptionBudget> {
    if replicas(server) < 2 {
        return None;
    }
    let name = server.name_any();
    Some(PodDisruptionBudget {
        metadata: owned_meta(server, names::disruption_budget(&name)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(names::selector_labels(&name)),
                match_expressions: None,
            }),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            min_available: None,
        }),
        status: None,
    })
}

/// How long a stopping gateway lets running transfers finish.
pub fn shutdown_grace_seconds(server: &TransferServer) -> i32 {
    server
        .spec
        .shutdown_grace_period_seconds
        .unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECONDS)
        .max(0)
}

/// The container's requests and limits: the spec's as written, or the defaults.
fn container_resources(server: &TransferServer, object_store: bool) -> ResourceRequirements {
    let amounts = |amounts: Option<&ResourceAmounts>| {
        let amounts = amounts?;
        let map: BTreeMap<String, Quantity> = [
            ("cpu", &amounts.cpu),
            ("ephemeral-storage", &amounts.ephemeral_storage),
            ("memory", &amounts.memory),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name.to_string(), Quantity(value.clone()?))))
        .collect();
        (!map.is_empty()).then_some(map)
    };
    if let Some(resources) = &server.spec.resources {
        return ResourceRequirements {
            requests: amounts(resources.requests.as_ref()),
            limits: amounts(resources.limits.as_ref()),
            claims: None,
        };
    }
    let memory_limit = match object_store {
        true => DEFAULT_OBJECT_STORE_MEMORY_LIMIT,
        false => DEFAULT_MEMORY_LIMIT,
    };
    let quantity = |name: &str, value: &str| (name.to_string(), Quantity(value.into()));
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            quantity("cpu", "100m"),
            quantity("memory", "256Mi"),
        ])),
        limits: Some(BTreeMap::from([quantity("memory", memory_limit)])),
        claims: None,
    }
}

/// The namespace and pod labels of the cluster DNS (CoreDNS and kube-dns alike keep the
/// `k8s-app: kube-dns` label for compatibility).
const CLUSTER_DNS: [(&str, &str); 2] = [
    ("kubernetes.io/metadata.name", "kube-system"),
    ("k8s-app", "kube-dns"),
];

/// The egress NetworkPolicy of a server's gateway pods: DNS, and the object store's port
/// (inside its declared CIDRs, or anywhere but link-local addresses, where cloud metadata
/// services answer). Nothing else: gateways never call the Kubernetes API, and a volume
/// needs no network. `None` when the spec turns it off.
fn build_network_policy(
    server: &TransferServer,
    object_store: Option<&ObjectStorePlan>,
) -> Option<NetworkPolicy> {
    let settings = server.spec.network_policy.clone().unwrap_or_default();
    if settings.enabled == Some(false) {
        return None;
    }
    let tcp_udp = |port| {
        ["UDP", "TCP"].map(|protocol| NetworkPolicyPort {
            port: Some(IntOrString::Int(port)),
            protocol: Some(protocol.into()),
            end_port: None,
        })
    };
    let selector = |(key, value): (&str, &str)| LabelSelector {
        match_labels: Some(BTreeMap::from([(key.to_string(), value.to_string())])),
        match_expressions: None,
    };
    let cluster_dns = NetworkPolicyPeer {
        namespace_selector: Some(selector(CLUSTER_DNS[0])),
        pod_selector: Some(selector(CLUSTER_DNS[1])),
        ip_block: None,
    };
    let block = |cidr: &str, except: &[&str]| NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: cidr.to_string(),
            except: (!except.is_empty()).then(|| except.iter().map(|e| e.to_string()).collect()),
        }),
        ..NetworkPolicyPeer::default()
    };
    let dns = std::iter::once(cluster_dns)
        .chain(settings.dns_cidrs.iter().map(|c| block(c, &[])))
        .collect();
    let mut egress = vec![NetworkPolicyEgressRule {
        ports: Some(tcp_udp(53).to_vec()),
        to: Some(dns),
    }];
    if let Some(plan) = object_store {
        let declared = server
            .spec
            .storage
            .object_store
            .as_ref()
            .map(|s| s.endpoint_cidrs.as_slice())
            .unwrap_or_default();
        let to = if declared.is_empty() {
            vec![
                block("0.0.0.0/0", &["169.254.0.0/16"]),
                block("::/0", &["fe80::/10"]),
            ]
        } else {
            declared.iter().map(|c| block(c, &[])).collect()
        };
        egress.push(NetworkPolicyEgressRule {
            ports: Some(vec![NetworkPolicyPort {
                port: Some(IntOrString::Int(endpoint_port(&plan.config.endpoint))),
                protocol: Some("TCP".into()),
                end_port: None,
            }]),
            to: Some(to),
        });
    }
    Some(NetworkPolicy {
        metadata: owned_meta(server, names::network_policy(&server.name_any())),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(names::selector_labels(&server.name_any())),
                match_expressions: None,
            }),
            policy_types: Some(vec!["Egress".into()]),
            egress: Some(egress),
            ingress: None,
        }),
    })
}

/// The TCP port of an endpoint URL: the one it names, else 443 for `https`, 80 for
/// `http`.
fn endpoint_port(endpoint: &str) -> i32 {
    let (scheme, rest) = endpoint.split_once("://").unwrap_or(("https", endpoint));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let port = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once("]:").map(|(_, port)| port),
        None => authority.rsplit_once(':').map(|(_, port)| port),
    };
    let named = port.and_then(|p| p.parse().ok());
    named.unwrap_or(if scheme.eq_ignore_ascii_case("http") {
        80
    } else {
        443
    })
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
    config_secret(&valid.server, &gateway_config(valid, keys, hashes))
}

fn config_secret(server: &TransferServer, config: &GatewayConfig) -> Secret {
    let json =
        serde_json::to_vec_pretty(config).expect("the gateway configuration serialises to JSON");
    Secret {
        metadata: owned_meta(server, names::gateway_config(&server.name_any())),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), ByteString(json))])),
        ..Secret::default()
    }
}

/// The gateway-config Secret `rendered` with only its residency stamp replaced by
/// `stamp`, for a gateway whose server fell out of compliance: users, protocols and
/// storage stay as they were rolled out, since nothing new is rolled out to a server an
/// enforced policy refuses. `None` when the stamp is already `stamp`, or the rendered
/// configuration cannot be read (then there is no gateway that could take it either).
pub fn suspended_config(
    server: &TransferServer,
    rendered: &Secret,
    stamp: ResidencyStamp,
) -> Option<Secret> {
    let json = rendered.data.as_ref()?.get(CONFIG_KEY)?;
    let mut config: GatewayConfig = serde_json::from_slice(&json.0).ok()?;
    if config.residency == stamp {
        return None;
    }
    config.residency = stamp;
    Some(config_secret(server, &config))
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
        residency: residency_stamp(&valid.verdict, &server.spec.region),
        users: valid
            .users
            .iter()
            .map(|u| gateway_user(u, keys, hashes))
            .collect(),
        sftp: server.spec.protocols.sftp.is_some(),
        ftps: valid
            .ftps
            .as_ref()
            .map(|plan| ftps::settings(server, plan, valid.service.as_ref(), &valid.pod_services)),
        object_store: valid
            .object_store
            .as_ref()
            .map(|store| store.config.clone()),
        audit: AuditSettings {
            stdout: server
                .spec
                .audit_log
                .as_ref()
                .and_then(|a| a.stdout)
                .unwrap_or(false),
        },
    }
}

/// The residency decision as the gateway enforces it.
pub fn residency_stamp(verdict: &ResidencyVerdict, region: &str) -> ResidencyStamp {
    ResidencyStamp {
        compliant: verdict.compliant(),
        enforced: verdict.enforced,
        // Only an enforced policy's violation stops writes; an Audit one is reported.
        suspended: verdict.blocks_rollout(),
        policies: verdict.governing.clone(),
        violation: (!verdict.compliant()).then(|| verdict.message(region)),
        cross_border_transfers: verdict
            .allowances
            .iter()
            .map(|a| CrossBorderStamp {
                policy: a.policy.clone(),
                enforced: a.enforced,
                reference: a.reference.clone(),
                region: a.region.clone(),
                expires: a.expires.as_second(),
                max_bytes: a.max_bytes,
                max_individuals: a.max_individuals,
            })
            .collect(),
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

fn build_volume_claim(server: &TransferServer, volume: &VolumeStorage) -> PersistentVolumeClaim {
    let access_mode = volume
        .access_mode
        .clone()
        .unwrap_or_else(|| default_access_mode(server).to_string());
    PersistentVolumeClaim {
        metadata: owned_meta(server, names::volume_claim(&server.name_any())),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![access_mode]),
            storage_class_name: Some(volume.storage_class_name.clone()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(volume.size.clone()),
                )])),
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

fn build_statefulset(
    valid: &ValidServer,
    keys: &HostKeyMaterial,
    settings: &BuildSettings,
) -> StatefulSet {
    let server = &valid.server;
    let name = server.name_any();
    // Pods start and stop together rather than one by one; a rolling update still
    // replaces one pod at a time, deleting it before starting its successor, so a
    // ReadWriteOnce volume is never needed by two pods at once.
    StatefulSet {
        metadata: owned_meta(server, names::statefulset(&name)),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas(server)),
            selector: LabelSelector {
                match_labels: Some(names::selector_labels(&name)),
                match_expressions: None,
            },
            service_name: Some(names::service(&name)),
            pod_management_policy: Some("Parallel".into()),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels(server, valid.object_store.as_ref())),
                    annotations: pod_annotations(server, storage_revision(valid, keys)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(valid, settings)),
            },
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

/// The pod's annotations: the spec's, then Sluice's own, which win.
fn pod_annotations(
    server: &TransferServer,
    storage_revision: Option<String>,
) -> Option<BTreeMap<String, String>> {
    let mut annotations = pod_settings(server).annotations;
    annotations.retain(|key, _| !key.starts_with("sluice.dev/"));
    if let Some(revision) = storage_revision {
        annotations.insert(STORAGE_REVISION.into(), revision);
    }
    (!annotations.is_empty()).then_some(annotations)
}

/// `spec.pod`, or its defaults.
fn pod_settings(server: &TransferServer) -> crate::api::GatewayPod {
    server.spec.pod.clone().unwrap_or_default()
}

/// Pod annotation that changes whenever the object store or its credentials do.
pub const STORAGE_REVISION: &str = "sluice.dev/storage-revision";

/// A digest of the object store's configuration and its credentials Secret, keyed with
/// the server's salt seed so it reveals nothing about the credentials. The gateway opens
/// its store once, at start, so the pods must be replaced when either changes (a rotated
/// key, another bucket); as a pod-template annotation the digest makes the StatefulSet
/// roll them. `None` for a volume.
fn storage_revision(valid: &ValidServer, keys: &HostKeyMaterial) -> Option<String> {
    use hmac::{Hmac, Mac};
    use sha2::Sha256;
    let store = valid.object_store.as_ref()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&keys.salt_seed).expect("HMAC takes any key");
    mac.update(&serde_json::to_vec(&store.config).expect("the store configuration serialises"));
    let secret = valid.storage_secret.as_ref().and_then(Option::as_ref);
    for (key, value) in secret.and_then(|s| s.data.as_ref()).into_iter().flatten() {
        mac.update(&(key.len() as u64).to_be_bytes());
        mac.update(key.as_bytes());
        mac.update(&(value.0.len() as u64).to_be_bytes());
        mac.update(&value.0);
    }
    let digest = mac.finalize().into_bytes();
    Some(digest[..12].iter().map(|b| format!("{b:02x}")).collect())
}

/// The pod's labels: the server's, plus what a workload-identity webhook needs to act on
/// the pod (Microsoft Entra Workload ID injects its token only into labelled pods; the
/// EKS, GKE and Alibaba Cloud webhooks go by the ServiceAccount alone).
fn pod_labels(
    server: &TransferServer,
    object_store: Option<&ObjectStorePlan>,
) -> BTreeMap<String, String> {
    let mut labels = names::labels(&server.name_any());
    let azure_identity = object_store.is_some_and(|store| {
        store.config.workload_identity && store.config.provider == Provider::AzureBlob
    });
    if azure_identity {
        labels.insert("azure.workload.identity/use".into(), "true".into());
    }
    labels
}

fn pod_spec(valid: &ValidServer, settings: &BuildSettings) -> PodSpec {
    let server = &valid.server;
    let name = server.name_any();
    let region_labels = &valid.verdict.region_labels;
    let mut volumes = vec![
        secret_volume("host-keys", names::host_keys(&name), host_key_items()),
        secret_volume("config", names::gateway_config(&name), None),
    ];
    match &valid.object_store {
        None => volumes.push(Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: names::volume_claim(&name),
                read_only: None,
            }),
            ..Volume::default()
        }),
        Some(store) => {
            // Every key is mounted (items naming an optional key the Secret lacks, such
            // as sessionToken, would keep the pod from starting); the gateway reads only
            // the keys it knows.
            if let Some(secret) = &store.secret {
                volumes.push(secret_volume("storage-credentials", secret.clone(), None));
            }
        }
    }
    volumes.push(Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    });
    if let Some(tls) = ftps::spec(server) {
        // Optional, so a pod whose certificate is not issued yet still starts and serves
        // SFTP; the kubelet fills the volume in once the Secret appears.
        let mut volume = secret_volume("tls", tls.tls_secret_ref.name.clone(), tls_items());
        if let Some(secret) = volume.secret.as_mut() {
            secret.optional = Some(true);
        }
        volumes.push(volume);
    }
    let pod = pod_settings(server);
    let mut node_selector = pod.node_selector;
    // The region is pinned by the required affinity; a selector cannot loosen it.
    node_selector.retain(|key, _| !region_labels.contains(key));
    PodSpec {
        affinity: Some(region_affinity(region_labels, &server.spec.region)),
        image_pull_secrets: (!pod.image_pull_secrets.is_empty()).then(|| {
            pod.image_pull_secrets
                .iter()
                .map(|s| LocalObjectReference {
                    name: s.name.clone(),
                })
                .collect()
        }),
        tolerations: (!pod.tolerations.is_empty()).then_some(pod.tolerations),
        node_selector: (!node_selector.is_empty()).then_some(node_selector),
        priority_class_name: pod.priority_class_name,
        automount_service_account_token: Some(false),
        containers: vec![gateway_container(
            server,
            valid.ftps.as_ref(),
            valid.object_store.as_ref(),
            settings,
        )],
        service_account_name: valid
            .object_store
            .as_ref()
            .and_then(|store| store.service_account.clone()),
        enable_service_links: Some(false),
        termination_grace_period_seconds: Some(
            i64::from(shutdown_grace_seconds(server)) + TERMINATION_MARGIN_SECONDS,
        ),
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
        volumes: Some(volumes),
        ..PodSpec::default()
    }
}

/// Pods may run only on nodes whose region label has the server's region.
/// Required node affinity on the region under every label in `labels`: one term, so a
/// node must carry the region in all of them.
fn region_affinity(labels: &[String], region: &str) -> Affinity {
    let requirements = labels
        .iter()
        .map(|label| NodeSelectorRequirement {
            key: label.clone(),
            operator: "In".into(),
            values: Some(vec![region.to_string()]),
        })
        .collect();
    let term = NodeSelectorTerm {
        match_expressions: Some(requirements),
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
    items(&[
        "ssh_host_ecdsa_key",
        "ssh_host_ed25519_key",
        "ssh_host_rsa_key",
    ])
}

/// The certificate and key of a `kubernetes.io/tls` Secret, under their own names.
fn tls_items() -> Option<Vec<KeyToPath>> {
    items(&["tls.crt", "tls.key"])
}

/// Secret volume items mounting each key as a file of the same name.
fn items(keys: &[&str]) -> Option<Vec<KeyToPath>> {
    let item = |key: &&str| KeyToPath {
        key: key.to_string(),
        path: key.to_string(),
        mode: None,
    };
    Some(keys.iter().map(item).collect())
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

fn gateway_container(
    server: &TransferServer,
    ftps: Option<&FtpsPlan>,
    object_store: Option<&ObjectStorePlan>,
    settings: &BuildSettings,
) -> Container {
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    };
    let mut ports = container_ports(server, ftps);
    ports.push(ContainerPort {
        name: Some("health".into()),
        container_port: HEALTH_CONTAINER_PORT,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    });
    // Probes ask the health listener, never a protocol port, so they leave nothing in
    // the SFTP and FTPS logs or connection counts.
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("health".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    };
    let mut args = [
        "gateway",
        "--config",
        &format!("{CONFIG_DIR}/{CONFIG_KEY}"),
        "--host-keys",
        HOST_KEYS_DIR,
        "--sftp-listen",
        &format!("0.0.0.0:{SFTP_CONTAINER_PORT}"),
        "--health-listen",
        &format!("0.0.0.0:{HEALTH_CONTAINER_PORT}"),
        "--shutdown-grace",
        &shutdown_grace_seconds(server).to_string(),
    ]
    .map(String::from)
    .to_vec();
    let mut mounts = vec![
        mount("host-keys", HOST_KEYS_DIR, true),
        mount("config", CONFIG_DIR, true),
    ];
    match object_store {
        None => {
            args.extend(["--data-dir".into(), DATA_DIR.into()]);
            mounts.push(mount("data", DATA_DIR, false));
        }
        Some(store) if store.secret.is_some() => {
            args.extend([
                "--storage-credentials".into(),
                STORAGE_CREDENTIALS_DIR.into(),
            ]);
            mounts.push(mount("storage-credentials", STORAGE_CREDENTIALS_DIR, true));
        }
        Some(_) => {}
    }
    mounts.push(mount("tmp", "/tmp", false));
    if ftps.is_some() {
        args.extend([
            "--ftps-listen".into(),
            format!("0.0.0.0:{EXPLICIT_CONTAINER_PORT}"),
            "--ftps-implicit-listen".into(),
            format!("0.0.0.0:{IMPLICIT_CONTAINER_PORT}"),
            "--tls-dir".into(),
            TLS_DIR.into(),
        ]);
        mounts.push(mount("tls", TLS_DIR, true));
    }
    let env = |name: &str, value: &str| EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    };
    Container {
        name: "gateway".into(),
        image: Some(settings.image.to_string()),
        command: Some(vec!["sluice".into()]),
        args: Some(args),
        // No RUST_LOG: the gateway's default filter keeps russh's and libunftp's chatter
        // out of the log, which a plain `info` would let in.
        env: Some(vec![
            env("SLUICE_LOG_FORMAT", "json"),
            EnvVar {
                name: "SLUICE_POD_NAME".into(),
                value: None,
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        api_version: None,
                        field_path: "metadata.name".into(),
                    }),
                    ..EnvVarSource::default()
                }),
            },
        ]),
        ports: Some(ports),
        readiness_probe: Some(probe("/readyz", 5)),
        liveness_probe: Some(probe("/healthz", 10)),
        resources: Some(container_resources(server, object_store.is_some())),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    }
}

/// The container's ports: one per enabled control port, then every passive port (a
/// pod binds only its share, but exposing the whole range keeps the pods identical).
fn container_ports(server: &TransferServer, ftps: Option<&FtpsPlan>) -> Vec<ContainerPort> {
    let port = |name: String, container_port: i32| ContainerPort {
        name: Some(name),
        container_port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let mut ports = Vec::new();
    if server.spec.protocols.sftp.is_some() {
        ports.push(port("sftp".into(), SFTP_CONTAINER_PORT));
    }
    if let Some(plan) = ftps {
        if plan.explicit_port.is_some() {
            ports.push(port("ftps".into(), EXPLICIT_CONTAINER_PORT));
        }
        if plan.implicit_port.is_some() {
            ports.push(port("ftps-implicit".into(), IMPLICIT_CONTAINER_PORT));
        }
        ports.extend(
            plan.passive_ports()
                .map(|p| port(passive_port_name(p), i32::from(p))),
        );
    }
    ports
}

/// Name of a passive port on containers and Services (at most 15 characters).
fn passive_port_name(port: u16) -> String {
    format!("pasv-{port}")
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

fn service_port(name: &str, port: i32, target: &str) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(target.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

/// Passive ports of `range` as Service ports; on a NodePort Service each is also the
/// node port, because PASV replies announce the port clients must connect to.
fn passive_service_ports(plan: &FtpsPlan, range: PassivePorts) -> Vec<ServicePort> {
    ftps::ports_of(range)
        .map(|p| ServicePort {
            node_port: plan.node_ports.then_some(i32::from(p)),
            ..service_port(&passive_port_name(p), i32::from(p), &passive_port_name(p))
        })
        .collect()
}

/// The Service clients connect to: every control port, and the passive ports unless each
/// pod's share has a Service of its own.
fn build_service(server: &TransferServer, ftps: Option<&FtpsPlan>) -> Service {
    let name = server.name_any();
    let mut ports = Vec::new();
    if server.spec.protocols.sftp.is_some() {
        ports.push(service_port("sftp", sftp_port(server), "sftp"));
    }
    if let Some(plan) = ftps {
        if let Some(port) = plan.explicit_port {
            ports.push(service_port("ftps", port, "ftps"));
        }
        if let Some(port) = plan.implicit_port {
            ports.push(service_port("ftps-implicit", port, "ftps-implicit"));
        }
        if plan.shares.is_empty() {
            ports.extend(passive_service_ports(plan, plan.passive));
        }
    }
    Service {
        metadata: owned_meta(server, names::service(&name)),
        spec: Some(ServiceSpec {
            type_: Some(ftps::service_type(server).as_str().into()),
            selector: Some(names::selector_labels(&name)),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// One Service per pod, selecting that pod by name, for its share of the passive ports.
fn build_pod_services(server: &TransferServer, ftps: Option<&FtpsPlan>) -> Vec<Service> {
    let Some(plan) = ftps else {
        return Vec::new();
    };
    let name = server.name_any();
    plan.shares
        .iter()
        .enumerate()
        .map(|(ordinal, share)| {
            let pod = names::pod(&name, ordinal);
            let mut selector = names::selector_labels(&name);
            selector.insert(names::POD_NAME_LABEL.into(), pod.clone());
            Service {
                metadata: owned_meta(server, pod),
                spec: Some(ServiceSpec {
                    type_: Some(ftps::service_type(server).as_str().into()),
                    selector: Some(selector),
                    ports: Some(passive_service_ports(plan, *share)),
                    ..ServiceSpec::default()
                }),
                status: None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(replicas: i32, service: &str, sftp: bool) -> TransferServer {
        let mut protocols = serde_json::json!({"ftps": {
            "explicit": {"port": 2100},
            "tlsSecretRef": {"name": "files-tls"},
            "passiveAddress": "192.0.2.7",
            "passivePorts": {"first": 31000, "count": 4},
        }});
        if sftp {
            protocols["sftp"] = serde_json::json!({});
        }
        let spec = serde_json::json!({
            "region": "cn-shanghai",
            "replicas": replicas,
            "protocols": protocols,
            "storage": {"volume": {"storageClassName": "ssd", "size": "1Gi"}},
            "service": {"type": service},
        });
        let mut server = TransferServer::new("files", serde_json::from_value(spec).unwrap());
        server.metadata.namespace = Some("ns".into());
        server
    }

    fn port_names(service: &Service) -> Vec<(String, i32, Option<i32>)> {
        let ports = service.spec.as_ref().and_then(|s| s.ports.clone());
        ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.name.unwrap_or_default(), p.port, p.node_port))
            .collect()
    }

    #[test]
    fn an_ftps_only_server_exposes_no_sftp_port_and_probes_only_the_health_port() {
        let server = server(1, "ClusterIP", false);
        let plan = ftps::plan(&server).unwrap();
        let ports = container_ports(&server, plan.as_ref());
        let names: Vec<&str> = ports.iter().filter_map(|p| p.name.as_deref()).collect();
        assert_eq!(
            names,
            [
                "ftps",
                "pasv-31000",
                "pasv-31001",
                "pasv-31002",
                "pasv-31003"
            ]
        );
        let settings = BuildSettings {
            image: "sluice",
            hashes: &PasswordHashes::default(),
        };
        let container = gateway_container(&server, plan.as_ref(), None, &settings);
        let health = container.ports.as_ref().unwrap().last().cloned().unwrap();
        assert_eq!(health.name.as_deref(), Some("health"));
        assert_eq!(health.container_port, HEALTH_CONTAINER_PORT);
        for (probe, path) in [
            (container.readiness_probe.clone(), "/readyz"),
            (container.liveness_probe.clone(), "/healthz"),
        ] {
            let probe = probe.unwrap();
            assert!(probe.tcp_socket.is_none() && probe.exec.is_none());
            let get = probe.http_get.unwrap();
            assert_eq!(get.port, IntOrString::String("health".into()));
            assert_eq!(get.path.as_deref(), Some(path));
        }
        let args = container.args.unwrap();
        assert!(
            args.windows(2).any(|w| w == ["--tls-dir", TLS_DIR]),
            "{args:?}"
        );
        assert!(
            args.windows(2)
                .any(|w| w == ["--health-listen", "0.0.0.0:8081"]),
            "{args:?}"
        );
        assert_eq!(
            port_names(&build_service(&server, plan.as_ref()))[0],
            ("ftps".into(), 2100, None)
        );
    }

    fn quantities(map: &Option<BTreeMap<String, Quantity>>) -> Vec<(String, String)> {
        map.iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect()
    }

    #[test]
    fn resources_default_by_storage_and_are_taken_as_written_when_given() {
        let volume = server(1, "ClusterIP", true);
        let defaults = container_resources(&volume, false);
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            quantities(&defaults.requests),
            [pair("cpu", "100m"), pair("memory", "256Mi")]
        );
        assert_eq!(quantities(&defaults.limits), [pair("memory", "512Mi")]);
        let bucket = container_resources(&volume, true);
        assert_eq!(quantities(&bucket.limits), [pair("memory", "1280Mi")]);

        let mut given = volume.clone();
        given.spec.resources = Some(
            serde_json::from_value(serde_json::json!({
                "requests": {"cpu": "1000m"},
                "limits": {"memory": "0.5Gi", "ephemeral-storage": "2Gi"},
            }))
            .unwrap(),
        );
        let resources = container_resources(&given, true);
        assert_eq!(quantities(&resources.requests), [pair("cpu", "1000m")]);
        assert_eq!(
            quantities(&resources.limits),
            [pair("ephemeral-storage", "2Gi"), pair("memory", "0.5Gi")]
        );
    }

    #[test]
    fn the_pod_waits_longer_than_the_gateway_lets_transfers_run() {
        let mut server = server(1, "ClusterIP", true);
        let settings = BuildSettings {
            image: "sluice",
            hashes: &PasswordHashes::default(),
        };
        let grace_of = |server: &TransferServer| {
            let args = gateway_container(server, None, None, &settings)
                .args
                .unwrap();
            let at = args.iter().position(|a| a == "--shutdown-grace").unwrap();
            args[at + 1].clone()
        };
        assert_eq!(grace_of(&server), "60");
        server.spec.shutdown_grace_period_seconds = Some(5);
        assert_eq!(grace_of(&server), "5");
        assert_eq!(shutdown_grace_seconds(&server) + 10, 15);
    }

    #[test]
    fn only_several_replicas_get_a_disruption_budget_of_one_pod() {
        assert!(build_disruption_budget(&server(1, "ClusterIP", true)).is_none());
        let budget = build_disruption_budget(&server(3, "ClusterIP", true)).unwrap();
        assert_eq!(budget.metadata.name.as_deref(), Some("files-gateway"));
        let owner = &budget.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.controller, Some(true));
        let spec = budget.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(spec.min_available, None);
        assert_eq!(
            spec.selector.unwrap().match_labels,
            Some(names::selector_labels("files"))
        );
    }

    #[test]
    fn node_port_passive_ports_are_their_own_node_ports_and_split_per_pod() {
        let server = server(2, "NodePort", true);
        let plan = ftps::plan(&server).unwrap();
        let main = build_service(&server, plan.as_ref());
        let main_ports: Vec<String> = port_names(&main).into_iter().map(|p| p.0).collect();
        assert_eq!(main_ports, ["sftp", "ftps"]);

        let pods = build_pod_services(&server, plan.as_ref());
        assert_eq!(pods.len(), 2);
        assert_eq!(pods[1].metadata.name.as_deref(), Some("files-gateway-1"));
        assert_eq!(
            port_names(&pods[1]),
            [
                ("pasv-31002".into(), 31002, Some(31002)),
                ("pasv-31003".into(), 31003, Some(31003)),
            ]
        );
        let selector = pods[1]
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .unwrap();
        assert_eq!(selector[names::POD_NAME_LABEL], "files-gateway-1");
        assert_eq!(selector["app.kubernetes.io/instance"], "files");
    }

    #[test]
    fn a_single_pod_keeps_the_passive_ports_on_the_main_service() {
        let server = server(1, "NodePort", true);
        let plan = ftps::plan(&server).unwrap();
        assert!(build_pod_services(&server, plan.as_ref()).is_empty());
        let ports = port_names(&build_service(&server, plan.as_ref()));
        assert_eq!(ports.len(), 2 + 4);
        assert_eq!(ports[5], ("pasv-31003".into(), 31003, Some(31003)));
    }

    #[test]
    fn only_azure_workload_identity_pods_carry_the_webhook_label() {
        let label = "azure.workload.identity/use";
        let cases = [
            (
                "provider: AzureBlob\n    endpoint: https://acct.blob.core.chinacloudapi.cn\n    region: chinaeast2\n    credentials: {workloadIdentity: true}",
                Some("true"),
            ),
            (
                "provider: AzureBlob\n    endpoint: https://acct.blob.core.chinacloudapi.cn\n    region: chinaeast2\n    credentials: {secretRef: {name: az}}",
                None,
            ),
            (
                "provider: S3\n    region: cn-north-1\n    credentials: {workloadIdentity: true}",
                None,
            ),
        ];
        for (store, expected) in cases {
            let spec = format!(
                "region: cn-shanghai\nprotocols: {{sftp: {{}}}}\nstorage:\n  objectStore:\n    \
                 bucket: backups\n    {store}\n"
            );
            let server = TransferServer::new("files", serde_yaml::from_str(&spec).unwrap());
            let plan = super::super::object_store::plan(&server).unwrap();
            let labels = pod_labels(&server, plan.as_ref());
            assert_eq!(labels.get(label).map(String::as_str), expected, "{store}");
            assert_eq!(
                labels.get("app.kubernetes.io/instance").map(String::as_str),
                Some("files")
            );
        }
    }

    fn network_policy_of(
        storage: serde_json::Value,
        extra: serde_json::Value,
    ) -> serde_json::Value {
        let mut spec = serde_json::json!({
            "region": "cn-shanghai",
            "protocols": {"sftp": {}},
            "storage": storage,
        });
        for (key, value) in extra.as_object().unwrap() {
            spec[key] = value.clone();
        }
        let mut server = TransferServer::new("files", serde_json::from_value(spec).unwrap());
        server.metadata.namespace = Some("ns".into());
        let plan = super::super::object_store::plan(&server).unwrap();
        serde_json::to_value(build_network_policy(&server, plan.as_ref())).unwrap()
    }

    const DNS: &str = r#"{"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
        "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]}"#;

    #[test]
    fn gateways_on_a_volume_may_reach_only_the_cluster_dns() {
        let volume = serde_json::json!({"volume": {"storageClassName": "ssd", "size": "1Gi"}});
        let policy = network_policy_of(volume, serde_json::json!({}));
        assert_eq!(policy["metadata"]["name"], "files-gateway");
        assert_eq!(
            policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"],
            "files"
        );
        assert_eq!(policy["spec"]["policyTypes"], serde_json::json!(["Egress"]));
        let dns: serde_json::Value = serde_json::from_str(DNS).unwrap();
        assert_eq!(policy["spec"]["egress"], serde_json::json!([dns]));
    }

    #[test]
    fn gateways_reach_their_object_store_on_its_port_only_where_declared() {
        let store = |endpoint: &str, cidrs: serde_json::Value| {
            serde_json::json!({"objectStore": {
                "provider": "S3Compatible", "bucket": "b", "region": "cn-shanghai",
                "endpoint": endpoint, "endpointCIDRs": cidrs,
                "credentials": {"secretRef": {"name": "c"}},
            }})
        };
        let policy = network_policy_of(
            store(
                "https://s3.internal.example:9443",
                serde_json::json!(["10.20.0.0/16"]),
            ),
            serde_json::json!({"networkPolicy": {"dnsCIDRs": ["169.254.20.10/32"]}}),
        );
        let egress = &policy["spec"]["egress"];
        assert_eq!(
            egress[0]["to"][1],
            serde_json::json!({"ipBlock": {"cidr": "169.254.20.10/32"}})
        );
        assert_eq!(
            egress[1],
            serde_json::json!({"ports": [{"port": 9443, "protocol": "TCP"}],
                               "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]})
        );

        // Without CIDRs: anywhere on the port, but never link-local (cloud metadata).
        let policy = network_policy_of(
            store("http://minio.storage.svc", serde_json::json!([])),
            serde_json::json!({}),
        );
        assert_eq!(
            policy["spec"]["egress"][1],
            serde_json::json!({"ports": [{"port": 80, "protocol": "TCP"}], "to": [
                {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}},
                {"ipBlock": {"cidr": "::/0", "except": ["fe80::/10"]}},
            ]})
        );
    }

    #[test]
    fn the_network_policy_can_be_turned_off() {
        let volume = serde_json::json!({"volume": {"storageClassName": "ssd", "size": "1Gi"}});
        let policy = network_policy_of(
            volume,
            serde_json::json!({"networkPolicy": {"enabled": false}}),
        );
        assert_eq!(policy, serde_json::Value::Null);
    }

    #[test]
    fn endpoint_ports_come_from_the_url_or_its_scheme() {
        let cases = [
            ("https://oss-cn-shanghai.aliyuncs.com", 443),
            ("http://127.0.0.1:8333", 8333),
            ("http://minio", 80),
            ("https://[fd00::5]:9000/", 9000),
            ("https://[fd00::5]/", 443),
            ("https://user@host:8443/path", 8443),
        ];
        for (endpoint, port) in cases {
            assert_eq!(endpoint_port(endpoint), port, "{endpoint}");
        }
    }
}
