//! Live chat updates: after the timeline projection commits a batch, its new timeline entries
//! are published to the chat exchange as one message (a JSON array, in store order) with
//! routing key [`BATCH_ROUTING_KEY`]; every API replica binds that key and hands each update to
//! the WebSocket connections of its owner on that replica.
//!
//! Updates are published (with confirms) before the source events are acknowledged, and again
//! when a redelivered event is skipped as already applied, so a crash between the projection's
//! commit and the publish loses nothing; receivers drop duplicates by sequence.

use chrono::{DateTime, Utc};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::amqp::BusError;

/// One chat-visible step, as sent to a chat client. Display data only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct ChatUpdate {
    /// The run.
    pub instance_id: Uuid,
    /// Its sequence (gap-free per run; 1 is the creation, not sent live).
    pub sequence: i64,
    /// The owner (routing only; not sent to clients).
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub owner_id: String,
    /// `agent_started`, `agent_thinking`, `tool_executing`, `tool_completed`,
    /// `agent_completed`, `agent_failed` or `agent_cancelled`.
    pub kind: String,
    /// When the step was recorded.
    pub at: DateTime<Utc>,
    /// Display data.
    pub display: Value,
    /// W3C trace context of the command (logging only; not sent to clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The routing key of the messages of updates.
pub const BATCH_ROUTING_KEY: &str = "updates";

/// The AMQP `type` of a message of updates (a JSON array of [`ChatUpdate`]).
pub const BATCH_TYPE: &str = "apex.chat.updates";

/// Timeline entries with `lo <= sequence <= hi` for each `(instance, lo, hi)`, in order;
/// creation entries excluded.
pub async fn entries(
    pool: &PgPool,
    ranges: &[(Uuid, i64, i64)],
) -> Result<Vec<ChatUpdate>, sqlx::Error> {
    let ids: Vec<Uuid> = ranges.iter().map(|r| r.0).collect();
    let los: Vec<i64> = ranges.iter().map(|r| r.1).collect();
    let his: Vec<i64> = ranges.iter().map(|r| r.2).collect();
    sqlx::query_as(
        // LATERAL: one primary-key range scan per run. A plain join let the planner pick a
        // sequential scan of the whole timeline per batch (a plan made while the table was
        // small), which made each batch cost more as the timeline grew.
        "SELECT DISTINCT t.instance_id, t.sequence, t.owner_id, t.kind, t.at, t.display, t.traceparent
           FROM unnest($1::uuid[], $2::bigint[], $3::bigint[]) AS r(id, lo, hi)
           CROSS JOIN LATERAL (
                SELECT * FROM rm_timeline
                 WHERE instance_id = r.id AND sequence BETWEEN r.lo AND r.hi
                   AND kind <> 'instance_created'
           ) t
          ORDER BY t.instance_id, t.sequence",
    )
    .bind(&ids)
    .bind(&los)
    .bind(&his)
    .fetch_all(pool)
    .await
}

/// Publishes `updates` to the chat exchange as one message and waits for its confirm.
///
/// One message per batch rather than one per update: at 10,000 events/s the per-update
/// messages (each routed by owner) cost the broker and the projector more than the updates
/// themselves, and a replica that has none of the owners connected drops a batch with one
/// lookup per update.
pub async fn publish(
    channel: &Channel,
    exchange: &str,
    updates: &[ChatUpdate],
) -> Result<(), BusError> {
    if updates.is_empty() {
        return Ok(());
    }
    let body = serde_json::to_vec(updates).map_err(|e| BusError::Encode(e.to_string()))?;
    let confirm = channel
        .basic_publish(
            exchange.into(),
            BATCH_ROUTING_KEY.into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_type(BATCH_TYPE.into()),
        )
        .await?;
    if !confirm.await?.is_ack() {
        return Err(BusError::Nacked);
    }
    Ok(())
}
