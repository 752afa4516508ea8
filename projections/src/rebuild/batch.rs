//! Set-based application of one batch of instance events to a read model: the live projectors'
//! fast path and the rebuild's replay into a private copy.
//!
//! The per-event path spends five to seven statements per event (offset bookkeeping around the
//! read-model write). When a batch continues every stream it touches exactly (the common case:
//! no duplicate, no gap), it is folded in memory with the same rules as
//! `read_models::*::apply` and written with one `unnest` statement per table, plus one for the
//! offsets. The fold reads what it needs of earlier batches (the rows of the batch's runs)
//! first, so the result is the one the per-event path produces; `consistency::replayed` is the
//! reference the tests compare with.
//!
//! Concurrency: several projector replicas may consume one queue. The batch first locks the
//! offset rows of its streams (created if missing, locked in `aggregate_id` order), so two
//! batches touching one stream serialize and the second sees the first's offsets; rows shared
//! across streams (per agent, per user) are written in key order, so replicas never deadlock.

use std::collections::HashMap;

use apex_domain::instance::InstanceEvent;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::envelope::{DomainEvent, StoredEvent};
use crate::read_models::{ReadModel, timeline_entry};

type Event<'a> = (&'a StoredEvent, Uuid, &'a InstanceEvent);

/// Applies `events` (all of the model's aggregate type, in store order) set-based. Returns
/// `false`, having written nothing, when the batch is not a clean continuation of every stream
/// it touches: the caller then takes the per-event path.
pub(crate) async fn apply<'a>(
    conn: &mut PgConnection,
    model: ReadModel,
    events: impl IntoIterator<Item = (&'a StoredEvent, &'a DomainEvent)>,
) -> Result<bool, sqlx::Error> {
    let mut batch = Vec::new();
    for (stored, event) in events {
        let (DomainEvent::Instance(event), Ok(id)) = (event, Uuid::parse_str(&stored.aggregate_id))
        else {
            return Ok(false);
        };
        batch.push((stored, id, event));
    }
    if batch.is_empty() {
        return Ok(true);
    }
    let Some(last) = continuation(conn, model, &batch).await? else {
        return Ok(false);
    };
    match model {
        ReadModel::Timeline => timeline(conn, &batch).await?,
        ReadModel::Instances => instances(conn, &batch).await?,
        ReadModel::AgentStats => agent_stats(conn, &batch).await?,
        ReadModel::Usage => usage(conn, &batch).await?,
        ReadModel::Agents => return Ok(false),
    }
    bookkeeping(conn, model, &batch, last).await?;
    Ok(true)
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
    let mut batch = Vec::new();
    for (stored, event) in events {
        let (DomainEvent::Instance(event), Ok(id)) = (event, Uuid::parse_str(&stored.aggregate_id))
        else {
            return Ok(false);
        };
        batch.push((stored, id, event));
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
    match model {
        ReadModel::Timeline => timeline(conn, &batch).await?,
        ReadModel::Instances => instances(conn, &batch).await?,
        ReadModel::AgentStats => agent_stats(conn, &batch).await?,
        ReadModel::Usage => usage(conn, &batch).await?,
        ReadModel::Agents => return Ok(false),
    }
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

/// The last sequence of each stream after the batch, or `None` when some event of the batch
/// is not exactly the next one of its stream.
async fn continuation(
    conn: &mut PgConnection,
    model: ReadModel,
    batch: &[Event<'_>],
) -> Result<Option<HashMap<String, i64>>, sqlx::Error> {
    let mut ids: Vec<&str> = batch
        .iter()
        .map(|(s, _, _)| s.aggregate_id.as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    // Streams seen before (the common case) are locked with one statement; only streams new
    // to the read model take an insert and a second lookup.
    let mut known = lock_offsets(conn, model, &ids).await?;
    if known.len() < ids.len() {
        let seen: std::collections::HashSet<&str> =
            known.iter().map(|(id, _)| id.as_str()).collect();
        let new: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| !seen.contains(id))
            .collect();
        sqlx::query(
            "INSERT INTO projector_offsets (projector, aggregate_type, aggregate_id, last_sequence)
             SELECT $1, 'instance', id, 0 FROM unnest($2::text[]) AS t(id)
             ON CONFLICT DO NOTHING",
        )
        .bind(model.name())
        .bind(&new)
        .execute(&mut *conn)
        .await?;
        known.extend(lock_offsets(conn, model, &new).await?);
    }
    let mut last: HashMap<String, i64> = known.into_iter().collect();
    for (stored, _, _) in batch {
        let seq = last.entry(stored.aggregate_id.clone()).or_insert(0);
        if stored.sequence != *seq + 1 {
            return Ok(None);
        }
        *seq = stored.sequence;
    }
    Ok(Some(last))
}

/// The offset rows of `ids` (sorted), locked in that order; streams without a row are absent.
async fn lock_offsets(
    conn: &mut PgConnection,
    model: ReadModel,
    ids: &[&str],
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        // One primary-key lookup per stream, locked in `ids` order. (`aggregate_id = ANY($2)`
        // let the planner keep a plan that filtered every offset row of the projector against
        // the array, so each batch cost more as the table grew.)
        "SELECT o.aggregate_id, o.last_sequence
           FROM unnest($2::text[]) WITH ORDINALITY AS k(id, n)
           CROSS JOIN LATERAL (
                SELECT aggregate_id, last_sequence FROM projector_offsets
                 WHERE projector = $1 AND aggregate_type = 'instance' AND aggregate_id = k.id
                   FOR UPDATE
           ) o
          ORDER BY k.n",
    )
    .bind(model.name())
    .bind(ids)
    .fetch_all(&mut *conn)
    .await
}

/// Offsets and status, once per batch (what `apply_one` does per event), in one statement.
async fn bookkeeping(
    conn: &mut PgConnection,
    model: ReadModel,
    batch: &[Event<'_>],
    last: HashMap<String, i64>,
) -> Result<(), sqlx::Error> {
    let (ids, seqs): (Vec<String>, Vec<i64>) = last.into_iter().unzip();
    let position = batch.iter().map(|(s, _, _)| s.position).max();
    let recorded = batch.iter().map(|(s, _, _)| s.recorded_at).max();
    sqlx::query(
        "WITH offsets AS (
             INSERT INTO projector_offsets (projector, aggregate_type, aggregate_id, last_sequence)
             SELECT $1, 'instance', id, seq FROM unnest($2::text[], $3::bigint[]) AS t(id, seq)
             ON CONFLICT (projector, aggregate_type, aggregate_id)
             DO UPDATE SET last_sequence = EXCLUDED.last_sequence
         )
         UPDATE projector_status
            SET last_position = GREATEST(last_position, $4),
                last_recorded_at = GREATEST(last_recorded_at, $5),
                last_applied_at = now(),
                processed_total = processed_total + $6
          WHERE projector = $1",
    )
    .bind(model.name())
    .bind(&ids)
    .bind(&seqs)
    .bind(position)
    .bind(recorded)
    .bind(batch.len() as i64)
    .execute(&mut *conn)
    .await?;
    Ok(())
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

async fn timeline(conn: &mut PgConnection, batch: &[Event<'_>]) -> Result<(), sqlx::Error> {
    let mut owners = HashMap::new();
    let missing = earlier_runs(batch);
    if !missing.is_empty() {
        let known: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT r.instance_id, r.owner_id FROM unnest($1::uuid[]) AS k(id)
               CROSS JOIN LATERAL (
                    SELECT instance_id, owner_id FROM rm_timeline
                     WHERE instance_id = k.id AND sequence = 1
               ) r",
        )
        .bind(missing)
        .fetch_all(&mut *conn)
        .await?;
        owners.extend(known);
    }
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
    sqlx::query(
        "INSERT INTO rm_timeline (instance_id, sequence, owner_id, kind, at, display, traceparent)
         SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[],
                              $5::timestamptz[], $6::jsonb[], $7::text[])",
    )
    .bind(&ids)
    .bind(&seqs)
    .bind(&owner_ids)
    .bind(&kinds)
    .bind(&ats)
    .bind(&displays)
    .bind(&traces)
    .execute(conn)
    .await?;
    Ok(())
}

/// One `rm_instances` row.
#[derive(sqlx::FromRow)]
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

async fn instances(conn: &mut PgConnection, batch: &[Event<'_>]) -> Result<(), sqlx::Error> {
    let known: Vec<InstanceRow> = sqlx::query_as(
        "SELECT instance_id, owner_id, agent_id, agent_version, thread_id, status, input,
                created_at, started_at, ended_at, updated_at, last_sequence, thought_count,
                tool_call_count, open_tool_calls, last_message, last_internal
           FROM unnest($1::uuid[]) AS k(id)
           CROSS JOIN LATERAL (SELECT * FROM rm_instances WHERE instance_id = k.id) r",
    )
    .bind(earlier_runs(batch))
    .fetch_all(&mut *conn)
    .await?;
    let mut rows: HashMap<Uuid, InstanceRow> =
        known.into_iter().map(|r| (r.instance_id, r)).collect();
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
            touched.iter().map(|r| r.$field.clone()).collect::<Vec<_>>()
        };
    }
    sqlx::query(
        "INSERT INTO rm_instances (instance_id, owner_id, agent_id, agent_version, thread_id,
                                   status, input, created_at, started_at, ended_at, updated_at,
                                   last_sequence, thought_count, tool_call_count,
                                   open_tool_calls, last_message, last_internal)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::text[],
                              $6::text[], $7::text[], $8::timestamptz[], $9::timestamptz[],
                              $10::timestamptz[], $11::timestamptz[], $12::bigint[], $13::int[],
                              $14::int[], $15::int[], $16::text[], $17::jsonb[])
         ON CONFLICT (instance_id) DO UPDATE SET
             status = EXCLUDED.status, started_at = EXCLUDED.started_at,
             ended_at = EXCLUDED.ended_at, updated_at = EXCLUDED.updated_at,
             last_sequence = EXCLUDED.last_sequence, thought_count = EXCLUDED.thought_count,
             tool_call_count = EXCLUDED.tool_call_count,
             open_tool_calls = EXCLUDED.open_tool_calls, last_message = EXCLUDED.last_message,
             last_internal = EXCLUDED.last_internal",
    )
    .bind(column!(instance_id))
    .bind(column!(owner_id))
    .bind(column!(agent_id))
    .bind(column!(agent_version))
    .bind(column!(thread_id))
    .bind(column!(status))
    .bind(column!(input))
    .bind(column!(created_at))
    .bind(column!(started_at))
    .bind(column!(ended_at))
    .bind(column!(updated_at))
    .bind(column!(last_sequence))
    .bind(column!(thought_count))
    .bind(column!(tool_call_count))
    .bind(column!(open_tool_calls))
    .bind(column!(last_message))
    .bind(column!(last_internal))
    .execute(conn)
    .await?;
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

async fn agent_stats(conn: &mut PgConnection, batch: &[Event<'_>]) -> Result<(), sqlx::Error> {
    let known: Vec<(Uuid, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT r.instance_id, r.agent_id, r.status, r.created_at FROM unnest($1::uuid[]) AS k(id)
           CROSS JOIN LATERAL (
                SELECT * FROM rm_agent_stats_runs WHERE instance_id = k.id
           ) r",
    )
    .bind(earlier_runs(batch))
    .fetch_all(&mut *conn)
    .await?;
    let mut runs: HashMap<Uuid, (String, String, DateTime<Utc>)> = known
        .into_iter()
        .map(|(id, agent, status, at)| (id, (agent, status, at)))
        .collect();
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
    sqlx::query(
        "INSERT INTO rm_agent_stats_runs (instance_id, agent_id, status, created_at)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[])
         ON CONFLICT (instance_id) DO UPDATE SET status = EXCLUDED.status",
    )
    .bind(&ids)
    .bind(&run_agents)
    .bind(&statuses)
    .bind(&created)
    .execute(&mut *conn)
    .await?;
    let mut names: Vec<String> = agents.keys().cloned().collect();
    names.sort_unstable();
    let column = |f: &dyn Fn(&AgentDelta) -> i64| -> Vec<i64> {
        names.iter().map(|n| agents.get(n).map_or(0, f)).collect()
    };
    sqlx::query(
        "INSERT INTO rm_agent_stats (agent_id, runs_total, pending, running, completed, failed,
                                     cancelled, tool_calls, finished_runs, total_duration_ms)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[],
                              $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[],
                              $9::bigint[], $10::bigint[])
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
    )
    .bind(&names)
    .bind(column(&|d| d.runs_total))
    .bind(column(&|d| d.by_status[0]))
    .bind(column(&|d| d.by_status[1]))
    .bind(column(&|d| d.by_status[2]))
    .bind(column(&|d| d.by_status[3]))
    .bind(column(&|d| d.by_status[4]))
    .bind(column(&|d| d.tool_calls))
    .bind(column(&|d| d.finished_runs))
    .bind(column(&|d| d.total_duration_ms))
    .execute(conn)
    .await?;
    Ok(())
}

/// Counter deltas of one user.
struct UserDelta {
    counts: [i64; 6],
    first_seen: DateTime<Utc>,
    last_seen: DateTime<Utc>,
}

async fn usage(conn: &mut PgConnection, batch: &[Event<'_>]) -> Result<(), sqlx::Error> {
    let known: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT r.instance_id, r.user_id FROM unnest($1::uuid[]) AS k(id)
           CROSS JOIN LATERAL (SELECT * FROM rm_usage_owners WHERE instance_id = k.id) r",
    )
    .bind(earlier_runs(batch))
    .fetch_all(&mut *conn)
    .await?;
    let mut owners: HashMap<Uuid, String> = known.into_iter().collect();
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
    sqlx::query(
        "INSERT INTO rm_usage_owners (instance_id, user_id)
         SELECT * FROM unnest($1::uuid[], $2::text[])",
    )
    .bind(&new_runs)
    .bind(&new_owners)
    .execute(&mut *conn)
    .await?;
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
    sqlx::query(
        "INSERT INTO rm_usage (user_id, instances, completed, failed, cancelled, thoughts,
                               tool_calls, first_seen_at, last_seen_at)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[],
                              $5::bigint[], $6::bigint[], $7::bigint[], $8::timestamptz[],
                              $9::timestamptz[])
         ON CONFLICT (user_id) DO UPDATE SET
             instances = rm_usage.instances + EXCLUDED.instances,
             completed = rm_usage.completed + EXCLUDED.completed,
             failed = rm_usage.failed + EXCLUDED.failed,
             cancelled = rm_usage.cancelled + EXCLUDED.cancelled,
             thoughts = rm_usage.thoughts + EXCLUDED.thoughts,
             tool_calls = rm_usage.tool_calls + EXCLUDED.tool_calls,
             first_seen_at = LEAST(rm_usage.first_seen_at, EXCLUDED.first_seen_at),
             last_seen_at = GREATEST(rm_usage.last_seen_at, EXCLUDED.last_seen_at)",
    )
    .bind(&names)
    .bind(count(0))
    .bind(count(1))
    .bind(count(2))
    .bind(count(3))
    .bind(count(4))
    .bind(count(5))
    .bind(seen(true))
    .bind(seen(false))
    .execute(conn)
    .await?;
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
