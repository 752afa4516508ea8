//! The audit API: the global log in commit order (pages and NDJSON export) and who may read
//! it. One aggregate's history and state are in `audit_history`, tamper detection in
//! `audit_tamper`; the helpers here serve all three.

use std::collections::BTreeSet;

use apex_domain::{ActorRole, Tier};
use chrono::{DateTime, Duration, SecondsFormat, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, assert_error, get, get_ok, spawn_app};

pub fn auditor(app: &TestApp) -> String {
    app.token("auditor-1", ActorRole::Auditor, None)
}

pub fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
        .replace('+', "%2B")
}

/// An active agent `budget` and `runs` runs of user-1, each started with two thoughts, a
/// completed tool call and an answer; returns the run ids.
pub async fn seed(app: &TestApp, runs: usize) -> Vec<String> {
    app.active_agent("budget", &["search"], &["free"]).await;
    let user = app.user("user-1", Tier::Free);
    let runner = app.runner();
    let mut ids = vec![];
    for _ in 0..runs {
        let id = app.running_instance(&user, "budget").await;
        for thought in ["reading the invoices", "comparing models"] {
            assert_eq!(app.think(&id, thought).await.status(), StatusCode::OK);
        }
        let steps = [
            (
                format!("/v1/runner/instances/{id}/tools"),
                json!({"call_id": "c1", "tool": "search", "arguments": {"q": "spend"}}),
            ),
            (
                format!("/v1/runner/instances/{id}/tools/c1/complete"),
                json!({"result": {"rows": 3}}),
            ),
            (
                format!("/v1/runner/instances/{id}/complete"),
                json!({"output": "save 20%"}),
            ),
        ];
        for (path, body) in steps {
            let r = app.post(&path, &runner, body).await;
            assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
        }
        ids.push(id);
    }
    ids
}

/// Waits until every stored event is below the horizon of finished transactions, so the log
/// lists it. The horizon is cluster-wide: a transaction of a test running in parallel (in
/// another database) holds it back for a moment.
pub async fn settle(app: &TestApp) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let held_back: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events
              WHERE transaction_id >= pg_snapshot_xmin(pg_current_snapshot())",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if held_back == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{held_back} events held back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `(transaction_id, position)` of every event, in commit order, straight from the table.
async fn stored_order(app: &TestApp) -> Vec<(i64, i64)> {
    sqlx::query_as(
        "SELECT transaction_id::text::bigint, position FROM events
          ORDER BY transaction_id, position",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

fn keys(items: &[Value]) -> Vec<(i64, i64)> {
    items
        .iter()
        .map(|e| {
            (
                e["transaction_id"].as_i64().unwrap(),
                e["position"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Follows `next_after` from `path` (which already has a `?`) while `has_more`.
async fn all_pages(app: &TestApp, path: &str, token: &str) -> Vec<Value> {
    let mut page = get_ok(app, path, token).await;
    let mut items = page["items"].as_array().unwrap().clone();
    while page["has_more"] == true {
        let after = page["next_after"].as_str().unwrap();
        page = get_ok(app, &format!("{path}&after={after}"), token).await;
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        assert!(items.len() < 10_000, "pagination does not end");
    }
    items
}

#[tokio::test]
async fn the_log_lists_every_event_exactly_once_in_commit_order_with_every_field() {
    let app = spawn_app().await;
    let ids = seed(&app, 3).await;
    // Concurrent commands: their transactions interleave.
    let runner = app.runner();
    let thinking = ids.iter().map(|id| {
        let (app, runner) = (&app, &runner);
        async move {
            for i in 0..3 {
                app.post(
                    &format!("/v1/runner/instances/{id}/thoughts"),
                    runner,
                    json!({"thought": format!("late {i}")}),
                )
                .await;
            }
        }
    });
    futures::future::join_all(thinking).await;
    settle(&app).await;

    let items = all_pages(&app, "/v1/audit/events?limit=7", &auditor(&app)).await;
    assert_eq!(keys(&items), stored_order(&app).await);
    let ids: BTreeSet<&str> = items
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), items.len(), "an event was listed twice");

    let first_thought = items
        .iter()
        .find(|e| e["event_type"] == "ThoughtRecorded")
        .unwrap();
    let row = &app
        .event_rows(first_thought["aggregate_id"].as_str().unwrap())
        .await[first_thought["sequence"].as_u64().unwrap() as usize - 1];
    assert_eq!(first_thought["event_id"], row.event_id.to_string());
    assert_eq!(first_thought["aggregate_type"], "instance");
    assert_eq!(first_thought["event_version"], row.event_version);
    assert_eq!(first_thought["payload"], row.payload);
    assert_eq!(first_thought["principal"], "runner-1");
    assert_eq!(first_thought["principal_role"], "runner");
    assert_eq!(
        first_thought["correlation_id"],
        row.correlation_id.to_string()
    );
    assert_eq!(first_thought["causation_id"], row.causation_id.to_string());
    assert_eq!(first_thought["metadata"]["principal"], "runner-1");
    assert!(first_thought["metadata"]["traceparent"].is_string());
    let recorded: DateTime<Utc> = first_thought["recorded_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(recorded, row.recorded_at);
    let hash = first_thought["hash"].as_str().unwrap();
    assert!(
        hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "{hash}"
    );
    // The admin may read the log too.
    let page = get_ok(&app, "/v1/audit/events?limit=1", &app.admin()).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_page_never_later_gains_an_earlier_event() {
    let app = spawn_app().await;
    seed(&app, 1).await;
    settle(&app).await;
    let token = auditor(&app);
    let before = all_pages(&app, "/v1/audit/events?limit=50", &token).await;
    let cursor = get_ok(&app, "/v1/audit/events?limit=200", &token).await["next_after"]
        .as_str()
        .unwrap()
        .to_owned();

    // A transaction that appends first but commits last.
    let mut slow = app.pool.begin().await.unwrap();
    let slow_id = Uuid::new_v4().to_string();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata)
         VALUES ('instance', $1, 1, 'ThoughtRecorded', '1', '{}', $2)",
    )
    .bind(&slow_id)
    .bind(
        json!({"correlation_id": Uuid::new_v4(), "causation_id": Uuid::new_v4(),
                 "principal": "dba", "principal_role": "admin"}),
    )
    .execute(&mut *slow)
    .await
    .unwrap();
    let fast = app
        .instance(&app.user("user-1", Tier::Free), "budget")
        .await;

    // The later transaction committed, but the log holds it back behind the open one.
    let page = get_ok(&app, &format!("/v1/audit/events?after={cursor}"), &token).await;
    assert_eq!(
        page["items"],
        json!([]),
        "an event past an open transaction was listed"
    );
    assert_eq!(
        page["next_after"],
        cursor.as_str(),
        "an empty page keeps the cursor"
    );
    assert_eq!(page["has_more"], false);

    slow.commit().await.unwrap();
    settle(&app).await;
    let page = get_ok(&app, &format!("/v1/audit/events?after={cursor}"), &token).await;
    let aggregates: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["aggregate_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        aggregates,
        [slow_id.as_str(), fast.as_str()],
        "commit order"
    );
    let everything = all_pages(&app, "/v1/audit/events?limit=50", &token).await;
    assert_eq!(
        everything[..before.len()],
        before[..],
        "an earlier page changed"
    );
    assert_eq!(keys(&everything), stored_order(&app).await);
}

#[tokio::test]
async fn the_export_streams_the_same_events_as_the_pages_as_ndjson() {
    let app = spawn_app().await;
    seed(&app, 2).await;
    // Enough bytes for several chunks of the stream.
    let long = "x".repeat(2_000);
    let id = app
        .running_instance(&app.user("user-2", Tier::Free), "budget")
        .await;
    for _ in 0..40 {
        assert_eq!(app.think(&id, &long).await.status(), StatusCode::OK);
    }
    settle(&app).await;
    let token = auditor(&app);
    for filter in [
        "",
        "aggregate_type=agent",
        "aggregate_type=instance&event_type=ThoughtRecorded",
    ] {
        let paged = all_pages(&app, &format!("/v1/audit/events?limit=11&{filter}"), &token).await;
        assert!(!paged.is_empty(), "{filter}");
        let r = get(&app, &format!("/v1/audit/events/export?{filter}"), &token).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "application/x-ndjson");
        let body = r.text().await.unwrap();
        assert!(body.ends_with('\n'));
        let exported: Vec<Value> = body
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(exported, paged, "{filter}");
    }
    let all = all_pages(&app, "/v1/audit/events?limit=200", &token).await;
    assert_eq!(keys(&all), stored_order(&app).await);
    // Resuming an export after a cursor.
    let first = get_ok(&app, "/v1/audit/events?limit=5", &token).await;
    let after = first["next_after"].as_str().unwrap();
    let r = get(
        &app,
        &format!("/v1/audit/events/export?after={after}"),
        &token,
    )
    .await;
    let rest: Vec<Value> = r
        .text()
        .await
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(rest, all[5..]);
}

#[tokio::test]
async fn the_log_filters_by_type_and_time_and_refuses_bad_parameters() {
    let app = spawn_app().await;
    seed(&app, 2).await;
    settle(&app).await;
    let token = auditor(&app);
    let all = all_pages(&app, "/v1/audit/events?limit=200", &token).await;
    let middle: DateTime<Utc> = all[all.len() / 2]["recorded_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let path = format!("/v1/audit/events?limit=200&from={}", rfc3339(middle));
    let later = all_pages(&app, &path, &token).await;
    let expected: Vec<&Value> = all
        .iter()
        .filter(|e| {
            e["recorded_at"]
                .as_str()
                .unwrap()
                .parse::<DateTime<Utc>>()
                .unwrap()
                >= middle
        })
        .collect();
    assert_eq!(later.iter().collect::<Vec<_>>(), expected);
    let path = format!("/v1/audit/events?limit=200&to={}", rfc3339(middle));
    let earlier = all_pages(&app, &path, &token).await;
    assert_eq!(earlier.len() + later.len(), all.len());
    let agents = all_pages(&app, "/v1/audit/events?aggregate_type=agent", &token).await;
    assert_eq!(agents.len(), 2, "defined and activated");
    let created = all_pages(&app, "/v1/audit/events?event_type=InstanceCreated", &token).await;
    assert_eq!(created.len(), 2);

    let now = Utc::now();
    for query in [
        "limit=0".to_owned(),
        "limit=201".to_owned(),
        "after=nonsense".to_owned(),
        "after=6b317c75736572".to_owned(),
        "aggregate_type=agents".to_owned(),
        "event_type=".to_owned(),
        "verbose=1".to_owned(),
        format!(
            "from={}&to={}",
            rfc3339(now),
            rfc3339(now - Duration::seconds(1))
        ),
    ] {
        for route in ["/v1/audit/events", "/v1/audit/events/export"] {
            if route.ends_with("export") && query.starts_with("limit") {
                continue;
            }
            let r = get(&app, &format!("{route}?{query}"), &token).await;
            assert_error(r, StatusCode::BAD_REQUEST, "invalid_query").await;
        }
    }
    let r = get(&app, "/v1/audit/events/export?limit=5", &token).await;
    assert_error(r, StatusCode::BAD_REQUEST, "invalid_query").await;
}

#[tokio::test]
async fn only_auditors_and_admins_may_audit() {
    let app = spawn_app().await;
    let ids = seed(&app, 1).await;
    let id = &ids[0];
    let routes = [
        "/v1/audit/events".to_owned(),
        "/v1/audit/events/export".to_owned(),
        format!("/v1/audit/instance/{id}/events"),
        format!("/v1/audit/instance/{id}/state"),
        format!("/v1/audit/instance/{id}/verify"),
    ];
    let (user, runner) = (app.user("user-1", Tier::Free), app.runner());
    for path in &routes {
        for token in [&user, &runner] {
            let r = get(&app, path, token).await;
            assert_error(r, StatusCode::FORBIDDEN, "role_not_allowed").await;
        }
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_error(r, StatusCode::UNAUTHORIZED, "missing_token").await;
        for token in [auditor(&app), app.admin()] {
            assert_eq!(
                get(&app, path, &token).await.status(),
                StatusCode::OK,
                "{path}"
            );
        }
    }
    // The role is checked before anything else.
    let r = get(&app, "/v1/audit/user/x/state?version=0", &user).await;
    assert_error(r, StatusCode::FORBIDDEN, "role_not_allowed").await;
}
