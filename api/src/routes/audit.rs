//! Audit queries straight from the event store (never from a read model): one aggregate's
//! history, its state replayed to a version or a time, and the verification of its hash chain.
//! The global log and its export are in [`super::audit_log`].
//!
//! Role auditor or admin; tag `audit`. Auditors see everything stored, internal detail
//! included.

use apex_domain::ActorRole;
use apex_projections::audit::{self, BreakKind, ReplayError, Until};
use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, IntoResponses, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::pagination;
use super::queries::NoParams;
use super::responses::ReadErrors;
use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::extract::ApiQuery;
use crate::state::AppState;

/// The OpenAPI tag of the audit routes.
pub const TAG: &str = "audit";

/// The roles that may audit.
pub(crate) const AUDIT_ROLES: [ActorRole; 2] = [ActorRole::Auditor, ActorRole::Admin];

/// Routes under `/v1/audit`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(aggregate_events))
        .routes(routes!(aggregate_state))
        .routes(routes!(verify_aggregate))
        .merge(super::audit_log::router())
}

/// The kind of aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AggregateType {
    /// An agent of the catalogue (id: its slug).
    Agent,
    /// A run of an agent (id: a UUID).
    Instance,
}

impl AggregateType {
    /// The name stored in `events.aggregate_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            AggregateType::Agent => "agent",
            AggregateType::Instance => "instance",
        }
    }
}

/// Parses the path's type; anything else names no aggregate.
fn aggregate(raw_type: &str, id: &str) -> Result<AggregateType, ApiError> {
    match raw_type {
        "agent" => Ok(AggregateType::Agent),
        "instance" => Ok(AggregateType::Instance),
        _ => Err(not_found(raw_type, id)),
    }
}

fn not_found(aggregate_type: &str, id: &str) -> ApiError {
    ApiError::AggregateNotFound(
        aggregate_type.chars().take(64).collect(),
        id.chars().take(64).collect(),
    )
}

/// One stored event, with every column and its hash.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct AuditEvent {
    /// Unique event id.
    pub event_id: Uuid,
    /// `agent` or `instance`.
    #[schema(example = "instance")]
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// 1-based, gap-free sequence within the aggregate.
    pub sequence: i64,
    /// The event type, e.g. `ToolCallCompleted`.
    pub event_type: String,
    /// Schema version of the payload.
    #[schema(example = "1")]
    pub event_version: String,
    /// The payload as stored (`{"<EventType>": {...}}`), internal detail included.
    pub payload: Value,
    /// The command metadata as stored (correlation, causation, principal, trace context...).
    pub metadata: Value,
    /// Global insert position (not commit order).
    pub position: i64,
    /// The appending transaction; `(transaction_id, position)` is commit order.
    pub transaction_id: i64,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
    /// Correlation id.
    pub correlation_id: Uuid,
    /// Causation id.
    pub causation_id: Uuid,
    /// Who issued the command.
    pub principal: String,
    /// Their role.
    #[schema(example = "runner")]
    pub principal_role: String,
    /// SHA-256 (hex) chaining this event to the previous event of its aggregate.
    pub hash: String,
}

/// The columns of [`AuditEvent`], for `SELECT ... FROM events`.
pub(crate) const AUDIT_COLUMNS: &str = "event_id, aggregate_type, aggregate_id, sequence, \
     event_type, event_version, payload, metadata, position, \
     transaction_id::text::bigint AS transaction_id, recorded_at, correlation_id, causation_id, \
     principal, principal_role, encode(hash, 'hex') AS hash";

/// The extra error response of the routes that name one aggregate.
#[derive(IntoResponses)]
pub enum AuditNotFound {
    /// No such aggregate.
    #[response(
        status = 404,
        description = "No event of this aggregate is stored, or the type is neither `agent` nor `instance` (`aggregate_not_found`)"
    )]
    NotFound(ErrorBody),
}

/// A page of one aggregate's history, in sequence order.
#[derive(Debug, Serialize, ToSchema)]
pub struct AggregateHistory {
    /// The events.
    pub items: Vec<AuditEvent>,
    /// Pass as `after_sequence` for the next page; `null` when no event follows yet.
    #[schema(required = true)]
    pub next_after_sequence: Option<i64>,
}

/// Page of `GET /v1/audit/{aggregate_type}/{id}/events`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Only events after this sequence; 0 (from the start) when absent.
    #[param(minimum = 0)]
    pub after_sequence: Option<i64>,
    /// Page size, 1 to 200; 50 when absent.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
}

/// Where to stop replaying: at most one of them; the latest state when neither is given.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StateQuery {
    /// Apply the first `version` events (1 or more).
    #[param(minimum = 1)]
    pub version: Option<i64>,
    /// Apply the events recorded at or before this instant (RFC 3339).
    pub at: Option<DateTime<Utc>>,
}

/// An aggregate's state, replayed from its events through the current code.
#[derive(Debug, Serialize, ToSchema)]
pub struct AggregateState {
    /// `agent` or `instance`.
    pub aggregate_type: AggregateType,
    /// The aggregate id.
    pub aggregate_id: String,
    /// The sequence of the last event applied: 0 when `at` precedes the first event, less than
    /// `version` when the history is shorter.
    pub sequence: i64,
    /// When that event was recorded.
    #[schema(required = true)]
    pub recorded_at: Option<DateTime<Utc>>,
    /// The aggregate's state (`Agent` or `Instance` as the domain folds it).
    pub state: Value,
}

/// What broke a hash chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChainBreakKind {
    /// The stored hash does not match the event and its predecessor: edited or reordered.
    HashMismatch,
    /// The sequence is missing: an event was deleted.
    MissingSequence,
}

/// The first place an aggregate's chain breaks.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChainBreak {
    /// The first sequence that fails.
    pub sequence: i64,
    /// What is wrong there.
    pub kind: ChainBreakKind,
}

/// Whether an aggregate's stored history is the one that was appended.
#[derive(Debug, Serialize, ToSchema)]
pub struct AggregateVerification {
    /// `agent` or `instance`.
    pub aggregate_type: AggregateType,
    /// The aggregate id.
    pub aggregate_id: String,
    /// True when every event's hash matches its bytes and its predecessor's hash.
    pub intact: bool,
    /// Events checked.
    pub events_checked: u64,
    /// Where the chain first breaks; `null` when intact.
    #[schema(required = true)]
    pub first_break: Option<ChainBreak>,
}

/// One aggregate's history, every stored field included, in sequence order.
#[utoipa::path(get, path = "/v1/audit/{aggregate_type}/{id}/events", tag = TAG,
    params(
        ("aggregate_type" = AggregateType, Path, description = "`agent` or `instance`"),
        ("id" = String, Path, description = "Aggregate id (agent slug or instance UUID)"),
        HistoryQuery,
    ),
    responses((status = 200, description = "A page of the aggregate's events", body = AggregateHistory), ReadErrors, AuditNotFound),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(principal = %principal.actor.id, aggregate = %id))]
pub async fn aggregate_events(
    State(state): State<AppState>,
    principal: Principal,
    Path((aggregate_type, id)): Path<(String, String)>,
    query: Result<ApiQuery<HistoryQuery>, ApiError>,
) -> Result<Json<AggregateHistory>, ApiError> {
    principal.require(&AUDIT_ROLES)?;
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
    let kind = aggregate(&aggregate_type, &id)?;
    let rows = sqlx::query_as::<_, AuditEvent>(&format!(
        "SELECT {AUDIT_COLUMNS} FROM events
          WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3
          ORDER BY sequence
          LIMIT $4"
    ))
    .bind(kind.as_str())
    .bind(&id)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    if rows.is_empty() && !exists(&state, kind, &id).await? {
        return Err(not_found(kind.as_str(), &id));
    }
    let (items, next_after_sequence) = pagination::page(rows, limit, |r| r.sequence);
    Ok(Json(AggregateHistory {
        items,
        next_after_sequence,
    }))
}

/// The aggregate's state at a version (`version=N`: its first N events) or at a time
/// (`at=<RFC 3339>`: the events recorded until then), replayed through the current code with
/// its upcasters; the latest state when neither is given. Both at once is `invalid_query`.
#[utoipa::path(get, path = "/v1/audit/{aggregate_type}/{id}/state", tag = TAG,
    params(
        ("aggregate_type" = AggregateType, Path, description = "`agent` or `instance`"),
        ("id" = String, Path, description = "Aggregate id (agent slug or instance UUID)"),
        StateQuery,
    ),
    responses((status = 200, description = "The replayed state", body = AggregateState), ReadErrors, AuditNotFound),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(principal = %principal.actor.id, aggregate = %id))]
pub async fn aggregate_state(
    State(state): State<AppState>,
    principal: Principal,
    Path((aggregate_type, id)): Path<(String, String)>,
    query: Result<ApiQuery<StateQuery>, ApiError>,
) -> Result<Json<AggregateState>, ApiError> {
    principal.require(&AUDIT_ROLES)?;
    let ApiQuery(query) = query?;
    let until = match (query.version, query.at) {
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidQuery(
                "give version or at, not both".to_owned(),
            ));
        }
        (Some(n), None) if n < 1 => {
            return Err(ApiError::InvalidQuery(format!(
                "version must be 1 or more, not {n}"
            )));
        }
        (Some(n), None) => Until::Version(n),
        (None, Some(at)) => Until::Time(at),
        (None, None) => Until::End,
    };
    let kind = aggregate(&aggregate_type, &id)?;
    if !exists(&state, kind, &id).await? {
        return Err(not_found(kind.as_str(), &id));
    }
    let replayed = audit::replay(&state.pool, kind.as_str(), &id, until)
        .await
        .map_err(|e| match e {
            ReplayError::Database(e) => ApiError::from(e),
            ReplayError::UnknownType(_) => not_found(kind.as_str(), &id),
            decode @ ReplayError::Decode { .. } => ApiError::Internal(Box::new(decode)),
        })?;
    Ok(Json(AggregateState {
        aggregate_type: kind,
        aggregate_id: id,
        sequence: replayed.sequence,
        recorded_at: replayed.recorded_at,
        state: replayed.state,
    }))
}

/// Verifies the aggregate's hash chain from its first event: whether its stored history was
/// altered (an event edited, deleted or reordered), and where it first breaks.
///
/// The chain cannot reveal the removal of the newest events, nor a rewrite by someone who
/// also recomputes every later hash (see docs/operations/audit.md).
#[utoipa::path(get, path = "/v1/audit/{aggregate_type}/{id}/verify", tag = TAG,
    params(
        ("aggregate_type" = AggregateType, Path, description = "`agent` or `instance`"),
        ("id" = String, Path, description = "Aggregate id (agent slug or instance UUID)"),
    ),
    responses((status = 200, description = "The verification", body = AggregateVerification), ReadErrors, AuditNotFound),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(principal = %principal.actor.id, aggregate = %id))]
pub async fn verify_aggregate(
    State(state): State<AppState>,
    principal: Principal,
    Path((aggregate_type, id)): Path<(String, String)>,
    query: Result<ApiQuery<NoParams>, ApiError>,
) -> Result<Json<AggregateVerification>, ApiError> {
    principal.require(&AUDIT_ROLES)?;
    query?;
    let kind = aggregate(&aggregate_type, &id)?;
    let result = audit::verify(&state.pool, Some((kind.as_str(), &id)), |_| {}).await?;
    if result.events_checked == 0 {
        return Err(not_found(kind.as_str(), &id));
    }
    let first_break = result.breaks.first().map(|b| ChainBreak {
        sequence: b.sequence,
        kind: match b.kind {
            BreakKind::HashMismatch => ChainBreakKind::HashMismatch,
            BreakKind::MissingSequence => ChainBreakKind::MissingSequence,
        },
    });
    Ok(Json(AggregateVerification {
        aggregate_type: kind,
        aggregate_id: id,
        intact: result.intact(),
        events_checked: result.events_checked,
        first_break,
    }))
}

/// True when at least one event of the aggregate is stored.
async fn exists(state: &AppState, kind: AggregateType, id: &str) -> Result<bool, ApiError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events WHERE aggregate_type = $1 AND aggregate_id = $2)",
    )
    .bind(kind.as_str())
    .bind(id)
    .fetch_one(&state.pool)
    .await?)
}
