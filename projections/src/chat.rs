//! Live chat updates: the timeline is written with the events (an inline projection), so as
//! soon as a batch of events is committed its timeline entries may go out. The relay reads
//! them with the batch and publishes them to the chat exchange as one message (a JSON array,
//! in store order) with routing key [`BATCH_ROUTING_KEY`]; every API replica binds that key and
//! hands each update to the WebSocket connections of its owner on that replica.
//!
//! Updates are confirmed before the relay's checkpoint moves over their events, and a batch
//! published again (after a crash, or by a standby that took over) is announced again, so
//! nothing is lost; receivers drop duplicates by sequence.

use chrono::{DateTime, Utc};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, PublisherConfirm};
use serde::{Deserialize, Serialize};
use serde_json::Value;
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

/// Publishes `updates` to the chat exchange as one message without waiting for the broker;
/// returns its confirm (none for no updates).
///
/// One message per batch rather than one per update: at 10,000 events/s the per-update
/// messages (each routed by owner) cost the broker more than the updates themselves, and a
/// replica that has none of the owners connected drops a batch with one lookup per update.
pub async fn send(
    channel: &Channel,
    exchange: &str,
    updates: &[ChatUpdate],
) -> Result<Option<PublisherConfirm>, BusError> {
    if updates.is_empty() {
        return Ok(None);
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
    Ok(Some(confirm))
}
