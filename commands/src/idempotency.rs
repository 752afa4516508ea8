//! Looks up the answer of an earlier request that used the same `Idempotency-Key`.
//!
//! Keys are recorded by a trigger in the append transaction (migration
//! `idempotency_keys`), so a stored key always means its events were stored.

use sqlx::PgPool;

use crate::context::{CommandOutcome, IdempotencyKey};
use crate::error::CommandError;

/// The stored answer for `key`, if the principal used it before.
///
/// Fails with [`CommandError::IdempotencyKeyReused`] when the key was used for another request.
#[tracing::instrument(skip_all, fields(principal = %principal))]
pub(crate) async fn replay(
    pool: &PgPool,
    principal: &str,
    aggregate_type: &str,
    key: &IdempotencyKey,
) -> Result<Option<CommandOutcome>, CommandError> {
    let row: Option<(String, String, String, i64)> = sqlx::query_as(
        "SELECT request_hash, aggregate_type, aggregate_id, last_sequence
           FROM idempotency_keys WHERE principal = $1 AND idempotency_key = $2",
    )
    .bind(principal)
    .bind(&key.key)
    .fetch_optional(pool)
    .await
    .map_err(CommandError::from_sqlx)?;
    let Some((request_hash, stored_type, aggregate_id, last_sequence)) = row else {
        return Ok(None);
    };
    if request_hash != key.request_hash || stored_type != aggregate_type {
        return Err(CommandError::IdempotencyKeyReused);
    }
    Ok(Some(CommandOutcome {
        aggregate_id,
        sequence: u64::try_from(last_sequence).unwrap_or_default(),
        appended: 0,
        replayed: true,
    }))
}
