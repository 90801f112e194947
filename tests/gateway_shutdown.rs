//! A gateway being stopped (SIGTERM, as the kubelet sends it in a rolling update): it
//! stops accepting at once, goes unready, lets an upload in progress (SFTP, or FTPS with
//! its passive data connection) finish and store, and exits 0; and its health listener says live and ready only when it is.

mod support;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sluice::gateway::config::FtpsSettings;
use sluice::gateway::ftps::tls::{CERT_FILE, KEY_FILE};
use sluice::gateway::{Gateway, GatewayArgs};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use support::cluster::eventually;
use support::ftp::FtpClients;
use support::gateway::{
    ALL, TestPki, VALID_UNTIL, config, ftps_settings, paramiko_command, password_user,
    write_host_keys,
};
use support::http::get;
use support::sftp::{random_file, sha256_file};

const PASSWORD: &str = "drain-me-7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_connections_and_lets_a_running_upload_finish() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (sftp, health) = (free_address()?, free_address()?);
    let mut gateway = start_gateway(dir.path(), sftp, health).await?;
    let log = dir.path().join("gateway.log");

    // About 5 s of upload: 40 chunks of 64 KiB, 0.125 s apart.
    let script = r#"
import hashlib, time
transport, sftp = connect()
data = os.urandom(40 * 65536)
f = sftp.open("/slow.bin", "wb")
for i in range(40):
    f.write(data[i * 65536:(i + 1) * 65536])
    if i == 4:
        print("started", flush=True)
    time.sleep(0.125)
f.close()
print(json.dumps({"sha256": hashlib.sha256(data).hexdigest()}))
"#;
    let mut upload = paramiko_command(sftp, "ops", PASSWORD, script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run python3")?;
    let mut lines = BufReader::new(upload.stdout.take().context("no stdout")?).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await??;
    ensure!(
        first.as_deref() == Some("started"),
        "the upload said {first:?}"
    );
    // Held mid-upload until the draining gateway has been checked, however slow the
    // machine: the upload must still be running then.
    let client = Paused::stop(upload.id())?;

    let pid = i32::try_from(gateway.id().context("the gateway has exited")?)?;
    kill(Pid::from_raw(pid), Signal::SIGTERM)?;
    let terminated = Instant::now();
    eventually("the SFTP port closed", Duration::from_secs(5), || async {
        Ok(tokio::net::TcpStream::connect(sftp)
            .await
            .is_err()
            .then_some(()))
    })
    .await?;
    let (ready, _) = get(health, "/readyz").await?;
    ensure!(ready == 503, "/readyz answered {ready} while draining");
    ensure!(
        gateway.try_wait()?.is_none(),
        "the gateway exited with an upload running"
    );
    client.resume()?;

    let last = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await??
        .context("the upload printed no result")?;
    let status = upload.wait().await?;
    ensure!(status.success(), "the upload failed after SIGTERM: {last}");
    let sent: serde_json::Value = serde_json::from_str(&last)?;
    let stored = sha256_file(&dir.path().join("data/ops/slow.bin"))?;
    ensure!(sent["sha256"] == stored.as_str(), "the stored file differs");

    let exit = tokio::time::timeout(Duration::from_secs(10), gateway.wait())
        .await
        .context("the gateway did not exit once its sessions ended")??;
    ensure!(exit.success(), "the gateway exited with {exit}");
    let took = terminated.elapsed();
    ensure!(
        took < Duration::from_secs(20),
        "the gateway waited {took:?}, as if the grace period had run out"
    );
    let text = std::fs::read_to_string(&log)?;
    ensure!(!text.contains("Disconnecting remaining sessions"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_ftps_upload_finish_and_refuses_new_control_connections()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let (sftp, health, ftps) = (free_address()?, free_address()?, free_address()?);
    let args = gateway_args_with(dir.path(), sftp, None, Some((ftps_settings(), ftps)))?;
    let mut gateway = spawn_gateway(dir.path(), args, health).await?;

    let source = dir.path().join("source.bin");
    let sha = random_file(&source, 1536 * 1024, 11)?;
    let clients = FtpClients {
        ca: dir.path().join("ca.pem"),
        user: "ops".into(),
        password: PASSWORD.into(),
    };
    // About 5 s at 300 kB/s.
    let mut upload = clients.curl();
    upload
        .args(["--limit-rate", "300k", "-T"])
        .arg(&source)
        .arg(format!("ftp://{}:{}/slow.bin", ftps.ip(), ftps.port()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let upload = upload.spawn().context("cannot run curl")?;
    let data = dir.path().join("data");
    eventually(
        "upload bytes on the volume",
        Duration::from_secs(20),
        || async { Ok((largest_file(&data)? >= 256 * 1024).then_some(())) },
    )
    .await?;
    let client = Paused::stop(upload.id())?;

    let pid = i32::try_from(gateway.id().context("the gateway has exited")?)?;
    kill(Pid::from_raw(pid), Signal::SIGTERM)?;
    eventually("the FTPS port closed", Duration::from_secs(5), || async {
        Ok(tokio::net::TcpStream::connect(ftps)
            .await
            .is_err()
            .then_some(()))
    })
    .await?;
    ensure!(
        gateway.try_wait()?.is_none(),
        "exited with an upload running"
    );
    client.resume()?;

    let output = tokio::time::timeout(Duration::from_secs(30), upload.wait_with_output())
        .await
        .context("the upload did not end")??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "the upload failed after SIGTERM: {stderr}"
    );
    ensure!(
        sha256_file(&data.join("ops/slow.bin"))? == sha,
        "the stored file differs"
    );
    let exit = tokio::time::timeout(Duration::from_secs(10), gateway.wait())
        .await
        .context("the gateway did not exit once its sessions ended")??;
    ensure!(exit.success(), "the gateway exited with {exit}");
    Ok(())
}

/// A client process stopped with SIGSTOP, so that its transfer stays open, half done,
/// for as long as a check takes; resumed (SIGCONT) by [`Paused::resume`] or when dropped.
struct Paused(Pid);

impl Paused {
    fn stop(pid: Option<u32>) -> Result<Self> {
        let pid = Pid::from_raw(i32::try_from(pid.context("the client has exited")?)?);
        kill(pid, Signal::SIGSTOP)?;
        Ok(Self(pid))
    }

    fn resume(self) -> Result<()> {
        let pid = self.0;
        std::mem::forget(self);
        kill(pid, Signal::SIGCONT)?;
        Ok(())
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// The size of the largest file below `dir`.
fn largest_file(dir: &Path) -> Result<u64> {
    let mut largest = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let size = match kind.is_dir() {
            true => largest_file(&entry.path())?,
            false => entry.metadata()?.len(),
        };
        largest = largest.max(size);
    }
    Ok(largest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_listener_is_live_at_once_and_ready_only_while_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let args = gateway_args(dir.path(), free_address()?, Some(free_address()?))?;
    let gateway = Gateway::bind(&args).await?;
    let health = gateway.health_addr().context("no health listener")?;
    ensure!(get(health, "/healthz").await?.0 == 200);
    ensure!(
        get(health, "/readyz").await?.0 == 503,
        "ready before serving"
    );
    ensure!(get(health, "/metrics").await?.0 == 404);

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(gateway.serve(async {
        let _ = stopped.await;
    }));
    eventually("ready", Duration::from_secs(5), || async {
        Ok((get(health, "/readyz").await?.0 == 200).then_some(()))
    })
    .await?;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), serving).await??;
    ensure!(
        tokio::net::TcpStream::connect(health).await.is_err(),
        "the health listener outlived the gateway"
    );
    Ok(())
}

/// Arguments for a gateway in `dir` serving SFTP to user `ops` on `sftp`.
fn gateway_args(dir: &Path, sftp: SocketAddr, health: Option<SocketAddr>) -> Result<GatewayArgs> {
    gateway_args_with(dir, sftp, health, None)
}

/// Like [`gateway_args`], serving explicit FTPS too when `ftps` gives its settings and
/// control port, with a certificate from `dir/ca.pem`'s CA in `dir/tls`.
fn gateway_args_with(
    dir: &Path,
    sftp: SocketAddr,
    health: Option<SocketAddr>,
    ftps: Option<(FtpsSettings, SocketAddr)>,
) -> Result<GatewayArgs> {
    let config_path = dir.join("config.json");
    let users = vec![password_user("ops", PASSWORD, ALL)];
    let settings = ftps.as_ref().map(|(settings, _)| settings.clone());
    std::fs::write(
        &config_path,
        serde_json::to_vec(&config(users, settings, None))?,
    )?;
    let tls_dir = match &ftps {
        Some(_) => {
            let pki = TestPki::new()?;
            let (cert, key) = pki.issue(VALID_UNTIL)?;
            let tls = dir.join("tls");
            std::fs::create_dir_all(&tls)?;
            std::fs::write(tls.join(CERT_FILE), cert)?;
            std::fs::write(tls.join(KEY_FILE), key)?;
            std::fs::write(dir.join("ca.pem"), &pki.ca_pem)?;
            Some(tls)
        }
        None => None,
    };
    std::fs::create_dir_all(dir.join("data"))?;
    Ok(GatewayArgs {
        config: config_path,
        host_keys: write_host_keys(dir)?,
        data_dir: dir.join("data"),
        storage_credentials: dir.join("storage-credentials"),
        sftp_listen: sftp,
        ftps_listen: match &ftps {
            Some((_, addr)) => *addr,
            None => "127.0.0.1:0".parse()?,
        },
        ftps_implicit_listen: free_address()?,
        tls_dir,
        pod_name: None,
        health_listen: health,
        shutdown_grace: 30,
    })
}

/// `sluice gateway` as a child process, logging JSON to `dir/gateway.log`, once ready.
async fn start_gateway(
    dir: &Path,
    sftp: SocketAddr,
    health: SocketAddr,
) -> Result<tokio::process::Child> {
    spawn_gateway(dir, gateway_args(dir, sftp, None)?, health).await
}

/// Runs `args` (plus the health listener on `health`) as a child process, once ready.
async fn spawn_gateway(
    dir: &Path,
    args: GatewayArgs,
    health: SocketAddr,
) -> Result<tokio::process::Child> {
    let log = std::fs::File::create(dir.join("gateway.log"))?;
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .args(["--log-format", "json", "gateway", "--config"])
        .arg(&args.config)
        .arg("--host-keys")
        .arg(&args.host_keys)
        .arg("--data-dir")
        .arg(&args.data_dir)
        .args(["--sftp-listen", &args.sftp_listen.to_string()])
        .args(["--health-listen", &health.to_string()])
        .args(["--shutdown-grace", "30"]);
    if let Some(tls) = &args.tls_dir {
        command
            .args(["--ftps-listen", &args.ftps_listen.to_string()])
            .args([
                "--ftps-implicit-listen",
                &args.ftps_implicit_listen.to_string(),
            ])
            .arg("--tls-dir")
            .arg(tls);
    }
    let mut child = command
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start sluice gateway")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(dir.join("gateway.log"))?;
            bail!("the gateway exited with {status}:\n{text}");
        }
        if matches!(get(health, "/readyz").await, Ok((200, _))) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            bail!("the gateway did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn free_address() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}
