//! Concurrent commands on one run: all accepted, no lost or duplicated step, no sequence gap.

use std::collections::BTreeSet;
use std::sync::Arc;

use apex_commands::{CommandService, RetryPolicy};
use apex_domain::Tier;
use apex_domain::instance::{InstanceAction, InstanceStatus};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_contiguous, runner_context, spawn_app};

/// An app with a running instance of `triage` (tool `search`); returns the app and the id.
async fn running() -> (Arc<TestApp>, String) {
    let app = spawn_app().await;
    app.active_agent("triage", &["search"], &["free"]).await;
    let id = app
        .running_instance(&app.user("user-1", Tier::Free), "triage")
        .await;
    (Arc::new(app), id)
}

/// POSTs every `(path, body)` at once as `runner-1`; returns `(status, body)` of each.
pub(crate) async fn all_at_once(
    app: &Arc<TestApp>,
    requests: Vec<(String, Value)>,
) -> Vec<(StatusCode, Value)> {
    let runner = app.runner();
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|(path, body)| {
            let (app, runner) = (app.clone(), runner.clone());
            tokio::spawn(async move {
                let r = app.post(&path, &runner, body).await;
                (r.status(), r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

/// The sequences the answers report, which must be distinct.
fn reported_sequences(answers: &[(StatusCode, Value)]) -> BTreeSet<u64> {
    let sequences: BTreeSet<u64> = answers
        .iter()
        .map(|(_, body)| body["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(
        sequences.len(),
        answers.len(),
        "two commands reported the same sequence"
    );
    sequences
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_thoughts_on_one_run_all_succeed_without_gaps() {
    let (app, id) = running().await;
    let requests = (0..50)
        .map(|n| {
            (
                format!("/v1/runner/instances/{id}/thoughts"),
                json!({"thought": format!("thought {n}")}),
            )
        })
        .collect();
    let answers = all_at_once(&app, requests).await;
    for (status, body) in &answers {
        assert!(status.is_success(), "{status}: {body}");
    }
    assert_eq!(reported_sequences(&answers), (3..=52).collect());

    let events = app.events_of(&id).await;
    assert_eq!(events.len(), 52);
    assert_contiguous(events.iter().map(|(s, _)| *s), 52);
    assert_eq!(events[0].1, "InstanceCreated");
    assert_eq!(events[1].1, "InstanceStarted");
    assert!(events[2..].iter().all(|(_, t)| t == "ThoughtRecorded"));
    // Every thought is stored once.
    let thoughts: BTreeSet<String> = app
        .event_rows(&id)
        .await
        .iter()
        .skip(2)
        .map(|row| {
            row.payload["ThoughtRecorded"]["display"]["thought"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(thoughts.len(), 50);
    let (instance, sequence) = app.state.commands.load_instance(&id).await.unwrap();
    assert_eq!((instance.thoughts, sequence), (50, 52));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_tool_calls_with_distinct_ids_all_succeed() {
    let (app, id) = running().await;
    let requests = (0..20)
        .map(|n| {
            (
                format!("/v1/runner/instances/{id}/tools"),
                json!({"call_id": format!("call-{n}"), "tool": "search", "arguments": {"n": n}}),
            )
        })
        .collect();
    let answers = all_at_once(&app, requests).await;
    for (status, body) in &answers {
        assert!(status.is_success(), "{status}: {body}");
    }
    assert_eq!(reported_sequences(&answers), (3..=22).collect());
    let events = app.events_of(&id).await;
    assert_contiguous(events.iter().map(|(s, _)| *s), 22);
    assert!(events[2..].iter().all(|(_, t)| t == "ToolCallStarted"));
    let (instance, _) = app.state.commands.load_instance(&id).await.unwrap();
    let open: BTreeSet<&str> = instance.open_calls.keys().map(String::as_str).collect();
    let expected: Vec<String> = (0..20).map(|n| format!("call-{n}")).collect();
    assert_eq!(open, expected.iter().map(String::as_str).collect());
}

/// Runs `per_service` thoughts through each of two command services over one database at once.
async fn race_two_services(app: &TestApp, id: &str, per_service: usize) {
    // A second service over the same pool has its own in-process locks: another replica.
    let services = [
        app.state.commands.clone(),
        Arc::new(CommandService::new(
            app.pool.clone(),
            RetryPolicy::default(),
        )),
    ];
    let mut tasks = vec![];
    for (replica, service) in services.iter().enumerate() {
        for n in 0..per_service {
            let (service, id) = (service.clone(), id.to_owned());
            tasks.push(tokio::spawn(async move {
                let action = InstanceAction::Think {
                    thought: format!("replica {replica} thought {n}"),
                    prompt: None,
                    raw: None,
                };
                service.instance(&id, action, &runner_context()).await
            }));
        }
    }
    for result in futures::future::join_all(tasks).await {
        let outcome = result
            .unwrap()
            .expect("every command succeeds despite the race");
        assert_eq!(outcome.appended, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_racing_on_one_run_lose_and_duplicate_nothing() {
    let (app, id) = running().await;
    race_two_services(&app, &id, 25).await;
    let events = app.events_of(&id).await;
    assert_contiguous(events.iter().map(|(s, _)| *s), 52);
    let thoughts: BTreeSet<String> = app
        .event_rows(&id)
        .await
        .iter()
        .skip(2)
        .map(|row| {
            row.payload["ThoughtRecorded"]["display"]["thought"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(thoughts.len(), 50, "a thought was lost or stored twice");
    let (instance, sequence) = app.state.commands.load_instance(&id).await.unwrap();
    assert_eq!((instance.thoughts, sequence), (50, 52));
    assert_eq!(instance.status, InstanceStatus::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_racing_across_a_snapshot_keep_the_snapshot_exact() {
    let (app, id) = running().await;
    race_two_services(&app, &id, 60).await;
    assert_contiguous(app.events_of(&id).await.into_iter().map(|(s, _)| s), 122);
    let (last_sequence, snapshot): (i64, Value) = sqlx::query_as(
        "SELECT last_sequence, payload FROM snapshots
          WHERE aggregate_type = 'instance' AND aggregate_id = $1",
    )
    .bind(&id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(last_sequence, apex_commands::INSTANCE_SNAPSHOT_EVERY as i64);
    // Sequence 100 = created + started + 98 thoughts.
    assert_eq!(snapshot["thoughts"], 98);
    let (instance, sequence) = app.state.commands.load_instance(&id).await.unwrap();
    assert_eq!((instance.thoughts, sequence), (120, 122));
    let r = app.think(&id, "after the race").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["sequence"], 123);
}
