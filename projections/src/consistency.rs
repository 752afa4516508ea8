//! Compares the live read models with what a fresh replay of the store produces.
//!
//! Used by the chaos run and the tests: after faults, every event must be in every read model
//! exactly once, which holds exactly when the live tables equal a replay.

use std::collections::BTreeMap;

use sqlx::{PgConnection, PgPool};

use crate::read_models::ReadModel;
use crate::store;

/// Every read-model row as text, sorted, by table.
pub type Snapshot = BTreeMap<&'static str, Vec<String>>;

/// The live read models.
pub async fn live(conn: &mut PgConnection) -> Result<Snapshot, sqlx::Error> {
    let mut out = BTreeMap::new();
    for model in ReadModel::ALL {
        for table in model.tables() {
            let rows: Vec<String> =
                sqlx::query_scalar(&format!("SELECT t::text FROM {table} t ORDER BY 1"))
                    .fetch_all(&mut *conn)
                    .await?;
            out.insert(*table, rows);
        }
    }
    Ok(out)
}

/// The read models a replay of the whole store produces (computed in a transaction that is
/// rolled back, so the live tables are untouched).
///
/// The reference is deliberately the plainest path: every event, in store order, through the
/// read models' per-event rules (`ReadModel::apply`), with none of the projectors' machinery
/// (offsets, duplicate and gap handling, set-based batches, status rows) that it checks.
pub async fn replayed(pool: &PgPool) -> Result<Snapshot, Box<dyn std::error::Error + Send + Sync>> {
    let mut tx = pool.begin().await?;
    for model in ReadModel::ALL {
        for table in model.tables() {
            sqlx::query(&format!("DELETE FROM {table}"))
                .execute(&mut *tx)
                .await?;
        }
    }
    let mut checkpoint = (0i64, 0i64);
    loop {
        let events = store::all_after(&mut *tx, checkpoint.0, checkpoint.1, 5_000).await?;
        let Some(last) = events.last() else { break };
        checkpoint = (last.transaction_id, last.position);
        for stored in &events {
            let event = stored.decode()?;
            for model in ReadModel::ALL {
                if model.aggregate_type() == stored.aggregate_type {
                    model.apply(&mut tx, stored, &event).await?;
                }
            }
        }
    }
    let snapshot = live(&mut tx).await?;
    tx.rollback().await?;
    Ok(snapshot)
}

/// Rows that differ between two snapshots: `(table, only in live, only in replay)`.
pub fn differences(live: &Snapshot, replay: &Snapshot) -> Vec<(&'static str, usize, usize)> {
    let mut out = Vec::new();
    for (table, rows) in live {
        let other = replay.get(table).cloned().unwrap_or_default();
        let a: std::collections::BTreeSet<_> = rows.iter().collect();
        let b: std::collections::BTreeSet<_> = other.iter().collect();
        let only_live = a.difference(&b).count() + rows.len().saturating_sub(a.len());
        let only_replay = b.difference(&a).count() + other.len().saturating_sub(b.len());
        if only_live > 0 || only_replay > 0 {
            out.push((*table, only_live, only_replay));
        }
    }
    out
}
