//! Case C11: load-balancer and monitoring health checks that open a TCP connection to a
//! protocol port and close it again, once a second for a minute, on the SSH, explicit
//! FTPS and implicit FTPS ports at once. The gateway must log nothing above debug for
//! them, ban nobody and keep serving. The test runs alone in its binary so that nothing
//! else competes with the probes.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use support::ftp::{FtpClients, succeed};
use support::gateway::{ALL, TestGateway, blocking, capture_logs, ftps_settings, password_user};
use support::sftp::{Auth, SftpClient};
use tokio::net::TcpStream;

const PROBES: usize = 60;
const PASSWORD: &str = "probe-proof-1";

#[tokio::test]
async fn tcp_probes_every_second_for_a_minute_log_nothing_ban_nobody_and_crash_nothing()
-> Result<()> {
    let logs = capture_logs();
    let users = vec![password_user("ops", PASSWORD, ALL)];
    let gateway = TestGateway::start_ftps(users, ftps_settings()).await?;
    let ports = [
        ("sftp", gateway.addr),
        ("ftps", gateway.ftps_addr()?),
        ("ftps-implicit", gateway.ftps_implicit_addr()?),
    ];

    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    for _ in 0..PROBES {
        ticker.tick().await;
        let probes = ports.map(|(_, addr)| probe(addr));
        let [sftp, ftps, implicit] = futures::future::join_all(probes)
            .await
            .try_into()
            .expect("three probes");
        for ((name, _), connected) in ports.iter().zip([sftp, ftps, implicit]) {
            ensure!(
                connected.is_ok(),
                "a probe of {name} was refused: {connected:?}"
            );
        }
    }
    // Let the last probes' sessions end.
    tokio::time::sleep(Duration::from_millis(500)).await;

    ensure!(
        logs.text().contains("FTPS listening"),
        "the gateway's log was not captured"
    );
    let loud: Vec<String> = ["ERROR", "WARN"]
        .iter()
        .flat_map(|level| logs.at_level(level))
        .collect();
    ensure!(loud.is_empty(), "probes were logged:\n{}", loud.join("\n"));
    let info = logs.at_level("INFO").len();
    ensure!(
        info < PROBES,
        "{info} info lines for {PROBES} probes of each port"
    );

    // Still serving, and the address that probed 180 times is not banned.
    let scratch = gateway.scratch("clients");
    let client = SftpClient::new(
        gateway.addr,
        "ops",
        Auth::Password(PASSWORD.into()),
        &scratch,
    )?;
    let listing = blocking(move || client.run("ls -la /")).await?;
    ensure!(listing.contains("ls -la /"), "{listing}");
    let ftp = FtpClients {
        ca: gateway.ca_file(),
        user: "ops".into(),
        password: PASSWORD.into(),
    };
    let mut list = ftp.curl();
    let ftps = gateway.ftps_addr()?;
    list.arg(format!("ftp://{}:{}/", ftps.ip(), ftps.port()));
    succeed(list).await?;
    gateway.stop().await
}

/// Opens a TCP connection to `addr` and closes it at once, as a TCP health check does.
async fn probe(addr: SocketAddr) -> std::io::Result<()> {
    let stream = TcpStream::connect(addr).await?;
    drop(stream);
    Ok(())
}
