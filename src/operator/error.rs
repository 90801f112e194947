//! The operator's error taxonomy.

/// Why a reconcile failed. Every variant is transient (retried with backoff): permanent
/// spec problems are not errors but conditions on the object, see the validate steps.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("failed to {action}")]
    Kube {
        /// What was being done, for example `apply StatefulSet`.
        action: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Host-key generation failed.
    #[error("failed to generate SSH host keys")]
    HostKeys(#[source] anyhow::Error),
    /// Rendering the owned objects did not complete (the worker thread panicked).
    #[error("failed to render the gateway objects: {0}")]
    Render(String),
}

impl Error {
    /// Wraps a client error with what was being done.
    pub fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let action = action.into();
        move |source| Self::Kube { action, source }
    }
}

/// The full chain of an error on one line, for logs.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
