//! The gateway serving files from an object store: a real SeaweedFS on 127.0.0.1
//! (`support::s3`), real clients (OpenSSH `sftp` and `scp`, paramiko, curl, lftp), and
//! every check of what was stored made on the bucket itself, through an operator on its
//! root, so that temporary or partial objects cannot hide behind the gateway's view.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use opendal::Operator;
use sluice::gateway::config::{FtpsSettings, GatewayUser};
use sluice::storage::object::ObjectStoreConfig;

use support::ftp::{FtpClients, run, succeed};
use support::gateway::{
    ALL, TestGateway, blocking, capture_logs, ftps_settings, paramiko, password_user,
};
use support::s3::{SeaweedFs, all_keys};
use support::sftp::{Auth, SftpClient, random_file, sha256_file};

const USER: &str = "cucm";
const PASSWORD: &str = "Object-Store-Horse-Battery-7";
/// Every gateway here serves its bucket under this prefix, as the operator would.
const PREFIX: &str = "gateways/cucm/";

/// A gateway on a fresh bucket of the shared SeaweedFS, with an operator on the bucket's
/// root to check what it stored.
struct Fixture {
    gateway: TestGateway,
    bucket: Operator,
    name: String,
}

impl Fixture {
    async fn start(test: &str) -> Result<Self> {
        Self::start_with(test, None).await
    }

    async fn start_ftps(test: &str) -> Result<Self> {
        Self::start_with(test, Some(ftps_settings())).await
    }

    async fn start_with(test: &str, ftps: Option<FtpsSettings>) -> Result<Self> {
        let weed = SeaweedFs::shared()?;
        let name = weed.bucket(test)?;
        let store = weed.config(&name, PREFIX);
        let gateway = start_gateway(vec![user()], ftps, store, &weed.credentials()).await?;
        Ok(Self {
            gateway,
            bucket: weed.bucket_operator(&name)?,
            name,
        })
    }

    /// Every key in the bucket, prefix included.
    async fn keys(&self) -> Result<Vec<String>> {
        all_keys(&self.bucket).await
    }

    /// The content of the object the user sees at `path` (relative to the home).
    async fn object(&self, path: &str) -> Result<Vec<u8>> {
        let key = format!("{PREFIX}{USER}/{path}");
        let read = self.bucket.read(&key).await;
        Ok(read.with_context(|| format!("no object {key}"))?.to_vec())
    }

    fn sftp(&self) -> Result<SftpClient> {
        let auth = Auth::Password(PASSWORD.into());
        SftpClient::new(self.gateway.addr, USER, auth, &self.gateway.scratch("sftp"))
    }

    fn ftp(&self) -> FtpClients {
        FtpClients {
            ca: self.gateway.ca_file(),
            user: USER.into(),
            password: PASSWORD.into(),
        }
    }

    fn ftp_url(&self, path: &str) -> Result<String> {
        Ok(format!("ftp://{}{path}", self.gateway.ftps_addr()?))
    }
}

fn user() -> GatewayUser {
    password_user(USER, PASSWORD, ALL)
}

async fn start_gateway(
    users: Vec<GatewayUser>,
    ftps: Option<FtpsSettings>,
    store: ObjectStoreConfig,
    credentials: &[(&str, &str)],
) -> Result<TestGateway> {
    TestGateway::start_object_store(users, ftps, store, credentials).await
}

/// Runs OpenSSH sftp batch `commands`; fails unless they all succeed.
async fn sftp(client: SftpClient, commands: &str) -> Result<String> {
    let commands = commands.to_owned();
    blocking(move || client.run(&commands)).await
}

/// The key of `path` in the user's home.
fn key(path: &str) -> String {
    format!("{PREFIX}{USER}/{path}")
}

#[tokio::test]
async fn openssh_sftp_stores_files_as_objects_under_the_prefix() -> Result<()> {
    let logs = capture_logs();
    let fixture = Fixture::start("roundtrip").await?;
    let scratch = fixture.gateway.scratch("files");
    let local = scratch.join("report.bin");
    let sha = random_file(&local, 3 * 1024 * 1024 + 5, 1)?;
    let back = scratch.join("back.bin");

    let listing = sftp(
        fixture.sftp()?,
        &format!(
            "mkdir inbox\nput {} inbox/report.bin\nls -1 inbox\nget inbox/report.bin {}\n",
            local.display(),
            back.display()
        ),
    )
    .await
    .with_context(|| logs.text())?;
    ensure!(listing.contains("inbox/report.bin"), "{listing}");
    ensure!(sha256_file(&back)? == sha, "the download differs");
    ensure!(
        fixture.keys().await? == [key(""), key("inbox/"), key("inbox/report.bin")],
        "{:?}",
        fixture.keys().await?
    );
    let stored = fixture.object("inbox/report.bin").await?;
    ensure!(
        support::sftp::sha256_hex(&stored) == sha,
        "stored object differs"
    );
    fixture.gateway.stop().await
}
