//! Admin queries over the read models: agents with run statistics, every run (with internal
//! detail) and usage per user.
//!
//! Role admin only. Like the user queries, answers trail the event store by the projectors'
//! lag, which `GET /v1/admin/projections` reports (see [`super::projections`]).

use apex_domain::ActorRole;
use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::pagination::{self, InstanceCursor, KeyCursor};
use super::queries::{InstanceSummary, NoParams, RunStatus, cursor_of};
use super::responses::{ReadErrors, ReadNotFound};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::ApiQuery;
use crate::state::AppState;

/// The OpenAPI tag of these routes.
pub const TAG: &str = "admin";

/// Read routes under `/v1/admin`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_agents))
        .routes(routes!(list_instances))
        .routes(routes!(list_usage))
        .routes(routes!(user_usage))
}

/// An agent of the catalogue, whatever its status, with its run statistics.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminAgent {
    /// The agent's slug.
    pub id: String,
    /// Name shown in the catalogue.
    pub display_name: String,
    /// What the agent does.
    pub description: String,
    /// Tools the agent may call.
    pub tools: Vec<String>,
    /// Tiers allowed to run it.
    pub tiers: Vec<String>,
    /// `draft`, `active`, `disabled` or `retired`.
    #[schema(example = "active")]
    pub status: String,
    /// The definition's version.
    pub version: i32,
    /// When it was defined.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Its runs.
    pub stats: AgentStats,
}

/// Run statistics of one agent.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentStats {
    /// Runs ever created.
    pub runs_total: i64,
    /// Runs per current status.
    pub runs_by_status: RunsByStatus,
    /// Tool calls started across all runs.
    pub tool_calls: i64,
    /// Mean time from creation to completion, failure or cancellation, in milliseconds;
    /// `null` while no run has finished.
    pub average_duration_ms: Option<i64>,
}

/// Runs per current status.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunsByStatus {
    /// Waiting for the runtime.
    pub pending: i64,
    /// Executing.
    pub running: i64,
    /// Finished with an answer.
    pub completed: i64,
    /// Finished with an error.
    pub failed: i64,
    /// Stopped.
    pub cancelled: i64,
}

#[derive(sqlx::FromRow)]
struct AdminAgentRow {
    id: String,
    display_name: String,
    description: String,
    #[sqlx(json)]
    tools: Vec<String>,
    tiers: Vec<String>,
    status: String,
    version: i32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    runs_total: i64,
    pending: i64,
    running: i64,
    completed: i64,
    failed: i64,
    cancelled: i64,
    tool_calls: i64,
    average_duration_ms: Option<i64>,
}

impl From<AdminAgentRow> for AdminAgent {
    fn from(r: AdminAgentRow) -> Self {
        Self {
            id: r.id,
            display_name: r.display_name,
            description: r.description,
            tools: r.tools,
            tiers: r.tiers,
            status: r.status,
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
            stats: AgentStats {
                runs_total: r.runs_total,
                runs_by_status: RunsByStatus {
                    pending: r.pending,
                    running: r.running,
                    completed: r.completed,
                    failed: r.failed,
                    cancelled: r.cancelled,
                },
                tool_calls: r.tool_calls,
                average_duration_ms: r.average_duration_ms,
            },
        }
    }
}

/// Every agent, by id.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminAgentList {
    /// The agents.
    pub items: Vec<AdminAgent>,
}

/// A run with its owner and the internal detail of its last step.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct AdminInstance {
    /// What the owner sees.
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub summary: InstanceSummary,
    /// The user who started it.
    pub owner_id: String,
    /// Internal detail of the last step (prompt, raw output, tool arguments or result).
    pub last_internal: Option<Value>,
}

/// A page of runs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminInstancePage {
    /// The runs.
    pub items: Vec<AdminInstance>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// Filters and page of `GET /v1/admin/instances`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AdminInstanceQuery {
    /// Only runs of this user.
    pub user_id: Option<String>,
    /// Only runs of this agent.
    pub agent_id: Option<String>,
    /// Only runs in this status.
    pub status: Option<RunStatus>,
    /// Only runs created at or after this instant (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Only runs created before this instant (RFC 3339).
    pub to: Option<DateTime<Utc>>,
    /// Page size, 1 to 200; 50 when absent.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page, unchanged.
    pub cursor: Option<String>,
}

/// What one user has run.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct UserUsage {
    /// The user (`sub` of their token).
    pub user_id: String,
    /// Runs created.
    pub instances: i64,
    /// Runs completed.
    pub completed: i64,
    /// Runs failed.
    pub failed: i64,
    /// Runs cancelled.
    pub cancelled: i64,
    /// Thoughts recorded in their runs.
    pub thoughts: i64,
    /// Tool calls started in their runs.
    pub tool_calls: i64,
    /// Their first run.
    pub first_seen_at: DateTime<Utc>,
    /// The last step of any of their runs.
    pub last_seen_at: DateTime<Utc>,
}

/// A page of usage, by user id.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsagePage {
    /// Usage per user.
    pub items: Vec<UserUsage>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// Page of `GET /v1/admin/usage`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Page size, 1 to 200; 50 when absent.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page, unchanged.
    pub cursor: Option<String>,
}

/// Every agent with its run statistics (all statuses, by id).
#[utoipa::path(get, path = "/v1/admin/agents", tag = TAG,
    responses((status = 200, description = "Every agent", body = AdminAgentList), ReadErrors),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(principal = %principal.actor.id))]
pub async fn list_agents(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<ApiQuery<NoParams>, ApiError>,
) -> Result<Json<AdminAgentList>, ApiError> {
    principal.require(&[ActorRole::Admin])?;
    query?;
    let rows = sqlx::query_as::<_, AdminAgentRow>(
        "SELECT a.agent_id AS id, a.display_name, a.description, a.tools, a.tiers, a.status,
                a.version, a.created_at, a.updated_at,
                COALESCE(s.runs_total, 0) AS runs_total, COALESCE(s.pending, 0) AS pending,
                COALESCE(s.running, 0) AS running, COALESCE(s.completed, 0) AS completed,
                COALESCE(s.failed, 0) AS failed, COALESCE(s.cancelled, 0) AS cancelled,
                COALESCE(s.tool_calls, 0) AS tool_calls,
                CASE WHEN s.finished_runs > 0
                     THEN round(s.total_duration_ms::numeric / s.finished_runs)::bigint
                END AS average_duration_ms
           FROM rm_agents a
           LEFT JOIN rm_agent_stats s ON s.agent_id = a.agent_id
          ORDER BY a.agent_id",
    )
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(AdminAgentList {
        items: rows.into_iter().map(AdminAgent::from).collect(),
    }))
}

/// Every run, newest first, with owner and internal detail; filter by user, agent, status and
/// creation time (`from` inclusive, `to` exclusive).
#[utoipa::path(get, path = "/v1/admin/instances", tag = TAG,
    params(AdminInstanceQuery),
    responses((status = 200, description = "A page of runs", body = AdminInstancePage), ReadErrors),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(principal = %principal.actor.id))]
pub async fn list_instances(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<ApiQuery<AdminInstanceQuery>, ApiError>,
) -> Result<Json<AdminInstancePage>, ApiError> {
    principal.require(&[ActorRole::Admin])?;
    let ApiQuery(query) = query?;
    let limit = pagination::limit(query.limit)?;
    if let (Some(from), Some(to)) = (query.from, query.to)
        && from > to
    {
        return Err(ApiError::InvalidQuery(
            "from must not be later than to".to_owned(),
        ));
    }
    let after = query
        .cursor
        .as_deref()
        .map(InstanceCursor::decode)
        .transpose()?;
    let rows = sqlx::query_as::<_, AdminInstance>(
        "SELECT instance_id, owner_id, agent_id, agent_version, thread_id, status, input,
                created_at, started_at, ended_at, updated_at, last_sequence, thought_count,
                tool_call_count, open_tool_calls, last_message, last_internal
           FROM rm_instances
          WHERE ($1::text IS NULL OR owner_id = $1)
            AND ($2::text IS NULL OR agent_id = $2)
            AND ($3::text IS NULL OR status = $3)
            AND ($4::timestamptz IS NULL OR created_at >= $4)
            AND ($5::timestamptz IS NULL OR created_at < $5)
            AND ($6::timestamptz IS NULL OR (created_at, instance_id) < ($6, $7::uuid))
          ORDER BY created_at DESC, instance_id DESC
          LIMIT $8",
    )
    .bind(query.user_id)
    .bind(query.agent_id)
    .bind(query.status.map(RunStatus::as_str))
    .bind(query.from)
    .bind(query.to)
    .bind(after.map(|c| c.created_at))
    .bind(after.map(|c| c.instance_id))
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let (items, next_cursor) = pagination::page(rows, limit, |r| cursor_of(&r.summary).encode());
    Ok(Json(AdminInstancePage { items, next_cursor }))
}

/// Usage of every user who has run something, by user id.
#[utoipa::path(get, path = "/v1/admin/usage", tag = TAG,
    params(UsageQuery),
    responses((status = 200, description = "A page of usage", body = UsagePage), ReadErrors),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(principal = %principal.actor.id))]
pub async fn list_usage(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<ApiQuery<UsageQuery>, ApiError>,
) -> Result<Json<UsagePage>, ApiError> {
    principal.require(&[ActorRole::Admin])?;
    let ApiQuery(query) = query?;
    let limit = pagination::limit(query.limit)?;
    let after = query.cursor.as_deref().map(KeyCursor::decode).transpose()?;
    let rows = sqlx::query_as::<_, UserUsage>(
        "SELECT user_id, instances, completed, failed, cancelled, thoughts, tool_calls,
                first_seen_at, last_seen_at
           FROM rm_usage
          WHERE ($1::text IS NULL OR user_id > $1)
          ORDER BY user_id
          LIMIT $2",
    )
    .bind(after.map(|c| c.0))
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let (items, next_cursor) =
        pagination::page(rows, limit, |r| KeyCursor(r.user_id.clone()).encode());
    Ok(Json(UsagePage { items, next_cursor }))
}

/// Usage of one user.
#[utoipa::path(get, path = "/v1/admin/users/{id}/usage", tag = TAG,
    params(("id" = String, Path, description = "User id (`sub` of their token)")),
    responses((status = 200, description = "The user's usage", body = UserUsage), ReadErrors, ReadNotFound),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(principal = %principal.actor.id, user = %id))]
pub async fn user_usage(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    query: Result<ApiQuery<NoParams>, ApiError>,
) -> Result<Json<UserUsage>, ApiError> {
    principal.require(&[ActorRole::Admin])?;
    query?;
    sqlx::query_as::<_, UserUsage>(
        "SELECT user_id, instances, completed, failed, cancelled, thoughts, tool_calls,
                first_seen_at, last_seen_at
           FROM rm_usage WHERE user_id = $1",
    )
    .bind(&id)
    .fetch_optional(&state.pool)
    .await?
    .map(Json)
    .ok_or_else(|| ApiError::UserNotFound(id.chars().take(64).collect()))
}
