//! `rm_usage`: per user, runs by outcome, thoughts and tool calls.
//!
//! Projectors see the runs of different instances in delivery order, and a rebuild sees them in
//! commit order; neither is the order of `recorded_at`. So every column is order-independent:
//! counters add, `first_seen_at` is a minimum and `last_seen_at` a maximum.

use apex_domain::instance::InstanceEvent;
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
    if let InstanceEvent::InstanceCreated { owner_id, .. } = event {
        sqlx::query("INSERT INTO rm_usage_owners (instance_id, user_id) VALUES ($1, $2)")
            .bind(id)
            .bind(owner_id)
            .execute(&mut *conn)
            .await?;
        sqlx::query(
            "INSERT INTO rm_usage (user_id, instances, first_seen_at, last_seen_at)
             VALUES ($1, 1, $2, $2)
             ON CONFLICT (user_id) DO UPDATE
                SET instances = rm_usage.instances + 1,
                    first_seen_at = LEAST(rm_usage.first_seen_at, $2),
                    last_seen_at = GREATEST(rm_usage.last_seen_at, $2)",
        )
        .bind(owner_id)
        .bind(at)
        .execute(&mut *conn)
        .await?;
        return Ok(());
    }
    let (completed, failed, cancelled, thoughts, tools) = match event {
        InstanceEvent::ThoughtRecorded { .. } => (0, 0, 0, 1, 0),
        InstanceEvent::ToolCallStarted { .. } => (0, 0, 0, 0, 1),
        InstanceEvent::InstanceCompleted { .. } => (1, 0, 0, 0, 0),
        InstanceEvent::InstanceFailed { .. } => (0, 1, 0, 0, 0),
        InstanceEvent::InstanceCancelled { .. } => (0, 0, 1, 0, 0),
        _ => (0, 0, 0, 0, 0),
    };
    sqlx::query(
        "UPDATE rm_usage SET completed = completed + $2, failed = failed + $3,
                cancelled = cancelled + $4, thoughts = thoughts + $5, tool_calls = tool_calls + $6,
                last_seen_at = GREATEST(last_seen_at, $7)
          WHERE user_id = (SELECT user_id FROM rm_usage_owners WHERE instance_id = $1)",
    )
    .bind(id)
    .bind(completed as i64)
    .bind(failed as i64)
    .bind(cancelled as i64)
    .bind(thoughts as i64)
    .bind(tools as i64)
    .bind(at)
    .execute(conn)
    .await?;
    Ok(())
}
