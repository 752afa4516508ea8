//! `rebuild`: the store (1M events) replayed into every read model in one pass
//! (`rebuild::run_all`), as `apex rebuild --all` does. Ceiling: reading and decoding the same
//! events in the same order without applying them.
//!
//! The pass is given a time budget; if it runs out it is cancelled (the private schemas go
//! with the database) and its full time is extrapolated from its rate so far, which the result
//! says.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apex_projections::rebuild::{self, Progress};
use apex_projections::{ReadModel, consistency};
use serde_json::json;

use super::report::{Row, Target};
use super::stack::{self, Stack};
use super::stats::{rate, round};
use super::{Options, seed};
use crate::config::Settings;

/// Runs the scenario.
pub(crate) async fn run(settings: &Settings, options: &Options) -> anyhow::Result<Vec<Row>> {
    let mut stack = Stack::create(settings, 8).await?;
    let result = measure(&mut stack, options).await;
    stack::finish(stack, result).await
}

async fn measure(stack: &mut Stack, options: &Options) -> anyhow::Result<Vec<Row>> {
    // Quick mode replays in small batches, so runs straddle batch boundaries.
    let (events, budget, batch) = if options.quick {
        (1_000, Duration::from_secs(60), 64)
    } else {
        (1_000_000, Duration::from_secs(240), 10_000)
    };
    let seeded = seed::store(&stack.pool, events).await?;
    seed::settled(&stack.pool, Duration::from_secs(120)).await?;
    // The ceiling reads and decodes as the rebuild does (`rebuild::read_only`), same batch.
    let reading = Instant::now();
    let read = rebuild::read_only(&stack.pool, batch).await?;
    let ceiling = rate(read, reading.elapsed());

    // One pass over the store for all read models, as `apex rebuild --all` does.
    let last: Arc<Mutex<Option<Progress>>> = Arc::default();
    let started = Instant::now();
    let outcome = {
        let last = last.clone();
        tokio::time::timeout(budget, async {
            let mut rebuilds = Vec::new();
            for model in ReadModel::ALL {
                rebuilds.push(
                    rebuild::try_start(&stack.pool, model)
                        .await?
                        .batch_size(batch),
                );
            }
            rebuild::run_all(rebuilds, move |p| {
                *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
            })
            .await
        })
        .await
    };
    let elapsed = started.elapsed().as_secs_f64();
    let progress = *last.lock().unwrap_or_else(|e| e.into_inner());
    let (total_seconds, done, extrapolated) = match outcome {
        Ok(result) => (elapsed, result?, false),
        Err(_) => {
            let (done, total) = progress.map_or((0, 0), |p| (p.done, p.total));
            let estimate = if done == 0 {
                f64::INFINITY
            } else {
                elapsed * total as f64 / done as f64
            };
            (estimate.max(elapsed), done, true)
        }
    };
    let per_model: Vec<_> = ReadModel::ALL.iter().map(|m| m.name()).collect();
    let per_second = read as f64 / total_seconds.max(1e-9);
    // Quick mode also proves the rebuilt read models equal a per-event replay of the store.
    let verified = if options.quick && !extrapolated {
        let mut conn = stack.pool.acquire().await?;
        let live = consistency::live(&mut conn).await?;
        drop(conn);
        let replayed = consistency::replayed(&stack.pool)
            .await
            .map_err(|e| anyhow::anyhow!("replaying the store: {e}"))?;
        let differences = consistency::differences(&live, &replayed);
        anyhow::ensure!(
            differences.is_empty(),
            "the rebuilt read models differ from a per-event replay: {differences:?}"
        );
        true
    } else {
        false
    };
    let details = json!({
        "events_in_store": read,
        "seed_seconds": round(seeded.elapsed.as_secs_f64()),
        "seed_events_per_second": round(rate(seeded.events as u64, seeded.elapsed)),
        "budget_seconds": budget.as_secs(),
        "batch": batch,
        "extrapolated": extrapolated,
        "verified_equal_to_per_event_replay": verified,
        "read_models": per_model,
        "events_applied": done,
        "seconds": round(elapsed),
        "seconds_for_all_read_models": round(total_seconds),
        "ceiling": "reading and decoding the same events as the rebuild does (rebuild::read_only, same batch size), applying nothing",
        "ceiling_per_second": round(ceiling),
    });
    Ok(vec![
        Row::new(
            "rebuild",
            if extrapolated {
                "store events/s, all read models (extrapolated)"
            } else {
                "store events/s, all read models"
            },
            per_second,
            "ev/s",
            Some((ceiling, "read+decode only")),
            Target::AtLeast(50_000.0),
        )
        .with(details),
    ])
}
