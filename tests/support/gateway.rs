//! Runs the gateway in-process on 127.0.0.1 for one test, with a temporary configuration,
//! freshly generated host keys and a temporary volume, and drives paramiko against it. An
//! FTPS gateway also gets a throwaway certificate authority ([`TestPki`]) whose server
//! certificate names `localhost` and `127.0.0.1`.
//!
//! Tests use the current-thread runtime: the gateway's tasks then run on the test's
//! thread, so [`capture_logs`] sees exactly that test's log events. Blocking clients must
//! run through [`blocking`] so the gateway keeps being polled meanwhile.

#![allow(dead_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sluice::api::Permission;
use sluice::gateway::audit::{AuditIdentity, AuditLog, AuditProtocol, SessionLog};
use sluice::gateway::auth::hash_password;
use sluice::gateway::config::{
    FtpsSettings, GatewayConfig, GatewayUser, PassivePorts, ResidencyStamp, SessionReuse,
    TlsVersion,
};
use sluice::gateway::ftps::tls::{CERT_FILE, KEY_FILE};
use sluice::gateway::{Gateway, GatewayArgs, host_keys};
use sluice::storage::Storage;
use sluice::storage::object::ObjectStoreConfig;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing_subscriber::EnvFilter;

/// The pod name test gateways run as (it names their audit log files).
pub const POD: &str = "sftp-gateway-0";

/// Every permission there is.
pub const ALL: &[Permission] = &[
    Permission::List,
    Permission::Read,
    Permission::Write,
    Permission::Delete,
    Permission::Mkdir,
    Permission::Rename,
];

/// A gateway serving SFTP, and FTPS if asked to, on 127.0.0.1 until [`TestGateway::stop`].
pub struct TestGateway {
    dir: TempDir,
    /// Where the SFTP server listens.
    pub addr: SocketAddr,
    /// Where explicit FTPS listens, if it is served.
    pub ftps: Option<SocketAddr>,
    /// Where implicit FTPS listens, if it is served.
    pub ftps_implicit: Option<SocketAddr>,
    ftps_settings: Mutex<Option<FtpsSettings>>,
    object_store: Option<ObjectStoreConfig>,
    /// The last users and residency stamp written, for the next rewrite.
    live: Mutex<(Vec<GatewayUser>, ResidencyStamp)>,
    pki: Option<TestPki>,
    stop: Option<oneshot::Sender<()>>,
    serving: Option<JoinHandle<()>>,
}

impl TestGateway {
    /// Starts a gateway whose configuration holds `users`.
    pub async fn start(users: Vec<GatewayUser>) -> Result<Self> {
        Self::start_with(users, None, None).await
    }

    /// Starts a gateway that also serves FTPS as `settings` say, with a certificate from a
    /// fresh test CA valid until [`VALID_UNTIL`].
    pub async fn start_ftps(users: Vec<GatewayUser>, settings: FtpsSettings) -> Result<Self> {
        let pki = TestPki::new()?;
        let certificate = pki.issue(VALID_UNTIL)?;
        Self::start_with(users, Some(settings), Some((pki, certificate))).await
    }

    /// Like [`TestGateway::start_ftps`], with the given certificate (PEM chain, PEM key)
    /// from `pki` in the TLS directory.
    pub async fn start_ftps_with_certificate(
        users: Vec<GatewayUser>,
        settings: FtpsSettings,
        pki: TestPki,
        certificate: (String, String),
    ) -> Result<Self> {
        Self::start_with(users, Some(settings), Some((pki, certificate))).await
    }

    /// Starts a gateway serving files from `store` with the credentials `(key, value)`
    /// written as the mounted Secret would hold them, and FTPS too if `ftps` is given.
    pub async fn start_object_store(
        users: Vec<GatewayUser>,
        ftps: Option<FtpsSettings>,
        store: ObjectStoreConfig,
        credentials: &[(&str, &str)],
    ) -> Result<Self> {
        let tls = match ftps {
            Some(_) => {
                let pki = TestPki::new()?;
                let certificate = pki.issue(VALID_UNTIL)?;
                Some((pki, certificate))
            }
            None => None,
        };
        let dir = tempfile::tempdir()?;
        write_credentials(dir.path(), credentials)?;
        Self::start_in(dir, users, ftps, tls, Some(store)).await
    }

    async fn start_with(
        users: Vec<GatewayUser>,
        ftps: Option<FtpsSettings>,
        tls: Option<(TestPki, (String, String))>,
    ) -> Result<Self> {
        Self::start_in(tempfile::tempdir()?, users, ftps, tls, None).await
    }

    async fn start_in(
        dir: TempDir,
        users: Vec<GatewayUser>,
        ftps: Option<FtpsSettings>,
        tls: Option<(TestPki, (String, String))>,
        object_store: Option<ObjectStoreConfig>,
    ) -> Result<Self> {
        let host_keys = write_host_keys(dir.path())?;
        let tls_dir = dir.path().join("tls");
        std::fs::create_dir(&tls_dir)?;
        let pki = match tls {
            Some((pki, certificate)) => {
                std::fs::write(dir.path().join(CA_FILE), &pki.ca_pem)?;
                install_certificate(&tls_dir, &certificate)?;
                Some(pki)
            }
            None => None,
        };
        let args = GatewayArgs {
            config: dir.path().join("config.json"),
            host_keys,
            data_dir: dir.path().join("data"),
            storage_credentials: dir.path().join(CREDENTIALS_DIR),
            sftp_listen: "127.0.0.1:0".parse()?,
            ftps_listen: "127.0.0.1:0".parse()?,
            ftps_implicit_listen: "127.0.0.1:0".parse()?,
            tls_dir: Some(tls_dir),
            pod_name: Some(POD.into()),
            health_listen: None,
            shutdown_grace: 20,
        };
        let first = config(users.clone(), ftps.clone(), object_store.clone());
        let live = Mutex::new((users, first.residency.clone()));
        write_config(&args.config, first)?;

        let gateway = Gateway::bind(&args)
            .await?
            .with_poll_interval(Duration::from_millis(200))
            .with_shutdown_grace(Duration::from_secs(1));
        let addr = gateway.sftp_addr()?;
        let (ftps_addr, ftps_implicit) = (gateway.ftps_addr(), gateway.ftps_implicit_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = tokio::spawn(gateway.serve(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            dir,
            addr,
            ftps: ftps_addr,
            ftps_implicit,
            ftps_settings: Mutex::new(ftps),
            object_store,
            live,
            pki,
            stop: Some(stop),
            serving: Some(serving),
        })
    }

    /// The explicit FTPS address; fails if FTPS is not served.
    pub fn ftps_addr(&self) -> Result<SocketAddr> {
        self.ftps
            .context("the gateway does not serve explicit FTPS")
    }

    /// The implicit FTPS address; fails if FTPS is not served.
    pub fn ftps_implicit_addr(&self) -> Result<SocketAddr> {
        self.ftps_implicit
            .context("the gateway does not serve implicit FTPS")
    }

    /// The test CA's certificate (PEM), for clients to trust.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join(CA_FILE)
    }

    /// The test CA, to issue further certificates.
    pub fn pki(&self) -> Result<&TestPki> {
        self.pki.as_ref().context("the gateway has no test CA")
    }

    /// Replaces the FTPS certificate the way the kubelet updates a mounted Secret.
    pub fn set_certificate(&self, certificate: &(String, String)) -> Result<()> {
        install_certificate(&self.dir.path().join("tls"), certificate)
    }

    /// Root of the gateway's volume.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A scratch directory for a client's files, created on first use.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join("clients").join(name);
        std::fs::create_dir_all(&path).expect("cannot create a scratch directory");
        path
    }

    /// Replaces the configuration the way the kubelet updates a mounted Secret: the new
    /// content appears under the same name in one rename.
    pub fn set_users(&self, users: Vec<GatewayUser>) -> Result<()> {
        self.live.lock().unwrap().0 = users;
        self.rewrite(|_| {})
    }

    /// Replaces the configuration like [`TestGateway::set_users`], with new FTPS settings.
    pub fn set_ftps(&self, users: Vec<GatewayUser>, settings: FtpsSettings) -> Result<()> {
        *self.ftps_settings.lock().unwrap() = Some(settings);
        self.set_users(users)
    }

    /// Replaces the configuration like [`TestGateway::set_users`], with a new residency
    /// stamp for the same users.
    pub fn set_residency(&self, residency: ResidencyStamp) -> Result<()> {
        self.live.lock().unwrap().1 = residency;
        self.rewrite(|_| {})
    }

    /// Rewrites the configuration from the last users, stamp and FTPS settings, changed by
    /// `change`.
    pub fn rewrite(&self, change: impl FnOnce(&mut GatewayConfig)) -> Result<()> {
        let ftps = self.ftps_settings.lock().unwrap().clone();
        let (users, residency) = self.live.lock().unwrap().clone();
        let mut next = config(users, ftps, self.object_store.clone());
        next.residency = residency;
        change(&mut next);
        write_config(&self.config_path(), next)
    }

    /// Writes a configuration holding `users` next to the live one, for a client to
    /// rename over it at a moment of its choosing; returns the staged file.
    pub fn stage_users(&self, users: Vec<GatewayUser>) -> Result<PathBuf> {
        let staged = self.dir.path().join("config.next.json");
        let ftps = self.ftps_settings.lock().unwrap().clone();
        let next = config(users, ftps, self.object_store.clone());
        std::fs::write(&staged, serde_json::to_vec_pretty(&next)?)?;
        Ok(staged)
    }

    /// The configuration file the gateway watches.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.json")
    }

    /// Stops the gateway and checks that it shut down cleanly and promptly.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let serving = self
            .serving
            .take()
            .context("the gateway was already stopped")?;
        tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .context("the gateway did not stop within 10 s")?
            .context("the gateway panicked")
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.abort();
        }
    }
}

/// A session log (SFTP, from 127.0.0.1) of an audit log kept in `storage` for pod
/// `test-0` of the test server, for tests that drive a `Vfs` directly.
pub async fn session_log(storage: &Storage) -> SessionLog {
    let config = config(vec![], None, None);
    let identity = AuditIdentity {
        server: config.server.clone(),
        pod: "test-0".into(),
        region: config.region.clone(),
    };
    let log = AuditLog::start(storage, identity, &config).await;
    log.session(AuditProtocol::Sftp, std::net::Ipv4Addr::LOCALHOST.into())
}

/// The configuration of a test gateway serving `users`.
pub fn config(
    users: Vec<GatewayUser>,
    ftps: Option<FtpsSettings>,
    object_store: Option<ObjectStoreConfig>,
) -> GatewayConfig {
    GatewayConfig {
        server: "tests/sftp".into(),
        region: "cn-shanghai".into(),
        residency: ResidencyStamp {
            compliant: true,
            enforced: false,
            suspended: false,
            policies: vec![],
            violation: None,
            cross_border_transfers: vec![],
        },
        users,
        sftp: true,
        ftps,
        object_store,
        audit: Default::default(),
    }
}

fn write_config(path: &Path, config: GatewayConfig) -> Result<()> {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, serde_json::to_vec_pretty(&config)?)?;
    std::fs::rename(&staged, path)?;
    Ok(())
}

/// Directory, in a gateway's temporary directory, of the storage credentials.
pub const CREDENTIALS_DIR: &str = "storage-credentials";

/// Writes `credentials` into `dir/storage-credentials`, one file per key, as the kubelet
/// mounts a Secret (with `kubectl create secret --from-file`'s trailing newline).
pub fn write_credentials(dir: &Path, credentials: &[(&str, &str)]) -> Result<()> {
    let secret = dir.join(CREDENTIALS_DIR);
    std::fs::create_dir_all(&secret)?;
    for (key, value) in credentials {
        std::fs::write(secret.join(key), format!("{value}\n"))?;
    }
    Ok(())
}

/// Generates host keys into `dir/host-keys` as the gateway reads them; returns that
/// directory.
pub fn write_host_keys(dir: &Path) -> Result<PathBuf> {
    let host_keys = dir.join("host-keys");
    std::fs::create_dir(&host_keys)?;
    for (name, pem) in host_keys::generate()? {
        let path = host_keys.join(name);
        std::fs::write(&path, pem)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(host_keys)
}

/// File name of the test CA's certificate in the gateway's temporary directory.
const CA_FILE: &str = "ca.pem";
/// notAfter of the certificates [`TestGateway::start_ftps`] installs.
pub const VALID_UNTIL: (i32, u8, u8) = (2099, 12, 31);

/// FTPS as the operator renders it by default: explicit and implicit, TLS 1.2 and up,
/// session reuse allowed, no plaintext, and 100 passive ports from a random base (ranges
/// of parallel tests may overlap: each port is bound by one listener at a time).
pub fn ftps_settings() -> FtpsSettings {
    let base = 20_000 + 100 * (rand::random::<u16>() % 100);
    FtpsSettings {
        explicit: true,
        implicit: true,
        passive_ports: PassivePorts {
            first: base,
            count: 100,
        },
        passive_address: None,
        allow_plaintext: false,
        session_reuse: SessionReuse::Allow,
        min_tls_version: TlsVersion::V1_2,
        epsv: true,
        replicas: Vec::new(),
    }
}

/// A throwaway certificate authority for one test.
pub struct TestPki {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    /// The CA certificate, PEM.
    pub ca_pem: String,
}

impl TestPki {
    /// A new CA with a fresh key.
    pub fn new() -> Result<Self> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Sluice test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate()?;
        let ca_pem = params.self_signed(&key)?.pem();
        Ok(Self {
            params,
            key,
            ca_pem,
        })
    }

    /// A server certificate for `localhost` and 127.0.0.1 valid until `not_after`
    /// (year, month, day): (PEM chain, PEM key).
    pub fn issue(&self, not_after: (i32, u8, u8)) -> Result<(String, String)> {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let mut params = rcgen::CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sluice gateway");
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate()?;
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Writes a certificate and key into `dir` under the Secret's file names, each appearing
/// in one rename.
fn install_certificate(dir: &Path, (cert, key): &(String, String)) -> Result<()> {
    for (name, content) in [(KEY_FILE, key), (CERT_FILE, cert)] {
        let staged = dir.join(format!(".{name}.staged"));
        std::fs::write(&staged, content)?;
        std::fs::rename(&staged, dir.join(name))?;
    }
    Ok(())
}

/// A user with home `/<name>` who logs in with `password`.
pub fn password_user(name: &str, password: &str, permissions: &[Permission]) -> GatewayUser {
    let mut salt = [0u8; 16];
    for (i, byte) in name.bytes().take(16).enumerate() {
        salt[i] = byte;
    }
    GatewayUser {
        name: name.into(),
        password_hash: Some(hash_password(password.as_bytes(), &salt)),
        public_keys: vec![],
        home: format!("/{name}"),
        permissions: permissions.to_vec(),
    }
}

/// A user with home `/<name>` who logs in with the key whose public line is given.
pub fn key_user(name: &str, public_key: &str, permissions: &[Permission]) -> GatewayUser {
    GatewayUser {
        name: name.into(),
        password_hash: None,
        public_keys: vec![public_key.into()],
        home: format!("/{name}"),
        permissions: permissions.to_vec(),
    }
}

/// Runs a blocking function (such as an OpenSSH client) without stalling the gateway.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a blocking client panicked")
}

/// Log events of the current test, at every level, as text.
pub struct CapturedLogs {
    buffer: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl CapturedLogs {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buffer.lock().unwrap()).into_owned()
    }

    /// The lines logged at `level` (`ERROR`, `WARN`, ...).
    pub fn at_level(&self, level: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|line| line.split_whitespace().next() == Some(level))
            .map(str::to_owned)
            .collect()
    }
}

/// Captures every log event of this thread (the gateway's, and russh's through the `log`
/// bridge) until the returned value is dropped.
pub fn capture_logs() -> CapturedLogs {
    static BRIDGE: Once = Once::new();
    BRIDGE.call_once(|| {
        // A global subscriber installs the `log` bridge; its own output is discarded, and
        // each test's thread-local subscriber takes precedence on that thread.
        let discard = tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE);
        let _ = tracing_subscriber::util::SubscriberInitExt::try_init(
            discard.with_writer(std::io::sink).finish(),
        );
    });

    let buffer = Arc::new(Mutex::new(Vec::new()));
    let writer = SharedBuffer(buffer.clone());
    // Everything, except what the gateway's own filter always holds back.
    let filter = sluice::cli::without_credential_logs(EnvFilter::new("trace"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .without_time()
        .with_writer(move || writer.clone())
        .finish();
    CapturedLogs {
        buffer,
        _guard: tracing::subscriber::set_default(subscriber),
    }
}

#[derive(Clone)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Helpers every paramiko script starts with: `connect()` logs in as the test's user and
/// returns `(transport, sftp)`; `attempt(f)` turns an exception into a JSON-able result.
const PARAMIKO_PRELUDE: &str = r#"
import json, os, socket, sys, paramiko

def connect(user=None, password=None):
    transport = paramiko.Transport((os.environ["SLUICE_HOST"], int(os.environ["SLUICE_PORT"])))
    transport.connect(
        username=user or os.environ["SLUICE_USER"],
        password=password or os.environ["SLUICE_PASSWORD"],
    )
    return transport, paramiko.SFTPClient.from_transport(transport)

def attempt(f):
    try:
        return {"ok": f()}
    except Exception as e:
        return {"error": type(e).__name__, "errno": getattr(e, "errno", None), "message": str(e)}
"#;

/// A `python3` command that runs a paramiko `script` (after [`PARAMIKO_PRELUDE`]) as
/// `user`/`password` against `addr`.
pub fn paramiko_command(
    addr: SocketAddr,
    user: &str,
    password: &str,
    script: &str,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("python3");
    command
        .arg("-c")
        .arg(format!("{PARAMIKO_PRELUDE}\n{script}"))
        .env("SLUICE_HOST", addr.ip().to_string())
        .env("SLUICE_PORT", addr.port().to_string())
        .env("SLUICE_USER", user)
        .env("SLUICE_PASSWORD", password)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs a paramiko `script` (see [`paramiko_command`]) and parses the JSON it prints on
/// its last line.
pub async fn paramiko(
    addr: SocketAddr,
    user: &str,
    password: &str,
    script: &str,
) -> Result<serde_json::Value> {
    let output = paramiko_command(addr, user, password, script).output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .context("paramiko did not finish within 60 s")?
        .context("cannot run python3 (is paramiko installed?)")?;

    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!(
            "paramiko script failed ({}):\n{stdout}\n{stderr}",
            output.status
        );
    }
    let last = stdout.lines().last().context("paramiko printed nothing")?;
    serde_json::from_str(last).with_context(|| format!("paramiko printed {last:?}"))
}
