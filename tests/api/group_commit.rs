//! Group commit: the appends of concurrent commands share transactions, and one command's
//! failure inside a shared batch never fails the others.

use std::collections::BTreeSet;
use std::sync::Arc;

use apex_commands::{CommandService, RetryPolicy};
use apex_domain::Tier;
use apex_domain::instance::InstanceAction;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::concurrency::all_at_once;
use crate::helpers::{TestApp, assert_contiguous, runner_context, spawn_app};
use crate::metrics_text::scrape;

const RUNS: usize = 24;

/// An app with `RUNS` running instances of `triage`.
async fn runs() -> (Arc<TestApp>, Vec<String>) {
    let app = spawn_app().await;
    app.active_agent("triage", &["search"], &["free"]).await;
    let user = app.user("user-1", Tier::Free);
    let mut ids = Vec::new();
    for _ in 0..RUNS {
        ids.push(app.running_instance(&user, "triage").await);
    }
    (Arc::new(app), ids)
}

/// Sends one thought to each run at once; returns `(status, body)` per run, in `ids` order.
async fn think_all(
    app: &Arc<TestApp>,
    ids: &[String],
    thought: impl Fn(usize) -> String,
) -> Vec<(StatusCode, Value)> {
    let requests = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            (
                format!("/v1/runner/instances/{id}/thoughts"),
                json!({"thought": thought(n)}),
            )
        })
        .collect();
    all_at_once(app, requests).await
}

/// The transactions that stored sequence `sequence` of the given runs.
async fn transactions(app: &TestApp, ids: &[String], sequence: i64) -> BTreeSet<String> {
    sqlx::query_scalar(
        "SELECT transaction_id::text FROM events
          WHERE aggregate_id = ANY($1) AND sequence = $2",
    )
    .bind(ids)
    .bind(sequence)
    .fetch_all(&app.pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// The counter `name` on `/metrics` (0 before it first counts; every service of the process
/// counts there).
async fn counter(app: &TestApp, name: &str) -> f64 {
    scrape(&app.client, &app.url("/metrics"))
        .await
        .get(name)
        .copied()
        .unwrap_or(0.0)
}

/// Appends handed to the writer so far.
async fn appends_requested(app: &TestApp) -> f64 {
    counter(app, "apex_append_requests_total").await
}

/// The app's append writer waiting for a lock in its statement (see [`think_held`]): 0 or 1.
async fn writer_waiting(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event_type = 'Lock'
            AND query LIKE 'WITH appended AS%'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// Runs `think_all` while appends are held back: a transaction locks `events` against inserts,
/// so the writer blocks on its first batch and every other command queues behind it. The hold
/// ends once every command has been handed to the writer, and the queued ones go as one batch.
async fn think_all_held(
    app: &Arc<TestApp>,
    ids: &[String],
    thought: impl Fn(usize) -> String,
) -> Vec<(StatusCode, Value)> {
    think_held(app, &[], ids, thought).await.1
}

/// [`think_all_held`], after the run of `occupying` has had a thought taken by the writer (the
/// writer blocked on it): every command of `ids` queues and they go as one batch. Returns the
/// answers of `occupying`, then those of `ids`.
async fn think_held(
    app: &Arc<TestApp>,
    occupying: &[String],
    ids: &[String],
    thought: impl Fn(usize) -> String,
) -> (Vec<(StatusCode, Value)>, Vec<(StatusCode, Value)>) {
    let mut hold = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *hold)
        .await
        .unwrap();
    let mut held = Vec::new();
    for (n, id) in occupying.iter().enumerate() {
        held.push(tokio::spawn({
            let (app, id) = (app.clone(), id.clone());
            async move { think_all(&app, &[id], |_| "held".to_owned()).await }
        }));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while writer_waiting(app).await < n as i64 + 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer did not take run {id}'s thought within 5 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    let before = appends_requested(app).await;
    let answers = tokio::spawn({
        let (app, ids) = (app.clone(), ids.to_vec());
        let bodies: Vec<String> = (0..ids.len()).map(thought).collect();
        async move { think_all(&app, &ids, |n| bodies[n].clone()).await }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let requested = appends_requested(app).await;
        if requested >= before + ids.len() as f64 {
            break;
        }
        // Commands on different runs never wait for each other before their append.
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {} commands reached the writer within 5 s",
            requested - before,
            ids.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        !answers.is_finished(),
        "a command was answered while appends were held"
    );
    hold.commit().await.unwrap();
    let mut occupied = Vec::new();
    for answer in held {
        occupied.extend(answer.await.unwrap());
    }
    (occupied, answers.await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_share_commits_and_each_gets_its_own_answer() {
    let (app, ids) = runs().await;
    let answers = think_all_held(&app, &ids, |n| format!("thought {n}")).await;
    for (n, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, StatusCode::OK, "run {n}: {body}");
        assert_eq!(body["sequence"], 3, "run {n}: {body}");
    }
    // The writer's first batch, then the queued rest together.
    let shared = transactions(&app, &ids, 3).await;
    assert!(
        shared.len() <= 2,
        "{RUNS} queued commands were committed in {} transactions",
        shared.len()
    );
    for (n, id) in ids.iter().enumerate() {
        assert_contiguous(app.events_of(id).await.into_iter().map(|(s, _)| s), 3);
        let thought: String = sqlx::query_scalar(
            "SELECT payload #>> '{ThoughtRecorded,display,thought}' FROM events
              WHERE aggregate_id = $1 AND sequence = 3",
        )
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(thought, format!("thought {n}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_command_in_a_shared_batch_fails_alone() {
    let (app, ids) = runs().await;
    // Run 5's thought holds a NUL character, which PostgreSQL refuses inside the append: the
    // batch it is queued in fails, and its commands are appended again one by one.
    let bad = 5;
    let answers = think_all_held(&app, &ids, |n| {
        if n == bad {
            "nul \u{0} inside".to_owned()
        } else {
            format!("thought {n}")
        }
    })
    .await;
    for (n, (status, body)) in answers.iter().enumerate() {
        if n == bad {
            assert_eq!(*status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
            assert_eq!(body["error"]["code"], "field_invalid", "{body}");
        } else {
            assert_eq!(*status, StatusCode::OK, "run {n}: {body}");
            assert_eq!(body["sequence"], 3, "run {n}: {body}");
        }
    }
    for (n, id) in ids.iter().enumerate() {
        let expected = if n == bad { 2 } else { 3 };
        assert_contiguous(
            app.events_of(id).await.into_iter().map(|(s, _)| s),
            expected,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_holding_a_copy_made_stale_by_another_replica_loses_and_duplicates_nothing() {
    let (app, ids) = runs().await;
    // The app's service holds every run in memory; another replica appends to run 0, so the
    // app's copy of it is stale and its next append, queued in a batch with the others,
    // collides on the primary key.
    let replica = CommandService::new(app.pool.clone(), RetryPolicy::default());
    let think = |thought: &str| InstanceAction::Think {
        thought: thought.to_owned(),
        prompt: None,
        raw: None,
    };
    let outcome = replica
        .instance(&ids[0], think("from the other replica"), &runner_context())
        .await
        .unwrap();
    assert_eq!(outcome.sequence, 3);

    let answers = think_all_held(&app, &ids, |n| format!("thought {n}")).await;
    for (n, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, StatusCode::OK, "run {n}: {body}");
        let expected = if n == 0 { 4 } else { 3 };
        assert_eq!(body["sequence"], expected, "run {n}: {body}");
    }
    assert_contiguous(app.events_of(&ids[0]).await.into_iter().map(|(s, _)| s), 4);
    for id in &ids[1..] {
        assert_contiguous(app.events_of(id).await.into_iter().map(|(s, _)| s), 3);
    }
    let (instance, sequence) = app.state.commands.load_instance(&ids[0]).await.unwrap();
    assert_eq!((instance.thoughts, sequence), (2, 4));
}

#[tokio::test]
async fn one_idempotency_key_on_two_commands_of_one_batch_is_a_conflict() {
    let app = spawn_app().await;
    let metadata = |n: u8| {
        json!({
            "correlation_id": uuid::Uuid::new_v4(),
            "causation_id": uuid::Uuid::new_v4(),
            "principal": "user-1",
            "principal_role": "user",
            "idempotency_key": "same-key",
            "request_hash": format!("hash-{n}"),
        })
    };
    // What a group commit does with two creations that carry the same key: one statement,
    // one transaction, two streams.
    let insert = "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                      event_version, payload, metadata)
                  SELECT 'instance', id, seq, 'InstanceCreated', '1', '{}'::jsonb, m
                    FROM unnest($1::text[], $2::bigint[], $3::jsonb[]) AS t(id, seq, m)";
    let err = sqlx::query(insert)
        .bind(["run-a", "run-b"])
        .bind([1_i64, 1])
        .bind([metadata(1), metadata(2)])
        .execute(&app.pool)
        .await
        .expect_err("two commands may not share a key");
    let code = err.as_database_error().and_then(|e| e.code()).unwrap();
    assert_eq!(code, "23505", "{err}");
    assert_eq!(app.event_count().await, 0);
    // One command appending two events of its stream under its key is still one command.
    sqlx::query(insert)
        .bind(["run-a", "run-a"])
        .bind([1_i64, 2])
        .bind([metadata(1), metadata(1)])
        .execute(&app.pool)
        .await
        .unwrap();
    let range: (i64, i64) = sqlx::query_as(
        "SELECT first_sequence, last_sequence FROM idempotency_keys
          WHERE principal = 'user-1' AND idempotency_key = 'same-key'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(range, (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_moved_under_a_batch_fails_the_batch_whole_and_only_its_command_retries() {
    let (app, ids) = runs().await;
    let every = apex_commands::INSTANCE_SNAPSHOT_EVERY as i64;
    // Run 0 one event short of its first snapshot move (the snapshot is created at `every`,
    // moved at 2 × `every`); the app keeps it in memory with the snapshot's counter, 1.
    for n in 3..2 * every {
        let thought = InstanceAction::Think {
            thought: format!("step {n}"),
            prompt: None,
            raw: None,
        };
        let outcome = app
            .state
            .commands
            .instance(&ids[0], thought, &runner_context())
            .await
            .unwrap();
        assert_eq!(outcome.sequence, n as u64);
    }
    let snapshot = || {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT last_sequence, current_snapshot FROM snapshots
              WHERE aggregate_type = 'instance' AND aggregate_id = $1",
        )
        .bind(&ids[0])
        .fetch_one(&app.pool)
    };
    assert_eq!(snapshot().await.unwrap(), (every, 1));
    // Another writer moved the snapshot meanwhile (its counter is 2 now), so the app's move of
    // it, in a batch with the other runs' thoughts, matches no row.
    sqlx::query(
        "UPDATE snapshots SET current_snapshot = 2
          WHERE aggregate_type = 'instance' AND aggregate_id = $1",
    )
    .bind(&ids[0])
    .execute(&app.pool)
    .await
    .unwrap();
    let counters = || async {
        let metrics = scrape(&app.client, &app.url("/metrics")).await;
        let splits = metrics.get("apex_append_batch_split_total").copied();
        let retried = metrics
            .iter()
            .filter(|(series, _)| series.starts_with("apex_command_conflicts_retried_total"))
            .map(|(_, value)| value)
            .sum::<f64>();
        (splits.unwrap_or(0.0), retried)
    };
    let (splits, retried) = counters().await;

    // The writer is held in a batch of its own (the last run's thought), so the other runs'
    // thoughts, run 0's among them, queue and go as one batch.
    let (batch, occupying) = ids.split_at(RUNS - 1);
    let (held, answers) = think_held(&app, occupying, batch, |n| format!("thought {n}")).await;
    for (status, body) in &held {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(body["sequence"], 3, "{body}");
    }
    for (n, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, StatusCode::OK, "run {n}: {body}");
        let expected = if n == 0 { 2 * every } else { 3 };
        assert_eq!(body["sequence"], expected, "run {n}: {body}");
    }
    // The batch's statement failed whole (nothing of it stored: every other run's thought got
    // sequence 3 when appended again alone), and run 0's command alone ran again.
    let (splits_after, retried_after) = counters().await;
    assert_eq!(splits_after - splits, 1.0);
    assert_eq!(retried_after - retried, 1.0);
    assert_contiguous(
        app.events_of(&ids[0]).await.into_iter().map(|(s, _)| s),
        2 * every,
    );
    for id in &ids[1..] {
        assert_contiguous(app.events_of(id).await.into_iter().map(|(s, _)| s), 3);
    }
    assert_eq!(snapshot().await.unwrap(), (2 * every, 3));
    let (instance, sequence) = app.state.commands.load_instance(&ids[0]).await.unwrap();
    assert_eq!(sequence, 2 * every as u64);
    assert_eq!(instance.thoughts as i64, 2 * every - 2);
}

/// Events whose hash an append left to the trigger, which looked the predecessor up.
async fn hash_lookups(app: &TestApp) -> f64 {
    counter(app, "apex_append_hash_lookups_total").await
}

/// Stored events whose hash is not the chain the database's `event_hash` computes.
async fn unchained(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events e
           LEFT JOIN events p ON p.aggregate_type = e.aggregate_type
                             AND p.aggregate_id = e.aggregate_id AND p.sequence = e.sequence - 1
          WHERE e.hash IS DISTINCT FROM event_hash(p.hash, e)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_append_chains_each_hash_to_what_its_writer_committed_and_else_looks_it_up() {
    let (app, ids) = runs().await;
    // Every run was created and started by this app: its writer knows each stream's head.
    assert_eq!(hash_lookups(&app).await, 0.0);
    for (status, body) in think_all(&app, &ids, |n| format!("thought {n}")).await {
        assert_eq!(
            (status, body["sequence"].clone()),
            (StatusCode::OK, json!(3))
        );
    }
    assert_eq!(hash_lookups(&app).await, 0.0);

    // Another replica appends to run 0: it never committed the predecessor, so that one hash
    // is the trigger's, and the app's head of run 0 is no longer the stream's.
    let replica = CommandService::new(app.pool.clone(), RetryPolicy::default());
    let think = InstanceAction::Think {
        thought: "from the other replica".to_owned(),
        prompt: None,
        raw: None,
    };
    let outcome = replica
        .instance(&ids[0], think, &runner_context())
        .await
        .unwrap();
    assert_eq!(outcome.sequence, 4);
    assert_eq!(hash_lookups(&app).await, 1.0);

    // The app's next append to run 0 (sequence 5, after its stale copy lost once) looks the
    // replica's event up; the one after is chained from what it committed itself.
    for round in 0..2 {
        for (n, (status, body)) in think_all(&app, &ids, |n| format!("more {n}"))
            .await
            .into_iter()
            .enumerate()
        {
            let expected = if n == 0 { 5 + round } else { 4 + round };
            assert_eq!(status, StatusCode::OK, "run {n}: {body}");
            assert_eq!(body["sequence"], expected, "run {n}: {body}");
        }
        assert_eq!(hash_lookups(&app).await, 2.0, "after round {round}");
    }

    // Whoever computed it, every hash is the chain the database function and the audit compute.
    let events = app.event_count().await;
    assert!(events > RUNS as i64 * 5, "{events} events");
    assert_eq!(unchained(&app).await, 0);
    let verification = apex_projections::audit::verify(&app.pool, None, |_| {})
        .await
        .unwrap();
    assert!(verification.intact(), "{:?}", verification.breaks);
    assert_eq!(verification.events_checked as i64, events);
}
