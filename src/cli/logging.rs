//! Logging set-up shared by every subcommand.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Filter used when `RUST_LOG` is unset. russh logs every packet at debug level and
/// libunftp's per-command spans are as chatty, so both are held to warnings unless asked
/// for explicitly; rustls warns about what clients send (lftp and curl put an IP
/// address in SNI on every connection), so it is held to errors.
const DEFAULT_FILTER: &str = "info,russh=warn,libunftp=warn,rustls=error";

/// Installs the global subscriber. The level comes from `RUST_LOG` (default
/// [`DEFAULT_FILTER`]).
/// Calling it twice keeps the first subscriber.
pub fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // Colour only for people: log collectors and redirected files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_ansi(ansi)
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        // The current span (session, peer, user) only: the list of enclosing spans would
        // repeat it and add libunftp's spans, whose fields are whole debug dumps.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_span_list(false)
            .try_init(),
    };
}
