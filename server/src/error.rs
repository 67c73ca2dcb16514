//! The one error type every handler returns, and its JSON shape on the wire.
//!
//! The body repeats the status in both PocketBase's and VSKI's keys:
//! `{"status", "code", "message", "error", "data"}`. Internal causes are logged once here, at
//! the boundary, and the client gets a generic message: SQL, paths and driver errors never leak.

use std::collections::BTreeMap;

use actix_web::{HttpResponse, ResponseError, http::StatusCode};
use serde::Serialize;
use serde_json::json;

/// One problem with one input field, as PocketBase reports it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FieldError {
    pub code: &'static str,
    pub message: String,
}

/// Per-field problems of one request, keyed by field name (sorted for stable output).
pub type FieldErrors = BTreeMap<String, FieldError>;

/// Adds a field error to `errors` (the first problem of a field wins).
pub fn field_error(errors: &mut FieldErrors, field: &str, code: &'static str, message: impl Into<String>) {
    errors.entry(field.to_string()).or_insert_with(|| FieldError {
        code,
        message: message.into(),
    });
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or its values are invalid; nothing was changed.
    #[error("{message}")]
    BadRequest { message: String, data: FieldErrors },
    /// No valid credentials for an endpoint that needs them.
    #[error("{0}")]
    Unauthorized(String),
    /// Valid credentials that do not grant this action.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The body is larger than the configured limit.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// One write would change more data than one transaction may carry.
    #[error("{0}")]
    TransactionTooLarge(String),
    /// Too many attempts (sign-in rate limit); retry after this many seconds.
    #[error("Too many attempts; retry in {retry_after} s.")]
    TooManyRequests { retry_after: u64 },
    /// Something failed on our side. The context is logged, never sent.
    #[error("{context}: {source}")]
    Internal {
        context: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            data: FieldErrors::new(),
        }
    }

    /// A 400 for invalid field values. `errors` must not be empty.
    pub fn validation(errors: FieldErrors) -> Self {
        ApiError::BadRequest {
            message: "Failed to validate the submitted data.".into(),
            data: errors,
        }
    }

    /// A 400 with a single field error.
    pub fn invalid_field(field: &str, code: &'static str, message: impl Into<String>) -> Self {
        let mut errors = FieldErrors::new();
        field_error(&mut errors, field, code, message);
        Self::validation(errors)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::NotFound(message.into())
    }

    pub fn internal(context: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        ApiError::Internal {
            context: context.into(),
            source: source.into(),
        }
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        ApiError::internal("sqlite", e)
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        ApiError::internal("io", e)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::TransactionTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let (message, data) = match self {
            ApiError::BadRequest { message, data } => (message.clone(), json!(data)),
            ApiError::Internal { .. } => {
                log::error!("internal error: {self}");
                (
                    "Something went wrong while processing your request.".to_string(),
                    json!({}),
                )
            }
            ApiError::Unauthorized(m)
            | ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::MethodNotAllowed(m)
            | ApiError::TransactionTooLarge(m) => (m.clone(), json!({})),
            ApiError::PayloadTooLarge(_) | ApiError::TooManyRequests { .. } => (self.to_string(), json!({})),
        };
        let mut resp = error_body(status, &message, data);
        if let ApiError::TooManyRequests { retry_after } = self {
            resp.headers_mut().insert(
                actix_web::http::header::RETRY_AFTER,
                actix_web::http::header::HeaderValue::from(*retry_after),
            );
        }
        resp
    }
}

/// Builds an error response in the documented shape.
pub fn error_body(status: StatusCode, message: &str, data: serde_json::Value) -> HttpResponse {
    HttpResponse::build(status).json(json!({
        "status": status.as_u16(),
        "code": status.as_u16(),
        "message": message,
        "error": message,
        "data": data,
    }))
}
