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
use tracing::{Instrument, field};

use crate::gateway::auth::LiveLogins;
use crate::gateway::config::FtpsSettings;
use crate::gateway::ftps::control::{Mode, Policy, SessionSetup};
use crate::gateway::ftps::engine::Engine;
use crate::gateway::ftps::protocol::Reply;
use crate::gateway::ftps::tls::{CertificateInfo, CertificateStore};
use crate::gateway::sessions::{self, Protocol};
use crate::gateway::{ErrorChain, stopped};
use crate::storage::Volume;

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
        volume: Volume,
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
            engine: Engine::new(logins, volume),
            certificates,
            policy: RwLock::new(Arc::new(policy)),
            explicit: settings.explicit,
            implicit: settings.implicit,
        };
        Ok(Self {
            shared: Arc::new(shared),
            explicit,
            implicit,
        })
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
                    let shared = self.shared.clone();
                    let disconnect = disconnect_rx.clone();
                    sessions.spawn(serve_connection(shared, mode, stream, peer, disconnect));
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

/// Serves one connection to its end, under a span carrying the peer and, after login, the
/// user.
async fn serve_connection(
    shared: Arc<Shared>,
    mode: Mode,
    stream: TcpStream,
    peer: SocketAddr,
    disconnect: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("ftps", %peer, mode = mode.as_str(), user = field::Empty);
    async move {
        if shared.certificates.current().is_none() {
            refuse_without_certificate(mode, stream).await;
            return;
        }
        let setup = SessionSetup {
            mode,
            policy: shared.policy(),
            engine: shared.engine.clone(),
        };
        control::run(setup, stream, peer, disconnect).await;
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
    use super::*;
    use crate::gateway::config::{PassivePorts, SessionReuse, TlsVersion};

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

    #[tokio::test]
    async fn only_the_listeners_asked_for_are_bound() {
        let dir = tempfile::tempdir().unwrap();
        let volume = Volume::open_fs(&dir.path().join("data")).unwrap();
        let localhost = "127.0.0.1:0".parse().unwrap();
        let addrs = FtpsAddrs {
            explicit: localhost,
            implicit: localhost,
        };
        let logins = LiveLogins::default();
        let server = FtpsServer::bind(&settings(), dir.path(), addrs, logins, volume)
            .await
            .unwrap();
        assert!(server.explicit_addr().is_some());
        assert!(server.implicit_addr().is_none());
        assert!(server.handle().certificate().is_none());
    }
}
