//! Passive data connections: the front end listens for the client, checks and secures its
//! connection, and relays it to the data port libunftp opened on 127.0.0.1.
//!
//! Contract:
//! - [`DataChannel::open`] listens on a free port of the configured range, on the IP the
//!   client reached the control port on, scanning the range from a random start.
//! - Only a connection from the control connection's client address is taken; another is
//!   closed and logged at warn (data-port theft), and the channel keeps waiting.
//! - With protection on, the client's TLS handshake uses the FTPS session's own TLS
//!   configuration, whose sessions no other FTPS session can resume. Under
//!   [`SessionReuse::Require`](crate::gateway::config::SessionReuse::Require) a handshake
//!   that did not resume one of them is refused. Which configuration is chosen when the
//!   client's hello arrives, by what the session says the connection will carry (see
//!   [`SessionTls`]).
//! - The relay starts only when the front end says so, once it has sent the transfer
//!   command on. A clean end on one side is passed on as a clean end (FIN, TLS
//!   close_notify). Any other end resets libunftp's side, which makes an upload in
//!   progress fail and be discarded rather than published. On a protected connection an
//!   upload ends cleanly only with TLS close_notify (curl and lftp send it): a TLS
//!   connection that merely stops, as when the client is killed, is an interrupted
//!   upload, never a shorter file.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rustls::HandshakeKind;
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_rustls::LazyConfigAcceptor;
use tracing::{Instrument, Span};

use crate::gateway::config::PassivePorts;
use crate::gateway::ftps::protocol::Reply;
use crate::gateway::ftps::stream::ClientStream;
use crate::gateway::ftps::tls::SessionTls;

/// Bytes relayed at a time.
const RELAY_BUFFER: usize = 64 * 1024;
/// A transfer that moves no byte for this long is abandoned.
const TRANSFER_IDLE: Duration = Duration::from_secs(300);
/// Time a client gets to close its end after a download has been sent completely.
const DOWNLOAD_LINGER: Duration = Duration::from_secs(2);
/// Time libunftp gets to store an upload and close its end after the client's ended.
const UPLOAD_SETTLE: Duration = Duration::from_secs(120);
/// Time a client's TLS handshake waits for the session to learn the transfer's direction.
const DIRECTION_WAIT: Duration = Duration::from_secs(2);
/// Time to wait before accepting again after the OS refused an accept (out of files).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How a data connection is secured.
pub struct DataTls {
    /// The FTPS session's TLS configurations (those of its control connection, so that
    /// its TLS session can be resumed).
    pub configs: SessionTls,
    /// Whether a connection that does not resume a TLS session of this FTPS session is
    /// refused.
    pub require_reuse: bool,
}

/// Which way a data connection carries data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// To the client: RETR, LIST, NLST, MLSD.
    Download,
    /// From the client: STOR, APPE.
    Upload,
}

/// Why a data connection could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFailure {
    /// The TLS handshake failed.
    Handshake,
    /// The handshake did not resume the control connection's session, which is required.
    NotResumed,
    /// The client did not connect, or did not finish its handshake, in time.
    Timeout,
}

impl DataFailure {
    /// The reply that ends the transfer command.
    pub fn reply(self) -> Reply {
        match self {
            Self::Handshake => Reply::new(425, "Cannot open data connection: TLS handshake failed"),
            Self::NotResumed => Reply::new(
                522,
                "Data connection refused: it must resume the TLS session of the control \
                 connection (TLS session reuse is required)",
            ),
            Self::Timeout => Reply::new(425, "Data connection was not established in time"),
        }
    }
}

/// What a data channel reports to its session.
#[derive(Debug)]
pub enum DataEvent {
    /// The client's connection is (or cannot be) ready for the transfer.
    Ready(Result<(), DataFailure>),
    /// The relay has ended; `true` if both sides ended cleanly.
    Finished(bool),
}

/// Where a data channel stands, as far as its session knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataState {
    /// Waiting for the client's connection and handshake.
    Connecting,
    /// The client's connection is ready.
    Ready,
    /// The client's connection is unusable.
    Failed(DataFailure),
    /// Data is being relayed.
    Relaying,
    /// The relay has ended.
    Finished,
}

/// One passive data connection, from listening to the end of its relay. Dropping it
/// closes everything.
pub struct DataChannel {
    /// The port the client is to connect to.
    pub port: u16,
    /// Where it stands.
    pub state: DataState,
    /// When the session gives up waiting on it.
    pub deadline: Instant,
    direction: watch::Sender<Option<Direction>>,
    events: mpsc::Receiver<DataEvent>,
    go: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl DataChannel {
    /// Listens on `local_ip` in `ports` for `client_ip`, to relay to `internal` (already
    /// connected to libunftp's data port). The channel waits until `deadline`.
    pub fn open(
        local_ip: IpAddr,
        ports: PassivePorts,
        client_ip: IpAddr,
        internal: TcpStream,
        tls: Option<DataTls>,
        deadline: Instant,
        span: Span,
    ) -> io::Result<Self> {
        let listener = bind_passive(local_ip, ports)?;
        let port = listener.local_addr()?.port();
        let (events_tx, events) = mpsc::channel(2);
        let (go, go_rx) = oneshot::channel();
        let (direction, direction_rx) = watch::channel(None);
        let channel = Connection {
            client_ip,
            internal,
            tls,
            direction: direction_rx,
            events: events_tx,
            span: span.clone(),
        };
        let task = tokio::spawn(channel.run(listener, go_rx).instrument(span));
        Ok(Self {
            port,
            state: DataState::Connecting,
            deadline,
            direction,
            events,
            go: Some(go),
            task,
        })
    }

    /// The next report from the channel; `None` once it has nothing more to say.
    /// Cancel-safe.
    pub async fn next_event(&mut self) -> Option<DataEvent> {
        self.events.recv().await
    }

    /// Tells the channel which way the transfer it waits for goes, before the client's TLS
    /// handshake if the client waits for the preliminary reply to start it (as curl, lftp
    /// and FileZilla do).
    pub fn set_direction(&self, direction: Direction) {
        self.direction.send_replace(Some(direction));
    }

    /// Starts relaying (the transfer command has been sent on to libunftp).
    pub fn start_relay(&mut self) {
        if let Some(go) = self.go.take() {
            let _ = go.send(());
        }
        self.state = DataState::Relaying;
    }
}

impl Drop for DataChannel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Which way the transfer goes, waiting a moment for the session to learn it: clients
/// that start the handshake as soon as they connect (curl) send the transfer command
/// meanwhile.
async fn direction_when_known(
    direction: &mut watch::Receiver<Option<Direction>>,
) -> Option<Direction> {
    let known = direction.wait_for(Option::is_some);
    let _ = timeout(DIRECTION_WAIT, known).await;
    *direction.borrow()
}

/// Binds a listening socket on `ip` at a free port of `ports`.
fn bind_passive(ip: IpAddr, ports: PassivePorts) -> io::Result<TcpListener> {
    let count = u32::from(ports.count.max(1));
    let start = rand::random::<u32>() % count;
    for step in 0..count {
        let offset = (start + step) % count;
        let Some(port) = u16::try_from(offset)
            .ok()
            .and_then(|offset| ports.first.checked_add(offset))
        else {
            continue;
        };
        let socket = match ip {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // Ports of finished transfers linger in TIME_WAIT; without this a small range
        // would run dry after a burst of transfers.
        socket.set_reuseaddr(true)?;
        if socket.bind(SocketAddr::new(ip, port)).is_err() {
            continue;
        }
        if let Ok(listener) = socket.listen(1) {
            return Ok(listener);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "every passive port is in use",
    ))
}

/// The task side of a [`DataChannel`].
struct Connection {
    client_ip: IpAddr,
    internal: TcpStream,
    tls: Option<DataTls>,
    direction: watch::Receiver<Option<Direction>>,
    events: mpsc::Sender<DataEvent>,
    span: Span,
}

impl Connection {
    async fn run(mut self, listener: TcpListener, go: oneshot::Receiver<()>) {
        let client = self.accept(listener).await;
        let (client, resumed) = match self.secure(client).await {
            Ok(secured) => secured,
            Err(failure) => {
                let _ = self.events.send(DataEvent::Ready(Err(failure))).await;
                return;
            }
        };
        let require_reuse = self.tls.as_ref().is_some_and(|tls| tls.require_reuse);
        if require_reuse && !resumed {
            tracing::info!(
                parent: &self.span,
                "Refused data connection that did not resume the control connection's TLS session"
            );
            let _ = self
                .events
                .send(DataEvent::Ready(Err(DataFailure::NotResumed)))
                .await;
            // Held open until the session has sent its refusal and drops the channel, so
            // that the client reads the reply before it sees the connection close.
            let _client = client;
            return std::future::pending().await;
        }
        if self.events.send(DataEvent::Ready(Ok(()))).await.is_err() || go.await.is_err() {
            return;
        }

        let Self {
            internal,
            events,
            span,
            ..
        } = self;
        let finished = |clean: bool| {
            tracing::debug!(parent: &span, clean, "Data connection finished");
            // The session may be gone already; then nobody needs to know.
            let _ = events.try_send(DataEvent::Finished(clean));
        };
        relay(client, internal, finished).await;
    }

    /// The first connection from the client's address.
    async fn accept(&self, listener: TcpListener) -> TcpStream {
        loop {
            match listener.accept().await {
                Ok((stream, from)) if from.ip().to_canonical() == self.client_ip.to_canonical() => {
                    return stream;
                }
                Ok((_, from)) => {
                    tracing::warn!(
                        parent: &self.span,
                        %from,
                        "Refused data connection from an address other than the client's"
                    );
                }
                Err(error) => {
                    tracing::debug!(parent: &self.span, %error, "Failed to accept data connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }

    /// The client's connection, secured if protection is on, and whether its TLS session
    /// resumed the control connection's.
    async fn secure(&mut self, client: TcpStream) -> Result<(ClientStream, bool), DataFailure> {
        let Some(tls) = &self.tls else {
            return Ok((ClientStream::Plain(client), false));
        };
        let hello = LazyConfigAcceptor::new(Acceptor::default(), client).await;
        let accepted = match hello {
            Ok(start) => {
                let direction = direction_when_known(&mut self.direction).await;
                tracing::debug!(?direction, "Data connection handshake");
                let config = match direction {
                    Some(Direction::Download) => &tls.configs.control,
                    Some(Direction::Upload) | None => &tls.configs.quiet,
                };
                start.into_stream(config.clone()).await
            }
            Err(error) => Err(error),
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(parent: &self.span, %error, "Data connection TLS handshake failed");
                return Err(DataFailure::Handshake);
            }
        };

        let resumed = stream.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
        tracing::debug!(parent: &self.span, resumed, "Data connection secured");
        Ok((ClientStream::Tls(Box::new(stream)), resumed))
    }
}

/// Relays between the client and libunftp, calling `finished` with whether both ended
/// cleanly once the transfer is over. libunftp's side is reset whenever it is dropped
/// without a clean end (zero linger is set on it), so it never mistakes a broken upload
/// for a complete one.
async fn relay(client: ClientStream, mut internal: TcpStream, finished: impl FnOnce(bool)) {
    let (mut client_read, mut client_write) = tokio::io::split(client);
    // Borrowed halves: dropping them does not shut the socket down, unlike owned ones.
    let (mut internal_read, mut internal_write) = internal.split();

    let upload = async {
        pump(&mut client_read, &mut internal_write).await?;
        internal_write.shutdown().await
    };
    let download = async {
        pump(&mut internal_read, &mut client_write).await?;
        client_write.shutdown().await
    };
    tokio::pin!(upload, download);

    tokio::select! {
        ended = &mut upload => {
            // The client has sent everything: libunftp stores it and then closes. If the
            // client's end broke instead, returning resets libunftp's side at once.
            let stored = ended.is_ok()
                && matches!(timeout(UPLOAD_SETTLE, download).await, Ok(Ok(())));
            finished(stored);
        }
        ended = &mut download => {
            // Everything has been sent. The transfer is over, but the connection is held
            // for the client to close first: closing on a client that has not read all
            // yet would reset it, and some systems then drop what it had received.
            finished(ended.is_ok());
            let _ = timeout(DOWNLOAD_LINGER, upload).await;
        }
    }
}

/// Copies until the reader ends. A TLS stream that ends without close_notify is an error
/// (`UnexpectedEof`), not an end.
async fn pump<R, W>(reader: &mut R, writer: &mut W) -> io::Result<u64>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let idle = || io::Error::new(io::ErrorKind::TimedOut, "data connection idle");
    let mut buffer = vec![0; RELAY_BUFFER];
    let mut total = 0;
    loop {
        let read = timeout(TRANSFER_IDLE, reader.read(&mut buffer)).await;
        let read = match read.map_err(|_| idle())?? {
            0 => break,
            read => read,
        };
        let written = timeout(TRANSFER_IDLE, writer.write_all(&buffer[..read])).await;
        written.map_err(|_| idle())??;
        total += read as u64;
    }
    writer.flush().await?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn localhost() -> IpAddr {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    }

    /// Two consecutive ports that were free a moment ago.
    async fn free_pair() -> u16 {
        loop {
            let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
            let first = probe.local_addr().unwrap().port();
            let Some(second) = first.checked_add(1) else {
                continue;
            };
            if TcpListener::bind((Ipv4Addr::LOCALHOST, second))
                .await
                .is_ok()
            {
                return first;
            }
        }
    }

    #[tokio::test]
    async fn passive_ports_are_taken_from_the_range_until_it_runs_out() {
        // Another test may take a port of the pair between the probe and the bind; try
        // another pair then, rather than fail for a reason that is not under test.
        for _ in 0..20 {
            let first = free_pair().await;
            let ports = PassivePorts { first, count: 2 };
            let (Ok(a), Ok(b)) = (
                bind_passive(localhost(), ports),
                bind_passive(localhost(), ports),
            ) else {
                continue;
            };
            let taken = [
                a.local_addr().unwrap().port(),
                b.local_addr().unwrap().port(),
            ];
            assert!(
                taken.contains(&first) && taken.contains(&(first + 1)),
                "{taken:?}"
            );
            let error = bind_passive(localhost(), ports).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
            return;
        }
        panic!("no free pair of consecutive ports in 20 tries");
    }

    #[tokio::test]
    async fn a_plain_relay_passes_an_upload_on_and_ends_cleanly() {
        let (client, mut client_peer) = tcp_pair().await;
        let (internal, mut libunftp) = tcp_pair().await;
        let relay = tokio::spawn(relayed(client, internal));

        client_peer.write_all(b"payload").await.unwrap();
        client_peer.shutdown().await.unwrap();
        let mut stored = Vec::new();
        libunftp.read_to_end(&mut stored).await.unwrap();
        assert_eq!(stored, b"payload");
        drop(libunftp);

        assert!(relay.await.unwrap());
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn a_broken_client_connection_resets_libunftps_side() {
        let (client, client_peer) = tcp_pair().await;
        let (internal, mut libunftp) = tcp_pair().await;
        internal.set_zero_linger().unwrap();
        let relay = tokio::spawn(relayed(client, internal));

        client_peer.set_zero_linger().unwrap();
        drop(client_peer);
        assert!(!relay.await.unwrap());
        let mut stored = Vec::new();
        let error = libunftp.read_to_end(&mut stored).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    }

    /// Relays to the end; whether the transfer ended cleanly.
    async fn relayed(client: TcpStream, internal: TcpStream) -> bool {
        let (report, outcome) = oneshot::channel();
        let finished = |clean| {
            let _ = report.send(clean);
        };
        relay(ClientStream::Plain(client), internal, finished).await;
        outcome.await.unwrap()
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (connected, accepted) = tokio::join!(connect, listener.accept());
        (accepted.unwrap().0, connected.unwrap())
    }
}
