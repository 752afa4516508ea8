//! Fast seeding of the event store, through its triggers (metadata columns, hash chain), with
//! valid payloads: multi-row `INSERT … SELECT generate_series`, several statements at once.
//!
//! Every run of the agent [`AGENT`](super::client::AGENT) has `EVENTS_PER_RUN` events:
//! created, started, five thoughts, a tool call started and completed (every third with an
//! error), then completed (three runs in five), failed or cancelled by its owner.

use std::time::{Duration, Instant};

use anyhow::Context;
use apex_projections::StoredEvent;
use apex_projections::store;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, PublisherConfirm};
use sqlx::postgres::PgPoolOptions;
use sqlx::{ConnectOptions, PgPool};
use tokio::task::JoinSet;

use super::client::AGENT;

/// Events of one seeded run.
pub(crate) const EVENTS_PER_RUN: i64 = 10;
/// Runs per INSERT statement.
const RUNS_PER_STATEMENT: i64 = 2_000;
/// INSERT statements in flight.
const PARALLEL: usize = 2;
/// Distinct users owning the runs.
const USERS: i64 = 1_000;

/// How seeding went.
pub(crate) struct Seeded {
    /// Events inserted (instance and agent).
    pub events: i64,
    /// How long it took.
    pub elapsed: Duration,
}

/// Inserts the agent's two events (defined, activated).
async fn agent(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query(
        r#"INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                               payload, metadata)
           SELECT 'agent', $1, s, CASE s WHEN 1 THEN 'AgentDefined' ELSE 'AgentActivated' END, '1',
                  CASE s WHEN 1 THEN jsonb_build_object('AgentDefined', jsonb_build_object(
                          'agent_id', $1, 'display_name', 'Bench agent', 'description', 'benchmarks',
                          'tools', jsonb_build_array('search', 'sql'),
                          'tiers', jsonb_build_array('free', 'early', 'mid', 'enterprise'),
                          'version', 1))
                         ELSE '{"AgentActivated": {"version": 2}}'::jsonb END,
                  jsonb_build_object('correlation_id', gen_random_uuid(),
                                     'causation_id', gen_random_uuid(),
                                     'principal', 'bench-admin', 'principal_role', 'admin')
             FROM generate_series(1, 2) s ORDER BY s"#,
    )
    .bind(AGENT)
    .execute(pool)
    .await
    .context("seeding the agent")?;
    Ok(())
}

/// Inserts runs `first..=last` (their events in sequence order, one statement).
async fn runs(pool: &PgPool, salt: &str, first: i64, last: i64) -> anyhow::Result<()> {
    sqlx::query(
        r#"INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                               payload, metadata)
           SELECT 'instance', r.id::text, s.seq, e.event_type, '1', e.payload,
                  jsonb_build_object(
                      'correlation_id', md5(r.id::text || s.seq)::uuid,
                      'causation_id', md5(r.id::text || s.seq)::uuid,
                      'principal', CASE WHEN s.seq = 1 OR (s.seq = 10 AND r.n % 5 = 4)
                                        THEN r.owner ELSE 'bench-runner' END,
                      'principal_role', CASE WHEN s.seq = 1 OR (s.seq = 10 AND r.n % 5 = 4)
                                             THEN 'user' ELSE 'runner' END,
                      'traceparent', '00-' || md5(r.id::text || s.seq || 't') || '-'
                                     || substr(md5(r.id::text || s.seq || 's'), 1, 16) || '-01')
             FROM (SELECT n, md5($1 || n::text)::uuid AS id, 'bench-user-' || (n % $4) AS owner
                     FROM generate_series($2::bigint, $3::bigint) n) r
            CROSS JOIN generate_series(1, 10) AS s(seq)
            CROSS JOIN LATERAL (SELECT
                CASE WHEN s.seq = 1 THEN 'InstanceCreated'
                     WHEN s.seq = 2 THEN 'InstanceStarted'
                     WHEN s.seq <= 7 THEN 'ThoughtRecorded'
                     WHEN s.seq = 8 THEN 'ToolCallStarted'
                     WHEN s.seq = 9 THEN 'ToolCallCompleted'
                     WHEN r.n % 5 = 3 THEN 'InstanceFailed'
                     WHEN r.n % 5 = 4 THEN 'InstanceCancelled'
                     ELSE 'InstanceCompleted' END AS event_type,
                CASE WHEN s.seq = 1 THEN jsonb_build_object('InstanceCreated', jsonb_build_object(
                         'owner_id', r.owner, 'owner_tier', 'free', 'agent_id', $5::text,
                         'agent_version', 2, 'tools', jsonb_build_array('search', 'sql'),
                         'thread_id', r.id::text, 'input', 'why is my AI bill so high?'))
                     WHEN s.seq = 2 THEN jsonb_build_object('InstanceStarted', jsonb_build_object(
                         'display', jsonb_build_object('message', 'On it'),
                         'internal', jsonb_build_object('prompt', 'internal system prompt')))
                     WHEN s.seq <= 7 THEN jsonb_build_object('ThoughtRecorded', jsonb_build_object(
                         'display', jsonb_build_object('thought',
                             'Comparing this month''s token usage with last month''s (' || s.seq || ')'),
                         'internal', jsonb_build_object('prompt', 'internal prompt', 'raw', NULL)))
                     WHEN s.seq = 8 THEN jsonb_build_object('ToolCallStarted', jsonb_build_object(
                         'call_id', 'c1', 'tool', 'sql',
                         'display', jsonb_build_object('summary', 'Querying costs by model'),
                         'internal', jsonb_build_object('arguments',
                             jsonb_build_object('sql', 'SELECT model, sum(cost) FROM usage GROUP BY 1'))))
                     WHEN s.seq = 9 THEN jsonb_build_object('ToolCallCompleted', jsonb_build_object(
                         'call_id', 'c1', 'tool', 'sql', 'is_error', r.n % 3 = 0,
                         'display', jsonb_build_object('summary', 'Found 3 models'),
                         'internal', jsonb_build_object('result', jsonb_build_object('rows', 3))))
                     WHEN r.n % 5 = 3 THEN jsonb_build_object('InstanceFailed', jsonb_build_object(
                         'display', jsonb_build_object('error', 'The cost API timed out'),
                         'internal', jsonb_build_object('raw', NULL)))
                     WHEN r.n % 5 = 4 THEN jsonb_build_object('InstanceCancelled', jsonb_build_object(
                         'by', jsonb_build_object('id', r.owner, 'role', 'user'),
                         'display', jsonb_build_object('reason', 'Not needed any more')))
                     ELSE jsonb_build_object('InstanceCompleted', jsonb_build_object(
                         'display', jsonb_build_object('output',
                             'Your bill doubled because a new workflow sends long prompts to a large model.'),
                         'internal', jsonb_build_object('raw', NULL)))
                END AS payload) e
            ORDER BY r.n, s.seq"#,
    )
    .bind(salt)
    .bind(first)
    .bind(last)
    .bind(USERS)
    .bind(AGENT)
    .execute(pool)
    .await
    .with_context(|| format!("seeding runs {first}..={last}"))?;
    Ok(())
}

/// Seeds the agent and about `events` instance events (rounded up to whole runs), on
/// connections of its own to `pool`'s database whose statements are not logged: each seeding
/// statement inserts 20,000 events and takes longer than the slow-statement threshold, which
/// would otherwise log it whole, every time.
pub(crate) async fn store(pool: &PgPool, events: i64) -> anyhow::Result<Seeded> {
    let pool = PgPoolOptions::new()
        .max_connections(PARALLEL as u32)
        .connect_with(
            (*pool.connect_options())
                .clone()
                .disable_statement_logging(),
        )
        .await
        .context("connecting the seeding pool")?;
    let seeded = seed(&pool, events).await;
    pool.close().await;
    seeded
}

async fn seed(pool: &PgPool, events: i64) -> anyhow::Result<Seeded> {
    let started = Instant::now();
    agent(pool).await?;
    let total_runs = (events + EVENTS_PER_RUN - 1) / EVENTS_PER_RUN;
    let salt = uuid::Uuid::new_v4().simple().to_string();
    let mut tasks = JoinSet::new();
    let mut next = 0i64;
    loop {
        while tasks.len() < PARALLEL && next < total_runs {
            let last = (next + RUNS_PER_STATEMENT).min(total_runs) - 1;
            let (pool, salt) = (pool.clone(), salt.clone());
            let first = next;
            tasks.spawn(async move { runs(&pool, &salt, first, last).await });
            next = last + 1;
        }
        match tasks.join_next().await {
            Some(result) => result.context("a seeding task panicked")??,
            None => break,
        }
    }
    sqlx::query("ANALYZE events")
        .execute(pool)
        .await
        .context("analyzing events")?;
    Ok(Seeded {
        events: total_runs * EVENTS_PER_RUN + 2,
        elapsed: started.elapsed(),
    })
}

/// Waits until every stored event is below the snapshot horizon (a transaction in another
/// database of the cluster can hold it back), so a relay-order reader sees all of them.
pub(crate) async fn settled(pool: &PgPool, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let settled: bool = sqlx::query_scalar(
            "SELECT coalesce(max(transaction_id) < pg_snapshot_xmin(pg_current_snapshot()), true)
               FROM events",
        )
        .fetch_one(pool)
        .await?;
        if settled {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "another transaction of the cluster held the snapshot horizon for {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every stored event in relay order. Seeding is over, so unlike the relay this reads without
/// the snapshot horizon (which a transaction in another database of the cluster holds back).
pub(crate) async fn load(pool: &PgPool) -> anyhow::Result<Vec<StoredEvent>> {
    let sql = format!(
        "SELECT {} FROM events ORDER BY events.transaction_id, events.position",
        store::EVENT_COLUMNS
    );
    let rows = sqlx::query(&sql).fetch_all(pool).await?;
    rows.iter()
        .map(|r| store::from_row(r).map_err(anyhow::Error::from))
        .collect()
}

/// A message ready to publish, encoded exactly as the relay encodes it.
pub(crate) struct Encoded {
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

/// Encodes events with the relay's encoder.
pub(crate) fn encode(events: &[StoredEvent]) -> anyhow::Result<Vec<Encoded>> {
    events
        .iter()
        .map(|e| {
            let (routing_key, body, properties) = apex_projections::relay::encode(e)?;
            Ok(Encoded {
                routing_key,
                body,
                properties,
            })
        })
        .collect()
}

/// Publishes `messages` to `exchange` as the relay publishes a batch
/// (`amqp::publish_pipelined`); returns their confirms, in order.
pub(crate) async fn publish(
    channel: &Channel,
    exchange: &str,
    messages: &[Encoded],
) -> Result<Vec<PublisherConfirm>, apex_projections::amqp::BusError> {
    let publishes: Vec<_> = messages
        .iter()
        .map(|m| {
            channel.basic_publish(
                exchange.into(),
                m.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &m.body,
                m.properties.clone(),
            )
        })
        .collect();
    apex_projections::amqp::publish_pipelined(publishes).await
}
