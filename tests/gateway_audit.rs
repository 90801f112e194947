//! The audit log and the residency write gate, end to end: real clients (paramiko over
//! SFTP, curl over FTPS) against a gateway on a volume or on a real SeaweedFS, and every
//! audit record read back from the storage itself (the volume's files, the bucket's
//! objects), never from the gateway.

mod support;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use opendal::Operator;
use serde_json::Value;
use sluice::gateway::audit::{AuditProtocol, AuditRecord, Decision, Operation};
use sluice::gateway::config::{CrossBorderStamp, GatewayUser, ResidencyStamp};
use sluice::storage::AUDIT_DIR;

use support::ftp::{FtpClients, run, succeed};
use support::gateway::{
    ALL, CapturedLogs, POD, TestGateway, capture_logs, ftps_settings, paramiko, paramiko_command,
    password_user,
};
use support::s3::{SeaweedFs, audit_keys};
use support::sftp::{random_file, sha256_hex};

const USER: &str = "cucm";
const PASSWORD: &str = "Audit-Trail-Horse-Battery-4";
const READER: &str = "reader";
const READER_PASSWORD: &str = "Read-Only-Staple-Lamp-8";
const WRONG_PASSWORD: &str = "Not-The-Password-0";
/// Every bucket gateway here serves its bucket under this prefix, as the operator would.
const PREFIX: &str = "gateways/cucm/";
const REFERENCE: &str = "CAC-SA-2026-0042";

fn users() -> Vec<GatewayUser> {
    use sluice::api::Permission;
    vec![
        password_user(USER, PASSWORD, ALL),
        password_user(
            READER,
            READER_PASSWORD,
            &[Permission::List, Permission::Read],
        ),
    ]
}

/// A gateway serving SFTP and FTPS, and the bucket it stores into, if it is on one.
struct Fixture {
    gateway: TestGateway,
    bucket: Option<Operator>,
}

impl Fixture {
    async fn volume() -> Result<Self> {
        let gateway = TestGateway::start_ftps(users(), ftps_settings()).await?;
        Ok(Self {
            gateway,
            bucket: None,
        })
    }

    async fn bucket(test: &str) -> Result<Self> {
        let weed = SeaweedFs::shared()?;
        let name = weed.bucket(test)?;
        let store = weed.config(&name, PREFIX);
        let credentials = weed.credentials();
        let ftps = Some(ftps_settings());
        let gateway = TestGateway::start_object_store(users(), ftps, store, &credentials).await?;
        Ok(Self {
            gateway,
            bucket: Some(weed.bucket_operator(&name)?),
        })
    }

    /// Every audit record in the storage, in the order they were written.
    async fn records(&self) -> Result<Vec<AuditRecord>> {
        let mut text = String::new();
        match &self.bucket {
            None => {
                for path in volume_logs(&self.gateway.data())? {
                    text.push_str(&std::fs::read_to_string(path)?);
                }
            }
            Some(bucket) => {
                // Object names sort by day, pod, then time and sequence of the flush.
                for key in audit_keys(bucket).await? {
                    ensure!(
                        key.starts_with(&format!("{PREFIX}{AUDIT_DIR}/")),
                        "audit object outside the server's prefix: {key}"
                    );
                    if key.ends_with(".jsonl") {
                        text.push_str(std::str::from_utf8(&bucket.read(&key).await?.to_vec())?);
                    }
                }
            }
        }
        text.lines()
            .map(|line| serde_json::from_str(line).with_context(|| format!("record {line:?}")))
            .collect()
    }

    /// The records once at least `count` match `wanted`, waiting up to 30 s: refusals
    /// are written without the client waiting for them.
    async fn records_when(
        &self,
        count: usize,
        wanted: impl Fn(&AuditRecord) -> bool,
    ) -> Result<Vec<AuditRecord>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let records = self.records().await?;
            if records.iter().filter(|r| wanted(r)).count() >= count {
                return Ok(records);
            }
            if Instant::now() > deadline {
                bail!("fewer than {count} matching records: {records:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn ftp(&self, user: &str, password: &str) -> FtpClients {
        FtpClients {
            ca: self.gateway.ca_file(),
            user: user.into(),
            password: password.into(),
        }
    }

    fn ftp_url(&self, path: &str) -> Result<String> {
        Ok(format!("ftp://{}{path}", self.gateway.ftps_addr()?))
    }

    fn expected_region(&self) -> &'static str {
        // SeaweedFS is declared in cn-shanghai, as is the test server.
        "cn-shanghai"
    }
}

/// The day files of the volume's audit log, `.sluice-audit/DAY/POD.jsonl`, in day order.
fn volume_logs(data: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut days: Vec<_> = match std::fs::read_dir(data.join(AUDIT_DIR)) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(_) => return Ok(Vec::new()),
    };
    days.sort();
    Ok(days
        .into_iter()
        .map(|day| day.join(format!("{POD}.jsonl")))
        .filter(|file| file.is_file())
        .collect())
}

/// What a test asserts of one record: user, operation, path, target, bytes, decision.
type Summary = (
    String,
    Operation,
    Option<String>,
    Option<String>,
    Option<u64>,
    Decision,
);

fn summary(record: &AuditRecord) -> Summary {
    (
        record.user.clone(),
        record.operation,
        record.path.clone(),
        record.target.clone(),
        record.bytes,
        record.decision,
    )
}

fn op(
    user: &str,
    operation: Operation,
    path: Option<&str>,
    target: Option<&str>,
    bytes: Option<u64>,
    decision: Decision,
) -> Summary {
    let owned = |s: Option<&str>| s.map(str::to_owned);
    (
        user.into(),
        operation,
        owned(path),
        owned(target),
        bytes,
        decision,
    )
}

/// Checks what every record of `fixture` must hold whatever it records.
fn check_common(fixture: &Fixture, records: &[AuditRecord], protocol: AuditProtocol) -> Result<()> {
    for record in records {
        ensure!(
            record.server == "tests/sftp" && record.pod == POD,
            "{record:?}"
        );
        ensure!(record.protocol == protocol, "{record:?}");
        ensure!(record.peer == "127.0.0.1", "{record:?}");
        ensure!(record.region == fixture.expected_region(), "{record:?}");
        ensure!(
            record.time.len() == 24 && record.time.ends_with('Z') && &record.time[19..20] == ".",
            "not RFC 3339 with milliseconds: {}",
            record.time
        );
    }
    let text = serde_json::to_string(records)?;
    for secret in [PASSWORD, READER_PASSWORD, WRONG_PASSWORD] {
        ensure!(!text.contains(secret), "a password reached the audit log");
    }
    Ok(())
}

/// Logs in, uploads, downloads, makes a directory, renames twice (plain and posix),
/// deletes and removes the directory as the full user; a read-only user's upload is
/// refused; a login with a wrong password fails. Prints what the test needs to check.
const SFTP_SCENARIO: &str = r#"
import hashlib
data = bytes((i * 7 + 3) % 251 for i in range(300001))
t, sftp = connect()
with sftp.open("report.bin", "wb") as f:
    f.write(data)
with sftp.open("report.bin", "rb") as f:
    got = f.read()
sftp.mkdir("inbox")
sftp.rename("report.bin", "inbox/report.bin")
sftp.posix_rename("inbox/report.bin", "inbox/final.bin")
sftp.remove("inbox/final.bin")
sftp.rmdir("inbox")
t.close()
t2, reader = connect(user="reader", password=os.environ["READER_PASSWORD"])
def upload():
    with reader.open("x.txt", "wb") as f:
        f.write(b"x")
denied = attempt(upload)
t2.close()
bad = attempt(lambda: connect(password=os.environ["WRONG_PASSWORD"]))
print(json.dumps({"sha": hashlib.sha256(data).hexdigest(), "same": got == data,
                  "denied": denied, "bad": bad}))
"#;

async fn sftp_scenario(fixture: &Fixture, logs: &CapturedLogs) -> Result<()> {
    let mut command = paramiko_command(fixture.gateway.addr, USER, PASSWORD, SFTP_SCENARIO);
    command
        .env("READER_PASSWORD", READER_PASSWORD)
        .env("WRONG_PASSWORD", WRONG_PASSWORD);
    let result = run_json(command).await.with_context(|| logs.text())?;
    ensure!(result["same"] == true, "the download differs: {result}");
    ensure!(result["denied"]["errno"] == 13, "{result}");
    ensure!(
        result["bad"]["error"] == "AuthenticationException",
        "{result}"
    );
    let sha = result["sha"].as_str().context("no sha")?;

    let records = fixture
        .records_when(3, |r| r.operation == Operation::Login)
        .await?;
    check_common(fixture, &records, AuditProtocol::Sftp)?;
    let summaries: Vec<Summary> = records.iter().map(summary).collect();
    use Decision::{Allowed, Denied};
    use Operation::*;
    let expected = [
        op(USER, Login, None, None, None, Allowed),
        op(
            USER,
            Upload,
            Some("/report.bin"),
            None,
            Some(300_001),
            Allowed,
        ),
        op(
            USER,
            Download,
            Some("/report.bin"),
            None,
            Some(300_001),
            Allowed,
        ),
        op(USER, Mkdir, Some("/inbox"), None, None, Allowed),
        op(
            USER,
            Rename,
            Some("/report.bin"),
            Some("/inbox/report.bin"),
            None,
            Allowed,
        ),
        op(
            USER,
            Rename,
            Some("/inbox/report.bin"),
            Some("/inbox/final.bin"),
            None,
            Allowed,
        ),
        op(USER, Delete, Some("/inbox/final.bin"), None, None, Allowed),
        op(USER, Rmdir, Some("/inbox"), None, None, Allowed),
        op(READER, Login, None, None, None, Allowed),
        op(READER, Upload, Some("/x.txt"), None, None, Denied),
        op(USER, Login, None, None, None, Denied),
    ];
    ensure!(summaries == expected, "records: {summaries:#?}");

    let upload = &records[1];
    ensure!(upload.sha256.as_deref() == Some(sha), "{upload:?}");
    ensure!(
        upload.error.is_none() && upload.reference.is_none(),
        "{upload:?}"
    );
    let denied = &records[9];
    ensure!(
        denied.error.as_deref() == Some("permission denied: the Write permission is not granted"),
        "{denied:?}"
    );
    let bad = &records[10];
    ensure!(bad.error.as_deref() == Some("wrong password"), "{bad:?}");
    // One session per connection: the full user's operations share the login's.
    ensure!(records[..8].iter().all(|r| r.session == records[0].session));
    ensure!(records[8].session != records[0].session);
    Ok(())
}

/// Runs a paramiko command and parses the JSON it prints last.
async fn run_json(mut command: tokio::process::Command) -> Result<Value> {
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .context("paramiko did not finish within 60 s")??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "paramiko failed:\n{stdout}\n{stderr}"
    );
    let last = stdout.lines().last().context("paramiko printed nothing")?;
    serde_json::from_str(last).with_context(|| format!("paramiko printed {last:?}"))
}

#[tokio::test]
async fn sftp_operations_on_a_volume_are_recorded_in_the_volume() -> Result<()> {
    let logs = capture_logs();
    let fixture = Fixture::volume().await?;
    sftp_scenario(&fixture, &logs).await?;
    fixture.gateway.stop().await
}

#[tokio::test]
async fn sftp_operations_on_a_bucket_are_recorded_in_the_bucket() -> Result<()> {
    let logs = capture_logs();
    let fixture = Fixture::bucket("audit-sftp").await?;
    sftp_scenario(&fixture, &logs).await?;
    fixture.gateway.stop().await
}

/// The same operations as [`SFTP_SCENARIO`], with curl over explicit FTPS.
async fn ftps_scenario(fixture: &Fixture) -> Result<()> {
    let scratch = fixture.gateway.scratch("curl");
    let source = scratch.join("report.bin");
    let sha = random_file(&source, 2 * 1024 * 1024 + 5, 3)?;
    let size = std::fs::metadata(&source)?.len();
    let clients = fixture.ftp(USER, PASSWORD);

    let mut upload = clients.curl();
    upload
        .arg("-T")
        .arg(&source)
        .arg(fixture.ftp_url("/report.bin")?);
    succeed(upload).await?;
    let back = scratch.join("back.bin");
    let mut download = clients.curl();
    download
        .arg("-o")
        .arg(&back)
        .arg(fixture.ftp_url("/report.bin")?);
    succeed(download).await?;
    ensure!(
        sha256_hex(&std::fs::read(&back)?) == sha,
        "the download differs"
    );
    let mut changes = clients.curl();
    changes
        .args([
            "-Q",
            "MKD /inbox",
            "-Q",
            "RNFR /report.bin",
            "-Q",
            "RNTO /inbox/r.bin",
        ])
        .args(["-Q", "DELE /inbox/r.bin", "-Q", "RMD /inbox"])
        .arg(fixture.ftp_url("/")?);
    succeed(changes).await?;

    // Small: curl stops reading replies if the refused data connection breaks its write.
    let small = scratch.join("small.txt");
    std::fs::write(&small, "refused")?;
    let mut refused = fixture.ftp(READER, READER_PASSWORD).curl();
    refused
        .arg("-v")
        .arg("-T")
        .arg(&small)
        .arg(fixture.ftp_url("/x.bin")?);
    let output = run(refused).await?;
    let verbose = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success(), "the read-only upload succeeded");
    ensure!(
        verbose.contains("550 permission denied: the Write permission is not granted"),
        "{verbose}"
    );
    let mut bad = fixture.ftp(USER, WRONG_PASSWORD).curl();
    bad.arg(fixture.ftp_url("/")?);
    ensure!(
        !run(bad).await?.status.success(),
        "a wrong password logged in"
    );

    let records = fixture
        .records_when(1, |r| {
            r.operation == Operation::Login && r.decision == Decision::Denied
        })
        .await?;
    check_common(fixture, &records, AuditProtocol::Ftps)?;
    let summaries: Vec<Summary> = records.iter().map(summary).collect();
    use Decision::{Allowed, Denied};
    use Operation::*;
    let expected = [
        op(USER, Login, None, None, None, Allowed),
        op(USER, Upload, Some("/report.bin"), None, Some(size), Allowed),
        op(USER, Login, None, None, None, Allowed),
        op(
            USER,
            Download,
            Some("/report.bin"),
            None,
            Some(size),
            Allowed,
        ),
        op(USER, Login, None, None, None, Allowed),
        op(USER, Mkdir, Some("/inbox"), None, None, Allowed),
        op(
            USER,
            Rename,
            Some("/report.bin"),
            Some("/inbox/r.bin"),
            None,
            Allowed,
        ),
        op(USER, Delete, Some("/inbox/r.bin"), None, None, Allowed),
        op(USER, Rmdir, Some("/inbox"), None, None, Allowed),
        op(READER, Login, None, None, None, Allowed),
        op(READER, Upload, Some("/x.bin"), None, None, Denied),
        op(USER, Login, None, None, None, Denied),
    ];
    ensure!(summaries == expected, "records: {summaries:#?}");
    ensure!(
        records[1].sha256.as_deref() == Some(sha.as_str()),
        "{:?}",
        records[1]
    );
    ensure!(records[11].error.as_deref() == Some("wrong password"));
    Ok(())
}

#[tokio::test]
async fn ftps_operations_on_a_volume_are_recorded_in_the_volume() -> Result<()> {
    let fixture = Fixture::volume().await?;
    ftps_scenario(&fixture).await?;
    fixture.gateway.stop().await
}

#[tokio::test]
async fn ftps_operations_on_a_bucket_are_recorded_in_the_bucket() -> Result<()> {
    let fixture = Fixture::bucket("audit-ftps").await?;
    ftps_scenario(&fixture).await?;
    fixture.gateway.stop().await
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn compliant() -> ResidencyStamp {
    ResidencyStamp {
        compliant: true,
        enforced: true,
        suspended: false,
        policies: vec!["mainland-china".into()],
        violation: None,
        cross_border_transfers: vec![],
    }
}

const VIOLATION: &str =
    "policy mainland-china: region eu-central-1 is not an allowed region (rule Region)";

fn non_compliant() -> ResidencyStamp {
    ResidencyStamp {
        compliant: false,
        suspended: true,
        violation: Some(VIOLATION.into()),
        ..compliant()
    }
}

fn allowance(expires: i64, max_bytes: Option<u64>) -> CrossBorderStamp {
    CrossBorderStamp {
        policy: "mainland-china".into(),
        enforced: true,
        reference: REFERENCE.into(),
        region: "eu-central-1".into(),
        expires,
        max_bytes,
        max_individuals: Some(1000),
    }
}

/// Waits until `text` has been logged `count` times (the configuration is polled every
/// 200 ms in tests).
async fn logged(logs: &CapturedLogs, text: &str, count: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while logs.text().matches(text).count() < count {
        ensure!(
            Instant::now() < deadline,
            "never logged {text:?}:\n{}",
            logs.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Logged in before writes are suspended: uploads a file, starts a second upload, then
/// waits for the test to suspend writes and tries everything again.
const SUSPENSION_SCENARIO: &str = r#"
import time
t, sftp = connect()
with sftp.open("kept.txt", "wb") as f:
    f.write(b"stored before the suspension")
inflight = sftp.open("inflight.bin", "wb")
inflight.write(b"a" * 1000)
inflight.flush()
open(os.environ["READY"], "w").close()
while not os.path.exists(os.environ["GO"]):
    time.sleep(0.05)
def upload():
    with sftp.open("new.txt", "wb") as f:
        f.write(b"new")
def finish_inflight():
    inflight.write(b"b" * 1000)
    inflight.close()
result = {
    "inflight": attempt(finish_inflight),
    "upload": attempt(upload),
    "delete": attempt(lambda: sftp.remove("kept.txt")),
    "rename": attempt(lambda: sftp.rename("kept.txt", "moved.txt")),
    "mkdir": attempt(lambda: sftp.mkdir("dir")),
    "download": attempt(lambda: sftp.open("kept.txt", "rb").read().decode()),
    "list": attempt(lambda: sorted(sftp.listdir("."))),
}
print(json.dumps(result))
"#;

#[tokio::test]
async fn a_gateway_that_falls_out_of_compliance_refuses_writes_and_serves_reads() -> Result<()> {
    let logs = capture_logs();
    let fixture = Fixture::volume().await?;
    let gateway = &fixture.gateway;
    gateway.set_residency(compliant())?;
    let scratch = gateway.scratch("suspension");
    let (ready, go) = (scratch.join("ready"), scratch.join("go"));

    let mut command = paramiko_command(gateway.addr, USER, PASSWORD, SUSPENSION_SCENARIO);
    command.env("READY", &ready).env("GO", &go);
    let client = tokio::spawn(run_json(command));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        ensure!(Instant::now() < deadline, "the client never got ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gateway.set_residency(non_compliant())?;
    logged(&logs, "Writes are suspended", 1).await?;
    std::fs::write(&go, "")?;
    let result = client.await??;

    let reason = format!("writes are suspended: {VIOLATION}");
    // paramiko ignores a failed CLOSE, so the in-flight upload is checked on the volume
    // and in the audit log below.
    for operation in ["upload", "delete", "rename", "mkdir"] {
        let refused = &result[operation];
        ensure!(refused["errno"] == 13, "{operation}: {result}");
        let message = refused["message"].as_str().unwrap_or_default();
        ensure!(
            message == format!("[Errno 13] {reason}"),
            "{operation}: {message}"
        );
    }
    ensure!(
        result["download"]["ok"] == "stored before the suspension",
        "{result}"
    );
    ensure!(
        result["list"]["ok"] == serde_json::json!(["kept.txt"]),
        "{result}"
    );
    let home = gateway.data().join(USER);
    ensure!(!home.join("inflight.bin").exists() && !home.join("new.txt").exists());

    // FTPS, in a session that starts now: the reply carries the reason.
    let clients = fixture.ftp(USER, PASSWORD);
    let source = scratch.join("ftp.txt");
    std::fs::write(&source, "ftp upload")?;
    let mut upload = clients.curl();
    upload
        .arg("-v")
        .arg("-T")
        .arg(&source)
        .arg(fixture.ftp_url("/ftp.txt")?);
    let output = run(upload).await?;
    let verbose = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success(),
        "an upload succeeded while suspended"
    );
    // Refused as the answer to STOR, before any data is sent.
    ensure!(
        verbose.contains(&format!("< 550 {reason}")) && !verbose.contains("< 150"),
        "{verbose}"
    );
    let mut rename = clients.curl();
    rename
        .args(["-v", "-Q", "RNFR /kept.txt", "-Q", "RNTO /moved.txt"])
        .arg(fixture.ftp_url("/")?);
    let output = run(rename).await?;
    let verbose = String::from_utf8_lossy(&output.stderr);
    ensure!(verbose.contains(&format!("550 {reason}")), "{verbose}");
    let mut download = clients.curl();
    download.arg(fixture.ftp_url("/kept.txt")?);
    ensure!(succeed(download).await? == "stored before the suspension");

    let denied = |r: &AuditRecord| {
        r.decision == Decision::Denied && r.error.as_deref() == Some(reason.as_str())
    };
    let records = fixture.records_when(7, denied).await?;
    let refused: Vec<(Operation, Option<String>)> = records
        .iter()
        .filter(|r| denied(r))
        .map(|r| (r.operation, r.path.clone()))
        .collect();
    let path = |p: &str| Some(p.to_owned());
    let expected = vec![
        (Operation::Upload, path("/inflight.bin")),
        (Operation::Upload, path("/new.txt")),
        (Operation::Delete, path("/kept.txt")),
        (Operation::Rename, path("/kept.txt")),
        (Operation::Mkdir, path("/dir")),
        (Operation::Upload, path("/ftp.txt")),
        (Operation::Rename, path("/kept.txt")),
    ];
    ensure!(refused == expected, "{refused:#?}");

    // Compliant again: writes work, also in a session that was never disconnected.
    gateway.set_residency(compliant())?;
    logged(&logs, "Writes are accepted again", 1).await?;
    let written = paramiko(
        gateway.addr,
        USER,
        PASSWORD,
        "t, sftp = connect()\nsftp.mkdir('dir')\nprint(json.dumps(sorted(sftp.listdir('.'))))",
    )
    .await?;
    ensure!(
        written == serde_json::json!(["dir", "kept.txt"]),
        "{written}"
    );
    fixture.gateway.stop().await
}

const UPLOAD_600: &str = r#"
t, sftp = connect()
def upload(name):
    with sftp.open(name, "wb") as f:
        f.write(b"z" * 600)
    return name
print(json.dumps([attempt(lambda: upload(n)) for n in ["one", "two", "three"]]))
"#;

#[tokio::test]
async fn an_expired_cross_border_allowance_refuses_uploads() -> Result<()> {
    let logs = capture_logs();
    let fixture = Fixture::volume().await?;
    let gateway = &fixture.gateway;
    gateway.set_residency(ResidencyStamp {
        cross_border_transfers: vec![allowance(unix_now() - 60, None)],
        ..compliant()
    })?;
    logged(&logs, "Writes are suspended", 1).await?;

    let result = paramiko(gateway.addr, USER, PASSWORD, UPLOAD_600).await?;
    let reason = format!(
        "writes are suspended: cross-border transfer {REFERENCE} to eu-central-1 has expired"
    );
    for attempt in result.as_array().context("no list")? {
        ensure!(attempt["errno"] == 13, "{result}");
        ensure!(
            attempt["message"] == format!("[Errno 13] {reason}"),
            "{result}"
        );
    }
    let records = fixture
        .records_when(3, |r| r.error.as_deref() == Some(reason.as_str()))
        .await?;
    ensure!(
        records
            .iter()
            .filter(|r| r.operation == Operation::Upload)
            .all(|r| r.decision == Decision::Denied),
        "{records:#?}"
    );
    fixture.gateway.stop().await
}

#[tokio::test]
async fn uploads_are_refused_once_the_volume_limit_is_reached_over_all_pods() -> Result<()> {
    let logs = capture_logs();
    let fixture = Fixture::volume().await?;
    let gateway = &fixture.gateway;
    // Another pod of the server has counted 500 bytes under the allowance already.
    let usage = gateway
        .data()
        .join(format!("{AUDIT_DIR}/usage/{REFERENCE}"));
    std::fs::create_dir_all(&usage)?;
    let other = serde_json::json!({
        "reference": REFERENCE, "pod": "sftp-gateway-1", "bytes": 500,
        "updated": "2026-01-01T00:00:00.000Z",
    });
    std::fs::write(usage.join("sftp-gateway-1.json"), other.to_string())?;
    gateway.set_residency(ResidencyStamp {
        cross_border_transfers: vec![allowance(unix_now() + 3600, Some(1000))],
        ..compliant()
    })?;
    logged(&logs, "Reloaded configuration", 1).await?;

    let result = paramiko(gateway.addr, USER, PASSWORD, UPLOAD_600).await?;
    ensure!(
        result[0]["ok"] == "one",
        "500 + 0 is under the limit: {result}"
    );
    let reason = format!(
        "upload refused: cross-border transfer {REFERENCE} to eu-central-1 has reached its \
         volume limit of 1000 bytes"
    );
    for refused in [&result[1], &result[2]] {
        ensure!(refused["errno"] == 13, "{result}");
        ensure!(
            refused["message"] == format!("[Errno 13] {reason}"),
            "{result}"
        );
    }

    let records = fixture
        .records_when(2, |r| r.error.as_deref() == Some(reason.as_str()))
        .await?;
    let uploads: Vec<_> = records
        .iter()
        .filter(|r| r.operation == Operation::Upload)
        .map(|r| {
            (
                r.path.clone().unwrap_or_default(),
                r.decision,
                r.reference.clone(),
            )
        })
        .collect();
    let counted = Some(REFERENCE.to_owned());
    ensure!(
        uploads
            == [
                ("/one".into(), Decision::Allowed, counted),
                ("/two".into(), Decision::Denied, None),
                ("/three".into(), Decision::Denied, None),
            ],
        "{uploads:#?}"
    );
    let own: Value = serde_json::from_slice(&std::fs::read(usage.join(format!("{POD}.json")))?)?;
    ensure!(own["bytes"] == 600 && own["pod"] == POD, "{own}");
    fixture.gateway.stop().await
}

#[tokio::test]
async fn while_the_audit_log_cannot_be_written_writes_fail_and_nothing_is_lost() -> Result<()> {
    let logs = capture_logs();
    let fixture = Fixture::volume().await?;
    let gateway = &fixture.gateway;
    let first = paramiko(
        gateway.addr,
        USER,
        PASSWORD,
        "t, sftp = connect()\nsftp.mkdir('before')\nprint(json.dumps(True))",
    )
    .await?;
    ensure!(first == true);
    let before = fixture.records().await?;

    let script = r#"
t, sftp = connect()
open(os.environ["READY"], "w").close()
while not os.path.exists(os.environ["BROKEN"]):
    time.sleep(0.05)
def upload(name):
    with sftp.open(name, "wb") as f:
        f.write(b"during")
first = attempt(lambda: sftp.mkdir("during"))
second = attempt(lambda: upload("refused.txt"))
open(os.environ["FAILED"], "w").close()
while not os.path.exists(os.environ["GO"]):
    time.sleep(0.05)
third = attempt(lambda: upload("after.txt"))
print(json.dumps({"first": first, "second": second, "third": third}))
"#;
    let scratch = gateway.scratch("failure");
    let [ready, broken, failed, go] = ["ready", "broken", "failed", "go"].map(|f| scratch.join(f));
    let script = format!("import time\n{script}");
    let mut command = paramiko_command(gateway.addr, USER, PASSWORD, &script);
    command
        .env("READY", &ready)
        .env("BROKEN", &broken)
        .env("FAILED", &failed)
        .env("GO", &go);
    let client = tokio::spawn(run_json(command));
    wait_for_file(&ready).await?;
    // Its login is durable; now the day's directory becomes a plain file: the log cannot
    // be appended to, even by root, until it is put back.
    let before_break = fixture
        .records_when(2, |r| r.operation == Operation::Login)
        .await?;
    ensure!(before_break[..before.len()] == before[..]);
    let day = volume_logs(&gateway.data())?
        .pop()
        .and_then(|file| file.parent().map(Path::to_owned))
        .context("no day directory")?;
    let aside = gateway.data().join(AUDIT_DIR).join("aside");
    std::fs::rename(&day, &aside)?;
    std::fs::write(&day, "in the way")?;
    std::fs::write(&broken, "")?;
    wait_for_file(&failed).await?;
    std::fs::remove_file(&day)?;
    std::fs::rename(&aside, &day)?;
    logged(&logs, "Audit log writable again", 1).await?;
    std::fs::write(&go, "")?;
    let result = client.await??;

    // The mkdir ran but could not be confirmed; the upload was not even started.
    for step in ["first", "second"] {
        let message = result[step]["message"].as_str().unwrap_or_default();
        ensure!(
            message.contains("audit log unavailable"),
            "{step}: {result}"
        );
    }
    ensure!(
        result["third"] == serde_json::json!({"ok": null}),
        "{result}"
    );
    let message = result["second"]["message"].as_str().unwrap_or_default();
    ensure!(
        message == "audit log unavailable; try again later",
        "{result}"
    );

    let records = fixture
        .records_when(1, |r| r.path.as_deref() == Some("/after.txt"))
        .await?;
    ensure!(
        records[..before_break.len()] == before_break[..],
        "earlier records changed"
    );
    let after: Vec<(Operation, Option<String>, Decision)> = records[before_break.len()..]
        .iter()
        .filter(|r| r.operation != Operation::Login)
        .map(|r| (r.operation, r.path.clone(), r.decision))
        .collect();
    let path = |p: &str| Some(p.to_owned());
    ensure!(
        after
            == [
                (Operation::Mkdir, path("/during"), Decision::Allowed),
                (Operation::Upload, path("/refused.txt"), Decision::Denied),
                (Operation::Upload, path("/after.txt"), Decision::Allowed),
            ],
        "{after:#?}"
    );
    let after = records
        .iter()
        .find(|r| r.path.as_deref() == Some("/after.txt"));
    ensure!(
        after.and_then(|r| r.sha256.as_deref()) == Some(sha256_hex(b"during").as_str()),
        "{after:?}"
    );
    ensure!(
        logs.text().contains("Audit log failing"),
        "the failure was not logged"
    );
    let home = gateway.data().join(USER);
    ensure!(home.join("during").is_dir() && !home.join("refused.txt").exists());
    fixture.gateway.stop().await
}

async fn wait_for_file(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        ensure!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test]
async fn with_stdout_on_records_are_json_lines_on_stdout_and_flushed_on_sigterm() -> Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

    let dir = tempfile::tempdir()?;
    let keys = support::gateway::write_host_keys(dir.path())?;
    let mut config = support::gateway::config(users(), None, None);
    config.audit.stdout = true;
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, serde_json::to_vec(&config)?)?;
    let data = dir.path().join("data");
    let pod = "stdout-gateway-0";

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "--log-format",
            "json",
            "gateway",
            "--sftp-listen",
            "127.0.0.1:0",
        ])
        .args(["--pod-name", pod, "--config"])
        .arg(&config_path)
        .arg("--host-keys")
        .arg(&keys)
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdout = child.stdout.take().context("no stdout")?;
    let collected = tokio::spawn(async move {
        let mut text = String::new();
        stdout.read_to_string(&mut text).await.map(|_| text)
    });
    let mut lines = BufReader::new(child.stderr.take().context("no stderr")?).lines();
    let addr: std::net::SocketAddr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            let event: Value = serde_json::from_str(&line).unwrap_or_default();
            if event["message"] == "Gateway listening" {
                let sftp = event["sftp"].as_str().unwrap_or_default();
                return Ok(sftp.parse()?);
            }
        }
        bail!("the gateway exited before listening")
    })
    .await
    .context("the gateway did not start within 30 s")??;
    let stderr = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push(line);
        }
        rest
    });

    let script = "t, sftp = connect()\nwith sftp.open('s.txt', 'wb') as f:\n    f.write(b'out')\n\
                  print(json.dumps(True))";
    ensure!(paramiko(addr, USER, PASSWORD, script).await? == true);
    let pid = nix::unistd::Pid::from_raw(child.id().context("exited early")? as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    ensure!(status.success(), "the gateway exited with {status}");
    let printed = collected.await??;
    let stderr = stderr.await?;
    ensure!(
        stderr.iter().any(|l| l.contains("Audit log flushed")),
        "{stderr:#?}"
    );

    let records: Vec<AuditRecord> = printed
        .lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("not a record: {line:?}")))
        .collect::<Result<_>>()?;
    let summaries: Vec<_> = records
        .iter()
        .map(|r| (r.operation, r.pod.as_str()))
        .collect();
    ensure!(
        summaries == [(Operation::Login, pod), (Operation::Upload, pod)],
        "{printed}"
    );
    ensure!(records[1].sha256.as_deref() == Some(sha256_hex(b"out").as_str()));
    // Standard output carries exactly what the volume holds.
    let mut stored = String::new();
    for day in std::fs::read_dir(data.join(AUDIT_DIR))?.flatten() {
        let file = day.path().join(format!("{pod}.jsonl"));
        if file.is_file() {
            stored.push_str(&std::fs::read_to_string(file)?);
        }
    }
    ensure!(stored == printed, "stdout:\n{printed}\nvolume:\n{stored}");
    Ok(())
}

/// A failed SFTP login with a 200,000-byte user name, a failed FTPS login with a user
/// name as long as a command line allows, and a refused mkdir of a 5,000-byte path.
const HUGE_STRINGS: &str = r#"
import ftplib, ssl
t = paramiko.Transport((os.environ["SLUICE_HOST"], int(os.environ["SLUICE_PORT"])))
t.start_client()
sftp_login = attempt(lambda: t.auth_password("u" * 200000, "wrong"))
t.close()
t2, reader = connect(user="reader", password=os.environ["READER_PASSWORD"])
mkdir = attempt(lambda: reader.mkdir("/" + "d" * 5000))
t2.close()
f = ftplib.FTP_TLS(context=ssl.create_default_context(cafile=os.environ["CA"]), timeout=20)
f.connect("127.0.0.1", int(os.environ["FTPS_PORT"]))
f.auth()
ftps_login = attempt(lambda: f.login("v" * 7000, "wrong"))
print(json.dumps({"sftp": sftp_login, "mkdir": mkdir, "ftps": ftps_login}))
"#;

/// Whatever a client sends, its record stays small: the user name of a failed login and
/// the path of a refused operation are cut with a visible marker (the original length
/// and the start of its SHA-256), `truncated` names what was cut, and a name longer than
/// any login is refused as such without a password check.
#[tokio::test]
async fn strings_a_client_chooses_are_cut_in_records_with_a_visible_marker() -> Result<()> {
    let fixture = Fixture::volume().await?;
    let gateway = &fixture.gateway;
    let mut command = paramiko_command(gateway.addr, USER, PASSWORD, HUGE_STRINGS);
    command
        .env("READER_PASSWORD", READER_PASSWORD)
        .env("CA", gateway.ca_file())
        .env("FTPS_PORT", gateway.ftps_addr()?.port().to_string());
    let result = run_json(command).await?;
    for attempt in ["sftp", "mkdir", "ftps"] {
        ensure!(result[attempt].get("error").is_some(), "{result}");
    }

    let cut = |r: &AuditRecord| !r.truncated.is_empty();
    let records = fixture.records_when(3, cut).await?;
    let marker = |original: usize| format!("…[truncated from {original} bytes, sha256:");
    let logins: Vec<&AuditRecord> = records
        .iter()
        .filter(|r| r.operation == Operation::Login && cut(r))
        .collect();
    ensure!(logins.len() == 2, "{records:#?}");
    for (login, (protocol, length)) in logins
        .iter()
        .zip([(AuditProtocol::Sftp, 200_000), (AuditProtocol::Ftps, 7000)])
    {
        ensure!(login.protocol == protocol, "{login:?}");
        ensure!(login.decision == Decision::Denied, "{login:?}");
        ensure!(
            login.error.as_deref() == Some("user name too long"),
            "{login:?}"
        );
        ensure!(login.truncated == ["user"], "{login:?}");
        ensure!(
            login.user.len() <= 256 && login.user.contains(&marker(length)),
            "{login:?}"
        );
    }
    let mkdir = records
        .iter()
        .find(|r| r.operation == Operation::Mkdir)
        .context("no mkdir record")?;
    ensure!(
        mkdir.user == READER && mkdir.decision == Decision::Denied,
        "{mkdir:?}"
    );
    let path = mkdir.path.as_deref().unwrap_or_default();
    ensure!(
        path.starts_with("/ddd") && path.contains(&marker(5001)) && path.len() <= 1024,
        "{mkdir:?}"
    );
    ensure!(mkdir.truncated == ["path"], "{mkdir:?}");

    for file in volume_logs(&gateway.data())? {
        for line in std::fs::read_to_string(file)?.lines() {
            ensure!(line.len() < 4096, "a record of {} bytes", line.len());
        }
    }
    fixture.gateway.stop().await
}

/// Tries an upload, a mkdir and a download as the full user in a new session; the login
/// itself must succeed.
const WRITE_AND_READ: &str = r#"
import io
t, sftp = connect()
r = {
    "upload": attempt(lambda: sftp.putfo(io.BytesIO(b"new"), "new.txt", confirm=False) and None),
    "mkdir": attempt(lambda: sftp.mkdir("dir")),
    "download": attempt(lambda: sftp.open("kept.txt").read().decode()),
}
print(json.dumps(r))
"#;

/// Writes `content` as the configuration the way the kubelet swaps a mounted Secret.
fn write_raw_config(gateway: &TestGateway, content: &[u8]) -> Result<()> {
    let staged = gateway.config_path().with_extension("raw");
    std::fs::write(&staged, content)?;
    std::fs::rename(&staged, gateway.config_path())?;
    Ok(())
}

/// A configuration the gateway cannot parse may be the one that suspends writes: an
/// operator newer than the gateway stamps `suspended` next to a field this gateway's
/// `deny_unknown_fields` refuses. While the latest file cannot be parsed or read, writes
/// are refused with a reason saying so, logins and reads go on under the last valid
/// configuration, and a valid file ends it.
#[tokio::test]
async fn writes_are_refused_while_the_latest_configuration_cannot_be_used() -> Result<()> {
    let logs = capture_logs();
    let fixture = Fixture::volume().await?;
    let gateway = &fixture.gateway;
    paramiko(
        gateway.addr,
        USER,
        PASSWORD,
        "import io\nt, sftp = connect()\nsftp.putfo(io.BytesIO(b'kept'), 'kept.txt')\n\
         print(json.dumps({}))",
    )
    .await?;

    let mut newer: Value = serde_json::from_slice(&std::fs::read(gateway.config_path())?)?;
    newer["residency"]["compliant"] = false.into();
    newer["residency"]["suspended"] = true.into();
    newer["residency"]["violation"] = VIOLATION.into();
    newer["residency"]["suspendedSince"] = "2026-12-04T22:22:04Z".into();
    write_raw_config(gateway, &serde_json::to_vec(&newer)?)?;
    logged(&logs, "Writes are suspended", 1).await?;

    let invalid = "writes are suspended: the latest gateway configuration is not valid";
    let check = |result: &Value, reason: &str| -> Result<()> {
        for write in ["upload", "mkdir"] {
            ensure!(
                result[write]["message"] == format!("[Errno 13] {reason}"),
                "{write}: {result}"
            );
        }
        ensure!(result["download"]["ok"] == "kept", "{result}");
        Ok(())
    };
    let result = paramiko(gateway.addr, USER, PASSWORD, WRITE_AND_READ).await?;
    check(&result, invalid)?;
    let source = gateway.scratch("ftp").join("ftp.txt");
    std::fs::write(&source, "ftp upload")?;
    let mut upload = fixture.ftp(USER, PASSWORD).curl();
    upload
        .arg("-v")
        .arg("-T")
        .arg(&source)
        .arg(fixture.ftp_url("/ftp.txt")?);
    let output = run(upload).await?;
    let verbose = String::from_utf8_lossy(&output.stderr);
    ensure!(verbose.contains(&format!("550 {invalid}")), "{verbose}");

    // The file is gone for a while: refused still, because it cannot be read.
    std::fs::remove_file(gateway.config_path())?;
    logged(&logs, "Writes are suspended", 2).await?;
    let unreadable = "writes are suspended: the gateway configuration cannot be read";
    let result = paramiko(gateway.addr, USER, PASSWORD, WRITE_AND_READ).await?;
    check(&result, unreadable)?;

    // A valid file, from an operator of the gateway's own version, ends it.
    gateway.set_residency(ResidencyStamp {
        enforced: false,
        policies: vec![],
        ..compliant()
    })?;
    logged(&logs, "Writes are accepted again", 1).await?;
    let result = paramiko(gateway.addr, USER, PASSWORD, WRITE_AND_READ).await?;
    ensure!(result["upload"].get("ok").is_some(), "{result}");
    ensure!(result["mkdir"].get("ok").is_some(), "{result}");
    let home = gateway.data().join(USER);
    ensure!(!home.join("ftp.txt").exists(), "the FTPS upload was stored");

    let refused = |r: &AuditRecord| {
        r.decision == Decision::Denied
            && [invalid, unreadable].contains(&r.error.as_deref().unwrap_or_default())
    };
    let records = fixture.records_when(5, refused).await?;
    let operations: Vec<Operation> = records
        .iter()
        .filter(|r| refused(r))
        .map(|r| r.operation)
        .collect();
    use Operation::{Mkdir, Upload};
    ensure!(
        operations == [Upload, Mkdir, Upload, Upload, Mkdir],
        "{operations:?}"
    );
    fixture.gateway.stop().await
}
