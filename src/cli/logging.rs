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

/// Targets held to info whatever `RUST_LOG` says: reqsign, which signs OpenDAL's
/// object-store requests, logs the static credentials it loads (secret key included) at
/// debug.
const CREDENTIAL_LOGGERS: [&str; 1] = ["reqsign_core=info"];

/// `filter` with [`CREDENTIAL_LOGGERS`] held to info, so that no setting of `RUST_LOG`
/// makes a credential reach the logs.
pub fn without_credential_logs(filter: EnvFilter) -> EnvFilter {
    CREDENTIAL_LOGGERS.iter().fold(filter, |filter, directive| {
        filter.add_directive(directive.parse().expect("a valid directive"))
    })
}

/// Installs the global subscriber. The level comes from `RUST_LOG` (default
/// [`DEFAULT_FILTER`]), never below info for [`CREDENTIAL_LOGGERS`].
/// Calling it twice keeps the first subscriber.
pub fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let filter = without_credential_logs(filter);
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn credential_loggers_stay_silent_even_at_trace() {
        let buffer = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = buffer.clone();
        let filter = without_credential_logs(EnvFilter::new("trace,reqsign_core=trace"));
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(move || Writer(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "reqsign_core::api", "secret_access_key: hunter2");
            tracing::info!(target: "reqsign_core::api", "loaded a credential");
            tracing::debug!(target: "sluice::gateway", "still at debug");
        });
        let text = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("loaded a credential") && text.contains("still at debug"));
    }

    struct Writer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Writer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
