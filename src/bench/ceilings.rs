//! Ceilings: what the bare tools do on this machine, measured in the same run as the scenario.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use apex_projections::amqp::{self, AmqpConfig, BusError};
use futures::StreamExt;
use lapin::PublisherConfirm;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::task::JoinSet;

use super::seed::Encoded;
use super::stats::{Samples, rate};

/// Single-row INSERT transactions per second from `clients` connections, each inserting in
/// autocommit for `duration` (what `pgbench` with a one-INSERT script measures).
pub(crate) async fn insert_tps(
    options: PgConnectOptions,
    clients: u32,
    duration: Duration,
) -> anyhow::Result<f64> {
    let pool = PgPoolOptions::new()
        .max_connections(clients)
        .min_connections(clients)
        .connect_with(options)
        .await
        .context("connecting the INSERT ceiling pool")?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_insert_ceiling
             (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v integer NOT NULL,
              at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&pool)
    .await?;
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    let deadline = started + duration;
    for client in 0..clients {
        let (pool, count) = (pool.clone(), count.clone());
        tasks.spawn(async move {
            let mut conn = pool.acquire().await?;
            while Instant::now() < deadline {
                sqlx::query("INSERT INTO bench_insert_ceiling (v) VALUES ($1)")
                    .bind(client as i32)
                    .execute(&mut *conn)
                    .await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, sqlx::Error>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.context("an INSERT client panicked")??;
    }
    let tps = rate(count.load(Ordering::Relaxed), started.elapsed());
    sqlx::query("DROP TABLE bench_insert_ceiling")
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(tps)
}

/// Publishes `messages` to `exchange` on a confirm channel, fully pipelined (up to `window`
/// unconfirmed), and waits for every confirm. Returns messages per second.
pub(crate) async fn pipelined_publish(
    channel: &Channel,
    exchange: &str,
    messages: &[Encoded],
    window: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut pending: VecDeque<PublisherConfirm> = VecDeque::with_capacity(window);
    // Handed to the connection 1,000 at a time, as the relay does with a batch, so the
    // ceiling is no slower than the relay's way of publishing.
    for chunk in messages.chunks(1000) {
        while pending.len() + chunk.len() > window
            && let Some(confirm) = pending.pop_front()
        {
            check(confirm).await?;
        }
        pending.extend(super::seed::publish(channel, exchange, chunk).await?);
    }
    for confirm in pending {
        check(confirm).await?;
    }
    Ok(rate(messages.len() as u64, started.elapsed()))
}

async fn check(confirm: PublisherConfirm) -> anyhow::Result<()> {
    if !confirm.await?.is_ack() {
        return Err(BusError::Nacked.into());
    }
    Ok(())
}

/// Messages per second a bare consumer takes from a quorum queue holding `messages`, with
/// the projectors' prefetch and batched (`multiple`) acks. Filling the queue is not timed.
pub(crate) async fn batched_consume(
    config: &AmqpConfig,
    queue: &str,
    messages: &[Encoded],
    prefetch: u16,
    ack_every: usize,
) -> anyhow::Result<f64> {
    let connection = amqp::connect(config, "apex-bench-consume-ceiling").await?;
    let channel = amqp::confirm_channel(&connection).await?;
    // Of the projectors' queue type: the ceiling is what the broker delivers from such a queue.
    amqp::declare_queue(&channel, queue, amqp::QueueType::Quorum).await?;
    let mut pending = VecDeque::new();
    for m in messages {
        if pending.len() >= 8192
            && let Some(confirm) = pending.pop_front()
        {
            check(confirm).await?;
        }
        pending.push_back(
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &m.body,
                    m.properties.clone(),
                )
                .await?,
        );
    }
    for confirm in pending {
        check(confirm).await?;
    }
    let consumer_channel = connection.create_channel().await?;
    consumer_channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let started = Instant::now();
    let mut consumer = consumer_channel
        .basic_consume(
            queue.into(),
            "apex-bench-ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut received = 0usize;
    while received < messages.len() {
        let Some(delivery) = consumer.next().await else {
            anyhow::bail!("the ceiling consumer was closed");
        };
        let delivery = delivery?;
        received += 1;
        if received.is_multiple_of(ack_every) || received == messages.len() {
            delivery.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
    let per_second = rate(received as u64, started.elapsed());
    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "ceiling done".into()).await;
    Ok(per_second)
}

/// Latency of one bare broker hop: publish (no confirm wait) → delivered to a connected
/// consumer, `count` messages at `per_second`.
pub(crate) async fn broker_hop(
    config: &AmqpConfig,
    count: usize,
    per_second: f64,
) -> anyhow::Result<Samples> {
    let connection = amqp::connect(config, "apex-bench-hop-ceiling").await?;
    let channel = amqp::confirm_channel(&connection).await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let name = queue.name().to_string();
    let consume_channel = connection.create_channel().await?;
    let mut consumer = consume_channel
        .basic_consume(
            name.as_str().into(),
            "apex-bench-hop".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let origin = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut samples = Samples::default();
        while samples.len() < count {
            match consumer.next().await {
                Some(Ok(delivery)) => {
                    let now = origin.elapsed();
                    let bytes: [u8; 8] = delivery.data.get(..8)?.try_into().ok()?;
                    let sent = Duration::from_nanos(u64::from_le_bytes(bytes));
                    samples.push(now.saturating_sub(sent));
                }
                _ => return None,
            }
        }
        Some(samples)
    });
    let start = tokio::time::Instant::now();
    for i in 0..count {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / per_second)).await;
        let stamp = (origin.elapsed().as_nanos() as u64).to_le_bytes();
        let _confirm = channel
            .basic_publish(
                "".into(),
                name.as_str().into(),
                BasicPublishOptions::default(),
                &stamp,
                BasicProperties::default(),
            )
            .await?;
    }
    let samples = tokio::time::timeout(Duration::from_secs(30), receiver)
        .await
        .context("the broker hop did not deliver in 30 s")??
        .context("the broker hop consumer closed early")?;
    let _ = connection.close(200, "hop done".into()).await;
    Ok(samples)
}
