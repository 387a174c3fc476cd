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
    /// The controller cannot vouch for its state now (a shared store it cannot reach): the
    /// client should try another controller, or this one later.
    #[error("unavailable: {0}")]
    Unavailable(String),
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
