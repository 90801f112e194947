//! The TransferServer controller.
//!
//! Pipeline per reconcile: [`dereference`] → [`validate`] → host keys → [`build`] →
//! [`apply`] → [`status`]. A server blocked by validation (for example a region its
//! policy does not allow in `Enforce` mode) gets no workload, a Stalled status and a
//! Warning Event, and is reconciled again when it, its namespace or a policy changes.

pub mod apply;
pub mod build;
pub mod dereference;
pub mod ftps;
pub mod host_keys;
pub mod names;
pub mod object_store;
pub mod passwords;
pub mod status;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Api, ResourceExt};

use self::build::BuildSettings;
use self::object_store::StorageState;
use self::status::Outcome;
use self::validate::Blocked;
use super::reconciler::{
    RESYNC, Running, WatchBackoff, apply_status, error_policy, every_object_in, instrumented,
    log_outcomes, object_key,
};
use super::{Context, Error, scoped_api};
use crate::api::{ConditionType, DataResidencyPolicy, Reason, TransferServer, TransferUser};

/// The controller for the servers in `namespace` (every namespace for `None`), with the
/// objects they own and use there.
pub fn controller(
    context: Arc<Context>,
    namespace: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Clone + Send + Sync + 'static,
) -> Running {
    let client = context.client.clone();
    // A cache of all users, to map a changed Secret to the servers whose users use it.
    let (users, users_writer) = reflector::store::<TransferUser>();
    let user_cache = reflector(
        users_writer,
        watcher(
            scoped_api::<TransferUser>(&client, namespace),
            watcher::Config::default(),
        )
        .backoff(WatchBackoff::default()),
    )
    .take_until(shutdown.clone())
    .filter_map({
        let metrics = context.metrics.clone();
        move |event| {
            if let Err(error) = &event {
                metrics.watch_failed("server", super::reconciler::watch_expired(error));
                tracing::debug!(error = %error, "User cache watch failed; retrying");
            }
            async { None::<()> }
        }
    });
    let controller = Controller::new(
        scoped_api::<TransferServer>(&client, namespace),
        watcher::Config::default(),
    );
    let servers = controller.store();
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=sluice");
    // Only the watched namespaces' own Namespace objects (their labels select policies).
    let namespaces = match namespace {
        Some(namespace) => watcher::Config::default().fields(&format!("metadata.name={namespace}")),
        None => watcher::Config::default(),
    };
    let results = controller
        .owns(scoped_api::<StatefulSet>(&client, namespace), owned.clone())
        .owns(scoped_api::<Service>(&client, namespace), owned.clone())
        .owns(scoped_api::<Secret>(&client, namespace), owned.clone())
        .owns(
            scoped_api::<PodDisruptionBudget>(&client, namespace),
            owned.clone(),
        )
        .owns(
            scoped_api::<NetworkPolicy>(&client, namespace),
            owned.clone(),
        )
        .owns(
            scoped_api::<PersistentVolumeClaim>(&client, namespace),
            owned,
        )
        .watches(
            scoped_api::<TransferUser>(&client, namespace),
            watcher::Config::default(),
            |user| {
                let namespace = user.namespace().unwrap_or_default();
                Some(ObjectRef::new(&user.spec.server_ref.name).within(&namespace))
            },
        )
        .watches(
            scoped_api::<Secret>(&client, namespace),
            watcher::Config::default(),
            {
                let servers = servers.clone();
                move |secret| servers_using_secret(&users, &servers, &secret)
            },
        )
        .watches(
            Api::<Namespace>::all(client.clone()),
            namespaces,
            servers_in_namespace_of(servers.clone(), |namespace: Namespace| {
                Some(namespace.name_any())
            }),
        )
        .watches(
            Api::<StorageClass>::all(client.clone()),
            watcher::Config::default(),
            servers_using_storage_class(servers.clone()),
        )
        .watches(
            Api::<DataResidencyPolicy>::all(client),
            watcher::Config::default(),
            every_object_in(servers.clone()),
        )
        .trigger_backoff(WatchBackoff::default())
        .graceful_shutdown_on(shutdown)
        .run(
            instrumented("server", reconcile),
            error_policy,
            context.clone(),
        );
    let results = futures::stream::select(log_outcomes(&context, "server", results), user_cache);
    Running::new(&context, "TransferServer", servers, results)
}

/// The servers whose FTPS certificate or object-store credentials are `secret`, or with
/// a user whose password comes from it.
fn servers_using_secret(
    users: &Store<TransferUser>,
    servers: &Store<TransferServer>,
    secret: &Secret,
) -> Vec<ObjectRef<TransferServer>> {
    let namespace = secret.namespace();
    let name = secret.name_any();
    let certified = servers
        .state()
        .into_iter()
        .filter(|s| s.namespace() == namespace)
        .filter(|s| {
            let certificate = ftps::spec(s).is_some_and(|f| f.tls_secret_ref.name == name);
            certificate || dereference::storage_secret_name(s) == Some(name.as_str())
        })
        .map(|s| ObjectRef::from_obj(s.as_ref()));
    let mut servers: Vec<ObjectRef<TransferServer>> = users
        .state()
        .iter()
        .filter(|u| u.uses_password_secret(namespace.as_deref(), &name))
        .map(|u| {
            ObjectRef::new(&u.spec.server_ref.name).within(namespace.as_deref().unwrap_or_default())
        })
        .chain(certified)
        .collect();
    servers.sort_by(|a, b| a.name.cmp(&b.name));
    servers.dedup();
    servers
}

/// A watch mapper from a StorageClass to the servers whose volume is claimed from it, so
/// that a class created or replaced after the server is judged again.
fn servers_using_storage_class(
    servers: Store<TransferServer>,
) -> impl Fn(StorageClass) -> Vec<ObjectRef<TransferServer>> {
    move |class| {
        let name = class.name_any();
        servers
            .state()
            .iter()
            .filter(|s| {
                let volume = s.spec.storage.volume.as_ref();
                volume.is_some_and(|v| v.storage_class_name == name)
            })
            .map(|s| ObjectRef::from_obj(s.as_ref()))
            .collect()
    }
}

/// A watch mapper to every server in the namespace `namespace_of` names.
fn servers_in_namespace_of<T>(
    servers: Store<TransferServer>,
    namespace_of: impl Fn(T) -> Option<String>,
) -> impl Fn(T) -> Vec<ObjectRef<TransferServer>> {
    move |object| {
        let namespace = namespace_of(object);
        servers
            .state()
            .iter()
            .filter(|s| s.namespace() == namespace)
            .map(|s| ObjectRef::from_obj(s.as_ref()))
            .collect()
    }
}

async fn reconcile(server: Arc<TransferServer>, context: Arc<Context>) -> Result<Action, Error> {
    if server.metadata.deletion_timestamp.is_some() {
        // Owned objects are removed by the garbage collector through owner references.
        context.storage_probes.forget(&object_key(server.as_ref()));
        return Ok(Action::await_change());
    }
    let client = &context.client;
    let inputs = dereference::dereference(client, server.clone()).await?;
    let valid = match validate::validate(inputs, Timestamp::now()) {
        Ok(valid) => valid,
        Err(blocked) => return stall(&context, *blocked).await,
    };

    let keys = apply::ensure_host_keys(client, &server, valid.host_keys.as_ref()).await?;
    // Rendering hashes passwords (Argon2id): keep it off the async runtime.
    let (valid, keys, objects) = tokio::task::spawn_blocking({
        let context = context.clone();
        move || {
            let settings = BuildSettings {
                image: &context.args.gateway_image,
                hashes: &context.password_hashes,
            };
            let objects = build::build(&valid, &keys, &settings);
            (valid, keys, objects)
        }
    })
    .await
    .map_err(|e| Error::Render(e.to_string()))?;
    if objects.config_size() > build::MAX_CONFIG_BYTES {
        let message = format!(
            "the gateway configuration would be {} bytes, more than the {} a Secret can \
             hold; reduce the number of users or keys on this server",
            objects.config_size(),
            build::MAX_CONFIG_BYTES
        );
        let blocked = Blocked {
            server,
            verdict: Some(valid.verdict),
            reason: Reason::ConfigTooLarge,
            message,
            suspend: None,
        };
        return stall(&context, blocked).await;
    }
    let namespace = server.namespace().unwrap_or_default();
    let announced = valid.ftps.as_ref().is_none_or(|plan| {
        let settings = ftps::settings(&server, plan, valid.service.as_ref(), &valid.pod_services);
        ftps::addresses_known(&settings, &server)
    });
    let leftovers = apply::Leftovers {
        pod_services: &valid.owned_pod_services,
        deployment: valid.legacy_deployment.as_deref(),
        network_policy: valid.owned_network_policy.as_deref(),
        disruption_budget: valid.owned_disruption_budget.as_deref(),
    };
    let statefulset = match apply::apply(client, &namespace, objects, leftovers).await {
        Ok(statefulset) => statefulset,
        Err(error) => {
            let Some(message) = refused_by_the_api_server(&error) else {
                return Err(error);
            };
            let blocked = Blocked {
                server,
                verdict: Some(valid.verdict),
                reason: Reason::Rejected,
                message,
                suspend: None,
            };
            return stall(&context, blocked).await;
        }
    };

    let now = Timestamp::now();
    let certificate = valid.ftps.as_ref().map(|_| {
        let name = ftps::spec(&server).map(|f| f.tls_secret_ref.name.as_str());
        let secret = valid.tls_secret.as_ref().and_then(Option::as_ref);
        ftps::certificate_state(name.unwrap_or_default(), secret, now.into())
    });
    let storage = storage_state(&context, &server, &valid).await;
    let outcome = Outcome::RolledOut {
        storage: storage.as_ref(),
        verdict: &valid.verdict,
        keys: &keys,
        statefulset: Some(&statefulset),
        service: valid.service.as_ref(),
        users: valid.users.len(),
        certificate: certificate.as_ref(),
        passive_addresses_known: announced,
        schedulable: valid.schedulable,
    };
    let new_status = status::compute(&server, &outcome, now);
    announce(&context, &server, &new_status, None).await;
    apply_status(&servers_api(&server, client), server.as_ref(), new_status).await?;
    context.backoff.succeed(&object_key(server.as_ref()));
    let next = match storage {
        // A bucket created or a key granted outside the cluster sends no event.
        Some(StorageState::Unavailable(..)) => {
            object_store::PROBE_FAILURE_TTL + Duration::from_secs(5)
        }
        // Nodes labelled with the region send no event this controller watches.
        _ if !valid.schedulable => Duration::from_secs(30),
        _ => next_check(certificate.as_ref(), now),
    };
    // An allowance the server relies on expires without any event.
    let next = match valid.verdict.next_change() {
        Some(at) => next.min(until(at.into(), now)),
        None => next,
    };
    Ok(Action::requeue(next))
}

/// Probes the server's object store (or recalls a recent probe); `None` on a volume.
async fn storage_state(
    context: &Context,
    server: &TransferServer,
    valid: &validate::ValidServer,
) -> Option<StorageState> {
    let plan = valid.object_store.as_ref()?;
    let credentials = match object_store::credentials(plan, valid.storage_secret.as_ref()) {
        Ok(credentials) => credentials,
        Err(state) => return Some(state),
    };
    let key = object_key(server);
    let probe_name = server.uid().unwrap_or_else(|| server.name_any());
    let state = context
        .storage_probes
        .state(&key, plan, &credentials, &probe_name)
        .await;
    Some(state)
}

/// The API server's explanation when it refused a rendered object as invalid (422), which
/// retrying cannot fix: a node port another Service holds, say. Other failures are
/// transient and retried.
fn refused_by_the_api_server(error: &Error) -> Option<String> {
    let Error::Kube {
        action,
        source: kube::Error::Api(status),
    } = error
    else {
        return None;
    };
    (status.code == 422).then(|| format!("the API server refused to {action}: {}", status.message))
}

/// When to reconcile again unprompted: at the next resync, or just after the FTPS
/// certificate's validity begins or ends if that comes first, so the status follows.
fn next_check(certificate: Option<&ftps::CertificateState>, now: Timestamp) -> Duration {
    let change = match certificate {
        Some(ftps::CertificateState::Valid(info)) => info.not_after,
        Some(ftps::CertificateState::NotYetValid(info)) => info.not_before,
        _ => return RESYNC,
    };
    RESYNC.min(until(change, now))
}

/// How long from `now` until just after `at`.
fn until(at: std::time::SystemTime, now: Timestamp) -> Duration {
    let now: std::time::SystemTime = now.into();
    at.duration_since(now).unwrap_or_default() + Duration::from_secs(1)
}

async fn stall(context: &Context, blocked: Blocked) -> Result<Action, Error> {
    let Blocked {
        server,
        verdict,
        reason,
        message,
        suspend,
    } = blocked;
    let suspended = suspend.is_some();
    if let (Some(rendered), Some(verdict)) = (&suspend, &verdict) {
        let stamp = build::residency_stamp(verdict, &server.spec.region);
        if let Some(secret) = build::suspended_config(&server, rendered, stamp) {
            let namespace = server.namespace().unwrap_or_default();
            apply::suspend_writes(&context.client, &namespace, &secret).await?;
        }
    }
    let outcome = Outcome::Blocked {
        verdict: verdict.as_ref(),
        reason,
        message: &message,
        writes_suspended: suspended,
    };
    let new_status = status::compute(&server, &outcome, Timestamp::now());
    announce(context, &server, &new_status, Some(reason)).await;
    let api = servers_api(&server, &context.client);
    apply_status(&api, server.as_ref(), new_status).await?;
    context.backoff.succeed(&object_key(server.as_ref()));
    tracing::info!(reason = reason.as_str(), "Server not rolled out");
    Ok(match reason {
        // The conflicting object (or the one holding a node port) may go away without any
        // event this controller sees.
        Reason::NameConflict | Reason::Rejected => Action::requeue(Duration::from_secs(30)),
        _ => Action::await_change(),
    })
}

/// Reasons of a `ResidencyCompliant=False` condition; the first is the fallback.
const RESIDENCY_REASONS: [Reason; 4] = [
    Reason::RegionNotAllowed,
    Reason::PlaintextNotAllowed,
    Reason::StorageRegionNotAllowed,
    Reason::AuditOnly,
];

/// Reasons of a `StorageAvailable=False` condition; the first is the fallback.
const STORAGE_REASONS: [Reason; 5] = [
    Reason::StorageProbeFailed,
    Reason::StorageCredentialsMissing,
    Reason::BucketNotFound,
    Reason::StorageAccessDenied,
    Reason::StorageUnreachable,
];

/// Reasons of a `TlsCertificateValid=False` condition; the first is the fallback.
const CERTIFICATE_REASONS: [Reason; 4] = [
    Reason::CertificateMissing,
    Reason::CertificateInvalid,
    Reason::CertificateExpired,
    Reason::CertificateNotYetValid,
];

/// Publishes an Event for every condition whose status or reason changes in this
/// reconcile, so a converged or still-stalled server publishes nothing new.
async fn announce(
    context: &Context,
    server: &TransferServer,
    new: &crate::api::TransferServerStatus,
    blocked: Option<Reason>,
) {
    let old = server
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let changed = |type_: ConditionType| {
        let new = new.conditions.iter().find(|c| c.type_ == type_.as_str())?;
        let was = old.iter().find(|c| c.type_ == type_.as_str());
        let same = was.is_some_and(|c| c.status == new.status && c.reason == new.reason);
        (!same).then_some(new)
    };
    let reason_of = |c: &Condition, candidates: &[Reason]| {
        candidates
            .iter()
            .copied()
            .find(|r| r.as_str() == c.reason)
            .unwrap_or(candidates[0])
    };
    if let Some(c) = changed(ConditionType::ResidencyCompliant).filter(|c| c.status == "False") {
        let reason = reason_of(c, &RESIDENCY_REASONS);
        context
            .events
            .warning(server, reason, c.message.clone())
            .await;
    }
    if let Some(c) = changed(ConditionType::TlsCertificateValid).filter(|c| c.status == "False") {
        let reason = reason_of(c, &CERTIFICATE_REASONS);
        context
            .events
            .warning(server, reason, c.message.clone())
            .await;
    }
    if let Some(c) = changed(ConditionType::StorageAvailable).filter(|c| c.status == "False") {
        let reason = reason_of(c, &STORAGE_REASONS);
        context
            .events
            .warning(server, reason, c.message.clone())
            .await;
    }
    let stalled = changed(ConditionType::Stalled).filter(|c| c.status == "True");
    let announced = |r: &Reason| RESIDENCY_REASONS.contains(r);
    if let (Some(c), Some(reason)) = (stalled, blocked.filter(|r| !announced(r))) {
        context
            .events
            .warning(server, reason, c.message.clone())
            .await;
    }
    if changed(ConditionType::Ready).is_some_and(|c| c.status == "True") {
        let note = "gateway is available".to_string();
        context.events.normal(server, Reason::RolledOut, note).await;
    }
}

fn servers_api(server: &TransferServer, client: &kube::Client) -> Api<TransferServer> {
    Api::namespaced(client.clone(), &server.namespace().unwrap_or_default())
}
