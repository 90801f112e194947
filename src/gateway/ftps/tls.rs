//! TLS for the FTPS front end: the certificate of a `kubernetes.io/tls` Secret, reloaded
//! when the mounted files change, and the rustls configuration of every connection.
//!
//! Contract:
//! - [`CertificateStore::open`] reads [`CERT_FILE`] (the chain, leaf first) and
//!   [`KEY_FILE`] from a directory; [`CertificateStore::watch`] re-reads them every poll
//!   interval and, when their content hash changed and they parse, swaps the certificate
//!   in one step. Established connections keep the one they were made with.
//! - A missing, unusable or expired certificate is never served:
//!   [`CertificateStore::current`] returns `None` and the listeners refuse connections
//!   until a valid certificate appears. This is logged at error once per change of state,
//!   never per connection. A change that does not parse keeps the previous certificate.
//! - [`certificate_info`] reports the leaf's notAfter and SHA-256 fingerprint, for the
//!   operator to show on the server's status.
//! - [`server_config`]: TLS 1.2 and 1.3 only, ECDHE with AEAD cipher suites only, the
//!   configured minimum version. [`session_config`] gives every FTPS session a copy with
//!   a session cache and ticket keys of its own (unless reuse is [`SessionReuse::Never`]),
//!   so a data connection can resume only the session of its own control connection:
//!   resumption then proves the data connection comes from the client that logged in.
//! - Private keys are never logged.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::crypto::ring::{self as provider, cipher_suite};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::server::{ServerConfig, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::version::{TLS12, TLS13};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::gateway::config::{SessionReuse, TlsVersion};
use crate::gateway::{ErrorChain, stopped};

/// File of the certificate chain, PEM, leaf first (the Secret's `tls.crt`).
pub const CERT_FILE: &str = "tls.crt";
/// File of the private key, PEM (the Secret's `tls.key`).
pub const KEY_FILE: &str = "tls.key";

/// TLS sessions one FTPS session remembers for resumption by session ID (TLS 1.2 clients
/// without tickets): the control connection's, and a few from data connections.
const SESSION_CACHE_SIZE: usize = 32;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("failed to read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the filesystem reported.
        #[source]
        source: io::Error,
    },
    /// The certificate file holds no PEM certificate.
    #[error("no PEM certificate found")]
    NoCertificate,
    /// The leaf certificate is not valid X.509.
    #[error("the certificate is not valid X.509")]
    Parse(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// The key file holds no usable private key.
    #[error("no usable PEM private key found")]
    NoKey,
    /// The private key cannot be used or does not belong to the certificate.
    #[error("the private key cannot be used with the certificate")]
    Key(#[source] rustls::Error),
}

/// What the operator shows about a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Start of the leaf certificate's validity (X.509 notBefore).
    pub not_before: SystemTime,
    /// End of the leaf certificate's validity (X.509 notAfter).
    pub not_after: SystemTime,
    /// SHA-256 of the leaf certificate's DER encoding, as colon-separated upper-case hex
    /// pairs (what `openssl x509 -fingerprint -sha256` prints).
    pub sha256_fingerprint: String,
}

impl CertificateInfo {
    /// Whether the certificate has expired at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now > self.not_after
    }

    /// Whether `now` lies within the certificate's validity period. Clients refuse a
    /// certificate outside it, so it is not served.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }

    /// notBefore as an RFC 3339 UTC timestamp.
    pub fn not_before_rfc3339(&self) -> String {
        rfc3339(self.not_before)
    }

    /// notAfter as an RFC 3339 UTC timestamp, such as `2031-04-01T12:00:00Z`.
    pub fn not_after_rfc3339(&self) -> String {
        rfc3339(self.not_after)
    }
}

/// The notAfter and fingerprint of the first (leaf) certificate in a PEM chain such as a
/// `kubernetes.io/tls` Secret's `tls.crt`.
pub fn certificate_info(cert_pem: &[u8]) -> Result<CertificateInfo, TlsError> {
    let chain = parse_chain(cert_pem)?;
    leaf_info(&chain[0])
}

fn parse_chain(cert_pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain: Vec<_> = CertificateDer::pem_slice_iter(cert_pem)
        .map_while(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(chain)
}

/// Checks that `key_pem` holds a private key usable with the leaf of `cert_pem` and
/// returns what is known about the certificate. Errors never contain key material.
pub fn check_pair(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertificateInfo, TlsError> {
    load_pair(cert_pem, key_pem, &Arc::new(crypto_provider())).map(|loaded| loaded.info)
}

fn load_pair(
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &Arc<CryptoProvider>,
) -> Result<Loaded, TlsError> {
    let chain = parse_chain(cert_pem)?;
    let info = leaf_info(&chain[0])?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsError::NoKey)?;
    let key = CertifiedKey::from_der(chain, key, provider).map_err(TlsError::Key)?;
    Ok(Loaded {
        key: Arc::new(key),
        info,
    })
}

fn leaf_info(leaf: &CertificateDer<'_>) -> Result<CertificateInfo, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(TlsError::Parse)?;
    let time = |seconds: i64| match u64::try_from(seconds) {
        Ok(seconds) => UNIX_EPOCH + Duration::from_secs(seconds),
        Err(_) => UNIX_EPOCH,
    };
    let not_before = time(parsed.validity().not_before.timestamp());
    let not_after = time(parsed.validity().not_after.timestamp());
    let fingerprint = Sha256::digest(leaf)
        .iter()
        .map(|byte| format!("{byte:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    Ok(CertificateInfo {
        not_before,
        not_after,
        sha256_fingerprint: fingerprint,
    })
}

/// A certificate ready to serve, with what is logged about it.
struct Loaded {
    key: Arc<CertifiedKey>,
    info: CertificateInfo,
}

/// The gateway's FTPS certificate, swapped as a whole when the mounted files change.
pub struct CertificateStore {
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    loaded: RwLock<Option<Arc<Loaded>>>,
    /// Hash of the files as read when the store was opened.
    opened_hash: Option<[u8; 32]>,
}

impl fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl CertificateStore {
    /// Loads the certificate in `dir`, if there is a usable one, logging the outcome.
    pub fn open(dir: &Path) -> Arc<Self> {
        let mut store = Self {
            dir: dir.to_owned(),
            provider: Arc::new(crypto_provider()),
            loaded: RwLock::new(None),
            opened_hash: None,
        };
        match store.read_files_blocking() {
            Ok(bytes) => {
                store.opened_hash = Some(digest(&bytes));
                let _ = store.install(&bytes);
            }
            Err(error) => log_unavailable(&error),
        }
        Arc::new(store)
    }

    /// The certificate to present now, if there is one within its validity period.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        let loaded = self.loaded()?;
        loaded
            .info
            .is_valid_at(SystemTime::now())
            .then(|| loaded.key.clone())
    }

    /// What is known about the certificate loaded last, expired or not.
    pub fn info(&self) -> Option<CertificateInfo> {
        self.loaded().map(|loaded| loaded.info.clone())
    }

    fn loaded(&self) -> Option<Arc<Loaded>> {
        self.loaded
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Re-reads the files every `interval` until `stop` turns true, installing a changed
    /// certificate and reporting when the one in force expires.
    pub async fn watch(self: Arc<Self>, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut hash = self.opened_hash;
        let mut read_failing = hash.is_none();
        let mut expired_reported = self.expired_now();
        loop {
            tokio::select! {
                () = stopped(&mut stop) => return,
                _ = ticker.tick() => {}
            }

            match self.read_files().await {
                Ok(bytes) => {
                    read_failing = false;
                    let new_hash = digest(&bytes);
                    if hash != Some(new_hash) {
                        hash = Some(new_hash);
                        expired_reported = self.install(&bytes).is_err() || self.expired_now();
                    }
                }
                Err(error) => {
                    if !read_failing {
                        log_unavailable(&error);
                    }
                    read_failing = true;
                }
            }

            if !expired_reported && self.expired_now() {
                expired_reported = true;
                self.log_expired();
            }
        }
    }

    fn expired_now(&self) -> bool {
        self.loaded()
            .is_some_and(|loaded| loaded.info.is_expired_at(SystemTime::now()))
    }

    /// Parses `(certificate, key)` and puts it in force, or keeps the previous one.
    fn install(&self, (cert_pem, key_pem): &(Vec<u8>, Vec<u8>)) -> Result<(), TlsError> {
        match self.parse(cert_pem, key_pem) {
            Ok(loaded) => {
                tracing::info!(
                    not_after = %loaded.info.not_after_rfc3339(),
                    fingerprint = %loaded.info.sha256_fingerprint,
                    "Loaded FTPS certificate"
                );
                let now = SystemTime::now();
                let expired = loaded.info.is_expired_at(now);
                let early = !expired && !loaded.info.is_valid_at(now);
                let not_before = loaded.info.not_before_rfc3339();
                *self
                    .loaded
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Arc::new(loaded));
                if expired {
                    self.log_expired();
                }
                if early {
                    tracing::error!(
                        %not_before,
                        "FTPS certificate is not valid yet; FTPS connections are refused until then"
                    );
                }
                Ok(())
            }
            Err(error) => {
                let previous = self.loaded().is_some();
                tracing::error!(
                    dir = %self.dir.display(),
                    error = %ErrorChain(&error),
                    keeping_previous = previous,
                    "Ignoring unusable FTPS certificate"
                );
                Err(error)
            }
        }
    }

    fn parse(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<Loaded, TlsError> {
        load_pair(cert_pem, key_pem, &self.provider)
    }

    fn log_expired(&self) {
        if let Some(info) = self.info() {
            tracing::error!(
                not_after = %info.not_after_rfc3339(),
                fingerprint = %info.sha256_fingerprint,
                "FTPS certificate has expired; FTPS connections are refused until it is renewed"
            );
        }
    }

    async fn read_files(&self) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
        let (cert, key) = (self.dir.join(CERT_FILE), self.dir.join(KEY_FILE));
        let cert_pem = tokio::fs::read(&cert)
            .await
            .map_err(|source| TlsError::Read { path: cert, source })?;
        let key_pem = tokio::fs::read(&key)
            .await
            .map_err(|source| TlsError::Read { path: key, source })?;
        Ok((cert_pem, key_pem))
    }

    fn read_files_blocking(&self) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
        let read =
            |path: PathBuf| std::fs::read(&path).map_err(|source| TlsError::Read { path, source });
        Ok((
            read(self.dir.join(CERT_FILE))?,
            read(self.dir.join(KEY_FILE))?,
        ))
    }
}

impl ResolvesServerCert for CertificateStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

fn log_unavailable(error: &TlsError) {
    tracing::error!(
        error = %ErrorChain(error),
        "FTPS certificate unavailable; FTPS connections are refused until it can be read"
    );
}

fn digest((cert, key): &(Vec<u8>, Vec<u8>)) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update((cert.len() as u64).to_be_bytes());
    hasher.update(cert);
    hasher.update(key);
    hasher.finalize().into()
}

/// ring with only ECDHE key exchange and AEAD ciphers. rustls offers nothing weaker, but
/// the list is spelled out so that a future default cannot widen it unnoticed.
fn crypto_provider() -> CryptoProvider {
    CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        ..provider::default_provider()
    }
}

/// The rustls configuration of a policy, without any session resumption; see
/// [`session_config`] for what each FTPS session uses.
pub fn server_config(
    certificates: Arc<CertificateStore>,
    min_version: TlsVersion,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let versions: &[&rustls::SupportedProtocolVersion] = match min_version {
        TlsVersion::V1_2 => &[&TLS13, &TLS12],
        TlsVersion::V1_3 => &[&TLS13],
    };
    let mut config = ServerConfig::builder_with_provider(certificates.provider.clone())
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(certificates);
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The TLS configurations of one FTPS session. Both resume the same sessions; they differ
/// in whether they hand out TLS 1.3 tickets after the handshake.
///
/// Clients use a TLS 1.3 ticket once (RFC 8446 C.4; curl does), so a client making one
/// data connection after another needs a fresh ticket from each. But a client that is
/// uploading need not read anything, and closing a socket with unread data (the tickets)
/// makes the kernel reset the connection and drop what it had not sent yet: the end of
/// the upload. Both lftp and curl lose uploads this way now and then. So only a data
/// connection known to carry a download or a listing gets tickets. The consequence: a
/// client like curl, using TLS 1.3, resumes the session on its first data connection
/// after each upload but not on the next one; that is refused only under
/// [`SessionReuse::Require`]. GnuTLS clients (lftp, FileZilla) resume with the control
/// connection's session every time and are not affected.
#[derive(Clone)]
pub struct SessionTls {
    /// For the control connection and data connections that carry a download or a
    /// listing: TLS 1.3 tickets are handed out.
    pub control: Arc<ServerConfig>,
    /// For other data connections: no tickets.
    pub quiet: Arc<ServerConfig>,
}

/// The configurations for one FTPS session's connections. Unless reuse is off, they share
/// a session cache and ticket keys of their own: sessions can be resumed only within the
/// FTPS session that made them. rustls keeps no record of which session a TLS 1.2
/// resumption continued, so this isolation is what ties a resumed data connection to its
/// control connection.
pub fn session_config(
    policy: &Arc<ServerConfig>,
    reuse: SessionReuse,
) -> Result<SessionTls, rustls::Error> {
    if reuse == SessionReuse::Never {
        return Ok(SessionTls {
            control: policy.clone(),
            quiet: policy.clone(),
        });
    }
    let mut control = ServerConfig::clone(policy);
    // Session IDs for TLS 1.2 (reusable, as FileZilla expects) and stateless tickets,
    // which clients may present again for every data connection.
    control.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    control.ticketer = provider::Ticketer::new()?;
    control.send_tls13_tickets = 2;
    let mut quiet = control.clone();
    quiet.send_tls13_tickets = 0;
    Ok(SessionTls {
        control: Arc::new(control),
        quiet: Arc::new(quiet),
    })
}

/// Formats `time` as an RFC 3339 UTC timestamp with second precision.
fn rfc3339(time: SystemTime) -> String {
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(not_after: (i32, u8, u8)) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(dir: &Path, (cert, key): &(String, String)) {
        std::fs::write(dir.join(CERT_FILE), cert).unwrap();
        std::fs::write(dir.join(KEY_FILE), key).unwrap();
    }

    #[test]
    fn timestamps_are_formatted_as_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let leap_day = UNIX_EPOCH + Duration::from_secs(1_709_164_800 + 3661);
        assert_eq!(rfc3339(leap_day), "2024-02-29T01:01:01Z");
        let end_of_year = UNIX_EPOCH + Duration::from_secs(4_102_444_799);
        assert_eq!(rfc3339(end_of_year), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn info_reports_not_after_and_the_openssl_style_fingerprint() {
        let (cert, _) = certificate((2031, 4, 1));
        let info = certificate_info(cert.as_bytes()).unwrap();
        assert_eq!(info.not_after_rfc3339(), "2031-04-01T00:00:00Z");
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        let expected: Vec<String> = Sha256::digest(&der)
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        assert_eq!(info.sha256_fingerprint, expected.join(":"));
        assert_eq!(info.sha256_fingerprint.len(), 32 * 3 - 1);
        assert!(matches!(
            certificate_info(b"not a certificate"),
            Err(TlsError::NoCertificate)
        ));
    }

    #[test]
    fn a_valid_certificate_is_served_and_an_expired_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &certificate((2099, 1, 1)));
        assert!(CertificateStore::open(dir.path()).current().is_some());

        write(dir.path(), &certificate((2021, 1, 1)));
        let expired = CertificateStore::open(dir.path());
        assert!(expired.current().is_none());
        assert!(expired.info().is_some());
    }

    #[test]
    fn a_certificate_whose_validity_has_not_begun_is_not_served() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2090, 1, 1);
        params.not_after = rcgen::date_time_ymd(2095, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &(cert.pem(), key.serialize_pem()));
        let early = CertificateStore::open(dir.path());
        assert!(early.current().is_none());
        assert_eq!(
            early.info().unwrap().not_before_rfc3339(),
            "2090-01-01T00:00:00Z"
        );
    }

    #[test]
    fn a_missing_or_mismatched_key_serves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(CertificateStore::open(dir.path()).current().is_none());

        let (cert, _) = certificate((2099, 1, 1));
        let (_, other_key) = certificate((2099, 1, 1));
        write(dir.path(), &(cert, other_key));
        assert!(CertificateStore::open(dir.path()).current().is_none());
    }

    #[tokio::test]
    async fn a_changed_certificate_is_swapped_in_and_a_broken_change_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &certificate((2099, 1, 1)));
        let store = CertificateStore::open(dir.path());
        let first = store.info().unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let watcher = tokio::spawn(store.clone().watch(Duration::from_millis(20), stop_rx));

        write(dir.path(), &certificate((2098, 1, 1)));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let second = store.info().unwrap();
        assert_ne!(first.sha256_fingerprint, second.sha256_fingerprint);
        assert_eq!(second.not_after_rfc3339(), "2098-01-01T00:00:00Z");

        std::fs::write(dir.path().join(KEY_FILE), "garbage").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(store.info().unwrap(), second);
        assert!(store.current().is_some());

        stop_tx.send(true).unwrap();
        watcher.await.unwrap();
    }

    #[test]
    fn each_session_resumes_only_its_own_tls_sessions_unless_reuse_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let store = CertificateStore::open(dir.path());
        let policy = server_config(store, TlsVersion::V1_3).unwrap();
        let off = session_config(&policy, SessionReuse::Never).unwrap();
        assert_eq!(off.control.send_tls13_tickets, 0);
        assert!(!off.control.session_storage.can_cache());
        assert!(!off.quiet.ticketer.enabled());

        let first = session_config(&policy, SessionReuse::Allow).unwrap();
        let second = session_config(&policy, SessionReuse::Require).unwrap();
        let control = &first.control;
        assert!(control.session_storage.can_cache() && control.ticketer.enabled());
        assert_eq!(first.quiet.send_tls13_tickets, 0);
        control
            .session_storage
            .put(b"id".to_vec(), b"session".to_vec());
        assert!(first.quiet.session_storage.get(b"id").is_some());
        assert!(second.quiet.session_storage.get(b"id").is_none());
        assert!(policy.session_storage.get(b"id").is_none());
    }
}
