//! What the protocol front ends do alike with their session tasks: report a panicked
//! session, and drain sessions at shutdown.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

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
