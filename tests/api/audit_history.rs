//! The audit API for one aggregate: its history in sequence order, and its state at a version
//! or a time, compared with a fold of its events by the domain code.

use apex_domain::instance::{Instance, InstanceEvent};
use chrono::{DateTime, Duration, Utc};
use cqrs_es::Aggregate;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::audit::{auditor, rfc3339, seed};
use crate::helpers::{assert_error, spawn_app};
use crate::helpers::{get, get_ok};

#[tokio::test]
async fn one_aggregates_history_is_listed_in_sequence_order() {
    let app = spawn_app().await;
    let ids = seed(&app, 2).await;
    let token = auditor(&app);
    let history = get_ok(
        &app,
        &format!("/v1/audit/instance/{}/events", ids[0]),
        &token,
    )
    .await;
    let items = history["items"].as_array().unwrap();
    let types: Vec<&str> = items
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "InstanceCreated",
            "InstanceStarted",
            "ThoughtRecorded",
            "ThoughtRecorded",
            "ToolCallStarted",
            "ToolCallCompleted",
            "InstanceCompleted",
        ]
    );
    assert!(items.iter().all(|e| e["aggregate_id"] == ids[0].as_str()));
    assert_eq!(history["next_after_sequence"], Value::Null);
    // Paged.
    let page = get_ok(
        &app,
        &format!(
            "/v1/audit/instance/{}/events?after_sequence=2&limit=3",
            ids[0]
        ),
        &token,
    )
    .await;
    let sequences: Vec<i64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(sequences, [3, 4, 5]);
    assert_eq!(page["next_after_sequence"], 5);
    let past_end = format!("/v1/audit/instance/{}/events?after_sequence=99", ids[0]);
    assert_eq!(get_ok(&app, &past_end, &token).await["items"], json!([]));
    let agent = get_ok(&app, "/v1/audit/agent/budget/events", &token).await;
    assert_eq!(agent["items"].as_array().unwrap().len(), 2);

    for path in [
        format!("/v1/audit/instance/{}/events", Uuid::new_v4()),
        "/v1/audit/agent/nobody/events".to_owned(),
        "/v1/audit/agent/budget-x/state".to_owned(),
        "/v1/audit/agent/nobody/verify".to_owned(),
        format!("/v1/audit/instances/{}/events", ids[0]),
        "/v1/audit/user/user-1/state".to_owned(),
    ] {
        let r = get(&app, &path, &token).await;
        assert_error(r, StatusCode::NOT_FOUND, "aggregate_not_found").await;
    }
    let r = get(
        &app,
        "/v1/audit/agent/budget/events?after_sequence=-1",
        &token,
    )
    .await;
    assert_error(r, StatusCode::BAD_REQUEST, "invalid_query").await;
}

#[tokio::test]
async fn the_state_at_a_version_or_a_time_is_the_fold_of_the_events_until_then() {
    let app = spawn_app().await;
    let ids = seed(&app, 1).await;
    let id = &ids[0];
    let token = auditor(&app);
    let rows = app.event_rows(id).await;
    let events: Vec<InstanceEvent> = rows
        .iter()
        .map(|r| serde_json::from_value(r.payload.clone()).unwrap())
        .collect();
    let fold = |n: usize| {
        let mut instance = Instance::default();
        for event in &events[..n] {
            instance.apply(event.clone());
        }
        serde_json::to_value(instance).unwrap()
    };
    for n in 1..=events.len() {
        let state = get_ok(
            &app,
            &format!("/v1/audit/instance/{id}/state?version={n}"),
            &token,
        )
        .await;
        assert_eq!(state["sequence"], n as i64);
        assert_eq!(state["state"], fold(n), "version {n}");
        let at: DateTime<Utc> = state["recorded_at"].as_str().unwrap().parse().unwrap();
        assert_eq!(at, rows[n - 1].recorded_at);
    }
    let latest = get_ok(&app, &format!("/v1/audit/instance/{id}/state"), &token).await;
    assert_eq!(latest["sequence"], events.len() as i64);
    assert_eq!(latest["state"], fold(events.len()));
    assert_eq!(latest["state"]["status"], "completed");
    let beyond = get_ok(
        &app,
        &format!("/v1/audit/instance/{id}/state?version=99"),
        &token,
    )
    .await;
    assert_eq!(beyond["sequence"], events.len() as i64);

    // At a time: the last event recorded at or before it.
    for (i, row) in rows.iter().enumerate() {
        for at in [row.recorded_at, row.recorded_at + Duration::microseconds(1)] {
            let path = format!("/v1/audit/instance/{id}/state?at={}", rfc3339(at));
            let state = get_ok(&app, &path, &token).await;
            let expected = rows.iter().rposition(|r| r.recorded_at <= at).unwrap() + 1;
            assert!(expected > i);
            assert_eq!(state["sequence"], expected as i64, "at {at}");
            assert_eq!(state["state"], fold(expected));
        }
    }
    let before = rows[0].recorded_at - Duration::seconds(1);
    let path = format!("/v1/audit/instance/{id}/state?at={}", rfc3339(before));
    let empty = get_ok(&app, &path, &token).await;
    assert_eq!(empty["sequence"], 0);
    assert_eq!(empty["recorded_at"], Value::Null);
    assert_eq!(empty["state"], fold(0));
    let agent = get_ok(&app, "/v1/audit/agent/budget/state?version=1", &token).await;
    assert_eq!(agent["state"]["status"], "draft");

    let at = rfc3339(Utc::now());
    for query in [
        format!("version=2&at={at}"),
        "version=0".to_owned(),
        "at=yesterday".to_owned(),
    ] {
        let r = get(
            &app,
            &format!("/v1/audit/instance/{id}/state?{query}"),
            &token,
        )
        .await;
        assert_error(r, StatusCode::BAD_REQUEST, "invalid_query").await;
    }
}
