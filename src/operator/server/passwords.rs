//! Password hashing for the gateway configuration, memoised.
//!
//! Argon2id is deliberately expensive (about 19 MiB and tens of milliseconds a hash), and
//! every reconcile renders every user. Because salts are derived from the server's seed,
//! the user's UID and the password, the same salt always comes with the same password and
//! so the same hash: the memo is keyed by salt alone and never changes a result.

use std::collections::HashMap;
use std::sync::Mutex;

use super::host_keys::HostKeyMaterial;

/// Most hashes kept; past this the memo starts over (users are re-hashed once).
const CAPACITY: usize = 4096;

/// Remembers the hashes already computed, by salt.
#[derive(Default)]
pub struct PasswordHashes {
    by_salt: Mutex<HashMap<[u8; 16], String>>,
}

impl PasswordHashes {
    /// The Argon2id PHC hash of `password` for the user with `uid` on a server with
    /// `keys`. Blocks for the duration of a hash when it is not memoised: call it off the
    /// async runtime.
    pub fn hash(&self, keys: &HostKeyMaterial, uid: &str, password: &[u8]) -> String {
        let salt = keys.password_salt(uid, password);
        if let Some(hash) = self.lock().get(&salt) {
            return hash.clone();
        }
        let hash = crate::gateway::auth::hash_password(password, &salt);
        let mut memo = self.lock();
        if memo.len() >= CAPACITY {
            memo.clear();
        }
        memo.insert(salt, hash.clone());
        hash
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 16], String>> {
        self.by_salt.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn memoised_hashes_equal_fresh_ones_and_verify() {
        let keys = HostKeyMaterial {
            keys: BTreeMap::new(),
            salt_seed: vec![3; 32],
        };
        let memo = PasswordHashes::default();
        let first = memo.hash(&keys, "u1", b"correct horse");
        assert_eq!(memo.hash(&keys, "u1", b"correct horse"), first);
        assert_eq!(
            PasswordHashes::default().hash(&keys, "u1", b"correct horse"),
            first
        );
        assert!(crate::gateway::auth::verify_password(
            b"correct horse",
            &first
        ));
        assert_ne!(memo.hash(&keys, "u1", b"battery staple"), first);
    }
}
