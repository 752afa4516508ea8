//! Runs commands against one aggregate type with concurrency control.

use std::time::Duration;

use apex_domain::DomainError;
use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{EventStoreAggregateContext, PersistedEventStore};
use cqrs_es::{Aggregate, AggregateError, EventStore};
use sqlx::PgPool;

use crate::context::{CommandContext, CommandOutcome};
use crate::error::CommandError;
use crate::group_commit::GroupCommitRepository;
use crate::idempotency;
use crate::locks::AggregateLocks;

/// How often a command is re-run after losing an optimistic-concurrency race.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles each time, with jitter.
    pub base_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            base_delay: Duration::from_millis(2),
        }
    }
}

/// An aggregate kept in memory after a command, with what the store needs to append to it.
struct Cached<A> {
    aggregate: A,
    sequence: usize,
    snapshot: Option<usize>,
}

/// Executes commands of aggregate type `A` over its postgres-es event store.
///
/// Hot aggregates stay in memory between commands, so a command usually costs one write and
/// no read. A copy made stale by another process is harmless: its append collides with the
/// other process's event on the `(aggregate, sequence)` primary key, the copy is dropped and the
/// command re-runs against state loaded from the store.
pub struct CommandBus<A: Aggregate> {
    store: PersistedEventStore<GroupCommitRepository, A>,
    pool: PgPool,
    retry: RetryPolicy,
    /// Commands on the same aggregate in one process queue instead of racing.
    locks: AggregateLocks,
    cache: std::sync::Mutex<std::collections::HashMap<String, Cached<A>>>,
    cache_capacity: usize,
    snapshot_every: Option<usize>,
}

impl<A> CommandBus<A>
where
    A: Aggregate<Error = DomainError, Services = ()> + Clone,
    A::Command: Clone,
{
    /// A bus over `store`; `pool` serves the idempotency lookups.
    pub fn new(
        store: PersistedEventStore<GroupCommitRepository, A>,
        pool: PgPool,
        retry: RetryPolicy,
    ) -> Self {
        Self {
            store,
            pool,
            retry,
            locks: AggregateLocks::default(),
            cache: std::sync::Mutex::new(std::collections::HashMap::new()),
            cache_capacity: 0,
            snapshot_every: None,
        }
    }

    /// Keeps up to `capacity` aggregates in memory between commands. `snapshot_every` must
    /// match the store's snapshot interval (`None` for a store without snapshots).
    pub fn with_cache(mut self, capacity: usize, snapshot_every: Option<usize>) -> Self {
        self.cache_capacity = capacity;
        self.snapshot_every = snapshot_every;
        self
    }

    fn cache_take(&self, aggregate_id: &str) -> Option<Cached<A>> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(aggregate_id)
    }

    fn cache_put(&self, aggregate_id: &str, cached: Cached<A>) {
        if self.cache_capacity == 0 {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.cache_capacity {
            // Evict an arbitrary tenth: cheap, and hot aggregates come straight back.
            let victims: Vec<String> = cache
                .keys()
                .take(self.cache_capacity / 10 + 1)
                .cloned()
                .collect();
            for victim in victims {
                cache.remove(&victim);
            }
        }
        cache.insert(aggregate_id.to_owned(), cached);
    }

    /// The snapshot counter after appending `appended` events to a stream at `sequence`,
    /// as the cqrs-es snapshot store computes it.
    fn snapshot_after(
        &self,
        sequence: usize,
        appended: usize,
        snapshot: Option<usize>,
    ) -> Option<usize> {
        match self.snapshot_every {
            Some(every) if appended >= every - (sequence % every) => {
                Some(snapshot.map_or(1, |s| s + 1))
            }
            _ => snapshot,
        }
    }

    /// Loads the current state of an aggregate (default state when it has no events).
    pub async fn load(&self, aggregate_id: &str) -> Result<(A, u64), CommandError> {
        let context = self
            .store
            .load_aggregate(aggregate_id)
            .await
            .map_err(map_aggregate_error)?;
        Ok((context.aggregate, context.current_sequence as u64))
    }

    /// Runs `command` on `aggregate_id`, re-running it against fresh state when a concurrent
    /// append wins the race, and replaying the original answer for a repeated idempotency key.
    #[tracing::instrument(name = "command", skip_all, fields(aggregate = A::TYPE, aggregate_id = %aggregate_id, command = name, trace_id = context.traceparent.as_deref().and_then(|t| t.get(3..35))))]
    pub async fn execute(
        &self,
        aggregate_id: &str,
        name: &'static str,
        command: A::Command,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError> {
        let result = self
            .execute_with_retries(aggregate_id, name, command, context)
            .await;
        let outcome = match &result {
            Ok(o) if o.replayed => "replayed",
            Ok(_) => "accepted",
            Err(CommandError::Domain(_)) => "rejected",
            Err(CommandError::Conflict { .. }) => "conflict",
            Err(CommandError::IdempotencyKeyReused) => "rejected",
            Err(CommandError::Unavailable(_)) => "unavailable",
            Err(CommandError::Store(_)) => "failed",
        };
        metrics::counter!("apex_commands_total", "aggregate" => A::TYPE, "command" => name, "outcome" => outcome)
            .increment(1);
        result
    }

    async fn execute_with_retries(
        &self,
        aggregate_id: &str,
        name: &'static str,
        command: A::Command,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError> {
        let _guard = self.locks.lock(aggregate_id).await;
        let mut delay = self.retry.base_delay;
        for attempt in 1..=self.retry.max_attempts {
            // The request hash covers the target (path) and the body, so a stored answer is
            // the one the original request got.
            if let Some(key) = &context.idempotency
                && let Some(outcome) =
                    idempotency::replay(&self.pool, &context.actor.id, A::TYPE, key).await?
            {
                return Ok(outcome);
            }
            match self.try_once(aggregate_id, command.clone(), context).await {
                Err(CommandError::Conflict { .. }) if attempt < self.retry.max_attempts => {
                    tracing::debug!(attempt, "optimistic concurrency conflict; retrying");
                    metrics::counter!("apex_command_conflicts_retried_total", "aggregate" => A::TYPE, "command" => name)
                        .increment(1);
                    tokio::time::sleep(jitter(delay)).await;
                    delay = delay.saturating_mul(2).min(Duration::from_millis(200));
                }
                Err(CommandError::Conflict { .. }) => {
                    return Err(CommandError::Conflict { attempts: attempt });
                }
                other => return other,
            }
        }
        Err(CommandError::Conflict {
            attempts: self.retry.max_attempts,
        })
    }

    async fn try_once(
        &self,
        aggregate_id: &str,
        command: A::Command,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError> {
        // We hold the aggregate's lock: nobody else in this process touches the entry.
        let cached = self.cache_take(aggregate_id);
        let from_cache = cached.is_some();
        let mut loaded = match cached {
            Some(cached) => EventStoreAggregateContext {
                aggregate_id: aggregate_id.to_owned(),
                aggregate: cached.aggregate,
                current_sequence: cached.sequence,
                current_snapshot: cached.snapshot,
            },
            None => self
                .store
                .load_aggregate(aggregate_id)
                .await
                .map_err(map_aggregate_error)?,
        };
        let mut sink = EventSink::default();
        if let Err(refusal) = loaded.aggregate.handle(command.clone(), &(), &sink).await {
            if !from_cache {
                return Err(refusal.into());
            }
            // A refusal never reaches the store, so a copy made stale by another process would
            // not be caught by the primary key: decide again on state loaded from the store.
            loaded = self
                .store
                .load_aggregate(aggregate_id)
                .await
                .map_err(map_aggregate_error)?;
            sink = EventSink::default();
            loaded.aggregate.handle(command, &(), &sink).await?;
        }
        let sequence = loaded.current_sequence;
        let events = sink.collect().await;
        if events.is_empty() {
            let snapshot = loaded.current_snapshot;
            self.cache_put(
                aggregate_id,
                Cached {
                    aggregate: loaded.aggregate,
                    sequence,
                    snapshot,
                },
            );
            return Ok(CommandOutcome {
                aggregate_id: aggregate_id.to_owned(),
                sequence: sequence as u64,
                appended: 0,
                replayed: false,
            });
        }
        // `handle` leaves the aggregate untouched (see the domain), so this is the state the
        // events apply to.
        let mut next = (self.cache_capacity > 0).then(|| loaded.aggregate.clone());
        let snapshot = loaded.current_snapshot;
        let committed = self
            .store
            .commit(events, loaded, context.metadata())
            .await
            .map_err(map_aggregate_error)?;
        let last = committed.last().map_or(sequence, |e| e.sequence);
        if let Some(aggregate) = next.as_mut() {
            for envelope in &committed {
                aggregate.apply(envelope.payload.clone());
            }
        }
        if let Some(aggregate) = next {
            let snapshot = self.snapshot_after(sequence, committed.len(), snapshot);
            self.cache_put(
                aggregate_id,
                Cached {
                    aggregate,
                    sequence: last,
                    snapshot,
                },
            );
        }
        Ok(CommandOutcome {
            aggregate_id: aggregate_id.to_owned(),
            sequence: last as u64,
            appended: committed.len(),
            replayed: false,
        })
    }
}

fn map_aggregate_error(err: AggregateError<DomainError>) -> CommandError {
    match err {
        AggregateError::UserError(e) => CommandError::Domain(e),
        AggregateError::AggregateConflict => CommandError::Conflict { attempts: 1 },
        AggregateError::DatabaseConnectionError(e) => CommandError::Unavailable(e),
        AggregateError::DeserializationError(e) | AggregateError::UnexpectedError(e) => {
            CommandError::from_store(e)
        }
    }
}

/// `delay` scaled by a pseudo-random factor in [0.5, 1.5), so racing replicas spread out.
fn jitter(delay: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.5 + f64::from(nanos % 1000) / 1000.0;
    delay.mul_f64(factor)
}
