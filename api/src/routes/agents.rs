//! Admin commands on the agent catalogue.

use std::collections::BTreeSet;

use apex_commands::CommandOutcome;
use apex_domain::agent::{AgentAction, AgentCommand, AgentDefinition, AgentPatch};
use apex_domain::{ActorRole, AgentId, Tier};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::responses::{AgentAccepted, WriteErrors};
use crate::error::ApiError;
use crate::extract::CommandRequest;
use crate::state::AppState;

/// The OpenAPI tag of these routes.
pub const TAG: &str = "admin-agents";

/// Routes under `/v1/admin/agents`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(define_agent))
        .routes(routes!(update_agent))
        .routes(routes!(activate_agent))
        .routes(routes!(disable_agent))
        .routes(routes!(retire_agent))
}

/// A customer tier.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TierDto {
    /// Free plan.
    Free,
    /// Early-access plan.
    Early,
    /// Mid-market plan.
    Mid,
    /// Enterprise plan.
    Enterprise,
}

impl From<TierDto> for Tier {
    fn from(t: TierDto) -> Self {
        match t {
            TierDto::Free => Tier::Free,
            TierDto::Early => Tier::Early,
            TierDto::Mid => Tier::Mid,
            TierDto::Enterprise => Tier::Enterprise,
        }
    }
}

fn tiers(list: Vec<TierDto>) -> BTreeSet<Tier> {
    list.into_iter().map(Tier::from).collect()
}

/// Body of `POST /v1/admin/agents`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DefineAgentRequest {
    /// Slug: lowercase letters, digits and dashes; the agent's permanent id.
    #[schema(example = "triage")]
    pub id: String,
    /// Name shown in the catalogue.
    pub display_name: String,
    /// What the agent does.
    #[serde(default)]
    pub description: String,
    /// Tools the agent may call.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Tiers allowed to run it (at least one).
    pub tiers: Vec<TierDto>,
}

/// Body of `PATCH /v1/admin/agents/{id}`: absent fields stay unchanged.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateAgentRequest {
    /// New name.
    pub display_name: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New tool list (replaces the old one).
    pub tools: Option<Vec<String>>,
    /// New tier set (replaces the old one).
    pub tiers: Option<Vec<TierDto>>,
}

/// An empty body (status changes take no fields).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmptyRequest {}

async fn run<T>(
    state: &AppState,
    id: &str,
    request: CommandRequest<T>,
    status: StatusCode,
    action: impl FnOnce(T) -> AgentAction,
) -> Result<Response, ApiError> {
    request.principal.require(&[ActorRole::Admin])?;
    let command = AgentCommand {
        id: AgentId::parse(id)?,
        actor: request.principal.actor.clone(),
        action: action(request.body),
    };
    let outcome = state.commands.agent(command, &request.context).await?;
    Ok(agent_accepted(status, outcome))
}

fn agent_accepted(status: StatusCode, outcome: CommandOutcome) -> Response {
    let mut response = (
        status,
        Json(AgentAccepted {
            agent_id: outcome.aggregate_id,
            version: outcome.sequence,
        }),
    )
        .into_response();
    if outcome.replayed {
        response.headers_mut().insert(
            "idempotent-replayed",
            axum::http::HeaderValue::from_static("true"),
        );
    }
    response
}

/// Add an agent to the catalogue, in draft.
#[utoipa::path(post, path = "/v1/admin/agents", tag = TAG,
    request_body = DefineAgentRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely")),
    responses((status = 201, description = "Defined (draft, version 1)", body = AgentAccepted), WriteErrors),
    security(("bearer" = [])))]
pub async fn define_agent(
    State(state): State<AppState>,
    request: CommandRequest<DefineAgentRequest>,
) -> Result<Response, ApiError> {
    let id = request.body.id.clone();
    run(&state, &id, request, StatusCode::CREATED, |b| {
        AgentAction::Define(AgentDefinition {
            display_name: b.display_name,
            description: b.description,
            tools: b.tools,
            tiers: tiers(b.tiers),
        })
    })
    .await
}

/// Change an agent's definition; bumps its version.
#[utoipa::path(patch, path = "/v1/admin/agents/{id}", tag = TAG,
    request_body = UpdateAgentRequest,
    params(("id" = String, Path, description = "Agent slug"),
           ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely")),
    responses((status = 200, description = "Updated (or unchanged when the values are the same)", body = AgentAccepted), WriteErrors),
    security(("bearer" = [])))]
pub async fn update_agent(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: CommandRequest<UpdateAgentRequest>,
) -> Result<Response, ApiError> {
    run(&state, &id, request, StatusCode::OK, |b| {
        AgentAction::Update(AgentPatch {
            display_name: b.display_name,
            description: b.description,
            tools: b.tools,
            tiers: b.tiers.map(tiers),
        })
    })
    .await
}

/// Open an agent for runs: draft or disabled → active.
#[utoipa::path(post, path = "/v1/admin/agents/{id}/activate", tag = TAG,
    request_body(content = Option<EmptyRequest>, description = "No fields"),
    params(("id" = String, Path, description = "Agent slug"),
           ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely")),
    responses((status = 200, description = "Active", body = AgentAccepted), WriteErrors),
    security(("bearer" = [])))]
pub async fn activate_agent(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: CommandRequest<EmptyRequest>,
) -> Result<Response, ApiError> {
    run(&state, &id, request, StatusCode::OK, |_| {
        AgentAction::Activate
    })
    .await
}

/// Close an agent for new runs: active → disabled.
#[utoipa::path(post, path = "/v1/admin/agents/{id}/disable", tag = TAG,
    request_body(content = Option<EmptyRequest>, description = "No fields"),
    params(("id" = String, Path, description = "Agent slug"),
           ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely")),
    responses((status = 200, description = "Disabled", body = AgentAccepted), WriteErrors),
    security(("bearer" = [])))]
pub async fn disable_agent(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: CommandRequest<EmptyRequest>,
) -> Result<Response, ApiError> {
    run(&state, &id, request, StatusCode::OK, |_| {
        AgentAction::Disable
    })
    .await
}

/// Close an agent for good: draft, active or disabled → retired (terminal).
#[utoipa::path(post, path = "/v1/admin/agents/{id}/retire", tag = TAG,
    request_body(content = Option<EmptyRequest>, description = "No fields"),
    params(("id" = String, Path, description = "Agent slug"),
           ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely")),
    responses((status = 200, description = "Retired", body = AgentAccepted), WriteErrors),
    security(("bearer" = [])))]
pub async fn retire_agent(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: CommandRequest<EmptyRequest>,
) -> Result<Response, ApiError> {
    run(&state, &id, request, StatusCode::OK, |_| {
        AgentAction::Retire
    })
    .await
}
