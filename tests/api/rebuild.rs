//! `POST /v1/admin/projections/{name}/rebuild`: admin only, one rebuild per read model at a
//! time (409 while one runs, in any process), and its runs reported by
//! `GET /v1/admin/projections`. No projector runs here: the rebuild alone fills the read model
//! from the events the commands stored.

use std::time::Duration;

use apex_domain::{ActorRole, Tier};
use apex_projections::ReadModel;
use apex_projections::rebuild;
use reqwest::StatusCode;
use serde_json::Value;

use crate::audit::{seed, settle};
use crate::helpers::{TestApp, assert_error, get_ok, spawn_app};

async fn post_rebuild(app: &TestApp, name: &str, token: &str) -> reqwest::Response {
    app.client
        .post(app.url(&format!("/v1/admin/projections/{name}/rebuild")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// The latest rebuild of `name` in `GET /v1/admin/projections`.
async fn latest(app: &TestApp, name: &str) -> Option<Value> {
    let status = get_ok(app, "/v1/admin/projections", &app.admin()).await;
    status["rebuilds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["projection"] == name)
        .cloned()
}

/// Waits until the latest rebuild of `name` is no longer running.
async fn finished(app: &TestApp, name: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(run) = latest(app, name).await
            && run["status"] != "running"
        {
            return run;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rebuild of {name} never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_rebuild_runs_in_the_background_and_fills_the_read_model_from_the_store() {
    let app = spawn_app().await;
    let ids = seed(&app, 2).await;
    // A rebuild replays the events of finished transactions (the live projector gets the rest).
    settle(&app).await;
    assert_eq!(latest(&app, "instances").await, None);
    let r = post_rebuild(&app, "instances", &app.admin()).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["projection"], "instances");
    assert_eq!(body["status"], "started");
    let run = finished(&app, "instances").await;
    assert_eq!(run["id"], body["rebuild_id"]);
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["events"], 14);
    assert_eq!(run["error"], Value::Null);
    assert!(run["started_at"].is_string() && run["finished_at"].is_string());

    let runs = get_ok(&app, "/v1/admin/instances", &app.admin()).await;
    let mut listed: Vec<&str> = runs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance_id"].as_str().unwrap())
        .collect();
    listed.sort();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(listed, expected);
    assert!(
        runs["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["status"] == "completed")
    );
    let offsets: i64 =
        sqlx::query_scalar("SELECT count(*) FROM projector_offsets WHERE projector = 'instances'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        offsets, 2,
        "the live projector resumes from the rebuilt offsets"
    );
    let leftovers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'rebuild\\_%'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(leftovers, 0);

    // Every read model can be rebuilt; each reports its own latest run.
    for model in ReadModel::ALL {
        let r = post_rebuild(&app, model.name(), &app.admin()).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED, "{model}");
        assert_eq!(finished(&app, model.name()).await["status"], "succeeded");
    }
    let status = get_ok(&app, "/v1/admin/projections", &app.admin()).await;
    let names: Vec<&str> = status["rebuilds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["projection"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["agent_stats", "agents", "instances", "timeline", "usage"]
    );
}

#[tokio::test]
async fn a_second_rebuild_of_the_same_read_model_is_refused_while_one_runs() {
    let app = spawn_app().await;
    seed(&app, 1).await;
    settle(&app).await;
    // A rebuild started elsewhere (the CLI, another replica) holds the lock.
    let elsewhere = rebuild::try_start(&app.pool, ReadModel::Timeline)
        .await
        .unwrap();
    let running = latest(&app, "timeline").await.unwrap();
    assert_eq!(running["status"], "running");
    assert_eq!(running["id"], elsewhere.run_id());
    let r = post_rebuild(&app, "timeline", &app.admin()).await;
    assert_error(r, StatusCode::CONFLICT, "rebuild_in_progress").await;
    assert!(matches!(
        rebuild::rebuild(&app.pool, ReadModel::Timeline, |_| {}).await,
        Err(rebuild::RebuildError::AlreadyRunning("timeline"))
    ));
    // Another read model is not blocked.
    let r = post_rebuild(&app, "usage", &app.admin()).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    let events = elsewhere.run(|_| {}).await.unwrap();
    assert_eq!(events, 7);
    assert_eq!(
        latest(&app, "timeline").await.unwrap()["status"],
        "succeeded"
    );
    let r = post_rebuild(&app, "timeline", &app.admin()).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(finished(&app, "timeline").await["status"], "succeeded");
}

#[tokio::test]
async fn a_rebuild_whose_process_died_reads_as_interrupted_and_does_not_block() {
    let app = spawn_app().await;
    let abandoned = rebuild::try_start(&app.pool, ReadModel::Agents)
        .await
        .unwrap();
    drop(abandoned); // the connection closes, releasing the lock
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while latest(&app, "agents").await.unwrap()["status"] != "interrupted" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still reported running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = post_rebuild(&app, "agents", &app.admin()).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(finished(&app, "agents").await["status"], "succeeded");
    let stale: (String, Option<String>) =
        sqlx::query_as("SELECT status, error FROM projection_rebuilds ORDER BY id LIMIT 1")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(stale.0, "failed");
    assert!(stale.1.unwrap().contains("interrupted"));
}

#[tokio::test]
async fn only_admins_may_rebuild_and_only_known_read_models() {
    let app = spawn_app().await;
    let auditor = app.token("auditor-1", ActorRole::Auditor, None);
    for token in [app.user("user-1", Tier::Free), app.runner(), auditor] {
        let r = post_rebuild(&app, "instances", &token).await;
        assert_error(r, StatusCode::FORBIDDEN, "role_not_allowed").await;
    }
    let r = app
        .client
        .post(app.url("/v1/admin/projections/instances/rebuild"))
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::UNAUTHORIZED, "missing_token").await;
    for name in ["nope", "rm_instances", "Instances"] {
        let r = post_rebuild(&app, name, &app.admin()).await;
        assert_error(r, StatusCode::NOT_FOUND, "projection_not_found").await;
    }
    assert_eq!(latest(&app, "instances").await, None);
}
