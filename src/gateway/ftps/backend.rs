//! The libunftp side of a session: its storage back end, mapping every call onto the
//! logged-in user's [`Vfs`], and the user object libunftp carries.
//!
//! Contract:
//! - libunftp hands each call the [`FtpUser`] it got at login; the user owns the session's
//!   [`Vfs`], so permissions, confinement and storage are exactly those of SFTP.
//! - Errors map through [`VfsError::reply`]: not found, denied and other permanent
//!   failures become 550 (553 for an unusable name), storage hiccups that may pass become
//!   450, unsupported requests 502. libunftp's reply texts are fixed per kind, so the
//!   [`VfsError`]'s own message (which never names a storage path) is left in the session
//!   context for the front end to send instead.
//! - Uploads stream into a [`FileWriter`] and are published only when the data connection
//!   ends cleanly. `REST n` + `STOR` keeps the file's first `n` bytes and `APPE` the whole
//!   file, through [`Vfs::resume`]: the kept bytes are copied into the upload's temporary
//!   file and the file is replaced when the upload completes, so readers never see it
//!   grow, and a failed resume leaves it as it was. Which of the two a `put` is comes from
//!   the front end ([`SessionContext::take_append`]), not from the offset libunftp passes:
//!   libunftp computes an `APPE` offset from `metadata`, which fails without the list or
//!   read permission and would make an append replace the file. Downloads honour REST
//!   through ranged reads. A download that fails to read storage midway ends with an
//!   error, never as a shorter file: [`VfsBackend::get_into`] returns it, and the reader
//!   [`VfsBackend::get`] hands out fails with it rather than ending early.
//! - Completed transfers are logged at info with their byte counts; storage failures at
//!   warn; refused requests at debug.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;
use unftp_core::auth::UserDetail;
use unftp_core::storage::{
    Error, ErrorKind, FEATURE_RESTART, Fileinfo, Metadata, Permissions, Result, StorageBackend,
};

use crate::gateway::ErrorChain;
use crate::gateway::ftps::engine::SessionContext;
use crate::gateway::ftps::protocol::Reply as FtpReply;
use crate::gateway::vfs::{Entry, Reply, ResumeAt, UploadStart, Vfs, VfsError, WriteMode};

/// Bytes read from storage or the data connection at a time.
const CHUNK: usize = 256 * 1024;
/// Entries fetched from a directory listing at a time.
const LIST_BATCH: usize = 512;

/// A logged-in user as libunftp sees it: the name and the session's view of the volume.
pub struct FtpUser {
    name: String,
    vfs: Vfs,
}

impl FtpUser {
    /// The user `name`, working on `vfs`.
    pub fn new(name: String, vfs: Vfs) -> Self {
        Self { name, vfs }
    }
}

impl UserDetail for FtpUser {}

impl fmt::Display for FtpUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for FtpUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FtpUser").field("name", &self.name).finish()
    }
}

/// File attributes for listings, `SIZE`, `MDTM` and `MLST`.
#[derive(Debug)]
pub struct Meta(Entry);

impl Metadata for Meta {
    fn len(&self) -> u64 {
        self.0.size
    }

    fn is_dir(&self) -> bool {
        self.0.is_dir()
    }

    fn is_file(&self) -> bool {
        !self.0.is_dir()
    }

    fn is_symlink(&self) -> bool {
        false
    }

    fn modified(&self) -> Result<SystemTime> {
        self.0
            .modified
            .ok_or_else(|| ErrorKind::PermanentFileNotAvailable.into())
    }

    fn gid(&self) -> u32 {
        0
    }

    fn uid(&self) -> u32 {
        0
    }

    fn permissions(&self) -> Permissions {
        Permissions(if self.0.is_dir() { 0o755 } else { 0o644 })
    }
}

/// One session's storage back end. libunftp creates it before login; every call carries
/// the logged-in [`FtpUser`].
pub struct VfsBackend {
    context: Arc<SessionContext>,
}

impl fmt::Debug for VfsBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VfsBackend")
    }
}

impl VfsBackend {
    /// A back end reporting into `context`.
    pub fn new(context: Arc<SessionContext>) -> Self {
        Self { context }
    }

    /// The error libunftp turns into a reply, logging it and leaving its message for the
    /// front end.
    fn refuse(&self, operation: &'static str, path: &str, error: VfsError) -> Error {
        log_refusal(&self.context, operation, path, &error);
        self.context.set_reply_text(error.to_string());
        let directory = matches!(operation, "cwd" | "list" | "rmd");
        Error::new(error_kind(&error, directory), error)
    }

    /// Stores `input` at `path`, after the start of the existing file that `start` keeps.
    async fn upload<R>(
        &self,
        vfs: &Vfs,
        path: &str,
        start: UploadStart,
        mut input: R,
    ) -> Result<u64>
    where
        R: AsyncRead + Unpin,
    {
        let writer = match start {
            UploadStart::New(mode) => vfs.create(path, mode).await,
            // Copying the kept start can take a while; it stops with the session (the
            // staged copy is removed when the unfinished writer is dropped).
            UploadStart::Resume(at) => tokio::select! {
                writer = vfs.resume(path, at) => writer,
                () = self.context.ended() => {
                    let error =
                        std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "session ended");
                    return Err(Error::new(ErrorKind::ConnectionClosed, error));
                }
            },
        };
        let mut writer = match writer {
            Ok(writer) => writer,
            Err(error) => return Err(self.refuse("stor", path, error)),
        };
        let kept = writer.bytes_written();
        let mut buffer = Vec::with_capacity(CHUNK);
        loop {
            let read = (&mut input)
                .take(CHUNK as u64)
                .read_to_end(&mut buffer)
                .await;
            match read {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) => {
                    // The front end resets the connection when the client's did not end
                    // cleanly, so a truncated upload is never published.
                    let text = "upload interrupted: the data connection did not end cleanly; \
                                nothing was stored";
                    self.context.set_reply_text(text.into());
                    tracing::info!(
                        parent: self.context.span(),
                        path,
                        bytes = writer.bytes_written(),
                        %error,
                        "Upload interrupted"
                    );
                    let _ = writer.abort().await;
                    return Err(Error::new(ErrorKind::ConnectionClosed, error));
                }
            }
            let offset = writer.bytes_written();
            let data = std::mem::replace(&mut buffer, Vec::with_capacity(CHUNK));
            if let Err(error) = writer.write_at(offset, data).await {
                let _ = writer.abort().await;
                return Err(self.refuse("stor", path, error));
            }
        }

        match writer.close().await {
            Ok(size) => {
                let bytes = size - kept;
                let span = self.context.span();
                tracing::info!(parent: span, path, bytes, kept, size, "Upload completed");
                Ok(bytes)
            }
            Err(error) => Err(self.refuse("stor", path, error)),
        }
    }

    async fn download<W>(&self, vfs: &Vfs, path: &str, offset: u64, output: &mut W) -> Result<u64>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let mut reader = match vfs.open_read(path).await {
            Ok(reader) => reader,
            Err(error) => return Err(self.refuse("retr", path, error)),
        };
        let mut position = offset;
        loop {
            let chunk = match reader.read_at(position, CHUNK as u32).await {
                Ok(chunk) if chunk.is_empty() => break,
                Ok(chunk) => chunk,
                Err(error) => return Err(self.refuse("retr", path, error)),
            };
            if let Err(error) = output.write_all(&chunk).await {
                tracing::info!(
                    parent: self.context.span(),
                    path,
                    bytes = reader.bytes_read(),
                    %error,
                    "Download interrupted"
                );
                return Err(error.into());
            }
            position += chunk.len() as u64;
        }
        output.flush().await?;

        let size = reader.size();
        let bytes = match reader.finish().await {
            Ok(bytes) => bytes,
            Err(error) => return Err(self.refuse("retr", path, error)),
        };
        tracing::info!(
            parent: self.context.span(),
            path,
            bytes,
            offset,
            size,
            "Download completed"
        );
        Ok(bytes)
    }
}

/// How `put` starts an upload: an `APPE` keeps the whole file, a `STOR` after `REST n`
/// (`offset`) its first `n` bytes, a plain `STOR` nothing.
pub fn upload_start(append: bool, offset: u64) -> UploadStart {
    match (append, offset) {
        (true, _) => UploadStart::Resume(ResumeAt::End),
        (false, 0) => UploadStart::New(WriteMode::Replace),
        (false, offset) => UploadStart::Resume(ResumeAt::Offset(offset)),
    }
}

/// Decides, before the front end sends `150`, whether the upload of `path` that `start`
/// describes would start now ([`Vfs::check_upload`]). A refusal is logged and recorded
/// as `put`'s would be, and comes back as the reply `put`'s would get: the same code and
/// the [`VfsError`]'s own message.
pub async fn check_upload(
    context: &SessionContext,
    vfs: &Vfs,
    path: &str,
    start: UploadStart,
) -> std::result::Result<(), FtpReply> {
    vfs.check_upload(path, start).await.map_err(|error| {
        log_refusal(context, "stor", path, &error);
        FtpReply::new(reply_code(error_kind(&error, false)), error.to_string())
    })
}

/// Logs a failed storage operation at warn, a refused request at debug.
fn log_refusal(context: &SessionContext, operation: &'static str, path: &str, error: &VfsError) {
    let span = context.span();
    if error.is_internal() {
        tracing::warn!(
            parent: span,
            operation,
            path,
            error = %ErrorChain(error),
            "Storage operation failed"
        );
    } else {
        tracing::debug!(parent: span, operation, path, %error, "Request refused");
    }
}

/// The reply code libunftp sends for a storage error of `kind`.
fn reply_code(kind: ErrorKind) -> u16 {
    match kind {
        ErrorKind::TransientFileNotAvailable => 450,
        ErrorKind::PermanentFileNotAvailable
        | ErrorKind::PermanentDirectoryNotAvailable
        | ErrorKind::PermanentDirectoryNotEmpty
        | ErrorKind::PermissionDenied => 550,
        ErrorKind::ConnectionClosed => 426,
        ErrorKind::LocalError => 451,
        ErrorKind::PageTypeUnknown => 551,
        ErrorKind::InsufficientStorageSpaceError => 452,
        ErrorKind::ExceededStorageAllocationError => 552,
        ErrorKind::FileNameNotAllowedError => 553,
        ErrorKind::CommandNotImplemented => 502,
    }
}

/// The libunftp error kind (and so the reply code) for a [`VfsError`].
fn error_kind(error: &VfsError, directory: bool) -> ErrorKind {
    match error.reply() {
        Reply::NotFound if directory => ErrorKind::PermanentDirectoryNotAvailable,
        Reply::NotFound => ErrorKind::PermanentFileNotAvailable,
        Reply::PermissionDenied => ErrorKind::PermissionDenied,
        Reply::Unsupported => ErrorKind::CommandNotImplemented,
        Reply::Failure if error.is_transient() => ErrorKind::TransientFileNotAvailable,
        Reply::Failure => match error {
            VfsError::NotEmpty => ErrorKind::PermanentDirectoryNotEmpty,
            VfsError::InvalidPath | VfsError::InvalidName(_) => ErrorKind::FileNameNotAllowedError,
            VfsError::NotADirectory if directory => ErrorKind::PermanentDirectoryNotAvailable,
            _ => ErrorKind::PermanentFileNotAvailable,
        },
    }
}

/// libunftp builds paths from client strings, so they are always UTF-8.
fn client_path(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| ErrorKind::FileNameNotAllowedError.into())
}

#[async_trait]
impl StorageBackend<FtpUser> for VfsBackend {
    type Metadata = Meta;

    fn supported_features(&self) -> u32 {
        FEATURE_RESTART
    }

    async fn metadata<P>(&self, user: &FtpUser, path: P) -> Result<Meta>
    where
        P: AsRef<Path> + Send + fmt::Debug,
    {
        let path = client_path(path.as_ref())?;
        match user.vfs.stat(path).await {
            Ok(entry) => Ok(Meta(entry)),
            Err(error) => Err(self.refuse("stat", path, error)),
        }
    }

    async fn list<P>(&self, user: &FtpUser, path: P) -> Result<Vec<Fileinfo<PathBuf, Meta>>>
    where
        P: AsRef<Path> + Send + fmt::Debug,
    {
        let path = client_path(path.as_ref())?;
        let mut listing = match user.vfs.list(path).await {
            Ok(listing) => listing,
            // `LIST file` lists that one file, as FTP servers traditionally do.
            Err(VfsError::NotADirectory) => {
                let entry = user.vfs.stat(path).await;
                let entry = entry.map_err(|error| self.refuse("list", path, error))?;
                return Ok(vec![file_info(entry)]);
            }
            Err(error) => return Err(self.refuse("list", path, error)),
        };

        let mut entries = Vec::new();
        loop {
            let batch = listing.next_batch(LIST_BATCH).await;
            let batch = batch.map_err(|error| self.refuse("list", path, error))?;
            if batch.is_empty() {
                return Ok(entries);
            }
            entries.extend(batch.into_iter().map(file_info));
        }
    }

    async fn get_into<'a, P, W>(
        &self,
        user: &FtpUser,
        path: P,
        start_pos: u64,
        output: &'a mut W,
    ) -> Result<u64>
    where
        W: AsyncWrite + Unpin + Sync + Send + ?Sized,
        P: AsRef<Path> + Send + fmt::Debug,
    {
        let path = client_path(path.as_ref())?;
        self.download(&user.vfs, path, start_pos, output).await
    }

    async fn get<P>(
        &self,
        user: &FtpUser,
        path: P,
        start_pos: u64,
    ) -> Result<Box<dyn AsyncRead + Send + Sync + Unpin>>
    where
        P: AsRef<Path> + Send + fmt::Debug,
    {
        // libunftp downloads through `get_into`; this serves anything else that asks for a
        // reader, fed by ranged reads from a task of its own.
        let path = client_path(path.as_ref())?.to_owned();
        let reader = user.vfs.open_read(&path).await;
        let mut reader = reader.map_err(|error| self.refuse("retr", &path, error))?;
        let (feed, chunks) = mpsc::channel(2);
        let backend = Self::new(self.context.clone());
        tokio::spawn(async move {
            let mut position = start_pos;
            loop {
                let sent = match reader.read_at(position, CHUNK as u32).await {
                    Ok(chunk) if chunk.is_empty() => {
                        let end = match reader.finish().await {
                            Ok(_) => Ok(Feed::END),
                            Err(error) => {
                                let error = backend.refuse("retr", &path, error);
                                Err(io::Error::other(error))
                            }
                        };
                        let _ = feed.send(end).await;
                        return;
                    }
                    Ok(chunk) => {
                        position += chunk.len() as u64;
                        feed.send(Ok(chunk)).await
                    }
                    Err(error) => {
                        let error = backend.refuse("retr", &path, error);
                        let _ = feed.send(Err(io::Error::other(error))).await;
                        return;
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        Ok(Box::new(Feed::new(chunks)))
    }

    async fn put<P, R>(&self, user: &FtpUser, input: R, path: P, start_pos: u64) -> Result<u64>
    where
        P: AsRef<Path> + Send + fmt::Debug,
        R: AsyncRead + Send + Sync + Unpin + 'static,
    {
        let path = client_path(path.as_ref())?;
        let start = upload_start(self.context.take_append(), start_pos);
        self.upload(&user.vfs, path, start, input).await
    }

    async fn del<P>(&self, user: &FtpUser, path: P) -> Result<()>
    where
        P: AsRef<Path> + Send + fmt::Debug,
    {
        let path = client_path(path.as_ref())?;
        user.vfs
            .remove(path)
            .await
            .map_err(|error| self.refuse("dele", path, error))?;
        tracing::info!(parent: self.context.span(), path, "Removed file");
        Ok(())
    }

    async fn mkd<P>(&self, user: &FtpUser, path: P) -> Result<()>
    where
        P: AsRef<Path> + Send + fmt::Debug,
    {
        let path = client_path(path.as_ref())?;
        user.vfs
            .mkdir(path)
            .await
            .map_err(|error| self.refuse("mkd", path, error))
    }

    async fn rename<P>(&self, user: &FtpUser, from: P, to: P) -> Result<()>
    where
        P: AsRef<Path> + Send + fmt::Debug,
    {
        let (from, to) = (client_path(from.as_ref())?, client_path(to.as_ref())?);
        // RNTO replaces a file, as rename(2) and common FTP servers do: clients that
        // upload under a temporary name (lftp's `xfer:use-temp-file`) rely on it.
        user.vfs
            .rename_replacing(from, to)
            .await
            .map_err(|error| self.refuse("rename", from, error))?;
        tracing::info!(parent: self.context.span(), from, to, "Renamed");
        Ok(())
    }

    async fn rmd<P>(&self, user: &FtpUser, path: P) -> Result<()>
    where
        P: AsRef<Path> + Send + fmt::Debug,
    {
        let path = client_path(path.as_ref())?;
        user.vfs
            .rmdir(path)
            .await
            .map_err(|error| self.refuse("rmd", path, error))
    }

    async fn cwd<P>(&self, user: &FtpUser, path: P) -> Result<()>
    where
        P: AsRef<Path> + Send + fmt::Debug,
    {
        let path = client_path(path.as_ref())?;
        match user.vfs.stat(path).await {
            Ok(entry) if entry.is_dir() => Ok(()),
            Ok(_) => Err(self.refuse("cwd", path, VfsError::NotADirectory)),
            Err(error) => Err(self.refuse("cwd", path, error)),
        }
    }
}

/// The reading end of a download fed by a task: the chunks it sends, then an explicit end
/// ([`Feed::END`]) or an error. A feed that stops without either (the task died) is an
/// error too, so a download can never end short and look complete.
struct Feed {
    chunks: mpsc::Receiver<io::Result<Bytes>>,
    pending: Bytes,
    ended: bool,
}

impl Feed {
    /// Sent last, after the last chunk.
    const END: Bytes = Bytes::new();

    fn new(chunks: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        Self {
            chunks,
            pending: Bytes::new(),
            ended: false,
        }
    }
}

impl AsyncRead for Feed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending.is_empty() && !self.ended {
            match ready!(self.chunks.poll_recv(cx)) {
                Some(Ok(chunk)) if chunk.is_empty() => self.ended = true,
                Some(Ok(chunk)) => self.pending = chunk,
                Some(Err(error)) => return Poll::Ready(Err(error)),
                None => {
                    let stopped = "the download stopped before the end of the file";
                    return Poll::Ready(Err(io::Error::other(stopped)));
                }
            }
        }
        let take = self.pending.len().min(buf.remaining());
        let chunk = self.pending.split_to(take);
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

fn file_info(entry: Entry) -> Fileinfo<PathBuf, Meta> {
    Fileinfo {
        path: PathBuf::from(&entry.name),
        metadata: Meta(entry),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Permission;
    use crate::storage::NameProblem;

    #[test]
    fn vfs_errors_map_to_transient_and_permanent_replies() {
        let kind = |error: VfsError| error_kind(&error, false);
        assert_eq!(
            kind(VfsError::NotFound),
            ErrorKind::PermanentFileNotAvailable
        );
        assert_eq!(
            error_kind(&VfsError::NotFound, true),
            ErrorKind::PermanentDirectoryNotAvailable
        );
        assert_eq!(
            kind(VfsError::Denied(Permission::Write)),
            ErrorKind::PermissionDenied
        );
        assert_eq!(kind(VfsError::Symlink), ErrorKind::PermissionDenied);
        assert_eq!(
            kind(VfsError::NotEmpty),
            ErrorKind::PermanentDirectoryNotEmpty
        );
        assert_eq!(
            kind(VfsError::InvalidPath),
            ErrorKind::FileNameNotAllowedError
        );
        assert_eq!(
            kind(VfsError::InvalidName(NameProblem::Backslash)),
            ErrorKind::FileNameNotAllowedError
        );
        assert_eq!(
            kind(VfsError::AlreadyExists),
            ErrorKind::PermanentFileNotAvailable
        );
        let temporary = opendal::Error::new(opendal::ErrorKind::Unexpected, "busy").set_temporary();
        assert_eq!(
            kind(VfsError::Storage(temporary)),
            ErrorKind::TransientFileNotAvailable
        );
        let permanent = opendal::Error::new(opendal::ErrorKind::Unexpected, "broken");
        assert_eq!(
            kind(VfsError::Storage(permanent)),
            ErrorKind::PermanentFileNotAvailable
        );
        assert_eq!(
            kind(VfsError::TooManyUploads),
            ErrorKind::TransientFileNotAvailable
        );
        assert_eq!(
            kind(VfsError::WritesSuspended("writes are suspended: x".into())),
            ErrorKind::PermissionDenied
        );
        assert_eq!(
            kind(VfsError::UploadRefused("upload refused: x".into())),
            ErrorKind::PermissionDenied
        );
        assert_eq!(
            kind(VfsError::AuditUnavailable),
            ErrorKind::TransientFileNotAvailable
        );
        let offset = VfsError::NonSequentialWrite {
            expected: 0,
            got: 1,
        };
        assert_eq!(kind(offset), ErrorKind::CommandNotImplemented);
    }

    #[test]
    fn an_upload_starts_as_put_is_asked_and_refusals_get_libunftps_codes() {
        use crate::gateway::vfs::{ResumeAt, UploadStart, WriteMode};
        assert_eq!(upload_start(false, 0), UploadStart::New(WriteMode::Replace));
        assert_eq!(
            upload_start(false, 7),
            UploadStart::Resume(ResumeAt::Offset(7))
        );
        assert_eq!(upload_start(true, 7), UploadStart::Resume(ResumeAt::End));
        assert_eq!(reply_code(ErrorKind::PermissionDenied), 550);
        assert_eq!(reply_code(ErrorKind::TransientFileNotAvailable), 450);
        assert_eq!(reply_code(ErrorKind::FileNameNotAllowedError), 553);
    }

    #[tokio::test]
    async fn an_upload_refused_before_its_data_gets_the_code_and_text_put_would_send() {
        let dir = tempfile::tempdir().unwrap();
        let storage =
            crate::storage::Storage::from(crate::storage::Volume::open_fs(dir.path()).unwrap());
        let log = crate::gateway::audit::test_session(&storage).await;
        let user = |permissions: &[Permission]| crate::gateway::config::GatewayUser {
            name: "cucm".into(),
            password_hash: None,
            public_keys: vec![],
            home: "/cucm".into(),
            permissions: permissions.to_vec(),
        };
        let (read_only, write_only) = (user(&[Permission::Read]), user(&[Permission::Write]));
        let reader = Vfs::open(storage.clone(), &read_only, &log).await.unwrap();
        let writer = Vfs::open(storage, &write_only, &log).await.unwrap();
        std::fs::write(dir.path().join("cucm/short"), b"abc").unwrap();
        let context = SessionContext::new(tracing::Span::none(), log);

        let check = async |vfs: &Vfs, path: &str, offset: u64| {
            let start = upload_start(false, offset);
            check_upload(&context, vfs, path, start)
                .await
                .map_err(|reply| (reply.code, reply.text().to_owned()))
        };
        let denied = "permission denied: the Write permission is not granted";
        assert_eq!(check(&reader, "/new", 0).await, Err((550, denied.into())));
        let beyond = "cannot resume at byte 9: the file is shorter";
        assert_eq!(check(&writer, "/short", 9).await, Err((550, beyond.into())));
        let invalid = "invalid file name: file names cannot contain a backslash";
        assert_eq!(check(&writer, "/a\\b", 0).await, Err((553, invalid.into())));
        assert_eq!(check(&writer, "/short", 3).await, Ok(()));
        // Nothing is left for the reply libunftp sends next.
        assert_eq!(context.take_reply_text(), None);
        assert!(!dir.path().join("cucm/new").exists());
    }

    #[tokio::test]
    async fn a_read_error_fails_the_reader_of_get_instead_of_ending_it_early() {
        let dir = tempfile::tempdir().unwrap();
        let volume = crate::storage::Volume::open_fs(dir.path()).unwrap();
        let home = crate::gateway::config::GatewayUser {
            name: "cucm".into(),
            password_hash: None,
            public_keys: vec![],
            home: "/cucm".into(),
            permissions: vec![Permission::Read, Permission::List],
        };
        let storage = crate::storage::Storage::from(volume);
        let log = crate::gateway::audit::test_session(&storage).await;
        let vfs = Vfs::open(storage, &home, &log).await.unwrap();
        let user = FtpUser::new("cucm".into(), vfs);
        let backend = VfsBackend::new(SessionContext::new(tracing::Span::none(), log));
        std::fs::write(dir.path().join("cucm/whole"), vec![5u8; 600_000]).unwrap();
        std::fs::write(dir.path().join("cucm/gone"), b"read fails").unwrap();

        let mut whole = Vec::new();
        let mut reader = backend.get(&user, "whole", 1000).await.unwrap();
        reader.read_to_end(&mut whole).await.unwrap();
        assert_eq!(whole, vec![5u8; 599_000]);

        // Opened, then removed before the feeding task (not run yet) reads it.
        let mut reader = backend.get(&user, "gone", 0).await.unwrap();
        std::fs::remove_file(dir.path().join("cucm/gone")).unwrap();
        let mut read = Vec::new();
        let failed = reader.read_to_end(&mut read).await;
        assert!(failed.is_err(), "read {read:?} and no error");
        assert_eq!(
            backend.context.take_reply_text().as_deref(),
            Some("no such file or directory")
        );
    }

    #[test]
    fn listings_show_directories_and_files_with_plain_modes() {
        let entry = |name: &str, kind| Entry {
            name: name.into(),
            kind,
            size: 7,
            modified: Some(SystemTime::UNIX_EPOCH),
        };
        let file = file_info(entry("a.txt", crate::gateway::vfs::EntryKind::File));
        let dir = file_info(entry("d", crate::gateway::vfs::EntryKind::Directory));
        assert!(file.to_string().starts_with("-rw-r--r--"), "{file}");
        assert!(file.to_string().ends_with(" a.txt"), "{file}");
        assert!(dir.to_string().starts_with("drwxr-xr-x"), "{dir}");
    }
}
