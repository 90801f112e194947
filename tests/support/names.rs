//! Names some backend would not keep as given (a backslash, which SeaweedFS stores as
//! `/`; control characters; noncharacters; a trailing dot), tried over SFTP (paramiko)
//! and FTPS (Python's ftplib) by a user whose home is the storage root: every upload,
//! mkdir and rename to such a name must be refused as an invalid file name. The caller
//! checks on the storage itself that nothing was created.

#![allow(dead_code)]

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use super::gateway::{TestGateway, paramiko_command};

/// A file every attempt renames or copies from, created first.
pub const SEED: &str = "seed.txt";

/// Names that pass a check of `/`-separated components and reach the reserved
/// directories on a store that reads `\` as `/`, or that a backend rewrites.
pub const UNFAITHFUL: &[&str] = &[
    "\\.sluice-audit\\2026-01-01\\forged.jsonl",
    "\\.sluice-uploads\\planted",
    "made\\without-mkdir",
    "trailing.",
    ".sluice-audit.",
    "non\u{fffe}character",
    "tab\there",
    "escape\u{1b}[31m",
    "next\u{85}line",
];

/// Whether FTP refuses `name` as a command line with a control character in it (500)
/// rather than as a file name (553).
fn is_control_line(name: &str) -> bool {
    name.chars().any(char::is_control)
}

const SFTP_SCRIPT: &str = r#"
import io
t, sftp = connect()
sftp.putfo(io.BytesIO(b"seed"), "/" + os.environ["SEED"])
r = {}
for name in json.loads(os.environ["NAMES"]):
    path = "/" + name
    r[name] = {
        "put": attempt(lambda: sftp.putfo(io.BytesIO(b"x"), path, confirm=False) and None),
        "mkdir": attempt(lambda: sftp.mkdir(path)),
        "rename": attempt(lambda: sftp.rename("/" + os.environ["SEED"], path)),
        "posix-rename": attempt(lambda: sftp.posix_rename("/" + os.environ["SEED"], path)),
        "stat": attempt(lambda: str(sftp.stat(path))),
    }
print(json.dumps(r))
"#;

const FTPS_SCRIPT: &str = r#"
import ftplib, io, json, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
f = ftplib.FTP_TLS(context=ctx, timeout=20)
f.connect("127.0.0.1", int(os.environ["PORT"]))
f.login(os.environ["USER_NAME"], os.environ["PASSWORD"])
f.prot_p()
seed = "/" + os.environ["SEED"]

def attempt(fn):
    try:
        return {"ok": str(fn())}
    except ftplib.Error as e:
        return {"error": str(e)}
    except OSError as e:
        # The data connection may be refused before the reply; take the reply.
        try:
            return {"error": f.getresp()}
        except ftplib.Error as e:
            return {"error": str(e)}

def raw(line):
    # ftplib refuses CR and LF in a command; control characters go through as they are.
    f.sock.sendall(line.encode("utf-8") + b"\r\n")
    try:
        return {"ok": f.getresp()}
    except ftplib.Error as e:
        return {"error": str(e)}

def rename(path):
    f.sendcmd("RNFR " + seed)
    return f.sendcmd("RNTO " + path)

r = {}
for name in json.loads(os.environ["NAMES"]):
    path = "/" + name
    r[name] = {
        "put": attempt(lambda: f.storbinary("STOR " + path, io.BytesIO(b"x"))),
        "mkdir": raw("MKD " + path),
        "rename": attempt(lambda: rename(path)),
        "size": raw("SIZE " + path),
    }
r["noop"] = f.voidcmd("NOOP")
print(json.dumps(r))
"#;

/// Tries every name of [`UNFAITHFUL`] over SFTP as `user`, whose home must be the root,
/// after uploading [`SEED`]; fails unless every attempt is refused as an invalid file
/// name.
pub async fn refused_over_sftp(gateway: &TestGateway, user: &str, password: &str) -> Result<()> {
    let mut command = paramiko_command(gateway.addr, user, password, SFTP_SCRIPT);
    command
        .env("SEED", SEED)
        .env("NAMES", serde_json::to_string(UNFAITHFUL)?);
    let results = run_json(command).await?;
    for name in UNFAITHFUL {
        let attempts = results[name].as_object().context("no results")?;
        for (what, outcome) in attempts {
            let message = outcome["message"].as_str().unwrap_or_default();
            ensure!(
                message.contains("invalid file name"),
                "SFTP {what} {name:?} was not refused as an invalid name: {outcome}"
            );
        }
    }
    Ok(())
}

/// Like [`refused_over_sftp`], over explicit FTPS: a name with a control character is
/// refused as a command line (500), any other as a file name (553).
pub async fn refused_over_ftps(gateway: &TestGateway, user: &str, password: &str) -> Result<()> {
    let mut command = tokio::process::Command::new("python3");
    command
        .arg("-c")
        .arg(FTPS_SCRIPT)
        .env("CA", gateway.ca_file())
        .env("PORT", gateway.ftps_addr()?.port().to_string())
        .env("USER_NAME", user)
        .env("PASSWORD", password)
        .env("SEED", SEED)
        .env("NAMES", serde_json::to_string(UNFAITHFUL)?)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    // The seed comes from SFTP: FTPS renames it.
    let seeded = paramiko_command(
        gateway.addr,
        user,
        password,
        "import io\nt, sftp = connect()\n\
         sftp.putfo(io.BytesIO(b'seed'), '/' + os.environ['SEED'])\nprint('{}')",
    )
    .env("SEED", SEED)
    .output()
    .await?;
    ensure!(seeded.status.success(), "{seeded:?}");
    let results = run_json(command).await?;
    for name in UNFAITHFUL {
        let attempts = results[name].as_object().context("no results")?;
        for (what, outcome) in attempts {
            let reply = outcome["error"].as_str().unwrap_or_default();
            let expected = match is_control_line(name) {
                true => reply.starts_with("500") && reply.contains("control character"),
                false => reply.starts_with("553") && reply.contains("invalid file name"),
            };
            ensure!(
                expected,
                "FTPS {what} {name:?} was not refused as expected: {outcome}"
            );
        }
    }
    ensure!(
        results["noop"]
            .as_str()
            .is_some_and(|r| r.starts_with("200"))
    );
    Ok(())
}

async fn run_json(mut command: tokio::process::Command) -> Result<Value> {
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .context("the client did not finish within 60 s")??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "the client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout
        .lines()
        .last()
        .context("the client printed nothing")?;
    serde_json::from_str(last).with_context(|| format!("the client printed {last:?}"))
}
