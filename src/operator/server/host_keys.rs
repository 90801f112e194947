//! The per-server secret material kept in the host-key Secret.
//!
//! Generated once when the Secret does not exist and never regenerated while it does:
//! clients pin host keys, so a new key would look like an attack. Besides the SSH host
//! keys the Secret holds a random seed from which password salts are derived, so the
//! rendered configuration is reproducible without storing salts elsewhere.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::Secret;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Key of the host-key Secret holding the password-salt seed. Not mounted into pods.
pub const SALT_SEED_KEY: &str = "password-salt-seed";

/// Host keys and salt seed of one server.
#[derive(Clone, PartialEq, Eq)]
pub struct HostKeyMaterial {
    /// OpenSSH private keys by file name (`ssh_host_ed25519_key`, ...).
    pub keys: BTreeMap<String, String>,
    /// 32 random bytes from which password salts are derived.
    pub salt_seed: Vec<u8>,
}

impl std::fmt::Debug for HostKeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKeyMaterial")
            .field("keys", &self.keys.keys())
            .finish_non_exhaustive()
    }
}

impl HostKeyMaterial {
    /// Generates new host keys and a new seed.
    pub fn generate() -> anyhow::Result<Self> {
        let keys = crate::gateway::host_keys::generate()?;
        let mut salt_seed = vec![0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut salt_seed);
        Ok(Self { keys, salt_seed })
    }

    /// Reads the material from an existing Secret, or `None` if it is incomplete.
    pub fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let salt_seed = data.get(SALT_SEED_KEY)?.0.clone();
        let keys: BTreeMap<String, String> = data
            .iter()
            .filter(|(name, _)| name.starts_with("ssh_host_"))
            .filter_map(|(name, value)| {
                Some((name.clone(), String::from_utf8(value.0.clone()).ok()?))
            })
            .collect();
        (!keys.is_empty() && salt_seed.len() >= 16).then_some(Self { keys, salt_seed })
    }

    /// The Secret data holding this material.
    pub fn to_secret_data(&self) -> BTreeMap<String, k8s_openapi::ByteString> {
        let mut data: BTreeMap<_, _> = self
            .keys
            .iter()
            .map(|(name, pem)| {
                (
                    name.clone(),
                    k8s_openapi::ByteString(pem.clone().into_bytes()),
                )
            })
            .collect();
        data.insert(
            SALT_SEED_KEY.to_string(),
            k8s_openapi::ByteString(self.salt_seed.clone()),
        );
        data
    }

    /// The salt for a user's password: unique per server, user and password, and
    /// reproducible, so re-rendering an unchanged user gives an identical hash.
    pub fn password_salt(&self, user_uid: &str, password: &[u8]) -> [u8; 16] {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.salt_seed).expect("HMAC takes any key length");
        mac.update(b"sluice password salt\0");
        mac.update(user_uid.as_bytes());
        mac.update(b"\0");
        mac.update(&Sha256::digest(password));
        let digest = mac.finalize().into_bytes();
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&digest[..16]);
        salt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn material(seed: u8) -> HostKeyMaterial {
        HostKeyMaterial {
            keys: BTreeMap::new(),
            salt_seed: vec![seed; 32],
        }
    }

    #[test]
    fn salts_are_reproducible_and_differ_by_seed_user_and_password() {
        let a = material(1);
        assert_eq!(a.password_salt("u1", b"pw"), a.password_salt("u1", b"pw"));
        assert_ne!(a.password_salt("u1", b"pw"), a.password_salt("u2", b"pw"));
        assert_ne!(a.password_salt("u1", b"pw"), a.password_salt("u1", b"pw2"));
        assert_ne!(
            a.password_salt("u1", b"pw"),
            material(2).password_salt("u1", b"pw")
        );
    }

    #[test]
    fn debug_output_shows_no_key_material() {
        let mut m = material(7);
        m.keys.insert(
            "ssh_host_ed25519_key".into(),
            "-----BEGIN OPENSSH PRIVATE KEY-----".into(),
        );
        let text = format!("{m:?}");
        assert!(text.contains("ssh_host_ed25519_key"));
        assert!(!text.contains("BEGIN"));
        assert!(!text.contains("7, 7"));
    }
}
