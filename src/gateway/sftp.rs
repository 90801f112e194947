//! The SFTP front end: an SSH server (russh) that offers nothing but the `sftp` subsystem
//! (russh-sftp), mapping each SFTP request onto the logged-in user's [`Vfs`].
//!
//! Contract:
//! - Password and public-key authentication against the [`LiveLogins`] in force when the
//!   attempt is made; a connection advertises only the methods that some login can
//!   complete. Password checks run on blocking threads, a bounded number at a time.
//! - Only the `sftp` subsystem is served. Shell, exec and pty requests are refused with a
//!   message on the channel's stderr; forwarding of any kind is refused (russh's default).
//! - Every connection gets a span carrying the peer and, after login, the user. Logins and
//!   completed transfers (with their byte counts) are logged at info, failed logins at
//!   warn (user and peer, never the password), storage failures at warn. A connection that
//!   closes before or during the SSH handshake is logged at debug only.
//! - [`SftpServer::serve`] stops accepting when told to, lets running sessions finish for
//!   a grace period, then disconnects the rest.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use russh::keys::PrivateKey;
use russh::server::{Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, Disconnect, MethodKind, MethodSet, SshId};
use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode, Version,
};
use russh_sftp::server::StatusReply;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, Span, field};

use crate::api::Permission;
use crate::gateway::auth::{LiveLogins, Login};
use crate::gateway::vfs::{
    DirStream, Entry, EntryKind, FileReader, FileWriter, Reply, Vfs, VfsError, WriteMode,
};
use crate::gateway::{ErrorChain, stopped};
use crate::storage::Volume;

/// Identification string sent to clients; deliberately without a version.
const SERVER_ID: &str = "SSH-2.0-Sluice";
/// Entries per SSH_FXP_NAME reply to READDIR.
const READDIR_BATCH: usize = 128;
/// Largest SSH_FXP_DATA reply; clients ask for 32 KiB to 256 KiB.
const MAX_READ: u32 = 256 * 1024;
/// Open file and directory handles one SFTP session may hold.
const MAX_HANDLES: usize = 64;
/// Time after the grace period that disconnected sessions get to wind down.
const DISCONNECT_WAIT: Duration = Duration::from_secs(2);
/// Message sent on stderr when a client asks for anything but SFTP.
const SFTP_ONLY: &str = "This service allows SFTP connections only.\r\n";

/// The SSH server of a gateway.
#[derive(Clone)]
pub struct SftpServer {
    shared: Arc<Shared>,
}

struct Shared {
    host_keys: Vec<PrivateKey>,
    logins: LiveLogins,
    volume: Volume,
    password_checks: Semaphore,
}

impl SftpServer {
    /// A server presenting `host_keys`, checking credentials against `logins` and serving
    /// files from `volume`.
    pub fn new(host_keys: Vec<PrivateKey>, logins: LiveLogins, volume: Volume) -> Self {
        // Each Argon2id check holds 19 MiB and a core; bound them so a burst of login
        // attempts cannot exhaust the pod.
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let shared = Shared {
            host_keys,
            logins,
            volume,
            password_checks: Semaphore::new(cores * 2),
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Accepts connections on `listener` until `shutdown` turns true, then waits up to
    /// `grace` for running sessions to end before disconnecting them. Failing to accept
    /// one connection does not stop the server.
    pub async fn serve(
        &self,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
        grace: Duration,
    ) {
        // Our own accept loop around `russh::server::run_stream` rather than russh's
        // `run_on_socket`: that one gives no per-connection span, reports session errors
        // only through a callback, and cannot let sessions drain before disconnecting them.
        let (disconnect_tx, disconnect_rx) = watch::channel(false);
        let mut sessions = JoinSet::new();
        loop {
            tokio::select! {
                () = stopped(&mut shutdown) => break,
                Some(ended) = sessions.join_next(), if !sessions.is_empty() => {
                    report_panic(ended);
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let shared = self.shared.clone();
                        let disconnect = disconnect_rx.clone();
                        sessions.spawn(run_connection(shared, stream, peer, disconnect));
                    }
                    Err(error) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(%error, "Failed to accept SFTP connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);

        drain(sessions, grace, disconnect_tx).await;
    }
}

/// A session task that panicked is a bug worth an error; its connection is gone.
fn report_panic(ended: Result<(), tokio::task::JoinError>) {
    if let Err(error) = ended
        && error.is_panic()
    {
        tracing::error!(%error, "SFTP session panicked");
    }
}

async fn drain(mut sessions: JoinSet<()>, grace: Duration, disconnect: watch::Sender<bool>) {
    if sessions.is_empty() {
        return;
    }
    tracing::info!(
        sessions = sessions.len(),
        ?grace,
        "Waiting for SFTP sessions to end"
    );
    let all_ended = async { while sessions.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all_ended).await.is_ok() {
        return;
    }

    tracing::info!(
        sessions = sessions.len(),
        "Disconnecting remaining SFTP sessions"
    );
    let _ = disconnect.send(true);
    let all_ended = async { while sessions.join_next().await.is_some() {} };
    if tokio::time::timeout(DISCONNECT_WAIT, all_ended)
        .await
        .is_err()
    {
        sessions.abort_all();
    }
}

/// The SSH configuration for a new connection: the host keys, and only the authentication
/// methods that some current login can complete.
fn ssh_config(shared: &Shared) -> Arc<russh::server::Config> {
    let logins = shared.logins.current();
    let mut methods = MethodSet::empty();
    if logins.any_public_key() {
        methods.push(MethodKind::PublicKey);
    }
    if logins.any_password() {
        methods.push(MethodKind::Password);
    }
    Arc::new(russh::server::Config {
        server_id: SshId::Standard(SERVER_ID.into()),
        methods,
        keys: shared.host_keys.clone(),
        auth_rejection_time: Duration::from_secs(1),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: Some(Duration::from_secs(600)),
        keepalive_interval: Some(Duration::from_secs(60)),
        ..Default::default()
    })
}

/// Runs one SSH connection to its end, or until `disconnect` turns true.
async fn run_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    mut disconnect: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("sftp", %peer, user = field::Empty);
    let config = ssh_config(&shared);
    let handler = SshSession::new(shared, config.methods.clone(), span.clone());
    async move {
        let session = match russh::server::run_stream(config, stream, handler).await {
            Ok(session) => session,
            Err(error) => {
                tracing::debug!(error = %ErrorChain(&error), "Connection closed before SSH");
                return;
            }
        };
        let handle = session.handle();
        tokio::pin!(session);
        tokio::select! {
            result = &mut session => log_connection_end(result),
            () = stopped(&mut disconnect) => {
                let reason = "the gateway is shutting down".to_owned();
                let _ = handle.disconnect(Disconnect::ByApplication, reason, "en".into()).await;
                log_connection_end(session.await);
            }
        }
    }
    .instrument(span)
    .await
}

/// Clients hang up in many ways (EOF, reset, disconnect message); none of them is the
/// gateway's problem, so none is worth more than debug.
fn log_connection_end(result: Result<(), russh::Error>) {
    match result {
        Ok(()) => tracing::debug!("Connection closed"),
        Err(error) => tracing::debug!(error = %ErrorChain(&error), "Connection ended"),
    }
}

/// The SSH side of one connection: authentication and channel requests.
struct SshSession {
    shared: Arc<Shared>,
    methods: MethodSet,
    /// russh calls the handler from a task of its own, outside any span of ours, so every
    /// event names this span as its parent explicitly.
    span: Span,
    vfs: Option<Vfs>,
    channels: HashMap<ChannelId, Channel<Msg>>,
    /// User and number of public keys refused, for the warning when the client gives up.
    refused_keys: Option<(String, usize)>,
}

impl SshSession {
    fn new(shared: Arc<Shared>, methods: MethodSet, span: Span) -> Self {
        Self {
            shared,
            methods,
            span,
            vfs: None,
            channels: HashMap::new(),
            refused_keys: None,
        }
    }

    /// A rejection that leaves every advertised method open, so that a client can retry
    /// a mistyped password (russh would otherwise drop the method for the connection);
    /// `max_auth_attempts` still bounds the attempts.
    fn reject(&self) -> Auth {
        Auth::Reject {
            proceed_with_methods: Some(self.methods.clone()),
            partial_success: false,
        }
    }

    fn login(&self, user: &str) -> Option<Arc<Login>> {
        self.shared.logins.current().get(user)
    }

    async fn password_matches(&self, login: Arc<Login>, password: &str) -> bool {
        let Ok(_permit) = self.shared.password_checks.acquire().await else {
            return false;
        };
        let password = password.as_bytes().to_vec();
        let check = tokio::task::spawn_blocking(move || login.accepts_password(&password));
        check.await.unwrap_or(false)
    }

    async fn log_in(&mut self, login: &Login, method: &'static str) -> Auth {
        let user = login.user();
        match Vfs::open(self.shared.volume.clone(), user).await {
            Ok(vfs) => {
                self.span.record("user", user.name.as_str());
                tracing::info!(parent: &self.span, method, "Logged in");
                self.vfs = Some(vfs);
                self.refused_keys = None;
                Auth::Accept
            }
            Err(error) => {
                tracing::warn!(
                    parent: &self.span,
                    user = %user.name,
                    error = %ErrorChain(&error),
                    "Login refused: home directory unusable"
                );
                self.reject()
            }
        }
    }

    fn refuse_request(&self, channel: ChannelId, what: &str, session: &mut Session) {
        tracing::info!(parent: &self.span, request = what, "Refused non-SFTP request");
        // The channel may already be gone; there is nothing to do about that.
        let _ = session.extended_data(channel, 1, Bytes::from_static(SFTP_ONLY.as_bytes()));
        let _ = session.channel_failure(channel);
        let _ = session.exit_status_request(channel, 1);
        let _ = session.eof(channel);
        let _ = session.close(channel);
    }
}

impl russh::server::Handler for SshSession {
    type Error = russh::Error;

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        let login = self.login(user).filter(|login| login.has_password());
        let Some(login) = login else {
            let reason = "no such password login";
            tracing::warn!(parent: &self.span, user, reason, "Login failed");
            return Ok(self.reject());
        };
        if !self.password_matches(login.clone(), password).await {
            tracing::warn!(parent: &self.span, user, reason = "wrong password", "Login failed");
            return Ok(self.reject());
        }
        Ok(self.log_in(&login, "password").await)
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if self
            .login(user)
            .is_some_and(|login| login.accepts_key(offer.public_key))
        {
            return Ok(Auth::Accept);
        }
        // Clients offer every key they hold; a refusal is only a failed login if the
        // client gives up, which is reported when the connection ends.
        let refused = self
            .refused_keys
            .get_or_insert_with(|| (user.to_owned(), 0));
        refused.1 += 1;
        tracing::debug!(parent: &self.span, user, "Public key not authorised");
        Ok(self.reject())
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        // Checked again: the configuration may have changed since the key was offered.
        match self
            .login(user)
            .filter(|login| login.accepts_key(key.public_key))
        {
            Some(login) => Ok(self.log_in(&login, "publickey").await),
            None => {
                let reason = "key not authorised";
                tracing::warn!(parent: &self.span, user, reason, "Login failed");
                Ok(self.reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.close(channel)
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel_id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let channel = self.channels.remove(&channel_id);
        let (Some(channel), Some(vfs), "sftp") = (channel, self.vfs.clone(), name) else {
            self.refuse_request(channel_id, "subsystem", session);
            return Ok(());
        };

        session.channel_success(channel_id)?;
        let sftp = SftpSession::new(vfs, self.span.clone());
        // Spawns the request loop; it ends when the channel does.
        russh_sftp::server::run(channel.into_stream(), sftp).await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _command: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_request(channel, "exec", session);
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_request(channel, "shell", session);
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _variable_name: &str,
        _variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }
}

impl Drop for SshSession {
    fn drop(&mut self) {
        if let Some((user, keys)) = self.refused_keys.take() {
            tracing::warn!(
                parent: &self.span,
                user,
                method = "publickey",
                keys,
                reason = "no authorised key offered",
                "Login failed"
            );
        }
        if self.vfs.is_some() {
            tracing::info!(parent: &self.span, "Session closed");
        }
    }
}

/// What an SFTP handle refers to.
enum OpenHandle {
    Read(FileReader),
    Write(FileWriter),
    Dir { listing: DirStream, path: String },
}

/// The SFTP side of one channel: requests mapped onto the user's [`Vfs`].
struct SftpSession {
    vfs: Vfs,
    span: Span,
    handles: HashMap<String, OpenHandle>,
    next_handle: u64,
}

impl SftpSession {
    fn new(vfs: Vfs, span: Span) -> Self {
        Self {
            vfs,
            span,
            handles: HashMap::new(),
            next_handle: 0,
        }
    }

    fn add_handle(&mut self, id: u32, open: OpenHandle) -> Result<Handle, StatusReply> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(StatusCode::Failure.with_message("too many open handles"));
        }
        self.next_handle += 1;
        let handle = self.next_handle.to_string();
        self.handles.insert(handle.clone(), open);
        Ok(Handle { id, handle })
    }

    fn handle(&mut self, handle: &str) -> Result<&mut OpenHandle, StatusReply> {
        self.handles
            .get_mut(handle)
            .ok_or_else(|| StatusCode::Failure.with_message("invalid handle"))
    }

    /// The reply for a failed request, logging it on the way.
    fn refuse(&self, operation: &'static str, path: &str, error: VfsError) -> StatusReply {
        if error.is_internal() {
            tracing::warn!(
                parent: &self.span,
                operation,
                path,
                error = %ErrorChain(&error),
                "Storage operation failed"
            );
        } else {
            tracing::debug!(parent: &self.span, operation, path, %error, "Request refused");
        }
        let code = match error.reply() {
            Reply::NotFound => StatusCode::NoSuchFile,
            Reply::PermissionDenied => StatusCode::PermissionDenied,
            Reply::Unsupported => StatusCode::OpUnsupported,
            Reply::Failure => StatusCode::Failure,
        };
        code.with_message(error.to_string())
    }

    fn attributes(&self, entry: &Entry) -> FileAttributes {
        let mtime = entry
            .modified
            .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
            .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
        let mut attrs = FileAttributes {
            size: Some(entry.size),
            uid: Some(0),
            gid: Some(0),
            user: Some(self.vfs.user().to_owned()),
            group: Some(self.vfs.user().to_owned()),
            permissions: Some(if entry.is_dir() { 0o755 } else { 0o644 }),
            atime: mtime,
            mtime,
        };
        if entry.is_dir() {
            attrs.set_dir(true);
        } else {
            attrs.set_regular(true);
        }
        attrs
    }

    async fn stat_path(&self, id: u32, path: String) -> Result<Attrs, StatusReply> {
        match self.vfs.stat(&path).await {
            Ok(entry) => Ok(Attrs {
                id,
                attrs: self.attributes(&entry),
            }),
            Err(error) => Err(self.refuse("stat", &path, error)),
        }
    }

    async fn open_write(
        &mut self,
        id: u32,
        path: &str,
        flags: OpenFlags,
    ) -> Result<Handle, StatusReply> {
        // Uploads are streamed into a temporary file and published whole, so appending to
        // or patching an existing file cannot be offered.
        if flags.contains(OpenFlags::APPEND) || flags.contains(OpenFlags::READ) {
            return Err(StatusCode::OpUnsupported
                .with_message("only whole-file uploads are supported (no append or read-write)"));
        }
        let mode = if flags.contains(OpenFlags::EXCLUDE) {
            WriteMode::CreateNew
        } else {
            WriteMode::Replace
        };
        match self.vfs.create(path, mode).await {
            Ok(writer) => self.add_handle(id, OpenHandle::Write(writer)),
            Err(error) => Err(self.refuse("open", path, error)),
        }
    }

    async fn close_handle(&self, open: OpenHandle) -> Result<(), StatusReply> {
        match open {
            OpenHandle::Write(writer) => {
                let path = writer.path().to_owned();
                match writer.close().await {
                    Ok(bytes) => {
                        tracing::info!(parent: &self.span, path, bytes, "Upload completed");
                        Ok(())
                    }
                    Err(error) => Err(self.refuse("close", &path, error)),
                }
            }
            OpenHandle::Read(reader) => {
                tracing::info!(
                    parent: &self.span,
                    path = reader.path(),
                    bytes = reader.bytes_read(),
                    size = reader.size(),
                    "Download completed"
                );
                Ok(())
            }
            OpenHandle::Dir { .. } => Ok(()),
        }
    }
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".to_owned(),
        language_tag: "en-US".to_owned(),
    }
}

impl russh_sftp::server::Handler for SftpSession {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported.with_message("operation not supported")
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        Ok(Version::new())
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        match self.vfs.resolve(&path) {
            Ok(resolved) => Ok(Name {
                id,
                files: vec![File::dummy(resolved)],
            }),
            Err(error) => Err(self.refuse("realpath", &path, error)),
        }
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        self.stat_path(id, path).await
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        // Links are refused wherever they are, so lstat and stat agree.
        self.stat_path(id, path).await
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let (size, is_dir) = match self.handle(&handle)? {
            OpenHandle::Read(reader) => (reader.size(), false),
            OpenHandle::Write(writer) => (writer.bytes_written(), false),
            OpenHandle::Dir { .. } => (0, true),
        };
        let entry = Entry {
            name: String::new(),
            kind: if is_dir {
                EntryKind::Directory
            } else {
                EntryKind::File
            },
            size,
            modified: None,
        };
        Ok(Attrs {
            id,
            attrs: self.attributes(&entry),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        _attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        // Modes, owners and times are not stored (object stores have none); accepting the
        // request keeps clients that set them after an upload (`put -p`, WinSCP) working.
        if !self.vfs.allows(Permission::Write) {
            return Err(self.refuse("setstat", &path, VfsError::Denied(Permission::Write)));
        }
        self.stat_path(id, path).await.map(|_| ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        _attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        self.handle(&handle)?;
        Ok(ok(id))
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        _attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        if pflags.contains(OpenFlags::WRITE) {
            return self.open_write(id, &filename, pflags).await;
        }
        match self.vfs.open_read(&filename).await {
            Ok(reader) => self.add_handle(id, OpenHandle::Read(reader)),
            Err(error) => Err(self.refuse("open", &filename, error)),
        }
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let OpenHandle::Read(reader) = self.handle(&handle)? else {
            return Err(StatusCode::Failure.with_message("handle is not open for reading"));
        };
        match reader.read_at(offset, len.min(MAX_READ)).await {
            Ok(data) if data.is_empty() => Err(StatusCode::Eof.into()),
            Ok(data) => Ok(Data {
                id,
                data: data.to_vec(),
            }),
            Err(error) => {
                let path = reader.path().to_owned();
                Err(self.refuse("read", &path, error))
            }
        }
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        let OpenHandle::Write(writer) = self.handle(&handle)? else {
            return Err(StatusCode::Failure.with_message("handle is not open for writing"));
        };
        match writer.write_at(offset, data).await {
            Ok(()) => Ok(ok(id)),
            Err(error) => {
                let path = writer.path().to_owned();
                Err(self.refuse("write", &path, error))
            }
        }
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        let Some(open) = self.handles.remove(&handle) else {
            return Err(StatusCode::Failure.with_message("invalid handle"));
        };
        self.close_handle(open).await.map(|()| ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        match self.vfs.list(&path).await {
            Ok(listing) => self.add_handle(id, OpenHandle::Dir { listing, path }),
            Err(error) => Err(self.refuse("opendir", &path, error)),
        }
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        let OpenHandle::Dir { listing, path } = self.handle(&handle)? else {
            return Err(StatusCode::Failure.with_message("handle is not a directory"));
        };
        let batch = match listing.next_batch(READDIR_BATCH).await {
            Ok(batch) if batch.is_empty() => return Err(StatusCode::Eof.into()),
            Ok(batch) => batch,
            Err(error) => {
                let path = path.clone();
                return Err(self.refuse("readdir", &path, error));
            }
        };
        let files = batch
            .iter()
            .map(|entry| File::new(entry.name.clone(), self.attributes(entry)))
            .collect();
        Ok(Name { id, files })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        match self.vfs.remove(&filename).await {
            Ok(()) => Ok(ok(id)),
            Err(error) => Err(self.refuse("remove", &filename, error)),
        }
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        _attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        match self.vfs.mkdir(&path).await {
            Ok(()) => Ok(ok(id)),
            Err(error) => Err(self.refuse("mkdir", &path, error)),
        }
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        match self.vfs.rmdir(&path).await {
            Ok(()) => Ok(ok(id)),
            Err(error) => Err(self.refuse("rmdir", &path, error)),
        }
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        match self.vfs.rename(&oldpath, &newpath).await {
            Ok(()) => Ok(ok(id)),
            Err(error) => Err(self.refuse("rename", &oldpath, error)),
        }
    }
}

impl Drop for SftpSession {
    fn drop(&mut self) {
        // The channel is gone; unfinished uploads are discarded by their writers.
        for open in self.handles.values() {
            if let OpenHandle::Write(writer) = open {
                tracing::info!(
                    parent: &self.span,
                    path = writer.path(),
                    bytes = writer.bytes_written(),
                    "Upload interrupted"
                );
            }
        }
    }
}
