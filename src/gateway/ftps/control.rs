//! The control connection of one FTPS session: between the client and the session's
//! libunftp engine, which serves every file command.
//!
//! Contract:
//! - Implicit sessions are TLS from the first byte; explicit ones are plain until
//!   `AUTH TLS`. Unless the configuration allows plaintext, nothing but `AUTH`, `FEAT`,
//!   `SYST`, `NOOP`, `HELP` and `QUIT` is accepted before TLS, and data connections must
//!   be protected (`PROT P`).
//! - The front end answers what concerns TLS, data connections and features itself
//!   (`AUTH`, `PBSZ`, `PROT`, `CCC`, `PASV`, `EPSV`, `PORT` and its relatives, `FEAT`,
//!   `SITE`, `STAT` without argument, `STOU`) and sends everything else on to libunftp one
//!   command at a time, in order. Active mode is refused: the gateway never connects
//!   anywhere on a client's behalf, so FTP bounce is impossible. After `EPSV ALL`, every
//!   other data connection setup (`PASV`, `LPSV`, `PORT`, `EPRT`, `LPRT`) gets `503` (RFC
//!   2428 section 4) for the rest of the session.
//! - `REST n` + `STOR` and `APPE` resume an upload (see [`super::backend`]); `REST` before
//!   anything but `STOR` and `RETR` is kept by libunftp for the next of them.
//! - An upload (`STOR`, `APPE`, either after `REST`) is decided before its `150`: the
//!   front end asks libunftp for its working directory (`PWD`), checks the upload the
//!   back end would start with the session's own [`Vfs`](crate::gateway::vfs::Vfs)
//!   ([`backend::check_upload`]), and a refused one gets its final reply at once (550 with
//!   the reason for a refusal, 450 for a transient failure such as the audit log being
//!   unavailable), its data connection closed unused and its `REST` offset dropped. One
//!   that passes is sent on with that absolute path, so libunftp stores exactly what was
//!   checked; the back end checks again when it starts the upload and has the last word.
//!   What changes in between (writes suspended in that instant, the last upload place
//!   taken) still fails the upload after its `150`, when the data connection is reset.
//!   An upload thus goes to the working directory at the time of its `STOR`, as RFC 959
//!   has it; libunftp on its own would use the one of the `PASV`/`EPSV` before it (it
//!   copies the working directory when the data connection is accepted), and still does
//!   for downloads and listings. The check runs in the control loop: a slow bucket delays
//!   the session's next reply, up to the object store's request timeouts.
//! - A passive request opens a data port of libunftp's and one of the front end's (see
//!   [`super::data`]). A transfer command is held, after a 150 reply, until the client's
//!   data connection is ready (secured and, if required, resumed); only then does libunftp
//!   see it, so a refused data connection never starts, let alone half-writes, a transfer.
//!   Its final reply is sent once the data connection has been relayed to its end.
//! - A session ends with `421` when it has not logged in by its deadline or a reload
//!   revokes its login (see [`crate::gateway::sessions::admission_ends`]); a transfer in
//!   progress is cut, as at shutdown. A session whose client leaves a reply untaken for
//!   [`REPLY_TIMEOUT`] is closed, so a client that stops reading cannot hold its
//!   connection slot past those checks.
//! - With `epsv` off in the settings, `EPSV` (and `EPSV ALL`) get `502` and FEAT does not
//!   offer it: behind an address shared by several pods its data connection could reach
//!   another pod, and clients fall back to `PASV`.
//! - A command line longer than [`MAX_COMMAND_LINE`] gets a 500 and the connection is
//!   closed; one that is not UTF-8 gets a 501, and one with a control character anywhere
//!   but in its CRLF end (a verb ending in a carriage return, which libunftp would read
//!   as another verb than this front end does) a 500; neither is sent on.
//! - Logins and transfers are logged by the back end; this module logs only what it
//!   refuses. A connection that ends before or during TLS is logged at debug.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_rustls::TlsAcceptor;
use tracing::Span;

use crate::gateway::auth::Logins;
use crate::gateway::config::{FtpsSettings, SessionReuse};
use crate::gateway::ftps::backend;
use crate::gateway::ftps::data::{
    DataChannel, DataEvent, DataFailure, DataState, DataTls, Direction,
};
use crate::gateway::ftps::engine::{Engine, SessionContext};
use crate::gateway::ftps::protocol::{
    Command, CommandError, LineReader, MAX_COMMAND_LINE, MAX_REPLY_LINE, Reply, ReplyParser,
    epsv_reply, feat_reply, is_too_long, parse_command, pasv_port, pasv_reply, working_directory,
};
use crate::gateway::ftps::stream::ClientStream;
use crate::gateway::ftps::tls::{self, SessionTls};
use crate::gateway::sessions::{Ending, admission_ends};
use crate::gateway::stopped;

/// Time a client gets to complete a TLS handshake on the control connection.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest a reply may wait for the client to take it.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// Time a passive data channel waits for a transfer command before it is closed.
const UNUSED_DATA_CHANNEL: Duration = Duration::from_secs(60);
/// Time a held transfer waits for the client's data connection to become ready.
const DATA_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a transfer's final reply waits for the relay to finish before it is sent anyway.
const RELAY_FINISH_TIMEOUT: Duration = Duration::from_secs(30);
/// Time libunftp gets to end its session after the client's has ended.
const ENGINE_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Command lines read ahead of the one being served.
const MAX_QUEUED: usize = 16;

/// Commands that carry data over a data connection (STOU is refused).
const TRANSFERS: [&str; 6] = ["RETR", "STOR", "APPE", "LIST", "NLST", "MLSD"];
/// Transfers after which libunftp keeps a `REST` offset, even when they succeed.
const LISTINGS: [&str; 3] = ["LIST", "NLST", "MLSD"];
/// Commands accepted before TLS when plaintext is not allowed.
const BEFORE_TLS: [&str; 6] = ["AUTH", "FEAT", "SYST", "NOOP", "HELP", "QUIT"];

/// How a listener's connections start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Plain until `AUTH TLS` (RFC 4217).
    Explicit,
    /// TLS from the first byte.
    Implicit,
}

impl Mode {
    /// The name used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Explicit => "explicit",
            Self::Implicit => "implicit",
        }
    }
}

/// The settings in force for new sessions, with the TLS configuration made from them.
pub struct Policy {
    /// The configuration's `ftps` section.
    pub settings: FtpsSettings,
    /// The TLS configuration each session's own is made from.
    pub tls: Arc<ServerConfig>,
}

/// Everything one session needs from its server.
pub struct SessionSetup {
    /// How the connection starts.
    pub mode: Mode,
    /// The policy when the connection was accepted.
    pub policy: Arc<Policy>,
    /// Starts the session's libunftp engine.
    pub engine: Engine,
    /// When the session is closed unless it has logged in.
    pub login_deadline: Instant,
}

/// Serves one accepted connection to its end, or until `disconnect` turns true.
pub async fn run(
    setup: SessionSetup,
    stream: TcpStream,
    peer: SocketAddr,
    disconnect: watch::Receiver<bool>,
) {
    let local = match stream.local_addr() {
        Ok(local) => local,
        Err(error) => {
            tracing::debug!(%error, "Connection closed before it was served");
            return;
        }
    };
    let reuse = setup.policy.settings.session_reuse;
    let tls = match tls::session_config(&setup.policy.tls, reuse) {
        Ok(tls) => tls,
        Err(error) => {
            tracing::warn!(%error, "Failed to set up TLS for a session");
            return;
        }
    };
    let client = match setup.mode {
        Mode::Explicit => ClientStream::Plain(stream),
        Mode::Implicit => match handshake(&tls.control, stream).await {
            Ok(client) => client,
            Err(error) => {
                tracing::debug!(%error, "Connection closed before TLS was established");
                return;
            }
        },
    };

    let log = setup.engine.session_log(peer.ip());
    Span::current().record("session", log.id());
    let context = SessionContext::new(Span::current(), log);
    let (upstream, engine) = match setup.engine.start(context.clone()).await {
        Ok(started) => started,
        Err(error) => {
            tracing::warn!(%error, "Failed to start an FTP session");
            let mut client = client;
            let refusal = Reply::new(421, "Service not available, try again later");
            let _ = client.write_all(&refusal.encode()).await;
            return;
        }
    };

    let admission = admission_ends(
        context.watch_login(),
        setup.engine.watch_logins(),
        setup.login_deadline,
        Logins::admits_password,
    );
    let session = Session::new(setup, tls, peer, local, context.clone(), client, upstream);
    if session.run(disconnect, admission).await {
        tracing::info!("Session closed");
    }
    context.end();
    stop_engine(engine).await;
}

async fn stop_engine(mut engine: JoinHandle<()>) {
    if timeout(ENGINE_STOP_TIMEOUT, &mut engine).await.is_err() {
        engine.abort();
    }
}

/// TLS on a fresh control connection.
async fn handshake(config: &Arc<ServerConfig>, stream: TcpStream) -> io::Result<ClientStream> {
    let accept = TlsAcceptor::from(config.clone()).accept(stream);
    let stream = timeout(HANDSHAKE_TIMEOUT, accept)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    Ok(ClientStream::Tls(Box::new(stream)))
}

/// What to do after an event.
enum Flow {
    Continue,
    Close,
}

/// What the reply to a command sent to libunftp is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    /// Send it to the client.
    Forward,
    /// The front end's own housekeeping: drop it.
    Swallow,
    /// `PASS`: note a successful login.
    Login,
    /// `PASV` on behalf of `PASV` or (`extended`) `EPSV`.
    Passive { extended: bool },
    /// `REST`: libunftp keeps `offset` (as it parses it) if it accepts it.
    Restart { offset: Option<u64> },
    /// `PWD` on behalf of the upload being checked.
    UploadDirectory,
    /// A transfer command: its 1xx was sent already; the final reply waits for the relay.
    Transfer,
    /// `QUIT`: the session ends after the reply.
    Quit,
}

/// Something that happened on one of the session's connections.
enum Event {
    Client(io::Result<Option<Vec<u8>>>),
    Upstream(io::Result<Option<Vec<u8>>>),
    Data(Option<DataEvent>),
    DataDeadline,
    RelayDeadline,
    Disconnect,
    /// The login deadline passed, or a reload revoked the login.
    Ended(Ending),
}

/// One session's control connection state.
struct Session {
    mode: Mode,
    policy: Arc<Policy>,
    /// This session's TLS configurations, for its control and data connections.
    tls: SessionTls,
    engine_context: Arc<SessionContext>,
    peer: SocketAddr,
    local: SocketAddr,
    /// `None` only while `AUTH TLS` upgrades it.
    client: Option<ClientStream>,
    client_lines: LineReader,
    upstream: TcpStream,
    upstream_lines: LineReader,
    replies: ReplyParser,
    /// Client lines read but not yet served.
    queue: VecDeque<Vec<u8>>,
    /// What each reply still owed by libunftp is for, oldest first.
    in_flight: VecDeque<Pending>,
    protect_data: bool,
    logged_in: bool,
    /// The `REST` offset libunftp holds for the next `STOR` or `RETR`.
    restart_offset: u64,
    /// `EPSV ALL` was sent: only EPSV may set up data connections.
    epsv_only: bool,
    data: Option<DataChannel>,
    /// An upload command waiting for its check, before its 150.
    checking: Option<Command>,
    /// A transfer command waiting for its data connection to be ready.
    held: Option<Command>,
    /// The transfer running is a listing.
    listing: bool,
    /// A transfer's final reply waiting for the relay to finish, and until when.
    finished: Option<(Reply, Instant)>,
}

impl Session {
    fn new(
        setup: SessionSetup,
        tls: SessionTls,
        peer: SocketAddr,
        local: SocketAddr,
        engine_context: Arc<SessionContext>,
        client: ClientStream,
        upstream: TcpStream,
    ) -> Self {
        Self {
            mode: setup.mode,
            policy: setup.policy,
            tls,
            engine_context,
            peer,
            local,
            client: Some(client),
            client_lines: LineReader::new(MAX_COMMAND_LINE),
            upstream,
            upstream_lines: LineReader::new(MAX_REPLY_LINE),
            replies: ReplyParser::default(),
            queue: VecDeque::new(),
            // libunftp's greeting.
            in_flight: VecDeque::from([Pending::Forward]),
            protect_data: false,
            logged_in: false,
            restart_offset: 0,
            epsv_only: false,
            data: None,
            checking: None,
            held: None,
            listing: false,
            finished: None,
        }
    }

    /// Serves the session to its end, or until `admission` ends it; returns whether the
    /// client had logged in.
    async fn run(
        mut self,
        mut disconnect: watch::Receiver<bool>,
        admission: impl Future<Output = Ending>,
    ) -> bool {
        tokio::pin!(admission);
        loop {
            let flow = match self.serve_queue().await {
                Ok(Flow::Continue) => {
                    let event = self.next_event(&mut disconnect, admission.as_mut()).await;
                    self.handle(event).await
                }
                other => other,
            };
            match flow {
                Ok(Flow::Continue) => {}
                Ok(Flow::Close) => break,
                Err(error) => {
                    tracing::debug!(%error, "Control connection ended");
                    break;
                }
            }
        }
        if let Some(mut client) = self.client.take() {
            let _ = timeout(Duration::from_secs(1), client.shutdown()).await;
        }
        self.finish_relay().await;
        self.logged_in
    }

    /// A client may hang up its control connection as soon as its data connection is
    /// done; a relay that is still handing the end of an upload to libunftp is let finish
    /// so that the upload is stored rather than reset.
    async fn finish_relay(&mut self) {
        let Some(data) = self.data.as_mut() else {
            return;
        };
        if data.state == DataState::Relaying {
            let _ = timeout(RELAY_FINISH_TIMEOUT, data.next_event()).await;
        }
    }

    fn busy(&self) -> bool {
        !self.in_flight.is_empty() || self.held.is_some() || self.finished.is_some()
    }

    /// Serves queued client lines while nothing is outstanding.
    async fn serve_queue(&mut self) -> io::Result<Flow> {
        while !self.busy() {
            let Some(line) = self.queue.pop_front() else {
                break;
            };
            if let Flow::Close = self.serve_line(&line).await? {
                return Ok(Flow::Close);
            }
        }
        Ok(Flow::Continue)
    }

    async fn next_event(
        &mut self,
        disconnect: &mut watch::Receiver<bool>,
        admission: Pin<&mut impl Future<Output = Ending>>,
    ) -> Event {
        let read_client = self.queue.len() < MAX_QUEUED;
        let data_deadline = self.data.as_ref().and_then(|data| match data.state {
            DataState::Connecting | DataState::Ready | DataState::Failed(_) => Some(data.deadline),
            DataState::Relaying | DataState::Finished => None,
        });
        let relay_deadline = self.finished.as_ref().map(|(_, deadline)| *deadline);
        let client = self
            .client
            .as_mut()
            .expect("the client connection is in place");
        // Events are expected only while connecting and relaying.
        let data = self
            .data
            .as_mut()
            .filter(|data| matches!(data.state, DataState::Connecting | DataState::Relaying));

        tokio::select! {
            line = self.client_lines.read_line(client), if read_client => Event::Client(line),
            line = self.upstream_lines.read_line(&mut self.upstream) => Event::Upstream(line),
            event = next_data_event(data) => Event::Data(event),
            () = sleep_until_some(data_deadline) => Event::DataDeadline,
            () = sleep_until_some(relay_deadline) => Event::RelayDeadline,
            () = stopped(disconnect) => Event::Disconnect,
            ending = admission => Event::Ended(ending),
        }
    }

    async fn handle(&mut self, event: Event) -> io::Result<Flow> {
        match event {
            Event::Client(Ok(Some(line))) => self.client_line(line).await,
            Event::Client(Ok(None)) => {
                tracing::debug!("Client closed the control connection");
                Ok(Flow::Close)
            }
            Event::Client(Err(error)) if is_too_long(&error) => {
                tracing::info!(
                    limit = MAX_COMMAND_LINE,
                    "Closing connection: command line too long"
                );
                self.reply(Reply::new(500, "Command line too long; closing connection"))
                    .await?;
                Ok(Flow::Close)
            }
            Event::Client(Err(error)) => Err(error),
            Event::Upstream(Ok(Some(line))) => match self.replies.push(&line)? {
                Some(reply) => self.upstream_reply(reply).await,
                None => Ok(Flow::Continue),
            },
            Event::Upstream(Ok(None)) => Ok(Flow::Close),
            Event::Upstream(Err(error)) => Err(error),
            Event::Data(Some(DataEvent::Ready(result))) => self.data_ready(result).await,
            Event::Data(Some(DataEvent::Finished(_)) | None) => self.relay_finished().await,
            Event::DataDeadline => self.data_timed_out().await,
            Event::RelayDeadline => {
                self.data = None;
                match self.finished.take() {
                    Some((reply, _)) => self.finish_transfer(reply).await,
                    None => Ok(Flow::Continue),
                }
            }
            Event::Disconnect => {
                // Past the grace period: transfers still running are cut.
                self.data = None;
                self.reply(Reply::new(421, "The gateway is shutting down"))
                    .await?;
                Ok(Flow::Close)
            }
            Event::Ended(ending) => {
                ending.report();
                self.data = None;
                let text = match ending {
                    Ending::NoLogin => "Login timed out; closing connection",
                    Ending::Revoked => "Your login was revoked; closing connection",
                };
                self.reply(Reply::new(421, text)).await?;
                Ok(Flow::Close)
            }
        }
    }

    /// A line from the client: `ABOR` is served at once, everything else in turn.
    async fn client_line(&mut self, line: Vec<u8>) -> io::Result<Flow> {
        let abort = parse_command(&line).is_ok_and(|command| command.verb == "ABOR");
        if abort && self.busy() {
            return self.abort().await;
        }
        self.queue.push_back(line);
        Ok(Flow::Continue)
    }

    async fn serve_line(&mut self, line: &[u8]) -> io::Result<Flow> {
        match parse_command(line) {
            Ok(command) => self.serve(command).await,
            Err(CommandError::Empty) => self.reply(Reply::new(500, "Empty command line")).await,
            Err(CommandError::NotUtf8) => {
                tracing::debug!("Refused a command line that is not UTF-8");
                let refusal = "Command line is not valid UTF-8; names must be UTF-8";
                self.reply(Reply::new(501, refusal)).await
            }
            Err(CommandError::ControlCharacter) => {
                tracing::info!("Refused a command line with a control character");
                let refusal = "Command line holds a control character; it was not run";
                self.reply(Reply::new(500, refusal)).await
            }
        }
    }

    fn client_is_tls(&self) -> bool {
        self.client.as_ref().is_some_and(ClientStream::is_tls)
    }

    async fn serve(&mut self, command: Command) -> io::Result<Flow> {
        let verb = command.verb.as_str();
        let plaintext = self.policy.settings.allow_plaintext;
        if !self.client_is_tls() && !plaintext && !BEFORE_TLS.contains(&verb) {
            return self
                .reply(Reply::new(530, "TLS is required: send AUTH TLS first"))
                .await;
        }

        match verb {
            "AUTH" => self.auth(&command).await,
            "PBSZ" if self.client_is_tls() => self.reply(Reply::new(200, "PBSZ=0")).await,
            "PBSZ" => {
                self.reply(Reply::new(503, "PBSZ needs TLS: send AUTH TLS first"))
                    .await
            }
            "PROT" => self.prot(&command).await,
            "CCC" => {
                let refusal = "The control connection stays encrypted";
                self.reply(Reply::new(534, refusal)).await
            }
            "PASV" | "LPSV" | "PORT" | "EPRT" | "LPRT" if self.epsv_only => {
                let refusal = "EPSV ALL is in effect: only EPSV sets up data connections";
                self.reply(Reply::new(503, refusal)).await
            }
            "PORT" | "EPRT" | "LPRT" => {
                tracing::info!(verb, "Refused active mode");
                let refusal = "Active mode is not supported: use EPSV or PASV";
                self.reply(Reply::new(502, refusal)).await
            }
            "LPSV" => {
                self.reply(Reply::new(502, "LPSV is not supported: use EPSV or PASV"))
                    .await
            }
            "FEAT" => {
                let reply = feat_reply(self.mode == Mode::Explicit, self.policy.settings.epsv);
                self.reply(reply).await
            }
            "SITE" => {
                self.reply(Reply::new(502, "SITE commands are not supported"))
                    .await
            }
            // libunftp's help names itself and its version.
            "HELP" => {
                let help = "Sluice FTPS; FEAT lists the supported extensions";
                self.reply(Reply::new(214, help)).await
            }
            "ABOR" => self.abort().await,
            "STAT" if command.argument.trim().is_empty() => self.status().await,
            "STOU" => {
                let refusal = "STOU is not supported: name the file with STOR";
                self.reply(Reply::new(502, refusal)).await
            }
            "OPTS" if command.argument.to_ascii_uppercase().starts_with("MLST") => {
                // libunftp always sends these facts, whichever the client asks for.
                self.reply(Reply::new(200, "MLST OPTS type;size;modify;"))
                    .await
            }
            "PASV" => self.passive(false).await,
            "EPSV" => self.extended_passive(&command).await,
            "REST" => {
                let offset = command.argument.parse::<u64>().ok();
                self.send_upstream(&command, Pending::Restart { offset })
                    .await
            }
            _ if TRANSFERS.contains(&verb) => self.transfer(command).await,
            "PASS" => self.send_upstream(&command, Pending::Login).await,
            "QUIT" => self.send_upstream(&command, Pending::Quit).await,
            _ => self.send_upstream(&command, Pending::Forward).await,
        }
    }

    async fn auth(&mut self, command: &Command) -> io::Result<Flow> {
        if self.client_is_tls() {
            return self.reply(Reply::new(503, "TLS is already in use")).await;
        }
        let mechanism = command.argument.trim().to_ascii_uppercase();
        if !matches!(mechanism.as_str(), "TLS" | "TLS-C" | "SSL") {
            let refusal = "Unsupported security mechanism: use AUTH TLS";
            return self.reply(Reply::new(504, refusal)).await;
        }
        self.reply(Reply::new(234, "Proceed with TLS negotiation"))
            .await?;
        if self.client_lines.has_buffered() {
            // Anything sent before the handshake could be a plaintext injection.
            tracing::info!("Closing connection: data sent between AUTH TLS and the handshake");
            return Ok(Flow::Close);
        }

        let Some(ClientStream::Plain(stream)) = self.client.take() else {
            return Ok(Flow::Close);
        };
        match handshake(&self.tls.control, stream).await {
            Ok(secured) => {
                self.client = Some(secured);
                Ok(Flow::Continue)
            }
            Err(error) => {
                tracing::debug!(%error, "TLS handshake on the control connection failed");
                Ok(Flow::Close)
            }
        }
    }

    async fn prot(&mut self, command: &Command) -> io::Result<Flow> {
        if !self.client_is_tls() {
            return self
                .reply(Reply::new(503, "PROT needs TLS: send AUTH TLS first"))
                .await;
        }
        let reply = match command.argument.trim().to_ascii_uppercase().as_str() {
            "P" => {
                self.protect_data = true;
                Reply::new(200, "Protection level set to Private")
            }
            "C" if self.policy.settings.allow_plaintext => {
                self.protect_data = false;
                Reply::new(200, "Protection level set to Clear")
            }
            "C" => Reply::new(534, "Data connections must be protected: use PROT P"),
            "S" | "E" => Reply::new(536, "Only PROT P is supported"),
            _ => Reply::new(504, "Unknown protection level"),
        };
        self.reply(reply).await
    }

    async fn status(&mut self) -> io::Result<Flow> {
        let tls = if self.client_is_tls() { "TLS" } else { "plain" };
        let data = if self.protect_data {
            "protected"
        } else {
            "clear"
        };
        let login = if self.logged_in {
            "logged in"
        } else {
            "not logged in"
        };
        let text = format!("Sluice FTPS: control connection {tls}, data {data}, {login}");
        self.reply(Reply::new(211, text)).await
    }

    /// Why no data connection may be set up or used now, if none may: the session has
    /// not logged in, or data would flow unprotected.
    fn data_refusal(&self) -> Option<Reply> {
        if !self.logged_in {
            return Some(Reply::new(530, "Log in with USER and PASS first"));
        }
        (!self.data_allowed()).then(protection_required)
    }

    /// Whether data may flow under the current protection level.
    fn data_allowed(&self) -> bool {
        (self.protect_data && self.client_is_tls()) || self.policy.settings.allow_plaintext
    }

    async fn extended_passive(&mut self, command: &Command) -> io::Result<Flow> {
        if !self.policy.settings.epsv {
            // EPSV makes the client connect to the address it reached the control port
            // on, which behind a Service shared by several pods may be another pod.
            let refusal = "EPSV is not available on this server: use PASV";
            return self.reply(Reply::new(502, refusal)).await;
        }
        let family = match self.local.ip().to_canonical() {
            IpAddr::V4(_) => "1",
            IpAddr::V6(_) => "2",
        };
        match command.argument.trim().to_ascii_uppercase().as_str() {
            "ALL" => {
                self.epsv_only = true;
                self.reply(Reply::new(200, "EPSV ALL accepted")).await
            }
            "" => self.passive(true).await,
            requested if requested == family => self.passive(true).await,
            _ => {
                let refusal = format!("Network protocol not supported, use ({family})");
                self.reply(Reply::new(522, refusal)).await
            }
        }
    }

    async fn passive(&mut self, extended: bool) -> io::Result<Flow> {
        if let Some(refusal) = self.data_refusal() {
            return self.reply(refusal).await;
        }
        self.abandon_data().await?;
        let pasv = Command {
            verb: "PASV".into(),
            argument: String::new(),
        };
        self.send_upstream(&pasv, Pending::Passive { extended })
            .await
    }

    /// libunftp's `227`: open the matching public data channel.
    async fn passive_opened(&mut self, reply: Reply, extended: bool) -> io::Result<Flow> {
        if reply.code != 227 {
            return self.reply(reply).await;
        }
        match self.open_data_channel(&reply, extended).await {
            Ok(reply) => self.reply(reply).await,
            Err(error) => {
                tracing::warn!(%error, "Failed to open a passive data port");
                self.abandon_upstream_data().await?;
                self.reply(Reply::new(425, "Cannot open a passive data port"))
                    .await
            }
        }
    }

    async fn open_data_channel(&mut self, reply: &Reply, extended: bool) -> io::Result<Reply> {
        let internal_port = pasv_port(reply)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed PASV reply"))?;
        let internal = TcpStream::connect((Ipv4Addr::LOCALHOST, internal_port)).await?;
        // Any close but the relay's clean one resets libunftp's side (see `data`).
        internal.set_zero_linger()?;
        let advertised = match extended {
            true => None,
            false => Some(self.advertised_address().await?),
        };

        let tls = (self.protect_data && self.client_is_tls()).then(|| DataTls {
            configs: self.tls.clone(),
            require_reuse: self.policy.settings.session_reuse == SessionReuse::Require,
        });
        let channel = DataChannel::open(
            self.local.ip(),
            self.policy.settings.passive_ports,
            self.peer.ip(),
            internal,
            tls,
            Instant::now() + UNUSED_DATA_CHANNEL,
            Span::current(),
        )?;
        let port = channel.port;
        self.data = Some(channel);
        Ok(match advertised {
            Some(address) => pasv_reply(address, port),
            None => epsv_reply(port),
        })
    }

    /// The IPv4 address for PASV replies: the configured one, or the one the client
    /// reached us on.
    async fn advertised_address(&self) -> io::Result<Ipv4Addr> {
        let unusable =
            |what: &str| io::Error::new(io::ErrorKind::AddrNotAvailable, what.to_owned());
        let Some(configured) = &self.policy.settings.passive_address else {
            return match self.local.ip().to_canonical() {
                IpAddr::V4(address) => Ok(address),
                IpAddr::V6(_) => Err(unusable("PASV needs IPv4; the client should use EPSV")),
            };
        };
        if let Ok(address) = configured.parse::<Ipv4Addr>() {
            return Ok(address);
        }
        let resolved = tokio::net::lookup_host((configured.as_str(), 0)).await?;
        resolved
            .filter_map(|address| match address.ip() {
                IpAddr::V4(address) => Some(address),
                IpAddr::V6(_) => None,
            })
            .next()
            .ok_or_else(|| unusable("the passive address has no IPv4 address"))
    }

    async fn transfer(&mut self, command: Command) -> io::Result<Flow> {
        if let Some(refusal) = self.data_refusal() {
            return self.reply(refusal).await;
        }
        let Some(data) = self.data.as_ref() else {
            return self.reply(Reply::new(425, "Use PASV or EPSV first")).await;
        };
        let upload = matches!(command.verb.as_str(), "STOR" | "APPE");
        data.set_direction(match upload {
            true => Direction::Upload,
            false => Direction::Download,
        });

        // libunftp answers a missing name itself.
        let usable = matches!(data.state, DataState::Connecting | DataState::Ready);
        if upload && usable && !command.argument.is_empty() {
            self.checking = Some(command);
            let pwd = Command {
                verb: "PWD".into(),
                argument: String::new(),
            };
            return self.send_upstream(&pwd, Pending::UploadDirectory).await;
        }
        self.open_transfer(command).await
    }

    /// libunftp's working directory, for the upload being checked: the upload is refused
    /// now, or goes on to its 150 under the absolute path that was checked.
    async fn check_upload(&mut self, reply: Reply) -> io::Result<Flow> {
        let Some(command) = self.checking.take() else {
            // Aborted meanwhile.
            return Ok(Flow::Continue);
        };
        if reply.code >= 400 {
            // libunftp could not say (421: it is closing the session): its reply is the
            // upload's answer.
            return self.refuse_transfer(reply).await;
        }
        let (Some(directory), Some(vfs)) = (working_directory(&reply), self.engine_context.vfs())
        else {
            tracing::debug!(
                code = reply.code,
                "Upload not checked before its data connection"
            );
            return self.open_transfer(command).await;
        };
        let path = upload_path(&directory, &command.argument);
        let append = command.verb == "APPE";
        let start = backend::upload_start(append, self.restart_offset);
        let context = &self.engine_context;
        if let Err(refusal) = backend::check_upload(context, &vfs, &path, start).await {
            return self.refuse_transfer(refusal).await;
        }
        let checked = Command {
            verb: command.verb,
            argument: path,
        };
        self.open_transfer(checked).await
    }

    /// Sends the 150 of a transfer command and starts it, at once or once its data
    /// connection is ready; or refuses it if its data connection failed meanwhile.
    async fn open_transfer(&mut self, command: Command) -> io::Result<Flow> {
        let Some(data) = self.data.as_ref() else {
            return self.reply(Reply::new(425, "Use PASV or EPSV first")).await;
        };
        match data.state {
            DataState::Failed(failure) => self.refuse_transfer(failure.reply()).await,
            DataState::Relaying | DataState::Finished => {
                self.reply(Reply::new(425, "Use PASV or EPSV first")).await
            }
            DataState::Ready => {
                self.reply(Reply::new(150, "Opening data connection"))
                    .await?;
                self.start_transfer(command).await
            }
            DataState::Connecting => {
                if let Some(data) = self.data.as_mut() {
                    data.deadline = Instant::now() + DATA_READY_TIMEOUT;
                }
                self.held = Some(command);
                self.reply(Reply::new(150, "Opening data connection")).await
            }
        }
    }

    /// Sends a transfer command on and starts relaying its data connection.
    async fn start_transfer(&mut self, command: Command) -> io::Result<Flow> {
        self.engine_context.set_append(command.verb == "APPE");
        self.listing = LISTINGS.contains(&command.verb.as_str());
        let flow = self.send_upstream(&command, Pending::Transfer).await?;
        if let Some(data) = self.data.as_mut() {
            data.start_relay();
        }
        Ok(flow)
    }

    async fn data_ready(&mut self, result: Result<(), DataFailure>) -> io::Result<Flow> {
        let Some(data) = self.data.as_mut() else {
            return Ok(Flow::Continue);
        };
        match result {
            Ok(()) => {
                data.state = DataState::Ready;
                match self.held.take() {
                    Some(command) => self.start_transfer(command).await,
                    None => Ok(Flow::Continue),
                }
            }
            Err(failure) => {
                data.state = DataState::Failed(failure);
                match self.held.take() {
                    Some(_) => self.refuse_transfer(failure.reply()).await,
                    None => Ok(Flow::Continue),
                }
            }
        }
    }

    async fn data_timed_out(&mut self) -> io::Result<Flow> {
        match self.held.take() {
            Some(_) => self.refuse_transfer(DataFailure::Timeout.reply()).await,
            None => {
                self.abandon_data().await?;
                Ok(Flow::Continue)
            }
        }
    }

    /// Ends a transfer that never reached libunftp. The reply goes out before the data
    /// connection is closed, so the client reads why.
    async fn refuse_transfer(&mut self, reply: Reply) -> io::Result<Flow> {
        let flow = self.reply(reply).await?;
        self.abandon_data().await?;
        self.reset_restart().await?;
        Ok(flow)
    }

    async fn relay_finished(&mut self) -> io::Result<Flow> {
        if let Some(data) = self.data.as_mut() {
            data.state = DataState::Finished;
        }
        match self.finished.take() {
            Some((reply, _)) => self.finish_transfer(reply).await,
            None => Ok(Flow::Continue),
        }
    }

    /// The final reply to a transfer, once its data connection is done.
    async fn finish_transfer(&mut self, reply: Reply) -> io::Result<Flow> {
        self.data = None;
        // An APPE that libunftp ended before its upload began must not make the next
        // STOR an append.
        self.engine_context.set_append(false);
        if !reply.is_success() {
            // libunftp keeps a REST offset after a failed transfer; clients do not.
            self.reset_restart().await?;
        } else if !self.listing {
            // A file transfer used it up.
            self.restart_offset = 0;
        }
        self.forward(reply).await
    }

    /// `ABOR`, served at once even while something is outstanding.
    async fn abort(&mut self) -> io::Result<Flow> {
        if self.checking.take().is_some() || self.held.take().is_some() {
            self.refuse_transfer(Reply::new(426, "Transfer aborted"))
                .await?;
            return self.reply(Reply::new(226, "Abort successful")).await;
        }
        if let Some((reply, _)) = self.finished.take() {
            self.finish_transfer(reply).await?;
        }
        // Closing the data connection makes libunftp end the transfer with an error; the
        // reset keeps a partial upload from being stored.
        self.data = None;
        let abort = Command {
            verb: "ABOR".into(),
            argument: String::new(),
        };
        self.send_upstream(&abort, Pending::Forward).await
    }

    /// Drops the data channel, if any, and has libunftp drop its side.
    async fn abandon_data(&mut self) -> io::Result<()> {
        if self.data.take().is_some() {
            self.abandon_upstream_data().await?;
        }
        Ok(())
    }

    /// Ends libunftp's data connection handler, which is waiting for a command.
    async fn abandon_upstream_data(&mut self) -> io::Result<()> {
        let abort = Command {
            verb: "ABOR".into(),
            argument: String::new(),
        };
        self.send_upstream(&abort, Pending::Swallow).await.map(drop)
    }

    async fn reset_restart(&mut self) -> io::Result<()> {
        if std::mem::take(&mut self.restart_offset) == 0 {
            return Ok(());
        }
        let rest = Command {
            verb: "REST".into(),
            argument: "0".into(),
        };
        self.send_upstream(&rest, Pending::Swallow).await.map(drop)
    }

    async fn upstream_reply(&mut self, reply: Reply) -> io::Result<Flow> {
        if reply.is_preliminary() {
            return match self.in_flight.front() {
                Some(Pending::Transfer | Pending::Swallow) => Ok(Flow::Continue),
                _ => self.reply(reply).await,
            };
        }
        let closing = reply.code == 421;
        let pending = self.in_flight.pop_front().unwrap_or(Pending::Forward);
        let flow = match pending {
            Pending::Forward => self.forward(reply).await?,
            Pending::Swallow => Flow::Continue,
            Pending::Login => {
                // A later PASS (refused by libunftp once logged in) does not log out.
                self.logged_in |= reply.code == 230;
                self.forward(reply).await?
            }
            Pending::Passive { extended } => self.passive_opened(reply, extended).await?,
            Pending::Restart { offset } => {
                if let (350, Some(offset)) = (reply.code, offset) {
                    self.restart_offset = offset;
                }
                self.forward(reply).await?
            }
            Pending::UploadDirectory => self.check_upload(reply).await?,
            Pending::Transfer => {
                let relaying = self
                    .data
                    .as_ref()
                    .is_some_and(|data| data.state == DataState::Relaying);
                if relaying {
                    self.finished = Some((reply, Instant::now() + RELAY_FINISH_TIMEOUT));
                    Flow::Continue
                } else {
                    self.finish_transfer(reply).await?
                }
            }
            Pending::Quit => {
                self.forward(reply).await?;
                Flow::Close
            }
        };
        Ok(if closing { Flow::Close } else { flow })
    }

    /// Sends a reply of libunftp's on, with the back end's message for a storage error.
    async fn forward(&mut self, reply: Reply) -> io::Result<Flow> {
        let text = self.engine_context.take_reply_text();
        let reply = match text {
            Some(text) if reply.is_error() && reply.lines.len() == 1 => {
                Reply::new(reply.code, text)
            }
            _ => reply,
        };
        self.reply(reply).await
    }

    async fn send_upstream(&mut self, command: &Command, pending: Pending) -> io::Result<Flow> {
        self.upstream.write_all(&command.to_line()).await?;
        self.in_flight.push_back(pending);
        Ok(Flow::Continue)
    }

    /// Sends `reply`. A client that does not take it within [`REPLY_TIMEOUT`] (one that
    /// stops reading while it keeps sending commands, say) is disconnected: a blocked
    /// write would otherwise hold the session, and its connection slot, past the login
    /// deadline and any revocation, which are only watched between commands.
    async fn reply(&mut self, reply: Reply) -> io::Result<Flow> {
        let client = self
            .client
            .as_mut()
            .expect("the client connection is in place");
        let send = async {
            client.write_all(&reply.encode()).await?;
            client.flush().await
        };
        match tokio::time::timeout(REPLY_TIMEOUT, send).await {
            Ok(sent) => sent.map(|()| Flow::Continue),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client does not read its replies",
            )),
        }
    }
}

/// The file an upload command names: its argument in libunftp's working directory,
/// joined as libunftp joins them (an absolute argument stands alone).
fn upload_path(directory: &str, argument: &str) -> String {
    Path::new(directory)
        .join(argument)
        .to_string_lossy()
        .into_owned()
}

fn protection_required() -> Reply {
    Reply::new(
        521,
        "Data connections must be protected: send PBSZ 0 and PROT P first",
    )
}

async fn next_data_event(data: Option<&mut DataChannel>) -> Option<DataEvent> {
    match data {
        Some(data) => data.next_event().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
