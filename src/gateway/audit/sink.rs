//! Where audit records and usage counts are stored: the server's own storage, under
//! [`AUDIT_DIR`].
//!
//! Contract:
//! - Volume: records are appended to `.sluice-audit/YYYY-MM-DD/POD.jsonl` and the file is
//!   `fsync`ed before [`Sink::append`] returns (and its directory too, when the file is
//!   new). Usage files are written to a temporary name, synced and renamed.
//! - Object store: objects cannot be appended to, so each append writes one object per day
//!   it covers, `.sluice-audit/YYYY-MM-DD/POD/HHMMSS.mmm-SEQ.jsonl` (the time of the flush,
//!   UTC; `SEQ` counts this process's flushes), complete when the PUT returns.
//! - Errors keep only what is safe to log: an I/O error of our own files, or an object
//!   store's [`StorageFault`].

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use futures::TryStreamExt;
use opendal::Operator;

use super::timestamp;
use super::usage::UsageFile;
use crate::storage::bucket::StorageFault;
use crate::storage::{AUDIT_DIR, Storage};

/// Why the audit log could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A file of the audit log on the volume.
    #[error("failed to write the audit log at {}", path.display())]
    Volume {
        /// The file or directory.
        path: PathBuf,
        /// What the filesystem reported.
        #[source]
        source: io::Error,
    },
    /// The object store refused or failed.
    #[error("failed to write the audit log to the object store: {0}")]
    Object(StorageFault),
}

/// The storage the audit log is kept in.
pub enum Sink {
    /// The volume, at its local root.
    Volume(PathBuf),
    /// The bucket, through its operator (rooted at the server's prefix).
    Object {
        /// The operator.
        operator: Operator,
        /// Flushes so far, for unique object names.
        seq: u64,
    },
}

impl Sink {
    /// The audit log of `storage`.
    pub fn of(storage: &Storage) -> Self {
        match storage {
            Storage::Volume(volume) => Self::Volume(volume.local_root().to_owned()),
            Storage::Object(store) => Self::Object {
                operator: store.operator().clone(),
                seq: 0,
            },
        }
    }

    /// Stores `lines` (each a JSON object and its newline), grouped by the day (`YYYY-MM-DD`)
    /// each belongs to, durably.
    pub async fn append(
        &mut self,
        pod: &str,
        lines: &BTreeMap<String, Vec<u8>>,
    ) -> Result<(), SinkError> {
        match self {
            Self::Volume(root) => {
                let (root, pod, lines) = (root.clone(), pod.to_owned(), lines.clone());
                blocking(move || {
                    for (day, bytes) in &lines {
                        append_file(&root, day, &pod, bytes)?;
                    }
                    Ok(())
                })
                .await
            }
            Self::Object { operator, seq } => {
                for (day, bytes) in lines {
                    *seq += 1;
                    let time = timestamp::object_name_time(SystemTime::now());
                    let key = format!("{AUDIT_DIR}/{day}/{pod}/{time}-{:06}.jsonl", *seq);
                    operator
                        .write(&key, bytes.clone())
                        .await
                        .map_err(|e| SinkError::Object(StorageFault::of(&e)))?;
                }
                Ok(())
            }
        }
    }

    /// Stores one pod's usage count, replacing the previous one.
    pub async fn write_usage(&self, file: &UsageFile) -> Result<(), SinkError> {
        let body = serde_json::to_vec(file).expect("a usage file serialises");
        let key = usage_key(&file.reference, &file.pod);
        match self {
            Self::Volume(root) => {
                let path = root.join(&key);
                blocking(move || replace_file(&path, &body)).await
            }
            Self::Object { operator, .. } => operator
                .write(&key, body)
                .await
                .map(drop)
                .map_err(|e| SinkError::Object(StorageFault::of(&e))),
        }
    }

    /// Every pod's usage file for `reference`. Files that do not parse are skipped.
    pub async fn read_usage(&self, reference: &str) -> Result<Vec<UsageFile>, SinkError> {
        let dir = usage_dir(reference);
        let bodies = match self {
            Self::Volume(root) => {
                let dir = root.join(dir);
                blocking(move || read_json_files(&dir)).await?
            }
            Self::Object { operator, .. } => read_objects(operator, &format!("{dir}/"))
                .await
                .map_err(|e| SinkError::Object(StorageFault::of(&e)))?,
        };
        Ok(bodies
            .iter()
            .filter_map(|body| serde_json::from_slice(body).ok())
            .collect())
    }
}

/// The directory of an allowance's usage files. References are free text; anything but
/// ASCII letters, digits, `-`, `_` and `.` is written as `%XX`, so a reference is always
/// one path component.
pub fn usage_dir(reference: &str) -> String {
    let mut encoded = String::new();
    for byte in reference.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => encoded.push(byte as char),
            b'.' if !encoded.is_empty() => encoded.push('.'),
            _ => encoded.push_str(&format!("%{byte:02X}")),
        }
    }
    format!("{AUDIT_DIR}/usage/{encoded}")
}

fn usage_key(reference: &str, pod: &str) -> String {
    format!("{}/{pod}.json", usage_dir(reference))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SinkError> + Send + 'static,
) -> Result<T, SinkError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|join| {
            Err(SinkError::Volume {
                path: PathBuf::from(AUDIT_DIR),
                source: io::Error::other(join),
            })
        })
}

fn volume_error(path: &Path) -> impl FnOnce(io::Error) -> SinkError + '_ {
    move |source| SinkError::Volume {
        path: path.to_owned(),
        source,
    }
}

/// Appends `bytes` to `root/.sluice-audit/DAY/POD.jsonl` and syncs it.
fn append_file(root: &Path, day: &str, pod: &str, bytes: &[u8]) -> Result<(), SinkError> {
    let dir = root.join(AUDIT_DIR).join(day);
    std::fs::create_dir_all(&dir).map_err(volume_error(&dir))?;
    let path = dir.join(format!("{pod}.jsonl"));
    let created = !path.exists();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .map_err(volume_error(&path))?;
    file.write_all(bytes).map_err(volume_error(&path))?;
    file.sync_data().map_err(volume_error(&path))?;
    if created {
        sync_dir(&dir)?;
    }
    Ok(())
}

/// Writes `path` whole: a temporary file beside it, synced, renamed over it.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), SinkError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(volume_error(dir))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let staged = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&staged).map_err(volume_error(&staged))?;
    file.write_all(bytes).map_err(volume_error(&staged))?;
    file.sync_data().map_err(volume_error(&staged))?;
    std::fs::rename(&staged, path).map_err(volume_error(path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), SinkError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(volume_error(dir))
}

/// The content of every `*.json` file in `dir`; none if `dir` does not exist.
fn read_json_files(dir: &Path) -> Result<Vec<Vec<u8>>, SinkError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(volume_error(dir)(error)),
    };
    let mut bodies = Vec::new();
    for entry in entries {
        let path = entry.map_err(volume_error(dir))?.path();
        let is_json = path.extension().is_some_and(|e| e == "json");
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if is_json && !hidden {
            bodies.push(std::fs::read(&path).map_err(volume_error(&path))?);
        }
    }
    Ok(bodies)
}

/// The content of every `*.json` object directly under `prefix`.
async fn read_objects(operator: &Operator, prefix: &str) -> Result<Vec<Vec<u8>>, opendal::Error> {
    let mut lister = operator.lister(prefix).await?;
    let mut bodies = Vec::new();
    while let Some(entry) = lister.try_next().await? {
        if entry.path().ends_with(".json") {
            bodies.push(operator.read(entry.path()).await?.to_vec());
        }
    }
    Ok(bodies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_is_always_one_path_component() {
        assert_eq!(usage_dir("CAC-2026_01"), ".sluice-audit/usage/CAC-2026_01");
        assert_eq!(
            usage_dir("SCC/2026 v1.2"),
            ".sluice-audit/usage/SCC%2F2026%20v1.2"
        );
        assert_eq!(usage_dir(".."), ".sluice-audit/usage/%2E.");
        assert_eq!(usage_dir("审"), ".sluice-audit/usage/%E5%AE%A1");
    }

    #[tokio::test]
    async fn usage_files_round_trip_on_a_volume() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::Volume(dir.path().to_owned());
        assert!(sink.read_usage("r/1").await.unwrap().is_empty());
        for (pod, bytes) in [("p-0", 5), ("p-1", 7), ("p-0", 9)] {
            let file = UsageFile {
                reference: "r/1".into(),
                pod: pod.into(),
                bytes,
                updated: "t".into(),
            };
            sink.write_usage(&file).await.unwrap();
        }
        let mut read = sink.read_usage("r/1").await.unwrap();
        read.sort_by(|a, b| a.pod.cmp(&b.pod));
        let counts: Vec<_> = read.iter().map(|f| (f.pod.as_str(), f.bytes)).collect();
        assert_eq!(counts, [("p-0", 9), ("p-1", 7)]);
    }
}
