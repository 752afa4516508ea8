//! The projector runtime: consumes one read model's queue and applies events exactly once.
//!
//! * Idempotent: `projector_offsets` holds, per aggregate, the last sequence applied, updated in
//!   the same transaction as the read model. An event at or below it is acknowledged and skipped.
//! * Gap repair: an event above it + 1 first pulls the missing events from the event store.
//! * Batching: deliveries already waiting are applied in one transaction, acks are sent with
//!   `multiple`. If the batch fails, each event is retried on its own.
//! * Failures: transient database errors are retried with backoff, indefinitely (nothing can be
//!   projected while the database is away). Any other failure is retried a few times, then the
//!   message is dead-lettered (table `dead_letters` and queue `<queue>.dlq`, with the reason),
//!   the aggregate's offset moves past it, and the projector carries on.

use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use tracing::Instrument;

use crate::amqp::{self, AmqpConfig, Backoff, BusError};
use crate::chat::ChatUpdate;
use crate::envelope::{CloudEvent, DomainEvent, StoredEvent};
use crate::read_models::ReadModel;
use crate::store;

/// Projector settings.
#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// Broker and exchange.
    pub amqp: AmqpConfig,
    /// Queue name prefix; the queue is `<prefix>.<read model>`.
    pub queue_prefix: String,
    /// Unacknowledged messages the broker may push.
    pub prefetch: u16,
    /// Most events applied in one transaction.
    pub batch_size: usize,
    /// Attempts for a non-transient failure before dead-lettering.
    pub max_attempts: u32,
}

impl ProjectorConfig {
    /// Defaults for `amqp`.
    pub fn new(amqp: AmqpConfig) -> Self {
        Self {
            amqp,
            queue_prefix: "apex.projector".to_owned(),
            prefetch: 512,
            batch_size: 256,
            max_attempts: 3,
        }
    }

    /// The queue of `model`.
    pub fn queue(&self, model: ReadModel) -> String {
        format!("{}.{}", self.queue_prefix, model.name())
    }
}

/// Why a projector session ended.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    /// The broker failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The database failed.
    #[error("projector database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl From<lapin::Error> for ProjectorError {
    fn from(e: lapin::Error) -> Self {
        Self::Bus(BusError::from(e))
    }
}

/// What happened to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied, after `repaired` missing events were pulled from the store.
    Applied {
        /// Events read from the store to fill a gap.
        repaired: usize,
    },
    /// Already applied: a duplicate or a late, out-of-order delivery.
    Skipped,
}

/// Declares the projector's queue (bound to its routing keys) and its dead-letter queue.
pub async fn declare(
    channel: &Channel,
    config: &ProjectorConfig,
    model: ReadModel,
) -> Result<(), BusError> {
    amqp::declare_exchange(channel, &config.amqp.exchange).await?;
    let queue = config.queue(model);
    amqp::declare_bound_queue(channel, &config.amqp.exchange, &queue, model.routing_keys()).await?;
    amqp::declare_queue(channel, &format!("{queue}.dlq")).await
}

/// Runs the projector of `model` until `shutdown` turns true, reconnecting after failures.
pub async fn run(
    pool: PgPool,
    model: ReadModel,
    config: ProjectorConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let initial = Duration::from_millis(200);
    let mut backoff = Backoff::new(initial, Duration::from_secs(10));
    while !*shutdown.borrow() {
        let started = std::time::Instant::now();
        match session(&pool, model, &config, &mut shutdown).await {
            Ok(()) => return,
            Err(e) => {
                if started.elapsed() > Duration::from_secs(30) {
                    backoff.reset(initial);
                }
                let delay = backoff.next_delay();
                tracing::error!(projector = model.name(), error = %e, retry_in = ?delay, "projector session failed");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {},
                    _ = shutdown.changed() => {},
                }
            }
        }
    }
}

async fn session(
    pool: &PgPool,
    model: ReadModel,
    config: &ProjectorConfig,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), ProjectorError> {
    sqlx::query("INSERT INTO projector_status (projector) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(model.name())
        .execute(pool)
        .await?;
    let connection =
        amqp::connect(&config.amqp, &format!("apex-projector-{}", model.name())).await?;
    let channel = connection.create_channel().await?;
    declare(&channel, config, model).await?;
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await?;
    let dlq_channel = amqp::confirm_channel(&connection).await?;
    // The timeline projector also announces committed entries to the chat exchange.
    let chat_channel = if model == ReadModel::Timeline {
        let channel = amqp::confirm_channel(&connection).await?;
        amqp::declare_exchange(&channel, &config.amqp.chat_exchange).await?;
        Some(channel)
    } else {
        None
    };
    let queue = config.queue(model);
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            format!("apex-{}-{}", model.name(), uuid::Uuid::new_v4().simple())
                .as_str()
                .into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(projector = model.name(), queue, "projector consuming");
    let result = loop {
        let first = tokio::select! {
            next = consumer.next() => next,
            _ = shutdown.changed() => break Ok(()),
        };
        let Some(first) = first else {
            break Err(BusError::ConsumerClosed.into());
        };
        let mut batch = vec![first?];
        while batch.len() < config.batch_size {
            match tokio::time::timeout(Duration::from_millis(1), consumer.next()).await {
                Ok(Some(delivery)) => batch.push(delivery?),
                Ok(None) | Err(_) => break,
            }
        }
        let applied = process(pool, model, config, &dlq_channel, &batch).await?;
        if let Some(chat_channel) = &chat_channel {
            announce(pool, chat_channel, &config.amqp.chat_exchange, applied).await?;
        }
        if let Some(last) = batch.last() {
            last.ack(BasicAckOptions { multiple: true }).await?;
        }
    };
    let _ = connection.close(200, "projector stopping".into()).await;
    result
}

/// A delivery decoded, or why it cannot be.
struct Decoded {
    stored: StoredEvent,
    event: DomainEvent,
}

/// What a processed batch announces to the chat exchange.
enum Applied {
    /// The timeline entries the set-based fold wrote, in store order.
    Entries(Vec<ChatUpdate>),
    /// The instance sequences applied or already applied, `(instance, first, last)`: their
    /// timeline entries are read back.
    Ranges(Vec<(uuid::Uuid, i64, i64)>),
}

/// Publishes the timeline entries of `applied` to the chat exchange.
async fn announce(
    pool: &PgPool,
    channel: &Channel,
    exchange: &str,
    applied: Applied,
) -> Result<(), ProjectorError> {
    let updates = match applied {
        Applied::Entries(updates) => updates,
        Applied::Ranges(ranges) if ranges.is_empty() => return Ok(()),
        Applied::Ranges(ranges) => crate::chat::entries(pool, &ranges).await?,
    };
    crate::chat::publish(channel, exchange, &updates).await?;
    Ok(())
}

/// The sequences an outcome covers, for instance events: `(instance, first, last)`.
fn covered(stored: &StoredEvent, outcome: Outcome) -> Option<(uuid::Uuid, i64, i64)> {
    if stored.aggregate_type != "instance" {
        return None;
    }
    let id = uuid::Uuid::parse_str(&stored.aggregate_id).ok()?;
    Some(match outcome {
        Outcome::Applied { repaired } => (id, stored.sequence - repaired as i64, stored.sequence),
        Outcome::Skipped => (id, stored.sequence, stored.sequence),
    })
}

/// Applies a batch of deliveries (all of them are acknowledged by the caller afterwards).
/// Returns what it applied or found already applied (for the chat announcement).
async fn process(
    pool: &PgPool,
    model: ReadModel,
    config: &ProjectorConfig,
    dlq: &Channel,
    batch: &[Delivery],
) -> Result<Applied, ProjectorError> {
    let mut decoded = Vec::with_capacity(batch.len());
    for delivery in batch {
        match decode(&delivery.data) {
            Ok(d) => decoded.push((delivery, d)),
            Err(reason) => dead_letter(pool, model, config, dlq, delivery, None, &reason).await?,
        }
    }
    if decoded.is_empty() {
        return Ok(Applied::Ranges(Vec::new()));
    }
    // Fast path: the whole batch in one transaction; set-based when it continues every stream
    // exactly (no duplicate, no gap), event by event otherwise.
    let whole: Result<Applied, sqlx::Error> = async {
        let mut tx = begin(pool, model).await?;
        if let Some(entries) = apply_set_based(&mut tx, model, &decoded).await? {
            tx.commit().await?;
            metrics::counter!("apex_projector_processed_total", "projector" => model.name())
                .increment(decoded.len() as u64);
            return Ok(Applied::Entries(entries));
        }
        let mut applied = Vec::with_capacity(decoded.len());
        for (_, d) in &decoded {
            let outcome = apply_one(&mut tx, model, &d.stored, &d.event).await?;
            applied.extend(covered(&d.stored, outcome));
        }
        tx.commit().await?;
        Ok(Applied::Ranges(applied))
    }
    .await;
    match whole {
        Ok(applied) => return Ok(applied),
        Err(e) => {
            tracing::warn!(projector = model.name(), error = %e, size = decoded.len(), "batch failed; applying one by one")
        }
    }
    let mut applied = Vec::with_capacity(decoded.len());
    for (delivery, d) in decoded {
        if let Some(outcome) = apply_with_retry(pool, model, config, dlq, delivery, &d).await? {
            applied.extend(covered(&d.stored, outcome));
        }
    }
    Ok(Applied::Ranges(applied))
}

/// Applies the batch with one statement per table (see `rebuild::batch`); each event then gets
/// a `project` span continuing its command's trace. Returns the timeline entries written (none
/// for the other read models); `None`, having written no read model, when the batch does not
/// continue its streams exactly or the read model has no set-based form.
async fn apply_set_based(
    conn: &mut PgConnection,
    model: ReadModel,
    decoded: &[(&Delivery, Decoded)],
) -> Result<Option<Vec<ChatUpdate>>, sqlx::Error> {
    if model == ReadModel::Agents || decoded.len() < 2 {
        return Ok(None);
    }
    let batch_span = tracing::debug_span!(
        "project.batch",
        projector = model.name(),
        size = decoded.len()
    );
    let events = decoded.iter().map(|(_, d)| (&d.stored, &d.event));
    let mut entries = Vec::new();
    if !crate::rebuild::batch::apply_collecting(conn, model, events, Some(&mut entries))
        .instrument(batch_span)
        .await?
    {
        return Ok(None);
    }
    for (_, d) in decoded {
        project_span(model, &d.stored)
            .in_scope(|| tracing::trace!(batch = decoded.len(), "projected in a batch"));
    }
    Ok(Some(entries))
}

fn decode(body: &[u8]) -> Result<Decoded, String> {
    let cloud_event: CloudEvent =
        serde_json::from_slice(body).map_err(|e| format!("not a CloudEvent: {e}"))?;
    let stored = cloud_event.into_stored().map_err(|e| e.to_string())?;
    let event = stored.decode().map_err(|e| e.to_string())?;
    Ok(Decoded { stored, event })
}

async fn apply_with_retry(
    pool: &PgPool,
    model: ReadModel,
    config: &ProjectorConfig,
    dlq: &Channel,
    delivery: &Delivery,
    decoded: &Decoded,
) -> Result<Option<Outcome>, ProjectorError> {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result: Result<Outcome, sqlx::Error> = async {
            let mut tx = begin(pool, model).await?;
            let outcome = apply_one(&mut tx, model, &decoded.stored, &decoded.event).await?;
            tx.commit().await?;
            Ok(outcome)
        }
        .await;
        match result {
            Ok(outcome) => return Ok(Some(outcome)),
            Err(e) if is_transient(&e) => {
                let delay = backoff.next_delay();
                tracing::warn!(projector = model.name(), error = %e, retry_in = ?delay, "transient failure; retrying");
                count_retry(pool, model).await;
                tokio::time::sleep(delay).await;
            }
            Err(e) if attempt < config.max_attempts => {
                tracing::warn!(projector = model.name(), error = %e, attempt, "apply failed; retrying");
                count_retry(pool, model).await;
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => {
                let reason = format!("apply failed after {attempt} attempts: {e}");
                dead_letter(
                    pool,
                    model,
                    config,
                    dlq,
                    delivery,
                    Some(&decoded.stored),
                    &reason,
                )
                .await?;
                return Ok(None);
            }
        }
    }
}

async fn count_retry(pool: &PgPool, model: ReadModel) {
    metrics::counter!("apex_projector_retried_total", "projector" => model.name()).increment(1);
    if let Err(e) = sqlx::query(
        "UPDATE projector_status SET retried_total = retried_total + 1 WHERE projector = $1",
    )
    .bind(model.name())
    .execute(pool)
    .await
    {
        tracing::warn!(projector = model.name(), error = %e, "cannot count a retry");
    }
}

/// The advisory-lock key of a read model: projector transactions hold it shared, a rebuild's
/// swap holds it exclusively, so the swap never interleaves with a projector write.
pub fn model_lock_key(model: ReadModel) -> i64 {
    let base: i64 = 0x6170_6578_5f72_6d00; // "apex_rm"
    base + ReadModel::ALL.iter().position(|m| *m == model).unwrap_or(0) as i64
}

/// Begins a projector transaction (holding the read model's lock shared).
async fn begin(
    pool: &PgPool,
    model: ReadModel,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(model_lock_key(model))
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Applies one event with its bookkeeping, inside the caller's transaction, in a span that
/// continues the trace of the command that stored the event.
pub async fn apply_one(
    conn: &mut PgConnection,
    model: ReadModel,
    stored: &StoredEvent,
    event: &DomainEvent,
) -> Result<Outcome, sqlx::Error> {
    apply_in_span(conn, model, stored, event)
        .instrument(project_span(model, stored))
        .await
}

/// The span of one event's projection, continuing the trace of the command that stored it.
fn project_span(model: ReadModel, stored: &StoredEvent) -> tracing::Span {
    let span = tracing::info_span!(
        "project",
        otel.kind = "consumer",
        projector = model.name(),
        trace_id = crate::trace::trace_id(stored.traceparent.as_deref()),
        aggregate_id = %stored.aggregate_id,
        sequence = stored.sequence,
    );
    crate::trace::follow(&span, stored.traceparent.as_deref());
    span
}

async fn apply_in_span(
    conn: &mut PgConnection,
    model: ReadModel,
    stored: &StoredEvent,
    event: &DomainEvent,
) -> Result<Outcome, sqlx::Error> {
    let name = model.name();
    sqlx::query(
        "INSERT INTO projector_offsets (projector, aggregate_type, aggregate_id, last_sequence)
         VALUES ($1, $2, $3, 0) ON CONFLICT DO NOTHING",
    )
    .bind(name)
    .bind(&stored.aggregate_type)
    .bind(&stored.aggregate_id)
    .execute(&mut *conn)
    .await?;
    let last: i64 = sqlx::query_scalar(
        "SELECT last_sequence FROM projector_offsets
          WHERE projector = $1 AND aggregate_type = $2 AND aggregate_id = $3 FOR UPDATE",
    )
    .bind(name)
    .bind(&stored.aggregate_type)
    .bind(&stored.aggregate_id)
    .fetch_one(&mut *conn)
    .await?;
    if stored.sequence <= last {
        metrics::counter!("apex_projector_skipped_total", "projector" => name).increment(1);
        sqlx::query(
            "UPDATE projector_status SET skipped_total = skipped_total + 1 WHERE projector = $1",
        )
        .bind(name)
        .execute(&mut *conn)
        .await?;
        return Ok(Outcome::Skipped);
    }
    let mut repaired = 0;
    if stored.sequence > last + 1 {
        let missing = store::aggregate_range(
            conn,
            &stored.aggregate_type,
            &stored.aggregate_id,
            last + 1,
            stored.sequence - 1,
        )
        .await?;
        if missing.len() as i64 != stored.sequence - 1 - last {
            return Err(sqlx::Error::Protocol(format!(
                "gap repair: store has {} of the {} events before {}#{}",
                missing.len(),
                stored.sequence - 1 - last,
                stored.aggregate_id,
                stored.sequence
            )));
        }
        for gap in &missing {
            let event = gap.decode().map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            model.apply(conn, gap, &event).await?;
        }
        repaired = missing.len();
        tracing::info!(projector = name, aggregate_id = %stored.aggregate_id, repaired, "filled a gap from the store");
    }
    model.apply(conn, stored, event).await?;
    tracing::debug!(projector = name, "projected");
    metrics::counter!("apex_projector_processed_total", "projector" => name)
        .increment(1 + repaired as u64);
    if repaired > 0 {
        metrics::counter!("apex_projector_repaired_total", "projector" => name)
            .increment(repaired as u64);
    }
    sqlx::query(
        "UPDATE projector_offsets SET last_sequence = $4
          WHERE projector = $1 AND aggregate_type = $2 AND aggregate_id = $3",
    )
    .bind(name)
    .bind(&stored.aggregate_type)
    .bind(&stored.aggregate_id)
    .bind(stored.sequence)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE projector_status
            SET last_position = GREATEST(last_position, $2),
                last_recorded_at = GREATEST(last_recorded_at, $3),
                last_applied_at = now(),
                processed_total = processed_total + $4,
                repaired_total = repaired_total + $5
          WHERE projector = $1",
    )
    .bind(name)
    .bind(stored.position)
    .bind(stored.recorded_at)
    .bind(1 + repaired as i64)
    .bind(repaired as i64)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome::Applied { repaired })
}

/// True for failures that say nothing about the message: the database is unreachable, or the
/// transaction lost a serialization race.
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        // Connection exceptions, operator intervention and shutdown, insufficient resources,
        // lock and statement timeouts, serialization failures and deadlocks.
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08")
                || c.starts_with("57P")
                || c.starts_with("53")
                || matches!(c.as_ref(), "57014" | "55P03" | "40001" | "40P01")
        }),
        _ => false,
    }
}

/// Records a message that cannot be projected and parks it in the dead-letter queue.
async fn dead_letter(
    pool: &PgPool,
    model: ReadModel,
    config: &ProjectorConfig,
    dlq: &Channel,
    delivery: &Delivery,
    stored: Option<&StoredEvent>,
    reason: &str,
) -> Result<(), ProjectorError> {
    tracing::error!(projector = model.name(), reason, routing_key = %delivery.routing_key, "dead-lettering a message");
    metrics::counter!("apex_projector_dead_lettered_total", "projector" => model.name())
        .increment(1);
    let body = String::from_utf8_lossy(&delivery.data).into_owned();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO dead_letters (projector, event_id, aggregate_type, aggregate_id, sequence,
                                   routing_key, reason, body)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(model.name())
    .bind(stored.map(|s| s.event_id))
    .bind(stored.map(|s| s.aggregate_type.as_str()))
    .bind(stored.map(|s| s.aggregate_id.as_str()))
    .bind(stored.map(|s| s.sequence))
    .bind(delivery.routing_key.as_str())
    .bind(reason)
    .bind(&body)
    .execute(&mut *tx)
    .await?;
    if let Some(s) = stored {
        // Move past the poison event so later events of the aggregate do not all fail on it.
        sqlx::query(
            "INSERT INTO projector_offsets (projector, aggregate_type, aggregate_id, last_sequence)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (projector, aggregate_type, aggregate_id)
             DO UPDATE SET last_sequence = GREATEST(projector_offsets.last_sequence, $4)",
        )
        .bind(model.name())
        .bind(&s.aggregate_type)
        .bind(&s.aggregate_id)
        .bind(s.sequence)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-apex-reason"),
        AMQPValue::LongString(reason.into()),
    );
    headers.insert(
        ShortString::from("x-apex-routing-key"),
        AMQPValue::LongString(delivery.routing_key.as_str().into()),
    );
    let queue = format!("{}.dlq", config.queue(model));
    let confirm = dlq
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &delivery.data,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await?
        .await?;
    if !confirm.is_ack() {
        return Err(BusError::Nacked.into());
    }
    Ok(())
}
