//! The SFTP front end: an SSH server (russh) that offers nothing but the `sftp` subsystem
//! (russh-sftp), mapping each SFTP request onto the logged-in user's [`Vfs`].
//!
//! Contract:
//! - Password and public-key authentication against the [`LiveLogins`] in force when the
//!   attempt is made; a connection advertises only the methods that some login can
//!   complete. Password checks go through [`LiveLogins::check_password`]: a bounded pool
//!   of workers, and the same cost for unknown users as for known ones.
//! - Connections are bounded: at most [`MAX_CONNECTIONS`] at once and
//!   [`MAX_CONNECTIONS_PER_IP`] from one client address; a connection beyond either is
//!   closed as soon as it is accepted. A connection that has not logged in
//!   [`LOGIN_DEADLINE`] after it was accepted is disconnected, and so is a session whose
//!   login no longer holds after a configuration reload (user removed, password hash or
//!   key set changed); the mechanism is shared with FTPS ([`crate::gateway::sessions`]).
//!   A connection may have at most [`MAX_CHANNELS`] channels open.
//! - Only the `sftp` subsystem is served. Shell, exec and pty requests are refused with a
//!   message on the channel's stderr; forwarding of any kind is refused (russh's default).
//!   An SFTP channel whose client sends a packet longer than [`MAX_SFTP_PACKET`] (which is
//!   also what garbage looks like) is closed: the stream is out of step from there on.
//! - Every connection gets a span carrying the peer and, after login, the user. Logins and
//!   completed transfers (with their byte counts) are logged at info, failed logins at
//!   warn (user and peer, never the password), storage failures and uploads lost on close
//!   at warn. A connection that closes before or during the SSH handshake, or never logs
//!   in, is logged at debug only. Logins, failed ones included, and every file operation
//!   are also recorded in the audit log ([`crate::gateway::audit`]); the span carries the
//!   audit session id.
//! - [`SftpServer::serve`] stops accepting when told to, lets running sessions finish for
//!   a grace period, then disconnects the rest.
//! - `OPEN` follows the SFTP specification: `CREATE` without `WRITE` creates the file
//!   (empty) if it is missing, `EXCL` fails if it exists, and the handle reads.
//! - `RENAME` never replaces its target (the SFTP specification); the advertised
//!   `posix-rename@openssh.com` extension does ([`Vfs::rename_replacing`]). `SETSTAT` and
//!   `FSETSTAT` of modes, owners and times are accepted and store nothing; a size other
//!   than the file's own (a truncate) is refused with `OP_UNSUPPORTED`, never answered
//!   `OK` with the file unchanged. A channel the client ends gets
//!   `exit-status 0` before it is closed, which `scp` over SFTP waits for.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use russh::keys::PrivateKey;
use russh::server::{Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, Disconnect, MethodKind, MethodSet, SshId};
use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Packet, Status, StatusCode, Version,
};
use russh_sftp::server::StatusReply;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, Span, field};

use crate::api::Permission;
use crate::gateway::audit::{
    AuditLog, AuditProtocol, Entry as AuditEntry, MAX_USER_BYTES, Operation, SessionLog, clipped,
};
use crate::gateway::auth::{LiveLogins, Login, Logins};
use crate::gateway::sessions::{
    self, ConnectionLimiter, ConnectionSlot, DISCONNECT_WAIT, Protocol, admission_ends,
};
use crate::gateway::vfs::{
    DirStream, Entry, EntryKind, FileReader, FileWriter, Reply, Vfs, VfsError, WriteMode,
};
use crate::gateway::{ErrorChain, stopped};
use crate::storage::Storage;

/// Identification string sent to clients; deliberately without a version.
const SERVER_ID: &str = "SSH-2.0-Sluice";
/// Entries per SSH_FXP_NAME reply to READDIR.
const READDIR_BATCH: usize = 128;
/// Largest SSH_FXP_DATA reply; clients ask for 32 KiB to 256 KiB.
const MAX_READ: u32 = 256 * 1024;
/// Open file and directory handles one SFTP channel may hold.
const MAX_HANDLES: usize = 64;
/// The OpenSSH extension for a rename that replaces its target, as `rename(2)` does.
const POSIX_RENAME: &str = "posix-rename@openssh.com";
/// Message sent on stderr when a client asks for anything but SFTP.
const SFTP_ONLY: &str = "This service allows SFTP connections only.\r\n";

pub use crate::gateway::sessions::{
    ConnectionLimits, LOGIN_DEADLINE, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_IP,
};

/// Session channels one connection may have open at once. SFTP clients use one, a few
/// open a second for parallel transfers.
pub const MAX_CHANNELS: usize = 4;

/// Longest SFTP packet accepted from a client, length prefix excluded: 256 KiB, the limit
/// of OpenSSH's sftp-server, enough for any client's largest write.
pub const MAX_SFTP_PACKET: u32 = 256 * 1024;

/// The SSH server of a gateway.
#[derive(Clone)]
pub struct SftpServer {
    shared: Arc<Shared>,
}

struct Shared {
    host_keys: Vec<PrivateKey>,
    logins: LiveLogins,
    storage: Storage,
    audit: AuditLog,
    limits: ConnectionLimits,
}

impl SftpServer {
    /// A server presenting `host_keys`, checking credentials against `logins`, serving
    /// files from `storage` and recording into `audit`, with the default
    /// [`ConnectionLimits`].
    pub fn new(
        host_keys: Vec<PrivateKey>,
        logins: LiveLogins,
        storage: impl Into<Storage>,
        audit: AuditLog,
    ) -> Self {
        let shared = Shared {
            host_keys,
            logins,
            storage: storage.into(),
            audit,
            limits: ConnectionLimits::default(),
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The same server with other connection limits.
    pub fn with_limits(self, limits: ConnectionLimits) -> Self {
        let shared = Shared {
            host_keys: self.shared.host_keys.clone(),
            logins: self.shared.logins.clone(),
            storage: self.shared.storage.clone(),
            audit: self.shared.audit.clone(),
            limits,
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
        let limiter = ConnectionLimiter::new(Protocol::Sftp, self.shared.limits);
        let mut sessions = JoinSet::new();
        loop {
            tokio::select! {
                () = stopped(&mut shutdown) => break,
                Some(ended) = sessions.join_next(), if !sessions.is_empty() => {
                    sessions::report_panic(Protocol::Sftp, ended);
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Refused by dropping the stream, which closes it.
                        let Some(slot) = limiter.admit(peer.ip()) else { continue };
                        let connection = Connection {
                            shared: self.shared.clone(),
                            peer,
                            disconnect: disconnect_rx.clone(),
                            _slot: slot,
                        };
                        sessions.spawn(connection.run(stream));
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

        sessions::drain(Protocol::Sftp, sessions, grace, disconnect_tx).await;
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

/// One accepted connection, holding its slot until it ends.
struct Connection {
    shared: Arc<Shared>,
    peer: SocketAddr,
    disconnect: watch::Receiver<bool>,
    _slot: ConnectionSlot,
}

impl Connection {
    /// Runs the SSH connection to its end: the client's, the deadline's, a revocation's,
    /// or shutdown's once `disconnect` turns true.
    async fn run(mut self, stream: TcpStream) {
        let log = self
            .shared
            .audit
            .session(AuditProtocol::Sftp, self.peer.ip());
        let span = tracing::info_span!(
            "sftp",
            peer = %self.peer,
            session = log.id(),
            user = field::Empty
        );
        let deadline = Instant::now() + self.shared.limits.login_deadline;
        let logins = self.shared.logins.subscribe();
        let (login_tx, login_rx) = watch::channel(None);
        let config = ssh_config(&self.shared);
        let handler = SshSession::new(
            self.shared.clone(),
            config.methods.clone(),
            span.clone(),
            login_tx,
            log,
        );
        let (sever, severed) = oneshot::channel();
        let stream = Severable {
            inner: stream,
            severed,
            cut: false,
        };
        async move {
            let started = russh::server::run_stream(config, stream, handler);
            let session = match tokio::time::timeout_at(deadline, started).await {
                Ok(Ok(session)) => session,
                Ok(Err(error)) => {
                    tracing::debug!(error = %ErrorChain(&error), "Connection closed before SSH");
                    return;
                }
                Err(_) => {
                    tracing::debug!("Connection closed: no SSH identification before the deadline");
                    return;
                }
            };
            let handle = session.handle();
            tokio::pin!(session);
            let ending = tokio::select! {
                result = &mut session => return log_connection_end(result),
                () = stopped(&mut self.disconnect) => None,
                ending = admission_ends(login_rx, logins, deadline, Logins::admits) => Some(ending),
            };

            let reason = match ending {
                None => "the gateway is shutting down".to_owned(),
                Some(ending) => {
                    ending.report();
                    ending.message()
                }
            };
            let polite = async {
                let _ = handle
                    .disconnect(Disconnect::ByApplication, reason, "en".into())
                    .await;
                (&mut session).await
            };
            match tokio::time::timeout(DISCONNECT_WAIT, polite).await {
                Ok(result) => log_connection_end(result),
                Err(_) => {
                    // Most likely stuck in a key exchange, during which russh handles no
                    // disconnect request.
                    let _ = sever.send(());
                    log_connection_end(session.await);
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// A connection's socket that fails every read and write once told to, or once the task
/// that could tell it is gone. russh owns the socket and, during a key exchange, acts on
/// no request from outside, a disconnect included; failing its reads ends its session
/// whatever it is waiting for. Dropping the connection task (at the end of shutdown) thus
/// closes the socket too, instead of leaving russh's task running.
struct Severable<S> {
    inner: S,
    severed: oneshot::Receiver<()>,
    cut: bool,
}

impl<S> Severable<S> {
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        // Told to, or the sender is gone: either way the connection is over.
        self.cut = self.cut || Pin::new(&mut self.severed).poll(cx).is_ready();
        if self.cut {
            return Err(io::ErrorKind::ConnectionAborted.into());
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Severable<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Severable<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
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
    /// The login, once there is one, for the connection to watch.
    login: watch::Sender<Option<Arc<Login>>>,
    /// Session channels opened and not yet serving SFTP.
    channels: HashMap<ChannelId, Channel<Msg>>,
    /// Channels serving SFTP; each of them counts itself while it runs.
    sftp_channels: Arc<AtomicUsize>,
    /// Which channels those are, to end each with an exit status.
    sftp_ids: std::collections::HashSet<ChannelId>,
    /// User and number of public keys refused, for the warning when the client gives up.
    refused_keys: Option<(String, usize)>,
    /// The connection's audit log.
    log: SessionLog,
}

impl SshSession {
    fn new(
        shared: Arc<Shared>,
        methods: MethodSet,
        span: Span,
        login: watch::Sender<Option<Arc<Login>>>,
        log: SessionLog,
    ) -> Self {
        Self {
            shared,
            methods,
            span,
            vfs: None,
            login,
            channels: HashMap::new(),
            sftp_channels: Arc::default(),
            sftp_ids: std::collections::HashSet::new(),
            refused_keys: None,
            log,
        }
    }

    fn open_channels(&self) -> usize {
        self.channels.len() + self.sftp_channels.load(Ordering::Relaxed)
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

    async fn log_in(&mut self, login: Arc<Login>, method: &'static str) -> Auth {
        let user = login.user();
        match Vfs::open(self.shared.storage.clone(), user, &self.log).await {
            Ok(vfs) => {
                self.span.record("user", user.name.as_str());
                tracing::info!(parent: &self.span, method, "Logged in");
                self.log.login(&user.name, None).await;
                self.vfs = Some(vfs);
                self.refused_keys = None;
                self.login.send_replace(Some(login));
                Auth::Accept
            }
            Err(error) => {
                tracing::warn!(
                    parent: &self.span,
                    user = %user.name,
                    error = %ErrorChain(&error),
                    "Login refused: home directory unusable"
                );
                let reason = "home directory unusable";
                self.log.login(&user.name, Some(reason)).await;
                self.reject()
            }
        }
    }

    fn refuse_request(&mut self, channel: ChannelId, what: &str, session: &mut Session) {
        tracing::info!(parent: &self.span, request = what, "Refused non-SFTP request");
        // Closed by us, so russh reports no close for it.
        self.channels.remove(&channel);
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
        let checked = self
            .shared
            .logins
            .check_password(user, password.as_bytes())
            .await;
        match checked {
            Ok(login) => Ok(self.log_in(login, "password").await),
            Err(refusal) => {
                let reason = refusal.reason();
                let shown = clipped(user, MAX_USER_BYTES);
                tracing::warn!(parent: &self.span, user = %shown, reason, "Login failed");
                self.log.login(user, Some(reason)).await;
                Ok(self.reject())
            }
        }
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
        let shown = clipped(user, MAX_USER_BYTES);
        tracing::debug!(parent: &self.span, user = %shown, "Public key not authorised");
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
            Some(login) => Ok(self.log_in(login, "publickey").await),
            None => {
                let reason = "key not authorised";
                let shown = clipped(user, MAX_USER_BYTES);
                tracing::warn!(parent: &self.span, user = %shown, reason, "Login failed");
                self.log.login(user, Some(reason)).await;
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
        if self.open_channels() >= MAX_CHANNELS {
            tracing::info!(parent: &self.span, limit = MAX_CHANNELS, "Refused channel: too many");
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Closed by us, so russh reports no close for it.
        self.channels.remove(&channel);
        // The client's end of an SFTP session: like OpenSSH's sftp-server, report a clean
        // exit, which scp (over SFTP) requires before it counts its transfer as done.
        if self.sftp_ids.remove(&channel) {
            let _ = session.exit_status_request(channel, 0);
            let _ = session.eof(channel);
        }
        session.close(channel)
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        self.sftp_ids.remove(&channel);
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
        self.sftp_ids.insert(channel_id);
        let slot = ChannelSlot::take(&self.sftp_channels);
        let sftp = SftpSession::new(vfs, self.span.clone(), slot);
        let stream = PacketFraming::new(channel.into_stream(), self.span.clone());
        let config = russh_sftp::server::Config {
            max_client_packet_len: MAX_SFTP_PACKET,
        };
        // Spawns the request loop; it ends when the channel does.
        russh_sftp::server::run_with_config(stream, sftp, config).await;
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
            let reason = "no authorised key offered";
            tracing::warn!(
                parent: &self.span,
                user = %clipped(&user, MAX_USER_BYTES),
                method = "publickey",
                keys,
                reason,
                "Login failed"
            );
            let entry = AuditEntry::new(Operation::Login).denied(reason);
            self.log.for_user(&user).note_detached(entry);
        }
        if self.vfs.is_some() {
            tracing::info!(parent: &self.span, "Session closed");
        }
    }
}

/// One SFTP channel, counted against its connection's [`MAX_CHANNELS`] while it lives.
struct ChannelSlot(Arc<AtomicUsize>);

impl ChannelSlot {
    fn take(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An SFTP channel's byte stream as russh-sftp reads it, ended at the first packet whose
/// length prefix exceeds [`MAX_SFTP_PACKET`].
///
/// russh-sftp answers such a packet with a warning and carries on reading from the
/// middle of it, so that garbage turns into one warning per four bytes and the stream
/// never gets back in step. This wrapper checks every length prefix before handing it
/// on and reports the end of the stream instead, which ends russh-sftp's loop and closes
/// the channel. Read errors end the stream the same way, for the same reason.
struct PacketFraming<S> {
    inner: S,
    span: Span,
    /// The current packet's length prefix, as far as it has been read.
    prefix: [u8; 4],
    prefix_read: usize,
    prefix_passed: usize,
    /// Bytes of the current packet after its prefix still to pass on.
    body_left: u32,
    ended: bool,
}

impl<S> PacketFraming<S> {
    fn new(inner: S, span: Span) -> Self {
        Self {
            inner,
            span,
            prefix: [0; 4],
            prefix_read: 0,
            prefix_passed: 0,
            body_left: 0,
            ended: false,
        }
    }
}

impl<S: AsyncRead + Unpin> PacketFraming<S> {
    /// Reads the next length prefix; `false` once the stream is to end.
    fn poll_prefix(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        while self.prefix_read < self.prefix.len() {
            let mut rest = ReadBuf::new(&mut self.prefix[self.prefix_read..]);
            if let Err(error) = ready!(Pin::new(&mut self.inner).poll_read(cx, &mut rest)) {
                tracing::debug!(parent: &self.span, %error, "SFTP channel failed");
                return Poll::Ready(false);
            }
            if rest.filled().is_empty() {
                return Poll::Ready(false);
            }
            self.prefix_read += rest.filled().len();
        }
        let length = u32::from_be_bytes(self.prefix);
        if length > MAX_SFTP_PACKET {
            let (span, limit) = (&self.span, MAX_SFTP_PACKET);
            tracing::warn!(parent: span, length, limit, "Closing SFTP channel: malformed packet");
            return Poll::Ready(false);
        }
        self.body_left = length;
        Poll::Ready(true)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PacketFraming<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ended || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.prefix_read < this.prefix.len() {
                this.ended = !ready!(this.poll_prefix(cx));
                continue;
            }
            if this.prefix_passed < this.prefix.len() {
                let passing = (this.prefix.len() - this.prefix_passed).min(buf.remaining());
                let end = this.prefix_passed + passing;
                buf.put_slice(&this.prefix[this.prefix_passed..end]);
                this.prefix_passed = end;
                return Poll::Ready(Ok(()));
            }
            if this.body_left == 0 {
                (this.prefix_read, this.prefix_passed) = (0, 0);
                continue;
            }

            let wanted = buf.remaining().min(this.body_left as usize);
            let mut body = ReadBuf::new(buf.initialize_unfilled_to(wanted));
            let read = ready!(Pin::new(&mut this.inner).poll_read(cx, &mut body));
            let got = body.filled().len();
            if let Err(error) = read {
                tracing::debug!(parent: &this.span, %error, "SFTP channel failed");
                this.ended = true;
                continue;
            }
            this.ended = got == 0;
            buf.advance(got);
            this.body_left -= got as u32;
            return Poll::Ready(Ok(()));
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PacketFraming<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
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
    _slot: ChannelSlot,
}

impl SftpSession {
    fn new(vfs: Vfs, span: Span, slot: ChannelSlot) -> Self {
        Self {
            vfs,
            span,
            handles: HashMap::new(),
            next_handle: 0,
            _slot: slot,
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

    /// Refuses a SETSTAT that would change the size of a file of `size` bytes: uploads are
    /// whole files, so the size cannot change in place, and a client told it had would
    /// believe a file truncated that still holds every byte. Setting the size it has
    /// already changes nothing and is accepted.
    fn keep_size(&self, path: &str, requested: Option<u64>, size: u64) -> Result<(), StatusReply> {
        match requested {
            Some(requested) if requested != size => {
                tracing::debug!(parent: &self.span, path, requested, size, "Refused a size change");
                Err(StatusCode::OpUnsupported.with_message(
                    "changing a file's size is not supported: upload the file again instead",
                ))
            }
            _ => Ok(()),
        }
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

    /// Opens `path` for `CREATE` without `WRITE`. As with `open(2)`, which the SFTP
    /// specification follows: the file is created empty if it is missing, `EXCL` fails if
    /// it exists, `TRUNC` empties it; the handle then reads, like OpenSSH's.
    async fn open_create(
        &mut self,
        id: u32,
        path: &str,
        flags: OpenFlags,
    ) -> Result<Handle, StatusReply> {
        // Both checked first, so that nothing is created for a handle the user may not hold.
        for permission in [Permission::Write, Permission::Read] {
            if !self.vfs.allows(permission) {
                return Err(self.refuse("open", path, VfsError::Denied(permission)));
            }
        }
        let exclusive = flags.contains(OpenFlags::EXCLUDE);
        let mode = if flags.contains(OpenFlags::TRUNCATE) && !exclusive {
            WriteMode::Replace
        } else {
            WriteMode::CreateNew
        };
        let created = match self.vfs.create(path, mode).await {
            Ok(writer) => writer.close().await.map(drop),
            Err(error) => Err(error),
        };
        match created {
            Ok(()) => {}
            Err(VfsError::AlreadyExists) if !exclusive => {}
            Err(error) => return Err(self.refuse("open", path, error)),
        }
        match self.vfs.open_read(path).await {
            Ok(reader) => self.add_handle(id, OpenHandle::Read(reader)),
            Err(error) => Err(self.refuse("open", path, error)),
        }
    }

    async fn close_handle(&self, open: OpenHandle) -> Result<(), StatusReply> {
        match open {
            OpenHandle::Write(writer) => {
                let (path, bytes) = (writer.path().to_owned(), writer.bytes_written());
                match writer.close().await {
                    Ok(bytes) => {
                        tracing::info!(parent: &self.span, path, bytes, "Upload completed");
                        Ok(())
                    }
                    // Stored, but its audit record is not durable yet: the client is
                    // told to retry rather than that its upload succeeded.
                    Err(error @ VfsError::AuditUnavailable) => {
                        tracing::warn!(parent: &self.span, path, bytes, "Upload not confirmed");
                        Err(StatusCode::Failure
                            .with_message(format!("upload stored but not confirmed: {error}")))
                    }
                    Err(error) => {
                        // Whatever the cause, the client's data is gone: always a warning.
                        tracing::warn!(
                            parent: &self.span,
                            path,
                            bytes,
                            error = %ErrorChain(&error),
                            "Upload lost: the file could not be published"
                        );
                        let reply = match error.reply() {
                            Reply::PermissionDenied => StatusCode::PermissionDenied,
                            _ => StatusCode::Failure,
                        };
                        Err(reply.with_message(format!("upload not saved: {error}")))
                    }
                }
            }
            OpenHandle::Read(reader) => {
                let (path, size) = (reader.path().to_owned(), reader.size());
                match reader.finish().await {
                    Ok(bytes) => {
                        tracing::info!(parent: &self.span, path, bytes, size, "Download completed");
                        Ok(())
                    }
                    Err(error) => Err(self.refuse("close", &path, error)),
                }
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
        // Offered on every backend: the volume replaces in one rename(2), an object store
        // copies over the target, which readers see whole (see `Vfs::rename_replacing`).
        let mut version = Version::new();
        version
            .extensions
            .insert(POSIX_RENAME.to_owned(), "1".to_owned());
        Ok(version)
    }

    async fn extended(
        &mut self,
        id: u32,
        request: String,
        data: Vec<u8>,
    ) -> Result<Packet, Self::Error> {
        if request != POSIX_RENAME {
            return Err(self.unimplemented());
        }
        let Some((oldpath, newpath)) = two_strings(&data) else {
            return Err(StatusCode::BadMessage.with_message("malformed posix-rename request"));
        };
        match self.vfs.rename_replacing(&oldpath, &newpath).await {
            Ok(()) => Ok(Packet::Status(ok(id))),
            Err(error) => Err(self.refuse("posix-rename", &oldpath, error)),
        }
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
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        // Modes, owners and times are not stored (object stores have none); accepting the
        // request keeps clients that set them after an upload (`put -p`, WinSCP) working.
        if !self.vfs.allows(Permission::Write) {
            return Err(self.refuse("setstat", &path, VfsError::Denied(Permission::Write)));
        }
        let size = self.stat_path(id, path.clone()).await?.attrs.size;
        self.keep_size(&path, attrs.size, size.unwrap_or_default())?;
        Ok(ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let (path, size) = match self.handle(&handle)? {
            OpenHandle::Read(reader) => (reader.path().to_owned(), reader.size()),
            OpenHandle::Write(writer) => (writer.path().to_owned(), writer.bytes_written()),
            OpenHandle::Dir { .. } => (String::new(), 0),
        };
        self.keep_size(&path, attrs.size, size)?;
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
        if pflags.contains(OpenFlags::CREATE) {
            return self.open_create(id, &filename, pflags).await;
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

/// Two SFTP strings (length-prefixed UTF-8), and nothing after them.
fn two_strings(data: &[u8]) -> Option<(String, String)> {
    fn string(data: &[u8]) -> Option<(String, &[u8])> {
        let (length, rest) = data.split_first_chunk::<4>()?;
        let length = u32::from_be_bytes(*length) as usize;
        let (bytes, rest) = (rest.get(..length)?, rest.get(length..)?);
        Some((String::from_utf8(bytes.to_vec()).ok()?, rest))
    }
    let (first, rest) = string(data)?;
    let (second, rest) = string(rest)?;
    rest.is_empty().then_some((first, second))
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

#[cfg(test)]
mod tests {
    use getrandom::SysRng;
    use russh::keys::ssh_key::rand_core::UnwrapErr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::gateway::auth::hash_password;
    use crate::gateway::config::GatewayUser;

    const PASSWORD: &str = "correct horse";

    fn limits(total: usize, per_ip: usize, login_deadline: Duration) -> ConnectionLimits {
        ConnectionLimits {
            total,
            per_ip,
            login_deadline,
        }
    }

    /// A server on 127.0.0.1 with one password user and the given limits.
    struct TestServer {
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        serving: tokio::task::JoinHandle<()>,
        _volume: tempfile::TempDir,
    }

    impl TestServer {
        async fn start(limits: ConnectionLimits) -> Self {
            let host_key =
                PrivateKey::random(&mut UnwrapErr(SysRng), russh::keys::Algorithm::Ed25519)
                    .unwrap();
            let user = GatewayUser {
                name: "cucm".into(),
                password_hash: Some(hash_password(PASSWORD.as_bytes(), &[9; 16])),
                public_keys: vec![],
                home: "/cucm".into(),
                permissions: vec![Permission::List],
            };
            let logins = LiveLogins::new(Logins::new(&[user]));
            let dir = tempfile::tempdir().unwrap();
            let volume = crate::storage::Volume::open_fs(dir.path()).unwrap();
            let storage = Storage::from(volume);
            let audit = crate::gateway::audit::test_log(&storage).await;
            let server =
                SftpServer::new(vec![host_key], logins, storage, audit).with_limits(limits);

            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = watch::channel(false);
            let serving = tokio::spawn(async move {
                server
                    .serve(listener, stopped, Duration::from_millis(100))
                    .await;
            });
            Self {
                addr,
                stop,
                serving,
                _volume: dir,
            }
        }

        async fn stop(self) {
            let _ = self.stop.send(true);
            self.serving.await.unwrap();
        }
    }

    /// Reads from `stream` until the server closes it; `None` if it is still open after
    /// `wait`.
    async fn closed_within(stream: &mut TcpStream, wait: Duration) -> Option<Duration> {
        let started = Instant::now();
        let mut sink = [0u8; 4096];
        let read_to_end = async { while stream.read(&mut sink).await.is_ok_and(|n| n > 0) {} };
        tokio::time::timeout(wait, read_to_end).await.ok()?;
        Some(started.elapsed())
    }

    #[tokio::test]
    async fn a_connection_that_does_not_log_in_is_closed_at_the_deadline() {
        let server = TestServer::start(limits(8, 8, Duration::from_secs(1))).await;

        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        let mut banner_only = TcpStream::connect(server.addr).await.unwrap();
        banner_only.write_all(b"SSH-2.0-probe\r\n").await.unwrap();

        for stream in [&mut silent, &mut banner_only] {
            let closed = closed_within(stream, Duration::from_secs(10)).await;
            let closed = closed.expect("the connection was still open after 10 s");
            assert!(closed < Duration::from_secs(5), "closed after {closed:?}");
        }
        server.stop().await;
    }

    struct AnyHostKey;

    impl russh::client::Handler for AnyHostKey {
        type Error = russh::Error;

        async fn check_server_key(
            &mut self,
            _key: &russh::keys::PublicKeyOrCertificate,
        ) -> Result<bool, Self::Error> {
            Ok(true)
        }
    }

    #[tokio::test]
    async fn a_session_that_logged_in_outlives_the_login_deadline() {
        let server = TestServer::start(limits(8, 8, Duration::from_secs(1))).await;

        let config = Arc::new(russh::client::Config::default());
        let mut client = russh::client::connect(config, server.addr, AnyHostKey)
            .await
            .unwrap();
        let auth = client
            .authenticate_password("cucm", PASSWORD)
            .await
            .unwrap();
        assert!(auth.success());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!client.is_closed());
        client.channel_open_session().await.unwrap();

        server.stop().await;
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_at_once() {
        let server = TestServer::start(limits(2, 2, Duration::from_secs(30))).await;

        let mut admitted = Vec::new();
        for _ in 0..2 {
            let mut stream = BufReaderless::connect(server.addr).await;
            assert!(stream.banner().await.starts_with(b"SSH-2.0-Sluice"));
            admitted.push(stream);
        }
        let mut refused = TcpStream::connect(server.addr).await.unwrap();
        let closed = closed_within(&mut refused, Duration::from_secs(5)).await;
        assert!(closed.is_some(), "the third connection was served");

        drop(admitted);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut again = BufReaderless::connect(server.addr).await;
        assert!(again.banner().await.starts_with(b"SSH-2.0-Sluice"));
        server.stop().await;
    }

    /// A raw TCP client that reads the server's identification line.
    struct BufReaderless(TcpStream);

    impl BufReaderless {
        async fn connect(addr: SocketAddr) -> Self {
            Self(TcpStream::connect(addr).await.unwrap())
        }

        async fn banner(&mut self) -> Vec<u8> {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while !line.ends_with(b"\n") && self.0.read(&mut byte).await.unwrap() == 1 {
                line.push(byte[0]);
            }
            line
        }
    }

    #[tokio::test]
    async fn framing_passes_packets_through_and_ends_at_an_oversized_length() {
        let mut packets = Vec::new();
        for body in [&b"hello"[..], &[7u8; 300][..], b""] {
            packets.extend_from_slice(&(body.len() as u32).to_be_bytes());
            packets.extend_from_slice(body);
        }
        let good = packets.len();
        packets.extend_from_slice(&[0xff; 64]);

        let mut framed = PacketFraming::new(&packets[..], Span::none());
        let mut read = Vec::new();
        let mut chunk = [0u8; 7];
        loop {
            let n = framed.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            read.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(read, &packets[..good]);
    }
}
