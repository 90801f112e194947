//! The main job on one machine: the operator reconciling `deploy/examples/` and a
//! gateway serving real SFTP and FTPS transfers. Run it with `scripts/demo`.
//!
//! By default everything runs on this machine and listens on 127.0.0.1 only, and no
//! kubeconfig is read: a local control plane (etcd, kube-apiserver,
//! kube-controller-manager), the operator (in this process), and the gateway pod of the
//! example server `cucm-backup`, run as a local process by the stand-in kubelet the
//! end-to-end tests use. That kubelet runs this one pod only: a TransferServer you add
//! while the demo runs stays `WaitingForGateway`. The ports are new on every run. When the
//! demo stops, the control plane, the gateway and their temporary directories (PKI, etcd
//! data, uploaded files) are removed.
//!
//! `--use-current-cluster`, and only that flag, uses the cluster the current kubeconfig
//! points at instead. Before writing anything it checks that the cluster has what the
//! example server needs, the StorageClass `cn-shanghai-ssd` and a node labelled
//! `topology.kubernetes.io/region=cn-shanghai`, and stops if not: it never creates a
//! StorageClass. It then installs, and leaves installed when it stops:
//! - cluster-wide: the three Sluice CRDs and the DataResidencyPolicy `mainland-china`,
//!   which governs every namespace labelled `sluice.dev/residency=cn`;
//! - the namespace `telephony` with the example's TransferServer `cucm-backup`, its
//!   TransferUsers `cucm` and `ops` (the key of `ops` replaced by one generated into the
//!   work directory), the Secret `cucm-password` and, unless it exists, the TLS Secret
//!   `cucm-backup-tls` issued by a throwaway CA whose certificate goes to the work
//!   directory; and what the operator creates for the server there (StatefulSet,
//!   Service, Secrets, a 50Gi PersistentVolumeClaim);
//! - the Lease `sluice-operator`, in the namespace of an existing Lease of that name (an
//!   installed operator's) or else in `telephony`: the operator runs in this process with
//!   leader election, so it never acts while an installed operator leads
//!   (`--leader-election-namespace` names the namespace instead).
//!
//! Gateway pods run the image `--gateway-image` (`SLUICE_GATEWAY_IMAGE`), as with
//! `sluice operator`. To remove what the demo installed: `kubectl delete namespace
//! telephony`, `kubectl delete dataresidencypolicy mainland-china`, and, only if no Sluice
//! operator is installed, `kubectl delete -f crds/` (which deletes every Sluice object in
//! the cluster).
//!
//! Either way the demo prints how to connect, then runs until Ctrl-C, SIGTERM or SIGHUP,
//! which all stop it the same way. The work directory (`.demo/` in the repository, or
//! `--work-dir`) keeps the `ops` key, the FTPS CA certificate and the sftp known_hosts
//! file after the demo stops; a local run starts with an empty known_hosts file, since
//! its host keys are new every time.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DynamicObject, ListParams};
use kube::{Api, Client, ResourceExt};
use sluice::api::{DEFAULT_REGION_LABEL, TransferServer};
use sluice::operator::lease::LEASE_NAME;
use sluice::operator::{DEFAULT_GATEWAY_IMAGE, OperatorArgs};
use support::cluster::{
    Operator, apply, eventually, install_crds, install_storage_classes, read_yaml_dir,
    wait_for_gateway_users,
};
use support::controlplane::ControlPlane;
use support::gateway::{TestPki, VALID_UNTIL};
use support::kubelet::{FakeKubelet, RunningPod};
use support::sftp::generate_key;
use tokio::signal::unix::{SignalKind, signal};

/// The namespace and name of the example server.
const NAMESPACE: &str = "telephony";
const SERVER: &str = "cucm-backup";

/// How long the example server may take to become Ready: locally everything is here;
/// a cluster may first pull the image and provision the volume.
const LOCAL_WAIT: Duration = Duration::from_secs(120);
const CLUSTER_WAIT: Duration = Duration::from_secs(300);

/// Runs the operator and a gateway for the examples in `deploy/examples/` and prints
/// how to connect. Without flags everything runs on this machine, on 127.0.0.1.
#[derive(Debug, Parser)]
#[command(name = "demo")]
struct DemoArgs {
    /// Install into the cluster the current kubeconfig points at (CRDs, a cluster-wide
    /// policy, the `telephony` namespace) and run the operator against it, instead of
    /// starting a local control plane.
    #[arg(long)]
    use_current_cluster: bool,

    /// Container image for gateway pods (the same `sluice` binary), as with
    /// `sluice operator`. Only a real cluster pulls it.
    #[arg(long, env = "SLUICE_GATEWAY_IMAGE", default_value = DEFAULT_GATEWAY_IMAGE)]
    gateway_image: String,

    /// With --use-current-cluster: namespace of the leader Lease `sluice-operator`.
    /// Defaults to that of an existing Lease of that name (an installed operator's),
    /// else `telephony`.
    #[arg(long, value_name = "NAMESPACE")]
    leader_election_namespace: Option<String>,

    /// Where the `ops` key, the FTPS CA certificate and the sftp known_hosts file go.
    /// Defaults to `.demo` in the repository.
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

/// Completes, with the signal's name, at the first SIGINT (Ctrl-C), SIGTERM or SIGHUP.
type Stop = Shared<BoxFuture<'static, &'static str>>;

#[tokio::main]
async fn main() -> Result<()> {
    let args = DemoArgs::parse();
    // From here on none of these signals kills the process: each stops the demo, which
    // then stops what it started and removes its temporary directories.
    let stop = stop_signals()?;
    let work = match &args.work_dir {
        Some(dir) => dir.clone(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".demo"),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;

    match args.use_current_cluster {
        true => run_on_cluster(&args, &work, stop).await,
        false => run_locally(&args, &work, stop).await,
    }
}

fn stop_signals() -> Result<Stop> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let stopped = async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
            _ = hangup.recv() => "SIGHUP",
        };
        say(&format!("demo: stopping ({name})"));
        name
    };
    Ok(stopped.boxed().shared())
}

/// Writes a line to stderr, ignoring failure: after SIGHUP the terminal may be gone, and
/// the demo must still clean up rather than panic.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

async fn run_locally(args: &DemoArgs, work: &Path, stop: Stop) -> Result<()> {
    // Host keys are new on every run and the ports may repeat: forget earlier host keys.
    let known_hosts = work.join("known_hosts");
    if known_hosts.exists() {
        std::fs::remove_file(&known_hosts)?;
    }
    let demo = tokio::select! {
        demo = LocalDemo::start(args, work) => demo?,
        // Dropping the half-started demo stops what it started and removes its
        // temporary directories.
        _ = stop.clone() => return Ok(()),
    };
    demo.print_how_to_connect(work);
    demo.serve(stop).await;
    demo.stop().await
}

/// What a local run starts. Dropped, it stops the gateway first and the control plane
/// last (fields drop in declaration order).
struct LocalDemo {
    pod: RunningPod,
    operator: Operator,
    _kubelet: FakeKubelet,
    control_plane: ControlPlane,
    key: PathBuf,
}

impl LocalDemo {
    async fn start(args: &DemoArgs, work: &Path) -> Result<Self> {
        let examples = example_objects(work)?;
        let needs = ExampleNeeds::of(&examples)?;
        eprintln!("demo: starting a local control plane on 127.0.0.1");
        let control_plane = ControlPlane::start().await?;
        // Logging starts only now: while the API server comes up, the client's readiness
        // polls fail by design and would be printed as errors.
        sluice::cli::init_logging(sluice::cli::LogFormat::Text);
        let client = control_plane.client();
        let region = [(DEFAULT_REGION_LABEL, needs.region.as_str())];
        let node = format!("demo-node-{}", needs.region);
        let kubelet = FakeKubelet::register(client.clone(), &node, &region).await?;
        let operator = Operator::start_with(client.clone(), operator_args(args, None));
        // The example server's StorageClass, as a region-pinned cluster would have it.
        install_storage_classes(&client, &[&needs.storage_class]).await?;
        let key = apply_examples(&client, examples, work).await?;
        // The pod starts with every example user, so the commands printed next work at once.
        let users: Vec<&str> = needs.users.iter().map(String::as_str).collect();
        wait_for_gateway_users(&client, NAMESPACE, SERVER, &users).await?;
        let selector = format!("app.kubernetes.io/instance={SERVER}");
        let pod = kubelet.run_pod(NAMESPACE, &selector).await?;
        wait_ready(&client, LOCAL_WAIT, "").await?;
        Ok(Self {
            pod,
            operator,
            _kubelet: kubelet,
            control_plane,
            key,
        })
    }

    fn print_how_to_connect(&self, work: &Path) {
        let pod = &self.pod;
        println!("\nSluice is running: operator, local control plane and one gateway.");
        println!(
            "Files land in {} (removed when the demo stops)",
            pod.volume_dir("data").display()
        );
        println!("The gateway logs to {}", pod.log_path().display());
        println!("Inspect the resources with:");
        println!(
            "  kubectl --kubeconfig {} get sluice -A",
            self.control_plane.kubeconfig_path().display()
        );
        if let Some(sftp) = pod.ports.get(&2222) {
            print_sftp_commands(sftp.port(), &self.key, &work.join("known_hosts"));
        }
        let ftps = [2121, 2990].map(|p| pod.ports.get(&p).map(|a| a.port()));
        if let [Some(explicit), Some(implicit)] = ftps {
            print_ftps_commands(explicit, implicit, &work.join("ca.pem"));
        }
        println!("The ports are new on every run. Press Ctrl-C to stop.");
    }

    /// Until `stop`, refreshes the mounted Secrets like the kubelet, so users added or
    /// changed while the demo runs reach the gateway (which reloads its configuration by
    /// itself).
    async fn serve(&self, stop: Stop) {
        loop {
            tokio::select! {
                _ = stop.clone() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {
                    if let Err(error) = self.pod.sync_secrets().await {
                        eprintln!("demo: could not refresh the gateway's Secrets: {error:#}");
                    }
                }
            }
        }
    }

    async fn stop(self) -> Result<()> {
        let Self {
            mut pod,
            operator,
            control_plane,
            ..
        } = self;
        pod.stop().await;
        drop(pod);
        let stopped = operator.stop().await;
        drop(control_plane);
        stopped
    }
}

async fn run_on_cluster(args: &DemoArgs, work: &Path, stop: Stop) -> Result<()> {
    let client = tokio::select! {
        client = existing_cluster() => client.context("the current cluster does not answer")?,
        _ = stop.clone() => return Ok(()),
    };
    sluice::cli::init_logging(sluice::cli::LogFormat::Text);
    let examples = example_objects(work)?;
    ExampleNeeds::of(&examples)?.check(&client).await?;
    let lease_namespace = match &args.leader_election_namespace {
        Some(namespace) => namespace.clone(),
        None => lease_namespace(&client).await,
    };
    eprintln!(
        "demo: installing the Sluice CRDs, the DataResidencyPolicy mainland-china and the \
         namespace {NAMESPACE} with the example server; gateway image {}",
        args.gateway_image
    );
    let key = match apply_examples(&client, examples, work).await {
        Ok(key) => key,
        Err(error) => {
            print_what_stays_installed(&lease_namespace);
            return Err(error);
        }
    };

    let operator = Operator::start_with(
        client.clone(),
        operator_args(args, Some(lease_namespace.clone())),
    );
    let hint = format!(
        "; see `kubectl -n {NAMESPACE} describe transferserver {SERVER}` and \
         `kubectl -n {NAMESPACE} get pods,pvc`"
    );
    let ready = tokio::select! {
        ready = wait_ready(&client, CLUSTER_WAIT, &hint) => Some(ready),
        _ = stop.clone() => None,
    };
    if let Some(Ok(())) = ready {
        println!("\nThe gateway is running in your cluster. To connect from this machine:");
        println!("  kubectl -n {NAMESPACE} port-forward svc/{SERVER} 2222:22 &");
        print_sftp_commands(2222, &key, &work.join("known_hosts"));
        println!("Press Ctrl-C to stop.");
        stop.clone().await;
    }
    let stopped = operator.stop().await;
    print_what_stays_installed(&lease_namespace);
    ready.transpose()?;
    stopped
}

/// How long the current cluster may take to answer before the demo says it does not.
const CLUSTER_ANSWER: Duration = Duration::from_secs(15);

async fn existing_cluster() -> Option<Client> {
    let config = tokio::time::timeout(CLUSTER_ANSWER, kube::Config::infer())
        .await
        .ok()?
        .ok()?;
    let url = config.cluster_url.clone();
    let client = Client::try_from(config).ok()?;
    let version = tokio::time::timeout(CLUSTER_ANSWER, client.apiserver_version())
        .await
        .ok()?
        .ok()?;
    eprintln!(
        "demo: using the current cluster at {url} (Kubernetes {}.{})",
        version.major, version.minor
    );
    Some(client)
}

fn operator_args(args: &DemoArgs, lease_namespace: Option<String>) -> OperatorArgs {
    let mut operator = OperatorArgs::local();
    operator.gateway_image = args.gateway_image.clone();
    operator.leader_election = lease_namespace.is_some();
    operator.leader_election_namespace = lease_namespace;
    operator
}

/// Where the demo's operator campaigns for the Lease `sluice-operator`: beside an
/// existing Lease of that name outside the example namespace (an installed operator's),
/// so that only one of the two acts at a time; else in the example namespace, which
/// the demo creates anyway.
async fn lease_namespace(client: &Client) -> String {
    let leases = Api::<Lease>::all(client.clone());
    let params = ListParams::default().fields(&format!("metadata.name={LEASE_NAME}"));
    let found = match leases.list(&params).await {
        Ok(list) => list.items,
        Err(error) => {
            eprintln!(
                "demo: cannot look for an installed operator's Lease ({error}); \
                 campaigning in {NAMESPACE}"
            );
            Vec::new()
        }
    };
    let installed = found
        .iter()
        .find(|lease| lease.namespace().as_deref() != Some(NAMESPACE));
    let Some(lease) = installed else {
        return NAMESPACE.to_string();
    };
    let namespace = lease.namespace().unwrap_or_default();
    let holder = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_else(|| "nobody".into());
    eprintln!(
        "demo: a Sluice operator's Lease {LEASE_NAME} is in namespace {namespace} (held by \
         {holder}): the demo's operator joins that election and acts only while it holds \
         the Lease"
    );
    namespace
}

/// What the example server needs of a cluster.
struct ExampleNeeds {
    /// The StorageClass of its volume.
    storage_class: String,
    /// Its region: some node must carry it as its region label.
    region: String,
    /// The TransferUsers attached to it.
    users: Vec<String>,
}

impl ExampleNeeds {
    fn of(examples: &[DynamicObject]) -> Result<Self> {
        let server = examples
            .iter()
            .find(|o| o.types.as_ref().is_some_and(|t| t.kind == "TransferServer"))
            .context("deploy/examples has no TransferServer")?;
        let spec = &server.data["spec"];
        let text = |value: &serde_json::Value, what: &str| {
            value
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("the example server has no {what}"))
        };
        Ok(Self {
            storage_class: text(
                &spec["storage"]["volume"]["storageClassName"],
                "storageClassName",
            )?,
            region: text(&spec["region"], "region")?,
            users: examples
                .iter()
                .filter(|o| o.types.as_ref().is_some_and(|t| t.kind == "TransferUser"))
                .map(|o| o.name_any())
                .collect(),
        })
    }

    /// Stops, before anything is installed, if the cluster lacks the StorageClass or
    /// (as far as this user may list nodes) a node in the region.
    async fn check(&self, client: &Client) -> Result<()> {
        let Self {
            storage_class,
            region,
            ..
        } = self;
        let label = format!("{DEFAULT_REGION_LABEL}={region}");
        eprintln!(
            "demo: the example server {SERVER} needs the StorageClass {storage_class} and a \
             node labelled {label}"
        );
        let class = Api::<StorageClass>::all(client.clone())
            .get_opt(storage_class)
            .await
            .with_context(|| format!("cannot read StorageClass {storage_class}"))?;
        if class.is_none() {
            bail!(
                "the cluster has no StorageClass {storage_class}, which the example server's \
                 volume uses (deploy/examples/02-server.yaml); nothing was installed. The demo \
                 never creates a StorageClass in a real cluster: create one whose volumes stay \
                 in {region}, or set spec.storage.volume.storageClassName in that file to one \
                 of yours (`kubectl get storageclass`), then run the demo again"
            );
        }
        let nodes = Api::<Node>::all(client.clone())
            .list(&ListParams::default().labels(&label))
            .await;
        match nodes {
            Ok(nodes) if nodes.items.is_empty() => bail!(
                "the cluster has no node labelled {label}, where the example server's gateway \
                 pod must run; nothing was installed. Label a node in {region} (or set \
                 spec.region in deploy/examples/02-server.yaml to your nodes' region, if the \
                 policy mainland-china allows it), then run the demo again"
            ),
            Ok(nodes) => eprintln!("demo: {} node(s) labelled {label}", nodes.items.len()),
            Err(error) => eprintln!("demo: cannot list nodes ({error}); going on"),
        }
        Ok(())
    }
}

/// The objects in `deploy/examples/`, with the `ops` user's key replaced by one kept in
/// `work` (generated on the first run).
fn example_objects(work: &Path) -> Result<Vec<DynamicObject>> {
    let key = work.join("ops_ed25519");
    if !key.exists() {
        generate_key(work, "ops_ed25519")?;
    }
    let public = std::fs::read_to_string(key.with_extension("pub"))?;
    let mut examples =
        read_yaml_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples"))?;
    for object in &mut examples {
        if object.name_any() == "ops" {
            object.data["spec"]["sshPublicKeys"] = serde_json::json!([public.trim()]);
        }
    }
    Ok(examples)
}

/// Applies the CRDs and `examples`, and returns the path of the `ops` user's key. The
/// example server's FTPS certificate is issued here by a throwaway CA written to
/// `work/ca.pem` (in a real cluster cert-manager writes that Secret); an existing Secret
/// is left as it is.
async fn apply_examples(
    client: &Client,
    examples: Vec<DynamicObject>,
    work: &Path,
) -> Result<PathBuf> {
    install_crds(client).await?;
    for object in examples {
        apply(client, &object).await?;
    }
    let secrets = Api::<Secret>::namespaced(client.clone(), NAMESPACE);
    if secrets.get_opt("cucm-backup-tls").await?.is_none() {
        let pki = TestPki::new()?;
        std::fs::write(work.join("ca.pem"), &pki.ca_pem)?;
        let (cert, key) = pki.issue(VALID_UNTIL)?;
        let tls = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "cucm-backup-tls", "namespace": NAMESPACE},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": cert, "tls.key": key},
        });
        apply(client, &serde_json::from_value(tls)?).await?;
    }
    Ok(work.join("ops_ed25519"))
}

/// Waits until the example server is Ready; `hint` ends the timeout's message.
async fn wait_ready(client: &Client, timeout: Duration, hint: &str) -> Result<()> {
    let servers = Api::<TransferServer>::namespaced(client.clone(), NAMESPACE);
    let what = format!("{SERVER} to become Ready{hint}");
    eventually(&what, timeout, || async {
        let server = servers.get(SERVER).await?;
        let ready = server
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .any(|c| c.type_ == "Ready" && c.status == "True");
        Ok(ready.then_some(()))
    })
    .await
}

fn print_what_stays_installed(lease_namespace: &str) {
    say("demo: left installed in the cluster: the Sluice CRDs, the DataResidencyPolicy");
    say(&format!(
        "  mainland-china, the namespace {NAMESPACE} with the example server, and the Lease \
         {LEASE_NAME} in {lease_namespace}. Remove them with:"
    ));
    say(&format!("  kubectl delete namespace {NAMESPACE}"));
    say("  kubectl delete dataresidencypolicy mainland-china");
    say("  kubectl delete -f crds/   # only if no Sluice operator is installed: this deletes");
    say("                            # every TransferServer, TransferUser and policy");
}

/// `path` relative to the current directory when it is inside it, as a user would type it.
fn shown(path: &Path) -> String {
    let relative = std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf));
    relative
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

fn print_sftp_commands(port: u16, key: &Path, known_hosts: &Path) {
    // The demo's own known_hosts file: its host keys would otherwise collide with the
    // user's ~/.ssh/known_hosts entries for a port used before.
    let options = format!(
        "-P {port} -o UserKnownHostsFile={} -o StrictHostKeyChecking=accept-new",
        shown(known_hosts)
    );
    println!("Connect as the password user (password: change-me-1f8e2c, from 03-users.yaml):");
    println!("  sftp {options} cucm@127.0.0.1");
    println!("Connect as the key user:");
    println!("  sftp {options} -i {} ops@127.0.0.1", shown(key));
}

fn print_ftps_commands(explicit: u16, implicit: u16, ca: &Path) {
    let ca = shown(ca);
    println!("FTPS as the password user, explicit (AUTH TLS) and implicit:");
    println!(
        "  curl --ssl-reqd --cacert {ca} -u cucm:change-me-1f8e2c ftp://127.0.0.1:{explicit}/"
    );
    println!("  curl --cacert {ca} -u cucm:change-me-1f8e2c ftps://127.0.0.1:{implicit}/");
    println!(
        "  lftp -e 'set ssl:ca-file {ca}; set ftp:ssl-force yes' -u cucm,change-me-1f8e2c \
         127.0.0.1:{explicit}"
    );
}
