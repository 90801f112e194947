//! What the protocol front ends do alike with their connections and session tasks: bound
//! the connections they serve, end sessions that do not log in in time or whose login is
//! revoked by a configuration reload, report a panicked session, and drain sessions at
//! shutdown.
//!
//! Contract:
//! - Each front end has its own [`ConnectionLimiter`] with the same [`ConnectionLimits`]:
//!   at most [`MAX_CONNECTIONS`] connections at once and [`MAX_CONNECTIONS_PER_IP`] from
//!   one client address. The first refusal of each spell at a limit is logged at warn,
//!   the others at debug.
//! - [`admission_ends`] completes when a session must end: no login within
//!   [`LOGIN_DEADLINE`] of the accept, or, once logged in, a reload under which its login
//!   no longer holds. What "holds" means is the front end's: SFTP checks the password
//!   hash and the key set ([`Logins::admits`]), FTPS, which logs in with passwords only,
//!   the password hash ([`Logins::admits_password`]).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::gateway::auth::{Login, Logins};

/// Connections one front end serves at once, at most. Each costs a socket, a task and,
/// once logged in, a few open files (an SFTP connection up to
/// [`MAX_CHANNELS`](crate::gateway::sftp::MAX_CHANNELS) × 64, an FTPS one its loopback
/// connection to libunftp and one data connection); 512 keeps that within the
/// file-descriptor limit of a container while leaving room for far more partners than a
/// gateway serves.
pub const MAX_CONNECTIONS: usize = 512;

/// Connections from one client address at once, at most, so that one client cannot take
/// every slot. Behind a load balancer that does not preserve client addresses (a
/// Kubernetes Service with `externalTrafficPolicy: Cluster`) every client shares a few
/// node addresses, and this becomes a limit for all of them together.
pub const MAX_CONNECTIONS_PER_IP: usize = 64;

/// Time from accepting a connection to a successful login, at most. Interactive users
/// type a password well within it; clients that never authenticate are cut off.
pub const LOGIN_DEADLINE: Duration = Duration::from_secs(30);

/// The limits a server enforces on connections; [`Default`] gives the documented
/// constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections at once, at most ([`MAX_CONNECTIONS`]).
    pub total: usize,
    /// Connections at once from one address, at most ([`MAX_CONNECTIONS_PER_IP`]).
    pub per_ip: usize,
    /// Time from accept to login, at most ([`LOGIN_DEADLINE`]).
    pub login_deadline: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            total: MAX_CONNECTIONS,
            per_ip: MAX_CONNECTIONS_PER_IP,
            login_deadline: LOGIN_DEADLINE,
        }
    }
}

/// Counts open connections, in total and per client address, against the limits.
#[derive(Clone)]
pub struct ConnectionLimiter {
    protocol: Protocol,
    limits: ConnectionLimits,
    open: Arc<Mutex<OpenConnections>>,
}

#[derive(Default)]
struct OpenConnections {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
    /// Whether the refusals of the current spell at the total limit were reported.
    total_reported: bool,
    /// Addresses at their limit whose refusals were reported.
    ips_reported: HashSet<IpAddr>,
}

/// One admitted connection; its place is freed when this is dropped.
pub struct ConnectionSlot {
    limiter: ConnectionLimiter,
    ip: IpAddr,
}

impl ConnectionLimiter {
    /// A limiter for `protocol`'s connections, with nothing admitted yet.
    pub fn new(protocol: Protocol, limits: ConnectionLimits) -> Self {
        Self {
            protocol,
            limits,
            open: Arc::default(),
        }
    }

    fn open(&self) -> std::sync::MutexGuard<'_, OpenConnections> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a connection from `ip`, or `None` if a limit is reached. The first
    /// refusal of each spell at a limit is a warning, the others are debug. An
    /// IPv4-mapped IPv6 address counts as its IPv4 address, so a client reaching one port
    /// over IPv6 and another over IPv4 does not get the per-address limit twice.
    pub fn admit(&self, ip: IpAddr) -> Option<ConnectionSlot> {
        let ip = ip.to_canonical();
        let mut open = self.open();
        if open.total >= self.limits.total {
            if !std::mem::replace(&mut open.total_reported, true) {
                let (protocol, limit) = (self.protocol, self.limits.total);
                tracing::warn!(
                    ?protocol,
                    limit,
                    "Refusing connections: the gateway is at its limit"
                );
            }
            tracing::debug!(%ip, "Refused connection: too many connections");
            return None;
        }
        let from_ip = open.by_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= self.limits.per_ip {
            if open.ips_reported.insert(ip) {
                let (protocol, limit) = (self.protocol, self.limits.per_ip);
                tracing::warn!(
                    ?protocol,
                    %ip,
                    limit,
                    "Refusing connections: the address is at its limit"
                );
            }
            tracing::debug!(%ip, "Refused connection: too many connections from one address");
            return None;
        }

        open.total += 1;
        open.by_ip.insert(ip, from_ip + 1);
        Some(ConnectionSlot {
            limiter: self.clone(),
            ip,
        })
    }

    fn release(&self, ip: IpAddr) {
        let mut open = self.open();
        open.total = open.total.saturating_sub(1);
        open.total_reported &= open.total >= self.limits.total;
        let from_ip = open.by_ip.remove(&ip).unwrap_or(1).saturating_sub(1);
        if from_ip > 0 {
            open.by_ip.insert(ip, from_ip);
        }
        if from_ip < self.limits.per_ip {
            open.ips_reported.remove(&ip);
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.limiter.release(self.ip);
    }
}

/// Why the gateway ends a session that the client has not ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// No login within the deadline.
    NoLogin,
    /// The login no longer holds after a configuration reload.
    Revoked,
}

impl Ending {
    /// Logs why the session is ended: a revocation at info, a missed deadline at debug.
    pub fn report(self) {
        match self {
            Self::NoLogin => tracing::debug!("Disconnecting: no login before the deadline"),
            Self::Revoked => tracing::info!(
                reason = "user removed or credentials changed",
                "Disconnecting session: its login was revoked"
            ),
        }
    }

    /// What the client is told, in lower case.
    pub fn message(self) -> String {
        match self {
            Self::NoLogin => "authentication timed out".into(),
            Self::Revoked => "your login was revoked".into(),
        }
    }
}

/// Completes when the session must end: no login by `deadline`, or, after the login, a
/// change of `logins` under which it no longer holds as `holds` judges it. A session whose
/// `login` sender is gone is ending by itself, and this never completes.
pub async fn admission_ends(
    mut login: watch::Receiver<Option<Arc<Login>>>,
    mut logins: watch::Receiver<Arc<Logins>>,
    deadline: Instant,
    holds: fn(&Logins, &Login) -> bool,
) -> Ending {
    let logged_in = tokio::time::timeout_at(deadline, login.wait_for(Option::is_some))
        .await
        // Taken out of the watch's guard at once: the guard must not live across an await.
        .map(|waited| waited.ok().and_then(|login| login.clone()));
    let Ok(login) = logged_in else {
        return Ending::NoLogin;
    };
    let Some(login) = login else {
        // The handler is gone, so the session is ending by itself.
        return std::future::pending().await;
    };

    loop {
        // Checked once right away too: the logins may have changed during the login.
        if !holds(&logins.borrow_and_update(), &login) {
            return Ending::Revoked;
        }
        if logins.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Time after the grace period that disconnected sessions get to wind down.
pub const DISCONNECT_WAIT: Duration = Duration::from_secs(2);

/// The front end a session belongs to, for log lines.
#[derive(Clone, Copy, Debug)]
pub enum Protocol {
    /// The SSH/SFTP front end.
    Sftp,
    /// The FTPS front end.
    Ftps,
}

/// A session task that panicked is a bug worth an error; its connection is gone.
pub fn report_panic(protocol: Protocol, ended: Result<(), tokio::task::JoinError>) {
    if let Err(error) = ended
        && error.is_panic()
    {
        tracing::error!(?protocol, %error, "Session panicked");
    }
}

/// Lets running sessions finish for `grace`, then tells the rest to disconnect through
/// `disconnect` and aborts whatever is still running [`DISCONNECT_WAIT`] later.
pub async fn drain(
    protocol: Protocol,
    mut sessions: JoinSet<()>,
    grace: Duration,
    disconnect: watch::Sender<bool>,
) {
    if sessions.is_empty() {
        return;
    }
    tracing::info!(
        ?protocol,
        sessions = sessions.len(),
        ?grace,
        "Waiting for sessions to end"
    );
    let all_ended = async { while sessions.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all_ended).await.is_ok() {
        return;
    }

    tracing::info!(
        ?protocol,
        sessions = sessions.len(),
        "Disconnecting remaining sessions"
    );
    let _ = disconnect.send(true);
    let all_ended = async { while sessions.join_next().await.is_some() {} };
    if tokio::time::timeout(DISCONNECT_WAIT, all_ended)
        .await
        .is_err()
    {
        sessions.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Permission;
    use crate::gateway::auth::hash_password;
    use crate::gateway::config::GatewayUser;

    fn limits(total: usize, per_ip: usize) -> ConnectionLimits {
        ConnectionLimits {
            total,
            per_ip,
            login_deadline: LOGIN_DEADLINE,
        }
    }

    #[test]
    fn connections_are_limited_in_total_and_per_address() {
        let limiter = ConnectionLimiter::new(Protocol::Sftp, limits(3, 2));
        let [a, b, c]: [IpAddr; 3] =
            ["192.0.2.1", "192.0.2.2", "192.0.2.3"].map(|ip| ip.parse().unwrap());

        let a1 = limiter.admit(a).unwrap();
        let _a2 = limiter.admit(a).unwrap();
        assert!(limiter.admit(a).is_none(), "a third from one address");
        let b1 = limiter.admit(b).unwrap();
        assert!(limiter.admit(c).is_none(), "a fourth in total");

        drop(a1);
        let _c1 = limiter.admit(c).unwrap();
        assert!(limiter.admit(a).is_none());
        drop(b1);
        let _a3 = limiter.admit(a);
        assert!(limiter.admit(a).is_none());
        assert_eq!(limiter.open().by_ip.get(&b), None);
    }

    #[test]
    fn an_ipv4_mapped_address_counts_as_its_ipv4_address() {
        let limiter = ConnectionLimiter::new(Protocol::Ftps, limits(8, 2));
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let _first = limiter.admit(v4).unwrap();
        let _second = limiter.admit(mapped).unwrap();
        assert!(limiter.admit(v4).is_none());
        assert!(limiter.admit(mapped).is_none());
    }

    fn user(password: &[u8], keys: Vec<String>) -> GatewayUser {
        GatewayUser {
            name: "cucm".into(),
            password_hash: Some(hash_password(password, &[4; 16])),
            public_keys: keys,
            home: "/cucm".into(),
            permissions: vec![Permission::Read],
        }
    }

    #[tokio::test]
    async fn a_session_ends_at_the_deadline_or_when_a_reload_revokes_its_login() {
        let live = crate::gateway::auth::LiveLogins::new(Logins::new(&[user(b"pw", vec![])]));
        let deadline = Instant::now() + Duration::from_millis(200);

        let (_never, no_login) = watch::channel(None);
        let ending = admission_ends(no_login, live.subscribe(), deadline, Logins::admits).await;
        assert_eq!(ending, Ending::NoLogin);
        assert!(Instant::now() >= deadline);

        let (login_tx, login_rx) = watch::channel(None);
        let mut ends = Box::pin(admission_ends(
            login_rx,
            live.subscribe(),
            Instant::now() + Duration::from_millis(200),
            Logins::admits_password,
        ));
        login_tx.send_replace(live.current().get("cucm"));
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC6ovjeiYs++YnFewG7s9QMhdu57ek59CXgyiNgY3Uou";
        live.replace(Logins::new(&[user(b"pw", vec![key.into()])]));
        // Past the deadline too: logged in, the session is no longer bound by it.
        let still_running = tokio::time::timeout(Duration::from_millis(400), &mut ends).await;
        assert!(
            still_running.is_err(),
            "a key change revoked a password login"
        );

        live.replace(Logins::new(&[user(b"new", vec![])]));
        assert_eq!(ends.await, Ending::Revoked);
    }
}
