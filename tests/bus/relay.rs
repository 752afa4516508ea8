//! The relay publishes every committed event once per pass, in (transaction, position) order,
//! skips nothing when transactions commit out of order, and recovers from crashes and broker
//! outages without losing anything.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use apex_projections::relay;
use rand_like::jitter_ms;
use serde_json::Value;
use sqlx::Connection;

use crate::broker::close_broker_connections;
use crate::helpers::{bus, insert_raw};

mod rand_like {
    /// A cheap pseudo-random delay from a seed.
    pub fn jitter_ms(seed: u64) -> u64 {
        (seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
            >> 33)
            % 25
    }
}

/// `(subject, sequence)` of each message.
fn keys(messages: &[Value]) -> Vec<(String, i64)> {
    messages
        .iter()
        .map(|m| {
            (
                m["subject"].as_str().unwrap().to_owned(),
                m["sequence"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn an_event_whose_transaction_commits_late_is_published_not_skipped() {
    let bus = bus().await;
    let (channel, tap) = bus.tap("late").await;
    let relay = bus.spawn_relay();

    // A takes the lower position but stays open while B commits.
    let mut a = bus.pool.begin().await.unwrap();
    insert_raw(&mut a, "00000000-0000-0000-0000-00000000000a", 1).await;
    let mut b = bus.pool.begin().await.unwrap();
    insert_raw(&mut b, "00000000-0000-0000-0000-00000000000b", 1).await;
    b.commit().await.unwrap();

    let early = bus
        .drain(&channel, &tap, 1, Duration::from_millis(800))
        .await;
    assert!(
        early.is_empty(),
        "B must wait behind the still-open A: {early:?}"
    );

    a.commit().await.unwrap();
    let messages = bus.drain(&channel, &tap, 2, Duration::from_secs(10)).await;
    assert_eq!(
        keys(&messages),
        vec![
            ("00000000-0000-0000-0000-00000000000a".to_owned(), 1),
            ("00000000-0000-0000-0000-00000000000b".to_owned(), 1)
        ]
    );
    let more = bus
        .drain(&channel, &tap, 1, Duration::from_millis(500))
        .await;
    assert!(more.is_empty(), "published twice: {more:?}");
    bus.finish(vec![relay]).await;
}

#[tokio::test]
async fn concurrent_writers_holding_transactions_open_lose_no_event_and_keep_commit_order() {
    let bus = bus().await;
    let (channel, tap) = bus.tap("concurrent").await;
    let relay = bus.spawn_relay();

    let writers = 16;
    let transactions = 15;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let pool = bus.pool.clone();
        tasks.push(tokio::spawn(async move {
            let aggregate = format!("00000000-0000-0000-0000-{w:012}");
            let mut sequence = 0;
            for t in 0..transactions {
                let mut tx = pool.begin().await.unwrap();
                let n = 1 + (t % 3);
                for _ in 0..n {
                    sequence += 1;
                    insert_raw(&mut tx, &aggregate, sequence).await;
                }
                // Hold some transactions open while others commit.
                tokio::time::sleep(Duration::from_millis(jitter_ms((w * 100 + t) as u64))).await;
                tx.commit().await.unwrap();
            }
            sequence
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let messages = bus
        .drain(&channel, &tap, total as usize, Duration::from_secs(30))
        .await;
    let received = keys(&messages);
    assert_eq!(received.len(), total as usize, "every event published");
    let distinct: HashSet<_> = received.iter().cloned().collect();
    assert_eq!(distinct.len(), received.len(), "no event published twice");

    // The publish order is the store's (transaction_id, position) order ...
    let expected: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregate_id, sequence FROM events ORDER BY transaction_id, position",
    )
    .fetch_all(&bus.pool)
    .await
    .unwrap();
    assert_eq!(received, expected);
    // ... which keeps every aggregate's sequence in order.
    let mut last: HashMap<String, i64> = HashMap::new();
    for (aggregate, sequence) in &received {
        let previous = last.insert(aggregate.clone(), *sequence).unwrap_or(0);
        assert_eq!(*sequence, previous + 1, "{aggregate} out of order");
    }
    // The relay records its checkpoint after the broker confirms a batch, which can be after
    // the tap has received it: wait for the record (bounded), then check it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (position, published) = loop {
        let (position, published): (i64, i64) =
            sqlx::query_as("SELECT position, published_total FROM relay_checkpoints")
                .fetch_one(&bus.pool)
                .await
                .unwrap();
        if published >= total || std::time::Instant::now() > deadline {
            break (position, published);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(published, total);
    assert!(position > 0);
    bus.finish(vec![relay]).await;
}

#[tokio::test]
async fn a_relay_killed_between_publish_and_checkpoint_republishes_and_read_models_stay_exact() {
    let bus = bus().await;
    bus.declare_projectors().await;
    bus.agent("triage", &["search"]).await;
    let mut runs = Vec::new();
    for u in 0..3 {
        let id = bus.run(&format!("user-{u}"), "triage").await;
        bus.think(&id, 5).await;
        runs.push(id);
    }
    // A relay that published everything and died before writing its checkpoint.
    let channel = apex_projections::amqp::confirm_channel(&bus.connection)
        .await
        .unwrap();
    let pending = apex_projections::store::all_after(&bus.pool, 0, 0, 10_000)
        .await
        .unwrap();
    relay::publish_batch(&channel, &bus.amqp.exchange, &pending)
        .await
        .unwrap();

    let mut tasks = bus.spawn_projectors();
    let first = bus.spawn_relay();
    bus.think(&runs[0], 20).await;
    // Kill it mid-flight, keep commanding, start a new one.
    tokio::time::sleep(Duration::from_millis(30)).await;
    first.abort();
    bus.think(&runs[1], 20).await;
    tasks.push(bus.spawn_relay());
    bus.think(&runs[2], 20).await;

    bus.wait_projected(Duration::from_secs(90)).await;
    assert_eq!(bus.read_models().await, bus.replayed_read_models().await);
    // The republished copies may still be in flight when the offsets catch up.
    let mut skipped: i64 = 0;
    for _ in 0..200 {
        skipped = sqlx::query_scalar("SELECT sum(skipped_total)::bigint FROM projector_status")
            .fetch_one(&bus.pool)
            .await
            .unwrap();
        if skipped > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(skipped > 0, "the republished events were seen and skipped");
    assert_eq!(bus.read_models().await, bus.replayed_read_models().await);
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&bus.pool)
        .await
        .unwrap();
    assert_eq!(dead, 0);
    let thoughts: i64 = sqlx::query_scalar("SELECT sum(thought_count)::bigint FROM rm_instances")
        .fetch_one(&bus.pool)
        .await
        .unwrap();
    assert_eq!(thoughts, 3 * 5 + 60);
    bus.finish(tasks).await;
}

#[tokio::test]
async fn a_standby_relay_takes_over_when_the_active_one_dies() {
    let bus = bus().await;
    let (channel, tap) = bus.tap("standby").await;
    let active = bus.spawn_relay();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let standby = bus.spawn_relay();
    let mut conn = sqlx::PgConnection::connect_with(&bus.settings.database.options())
        .await
        .unwrap();
    for s in 1..=10 {
        insert_raw(&mut conn, "00000000-0000-0000-0000-0000000000aa", s).await;
    }
    let first = bus.drain(&channel, &tap, 10, Duration::from_secs(10)).await;
    assert_eq!(first.len(), 10);
    // Wait for the checkpoint, then kill the active relay.
    for _ in 0..100 {
        let published: i64 = sqlx::query_scalar("SELECT published_total FROM relay_checkpoints")
            .fetch_one(&bus.pool)
            .await
            .unwrap();
        if published == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    active.abort();
    for s in 11..=20 {
        insert_raw(&mut conn, "00000000-0000-0000-0000-0000000000aa", s).await;
    }
    let second = bus.drain(&channel, &tap, 10, Duration::from_secs(15)).await;
    let sequences: Vec<i64> = keys(&second).into_iter().map(|(_, s)| s).collect();
    assert_eq!(
        sequences,
        (11..=20).collect::<Vec<_>>(),
        "the standby published the rest, once"
    );
    bus.finish(vec![standby]).await;
}

#[tokio::test]
async fn commands_succeed_while_the_broker_drops_the_relay_and_nothing_is_lost() {
    let bus = bus().await;
    bus.declare_projectors().await;
    let mut tasks = bus.spawn_projectors();
    tasks.push(bus.spawn_relay());
    bus.agent("triage", &["search"]).await;
    let id = bus.run("user-1", "triage").await;
    bus.think(&id, 10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let name = format!("apex-relay-{}", bus.relay_config().name);
    let closed = close_broker_connections(&name).await;
    assert_eq!(closed, 1, "the relay's connection was found and closed");
    // Commands only touch PostgreSQL: they keep succeeding.
    bus.think(&id, 30).await;
    bus.wait_projected(Duration::from_secs(90)).await;
    let thoughts: i32 = sqlx::query_scalar("SELECT thought_count FROM rm_instances")
        .fetch_one(&bus.pool)
        .await
        .unwrap();
    assert_eq!(thoughts, 40);
    assert_eq!(bus.read_models().await, bus.replayed_read_models().await);
    bus.finish(tasks).await;
}

/// A transaction that appends nothing (so never notifies) still holds the snapshot horizon: the
/// relay, having found a committed event held back behind it, reads again on its own shortly
/// after it ends, long before its poll interval.
#[tokio::test]
async fn an_event_held_back_by_a_transaction_that_appends_nothing_is_published_when_it_ends() {
    let bus = bus().await;
    let (channel, tap) = bus.tap("held").await;
    let mut config = bus.relay_config();
    config.poll_interval = Duration::from_secs(6);
    let relay = tokio::spawn(relay::run(
        bus.pool.clone(),
        config,
        bus.shutdown.subscribe(),
    ));
    let mut holder = bus.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *holder)
        .await
        .unwrap();
    let mut writer = bus.pool.acquire().await.unwrap();
    insert_raw(&mut writer, "00000000-0000-0000-0000-0000000000c1", 1).await;
    let early = bus
        .drain(&channel, &tap, 1, Duration::from_millis(800))
        .await;
    assert!(early.is_empty(), "published past the horizon: {early:?}");
    holder.commit().await.unwrap();
    let published_within = std::time::Instant::now();
    let messages = bus.drain(&channel, &tap, 1, Duration::from_secs(10)).await;
    assert_eq!(
        keys(&messages),
        vec![("00000000-0000-0000-0000-0000000000c1".to_owned(), 1)]
    );
    assert!(
        published_within.elapsed() < Duration::from_secs(4),
        "waited for the poll: {:?}",
        published_within.elapsed()
    );
    bus.finish(vec![relay]).await;
}

/// The timeline is written with the events, so the relay announces a batch's steps on the chat
/// exchange with the batch: each step once, in store order, with its run's owner for routing,
/// display data only; a run's creation is not announced.
#[tokio::test]
async fn the_relay_announces_the_steps_committed_with_its_batch_on_the_chat_exchange() {
    let bus = bus().await;
    let (channel, tap) = bus.chat_tap("steps").await;
    bus.agent("triage", &["search"]).await;
    let id = bus.run("user-1", "triage").await; // sequences 1 and 2
    bus.think(&id, 2).await; // 3 and 4
    let relay = bus.spawn_relay();

    let mut updates: Vec<Value> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while updates.len() < 3 && tokio::time::Instant::now() < deadline {
        for message in bus.drain(&channel, &tap, 1, Duration::from_secs(1)).await {
            updates.extend(message.as_array().unwrap().iter().cloned());
        }
    }
    let steps: Vec<(String, i64, String, String)> = updates
        .iter()
        .map(|u| {
            (
                u["instance_id"].as_str().unwrap().to_owned(),
                u["sequence"].as_i64().unwrap(),
                u["owner_id"].as_str().unwrap().to_owned(),
                u["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let step =
        |sequence: i64, kind: &str| (id.clone(), sequence, "user-1".to_owned(), kind.to_owned());
    assert_eq!(
        steps,
        vec![
            step(2, "agent_started"),
            step(3, "agent_thinking"),
            step(4, "agent_thinking")
        ]
    );
    assert!(
        updates.iter().all(|u| !u.to_string().contains("internal")),
        "{updates:?}"
    );
    let more = bus
        .drain(&channel, &tap, 1, Duration::from_millis(500))
        .await;
    assert!(more.is_empty(), "announced twice: {more:?}");
    bus.finish(vec![relay]).await;
}
