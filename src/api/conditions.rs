//! Status conditions shared by all kinds, following the kstatus conventions.
//!
//! `Ready` says whether the object does what it declares; `Reconciling` is true while the
//! operator is still working towards that; `Stalled` is true when it cannot make progress
//! without a change to the spec or to something it references. Reasons are CamelCase
//! constants kept here, in one place, so that dashboards and alerts can rely on them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// The condition types Sluice sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionType {
    /// The object is fully reconciled and serving as declared.
    Ready,
    /// The operator is working towards the declared state.
    Reconciling,
    /// The operator cannot make progress until something changes.
    Stalled,
    /// The server's region and storage satisfy the governing residency policy.
    ResidencyCompliant,
    /// The FTPS certificate exists, parses and is within its validity period.
    TlsCertificateValid,
    /// The object store accepted a probe write and delete with the server's credentials.
    StorageAvailable,
    /// Some node in the cluster carries the server's region, so its pods can be
    /// scheduled.
    Schedulable,
}

impl ConditionType {
    /// The condition type as it appears in the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::Reconciling => "Reconciling",
            Self::Stalled => "Stalled",
            Self::ResidencyCompliant => "ResidencyCompliant",
            Self::TlsCertificateValid => "TlsCertificateValid",
            Self::StorageAvailable => "StorageAvailable",
            Self::Schedulable => "Schedulable",
        }
    }
}

/// Reasons carried by conditions and Events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)] // each variant's name is its documentation
pub enum Reason {
    Reconciled,
    Progressing,
    RolledOut,
    WaitingForGateway,
    RegionAllowed,
    NoPolicy,
    RegionNotAllowed,
    AuditOnly,
    ServerNotFound,
    ServerNotReady,
    SecretNotFound,
    SecretKeyMissing,
    InvalidPublicKey,
    InvalidHomeDirectory,
    NoCredentials,
    InvalidSpec,
    NameConflict,
    ConfigTooLarge,
    Evaluated,
    PlaintextNotAllowed,
    CertificateValid,
    CertificateMissing,
    CertificateInvalid,
    CertificateExpired,
    CertificateNotYetValid,
    WaitingForLoadBalancer,
    Rejected,
    StorageRegionNotAllowed,
    StorageReachable,
    StorageNotProbed,
    StorageCredentialsMissing,
    BucketNotFound,
    StorageAccessDenied,
    StorageUnreachable,
    StorageProbeFailed,
    PolicyUnevaluable,
    StorageClassNotAllowed,
    VolumeOutsideRegion,
    EndpointNotAllowed,
    AuditLogStdoutNotAllowed,
    CrossBorderTransferExpired,
    WritesSuspended,
    NodesInRegion,
    NoNodeInRegion,
    ServerCompliant,
    ServerNotCompliant,
    ServerReleased,
}

impl Reason {
    /// The reason as it appears in conditions and Events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reconciled => "Reconciled",
            Self::Progressing => "Progressing",
            Self::RolledOut => "RolledOut",
            Self::WaitingForGateway => "WaitingForGateway",
            Self::RegionAllowed => "RegionAllowed",
            Self::NoPolicy => "NoPolicy",
            Self::RegionNotAllowed => "RegionNotAllowed",
            Self::AuditOnly => "AuditOnly",
            Self::ServerNotFound => "ServerNotFound",
            Self::ServerNotReady => "ServerNotReady",
            Self::SecretNotFound => "SecretNotFound",
            Self::SecretKeyMissing => "SecretKeyMissing",
            Self::InvalidPublicKey => "InvalidPublicKey",
            Self::InvalidHomeDirectory => "InvalidHomeDirectory",
            Self::NoCredentials => "NoCredentials",
            Self::InvalidSpec => "InvalidSpec",
            Self::NameConflict => "NameConflict",
            Self::ConfigTooLarge => "ConfigTooLarge",
            Self::Evaluated => "Evaluated",
            Self::PlaintextNotAllowed => "PlaintextNotAllowed",
            Self::CertificateValid => "CertificateValid",
            Self::CertificateMissing => "CertificateMissing",
            Self::CertificateInvalid => "CertificateInvalid",
            Self::CertificateExpired => "CertificateExpired",
            Self::CertificateNotYetValid => "CertificateNotYetValid",
            Self::WaitingForLoadBalancer => "WaitingForLoadBalancer",
            Self::Rejected => "Rejected",
            Self::StorageRegionNotAllowed => "StorageRegionNotAllowed",
            Self::StorageReachable => "StorageReachable",
            Self::StorageNotProbed => "StorageNotProbed",
            Self::StorageCredentialsMissing => "StorageCredentialsMissing",
            Self::BucketNotFound => "BucketNotFound",
            Self::StorageAccessDenied => "StorageAccessDenied",
            Self::StorageUnreachable => "StorageUnreachable",
            Self::StorageProbeFailed => "StorageProbeFailed",
            Self::PolicyUnevaluable => "PolicyUnevaluable",
            Self::StorageClassNotAllowed => "StorageClassNotAllowed",
            Self::VolumeOutsideRegion => "VolumeOutsideRegion",
            Self::EndpointNotAllowed => "EndpointNotAllowed",
            Self::AuditLogStdoutNotAllowed => "AuditLogStdoutNotAllowed",
            Self::CrossBorderTransferExpired => "CrossBorderTransferExpired",
            Self::WritesSuspended => "WritesSuspended",
            Self::NodesInRegion => "NodesInRegion",
            Self::NoNodeInRegion => "NoNodeInRegion",
            Self::ServerCompliant => "ServerCompliant",
            Self::ServerNotCompliant => "ServerNotCompliant",
            Self::ServerReleased => "ServerReleased",
        }
    }
}

/// Sets a condition in `conditions`, keeping its `lastTransitionTime` when the status
/// does not change, so that re-computing an unchanged status writes nothing.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: ConditionType,
    status: bool,
    reason: Reason,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Timestamp,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let previous = conditions.iter().position(|c| c.type_ == type_.as_str());
    let last_transition_time = match previous.map(|i| &conditions[i]) {
        Some(old) if old.status == status => old.last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: type_.as_str().to_string(),
        status,
        reason: reason.as_str().to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time,
    };
    match previous {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    #[test]
    fn unchanged_status_keeps_transition_time() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            ConditionType::Ready,
            true,
            Reason::Reconciled,
            "",
            Some(1),
            at(10),
        );
        set_condition(
            &mut conditions,
            ConditionType::Ready,
            true,
            Reason::RolledOut,
            "m",
            Some(2),
            at(20),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, Time(at(10)));
        assert_eq!(conditions[0].reason, "RolledOut");
        assert_eq!(conditions[0].observed_generation, Some(2));
    }

    #[test]
    fn changed_status_moves_transition_time() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            ConditionType::Ready,
            true,
            Reason::Reconciled,
            "",
            None,
            at(10),
        );
        set_condition(
            &mut conditions,
            ConditionType::Ready,
            false,
            Reason::Progressing,
            "",
            None,
            at(20),
        );
        assert_eq!(conditions[0].last_transition_time, Time(at(20)));
        assert_eq!(conditions[0].status, "False");
    }
}
