//! Runner commands: the agent runtime reports each step of a run.

use apex_domain::ActorRole;
use apex_domain::instance::InstanceAction;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::instances::{accepted, instance_id};
use super::responses::{InstanceAccepted, WriteErrors};
use crate::error::ApiError;
use crate::extract::CommandRequest;
use crate::state::AppState;

/// The OpenAPI tag of these routes.
pub const TAG: &str = "runner";

/// Routes under `/v1/runner/instances/{id}`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(start))
        .routes(routes!(think))
        .routes(routes!(start_tool))
        .routes(routes!(complete_tool))
        .routes(routes!(complete))
        .routes(routes!(fail))
}

/// Body of `start`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// Status line shown in the chat.
    pub message: Option<String>,
    /// Internal: the system prompt used (never shown to users).
    pub prompt: Option<String>,
}

/// Body of `thoughts`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ThoughtRequest {
    /// The thought, shown in the chat.
    pub thought: String,
    /// Internal: the prompt that produced it.
    pub prompt: Option<String>,
    /// Internal: raw model output.
    pub raw: Option<Value>,
}

/// Body of `tools`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartToolRequest {
    /// Unique within the run.
    pub call_id: String,
    /// A tool in the run's tool list.
    pub tool: String,
    /// One-line summary shown in the chat.
    pub summary: Option<String>,
    /// Internal: raw arguments.
    #[serde(default)]
    pub arguments: Value,
}

/// Body of `tools/{call_id}/complete`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteToolRequest {
    /// Whether the tool reported an error.
    #[serde(default)]
    pub is_error: bool,
    /// One-line summary shown in the chat.
    pub summary: Option<String>,
    /// Internal: raw result.
    #[serde(default)]
    pub result: Value,
    /// Internal: how long the tool ran, in milliseconds, as the runtime measured it
    /// (at most 2^53 - 1). Admins and auditors see it; the chat does not.
    pub duration_ms: Option<u64>,
}

/// Body of `complete`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteRequest {
    /// The final answer, shown in the chat.
    pub output: String,
    /// Internal: raw final output.
    pub raw: Option<Value>,
}

/// Body of `fail`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailRequest {
    /// What the chat shows about the failure.
    pub error: String,
    /// Internal: raw failure detail.
    pub raw: Option<Value>,
}

async fn run<T>(
    state: &AppState,
    id: &str,
    request: CommandRequest<T>,
    action: impl FnOnce(T) -> InstanceAction,
) -> Result<Response, ApiError> {
    request.principal.require(&[ActorRole::Runner])?;
    let id = instance_id(id)?;
    let outcome = state
        .commands
        .instance(&id, action(request.body), &request.context)
        .await?;
    Ok(accepted(StatusCode::OK, outcome))
}

/// The runtime picked the run up: pending → running.
#[utoipa::path(post, path = "/v1/runner/instances/{id}/start", tag = TAG,
    request_body(content = Option<StartRequest>, description = "Optional status line and prompt"),
    params(("id" = uuid::Uuid, Path, description = "Instance id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely")),
    responses((status = 200, description = "Recorded", body = InstanceAccepted), WriteErrors),
    security(("bearer" = [])))]
pub async fn start(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: CommandRequest<StartRequest>,
) -> Result<Response, ApiError> {
    run(&state, &id, request, |b| InstanceAction::Start {
        message: b.message,
        prompt: b.prompt,
    })
    .await
}

/// The agent thought something (running runs only).
#[utoipa::path(post, path = "/v1/runner/instances/{id}/thoughts", tag = TAG,
    request_body = ThoughtRequest,
    params(("id" = uuid::Uuid, Path, description = "Instance id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely")),
    responses((status = 200, description = "Recorded", body = InstanceAccepted), WriteErrors),
    security(("bearer" = [])))]
pub async fn think(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: CommandRequest<ThoughtRequest>,
) -> Result<Response, ApiError> {
    run(&state, &id, request, |b| InstanceAction::Think {
        thought: b.thought,
        prompt: b.prompt,
        raw: b.raw,
    })
    .await
}

/// A tool call began: the call id must be new in this run, the tool in its tool list.
#[utoipa::path(post, path = "/v1/runner/instances/{id}/tools", tag = TAG,
    request_body = StartToolRequest,
    params(("id" = uuid::Uuid, Path, description = "Instance id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely")),
    responses((status = 200, description = "Recorded", body = InstanceAccepted), WriteErrors),
    security(("bearer" = [])))]
pub async fn start_tool(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: CommandRequest<StartToolRequest>,
) -> Result<Response, ApiError> {
    run(&state, &id, request, |b| InstanceAction::StartTool {
        call_id: b.call_id,
        tool: b.tool,
        summary: b.summary,
        arguments: b.arguments,
    })
    .await
}

/// A tool call finished: the call must be open.
#[utoipa::path(post, path = "/v1/runner/instances/{id}/tools/{call_id}/complete", tag = TAG,
    request_body = CompleteToolRequest,
    params(("id" = uuid::Uuid, Path, description = "Instance id"),
           ("call_id" = String, Path, description = "The open tool call"),
           ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely")),
    responses((status = 200, description = "Recorded", body = InstanceAccepted), WriteErrors),
    security(("bearer" = [])))]
pub async fn complete_tool(
    State(state): State<AppState>,
    Path((id, call_id)): Path<(String, String)>,
    request: CommandRequest<CompleteToolRequest>,
) -> Result<Response, ApiError> {
    run(&state, &id, request, |b| InstanceAction::CompleteTool {
        call_id,
        is_error: b.is_error,
        summary: b.summary,
        result: b.result,
        duration_ms: b.duration_ms,
    })
    .await
}

/// The run finished with an answer: running → completed (no tool call may be open).
#[utoipa::path(post, path = "/v1/runner/instances/{id}/complete", tag = TAG,
    request_body = CompleteRequest,
    params(("id" = uuid::Uuid, Path, description = "Instance id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely")),
    responses((status = 200, description = "Recorded", body = InstanceAccepted), WriteErrors),
    security(("bearer" = [])))]
pub async fn complete(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: CommandRequest<CompleteRequest>,
) -> Result<Response, ApiError> {
    run(&state, &id, request, |b| InstanceAction::Complete {
        output: b.output,
        raw: b.raw,
    })
    .await
}

/// The run failed: running → failed.
#[utoipa::path(post, path = "/v1/runner/instances/{id}/fail", tag = TAG,
    request_body = FailRequest,
    params(("id" = uuid::Uuid, Path, description = "Instance id"),
           ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely")),
    responses((status = 200, description = "Recorded", body = InstanceAccepted), WriteErrors),
    security(("bearer" = [])))]
pub async fn fail(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: CommandRequest<FailRequest>,
) -> Result<Response, ApiError> {
    run(&state, &id, request, |b| InstanceAction::Fail {
        error: b.error,
        raw: b.raw,
    })
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::CompleteToolRequest;

    #[test]
    fn a_tool_completion_may_carry_its_duration_and_nothing_unknown() {
        let body: CompleteToolRequest =
            serde_json::from_value(json!({"result": {"rows": 3}, "duration_ms": 1834})).unwrap();
        assert_eq!(body.duration_ms, Some(1834));
        let body: CompleteToolRequest = serde_json::from_value(json!({})).unwrap();
        assert_eq!((body.duration_ms, body.is_error), (None, false));
        for bad in [
            json!({"duration_ms": -1}),
            json!({"duration_ms": 1.5}),
            json!({"duration_ms": "1s"}),
            json!({"duration": 1}),
        ] {
            assert!(
                serde_json::from_value::<CompleteToolRequest>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }
}
