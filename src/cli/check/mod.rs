//! `sluice check`: evaluates manifests against their DataResidencyPolicies offline, for
//! CI pipelines, before anything reaches a cluster.
//!
//! Each TransferServer is judged by the operator's own [`residency::evaluate`], with the
//! labels of its Namespace (from the manifests or `--namespace-labels`) and its
//! StorageClass (from the manifests; the operator also knows the bound volume and the
//! nodes, which a checker cannot). Besides verdicts it reports what it can tell is wrong
//! with the manifests: documents that do not parse as their kind, specs the operator
//! would stall as invalid before judging residency (an object store whose region cannot
//! be resolved, an unusable name or FTPS exposure), policies the API server would refuse,
//! and, as warnings, users of servers that are not in the manifests and servers in
//! namespaces that are not.
//!
//! Exit codes: 0 when nothing violates, 1 on any violation (`Enforce` or `Audit`) or
//! invalid manifest, 2 on a usage or I/O error.

mod manifests;
mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::api::{DataResidencyPolicy, TransferServer};
use crate::operator::server::{ftps, names, object_store, validate};
use crate::residency::{self, Subject};
use manifests::{Located, Manifests, Problem, Severity, describe};
use report::{Report, ServerReport};

/// Exit code when a server violates a policy or a manifest is invalid.
pub const EXIT_VIOLATION: u8 = 1;
/// Exit code of a usage or I/O error.
pub const EXIT_USAGE: u8 = 2;

/// Arguments of `sluice check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Manifest files or directories (walked recursively for *.yaml, *.yml and *.json).
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,

    /// `text` (a report for people) or `json` (for pipelines; see the README for the
    /// schema).
    #[arg(long, short, value_enum, default_value = "text")]
    output: OutputFormat,

    /// Labels of a namespace whose manifest is not among the paths, as
    /// `NAMESPACE=key=value[,key=value]` (`NAMESPACE=` for none). Repeatable; the labels
    /// given here win over those of a Namespace manifest.
    #[arg(long, value_name = "NS=key=value[,key=value]")]
    namespace_labels: Vec<String>,

    /// The time at which cross-border allowances are judged (RFC 3339, for example
    /// `2027-01-01T00:00:00Z`). Defaults to now.
    #[arg(long, value_name = "RFC3339")]
    now: Option<String>,
}

/// How the result is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// A report for people.
    Text,
    /// One JSON document.
    Json,
}

/// Why the command line cannot be used.
#[derive(Debug, thiserror::Error)]
enum UsageError {
    #[error("--namespace-labels {0:?} is not NAMESPACE=key=value[,key=value]")]
    NamespaceLabels(String),
    #[error("--now {0:?} is not an RFC 3339 time such as 2027-01-01T00:00:00Z")]
    Now(String),
}

pub(super) fn run(args: &CheckArgs) -> ExitCode {
    match check(args) {
        Ok(report) => {
            let printed = match args.output {
                OutputFormat::Text => report.text(),
                OutputFormat::Json => report.json(),
            };
            print!("{printed}");
            match report.passed() {
                true => ExitCode::SUCCESS,
                false => ExitCode::from(EXIT_VIOLATION),
            }
        }
        Err(error) => {
            let chain: Vec<String> = error.chain().map(ToString::to_string).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn check(args: &CheckArgs) -> anyhow::Result<Report> {
    let now = match &args.now {
        Some(now) => now
            .parse::<Timestamp>()
            .map_err(|_| UsageError::Now(now.clone()))?,
        None => Timestamp::now(),
    };
    let supplied = args
        .namespace_labels
        .iter()
        .map(|arg| parse_namespace_labels(arg))
        .collect::<Result<Vec<_>, _>>()?;
    let mut manifests = manifests::load(&args.paths)?;
    for (namespace, labels) in supplied {
        manifests.namespaces.insert(namespace, labels);
    }
    Ok(evaluate(manifests, now))
}

/// `NS=key=value[,key=value]` as the namespace and its labels.
fn parse_namespace_labels(arg: &str) -> Result<(String, BTreeMap<String, String>), UsageError> {
    let error = || UsageError::NamespaceLabels(arg.to_string());
    let (namespace, labels) = arg.split_once('=').ok_or_else(error)?;
    if namespace.is_empty() {
        return Err(error());
    }
    let mut parsed = BTreeMap::new();
    for pair in labels.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(error)?;
        if key.is_empty() {
            return Err(error());
        }
        parsed.insert(key.to_string(), value.to_string());
    }
    Ok((namespace.to_string(), parsed))
}

/// Judges every server in `manifests` at `now`, and collects the problems.
fn evaluate(manifests: Manifests, now: Timestamp) -> Report {
    let Manifests {
        mut servers,
        users,
        policies,
        namespaces,
        storage_classes,
        mut problems,
        ..
    } = manifests;
    problems.extend(policies.iter().flat_map(policy_problems));
    let policies: Vec<DataResidencyPolicy> = policies.into_iter().map(|p| p.object).collect();

    servers.sort_by_key(|s| (s.object.namespace(), s.object.name_any()));
    if servers.is_empty() {
        // A pipeline pointed at the wrong directory should not pass silently.
        problems.push(Problem {
            severity: Severity::Warning,
            source: None,
            object: None,
            message: "no TransferServer in the manifests: nothing was checked".into(),
        });
    }
    let mut reports = Vec::new();
    for Located {
        object: server,
        source,
    } in &servers
    {
        let namespace = server.namespace().unwrap_or_default();
        let no_labels = BTreeMap::new();
        let labels = match namespaces.get(&namespace) {
            Some(labels) => labels,
            None => {
                problems.push(Problem {
                    severity: Severity::Warning,
                    source: Some(source.clone()),
                    object: Some(describe("TransferServer", server)),
                    message: format!(
                        "namespace {namespace} is not among the manifests: evaluated without \
                         labels (give them with --namespace-labels {namespace}=key=value)"
                    ),
                });
                &no_labels
            }
        };
        let (invalid, judged) = server_problems(server, source);
        problems.extend(invalid);
        let storage_class = server
            .spec
            .storage
            .volume
            .as_ref()
            .and_then(|v| storage_classes.get(&v.storage_class_name));
        let subject = Subject::of(server).with_placement(server, storage_class, None, &[]);
        let storage_region = match &subject.storage {
            Some(Ok(resolved)) => Some(resolved.region.clone()),
            _ => None,
        };
        let verdict = residency::evaluate(subject, labels, &policies, now);
        let report = ServerReport::new(server, source, storage_region, &verdict, judged);
        reports.push(report);
    }

    let known: BTreeSet<(String, String)> = servers
        .iter()
        .map(|s| {
            (
                s.object.namespace().unwrap_or_default(),
                s.object.name_any(),
            )
        })
        .collect();
    for user in &users {
        let namespace = user.object.namespace().unwrap_or_default();
        let server = &user.object.spec.server_ref.name;
        if !known.contains(&(namespace.clone(), server.clone())) {
            problems.push(Problem {
                severity: Severity::Warning,
                source: Some(user.source.clone()),
                object: Some(describe("TransferUser", &user.object)),
                message: format!(
                    "TransferServer {namespace}/{server} is not among the manifests: the user \
                     waits (ServerNotFound) until it exists"
                ),
            });
        }
    }
    Report::new(now, reports, problems)
}

/// What the API server or the operator would refuse in a policy.
fn policy_problems(policy: &Located<DataResidencyPolicy>) -> Vec<Problem> {
    let spec = &policy.object.spec;
    let problem = |message: String| Problem {
        severity: Severity::Error,
        source: Some(policy.source.clone()),
        object: Some(describe("DataResidencyPolicy", &policy.object)),
        message,
    };
    let mut problems = Vec::new();
    let selectors = [
        ("namespaceSelector", Some(&spec.namespace_selector)),
        ("serverSelector", spec.server_selector.as_ref()),
    ];
    for (field, selector) in selectors {
        let Some(selector) = selector else { continue };
        if let Err(error) = residency::matches(selector, &BTreeMap::new()) {
            problems.push(problem(format!(
                "{field} cannot be evaluated ({error}): the API server refuses the policy, and \
                 the operator blocks every server while it exists"
            )));
        }
    }
    if spec.allowed_regions.is_empty() && spec.jurisdictions.is_empty() {
        problems.push(problem(
            "names no allowed regions (allowedRegions, jurisdictions or both): the API \
             server refuses the policy"
                .to_string(),
        ));
    }
    problems
}

/// What the operator stalls a server for (`InvalidSpec`) whatever the policies say, and
/// whether it judges the server's residency first (it does not for an unusable name or
/// object store, since it validates those before residency).
fn server_problems(server: &TransferServer, source: &manifests::Source) -> (Vec<Problem>, bool) {
    let name = server.name_any();
    let mut before_residency = Vec::new();
    if !validate::is_dns_label(&name) || name.len() > names::MAX_SERVER_NAME {
        before_residency.push(format!(
            "the name must be a DNS label of at most {} characters",
            names::MAX_SERVER_NAME
        ));
    }
    if let Err(message) = object_store::plan(server) {
        before_residency.push(message);
    }
    let judged = before_residency.is_empty();
    let after_residency = ftps::plan(server).err();
    let problems = before_residency
        .into_iter()
        .chain(after_residency)
        .map(|message| Problem {
            severity: Severity::Error,
            source: Some(source.clone()),
            object: Some(describe("TransferServer", server)),
            message: format!("{message} (the operator stalls the server: InvalidSpec)"),
        })
        .collect();
    (problems, judged)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON report of `yaml`, read as one file, at a fixed time.
    fn report(yaml: &str) -> serde_json::Value {
        let mut manifests = Manifests::default();
        manifests.read_file(std::path::Path::new("m.yaml"), yaml.as_bytes());
        let now = "2027-01-01T00:00:00Z".parse().unwrap();
        serde_json::from_str(&evaluate(manifests, now).json()).unwrap()
    }

    const NAMESPACE: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: team, labels: {residency: cn}}
";

    fn server(name: &str) -> String {
        format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: TransferServer\n\
             metadata: {{name: {name}, namespace: team}}\n\
             spec: {{region: cn-shanghai, protocols: {{sftp: {{}}}},\n  \
             storage: {{objectStore: {{provider: OSS, bucket: b, region: cn-shanghai,\n  \
             credentials: {{secretRef: {{name: s}}}}}}}}}}\n"
        )
    }

    #[test]
    fn a_policy_with_an_invalid_selector_is_an_error_and_blocks_every_server() {
        let policy = "\
apiVersion: sluice.dev/v1alpha1
kind: DataResidencyPolicy
metadata: {name: typo}
spec:
  namespaceSelector:
    matchExpressions: [{key: residency, operator: in, values: [cn]}]
  allowedRegions: [cn-shanghai]
  enforcement: Audit
";
        let report = report(&format!("{NAMESPACE}---\n{policy}---\n{}", server("files")));
        let problem = &report["problems"][0];
        assert_eq!(problem["severity"], "error");
        assert_eq!(problem["object"], "DataResidencyPolicy typo");
        assert_eq!(
            problem["message"],
            "namespaceSelector cannot be evaluated (unknown label selector operator \"in\"): \
             the API server refuses the policy, and the operator blocks every server while it \
             exists"
        );
        let violation = &report["servers"][0]["violations"][0];
        assert_eq!(violation["rule"], "Unevaluable");
        assert_eq!(violation["enforcement"], "Enforce");
        assert_eq!(report["servers"][0]["blocksRollout"], true);
    }

    #[test]
    fn a_policy_without_regions_and_an_unusable_server_name_are_errors() {
        let policy = "\
apiVersion: sluice.dev/v1alpha1
kind: DataResidencyPolicy
metadata: {name: empty}
spec:
  namespaceSelector: {matchLabels: {residency: eu}}
";
        let long = "a".repeat(50);
        let report = report(&format!("{NAMESPACE}---\n{policy}---\n{}", server(&long)));
        let messages: Vec<&str> = report["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["message"].as_str().unwrap())
            .collect();
        assert_eq!(
            messages,
            [
                "names no allowed regions (allowedRegions, jurisdictions or both): the API \
                 server refuses the policy",
                "the name must be a DNS label of at most 48 characters (the operator stalls \
                 the server: InvalidSpec)",
            ]
        );
        // The operator stalls it before judging residency: no condition to expect, and
        // not rolled out, so not counted as compliant.
        assert_eq!(report["servers"][0]["condition"], serde_json::Value::Null);
        assert_eq!(report["servers"][0]["compliant"], false);
        assert_eq!(report["servers"][0]["blocksRollout"], true);
        assert_eq!(report["summary"]["errors"], 2);
    }

    #[test]
    fn namespace_labels_are_parsed_from_the_flag() {
        let (namespace, labels) =
            parse_namespace_labels("payments=sluice.dev/residency=cn,team=a=b").unwrap();
        assert_eq!(namespace, "payments");
        assert_eq!(
            labels,
            BTreeMap::from([
                ("sluice.dev/residency".to_string(), "cn".to_string()),
                ("team".to_string(), "a=b".to_string()),
            ])
        );
        assert_eq!(parse_namespace_labels("bare=").unwrap().1, BTreeMap::new());
        for bad in ["payments", "=a=b", "payments=novalue", "payments==x"] {
            assert!(parse_namespace_labels(bad).is_err(), "{bad}");
        }
    }
}
