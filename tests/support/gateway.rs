//! Runs the SFTP gateway in-process on 127.0.0.1 for one test, with a temporary
//! configuration, freshly generated host keys and a temporary volume, and drives paramiko
//! against it.
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
use sluice::gateway::auth::hash_password;
use sluice::gateway::config::{GatewayConfig, GatewayUser, ResidencyStamp};
use sluice::gateway::{Gateway, GatewayArgs, host_keys};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Every permission there is.
pub const ALL: &[Permission] = &[
    Permission::List,
    Permission::Read,
    Permission::Write,
    Permission::Delete,
    Permission::Mkdir,
    Permission::Rename,
];

/// A gateway serving SFTP on 127.0.0.1 until [`TestGateway::stop`].
pub struct TestGateway {
    dir: TempDir,
    /// Where the SFTP server listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    serving: Option<JoinHandle<()>>,
}

impl TestGateway {
    /// Starts a gateway whose configuration holds `users`.
    pub async fn start(users: Vec<GatewayUser>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let host_keys = dir.path().join("host-keys");
        std::fs::create_dir(&host_keys)?;
        for (name, pem) in host_keys::generate()? {
            let path = host_keys.join(name);
            std::fs::write(&path, pem)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        let args = GatewayArgs {
            config: dir.path().join("config.json"),
            host_keys,
            data_dir: dir.path().join("data"),
            sftp_listen: "127.0.0.1:0".parse()?,
        };
        write_config(&args.config, users)?;

        let gateway = Gateway::bind(&args)
            .await?
            .with_poll_interval(Duration::from_millis(200))
            .with_shutdown_grace(Duration::from_secs(1));
        let addr = gateway.sftp_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = tokio::spawn(gateway.serve(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            dir,
            addr,
            stop: Some(stop),
            serving: Some(serving),
        })
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
        write_config(&self.config_path(), users)
    }

    /// Writes a configuration holding `users` next to the live one, for a client to
    /// rename over it at a moment of its choosing; returns the staged file.
    pub fn stage_users(&self, users: Vec<GatewayUser>) -> Result<PathBuf> {
        let staged = self.dir.path().join("config.next.json");
        std::fs::write(&staged, serde_json::to_vec_pretty(&config(users))?)?;
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

fn config(users: Vec<GatewayUser>) -> GatewayConfig {
    GatewayConfig {
        server: "tests/sftp".into(),
        region: "cn-shanghai".into(),
        residency: ResidencyStamp {
            compliant: true,
            policies: vec![],
            allowed_regions: vec![],
        },
        users,
        ftps: None,
    }
}

fn write_config(path: &Path, users: Vec<GatewayUser>) -> Result<()> {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, serde_json::to_vec_pretty(&config(users))?)?;
    std::fs::rename(&staged, path)?;
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
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
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
