//! The Helm chart in `charts/sluice/` and the plain manifests rendered from it.
//!
//! Rendering: `helm lint` and `helm template` (built from helm's Go module) accept the
//! value combinations users choose; no RBAC rule has a wildcard; the operator pod meets
//! Pod Security's `restricted` level and has its probes; watched namespaces turn the
//! cluster-wide grants on namespaced resources into Roles.
//!
//! Installing: the chart rendered with default values is applied to the local control
//! plane (API server auditing the operator's ServiceAccount, with the
//! OwnerReferencesPermissionEnforcement admission plugin OpenShift runs) into a namespace
//! enforcing `restricted`. The real `sluice` binary then runs as that ServiceAccount, with
//! a token from the TokenRequest API and the arguments and environment of the rendered
//! Deployment, and rolls out `deploy/examples/` into a namespace enforcing `restricted`
//! too. The audit log must show no refused request and every granted permission in use,
//! except those listed in [`exemptions`] with the reason.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Event, PersistentVolumeClaim, Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use sluice::api::{TransferServer, TransferUser};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use support::cluster::{
    apply, condition, eventually, parse_yaml, read_yaml_dir, refused, volume_server,
};
use support::controlplane::{ControlPlane, Options};
use support::gateway::{TestPki, VALID_UNTIL};
use support::helm::{Helm, chart_dir};
use support::kubelet::FakeKubelet;

/// The release and namespace of the committed manifests, and of the installation here.
const RELEASE: &str = "sluice";
const NAMESPACE: &str = "sluice-system";
const OPERATOR: &str = "sluice-operator";
const OPERATOR_USER: &str = "system:serviceaccount:sluice-system:sluice-operator";

const EXAMPLES_NAMESPACE: &str = "telephony";
const SERVER: &str = "cucm-backup";
const REGION_LABEL: &str = "topology.kubernetes.io/region";
const WAIT: Duration = Duration::from_secs(90);

/// Value combinations every rendering test goes through.
const COMBINATIONS: &[(&str, &[&str])] = &[
    ("defaults", &[]),
    (
        "watched namespaces",
        &["--set", "watchNamespaces={team-a,team-b}"],
    ),
    (
        "two replicas with leader election",
        &[
            "--set",
            "replicaCount=2",
            "--set",
            "leaderElection.enabled=true",
        ],
    ),
    (
        "a ServiceMonitor",
        &[
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--api-versions",
            "monitoring.coreos.com/v1/ServiceMonitor",
        ],
    ),
    (
        "no leader election",
        &["--set", "leaderElection.enabled=false"],
    ),
];

// ---------------------------------------------------------------------------------------
// Rendering

#[test]
fn helm_lint_accepts_the_chart_strictly_for_every_value_combination() -> Result<()> {
    let helm = Helm::find()?;
    let chart = chart_dir();
    let chart = chart.to_str().context("chart path is not UTF-8")?;
    for (name, extra) in COMBINATIONS {
        // lint has no --api-versions; a ServiceMonitor is linted through template below.
        if extra.contains(&"--api-versions") {
            continue;
        }
        let mut args = vec!["lint", "--strict", chart, "--namespace", NAMESPACE];
        args.extend_from_slice(extra);
        let output = helm
            .run(&args)
            .with_context(|| format!("lint with {name}"))?;
        ensure!(output.contains("0 chart(s) failed"), "{name}: {output}");
    }
    Ok(())
}

#[test]
fn every_value_combination_renders_rbac_without_wildcards_and_a_restricted_operator_pod()
-> Result<()> {
    for (name, extra) in COMBINATIONS {
        let objects = render(extra).with_context(|| format!("rendering {name}"))?;
        no_wildcards(&objects).with_context(|| name.to_string())?;
        let deployment = one(&objects, "Deployment", "sluice-operator")?;
        let pod = &deployment["spec"]["template"]["spec"];
        restricted(pod).with_context(|| format!("{name}: the operator pod"))?;
        probes_and_downward_api(pod).with_context(|| format!("{name}: the operator pod"))?;
        for object in &objects {
            let namespaced = ![
                "ClusterRole",
                "ClusterRoleBinding",
                "CustomResourceDefinition",
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding",
            ]
            .contains(&kind(object));
            let namespace = object["metadata"]["namespace"].as_str();
            ensure!(
                !namespaced || namespace.is_some(),
                "{name}: {} {} has no namespace",
                kind(object),
                object["metadata"]["name"]
            );
        }
    }
    Ok(())
}

#[test]
fn by_default_namespaced_resources_are_granted_cluster_wide_and_the_lease_only_at_home()
-> Result<()> {
    let objects = render(&[])?;
    let cluster = permissions_of(one(&objects, "ClusterRole", OPERATOR)?);
    for needed in [
        ("", "secrets", "create"),
        ("", "services", "delete"),
        ("apps", "statefulsets", "patch"),
        ("sluice.dev", "transferservers/status", "patch"),
        ("events.k8s.io", "events", "create"),
    ] {
        ensure!(
            cluster.contains(&Permission::from(needed)),
            "ClusterRole lacks {needed:?}"
        );
    }
    ensure!(
        !cluster.iter().any(|p| p.resource == "leases"),
        "Leases must not be granted cluster-wide"
    );
    let roles = of_kind(&objects, "Role");
    ensure!(roles.len() == 1, "roles: {}", roles.len());
    let lease_role = roles[0];
    ensure!(lease_role["metadata"]["namespace"] == NAMESPACE);
    for rule in lease_role["rules"].as_array().context("no rules")? {
        let verbs = strings(&rule["verbs"]);
        // Only create cannot name the object it is for.
        if verbs != ["create"] {
            ensure!(
                strings(&rule["resourceNames"]) == ["sluice-operator"],
                "lease rule {rule} is not limited to the Lease sluice-operator"
            );
        }
    }
    let binding = one(&objects, "ClusterRoleBinding", OPERATOR)?;
    ensure!(
        binding["subjects"]
            == json!([{"kind": "ServiceAccount", "name": OPERATOR, "namespace": NAMESPACE}]),
        "{}",
        binding["subjects"]
    );

    let container = operator_container(&objects)?;
    let args = strings(&container["args"]);
    ensure!(
        args == [
            "operator",
            "--log-format=json",
            &format!(
                "--gateway-image={}",
                sluice::operator::DEFAULT_GATEWAY_IMAGE
            ),
            "--metrics-listen=0.0.0.0:8080",
            "--leader-election",
            "--leader-election-namespace=sluice-system",
        ],
        "{args:?}"
    );
    // The chart installs the release it was cut with: the operator's own default gateway
    // image is the image the chart runs.
    let image = container["image"].as_str().unwrap_or_default();
    ensure!(
        image == sluice::operator::DEFAULT_GATEWAY_IMAGE,
        "chart image {image} is not the binary's {}: keep appVersion in Chart.yaml and the \
         version in Cargo.toml equal",
        sluice::operator::DEFAULT_GATEWAY_IMAGE
    );
    Ok(())
}

#[test]
fn the_crds_are_kept_on_uninstall_and_left_out_when_managed_elsewhere() -> Result<()> {
    let crds = of_kind(&render(&[])?, "CustomResourceDefinition")
        .into_iter()
        .map(|crd| {
            let keep = &crd["metadata"]["annotations"]["helm.sh/resource-policy"];
            ensure!(keep == "keep", "{} is not kept", crd["metadata"]["name"]);
            Ok(crd["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string())
        })
        .collect::<Result<BTreeSet<_>>>()?;
    let committed: BTreeSet<String> = sluice::api::crds()
        .into_iter()
        .filter_map(|crd| crd.metadata.name)
        .collect();
    ensure!(crds == committed, "{crds:?} != {committed:?}");
    let without = render(&["--set", "crds.install=false"])?;
    ensure!(of_kind(&without, "CustomResourceDefinition").is_empty());
    Ok(())
}

#[test]
fn watched_namespaces_get_roles_and_the_cluster_role_keeps_only_cluster_scoped_rules() -> Result<()>
{
    let everywhere = permissions_of(one(&render(&[])?, "ClusterRole", OPERATOR)?);
    let objects = render(&["--set", "watchNamespaces={team-a,team-b,team-a}"])?;
    let cluster = permissions_of(one(&objects, "ClusterRole", OPERATOR)?);
    let namespaced = ["secrets", "services", "statefulsets", "transferservers"];
    ensure!(
        !cluster
            .iter()
            .any(|p| namespaced.contains(&p.resource.as_str())),
        "the ClusterRole still grants namespaced resources: {cluster:?}"
    );
    for namespace in ["team-a", "team-b"] {
        let role = of_kind(&objects, "Role")
            .into_iter()
            .find(|r| r["metadata"]["namespace"] == namespace && r["metadata"]["name"] == OPERATOR)
            .with_context(|| format!("no Role in {namespace}"))?;
        let in_namespace = permissions_of(role);
        // Same permissions as with every namespace, only scoped.
        let union: BTreeSet<Permission> = cluster.union(&in_namespace).cloned().collect();
        ensure!(
            union == everywhere,
            "{namespace}: {:?}",
            union.symmetric_difference(&everywhere).collect::<Vec<_>>()
        );
        let bound = of_kind(&objects, "RoleBinding").into_iter().any(|b| {
            b["metadata"]["namespace"] == namespace
                && b["roleRef"]["name"] == OPERATOR
                && b["subjects"][0]["name"] == OPERATOR
                && b["subjects"][0]["namespace"] == NAMESPACE
        });
        ensure!(bound, "no RoleBinding in {namespace}");
    }
    let roles_elsewhere: Vec<String> = of_kind(&objects, "Role")
        .into_iter()
        .filter_map(|r| r["metadata"]["namespace"].as_str().map(str::to_string))
        .filter(|ns| !["team-a", "team-b", NAMESPACE, "default"].contains(&ns.as_str()))
        .collect();
    ensure!(roles_elsewhere.is_empty(), "{roles_elsewhere:?}");
    // Events about cluster-scoped policies go to `default`, and nothing else does.
    let events = of_kind(&objects, "Role")
        .into_iter()
        .find(|r| r["metadata"]["namespace"] == "default")
        .context("no Role for policy Events in default")?;
    ensure!(
        permissions_of(events)
            == BTreeSet::from([Permission::from(("events.k8s.io", "events", "create"))])
    );

    let args = strings(&operator_container(&objects)?["args"]);
    let watched: Vec<&String> = args
        .iter()
        .filter(|a| a.starts_with("--watch-namespace"))
        .collect();
    ensure!(
        watched == ["--watch-namespace=team-a", "--watch-namespace=team-b"],
        "{args:?}"
    );
    Ok(())
}

#[test]
fn two_replicas_run_with_leader_election_and_are_refused_without_it() -> Result<()> {
    let objects = render(&["--set", "replicaCount=2"])?;
    let deployment = one(&objects, "Deployment", OPERATOR)?;
    ensure!(deployment["spec"]["replicas"] == 2);
    ensure!(deployment["spec"]["strategy"]["type"] == "RollingUpdate");
    let args = strings(&operator_container(&objects)?["args"]);
    ensure!(args.contains(&"--leader-election".to_string()), "{args:?}");

    let refused = render(&[
        "--set",
        "replicaCount=2",
        "--set",
        "leaderElection.enabled=false",
    ]);
    let error = format!(
        "{:#}",
        refused
            .err()
            .context("two replicas without a leader rendered")?
    );
    ensure!(error.contains("needs leaderElection.enabled"), "{error}");

    let single = render(&["--set", "leaderElection.enabled=false"])?;
    let deployment = one(&single, "Deployment", OPERATOR)?;
    ensure!(deployment["spec"]["strategy"]["type"] == "Recreate");
    let args = strings(&operator_container(&single)?["args"]);
    ensure!(!args.iter().any(|a| a.starts_with("--leader")), "{args:?}");
    ensure!(
        !of_kind(&single, "Role")
            .iter()
            .any(|r| permissions_of(r).iter().any(|p| p.resource == "leases")),
        "a Lease Role without leader election"
    );
    Ok(())
}

#[test]
fn the_service_monitor_renders_only_where_its_api_exists_and_scrapes_the_metrics_service()
-> Result<()> {
    ensure!(
        of_kind(&render(&[])?, "ServiceMonitor").is_empty(),
        "on by default"
    );
    let missing = render(&["--set", "metrics.serviceMonitor.enabled=true"]);
    let error = format!("{:#}", missing.err().context("rendered without the API")?);
    ensure!(error.contains("monitoring.coreos.com/v1"), "{error}");

    let objects = render(COMBINATIONS[3].1)?;
    let monitor = one(&objects, "ServiceMonitor", OPERATOR)?;
    let service = one(&objects, "Service", "sluice-operator-metrics")?;
    let labels = service["metadata"]["labels"]
        .as_object()
        .context("no labels")?;
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .context("no selector")?
    {
        ensure!(
            labels.get(key) == Some(value),
            "the Service lacks {key}={value}"
        );
    }
    let endpoint = &monitor["spec"]["endpoints"][0];
    ensure!(endpoint["port"] == "metrics" && endpoint["path"] == "/metrics");
    ensure!(service["spec"]["ports"][0]["name"] == "metrics");
    ensure!(service["spec"]["ports"][0]["targetPort"] == "metrics");
    let container = operator_container(&objects)?;
    ensure!(container["ports"][0]["name"] == "metrics");
    let deployment = one(&objects, "Deployment", OPERATOR)?;
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"]
        .as_object()
        .context("no selector")?
    {
        ensure!(&pod_labels[key] == value, "the pod lacks {key}={value}");
    }
    Ok(())
}

#[test]
fn the_kustomization_lists_every_plain_manifest_and_they_install_into_its_namespace() -> Result<()>
{
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/manifests");
    let kustomization: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml"))?)?;
    let listed: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
    let present: BTreeSet<String> = std::fs::read_dir(&dir)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<BTreeSet<_>>>()?
        .into_iter()
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    ensure!(listed == present, "listed {listed:?}, present {present:?}");

    let namespace = manifest_namespace()?;
    ensure!(namespace["metadata"]["name"] == NAMESPACE);
    let labels = &namespace["metadata"]["labels"];
    ensure!(labels["pod-security.kubernetes.io/enforce"] == "restricted");
    let rendered = parse(&std::fs::read_to_string(dir.join("sluice.yaml"))?)?;
    for object in &rendered {
        if let Some(ns) = object["metadata"]["namespace"].as_str() {
            ensure!(ns == NAMESPACE, "{} in {ns}", object["metadata"]["name"]);
        }
    }
    ensure!(one(&rendered, "Deployment", OPERATOR).is_ok());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Installing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_installed_chart_lets_the_operator_roll_out_the_examples_with_exactly_its_grants()
-> Result<()> {
    let control_plane = ControlPlane::start_with(Options {
        audit_policy: Some(audit_policy()),
        admission_plugins: vec!["OwnerReferencesPermissionEnforcement".into()],
    })
    .await?;
    let client = control_plane.client();
    let objects = render(&[])?;
    install(&client, &objects).await?;
    operator_pod_passes_restricted_pod_security(&client, &objects).await?;

    let scratch = tempfile::Builder::new().prefix("sluice-chart-").tempdir()?;
    let kubeconfig = operator_kubeconfig(&client, &control_plane, scratch.path()).await?;
    let mut operator = OperatorProcess::start(&objects, &kubeconfig, scratch.path())?;
    let outcome = async {
        let kubelet = FakeKubelet::register(
            client.clone(),
            "node-sh-1",
            &[(REGION_LABEL, "cn-shanghai")],
        )
        .await?;
        apply_examples_in_a_restricted_namespace(&client).await?;
        the_admission_policy_refuses_a_server_the_policy_forbids(&client).await?;
        let pod = kubelet
            .run_pod(EXAMPLES_NAMESPACE, "app.kubernetes.io/instance=cucm-backup")
            .await;
        let _pod = with_refusals(&client, pod).await?;
        examples_become_ready(&client).await?;
        if let Some(metrics) = operator.metrics {
            health_and_metrics_answer(metrics).await?;
        }
        the_bound_volume_is_read(&client, &control_plane).await?;
        leftovers_are_deleted(&client).await?;
        let refused = refused_pods(&client).await?;
        ensure!(refused.is_empty(), "pods refused: {refused:?}");
        operator.ensure_running()
    }
    .await;
    let permissions =
        permissions_used_are_exactly_those_granted(&control_plane, &objects, &operator);
    let outcome = outcome.and(permissions.await);
    operator.stop().await;
    let conditions = server_conditions(&client).await;
    outcome.with_context(|| {
        let log = operator.log_tail();
        format!("operator log:\n{log}\nservers' conditions:\n{conditions}")
    })
}

/// `NAME: TYPE=STATUS (REASON: MESSAGE)` for every condition of every server.
async fn server_conditions(client: &Client) -> String {
    let servers = Api::<TransferServer>::namespaced(client.clone(), EXAMPLES_NAMESPACE);
    let Ok(list) = servers.list(&ListParams::default()).await else {
        return "(cannot list the servers)".into();
    };
    let mut lines = Vec::new();
    for server in list.items {
        for c in server.status.iter().flat_map(|s| &s.conditions) {
            let (name, type_, status) = (server.name_any(), &c.type_, &c.status);
            lines.push(format!(
                "{name}: {type_}={status} ({}: {})",
                c.reason, c.message
            ));
        }
    }
    lines.join("\n")
}

/// Logs the operator's requests, without bodies.
fn audit_policy() -> String {
    format!(
        "apiVersion: audit.k8s.io/v1\n\
         kind: Policy\n\
         omitStages: [RequestReceived]\n\
         rules:\n\
         - level: Metadata\n  users: [\"{OPERATOR_USER}\"]\n\
         - level: None\n"
    )
}

/// Creates the namespace from `deploy/manifests/namespace.yaml` and applies the rendered
/// chart, then waits for the CRDs and for admission to judge TransferServers.
async fn install(client: &Client, objects: &[Value]) -> Result<()> {
    apply(client, &serde_json::from_value(manifest_namespace()?)?).await?;
    for object in objects {
        apply(client, &serde_json::from_value(object.clone())?).await?;
    }
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in of_kind(objects, "CustomResourceDefinition") {
        let name = crd["metadata"]["name"].as_str().unwrap_or_default();
        eventually(&format!("CRD {name} established"), WAIT, || async {
            let crd = crds.get(name).await?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Established" && c.status == "True");
            Ok(established.then_some(()))
        })
        .await?;
    }
    if !of_kind(objects, "ValidatingAdmissionPolicy").is_empty() {
        admission_resolves_the_policy_kind(client).await?;
    }
    Ok(())
}

/// Waits until a TransferServer passes admission (a dry run, with no DataResidencyPolicy
/// yet, which the bindings admit). The API server's admission plugins map kinds to
/// resources from a discovery snapshot refreshed every 30 s: if the residency policies
/// were loaded before the new CRDs reached discovery, they cannot resolve their parameter
/// kind and, failing closed, deny every TransferServer until the next refresh; the same
/// snapshot makes the owner-reference check refuse the operator's first writes.
async fn admission_resolves_the_policy_kind(client: &Client) -> Result<()> {
    let servers = Api::<TransferServer>::namespaced(client.clone(), NAMESPACE);
    let probe = volume_server(NAMESPACE, "admission-probe", "cn-shanghai", "ssd");
    let probe: TransferServer = serde_json::from_value(probe)?;
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    eventually("admission to resolve DataResidencyPolicy", WAIT, || async {
        Ok(servers.create(&dry_run, &probe).await.ok().map(|_| ()))
    })
    .await
}

/// The rendered pod template is admitted as a Pod in the `restricted` namespace, and the
/// Deployment's ReplicaSet creates its pod there.
async fn operator_pod_passes_restricted_pod_security(
    client: &Client,
    objects: &[Value],
) -> Result<()> {
    let template = &one(objects, "Deployment", OPERATOR)?["spec"]["template"];
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        // No labels: the ReplicaSet would adopt a pod with its selector's.
        "metadata": {"name": "operator-pod-security-check", "namespace": NAMESPACE},
        "spec": template["spec"],
    }))?;
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    pods.create(&PostParams::default(), &pod)
        .await
        .context("the operator's pod template is refused in a restricted namespace")?;
    // The control: Pod Security does refuse here what `restricted` forbids.
    let mut unconfined = pod.clone();
    unconfined.metadata.name = Some("unconfined-pod-security-check".into());
    let spec = unconfined.spec.as_mut().context("pod without spec")?;
    spec.security_context = None;
    spec.containers[0].security_context = None;
    let refused = pods.create(&PostParams::default(), &unconfined).await;
    let error = refused
        .err()
        .context("Pod Security admitted an unconfined pod")?;
    ensure!(
        error.to_string().contains("violates PodSecurity"),
        "{error}"
    );
    pods.delete("operator-pod-security-check", &DeleteParams::default())
        .await?;
    let selector = "app.kubernetes.io/component=operator,app.kubernetes.io/instance=sluice";
    let created = eventually("the operator Deployment's pod", WAIT, || async {
        let listed = pods.list(&ListParams::default().labels(selector)).await?;
        Ok((!listed.items.is_empty()).then_some(()))
    })
    .await;
    with_refusals(client, created).await
}

/// A kubeconfig for the chart's ServiceAccount, with a token from the TokenRequest API.
async fn operator_kubeconfig(
    client: &Client,
    control_plane: &ControlPlane,
    dir: &Path,
) -> Result<PathBuf> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let token = Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE)
        .create_token_request(OPERATOR, &PostParams::default(), &request)
        .await
        .context("TokenRequest for the operator's ServiceAccount")?
        .status
        .context("TokenRequest without status")?
        .token;
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": control_plane.server_url(),
            "certificate-authority": control_plane.ca_cert_path(),
        }}],
        "users": [{"name": OPERATOR, "user": {"token": token}}],
        "contexts": [{"name": OPERATOR, "context": {
            "cluster": "test", "user": OPERATOR, "namespace": NAMESPACE,
        }}],
        "current-context": OPERATOR,
    });
    let path = dir.join("operator.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&config)?)?;
    Ok(path)
}

/// `sluice operator` run as the rendered container would run: its args and environment,
/// with the downward API filled in, the metrics address moved to 127.0.0.1 and flags this
/// binary does not know yet left out (and reported).
struct OperatorProcess {
    child: Child,
    log: PathBuf,
    /// Whether the binary knows `--leader-election` (and so runs with it).
    leader_election: bool,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, if the binary serves them.
    metrics: Option<SocketAddr>,
}

impl OperatorProcess {
    fn start(objects: &[Value], kubeconfig: &Path, dir: &Path) -> Result<Self> {
        let binary = env!("CARGO_BIN_EXE_sluice");
        let help = std::process::Command::new(binary)
            .args(["operator", "--help"])
            .output()?;
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        let container = operator_container(objects)?;

        let mut args = Vec::new();
        let mut left_out = Vec::new();
        let mut metrics = None;
        for arg in strings(&container["args"]) {
            let flag = arg.split('=').next().unwrap_or_default().to_string();
            if flag.starts_with("--") && !knows_flag(&help, &flag) {
                left_out.push(arg);
                continue;
            }
            if flag == "--metrics-listen" {
                // Never 0.0.0.0 here: everything a test starts listens on loopback.
                let address = free_local_address()?;
                metrics = Some(address);
                args.push(format!("--metrics-listen={address}"));
            } else {
                args.push(arg);
            }
        }
        if !left_out.is_empty() {
            eprintln!("chart flags this sluice binary does not know, left out: {left_out:?}");
        }
        let leader_election = args.iter().any(|a| a == "--leader-election");

        let log = dir.join("operator.log");
        let stdout = std::fs::File::create(&log)?;
        let mut command = Command::new(binary);
        command
            .args(&args)
            .env_clear()
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", "sluice-operator-5d9f8-abcde")
            .env("POD_NAMESPACE", NAMESPACE)
            .stdin(Stdio::null())
            .stdout(stdout.try_clone()?)
            .stderr(stdout)
            .kill_on_drop(true);
        for variable in container["env"].as_array().into_iter().flatten() {
            if let (Some(name), Some(value)) =
                (variable["name"].as_str(), variable["value"].as_str())
            {
                command.env(name, value);
            }
        }
        let child = command.spawn().context("cannot start sluice operator")?;
        Ok(Self {
            child,
            log,
            leader_election,
            metrics,
        })
    }

    fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!("the operator exited ({status})"),
        }
    }

    async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

/// Whether `help` documents `flag` (and not only a longer flag it begins).
fn knows_flag(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(at, _)| {
        let next = help[at + flag.len()..].chars().next();
        !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

fn free_local_address() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The examples, unchanged except that their namespace also enforces `restricted`, with
/// the StorageClass they name (binding volumes where the region-pinned pod runs) and the
/// FTPS certificate cert-manager would write.
async fn apply_examples_in_a_restricted_namespace(client: &Client) -> Result<()> {
    let storage_class = json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": "cn-shanghai-ssd"},
        "provisioner": "example.com/none",
        "volumeBindingMode": "WaitForFirstConsumer",
    });
    apply(client, &serde_json::from_value(storage_class)?).await?;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    for mut object in read_yaml_dir(&examples)? {
        if object.types.as_ref().is_some_and(|t| t.kind == "Namespace") {
            object.labels_mut().insert(
                "pod-security.kubernetes.io/enforce".into(),
                "restricted".into(),
            );
        }
        apply(client, &object).await?;
    }
    let (cert, key) = TestPki::new()?.issue(VALID_UNTIL)?;
    let tls = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "cucm-backup-tls", "namespace": EXAMPLES_NAMESPACE},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": cert, "tls.key": key},
    });
    apply(client, &serde_json::from_value(tls)?).await?;
    Ok(())
}

/// The chart installs the residency admission policies: a Hong Kong server in the
/// examples' mainland-China namespace is refused at apply, with the operator's message.
async fn the_admission_policy_refuses_a_server_the_policy_forbids(client: &Client) -> Result<()> {
    let server = volume_server(
        EXAMPLES_NAMESPACE,
        "in-hong-kong",
        "cn-hongkong",
        "cn-shanghai-ssd",
    );
    // The API server learns about a new policy binding within a second or so.
    eventually("the admission policy refuses", WAIT, || {
        let server = server.clone();
        async move {
            Ok(refused(
                client,
                server,
                "region cn-hongkong is not allowed by DataResidencyPolicy mainland-china",
            )
            .await
            .ok())
        }
    })
    .await
}

async fn examples_become_ready(client: &Client) -> Result<()> {
    let servers = Api::<TransferServer>::namespaced(client.clone(), EXAMPLES_NAMESPACE);
    eventually("TransferServer Ready=True", WAIT, || async {
        let server = servers.get(SERVER).await?;
        Ok(condition(&server, "Ready")
            .is_some_and(|(s, _, _)| s == "True")
            .then_some(()))
    })
    .await
    .with_context(|| format!("{SERVER} never became Ready"))?;
    let users = Api::<TransferUser>::namespaced(client.clone(), EXAMPLES_NAMESPACE);
    for user in ["cucm", "ops"] {
        eventually(&format!("TransferUser {user} Ready=True"), WAIT, || async {
            let user = users.get(user).await?;
            let ready = user
                .status
                .iter()
                .flat_map(|s| &s.conditions)
                .any(|c| c.type_ == "Ready" && c.status == "True");
            Ok(ready.then_some(()))
        })
        .await?;
    }
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), EXAMPLES_NAMESPACE);
    eventually("the gateway StatefulSet rolled out", WAIT, || async {
        let set = statefulsets.get("cucm-backup-gateway").await?;
        let wanted = set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let status = set.status.unwrap_or_default();
        let rolled_out = status.observed_generation == set.metadata.generation
            && status.ready_replicas == Some(wanted)
            && status.updated_replicas == Some(wanted);
        Ok(rolled_out.then_some(()))
    })
    .await
}

/// `/healthz` and `/readyz` answer 200 and `/metrics` serves Prometheus text.
async fn health_and_metrics_answer(address: SocketAddr) -> Result<()> {
    for path in ["/healthz", "/readyz"] {
        eventually(&format!("{path} answering 200"), WAIT, || async {
            Ok((http_get(address, path).await?.0 == 200).then_some(()))
        })
        .await?;
    }
    let (status, body) = http_get(address, "/metrics").await?;
    ensure!(status == 200, "/metrics answered {status}");
    ensure!(
        body.contains("# TYPE"),
        "/metrics is not Prometheus text: {body}"
    );
    Ok(())
}

async fn http_get(address: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await??;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status in {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("");
    Ok((status, body.to_string()))
}

/// Binds the server's claim to a PersistentVolume in its region, as a provisioner would:
/// the operator then reads the volume to check where it is.
async fn the_bound_volume_is_read(client: &Client, control_plane: &ControlPlane) -> Result<()> {
    let volume = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": "cucm-backup-data-volume"},
        "spec": {
            "capacity": {"storage": "50Gi"},
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "cn-shanghai-ssd",
            "local": {"path": "/mnt/disks/cucm-backup"},
            "claimRef": {"namespace": EXAMPLES_NAMESPACE, "name": "cucm-backup-data"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": REGION_LABEL, "operator": "In", "values": ["cn-shanghai"]},
            ]}]}},
        },
    });
    apply(client, &serde_json::from_value(volume)?).await?;
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), EXAMPLES_NAMESPACE);
    let binding = json!({"spec": {"volumeName": "cucm-backup-data-volume"}});
    claims
        .patch(
            "cucm-backup-data",
            &PatchParams::default(),
            &Patch::Merge(&binding),
        )
        .await
        .context("binding the claim")?;
    eventually("the operator reading the bound volume", WAIT, || async {
        let read = audited_requests(control_plane)?
            .iter()
            .any(|r| r.permission.resource == "persistentvolumes" && r.permission.verb == "get");
        Ok(read.then_some(()))
    })
    .await
}

/// What an earlier roll-out leaves is removed: a gateway Deployment from before the
/// StatefulSet, and per-pod FTPS Services after a scale-down. A second server, because a
/// volume server cannot change its replica count once its claim exists (the claim's
/// access mode would change); this one keeps its files in a bucket behind a closed
/// loopback port, which fails its storage probe but not its roll-out.
async fn leftovers_are_deleted(client: &Client) -> Result<()> {
    let endpoint = format!("http://{}", free_local_address()?);
    let credentials = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "split-credentials", "namespace": EXAMPLES_NAMESPACE},
        "stringData": {"accessKeyId": "split", "secretAccessKey": "not-a-real-key"},
    });
    // Two pods behind a LoadBalancer split the passive range: one Service per pod.
    let server = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "TransferServer",
        "metadata": {"name": "split", "namespace": EXAMPLES_NAMESPACE},
        "spec": {
            "region": "cn-shanghai",
            "replicas": 2,
            "service": {"type": "LoadBalancer"},
            "protocols": {"sftp": {}, "ftps": {
                "explicit": {},
                "tlsSecretRef": {"name": "cucm-backup-tls"},
                "passivePorts": {"first": 30100, "count": 16},
            }},
            "storage": {"objectStore": {
                "provider": "S3Compatible",
                "bucket": "split",
                "region": "cn-shanghai",
                "endpoint": endpoint,
                "addressingStyle": "Path",
                "credentials": {"secretRef": {"name": "split-credentials"}},
            }},
        },
    });
    for object in [credentials, server] {
        apply(client, &serde_json::from_value(object)?).await?;
    }
    let services = Api::<Service>::namespaced(client.clone(), EXAMPLES_NAMESPACE);
    let budgets = Api::<PodDisruptionBudget>::namespaced(client.clone(), EXAMPLES_NAMESPACE);
    let pod_services = ["split-gateway-0", "split-gateway-1"];
    // The budget is written last of the two-replica objects, so the whole set is there.
    eventually("per-pod Services and the budget", WAIT, || async {
        for name in pod_services {
            if services.get_opt(name).await?.is_none() {
                return Ok(None);
            }
        }
        Ok(budgets.get_opt("split-gateway").await?.map(|_| ()))
    })
    .await?;

    let servers = Api::<TransferServer>::namespaced(client.clone(), EXAMPLES_NAMESPACE);
    let uid = servers
        .get("split")
        .await?
        .uid()
        .context("server without uid")?;
    let legacy = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "split-gateway",
            "namespace": EXAMPLES_NAMESPACE,
            "ownerReferences": [{
                "apiVersion": "sluice.dev/v1alpha1", "kind": "TransferServer",
                "name": "split", "uid": uid, "controller": true,
            }],
        },
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "legacy-gateway"}},
            "template": {
                "metadata": {"labels": {"app": "legacy-gateway"}},
                "spec": {"containers": [{"name": "gateway", "image": "sluice"}]},
            },
        },
    });
    apply(client, &serde_json::from_value(legacy)?).await?;
    let single = json!({"spec": {"replicas": 1}});
    servers
        .patch("split", &PatchParams::default(), &Patch::Merge(&single))
        .await?;

    let deployments = Api::<Deployment>::namespaced(client.clone(), EXAMPLES_NAMESPACE);
    eventually("the legacy Deployment deleted", WAIT, || async {
        let gone = deployments.get_opt("split-gateway").await?.is_none();
        Ok(gone.then_some(()))
    })
    .await?;
    eventually("per-pod Services and the budget deleted", WAIT, || async {
        for name in pod_services {
            if services.get_opt(name).await?.is_some() {
                return Ok(None);
            }
        }
        Ok(budgets
            .get_opt("split-gateway")
            .await?
            .is_none()
            .then_some(()))
    })
    .await
}

/// `result`, with the refused pods (if any) added to its error.
async fn with_refusals<T>(client: &Client, result: Result<T>) -> Result<T> {
    match result {
        Ok(value) => Ok(value),
        Err(error) => {
            let refused = refused_pods(client).await.unwrap_or_default();
            Err(error.context(format!("FailedCreate events: {refused:?}")))
        }
    }
}

/// Messages of the Events saying a controller could not create a pod (Pod Security
/// refusing it, say), in the operator's and the examples' namespaces.
async fn refused_pods(client: &Client) -> Result<Vec<String>> {
    let mut refused = Vec::new();
    for namespace in [NAMESPACE, EXAMPLES_NAMESPACE] {
        let events = Api::<Event>::namespaced(client.clone(), namespace)
            .list(&ListParams::default())
            .await?;
        refused.extend(
            events
                .items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
                .map(|e| e.message.unwrap_or_default()),
        );
    }
    Ok(refused)
}

/// Permissions a scenario on this control plane cannot exercise, and why each is needed.
/// An exemption for a permission that was used after all fails the test: drop it then.
fn exemptions(operator: &OperatorProcess) -> BTreeMap<Permission, &'static str> {
    let mut exempt = BTreeMap::new();
    exempt.insert(
        Permission::from(("sluice.dev", "transferservers/finalizers", "update")),
        "checked inside the API server by OwnerReferencesPermissionEnforcement (on in this \
         test, as on OpenShift) when the operator sets blockOwnerDeletion on an owner \
         reference; it is no request of its own, so the audit log cannot show it",
    );
    exempt.insert(
        Permission::from(("networking.k8s.io", "networkpolicies", "delete")),
        "removes a gateway's NetworkPolicy when its server turns it off \
         (networkPolicy.enabled: false), which the examples do not",
    );
    if !operator.leader_election {
        for verb in ["create", "get", "update"] {
            exempt.insert(
                Permission::from(("coordination.k8s.io", "leases", verb)),
                "leader election, which this sluice binary does not have yet",
            );
        }
    }
    exempt
}

/// Checks the audit log, again for up to 10 s while it fails: the API server logs a
/// request once it has answered it, so the test can see a request's effect (a Service
/// deleted) before its record.
async fn permissions_used_are_exactly_those_granted(
    control_plane: &ControlPlane,
    objects: &[Value],
    operator: &OperatorProcess,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let checked = permissions_used_so_far_are_those_granted(control_plane, objects, operator);
        if checked.is_ok() || Instant::now() > deadline {
            return checked;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn permissions_used_so_far_are_those_granted(
    control_plane: &ControlPlane,
    objects: &[Value],
    operator: &OperatorProcess,
) -> Result<()> {
    let requests = audited_requests(control_plane)?;
    let refused: Vec<&AuditedRequest> = requests.iter().filter(|r| r.code == 403).collect();
    ensure!(refused.is_empty(), "the operator was refused: {refused:#?}");

    let granted: BTreeSet<Permission> = of_kind(objects, "ClusterRole")
        .into_iter()
        .chain(of_kind(objects, "Role"))
        .flat_map(permissions_of)
        .collect();
    let used: BTreeSet<Permission> = requests.iter().flat_map(AuditedRequest::uses).collect();
    let exempt = exemptions(operator);
    eprintln!(
        "the operator made {} requests using {} of the {} permissions granted; exempt: {:?}",
        requests.len(),
        used.len(),
        granted.len(),
        exempt.keys().collect::<Vec<_>>()
    );

    let not_granted: Vec<&Permission> = used.difference(&granted).collect();
    ensure!(
        not_granted.is_empty(),
        "the operator used permissions the chart does not grant (from the cluster's default \
         roles?): {not_granted:?}"
    );
    let unused: Vec<&Permission> = granted
        .iter()
        .filter(|p| !used.contains(p) && !exempt.contains_key(p))
        .collect();
    ensure!(
        unused.is_empty(),
        "the chart grants permissions the operator never used; remove them, or list them in \
         exemptions() with the reason they are needed: {unused:?}"
    );
    let leases_elsewhere: Vec<&AuditedRequest> = requests
        .iter()
        .filter(|r| r.permission.resource == "leases")
        .filter(|r| {
            r.namespace.as_deref() != Some(NAMESPACE)
                || (r.permission.verb != "create" && r.name.as_deref() != Some("sluice-operator"))
        })
        .collect();
    ensure!(
        leases_elsewhere.is_empty(),
        "Lease requests outside {NAMESPACE}/sluice-operator: {leases_elsewhere:#?}"
    );
    let stale: Vec<&Permission> = exempt.keys().filter(|p| used.contains(p)).collect();
    ensure!(
        stale.is_empty(),
        "exempted as not exercised, but used: remove them from exemptions(): {stale:?}"
    );
    let ungranted_exemptions: Vec<&Permission> =
        exempt.keys().filter(|p| !granted.contains(p)).collect();
    ensure!(
        ungranted_exemptions.is_empty(),
        "exemptions for permissions the chart does not grant: {ungranted_exemptions:?}"
    );
    Ok(())
}

/// One request of the operator's, from the audit log.
#[derive(Debug)]
struct AuditedRequest {
    permission: Permission,
    namespace: Option<String>,
    name: Option<String>,
    code: u16,
}

impl AuditedRequest {
    /// The permissions the request needed: a server-side apply that created its object
    /// (201) was authorised as create as well as patch.
    fn uses(&self) -> Vec<Permission> {
        let mut uses = vec![self.permission.clone()];
        if self.permission.verb == "patch" && self.code == 201 {
            uses.push(Permission {
                verb: "create".into(),
                ..self.permission.clone()
            });
        }
        uses
    }
}

fn audited_requests(control_plane: &ControlPlane) -> Result<Vec<AuditedRequest>> {
    let path = control_plane.audit_log_path();
    let log = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut requests = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value = serde_json::from_str(line)?;
        if event["user"]["username"] != OPERATOR_USER {
            continue;
        }
        // Discovery (/api, /apis) is open to every authenticated user.
        let Some(object) = event["objectRef"].as_object() else {
            continue;
        };
        let text = |key: &str| object.get(key).and_then(Value::as_str).map(str::to_string);
        let resource = match text("subresource") {
            Some(sub) => format!("{}/{sub}", text("resource").unwrap_or_default()),
            None => text("resource").unwrap_or_default(),
        };
        requests.push(AuditedRequest {
            permission: Permission {
                group: text("apiGroup").unwrap_or_default(),
                resource,
                verb: event["verb"].as_str().unwrap_or_default().to_string(),
            },
            namespace: text("namespace"),
            name: text("name"),
            code: event["responseStatus"]["code"]
                .as_u64()
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(0),
        });
    }
    Ok(requests)
}

// ---------------------------------------------------------------------------------------
// Rendered objects

/// One `(apiGroup, resource, verb)` an RBAC rule grants; `resource` may be
/// `resource/subresource`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Permission {
    group: String,
    resource: String,
    verb: String,
}

impl From<(&str, &str, &str)> for Permission {
    fn from((group, resource, verb): (&str, &str, &str)) -> Self {
        Self {
            group: group.into(),
            resource: resource.into(),
            verb: verb.into(),
        }
    }
}

/// Every permission a Role or ClusterRole grants.
fn permissions_of(role: &Value) -> BTreeSet<Permission> {
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().into_iter().flatten() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    granted.insert(Permission::from((
                        group.as_str(),
                        resource.as_str(),
                        verb.as_str(),
                    )));
                }
            }
        }
    }
    granted
}

fn render(extra: &[&str]) -> Result<Vec<Value>> {
    parse(&Helm::find()?.template(RELEASE, NAMESPACE, extra)?)
}

fn parse(yaml: &str) -> Result<Vec<Value>> {
    Ok(parse_yaml(yaml)?
        .into_iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()?)
}

fn manifest_namespace() -> Result<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/manifests/namespace.yaml");
    Ok(serde_yaml::from_str(&std::fs::read_to_string(path)?)?)
}

fn kind(object: &Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

fn of_kind<'a>(objects: &'a [Value], wanted: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| kind(o) == wanted).collect()
}

fn one<'a>(objects: &'a [Value], wanted: &str, name: &str) -> Result<&'a Value> {
    of_kind(objects, wanted)
        .into_iter()
        .find(|o| o["metadata"]["name"] == name)
        .with_context(|| format!("no {wanted} {name} rendered"))
}

fn operator_container(objects: &[Value]) -> Result<&Value> {
    let deployment = one(objects, "Deployment", OPERATOR)?;
    let containers = &deployment["spec"]["template"]["spec"]["containers"];
    ensure!(
        containers.as_array().map(Vec::len) == Some(1),
        "{containers}"
    );
    Ok(&containers[0])
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

fn no_wildcards(objects: &[Value]) -> Result<()> {
    for role in of_kind(objects, "ClusterRole")
        .into_iter()
        .chain(of_kind(objects, "Role"))
    {
        let rules = role["rules"].as_array().context("a role without rules")?;
        for rule in rules {
            for field in [
                "apiGroups",
                "resources",
                "verbs",
                "resourceNames",
                "nonResourceURLs",
            ] {
                ensure!(
                    !strings(&rule[field]).iter().any(|s| s.contains('*')),
                    "{} {}: wildcard in {field}: {rule}",
                    kind(role),
                    role["metadata"]["name"]
                );
            }
            ensure!(
                rule["nonResourceURLs"].is_null(),
                "non-resource rule {rule}"
            );
        }
    }
    Ok(())
}

/// What Pod Security's `restricted` level demands of a pod, field by field.
fn restricted(pod: &Value) -> Result<()> {
    let pod_context = &pod["securityContext"];
    ensure!(
        pod_context["runAsNonRoot"] == true,
        "runAsNonRoot: {pod_context}"
    );
    ensure!(pod_context["runAsUser"] != 0, "runAsUser 0");
    for field in ["hostNetwork", "hostPID", "hostIPC"] {
        ensure!(pod[field] != true, "{field}");
    }
    ensure!(
        !pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v.get("hostPath").is_some()),
        "hostPath volume"
    );
    let containers = pod["containers"].as_array().context("no containers")?;
    for container in containers {
        let context = &container["securityContext"];
        ensure!(context["allowPrivilegeEscalation"] == false, "{context}");
        ensure!(context["privileged"] != true, "{context}");
        ensure!(context["runAsNonRoot"] != false, "{context}");
        ensure!(context["readOnlyRootFilesystem"] == true, "{context}");
        ensure!(
            strings(&context["capabilities"]["drop"]) == ["ALL"],
            "capabilities not all dropped: {context}"
        );
        ensure!(
            context["capabilities"]["add"].is_null(),
            "capabilities added: {context}"
        );
        let seccomp = context["seccompProfile"]["type"]
            .as_str()
            .or(pod_context["seccompProfile"]["type"].as_str());
        ensure!(seccomp == Some("RuntimeDefault"), "seccomp {seccomp:?}");
        for port in container["ports"].as_array().into_iter().flatten() {
            ensure!(port.get("hostPort").is_none(), "hostPort {port}");
        }
    }
    Ok(())
}

fn probes_and_downward_api(pod: &Value) -> Result<()> {
    let container = &pod["containers"][0];
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        ensure!(
            get["path"] == path && get["port"] == "metrics",
            "{probe}: {get}"
        );
    }
    let port = container["ports"][0]["containerPort"].as_u64().unwrap_or(0);
    let listen = format!("--metrics-listen=0.0.0.0:{port}");
    ensure!(
        strings(&container["args"]).contains(&listen),
        "the metrics port {port} is not where the operator listens"
    );
    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let found = container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["name"] == name && e["valueFrom"]["fieldRef"]["fieldPath"] == field);
        ensure!(found, "{name} is not {field} from the downward API");
    }
    ensure!(pod["terminationGracePeriodSeconds"].as_u64() > Some(0));
    ensure!(pod["automountServiceAccountToken"] == true);
    ensure!(pod["serviceAccountName"] == OPERATOR);
    Ok(())
}

#[test]
fn knows_flag_tells_a_flag_from_a_longer_one_it_begins() {
    let help = "  --leader-election-namespace <NS>\n  --gateway-image <IMAGE>\n";
    assert!(!knows_flag(help, "--leader-election"));
    assert!(knows_flag(help, "--leader-election-namespace"));
    assert!(knows_flag(help, "--gateway-image"));
}
