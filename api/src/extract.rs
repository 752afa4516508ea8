//! Request extractors that answer in the API's error format.

use apex_commands::{CommandContext, IdempotencyKey};
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, header};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;

/// Longest accepted `Idempotency-Key`.
const IDEMPOTENCY_KEY_MAX: usize = 255;

/// An authenticated command request: the principal, the parsed JSON body and the command
/// context (correlation, causation, idempotency key, trace context).
pub struct CommandRequest<T> {
    /// The caller.
    pub principal: Principal,
    /// The body.
    pub body: T,
    /// Metadata for the events.
    pub context: CommandContext,
}

impl<T: DeserializeOwned> FromRequest<AppState> for CommandRequest<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let (mut parts, body) = req.into_parts();
        let principal =
            <Principal as axum::extract::FromRequestParts<AppState>>::from_request_parts(
                &mut parts, state,
            )
            .await?;
        let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge(state.body_limit)
                } else {
                    ApiError::MalformedJson(rejection.body_text())
                }
            })?;
        let body = parse_json(&parts.headers, &bytes)?;
        let mut context = CommandContext::new(principal.actor.clone());
        if let Some(correlation) = header_uuid(&parts.headers, "x-correlation-id")? {
            context.correlation_id = correlation;
        }
        if let Some(key) = header_str(&parts.headers, "idempotency-key")? {
            if key.is_empty() || key.len() > IDEMPOTENCY_KEY_MAX {
                return Err(ApiError::InvalidHeader("Idempotency-Key"));
            }
            let mut hasher = Sha256::new();
            hasher.update(parts.method.as_str());
            hasher.update([0]);
            hasher.update(parts.uri.path());
            hasher.update([0]);
            hasher.update(&bytes);
            context.idempotency = Some(IdempotencyKey {
                key: key.to_owned(),
                request_hash: hex::encode(hasher.finalize()),
            });
        }
        // Continue the caller's trace, or start one here: it travels with the events through
        // the store, the broker and the projectors to the WebSocket.
        let traceparent = match header_str(&parts.headers, "traceparent")? {
            Some(t) if valid_traceparent(t) => t.to_owned(),
            Some(_) => return Err(ApiError::InvalidHeader("traceparent")),
            None => new_traceparent(),
        };
        // With span export on, the stored context names this request's span, so the relay, the
        // projectors and the WebSocket send become its children in one trace.
        let traceparent =
            apex_projections::trace::traceparent(&tracing::Span::current()).unwrap_or(traceparent);
        tracing::Span::current().record("trace_id", &traceparent[3..35]);
        context.traceparent = Some(traceparent);
        Ok(Self {
            principal,
            body,
            context,
        })
    }
}

/// Parses a JSON body; an empty body reads as `{}` so commands without fields need none.
fn parse_json<T: DeserializeOwned>(headers: &HeaderMap, bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return serde_json::from_slice(b"{}").map_err(json_error);
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim();
            mime == "application/json" || mime.ends_with("+json")
        });
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    // Syntax first (400), then shape (422): `{}{}` is malformed, not merely incomplete. A
    // well-formed body of the right shape is parsed once; only a refused one is read again,
    // as a plain JSON value, to tell which of the two it is.
    serde_json::from_slice(bytes).or_else(|shape_or_syntax| {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(json_error)?;
        match serde_json::from_value::<T>(value) {
            Err(e) => Err(ApiError::InvalidBody(e.to_string())),
            // Cannot happen (the same text, the same type), but never answer with a body
            // that was refused.
            Ok(_) => Err(json_error(shape_or_syntax)),
        }
    })
}

fn json_error(err: serde_json::Error) -> ApiError {
    match err.classify() {
        serde_json::error::Category::Data => ApiError::InvalidBody(err.to_string()),
        _ => ApiError::MalformedJson(err.to_string()),
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, ApiError> {
    headers
        .get(name)
        .map(|v| v.to_str().map_err(|_| ApiError::InvalidHeader(name)))
        .transpose()
}

fn header_uuid(headers: &HeaderMap, name: &'static str) -> Result<Option<Uuid>, ApiError> {
    header_str(headers, name)?
        .map(|v| Uuid::parse_str(v).map_err(|_| ApiError::InvalidHeader(name)))
        .transpose()
}

/// Query parameters parsed into `T` (use `#[serde(deny_unknown_fields)]`): an unknown
/// parameter, a malformed value or a repeated one answers `400 invalid_query`.
#[derive(Debug, Clone)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(query)| Self(query))
            .map_err(|rejection| ApiError::InvalidQuery(rejection.body_text()))
    }
}

/// A W3C `traceparent`: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
pub(crate) fn valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1] != "00000000000000000000000000000000"
}

/// A new sampled trace context.
fn new_traceparent() -> String {
    format!(
        "00-{}-{}-01",
        Uuid::new_v4().simple(),
        &Uuid::new_v4().simple().to_string()[..16]
    )
}
