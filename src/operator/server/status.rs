//! Status: conditions, endpoint and host-key fingerprints of a TransferServer.
//!
//! The status is computed from what was read and decided, compared with the current
//! one, and written only when it differs, so a resync of a converged server writes
//! nothing. `lastTransitionTime` moves only when a condition's status changes.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::build::sftp_port;
use super::host_keys::HostKeyMaterial;
use crate::api::{
    ConditionType, HostKeyFingerprint, Reason, TransferServer, TransferServerStatus, set_condition,
};
use crate::residency::ResidencyVerdict;

/// What the status of one reconcile is computed from.
pub enum Outcome<'a> {
    /// Rolled out (or rolling out).
    RolledOut {
        /// The residency verdict.
        verdict: &'a ResidencyVerdict,
        /// Host keys, for fingerprints.
        keys: &'a HostKeyMaterial,
        /// The Deployment as last read.
        deployment: Option<&'a Deployment>,
        /// The Service as last read.
        service: Option<&'a Service>,
        /// Number of users in the configuration.
        users: usize,
    },
    /// Not rolled out.
    Blocked {
        /// The residency verdict, if one was reached.
        verdict: Option<&'a ResidencyVerdict>,
        /// Why.
        reason: Reason,
        /// Explanation.
        message: &'a str,
    },
}

/// Computes the new status from the current one and the outcome.
pub fn compute(server: &TransferServer, outcome: &Outcome, now: Timestamp) -> TransferServerStatus {
    let current = server.status.clone().unwrap_or_default();
    let generation = server.metadata.generation;
    let mut conditions = current.conditions.clone();
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
        protocols: Some("SFTP".into()),
        ..TransferServerStatus::default()
    };
    match outcome {
        Outcome::Blocked {
            verdict,
            reason,
            message,
        } => {
            if let Some(verdict) = verdict {
                let (ok, why) = residency_condition(verdict);
                set(
                    ConditionType::ResidencyCompliant,
                    ok,
                    why,
                    &verdict.message(&server.spec.region),
                );
            }
            set(ConditionType::Ready, false, *reason, message);
            set(ConditionType::Reconciling, false, *reason, "");
            set(ConditionType::Stalled, true, *reason, message);
            status.endpoint = current.endpoint;
            status.host_key_fingerprints = current.host_key_fingerprints;
        }
        Outcome::RolledOut {
            verdict,
            keys,
            deployment,
            service,
            users,
        } => {
            let (ok, why) = residency_condition(verdict);
            set(
                ConditionType::ResidencyCompliant,
                ok,
                why,
                &verdict.message(&server.spec.region),
            );
            if deployment.is_some_and(is_available) {
                set(
                    ConditionType::Ready,
                    true,
                    Reason::RolledOut,
                    "gateway is available",
                );
                set(ConditionType::Reconciling, false, Reason::RolledOut, "");
            } else {
                let waiting = "waiting for the gateway Deployment to become available";
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
            }
            set(ConditionType::Stalled, false, Reason::Reconciled, "");
            status.endpoint = Some(endpoint(server, *service));
            status.host_key_fingerprints = fingerprints(keys);
            status.users = Some(i32::try_from(*users).unwrap_or(i32::MAX));
        }
    }
    status.conditions = conditions;
    status
}

fn residency_condition(verdict: &ResidencyVerdict) -> (bool, Reason) {
    match (
        verdict.governing.is_empty(),
        verdict.compliant(),
        verdict.blocks_rollout(),
    ) {
        (true, _, _) => (true, Reason::NoPolicy),
        (false, true, _) => (true, Reason::RegionAllowed),
        (false, false, true) => (false, Reason::RegionNotAllowed),
        (false, false, false) => (false, Reason::AuditOnly),
    }
}

/// Whether a Deployment has rolled out its current generation to every replica, by the
/// same rules as `kubectl rollout status`.
pub fn is_available(deployment: &Deployment) -> bool {
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let Some(status) = &deployment.status else {
        return false;
    };
    status.observed_generation >= deployment.metadata.generation
        && status.updated_replicas.unwrap_or(0) >= desired
        && status.available_replicas.unwrap_or(0) >= desired
        && status.replicas.unwrap_or(0) == desired
}

fn endpoint(server: &TransferServer, service: Option<&Service>) -> String {
    let port = sftp_port(server);
    let ingress = service
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|i| i.first())
        .and_then(|i| i.hostname.clone().or_else(|| i.ip.clone()));
    let host = ingress.unwrap_or_else(|| {
        let name = super::names::service(&server.name_any());
        format!("{name}.{}.svc", server.namespace().unwrap_or_default())
    });
    format!("sftp://{host}:{port}")
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
