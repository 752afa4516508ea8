//! `rm_agents`: the agent catalogue.

use apex_domain::agent::AgentEvent;
use sqlx::PgConnection;

use crate::envelope::StoredEvent;

pub(super) async fn apply(
    conn: &mut PgConnection,
    stored: &StoredEvent,
    event: &AgentEvent,
) -> Result<(), sqlx::Error> {
    let at = stored.recorded_at;
    let id = &stored.aggregate_id;
    match event {
        AgentEvent::AgentDefined {
            display_name,
            description,
            tools,
            tiers,
            version,
            ..
        } => {
            let tiers: Vec<&str> = tiers.iter().map(|t| t.as_str()).collect();
            sqlx::query(
                "INSERT INTO rm_agents (agent_id, display_name, description, tools, tiers, status,
                                        version, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, 'draft', $6, $7, $7)",
            )
            .bind(id)
            .bind(display_name)
            .bind(description)
            .bind(sqlx::types::Json(tools))
            .bind(&tiers)
            .bind(*version as i32)
            .bind(at)
            .execute(conn)
            .await?;
        }
        AgentEvent::AgentUpdated {
            display_name,
            description,
            tools,
            tiers,
            version,
        } => {
            let tiers: Vec<&str> = tiers.iter().map(|t| t.as_str()).collect();
            sqlx::query(
                "UPDATE rm_agents SET display_name = $2, description = $3, tools = $4, tiers = $5,
                        version = $6, updated_at = $7
                  WHERE agent_id = $1",
            )
            .bind(id)
            .bind(display_name)
            .bind(description)
            .bind(sqlx::types::Json(tools))
            .bind(&tiers)
            .bind(*version as i32)
            .bind(at)
            .execute(conn)
            .await?;
        }
        AgentEvent::AgentActivated { version } => {
            status(conn, id, "active", *version, stored).await?
        }
        AgentEvent::AgentDisabled { version } => {
            status(conn, id, "disabled", *version, stored).await?
        }
        AgentEvent::AgentRetired { version } => {
            status(conn, id, "retired", *version, stored).await?
        }
    }
    Ok(())
}

async fn status(
    conn: &mut PgConnection,
    id: &str,
    status: &str,
    version: u32,
    stored: &StoredEvent,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE rm_agents SET status = $2, version = $3, updated_at = $4 WHERE agent_id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(version as i32)
    .bind(stored.recorded_at)
    .execute(conn)
    .await?;
    Ok(())
}
