//! `write`: runner commands over HTTP (JWT, JSON, aggregate, append), 32 concurrent clients
//! on distinct instances, against single-row INSERT transactions from 32 connections.

use std::time::{Duration, Instant};

use apex_domain::{ActorRole, Tier};
use serde_json::json;
use tokio::task::JoinSet;

use super::client::{Api, Connection, thought};
use super::report::{Row, Target};
use super::stack::{self, Stack};
use super::stats::{Samples, rate, round};
use super::{Options, ceilings};
use crate::config::Settings;

const CLIENTS: u32 = 32;

/// Runs the scenario.
pub(crate) async fn run(settings: &Settings, options: &Options) -> anyhow::Result<Vec<Row>> {
    let mut stack = Stack::create(settings, CLIENTS + 8).await?;
    let result = measure(&mut stack, options).await;
    stack::finish(stack, result).await
}

async fn measure(stack: &mut Stack, options: &Options) -> anyhow::Result<Vec<Row>> {
    let (warmup, duration) = if options.quick {
        (Duration::ZERO, Duration::from_millis(500))
    } else {
        (Duration::from_secs(2), Duration::from_secs(15))
    };
    let ceiling =
        ceilings::insert_tps(stack.settings.database.options(), CLIENTS, duration).await?;

    let app = stack.app().await?;
    let api = Api::new(&app.url)?;
    let admin = stack.token("bench-admin", ActorRole::Admin, None)?;
    let runner = stack.token("bench-runner", ActorRole::Runner, None)?;
    let user = stack.token("bench-user", ActorRole::User, Some(Tier::Free))?;
    api.agent(&admin).await?;
    let mut instances = Vec::new();
    for _ in 0..CLIENTS {
        let id = api.instance(&user).await?;
        api.start(&runner, &id).await?;
        instances.push(id);
    }

    let mut connections = Vec::new();
    for _ in &instances {
        connections.push(Connection::open(&app.url, &runner).await?);
    }
    let started = Instant::now();
    let measure_from = started + warmup;
    let deadline = measure_from + duration;
    let mut tasks = JoinSet::new();
    for (id, mut connection) in instances.into_iter().zip(connections) {
        tasks.spawn(async move {
            let path = format!("/v1/runner/instances/{id}/thoughts");
            let (mut ok, mut failed, mut n) = (0u64, 0u64, 0u64);
            let mut samples = Samples::default();
            loop {
                let sent = Instant::now();
                if sent >= deadline {
                    break;
                }
                n += 1;
                let body = serde_json::to_vec(&thought(n))?;
                let result = connection.post(&path, body).await;
                let took = sent.elapsed();
                if sent < measure_from {
                    continue;
                }
                match result {
                    Ok(status) if status.is_success() => {
                        ok += 1;
                        samples.push(took);
                    }
                    _ => failed += 1,
                }
            }
            Ok::<_, anyhow::Error>((ok, failed, samples))
        });
    }
    let (mut ok, mut failed, mut latency) = (0u64, 0u64, Samples::default());
    while let Some(joined) = tasks.join_next().await {
        let (o, f, s) = joined??;
        ok += o;
        failed += f;
        latency.extend(s);
    }
    let elapsed = Instant::now().saturating_duration_since(measure_from);
    let per_second = rate(ok, elapsed);
    let p99 = latency.percentile_ms(99.0);
    let details = json!({
        "clients": CLIENTS,
        "seconds": round(elapsed.as_secs_f64()),
        "commands_ok": ok,
        "commands_failed": failed,
        "latency": latency.summary(),
        "ceiling": "single-row INSERT transactions, 32 connections (sqlx, autocommit)",
        "ceiling_tps": round(ceiling),
        "note": "relay and projectors not running: the write path alone",
    });
    Ok(vec![
        Row::new(
            "write",
            "commands/s",
            per_second,
            "cmd/s",
            Some((ceiling, "INSERT tps, 32 conns")),
            Target::RatioAtLeast(0.5),
        )
        .with(details),
        Row::new(
            "write",
            "command latency p99",
            p99,
            "ms",
            None,
            Target::Reported,
        ),
    ])
}
