//! `rm_timeline`: the chat timeline of each run. Display fields only: internal detail (prompts,
//! raw tool arguments and results) never enters this table.

use apex_domain::instance::InstanceEvent;
pub use apex_domain::timeline::{TimelineEntry, timeline_entry};
use sqlx::PgConnection;

use super::instance_uuid;
use crate::envelope::StoredEvent;

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
