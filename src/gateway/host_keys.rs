//! SSH host keys of a gateway.
//!
//! Contract: the operator calls [`generate`] once per TransferServer and stores the result
//! in the host-key Secret, one OpenSSH private-key file per algorithm under the names
//! OpenSSH's `sshd` uses ([`ED25519_FILE`], [`ECDSA_FILE`], [`RSA_FILE`]); the gateway
//! reads the mounted files with [`load`]. [`fingerprints`] gives the SHA-256 fingerprints
//! exactly as `ssh-keygen -l` prints them, for the TransferServer's status. Private keys
//! are never logged.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use getrandom::SysRng;
use russh::keys::ssh_key::private::RsaKeypair;
use russh::keys::ssh_key::rand_core::UnwrapErr;
use russh::keys::ssh_key::{self, LineEnding};
use russh::keys::{Algorithm, EcdsaCurve, HashAlg, PrivateKey};

/// File name of the Ed25519 host key.
pub const ED25519_FILE: &str = "ssh_host_ed25519_key";
/// File name of the ECDSA (NIST P-256) host key.
pub const ECDSA_FILE: &str = "ssh_host_ecdsa_key";
/// File name of the RSA host key.
pub const RSA_FILE: &str = "ssh_host_rsa_key";
/// Size of a generated RSA host key, in bits.
pub const RSA_BITS: usize = 3072;

/// The host-key files a gateway knows, in the order their keys are offered.
pub const FILES: [&str; 3] = [ED25519_FILE, ECDSA_FILE, RSA_FILE];

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    /// A new key could not be generated or encoded.
    #[error("failed to generate host key {file}")]
    Generate {
        /// File name the key was meant for.
        file: &'static str,
        /// What ssh-key reported.
        #[source]
        source: ssh_key::Error,
    },
    /// A host-key file could not be read.
    #[error("failed to read host key {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the filesystem reported.
        #[source]
        source: io::Error,
    },
    /// A host key is not an unencrypted OpenSSH private key.
    #[error("host key {name} is not an unencrypted OpenSSH private key")]
    Parse {
        /// File name of the key.
        name: String,
        /// What ssh-key reported, if it got that far.
        #[source]
        source: Option<ssh_key::Error>,
    },
    /// The directory holds none of the known host-key files.
    #[error("no host key ({}) found in {}", FILES.join(", "), dir.display())]
    Missing {
        /// The directory searched.
        dir: PathBuf,
    },
}

/// Generates an Ed25519, an ECDSA P-256 and an RSA 3072 host key, returned as file name
/// to OpenSSH private-key PEM.
pub fn generate() -> Result<BTreeMap<String, String>, HostKeyError> {
    let mut rng = UnwrapErr(SysRng);
    let ecdsa = Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP256,
    };

    let ed25519 = PrivateKey::random(&mut rng, Algorithm::Ed25519);
    let ecdsa = PrivateKey::random(&mut rng, ecdsa);
    let rsa = RsaKeypair::random(&mut rng, RSA_BITS).map(PrivateKey::from);

    [
        (ED25519_FILE, ed25519),
        (ECDSA_FILE, ecdsa),
        (RSA_FILE, rsa),
    ]
    .into_iter()
    .map(|(file, key)| {
        let pem = key.and_then(|key| key.to_openssh(LineEnding::LF));
        let pem = pem.map_err(|source| HostKeyError::Generate { file, source })?;
        Ok((file.to_owned(), pem.as_str().to_owned()))
    })
    .collect()
}

/// Loads the host keys found in `dir` (a mounted host-key Secret). Files with other names
/// are ignored; at least one known key must be present.
pub fn load(dir: &Path) -> Result<Vec<PrivateKey>, HostKeyError> {
    let mut keys = Vec::new();
    for name in FILES {
        let path = dir.join(name);
        let pem = match std::fs::read_to_string(&path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(HostKeyError::Read { path, source }),
        };
        keys.push(parse(name, &pem)?);
    }
    if keys.is_empty() {
        return Err(HostKeyError::Missing {
            dir: dir.to_owned(),
        });
    }
    Ok(keys)
}

/// The SHA-256 fingerprint of each key, as `(algorithm, "SHA256:...")` where the algorithm
/// is the OpenSSH name (`ssh-ed25519`, `ecdsa-sha2-nistp256`, `ssh-rsa`), in file-name
/// order.
pub fn fingerprints(
    keys: &BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, HostKeyError> {
    keys.iter()
        .map(|(name, pem)| {
            let key = parse(name, pem)?;
            let algorithm = key.algorithm().as_str().to_owned();
            Ok((algorithm, key.fingerprint(HashAlg::Sha256).to_string()))
        })
        .collect()
}

fn parse(name: &str, pem: &str) -> Result<PrivateKey, HostKeyError> {
    let parse_error = |source| HostKeyError::Parse {
        name: name.to_owned(),
        source,
    };
    let key = PrivateKey::from_openssh(pem).map_err(|e| parse_error(Some(e)))?;
    if key.is_encrypted() {
        return Err(parse_error(None));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// `ssh-keygen -lf` on a private-key file: `bits SHA256:... comment (TYPE)`.
    fn ssh_keygen_fingerprint(path: &Path) -> (String, String, String) {
        let out = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout).unwrap();
        let fields: Vec<&str> = line.split_whitespace().collect();
        let key_type = fields.last().unwrap().trim_matches(['(', ')']).to_owned();
        (fields[0].to_owned(), fields[1].to_owned(), key_type)
    }

    #[test]
    fn generated_keys_have_the_fingerprints_ssh_keygen_prints() {
        let keys = generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (name, pem) in &keys {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }

        let ours: BTreeMap<String, String> = fingerprints(&keys).unwrap().into_iter().collect();
        let expected = [
            (ECDSA_FILE, "ecdsa-sha2-nistp256", "256", "ECDSA"),
            (ED25519_FILE, "ssh-ed25519", "256", "ED25519"),
            (RSA_FILE, "ssh-rsa", "3072", "RSA"),
        ];
        for (file, algorithm, bits, key_type) in expected {
            let theirs = ssh_keygen_fingerprint(&dir.path().join(file));
            assert_eq!(
                theirs,
                (bits.into(), ours[algorithm].clone(), key_type.into())
            );
        }
    }

    #[test]
    fn loading_finds_the_known_files_and_ignores_others() {
        let keys = generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ED25519_FILE), &keys[ED25519_FILE]).unwrap();
        std::fs::write(dir.path().join(RSA_FILE), &keys[RSA_FILE]).unwrap();
        std::fs::write(dir.path().join("README"), "not a key").unwrap();

        let loaded = load(dir.path()).unwrap();
        let algorithms: Vec<Algorithm> = loaded.iter().map(|k| k.algorithm()).collect();
        assert_eq!(
            algorithms,
            [Algorithm::Ed25519, Algorithm::Rsa { hash: None }]
        );
    }

    #[test]
    fn an_empty_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(HostKeyError::Missing { .. })
        ));
    }

    #[test]
    fn a_corrupt_key_is_an_error_that_does_not_echo_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ECDSA_FILE), "-----BEGIN SECRET-----").unwrap();
        let error = load(dir.path()).unwrap_err();
        assert!(matches!(error, HostKeyError::Parse { .. }));
        assert!(!error.to_string().contains("SECRET"));
    }
}
