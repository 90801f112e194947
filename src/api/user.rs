//! `TransferUser`: one login on one TransferServer.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A login on a TransferServer in the same namespace. The login name is the object's
/// name.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "TransferUser",
    namespaced,
    status = "TransferUserStatus",
    shortname = "tuser",
    category = "sluice",
    doc = "A login on a TransferServer: credentials, home directory and permissions.",
    printcolumn = r#"{"name":"Server","type":"string","jsonPath":".spec.serverRef.name"}"#,
    printcolumn = r#"{"name":"Home","type":"string","jsonPath":".spec.homeDirectory"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.passwordSecretRef) || (has(self.sshPublicKeys) && size(self.sshPublicKeys) > 0)",
    "message": "a user needs passwordSecretRef or at least one entry in sshPublicKeys"
}]))]
pub struct TransferUserSpec {
    /// The TransferServer (same namespace) this login belongs to.
    pub server_ref: ServerReference,

    /// Secret key holding the user's password. The operator stores only a salted
    /// Argon2id hash in the gateway's configuration, never the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeySelector>,

    /// Public keys allowed to log in, in OpenSSH `authorized_keys` format, for example
    /// `ssh-ed25519 AAAA... ops@example`. Options before the key type are not supported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub ssh_public_keys: Vec<String>,

    /// Directory, relative to the server's storage root, that the user is confined to,
    /// for example `/cucm`. Must start with `/` and must not contain `..`. Created on
    /// first login if missing.
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^/"))]
    pub home_directory: String,

    /// What the user may do inside the home directory.
    #[schemars(length(min = 1))]
    pub permissions: Vec<Permission>,
}

/// Reference to a TransferServer in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerReference {
    /// Name of the TransferServer.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A key in a Secret in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret. Defaults to `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// An operation a user may perform.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Permission {
    /// List directories and read file attributes.
    List,
    /// Download files.
    Read,
    /// Upload new files and overwrite existing ones.
    Write,
    /// Delete files and empty directories.
    Delete,
    /// Create directories.
    Mkdir,
    /// Rename and move files and directories.
    Rename,
}

/// Observed state of a TransferUser.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransferUserStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready, Reconciling and Stalled conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Name of the TransferServer the user is attached to, once it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}
impl TransferUser {
    /// Whether the user's password comes from the Secret `name` in `namespace`.
    pub fn uses_password_secret(&self, namespace: Option<&str>, name: &str) -> bool {
        self.metadata.namespace.as_deref() == namespace
            && self
                .spec
                .password_secret_ref
                .as_ref()
                .is_some_and(|r| r.name == name)
    }
}
