//! The custom resources of API group `sluice.dev`, version `v1alpha1`.
//!
//! Doc comments on these types become the OpenAPI descriptions that `kubectl explain`
//! shows, so they are written for the person writing the YAML. `sluice crds` renders the
//! CustomResourceDefinitions from these types; the committed copies live in `crds/`.

mod conditions;
mod policy;
mod server;
mod user;

pub use conditions::{ConditionType, Reason, set_condition};
pub use policy::{
    CrossBorderTransfer, DataResidencyPolicy, DataResidencyPolicySpec, DataResidencyPolicyStatus,
    Enforcement, GovernedServer, Jurisdiction,
};
pub use server::{
    AddressingStyle, AuditLog, FtpsPort, FtpsProtocol, GatewayPod, GatewayResources,
    HostKeyFingerprint, NetworkPolicySettings, ObjectStorage, ObjectStoreCredentials,
    ObjectStoreProvider, PassivePortRange, Protocols, ResourceAmounts, SecretReference,
    ServiceExposure, ServiceType, SessionReuse, SftpProtocol, Storage, StorageStatus,
    TlsCertificateStatus, TlsVersion, TransferServer, TransferServerSpec, TransferServerStatus,
    VolumeStorage,
};
pub use user::{
    Permission, SecretKeySelector, ServerReference, TransferUser, TransferUserSpec,
    TransferUserStatus,
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every Sluice resource.
pub const GROUP: &str = "sluice.dev";

/// The node label that carries a node's region unless a policy names another.
pub const DEFAULT_REGION_LABEL: &str = "topology.kubernetes.io/region";

/// The CustomResourceDefinitions of all Sluice resources, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        DataResidencyPolicy::crd(),
        TransferServer::crd(),
        TransferUser::crd(),
    ]
}

/// A CRD as the YAML committed under `crds/`: integral bounds written as integers and
/// descriptions as paragraphs.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> String {
    let mut value = serde_json::to_value(crd).expect("a CRD serialises to JSON");
    normalise(&mut value);
    serde_yaml::to_string(&value).expect("a CRD serialises to YAML")
}

/// Two rewrites that make the generated schema read and compare well:
/// - schemars writes `minimum`/`maximum` as floats (`65535.0`) and the typed
///   `JSONSchemaProps` holds them as `f64`, while the API server stores integers, so a
///   GitOps tool comparing the committed CRD with the live one would see drift: integral
///   floats become integers.
/// - Doc comments are wrapped at 100 columns; `kubectl explain` wraps text itself and
///   would show those breaks as ragged lines: single line breaks in descriptions become
///   spaces, paragraph breaks stay.
fn normalise(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0 && f.abs() < 9.0e15 {
                *value = serde_json::Value::from(f as i64);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(normalise),
        serde_json::Value::Object(map) => {
            for (key, field) in map.iter_mut() {
                match field {
                    serde_json::Value::String(text) if key == "description" => {
                        *text = unwrap_lines(text);
                    }
                    _ => normalise(field),
                }
            }
        }
        _ => {}
    }
}

fn unwrap_lines(text: &str) -> String {
    let paragraphs: Vec<String> = text
        .split("\n\n")
        .map(|p| p.lines().map(str::trim).collect::<Vec<_>>().join(" "))
        .collect();
    paragraphs.join("\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered() -> String {
        crds().iter().map(crd_yaml).collect()
    }

    /// Case C20: an empty list in a CRD (categories, shortNames, printer columns) is
    /// dropped by the API server and shows up as drift.
    #[test]
    fn generated_crds_contain_no_empty_lists() {
        fn empty_lists(path: &str, value: &serde_yaml::Value, found: &mut Vec<String>) {
            match value {
                serde_yaml::Value::Sequence(items) if items.is_empty() => found.push(path.into()),
                serde_yaml::Value::Sequence(items) => {
                    for (i, item) in items.iter().enumerate() {
                        empty_lists(&format!("{path}[{i}]"), item, found);
                    }
                }
                serde_yaml::Value::Mapping(map) => {
                    for (key, item) in map {
                        let key = key.as_str().unwrap_or("?");
                        empty_lists(&format!("{path}.{key}"), item, found);
                    }
                }
                _ => {}
            }
        }
        let mut found = Vec::new();
        for crd in crds() {
            let value: serde_yaml::Value = serde_yaml::from_str(&crd_yaml(&crd)).unwrap();
            empty_lists(&crd.spec.names.kind, &value, &mut found);
        }
        assert!(found.is_empty(), "empty lists at {found:?}");
    }

    #[test]
    fn descriptions_are_unwrapped_into_paragraphs() {
        assert_eq!(unwrap_lines("a\nb\n\nc\n d"), "a b\n\nc d");
        let yaml: String = crds().iter().map(crd_yaml).collect();
        assert!(
            yaml.contains("Region the gateway and its data are pinned to"),
            "{yaml}"
        );
        assert!(!yaml.contains("Pods are\n"), "{yaml}");
    }

    #[test]
    fn generated_crds_write_bounds_as_integers() {
        let yaml = rendered();
        assert!(yaml.contains("maximum: 65535\n"), "{yaml}");
        assert!(!yaml.contains(".0\n"), "{yaml}");
    }

    #[test]
    fn every_schema_property_has_a_description() {
        fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
            let Some(props) = schema.get("properties").and_then(|p| p.as_object()) else {
                return;
            };
            for (name, prop) in props {
                let here = format!("{path}.{name}");
                // metadata and Kubernetes' own Condition type are documented upstream.
                if name == "metadata" || here.contains(".conditions") {
                    continue;
                }
                if prop.get("description").is_none() {
                    missing.push(here.clone());
                }
                walk(&here, prop, missing);
                if let Some(items) = prop.get("items") {
                    walk(&here, items, missing);
                }
            }
        }
        let mut missing = Vec::new();
        for crd in crds() {
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
            walk(
                &crd.spec.names.kind,
                &schema["openAPIV3Schema"],
                &mut missing,
            );
        }
        assert!(
            missing.is_empty(),
            "fields without a doc comment: {missing:?}"
        );
    }
}
