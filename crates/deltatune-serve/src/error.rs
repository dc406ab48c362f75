//! Errors as clients see them: an HTTP status and an OpenAI-shaped error object
//! (`{"error": {"message", "type", "param", "code"}}`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// An error answered to a client. Messages name fields and deltas, never internal paths.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `rate_limit_error`, …
    pub kind: &'static str,
    /// The request field at fault, if any.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: None }
    }

    /// 400 naming the request field at fault.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.to_string()), ..ApiError::new(400, "invalid_request_error", message) }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "invalid_request_error", message)
    }

    pub fn unknown_model(name: &str, known: &[String]) -> Self {
        let mut e = ApiError::field("model", format!("the model `{name}` does not exist; loaded: {}", known.join(", ")));
        e.status = 404;
        e.code = Some("model_not_found");
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(500, "server_error", message)
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The error object as JSON text (for server-sent events).
    pub fn json(&self) -> String {
        let body = Body { error: Inner { message: &self.message, kind: self.kind, param: self.param.as_deref(), code: self.code } };
        serde_json::to_string(&body).unwrap_or_else(|_| "{\"error\":{\"message\":\"error\"}}".into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = Body { error: Inner { message: &self.message, kind: self.kind, param: self.param.as_deref(), code: self.code } };
        let mut r = (status, Json(body)).into_response();
        if self.status == 429 || self.status == 503 {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == 401 {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// A library error as a client sees it: bad arguments are 400s naming the field, everything else
/// a 500 with the message (library messages name flags and keys; paths are stripped by callers).
pub fn from_lib(e: &deltatune::Error, field: &str) -> ApiError {
    match e {
        deltatune::Error::InvalidArg { msg, .. } => ApiError::field(field, format!("{field}: {msg}")),
        _ => ApiError::internal(e.to_string()),
    }
}
