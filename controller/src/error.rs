//! The controller's error type. Each variant maps to one HTTP status in `api::error`, the only
//! place where that mapping is made.

/// Why a controller operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The request is malformed or names invalid values.
    #[error("{0}")]
    Invalid(String),
    /// A declarative document or a write failed validation; every problem is listed.
    #[error("{}", .0.join("; "))]
    Rejected(Vec<String>),
    /// The named thing does not exist (or the caller may not know that it does).
    #[error("{0}")]
    NotFound(String),
    /// The write conflicts with the current state (duplicate name, still referenced, token used).
    #[error("{0}")]
    Conflict(String),
    /// The caller is authenticated but not allowed to do this.
    #[error("{0}")]
    Forbidden(String),
    /// An enrollment token was refused.
    #[error("enrollment refused: {0}")]
    Enrollment(String),
    /// The controller's directory is not initialized or already is.
    #[error("{0}")]
    Setup(String),
    /// Certificate or token machinery failed.
    #[error(transparent)]
    Pki(#[from] umbra_pki::PkiError),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// PostgreSQL failed in a way that is not the connection's (a query or a conversion).
    #[error("database: {0}")]
    Postgres(#[source] postgres::Error),
    /// The database cannot be reached or cannot do this now (connection lost or refused,
    /// server restarting, out of connections or space, a lock wait timed out). Nothing was
    /// written; the store reconnects at its next call, so retrying later works.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// Another controller committed since this command read the state: nothing was written.
    /// The caller catches up from the change log and may try the command again.
    #[error("another controller committed first (the change log is at {found}, the command was built at {expected}); nothing was written")]
    Stale {
        /// The sequence number the batch was built on.
        expected: u64,
        /// The change log's last sequence number at commit.
        found: u64,
    },
    /// Stored data could not be decoded: the store was changed outside the controller.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl From<serde_json::Error> for ControllerError {
    fn from(e: serde_json::Error) -> Self {
        ControllerError::Corrupt(e.to_string())
    }
}

impl ControllerError {
    pub(crate) fn io(path: impl Into<std::path::PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| ControllerError::Io { path, source }
    }
}
