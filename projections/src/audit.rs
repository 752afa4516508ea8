//! Audit: verify the hash chain of the stored history, and replay an aggregate to any version
//! or time.
//!
//! Verification recomputes every hash here, from the stored bytes, rather than trusting a
//! database function: it names the first aggregate and sequence where the chain breaks.

use apex_domain::agent::Agent;
use apex_domain::instance::Instance;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use futures::TryStreamExt;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};

use crate::envelope::{DecodeError, DomainEvent};
use crate::store::{self, EVENT_COLUMNS};

/// Why a stream fails verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakKind {
    /// The stored hash does not match the event's bytes and its predecessor: the event was
    /// edited, or events were reordered.
    HashMismatch,
    /// A sequence is missing: an event was deleted.
    MissingSequence,
}

/// The first place a stream's chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainBreak {
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// The first sequence that fails.
    pub sequence: i64,
    /// What is wrong.
    pub kind: BreakKind,
}

/// Result of a verification.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verification {
    /// Events checked.
    pub events_checked: u64,
    /// Streams checked.
    pub aggregates_checked: u64,
    /// The first break of every broken stream.
    pub breaks: Vec<ChainBreak>,
}

impl Verification {
    /// True when nothing was altered.
    pub fn intact(&self) -> bool {
        self.breaks.is_empty()
    }
}

const HASHED_COLUMNS: &str = "aggregate_type, aggregate_id, sequence, event_type, event_version, \
     event_id::text AS event_id, payload::text AS payload, metadata::text AS metadata, \
     extract(epoch FROM recorded_at)::numeric::text AS recorded_epoch, hash";

/// The hash of an event, given its predecessor's hash (the same bytes the append trigger hashes).
fn event_hash(prev: Option<&[u8]>, fields: [&str; 9]) -> Vec<u8> {
    let mut hasher = Sha256::new();
    if let Some(prev) = prev {
        hasher.update(prev);
    }
    hasher.update(fields.join("\u{1f}").as_bytes());
    hasher.finalize().to_vec()
}

/// Verifies every stream (or one, when `aggregate` is given), calling `progress` with the
/// number of events checked so far.
pub async fn verify(
    pool: &PgPool,
    aggregate: Option<(&str, &str)>,
    mut progress: impl FnMut(u64),
) -> Result<Verification, sqlx::Error> {
    let filter = if aggregate.is_some() {
        "WHERE aggregate_type = $1 AND aggregate_id = $2"
    } else {
        ""
    };
    let sql = format!(
        "SELECT {HASHED_COLUMNS} FROM events {filter} ORDER BY aggregate_type, aggregate_id, sequence"
    );
    let query = sqlx::query(&sql);
    let query = match aggregate {
        Some((t, i)) => query.bind(t).bind(i),
        None => query,
    };
    let mut rows = query.fetch(pool);
    let mut out = Verification::default();
    let mut current: Option<(String, String)> = None;
    let mut prev_hash: Option<Vec<u8>> = None;
    let mut prev_sequence = 0i64;
    let mut broken = false;
    while let Some(row) = rows.try_next().await? {
        let aggregate_type: String = row.try_get("aggregate_type")?;
        let aggregate_id: String = row.try_get("aggregate_id")?;
        let sequence: i64 = row.try_get("sequence")?;
        let key = (aggregate_type.clone(), aggregate_id.clone());
        if current.as_ref() != Some(&key) {
            current = Some(key);
            prev_hash = None;
            prev_sequence = 0;
            broken = false;
            out.aggregates_checked += 1;
        }
        out.events_checked += 1;
        if out.events_checked.is_multiple_of(10_000) {
            progress(out.events_checked);
        }
        if broken {
            continue;
        }
        let stored: Vec<u8> = row.try_get("hash")?;
        let mut record = |kind| {
            out.breaks.push(ChainBreak {
                aggregate_type: aggregate_type.clone(),
                aggregate_id: aggregate_id.clone(),
                sequence: if kind == BreakKind::MissingSequence {
                    prev_sequence + 1
                } else {
                    sequence
                },
                kind,
            });
        };
        if sequence != prev_sequence + 1 {
            record(BreakKind::MissingSequence);
            broken = true;
            continue;
        }
        let sequence_text = sequence.to_string();
        let fields = [
            aggregate_type.as_str(),
            aggregate_id.as_str(),
            sequence_text.as_str(),
            &row.try_get::<String, _>("event_type")?,
            &row.try_get::<String, _>("event_version")?,
            &row.try_get::<String, _>("event_id")?,
            &row.try_get::<String, _>("payload")?,
            &row.try_get::<String, _>("metadata")?,
            &row.try_get::<String, _>("recorded_epoch")?,
        ];
        let expected = event_hash(prev_hash.as_deref(), fields);
        if expected != stored {
            record(BreakKind::HashMismatch);
            broken = true;
            continue;
        }
        prev_hash = Some(stored);
        prev_sequence = sequence;
    }
    progress(out.events_checked);
    Ok(out)
}

/// An aggregate's state replayed up to a point.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayedState {
    /// The last sequence applied (0 when none).
    pub sequence: i64,
    /// When that event was recorded.
    pub recorded_at: Option<DateTime<Utc>>,
    /// The aggregate's state, as the current code folds it.
    pub state: Value,
}

/// Where to stop a replay.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// The first `n` events.
    Version(i64),
    /// Events recorded at or before this time.
    Time(DateTime<Utc>),
    /// Every event.
    End,
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The store failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A stored event no longer decodes with the current code.
    #[error("event {aggregate_type}/{aggregate_id}#{sequence} does not decode: {source}")]
    Decode {
        /// Aggregate type.
        aggregate_type: String,
        /// Aggregate id.
        aggregate_id: String,
        /// Sequence.
        sequence: i64,
        /// Why.
        source: DecodeError,
    },
    /// Unknown aggregate type.
    #[error("unknown aggregate type {0}")]
    UnknownType(String),
}

/// Replays one aggregate from its events through the current code (upcasters included).
pub async fn replay(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    until: Until,
) -> Result<ReplayedState, ReplayError> {
    let mut conn = pool.acquire().await?;
    let events =
        store::aggregate_range(&mut conn, aggregate_type, aggregate_id, 1, i64::MAX).await?;
    let mut agent = Agent::default();
    let mut instance = Instance::default();
    let mut sequence = 0;
    let mut recorded_at = None;
    for stored in events {
        let stop = match until {
            Until::Version(n) => stored.sequence > n,
            Until::Time(t) => stored.recorded_at > t,
            Until::End => false,
        };
        if stop {
            break;
        }
        let event = stored.decode().map_err(|source| ReplayError::Decode {
            aggregate_type: stored.aggregate_type.clone(),
            aggregate_id: stored.aggregate_id.clone(),
            sequence: stored.sequence,
            source,
        })?;
        match event {
            DomainEvent::Agent(e) => agent.apply(e),
            DomainEvent::Instance(e) => instance.apply(e),
        }
        sequence = stored.sequence;
        recorded_at = Some(stored.recorded_at);
    }
    let state = match aggregate_type {
        "agent" => serde_json::to_value(&agent),
        "instance" => serde_json::to_value(&instance),
        other => return Err(ReplayError::UnknownType(other.to_owned())),
    }
    .unwrap_or(Value::Null);
    Ok(ReplayedState {
        sequence,
        recorded_at,
        state,
    })
}

/// Outcome of replaying the whole store.
#[derive(Debug, Default, Serialize)]
pub struct FullReplay {
    /// Events that decoded and applied.
    pub events_ok: u64,
    /// Aggregates replayed.
    pub aggregates: u64,
    /// Events that no longer decode, with why.
    pub failures: Vec<String>,
}

/// Loads every aggregate from its events through the current code and reports every event
/// that no longer deserializes or applies.
pub async fn replay_all(
    pool: &PgPool,
    mut progress: impl FnMut(u64),
) -> Result<FullReplay, sqlx::Error> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events ORDER BY aggregate_type, aggregate_id, sequence"
    );
    let mut rows = sqlx::query(&sql).fetch(pool);
    let mut out = FullReplay::default();
    let mut current: Option<(String, String)> = None;
    let mut agent = Agent::default();
    let mut instance = Instance::default();
    let mut seen = 0u64;
    while let Some(row) = rows.try_next().await? {
        let stored = store::from_row(&row)?;
        let key = (stored.aggregate_type.clone(), stored.aggregate_id.clone());
        if current.as_ref() != Some(&key) {
            current = Some(key);
            agent = Agent::default();
            instance = Instance::default();
            out.aggregates += 1;
        }
        seen += 1;
        if seen.is_multiple_of(10_000) {
            progress(seen);
        }
        // `apply` is infallible by design; a panic there is a bug and is reported as such.
        match stored.decode() {
            Ok(DomainEvent::Agent(e)) => {
                agent.apply(e);
                out.events_ok += 1;
            }
            Ok(DomainEvent::Instance(e)) => {
                instance.apply(e);
                out.events_ok += 1;
            }
            Err(e) => out.failures.push(format!(
                "{}/{}#{} ({} v{}): {e}",
                stored.aggregate_type,
                stored.aggregate_id,
                stored.sequence,
                stored.event_type,
                stored.event_version
            )),
        }
    }
    progress(seen);
    Ok(out)
}
