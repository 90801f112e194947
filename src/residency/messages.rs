//! The words of every residency violation, in one place.
//!
//! [`super::evaluate`] writes its messages with these functions, and the admission
//! policy's CEL (`super::admission`) is generated from the same functions (called with
//! placeholders that become CEL expressions), so the API server, the operator and
//! `sluice check` say the same thing about the same breach.

use crate::api::Jurisdiction;

/// A region (`what` is `region` or `storage region`) the policy does not allow; `allowed`
/// is [`allowed_text`].
pub fn not_allowed(what: &str, region: &str, policy: &str, allowed: &str) -> String {
    format!("{what} {region} is not allowed by DataResidencyPolicy {policy} (allowed: {allowed})")
}

/// What a policy allows, for messages: its regions, then its jurisdictions.
pub fn allowed_text<'a>(
    regions: impl IntoIterator<Item = &'a str>,
    jurisdictions: impl IntoIterator<Item = Jurisdiction>,
) -> String {
    let jurisdictions = jurisdictions
        .into_iter()
        .map(|j| -> &'a str { jurisdiction_text(j) });
    let all: Vec<&str> = regions.into_iter().chain(jurisdictions).collect();
    all.join(", ")
}

/// How a jurisdiction is named in [`allowed_text`]: `CN` is spelled out, because "CN"
/// is often taken to include Hong Kong.
pub fn jurisdiction_text(jurisdiction: Jurisdiction) -> &'static str {
    match jurisdiction {
        Jurisdiction::Cn => "jurisdiction CN (mainland China)",
        other => other.as_str(),
    }
}

/// A cross-border allowance that has expired.
pub fn allowance_expired(reference: &str, policy: &str, region: &str, expires: &str) -> String {
    format!(
        "cross-border transfer {reference} of DataResidencyPolicy {policy} to {region} \
         expired at {expires}"
    )
}

/// An object store whose region cannot be resolved; `error` is the `RegionError`.
pub fn storage_unresolvable(error: &str, policy: &str) -> String {
    format!(
        "the storage region cannot be resolved ({error}), so DataResidencyPolicy {policy} \
         cannot allow it"
    )
}

/// A StorageClass outside the policy's `allowedStorageClasses`.
pub fn storage_class_not_allowed(class: &str, allowed: &str) -> String {
    format!("StorageClass {class} is not allowed (allowed: {allowed})")
}

/// A volume problem (StorageClass or bound volume), attributed to its policy.
pub fn volume_problem(problem: &str, policy: &str) -> String {
    format!("{problem} (DataResidencyPolicy {policy})")
}

/// An object-store endpoint outside the policy's `allowedEndpoints`.
pub fn endpoint_not_allowed(host: &str, policy: &str, allowed: &str) -> String {
    format!(
        "object-store endpoint {host} is not allowed by DataResidencyPolicy {policy} \
         (allowed: {allowed})"
    )
}

/// Plaintext FTP the policy does not allow.
pub fn plaintext_ftp(policy: &str) -> String {
    format!(
        "plaintext FTP (ftps.allowPlaintext) is not allowed by DataResidencyPolicy {policy} \
         (the policy would need allowPlaintextFtp: true)"
    )
}

/// An audit log on standard output the policy does not allow.
pub fn audit_log_stdout(policy: &str) -> String {
    format!(
        "an audit log on standard output (auditLog.stdout) is not allowed by \
         DataResidencyPolicy {policy} (the policy would need allowAuditLogStdout: true)"
    )
}

/// A policy whose selector cannot be evaluated; `error` is the `SelectorError`.
pub fn unevaluable(policy: &str, error: &str) -> String {
    format!(
        "DataResidencyPolicy {policy} cannot be evaluated ({error}); no server is rolled out \
         until it is fixed"
    )
}
