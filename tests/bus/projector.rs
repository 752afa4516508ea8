//! Projectors apply each event once per read model, repair gaps from the store and park
//! poison messages in a dead-letter queue without stalling.

use std::time::Duration;

use apex_projections::amqp::QueueType;
use apex_projections::{ProjectorGroup, ReadModel};
use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};

use crate::helpers::{Bus, bus};

/// Publishes the stored events of `aggregate` with the given sequences, in that order, straight
/// into `group`'s queue.
async fn inject(bus: &Bus, group: ProjectorGroup, aggregate: &str, sequences: &[i64]) {
    inject_into(
        bus,
        &bus.projector_config().queue(group),
        group,
        aggregate,
        sequences,
    )
    .await;
}

/// Publishes the stored events of `aggregate` with the given sequences, in that order, straight
/// into `queue`.
async fn inject_into(
    bus: &Bus,
    queue: &str,
    group: ProjectorGroup,
    aggregate: &str,
    sequences: &[i64],
) {
    let channel = apex_projections::amqp::confirm_channel(&bus.connection)
        .await
        .unwrap();
    let mut conn = bus.pool.acquire().await.unwrap();
    let events =
        apex_projections::store::aggregate_range(&mut conn, group.name(), aggregate, 1, 1000)
            .await
            .unwrap();
    for s in sequences {
        let event = &events[(*s - 1) as usize];
        let (_, body, properties) = apex_projections::relay::encode(event).unwrap();
        publish(&channel, queue, &body, properties).await;
    }
}

/// The rows of `sql`, read every 50 ms until there are `count` of them (10 s at most).
async fn rows_when<T>(bus: &Bus, sql: &'static str, count: usize) -> Vec<T>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let mut rows = Vec::new();
    for _ in 0..200 {
        rows = sqlx::query_as(sql).fetch_all(&bus.pool).await.unwrap();
        if rows.len() == count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rows
}

/// Publishes `body` straight into the `instance` group's queue.
async fn publish_to_instances(bus: &Bus, body: &[u8], properties: BasicProperties) {
    let channel = apex_projections::amqp::confirm_channel(&bus.connection)
        .await
        .unwrap();
    let queue = bus.projector_config().queue(ProjectorGroup::Instance);
    publish(&channel, &queue, body, properties).await;
}

async fn publish(channel: &lapin::Channel, queue: &str, body: &[u8], properties: BasicProperties) {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
}

#[tokio::test]
async fn duplicate_and_out_of_order_deliveries_leave_the_read_models_exact() {
    let bus = bus().await;
    bus.declare_projectors().await;
    bus.agent("triage", &["search"]).await;
    let id = bus.run("user-1", "triage").await;
    bus.think(&id, 4).await; // sequences 1..=6
    inject(
        &bus,
        ProjectorGroup::Instance,
        &id,
        &[1, 2, 2, 4, 3, 6, 5, 1, 6],
    )
    .await;
    let mut conn = bus.pool.acquire().await.unwrap();
    let agent_events =
        apex_projections::store::aggregate_range(&mut conn, "agent", "triage", 1, 10)
            .await
            .unwrap();
    drop(conn);
    assert_eq!(agent_events.len(), 2);
    inject(&bus, ProjectorGroup::Agent, "triage", &[2, 1, 2]).await;

    let tasks = bus.spawn_projectors();
    bus.wait_projected(Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // let the trailing duplicates arrive
    assert_eq!(bus.read_models().await, bus.replayed_read_models().await);
    let last: i64 = sqlx::query_scalar("SELECT last_sequence FROM rm_instances")
        .fetch_one(&bus.pool)
        .await
        .unwrap();
    assert_eq!(last, 6);
    let (repaired, skipped): (i64, i64) = sqlx::query_as(
        "SELECT repaired_total, skipped_total FROM projector_status WHERE projector = 'instances'",
    )
    .fetch_one(&bus.pool)
    .await
    .unwrap();
    assert!(
        repaired >= 1,
        "sequence 4 before 3 was repaired from the store"
    );
    // 2 (again), 3 and 5 (already filled by gap repair), 1 and 6 (again).
    assert_eq!(skipped, 5, "duplicates and late deliveries are skipped");
    bus.finish(tasks).await;
}

#[tokio::test]
async fn runs_of_one_user_delivered_in_reverse_order_project_as_a_replay_does() {
    let bus = bus().await;
    bus.declare_projectors().await;
    bus.agent("triage", &["search"]).await;
    let first = bus.run("user-1", "triage").await;
    let second = bus.run("user-1", "triage").await;
    bus.think(&second, 1).await;
    // The later run reaches the projectors before the earlier one: nothing orders deliveries
    // across aggregates, and the usage totals must not depend on it.
    inject(&bus, ProjectorGroup::Instance, &second, &[1, 2, 3]).await;
    inject(&bus, ProjectorGroup::Instance, &first, &[1, 2]).await;
    inject(&bus, ProjectorGroup::Agent, "triage", &[1, 2]).await;
    let tasks = bus.spawn_projectors();
    bus.wait_projected(Duration::from_secs(20)).await;
    assert_eq!(bus.read_models().await, bus.replayed_read_models().await);
    let (instances, first_seen): (i64, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT instances, first_seen_at FROM rm_usage WHERE user_id = 'user-1'")
            .fetch_one(&bus.pool)
            .await
            .unwrap();
    let created: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "SELECT recorded_at FROM events WHERE aggregate_id = $1 AND sequence = 1",
    )
    .bind(&first)
    .fetch_one(&bus.pool)
    .await
    .unwrap();
    assert_eq!(instances, 2);
    assert_eq!(
        first_seen, created,
        "first seen is the earlier run's creation"
    );
    bus.finish(tasks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_projector_replicas_sharing_the_queues_build_exactly_the_replayed_read_models() {
    let bus = bus().await;
    bus.declare_projectors().await;
    bus.agent("triage", &["search"]).await;
    // A backlog, so the relay publishes full batches and both replicas get interleaved slices
    // of the same runs and users (the set-based path, and its fallback on gaps).
    let mut runs = Vec::new();
    for user in 0..3 {
        for _ in 0..8 {
            runs.push(bus.run(&format!("user-{user}"), "triage").await);
        }
    }
    for (i, id) in runs.iter().enumerate() {
        bus.think(id, 1 + i % 4).await;
    }
    let mut tasks = bus.spawn_projectors();
    tasks.extend(bus.spawn_projectors());
    tasks.push(bus.spawn_relay());
    bus.wait_projected(Duration::from_secs(60)).await;
    assert_eq!(bus.read_models().await, bus.replayed_read_models().await);
    let totals: (i64, i64) =
        sqlx::query_as("SELECT sum(instances)::bigint, sum(thoughts)::bigint FROM rm_usage")
            .fetch_one(&bus.pool)
            .await
            .unwrap();
    let thoughts: usize = (0..runs.len()).map(|i| 1 + i % 4).sum();
    assert_eq!(totals, (runs.len() as i64, thoughts as i64));
    bus.finish(tasks).await;
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_with_its_reason_and_later_events_still_project() {
    let bus = bus().await;
    bus.declare_projectors().await;
    bus.agent("triage", &["search"]).await;
    let id = bus.run("user-1", "triage").await;
    publish_to_instances(&bus, b"this is not json", BasicProperties::default()).await;
    let unknown = serde_json::json!({
        "specversion": "1.0", "id": uuid::Uuid::new_v4(), "source": "/apex/event-store",
        "type": "apex.instance.teleported.v1", "subject": id, "time": "2026-01-01T00:00:00Z",
        "datacontenttype": "application/json", "dataschema": "apex:event_schemas/instance/teleported.v1.json",
        "data": {}, "sequence": 3, "position": 99,
        "correlationid": uuid::Uuid::new_v4(), "causationid": uuid::Uuid::new_v4()
    });
    publish_to_instances(
        &bus,
        unknown.to_string().as_bytes(),
        BasicProperties::default(),
    )
    .await;
    inject(&bus, ProjectorGroup::Instance, &id, &[1, 2]).await;

    let tasks = bus.spawn_projectors();
    let projected: Vec<(String, i64)> = rows_when(
        &bus,
        "SELECT status, last_sequence FROM rm_instances WHERE last_sequence = 2",
        1,
    )
    .await;
    assert_eq!(projected, vec![("running".to_owned(), 2)]);

    let reasons: Vec<String> = sqlx::query_scalar(
        "SELECT reason FROM dead_letters WHERE projector = 'instances' ORDER BY id",
    )
    .fetch_all(&bus.pool)
    .await
    .unwrap();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("not a CloudEvent"), "{reasons:?}");
    assert!(reasons[1].contains("unknown event type"), "{reasons:?}");

    // Every read model of the group parked both messages, each for itself.
    let per_model: Vec<(String, i64)> = sqlx::query_as(
        "SELECT projector, count(*) FROM dead_letters GROUP BY projector ORDER BY projector",
    )
    .fetch_all(&bus.pool)
    .await
    .unwrap();
    assert_eq!(
        per_model,
        vec![
            ("agent_stats".to_owned(), 2),
            ("instances".to_owned(), 2),
            ("usage".to_owned(), 2)
        ]
    );

    let dlq_channel = bus.connection.create_channel().await.unwrap();
    let mut consumer = dlq_channel
        .basic_consume(
            bus.projector_config()
                .dead_letter_queue(ReadModel::Instances)
                .as_str()
                .into(),
            "dlq-reader".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut dead = Vec::new();
    while dead.len() < 2 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let reason = match headers.inner().get("x-apex-reason") {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("no reason header: {other:?}"),
        };
        dead.push((String::from_utf8_lossy(&delivery.data).into_owned(), reason));
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(dead[0].0, "this is not json");
    assert!(dead[0].1.contains("not a CloudEvent"));
    assert!(dead[1].1.contains("unknown event type"));
    bus.finish(tasks).await;
}

/// A batch whose transaction fails on the projector's side of it (a gap the store cannot fill:
/// an event published with a sequence the store does not have) is applied again event by
/// event. Those retries take the same offset rows the failed transaction had locked, so that
/// transaction must be gone by then, not left open on the read model's connection: everything
/// before the bad event projects, and the bad event is dead-lettered by every read model.
#[tokio::test]
async fn a_batch_whose_transaction_fails_is_applied_event_by_event_without_waiting_on_itself() {
    let bus = bus().await;
    bus.declare_projectors().await;
    bus.agent("triage", &["search"]).await;
    let id = bus.run("user-1", "triage").await;
    bus.think(&id, 2).await;
    let mut conn = bus.pool.acquire().await.unwrap();
    let events = apex_projections::store::aggregate_range(&mut conn, "instance", &id, 1, 4)
        .await
        .unwrap();
    assert_eq!(events.len(), 4);
    inject(&bus, ProjectorGroup::Instance, &id, &[1, 2, 3, 4]).await;
    // Sequence 4 again, published as sequence 9: 5 to 8 are nowhere.
    let (_, body, properties) = apex_projections::relay::encode(&events[3]).unwrap();
    let mut cloud_event: serde_json::Value = serde_json::from_slice(&body).unwrap();
    cloud_event["sequence"] = 9.into();
    cloud_event["id"] = uuid::Uuid::new_v4().to_string().into();
    publish_to_instances(&bus, cloud_event.to_string().as_bytes(), properties).await;

    let tasks = bus.spawn_projectors();
    let dead: Vec<(String, i64)> = rows_when(
        &bus,
        "SELECT projector, sequence FROM dead_letters ORDER BY projector",
        3,
    )
    .await;
    let models = ["agent_stats", "instances", "usage"];
    assert_eq!(
        dead,
        models.map(|m| (m.to_owned(), 9_i64)).to_vec(),
        "the read models stalled on the failed batch"
    );
    let (last, thoughts): (i64, i32) =
        sqlx::query_as("SELECT last_sequence, thought_count FROM rm_instances")
            .fetch_one(&bus.pool)
            .await
            .unwrap();
    assert_eq!((last, thoughts), (4, 2));
    bus.finish(tasks).await;
}

/// `(processed_total, skipped_total)` of `model`.
async fn counters(bus: &Bus, model: ReadModel) -> (i64, i64) {
    sqlx::query_as(
        "SELECT processed_total, skipped_total FROM projector_status WHERE projector = $1",
    )
    .bind(model.name())
    .fetch_one(&bus.pool)
    .await
    .unwrap()
}

/// The group applies a batch to its three read models in one transaction. When one of them
/// already has the batch (as after its rebuild from the store), that transaction writes
/// nothing, and each read model takes the batch on its own: the one ahead skips every event,
/// the others apply each once, and every read model ends as a replay builds it.
#[tokio::test]
async fn a_batch_one_read_model_already_has_is_applied_once_by_each_of_the_others() {
    let bus = bus().await;
    bus.declare_projectors().await;
    bus.agent("triage", &["search"]).await;
    let id = bus.run("user-1", "triage").await;
    bus.think(&id, 4).await; // sequences 1..=6
    let mut conn = bus.pool.acquire().await.unwrap();
    let events = apex_projections::store::aggregate_range(&mut conn, "instance", &id, 1, 6)
        .await
        .unwrap();
    assert_eq!(events.len(), 6);
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    for event in &events {
        let decoded = event.decode().unwrap();
        apex_projections::projector::apply_one(&mut tx, ReadModel::Usage, event, &decoded)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    drop(conn);
    inject(&bus, ProjectorGroup::Instance, &id, &[1, 2, 3, 4, 5, 6]).await;
    inject(&bus, ProjectorGroup::Agent, "triage", &[1, 2]).await;

    let tasks = bus.spawn_projectors();
    bus.wait_projected(Duration::from_secs(20)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while counters(&bus, ReadModel::Usage).await.1 < 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "usage never skipped the batch it had"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(bus.read_models().await, bus.replayed_read_models().await);
    assert_eq!(counters(&bus, ReadModel::Usage).await.1, 6);
    for model in [ReadModel::Instances, ReadModel::AgentStats] {
        assert_eq!(
            counters(&bus, model).await,
            (6, 0),
            "{model:?} applied the batch other than once"
        );
    }
    bus.finish(tasks).await;
}

/// A batch that continues its streams reaches the group's three read models in one
/// transaction: they share its commit, so their status rows carry one `last_applied_at` (the
/// transaction's start), and each applies every event once, as a replay builds them. (Were the
/// batch refused by the group's set-based path, each read model would take it in a
/// transaction of its own, each with its own `last_applied_at`.)
#[tokio::test]
async fn a_batch_continuing_its_streams_reaches_the_groups_read_models_in_one_transaction() {
    let bus = bus().await;
    bus.declare_projectors().await;
    bus.agent("triage", &["search"]).await;
    let first = bus.run("user-1", "triage").await;
    bus.think(&first, 3).await; // sequences 1..=5
    let second = bus.run("user-2", "triage").await;
    bus.think(&second, 2).await; // sequences 1..=4
    for sequence in 1..=5 {
        inject(&bus, ProjectorGroup::Instance, &first, &[sequence]).await;
        if sequence <= 4 {
            inject(&bus, ProjectorGroup::Instance, &second, &[sequence]).await;
        }
    }
    inject(&bus, ProjectorGroup::Agent, "triage", &[1, 2]).await;

    let tasks = bus.spawn_projectors();
    bus.wait_projected(Duration::from_secs(20)).await;
    assert_eq!(bus.read_models().await, bus.replayed_read_models().await);
    let status: Vec<(String, i64, i64, Option<chrono::DateTime<chrono::Utc>>)> = sqlx::query_as(
        "SELECT projector, processed_total, skipped_total, last_applied_at FROM projector_status
          WHERE projector IN ('instances', 'agent_stats', 'usage') ORDER BY projector",
    )
    .fetch_all(&bus.pool)
    .await
    .unwrap();
    assert_eq!(status.len(), 3);
    for (model, processed, skipped, _) in &status {
        assert_eq!(
            (*processed, *skipped),
            (9, 0),
            "{model} applied the events other than once"
        );
    }
    let applied: Vec<_> = status.iter().map(|(_, _, _, at)| *at).collect();
    assert!(applied[0].is_some());
    assert!(
        applied.iter().all(|at| *at == applied[0]),
        "the read models committed the batch in separate transactions: {status:?}"
    );
    bus.finish(tasks).await;
}

#[tokio::test]
async fn a_read_models_own_queue_from_before_the_groups_is_drained_into_it_and_deleted() {
    let bus = bus().await;
    bus.agent("triage", &["search"]).await;
    let id = bus.run("user-1", "triage").await;
    bus.think(&id, 2).await; // sequences 1..=4
    // The topology before the groups: the runs' own queue, bound to instance events and
    // still holding some.
    let legacy = old_queue_holding(&bus, ReadModel::Instances, &id, &[1, 2, 3, 4]).await;

    let tasks = bus.spawn_projectors();
    let runs: Vec<(i64,)> = rows_when(
        &bus,
        "SELECT last_sequence FROM rm_instances WHERE last_sequence = 4",
        1,
    )
    .await;
    assert_eq!(runs, vec![(4,)]);
    // The old queue fed only its own read model.
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_usage")
        .fetch_one(&bus.pool)
        .await
        .unwrap();
    assert_eq!(users, 0);
    assert!(
        !queue_exists(&bus, &legacy).await,
        "the old queue still exists"
    );
    bus.finish(tasks).await;
}

#[tokio::test]
async fn a_groups_classic_queue_from_before_its_quorum_queue_is_drained_into_every_read_model_and_deleted()
 {
    let bus = bus().await;
    bus.agent("triage", &["search"]).await; // sequences 1..=2
    let id = bus.run("user-1", "triage").await;
    bus.think(&id, 2).await; // sequences 1..=4
    // The topology before the quorum queues: each group's classic queue, bound to its events
    // and still holding them (they are nowhere else on the bus).
    let config = bus.projector_config();
    let instance_queue = config.classic_queue(ProjectorGroup::Instance);
    classic_queue_holding(
        &bus,
        &instance_queue,
        ProjectorGroup::Instance,
        &id,
        &[1, 2, 3, 4],
    )
    .await;
    let agent_queue = config.classic_queue(ProjectorGroup::Agent);
    classic_queue_holding(&bus, &agent_queue, ProjectorGroup::Agent, "triage", &[1, 2]).await;

    let tasks = bus.spawn_projectors();
    bus.wait_projected(Duration::from_secs(20)).await;
    assert_eq!(bus.read_models().await, bus.replayed_read_models().await);
    let status: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT projector, processed_total, skipped_total FROM projector_status ORDER BY projector",
    )
    .fetch_all(&bus.pool)
    .await
    .unwrap();
    assert_eq!(
        status,
        vec![
            ("agent_stats".to_owned(), 4, 0),
            ("agents".to_owned(), 2, 0),
            ("instances".to_owned(), 4, 0),
            ("usage".to_owned(), 4, 0),
        ],
        "every read model of a group applies its classic queue's events once"
    );
    for queue in [&instance_queue, &agent_queue] {
        assert!(
            !queue_exists(&bus, queue).await,
            "the classic queue {queue} still exists"
        );
    }
    // The groups' queues are quorum queues: the broker refuses them declared as classic.
    for group in ProjectorGroup::ALL {
        let channel = bus.connection.create_channel().await.unwrap();
        let classic = apex_projections::amqp::declare_queue(
            &channel,
            &config.queue(group),
            QueueType::Classic,
        )
        .await;
        assert!(
            classic.is_err(),
            "{group}'s queue was declared again as a classic queue"
        );
    }
    bus.finish(tasks).await;
}

/// `model`'s queue from before the groups (`<prefix>.<model>`), bound to instance events as it
/// was and holding the deliveries of `sequences` of run `id`.
async fn old_queue_holding(bus: &Bus, model: ReadModel, id: &str, sequences: &[i64]) -> String {
    let queue = bus.projector_config().legacy_queue(model);
    classic_queue_holding(bus, &queue, ProjectorGroup::Instance, id, sequences).await;
    queue
}

/// `queue` as the queues of earlier versions were (classic, bound to `group`'s routing keys),
/// holding the deliveries of `sequences` of `aggregate`.
async fn classic_queue_holding(
    bus: &Bus,
    queue: &str,
    group: ProjectorGroup,
    aggregate: &str,
    sequences: &[i64],
) {
    let channel = bus.connection.create_channel().await.unwrap();
    apex_projections::amqp::declare_exchange(&channel, &bus.amqp.exchange)
        .await
        .unwrap();
    apex_projections::amqp::declare_bound_queue(
        &channel,
        &bus.amqp.exchange,
        queue,
        QueueType::Classic,
        group.routing_keys(),
    )
    .await
    .unwrap();
    inject_into(bus, queue, group, aggregate, sequences).await;
}

/// Whether `queue` exists (a passive declare, on a channel of its own: failing closes it).
async fn queue_exists(bus: &Bus, queue: &str) -> bool {
    let probe = bus.connection.create_channel().await.unwrap();
    probe
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok()
}

/// The timeline had a queue of its own when a projector maintained it. It is written with the
/// events now, so the instance group unbinds and deletes that queue, messages and all, instead
/// of feeding them to a projector (they are in the store; `apex rebuild timeline` adds them).
#[tokio::test]
async fn the_timelines_queue_from_when_a_projector_kept_it_is_deleted() {
    let bus = bus().await;
    bus.agent("triage", &["search"]).await;
    let id = bus.run("user-1", "triage").await;
    let legacy = old_queue_holding(&bus, ReadModel::Timeline, &id, &[1, 2]).await;

    let tasks = bus.spawn_projectors();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while queue_exists(&bus, &legacy).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the timeline's old queue is still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing of it was applied twice: the timeline still has each step once.
    let steps: Vec<i64> = sqlx::query_scalar("SELECT sequence FROM rm_timeline ORDER BY sequence")
        .fetch_all(&bus.pool)
        .await
        .unwrap();
    assert_eq!(steps, vec![1, 2]);
    bus.finish(tasks).await;
}
