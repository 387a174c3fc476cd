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
            E::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            E::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            E::Forbidden(_) => return ApiError::forbidden(),
            E::Enrollment(_) => (StatusCode::UNAUTHORIZED, "enrollment_refused"),
            E::Pki(umbra_pki::PkiError::Csr(_)) => (StatusCode::BAD_REQUEST, "invalid_csr"),
            E::Setup(_) | E::Pki(_) | E::Db(_) | E::Corrupt(_) | E::Io { .. } => {
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
