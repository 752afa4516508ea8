//! The projector runtime: a projector group consumes one queue and applies each event exactly
//! once to every read model of the group.
//!
//! * Groups: the read models fed by the same aggregate type share one queue and one consumer
//!   (Axon's processing group): a delivery is received, decoded and acknowledged once, and each
//!   batch is applied to all of the group's read models in one transaction (three statements,
//!   each read model still with its own offsets and status); when that transaction does not
//!   write it, to each read model concurrently, in its own transaction with its own offsets,
//!   status and dead letters. The batch is acknowledged once every read model has it. (The
//!   chat timeline is not among them: it is written with the events themselves, and the relay
//!   announces its entries, see `apex_commands::inline` and [`crate::relay`].)
//! * Queues: a group's queue is a quorum queue, `<prefix>.<group>.quorum`. At session start
//!   the group drains and deletes the classic queues of earlier versions (each read model's
//!   own from before the groups, then the group's classic `<prefix>.<group>`), having bound
//!   its own first.
//! * Idempotent: `projector_offsets` holds, per read model and aggregate, the last sequence
//!   applied, updated in the same transaction as the read model. An event at or below it is
//!   skipped.
//! * Gap repair: an event above it + 1 first pulls the missing events from the event store.
//! * Batching: deliveries already waiting are applied together, acks are sent with
//!   `multiple`. If a read model's batch fails, each event is retried on its own.
//! * Failures: transient database errors are retried with backoff, indefinitely (nothing can be
//!   projected while the database is away). Any other failure is retried a few times, then the
//!   message is dead-lettered for that read model (table `dead_letters` and queue
//!   `<prefix>.<read model>.dlq`, with the reason), the read model's offset moves past it, and
//!   the projector carries on.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::watch;
use tracing::Instrument;

use crate::amqp::{self, AmqpConfig, Backoff, BusError, QueueType};
use crate::envelope::{CloudEvent, DomainEvent, StoredEvent};
use crate::read_models::ReadModel;
use crate::rebuild::batch;
use crate::store;

/// A projector group: the read models fed from one queue by one consumer session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProjectorGroup {
    /// Agent events: `agents`.
    Agent,
    /// Instance events: `instances`, `timeline`, `agent_stats`, `usage`.
    Instance,
}

impl ProjectorGroup {
    /// Every group.
    pub const ALL: [ProjectorGroup; 2] = [ProjectorGroup::Agent, ProjectorGroup::Instance];

    /// The group's name (queue `<prefix>.<name>`): the aggregate type it consumes.
    pub fn name(self) -> &'static str {
        match self {
            ProjectorGroup::Agent => "agent",
            ProjectorGroup::Instance => "instance",
        }
    }

    /// The read models the group maintains.
    pub fn models(self) -> &'static [ReadModel] {
        match self {
            ProjectorGroup::Agent => &[ReadModel::Agents],
            ProjectorGroup::Instance => &[
                ReadModel::Instances,
                ReadModel::AgentStats,
                ReadModel::Usage,
            ],
        }
    }

    /// Every read model a projector group maintains: all but the inline timeline.
    pub fn projected() -> impl Iterator<Item = ReadModel> {
        ProjectorGroup::ALL
            .into_iter()
            .flat_map(|g| g.models().iter().copied())
    }

    /// The group that maintains `model`; `None` for the timeline, which is written with the
    /// events (an inline projection). Exhaustive: a new read model must be given a group.
    pub fn of(model: ReadModel) -> Option<Self> {
        match model {
            ReadModel::Agents => Some(ProjectorGroup::Agent),
            ReadModel::Instances | ReadModel::AgentStats | ReadModel::Usage => {
                Some(ProjectorGroup::Instance)
            }
            ReadModel::Timeline => None,
        }
    }

    /// The routing keys the group's queue is bound to. Offsets are per aggregate sequence, so
    /// a group takes every event of the aggregates it follows (a missing one would be fetched
    /// from the store as a gap).
    pub fn routing_keys(self) -> &'static [&'static str] {
        match self {
            ProjectorGroup::Agent => &["agent.*"],
            ProjectorGroup::Instance => &["instance.*"],
        }
    }
}

impl fmt::Display for ProjectorGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ProjectorGroup {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(group) = ProjectorGroup::ALL.into_iter().find(|g| g.name() == s) {
            return Ok(group);
        }
        let names: Vec<_> = ProjectorGroup::ALL.iter().map(|g| g.name()).collect();
        let hint = match s.parse::<ReadModel>().map(ProjectorGroup::of) {
            Ok(Some(group)) => {
                format!("; read model `{s}` is maintained by projector group `{group}`")
            }
            Ok(None) => {
                format!("; read model `{s}` is written with the events, by no projector group")
            }
            Err(_) => String::new(),
        };
        Err(format!(
            "unknown projector group `{s}`; expected one of {}{hint}",
            names.join(", ")
        ))
    }
}

/// Projector settings.
#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// Broker and exchange.
    pub amqp: AmqpConfig,
    /// Queue name prefix; a group's queue is `<prefix>.<group>.quorum`, a read model's
    /// dead-letter queue `<prefix>.<read model>.dlq`.
    pub queue_prefix: String,
    /// Unacknowledged messages the broker may push.
    pub prefetch: u16,
    /// Most events applied in one transaction.
    pub batch_size: usize,
    /// Attempts for a non-transient failure before dead-lettering.
    pub max_attempts: u32,
    /// Smallest batch a group of several read models applies in one transaction (see
    /// `process_group`; by default every batch); smaller batches go to each read model's own
    /// transaction, concurrently.
    pub group_transaction_from: usize,
}

impl ProjectorConfig {
    /// Defaults for `amqp`.
    pub fn new(amqp: AmqpConfig) -> Self {
        Self {
            amqp,
            queue_prefix: "apex.projector".to_owned(),
            prefetch: 1024,
            batch_size: 512,
            max_attempts: 3,
            group_transaction_from: 1,
        }
    }

    /// The queue of `group`: a quorum queue (see [`amqp::QueueType::Quorum`]).
    pub fn queue(&self, group: ProjectorGroup) -> String {
        format!("{}.{}.quorum", self.queue_prefix, group.name())
    }

    /// The classic queue the group had before its queue became a quorum queue
    /// (`<prefix>.<group>`), drained and deleted by the group.
    pub fn classic_queue(&self, group: ProjectorGroup) -> String {
        format!("{}.{}", self.queue_prefix, group.name())
    }

    /// The dead-letter queue of `model`.
    pub fn dead_letter_queue(&self, model: ReadModel) -> String {
        format!("{}.{}.dlq", self.queue_prefix, model.name())
    }

    /// The queue a read model had of its own before the groups (`<prefix>.<read model>`),
    /// drained and deleted by its group.
    pub fn legacy_queue(&self, model: ReadModel) -> String {
        format!("{}.{}", self.queue_prefix, model.name())
    }

    /// Every queue the projectors declare: the groups' and the dead-letter queues.
    pub fn queues(&self) -> Vec<String> {
        ProjectorGroup::ALL
            .into_iter()
            .map(|g| self.queue(g))
            .chain(ProjectorGroup::projected().map(|m| self.dead_letter_queue(m)))
            .collect()
    }
}

/// Why a projector session ended.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    /// The broker failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The database failed.
    #[error("projector database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl From<lapin::Error> for ProjectorError {
    fn from(e: lapin::Error) -> Self {
        Self::Bus(BusError::from(e))
    }
}

/// What happened to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied, after `repaired` missing events were pulled from the store.
    Applied {
        /// Events read from the store to fill a gap.
        repaired: usize,
    },
    /// Already applied: a duplicate or a late, out-of-order delivery.
    Skipped,
}

/// Declares the group's queue (bound to its routing keys) and its read models' dead-letter
/// queues.
pub async fn declare(
    channel: &Channel,
    config: &ProjectorConfig,
    group: ProjectorGroup,
) -> Result<(), BusError> {
    amqp::declare_exchange(channel, &config.amqp.exchange).await?;
    let queue = config.queue(group);
    amqp::declare_bound_queue(
        channel,
        &config.amqp.exchange,
        &queue,
        QueueType::Quorum,
        group.routing_keys(),
    )
    .await?;
    for model in group.models() {
        amqp::declare_queue(
            channel,
            &config.dead_letter_queue(*model),
            QueueType::Classic,
        )
        .await?;
    }
    Ok(())
}

/// Runs the projector group until `shutdown` turns true, reconnecting after failures.
pub async fn run(
    pool: PgPool,
    group: ProjectorGroup,
    config: ProjectorConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let initial = Duration::from_millis(200);
    let mut backoff = Backoff::new(initial, Duration::from_secs(10));
    while !*shutdown.borrow() {
        let started = std::time::Instant::now();
        match session(&pool, group, &config, &mut shutdown).await {
            Ok(()) => return,
            Err(e) => {
                if started.elapsed() > Duration::from_secs(30) {
                    backoff.reset(initial);
                }
                let delay = backoff.next_delay();
                tracing::error!(projector = group.name(), error = %e, retry_in = ?delay, "projector session failed");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {},
                    _ = shutdown.changed() => {},
                }
            }
        }
    }
}

async fn session(
    pool: &PgPool,
    group: ProjectorGroup,
    config: &ProjectorConfig,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), ProjectorError> {
    for model in group.models() {
        sqlx::query("INSERT INTO projector_status (projector) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(model.name())
            .execute(pool)
            .await?;
    }
    let connection =
        amqp::connect(&config.amqp, &format!("apex-projector-{}", group.name())).await?;
    let channel = connection.create_channel().await?;
    declare(&channel, config, group).await?;
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await?;
    let dlq_channel = amqp::confirm_channel(&connection).await?;
    // The queues of earlier versions, oldest first: each read model's own, then the group's
    // classic one. The group's queue is bound already, so nothing published meanwhile is
    // missed; what both hold is skipped by the offsets.
    for model in group.models() {
        let queue = config.legacy_queue(*model);
        drain_legacy(
            pool,
            group,
            &[*model],
            queue,
            config,
            &connection,
            &dlq_channel,
        )
        .await?;
    }
    let queue = config.classic_queue(group);
    drain_legacy(
        pool,
        group,
        group.models(),
        queue,
        config,
        &connection,
        &dlq_channel,
    )
    .await?;
    if group == ProjectorGroup::Instance {
        retire_timeline_queue(config, &connection).await?;
    }
    let queue = config.queue(group);
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            format!("apex-{}-{}", group.name(), uuid::Uuid::new_v4().simple())
                .as_str()
                .into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(projector = group.name(), queue, "projector consuming");
    // The group's transactions, and each read model's, run on connections they keep (see
    // `process`).
    let mut group_connection: Option<PoolConnection<Postgres>> = None;
    let mut connections: Vec<Option<PoolConnection<Postgres>>> =
        group.models().iter().map(|_| None).collect();
    let result = loop {
        let first = tokio::select! {
            next = consumer.next() => next,
            _ = shutdown.changed() => break Ok(()),
        };
        let Some(first) = first else {
            break Err(BusError::ConsumerClosed.into());
        };
        // The batch is what has already arrived: no lingering for more, which would hold
        // the first event back (under load, deliveries pile up while a batch is applied).
        let mut batch = vec![first?];
        while batch.len() < config.batch_size {
            match consumer.next().now_or_never() {
                Some(Some(delivery)) => batch.push(delivery?),
                Some(None) | None => break,
            }
        }
        let decoded: Vec<_> = batch.iter().map(|d| (d, decode(&d.data))).collect();
        let grouped = decoded.len() >= config.group_transaction_from
            && process_group(pool, &mut group_connection, group, &decoded).await;
        if !grouped {
            let models = group.models().iter().zip(connections.iter_mut());
            let results = futures::future::join_all(models.map(|(model, connection)| {
                process(pool, connection, *model, config, &dlq_channel, &decoded)
            }))
            .await;
            for result in results {
                result?;
            }
        }
        if let Some(last) = batch.last() {
            last.ack(BasicAckOptions { multiple: true }).await?;
        }
    };
    let _ = connection.close(200, "projector stopping".into()).await;
    result
}

/// Moves what is left in `queue`, a classic queue of an earlier version, into `models`, then
/// deletes it: a read model's own queue from before the groups (`models` is that read model),
/// or the group's classic queue from before its quorum queue (`models` are the group's). It
/// is unbound first, so nothing new arrives in it (a replica of the previous version that
/// reconnects declares and binds it again; the next session start of a group drains it
/// again). Events it held that the group's queue also carries are skipped by the offsets,
/// whichever comes first.
async fn drain_legacy(
    pool: &PgPool,
    group: ProjectorGroup,
    models: &[ReadModel],
    queue: String,
    config: &ProjectorConfig,
    connection: &Connection,
    dlq: &Channel,
) -> Result<(), ProjectorError> {
    let channel = unbound_legacy_queue(config, connection, &queue, group).await?;
    let mut drained = 0_u64;
    while let Some(message) = channel
        .basic_get(queue.as_str().into(), BasicGetOptions::default())
        .await?
    {
        let delivery = &message.delivery;
        let decoded = [(delivery, decode(&delivery.data))];
        for model in models {
            process(pool, &mut None, *model, config, dlq, &decoded).await?;
        }
        delivery.ack(BasicAckOptions::default()).await?;
        drained += 1;
    }
    channel
        .queue_delete(
            queue.as_str().into(),
            QueueDeleteOptions {
                if_empty: true,
                ..QueueDeleteOptions::default()
            },
        )
        .await?;
    if drained > 0 {
        let projectors: Vec<_> = models.iter().map(|m| m.name()).collect();
        tracing::info!(
            projectors = projectors.join(","),
            queue,
            drained,
            "drained and deleted a projector queue of an earlier version"
        );
    }
    let _ = channel.close(200, "legacy queue drained".into()).await;
    Ok(())
}

/// Deletes the queue the timeline had when a projector maintained it (`<prefix>.timeline`,
/// from before the groups), unbound first: the timeline is written with the events now, so a
/// queue left behind would only fill up. Whatever it still held is in the store; `apex rebuild
/// timeline` adds it to the timeline (docs/operations/rebuild.md).
async fn retire_timeline_queue(
    config: &ProjectorConfig,
    connection: &Connection,
) -> Result<(), ProjectorError> {
    let queue = config.legacy_queue(ReadModel::Timeline);
    let channel =
        unbound_legacy_queue(config, connection, &queue, ProjectorGroup::Instance).await?;
    let dropped = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    if dropped > 0 {
        tracing::warn!(
            queue,
            dropped,
            "deleted the timeline's old queue with messages in it: run `apex rebuild timeline` to add them"
        );
    }
    let _ = channel.close(200, "timeline queue retired".into()).await;
    Ok(())
}

/// A channel on which the old `queue` exists, unbound from `group`'s routing keys, so nothing
/// new arrives in it. Declared as it was (durable, no arguments) rather than probed: a passive
/// declare of a missing queue is a channel error. A queue that did not exist is created empty
/// here, and deleted by the caller.
async fn unbound_legacy_queue(
    config: &ProjectorConfig,
    connection: &Connection,
    queue: &str,
    group: ProjectorGroup,
) -> Result<Channel, ProjectorError> {
    let channel = connection.create_channel().await?;
    amqp::declare_queue(&channel, queue, QueueType::Classic).await?;
    for key in group.routing_keys() {
        channel
            .queue_unbind(
                queue.into(),
                config.amqp.exchange.as_str().into(),
                (*key).into(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(channel)
}

/// A delivery decoded, or why it cannot be.
struct Decoded {
    /// The event's row, its payload taken out (`Null`): it lives on as `event`.
    stored: StoredEvent,
    event: DomainEvent,
}

/// A delivery and its decoding (or why it has none).
type Decoding<'a> = (&'a Delivery, Result<Decoded, String>);

/// The fast path of a group of several read models: the batch applied set-based to every read
/// model in one transaction, on a connection the group keeps, with three statements whatever
/// the number of read models (`rebuild::batch`: the offsets, the rows read back, every write),
/// so a batch costs one `BEGIN`, three statements and one commit (one WAL flush). The offset
/// rows are locked read model by read model in the group's order, each in `aggregate_id` order
/// as a read model alone locks them, so two replicas' group transactions, or a group
/// transaction and a read model's set-based one, take their locks in one order (a per-event
/// batch locks in delivery order and may deadlock with it: the transaction then fails, and the
/// batch goes to the read models' own transactions, which retry it).
///
/// Every batch of at least `group_transaction_from` events (by default every batch) comes
/// here. Under load the projector's time per batch was mostly round trips, not rows: one
/// transaction of five round trips costs less, and ends sooner, than one per read model of as
/// many each running side by side (docs/benchmarks.md, change 52; change 34 had measured the
/// opposite for small batches when the folds took four to seven statements each).
///
/// Returns whether it applied the batch: `false`, having written nothing, when a delivery did
/// not decode, a read model's batch is not a clean continuation of its streams (a duplicate,
/// a gap, a read model ahead of the others after its rebuild), or the transaction failed: each
/// read model then takes the batch on its own ([`process`]), where dead letters, duplicates,
/// gap repair and retries are handled per read model.
async fn process_group(
    pool: &PgPool,
    connection: &mut Option<PoolConnection<Postgres>>,
    group: ProjectorGroup,
    batch: &[Decoding<'_>],
) -> bool {
    let models = group.models();
    if models.len() < 2 || models.contains(&ReadModel::Agents) {
        return false;
    }
    let Some(decoded) = batch
        .iter()
        .map(|(delivery, d)| d.as_ref().ok().map(|d| (*delivery, d)))
        .collect::<Option<Vec<_>>>()
    else {
        return false;
    };
    let result: Result<bool, sqlx::Error> = async {
        let conn = match connection.take() {
            Some(conn) => conn,
            None => pool.acquire().await?,
        };
        let conn: &mut PgConnection = connection.insert(conn);
        let mut tx = sqlx::Connection::begin_with(conn, group_begin_statement(models)).await?;
        if !apply_set_based(&mut tx, models, &decoded).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }
    .await;
    match result {
        Ok(true) => {
            for model in models {
                metrics::counter!("apex_projector_processed_total", "projector" => model.name())
                    .increment(decoded.len() as u64);
                record_delay(*model, &decoded);
            }
            true
        }
        Ok(false) => {
            metrics::counter!("apex_projector_group_fallback_total", "group" => group.name())
                .increment(1);
            false
        }
        Err(e) => {
            // As in `process`: closing the connection makes PostgreSQL roll back at once.
            if let Some(mut conn) = connection.take() {
                conn.close_on_drop();
            }
            metrics::counter!("apex_projector_group_fallback_total", "group" => group.name())
                .increment(1);
            tracing::warn!(projector = group.name(), error = %e, size = decoded.len(), "group batch failed; applying it per read model");
            false
        }
    }
}

/// Applies a batch of deliveries to one read model (all of them are acknowledged by the
/// caller afterwards).
///
/// The batch's transaction runs on `connection`, which the read model keeps from batch to
/// batch (taken from the pool when it has none): sqlx checks every connection given back to
/// the pool with a round trip, once per batch. When that transaction fails the connection is
/// closed, which makes PostgreSQL roll it back at once: a failure on this side of the
/// connection (a gap the store cannot fill, say) leaves the transaction open with its offset
/// locks, and a connection kept would hold them until its next use while the per-event retry
/// below waits for them (a connection given back is rolled back by the pool's check).
async fn process(
    pool: &PgPool,
    connection: &mut Option<PoolConnection<Postgres>>,
    model: ReadModel,
    config: &ProjectorConfig,
    dlq: &Channel,
    batch: &[Decoding<'_>],
) -> Result<(), ProjectorError> {
    let mut decoded = Vec::with_capacity(batch.len());
    for (delivery, d) in batch {
        match d {
            Ok(d) => decoded.push((*delivery, d)),
            Err(reason) => dead_letter(pool, model, config, dlq, delivery, None, reason).await?,
        }
    }
    if decoded.is_empty() {
        return Ok(());
    }
    // Fast path: the whole batch in one transaction; set-based when it continues every stream
    // exactly (no duplicate, no gap), event by event otherwise.
    let whole: Result<(), sqlx::Error> = async {
        let conn = match connection.take() {
            Some(conn) => conn,
            None => pool.acquire().await?,
        };
        let mut tx = begin_on(connection.insert(conn), model).await?;
        if apply_set_based(&mut tx, &[model], &decoded).await? {
            tx.commit().await?;
            metrics::counter!("apex_projector_processed_total", "projector" => model.name())
                .increment(decoded.len() as u64);
            return Ok(());
        }
        for (_, d) in &decoded {
            apply_one(&mut tx, model, &d.stored, &d.event).await?;
        }
        tx.commit().await?;
        Ok(())
    }
    .await;
    match whole {
        Ok(()) => {
            record_delay(model, &decoded);
            return Ok(());
        }
        Err(e) => {
            if let Some(mut conn) = connection.take() {
                conn.close_on_drop();
            }
            tracing::warn!(projector = model.name(), error = %e, size = decoded.len(), "batch failed; applying one by one")
        }
    }
    for (delivery, d) in decoded {
        if apply_with_retry(pool, model, config, dlq, delivery, d)
            .await?
            .is_some()
        {
            record_delay(model, &[(delivery, d)]);
        }
    }
    Ok(())
}

/// `apex_projector_apply_delay_seconds`: how long after it was recorded each event of a
/// committed batch is in `model` (see [`crate::delay`]).
fn record_delay(model: ReadModel, committed: &[(&Delivery, &Decoded)]) {
    crate::delay::record(
        &metrics::histogram!("apex_projector_apply_delay_seconds", "projector" => model.name()),
        committed.iter().map(|(_, d)| d.stored.recorded_at),
    );
}

/// Applies the batch to each of `models` set-based (see `rebuild::batch`: three statements,
/// whatever the number of read models); each event then gets a `project` span per read model
/// continuing its command's trace. Returns `false`, having written nothing, when the batch
/// does not continue its streams exactly or a read model has no set-based form.
async fn apply_set_based(
    conn: &mut PgConnection,
    models: &[ReadModel],
    decoded: &[(&Delivery, &Decoded)],
) -> Result<bool, sqlx::Error> {
    if models.contains(&ReadModel::Agents) || decoded.is_empty() {
        return Ok(false);
    }
    let batch_span = tracing::debug_span!(
        "project.batch",
        projector = models
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(","),
        size = decoded.len()
    );
    let events = decoded.iter().map(|(_, d)| (&d.stored, &d.event));
    if !batch::apply(conn, models, events)
        .instrument(batch_span)
        .await?
    {
        return Ok(false);
    }
    for model in models {
        for (_, d) in decoded {
            project_span(*model, &d.stored)
                .in_scope(|| tracing::trace!(batch = decoded.len(), "projected in a batch"));
        }
    }
    Ok(true)
}

fn decode(body: &[u8]) -> Result<Decoded, String> {
    let cloud_event: CloudEvent =
        serde_json::from_slice(body).map_err(|e| format!("not a CloudEvent: {e}"))?;
    let mut stored = cloud_event.into_stored().map_err(|e| e.to_string())?;
    // The read models take everything from the decoded event; the payload is not copied.
    let event = stored.decode_taking_payload().map_err(|e| e.to_string())?;
    Ok(Decoded { stored, event })
}

async fn apply_with_retry(
    pool: &PgPool,
    model: ReadModel,
    config: &ProjectorConfig,
    dlq: &Channel,
    delivery: &Delivery,
    decoded: &Decoded,
) -> Result<Option<Outcome>, ProjectorError> {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result: Result<Outcome, sqlx::Error> = async {
            let mut tx = begin(pool, model).await?;
            let outcome = apply_one(&mut tx, model, &decoded.stored, &decoded.event).await?;
            tx.commit().await?;
            Ok(outcome)
        }
        .await;
        match result {
            Ok(outcome) => return Ok(Some(outcome)),
            Err(e) if is_transient(&e) => {
                let delay = backoff.next_delay();
                tracing::warn!(projector = model.name(), error = %e, retry_in = ?delay, "transient failure; retrying");
                count_retry(pool, model).await;
                tokio::time::sleep(delay).await;
            }
            Err(e) if attempt < config.max_attempts => {
                tracing::warn!(projector = model.name(), error = %e, attempt, "apply failed; retrying");
                count_retry(pool, model).await;
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => {
                let reason = format!("apply failed after {attempt} attempts: {e}");
                dead_letter(
                    pool,
                    model,
                    config,
                    dlq,
                    delivery,
                    Some(&decoded.stored),
                    &reason,
                )
                .await?;
                return Ok(None);
            }
        }
    }
}

async fn count_retry(pool: &PgPool, model: ReadModel) {
    metrics::counter!("apex_projector_retried_total", "projector" => model.name()).increment(1);
    if let Err(e) = sqlx::query(
        "UPDATE projector_status SET retried_total = retried_total + 1 WHERE projector = $1",
    )
    .bind(model.name())
    .execute(pool)
    .await
    {
        tracing::warn!(projector = model.name(), error = %e, "cannot count a retry");
    }
}

/// The advisory-lock key of a read model: projector transactions hold it shared, a rebuild's
/// swap holds it exclusively, so the swap never interleaves with a projector write.
pub fn model_lock_key(model: ReadModel) -> i64 {
    let base: i64 = 0x6170_6578_5f72_6d00; // "apex_rm"
    base + ReadModel::ALL.iter().position(|m| *m == model).unwrap_or(0) as i64
}

/// Begins a projector transaction (holding the read model's lock shared).
async fn begin(
    pool: &PgPool,
    model: ReadModel,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    pool.begin_with(begin_statement(model)).await
}

/// [`begin`] on a connection the caller holds.
async fn begin_on(
    conn: &mut PgConnection,
    model: ReadModel,
) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, sqlx::Error> {
    sqlx::Connection::begin_with(conn, begin_statement(model)).await
}

/// One round trip: the lock is taken by the statement that begins the transaction (the key is
/// a constant of the read model).
fn begin_statement(model: ReadModel) -> String {
    group_begin_statement(&[model])
}

/// [`begin_statement`] for a transaction over several read models: each one's lock, in order.
fn group_begin_statement(models: &[ReadModel]) -> String {
    let locks: Vec<String> = models
        .iter()
        .map(|m| format!("pg_advisory_xact_lock_shared({})", model_lock_key(*m)))
        .collect();
    format!("BEGIN; SELECT {}", locks.join(", "))
}

/// Applies one event with its bookkeeping, inside the caller's transaction, in a span that
/// continues the trace of the command that stored the event.
pub async fn apply_one(
    conn: &mut PgConnection,
    model: ReadModel,
    stored: &StoredEvent,
    event: &DomainEvent,
) -> Result<Outcome, sqlx::Error> {
    apply_in_span(conn, model, stored, event)
        .instrument(project_span(model, stored))
        .await
}

/// The span of one event's projection, continuing the trace of the command that stored it.
fn project_span(model: ReadModel, stored: &StoredEvent) -> tracing::Span {
    let span = tracing::info_span!(
        "project",
        otel.kind = "consumer",
        projector = model.name(),
        trace_id = crate::trace::trace_id(stored.traceparent.as_deref()),
        aggregate_id = %stored.aggregate_id,
        sequence = stored.sequence,
    );
    crate::trace::follow(&span, stored.traceparent.as_deref());
    span
}

async fn apply_in_span(
    conn: &mut PgConnection,
    model: ReadModel,
    stored: &StoredEvent,
    event: &DomainEvent,
) -> Result<Outcome, sqlx::Error> {
    let name = model.name();
    sqlx::query(
        "INSERT INTO projector_offsets (projector, aggregate_type, aggregate_id, last_sequence)
         VALUES ($1, $2, $3, 0) ON CONFLICT DO NOTHING",
    )
    .bind(name)
    .bind(&stored.aggregate_type)
    .bind(&stored.aggregate_id)
    .execute(&mut *conn)
    .await?;
    let last: i64 = sqlx::query_scalar(
        "SELECT last_sequence FROM projector_offsets
          WHERE projector = $1 AND aggregate_type = $2 AND aggregate_id = $3 FOR UPDATE",
    )
    .bind(name)
    .bind(&stored.aggregate_type)
    .bind(&stored.aggregate_id)
    .fetch_one(&mut *conn)
    .await?;
    if stored.sequence <= last {
        metrics::counter!("apex_projector_skipped_total", "projector" => name).increment(1);
        sqlx::query(
            "UPDATE projector_status SET skipped_total = skipped_total + 1 WHERE projector = $1",
        )
        .bind(name)
        .execute(&mut *conn)
        .await?;
        return Ok(Outcome::Skipped);
    }
    let mut repaired = 0;
    if stored.sequence > last + 1 {
        let missing = store::aggregate_range(
            conn,
            &stored.aggregate_type,
            &stored.aggregate_id,
            last + 1,
            stored.sequence - 1,
        )
        .await?;
        if missing.len() as i64 != stored.sequence - 1 - last {
            return Err(sqlx::Error::Protocol(format!(
                "gap repair: store has {} of the {} events before {}#{}",
                missing.len(),
                stored.sequence - 1 - last,
                stored.aggregate_id,
                stored.sequence
            )));
        }
        for gap in &missing {
            let event = gap.decode().map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            model.apply(conn, gap, &event).await?;
        }
        repaired = missing.len();
        tracing::info!(projector = name, aggregate_id = %stored.aggregate_id, repaired, "filled a gap from the store");
    }
    model.apply(conn, stored, event).await?;
    tracing::debug!(projector = name, "projected");
    metrics::counter!("apex_projector_processed_total", "projector" => name)
        .increment(1 + repaired as u64);
    if repaired > 0 {
        metrics::counter!("apex_projector_repaired_total", "projector" => name)
            .increment(repaired as u64);
    }
    sqlx::query(
        "UPDATE projector_offsets SET last_sequence = $4
          WHERE projector = $1 AND aggregate_type = $2 AND aggregate_id = $3",
    )
    .bind(name)
    .bind(&stored.aggregate_type)
    .bind(&stored.aggregate_id)
    .bind(stored.sequence)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE projector_status
            SET last_position = GREATEST(last_position, $2),
                last_recorded_at = GREATEST(last_recorded_at, $3),
                last_applied_at = now(),
                processed_total = processed_total + $4,
                repaired_total = repaired_total + $5
          WHERE projector = $1",
    )
    .bind(name)
    .bind(stored.position)
    .bind(stored.recorded_at)
    .bind(1 + repaired as i64)
    .bind(repaired as i64)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome::Applied { repaired })
}

/// True for failures that say nothing about the message: the database is unreachable, or the
/// transaction lost a serialization race.
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        // Connection exceptions, operator intervention and shutdown, insufficient resources,
        // lock and statement timeouts, serialization failures and deadlocks.
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08")
                || c.starts_with("57P")
                || c.starts_with("53")
                || matches!(c.as_ref(), "57014" | "55P03" | "40001" | "40P01")
        }),
        _ => false,
    }
}

/// Records a message that cannot be projected and parks it in the dead-letter queue.
async fn dead_letter(
    pool: &PgPool,
    model: ReadModel,
    config: &ProjectorConfig,
    dlq: &Channel,
    delivery: &Delivery,
    stored: Option<&StoredEvent>,
    reason: &str,
) -> Result<(), ProjectorError> {
    tracing::error!(projector = model.name(), reason, routing_key = %delivery.routing_key, "dead-lettering a message");
    metrics::counter!("apex_projector_dead_lettered_total", "projector" => model.name())
        .increment(1);
    let body = String::from_utf8_lossy(&delivery.data).into_owned();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO dead_letters (projector, event_id, aggregate_type, aggregate_id, sequence,
                                   routing_key, reason, body)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(model.name())
    .bind(stored.map(|s| s.event_id))
    .bind(stored.map(|s| s.aggregate_type.as_str()))
    .bind(stored.map(|s| s.aggregate_id.as_str()))
    .bind(stored.map(|s| s.sequence))
    .bind(delivery.routing_key.as_str())
    .bind(reason)
    .bind(&body)
    .execute(&mut *tx)
    .await?;
    if let Some(s) = stored {
        // Move past the poison event so later events of the aggregate do not all fail on it.
        sqlx::query(
            "INSERT INTO projector_offsets (projector, aggregate_type, aggregate_id, last_sequence)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (projector, aggregate_type, aggregate_id)
             DO UPDATE SET last_sequence = GREATEST(projector_offsets.last_sequence, $4)",
        )
        .bind(model.name())
        .bind(&s.aggregate_type)
        .bind(&s.aggregate_id)
        .bind(s.sequence)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-apex-reason"),
        AMQPValue::LongString(reason.into()),
    );
    headers.insert(
        ShortString::from("x-apex-routing-key"),
        AMQPValue::LongString(delivery.routing_key.as_str().into()),
    );
    let queue = config.dead_letter_queue(model);
    let confirm = dlq
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &delivery.data,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await?
        .await?;
    if !confirm.is_ack() {
        return Err(BusError::Nacked.into());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_read_model_is_maintained_by_exactly_the_group_of_its_aggregate_type() {
        for model in ReadModel::ALL {
            let holders: Vec<_> = ProjectorGroup::ALL
                .into_iter()
                .filter(|g| g.models().contains(&model))
                .collect();
            let group = ProjectorGroup::of(model);
            assert_eq!(holders, group.into_iter().collect::<Vec<_>>(), "{model}");
            if let Some(group) = group {
                assert_eq!(group.name(), model.aggregate_type());
            }
        }
        // The timeline is the one inline projection.
        assert_eq!(ProjectorGroup::of(ReadModel::Timeline), None);
    }

    #[test]
    fn a_read_model_name_is_refused_as_a_group_with_its_group_named() {
        let err = "usage".parse::<ProjectorGroup>().unwrap_err();
        assert!(err.contains("projector group `instance`"), "{err}");
        let err = "timeline".parse::<ProjectorGroup>().unwrap_err();
        assert!(err.contains("by no projector group"), "{err}");
        assert_eq!("agent".parse::<ProjectorGroup>(), Ok(ProjectorGroup::Agent));
    }

    #[test]
    fn the_projectors_declare_no_dead_letter_queue_for_the_inline_timeline() {
        let config = ProjectorConfig::new(AmqpConfig {
            uri: "amqp://localhost".to_owned(),
            exchange: "apex.events".to_owned(),
            chat_exchange: "apex.chat".to_owned(),
        });
        let queues = config.queues();
        assert!(
            queues.contains(&"apex.projector.usage.dlq".to_owned()),
            "{queues:?}"
        );
        assert!(!queues.iter().any(|q| q.contains("timeline")), "{queues:?}");
    }
}
