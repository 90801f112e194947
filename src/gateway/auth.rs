//! Who may log in: Argon2id password hashes, authorised public keys, and the live set of
//! logins the protocol front ends check credentials against.
//!
//! Contract:
//! - [`hash_password`] is what the operator renders into the gateway configuration; it is
//!   deterministic for a given salt so that rendering is reproducible.
//! - Every password check runs on a small, fixed pool of worker threads
//!   ([`MAX_PASSWORD_WORKERS`] at most) fed by a bounded queue ([`PASSWORD_QUEUE`]). Each
//!   worker allocates its Argon2 memory once and reuses it, so the memory password checks
//!   hold is bounded by the pool, whatever the rate of attempts; allocating 19 MiB per
//!   check would leave the freed blocks in the allocator's arenas for good. Outputs are
//!   compared in constant time.
//! - [`LiveLogins::check_password`] costs one Argon2 evaluation through that queue for
//!   every attempt, including unknown users and users without a password (checked
//!   against a decoy hash of the same cost), so the time a refusal takes does not tell
//!   which names exist. A name longer than [`MAX_USER_NAME`] cannot be a login and is
//!   refused at once, without that cost (the length says nothing about which names
//!   exist).
//! - Public keys are compared as keys (algorithm and key data), never as strings, so
//!   comments and whitespace in `authorized_keys` lines do not matter.
//! - [`Logins::admits`] tells whether a login made earlier still holds under the logins in
//!   force: the user still exists with the same password hash and the same set of keys;
//!   [`Logins::admits_password`] asks the same of a password login, keys aside.
//! - Nothing here logs a password, a hash or key material. An unusable hash or key line is
//!   reported with the user's name, the line's position and at most the key type.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use argon2::password_hash::{Output, SaltString};
use argon2::{Argon2, Block, Params, PasswordHash, PasswordHasher, Version};
use rand::RngCore;
use russh::keys::{Algorithm, PublicKey};
use tokio::sync::{mpsc, oneshot, watch};
use zeroize::Zeroizing;

use crate::gateway::config::GatewayUser;

/// Password checks computed at once, at most: one worker thread each, holding the Argon2
/// memory of the costliest hash it has checked (19 MiB for the hashes the operator
/// renders). Fewer on a pod with fewer cores.
pub const MAX_PASSWORD_WORKERS: usize = 4;

/// Longest login name, in bytes: a login is a TransferUser, whose name is a Kubernetes
/// object name of at most 253 characters (ASCII).
pub const MAX_USER_NAME: usize = 253;

/// Password checks waiting for a worker, at most; further attempts wait for room.
pub const PASSWORD_QUEUE: usize = 64;

/// Largest Argon2 memory cost, in KiB, a configured hash may ask for; a hash asking for
/// more is ignored, so that no configuration can make the workers hold more.
pub const MAX_PASSWORD_MEMORY_KIB: u32 = 64 * 1024;

/// Hashes `password` with Argon2id and the argon2 crate's recommended parameters
/// (19 MiB, 2 iterations, 1 lane), returning a PHC string such as `$argon2id$v=19$...`.
pub fn hash_password(password: &[u8], salt: &[u8; 16]) -> String {
    let salt = SaltString::encode_b64(salt).expect("16 bytes is a valid Argon2 salt length");
    Argon2::default()
        .hash_password(password, &salt)
        .expect("the default Argon2id parameters accept any password shorter than 4 GiB")
        .to_string()
}

/// Whether `password` matches the PHC string `phc`. A malformed `phc` matches nothing.
/// Waits for a password-check worker: call it from a blocking thread, not the executor.
pub fn verify_password(password: &[u8], phc: &str) -> bool {
    PreparedHash::parse(phc).is_ok_and(|hash| workers().verify_blocking(Arc::new(hash), password))
}

/// An Argon2 hash parsed once, ready to check passwords against.
struct PreparedHash {
    algorithm: argon2::Algorithm,
    version: Version,
    params: Params,
    salt: Vec<u8>,
    expected: Output,
}

impl PreparedHash {
    /// Parses a PHC string; the error says why it cannot be used.
    fn parse(phc: &str) -> Result<Self, &'static str> {
        let not_argon2 = "not an Argon2 PHC string";
        let hash = PasswordHash::new(phc).map_err(|_| not_argon2)?;
        let algorithm = argon2::Algorithm::try_from(hash.algorithm).map_err(|_| not_argon2)?;
        let version = match hash.version {
            Some(version) => Version::try_from(version).map_err(|_| not_argon2)?,
            None => Version::default(),
        };
        let params = Params::try_from(&hash).map_err(|_| not_argon2)?;
        if params.m_cost() > MAX_PASSWORD_MEMORY_KIB {
            return Err("asks for more Argon2 memory than the gateway allows");
        }
        let mut salt = [0u8; 64];
        let salt = hash
            .salt
            .ok_or(not_argon2)?
            .decode_b64(&mut salt)
            .map_err(|_| not_argon2)?
            .to_vec();
        let expected = hash.hash.ok_or(not_argon2)?;
        Ok(Self {
            algorithm,
            version,
            params,
            salt,
            expected,
        })
    }

    /// A hash of the same cost that no password matches: random salt and output.
    fn decoy_of(params: Params, algorithm: argon2::Algorithm, version: Version) -> Self {
        let mut salt = vec![0u8; 16];
        let mut output = vec![0u8; params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN)];
        rand::thread_rng().fill_bytes(&mut salt);
        rand::thread_rng().fill_bytes(&mut output);
        Self {
            algorithm,
            version,
            expected: Output::new(&output).expect("Argon2 output lengths are valid outputs"),
            params,
            salt,
        }
    }

    fn decoy(&self) -> Self {
        Self::decoy_of(self.params.clone(), self.algorithm, self.version)
    }

    /// Whether `password` produces this hash, computed in `memory`, which grows to the
    /// size this hash needs and is kept for the next check.
    fn matches(&self, password: &[u8], memory: &mut Vec<Block>) -> bool {
        let blocks = self.params.block_count();
        if memory.len() < blocks {
            memory.resize(blocks, Block::default());
        }
        let mut computed = Zeroizing::new(vec![0u8; self.expected.len()]);
        let argon2 = Argon2::new(self.algorithm, self.version, self.params.clone());
        let hashed = argon2.hash_password_into_with_memory(
            password,
            &self.salt,
            &mut computed,
            &mut memory[..blocks],
        );
        // `Output`'s equality is constant-time.
        hashed.is_ok() && Output::new(&computed).is_ok_and(|computed| computed == self.expected)
    }
}

/// One password to check, and where to send the answer.
struct PasswordJob {
    password: Zeroizing<Vec<u8>>,
    hash: Arc<PreparedHash>,
    answer: oneshot::Sender<bool>,
}

/// The process's password-check workers and their queue.
struct PasswordWorkers {
    queue: mpsc::Sender<PasswordJob>,
}

/// The workers, started on first use; they live as long as the process.
fn workers() -> &'static PasswordWorkers {
    static WORKERS: OnceLock<PasswordWorkers> = OnceLock::new();
    WORKERS.get_or_init(PasswordWorkers::start)
}

impl PasswordWorkers {
    fn start() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (queue, jobs) = mpsc::channel(PASSWORD_QUEUE);
        let jobs = Arc::new(Mutex::new(jobs));
        for index in 0..cores.min(MAX_PASSWORD_WORKERS) {
            let jobs = jobs.clone();
            let started = std::thread::Builder::new()
                .name(format!("password-check-{index}"))
                .spawn(move || run_password_worker(&jobs));
            if let Err(error) = started {
                tracing::error!(%error, "Failed to start a password-check worker");
            }
        }
        Self { queue }
    }

    async fn verify(&self, hash: Arc<PreparedHash>, password: &[u8]) -> bool {
        let (job, answer) = PasswordJob::new(hash, password);
        self.queue.send(job).await.is_ok() && answer.await.unwrap_or(false)
    }

    fn verify_blocking(&self, hash: Arc<PreparedHash>, password: &[u8]) -> bool {
        let (job, answer) = PasswordJob::new(hash, password);
        self.queue.blocking_send(job).is_ok() && answer.blocking_recv().unwrap_or(false)
    }
}

impl PasswordJob {
    fn new(hash: Arc<PreparedHash>, password: &[u8]) -> (Self, oneshot::Receiver<bool>) {
        let (answer, receiver) = oneshot::channel();
        let password = Zeroizing::new(password.to_vec());
        let job = Self {
            password,
            hash,
            answer,
        };
        (job, receiver)
    }
}

fn run_password_worker(jobs: &Mutex<mpsc::Receiver<PasswordJob>>) {
    let mut memory = Vec::new();
    loop {
        let next = jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .blocking_recv();
        let Some(job) = next else { return };
        // The client may have gone while the job waited; its answer is not needed.
        if job.answer.is_closed() {
            continue;
        }
        let matched = job.hash.matches(&job.password, &mut memory);
        let _ = job.answer.send(matched);
    }
}

/// The public keys one user may log in with.
#[derive(Clone, Default)]
pub struct AuthorizedKeys(Vec<PublicKey>);

impl AuthorizedKeys {
    /// Parses OpenSSH `authorized_keys` lines (`type base64 [comment]`). Blank lines and
    /// `#` comments are skipped; a line that does not parse is skipped with a warning
    /// naming `user`, the line number and, if recognisable, the key type.
    pub fn parse(user: &str, lines: &[String]) -> Self {
        let keys = lines
            .iter()
            .enumerate()
            .filter_map(|(index, line)| parse_key_line(user, index + 1, line))
            .collect();
        Self(keys)
    }

    /// Whether `offered` is one of these keys (same algorithm and key data).
    pub fn contains(&self, offered: &PublicKey) -> bool {
        self.0
            .iter()
            .any(|key| key.key_data() == offered.key_data())
    }

    /// Whether both hold the same keys, in whatever order and with whatever comments.
    pub fn same_keys(&self, other: &Self) -> bool {
        let mine: BTreeSet<_> = self.0.iter().map(PublicKey::key_data).collect();
        let theirs: BTreeSet<_> = other.0.iter().map(PublicKey::key_data).collect();
        mine == theirs
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is no usable key.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn parse_key_line(user: &str, line_number: usize, line: &str) -> Option<PublicKey> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    match PublicKey::from_openssh(line) {
        Ok(key) => Some(key),
        Err(error) => {
            // Only the first field, and only if it names an algorithm: anything else on the
            // line may be key material or unsupported options.
            let key_type = line
                .split_whitespace()
                .next()
                .filter(|field| Algorithm::new(field).is_ok())
                .unwrap_or("unrecognised");
            tracing::warn!(
                user,
                line = line_number,
                key_type,
                %error,
                "Ignoring public key that cannot be parsed"
            );
            None
        }
    }
}

/// One user, with credentials prepared for checking.
pub struct Login {
    user: GatewayUser,
    keys: AuthorizedKeys,
    password: Option<Arc<PreparedHash>>,
}

impl Login {
    /// Prepares `user`'s credentials, dropping (with a warning) a password hash that is not
    /// an Argon2 PHC string or asks for more than [`MAX_PASSWORD_MEMORY_KIB`], and key lines
    /// that do not parse.
    pub fn new(mut user: GatewayUser) -> Self {
        let keys = AuthorizedKeys::parse(&user.name, &user.public_keys);
        let password = match user.password_hash.as_deref().map(PreparedHash::parse) {
            Some(Ok(hash)) => Some(Arc::new(hash)),
            Some(Err(reason)) => {
                tracing::warn!(user = %user.name, reason, "Ignoring unusable password hash");
                user.password_hash = None;
                None
            }
            None => None,
        };
        if password.is_none() && keys.is_empty() {
            tracing::warn!(user = %user.name, "User has no usable credential and cannot log in");
        }
        Self {
            user,
            keys,
            password,
        }
    }

    /// The user as configured.
    pub fn user(&self) -> &GatewayUser {
        &self.user
    }

    /// Whether the user may log in with a password at all.
    pub fn has_password(&self) -> bool {
        self.user.password_hash.is_some()
    }

    /// Whether the user may log in with a public key at all.
    pub fn has_public_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Whether `password` is the user's password. Costs one Argon2id evaluation on a
    /// password-check worker and waits for it: call it from a blocking thread. Prefer
    /// [`LiveLogins::check_password`], which does not reveal whether the user exists.
    pub fn accepts_password(&self, password: &[u8]) -> bool {
        self.password
            .as_ref()
            .is_some_and(|hash| workers().verify_blocking(hash.clone(), password))
    }

    /// Whether `key` is one of the user's authorised keys.
    pub fn accepts_key(&self, key: &PublicKey) -> bool {
        self.keys.contains(key)
    }

    /// Whether `other` logs in exactly as this does: same password hash, same keys.
    pub fn same_credentials(&self, other: &Login) -> bool {
        self.user.password_hash == other.user.password_hash && self.keys.same_keys(&other.keys)
    }
}

/// Why a password login was refused, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswordRefusal {
    /// No user of that name logs in with a password.
    NoPasswordLogin,
    /// The password is wrong.
    WrongPassword,
    /// The name is longer than any login's ([`MAX_USER_NAME`]).
    NameTooLong,
}

impl PasswordRefusal {
    /// A short reason for a log field.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoPasswordLogin => "no such password login",
            Self::WrongPassword => "wrong password",
            Self::NameTooLong => "user name too long",
        }
    }
}

/// All logins of one gateway configuration, by name.
pub struct Logins {
    by_name: BTreeMap<String, Arc<Login>>,
    /// What passwords for unknown users are checked against: the cost of a real hash.
    decoy: Arc<PreparedHash>,
}

impl Default for Logins {
    fn default() -> Self {
        Self::new(&[])
    }
}

impl Logins {
    /// Prepares the credentials of every user.
    pub fn new(users: &[GatewayUser]) -> Self {
        let by_name: BTreeMap<_, _> = users
            .iter()
            .map(|user| (user.name.clone(), Arc::new(Login::new(user.clone()))))
            .collect();
        let decoy = by_name
            .values()
            .find_map(|login| login.password.as_ref().map(|hash| hash.decoy()))
            .unwrap_or_else(|| {
                let default = argon2::Algorithm::default();
                PreparedHash::decoy_of(Params::DEFAULT, default, Version::default())
            });
        Self {
            by_name,
            decoy: Arc::new(decoy),
        }
    }

    /// The login called `name`, if any.
    pub fn get(&self, name: &str) -> Option<Arc<Login>> {
        self.by_name.get(name).cloned()
    }

    /// Whether `login`, made under earlier logins, still holds: the user exists with the
    /// same credentials.
    pub fn admits(&self, login: &Login) -> bool {
        self.by_name
            .get(&login.user.name)
            .is_some_and(|current| current.same_credentials(login))
    }

    /// Whether `login`, a password login made under earlier logins, still holds: the user
    /// exists with the same password hash. A change of keys does not affect it.
    pub fn admits_password(&self, login: &Login) -> bool {
        self.by_name.get(&login.user.name).is_some_and(|current| {
            current.has_password() && current.user.password_hash == login.user.password_hash
        })
    }

    /// Whether any user may log in with a password.
    pub fn any_password(&self) -> bool {
        self.by_name.values().any(|login| login.has_password())
    }

    /// Whether any user may log in with a public key.
    pub fn any_public_key(&self) -> bool {
        self.by_name.values().any(|login| login.has_public_keys())
    }

    /// Number of logins.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are no logins.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The logins currently in force, shared by every session and replaced as a whole when
/// the configuration changes. Sessions watch it ([`LiveLogins::subscribe`]) to learn when
/// their login no longer holds.
#[derive(Clone)]
pub struct LiveLogins(watch::Sender<Arc<Logins>>);

impl Default for LiveLogins {
    fn default() -> Self {
        Self::new(Logins::default())
    }
}

impl LiveLogins {
    /// Starts with `logins`.
    pub fn new(logins: Logins) -> Self {
        Self(watch::Sender::new(Arc::new(logins)))
    }

    /// The logins in force right now.
    pub fn current(&self) -> Arc<Logins> {
        self.0.borrow().clone()
    }

    /// Puts `logins` in force for every later login attempt and tells the subscribers.
    pub fn replace(&self, logins: Logins) {
        self.0.send_replace(Arc::new(logins));
    }

    /// A receiver that sees every later [`LiveLogins::replace`].
    pub fn subscribe(&self) -> watch::Receiver<Arc<Logins>> {
        self.0.subscribe()
    }

    /// Checks `password` for `user` against the logins in force, on a password-check
    /// worker. Every attempt costs the same, whether the user exists or not, except for a
    /// name longer than [`MAX_USER_NAME`], which no login has and which is refused at once.
    pub async fn check_password(
        &self,
        user: &str,
        password: &[u8],
    ) -> Result<Arc<Login>, PasswordRefusal> {
        if user.len() > MAX_USER_NAME {
            return Err(PasswordRefusal::NameTooLong);
        }
        let logins = self.current();
        let login = logins.get(user).filter(|login| login.has_password());
        let hash = login
            .as_ref()
            .and_then(|login| login.password.clone())
            .unwrap_or_else(|| logins.decoy.clone());
        let matched = workers().verify(hash, password).await;
        match login {
            Some(login) if matched => Ok(login),
            Some(_) => Err(PasswordRefusal::WrongPassword),
            None => Err(PasswordRefusal::NoPasswordLogin),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Permission;

    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC6ovjeiYs++YnFewG7s9QMhdu57ek59CXgyiNgY3Uou";

    fn user(password_hash: Option<String>, public_keys: Vec<String>) -> GatewayUser {
        GatewayUser {
            name: "cucm".into(),
            password_hash,
            public_keys,
            home: "/cucm".into(),
            permissions: vec![Permission::Read],
        }
    }

    #[test]
    fn hashing_is_argon2id_and_reproducible_for_a_given_salt() {
        let first = hash_password(b"correct horse", &[7; 16]);
        let second = hash_password(b"correct horse", &[7; 16]);
        assert_eq!(first, second);
        assert!(
            first.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{first}"
        );
        assert_ne!(first, hash_password(b"correct horse", &[8; 16]));
    }

    #[test]
    fn only_the_right_password_verifies() {
        let phc = hash_password(b"correct horse", &[1; 16]);
        assert!(verify_password(b"correct horse", &phc));
        assert!(!verify_password(b"correct horse!", &phc));
        assert!(!verify_password(b"", &phc));
        assert!(!verify_password(b"correct horse", "not a phc string"));
    }

    #[test]
    fn keys_match_by_key_data_not_by_comment_or_spacing() {
        let keys = AuthorizedKeys::parse("cucm", &[format!("  {ED25519}   ops@example  ")]);
        let offered = PublicKey::from_openssh(&format!("{ED25519} someone-else")).unwrap();
        assert!(keys.contains(&offered));
    }

    #[test]
    fn a_different_key_does_not_match() {
        let keys = AuthorizedKeys::parse("cucm", &[ED25519.to_owned()]);
        let other = PublicKey::from_openssh(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP1FzU05uKXUkBmZNS4gu4vV0CuI6cNaDnX80Bsjmgsq",
        )
        .unwrap();
        assert!(!keys.contains(&other));
    }

    #[test]
    fn unparseable_comment_and_blank_lines_are_skipped() {
        let lines = vec![
            "# a comment".to_owned(),
            String::new(),
            "ssh-ed25519 not-base64!".to_owned(),
            "command=\"x\" ssh-ed25519 AAAA".to_owned(),
            ED25519.to_owned(),
        ];
        assert_eq!(AuthorizedKeys::parse("cucm", &lines).len(), 1);
    }

    #[test]
    fn a_malformed_hash_means_no_password_login() {
        let login = Login::new(user(Some("plaintext".into()), vec![]));
        assert!(!login.has_password());
        assert!(!login.accepts_password(b"plaintext"));
    }

    #[test]
    fn a_hash_asking_for_more_memory_than_allowed_means_no_password_login() {
        // Never computed: only its parameters matter.
        let greedy = "$argon2id$v=19$m=1048576,t=2,p=1$YWJjZGVmZ2hpamtsbW5vcA$\
                      MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY";
        assert!(PasswordHash::new(greedy).is_ok());
        assert!(!Login::new(user(Some(greedy.into()), vec![])).has_password());
    }

    #[tokio::test]
    async fn a_burst_of_password_checks_is_answered_correctly_through_the_bounded_queue() {
        let phc = hash_password(b"right", &[3; 16]);
        let live = LiveLogins::new(Logins::new(&[user(Some(phc), vec![])]));

        let checks = (0..PASSWORD_QUEUE + 8).map(|i| {
            let live = live.clone();
            let password = if i % 4 == 0 { "right" } else { "wrong" };
            tokio::spawn(async move { (i, live.check_password("cucm", password.as_bytes()).await) })
        });
        for (i, outcome) in futures::future::join_all(checks)
            .await
            .into_iter()
            .map(Result::unwrap)
        {
            match outcome {
                Ok(login) => assert!(i % 4 == 0 && login.user().name == "cucm"),
                Err(refusal) => assert_eq!(
                    (i % 4 != 0, refusal),
                    (true, PasswordRefusal::WrongPassword)
                ),
            }
        }
    }

    #[tokio::test]
    async fn unknown_users_and_users_without_a_password_cost_as_much_as_a_wrong_password() {
        let mut keys_only = user(None, vec![ED25519.into()]);
        keys_only.name = "ops".into();
        let users = [
            user(Some(hash_password(b"right", &[5; 16])), vec![]),
            keys_only,
        ];
        let live = LiveLogins::new(Logins::new(&users));

        // The fastest of a few attempts, so that a busy machine only ever slows the
        // known user down, which cannot make this test pass wrongly.
        let fastest = async |name: &str| {
            let mut fastest = std::time::Duration::MAX;
            for _ in 0..5 {
                let started = std::time::Instant::now();
                assert!(live.check_password(name, b"guess").await.is_err());
                fastest = fastest.min(started.elapsed());
            }
            fastest
        };
        let wrong_password = fastest("cucm").await;
        for name in ["nobody", "ops"] {
            let refused = fastest(name).await;
            assert!(
                refused * 3 >= wrong_password,
                "{name}: {refused:?}, a known user with a wrong password: {wrong_password:?}"
            );
        }
        let refused = live.check_password("nobody", b"guess").await;
        assert_eq!(refused.err(), Some(PasswordRefusal::NoPasswordLogin));
    }

    #[tokio::test]
    async fn a_name_longer_than_any_login_is_refused_without_a_password_check() {
        let mut long = user(Some(hash_password(b"right", &[5; 16])), vec![]);
        long.name = "u".repeat(MAX_USER_NAME);
        let live = LiveLogins::new(Logins::new(&[long]));
        let longest = "u".repeat(MAX_USER_NAME);
        assert!(live.check_password(&longest, b"right").await.is_ok());

        let refused = live.check_password(&"u".repeat(200_000), b"right").await;
        assert_eq!(refused.err(), Some(PasswordRefusal::NameTooLong));
        let one_more = format!("{longest}u");
        let refused = live.check_password(&one_more, b"right").await;
        assert_eq!(refused.err(), Some(PasswordRefusal::NameTooLong));
    }

    #[test]
    fn a_login_holds_until_its_user_is_removed_or_its_credentials_change() {
        let phc = hash_password(b"pw", &[1; 16]);
        let before = Logins::new(&[user(Some(phc.clone()), vec![ED25519.into()])]);
        let login = before.get("cucm").unwrap();
        assert!(before.admits(&login));

        let mut renamed_key = user(Some(phc.clone()), vec![format!("{ED25519} new-comment")]);
        renamed_key.permissions.push(Permission::Write);
        assert!(Logins::new(&[renamed_key]).admits(&login));

        assert!(!Logins::new(&[]).admits(&login));
        let new_password = user(Some(hash_password(b"pw", &[2; 16])), vec![ED25519.into()]);
        assert!(!Logins::new(&[new_password]).admits(&login));
        assert!(!Logins::new(&[user(Some(phc.clone()), vec![])]).admits(&login));
        assert!(!Logins::new(&[user(None, vec![ED25519.into()])]).admits(&login));
    }

    #[test]
    fn a_password_login_holds_until_its_user_is_removed_or_its_password_hash_changes() {
        let phc = hash_password(b"pw", &[1; 16]);
        let login = Logins::new(&[user(Some(phc.clone()), vec![])])
            .get("cucm")
            .unwrap();
        let new_key = user(Some(phc.clone()), vec![ED25519.into()]);
        assert!(Logins::new(&[new_key]).admits_password(&login));

        assert!(!Logins::new(&[]).admits_password(&login));
        let new_password = user(Some(hash_password(b"pw", &[2; 16])), vec![]);
        assert!(!Logins::new(&[new_password]).admits_password(&login));
        assert!(!Logins::new(&[user(None, vec![ED25519.into()])]).admits_password(&login));
    }

    #[tokio::test]
    async fn subscribers_see_each_replacement() {
        let live = LiveLogins::new(Logins::new(&[user(None, vec![ED25519.into()])]));
        let mut watching = live.subscribe();
        live.replace(Logins::new(&[]));
        watching.changed().await.unwrap();
        assert!(watching.borrow_and_update().is_empty());
    }

    #[test]
    fn live_logins_are_replaced_as_a_whole() {
        let live = LiveLogins::new(Logins::new(&[user(None, vec![ED25519.into()])]));
        let before = live.current();
        live.replace(Logins::new(&[]));
        assert!(before.get("cucm").is_some());
        assert!(live.current().get("cucm").is_none());
        assert!(before.any_public_key() && !before.any_password());
    }
}
