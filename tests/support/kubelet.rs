//! A stand-in for the kubelet, so end-to-end tests run the real gateway process from the
//! StatefulSet the operator rendered.
//!
//! The local control plane has no scheduler and no kubelet. [`FakeKubelet`] does their
//! part for one pod: it registers a Node with the labels a test chooses, binds the pod to
//! it only if the pod's required node affinity admits the node, materialises the pod's
//! Secret, PVC and emptyDir volumes into a temporary directory, starts the container's
//! exact command, args and environment (with `metadata.name` from the downward API),
//! and, once the container's HTTP readiness probe answers 200, reports the pod Running
//! and Ready so the StatefulSet controller counts it available. An optional Secret
//! volume whose Secret is missing stays empty until [`RunningPod::sync_secrets`] finds
//! it, as with the kubelet.
//!
//! What is remapped, and nothing else: mount paths become directories under the
//! temporary directory, `0.0.0.0:<containerPort>` in the command line or environment
//! becomes `127.0.0.1:<free port>` (ports the command line does not name, such as
//! passive FTP ports the gateway binds by number from its configuration, keep their
//! numbers), and the command `sluice` resolves to the binary Cargo built for this test
//! run.
//!
//! The process is killed (SIGKILL, as on a node failure) when the [`RunningPod`] is
//! dropped, which returns once it has exited and then removes the temporary directory;
//! and the kernel kills it when the process that runs this kubelet dies, however it dies
//! (see [`super::controlplane::die_with_parent`]).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, Pod, PodSpec, Secret};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tempfile::TempDir;
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(90);

/// A registered Node that runs pods as local processes.
pub struct FakeKubelet {
    client: Client,
    node: String,
    labels: BTreeMap<String, String>,
}

impl FakeKubelet {
    /// Registers a Node named `node` with `labels`.
    pub async fn register(client: Client, node: &str, labels: &[(&str, &str)]) -> Result<Self> {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let object: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node, "labels": labels},
        }))?;
        Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &object)
            .await
            .context("cannot register the fake Node")?;
        Ok(Self {
            client,
            node: node.to_string(),
            labels,
        })
    }

    /// Waits for a pod matching `selector` in `namespace`, schedules it here if its node
    /// affinity allows, and runs its first container.
    pub async fn run_pod(&self, namespace: &str, selector: &str) -> Result<RunningPod> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), namespace);
        let pod = wait_for_pod(&pods, selector).await?;
        let spec = pod.spec.clone().context("pod without spec")?;
        if !affinity_admits(&spec, &self.labels) {
            bail!(
                "pod {} has a node affinity that does not admit node {}",
                pod.name_any(),
                self.node
            );
        }
        self.bind(&pods, &pod.name_any()).await?;
        let root = tempfile::Builder::new().prefix("sluice-pod-").tempdir()?;
        let mut running = RunningPod {
            name: pod.name_any(),
            namespace: namespace.to_string(),
            client: self.client.clone(),
            spec,
            ports: BTreeMap::new(),
            child: None,
            root,
        };
        running.materialise_volumes().await?;
        running.start().await?;
        running.wait_ready().await?;
        running.report_ready().await?;
        Ok(running)
    }

    async fn bind(&self, pods: &Api<Pod>, pod: &str) -> Result<()> {
        let binding = json!({
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": pod},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
        });
        pods.create_subresource::<_, serde_json::Value>(
            "binding",
            pod,
            &PostParams::default(),
            &binding,
        )
        .await
        .context("cannot bind the pod to the fake Node")?;
        Ok(())
    }
}

async fn wait_for_pod(pods: &Api<Pod>, selector: &str) -> Result<Pod> {
    let deadline = Instant::now() + WAIT;
    loop {
        let list = pods.list(&ListParams::default().labels(selector)).await?;
        let pending = list.items.into_iter().find(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.spec.as_ref().is_some_and(|s| s.node_name.is_none())
        });
        if let Some(pod) = pending {
            return Ok(pod);
        }
        if Instant::now() > deadline {
            bail!("no unscheduled pod matching {selector} appeared within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Whether the pod's required node affinity (`In`/`NotIn`/`Exists`/`DoesNotExist`
/// expressions, terms ORed) admits a node with `labels`.
pub fn affinity_admits(spec: &PodSpec, labels: &BTreeMap<String, String>) -> bool {
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    let Some(required) = required else {
        return true;
    };
    required.node_selector_terms.iter().any(|term| {
        term.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
    })
}

/// A pod whose first container runs as a local process.
pub struct RunningPod {
    /// Pod name.
    pub name: String,
    namespace: String,
    client: Client,
    spec: PodSpec,
    /// Container port -> local address it was remapped to.
    pub ports: BTreeMap<i32, SocketAddr>,
    child: Option<Child>,
    root: TempDir,
}

impl RunningPod {
    /// The local directory standing in for volume `volume`.
    pub fn volume_dir(&self, volume: &str) -> PathBuf {
        self.root.path().join("volumes").join(volume)
    }

    /// Where the container's log (stdout and stderr) is written.
    pub fn log_path(&self) -> PathBuf {
        self.root.path().join("container.log")
    }

    /// The container's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Rewrites Secret volumes from the current Secrets, as the kubelet does when a
    /// mounted Secret changes.
    pub async fn sync_secrets(&self) -> Result<()> {
        self.materialise_volumes().await
    }

    /// Stops the process and starts it again with the same command line.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        self.start().await
    }

    /// Stops the process (SIGKILL, as a node failure would).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    async fn materialise_volumes(&self) -> Result<()> {
        let secrets = Api::<Secret>::namespaced(self.client.clone(), &self.namespace);
        for volume in self.spec.volumes.iter().flatten() {
            let dir = self.volume_dir(&volume.name);
            std::fs::create_dir_all(&dir)?;
            let Some(source) = &volume.secret else {
                continue;
            };
            let name = source
                .secret_name
                .as_deref()
                .context("secret volume without a name")?;
            let secret = match secrets.get_opt(name).await? {
                Some(secret) => secret,
                None if source.optional == Some(true) => continue,
                None => bail!("Secret {name} of volume {} does not exist", volume.name),
            };
            let data = secret.data.unwrap_or_default();
            let default_mode = source.default_mode.unwrap_or(0o644);
            let files: Vec<(String, String, i32)> = match &source.items {
                Some(items) => items
                    .iter()
                    .map(|i| {
                        (
                            i.key.clone(),
                            i.path.clone(),
                            i.mode.unwrap_or(default_mode),
                        )
                    })
                    .collect(),
                None => data
                    .keys()
                    .map(|k| (k.clone(), k.clone(), default_mode))
                    .collect(),
            };
            for (key, path, mode) in files {
                let value = data
                    .get(&key)
                    .with_context(|| format!("Secret {name} lacks {key}"))?;
                write_atomically(&dir.join(&path), &value.0, mode as u32)?;
            }
        }
        Ok(())
    }

    async fn start(&mut self) -> Result<()> {
        let container = self
            .spec
            .containers
            .first()
            .context("pod without containers")?
            .clone();
        let mut remap: Vec<(String, String)> = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let local = self.volume_dir(&mount.name);
            remap.push((mount.mount_path.clone(), local.display().to_string()));
        }
        let mut words: Vec<String> = container.command.clone().unwrap_or_default();
        words.extend(container.args.clone().unwrap_or_default());
        let values = container
            .env
            .iter()
            .flatten()
            .filter_map(|v| v.value.clone());
        let named: Vec<String> = words.iter().cloned().chain(values).collect();
        for port in container.ports.iter().flatten() {
            let wildcard = format!("0.0.0.0:{}", port.container_port);
            if !named.iter().any(|w| w.contains(&wildcard)) {
                continue;
            }
            let local = match self.ports.get(&port.container_port) {
                Some(addr) => *addr,
                None => free_local_address()?,
            };
            self.ports.insert(port.container_port, local);
            remap.push((
                format!("0.0.0.0:{}", port.container_port),
                local.to_string(),
            ));
        }
        let apply = |text: &str| remap_once(text, &remap);

        let words: Vec<String> = words.iter().map(|w| apply(w)).collect();
        let program = resolve_command(words.first().context("container without a command")?)?;

        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut command = Command::new(program);
        command
            .args(&words[1..])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        // Also when whoever runs this kubelet is killed outright (SIGKILL): no orphaned
        // gateway keeps listening.
        super::controlplane::die_with_parent(&mut command);
        for var in container.env.iter().flatten() {
            let from_field = var
                .value_from
                .as_ref()
                .and_then(|source| source.field_ref.as_ref())
                .map(|field| field.field_path.as_str());
            let value = match from_field {
                Some("metadata.name") => self.name.clone(),
                Some("metadata.namespace") => self.namespace.clone(),
                Some(other) => bail!("the fake kubelet cannot provide field {other}"),
                None => apply(var.value.as_deref().unwrap_or_default()),
            };
            command.env(&var.name, value);
        }
        self.child = Some(
            command
                .spawn()
                .context("cannot start the container's command")?,
        );
        let addrs: Vec<SocketAddr> = self.ports.values().copied().collect();
        for addr in addrs {
            self.wait_listening(addr).await?;
        }
        Ok(())
    }

    async fn wait_listening(&mut self, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "container exited with {status} before listening:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!("container did not listen on {addr}:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Waits until the container's HTTP readiness probe, if it has one, answers 200, as
    /// the kubelet does before it reports the pod Ready.
    async fn wait_ready(&self) -> Result<()> {
        let container = &self.spec.containers[0];
        let Some(get) = container
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
        else {
            return Ok(());
        };
        let port = match &get.port {
            IntOrString::Int(port) => *port,
            IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port)
                .with_context(|| format!("the probe names port {name}, which is not declared"))?,
        };
        let addr = *self
            .ports
            .get(&port)
            .with_context(|| format!("the probed port {port} is not on the command line"))?;
        let path = get.path.clone().unwrap_or_else(|| "/".into());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = super::http::get(addr, &path).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the readiness probe {path} on {addr} never answered 200:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn report_ready(&self) -> Result<()> {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let condition =
            |type_: &str| json!({"type": type_, "status": "True", "lastTransitionTime": now});
        let container = &self.spec.containers[0];
        let status = json!({
            "status": {
                "phase": "Running",
                "hostIP": "127.0.0.1",
                "podIP": "127.0.0.1",
                "startTime": now,
                "conditions": [
                    condition("PodScheduled"), condition("Initialized"),
                    condition("ContainersReady"), condition("Ready"),
                ],
                "containerStatuses": [{
                    "name": container.name,
                    "image": container.image,
                    "imageID": "",
                    "ready": true,
                    "started": true,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now}},
                }],
            }
        });
        Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .context("cannot report the pod Ready")?;
        Ok(())
    }
}

impl Drop for RunningPod {
    /// Kills the process and waits (up to a few seconds, blocking the thread) until it
    /// has exited, so its ports are free and nothing writes into the temporary directory
    /// while it is removed.
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let _ = child.start_kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The program behind a container command: `sluice` is the binary Cargo built (for
/// tests Cargo names it; for examples it sits one directory above the example).
fn resolve_command(command: &str) -> Result<PathBuf> {
    if command != "sluice" {
        bail!("the fake kubelet cannot run image command {command:?}");
    }
    if let Some(path) = option_env!("CARGO_BIN_EXE_sluice") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(Path::parent)
        .context("no target directory")?
        .join("sluice");
    if !path.exists() {
        bail!(
            "{} does not exist: build it with `cargo build --bin sluice`",
            path.display()
        );
    }
    Ok(path)
}

/// Replaces every occurrence of each `from` with its `to` in one pass, longest `from`
/// first, so a replacement is never itself rewritten (a mount at `/tmp` must not touch a
/// temporary directory that replaced another mount path).
fn remap_once(text: &str, remap: &[(String, String)]) -> String {
    let mut order: Vec<usize> = (0..remap.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(remap[i].0.len()));
    let mut out = String::new();
    let mut rest = text;
    'outer: while !rest.is_empty() {
        for &i in &order {
            let (from, to) = &remap[i];
            if rest.starts_with(from.as_str()) {
                out.push_str(to);
                rest = &rest[from.len()..];
                continue 'outer;
            }
        }
        let next = rest.chars().next().map_or(1, char::len_utf8);
        out.push_str(&rest[..next]);
        rest = &rest[next..];
    }
    out
}

fn free_local_address() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Writes a file the way the kubelet updates Secret volumes: never half-written.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("sluice-tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
