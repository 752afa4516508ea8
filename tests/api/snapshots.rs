//! Snapshots: a long run loads from its snapshot exactly as a full replay of its events
//! (the guard against cqrs-es 0.5.0 applying a command's events twice into a snapshot).

use apex_commands::INSTANCE_SNAPSHOT_EVERY;
use apex_domain::Tier;
use apex_domain::instance::{Instance, InstanceAction, InstanceEvent, InstanceStatus};
use cqrs_es::Aggregate;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_contiguous, assert_error, runner_context, spawn_app};

/// The snapshot row of an instance: `(last_sequence, current_snapshot, payload)`.
async fn snapshot_of(app: &TestApp, id: &str) -> (i64, i64, Value) {
    sqlx::query_as(
        "SELECT last_sequence, current_snapshot, payload FROM snapshots
          WHERE aggregate_type = 'instance' AND aggregate_id = $1",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// Every event of an instance, deserialized from its stored payload, with its sequence.
async fn stored_events(app: &TestApp, id: &str) -> Vec<(i64, InstanceEvent)> {
    let rows: Vec<(i64, Value)> = sqlx::query_as(
        "SELECT sequence, payload FROM events
          WHERE aggregate_type = 'instance' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(sequence, payload)| (sequence, serde_json::from_value(payload).unwrap()))
        .collect()
}

/// Folds events into a fresh instance with `Aggregate::apply`, as a full replay does.
fn replay<'a>(events: impl IntoIterator<Item = &'a InstanceEvent>) -> Instance {
    let mut instance = Instance::default();
    for event in events {
        instance.apply(event.clone());
    }
    instance
}

async fn think(app: &TestApp, id: &str, n: usize) -> u64 {
    let action = InstanceAction::Think {
        thought: format!("thought {n}"),
        prompt: Some("internal prompt".to_owned()),
        raw: Some(json!({"n": n})),
    };
    app.state
        .commands
        .instance(id, action, &runner_context())
        .await
        .unwrap()
        .sequence
}

#[tokio::test]
async fn a_thousand_thoughts_load_from_the_snapshot_exactly_as_a_full_replay() {
    let app = spawn_app().await;
    app.active_agent("triage", &["search"], &["free"]).await;
    let id = app
        .running_instance(&app.user("user-1", Tier::Free), "triage")
        .await;
    for n in 1..=1000 {
        assert_eq!(think(&app, &id, n).await, n as u64 + 2);
    }

    let every = INSTANCE_SNAPSHOT_EVERY as i64;
    let (last_sequence, current_snapshot, payload) = snapshot_of(&app, &id).await;
    assert!(
        last_sequence > 0 && last_sequence % every == 0,
        "snapshot at {last_sequence}, not a multiple of {every}"
    );
    // 1,002 events: the last snapshot was written with event 1,000, the tenth snapshot.
    assert_eq!(last_sequence, 1000);
    assert_eq!(current_snapshot, 1000 / every);

    let events = stored_events(&app, &id).await;
    assert_contiguous(events.iter().map(|(s, _)| *s), 1002);

    // The snapshot equals a replay of exactly the events it covers: none counted twice.
    let snapshot: Instance = serde_json::from_value(payload).unwrap();
    let covered = replay(
        events
            .iter()
            .filter(|(s, _)| *s <= last_sequence)
            .map(|(_, e)| e),
    );
    assert_eq!(snapshot, covered);
    assert_eq!(snapshot.thoughts, 998);

    // Loading through the snapshot store equals replaying every row of `events`.
    let replayed = replay(events.iter().map(|(_, e)| e));
    let (loaded, sequence) = app.state.commands.load_instance(&id).await.unwrap();
    assert_eq!(sequence, 1002);
    assert_eq!(loaded, replayed);
    assert_eq!(loaded.thoughts, 1000);
    assert_eq!(loaded.status, InstanceStatus::Running);
    assert_eq!(loaded.owner_id, "user-1");
}

#[tokio::test]
async fn a_run_loaded_from_a_snapshot_keeps_its_tool_calls() {
    let app = spawn_app().await;
    app.active_agent("triage", &["search"], &["free"]).await;
    let id = app
        .running_instance(&app.user("user-1", Tier::Free), "triage")
        .await;
    let runner = app.runner();
    let tools = format!("/v1/runner/instances/{id}/tools");
    for call in ["call-open", "call-done"] {
        let r = app
            .post(&tools, &runner, json!({"call_id": call, "tool": "search"}))
            .await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = app
        .post(&format!("{tools}/call-done/complete"), &runner, json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    // Cross the first snapshot (sequence 100) with the calls in the state it captures.
    for n in 1..=100 {
        think(&app, &id, n).await;
    }
    let (last_sequence, _, payload) = snapshot_of(&app, &id).await;
    assert_eq!(last_sequence, 100);
    assert_eq!(payload["open_calls"], json!({"call-open": "search"}));
    assert_eq!(payload["completed_calls"], json!(["call-done"]));

    // The rules still see both calls after loading from the snapshot.
    let before = app.event_count().await;
    let r = app
        .post(
            &tools,
            &runner,
            json!({"call_id": "call-done", "tool": "search"}),
        )
        .await;
    assert_error(r, StatusCode::CONFLICT, "duplicate_call_id").await;
    let complete = format!("/v1/runner/instances/{id}/complete");
    let r = app
        .post(&complete, &runner, json!({"output": "done"}))
        .await;
    assert_error(r, StatusCode::CONFLICT, "open_tool_calls").await;
    assert_eq!(app.event_count().await, before);

    let r = app
        .post(&format!("{tools}/call-open/complete"), &runner, json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .post(&complete, &runner, json!({"output": "done"}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["sequence"], 107);
    let (loaded, _) = app.state.commands.load_instance(&id).await.unwrap();
    let events = stored_events(&app, &id).await;
    assert_eq!(loaded, replay(events.iter().map(|(_, e)| e)));
    assert_eq!(loaded.status, InstanceStatus::Completed);
}
