//! The SFTP gateway, started in-process on 127.0.0.1, against real clients: OpenSSH
//! `sftp` in batch mode and paramiko.

mod support;

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::json;
use sluice::api::Permission;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use support::gateway::{
    ALL, TestGateway, blocking, capture_logs, key_user, paramiko, paramiko_command, password_user,
};
use support::names;
use support::sftp::{Auth, SftpClient, generate_key, random_file, sha256_file};

const PASSWORD: &str = "Tr0ub4dor&3-correct-horse";

/// An OpenSSH `sftp` client for one user, run in batch mode.
#[derive(Clone)]
struct OpenSsh(Arc<SftpClient>);

impl OpenSsh {
    fn password(gateway: &TestGateway, user: &str, password: &str) -> Self {
        let auth = Auth::Password(password.to_owned());
        let client = SftpClient::new(gateway.addr, user, auth, &gateway.scratch(user))
            .expect("the scratch directory is writable");
        Self(Arc::new(client))
    }

    fn key(gateway: &TestGateway, user: &str, key: &Path) -> Result<Self> {
        let auth = Auth::Key(key.to_owned());
        let client = SftpClient::new(gateway.addr, user, auth, &gateway.scratch(user))?;
        Ok(Self(Arc::new(client)))
    }

    fn batch(&self, commands: &str) -> Result<Output> {
        self.0.batch(commands)
    }
}

/// Runs sftp batch `commands` without stalling the in-process gateway; returns stdout.
async fn sftp(client: &OpenSsh, commands: &str) -> Result<String> {
    let (client, batch) = (client.clone(), commands.to_owned());
    let output = blocking(move || client.batch(&batch)).await?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "sftp failed on {commands:?}:\n{stdout}\n{stderr}"
    );
    Ok(stdout)
}

/// The lines of sftp batch output that are not echoed commands.
fn listed(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|line| !line.starts_with("sftp>"))
        .map(str::trim)
        .collect()
}

/// Like [`sftp`], but expects the batch to fail; returns stderr.
async fn sftp_fails(client: &OpenSsh, commands: &str) -> Result<String> {
    let (client, batch) = (client.clone(), commands.to_owned());
    let output = blocking(move || client.batch(&batch)).await?;
    ensure!(
        !output.status.success(),
        "sftp unexpectedly succeeded with {commands:?}"
    );
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test]
async fn openssh_sftp_uploads_downloads_renames_and_removes_with_a_password() -> Result<()> {
    let logs = capture_logs();
    let gateway = TestGateway::start(vec![password_user("cucm", PASSWORD, ALL)]).await?;
    let client = OpenSsh::password(&gateway, "cucm", PASSWORD);
    let scratch = gateway.scratch("cucm");
    let local = scratch.join("report.bin");
    let size = 3 * 1024 * 1024 + 17;
    let sha = random_file(&local, size, 1)?;
    let back = scratch.join("back.bin");

    let listing = sftp(
        &client,
        &format!(
            "mkdir inbox\nput {} inbox/report.bin\nls -1 inbox\nget inbox/report.bin {}\n",
            local.display(),
            back.display()
        ),
    )
    .await?;
    ensure!(
        listed(&listing) == ["inbox/report.bin"],
        "ls did not show the upload:\n{listing}"
    );
    ensure!(
        sha256_file(&back)? == sha,
        "the download differs from the upload"
    );
    let stored = gateway.data().join("cucm/inbox/report.bin");
    ensure!(
        sha256_file(&stored)? == sha,
        "the stored file differs from the upload"
    );

    let listing = sftp(
        &client,
        "rename inbox/report.bin inbox/renamed.bin\nls -1 inbox\n",
    )
    .await?;
    ensure!(listed(&listing) == ["inbox/renamed.bin"], "{listing}");

    sftp(&client, "rm inbox/renamed.bin\nrmdir inbox\n").await?;
    let left: Vec<_> = std::fs::read_dir(gateway.data().join("cucm"))?.collect();
    ensure!(left.is_empty(), "the home directory is not empty: {left:?}");

    gateway.stop().await?;
    let text = logs.text();
    ensure!(
        text.contains("Logged in") && text.contains("method=\"password\""),
        "{text}"
    );
    ensure!(
        text.contains(&format!("bytes={size}")),
        "no transfer with its size:\n{text}"
    );
    ensure!(text.contains("Upload completed") && text.contains("Download completed"));
    Ok(())
}

#[tokio::test]
async fn openssh_sftp_logs_in_with_an_authorised_key_and_not_with_another() -> Result<()> {
    let logs = capture_logs();
    let keys = tempfile::tempdir()?;
    let (key, public) = generate_key(keys.path(), "ops")?;
    let (stranger, _) = generate_key(keys.path(), "stranger")?;
    let gateway = TestGateway::start(vec![key_user("ops", &public, ALL)]).await?;
    let scratch = gateway.scratch("ops");
    let local = scratch.join("note.txt");
    std::fs::write(&local, "key login\n")?;

    let client = OpenSsh::key(&gateway, "ops", &key)?;
    let listing = sftp(
        &client,
        &format!("put {} note.txt\nls -1\n", local.display()),
    )
    .await?;
    ensure!(listed(&listing) == ["note.txt"], "{listing}");
    ensure!(std::fs::read_to_string(gateway.data().join("ops/note.txt"))? == "key login\n");

    let impostor = OpenSsh(Arc::new(SftpClient::new(
        gateway.addr,
        "ops",
        Auth::Key(stranger),
        &gateway.scratch("impostor"),
    )?));
    let stderr = sftp_fails(&impostor, "ls\n").await?;
    ensure!(stderr.contains("Permission denied"), "{stderr}");

    gateway.stop().await?;
    let text = logs.text();
    ensure!(text.contains("method=\"publickey\""), "{text}");
    let warnings = logs.at_level("WARN");
    ensure!(
        warnings
            .iter()
            .any(|w| w.contains("Login failed") && w.contains("ops"))
    );
    Ok(())
}

#[tokio::test]
async fn a_wrong_password_is_refused_and_never_logged() -> Result<()> {
    let logs = capture_logs();
    let gateway = TestGateway::start(vec![password_user("cucm", PASSWORD, ALL)]).await?;
    let wrong = "Wr0ng-but-memorable-9f2c";
    let client = OpenSsh::password(&gateway, "cucm", wrong);

    let stderr = sftp_fails(&client, "ls\n").await?;
    ensure!(stderr.contains("Permission denied"), "{stderr}");
    ensure!(
        !gateway.data().join("cucm").exists(),
        "a refused login created the home"
    );

    gateway.stop().await?;
    let warnings = logs.at_level("WARN");
    let failed = warnings.iter().find(|w| w.contains("Login failed"));
    let failed = failed.with_context(|| format!("no failed-login warning: {warnings:?}"))?;
    ensure!(
        failed.contains("cucm") && failed.contains("peer=127.0.0.1"),
        "{failed}"
    );
    let text = logs.text();
    ensure!(
        !text.contains(wrong) && !text.contains(PASSWORD),
        "a password was logged"
    );
    ensure!(!text.contains("$argon2"), "a password hash was logged");
    Ok(())
}

#[tokio::test]
async fn a_user_without_write_permission_cannot_upload_but_can_download() -> Result<()> {
    let _logs = capture_logs();
    let reader = password_user("reader", PASSWORD, &[Permission::List, Permission::Read]);
    let gateway = TestGateway::start(vec![reader]).await?;
    std::fs::create_dir_all(gateway.data().join("reader"))?;
    std::fs::write(gateway.data().join("reader/existing.txt"), "published\n")?;
    let client = OpenSsh::password(&gateway, "reader", PASSWORD);
    let scratch = gateway.scratch("reader");
    let local = scratch.join("upload.bin");
    random_file(&local, 4096, 2)?;

    let stderr = sftp_fails(&client, &format!("put {} upload.bin\n", local.display())).await?;
    ensure!(stderr.contains("Permission denied"), "{stderr}");
    ensure!(!gateway.data().join("reader/upload.bin").exists());
    for refused in [
        "mkdir new\n",
        "rm existing.txt\n",
        "rename existing.txt moved.txt\n",
    ] {
        let stderr = sftp_fails(&client, refused).await?;
        ensure!(
            stderr.contains("Permission denied"),
            "{refused:?}: {stderr}"
        );
    }

    let copy = scratch.join("existing.txt");
    sftp(&client, &format!("get existing.txt {}\n", copy.display())).await?;
    ensure!(std::fs::read_to_string(copy)? == "published\n");
    gateway.stop().await
}

/// Case C05, first half: REALPATH answers relative to the user's home.
#[tokio::test]
async fn paramiko_realpath_answers_relative_to_the_home_directory() -> Result<()> {
    let _logs = capture_logs();
    let gateway = TestGateway::start(vec![password_user("cucm", PASSWORD, ALL)]).await?;

    let answers = paramiko(
        gateway.addr,
        "cucm",
        PASSWORD,
        r#"
t, sftp = connect()
print(json.dumps({p: sftp.normalize(p) for p in ["", ".", "/", "a/../b", "../../etc"]}))
"#,
    )
    .await?;
    let expected = json!({"": "/", ".": "/", "/": "/", "a/../b": "/b", "../../etc": "/etc"});
    ensure!(answers == expected, "REALPATH answered {answers}");
    gateway.stop().await
}

/// Case C05, second half: nothing resolves outside the user's home.
#[tokio::test]
async fn paths_never_resolve_outside_the_home_directory() -> Result<()> {
    let _logs = capture_logs();
    let users = vec![
        password_user("cucm", PASSWORD, ALL),
        password_user("other", PASSWORD, ALL),
    ];
    let gateway = TestGateway::start(users).await?;
    std::fs::create_dir_all(gateway.data().join("other"))?;
    std::fs::write(gateway.data().join("other/secret.txt"), "other tenant")?;
    std::fs::write(gateway.data().join("top-level.txt"), "volume root")?;

    let result = paramiko(
        gateway.addr,
        "cucm",
        PASSWORD,
        r#"
t, sftp = connect()
r = {}
r["passwd_before"] = attempt(lambda: sftp.open("../../etc/passwd").read().decode())
r["other_tenant"] = attempt(lambda: sftp.open("../other/secret.txt").read().decode())
r["volume_root"] = attempt(lambda: sftp.open("/../top-level.txt").read().decode())
r["list_up"] = attempt(lambda: sorted(sftp.listdir("../..")))
sftp.mkdir("/etc")
with sftp.open("../../etc/passwd", "w") as f:
    f.write("inside the home")
r["passwd_after"] = attempt(lambda: sftp.open("/../../etc/passwd").read().decode())
print(json.dumps(r))
"#,
    )
    .await?;

    for escape in ["passwd_before", "other_tenant", "volume_root"] {
        ensure!(result[escape]["errno"] == 2, "{escape}: {}", result[escape]);
    }
    ensure!(
        result["list_up"]["ok"] == json!([]),
        "listing .. showed {}",
        result["list_up"]
    );
    ensure!(
        result["passwd_after"]["ok"] == "inside the home",
        "{}",
        result["passwd_after"]
    );
    let written = gateway.data().join("cucm/etc/passwd");
    ensure!(std::fs::read_to_string(written)? == "inside the home");
    gateway.stop().await
}

/// Case C05: a symlink planted on the volume, pointing outside, is not followed.
#[tokio::test]
async fn a_symlink_planted_in_the_volume_is_not_followed() -> Result<()> {
    let _logs = capture_logs();
    let gateway = TestGateway::start(vec![password_user("cucm", PASSWORD, ALL)]).await?;
    let outside = tempfile::tempdir()?;
    std::fs::write(outside.path().join("secret.txt"), "outside the volume")?;
    let home = gateway.data().join("cucm");
    std::fs::create_dir_all(&home)?;
    std::os::unix::fs::symlink(outside.path(), home.join("escape"))?;
    std::os::unix::fs::symlink("/etc/passwd", home.join("passwd"))?;

    let result = paramiko(
        gateway.addr,
        "cucm",
        PASSWORD,
        r#"
t, sftp = connect()
r = {}
r["listing"] = attempt(lambda: sorted(sftp.listdir("/")))
r["read_through_dir_link"] = attempt(lambda: sftp.open("escape/secret.txt").read().decode())
r["read_file_link"] = attempt(lambda: sftp.open("passwd").read().decode())
r["list_dir_link"] = attempt(lambda: sftp.listdir("escape"))
r["write_through_dir_link"] = attempt(lambda: sftp.open("escape/planted.txt", "w").close())
r["remove_file_link"] = attempt(lambda: sftp.remove("passwd"))
print(json.dumps(r))
"#,
    )
    .await?;

    ensure!(
        result["listing"]["ok"] == json!([]),
        "links were listed: {}",
        result["listing"]
    );
    for attempt in [
        "read_through_dir_link",
        "read_file_link",
        "list_dir_link",
        "write_through_dir_link",
        "remove_file_link",
    ] {
        ensure!(
            result[attempt]["errno"] == 13,
            "{attempt}: {}",
            result[attempt]
        );
    }
    let outside_now: Vec<_> = std::fs::read_dir(outside.path())?.collect();
    ensure!(
        outside_now.len() == 1,
        "something was written outside: {outside_now:?}"
    );
    ensure!(
        home.join("passwd")
            .symlink_metadata()?
            .file_type()
            .is_symlink()
    );
    gateway.stop().await
}

#[tokio::test]
async fn a_tcp_connect_and_close_logs_nothing_at_warn_or_error() -> Result<()> {
    let logs = capture_logs();
    let gateway = TestGateway::start(vec![password_user("cucm", PASSWORD, ALL)]).await?;

    drop(TcpStream::connect(gateway.addr).await?);

    let mut garbage = TcpStream::connect(gateway.addr).await?;
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), garbage.read_to_end(&mut sink)).await;
    drop(garbage);

    let mut half = BufReader::new(TcpStream::connect(gateway.addr).await?);
    let mut banner = String::new();
    half.read_line(&mut banner).await?;
    ensure!(banner.starts_with("SSH-2.0-Sluice"), "banner {banner:?}");
    half.get_mut().write_all(b"SSH-2.0-probe\r\n").await?;
    drop(half);

    tokio::time::sleep(Duration::from_millis(300)).await;
    gateway.stop().await?;
    let loud: Vec<String> = [logs.at_level("ERROR"), logs.at_level("WARN")].concat();
    ensure!(loud.is_empty(), "a probe was logged loudly: {loud:#?}");
    Ok(())
}

#[tokio::test]
async fn shell_exec_pty_and_other_subsystems_are_refused_with_a_message() -> Result<()> {
    let _logs = capture_logs();
    let gateway = TestGateway::start(vec![password_user("cucm", PASSWORD, ALL)]).await?;

    let result = paramiko(
        gateway.addr,
        "cucm",
        PASSWORD,
        r#"
import time
t, sftp = connect()
def refused(request):
    channel = t.open_session()
    try:
        request(channel)
        outcome = "accepted"
    except paramiko.SSHException:
        outcome = "refused"
    time.sleep(0.2)
    stderr = channel.recv_stderr(4096).decode() if channel.recv_stderr_ready() else ""
    return [outcome, stderr]
r = {
    "exec": refused(lambda c: c.exec_command("id")),
    "shell": refused(lambda c: c.invoke_shell()),
    "pty": refused(lambda c: c.get_pty()),
    "subsystem": refused(lambda c: c.invoke_subsystem("netconf")),
    "sftp_still_works": sftp.normalize("."),
}
print(json.dumps(r))
"#,
    )
    .await?;

    for request in ["exec", "shell", "pty", "subsystem"] {
        ensure!(
            result[request][0] == "refused",
            "{request}: {}",
            result[request]
        );
    }
    let message = result["exec"][1].as_str().unwrap_or_default();
    ensure!(
        message.contains("SFTP connections only"),
        "exec stderr {message:?}"
    );
    ensure!(result["sftp_still_works"] == "/");
    gateway.stop().await
}

#[tokio::test]
async fn a_config_change_admits_new_users_while_unchanged_sessions_continue() -> Result<()> {
    let _logs = capture_logs();
    let gateway = TestGateway::start(vec![password_user("alice", PASSWORD, ALL)]).await?;
    let staged = gateway.stage_users(vec![
        password_user("alice", PASSWORD, ALL),
        password_user("bob", "bobs-password", ALL),
    ])?;

    let script = format!(
        r#"
import time
ta, sa = connect()
with sa.open("before.txt", "w") as f:
    f.write("a")
os.replace({staged:?}, {config:?})
def bob_logs_in():
    deadline = time.time() + 10
    while True:
        try:
            tb, sb = connect("bob", "bobs-password")
            sb.listdir("/")
            tb.close()
            return "logged in"
        except paramiko.AuthenticationException:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
r = {{"bob": attempt(bob_logs_in)}}
def alice_keeps_working():
    with sa.open("after.txt", "w") as f:
        f.write("b")
    return sorted(sa.listdir("/"))
r["alice_session"] = attempt(alice_keeps_working)
r["alice_new_login"] = attempt(lambda: connect("alice") and "logged in")
print(json.dumps(r))
"#,
        staged = staged.display().to_string(),
        config = gateway.config_path().display().to_string(),
    );
    let result = paramiko(gateway.addr, "alice", PASSWORD, &script).await?;

    ensure!(result["bob"]["ok"] == "logged in", "bob: {}", result["bob"]);
    let alice = &result["alice_session"]["ok"];
    ensure!(
        *alice == json!(["after.txt", "before.txt"]),
        "alice's session: {result}"
    );
    ensure!(
        result["alice_new_login"]["ok"] == "logged in",
        "alice could not log in again: {result}"
    );
    gateway.stop().await
}

#[tokio::test]
async fn only_authentication_methods_some_login_can_complete_are_advertised() -> Result<()> {
    let _logs = capture_logs();
    let keys = tempfile::tempdir()?;
    let (_, public) = generate_key(keys.path(), "ops")?;
    let gateway = TestGateway::start(vec![key_user("ops", &public, ALL)]).await?;
    let probe = r#"
transport = paramiko.Transport((os.environ["SLUICE_HOST"], int(os.environ["SLUICE_PORT"])))
transport.start_client()
try:
    transport.auth_none("anyone")
    print(json.dumps("accepted"))
except paramiko.BadAuthenticationType as e:
    print(json.dumps(sorted(e.allowed_types)))
"#;

    let methods = paramiko(gateway.addr, "anyone", "", probe).await?;
    ensure!(methods == json!(["publickey"]), "advertised {methods}");

    let users = vec![
        key_user("ops", &public, ALL),
        password_user("cucm", PASSWORD, ALL),
    ];
    gateway.set_users(users)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let methods = paramiko(gateway.addr, "anyone", "", probe).await?;
        if methods == json!(["password", "publickey"]) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "still advertising {methods} after reload"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gateway.stop().await
}

#[tokio::test]
async fn an_interrupted_upload_leaves_no_file_behind() -> Result<()> {
    let logs = capture_logs();
    let gateway = TestGateway::start(vec![password_user("cucm", PASSWORD, ALL)]).await?;

    let result = paramiko(
        gateway.addr,
        "cucm",
        PASSWORD,
        r#"
t, sftp = connect()
f = sftp.open("big.bin", "w")
f.write(b"x" * 200000)
f.flush()
r = {"visible_during_upload": attempt(lambda: sftp.stat("big.bin").st_size)}
t.close()
print(json.dumps(r))
"#,
    )
    .await?;
    ensure!(result["visible_during_upload"]["errno"] == 2, "{result}");

    let uploads = gateway.data().join(sluice::storage::UPLOADS_DIR);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_dir(&uploads)?.next().is_some() {
        ensure!(
            Instant::now() < deadline,
            "the partial upload was not discarded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        !gateway.data().join("cucm/big.bin").exists(),
        "a partial upload was published"
    );
    gateway.stop().await?;
    ensure!(
        logs.text().contains("Upload interrupted"),
        "{}",
        logs.text()
    );
    Ok(())
}

#[tokio::test]
async fn shutdown_ends_a_lingering_session_after_the_grace_period() -> Result<()> {
    let logs = capture_logs();
    let gateway = TestGateway::start(vec![password_user("cucm", PASSWORD, ALL)]).await?;
    let script = r#"
import time
t, sftp = connect()
print("connected", flush=True)
while t.is_active():
    time.sleep(0.05)
print(json.dumps("disconnected"), flush=True)
"#;
    let mut client = paramiko_command(gateway.addr, "cucm", PASSWORD, script)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdout = BufReader::new(client.stdout.take().context("no stdout")?).lines();
    let first = stdout.next_line().await?;
    ensure!(
        first.as_deref() == Some("connected"),
        "paramiko said {first:?}"
    );

    let started = Instant::now();
    gateway.stop().await?;
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
    let last = tokio::time::timeout(Duration::from_secs(5), stdout.next_line()).await??;
    ensure!(
        last.as_deref() == Some("\"disconnected\""),
        "paramiko said {last:?}"
    );
    client.wait().await?;
    let disconnecting = logs
        .text()
        .lines()
        .any(|l| l.contains("Disconnecting remaining sessions") && l.contains("protocol=Sftp"));
    ensure!(disconnecting, "{}", logs.text());
    Ok(())
}

/// A password user whose home is the volume root.
fn root_user(name: &str) -> sluice::gateway::config::GatewayUser {
    let mut user = password_user(name, PASSWORD, ALL);
    user.home = "/".into();
    user
}

/// OpenDAL trims whitespace from both ends of every key, so `"leaf "` would be checked
/// for links as one file and opened as another.
#[tokio::test]
async fn names_opendal_would_trim_reach_neither_a_planted_link_nor_the_upload_directory()
-> Result<()> {
    let _logs = capture_logs();
    let users = vec![password_user("cucm", PASSWORD, ALL), root_user("root")];
    let gateway = TestGateway::start(users).await?;
    let outside = tempfile::tempdir()?;
    std::fs::write(outside.path().join("secret.txt"), "outside the volume")?;
    let home = gateway.data().join("cucm");
    std::fs::create_dir_all(&home)?;
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), home.join("leaf"))?;
    std::os::unix::fs::symlink(outside.path(), home.join("dirlink"))?;

    let tenant = paramiko(
        gateway.addr,
        "cucm",
        PASSWORD,
        r#"
t, sftp = connect()
r = {}
for name in ["leaf ", "leaf\t", "leaf\u3000", "\u2003leaf", "dirlink /secret.txt"]:
    r["read " + name] = attempt(lambda name=name: sftp.open(name).read().decode())
r["stat dirlink "] = attempt(lambda: str(sftp.stat("dirlink ")))
r["list dirlink\t"] = attempt(lambda: sftp.listdir("dirlink\t"))
print(json.dumps(r))
"#,
    )
    .await?;
    let root = paramiko(
        gateway.addr,
        "root",
        PASSWORD,
        r#"
t, sftp = connect()
def write():
    with sftp.open(" /.sluice-uploads/x", "w") as f:
        f.write("x")
r = {
    "stat": attempt(lambda: str(sftp.stat(" /.sluice-uploads"))),
    "write": attempt(write),
    "rename": attempt(lambda: sftp.rename(" /.sluice-uploads", "stolen")),
    "listing": sorted(sftp.listdir("/")),
}
print(json.dumps(r))
"#,
    )
    .await?;

    let refusals = tenant.as_object().context("no results")?.iter();
    let root_refusals = ["stat", "write", "rename"].map(|k| (k, &root[k]));
    for (attempt, outcome) in refusals.map(|(k, v)| (k.as_str(), v)).chain(root_refusals) {
        let message = outcome["message"].as_str().unwrap_or_default();
        // `\t` is a control character before it is whitespace: refused either way.
        ensure!(
            message.starts_with("invalid file name: ")
                && (message.contains("whitespace") || message.contains("control")),
            "{attempt:?} was not refused for its name: {outcome}"
        );
    }
    ensure!(root["listing"] == json!(["cucm"]), "{root}");
    ensure!(gateway.data().join(sluice::storage::UPLOADS_DIR).is_dir());
    ensure!(!gateway.data().join("stolen").exists());
    gateway.stop().await
}

/// The names some object store rewrites (`\` stored as `/`, control characters, ...)
/// are refused on the volume too, over SFTP and FTPS, so that a name means the same file
/// on every backend; nothing is created, not even the directory `a\b` would imply.
#[tokio::test]
async fn names_a_store_would_rewrite_are_refused_on_the_volume_over_sftp_and_ftps() -> Result<()> {
    let gateway =
        TestGateway::start_ftps(vec![root_user("root")], support::gateway::ftps_settings()).await?;

    names::refused_over_sftp(&gateway, "root", PASSWORD).await?;
    names::refused_over_ftps(&gateway, "root", PASSWORD).await?;

    let mut stored: Vec<String> = std::fs::read_dir(gateway.data())?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    stored.sort();
    ensure!(
        stored == [".sluice-audit", ".sluice-uploads", names::SEED],
        "{stored:?}"
    );
    let uploads = std::fs::read_dir(gateway.data().join(".sluice-uploads"))?.count();
    ensure!(uploads == 0, "{uploads} files left in the upload directory");
    let audit_days = std::fs::read_dir(gateway.data().join(".sluice-audit"))?;
    for day in audit_days {
        for file in std::fs::read_dir(day?.path())? {
            let file = file?.file_name();
            ensure!(file.to_string_lossy().ends_with(".jsonl"), "{file:?}");
        }
    }
    gateway.stop().await
}

/// SETSTAT and FSETSTAT of times and modes are accepted and store nothing; a size other
/// than the file's own is refused with OP_UNSUPPORTED and the file keeps every byte, as
/// does a write handle's upload; the size a file already has is accepted.
#[tokio::test]
async fn a_size_change_through_setstat_is_refused_and_the_file_keeps_every_byte() -> Result<()> {
    let gateway = TestGateway::start(vec![password_user("cucm", PASSWORD, ALL)]).await?;
    let result = paramiko(
        gateway.addr,
        "cucm",
        PASSWORD,
        r#"
import io
from paramiko.sftp import CMD_FSETSTAT
from paramiko.sftp_attr import SFTPAttributes
t, sftp = connect()
sftp.putfo(io.BytesIO(b"secret data"), "/f.txt")
def fsetstat_size(handle, size):
    attr = SFTPAttributes()
    attr.st_size = size
    sftp._request(CMD_FSETSTAT, handle, attr)
def write_then_truncate():
    with sftp.open("/g.txt", "wb") as f:
        f.write(b"12345")
        f.flush()
        fsetstat_size(f.handle, 5)
        fsetstat_size(f.handle, 2)
r = {
    "truncate": attempt(lambda: sftp.truncate("/f.txt", 0)),
    "grow": attempt(lambda: sftp.truncate("/f.txt", 100)),
    "same size": attempt(lambda: sftp.truncate("/f.txt", 11)),
    "ftruncate": attempt(lambda: sftp.open("/f.txt", "r").truncate(3)),
    "utime": attempt(lambda: sftp.utime("/f.txt", (1000000000, 1000000000))),
    "chmod": attempt(lambda: sftp.chmod("/f.txt", 0o600)),
    "write handle": attempt(write_then_truncate),
}
r["content"] = sftp.open("/f.txt").read().decode()
print(json.dumps(r))
"#,
    )
    .await?;
    for refused in ["truncate", "grow", "ftruncate", "write handle"] {
        let message = result[refused]["message"].as_str().unwrap_or_default();
        ensure!(
            message.contains("changing a file's size is not supported"),
            "{refused}: {result}"
        );
    }
    for accepted in ["same size", "utime", "chmod"] {
        ensure!(result[accepted].get("ok").is_some(), "{accepted}: {result}");
    }
    ensure!(result["content"] == "secret data", "{result}");
    ensure!(std::fs::read(gateway.data().join("cucm/f.txt"))? == b"secret data");
    gateway.stop().await
}

/// Closes an SFTP file and reports what the server answered; paramiko's own `close`
/// swallows errors.
const STRICT_CLOSE: &str = r#"
from paramiko.sftp import CMD_CLOSE
def strict_close(sftp, f):
    f.flush()
    f._closed = True
    sftp._request(CMD_CLOSE, f.handle)
    return "closed"
"#;

#[tokio::test]
async fn of_two_exclusive_uploads_racing_for_one_name_the_second_fails_on_close() -> Result<()> {
    let logs = capture_logs();
    let gateway = TestGateway::start(vec![password_user("cucm", PASSWORD, ALL)]).await?;

    let script = format!(
        r#"{STRICT_CLOSE}
ta, sa = connect()
tb, sb = connect()
fa = sa.open("race.txt", "wx")
fb = sb.open("race.txt", "wx")
fa.write(b"AAAA")
fb.write(b"BBBB")
r = {{
    "first": attempt(lambda: strict_close(sa, fa)),
    "second": attempt(lambda: strict_close(sb, fb)),
}}
r["content"] = sa.open("race.txt").read().decode()
print(json.dumps(r))
"#
    );
    let result = paramiko(gateway.addr, "cucm", PASSWORD, &script).await?;

    ensure!(result["first"]["ok"] == "closed", "{result}");
    let message = result["second"]["message"].as_str().unwrap_or_default();
    ensure!(message.contains("already exists"), "{result}");
    ensure!(result["content"] == "AAAA", "{result}");
    gateway.stop().await?;
    let lost = logs.at_level("WARN");
    ensure!(
        lost.iter()
            .any(|w| w.contains("Upload lost") && w.contains("race.txt")),
        "no warning for the lost upload: {lost:#?}"
    );
    Ok(())
}

/// SFTP's CREATE flag creates the file whether or not WRITE is also asked for; paramiko's
/// "x" mode sends CREATE|EXCL alone.
#[tokio::test]
async fn open_with_create_but_without_write_creates_the_file() -> Result<()> {
    let _logs = capture_logs();
    let gateway = TestGateway::start(vec![password_user("cucm", PASSWORD, ALL)]).await?;

    let result = paramiko(
        gateway.addr,
        "cucm",
        PASSWORD,
        r#"
t, sftp = connect()
r = {"create": attempt(lambda: sftp.open("fresh", "x").close() or "created")}
r["size"] = attempt(lambda: sftp.stat("fresh").st_size)
r["again"] = attempt(lambda: sftp.open("fresh", "x").close() or "created")
print(json.dumps(r))
"#,
    )
    .await?;

    ensure!(result["create"]["ok"] == "created", "{result}");
    ensure!(result["size"]["ok"] == 0, "{result}");
    let message = result["again"]["message"].as_str().unwrap_or_default();
    ensure!(message.contains("already exists"), "{result}");
    ensure!(gateway.data().join("cucm/fresh").is_file());
    gateway.stop().await
}

#[tokio::test]
async fn a_connection_may_hold_only_a_few_channels_at_once() -> Result<()> {
    let _logs = capture_logs();
    let gateway = TestGateway::start(vec![password_user("cucm", PASSWORD, ALL)]).await?;
    let limit = sluice::gateway::sftp::MAX_CHANNELS;

    let script = format!(
        r#"
import time
t, sftp = connect()
extra = [paramiko.SFTPClient.from_transport(t) for _ in range({limit} - 1)]
r = {{"one_more": attempt(lambda: paramiko.SFTPClient.from_transport(t) and "opened")}}
extra.pop().close()
def after_closing_one():
    deadline = time.time() + 5
    while True:
        try:
            return paramiko.SFTPClient.from_transport(t).normalize(".")
        except paramiko.SSHException:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
r["after_closing_one"] = attempt(after_closing_one)
print(json.dumps(r))
"#
    );
    let result = paramiko(gateway.addr, "cucm", PASSWORD, &script).await?;

    ensure!(
        result["one_more"]["error"] == "ChannelException",
        "{result}"
    );
    ensure!(result["after_closing_one"]["ok"] == "/", "{result}");
    gateway.stop().await
}

#[tokio::test]
async fn connections_beyond_the_per_address_limit_are_closed_at_once() -> Result<()> {
    let logs = capture_logs();
    let gateway = TestGateway::start(vec![password_user("cucm", PASSWORD, ALL)]).await?;
    let limit = sluice::gateway::sftp::MAX_CONNECTIONS_PER_IP;

    let mut admitted = Vec::new();
    for _ in 0..limit {
        let mut stream = BufReader::new(TcpStream::connect(gateway.addr).await?);
        let mut banner = String::new();
        stream.read_line(&mut banner).await?;
        ensure!(banner.starts_with("SSH-2.0-Sluice"), "banner {banner:?}");
        admitted.push(stream);
    }
    let started = Instant::now();
    for _ in 0..2 {
        let mut refused = TcpStream::connect(gateway.addr).await?;
        let mut received = Vec::new();
        let read = refused.read_to_end(&mut received);
        let _ = tokio::time::timeout(Duration::from_secs(5), read).await?;
        ensure!(received.is_empty(), "refused, yet sent {received:?}");
    }
    ensure!(started.elapsed() < Duration::from_secs(2));

    drop(admitted);
    let result = paramiko(
        gateway.addr,
        "cucm",
        PASSWORD,
        "t, sftp = connect()\nprint(json.dumps(sftp.normalize('.')))",
    )
    .await?;
    ensure!(result == "/", "{result}");
    gateway.stop().await?;
    let refusals = logs.at_level("WARN");
    let refusals: Vec<_> = refusals
        .iter()
        .filter(|w| w.contains("Refusing connections"))
        .collect();
    ensure!(refusals.len() == 1, "{refusals:#?}");
    Ok(())
}

#[tokio::test]
async fn sessions_whose_login_a_reload_revokes_are_disconnected() -> Result<()> {
    let logs = capture_logs();
    let users = ["alice", "bob", "carol"].map(|name| password_user(name, PASSWORD, ALL));
    let gateway = TestGateway::start(users.to_vec()).await?;
    let staged = gateway.stage_users(vec![
        password_user("bob", PASSWORD, ALL),
        password_user("carol", "carols-new-password", ALL),
    ])?;

    let script = format!(
        r#"
import time
ta, sa = connect("alice")
tb, sb = connect("bob")
tc, sc = connect("carol")
os.replace({staged:?}, {config:?})
deadline = time.time() + 10
while (ta.is_active() or tc.is_active()) and time.time() < deadline:
    time.sleep(0.05)
r = {{
    "alice_connected": ta.is_active(),
    "carol_connected": tc.is_active(),
    "alice_new_channel": attempt(lambda: paramiko.SFTPClient.from_transport(ta) and "opened"),
    "bob": attempt(lambda: sb.normalize(".")),
}}
print(json.dumps(r))
"#,
        staged = staged.display().to_string(),
        config = gateway.config_path().display().to_string(),
    );
    let result = paramiko(gateway.addr, "alice", PASSWORD, &script).await?;

    ensure!(result["alice_connected"] == false, "{result}");
    ensure!(result["carol_connected"] == false, "{result}");
    ensure!(result["alice_new_channel"]["error"].is_string(), "{result}");
    ensure!(result["bob"]["ok"] == "/", "{result}");
    gateway.stop().await?;
    let infos = logs.at_level("INFO");
    let revoked: Vec<_> = infos
        .iter()
        .filter(|l| l.contains("login was revoked"))
        .collect();
    ensure!(revoked.len() == 2, "{revoked:#?}");
    ensure!(
        revoked.iter().any(|l| l.contains("alice")) && revoked.iter().any(|l| l.contains("carol"))
    );
    Ok(())
}

#[tokio::test]
async fn garbage_on_an_sftp_channel_closes_the_channel_with_one_warning() -> Result<()> {
    let logs = capture_logs();
    let gateway = TestGateway::start(vec![password_user("cucm", PASSWORD, ALL)]).await?;

    let result = paramiko(
        gateway.addr,
        "cucm",
        PASSWORD,
        r#"
t, sftp = connect()
channel = t.open_session()
channel.invoke_subsystem("sftp")
channel.sendall(b"\xff\xff\xff\xff" * 5000)
channel.settimeout(5)
r = {
    "after_garbage": attempt(lambda: channel.recv(1024).decode(errors="replace")),
    "other_channel": attempt(lambda: sftp.normalize(".")),
}
print(json.dumps(r))
"#,
    )
    .await?;

    ensure!(
        result["after_garbage"]["ok"] == "",
        "the channel stayed open: {result}"
    );
    ensure!(result["other_channel"]["ok"] == "/", "{result}");
    gateway.stop().await?;
    let warnings = logs.at_level("WARN");
    ensure!(
        warnings.len() == 1 && warnings[0].contains("malformed packet"),
        "{} warnings: {:#?}",
        warnings.len(),
        warnings.iter().take(5).collect::<Vec<_>>()
    );
    Ok(())
}

/// A gateway run as its own process (`sluice gateway`), so that its memory can be
/// measured; killed when dropped.
struct GatewayProcess {
    _dir: tempfile::TempDir,
    child: tokio::process::Child,
    addr: std::net::SocketAddr,
}

impl GatewayProcess {
    async fn start(users: Vec<sluice::gateway::config::GatewayUser>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let keys = dir.path().join("host-keys");
        std::fs::create_dir(&keys)?;
        for (name, pem) in sluice::gateway::host_keys::generate()? {
            std::fs::write(keys.join(name), pem)?;
        }
        let config = json!({
            "server": "tests/sftp",
            "region": "cn-shanghai",
            "residency": {"compliant": true},
            "users": users,
        });
        std::fs::write(dir.path().join("config.json"), config.to_string())?;

        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([
                "--log-format",
                "json",
                "gateway",
                "--sftp-listen",
                "127.0.0.1:0",
            ])
            .arg("--config")
            .arg(dir.path().join("config.json"))
            .arg("--host-keys")
            .arg(&keys)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(child.stderr.take().context("no stderr")?).lines();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if event["message"] == "Gateway listening" {
                    let sftp = event["sftp"].as_str().unwrap_or_default();
                    return Ok(sftp.parse()?);
                }
            }
            anyhow::bail!("the gateway exited before listening")
        })
        .await
        .context("the gateway did not start within 30 s")??;
        // Keep reading, so that the gateway never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            _dir: dir,
            child,
            addr,
        })
    }

    fn rss_mib(&self) -> Result<u64> {
        let pid = self.child.id().context("the gateway has exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .context("no VmRSS")?;
        let kib: u64 = rss.trim().trim_end_matches("kB").trim().parse()?;
        Ok(kib / 1024)
    }

    async fn stop(mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

/// Each Argon2 check needs 19 MiB; allocated per check, the freed blocks stay in the
/// allocator's per-thread arenas, and bursts of wrong passwords grew the gateway by about
/// a gigabyte for good.
#[tokio::test]
async fn bursts_of_wrong_passwords_leave_the_gateway_memory_bounded() -> Result<()> {
    let gateway = GatewayProcess::start(vec![password_user("cucm", PASSWORD, ALL)]).await?;
    let before = gateway.rss_mib()?;

    let result = paramiko(
        gateway.addr,
        "cucm",
        PASSWORD,
        r#"
import threading
errors = []
def wrong_password():
    try:
        t = paramiko.Transport((os.environ["SLUICE_HOST"], int(os.environ["SLUICE_PORT"])))
        t.start_client(timeout=30)
        try:
            t.auth_password("cucm", "wrong")
        except paramiko.AuthenticationException:
            pass
        t.close()
    except Exception as e:
        errors.append(repr(e))
# 48 at once stays below the 64 connections one address may hold, also while the
# previous burst's sessions are still being torn down on a busy machine.
import time
for burst in range(3):
    threads = [threading.Thread(target=wrong_password) for _ in range(48)]
    [thread.start() for thread in threads]
    [thread.join(120) for thread in threads]
    time.sleep(1)
print(json.dumps(errors[:3]))
"#,
    )
    .await?;
    let after = gateway.rss_mib()?;

    ensure!(result == json!([]), "attempts failed: {result}");
    ensure!(
        after.saturating_sub(before) < 160,
        "the gateway grew from {before} MiB to {after} MiB"
    );
    gateway.stop().await
}

/// A rename onto the same name, file or directory, plain or posix, succeeds and keeps it.
#[tokio::test]
async fn renaming_a_file_or_directory_onto_itself_succeeds_and_keeps_it() -> Result<()> {
    let _logs = capture_logs();
    let gateway = TestGateway::start(vec![password_user("cucm", PASSWORD, ALL)]).await?;

    let result = paramiko(
        gateway.addr,
        "cucm",
        PASSWORD,
        r#"
t, sftp = connect()
with sftp.open("X.csv", "w") as f: f.write(b"kept")
sftp.mkdir("d")
r = {"posix": attempt(lambda: sftp.posix_rename("X.csv", "X.csv")),
     "plain": attempt(lambda: sftp.rename("X.csv", "./X.csv")),
     "posix_dir": attempt(lambda: sftp.posix_rename("d", "d")),
     "plain_dir": attempt(lambda: sftp.rename("d", "/d"))}
r["names"] = sorted(sftp.listdir("."))
print(json.dumps(r))
"#,
    )
    .await?;
    for rename in ["posix", "plain", "posix_dir", "plain_dir"] {
        ensure!(result[rename].get("ok").is_some(), "{rename}: {result}");
    }
    ensure!(result["names"] == json!(["X.csv", "d"]), "{result}");
    let home = gateway.data().join("cucm");
    ensure!(std::fs::read(home.join("X.csv"))? == b"kept");
    ensure!(home.join("d").is_dir());
    gateway.stop().await
}
