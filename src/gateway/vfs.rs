//! The virtual filesystem every protocol front end serves: one user's view of the storage
//! (the volume or a bucket, [`Storage`]).
//!
//! Contract:
//! - A [`Vfs`] belongs to one session of one [`GatewayUser`]. The user's home directory on
//!   the volume is the `/` the client sees; [`Vfs::open`] creates it if it is missing.
//! - Client paths, absolute or relative, are normalised lexically by [`normalize`]: empty
//!   and `.` components and duplicate slashes vanish, and `..` removes the previous
//!   component but stops at `/`. Relative paths are relative to `/`: SFTP has no working
//!   directory (clients resolve their own against `REALPATH(".")`) and FTP front ends join
//!   their working directory before calling in. A normalised path cannot name anything
//!   outside the home.
//! - A path component that some backend would not keep as given is refused with
//!   [`VfsError::InvalidName`] ("invalid file name"), on every backend alike, before
//!   anything is checked or created: a backslash (SeaweedFS stores it as `/`, so
//!   `\.sluice-audit\x` would reach the audit log), control characters, Unicode
//!   noncharacters, whitespace at either end (OpenDAL trims it, so `"leaf "` would be
//!   checked as one file and opened as another) and a trailing dot
//!   ([`storage::name_problem`] has the rule). Every key is also checked to be exactly
//!   the key the storage will use ([`storage::is_faithful_key`]) before any check runs on
//!   it.
//! - Symbolic links are never followed (the volume only; buckets have none). The fs
//!   backend would follow them, so before a
//!   path is used every existing component of it, from the volume root down, is checked
//!   with `symlink_metadata` ([`storage::Volume::refuse_symlinks`]); a path through a link fails
//!   with [`VfsError::Symlink`] and links are left out of listings. Nothing a client can do
//!   creates a link, so only links planted on the volume by other means are at stake.
//! - The reserved names at the storage root ([`crate::storage::UPLOADS_DIR`],
//!   [`crate::storage::PROBE_DIR`], [`crate::storage::AUDIT_DIR`]) are neither listed nor
//!   reachable, even for a user
//!   whose home is the root.
//! - Every operation checks the user's [`Permission`]s before touching storage.
//! - Writes are gated here, for every front end alike: uploads (resumes included),
//!   deletes, renames, mkdir and rmdir are refused with [`VfsError::WritesSuspended`]
//!   while the residency stamp in force at that moment suspends writes (it follows
//!   configuration reloads, so sessions already logged in are gated too), and new uploads
//!   with [`VfsError::UploadRefused`] once a cross-border allowance's volume limit is used
//!   up. An upload running when writes are suspended is discarded when it closes, and its
//!   client told so. Reads, listings and stat are never gated.
//! - Every upload, download, delete, rename, mkdir and rmdir is recorded in the audit log
//!   ([`crate::gateway::audit`]), refused and failed ones included; a success is replied
//!   to only once its record is durable. While the audit log cannot take records,
//!   mutating operations and downloads are refused with [`VfsError::AuditUnavailable`]
//!   (transient). Uploads are hashed (SHA-256) as they stream, the kept start of a resumed
//!   upload included, so the record holds the hash of exactly what was stored.
//! - Uploads are streamed and atomic: on the volume a [`FileWriter`] writes to a temporary
//!   file in the upload directory and publishes it under its name on
//!   [`FileWriter::close`]; in a bucket it is a multipart upload to the final key, which
//!   the store makes visible only when it completes on close. Dropping a writer unclosed
//!   discards the upload. A bucket runs at most [`MAX_UPLOADS`] uploads at once per
//!   gateway process (see [`crate::storage::bucket`]); one more is refused at once with
//!   [`VfsError::TooManyUploads`], transient, rather than queued.
//! - Reads stream: a [`FileReader`] serves reads that continue where the previous one
//!   ended from one open stream (one GET), and restarts it where a client seeks. In a
//!   bucket every GET of a reader is conditional on the ETag the file had when it was
//!   opened (`If-Match`), where the store supports it, so a file replaced during a
//!   download fails with [`VfsError::Changed`] (transient) at the next restart rather than
//!   splicing two versions; the same holds for the kept start a resumed upload copies. On
//!   the volume a restart reads whatever file is under the name by then.
//! - Attributes a client sets (SETSTAT: modes, owners, times) are not stored; front ends
//!   accept and ignore them, except a change of size, which the SFTP front end refuses.
//! - A resumed upload ([`Vfs::resume`]: FTP `REST` + `STOR`, `APPE`) is an upload like any
//!   other: the kept start of the existing file is copied into the temporary file first,
//!   the client's bytes follow, and the whole replaces the file on close. Readers see the
//!   old file or the complete new one, never a file growing; an interrupted resume leaves
//!   the file as it was. The copy costs a read and a write of the kept bytes. If the file
//!   is replaced by someone else meanwhile, the last upload to close wins, as for uploads
//!   without resume.
//! - Exclusive creation ([`WriteMode::CreateNew`]) and [`Vfs::rename`] never replace
//!   anything, and on the volume this is decided by the final move itself
//!   ([`storage::Volume::publish`], [`storage::Volume::rename`]), not by a check before it: of two clients
//!   racing for one name, exactly one succeeds. In a bucket a conditional write decides
//!   exclusive creation the same way; a plain rename there checks the target and then
//!   copies conditionally. An exclusive upload whose name was taken while it was being
//!   written fails on close. [`Vfs::rename_replacing`] replaces a file at the target.
//!   Either rename onto the source's own name succeeds without touching storage once the
//!   source is found (in a bucket the copy-then-delete would otherwise delete it).
//! - Directories in a bucket are marker objects or prefixes with objects under them; a
//!   non-empty directory cannot be renamed there ([`VfsError::DirectoryRename`]). The home
//!   is always a directory, even once a home that was only a prefix has lost its last
//!   object.
//! - Errors are one enum, [`VfsError`]; [`VfsError::reply`] tells a front end which
//!   protocol reply to send, and its message never contains a storage path. An object
//!   store that fails or refuses the gateway is [`VfsError::Unavailable`], transient, and
//!   carries only a [`StorageFault`], safe to log.

use std::collections::BTreeSet;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;
use opendal::{EntryMode, ErrorKind, Metadata, Operator};
use sha2::{Digest, Sha256};
use sync_wrapper::SyncWrapper;

use crate::api::Permission;
use crate::gateway::audit::{Entry as AuditEntry, Operation, SessionLog};
use crate::gateway::config::GatewayUser;
use crate::storage::bucket::{
    Found, MAX_UPLOADS, ObjectStore, RenameError, RenameRefusal, StorageFault, UploadSlot,
};
use crate::storage::{self, ListError, ListedEntry, ListedKind, Listing, Storage, StorageError};

/// Why an operation failed. The message is safe to send to the client.
#[derive(Debug, thiserror::Error)]
pub enum VfsError {
    /// The path does not exist.
    #[error("no such file or directory")]
    NotFound,
    /// The user lacks the permission the operation needs.
    #[error("permission denied: the {0:?} permission is not granted")]
    Denied(Permission),
    /// The path passes through a symbolic link.
    #[error("permission denied: symbolic links are not followed")]
    Symlink,
    /// The target of a create, mkdir or rename already exists.
    #[error("file or directory already exists")]
    AlreadyExists,
    /// A directory was expected.
    #[error("not a directory")]
    NotADirectory,
    /// A file was expected.
    #[error("is a directory")]
    IsADirectory,
    /// The directory to remove has entries.
    #[error("directory not empty")]
    NotEmpty,
    /// The home directory itself cannot be created, removed or renamed.
    #[error("the home directory cannot be changed")]
    Home,
    /// The path moves a directory into itself, or names a key the storage would change.
    #[error("invalid path")]
    InvalidPath,
    /// A component of the path is a name the storage cannot keep as given.
    #[error("invalid file name: {0}")]
    InvalidName(#[from] storage::NameProblem),
    /// The user's home directory is not usable.
    #[error("home directory {0} is reserved")]
    ReservedHome(String),
    /// A resumed upload asked to keep more bytes than the file has.
    #[error("cannot resume at byte {offset}: the file has {size} bytes")]
    BeyondEnd {
        /// Bytes to keep that were asked for.
        offset: u64,
        /// Bytes the file has.
        size: u64,
    },
    /// Like [`VfsError::BeyondEnd`], for a user who may not read the file and so is not
    /// told its size.
    #[error("cannot resume at byte {offset}: the file is shorter")]
    BeyondEndOfUnreadable {
        /// Bytes to keep that were asked for.
        offset: u64,
    },
    /// An upload wrote somewhere other than where the previous write ended.
    #[error("uploads must be written sequentially (expected offset {expected}, got {got})")]
    NonSequentialWrite {
        /// Where the next write had to start.
        expected: u64,
        /// Where it started.
        got: u64,
    },
    /// The storage reported an error.
    #[error("storage operation failed")]
    Storage(#[source] opendal::Error),
    /// The volume could not be inspected directly (link checks, directory listings).
    #[error("storage operation failed")]
    Volume(#[source] StorageError),
    /// The object store failed or refused the gateway (missing bucket, refused
    /// credentials, unreachable endpoint): nothing the client can fix, worth a retry.
    #[error("storage temporarily unavailable")]
    Unavailable(#[source] StorageFault),
    /// A directory with entries cannot be renamed on an object store.
    #[error("directories that are not empty cannot be renamed on object storage")]
    DirectoryRename,
    /// The file was replaced while it was being read: what was read belongs to the old
    /// version, the rest would come from the new one.
    #[error("the file was replaced while it was being read; read it again")]
    Changed,
    /// As many uploads to the object store as the gateway runs at once are in progress.
    #[error("too many uploads in progress on this server (at most {MAX_UPLOADS}); try again later")]
    TooManyUploads,
    /// The server's residency stamp suspends writes (the message says why).
    #[error("{0}")]
    WritesSuspended(String),
    /// A cross-border allowance's volume limit is used up (the message names it).
    #[error("{0}")]
    UploadRefused(String),
    /// The audit log cannot take records: nothing that would go unrecorded is done.
    #[error("audit log unavailable; try again later")]
    AuditUnavailable,
}

/// The protocol-independent reply an error maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The file or directory does not exist (SFTP `NO_SUCH_FILE`, FTP 550).
    NotFound,
    /// The user may not do this (SFTP `PERMISSION_DENIED`, FTP 550).
    PermissionDenied,
    /// The request cannot be served as made (SFTP `OP_UNSUPPORTED`, FTP 504).
    Unsupported,
    /// Anything else (SFTP `FAILURE`, FTP 550, or 450 when [`VfsError::is_transient`]).
    Failure,
}

impl VfsError {
    /// The reply a front end sends for this error.
    pub fn reply(&self) -> Reply {
        match self {
            Self::NotFound => Reply::NotFound,
            Self::Denied(_)
            | Self::Symlink
            | Self::ReservedHome(_)
            | Self::WritesSuspended(_)
            | Self::UploadRefused(_) => Reply::PermissionDenied,
            Self::NonSequentialWrite { .. } => Reply::Unsupported,
            _ => Reply::Failure,
        }
    }

    /// Whether retrying later may succeed (a storage hiccup rather than a bad request).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Storage(e) if e.is_temporary())
            || matches!(
                self,
                Self::Unavailable(_)
                    | Self::TooManyUploads
                    | Self::Changed
                    | Self::AuditUnavailable
            )
    }

    /// Whether the gateway refused the operation (rather than trying it and failing): the
    /// audit log records it as `denied`.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::Denied(_)
                | Self::Symlink
                | Self::ReservedHome(_)
                | Self::InvalidName(_)
                | Self::WritesSuspended(_)
                | Self::UploadRefused(_)
                | Self::AuditUnavailable
        )
    }

    /// Whether the error is the storage's or the gateway's fault rather than the
    /// request's; front ends log these as warnings.
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            Self::Storage(_)
                | Self::Volume(_)
                | Self::Unavailable(_)
                | Self::TooManyUploads
                | Self::AuditUnavailable
        )
    }

    fn from_storage(error: opendal::Error) -> Self {
        match error.kind() {
            ErrorKind::NotFound => Self::NotFound,
            ErrorKind::AlreadyExists | ErrorKind::ConditionNotMatch => Self::AlreadyExists,
            ErrorKind::IsADirectory => Self::IsADirectory,
            ErrorKind::NotADirectory => Self::NotADirectory,
            _ => Self::Storage(error),
        }
    }

    /// An object store's error. Anything but a missing object or a failed condition is
    /// the store's problem, not the request's, and keeps only what is safe to log.
    fn from_object_store(error: opendal::Error) -> Self {
        match error.kind() {
            ErrorKind::NotFound => Self::NotFound,
            ErrorKind::AlreadyExists | ErrorKind::ConditionNotMatch => Self::AlreadyExists,
            ErrorKind::IsADirectory => Self::IsADirectory,
            ErrorKind::NotADirectory => Self::NotADirectory,
            _ => Self::Unavailable(StorageFault::of(&error)),
        }
    }

    fn from_backend(object_store: bool, error: opendal::Error) -> Self {
        if object_store {
            Self::from_object_store(error)
        } else {
            Self::from_storage(error)
        }
    }

    /// An error reading a file that was opened pinned to one version: a failed condition
    /// means the file is not that version any more.
    fn from_read(object_store: bool, error: opendal::Error) -> Self {
        match error.kind() {
            ErrorKind::ConditionNotMatch if object_store => Self::Changed,
            _ => Self::from_backend(object_store, error),
        }
    }

    fn from_rename(error: RenameError) -> Self {
        match error {
            RenameError::Refused(RenameRefusal::NotFound) => Self::NotFound,
            RenameError::Refused(RenameRefusal::Exists) => Self::AlreadyExists,
            RenameError::Refused(RenameRefusal::KindMismatch) => Self::IsADirectory,
            RenameError::Refused(RenameRefusal::DirectoryNotEmpty) => Self::DirectoryRename,
            RenameError::Store(error) => Self::from_object_store(error),
        }
    }

    fn from_list(error: ListError) -> Self {
        match error {
            ListError::Volume(error) => Self::from_volume(error),
            ListError::Object(error) => Self::from_object_store(error),
        }
    }

    fn from_volume(error: StorageError) -> Self {
        use std::io::ErrorKind as Io;
        match (&error, error.io_kind()) {
            (StorageError::Symlink { .. }, _) => Self::Symlink,
            (StorageError::Exists { .. }, _) => Self::AlreadyExists,
            (StorageError::Move { .. }, Some(Io::NotFound)) => Self::NotFound,
            (StorageError::Move { .. }, Some(Io::IsADirectory)) => Self::IsADirectory,
            (StorageError::Move { .. }, Some(Io::NotADirectory)) => Self::NotADirectory,
            // A directory's new name was reserved and then filled by someone else.
            (StorageError::Move { .. }, Some(Io::DirectoryNotEmpty)) => Self::AlreadyExists,
            _ => Self::Volume(error),
        }
    }
}

/// Normalises a client path to an absolute path inside the home: `""`, `"."` and `"/"`
/// give `/`; `"a/../b"` gives `/b`; `"../../etc"` gives `/etc`. Fails with
/// [`VfsError::InvalidName`] on a component the storage cannot keep as given
/// ([`storage::name_problem`]), even one a later `..` would remove.
pub fn normalize(path: &str) -> Result<String, VfsError> {
    let mut components: Vec<&str> = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                components.pop();
            }
            name => match storage::name_problem(name) {
                Some(problem) => return Err(VfsError::InvalidName(problem)),
                None => components.push(name),
            },
        }
    }
    Ok(format!("/{}", components.join("/")))
}

/// What kind of thing an [`Entry`] is. Other kinds (links, sockets) are never shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
}

/// A file or directory as a client sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Last component of the path (`/` for the home directory itself).
    pub name: String,
    /// File or directory.
    pub kind: EntryKind,
    /// Size in bytes (0 for directories).
    pub size: u64,
    /// Last modification, if the storage knows it.
    pub modified: Option<SystemTime>,
}

impl Entry {
    fn from_metadata(name: &str, meta: &Metadata) -> Option<Self> {
        let kind = match meta.mode() {
            EntryMode::FILE => EntryKind::File,
            EntryMode::DIR => EntryKind::Directory,
            _ => return None,
        };
        Some(Self {
            name: name.to_owned(),
            kind,
            size: if kind == EntryKind::File {
                meta.content_length()
            } else {
                0
            },
            modified: meta.last_modified().map(SystemTime::from),
        })
    }

    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        self.kind == EntryKind::Directory
    }
}

/// How [`Vfs::create`] treats an existing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// Replace it (atomically, when the upload completes).
    Replace,
    /// Fail with [`VfsError::AlreadyExists`].
    CreateNew,
}

/// Where a resumed upload ([`Vfs::resume`]) continues the existing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeAt {
    /// After its first bytes, this many (FTP `REST` + `STOR`); the file must have them.
    Offset(u64),
    /// After its last byte, or at the start if there is no file yet (FTP `APPE`).
    End,
}

/// How an upload starts: what [`Vfs::check_upload`] checks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadStart {
    /// As a new file ([`Vfs::create`]).
    New(WriteMode),
    /// Keeping the start of the existing file ([`Vfs::resume`]).
    Resume(ResumeAt),
}

/// An upload that passed its checks: where it goes, how, and for a resume the version of
/// the file whose start it keeps and how many bytes of it.
struct UploadPlan {
    target: Target,
    mode: WriteMode,
    keep: Option<(Version, u64)>,
}

/// One version of a file: what reading it needs to know.
#[derive(Clone, Debug, Default)]
struct Version {
    size: u64,
    /// Its ETag, in a bucket that reports one.
    etag: Option<String>,
}

/// Bytes copied at a time when a resumed upload keeps the start of a file.
const COPY_CHUNK: u64 = 1024 * 1024;

/// A path resolved for one user: what the client calls it and where it is on the volume.
#[derive(Clone, Debug)]
struct Target {
    /// Normalised client path, starting with `/`.
    path: String,
    /// Key relative to the volume root, no leading or trailing `/`; empty for the root.
    key: String,
}

impl Target {
    fn is_home(&self) -> bool {
        self.path == "/"
    }

    fn name(&self) -> &str {
        self.path
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .unwrap_or("/")
    }

    /// Key as OpenDAL wants it for a directory: ending in `/`.
    fn dir_key(&self) -> String {
        format!("{}/", self.key)
    }
}

/// One session's view of the storage, confined to one user's home. Cheap to clone.
#[derive(Clone)]
pub struct Vfs {
    storage: Storage,
    user: String,
    home: String,
    permissions: BTreeSet<Permission>,
    log: SessionLog,
}

impl Vfs {
    /// Opens `user`'s view of `storage`, creating the home directory if it is missing, and
    /// recording its operations in `log`. An object store that cannot be reached does not
    /// stop the login: every request then fails with [`VfsError::Unavailable`] until it is
    /// back.
    pub async fn open(
        storage: impl Into<Storage>,
        user: &GatewayUser,
        log: &SessionLog,
    ) -> Result<Self, VfsError> {
        let storage = storage.into();
        let home = normalize(&user.home)?.trim_start_matches('/').to_owned();
        if !storage::is_faithful_key(&home) {
            return Err(VfsError::InvalidPath);
        }
        if storage::is_reserved(&home) {
            return Err(VfsError::ReservedHome(user.home.clone()));
        }
        match &storage {
            Storage::Volume(volume) => {
                volume
                    .refuse_symlinks(&home)
                    .await
                    .map_err(VfsError::from_volume)?;
                if !home.is_empty() {
                    volume
                        .operator()
                        .create_dir(&format!("{home}/"))
                        .await
                        .map_err(VfsError::from_storage)?;
                }
            }
            Storage::Object(store) => match create_home(store, &home).await {
                Err(VfsError::Unavailable(fault)) => {
                    tracing::warn!(%fault, "Object store unavailable at login");
                }
                other => other?,
            },
        }

        Ok(Self {
            storage,
            user: user.name.clone(),
            home,
            permissions: user.permissions.iter().copied().collect(),
            log: log.for_user(&user.name),
        })
    }

    /// Name of the user this view belongs to.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Whether the user holds `permission`.
    pub fn allows(&self, permission: Permission) -> bool {
        self.permissions.contains(&permission)
    }

    /// The normalised form of `path` (SFTP `REALPATH`). Needs no permission and does not
    /// touch storage.
    pub fn resolve(&self, path: &str) -> Result<String, VfsError> {
        normalize(path)
    }

    /// Attributes of a file or directory. Needs `list` or `read`.
    pub async fn stat(&self, path: &str) -> Result<Entry, VfsError> {
        if !self.allows(Permission::List) {
            self.require(Permission::Read)?;
        }
        let target = self.locate(path).await?;
        self.entry(&target).await
    }

    /// Starts listing a directory. Needs `list`.
    pub async fn list(&self, path: &str) -> Result<DirStream, VfsError> {
        self.require(Permission::List)?;
        let target = self.locate(path).await?;
        if !self.entry(&target).await?.is_dir() {
            return Err(VfsError::NotADirectory);
        }

        let listing = match &self.storage {
            Storage::Volume(volume) => volume
                .list(&target.key)
                .await
                .map_err(VfsError::from_volume)?,
            Storage::Object(store) => Listing::Object(
                store
                    .list(&target.key)
                    .await
                    .map_err(VfsError::from_object_store)?,
            ),
        };
        Ok(DirStream {
            listing,
            hide_reserved: target.key.is_empty(),
        })
    }

    /// Opens a file for reading at any offset. Needs `read`. The download is recorded when
    /// the reader is finished ([`FileReader::finish`]) or dropped; a refusal at once.
    pub async fn open_read(&self, path: &str) -> Result<FileReader, VfsError> {
        let opened = self.open_read_unaudited(path).await;
        if let Err(error) = &opened {
            let entry = AuditEntry::new(Operation::Download).path(shown(path));
            self.log.note(outcome(entry, error)).await;
        }
        opened
    }

    async fn open_read_unaudited(&self, path: &str) -> Result<FileReader, VfsError> {
        self.require(Permission::Read)?;
        self.require_audit()?;
        let target = self.locate(path).await?;
        let version = self.version(&target).await?;

        let reader = self.pinned_reader(&target.key, &version).await?;
        Ok(FileReader {
            reader,
            stream: None,
            object_store: self.storage.is_object_store(),
            path: target.path,
            size: version.size,
            bytes_read: 0,
            log: self.log.clone(),
            finished: false,
            failure: None,
        })
    }

    /// The file at `target`, as it is now.
    async fn version(&self, target: &Target) -> Result<Version, VfsError> {
        let store = match &self.storage {
            Storage::Volume(_) => {
                let entry = self.entry(target).await?;
                if entry.is_dir() {
                    return Err(VfsError::IsADirectory);
                }
                let size = entry.size;
                return Ok(Version { size, etag: None });
            }
            Storage::Object(store) => store,
        };
        match store
            .stat(&target.key)
            .await
            .map_err(VfsError::from_object_store)?
        {
            Some(Found::File(meta)) => Ok(Version {
                size: meta.content_length(),
                etag: meta.etag().map(str::to_owned),
            }),
            Some(Found::Directory) => Err(VfsError::IsADirectory),
            None if target.is_home() => Err(VfsError::IsADirectory),
            None => Err(VfsError::NotFound),
        }
    }

    /// A reader of `key` that reads only `version` where the store can tell versions
    /// apart: every request it makes is conditional on the ETag, so a file replaced
    /// meanwhile fails to read ([`VfsError::Changed`]) instead of mixing two versions.
    async fn pinned_reader(
        &self,
        key: &str,
        version: &Version,
    ) -> Result<opendal::Reader, VfsError> {
        let pin = match &self.storage {
            Storage::Object(store) if store.has_conditional_reads() => version.etag.as_deref(),
            _ => None,
        };
        let mut reader = self.operator().reader_with(key);
        if let Some(etag) = pin {
            reader = reader.if_match(etag);
        }
        reader.await.map_err(|e| self.storage_error(e))
    }

    /// Starts an upload to `path`; the file appears only when the returned writer is
    /// closed. The parent directory must exist. Needs `write`, writes not suspended and no
    /// volume limit used up.
    pub async fn create(&self, path: &str, mode: WriteMode) -> Result<FileWriter, VfsError> {
        let started = self.start_unaudited(path, UploadStart::New(mode)).await;
        self.upload_started(path, started).await
    }

    /// Starts an upload to `path` that keeps the start of the existing file, up to where
    /// `at` says: those bytes are copied into the upload's temporary file, and the writer
    /// continues after them ([`FileWriter::bytes_written`] says where). As with
    /// [`Vfs::create`] and [`WriteMode::Replace`], the file changes only when the writer is
    /// closed. Needs `write` only, as a whole upload would: the kept bytes are never shown
    /// to the client.
    pub async fn resume(&self, path: &str, at: ResumeAt) -> Result<FileWriter, VfsError> {
        let started = self.start_unaudited(path, UploadStart::Resume(at)).await;
        self.upload_started(path, started).await
    }

    /// Whether an upload to `path` would start now, as [`Vfs::create`] or [`Vfs::resume`]
    /// (as `start` says) would start it: runs exactly their checks (permission, write
    /// gate, audit log, path, parent directory, existing file, resume offset, a free
    /// upload place in an object store) without staging, copying or reserving anything.
    /// For a protocol that must answer before the upload's data arrives (FTP's `150`).
    ///
    /// A refused upload is recorded here, as those record it; one that passes is recorded
    /// by the [`Vfs::create`] or [`Vfs::resume`] that follows, which checks again and
    /// decides: the write gate and the upload places may change in between.
    pub async fn check_upload(&self, path: &str, start: UploadStart) -> Result<(), VfsError> {
        let checked = self.check_unaudited(path, start).await;
        self.upload_started(path, checked).await
    }

    async fn check_unaudited(&self, path: &str, start: UploadStart) -> Result<(), VfsError> {
        self.plan_upload(path, start).await?;
        match &self.storage {
            Storage::Object(store) => upload_slot(store).map(drop),
            Storage::Volume(_) => Ok(()),
        }
    }

    /// Records an upload that could not start (or would not); one that did is recorded
    /// when it ends.
    async fn upload_started<T>(
        &self,
        path: &str,
        started: Result<T, VfsError>,
    ) -> Result<T, VfsError> {
        if let Err(error) = &started {
            let entry = AuditEntry::new(Operation::Upload).path(shown(path));
            self.log.note(outcome(entry, error)).await;
        }
        started
    }

    async fn start_unaudited(
        &self,
        path: &str,
        start: UploadStart,
    ) -> Result<FileWriter, VfsError> {
        let plan = self.plan_upload(path, start).await?;
        let key = plan.target.key.clone();
        let mut writer = self.stage(plan.target, plan.mode).await?;
        let Some((version, keep)) = plan.keep else {
            return Ok(writer);
        };
        if keep > 0
            && let Err(error) = self.copy_prefix(&key, &version, keep, &mut writer).await
        {
            // Recorded as the upload that could not start.
            writer.finished = true;
            let _ = writer.abort().await;
            return Err(error);
        }
        writer.kept = keep;
        Ok(writer)
    }

    /// Every check an upload must pass before it is staged, and what staging it needs.
    async fn plan_upload(&self, path: &str, start: UploadStart) -> Result<UploadPlan, VfsError> {
        self.require(Permission::Write)?;
        self.require_upload()?;
        let target = self.locate(path).await?;
        if target.is_home() {
            return Err(VfsError::IsADirectory);
        }
        self.require_parent_dir(&target).await?;

        match start {
            UploadStart::New(mode) => {
                match self.entry(&target).await {
                    Ok(entry) if entry.is_dir() => return Err(VfsError::IsADirectory),
                    Ok(_) if mode == WriteMode::CreateNew => return Err(VfsError::AlreadyExists),
                    Ok(_) | Err(VfsError::NotFound) => {}
                    Err(other) => return Err(other),
                }
                Ok(UploadPlan {
                    target,
                    mode,
                    keep: None,
                })
            }
            UploadStart::Resume(at) => {
                let version = match self.version(&target).await {
                    Ok(version) => version,
                    Err(VfsError::NotFound) => Version::default(),
                    Err(other) => return Err(other),
                };
                let size = version.size;
                let keep = match at {
                    ResumeAt::End => size,
                    ResumeAt::Offset(offset) if offset <= size => offset,
                    ResumeAt::Offset(offset) => return Err(self.beyond_end(offset, size)),
                };
                Ok(UploadPlan {
                    target,
                    mode: WriteMode::Replace,
                    keep: Some((version, keep)),
                })
            }
        }
    }

    /// Why a resume at `offset` of a file of `size` bytes is refused, naming the size only
    /// to a user who may read the file.
    fn beyond_end(&self, offset: u64, size: u64) -> VfsError {
        match self.require(Permission::Read) {
            Ok(()) => VfsError::BeyondEnd { offset, size },
            Err(_) => VfsError::BeyondEndOfUnreadable { offset },
        }
    }

    /// Copies the first `keep` bytes of `version` of the file at `key` into `writer`.
    async fn copy_prefix(
        &self,
        key: &str,
        version: &Version,
        keep: u64,
        writer: &mut FileWriter,
    ) -> Result<(), VfsError> {
        let object_store = self.storage.is_object_store();
        let reader = self.pinned_reader(key, version).await?;
        while writer.bytes_written < keep {
            let start = writer.bytes_written;
            let end = keep.min(start + COPY_CHUNK);
            let chunk = reader
                .read(start..end)
                .await
                .map_err(|e| VfsError::from_read(object_store, e))?
                .to_vec();
            if chunk.is_empty() {
                // Replaced by a shorter file since its size was read.
                return Err(self.beyond_end(keep, start));
            }
            writer.write_at(start, chunk).await?;
        }
        Ok(())
    }

    /// An upload to `target`: through a fresh temporary file on the volume, straight to
    /// its key (as a multipart upload) in an object store.
    async fn stage(&self, target: Target, mode: WriteMode) -> Result<FileWriter, VfsError> {
        let (writer, publish, slot) = match &self.storage {
            Storage::Volume(volume) => {
                let staged = storage::staging_key();
                let writer = volume
                    .operator()
                    .writer(&staged)
                    .await
                    .map_err(VfsError::from_storage)?;
                let publish = Publish::Staged {
                    volume: volume.clone(),
                    staged,
                };
                (writer, publish, None)
            }
            Storage::Object(store) => {
                let slot = upload_slot(store)?;
                let exclusive = mode == WriteMode::CreateNew;
                let writer = store
                    .writer(&target.key, exclusive, &slot)
                    .await
                    .map_err(VfsError::from_object_store)?;
                let publish = Publish::Direct {
                    store: store.clone(),
                    check_first: exclusive && !store.has_conditional_writes(),
                };
                (writer, publish, Some(slot))
            }
        };
        Ok(FileWriter {
            writer: Some(writer),
            slot,
            publish,
            key: target.key,
            mode,
            path: target.path,
            bytes_written: 0,
            kept: 0,
            sha256: Sha256::new(),
            log: self.log.clone(),
            finished: false,
            failure: None,
        })
    }

    /// Creates a directory whose parent exists. Needs `mkdir` and writes not suspended.
    pub async fn mkdir(&self, path: &str) -> Result<(), VfsError> {
        let entry = AuditEntry::new(Operation::Mkdir).path(shown(path));
        let made = self.mkdir_unaudited(path).await;
        self.audited(entry, made).await
    }

    async fn mkdir_unaudited(&self, path: &str) -> Result<(), VfsError> {
        self.require(Permission::Mkdir)?;
        self.require_writable()?;
        let target = self.locate(path).await?;
        if target.is_home() {
            return Err(VfsError::AlreadyExists);
        }
        self.require_parent_dir(&target).await?;
        if self.exists(&target).await? {
            return Err(VfsError::AlreadyExists);
        }

        self.operator()
            .create_dir(&target.dir_key())
            .await
            .map_err(|e| self.storage_error(e))
    }

    /// Removes an empty directory. Needs `delete` and writes not suspended.
    pub async fn rmdir(&self, path: &str) -> Result<(), VfsError> {
        let entry = AuditEntry::new(Operation::Rmdir).path(shown(path));
        let removed = self.rmdir_unaudited(path).await;
        self.audited(entry, removed).await
    }

    async fn rmdir_unaudited(&self, path: &str) -> Result<(), VfsError> {
        self.require(Permission::Delete)?;
        self.require_writable()?;
        let target = self.locate(path).await?;
        if target.is_home() {
            return Err(VfsError::Home);
        }
        if !self.entry(&target).await?.is_dir() {
            return Err(VfsError::NotADirectory);
        }
        if !self.is_empty_dir(&target).await? {
            return Err(VfsError::NotEmpty);
        }

        self.operator()
            .delete(&target.dir_key())
            .await
            .map_err(|e| self.storage_error(e))
    }

    /// Removes a file. Needs `delete` and writes not suspended.
    pub async fn remove(&self, path: &str) -> Result<(), VfsError> {
        let entry = AuditEntry::new(Operation::Delete).path(shown(path));
        let removed = self.remove_unaudited(path).await;
        self.audited(entry, removed).await
    }

    async fn remove_unaudited(&self, path: &str) -> Result<(), VfsError> {
        self.require(Permission::Delete)?;
        self.require_writable()?;
        let target = self.locate(path).await?;
        // Looked up first: OpenDAL reports deleting a missing file as success.
        if self.entry(&target).await?.is_dir() {
            return Err(VfsError::IsADirectory);
        }

        self.operator()
            .delete(&target.key)
            .await
            .map_err(|e| self.storage_error(e))
    }

    /// Renames or moves a file or directory. Fails with [`VfsError::AlreadyExists`] if
    /// `to` exists: this is the plain (non-overwriting) rename. Needs `rename`.
    pub async fn rename(&self, from: &str, to: &str) -> Result<(), VfsError> {
        self.move_entry(from, to, false).await
    }

    /// Renames like [`Vfs::rename`], but replaces a file at `to` (SFTP's
    /// `posix-rename@openssh.com`). On the volume this is one `rename(2)`; in an object
    /// store the file is copied over the target (readers see the old or the new one) and
    /// then deleted. Needs `rename`, and `write` too if it replaces a file.
    pub async fn rename_replacing(&self, from: &str, to: &str) -> Result<(), VfsError> {
        self.move_entry(from, to, true).await
    }

    async fn move_entry(&self, from: &str, to: &str, replace: bool) -> Result<(), VfsError> {
        let entry = AuditEntry::new(Operation::Rename)
            .path(shown(from))
            .target(shown(to));
        let moved = self.move_unaudited(from, to, replace).await;
        self.audited(entry, moved).await
    }

    async fn move_unaudited(&self, from: &str, to: &str, replace: bool) -> Result<(), VfsError> {
        self.require(Permission::Rename)?;
        self.require_writable()?;
        let source = self.locate(from).await?;
        let destination = self.locate(to).await?;
        if source.is_home() || destination.is_home() {
            return Err(VfsError::Home);
        }
        if destination.path.starts_with(&format!("{}/", source.path)) {
            return Err(VfsError::InvalidPath);
        }

        self.entry(&source).await?;
        // A move onto itself changes nothing, as with rename(2); in a bucket the copy and
        // delete it would take delete the file.
        if source.key == destination.key {
            return Ok(());
        }
        self.require_parent_dir(&destination).await?;
        if replace && !self.allows(Permission::Write) && self.exists(&destination).await? {
            return Err(VfsError::Denied(Permission::Write));
        }
        match &self.storage {
            // Not through OpenDAL, whose rename replaces: the volume's rename fails by
            // itself if the destination exists, however close two clients race for it.
            Storage::Volume(volume) if replace => volume
                .rename_replacing(&source.key, &destination.key)
                .await
                .map_err(VfsError::from_volume),
            Storage::Volume(volume) => volume
                .rename(&source.key, &destination.key)
                .await
                .map_err(VfsError::from_volume),
            Storage::Object(store) => store
                .rename(&source.key, &destination.key, replace)
                .await
                .map_err(VfsError::from_rename),
        }
    }

    fn operator(&self) -> &Operator {
        self.storage.operator()
    }

    fn storage_error(&self, error: opendal::Error) -> VfsError {
        VfsError::from_backend(self.storage.is_object_store(), error)
    }

    fn require(&self, permission: Permission) -> Result<(), VfsError> {
        if self.allows(permission) {
            Ok(())
        } else {
            Err(VfsError::Denied(permission))
        }
    }

    /// Fails unless the audit log takes records: nothing is done that would go unrecorded.
    fn require_audit(&self) -> Result<(), VfsError> {
        match self.log.available() {
            true => Ok(()),
            false => Err(VfsError::AuditUnavailable),
        }
    }

    /// Fails if the residency stamp in force now suspends writes, or the audit log is
    /// unavailable.
    fn require_writable(&self) -> Result<(), VfsError> {
        if let Some(reason) = self.log.writes_refused() {
            return Err(VfsError::WritesSuspended(reason));
        }
        self.require_audit()
    }

    /// Like [`Vfs::require_writable`], and fails if a volume limit is used up.
    fn require_upload(&self) -> Result<(), VfsError> {
        self.require_writable()?;
        match self.log.upload_refused() {
            Some(reason) => Err(VfsError::UploadRefused(reason)),
            None => Ok(()),
        }
    }

    /// Records the operation `entry` describes: a success once it is durable (or the
    /// client is told the audit log is unavailable), a failure or refusal with its reason.
    async fn audited<T>(
        &self,
        entry: AuditEntry,
        result: Result<T, VfsError>,
    ) -> Result<T, VfsError> {
        match result {
            Ok(value) => {
                durable(&self.log, entry).await?;
                Ok(value)
            }
            Err(error) => {
                self.log.note(outcome(entry, &error)).await;
                Err(error)
            }
        }
    }

    /// Normalises `path`, maps it onto the volume and checks it for links.
    async fn locate(&self, path: &str) -> Result<Target, VfsError> {
        let target = self.target(normalize(path)?);
        // What follows checks the key on the volume; it must be the key OpenDAL opens.
        // `normalize` already refuses what OpenDAL would change; this keeps it so.
        if !storage::is_faithful_key(&target.key) {
            return Err(VfsError::InvalidPath);
        }
        if storage::is_reserved(&target.key) {
            return Err(VfsError::NotFound);
        }
        if let Storage::Volume(volume) = &self.storage {
            volume
                .refuse_symlinks(&target.key)
                .await
                .map_err(VfsError::from_volume)?;
        }
        Ok(target)
    }

    fn target(&self, path: String) -> Target {
        let relative = path.trim_start_matches('/');
        let key = match (self.home.is_empty(), relative.is_empty()) {
            (true, _) => relative.to_owned(),
            (false, true) => self.home.clone(),
            (false, false) => format!("{}/{relative}", self.home),
        };
        Target { path, key }
    }

    async fn entry(&self, target: &Target) -> Result<Entry, VfsError> {
        let store = match &self.storage {
            Storage::Volume(volume) => {
                let meta = volume
                    .operator()
                    .stat(&target.key)
                    .await
                    .map_err(VfsError::from_storage)?;
                return Entry::from_metadata(target.name(), &meta).ok_or(VfsError::NotFound);
            }
            Storage::Object(store) => store,
        };
        let found = store
            .stat(&target.key)
            .await
            .map_err(VfsError::from_object_store)?;
        match found {
            Some(Found::File(meta)) => {
                Entry::from_metadata(target.name(), &meta).ok_or(VfsError::NotFound)
            }
            // The home is a directory even when nothing marks it: one that only existed
            // as a prefix of its objects disappears from the store with the last of them.
            Some(Found::Directory) => Ok(directory(target)),
            None if target.is_home() => Ok(directory(target)),
            None => Err(VfsError::NotFound),
        }
    }

    async fn exists(&self, target: &Target) -> Result<bool, VfsError> {
        match self.entry(target).await {
            Ok(_) => Ok(true),
            Err(VfsError::NotFound) => Ok(false),
            Err(other) => Err(other),
        }
    }

    /// OpenDAL's fs service creates missing parents on write and mkdir, but SFTP and FTP
    /// clients expect "no such file" there, so the parent is checked first. Its components
    /// were checked for links along with the child's.
    async fn require_parent_dir(&self, child: &Target) -> Result<(), VfsError> {
        let parent_path = match child.path.rsplit_once('/') {
            Some(("", _)) | None => "/".to_owned(),
            Some((parent, _)) => parent.to_owned(),
        };
        match self.entry(&self.target(parent_path)).await? {
            parent if parent.is_dir() => Ok(()),
            _ => Err(VfsError::NotADirectory),
        }
    }

    /// Links and other hidden entries count: `rmdir` could not remove them either.
    async fn is_empty_dir(&self, target: &Target) -> Result<bool, VfsError> {
        let volume = match &self.storage {
            Storage::Volume(volume) => volume,
            Storage::Object(store) => {
                return store
                    .is_empty_dir(&target.key)
                    .await
                    .map_err(VfsError::from_object_store);
            }
        };
        let mut listing = volume
            .list(&target.key)
            .await
            .map_err(VfsError::from_volume)?;
        let first = listing.next().await.map_err(VfsError::from_list)?;
        Ok(first.is_none())
    }
}

/// `path` as the audit log shows it: normalised if it can be, as given otherwise.
fn shown(path: &str) -> String {
    normalize(path).unwrap_or_else(|_| path.to_owned())
}

/// `entry` with the outcome `error` gives it: denied if the gateway refused, failed
/// otherwise.
fn outcome(entry: AuditEntry, error: &VfsError) -> AuditEntry {
    match error.is_refusal() {
        true => entry.denied(error.to_string()),
        false => entry.failed(error.to_string()),
    }
}

/// Records a success and waits until it is durable.
async fn durable(log: &SessionLog, entry: AuditEntry) -> Result<(), VfsError> {
    log.record(entry).await.map_err(|_| {
        tracing::warn!("Operation done but its audit record is not durable yet; told the client");
        VfsError::AuditUnavailable
    })
}

/// A directory entry for `target`, as a bucket knows it (no time).
fn directory(target: &Target) -> Entry {
    Entry {
        name: target.name().to_owned(),
        kind: EntryKind::Directory,
        size: 0,
        modified: None,
    }
}

/// A place for one more upload in `store`, or [`VfsError::TooManyUploads`].
fn upload_slot(store: &ObjectStore) -> Result<UploadSlot, VfsError> {
    store.reserve_upload().ok_or(VfsError::TooManyUploads)
}

/// Makes sure the home directory `home` exists in `store`: a marker is written only if
/// there is neither a marker nor an object under the prefix. The session does not depend
/// on it: its home stays a directory whatever is deleted ([`Vfs::stat`] of `/`).
async fn create_home(store: &ObjectStore, home: &str) -> Result<(), VfsError> {
    if home.is_empty() {
        return Ok(());
    }
    match store
        .stat(home)
        .await
        .map_err(VfsError::from_object_store)?
    {
        Some(Found::Directory) => Ok(()),
        Some(Found::File(_)) => Err(VfsError::NotADirectory),
        None => store
            .operator()
            .create_dir(&format!("{home}/"))
            .await
            .map_err(VfsError::from_object_store),
    }
}

/// A directory listing in progress: every entry of the directory, in batches. Links and
/// special files are left out.
pub struct DirStream {
    listing: Listing,
    hide_reserved: bool,
}

impl DirStream {
    /// Up to `max` further entries; an empty batch means the listing is complete.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<Entry>, VfsError> {
        let mut batch = Vec::new();
        while batch.len() < max {
            let next = self.listing.next().await.map_err(VfsError::from_list)?;
            let Some(listed) = next else { break };
            batch.extend(self.visible(listed));
        }
        Ok(batch)
    }

    fn visible(&self, listed: ListedEntry) -> Option<Entry> {
        let kind = match listed.kind {
            ListedKind::File => EntryKind::File,
            ListedKind::Directory => EntryKind::Directory,
            ListedKind::Other => return None,
        };
        if self.hide_reserved && storage::is_reserved_name(&listed.name) {
            return None;
        }
        Some(Entry {
            name: listed.name,
            kind,
            size: listed.size,
            modified: listed.modified,
        })
    }
}

/// A file open for reading. Reads that continue where the previous one ended are served
/// from one sequential stream (one GET on an object store), which is restarted at the new
/// offset when a client seeks.
pub struct FileReader {
    reader: opendal::Reader,
    stream: Option<Sequential>,
    object_store: bool,
    path: String,
    size: u64,
    bytes_read: u64,
    log: SessionLog,
    /// Whether the download was recorded.
    finished: bool,
    /// Why the last read failed, for the record of a download that ends with it.
    failure: Option<String>,
}

/// The stream a [`FileReader`] reads from, and where it stands.
struct Sequential {
    /// Only ever used through `&mut`; the wrapper lets a session holding it be shared.
    stream: SyncWrapper<opendal::BufferStream>,
    /// Offset in the file of the first byte of `pending`.
    position: u64,
    /// Bytes received and not handed out yet.
    pending: Bytes,
}

impl FileReader {
    /// Up to `len` bytes starting at `offset`; empty at or past the end of the file.
    pub async fn read_at(&mut self, offset: u64, len: u32) -> Result<Bytes, VfsError> {
        let end = self.size.min(offset.saturating_add(u64::from(len)));
        if offset >= end {
            return Ok(Bytes::new());
        }
        let read = self.read_stream(offset, end).await;
        if let Err(error) = &read {
            self.failure = Some(error.to_string());
        }
        read
    }

    async fn read_stream(&mut self, offset: u64, end: u64) -> Result<Bytes, VfsError> {
        let wanted = (end - offset) as usize;
        let mut sequential = match self.stream.take() {
            Some(sequential) if sequential.position == offset => sequential,
            _ => self.start_stream(offset).await?,
        };

        let mut data = BytesMut::new();
        while data.len() < wanted {
            if sequential.pending.is_empty() {
                let next = sequential.stream.get_mut().try_next().await;
                match next.map_err(|e| VfsError::from_read(self.object_store, e))? {
                    Some(buffer) => sequential.pending = buffer.to_bytes(),
                    // Replaced by a shorter file since it was opened.
                    None => break,
                }
                continue;
            }
            let take = sequential.pending.len().min(wanted - data.len());
            let chunk = sequential.pending.split_to(take);
            if data.is_empty() && take == wanted {
                data = chunk.into();
            } else {
                data.extend_from_slice(&chunk);
            }
        }
        sequential.position += data.len() as u64;
        self.stream = Some(sequential);
        self.bytes_read += data.len() as u64;
        Ok(data.freeze())
    }

    async fn start_stream(&self, offset: u64) -> Result<Sequential, VfsError> {
        let stream = self
            .reader
            .clone()
            .into_stream(offset..self.size)
            .await
            .map_err(|e| VfsError::from_read(self.object_store, e))?;
        Ok(Sequential {
            stream: SyncWrapper::new(stream),
            position: offset,
            pending: Bytes::new(),
        })
    }

    /// Client path of the file.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Size of the file when it was opened.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes handed out so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Ends the download and records it with the bytes sent, waiting until the record is
    /// durable; fails with [`VfsError::AuditUnavailable`] if it does not become so in
    /// time. A reader dropped unfinished is recorded as an interrupted download.
    pub async fn finish(mut self) -> Result<u64, VfsError> {
        self.finished = true;
        let entry = AuditEntry::new(Operation::Download)
            .path(self.path.clone())
            .bytes(self.bytes_read);
        durable(&self.log, entry).await?;
        Ok(self.bytes_read)
    }
}

impl Drop for FileReader {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let reason = self.failure.take();
        let entry = AuditEntry::new(Operation::Download)
            .path(self.path.clone())
            .bytes(self.bytes_read)
            .failed(reason.unwrap_or_else(|| "download interrupted".to_owned()));
        self.log.note_detached(entry);
    }
}

/// How a finished upload becomes the file.
enum Publish {
    /// Moved from its temporary file on the volume.
    Staged {
        volume: storage::Volume,
        staged: String,
    },
    /// Completed in place: an object appears whole when its upload completes. With
    /// `check_first` (a store without conditional writes) an exclusive upload checks the
    /// name just before completing.
    Direct {
        store: ObjectStore,
        check_first: bool,
    },
}

/// An upload in progress. Close it to publish the file; dropping it discards the upload.
pub struct FileWriter {
    /// Writes the temporary file or the object; `None` once closed or aborted.
    writer: Option<opendal::Writer>,
    /// The upload's place among those an object store runs at once, given up when the
    /// writer is gone.
    slot: Option<UploadSlot>,
    publish: Publish,
    key: String,
    mode: WriteMode,
    path: String,
    bytes_written: u64,
    /// Bytes of the existing file a resumed upload kept (already counted once).
    kept: u64,
    /// Of everything written, the kept start included.
    sha256: Sha256,
    log: SessionLog,
    /// Whether the upload was recorded (or is recorded by whoever made it).
    finished: bool,
    /// Why the last write failed, for the record of an upload abandoned after it.
    failure: Option<String>,
}

impl FileWriter {
    /// Writes `data` at `offset`, which must be where the previous write ended: storage
    /// writes are streamed, so uploads are sequential (as every common client sends them).
    pub async fn write_at(&mut self, offset: u64, data: Vec<u8>) -> Result<(), VfsError> {
        if offset != self.bytes_written {
            return Err(VfsError::NonSequentialWrite {
                expected: self.bytes_written,
                got: offset,
            });
        }
        let object_store = self.is_object_store();
        let Some(writer) = self.writer.as_mut() else {
            return Err(VfsError::NotFound);
        };
        let len = data.len() as u64;
        self.sha256.update(&data);
        if let Err(error) = writer.write(data).await {
            let error = VfsError::from_backend(object_store, error);
            self.failure = Some(error.to_string());
            return Err(error);
        }
        self.bytes_written += len;
        Ok(())
    }

    /// Publishes the file under its name and returns its size, once its audit record
    /// (size, SHA-256) is durable. On failure the upload is discarded; with
    /// [`WriteMode::CreateNew`] that includes the name having been taken since the upload
    /// started ([`VfsError::AlreadyExists`]). An upload still running when writes are
    /// suspended is discarded here ([`VfsError::WritesSuspended`]): the client sees the
    /// failure, so nothing it believes stored is lost. If its record cannot be made durable
    /// in time, the file is stored but the client is told [`VfsError::AuditUnavailable`].
    pub async fn close(mut self) -> Result<u64, VfsError> {
        self.finished = true;
        let entry = AuditEntry::new(Operation::Upload).path(self.path.clone());
        match self.publish().await {
            Ok(size) => {
                let sha256 = format!("{:x}", self.sha256.clone().finalize());
                let reference = self.log.count_upload(size.saturating_sub(self.kept));
                let entry = entry.bytes(size).sha256(sha256).reference(reference);
                durable(&self.log, entry).await?;
                Ok(size)
            }
            Err(error) => {
                let entry = entry.bytes(self.bytes_written);
                self.log.note(outcome(entry, &error)).await;
                Err(error)
            }
        }
    }

    async fn publish(&mut self) -> Result<u64, VfsError> {
        let Some(mut writer) = self.writer.take() else {
            return Err(VfsError::NotFound);
        };
        if let Some(reason) = self.log.writes_refused() {
            let _ = writer.abort().await;
            return Err(VfsError::WritesSuspended(reason));
        }
        if let Publish::Direct {
            store,
            check_first: true,
        } = &self.publish
        {
            let taken = store.stat(&self.key).await;
            if !matches!(taken, Ok(None)) {
                let _ = writer.abort().await;
                return Err(match taken {
                    Err(error) => VfsError::from_object_store(error),
                    _ => VfsError::AlreadyExists,
                });
            }
        }
        let object_store = self.is_object_store();
        if let Err(error) = writer.close().await {
            let _ = writer.abort().await;
            return Err(VfsError::from_backend(object_store, error));
        }

        if let Publish::Staged { volume, staged } = &self.publish {
            let replace = self.mode == WriteMode::Replace;
            let published = volume.publish(staged, &self.key, replace).await;
            if let Err(error) = published {
                volume.discard(staged).await;
                return Err(VfsError::from_volume(error));
            }
        }
        Ok(self.bytes_written)
    }

    /// Discards the upload, recording it as interrupted (with the reason of a failed
    /// write, if one failed).
    pub async fn abort(mut self) -> Result<(), VfsError> {
        if !self.finished {
            self.finished = true;
            let reason = self.failure.take();
            let entry = AuditEntry::new(Operation::Upload)
                .path(self.path.clone())
                .bytes(self.bytes_written)
                .failed(reason.unwrap_or_else(|| "upload interrupted; nothing was stored".into()));
            self.log.note(entry).await;
        }
        let object_store = self.is_object_store();
        if let Some(mut writer) = self.writer.take() {
            writer
                .abort()
                .await
                .map_err(|e| VfsError::from_backend(object_store, e))?;
        }
        Ok(())
    }

    /// Client path of the file.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    fn is_object_store(&self) -> bool {
        matches!(self.publish, Publish::Direct { .. })
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        // A session that ends mid-upload drops its writers; removing the temporary file
        // or aborting the multipart upload needs async I/O, so it is handed to the
        // runtime if there still is one.
        let Some(mut writer) = self.writer.take() else {
            return;
        };
        if !self.finished {
            let entry = AuditEntry::new(Operation::Upload)
                .path(self.path.clone())
                .bytes(self.bytes_written)
                .failed("upload interrupted; nothing was stored");
            self.log.note_detached(entry);
        }
        // The slot goes with the writer: its buffers are freed only once it is aborted.
        let slot = self.slot.take();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _slot = slot;
                if let Err(error) = writer.abort().await {
                    // Only the kind: a store's message can carry its response.
                    tracing::warn!(kind = %error.kind(), "Failed to discard unfinished upload");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::storage::{NameProblem, Volume};
    use Permission::*;

    fn user(home: &str, permissions: &[Permission]) -> GatewayUser {
        GatewayUser {
            name: "cucm".into(),
            password_hash: None,
            public_keys: vec![],
            home: home.into(),
            permissions: permissions.to_vec(),
        }
    }

    /// `user`'s view of `volume`, recording into an audit log on the same volume.
    async fn open_as(volume: Volume, user: &GatewayUser) -> Result<Vfs, VfsError> {
        let storage = Storage::from(volume);
        let log = crate::gateway::audit::test_session(&storage).await;
        Vfs::open(storage, user, &log).await
    }

    async fn open(root: &Path, permissions: &[Permission]) -> Vfs {
        let volume = Volume::open_fs(root).unwrap();
        open_as(volume, &user("/cucm", permissions)).await.unwrap()
    }

    const ALL: &[Permission] = &[List, Read, Write, Delete, Mkdir, Rename];

    async fn upload(vfs: &Vfs, path: &str, data: &[u8]) {
        let mut writer = vfs.create(path, WriteMode::Replace).await.unwrap();
        writer.write_at(0, data.to_vec()).await.unwrap();
        writer.close().await.unwrap();
    }

    async fn names(vfs: &Vfs, path: &str) -> Vec<String> {
        let mut listing = vfs.list(path).await.unwrap();
        let mut names: Vec<String> = listing
            .next_batch(1000)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        names.sort();
        names
    }

    #[test]
    fn paths_are_normalised_and_clamped_at_the_home() {
        for (input, expected) in [
            ("", "/"),
            (".", "/"),
            ("/", "/"),
            ("a/../b", "/b"),
            ("../../etc", "/etc"),
            ("//a///b/./c/", "/a/b/c"),
            ("/a/b/../../../..", "/"),
            ("..", "/"),
        ] {
            assert_eq!(normalize(input).unwrap(), expected, "{input:?}");
        }
        assert!(matches!(
            normalize("a\0b"),
            Err(VfsError::InvalidName(NameProblem::Control))
        ));
    }

    #[test]
    fn names_the_storage_would_not_keep_as_given_are_refused() {
        for (input, problem) in [
            ("leaf ", NameProblem::Untrimmed),
            ("leaf\u{3000}", NameProblem::Untrimmed),
            (" /.sluice-uploads", NameProblem::Untrimmed),
            ("a/ b/c", NameProblem::Untrimmed),
            ("\u{a0}x", NameProblem::Untrimmed),
            (" ", NameProblem::Untrimmed),
            ("leaf\t", NameProblem::Control),
            ("dir\n/x", NameProblem::Control),
            (
                "\\.sluice-audit\\2026-01-01\\x.jsonl",
                NameProblem::Backslash,
            ),
            ("a\\b", NameProblem::Backslash),
            ("a\\b/..", NameProblem::Backslash),
            ("x/\u{fffe}", NameProblem::Noncharacter),
            (".sluice-audit./x", NameProblem::TrailingDot),
            ("report.", NameProblem::TrailingDot),
        ] {
            match normalize(input) {
                Err(VfsError::InvalidName(found)) => assert_eq!(found, problem, "{input:?}"),
                other => panic!("{input:?} gave {other:?}"),
            }
        }
        assert_eq!(normalize("a b/c\u{3000}d").unwrap(), "/a b/c\u{3000}d");
        assert_eq!(normalize("a..b/.x").unwrap(), "/a..b/.x");
        let message = normalize("a\\b").unwrap_err().to_string();
        assert_eq!(
            message,
            "invalid file name: file names cannot contain a backslash"
        );
    }

    #[tokio::test]
    async fn a_user_at_the_root_creates_nothing_through_a_name_the_storage_would_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let root = open_as(Volume::open_fs(dir.path()).unwrap(), &user("/", ALL))
            .await
            .unwrap();
        upload(&root, "seed", b"seed").await;
        let before = tree(dir.path());
        for name in [
            "\\.sluice-audit\\x.jsonl",
            "a\\b",
            "a\u{1}b",
            "x.",
            "a\u{ffff}",
        ] {
            let invalid = |result: Result<(), VfsError>| {
                assert!(
                    matches!(result, Err(VfsError::InvalidName(_))),
                    "{name:?}: {result:?}"
                );
            };
            invalid(root.create(name, WriteMode::Replace).await.map(drop));
            invalid(root.resume(name, ResumeAt::End).await.map(drop));
            invalid(root.mkdir(name).await);
            invalid(root.rename("seed", name).await);
            invalid(root.rename_replacing("seed", name).await);
            invalid(root.remove(name).await);
            invalid(root.rmdir(name).await);
            invalid(root.stat(name).await.map(drop));
        }
        assert_eq!(tree(dir.path()), before);
    }

    /// Every path under `root` except the audit log, sorted.
    fn tree(root: &std::path::Path) -> Vec<String> {
        let mut found = Vec::new();
        let mut pending = vec![root.to_owned()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                let shown = path.strip_prefix(root).unwrap().display().to_string();
                if shown.starts_with(crate::storage::AUDIT_DIR) {
                    continue;
                }
                if path.is_dir() {
                    pending.push(path);
                }
                found.push(shown);
            }
        }
        found.sort();
        found
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_link_cannot_be_reached_through_a_name_opendal_would_trim() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"outside").unwrap();
        let vfs = open(dir.path(), ALL).await;
        let home = dir.path().join("cucm");
        std::os::unix::fs::symlink(outside.path().join("secret"), home.join("leaf")).unwrap();
        std::os::unix::fs::symlink(outside.path(), home.join("dirlink")).unwrap();

        for path in [
            "leaf ",
            "leaf\t",
            "leaf\u{3000}",
            "\u{2003}leaf",
            "dirlink /secret",
        ] {
            assert!(
                matches!(vfs.open_read(path).await, Err(VfsError::InvalidName(_))),
                "{path:?}"
            );
        }
        let root = open_as(Volume::open_fs(dir.path()).unwrap(), &user("/", ALL))
            .await
            .unwrap();
        for path in [" /.sluice-uploads", "\t/.sluice-uploads/x"] {
            assert!(matches!(
                root.stat(path).await,
                Err(VfsError::InvalidName(_))
            ));
            assert!(matches!(
                root.rename(path, "stolen").await,
                Err(VfsError::InvalidName(_))
            ));
        }
        let untrimmed = user("/x ", ALL);
        let untrimmed_home = open_as(Volume::open_fs(dir.path()).unwrap(), &untrimmed).await;
        assert!(untrimmed_home.is_err());
    }

    #[tokio::test]
    async fn of_two_exclusive_uploads_to_one_name_only_the_first_closed_is_published() {
        let dir = tempfile::tempdir().unwrap();
        let vfs = open(dir.path(), ALL).await;

        let mut first = vfs.create("race", WriteMode::CreateNew).await.unwrap();
        let mut second = vfs.create("race", WriteMode::CreateNew).await.unwrap();
        first.write_at(0, b"first".to_vec()).await.unwrap();
        second.write_at(0, b"second".to_vec()).await.unwrap();

        assert_eq!(first.close().await.unwrap(), 5);
        assert!(matches!(second.close().await, Err(VfsError::AlreadyExists)));
        assert_eq!(
            std::fs::read(dir.path().join("cucm/race")).unwrap(),
            b"first"
        );
        let uploads = dir.path().join(storage::UPLOADS_DIR);
        assert_eq!(std::fs::read_dir(uploads).unwrap().count(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn of_racing_renames_onto_one_name_exactly_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let vfs = open(dir.path(), ALL).await;
        for i in 0..16 {
            upload(&vfs, &format!("f{i}"), b"x").await;
        }

        let renames = (0..16).map(|i| {
            let vfs = vfs.clone();
            tokio::spawn(async move { vfs.rename(&format!("f{i}"), "target").await })
        });
        let results = futures::future::join_all(renames).await;
        let succeeded = results.iter().filter(|r| matches!(r, Ok(Ok(())))).count();
        assert_eq!(succeeded, 1, "{results:?}");
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Ok(Ok(()) | Err(VfsError::AlreadyExists))))
        );
    }

    #[tokio::test]
    async fn the_home_directory_is_created_on_first_login() {
        let dir = tempfile::tempdir().unwrap();
        let vfs = open(dir.path(), ALL).await;
        assert!(dir.path().join("cucm").is_dir());
        assert!(vfs.stat("/").await.unwrap().is_dir());
    }

    #[tokio::test]
    async fn parent_directory_components_never_leave_the_home() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), b"other tenant").unwrap();
        let vfs = open(dir.path(), ALL).await;

        assert!(matches!(
            vfs.stat("../secret").await,
            Err(VfsError::NotFound)
        ));
        assert!(matches!(
            vfs.open_read("/../../secret").await,
            Err(VfsError::NotFound)
        ));
        upload(&vfs, "../../secret", b"mine").await;
        assert_eq!(
            std::fs::read(dir.path().join("secret")).unwrap(),
            b"other tenant"
        );
        assert_eq!(
            std::fs::read(dir.path().join("cucm/secret")).unwrap(),
            b"mine"
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_planted_symlink_is_neither_followed_nor_listed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("passwd"), b"root:x:0:0").unwrap();
        let vfs = open(dir.path(), ALL).await;
        std::os::unix::fs::symlink(outside.path(), dir.path().join("cucm/link")).unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("passwd"),
            dir.path().join("cucm/passwd"),
        )
        .unwrap();

        assert!(matches!(
            vfs.open_read("link/passwd").await,
            Err(VfsError::Symlink)
        ));
        assert!(matches!(
            vfs.open_read("passwd").await,
            Err(VfsError::Symlink)
        ));
        assert!(matches!(vfs.list("link").await, Err(VfsError::Symlink)));
        assert!(matches!(vfs.remove("passwd").await, Err(VfsError::Symlink)));
        assert!(vfs.create("link/new", WriteMode::Replace).await.is_err());
        assert!(names(&vfs, "/").await.is_empty());
        assert!(outside.path().join("passwd").exists());
    }

    #[tokio::test]
    async fn the_upload_directory_is_hidden_from_a_user_at_the_volume_root() {
        let dir = tempfile::tempdir().unwrap();
        let volume = Volume::open_fs(dir.path()).unwrap();
        let vfs = open_as(volume, &user("/", ALL)).await.unwrap();
        upload(&vfs, "visible.txt", b"x").await;

        // The audit log of that upload is on the same volume, and as hidden.
        assert!(dir.path().join(storage::AUDIT_DIR).is_dir());
        assert_eq!(names(&vfs, "/").await, ["visible.txt"]);
        for reserved in ["/.sluice-uploads", "/.sluice-audit"] {
            assert!(matches!(vfs.list(reserved).await, Err(VfsError::NotFound)));
        }
        assert!(matches!(
            vfs.mkdir("/.sluice-uploads/x").await,
            Err(VfsError::NotFound)
        ));
        let reserved_home = user("/.sluice-uploads", ALL);
        let reserved = open_as(Volume::open_fs(dir.path()).unwrap(), &reserved_home).await;
        assert!(matches!(reserved, Err(VfsError::ReservedHome(_))));
    }

    #[tokio::test]
    async fn an_upload_appears_only_when_closed_and_vanishes_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let vfs = open(dir.path(), ALL).await;

        let mut writer = vfs.create("big.bin", WriteMode::Replace).await.unwrap();
        writer.write_at(0, vec![1; 10]).await.unwrap();
        assert!(matches!(vfs.stat("big.bin").await, Err(VfsError::NotFound)));
        assert!(matches!(
            writer.write_at(5, vec![2; 5]).await,
            Err(VfsError::NonSequentialWrite {
                expected: 10,
                got: 5
            })
        ));
        writer.write_at(10, vec![2; 5]).await.unwrap();
        assert_eq!(writer.close().await.unwrap(), 15);
        assert_eq!(vfs.stat("big.bin").await.unwrap().size, 15);

        let mut dropped = vfs.create("partial.bin", WriteMode::Replace).await.unwrap();
        dropped.write_at(0, vec![1; 10]).await.unwrap();
        drop(dropped);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let uploads = dir.path().join(storage::UPLOADS_DIR);
        assert_eq!(std::fs::read_dir(uploads).unwrap().count(), 0);
        assert!(matches!(
            vfs.stat("partial.bin").await,
            Err(VfsError::NotFound)
        ));
    }

    #[tokio::test]
    async fn a_resumed_upload_keeps_the_start_of_the_file_and_replaces_it_only_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let vfs = open(dir.path(), &[Permission::Write]).await;
        let stored = dir.path().join("cucm/data");
        upload(&vfs, "data", &[7; 3_000_000]).await;

        let mut writer = vfs
            .resume("data", ResumeAt::Offset(2_500_001))
            .await
            .unwrap();
        assert_eq!(writer.bytes_written(), 2_500_001);
        writer.write_at(2_500_001, b"tail".to_vec()).await.unwrap();
        assert_eq!(std::fs::metadata(&stored).unwrap().len(), 3_000_000);
        assert_eq!(writer.close().await.unwrap(), 2_500_005);
        let content = std::fs::read(&stored).unwrap();
        assert_eq!(content.len(), 2_500_005);
        assert!(content[..2_500_001].iter().all(|b| *b == 7) && content.ends_with(b"tail"));

        let mut append = vfs.resume("data", ResumeAt::End).await.unwrap();
        append.write_at(2_500_005, b"+".to_vec()).await.unwrap();
        drop(append);
        assert_eq!(std::fs::metadata(&stored).unwrap().len(), 2_500_005);
        let mut append = vfs.resume("data", ResumeAt::End).await.unwrap();
        append.write_at(2_500_005, b"+".to_vec()).await.unwrap();
        assert_eq!(append.close().await.unwrap(), 2_500_006);

        let mut fresh = vfs.resume("new", ResumeAt::End).await.unwrap();
        fresh.write_at(0, b"new".to_vec()).await.unwrap();
        fresh.close().await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("cucm/new")).unwrap(), b"new");
        // A user who may not read the file is not told its size; one who may, is.
        assert!(matches!(
            vfs.resume("data", ResumeAt::Offset(2_500_007))
                .await
                .map(drop),
            Err(VfsError::BeyondEndOfUnreadable { offset: 2_500_007 })
        ));
        let reader = open(dir.path(), &[Permission::Read, Permission::Write]).await;
        assert!(matches!(
            reader
                .resume("data", ResumeAt::Offset(2_500_007))
                .await
                .map(drop),
            Err(VfsError::BeyondEnd {
                offset: 2_500_007,
                size: 2_500_006
            })
        ));
        assert!(matches!(
            reader
                .resume("missing", ResumeAt::Offset(1))
                .await
                .map(drop),
            Err(VfsError::BeyondEnd { offset: 1, size: 0 })
        ));
        let read_only = open(dir.path(), &[Permission::Read]).await;
        assert!(matches!(
            read_only.resume("data", ResumeAt::End).await.map(drop),
            Err(VfsError::Denied(Permission::Write))
        ));
    }

    #[tokio::test]
    async fn reads_honour_ranges_and_stop_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let vfs = open(dir.path(), ALL).await;
        upload(&vfs, "data", b"0123456789").await;

        let mut reader = vfs.open_read("data").await.unwrap();
        assert_eq!(reader.read_at(3, 4).await.unwrap(), &b"3456"[..]);
        assert_eq!(reader.read_at(8, 100).await.unwrap(), &b"89"[..]);
        assert!(reader.read_at(10, 4).await.unwrap().is_empty());
        assert_eq!(reader.bytes_read(), 6);
    }

    #[tokio::test]
    async fn directories_are_made_listed_and_removed_only_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let vfs = open(dir.path(), ALL).await;

        vfs.mkdir("in").await.unwrap();
        assert!(matches!(
            vfs.mkdir("in").await,
            Err(VfsError::AlreadyExists)
        ));
        assert!(matches!(
            vfs.mkdir("missing/child").await,
            Err(VfsError::NotFound)
        ));
        upload(&vfs, "in/a.txt", b"a").await;
        assert!(matches!(vfs.rmdir("in").await, Err(VfsError::NotEmpty)));
        assert!(matches!(vfs.rmdir("/").await, Err(VfsError::Home)));
        assert_eq!(names(&vfs, "/").await, ["in"]);
        assert_eq!(names(&vfs, "in").await, ["a.txt"]);

        vfs.remove("in/a.txt").await.unwrap();
        vfs.rmdir("in").await.unwrap();
        assert!(names(&vfs, "/").await.is_empty());
    }

    #[tokio::test]
    async fn a_listing_is_complete_across_batches() {
        let dir = tempfile::tempdir().unwrap();
        let vfs = open(dir.path(), ALL).await;
        for i in 0..250 {
            std::fs::write(dir.path().join(format!("cucm/f{i:03}")), b"").unwrap();
        }

        let mut listing = vfs.list("/").await.unwrap();
        let mut total = 0;
        loop {
            let batch = listing.next_batch(100).await.unwrap();
            if batch.is_empty() {
                break;
            }
            total += batch.len();
        }
        assert_eq!(total, 250);
    }

    #[tokio::test]
    async fn plain_rename_refuses_an_existing_target() {
        let dir = tempfile::tempdir().unwrap();
        let vfs = open(dir.path(), ALL).await;
        upload(&vfs, "a", b"a").await;
        upload(&vfs, "b", b"b").await;
        vfs.mkdir("sub").await.unwrap();

        assert!(matches!(
            vfs.rename("a", "b").await,
            Err(VfsError::AlreadyExists)
        ));
        vfs.rename("a", "sub/c").await.unwrap();
        vfs.rename("sub", "moved").await.unwrap();
        assert_eq!(vfs.stat("moved/c").await.unwrap().size, 1);
        assert!(matches!(
            vfs.rename("moved", "moved/inner").await,
            Err(VfsError::InvalidPath)
        ));
        assert!(matches!(
            vfs.rename("nothing", "x").await,
            Err(VfsError::NotFound)
        ));
    }

    #[tokio::test]
    async fn every_operation_checks_its_permission() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("cucm/d")).unwrap();
        std::fs::write(dir.path().join("cucm/f"), b"f").unwrap();
        let vfs = open(dir.path(), &[]).await;

        let denied = |r: Result<(), VfsError>| matches!(r, Err(VfsError::Denied(_)));
        assert!(denied(vfs.stat("f").await.map(drop)));
        assert!(denied(vfs.list("d").await.map(drop)));
        assert!(denied(vfs.open_read("f").await.map(drop)));
        assert!(denied(vfs.create("g", WriteMode::Replace).await.map(drop)));
        assert!(denied(vfs.mkdir("e").await));
        assert!(denied(vfs.rmdir("d").await));
        assert!(denied(vfs.remove("f").await));
        assert!(denied(vfs.rename("f", "h").await));
        assert_eq!(vfs.resolve("a/../b").unwrap(), "/b");
    }

    #[tokio::test]
    async fn writes_follow_the_live_residency_stamp_and_reads_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::from(Volume::open_fs(dir.path()).unwrap());
        let log = crate::gateway::audit::test_log(&storage).await;
        let peer = std::net::Ipv4Addr::LOCALHOST.into();
        let session = log.session(crate::gateway::audit::AuditProtocol::Sftp, peer);
        let vfs = Vfs::open(storage, &user("/cucm", ALL), &session)
            .await
            .unwrap();
        upload(&vfs, "kept", b"kept").await;
        let mut inflight = vfs.create("inflight", WriteMode::Replace).await.unwrap();
        inflight.write_at(0, b"x".to_vec()).await.unwrap();

        let stamp = |compliant: bool| -> crate::gateway::config::GatewayConfig {
            serde_json::from_value(serde_json::json!({
                "server": "ns/s", "region": "cn-shanghai", "users": [],
                "residency": {
                    "compliant": compliant, "enforced": true, "suspended": !compliant,
                    "violation": "rule R",
                },
            }))
            .unwrap()
        };
        log.apply(&stamp(false));
        let suspended = |r: Result<(), VfsError>| match r {
            Err(error @ VfsError::WritesSuspended(_)) => {
                error.reply() == Reply::PermissionDenied
                    && error.to_string() == "writes are suspended: rule R"
            }
            _ => false,
        };
        assert!(suspended(inflight.close().await.map(drop)));
        assert!(suspended(
            vfs.create("new", WriteMode::Replace).await.map(drop)
        ));
        assert!(suspended(vfs.resume("kept", ResumeAt::End).await.map(drop)));
        assert!(suspended(vfs.remove("kept").await));
        assert!(suspended(vfs.rename("kept", "moved").await));
        assert!(suspended(vfs.rename_replacing("kept", "moved").await));
        assert!(suspended(vfs.mkdir("d").await));
        assert!(suspended(vfs.rmdir("/").await));
        let mut reader = vfs.open_read("kept").await.unwrap();
        assert_eq!(reader.read_at(0, 10).await.unwrap(), &b"kept"[..]);
        assert_eq!(reader.finish().await.unwrap(), 4);
        assert_eq!(names(&vfs, "/").await, ["kept"]);

        log.apply(&stamp(true));
        vfs.mkdir("d").await.unwrap();
        upload(&vfs, "d/new", b"new").await;
    }

    #[tokio::test]
    async fn a_resumed_upload_is_recorded_with_the_hash_of_the_whole_stored_file() {
        let dir = tempfile::tempdir().unwrap();
        let vfs = open(dir.path(), ALL).await;
        upload(&vfs, "data", &[7; 2_000_000]).await;
        let mut writer = vfs
            .resume("data", ResumeAt::Offset(1_500_000))
            .await
            .unwrap();
        writer.write_at(1_500_000, b"tail".to_vec()).await.unwrap();
        assert_eq!(writer.close().await.unwrap(), 1_500_004);

        let stored = std::fs::read(dir.path().join("cucm/data")).unwrap();
        let mut days = std::fs::read_dir(dir.path().join(storage::AUDIT_DIR)).unwrap();
        let day = days.next().unwrap().unwrap().path();
        let log = std::fs::read_to_string(day.join("test-0.jsonl")).unwrap();
        let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
        assert_eq!(last["operation"], "upload");
        assert_eq!(last["bytes"], 1_500_004);
        assert_eq!(last["sha256"], format!("{:x}", Sha256::digest(&stored)));
    }

    /// Waits until the uploads dropped unclosed are cleared: their abort tasks have ended
    /// (no more than `tasks` are alive, as before they were spawned) and the upload
    /// directory is empty. An empty directory alone is not enough: an abort task that has
    /// not run yet can still make OpenDAL create the temporary file it then removes.
    async fn settle(root: &Path, tasks: usize) {
        let uploads = root.join(storage::UPLOADS_DIR);
        let runtime = tokio::runtime::Handle::current();
        for _ in 0..500 {
            let staged = std::fs::read_dir(&uploads).map_or(0, Iterator::count);
            if staged == 0 && runtime.metrics().num_alive_tasks() <= tasks {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("dropped uploads were never cleared");
    }

    /// `start` as [`Vfs::create`] or [`Vfs::resume`] would be asked for it, its writer
    /// dropped unclosed.
    async fn start(vfs: &Vfs, path: &str, start: UploadStart) -> Result<(), VfsError> {
        match start {
            UploadStart::New(mode) => vfs.create(path, mode).await.map(drop),
            UploadStart::Resume(at) => vfs.resume(path, at).await.map(drop),
        }
    }

    #[tokio::test]
    async fn an_upload_check_refuses_exactly_what_starting_the_upload_refuses_and_stages_nothing() {
        use UploadStart::{New, Resume};
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::from(Volume::open_fs(dir.path()).unwrap());
        let log = crate::gateway::audit::test_log(&storage).await;
        let peer = std::net::Ipv4Addr::LOCALHOST.into();
        let session = log.session(crate::gateway::audit::AuditProtocol::Ftps, peer);
        let vfs = Vfs::open(storage.clone(), &user("/cucm", ALL), &session)
            .await
            .unwrap();
        let write_only = Vfs::open(storage.clone(), &user("/cucm", &[Write]), &session)
            .await
            .unwrap();
        let read_only = Vfs::open(storage, &user("/cucm", &[Read]), &session)
            .await
            .unwrap();
        upload(&vfs, "data", b"0123").await;
        vfs.mkdir("dir").await.unwrap();
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        let cases: Vec<(&Vfs, &str, UploadStart)> = vec![
            (&vfs, "new", New(WriteMode::Replace)),
            (&vfs, "data", New(WriteMode::Replace)),
            (&vfs, "data", New(WriteMode::CreateNew)),
            (&vfs, "dir", New(WriteMode::Replace)),
            (&vfs, "/", Resume(ResumeAt::End)),
            (&vfs, "missing/new", New(WriteMode::Replace)),
            (&vfs, "data/new", New(WriteMode::Replace)),
            (&vfs, "a\\b", New(WriteMode::Replace)),
            (&vfs, "/.sluice-uploads/x", New(WriteMode::Replace)),
            (&vfs, "data", Resume(ResumeAt::End)),
            (&vfs, "data", Resume(ResumeAt::Offset(4))),
            (&vfs, "data", Resume(ResumeAt::Offset(5))),
            (&vfs, "dir", Resume(ResumeAt::End)),
            (&vfs, "missing", Resume(ResumeAt::End)),
            (&write_only, "data", Resume(ResumeAt::Offset(9))),
            (&read_only, "new", New(WriteMode::Replace)),
        ];
        let stamp = |compliant: bool| -> crate::gateway::config::GatewayConfig {
            serde_json::from_value(serde_json::json!({
                "server": "ns/s", "region": "cn-shanghai", "users": [],
                "residency": {
                    "compliant": compliant, "enforced": true, "suspended": !compliant,
                    "violation": "rule R",
                },
            }))
            .unwrap()
        };

        for suspended in [false, true] {
            log.apply(&stamp(!suspended));
            settle(dir.path(), tasks).await;
            let before = tree(dir.path());
            let mut checked = Vec::new();
            for (vfs, path, how) in &cases {
                checked.push(format!("{:?}", vfs.check_upload(path, *how).await));
            }
            assert_eq!(tree(dir.path()), before, "a check staged something");
            for ((vfs, path, how), checked) in cases.iter().zip(checked) {
                let started = format!("{:?}", start(vfs, path, *how).await);
                assert_eq!(
                    checked, started,
                    "{path:?} {how:?} (suspended: {suspended})"
                );
            }
        }
        let refused = |r: Result<(), VfsError>| format!("{r:?}");
        assert_eq!(
            refused(vfs.check_upload("new", New(WriteMode::Replace)).await),
            r#"Err(WritesSuspended("writes are suspended: rule R"))"#
        );
        log.apply(&stamp(true));
        assert_eq!(
            refused(
                write_only
                    .check_upload("data", Resume(ResumeAt::Offset(9)))
                    .await
            ),
            "Err(BeyondEndOfUnreadable { offset: 9 })"
        );
        assert!(
            vfs.check_upload("data", Resume(ResumeAt::End))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn an_upload_check_is_refused_while_every_upload_place_of_a_bucket_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        // A bucket stand-in: the object store's rules over a local directory.
        let store = ObjectStore::from_operator(storage::fs_operator(dir.path()).unwrap());
        let storage = Storage::Object(store.clone());
        let log = crate::gateway::audit::test_session(&storage).await;
        let vfs = Vfs::open(storage, &user("/cucm", ALL), &log).await.unwrap();
        let new = UploadStart::New(WriteMode::Replace);
        vfs.check_upload("one", new).await.unwrap();

        let taken: Vec<UploadSlot> = std::iter::from_fn(|| store.reserve_upload()).collect();
        assert_eq!(taken.len(), MAX_UPLOADS);
        let refused = vfs.check_upload("one", new).await.unwrap_err();
        assert!(matches!(refused, VfsError::TooManyUploads) && refused.is_transient());
        assert!(matches!(
            vfs.create("one", WriteMode::Replace).await.map(drop),
            Err(VfsError::TooManyUploads)
        ));
        // Checking takes no place: one freed is there for the upload.
        drop(taken);
        vfs.check_upload("one", new).await.unwrap();
        let places: Vec<UploadSlot> = std::iter::from_fn(|| store.reserve_upload()).collect();
        assert_eq!(places.len(), MAX_UPLOADS);
    }

    #[tokio::test]
    async fn create_new_fails_on_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let vfs = open(dir.path(), ALL).await;
        upload(&vfs, "once", b"1").await;
        assert!(matches!(
            vfs.create("once", WriteMode::CreateNew).await.map(drop),
            Err(VfsError::AlreadyExists)
        ));
        assert!(matches!(
            vfs.create("/", WriteMode::Replace).await.map(drop),
            Err(VfsError::IsADirectory)
        ));
    }

    #[test]
    fn errors_map_to_protocol_replies() {
        assert_eq!(VfsError::NotFound.reply(), Reply::NotFound);
        assert_eq!(VfsError::Denied(Write).reply(), Reply::PermissionDenied);
        assert_eq!(VfsError::Symlink.reply(), Reply::PermissionDenied);
        assert_eq!(VfsError::AlreadyExists.reply(), Reply::Failure);
        let unsupported = VfsError::NonSequentialWrite {
            expected: 1,
            got: 2,
        };
        assert_eq!(unsupported.reply(), Reply::Unsupported);
    }
}
