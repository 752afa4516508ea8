//! `rm_instances`: one summary per run (owner, agent, status, timestamps, counts, last message).

use apex_domain::instance::InstanceEvent;
use serde_json::json;
use sqlx::PgConnection;

use super::instance_uuid;
use crate::envelope::StoredEvent;

pub(super) async fn apply(
    conn: &mut PgConnection,
    stored: &StoredEvent,
    event: &InstanceEvent,
) -> Result<(), sqlx::Error> {
    let id = instance_uuid(stored)?;
    let at = stored.recorded_at;
    let seq = stored.sequence;
    if let InstanceEvent::InstanceCreated {
        owner_id,
        agent_id,
        agent_version,
        thread_id,
        input,
        ..
    } = event
    {
        sqlx::query(
            "INSERT INTO rm_instances (instance_id, owner_id, agent_id, agent_version, thread_id,
                                       status, input, created_at, updated_at, last_sequence)
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $7, $8)",
        )
        .bind(id)
        .bind(owner_id)
        .bind(agent_id)
        .bind(*agent_version as i32)
        .bind(thread_id)
        .bind(input)
        .bind(at)
        .bind(seq)
        .execute(conn)
        .await?;
        return Ok(());
    }
    // (status, started, ended, thought+, tool+, open delta, last message, internal)
    let (status, started, ended, thoughts, tools, open, message, internal) = match event {
        InstanceEvent::InstanceCreated { .. } => unreachable!("handled above"),
        InstanceEvent::InstanceStarted { display, internal } => (
            Some("running"),
            true,
            false,
            0,
            0,
            0,
            display.message.clone(),
            json!({ "prompt": internal.prompt }),
        ),
        InstanceEvent::ThoughtRecorded { display, internal } => (
            None,
            false,
            false,
            1,
            0,
            0,
            Some(display.thought.clone()),
            json!({ "prompt": internal.prompt, "raw": internal.raw }),
        ),
        InstanceEvent::ToolCallStarted {
            tool,
            display,
            internal,
            ..
        } => (
            None,
            false,
            false,
            0,
            1,
            1,
            Some(
                display
                    .summary
                    .clone()
                    .unwrap_or_else(|| format!("Running {tool}")),
            ),
            json!({ "arguments": internal.arguments }),
        ),
        InstanceEvent::ToolCallCompleted {
            tool,
            display,
            internal,
            ..
        } => (
            None,
            false,
            false,
            0,
            0,
            -1,
            Some(
                display
                    .summary
                    .clone()
                    .unwrap_or_else(|| format!("{tool} finished")),
            ),
            json!({ "result": internal.result, "duration_ms": internal.duration_ms }),
        ),
        InstanceEvent::InstanceCompleted { display, internal } => (
            Some("completed"),
            false,
            true,
            0,
            0,
            0,
            Some(display.output.clone()),
            json!({ "raw": internal.raw }),
        ),
        InstanceEvent::InstanceFailed { display, internal } => (
            Some("failed"),
            false,
            true,
            0,
            0,
            0,
            Some(display.error.clone()),
            json!({ "raw": internal.raw }),
        ),
        InstanceEvent::InstanceCancelled { display, by } => (
            Some("cancelled"),
            false,
            true,
            0,
            0,
            0,
            Some(
                display
                    .reason
                    .clone()
                    .unwrap_or_else(|| "Cancelled".to_owned()),
            ),
            json!({ "cancelled_by": by }),
        ),
    };
    sqlx::query(
        "UPDATE rm_instances SET
                status = COALESCE($2, status),
                started_at = CASE WHEN $3 THEN $9 ELSE started_at END,
                ended_at = CASE WHEN $4 THEN $9 ELSE ended_at END,
                thought_count = thought_count + $5,
                tool_call_count = tool_call_count + $6,
                open_tool_calls = CASE WHEN $4 THEN 0 ELSE open_tool_calls + $7 END,
                last_message = COALESCE($8, last_message),
                last_internal = $10,
                updated_at = $9,
                last_sequence = $11
          WHERE instance_id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(started)
    .bind(ended)
    .bind(thoughts)
    .bind(tools)
    .bind(open)
    .bind(message)
    .bind(at)
    .bind(internal)
    .bind(seq)
    .execute(conn)
    .await?;
    Ok(())
}
