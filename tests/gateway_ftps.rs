//! The FTPS gateway, started in-process on 127.0.0.1, against real clients (curl and
//! lftp) and against a small FTPS client of the test's own (tokio and rustls) where exact
//! replies matter or a client has to misbehave. Every upload's stored copy is compared
//! with its source by SHA-256.

mod support;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use sluice::gateway::config::{FtpsSettings, SessionReuse, TlsVersion};
use sluice::gateway::ftps::certificate_info;
use sluice::storage::UPLOADS_DIR;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use support::ftp::{CLIENT_TIMEOUT, FtpClients, run, succeed};
use support::gateway::{
    ALL, TestGateway, TestPki, VALID_UNTIL, capture_logs, ftps_settings, password_user,
};
use support::sftp::{random_file, sha256_file};

const USER: &str = "cucm";
const PASSWORD: &str = "Correct-Horse-Battery-Staple-9";

async fn gateway(settings: FtpsSettings) -> Result<TestGateway> {
    TestGateway::start_ftps(vec![password_user(USER, PASSWORD, ALL)], settings).await
}

fn explicit_url(gateway: &TestGateway, path: &str) -> Result<String> {
    Ok(format!("ftp://{}{path}", gateway.ftps_addr()?))
}

fn implicit_url(gateway: &TestGateway, path: &str) -> Result<String> {
    Ok(format!("ftps://{}{path}", gateway.ftps_implicit_addr()?))
}

/// Percent-encodes every byte outside the unreserved set and `/`, for names in URLs.
fn encode(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The test user's curl and lftp, trusting the gateway's test CA.
fn clients(gateway: &TestGateway) -> FtpClients {
    FtpClients {
        ca: gateway.ca_file(),
        user: USER.into(),
        password: PASSWORD.into(),
    }
}

fn curl(gateway: &TestGateway) -> tokio::process::Command {
    clients(gateway).curl()
}

fn lftp(gateway: &TestGateway, url: &str, commands: &str) -> tokio::process::Command {
    clients(gateway).lftp(url, commands)
}

fn stored(gateway: &TestGateway, path: &str) -> std::path::PathBuf {
    gateway.data().join(USER).join(path)
}

/// Every file and directory under `root`, relative to it, sorted; the audit log (which
/// records even refused commands) is left out.
fn tree(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path == root.join(sluice::storage::AUDIT_DIR) {
                continue;
            }
            found.push(path.strip_prefix(root).unwrap().display().to_string());
            if path.is_dir() {
                pending.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Asserts that nothing was logged at error level and that no password appears anywhere.
fn assert_clean_logs(logs: &support::gateway::CapturedLogs, secrets: &[&str]) -> Result<()> {
    let errors = logs.at_level("ERROR");
    ensure!(errors.is_empty(), "errors were logged: {errors:#?}");
    let text = logs.text();
    for secret in secrets {
        ensure!(!text.contains(secret), "a credential was logged");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The test's own FTPS client.

/// A reply: its code and its lines, joined.
#[derive(Debug)]
struct Reply {
    code: u16,
    text: String,
}

/// A plain or TLS stream on the client side.
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// TLS client settings trusting the test CA; `resume` decides whether sessions are kept
/// for resumption.
fn tls_connector(ca_pem: &str, resume: bool) -> Result<TlsConnector> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(TlsConnector::from(Arc::new(config)))
}

fn server_name() -> ServerName<'static> {
    ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into())
}

/// One control connection, driven line by line.
struct Ftp {
    io: Option<Io>,
    buffer: Vec<u8>,
    connector: TlsConnector,
}

impl Ftp {
    /// Connects to the explicit port and reads the greeting.
    async fn explicit(gateway: &TestGateway) -> Result<(Self, Reply)> {
        Self::explicit_with(gateway, true).await
    }

    async fn explicit_with(gateway: &TestGateway, resume: bool) -> Result<(Self, Reply)> {
        let stream = TcpStream::connect(gateway.ftps_addr()?).await?;
        let mut ftp = Self {
            io: Some(Io::Plain(stream)),
            buffer: Vec::new(),
            connector: tls_connector(&gateway.pki()?.ca_pem, resume)?,
        };
        let greeting = ftp.reply().await?;
        Ok((ftp, greeting))
    }

    /// Connects to the implicit port, makes the handshake and reads the greeting.
    async fn implicit(gateway: &TestGateway) -> Result<(Self, Reply)> {
        let connector = tls_connector(&gateway.pki()?.ca_pem, true)?;
        let stream = TcpStream::connect(gateway.ftps_implicit_addr()?).await?;
        let stream = connector.connect(server_name(), stream).await?;
        let mut ftp = Self {
            io: Some(Io::Tls(Box::new(stream))),
            buffer: Vec::new(),
            connector,
        };
        let greeting = ftp.reply().await?;
        Ok((ftp, greeting))
    }

    /// Explicit FTPS, logged in, data protected.
    async fn logged_in(gateway: &TestGateway) -> Result<Self> {
        let (mut ftp, _) = Self::explicit(gateway).await?;
        ftp.secure().await?;
        ftp.login(USER, PASSWORD).await?;
        Ok(ftp)
    }

    /// `AUTH TLS`, `PBSZ 0`, `PROT P`.
    async fn secure(&mut self) -> Result<()> {
        self.expect("AUTH TLS", 234).await?;
        let Some(Io::Plain(stream)) = self.io.take() else {
            bail!("the connection is already secured");
        };
        let stream = self.connector.connect(server_name(), stream).await?;
        self.io = Some(Io::Tls(Box::new(stream)));
        self.expect("PBSZ 0", 200).await?;
        self.expect("PROT P", 200).await?;
        Ok(())
    }

    async fn login(&mut self, user: &str, password: &str) -> Result<()> {
        self.expect(&format!("USER {user}"), 331).await?;
        self.expect(&format!("PASS {password}"), 230).await?;
        Ok(())
    }

    fn io(&mut self) -> &mut Io {
        self.io.as_mut().expect("connected")
    }

    async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.io().write_all(bytes).await?;
        self.io().flush().await?;
        Ok(())
    }

    /// Sends a command and returns the next reply (which may be a 1xx).
    async fn command(&mut self, line: &str) -> Result<Reply> {
        self.command_bytes(line.as_bytes()).await
    }

    async fn command_bytes(&mut self, line: &[u8]) -> Result<Reply> {
        let mut bytes = line.to_vec();
        bytes.extend_from_slice(b"\r\n");
        self.send_raw(&bytes).await?;
        self.reply().await
    }

    /// Sends a command and checks the reply's code.
    async fn expect(&mut self, line: &str, code: u16) -> Result<Reply> {
        let reply = self.command(line).await?;
        let shown = if line.starts_with("PASS") {
            "PASS ***"
        } else {
            line
        };
        ensure!(
            reply.code == code,
            "{shown}: expected {code}, got {reply:?}"
        );
        Ok(reply)
    }

    /// The next complete reply.
    async fn reply(&mut self) -> Result<Reply> {
        let first = self.line().await?;
        let code: u16 = first
            .get(..3)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("not a reply: {first:?}"))?;
        let mut text = first.clone();
        if first.as_bytes().get(3) == Some(&b'-') {
            loop {
                let line = self.line().await?;
                text.push('\n');
                text.push_str(&line);
                if line.starts_with(&format!("{code} ")) {
                    break;
                }
            }
        }
        Ok(Reply { code, text })
    }

    async fn line(&mut self) -> Result<String> {
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
            }
            let mut chunk = [0u8; 4096];
            let left = deadline.saturating_duration_since(Instant::now());
            let read = timeout(left, self.io().read(&mut chunk))
                .await
                .context("no reply in time")??;
            ensure!(read > 0, "the server closed the connection");
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    /// Whether the server has closed the connection (reading gives EOF or an error).
    async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        loop {
            match timeout(Duration::from_secs(10), self.io().read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// `EPSV`: the data port.
    async fn epsv(&mut self) -> Result<u16> {
        let reply = self.expect("EPSV", 229).await?;
        let inside = reply
            .text
            .split("|||")
            .nth(1)
            .and_then(|rest| rest.split('|').next())
            .with_context(|| format!("malformed EPSV reply {reply:?}"))?;
        Ok(inside.parse()?)
    }

    /// Opens a data connection to `port` (TCP only; TLS comes after the transfer command).
    async fn connect_data(&self, port: u16) -> Result<TcpStream> {
        Ok(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?)
    }

    async fn secure_data(&self, stream: TcpStream) -> Result<TlsStream<TcpStream>> {
        Ok(self.connector.connect(server_name(), stream).await?)
    }

    /// Runs a download-like command (RETR, LIST, NLST, MLSD) over EPSV and TLS; returns
    /// the data and the final reply.
    async fn fetch(&mut self, line: &str) -> Result<(Vec<u8>, Reply)> {
        let port = self.epsv().await?;
        let data = self.connect_data(port).await?;
        let opening = self.command(line).await?;
        ensure!(opening.code == 150, "{line}: expected 150, got {opening:?}");
        let mut data = self.secure_data(data).await?;
        let mut bytes = Vec::new();
        timeout(CLIENT_TIMEOUT, data.read_to_end(&mut bytes)).await??;
        let done = self.reply().await?;
        Ok((bytes, done))
    }

    /// Sends an upload command (`STOR name`, `APPE name`) with `content` over EPSV and TLS;
    /// returns the final reply. The server may refuse the upload once it starts, so
    /// failing to send the content is not an error.
    async fn store_with(&mut self, line: &str, content: &[u8]) -> Result<Reply> {
        let port = self.epsv().await?;
        let data = self.connect_data(port).await?;
        self.expect(line, 150).await?;
        let mut data = self.secure_data(data).await?;
        let _ = data.write_all(content).await;
        let _ = data.shutdown().await;
        self.reply().await
    }

    /// Sends an upload command that the gateway must refuse before its data connection is
    /// used: the first reply is the final one (no `150`), and the data connection it
    /// prepared is closed unused. Returns that reply.
    async fn refused_store(&mut self, line: &str) -> Result<Reply> {
        let port = self.epsv().await?;
        let mut data = self.connect_data(port).await?;
        let refused = self.command(line).await?;
        ensure!(
            refused.code >= 400,
            "{line}: expected a refusal before any data, got {refused:?}"
        );
        // Closed with the refusal (EOF or a reset), long before the 60 s after which an
        // unused data connection would be closed anyway.
        let mut rest = Vec::new();
        let read = timeout(Duration::from_secs(5), data.read_to_end(&mut rest))
            .await
            .with_context(|| format!("{line}: the refused upload's data connection stayed open"))?;
        ensure!(
            read.is_err() || rest.is_empty(),
            "{line}: the data connection carried {} bytes",
            rest.len()
        );
        Ok(refused)
    }

    /// `STOR`s `content` under `name` over EPSV and TLS; returns the final reply.
    async fn store(&mut self, name: &[u8], content: &[u8]) -> Result<Reply> {
        let port = self.epsv().await?;
        let data = self.connect_data(port).await?;
        let mut line = b"STOR ".to_vec();
        line.extend_from_slice(name);
        let opening = self.command_bytes(&line).await?;
        ensure!(opening.code == 150, "STOR: expected 150, got {opening:?}");
        let mut data = self.secure_data(data).await?;
        data.write_all(content).await?;
        data.shutdown().await?;
        self.reply().await
    }
}

// ---------------------------------------------------------------------------------------
// The tests.

#[tokio::test]
async fn curl_logs_in_lists_uploads_downloads_resumes_renames_and_deletes_over_explicit_ftps()
-> Result<()> {
    let logs = capture_logs();
    let gateway = gateway(ftps_settings()).await?;
    curl_round_trip(&gateway, |path| explicit_url(&gateway, path)).await?;
    gateway.stop().await?;

    let text = logs.text();
    ensure!(text.contains("Logged in"), "no login was logged");
    ensure!(text.contains("Upload completed"), "no upload was logged");
    ensure!(
        text.contains("Download completed"),
        "no download was logged"
    );
    assert_clean_logs(&logs, &[PASSWORD])
}

#[tokio::test]
async fn curl_logs_in_lists_uploads_downloads_resumes_renames_and_deletes_over_implicit_ftps()
-> Result<()> {
    let logs = capture_logs();
    let gateway = gateway(ftps_settings()).await?;
    curl_round_trip(&gateway, |path| implicit_url(&gateway, path)).await?;
    gateway.stop().await?;
    assert_clean_logs(&logs, &[PASSWORD])
}

/// Upload (creating a directory), list, download, resume, rename and delete with curl.
async fn curl_round_trip(
    gateway: &TestGateway,
    url: impl Fn(&str) -> Result<String>,
) -> Result<()> {
    let scratch = gateway.scratch("curl");
    let source = scratch.join("report.bin");
    let sha = random_file(&source, 3 * 1024 * 1024 + 11, 7)?;

    let mut upload = curl(gateway);
    upload
        .arg("--ftp-create-dirs")
        .arg("-T")
        .arg(&source)
        .arg(url("/inbox/report.bin")?);
    succeed(upload).await?;
    ensure!(sha256_file(&stored(gateway, "inbox/report.bin"))? == sha);

    let mut list = curl(gateway);
    list.arg(url("/inbox/")?);
    let listing = succeed(list).await?;
    ensure!(
        listing
            .lines()
            .any(|l| l.ends_with(" report.bin") && l.contains("3145739")),
        "the listing lacks the upload:\n{listing}"
    );

    let back = scratch.join("back.bin");
    let mut download = curl(gateway);
    download.arg("-o").arg(&back).arg(url("/inbox/report.bin")?);
    succeed(download).await?;
    ensure!(sha256_file(&back)? == sha, "the download differs");

    // Resume: keep the first 1 MiB + 3 bytes and let curl fetch the rest with REST.
    let partial = scratch.join("partial.bin");
    std::fs::write(&partial, &std::fs::read(&source)?[..1024 * 1024 + 3])?;
    let mut resume = curl(gateway);
    resume
        .args(["-C", "-", "-o"])
        .arg(&partial)
        .arg(url("/inbox/report.bin")?);
    succeed(resume).await?;
    ensure!(
        sha256_file(&partial)? == sha,
        "the resumed download differs"
    );

    let mut rename = curl(gateway);
    rename
        .args([
            "-Q",
            "RNFR /inbox/report.bin",
            "-Q",
            "RNTO /inbox/renamed.bin",
        ])
        .arg(url("/inbox/")?);
    let listing = succeed(rename).await?;
    ensure!(
        listing.contains(" renamed.bin") && !listing.contains(" report.bin"),
        "{listing}"
    );
    ensure!(sha256_file(&stored(gateway, "inbox/renamed.bin"))? == sha);

    let mut delete = curl(gateway);
    delete
        .args(["-Q", "DELE /inbox/renamed.bin", "-Q", "RMD /inbox"])
        .arg(url("/")?);
    succeed(delete).await?;
    ensure!(
        tree(&gateway.data().join(USER)).is_empty(),
        "files were left behind: {:?}",
        tree(&gateway.data())
    );
    Ok(())
}

#[tokio::test]
async fn lftp_uploads_lists_downloads_renames_and_removes_over_explicit_and_implicit_ftps()
-> Result<()> {
    let logs = capture_logs();
    let gateway = gateway(ftps_settings()).await?;
    let scratch = gateway.scratch("lftp");
    let small = scratch.join("small.txt");
    let large = scratch.join("large.bin");
    let small_sha = random_file(&small, 1000, 1)?;
    let large_sha = random_file(&large, 2 * 1024 * 1024 + 5, 2)?;

    for (url, dir) in [
        (explicit_url(&gateway, "")?, "explicit"),
        (implicit_url(&gateway, "")?, "implicit"),
    ] {
        let fetched = scratch.join(format!("{dir}-back.bin"));
        let commands = format!(
            "mkdir {dir}; cd {dir}; put {small} -o small.txt; put {large} -o large.bin; \
             put {small} -o gone.txt; cls -l; get large.bin -o {fetched}; \
             mv small.txt moved.txt; rm gone.txt; cls",
            small = small.display(),
            large = large.display(),
            fetched = fetched.display(),
        );
        let output = succeed(lftp(&gateway, &url, &commands)).await?;
        ensure!(output.contains("gone.txt"), "lftp listing:\n{output}");
        let last: Vec<&str> = output.lines().rev().take(2).collect();
        ensure!(
            last == ["moved.txt", "large.bin"],
            "lftp listing:\n{output}"
        );
        ensure!(
            sha256_file(&fetched)? == large_sha,
            "{dir}: the download differs"
        );
        ensure!(
            sha256_file(&stored(&gateway, &format!("{dir}/large.bin")))? == large_sha,
            "{dir}: the stored large upload differs"
        );
        ensure!(
            sha256_file(&stored(&gateway, &format!("{dir}/moved.txt")))? == small_sha,
            "{dir}: the stored small upload differs"
        );
        ensure!(!stored(&gateway, &format!("{dir}/gone.txt")).exists());
    }

    gateway.stop().await?;
    assert_clean_logs(&logs, &[PASSWORD])
}

/// Case C12: curl with two URLs in one command, over TLS 1.2 and 1.3, and lftp, under
/// the default and under `Require`.
#[tokio::test]
async fn data_connections_reuse_the_tls_session_with_curl_and_lftp_over_tls_1_2_and_1_3()
-> Result<()> {
    for reuse in [SessionReuse::Allow, SessionReuse::Require] {
        let gateway = gateway(FtpsSettings {
            session_reuse: reuse,
            ..ftps_settings()
        })
        .await?;
        let scratch = gateway.scratch("curl");
        let (a, b) = (scratch.join("a.bin"), scratch.join("b.bin"));
        let (sha_a, sha_b) = (random_file(&a, 200_000, 3)?, random_file(&b, 300_001, 4)?);

        for (version, flags) in [
            ("1.2", &["--tlsv1.2", "--tls-max", "1.2"][..]),
            ("1.3", &["--tlsv1.3"][..]),
        ] {
            // Two URLs in one command: one control connection, two data connections that
            // resume its session (under Require, a connection that does not is refused).
            // Upload connections hand out no TLS 1.3 tickets and curl uses a ticket once
            // (see `SessionTls`), so under Require each TLS 1.3 upload has a command, and
            // so a fresh ticket from the control connection, of its own.
            let separate = reuse == SessionReuse::Require && version == "1.3";
            let mut upload = curl(&gateway);
            upload.args(flags);
            for (file, name) in [(&a, "a"), (&b, "b")] {
                let url = explicit_url(&gateway, &format!("/{version}-{name}.bin"))?;
                upload.arg("-T").arg(file).arg(url);
                if separate {
                    succeed(upload).await?;
                    upload = curl(&gateway);
                    upload.args(flags);
                }
            }
            if !separate {
                succeed(upload).await?;
            }
            ensure!(sha256_file(&stored(&gateway, &format!("{version}-a.bin")))? == sha_a);
            ensure!(sha256_file(&stored(&gateway, &format!("{version}-b.bin")))? == sha_b);

            let (back_a, back_b) = (scratch.join("back-a"), scratch.join("back-b"));
            let mut download = curl(&gateway);
            download
                .args(flags)
                .arg(explicit_url(&gateway, &format!("/{version}-a.bin"))?)
                .arg("-o")
                .arg(&back_a)
                .arg(explicit_url(&gateway, &format!("/{version}-b.bin"))?)
                .arg("-o")
                .arg(&back_b);
            succeed(download).await?;
            ensure!(sha256_file(&back_a)? == sha_a && sha256_file(&back_b)? == sha_b);
        }

        // lftp (GnuTLS) resumes too, over either version.
        for (version, priority) in [
            ("1.2", "NORMAL:-VERS-ALL:+VERS-TLS1.2"),
            ("1.3", "NORMAL:-VERS-ALL:+VERS-TLS1.3"),
        ] {
            let back = scratch.join(format!("lftp-{version}.bin"));
            let commands = format!(
                "set ssl:priority {priority}; put {a} -o lftp-{version}.bin; \
                 get lftp-{version}.bin -o {back}",
                a = a.display(),
                back = back.display()
            );
            succeed(lftp(&gateway, &explicit_url(&gateway, "")?, &commands)).await?;
            ensure!(sha256_file(&stored(&gateway, &format!("lftp-{version}.bin")))? == sha_a);
            ensure!(
                sha256_file(&back)? == sha_a,
                "lftp {version}: the download differs"
            );
        }
        gateway.stop().await?;
    }
    Ok(())
}

#[tokio::test]
async fn reloaded_ftps_settings_apply_to_new_sessions_while_running_ones_keep_theirs() -> Result<()>
{
    let users = vec![password_user(USER, PASSWORD, ALL)];
    let settings = ftps_settings();
    let gateway = TestGateway::start_ftps(users.clone(), settings.clone()).await?;
    let mut before = Ftp::logged_in(&gateway).await?;

    gateway.set_ftps(
        users,
        FtpsSettings {
            passive_address: Some("192.0.2.44".into()),
            ..settings
        },
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut after = Ftp::logged_in(&gateway).await?;
        let pasv = after.expect("PASV", 227).await?;
        if pasv.text.contains("(192,0,2,44,") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the new passive address was not applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pasv = before.expect("PASV", 227).await?;
    ensure!(
        pasv.text.contains("(127,0,0,1,"),
        "a running session changed: {pasv:?}"
    );
    gateway.stop().await
}

/// Case C12: under `Require`, a data connection that does not resume gets a clear reply.
#[tokio::test]
async fn require_refuses_a_data_connection_that_does_not_resume_with_a_clear_reply() -> Result<()> {
    let gateway = gateway(FtpsSettings {
        session_reuse: SessionReuse::Require,
        ..ftps_settings()
    })
    .await?;
    let scratch = gateway.scratch("curl");
    let source = scratch.join("a.bin");
    random_file(&source, 10_000, 5)?;

    let mut list = curl(&gateway);
    list.args(["--no-sessionid", "-v"])
        .arg(explicit_url(&gateway, "/")?);
    let output = run(list).await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success(),
        "curl without session reuse succeeded"
    );
    ensure!(
        stderr.contains("522 Data connection refused: it must resume the TLS session"),
        "curl did not get the 522 reply:\n{stderr}"
    );

    // An upload by the test's own client without resumption: refused the same way,
    // nothing stored, and the session goes on.
    let (mut ftp, _) = Ftp::explicit_with(&gateway, false).await?;
    ftp.secure().await?;
    ftp.login(USER, PASSWORD).await?;
    let port = ftp.epsv().await?;
    let data = ftp.connect_data(port).await?;
    ftp.expect("STOR a.bin", 150).await?;
    if let Ok(mut data) = ftp.secure_data(data).await {
        let _ = data.write_all(&std::fs::read(&source)?).await;
    }
    let refusal = ftp.reply().await?;
    ensure!(refusal.code == 522, "{refusal:?}");
    ensure!(
        !stored(&gateway, "a.bin").exists(),
        "the refused upload was stored"
    );
    ftp.expect("NOOP", 200).await?;
    ftp.expect("QUIT", 221).await?;
    gateway.stop().await
}

#[tokio::test]
async fn session_reuse_off_makes_every_data_connection_a_full_handshake() -> Result<()> {
    for (reuse, expected) in [
        (SessionReuse::Allow, rustls::HandshakeKind::Resumed),
        (SessionReuse::Never, rustls::HandshakeKind::Full),
    ] {
        let gateway = gateway(FtpsSettings {
            session_reuse: reuse,
            ..ftps_settings()
        })
        .await?;
        let mut ftp = Ftp::logged_in(&gateway).await?;
        for _ in 0..2 {
            let port = ftp.epsv().await?;
            let data = ftp.connect_data(port).await?;
            ftp.expect("NLST", 150).await?;
            let mut data = ftp.secure_data(data).await?;
            let kind = data.get_ref().1.handshake_kind();
            ensure!(
                kind == Some(expected),
                "{reuse:?}: the data connection was {kind:?}"
            );
            data.read_to_end(&mut Vec::new()).await?;
            ensure!(ftp.reply().await?.code == 226);
        }
        ftp.expect("QUIT", 221).await?;
        gateway.stop().await?;
    }
    Ok(())
}

/// Case C13.
#[tokio::test]
async fn lftp_with_a_4096_byte_socket_buffer_stores_a_43277_byte_file_100_times_intact()
-> Result<()> {
    let gateway = gateway(ftps_settings()).await?;
    let source = gateway.scratch("lftp").join("source.bin");
    let sha = random_file(&source, 43_277, 13)?;

    let mut commands = String::from("set net:socket-buffer 4096; ");
    for copy in 0..100 {
        commands.push_str(&format!("put {} -o copy-{copy:03}.bin; ", source.display()));
    }
    succeed(lftp(&gateway, &explicit_url(&gateway, "")?, &commands)).await?;

    for copy in 0..100 {
        let path = stored(&gateway, &format!("copy-{copy:03}.bin"));
        ensure!(
            sha256_file(&path)? == sha,
            "copy {copy} differs from its source"
        );
    }
    gateway.stop().await
}

/// Case C14.
#[tokio::test]
async fn mlsd_listings_from_lftp_and_curl_are_correct_and_feat_advertises_only_what_works()
-> Result<()> {
    let gateway = gateway(ftps_settings()).await?;
    let mut ftp = Ftp::logged_in(&gateway).await?;
    ensure!(ftp.store(b"alpha.txt", b"hello").await?.code == 226);
    ensure!(ftp.store(b"beta.bin", &[7u8; 1234]).await?.code == 226);
    ftp.expect("MKD gamma", 257).await?;
    ensure!(std::fs::read(stored(&gateway, "alpha.txt"))? == b"hello");
    ensure!(std::fs::read(stored(&gateway, "beta.bin"))? == [7u8; 1234]);

    let commands = "set ftp:use-mlsd yes; cls -l";
    let output = succeed(lftp(&gateway, &explicit_url(&gateway, "")?, commands)).await?;
    // `cls -l` over MLSD shows size, date and name; directories end in a slash.
    let size = |name: &str| {
        output
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_owned)
    };
    ensure!(size("alpha.txt").as_deref() == Some("5"), "{output}");
    ensure!(size("beta.bin").as_deref() == Some("1234"), "{output}");
    ensure!(size("gamma/").is_some(), "{output}");

    let mut mlsd = curl(&gateway);
    mlsd.args(["-X", "MLSD"]).arg(explicit_url(&gateway, "/")?);
    let listing = succeed(mlsd).await?;
    let mut entries: Vec<(String, String, String)> = Vec::new();
    for line in listing.lines() {
        let (facts, name) = line
            .split_once("; ")
            .context("an MLSD line without a name")?;
        let fact = |key: &str| {
            facts
                .split(';')
                .find_map(|f| f.strip_prefix(&format!("{key}=")))
                .map(str::to_owned)
                .unwrap_or_default()
        };
        let modify = fact("modify");
        ensure!(
            modify.len() == 14 && modify.bytes().all(|b| b.is_ascii_digit()),
            "{line}"
        );
        entries.push((name.to_owned(), fact("type"), fact("size")));
    }
    entries.sort();
    let expected = [
        ("alpha.txt", "file", "5"),
        ("beta.bin", "file", "1234"),
        ("gamma", "dir", "0"),
    ]
    .map(|(n, t, s)| (n.to_owned(), t.to_owned(), s.to_owned()));
    ensure!(entries == expected, "curl -X MLSD gave {entries:?}");

    // FEAT on a fresh connection, then every advertised feature at work.
    let (mut fresh, _) = Ftp::explicit(&gateway).await?;
    let feat = fresh.expect("FEAT", 211).await?;
    let features: Vec<&str> = feat
        .text
        .lines()
        .filter(|l| l.starts_with(' '))
        .map(str::trim)
        .collect();
    let advertised = [
        "AUTH TLS",
        "EPSV",
        "MDTM",
        "MLST type*;size*;modify*;",
        "PBSZ",
        "PROT",
        "REST STREAM",
        "SIZE",
        "UTF8",
    ];
    ensure!(features == advertised, "FEAT advertised {features:?}");
    fresh.secure().await?;
    fresh.login(USER, PASSWORD).await?;
    fresh.expect("OPTS UTF8 ON", 200).await?;
    fresh.expect("SIZE beta.bin", 213).await?;
    let mdtm = fresh.expect("MDTM alpha.txt", 213).await?;
    ensure!(mdtm.text.len() == "213 ".len() + 14, "{mdtm:?}");
    let mlst = fresh.expect("MLST alpha.txt", 250).await?;
    ensure!(mlst.text.contains("type=file;size=5;"), "{mlst:?}");
    fresh.expect("REST 2", 350).await?;
    let (tail, done) = fresh.fetch("RETR alpha.txt").await?;
    ensure!(
        tail == b"llo" && done.code == 226,
        "REST gave {tail:?} {done:?}"
    );
    let (whole, _) = fresh.fetch("RETR alpha.txt").await?;
    ensure!(whole == b"hello", "the REST offset outlived its transfer");
    fresh.expect("EPRT |1|127.0.0.1|9|", 502).await?;
    fresh.expect("QUIT", 221).await?;
    gateway.stop().await
}

/// Case C15 (the rendered Service ports are checked in `ftps_end_to_end`).
#[tokio::test]
async fn pasv_replies_carry_the_configured_passive_address_and_epsv_works() -> Result<()> {
    // A documentation address (RFC 5737): the test never connects to it.
    let settings = FtpsSettings {
        passive_address: Some("192.0.2.10".into()),
        ..ftps_settings()
    };
    let ports = settings.passive_ports;
    let gateway = gateway(settings).await?;
    let mut ftp = Ftp::logged_in(&gateway).await?;

    let pasv = ftp.expect("PASV", 227).await?;
    let inside = pasv
        .text
        .split_once("(192,0,2,10,")
        .with_context(|| format!("PASV does not advertise 192.0.2.10: {pasv:?}"))?
        .1;
    let numbers: Vec<u16> = inside
        .trim_end_matches(')')
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let port = numbers[0] * 256 + numbers[1];
    ensure!(
        (ports.first..ports.first + ports.count).contains(&port),
        "PASV port {port} is outside the range"
    );

    let port = ftp.epsv().await?;
    ensure!((ports.first..ports.first + ports.count).contains(&port));
    let data = ftp.connect_data(port).await?;
    ftp.expect("LIST", 150).await?;
    let mut data = ftp.secure_data(data).await?;
    let mut listing = Vec::new();
    data.read_to_end(&mut listing).await?;
    ensure!(ftp.reply().await?.code == 226);
    ftp.expect("QUIT", 221).await?;
    gateway.stop().await?;

    // A name is resolved when PASV is answered.
    let gateway = self::gateway(FtpsSettings {
        passive_address: Some("localhost".into()),
        ..ftps_settings()
    })
    .await?;
    let mut ftp = Ftp::logged_in(&gateway).await?;
    let pasv = ftp.expect("PASV", 227).await?;
    ensure!(pasv.text.contains("(127,0,0,1,"), "{pasv:?}");
    gateway.stop().await
}

/// Case C16, first half.
#[tokio::test]
async fn chinese_and_cyrillic_names_round_trip_with_and_without_opts_utf8() -> Result<()> {
    let gateway = gateway(ftps_settings()).await?;
    let scratch = gateway.scratch("names");
    let source = scratch.join("source.bin");
    let sha = random_file(&source, 70_000, 21)?;

    // curl never sends OPTS UTF8: the names go out as the UTF-8 bytes of the URL.
    let mut upload = curl(&gateway);
    upload
        .arg("--ftp-create-dirs")
        .arg("-T")
        .arg(&source)
        .arg(explicit_url(&gateway, &encode("/数据/季度报告 2024.bin"))?);
    succeed(upload).await?;

    // The test's client announces UTF-8 first.
    let mut ftp = Ftp::logged_in(&gateway).await?;
    ftp.expect("OPTS UTF8 ON", 200).await?;
    ftp.expect("MKD Документы", 257).await?;
    let content = std::fs::read(&source)?;
    let reply = ftp
        .store("Документы/Отчёт за май.bin".as_bytes(), &content)
        .await?;
    ensure!(reply.code == 226, "{reply:?}");

    let home = gateway.data().join(USER);
    let expected = [
        "Документы",
        "Документы/Отчёт за май.bin",
        "数据",
        "数据/季度报告 2024.bin",
    ];
    ensure!(tree(&home) == expected, "stored names: {:?}", tree(&home));
    for name in ["Документы/Отчёт за май.bin", "数据/季度报告 2024.bin"] {
        ensure!(sha256_file(&home.join(name))? == sha, "{name} differs");
    }

    let (names, _) = ftp.fetch("NLST 数据").await?;
    ensure!(String::from_utf8(names)?.trim_end() == "季度报告 2024.bin");
    let (names, _) = ftp.fetch("MLSD Документы").await?;
    ensure!(
        String::from_utf8(names)?
            .trim_end()
            .ends_with("; Отчёт за май.bin")
    );

    let back = scratch.join("back.bin");
    let mut download = curl(&gateway);
    download.arg("-o").arg(&back).arg(explicit_url(
        &gateway,
        &encode("/Документы/Отчёт за май.bin"),
    )?);
    succeed(download).await?;
    ensure!(sha256_file(&back)? == sha);
    ftp.expect("QUIT", 221).await?;
    gateway.stop().await
}

/// Case C16, second half.
#[tokio::test]
async fn a_name_with_an_invalid_utf8_byte_is_refused_and_nothing_is_created() -> Result<()> {
    let gateway = gateway(ftps_settings()).await?;
    let mut ftp = Ftp::logged_in(&gateway).await?;
    let before = tree(&gateway.data());

    let port = ftp.epsv().await?;
    let _data = ftp.connect_data(port).await?;
    for line in [
        &b"STOR bad\xffname.txt"[..],
        b"STOR caf\xe9.txt",
        b"MKD \xc3\x28dir",
        b"RNFR \x80",
    ] {
        let reply = ftp.command_bytes(line).await?;
        ensure!(
            reply.code == 501,
            "{:?}: {reply:?}",
            String::from_utf8_lossy(line)
        );
        ensure!(reply.text.contains("UTF-8"), "{reply:?}");
    }
    ensure!(tree(&gateway.data()) == before, "something was created");
    ftp.expect("NOOP", 200).await?;
    ftp.expect("QUIT", 221).await?;
    gateway.stop().await
}

#[tokio::test]
async fn an_upload_cut_off_without_tls_close_notify_is_discarded_not_stored_short() -> Result<()> {
    let gateway = gateway(ftps_settings()).await?;
    let mut ftp = Ftp::logged_in(&gateway).await?;
    let port = ftp.epsv().await?;
    let data = ftp.connect_data(port).await?;
    ftp.expect("STOR cut.bin", 150).await?;
    let mut data = ftp.secure_data(data).await?;
    data.write_all(&[1u8; 300_000]).await?;
    data.flush().await?;
    // As when the client is killed: the TCP connection ends, TLS never says goodbye.
    drop(data);

    let reply = ftp.reply().await?;
    ensure!(reply.code == 426, "{reply:?}");
    ensure!(reply.text.contains("nothing was stored"), "{reply:?}");
    ensure!(
        !stored(&gateway, "cut.bin").exists(),
        "a cut-off upload was stored"
    );
    ensure!(ftp.store(b"whole.bin", &[2u8; 1000]).await?.code == 226);
    ensure!(std::fs::read(stored(&gateway, "whole.bin"))? == [2u8; 1000]);
    ftp.expect("QUIT", 221).await?;
    gateway.stop().await
}

/// Case C17.
#[tokio::test]
async fn implicit_ftps_lists_uploads_and_downloads_with_curl_over_a_protected_data_channel()
-> Result<()> {
    let gateway = gateway(ftps_settings()).await?;
    let scratch = gateway.scratch("curl");
    let source = scratch.join("implicit.bin");
    let sha = random_file(&source, 500_000, 17)?;

    let mut upload = curl(&gateway);
    upload
        .arg("-v")
        .arg("-T")
        .arg(&source)
        .arg(implicit_url(&gateway, "/implicit.bin")?);
    let output = run(upload).await?;
    let verbose = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "{verbose}");
    ensure!(
        verbose.contains("> PROT P") && verbose.contains("< 200 Protection level set to Private"),
        "the data channel was not protected:\n{verbose}"
    );
    ensure!(sha256_file(&stored(&gateway, "implicit.bin"))? == sha);

    let mut list = curl(&gateway);
    list.arg(implicit_url(&gateway, "/")?);
    ensure!(succeed(list).await?.contains(" implicit.bin"));

    let back = scratch.join("back.bin");
    let mut download = curl(&gateway);
    download
        .arg("-o")
        .arg(&back)
        .arg(implicit_url(&gateway, "/implicit.bin")?);
    succeed(download).await?;
    ensure!(sha256_file(&back)? == sha);

    // Without PROT P no data connection is offered at all.
    let (mut ftp, greeting) = Ftp::implicit(&gateway).await?;
    ensure!(greeting.code == 220);
    ftp.login(USER, PASSWORD).await?;
    ftp.expect("EPSV", 521).await?;
    ftp.expect("PROT C", 534).await?;
    ftp.expect("AUTH TLS", 503).await?;
    ftp.expect("QUIT", 221).await?;
    gateway.stop().await
}

/// Case C18.
#[tokio::test]
async fn a_100_mib_file_uploads_and_downloads_intact_over_ftps() -> Result<()> {
    let gateway = gateway(ftps_settings()).await?;
    let scratch = gateway.scratch("big");
    let source = scratch.join("big.bin");
    let sha = random_file(&source, 100 * 1024 * 1024, 99)?;

    let started = Instant::now();
    let mut upload = curl(&gateway);
    upload
        .arg("-T")
        .arg(&source)
        .arg(explicit_url(&gateway, "/big.bin")?);
    succeed(upload).await?;
    ensure!(
        sha256_file(&stored(&gateway, "big.bin"))? == sha,
        "the stored file differs"
    );

    let back = scratch.join("back.bin");
    let mut download = curl(&gateway);
    download
        .arg("-o")
        .arg(&back)
        .arg(explicit_url(&gateway, "/big.bin")?);
    succeed(download).await?;
    ensure!(sha256_file(&back)? == sha, "the download differs");
    eprintln!("100 MiB up and down in {:?}", started.elapsed());
    gateway.stop().await
}

#[tokio::test]
async fn bad_passwords_unknown_users_and_commands_before_login_are_refused_without_logging_secrets()
-> Result<()> {
    let logs = capture_logs();
    let gateway = gateway(ftps_settings()).await?;
    let (mut ftp, _) = Ftp::explicit(&gateway).await?;

    // Before TLS only the TLS negotiation and harmless commands are served.
    let refused = ftp.expect(&format!("USER {USER}"), 530).await?;
    ensure!(refused.text.contains("AUTH TLS"), "{refused:?}");
    ftp.expect("LIST", 530).await?;
    ftp.secure().await?;

    ftp.expect("PASV", 530).await?;
    ftp.expect("EPSV", 530).await?;
    ftp.expect("RETR anything", 530).await?;
    ftp.expect("CWD /", 530).await?;
    ftp.expect(&format!("USER {USER}"), 331).await?;
    ftp.expect("PASS not-the-password", 530).await?;
    ftp.expect("USER nobody", 331).await?;
    ftp.expect("PASS Guess-Me-1", 530).await?;
    ftp.login(USER, PASSWORD).await?;
    ftp.expect("QUIT", 221).await?;
    gateway.stop().await?;

    let warnings = logs.at_level("WARN");
    let failed = |user: &str, reason: &str| {
        warnings
            .iter()
            .any(|l| l.contains("Login failed") && l.contains(user) && l.contains(reason))
    };
    ensure!(failed(USER, "wrong password"), "{warnings:#?}");
    ensure!(failed("nobody", "no such password login"), "{warnings:#?}");
    assert_clean_logs(&logs, &[PASSWORD, "not-the-password", "Guess-Me-1"])
}

#[tokio::test]
async fn active_mode_is_refused_and_the_gateway_connects_nowhere() -> Result<()> {
    let gateway = gateway(ftps_settings()).await?;
    // A port the client "offers": nothing may ever connect to it.
    let bait = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let port = bait.local_addr()?.port();
    let mut ftp = Ftp::logged_in(&gateway).await?;

    for line in [
        format!("PORT 127,0,0,1,{},{}", port >> 8, port & 0xFF),
        format!("PORT 192,0,2,7,{},{}", port >> 8, port & 0xFF),
        format!("EPRT |1|127.0.0.1|{port}|"),
        format!("LPRT 4,4,127,0,0,1,2,{},{}", port >> 8, port & 0xFF),
    ] {
        let reply = ftp.expect(&line, 502).await?;
        ensure!(
            reply.text.contains("Active mode is not supported"),
            "{reply:?}"
        );
    }
    // No data connection was set up, so there is nothing to transfer over.
    ftp.expect("LIST", 425).await?;
    let connected = timeout(Duration::from_secs(1), bait.accept()).await;
    ensure!(
        connected.is_err(),
        "the gateway connected to the client's port"
    );
    ftp.expect("QUIT", 221).await?;
    gateway.stop().await
}

#[tokio::test]
async fn site_commands_long_lines_and_tls_garbage_get_a_clear_reply_or_a_closed_connection()
-> Result<()> {
    let logs = capture_logs();
    let gateway = gateway(ftps_settings()).await?;

    let mut ftp = Ftp::logged_in(&gateway).await?;
    let before = tree(&gateway.data());
    for site in [
        "SITE CHMOD 777 /",
        "SITE EXEC /bin/sh",
        "SITE MD5 x",
        "SITE",
    ] {
        ftp.expect(site, 502).await?;
    }
    // A 100 KB line: refused and the connection closed.
    let mut long = b"STOR ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 100 * 1024));
    let reply = ftp.command_bytes(&long).await?;
    ensure!(reply.code == 500, "{reply:?}");
    ensure!(
        ftp.closed().await,
        "the connection stayed open after a 100 KB line"
    );

    // Garbage instead of a ClientHello, on both ports.
    let mut implicit = TcpStream::connect(gateway.ftps_implicit_addr()?).await?;
    implicit
        .write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3, 4, 5])
        .await?;
    implicit.write_all(b"\r\nUSER root\r\n").await?;
    let mut rest = Vec::new();
    let read = timeout(Duration::from_secs(20), implicit.read_to_end(&mut rest)).await;
    ensure!(
        read.is_ok(),
        "the implicit port kept a garbage connection open"
    );

    let (mut explicit, _) = Ftp::explicit(&gateway).await?;
    explicit.expect("AUTH TLS", 234).await?;
    explicit
        .send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    ensure!(
        explicit.closed().await,
        "the explicit port kept a garbage handshake open"
    );

    // Probes that connect and leave.
    for addr in [gateway.ftps_addr()?, gateway.ftps_implicit_addr()?] {
        drop(TcpStream::connect(addr).await?);
    }

    // The gateway still serves, and nothing was written.
    let mut ftp = Ftp::logged_in(&gateway).await?;
    ftp.expect("NOOP", 200).await?;
    ftp.expect("QUIT", 221).await?;
    ensure!(
        tree(&gateway.data()) == before,
        "files appeared: {:?}",
        tree(&gateway.data())
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    gateway.stop().await?;
    assert_clean_logs(&logs, &[PASSWORD])
}

/// libunftp ends a verb at a carriage return where the front end ends it at a space
/// only, so `STAT\r` and `PORT\r...` would be served by libunftp as `STAT` and `PORT`,
/// past the front end's own answers. Every line with a control character in it is refused
/// by the front end with a 500 and never passed on; the session goes on.
#[tokio::test]
async fn a_command_line_with_a_control_character_is_refused_and_never_passed_on() -> Result<()> {
    let gateway = gateway(ftps_settings()).await?;
    let mut ftp = Ftp::logged_in(&gateway).await?;
    let before = tree(&gateway.data());

    for line in [
        &b"STAT\r"[..],
        b"STAT\r /",
        b"PORT\r127,0,0,1,0,21",
        b"PORT 127,0,0,1,0,21\r",
        b"EPRT\r|1|127.0.0.1|21|",
        b"HELP\r",
        b"SITE\rCHMOD 777 /",
        b"FEAT\x00",
        b"MKD made\tby-tab",
        b"MKD escape\x1b[31m",
        b"STOR nel\xc2\x85",
    ] {
        let reply = ftp.command_bytes(line).await?;
        let shown = String::from_utf8_lossy(line);
        ensure!(
            reply.code == 500 && reply.text.contains("control character"),
            "{shown:?}: {reply:?}"
        );
        ensure!(
            !reply.text.contains("libunftp") && !reply.text.contains("VfsBackend"),
            "{shown:?} reached libunftp: {reply:?}"
        );
    }
    // The front end's own STAT still answers, and libunftp was never asked.
    let status = ftp.expect("STAT", 211).await?;
    ensure!(status.text.contains("Sluice FTPS"), "{status:?}");
    ftp.expect("NOOP", 200).await?;
    ensure!(tree(&gateway.data()) == before, "something was created");
    ftp.expect("QUIT", 221).await?;
    gateway.stop().await
}

#[tokio::test]
async fn a_passive_connection_that_is_opened_and_never_used_does_not_disturb_the_session()
-> Result<()> {
    let logs = capture_logs();
    let gateway = gateway(ftps_settings()).await?;
    let mut ftp = Ftp::logged_in(&gateway).await?;

    // Open a data connection, never send a command for it, and move on.
    let port = ftp.epsv().await?;
    let idle = ftp.connect_data(port).await?;
    let pasv = ftp.expect("PASV", 227).await?;
    ensure!(pasv.text.contains("(127,0,0,1,"));
    ftp.expect("NOOP", 200).await?;

    ensure!(ftp.store(b"after.txt", b"still works").await?.code == 226);
    let (listing, done) = ftp.fetch("NLST").await?;
    ensure!(String::from_utf8(listing)?.trim_end() == "after.txt" && done.code == 226);
    drop(idle);
    ftp.expect("QUIT", 221).await?;
    ensure!(std::fs::read(stored(&gateway, "after.txt"))? == b"still works");
    gateway.stop().await?;
    assert_clean_logs(&logs, &[PASSWORD])
}

#[tokio::test]
async fn plain_ftp_is_refused_unless_the_configuration_allows_it() -> Result<()> {
    let gateway = gateway(ftps_settings()).await?;
    let mut plain = tokio::process::Command::new("curl");
    plain
        .args(["--silent", "--show-error", "--max-time", "30", "--user"])
        .arg(format!("{USER}:{PASSWORD}"))
        .arg(explicit_url(&gateway, "/")?);
    let output = run(plain).await?;
    ensure!(!output.status.success(), "plain FTP was served");
    gateway.stop().await?;

    let gateway = self::gateway(FtpsSettings {
        allow_plaintext: true,
        ..ftps_settings()
    })
    .await?;
    let source = gateway.scratch("plain").join("plain.txt");
    let sha = random_file(&source, 5000, 8)?;
    let mut upload = tokio::process::Command::new("curl");
    upload
        .args(["--silent", "--show-error", "--max-time", "30", "--user"])
        .arg(format!("{USER}:{PASSWORD}"))
        .arg("-T")
        .arg(&source)
        .arg(explicit_url(&gateway, "/plain.txt")?);
    succeed(upload).await?;
    ensure!(sha256_file(&stored(&gateway, "plain.txt"))? == sha);
    gateway.stop().await
}

#[tokio::test]
async fn an_expired_certificate_refuses_ftps_until_a_renewed_one_is_picked_up_without_restart()
-> Result<()> {
    let logs = capture_logs();
    let pki = TestPki::new()?;
    let expired = pki.issue((2021, 1, 1))?;
    let gateway = TestGateway::start_ftps_with_certificate(
        vec![password_user(USER, PASSWORD, ALL)],
        ftps_settings(),
        pki,
        expired,
    )
    .await?;

    let (_, greeting) = Ftp::explicit(&gateway).await?;
    ensure!(greeting.code == 421, "{greeting:?}");
    ensure!(
        Ftp::implicit(&gateway).await.is_err(),
        "implicit FTPS was served"
    );
    let mut sftp = TcpStream::connect(gateway.addr).await?;
    let mut banner = [0u8; 7];
    sftp.read_exact(&mut banner).await?;
    ensure!(&banner == b"SSH-2.0", "SFTP stopped");
    ensure!(
        logs.at_level("ERROR")
            .iter()
            .any(|l| l.contains("FTPS certificate has expired")),
        "the expired certificate was not reported"
    );

    // A renewed certificate is picked up by polling; sessions already running keep going.
    let first = gateway.pki()?.issue(VALID_UNTIL)?;
    gateway.set_certificate(&first)?;
    let mut old = wait_for_login(&gateway).await?;
    let second = gateway.pki()?.issue((2098, 6, 30))?;
    gateway.set_certificate(&second)?;
    let expected = certificate_info(second.0.as_bytes())?.sha256_fingerprint;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ftp, _) = Ftp::implicit(&gateway).await?;
        if presented_fingerprint(&ftp)? == expected {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(old.store(b"kept.txt", b"old session").await?.code == 226);
    ensure!(std::fs::read(stored(&gateway, "kept.txt"))? == b"old session");
    old.expect("QUIT", 221).await?;
    gateway.stop().await
}

async fn wait_for_login(gateway: &TestGateway) -> Result<Ftp> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, greeting) = Ftp::explicit(gateway).await?;
        if greeting.code == 220 {
            return Ftp::logged_in(gateway).await;
        }
        ensure!(
            Instant::now() < deadline,
            "the renewed certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SHA-256 fingerprint of the certificate the server presented, as the gateway reports it.
fn presented_fingerprint(ftp: &Ftp) -> Result<String> {
    let Some(Io::Tls(stream)) = &ftp.io else {
        bail!("not a TLS connection");
    };
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .context("no server certificate")?;
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64_encode(leaf.as_ref())
    );
    Ok(certificate_info(pem.as_bytes())?.sha256_fingerprint)
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn the_minimum_tls_version_is_enforced() -> Result<()> {
    let gateway = gateway(FtpsSettings {
        min_tls_version: TlsVersion::V1_3,
        ..ftps_settings()
    })
    .await?;
    let mut old = curl(&gateway);
    old.args(["--tlsv1.2", "--tls-max", "1.2"])
        .arg(explicit_url(&gateway, "/")?);
    ensure!(!run(old).await?.status.success(), "TLS 1.2 was accepted");
    let mut current = curl(&gateway);
    current.arg("--tlsv1.3").arg(explicit_url(&gateway, "/")?);
    succeed(current).await?;
    gateway.stop().await
}

#[tokio::test]
async fn ftps_is_not_served_when_the_configuration_has_no_ftps_section() -> Result<()> {
    let gateway = TestGateway::start(vec![password_user(USER, PASSWORD, ALL)]).await?;
    ensure!(gateway.ftps.is_none() && gateway.ftps_implicit.is_none());
    let _: SocketAddr = gateway.addr;
    gateway.stop().await
}

#[tokio::test]
async fn connections_beyond_the_per_address_limit_get_421_on_the_explicit_port_and_are_closed()
-> Result<()> {
    let logs = capture_logs();
    let gateway = gateway(ftps_settings()).await?;
    let limit = sluice::gateway::sftp::MAX_CONNECTIONS_PER_IP;

    let mut admitted = Vec::new();
    for _ in 0..limit {
        let (ftp, greeting) = Ftp::explicit(&gateway).await?;
        ensure!(greeting.code == 220, "{greeting:?}");
        admitted.push(ftp);
    }
    let started = Instant::now();
    let (mut refused, reply) = Ftp::explicit(&gateway).await?;
    ensure!(
        reply.code == 421 && reply.text.contains("Too many connections"),
        "{reply:?}"
    );
    ensure!(refused.closed().await, "a refused connection stayed open");
    let mut implicit = TcpStream::connect(gateway.ftps_implicit_addr()?).await?;
    let mut received = Vec::new();
    timeout(Duration::from_secs(5), implicit.read_to_end(&mut received)).await??;
    ensure!(received.is_empty(), "refused, yet sent {received:?}");
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // The places come back as sessions end.
    drop(admitted);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ftp = loop {
        let (mut ftp, greeting) = Ftp::explicit(&gateway).await?;
        if greeting.code == 220 {
            ftp.secure().await?;
            ftp.login(USER, PASSWORD).await?;
            break ftp;
        }
        ensure!(Instant::now() < deadline, "no place was freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ftp.expect("QUIT", 221).await?;
    gateway.stop().await?;
    let refusals = logs.at_level("WARN");
    let refusals: Vec<_> = refusals
        .iter()
        .filter(|w| w.contains("Refusing connections") && w.contains("Ftps"))
        .collect();
    ensure!(refusals.len() == 1, "{refusals:#?}");
    assert_clean_logs(&logs, &[PASSWORD])
}

#[tokio::test]
async fn a_reload_that_removes_a_user_or_changes_their_password_closes_their_ftps_sessions()
-> Result<()> {
    const OTHER: &str = "ops";
    const OTHER_PASSWORD: &str = "Other-Password-4";
    let logs = capture_logs();
    let cucm = password_user(USER, PASSWORD, ALL);
    let ops = password_user(OTHER, OTHER_PASSWORD, ALL);
    let gateway = TestGateway::start_ftps(vec![cucm.clone(), ops.clone()], ftps_settings()).await?;

    let mut idle = Ftp::logged_in(&gateway).await?;
    let mut uploading = Ftp::logged_in(&gateway).await?;
    let (mut other, _) = Ftp::explicit(&gateway).await?;
    other.secure().await?;
    other.login(OTHER, OTHER_PASSWORD).await?;
    let port = uploading.epsv().await?;
    let data = uploading.connect_data(port).await?;
    uploading.expect("STOR during-revocation.bin", 150).await?;
    let mut data = uploading.secure_data(data).await?;
    data.write_all(&[3u8; 200_000]).await?;
    data.flush().await?;

    // Only the key set changes for ops, which does not matter to a password login.
    let mut ops_with_key = ops.clone();
    ops_with_key.public_keys = vec![
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC6ovjeiYs++YnFewG7s9QMhdu57ek59CXgyiNgY3Uou".into(),
    ];
    let new_password = password_user(USER, "New-Password-After-Rotation-2", ALL);
    gateway.set_users(vec![new_password, ops_with_key.clone()])?;
    for ftp in [&mut idle, &mut uploading] {
        let reply = ftp.reply().await?;
        ensure!(
            reply.code == 421 && reply.text.contains("revoked"),
            "{reply:?}"
        );
        ensure!(ftp.closed().await, "a revoked session stayed open");
    }
    drop(data);
    other.expect("NOOP", 200).await?;

    gateway.set_users(vec![])?;
    let reply = other.reply().await?;
    ensure!(
        reply.code == 421 && reply.text.contains("revoked"),
        "{reply:?}"
    );
    ensure!(other.closed().await, "a removed user's session stayed open");
    ensure!(
        !stored(&gateway, "during-revocation.bin").exists(),
        "the upload cut by the revocation was stored"
    );
    gateway.stop().await?;
    let revoked = logs.at_level("INFO");
    let revoked = revoked
        .iter()
        .filter(|l| l.contains("its login was revoked"))
        .count();
    ensure!(revoked == 3, "{revoked} revocations logged");
    assert_clean_logs(&logs, &[PASSWORD, OTHER_PASSWORD])
}

#[tokio::test]
async fn after_epsv_all_pasv_and_active_mode_are_refused_and_epsv_still_works() -> Result<()> {
    let gateway = gateway(ftps_settings()).await?;
    let mut ftp = Ftp::logged_in(&gateway).await?;
    ftp.expect("PASV", 227).await?;
    ftp.expect("EPSV ALL", 200).await?;
    for line in [
        "PASV",
        "LPSV",
        "PORT 127,0,0,1,4,1",
        "EPRT |1|127.0.0.1|1025|",
        "LPRT 4,4,127,0,0,1,2,4,1",
    ] {
        let reply = ftp.expect(line, 503).await?;
        ensure!(reply.text.contains("EPSV ALL"), "{line}: {reply:?}");
    }
    ensure!(ftp.store(b"after-epsv-all.txt", b"epsv only").await?.code == 226);
    let (listing, done) = ftp.fetch("NLST").await?;
    ensure!(done.code == 226, "{done:?}");
    ensure!(String::from_utf8(listing)?.trim_end() == "after-epsv-all.txt");
    ftp.expect("QUIT", 221).await?;
    ensure!(std::fs::read(stored(&gateway, "after-epsv-all.txt"))? == b"epsv only");
    gateway.stop().await
}

#[tokio::test]
async fn curl_resume_and_append_and_lftp_put_continue_keep_the_stored_start_and_match_the_source()
-> Result<()> {
    let logs = capture_logs();
    let gateway = gateway(ftps_settings()).await?;
    let scratch = gateway.scratch("resume");

    // curl -C - -T: SIZE, then APPE of what the server lacks.
    let source = scratch.join("source.bin");
    let sha = random_file(&source, 5 * 1024 * 1024 + 17, 11)?;
    let first = scratch.join("first.bin");
    std::fs::write(&first, &std::fs::read(&source)?[..2 * 1024 * 1024 + 5])?;
    let mut upload = curl(&gateway);
    upload
        .arg("-T")
        .arg(&first)
        .arg(explicit_url(&gateway, "/curl.bin")?);
    succeed(upload).await?;
    let mut resume = curl(&gateway);
    resume
        .args(["-C", "-", "-T"])
        .arg(&source)
        .arg(explicit_url(&gateway, "/curl.bin")?);
    succeed(resume).await?;
    ensure!(
        sha256_file(&stored(&gateway, "curl.bin"))? == sha,
        "curl's resumed upload differs"
    );

    // lftp put -c: SIZE, then REST and STOR.
    let source = scratch.join("lftp-source.bin");
    let lftp_sha = random_file(&source, 3 * 1024 * 1024 + 3, 12)?;
    let first = scratch.join("lftp-first.bin");
    std::fs::write(&first, &std::fs::read(&source)?[..1024 * 1024 + 1])?;
    let mut upload = curl(&gateway);
    upload
        .arg("-T")
        .arg(&first)
        .arg(explicit_url(&gateway, "/lftp.bin")?);
    succeed(upload).await?;
    let commands = format!("put -c {} -o lftp.bin", source.display());
    succeed(lftp(&gateway, &explicit_url(&gateway, "")?, &commands)).await?;
    ensure!(
        sha256_file(&stored(&gateway, "lftp.bin"))? == lftp_sha,
        "lftp's continued upload differs"
    );

    // curl --append: APPE of a whole file.
    let line = scratch.join("line.txt");
    std::fs::write(&line, b"second line\n")?;
    std::fs::write(stored(&gateway, "log.txt"), b"first line\n")?;
    let mut append = curl(&gateway);
    append
        .arg("--append")
        .arg("-T")
        .arg(&line)
        .arg(explicit_url(&gateway, "/log.txt")?);
    succeed(append).await?;
    ensure!(std::fs::read(stored(&gateway, "log.txt"))? == b"first line\nsecond line\n");
    let files = tree(&gateway.data().join(USER));
    gateway.stop().await?;

    let completed = logs.at_level("INFO");
    let kept = |bytes: u64| {
        completed
            .iter()
            .any(|l| l.contains("Upload completed") && l.contains(&format!("kept={bytes} ")))
    };
    ensure!(
        kept(2 * 1024 * 1024 + 5),
        "curl did not resume: {completed:#?}"
    );
    ensure!(kept(1024 * 1024 + 1), "lftp did not resume: {completed:#?}");
    ensure!(kept(11), "curl did not append: {completed:#?}");
    ensure!(files == ["curl.bin", "lftp.bin", "log.txt"], "{files:?}");
    assert_clean_logs(&logs, &[PASSWORD])
}

#[tokio::test]
async fn rest_beyond_the_end_is_refused_and_a_write_only_user_appends_and_resumes() -> Result<()> {
    const DROP: &str = "drop";
    const DROP_PASSWORD: &str = "Drop-Box-Password-3";
    let users = vec![
        password_user(USER, PASSWORD, ALL),
        password_user(DROP, DROP_PASSWORD, &[sluice::api::Permission::Write]),
    ];
    let gateway = TestGateway::start_ftps(users, ftps_settings()).await?;
    let (mut ftp, _) = Ftp::explicit(&gateway).await?;
    ftp.secure().await?;
    ftp.login(DROP, DROP_PASSWORD).await?;
    let log = gateway.data().join(DROP).join("log");
    std::fs::write(&log, b"one\n")?;

    // Write-only: SIZE is denied, so libunftp's own APPE offset would be 0.
    ftp.expect("SIZE log", 550).await?;
    ensure!(ftp.store_with("APPE log", b"two\n").await?.code == 226);
    ensure!(std::fs::read(&log)? == b"one\ntwo\n");
    ftp.expect("REST 4", 350).await?;
    ensure!(ftp.store_with("STOR log", b"2\n").await?.code == 226);
    ensure!(std::fs::read(&log)? == b"one\n2\n");

    ftp.expect("REST 99", 350).await?;
    let refused = ftp.refused_store("STOR log").await?;
    // A user who may not read the file is not told its size.
    ensure!(
        refused.code == 550
            && refused
                .text
                .contains("cannot resume at byte 99: the file is shorter")
            && !refused.text.contains('6'),
        "{refused:?}"
    );
    ensure!(
        std::fs::read(&log)? == b"one\n2\n",
        "a refused resume changed the file"
    );
    // The refused offset is not kept for the next upload.
    ensure!(ftp.store_with("STOR log", b"whole\n").await?.code == 226);
    ensure!(std::fs::read(&log)? == b"whole\n");
    ftp.expect("QUIT", 221).await?;
    // The staging directory is left empty: every refused or completed upload was cleared.
    ensure!(
        tree(&gateway.data()) == [UPLOADS_DIR, "drop", "drop/log"],
        "{:?}",
        tree(&gateway.data())
    );
    gateway.stop().await
}

#[tokio::test]
async fn an_upload_that_cannot_start_is_refused_before_its_150_and_the_session_goes_on()
-> Result<()> {
    const READER: &str = "reader";
    const READER_PASSWORD: &str = "Read-Only-Password-4";
    let users = vec![
        password_user(USER, PASSWORD, ALL),
        password_user(READER, READER_PASSWORD, &[sluice::api::Permission::Read]),
    ];
    let gateway = TestGateway::start_ftps(users, ftps_settings()).await?;
    std::fs::create_dir_all(gateway.data().join(READER))?;
    std::fs::write(gateway.data().join(READER).join("report.csv"), b"a,b\n")?;
    let (mut ftp, _) = Ftp::explicit(&gateway).await?;
    ftp.secure().await?;
    ftp.login(READER, READER_PASSWORD).await?;

    let denied = "550 permission denied: the Write permission is not granted";
    for line in ["STOR new.csv", "APPE report.csv", "STOR /report.csv"] {
        let refused = ftp.refused_store(line).await?;
        ensure!(refused.text.trim_end() == denied, "{line}: {refused:?}");
    }
    // A REST offset is not kept past a refused upload: the next download is whole.
    ftp.expect("REST 2", 350).await?;
    ftp.refused_store("STOR report.csv").await?;
    let (bytes, done) = ftp.fetch("RETR report.csv").await?;
    ensure!(bytes == b"a,b\n" && done.code == 226, "{bytes:?} {done:?}");
    ftp.expect("QUIT", 221).await?;

    let (mut ftp, _) = Ftp::explicit(&gateway).await?;
    ftp.secure().await?;
    ftp.login(USER, PASSWORD).await?;
    ftp.expect("MKD /dir", 257).await?;
    ftp.expect("CWD /dir", 250).await?;
    // Names resolve against the working directory, as libunftp's own would.
    let missing = ftp.refused_store("STOR missing/file").await?;
    ensure!(missing.code == 550, "{missing:?}");
    let is_dir = ftp.refused_store("STOR ../dir").await?;
    ensure!(is_dir.code == 550, "{is_dir:?}");
    ensure!(ftp.store_with("STOR here.bin", b"here").await?.code == 226);
    ensure!(std::fs::read(gateway.data().join(USER).join("dir/here.bin"))? == b"here");
    // The working directory is the one at the STOR, also when it changed after the EPSV.
    ftp.expect("CWD /", 250).await?;
    let port = ftp.epsv().await?;
    let data = ftp.connect_data(port).await?;
    ftp.expect("CWD /dir", 250).await?;
    ftp.expect("STOR late.bin", 150).await?;
    let mut data = ftp.secure_data(data).await?;
    data.write_all(b"late").await?;
    data.shutdown().await?;
    ensure!(ftp.reply().await?.code == 226);
    ensure!(std::fs::read(gateway.data().join(USER).join("dir/late.bin"))? == b"late");
    ftp.expect("QUIT", 221).await?;

    // curl sees the refusal as the answer to its STOR, never a 150.
    let source = gateway.scratch("curl").join("up.csv");
    std::fs::write(&source, "x")?;
    let reader = FtpClients {
        ca: gateway.ca_file(),
        user: READER.into(),
        password: READER_PASSWORD.into(),
    };
    let mut upload = reader.curl();
    upload
        .arg("-v")
        .arg("-T")
        .arg(&source)
        .arg(explicit_url(&gateway, "/up.csv")?);
    let output = run(upload).await?;
    let verbose = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success(), "{verbose}");
    ensure!(
        verbose.contains(&format!("< {denied}")) && !verbose.contains("< 150"),
        "{verbose}"
    );
    ensure!(
        tree(&gateway.data())
            == [
                UPLOADS_DIR,
                "cucm",
                "cucm/dir",
                "cucm/dir/here.bin",
                "cucm/dir/late.bin",
                "reader",
                "reader/report.csv"
            ],
        "{:?}",
        tree(&gateway.data())
    );
    gateway.stop().await
}

#[tokio::test]
async fn every_file_command_before_login_is_refused_with_530_and_writes_nothing() -> Result<()> {
    let logs = capture_logs();
    let gateway = gateway(ftps_settings()).await?;
    let before = tree(&gateway.data());
    let (mut ftp, _) = Ftp::explicit(&gateway).await?;
    ftp.secure().await?;

    for line in [
        "STOR /x",
        "APPE /x",
        "STOU",
        "MKD /made",
        "RMD /",
        "DELE /x",
        "RNFR /x",
        "RNTO /y",
        "SIZE /x",
        "MDTM /x",
        "MLST /",
        "MLSD",
        "NLST",
        "LIST",
        "CWD ..",
        "REST 5",
    ] {
        let reply = ftp.command(line).await?;
        ensure!(
            reply.code == 530 || (line == "STOU" && reply.code == 502),
            "{line}: {reply:?}"
        );
    }
    // A failed login changes nothing either.
    ftp.expect(&format!("USER {USER}"), 331).await?;
    ftp.expect("PASS wrong-password", 530).await?;
    ftp.expect("MKD /made", 530).await?;
    ftp.expect("QUIT", 221).await?;
    ensure!(
        tree(&gateway.data()) == before,
        "files appeared: {:?}",
        tree(&gateway.data())
    );
    gateway.stop().await?;
    assert_clean_logs(&logs, &[PASSWORD, "wrong-password"])
}

#[tokio::test]
async fn a_long_line_before_tls_and_garbage_on_a_data_port_get_a_clear_reply_or_a_close()
-> Result<()> {
    let logs = capture_logs();
    let gateway = gateway(ftps_settings()).await?;

    // Before TLS, and a line that never ends: refused once it passes the limit.
    let (mut plain, _) = Ftp::explicit(&gateway).await?;
    let endless = vec![b'U'; 64 * 1024];
    plain.send_raw(&endless).await?;
    let reply = plain.reply().await?;
    ensure!(
        reply.code == 500 && reply.text.contains("too long"),
        "{reply:?}"
    );
    ensure!(plain.closed().await, "the connection stayed open");

    // Garbage instead of a TLS handshake on a passive data port.
    let mut ftp = Ftp::logged_in(&gateway).await?;
    let before = tree(&gateway.data());
    let port = ftp.epsv().await?;
    let mut data = ftp.connect_data(port).await?;
    data.write_all(b"\x16\x03\x01\x00\x05hello, not a ClientHello\r\n")
        .await?;
    let opening = ftp.command("STOR garbage.bin").await?;
    let reply = match opening.code {
        150 => ftp.reply().await?,
        _ => opening,
    };
    ensure!(
        reply.code == 425 && reply.text.contains("TLS handshake failed"),
        "{reply:?}"
    );
    let mut rest = Vec::new();
    let closed = timeout(Duration::from_secs(10), data.read_to_end(&mut rest)).await;
    ensure!(
        closed.is_ok(),
        "the data port kept a garbage connection open"
    );
    ensure!(
        tree(&gateway.data()) == before,
        "{:?}",
        tree(&gateway.data())
    );

    // The session goes on.
    ensure!(ftp.store(b"after.txt", b"fine").await?.code == 226);
    ftp.expect("QUIT", 221).await?;
    ensure!(std::fs::read(stored(&gateway, "after.txt"))? == b"fine");
    let expected = [
        UPLOADS_DIR.to_owned(),
        USER.into(),
        format!("{USER}/after.txt"),
    ];
    ensure!(
        tree(&gateway.data()) == expected,
        "{:?}",
        tree(&gateway.data())
    );
    gateway.stop().await?;
    assert_clean_logs(&logs, &[PASSWORD])
}

#[tokio::test]
async fn an_lftp_upload_killed_midway_stores_nothing_and_put_continue_then_uploads_it_whole()
-> Result<()> {
    let logs = capture_logs();
    let gateway = gateway(ftps_settings()).await?;
    let scratch = gateway.scratch("killed");
    let source = scratch.join("source.bin");
    let sha = random_file(&source, 4 * 1024 * 1024 + 9, 13)?;

    // About 16 s at this rate; killed once the first bytes are stored (however long
    // lftp takes to log in on a busy machine).
    let commands = format!(
        "set net:limit-rate 262144; put {} -o cut.bin",
        source.display()
    );
    let mut slow = lftp(&gateway, &explicit_url(&gateway, "")?, &commands);
    let mut child = slow.stdin(Stdio::null()).kill_on_drop(true).spawn()?;
    let uploads = gateway.data().join(UPLOADS_DIR);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let receiving = std::fs::read_dir(&uploads)
            .into_iter()
            .flatten()
            .flatten()
            .any(|entry| entry.metadata().is_ok_and(|m| m.len() > 0));
        if receiving {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the upload did not start within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        child.try_wait()?.is_none(),
        "lftp ended before it was killed"
    );
    ensure!(
        !stored(&gateway, "cut.bin").exists(),
        "the name appeared mid-upload"
    );
    child.start_kill()?;
    child.wait().await?;

    let deadline = Instant::now() + Duration::from_secs(30);
    while !logs.text().contains("Upload interrupted") {
        ensure!(Instant::now() < deadline, "the upload was not ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        !stored(&gateway, "cut.bin").exists(),
        "a killed upload was stored"
    );

    let commands = format!("put -c {} -o cut.bin", source.display());
    succeed(lftp(&gateway, &explicit_url(&gateway, "")?, &commands)).await?;
    ensure!(
        sha256_file(&stored(&gateway, "cut.bin"))? == sha,
        "the upload after the killed one differs"
    );
    ensure!(
        std::fs::read_dir(&uploads)?.count() == 0,
        "a temporary file was left"
    );
    gateway.stop().await?;
    assert_clean_logs(&logs, &[PASSWORD])
}

/// A client that keeps sending commands but never reads the replies is disconnected once
/// a reply has waited `REPLY_TIMEOUT` (15 s), freeing its connection slot, rather than
/// holding the session (and the login deadline) in a blocked write for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies_is_disconnected() -> Result<()> {
    let gateway = gateway(ftps_settings()).await?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stream = socket.connect(gateway.ftps_addr()?).await?;
    let started = Instant::now();

    // Commands answered before login, until our sends block: the gateway stopped reading
    // because its replies are not taken.
    let burst = "FEAT\r\n".repeat(1000);
    while timeout(Duration::from_secs(2), stream.write_all(burst.as_bytes()))
        .await
        .is_ok_and(|sent| sent.is_ok())
    {
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "sends never blocked"
        );
    }

    // Past the reply timeout the gateway has closed the connection: what is left to read
    // ends soon, instead of the gateway answering the queued commands for ever.
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(started.elapsed())).await;
    let mut sink = vec![0u8; 1 << 16];
    let drained = timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    ensure!(
        drained.is_ok(),
        "the connection was still served after 25 s"
    );
    gateway.stop().await
}

/// A second `USER`/`PASS` after login is refused and leaves the session logged in: it
/// can still set up transfers.
#[tokio::test]
async fn a_second_login_attempt_is_refused_and_the_session_stays_logged_in() -> Result<()> {
    let gateway = gateway(ftps_settings()).await?;
    let mut ftp = Ftp::logged_in(&gateway).await?;
    let again = ftp.command(&format!("USER {USER}")).await?;
    ensure!(again.code >= 500, "{again:?}");
    let pass = ftp.command("PASS not-the-password").await?;
    ensure!(pass.code >= 500, "{pass:?}");
    let status = ftp.expect("STAT", 211).await?;
    ensure!(!status.text.contains("not logged in"), "{status:?}");
    ftp.expect("PASV", 227).await?;
    gateway.stop().await
}

/// `RNFR x` then `RNTO x`, for a file and a directory, succeeds and keeps it.
#[tokio::test]
async fn renaming_a_file_or_directory_onto_itself_succeeds_and_keeps_it() -> Result<()> {
    let _logs = capture_logs();
    let gateway = gateway(ftps_settings()).await?;
    let home = gateway.data().join(USER);
    std::fs::create_dir_all(home.join("d"))?;
    std::fs::write(home.join("x.txt"), b"kept")?;

    let mut ftp = Ftp::logged_in(&gateway).await?;
    for name in ["/x.txt", "/d"] {
        ftp.expect(&format!("RNFR {name}"), 350).await?;
        ftp.expect(&format!("RNTO {name}"), 250).await?;
    }
    ensure!(std::fs::read(home.join("x.txt"))? == b"kept");
    ensure!(home.join("d").is_dir());
    gateway.stop().await
}
