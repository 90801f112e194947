//! Leader election on a real control plane: the Lease's rules on their own, then two
//! `sluice operator` processes of which only the leader writes, a standby that takes over
//! within the lease duration when the leader is killed and finds nothing to write in a
//! converged state, metrics and health over HTTP, and a graceful stop on SIGTERM that
//! releases the Lease; and a leader cut off from the API server that stops acting before a
//! standby can take over.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sluice::operator::lease::{Attempt, LEASE_NAME, LeaseLock, LeaseTiming};
use tokio::process::{Child, Command};

use support::cluster::{
    apply_all, changed_keys, eventually, install_crds, mainland_policy, move_sftp_port,
    policy_governs, settled_state, sftp_server, sftp_server_converged, written_state,
};
use support::controlplane::ControlPlane;
use support::http::{get, sample};
use support::proxy::TcpProxy;

const NS: &str = "ha";
const WAIT: Duration = Duration::from_secs(60);
/// The operator's default lease duration and retry period.
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RETRY_PERIOD: Duration = Duration::from_secs(2);
const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// What a loaded two-core machine adds to a bound: API requests, stopping the
/// controllers, and this test's own polling.
const SLACK: Duration = Duration::from_secs(4);

/// The latest a standby takes over after the leader's last renewal: it starts the lease
/// clock when it first sees that renewal (up to a retry period later), and tries again
/// only every retry period.
const TAKEOVER_BOUND: Duration =
    Duration::from_secs(LEASE_DURATION.as_secs() + 2 * RETRY_PERIOD.as_secs());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_operator_takes_over_from_a_killed_leader_and_writes_nothing_new() -> Result<()> {
    let control_plane = ControlPlane::start().await?;
    let client = control_plane.client();
    install_crds(&client).await?;
    a_lease_goes_to_one_holder_and_to_another_only_when_free(&client).await?;

    let logs = tempfile::tempdir()?;
    let mut leader =
        OperatorProcess::start(control_plane.kubeconfig_path(), "operator-a", logs.path()).await?;
    lease_holder_becomes(&client, "operator-a", WAIT).await?;
    let mut standby =
        OperatorProcess::start(control_plane.kubeconfig_path(), "operator-b", logs.path()).await?;
    apply_all(&client, &mainland_policy()).await?;
    apply_all(&client, &sftp_server(NS, 2)).await?;
    converged(&client).await.with_context(|| leader.log())?;

    the_standby_is_ready_and_idle_while_the_leader_reports_its_work(&leader, &standby).await?;
    let before = settled_state(&client, NS).await?;
    leader.kill()?;
    let killed = Instant::now();
    lease_holder_becomes(&client, "operator-b", WAIT)
        .await
        .with_context(|| standby.log())?;
    let took = killed.elapsed();
    println!("killed: taken over after {took:?}");
    ensure!(
        took <= TAKEOVER_BOUND + SLACK,
        "the standby took {took:?} to take over"
    );
    the_new_leader_reconciles_everything_and_writes_nothing(&client, &standby, &before)
        .await
        .with_context(|| standby.log())?;
    the_new_leader_rolls_out_a_change(&client)
        .await
        .with_context(|| standby.log())?;

    let stopped = standby.terminate().await?;
    ensure!(
        stopped.success(),
        "SIGTERM ended the operator with {stopped}"
    );
    let lease = Api::<Lease>::namespaced(client.clone(), "default")
        .get(LEASE_NAME)
        .await?;
    let holder = lease.spec.and_then(|s| s.holder_identity);
    ensure!(holder.is_none(), "the Lease is still held by {holder:?}");

    a_leader_cut_off_from_the_api_server_stops_before_a_standby_takes_over(
        &control_plane,
        logs.path(),
    )
    .await
}

async fn a_leader_cut_off_from_the_api_server_stops_before_a_standby_takes_over(
    control_plane: &ControlPlane,
    dir: &Path,
) -> Result<()> {
    let client = control_plane.client();
    let apiserver: SocketAddr = control_plane
        .server_url()
        .trim_start_matches("https://")
        .parse()?;
    let proxy = TcpProxy::start(apiserver).await?;
    let through_proxy = dir.join("through-proxy.kubeconfig");
    let kubeconfig = std::fs::read_to_string(control_plane.kubeconfig_path())?;
    let proxied = format!("https://{}", proxy.addr);
    std::fs::write(
        &through_proxy,
        kubeconfig.replace(control_plane.server_url(), &proxied),
    )?;

    let mut leader = OperatorProcess::start(&through_proxy, "operator-c", dir).await?;
    lease_holder_becomes(&client, "operator-c", WAIT).await?;
    let mut standby =
        OperatorProcess::start_from_environment(control_plane.kubeconfig_path(), "operator-d", dir)
            .await?;
    eventually("operator-d standing by", WAIT, || async {
        let (_, exposition) = get(standby.metrics, "/metrics").await?;
        let ready = get(standby.metrics, "/readyz").await?.0 == 200;
        Ok((ready && sample(&exposition, "sluice_leader", "") == Some(0.0)).then_some(()))
    })
    .await?;

    proxy.partition();
    let cut = Instant::now();
    let leases = Api::<Lease>::namespaced(client.clone(), "default");
    let (mut stepped_down, mut taken_over) = (None, None);
    while (stepped_down.is_none() || taken_over.is_none()) && cut.elapsed() < WAIT {
        let (_, exposition) = get(leader.metrics, "/metrics").await?;
        if stepped_down.is_none() && sample(&exposition, "sluice_leader", "") == Some(0.0) {
            stepped_down = Some(cut.elapsed());
        }
        let lease = leases.get(LEASE_NAME).await?;
        let holder = lease.spec.and_then(|s| s.holder_identity);
        if taken_over.is_none() && holder.as_deref() == Some("operator-d") {
            taken_over = Some(cut.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stepped_down = stepped_down.context("the cut-off leader never stepped down")?;
    let taken_over = taken_over.context("the standby never took over")?;
    println!("cut off: stepped down after {stepped_down:?}, taken over after {taken_over:?}");
    ensure!(
        stepped_down < taken_over,
        "the standby took over after {taken_over:?}, before the leader stepped down \
         ({stepped_down:?})"
    );
    // The renew deadline after the last renewal, which was before the cut. The safety
    // property is the ordering above; these bounds only catch a leader or standby that
    // waits for something it should not.
    ensure!(
        stepped_down <= RENEW_DEADLINE + SLACK,
        "stepped down after {stepped_down:?}"
    );
    ensure!(
        taken_over <= TAKEOVER_BOUND + SLACK,
        "taken over after {taken_over:?}"
    );

    // Back in touch, the old leader finds the Lease taken and stands by.
    proxy.heal();
    tokio::time::sleep(RETRY_PERIOD * 3).await;
    let (_, exposition) = get(leader.metrics, "/metrics").await?;
    ensure!(
        sample(&exposition, "sluice_leader", "") == Some(0.0),
        "{exposition}"
    );
    lease_holder_becomes(&client, "operator-d", Duration::from_secs(1)).await?;
    // Ctrl-C stops an operator as SIGTERM does.
    for (operator, signal) in [
        (&mut leader, Signal::SIGTERM),
        (&mut standby, Signal::SIGINT),
    ] {
        let stopped = operator.stop_with(signal).await?;
        ensure!(stopped.success(), "{} ended with {stopped}", operator.name);
    }
    let lease = Api::<Lease>::namespaced(client, "default")
        .get(LEASE_NAME)
        .await?;
    let holder = lease.spec.and_then(|s| s.holder_identity);
    ensure!(holder.is_none(), "Ctrl-C left the Lease held by {holder:?}");
    Ok(())
}

async fn a_lease_goes_to_one_holder_and_to_another_only_when_free(client: &Client) -> Result<()> {
    let timing = LeaseTiming {
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_secs(1),
    };
    let api = Api::<Lease>::namespaced(client.clone(), "default");
    let lock = |identity: &str| LeaseLock::new(api.clone(), "lease-rules", identity, timing);
    let (mut a, mut b, mut c) = (lock("a"), lock("b"), lock("c"));

    ensure!(a.try_acquire_or_renew().await? == Attempt::Leading);
    ensure!(b.try_acquire_or_renew().await? == Attempt::HeldBy("a".into()));
    // A renewal restarts the clock of those who see it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(a.try_acquire_or_renew().await? == Attempt::Leading);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ensure!(
        b.try_acquire_or_renew().await? == Attempt::HeldBy("a".into()),
        "taken 3.5 s after the first sighting, although renewed 1.5 s ago"
    );
    // Unrenewed for the lease duration since b saw it last change: b takes it.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    ensure!(b.try_acquire_or_renew().await? == Attempt::Leading);
    let spec = api.get("lease-rules").await?.spec.context("no spec")?;
    ensure!(spec.holder_identity.as_deref() == Some("b"));
    ensure!(spec.lease_transitions == Some(1), "{spec:?}");
    ensure!(a.try_acquire_or_renew().await? == Attempt::HeldBy("b".into()));

    // Released: free at once, and of two racing for it exactly one wins.
    b.release().await?;
    let (for_a, for_c) = tokio::join!(a.try_acquire_or_renew(), c.try_acquire_or_renew());
    let winners = [for_a?, for_c?]
        .into_iter()
        .filter(|attempt| *attempt == Attempt::Leading)
        .count();
    ensure!(winners == 1, "{winners} instances hold the Lease");
    Ok(())
}

/// Waits until the server and its user are reconciled and the policy counts the server.
async fn converged(client: &Client) -> Result<()> {
    sftp_server_converged(client, NS).await?;
    policy_governs(client, 1).await
}

async fn the_standby_is_ready_and_idle_while_the_leader_reports_its_work(
    leader: &OperatorProcess,
    standby: &OperatorProcess,
) -> Result<()> {
    for path in ["/healthz", "/readyz"] {
        for operator in [leader, standby] {
            let (status, body) = get(operator.metrics, path).await?;
            ensure!(status == 200, "{} {path}: {status} {body}", operator.name);
        }
    }
    let (_, exposition) = get(standby.metrics, "/metrics").await?;
    ensure!(
        sample(&exposition, "sluice_leader", "") == Some(0.0),
        "{exposition}"
    );
    let reconciled = sample(
        &exposition,
        "sluice_reconciles_total",
        r#"controller="server",result="success""#,
    );
    ensure!(reconciled.is_none(), "the standby reconciled: {exposition}");

    let (status, exposition) = get(leader.metrics, "/metrics").await?;
    ensure!(status == 200);
    ensure!(
        sample(&exposition, "sluice_leader", "") == Some(1.0),
        "{exposition}"
    );
    for kind in ["TransferServer", "TransferUser", "DataResidencyPolicy"] {
        let labels = format!(r#"kind="{kind}""#);
        let count = sample(&exposition, "sluice_managed_objects", &labels);
        ensure!(count == Some(1.0), "{kind}: {count:?} in\n{exposition}");
    }
    for controller in ["server", "user", "policy"] {
        let labels = format!(r#"controller="{controller}",result="success""#);
        let count = sample(&exposition, "sluice_reconciles_total", &labels).unwrap_or(0.0);
        ensure!(
            count >= 1.0,
            "{controller} reconciles: {count}\n{exposition}"
        );
        let labels = format!(r#"controller="{controller}""#);
        let timed = sample(
            &exposition,
            "sluice_reconcile_duration_seconds_count",
            &labels,
        );
        ensure!(timed.unwrap_or(0.0) >= 1.0, "{controller}: {timed:?}");
    }
    Ok(())
}

async fn the_new_leader_reconciles_everything_and_writes_nothing(
    client: &Client,
    leader: &OperatorProcess,
    before: &BTreeMap<String, String>,
) -> Result<()> {
    eventually("the new leader's first pass", WAIT, || async {
        let (_, exposition) = get(leader.metrics, "/metrics").await?;
        let all = ["server", "user", "policy"].iter().all(|controller| {
            let labels = format!(r#"controller="{controller}",result="success""#);
            sample(&exposition, "sluice_reconciles_total", &labels).unwrap_or(0.0) >= 1.0
        });
        let ready = get(leader.metrics, "/readyz").await?.0 == 200;
        let leading = sample(&exposition, "sluice_leader", "") == Some(1.0);
        Ok((all && ready && leading).then_some(()))
    })
    .await?;
    // The watches of owned objects trigger more passes shortly after the first.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = written_state(client, NS).await?;
    let changed = changed_keys(before, &after);
    ensure!(changed.is_empty(), "the new leader wrote {changed:?}");
    Ok(())
}

async fn the_new_leader_rolls_out_a_change(client: &Client) -> Result<()> {
    move_sftp_port(client, NS, "files", 2022, WAIT).await
}

async fn lease_holder_becomes(client: &Client, holder: &str, timeout: Duration) -> Result<()> {
    let leases = Api::<Lease>::namespaced(client.clone(), "default");
    eventually(&format!("{holder} holding the Lease"), timeout, || async {
        let lease = leases.get_opt(LEASE_NAME).await?;
        let current = lease.and_then(|l| l.spec?.holder_identity);
        Ok((current.as_deref() == Some(holder)).then_some(()))
    })
    .await
}

/// `sluice operator --leader-election` as a child process, logging JSON to a file.
struct OperatorProcess {
    name: String,
    child: Child,
    log: PathBuf,
    metrics: SocketAddr,
}

impl OperatorProcess {
    /// Starts an operator configured by flags.
    async fn start(kubeconfig: &Path, name: &str, dir: &Path) -> Result<Self> {
        let flags = [
            "--log-format",
            "json",
            "operator",
            "--leader-election",
            "--leader-election-namespace",
            "default",
            "--metrics-listen",
            "127.0.0.1:0",
        ];
        Self::spawn(kubeconfig, name, dir, &flags, &[]).await
    }

    /// Starts an operator configured by the environment a Deployment would set.
    async fn start_from_environment(kubeconfig: &Path, name: &str, dir: &Path) -> Result<Self> {
        let environment = [
            ("SLUICE_LOG_FORMAT", "json"),
            ("SLUICE_LEADER_ELECTION", "true"),
            ("POD_NAMESPACE", "default"),
            ("SLUICE_METRICS_LISTEN", "127.0.0.1:0"),
        ];
        Self::spawn(kubeconfig, name, dir, &["operator"], &environment).await
    }

    async fn spawn(
        kubeconfig: &Path,
        name: &str,
        dir: &Path,
        args: &[&str],
        environment: &[(&str, &str)],
    ) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .env_clear()
            .envs(environment.iter().copied())
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", name)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start sluice operator")?;
        let mut process = Self {
            name: name.to_string(),
            child,
            log,
            metrics: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        process.metrics = eventually("the metrics address in the log", WAIT, || async {
            if let Some(status) = process_exited(&process.log) {
                bail!("{status}");
            }
            Ok(logged_metrics_address(&process.log()))
        })
        .await
        .with_context(|| process.log())?;
        Ok(process)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.child.id().context("the operator has exited")?;
        kill(Pid::from_raw(i32::try_from(pid)?), signal)?;
        Ok(())
    }

    fn kill(&mut self) -> Result<()> {
        self.signal(Signal::SIGKILL)
    }

    /// Sends SIGTERM and waits for the exit, at most 10 s.
    async fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        self.stop_with(Signal::SIGTERM).await
    }

    /// Sends `signal` and waits for the exit, at most 10 s.
    async fn stop_with(&mut self, signal: Signal) -> Result<std::process::ExitStatus> {
        self.signal(signal)?;
        let waited = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        let status =
            waited.with_context(|| format!("no exit 10 s after {signal}:\n{}", self.log()))?;
        Ok(status?)
    }
}

/// The `metrics` field of the `Starting operator` line in a JSON log.
fn logged_metrics_address(log: &str) -> Option<SocketAddr> {
    log.lines().find_map(|line| {
        let entry: serde_json::Value = serde_json::from_str(line).ok()?;
        if entry["message"] != "Starting operator" {
            return None;
        }
        entry["metrics"].as_str()?.parse().ok()
    })
}

/// A line saying the operator failed to start, if it did.
fn process_exited(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .find(|line| line.starts_with("error:"))
        .map(str::to_string)
}
