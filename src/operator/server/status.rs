//! Status: conditions, endpoint and host-key fingerprints of a TransferServer.
//!
//! The status is computed from what was read and decided, compared with the current
//! one, and written only when it differs, so a resync of a converged server writes
//! nothing. `lastTransitionTime` moves only when a condition's status changes.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::build::sftp_port;
use super::ftps::{self, CertificateState};
use super::host_keys::HostKeyMaterial;
use super::object_store::{self, StorageState};
use crate::api::{
    ConditionType, HostKeyFingerprint, Reason, ServiceType, StorageStatus, TransferServer,
    TransferServerStatus, set_condition,
};
use crate::residency::ResidencyVerdict;

/// What the status of one reconcile is computed from.
pub enum Outcome<'a> {
    /// Rolled out (or rolling out).
    RolledOut {
        /// The object store's state; `None` on a volume.
        storage: Option<&'a StorageState>,
        /// The residency verdict.
        verdict: &'a ResidencyVerdict,
        /// Host keys, for fingerprints.
        keys: &'a HostKeyMaterial,
        /// The StatefulSet as last read.
        statefulset: Option<&'a StatefulSet>,
        /// The Service as last read.
        service: Option<&'a Service>,
        /// Number of users in the configuration.
        users: usize,
        /// The FTPS certificate, when the server offers FTPS.
        certificate: Option<&'a CertificateState>,
        /// Whether every pod knows the passive address to announce.
        passive_addresses_known: bool,
        /// Whether some node carries the server's region.
        schedulable: bool,
    },
    /// Not rolled out.
    Blocked {
        /// The residency verdict, if one was reached.
        verdict: Option<&'a ResidencyVerdict>,
        /// Why.
        reason: Reason,
        /// Explanation.
        message: &'a str,
        /// Whether a gateway rolled out before keeps running with writes suspended.
        writes_suspended: bool,
    },
}

/// Computes the new status from the current one and the outcome.
pub fn compute(server: &TransferServer, outcome: &Outcome, now: Timestamp) -> TransferServerStatus {
    let current = server.status.clone().unwrap_or_default();
    let generation = server.metadata.generation;
    let mut conditions = current.conditions.clone();
    if ftps::spec(server).is_none() {
        conditions.retain(|c| c.type_ != ConditionType::TlsCertificateValid.as_str());
    }
    if server.spec.storage.object_store.is_none() {
        conditions.retain(|c| c.type_ != ConditionType::StorageAvailable.as_str());
    }
    let mut set = |type_, status, reason, message: &str| {
        set_condition(
            &mut conditions,
            type_,
            status,
            reason,
            message,
            generation,
            now,
        );
    };
    let mut status = TransferServerStatus {
        observed_generation: generation,
        protocols: Some(protocols(server)),
        ..TransferServerStatus::default()
    };

    match outcome {
        Outcome::Blocked {
            verdict,
            reason,
            message,
            writes_suspended,
        } => {
            if let Some(verdict) = verdict {
                let (ok, why) = verdict.condition();
                set(
                    ConditionType::ResidencyCompliant,
                    ok,
                    why,
                    &verdict.message(&server.spec.region),
                );
            }
            let ready_reason = match writes_suspended {
                true => Reason::WritesSuspended,
                false => *reason,
            };
            set(ConditionType::Ready, false, ready_reason, message);
            set(ConditionType::Reconciling, false, *reason, "");
            set(ConditionType::Stalled, true, *reason, message);
            status.endpoint = current.endpoint;
            status.endpoints = current.endpoints;
            status.tls_certificate = current.tls_certificate;
            status.host_key_fingerprints = current.host_key_fingerprints;
            status.storage = current.storage;
        }
        Outcome::RolledOut {
            storage,
            verdict,
            keys,
            statefulset,
            service,
            users,
            certificate,
            passive_addresses_known,
            schedulable,
        } => {
            let (ok, why) = verdict.condition();
            set(
                ConditionType::ResidencyCompliant,
                ok,
                why,
                &verdict.message(&server.spec.region),
            );
            let certificate_problem = certificate.and_then(|state| {
                let (ok, reason, message) = certificate_condition(state);
                set(ConditionType::TlsCertificateValid, ok, reason, &message);
                (!ok).then_some((reason, message))
            });
            let storage_problem = storage.and_then(|state| {
                let (ok, reason, message) = storage_condition(state);
                set(ConditionType::StorageAvailable, ok, reason, &message);
                (!ok).then_some((reason, message))
            });
            let region = &server.spec.region;
            let label = verdict
                .region_labels
                .iter()
                .map(|l| format!("{l}={region}"))
                .collect::<Vec<_>>()
                .join(" and ");
            if *schedulable {
                let message = format!("nodes carry {label}");
                set(
                    ConditionType::Schedulable,
                    true,
                    Reason::NodesInRegion,
                    &message,
                );
            } else {
                let message = format!(
                    "no node carries {label}, so the gateway pods cannot be \
                     scheduled; label the nodes of that region, or correct spec.region"
                );
                set(
                    ConditionType::Schedulable,
                    false,
                    Reason::NoNodeInRegion,
                    &message,
                );
            }
            if !schedulable && !statefulset.is_some_and(is_available) {
                let message =
                    format!("no node carries {label}: the gateway pods cannot be scheduled");
                set(
                    ConditionType::Ready,
                    false,
                    Reason::NoNodeInRegion,
                    &message,
                );
                // Nodes may still join (an autoscaler, a new pool): keep waiting.
                set(
                    ConditionType::Reconciling,
                    true,
                    Reason::NoNodeInRegion,
                    &message,
                );
            } else if !statefulset.is_some_and(is_available) {
                let waiting = "waiting for the gateway StatefulSet to become available";
                set(
                    ConditionType::Ready,
                    false,
                    Reason::WaitingForGateway,
                    waiting,
                );
                set(
                    ConditionType::Reconciling,
                    true,
                    Reason::Progressing,
                    waiting,
                );
            } else if let Some((reason, message)) = storage_problem {
                // The gateway runs and reports transient errors until the store works;
                // the operator probes again shortly.
                let message = format!("the object store is not usable: {message}");
                set(ConditionType::Ready, false, reason, &message);
                set(ConditionType::Reconciling, false, reason, "");
            } else if let Some((reason, message)) = certificate_problem {
                // The gateway runs and waits for a usable certificate (cert-manager may
                // still be issuing it): nothing for the operator to do meanwhile.
                let message = format!("FTPS is not served: {message}");
                set(ConditionType::Ready, false, reason, &message);
                set(ConditionType::Reconciling, false, reason, "");
            } else if !passive_addresses_known {
                let waiting = "waiting for the load balancer address that passive FTPS \
                               replies announce";
                let reason = Reason::WaitingForLoadBalancer;
                set(ConditionType::Ready, false, reason, waiting);
                set(ConditionType::Reconciling, true, reason, waiting);
            } else {
                let available = match server.spec.replicas {
                    Some(0) => "scaled to zero replicas: no gateway pod runs",
                    _ => "gateway is available",
                };
                set(ConditionType::Ready, true, Reason::RolledOut, available);
                set(ConditionType::Reconciling, false, Reason::RolledOut, "");
            }
            set(ConditionType::Stalled, false, Reason::Reconciled, "");
            status.endpoints = endpoints(server, *service);
            status.endpoint = status.endpoints.first().cloned();
            status.tls_certificate = certificate.and_then(CertificateState::status);
            status.host_key_fingerprints = fingerprints(keys);
            status.users = Some(i32::try_from(*users).unwrap_or(i32::MAX));
            status.storage = storage_status(server);
        }
    }
    status.conditions = conditions;
    status
}

fn storage_condition(state: &StorageState) -> (bool, Reason, String) {
    match state {
        StorageState::Available => (
            true,
            Reason::StorageReachable,
            "a probe object was written and deleted".to_string(),
        ),
        StorageState::NotProbed => (
            true,
            Reason::StorageNotProbed,
            "not probed: the operator cannot use the pods' workload identity; the gateway \
             reports storage errors to clients"
                .to_string(),
        ),
        StorageState::Unavailable(reason, message) => (false, *reason, message.clone()),
    }
}

/// Where the object store is, as resolved.
fn storage_status(server: &TransferServer) -> Option<StorageStatus> {
    let plan = object_store::plan(server).ok()??;
    Some(StorageStatus {
        region: plan.resolved.region,
        jurisdiction: plan.resolved.jurisdiction.map(str::to_owned),
        endpoint: plan.config.endpoint,
    })
}

fn certificate_condition(state: &CertificateState) -> (bool, Reason, String) {
    match state {
        CertificateState::Valid(info) => {
            let message = format!("valid until {}", info.not_after_rfc3339());
            (true, Reason::CertificateValid, message)
        }
        CertificateState::Expired(info) => {
            let since = info.not_after_rfc3339();
            let message = format!("the certificate expired at {since}; renew it");
            (false, Reason::CertificateExpired, message)
        }
        CertificateState::NotYetValid(info) => {
            let from = info.not_before_rfc3339();
            let message = format!("the certificate is not valid before {from}");
            (false, Reason::CertificateNotYetValid, message)
        }
        CertificateState::Missing(message) => (false, Reason::CertificateMissing, message.clone()),
        CertificateState::Invalid(message) => (false, Reason::CertificateInvalid, message.clone()),
    }
}

/// The protocols a server offers, for display: `SFTP`, `FTPS`, `SFTP,FTPS`.
fn protocols(server: &TransferServer) -> String {
    let protocols = &server.spec.protocols;
    let offered = [
        ("SFTP", protocols.sftp.is_some()),
        ("FTPS", protocols.ftps.is_some()),
    ];
    let names: Vec<&str> = offered
        .iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect();
    names.join(",")
}

/// Whether a StatefulSet has rolled out its current revision to every replica, by the
/// same rules as `kubectl rollout status`.
pub fn is_available(statefulset: &StatefulSet) -> bool {
    let desired = statefulset
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let Some(status) = &statefulset.status else {
        return false;
    };
    // Every pod runs the template's current revision once the update revision has become
    // the current one.
    let updated =
        status.update_revision.is_some() && status.update_revision == status.current_revision;
    status.observed_generation >= statefulset.metadata.generation
        && updated
        && status.ready_replicas.unwrap_or(0) >= desired
        && status.available_replicas.unwrap_or(0) >= desired
        && status.replicas == desired
}

/// Every protocol's address: on the load balancer's address once it is assigned, on
/// `passiveAddress` and the node ports for a NodePort Service that names one, and on the
/// Service's DNS name otherwise.
fn endpoints(server: &TransferServer, service: Option<&Service>) -> Vec<String> {
    let dns = || {
        let name = super::names::service(&server.name_any());
        format!("{name}.{}.svc", server.namespace().unwrap_or_default())
    };
    let node_address = ftps::spec(server)
        .and_then(|f| f.passive_address.clone())
        .filter(|_| ftps::service_type(server) == ServiceType::NodePort);
    let node_port = |name: &str| {
        let ports = service?.spec.as_ref()?.ports.as_ref()?;
        ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))?
            .node_port
    };
    let address = |name: &str, port: i32| match (&node_address, node_port(name)) {
        (Some(node), Some(node_port)) => format!("{node}:{node_port}"),
        _ => {
            let host = ftps::load_balancer_address(service).unwrap_or_else(dns);
            format!("{host}:{port}")
        }
    };
    let mut endpoints = Vec::new();
    if server.spec.protocols.sftp.is_some() {
        endpoints.push(format!("sftp://{}", address("sftp", sftp_port(server))));
    }
    if let Ok(Some(plan)) = ftps::plan(server) {
        if let Some(port) = plan.explicit_port {
            endpoints.push(format!("ftpes://{}", address("ftps", port)));
        }
        if let Some(port) = plan.implicit_port {
            endpoints.push(format!("ftps://{}", address("ftps-implicit", port)));
        }
    }
    endpoints
}

fn fingerprints(keys: &HostKeyMaterial) -> Vec<HostKeyFingerprint> {
    match crate::gateway::host_keys::fingerprints(&keys.keys) {
        Ok(list) => list
            .into_iter()
            .map(|(algorithm, sha256)| HostKeyFingerprint { algorithm, sha256 })
            .collect(),
        Err(error) => {
            tracing::warn!(error = %error, "Failed to fingerprint host keys");
            Vec::new()
        }
    }
}
