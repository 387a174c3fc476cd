//! Errors in each API's own envelope, so that the official clients raise their own exception
//! types: OpenAI's `{"error": {...}}` and Anthropic's `{"type": "error", "error": {...}}`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::json;

use crate::meter::Format;
use crate::Body;

/// What went wrong, in terms every format can express.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The model does not exist or the caller may not use it (deliberately the same).
    NotFound,
    /// The request is malformed.
    Invalid,
    /// The request is larger than the gateway accepts.
    TooLarge,
    /// Requests per minute exhausted.
    RateLimited,
    /// The token budget is exhausted.
    Budget,
    /// The provider failed or could not be reached.
    Upstream,
}

impl Kind {
    fn status(self) -> StatusCode {
        match self {
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::Invalid => StatusCode::BAD_REQUEST,
            Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::RateLimited | Kind::Budget => StatusCode::TOO_MANY_REQUESTS,
            Kind::Upstream => StatusCode::BAD_GATEWAY,
        }
    }

    fn openai(self) -> (&'static str, Option<&'static str>) {
        match self {
            Kind::NotFound => ("invalid_request_error", Some("model_not_found")),
            Kind::Invalid => ("invalid_request_error", None),
            Kind::TooLarge => ("invalid_request_error", Some("request_too_large")),
            Kind::RateLimited => ("requests", Some("rate_limit_exceeded")),
            Kind::Budget => ("insufficient_quota", Some("insufficient_quota")),
            Kind::Upstream => ("api_error", Some("upstream_error")),
        }
    }

    fn anthropic(self) -> &'static str {
        match self {
            Kind::NotFound => "not_found_error",
            Kind::Invalid => "invalid_request_error",
            Kind::TooLarge => "request_too_large",
            Kind::RateLimited | Kind::Budget => "rate_limit_error",
            Kind::Upstream => "api_error",
        }
    }
}

/// The JSON error body for `format`.
pub fn body(format: Format, kind: Kind, message: &str) -> serde_json::Value {
    match format {
        Format::Messages => json!({
            "type": "error",
            "error": { "type": kind.anthropic(), "message": message },
        }),
        Format::Chat | Format::Responses => {
            let (t, code) = kind.openai();
            json!({ "error": { "message": message, "type": t, "param": null, "code": code } })
        }
    }
}

/// An error response; `status` overrides the kind's own (an upstream's status is passed on).
pub fn response(
    format: Format,
    kind: Kind,
    status: Option<StatusCode>,
    message: &str,
    retry_after: Option<u64>,
) -> Response<Body> {
    let bytes = Bytes::from(body(format, kind, message).to_string());
    let mut r = Response::new(Full::new(bytes).map_err(|e| match e {}).boxed());
    *r.status_mut() = status.unwrap_or_else(|| kind.status());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(secs) = retry_after {
        if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
            r.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
    }
    r
}

/// The event that ends a stream early, in the stream's own shape (so the client raises).
pub fn stream_event(format: Format, kind: Kind, message: &str, seq: u64) -> crate::sse::Event {
    match format {
        Format::Chat => crate::sse::Event {
            event: None,
            data: body(format, kind, message).to_string(),
        },
        Format::Responses => {
            let (t, code) = kind.openai();
            crate::sse::Event {
                event: Some("error".into()),
                data: json!({
                    "type": "error",
                    "code": code,
                    "message": message,
                    "param": null,
                    "sequence_number": seq,
                    "error": { "type": t, "code": code, "message": message, "param": null },
                })
                .to_string(),
            }
        }
        Format::Messages => crate::sse::Event {
            event: Some("error".into()),
            data: body(format, kind, message).to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_match_each_api() {
        let o = body(Format::Chat, Kind::NotFound, "no such model");
        assert_eq!(o["error"]["code"], "model_not_found");
        assert_eq!(o["error"]["message"], "no such model");
        let a = body(Format::Messages, Kind::Budget, "spent");
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "rate_limit_error");
        let r = response(Format::Chat, Kind::Budget, None, "spent", Some(30));
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[http::header::RETRY_AFTER], "30");
        let e = stream_event(Format::Messages, Kind::Budget, "spent", 0);
        assert_eq!(e.event.as_deref(), Some("error"));
    }
}
