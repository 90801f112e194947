//! A minimal HTTP/1.1 server for health probes and metrics scrapes, shared by the
//! operator (`/metrics`, `/healthz`, `/readyz`) and the gateway (`/healthz`, `/readyz`).
//!
//! Contract: it listens only on the listener it is given; it answers `GET` and `HEAD`
//! with whatever the route function returns for the path (the query is ignored), one
//! request per connection (`Connection: close`); a request head must arrive within
//! [`READ_TIMEOUT`] and fit in [`MAX_HEAD`] bytes; at most [`MAX_CONNECTIONS`] are
//! served at once and further ones are closed unanswered. Nothing it does is logged above
//! debug, so probes never fill a log.
//!
//! A full HTTP stack would add nothing these three paths need; this keeps the data plane
//! free of one.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Longest request head read, in bytes.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time for a client to send its request head, and for the answer to be written.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once, at most.
pub const MAX_CONNECTIONS: usize = 16;

/// An answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Value of the `Content-Type` header.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Response {
    /// `200 OK` with a plain-text body.
    pub fn ok(body: impl Into<String>) -> Self {
        Self::text(200, body)
    }

    /// `503 Service Unavailable` with a plain-text body saying why.
    pub fn unavailable(body: impl Into<String>) -> Self {
        Self::text(503, body)
    }

    /// `404 Not Found`.
    pub fn not_found() -> Self {
        Self::text(404, "not found\n")
    }

    /// A plain-text answer with `status`.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// Serves `routes` on `listener` until `stop` completes.
pub async fn serve<R>(listener: TcpListener, routes: R, stop: impl Future<Output = ()>)
where
    R: Fn(&str) -> Response + Send + Sync + 'static,
{
    let routes = Arc::new(routes);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!(%error, "Failed to accept a probe connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Over the limit the connection is dropped, which closes it.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let answered = tokio::time::timeout(READ_TIMEOUT, answer(stream, routes.as_ref()));
            if let Ok(Err(error)) = answered.await {
                tracing::debug!(%error, "Probe connection failed");
            }
            drop(slot);
        });
    }
}

async fn answer<R>(mut stream: TcpStream, routes: &R) -> std::io::Result<()>
where
    R: Fn(&str) -> Response,
{
    let Some(head) = read_head(&mut stream).await? else {
        return Ok(());
    };
    let response = match parse_request_line(&head) {
        Some(("GET" | "HEAD", path)) => routes(path),
        Some(_) => Response::text(405, "only GET and HEAD\n"),
        None => Response::text(400, "bad request\n"),
    };
    let head_only = head.starts_with("HEAD ");
    stream.write_all(&encode(&response, head_only)).await?;
    stream.shutdown().await
}

/// Reads up to the end of the request head; `None` if the client closed first.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buffer = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..read]);
        if buffer.windows(4).any(|w| w == b"\r\n\r\n") || buffer.len() >= MAX_HEAD {
            return Ok(Some(String::from_utf8_lossy(&buffer).into_owned()));
        }
    }
}

/// The method and the path (without query) of a request head's first line.
fn parse_request_line(head: &str) -> Option<(&str, &str)> {
    let line = head.lines().next()?;
    let mut words = line.split(' ');
    let method = words.next()?;
    let target = words.next()?;
    let version = words.next()?;
    if !version.starts_with("HTTP/1.") || words.next().is_some() || !target.starts_with('/') {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    Some((method, path))
}

fn encode(response: &Response, head_only: bool) -> Vec<u8> {
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut bytes = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    )
    .into_bytes();
    if !head_only {
        bytes.extend_from_slice(response.body.as_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_give_method_and_path_without_query() {
        let head = "GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(parse_request_line(head), Some(("GET", "/metrics")));
        assert_eq!(
            parse_request_line("HEAD /readyz HTTP/1.0\r\n\r\n"),
            Some(("HEAD", "/readyz"))
        );
        assert_eq!(parse_request_line("GET metrics HTTP/1.1\r\n\r\n"), None);
        assert_eq!(parse_request_line("SSH-2.0-OpenSSH_9.2\r\n"), None);
    }

    #[test]
    fn a_head_answer_has_the_length_of_the_body_but_not_the_body() {
        let response = Response::ok("ok\n");
        let full = String::from_utf8(encode(&response, false)).unwrap();
        let head = String::from_utf8(encode(&response, true)).unwrap();
        assert!(full.starts_with("HTTP/1.1 200 OK\r\n"), "{full}");
        assert!(full.contains("Content-Length: 3\r\n") && full.ends_with("\r\n\r\nok\n"));
        assert!(head.contains("Content-Length: 3\r\n") && head.ends_with("\r\n\r\n"));
    }

    #[tokio::test]
    async fn it_answers_over_tcp_and_stops_when_told() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let routes = |path: &str| match path {
            "/healthz" => Response::ok("ok\n"),
            _ => Response::not_found(),
        };
        let server = tokio::spawn(serve(listener, routes, async {
            let _ = stop_rx.await;
        }));
        for (request, expected) in [
            (
                "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
                "HTTP/1.1 200 OK",
            ),
            ("GET /nothing HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
            (
                "POST /healthz HTTP/1.1\r\n\r\n",
                "HTTP/1.1 405 Method Not Allowed",
            ),
        ] {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            assert!(answer.starts_with(expected), "{request:?} -> {answer}");
        }
        let _ = stop_tx.send(());
        server.await.unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    }
}
