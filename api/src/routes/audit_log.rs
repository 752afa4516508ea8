//! The global event log in commit order, as pages and as a streamed NDJSON export.
//!
//! Order is `(transaction_id, position)`, and only events of transactions below the snapshot's
//! horizon (`pg_snapshot_xmin(pg_current_snapshot())`) are listed: every transaction below it
//! has finished, so no event can later appear before one already listed. A cursor therefore
//! never misses an event, and following it later returns only events committed afterwards.
//!
//! Role auditor or admin; tag `audit`.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::PgArguments;
use sqlx::query::QueryAs;
use tokio::sync::mpsc;
use tracing::Instrument;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::audit::{AUDIT_COLUMNS, AUDIT_ROLES, AggregateType, AuditEvent, TAG};
use super::pagination::{self, LogCursor};
use super::responses::ReadErrors;
use crate::auth::Principal;
use crate::error::{ApiError, cause_chain};
use crate::extract::ApiQuery;
use crate::state::AppState;

/// The media type of the export: one JSON [`AuditEvent`] per line.
pub const NDJSON: &str = "application/x-ndjson";
/// Longest accepted `event_type` filter.
const EVENT_TYPE_MAX: usize = 100;
/// The export sends the body in chunks of about this many bytes.
const CHUNK: usize = 32 * 1024;

/// `GET /v1/audit/events[/export]`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_events))
        .routes(routes!(export_events))
}

/// A page of the event log, in commit order.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventLogPage {
    /// The events.
    pub items: Vec<AuditEvent>,
    /// Pass as `after` to read what follows: the next page, or, on the last page, the events
    /// committed later (never one before it). `null` only when nothing was read yet.
    #[schema(required = true)]
    pub next_after: Option<String>,
    /// True when more events were already available after this page.
    pub has_more: bool,
}

/// Filters and page of `GET /v1/audit/events`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventLogQuery {
    /// `next_after` of the previous page, unchanged; from the first event when absent.
    pub after: Option<String>,
    /// Page size, 1 to 200; 50 when absent.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// Only events of this aggregate type.
    pub aggregate_type: Option<AggregateType>,
    /// Only events of this type, e.g. `ToolCallStarted`.
    pub event_type: Option<String>,
    /// Only events recorded at or after this instant (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Only events recorded before this instant (RFC 3339).
    pub to: Option<DateTime<Utc>>,
}

/// Filters of `GET /v1/audit/events/export`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventExportQuery {
    /// Start after this cursor (a `next_after` of the paged log); from the first event when
    /// absent.
    pub after: Option<String>,
    /// Only events of this aggregate type.
    pub aggregate_type: Option<AggregateType>,
    /// Only events of this type, e.g. `ToolCallStarted`.
    pub event_type: Option<String>,
    /// Only events recorded at or after this instant (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Only events recorded before this instant (RFC 3339).
    pub to: Option<DateTime<Utc>>,
}

/// The validated filters shared by the page and the export.
#[derive(Debug, Clone)]
struct Filter {
    after: LogCursor,
    aggregate_type: Option<AggregateType>,
    event_type: Option<String>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
}

impl Filter {
    fn new(
        after: Option<&str>,
        aggregate_type: Option<AggregateType>,
        event_type: Option<String>,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Self, ApiError> {
        if let (Some(from), Some(to)) = (from, to)
            && from > to
        {
            return Err(ApiError::InvalidQuery(
                "from must not be later than to".to_owned(),
            ));
        }
        if event_type
            .as_deref()
            .is_some_and(|t| t.is_empty() || t.len() > EVENT_TYPE_MAX)
        {
            return Err(ApiError::InvalidQuery(format!(
                "event_type must be 1 to {EVENT_TYPE_MAX} characters"
            )));
        }
        Ok(Self {
            after: after
                .map(LogCursor::decode)
                .transpose()?
                .unwrap_or_default(),
            aggregate_type,
            event_type,
            from,
            to,
        })
    }

    /// The statement, its filters bound, reading at most `limit` events (all when `None`).
    fn query(
        &self,
        limit: Option<i64>,
    ) -> QueryAs<'static, sqlx::Postgres, AuditEvent, PgArguments> {
        // The cursor is always a bound: an index range scan on (transaction_id, position).
        let sql: &'static str = SQL.get_or_init(|| {
            format!(
                "SELECT {AUDIT_COLUMNS} FROM events
                  WHERE (transaction_id, position) > ($1::text::xid8, $2)
                    AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
                    AND ($3::text IS NULL OR aggregate_type = $3)
                    AND ($4::text IS NULL OR event_type = $4)
                    AND ($5::timestamptz IS NULL OR recorded_at >= $5)
                    AND ($6::timestamptz IS NULL OR recorded_at < $6)
                  ORDER BY transaction_id, position
                  LIMIT $7"
            )
        });
        sqlx::query_as::<_, AuditEvent>(sql)
            .bind(self.after.transaction_id.to_string())
            .bind(self.after.position)
            .bind(self.aggregate_type.map(AggregateType::as_str))
            .bind(self.event_type.clone())
            .bind(self.from)
            .bind(self.to)
            .bind(limit)
    }
}

static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn cursor_of(event: &AuditEvent) -> LogCursor {
    LogCursor {
        transaction_id: event.transaction_id,
        position: event.position,
    }
}

/// The global event log in commit order, every stored field and the hash included.
///
/// Cursor-paginated: follow `next_after` while `has_more`. Only events of finished
/// transactions are listed, in `(transaction_id, position)` order, so a page never later gains
/// an earlier event; keep the last `next_after` to read, later, exactly what was committed
/// since. Filters: aggregate type, event type, recording time (`from` inclusive, `to`
/// exclusive).
#[utoipa::path(get, path = "/v1/audit/events", tag = TAG,
    params(EventLogQuery),
    responses((status = 200, description = "A page of the log", body = EventLogPage), ReadErrors),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(principal = %principal.actor.id))]
pub async fn list_events(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<ApiQuery<EventLogQuery>, ApiError>,
) -> Result<Json<EventLogPage>, ApiError> {
    principal.require(&AUDIT_ROLES)?;
    let ApiQuery(query) = query?;
    let limit = pagination::limit(query.limit)?;
    let filter = Filter::new(
        query.after.as_deref(),
        query.aggregate_type,
        query.event_type,
        query.from,
        query.to,
    )?;
    let rows = filter.query(Some(limit + 1)).fetch_all(&state.pool).await?;
    let has_more = rows.len() as i64 > limit;
    let (items, _) = pagination::page(rows, limit, cursor_of);
    let next_after = items.last().map(|e| cursor_of(e).encode()).or(query.after);
    Ok(Json(EventLogPage {
        items,
        next_after,
        has_more,
    }))
}

/// The same log as `GET /v1/audit/events`, with the same filters, as one stream of
/// newline-delimited JSON (`application/x-ndjson`, one event per line) read from a single
/// database snapshot: for exports of any size.
///
/// The body is streamed as the database returns rows, never held in memory. A failure before
/// the first row is answered as usual; a failure later aborts the response, so a truncated
/// export cannot pass for a complete one.
#[utoipa::path(get, path = "/v1/audit/events/export", tag = TAG,
    params(EventExportQuery),
    responses(
        (status = 200, description = "Every matching event, one JSON object per line", body = AuditEvent, content_type = "application/x-ndjson"),
        ReadErrors,
    ),
    security(("bearer" = [])))]
#[tracing::instrument(skip_all, fields(principal = %principal.actor.id))]
pub async fn export_events(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<ApiQuery<EventExportQuery>, ApiError>,
) -> Result<Response, ApiError> {
    principal.require(&AUDIT_ROLES)?;
    let ApiQuery(query) = query?;
    let filter = Filter::new(
        query.after.as_deref(),
        query.aggregate_type,
        query.event_type,
        query.from,
        query.to,
    )?;
    // A bounded channel: the database is read only as fast as the client reads.
    let (sender, mut receiver) = mpsc::channel(4);
    tokio::spawn(produce(state.pool.clone(), filter, sender).instrument(tracing::Span::current()));
    let first = match receiver.recv().await {
        Some(Err(e)) => return Err(e.into()),
        first => first,
    };
    let rest = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    });
    let body = futures::stream::iter(first)
        .chain(rest)
        .map_err(|e: sqlx::Error| std::io::Error::other(e.to_string()));
    Ok(([(header::CONTENT_TYPE, NDJSON)], Body::from_stream(body)).into_response())
}

/// Reads the export's rows and sends them as NDJSON chunks until done, failed, or the client
/// went away.
async fn produce(pool: PgPool, filter: Filter, sender: mpsc::Sender<Result<Bytes, sqlx::Error>>) {
    let mut rows = filter.query(None).fetch(&pool);
    let mut chunk = Vec::with_capacity(CHUNK + 1024);
    let mut exported = 0u64;
    loop {
        match rows.try_next().await {
            Ok(Some(event)) => {
                if let Err(e) = serde_json::to_writer(&mut chunk, &event) {
                    let _ = sender.send(Err(sqlx::Error::Encode(Box::new(e)))).await;
                    return;
                }
                chunk.push(b'\n');
                exported += 1;
                if chunk.len() >= CHUNK
                    && sender
                        .send(Ok(Bytes::from(std::mem::take(&mut chunk))))
                        .await
                        .is_err()
                {
                    tracing::info!(exported, "audit export: the client went away");
                    return;
                }
            }
            Ok(None) => {
                if !chunk.is_empty() {
                    let _ = sender.send(Ok(Bytes::from(chunk))).await;
                }
                tracing::info!(exported, "audit export finished");
                return;
            }
            Err(e) => {
                tracing::error!(exported, error = %cause_chain(&e), "audit export failed");
                let _ = sender.send(Err(e)).await;
                return;
            }
        }
    }
}
