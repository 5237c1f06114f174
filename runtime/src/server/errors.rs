//! Errors as the OpenAI API reports them: an HTTP status and a body
//! `{"error": {"message", "type", "param", "code"}}`, so that OpenAI client libraries raise the
//! matching exception (`BadRequestError`, `NotFoundError`, `RateLimitError`, ...) with our
//! message in it.

use crate::scheduler::SubmitError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// One failed request: what the client did wrong (or why the server cannot serve it now).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The OpenAI error type: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

/// The inner object of an error body; also sent alone as an SSE event when a stream fails
/// after its headers went out.
#[derive(Serialize)]
pub struct ErrorDetail<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// 400: a field has a value the server cannot use.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 400 about the request as a whole (malformed JSON, a missing field).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 for a parameter the server accepts but cannot honour yet.
    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            code: Some("unsupported_parameter"),
            ..Self::invalid(param, message)
        }
    }

    pub fn model_not_found(requested: &str, served: &str) -> Self {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("the model `{requested}` does not exist; this server serves `{served}`"),
            )
        }
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", what)
    }

    pub fn unauthorized() -> Self {
        ApiError {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing or incorrect API key: send `Authorization: Bearer <key>`",
            )
        }
    }

    pub fn too_large(limit: usize) -> Self {
        ApiError {
            code: Some("request_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body is larger than the server's limit of {limit} bytes"),
            )
        }
    }

    pub fn body_timeout(limit: std::time::Duration) -> Self {
        ApiError {
            code: Some("request_timeout"),
            ..Self::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "the request body did not arrive in full within {:.1} s",
                    limit.as_secs_f64()
                ),
            )
        }
    }

    pub fn shutting_down() -> Self {
        ApiError {
            code: Some("server_shutting_down"),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is shutting down and accepts no new requests",
            )
        }
    }

    /// 500: the engine failed while running the request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method not allowed on this path",
        )
    }

    pub fn detail(&self) -> ErrorDetail<'_> {
        ErrorDetail {
            message: &self.message,
            kind: self.kind,
            param: self.param.as_deref(),
            code: self.code,
        }
    }

    /// The body, as JSON text.
    pub fn body(&self) -> String {
        serde_json::to_string(&ErrorBody {
            error: self.detail(),
        })
        .unwrap_or_default()
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        let message = e.to_string();
        match e {
            SubmitError::QueueFull { .. } => ApiError {
                code: Some("rate_limit_exceeded"),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            },
            SubmitError::ShuttingDown => ApiError::shutting_down(),
            SubmitError::TooLong { .. }
            | SubmitError::ExceedsKvCache { .. }
            | SubmitError::EmptyPrompt
            | SubmitError::TokenOutOfRange { .. } => ApiError::invalid("prompt", message),
            SubmitError::NoTokens => ApiError::invalid("max_tokens", message),
            SubmitError::Sampling(_) => ApiError::bad_request(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.body()).into_response();
        response.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_follow_the_openai_shape() {
        let e = ApiError::invalid("temperature", "temperature must be >= 0");
        let body: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {"message": "temperature must be >= 0",
                "type": "invalid_request_error", "param": "temperature", "code": null}})
        );
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn submit_errors_map_to_statuses() {
        let cases = [
            (
                SubmitError::QueueFull { waiting: 3 },
                StatusCode::TOO_MANY_REQUESTS,
            ),
            (SubmitError::ShuttingDown, StatusCode::SERVICE_UNAVAILABLE),
            (SubmitError::EmptyPrompt, StatusCode::BAD_REQUEST),
            (SubmitError::NoTokens, StatusCode::BAD_REQUEST),
            (
                SubmitError::TooLong {
                    prompt: 10,
                    max_tokens: 5,
                    needed: 11,
                    context: 8,
                },
                StatusCode::BAD_REQUEST,
            ),
            (
                SubmitError::ExceedsKvCache {
                    prompt: 100,
                    pool: 64,
                    blocks: 4,
                    block_size: 16,
                },
                StatusCode::BAD_REQUEST,
            ),
            (
                SubmitError::TokenOutOfRange { id: 9, vocab: 5 },
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (e, status) in cases {
            assert_eq!(ApiError::from(e.clone()).status, status, "{e:?}");
        }
    }
}
