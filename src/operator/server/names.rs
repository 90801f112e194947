//! Names and labels of the objects a TransferServer owns, in one place.

use std::collections::BTreeMap;

/// Longest TransferServer name whose derived names all stay valid (the Service name is a
/// DNS-1035 label of at most 63 characters, and `-gateway-config` is the longest suffix).
pub const MAX_SERVER_NAME: usize = 48;

/// The gateway StatefulSet; its pods are `NAME-gateway-0`, `NAME-gateway-1`, ...
pub fn statefulset(server: &str) -> String {
    format!("{server}-gateway")
}

/// The gateway pod with `ordinal`, and the Service of its own that exposes its share of
/// the passive FTPS ports when the range is split between pods.
pub fn pod(server: &str, ordinal: usize) -> String {
    format!("{server}-gateway-{ordinal}")
}

/// The label the StatefulSet controller puts on each pod, naming it.
pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";

/// The PodDisruptionBudget of the gateway pods.
pub fn disruption_budget(server: &str) -> String {
    format!("{server}-gateway")
}

/// The Service; named like the server so its DNS name is the server's name.
pub fn service(server: &str) -> String {
    server.to_string()
}

/// The PersistentVolumeClaim holding the files.
pub fn volume_claim(server: &str) -> String {
    format!("{server}-data")
}

/// The NetworkPolicy limiting where the gateway pods may connect to; named like the
/// StatefulSet whose pods it selects.
pub fn network_policy(server: &str) -> String {
    statefulset(server)
}

/// The Secret holding the SSH host keys.
pub fn host_keys(server: &str) -> String {
    format!("{server}-host-keys")
}

/// The Secret holding the rendered gateway configuration.
pub fn gateway_config(server: &str) -> String {
    format!("{server}-gateway-config")
}

/// Labels that select a server's gateway pods.
pub fn selector_labels(server: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "sluice-gateway".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), server.to_string()),
    ])
}

/// Labels on every object a server owns.
pub fn labels(server: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(server);
    labels.insert("app.kubernetes.io/component".into(), "gateway".into());
    labels.insert("app.kubernetes.io/part-of".into(), "sluice".into());
    labels.insert("app.kubernetes.io/managed-by".into(), "sluice".into());
    labels
}
