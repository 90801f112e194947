//! A real, throwaway Kubernetes control plane for integration tests.
//!
//! [`ControlPlane::start`] runs etcd, kube-apiserver and kube-controller-manager as child
//! processes with a fresh PKI and data directory in a new temporary directory, and returns once
//! the API is ready and the controller-manager works (the `default` ServiceAccount and the
//! `kube-root-ca.crt` ConfigMap exist in the `default` namespace). There is no scheduler and no
//! kubelet: objects are stored and the [`CONTROLLERS`] act on them, but no pod ever runs.
//!
//! Contract:
//! - The binaries come from the directory named by `$SLUICE_CONTROLPLANE_BIN`, or else from
//!   `tests/controlplane/build.sh`, which builds them from the Go modules pinned next to it
//!   into a cache outside the repository (10-30 minutes the first time, instant afterwards;
//!   concurrent tests wait for one build).
//! - Everything listens on free ports of 127.0.0.1 only. Each process logs to `<name>.log` in
//!   the temporary directory; an error during startup includes the tail of the relevant log.
//! - The admin identity (group `system:masters`) is available as [`ControlPlane::client`] and
//!   as a kubeconfig file, [`ControlPlane::kubeconfig_path`], for child processes.
//! - Dropping the value stops the processes (SIGTERM, then SIGKILL after a grace period; this
//!   blocks the calling thread for up to a few seconds) and deletes the directory, also when a
//!   test panics. A process also gets SIGKILL when the thread that started it exits, so start
//!   the control plane from the test's runtime and keep it in the test's scope, not a `static`.
//! - `SLUICE_CONTROLPLANE_KEEP=1` keeps the temporary directory (logs, PKI, kubeconfig).
//! - [`ControlPlane::start_with`] takes [`Options`]: an audit policy (events go to
//!   [`ControlPlane::audit_log_path`]) and admission plugins beyond the defaults.

// Each test crate that includes this module uses a different part of it.
#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::future::Future;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use kube::api::{Api, GetParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, getppid};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;
use tokio::process::{Child, Command};

/// Names a directory holding prebuilt `etcd`, `kube-apiserver` and `kube-controller-manager`.
pub const BIN_ENV: &str = "SLUICE_CONTROLPLANE_BIN";
/// When set to `1`, the temporary directory is left behind for inspection.
pub const KEEP_ENV: &str = "SLUICE_CONTROLPLANE_KEEP";

/// The controllers kube-controller-manager runs: those that matter without nodes.
pub const CONTROLLERS: &[&str] = &[
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "endpointslice-controller",
    "disruption-controller",
    // PVCs carry the kubernetes.io/pvc-protection finalizer, which only these remove;
    // without them a deleted claim (and a foreground deletion waiting on it) hangs.
    "persistentvolumeclaim-protection-controller",
    "persistentvolume-protection-controller",
    // Binds claims to volumes, so the bound volume's region can be checked.
    "persistentvolume-binder-controller",
    "pod-garbage-collector-controller",
    // Type-checks ValidatingAdmissionPolicies into their status.
    "validatingadmissionpolicy-status-controller",
];

const BINARIES: [&str; 3] = ["etcd", "kube-apiserver", "kube-controller-manager"];
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const SERVICE_CLUSTER_IP_RANGE: &str = "10.0.0.0/24";
const FRONT_PROXY_CLIENT: &str = "front-proxy-client";

const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(180);
const CONTROLLERS_READY_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_GRACE: Duration = Duration::from_secs(5);
const POLL_INTERVAL: Duration = Duration::from_millis(250);
const LOG_TAIL_LINES: usize = 40;

// Files in the temporary directory.
const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const APISERVER_CERT: &str = "apiserver.crt";
const APISERVER_KEY: &str = "apiserver.key";
const ADMIN_CERT: &str = "admin.crt";
const ADMIN_KEY: &str = "admin.key";
const FRONT_PROXY_CA_CERT: &str = "front-proxy-ca.crt";
const FRONT_PROXY_CA_KEY: &str = "front-proxy-ca.key";
const FRONT_PROXY_CERT: &str = "front-proxy-client.crt";
const FRONT_PROXY_KEY: &str = "front-proxy-client.key";
const SERVICE_ACCOUNT_KEY: &str = "service-account.key";
const SERVICE_ACCOUNT_PUB: &str = "service-account.pub";
const KUBECONFIG: &str = "admin.kubeconfig";
const AUDIT_POLICY: &str = "audit-policy.yaml";
const AUDIT_LOG: &str = "audit.log";
const ETCD_DATA: &str = "etcd-data";
const CONTROLLER_MANAGER_CERTS: &str = "controller-manager-certs";

/// Optional settings of [`ControlPlane::start_with`]; the default is what
/// [`ControlPlane::start`] runs.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// An audit policy (`audit.k8s.io/v1` Policy, YAML). The API server then writes the
    /// events it selects as JSON lines to [`ControlPlane::audit_log_path`].
    pub audit_policy: Option<String>,
    /// Admission plugins to enable besides kube-apiserver's default ones.
    pub admission_plugins: Vec<String>,
}

/// A running etcd, kube-apiserver and kube-controller-manager; see the module documentation.
pub struct ControlPlane {
    // Fields drop in declaration order: the processes stop, dependents first, before the
    // directory holding their data is removed.
    controller_manager: Process,
    apiserver: Process,
    etcd: Process,
    client: kube::Client,
    server_url: String,
    kubeconfig: PathBuf,
    bin: PathBuf,
    ports: Ports,
    files: Files,
    options: Options,
    dir: TempDir,
}

impl ControlPlane {
    /// Builds or finds the binaries, starts the three processes and waits until they work.
    pub async fn start() -> Result<Self> {
        Self::start_with(Options::default()).await
    }

    /// [`ControlPlane::start`] with `options`.
    pub async fn start_with(options: Options) -> Result<Self> {
        let bin = binaries().await?;
        let keep = std::env::var_os(KEEP_ENV).is_some_and(|v| v == "1");
        let dir = tempfile::Builder::new()
            .prefix("sluice-controlplane-")
            .disable_cleanup(keep)
            .tempdir()
            .context("cannot create the control plane's temporary directory")?;
        if keep {
            eprintln!("controlplane: keeping {}", dir.path().display());
        }
        let files = Files::new(dir.path())?;
        let ports = Ports::pick()?;
        let server_url = format!("https://127.0.0.1:{}", ports.apiserver);
        write_pki(&files)?;
        write_kubeconfig(&files, &server_url)?;
        let kubeconfig = files.path(KUBECONFIG);
        let client = admin_client(&kubeconfig).await?;

        if let Some(policy) = &options.audit_policy {
            files.write(AUDIT_POLICY, policy)?;
        }

        let mut etcd = Process::spawn("etcd", &bin, etcd_args(&files, &ports), &files)?;
        let args = apiserver_args(&files, &ports, &options);
        let mut apiserver = Process::spawn("kube-apiserver", &bin, args, &files)?;
        wait_for_apiserver(&client, &mut [&mut etcd, &mut apiserver]).await?;

        let args = controller_manager_args(&files, &ports);
        let mut controller_manager = Process::spawn("kube-controller-manager", &bin, args, &files)?;
        let processes = &mut [&mut etcd, &mut apiserver, &mut controller_manager];
        wait_for_controllers(&client, processes).await?;

        Ok(Self {
            controller_manager,
            apiserver,
            etcd,
            client,
            server_url,
            kubeconfig,
            bin,
            ports,
            files,
            options,
            dir,
        })
    }

    /// A client authenticated as the cluster admin (group `system:masters`).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// A kubeconfig file with the admin credentials, for processes under test.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL, `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The temporary directory holding the logs, PKI, kubeconfig and etcd data.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster CA's certificate (PEM), which signed the API server's serving certificate.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.files.path(CA_CERT)
    }

    /// Where the API server writes audit events (JSON lines) when started with an audit
    /// policy.
    pub fn audit_log_path(&self) -> PathBuf {
        self.files.path(AUDIT_LOG)
    }

    /// Stops kube-apiserver and starts it again on the same port with the same etcd, then waits
    /// until it is ready. Existing clients reconnect on their next request.
    pub async fn restart_apiserver(&mut self) -> Result<()> {
        self.apiserver.stop().await;
        self.start_apiserver().await
    }

    /// Starts kube-apiserver again with the arguments it first had, and waits until it is
    /// ready.
    async fn start_apiserver(&mut self) -> Result<()> {
        let args = apiserver_args(&self.files, &self.ports, &self.options);
        self.apiserver = Process::spawn("kube-apiserver", &self.bin, args, &self.files)?;
        let processes = &mut [
            &mut self.etcd,
            &mut self.controller_manager,
            &mut self.apiserver,
        ];
        wait_for_apiserver(&self.client, processes).await
    }

    /// Like [`ControlPlane::restart_apiserver`], and while kube-apiserver is down, compacts
    /// etcd's history up to its current revision, so every watch resumed afterwards from an
    /// older resourceVersion is answered with 410 Gone and its client must list again.
    pub async fn restart_apiserver_expiring_watches(&mut self) -> Result<()> {
        self.apiserver.stop().await;
        self.compact_etcd().await?;
        self.start_apiserver().await
    }

    /// Compacts etcd at its current revision through its JSON gateway.
    async fn compact_etcd(&self) -> Result<()> {
        let etcd = std::net::SocketAddr::from(([127, 0, 0, 1], self.ports.etcd_client));
        // A range over no key still answers with the store's current revision.
        let (_, status) = super::http::post_json(
            etcd,
            "/v3/kv/range",
            &serde_json::json!({"key": "AA==", "limit": 1}),
        )
        .await?;
        let status: serde_json::Value = serde_json::from_str(&status)?;
        let revision = status["header"]["revision"]
            .as_str()
            .context("etcd answered without a revision")?
            .to_string();
        let body = serde_json::json!({"revision": revision, "physical": true});
        let (code, answer) = super::http::post_json(etcd, "/v3/kv/compaction", &body).await?;
        anyhow::ensure!(code == 200, "etcd refused to compact: {code} {answer}");
        Ok(())
    }
}

/// Finds the binaries: `$SLUICE_CONTROLPLANE_BIN`, or else the directory build.sh prints.
async fn binaries() -> Result<PathBuf> {
    let (dir, source) = match std::env::var_os(BIN_ENV) {
        Some(dir) => (PathBuf::from(dir), format!("${BIN_ENV}")),
        None => (run_build_script().await?, "build.sh".to_string()),
    };
    for name in BINARIES {
        let path = dir.join(name);
        if !path.is_file() {
            bail!(
                "{} does not exist (the directory came from {source})",
                path.display()
            );
        }
    }
    Ok(dir)
}

/// Runs build.sh, letting its progress through to stderr, and returns the directory it prints.
async fn run_build_script() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/controlplane/build.sh");
    let child = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {}", script.display()))?;
    let output = child
        .wait_with_output()
        .await
        .context("cannot wait for build.sh")?;
    if !output.status.success() {
        bail!(
            "{} failed ({}); its messages are on stderr; set {BIN_ENV} to use prebuilt binaries",
            script.display(),
            output.status
        );
    }
    let stdout = String::from_utf8(output.stdout).context("build.sh printed a non-UTF-8 path")?;
    match stdout.trim() {
        "" => bail!("{} printed no directory", script.display()),
        dir => Ok(PathBuf::from(dir)),
    }
}

/// The free ports the processes listen on, all on 127.0.0.1.
struct Ports {
    etcd_client: u16,
    etcd_peer: u16,
    apiserver: u16,
    controller_manager: u16,
}

impl Ports {
    fn pick() -> Result<Self> {
        // Hold every listener until all ports are chosen, so that no two are the same.
        let listeners = (0..4)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<io::Result<Vec<_>>>()
            .context("cannot find free ports on 127.0.0.1")?;
        let port = |i: usize| -> Result<u16> { Ok(listeners[i].local_addr()?.port()) };
        Ok(Self {
            etcd_client: port(0)?,
            etcd_peer: port(1)?,
            apiserver: port(2)?,
            controller_manager: port(3)?,
        })
    }
}

/// Paths in the temporary directory, as strings for command-line flags.
struct Files {
    root: PathBuf,
}

impl Files {
    fn new(root: &Path) -> Result<Self> {
        root.to_str()
            .with_context(|| format!("{} is not UTF-8", root.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The path as a flag value; infallible because the root was checked to be UTF-8.
    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn log(&self, process: &str) -> PathBuf {
        self.path(&format!("{process}.log"))
    }

    fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> Result<()> {
        let path = self.path(name);
        fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))
    }
}

/// Writes a throwaway PKI: the cluster CA with the apiserver's serving and the admin's client
/// certificate, the front-proxy CA with the apiserver's client certificate for aggregated APIs,
/// and the service-account signing key.
fn write_pki(files: &Files) -> Result<()> {
    let ca = write_ca(files, "sluice-test-ca", CA_CERT, CA_KEY)?;
    let mut serving = CertificateParams::new(vec![
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "kubernetes.default.svc.cluster.local".to_string(),
    ])?;
    serving.distinguished_name = name("kube-apiserver", None);
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    issue(files, &ca, serving, APISERVER_CERT, APISERVER_KEY)?;

    let mut admin = CertificateParams::default();
    admin.distinguished_name = name("sluice-test-admin", Some("system:masters"));
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue(files, &ca, admin, ADMIN_CERT, ADMIN_KEY)?;

    let front_proxy_ca = write_ca(
        files,
        "sluice-test-front-proxy-ca",
        FRONT_PROXY_CA_CERT,
        FRONT_PROXY_CA_KEY,
    )?;
    let mut front_proxy = CertificateParams::default();
    front_proxy.distinguished_name = name(FRONT_PROXY_CLIENT, None);
    front_proxy.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue(
        files,
        &front_proxy_ca,
        front_proxy,
        FRONT_PROXY_CERT,
        FRONT_PROXY_KEY,
    )?;

    let service_account = KeyPair::generate()?;
    files.write(SERVICE_ACCOUNT_KEY, service_account.serialize_pem())?;
    files.write(SERVICE_ACCOUNT_PUB, service_account.public_key_pem())
}

/// Creates a self-signed CA for a new key and writes both.
fn write_ca(
    files: &Files,
    common_name: &str,
    cert_file: &str,
    key_file: &str,
) -> Result<Issuer<'static, KeyPair>> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name, None);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    files.write(cert_file, params.self_signed(&key)?.pem())?;
    files.write(key_file, key.serialize_pem())?;
    Ok(Issuer::new(params, key))
}

/// Signs a leaf certificate for a new key and writes both.
fn issue(
    files: &Files,
    ca: &Issuer<'_, KeyPair>,
    mut params: CertificateParams,
    cert_file: &str,
    key_file: &str,
) -> Result<()> {
    let key = KeyPair::generate()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    files.write(cert_file, params.signed_by(&key, ca)?.pem())?;
    files.write(key_file, key.serialize_pem())
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    if let Some(organization) = organization {
        name.push(DnType::OrganizationName, organization);
    }
    name
}

/// Writes the admin kubeconfig, referring to the PKI files by path.
fn write_kubeconfig(files: &Files, server_url: &str) -> Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "sluice-test",
            "cluster": { "server": server_url, "certificate-authority": files.arg(CA_CERT) },
        }],
        "users": [{
            "name": "sluice-test-admin",
            "user": {
                "client-certificate": files.arg(ADMIN_CERT),
                "client-key": files.arg(ADMIN_KEY),
            },
        }],
        "contexts": [{
            "name": "sluice-test",
            "context": { "cluster": "sluice-test", "user": "sluice-test-admin" },
        }],
        "current-context": "sluice-test",
    });
    files.write(KUBECONFIG, serde_yaml::to_string(&config)?)
}

/// A client built from the kubeconfig file, so that the file is known to work too.
async fn admin_client(kubeconfig: &Path) -> Result<kube::Client> {
    let parsed = Kubeconfig::read_from(kubeconfig).context("cannot read the admin kubeconfig")?;
    let config = kube::Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default())
        .await
        .context("cannot load the admin kubeconfig")?;
    kube::Client::try_from(config).context("cannot build the admin client")
}

fn etcd_args(files: &Files, ports: &Ports) -> Vec<String> {
    let client_url = format!("http://127.0.0.1:{}", ports.etcd_client);
    let peer_url = format!("http://127.0.0.1:{}", ports.etcd_peer);
    vec![
        "--name=sluice-test".to_string(),
        format!("--data-dir={}", files.arg(ETCD_DATA)),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=sluice-test={peer_url}"),
        // The data is thrown away; skipping fsync keeps tests fast on slow disks.
        "--unsafe-no-fsync=true".to_string(),
    ]
}

fn apiserver_args(files: &Files, ports: &Ports, options: &Options) -> Vec<String> {
    let mut args = vec![
        format!("--etcd-servers=http://127.0.0.1:{}", ports.etcd_client),
        "--bind-address=127.0.0.1".to_string(),
        "--advertise-address=127.0.0.1".to_string(),
        // The endpoint reconcilers refuse a loopback address, so the `kubernetes` Service in
        // the `default` namespace has no endpoints; nothing runs in-cluster to need them.
        "--endpoint-reconciler-type=none".to_string(),
        format!("--secure-port={}", ports.apiserver),
        format!("--tls-cert-file={}", files.arg(APISERVER_CERT)),
        format!("--tls-private-key-file={}", files.arg(APISERVER_KEY)),
        format!("--client-ca-file={}", files.arg(CA_CERT)),
        "--authorization-mode=RBAC".to_string(),
        format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
        format!(
            "--service-account-key-file={}",
            files.arg(SERVICE_ACCOUNT_PUB)
        ),
        format!(
            "--service-account-signing-key-file={}",
            files.arg(SERVICE_ACCOUNT_KEY)
        ),
        format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
        // The aggregation layer, as kubeadm sets it up.
        format!(
            "--requestheader-client-ca-file={}",
            files.arg(FRONT_PROXY_CA_CERT)
        ),
        format!("--requestheader-allowed-names={FRONT_PROXY_CLIENT}"),
        "--requestheader-username-headers=X-Remote-User".to_string(),
        "--requestheader-group-headers=X-Remote-Group".to_string(),
        "--requestheader-extra-headers-prefix=X-Remote-Extra-".to_string(),
        format!("--proxy-client-cert-file={}", files.arg(FRONT_PROXY_CERT)),
        format!("--proxy-client-key-file={}", files.arg(FRONT_PROXY_KEY)),
        "--allow-privileged=true".to_string(),
        "--profiling=false".to_string(),
    ];
    if options.audit_policy.is_some() {
        args.extend([
            format!("--audit-policy-file={}", files.arg(AUDIT_POLICY)),
            format!("--audit-log-path={}", files.arg(AUDIT_LOG)),
            "--audit-log-format=json".to_string(),
            // Every event is written before the request completes, so a test reading the
            // log after its last request sees all of them.
            "--audit-log-mode=blocking".to_string(),
        ]);
    }
    if !options.admission_plugins.is_empty() {
        let plugins = options.admission_plugins.join(",");
        args.push(format!("--enable-admission-plugins={plugins}"));
    }
    args
}

fn controller_manager_args(files: &Files, ports: &Ports) -> Vec<String> {
    let kubeconfig = files.arg(KUBECONFIG);
    vec![
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        "--bind-address=127.0.0.1".to_string(),
        format!("--secure-port={}", ports.controller_manager),
        format!("--cert-dir={}", files.arg(CONTROLLER_MANAGER_CERTS)),
        "--leader-elect=false".to_string(),
        format!("--controllers={}", CONTROLLERS.join(",")),
        format!(
            "--service-account-private-key-file={}",
            files.arg(SERVICE_ACCOUNT_KEY)
        ),
        format!("--root-ca-file={}", files.arg(CA_CERT)),
        format!("--cluster-signing-cert-file={}", files.arg(CA_CERT)),
        format!("--cluster-signing-key-file={}", files.arg(CA_KEY)),
        "--profiling=false".to_string(),
    ]
}

/// Waits until `/readyz` answers `ok`; the last of `processes` is kube-apiserver.
async fn wait_for_apiserver(client: &kube::Client, processes: &mut [&mut Process]) -> Result<()> {
    let what = "/readyz answer ok";
    wait_for(what, APISERVER_READY_TIMEOUT, processes, move || {
        apiserver_ready(client)
    })
    .await
}

/// Waits until the controllers have acted; the last of `processes` is the controller-manager.
async fn wait_for_controllers(client: &kube::Client, processes: &mut [&mut Process]) -> Result<()> {
    let what = "the default ServiceAccount and kube-root-ca.crt ConfigMap";
    wait_for(what, CONTROLLERS_READY_TIMEOUT, processes, move || {
        controllers_ready(client)
    })
    .await
}

/// Whether `/readyz` answers `ok`; an error while the server is still starting.
async fn apiserver_ready(client: &kube::Client) -> Result<bool> {
    // A GET of the root path's child "readyz", i.e. `/readyz`.
    let request = kube::core::Request::new("").get("readyz", &GetParams::default())?;
    Ok(client.request_text(request).await?.trim() == "ok")
}

/// Whether the controller-manager has created what it creates first in every namespace.
async fn controllers_ready(client: &kube::Client) -> Result<bool> {
    let service_accounts = Api::<ServiceAccount>::namespaced(client.clone(), "default");
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), "default");
    Ok(service_accounts.get_opt("default").await?.is_some()
        && config_maps.get_opt("kube-root-ca.crt").await?.is_some())
}

/// Polls `ready` until it returns true. Fails as soon as one of `processes` exits, or after
/// `timeout` with the log of the last process, the one being waited for.
async fn wait_for<F, Fut>(
    what: &str,
    timeout: Duration,
    processes: &mut [&mut Process],
    mut ready: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        for process in processes.iter_mut() {
            process.ensure_running()?;
        }
        let last_error = match ready().await {
            Ok(true) => return Ok(()),
            Ok(false) => String::new(),
            Err(error) => format!(" (last error: {error:#})"),
        };
        if Instant::now() >= deadline {
            let waited_for = processes.last().context("wait_for needs a process")?;
            let failure = format!("did not make {what} within {timeout:?}{last_error}");
            return Err(waited_for.failure(&failure));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A child process whose output goes to a log file; stopped when dropped.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `bin/name` with `args`, appending its stdout and stderr to `<name>.log`.
    fn spawn(name: &'static str, bin: &Path, args: Vec<String>, files: &Files) -> Result<Self> {
        let log = files.log(name);
        let stdout = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let stderr = stdout.try_clone()?;
        let program = bin.join(name);
        let mut command = Command::new(&program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true);
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(Self { name, child, log })
    }

    /// Fails, with the tail of the log, if the process has exited.
    fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.failure(&format!("exited ({status})"))),
            Err(error) => Err(error).with_context(|| format!("cannot check on {}", self.name)),
        }
    }

    fn failure(&self, what: &str) -> anyhow::Error {
        let log = self.log.display();
        anyhow!(
            "{} {what}; the end of {log}:\n{}",
            self.name,
            log_tail(&self.log)
        )
    }

    /// Sends SIGTERM and waits for the process to exit, sending SIGKILL after a grace period.
    async fn stop(&mut self) {
        if self.terminate()
            && tokio::time::timeout(STOP_GRACE, self.child.wait())
                .await
                .is_err()
        {
            let _ = self.child.kill().await;
        }
    }

    /// [`Process::stop`] for synchronous contexts such as `Drop`: blocks the thread.
    fn stop_blocking(&mut self) {
        if self.terminate() && !self.exits_within(STOP_GRACE) {
            let _ = self.child.start_kill();
            self.exits_within(STOP_GRACE);
        }
    }

    /// Sends SIGTERM; false if the process has exited already.
    fn terminate(&mut self) -> bool {
        let running = matches!(self.child.try_wait(), Ok(None));
        let pid = self.child.id().and_then(|pid| i32::try_from(pid).ok());
        match pid {
            Some(pid) if running => kill(Pid::from_raw(pid), Signal::SIGTERM).is_ok(),
            _ => false,
        }
    }

    fn exits_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop_blocking();
    }
}

/// Makes the process `command` starts get SIGKILL from the kernel when its parent goes,
/// however the parent goes.
///
/// Why the parent-death signal (`prctl(PR_SET_PDEATHSIG)`, Linux only) rather than only
/// `kill_on_drop` or `Drop`: those run in the parent, so a parent killed with SIGKILL, or
/// one that aborts, never runs them, and its children would live on as orphans holding
/// their ports and files. The kernel sends the parent-death signal whatever ends the
/// parent. Two caveats: the signal comes when the *thread* that spawned the child exits,
/// so spawn from a thread that lives as long as the child is wanted (a test's or a
/// program's main thread, or a runtime worker; not a short-lived blocking-pool thread);
/// and a parent that dies between `fork` and the `prctl` is caught by comparing
/// `getppid` with the parent's pid, in which case the child does not start.
pub fn die_with_parent(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure only makes the prctl(2) and getppid(2) system calls, which are
    // async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            set_pdeathsig(Signal::SIGKILL)?;
            match u32::try_from(getppid().as_raw()) == Ok(parent) {
                true => Ok(()),
                // "No such process": the parent is gone already.
                false => Err(nix::errno::Errno::ESRCH.into()),
            }
        });
    }
}

/// The last lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let text = match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(error) => return format!("(cannot read it: {error})"),
    };
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}
