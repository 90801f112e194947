//! Storage behind the gateway: an Apache OpenDAL operator over the server's volume, or a
//! bucket ([`bucket::ObjectStore`], whose own contract covers object stores); a
//! [`Storage`] is either. What follows is the volume's contract.
//!
//! Contract:
//! - [`Volume::open_fs`] roots an OpenDAL `fs` operator at a directory (the mounted
//!   PersistentVolumeClaim). Keys handed to the operator are relative to that root, without
//!   a leading `/`; directories end in `/`. OpenDAL itself rejects keys containing `..`.
//! - Uploads are atomic. The fs service writes every upload to a temporary file in
//!   [`UPLOADS_DIR`], a hidden directory inside the volume root, and renames it onto its
//!   final name only when the writer is closed; an aborted writer removes it. A half-written
//!   upload is therefore never visible under its final name, and the rename never crosses a
//!   filesystem boundary because the temporary directory lives on the same volume.
//! - [`UPLOADS_DIR`], [`PROBE_DIR`] (the operator's bucket probe) and [`AUDIT_DIR`] (the
//!   audit log) are reserved on every backend: [`is_reserved`] tells the protocol side
//!   to hide them from listings and to refuse paths into them. Temporary files a crashed
//!   gateway left behind are removed when the volume is opened, once they are older
//!   than [`STALE_UPLOAD_AGE`].
//! - Symbolic links are never followed. The fs service would follow them (it uses
//!   `metadata` and `open`), so [`Volume::refuse_symlinks`] checks every existing component
//!   of a key with `symlink_metadata` before the key is used.
//! - Directories are listed with [`Volume::list`], not with OpenDAL's lister: that lister
//!   completes entries of unknown type (which is what a link is) with a `stat` that follows
//!   the link, so a link would be listed as its target (and a link to a directory trips a
//!   debug assertion in OpenDAL). Reading the directory directly reports links as
//!   [`ListedKind::Other`].
//! - Every check made on the volume directly (links, the reserved directory) must concern
//!   the file OpenDAL then opens. OpenDAL normalises each key before use, and among other
//!   things trims whitespace from both ends of it, so `"leaf "` would be checked as one
//!   file and opened as another. Callers use only keys for which [`is_faithful_key`]
//!   holds: keys OpenDAL leaves exactly as they are, made of names every backend keeps
//!   as given ([`name_problem`]).
//! - A name is kept faithfully only if no backend rewrites it. Object stores do: SeaweedFS
//!   stores `\` as `/` (so `\.sluice-audit\x` would land in the audit directory) and
//!   lists C0 control characters and U+FFFE/U+FFFF (not allowed in the XML of a listing) as
//!   U+FFFD; Azure Blob advises against names ending in `.` and refuses control
//!   characters; OpenDAL trims whitespace. [`name_problem`] refuses all of these on every
//!   backend alike, the volume included, so that one name means one file everywhere and a
//!   server can move between backends.
//! - Moves that must not replace anything are single filesystem operations, not a check
//!   followed by a rename, because OpenDAL's rename and atomic writes always replace:
//!   [`Volume::publish`] and [`Volume::rename`] move a file with `link` (which fails if the
//!   name is taken) and then remove the old name, and move a directory by creating the
//!   target directory (which fails if the name is taken) and renaming onto that empty
//!   directory. On a volume without hard links they fall back to a check followed by a
//!   rename, which two clients racing for one name can both pass.

pub mod bucket;
pub mod object;

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use opendal::Operator;
use opendal::services::Fs;

pub use bucket::ObjectStore;

/// Name of the hidden directory, directly under the volume root, that holds uploads in
/// progress.
pub const UPLOADS_DIR: &str = ".sluice-uploads";

/// Name of the directory, directly under the storage root, where the operator probes an
/// object store (it writes and deletes one object there). Hidden like [`UPLOADS_DIR`].
pub const PROBE_DIR: &str = ".sluice-probe";

/// Name of the directory, directly under the storage root, that holds the gateway's audit
/// log and the volume counts of cross-border allowances (see `gateway::audit`). Hidden
/// like [`UPLOADS_DIR`]: users can neither list nor reach it, whatever their home.
pub const AUDIT_DIR: &str = ".sluice-audit";

/// Age after which a temporary upload file is considered abandoned and removed when the
/// volume is opened. Long enough that an upload still running on another replica that
/// shares the volume is never touched.
pub const STALE_UPLOAD_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The OpenDAL operator for the volume could not be built.
    #[error("failed to open volume at {root}")]
    Open {
        /// The directory the volume was to be rooted at.
        root: PathBuf,
        /// What OpenDAL reported.
        #[source]
        source: opendal::Error,
    },
    /// A component of a key is a symbolic link.
    #[error("refusing to follow symbolic link at {key}")]
    Symlink {
        /// The key, relative to the volume root, up to and including the link.
        key: String,
    },
    /// A directory could not be listed.
    #[error("failed to list {key} on the volume")]
    List {
        /// The directory's key, relative to the volume root.
        key: String,
        /// What the filesystem reported.
        #[source]
        source: io::Error,
    },
    /// A component of a key could not be inspected.
    #[error("failed to inspect {key} on the volume")]
    Inspect {
        /// The key, relative to the volume root, up to and including the component.
        key: String,
        /// What the filesystem reported.
        #[source]
        source: io::Error,
    },
    /// A move that must not replace anything found its target taken.
    #[error("{key} already exists on the volume")]
    Exists {
        /// The target key, relative to the volume root.
        key: String,
    },
    /// A file or directory could not be moved.
    #[error("failed to move {from} to {to} on the volume")]
    Move {
        /// The source key, relative to the volume root.
        from: String,
        /// The target key, relative to the volume root.
        to: String,
        /// What the filesystem reported.
        #[source]
        source: io::Error,
    },
}

impl StorageError {
    /// The kind of the underlying filesystem error, if there is one.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Self::List { source, .. }
            | Self::Inspect { source, .. }
            | Self::Move { source, .. } => Some(source.kind()),
            Self::Open { .. } | Self::Symlink { .. } | Self::Exists { .. } => None,
        }
    }
}

/// Where a gateway's files live: the mounted volume or a bucket. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Storage {
    /// The server's volume (a mounted PersistentVolumeClaim).
    Volume(Volume),
    /// A bucket in an object store.
    Object(ObjectStore),
}

impl Storage {
    /// The operator; keys are relative to the storage root.
    pub fn operator(&self) -> &Operator {
        match self {
            Self::Volume(volume) => volume.operator(),
            Self::Object(store) => store.operator(),
        }
    }

    /// Whether files live in an object store.
    pub fn is_object_store(&self) -> bool {
        matches!(self, Self::Object(_))
    }
}

impl From<Volume> for Storage {
    fn from(volume: Volume) -> Self {
        Self::Volume(volume)
    }
}

impl From<ObjectStore> for Storage {
    fn from(store: ObjectStore) -> Self {
        Self::Object(store)
    }
}

/// The storage of one gateway: an OpenDAL operator plus what the gateway needs to know
/// about the backend behind it.
#[derive(Clone, Debug)]
pub struct Volume {
    operator: Operator,
    local_root: PathBuf,
}

impl Volume {
    /// Opens the volume rooted at `root`, creating the directory and [`UPLOADS_DIR`] if
    /// missing, and removes stale temporary uploads.
    pub fn open_fs(root: &Path) -> Result<Self, StorageError> {
        let operator = fs_operator(root)?;

        // OpenDAL canonicalises its root; do the same so symlink checks start from the
        // directory the operator really uses.
        let local_root = root
            .canonicalize()
            .map_err(|source| StorageError::Inspect {
                key: String::new(),
                source,
            })?;
        remove_stale_uploads(&local_root.join(UPLOADS_DIR), STALE_UPLOAD_AGE);

        Ok(Self {
            operator,
            local_root,
        })
    }

    /// The operator; keys are relative to the volume root.
    pub fn operator(&self) -> &Operator {
        &self.operator
    }

    /// The directory the volume is rooted at, canonicalised.
    pub fn local_root(&self) -> &Path {
        &self.local_root
    }

    /// Fails with [`StorageError::Symlink`] if any existing component of `key` is a
    /// symbolic link. Components that do not exist (yet) end the check: whatever is
    /// created there later is created by the gateway, which never creates links.
    ///
    /// The check and the later use of the key are not one atomic step. That is safe
    /// because nothing that talks to the gateway can create a link; the check exists for
    /// links planted on the volume by other means (a restored backup, another pod).
    pub async fn refuse_symlinks(&self, key: &str) -> Result<(), StorageError> {
        let key = key.to_owned();
        self.on_volume(move |root| check_components(root, &key))
            .await
    }

    /// Moves the finished upload at `staged` (a key under [`UPLOADS_DIR`]) to `key`. With
    /// `replace` an existing file at `key` is replaced in one step; without it the move
    /// fails with [`StorageError::Exists`] if anything is at `key`, checked by the move
    /// itself.
    pub async fn publish(
        &self,
        staged: &str,
        key: &str,
        replace: bool,
    ) -> Result<(), StorageError> {
        let (staged, key) = (staged.to_owned(), key.to_owned());
        self.on_volume(move |root| {
            let target = Move::new(root, &staged, &key);
            if replace {
                target.replacing()
            } else {
                target.file_without_replacing()
            }
        })
        .await
    }

    /// Renames the file or directory at `from` to `to`, failing with
    /// [`StorageError::Exists`] if anything is at `to`, checked by the rename itself.
    pub async fn rename(&self, from: &str, to: &str) -> Result<(), StorageError> {
        let (from, to) = (from.to_owned(), to.to_owned());
        self.on_volume(move |root| Move::new(root, &from, &to).without_replacing())
            .await
    }

    /// Renames the file or directory at `from` to `to` in one `rename(2)`, replacing a
    /// file or empty directory at `to` (a non-empty directory there makes it fail).
    pub async fn rename_replacing(&self, from: &str, to: &str) -> Result<(), StorageError> {
        let (from, to) = (from.to_owned(), to.to_owned());
        self.on_volume(move |root| Move::new(root, &from, &to).replacing())
            .await
    }

    /// Removes the file at `key`, if it is there; for temporary uploads that will not be
    /// published. A failure is logged, not returned: the file is removed as stale later.
    pub async fn discard(&self, key: &str) {
        let key = key.to_owned();
        let removed = self
            .on_volume(move |root| match std::fs::remove_file(root.join(&key)) {
                Err(source) if source.kind() != io::ErrorKind::NotFound => {
                    Err(StorageError::Inspect { key, source })
                }
                _ => Ok(()),
            })
            .await;
        if let Err(error) = removed {
            tracing::warn!(%error, "Failed to discard unfinished upload");
        }
    }

    /// Runs `work` on the volume root on a blocking thread.
    async fn on_volume<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Path) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let root = self.local_root.clone();
        tokio::task::spawn_blocking(move || work(&root))
            .await
            .unwrap_or_else(|join| {
                Err(StorageError::Inspect {
                    key: String::new(),
                    source: io::Error::other(join),
                })
            })
    }

    /// Starts listing the directory at `key` (relative to the volume root). Entries are
    /// reported as they are, symbolic links included, without following anything.
    pub async fn list(&self, key: &str) -> Result<Listing, StorageError> {
        let list_error = |source| StorageError::List {
            key: key.to_owned(),
            source,
        };
        let read_dir = tokio::fs::read_dir(self.local_root.join(key))
            .await
            .map_err(list_error)?;
        Ok(Listing::Volume(VolumeListing {
            key: key.to_owned(),
            read_dir,
        }))
    }
}

/// What a listed entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListedKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// Anything else: a symbolic link, socket, device or FIFO.
    Other,
}

/// One entry of a directory listing.
#[derive(Clone, Debug)]
pub struct ListedEntry {
    /// File name (entries whose name is not UTF-8 are skipped).
    pub name: String,
    /// What it is; links are [`ListedKind::Other`] whatever they point to.
    pub kind: ListedKind,
    /// Size in bytes of a file; 0 otherwise.
    pub size: u64,
    /// Last modification, when known.
    pub modified: Option<SystemTime>,
}

/// A directory listing in progress, read entry by entry.
pub enum Listing {
    /// A directory on the volume.
    Volume(VolumeListing),
    /// A directory in an object store.
    Object(bucket::ObjectListing),
}

impl Listing {
    /// The next entry, or `None` when the listing is complete.
    pub async fn next(&mut self) -> Result<Option<ListedEntry>, ListError> {
        match self {
            Self::Volume(listing) => listing.next().await.map_err(ListError::Volume),
            Self::Object(listing) => {
                let entry = listing.next().await.map_err(ListError::Object)?;
                Ok(entry.map(|entry| ListedEntry {
                    name: entry.name,
                    kind: match entry.is_dir {
                        true => ListedKind::Directory,
                        false => ListedKind::File,
                    },
                    size: entry.size,
                    modified: entry.modified,
                }))
            }
        }
    }
}

/// Why a listing failed.
#[derive(Debug)]
pub enum ListError {
    /// Reading the volume's directory failed.
    Volume(StorageError),
    /// The object store failed.
    Object(opendal::Error),
}

/// A directory on the volume being listed.
pub struct VolumeListing {
    key: String,
    read_dir: tokio::fs::ReadDir,
}

impl VolumeListing {
    /// The next entry, or `None` when the listing is complete.
    pub async fn next(&mut self) -> Result<Option<ListedEntry>, StorageError> {
        loop {
            let entry = self
                .read_dir
                .next_entry()
                .await
                .map_err(|source| StorageError::List {
                    key: self.key.clone(),
                    source,
                })?;
            let Some(entry) = entry else {
                return Ok(None);
            };
            // Entries can vanish between reading the directory and inspecting them.
            let (Ok(name), Ok(meta)) = (entry.file_name().into_string(), entry.metadata().await)
            else {
                continue;
            };

            // `DirEntry::metadata` does not traverse links: a link is neither file nor dir.
            let kind = if meta.is_file() {
                ListedKind::File
            } else if meta.is_dir() {
                ListedKind::Directory
            } else {
                ListedKind::Other
            };
            return Ok(Some(ListedEntry {
                name,
                kind,
                size: if kind == ListedKind::File {
                    meta.len()
                } else {
                    0
                },
                modified: meta.modified().ok(),
            }));
        }
    }
}

/// Builds an OpenDAL `fs` operator rooted at `root` whose writes go through
/// [`UPLOADS_DIR`] inside it, so that every upload is atomic.
pub fn fs_operator(root: &Path) -> Result<Operator, StorageError> {
    let open_error = |source| StorageError::Open {
        root: root.to_owned(),
        source,
    };
    let uploads = root.join(UPLOADS_DIR);
    let builder = Fs::default()
        .root(&root.to_string_lossy())
        .atomic_write_dir(&uploads.to_string_lossy());
    Operator::new(builder).map_err(open_error)
}

/// Whether `key` (relative to the storage root, with or without a leading `/`) lies in
/// one of the reserved directories, [`UPLOADS_DIR`], [`PROBE_DIR`] or [`AUDIT_DIR`].
pub fn is_reserved(key: &str) -> bool {
    key.split('/')
        .find(|c| !c.is_empty())
        .is_some_and(is_reserved_name)
}

/// Whether `name`, an entry of the storage root, is one of the reserved directories.
pub fn is_reserved_name(name: &str) -> bool {
    name == UPLOADS_DIR || name == PROBE_DIR || name == AUDIT_DIR
}

/// Why a file or directory name (one component of a key) cannot be stored as given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    /// A backslash, which some object stores (SeaweedFS) store as `/`.
    #[error("file names cannot contain a backslash")]
    Backslash,
    /// A control character (C0, DEL or C1, NUL included): object stores list some as
    /// U+FFFD or refuse them, and FTP cannot carry them.
    #[error("file names cannot contain control characters")]
    Control,
    /// A Unicode noncharacter (U+FFFE, U+FDD0, ...): not allowed in the XML of a listing.
    #[error("file names cannot contain Unicode noncharacters")]
    Noncharacter,
    /// Whitespace at either end, which OpenDAL trims.
    #[error("file names cannot begin or end with whitespace")]
    Untrimmed,
    /// A dot at the end (`.` and `..` included), which some stores and clients drop.
    #[error("file names cannot end with a dot")]
    TrailingDot,
}

/// Why `name`, one component of a path, cannot be stored faithfully on every backend, if
/// it cannot (see the module's contract).
pub fn name_problem(name: &str) -> Option<NameProblem> {
    for c in name.chars() {
        if c == '\\' {
            return Some(NameProblem::Backslash);
        }
        if c.is_control() {
            return Some(NameProblem::Control);
        }
        if is_noncharacter(c) {
            return Some(NameProblem::Noncharacter);
        }
    }
    if name.starts_with(char::is_whitespace) || name.ends_with(char::is_whitespace) {
        return Some(NameProblem::Untrimmed);
    }
    name.ends_with('.').then_some(NameProblem::TrailingDot)
}

/// U+FDD0 to U+FDEF and the last two code points of every plane.
fn is_noncharacter(c: char) -> bool {
    let code = u32::from(c);
    (0xFDD0..=0xFDEF).contains(&code) || code & 0xFFFE == 0xFFFE
}

/// Whether OpenDAL uses `key` exactly as given and every backend keeps each of its
/// names as given, so that what is checked on the storage under that name is what is
/// then opened. The empty key (the volume root) and directory keys ending in `/`
/// qualify; keys with a leading `/`, empty components, or a name [`name_problem`]
/// refuses do not.
pub fn is_faithful_key(key: &str) -> bool {
    key.is_empty()
        || (opendal::raw::normalize_path(key) == key
            && key
                .trim_end_matches('/')
                .split('/')
                .all(|name| name_problem(name).is_none()))
}

/// A key under [`UPLOADS_DIR`], not used before, to stage an upload at.
pub fn staging_key() -> String {
    format!("{UPLOADS_DIR}/upload-{:016x}", rand::random::<u64>())
}

/// One move on the volume, by key and by path.
struct Move<'a> {
    from_key: &'a str,
    to_key: &'a str,
    from: PathBuf,
    to: PathBuf,
}

impl<'a> Move<'a> {
    fn new(root: &Path, from_key: &'a str, to_key: &'a str) -> Self {
        Self {
            from_key,
            to_key,
            from: root.join(from_key),
            to: root.join(to_key),
        }
    }

    fn failed(&self, source: io::Error) -> StorageError {
        StorageError::Move {
            from: self.from_key.to_owned(),
            to: self.to_key.to_owned(),
            source,
        }
    }

    fn taken(&self) -> StorageError {
        StorageError::Exists {
            key: self.to_key.to_owned(),
        }
    }

    fn replacing(&self) -> Result<(), StorageError> {
        std::fs::rename(&self.from, &self.to).map_err(|e| self.failed(e))
    }

    fn without_replacing(&self) -> Result<(), StorageError> {
        let meta = std::fs::symlink_metadata(&self.from).map_err(|e| self.failed(e))?;
        if meta.is_dir() {
            self.directory_without_replacing()
        } else {
            self.file_without_replacing()
        }
    }

    /// `link` fails if the target name is taken, by anything, links included; only then
    /// is the old name removed.
    fn file_without_replacing(&self) -> Result<(), StorageError> {
        match std::fs::hard_link(&self.from, &self.to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(self.taken()),
            Err(e) if without_hard_links(&e) => return self.checked_then_renamed(),
            Err(e) => return Err(self.failed(e)),
        }
        if let Err(source) = std::fs::remove_file(&self.from) {
            // Most likely another client moved the source away meanwhile: take back the
            // new name so that the file does not end up under two names.
            let _ = std::fs::remove_file(&self.to);
            return Err(self.failed(source));
        }
        Ok(())
    }

    /// Creating the target directory reserves the name; renaming a directory onto an
    /// empty one replaces it in one step.
    fn directory_without_replacing(&self) -> Result<(), StorageError> {
        match std::fs::create_dir(&self.to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(self.taken()),
            Err(e) => return Err(self.failed(e)),
        }
        if let Err(source) = std::fs::rename(&self.from, &self.to) {
            let _ = std::fs::remove_dir(&self.to);
            return Err(self.failed(source));
        }
        Ok(())
    }

    fn checked_then_renamed(&self) -> Result<(), StorageError> {
        match std::fs::symlink_metadata(&self.to) {
            Ok(_) => Err(self.taken()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.replacing(),
            Err(e) => Err(self.failed(e)),
        }
    }
}

/// Whether `link` failed because the filesystem has no hard links (`EPERM` or
/// `EOPNOTSUPP`, depending on the filesystem).
fn without_hard_links(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::Unsupported | io::ErrorKind::PermissionDenied
    )
}

fn check_components(root: &Path, key: &str) -> Result<(), StorageError> {
    let mut path = root.to_path_buf();
    let mut walked = String::new();
    for component in key.split('/').filter(|c| !c.is_empty()) {
        path.push(component);
        if !walked.is_empty() {
            walked.push('/');
        }
        walked.push_str(component);

        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(StorageError::Symlink { key: walked });
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(());
            }
            Err(source) => {
                return Err(StorageError::Inspect {
                    key: walked,
                    source,
                });
            }
        }
    }
    Ok(())
}

fn remove_stale_uploads(dir: &Path, max_age: Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        let age = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok());
        if meta.is_file() && age.is_some_and(|age| age > max_age) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(file = ?entry.file_name(), "Removed abandoned upload"),
                Err(error) => tracing::warn!(
                    file = ?entry.file_name(),
                    %error,
                    "Failed to remove abandoned upload"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_keys_are_those_under_the_uploads_dir() {
        assert!(is_reserved(".sluice-uploads"));
        assert!(is_reserved("/.sluice-uploads/x.123"));
        assert!(is_reserved("//.sluice-uploads/"));
        assert!(!is_reserved("home/.sluice-uploads"));
        assert!(!is_reserved(".sluice-uploads-not"));
        assert!(!is_reserved(""));
        assert!(is_reserved(".sluice-audit/2026-01-01/pod-0.jsonl"));
        assert!(!is_reserved("home/.sluice-audit"));
    }

    #[test]
    fn faithful_keys_are_those_opendal_and_every_backend_keep_as_given() {
        for key in ["", "a", "home/a b/c", "home/.x", "a/x\u{3000}y/b"] {
            assert!(is_faithful_key(key), "{key:?}");
        }
        for key in [
            "leaf ",
            " leaf",
            "home/leaf\t",
            "leaf\u{3000}",
            "/a",
            "a//b",
            "a/\u{3000}x/b",
            "\\.sluice-audit\\x",
            "home/a\\b/",
            "home/a\u{1}b",
            "a/./b",
            "a/../b",
            "home/x.",
            "a\u{fffe}",
        ] {
            assert!(!is_faithful_key(key), "{key:?}");
        }
        assert!(is_faithful_key("home/dir/"));
    }

    #[test]
    fn names_a_backend_would_rewrite_are_refused_with_the_reason() {
        let refused = [
            ("a\\b", NameProblem::Backslash),
            ("\\.sluice-audit", NameProblem::Backslash),
            ("a\0b", NameProblem::Control),
            ("a\rb", NameProblem::Control),
            ("a\u{1b}[31m", NameProblem::Control),
            ("a\u{7f}", NameProblem::Control),
            ("a\u{85}b", NameProblem::Control),
            ("a\u{fffe}b", NameProblem::Noncharacter),
            ("a\u{ffff}", NameProblem::Noncharacter),
            ("\u{fdd0}", NameProblem::Noncharacter),
            ("a\u{10ffff}", NameProblem::Noncharacter),
            (" a", NameProblem::Untrimmed),
            ("a\u{3000}", NameProblem::Untrimmed),
            ("a.", NameProblem::TrailingDot),
            (".sluice-audit.", NameProblem::TrailingDot),
            ("..", NameProblem::TrailingDot),
        ];
        for (name, problem) in refused {
            assert_eq!(name_problem(name), Some(problem), "{name:?}");
        }
        let kept = [
            "a.txt",
            ".hidden",
            "a b",
            "a%2Fb",
            "a+b",
            "日本語.csv",
            "e\u{301}",
            "a\u{fffd}b",
            "a\u{a0}b",
            "a\u{1f600}",
            "a..b",
        ];
        for name in kept {
            assert_eq!(name_problem(name), None, "{name:?}");
        }
    }

    #[tokio::test]
    async fn a_rename_never_replaces_a_file_or_directory() {
        let dir = tempfile::tempdir().unwrap();
        let volume = Volume::open_fs(dir.path()).unwrap();
        for name in ["a", "b"] {
            std::fs::write(dir.path().join(name), name).unwrap();
        }
        for name in ["d", "e"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }

        for (from, to) in [("a", "b"), ("a", "e"), ("d", "e"), ("d", "b")] {
            let refused = volume.rename(from, to).await;
            assert!(
                matches!(refused, Err(StorageError::Exists { .. })),
                "{from} -> {to}"
            );
        }
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), b"b");

        volume.rename("a", "e/a").await.unwrap();
        volume.rename("d", "e/d").await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("e/a")).unwrap(), b"a");
        assert!(dir.path().join("e/d").is_dir());
        assert!(!dir.path().join("a").exists() && !dir.path().join("d").exists());
        let missing = volume.rename("a", "f").await.unwrap_err();
        assert_eq!(missing.io_kind(), Some(io::ErrorKind::NotFound));
        assert!(!dir.path().join("f").exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn of_many_racing_renames_onto_one_name_exactly_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let volume = Volume::open_fs(dir.path()).unwrap();
        for i in 0..16 {
            std::fs::write(dir.path().join(format!("f{i}")), format!("{i}")).unwrap();
        }

        let renames = (0..16).map(|i| {
            let volume = volume.clone();
            tokio::spawn(async move { volume.rename(&format!("f{i}"), "target").await })
        });
        let results = futures::future::join_all(renames).await;
        let succeeded = results
            .into_iter()
            .filter(|r| matches!(r, Ok(Ok(()))))
            .count();
        assert_eq!(succeeded, 1);
        let left = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(left, 17, "15 sources, the target and the uploads directory");
    }

    #[tokio::test]
    async fn publishing_without_replacing_refuses_a_taken_name() {
        let dir = tempfile::tempdir().unwrap();
        let volume = Volume::open_fs(dir.path()).unwrap();
        std::fs::write(dir.path().join("taken"), b"first").unwrap();
        let staged = staging_key();
        std::fs::write(dir.path().join(&staged), b"second").unwrap();

        let refused = volume.publish(&staged, "taken", false).await;
        assert!(matches!(refused, Err(StorageError::Exists { .. })));
        assert_eq!(std::fs::read(dir.path().join("taken")).unwrap(), b"first");
        volume.publish(&staged, "taken", true).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("taken")).unwrap(), b"second");
        assert!(!dir.path().join(&staged).exists());
    }

    #[tokio::test]
    async fn a_partial_upload_is_invisible_until_closed() {
        let dir = tempfile::tempdir().unwrap();
        let volume = Volume::open_fs(dir.path()).unwrap();
        let op = volume.operator();

        let mut writer = op.writer("report.csv").await.unwrap();
        writer.write(b"half".to_vec()).await.unwrap();
        assert!(!dir.path().join("report.csv").exists());

        writer.write(b" and the rest".to_vec()).await.unwrap();
        writer.close().await.unwrap();
        let written = std::fs::read(dir.path().join("report.csv")).unwrap();
        assert_eq!(written, b"half and the rest");
        assert_eq!(
            std::fs::read_dir(dir.path().join(UPLOADS_DIR))
                .unwrap()
                .count(),
            0
        );
    }

    #[tokio::test]
    async fn an_aborted_upload_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let volume = Volume::open_fs(dir.path()).unwrap();

        let mut writer = volume.operator().writer("gone.bin").await.unwrap();
        writer.write(vec![7u8; 1024]).await.unwrap();
        writer.abort().await.unwrap();

        assert!(!dir.path().join("gone.bin").exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join(UPLOADS_DIR))
                .unwrap()
                .count(),
            0
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn listing_reports_links_as_other_without_following_them() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("file"), b"12345").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        let volume = Volume::open_fs(dir.path()).unwrap();

        let mut listing = volume.list("").await.unwrap();
        let mut seen = Vec::new();
        while let Some(entry) = listing.next().await.unwrap() {
            seen.push((entry.name, entry.kind, entry.size));
        }
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            seen,
            [
                (UPLOADS_DIR.to_owned(), ListedKind::Directory, 0),
                ("file".to_owned(), ListedKind::File, 5),
                ("link".to_owned(), ListedKind::Other, 0),
                ("sub".to_owned(), ListedKind::Directory, 0),
            ]
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_symlink_anywhere_on_the_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("home")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("home/escape")).unwrap();
        let volume = Volume::open_fs(dir.path()).unwrap();

        let refused = volume.refuse_symlinks("home/escape/passwd").await;
        assert!(matches!(refused, Err(StorageError::Symlink { key }) if key == "home/escape"));
        assert!(volume.refuse_symlinks("home/missing/deeper").await.is_ok());
        assert!(volume.refuse_symlinks("home").await.is_ok());
        assert!(volume.refuse_symlinks("").await.is_ok());
    }
}
