//! `live`: command accepted → step received on a connected WebSocket client, at 1,000
//! commands/s for 60 s, through the whole pipeline (append with the inline timeline → relay →
//! chat exchange → hub → socket), with every projector running.

use std::sync::Arc;
use std::time::Duration;

use apex_domain::{ActorRole, Tier};
use apex_projections::ProjectorGroup;
use serde_json::json;

use super::client::{self, Api, Command, Inbox, thought};
use super::report::{Row, Target};
use super::stack::{self, Stack};
use super::stages;
use super::stats::round;
use super::{Options, ceilings};
use crate::config::Settings;

/// Chat users, one socket each.
const USERS: usize = 10;
/// Runs per user.
const RUNS_PER_USER: usize = 10;

/// Runs the scenario.
pub(crate) async fn run(settings: &Settings, options: &Options) -> anyhow::Result<Vec<Row>> {
    let mut stack = Stack::create(settings, 32).await?;
    let result = measure(&mut stack, options).await;
    stack::finish(stack, result).await
}

async fn measure(stack: &mut Stack, options: &Options) -> anyhow::Result<Vec<Row>> {
    let (per_second, seconds): (f64, f64) = if options.quick {
        (200.0, 1.0)
    } else {
        (1000.0, 60.0)
    };
    let count = (per_second * seconds) as usize;
    let mut hop = ceilings::broker_hop(
        &stack.amqp(),
        (per_second * seconds.min(5.0)) as usize,
        per_second,
    )
    .await?;

    let app = stack.app().await?;
    stack.workers(true, &ProjectorGroup::ALL);
    let api = Api::new(&app.url)?;
    let admin = stack.token("bench-admin", ActorRole::Admin, None)?;
    let runner = stack.token("bench-runner", ActorRole::Runner, None)?;
    api.agent(&admin).await?;
    let inbox = Arc::new(Inbox::default());
    let mut sockets = Vec::new();
    let mut instances = Vec::new();
    for u in 0..USERS {
        let user = stack.token(
            &format!("bench-user-{u}"),
            ActorRole::User,
            Some(Tier::Free),
        )?;
        sockets.push(client::listen(api.base(), &user, inbox.clone()).await?);
        for _ in 0..RUNS_PER_USER {
            let id = api.instance(&user).await?;
            api.start(&runner, &id).await?;
            instances.push(id);
        }
    }
    // Let creation and start reach every read model before measuring.
    stack::wait_projected(
        &stack.pool,
        2 * instances.len() as i64,
        Duration::from_secs(60),
    )
    .await?;

    let commands = (0..count)
        .map(|i| Command {
            path: format!(
                "/v1/runner/instances/{}/thoughts",
                instances[i % instances.len()]
            ),
            body: thought(i as u64),
        })
        .collect();
    let before = stages::snapshot();
    let mut d = client::paced(
        &api,
        &runner,
        commands,
        per_second,
        512,
        &inbox,
        Duration::from_secs(30),
    )
    .await?;
    let stages = stages::breakdown(&before, &stages::snapshot());
    eprintln!("bench: live stages, {}", stages::line(&stages));
    for socket in sockets {
        socket.abort();
    }
    let p50 = d.accepted_to_received.percentile_ms(50.0);
    let p99 = d.accepted_to_received.percentile_ms(99.0);
    let hop_p50 = hop.percentile_ms(50.0);
    let hop_p99 = hop.percentile_ms(99.0);
    let details = json!({
        "commands_per_second_offered": round(d.offered_rate),
        "seconds": seconds,
        "sockets": USERS,
        "runs": instances.len(),
        "accepted": d.accepted,
        "failed": d.failed,
        "delivered": d.delivered,
        "arrived_before_http_answer": d.before_answer,
        "accepted_to_received": d.accepted_to_received.summary(),
        "sent_to_received": d.sent_to_received.summary(),
        "command_latency": d.command.summary(),
        "ceiling": "one bare RabbitMQ hop (publish → connected consumer) at the same rate",
        "broker_hop": hop.summary(),
        "since_recorded": stages,
    });
    Ok(vec![
        Row::new(
            "live",
            "accepted→received p50",
            p50,
            "ms",
            Some((hop_p50, "bare broker hop p50")),
            Target::AtMost(5.0),
        )
        .with(details),
        Row::new(
            "live",
            "accepted→received p99",
            p99,
            "ms",
            Some((hop_p99, "bare broker hop p99")),
            Target::AtMost(25.0),
        ),
        Row::new(
            "live",
            "delivered",
            d.delivered as f64 / d.accepted.max(1) as f64 * 100.0,
            "%",
            None,
            Target::AtLeast(100.0),
        ),
    ])
}
