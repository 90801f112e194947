//! What every controller does the same way: writing status, retrying with backoff,
//! mapping "anything changed" to "reconcile all", and logging outcomes.

use std::fmt::Debug;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt};
use kube::core::object::HasStatus;
use kube::runtime::controller::{self, Action};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::chain;
use super::{Context, Error, FIELD_MANAGER};

/// A controller as it runs: drive `results` to run it.
pub struct Running {
    /// The controller's outcomes; the controller runs while this is polled.
    pub results: BoxStream<'static, ()>,
    /// Completes with `true` once the controller's cache has listed every object, or with
    /// `false` if the controller stopped first.
    pub synced: BoxFuture<'static, bool>,
}

impl Running {
    /// A running controller whose cache is `store`, counted as `kind` in the metrics.
    pub fn new<K>(
        context: &Context,
        kind: &'static str,
        store: Store<K>,
        results: impl Stream<Item = ()> + Send + 'static,
    ) -> Self
    where
        K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    {
        let census = store.clone();
        context
            .metrics
            .count_objects(kind, move || census.state().len());
        Self {
            results: results.boxed(),
            synced: async move { store.wait_until_ready().await.is_ok() }.boxed(),
        }
    }
}

/// `reconcile`, timed and counted in the metrics as `controller`.
pub fn instrumented<K, F, Fut>(
    controller: &'static str,
    reconcile: F,
) -> impl FnMut(Arc<K>, Arc<Context>) -> BoxFuture<'static, Result<Action, Error>>
where
    K: Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Context>) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    move |object, context| {
        let timer = context.metrics.start(controller);
        async move {
            let outcome = reconcile(object, context).await;
            timer.finish(&outcome);
            outcome
        }
        .boxed()
    }
}

/// The pause after a failed watch, for the watches of one controller together.
///
/// kube-runtime applies one backoff to all of a controller's watches at once (the main
/// resource, owned and related objects), and pauses all of them while it runs. Its
/// default (0.8 s doubling to 30 s, reset after two quiet minutes) lets the errors of
/// different watches add up: after an API-server restart each of a dozen watches fails
/// once to connect and once with 410 Gone, and the controller stopped seeing changes for
/// minutes while it reconciled from its stale cache. Capped at one second, every watch
/// is listing again within seconds, and a down API server costs a request a second.
#[derive(Clone, Debug)]
pub struct WatchBackoff {
    next: std::time::Duration,
}

impl WatchBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(100);
    const LAST: std::time::Duration = std::time::Duration::from_secs(1);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<Self::Item> {
        let delay = self.next;
        self.next = (delay * 2).min(Self::LAST);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// How often a converged object is reconciled anyway, to repair drift nobody announced.
pub const RESYNC: std::time::Duration = std::time::Duration::from_secs(600);

/// Server-side applies `status` to `object` unless it already has exactly that status,
/// so a converged object is never written. Empty lists are skipped by the status types,
/// so a status with no conditions yet never claims ownership of an empty list (C23).
pub async fn apply_status<K>(api: &Api<K>, object: &K, status: K::Status) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + HasStatus + Clone + Debug + DeserializeOwned,
    K::Status: Serialize + PartialEq,
{
    if object.status() == Some(&status) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let params = kube::api::PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(
        &object.name_any(),
        &params,
        &kube::api::Patch::Apply(&patch),
    )
    .await
    .map_err(Error::kube(format!("update {} status", K::kind(&()))))?;
    Ok(())
}

/// The key under which an object's failures are counted.
pub fn object_key<K: Resource<DynamicType = ()>>(object: &K) -> String {
    let namespace = object.namespace().unwrap_or_default();
    format!("{}/{namespace}/{}", K::kind(&()), object.name_any())
}

/// Retries a failed reconcile after a per-object exponential backoff.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    object: Arc<K>,
    error: &Error,
    context: Arc<Context>,
) -> Action {
    let delay = context.backoff.fail(&object_key(object.as_ref()));
    tracing::warn!(error = %chain(error), retry_in_s = delay.as_secs(), "Reconcile failed");
    Action::requeue(delay)
}

/// A watch mapper that reconciles every object in `store`, for inputs (policies,
/// namespaces) that can change the outcome for any of them.
pub fn every_object_in<K, T>(store: Store<K>) -> impl Fn(T) -> Vec<ObjectRef<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    move |_| {
        store
            .state()
            .iter()
            .map(|o| ObjectRef::from_obj(o.as_ref()))
            .collect()
    }
}

/// Drives a controller's result stream, logging reconciles that could not run (a
/// missing object, a queue error) at debug level: they are retried by the runtime. Watch
/// failures are counted in the metrics as `controller`'s.
pub fn log_outcomes<K, S>(
    context: &Context,
    controller: &'static str,
    results: S,
) -> impl Stream<Item = ()> + use<K, S>
where
    K: Resource + Debug,
    S: Stream<Item = Result<(ObjectRef<K>, Action), controller::Error<Error, watcher::Error>>>,
{
    let metrics = context.metrics.clone();
    results.map(move |result| {
        if let Err(error) = result {
            if let controller::Error::QueueError(watch) = &error {
                metrics.watch_failed(controller, watch_expired(watch));
            }
            tracing::debug!(error = %chain(&error), "Reconcile did not run");
        }
    })
}

/// Whether a watch failed because the version it resumed from is gone (410), after which
/// the watcher lists everything again.
pub fn watch_expired(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kube::runtime::utils::Backoff;

    use super::WatchBackoff;

    #[test]
    fn watch_backoff_doubles_to_one_second_and_starts_over_after_a_success() {
        let mut backoff = WatchBackoff::default();
        let delays: Vec<Duration> = backoff.by_ref().take(6).collect();
        let millis: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(millis, [100, 200, 400, 800, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next(), Some(Duration::from_millis(100)));
    }
}
