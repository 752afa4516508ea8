//! User queries over the read models: the agent catalogue, your runs and their chat timeline.
//!
//! Answers come from the read models (`rm_agents`, `rm_instances`, `rm_timeline`). The projected
//! ones may trail the last accepted command by the projectors' lag; the timeline is written
//! with the events, so it has every step whose command was answered. A user sees only their own runs
//! (another user's run is answered exactly like a missing one) and never internal detail:
//! `last_internal` is not even selected here.

use apex_domain::instance::InstanceStatus;
use apex_domain::{ActorRole, DomainError, Tier};
use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::pagination::{self, InstanceCursor};
use super::responses::{ReadErrors, ReadNotFound};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::ApiQuery;
use crate::state::AppState;

/// The OpenAPI tag of the instance routes.
pub const TAG: &str = "instances";
/// The OpenAPI tag of the catalogue route.
pub const AGENTS_TAG: &str = "agents";

/// `GET /v1/agents`, `GET /v1/instances[/{id}[/timeline]]`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_agents))
        .routes(routes!(list_instances))
        .routes(routes!(get_instance))
        .routes(routes!(get_timeline))
}

/// The status of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Created, waiting for the runtime.
    Pending,
    /// The runtime is executing it.
    Running,
    /// Finished with an answer.
    Completed,
    /// Finished with an error.
    Failed,
    /// Stopped by its owner or an admin.
    Cancelled,
}

impl RunStatus {
    const ALL: [RunStatus; 5] = [
        RunStatus::Pending,
        RunStatus::Running,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];

    /// The wire name, as stored in the read models.
    pub fn as_str(self) -> &'static str {
        InstanceStatus::from(self).as_str()
    }
}

impl From<RunStatus> for InstanceStatus {
    fn from(status: RunStatus) -> Self {
        match status {
            RunStatus::Pending => InstanceStatus::Pending,
            RunStatus::Running => InstanceStatus::Running,
            RunStatus::Completed => InstanceStatus::Completed,
            RunStatus::Failed => InstanceStatus::Failed,
            RunStatus::Cancelled => InstanceStatus::Cancelled,
        }
    }
}

impl TryFrom<String> for RunStatus {
    type Error = String;

    fn try_from(stored: String) -> Result<Self, String> {
        RunStatus::ALL
            .into_iter()
            .find(|s| s.as_str() == stored)
            .ok_or_else(|| format!("unknown run status {stored:?} in the read model"))
    }
}

/// No query parameters (any given one is refused as unknown).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// An agent you may run.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct CatalogueAgent {
    /// The agent's slug (pass it as `agent_id` when starting a run).
    #[schema(example = "triage")]
    pub id: String,
    /// Name shown in the catalogue.
    pub display_name: String,
    /// What the agent does.
    pub description: String,
    /// Tools the agent may call.
    #[sqlx(json)]
    pub tools: Vec<String>,
    /// The definition's version; a run records the version it started with.
    pub version: i32,
}

/// The active agents open to your tier, by id.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentCatalogue {
    /// The agents.
    pub items: Vec<CatalogueAgent>,
}

/// A run as its owner sees it: display fields only.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct InstanceSummary {
    /// The run.
    pub instance_id: Uuid,
    /// The agent it runs.
    pub agent_id: String,
    /// The agent's version when the run was created.
    pub agent_version: i32,
    /// The chat thread.
    pub thread_id: String,
    /// Current status.
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
    /// The message that started the run.
    pub input: String,
    /// When the run was created.
    pub created_at: DateTime<Utc>,
    /// When the runtime started it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it completed, failed or was cancelled.
    pub ended_at: Option<DateTime<Utc>>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Sequence of its last event (timeline entries go up to it).
    pub last_sequence: i64,
    /// Thoughts recorded.
    pub thought_count: i32,
    /// Tool calls started.
    pub tool_call_count: i32,
    /// Tool calls started and not yet completed.
    pub open_tool_calls: i32,
    /// The last chat-visible message (thought, tool summary, answer, error or reason).
    pub last_message: Option<String>,
}

/// Columns of [`InstanceSummary`], then the rest of the statement.
macro_rules! summary_sql {
    ($($rest:literal),+) => {
        concat!(
            "SELECT instance_id, agent_id, agent_version, thread_id, status, input, created_at,
                    started_at, ended_at, updated_at, last_sequence, thought_count,
                    tool_call_count, open_tool_calls, last_message
               FROM rm_instances ",
            $($rest),+
        )
    };
}

/// A page of your runs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct InstancePage {
    /// The runs.
    pub items: Vec<InstanceSummary>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// Filters and page of `GET /v1/instances`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct InstanceListQuery {
    /// Only runs in this status.
    pub status: Option<RunStatus>,
    /// Only runs of this agent.
    pub agent_id: Option<String>,
    /// Page size, 1 to 200; 50 when absent.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page, unchanged.
    pub cursor: Option<String>,
}

/// One chat-visible step of a run.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct TimelineItem {
    /// The step's sequence in the run (1 is the creation).
    pub sequence: i64,
    /// `instance_created`, `agent_started`, `agent_thinking`, `tool_executing`,
    /// `tool_completed`, `agent_completed`, `agent_failed` or `agent_cancelled`.
    #[schema(example = "agent_thinking")]
    pub kind: String,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// What the chat shows (fields depend on `kind`).
    pub display: Value,
}

/// A page of a run's timeline, in sequence order.
#[derive(Debug, Serialize, ToSchema)]
pub struct TimelinePage {
    /// The steps.
    pub items: Vec<TimelineItem>,
    /// Pass as `after_sequence` for the next page; `null` when no step follows yet.
    #[schema(required = true)]
    pub next_after_sequence: Option<i64>,
}

/// Page of `GET /v1/instances/{id}/timeline`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TimelineQuery {
    /// Only steps after this sequence; 0 (from the start) when absent.
    #[param(minimum = 0)]
    pub after_sequence: Option<i64>,
    /// Page size, 1 to 200; 50 when absent.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
}

/// The agent catalogue: the active agents open to your tier.
#[utoipa::path(get, path = "/v1/agents", tag = AGENTS_TAG,
    responses((status = 200, description = "The agents you may run", body = AgentCatalogue), ReadErrors),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(principal = %principal.actor.id))]
pub async fn list_agents(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<ApiQuery<NoParams>, ApiError>,
) -> Result<Json<AgentCatalogue>, ApiError> {
    let tier = user(&principal)?;
    query?;
    let items = sqlx::query_as::<_, CatalogueAgent>(
        "SELECT agent_id AS id, display_name, description, tools, version
           FROM rm_agents
          WHERE status = 'active' AND $1 = ANY (tiers)
          ORDER BY agent_id",
    )
    .bind(tier.as_str())
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(AgentCatalogue { items }))
}

/// Your runs, newest first, optionally filtered by status and agent.
///
/// Keyset-paginated: follow `next_cursor` until it is `null`. Runs created while you page
/// appear on the first page only, never twice.
#[utoipa::path(get, path = "/v1/instances", tag = TAG,
    params(InstanceListQuery),
    responses((status = 200, description = "A page of your runs", body = InstancePage), ReadErrors),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(principal = %principal.actor.id))]
pub async fn list_instances(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<ApiQuery<InstanceListQuery>, ApiError>,
) -> Result<Json<InstancePage>, ApiError> {
    user(&principal)?;
    let ApiQuery(query) = query?;
    let limit = pagination::limit(query.limit)?;
    let after = query
        .cursor
        .as_deref()
        .map(InstanceCursor::decode)
        .transpose()?;
    let rows = sqlx::query_as::<_, InstanceSummary>(summary_sql!(
        "WHERE owner_id = $1
           AND ($2::text IS NULL OR status = $2)
           AND ($3::text IS NULL OR agent_id = $3)
           AND ($4::timestamptz IS NULL OR (created_at, instance_id) < ($4, $5::uuid))
         ORDER BY created_at DESC, instance_id DESC
         LIMIT $6"
    ))
    .bind(&principal.actor.id)
    .bind(query.status.map(RunStatus::as_str))
    .bind(query.agent_id)
    .bind(after.map(|c| c.created_at))
    .bind(after.map(|c| c.instance_id))
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let (items, next_cursor) = pagination::page(rows, limit, |r| cursor_of(r).encode());
    Ok(Json(InstancePage { items, next_cursor }))
}

/// One of your runs.
#[utoipa::path(get, path = "/v1/instances/{id}", tag = TAG,
    params(("id" = Uuid, Path, description = "Instance id")),
    responses((status = 200, description = "The run", body = InstanceSummary), ReadErrors, ReadNotFound),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(principal = %principal.actor.id, instance = %id))]
pub async fn get_instance(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    query: Result<ApiQuery<NoParams>, ApiError>,
) -> Result<Json<InstanceSummary>, ApiError> {
    user(&principal)?;
    query?;
    let instance_id = instance_uuid(&id)?;
    sqlx::query_as::<_, InstanceSummary>(summary_sql!("WHERE instance_id = $1 AND owner_id = $2"))
        .bind(instance_id)
        .bind(&principal.actor.id)
        .fetch_optional(&state.pool)
        .await?
        .map(Json)
        .ok_or_else(|| not_found(&id))
}

/// The chat timeline of one of your runs, in sequence order (display fields only).
///
/// Page with `after_sequence`: pass `next_after_sequence` (or the last sequence you have) to
/// get the steps that follow.
#[utoipa::path(get, path = "/v1/instances/{id}/timeline", tag = TAG,
    params(("id" = Uuid, Path, description = "Instance id"), TimelineQuery),
    responses((status = 200, description = "A page of the run's steps", body = TimelinePage), ReadErrors, ReadNotFound),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(principal = %principal.actor.id, instance = %id))]
pub async fn get_timeline(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    query: Result<ApiQuery<TimelineQuery>, ApiError>,
) -> Result<Json<TimelinePage>, ApiError> {
    user(&principal)?;
    let ApiQuery(query) = query?;
    let limit = pagination::limit(query.limit)?;
    let after = match query.after_sequence {
        None => 0,
        Some(n) if n >= 0 => n,
        Some(n) => {
            return Err(ApiError::InvalidQuery(format!(
                "after_sequence must be 0 or more, not {n}"
            )));
        }
    };
    let instance_id = instance_uuid(&id)?;
    // The timeline has the run from its creation's commit (it is written with the events);
    // `rm_instances` once the projector has it. Both record its owner.
    let visible: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM rm_instances WHERE instance_id = $1 AND owner_id = $2)
             OR EXISTS (SELECT 1 FROM rm_timeline WHERE instance_id = $1 AND owner_id = $2)",
    )
    .bind(instance_id)
    .bind(&principal.actor.id)
    .fetch_one(&state.pool)
    .await?;
    if !visible {
        return Err(not_found(&id));
    }
    let rows = sqlx::query_as::<_, TimelineItem>(
        "SELECT sequence, kind, at, display
           FROM rm_timeline
          WHERE instance_id = $1 AND owner_id = $2 AND sequence > $3
          ORDER BY sequence
          LIMIT $4",
    )
    .bind(instance_id)
    .bind(&principal.actor.id)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let (items, next_after_sequence) = pagination::page(rows, limit, |r| r.sequence);
    Ok(Json(TimelinePage {
        items,
        next_after_sequence,
    }))
}

/// The cursor that resumes a list of instances after `row`.
pub fn cursor_of(row: &InstanceSummary) -> InstanceCursor {
    InstanceCursor {
        created_at: row.created_at,
        instance_id: row.instance_id,
    }
}

/// Refuses every role but user; returns the caller's tier.
fn user(principal: &Principal) -> Result<Tier, ApiError> {
    principal.require(&[ActorRole::User])?;
    principal
        .tier
        .ok_or(ApiError::InvalidToken("a user token needs a tier claim"))
}

/// Parses an instance id; anything that is not a UUID cannot name an instance.
fn instance_uuid(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| not_found(raw))
}

fn not_found(raw: &str) -> ApiError {
    DomainError::InstanceNotFound(raw.chars().take(64).collect()).into()
}
