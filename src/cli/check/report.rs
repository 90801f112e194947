//! What `sluice check` found, as a report for people or as JSON for pipelines.
//!
//! The JSON is a stable interface (documented in the README, "Checking manifests in
//! CI"): fields are only ever added. `schemaVersion` changes if one changes meaning.

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;

use super::manifests::{Problem, Severity, Source};
use crate::api::{Enforcement, TransferServer};
use crate::residency::{ResidencyVerdict, Rule};

/// The version of the JSON schema.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything `sluice check` found.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    schema_version: u32,
    /// The time allowances were judged at.
    evaluated_at: String,
    servers: Vec<ServerReport>,
    problems: Vec<ProblemReport>,
    summary: Summary,
}

/// One server's verdict.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerReport {
    namespace: String,
    name: String,
    file: String,
    document: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    item: Option<usize>,
    region: String,
    /// The region the object store resolves to; `null` on a volume or when it cannot be
    /// resolved.
    storage_region: Option<String>,
    /// Whether the server complies with every governing policy and its spec is valid.
    compliant: bool,
    /// Whether any governing policy is enforced.
    enforced: bool,
    /// Whether a violation keeps the operator from rolling the server out.
    blocks_rollout: bool,
    /// The `ResidencyCompliant` condition the operator reports; `None` when it stalls the
    /// server as `InvalidSpec` before judging residency.
    condition: Option<ConditionReport>,
    governing: Vec<String>,
    violations: Vec<ViolationReport>,
    allowances: Vec<AllowanceReport>,
}

#[derive(Debug, Serialize)]
struct ConditionReport {
    status: &'static str,
    reason: &'static str,
    message: String,
}

#[derive(Debug, Serialize)]
struct ViolationReport {
    policy: String,
    rule: &'static str,
    enforcement: &'static str,
    message: String,
    hint: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AllowanceReport {
    policy: String,
    reference: String,
    region: String,
    expires: String,
    max_bytes: Option<u64>,
    max_individuals: Option<i64>,
}

#[derive(Debug, Serialize)]
struct ProblemReport {
    severity: Severity,
    file: Option<String>,
    document: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    item: Option<usize>,
    object: Option<String>,
    message: String,
}

#[derive(Debug, Serialize)]
struct Summary {
    servers: usize,
    compliant: usize,
    violating: usize,
    blocked: usize,
    errors: usize,
    warnings: usize,
}

impl ServerReport {
    /// The report of `server`, read at `source`, with `verdict`. `judged`: whether the
    /// operator gets as far as judging its residency (it stalls an invalid spec first).
    pub fn new(
        server: &TransferServer,
        source: &Source,
        storage_region: Option<String>,
        verdict: &ResidencyVerdict,
        judged: bool,
    ) -> Self {
        let (compliant, reason) = verdict.condition();
        let violations = verdict
            .violations
            .iter()
            .flat_map(|v| {
                v.breaches.iter().map(|b| ViolationReport {
                    policy: v.policy.clone(),
                    rule: b.rule.as_str(),
                    enforcement: enforcement_str(v.enforcement),
                    message: b.message.clone(),
                    hint: hint(b.rule),
                })
            })
            .collect();
        let allowances = verdict
            .allowances
            .iter()
            .map(|a| AllowanceReport {
                policy: a.policy.clone(),
                reference: a.reference.clone(),
                region: a.region.clone(),
                expires: a.expires.to_string(),
                max_bytes: a.max_bytes,
                max_individuals: a.max_individuals,
            })
            .collect();
        Self {
            namespace: server.namespace().unwrap_or_default(),
            name: server.name_any(),
            file: source.file.clone(),
            document: source.document,
            item: source.item,
            region: server.spec.region.clone(),
            storage_region,
            // A spec the operator stalls as invalid is not rolled out, whatever its
            // residency would be.
            compliant: judged && verdict.compliant(),
            enforced: verdict.enforced,
            blocks_rollout: !judged || verdict.blocks_rollout(),
            condition: judged.then(|| ConditionReport {
                status: if compliant { "True" } else { "False" },
                reason: reason.as_str(),
                message: verdict.message(&server.spec.region),
            }),
            governing: verdict.governing.clone(),
            violations,
            allowances,
        }
    }
}

fn enforcement_str(enforcement: Enforcement) -> &'static str {
    match enforcement {
        Enforcement::Enforce => "Enforce",
        Enforcement::Audit => "Audit",
    }
}

/// What to change so that a server no longer breaks `rule`.
pub fn hint(rule: Rule) -> &'static str {
    match rule {
        Rule::Unevaluable => {
            "fix the policy's selectors: operators In, NotIn, Exists or DoesNotExist; In and \
             NotIn need values, Exists and DoesNotExist take none"
        }
        Rule::Region => {
            "set spec.region to a region the policy allows, or allow it in the policy \
             (allowedRegions, jurisdictions, or a crossBorderTransfers allowance)"
        }
        Rule::StorageRegion => {
            "keep the files in a bucket in an allowed region; the region the endpoint names \
             counts, so use the provider's regional endpoint (not an accelerated one) and \
             declare the same region"
        }
        Rule::StorageClass => {
            "use a StorageClass the policy allows whose volumes stay in the region \
             (allowedTopologies naming only allowed regions, or volumeBindingMode: \
             WaitForFirstConsumer); a StorageClass that exists only in the cluster must be \
             among the paths checked (kubectl get storageclass NAME -o yaml)"
        }
        Rule::Volume => "move the files to a volume in an allowed region",
        Rule::Endpoint => {
            "use an object-store endpoint the policy lists in allowedEndpoints, or add it there"
        }
        Rule::PlaintextFtp => {
            "remove ftps.allowPlaintext so clients must use TLS, or set allowPlaintextFtp: true \
             on the policy"
        }
        Rule::AuditLogStdout => {
            "remove auditLog.stdout (the audit log is kept in the server's storage anyway), or \
             set allowAuditLogStdout: true on the policy"
        }
        Rule::CrossBorderTransfer => {
            "renew the assessment and move the allowance's expires, or bring the files back \
             into an allowed region"
        }
    }
}

impl Report {
    /// The report of `servers` and `problems`, judged at `now`.
    pub fn new(now: Timestamp, servers: Vec<ServerReport>, problems: Vec<Problem>) -> Self {
        let mut problems: Vec<ProblemReport> = problems
            .into_iter()
            .map(|p| ProblemReport {
                severity: p.severity,
                file: p.source.as_ref().map(|s| s.file.clone()),
                document: p.source.as_ref().map(|s| s.document),
                item: p.source.as_ref().and_then(|s| s.item),
                object: p.object,
                message: p.message,
            })
            .collect();
        problems.sort_by(|a, b| {
            let key = |p: &ProblemReport| (p.severity, p.file.clone(), p.document, p.item);
            key(a).cmp(&key(b))
        });
        let count = |severity| problems.iter().filter(|p| p.severity == severity).count();
        let summary = Summary {
            servers: servers.len(),
            compliant: servers.iter().filter(|s| s.compliant).count(),
            violating: servers.iter().filter(|s| !s.compliant).count(),
            blocked: servers.iter().filter(|s| s.blocks_rollout).count(),
            errors: count(Severity::Error),
            warnings: count(Severity::Warning),
        };
        Self {
            schema_version: SCHEMA_VERSION,
            evaluated_at: now.to_string(),
            servers,
            problems,
            summary,
        }
    }

    /// Whether nothing violates and no manifest is invalid.
    pub fn passed(&self) -> bool {
        self.summary.violating == 0 && self.summary.errors == 0
    }

    /// The JSON document, with a final newline.
    pub fn json(&self) -> String {
        let mut json = serde_json::to_string_pretty(self).expect("a report serialises");
        json.push('\n');
        json
    }

    /// The report for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for server in &self.servers {
            server.write_text(&mut out);
            out.push('\n');
        }
        if !self.problems.is_empty() {
            out.push_str("Problems:\n");
            for problem in &self.problems {
                problem.write_text(&mut out);
            }
            out.push('\n');
        }
        let s = &self.summary;
        out.push_str(&format!(
            "{} {}: {} compliant, {} not compliant ({} not rolled out); {} {}, {} {}\n",
            s.servers,
            plural(s.servers, "server", "servers"),
            s.compliant,
            s.violating,
            s.blocked,
            s.errors,
            plural(s.errors, "error", "errors"),
            s.warnings,
            plural(s.warnings, "warning", "warnings"),
        ));
        out.push_str(match self.passed() {
            true => "PASSED\n",
            false => "FAILED\n",
        });
        out
    }
}

impl ServerReport {
    fn write_text(&self, out: &mut String) {
        let mut source = format!("{}, document {}", self.file, self.document);
        if let Some(item) = self.item {
            source.push_str(&format!(", item {item}"));
        }
        out.push_str(&format!(
            "TransferServer {}/{} ({source})\n",
            self.namespace, self.name
        ));
        out.push_str(&format!("  region:         {}\n", self.region));
        if let Some(region) = &self.storage_region {
            out.push_str(&format!("  storage region: {region}\n"));
        }
        let governing = match self.governing.is_empty() {
            true => "no DataResidencyPolicy".to_string(),
            false => self.governing.join(", "),
        };
        out.push_str(&format!("  governed by:    {governing}\n"));
        let verdict = match (
            self.condition.is_some(),
            self.compliant,
            self.blocks_rollout,
        ) {
            (false, _, _) => "INVALID: not rolled out (see the problems below)",
            (true, true, _) => "compliant",
            (true, false, true) => "NOT COMPLIANT: not rolled out",
            (true, false, false) => "NOT COMPLIANT: rolled out and reported (Audit only)",
        };
        out.push_str(&format!("  verdict:        {verdict}\n"));
        let condition = match &self.condition {
            Some(c) => format!("ResidencyCompliant={} ({})", c.status, c.reason),
            None => "none: the operator stalls the server (InvalidSpec) before judging \
                     residency"
                .to_string(),
        };
        out.push_str(&format!("  condition:      {condition}\n"));
        for v in &self.violations {
            out.push_str(&format!(
                "  [{}] {} ({}): {}\n      fix: {}\n",
                v.rule, v.policy, v.enforcement, v.message, v.hint
            ));
        }
        for a in &self.allowances {
            out.push_str(&format!(
                "  allowance:      {} until {} by cross-border transfer {} of {}\n",
                a.region, a.expires, a.reference, a.policy
            ));
        }
    }
}

impl ProblemReport {
    fn write_text(&self, out: &mut String) {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let mut place = Vec::new();
        if let Some(object) = &self.object {
            place.push(object.clone());
        }
        if let (Some(file), Some(document)) = (&self.file, self.document) {
            let mut at = format!("{file}, document {document}");
            if let Some(item) = self.item {
                at.push_str(&format!(", item {item}"));
            }
            place.push(format!("({at})"));
        }
        out.push_str(&format!(
            "  {severity}: {}: {}\n",
            place.join(" "),
            self.message
        ));
    }
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}
