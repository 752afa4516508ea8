//! Reading the event store: rows in relay order, and one aggregate's events (gap repair).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgExecutor, Row};
use uuid::Uuid;

use crate::chat::ChatUpdate;
use crate::envelope::StoredEvent;

/// Columns selected for a [`StoredEvent`].
pub const EVENT_COLUMNS: &str = "event_id, aggregate_type, aggregate_id, sequence, event_type, \
     event_version, payload, metadata, position, transaction_id::text::bigint AS transaction_id, \
     recorded_at, correlation_id, causation_id, principal, principal_role";

/// Maps a row selected with [`EVENT_COLUMNS`].
pub fn from_row(row: &PgRow) -> Result<StoredEvent, sqlx::Error> {
    let metadata: Value = row.try_get("metadata")?;
    Ok(StoredEvent {
        event_id: row.try_get::<Uuid, _>("event_id")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        payload: row.try_get("payload")?,
        position: row.try_get("position")?,
        transaction_id: row.try_get("transaction_id")?,
        recorded_at: row.try_get::<DateTime<Utc>, _>("recorded_at")?,
        correlation_id: row.try_get("correlation_id")?,
        causation_id: row.try_get("causation_id")?,
        principal: row.try_get("principal")?,
        principal_role: row.try_get("principal_role")?,
        traceparent: metadata
            .get("traceparent")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// Events of one aggregate with `from <= sequence <= to`, in order.
pub async fn aggregate_range(
    conn: &mut PgConnection,
    aggregate_type: &str,
    aggregate_id: &str,
    from: i64,
    to: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events
          WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence BETWEEN $3 AND $4
          ORDER BY sequence"
    );
    let rows = sqlx::query(&sql)
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(from)
        .bind(to)
        .fetch_all(conn)
        .await?;
    rows.iter().map(from_row).collect()
}

/// What the relay reads after its checkpoint.
#[derive(Debug)]
pub struct Settled {
    /// Up to the limit of events whose transactions are all finished, in relay order.
    pub events: Vec<StoredEvent>,
    /// The chat updates of those events: their timeline rows (written with them), creations
    /// excluded, in the same order.
    pub chat: Vec<ChatUpdate>,
    /// Whether committed events after them are held back by the snapshot horizon (an older
    /// transaction, anywhere in the cluster, is still running): they are returned once it ends.
    pub held_back: bool,
}

/// Up to `limit` events after the `(transaction_id, position)` checkpoint whose transactions
/// are all finished: `transaction_id < pg_snapshot_xmin(pg_current_snapshot())`. Every
/// transaction below that horizon has committed or aborted, so no event can appear later
/// below the checkpoint: reading in `(transaction_id, position)` order skips nothing.
///
/// One statement reads the events, their timeline rows (the chat updates to announce), and
/// finds whether any are held back (they sort after every settled one), instead of a second
/// query after each read that is not full.
pub async fn after_checkpoint<'e>(
    executor: impl PgExecutor<'e>,
    transaction_id: i64,
    position: i64,
    limit: i64,
) -> Result<Settled, sqlx::Error> {
    // The timeline rows are looked up per event (a LATERAL with LIMIT, so the planner cannot
    // turn it into a hash join over the whole timeline). An instance's id is a uuid by
    // construction (every command parses it); a row written by hand with another id fails
    // the cast and stops the relay, loudly, as an event it cannot encode does.
    let sql = format!(
        "SELECT e.*, t.owner_id AS chat_owner, t.kind AS chat_kind, t.at AS chat_at,
                t.display AS chat_display, t.traceparent AS chat_traceparent
           FROM (SELECT {EVENT_COLUMNS},
                        transaction_id < pg_snapshot_xmin(pg_current_snapshot()) AS settled
                   FROM events
                  WHERE (transaction_id, position) > ($1::text::xid8, $2)
                  ORDER BY events.transaction_id, events.position
                  LIMIT $3) e
           LEFT JOIN LATERAL (
                SELECT owner_id, kind, at, display, traceparent FROM rm_timeline
                 WHERE e.aggregate_type = 'instance'
                   AND instance_id = e.aggregate_id::uuid AND sequence = e.sequence
                   AND kind <> 'instance_created'
                 LIMIT 1) t ON true
          ORDER BY e.transaction_id, e.position"
    );
    let rows = sqlx::query(&sql)
        .bind(transaction_id.to_string())
        .bind(position)
        .bind(limit.saturating_add(1))
        .fetch_all(executor)
        .await?;
    let mut events = Vec::with_capacity(rows.len());
    let mut chat = Vec::new();
    let mut held_back = false;
    for row in &rows {
        if !row.try_get::<bool, _>("settled")? {
            held_back = true;
            break;
        }
        if events.len() as i64 == limit {
            break;
        }
        let event = from_row(row)?;
        if let Some(kind) = row.try_get::<Option<String>, _>("chat_kind")? {
            chat.push(ChatUpdate {
                instance_id: Uuid::parse_str(&event.aggregate_id)
                    .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                sequence: event.sequence,
                owner_id: row.try_get("chat_owner")?,
                kind,
                at: row.try_get("chat_at")?,
                display: row.try_get("chat_display")?,
                traceparent: row.try_get("chat_traceparent")?,
            });
        }
        events.push(event);
    }
    Ok(Settled {
        events,
        chat,
        held_back,
    })
}

/// Up to `limit` events after the checkpoint in `(transaction_id, position)` order, without
/// the snapshot horizon: only for a quiescent store (replays in checks and tests), where every
/// transaction has finished and a concurrent one elsewhere in the cluster must not hide events.
pub async fn all_after<'e>(
    executor: impl PgExecutor<'e>,
    transaction_id: i64,
    position: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events
          WHERE (transaction_id, position) > ($1::text::xid8, $2)
          ORDER BY events.transaction_id, events.position
          LIMIT $3"
    );
    let rows = sqlx::query(&sql)
        .bind(transaction_id.to_string())
        .bind(position)
        .bind(limit)
        .fetch_all(executor)
        .await?;
    rows.iter().map(from_row).collect()
}
