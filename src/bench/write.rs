//! `write`: runner commands over HTTP (JWT, JSON, aggregate, append), 32 concurrent clients
//! on distinct instances, against single-row INSERT transactions from 32 connections. The API
//! is a replica in a process of its own; the clients and the ceiling run in the bench process.

use std::time::{Duration, Instant};

use apex_domain::{ActorRole, Tier};
use serde_json::json;
use tokio::task::JoinSet;

use super::client::{Api, Connection, thought};
use super::replica::Replica;
use super::report::{Row, Target};
use super::stack::{self, Stack};
use super::stats::{Samples, rate, round};
use super::{Options, ceilings};
use crate::config::Settings;

const CLIENTS: u32 = 32;

/// Turns of the ceiling and the commands (5 s each in a full run).
const SLICES: u32 = 3;

/// Runs the scenario.
pub(crate) async fn run(settings: &Settings, options: &Options) -> anyhow::Result<Vec<Row>> {
    let mut stack = Stack::create(settings, CLIENTS + 8).await?;
    let result = measure(&mut stack, options).await;
    stack::finish(stack, result).await
}

async fn measure(stack: &mut Stack, options: &Options) -> anyhow::Result<Vec<Row>> {
    let (warmup, slice) = if options.quick {
        (Duration::ZERO, Duration::from_millis(200))
    } else {
        (Duration::from_secs(2), Duration::from_secs(5))
    };

    let mut replica = Replica::spawn(options, &stack.settings).await?;
    let result = drive(stack, &replica.url, warmup, slice).await;
    replica.stop().await;
    result
}

async fn drive(
    stack: &Stack,
    url: &str,
    warmup: Duration,
    slice: Duration,
) -> anyhow::Result<Vec<Row>> {
    let api = Api::new(url)?;
    let admin = stack.token("bench-admin", ActorRole::Admin, None)?;
    let runner = stack.token("bench-runner", ActorRole::Runner, None)?;
    let user = stack.token("bench-user", ActorRole::User, Some(Tier::Free))?;
    api.agent(&admin).await?;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let id = api.instance(&user).await?;
        api.start(&runner, &id).await?;
        clients.push(Client {
            path: format!("/v1/runner/instances/{id}/thoughts"),
            connection: Connection::open(url, &runner).await?,
            sent: 0,
        });
    }

    // The ceiling and the commands take turns, slice by slice, so both see the machine as it
    // is at the time: on a shared machine its speed drifts within a minute, and a ceiling
    // measured once before the commands made the ratio follow the drift.
    let mut ceilings = Vec::new();
    let (mut ok, mut failed, mut latency) = (0u64, 0u64, Samples::default());
    let mut measured = Duration::ZERO;
    for index in 0..SLICES {
        ceilings
            .push(ceilings::insert_tps(stack.settings.database.options(), CLIENTS, slice).await?);
        let warmup = if index == 0 { warmup } else { Duration::ZERO };
        let result = commands(clients, warmup, slice).await?;
        clients = result.clients;
        ok += result.ok;
        failed += result.failed;
        latency.extend(result.latency);
        measured += result.measured;
    }
    let ceiling = ceilings.iter().sum::<f64>() / ceilings.len() as f64;
    let per_second = rate(ok, measured);
    let p99 = latency.percentile_ms(99.0);
    let details = json!({
        "clients": CLIENTS,
        "slices": SLICES,
        "seconds": round(measured.as_secs_f64()),
        "commands_ok": ok,
        "commands_failed": failed,
        "latency": latency.summary(),
        "ceiling": "single-row INSERT transactions, 32 connections (sqlx, autocommit), in slices alternating with the commands' (the mean of the slices)",
        "ceiling_tps": round(ceiling),
        "ceiling_slices_tps": ceilings.iter().map(|c| round(*c)).collect::<Vec<_>>(),
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

/// One client: its run's command path and its connection, kept from slice to slice.
struct Client {
    path: String,
    connection: Connection,
    /// Commands sent so far (numbers the thoughts).
    sent: u64,
}

/// What one slice of commands did.
struct Slice {
    clients: Vec<Client>,
    ok: u64,
    failed: u64,
    latency: Samples,
    measured: Duration,
}

/// Every client sends commands, one at a time, for `warmup` (not counted) then `duration`.
async fn commands(
    clients: Vec<Client>,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Slice> {
    let started = Instant::now();
    let measure_from = started + warmup;
    let deadline = measure_from + duration;
    let mut tasks = JoinSet::new();
    for mut client in clients {
        tasks.spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut samples = Samples::default();
            loop {
                let sent = Instant::now();
                if sent >= deadline {
                    break;
                }
                client.sent += 1;
                let body = serde_json::to_vec(&thought(client.sent))?;
                let result = client.connection.post(&client.path, body).await;
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
            Ok::<_, anyhow::Error>((client, ok, failed, samples))
        });
    }
    let mut slice = Slice {
        clients: Vec::with_capacity(tasks.len()),
        ok: 0,
        failed: 0,
        latency: Samples::default(),
        measured: Duration::ZERO,
    };
    while let Some(joined) = tasks.join_next().await {
        let (client, ok, failed, samples) = joined??;
        slice.clients.push(client);
        slice.ok += ok;
        slice.failed += failed;
        slice.latency.extend(samples);
    }
    slice.measured = Instant::now().saturating_duration_since(measure_from);
    Ok(slice)
}
