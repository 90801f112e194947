//! The FTPS front end: explicit and implicit FTPS over the same [`Vfs`], logins and
//! storage as SFTP, with libunftp as the FTP engine.
//!
//! Contract:
//! - Served only when the configuration has an `ftps` section and the gateway has a TLS
//!   directory. [`FtpsServer::bind`] binds the explicit and implicit control ports the
//!   section asks for; passive data ports are bound per transfer, on the IP the client
//!   reached the control port on.
//! - Without a valid certificate (missing, unusable or expired) FTPS is not served: each
//!   connection is refused (explicit: `421`, implicit: closed) until a valid certificate
//!   appears, while SFTP keeps running. The certificate is re-read every poll interval.
//! - The policy parts of the section (passive ports and address, plaintext, session reuse,
//!   minimum TLS version) apply to sessions started after a configuration reload; which
//!   listeners exist is fixed at start, and a change to it is reported as needing a
//!   restart.
//! - Connections are bounded as SFTP's are ([`sessions`]): at most
//!   [`MAX_CONNECTIONS`](sessions::MAX_CONNECTIONS) at once and
//!   [`MAX_CONNECTIONS_PER_IP`](sessions::MAX_CONNECTIONS_PER_IP) from one address, counted
//!   apart from SFTP's. A connection beyond either gets `421` and is closed at once on the
//!   explicit port, and is closed at once on the implicit port (no TLS is spent on it).
//!   A session not logged in [`LOGIN_DEADLINE`](sessions::LOGIN_DEADLINE) after its accept
//!   gets `421` and is closed (a TLS handshake in progress at that moment gets its own
//!   15 s first), and so is a session whose user is removed, or whose password hash
//!   changes, by a configuration reload: its transfer in progress, if any, is cut and an
//!   upload discarded.
//! - [`FtpsServer::serve`] stops accepting when told to, lets sessions finish for a grace
//!   period, then tells the rest the gateway is shutting down and closes them.
//!
//! # Why a front end in front of libunftp
//!
//! libunftp 0.24 serves explicit FTPS on the client's own socket, but it cannot serve
//! implicit FTPS (its sessions start plaintext and take a `TcpStream`); it cannot require,
//! or even see, TLS session reuse on data connections; it takes a TLS configuration of
//! one's own (needed to swap certificates) only behind its `experimental` feature; it
//! checks `PROT P` on `PASV` but not on `EPSV`; it panics its data task when a
//! data-connection handshake fails; it stores a name with invalid UTF-8 under a name with
//! U+FFFD in its place; and it takes command lines of any length. So the gateway
//! terminates TLS itself, for control and data connections alike: [`control`] speaks to
//! the client and hands libunftp, reached over a loopback connection per session
//! ([`engine`]), a plain FTP session; [`data`] owns the public passive ports and relays
//! each data connection to the one libunftp opened on 127.0.0.1 (libunftp binds passive
//! ports on its control connection's local address, so it could not serve them itself).
//! libunftp still parses and serves every file command through [`backend`], which maps
//! them onto the [`Vfs`].
//!
//! [`Vfs`]: crate::gateway::vfs::Vfs

pub mod backend;
pub mod control;
pub mod data;
pub mod engine;
pub mod login;
pub mod protocol;
pub mod stream;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, field};

use crate::gateway::audit::AuditLog;
use crate::gateway::auth::LiveLogins;
use crate::gateway::config::FtpsSettings;
use crate::gateway::ftps::control::{Mode, Policy, SessionSetup};
use crate::gateway::ftps::engine::Engine;
use crate::gateway::ftps::protocol::Reply;
use crate::gateway::ftps::tls::{CertificateInfo, CertificateStore};
use crate::gateway::sessions::{
    self, ConnectionLimiter, ConnectionLimits, ConnectionSlot, Protocol,
};
use crate::gateway::{ErrorChain, stopped};
use crate::storage::Storage;

pub use crate::gateway::ftps::tls::certificate_info;

/// Time to wait before accepting again after the OS refused an accept (out of files).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why FTPS cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum FtpsError {
    /// The `ftps` section cannot be served as written.
    #[error("invalid FTPS settings: {0}")]
    Settings(&'static str),
    /// The TLS configuration could not be built.
    #[error("failed to build the TLS configuration")]
    Tls(#[from] rustls::Error),
    /// A control port could not be bound.
    #[error("failed to listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What the OS reported.
        #[source]
        source: io::Error,
    },
}

/// Where the FTPS control ports listen.
#[derive(Clone, Copy, Debug)]
pub struct FtpsAddrs {
    /// Explicit FTPS (`AUTH TLS`).
    pub explicit: SocketAddr,
    /// Implicit FTPS.
    pub implicit: SocketAddr,
}

/// What sessions share: how to start one, and the policy and certificate in force.
struct Shared {
    engine: Engine,
    certificates: Arc<CertificateStore>,
    policy: RwLock<Arc<Policy>>,
    explicit: bool,
    implicit: bool,
    limits: ConnectionLimits,
}

impl Shared {
    fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// The FTPS server of a gateway, bound but not yet serving.
pub struct FtpsServer {
    shared: Arc<Shared>,
    explicit: Option<TcpListener>,
    implicit: Option<TcpListener>,
}

/// Lets the configuration watcher apply a reloaded `ftps` section.
#[derive(Clone)]
pub struct FtpsHandle {
    shared: Arc<Shared>,
}

impl FtpsServer {
    /// Checks `settings`, loads the certificate from `tls_dir` and binds the control ports
    /// the settings ask for. A missing or expired certificate is not an error here: it is
    /// reported, and connections are refused until a valid one appears.
    pub async fn bind(
        settings: &FtpsSettings,
        tls_dir: &Path,
        addrs: FtpsAddrs,
        logins: LiveLogins,
        storage: impl Into<Storage>,
        audit: AuditLog,
    ) -> Result<Self, FtpsError> {
        validate(settings)?;
        let certificates = CertificateStore::open(tls_dir);
        let policy = policy(&certificates, settings)?;
        let explicit = match settings.explicit {
            true => Some(listen(addrs.explicit).await?),
            false => None,
        };
        let implicit = match settings.implicit {
            true => Some(listen(addrs.implicit).await?),
            false => None,
        };

        let shared = Shared {
            engine: Engine::new(logins, storage.into(), audit),
            certificates,
            policy: RwLock::new(Arc::new(policy)),
            explicit: settings.explicit,
            implicit: settings.implicit,
            limits: ConnectionLimits::default(),
        };
        Ok(Self {
            shared: Arc::new(shared),
            explicit,
            implicit,
        })
    }

    /// The same server with other connection limits than the default ones.
    pub fn with_limits(self, limits: ConnectionLimits) -> Self {
        let shared = Arc::into_inner(self.shared).map(|shared| Shared { limits, ..shared });
        Self {
            shared: Arc::new(shared.expect("no handle is taken before the server is configured")),
            ..self
        }
    }

    /// The address explicit FTPS is bound to, if it is served.
    pub fn explicit_addr(&self) -> Option<SocketAddr> {
        self.explicit.as_ref()?.local_addr().ok()
    }

    /// The address implicit FTPS is bound to, if it is served.
    pub fn implicit_addr(&self) -> Option<SocketAddr> {
        self.implicit.as_ref()?.local_addr().ok()
    }

    /// A handle for applying reloaded settings.
    pub fn handle(&self) -> FtpsHandle {
        FtpsHandle {
            shared: self.shared.clone(),
        }
    }

    /// Accepts connections until `shutdown` turns true, then waits up to `grace` for
    /// sessions to end before disconnecting them. Re-reads the certificate every
    /// `poll_interval` meanwhile.
    pub async fn serve(
        self,
        mut shutdown: watch::Receiver<bool>,
        grace: Duration,
        poll_interval: Duration,
    ) {
        let certificates = self.shared.certificates.clone();
        let watcher = tokio::spawn(certificates.watch(poll_interval, shutdown.clone()));
        let (disconnect_tx, disconnect_rx) = watch::channel(false);
        let limiter = ConnectionLimiter::new(Protocol::Ftps, self.shared.limits);
        let mut sessions = JoinSet::new();
        loop {
            let (mode, accepted) = tokio::select! {
                () = stopped(&mut shutdown) => break,
                Some(ended) = sessions.join_next(), if !sessions.is_empty() => {
                    sessions::report_panic(Protocol::Ftps, ended);
                    continue;
                }
                accepted = accept(self.explicit.as_ref()) => (Mode::Explicit, accepted),
                accepted = accept(self.implicit.as_ref()) => (Mode::Implicit, accepted),
            };
            match accepted {
                Ok((stream, peer)) => {
                    let Some(slot) = limiter.admit(peer.ip()) else {
                        refuse_over_limit(mode, stream);
                        continue;
                    };
                    let connection = Connection {
                        shared: self.shared.clone(),
                        mode,
                        peer,
                        accepted: Instant::now(),
                        disconnect: disconnect_rx.clone(),
                        _slot: slot,
                    };
                    sessions.spawn(serve_connection(connection, stream));
                }
                Err(error) => {
                    tracing::warn!(%error, "Failed to accept FTPS connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
        drop((self.explicit, self.implicit));

        sessions::drain(Protocol::Ftps, sessions, grace, disconnect_tx).await;
        let _ = watcher.await;
    }
}

impl FtpsHandle {
    /// Applies a reloaded `ftps` section to sessions started from now on.
    pub fn apply(&self, settings: Option<&FtpsSettings>) {
        let Some(settings) = settings else {
            tracing::warn!(
                "FTPS was removed from the configuration; restart the gateway to stop serving it"
            );
            return;
        };
        if settings == &self.shared.policy().settings {
            return;
        }
        if (settings.explicit, settings.implicit) != (self.shared.explicit, self.shared.implicit) {
            tracing::warn!(
                explicit = settings.explicit,
                implicit = settings.implicit,
                "FTPS listeners changed; restart the gateway to apply"
            );
        }
        let policy = validate(settings).and_then(|()| policy(&self.shared.certificates, settings));
        match policy {
            Ok(policy) => {
                *self
                    .shared
                    .policy
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(policy);
                tracing::info!("Applied new FTPS settings");
            }
            Err(error) => {
                tracing::warn!(error = %ErrorChain(&error), "Keeping the previous FTPS settings");
            }
        }
    }

    /// The certificate loaded last, expired or not.
    pub fn certificate(&self) -> Option<CertificateInfo> {
        self.shared.certificates.info()
    }
}

fn validate(settings: &FtpsSettings) -> Result<(), FtpsError> {
    if !settings.explicit && !settings.implicit {
        return Err(FtpsError::Settings(
            "neither explicit nor implicit FTPS is enabled",
        ));
    }
    if settings.passive_ports.last().is_none() || settings.passive_ports.first == 0 {
        return Err(FtpsError::Settings(
            "passivePorts must hold at least one port, from 1 to 65535",
        ));
    }
    if let Some(address) = &settings.passive_address
        && (address.is_empty() || address.contains(char::is_whitespace))
    {
        return Err(FtpsError::Settings(
            "passiveAddress must be an IPv4 address or a DNS name",
        ));
    }
    Ok(())
}

fn policy(
    certificates: &Arc<CertificateStore>,
    settings: &FtpsSettings,
) -> Result<Policy, FtpsError> {
    let tls = tls::server_config(certificates.clone(), settings.min_tls_version)?;
    Ok(Policy {
        settings: settings.clone(),
        tls,
    })
}

async fn listen(addr: SocketAddr) -> Result<TcpListener, FtpsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| FtpsError::Listen { addr, source })
}

async fn accept(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// A connection beyond a limit is refused without a task: the explicit port's client is
/// told why if its socket takes the reply at once, and the connection is closed.
fn refuse_over_limit(mode: Mode, stream: TcpStream) {
    if mode == Mode::Explicit {
        let refusal = Reply::new(421, "Too many connections; try again later");
        let _ = stream.try_write(&refusal.encode());
    }
}

/// One accepted connection, holding its place under the limits until it ends.
struct Connection {
    shared: Arc<Shared>,
    mode: Mode,
    peer: SocketAddr,
    accepted: Instant,
    disconnect: watch::Receiver<bool>,
    _slot: ConnectionSlot,
}

/// Serves one connection to its end, under a span carrying the peer and, after login, the
/// user.
async fn serve_connection(connection: Connection, stream: TcpStream) {
    let (mode, peer) = (connection.mode, connection.peer);
    let span = tracing::info_span!(
        "ftps",
        %peer,
        mode = mode.as_str(),
        session = field::Empty,
        user = field::Empty
    );
    async move {
        let shared = &connection.shared;
        if shared.certificates.current().is_none() {
            refuse_without_certificate(mode, stream).await;
            return;
        }
        let setup = SessionSetup {
            mode,
            policy: shared.policy(),
            engine: shared.engine.clone(),
            login_deadline: connection.accepted + shared.limits.login_deadline,
        };
        control::run(setup, stream, peer, connection.disconnect).await;
    }
    .instrument(span)
    .await
}

/// Without a certificate nothing can be served; an explicit client is told why.
async fn refuse_without_certificate(mode: Mode, mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;

    tracing::debug!("Refused connection: no valid FTPS certificate");
    if mode == Mode::Explicit {
        let refusal = Reply::new(
            421,
            "FTPS is unavailable: the server has no valid certificate",
        );
        let _ = stream.write_all(&refusal.encode()).await;
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::gateway::config::{PassivePorts, SessionReuse, TlsVersion};
    use crate::gateway::ftps::tls::{CERT_FILE, KEY_FILE};

    fn settings() -> FtpsSettings {
        FtpsSettings {
            explicit: true,
            implicit: false,
            passive_ports: PassivePorts {
                first: 30000,
                count: 10,
            },
            passive_address: None,
            allow_plaintext: false,
            session_reuse: SessionReuse::Allow,
            min_tls_version: TlsVersion::V1_2,
            epsv: true,
            replicas: Vec::new(),
        }
    }

    #[test]
    fn settings_need_a_listener_and_a_usable_passive_range() {
        assert!(validate(&settings()).is_ok());
        let no_listener = FtpsSettings {
            explicit: false,
            ..settings()
        };
        assert!(matches!(
            validate(&no_listener),
            Err(FtpsError::Settings(_))
        ));
        let blank = FtpsSettings {
            passive_address: Some(" ".into()),
            ..settings()
        };
        assert!(validate(&blank).is_err());
        for (first, count) in [(30000, 0), (0, 10), (65530, 10)] {
            let ports = FtpsSettings {
                passive_ports: PassivePorts { first, count },
                ..settings()
            };
            assert!(validate(&ports).is_err(), "{first}+{count}");
        }
    }

    /// The explicit-only server of [`settings`] on 127.0.0.1, with `dir` as its TLS
    /// directory and volume.
    async fn bind_local(dir: &Path) -> FtpsServer {
        let volume = crate::storage::Volume::open_fs(&dir.join("data")).unwrap();
        let storage = Storage::from(volume);
        let audit = crate::gateway::audit::test_log(&storage).await;
        let localhost = "127.0.0.1:0".parse().unwrap();
        let addrs = FtpsAddrs {
            explicit: localhost,
            implicit: localhost,
        };
        FtpsServer::bind(
            &settings(),
            dir,
            addrs,
            LiveLogins::default(),
            storage,
            audit,
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn only_the_listeners_asked_for_are_bound() {
        let dir = tempfile::tempdir().unwrap();
        let server = bind_local(dir.path()).await;
        assert!(server.explicit_addr().is_some());
        assert!(server.implicit_addr().is_none());
        assert!(server.handle().certificate().is_none());
    }

    /// An explicit-only server on 127.0.0.1 with a self-signed certificate and `limits`.
    struct TestServer {
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        serving: tokio::task::JoinHandle<()>,
        _dir: tempfile::TempDir,
    }

    impl TestServer {
        async fn start(limits: ConnectionLimits) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
            std::fs::write(dir.path().join(CERT_FILE), certified.cert.pem()).unwrap();
            let key = certified.signing_key.serialize_pem();
            std::fs::write(dir.path().join(KEY_FILE), key).unwrap();
            let server = bind_local(dir.path()).await.with_limits(limits);
            let addr = server.explicit_addr().unwrap();
            let (stop, stopped) = watch::channel(false);
            let grace = Duration::from_millis(100);
            let serving = tokio::spawn(server.serve(stopped, grace, Duration::from_secs(60)));
            Self {
                addr,
                stop,
                serving,
                _dir: dir,
            }
        }

        async fn stop(self) {
            let _ = self.stop.send(true);
            self.serving.await.unwrap();
        }
    }

    /// Everything the server sends until it closes the connection, and how long that took;
    /// fails if it is still open after 10 s.
    async fn read_until_closed(stream: &mut TcpStream) -> (String, Duration) {
        let started = Instant::now();
        let mut received = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received));
        read.await.expect("still open after 10 s").unwrap();
        (String::from_utf8(received).unwrap(), started.elapsed())
    }

    #[tokio::test]
    async fn a_connection_that_does_not_log_in_gets_421_at_the_deadline() {
        let limits = ConnectionLimits {
            login_deadline: Duration::from_secs(1),
            ..ConnectionLimits::default()
        };
        let server = TestServer::start(limits).await;

        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        let (received, after) = read_until_closed(&mut silent).await;
        assert_eq!(
            received,
            "220 Sluice FTPS ready\r\n421 Login timed out; closing connection\r\n"
        );
        assert!(
            after >= Duration::from_millis(900) && after < Duration::from_secs(5),
            "{after:?}"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn connections_over_the_limit_get_421_and_are_closed_at_once() {
        let limits = ConnectionLimits {
            total: 2,
            per_ip: 2,
            ..ConnectionLimits::default()
        };
        let server = TestServer::start(limits).await;

        let mut admitted = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            let mut greeting = [0u8; 23];
            stream.read_exact(&mut greeting).await.unwrap();
            assert_eq!(&greeting, b"220 Sluice FTPS ready\r\n");
            admitted.push(stream);
        }
        let mut refused = TcpStream::connect(server.addr).await.unwrap();
        let (received, after) = read_until_closed(&mut refused).await;
        assert_eq!(received, "421 Too many connections; try again later\r\n");
        assert!(after < Duration::from_secs(1), "{after:?}");

        // The places are freed as the sessions end.
        drop(admitted);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut again = TcpStream::connect(server.addr).await.unwrap();
            let mut greeting = [0u8; 23];
            again.read_exact(&mut greeting).await.unwrap();
            if &greeting == b"220 Sluice FTPS ready\r\n" {
                break;
            }
            assert!(Instant::now() < deadline, "no place was freed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.stop().await;
    }
}
