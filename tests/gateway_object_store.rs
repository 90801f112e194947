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
use support::names;
use support::s3::{SeaweedFs, all_keys, audit_keys};
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

/// The test user's view of `store`, recording into an audit log in the same bucket.
async fn open_vfs(store: sluice::storage::ObjectStore) -> Result<sluice::gateway::vfs::Vfs> {
    let storage = sluice::storage::Storage::from(store);
    let log = support::gateway::session_log(&storage).await;
    Ok(sluice::gateway::vfs::Vfs::open(storage, &user(), &log).await?)
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

/// Runs `scp` with the sftp client's options (SFTP protocol, askpass, its known_hosts).
async fn scp(fixture: &Fixture, args: &[&str]) -> Result<std::process::Output> {
    let dir = fixture.gateway.scratch("sftp");
    let askpass = dir.join("askpass.sh");
    std::fs::write(
        &askpass,
        "#!/bin/sh\nprintf '%s\\n' \"$SLUICE_TEST_PASSWORD\"\n",
    )?;
    std::fs::set_permissions(
        &askpass,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    let mut command = std::process::Command::new("scp");
    command
        .args(["-P", &fixture.gateway.addr.port().to_string()])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            dir.join("known_hosts").display()
        ))
        .args([
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            "LogLevel=ERROR",
        ])
        .args([
            "-o",
            "PreferredAuthentications=password",
            "-o",
            "PubkeyAuthentication=no",
        ])
        .args(["-F", "/dev/null"])
        .args(args)
        .env("SSH_ASKPASS", &askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env("SLUICE_TEST_PASSWORD", PASSWORD)
        .stdin(std::process::Stdio::null());
    Ok(blocking(move || command.output()).await?)
}

async fn script(fixture: &Fixture, script: &str) -> Result<serde_json::Value> {
    paramiko(fixture.gateway.addr, USER, PASSWORD, script).await
}

/// C06: clients that set times and modes after an upload see the upload succeed; a
/// size change (truncate) is refused rather than acknowledged and ignored.
#[tokio::test]
async fn setting_times_and_modes_after_an_upload_never_fails_it() -> Result<()> {
    let logs = capture_logs();
    let fixture = Fixture::start("c06").await?;
    let scratch = fixture.gateway.scratch("files");
    let local = scratch.join("cdr.csv");
    let sha = random_file(&local, 70_000, 6)?;

    let remote = format!("{USER}@127.0.0.1:scp.csv");
    let output = scp(&fixture, &["-p", &local.to_string_lossy(), &remote]).await?;
    ensure!(
        output.status.success(),
        "scp -p failed ({}): {}{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        logs.text()
    );
    sftp(
        fixture.sftp()?,
        &format!("put -p {} put-p.csv\n", local.display()),
    )
    .await?;
    let result = script(
        &fixture,
        &format!(
            r#"
t, sftp = connect()
sftp.put({local:?}, "paramiko.csv")
r = {{"utime": attempt(lambda: sftp.utime("paramiko.csv", (1000000000, 1000000000))),
     "chmod": attempt(lambda: sftp.chmod("paramiko.csv", 0o600)),
     "same size": attempt(lambda: sftp.truncate("paramiko.csv", 70000)),
     "truncate": attempt(lambda: sftp.truncate("paramiko.csv", 10)),
     "ftruncate": attempt(lambda: sftp.open("paramiko.csv", "r").truncate(0)),
     "size": sftp.stat("paramiko.csv").st_size}}
print(json.dumps(r))
"#,
            local = local.display().to_string()
        ),
    )
    .await?;
    ensure!(result["utime"].get("ok").is_some(), "{result}");
    ensure!(result["chmod"].get("ok").is_some(), "{result}");
    ensure!(result["same size"].get("ok").is_some(), "{result}");
    // A size change is refused, never acknowledged with the object unchanged.
    for refused in ["truncate", "ftruncate"] {
        let message = result[refused]["message"].as_str().unwrap_or_default();
        ensure!(message.contains("size is not supported"), "{result}");
    }
    ensure!(result["size"] == 70_000, "{result}");
    for name in ["scp.csv", "put-p.csv", "paramiko.csv"] {
        let stored = fixture.object(name).await?;
        ensure!(support::sftp::sha256_hex(&stored) == sha, "{name} differs");
    }
    fixture.gateway.stop().await
}

/// C07: STAT right after CLOSE sees the whole file.
#[tokio::test]
async fn a_stat_right_after_close_sees_the_upload() -> Result<()> {
    let fixture = Fixture::start("c07").await?;
    let local = fixture.gateway.scratch("files").join("big.bin");
    random_file(&local, 9 * 1024 * 1024 + 3, 7)?;
    let result = script(
        &fixture,
        &format!(
            r#"
t, sftp = connect()
small = attempt(lambda: sftp.put({local:?}, "confirmed.bin", confirm=True).st_size)
print(json.dumps({{"size": small}}))
"#,
            local = local.display().to_string()
        ),
    )
    .await?;
    ensure!(result["size"]["ok"] == 9 * 1024 * 1024 + 3, "{result}");
    ensure!(fixture.object("confirmed.bin").await?.len() == 9 * 1024 * 1024 + 3);
    fixture.gateway.stop().await
}

/// C08 over SFTP: a plain rename refuses an existing target with a clear status, the
/// advertised posix-rename replaces it.
#[tokio::test]
async fn plain_rename_refuses_an_existing_target_and_posix_rename_replaces_it() -> Result<()> {
    let fixture = Fixture::start("c08").await?;
    let result = script(
        &fixture,
        r#"
t, sftp = connect()
with sftp.open("X.tmp", "w") as f: f.write(b"new content")
with sftp.open("X.csv", "w") as f: f.write(b"old")
r = {"plain": attempt(lambda: sftp.rename("X.tmp", "X.csv"))}
r["posix"] = attempt(lambda: sftp.posix_rename("X.tmp", "X.csv"))
r["content"] = sftp.open("X.csv").read().decode()
r["names"] = sorted(sftp.listdir("."))
print(json.dumps(r))
"#,
    )
    .await?;
    ensure!(
        result["plain"]["error"] == "OSError" || result["plain"]["error"] == "IOError",
        "{result}"
    );
    let message = result["plain"]["message"].as_str().unwrap_or_default();
    ensure!(message.contains("already exists"), "{result}");
    ensure!(result["posix"].get("ok").is_some(), "{result}");
    ensure!(result["content"] == "new content", "{result}");
    ensure!(result["names"] == serde_json::json!(["X.csv"]), "{result}");
    ensure!(
        fixture.keys().await? == [key(""), key("X.csv")],
        "{:?}",
        fixture.keys().await?
    );
    fixture.gateway.stop().await
}

/// C08 over FTPS: lftp's temp-file upload ends with the right content, also when it
/// replaces a file.
#[tokio::test]
async fn lftp_temp_file_uploads_end_with_the_right_content() -> Result<()> {
    let fixture = Fixture::start_ftps("c08-lftp").await?;
    let scratch = fixture.gateway.scratch("files");
    let first = scratch.join("report.csv");
    random_file(&first, 100_000, 81)?;
    let url = fixture.ftp_url("/")?;
    let upload = format!(
        "set xfer:use-temp-file yes; put {} -o report.csv",
        first.display()
    );
    succeed(fixture.ftp().lftp(&url, &upload)).await?;
    ensure!(fixture.object("report.csv").await? == std::fs::read(&first)?);

    random_file(&first, 120_000, 82)?;
    succeed(fixture.ftp().lftp(&url, &upload)).await?;
    ensure!(
        fixture.object("report.csv").await? == std::fs::read(&first)?,
        "not replaced"
    );
    ensure!(
        fixture.keys().await? == [key(""), key("report.csv")],
        "{:?}",
        fixture.keys().await?
    );
    fixture.gateway.stop().await
}

/// C09: the `.filepart` pattern over SFTP and FTPS leaves the final object whole and no
/// temporary object behind.
#[tokio::test]
async fn filepart_uploads_leave_only_the_final_object() -> Result<()> {
    let fixture = Fixture::start_ftps("c09").await?;
    let local = fixture.gateway.scratch("files").join("backup.tar");
    let sha = random_file(&local, 12 * 1024 * 1024 + 11, 9)?;

    let result = script(
        &fixture,
        &format!(
            r#"
t, sftp = connect()
sftp.put({local:?}, "sftp.tar.filepart")
sftp.rename("sftp.tar.filepart", "sftp.tar")
print(json.dumps({{"names": sorted(sftp.listdir("."))}}))
"#,
            local = local.display().to_string()
        ),
    )
    .await?;
    ensure!(
        result["names"] == serde_json::json!(["sftp.tar"]),
        "{result}"
    );

    let mut curl = fixture.ftp().curl();
    curl.arg("-T")
        .arg(&local)
        .arg(fixture.ftp_url("/ftps.tar.filepart")?)
        .args(["-Q", "-RNFR /ftps.tar.filepart", "-Q", "-RNTO /ftps.tar"]);
    succeed(curl).await?;

    for name in ["sftp.tar", "ftps.tar"] {
        let stored = fixture.object(name).await?;
        ensure!(support::sftp::sha256_hex(&stored) == sha, "{name} differs");
    }
    let keys = fixture.keys().await?;
    ensure!(
        keys == [key(""), key("ftps.tar"), key("sftp.tar")],
        "{keys:?}"
    );
    fixture.gateway.stop().await
}

/// C10: directories behave like directories throughout, including ones other S3 tools
/// made (a `dir/` marker, or only objects under a prefix).
#[tokio::test]
async fn directories_made_here_or_by_other_tools_behave_like_directories() -> Result<()> {
    let fixture = Fixture::start("c10").await?;
    let local = fixture.gateway.scratch("files").join("f.txt");
    random_file(&local, 1000, 10)?;

    let out = sftp(
        fixture.sftp()?,
        &format!(
            "mkdir d\ncd d\nput {} f.txt\nls -1\nrm f.txt\nls -1\ncd ..\nls -1\n",
            local.display()
        ),
    )
    .await?;
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| !l.starts_with("sftp>"))
        .map(str::trim)
        .collect();
    ensure!(lines == ["f.txt", "d"], "{out}");
    ensure!(
        fixture.keys().await? == [key(""), key("d/")],
        "{:?}",
        fixture.keys().await?
    );
    sftp(fixture.sftp()?, "rmdir d\n").await?;
    ensure!(
        fixture.keys().await? == [key("")],
        "{:?}",
        fixture.keys().await?
    );

    fixture.bucket.create_dir(&key("foreign/")).await?;
    fixture
        .bucket
        .write(&key("implicit/sub/file.txt"), "x")
        .await?;
    let out = sftp(
        fixture.sftp()?,
        "ls -l\ncd foreign\nls -1\ncd ../implicit\nls -l\n",
    )
    .await?;
    let dirs: Vec<&str> = out.lines().filter(|l| l.starts_with('d')).collect();
    ensure!(
        dirs.len() == 3,
        "foreign, implicit and sub are directories:\n{out}"
    );
    let result = script(
        &fixture,
        r#"
import stat
t, sftp = connect()
r = {"foreign": stat.S_ISDIR(sftp.stat("foreign").st_mode),
     "implicit": stat.S_ISDIR(sftp.stat("implicit").st_mode),
     "rmdir_nonempty": attempt(lambda: sftp.rmdir("implicit")),
     "rename_nonempty": attempt(lambda: sftp.rename("implicit", "moved")),
     "rename_empty": attempt(lambda: sftp.rename("foreign", "renamed"))}
r["names"] = sorted(sftp.listdir("."))
print(json.dumps(r))
"#,
    )
    .await?;
    ensure!(
        result["foreign"] == true && result["implicit"] == true,
        "{result}"
    );
    ensure!(result["rmdir_nonempty"].get("error").is_some(), "{result}");
    let refusal = result["rename_nonempty"]["message"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        refusal.contains("cannot be renamed on object storage"),
        "{result}"
    );
    ensure!(result["rename_empty"].get("ok").is_some(), "{result}");
    ensure!(
        result["names"] == serde_json::json!(["implicit", "renamed"]),
        "{result}"
    );
    fixture.gateway.stop().await
}

/// Listings page through the store: every one of more than 1,000 objects is listed.
#[tokio::test]
async fn a_directory_of_more_than_a_thousand_objects_is_listed_completely() -> Result<()> {
    use futures::StreamExt;

    let fixture = Fixture::start_ftps("many").await?;
    let writes = (0..1234).map(|i| {
        let bucket = fixture.bucket.clone();
        async move { bucket.write(&key(&format!("many/f{i:04}.csv")), "x").await }
    });
    let written: Vec<_> = futures::stream::iter(writes)
        .buffer_unordered(8)
        .collect()
        .await;
    if let Some(Err(error)) = written.into_iter().find(Result::is_err) {
        anyhow::bail!("could not fill the bucket: {error}");
    }
    fixture.bucket.create_dir(&key("many/")).await?;

    let out = sftp(fixture.sftp()?, "ls -1 many\n").await?;
    let listed = out
        .lines()
        .filter(|l| l.trim().starts_with("many/f"))
        .count();
    ensure!(listed == 1234, "sftp listed {listed}");

    let mut curl = fixture.ftp().curl();
    curl.arg("--list-only").arg(fixture.ftp_url("/many/")?);
    let names = succeed(curl).await?;
    let mut names: Vec<&str> = names.lines().map(str::trim).collect();
    names.sort();
    names.dedup();
    ensure!(names.len() == 1234, "FTPS listed {}", names.len());
    ensure!(
        names[0] == "f0000.csv" && names[1233] == "f1233.csv",
        "{:?}",
        &names[..3]
    );
    fixture.gateway.stop().await
}

/// Hidden names (the volume's upload directory, the operator's probe prefix) at the root
/// of the prefix are neither listed nor reachable.
#[tokio::test]
async fn reserved_names_at_the_prefix_root_stay_hidden() -> Result<()> {
    let weed = SeaweedFs::shared()?;
    let name = weed.bucket("reserved")?;
    let bucket = weed.bucket_operator(&name)?;
    bucket
        .write(&format!("{PREFIX}.sluice-probe/probe"), "p")
        .await?;
    bucket.write(&format!("{PREFIX}visible.txt"), "v").await?;
    let mut root = user();
    root.home = "/".into();
    let gateway = start_gateway(
        vec![root],
        None,
        weed.config(&name, PREFIX),
        &weed.credentials(),
    )
    .await?;

    let result = paramiko(
        gateway.addr,
        USER,
        PASSWORD,
        r#"
t, sftp = connect()
r = {"names": sorted(sftp.listdir("/")),
     "stat": attempt(lambda: sftp.stat("/.sluice-probe").st_size),
     "read": attempt(lambda: sftp.open("/.sluice-probe/probe").read().decode()),
     "mkdir": attempt(lambda: sftp.mkdir("/.sluice-uploads"))}
print(json.dumps(r))
"#,
    )
    .await?;
    ensure!(
        result["names"] == serde_json::json!(["visible.txt"]),
        "{result}"
    );
    for refused in ["stat", "read", "mkdir"] {
        ensure!(result[refused]["errno"] == 2, "{refused}: {result}");
    }
    gateway.stop().await
}

/// A gateway process killed in the middle of an upload leaves nothing in the bucket: no
/// object under the final name, nothing partial (the multipart upload is not an object).
#[tokio::test]
async fn a_gateway_killed_mid_upload_leaves_no_object_behind() -> Result<()> {
    use tokio::io::AsyncBufReadExt;

    let weed = SeaweedFs::shared()?;
    let name = weed.bucket("killed")?;
    let bucket = weed.bucket_operator(&name)?;
    let dir = tempfile::tempdir()?;
    let host_keys = support::gateway::write_host_keys(dir.path())?;
    support::gateway::write_credentials(dir.path(), &weed.credentials())?;
    let config = support::gateway::config(vec![user()], None, Some(weed.config(&name, PREFIX)));
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, serde_json::to_vec(&config)?)?;
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?
    };
    let mut gateway = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("gateway")
        .arg("--config")
        .arg(&config_path)
        .arg("--host-keys")
        .arg(&host_keys)
        .arg("--data-dir")
        .arg(dir.path().join("unused"))
        .arg("--storage-credentials")
        .arg(dir.path().join(support::gateway::CREDENTIALS_DIR))
        .arg("--sftp-listen")
        .arg(addr.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        ensure!(Instant::now() < deadline, "the gateway did not listen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 24 MiB in, then the gateway dies; the client keeps writing until it notices.
    let mut client = support::gateway::paramiko_command(
        addr,
        USER,
        PASSWORD,
        r#"
t, sftp = connect()
f = sftp.open("doomed.bin", "w")
block = os.urandom(256 * 1024)
for i in range(400):
    f.write(block)
    if i == 96:
        f.flush()
        print("written", flush=True)
"#,
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .spawn()?;
    let stdout = client.stdout.take().context("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await??;
    ensure!(
        line.as_deref() == Some("written"),
        "the client said {line:?}"
    );
    gateway.start_kill()?;
    gateway.wait().await?;
    let _ = tokio::time::timeout(Duration::from_secs(30), client.wait()).await;

    let keys = all_keys(&bucket).await?;
    ensure!(keys == [key("")], "objects left behind: {keys:?}");
    ensure!(bucket.stat(&key("doomed.bin")).await.is_err());
    Ok(())
}

/// Wrong credentials and a missing bucket are transient errors for the client, with
/// nothing of the store's answer in them, and the gateway keeps serving.
#[tokio::test]
async fn a_refused_or_missing_store_gives_clients_a_clean_transient_error() -> Result<()> {
    let logs = capture_logs();
    let weed = SeaweedFs::shared()?;
    let name = weed.bucket("refused")?;
    let wrong_id = "WRONGKEYIDSLUICE0001";
    let wrong_secret = "wrong-secret-must-never-be-logged";
    let wrong = [
        (sluice::storage::object::keys::ACCESS_KEY_ID, wrong_id),
        (
            sluice::storage::object::keys::SECRET_ACCESS_KEY,
            wrong_secret,
        ),
    ];
    let cases = [
        ("wrong credentials", weed.config(&name, PREFIX), wrong),
        (
            "missing bucket",
            weed.config("no-such-bucket-sluice", PREFIX),
            weed.credentials(),
        ),
    ];
    for (case, store, credentials) in cases {
        let gateway =
            start_gateway(vec![user()], Some(ftps_settings()), store, &credentials).await?;
        let result = paramiko(
            gateway.addr,
            USER,
            PASSWORD,
            r#"
t, sftp = connect()
r = {"list": attempt(lambda: sftp.listdir(".")),
     "stat": attempt(lambda: sftp.stat("x").st_size)}
def put():
    with sftp.open("x.csv", "w") as f:
        f.write(b"data")
r["put"] = attempt(put)
print(json.dumps(r))
"#,
        )
        .await?;
        for operation in ["list", "stat"] {
            let message = result[operation]["message"].as_str().unwrap_or_default();
            ensure!(
                message.contains("storage temporarily unavailable"),
                "{case}, {operation}: {result}"
            );
        }
        // The audit log lives in the same store: its failure refuses the upload first,
        // as transient too (SFTP failure, not permission denied).
        ensure!(
            result["put"]["message"] == "audit log unavailable; try again later"
                && result["put"]["errno"].is_null(),
            "{case}, put: {result}"
        );

        let ftp = FtpClients {
            ca: gateway.ca_file(),
            user: USER.into(),
            password: PASSWORD.into(),
        };
        let mut curl = ftp.curl();
        curl.arg("--verbose")
            .arg(format!("ftp://{}/", gateway.ftps_addr()?));
        let output = run(curl).await?;
        let verbose = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success(),
            "{case}: FTPS listed a broken store"
        );
        ensure!(
            verbose.contains("< 450 storage temporarily unavailable"),
            "{case}: {verbose}"
        );

        // Still serving: a new session logs in and is told the same.
        let again = paramiko(
            gateway.addr,
            USER,
            PASSWORD,
            r#"
t, sftp = connect()
print(json.dumps(attempt(lambda: sftp.listdir("."))))
"#,
        )
        .await?;
        ensure!(again.get("error").is_some(), "{case}: {again}");
        gateway.stop().await?;
    }

    let text = logs.text();
    for secret in [wrong_id, wrong_secret, support::s3::SECRET_ACCESS_KEY] {
        ensure!(!text.contains(secret), "a credential reached the logs");
    }
    ensure!(
        text.contains("object store error"),
        "failures were not logged"
    );
    Ok(())
}

/// The gateway refuses to start, before binding anything, on a store that does not
/// resolve to the region the operator judged, whatever the policy mode.
#[tokio::test]
async fn the_gateway_refuses_a_store_that_is_not_the_one_judged() -> Result<()> {
    use sluice::gateway::config::ResidencyStamp;
    use sluice::gateway::{Gateway, GatewayArgs};

    let weed = SeaweedFs::shared()?;
    let dir = tempfile::tempdir()?;
    let host_keys = support::gateway::write_host_keys(dir.path())?;
    support::gateway::write_credentials(dir.path(), &weed.credentials())?;
    let store = weed.config("any-bucket", PREFIX);
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?
    };
    let mut amazon = store.clone();
    amazon.provider = sluice::storage::object::Provider::S3;
    amazon.endpoint = "https://s3.eu-central-1.amazonaws.com".into();
    let stamp = |enforced| ResidencyStamp {
        compliant: true,
        enforced,
        suspended: false,
        policies: vec!["pinned".into()],
        violation: None,
        cross_border_transfers: vec![],
    };
    let cases = [
        ("contradicting endpoint", amazon.clone(), stamp(true)),
        ("contradicting endpoint under Audit", amazon, stamp(false)),
    ];
    for (case, store, residency) in cases {
        let mut config = support::gateway::config(vec![user()], None, Some(store));
        config.residency = residency;
        let config_path = dir.path().join("config.json");
        std::fs::write(&config_path, serde_json::to_vec(&config)?)?;
        let args = GatewayArgs {
            config: config_path,
            host_keys: host_keys.clone(),
            data_dir: dir.path().join("data"),
            storage_credentials: dir.path().join(support::gateway::CREDENTIALS_DIR),
            sftp_listen: addr,
            ftps_listen: "127.0.0.1:0".parse()?,
            ftps_implicit_listen: "127.0.0.1:0".parse()?,
            tls_dir: None,
            pod_name: None,
            health_listen: None,
            shutdown_grace: 20,
        };
        let Err(error) = Gateway::bind(&args).await else {
            anyhow::bail!("{case}: the gateway started");
        };
        let chain = format!("{:#}", anyhow::Error::from(error));
        ensure!(
            chain.contains("region") || chain.contains("cn-shanghai"),
            "{case}: {chain}"
        );
        ensure!(
            std::net::TcpListener::bind(addr).is_ok(),
            "{case}: the SFTP address was bound"
        );
    }

    // Under Audit the operator rolls a non-compliant server out and reports it; the
    // gateway serves it too, instead of failing every start.
    let mut config = support::gateway::config(vec![user()], None, Some(store.clone()));
    config.residency = ResidencyStamp {
        compliant: false,
        violation: Some("storage region cn-shanghai is not allowed".into()),
        ..stamp(false)
    };
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, serde_json::to_vec(&config)?)?;
    let args = GatewayArgs {
        config: config_path,
        host_keys,
        data_dir: dir.path().join("data"),
        storage_credentials: dir.path().join(support::gateway::CREDENTIALS_DIR),
        sftp_listen: addr,
        ftps_listen: "127.0.0.1:0".parse()?,
        ftps_implicit_listen: "127.0.0.1:0".parse()?,
        tls_dir: None,
        pod_name: None,
        health_listen: None,
        shutdown_grace: 20,
    };
    let gateway = Gateway::bind(&args)
        .await
        .context("a gateway under an Audit policy refused to start")?;
    ensure!(gateway.sftp_addr()? == addr);
    Ok(())
}

/// Exclusive creation is decided by the store (a conditional write): of two uploads
/// racing for one name, only the first to complete is kept.
#[tokio::test]
async fn of_two_exclusive_uploads_only_the_first_to_complete_is_kept() -> Result<()> {
    use sluice::gateway::vfs::{VfsError, WriteMode};
    use sluice::storage::ObjectStore;
    use sluice::storage::object::Credentials;

    let weed = SeaweedFs::shared()?;
    let name = weed.bucket("exclusive")?;
    let credentials =
        Credentials::from_pairs(weed.credentials().iter().map(|(k, v)| (*k, v.as_bytes())));
    let store = ObjectStore::open(&weed.config(&name, PREFIX), &credentials)?;
    ensure!(
        store.has_conditional_writes(),
        "OpenDAL offers no conditional S3 writes"
    );
    let vfs = open_vfs(store).await?;

    let mut first = vfs.create("race.csv", WriteMode::CreateNew).await?;
    let mut second = vfs.create("race.csv", WriteMode::CreateNew).await?;
    first.write_at(0, b"first".to_vec()).await?;
    second.write_at(0, vec![7; 9 * 1024 * 1024]).await?;
    ensure!(first.close().await? == 5);
    let refused = second.close().await;
    ensure!(
        matches!(refused, Err(VfsError::AlreadyExists)),
        "{refused:?}"
    );

    let bucket = weed.bucket_operator(&name)?;
    ensure!(bucket.read(&key("race.csv")).await?.to_vec() == b"first");
    ensure!(all_keys(&bucket).await? == [key(""), key("race.csv")]);
    Ok(())
}

/// Writes `size` pseudo-random bytes to `path` without holding them in memory; returns
/// their SHA-256.
fn large_file(path: &std::path::Path, size: u64) -> Result<String> {
    use sha2::Digest;
    use std::io::Write;

    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut hash = sha2::Sha256::new();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut block = vec![0u8; 1024 * 1024];
    let mut left = size;
    while left > 0 {
        for chunk in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n])?;
        hash.update(&block[..n]);
        left -= n as u64;
    }
    file.flush()?;
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// SHA-256 of a file, read in blocks.
fn hash_file(path: &std::path::Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;

    let mut file = std::fs::File::open(path)?;
    let mut hash = sha2::Sha256::new();
    let mut block = vec![0u8; 1024 * 1024];
    loop {
        let n = file.read(&mut block)?;
        if n == 0 {
            break;
        }
        hash.update(&block[..n]);
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// 1 GiB up and down over SFTP (OpenSSH) and FTPS (curl), compared by SHA-256, with the
/// throughput printed. Ignored in the main run so that it runs alone: `scripts/test`
/// (and so CI) runs it afterwards with
/// `cargo test --test gateway_object_store -- --ignored --nocapture one_gib`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "1 GiB; scripts/test runs it alone after the other tests"]
async fn one_gib_round_trips_over_sftp_and_ftps_with_equal_hashes() -> Result<()> {
    const SIZE: u64 = 1024 * 1024 * 1024;
    let fixture = Fixture::start_ftps("gib").await?;
    let scratch = fixture.gateway.scratch("files");
    let local = scratch.join("gib.bin");
    let sha = large_file(&local, SIZE)?;
    let mib = SIZE as f64 / (1024.0 * 1024.0);
    let report = |what: &str, started: Instant| {
        let seconds = started.elapsed().as_secs_f64();
        println!("{what}: {seconds:.1} s, {:.1} MiB/s", mib / seconds);
    };

    let started = Instant::now();
    sftp(
        fixture.sftp()?,
        &format!("put {} gib.bin\n", local.display()),
    )
    .await?;
    report("SFTP upload", started);
    let back = scratch.join("back.bin");
    let started = Instant::now();
    sftp(
        fixture.sftp()?,
        &format!("get gib.bin {}\n", back.display()),
    )
    .await?;
    report("SFTP download", started);
    ensure!(hash_file(&back)? == sha, "the SFTP download differs");
    std::fs::remove_file(&back)?;

    let mut upload = fixture.ftp().curl();
    upload
        .arg("-T")
        .arg(&local)
        .arg(fixture.ftp_url("/ftps.bin")?);
    let started = Instant::now();
    succeed(upload).await?;
    report("FTPS upload", started);
    let mut download = fixture.ftp().curl();
    download
        .arg("-o")
        .arg(&back)
        .arg(fixture.ftp_url("/ftps.bin")?);
    let started = Instant::now();
    succeed(download).await?;
    report("FTPS download", started);
    ensure!(hash_file(&back)? == sha, "the FTPS download differs");

    let stored = fixture.bucket.stat(&key("gib.bin")).await?;
    ensure!(stored.content_length() == SIZE);
    fixture.gateway.stop().await
}

/// A rename onto the same name, file or directory, plain or replacing, over SFTP and FTP,
/// keeps what it renames: copying an object onto itself and deleting the source would
/// delete it.
#[tokio::test]
async fn renaming_a_file_or_directory_onto_itself_keeps_it() -> Result<()> {
    let fixture = Fixture::start_ftps("self-rename").await?;
    let result = script(
        &fixture,
        r#"
t, sftp = connect()
with sftp.open("X.csv", "w") as f: f.write(b"kept")
sftp.mkdir("d")
r = {"posix": attempt(lambda: sftp.posix_rename("X.csv", "X.csv")),
     "plain": attempt(lambda: sftp.rename("X.csv", "./X.csv")),
     "posix_dir": attempt(lambda: sftp.posix_rename("d", "d")),
     "plain_dir": attempt(lambda: sftp.rename("d", "/d"))}
r["content"] = sftp.open("X.csv").read().decode()
r["names"] = sorted(sftp.listdir("."))
print(json.dumps(r))
"#,
    )
    .await?;
    for rename in ["posix", "plain", "posix_dir", "plain_dir"] {
        ensure!(result[rename].get("ok").is_some(), "{rename}: {result}");
    }
    ensure!(result["content"] == "kept", "{result}");
    ensure!(
        result["names"] == serde_json::json!(["X.csv", "d"]),
        "{result}"
    );

    let mut curl = fixture.ftp().curl();
    curl.arg(fixture.ftp_url("/")?)
        .args(["-Q", "RNFR /X.csv", "-Q", "RNTO /X.csv"])
        .args(["-Q", "RNFR /d", "-Q", "RNTO /d"]);
    succeed(curl).await?;
    ensure!(fixture.object("X.csv").await? == b"kept");
    let keys = fixture.keys().await?;
    ensure!(keys == [key(""), key("X.csv"), key("d/")], "{keys:?}");
    fixture.gateway.stop().await
}

/// A gateway runs a bounded number of uploads at once, across sessions and protocols: one
/// more gets a clean transient error (an SFTP failure saying why, FTP 450) instead of
/// memory, and an upload that ends gives its place back.
#[tokio::test]
async fn uploads_beyond_the_gateway_bound_get_a_transient_error_until_one_ends() -> Result<()> {
    use sluice::storage::bucket::MAX_UPLOADS;
    use tokio::io::AsyncBufReadExt;

    let fixture = Fixture::start_ftps("bound").await?;
    let scratch = fixture.gateway.scratch("files");
    let release = scratch.join("release");
    let local = scratch.join("ftp.bin");
    random_file(&local, 1000, 21)?;
    let held = format!(
        r#"
import time
t, sftp = connect()
held = [sftp.open("held-%d" % i, "w") for i in range({MAX_UPLOADS})]
print(json.dumps(attempt(lambda: sftp.open("over", "w"))), flush=True)
deadline = time.time() + 60
while not os.path.exists({release:?}) and time.time() < deadline:
    time.sleep(0.1)
held[0].close()
def after():
    with sftp.open("after", "w") as f: f.write(b"after")
print(json.dumps(attempt(after)), flush=True)
"#,
        release = release.display().to_string()
    );
    let mut client =
        support::gateway::paramiko_command(fixture.gateway.addr, USER, PASSWORD, &held)
            .stdout(std::process::Stdio::piped())
            .spawn()?;
    let stdout = client.stdout.take().context("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let next = async |lines: &mut tokio::io::Lines<_>| -> Result<serde_json::Value> {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await??;
        let line = line.context("the client ended early")?;
        Ok(serde_json::from_str(&line)?)
    };

    let over = next(&mut lines).await?;
    let message = over["message"].as_str().unwrap_or_default();
    ensure!(message.contains("too many uploads in progress"), "{over}");
    let mut curl = fixture.ftp().curl();
    curl.arg("--verbose")
        .arg("-T")
        .arg(&local)
        .arg(fixture.ftp_url("/ftp.bin")?);
    let output = run(curl).await?;
    let verbose = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success(), "FTP stored beyond the bound");
    ensure!(
        verbose.contains("< 450 too many uploads in progress"),
        "{verbose}"
    );

    std::fs::write(&release, "")?;
    let after = next(&mut lines).await?;
    ensure!(after.get("ok").is_some(), "{after}");
    let _ = tokio::time::timeout(Duration::from_secs(30), client.wait()).await;
    ensure!(fixture.object("after").await? == b"after");
    succeed({
        let mut curl = fixture.ftp().curl();
        curl.arg("-T").arg(&local).arg(fixture.ftp_url("/ftp.bin")?);
        curl
    })
    .await?;
    ensure!(fixture.object("ftp.bin").await? == std::fs::read(&local)?);
    fixture.gateway.stop().await
}

/// Through the virtual filesystem: the bound holds, and closing, aborting or dropping an
/// upload each frees its place.
#[tokio::test]
async fn a_closed_aborted_or_dropped_upload_frees_its_place() -> Result<()> {
    use sluice::gateway::vfs::{VfsError, WriteMode};
    use sluice::storage::ObjectStore;
    use sluice::storage::bucket::MAX_UPLOADS;
    use sluice::storage::object::Credentials;

    let weed = SeaweedFs::shared()?;
    let name = weed.bucket("slots")?;
    let credentials =
        Credentials::from_pairs(weed.credentials().iter().map(|(k, v)| (*k, v.as_bytes())));
    let store = ObjectStore::open(&weed.config(&name, PREFIX), &credentials)?;
    let vfs = open_vfs(store).await?;

    let mut writers = Vec::new();
    for i in 0..MAX_UPLOADS {
        writers.push(vfs.create(&format!("u{i}"), WriteMode::Replace).await?);
    }
    let refused = vfs.create("over", WriteMode::Replace).await.map(drop);
    ensure!(
        matches!(&refused, Err(e @ VfsError::TooManyUploads) if e.is_transient()),
        "{refused:?}"
    );

    let mut closed = writers.pop().context("no writer")?;
    closed.write_at(0, b"done".to_vec()).await?;
    closed.close().await?;
    writers.push(vfs.create("after-close", WriteMode::Replace).await?);
    ensure!(vfs.create("over", WriteMode::Replace).await.is_err());

    writers.pop().context("no writer")?.abort().await?;
    writers.push(vfs.create("after-abort", WriteMode::Replace).await?);
    ensure!(vfs.create("over", WriteMode::Replace).await.is_err());

    drop(writers.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    let after_drop = loop {
        match vfs.create("after-drop", WriteMode::Replace).await {
            Err(VfsError::TooManyUploads) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other,
        }
    };
    ensure!(after_drop.is_ok(), "a dropped upload kept its place");
    let last = MAX_UPLOADS - 1;
    ensure!(
        weed.bucket_operator(&name)?
            .read(&key(&format!("u{last}")))
            .await?
            .to_vec()
            == b"done"
    );
    Ok(())
}

/// A home that another tool filled (objects under the prefix, no marker) stays a
/// directory when its last file is deleted: listing it and uploading into it still work
/// in the same session.
#[tokio::test]
async fn a_home_that_is_only_a_prefix_survives_the_deletion_of_its_last_file() -> Result<()> {
    let weed = SeaweedFs::shared()?;
    let name = weed.bucket("prefix-home")?;
    let bucket = weed.bucket_operator(&name)?;
    bucket.write(&key("only.txt"), "from another tool").await?;
    let gateway = start_gateway(
        vec![user()],
        None,
        weed.config(&name, PREFIX),
        &weed.credentials(),
    )
    .await?;
    let local = gateway.scratch("files").join("new.txt");
    random_file(&local, 500, 31)?;

    let auth = Auth::Password(PASSWORD.into());
    let client = SftpClient::new(gateway.addr, USER, auth, &gateway.scratch("sftp"))?;
    let out = sftp(
        client,
        &format!(
            "rm only.txt\nls -1\nput {} new.txt\nls -1\n",
            local.display()
        ),
    )
    .await?;
    let listed: Vec<&str> = out
        .lines()
        .filter(|l| !l.starts_with("sftp>"))
        .map(str::trim)
        .collect();
    ensure!(listed == ["new.txt"], "{out}");
    ensure!(bucket.read(&key("new.txt")).await?.to_vec() == std::fs::read(&local)?);
    ensure!(bucket.stat(&key("only.txt")).await.is_err());
    gateway.stop().await
}

/// Opens the test user's view of a fresh bucket; returns it with an operator on the
/// bucket's root.
async fn vfs_on(test: &str) -> Result<(sluice::gateway::vfs::Vfs, Operator)> {
    use sluice::storage::ObjectStore;
    use sluice::storage::object::Credentials;

    let weed = SeaweedFs::shared()?;
    let name = weed.bucket(test)?;
    let credentials =
        Credentials::from_pairs(weed.credentials().iter().map(|(k, v)| (*k, v.as_bytes())));
    let store = ObjectStore::open(&weed.config(&name, PREFIX), &credentials)?;
    ensure!(
        store.has_conditional_reads(),
        "OpenDAL offers no If-Match reads on S3"
    );
    let vfs = open_vfs(store).await?;
    Ok((vfs, weed.bucket_operator(&name)?))
}

/// A download is pinned to the version it opened: when the object is replaced and the
/// reader has to start a new request (a seek), it fails cleanly instead of handing out
/// bytes of the new version after those of the old.
#[tokio::test]
async fn a_file_replaced_during_a_download_fails_instead_of_mixing_versions() -> Result<()> {
    use sluice::gateway::vfs::VfsError;

    let (vfs, bucket) = vfs_on("pinned").await?;
    let old = vec![b'o'; 4 * 1024 * 1024];
    let new = vec![b'n'; 4 * 1024 * 1024];
    bucket.write(&key("data.bin"), old.clone()).await?;

    let mut reader = vfs.open_read("data.bin").await?;
    ensure!(reader.read_at(0, 1024).await? == old[..1024]);
    bucket.write(&key("data.bin"), new.clone()).await?;
    let after_seek = reader.read_at(2 * 1024 * 1024, 1024).await;
    ensure!(
        matches!(&after_seek, Err(e @ VfsError::Changed) if e.is_transient()),
        "read {:?}",
        after_seek.map(|b| String::from_utf8_lossy(&b[..8]).into_owned())
    );
    let mut again = vfs.open_read("data.bin").await?;
    ensure!(again.read_at(2 * 1024 * 1024, 1024).await? == new[..1024]);

    Ok(())
}

/// On SeaweedFS a `\` in a key is stored as `/`: a user whose home is the bucket root
/// would reach the audit log (`\.sluice-audit\...`) and the upload directory, and any
/// user could make directories without `mkdir` (`a\b`). Such names, and the others some
/// store rewrites, are refused over SFTP and FTPS, and nothing is stored.
#[tokio::test]
async fn names_the_store_would_rewrite_are_refused_over_sftp_and_ftps_and_nothing_is_stored()
-> Result<()> {
    let weed = SeaweedFs::shared()?;
    let name = weed.bucket("unfaithful")?;
    let bucket = weed.bucket_operator(&name)?;
    let mut root = user();
    root.home = "/".into();
    let gateway = start_gateway(
        vec![root],
        Some(ftps_settings()),
        weed.config(&name, PREFIX),
        &weed.credentials(),
    )
    .await?;

    names::refused_over_sftp(&gateway, USER, PASSWORD).await?;
    names::refused_over_ftps(&gateway, USER, PASSWORD).await?;

    let keys = all_keys(&bucket).await?;
    ensure!(
        keys == [format!("{PREFIX}{}", names::SEED)],
        "stored besides the seed: {keys:?}"
    );
    let forged = audit_keys(&bucket).await?;
    ensure!(
        forged
            .iter()
            .all(|k| k.ends_with(".jsonl") && !k.contains("forged")),
        "{forged:?}"
    );
    gateway.stop().await
}
