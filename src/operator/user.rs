//! The TransferUser controller: validates each user and reports it on its status.
//!
//! The server controller decides what goes into the gateway configuration; this
//! controller runs the same [`validate_user`] so the user's own status and Events say
//! why a login is missing, without waiting for the server.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};

use super::reconciler::{
    RESYNC, Running, WatchBackoff, apply_status, error_policy, instrumented, log_outcomes,
    object_key,
};
use super::server::dereference::password_secret;
use super::server::validate::{UserProblem, validate_user};
use super::{Context, Error, scoped_api};
use crate::api::{
    ConditionType, Reason, TransferServer, TransferUser, TransferUserStatus, set_condition,
};

/// The controller for the users in `namespace` (every namespace for `None`).
pub fn controller(
    context: Arc<Context>,
    namespace: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Running {
    let client = context.client.clone();
    let controller = Controller::new(
        scoped_api::<TransferUser>(&client, namespace),
        watcher::Config::default(),
    );
    let users = controller.store();
    let users_of_server = users.clone();
    let users_of_secret = users.clone();
    let results = controller
        .watches(
            scoped_api::<Secret>(&client, namespace),
            watcher::Config::default(),
            move |secret| {
                let namespace = secret.namespace();
                let name = secret.name_any();
                users_of_secret
                    .state()
                    .iter()
                    .filter(|u| u.uses_password_secret(namespace.as_deref(), &name))
                    .map(|u| ObjectRef::from_obj(u.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            scoped_api::<TransferServer>(&client, namespace),
            watcher::Config::default(),
            move |server| {
                let namespace = server.namespace();
                let name = server.name_any();
                users_of_server
                    .state()
                    .iter()
                    .filter(|u| u.namespace() == namespace && u.spec.server_ref.name == name)
                    .map(|u| ObjectRef::from_obj(u.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .trigger_backoff(WatchBackoff::default())
        .graceful_shutdown_on(shutdown)
        .run(
            instrumented("user", reconcile),
            error_policy,
            context.clone(),
        );
    Running::new(
        &context,
        "TransferUser",
        users,
        log_outcomes(&context, "user", results),
    )
}

async fn reconcile(user: Arc<TransferUser>, context: Arc<Context>) -> Result<Action, Error> {
    if user.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let client = &context.client;
    let namespace = user.namespace().unwrap_or_default();
    let server_name = &user.spec.server_ref.name;
    let server = Api::<TransferServer>::namespaced(client.clone(), &namespace)
        .get_opt(server_name)
        .await
        .map_err(Error::kube("read TransferServer"))?;
    let secret = password_secret(client, &user).await?;
    let verdict = match server {
        None => Err(UserProblem::ServerNotFound(server_name.clone())),
        Some(server) => validate_user(&user, secret.as_ref().map(Option::as_ref))
            .and_then(|_| server_rolls_out(&server)),
    };

    let new_status = compute_status(&user, &verdict, Timestamp::now());
    // A stalled server publishes its own Warning; the user only waits for it.
    let own_problem = verdict
        .as_ref()
        .err()
        .filter(|p| !matches!(p, UserProblem::ServerNotReady { .. }));
    if let Some(problem) = own_problem {
        let was_ready = condition_status(user.status.as_ref(), ConditionType::Ready);
        if was_ready.as_deref() != Some("False") || reason_changed(&user, problem.reason()) {
            context
                .events
                .warning(user.as_ref(), problem.reason(), problem.to_string())
                .await;
        }
    }
    let api = Api::<TransferUser>::namespaced(client.clone(), &namespace);
    apply_status(&api, user.as_ref(), new_status).await?;
    context.backoff.succeed(&object_key(user.as_ref()));
    Ok(match verdict {
        Ok(()) => Action::requeue(RESYNC),
        Err(_) => Action::await_change(),
    })
}

/// A valid user reaches the gateway only while its server is rolled out: a stalled
/// server (its region not allowed, say) takes no new configuration.
fn server_rolls_out(server: &TransferServer) -> Result<(), UserProblem> {
    let stalled = server
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == ConditionType::Stalled.as_str() && c.status == "True");
    match stalled {
        Some(condition) => Err(UserProblem::ServerNotReady {
            server: server.name_any(),
            reason: condition.reason.clone(),
        }),
        None => Ok(()),
    }
}

fn condition_status(status: Option<&TransferUserStatus>, type_: ConditionType) -> Option<String> {
    status?
        .conditions
        .iter()
        .find(|c| c.type_ == type_.as_str())
        .map(|c| c.status.clone())
}

fn reason_changed(user: &TransferUser, reason: Reason) -> bool {
    let current = user
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    current.is_none_or(|c| c.reason != reason.as_str())
}

/// Computes a user's status from the validation outcome.
pub fn compute_status(
    user: &TransferUser,
    verdict: &Result<(), UserProblem>,
    now: Timestamp,
) -> TransferUserStatus {
    let current = user.status.clone().unwrap_or_default();
    let generation = user.metadata.generation;
    let mut conditions = current.conditions;
    let mut set = |type_, status, reason, message: &str| {
        set_condition(
            &mut conditions,
            type_,
            status,
            reason,
            message,
            generation,
            now,
        );
    };
    let server = &user.spec.server_ref.name;
    match verdict {
        Ok(()) => {
            set(
                ConditionType::Ready,
                true,
                Reason::Reconciled,
                &format!("attached to TransferServer {server}"),
            );
            set(ConditionType::Reconciling, false, Reason::Reconciled, "");
            set(ConditionType::Stalled, false, Reason::Reconciled, "");
        }
        Err(problem @ UserProblem::ServerNotReady { .. }) => {
            // Nothing is wrong with the user: it is rolled out once the server is.
            let message = problem.to_string();
            set(ConditionType::Ready, false, problem.reason(), &message);
            set(ConditionType::Reconciling, true, problem.reason(), &message);
            set(ConditionType::Stalled, false, problem.reason(), "");
        }
        Err(problem) => {
            let message = problem.to_string();
            set(ConditionType::Ready, false, problem.reason(), &message);
            set(ConditionType::Reconciling, false, problem.reason(), "");
            set(ConditionType::Stalled, true, problem.reason(), &message);
        }
    }
    TransferUserStatus {
        observed_generation: generation,
        conditions,
        server: verdict.is_ok().then(|| server.clone()),
    }
}
