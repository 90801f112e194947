//! The audit log: evidence of every login and file operation, kept in the server's own
//! storage (the volume or the bucket the residency policy pins), and the live residency
//! stamp that decides whether writes and uploads are allowed.
//!
//! Contract:
//! - One [`AuditRecord`] per login (success or failure) and per file operation: upload,
//!   download, delete, rename, mkdir, rmdir, whether it succeeded, failed or was refused.
//!   Listings, stat and realpath are not recorded. Records never hold a password, key or
//!   credential. The field names are stable (see the README's "Audit log").
//! - Records are JSON lines under [`AUDIT_DIR`](crate::storage::AUDIT_DIR), which users
//!   can neither list nor reach ([`sink`] says where exactly). One writer task per gateway
//!   takes every record queued since its last flush and writes them in one go (group
//!   commit). [`SessionLog::record`] returns once its record is durable: front ends call it
//!   for operations that change data or complete a transfer before they reply success, so
//!   a success a client saw is always in the log. A success whose record is not durable
//!   within [`DURABLE_WAIT`] is answered with a transient error instead (its record stays
//!   queued and is written once the storage is back).
//! - Nothing is dropped. A failed flush is retried with backoff (0.1 s doubling to 5 s)
//!   until it succeeds; meanwhile [`SessionLog::available`] is false and the file system
//!   refuses new mutating and transfer operations with a transient error. The queue holds
//!   at most [`QUEUE_CAPACITY`] records; beyond that, whoever records waits.
//! - A record stays small whatever a client sends: the strings a client chooses (`user`,
//!   `path`, `target`, and `error`, which may quote them) are cut to [`MAX_USER_BYTES`],
//!   [`MAX_PATH_BYTES`] and [`MAX_ERROR_BYTES`] bytes of JSON text, ending in a visible
//!   marker with the original length and the start of its SHA-256 (see [`bounded`]), and
//!   the record then names the cut fields in `truncated`. Without this, an
//!   unauthenticated client could make each failed login store a user name of hundreds
//!   of KiB and fill the region-pinned storage.
//! - With `audit.stdout` in the configuration, every record is also printed on standard
//!   output, one JSON line each, once it is durable. Logs go to standard error, so standard
//!   output stays a clean JSON-lines stream.
//! - [`AuditLog::close`] flushes what is queued (waiting at most [`CLOSE_WAIT`]); the
//!   gateway calls it on SIGTERM after its sessions have ended.
//! - The residency stamp follows configuration reloads ([`AuditLog::apply`]) and is read
//!   at every operation: [`SessionLog::writes_refused`] and, for uploads,
//!   [`SessionLog::upload_refused`], which adds the volume limits of cross-border
//!   allowances (counted by [`usage`], over all pods of the server). While the latest
//!   configuration file cannot be read or parsed ([`AuditLog::set_config_problem`]),
//!   writes are refused whatever the stamp says: fail closed.

pub mod sink;
mod timestamp;
pub mod usage;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::gateway::ErrorChain;
use crate::gateway::config::{CrossBorderStamp, GatewayConfig, ResidencyStamp};
use crate::storage::Storage;
use sink::Sink;
use usage::Usage;

pub use timestamp::rfc3339_millis;

/// Records queued at most; whoever records more waits for the writer.
pub const QUEUE_CAPACITY: usize = 8192;
/// Records written in one flush at most.
pub const MAX_BATCH: usize = 1024;
/// How long an operation waits for its record to become durable before its client is told
/// that the audit log is unavailable.
pub const DURABLE_WAIT: Duration = Duration::from_secs(10);
/// How long [`AuditLog::close`] waits for the last records to be written.
pub const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// How often each pod re-reads all pods' usage counts.
pub const USAGE_REFRESH: Duration = Duration::from_secs(30);
/// Longest `user` in a record, in bytes of its JSON text (quotes excluded). Login names
/// are Kubernetes object names, at most 253 characters.
pub const MAX_USER_BYTES: usize = 256;
/// Longest `path` and `target` in a record, in bytes of their JSON text: S3 keys have at
/// most 1,024 bytes, so a path that was stored is cut only on a volume.
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest `error` in a record, in bytes of its JSON text.
pub const MAX_ERROR_BYTES: usize = 1024;
/// First and longest wait between attempts to write a failing flush.
const RETRY_DELAYS: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// What was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// A login attempt.
    Login,
    /// A file stored (whole, replaced or resumed).
    Upload,
    /// A file read.
    Download,
    /// A file removed.
    Delete,
    /// A file or directory renamed or moved (to `target`).
    Rename,
    /// A directory created.
    Mkdir,
    /// A directory removed.
    Rmdir,
}

/// Whether the gateway let the operation run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// It ran (it may still have failed: see `error`).
    Allowed,
    /// It was refused: a failed login, a missing permission, an invalid file name,
    /// suspended writes, a used-up volume limit, or the audit log being unavailable.
    Denied,
}

/// The protocol of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditProtocol {
    /// SFTP over SSH.
    Sftp,
    /// FTP over TLS, explicit or implicit.
    Ftps,
}

/// One line of the audit log. Optional fields are left out when they do not apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// When it happened: RFC 3339, UTC, milliseconds.
    pub time: String,
    /// The TransferServer, `namespace/name`.
    pub server: String,
    /// The gateway pod.
    pub pod: String,
    /// The connection, unique per pod.
    pub session: String,
    /// `sftp` or `ftps`.
    pub protocol: AuditProtocol,
    /// The login name (as given, for a failed login).
    pub user: String,
    /// The client's IP address.
    pub peer: String,
    /// What was done.
    pub operation: Operation,
    /// The file or directory, as the user sees it (`/` is the home directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A rename's new name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Bytes stored (upload: the whole file, kept start of a resume included) or sent
    /// (download).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// SHA-256 of the stored file, hex (uploads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The region of the storage: the object store's, or the server's for a volume.
    pub region: String,
    /// Whether it was allowed.
    pub decision: Decision,
    /// Why it was denied, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For uploads under cross-border allowances, their assessment references
    /// (comma-separated if several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The fields whose values were too long and were cut (see [`bounded`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub truncated: Vec<String>,
}

/// What a front end or the file system knows of an operation; the session adds the rest.
#[derive(Clone, Debug)]
pub struct Entry {
    operation: Operation,
    path: Option<String>,
    target: Option<String>,
    bytes: Option<u64>,
    sha256: Option<String>,
    decision: Decision,
    error: Option<String>,
    reference: Option<String>,
}

impl Entry {
    /// An allowed `operation` that succeeded, so far.
    pub fn new(operation: Operation) -> Self {
        Self {
            operation,
            path: None,
            target: None,
            bytes: None,
            sha256: None,
            decision: Decision::Allowed,
            error: None,
            reference: None,
        }
    }

    /// On `path`.
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// To `target` (a rename).
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// Moving `bytes`.
    pub fn bytes(mut self, bytes: u64) -> Self {
        self.bytes = Some(bytes);
        self
    }

    /// Storing content with this SHA-256 (hex).
    pub fn sha256(mut self, sha256: String) -> Self {
        self.sha256 = Some(sha256);
        self
    }

    /// Under the cross-border allowances `reference` names.
    pub fn reference(mut self, reference: Option<String>) -> Self {
        self.reference = reference;
        self
    }

    /// Refused, for `reason`.
    pub fn denied(mut self, reason: impl Into<String>) -> Self {
        self.decision = Decision::Denied;
        self.error = Some(reason.into());
        self
    }

    /// Allowed, but failed for `reason`.
    pub fn failed(mut self, reason: impl Into<String>) -> Self {
        self.error = Some(reason.into());
        self
    }
}

/// The audit log could not take a record in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit log unavailable")]
pub struct AuditUnavailable;

/// Who writes the log: the identity every record carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditIdentity {
    /// `namespace/name` of the TransferServer.
    pub server: String,
    /// The pod's name.
    pub pod: String,
    /// The storage's region.
    pub region: String,
}

/// What the writer task and the sessions share.
struct State {
    stamp: RwLock<Arc<ResidencyStamp>>,
    /// Why the latest configuration file cannot be used, while it cannot.
    config_problem: RwLock<Option<String>>,
    stdout: AtomicBool,
    healthy: AtomicBool,
    usage: Mutex<Usage>,
}

impl State {
    fn stamp(&self) -> Arc<ResidencyStamp> {
        self.stamp
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn usage(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn writes_refused(&self) -> Option<String> {
        let problem = self
            .config_problem
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(problem) = problem.as_deref() {
            return Some(format!("writes are suspended: {problem}"));
        }
        self.stamp().writes_refused(unix_now())
    }
}

/// What the writer task is sent.
enum Message {
    /// A record, and whom to tell once it is durable.
    Record(Box<AuditRecord>, Option<oneshot::Sender<()>>),
    /// Tell once everything sent before is durable.
    Flush(oneshot::Sender<()>),
    /// Re-read every pod's usage counts now (an allowance with a limit was added).
    Refresh,
}

/// The gateway's audit log. Cheap to clone; the writer task stops once every clone and
/// every [`SessionLog`] is gone, after writing what is queued.
#[derive(Clone)]
pub struct AuditLog {
    identity: Arc<AuditIdentity>,
    queue: mpsc::Sender<Message>,
    state: Arc<State>,
}

impl AuditLog {
    /// Starts the writer for `storage`, after reading every pod's usage counts for the
    /// allowances in `config`'s stamp (a failure to read them is logged and retried at the
    /// next refresh).
    pub async fn start(storage: &Storage, identity: AuditIdentity, config: &GatewayConfig) -> Self {
        let state = Arc::new(State {
            stamp: RwLock::new(Arc::new(config.residency.clone())),
            config_problem: RwLock::new(None),
            stdout: AtomicBool::new(config.audit.stdout),
            healthy: AtomicBool::new(true),
            usage: Mutex::new(Usage::new(&identity.pod)),
        });
        let (queue, records) = mpsc::channel(QUEUE_CAPACITY);
        let writer = Writer {
            sink: Sink::of(storage),
            pod: identity.pod.clone(),
            state: state.clone(),
        };
        writer.refresh_usage().await;
        tokio::spawn(writer.run(records));
        Self {
            identity: Arc::new(identity),
            queue,
            state,
        }
    }

    /// Takes in a reloaded configuration: its residency stamp and whether records also
    /// go to standard output. An allowance with a volume limit that was not there before
    /// has every pod's counts read at once, rather than at the next refresh.
    pub fn apply(&self, config: &GatewayConfig) {
        let previous = std::mem::replace(
            &mut *self
                .state
                .stamp
                .write()
                .unwrap_or_else(PoisonError::into_inner),
            Arc::new(config.residency.clone()),
        );
        self.state
            .stdout
            .store(config.audit.stdout, Ordering::Relaxed);
        let limited = |stamp: &ResidencyStamp| -> Vec<String> {
            let allowances = stamp.cross_border_transfers.iter();
            let limited = allowances.filter(|a| a.max_bytes.is_some());
            limited.map(|a| a.reference.clone()).collect()
        };
        let known = limited(&previous);
        if limited(&config.residency)
            .iter()
            .any(|r| !known.contains(r))
        {
            // Full means the writer is busy; it refreshes at its next tick then.
            let _ = self.queue.try_send(Message::Refresh);
        }
    }

    /// Says that the latest configuration file cannot be used (`Some`, with why) or that
    /// the one in force is the latest (`None`). While it cannot, writes are refused with
    /// that reason whatever the stamp in force says: the file the gateway cannot read may
    /// be the one that suspends writes (an operator newer than the gateway, say), and
    /// writes must not go on because it did not parse. Reads and logins go on under the
    /// last valid configuration.
    pub fn set_config_problem(&self, problem: Option<&str>) {
        *self
            .state
            .config_problem
            .write()
            .unwrap_or_else(PoisonError::into_inner) = problem.map(str::to_owned);
    }

    /// Why writes are refused now, if they are: the latest configuration cannot be used,
    /// or the stamp in force refuses them ([`ResidencyStamp::writes_refused`]).
    pub fn writes_refused(&self) -> Option<String> {
        self.state.writes_refused()
    }

    /// The log of a new connection from `peer`, with a fresh session id.
    pub fn session(&self, protocol: AuditProtocol, peer: IpAddr) -> SessionLog {
        SessionLog {
            log: self.clone(),
            session: Arc::from(format!("{:016x}", rand::random::<u64>())),
            protocol,
            peer: peer.to_canonical(),
            user: Arc::from(""),
        }
    }

    /// Waits until everything recorded so far is durable, at most [`CLOSE_WAIT`].
    pub async fn close(&self) {
        let (done, flushed) = oneshot::channel();
        let flush = async {
            match self.queue.send(Message::Flush(done)).await {
                Ok(()) => flushed.await.is_ok(),
                Err(_) => false,
            }
        };
        match tokio::time::timeout(CLOSE_WAIT, flush).await {
            Ok(true) => tracing::info!("Audit log flushed"),
            Ok(false) => tracing::error!("Audit log writer gone before shutdown"),
            Err(_) => tracing::error!(
                queued = QUEUE_CAPACITY - self.queue.capacity(),
                "Audit log not flushed before shutdown: the storage is failing"
            ),
        }
    }
}

/// An audit log for unit tests: server `ns/s`, pod `test-0`, a compliant stamp.
#[cfg(test)]
pub(crate) async fn test_log(storage: &Storage) -> AuditLog {
    let config: GatewayConfig = serde_json::from_value(serde_json::json!({
        "server": "ns/s",
        "region": "cn-shanghai",
        "residency": {"compliant": true},
        "users": [],
    }))
    .expect("a valid configuration");
    let identity = AuditIdentity {
        server: config.server.clone(),
        pod: "test-0".into(),
        region: config.region.clone(),
    };
    AuditLog::start(storage, identity, &config).await
}

/// A session log of [`test_log`] for a client on 127.0.0.1.
#[cfg(test)]
pub(crate) async fn test_session(storage: &Storage) -> SessionLog {
    let peer = std::net::Ipv4Addr::LOCALHOST.into();
    test_log(storage).await.session(AuditProtocol::Sftp, peer)
}

/// One connection's view of the audit log: its session id, protocol, client and, after
/// login, user. Cheap to clone.
#[derive(Clone)]
pub struct SessionLog {
    log: AuditLog,
    session: Arc<str>,
    protocol: AuditProtocol,
    peer: IpAddr,
    user: Arc<str>,
}

impl SessionLog {
    /// The session id records carry.
    pub fn id(&self) -> &str {
        &self.session
    }

    /// The same session, logged in as `user`.
    pub fn for_user(&self, user: &str) -> Self {
        Self {
            user: Arc::from(user),
            ..self.clone()
        }
    }

    /// Why writes are refused now, if they are (see [`AuditLog::writes_refused`]).
    pub fn writes_refused(&self) -> Option<String> {
        self.log.state.writes_refused()
    }

    /// Why a new upload is refused now besides [`SessionLog::writes_refused`]: a
    /// cross-border allowance of an enforced policy whose volume limit is used up.
    pub fn upload_refused(&self) -> Option<String> {
        let stamp = self.log.state.stamp();
        let enforced: Vec<CrossBorderStamp> = stamp
            .cross_border_transfers
            .iter()
            .filter(|a| a.enforced)
            .cloned()
            .collect();
        let usage = self.log.state.usage();
        let exhausted = usage.exhausted(&enforced)?;
        Some(format!(
            "upload refused: cross-border transfer {} to {} has reached its volume limit of \
             {} bytes",
            exhausted.reference,
            exhausted.region,
            exhausted.max_bytes.unwrap_or_default()
        ))
    }

    /// Whether the audit log is taking records: false while flushes fail.
    pub fn available(&self) -> bool {
        self.log.state.healthy.load(Ordering::Relaxed)
    }

    /// Counts a completed upload of `bytes` new bytes under every cross-border allowance
    /// with a volume limit; returns the references of all allowances the server relies
    /// on, for its record.
    pub fn count_upload(&self, bytes: u64) -> Option<String> {
        let stamp = self.log.state.stamp();
        let mut usage = self.log.state.usage();
        for allowance in &stamp.cross_border_transfers {
            if allowance.max_bytes.is_some() {
                usage.add(&allowance.reference, bytes);
            }
        }
        let references: Vec<&str> = stamp
            .cross_border_transfers
            .iter()
            .map(|a| a.reference.as_str())
            .collect();
        (!references.is_empty()).then(|| references.join(","))
    }

    /// Records `entry` and waits until it is durable, at most [`DURABLE_WAIT`].
    pub async fn record(&self, entry: Entry) -> Result<(), AuditUnavailable> {
        let (durable, written) = oneshot::channel();
        let message = Message::Record(Box::new(self.complete(entry)), Some(durable));
        let queue = self.log.queue.clone();
        let recorded = async move {
            match queue.send(message).await {
                Ok(()) => written.await.is_ok(),
                Err(_) => false,
            }
        };
        // A record that did not fit the queue in time is sent on regardless: nothing is
        // dropped, the client is only told it is not confirmed.
        let mut recorded = Box::pin(recorded);
        match tokio::time::timeout(DURABLE_WAIT, &mut recorded).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(AuditUnavailable),
            Err(_) => {
                tokio::spawn(recorded);
                Err(AuditUnavailable)
            }
        }
    }

    /// Records `entry` without waiting for it to be written (refusals, failures, logins).
    pub async fn note(&self, entry: Entry) {
        let message = Message::Record(Box::new(self.complete(entry)), None);
        if self.log.queue.send(message).await.is_err() {
            tracing::error!("Audit record lost: the audit log is closed");
        }
    }

    /// Like [`SessionLog::note`], from code that cannot wait (a drop).
    pub fn note_detached(&self, entry: Entry) {
        let message = Message::Record(Box::new(self.complete(entry)), None);
        let queue = self.log.queue.clone();
        match queue.try_send(message) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(message)) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move { queue.send(message).await });
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("Audit record lost: the audit log is closed");
            }
        }
    }

    /// Records a login of `user`: allowed, or denied for `reason`.
    pub async fn login(&self, user: &str, refused: Option<&str>) {
        let entry = match refused {
            None => Entry::new(Operation::Login),
            Some(reason) => Entry::new(Operation::Login).denied(reason),
        };
        self.for_user(user).note(entry).await;
    }

    fn complete(&self, entry: Entry) -> AuditRecord {
        let identity = &self.log.identity;
        let mut truncated = Vec::new();
        let mut bound = |field: &str, value: &str, limit: usize| match bounded(value, limit) {
            Some(cut) => {
                truncated.push(field.to_owned());
                cut
            }
            None => value.to_owned(),
        };
        let user = bound("user", &self.user, MAX_USER_BYTES);
        let path = entry.path.map(|p| bound("path", &p, MAX_PATH_BYTES));
        let target = entry.target.map(|t| bound("target", &t, MAX_PATH_BYTES));
        let error = entry.error.map(|e| bound("error", &e, MAX_ERROR_BYTES));
        AuditRecord {
            time: rfc3339_millis(SystemTime::now()),
            server: identity.server.clone(),
            pod: identity.pod.clone(),
            session: self.session.to_string(),
            protocol: self.protocol,
            user,
            peer: self.peer.to_string(),
            operation: entry.operation,
            path,
            target,
            bytes: entry.bytes,
            sha256: entry.sha256,
            region: identity.region.clone(),
            decision: entry.decision,
            error,
            reference: entry.reference,
            truncated,
        }
    }
}

/// `value` cut to at most `limit` bytes of JSON text (quotes excluded; a control
/// character counts as its escape), if it is longer: as many whole characters from its
/// start as fit before the marker `…[truncated from N bytes, sha256:H]`, where `N` is the
/// original length in bytes and `H` the first 16 hex digits of its SHA-256, so that cut
/// values can still be told apart and matched. `None` when `value` fits. `limit` must
/// leave room for the marker (about 60 bytes).
pub fn bounded(value: &str, limit: usize) -> Option<String> {
    if json_len(value) <= limit {
        return None;
    }
    let digest = format!("{:x}", Sha256::digest(value.as_bytes()));
    let marker = format!(
        "…[truncated from {} bytes, sha256:{}]",
        value.len(),
        &digest[..16]
    );
    let room = limit.saturating_sub(json_len(&marker));
    let mut used = 0;
    let mut end = 0;
    for (at, c) in value.char_indices() {
        used += json_char_len(c);
        if used > room {
            break;
        }
        end = at + c.len_utf8();
    }
    Some(format!("{}{marker}", &value[..end]))
}

/// `value` as logs may show it: cut like [`bounded`] when it is longer than `limit`.
pub fn clipped(value: &str, limit: usize) -> Cow<'_, str> {
    match bounded(value, limit) {
        Some(cut) => Cow::Owned(cut),
        None => Cow::Borrowed(value),
    }
}

/// Bytes `value` takes in a JSON string, quotes excluded, as serde_json writes it.
fn json_len(value: &str) -> usize {
    value.chars().map(json_char_len).sum()
}

fn json_char_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\u{8}' | '\t' | '\n' | '\u{c}' | '\r' => 2,
        c if c < ' ' => 6,
        c => c.len_utf8(),
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The writer task: group commit into the sink, usage counts, stdout.
struct Writer {
    sink: Sink,
    pod: String,
    state: Arc<State>,
}

impl Writer {
    async fn run(mut self, mut queue: mpsc::Receiver<Message>) {
        let mut refresh = tokio::time::interval(USAGE_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        refresh.tick().await;
        loop {
            let first = tokio::select! {
                message = queue.recv() => match message {
                    Some(message) => message,
                    None => break,
                },
                _ = refresh.tick() => {
                    self.refresh_usage().await;
                    continue;
                }
            };
            if matches!(first, Message::Refresh) {
                self.refresh_usage().await;
                continue;
            }
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(message) => batch.push(message),
                    Err(_) => break,
                }
            }
            self.flush(batch).await;
        }
    }

    /// Writes the records of `batch` until that succeeds, then the usage counts that
    /// changed, then tells whoever waits.
    async fn flush(&mut self, batch: Vec<Message>) {
        let mut records = Vec::new();
        let mut waiting = Vec::new();
        let mut refresh = false;
        for message in batch {
            match message {
                Message::Record(record, durable) => {
                    records.push(*record);
                    waiting.extend(durable);
                }
                Message::Flush(done) => waiting.push(done),
                Message::Refresh => refresh = true,
            }
        }

        let mut lines: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for record in &records {
            let day = timestamp::day_of(&record.time).to_owned();
            let line = lines.entry(day).or_default();
            serde_json::to_writer(&mut *line, record).expect("a record serialises");
            line.push(b'\n');
        }
        if !lines.is_empty() {
            let mut delay = RETRY_DELAYS.0;
            while let Err(error) = self.sink.append(&self.pod, &lines).await {
                self.failing(&error, records.len());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_DELAYS.1);
            }
            self.recovered();
            if self.state.stdout.load(Ordering::Relaxed) {
                print_records(&lines);
            }
        }
        self.write_usage().await;
        for durable in waiting {
            let _ = durable.send(());
        }
        if refresh {
            self.refresh_usage().await;
        }
    }

    /// Writes the usage counts that changed, until that succeeds: a count that is not
    /// stored would let other pods overshoot a limit.
    async fn write_usage(&mut self) {
        let due = self.state.usage().due(&rfc3339_millis(SystemTime::now()));
        for file in due {
            let mut delay = RETRY_DELAYS.0;
            while let Err(error) = self.sink.write_usage(&file).await {
                self.failing(&error, 0);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_DELAYS.1);
            }
            self.recovered();
            self.state.usage().written(&file);
        }
    }

    /// Re-reads every pod's counts of the allowances with a volume limit.
    async fn refresh_usage(&self) {
        let stamp = self.state.stamp();
        for allowance in &stamp.cross_border_transfers {
            if allowance.max_bytes.is_none() {
                continue;
            }
            match self.sink.read_usage(&allowance.reference).await {
                Ok(files) => self.state.usage().merge(&allowance.reference, &files),
                Err(error) => tracing::warn!(
                    reference = %allowance.reference,
                    error = %ErrorChain(&error),
                    "Failed to read the volume counts of a cross-border allowance"
                ),
            }
        }
    }

    fn failing(&self, error: &sink::SinkError, records: usize) {
        let was_healthy = self.state.healthy.swap(false, Ordering::Relaxed);
        let error = ErrorChain(error);
        if was_healthy {
            tracing::error!(%error, records, "Audit log failing: refusing new transfers");
        } else {
            tracing::debug!(%error, records, "Audit log still failing");
        }
    }

    fn recovered(&self) {
        if !self.state.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!("Audit log writable again");
        }
    }
}

/// Prints the lines on standard output, whole lines at a time.
fn print_records(lines: &BTreeMap<String, Vec<u8>>) {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for bytes in lines.values() {
        let _ = out.write_all(bytes);
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AuditRecord {
        AuditRecord {
            time: "2026-12-04T22:22:04.123Z".into(),
            server: "telephony/cucm-backup".into(),
            pod: "cucm-backup-gateway-0".into(),
            session: "00000000000000ff".into(),
            protocol: AuditProtocol::Sftp,
            user: "cucm".into(),
            peer: "192.0.2.7".into(),
            operation: Operation::Upload,
            path: Some("/in/a.tar".into()),
            target: None,
            bytes: Some(3),
            sha256: Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into()),
            region: "cn-shanghai".into(),
            decision: Decision::Allowed,
            error: None,
            reference: Some("CAC-2026-001".into()),
            truncated: vec![],
        }
    }

    #[test]
    fn a_value_within_its_limit_is_kept_and_a_longer_one_is_cut_with_a_marker() {
        assert_eq!(bounded("cucm", MAX_USER_BYTES), None);
        assert_eq!(bounded(&"u".repeat(256), MAX_USER_BYTES), None);

        let long = "u".repeat(200_000);
        let cut = bounded(&long, MAX_USER_BYTES).unwrap();
        let digest = format!("{:x}", Sha256::digest(long.as_bytes()));
        let marker = format!("…[truncated from 200000 bytes, sha256:{}]", &digest[..16]);
        assert!(cut.ends_with(&marker), "{cut}");
        assert!(cut.starts_with("uuuu"), "{cut}");
        assert!(
            cut.len() <= MAX_USER_BYTES && cut.len() > MAX_USER_BYTES - 4,
            "{cut}"
        );

        // Characters are never split, and escapes count at their written length.
        for value in ["é".repeat(1000), "\u{1}".repeat(1000), "\"".repeat(1000)] {
            let cut = bounded(&value, MAX_PATH_BYTES).unwrap();
            let written = serde_json::to_string(&cut).unwrap();
            assert!(written.len() - 2 <= MAX_PATH_BYTES, "{written}");
            assert!(cut.contains("truncated from"), "{cut}");
        }
        assert_eq!(clipped("short", 64), "short");
    }

    #[tokio::test]
    async fn a_failed_login_with_a_huge_user_name_makes_a_small_record_naming_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::storage::Volume::open_fs(dir.path()).unwrap().into();
        let session = test_session(&storage).await;
        let name = "\u{1b}".repeat(200_000);
        let record = session.complete(
            Entry::new(Operation::Rename)
                .path("/a".repeat(100_000))
                .target("/b".repeat(100_000))
                .denied(format!("no such user {name}")),
        );
        let record = AuditRecord {
            user: session
                .for_user(&name)
                .complete(Entry::new(Operation::Login))
                .user,
            ..record
        };
        let line = serde_json::to_string(&record).unwrap();
        assert!(line.len() < 4096, "{} bytes", line.len());
        assert_eq!(record.truncated, ["path", "target", "error"]);
        let login = session
            .for_user(&name)
            .complete(Entry::new(Operation::Login).denied("x"));
        assert_eq!(login.truncated, ["user"]);
        assert!(serde_json::to_string(&login).unwrap().len() < 1024);
    }

    #[test]
    fn a_record_is_one_json_object_with_the_documented_names_in_order() {
        let line = serde_json::to_string(&record()).unwrap();
        assert_eq!(
            line,
            r#"{"time":"2026-12-04T22:22:04.123Z","server":"telephony/cucm-backup","#.to_owned()
                + r#""pod":"cucm-backup-gateway-0","session":"00000000000000ff","#
                + r#""protocol":"sftp","user":"cucm","peer":"192.0.2.7","operation":"upload","#
                + r#""path":"/in/a.tar","bytes":3,"#
                + r#""sha256":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad","#
                + r#""region":"cn-shanghai","decision":"allowed","reference":"CAC-2026-001"}"#
        );
        let parsed: AuditRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed, record());
    }

    #[test]
    fn a_refusal_carries_its_reason_and_leaves_out_what_does_not_apply() {
        let refused = AuditRecord {
            operation: Operation::Rename,
            target: Some("/b".into()),
            bytes: None,
            sha256: None,
            decision: Decision::Denied,
            error: Some("writes are suspended: region not allowed".into()),
            reference: None,
            protocol: AuditProtocol::Ftps,
            ..record()
        };
        let value = serde_json::to_value(&refused).unwrap();
        assert_eq!(value["decision"], "denied");
        assert_eq!(value["protocol"], "ftps");
        assert_eq!(value["operation"], "rename");
        assert_eq!(value["target"], "/b");
        assert_eq!(value["error"], "writes are suspended: region not allowed");
        let keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for absent in ["bytes", "sha256", "reference"] {
            assert!(!keys.contains(&absent), "{keys:?}");
        }
    }

    fn config(stdout: bool) -> GatewayConfig {
        serde_json::from_value(serde_json::json!({
            "server": "ns/s",
            "region": "cn-shanghai",
            "residency": {"compliant": true, "enforced": true, "crossBorderTransfers": [{
                "policy": "p", "enforced": true, "reference": "CAC-1", "region": "cn-shanghai",
                "expires": i64::MAX, "maxBytes": 10,
            }]},
            "users": [],
            "audit": {"stdout": stdout},
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn records_are_durable_on_the_volume_when_record_returns() {
        let dir = tempfile::tempdir().unwrap();
        let volume = crate::storage::Volume::open_fs(dir.path()).unwrap();
        let identity = AuditIdentity {
            server: "ns/s".into(),
            pod: "s-gateway-0".into(),
            region: "cn-shanghai".into(),
        };
        let log = AuditLog::start(&volume.into(), identity, &config(false)).await;
        let session = log
            .session(AuditProtocol::Sftp, "::ffff:127.0.0.1".parse().unwrap())
            .for_user("cucm");

        session.login("cucm", None).await;
        let reference = session.count_upload(6);
        let entry = Entry::new(Operation::Upload)
            .path("/a")
            .bytes(6)
            .reference(reference);
        session.record(entry).await.unwrap();
        assert!(session.upload_refused().is_none());
        session.count_upload(4);
        let refused = session.upload_refused().unwrap();
        assert!(
            refused.contains("CAC-1") && refused.contains("10 bytes"),
            "{refused}"
        );
        log.close().await;

        let day = timestamp::day_of(&rfc3339_millis(SystemTime::now())).to_owned();
        let path = dir
            .path()
            .join(format!(".sluice-audit/{day}/s-gateway-0.jsonl"));
        let text = std::fs::read_to_string(path).unwrap();
        let records: Vec<AuditRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].operation, Operation::Login);
        assert_eq!(records[0].peer, "127.0.0.1");
        assert_eq!(records[1].reference.as_deref(), Some("CAC-1"));
        assert_eq!(records[0].session, records[1].session);
        let usage = dir
            .path()
            .join(".sluice-audit/usage/CAC-1/s-gateway-0.json");
        let usage: usage::UsageFile =
            serde_json::from_slice(&std::fs::read(usage).unwrap()).unwrap();
        assert_eq!(usage.bytes, 10);
    }
}
