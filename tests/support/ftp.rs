//! Real FTPS clients (curl and lftp) for the tests, logged in as one user, requiring TLS
//! on control and data connections and trusting one test CA.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tokio::process::Command;

/// Longest a client may run.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// What the clients need to log in.
#[derive(Clone, Debug)]
pub struct FtpClients {
    /// The CA certificate (PEM) the clients trust.
    pub ca: PathBuf,
    /// Login name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl FtpClients {
    /// curl as the user, requiring TLS (`--ssl-reqd`) and trusting the CA.
    pub fn curl(&self) -> Command {
        let mut command = Command::new("curl");
        command
            .args([
                "--silent",
                "--show-error",
                "--max-time",
                "120",
                "--ssl-reqd",
            ])
            .arg("--cacert")
            .arg(&self.ca)
            .args(["--user", &format!("{}:{}", self.user, self.password)]);
        command
    }

    /// lftp logged in at `url`, running `commands`, with TLS required on control and data
    /// connections and failures ending the script.
    pub fn lftp(&self, url: &str, commands: &str) -> Command {
        let script = format!(
            "set cmd:fail-exit yes; set net:max-retries 1; set net:timeout 20; \
             set net:reconnect-interval-base 1; set dns:order inet; \
             set ssl:ca-file {ca}; set ssl:verify-certificate yes; \
             set ftp:ssl-force yes; set ftp:ssl-protect-data yes; \
             set ftp:ssl-protect-list yes; open -u {user},{password} {url}; {commands}",
            ca = self.ca.display(),
            user = self.user,
            password = self.password,
        );
        let mut command = Command::new("lftp");
        command.arg("-c").arg(script);
        command
    }
}

/// Runs a client to its end (at most [`CLIENT_TIMEOUT`]).
pub async fn run(mut command: Command) -> Result<Output> {
    command.stdin(Stdio::null()).kill_on_drop(true);
    tokio::time::timeout(CLIENT_TIMEOUT, command.output())
        .await
        .context("the client did not finish in time")?
        .context("cannot run the client")
}

/// Runs a client that must succeed; returns its standard output and standard error.
pub async fn succeed_with_stderr(command: Command) -> Result<(String, String)> {
    let description = format!("{:?}", command.as_std());
    let output = run(command).await?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(
        output.status.success(),
        "{description} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    Ok((stdout, stderr))
}

/// Runs a client that must succeed; returns its standard output.
pub async fn succeed(command: Command) -> Result<String> {
    Ok(succeed_with_stderr(command).await?.0)
}

/// The port of the first `227 Entering Passive Mode (h1,h2,h3,h4,p1,p2)` reply in curl's
/// verbose output.
pub fn pasv_port(verbose: &str) -> Option<u16> {
    let line = verbose
        .lines()
        .find(|l| l.contains("227 Entering Passive Mode"))?;
    let inner = line.split('(').nth(1)?.split(')').next()?;
    let numbers: Vec<u16> = inner
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    match numbers.as_slice() {
        [_, _, _, _, high, low] => Some(high * 256 + low),
        _ => None,
    }
}
