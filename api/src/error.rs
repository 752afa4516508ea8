//! The one HTTP error type: every failure maps to a status and a stable code.
//!
//! Bodies are `{"error":{"code":"...","message":"..."}}`. Store failures are logged with their
//! whole cause chain here, at the edge, and answered with an opaque message.

use apex_commands::CommandError;
use apex_domain::{DomainError, ErrorKind};
use axum::Json;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The error envelope.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// A machine-readable code and a human-readable message.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code clients match on (see docs/architecture/agents.md).
    #[schema(example = "instance_terminal")]
    pub code: String,
    /// Explanation for humans; may change between releases.
    pub message: String,
}

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No bearer token.
    #[error("a bearer token is required")]
    MissingToken,
    /// The token is malformed, badly signed, or has wrong claims.
    #[error("the bearer token is invalid: {0}")]
    InvalidToken(&'static str),
    /// The token expired.
    #[error("the bearer token has expired")]
    TokenExpired,
    /// The token's role may not use this route.
    #[error("role {0} may not use this route")]
    RoleNotAllowed(&'static str),
    /// The body is not well-formed JSON.
    #[error("the request body is not well-formed JSON: {0}")]
    MalformedJson(String),
    /// The body is JSON but does not match the schema (missing or unknown field, wrong type).
    #[error("the request body does not match the schema: {0}")]
    InvalidBody(String),
    /// The body is not JSON.
    #[error("the request body must be application/json")]
    UnsupportedMediaType,
    /// The body exceeds the configured limit.
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// A header is malformed.
    #[error("header {0} is invalid")]
    InvalidHeader(&'static str),
    /// No route matches the path.
    #[error("no route matches this path")]
    RouteNotFound,
    /// A query parameter is unknown, malformed or out of range (bad status, cursor, limit, time).
    #[error("the query parameters are invalid: {0}")]
    InvalidQuery(String),
    /// No usage is recorded for this user id.
    #[error("user {0} has no recorded usage")]
    UserNotFound(String),
    /// The principal sent commands faster than its rate limit allows.
    #[error("too many commands; retry after {retry_after_seconds} s")]
    RateLimited {
        /// Seconds until the next command is accepted (sent as `Retry-After`).
        retry_after_seconds: u64,
    },
    /// A path parameter cannot be decoded (not UTF-8 after percent-decoding).
    #[error("the path is invalid: {0}")]
    InvalidPath(String),
    /// A path or query parameter holds the NUL character, which no stored text can hold.
    #[error("a path or query parameter contains the NUL character (U+0000)")]
    InvalidText,
    /// The route exists but not with this method.
    #[error("this route does not accept this method (see the Allow header)")]
    MethodNotAllowed,
    /// Any other refusal produced by the HTTP framework before a handler ran.
    #[error("the request was refused: {1}")]
    Rejected(StatusCode, String),
    /// No event of this aggregate is stored (or the type is neither agent nor instance).
    #[error("no events of {0} {1} are stored (aggregate types: agent, instance)")]
    AggregateNotFound(String, String),
    /// No read model has this name.
    #[error("no projection is named {0} (agents, instances, timeline, agent_stats, usage)")]
    ProjectionNotFound(String),
    /// A rebuild of this read model is already running.
    #[error("a rebuild of {0} is already running; wait for it to finish")]
    RebuildInProgress(&'static str),
    /// A write was refused or failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// A business rule refused it.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// The database is unreachable.
    #[error("the database is unavailable")]
    Unavailable(#[source] BoxError),
    /// Unexpected failure.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

/// Any error, boxed with its cause chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl From<sqlx::Error> for ApiError {
    /// The same classification as the write side: a connection failure, a pool timeout or a
    /// server shutting down is `503 service_unavailable`; a parameter the database cannot hold
    /// as text (NUL) is `400 invalid_text`; anything else a logged `500`.
    fn from(err: sqlx::Error) -> Self {
        if CommandError::is_connection_failure(&err) {
            ApiError::Unavailable(Box::new(err))
        } else if CommandError::is_unstorable_text(&err) {
            ApiError::InvalidText
        } else {
            ApiError::Internal(Box::new(err))
        }
    }
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MissingToken | ApiError::InvalidToken(_) | ApiError::TokenExpired => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::RoleNotAllowed(_) => StatusCode::FORBIDDEN,
            ApiError::MalformedJson(_) | ApiError::InvalidHeader(_) | ApiError::InvalidQuery(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::RouteNotFound
            | ApiError::UserNotFound(_)
            | ApiError::AggregateNotFound(..)
            | ApiError::ProjectionNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::RebuildInProgress(_) => StatusCode::CONFLICT,
            ApiError::InvalidBody(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::InvalidPath(_) | ApiError::InvalidText => StatusCode::BAD_REQUEST,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Rejected(status, _) => *status,
            ApiError::Domain(e) | ApiError::Command(CommandError::Domain(e)) => domain_status(e),
            ApiError::Command(CommandError::Conflict { .. }) => StatusCode::CONFLICT,
            ApiError::Command(CommandError::IdempotencyKeyReused) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::Command(CommandError::Unavailable(_)) | ApiError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Command(CommandError::Store(_)) | ApiError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::MissingToken => "missing_token",
            ApiError::InvalidToken(_) => "invalid_token",
            ApiError::TokenExpired => "token_expired",
            ApiError::RoleNotAllowed(_) => "role_not_allowed",
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::InvalidBody(_) => "invalid_body",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::InvalidHeader(_) => "invalid_header",
            ApiError::RouteNotFound => "route_not_found",
            ApiError::InvalidQuery(_) => "invalid_query",
            ApiError::UserNotFound(_) => "user_not_found",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::InvalidPath(_) => "invalid_path",
            ApiError::InvalidText => "invalid_text",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Rejected(..) => "request_rejected",
            ApiError::AggregateNotFound(..) => "aggregate_not_found",
            ApiError::ProjectionNotFound(_) => "projection_not_found",
            ApiError::RebuildInProgress(_) => "rebuild_in_progress",
            ApiError::Domain(e) | ApiError::Command(CommandError::Domain(e)) => e.code(),
            ApiError::Command(CommandError::Conflict { .. }) => "concurrency_conflict",
            ApiError::Command(CommandError::IdempotencyKeyReused) => "idempotency_key_reused",
            ApiError::Command(CommandError::Unavailable(_)) | ApiError::Unavailable(_) => {
                "service_unavailable"
            }
            ApiError::Command(CommandError::Store(_)) | ApiError::Internal(_) => "internal_error",
        }
    }
}

fn domain_status(err: &DomainError) -> StatusCode {
    match err.kind() {
        ErrorKind::Validation => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::Conflict => StatusCode::CONFLICT,
    }
}

/// Formats an error and all its sources, outermost first.
pub fn cause_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let code = self.code();
        if status.is_server_error() {
            tracing::error!(code, error = %cause_chain(&self), "request failed");
        } else {
            tracing::info!(code, error = %self, "request refused");
        }
        let message = if status.is_server_error() {
            match status {
                StatusCode::SERVICE_UNAVAILABLE => {
                    "the database is unreachable; retry later (repeat a command with the same \
                     Idempotency-Key to make the retry safe)"
                        .to_owned()
                }
                _ => "an internal error occurred; it has been logged".to_owned(),
            }
        } else if let ApiError::Command(CommandError::Conflict { .. }) = self {
            format!("{self}; retry the request")
        } else {
            self.to_string()
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message,
            },
        };
        let retry_after = match self {
            ApiError::RateLimited {
                retry_after_seconds,
            } => Some(HeaderValue::from(retry_after_seconds.max(1))),
            _ if status == StatusCode::SERVICE_UNAVAILABLE || code == "concurrency_conflict" => {
                Some(HeaderValue::from_static("1"))
            }
            _ => None,
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(retry_after) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after);
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Gives the error envelope to the error answers the HTTP framework makes before any handler
/// runs: a path parameter that does not decode to UTF-8 (`400 invalid_path`), a route called
/// with a method it does not have (`405 method_not_allowed`, keeping `Allow`), and anything
/// else of the kind (`request_rejected`). Answers that are already JSON pass untouched.
///
/// Handlers read bodies, queries and upgrades through extractors that answer with
/// [`ApiError`], so a non-JSON `400` can only come from a path parameter.
pub async fn envelope_guard(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| {
            String::from_utf8_lossy(&b)
                .chars()
                .take(200)
                .collect::<String>()
        })
        .unwrap_or_default();
    let error = match status {
        StatusCode::BAD_REQUEST => ApiError::InvalidPath(text),
        StatusCode::NOT_FOUND => ApiError::RouteNotFound,
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
        s if s.is_server_error() => ApiError::Internal(text.into()),
        s => ApiError::Rejected(s, text),
    };
    let mut enveloped = error.into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            enveloped
                .headers_mut()
                .entry(name)
                .or_insert_with(|| value.clone());
        }
    }
    enveloped
}
