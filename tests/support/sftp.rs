//! Drives the OpenSSH `sftp` client in batch mode against a gateway on 127.0.0.1.
//!
//! Passwords reach `sftp` through `SSH_ASKPASS` (a script that prints an environment
//! variable), never through the command line. Each client keeps its own known_hosts
//! file, so tests can check what host key the client saw and pin it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// How a client authenticates.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Password, answered through SSH_ASKPASS.
    Password(String),
    /// Private key file.
    Key(PathBuf),
}

/// An OpenSSH `sftp` client for one user.
pub struct SftpClient {
    addr: SocketAddr,
    user: String,
    auth: Auth,
    dir: PathBuf,
    /// `yes` pins the known_hosts entry; `accept-new` records it on first connection.
    pub strict_host_key_checking: &'static str,
}

impl SftpClient {
    /// A client whose scratch files (known_hosts, askpass script) live in `dir`.
    pub fn new(addr: SocketAddr, user: &str, auth: Auth, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let askpass = dir.join("askpass.sh");
        std::fs::write(
            &askpass,
            "#!/bin/sh\nprintf '%s\\n' \"$SLUICE_TEST_PASSWORD\"\n",
        )?;
        std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o700))?;
        Ok(Self {
            addr,
            user: user.to_string(),
            auth,
            dir: dir.to_path_buf(),
            strict_host_key_checking: "accept-new",
        })
    }

    /// The known_hosts file this client writes and checks.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }

    /// Points the client at another address (a restarted gateway on a new port keeps
    /// the same known_hosts entry only if the port is the same, so tests reuse ports).
    pub fn set_addr(&mut self, addr: SocketAddr) {
        self.addr = addr;
    }

    /// Runs `commands` (one sftp command per line) and returns the raw output.
    pub fn batch(&self, commands: &str) -> Result<Output> {
        let script = self.dir.join("batch");
        std::fs::write(&script, commands)?;
        let mut command = std::process::Command::new("sftp");
        // `-b` goes last: sftp turns it into `-oBatchMode=yes` where it appears, ssh keeps
        // the first value of an option, and BatchMode=yes forbids password prompts.
        command
            .arg("-P")
            .arg(self.addr.port().to_string())
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.known_hosts().display()
            ))
            .arg("-o")
            .arg(format!(
                "StrictHostKeyChecking={}",
                self.strict_host_key_checking
            ))
            .args([
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=10",
            ])
            .args(["-o", "LogLevel=ERROR", "-F", "/dev/null"]);
        match &self.auth {
            Auth::Password(password) => {
                command
                    .args([
                        "-o",
                        "BatchMode=no",
                        "-o",
                        "PreferredAuthentications=password",
                    ])
                    .args([
                        "-o",
                        "PubkeyAuthentication=no",
                        "-o",
                        "NumberOfPasswordPrompts=1",
                    ])
                    .env("SSH_ASKPASS", self.dir.join("askpass.sh"))
                    .env("SSH_ASKPASS_REQUIRE", "force")
                    .env("SLUICE_TEST_PASSWORD", password);
            }
            Auth::Key(key) => {
                command
                    .args([
                        "-o",
                        "BatchMode=yes",
                        "-o",
                        "PreferredAuthentications=publickey",
                    ])
                    .args(["-o", "IdentitiesOnly=yes", "-i"])
                    .arg(key);
            }
        }
        command
            .arg("-b")
            .arg(&script)
            .arg(format!("{}@{}", self.user, self.addr.ip()));
        command.stdin(std::process::Stdio::null());
        command.output().context("cannot run sftp")
    }

    /// Runs `commands` and fails with the client's output unless it succeeds.
    pub fn run(&self, commands: &str) -> Result<String> {
        let output = self.batch(commands)?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            bail!(
                "sftp as {} failed ({}):\n{stdout}\n{stderr}",
                self.user,
                output.status
            );
        }
        Ok(stdout)
    }
}

/// Generates an Ed25519 key pair with `ssh-keygen`; returns (private key path, public line).
pub fn generate_key(dir: &Path, name: &str) -> Result<(PathBuf, String)> {
    let path = dir.join(name);
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .status()?;
    if !status.success() {
        bail!("ssh-keygen failed");
    }
    let public = std::fs::read_to_string(path.with_extension("pub"))?;
    Ok((path, public.trim().to_string()))
}

/// SHA256 fingerprints (`SHA256:...`) of the keys in a known_hosts file.
pub fn known_host_fingerprints(known_hosts: &Path) -> Result<Vec<String>> {
    let output = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(known_hosts)
        .output()?;
    if !output.status.success() {
        bail!(
            "ssh-keygen -lf failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect())
}

/// Writes `size` pseudo-random bytes to `path` and returns their SHA-256.
pub fn random_file(path: &Path, size: usize, seed: u64) -> Result<String> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let bytes: Vec<u8> = (0..size)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect();
    std::fs::write(path, &bytes)?;
    Ok(sha256_hex(&bytes))
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    Ok(sha256_hex(
        &std::fs::read(path).with_context(|| format!("{}", path.display()))?,
    ))
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
