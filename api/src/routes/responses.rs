//! Response models shared by the write routes, and the error responses each route documents
//! (`WriteErrors` for commands, `ReadErrors` and `ReadNotFound` for queries).

use serde::Serialize;
use utoipa::{IntoResponses, ToSchema};

use crate::error::ErrorBody;

/// A command on an instance was accepted and its events stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct InstanceAccepted {
    /// The instance.
    pub instance_id: String,
    /// The instance's sequence after the command: the sequence of its last event.
    pub sequence: u64,
}

/// A command on an agent was accepted and its events stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentAccepted {
    /// The agent.
    pub agent_id: String,
    /// The agent's version after the command.
    pub version: u64,
}

/// Error responses of every authenticated write route.
#[derive(IntoResponses)]
pub enum WriteErrors {
    /// Malformed JSON, header or path parameter.
    #[response(
        status = 400,
        description = "Malformed JSON or header, or a path parameter that is not UTF-8 (`malformed_json`, `invalid_header`, `invalid_path`)"
    )]
    BadRequest(ErrorBody),
    /// Missing, invalid or expired token.
    #[response(
        status = 401,
        description = "Missing, invalid or expired bearer token (`missing_token`, `invalid_token`, `token_expired`)"
    )]
    Unauthorized(ErrorBody),
    /// Role or tier not allowed.
    #[response(
        status = 403,
        description = "The token's role may not use this route, or the tier may not run this agent (`role_not_allowed`, `tier_not_allowed`)"
    )]
    Forbidden(ErrorBody),
    /// Target not found.
    #[response(
        status = 404,
        description = "The target does not exist or is not yours (`agent_not_found`, `instance_not_found`, `unknown_call_id`)"
    )]
    NotFound(ErrorBody),
    /// State does not allow it.
    #[response(
        status = 409,
        description = "The current state does not allow this (`invalid_instance_transition`, `instance_terminal`, `duplicate_call_id`, `call_already_completed`, `open_tool_calls`, `agent_not_active`, `agent_already_exists`, `invalid_agent_transition`, `agent_retired`, `instance_already_exists`), or concurrent commands kept winning (`concurrency_conflict`, with Retry-After)"
    )]
    Conflict(ErrorBody),
    /// Body too large.
    #[response(
        status = 413,
        description = "The body is larger than the limit (`payload_too_large`)"
    )]
    PayloadTooLarge(ErrorBody),
    /// Body not JSON.
    #[response(
        status = 415,
        description = "The body is not `application/json` (`unsupported_media_type`)"
    )]
    UnsupportedMediaType(ErrorBody),
    /// Body does not match the schema or breaks a limit.
    #[response(
        status = 422,
        description = "The body does not match the schema or breaks a size or format rule (`invalid_body`, `field_required`, `field_too_long`, `field_invalid`, `empty_update`, `tool_not_allowed`, `idempotency_key_reused`)"
    )]
    Unprocessable(ErrorBody),
    /// Rate limit.
    #[response(
        status = 429,
        description = "The principal sent commands faster than its rate limit (per replica, token bucket per token `sub`; runners have a higher limit); nothing was done, retry after the seconds in Retry-After (`rate_limited`)",
        headers(("Retry-After" = u64, description = "Seconds until the next command is accepted"))
    )]
    TooManyRequests(ErrorBody),
    /// Internal failure.
    #[response(
        status = 500,
        description = "Unexpected failure; logged with its cause (`internal_error`)"
    )]
    Internal(ErrorBody),
    /// Database down.
    #[response(
        status = 503,
        description = "The event store is unreachable; retry later, with the same Idempotency-Key (`service_unavailable`, with Retry-After)"
    )]
    Unavailable(ErrorBody),
}

/// Error responses of every authenticated read route.
#[derive(IntoResponses)]
pub enum ReadErrors {
    /// Bad query parameter.
    #[response(
        status = 400,
        description = "A query parameter is unknown, malformed or out of range: status, cursor, limit, time (`invalid_query`); or a path parameter is not UTF-8 (`invalid_path`); or a path or query parameter contains the NUL character (`invalid_text`)"
    )]
    BadRequest(ErrorBody),
    /// Missing, invalid or expired token.
    #[response(
        status = 401,
        description = "Missing, invalid or expired bearer token (`missing_token`, `invalid_token`, `token_expired`)"
    )]
    Unauthorized(ErrorBody),
    /// Role not allowed.
    #[response(
        status = 403,
        description = "The token's role may not use this route (`role_not_allowed`)"
    )]
    Forbidden(ErrorBody),
    /// Internal failure.
    #[response(
        status = 500,
        description = "Unexpected failure; logged with its cause (`internal_error`)"
    )]
    Internal(ErrorBody),
    /// Database down.
    #[response(
        status = 503,
        description = "The database is unreachable; retry later (`service_unavailable`, with Retry-After)"
    )]
    Unavailable(ErrorBody),
}

/// The extra error response of read routes that name one resource.
#[derive(IntoResponses)]
pub enum ReadNotFound {
    /// Target not found.
    #[response(
        status = 404,
        description = "The resource does not exist or is not yours (`instance_not_found`, `user_not_found`)"
    )]
    NotFound(ErrorBody),
}
