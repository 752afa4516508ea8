//! `fan-out`: 10,000 chat WebSockets on one API replica, one run per connection, one step
//! per run; every step must arrive, p99 ≤ 50 ms, and the replica stay under 500 MB resident.
//!
//! The replica is a separate `apex serve` process (so its memory and file descriptors are its
//! own); the clients, the relay and the projectors run in the bench process. Baseline: the
//! same steps at the same rate while only the first 100 sockets are connected.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use apex_domain::{ActorRole, Tier};
use apex_projections::ProjectorGroup;
use futures::StreamExt;
use futures::stream;
use serde_json::json;

use super::Options;
use super::client::{self, Api, Command, Inbox};
use super::replica::Replica;
use super::report::{Row, Target};
use super::stack::{self, Stack};
use super::stats::round;
use crate::config::Settings;

/// Resident memory the replica may use.
const MEMORY_LIMIT_MB: f64 = 500.0;

/// Runs the scenario.
pub(crate) async fn run(settings: &Settings, options: &Options) -> anyhow::Result<Vec<Row>> {
    let mut stack = Stack::create(settings, 16).await?;
    let result = measure(&mut stack, options).await;
    stack::finish(stack, result).await
}

async fn measure(stack: &mut Stack, options: &Options) -> anyhow::Result<Vec<Row>> {
    let (connections, baseline, per_second) = if options.quick {
        (20usize, 5usize, 100.0)
    } else {
        (10_000usize, 100usize, 500.0)
    };
    check_open_files(connections + 512)?;
    let mut replica = Replica::spawn(options, &stack.settings).await?;
    let result = drive(stack, &mut replica, connections, baseline, per_second).await;
    replica.stop().await;
    result
}

async fn drive(
    stack: &mut Stack,
    replica: &mut Replica,
    connections: usize,
    baseline: usize,
    per_second: f64,
) -> anyhow::Result<Vec<Row>> {
    stack.workers(true, &ProjectorGroup::ALL);
    let api = Api::new(&replica.url)?;
    let admin = stack.token("bench-admin", ActorRole::Admin, None)?;
    let runner = stack.token("bench-runner", ActorRole::Runner, None)?;
    api.agent(&admin).await?;
    let users: Vec<String> = (0..connections)
        .map(|u| {
            stack.token(
                &format!("bench-user-{u}"),
                ActorRole::User,
                Some(Tier::Free),
            )
        })
        .collect::<anyhow::Result<_>>()?;

    // One run per user, created over HTTP, 32 at a time.
    let created = Instant::now();
    let instances: Vec<String> = stream::iter(users.iter().map(|t| api.instance(t)))
        .buffered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let created = created.elapsed();
    stack::wait_projected(&stack.pool, connections as i64, Duration::from_secs(300)).await?;
    let rss_idle = replica.memory()?;

    let inbox = Arc::new(Inbox::default());
    let connect = |range: std::ops::Range<usize>| {
        let (users, inbox, base) = (&users, inbox.clone(), api.base().to_owned());
        async move {
            stream::iter(range.map(|u| {
                let (inbox, base) = (inbox.clone(), base.clone());
                async move { client::listen(&base, &users[u], inbox).await }
            }))
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()
        }
    };
    let start = |range: std::ops::Range<usize>| -> Vec<Command> {
        range
            .map(|i| Command {
                path: format!("/v1/runner/instances/{}/start", instances[i]),
                body: json!({"message": "On it"}),
            })
            .collect()
    };
    let wait = Duration::from_secs(60);

    let mut sockets = connect(0..baseline).await?;
    let mut few = client::paced(
        &api,
        &runner,
        start(0..baseline),
        per_second,
        256,
        &inbox,
        wait,
    )
    .await?;

    let connecting = Instant::now();
    sockets.extend(connect(baseline..connections).await?);
    let connecting = connecting.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected = replica.memory()?;
    let mut many = client::paced(
        &api,
        &runner,
        start(baseline..connections),
        per_second,
        256,
        &inbox,
        wait,
    )
    .await?;
    let rss_after = replica.memory()?;
    let peak = replica.peak_memory()?;
    for socket in sockets {
        socket.abort();
    }

    let p99 = many.accepted_to_received.percentile_ms(99.0);
    let p99_few = few.accepted_to_received.percentile_ms(99.0);
    let runs = connections - baseline;
    let details = json!({
        "connections": connections,
        "steps_per_second_offered": round(many.offered_rate),
        "runs_measured": runs,
        "accepted": many.accepted,
        "failed": many.failed,
        "delivered": many.delivered,
        "sockets_closed_by_server": inbox.closed.load(std::sync::atomic::Ordering::Relaxed),
        "accepted_to_received": many.accepted_to_received.summary(),
        "sent_to_received": many.sent_to_received.summary(),
        "command_latency": many.command.summary(),
        "baseline": format!("the same steps at the same rate with {baseline} sockets connected"),
        "baseline_accepted_to_received": few.accepted_to_received.summary(),
        "create_runs_seconds": round(created.as_secs_f64()),
        "connect_seconds": round(connecting.as_secs_f64()),
        "replica_rss_mb": {
            "idle": round(rss_idle), "connected": round(rss_connected),
            "after_delivery": round(rss_after), "peak": round(peak),
        },
    });
    Ok(vec![
        Row::new(
            "fan-out",
            "delivered",
            many.delivered as f64 / runs.max(1) as f64 * 100.0,
            "%",
            None,
            Target::AtLeast(100.0),
        )
        .with(details),
        Row::new(
            "fan-out",
            "accepted→received p99",
            p99,
            "ms",
            Some((p99_few, "p99 with few sockets")),
            Target::AtMost(50.0),
        ),
        Row::new(
            "fan-out",
            "replica peak RSS",
            peak,
            "MB",
            Some((rss_idle, "RSS before sockets")),
            Target::AtMost(MEMORY_LIMIT_MB),
        ),
    ])
}

/// Fails early, with the fix, when this process may not open `needed` files.
fn check_open_files(needed: usize) -> anyhow::Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    match soft {
        Some(soft) if soft < needed => bail!(
            "fan-out needs {needed} open files but the limit is {soft}: raise it (`ulimit -n {needed}`) and run again"
        ),
        _ => Ok(()),
    }
}
