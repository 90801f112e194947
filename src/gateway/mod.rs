//! The data plane: `sluice gateway`.
//!
//! Contract: a gateway serves one TransferServer. It reads the [`config::GatewayConfig`]
//! the operator rendered, the SSH host keys and the volume, all mounted into its pod, and
//! serves SFTP, and FTPS when the configuration asks for it ([`ftps`]), until SIGTERM or
//! Ctrl-C. It re-reads the configuration file every [`CONFIG_POLL_INTERVAL`] and, when the
//! content changed and parses, swaps the set of logins in one step; sessions already
//! logged in keep running, except SFTP sessions whose user is gone or whose password hash
//! or keys changed, and FTPS sessions whose user is gone or whose password hash changed,
//! which are disconnected ([`sftp`], [`ftps`]). While the file cannot be read or does not
//! parse (an operator newer than the gateway writing a field it does not know, say), the
//! last valid configuration keeps serving logins and reads, and every write is refused
//! ([`audit::AuditLog::set_config_problem`]): the file that failed may be the one that
//! suspends writes, so failing open is not an option. A valid file ends it. The kubelet
//! replaces mounted Secret files by swapping symlinks, which file-change notifications on
//! the file itself miss, hence polling by content hash (the FTPS certificate is polled the
//! same way).
//!
//! A problem with FTPS alone (no TLS directory, an unusable `ftps` section, no valid
//! certificate) is logged at error and leaves SFTP running.
//!
//! Every login and file operation is recorded in the [`audit`] log in the server's own
//! storage, and the residency stamp of the configuration in force decides, at each
//! operation, whether writes are accepted ([`vfs`]); a reload that suspends or resumes
//! writes applies to running sessions too. On shutdown the audit log is flushed after the
//! sessions have ended.
//! With `--health-listen`, an HTTP listener answers `/healthz` from before the
//! configuration is read and `/readyz` while serving. On SIGTERM the protocol listeners
//! close at once, `/readyz` turns 503, running sessions get `--shutdown-grace` seconds to
//! finish, and the rest are disconnected.
//!
//! [`run`] is the subcommand; [`Gateway`] is the same in two steps (bind, then serve), so
//! a test can learn the bound addresses first.

pub mod audit;
pub mod auth;
pub mod config;
pub mod ftps;
pub mod host_keys;
mod sessions;
pub mod sftp;
pub mod vfs;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::gateway::audit::{AuditIdentity, AuditLog};
use crate::gateway::auth::{LiveLogins, Logins};
use crate::gateway::config::{GatewayConfig, ResidencyStamp};
use crate::gateway::ftps::{FtpsAddrs, FtpsError, FtpsHandle, FtpsServer};
use crate::gateway::host_keys::HostKeyError;
use crate::gateway::sftp::SftpServer;
use crate::probe_http::Response;
use crate::storage::object::{Credentials, ObjectStoreConfig, ObjectStoreError};
use crate::storage::{ObjectStore, Storage, StorageError, Volume};

/// How often the configuration file is checked for changes.
pub const CONFIG_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// How long running sessions may continue after shutdown starts, unless
/// `--shutdown-grace` says. Shorter than Kubernetes' default 30 s termination grace
/// period, so sessions are closed cleanly before the kubelet kills the pod; the operator
/// passes the server's `shutdownGracePeriodSeconds` and sets the pod's grace period to
/// match.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Arguments of `sluice gateway`.
#[derive(clap::Args, Clone, Debug)]
pub struct GatewayArgs {
    /// The gateway configuration (JSON) rendered by the operator.
    #[arg(long, env = "SLUICE_GATEWAY_CONFIG")]
    pub config: PathBuf,

    /// Directory holding the SSH host keys (`ssh_host_ed25519_key`, ...).
    #[arg(long, env = "SLUICE_HOST_KEYS_DIR")]
    pub host_keys: PathBuf,

    /// Root of the storage volume; user homes are directories below it. Unused when the
    /// configuration names an object store (whose pods mount no volume and do not pass
    /// it).
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "/var/lib/sluice/data")]
    pub data_dir: PathBuf,

    /// Directory holding the object store's credentials, one Secret key per file
    /// (`accessKeyId`, `secretAccessKey`, ...). Read only when the configuration names an
    /// object store without workload identity.
    #[arg(
        long,
        env = "SLUICE_STORAGE_CREDENTIALS",
        default_value = "/etc/sluice/storage-credentials"
    )]
    pub storage_credentials: PathBuf,

    /// Address the SFTP server listens on.
    #[arg(long, env = "SLUICE_SFTP_LISTEN", default_value = "0.0.0.0:2222")]
    pub sftp_listen: SocketAddr,

    /// Address of the explicit FTPS control port (`AUTH TLS`), if FTPS is configured.
    #[arg(long, env = "SLUICE_FTPS_LISTEN", default_value = "0.0.0.0:2121")]
    pub ftps_listen: SocketAddr,

    /// Address of the implicit FTPS port (TLS from the first byte), if FTPS is configured.
    #[arg(
        long,
        env = "SLUICE_FTPS_IMPLICIT_LISTEN",
        default_value = "0.0.0.0:2990"
    )]
    pub ftps_implicit_listen: SocketAddr,

    /// Directory holding the FTPS certificate and key as a `kubernetes.io/tls` Secret
    /// mounts them (`tls.crt`, `tls.key`). Without it FTPS is not served.
    #[arg(long, env = "SLUICE_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,

    /// This pod's name (`NAME-gateway-ORDINAL`). When the configuration splits the
    /// passive port range between pods, the ordinal picks this pod's share. The audit log
    /// names the pod with it (the host name when it is not given).
    #[arg(long, env = "SLUICE_POD_NAME")]
    pub pod_name: Option<String>,

    /// Address of an HTTP listener for probes: `/healthz` answers while the process
    /// runs, `/readyz` once every listener is bound and the configuration and storage are
    /// loaded, until shutdown starts. Not served unless given.
    #[arg(long, env = "SLUICE_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// Seconds running sessions may continue after SIGTERM before they are disconnected;
    /// new connections are refused from the signal on.
    #[arg(
        long,
        env = "SLUICE_SHUTDOWN_GRACE",
        default_value_t = SHUTDOWN_GRACE.as_secs(),
        value_name = "SECONDS"
    )]
    pub shutdown_grace: u64,
}

impl GatewayArgs {
    fn ordinal(&self) -> Option<usize> {
        self.pod_name.as_deref().and_then(config::ordinal_of_pod)
    }

    /// The pod's name for the audit log: `--pod-name`, or else the host name (which
    /// Kubernetes sets to the pod name).
    fn audit_pod_name(&self) -> String {
        let given = self.pod_name.as_deref().map(str::trim);
        if let Some(name) = given.filter(|n| !n.is_empty()) {
            return name.to_owned();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty() && !name.contains('/'))
            .unwrap_or_else(|| "gateway".to_owned())
    }
}

/// Errors that stop a gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The configuration file could not be read.
    #[error("failed to read gateway configuration {}", path.display())]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// What the filesystem reported.
        #[source]
        source: io::Error,
    },
    /// The configuration file is not a valid gateway configuration.
    #[error("gateway configuration {} is not valid", path.display())]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// What the parser reported.
        #[source]
        source: serde_json::Error,
    },
    /// The host keys could not be loaded.
    #[error("failed to load SSH host keys")]
    HostKeys(#[from] HostKeyError),
    /// The volume could not be opened.
    #[error("failed to open storage")]
    Storage(#[from] StorageError),
    /// The object store cannot be used as configured.
    #[error("failed to open the object store")]
    ObjectStore(#[from] ObjectStoreError),
    /// The object store's region is not one the residency decision allows.
    #[error("refusing to serve an object store in region {region}: {reason}")]
    Residency {
        /// The region resolved from the store's endpoint and configuration.
        region: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A listening address (SFTP, an FTPS control port or the health listener) could not
    /// be bound.
    #[error("failed to listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What the OS reported.
        #[source]
        source: io::Error,
    },
}

/// Runs `sluice gateway` until SIGTERM or Ctrl-C, then shuts down gracefully.
pub async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let gateway = Gateway::bind(&args).await?;
    gateway.serve(crate::cli::terminated()).await;
    Ok(())
}

/// A gateway whose listener is bound but which does not serve yet.
pub struct Gateway {
    health: Option<HealthListener>,
    config_path: PathBuf,
    config_hash: [u8; 32],
    logins: LiveLogins,
    sftp: SftpServer,
    listener: Option<TcpListener>,
    ftps: Option<FtpsServer>,
    audit: AuditLog,
    /// Why writes are suspended at start, if they are.
    suspended: Option<String>,
    ordinal: Option<usize>,
    poll_interval: Duration,
    grace: Duration,
}

impl Gateway {
    /// Reads the configuration, host keys and volume named in `args` and binds the SFTP
    /// address, and the FTPS ports if FTPS is configured. Fails if any of them is unusable
    /// or cannot be bound; a problem with FTPS alone is logged and leaves SFTP running.
    pub async fn bind(args: &GatewayArgs) -> Result<Self, GatewayError> {
        // First, so the liveness probe is answered while the rest loads.
        let health = match args.health_listen {
            Some(addr) => Some(HealthListener::start(addr).await?),
            None => None,
        };
        let bytes = read_config(&args.config).await?;
        let config = parse_config(&args.config, &bytes)?;
        let host_keys = host_keys::load(&args.host_keys)?;
        let (storage, region) = open_storage(args, &config)?;
        let listener = match config.sftp {
            true => Some(
                TcpListener::bind(args.sftp_listen)
                    .await
                    .map_err(|source| GatewayError::Listen {
                        addr: args.sftp_listen,
                        source,
                    })?,
            ),
            false => None,
        };

        log_startup(
            &config,
            &host_keys,
            listener.as_ref().and_then(|l| l.local_addr().ok()),
        );
        let identity = AuditIdentity {
            server: config.server.clone(),
            pod: args.audit_pod_name(),
            region,
        };
        let audit = AuditLog::start(&storage, identity, &config).await;
        let suspended = audit.writes_refused();
        if let Some(reason) = &suspended {
            tracing::warn!(reason, "Writes are suspended");
        }
        let logins = LiveLogins::new(Logins::new(&config.users));
        let ftps = bind_ftps(args, &config, &logins, &storage, &audit).await?;
        Ok(Self {
            health,
            config_path: args.config.clone(),
            config_hash: Sha256::digest(&bytes).into(),
            sftp: SftpServer::new(host_keys, logins.clone(), storage, audit.clone()),
            logins,
            listener,
            ftps,
            audit,
            suspended,
            ordinal: args.ordinal(),
            poll_interval: CONFIG_POLL_INTERVAL,
            grace: Duration::from_secs(args.shutdown_grace),
        })
    }

    /// The address the health listener is bound to, if it is served.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.as_ref().map(|h| h.addr)
    }

    /// The address the SFTP server is bound to; an error if SFTP is not served.
    pub fn sftp_addr(&self) -> io::Result<SocketAddr> {
        match &self.listener {
            Some(listener) => listener.local_addr(),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "SFTP is not served",
            )),
        }
    }

    /// The address explicit FTPS is bound to, if it is served.
    pub fn ftps_addr(&self) -> Option<SocketAddr> {
        self.ftps.as_ref()?.explicit_addr()
    }

    /// The address implicit FTPS is bound to, if it is served.
    pub fn ftps_implicit_addr(&self) -> Option<SocketAddr> {
        self.ftps.as_ref()?.implicit_addr()
    }

    /// Checks the configuration file at `interval` instead of [`CONFIG_POLL_INTERVAL`].
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Lets sessions run for `grace` after shutdown starts instead of `--shutdown-grace`.
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Serves until `shutdown` completes, then stops accepting connections, lets running
    /// sessions finish within the grace period, disconnects the rest and flushes the
    /// audit log.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        if let Some(health) = &self.health {
            health.ready.store(true, Ordering::SeqCst);
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let audit = self.audit.clone();
        let reload = tokio::spawn(watch_config(
            ConfigWatch {
                path: self.config_path,
                hash: self.config_hash,
                invalid: false,
                problem: None,
                logins: self.logins,
                audit: self.audit,
                suspended: self.suspended,
                ftps: self.ftps.as_ref().map(FtpsServer::handle),
                ordinal: self.ordinal,
                interval: self.poll_interval,
            },
            stop_rx.clone(),
        ));

        let sftp_stop = stop_rx.clone();
        let sftp = async {
            if let Some(listener) = self.listener {
                self.sftp.serve(listener, sftp_stop, self.grace).await;
            }
        };
        let ftps = async {
            if let Some(ftps) = self.ftps {
                ftps.serve(stop_rx, self.grace, self.poll_interval).await;
            }
        };
        let health = self.health;
        let stop = async {
            shutdown.await;
            if let Some(health) = &health {
                health.ready.store(false, Ordering::SeqCst);
            }
            tracing::info!(grace_s = self.grace.as_secs(), "Shutting down");
            let _ = stop_tx.send(true);
        };
        tokio::join!(sftp, ftps, stop);

        let _ = reload.await;
        audit.close().await;
        drop(health);
        tracing::info!("Gateway stopped");
    }
}

/// The gateway's HTTP health listener, served from its start until this is dropped.
struct HealthListener {
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl HealthListener {
    async fn start(addr: SocketAddr) -> Result<Self, GatewayError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| GatewayError::Listen { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| GatewayError::Listen { addr, source })?;
        let ready = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let routes = {
            let ready = ready.clone();
            move |path: &str| match path {
                "/healthz" => Response::ok("ok\n"),
                "/readyz" if ready.load(Ordering::SeqCst) => Response::ok("ok\n"),
                "/readyz" => Response::unavailable("not serving\n"),
                _ => Response::not_found(),
            }
        };
        tokio::spawn(crate::probe_http::serve(listener, routes, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            addr,
            ready,
            _stop: stop,
        })
    }
}

/// The FTPS server, if the configuration asks for FTPS and it can be served. Only a port
/// that cannot be bound stops the gateway; anything else wrong with FTPS leaves SFTP alone.
async fn bind_ftps(
    args: &GatewayArgs,
    config: &GatewayConfig,
    logins: &LiveLogins,
    storage: &Storage,
    audit: &AuditLog,
) -> Result<Option<FtpsServer>, GatewayError> {
    let Some(settings) = &config.ftps else {
        return Ok(None);
    };
    let settings = match settings.for_replica(args.ordinal()) {
        Ok(settings) => settings,
        Err(error) => {
            let error = ErrorChain(&error);
            tracing::error!(%error, "Cannot serve FTPS; serving the other protocols");
            return Ok(None);
        }
    };
    let Some(tls_dir) = &args.tls_dir else {
        tracing::error!(
            "FTPS is configured but no TLS directory is given; serving the other protocols"
        );
        return Ok(None);
    };
    let addrs = FtpsAddrs {
        explicit: args.ftps_listen,
        implicit: args.ftps_implicit_listen,
    };
    let (logins, storage, audit) = (logins.clone(), storage.clone(), audit.clone());
    match FtpsServer::bind(&settings, tls_dir, addrs, logins, storage, audit).await {
        Ok(server) => {
            tracing::info!(
                explicit = ?server.explicit_addr(),
                implicit = ?server.implicit_addr(),
                "FTPS listening"
            );
            Ok(Some(server))
        }
        Err(FtpsError::Listen { addr, source }) => Err(GatewayError::Listen { addr, source }),
        Err(error) => {
            let error = ErrorChain(&error);
            tracing::error!(%error, "Cannot serve FTPS; serving the other protocols");
            Ok(None)
        }
    }
}

/// The storage the configuration names and its region: the volume at `--data-dir` (in
/// the server's region), or the object store, once its region has been resolved again
/// from exactly what the gateway connects to and found allowed by the operator's
/// residency decision.
fn open_storage(
    args: &GatewayArgs,
    config: &GatewayConfig,
) -> Result<(Storage, String), GatewayError> {
    let Some(store) = &config.object_store else {
        let volume = Volume::open_fs(&args.data_dir)?;
        return Ok((volume.into(), config.region.clone()));
    };
    let region = check_residency(store, &config.residency)?;
    let credentials = match store.workload_identity {
        true => Credentials::default(),
        false => Credentials::read_dir(&args.storage_credentials)?,
    };
    let opened = ObjectStore::open(store, &credentials)?;
    tracing::info!(
        provider = ?store.provider,
        bucket = %store.bucket,
        prefix = %store.prefix,
        %region,
        "Serving files from the object store"
    );
    Ok((opened.into(), region))
}

/// The object store's region, checked against the stamp. The region resolved from the
/// endpoint must be the stamped one whatever the policy mode: otherwise the store is not
/// the one the operator judged, and the gateway refuses to start. A server found
/// non-compliant is served (reads only, where a governing policy is enforced: see
/// [`ResidencyStamp::writes_refused`]), so files already stored stay reachable.
pub fn check_residency(
    store: &ObjectStoreConfig,
    residency: &ResidencyStamp,
) -> Result<String, GatewayError> {
    let region = store.check_region()?.region;
    if !residency.compliant {
        tracing::warn!(
            %region,
            policies = ?residency.policies,
            enforced = residency.enforced,
            "Serving an object store whose server does not comply with its residency policy"
        );
    }
    Ok(region)
}

fn log_startup(
    config: &GatewayConfig,
    host_keys: &[russh::keys::PrivateKey],
    addr: Option<SocketAddr>,
) {
    for key in host_keys {
        let fingerprint = key.public_key().fingerprint(russh::keys::HashAlg::Sha256);
        tracing::info!(algorithm = %key.algorithm(), %fingerprint, "Loaded host key");
    }
    if !config.residency.compliant {
        tracing::warn!(
            policies = ?config.residency.policies,
            "Serving a server that its residency policy reports as not compliant"
        );
    }
    let sftp = addr.map_or_else(|| "off".to_string(), |a| a.to_string());
    tracing::info!(
        server = %config.server,
        region = %config.region,
        users = config.users.len(),
        %sftp,
        "Gateway listening"
    );
}

/// Why the latest configuration file cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConfigProblem {
    /// It cannot be read (gone, unreadable).
    Unreadable,
    /// It is not a valid gateway configuration.
    Invalid,
}

impl ConfigProblem {
    /// What clients are told, after "writes are suspended: ".
    fn reason(self) -> &'static str {
        match self {
            Self::Unreadable => "the gateway configuration cannot be read",
            Self::Invalid => "the latest gateway configuration is not valid",
        }
    }
}

/// What the configuration watcher needs.
struct ConfigWatch {
    path: PathBuf,
    /// Hash of the content read last, valid or not.
    hash: [u8; 32],
    /// Whether that content failed to parse.
    invalid: bool,
    /// Why the file could not be used at the last check, if it could not.
    problem: Option<ConfigProblem>,
    logins: LiveLogins,
    audit: AuditLog,
    /// Why writes were refused at the last check, to log changes once.
    suspended: Option<String>,
    ftps: Option<FtpsHandle>,
    ordinal: Option<usize>,
    interval: Duration,
}

/// Polls the configuration file until `stop` turns true, swapping in the logins of each
/// new valid version. While the file cannot be read or parsed, the previous version keeps
/// serving and writes are refused; a change of whether writes are refused, for that or
/// for the stamp, is logged once.
async fn watch_config(mut watch: ConfigWatch, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(watch.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = stopped(&mut stop) => return,
            _ = ticker.tick() => {}
        }

        let problem = watch.poll().await;
        if problem.is_none() && watch.problem.is_some() {
            tracing::info!("Gateway configuration usable again");
        }
        watch.problem = problem;
        watch
            .audit
            .set_config_problem(problem.map(ConfigProblem::reason));
        let suspended = watch.audit.writes_refused();
        if suspended != watch.suspended {
            match &suspended {
                Some(reason) => tracing::warn!(reason, "Writes are suspended"),
                None => tracing::info!("Writes are accepted again"),
            }
            watch.suspended = suspended;
        }
    }
}

impl ConfigWatch {
    /// Reads the file and puts it in force if it changed and parses; returns why the
    /// file cannot be used, if it cannot. Each problem is logged when it starts.
    async fn poll(&mut self) -> Option<ConfigProblem> {
        let bytes = match read_config(&self.path).await {
            Ok(bytes) => bytes,
            Err(error) => {
                if self.problem != Some(ConfigProblem::Unreadable) {
                    let error = ErrorChain(&error);
                    tracing::warn!(
                        %error,
                        "Keeping the previous configuration for reads; refusing writes"
                    );
                }
                return Some(ConfigProblem::Unreadable);
            }
        };
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if hash == self.hash {
            // Unchanged since it was read last: as usable as it was then (a file that was
            // unreadable for a while and is back unchanged is the one in force).
            return self.invalid.then_some(ConfigProblem::Invalid);
        }
        self.hash = hash;
        self.invalid = false;
        match parse_config(&self.path, &bytes) {
            Ok(config) => {
                self.apply(config);
                None
            }
            Err(error) => {
                self.invalid = true;
                let error = ErrorChain(&error);
                tracing::warn!(
                    %error,
                    "Keeping the previous configuration for reads; refusing writes"
                );
                Some(ConfigProblem::Invalid)
            }
        }
    }

    /// Puts a new valid configuration in force.
    fn apply(&self, config: GatewayConfig) {
        self.logins.replace(Logins::new(&config.users));
        self.audit.apply(&config);
        tracing::info!(users = config.users.len(), "Reloaded configuration");
        match &self.ftps {
            Some(ftps) => match config.ftps.map(|f| f.for_replica(self.ordinal)) {
                Some(Err(error)) => {
                    let error = ErrorChain(&error);
                    tracing::warn!(%error, "Keeping the previous FTPS settings");
                }
                settings => ftps.apply(settings.and_then(Result::ok).as_ref()),
            },
            None if config.ftps.is_some() => {
                tracing::warn!(
                    "FTPS was added to the configuration; restart the gateway to serve it"
                );
            }
            None => {}
        }
    }
}

async fn read_config(path: &Path) -> Result<Vec<u8>, GatewayError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| GatewayError::ReadConfig {
            path: path.to_owned(),
            source,
        })
}

fn parse_config(path: &Path, bytes: &[u8]) -> Result<GatewayConfig, GatewayError> {
    serde_json::from_slice(bytes).map_err(|source| GatewayError::ParseConfig {
        path: path.to_owned(),
        source,
    })
}

/// Displays an error followed by its sources, `error: source: source...`, for log fields.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

/// Completes when `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here, not across an await.
    let _ = stop.wait_for(|now| *now).await;
}
