//! Rebuilds a read model from the event store without downtime for readers.
//!
//! 1. The read model's tables are copied empty into a private schema `rebuild_<name>`,
//!    `UNLOGGED` and with their primary keys and constraints but without their other indexes.
//! 2. The store is replayed into the copy in `(transaction_id, position)` order, with
//!    `search_path` pointing at the copy (the projection code uses unqualified names). Several
//!    read models rebuilt together ([`run_all`]) share one pass: each batch is read and decoded
//!    once and queued to every copy; each copy applies its queue in order on a task of its own
//!    (a transaction per batch), so the copies run concurrently and none waits for the others
//!    to finish a batch, while the next batches are read. Readers and the live projector keep using the public tables meanwhile.
//!    The four instance read models apply a batch set-based (see [`batch`]): the batch is
//!    folded in memory with the projection rules, then written with a few `unnest` statements;
//!    the copy's offsets are kept in memory during the replay (nothing else writes the copy).
//!    A batch that is not a clean continuation of every stream (a duplicate or a gap) falls
//!    back to the per-event path of the live projector, with the offsets in the copy's table.
//! 3. Finish the copy: write its offsets, `SET LOGGED`, build the public tables' other indexes
//!    under their names, `ANALYZE`; then apply what was committed meanwhile (no lock yet).
//! 4. Swap, in one transaction: take the read model's exclusive advisory lock (the live
//!    projector holds it shared while it writes), apply what arrived since, replace the public
//!    tables and the projector's offsets with the copy's, drop the schema. Readers wait for
//!    that transaction (milliseconds), they never fail; events that arrive later are applied
//!    by the live projector to the new tables as usual. The timeline, written by the appends
//!    themselves (an inline projection, no projector and no offsets), is locked against writes
//!    instead (`SHARE ROW EXCLUSIVE`: appends wait, readers do not): once the lock is held
//!    every committed event's row is in the old table and no append is half done, so the
//!    catch-up is complete; the appends that waited write into the new table.
//!
//! One rebuild per read model runs at a time, across processes: [`try_start`] takes a session
//! advisory lock without waiting. Every run is recorded in `projection_rebuilds` (status,
//! events replayed so far, error); [`latest_runs`] reads the latest run of each read model.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tokio::sync::mpsc;

use crate::envelope::{DomainEvent, StoredEvent};
use crate::projector::{ProjectorGroup, apply_one, model_lock_key};
use crate::read_models::ReadModel;

pub(crate) mod batch;

/// Events replayed per transaction.
const BATCH: i64 = 10_000;

/// Batches read ahead of the slowest copy (each copy's queue).
const BATCHES_AHEAD: usize = 2;

/// Why a rebuild failed.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// Another rebuild of the same read model is running.
    #[error("a rebuild of {0} is already running")]
    AlreadyRunning(&'static str),
    /// The store or the read model failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A stored event does not decode.
    #[error("event {0} does not decode: {1}")]
    Decode(String, String),
}

/// Progress of a rebuild.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Events replayed so far.
    pub done: u64,
    /// Events of the read model's aggregate type in the store when the rebuild started.
    pub total: u64,
    /// Events per second so far.
    pub per_second: f64,
}

/// Rebuilds `model`, calling `progress` after each batch; returns the events replayed.
///
/// The same as [`try_start`] followed by [`Rebuild::run`].
pub async fn rebuild(
    pool: &PgPool,
    model: ReadModel,
    progress: impl FnMut(Progress),
) -> Result<u64, RebuildError> {
    try_start(pool, model).await?.run(progress).await
}

/// A started rebuild: it holds the read model's rebuild lock (a session advisory lock on a
/// connection of its own) and its run is recorded as `running` in `projection_rebuilds`.
///
/// [`Rebuild::run`] performs it. Dropping it unrun closes the connection, which releases the
/// lock; the run row is then marked failed by the next start of the same read model.
pub struct Rebuild {
    pool: PgPool,
    model: ReadModel,
    guard: PgConnection,
    run_id: i64,
    batch: i64,
}

/// Takes `model`'s rebuild lock and records a `running` run, without waiting: another rebuild
/// of the same read model, in any process, answers [`RebuildError::AlreadyRunning`].
///
/// Call it before promising a rebuild to anyone (the admin API answers 202 or 409 on it), then
/// [`Rebuild::run`] it, possibly in a background task.
pub async fn try_start(pool: &PgPool, model: ReadModel) -> Result<Rebuild, RebuildError> {
    let name = model.name();
    let mut guard = pool.acquire().await?.detach();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(rebuild_lock_key(model))
        .fetch_one(&mut guard)
        .await?;
    if !locked {
        let _ = sqlx::Connection::close(guard).await;
        return Err(RebuildError::AlreadyRunning(name));
    }
    // We hold the lock, so a run still marked running lost its process (and its lock).
    sqlx::query(
        "UPDATE projection_rebuilds
            SET status = 'failed', finished_at = now(),
                error = 'interrupted: the process running it stopped'
          WHERE projection = $1 AND status = 'running'",
    )
    .bind(name)
    .execute(&mut guard)
    .await?;
    let run_id: i64 = sqlx::query_scalar(
        "INSERT INTO projection_rebuilds (projection, status) VALUES ($1, 'running') RETURNING id",
    )
    .bind(name)
    .fetch_one(&mut guard)
    .await?;
    Ok(Rebuild {
        pool: pool.clone(),
        model,
        guard,
        run_id,
        batch: BATCH,
    })
}

impl Rebuild {
    /// The read model being rebuilt.
    pub fn model(&self) -> ReadModel {
        self.model
    }

    /// The run's id in `projection_rebuilds`.
    pub fn run_id(&self) -> i64 {
        self.run_id
    }

    /// Replays `events` per transaction instead of the default (small batches let tests cross
    /// batch boundaries in the middle of a run).
    pub fn batch_size(mut self, events: i64) -> Self {
        self.batch = events.max(1);
        self
    }

    /// Replays and swaps, calling `progress` after each batch; records the outcome and
    /// releases the lock. Returns the events replayed.
    pub async fn run(self, progress: impl FnMut(Progress)) -> Result<u64, RebuildError> {
        run_all(vec![self], progress).await
    }
}

/// Performs several started rebuilds in **one** pass over the store: each batch is read and
/// decoded once and queued to every read model's private copy; each copy applies its queue on
/// a task of its own (one transaction per batch), while the next batches are read. Then each read model
/// is swapped in on its own, under its own exclusive lock. Records each run's outcome and
/// releases the locks; returns the store events replayed (per read model, the events of its
/// aggregate type). The first failure fails every run of the pass.
///
/// `apex rebuild --all` uses it; the batch size is the smallest of the rebuilds'.
pub async fn run_all(
    rebuilds: Vec<Rebuild>,
    mut progress: impl FnMut(Progress),
) -> Result<u64, RebuildError> {
    let Some(first) = rebuilds.first() else {
        return Ok(0);
    };
    let pool = first.pool.clone();
    let batch = rebuilds.iter().map(|r| r.batch).min().unwrap_or(BATCH);
    let models: Vec<ReadModel> = rebuilds.iter().map(|r| r.model).collect();
    let mut guards: Vec<(i64, PgConnection)> =
        rebuilds.into_iter().map(|r| (r.run_id, r.guard)).collect();
    let result = run(&pool, &models, &mut guards, batch, &mut progress).await;
    let (status, events, error) = match &result {
        Ok(n) => ("succeeded", Some(*n as i64), None),
        Err(e) => ("failed", None, Some(e.to_string())),
    };
    let mut recorded = Ok(());
    for (run_id, guard) in &mut guards {
        let update = sqlx::query(
            "UPDATE projection_rebuilds
                SET status = $2, events = COALESCE($3, events), error = $4, finished_at = now()
              WHERE id = $1",
        )
        .bind(*run_id)
        .bind(status)
        .bind(events)
        .bind(error.as_deref())
        .execute(&mut *guard)
        .await;
        if let Err(e) = update {
            recorded = Err(e);
        }
    }
    if result.is_err() {
        for model in &models {
            if let Err(e) =
                sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", schema(*model)))
                    .execute(&pool)
                    .await
            {
                tracing::error!(read_model = model.name(), error = %e, "dropping a failed rebuild's copy");
            }
        }
    }
    for (_, guard) in guards {
        let _ = sqlx::Connection::close(guard).await;
    }
    let events = result?;
    recorded?;
    Ok(events)
}

fn schema(model: ReadModel) -> String {
    format!("rebuild_{}", model.name())
}

fn rebuild_lock_key(model: ReadModel) -> i64 {
    model_lock_key(model) ^ 0x5245_4255_494c_4400 // "REBUILD"
}

/// One run of a rebuild, as recorded in `projection_rebuilds`.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct RebuildRun {
    /// The run's id.
    pub id: i64,
    /// The read model.
    pub projection: String,
    /// `running`, `succeeded`, `failed`, or `interrupted` (recorded as running, but its
    /// process died: nobody holds the lock any more).
    pub status: String,
    /// Events replayed (so far, while running).
    pub events: i64,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Why it failed.
    pub error: Option<String>,
}

/// The latest run of each read model that was ever rebuilt, by name.
///
/// A run recorded as `running` reads as `interrupted` when nobody holds its lock. The locks are
/// read before the runs (two statements, two snapshots): a run that finished in between
/// already reads as finished, and one that started in between is recognized by its start time.
pub async fn latest_runs(pool: &PgPool) -> Result<Vec<RebuildRun>, sqlx::Error> {
    // A bigint advisory key shows in pg_locks as classid (high half) and objid (low half).
    let (checked_at, held): (DateTime<Utc>, Vec<i64>) = sqlx::query_as(
        "SELECT clock_timestamp(),
                COALESCE((SELECT array_agg((l.classid::int8 << 32) | l.objid::int8)
                            FROM pg_locks l
                           WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                             AND l.database = (SELECT oid FROM pg_database
                                                WHERE datname = current_database())),
                         '{}')",
    )
    .fetch_one(pool)
    .await?;
    let running: Vec<&str> = ReadModel::ALL
        .iter()
        .filter(|m| held.contains(&rebuild_lock_key(**m)))
        .map(|m| m.name())
        .collect();
    sqlx::query_as(
        "SELECT DISTINCT ON (projection)
                id, projection,
                CASE WHEN status = 'running' AND NOT projection = ANY ($1) AND started_at < $2
                     THEN 'interrupted' ELSE status END AS status,
                events, started_at, finished_at, error
           FROM projection_rebuilds
          ORDER BY projection, started_at DESC, id DESC",
    )
    .bind(running)
    .bind(checked_at)
    .fetch_all(pool)
    .await
}

async fn run(
    pool: &PgPool,
    models: &[ReadModel],
    guards: &mut [(i64, PgConnection)],
    batch: i64,
    progress: &mut impl FnMut(Progress),
) -> Result<u64, RebuildError> {
    let mut types: Vec<&str> = models.iter().map(|m| m.aggregate_type()).collect();
    types.sort_unstable();
    types.dedup();
    let total: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = ANY($1)")
            .bind(&types)
            .fetch_one(pool)
            .await?;
    for model in models {
        prepare(pool, *model).await?;
    }
    let started = Instant::now();
    let mut checkpoint = (0i64, 0i64);
    let mut done = 0u64;
    let rate = |done: u64| Progress {
        done,
        total: total.max(0) as u64,
        per_second: done as f64 / started.elapsed().as_secs_f64().max(1e-9),
    };
    // Each copy applies the batches on a task of its own, in order, from a short queue; the
    // store is read and decoded ahead on this task. A copy does not wait for the others to
    // finish a batch before it takes the next: in lockstep, the slowest copy's end of every
    // batch left the other cores idle. Progress counts what every copy has applied.
    let applied: Vec<Arc<AtomicU64>> = models.iter().map(|_| Arc::default()).collect();
    let (queues, copies): (Vec<_>, Vec<_>) = models
        .iter()
        .zip(&applied)
        .map(|(model, applied)| {
            let (queue, mut batches) = mpsc::channel::<Arc<Events>>(BATCHES_AHEAD);
            let (pool, model, applied) = (pool.clone(), *model, applied.clone());
            let copy = tokio::spawn(async move {
                let mut offsets = batch::CopyOffsets::default();
                while let Some(events) = batches.recv().await {
                    apply_to_copy(&pool, model, &events, &mut offsets).await?;
                    applied.fetch_add(events.len() as u64, Ordering::Relaxed);
                }
                Ok(offsets)
            });
            (queue, copy)
        })
        .collect();
    let replayed = async {
        loop {
            let events = Arc::new(read(pool, &types, batch, &mut checkpoint).await?);
            let full = events.len() as i64 == batch;
            for queue in &queues {
                // A copy whose task ended has failed: its error is collected below.
                if queue.send(events.clone()).await.is_err() {
                    return Ok(());
                }
            }
            let done = applied
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .min()
                .unwrap_or(0);
            for (run_id, guard) in guards.iter_mut() {
                sqlx::query("UPDATE projection_rebuilds SET events = $2 WHERE id = $1")
                    .bind(*run_id)
                    .bind(done as i64)
                    .execute(&mut *guard)
                    .await?;
            }
            progress(rate(done));
            if !full {
                return Ok::<(), RebuildError>(());
            }
        }
    }
    .await;
    drop(queues);
    // Every copy's task ends before an error is returned: none may still write into a copy
    // that the failure handling drops.
    let mut offsets = Vec::with_capacity(copies.len());
    let mut failure = replayed.err();
    for copy in copies {
        match joined(copy.await) {
            Ok(done) => offsets.push(done),
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    done += applied
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .min()
        .unwrap_or(0);
    futures::future::try_join_all(
        models
            .iter()
            .zip(&offsets)
            .map(|(model, offsets)| finish_copy(pool, *model, offsets)),
    )
    .await?;
    drop(offsets);
    for model in models {
        // What was committed during the replay's end and the index builds is applied before
        // the swap takes the exclusive lock, so the swap itself has little left to apply.
        let mut checkpoint = checkpoint;
        done += catch_up(pool, *model, batch, &mut checkpoint).await?;
        done += swap(pool, *model, batch, checkpoint).await?;
    }
    progress(rate(done));
    Ok(done)
}

/// The outcome of a task of the replay; a panic in it resumes here.
fn joined<T>(
    outcome: Result<Result<T, RebuildError>, tokio::task::JoinError>,
) -> Result<T, RebuildError> {
    match outcome {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(RebuildError::Database(sqlx::Error::Protocol(format!(
            "rebuild: a replay task was cancelled: {e}"
        )))),
    }
}

/// Creates `model`'s private copy in schema `rebuild_<name>`: its tables (empty), its offsets
/// and its status row, all `UNLOGGED` (no WAL while they are filled; a crash empties them, and
/// a crashed rebuild's copy is dropped anyway). The read model's tables keep their columns,
/// defaults and constraints (primary keys included: the fold looks rows up by them) but not
/// their other indexes; [`finish_copy`] builds those and makes the tables logged before the
/// swap.
async fn prepare(pool: &PgPool, model: ReadModel) -> Result<(), RebuildError> {
    let schema = schema(model);
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut *tx)
        .await?;
    for table in model
        .tables()
        .iter()
        .chain(&["projector_offsets", "projector_status"])
    {
        sqlx::query(&format!(
            "CREATE UNLOGGED TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL)"
        ))
        .execute(&mut *tx)
        .await?;
    }
    for table in model.tables() {
        let secondary: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT quote_ident(c.relname) FROM pg_index i
               JOIN pg_class c ON c.oid = i.indexrelid
              WHERE i.indrelid = '{schema}.{table}'::regclass
                AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)"
        ))
        .fetch_all(&mut *tx)
        .await?;
        for index in secondary {
            sqlx::query(&format!("DROP INDEX {schema}.{index}"))
                .execute(&mut *tx)
                .await?;
        }
    }
    sqlx::query(&format!(
        "INSERT INTO {schema}.projector_status (projector) VALUES ($1)"
    ))
    .bind(model.name())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Makes `model`'s copy what the swap moves into `public`: its offsets written from memory,
/// each table `LOGGED`, with the public table's secondary indexes under their public names
/// (index names are per schema), and analyzed. After this the copy's tables are defined
/// exactly as the public ones.
async fn finish_copy(
    pool: &PgPool,
    model: ReadModel,
    offsets: &batch::CopyOffsets,
) -> Result<(), RebuildError> {
    let schema = schema(model);
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("SET LOCAL search_path = {schema}, public"))
        .execute(&mut *tx)
        .await?;
    batch::flush_offsets(&mut tx, model, offsets).await?;
    tx.commit().await?;
    let mut conn = pool.acquire().await?;
    sqlx::query("SET maintenance_work_mem = '256MB'")
        .execute(&mut *conn)
        .await?;
    let result = async {
        for table in model.tables() {
            sqlx::query(&format!("ALTER TABLE {schema}.{table} SET LOGGED"))
                .execute(&mut *conn)
                .await?;
            let definitions: Vec<String> = sqlx::query_scalar(&format!(
                "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i
                  WHERE i.indrelid = 'public.{table}'::regclass
                    AND NOT EXISTS (SELECT 1 FROM pg_constraint k
                                     WHERE k.conindid = i.indexrelid)
                  ORDER BY i.indexrelid"
            ))
            .fetch_all(&mut *conn)
            .await?;
            let public = format!(" ON public.{table} ");
            for definition in definitions {
                if !definition.contains(&public) {
                    return Err(RebuildError::Database(sqlx::Error::Protocol(format!(
                        "rebuild: unexpected index definition on {table}: {definition}"
                    ))));
                }
                let copy = definition.replacen(&public, &format!(" ON {schema}.{table} "), 1);
                sqlx::query(&copy).execute(&mut *conn).await?;
            }
            sqlx::query(&format!("ANALYZE {schema}.{table}"))
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
    .await;
    // The pooled connection goes back with the server's default again.
    let reset = sqlx::query("RESET maintenance_work_mem")
        .execute(&mut *conn)
        .await;
    result?;
    reset?;
    Ok(())
}

/// The columns a rebuild reads: [`crate::store::EVENT_COLUMNS`], but of the metadata only the
/// `traceparent` (the only part a read model keeps).
const REPLAY_COLUMNS: &str = "event_id, aggregate_type, aggregate_id, sequence, event_type, \
     event_version, payload, position, transaction_id::text::bigint AS transaction_id, \
     recorded_at, correlation_id, causation_id, principal, principal_role, \
     metadata->>'traceparent' AS traceparent";

/// A batch of the store, decoded. The events' `payload` is `Null`: it was moved into the
/// decoded event.
type Events = Vec<(StoredEvent, DomainEvent)>;

/// The next batch of the store after `checkpoint` (events of `types` only, below the horizon
/// of finished transactions, as the relay reads), decoded; moves `checkpoint`.
async fn read<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    types: &[&str],
    batch: i64,
    checkpoint: &mut (i64, i64),
) -> Result<Events, RebuildError> {
    read_from(conn, types, batch, checkpoint, Horizon::Settled).await
}

/// Which committed events a replay may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Horizon {
    /// Those below the snapshot horizon, as the relay reads (see [`crate::store`]): nothing
    /// can commit behind them later, and the live projectors have seen no event above it.
    Settled,
    /// Every committed one: only under the inline timeline's write lock, where no append is in
    /// progress and every committed event's row is in the table being replaced.
    All,
}

async fn read_from<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    types: &[&str],
    batch: i64,
    checkpoint: &mut (i64, i64),
    horizon: Horizon,
) -> Result<Events, RebuildError> {
    // The ORDER BY names the table's columns: a bare `transaction_id` would be the bigint
    // output column, which the (transaction_id, position) index cannot deliver, so every batch
    // would sort the whole rest of the store.
    let settled = match horizon {
        Horizon::Settled => "AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())",
        Horizon::All => "",
    };
    let sql = format!(
        "SELECT {REPLAY_COLUMNS} FROM events
          WHERE aggregate_type = ANY($1)
            AND (transaction_id, position) > ($2::text::xid8, $3)
            {settled}
          ORDER BY events.transaction_id, events.position
          LIMIT $4"
    );
    let rows = sqlx::query(&sql)
        .bind(types)
        .bind(checkpoint.0.to_string())
        .bind(checkpoint.1)
        .bind(batch)
        .fetch_all(conn)
        .await?;
    let events = decode_rows(rows)?;
    if let Some((last, _)) = events.last() {
        *checkpoint = (last.transaction_id, last.position);
    }
    Ok(events)
}

fn decode_rows(rows: Vec<sqlx::postgres::PgRow>) -> Result<Events, RebuildError> {
    use sqlx::Row;
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let mut stored = StoredEvent {
            event_id: row.try_get("event_id")?,
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            sequence: row.try_get("sequence")?,
            event_type: row.try_get("event_type")?,
            event_version: row.try_get("event_version")?,
            payload: row.try_get("payload")?,
            position: row.try_get("position")?,
            transaction_id: row.try_get("transaction_id")?,
            recorded_at: row.try_get("recorded_at")?,
            correlation_id: row.try_get("correlation_id")?,
            causation_id: row.try_get("causation_id")?,
            principal: row.try_get("principal")?,
            principal_role: row.try_get("principal_role")?,
            traceparent: row.try_get("traceparent")?,
        };
        drop(row);
        let event = stored.decode_taking_payload().map_err(|e| {
            RebuildError::Decode(
                format!("{}#{}", stored.aggregate_id, stored.sequence),
                e.to_string(),
            )
        })?;
        events.push((stored, event));
    }
    Ok(events)
}

/// Reads and decodes the whole store as a rebuild of every read model does, `batch` events at
/// a time, applying nothing; returns the events read. (The rebuild benchmark's ceiling.)
pub async fn read_only(pool: &PgPool, batch: i64) -> Result<u64, RebuildError> {
    let mut types: Vec<&str> = ReadModel::ALL.iter().map(|m| m.aggregate_type()).collect();
    types.sort_unstable();
    types.dedup();
    let mut checkpoint = (0i64, 0i64);
    let mut count = 0u64;
    loop {
        let events = read(pool, &types, batch.max(1), &mut checkpoint).await?;
        if events.is_empty() {
            return Ok(count);
        }
        count += events.len() as u64;
    }
}

/// Applies the events of `model`'s aggregate type among `events` to its copy during the
/// replay, in a transaction of its own: set-based with the copy's offsets in memory
/// ([`batch::apply_replay`]) when they continue their streams exactly, otherwise event by event
/// as the live projector does (the offsets written to the copy first and read back after).
async fn apply_to_copy(
    pool: &PgPool,
    model: ReadModel,
    events: &[(StoredEvent, DomainEvent)],
    offsets: &mut batch::CopyOffsets,
) -> Result<(), RebuildError> {
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "SET LOCAL search_path = {}, public",
        schema(model)
    ))
    .execute(&mut *tx)
    .await?;
    let mine: Vec<&(StoredEvent, DomainEvent)> = events
        .iter()
        .filter(|(s, _)| s.aggregate_type == model.aggregate_type())
        .collect();
    if model == ReadModel::Agents {
        for (stored, event) in mine {
            apply_one(&mut tx, model, stored, event).await?;
        }
    } else if !batch::apply_replay(&mut tx, model, mine.iter().map(|(s, e)| (s, e)), offsets)
        .await?
    {
        batch::flush_offsets(&mut tx, model, offsets).await?;
        for (stored, event) in mine {
            apply_one(&mut tx, model, stored, event).await?;
        }
        *offsets = batch::load_offsets(&mut tx, model).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Applies the events of `model`'s aggregate type among `events`: set-based when they continue
/// their streams exactly, otherwise event by event as the live projector does (duplicates
/// skipped, gaps repaired).
async fn apply_events(
    conn: &mut PgConnection,
    model: ReadModel,
    events: &[(StoredEvent, DomainEvent)],
) -> Result<(), RebuildError> {
    let mine: Vec<&(StoredEvent, DomainEvent)> = events
        .iter()
        .filter(|(s, _)| s.aggregate_type == model.aggregate_type())
        .collect();
    if model == ReadModel::Agents
        || !batch::apply(conn, &[model], mine.iter().map(|(s, e)| (s, e))).await?
    {
        for (stored, event) in mine {
            apply_one(conn, model, stored, event).await?;
        }
    }
    Ok(())
}

/// Applies to `model`'s copy what was committed after `checkpoint`, a transaction per batch,
/// without the read model's lock; moves `checkpoint`. Returns the events applied.
async fn catch_up(
    pool: &PgPool,
    model: ReadModel,
    batch: i64,
    checkpoint: &mut (i64, i64),
) -> Result<u64, RebuildError> {
    let schema = schema(model);
    let mut done = 0;
    loop {
        let mut tx = pool.begin().await?;
        let applied =
            replay_batch(&mut tx, model, &schema, batch, checkpoint, Horizon::Settled).await?;
        tx.commit().await?;
        done += applied.events;
        if !applied.full {
            return Ok(done);
        }
    }
}

/// Swaps `model`'s copy in, in one transaction under its exclusive lock: applies what was
/// committed after `checkpoint`, then replaces the public tables and the projector's offsets.
/// Returns the events applied in the catch-up.
async fn swap(
    pool: &PgPool,
    model: ReadModel,
    batch: i64,
    mut checkpoint: (i64, i64),
) -> Result<u64, RebuildError> {
    let schema = schema(model);
    let mut done = 0;
    let mut tx = pool.begin().await?;
    let horizon = if ProjectorGroup::of(model).is_some() {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(model_lock_key(model))
            .execute(&mut *tx)
            .await?;
        Horizon::Settled
    } else {
        for table in model.tables() {
            sqlx::query(&format!(
                "LOCK TABLE public.{table} IN SHARE ROW EXCLUSIVE MODE"
            ))
            .execute(&mut *tx)
            .await?;
        }
        Horizon::All
    };
    loop {
        let applied =
            replay_batch(&mut tx, model, &schema, batch, &mut checkpoint, horizon).await?;
        done += applied.events;
        if !applied.full {
            break;
        }
    }
    sqlx::query("SET LOCAL search_path = public")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM public.projector_offsets WHERE projector = $1")
        .bind(model.name())
        .execute(&mut *tx)
        .await?;
    if ProjectorGroup::of(model).is_some() {
        sqlx::query(&format!(
            "INSERT INTO public.projector_offsets SELECT * FROM {schema}.projector_offsets"
        ))
        .execute(&mut *tx)
        .await?;
    }
    for table in model.tables() {
        // `LIKE` copies no privileges: those granted on the table being replaced are granted
        // on its copy, so a role that reads the read model (the API's, a report's) still can.
        let grants: Vec<String> = sqlx::query_scalar(
            "SELECT format('GRANT %s ON %s TO %s%s', a.privilege_type, $2::text,
                           CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END,
                           CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
               FROM pg_class c
              CROSS JOIN LATERAL aclexplode(c.relacl) a
               LEFT JOIN pg_roles r ON r.oid = a.grantee
              WHERE c.oid = $1::regclass AND a.grantee <> c.relowner",
        )
        .bind(format!("public.{table}"))
        .bind(format!("{schema}.{table}"))
        .fetch_all(&mut *tx)
        .await?;
        for grant in grants {
            sqlx::query(&grant).execute(&mut *tx).await?;
        }
        sqlx::query(&format!("DROP TABLE public.{table}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("ALTER TABLE {schema}.{table} SET SCHEMA public"))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(done)
}

struct Batch {
    events: u64,
    full: bool,
}

/// Applies the next batch of the store after `checkpoint` to the copy in `schema`.
async fn replay_batch(
    conn: &mut PgConnection,
    model: ReadModel,
    schema: &str,
    batch: i64,
    checkpoint: &mut (i64, i64),
    horizon: Horizon,
) -> Result<Batch, RebuildError> {
    sqlx::query(&format!("SET LOCAL search_path = {schema}, public"))
        .execute(&mut *conn)
        .await?;
    // Only the read model's aggregate type: the checkpoint moves over the rest unread.
    let events = read_from(
        &mut *conn,
        &[model.aggregate_type()],
        batch,
        checkpoint,
        horizon,
    )
    .await?;
    let full = events.len() as i64 == batch;
    apply_events(conn, model, &events).await?;
    Ok(Batch {
        events: events.len() as u64,
        full,
    })
}
