//! User commands on instances (runs): create and cancel.

use apex_domain::instance::InstanceAction;
use apex_domain::{ActorRole, AgentId, DomainError};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::responses::{InstanceAccepted, WriteErrors};
use crate::error::ApiError;
use crate::extract::CommandRequest;
use crate::state::AppState;

/// The OpenAPI tag of these routes.
pub const TAG: &str = "instances";

/// Routes under `/v1/instances`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_instance))
        .routes(routes!(cancel_instance))
}

/// Body of `POST /v1/instances`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstanceRequest {
    /// The agent to run (an active agent open to your tier).
    #[schema(example = "triage")]
    pub agent_id: String,
    /// The chat thread; a new thread (named after the instance) when absent.
    pub thread_id: Option<String>,
    /// Your message to the agent.
    pub input: String,
}

/// Body of `POST /v1/instances/{id}/cancel`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelInstanceRequest {
    /// Why (shown in the chat).
    pub reason: Option<String>,
}

/// Start a run of an agent.
///
/// Checks the Agent aggregate itself (not a view): the agent must be active and open to the
/// caller's tier. The agent's tool list and version are copied into the new instance.
#[utoipa::path(
    post,
    path = "/v1/instances",
    tag = TAG,
    request_body = CreateInstanceRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely: the same key and body return the original answer and append nothing"),
        ("X-Correlation-Id" = Option<Uuid>, Header, description = "Correlation id recorded with the events"),
    ),
    responses(
        (status = 201, description = "The run was created (pending)", body = InstanceAccepted),
        WriteErrors,
    ),
    security(("bearer" = []))
)]
pub async fn create_instance(
    State(state): State<AppState>,
    request: CommandRequest<CreateInstanceRequest>,
) -> Result<Response, ApiError> {
    let CommandRequest {
        principal,
        body,
        context,
    } = request;
    principal.require(&[ActorRole::User])?;
    let tier = principal
        .tier
        .ok_or(ApiError::InvalidToken("a user token needs a tier claim"))?;
    let agent_id = AgentId::parse(&body.agent_id)?;
    let instance_id = Uuid::now_v7().to_string();
    let outcome = state
        .commands
        .create_instance(
            instance_id,
            agent_id,
            tier,
            body.thread_id,
            body.input,
            &context,
        )
        .await?;
    Ok(accepted(StatusCode::CREATED, outcome))
}

/// Cancel one of your runs (admins may cancel any run).
#[utoipa::path(
    post,
    path = "/v1/instances/{id}/cancel",
    tag = TAG,
    request_body(content = Option<CancelInstanceRequest>, description = "Optional reason"),
    params(
        ("id" = Uuid, Path, description = "Instance id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely"),
    ),
    responses(
        (status = 200, description = "The run was cancelled", body = InstanceAccepted),
        WriteErrors,
    ),
    security(("bearer" = []))
)]
pub async fn cancel_instance(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: CommandRequest<CancelInstanceRequest>,
) -> Result<Response, ApiError> {
    request
        .principal
        .require(&[ActorRole::User, ActorRole::Admin])?;
    let id = instance_id(&id)?;
    let outcome = state
        .commands
        .instance(
            &id,
            InstanceAction::Cancel {
                reason: request.body.reason,
            },
            &request.context,
        )
        .await?;
    Ok(accepted(StatusCode::OK, outcome))
}

/// Parses an instance id; anything that is not a UUID cannot name an instance.
pub fn instance_id(raw: &str) -> Result<String, ApiError> {
    Uuid::parse_str(raw)
        .map(|id| id.to_string())
        .map_err(|_| DomainError::InstanceNotFound(raw.chars().take(64).collect()).into())
}

/// The success answer of an instance command; marks replayed idempotent answers.
pub fn accepted(status: StatusCode, outcome: apex_commands::CommandOutcome) -> Response {
    let replayed = outcome.replayed;
    let mut response = (
        status,
        Json(InstanceAccepted {
            instance_id: outcome.aggregate_id,
            sequence: outcome.sequence,
        }),
    )
        .into_response();
    if replayed {
        response.headers_mut().insert(
            "idempotent-replayed",
            axum::http::HeaderValue::from_static("true"),
        );
    }
    response
}
