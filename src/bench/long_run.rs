//! `long-run`: command latency on a run with 10,000 events against runs with 10 events,
//! measured alternately over HTTP by one client in the same run.

use std::time::Instant;

use apex_commands::CommandContext;
use apex_domain::instance::InstanceAction;
use apex_domain::{Actor, ActorRole, Tier};
use serde_json::json;

use super::Options;
use super::client::{Api, thought};
use super::report::{Row, Target};
use super::stack::{self, Stack};
use super::stats::{Samples, round};
use crate::config::Settings;

/// Short runs (each gets `SAMPLES / SHORT_RUNS` commands, so it stays near 10 events).
const SHORT_RUNS: usize = 40;

/// Runs the scenario.
pub(crate) async fn run(settings: &Settings, options: &Options) -> anyhow::Result<Vec<Row>> {
    let mut stack = Stack::create(settings, 16).await?;
    let result = measure(&mut stack, options).await;
    stack::finish(stack, result).await
}

async fn measure(stack: &mut Stack, options: &Options) -> anyhow::Result<Vec<Row>> {
    let (long_events, samples) = if options.quick {
        (200u64, 40usize)
    } else {
        (10_000u64, 400usize)
    };
    let app = stack.app().await?;
    let api = Api::new(&app.url)?;
    let admin = stack.token("bench-admin", ActorRole::Admin, None)?;
    let runner = stack.token("bench-runner", ActorRole::Runner, None)?;
    let user = stack.token("bench-user", ActorRole::User, Some(Tier::Free))?;
    api.agent(&admin).await?;

    // The long run: created, started, then thoughts through the command service (the same
    // code path as HTTP, without the HTTP overhead) up to `long_events` events.
    let long = api.instance(&user).await?;
    api.start(&runner, &long).await?;
    let context = CommandContext::new(Actor::new("bench-runner", ActorRole::Runner));
    let seeding = Instant::now();
    for n in 3..=long_events {
        app.state
            .commands
            .instance(
                &long,
                InstanceAction::Think {
                    thought: format!("thought {n}"),
                    prompt: None,
                    raw: None,
                },
                &context,
            )
            .await?;
    }
    let seeding = seeding.elapsed();

    // Short runs: created, started and 8 thoughts = 10 events each.
    let mut short = Vec::new();
    for _ in 0..SHORT_RUNS {
        let id = api.instance(&user).await?;
        api.start(&runner, &id).await?;
        for n in 0..8 {
            api.post_ok(
                &format!("/v1/runner/instances/{id}/thoughts"),
                &runner,
                &thought(n),
            )
            .await?;
        }
        short.push(id);
    }

    let (mut at_10, mut at_10k) = (Samples::default(), Samples::default());
    for i in 0..samples {
        for (id, out) in [(&short[i % SHORT_RUNS], &mut at_10), (&long, &mut at_10k)] {
            let sent = Instant::now();
            api.post_ok(
                &format!("/v1/runner/instances/{id}/thoughts"),
                &runner,
                &thought(i as u64),
            )
            .await?;
            out.push(sent.elapsed());
        }
    }
    let (p50_10, p50_10k) = (at_10.percentile_ms(50.0), at_10k.percentile_ms(50.0));
    let (p99_10, p99_10k) = (at_10.percentile_ms(99.0), at_10k.percentile_ms(99.0));
    let details = json!({
        "long_run_events": long_events,
        "long_run_seed_seconds": round(seeding.as_secs_f64()),
        "short_runs": SHORT_RUNS,
        "samples_each": samples,
        "at_10_events": at_10.summary(),
        "at_10k_events": at_10k.summary(),
        "snapshot_every": apex_commands::INSTANCE_SNAPSHOT_EVERY,
        "ceiling": "the same command on runs with 10 events, alternated with the long run",
    });
    Ok(vec![
        Row::new(
            "long-run",
            &format!("latency p50 at {long_events} events"),
            p50_10k,
            "ms",
            Some((p50_10, "p50 at 10 events")),
            Target::RatioAtMost(1.5),
        )
        .with(details),
        Row::new(
            "long-run",
            &format!("latency p99 at {long_events} events"),
            p99_10k,
            "ms",
            Some((p99_10, "p99 at 10 events")),
            Target::RatioAtMost(1.5),
        ),
    ])
}
