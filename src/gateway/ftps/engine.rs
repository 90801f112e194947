//! libunftp as the FTP engine behind the front end: one libunftp session per client
//! session, reached over a loopback connection, with TLS off.
//!
//! Contract:
//! - [`Engine::start`] builds a libunftp server for one session (its storage back end,
//!   authenticator and user provider all report into that session's [`SessionContext`])
//!   and hands it one end of a fresh loopback TCP connection; the front end keeps the
//!   other end. libunftp listens for its passive data connections on 127.0.0.1 only, in
//!   [`INTERNAL_PASSIVE_PORTS`], and only the front end connects there.
//! - libunftp's own log lines (slog) are passed to `tracing` under the target `libunftp`:
//!   its errors at warn, everything else at debug or below. The front end and the back
//!   end log what operators need; libunftp never sees a password it could log except in
//!   PASS, which it redacts.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use libunftp::options::{PassiveHost, SiteMd5};
use slog::Drain;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, Span};

use crate::gateway::audit::{AuditLog, AuditProtocol, SessionLog};
use crate::gateway::auth::{LiveLogins, Login, Logins};
use crate::gateway::ftps::backend::{FtpUser, VfsBackend};
use crate::gateway::ftps::login::PasswordLogin;
use crate::gateway::vfs::Vfs;
use crate::storage::Storage;

/// Ports libunftp listens on, on 127.0.0.1, for the data connections the front end relays.
/// Above Linux's default ephemeral range, so outgoing connections rarely hold one.
pub const INTERNAL_PASSIVE_PORTS: RangeInclusive<u16> = 61000..=65535;
/// Seconds a logged-in session may sit idle before libunftp closes it.
pub const IDLE_SESSION_SECS: u64 = 600;
/// The greeting, deliberately without product or version.
const GREETING: &str = "Sluice FTPS ready";
/// Connections accepted on a fresh loopback listener before giving up on seeing our own.
const LOOPBACK_ACCEPTS: usize = 4;

/// What one client session shares between the front end and its libunftp session.
pub struct SessionContext {
    span: Span,
    log: SessionLog,
    login: Mutex<Option<Arc<Login>>>,
    logged_in: watch::Sender<Option<Arc<Login>>>,
    vfs: Mutex<Option<Vfs>>,
    reply_text: Mutex<Option<String>>,
    append: AtomicBool,
    ended: watch::Sender<bool>,
}

impl SessionContext {
    /// A context whose events are logged under `span` and recorded in `log`.
    pub fn new(span: Span, log: SessionLog) -> Arc<Self> {
        Arc::new(Self {
            span,
            log,
            login: Mutex::new(None),
            logged_in: watch::Sender::new(None),
            vfs: Mutex::new(None),
            append: AtomicBool::new(false),
            reply_text: Mutex::new(None),
            ended: watch::Sender::new(false),
        })
    }

    /// Marks the client's session as over: work libunftp still runs for it in tasks of
    /// its own (a resumed upload copying the kept start of a file) stops.
    pub fn end(&self) {
        self.ended.send_replace(true);
    }

    /// Completes once the session is over.
    pub(super) async fn ended(&self) {
        let mut ended = self.ended.subscribe();
        let _ = ended.wait_for(|ended| *ended).await;
    }

    /// The session's span: libunftp runs our code from tasks of its own, outside it, so
    /// every event names it as its parent.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// The session's audit log.
    pub fn log(&self) -> &SessionLog {
        &self.log
    }

    /// Hands a checked login from the authenticator to the user provider.
    pub(super) fn set_login(&self, login: Arc<Login>) {
        *lock(&self.login) = Some(login);
    }

    pub(super) fn take_login(&self) -> Option<Arc<Login>> {
        lock(&self.login).take()
    }

    /// Records the login the session now runs under, for [`SessionContext::watch_login`].
    pub(super) fn set_logged_in(&self, login: Arc<Login>) {
        self.logged_in.send_replace(Some(login));
    }

    /// Keeps the logged-in user's view of the storage, the one libunftp's calls use, for
    /// the front end's own checks ([`SessionContext::vfs`]).
    pub(super) fn set_vfs(&self, vfs: Vfs) {
        *lock(&self.vfs) = Some(vfs);
    }

    /// The logged-in user's view of the storage, once there is one.
    pub fn vfs(&self) -> Option<Vfs> {
        lock(&self.vfs).clone()
    }

    /// Sees the session's login once it has one.
    pub fn watch_login(&self) -> watch::Receiver<Option<Arc<Login>>> {
        self.logged_in.subscribe()
    }

    /// Says whether the upload libunftp runs next is an `APPE`: set by the front end before
    /// it sends one on, cleared by its end.
    pub fn set_append(&self, append: bool) {
        self.append.store(append, Ordering::SeqCst);
    }

    /// Whether the upload starting now is an `APPE`; clears the mark.
    pub(super) fn take_append(&self) -> bool {
        self.append.swap(false, Ordering::SeqCst)
    }

    /// Leaves the text for the error reply libunftp is about to send.
    pub(super) fn set_reply_text(&self, text: String) {
        *lock(&self.reply_text) = Some(text);
    }

    /// The text left for the error reply being forwarded, if any.
    pub fn take_reply_text(&self) -> Option<String> {
        lock(&self.reply_text).take()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts libunftp sessions.
#[derive(Clone)]
pub struct Engine {
    logins: LiveLogins,
    storage: Storage,
    audit: AuditLog,
    logger: slog::Logger,
}

impl Engine {
    /// An engine serving `storage` to `logins`, recording into `audit`.
    pub fn new(logins: LiveLogins, storage: Storage, audit: AuditLog) -> Self {
        Self {
            logins,
            storage,
            audit,
            logger: slog::Logger::root(TracingDrain.fuse(), slog::o!()),
        }
    }

    /// The audit log of a new session from `peer`.
    pub fn session_log(&self, peer: std::net::IpAddr) -> SessionLog {
        self.audit.session(AuditProtocol::Ftps, peer)
    }

    /// Sees every reload of the logins in force.
    pub fn watch_logins(&self) -> watch::Receiver<Arc<Logins>> {
        self.logins.subscribe()
    }

    /// Starts a libunftp session for `context` and returns the front end's end of its
    /// control connection, and the task running it.
    pub async fn start(
        &self,
        context: Arc<SessionContext>,
    ) -> io::Result<(TcpStream, JoinHandle<()>)> {
        let server = self.server(context.clone())?;
        let (ours, theirs) = loopback_pair().await?;
        let task = tokio::spawn(
            async move {
                // Errors here are the connection ending; the front end reports those.
                let _ = server.service(theirs).await;
            }
            .instrument(context.span().clone()),
        );
        Ok((ours, task))
    }

    fn server(
        &self,
        context: Arc<SessionContext>,
    ) -> io::Result<libunftp::Server<VfsBackend, FtpUser>> {
        let login = Arc::new(PasswordLogin::new(
            self.logins.clone(),
            self.storage.clone(),
            context.clone(),
        ));
        let backend = move || VfsBackend::new(context.clone());
        libunftp::ServerBuilder::<VfsBackend, FtpUser>::with_user_detail_provider(
            Box::new(backend),
            login.clone(),
        )
        .authenticator(login)
        .greeting(GREETING)
        .passive_host(PassiveHost::FromConnection)
        .passive_ports(INTERNAL_PASSIVE_PORTS)
        .sitemd5(SiteMd5::None)
        .idle_session_timeout(IDLE_SESSION_SECS)
        .logger(self.logger.clone())
        .build()
        .map_err(io::Error::other)
    }
}

/// Both ends of a new TCP connection on 127.0.0.1: (connecting end, accepted end).
async fn loopback_pair() -> io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let ours = TcpStream::connect(listener.local_addr()?).await?;
    let expected: SocketAddr = ours.local_addr()?;
    // Anything else on the machine could connect to the fresh port first; only our own
    // connection is handed to libunftp.
    for _ in 0..LOOPBACK_ACCEPTS {
        let (theirs, from) = listener.accept().await?;
        if from == expected {
            return Ok((ours, theirs));
        }
    }
    Err(io::Error::other("loopback connection was not accepted"))
}

/// Passes libunftp's slog records to `tracing`. Its "errors" are mostly clients going
/// away, so nothing is logged above warn; its info lines repeat what the front end logs.
struct TracingDrain;

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let message = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::warn!(target: "libunftp", %message)
            }
            slog::Level::Warning | slog::Level::Info => {
                tracing::debug!(target: "libunftp", %message)
            }
            slog::Level::Debug | slog::Level::Trace => {
                tracing::trace!(target: "libunftp", %message)
            }
        }
        Ok(())
    }
}
