//! Reading manifests for `sluice check`: files, their documents, and the kinds it knows.
//!
//! Paths are files or directories; directories are walked recursively in name order for
//! `*.yaml`, `*.yml` and `*.json` (hidden entries such as `.git` are skipped, and a
//! symbolic link is followed only to a file, so a link cannot make the walk loop). A
//! named file is read whatever its extension. YAML files may hold several documents, JSON
//! files several values; `kind: List` (and `*List`) items are read as documents.
//!
//! Kinds read: `TransferServer`, `TransferUser` and `DataResidencyPolicy`
//! (`sluice.dev/v1alpha1`), `Namespace` (for its labels) and `StorageClass`. Every other
//! kind is ignored. A document that does not parse as its kind is a [`Problem`] naming the
//! file and the document; reading goes on with the next one. Only a file that cannot be
//! read at all is a [`LoadError`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::api::{DataResidencyPolicy, GROUP, TransferServer, TransferUser};

/// File extensions read from directories.
pub const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// Why manifests cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A path or file cannot be read.
    #[error("failed to read {path}")]
    Read {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The paths hold no manifest files.
    #[error("no manifests (*.yaml, *.yml, *.json) under {0}")]
    Empty(String),
}

/// Where a document was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// The file, as given or found under a given directory.
    pub file: String,
    /// The document's position in the file, from 1.
    pub document: usize,
    /// The position in a `kind: List`, from 1.
    pub item: Option<usize>,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, document {}", self.file, self.document)?;
        if let Some(item) = self.item {
            write!(f, ", item {item}")?;
        }
        Ok(())
    }
}

/// An object and where it was read.
#[derive(Clone, Debug)]
pub struct Located<T> {
    /// The object.
    pub object: T,
    /// Where it was read.
    pub source: Source,
}

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The manifests are invalid: the check fails.
    Error,
    /// Worth knowing; the check does not fail because of it.
    Warning,
}

/// Something wrong with the manifests, other than a residency verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// How bad it is.
    pub severity: Severity,
    /// Where, if it is about one document.
    pub source: Option<Source>,
    /// The object, as `Kind namespace/name` or `Kind name`, if known.
    pub object: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// Everything read from the paths.
#[derive(Debug, Default)]
pub struct Manifests {
    /// TransferServers, in the order read.
    pub servers: Vec<Located<TransferServer>>,
    /// TransferUsers, in the order read.
    pub users: Vec<Located<TransferUser>>,
    /// DataResidencyPolicies, in the order read.
    pub policies: Vec<Located<DataResidencyPolicy>>,
    /// Namespaces by name, with their labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// StorageClasses by name.
    pub storage_classes: BTreeMap<String, StorageClass>,
    /// Documents that could not be read as their kind, and the like.
    pub problems: Vec<Problem>,
    /// Where each object was first read, by `Kind namespace/name`, to find duplicates.
    seen: BTreeMap<String, Source>,
}

/// Reads every manifest under `paths`.
pub fn load(paths: &[PathBuf]) -> Result<Manifests, LoadError> {
    let mut files = Vec::new();
    for path in paths {
        collect(path, &mut files)?;
    }
    if files.is_empty() {
        let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(LoadError::Empty(paths.join(", ")));
    }
    let mut manifests = Manifests::default();
    for file in files {
        let bytes = std::fs::read(&file).map_err(|source| LoadError::Read {
            path: file.clone(),
            source,
        })?;
        manifests.read_file(&file, &bytes);
    }
    Ok(manifests)
}

/// Adds `path` (a file, or the manifest files under a directory) to `files`.
fn collect(path: &Path, files: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let read_error = |source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(read_error)?;
    if !metadata.is_dir() {
        files.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<_> = std::fs::read_dir(path)
        .map_err(read_error)?
        .collect::<Result<_, _>>()
        .map_err(read_error)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let file_type = entry.file_type().map_err(read_error)?;
        let is_file = match file_type.is_symlink() {
            true => std::fs::metadata(&path).is_ok_and(|m| m.is_file()),
            false => file_type.is_file(),
        };
        if file_type.is_dir() {
            collect(&path, files)?;
        } else if is_file && has_manifest_extension(&path) {
            files.push(path);
        }
    }
    Ok(())
}

fn has_manifest_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

impl Manifests {
    /// Reads the documents of one file.
    pub fn read_file(&mut self, path: &Path, bytes: &[u8]) {
        let file = path.display().to_string();
        let at = |document| Source {
            file: file.clone(),
            document,
            item: None,
        };
        let Ok(text) = std::str::from_utf8(bytes) else {
            self.error(Some(at(1)), None, "the file is not UTF-8 text".to_string());
            return;
        };
        let json = path.extension().is_some_and(|e| e == "json");
        let documents: Box<dyn Iterator<Item = Result<serde_json::Value, String>>> = if json {
            let stream = serde_json::Deserializer::from_str(text).into_iter();
            Box::new(stream.map(|v| v.map_err(|e| e.to_string())))
        } else {
            Box::new(serde_yaml::Deserializer::from_str(text).map(|document| {
                let value = serde_yaml::Value::deserialize(document).map_err(|e| e.to_string())?;
                serde_json::to_value(value).map_err(|e| e.to_string())
            }))
        };
        for (index, document) in documents.enumerate() {
            match document {
                Ok(value) => self.read_document(value, at(index + 1)),
                Err(error) => {
                    // The rest of the file cannot be told apart from the broken part.
                    let message = format!("the document is not valid YAML or JSON: {error}");
                    self.error(Some(at(index + 1)), None, message);
                    break;
                }
            }
        }
    }

    /// Reads one document (or an item of a `List`).
    fn read_document(&mut self, value: serde_json::Value, source: Source) {
        if value.is_null() {
            return;
        }
        let api_version = value.get("apiVersion").and_then(|v| v.as_str());
        let kind = value.get("kind").and_then(|v| v.as_str());
        let (Some(api_version), Some(kind)) = (api_version, kind) else {
            let message = "not a Kubernetes object (no apiVersion and kind); ignored";
            self.warning(Some(source), None, message.to_string());
            return;
        };
        let (api_version, kind) = (api_version.to_string(), kind.to_string());
        if kind == "List" || (kind.ends_with("List") && value.get("items").is_some()) {
            self.read_list(value, &kind, source);
            return;
        }
        let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
        match (api_version.as_str(), kind.as_str()) {
            (SLUICE_VERSION, "TransferServer") => {
                if let Some(server) = self.parse::<TransferServer>(value, &kind, &source) {
                    let server = self.defaulted_namespace(server, &kind, &source);
                    self.servers.push(Located {
                        object: server,
                        source,
                    });
                }
            }
            (SLUICE_VERSION, "TransferUser") => {
                if let Some(user) = self.parse::<TransferUser>(value, &kind, &source) {
                    let user = self.defaulted_namespace(user, &kind, &source);
                    self.users.push(Located {
                        object: user,
                        source,
                    });
                }
            }
            (SLUICE_VERSION, "DataResidencyPolicy") => {
                if let Some(policy) = self.parse::<DataResidencyPolicy>(value, &kind, &source) {
                    self.policies.push(Located {
                        object: policy,
                        source,
                    });
                }
            }
            ("v1", "Namespace") => {
                if let Some(namespace) = self.parse::<Namespace>(value, &kind, &source) {
                    let labels = namespace.labels().clone();
                    self.namespaces.insert(namespace.name_any(), labels);
                }
            }
            ("storage.k8s.io/v1", "StorageClass") => {
                if let Some(class) = self.parse::<StorageClass>(value, &kind, &source) {
                    self.storage_classes.insert(class.name_any(), class);
                }
            }
            _ if group == GROUP && SLUICE_KINDS.contains(&kind.as_str()) => {
                let message =
                    format!("apiVersion {api_version} is not served; use {SLUICE_VERSION}");
                self.error(Some(source), Some(kind), message);
            }
            _ => {}
        }
    }

    fn read_list(&mut self, value: serde_json::Value, kind: &str, source: Source) {
        let Some(serde_json::Value::Array(items)) = value.get("items").cloned() else {
            let message = format!("a {kind} without a list of items");
            self.error(Some(source), None, message);
            return;
        };
        for (index, item) in items.into_iter().enumerate() {
            // Items of nested lists are counted in the outer list.
            let item_source = Source {
                item: source.item.or(Some(index + 1)),
                ..source.clone()
            };
            self.read_document(item, item_source);
        }
    }

    /// `value` as a `K`, or a problem saying why it is not one. Also records duplicates.
    fn parse<K>(&mut self, value: serde_json::Value, kind: &str, source: &Source) -> Option<K>
    where
        K: DeserializeOwned + kube::Resource,
    {
        let name = value
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .map(str::to_string);
        let object = match serde_json::from_value::<K>(value) {
            Ok(object) => object,
            Err(error) => {
                let what = name.map(|n| format!("{kind} {n}"));
                let message = format!("does not parse as a {kind}: {error}");
                self.error(Some(source.clone()), what, message);
                return None;
            }
        };
        if object.meta().name.as_deref().unwrap_or_default().is_empty() {
            let message = "has no metadata.name".to_string();
            self.error(Some(source.clone()), Some(kind.to_string()), message);
            return None;
        }
        let key = describe(kind, &object);
        if let Some(first) = self.seen.get(&key) {
            let message = format!("is defined twice (also in {first}); the last one is used");
            self.error(Some(source.clone()), Some(key), message);
        } else {
            self.seen.insert(key, source.clone());
        }
        Some(object)
    }

    /// `object` in namespace `default` if it names none, as `kubectl apply` would place it
    /// without `-n`, with a warning.
    fn defaulted_namespace<K: kube::Resource>(
        &mut self,
        mut object: K,
        kind: &str,
        source: &Source,
    ) -> K {
        if object.meta().namespace.is_none() {
            object.meta_mut().namespace = Some("default".to_string());
            let message = "has no metadata.namespace: checked in namespace default, where \
                           kubectl apply puts it unless -n says otherwise"
                .to_string();
            let what = describe(kind, &object);
            self.warning(Some(source.clone()), Some(what), message);
        }
        object
    }

    fn error(&mut self, source: Option<Source>, object: Option<String>, message: String) {
        self.problems.push(Problem {
            severity: Severity::Error,
            source,
            object,
            message,
        });
    }

    fn warning(&mut self, source: Option<Source>, object: Option<String>, message: String) {
        self.problems.push(Problem {
            severity: Severity::Warning,
            source,
            object,
            message,
        });
    }
}

const SLUICE_VERSION: &str = "sluice.dev/v1alpha1";
const SLUICE_KINDS: [&str; 3] = ["TransferServer", "TransferUser", "DataResidencyPolicy"];

/// `Kind namespace/name`, or `Kind name` for a cluster-scoped object.
pub fn describe<K: kube::Resource>(kind: &str, object: &K) -> String {
    let name = object.meta().name.as_deref().unwrap_or_default();
    match &object.meta().namespace {
        Some(namespace) => format!("{kind} {namespace}/{name}"),
        None => format!("{kind} {name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(name: &str, text: &str) -> Manifests {
        let mut manifests = Manifests::default();
        manifests.read_file(Path::new(name), text.as_bytes());
        manifests
    }

    const SERVER: &str = "\
apiVersion: sluice.dev/v1alpha1
kind: TransferServer
metadata: {name: files, namespace: team}
spec:
  region: cn-shanghai
  protocols: {sftp: {}}
  storage: {volume: {storageClassName: ssd, size: 1Gi}}
";

    #[test]
    fn multi_document_yaml_is_read_document_by_document() {
        let text = format!(
            "---\n{SERVER}---\n# only a comment\n---\napiVersion: v1\nkind: Namespace\n\
             metadata: {{name: team, labels: {{residency: cn}}}}\n---\napiVersion: apps/v1\n\
             kind: Deployment\nmetadata: {{name: other}}\n"
        );
        let manifests = read("all.yaml", &text);
        assert_eq!(manifests.problems, []);
        assert_eq!(manifests.servers.len(), 1);
        let server = &manifests.servers[0];
        assert_eq!(server.object.name_any(), "files");
        assert_eq!(server.source.to_string(), "all.yaml, document 1");
        assert_eq!(
            manifests.namespaces["team"],
            BTreeMap::from([("residency".to_string(), "cn".to_string())])
        );
    }

    #[test]
    fn list_items_are_read_and_located_by_item() {
        let text = "\
apiVersion: v1
kind: List
items:
- apiVersion: storage.k8s.io/v1
  kind: StorageClass
  metadata: {name: ssd}
  provisioner: example.com/disk
  volumeBindingMode: WaitForFirstConsumer
- apiVersion: sluice.dev/v1alpha1
  kind: TransferServer
  metadata: {name: files}
  spec: {region: 1}
";
        let manifests = read("list.yaml", text);
        assert!(manifests.storage_classes.contains_key("ssd"));
        assert!(manifests.servers.is_empty());
        assert_eq!(manifests.problems.len(), 1, "{:?}", manifests.problems);
        let problem = &manifests.problems[0];
        assert_eq!(problem.severity, Severity::Error);
        assert_eq!(
            problem.source.as_ref().map(ToString::to_string).as_deref(),
            Some("list.yaml, document 1, item 2")
        );
        assert_eq!(problem.object.as_deref(), Some("TransferServer files"));
        assert!(
            problem
                .message
                .starts_with("does not parse as a TransferServer: "),
            "{}",
            problem.message
        );
    }

    #[test]
    fn a_document_that_does_not_parse_names_its_file_and_index_and_the_rest_is_read() {
        let text = format!(
            "{SERVER}---\napiVersion: sluice.dev/v1alpha1\nkind: DataResidencyPolicy\n\
             metadata: {{name: broken}}\nspec: {{allowedRegions: [cn-shanghai]}}\n---\n{}",
            SERVER.replace("name: files", "name: second")
        );
        let manifests = read("dir/policies.yaml", &text);
        assert_eq!(manifests.servers.len(), 2);
        assert_eq!(manifests.problems.len(), 1);
        let problem = &manifests.problems[0];
        assert_eq!(
            problem.source.as_ref().unwrap().to_string(),
            "dir/policies.yaml, document 2"
        );
        assert_eq!(
            problem.message,
            "does not parse as a DataResidencyPolicy: missing field `namespaceSelector`"
        );
    }

    #[test]
    fn invalid_yaml_is_an_error_at_its_document() {
        let text = format!("{SERVER}---\nkind: [unclosed\n");
        let manifests = read("bad.yml", &text);
        assert_eq!(manifests.servers.len(), 1);
        let problem = &manifests.problems[0];
        assert_eq!(problem.severity, Severity::Error);
        assert_eq!(problem.source.as_ref().unwrap().document, 2);
        assert!(
            problem
                .message
                .starts_with("the document is not valid YAML or JSON")
        );
    }

    #[test]
    fn json_files_may_hold_several_values() {
        let server: serde_json::Value = serde_yaml::from_str(SERVER).unwrap();
        let text = format!("{server}\n\t{server}");
        let manifests = read("servers.json", &text);
        assert_eq!(manifests.servers.len(), 2);
        assert_eq!(manifests.servers[1].source.document, 2);
        let duplicate = &manifests.problems[0];
        assert_eq!(
            duplicate.object.as_deref(),
            Some("TransferServer team/files")
        );
        assert_eq!(
            duplicate.message,
            "is defined twice (also in servers.json, document 1); the last one is used"
        );
    }

    #[test]
    fn objects_without_a_namespace_are_checked_in_default_with_a_warning() {
        let manifests = read("s.yaml", &SERVER.replace(", namespace: team", ""));
        assert_eq!(
            manifests.servers[0].object.namespace().as_deref(),
            Some("default")
        );
        assert_eq!(manifests.problems[0].severity, Severity::Warning);
        assert_eq!(
            manifests.problems[0].object.as_deref(),
            Some("TransferServer default/files")
        );
    }

    #[test]
    fn other_versions_of_sluice_kinds_are_errors_and_other_kinds_are_ignored() {
        let text = format!(
            "{}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: x}}\n---\nfoo: bar\n",
            SERVER.replace("v1alpha1", "v1beta1")
        );
        let manifests = read("v.yaml", &text);
        let messages: Vec<(Severity, &str)> = manifests
            .problems
            .iter()
            .map(|p| (p.severity, p.message.as_str()))
            .collect();
        assert_eq!(
            messages,
            [
                (
                    Severity::Error,
                    "apiVersion sluice.dev/v1beta1 is not served; use sluice.dev/v1alpha1"
                ),
                (
                    Severity::Warning,
                    "not a Kubernetes object (no apiVersion and kind); ignored"
                ),
            ]
        );
    }

    #[test]
    fn directories_are_walked_recursively_in_name_order_skipping_hidden_and_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("b/nested")).unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        std::fs::write(root.join("b/nested/z.yml"), SERVER).unwrap();
        std::fs::write(root.join("a.json"), "{}").unwrap();
        std::fs::write(root.join("README.md"), "not: read").unwrap();
        std::fs::write(root.join(".git/x.yaml"), "kind: [").unwrap();
        let mut files = Vec::new();
        collect(root, &mut files).unwrap();
        let relative: Vec<_> = files
            .iter()
            .map(|f| f.strip_prefix(root).unwrap().display().to_string())
            .collect();
        assert_eq!(relative, ["a.json", "b/nested/z.yml"]);

        assert!(matches!(
            load(&[root.join("missing")]),
            Err(LoadError::Read { .. })
        ));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            load(&[empty.path().to_path_buf()]),
            Err(LoadError::Empty(_))
        ));
    }
}
