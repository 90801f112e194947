//! The operator: one controller per kind, sharing one [`Context`].
//!
//! Each controller runs the same pipeline: dereference (read what the object points
//! at), validate (decide what is usable, including the residency verdict), build (pure:
//! desired objects), apply (server-side apply under the field manager [`FIELD_MANAGER`])
//! and status. Permanent spec problems become conditions and wait for a change;
//! failed API calls are retried with backoff.
//!
//! Around the controllers ([`run_with`]): an HTTP listener for metrics and health
//! ([`metrics`]), leader election on a Lease when asked for ([`lease`]: only the leader
//! runs the controllers, so only the leader writes), the namespaces to watch, and a
//! bounded graceful shutdown that releases the Lease.

mod backoff;
mod error;
mod events;
pub mod lease;
pub mod metrics;
pub mod policy;
mod reconciler;
pub mod server;
pub mod user;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client, Resource};
use tokio::net::TcpListener;

pub use backoff::Backoff;
pub use error::Error;

use self::lease::{LeaseLock, LeaseTiming};
use self::metrics::Metrics;

/// The field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "sluice";

/// The image gateways run unless `--gateway-image` says otherwise.
pub const DEFAULT_GATEWAY_IMAGE: &str =
    concat!("ghcr.io/sluice-dev/sluice:", env!("CARGO_PKG_VERSION"));

/// How long running reconciles may finish after shutdown starts before they are dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Arguments of `sluice operator`.
#[derive(Clone, Debug, clap::Args)]
pub struct OperatorArgs {
    /// Container image for gateway pods (the same `sluice` binary).
    #[arg(long, env = "SLUICE_GATEWAY_IMAGE", default_value = DEFAULT_GATEWAY_IMAGE)]
    pub gateway_image: String,

    /// Address of the HTTP listener serving `/metrics` (Prometheus), `/healthz` and
    /// `/readyz`.
    #[arg(long, env = "SLUICE_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,

    /// Run the controllers only while holding the Lease `sluice-operator`, so several
    /// replicas can run with one of them active and the others standing by.
    #[arg(long, env = "SLUICE_LEADER_ELECTION")]
    pub leader_election: bool,

    /// Namespace of the leader Lease. Defaults to `POD_NAMESPACE`, else the namespace of
    /// the kubeconfig context or of the in-cluster service account.
    #[arg(long, env = "POD_NAMESPACE", value_name = "NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// How long a leader that stops renewing keeps others from taking over.
    #[arg(long, default_value_t = 15, value_name = "SECONDS")]
    pub leader_election_lease_duration: u64,

    /// How long a leader that cannot renew keeps acting; shorter than the lease duration.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub leader_election_renew_deadline: u64,

    /// Time between attempts to acquire or renew the Lease.
    #[arg(long, default_value_t = 2, value_name = "SECONDS")]
    pub leader_election_retry_period: u64,

    /// Watch and manage TransferServers, TransferUsers and the objects they use only in
    /// this namespace; repeat for several. Without it, all namespaces.
    /// DataResidencyPolicies are cluster-scoped and always watched.
    #[arg(
        long = "watch-namespace",
        env = "SLUICE_WATCH_NAMESPACES",
        value_delimiter = ',',
        value_name = "NAMESPACE"
    )]
    pub watch_namespaces: Vec<String>,
}

impl OperatorArgs {
    /// The command line's defaults, except that metrics and health are served on a free
    /// port of 127.0.0.1: for running the operator in-process (tests, tools).
    pub fn local() -> Self {
        Self {
            gateway_image: DEFAULT_GATEWAY_IMAGE.into(),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            leader_election: false,
            leader_election_namespace: None,
            leader_election_lease_duration: 15,
            leader_election_renew_deadline: 10,
            leader_election_retry_period: 2,
            watch_namespaces: Vec::new(),
        }
    }

    /// The leader election's timing.
    pub fn lease_timing(&self) -> LeaseTiming {
        LeaseTiming {
            lease_duration: Duration::from_secs(self.leader_election_lease_duration),
            renew_deadline: Duration::from_secs(self.leader_election_renew_deadline),
            retry_period: Duration::from_secs(self.leader_election_retry_period),
        }
    }

    /// The namespaces to watch, `None` standing for all of them.
    pub fn watched(&self) -> Vec<Option<String>> {
        match self.watch_namespaces.is_empty() {
            true => vec![None],
            false => {
                let mut namespaces = self.watch_namespaces.clone();
                namespaces.sort();
                namespaces.dedup();
                namespaces.into_iter().map(Some).collect()
            }
        }
    }
}

/// An API for namespaced `K` in `namespace`, or in every namespace for `None`.
pub fn scoped_api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// The name this instance goes by in the Lease and its Events: the pod name in a cluster
/// (downward API `POD_NAME`), else the host name.
pub fn instance_identity() -> String {
    let host = || {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
    };
    std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(host)
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "sluice-operator".into())
}

/// What every reconcile needs.
pub struct Context {
    /// Client to the API server.
    pub client: Client,
    /// Operator-wide settings.
    pub args: OperatorArgs,
    /// Publishes Events as the `sluice` controller.
    pub events: events::EventPublisher,
    /// Per-object retry delays for failed reconciles.
    pub backoff: Backoff,
    /// Password hashes already computed, so resyncs do not re-run Argon2id.
    pub password_hashes: server::passwords::PasswordHashes,
    /// Recent object-store probe results, so watch bursts do not write the bucket.
    pub storage_probes: server::object_store::ProbeMemo,
    /// Reconcile counts and timings, leadership and readiness.
    pub metrics: Arc<Metrics>,
    metrics_addr: OnceLock<SocketAddr>,
}

impl Context {
    /// A context for `client` with the given settings.
    pub fn new(client: Client, args: OperatorArgs) -> Arc<Self> {
        Arc::new(Self {
            events: events::EventPublisher::new(client.clone(), instance_identity()),
            metrics: Arc::new(Metrics::new(args.leader_election)),
            client,
            args,
            backoff: Backoff::default(),
            password_hashes: Default::default(),
            storage_probes: Default::default(),
            metrics_addr: OnceLock::new(),
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, once [`run_with`] has bound
    /// the listener.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr.get().copied()
    }
}

/// Errors that keep the operator from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The metrics listener could not be bound.
    #[error("failed to listen on {addr} for metrics and health")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What the OS reported.
        #[source]
        source: std::io::Error,
    },
    /// The leader election's timing cannot keep a single leader.
    #[error("invalid leader election timing: {0}")]
    LeaseTiming(String),
}

/// Runs the operator with the current kubeconfig or in-cluster config until SIGTERM or
/// Ctrl-C.
pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("failed to create Kubernetes client: {e}"))?;
    run_with(Context::new(client, args), crate::cli::terminated()).await
}

/// Serves metrics and health, and runs the controllers (while leading, with leader
/// election) until `shutdown` completes; then lets running reconciles finish for up to
/// [`SHUTDOWN_GRACE`], releases the Lease and returns. Tests call this directly with
/// their own client.
pub async fn run_with(
    context: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let shutdown: Shutdown = FutureExt::shared(Box::pin(shutdown));
    let timing = context.args.lease_timing();
    if context.args.leader_election {
        timing.check().map_err(StartError::LeaseTiming)?;
    }
    let addr = context.args.metrics_listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })?;
    let bound = listener.local_addr()?;
    let _ = context.metrics_addr.set(bound);
    let (stop_serving, serving_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = context.metrics.clone();
    let server = tokio::spawn(crate::probe_http::serve(
        listener,
        move |path| metrics.route(path),
        async {
            let _ = serving_stopped.await;
        },
    ));
    tracing::info!(
        gateway_image = %context.args.gateway_image,
        metrics = %bound,
        namespaces = ?context.args.watch_namespaces,
        leader_election = context.args.leader_election,
        "Starting operator"
    );

    match context.args.leader_election {
        true => lead_when_elected(&context, timing, shutdown).await,
        false => run_controllers(&context, shutdown).await,
    }

    let _ = stop_serving.send(());
    let _ = server.await;
    tracing::info!("Operator stopped");
    Ok(())
}

/// Completes when the operator is asked to stop.
type Shutdown = Shared<BoxFuture<'static, ()>>;

/// Campaigns for the Lease and runs the controllers while holding it, until `shutdown`.
async fn lead_when_elected(context: &Arc<Context>, timing: LeaseTiming, shutdown: Shutdown) {
    let namespace = context
        .args
        .leader_election_namespace
        .clone()
        .unwrap_or_else(|| context.client.default_namespace().to_string());
    let identity = instance_identity();
    let api = Api::<Lease>::namespaced(context.client.clone(), &namespace);
    let mut lock = LeaseLock::new(api, lease::LEASE_NAME, &identity, timing);
    tracing::info!(
        lease = lease::LEASE_NAME,
        %namespace,
        %identity,
        "Joining the leader election"
    );
    loop {
        context.metrics.set_leading(false);
        let acquired = tokio::select! {
            acquired = lease::acquire(&mut lock) => acquired,
            () = shutdown.clone() => return,
        };
        tracing::info!(%identity, "Acquired the leader Lease; starting the controllers");
        let controllers = run_controllers(context, shutdown.clone()).boxed();
        let lost = tokio::select! {
            () = controllers => None,
            lost = lease::keep_leading(&mut lock, acquired) => Some(lost),
        };
        // Leaving the select dropped the controllers (and any running reconcile) if the
        // Lease was lost: nothing more is written by this instance until it leads again.
        context.metrics.set_leading(false);
        let Some(lost) = lost else {
            release(&mut lock).await;
            return;
        };
        tracing::warn!(?lost, "Lost the leader Lease; controllers stopped");
        if shutdown.peek().is_some() {
            return;
        }
    }
}

/// Gives up the Lease so a standby takes over at once, within a bounded time.
async fn release(lock: &mut LeaseLock) {
    match tokio::time::timeout(Duration::from_secs(5), lock.release()).await {
        Ok(Ok(())) => tracing::info!("Released the leader Lease"),
        Ok(Err(error)) => {
            let error = error::chain(&error);
            tracing::warn!(%error, "Failed to release the leader Lease; it will expire");
        }
        Err(_) => tracing::warn!("Timed out releasing the leader Lease; it will expire"),
    }
}

/// Runs every controller, one per watched namespace for namespaced kinds, until
/// `shutdown`; running reconciles then get [`SHUTDOWN_GRACE`] to finish.
async fn run_controllers(context: &Arc<Context>, shutdown: Shutdown) {
    context.metrics.set_leading(true);
    let mut results = Vec::new();
    let mut synced = Vec::new();
    for namespace in context.args.watched() {
        let namespace = namespace.as_deref();
        let servers = server::controller(context.clone(), namespace, shutdown.clone());
        let users = user::controller(context.clone(), namespace, shutdown.clone());
        for running in [servers, users] {
            results.push(running.results);
            synced.push(running.synced);
        }
    }
    let policies = policy::controller(context.clone(), shutdown.clone());
    results.push(policies.results);
    synced.push(policies.synced);

    let metrics = context.metrics.clone();
    let ready = async move {
        let listed = futures::future::join_all(synced).await;
        // A cache whose controller stopped first never lists everything.
        if listed.into_iter().all(|listed| listed) {
            metrics.set_synced();
            tracing::info!("Caches synced");
        }
    };
    let run = async {
        tokio::join!(
            futures::stream::select_all(results).for_each(|_| async {}),
            ready
        );
    };
    let overdue = async {
        shutdown.await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        _ = run => {}
        () = overdue => tracing::warn!("Dropped reconciles still running after the grace period"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn operator_args(flags: &[&str]) -> OperatorArgs {
        let words = ["sluice", "operator"].iter().chain(flags);
        match Cli::try_parse_from(words).expect("valid flags").command {
            Command::Operator(args) => args,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn the_documented_flags_parse_and_default_as_documented() {
        let defaults = operator_args(&[]);
        assert_eq!(defaults.metrics_listen, "0.0.0.0:8080".parse().unwrap());
        assert!(!defaults.leader_election);
        assert_eq!(defaults.lease_timing(), LeaseTiming::default());
        assert_eq!(defaults.watched(), [None]);

        let args = operator_args(&[
            "--metrics-listen",
            "127.0.0.1:9090",
            "--leader-election",
            "--leader-election-namespace",
            "sluice-system",
            "--watch-namespace",
            "b",
            "--watch-namespace",
            "a,b",
        ]);
        assert_eq!(args.metrics_listen, "127.0.0.1:9090".parse().unwrap());
        assert!(args.leader_election);
        assert_eq!(
            args.leader_election_namespace.as_deref(),
            Some("sluice-system")
        );
        assert_eq!(args.watched(), [Some("a".into()), Some("b".into())]);
    }

    #[test]
    fn local_settings_bind_loopback_only() {
        let local = OperatorArgs::local();
        assert!(local.metrics_listen.ip().is_loopback());
        assert_eq!(local.metrics_listen.port(), 0);
        assert!(!local.leader_election && local.watch_namespaces.is_empty());
    }
}
