//! Commands through HTTP: the rows they store, the rules that refuse them, idempotency.

use std::collections::HashSet;
use std::sync::Arc;

use apex_domain::{Tier, limits};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, assert_error, assert_refused, spawn_app};

/// An app with the active agent `triage` (tools `search`, `fetch`; tier free).
async fn app_with_agent() -> TestApp {
    let app = spawn_app().await;
    app.active_agent("triage", &["search", "fetch"], &["free"])
        .await;
    app
}

fn runner_path(id: &str, step: &str) -> String {
    format!("/v1/runner/instances/{id}/{step}")
}

async fn json_body(response: reqwest::Response) -> Value {
    response.json().await.unwrap()
}

/// The `payload` of every event of `id`, unwrapped from its `{"<EventType>": {...}}` envelope.
async fn payloads(app: &TestApp, id: &str) -> Vec<(String, Value)> {
    app.event_rows(id)
        .await
        .into_iter()
        .map(|row| {
            let inner = row.payload[&row.event_type].clone();
            assert!(
                inner.is_object(),
                "payload is not tagged by its event type: {}",
                row.payload
            );
            (row.event_type, inner)
        })
        .collect()
}

#[tokio::test]
async fn a_full_run_stores_one_row_per_step_with_complete_metadata() {
    let app = spawn_app().await;
    let before_run = chrono::Utc::now();
    let correlation = Uuid::new_v4();
    let correlation_header = correlation.to_string();
    let headers = [("X-Correlation-Id", correlation_header.as_str())];

    let admin = app.admin();
    let r = app
        .post_with(
            "/v1/admin/agents",
            &admin,
            json!({"id": "triage", "display_name": "Triage", "description": "spend triage",
                   "tools": ["search", "fetch"], "tiers": ["free"]}),
            &headers,
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        json_body(r).await,
        json!({"agent_id": "triage", "version": 1})
    );
    let r = app
        .post_with(
            "/v1/admin/agents/triage/activate",
            &admin,
            json!({}),
            &headers,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        json_body(r).await,
        json!({"agent_id": "triage", "version": 2})
    );

    let user = app.user("user-1", Tier::Free);
    let r = app
        .post_with(
            "/v1/instances",
            &user,
            json!({"agent_id": "triage", "input": "analyse my spend"}),
            &headers,
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let created = json_body(r).await;
    let id = created["instance_id"].as_str().unwrap().to_owned();
    assert!(
        Uuid::parse_str(&id).is_ok(),
        "instance_id is not a UUID: {created}"
    );
    assert_eq!(created, json!({"instance_id": id, "sequence": 1}));

    let runner = app.runner();
    let steps = [
        (
            "start",
            json!({"message": "on it", "prompt": "system prompt"}),
        ),
        (
            "thoughts",
            json!({"thought": "I should search", "prompt": "p", "raw": {"t": 1}}),
        ),
        (
            "tools",
            json!({"call_id": "call-1", "tool": "search", "summary": "searching",
                   "arguments": {"q": "spend"}}),
        ),
        (
            "tools/call-1/complete",
            json!({"summary": "3 hits", "result": {"hits": 3}}),
        ),
        (
            "complete",
            json!({"output": "You spent 3 units", "raw": {"done": true}}),
        ),
    ];
    for (n, (step, body)) in steps.into_iter().enumerate() {
        let r = app
            .post_with(&runner_path(&id, step), &runner, body, &headers)
            .await;
        assert_eq!(r.status(), StatusCode::OK, "step {step}");
        assert_eq!(
            json_body(r).await,
            json!({"instance_id": id, "sequence": n + 2}),
            "step {step}"
        );
    }
    let after_run = chrono::Utc::now();

    let rows = app.event_rows(&id).await;
    let types: Vec<&str> = rows.iter().map(|r| r.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "InstanceCreated",
            "InstanceStarted",
            "ThoughtRecorded",
            "ToolCallStarted",
            "ToolCallCompleted",
            "InstanceCompleted"
        ]
    );
    let slack = chrono::Duration::seconds(5);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.aggregate_type, "instance");
        assert_eq!(row.aggregate_id, id);
        assert_eq!(row.sequence, i as i64 + 1);
        // ToolCallCompleted is at version 2 (docs/architecture/event_versioning.md).
        let version = if row.event_type == "ToolCallCompleted" {
            "2"
        } else {
            "1"
        };
        assert_eq!(row.event_version, version, "{}", row.event_type);
        assert_eq!(row.correlation_id, correlation, "{}", row.event_type);
        assert!(!row.causation_id.is_nil());
        assert!(!row.transaction_id.is_empty());
        assert!(
            row.recorded_at >= before_run - slack && row.recorded_at <= after_run + slack,
            "recorded_at {} outside the run",
            row.recorded_at
        );
        let (principal, role) = if i == 0 {
            ("user-1", "user")
        } else {
            ("runner-1", "runner")
        };
        assert_eq!(
            (row.principal.as_str(), row.principal_role.as_str()),
            (principal, role)
        );
    }
    // One request, one command: each has its own causation id and its own transaction.
    let causations: HashSet<Uuid> = rows.iter().map(|r| r.causation_id).collect();
    assert_eq!(
        causations.len(),
        rows.len(),
        "causation ids are not per request"
    );
    assert!(!causations.contains(&correlation));
    let transactions: HashSet<&str> = rows.iter().map(|r| r.transaction_id.as_str()).collect();
    assert_eq!(transactions.len(), rows.len());
    let event_ids: HashSet<Uuid> = rows.iter().map(|r| r.event_id).collect();
    assert_eq!(event_ids.len(), rows.len(), "event ids are not unique");
    assert!(
        rows.windows(2).all(|w| w[0].position < w[1].position),
        "positions do not increase"
    );
    assert!(
        rows.windows(2)
            .all(|w| w[0].recorded_at <= w[1].recorded_at)
    );

    let agent_rows = app.event_rows("triage").await;
    let agent: Vec<(&str, i64, &str, &str, &str, &str)> = agent_rows
        .iter()
        .map(|r| {
            (
                r.aggregate_type.as_str(),
                r.sequence,
                r.event_type.as_str(),
                r.event_version.as_str(),
                r.principal.as_str(),
                r.principal_role.as_str(),
            )
        })
        .collect();
    assert_eq!(
        agent,
        [
            ("agent", 1, "AgentDefined", "1", "admin-1", "admin"),
            ("agent", 2, "AgentActivated", "1", "admin-1", "admin")
        ]
    );
    assert!(agent_rows.iter().all(|r| r.correlation_id == correlation));
    assert!(agent_rows[1].position < rows[0].position);
    let all_ids: HashSet<Uuid> = agent_rows.iter().chain(&rows).map(|r| r.event_id).collect();
    assert_eq!(all_ids.len(), 8);
    assert_eq!(app.event_count().await, 8);
}

#[tokio::test]
async fn without_a_correlation_header_each_request_starts_its_own_correlation() {
    let app = app_with_agent().await;
    let user = app.user("user-1", Tier::Free);
    let id = app.running_instance(&user, "triage").await;
    let rows = app.event_rows(&id).await;
    assert_eq!(rows.len(), 2);
    assert_ne!(rows[0].correlation_id, rows[1].correlation_id);
    for row in &rows {
        assert_eq!(row.correlation_id, row.causation_id);
    }
}

#[tokio::test]
async fn step_payloads_keep_what_the_chat_shows_apart_from_internal_detail() {
    let app = app_with_agent().await;
    let user = app.user("user-1", Tier::Free);
    let id = app.instance(&user, "triage").await;
    let runner = app.runner();
    let steps = [
        (
            "start",
            json!({"message": "on it", "prompt": "internal system prompt"}),
        ),
        (
            "thoughts",
            json!({"thought": "I should search", "prompt": "internal prompt",
                   "raw": {"internal": "model output"}}),
        ),
        (
            "tools",
            json!({"call_id": "call-1", "tool": "search", "summary": "searching",
                   "arguments": {"internal": "query"}}),
        ),
        (
            "tools/call-1/complete",
            json!({"is_error": true, "summary": "search failed",
                   "result": {"internal": "stack trace"}}),
        ),
        (
            "fail",
            json!({"error": "I could not finish", "raw": {"internal": "timeout"}}),
        ),
    ];
    for (step, body) in steps {
        let r = app.post(&runner_path(&id, step), &runner, body).await;
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "{step}: {}",
            r.text().await.unwrap()
        );
    }

    let payloads = payloads(&app, &id).await;
    let expected = [
        (
            "InstanceStarted",
            json!({"display": {"message": "on it"},
                   "internal": {"prompt": "internal system prompt"}}),
        ),
        (
            "ThoughtRecorded",
            json!({"display": {"thought": "I should search"},
                   "internal": {"prompt": "internal prompt", "raw": {"internal": "model output"}}}),
        ),
        (
            "ToolCallStarted",
            json!({"call_id": "call-1", "tool": "search", "display": {"summary": "searching"},
                   "internal": {"arguments": {"internal": "query"}}}),
        ),
        (
            "ToolCallCompleted",
            json!({"call_id": "call-1", "tool": "search", "is_error": true,
                   "display": {"summary": "search failed"},
                   "internal": {"result": {"internal": "stack trace"}, "duration_ms": null}}),
        ),
        (
            "InstanceFailed",
            json!({"display": {"error": "I could not finish"},
                   "internal": {"raw": {"internal": "timeout"}}}),
        ),
    ];
    assert_eq!(payloads.len(), 6);
    assert_eq!(payloads[0].0, "InstanceCreated");
    assert_eq!(payloads[0].1["input"], "analyse my spend");
    assert_eq!(payloads[0].1["tools"], json!(["search", "fetch"]));
    for ((event_type, payload), (expected_type, expected_payload)) in
        payloads[1..].iter().zip(expected)
    {
        assert_eq!(event_type, expected_type);
        assert_eq!(payload, &expected_payload, "{event_type}");
        assert!(
            !payload["display"].to_string().contains("internal"),
            "{event_type} shows internal detail in display: {payload}"
        );
    }
}

#[tokio::test]
async fn the_owner_cancels_a_pending_run() {
    let app = app_with_agent().await;
    let user = app.user("user-1", Tier::Free);
    let id = app.instance(&user, "triage").await;
    let correlation = Uuid::new_v4().to_string();
    let r = app
        .post_with(
            &format!("/v1/instances/{id}/cancel"),
            &user,
            json!({"reason": "changed my mind"}),
            &[("X-Correlation-Id", correlation.as_str())],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        json_body(r).await,
        json!({"instance_id": id, "sequence": 2})
    );

    let rows = app.event_rows(&id).await;
    assert_eq!(rows.len(), 2);
    let cancelled = &rows[1];
    assert_eq!(cancelled.event_type, "InstanceCancelled");
    assert_eq!(cancelled.sequence, 2);
    assert_eq!(cancelled.event_version, "1");
    assert_eq!(cancelled.correlation_id.to_string(), correlation);
    assert_eq!(
        (
            cancelled.principal.as_str(),
            cancelled.principal_role.as_str()
        ),
        ("user-1", "user")
    );
    assert_eq!(
        cancelled.payload,
        json!({"InstanceCancelled": {"by": {"id": "user-1", "role": "user"},
                                      "display": {"reason": "changed my mind"}}})
    );
}

#[tokio::test]
async fn an_admin_cancels_a_running_run_with_an_empty_body() {
    let app = app_with_agent().await;
    let user = app.user("user-1", Tier::Free);
    let id = app.running_instance(&user, "triage").await;
    let r = app
        .post_raw(
            &format!("/v1/instances/{id}/cancel"),
            &app.admin(),
            None,
            Vec::new(),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        json_body(r).await,
        json!({"instance_id": id, "sequence": 3})
    );
    let rows = app.event_rows(&id).await;
    assert_eq!(rows[2].event_type, "InstanceCancelled");
    assert_eq!(
        (rows[2].principal.as_str(), rows[2].principal_role.as_str()),
        ("admin-1", "admin")
    );
    assert_eq!(
        rows[2].payload["InstanceCancelled"]["display"],
        json!({"reason": null})
    );
}

#[tokio::test]
async fn a_tool_outside_the_runs_tool_list_is_refused() {
    let app = app_with_agent().await;
    let id = app
        .running_instance(&app.user("user-1", Tier::Free), "triage")
        .await;
    let before = app.event_count().await;
    let r = app
        .post(
            &runner_path(&id, "tools"),
            &app.runner(),
            json!({"call_id": "call-1", "tool": "shell"}),
        )
        .await;
    assert_refused(
        &app,
        before,
        r,
        StatusCode::UNPROCESSABLE_ENTITY,
        "tool_not_allowed",
    )
    .await;
}

#[tokio::test]
async fn a_reused_tool_call_id_is_refused() {
    let app = app_with_agent().await;
    let id = app
        .running_instance(&app.user("user-1", Tier::Free), "triage")
        .await;
    let runner = app.runner();
    let start = json!({"call_id": "call-1", "tool": "search"});
    let r = app
        .post(&runner_path(&id, "tools"), &runner, start.clone())
        .await;
    assert_eq!(r.status(), StatusCode::OK);

    let before = app.event_count().await;
    let r = app
        .post(&runner_path(&id, "tools"), &runner, start.clone())
        .await;
    assert_refused(&app, before, r, StatusCode::CONFLICT, "duplicate_call_id").await;

    let r = app
        .post(
            &runner_path(&id, "tools/call-1/complete"),
            &runner,
            json!({}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let before = app.event_count().await;
    let r = app.post(&runner_path(&id, "tools"), &runner, start).await;
    assert_refused(&app, before, r, StatusCode::CONFLICT, "duplicate_call_id").await;
    let r = app
        .post(
            &runner_path(&id, "tools/call-1/complete"),
            &runner,
            json!({}),
        )
        .await;
    assert_refused(
        &app,
        before,
        r,
        StatusCode::CONFLICT,
        "call_already_completed",
    )
    .await;
    let r = app
        .post(
            &runner_path(&id, "tools/call-9/complete"),
            &runner,
            json!({}),
        )
        .await;
    assert_refused(&app, before, r, StatusCode::NOT_FOUND, "unknown_call_id").await;
}

#[tokio::test]
async fn a_run_with_an_open_tool_call_cannot_complete() {
    let app = app_with_agent().await;
    let id = app
        .running_instance(&app.user("user-1", Tier::Free), "triage")
        .await;
    let runner = app.runner();
    let r = app
        .post(
            &runner_path(&id, "tools"),
            &runner,
            json!({"call_id": "call-1", "tool": "fetch"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let before = app.event_count().await;
    let r = app
        .post(
            &runner_path(&id, "complete"),
            &runner,
            json!({"output": "done"}),
        )
        .await;
    assert_refused(&app, before, r, StatusCode::CONFLICT, "open_tool_calls").await;
}

#[tokio::test]
async fn a_finished_run_accepts_no_further_steps() {
    let app = app_with_agent().await;
    let user = app.user("user-1", Tier::Free);
    let id = app.running_instance(&user, "triage").await;
    let runner = app.runner();
    let r = app
        .post(
            &runner_path(&id, "complete"),
            &runner,
            json!({"output": "done"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);

    let before = app.event_count().await;
    let r = app.think(&id, "one more thing").await;
    assert_refused(&app, before, r, StatusCode::CONFLICT, "instance_terminal").await;
    let r = app
        .post(&runner_path(&id, "start"), &runner, json!({}))
        .await;
    assert_refused(&app, before, r, StatusCode::CONFLICT, "instance_terminal").await;
    let r = app
        .post(&runner_path(&id, "fail"), &runner, json!({"error": "late"}))
        .await;
    assert_refused(&app, before, r, StatusCode::CONFLICT, "instance_terminal").await;
    let r = app
        .post(&format!("/v1/instances/{id}/cancel"), &user, json!({}))
        .await;
    assert_refused(&app, before, r, StatusCode::CONFLICT, "instance_terminal").await;
}

#[tokio::test]
async fn a_step_out_of_order_is_refused() {
    let app = app_with_agent().await;
    let id = app
        .instance(&app.user("user-1", Tier::Free), "triage")
        .await;
    let before = app.event_count().await;
    let r = app.think(&id, "thinking before starting").await;
    assert_refused(
        &app,
        before,
        r,
        StatusCode::CONFLICT,
        "invalid_instance_transition",
    )
    .await;
}

#[tokio::test]
async fn a_run_of_an_agent_that_is_not_active_is_refused() {
    let app = spawn_app().await;
    app.draft_agent("drafted", &[], &["free"]).await;
    app.active_agent("paused", &[], &["free"]).await;
    let r = app
        .post("/v1/admin/agents/paused/disable", &app.admin(), json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let user = app.user("user-1", Tier::Free);

    let before = app.event_count().await;
    for agent in ["drafted", "paused"] {
        let r = app
            .post(
                "/v1/instances",
                &user,
                json!({"agent_id": agent, "input": "hi"}),
            )
            .await;
        assert_refused(&app, before, r, StatusCode::CONFLICT, "agent_not_active").await;
    }
    assert_eq!(app.instance_count().await, 0);
}

#[tokio::test]
async fn a_run_of_an_agent_closed_to_the_callers_tier_is_refused() {
    let app = spawn_app().await;
    app.active_agent("premium", &[], &["enterprise"]).await;
    let before = app.event_count().await;
    let r = app
        .post(
            "/v1/instances",
            &app.user("user-1", Tier::Free),
            json!({"agent_id": "premium", "input": "hi"}),
        )
        .await;
    assert_refused(&app, before, r, StatusCode::FORBIDDEN, "tier_not_allowed").await;
}

#[tokio::test]
async fn a_run_of_an_unknown_agent_is_refused() {
    let app = spawn_app().await;
    let before = app.event_count().await;
    let r = app
        .post(
            "/v1/instances",
            &app.user("user-1", Tier::Free),
            json!({"agent_id": "nobody", "input": "hi"}),
        )
        .await;
    assert_refused(&app, before, r, StatusCode::NOT_FOUND, "agent_not_found").await;
}

#[tokio::test]
async fn another_users_run_is_not_found() {
    let app = app_with_agent().await;
    let id = app
        .instance(&app.user("user-1", Tier::Free), "triage")
        .await;
    let intruder = app.user("user-2", Tier::Free);
    let before = app.event_count().await;
    let r = app
        .post(&format!("/v1/instances/{id}/cancel"), &intruder, json!({}))
        .await;
    assert_refused(&app, before, r, StatusCode::NOT_FOUND, "instance_not_found").await;

    // Unknown ids (well-formed or not) are not found either.
    let r = app
        .post(
            &format!("/v1/instances/{}/cancel", Uuid::new_v4()),
            &intruder,
            json!({}),
        )
        .await;
    assert_refused(&app, before, r, StatusCode::NOT_FOUND, "instance_not_found").await;
    let r = app.think("not-a-uuid", "hello").await;
    assert_refused(&app, before, r, StatusCode::NOT_FOUND, "instance_not_found").await;
}

#[tokio::test]
async fn an_invalid_agent_slug_is_refused() {
    let app = spawn_app().await;
    let before = app.event_count().await;
    for slug in ["Triage", "data_x", "x-", "2fast", ""] {
        let r = app
            .post(
                "/v1/instances",
                &app.user("user-1", Tier::Free),
                json!({"agent_id": slug, "input": "hi"}),
            )
            .await;
        let code = if slug.is_empty() {
            "field_required"
        } else {
            "field_invalid"
        };
        assert_refused(&app, before, r, StatusCode::UNPROCESSABLE_ENTITY, code).await;
    }
    let r = app
        .post(
            "/v1/admin/agents",
            &app.admin(),
            json!({"id": "Bad Slug", "display_name": "x", "tiers": ["free"]}),
        )
        .await;
    assert_refused(
        &app,
        before,
        r,
        StatusCode::UNPROCESSABLE_ENTITY,
        "field_invalid",
    )
    .await;
}

#[tokio::test]
async fn a_body_that_does_not_match_the_schema_is_refused() {
    let app = app_with_agent().await;
    let id = app
        .running_instance(&app.user("user-1", Tier::Free), "triage")
        .await;
    let runner = app.runner();
    let before = app.event_count().await;
    for body in [
        json!({"thought": "hi", "mood": "happy"}),
        json!({"prompt": "no thought"}),
        json!({"thought": 42}),
        json!("just a string"),
    ] {
        let r = app.post(&runner_path(&id, "thoughts"), &runner, body).await;
        assert_refused(
            &app,
            before,
            r,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        )
        .await;
    }
    let r = app
        .post(
            "/v1/instances",
            &app.user("user-1", Tier::Free),
            json!({"agent_id": "triage", "input": "hi", "priority": 1}),
        )
        .await;
    assert_refused(
        &app,
        before,
        r,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    )
    .await;
}

#[tokio::test]
async fn malformed_json_is_refused() {
    let app = app_with_agent().await;
    let id = app
        .running_instance(&app.user("user-1", Tier::Free), "triage")
        .await;
    let runner = app.runner();
    let before = app.event_count().await;
    for body in [
        r#"{"thought": "unterminated"#,
        r#"{"thought" "x"}"#,
        "not json",
        r#"{"thought": "x"} {}"#,
    ] {
        let r = app
            .post_raw(
                &runner_path(&id, "thoughts"),
                &runner,
                Some("application/json"),
                body,
            )
            .await;
        assert_refused(&app, before, r, StatusCode::BAD_REQUEST, "malformed_json").await;
    }
}

#[tokio::test]
async fn a_body_that_is_not_json_is_refused() {
    let app = app_with_agent().await;
    let id = app
        .running_instance(&app.user("user-1", Tier::Free), "triage")
        .await;
    let runner = app.runner();
    let before = app.event_count().await;
    let body = r#"{"thought": "hi"}"#;
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let r = app
            .post_raw(&runner_path(&id, "thoughts"), &runner, content_type, body)
            .await;
        assert_refused(
            &app,
            before,
            r,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .await;
    }
    // A JSON media type with parameters is JSON.
    let r = app
        .post_raw(
            &runner_path(&id, "thoughts"),
            &runner,
            Some("application/json; charset=utf-8"),
            body,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_body_over_the_size_limit_is_refused() {
    let app = app_with_agent().await;
    let id = app
        .running_instance(&app.user("user-1", Tier::Free), "triage")
        .await;
    let limit = app.settings.http.body_limit_bytes;
    assert_eq!(limit, 1024 * 1024);
    let body = serde_json::to_vec(&json!({"thought": "x".repeat(limit)})).unwrap();
    assert!(body.len() > limit);
    let before = app.event_count().await;
    let r = app
        .post_raw(
            &runner_path(&id, "thoughts"),
            &app.runner(),
            Some("application/json"),
            body,
        )
        .await;
    assert_refused(
        &app,
        before,
        r,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;
}

#[tokio::test]
async fn a_text_field_over_its_limit_is_refused() {
    let app = app_with_agent().await;
    let user = app.user("user-1", Tier::Free);
    let id = app.running_instance(&user, "triage").await;
    let before = app.event_count().await;
    let r = app
        .think(&id, &"x".repeat(limits::DISPLAY_TEXT_MAX + 1))
        .await;
    assert_refused(
        &app,
        before,
        r,
        StatusCode::UNPROCESSABLE_ENTITY,
        "field_too_long",
    )
    .await;
    let r = app
        .post(
            "/v1/instances",
            &user,
            json!({"agent_id": "triage", "input": "é".repeat(limits::INPUT_MAX + 1)}),
        )
        .await;
    assert_refused(
        &app,
        before,
        r,
        StatusCode::UNPROCESSABLE_ENTITY,
        "field_too_long",
    )
    .await;
    // Exactly at the limit is fine.
    let r = app.think(&id, &"é".repeat(limits::DISPLAY_TEXT_MAX)).await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn malformed_headers_are_refused() {
    let app = app_with_agent().await;
    let id = app
        .running_instance(&app.user("user-1", Tier::Free), "triage")
        .await;
    let runner = app.runner();
    let before = app.event_count().await;
    let long_key = "k".repeat(256);
    for header in [
        ("X-Correlation-Id", "not-a-uuid"),
        ("Idempotency-Key", long_key.as_str()),
    ] {
        let r = app
            .post_with(
                &runner_path(&id, "thoughts"),
                &runner,
                json!({"thought": "hi"}),
                &[header],
            )
            .await;
        assert_refused(&app, before, r, StatusCode::BAD_REQUEST, "invalid_header").await;
    }
}

#[tokio::test]
async fn an_unknown_route_is_not_found() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(app.url("/v1/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::NOT_FOUND, "route_not_found").await;
    let r = app
        .post("/v1/instances/x/rename", &app.admin(), json!({}))
        .await;
    assert_error(r, StatusCode::NOT_FOUND, "route_not_found").await;
    assert_eq!(app.event_count().await, 0);
}

#[tokio::test]
async fn repeating_a_step_with_its_idempotency_key_replays_the_answer() {
    let app = app_with_agent().await;
    let id = app
        .running_instance(&app.user("user-1", Tier::Free), "triage")
        .await;
    let runner = app.runner();
    let before = app.event_count().await;
    let mut answers = vec![];
    for _ in 0..2 {
        let r = app
            .post_with(
                &runner_path(&id, "thoughts"),
                &runner,
                json!({"thought": "only once"}),
                &[("Idempotency-Key", "thought-1")],
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let replayed = r.headers().get("idempotent-replayed").cloned();
        answers.push((replayed, json_body(r).await));
    }
    assert_eq!(answers[0].0, None);
    assert_eq!(answers[1].0.as_ref().unwrap(), "true");
    assert_eq!(answers[0].1, json!({"instance_id": id, "sequence": 3}));
    assert_eq!(answers[1].1, answers[0].1);
    assert_eq!(app.event_count().await, before + 1);
    assert_eq!(app.events_of(&id).await.len(), 3);
}

#[tokio::test]
async fn repeating_a_run_creation_with_its_idempotency_key_returns_the_same_run() {
    let app = app_with_agent().await;
    let user = app.user("user-1", Tier::Free);
    let before = app.event_count().await;
    let mut answers = vec![];
    for _ in 0..2 {
        let r = app
            .post_with(
                "/v1/instances",
                &user,
                json!({"agent_id": "triage", "input": "analyse my spend"}),
                &[("Idempotency-Key", "create-1")],
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let replayed = r.headers().get("idempotent-replayed").cloned();
        answers.push((replayed, json_body(r).await));
    }
    assert_eq!(answers[0].0, None);
    assert_eq!(answers[1].0.as_ref().unwrap(), "true");
    assert_eq!(answers[1].1, answers[0].1);
    assert_eq!(answers[0].1["sequence"], 1);
    assert_eq!(app.instance_count().await, 1);
    assert_eq!(app.event_count().await, before + 1);
}

#[tokio::test]
async fn reusing_an_idempotency_key_for_another_request_is_refused() {
    let app = app_with_agent().await;
    let user = app.user("user-1", Tier::Free);
    let id = app.running_instance(&user, "triage").await;
    let other = app.running_instance(&user, "triage").await;
    let runner = app.runner();
    let key = [("Idempotency-Key", "key-1")];
    let r = app
        .post_with(
            &runner_path(&id, "thoughts"),
            &runner,
            json!({"thought": "a"}),
            &key,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);

    let before = app.event_count().await;
    // Another body on the same route.
    let r = app
        .post_with(
            &runner_path(&id, "thoughts"),
            &runner,
            json!({"thought": "b"}),
            &key,
        )
        .await;
    assert_refused(
        &app,
        before,
        r,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    // The same body on another run.
    let r = app
        .post_with(
            &runner_path(&other, "thoughts"),
            &runner,
            json!({"thought": "a"}),
            &key,
        )
        .await;
    assert_refused(
        &app,
        before,
        r,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    // Keys belong to their principal: another principal may use the same key.
    let r = app
        .post_with(
            &format!("/v1/instances/{other}/cancel"),
            &user,
            json!({}),
            &key,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(app.event_count().await, before + 1);
}

/// Sends `body` to `path` ten times at once with one idempotency key; returns
/// `(status, replayed, body)` of each answer.
async fn ten_at_once(
    app: Arc<TestApp>,
    path: String,
    token: String,
    body: Value,
) -> Vec<(StatusCode, bool, Value)> {
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (app, path, token, body) = (app.clone(), path.clone(), token.clone(), body.clone());
            tokio::spawn(async move {
                let r = app
                    .post_with(&path, &token, body, &[("Idempotency-Key", "same-key")])
                    .await;
                let status = r.status();
                let replayed = r.headers().get("idempotent-replayed").is_some();
                (status, replayed, r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

fn assert_one_answer(answers: &[(StatusCode, bool, Value)], status: StatusCode) {
    for (actual, _, body) in answers {
        assert_eq!(*actual, status, "{body}");
        assert_eq!(
            body, &answers[0].2,
            "different answers to one idempotency key"
        );
    }
    let originals = answers.iter().filter(|(_, replayed, _)| !replayed).count();
    assert_eq!(
        originals, 1,
        "exactly one answer is the original, the others replays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_concurrent_creations_with_one_idempotency_key_create_one_run() {
    let app = Arc::new(app_with_agent().await);
    let token = app.user("user-1", Tier::Free);
    let before = app.event_count().await;
    let answers = ten_at_once(
        app.clone(),
        "/v1/instances".to_owned(),
        token,
        json!({"agent_id": "triage", "input": "analyse my spend"}),
    )
    .await;
    assert_one_answer(&answers, StatusCode::CREATED);
    assert_eq!(app.event_count().await, before + 1);
    assert_eq!(app.instance_count().await, 1);
    let id = answers[0].2["instance_id"].as_str().unwrap();
    assert_eq!(app.events_of(id).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_concurrent_repeats_of_a_step_with_one_idempotency_key_append_it_once() {
    let app = Arc::new(app_with_agent().await);
    let id = app
        .running_instance(&app.user("user-1", Tier::Free), "triage")
        .await;
    let before = app.event_count().await;
    let answers = ten_at_once(
        app.clone(),
        runner_path(&id, "thoughts"),
        app.runner(),
        json!({"thought": "once"}),
    )
    .await;
    assert_one_answer(&answers, StatusCode::OK);
    assert_eq!(answers[0].2, json!({"instance_id": id, "sequence": 3}));
    assert_eq!(app.event_count().await, before + 1);
}

#[tokio::test]
async fn each_app_writes_to_its_own_fresh_database() {
    let first = app_with_agent().await;
    let second = spawn_app().await;
    let names = [
        &first.settings.database.name,
        &second.settings.database.name,
    ];
    assert_ne!(names[0], names[1]);
    let mut server = crate::helpers::server_connection(&first.settings).await;
    for name in names {
        assert!(name.starts_with("apex_test_"));
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(name)
                .fetch_one(&mut server)
                .await
                .unwrap();
        assert!(exists, "{name} does not exist");
    }
    assert_eq!(first.event_count().await, 2);
    assert_eq!(second.event_count().await, 0);
}
