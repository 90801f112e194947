//! Residency evaluation: which policies govern a server and whether it complies.
//!
//! Pure: no I/O, no clock. The operator, the offline checker and the policy status all
//! call [`evaluate`], so they reach the same verdict from the same inputs.
//!
//! Overlapping policies combine strictly: a server must satisfy every policy that
//! governs it, a region is allowed only if all of them allow it, and a violation is
//! enforced if any violated policy is in `Enforce` mode.

pub mod region;
mod selector;

use std::collections::BTreeMap;

use region::{RegionError, ResolvedRegion};
pub use selector::{SelectorError, matches};

use crate::api::{DEFAULT_REGION_LABEL, DataResidencyPolicy, Enforcement, TransferServerSpec};

/// What a policy judges of a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject<'a> {
    /// The region the server declares.
    pub region: &'a str,
    /// Whether the server offers FTP without TLS (`ftps.allowPlaintext`).
    pub plaintext_ftp: bool,
    /// Where an object store keeps the server's files: the region resolved from its
    /// provider, endpoint and declaration, or why none can be. `None` for a volume, which
    /// is pinned to `region` with the pods.
    pub storage: Option<Result<ResolvedRegion, RegionError>>,
}

impl<'a> Subject<'a> {
    /// What a policy judges of the server `spec` declares.
    pub fn of(spec: &'a TransferServerSpec) -> Self {
        let plaintext_ftp = spec
            .protocols
            .ftps
            .as_ref()
            .and_then(|f| f.allow_plaintext)
            .unwrap_or(false);
        let storage = spec.storage.object_store.as_ref().map(|store| {
            region::resolve_region(
                store.provider,
                store.endpoint.as_deref(),
                store.region.as_deref(),
            )
        });
        Self {
            region: &spec.region,
            plaintext_ftp,
            storage,
        }
    }
}

/// A server known only by its region.
impl<'a> From<&'a str> for Subject<'a> {
    fn from(region: &'a str) -> Self {
        Self {
            region,
            plaintext_ftp: false,
            storage: None,
        }
    }
}

/// The outcome of evaluating one server against every policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResidencyVerdict {
    /// Names of the policies that govern the server, sorted.
    pub governing: Vec<String>,
    /// The policies the server violates, sorted by policy name.
    pub violations: Vec<Violation>,
    /// Regions every governing policy allows, sorted (empty when none governs).
    pub allowed_regions: Vec<String>,
    /// Node label carrying the region, from the first governing policy by name.
    pub region_label: String,
    /// Whether any governing policy is enforced (`Enforce`, or one that cannot be
    /// evaluated), so that the data plane refuses what the policies do not allow rather
    /// than only reporting it.
    pub enforced: bool,
}

/// One policy a server violates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Name of the violated policy.
    pub policy: String,
    /// The rule that is broken (the first, when the server breaks several).
    pub rule: Rule,
    /// How the violated policy is applied.
    pub enforcement: Enforcement,
    /// Human-readable explanation naming region and policy.
    pub message: String,
}

/// A rule of a policy that a server can break.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The policy cannot be evaluated, so it allows nothing.
    Unevaluable,
    /// The server's region is not among the allowed regions.
    Region,
    /// The server offers plaintext FTP and the policy does not allow it.
    PlaintextFtp,
    /// The object store's region is not allowed, or cannot be resolved.
    StorageRegion,
}

impl ResidencyVerdict {
    /// The rule broken by the first violation, if any.
    pub fn broken_rule(&self) -> Option<Rule> {
        self.violations.first().map(|v| v.rule)
    }

    /// The condition reason for a non-compliant verdict: what rule is broken.
    pub fn violation_reason(&self) -> crate::api::Reason {
        match self.broken_rule() {
            Some(Rule::PlaintextFtp) => crate::api::Reason::PlaintextNotAllowed,
            Some(Rule::StorageRegion) => crate::api::Reason::StorageRegionNotAllowed,
            _ => crate::api::Reason::RegionNotAllowed,
        }
    }

    /// Whether the server satisfies every governing policy.
    pub fn compliant(&self) -> bool {
        self.violations.is_empty()
    }

    /// Whether a violation blocks roll-out (some violated policy enforces).
    pub fn blocks_rollout(&self) -> bool {
        self.violations
            .iter()
            .any(|v| v.enforcement == Enforcement::Enforce)
    }

    /// One line for conditions and Events.
    pub fn message(&self, region: &str) -> String {
        match (self.governing.is_empty(), self.violations.is_empty()) {
            (true, _) => "no DataResidencyPolicy governs this server".to_string(),
            (false, true) => format!(
                "region {region} is allowed by {}",
                quoted_list(&self.governing)
            ),
            (false, false) => {
                let messages: Vec<_> = self.violations.iter().map(|v| v.message.as_str()).collect();
                messages.join("; ")
            }
        }
    }
}

/// Evaluates a server's region against the policies that govern it.
///
/// `namespace_labels` are the labels of the server's namespace. A policy whose selector
/// cannot be evaluated (an unknown operator, say) governs nothing and is reported by
/// the policy controller, not here.
pub fn evaluate<'a>(
    subject: impl Into<Subject<'a>>,
    namespace_labels: &BTreeMap<String, String>,
    policies: &[DataResidencyPolicy],
) -> ResidencyVerdict {
    let subject = subject.into();
    // A policy whose selector cannot be evaluated governs every server, so a typo in a
    // compliance control blocks roll-outs instead of silently allowing any region.
    let mut governing: Vec<(&DataResidencyPolicy, Option<SelectorError>)> = policies
        .iter()
        .filter_map(
            |p| match matches(&p.spec.namespace_selector, namespace_labels) {
                Ok(true) => Some((p, None)),
                Ok(false) => None,
                Err(error) => Some((p, Some(error))),
            },
        )
        .collect();
    governing.sort_by_key(|(p, _)| policy_name(p));

    let violations = governing
        .iter()
        .filter_map(|(p, selector_error)| violation(p, selector_error.as_ref(), &subject))
        .collect();
    let governing: Vec<&DataResidencyPolicy> = governing.into_iter().map(|(p, _)| p).collect();

    ResidencyVerdict {
        governing: governing
            .iter()
            .map(|p| policy_name(p).to_string())
            .collect(),
        violations,
        allowed_regions: intersect_regions(&governing),
        enforced: governing.iter().any(|p| {
            let unevaluable = matches(&p.spec.namespace_selector, namespace_labels).is_err();
            unevaluable || p.spec.enforcement.unwrap_or_default() == Enforcement::Enforce
        }),
        region_label: governing
            .first()
            .and_then(|p| p.spec.region_label.clone())
            .unwrap_or_else(|| DEFAULT_REGION_LABEL.to_string()),
    }
}

fn violation(
    policy: &DataResidencyPolicy,
    selector_error: Option<&SelectorError>,
    subject: &Subject,
) -> Option<Violation> {
    let name = policy_name(policy);
    let region = subject.region;
    let mut broken = Vec::new();
    if let Some(error) = selector_error {
        let message = format!(
            "DataResidencyPolicy {name} cannot be evaluated ({error}); \
             no server is rolled out until it is fixed"
        );
        broken.push((Rule::Unevaluable, message));
    } else {
        if !policy.spec.allowed_regions.iter().any(|r| r == region) {
            let message = format!(
                "region {region} is not allowed by DataResidencyPolicy {name} (allowed: {})",
                policy.spec.allowed_regions.join(", ")
            );
            broken.push((Rule::Region, message));
        }
        if subject.plaintext_ftp && policy.spec.allow_plaintext_ftp != Some(true) {
            let message = format!(
                "plaintext FTP (ftps.allowPlaintext) is not allowed by DataResidencyPolicy \
                 {name} (the policy would need allowPlaintextFtp: true)"
            );
            broken.push((Rule::PlaintextFtp, message));
        }
        match &subject.storage {
            None => {}
            Some(Ok(storage)) if policy.spec.allowed_regions.contains(&storage.region) => {}
            Some(Ok(storage)) => {
                let message = format!(
                    "storage region {} is not allowed by DataResidencyPolicy {name} \
                     (allowed: {})",
                    storage.region,
                    policy.spec.allowed_regions.join(", ")
                );
                broken.push((Rule::StorageRegion, message));
            }
            Some(Err(error)) => {
                let message = format!(
                    "the storage region cannot be resolved ({error}), so DataResidencyPolicy \
                     {name} cannot allow it"
                );
                broken.push((Rule::StorageRegion, message));
            }
        }
    }
    let rule = broken.first()?.0;
    let enforcement = match rule {
        Rule::Unevaluable => Enforcement::Enforce,
        _ => policy.spec.enforcement.unwrap_or_default(),
    };
    let messages: Vec<String> = broken.into_iter().map(|(_, m)| m).collect();
    Some(Violation {
        policy: name.to_string(),
        rule,
        enforcement,
        message: messages.join("; "),
    })
}

fn policy_name(policy: &DataResidencyPolicy) -> &str {
    policy.metadata.name.as_deref().unwrap_or_default()
}

fn intersect_regions(governing: &[&DataResidencyPolicy]) -> Vec<String> {
    let Some((first, rest)) = governing.split_first() else {
        return Vec::new();
    };
    let mut regions: Vec<String> = first
        .spec
        .allowed_regions
        .iter()
        .filter(|r| rest.iter().all(|p| p.spec.allowed_regions.contains(r)))
        .cloned()
        .collect();
    regions.sort();
    regions.dedup();
    regions
}

fn quoted_list(names: &[String]) -> String {
    let quoted: Vec<String> = names
        .iter()
        .map(|n| format!("DataResidencyPolicy {n}"))
        .collect();
    quoted.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(
        name: &str,
        selector_yaml: &str,
        regions: &[&str],
        mode: Enforcement,
    ) -> DataResidencyPolicy {
        let mut p = DataResidencyPolicy::new(
            name,
            crate::api::DataResidencyPolicySpec {
                namespace_selector: serde_yaml::from_str(selector_yaml).unwrap(),
                allowed_regions: regions.iter().map(|r| r.to_string()).collect(),
                enforcement: Some(mode),
                region_label: None,
                allow_plaintext_ftp: None,
            },
        );
        p.metadata.name = Some(name.to_string());
        p
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn cn() -> BTreeMap<String, String> {
        labels(&[("sluice.dev/residency", "cn")])
    }

    const CN_SELECTOR: &str = "matchLabels: {sluice.dev/residency: cn}";

    #[test]
    fn allowed_region_complies() {
        let policies = [policy(
            "china",
            CN_SELECTOR,
            &["cn-shanghai"],
            Enforcement::Enforce,
        )];
        let verdict = evaluate("cn-shanghai", &cn(), &policies);
        assert!(verdict.compliant());
        assert_eq!(verdict.governing, ["china"]);
        assert_eq!(verdict.allowed_regions, ["cn-shanghai"]);
        assert_eq!(verdict.region_label, "topology.kubernetes.io/region");
    }

    #[test]
    fn hong_kong_is_not_mainland_china() {
        let policies = [policy(
            "china",
            CN_SELECTOR,
            &["cn-shanghai", "cn-beijing"],
            Enforcement::Enforce,
        )];
        let verdict = evaluate("cn-hongkong", &cn(), &policies);
        assert!(!verdict.compliant());
        assert!(verdict.blocks_rollout());
        assert_eq!(
            verdict.message("cn-hongkong"),
            "region cn-hongkong is not allowed by DataResidencyPolicy china \
             (allowed: cn-shanghai, cn-beijing)"
        );
    }

    #[test]
    fn a_policy_that_cannot_be_evaluated_blocks_every_server() {
        let broken = "matchExpressions: [{key: sluice.dev/residency, operator: in, values: [cn]}]";
        let policies = [policy("typo", broken, &["cn-shanghai"], Enforcement::Audit)];
        let verdict = evaluate("cn-shanghai", &labels(&[("team", "x")]), &policies);
        assert_eq!(verdict.governing, ["typo"]);
        assert!(verdict.blocks_rollout());
        assert!(
            verdict
                .message("cn-shanghai")
                .contains("cannot be evaluated"),
            "{verdict:?}"
        );
    }

    #[test]
    fn audit_mode_reports_without_blocking() {
        let policies = [policy(
            "china",
            CN_SELECTOR,
            &["cn-shanghai"],
            Enforcement::Audit,
        )];
        let verdict = evaluate("eu-central-1", &cn(), &policies);
        assert!(!verdict.compliant());
        assert!(!verdict.blocks_rollout());
    }

    #[test]
    fn unselected_namespace_is_ungoverned() {
        let policies = [policy(
            "china",
            CN_SELECTOR,
            &["cn-shanghai"],
            Enforcement::Enforce,
        )];
        let verdict = evaluate("us-east-1", &labels(&[("team", "x")]), &policies);
        assert!(verdict.compliant());
        assert!(verdict.governing.is_empty());
        assert_eq!(
            verdict.message("us-east-1"),
            "no DataResidencyPolicy governs this server"
        );
    }

    #[test]
    fn overlapping_policies_allow_only_the_intersection_and_strictest_wins() {
        let policies = [
            policy(
                "wide",
                "{}",
                &["cn-shanghai", "cn-beijing"],
                Enforcement::Audit,
            ),
            policy("narrow", CN_SELECTOR, &["cn-beijing"], Enforcement::Enforce),
        ];
        let verdict = evaluate("cn-shanghai", &cn(), &policies);
        assert_eq!(verdict.governing, ["narrow", "wide"]);
        assert_eq!(verdict.allowed_regions, ["cn-beijing"]);
        assert_eq!(verdict.violations.len(), 1);
        assert_eq!(verdict.violations[0].policy, "narrow");
        assert!(verdict.blocks_rollout());
    }

    fn plaintext(region: &str) -> Subject<'_> {
        Subject {
            region,
            plaintext_ftp: true,
            storage: None,
        }
    }

    #[test]
    fn plaintext_ftp_is_refused_unless_the_policy_allows_it() {
        let mut china = policy("china", CN_SELECTOR, &["cn-shanghai"], Enforcement::Enforce);
        let verdict = evaluate(
            plaintext("cn-shanghai"),
            &cn(),
            std::slice::from_ref(&china),
        );
        assert!(verdict.blocks_rollout());
        assert_eq!(verdict.broken_rule(), Some(Rule::PlaintextFtp));
        assert_eq!(
            verdict.message("cn-shanghai"),
            "plaintext FTP (ftps.allowPlaintext) is not allowed by DataResidencyPolicy china \
             (the policy would need allowPlaintextFtp: true)"
        );

        china.spec.allow_plaintext_ftp = Some(true);
        let verdict = evaluate(
            plaintext("cn-shanghai"),
            &cn(),
            std::slice::from_ref(&china),
        );
        assert!(verdict.compliant(), "{verdict:?}");
    }

    #[test]
    fn a_server_breaking_region_and_plaintext_rules_reports_both_and_the_region_first() {
        let policies = [policy(
            "china",
            CN_SELECTOR,
            &["cn-shanghai"],
            Enforcement::Audit,
        )];
        let verdict = evaluate(plaintext("cn-hongkong"), &cn(), &policies);
        assert!(!verdict.compliant());
        assert!(!verdict.blocks_rollout());
        assert_eq!(verdict.broken_rule(), Some(Rule::Region));
        let message = verdict.message("cn-hongkong");
        assert!(
            message.starts_with("region cn-hongkong is not allowed"),
            "{message}"
        );
        assert!(message.contains("plaintext FTP"), "{message}");
    }

    #[test]
    fn plaintext_ftp_on_an_ungoverned_server_is_not_a_violation() {
        let policies = [policy(
            "china",
            CN_SELECTOR,
            &["cn-shanghai"],
            Enforcement::Enforce,
        )];
        let verdict = evaluate(
            plaintext("cn-shanghai"),
            &labels(&[("team", "x")]),
            &policies,
        );
        assert!(verdict.compliant());
    }

    fn stored_in<'a>(
        region: &'a str,
        provider: region::Provider,
        endpoint: Option<&str>,
        declared: Option<&str>,
    ) -> Subject<'a> {
        Subject {
            region,
            plaintext_ftp: false,
            storage: Some(region::resolve_region(provider, endpoint, declared)),
        }
    }

    #[test]
    fn object_storage_regions_are_judged_for_every_provider() {
        use region::Provider::*;
        let mainland = [
            "cn-shanghai",
            "cn-beijing",
            "cn-north-1",
            "cn-northwest-1",
            "ap-shanghai",
            "ap-guangzhou",
            "cn-east-3",
            "cn-north-4",
            "chinaeast2",
        ];
        let china = policy("china", CN_SELECTOR, &mainland, Enforcement::Enforce);
        // (provider, endpoint, declared region, allowed?)
        let cases = [
            (
                Oss,
                Some("https://oss-cn-shanghai.aliyuncs.com"),
                None,
                true,
            ),
            (
                Oss,
                Some("oss-cn-beijing-internal.aliyuncs.com"),
                None,
                true,
            ),
            (
                Oss,
                Some("https://oss-cn-hongkong.aliyuncs.com"),
                None,
                false,
            ),
            (Oss, None, Some("cn-shanghai"), true),
            (
                S3,
                Some("https://s3.cn-north-1.amazonaws.com.cn"),
                None,
                true,
            ),
            (S3, None, Some("cn-northwest-1"), true),
            (S3, Some("https://s3.ap-east-1.amazonaws.com"), None, false),
            (
                S3,
                Some("https://s3-accelerate.amazonaws.com"),
                Some("cn-north-1"),
                false,
            ),
            (
                Cos,
                Some("https://cos.ap-guangzhou.myqcloud.com"),
                None,
                true,
            ),
            (
                Cos,
                Some("https://cos.ap-hongkong.myqcloud.com"),
                None,
                false,
            ),
            (
                Obs,
                Some("https://obs.cn-east-3.myhuaweicloud.com"),
                None,
                true,
            ),
            (
                Obs,
                Some("https://obs.ap-southeast-1.myhuaweicloud.com"),
                None,
                false,
            ),
            (
                AzureBlob,
                Some("https://acct.blob.core.chinacloudapi.cn"),
                Some("chinaeast2"),
                true,
            ),
            (
                AzureBlob,
                Some("https://acct.blob.core.windows.net"),
                Some("eastasia"),
                false,
            ),
            (Gcs, None, Some("asia-east2"), false),
            (
                S3Compatible,
                Some("http://127.0.0.1:8333"),
                Some("cn-shanghai"),
                true,
            ),
            (S3Compatible, Some("http://127.0.0.1:8333"), None, false),
        ];
        for (provider, endpoint, declared, allowed) in cases {
            let subject = stored_in("cn-shanghai", provider, endpoint, declared);
            let verdict = evaluate(subject, &cn(), std::slice::from_ref(&china));
            assert_eq!(
                verdict.compliant(),
                allowed,
                "{provider:?} {endpoint:?} {declared:?}: {}",
                verdict.message("cn-shanghai")
            );
            if !allowed {
                assert_eq!(verdict.broken_rule(), Some(Rule::StorageRegion));
                assert_eq!(
                    verdict.violation_reason(),
                    crate::api::Reason::StorageRegionNotAllowed
                );
                assert!(verdict.blocks_rollout());
            }
        }
    }

    #[test]
    fn a_storage_region_outside_the_policy_is_named() {
        let china = policy("china", CN_SELECTOR, &["cn-shanghai"], Enforcement::Audit);
        let subject = stored_in(
            "cn-shanghai",
            region::Provider::Oss,
            Some("https://oss-cn-hongkong.aliyuncs.com"),
            None,
        );
        let verdict = evaluate(subject, &cn(), std::slice::from_ref(&china));
        assert!(!verdict.compliant());
        assert!(
            !verdict.blocks_rollout(),
            "Audit reports, it does not block"
        );
        assert_eq!(
            verdict.message("cn-shanghai"),
            "storage region cn-hongkong is not allowed by DataResidencyPolicy china \
             (allowed: cn-shanghai)"
        );
    }

    #[test]
    fn an_unresolvable_storage_region_is_never_allowed() {
        let china = policy("china", CN_SELECTOR, &["cn-north-1"], Enforcement::Enforce);
        let subject = stored_in(
            "cn-north-1",
            region::Provider::S3,
            Some("https://bucket.s3-accelerate.amazonaws.com"),
            None,
        );
        let verdict = evaluate(subject, &cn(), std::slice::from_ref(&china));
        assert!(verdict.blocks_rollout());
        assert!(
            verdict.message("cn-north-1").contains("cannot be resolved"),
            "{}",
            verdict.message("cn-north-1")
        );
    }
}
