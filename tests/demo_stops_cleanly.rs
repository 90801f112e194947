//! The demo (`examples/demo.rs`) run as a user runs it: a child process, built by Cargo
//! here, watched through `/proc`.
//!
//! - SIGTERM and SIGHUP stop it as Ctrl-C does: it exits 0 and leaves no process, no
//!   temporary directory (its `TMPDIR` is one of the test's, which must end up empty) and
//!   no listening port behind.
//! - Killed outright (SIGKILL), it cannot clean up, but its children (control plane and
//!   gateway) still die, through the parent-death signal.
//! - `--use-current-cluster`, pointed through `KUBECONFIG` at a local control plane on
//!   127.0.0.1 (never at a default kubeconfig), installs nothing when the example's
//!   StorageClass or region nodes are missing, never creates a StorageClass, runs the
//!   gateway image from `SLUICE_GATEWAY_IMAGE`, and joins an installed operator's leader
//!   election.
//!
//! The demos run one at a time: each starts a control plane, and the machine is small.

mod support;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Mutex, OnceCell, mpsc};
use tokio::time::Instant;

use support::cluster::{apply_all, eventually, install_storage_classes};
use support::controlplane::{ControlPlane, die_with_parent};
use support::kubelet::FakeKubelet;

/// Startup builds nothing (the control plane binaries are cached) but starts a control
/// plane on a busy machine.
const STARTUP: Duration = Duration::from_secs(300);
/// Stopping waits for the operator (up to 30 s) and each control plane process (5 s).
const SHUTDOWN: Duration = Duration::from_secs(90);
const READY_LINE: &str = "Press Ctrl-C to stop.";
const IMAGE: &str = "registry.invalid/sluice:demo-test";
const REGION_LABEL: &str = "topology.kubernetes.io/region";

static ONE_DEMO_AT_A_TIME: Mutex<()> = Mutex::const_new(());
static DEMO_BINARY: OnceCell<PathBuf> = OnceCell::const_new();

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sighup_stop_the_demo_like_ctrl_c_leaving_no_process_directory_or_port()
-> Result<()> {
    let _one = ONE_DEMO_AT_A_TIME.lock().await;
    for signal in [Signal::SIGTERM, Signal::SIGHUP] {
        let mut demo = Demo::start(None, &[]).await?;
        demo.wait_for_stdout(READY_LINE, STARTUP).await?;
        let children = demo.children_running_everything()?;
        let ports = demo.listening_ports(&children)?;
        let left = entries(demo.tmp.path())?;
        ensure!(
            left.iter().any(|e| e.starts_with("sluice-controlplane-"))
                && left.iter().any(|e| e.starts_with("sluice-pod-")),
            "the demo's temporary directories are not in its TMPDIR: {left:?}"
        );

        kill(demo.pid(), signal)?;
        let status = demo.exit_within(SHUTDOWN).await?;
        ensure!(status.success(), "{signal}: {status}\n{}", demo.report());
        let stopping = format!("demo: stopping ({signal})");
        ensure!(demo.stderr().contains(&stopping), "{}", demo.report());
        let alive: Vec<&Proc> = children.iter().filter(|p| p.alive()).collect();
        ensure!(alive.is_empty(), "{signal}: still running: {alive:?}");
        let left = entries(demo.tmp.path())?;
        ensure!(left.is_empty(), "{signal}: left in TMPDIR: {left:?}");
        ports_are_free(&ports)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demo_killed_outright_takes_its_control_plane_and_gateway_with_it() -> Result<()> {
    let _one = ONE_DEMO_AT_A_TIME.lock().await;
    let mut demo = Demo::start(None, &[]).await?;
    demo.wait_for_stdout(READY_LINE, STARTUP).await?;
    let children = demo.children_running_everything()?;
    let ports = demo.listening_ports(&children)?;

    kill(demo.pid(), Signal::SIGKILL)?;
    demo.exit_within(SHUTDOWN).await?;
    let what = "the children of a killed demo to die";
    eventually(what, Duration::from_secs(10), || async {
        Ok(children.iter().all(|p| !p.alive()).then_some(()))
    })
    .await
    .with_context(|| format!("{children:?}"))?;
    ports_are_free(&ports)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_the_demo_checks_first_installs_no_storage_class_and_defers_to_the_lease()
-> Result<()> {
    let _one = ONE_DEMO_AT_A_TIME.lock().await;
    let control_plane = ControlPlane::start().await?;
    let client = control_plane.client();
    let kubeconfig = control_plane.kubeconfig_path();

    let refused = "has no StorageClass cn-shanghai-ssd";
    the_demo_stops_and_installs_nothing(&client, kubeconfig, refused).await?;
    install_storage_classes(&client, &["cn-shanghai-ssd"]).await?;
    let refused = "has no node labelled topology.kubernetes.io/region=cn-shanghai";
    the_demo_stops_and_installs_nothing(&client, kubeconfig, refused).await?;

    let region = [(REGION_LABEL, "cn-shanghai")];
    let kubelet = FakeKubelet::register(client.clone(), "node-sh-1", &region).await?;
    apply_all(&client, &installed_operator_lease()).await?;
    let env = [("SLUICE_GATEWAY_IMAGE", IMAGE)];
    let mut demo = Demo::start(Some(kubeconfig), &env).await?;
    let (pod, printed) = tokio::join!(
        kubelet.run_pod("telephony", "app.kubernetes.io/instance=cucm-backup"),
        demo.wait_for_stdout("The gateway is running in your cluster", STARTUP),
    );
    let _pod = pod.with_context(|| demo.report())?;
    printed?;
    let url = format!(
        "using the current cluster at {}",
        control_plane.server_url()
    );
    ensure!(demo.stderr().contains(&url), "{}", demo.report());

    let statefulset = Api::<StatefulSet>::namespaced(client.clone(), "telephony")
        .get("cucm-backup-gateway")
        .await?;
    let containers = statefulset
        .spec
        .and_then(|s| s.template.spec)
        .map(|s| s.containers)
        .unwrap_or_default();
    let image = containers.first().and_then(|c| c.image.as_deref());
    ensure!(image == Some(IMAGE), "gateway image {image:?}");
    let classes = Api::<StorageClass>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let names: Vec<String> = classes.items.iter().map(|c| c.name_any()).collect();
    ensure!(names == ["cn-shanghai-ssd"], "StorageClasses {names:?}");
    let identity = sluice::operator::instance_identity();
    ensure!(lease_holder(&client, "sluice-system").await? == Some(identity));
    let in_example_namespace = Api::<Lease>::namespaced(client.clone(), "telephony")
        .get_opt("sluice-operator")
        .await?;
    ensure!(
        in_example_namespace.is_none(),
        "a second Lease in telephony"
    );

    kill(demo.pid(), Signal::SIGTERM)?;
    let status = demo.exit_within(SHUTDOWN).await?;
    ensure!(status.success(), "{status}\n{}", demo.report());
    ensure!(
        demo.stderr().contains("kubectl delete namespace telephony"),
        "the demo did not say how to remove what it installed:\n{}",
        demo.report()
    );
    let holder = lease_holder(&client, "sluice-system").await?;
    ensure!(holder.is_none(), "the Lease was not released: {holder:?}");
    Ok(())
}

/// Runs the demo against the control plane and checks it fails with `message` before
/// installing the CRDs or the example namespace.
async fn the_demo_stops_and_installs_nothing(
    client: &Client,
    kubeconfig: &Path,
    message: &str,
) -> Result<()> {
    let mut demo = Demo::start(Some(kubeconfig), &[]).await?;
    let status = demo.exit_within(SHUTDOWN).await?;
    ensure!(!status.success(), "{}", demo.report());
    ensure!(demo.stderr().contains(message), "{}", demo.report());
    let crd = Api::<CustomResourceDefinition>::all(client.clone())
        .get_opt("transferservers.sluice.dev")
        .await?;
    ensure!(crd.is_none(), "the CRDs were installed");
    let namespace = Api::<Namespace>::all(client.clone())
        .get_opt("telephony")
        .await?;
    ensure!(namespace.is_none(), "the example namespace was created");
    Ok(())
}

/// The Lease of an operator installed as `deploy/manifests` installs it, whose holder
/// has stopped renewing: the demo's operator must wait for it to expire, then take it.
fn installed_operator_lease() -> Vec<serde_json::Value> {
    vec![
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "sluice-system"},
        }),
        serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "sluice-operator", "namespace": "sluice-system"},
            "spec": {"holderIdentity": "installed-operator", "leaseDurationSeconds": 15},
        }),
    ]
}

async fn lease_holder(client: &Client, namespace: &str) -> Result<Option<String>> {
    let lease = Api::<Lease>::namespaced(client.clone(), namespace)
        .get("sluice-operator")
        .await?;
    Ok(lease.spec.and_then(|s| s.holder_identity))
}

/// The demo binary, built once by the Cargo running this test.
async fn demo_binary() -> Result<&'static PathBuf> {
    DEMO_BINARY.get_or_try_init(build_demo).await
}

async fn build_demo() -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut cargo = Command::new(env!("CARGO"));
    // Cargo gives a test the variables it gives build scripts (CARGO_MANIFEST_DIR,
    // CARGO_PKG_NAME, ...); some dependencies' build scripts rerun when those change, so
    // passed on they would make this build and the next `cargo test` rebuild each other.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_by_cargo = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_BIN_",
            "CARGO_CRATE_",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix))
            || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR"].contains(&name.as_ref());
        if set_by_cargo {
            cargo.env_remove(name.as_ref());
        }
    }
    let output = cargo
        .args(["build", "--quiet", "--message-format=json"])
        .args(["--bin", "sluice", "--example", "demo", "--manifest-path"])
        .arg(&manifest)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .context("cannot run cargo build")?;
    ensure!(
        output.status.success(),
        "cargo build failed: {}",
        output.status
    );
    for line in String::from_utf8(output.stdout)?.lines() {
        let message: serde_json::Value = serde_json::from_str(line)?;
        let target = &message["target"];
        let is_demo = target["name"] == "demo" && target["kind"] == serde_json::json!(["example"]);
        if let Some(path) = message["executable"].as_str().filter(|_| is_demo) {
            return Ok(PathBuf::from(path));
        }
    }
    bail!("cargo build reported no demo executable")
}

/// The demo running as a child process, with its own `TMPDIR` and work directory.
struct Demo {
    child: Child,
    stdout: mpsc::UnboundedReceiver<String>,
    seen: String,
    /// The demo's `TMPDIR`.
    tmp: TempDir,
    /// Its work directory, its stderr log and, in cluster mode, its `HOME`.
    scratch: TempDir,
}

impl Demo {
    /// Starts the demo, locally or, given a kubeconfig, with `--use-current-cluster`
    /// against that cluster only (no in-cluster variables, `HOME` a scratch directory).
    async fn start(kubeconfig: Option<&Path>, env: &[(&str, &str)]) -> Result<Self> {
        let binary = demo_binary().await?;
        let scratch = tempfile::tempdir()?;
        let tmp = tempfile::tempdir()?;
        let log = std::fs::File::create(scratch.path().join("stderr.log"))?;
        let mut command = Command::new(binary);
        command
            .arg("--work-dir")
            .arg(scratch.path().join("work"))
            .env("TMPDIR", tmp.path())
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env_remove("SLUICE_GATEWAY_IMAGE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        die_with_parent(&mut command);
        if let Some(kubeconfig) = kubeconfig {
            command
                .arg("--use-current-cluster")
                .env("KUBECONFIG", kubeconfig)
                .env("HOME", scratch.path());
        }
        command.envs(env.iter().copied());
        let mut child = command.spawn().context("cannot start the demo")?;
        let output = child.stdout.take().context("no stdout")?;
        let (lines, stdout) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(output).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            stdout,
            seen: String::new(),
            tmp,
            scratch,
        })
    }

    fn pid(&self) -> Pid {
        let pid = self.child.id().and_then(|id| i32::try_from(id).ok());
        Pid::from_raw(pid.unwrap_or_default())
    }

    async fn wait_for_stdout(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let line = match tokio::time::timeout_at(deadline, self.stdout.recv()).await {
                Ok(Some(line)) => line,
                Ok(None) => bail!(
                    "the demo ended before printing {needle:?}\n{}",
                    self.report()
                ),
                Err(_) => bail!("the demo did not print {needle:?}\n{}", self.report()),
            };
            self.seen.push_str(&line);
            self.seen.push('\n');
            if line.contains(needle) {
                return Ok(());
            }
        }
    }

    async fn exit_within(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!(
                "the demo did not exit within {timeout:?}\n{}",
                self.report()
            ),
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.scratch.path().join("stderr.log")).unwrap_or_default()
    }

    fn report(&self) -> String {
        let stderr = self.stderr();
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("stdout:\n{}\nstderr (end):\n{tail}", self.seen)
    }

    /// The demo's descendants, checked to include the control plane and the gateway.
    fn children_running_everything(&self) -> Result<Vec<Proc>> {
        let children = Proc::descendants(self.pid().as_raw())?;
        // /proc truncates names to 15 characters.
        for name in ["etcd", "kube-apiserver", "kube-controller", "sluice"] {
            ensure!(
                children.iter().any(|p| p.name == name),
                "no {name} among the demo's children: {children:?}"
            );
        }
        Ok(children)
    }

    /// The TCP ports the demo and `children` listen on, checked to be on 127.0.0.1.
    fn listening_ports(&self, children: &[Proc]) -> Result<Vec<u16>> {
        let mut pids: Vec<i32> = children.iter().map(|p| p.pid).collect();
        pids.push(self.pid().as_raw());
        let mut inodes = Vec::new();
        for pid in pids {
            for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
                let target = std::fs::read_link(fd?.path()).unwrap_or_default();
                let target = target.to_string_lossy();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                {
                    inodes.push(inode.to_string());
                }
            }
        }
        let mut ports = Vec::new();
        for (table, v4) in [("/proc/net/tcp", true), ("/proc/net/tcp6", false)] {
            for line in std::fs::read_to_string(table)?.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let listening = fields.get(3) == Some(&"0A");
                if !listening || !fields.get(9).is_some_and(|i| inodes.iter().any(|n| n == i)) {
                    continue;
                }
                let address = listening_address(fields[1]).filter(|_| v4);
                match address {
                    Some(address) if *address.ip() == Ipv4Addr::LOCALHOST => {
                        ports.push(address.port())
                    }
                    _ => bail!("the demo listens beyond 127.0.0.1: {line}"),
                }
            }
        }
        ensure!(ports.len() >= 6, "too few listening ports found: {ports:?}");
        Ok(ports)
    }
}

/// `7F000001:1F90`-style addresses of `/proc/net/tcp` (the address in the kernel's byte
/// order, the port in hex).
fn listening_address(field: &str) -> Option<SocketAddrV4> {
    let (ip, port) = field.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddrV4::new(Ipv4Addr::from(ip.to_ne_bytes()), port))
}

fn ports_are_free(ports: &[u16]) -> Result<()> {
    for port in ports {
        TcpListener::bind((Ipv4Addr::LOCALHOST, *port)).with_context(|| {
            let hex = format!(":{port:04X} ");
            let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
            let users: Vec<&str> = tcp.lines().filter(|l| l.contains(&hex)).collect();
            format!("port {port} is still taken: {users:#?}")
        })?;
    }
    Ok(())
}

fn entries(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// A process as `/proc/PID/stat` shows it; its start time tells it from a later process
/// that reuses the pid.
#[derive(Debug)]
struct Proc {
    pid: i32,
    name: String,
    started: u64,
}

impl Proc {
    /// `(name, state, parent, start time)` of `pid`, if it exists.
    fn stat(pid: i32) -> Option<(String, char, i32, u64)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The name is in parentheses and may itself contain them.
        let (head, rest) = stat.rsplit_once(')')?;
        let name = head.split_once('(')?.1.to_string();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let state = fields.first()?.chars().next()?;
        let parent = fields.get(1)?.parse().ok()?;
        // Field 22 of stat(5); `fields` starts at field 3.
        let started = fields.get(19)?.parse().ok()?;
        Some((name, state, parent, started))
    }

    /// The living descendants of `root`: children, their children, and so on.
    fn descendants(root: i32) -> Result<Vec<Proc>> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir("/proc")? {
            let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if let Some((name, state, parent, started)) = Self::stat(pid)
                && state != 'Z'
            {
                all.push((parent, Proc { pid, name, started }));
            }
        }
        let mut found: Vec<Proc> = Vec::new();
        let mut parents = vec![root];
        while let Some(parent) = parents.pop() {
            let (children, rest): (Vec<_>, Vec<_>) =
                all.into_iter().partition(|(p, _)| *p == parent);
            all = rest;
            for (_, child) in children {
                parents.push(child.pid);
                found.push(child);
            }
        }
        Ok(found)
    }

    /// Whether this process still runs. A zombie has exited and closed its sockets, but
    /// only once all its threads have: its main thread can be a zombie while others are
    /// still exiting.
    fn alive(&self) -> bool {
        if !matches!(Self::stat(self.pid), Some((.., started)) if started == self.started) {
            return false;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) else {
            return false;
        };
        tasks.flatten().any(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim().chars().next());
            state.is_some_and(|state| !matches!(state, 'Z' | 'X'))
        })
    }
}
