//! Admin view of the projection pipeline: how far each projector and the relay trail the
//! event store, with their counters, dead letters and latest rebuilds; and the rebuild of a
//! read model. Role admin only; tag `admin`.

use apex_domain::ActorRole;
use apex_projections::ReadModel;
use apex_projections::rebuild::{self, RebuildError};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::Instrument;
use utoipa::{IntoResponses, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::admin::TAG;
use super::queries::NoParams;
use super::responses::ReadErrors;
use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody, cause_chain};
use crate::extract::ApiQuery;
use crate::state::AppState;

/// `GET /v1/admin/projections`, `POST /v1/admin/projections/{name}/rebuild`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(projections))
        .routes(routes!(start_rebuild))
}

/// How far the projection pipeline trails the event store.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectionsStatus {
    /// The position of the newest stored event (0 when none).
    pub head_position: i64,
    /// Each projector that has started, by name.
    pub projectors: Vec<ProjectorStatus>,
    /// Each relay checkpoint, by name.
    pub relays: Vec<RelayStatus>,
    /// The latest rebuild of each read model ever rebuilt, by name.
    pub rebuilds: Vec<RebuildStatus>,
}

/// The latest rebuild of one read model.
#[derive(Debug, Serialize, ToSchema)]
pub struct RebuildStatus {
    /// The read model.
    #[schema(example = "instances")]
    pub projection: String,
    /// The run's id.
    pub id: i64,
    /// `running`, `succeeded`, `failed`, or `interrupted` (its process stopped mid-way; the
    /// public tables were left as they were).
    #[schema(example = "succeeded")]
    pub status: String,
    /// Events replayed (so far, while running).
    pub events: i64,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended; `null` while running or interrupted.
    #[schema(required = true)]
    pub finished_at: Option<DateTime<Utc>>,
    /// Why it failed; `null` otherwise.
    #[schema(required = true)]
    pub error: Option<String>,
}

impl From<rebuild::RebuildRun> for RebuildStatus {
    fn from(r: rebuild::RebuildRun) -> Self {
        Self {
            projection: r.projection,
            id: r.id,
            status: r.status,
            events: r.events,
            started_at: r.started_at,
            finished_at: r.finished_at,
            error: r.error,
        }
    }
}

/// A rebuild was started in the background.
#[derive(Debug, Serialize, ToSchema)]
pub struct RebuildStarted {
    /// The read model.
    #[schema(example = "instances")]
    pub projection: &'static str,
    /// Always `started`; follow it in `GET /v1/admin/projections` (`rebuilds`).
    #[schema(example = "started")]
    pub status: &'static str,
    /// The run's id (`rebuilds[].id`).
    pub rebuild_id: i64,
}

/// The extra error responses of `POST /v1/admin/projections/{name}/rebuild`.
#[derive(IntoResponses)]
pub enum RebuildErrors {
    /// Unknown read model.
    #[response(
        status = 404,
        description = "No read model has this name (`projection_not_found`)"
    )]
    NotFound(ErrorBody),
    /// A rebuild is already running.
    #[response(
        status = 409,
        description = "A rebuild of this read model is already running, in this or another process (`rebuild_in_progress`)"
    )]
    Conflict(ErrorBody),
}

/// One projector's progress and counters.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct ProjectorStatus {
    /// The projector (and read model) name.
    #[schema(example = "instances")]
    pub name: String,
    /// Highest event position it has applied.
    pub last_position: i64,
    /// Stored events after `last_position` (`head_position - last_position`, at least 0).
    pub lag_events: i64,
    /// Seconds since the recording time of the newest event it applied (its staleness when
    /// events are waiting); `null` before its first event.
    pub lag_seconds: Option<f64>,
    /// Recording time of the newest event it applied.
    pub last_recorded_at: Option<DateTime<Utc>>,
    /// When it last applied an event.
    pub last_applied_at: Option<DateTime<Utc>>,
    /// Events applied (including repaired ones).
    pub processed_total: i64,
    /// Duplicates skipped.
    pub skipped_total: i64,
    /// Gap events fetched from the store and applied.
    pub repaired_total: i64,
    /// Deliveries retried after a failure.
    pub retried_total: i64,
    /// Messages it gave up on (rows of `dead_letters`).
    pub dead_letters: i64,
}

/// The relay's progress publishing the events table to the bus.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct RelayStatus {
    /// The relay.
    pub name: String,
    /// Position of the last event published with a broker confirm.
    pub position: i64,
    /// Events published.
    pub published_total: i64,
    /// Stored events after `position` (at least 0).
    pub lag_events: i64,
    /// When the checkpoint last moved.
    pub updated_at: DateTime<Utc>,
}

/// Lag and counters of every projector and of the relay.
#[utoipa::path(get, path = "/v1/admin/projections", tag = TAG,
    responses((status = 200, description = "The pipeline's status", body = ProjectionsStatus), ReadErrors),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(principal = %principal.actor.id))]
pub async fn projections(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<ApiQuery<NoParams>, ApiError>,
) -> Result<Json<ProjectionsStatus>, ApiError> {
    principal.require(&[ActorRole::Admin])?;
    query?;
    // One transaction: the head and the checkpoints are read from the same snapshot.
    let mut tx = state.pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let head_position: i64 = sqlx::query_scalar("SELECT COALESCE(max(position), 0) FROM events")
        .fetch_one(&mut *tx)
        .await?;
    let projectors = sqlx::query_as::<_, ProjectorStatus>(
        "SELECT p.projector AS name, p.last_position,
                GREATEST($1 - p.last_position, 0) AS lag_events,
                -- GREATEST ignores NULL: keep null before the first event.
                CASE WHEN p.last_recorded_at IS NOT NULL
                     THEN GREATEST(EXTRACT(EPOCH FROM now() - p.last_recorded_at), 0)::float8
                END AS lag_seconds,
                p.last_recorded_at, p.last_applied_at, p.processed_total, p.skipped_total,
                p.repaired_total, p.retried_total,
                (SELECT count(*) FROM dead_letters d WHERE d.projector = p.projector)
                    AS dead_letters
           FROM projector_status p
          ORDER BY p.projector",
    )
    .bind(head_position)
    .fetch_all(&mut *tx)
    .await?;
    let relays = sqlx::query_as::<_, RelayStatus>(
        "SELECT name, position, published_total, GREATEST($1 - position, 0) AS lag_events,
                updated_at
           FROM relay_checkpoints
          ORDER BY name",
    )
    .bind(head_position)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    // Outside the snapshot: a run's lock is read live, then its row (see `latest_runs`).
    let rebuilds = rebuild::latest_runs(&state.pool).await?;
    Ok(Json(ProjectionsStatus {
        head_position,
        projectors,
        relays,
        rebuilds: rebuilds.into_iter().map(RebuildStatus::from).collect(),
    }))
}

/// Rebuilds a read model from the event store, without downtime for readers.
///
/// Answers 202 once the rebuild holds its lock and is recorded as running; it then runs in the
/// background of this API process: the store is replayed into a private copy of the read
/// model's tables while readers and the live projector keep using the current ones, then the
/// copy is swapped in within one short transaction. Follow it in `GET /v1/admin/projections`.
/// Only one rebuild of a read model runs at a time, across every process (409 otherwise).
#[utoipa::path(post, path = "/v1/admin/projections/{name}/rebuild", tag = TAG,
    params(("name" = String, Path, description = "The read model: `agents`, `instances`, `timeline`, `agent_stats` or `usage`")),
    responses(
        (status = 202, description = "The rebuild started", body = RebuildStarted),
        ReadErrors,
        RebuildErrors,
    ),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(principal = %principal.actor.id, projection = %name))]
pub async fn start_rebuild(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
    query: Result<ApiQuery<NoParams>, ApiError>,
) -> Result<(StatusCode, Json<RebuildStarted>), ApiError> {
    principal.require(&[ActorRole::Admin])?;
    query?;
    let model: ReadModel = name
        .parse()
        .map_err(|_| ApiError::ProjectionNotFound(name.chars().take(64).collect()))?;
    // Taking the lock before answering makes 202/409 race-free across requests and processes.
    let started = rebuild::try_start(&state.pool, model)
        .await
        .map_err(|e| match e {
            RebuildError::AlreadyRunning(name) => ApiError::RebuildInProgress(name),
            RebuildError::Database(e) => ApiError::from(e),
            other => ApiError::Internal(Box::new(other)),
        })?;
    let rebuild_id = started.run_id();
    let span = tracing::info_span!("rebuild", projection = model.name(), rebuild_id);
    tokio::spawn(
        async move {
            match started.run(|_| {}).await {
                Ok(events) => tracing::info!(events, "rebuild swapped in"),
                Err(e) => tracing::error!(error = %cause_chain(&e), "rebuild failed"),
            }
        }
        .instrument(span),
    );
    Ok((
        StatusCode::ACCEPTED,
        Json(RebuildStarted {
            projection: model.name(),
            status: "started",
            rebuild_id,
        }),
    ))
}
