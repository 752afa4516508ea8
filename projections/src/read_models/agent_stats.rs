//! `rm_agent_stats`: per agent, runs by status, finished-run durations and tool calls.

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
    if let InstanceEvent::InstanceCreated { agent_id, .. } = event {
        sqlx::query(
            "INSERT INTO rm_agent_stats_runs (instance_id, agent_id, status, created_at)
             VALUES ($1, $2, 'pending', $3)",
        )
        .bind(id)
        .bind(agent_id)
        .bind(at)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO rm_agent_stats (agent_id, runs_total, pending) VALUES ($1, 1, 1)
             ON CONFLICT (agent_id) DO UPDATE
                SET runs_total = rm_agent_stats.runs_total + 1,
                    pending = rm_agent_stats.pending + 1",
        )
        .bind(agent_id)
        .execute(&mut *conn)
        .await?;
        return Ok(());
    }
    let (agent_id, previous, created_at): (String, String, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as(
            "SELECT agent_id, status, created_at FROM rm_agent_stats_runs WHERE instance_id = $1",
        )
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    let next = match event {
        InstanceEvent::InstanceStarted { .. } => "running",
        InstanceEvent::InstanceCompleted { .. } => "completed",
        InstanceEvent::InstanceFailed { .. } => "failed",
        InstanceEvent::InstanceCancelled { .. } => "cancelled",
        InstanceEvent::ToolCallStarted { .. } => {
            sqlx::query(
                "UPDATE rm_agent_stats SET tool_calls = tool_calls + 1 WHERE agent_id = $1",
            )
            .bind(&agent_id)
            .execute(&mut *conn)
            .await?;
            return Ok(());
        }
        _ => return Ok(()),
    };
    let finished = next != "running";
    let duration_ms = if finished {
        (at - created_at).num_milliseconds().max(0)
    } else {
        0
    };
    // Column names come from this closed set, never from input.
    let column = |s: &str| -> Result<&'static str, sqlx::Error> {
        Ok(match s {
            "pending" => "pending",
            "running" => "running",
            "completed" => "completed",
            "failed" => "failed",
            "cancelled" => "cancelled",
            other => {
                return Err(sqlx::Error::Protocol(format!("unknown run status {other}")));
            }
        })
    };
    let (from, to) = (column(&previous)?, column(next)?);
    let sql = format!(
        "UPDATE rm_agent_stats SET {from} = {from} - 1, {to} = {to} + 1,
                finished_runs = finished_runs + $2, total_duration_ms = total_duration_ms + $3
          WHERE agent_id = $1"
    );
    sqlx::query(&sql)
        .bind(&agent_id)
        .bind(i64::from(finished))
        .bind(duration_ms)
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE rm_agent_stats_runs SET status = $2 WHERE instance_id = $1")
        .bind(id)
        .bind(next)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
