//! Residency evaluation: which policies govern a server and whether it complies.
//!
//! Pure: no I/O, and the time is an argument. The operator, the offline checker
//! (`sluice check`) and the policy status all call [`evaluate`], so they reach the same
//! verdict from the same inputs; the admission policy ([`admission`], `sluice
//! admission-policy`) is generated from the same catalogue, rules and [`messages`].
//!
//! A policy governs a server when its `namespaceSelector` selects the server's namespace
//! and its `serverSelector`, if any, the server's labels. Overlapping policies combine
//! strictly: a server must satisfy every policy that governs it, a region is allowed
//! only if all of them allow it, and a violation is enforced if any violated policy is in
//! `Enforce` mode.
//!
//! A policy allows a region that it lists in `allowedRegions`, that the catalogue places
//! in one of its `jurisdictions` ([`region::node_jurisdiction`] for a node region, the
//! provider's own catalogue for a bucket), or that an unexpired cross-border allowance
//! names. An expired allowance is a violation of its own (`CrossBorderTransfer`), so the
//! status says what changed.

pub mod admission;
pub mod messages;
pub mod region;
mod selector;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{NodeSelectorRequirement, PersistentVolume};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use region::{RegionError, ResolvedRegion};
pub use selector::{SelectorError, matches};

use crate::api::{
    DEFAULT_REGION_LABEL, DataResidencyPolicy, Enforcement, Jurisdiction, Reason, TransferServer,
};

/// The node label that carries a node's zone, used to place a volume that names only its
/// zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// What a policy judges of a server.
#[derive(Clone, Debug, PartialEq)]
pub struct Subject<'a> {
    /// The region the server declares.
    pub region: &'a str,
    /// The server's labels, for `serverSelector`.
    pub labels: BTreeMap<String, String>,
    /// Whether the server offers FTP without TLS (`ftps.allowPlaintext`).
    pub plaintext_ftp: bool,
    /// Whether the server also writes its audit log to standard output.
    pub audit_log_stdout: bool,
    /// Where an object store keeps the server's files: the region resolved from its
    /// provider, endpoint and declaration, or why none can be. `None` for a volume.
    pub storage: Option<Result<ResolvedRegion, RegionError>>,
    /// The host of the object store's endpoint: the one given, or the provider's public
    /// regional endpoint. `None` for a volume, or when no endpoint can be worked out.
    pub endpoint: Option<String>,
    /// The volume, when the server keeps its files on one.
    pub volume: Option<Placement<'a>>,
}

/// What the cluster says about where a server's volume is.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement<'a> {
    /// The StorageClass the server names.
    pub storage_class_name: &'a str,
    /// That StorageClass, `None` when it does not exist.
    pub storage_class: Option<&'a StorageClass>,
    /// The PersistentVolume bound to the server's claim, once bound.
    pub bound: Option<&'a PersistentVolume>,
    /// The labels of every node, to place a volume that names only its zone.
    pub nodes: &'a [BTreeMap<String, String>],
}

impl<'a> Subject<'a> {
    /// What a policy judges of `server`, before anything is known of its volume's
    /// placement (see [`Subject::with_placement`]).
    pub fn of(server: &'a TransferServer) -> Self {
        let spec = &server.spec;
        let plaintext_ftp = spec
            .protocols
            .ftps
            .as_ref()
            .and_then(|f| f.allow_plaintext)
            .unwrap_or(false);
        let audit_log_stdout = spec
            .audit_log
            .as_ref()
            .and_then(|a| a.stdout)
            .unwrap_or(false);
        let store = spec.storage.object_store.as_ref();
        let storage = store.map(|store| {
            region::resolve_region(
                store.provider,
                store.endpoint.as_deref(),
                store.region.as_deref(),
            )
        });
        let endpoint = store.and_then(|store| {
            let endpoint = match &store.endpoint {
                Some(endpoint) => Some(endpoint.clone()),
                None => storage
                    .as_ref()
                    .and_then(|r| r.as_ref().ok())
                    .and_then(|r| {
                        crate::storage::object::default_endpoint(store.provider, &r.region)
                    }),
            };
            endpoint.and_then(|e| region::endpoint_host(&e).ok())
        });
        Self {
            region: &spec.region,
            labels: server.labels().clone(),
            plaintext_ftp,
            audit_log_stdout,
            storage,
            endpoint,
            volume: None,
        }
    }

    /// The same subject with its volume's placement, when the server keeps its files on a
    /// volume.
    pub fn with_placement(
        mut self,
        server: &'a TransferServer,
        storage_class: Option<&'a StorageClass>,
        bound: Option<&'a PersistentVolume>,
        nodes: &'a [BTreeMap<String, String>],
    ) -> Self {
        self.volume = server.spec.storage.volume.as_ref().map(|v| Placement {
            storage_class_name: &v.storage_class_name,
            storage_class,
            bound,
            nodes,
        });
        self
    }
}

/// A server known only by its region.
impl<'a> From<&'a str> for Subject<'a> {
    fn from(region: &'a str) -> Self {
        Self {
            region,
            labels: BTreeMap::new(),
            plaintext_ftp: false,
            audit_log_stdout: false,
            storage: None,
            endpoint: None,
            volume: None,
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
    /// Node labels that must carry the region, one per governing policy's `regionLabel`
    /// (see [`region_labels`]).
    pub region_labels: Vec<String>,
    /// Whether any governing policy is enforced (`Enforce`, or one that cannot be
    /// evaluated), so that the data plane refuses what the policies do not allow rather
    /// than only reporting it.
    pub enforced: bool,
    /// The cross-border allowances the server relies on, sorted by policy and reference.
    pub allowances: Vec<AllowanceUse>,
}

/// A cross-border allowance a compliant server relies on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowanceUse {
    /// The policy that grants it.
    pub policy: String,
    /// Its assessment reference.
    pub reference: String,
    /// Whether the granting policy is enforced (then its expiry and volume limit stop
    /// uploads).
    pub enforced: bool,
    /// The region outside the allowed ones it permits.
    pub region: String,
    /// When it ends.
    pub expires: Timestamp,
    /// Most bytes of uploads it covers, if limited.
    pub max_bytes: Option<u64>,
    /// Most individuals it covers, as recorded.
    pub max_individuals: Option<i64>,
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
    /// Human-readable explanation naming the policy, the rule and the values: the
    /// messages of every breach, joined by `; `.
    pub message: String,
    /// Every rule of the policy the server breaks, in the order they are checked
    /// (`rule` is the first).
    pub breaches: Vec<Breach>,
}

/// One rule of one policy that a server breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Breach {
    /// The rule.
    pub rule: Rule,
    /// What is wrong, naming the policy and the values.
    pub message: String,
}

/// A rule of a policy that a server can break.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    /// The policy cannot be evaluated, so it allows nothing.
    Unevaluable,
    /// The server's region is not allowed.
    Region,
    /// The object store's region is not allowed, or cannot be resolved.
    StorageRegion,
    /// The volume's StorageClass is not allowed, or cannot show that its volumes stay
    /// in the allowed regions.
    StorageClass,
    /// The bound PersistentVolume lies outside the allowed regions, or does not say
    /// where it lies.
    Volume,
    /// The object store's endpoint is not among the allowed ones.
    Endpoint,
    /// The server offers plaintext FTP and the policy does not allow it.
    PlaintextFtp,
    /// The server writes its audit log to standard output and the policy does not allow
    /// it.
    AuditLogStdout,
    /// The cross-border allowance the server relied on has expired.
    CrossBorderTransfer,
}

impl Rule {
    /// The rule's name, as the policy status and `sluice check` show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unevaluable => "Unevaluable",
            Self::Region => "Region",
            Self::StorageRegion => "StorageRegion",
            Self::StorageClass => "StorageClass",
            Self::Volume => "Volume",
            Self::Endpoint => "Endpoint",
            Self::PlaintextFtp => "PlaintextFtp",
            Self::AuditLogStdout => "AuditLogStdout",
            Self::CrossBorderTransfer => "CrossBorderTransfer",
        }
    }

    /// The condition and Event reason for a server that breaks this rule.
    pub fn reason(self) -> Reason {
        match self {
            Self::Unevaluable => Reason::PolicyUnevaluable,
            Self::Region => Reason::RegionNotAllowed,
            Self::StorageRegion => Reason::StorageRegionNotAllowed,
            Self::StorageClass => Reason::StorageClassNotAllowed,
            Self::Volume => Reason::VolumeOutsideRegion,
            Self::Endpoint => Reason::EndpointNotAllowed,
            Self::PlaintextFtp => Reason::PlaintextNotAllowed,
            Self::AuditLogStdout => Reason::AuditLogStdoutNotAllowed,
            Self::CrossBorderTransfer => Reason::CrossBorderTransferExpired,
        }
    }
}

impl ResidencyVerdict {
    /// The rule broken by the first violation, if any.
    pub fn broken_rule(&self) -> Option<Rule> {
        self.violations.first().map(|v| v.rule)
    }

    /// The `ResidencyCompliant` condition the operator reports for this verdict: whether
    /// the server complies, and the reason (`NoPolicy`, `RegionAllowed`, `AuditOnly` when
    /// only `Audit` policies are violated, else the reason of the first broken rule).
    pub fn condition(&self) -> (bool, Reason) {
        match (
            self.governing.is_empty(),
            self.compliant(),
            self.blocks_rollout(),
        ) {
            (true, _, _) => (true, Reason::NoPolicy),
            (false, true, _) => (true, Reason::RegionAllowed),
            (false, false, true) => (false, self.violation_reason()),
            (false, false, false) => (false, Reason::AuditOnly),
        }
    }

    /// The condition reason for a non-compliant verdict: what rule is broken.
    pub fn violation_reason(&self) -> Reason {
        self.broken_rule()
            .map_or(Reason::RegionNotAllowed, Rule::reason)
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

    /// When the verdict changes by itself: the first expiry of an allowance the server
    /// relies on.
    pub fn next_change(&self) -> Option<Timestamp> {
        self.allowances.iter().map(|a| a.expires).min()
    }

    /// One line for conditions and Events.
    pub fn message(&self, region: &str) -> String {
        match (self.governing.is_empty(), self.violations.is_empty()) {
            (true, _) => "no DataResidencyPolicy governs this server".to_string(),
            (false, true) => {
                let mut message = format!(
                    "region {region} is allowed by {}",
                    quoted_list(&self.governing)
                );
                for a in &self.allowances {
                    message.push_str(&format!(
                        "; {} is allowed until {} by cross-border transfer {} of \
                         DataResidencyPolicy {}",
                        a.region, a.expires, a.reference, a.policy
                    ));
                }
                message
            }
            (false, false) => {
                let messages: Vec<_> = self.violations.iter().map(|v| v.message.as_str()).collect();
                messages.join("; ")
            }
        }
    }
}

/// Evaluates a server against the policies that govern it, at time `now`.
///
/// `namespace_labels` are the labels of the server's namespace. A policy whose selector
/// cannot be evaluated (an unknown operator, say) governs every server and blocks it, so
/// a typo in a compliance control blocks roll-outs instead of silently allowing any
/// region.
pub fn evaluate<'a>(
    subject: impl Into<Subject<'a>>,
    namespace_labels: &BTreeMap<String, String>,
    policies: &[DataResidencyPolicy],
    now: Timestamp,
) -> ResidencyVerdict {
    let subject = subject.into();
    let mut governing: Vec<(&DataResidencyPolicy, Option<SelectorError>)> = policies
        .iter()
        .filter_map(|p| match governs(p, namespace_labels, &subject.labels) {
            Ok(true) => Some((p, None)),
            Ok(false) => None,
            Err(error) => Some((p, Some(error))),
        })
        .collect();
    governing.sort_by_key(|(p, _)| policy_name(p));

    let mut violations = Vec::new();
    let mut allowances = Vec::new();
    for (policy, selector_error) in &governing {
        let judged = judge(policy, selector_error.as_ref(), &subject, now);
        violations.extend(judged.violation);
        allowances.extend(judged.allowances);
    }
    allowances
        .sort_by(|a: &AllowanceUse, b| (&a.policy, &a.reference).cmp(&(&b.policy, &b.reference)));
    allowances.dedup();

    ResidencyVerdict {
        governing: governing
            .iter()
            .map(|(p, _)| policy_name(p).to_string())
            .collect(),
        violations,
        enforced: governing.iter().any(|(p, error)| {
            error.is_some() || p.spec.enforcement.unwrap_or_default() == Enforcement::Enforce
        }),
        region_labels: region_labels(governing.iter().map(|(p, _)| *p)),
        allowances,
    }
}

/// The node labels that must carry the server's region under the policies that govern
/// it: each policy's `regionLabel` (the default for those that name none), sorted; the
/// default alone when none governs. Pods are pinned under every one of them.
pub fn region_labels<'a>(governing: impl Iterator<Item = &'a DataResidencyPolicy>) -> Vec<String> {
    let mut labels: Vec<String> = governing
        .map(|p| {
            p.spec
                .region_label
                .clone()
                .unwrap_or_else(|| DEFAULT_REGION_LABEL.to_string())
        })
        .collect();
    if labels.is_empty() {
        labels.push(DEFAULT_REGION_LABEL.to_string());
    }
    labels.sort();
    labels.dedup();
    labels
}

/// [`region_labels`] of the policies among `policies` that govern a server with
/// `server_labels` in a namespace with `namespace_labels` (one whose selectors cannot be
/// evaluated governs, as in [`evaluate`]).
pub fn region_labels_of(
    policies: &[DataResidencyPolicy],
    namespace_labels: &BTreeMap<String, String>,
    server_labels: &BTreeMap<String, String>,
) -> Vec<String> {
    region_labels(
        policies
            .iter()
            .filter(|p| governs(p, namespace_labels, server_labels) != Ok(false)),
    )
}

/// Whether `policy` governs a server with `server_labels` in a namespace with
/// `namespace_labels`.
pub fn governs(
    policy: &DataResidencyPolicy,
    namespace_labels: &BTreeMap<String, String>,
    server_labels: &BTreeMap<String, String>,
) -> Result<bool, SelectorError> {
    let namespace = matches(&policy.spec.namespace_selector, namespace_labels);
    let server = match &policy.spec.server_selector {
        Some(selector) => matches(selector, server_labels),
        None => Ok(true),
    };
    Ok(namespace? && server?)
}

/// How a policy allows a region.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Allowed {
    /// Listed, or inside an allowed jurisdiction.
    Yes,
    /// By an unexpired cross-border allowance.
    Allowance(AllowanceUse),
    /// Only by allowances that have expired (the first to have).
    Expired(AllowanceUse),
    /// Not at all.
    No,
}

/// Whether `policy` allows `region`, which the catalogue places in `jurisdiction`.
fn allows(
    policy: &DataResidencyPolicy,
    region: &str,
    jurisdiction: Option<Jurisdiction>,
    now: Timestamp,
) -> Allowed {
    let spec = &policy.spec;
    let listed = spec.allowed_regions.iter().any(|r| r == region);
    let inside = jurisdiction.is_some_and(|j| spec.jurisdictions.contains(&j));
    if listed || inside {
        return Allowed::Yes;
    }
    let mut uses: Vec<AllowanceUse> = spec
        .cross_border_transfers
        .iter()
        .filter(|t| t.destination_region == region)
        .map(|t| AllowanceUse {
            policy: policy_name(policy).to_string(),
            reference: t.assessment_reference.clone(),
            enforced: policy.spec.enforcement.unwrap_or_default() == Enforcement::Enforce,
            region: region.to_string(),
            expires: t.expires.0,
            max_bytes: t.max_volume.as_deref().map(volume_limit),
            max_individuals: t.max_individuals,
        })
        .collect();
    // The allowance lasting longest serves; an expired one only explains a refusal.
    uses.sort_by_key(|u| std::cmp::Reverse(u.expires));
    match uses.into_iter().next() {
        Some(use_) if use_.expires > now => Allowed::Allowance(use_),
        Some(use_) => Allowed::Expired(use_),
        None => Allowed::No,
    }
}

/// What one policy finds.
struct Judgement {
    violation: Option<Violation>,
    allowances: Vec<AllowanceUse>,
}

fn judge(
    policy: &DataResidencyPolicy,
    selector_error: Option<&SelectorError>,
    subject: &Subject,
    now: Timestamp,
) -> Judgement {
    let name = policy_name(policy);
    let mut broken: Vec<Breach> = Vec::new();
    let mut allowances = Vec::new();
    let mut breach = |rule, message| broken.push(Breach { rule, message });
    if let Some(error) = selector_error {
        let message = messages::unevaluable(name, &error.to_string());
        return Judgement {
            violation: Some(Violation {
                policy: name.to_string(),
                rule: Rule::Unevaluable,
                enforcement: Enforcement::Enforce,
                message: message.clone(),
                breaches: vec![Breach {
                    rule: Rule::Unevaluable,
                    message,
                }],
            }),
            allowances,
        };
    }
    let spec = &policy.spec;
    let allowed_text = allowed_text(policy);
    let mut judge_region = |what: &str, region: &str, jurisdiction, rule| match allows(
        policy,
        region,
        jurisdiction,
        now,
    ) {
        Allowed::Yes => None,
        Allowed::Allowance(use_) => {
            allowances.push(use_);
            None
        }
        Allowed::Expired(use_) => Some((
            Rule::CrossBorderTransfer,
            messages::allowance_expired(&use_.reference, name, region, &use_.expires.to_string()),
        )),
        Allowed::No => Some((
            rule,
            messages::not_allowed(what, region, name, &allowed_text),
        )),
    };

    let region = subject.region;
    let node_jurisdiction = region::node_jurisdiction(region);
    if let Some((rule, message)) = judge_region("region", region, node_jurisdiction, Rule::Region) {
        breach(rule, message);
    }
    match &subject.storage {
        None => {}
        Some(Ok(storage)) => {
            let jurisdiction = storage.jurisdiction.and_then(Jurisdiction::from_code);
            let judged = judge_region(
                "storage region",
                &storage.region,
                jurisdiction,
                Rule::StorageRegion,
            );
            if let Some((rule, message)) = judged {
                breach(rule, message);
            }
        }
        Some(Err(error)) => breach(
            Rule::StorageRegion,
            messages::storage_unresolvable(&error.to_string(), name),
        ),
    }
    if let Some(placement) = &subject.volume {
        let label = spec.region_label.as_deref().unwrap_or(DEFAULT_REGION_LABEL);
        let mut regions_allowed = |regions: &BTreeSet<String>| {
            regions
                .iter()
                .filter(|r| {
                    let allowed = allows(policy, r, region::node_jurisdiction(r), now);
                    !matches!(allowed, Allowed::Yes | Allowed::Allowance(_))
                })
                .cloned()
                .collect::<Vec<_>>()
        };
        if let Some(problem) = storage_class_problem(placement, spec, label, &mut regions_allowed) {
            breach(Rule::StorageClass, messages::volume_problem(&problem, name));
        }
        if let Some(problem) = volume_problem(placement, label, &mut regions_allowed) {
            breach(Rule::Volume, messages::volume_problem(&problem, name));
        }
    }
    if let Some(host) = &subject.endpoint
        && !spec.allowed_endpoints.is_empty()
        && !spec
            .allowed_endpoints
            .iter()
            .any(|p| endpoint_matches(p, host))
    {
        let allowed = spec.allowed_endpoints.join(", ");
        breach(
            Rule::Endpoint,
            messages::endpoint_not_allowed(host, name, &allowed),
        );
    }
    if subject.plaintext_ftp && spec.allow_plaintext_ftp != Some(true) {
        breach(Rule::PlaintextFtp, messages::plaintext_ftp(name));
    }
    if subject.audit_log_stdout && spec.allow_audit_log_stdout != Some(true) {
        breach(Rule::AuditLogStdout, messages::audit_log_stdout(name));
    }

    let violation = broken.first().map(|first| Violation {
        policy: name.to_string(),
        rule: first.rule,
        enforcement: spec.enforcement.unwrap_or_default(),
        message: broken
            .iter()
            .map(|b| b.message.as_str())
            .collect::<Vec<_>>()
            .join("; "),
        breaches: broken.clone(),
    });
    Judgement {
        violation,
        allowances,
    }
}

/// Why a volume's StorageClass cannot show that its volumes stay in allowed regions.
/// `disallowed` returns the regions of a set that the policy does not allow.
fn storage_class_problem(
    placement: &Placement,
    spec: &crate::api::DataResidencyPolicySpec,
    region_label: &str,
    disallowed: &mut impl FnMut(&BTreeSet<String>) -> Vec<String>,
) -> Option<String> {
    let name = placement.storage_class_name;
    if !spec.allowed_storage_classes.is_empty()
        && !spec.allowed_storage_classes.iter().any(|c| c == name)
    {
        let allowed = spec.allowed_storage_classes.join(", ");
        return Some(messages::storage_class_not_allowed(name, &allowed));
    }
    let Some(class) = placement.storage_class else {
        return Some(format!(
            "StorageClass {name} does not exist, so where its volumes are cannot be checked"
        ));
    };
    if class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer") {
        // The volume is provisioned where the region-pinned pod is scheduled.
        return None;
    }
    let Some(regions) = topology_regions(class, region_label) else {
        return Some(format!(
            "StorageClass {name} binds volumes immediately and its allowedTopologies do not \
             restrict {region_label}, so its volumes may be created in any region \
             (use volumeBindingMode: WaitForFirstConsumer or allowedTopologies)"
        ));
    };
    let outside = disallowed(&regions);
    (!outside.is_empty()).then(|| {
        format!(
            "StorageClass {name} may create volumes in {}, which is not allowed",
            outside.join(", ")
        )
    })
}

/// The regions a StorageClass's `allowedTopologies` restrict `region_label` (or the
/// default region label) to, if every term restricts it.
fn topology_regions(class: &StorageClass, region_label: &str) -> Option<BTreeSet<String>> {
    let terms = class.allowed_topologies.as_deref().unwrap_or_default();
    if terms.is_empty() {
        return None;
    }
    let mut regions = BTreeSet::new();
    for term in terms {
        let restriction = term
            .match_label_expressions
            .iter()
            .flatten()
            .find(|e| e.key == region_label || e.key == DEFAULT_REGION_LABEL)?;
        regions.extend(restriction.values.iter().cloned());
    }
    Some(regions)
}

/// Why the bound volume is not in an allowed region, or does not say where it is.
fn volume_problem(
    placement: &Placement,
    region_label: &str,
    disallowed: &mut impl FnMut(&BTreeSet<String>) -> Vec<String>,
) -> Option<String> {
    let volume = placement.bound?;
    let name = volume.name_any();
    let Some(regions) = volume_regions(volume, region_label, placement.nodes) else {
        return Some(format!(
            "the bound PersistentVolume {name} does not say which region it is in (its \
             node affinity names no region, and no node carries its zone)"
        ));
    };
    let outside = disallowed(&regions);
    (!outside.is_empty()).then(|| {
        format!(
            "the bound PersistentVolume {name} is in {}, which is not allowed",
            outside.join(", ")
        )
    })
}

/// The regions a PersistentVolume's required node affinity confines it to: the region
/// label's values, or the regions of the nodes in the zones it names. `None` when a term
/// names neither.
pub fn volume_regions(
    volume: &PersistentVolume,
    region_label: &str,
    nodes: &[BTreeMap<String, String>],
) -> Option<BTreeSet<String>> {
    let terms = volume
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms
        .as_slice();
    if terms.is_empty() {
        return None;
    }
    let mut regions = BTreeSet::new();
    for term in terms {
        let expressions = term.match_expressions.as_deref().unwrap_or_default();
        let values = |key: &str| -> Option<&NodeSelectorRequirement> {
            expressions
                .iter()
                .find(|e| e.key == key && e.operator == "In")
        };
        if let Some(e) = values(region_label).or_else(|| values(DEFAULT_REGION_LABEL)) {
            regions.extend(e.values.iter().flatten().cloned());
            continue;
        }
        let zones = values(ZONE_LABEL)?;
        let zones: Vec<&String> = zones.values.iter().flatten().collect();
        let of_zones: BTreeSet<String> = nodes
            .iter()
            .filter(|n| n.get(ZONE_LABEL).is_some_and(|z| zones.contains(&z)))
            .filter_map(|n| n.get(region_label).cloned())
            .collect();
        if of_zones.is_empty() {
            return None;
        }
        regions.extend(of_zones);
    }
    Some(regions)
}

/// Whether an endpoint host matches an allowed pattern: the host itself, or `*.SUFFIX`
/// for any host ending in `.SUFFIX`.
pub fn endpoint_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim().trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .is_some_and(|rest| rest.ends_with('.') && rest.len() > 1),
        None => host == pattern,
    }
}

/// What a policy allows, for messages: its regions and jurisdictions.
fn allowed_text(policy: &DataResidencyPolicy) -> String {
    let regions = policy.spec.allowed_regions.iter().map(String::as_str);
    messages::allowed_text(regions, policy.spec.jurisdictions.iter().copied())
}

/// Bytes in a Kubernetes quantity (`1000G`, `500Gi`, `1e12`, `1500m`), rounded up to a
/// whole byte (and at most `u64::MAX`); `None` for a negative or unreadable one.
pub fn quantity_bytes(quantity: &str) -> Option<u64> {
    let quantity = quantity.trim();
    let split = quantity
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent => {
            let exponent: i32 = exponent.strip_prefix(['e', 'E'])?.parse().ok()?;
            10f64.powi(exponent)
        }
    };
    let bytes = number * factor;
    // Beyond u64 is as good as unlimited; `as` saturates.
    (!bytes.is_nan() && bytes >= 0.0).then_some(bytes.ceil() as u64)
}

/// The byte limit of an allowance's `maxVolume`: one that cannot be read (negative, say,
/// from an object older than the schema's pattern) allows nothing rather than everything.
fn volume_limit(max_volume: &str) -> u64 {
    quantity_bytes(max_volume).unwrap_or(0)
}

fn policy_name(policy: &DataResidencyPolicy) -> &str {
    policy.metadata.name.as_deref().unwrap_or_default()
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
                ..Default::default()
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

    fn now() -> Timestamp {
        "2026-12-04T12:00:00Z".parse().unwrap()
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
        let verdict = evaluate("cn-shanghai", &cn(), &policies, now());
        assert!(verdict.compliant());
        assert_eq!(verdict.governing, ["china"]);
        assert_eq!(verdict.region_labels, ["topology.kubernetes.io/region"]);
    }

    #[test]
    fn hong_kong_is_not_mainland_china() {
        let policies = [policy(
            "china",
            CN_SELECTOR,
            &["cn-shanghai", "cn-beijing"],
            Enforcement::Enforce,
        )];
        let verdict = evaluate("cn-hongkong", &cn(), &policies, now());
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
        let verdict = evaluate("cn-shanghai", &labels(&[("team", "x")]), &policies, now());
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
        let verdict = evaluate("eu-central-1", &cn(), &policies, now());
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
        let verdict = evaluate("us-east-1", &labels(&[("team", "x")]), &policies, now());
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
        let verdict = evaluate("cn-shanghai", &cn(), &policies, now());
        assert_eq!(verdict.governing, ["narrow", "wide"]);
        assert_eq!(verdict.violations.len(), 1);
        assert_eq!(verdict.violations[0].policy, "narrow");
        assert!(verdict.blocks_rollout());
    }

    fn plaintext(region: &str) -> Subject<'_> {
        Subject {
            plaintext_ftp: true,
            ..Subject::from(region)
        }
    }

    #[test]
    fn plaintext_ftp_is_refused_unless_the_policy_allows_it() {
        let mut china = policy("china", CN_SELECTOR, &["cn-shanghai"], Enforcement::Enforce);
        let verdict = evaluate(
            plaintext("cn-shanghai"),
            &cn(),
            std::slice::from_ref(&china),
            now(),
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
            now(),
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
        let verdict = evaluate(plaintext("cn-hongkong"), &cn(), &policies, now());
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
            now(),
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
            storage: Some(region::resolve_region(provider, endpoint, declared)),
            ..Subject::from(region)
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
            let verdict = evaluate(subject, &cn(), std::slice::from_ref(&china), now());
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
        let verdict = evaluate(subject, &cn(), std::slice::from_ref(&china), now());
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
        let verdict = evaluate(subject, &cn(), std::slice::from_ref(&china), now());
        assert!(verdict.blocks_rollout());
        assert!(
            verdict.message("cn-north-1").contains("cannot be resolved"),
            "{}",
            verdict.message("cn-north-1")
        );
    }

    fn policy_yaml(yaml: &str) -> DataResidencyPolicy {
        serde_yaml::from_str(yaml).expect("a DataResidencyPolicy")
    }

    fn server_yaml(yaml: &str) -> TransferServer {
        serde_yaml::from_str(yaml).expect("a TransferServer")
    }

    /// A server in namespace `ns` with the given region and storage (YAML of `storage`).
    fn server(region: &str, storage: &str) -> TransferServer {
        server_yaml(&format!(
            "apiVersion: sluice.dev/v1alpha1
kind: TransferServer
metadata: {{name: files, namespace: ns, labels: {{tier: gold}}}}
spec:
  region: {region}
  protocols: {{sftp: {{}}}}
  storage: {storage}
"
        ))
    }

    const VOLUME: &str = "{volume: {storageClassName: regional, size: 1Gi}}";

    const MAINLAND: &str = "apiVersion: sluice.dev/v1alpha1
kind: DataResidencyPolicy
metadata: {name: mainland}
spec:
  namespaceSelector: {}
  jurisdictions: [CN]
";

    #[test]
    fn a_cn_jurisdiction_allows_mainland_regions_of_every_provider_and_never_hk_mo_or_tw() {
        let policies = [policy_yaml(MAINLAND)];
        let cases = [
            ("cn-shanghai", true),    // Alibaba Cloud
            ("cn-north-1", true),     // AWS China and Huawei Cloud agree
            ("cn-northwest-1", true), // AWS China
            ("ap-guangzhou", true),   // Tencent Cloud
            ("cn-east-3", true),      // Huawei Cloud
            ("chinaeast2", true),     // Azure China
            ("cn-hongkong", false),
            ("ap-east-1", false),
            ("ap-hongkong", false),
            ("ap-taipei", false),
            ("asia-east1", false), // Taiwan
            ("asia-east2", false), // Hong Kong
            ("eastasia", false),   // Hong Kong
            // Singapore at AWS and Alibaba Cloud, Hong Kong at Huawei Cloud: in none.
            ("ap-southeast-1", false),
            ("mars-north-1", false),
        ];
        for (region, allowed) in cases {
            let verdict = evaluate(region, &BTreeMap::new(), &policies, now());
            assert_eq!(verdict.compliant(), allowed, "{region}: {verdict:?}");
            if !allowed {
                assert_eq!(verdict.broken_rule(), Some(Rule::Region), "{region}");
                assert_eq!(
                    verdict.message(region),
                    format!(
                        "region {region} is not allowed by DataResidencyPolicy mainland \
                         (allowed: jurisdiction CN (mainland China))"
                    )
                );
            }
        }
    }

    #[test]
    fn listed_regions_and_jurisdictions_each_allow() {
        let policies = [policy_yaml(
            "apiVersion: sluice.dev/v1alpha1
kind: DataResidencyPolicy
metadata: {name: europe}
spec:
  namespaceSelector: {}
  allowedRegions: [onprem-frankfurt]
  jurisdictions: [EU]
",
        )];
        let cases = [
            ("onprem-frankfurt", true),
            ("eu-central-1", true),
            ("westeurope", true),
            ("europe-west4", true),
            ("eu-west-2", false), // London
            ("uksouth", false),
            ("switzerlandnorth", false),
            // Ireland at AWS, London at Alibaba Cloud: in no jurisdiction.
            ("eu-west-1", false),
        ];
        for (region, allowed) in cases {
            let verdict = evaluate(region, &BTreeMap::new(), &policies, now());
            assert_eq!(verdict.compliant(), allowed, "{region}: {verdict:?}");
        }
    }

    #[test]
    fn a_server_selector_narrows_the_servers_a_policy_governs() {
        let gold = policy_yaml(
            "apiVersion: sluice.dev/v1alpha1
kind: DataResidencyPolicy
metadata: {name: gold-only}
spec:
  namespaceSelector: {matchLabels: {sluice.dev/residency: cn}}
  serverSelector: {matchExpressions: [{key: tier, operator: In, values: [gold]}]}
  allowedRegions: [cn-shanghai]
",
        );
        let files = server("cn-beijing", VOLUME);
        let mut bronze = files.clone();
        bronze.metadata.labels = Some(labels(&[("tier", "bronze")]));
        let policies = std::slice::from_ref(&gold);

        let verdict = evaluate(Subject::of(&files), &cn(), policies, now());
        assert_eq!(verdict.governing, ["gold-only"]);
        assert_eq!(verdict.broken_rule(), Some(Rule::Region));
        let verdict = evaluate(Subject::of(&bronze), &cn(), policies, now());
        assert!(verdict.governing.is_empty(), "{verdict:?}");
        let verdict = evaluate(Subject::of(&files), &labels(&[]), policies, now());
        assert!(
            verdict.governing.is_empty(),
            "the namespace is not selected"
        );
    }

    #[test]
    fn a_bad_server_selector_governs_every_server_and_blocks_it() {
        let typo = policy_yaml(
            "apiVersion: sluice.dev/v1alpha1
kind: DataResidencyPolicy
metadata: {name: typo}
spec:
  namespaceSelector: {}
  serverSelector: {matchExpressions: [{key: tier, operator: Equals, values: [gold]}]}
  allowedRegions: [cn-shanghai]
  enforcement: Audit
",
        );
        let files = server("cn-shanghai", VOLUME);
        let verdict = evaluate(Subject::of(&files), &cn(), &[typo], now());
        assert_eq!(verdict.broken_rule(), Some(Rule::Unevaluable));
        assert!(verdict.blocks_rollout(), "a broken control fails closed");
        assert!(verdict.enforced);
    }

    #[test]
    fn overlapping_policies_report_each_violation_and_the_strictest_mode_wins() {
        let policies = [
            policy_yaml(MAINLAND),
            policy_yaml(
                "apiVersion: sluice.dev/v1alpha1
kind: DataResidencyPolicy
metadata: {name: shanghai-audit}
spec:
  namespaceSelector: {}
  allowedRegions: [cn-shanghai]
  enforcement: Audit
",
            ),
        ];
        let verdict = evaluate("cn-beijing", &cn(), &policies, now());
        assert_eq!(verdict.governing, ["mainland", "shanghai-audit"]);
        assert_eq!(verdict.violations.len(), 1);
        assert_eq!(verdict.violations[0].policy, "shanghai-audit");
        assert!(
            !verdict.blocks_rollout(),
            "only the Audit policy is violated"
        );
        assert!(verdict.enforced, "the mainland policy is enforced");

        let verdict = evaluate("cn-hongkong", &cn(), &policies, now());
        let violated: Vec<&str> = verdict
            .violations
            .iter()
            .map(|v| v.policy.as_str())
            .collect();
        assert_eq!(violated, ["mainland", "shanghai-audit"]);
        assert!(verdict.blocks_rollout(), "one violated policy enforces");
    }

    fn storage_class(yaml: &str) -> StorageClass {
        serde_yaml::from_str(yaml).expect("a StorageClass")
    }

    #[test]
    fn storage_classes_must_keep_volumes_in_the_allowed_regions() {
        let policies = [policy_yaml(MAINLAND)];
        let immediate = |topology: &str| {
            storage_class(&format!(
                "apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {{name: regional}}
provisioner: disk.csi.example
volumeBindingMode: Immediate
{topology}"
            ))
        };
        let in_region = |values: &str| {
            immediate(&format!(
                "allowedTopologies:
- matchLabelExpressions:
  - {{key: topology.kubernetes.io/region, values: [{values}]}}"
            ))
        };
        let waits = storage_class(
            "apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: regional}
provisioner: disk.csi.example
volumeBindingMode: WaitForFirstConsumer",
        );
        let zones_only = immediate(
            "allowedTopologies:
- matchLabelExpressions:
  - {key: topology.kubernetes.io/zone, values: [cn-shanghai-a]}",
        );
        // (class, compliant, message fragment)
        let cases = [
            (Some(waits), true, ""),
            (Some(in_region("cn-shanghai, cn-beijing")), true, ""),
            (
                Some(in_region("cn-shanghai, cn-hongkong")),
                false,
                "StorageClass regional may create volumes in cn-hongkong, which is not allowed",
            ),
            (
                Some(immediate("")),
                false,
                "StorageClass regional binds volumes immediately and its allowedTopologies do \
                 not restrict topology.kubernetes.io/region",
            ),
            (Some(zones_only), false, "binds volumes immediately"),
            (None, false, "StorageClass regional does not exist"),
        ];
        let files = server("cn-shanghai", VOLUME);
        for (class, compliant, fragment) in cases {
            let subject = Subject::of(&files).with_placement(&files, class.as_ref(), None, &[]);
            let verdict = evaluate(subject, &cn(), &policies, now());
            assert_eq!(verdict.compliant(), compliant, "{class:?}: {verdict:?}");
            if !compliant {
                assert_eq!(verdict.broken_rule(), Some(Rule::StorageClass));
                assert_eq!(verdict.violation_reason(), Reason::StorageClassNotAllowed);
                let message = verdict.message("cn-shanghai");
                assert!(message.contains(fragment), "{message}");
                assert!(
                    message.ends_with("(DataResidencyPolicy mainland)"),
                    "{message}"
                );
            }
        }
    }

    #[test]
    fn a_storage_class_list_restricts_further_and_the_region_label_is_the_policys() {
        let policy = policy_yaml(
            "apiVersion: sluice.dev/v1alpha1
kind: DataResidencyPolicy
metadata: {name: classes}
spec:
  namespaceSelector: {}
  jurisdictions: [CN]
  regionLabel: example.com/region
  allowedStorageClasses: [regional, cn-ssd]
",
        );
        let labelled = storage_class(
            "apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: regional}
provisioner: disk.csi.example
allowedTopologies:
- matchLabelExpressions:
  - {key: example.com/region, values: [cn-beijing]}",
        );
        let files = server("cn-shanghai", VOLUME);
        let subject = Subject::of(&files).with_placement(&files, Some(&labelled), None, &[]);
        let verdict = evaluate(subject, &cn(), std::slice::from_ref(&policy), now());
        assert!(verdict.compliant(), "{verdict:?}");
        assert_eq!(verdict.region_labels, ["example.com/region"]);

        let other = server(
            "cn-shanghai",
            "{volume: {storageClassName: fast, size: 1Gi}}",
        );
        let subject = Subject::of(&other).with_placement(&other, Some(&labelled), None, &[]);
        let verdict = evaluate(subject, &cn(), std::slice::from_ref(&policy), now());
        assert_eq!(verdict.broken_rule(), Some(Rule::StorageClass));
        assert!(
            verdict
                .message("cn-shanghai")
                .starts_with("StorageClass fast is not allowed (allowed: regional, cn-ssd)"),
            "{}",
            verdict.message("cn-shanghai")
        );
    }

    fn volume(yaml_terms: &str) -> PersistentVolume {
        serde_yaml::from_str(&format!(
            "apiVersion: v1
kind: PersistentVolume
metadata: {{name: pv-1}}
spec:
  capacity: {{storage: 1Gi}}
  accessModes: [ReadWriteOnce]
  csi: {{driver: disk.csi.example, volumeHandle: d-1}}
{yaml_terms}"
        ))
        .expect("a PersistentVolume")
    }

    fn affinity(key: &str, values: &str) -> String {
        format!(
            "  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions:
        - {{key: {key}, operator: In, values: [{values}]}}"
        )
    }

    #[test]
    fn the_bound_volume_must_lie_in_an_allowed_region() {
        let policies = [policy_yaml(MAINLAND)];
        let waits = storage_class(
            "apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: regional}
provisioner: disk.csi.example
volumeBindingMode: WaitForFirstConsumer",
        );
        let nodes = vec![
            labels(&[
                (ZONE_LABEL, "cn-shanghai-b"),
                (DEFAULT_REGION_LABEL, "cn-shanghai"),
            ]),
            labels(&[
                (ZONE_LABEL, "cn-hongkong-b"),
                (DEFAULT_REGION_LABEL, "cn-hongkong"),
            ]),
        ];
        // (volume, compliant, message fragment)
        let cases = [
            (
                volume(&affinity(DEFAULT_REGION_LABEL, "cn-shanghai")),
                true,
                "",
            ),
            (volume(&affinity(ZONE_LABEL, "cn-shanghai-b")), true, ""),
            (
                volume(&affinity(DEFAULT_REGION_LABEL, "cn-hongkong")),
                false,
                "the bound PersistentVolume pv-1 is in cn-hongkong, which is not allowed",
            ),
            (
                volume(&affinity(ZONE_LABEL, "cn-hongkong-b")),
                false,
                "is in cn-hongkong",
            ),
            (
                volume(""),
                false,
                "the bound PersistentVolume pv-1 does not say which region it is in",
            ),
            (
                volume(&affinity(ZONE_LABEL, "unknown-zone")),
                false,
                "does not say which region",
            ),
        ];
        let files = server("cn-shanghai", VOLUME);
        for (pv, compliant, fragment) in cases {
            let subject =
                Subject::of(&files).with_placement(&files, Some(&waits), Some(&pv), &nodes);
            let verdict = evaluate(subject, &cn(), &policies, now());
            assert_eq!(verdict.compliant(), compliant, "{fragment}: {verdict:?}");
            if !compliant {
                assert_eq!(verdict.broken_rule(), Some(Rule::Volume));
                assert_eq!(verdict.violation_reason(), Reason::VolumeOutsideRegion);
                assert!(
                    verdict.message("cn-shanghai").contains(fragment),
                    "{verdict:?}"
                );
            }
        }
    }

    #[test]
    fn object_store_endpoints_can_be_restricted_exactly_or_by_suffix() {
        let policy = policy_yaml(
            "apiVersion: sluice.dev/v1alpha1
kind: DataResidencyPolicy
metadata: {name: internal-only}
spec:
  namespaceSelector: {}
  jurisdictions: [CN]
  allowedEndpoints: ['*.internal.example', oss-cn-shanghai-internal.aliyuncs.com]
",
        );
        let oss = |endpoint: &str| {
            let endpoint = match endpoint {
                "" => String::new(),
                e => format!(", endpoint: '{e}'"),
            };
            server(
                "cn-shanghai",
                &format!(
                    "{{objectStore: {{provider: OSS, bucket: b, region: cn-shanghai{endpoint}, \
                     credentials: {{secretRef: {{name: c}}}}}}}}"
                ),
            )
        };
        let cases = [
            ("https://oss-cn-shanghai-internal.aliyuncs.com", true),
            ("https://OSS-CN-SHANGHAI-INTERNAL.aliyuncs.com/", true),
            ("https://oss-cn-shanghai.aliyuncs.com", false),
            // No endpoint: the provider's public regional endpoint is what is used.
            ("", false),
        ];
        for (endpoint, allowed) in cases {
            let files = oss(endpoint);
            let verdict = evaluate(
                Subject::of(&files),
                &cn(),
                std::slice::from_ref(&policy),
                now(),
            );
            assert_eq!(verdict.compliant(), allowed, "{endpoint}: {verdict:?}");
            if !allowed {
                assert_eq!(verdict.broken_rule(), Some(Rule::Endpoint));
                assert_eq!(verdict.violation_reason(), Reason::EndpointNotAllowed);
            }
        }
        assert!(endpoint_matches(
            "*.internal.example",
            "s3.internal.example"
        ));
        assert!(!endpoint_matches("*.internal.example", "internal.example"));
        assert!(!endpoint_matches(
            "*.internal.example",
            "s3.internal.example.evil.com"
        ));
        assert!(!endpoint_matches(
            "*.internal.example",
            "s3internal.example"
        ));
    }

    const CROSS_BORDER: &str = "apiVersion: sluice.dev/v1alpha1
kind: DataResidencyPolicy
metadata: {name: mainland}
spec:
  namespaceSelector: {}
  jurisdictions: [CN]
  crossBorderTransfers:
  - destinationRegion: eu-central-1
    assessmentReference: CAC-2026-0042
    expires: '2027-06-30T00:00:00Z'
    maxVolume: 1000G
    maxIndividuals: 500000
";

    #[test]
    fn a_cross_border_allowance_permits_its_region_until_it_expires() {
        let policies = [policy_yaml(CROSS_BORDER)];
        let bucket = server(
            "cn-shanghai",
            "{objectStore: {provider: S3, bucket: b, region: eu-central-1, \
             credentials: {secretRef: {name: c}}}}",
        );
        let verdict = evaluate(Subject::of(&bucket), &cn(), &policies, now());
        assert!(verdict.compliant(), "{verdict:?}");
        let expires: Timestamp = "2027-06-30T00:00:00Z".parse().unwrap();
        assert_eq!(
            verdict.allowances,
            [AllowanceUse {
                policy: "mainland".into(),
                reference: "CAC-2026-0042".into(),
                enforced: true,
                region: "eu-central-1".into(),
                expires,
                max_bytes: Some(1_000_000_000_000),
                max_individuals: Some(500_000),
            }]
        );
        assert_eq!(verdict.next_change(), Some(expires));
        assert!(
            verdict.message("cn-shanghai").contains(
                "eu-central-1 is allowed until 2027-06-30T00:00:00Z by cross-border \
                           transfer CAC-2026-0042"
            ),
            "{}",
            verdict.message("cn-shanghai")
        );

        let later: Timestamp = "2027-07-01T00:00:00Z".parse().unwrap();
        let verdict = evaluate(Subject::of(&bucket), &cn(), &policies, later);
        assert_eq!(verdict.broken_rule(), Some(Rule::CrossBorderTransfer));
        assert_eq!(
            verdict.violation_reason(),
            Reason::CrossBorderTransferExpired
        );
        assert!(verdict.blocks_rollout());
        assert_eq!(
            verdict.message("cn-shanghai"),
            "cross-border transfer CAC-2026-0042 of DataResidencyPolicy mainland to \
             eu-central-1 expired at 2027-06-30T00:00:00Z"
        );

        // Another destination is not covered by it.
        let verdict = evaluate("us-east-1", &cn(), &policies, now());
        assert_eq!(verdict.broken_rule(), Some(Rule::Region));
    }

    #[test]
    fn an_audit_log_on_stdout_needs_the_policys_permission() {
        let mut files = server("cn-shanghai", VOLUME);
        files.spec.audit_log = Some(crate::api::AuditLog { stdout: Some(true) });
        let mut policy = policy_yaml(MAINLAND);
        let verdict = evaluate(
            Subject::of(&files),
            &cn(),
            std::slice::from_ref(&policy),
            now(),
        );
        assert_eq!(verdict.broken_rule(), Some(Rule::AuditLogStdout));
        assert_eq!(verdict.violation_reason(), Reason::AuditLogStdoutNotAllowed);
        policy.spec.allow_audit_log_stdout = Some(true);
        let verdict = evaluate(Subject::of(&files), &cn(), &[policy], now());
        assert!(verdict.compliant(), "{verdict:?}");
    }

    #[test]
    fn quantities_are_read_as_bytes() {
        let cases = [
            ("1000G", Some(1_000_000_000_000)),
            ("1Ti", Some(1 << 40)),
            ("512Mi", Some(512 << 20)),
            ("1e12", Some(1_000_000_000_000)),
            ("1.5k", Some(1500)),
            ("42", Some(42)),
            ("1000m", Some(1)),
            ("1500m", Some(2)),
            ("500u", Some(1)),
            ("-1G", None),
            ("lots", None),
        ];
        for (quantity, bytes) in cases {
            assert_eq!(quantity_bytes(quantity), bytes, "{quantity}");
        }
    }
}
