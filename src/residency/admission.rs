//! The admission layer: ValidatingAdmissionPolicies that let the API server refuse a
//! TransferServer the DataResidencyPolicies do not allow, at `kubectl apply`.
//!
//! Pure: builds the objects, writes nothing. `sluice admission-policy` renders them into
//! `deploy/admission/`, and CI fails when the committed copy is stale.
//!
//! Every DataResidencyPolicy is a parameter (`paramRef.selector: {}`), so each one is
//! evaluated and every one must pass: the strictest wins, as in [`super::evaluate`]. Two
//! policies share one body: `sluice-residency-enforce` judges the `Enforce` policies (and
//! any policy whose selector cannot be evaluated) and its binding denies;
//! `sluice-residency-audit` judges the `Audit` policies and its binding only warns.
//!
//! What the CEL decides, and how it stays the same as the operator's evaluation:
//! - The region catalogue is [`region::CATALOGUES`], rendered into map literals: node
//!   region ids with the jurisdiction [`region::node_jurisdiction`] gives (ambiguous ids
//!   are left out, so they are in no jurisdiction), and `PROVIDER/region` keys with each
//!   provider's own jurisdiction for object stores.
//! - Endpoints are read with the domains and labels of [`region::endpoints`], by the same
//!   rules as [`region::resolve_region`] (the region an endpoint names wins, a
//!   contradicting declaration and accelerated endpoints are refused).
//! - Messages come from [`super::messages`] and `RegionError`'s and `SelectorError`'s
//!   own wording, rendered with placeholders that become CEL expressions, so a denial
//!   says what the operator's status would, prefixed with the rule (`[Region] region
//!   cn-hongkong is not allowed by DataResidencyPolicy ...`).
//!
//! What admission cannot know is left to the operator: CEL has no clock, so a
//! cross-border allowance counts whether or not it has expired; a StorageClass's
//! topology, the bound volume and the nodes are not visible, so only
//! `allowedStorageClasses` is checked.

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::{
    MatchResources, NamedRuleWithOperations, ParamKind, ParamRef, ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding, ValidatingAdmissionPolicyBindingSpec,
    ValidatingAdmissionPolicySpec, Validation, Variable,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use super::region::{self, Provider, RegionError, endpoints};
use super::{Rule, SelectorError, messages};
use crate::api::{GROUP, Jurisdiction};

/// Name of the policy (and its binding) that denies what `Enforce` policies forbid.
pub const ENFORCE: &str = "sluice-residency-enforce";
/// Name of the policy (and its binding) that warns about what `Audit` policies forbid.
pub const AUDIT: &str = "sluice-residency-audit";

/// The longest denial or warning, in characters: the API server drops a message over
/// 5 KiB (for the generic `message`), so a longer one (a policy listing hundreds of
/// StorageClasses, say) is cut here and ends in [`TRUNCATED`].
pub const MAX_MESSAGE_CHARS: usize = 4000;
/// How a cut message ends.
pub const TRUNCATED: &str = " [...]";

/// Which DataResidencyPolicies a ValidatingAdmissionPolicy judges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `Enforce` policies, and policies that cannot be evaluated: denied.
    Enforce,
    /// `Audit` policies: a warning.
    Audit,
}

impl Mode {
    /// The policy's and the binding's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Enforce => ENFORCE,
            Self::Audit => AUDIT,
        }
    }

    fn action(self) -> &'static str {
        match self {
            Self::Enforce => "Deny",
            Self::Audit => "Warn",
        }
    }
}

/// The ValidatingAdmissionPolicy and its binding for `mode`.
pub fn admission_policy(
    mode: Mode,
) -> (ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding) {
    let metadata = ObjectMeta {
        name: Some(mode.name().to_string()),
        labels: Some(BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), "sluice".to_string()),
            (
                "app.kubernetes.io/component".to_string(),
                "admission".to_string(),
            ),
        ])),
        ..ObjectMeta::default()
    };
    let policy = ValidatingAdmissionPolicy {
        metadata: metadata.clone(),
        spec: Some(ValidatingAdmissionPolicySpec {
            failure_policy: Some("Fail".to_string()),
            param_kind: Some(ParamKind {
                api_version: Some(format!("{GROUP}/v1alpha1")),
                kind: Some("DataResidencyPolicy".to_string()),
            }),
            match_constraints: Some(MatchResources {
                resource_rules: Some(vec![NamedRuleWithOperations {
                    api_groups: Some(vec![GROUP.to_string()]),
                    api_versions: Some(vec!["*".to_string()]),
                    operations: Some(vec!["CREATE".to_string(), "UPDATE".to_string()]),
                    resources: Some(vec!["transferservers".to_string()]),
                    scope: Some("Namespaced".to_string()),
                    ..NamedRuleWithOperations::default()
                }]),
                ..MatchResources::default()
            }),
            variables: Some(
                variables(mode)
                    .into_iter()
                    .map(|(name, expression)| Variable {
                        name: name.to_string(),
                        expression: block(expression),
                    })
                    .collect(),
            ),
            validations: Some(vec![Validation {
                expression: "!variables.applies || size(variables.breaches) == 0".to_string(),
                message_expression: Some(format!(
                    "size(variables.message) <= {MAX_MESSAGE_CHARS} ? variables.message\n\
                     : variables.message.substring(0, {MAX_MESSAGE_CHARS}) + {}",
                    lit(TRUNCATED)
                )),
                message: Some("the TransferServer breaks a DataResidencyPolicy".to_string()),
                reason: Some("Forbidden".to_string()),
            }]),
            ..ValidatingAdmissionPolicySpec::default()
        }),
        status: None,
    };
    let binding = ValidatingAdmissionPolicyBinding {
        metadata,
        spec: Some(ValidatingAdmissionPolicyBindingSpec {
            policy_name: Some(mode.name().to_string()),
            param_ref: Some(ParamRef {
                selector: Some(LabelSelector::default()),
                parameter_not_found_action: Some("Allow".to_string()),
                ..ParamRef::default()
            }),
            validation_actions: Some(vec![mode.action().to_string()]),
            ..ValidatingAdmissionPolicyBindingSpec::default()
        }),
    };
    (policy, binding)
}

/// The YAML of `mode`'s policy and binding, as committed under `deploy/admission/`.
pub fn admission_policy_yaml(mode: Mode) -> String {
    let (policy, binding) = admission_policy(mode);
    let mut yaml = "# Generated by `sluice admission-policy` from the region catalogue and the\n\
                    # residency rules; do not edit. See README.md, \"Admission policy\".\n"
        .to_string();
    for object in [
        serde_json::to_value(&policy).expect("a policy serialises"),
        serde_json::to_value(&binding).expect("a binding serialises"),
    ] {
        yaml.push_str("---\n");
        yaml.push_str(&serde_yaml::to_string(&object).expect("JSON serialises to YAML"));
    }
    yaml
}

/// The named CEL expressions, in the order they may refer to one another.
fn variables(mode: Mode) -> Vec<(&'static str, String)> {
    let p = "params.spec";
    let store = "object.spec.storage.objectStore";
    let applies = match mode {
        Mode::Enforce => "variables.unevaluable || (variables.enforced && variables.selected)",
        Mode::Audit => "!variables.unevaluable && !variables.enforced && variables.selected",
    };
    let mut variables = vec![
        (
            "namespaceLabels",
            "has(namespaceObject.metadata.labels) ? namespaceObject.metadata.labels : {}".into(),
        ),
        (
            "serverLabels",
            "has(object.metadata.labels) ? object.metadata.labels : {}".into(),
        ),
        ("invalidSelectorTerms", invalid_selector_terms()),
        (
            "unevaluable",
            "size(variables.invalidSelectorTerms) > 0".into(),
        ),
        (
            "selected",
            format!(
                "{}\n&& (!has({p}.serverSelector) || {})",
                selector_matches(
                    &format!("{p}.namespaceSelector"),
                    "variables.namespaceLabels"
                ),
                selector_matches(&format!("{p}.serverSelector"), "variables.serverLabels"),
            ),
        ),
        (
            "enforced",
            format!("{p}.?enforcement.orValue('Enforce') == 'Enforce'"),
        ),
        ("applies", applies.into()),
        ("jurisdictionNames", jurisdiction_names()),
        (
            "allowedText",
            format!(
                "({p}.?allowedRegions.orValue([])\n + {p}.?jurisdictions.orValue([])\
                 .map(j, variables.jurisdictionNames[?j].orValue(j))).join(', ')"
            ),
        ),
        ("nodeCatalogue", node_catalogue()),
        (
            "nodeJurisdiction",
            "variables.nodeCatalogue[?object.spec.region].orValue('')".into(),
        ),
        (
            "regionAllowed",
            region_allowed("object.spec.region", "variables.nodeJurisdiction"),
        ),
        ("provider", format!("has({store}) ? {store}.provider : ''")),
        (
            // The schema makes an endpoint `http(s)://AUTHORITY[/]`.
            "endpointAuthority",
            format!(
                "has({store}) && has({store}.endpoint)\n\
                 ? {store}.endpoint.split('://')[1].split('/')[0]\n\
                 : ''"
            ),
        ),
        ("endpointHost", host_of("variables.endpointAuthority")),
        ("hostLabels", "variables.endpointHost.split('.')".into()),
        (
            "declaredRegion",
            format!("has({store}) && has({store}.region) ? {store}.region.trim() : ''"),
        ),
        ("accelerated", accelerated()),
        ("multiRegion", multi_region()),
        ("inProviderDomain", in_provider_domain()),
    ];
    variables.extend(named_region_variables());
    variables.extend([
        (
            "storageRegion",
            "variables.namedRegion != '' ? variables.namedRegion : variables.declaredRegion".into(),
        ),
        ("storageError", storage_error()),
        ("storageCatalogue", storage_catalogue()),
        (
            // An S3-compatible store's declared region is placed like a node region.
            "storageJurisdiction",
            "variables.provider == 'S3Compatible'\n\
             ? variables.nodeCatalogue[?variables.storageRegion].orValue('')\n\
             : variables.storageCatalogue[?(variables.provider + '/' + variables.storageRegion)]\
             .orValue('')"
                .into(),
        ),
        (
            "storageAllowed",
            region_allowed("variables.storageRegion", "variables.storageJurisdiction"),
        ),
        ("storageHost", storage_host()),
    ]);
    variables.extend(breach_variables());
    variables
}

/// The `matchExpressions` of the policy's selectors that cannot be evaluated, namespace
/// selector first, as the operator's selector matching finds them.
fn invalid_selector_terms() -> String {
    let p = "params.spec";
    format!(
        "({p}.namespaceSelector.?matchExpressions.orValue([])\n\
         + (has({p}.serverSelector) ? {p}.serverSelector.?matchExpressions.orValue([]) : []))\n\
         .filter(e, !(e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'])\n\
         || ((e.operator in ['In', 'NotIn']) != (size(e.?values.orValue([])) > 0)))"
    )
}

/// Whether the label selector at `selector` selects the labels at `labels`, as
/// Kubernetes defines it. An unknown operator matches (the policy then governs and is
/// unevaluable).
fn selector_matches(selector: &str, labels: &str) -> String {
    format!(
        "(!has({s}.matchLabels)\n  \
         || {s}.matchLabels.all(k, k in {l} && {l}[k] == {s}.matchLabels[k]))\n\
         && (!has({s}.matchExpressions) || {s}.matchExpressions.all(e,\n  \
         e.operator == 'In' ? e.key in {l} && {l}[e.key] in e.?values.orValue([])\n  \
         : e.operator == 'NotIn' ? !(e.key in {l}) || !({l}[e.key] in e.?values.orValue([]))\n  \
         : e.operator == 'Exists' ? e.key in {l}\n  \
         : e.operator == 'DoesNotExist' ? !(e.key in {l})\n  \
         : true))",
        s = selector,
        l = labels,
    )
}

/// Whether the policy allows `region` (a CEL string), which the catalogue places in
/// `jurisdiction` (`''` for none): listed, inside an allowed jurisdiction, or the
/// destination of a cross-border allowance (expired or not: CEL has no clock).
fn region_allowed(region: &str, jurisdiction: &str) -> String {
    let p = "params.spec";
    format!(
        "{region} in {p}.?allowedRegions.orValue([])\n\
         || ({jurisdiction} != '' && {jurisdiction} in {p}.?jurisdictions.orValue([]))\n\
         || {p}.?crossBorderTransfers.orValue([]).exists(t, t.destinationRegion == {region})"
    )
}

/// Jurisdiction codes whose name in messages is not the code itself.
fn jurisdiction_names() -> String {
    let entries: Vec<(String, String)> = Jurisdiction::ALL
        .into_iter()
        .filter(|j| messages::jurisdiction_text(*j) != j.as_str())
        .map(|j| {
            (
                j.as_str().to_string(),
                messages::jurisdiction_text(j).to_string(),
            )
        })
        .collect();
    map_literal(&entries)
}

/// Every node region id the catalogue places in one jurisdiction.
fn node_catalogue() -> String {
    let mut ids: Vec<&str> = region::CATALOGUES
        .iter()
        .flat_map(|(_, catalogue)| catalogue.iter().map(|(id, _)| *id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let entries: Vec<(String, String)> = ids
        .into_iter()
        .filter_map(|id| {
            let jurisdiction = region::node_jurisdiction(id)?;
            Some((id.to_string(), jurisdiction.as_str().to_string()))
        })
        .collect();
    map_literal(&entries)
}

/// Every provider's regions, keyed `PROVIDER/region`, with their jurisdictions.
fn storage_catalogue() -> String {
    let entries: Vec<(String, String)> = region::CATALOGUES
        .iter()
        .flat_map(|(provider, catalogue)| {
            catalogue.iter().map(move |(id, code)| {
                (
                    format!("{}/{id}", provider_name(*provider)),
                    code.to_string(),
                )
            })
        })
        .collect();
    map_literal(&entries)
}

/// The provider as it is written in YAML.
fn provider_name(provider: Provider) -> String {
    serde_json::to_value(provider)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .expect("a provider serialises as a string")
}

/// The host in an endpoint's `authority`, as [`region::host_of`] reads it: no port, no
/// trailing dots, lower case.
fn host_of(authority: &str) -> String {
    format!(
        "({authority}.matches({port})\n\
         ? {authority}.substring(0, {authority}.lastIndexOf(':'))\n\
         : {authority}\n\
         ).find({trailing}).lowerAscii()",
        port = lit(":[0-9]*$"),
        trailing = lit("^.*[^.]"),
    )
}

/// `host` is a name under `domain`.
fn in_domain(host: &str, domain: &str) -> String {
    format!("{host}.endsWith({})", lit(&format!(".{domain}")))
}

/// Whether the endpoint is an accelerated one that cannot be pinned to a region.
fn accelerated() -> String {
    let host = "variables.endpointHost";
    let has_label = |label: &str| {
        format!(
            "('.' + {host} + '.').contains({})",
            lit(&format!(".{label}."))
        )
    };
    let oss_labels: Vec<String> = endpoints::OSS_ACCELERATE
        .iter()
        .map(|l| has_label(l))
        .collect();
    format!(
        "{host} != '' && (\n\
         (variables.provider == 'S3' && {} && {})\n\
         || (variables.provider == 'OSS' && {} && ({}))\n\
         || (variables.provider == 'COS' && {}))",
        in_domain(host, endpoints::AWS),
        has_label(endpoints::S3_ACCELERATE),
        in_domain(host, endpoints::ALIBABA),
        oss_labels.join(" || "),
        in_domain(host, endpoints::COS_ACCELERATE),
    )
}

/// Whether the endpoint is an S3 Multi-Region Access Point.
fn multi_region() -> String {
    let host = "variables.endpointHost";
    let labels: Vec<String> = endpoints::S3_MULTI_REGION
        .iter()
        .map(|l| format!("('.' + {host} + '.').contains({})", lit(&format!(".{l}."))))
        .collect();
    format!(
        "{host} != '' && variables.provider == 'S3' && {} && ({})",
        in_domain(host, endpoints::AWS),
        labels.join(" || ")
    )
}

/// Whether the endpoint is in one of the domains where its provider's endpoints name a
/// region (then one whose region cannot be read is refused).
fn in_provider_domain() -> String {
    let host = "variables.endpointHost";
    let per_provider: Vec<String> = region::CATALOGUES
        .iter()
        .map(|(provider, _)| *provider)
        .filter(|p| !endpoints::provider_domains(*p).is_empty())
        .map(|provider| {
            let domains: Vec<String> = endpoints::provider_domains(provider)
                .iter()
                .map(|d| in_domain(host, d))
                .collect();
            format!(
                "(variables.provider == {} && ({}))",
                lit(&provider_name(provider)),
                domains.join(" || ")
            )
        })
        .collect();
    format!("{host} != '' && ({})", per_provider.join("\n || "))
}

/// The label `skip` places left of the one just before `domain`: an index into
/// `variables.hostLabels`, which must have at least `skip + 1` labels before the domain.
fn label_before(domain: &str, skip: usize) -> (String, String) {
    let from_end = domain.split('.').count() + 1 + skip;
    (
        format!("variables.hostLabels[size(variables.hostLabels) - {from_end}]"),
        format!("size(variables.hostLabels) >= {from_end}"),
    )
}

/// The region the endpoint names, `''` if none: one variable per provider that names
/// regions in its endpoints, then `namedRegion`, the one of the store's provider.
fn named_region_variables() -> Vec<(&'static str, String)> {
    let host = "variables.endpointHost";
    let aws_region = lit(r"^[a-z]+(-[a-z]+)+-[0-9]*$");
    let s3 = format!(
        "!({aws} || {aws_china}) ? ''\n\
         : {host} == {global} || {global_bucket} ? {global_region}\n\
         : {aws} && ('.' + {host} + '.').contains({external}) ? {external_region}\n\
         : variables.s3Prefix == '' ? ''\n\
         : variables.s3Label.startsWith('s3-')\n  \
         && variables.s3Label.substring(3).matches({aws_region})\n\
         ? variables.s3Label.substring(3)\n\
         : ('.' + {host}.substring(size(variables.s3Prefix)) + '.').find({after}).find({inner})",
        aws = in_domain(host, endpoints::AWS),
        aws_china = in_domain(host, endpoints::AWS_CHINA),
        global = lit(endpoints::S3_GLOBAL_HOST),
        global_bucket = in_domain(host, endpoints::S3_GLOBAL_HOST),
        global_region = lit(endpoints::S3_GLOBAL_REGION),
        external = lit(&format!(".{}.", endpoints::S3_EXTERNAL_LABEL)),
        external_region = lit(endpoints::S3_EXTERNAL_REGION),
        // The first later label that looks like an AWS region, with its dots...
        after = lit(r"\.[a-z]+(-[a-z]+)+-[0-9]*\."),
        // ...and without them.
        inner = lit(r"[a-z]+(-[a-z]+)+-[0-9]*"),
    );

    let (oss_label, oss_size) = label_before(endpoints::ALIBABA, 0);
    let oss_label = format!(
        "{} && {oss_size} ? {oss_label} : ''",
        in_domain(host, endpoints::ALIBABA)
    );
    let label = "variables.ossLabel";
    let (dual_stack_region, dual_stack_size) = label_before(endpoints::ALIBABA, 1);
    let oss = format!(
        "{label} == {dual_stack} ? ({dual_stack_size} ? {dual_stack_region} : '')\n\
         : !{label}.startsWith({prefix}) ? ''\n\
         : {label}.endsWith({internal}) ? {label}.substring({p}, size({label}) - {i})\n\
         : {label}.substring({p})",
        dual_stack = lit(endpoints::OSS_DUAL_STACK),
        prefix = lit(endpoints::OSS_PREFIX),
        internal = lit(endpoints::OSS_INTERNAL),
        p = endpoints::OSS_PREFIX.len(),
        i = endpoints::OSS_INTERNAL.len(),
    );

    let cos_services = list_literal(&endpoints::COS_SERVICES);
    let cos: Vec<String> = endpoints::TENCENT
        .iter()
        .map(|domain| {
            let (region, _) = label_before(domain, 0);
            let (service, size) = label_before(domain, 1);
            format!(
                "{} && {size} && {service} in {cos_services}\n? {region}\n",
                in_domain(host, domain)
            )
        })
        .collect();
    let cos = format!("{}: ''", cos.join(": "));

    let obs: Vec<String> = endpoints::HUAWEI
        .iter()
        .map(|domain| {
            let (region, _) = label_before(domain, 0);
            let (service, size) = label_before(domain, 1);
            format!(
                "{} && {size} && {service} == {}\n? {region}\n",
                in_domain(host, domain),
                lit(endpoints::OBS_SERVICE),
            )
        })
        .collect();
    let obs = format!("{}: ''", obs.join(": "));

    let named = format!(
        "{host} == '' ? ''\n\
         : variables.provider == 'S3' ? variables.s3Region\n\
         : variables.provider == 'OSS' ? variables.ossRegion\n\
         : variables.provider == 'COS' ? variables.cosRegion\n\
         : variables.provider == 'OBS' ? variables.obsRegion\n\
         : ''"
    );
    vec![
        (
            "s3Prefix",
            // Up to and including the last label that is `s3` or starts with `s3-`.
            format!("{host}.find({})", lit(r"^(.*\.)?s3(-[^.]*)?\.")),
        ),
        (
            "s3Label",
            "variables.s3Prefix.substring(0, size(variables.s3Prefix) - 1)\n\
             .substring(variables.s3Prefix.substring(0, size(variables.s3Prefix) - 1)\n\
             .lastIndexOf('.') + 1)"
                .into(),
        ),
        ("s3Region", s3),
        ("ossLabel", oss_label),
        ("ossRegion", oss),
        ("cosRegion", cos),
        ("obsRegion", obs),
        ("namedRegion", named),
    ]
}

/// Why the object store's region cannot be resolved, in `RegionError`'s words; `''` when
/// it can (or there is no object store).
fn storage_error() -> String {
    let host = &["variables.endpointHost"];
    let accelerated = cel_text(&RegionError::Accelerated(slot(0)).to_string(), host);
    let multi_region = cel_text(&RegionError::MultiRegion(slot(0)).to_string(), host);
    let unknown = cel_text(&RegionError::UnknownEndpoint(slot(0)).to_string(), host);
    let contradiction = cel_text(
        &RegionError::Contradiction {
            declared: slot(0),
            endpoint: slot(1),
        }
        .to_string(),
        &["variables.declaredRegion", "variables.namedRegion"],
    );
    let required = lit(&RegionError::RegionRequired.to_string());
    let partition = |(provider, domain, prefix, name): (Provider, &str, &str, &str),
                     serves: bool| {
        let message = RegionError::Contradiction {
            declared: slot(0),
            endpoint: endpoints::partition_text(name),
        };
        let negation = if serves { "!" } else { "" };
        format!(
            ": variables.provider == {} && {} && {negation}variables.storageRegion\
             .startsWith({})\n  ? {}\n",
            lit(&provider_name(provider)),
            in_domain("variables.endpointHost", domain),
            lit(prefix),
            cel_text(&message.to_string(), &["variables.storageRegion"]),
        )
    };
    let partitions: Vec<String> = endpoints::PARTITIONS
        .into_iter()
        .map(|p| partition(p, true))
        .chain(
            endpoints::GLOBAL_CLOUDS
                .into_iter()
                .map(|p| partition(p, false)),
        )
        .collect();
    format!(
        "variables.provider == '' ? ''\n\
         : variables.accelerated ? {accelerated}\n\
         : variables.multiRegion ? {multi_region}\n\
         : variables.namedRegion == '' && variables.inProviderDomain ? {unknown}\n\
         : variables.namedRegion != '' && variables.declaredRegion != ''\n  \
         && variables.namedRegion != variables.declaredRegion ? {contradiction}\n\
         : variables.storageRegion == '' ? {required}\n\
         {}: ''",
        partitions.concat()
    )
}

/// The host of the store's endpoint, or of the provider's default endpoint when none is
/// given (the host `allowedEndpoints` judges); `''` when there is none.
fn storage_host() -> String {
    let region = "variables.storageRegion";
    let defaults: Vec<String> = default_host_templates()
        .into_iter()
        .map(|(provider, any, china)| {
            let any = cel_text(&any, &[region]);
            let expression = match china {
                Some(china) => format!(
                    "({region}.startsWith('cn-') ? {} : {any})",
                    cel_text(&china, &[region])
                ),
                None => any,
            };
            format!(
                ": variables.provider == {} ? {expression}\n",
                lit(&provider_name(provider))
            )
        })
        .collect();
    format!(
        "variables.endpointHost != '' ? variables.endpointHost\n\
         : variables.provider == '' || variables.storageError != '' ? ''\n\
         {}: ''",
        defaults.concat()
    )
}

/// Per provider with default endpoints, the host of the default endpoint with
/// [`slot`] 0 for the region, and the one for regions starting `cn-` when it differs
/// (AWS China's partition has a domain of its own).
fn default_host_templates() -> Vec<(Provider, String, Option<String>)> {
    let host = |provider, region: &str| {
        crate::storage::object::default_endpoint(provider, region).map(|e| region::host_of(&e))
    };
    let china_region = format!("cn-{}", slot(0));
    region::CATALOGUES
        .iter()
        .filter_map(|(provider, _)| {
            let any = host(*provider, &slot(0))?;
            let china = host(*provider, &china_region)
                .map(|t| t.replace(&china_region, &slot(0)))
                .filter(|china| *china != any);
            Some((*provider, any, china))
        })
        .collect()
}

/// One variable per rule: the message of its breach, prefixed with the rule, or `''`.
/// Then `breaches`, the list of those that are not empty.
fn breach_variables() -> Vec<(&'static str, String)> {
    let p = "params.spec";
    let policy = "params.metadata.name";
    let text = |rule: Rule, message: String, args: &[&str]| {
        cel_text(&format!("[{}] {message}", rule.as_str()), args)
    };

    let bad = "variables.invalidSelectorTerms[0]";
    let bad_values = SelectorError::BadValues {
        operator: slot(0),
        key: slot(1),
    };
    let unknown = SelectorError::UnknownOperator(slot(0));
    let selector_error = format!(
        "{bad}.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist']\n  ? {}\n  : {}",
        cel_text(
            &bad_values.to_string(),
            &[&format!("{bad}.operator"), &format!("{bad}.key")]
        ),
        cel_text(&unknown.to_string(), &[&format!("{bad}.operator")]),
    );
    let unevaluable = text(
        Rule::Unevaluable,
        messages::unevaluable(&slot(0), &slot(1)),
        &[policy, "variables.selectorError"],
    );

    let not_allowed = |rule, what: &str, region: &str| {
        text(
            rule,
            messages::not_allowed(what, &slot(0), &slot(1), &slot(2)),
            &[region, policy, "variables.allowedText"],
        )
    };
    let region = format!(
        "variables.regionAllowed ? ''\n: {}",
        not_allowed(Rule::Region, "region", "object.spec.region")
    );
    let storage = format!(
        "variables.provider == '' ? ''\n\
         : variables.storageError != '' ? {}\n\
         : variables.storageAllowed ? ''\n\
         : {}",
        text(
            Rule::StorageRegion,
            messages::storage_unresolvable(&slot(0), &slot(1)),
            &["variables.storageError", policy]
        ),
        not_allowed(
            Rule::StorageRegion,
            "storage region",
            "variables.storageRegion"
        ),
    );
    let class = "object.spec.storage.volume.storageClassName";
    let class_problem = messages::volume_problem(
        &messages::storage_class_not_allowed(&slot(0), &slot(1)),
        &slot(2),
    );
    let storage_class = format!(
        "has(object.spec.storage.volume) && size({p}.?allowedStorageClasses.orValue([])) > 0\n\
         && !({class} in {p}.allowedStorageClasses)\n\
         ? {}\n\
         : ''",
        text(
            Rule::StorageClass,
            class_problem,
            &[
                class,
                &format!("{p}.allowedStorageClasses.join(', ')"),
                policy
            ]
        ),
    );
    let host = "variables.storageHost";
    let endpoint = format!(
        "{host} != '' && size({p}.?allowedEndpoints.orValue([])) > 0\n\
         && !{p}.allowedEndpoints.exists(e, {})\n\
         ? {}\n\
         : ''",
        endpoint_matches("e", host),
        text(
            Rule::Endpoint,
            messages::endpoint_not_allowed(&slot(0), &slot(1), &slot(2)),
            &[host, policy, &format!("{p}.allowedEndpoints.join(', ')")]
        ),
    );
    let plaintext = format!(
        "object.spec.protocols.?ftps.?allowPlaintext.orValue(false)\n\
         && !{p}.?allowPlaintextFtp.orValue(false)\n\
         ? {}\n\
         : ''",
        text(
            Rule::PlaintextFtp,
            messages::plaintext_ftp(&slot(0)),
            &[policy]
        ),
    );
    let stdout = format!(
        "object.spec.?auditLog.?stdout.orValue(false)\n\
         && !{p}.?allowAuditLogStdout.orValue(false)\n\
         ? {}\n\
         : ''",
        text(
            Rule::AuditLogStdout,
            messages::audit_log_stdout(&slot(0)),
            &[policy]
        ),
    );
    let rules = [
        ("regionBreach", region),
        ("storageRegionBreach", storage),
        ("storageClassBreach", storage_class),
        ("endpointBreach", endpoint),
        ("plaintextFtpBreach", plaintext),
        ("auditLogStdoutBreach", stdout),
    ];
    let names: Vec<String> = rules
        .iter()
        .map(|(n, _)| format!("variables.{n}"))
        .collect();
    let breaches = format!(
        "variables.unevaluable ? [variables.unevaluableBreach]\n\
         : [{}].filter(m, m != '')",
        names.join(", ")
    );
    let mut variables = vec![
        ("selectorError", selector_error),
        ("unevaluableBreach", unevaluable),
    ];
    variables.extend(rules);
    variables.push(("breaches", breaches));
    variables.push(("message", "variables.breaches.join('; ')".to_string()));
    variables
}

/// Whether the `allowedEndpoints` entry `pattern` admits `host`, as
/// [`super::endpoint_matches`] decides: the host itself, or `*.SUFFIX` for any host ending
/// in `.SUFFIX`.
fn endpoint_matches(pattern: &str, host: &str) -> String {
    let normal = format!("{pattern}.trim().lowerAscii().find({})", lit(r"^.*[^.]"));
    format!(
        "{normal}.startsWith('*.')\n  \
         ? {host}.endsWith({normal}.substring(1)) && size({host}) >= size({normal})\n  \
         : {host} == {normal}"
    )
}

const SLOT_OPEN: char = '\u{27EA}';
const SLOT_CLOSE: char = '\u{27EB}';

/// A placeholder for argument `index` of [`cel_text`]: characters no message contains and
/// `Debug` does not escape.
fn slot(index: usize) -> String {
    format!("{SLOT_OPEN}{index}{SLOT_CLOSE}")
}

/// The CEL string expression for `text`, where each [`slot`] stands for the CEL string
/// expression of that index in `args`.
fn cel_text(text: &str, args: &[&str]) -> String {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(SLOT_OPEN) {
        if start > 0 {
            parts.push(lit(&rest[..start]));
        }
        let tail = &rest[start + SLOT_OPEN.len_utf8()..];
        let end = tail.find(SLOT_CLOSE).expect("a slot is closed");
        let index: usize = tail[..end].parse().expect("a slot holds an index");
        let arg = args[index];
        let simple = arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '[' | ']'));
        parts.push(match simple {
            true => arg.to_string(),
            false => format!("({arg})"),
        });
        rest = &tail[end + SLOT_CLOSE.len_utf8()..];
    }
    if !rest.is_empty() || parts.is_empty() {
        parts.push(lit(rest));
    }
    parts.join(" + ")
}

/// `expression`, ending in a line break if it has quotes, so that YAML shows it as a
/// block rather than a quoted string with every quote doubled.
fn block(mut expression: String) -> String {
    if expression.contains('\'') && !expression.contains('\n') {
        expression.push('\n');
    }
    expression
}

/// A CEL string literal.
fn lit(text: &str) -> String {
    let escaped = text.replace('\\', r"\\").replace('\'', r"\'");
    format!("'{escaped}'")
}

fn list_literal(items: &[&str]) -> String {
    let items: Vec<String> = items.iter().map(|i| lit(i)).collect();
    format!("[{}]", items.join(", "))
}

/// A CEL map literal, one entry per line.
fn map_literal(entries: &[(String, String)]) -> String {
    let entries: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("  {}: {}", lit(k), lit(v)))
        .collect();
    format!("{{\n{}\n}}", entries.join(",\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entries of a map literal made by [`map_literal`].
    fn entries(literal: &str) -> BTreeMap<String, String> {
        literal
            .lines()
            .filter_map(|line| {
                let (key, value) = line.trim().trim_end_matches(',').split_once(": ")?;
                let unquote = |s: &str| s.trim_matches('\'').to_string();
                Some((unquote(key), unquote(value)))
            })
            .collect()
    }

    #[test]
    fn the_node_catalogue_holds_every_unambiguous_id_with_its_jurisdiction() {
        let catalogue = entries(&node_catalogue());
        let mut ids = 0;
        for (_, regions) in region::CATALOGUES {
            for (id, _) in regions {
                ids += 1;
                let expected = region::node_jurisdiction(id).map(|j| j.as_str().to_string());
                assert_eq!(catalogue.get(*id), expected.as_ref(), "{id}");
            }
        }
        assert!(ids > 150, "{ids}");
        // Singapore at AWS and Alibaba, Hong Kong at Huawei: in no jurisdiction.
        assert!(!catalogue.contains_key("ap-southeast-1"));
        assert_eq!(catalogue["cn-hongkong"], "HK");
    }

    #[test]
    fn the_storage_catalogue_is_every_providers_own() {
        let catalogue = entries(&storage_catalogue());
        let mut count = 0;
        for (provider, regions) in region::CATALOGUES {
            for (id, code) in regions {
                count += 1;
                let key = format!("{}/{id}", provider_name(provider));
                assert_eq!(
                    catalogue.get(&key).map(String::as_str),
                    Some(*code),
                    "{key}"
                );
                assert_eq!(region::jurisdiction(provider, id), Some(*code));
            }
        }
        assert_eq!(catalogue.len(), count, "no provider lists a region twice");
        assert_eq!(catalogue["OBS/ap-southeast-1"], "HK");
        assert_eq!(catalogue["S3/ap-southeast-1"], "SG");
    }

    #[test]
    fn default_endpoint_hosts_are_the_storage_modules_for_every_catalogued_region() {
        let templates = default_host_templates();
        for (provider, regions) in region::CATALOGUES {
            let template = templates.iter().find(|(p, _, _)| *p == provider);
            for (id, _) in regions {
                let expected = crate::storage::object::default_endpoint(provider, id)
                    .map(|e| region::host_of(&e));
                let rendered = template.map(|(_, any, china)| {
                    let chosen = match china {
                        Some(china) if id.starts_with("cn-") => china,
                        _ => any,
                    };
                    chosen.replace(&slot(0), id)
                });
                assert_eq!(rendered, expected, "{provider:?} {id}");
            }
        }
    }

    #[test]
    fn messages_become_cel_concatenations_of_literals_and_expressions() {
        let text = messages::plaintext_ftp(&slot(0));
        assert_eq!(
            cel_text(&text, &["params.metadata.name"]),
            "'plaintext FTP (ftps.allowPlaintext) is not allowed by DataResidencyPolicy ' + \
             params.metadata.name + ' (the policy would need allowPlaintextFtp: true)'"
        );
        assert_eq!(
            cel_text(&format!("{}{}", slot(1), slot(0)), &["a.b", "x + y"]),
            "(x + y) + a.b"
        );
        assert_eq!(lit(r"it's \d"), r"'it\'s \\d'");
        assert_eq!(cel_text("", &[]), "''");
    }

    #[test]
    fn the_enforce_policy_denies_and_the_audit_policy_warns_for_every_policy() {
        for (mode, action, applies) in [
            (
                Mode::Enforce,
                "Deny",
                "variables.unevaluable || (variables.enforced",
            ),
            (
                Mode::Audit,
                "Warn",
                "!variables.unevaluable && !variables.enforced",
            ),
        ] {
            let (policy, binding) = admission_policy(mode);
            let binding = binding.spec.unwrap();
            assert_eq!(binding.policy_name.as_deref(), Some(mode.name()));
            assert_eq!(binding.validation_actions, Some(vec![action.to_string()]));
            let param_ref = binding.param_ref.unwrap();
            assert_eq!(param_ref.selector, Some(LabelSelector::default()));
            assert_eq!(
                param_ref.parameter_not_found_action.as_deref(),
                Some("Allow")
            );
            let spec = policy.spec.unwrap();
            let variables = spec.variables.unwrap();
            let expression = |name: &str| {
                variables
                    .iter()
                    .find(|v| v.name == name)
                    .map(|v| v.expression.clone())
                    .unwrap_or_default()
            };
            assert!(expression("applies").starts_with(applies));
            // A variable refers only to variables defined before it.
            for (i, variable) in variables.iter().enumerate() {
                for reference in variable.expression.split("variables.").skip(1) {
                    let name: String = reference
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    assert!(
                        variables[..i].iter().any(|v| v.name == name),
                        "{} refers to {name}, which is not defined before it",
                        variable.name
                    );
                }
            }
            let rules = spec.match_constraints.unwrap().resource_rules.unwrap();
            assert_eq!(
                rules[0].resources,
                Some(vec!["transferservers".to_string()])
            );
        }
        let yaml = admission_policy_yaml(Mode::Enforce);
        let documents: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        assert_eq!(documents.len(), 2);
        assert_eq!(documents[1]["kind"], "ValidatingAdmissionPolicyBinding");
    }
}
