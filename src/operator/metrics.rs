//! The operator's metrics (Prometheus/OpenMetrics text at `/metrics`) and health
//! (`/healthz`, `/readyz`), served by [`crate::probe_http`].
//!
//! Contract:
//! - `/healthz` answers 200 unless a reconcile has been running for longer than
//!   [`WEDGED_AFTER`] (every API call and store probe a reconcile makes is bounded well
//!   below that, so one that runs longer is stuck and a restart is the remedy).
//! - `/readyz` answers 200 once the controllers' caches have listed everything, and, with
//!   leader election, also while this instance stands by (a standby is ready to take
//!   over; only the leader lists).
//! - Metric names are documented in the README; they are part of the operator's
//!   interface for dashboards and alerts.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use super::Error;
use crate::probe_http::Response;

/// A reconcile running longer than this makes `/healthz` fail.
pub const WEDGED_AFTER: Duration = Duration::from_secs(600);

/// The content type of the OpenMetrics text format, which Prometheus scrapes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    controller: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    controller: &'static str,
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Counts objects of one kind in a controller's cache.
type Census = Box<dyn Fn() -> usize + Send + Sync>;

/// Metrics and health of one operator process.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ResultLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    durations: Family<ControllerLabels, Histogram, fn() -> Histogram>,
    in_flight: Family<ControllerLabels, Gauge>,
    managed: Family<KindLabels, Gauge>,
    watch_errors: Family<ErrorLabels, Counter>,
    leader: Gauge,
    leader_election: bool,
    synced: AtomicBool,
    leading: AtomicBool,
    census: Mutex<Vec<(&'static str, Census)>>,
    running: Mutex<HashMap<u64, Instant>>,
    next_reconcile: AtomicU64,
}

fn duration_histogram() -> Histogram {
    // 10 ms to about 41 s.
    Histogram::new(exponential_buckets(0.01, 2.0, 13))
}

impl Metrics {
    /// Metrics for an operator that runs with leader election or without.
    pub fn new(leader_election: bool) -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles that finished, by controller and result (success or error)",
            reconciles.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciles by controller and kind of error (api, host_keys, render)",
            errors.clone(),
        );
        let durations =
            Family::<ControllerLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                duration_histogram,
            );
        registry.register(
            "reconcile_duration_seconds",
            "Time a reconcile took, by controller",
            durations.clone(),
        );
        let in_flight = Family::<ControllerLabels, Gauge>::default();
        registry.register(
            "reconciles_in_flight",
            "Reconciles running now, by controller",
            in_flight.clone(),
        );
        let managed = Family::<KindLabels, Gauge>::default();
        registry.register(
            "managed_objects",
            "Objects in the controllers' caches, by kind (0 while standing by)",
            managed.clone(),
        );
        let watch_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "watch_errors",
            "Failed watches by controller and error: expired (410 Gone, answered by listing \
             everything again) or failed (retried with backoff)",
            watch_errors.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this instance runs the controllers (leads), 0 while it stands by",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            durations,
            in_flight,
            managed,
            watch_errors,
            leader,
            leader_election,
            synced: AtomicBool::new(false),
            leading: AtomicBool::new(false),
            census: Mutex::default(),
            running: Mutex::default(),
            next_reconcile: AtomicU64::new(0),
        }
    }

    /// Records that this instance now runs the controllers, or no longer does.
    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::SeqCst);
        self.leader.set(i64::from(leading));
        if !leading {
            self.synced.store(false, Ordering::SeqCst);
            self.census
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }

    /// Records that every controller's cache has listed its objects.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::SeqCst);
    }

    /// Counts the objects of `kind` in `count`'s cache at every scrape, while leading.
    pub fn count_objects(
        &self,
        kind: &'static str,
        count: impl Fn() -> usize + Send + Sync + 'static,
    ) {
        self.census
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((kind, Box::new(count)));
    }

    /// Counts a failed watch of `controller`; `expired` for a 410 Gone.
    pub fn watch_failed(&self, controller: &'static str, expired: bool) {
        let error = match expired {
            true => "expired",
            false => "failed",
        };
        self.watch_errors
            .get_or_create(&ErrorLabels { controller, error })
            .inc();
    }

    /// Starts timing a reconcile of `controller`; finish it with [`ReconcileTimer::finish`].
    /// A timer dropped unfinished (the reconcile was cancelled) counts nothing.
    pub fn start(self: &Arc<Self>, controller: &'static str) -> ReconcileTimer {
        let id = self.next_reconcile.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, started);
        self.in_flight
            .get_or_create(&ControllerLabels { controller })
            .inc();
        ReconcileTimer {
            metrics: self.clone(),
            controller,
            id,
            started,
        }
    }

    /// The answer to `path`: `/metrics`, `/healthz`, `/readyz`.
    pub fn route(&self, path: &str) -> Response {
        match path {
            "/metrics" => self.exposition(),
            "/healthz" => self.health(),
            "/readyz" => self.readiness(),
            _ => Response::not_found(),
        }
    }

    fn exposition(&self) -> Response {
        let mut counts: HashMap<&'static str, usize> = HashMap::new();
        for kind in ["TransferServer", "TransferUser", "DataResidencyPolicy"] {
            counts.insert(kind, 0);
        }
        for (kind, count) in self
            .census
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            *counts.entry(kind).or_default() += count();
        }
        for (kind, count) in counts {
            let count = i64::try_from(count).unwrap_or(i64::MAX);
            self.managed.get_or_create(&KindLabels { kind }).set(count);
        }
        let mut body = String::new();
        match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
            Ok(()) => Response {
                status: 200,
                content_type: OPENMETRICS,
                body,
            },
            Err(_) => Response::unavailable("failed to encode the metrics\n"),
        }
    }

    fn health(&self) -> Response {
        let oldest = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .min()
            .map(|started| started.elapsed());
        match oldest {
            Some(age) if age > WEDGED_AFTER => {
                let mut text = String::new();
                let _ = writeln!(text, "a reconcile has been running for {}s", age.as_secs());
                Response::unavailable(text)
            }
            _ => Response::ok("ok\n"),
        }
    }

    fn readiness(&self) -> Response {
        let leading = self.leading.load(Ordering::SeqCst);
        if self.leader_election && !leading {
            return Response::ok("ok: standing by\n");
        }
        match self.synced.load(Ordering::SeqCst) {
            true => Response::ok("ok\n"),
            false => Response::unavailable("caches not synced yet\n"),
        }
    }
}

/// A reconcile being timed.
pub struct ReconcileTimer {
    metrics: Arc<Metrics>,
    controller: &'static str,
    id: u64,
    started: Instant,
}

impl ReconcileTimer {
    /// Records the outcome of the reconcile.
    pub fn finish<T>(self, outcome: &Result<T, Error>) {
        let controller = self.controller;
        let result = match outcome {
            Ok(_) => "success",
            Err(error) => {
                let error = match error {
                    Error::Kube { .. } => "api",
                    Error::HostKeys(_) => "host_keys",
                    Error::Render(_) => "render",
                };
                self.metrics
                    .errors
                    .get_or_create(&ErrorLabels { controller, error })
                    .inc();
                "error"
            }
        };
        self.metrics
            .reconciles
            .get_or_create(&ResultLabels { controller, result })
            .inc();
        self.metrics
            .durations
            .get_or_create(&ControllerLabels { controller })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.metrics
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        self.metrics
            .in_flight
            .get_or_create(&ControllerLabels {
                controller: self.controller,
            })
            .dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_counts_reconciles_by_controller_and_result() {
        let metrics = Arc::new(Metrics::new(false));
        metrics.start("server").finish(&Ok::<(), Error>(()));
        let failed: Result<(), Error> = Err(Error::Render("x".into()));
        metrics.start("server").finish(&failed);
        let running = metrics.start("user");
        metrics.count_objects("TransferServer", || 3);
        metrics.set_leading(true);
        let body = metrics.route("/metrics").body;
        for line in [
            r#"sluice_reconciles_total{controller="server",result="success"} 1"#,
            r#"sluice_reconciles_total{controller="server",result="error"} 1"#,
            r#"sluice_reconcile_errors_total{controller="server",error="render"} 1"#,
            r#"sluice_reconcile_duration_seconds_count{controller="server"} 2"#,
            r#"sluice_reconciles_in_flight{controller="user"} 1"#,
            r#"sluice_managed_objects{kind="TransferServer"} 3"#,
            r#"sluice_managed_objects{kind="TransferUser"} 0"#,
            "sluice_leader 1",
        ] {
            assert!(
                body.lines().any(|l| l == line),
                "{line} missing from\n{body}"
            );
        }
        drop(running);
        let body = metrics.route("/metrics").body;
        assert!(body.contains(r#"sluice_reconciles_in_flight{controller="user"} 0"#));
    }

    #[test]
    fn a_standby_is_ready_and_a_leader_only_once_synced() {
        let metrics = Metrics::new(true);
        assert_eq!(metrics.route("/readyz").status, 200);
        metrics.set_leading(true);
        assert_eq!(metrics.route("/readyz").status, 503);
        metrics.set_synced();
        assert_eq!(metrics.route("/readyz").status, 200);
        metrics.set_leading(false);
        assert_eq!(metrics.route("/readyz").status, 200);

        let alone = Metrics::new(false);
        assert_eq!(alone.route("/readyz").status, 503);
        alone.set_synced();
        assert_eq!(alone.route("/readyz").status, 200);
        assert_eq!(alone.route("/healthz").status, 200);
    }
}
