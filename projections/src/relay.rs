//! The relay: publishes the events table to RabbitMQ, in a gap-free order, at least once.
//!
//! * Order: `(transaction_id, position)`, reading only below the snapshot horizon
//!   `pg_snapshot_xmin(pg_current_snapshot())`, so an event of a transaction that commits late
//!   can never land behind the checkpoint (see [`crate::store::after_checkpoint`]).
//! * Delivery: each batch is published with publisher confirms, pipelined; the checkpoint (one
//!   row) advances only after every message of the batch was confirmed. A crash between
//!   publish and checkpoint republishes the batch: consumers deduplicate by aggregate sequence.
//! * One publisher: a session-level advisory lock, held on the connection that also reads the
//!   events and writes the checkpoint (one loop does both, in turn; a pooled connection would
//!   cost a check when it is given back, a round trip per read). A standby replica waits for
//!   the lock and takes over when the holder dies.
//! * Latency: `LISTEN apex_events` wakes the relay when a transaction that appended commits;
//!   a poll interval is the safety net.
//! * Chat: the chat timeline is written with the events (an inline projection, see
//!   `apex_commands::inline`), so the read that takes a batch also takes its timeline rows,
//!   and the relay announces them to the chat exchange as one message, next to the batch's
//!   events; the checkpoint moves only when both are confirmed. A batch published again is
//!   announced again: receivers drop updates they have (by run and sequence).

use std::time::Duration;

use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::watch;
use tracing::Instrument;

use crate::amqp::{self, AmqpConfig, Backoff, BusError};
use crate::envelope::{CONTENT_TYPE, StoredEvent};
use crate::projector::{self, ProjectorConfig, ProjectorGroup};
use crate::store;

/// Advisory lock key held by the active relay.
const RELAY_LOCK_KEY: i64 = 0x0061_7065_785f_726c; // "apex_rl"

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Broker and exchange.
    pub amqp: AmqpConfig,
    /// Checkpoint row name.
    pub name: String,
    /// Most events per batch.
    pub batch_size: i64,
    /// Safety-net poll interval.
    pub poll_interval: Duration,
    /// The projector queue prefix; the relay declares those queues before publishing, so no
    /// event is unroutable while a projector has never run.
    pub projector_queue_prefix: String,
}

impl RelayConfig {
    /// Defaults for `amqp`.
    pub fn new(amqp: AmqpConfig) -> Self {
        Self {
            amqp,
            name: "main".to_owned(),
            batch_size: 1000,
            poll_interval: Duration::from_millis(500),
            projector_queue_prefix: "apex.projector".to_owned(),
        }
    }
}

/// Why a relay session ended.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// PostgreSQL failed (the lock may be lost).
    #[error("relay database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The broker failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// An event could not be turned into a message (a bug; nothing is skipped).
    #[error("cannot encode event {event_id}: {reason}")]
    Encode {
        /// The event.
        event_id: uuid::Uuid,
        /// Why.
        reason: String,
    },
}

/// Runs the relay until `shutdown` turns true: waits for the lock, then publishes; after any
/// failure it backs off and starts over from the stored checkpoint.
pub async fn run(pool: PgPool, config: RelayConfig, mut shutdown: watch::Receiver<bool>) {
    let initial = Duration::from_millis(200);
    let mut backoff = Backoff::new(initial, Duration::from_secs(10));
    while !*shutdown.borrow() {
        let started = std::time::Instant::now();
        match session(&pool, &config, &mut shutdown).await {
            Ok(()) => return,
            Err(e) => {
                if started.elapsed() > Duration::from_secs(30) {
                    backoff.reset(initial);
                }
                let delay = backoff.next_delay();
                tracing::error!(error = %e, retry_in = ?delay, "relay session failed");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {},
                    _ = shutdown.changed() => {},
                }
            }
        }
    }
}

/// One session: lock, connect, publish until shutdown or failure.
async fn session(
    pool: &PgPool,
    config: &RelayConfig,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let mut lock_conn = pool.acquire().await?.detach();
    loop {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(RELAY_LOCK_KEY)
            .fetch_one(&mut lock_conn)
            .await?;
        if locked {
            break;
        }
        tracing::debug!("another relay holds the lock; standing by");
        tokio::select! {
            () = tokio::time::sleep(config.poll_interval) => {},
            _ = shutdown.changed() => return Ok(()),
        }
    }
    tracing::info!("relay lock acquired; publishing");
    // A checkpoint lost in a database crash only republishes what it covered, which the
    // consumers skip: its commit need not wait for the WAL flush.
    sqlx::query("SET synchronous_commit = off")
        .execute(&mut lock_conn)
        .await?;
    sqlx::query("INSERT INTO relay_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(&config.name)
        .execute(&mut lock_conn)
        .await?;

    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen("apex_events").await?;

    let connection = amqp::connect(&config.amqp, &format!("apex-relay-{}", config.name)).await?;
    let channel = amqp::confirm_channel(&connection).await?;
    amqp::declare_exchange(&channel, &config.amqp.exchange).await?;
    amqp::declare_exchange(&channel, &config.amqp.chat_exchange).await?;
    let mut projectors = ProjectorConfig::new(config.amqp.clone());
    projectors.queue_prefix = config.projector_queue_prefix.clone();
    for group in ProjectorGroup::ALL {
        projector::declare(&channel, &projectors, group).await?;
    }

    let result = publish_loop(config, &mut lock_conn, &mut listener, &channel, shutdown).await;
    let _ = connection.close(200, "relay stopping".into()).await;
    let _ = lock_conn.close().await;
    result
}

async fn publish_loop(
    config: &RelayConfig,
    lock_conn: &mut PgConnection,
    listener: &mut PgListener,
    channel: &Channel,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let (mut xid, mut position): (i64, i64) = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position FROM relay_checkpoints WHERE name = $1",
    )
    .bind(&config.name)
    .fetch_one(&mut *lock_conn)
    .await?;
    // Batches sent and not yet confirmed, oldest first: `(transaction_id, position, count)` of
    // each, resolved when every message of it is confirmed. The next batch is read and sent
    // as soon as the store has it, not when the broker has confirmed the previous one; the
    // checkpoint only ever moves over a confirmed prefix.
    let mut in_flight = FuturesOrdered::new();
    // Whether the store may have more to send now (at start, after a notification, a full
    // batch, a poll or a horizon retry).
    let mut read_now = true;
    // Committed events above the snapshot horizon wait for an older transaction to finish:
    // read again after this delay (doubling up to the poll interval) rather than only on the
    // next notification.
    let mut horizon_retry: Option<Duration> = None;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        if read_now && in_flight.len() < MAX_BATCHES_IN_FLIGHT {
            let store::Settled {
                events: batch,
                chat,
                held_back,
            } = store::after_checkpoint(&mut *lock_conn, xid, position, config.batch_size).await?;
            let full = batch.len() as i64 == config.batch_size;
            if let Some(last) = batch.last() {
                // The chat message first: a chat client waits for it, the projectors do not.
                let mut confirms: Vec<_> =
                    crate::chat::send(channel, &config.amqp.chat_exchange, &chat)
                        .await?
                        .into_iter()
                        .collect();
                confirms.extend(send_batch(channel, &config.amqp.exchange, &batch).await?);
                crate::delay::record(
                    &metrics::histogram!("apex_relay_publish_delay_seconds"),
                    batch.iter().map(|e| e.recorded_at),
                );
                (xid, position) = (last.transaction_id, last.position);
                let (sent_xid, sent_position, count) = (xid, position, batch.len());
                in_flight.push_back(async move {
                    await_confirms(confirms)
                        .await
                        .map(|()| (sent_xid, sent_position, count))
                });
            }
            read_now = full;
            if !full {
                // Held-back events sort after the batch: they are after the new checkpoint.
                horizon_retry = if held_back {
                    let next = horizon_retry.map_or(HORIZON_RETRY, |d| d * 2);
                    Some(next.min(config.poll_interval))
                } else {
                    None
                };
            }
            if read_now {
                // Take the confirms that are already in before reading on.
                while let Some(Some(done)) = in_flight.next().now_or_never() {
                    checkpoint(lock_conn, config, done?).await?;
                }
                continue;
            }
        }
        let wait = horizon_retry.unwrap_or(config.poll_interval);
        tokio::select! {
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                checkpoint(lock_conn, config, done?).await?;
            }
            notification = listener.recv(), if !read_now => {
                notification?;
                read_now = true;
            }
            () = tokio::time::sleep(wait), if !read_now => read_now = true,
            _ = shutdown.changed() => {},
        }
    }
}

/// Most batches sent and not yet confirmed.
const MAX_BATCHES_IN_FLIGHT: usize = 8;

/// First re-read after finding committed events held back by the snapshot horizon.
const HORIZON_RETRY: Duration = Duration::from_millis(2);

/// Records a confirmed batch: moves the checkpoint over it. Written on the lock connection: if
/// the lock was lost with its connection, this fails and the session ends instead of racing
/// the new holder.
async fn checkpoint(
    lock_conn: &mut PgConnection,
    config: &RelayConfig,
    (xid, position, count): (i64, i64, usize),
) -> Result<(), RelayError> {
    sqlx::query(
        "UPDATE relay_checkpoints
            SET transaction_id = $2::text::xid8, position = $3,
                published_total = published_total + $4, updated_at = now()
          WHERE name = $1",
    )
    .bind(&config.name)
    .bind(xid.to_string())
    .bind(position)
    .bind(count as i64)
    .execute(&mut *lock_conn)
    .await?;
    tracing::debug!(count, position, "published batch");
    metrics::counter!("apex_relay_published_total").increment(count as u64);
    metrics::counter!("apex_relay_batches_total").increment(1);
    Ok(())
}

/// Publishes `batch` pipelined and waits for every confirm.
pub async fn publish_batch(
    channel: &Channel,
    exchange: &str,
    batch: &[StoredEvent],
) -> Result<(), RelayError> {
    let confirms = send_batch(channel, exchange, batch).await?;
    await_confirms(confirms).await
}

/// Publishes every event of `batch` without waiting for the broker; returns the confirms.
async fn send_batch(
    channel: &Channel,
    exchange: &str,
    batch: &[StoredEvent],
) -> Result<Vec<lapin::PublisherConfirm>, RelayError> {
    let encoded = batch
        .iter()
        .map(|event| encode(event).map(|message| (event, message)))
        .collect::<Result<Vec<_>, _>>()?;
    // Collected first: a lazy iterator held across the awaits would make the future !Send.
    let publishes: Vec<_> = encoded
        .iter()
        .map(|(event, (routing_key, body, properties))| {
            let span = tracing::info_span!(
                "relay.publish",
                otel.kind = "producer",
                trace_id = crate::trace::trace_id(event.traceparent.as_deref()),
                routing_key,
                aggregate_id = %event.aggregate_id,
                sequence = event.sequence,
            );
            crate::trace::follow(&span, event.traceparent.as_deref());
            channel
                .basic_publish(
                    exchange.into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    properties.clone(),
                )
                .instrument(span)
        })
        .collect();
    Ok(crate::amqp::publish_pipelined(publishes).await?)
}

/// Waits for every confirm; a nack or a lost channel fails the batch.
async fn await_confirms(confirms: Vec<lapin::PublisherConfirm>) -> Result<(), RelayError> {
    for confirm in confirms {
        let confirmation = confirm.await.map_err(BusError::from)?;
        if !confirmation.is_ack() {
            return Err(BusError::Nacked.into());
        }
    }
    Ok(())
}

/// The routing key, body and properties of the message for `event`.
pub fn encode(event: &StoredEvent) -> Result<(String, Vec<u8>, BasicProperties), RelayError> {
    let encode_err = |reason: String| RelayError::Encode {
        event_id: event.event_id,
        reason,
    };
    let routing_key = event.routing_key().map_err(|e| encode_err(e.to_string()))?;
    let cloud_event = event
        .to_cloud_event()
        .map_err(|e| encode_err(e.to_string()))?;
    let body = serde_json::to_vec(&cloud_event).map_err(|e| encode_err(e.to_string()))?;
    let mut headers = FieldTable::default();
    if let Some(traceparent) = &event.traceparent {
        headers.insert(
            ShortString::from("traceparent"),
            AMQPValue::LongString(traceparent.as_str().into()),
        );
    }
    let properties = BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_delivery_mode(2)
        .with_message_id(event.event_id.to_string().into())
        .with_timestamp(u64::try_from(event.recorded_at.timestamp()).unwrap_or(0))
        .with_type(cloud_event.kind.as_str().into())
        .with_headers(headers);
    Ok((routing_key, body, properties))
}
