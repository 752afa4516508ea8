//! `apex chaos`: a mixed load against real processes while faults are injected, then a proof
//! that nothing was lost, applied twice, or shown out of order.
//!
//! Topology (child processes of this binary, own database, own RabbitMQ vhost): two API
//! replicas, two relays (one active, one standing by), two projector processes. During the
//! load the injector SIGKILLs a random relay, projector or API replica and restarts it,
//! restarts the RabbitMQ application once, and has PostgreSQL terminate every connection to the
//! cluster's database once. Afterwards, at quiescence, it checks:
//! * every accepted command (2xx) has exactly one event, of the right type, at the sequence
//!   its answer named (commands are retried with their `Idempotency-Key`);
//! * the read models equal a fresh replay of the store (every event in every read model once);
//! * every chat client's stream, across its reconnects and resumes, is complete, ordered and
//!   free of duplicates.

mod cluster;
mod load;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use uuid::Uuid;

use crate::config::Settings;
use cluster::Cluster;

/// Options of a chaos run.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// How long the load runs.
    pub duration: Duration,
    /// Stop the load after this many accepted commands (if reached first).
    pub max_commands: u64,
    /// Concurrent load workers (each drives its own runs).
    pub workers: usize,
    /// Distinct users (each with a chat client).
    pub users: usize,
    /// Process kills to inject (plus one RabbitMQ restart and one drop of every database
    /// connection).
    pub kills: usize,
}

impl ChaosOptions {
    /// The CI variant: seconds, a handful of faults.
    pub fn quick() -> Self {
        Self {
            duration: Duration::from_secs(20),
            max_commands: 3_000,
            workers: 8,
            users: 4,
            kills: 3,
        }
    }

    /// The full run: at least 100k commands and 10 faults.
    pub fn full() -> Self {
        Self {
            duration: Duration::from_secs(900),
            max_commands: 100_000,
            workers: 32,
            users: 16,
            kills: 12,
        }
    }
}

/// What the run found.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    /// Commands answered 2xx.
    pub commands_accepted: u64,
    /// Commands answered 2xx from an earlier attempt's idempotency record.
    pub commands_replayed: u64,
    /// Command attempts that failed in transit or with 5xx/429 and were retried.
    pub attempts_retried: u64,
    /// Events in the store.
    pub events: i64,
    /// Faults injected (process kills + broker restarts).
    pub faults_injected: u64,
    /// Chat clients' reconnects.
    pub client_reconnects: u64,
    /// Steps received by chat clients.
    pub chat_messages: u64,
    /// Everything that does not hold (0 is the only passing value).
    pub mismatches: u64,
    /// What the mismatches are.
    pub findings: Vec<String>,
    /// Seconds of load.
    pub load_seconds: f64,
}

/// Runs the chaos scenario; fails when any mismatch is found.
pub async fn run(settings: &Settings, options: ChaosOptions) -> anyhow::Result<Summary> {
    let id = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let mut cluster = Cluster::start(settings, &id)
        .await
        .context("starting the chaos cluster")?;
    let result = exercise(&mut cluster, &options).await;
    let summary = match result {
        Ok(summary) => summary,
        Err(e) => {
            cluster.stop().await;
            return Err(e);
        }
    };
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if summary.mismatches == 0 {
        cluster.destroy().await;
        Ok(summary)
    } else {
        cluster.stop().await;
        bail!(
            "{} mismatch(es); database {} kept for inspection",
            summary.mismatches,
            cluster.database
        )
    }
}

async fn exercise(cluster: &mut Cluster, options: &ChaosOptions) -> anyhow::Result<Summary> {
    cluster.wait_ready(Duration::from_secs(60)).await?;
    let load = load::Load::new(cluster, options)?;
    load.prepare().await?;
    let clients = load.start_clients();
    let started = Instant::now();
    let workers = load.start_workers(options);
    let mut faults = 0u64;
    let mut kills_done = 0;
    let mut broker_restarted = false;
    let mut connections_dropped = false;
    // Faults are spread evenly over the run's progress (time or commands, whichever ends it),
    // so every one of them lands under load.
    let slots = (options.kills + 2) as f64;
    while !load.done(started, options) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let progress = load.progress(started, options);
        if kills_done < options.kills && progress >= (kills_done + 1) as f64 / slots {
            cluster.kill_random(kills_done).await?;
            kills_done += 1;
            faults += 1;
        }
        if !broker_restarted && kills_done * 2 >= options.kills {
            cluster.restart_broker().await?;
            broker_restarted = true;
            faults += 1;
        }
        if !connections_dropped && kills_done * 4 >= options.kills * 3 {
            cluster.drop_database_connections().await?;
            connections_dropped = true;
            faults += 1;
        }
    }
    // Whatever the schedule, the run injects everything it promised.
    while kills_done < options.kills {
        cluster.kill_random(kills_done).await?;
        kills_done += 1;
        faults += 1;
    }
    if !broker_restarted {
        cluster.restart_broker().await?;
        faults += 1;
    }
    if !connections_dropped {
        cluster.drop_database_connections().await?;
        faults += 1;
    }
    let load_seconds = started.elapsed().as_secs_f64();
    load.stop();
    let outcomes = load::join(workers).await;
    cluster.ensure_running().await?;
    cluster.wait_quiescent(Duration::from_secs(120)).await?;

    let mut summary = Summary {
        faults_injected: faults,
        load_seconds,
        ..Summary::default()
    };
    let accepted = outcomes.accepted;
    summary.commands_accepted = accepted.len() as u64;
    summary.commands_replayed = outcomes.replayed;
    summary.attempts_retried = outcomes.retried;
    summary.findings.extend(outcomes.findings);

    // 1. Every accepted command has exactly one event, where its answer said.
    let events: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT aggregate_id, sequence, event_type FROM events WHERE aggregate_type = 'instance'",
    )
    .fetch_all(&cluster.pool)
    .await?;
    summary.events = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&cluster.pool)
        .await?;
    let stored: HashMap<(String, i64), String> =
        events.into_iter().map(|(a, s, t)| ((a, s), t)).collect();
    let mut claimed: HashMap<(String, i64), u32> = HashMap::new();
    for command in &accepted {
        let key = (command.instance.clone(), command.sequence);
        *claimed.entry(key.clone()).or_default() += 1;
        match stored.get(&key) {
            Some(t) if t == command.event_type => {}
            Some(t) => summary.findings.push(format!(
                "{}#{}: answered for {} but the event is {t}",
                key.0, key.1, command.event_type
            )),
            None => summary.findings.push(format!(
                "{}#{}: accepted {} has no event",
                key.0, key.1, command.event_type
            )),
        }
    }
    for (key, n) in &claimed {
        if *n > 1 {
            summary.findings.push(format!(
                "{}#{}: claimed by {n} accepted commands",
                key.0, key.1
            ));
        }
    }
    let unclaimed = stored.keys().filter(|k| !claimed.contains_key(*k)).count();
    if unclaimed > 0 {
        // Appends whose answer was lost and whose retries were exhausted: not a lost or
        // duplicated command, but worth knowing.
        println!("note: {unclaimed} event(s) belong to commands whose answer never arrived");
    }

    // 2. Every event in every read model exactly once.
    let mut conn = cluster.pool.acquire().await?;
    let live = apex_projections::consistency::live(&mut conn).await?;
    drop(conn);
    let replay = apex_projections::consistency::replayed(&cluster.pool)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    for (table, only_live, only_replay) in
        apex_projections::consistency::differences(&live, &replay)
    {
        summary.findings.push(format!(
            "read model {table}: {only_live} row(s) only live, {only_replay} only in a replay"
        ));
    }

    // 3. Every chat stream complete, ordered, duplicate-free.
    let streams = load.finish_clients(clients, Duration::from_secs(60)).await;
    summary.client_reconnects = streams.reconnects;
    summary.chat_messages = streams.messages;
    summary.findings.extend(streams.findings);

    summary.mismatches = summary.findings.len() as u64;
    Ok(summary)
}
