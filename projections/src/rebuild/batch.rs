//! Set-based application of one batch of instance events to one or several read models: the
//! live projectors' fast path and the rebuild's replay into a private copy.
//!
//! The per-event path spends five to seven statements per event (offset bookkeeping around the
//! read-model write). When a batch continues every stream it touches exactly (the common case:
//! no duplicate, no gap), it is folded in memory with the same rules as
//! `read_models::*::apply` and written with one `unnest` clause per table. The fold reads what
//! it needs of earlier batches (the rows of the batch's runs) first, so the result is the one
//! the per-event path produces; `consistency::replayed` is the reference the tests compare with.
//!
//! Round trips: whatever the number of read models, a batch costs three statements: one locks
//! (and creates) the offset rows of every read model's streams, one reads back every read
//! model's rows of the batch's earlier runs, and one writes every table, the offsets and the
//! status rows (data-modifying `WITH` clauses). Under load the projector's time per batch was
//! mostly round trips, not rows (docs/benchmarks.md, change 52).
//!
//! Concurrency: several projector replicas may consume one queue. The batch first locks the
//! offset rows of its streams (created if missing, locked read model by read model in
//! `aggregate_id` order), so two batches touching one stream serialize and the second sees the
//! first's offsets; rows shared across streams (per agent, per user) are written in key order,
//! so replicas never deadlock.

use std::collections::HashMap;

use apex_domain::instance::InstanceEvent;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::{Arguments, PgConnection, Postgres, Row};
use uuid::Uuid;

use crate::envelope::{DomainEvent, StoredEvent};
use crate::read_models::{ReadModel, timeline_entry};

type Event<'a> = (&'a StoredEvent, Uuid, &'a InstanceEvent);

/// Applies `events` (all of the models' aggregate type, in store order) set-based to each of
/// `models`, in one statement for the offsets, one for what the folds read and one for every
/// write. Returns `false`, having written nothing, when the batch is not a clean continuation
/// of every stream it touches in every read model: the caller then takes the per-event path.
pub(crate) async fn apply<'a>(
    conn: &mut PgConnection,
    models: &[ReadModel],
    events: impl IntoIterator<Item = (&'a StoredEvent, &'a DomainEvent)>,
) -> Result<bool, sqlx::Error> {
    let Some(batch) = instance_batch(events) else {
        return Ok(false);
    };
    if models.contains(&ReadModel::Agents) {
        return Ok(false);
    }
    if batch.is_empty() {
        return Ok(true);
    }
    let Some(last) = continuation(conn, models, &batch).await? else {
        return Ok(false);
    };
    let mut known = read(conn, models, &batch).await?;
    let mut writes = Writes::default();
    for model in models {
        fold(*model, &batch, &mut known, &mut writes)?;
    }
    bookkeeping(&mut writes, models, &batch, last)?;
    writes.execute(conn).await?;
    Ok(true)
}

/// The batch's instance events with their run ids, or `None` when one is of another kind.
fn instance_batch<'a>(
    events: impl IntoIterator<Item = (&'a StoredEvent, &'a DomainEvent)>,
) -> Option<Vec<Event<'a>>> {
    events
        .into_iter()
        .map(
            |(stored, event)| match (event, Uuid::parse_str(&stored.aggregate_id)) {
                (DomainEvent::Instance(event), Ok(id)) => Some((stored, id, event)),
                _ => None,
            },
        )
        .collect()
}

/// The offsets of a rebuild's private copy, kept in memory while the store is replayed into
/// it: nothing else writes the copy, so they need not be read, locked and written back with
/// every batch. [`flush_offsets`] writes them into the copy's `projector_offsets`.
#[derive(Debug, Default)]
pub(crate) struct CopyOffsets {
    last: HashMap<String, i64>,
}

/// [`apply`] for the replay into a rebuild's private copy (`search_path` pointing at it): the
/// same fold and the same writes, but the continuation is checked against, and advanced in,
/// `offsets` instead of the copy's `projector_offsets`, and the status row is left alone (the
/// swap takes only the offsets). Returns `false`, having written nothing and left `offsets`
/// as they were, when the batch is not a clean continuation of every stream it touches.
pub(crate) async fn apply_replay<'a>(
    conn: &mut PgConnection,
    model: ReadModel,
    events: impl IntoIterator<Item = (&'a StoredEvent, &'a DomainEvent)>,
    offsets: &mut CopyOffsets,
) -> Result<bool, sqlx::Error> {
    let Some(batch) = instance_batch(events) else {
        return Ok(false);
    };
    if model == ReadModel::Agents {
        return Ok(false);
    }
    let mut next: HashMap<&str, i64> = HashMap::new();
    for (stored, _, _) in &batch {
        let id = stored.aggregate_id.as_str();
        let seq = next
            .entry(id)
            .or_insert_with(|| offsets.last.get(id).copied().unwrap_or(0));
        if stored.sequence != *seq + 1 {
            return Ok(false);
        }
        *seq = stored.sequence;
    }
    if batch.is_empty() {
        return Ok(true);
    }
    let mut known = read(conn, &[model], &batch).await?;
    let mut writes = Writes::default();
    fold(model, &batch, &mut known, &mut writes)?;
    writes.execute(conn).await?;
    for (id, seq) in next {
        match offsets.last.get_mut(id) {
            Some(last) => *last = seq,
            None => {
                offsets.last.insert(id.to_owned(), seq);
            }
        }
    }
    Ok(true)
}

/// Writes `offsets` into `projector_offsets` (of the copy `search_path` points at).
pub(crate) async fn flush_offsets(
    conn: &mut PgConnection,
    model: ReadModel,
    offsets: &CopyOffsets,
) -> Result<(), sqlx::Error> {
    let mut entries: Vec<(&String, &i64)> = offsets.last.iter().collect();
    entries.sort_unstable();
    for chunk in entries.chunks(50_000) {
        let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
        let seqs: Vec<i64> = chunk.iter().map(|(_, seq)| **seq).collect();
        sqlx::query(
            "INSERT INTO projector_offsets (projector, aggregate_type, aggregate_id, last_sequence)
             SELECT $1, 'instance', id, seq FROM unnest($2::text[], $3::bigint[]) AS t(id, seq)
             ON CONFLICT (projector, aggregate_type, aggregate_id)
             DO UPDATE SET last_sequence = EXCLUDED.last_sequence",
        )
        .bind(model.name())
        .bind(&ids)
        .bind(&seqs)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The offsets recorded in `projector_offsets` (of the copy `search_path` points at), for
/// [`apply_replay`] to go on from after the per-event path wrote them.
pub(crate) async fn load_offsets(
    conn: &mut PgConnection,
    model: ReadModel,
) -> Result<CopyOffsets, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregate_id, last_sequence FROM projector_offsets
          WHERE projector = $1 AND aggregate_type = 'instance'",
    )
    .bind(model.name())
    .fetch_all(&mut *conn)
    .await?;
    Ok(CopyOffsets {
        last: rows.into_iter().collect(),
    })
}

/// Each read model's last sequence of every stream after the batch (in `models` order), or
/// `None` when some event of the batch is not exactly the next one of its stream in one of
/// them.
///
/// One statement: the offset rows of the streams are locked read model by read model, each in
/// `aggregate_id` order (as a read model alone locks them), and the rows of streams that open
/// in the batch are created (locked by being new). A stream that opens in the batch but
/// already has a row (a redelivery) is locked and read like the others; one another replica
/// created since the statement began is in neither part, and the batch goes to the per-event
/// path.
async fn continuation(
    conn: &mut PgConnection,
    models: &[ReadModel],
    batch: &[Event<'_>],
) -> Result<Option<Vec<HashMap<String, i64>>>, sqlx::Error> {
    let mut opening: HashMap<&str, bool> = HashMap::new();
    for (stored, _, _) in batch {
        opening
            .entry(stored.aggregate_id.as_str())
            .or_insert(stored.sequence == 1);
    }
    let mut ids: Vec<(&str, bool)> = opening.into_iter().collect();
    ids.sort_unstable();
    let (mut projectors, mut keys, mut opens) = (Vec::new(), Vec::new(), Vec::new());
    for model in models {
        for (id, open) in &ids {
            projectors.push(model.name());
            keys.push(*id);
            opens.push(*open);
        }
    }
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        // One primary-key lookup per stream, through `LATERAL`. (`aggregate_id = ANY(…)` let
        // the planner keep a plan that filtered every offset row of the projector against the
        // array, so each batch cost more as the table grew.)
        "WITH k AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::bool[])
                      WITH ORDINALITY AS k(projector, id, opening, n)
         ), created AS (
             INSERT INTO projector_offsets (projector, aggregate_type, aggregate_id, last_sequence)
             SELECT projector, 'instance', id, 0 FROM k WHERE opening ORDER BY n
             ON CONFLICT DO NOTHING
             RETURNING projector, aggregate_id, last_sequence
         )
         SELECT o.projector, o.aggregate_id, o.last_sequence
           FROM k CROSS JOIN LATERAL (
                SELECT projector, aggregate_id, last_sequence FROM projector_offsets
                 WHERE projector = k.projector AND aggregate_type = 'instance'
                   AND aggregate_id = k.id
                   FOR UPDATE
           ) o
         UNION ALL
         SELECT projector, aggregate_id, last_sequence FROM created",
    )
    .bind(&projectors)
    .bind(&keys)
    .bind(&opens)
    .fetch_all(&mut *conn)
    .await?;
    let mut last: Vec<HashMap<String, i64>> = models.iter().map(|_| HashMap::new()).collect();
    for (projector, id, seq) in rows {
        if let Some(i) = models.iter().position(|m| m.name() == projector) {
            last[i].insert(id, seq);
        }
    }
    for offsets in &mut last {
        for (stored, _, _) in batch {
            let Some(seq) = offsets.get_mut(stored.aggregate_id.as_str()) else {
                return Ok(None);
            };
            if stored.sequence != *seq + 1 {
                return Ok(None);
            }
            *seq = stored.sequence;
        }
    }
    Ok(Some(last))
}

/// Offsets and status of every read model, once per batch (what `apply_one` does per event),
/// as clauses of the batch's statement.
fn bookkeeping(
    writes: &mut Writes,
    models: &[ReadModel],
    batch: &[Event<'_>],
    last: Vec<HashMap<String, i64>>,
) -> Result<(), sqlx::Error> {
    let (mut projectors, mut ids, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
    for (model, offsets) in models.iter().zip(last) {
        for (id, seq) in offsets {
            projectors.push(model.name());
            ids.push(id);
            seqs.push(seq);
        }
    }
    let (p, i, s) = (
        writes.bind(projectors)?,
        writes.bind(ids)?,
        writes.bind(seqs)?,
    );
    writes.clause(format!(
        "INSERT INTO projector_offsets (projector, aggregate_type, aggregate_id, last_sequence)
         SELECT projector, 'instance', id, seq
           FROM unnest({p}::text[], {i}::text[], {s}::bigint[]) AS t(projector, id, seq)
         ON CONFLICT (projector, aggregate_type, aggregate_id)
         DO UPDATE SET last_sequence = EXCLUDED.last_sequence"
    ));
    let names: Vec<&str> = models.iter().map(|m| m.name()).collect();
    let (names, position, recorded, count) = (
        writes.bind(names)?,
        writes.bind(batch.iter().map(|(s, _, _)| s.position).max())?,
        writes.bind(batch.iter().map(|(s, _, _)| s.recorded_at).max())?,
        writes.bind(batch.len() as i64)?,
    );
    writes.clause(format!(
        "UPDATE projector_status
            SET last_position = GREATEST(last_position, {position}),
                last_recorded_at = GREATEST(last_recorded_at, {recorded}),
                last_applied_at = now(),
                processed_total = processed_total + {count}
          WHERE projector = ANY({names}::text[])"
    ));
    Ok(())
}

/// The data-modifying clauses of one statement and their values: a batch's writes to every
/// table go to PostgreSQL in one round trip. Each table is written by one clause (a statement
/// may not change a row twice).
#[derive(Default)]
struct Writes {
    clauses: Vec<String>,
    values: PgArguments,
}

impl Writes {
    /// Adds a value and returns its placeholder (`$n`).
    fn bind<T>(&mut self, value: T) -> Result<String, sqlx::Error>
    where
        T: for<'q> sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + 'static,
    {
        self.values.add(value).map_err(sqlx::Error::Encode)?;
        Ok(format!("${}", self.values.len()))
    }

    fn clause(&mut self, sql: String) {
        self.clauses.push(sql);
    }

    /// Runs every clause in one statement (nothing to do without one).
    async fn execute(self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if self.clauses.is_empty() {
            return Ok(());
        }
        let ctes: Vec<String> = self
            .clauses
            .iter()
            .enumerate()
            .map(|(i, sql)| format!("w{i} AS ({sql})"))
            .collect();
        let sql = format!("WITH {} SELECT 1", ctes.join(",\n"));
        sqlx::query_with(&sql, self.values).execute(conn).await?;
        Ok(())
    }
}

/// What the folds read back of the batch's earlier runs, each read model's part (empty for
/// the read models not asked for). Each fold works on its own part in place, adding the runs
/// the batch creates.
#[derive(Default)]
struct Known {
    /// `rm_timeline`: the owner of each run (from its first entry).
    owners: HashMap<Uuid, String>,
    /// `rm_instances`: the run summaries.
    instances: HashMap<Uuid, InstanceRow>,
    /// `rm_agent_stats_runs`: agent, status and creation of each run.
    runs: HashMap<Uuid, (String, String, DateTime<Utc>)>,
    /// `rm_usage_owners`: the user of each run.
    users: HashMap<Uuid, String>,
}

/// Each read model's rows of the batch's earlier runs, in one statement: one row per run, a
/// `LEFT JOIN LATERAL` (a primary-key lookup) per read model.
async fn read(
    conn: &mut PgConnection,
    models: &[ReadModel],
    batch: &[Event<'_>],
) -> Result<Known, sqlx::Error> {
    let mut known = Known::default();
    let runs = earlier_runs(batch);
    if runs.is_empty() {
        return Ok(known);
    }
    let (mut columns, mut joins) = (String::new(), String::new());
    for model in models {
        let (c, j) = match model {
            ReadModel::Timeline => (
                "tl.owner_id AS tl_owner_id",
                "rm_timeline WHERE instance_id = k.id AND sequence = 1) tl",
            ),
            ReadModel::Instances => (
                "i.owner_id AS i_owner_id, i.agent_id AS i_agent_id,
                 i.agent_version AS i_agent_version, i.thread_id AS i_thread_id,
                 i.status AS i_status, i.input AS i_input, i.created_at AS i_created_at,
                 i.started_at AS i_started_at, i.ended_at AS i_ended_at,
                 i.updated_at AS i_updated_at, i.last_sequence AS i_last_sequence,
                 i.thought_count AS i_thought_count, i.tool_call_count AS i_tool_call_count,
                 i.open_tool_calls AS i_open_tool_calls, i.last_message AS i_last_message,
                 i.last_internal AS i_last_internal",
                "rm_instances WHERE instance_id = k.id) i",
            ),
            ReadModel::AgentStats => (
                "a.agent_id AS a_agent_id, a.status AS a_status, a.created_at AS a_created_at",
                "rm_agent_stats_runs WHERE instance_id = k.id) a",
            ),
            ReadModel::Usage => (
                "u.user_id AS u_user_id",
                "rm_usage_owners WHERE instance_id = k.id) u",
            ),
            ReadModel::Agents => continue,
        };
        columns.push_str(", ");
        columns.push_str(c);
        joins.push_str(" LEFT JOIN LATERAL (SELECT * FROM ");
        joins.push_str(j);
        joins.push_str(" ON true");
    }
    let rows = sqlx::query(&format!(
        "SELECT k.id{columns} FROM unnest($1::uuid[]) AS k(id){joins}"
    ))
    .bind(&runs)
    .fetch_all(&mut *conn)
    .await?;
    for row in rows {
        let id: Uuid = row.try_get("id")?;
        for model in models {
            match model {
                ReadModel::Timeline => {
                    if let Some(owner) = row.try_get("tl_owner_id")? {
                        known.owners.insert(id, owner);
                    }
                }
                ReadModel::Instances => {
                    if let Some(instance) = InstanceRow::read(id, &row)? {
                        known.instances.insert(id, instance);
                    }
                }
                ReadModel::AgentStats => {
                    if let Some(agent) = row.try_get::<Option<String>, _>("a_agent_id")? {
                        let run = (
                            agent,
                            row.try_get("a_status")?,
                            row.try_get("a_created_at")?,
                        );
                        known.runs.insert(id, run);
                    }
                }
                ReadModel::Usage => {
                    if let Some(user) = row.try_get("u_user_id")? {
                        known.users.insert(id, user);
                    }
                }
                ReadModel::Agents => {}
            }
        }
    }
    Ok(known)
}

/// Folds the batch into `model`'s writes.
fn fold(
    model: ReadModel,
    batch: &[Event<'_>],
    known: &mut Known,
    writes: &mut Writes,
) -> Result<(), sqlx::Error> {
    match model {
        ReadModel::Timeline => timeline(batch, &mut known.owners, writes),
        ReadModel::Instances => instances(batch, &mut known.instances, writes),
        ReadModel::AgentStats => agent_stats(batch, &mut known.runs, writes),
        ReadModel::Usage => usage(batch, &mut known.users, writes),
        ReadModel::Agents => Err(sqlx::Error::Protocol(
            "the agents read model has no set-based form".to_owned(),
        )),
    }
}

/// Runs of the batch not created in it: the rows the fold reads back (one primary-key lookup
/// per run, through `unnest` and `LATERAL`).
fn earlier_runs(batch: &[Event<'_>]) -> Vec<Uuid> {
    let created: std::collections::HashSet<Uuid> = batch
        .iter()
        .filter(|(_, _, e)| matches!(e, InstanceEvent::InstanceCreated { .. }))
        .map(|(_, id, _)| *id)
        .collect();
    let mut ids: Vec<Uuid> = batch
        .iter()
        .map(|(_, id, _)| *id)
        .filter(|id| !created.contains(id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn duplicate(table: &str, id: Uuid) -> sqlx::Error {
    sqlx::Error::Protocol(format!("rebuild: {table} already has run {id}"))
}

fn timeline(
    batch: &[Event<'_>],
    owners: &mut HashMap<Uuid, String>,
    writes: &mut Writes,
) -> Result<(), sqlx::Error> {
    let n = batch.len();
    let (mut ids, mut seqs, mut owner_ids, mut kinds) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut ats, mut displays, mut traces) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (stored, id, event) in batch {
        if let InstanceEvent::InstanceCreated { owner_id, .. } = event {
            owners.insert(*id, owner_id.clone());
        }
        let owner = owners.get(id).ok_or(sqlx::Error::RowNotFound)?;
        let entry = timeline_entry(event);
        ids.push(*id);
        seqs.push(stored.sequence);
        owner_ids.push(owner.clone());
        kinds.push(entry.kind);
        ats.push(stored.recorded_at);
        displays.push(entry.display);
        traces.push(stored.traceparent.clone());
    }
    let columns = [
        writes.bind(ids)?,
        writes.bind(seqs)?,
        writes.bind(owner_ids)?,
        writes.bind(kinds)?,
        writes.bind(ats)?,
        writes.bind(displays)?,
        writes.bind(traces)?,
    ];
    let [i, s, o, k, a, d, t] = &columns;
    writes.clause(format!(
        "INSERT INTO rm_timeline (instance_id, sequence, owner_id, kind, at, display, traceparent)
         SELECT * FROM unnest({i}::uuid[], {s}::bigint[], {o}::text[], {k}::text[],
                              {a}::timestamptz[], {d}::jsonb[], {t}::text[])"
    ));
    Ok(())
}

/// One `rm_instances` row.
struct InstanceRow {
    instance_id: Uuid,
    owner_id: String,
    agent_id: String,
    agent_version: i32,
    thread_id: String,
    status: String,
    input: String,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    ended_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
    last_sequence: i64,
    thought_count: i32,
    tool_call_count: i32,
    open_tool_calls: i32,
    last_message: Option<String>,
    last_internal: Option<Value>,
}

impl InstanceRow {
    /// The run's row among the `i_` columns of [`read`]'s row, if it has one.
    fn read(instance_id: Uuid, row: &PgRow) -> Result<Option<Self>, sqlx::Error> {
        let Some(owner_id) = row.try_get("i_owner_id")? else {
            return Ok(None);
        };
        Ok(Some(Self {
            instance_id,
            owner_id,
            agent_id: row.try_get("i_agent_id")?,
            agent_version: row.try_get("i_agent_version")?,
            thread_id: row.try_get("i_thread_id")?,
            status: row.try_get("i_status")?,
            input: row.try_get("i_input")?,
            created_at: row.try_get("i_created_at")?,
            started_at: row.try_get("i_started_at")?,
            ended_at: row.try_get("i_ended_at")?,
            updated_at: row.try_get("i_updated_at")?,
            last_sequence: row.try_get("i_last_sequence")?,
            thought_count: row.try_get("i_thought_count")?,
            tool_call_count: row.try_get("i_tool_call_count")?,
            open_tool_calls: row.try_get("i_open_tool_calls")?,
            last_message: row.try_get("i_last_message")?,
            last_internal: row.try_get("i_last_internal")?,
        }))
    }
}

/// What a later event does to a run summary (the rules of `read_models::instances`):
/// (status, started, ended, thought+, tool+, open delta, last message, internal).
type Change = (
    Option<&'static str>,
    bool,
    bool,
    i32,
    i32,
    i32,
    Option<String>,
    Value,
);

fn change(event: &InstanceEvent) -> Option<Change> {
    Some(match event {
        InstanceEvent::InstanceCreated { .. } => return None,
        InstanceEvent::InstanceStarted { display, internal } => (
            Some("running"),
            true,
            false,
            0,
            0,
            0,
            display.message.clone(),
            json!({ "prompt": internal.prompt }),
        ),
        InstanceEvent::ThoughtRecorded { display, internal } => (
            None,
            false,
            false,
            1,
            0,
            0,
            Some(display.thought.clone()),
            json!({ "prompt": internal.prompt, "raw": internal.raw }),
        ),
        InstanceEvent::ToolCallStarted {
            tool,
            display,
            internal,
            ..
        } => (
            None,
            false,
            false,
            0,
            1,
            1,
            Some(
                display
                    .summary
                    .clone()
                    .unwrap_or_else(|| format!("Running {tool}")),
            ),
            json!({ "arguments": internal.arguments }),
        ),
        InstanceEvent::ToolCallCompleted {
            tool,
            display,
            internal,
            ..
        } => (
            None,
            false,
            false,
            0,
            0,
            -1,
            Some(
                display
                    .summary
                    .clone()
                    .unwrap_or_else(|| format!("{tool} finished")),
            ),
            json!({ "result": internal.result, "duration_ms": internal.duration_ms }),
        ),
        InstanceEvent::InstanceCompleted { display, internal } => (
            Some("completed"),
            false,
            true,
            0,
            0,
            0,
            Some(display.output.clone()),
            json!({ "raw": internal.raw }),
        ),
        InstanceEvent::InstanceFailed { display, internal } => (
            Some("failed"),
            false,
            true,
            0,
            0,
            0,
            Some(display.error.clone()),
            json!({ "raw": internal.raw }),
        ),
        InstanceEvent::InstanceCancelled { display, by } => (
            Some("cancelled"),
            false,
            true,
            0,
            0,
            0,
            Some(
                display
                    .reason
                    .clone()
                    .unwrap_or_else(|| "Cancelled".to_owned()),
            ),
            json!({ "cancelled_by": by }),
        ),
    })
}

fn instances(
    batch: &[Event<'_>],
    rows: &mut HashMap<Uuid, InstanceRow>,
    writes: &mut Writes,
) -> Result<(), sqlx::Error> {
    let mut order = Vec::new();
    for (stored, id, event) in batch {
        let at = stored.recorded_at;
        if let InstanceEvent::InstanceCreated {
            owner_id,
            agent_id,
            agent_version,
            thread_id,
            input,
            ..
        } = event
        {
            if rows.contains_key(id) {
                return Err(duplicate("rm_instances", *id));
            }
            order.push(*id);
            rows.insert(
                *id,
                InstanceRow {
                    instance_id: *id,
                    owner_id: owner_id.clone(),
                    agent_id: agent_id.clone(),
                    agent_version: *agent_version as i32,
                    thread_id: thread_id.clone(),
                    status: "pending".to_owned(),
                    input: input.clone(),
                    created_at: at,
                    started_at: None,
                    ended_at: None,
                    updated_at: at,
                    last_sequence: stored.sequence,
                    thought_count: 0,
                    tool_call_count: 0,
                    open_tool_calls: 0,
                    last_message: None,
                    last_internal: None,
                },
            );
            continue;
        }
        // An update of a run that has no row changes nothing (as the UPDATE would).
        let (Some(row), Some(change)) = (rows.get_mut(id), change(event)) else {
            continue;
        };
        let (status, started, ended, thoughts, tools, open, message, internal) = change;
        if let Some(status) = status {
            status.clone_into(&mut row.status);
        }
        if started {
            row.started_at = Some(at);
        }
        if ended {
            row.ended_at = Some(at);
        }
        row.thought_count += thoughts;
        row.tool_call_count += tools;
        row.open_tool_calls = if ended { 0 } else { row.open_tool_calls + open };
        if message.is_some() {
            row.last_message = message;
        }
        row.last_internal = Some(internal);
        row.updated_at = at;
        row.last_sequence = stored.sequence;
        order.push(*id);
    }
    order.sort_unstable();
    order.dedup();
    let touched: Vec<&InstanceRow> = order.iter().filter_map(|id| rows.get(id)).collect();
    macro_rules! column {
        ($field:ident) => {
            writes.bind(touched.iter().map(|r| r.$field.clone()).collect::<Vec<_>>())?
        };
    }
    let values = [
        column!(instance_id),
        column!(owner_id),
        column!(agent_id),
        column!(agent_version),
        column!(thread_id),
        column!(status),
        column!(input),
        column!(created_at),
        column!(started_at),
        column!(ended_at),
        column!(updated_at),
        column!(last_sequence),
        column!(thought_count),
        column!(tool_call_count),
        column!(open_tool_calls),
        column!(last_message),
        column!(last_internal),
    ];
    let types = [
        "uuid",
        "text",
        "text",
        "int",
        "text",
        "text",
        "text",
        "timestamptz",
        "timestamptz",
        "timestamptz",
        "timestamptz",
        "bigint",
        "int",
        "int",
        "int",
        "text",
        "jsonb",
    ];
    let arrays: Vec<String> = values
        .iter()
        .zip(types)
        .map(|(value, kind)| format!("{value}::{kind}[]"))
        .collect();
    writes.clause(format!(
        "INSERT INTO rm_instances (instance_id, owner_id, agent_id, agent_version, thread_id,
                                   status, input, created_at, started_at, ended_at, updated_at,
                                   last_sequence, thought_count, tool_call_count,
                                   open_tool_calls, last_message, last_internal)
         SELECT * FROM unnest({})
         ON CONFLICT (instance_id) DO UPDATE SET
             status = EXCLUDED.status, started_at = EXCLUDED.started_at,
             ended_at = EXCLUDED.ended_at, updated_at = EXCLUDED.updated_at,
             last_sequence = EXCLUDED.last_sequence, thought_count = EXCLUDED.thought_count,
             tool_call_count = EXCLUDED.tool_call_count,
             open_tool_calls = EXCLUDED.open_tool_calls, last_message = EXCLUDED.last_message,
             last_internal = EXCLUDED.last_internal",
        arrays.join(", ")
    ));
    Ok(())
}

/// Counter deltas of one agent, in `rm_agent_stats` column order.
#[derive(Default, Clone, Copy)]
struct AgentDelta {
    runs_total: i64,
    by_status: [i64; 5],
    tool_calls: i64,
    finished_runs: i64,
    total_duration_ms: i64,
}

const STATUSES: [&str; 5] = ["pending", "running", "completed", "failed", "cancelled"];

fn status_index(status: &str) -> Result<usize, sqlx::Error> {
    STATUSES
        .iter()
        .position(|s| *s == status)
        .ok_or_else(|| sqlx::Error::Protocol(format!("unknown run status {status}")))
}

fn agent_stats(
    batch: &[Event<'_>],
    runs: &mut HashMap<Uuid, (String, String, DateTime<Utc>)>,
    writes: &mut Writes,
) -> Result<(), sqlx::Error> {
    let mut touched = Vec::new();
    let mut agents: HashMap<String, AgentDelta> = HashMap::new();
    for (stored, id, event) in batch {
        let at = stored.recorded_at;
        if let InstanceEvent::InstanceCreated { agent_id, .. } = event {
            if runs.contains_key(id) {
                return Err(duplicate("rm_agent_stats_runs", *id));
            }
            runs.insert(*id, (agent_id.clone(), "pending".to_owned(), at));
            touched.push(*id);
            let delta = agents.entry(agent_id.clone()).or_default();
            delta.runs_total += 1;
            delta.by_status[0] += 1;
            continue;
        }
        let (agent_id, previous, created_at) = runs.get_mut(id).ok_or(sqlx::Error::RowNotFound)?;
        let next = match event {
            InstanceEvent::InstanceStarted { .. } => "running",
            InstanceEvent::InstanceCompleted { .. } => "completed",
            InstanceEvent::InstanceFailed { .. } => "failed",
            InstanceEvent::InstanceCancelled { .. } => "cancelled",
            InstanceEvent::ToolCallStarted { .. } => {
                agents.entry(agent_id.clone()).or_default().tool_calls += 1;
                continue;
            }
            _ => continue,
        };
        let finished = next != "running";
        let (from, to) = (status_index(previous)?, status_index(next)?);
        let delta = agents.entry(agent_id.clone()).or_default();
        delta.by_status[from] -= 1;
        delta.by_status[to] += 1;
        if finished {
            delta.finished_runs += 1;
            delta.total_duration_ms += (at - *created_at).num_milliseconds().max(0);
        }
        next.clone_into(previous);
        touched.push(*id);
    }
    touched.sort_unstable();
    touched.dedup();
    let mut ids = Vec::with_capacity(touched.len());
    let (mut run_agents, mut statuses, mut created) = (Vec::new(), Vec::new(), Vec::new());
    for id in &touched {
        if let Some((agent, status, at)) = runs.get(id) {
            ids.push(*id);
            run_agents.push(agent.clone());
            statuses.push(status.clone());
            created.push(*at);
        }
    }
    let (i, a, s, c) = (
        writes.bind(ids)?,
        writes.bind(run_agents)?,
        writes.bind(statuses)?,
        writes.bind(created)?,
    );
    writes.clause(format!(
        "INSERT INTO rm_agent_stats_runs (instance_id, agent_id, status, created_at)
         SELECT * FROM unnest({i}::uuid[], {a}::text[], {s}::text[], {c}::timestamptz[])
         ON CONFLICT (instance_id) DO UPDATE SET status = EXCLUDED.status"
    ));
    let mut names: Vec<String> = agents.keys().cloned().collect();
    names.sort_unstable();
    let column = |f: &dyn Fn(&AgentDelta) -> i64| -> Vec<i64> {
        names.iter().map(|n| agents.get(n).map_or(0, f)).collect()
    };
    let counts = [
        column(&|d| d.runs_total),
        column(&|d| d.by_status[0]),
        column(&|d| d.by_status[1]),
        column(&|d| d.by_status[2]),
        column(&|d| d.by_status[3]),
        column(&|d| d.by_status[4]),
        column(&|d| d.tool_calls),
        column(&|d| d.finished_runs),
        column(&|d| d.total_duration_ms),
    ];
    let names = writes.bind(names)?;
    let counts: Vec<String> = counts
        .into_iter()
        .map(|c| Ok(format!("{}::bigint[]", writes.bind(c)?)))
        .collect::<Result<_, sqlx::Error>>()?;
    writes.clause(format!(
        "INSERT INTO rm_agent_stats (agent_id, runs_total, pending, running, completed, failed,
                                     cancelled, tool_calls, finished_runs, total_duration_ms)
         SELECT * FROM unnest({names}::text[], {})
         ON CONFLICT (agent_id) DO UPDATE SET
             runs_total = rm_agent_stats.runs_total + EXCLUDED.runs_total,
             pending = rm_agent_stats.pending + EXCLUDED.pending,
             running = rm_agent_stats.running + EXCLUDED.running,
             completed = rm_agent_stats.completed + EXCLUDED.completed,
             failed = rm_agent_stats.failed + EXCLUDED.failed,
             cancelled = rm_agent_stats.cancelled + EXCLUDED.cancelled,
             tool_calls = rm_agent_stats.tool_calls + EXCLUDED.tool_calls,
             finished_runs = rm_agent_stats.finished_runs + EXCLUDED.finished_runs,
             total_duration_ms = rm_agent_stats.total_duration_ms + EXCLUDED.total_duration_ms",
        counts.join(", ")
    ));
    Ok(())
}

/// Counter deltas of one user.
struct UserDelta {
    counts: [i64; 6],
    first_seen: DateTime<Utc>,
    last_seen: DateTime<Utc>,
}

fn usage(
    batch: &[Event<'_>],
    owners: &mut HashMap<Uuid, String>,
    writes: &mut Writes,
) -> Result<(), sqlx::Error> {
    let (mut new_runs, mut new_owners) = (Vec::new(), Vec::new());
    let mut users: HashMap<String, UserDelta> = HashMap::new();
    for (stored, id, event) in batch {
        let at = stored.recorded_at;
        // instances, completed, failed, cancelled, thoughts, tool calls
        let counts: [i64; 6] = match event {
            InstanceEvent::InstanceCreated { owner_id, .. } => {
                if owners.contains_key(id) {
                    return Err(duplicate("rm_usage_owners", *id));
                }
                owners.insert(*id, owner_id.clone());
                new_runs.push(*id);
                new_owners.push(owner_id.clone());
                [1, 0, 0, 0, 0, 0]
            }
            InstanceEvent::ThoughtRecorded { .. } => [0, 0, 0, 0, 1, 0],
            InstanceEvent::ToolCallStarted { .. } => [0, 0, 0, 0, 0, 1],
            InstanceEvent::InstanceCompleted { .. } => [0, 1, 0, 0, 0, 0],
            InstanceEvent::InstanceFailed { .. } => [0, 0, 1, 0, 0, 0],
            InstanceEvent::InstanceCancelled { .. } => [0, 0, 0, 1, 0, 0],
            _ => [0; 6],
        };
        // An event of a run without an owner row changes nothing (as the UPDATE would).
        let Some(user) = owners.get(id) else { continue };
        // A run's creation is its earliest event, so the minimum over all events is the
        // minimum over creations; batches arrive in commit order, not in `recorded_at` order.
        let delta = users.entry(user.clone()).or_insert(UserDelta {
            counts: [0; 6],
            first_seen: at,
            last_seen: at,
        });
        for (total, n) in delta.counts.iter_mut().zip(counts) {
            *total += n;
        }
        delta.first_seen = delta.first_seen.min(at);
        delta.last_seen = delta.last_seen.max(at);
    }
    let (runs, owners) = (writes.bind(new_runs)?, writes.bind(new_owners)?);
    writes.clause(format!(
        "INSERT INTO rm_usage_owners (instance_id, user_id)
         SELECT * FROM unnest({runs}::uuid[], {owners}::text[])"
    ));
    let mut names: Vec<String> = users.keys().cloned().collect();
    names.sort_unstable();
    let count = |i: usize| -> Vec<i64> {
        names
            .iter()
            .map(|n| users.get(n).map_or(0, |d| d.counts[i]))
            .collect()
    };
    let seen = |first: bool| -> Vec<Option<DateTime<Utc>>> {
        names
            .iter()
            .map(|n| {
                users
                    .get(n)
                    .map(|d| if first { d.first_seen } else { d.last_seen })
            })
            .collect()
    };
    let counts: Vec<String> = (0..6)
        .map(|i| Ok(format!("{}::bigint[]", writes.bind(count(i))?)))
        .collect::<Result<_, sqlx::Error>>()?;
    let (first, last) = (writes.bind(seen(true))?, writes.bind(seen(false))?);
    let names = writes.bind(names)?;
    writes.clause(format!(
        "INSERT INTO rm_usage (user_id, instances, completed, failed, cancelled, thoughts,
                               tool_calls, first_seen_at, last_seen_at)
         SELECT * FROM unnest({names}::text[], {}, {first}::timestamptz[],
                              {last}::timestamptz[])
         ON CONFLICT (user_id) DO UPDATE SET
             instances = rm_usage.instances + EXCLUDED.instances,
             completed = rm_usage.completed + EXCLUDED.completed,
             failed = rm_usage.failed + EXCLUDED.failed,
             cancelled = rm_usage.cancelled + EXCLUDED.cancelled,
             thoughts = rm_usage.thoughts + EXCLUDED.thoughts,
             tool_calls = rm_usage.tool_calls + EXCLUDED.tool_calls,
             first_seen_at = LEAST(rm_usage.first_seen_at, EXCLUDED.first_seen_at),
             last_seen_at = GREATEST(rm_usage.last_seen_at, EXCLUDED.last_seen_at)",
        counts.join(", ")
    ));
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use apex_domain::instance::{ToolDisplay, ToolResultInternal};

    use super::*;

    /// The per-event rule (`read_models::instances`) keeps a tool completion's whole internal
    /// part, `duration_ms` included (added in version 2); the fold once kept only `result`,
    /// which a chaos run found in runs whose last event was a tool completion.
    #[test]
    fn a_tool_completion_keeps_its_whole_internal_part_as_the_runs_last_internal() {
        let completed = |duration_ms| InstanceEvent::ToolCallCompleted {
            call_id: "c1".into(),
            tool: "sql".into(),
            is_error: false,
            display: ToolDisplay::default(),
            internal: ToolResultInternal {
                result: json!({"rows": 3}),
                duration_ms,
            },
        };

        let (.., measured) = change(&completed(Some(40))).unwrap();
        let (.., unmeasured) = change(&completed(None)).unwrap();

        assert_eq!(measured, json!({"result": {"rows": 3}, "duration_ms": 40}));
        assert_eq!(
            unmeasured,
            json!({"result": {"rows": 3}, "duration_ms": null})
        );
    }
}
