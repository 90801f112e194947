//! The operator: one controller per kind, sharing one [`Context`].
//!
//! Each controller runs the same pipeline: dereference (read what the object points
//! at), validate (decide what is usable, including the residency verdict), build (pure:
//! desired objects), apply (server-side apply under the field manager [`FIELD_MANAGER`])
//! and status. Permanent spec problems become conditions and wait for a change;
//! failed API calls are retried with backoff.

mod backoff;
mod error;
mod events;
pub mod policy;
mod reconciler;
pub mod server;
pub mod user;

use std::sync::Arc;

use futures::StreamExt;
use kube::Client;

pub use backoff::Backoff;
pub use error::Error;

/// The field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "sluice";

/// The image gateways run unless `--gateway-image` says otherwise.
pub const DEFAULT_GATEWAY_IMAGE: &str =
    concat!("ghcr.io/sluice-dev/sluice:", env!("CARGO_PKG_VERSION"));

/// Arguments of `sluice operator`.
#[derive(Clone, Debug, clap::Args)]
pub struct OperatorArgs {
    /// Container image for gateway pods (the same `sluice` binary).
    #[arg(long, env = "SLUICE_GATEWAY_IMAGE", default_value = DEFAULT_GATEWAY_IMAGE)]
    pub gateway_image: String,
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
}

impl Context {
    /// A context for `client` with the given settings.
    pub fn new(client: Client, args: OperatorArgs) -> Arc<Self> {
        // The pod name in a cluster (downward API), the host name elsewhere.
        let instance = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "sluice-operator".into());
        Arc::new(Self {
            events: events::EventPublisher::new(client.clone(), instance),
            client,
            args,
            backoff: Backoff::default(),
            password_hashes: Default::default(),
            storage_probes: Default::default(),
        })
    }
}

/// Runs the operator with the current kubeconfig or in-cluster config until interrupted.
pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("failed to create Kubernetes client: {e}"))?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    run_with(Context::new(client, args), shutdown).await
}

/// Runs all controllers with `context` until `shutdown` completes. Tests call this
/// directly with their own client.
pub async fn run_with(
    context: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    tracing::info!(gateway_image = %context.args.gateway_image, "Starting operator");
    let servers = server::controller(context.clone(), shutdown.clone());
    let users = user::controller(context.clone(), shutdown.clone());
    let policies = policy::controller(context.clone(), shutdown);
    tokio::join!(
        servers.for_each(|_| async {}),
        users.for_each(|_| async {}),
        policies.for_each(|_| async {})
    );
    tracing::info!("Operator stopped");
    Ok(())
}
