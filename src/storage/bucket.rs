//! A bucket behind the gateway: the file semantics SFTP and FTP clients rely on, built on
//! an object store through OpenDAL.
//!
//! Contract:
//! - Keys are relative to the configured prefix, as with the volume: files are objects,
//!   directories end in `/`.
//! - Uploads go straight to their final key through a multipart writer
//!   ([`ObjectStore::writer`]): parts of [`UPLOAD_CHUNK`] bytes, at most
//!   [`UPLOAD_CONCURRENCY`] of them in flight. S3's PUT and CompleteMultipartUpload are
//!   atomic, so the object appears whole when the writer is closed or not at all; an
//!   aborted writer aborts its multipart upload, and one a crashed gateway leaves behind is
//!   invisible (it is not an object) until the bucket's lifecycle rule removes it. Memory
//!   per upload is bounded by [`UPLOAD_MEMORY`] (the part being filled and the parts in
//!   flight, 24 MiB).
//! - At most [`MAX_UPLOADS`] uploads run at once in one gateway process, whoever runs them:
//!   a writer needs an [`UploadSlot`] ([`ObjectStore::reserve_upload`]), held until the
//!   writer is closed, aborted or dropped, and none is waited for, so an upload beyond the
//!   bound is refused at once. Upload buffers thus never exceed `MAX_UPLOADS *
//!   UPLOAD_MEMORY` (768 MiB) however many connections, channels and handles clients open.
//! - Exclusive creation uses a conditional write (`If-None-Match: *`) where the service
//!   supports it, so of two uploads racing for one name exactly one completes. Without it
//!   the name is checked just before the upload completes, which two racing clients can
//!   both pass.
//! - A directory exists if its marker object (`dir/`) exists or any object lies under
//!   its prefix, so directories written by other S3 tools, with or without markers, are
//!   directories. `mkdir` writes a marker, so a directory it made outlives its last file;
//!   an implicit directory disappears with its last object, as it does for every S3 tool.
//! - A file renames by server-side copy and delete: the target appears whole (copies are
//!   atomic), and a failure between the two leaves both names. A directory renames only
//!   when it is empty (its marker moves); a non-empty one would need one copy per object
//!   and could be left half-moved, so it is refused ([`RenameRefusal::DirectoryNotEmpty`]).
//! - Listings page through the store (continuation tokens) and are complete however many
//!   objects a directory holds.
//! - Requests the store fails in a way worth retrying (5xx, throttling, a dropped
//!   connection) are retried up to [`RETRIES`] times with backoff before the client hears
//!   of it; each retry is logged at warn, reduced like any other error.
//! - Errors from the store are reduced to a [`StorageFault`] (operation, kind and the
//!   store's error code) before anyone logs them: OpenDAL's own messages carry the
//!   store's response body, which for a refused signature names the access key.

use std::fmt;
use std::time::SystemTime;

use std::time::Duration;

use std::sync::Arc;

use futures::TryStreamExt;
use opendal::layers::{RetryEvent, RetryInterceptor, RetryLayer};
use opendal::{EntryMode, ErrorKind, Metadata, Operator, Writer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::storage::object::{Credentials, ObjectStoreConfig, ObjectStoreError, build_operator};

/// Size of each part of a multipart upload.
pub const UPLOAD_CHUNK: usize = 8 * 1024 * 1024;

/// Parts of one upload sent at once.
pub const UPLOAD_CONCURRENCY: usize = 2;

/// Most memory one upload holds: the part being filled and the parts in flight.
pub const UPLOAD_MEMORY: usize = (UPLOAD_CONCURRENCY + 1) * UPLOAD_CHUNK;

/// Uploads one gateway process runs at once, so that upload buffers stay within
/// `MAX_UPLOADS * UPLOAD_MEMORY` (768 MiB).
pub const MAX_UPLOADS: usize = 32;

/// Retries of a request that failed temporarily.
pub const RETRIES: usize = 4;

/// A bucket (under its prefix) as the gateway serves it. Clones share one operator and
/// one bound on uploads.
#[derive(Clone, Debug)]
pub struct ObjectStore {
    operator: Operator,
    conditional_writes: bool,
    uploads: Arc<Semaphore>,
}

/// One of the [`MAX_UPLOADS`] places for an upload; the place is free again when this is
/// dropped.
#[derive(Debug)]
pub struct UploadSlot {
    _permit: OwnedSemaphorePermit,
}

/// What a key names in the store.
#[derive(Clone, Debug)]
pub enum Found {
    /// An object, with its metadata.
    File(Metadata),
    /// A directory (a marker, or objects under the prefix).
    Directory,
}

/// Why a rename was refused before anything was copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenameRefusal {
    /// The source does not exist.
    NotFound,
    /// The target exists and the rename may not replace it.
    Exists,
    /// The target is a directory and the source a file, or the reverse.
    KindMismatch,
    /// The source is a directory with entries.
    DirectoryNotEmpty,
}

/// The outcome of [`ObjectStore::rename`].
#[derive(Debug)]
pub enum RenameError {
    /// Refused before anything changed.
    Refused(RenameRefusal),
    /// The store failed.
    Store(opendal::Error),
}

impl From<opendal::Error> for RenameError {
    fn from(error: opendal::Error) -> Self {
        Self::Store(error)
    }
}

impl ObjectStore {
    /// The bucket `config` names, reached with `credentials`. Makes no request.
    pub fn open(
        config: &ObjectStoreConfig,
        credentials: &Credentials,
    ) -> Result<Self, ObjectStoreError> {
        Ok(Self::from_operator(build_operator(config, credentials)?))
    }

    /// Serves an operator built elsewhere (its root is the prefix), retrying what fails
    /// temporarily.
    pub fn from_operator(operator: Operator) -> Self {
        let retry = RetryLayer::new()
            .with_jitter()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(RETRIES)
            .with_notify(LogRetry);
        let operator = operator.layer(retry);
        let conditional_writes = operator.info().capability().write_with_if_not_exists;
        Self {
            operator,
            conditional_writes,
            uploads: Arc::new(Semaphore::new(MAX_UPLOADS)),
        }
    }

    /// The operator; keys are relative to the prefix.
    pub fn operator(&self) -> &Operator {
        &self.operator
    }

    /// What `key` (no trailing `/`; empty for the prefix root) names, if anything. A file
    /// wins over a directory of the same name.
    pub async fn stat(&self, key: &str) -> Result<Option<Found>, opendal::Error> {
        if key.is_empty() {
            return Ok(Some(Found::Directory));
        }
        match self.operator.stat(key).await {
            Ok(meta) if meta.mode() == EntryMode::FILE => return Ok(Some(Found::File(meta))),
            Ok(_) => return Ok(Some(Found::Directory)),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // OpenDAL answers a directory stat on S3 with a one-key listing of the prefix, so
        // a marker and an implicit directory are both found.
        match self.operator.stat(&format!("{key}/")).await {
            Ok(_) => Ok(Some(Found::Directory)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Starts listing the directory `key` (no trailing `/`; empty for the root).
    pub async fn list(&self, key: &str) -> Result<ObjectListing, opendal::Error> {
        let dir = dir_key(key);
        let lister = self.operator.lister(&dir).await?;
        Ok(ObjectListing { lister, dir })
    }

    /// Whether the directory `key` holds nothing but its own marker.
    pub async fn is_empty_dir(&self, key: &str) -> Result<bool, opendal::Error> {
        let dir = dir_key(key);
        let mut lister = self
            .operator
            .lister_with(&dir)
            .recursive(true)
            .limit(2)
            .await?;
        while let Some(entry) = lister.try_next().await? {
            if entry.path() != dir {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A place for one more upload, or `None` if [`MAX_UPLOADS`] are running.
    pub fn reserve_upload(&self) -> Option<UploadSlot> {
        let permit = self.uploads.clone().try_acquire_owned().ok()?;
        Some(UploadSlot { _permit: permit })
    }

    /// A writer for the object at `key`, for an upload that holds `_slot` for as long as
    /// the writer lives; with `exclusive`, completing it fails with `ConditionNotMatch` if
    /// the key exists by then (where the store can tell).
    pub async fn writer(
        &self,
        key: &str,
        exclusive: bool,
        _slot: &UploadSlot,
    ) -> Result<Writer, opendal::Error> {
        self.operator
            .writer_with(key)
            .chunk(UPLOAD_CHUNK)
            .concurrent(UPLOAD_CONCURRENCY)
            .if_not_exists(exclusive && self.conditional_writes)
            .await
    }

    /// Whether reads can be made conditional on an ETag (`If-Match`).
    pub fn has_conditional_reads(&self) -> bool {
        self.operator.info().capability().read_with_if_match
    }

    /// Whether exclusive writes are decided by the store itself.
    pub fn has_conditional_writes(&self) -> bool {
        self.conditional_writes
    }

    /// Renames `from` to `to` (keys without trailing `/`). A file is copied and then
    /// deleted; with `replace` an existing file at `to` is replaced, without it the rename
    /// is refused if anything is at `to`. A directory moves only if it is empty. Renaming an
    /// existing file or directory onto itself succeeds and changes nothing.
    pub async fn rename(&self, from: &str, to: &str, replace: bool) -> Result<(), RenameError> {
        let source = self.stat(from).await?;
        if source.is_some() && from == to {
            // Copying onto itself and deleting the source would delete the file.
            return Ok(());
        }
        let target = self.stat(to).await?;
        match (source, target) {
            (None, _) => Err(RenameError::Refused(RenameRefusal::NotFound)),
            (Some(Found::File(_)), Some(Found::Directory)) => {
                Err(RenameError::Refused(RenameRefusal::KindMismatch))
            }
            (Some(Found::File(_)), Some(Found::File(_))) if !replace => {
                Err(RenameError::Refused(RenameRefusal::Exists))
            }
            (Some(Found::File(_)), target) => {
                let exclusive = target.is_none() && !replace;
                self.copy_file(from, to, exclusive).await?;
                self.operator.delete(from).await?;
                Ok(())
            }
            (Some(Found::Directory), Some(_)) => Err(RenameError::Refused(RenameRefusal::Exists)),
            (Some(Found::Directory), None) => {
                if !self.is_empty_dir(from).await? {
                    return Err(RenameError::Refused(RenameRefusal::DirectoryNotEmpty));
                }
                self.operator.create_dir(&dir_key(to)).await?;
                self.operator.delete(&dir_key(from)).await?;
                Ok(())
            }
        }
    }

    async fn copy_file(&self, from: &str, to: &str, exclusive: bool) -> Result<(), RenameError> {
        let conditional = exclusive && self.operator.info().capability().copy_with_if_not_exists;
        match self
            .operator
            .copy_with(from, to)
            .if_not_exists(conditional)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::ConditionNotMatch => {
                Err(RenameError::Refused(RenameRefusal::Exists))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Logs a retry with only the safe part of its error.
struct LogRetry;

impl RetryInterceptor for LogRetry {
    fn intercept(&self, event: RetryEvent<'_>) {
        let fault = StorageFault::of(event.err);
        let (operation, attempt) = (event.op.into_static(), event.attempt);
        tracing::warn!(operation, attempt, %fault, "Retrying object store request");
    }
}

/// `key` as a directory key: ending in `/`, or empty for the root.
fn dir_key(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("{key}/")
    }
}

/// One entry of an object listing.
#[derive(Clone, Debug)]
pub struct ObjectEntry {
    /// Last component, without a trailing `/`.
    pub name: String,
    /// Whether it is a directory (a common prefix or a marker).
    pub is_dir: bool,
    /// Size of an object; 0 for directories.
    pub size: u64,
    /// Last modification of an object, if the listing says.
    pub modified: Option<SystemTime>,
}

/// An object listing in progress.
pub struct ObjectListing {
    lister: opendal::Lister,
    dir: String,
}

impl ObjectListing {
    /// The next entry, or `None` when the listing is complete. The directory's own
    /// marker is not an entry.
    pub async fn next(&mut self) -> Result<Option<ObjectEntry>, opendal::Error> {
        while let Some(entry) = self.lister.try_next().await? {
            if entry.path() == self.dir {
                continue;
            }
            let name = entry.name().trim_end_matches('/');
            if name.is_empty() {
                continue;
            }
            let meta = entry.metadata();
            let is_dir = meta.mode() == EntryMode::DIR;
            return Ok(Some(ObjectEntry {
                name: name.to_owned(),
                is_dir,
                size: if is_dir { 0 } else { meta.content_length() },
                modified: meta.last_modified().map(SystemTime::from),
            }));
        }
        Ok(None)
    }
}

/// What went wrong in the store, reduced to what is safe to log: the operation, OpenDAL's
/// error kind and the store's error code, never its message or response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageFault {
    /// OpenDAL's classification.
    pub kind: ErrorKind,
    /// The store's error code (`NoSuchBucket`, `InvalidAccessKeyId`, ...), if it sent one.
    pub code: Option<String>,
    /// Whether OpenDAL considers a retry worthwhile.
    pub temporary: bool,
}

impl StorageFault {
    /// The safe part of `error`.
    pub fn of(error: &opendal::Error) -> Self {
        Self {
            kind: error.kind(),
            code: error_code(error.message()),
            temporary: error.is_temporary(),
        }
    }
}

impl fmt::Display for StorageFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "object store error {}", self.kind)?;
        if let Some(code) = &self.code {
            write!(f, " ({code})")?;
        }
        if self.temporary {
            f.write_str(", temporary")?;
        }
        Ok(())
    }
}

impl std::error::Error for StorageFault {}

/// The S3 error code in an OpenDAL message, which renders the parsed error response as
/// `S3Error { code: "NoSuchBucket", ... }`. Only a plain identifier is taken.
fn error_code(message: &str) -> Option<String> {
    let (_, rest) = message.split_once("code: \"")?;
    let (code, _) = rest.split_once('"')?;
    let plain = !code.is_empty()
        && code.len() <= 64
        && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.');
    plain.then(|| code.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_error_code_is_kept_from_a_store_message() {
        let message = r#"S3Error { code: "InvalidAccessKeyId", message: "The AWS Access Key Id AKIDEXAMPLE you provided does not exist", resource: "", request_id: "1" }"#;
        let error = opendal::Error::new(ErrorKind::PermissionDenied, message);
        let fault = StorageFault::of(&error);
        assert_eq!(fault.code.as_deref(), Some("InvalidAccessKeyId"));
        assert_eq!(
            fault.to_string(),
            "object store error PermissionDenied (InvalidAccessKeyId)"
        );
        assert!(!format!("{fault:?}").contains("AKIDEXAMPLE"));
        assert_eq!(error_code(r#"code: "a b""#), None);
        assert_eq!(error_code("connection refused"), None);
    }

    #[test]
    fn directory_keys_end_in_a_slash_except_the_root() {
        assert_eq!(dir_key(""), "");
        assert_eq!(dir_key("a/b"), "a/b/");
    }
}
