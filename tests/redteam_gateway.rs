//! Red-team findings against the gateway's confinement and its audit evidence: real
//! clients (paramiko) against a gateway on 127.0.0.1, on a volume or on a real SeaweedFS
//! (`support::s3`), and what was stored checked on the storage itself. Each test asserts
//! the right behaviour; those that fail demonstrate a hole.

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use sluice::gateway::config::GatewayUser;
use sluice::storage::AUDIT_DIR;

use support::gateway::{ALL, POD, TestGateway, paramiko, password_user};
use support::s3::{SeaweedFs, audit_keys};

const USER: &str = "ops";
const PASSWORD: &str = "Red-Team-Staple-Lamp-3";
const PREFIX: &str = "gateways/ops/";

/// A user whose home is the root of the storage: the one who is closest to the reserved
/// directories and must still never reach them.
fn root_user() -> GatewayUser {
    let mut user = password_user(USER, PASSWORD, ALL);
    user.home = "/".into();
    user
}

/// SeaweedFS, an S3-compatible store the project itself tests against, stores a key with
/// a backslash as if the backslash were a slash. The gateway checks `.sluice-audit` only
/// as the first `/`-separated component of the key, so `\.sluice-audit\...` passes the
/// check and lands in the audit directory: a user whose home is the root can forge audit
/// records, read the gateway's own, and delete them.
#[tokio::test]
async fn a_user_at_the_bucket_root_cannot_reach_the_audit_log_through_backslashes() -> Result<()> {
    let weed = SeaweedFs::shared()?;
    let name = weed.bucket("backslash")?;
    let bucket = weed.bucket_operator(&name)?;
    let gateway = TestGateway::start_object_store(
        vec![root_user()],
        None,
        weed.config(&name, PREFIX),
        &weed.credentials(),
    )
    .await?;

    // A first session, so that the gateway writes audit records of its own.
    paramiko(
        gateway.addr,
        USER,
        PASSWORD,
        "t, sftp = connect()\nsftp.putfo(__import__('io').BytesIO(b'x'), '/seed.txt')\n\
         print(json.dumps({}))",
    )
    .await?;
    let genuine = wait_for_audit_object(&bucket).await?;
    let genuine_path = genuine
        .strip_prefix(PREFIX)
        .context("audit key outside the prefix")?
        .replace('/', "\\");
    let day = genuine
        .split('/')
        .find(|c| c.len() == 10 && c.as_bytes()[4] == b'-')
        .context("no day in the audit key")?
        .to_owned();
    let forged_path = format!("\\{AUDIT_DIR}\\{day}\\{POD}\\235959.999-999999.jsonl");

    let script = format!(
        r#"
t, sftp = connect()
forged = b'{{"operation":"delete","user":"nobody","decision":"allowed"}}\n'
r = {{
  "forge": attempt(lambda: sftp.putfo(__import__('io').BytesIO(forged), {forged:?}, confirm=False) and None),
  "read": attempt(lambda: len(sftp.open({genuine:?}).read())),
  "delete": attempt(lambda: sftp.remove({genuine:?})),
}}
print(json.dumps(r))
"#,
        forged = format!("/{forged_path}"),
        genuine = format!("/{genuine_path}"),
    );
    let result = paramiko(gateway.addr, USER, PASSWORD, &script).await?;

    let keys = audit_keys(&bucket).await?;
    let forged_key = format!("{PREFIX}{AUDIT_DIR}/{day}/{POD}/235959.999-999999.jsonl");
    let mut breaches = Vec::new();
    if keys.contains(&forged_key) {
        breaches.push(format!("wrote {forged_key}"));
    }
    if result["read"].get("error").is_none() {
        breaches.push(format!("read {genuine}"));
    }
    if !keys.contains(&genuine) {
        breaches.push(format!("deleted {genuine}"));
    }
    ensure!(
        breaches.is_empty(),
        "through backslashes a client {} ({result})",
        breaches.join(", ")
    );
    gateway.stop().await
}

/// Waits until the gateway has written an audit object into the bucket; returns its key.
async fn wait_for_audit_object(bucket: &opendal::Operator) -> Result<String> {
    for _ in 0..50 {
        let keys = audit_keys(bucket).await?;
        if let Some(key) = keys.into_iter().find(|k| k.ends_with(".jsonl")) {
            return Ok(key);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the gateway wrote no audit object")
}

/// Anyone who can open a TCP connection can make the gateway store an audit record of a
/// failed login whose user name is as long as an SSH packet allows (hundreds of KiB),
/// many times per connection and connection after connection, so that the region-pinned
/// storage fills up; once the audit log cannot be written every upload, download and
/// change is refused for every user. A failed login's record must stay small whatever
/// the client sends.
#[tokio::test]
async fn a_failed_login_with_a_huge_user_name_leaves_a_small_audit_record() -> Result<()> {
    let gateway = TestGateway::start(vec![password_user(USER, PASSWORD, ALL)]).await?;
    let name_length = 200_000;
    let script = format!(
        r#"
t = paramiko.Transport((os.environ["SLUICE_HOST"], int(os.environ["SLUICE_PORT"])))
t.start_client()
r = attempt(lambda: t.auth_password("u" * {name_length}, "wrong"))
t.close()
print(json.dumps(r))
"#
    );
    let result = paramiko(gateway.addr, USER, PASSWORD, &script).await?;
    ensure!(
        result.get("error").is_some(),
        "the login succeeded: {result}"
    );

    // Failed logins are queued without waiting for the record to be written.
    let mut size = 0;
    for _ in 0..300 {
        size = audit_bytes(&gateway.data())?;
        if size > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(size > 0, "the failed login was not recorded");
    ensure!(
        size < 4096,
        "one failed login with a {name_length}-byte user name made the audit log \
         {size} bytes long"
    );
    gateway.stop().await
}

/// Bytes in every audit log file on the volume at `data`.
fn audit_bytes(data: &std::path::Path) -> Result<u64> {
    let mut total = 0;
    let Ok(days) = std::fs::read_dir(data.join(AUDIT_DIR)) else {
        return Ok(0);
    };
    for day in days.flatten() {
        for file in std::fs::read_dir(day.path())?.flatten() {
            total += file.metadata()?.len();
        }
    }
    Ok(total)
}

/// SETSTAT is accepted and ignored, which is harmless for modes and times but not for
/// the size: a client that truncates a file (paramiko `truncate`, `ftruncate` through
/// sshfs) is told it succeeded while the file keeps every byte. A size change must
/// either happen or fail.
#[tokio::test]
async fn truncating_a_file_through_setstat_truncates_it_or_fails() -> Result<()> {
    let gateway = TestGateway::start(vec![password_user(USER, PASSWORD, ALL)]).await?;
    let result = paramiko(
        gateway.addr,
        USER,
        PASSWORD,
        r#"
import io
t, sftp = connect()
sftp.putfo(io.BytesIO(b"secret data"), "/f.txt")
r = {"truncate": attempt(lambda: sftp.truncate("/f.txt", 0)),
     "size": sftp.stat("/f.txt").st_size}
print(json.dumps(r))
"#,
    )
    .await?;
    let truncated = result["size"] == 0;
    let refused = result["truncate"].get("error").is_some();
    ensure!(
        truncated || refused,
        "the client was told the file is truncated, and it still has {} bytes ({result})",
        result["size"]
    );
    gateway.stop().await
}

/// The FTPS front end takes the verb up to the first space and answers some verbs itself
/// (`PORT`, `PASV`, `STAT`, `SITE`, `PROT`, `AUTH`, ...) before passing the rest to
/// libunftp, which ends the verb at a space *or a carriage return*. `STAT\r` is therefore
/// not the front end's `STAT` and reaches libunftp, whose status reply describes the
/// gateway's internals (libunftp version, back-end type names, "ftps configured: false");
/// `PORT\r...` reaches libunftp too and is stopped only by libunftp's own setting. A verb
/// that is not a verb must be refused by the front end, never passed on.
#[tokio::test]
async fn a_command_whose_verb_holds_a_carriage_return_is_refused_not_passed_on() -> Result<()> {
    let gateway = TestGateway::start_ftps(
        vec![password_user(USER, PASSWORD, ALL)],
        support::gateway::ftps_settings(),
    )
    .await?;
    let script = r#"
import ftplib, json, os, ssl, sys
ctx = ssl.create_default_context(cafile=os.environ["CA"])
f = ftplib.FTP_TLS(context=ctx, timeout=20)
f.connect("127.0.0.1", int(os.environ["PORT"]))
f.login(os.environ["USER_NAME"], os.environ["PASSWORD"])
f.prot_p()
f.sock.sendall(b"STAT\r\r\n")
try:
    reply = f.getresp()
except ftplib.Error as e:
    reply = str(e)
print(json.dumps({"reply": reply}))
"#;
    let output = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .env("CA", gateway.ca_file())
        .env("PORT", gateway.ftps_addr()?.port().to_string())
        .env("USER_NAME", USER)
        .env("PASSWORD", PASSWORD)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .context("python did not finish")??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().context("python printed nothing")?;
    let reply: serde_json::Value = serde_json::from_str(last)?;
    let text = reply["reply"].as_str().unwrap_or_default();
    ensure!(
        !text.contains("libunftp") && !text.contains("VfsBackend"),
        "a smuggled STAT reached libunftp: {text:?}"
    );
    gateway.stop().await
}
