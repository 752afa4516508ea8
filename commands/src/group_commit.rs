//! Group commit: the appends of concurrent commands share one transaction.
//!
//! postgres-es runs one transaction per command: `BEGIN`, one `INSERT` per event, the snapshot
//! statement, `COMMIT`. Under load most of PostgreSQL's time goes to those round trips and
//! their commits, not to the rows. [`GroupCommitRepository`] keeps postgres-es for every read
//! and replaces its append: each `persist` call queues its events (and snapshot update) and
//! waits; one writer, on a thread of its own, takes whatever is queued (up to
//! [`MAX_BATCH_EVENTS`]) and appends it in one transaction — one statement inserting the events
//! and the inline timeline's rows ([`crate::inline`]) and writing the snapshots, committed as
//! it returns, so a batch costs one round trip — then answers every caller. While one batch
//! commits the next one gathers in the queue, so batches grow with the load and a lone command
//! waits for nobody. One writer, not several: concurrent batches split the same commands into
//! smaller transactions that compete for the same two cores and WAL flushes, and measured
//! slower (docs/benchmarks.md, change 54).
//!
//! Each command is still decided alone, on its own state, and answered only after the shared
//! commit. What a batch must not do is let one command's failure fail the others: when the
//! batch transaction fails for a reason that belongs to a statement (a primary-key conflict —
//! another process appended first —, a reused idempotency key, text PostgreSQL cannot store, a
//! snapshot that moved), every request of the batch is appended again in a transaction of its
//! own, so each gets exactly the answer it would have got alone. When the database is
//! unreachable, every request gets that answer at once.
//!
//! The writer appends on a connection of its own, outside the pool: a pooled connection costs
//! a check (a round trip) when it is taken and another when it is given back, twice the
//! batch's own statement. A connection that died since its last use, or that fails under a
//! statement, leaves the outcome unknown — the statement may not have reached PostgreSQL, or
//! may have committed with only the answer lost. The writer then reconnects and looks the
//! batch's events up by their command's causation id: a request whose events are stored is
//! answered as appended, the others are appended again. Should the lost statement still be
//! running, the `events` primary key makes the second append wait for it and then refuse it,
//! and the lookup is repeated, so a command is never stored twice nor reported lost when it
//! was stored. A second connection failure answers `service_unavailable`.
//!
//! Each event's hash (the tamper-evidence chain, docs/operations/audit.md) is computed by the
//! append statement itself, set-based, from the hash of the stream's previous event. The writer
//! knows that hash for every stream whose last event it committed (the statement returns the
//! hashes it stored, and [`Heads`] keeps them); for any other event the statement leaves the hash
//! empty and the `events_before_insert` trigger looks the predecessor up and computes it, as it
//! does for every row inserted by other means. The per-row trigger and its lookup were the
//! largest part of an append's time in PostgreSQL (docs/benchmarks.md, change 51).
//!
//! The checks are the store's own, as before: the `(aggregate_type, aggregate_id, sequence)`
//! primary key catches a concurrent append, and a snapshot update that matches no row (another
//! writer moved it) is a conflict — checked inside the statement, which then fails, so nothing
//! of the batch lands.
//! Requests are sorted by aggregate before the insert, so two processes' batches over the same
//! aggregates take their row locks in the same order.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cqrs_es::Aggregate;
use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool, Row};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::error::is_unavailable;
use crate::inline::TimelineRow;

/// Most events appended in one transaction.
pub const MAX_BATCH_EVENTS: usize = 1024;

/// Requests that may wait for the writer before `persist` callers wait to queue.
const QUEUE: usize = 4096;

/// Streams whose last committed hash the writer remembers (see [`Heads`]).
const KNOWN_HEADS: usize = 50_000;

/// How long the writer waits for a new connection before answering that the store is
/// unavailable (the pool's acquire timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A snapshot change: (aggregate id, state, snapshot counter after the append).
type SnapshotUpdate = (String, Value, usize);

/// One command's append.
struct Append {
    aggregate_type: &'static str,
    events: Vec<SerializedEvent>,
    /// The inline timeline's rows of `events` (see [`crate::inline`]).
    timeline: Vec<TimelineRow>,
    snapshot: Option<SnapshotUpdate>,
    reply: oneshot::Sender<Result<(), PersistenceError>>,
    /// An attempt that held this request failed with its connection: it may be stored.
    uncertain: bool,
}

/// A postgres-es repository whose appends are group-committed (see the module docs).
pub struct GroupCommitRepository {
    reads: PostgresEventRepository,
    options: PgConnectOptions,
    queue: OnceLock<mpsc::Sender<Append>>,
}

/// The sequence and hash of the last event of the streams the writer appended to, as its
/// append statements returned them after commit.
///
/// An entry is a stored fact: events are immutable, so the event at that sequence has that
/// hash for good. It only stops being the stream's head when another process appends; then
/// the next append here carries a sequence the entry does not precede, finds no predecessor
/// hash, and the trigger looks the predecessor up. A wrong hash can therefore never be chained
/// from here. Bounded: when full, an arbitrary tenth is forgotten (those streams fall back to
/// the lookup once).
#[derive(Default)]
struct Heads {
    known: HashMap<(&'static str, String), Head>,
}

/// A stream's last committed event.
#[derive(Clone, Copy)]
struct Head {
    sequence: i64,
    hash: [u8; 32],
}

impl Heads {
    /// The hash of `aggregate`'s event at `sequence`, when it is the last one committed here.
    fn hash(&self, kind: &'static str, aggregate_id: &str, sequence: i64) -> Option<[u8; 32]> {
        self.known
            .get(&(kind, aggregate_id.to_owned()))
            .filter(|head| head.sequence == sequence)
            .map(|head| head.hash)
    }

    /// Remembers the events an append stored (rows of its `RETURNING`).
    fn remember(&mut self, stored: impl IntoIterator<Item = ((&'static str, String), Head)>) {
        let known = &mut self.known;
        for (stream, head) in stored {
            if known.len() >= KNOWN_HEADS && !known.contains_key(&stream) {
                let victims: Vec<_> = known.keys().take(KNOWN_HEADS / 10).cloned().collect();
                for victim in victims {
                    known.remove(&victim);
                }
            }
            let entry = known.entry(stream).or_insert(head);
            if head.sequence > entry.sequence {
                *entry = head;
            }
        }
    }
}

impl GroupCommitRepository {
    /// A repository over the `events` and `snapshots` tables of `pool`: reads go through the
    /// pool, the writer opens a connection of its own with the pool's options.
    pub fn new(pool: PgPool) -> Self {
        Self {
            options: (*pool.connect_options()).clone(),
            reads: PostgresEventRepository::new(pool),
            queue: OnceLock::new(),
        }
    }

    /// The queue to the writer, started on first use (inside the caller's runtime).
    fn queue(&self) -> &mpsc::Sender<Append> {
        self.queue.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(QUEUE);
            start_writer(&self.options, receiver);
            sender
        })
    }
}

impl PersistedEventRepository for GroupCommitRepository {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.reads.get_events::<A>(aggregate_id).await
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.reads
            .get_last_events::<A>(aggregate_id, last_sequence)
            .await
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        self.reads.get_snapshot::<A>(aggregate_id).await
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<SnapshotUpdate>,
    ) -> Result<(), PersistenceError> {
        if events.is_empty() && snapshot_update.is_none() {
            return Ok(());
        }
        // Computed here, in the command's task, rather than in the writer every command
        // waits for.
        let timeline = crate::inline::timeline_rows(A::TYPE, events)?;
        let (reply, answer) = oneshot::channel();
        let append = Append {
            aggregate_type: A::TYPE,
            events: events.to_vec(),
            timeline,
            snapshot: snapshot_update,
            reply,
            uncertain: false,
        };
        self.queue()
            .send(append)
            .await
            .map_err(|_| stopped("the append writer stopped"))?;
        metrics::counter!("apex_append_requests_total").increment(1);
        answer
            .await
            .map_err(|_| stopped("the append writer stopped before answering"))?
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        self.reads.stream_events::<A>(aggregate_id).await
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        self.reads.stream_all_events::<A>().await
    }
}

fn stopped(what: &'static str) -> PersistenceError {
    PersistenceError::UnknownError(what.into())
}

/// The writer's connection, opened when first needed and dropped when it fails, and the heads
/// of the streams it appended to.
struct Writer {
    options: PgConnectOptions,
    conn: Option<PgConnection>,
    heads: Heads,
}

/// `conn`, or a new connection with `options` when there is none.
async fn connection<'c>(
    conn: &'c mut Option<PgConnection>,
    options: &PgConnectOptions,
) -> Result<&'c mut PgConnection, sqlx::Error> {
    let open = match conn.take() {
        Some(open) => open,
        None => tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options))
            .await
            .map_err(|_| {
                sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connecting to PostgreSQL timed out",
                ))
            })??,
    };
    Ok(conn.insert(open))
}

impl Writer {
    async fn connection(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        connection(&mut self.conn, &self.options).await
    }

    /// Forgets the connection after it failed.
    fn failed(&mut self, error: &sqlx::Error) {
        if is_unavailable(error) {
            self.conn = None;
        }
    }

    /// The positions in `requests` of those whose first event is stored under their own
    /// command (the same aggregate, sequence and causation id).
    async fn stored(&mut self, requests: &[Append]) -> Result<HashSet<usize>, sqlx::Error> {
        let firsts: Vec<_> = requests
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.events.first().map(|e| (i, r.aggregate_type, e)))
            .collect();
        let result = match self.connection().await {
            Ok(conn) => {
                sqlx::query_scalar::<_, i64>(
                    "SELECT k.i FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[],
                                           $5::text[]) AS k(i, kind, id, seq, causation)
                       JOIN events e ON e.aggregate_type = k.kind AND e.aggregate_id = k.id
                                    AND e.sequence = k.seq AND e.causation_id::text = k.causation",
                )
                .bind(firsts.iter().map(|f| f.0 as i64).collect::<Vec<_>>())
                .bind(firsts.iter().map(|f| f.1).collect::<Vec<_>>())
                .bind(
                    firsts
                        .iter()
                        .map(|f| f.2.aggregate_id.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    firsts
                        .iter()
                        .map(|f| f.2.sequence as i64)
                        .collect::<Vec<_>>(),
                )
                .bind(
                    firsts
                        .iter()
                        .map(|f| {
                            f.2.metadata
                                .get("causation_id")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                        })
                        .collect::<Vec<_>>(),
                )
                .fetch_all(conn)
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            self.failed(e);
        }
        Ok(result?.into_iter().map(|i| i as usize).collect())
    }
}

/// Runs the writer on a thread of its own, with a single-threaded runtime that owns its
/// connection. The writer is the one serial stage every command waits for: on the shared
/// runtime, the wake-up after PostgreSQL answers a batch queues behind whatever HTTP work the
/// workers have; a thread that sleeps in the kernel until its socket is readable is scheduled
/// at once (docs/benchmarks.md, change 44). The thread ends with the queue (when the
/// repository is dropped). Should the thread not start, the writer runs on the shared
/// runtime, and the error says so.
fn start_writer(options: &PgConnectOptions, queue: mpsc::Receiver<Append>) {
    let writer = Writer {
        options: options.clone(),
        conn: None,
        heads: Heads::default(),
    };
    // The writer and its queue are handed over once the thread runs, so a thread that cannot
    // be started leaves them here for the fallback.
    let (handover, handed) = std::sync::mpsc::sync_channel::<(Writer, mpsc::Receiver<Append>)>(1);
    let started = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|runtime| {
            std::thread::Builder::new()
                .name("append-writer".to_owned())
                .spawn(move || {
                    if let Ok((writer, queue)) = handed.recv() {
                        runtime.block_on(write(writer, queue));
                    }
                })
        });
    match started {
        Ok(_) => {
            // The thread holds the receiving end until it has taken the writer.
            let _ = handover.send((writer, queue));
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start the append writer thread; it runs on the shared runtime (slower under load)");
            tokio::spawn(write(writer, queue));
        }
    }
}

/// Takes batches off the queue and appends them until every sender is gone.
async fn write(mut writer: Writer, mut queue: mpsc::Receiver<Append>) {
    loop {
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut events = first.events.len();
        let mut batch = vec![first];
        while events < MAX_BATCH_EVENTS {
            let Ok(next) = queue.try_recv() else { break };
            events += next.events.len();
            batch.push(next);
        }
        let started = std::time::Instant::now();
        append_batch(&mut writer, batch).await;
        metrics::histogram!("apex_append_batch_seconds").record(started.elapsed().as_secs_f64());
    }
}

/// Appends `batch` in one transaction, or each request alone when the batch fails for a
/// reason that may belong to one of them.
async fn append_batch(writer: &mut Writer, mut batch: Vec<Append>) {
    metrics::histogram!("apex_append_batch_commands").record(batch.len() as f64);
    if batch.len() > 1 {
        batch.sort_by(|a, b| {
            (a.aggregate_type, aggregate_id(a)).cmp(&(b.aggregate_type, aggregate_id(b)))
        });
        match append_settled(writer, &mut batch).await {
            Ok(()) => {
                for request in batch {
                    let _ = request.reply.send(Ok(()));
                }
                return;
            }
            Err(Failure::Database(e)) if crate::error::is_unavailable(&e) => {
                tracing::warn!(error = %e, commands = batch.len(), "group append failed: the database is unavailable");
                let shared = Arc::new(e);
                for request in batch {
                    let _ = request
                        .reply
                        .send(Err(PersistenceError::ConnectionError(Box::new(
                            SharedError(shared.clone()),
                        ))));
                }
                return;
            }
            Err(e) => {
                // Expected under contention (another process appended first): each request
                // is appended alone so only the one it concerns fails.
                tracing::debug!(error = %e, commands = batch.len(), "group append failed; appending its commands one by one");
                metrics::counter!("apex_append_batch_split_total").increment(1);
            }
        }
    }
    for request in batch {
        let mut alone = vec![request];
        let result = append_settled(writer, &mut alone)
            .await
            .map_err(Failure::into_persistence);
        // A request found stored was answered (and taken out) on the way.
        if let Some(request) = alone.pop() {
            let _ = request.reply.send(result);
        }
    }
}

/// Appends `requests` in one transaction, settling an unknown outcome (see the module docs):
/// requests found stored are answered and taken out of `requests` on the way; the error is
/// that of the rest.
async fn append_settled(writer: &mut Writer, requests: &mut Vec<Append>) -> Result<(), Failure> {
    let mut connection_failures = 0;
    loop {
        if requests.is_empty() {
            return Ok(());
        }
        // Failing to connect sends nothing: that outcome is known.
        let conn = connection(&mut writer.conn, &writer.options).await?;
        let error = match append(conn, &mut writer.heads, requests).await {
            Ok(()) => return Ok(()),
            Err(Failure::Database(e)) => {
                writer.failed(&e);
                e
            }
            Err(other) => return Err(other),
        };
        let lost = is_unavailable(&error);
        if lost {
            connection_failures += 1;
            for request in requests.iter_mut() {
                request.uncertain = true;
            }
            if connection_failures > 1 {
                tracing::warn!(error = %error, commands = requests.len(), "append failed on a new connection too: its outcome is unknown");
                return Err(error.into());
            }
            tracing::warn!(error = %error, commands = requests.len(), "append failed with its connection; settling it on a new one");
            metrics::counter!("apex_append_unsettled_total").increment(1);
        } else if !(is_unique_violation(&error) && requests.iter().any(|r| r.uncertain)) {
            return Err(error.into());
        }
        // Which of them did land (by the lost statement, committed after all)?
        let stored = match writer.stored(requests).await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look up an append whose outcome is unknown");
                return Err(error.into());
            }
        };
        if stored.is_empty() && !lost {
            // The conflict is another writer's.
            return Err(error.into());
        }
        let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(requests)
            .into_iter()
            .enumerate()
            .partition(|(i, _)| stored.contains(i));
        if !done.is_empty() {
            tracing::info!(
                commands = done.len(),
                "appends found stored after their connection failed"
            );
        }
        for (_, request) in done {
            let _ = request.reply.send(Ok(()));
        }
        *requests = rest.into_iter().map(|(_, r)| r).collect();
    }
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().is_some_and(|c| c == "23505"))
}

fn aggregate_id(append: &Append) -> &str {
    append
        .events
        .first()
        .map(|e| e.aggregate_id.as_str())
        .or(append.snapshot.as_ref().map(|(id, _, _)| id.as_str()))
        .unwrap_or("")
}

/// Why an append transaction failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// A statement or the connection failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A snapshot update matched no row: another writer moved the snapshot.
    #[error("a snapshot changed concurrently")]
    SnapshotMoved,
}

impl Failure {
    /// The answer postgres-es gives for the same failure.
    fn into_persistence(self) -> PersistenceError {
        match self {
            Failure::SnapshotMoved => PersistenceError::OptimisticLockError,
            Failure::Database(e) if is_unique_violation(&e) => {
                PersistenceError::OptimisticLockError
            }
            Failure::Database(e @ (sqlx::Error::Io(_) | sqlx::Error::Tls(_))) => {
                PersistenceError::ConnectionError(Box::new(e))
            }
            Failure::Database(e) => PersistenceError::UnknownError(Box::new(e)),
        }
    }
}

/// A database failure shared by every request of a failed batch.
#[derive(Debug)]
pub(crate) struct SharedError(pub(crate) Arc<sqlx::Error>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

/// One transaction: every event of `requests`, then their snapshot changes.
async fn append(
    conn: &mut PgConnection,
    heads: &mut Heads,
    requests: &[Append],
) -> Result<(), Failure> {
    let count: usize = requests.iter().map(|r| r.events.len()).sum();
    let (mut types, mut ids, mut sequences, mut names, mut versions, mut payloads, mut metadata) = (
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
    );
    let mut event_ids = Vec::with_capacity(count);
    // The predecessor's hash of each event, where the writer committed it: the first event of a
    // request whose stream's head is known. `None` leaves the hash to the trigger.
    let mut predecessors: Vec<Option<[u8; 32]>> = Vec::with_capacity(count);
    let mut lookups = 0u64;
    let mut created = Snapshots::default();
    let mut moved = Snapshots::default();
    let mut timeline = TimelineColumns::default();
    for request in requests {
        for row in &request.timeline {
            timeline.push(row);
        }
        for (n, event) in request.events.iter().enumerate() {
            let sequence = event.sequence as i64;
            let predecessor = if n == 0 && sequence > 1 {
                heads.hash(request.aggregate_type, &event.aggregate_id, sequence - 1)
            } else {
                None
            };
            if predecessor.is_none() && sequence > 1 {
                lookups += 1;
            }
            predecessors.push(predecessor);
            event_ids.push(Uuid::new_v4());
            types.push(request.aggregate_type);
            ids.push(event.aggregate_id.as_str());
            sequences.push(sequence);
            names.push(event.event_type.as_str());
            versions.push(event.event_version.as_str());
            payloads.push(&event.payload);
            metadata.push(&event.metadata);
        }
        if let Some((id, state, snapshot)) = &request.snapshot {
            let last = request.events.last().map_or(0, |e| e.sequence as i64);
            let target = if *snapshot == 1 {
                &mut created
            } else {
                &mut moved
            };
            target.push(request.aggregate_type, id, last, *snapshot as i64, state);
        }
    }
    if lookups > 0 {
        metrics::counter!("apex_append_hash_lookups_total").increment(lookups);
    }
    let predecessors: Vec<Option<&[u8]>> = predecessors
        .iter()
        .map(|prev| prev.as_ref().map(<[u8; 32]>::as_slice))
        .collect();
    // The events, the snapshots and the inline timeline's rows go in one statement, committed
    // when it returns: one round trip. A batch that moves snapshots checks the moves in that
    // statement ([`APPEND_MOVING`]); the others use the shorter [`APPEND`].
    let moving = !moved.ids.is_empty();
    let mut appended = sqlx::query(if moving { APPEND_MOVING } else { APPEND })
        .bind(&types)
        .bind(&ids)
        .bind(&sequences)
        .bind(&names)
        .bind(&versions)
        .bind(&payloads)
        .bind(&metadata)
        .bind(&event_ids)
        .bind(&predecessors)
        .bind(&created.types)
        .bind(&created.ids)
        .bind(&created.last)
        .bind(&created.counter)
        .bind(&created.states)
        .bind(&timeline.ids)
        .bind(&timeline.sequences)
        .bind(&timeline.owners)
        .bind(&timeline.kinds)
        .bind(&timeline.displays)
        .bind(&timeline.traces);
    if moving {
        appended = appended
            .bind(&moved.types)
            .bind(&moved.ids)
            .bind(&moved.last)
            .bind(&moved.counter)
            .bind(&moved.states);
    }
    let stored = match appended.fetch_all(conn).await {
        Ok(rows) => rows,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(SNAPSHOT_MOVED) => {
            return Err(Failure::SnapshotMoved);
        }
        Err(e) => return Err(e.into()),
    };
    // Committed: every stored hash is now a fact the next append of its stream can chain to.
    // Nothing here may fail the append any more; a row that cannot be read is only not
    // remembered (its stream's next append looks the predecessor up).
    let mut known = Vec::with_capacity(stored.len());
    for row in &stored {
        match stored_head(row, requests) {
            Ok(head) => known.push(head),
            Err(e) => {
                tracing::error!(error = %e, "cannot read an appended event's hash back; its stream's next append looks it up")
            }
        }
    }
    heads.remember(known);
    Ok(())
}

/// The stream and head of one row the append statement returned.
fn stored_head(
    row: &sqlx::postgres::PgRow,
    requests: &[Append],
) -> Result<((&'static str, String), Head), sqlx::Error> {
    let kind: String = row.try_get(0)?;
    let kind = requests
        .iter()
        .map(|r| r.aggregate_type)
        .find(|t| *t == kind)
        .ok_or_else(|| sqlx::Error::Protocol(format!("aggregate type {kind} not in the batch")))?;
    let hash: Vec<u8> = row.try_get(3)?;
    let hash = <[u8; 32]>::try_from(hash.as_slice())
        .map_err(|_| sqlx::Error::Protocol(format!("a {}-byte hash", hash.len())))?;
    let head = Head {
        sequence: row.try_get(2)?,
        hash,
    };
    Ok(((kind, row.try_get(1)?), head))
}

/// The events, the new snapshots and the inline timeline's rows of a batch, as `WITH` clauses.
///
/// An event's metadata columns and hash are computed here, set-based, by the expressions of
/// the `events_before_insert` trigger (migrations/20261206000011_append_trigger_once_per_event.sql):
/// the hash where the predecessor's is known (`$9`, see [`Heads`]) or the event opens its
/// stream. The other events get no hash, which makes the trigger (`WHEN (NEW.hash IS NULL)`)
/// fill them, predecessor looked up. `recorded_at` is the transaction's `now()`, hashed as the
/// trigger hashes it.
///
/// A timeline row's `at` is its event's `recorded_at` (both the transaction's `now()`); a run's
/// owner is its creation's, in the same append or stored.
macro_rules! batch_clauses {
    () => {
        r"WITH appended AS (
             INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, payload, metadata, event_id, recorded_at,
                                 correlation_id, causation_id, principal, principal_role, hash)
             SELECT e.kind, e.id, e.seq, e.name, e.version, e.payload, e.metadata, e.event_id,
                    now(), (e.metadata ->> 'correlation_id')::uuid,
                    (e.metadata ->> 'causation_id')::uuid, e.metadata ->> 'principal',
                    e.metadata ->> 'principal_role',
                    CASE WHEN e.seq = 1 OR e.prev IS NOT NULL THEN sha256(
                        coalesce(e.prev, '\x'::bytea)
                        || convert_to(
                            concat_ws(E'\x1f',
                                e.kind, e.id, e.seq::text, e.name, e.version, e.event_id::text,
                                e.payload::text, e.metadata::text,
                                extract(epoch FROM now())::numeric::text),
                            'UTF8'))
                    END
               FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                           $6::jsonb[], $7::jsonb[], $8::uuid[], $9::bytea[])
                    AS e(kind, id, seq, name, version, payload, metadata, event_id, prev)
             RETURNING aggregate_type, aggregate_id, sequence, hash),
         snapshotted AS (
             INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence,
                                    current_snapshot, payload)
             SELECT * FROM unnest($10::text[], $11::text[], $12::bigint[], $13::bigint[],
                                  $14::jsonb[])),
         timeline AS (
             INSERT INTO rm_timeline (instance_id, sequence, owner_id, kind, at, display,
                                      traceparent)
             SELECT t.id, t.seq,
                    COALESCE(t.owner, (SELECT r.owner_id FROM rm_timeline r
                                        WHERE r.instance_id = t.id AND r.sequence = 1)),
                    t.kind, now(), t.display, t.trace
               FROM unnest($15::uuid[], $16::bigint[], $17::text[], $18::text[], $19::jsonb[],
                           $20::text[]) AS t(id, seq, owner, kind, display, trace))"
    };
}

/// What an append answers: the events it stored, to chain the next append of each stream to.
macro_rules! stored {
    () => {
        "
     SELECT aggregate_type, aggregate_id, sequence, hash FROM appended"
    };
}

/// A batch's append when no snapshot moves.
const APPEND: &str = concat!(batch_clauses!(), stored!());

/// A batch's append that moves snapshots: each `UPDATE` matches only while the snapshot's
/// counter is still the one its command read; when fewer rows matched than the batch moves,
/// `append_snapshot_moved` fails the statement (SQLSTATE [`SNAPSHOT_MOVED`]), so nothing of
/// the batch lands.
const APPEND_MOVING: &str = concat!(
    batch_clauses!(),
    ",
     moved AS (
         UPDATE snapshots s
            SET last_sequence = u.last, current_snapshot = u.counter, payload = u.state
           FROM unnest($21::text[], $22::text[], $23::bigint[], $24::bigint[], $25::jsonb[])
                AS u(aggregate_type, aggregate_id, last, counter, state)
          WHERE s.aggregate_type = u.aggregate_type AND s.aggregate_id = u.aggregate_id
            AND s.current_snapshot = u.counter - 1
         RETURNING 1)",
    stored!(),
    "
     UNION ALL
     SELECT NULL, NULL, NULL, NULL
       FROM (SELECT count(*) AS count FROM moved) m
      WHERE m.count <> cardinality($22::text[])
        AND append_snapshot_moved(m.count, cardinality($22::text[])) IS NULL"
);

/// The SQLSTATE of `append_snapshot_moved`: a batch's snapshot update matched fewer rows
/// than it moves (`migrations/20261206000012_append_snapshot_check.sql`).
const SNAPSHOT_MOVED: &str = "AXS01";

/// Snapshot changes of one kind, as columns.
#[derive(Default)]
struct Snapshots<'a> {
    types: Vec<&'static str>,
    ids: Vec<&'a str>,
    last: Vec<i64>,
    counter: Vec<i64>,
    states: Vec<&'a Value>,
}

impl<'a> Snapshots<'a> {
    fn push(&mut self, kind: &'static str, id: &'a str, last: i64, counter: i64, state: &'a Value) {
        self.types.push(kind);
        self.ids.push(id);
        self.last.push(last);
        self.counter.push(counter);
        self.states.push(state);
    }
}

/// The inline timeline's rows of a batch, as columns.
#[derive(Default)]
struct TimelineColumns<'a> {
    ids: Vec<uuid::Uuid>,
    sequences: Vec<i64>,
    owners: Vec<Option<&'a str>>,
    kinds: Vec<&'static str>,
    displays: Vec<&'a Value>,
    traces: Vec<Option<&'a str>>,
}

impl<'a> TimelineColumns<'a> {
    fn push(&mut self, row: &'a TimelineRow) {
        self.ids.push(row.instance_id);
        self.sequences.push(row.sequence);
        self.owners.push(row.owner_id.as_deref());
        self.kinds.push(row.kind);
        self.displays.push(&row.display);
        self.traces.push(row.traceparent.as_deref());
    }
}
