//! What the generated requests found, pinned as plain tests: the NUL character, undecodable
//! path parameters and unsupported methods are client errors with the envelope, never a 500
//! or a bare framework answer, and they store nothing.

use apex_domain::Tier;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness;
use crate::helpers::{assert_error, assert_refused};

#[tokio::test]
async fn a_nul_character_in_a_command_is_refused_and_stores_nothing() {
    let fuzzed = harness::spawn(harness::lift_rate_limits, false).await;
    let app = &fuzzed.app;
    app.active_agent("triage", &["search"], &["free"]).await;
    let user = app.user("user-1", Tier::Free);
    let id = app.running_instance(&user, "triage").await;
    let before = app.event_count().await;
    let runner = format!("/v1/runner/instances/{id}");
    let commands = [
        (
            "/v1/instances".to_owned(),
            user.clone(),
            json!({"agent_id": "triage", "input": "a\u{0}b"}),
        ),
        (
            format!("{runner}/thoughts"),
            app.runner(),
            json!({"thought": "\u{0}"}),
        ),
        (
            format!("{runner}/thoughts"),
            app.runner(),
            json!({"thought": "ok", "raw": {"key\u{0}": 1}}),
        ),
        (
            format!("{runner}/fail"),
            app.runner(),
            json!({"error": "x\u{0}"}),
        ),
        (
            "/v1/admin/agents".to_owned(),
            app.admin(),
            json!({"id": "nul", "display_name": "N\u{0}L", "tiers": ["free"]}),
        ),
    ];
    for (path, token, body) in commands {
        let r = app.post(&path, &token, body).await;
        assert_refused(
            app,
            before,
            r,
            StatusCode::UNPROCESSABLE_ENTITY,
            "field_invalid",
        )
        .await;
    }
    fuzzed.stop().await;
}

#[tokio::test]
async fn a_nul_character_in_a_path_or_query_parameter_is_a_client_error() {
    let fuzzed = harness::spawn(harness::lift_rate_limits, false).await;
    let app = &fuzzed.app;
    let admin = app.admin();
    for path in [
        "/v1/admin/users/a%00b/usage",
        "/v1/admin/instances?agent_id=%00",
        "/v1/audit/events?event_type=%00",
        "/v1/audit/instance/x%00/events",
    ] {
        let r = app
            .client
            .get(app.url(path))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_error(r, StatusCode::BAD_REQUEST, "invalid_text").await;
    }
    fuzzed.stop().await;
}

#[tokio::test]
async fn undecodable_paths_and_unsupported_methods_answer_with_the_envelope() {
    let fuzzed = harness::spawn(harness::lift_rate_limits, false).await;
    let app = &fuzzed.app;
    let user = app.user("user-1", Tier::Free);
    for path in ["/v1/instances/%FF", "/v1/instances/%C3%28/timeline"] {
        let r = app
            .client
            .get(app.url(path))
            .bearer_auth(&user)
            .send()
            .await
            .unwrap();
        assert_error(r, StatusCode::BAD_REQUEST, "invalid_path").await;
    }
    let r = app
        .post("/v1/runner/instances/%FF/start", &app.runner(), json!({}))
        .await;
    assert_error(r, StatusCode::BAD_REQUEST, "invalid_path").await;

    let r = app
        .client
        .delete(app.url("/v1/instances"))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    let allow = r.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    assert_error(r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    assert_eq!(app.event_count().await, 0);
    fuzzed.stop().await;
}
