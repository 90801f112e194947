//! Which listeners a gateway opens follows its configuration and its pod: a server that
//! offers FTPS alone opens no SSH port, and a pod of a server whose passive range is
//! split between pods announces only ports of its own share, or serves no FTPS at all
//! when it has none.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use sluice::gateway::config::{GatewayConfig, PassivePorts, ReplicaPassive, ResidencyStamp};
use sluice::gateway::ftps::tls::{CERT_FILE, KEY_FILE};
use sluice::gateway::{Gateway, GatewayArgs};
use tempfile::TempDir;

use support::ftp::{FtpClients, pasv_port, succeed_with_stderr};
use support::gateway::{ALL, TestPki, VALID_UNTIL, ftps_settings, password_user, write_host_keys};

const USER: &str = "mainframe";
const PASSWORD: &str = "listeners-Pw-42";

/// A gateway's files: configuration, host keys, volume and a certificate.
struct Pod {
    dir: TempDir,
    args: GatewayArgs,
}

impl Pod {
    fn new(config: &GatewayConfig, pod_name: Option<&str>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let host_keys = write_host_keys(dir.path())?;
        let pki = TestPki::new()?;
        let (cert, key) = pki.issue(VALID_UNTIL)?;
        let tls = dir.path().join("tls");
        std::fs::create_dir(&tls)?;
        std::fs::write(tls.join(CERT_FILE), cert)?;
        std::fs::write(tls.join(KEY_FILE), key)?;
        std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem)?;
        let path = dir.path().join("config.json");
        std::fs::write(&path, serde_json::to_vec(config)?)?;
        let args = GatewayArgs {
            config: path,
            host_keys,
            data_dir: dir.path().join("data"),
            storage_credentials: dir.path().join("storage-credentials"),
            sftp_listen: free_address()?,
            ftps_listen: "127.0.0.1:0".parse()?,
            ftps_implicit_listen: "127.0.0.1:0".parse()?,
            tls_dir: Some(tls),
            pod_name: pod_name.map(String::from),
            health_listen: None,
            shutdown_grace: 20,
        };
        Ok(Self { dir, args })
    }

    fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }
}

fn config(sftp: bool, replicas: Vec<ReplicaPassive>) -> GatewayConfig {
    let mut ftps = ftps_settings();
    ftps.replicas = replicas;
    GatewayConfig {
        server: "tests/listeners".into(),
        region: "cn-shanghai".into(),
        residency: ResidencyStamp {
            compliant: true,
            enforced: false,
            suspended: false,
            policies: vec![],
            violation: None,
            cross_border_transfers: vec![],
        },
        users: vec![password_user(USER, PASSWORD, ALL)],
        sftp,
        ftps: Some(ftps),
        object_store: None,
        audit: Default::default(),
    }
}

/// An address on 127.0.0.1 that nothing listens on right now.
fn free_address() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Lists `/` over explicit FTPS with curl, verbosely; returns what curl printed.
async fn list_verbosely(addr: SocketAddr, ca: &Path, extra: &[&str]) -> Result<String> {
    let clients = FtpClients {
        ca: ca.to_owned(),
        user: USER.into(),
        password: PASSWORD.into(),
    };
    let mut list = clients.curl();
    list.arg("--verbose")
        .args(extra)
        .arg(format!("ftp://{addr}/"));
    Ok(succeed_with_stderr(list).await?.1)
}

/// Lists `/` over explicit FTPS with PASV (not EPSV); returns the port the `227` reply
/// announced.
async fn announced_port(addr: SocketAddr, ca: &Path) -> Result<u16> {
    let verbose = list_verbosely(addr, ca, &["--disable-epsv"]).await?;
    pasv_port(&verbose).with_context(|| format!("no 227 reply in:\n{verbose}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_offering_ftps_alone_opens_no_ssh_port() -> Result<()> {
    let pod = Pod::new(&config(false, Vec::new()), None)?;
    let gateway = Gateway::bind(&pod.args).await?;
    ensure!(gateway.sftp_addr().is_err(), "SFTP reports an address");
    let explicit = gateway.ftps_addr().context("no explicit FTPS")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(gateway.serve(async {
        let _ = stopped.await;
    }));

    let refused = tokio::net::TcpStream::connect(pod.args.sftp_listen).await;
    ensure!(refused.is_err(), "something listens on the SFTP address");
    announced_port(explicit, &pod.ca()).await?;

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), serving).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_announces_only_its_own_share_and_a_pod_without_one_serves_no_ftps() -> Result<()> {
    let whole = ftps_settings().passive_ports;
    let half = whole.count / 2;
    let shares = vec![
        ReplicaPassive {
            passive_ports: PassivePorts {
                first: whole.first,
                count: half,
            },
            passive_address: None,
        },
        ReplicaPassive {
            passive_ports: PassivePorts {
                first: whole.first + half,
                count: half,
            },
            passive_address: None,
        },
    ];
    let split = config(true, shares);

    let second = Pod::new(&split, Some("files-gateway-1"))?;
    let gateway = Gateway::bind(&second.args).await?;
    let explicit = gateway.ftps_addr().context("pod 1 serves no FTPS")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(gateway.serve(async {
        let _ = stopped.await;
    }));
    for _ in 0..3 {
        let port = announced_port(explicit, &second.ca()).await?;
        ensure!(
            (whole.first + half..whole.first + 2 * half).contains(&port),
            "pod 1 announced {port}, outside its share"
        );
    }
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), serving).await??;

    // A pod the configuration has no share for (scaled down, or an older
    // configuration) and a pod whose ordinal is unknown keep SFTP and refuse FTPS.
    for name in [Some("files-gateway-2"), None] {
        let pod = Pod::new(&split, name)?;
        let gateway = Gateway::bind(&pod.args).await?;
        ensure!(gateway.ftps_addr().is_none(), "{name:?} serves FTPS");
        ensure!(gateway.sftp_addr().is_ok(), "{name:?} serves no SFTP");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epsv_refused_where_it_could_reach_another_pod_makes_curl_use_pasv() -> Result<()> {
    let mut config = config(true, Vec::new());
    if let Some(ftps) = config.ftps.as_mut() {
        ftps.epsv = false;
    }
    let pod = Pod::new(&config, None)?;
    let gateway = Gateway::bind(&pod.args).await?;
    let explicit = gateway.ftps_addr().context("no explicit FTPS")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(gateway.serve(async {
        let _ = stopped.await;
    }));

    // curl tries EPSV first by default.
    let verbose = list_verbosely(explicit, &pod.ca(), &[]).await?;
    ensure!(
        verbose.contains("< 502 EPSV is not available on this server: use PASV"),
        "{verbose}"
    );
    ensure!(verbose.contains("< 227 Entering Passive Mode"), "{verbose}");

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), serving).await??;
    Ok(())
}
