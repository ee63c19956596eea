//! Errors of the migration stream.

/// Errors of the migration stream.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The endpoint text is not `tcp:HOST:PORT` or `unix:PATH`.
    #[error("Bad migration endpoint {0:?}: use tcp:HOST:PORT or unix:PATH")]
    BadEndpoint(String),
    /// Connecting, listening or accepting failed.
    #[error("Cannot {action} {endpoint}: {source}")]
    Connect {
        /// What was being done.
        action: &'static str,
        /// The endpoint.
        endpoint: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The connection failed or was cut while sending or receiving.
    #[error("Migration connection lost: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something the protocol does not allow here.
    #[error("Migration protocol error: {0}")]
    Protocol(String),
    /// The peer is not a Ferrite migration endpoint, or speaks another protocol version.
    #[error("Incompatible migration peer: {0}")]
    Incompatible(String),
    /// TLS could not be set up (a bad PEM file, a refused certificate, a peer without TLS);
    /// the text says which and what to do.
    #[error("{0}")]
    Tls(String),
    /// The peer refused or aborted the migration.
    #[error("The {side} gave up the migration: {reason}")]
    Refused {
        /// "source" or "destination".
        side: &'static str,
        /// Its reason.
        reason: String,
    },
}

/// Result of the migration stream.
pub type Result<T> = std::result::Result<T, MigrationError>;
