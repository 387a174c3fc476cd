//! The one place where controller errors become HTTP statuses and JSON error bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use umbra_proto::api::ErrorBody;

use crate::error::ControllerError;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// A 400 with a message.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid",
            message: message.into(),
        }
    }

    /// A 403: authenticated, but this identity may not do this.
    pub fn forbidden() -> Self {
        ApiError {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            message: "this certificate is not allowed here".into(),
        }
    }

    /// A 413.
    pub fn too_large(limit: usize) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "too_large",
            message: format!("request body exceeds {limit} bytes"),
        }
    }

    /// A 408: the client was too slow sending its request.
    pub fn timeout() -> Self {
        ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            code: "timeout",
            message: "the request body took too long".into(),
        }
    }

    /// A 503: the database cannot be used now; the request can be retried. The cause is
    /// logged, not sent (it may name hosts).
    pub fn unavailable(what: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %what, "request failed: the store is unavailable");
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            message: "the database is unavailable; try again".into(),
        }
    }

    /// A 500 that hides internals from the client (they are logged).
    pub fn internal(what: impl std::fmt::Display) -> Self {
        tracing::error!(error = %what, "internal error");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: "internal error".into(),
        }
    }
}

impl From<ControllerError> for ApiError {
    fn from(e: ControllerError) -> Self {
        use ControllerError as E;
        let (status, code) = match &e {
            E::Invalid(_) | E::Rejected(_) => (StatusCode::BAD_REQUEST, "invalid"),
            E::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            E::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            E::Forbidden(_) => return ApiError::forbidden(),
            E::Enrollment(_) => (StatusCode::UNAUTHORIZED, "enrollment_refused"),
            E::Pki(umbra_pki::PkiError::Csr(_)) => (StatusCode::BAD_REQUEST, "invalid_csr"),
            E::Unavailable(_) => return ApiError::unavailable(e),
            // Another controller committed first, nothing was written: the same request can be
            // sent again (a controller that catches up on its own retries before it gets here).
            E::Stale { .. } => (StatusCode::SERVICE_UNAVAILABLE, "stale"),
            E::Setup(_) | E::Pki(_) | E::Db(_) | E::Postgres(_) | E::Corrupt(_) | E::Io { .. } => {
                return ApiError::internal(e)
            }
        };
        ApiError {
            status,
            code,
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.to_owned(),
            message: self.message,
        };
        (self.status, axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database that cannot be reached is a 503 the client may retry, and what the client
    /// reads names no host.
    #[test]
    fn an_unavailable_database_is_a_503_without_details() {
        let e = ApiError::from(ControllerError::Unavailable(
            "error connecting to server: db.internal:5432 refused".into(),
        ));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!e.message.contains("db.internal"), "{}", e.message);
        let e = ApiError::from(ControllerError::Stale {
            expected: 1,
            found: 2,
        });
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.code, "stale");
    }
}
