//! Who may log in: Argon2id password hashes, authorised public keys, and the live set of
//! logins the protocol front ends check credentials against.
//!
//! Contract:
//! - [`hash_password`] is what the operator renders into the gateway configuration; it is
//!   deterministic for a given salt so that rendering is reproducible.
//! - [`verify_password`] compares in constant time (argon2 does) and costs one Argon2id
//!   evaluation: callers run it off the async executor.
//! - Public keys are compared as keys (algorithm and key data), never as strings, so
//!   comments and whitespace in `authorized_keys` lines do not matter.
//! - Nothing here logs a password, a hash or key material. An unusable hash or key line is
//!   reported with the user's name, the line's position and at most the key type.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use argon2::password_hash::SaltString;
use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use russh::keys::{Algorithm, PublicKey};

use crate::gateway::config::GatewayUser;

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
pub fn verify_password(password: &[u8], phc: &str) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    Argon2::default().verify_password(password, &hash).is_ok()
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
}

impl Login {
    /// Prepares `user`'s credentials, dropping (with a warning) a password hash that is not
    /// a PHC string and key lines that do not parse.
    pub fn new(mut user: GatewayUser) -> Self {
        let keys = AuthorizedKeys::parse(&user.name, &user.public_keys);
        if user
            .password_hash
            .as_deref()
            .is_some_and(|phc| PasswordHash::new(phc).is_err())
        {
            tracing::warn!(user = %user.name, "Ignoring password hash that is not a PHC string");
            user.password_hash = None;
        }
        if user.password_hash.is_none() && keys.is_empty() {
            tracing::warn!(user = %user.name, "User has no usable credential and cannot log in");
        }
        Self { user, keys }
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

    /// Whether `password` is the user's password. Costs one Argon2id evaluation; run it
    /// on a blocking thread.
    pub fn accepts_password(&self, password: &[u8]) -> bool {
        self.user
            .password_hash
            .as_deref()
            .is_some_and(|phc| verify_password(password, phc))
    }

    /// Whether `key` is one of the user's authorised keys.
    pub fn accepts_key(&self, key: &PublicKey) -> bool {
        self.keys.contains(key)
    }
}

/// All logins of one gateway configuration, by name.
#[derive(Default)]
pub struct Logins(BTreeMap<String, Arc<Login>>);

impl Logins {
    /// Prepares the credentials of every user.
    pub fn new(users: &[GatewayUser]) -> Self {
        let logins = users
            .iter()
            .map(|user| (user.name.clone(), Arc::new(Login::new(user.clone()))))
            .collect();
        Self(logins)
    }

    /// The login called `name`, if any.
    pub fn get(&self, name: &str) -> Option<Arc<Login>> {
        self.0.get(name).cloned()
    }

    /// Whether any user may log in with a password.
    pub fn any_password(&self) -> bool {
        self.0.values().any(|login| login.has_password())
    }

    /// Whether any user may log in with a public key.
    pub fn any_public_key(&self) -> bool {
        self.0.values().any(|login| login.has_public_keys())
    }

    /// Number of logins.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no logins.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The logins currently in force, shared by every session and replaced as a whole when
/// the configuration changes. A session that is already logged in keeps the [`Login`] it
/// authenticated with.
#[derive(Clone, Default)]
pub struct LiveLogins(Arc<RwLock<Arc<Logins>>>);

impl LiveLogins {
    /// Starts with `logins`.
    pub fn new(logins: Logins) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(logins))))
    }

    /// The logins in force right now.
    pub fn current(&self) -> Arc<Logins> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Puts `logins` in force for every later login attempt.
    pub fn replace(&self, logins: Logins) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(logins);
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
    fn live_logins_are_replaced_as_a_whole() {
        let live = LiveLogins::new(Logins::new(&[user(None, vec![ED25519.into()])]));
        let before = live.current();
        live.replace(Logins::new(&[]));
        assert!(before.get("cucm").is_some());
        assert!(live.current().get("cucm").is_none());
        assert!(before.any_public_key() && !before.any_password());
    }
}
