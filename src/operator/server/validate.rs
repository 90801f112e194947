//! Validate: decide what of a TransferServer and its users can be rolled out.
//!
//! Pure: needs no client. A server problem (an invalid name, a region its policy does
//! not allow) blocks the whole server; a user problem (missing Secret, unparseable key,
//! escaping home) drops only that user, so the server's other users are not disturbed.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use zeroize::Zeroizing;

use super::dereference::{ServerInputs, UserInputs};
use super::ftps::{self, FtpsPlan};
use super::names::MAX_SERVER_NAME;
use super::object_store::{self, ObjectStorePlan};
use crate::api::{Permission, Reason, TransferServer, TransferUser};
use crate::residency::{self, ResidencyVerdict, Subject};

/// A server that passed validation, with the users that did.
pub struct ValidServer {
    /// The server.
    pub server: Arc<TransferServer>,
    /// The residency verdict (compliant, or non-compliant under `Audit` only).
    pub verdict: ResidencyVerdict,
    /// Users that can be rolled out, sorted by name.
    pub users: Vec<ValidUser>,
    /// Users that cannot, with why.
    pub rejected_users: Vec<(String, UserProblem)>,
    /// The existing host-key Secret, if any.
    pub host_keys: Option<Secret>,
    /// The existing StatefulSet, for status.
    pub statefulset: Option<StatefulSet>,
    /// The existing Service, for status and its load-balancer address.
    pub service: Option<Service>,
    /// How FTPS is exposed, if the server offers it.
    pub ftps: Option<FtpsPlan>,
    /// The existing per-pod Services by ordinal, for their load-balancer addresses.
    pub pod_services: Vec<Option<Service>>,
    /// Per-pod Services this server owns, by name, including ones no longer wanted.
    pub owned_pod_services: Vec<String>,
    /// The TLS Secret, when the server offers FTPS (`Some(None)`: it does not exist).
    pub tls_secret: Option<Option<Secret>>,
    /// A gateway Deployment of an earlier version this server owns, to be removed.
    pub legacy_deployment: Option<String>,
    /// The PodDisruptionBudget this server owns, to be removed when not wanted.
    pub owned_disruption_budget: Option<String>,
    /// How the object store is reached, when files live in one.
    pub object_store: Option<ObjectStorePlan>,
    /// The object store's credentials Secret (`Some(None)`: it does not exist).
    pub storage_secret: Option<Option<Secret>>,
    /// Whether some node carries the server's region in the region label.
    pub schedulable: bool,
    /// The NetworkPolicy this server owns, if any.
    pub owned_network_policy: Option<String>,
}

/// Why a server cannot be rolled out.
#[derive(Debug)]
pub struct Blocked {
    /// The server.
    pub server: Arc<TransferServer>,
    /// The residency verdict, when one was reached.
    pub verdict: Option<ResidencyVerdict>,
    /// Condition reason.
    pub reason: Reason,
    /// Human-readable explanation.
    pub message: String,
    /// The gateway-config Secret of a gateway rolled out before the server fell out of
    /// compliance under an enforced policy: its residency stamp must stop writes.
    pub suspend: Option<Secret>,
}

/// A user ready to be written into the gateway configuration.
pub struct ValidUser {
    /// Login name.
    pub name: String,
    /// Kubernetes UID of the TransferUser, used to derive its password salt.
    pub uid: String,
    /// The password, if the user has one. Wiped from memory when dropped.
    pub password: Option<Zeroizing<Vec<u8>>>,
    /// Public keys, normalised to `type base64 [comment]`.
    pub public_keys: Vec<String>,
    /// Normalised home directory.
    pub home: String,
    /// Permissions, sorted and without duplicates.
    pub permissions: Vec<Permission>,
}

/// Why a user cannot be rolled out. Messages never contain secret values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UserProblem {
    /// The referenced TransferServer does not exist.
    #[error("TransferServer {0} does not exist in this namespace")]
    ServerNotFound(String),
    /// The password Secret does not exist.
    #[error("password Secret {0} does not exist")]
    SecretNotFound(String),
    /// The password Secret lacks the key, or it is empty.
    #[error("password Secret {secret} has no non-empty key {key}")]
    SecretKeyMissing {
        /// Secret name.
        secret: String,
        /// Key looked for.
        key: String,
    },
    /// A public key does not parse.
    #[error("sshPublicKeys[{index}] is not a valid OpenSSH public key")]
    InvalidPublicKey {
        /// Position in `sshPublicKeys`.
        index: usize,
    },
    /// The home directory is not an absolute path without `..`.
    #[error(
        "homeDirectory {0:?} must start with / and must not contain .., a backslash, \
         control characters, or names that begin or end with whitespace or end with a dot"
    )]
    InvalidHomeDirectory(String),
    /// Neither a password nor a key.
    #[error("the user has neither passwordSecretRef nor sshPublicKeys")]
    NoCredentials,
    /// The server is stalled, so no change reaches its gateway (reported by the user
    /// controller only).
    #[error(
        "TransferServer {server} is stalled ({reason}); the user reaches its gateway when \
         the server is no longer stalled"
    )]
    ServerNotReady {
        /// The server.
        server: String,
        /// The server's Stalled reason.
        reason: String,
    },
}

impl UserProblem {
    /// Condition and Event reason.
    pub fn reason(&self) -> Reason {
        match self {
            Self::ServerNotFound(_) => Reason::ServerNotFound,
            Self::SecretNotFound(_) => Reason::SecretNotFound,
            Self::SecretKeyMissing { .. } => Reason::SecretKeyMissing,
            Self::InvalidPublicKey { .. } => Reason::InvalidPublicKey,
            Self::InvalidHomeDirectory(_) => Reason::InvalidHomeDirectory,
            Self::NoCredentials => Reason::NoCredentials,
            Self::ServerNotReady { .. } => Reason::ServerNotReady,
        }
    }
}

/// Validates a server and its users at time `now` (cross-border allowances expire).
pub fn validate(inputs: ServerInputs, now: Timestamp) -> Result<ValidServer, Box<Blocked>> {
    let ServerInputs {
        server,
        namespace_labels,
        policies,
        users,
        host_keys,
        statefulset,
        service,
        pod_services,
        owned_pod_services,
        tls_secret,
        storage_secret,
        legacy_deployment,
        network_policy,
        owned_disruption_budget,
        gateway_config,
        volume,
        nodes_in_region,
        existing,
    } = inputs;
    let name = server.name_any();
    if !is_dns_label(&name) || name.len() > MAX_SERVER_NAME {
        let message = format!(
            "the name must be a DNS label of at most {MAX_SERVER_NAME} characters, \
             because the Service and Secrets are named after it"
        );
        return Err(Box::new(Blocked {
            server,
            verdict: None,
            reason: Reason::InvalidSpec,
            message,
            suspend: None,
        }));
    }

    if let Some(message) = name_conflict(&server, &existing) {
        let reason = Reason::NameConflict;
        return Err(Box::new(Blocked {
            server,
            verdict: None,
            reason,
            message,
            suspend: None,
        }));
    }

    // Before residency: a store whose region cannot be resolved cannot be judged.
    let object_store = match object_store::plan(&server) {
        Ok(plan) => plan,
        Err(message) => {
            return Err(Box::new(Blocked {
                server,
                verdict: None,
                reason: Reason::InvalidSpec,
                message,
                suspend: None,
            }));
        }
    };

    let no_nodes = Vec::new();
    let subject = match &volume {
        Some(v) => Subject::of(&server).with_placement(
            &server,
            v.storage_class.as_ref(),
            v.bound.as_ref(),
            &v.zone_nodes,
        ),
        None => Subject::of(&server).with_placement(&server, None, None, &no_nodes),
    };
    let verdict = residency::evaluate(subject, &namespace_labels, &policies, now);
    if verdict.blocks_rollout() {
        let mut message = verdict.message(&server.spec.region);
        let suspend = gateway_config.filter(|_| statefulset.is_some());
        if suspend.is_some() {
            message.push_str(
                "; the gateway rolled out before no longer accepts writes (its files are kept \
                 and can still be read) until the server complies again",
            );
        }
        let reason = verdict.violation_reason();
        return Err(Box::new(Blocked {
            server,
            verdict: Some(verdict),
            reason,
            message,
            suspend,
        }));
    }
    let schedulable = nodes_in_region;

    let ftps = match ftps::plan(&server) {
        Ok(plan) => plan,
        Err(message) => {
            return Err(Box::new(Blocked {
                server,
                verdict: Some(verdict),
                reason: Reason::InvalidSpec,
                message,
                suspend: None,
            }));
        }
    };

    let (valid, rejected_users) = partition_users(users);
    Ok(ValidServer {
        server,
        verdict,
        users: valid,
        rejected_users,
        host_keys,
        statefulset,
        service,
        ftps,
        pod_services,
        owned_pod_services,
        tls_secret,
        legacy_deployment,
        owned_disruption_budget,
        object_store,
        storage_secret,
        schedulable,
        owned_network_policy: network_policy,
    })
}

/// The first existing object, among those this server would own, that another owner
/// controls or nobody does. Taking it over would let a TransferServer named after
/// someone else's Service, claim or Secret redirect it, mount it, and have it
/// garbage-collected with the server.
fn name_conflict(server: &TransferServer, existing: &[(&str, ObjectMeta)]) -> Option<String> {
    let uid = server.uid()?;
    let (kind, meta) = existing.iter().find(|(_, meta)| {
        let controller = meta
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true));
        controller.is_none_or(|owner| owner.uid != uid)
    })?;
    let name = meta.name.as_deref().unwrap_or_default();
    let held_by_predecessor = meta.deletion_timestamp.is_some()
        || meta
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "TransferServer" && o.name == server.name_any());
    Some(if held_by_predecessor {
        format!(
            "{kind} {name} still belongs to a deleted TransferServer of the same name; \
             waiting for it to be removed"
        )
    } else {
        format!(
            "{kind} {name} already exists and is not owned by this TransferServer; \
             rename the server or remove the {kind}"
        )
    })
}

fn partition_users(users: Vec<UserInputs>) -> (Vec<ValidUser>, Vec<(String, UserProblem)>) {
    let mut valid = Vec::new();
    let mut rejected = Vec::new();
    for UserInputs {
        user,
        password_secret,
    } in users
    {
        match validate_user(&user, password_secret.as_ref().map(Option::as_ref)) {
            Ok(v) => valid.push(v),
            Err(problem) => rejected.push((user.name_any(), problem)),
        }
    }
    (valid, rejected)
}

/// Validates one user. `password_secret` is `None` when the user names no Secret and
/// `Some(None)` when the named Secret is missing.
pub fn validate_user(
    user: &TransferUser,
    password_secret: Option<Option<&Secret>>,
) -> Result<ValidUser, UserProblem> {
    let spec = &user.spec;
    let home = normalise_home(&spec.home_directory)
        .ok_or_else(|| UserProblem::InvalidHomeDirectory(spec.home_directory.clone()))?;
    let public_keys = spec
        .ssh_public_keys
        .iter()
        .enumerate()
        .map(|(index, line)| {
            normalise_public_key(line).ok_or(UserProblem::InvalidPublicKey { index })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let password = match (&spec.password_secret_ref, password_secret) {
        (Some(reference), Some(secret)) => {
            let secret =
                secret.ok_or_else(|| UserProblem::SecretNotFound(reference.name.clone()))?;
            let key = reference
                .key
                .clone()
                .unwrap_or_else(|| "password".to_string());
            Some(password_from(secret, &reference.name, &key)?)
        }
        _ => None,
    };
    if password.is_none() && public_keys.is_empty() {
        return Err(UserProblem::NoCredentials);
    }
    let mut permissions = spec.permissions.clone();
    permissions.sort();
    permissions.dedup();
    Ok(ValidUser {
        name: user.name_any(),
        uid: user.uid().unwrap_or_default(),
        password,
        public_keys,
        home,
        permissions,
    })
}

fn password_from(
    secret: &Secret,
    name: &str,
    key: &str,
) -> Result<Zeroizing<Vec<u8>>, UserProblem> {
    let from_data = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone());
    let from_string = || {
        secret
            .string_data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|s| s.clone().into_bytes())
    };
    match from_data.or_else(from_string) {
        Some(bytes) if !bytes.is_empty() => Ok(Zeroizing::new(bytes)),
        _ => Err(UserProblem::SecretKeyMissing {
            secret: name.to_string(),
            key: key.to_string(),
        }),
    }
}

/// Normalises a home directory: absolute, no `..`, no empty or `.` segments.
/// Returns `None` when it would escape or is malformed: segments with leading or trailing
/// whitespace are refused because the storage layer trims them (`/ ab` would alias
/// `/ab`), and the gateway's reserved upload directory cannot be anyone's home.
pub fn normalise_home(home: &str) -> Option<String> {
    if !home.starts_with('/') {
        return None;
    }
    let mut segments = Vec::new();
    for segment in home.split('/') {
        match segment {
            "" | "." => {}
            ".." => return None,
            // The gateway's rule for names every backend keeps faithfully.
            s if crate::storage::name_problem(s).is_some() => return None,
            other => segments.push(other),
        }
    }
    let home = format!("/{}", segments.join("/"));
    (!crate::storage::is_reserved(&home)).then_some(home)
}

/// Parses one `authorized_keys`-style line and re-renders it canonically as
/// `type base64`. The comment is dropped: it identifies nothing the gateway needs, and
/// unbounded comments would let one user push the rendered configuration past the 1 MiB
/// Secret limit.
fn normalise_public_key(line: &str) -> Option<String> {
    let mut key = russh::keys::PublicKey::from_openssh(line.trim()).ok()?;
    key.set_comment("");
    key.to_openssh().ok()
}

/// Whether `name` is a DNS label (RFC 1123, starting with a letter), as every object
/// name derived from a server's must be.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes
            .last()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    /// A user `alice` on server `s` with `home` and the given credentials.
    fn user(home: &str, credentials: serde_json::Value) -> TransferUser {
        let mut spec = serde_json::json!({
            "serverRef": {"name": "s"},
            "homeDirectory": home,
            "permissions": ["write", "list", "list"],
        });
        spec.as_object_mut()
            .unwrap()
            .extend(credentials.as_object().unwrap().clone());
        let mut user = TransferUser::new("alice", serde_json::from_value(spec).unwrap());
        user.metadata.uid = Some("u1".into());
        user
    }

    fn keys(keys: &[&str]) -> serde_json::Value {
        serde_json::json!({"sshPublicKeys": keys})
    }

    fn password_ref(name: &str, key: Option<&str>) -> serde_json::Value {
        serde_json::json!({"passwordSecretRef": {"name": name, "key": key}})
    }

    fn secret(key: &str, value: &[u8]) -> Secret {
        Secret {
            data: Some(BTreeMap::from([(
                key.to_string(),
                ByteString(value.to_vec()),
            )])),
            ..Secret::default()
        }
    }

    const KEY: &str = concat!(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
        " ops@example"
    );

    #[test]
    fn homes_are_normalised_and_escapes_refused() {
        assert_eq!(normalise_home("/cucm").as_deref(), Some("/cucm"));
        assert_eq!(normalise_home("//a/./b/").as_deref(), Some("/a/b"));
        assert_eq!(normalise_home("/").as_deref(), Some("/"));
        assert_eq!(normalise_home("/a/../../etc"), None);
        assert_eq!(normalise_home("relative"), None);
        assert_eq!(normalise_home("/a\0b"), None);
        assert_eq!(normalise_home("/ ab"), None);
        assert_eq!(normalise_home("/a/b\t"), None);
        assert_eq!(normalise_home("/.sluice-uploads"), None);
        assert_eq!(normalise_home("//.sluice-uploads/x"), None);
    }

    #[test]
    fn password_user_takes_the_secret_key() {
        let u = user("/a", password_ref("pw", None));
        let s = secret("password", b"hunter2");
        let valid = validate_user(&u, Some(Some(&s))).unwrap();
        assert_eq!(
            valid.password.as_deref().map(Vec::as_slice),
            Some(&b"hunter2"[..])
        );
        assert_eq!(valid.permissions, [Permission::List, Permission::Write]);
    }

    #[test]
    fn missing_secret_and_missing_key_are_named_without_values() {
        let u = user("/a", password_ref("pw", Some("pass")));
        assert_eq!(
            validate_user(&u, Some(None)).err(),
            Some(UserProblem::SecretNotFound("pw".into()))
        );
        let wrong = secret("password", b"hunter2");
        let problem = validate_user(&u, Some(Some(&wrong))).err().unwrap();
        assert_eq!(
            problem.to_string(),
            "password Secret pw has no non-empty key pass"
        );
    }

    #[test]
    fn unparseable_key_is_reported_by_position() {
        let user = user("/a", keys(&[KEY, "ssh-ed25519 AAAAnotakey"]));
        let problem = validate_user(&user, None).err().unwrap();
        assert_eq!(problem, UserProblem::InvalidPublicKey { index: 1 });
    }

    #[test]
    fn key_user_is_valid_without_the_key_comment_and_home_escape_is_not() {
        let valid = validate_user(&user("/k", keys(&[KEY])), None).unwrap();
        assert_eq!(valid.public_keys, [KEY.trim_end_matches(" ops@example")]);
        assert_eq!(
            validate_user(&user("/k/../..", keys(&[KEY])), None).err(),
            Some(UserProblem::InvalidHomeDirectory("/k/../..".into()))
        );
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("cucm-backup"));
        assert!(!is_dns_label("Cucm"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("a.b"));
    }
}
