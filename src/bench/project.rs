//! `project`: a steady stream of stored events published to RabbitMQ at 12.5k events/s and
//! applied by every projector; throughput into all read models and the lag of each event
//! (published → applied by the slowest instance projector). Ceiling: a bare consumer with the
//! projectors' prefetch and batched acks, on the same messages.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apex_projections::ProjectorGroup;
use apex_projections::amqp;
use apex_projections::projector;
use serde_json::json;

use super::report::{Row, Target};
use super::stack::{self, Stack};
use super::stats::{Samples, rate, round};
use super::{Options, ceilings, seed};
use crate::config::Settings;

/// Runs the scenario.
pub(crate) async fn run(settings: &Settings, options: &Options) -> anyhow::Result<Vec<Row>> {
    let mut stack = Stack::create(settings, 24).await?;
    let result = measure(&mut stack, options).await;
    stack::finish(stack, result).await
}

async fn measure(stack: &mut Stack, options: &Options) -> anyhow::Result<Vec<Row>> {
    let (per_second, seconds, cap) = if options.quick {
        (2_000.0, 1.0, Duration::from_secs(60))
    } else {
        // Offered above the 10k/s target: a stream offered at exactly the target measures
        // the offer, not the projectors (9.8k ev/s at 10k offered, lag p99 170 ms).
        (12_500.0, 16.0, Duration::from_secs(240))
    };
    let events = (per_second * seconds) as i64;
    seed::store(&stack.pool, events).await?;
    let stored = seed::load(&stack.pool).await?;
    // Instance events only: the stream the four instance projectors share.
    let stored: Vec<_> = stored
        .into_iter()
        .filter(|e| e.aggregate_type == "instance")
        .collect();
    let messages = seed::encode(&stored)?;
    drop(stored);
    let total = messages.len();

    let projectors = stack.projector_config();
    let ceiling = ceilings::batched_consume(
        &stack.amqp(),
        &format!("{}.ceiling", stack.queue_prefix),
        &messages,
        projectors.prefetch,
        projectors.batch_size,
    )
    .await?;

    let connection = amqp::connect(&stack.amqp(), "apex-bench-stream").await?;
    let channel = amqp::confirm_channel(&connection).await?;
    for group in ProjectorGroup::ALL {
        projector::declare(&channel, &projectors, group).await?;
    }
    stack.workers(false, &ProjectorGroup::ALL);
    // Every projector has a session (its status row) before the stream starts.
    let projected = ProjectorGroup::projected().count();
    let ready = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM projector_status")
            .fetch_one(&stack.pool)
            .await?;
        if n >= projected as i64 || ready.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let published_at = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let publisher = {
        let (channel, exchange, published_at) = (
            channel.clone(),
            stack.settings.amqp.exchange.clone(),
            published_at.clone(),
        );
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut confirms = Vec::with_capacity(messages.len());
            let tick = Duration::from_millis(5);
            let mut sent = 0usize;
            while sent < messages.len() {
                let due =
                    ((start.elapsed().as_secs_f64() * per_second) as usize + 1).min(messages.len());
                // Published like the relay publishes, stamped before: the lag of an event
                // counts from before its publish.
                let now = Instant::now();
                published_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(std::iter::repeat_n(now, due - sent));
                confirms.extend(seed::publish(&channel, &exchange, &messages[sent..due]).await?);
                sent = due;
                tokio::time::sleep(tick).await;
            }
            for confirm in confirms {
                confirm.await?;
            }
            Ok::<_, amqp::BusError>(())
        })
    };

    // Sample the slowest instance projector every few milliseconds: event k is in every read
    // model once all four have applied k events (each applies its queue in order).
    let mut lag = Samples::default();
    let mut applied = 0usize;
    let started = Instant::now();
    let mut finished = started;
    while applied < total && started.elapsed() < cap {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = Instant::now();
        let done = (stack::min_instance_processed(&stack.pool).await?.max(0) as usize).min(total);
        if done > applied {
            let stamps = published_at.lock().unwrap_or_else(|p| p.into_inner());
            for at in stamps.iter().take(done).skip(applied) {
                lag.push(now.saturating_duration_since(*at));
            }
            applied = done;
            finished = now;
        }
    }
    publisher.await??;
    let _ = connection.close(200, "stream done".into()).await;
    stack.stop_workers().await;

    let first = published_at
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .first()
        .copied()
        .unwrap_or(started);
    let elapsed = finished.saturating_duration_since(first);
    let per_second_applied = rate(applied as u64, elapsed);
    let lag_p99 = lag.percentile_ms(99.0);
    let details = json!({
        "events": total,
        "offered_per_second": per_second,
        "applied": applied,
        "seconds": round(elapsed.as_secs_f64()),
        "timed_out": applied < total,
        "projector_batch_size": projectors.batch_size,
        "projector_prefetch": projectors.prefetch,
        "projector_group_transaction_from": projectors.group_transaction_from,
        "lag": lag.summary(),
        "lag_sampling_ms": 5,
        "ceiling": "bare consumer of the same messages from one quorum queue (the projectors' type), same prefetch, acks batched like the projectors",
        "ceiling_per_second": round(ceiling),
    });
    Ok(vec![
        Row::new(
            "project",
            "events/s into all read models",
            per_second_applied,
            "ev/s",
            Some((ceiling, "bare batched-ack consume")),
            Target::AtLeast(10_000.0),
        )
        .with(details),
        Row::new("project", "lag p99", lag_p99, "ms", None, Target::Reported),
    ])
}
