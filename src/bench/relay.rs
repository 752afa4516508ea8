//! `relay`: a backlog of 1M stored events published and confirmed by the relay, against a
//! bare pipelined publish of the same encoded messages to the same exchange and queues.

use std::time::{Duration, Instant};

use apex_projections::ProjectorGroup;
use apex_projections::amqp;
use apex_projections::projector;
use apex_projections::relay::{self, RelayConfig};
use serde_json::json;
use tokio::sync::watch;

use super::report::{Row, Target};
use super::stack::{self, Stack};
use super::stats::{rate, round};
use super::{Options, ceilings, seed};
use crate::config::Settings;

/// Runs the scenario.
pub(crate) async fn run(settings: &Settings, options: &Options) -> anyhow::Result<Vec<Row>> {
    let mut stack = Stack::create(settings, 8).await?;
    let result = measure(&mut stack, options).await;
    stack::finish(stack, result).await
}

async fn measure(stack: &mut Stack, options: &Options) -> anyhow::Result<Vec<Row>> {
    let events = if options.quick { 5_000 } else { 1_000_000 };
    let seeded = seed::store(&stack.pool, events).await?;
    let stored = seed::load(&stack.pool).await?;
    let messages = seed::encode(&stored)?;
    drop(stored);
    let total = messages.len();
    let mean_bytes = messages.iter().map(|m| m.body.len()).sum::<usize>() / total.max(1);

    // The same topology the relay declares: the exchange and every projector queue.
    let connection = amqp::connect(&stack.amqp(), "apex-bench-relay-ceiling").await?;
    let channel = amqp::confirm_channel(&connection).await?;
    let projectors = stack.projector_config();
    for group in ProjectorGroup::ALL {
        projector::declare(&channel, &projectors, group).await?;
    }
    let ceiling =
        ceilings::pipelined_publish(&channel, &stack.settings.amqp.exchange, &messages, 8192)
            .await?;
    let _ = connection.close(200, "ceiling done".into()).await;
    drop(messages);
    stack.purge_queues().await?;

    let mut config = RelayConfig::new(stack.amqp());
    config.projector_queue_prefix = stack.queue_prefix.clone();
    let (stop, stopped) = watch::channel(false);
    let started = Instant::now();
    let task = tokio::spawn(relay::run(stack.pool.clone(), config.clone(), stopped));
    let deadline = started + Duration::from_secs(if options.quick { 60 } else { 900 });
    let published = loop {
        let published: Option<i64> =
            sqlx::query_scalar("SELECT published_total FROM relay_checkpoints WHERE name = $1")
                .bind(&config.name)
                .fetch_optional(&stack.pool)
                .await?;
        let published = published.unwrap_or(0);
        if published >= total as i64 || Instant::now() > deadline {
            break published;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let elapsed = started.elapsed();
    let _ = stop.send(true);
    let _ = task.await;
    stack.purge_queues().await?;

    let per_second = rate(published.max(0) as u64, elapsed);
    let details = json!({
        "events": total,
        "published": published,
        "timed_out": published < total as i64,
        "seconds": round(elapsed.as_secs_f64()),
        "mean_message_bytes": mean_bytes,
        "relay_batch_size": config.batch_size,
        "seed_events": seeded.events,
        "seed_seconds": round(seeded.elapsed.as_secs_f64()),
        "seed_events_per_second": round(rate(seeded.events as u64, seeded.elapsed)),
        "ceiling": "bare pipelined publish with confirms (window 8192) of the same encoded messages to the same exchange and queues",
        "ceiling_per_second": round(ceiling),
    });
    Ok(vec![
        Row::new(
            "relay",
            "events published+confirmed/s",
            per_second,
            "ev/s",
            Some((ceiling, "bare pipelined publish")),
            Target::RatioAtLeast(0.75),
        )
        .with(details),
    ])
}
