//! `rm_timeline`: the chat timeline of each run. Display fields only: internal detail (prompts,
//! raw tool arguments and results) never enters this table.

use apex_domain::instance::InstanceEvent;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgConnection;

use super::instance_uuid;
use crate::envelope::StoredEvent;

/// One chat-visible step of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineEntry {
    /// `instance_created`, `agent_started`, `agent_thinking`, `tool_executing`,
    /// `tool_completed`, `agent_completed`, `agent_failed` or `agent_cancelled`.
    pub kind: &'static str,
    /// Display data.
    pub display: Value,
}

/// The chat-visible form of an instance event.
pub fn timeline_entry(event: &InstanceEvent) -> TimelineEntry {
    let (kind, display) = match event {
        InstanceEvent::InstanceCreated {
            agent_id,
            thread_id,
            input,
            ..
        } => (
            "instance_created",
            json!({ "agent_id": agent_id, "thread_id": thread_id, "input": input }),
        ),
        InstanceEvent::InstanceStarted { display, .. } => {
            ("agent_started", json!({ "message": display.message }))
        }
        InstanceEvent::ThoughtRecorded { display, .. } => {
            ("agent_thinking", json!({ "thought": display.thought }))
        }
        InstanceEvent::ToolCallStarted {
            call_id,
            tool,
            display,
            ..
        } => (
            "tool_executing",
            json!({ "call_id": call_id, "tool": tool, "summary": display.summary }),
        ),
        InstanceEvent::ToolCallCompleted {
            call_id,
            tool,
            is_error,
            display,
            ..
        } => (
            "tool_completed",
            json!({ "call_id": call_id, "tool": tool, "is_error": is_error, "summary": display.summary }),
        ),
        InstanceEvent::InstanceCompleted { display, .. } => {
            ("agent_completed", json!({ "output": display.output }))
        }
        InstanceEvent::InstanceFailed { display, .. } => {
            ("agent_failed", json!({ "error": display.error }))
        }
        InstanceEvent::InstanceCancelled { display, by } => (
            "agent_cancelled",
            json!({ "reason": display.reason, "by_role": by.role }),
        ),
    };
    TimelineEntry { kind, display }
}

pub(super) async fn apply(
    conn: &mut PgConnection,
    stored: &StoredEvent,
    event: &InstanceEvent,
) -> Result<(), sqlx::Error> {
    let id = instance_uuid(stored)?;
    let owner: String = match event {
        InstanceEvent::InstanceCreated { owner_id, .. } => owner_id.clone(),
        _ => {
            sqlx::query_scalar(
                "SELECT owner_id FROM rm_timeline WHERE instance_id = $1 AND sequence = 1",
            )
            .bind(id)
            .fetch_one(&mut *conn)
            .await?
        }
    };
    let entry = timeline_entry(event);
    sqlx::query(
        "INSERT INTO rm_timeline (instance_id, sequence, owner_id, kind, at, display, traceparent)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(stored.sequence)
    .bind(&owner)
    .bind(entry.kind)
    .bind(stored.recorded_at)
    .bind(&entry.display)
    .bind(stored.traceparent.as_deref())
    .execute(conn)
    .await?;
    Ok(())
}
