//! The query API: what users and admins read from the read models.
//!
//! No projector runs here: each test writes the `rm_*` rows (and the pipeline's bookkeeping)
//! directly, so it checks the queries alone, independent of the bus.

use std::collections::BTreeSet;

use apex_domain::Tier;
use chrono::{DateTime, Duration, SecondsFormat, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, assert_error, get, get_ok, spawn_app};

/// Internal detail planted in every run; no user answer may contain it.
const SECRET: &str = "internal-prompt-do-not-show";

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

async fn insert_agent(app: &TestApp, id: &str, status: &str, tiers: &[&str]) {
    sqlx::query(
        "INSERT INTO rm_agents (agent_id, display_name, description, tools, tiers, status,
                                version, created_at, updated_at)
         VALUES ($1, $2, 'helps', $3, $4, $5, 3, now(), now())",
    )
    .bind(id)
    .bind(format!("Agent {id}"))
    .bind(json!(["search", "sql"]))
    .bind(tiers)
    .bind(status)
    .execute(&app.pool)
    .await
    .unwrap();
}

/// A run summary as the instances projector writes it; returns its id.
async fn insert_instance(
    app: &TestApp,
    owner: &str,
    agent: &str,
    status: &str,
    created_at: DateTime<Utc>,
) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO rm_instances (instance_id, owner_id, agent_id, agent_version, thread_id,
                                   status, input, created_at, updated_at, last_sequence,
                                   thought_count, last_message, last_internal)
         VALUES ($1, $2, $3, 1, $4, $5, 'analyse my spend', $6, $6, 3, 1, 'thinking', $7)",
    )
    .bind(id)
    .bind(owner)
    .bind(agent)
    .bind(format!("thread-{id}"))
    .bind(status)
    .bind(created_at)
    .bind(json!({ "prompt": SECRET }))
    .execute(&app.pool)
    .await
    .unwrap();
    id
}

/// `count` timeline steps (sequences 1..=count) of a run.
async fn insert_timeline(app: &TestApp, id: Uuid, owner: &str, count: i64) {
    for sequence in 1..=count {
        sqlx::query(
            "INSERT INTO rm_timeline (instance_id, sequence, owner_id, kind, at, display)
             VALUES ($1, $2, $3, 'agent_thinking', now(), $4)",
        )
        .bind(id)
        .bind(sequence)
        .bind(owner)
        .bind(json!({ "thought": format!("step {sequence}") }))
        .execute(&app.pool)
        .await
        .unwrap();
    }
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Follows `next_cursor` from `path` (which already has a `?`) and returns every page.
async fn all_pages(app: &TestApp, path: &str, token: &str) -> Vec<Value> {
    let mut pages = vec![get_ok(app, path, token).await];
    while let Some(cursor) = pages.last().unwrap()["next_cursor"].as_str() {
        let next = get_ok(app, &format!("{path}&cursor={cursor}"), token).await;
        pages.push(next);
        assert!(pages.len() < 20, "pagination does not end");
    }
    pages
}

#[tokio::test]
async fn the_catalogue_lists_only_active_agents_open_to_the_callers_tier() {
    let app = spawn_app().await;
    insert_agent(&app, "budget", "active", &["free", "mid"]).await;
    insert_agent(&app, "audit", "active", &["enterprise"]).await;
    insert_agent(&app, "draft-one", "draft", &["free"]).await;
    insert_agent(&app, "switched-off", "disabled", &["free"]).await;
    insert_agent(&app, "old", "retired", &["free"]).await;

    let free = get_ok(&app, "/v1/agents", &app.user("user-1", Tier::Free)).await;
    assert_eq!(
        free,
        json!({"items": [{
            "id": "budget", "display_name": "Agent budget", "description": "helps",
            "tools": ["search", "sql"], "version": 3,
        }]})
    );
    let enterprise = get_ok(&app, "/v1/agents", &app.user("user-2", Tier::Enterprise)).await;
    let names: Vec<&str> = enterprise["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["audit"]);
    let early = get_ok(&app, "/v1/agents", &app.user("user-3", Tier::Early)).await;
    assert_eq!(early, json!({"items": []}));
}

#[tokio::test]
async fn a_user_sees_only_their_own_runs() {
    let app = spawn_app().await;
    let now = Utc::now();
    let mine_1 = insert_instance(&app, "user-1", "budget", "running", now).await;
    let mine_2 = insert_instance(&app, "user-1", "budget", "pending", now).await;
    let theirs = insert_instance(&app, "user-2", "budget", "running", now).await;
    insert_timeline(&app, mine_1, "user-1", 3).await;
    insert_timeline(&app, theirs, "user-2", 3).await;
    let me = app.user("user-1", Tier::Free);

    let list = get_ok(&app, "/v1/instances", &me).await;
    let listed: BTreeSet<String> = ids(&list).into_iter().collect();
    let expected: BTreeSet<String> = [mine_1, mine_2].iter().map(Uuid::to_string).collect();
    assert_eq!(listed, expected);
    assert_eq!(list["next_cursor"], Value::Null);

    let one = get_ok(&app, &format!("/v1/instances/{mine_1}"), &me).await;
    assert_eq!(one["instance_id"], mine_1.to_string());
    assert_eq!(one["status"], "running");
    assert_eq!(one["agent_id"], "budget");
    assert_eq!(one["thought_count"], 1);
    let timeline = get_ok(&app, &format!("/v1/instances/{mine_1}/timeline"), &me).await;
    assert_eq!(timeline["items"].as_array().unwrap().len(), 3);

    // Another user's run, an unknown run and a non-UUID answer alike.
    for path in [
        format!("/v1/instances/{theirs}"),
        format!("/v1/instances/{theirs}/timeline"),
        format!("/v1/instances/{}", Uuid::new_v4()),
        format!("/v1/instances/{}/timeline", Uuid::new_v4()),
        "/v1/instances/not-a-uuid".to_owned(),
        "/v1/instances/not-a-uuid/timeline".to_owned(),
    ] {
        let r = get(&app, &path, &me).await;
        assert_error(r, StatusCode::NOT_FOUND, "instance_not_found").await;
    }
}

#[tokio::test]
async fn a_run_known_to_the_timeline_before_its_summary_is_visible_to_its_owner() {
    let app = spawn_app().await;
    let id = Uuid::new_v4();
    insert_timeline(&app, id, "user-1", 1).await;
    let timeline = get_ok(
        &app,
        &format!("/v1/instances/{id}/timeline"),
        &app.user("user-1", Tier::Free),
    )
    .await;
    assert_eq!(timeline["items"][0]["sequence"], 1);
    let r = get(
        &app,
        &format!("/v1/instances/{id}/timeline"),
        &app.user("user-2", Tier::Free),
    )
    .await;
    assert_error(r, StatusCode::NOT_FOUND, "instance_not_found").await;
}

#[tokio::test]
async fn paging_seven_runs_three_at_a_time_returns_each_once_newest_first() {
    let app = spawn_app().await;
    let base = Utc::now() - Duration::hours(1);
    let mut expected = vec![];
    for minute in [0, 1, 2, 3, 3, 3, 5] {
        // Three runs share a creation time: the id breaks the tie.
        let at = base + Duration::minutes(minute);
        let id = insert_instance(&app, "user-1", "budget", "completed", at).await;
        expected.push((at, id));
    }
    insert_instance(&app, "user-2", "budget", "completed", base).await;
    expected.sort_by(|a, b| b.cmp(a));
    let expected: Vec<String> = expected.iter().map(|(_, id)| id.to_string()).collect();
    let me = app.user("user-1", Tier::Free);

    let first = get_ok(&app, "/v1/instances?limit=3", &me).await;
    assert_eq!(ids(&first), expected[..3]);
    // A run created while paging sorts before the cursor: it neither shifts nor repeats a page.
    let newest = insert_instance(&app, "user-1", "budget", "pending", Utc::now()).await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = get_ok(&app, &format!("/v1/instances?limit=3&cursor={cursor}"), &me).await;
    assert_eq!(ids(&second), expected[3..6]);
    let cursor = second["next_cursor"].as_str().unwrap();
    let third = get_ok(&app, &format!("/v1/instances?limit=3&cursor={cursor}"), &me).await;
    assert_eq!(ids(&third), expected[6..]);
    assert_eq!(third["next_cursor"], Value::Null);

    // From the start again, the new run comes first and all eight come exactly once.
    let pages = all_pages(&app, "/v1/instances?limit=3", &me).await;
    let all: Vec<String> = pages.iter().flat_map(ids).collect();
    assert_eq!(all.len(), 8);
    assert_eq!(all[0], newest.to_string());
    assert_eq!(all[1..], expected[..]);
    // Without a limit, 50 per page.
    let all_at_once = get_ok(&app, "/v1/instances", &me).await;
    assert_eq!(ids(&all_at_once), all);
}

#[tokio::test]
async fn status_and_agent_filters_narrow_a_users_runs() {
    let app = spawn_app().await;
    let now = Utc::now();
    let running_budget = insert_instance(&app, "user-1", "budget", "running", now).await;
    let failed_budget = insert_instance(&app, "user-1", "budget", "failed", now).await;
    let running_audit = insert_instance(&app, "user-1", "audit", "running", now).await;
    insert_instance(&app, "user-2", "budget", "running", now).await;
    let me = app.user("user-1", Tier::Free);
    let set = |ids: Vec<String>| ids.into_iter().collect::<BTreeSet<_>>();
    let of = |list: &[Uuid]| list.iter().map(Uuid::to_string).collect::<BTreeSet<_>>();

    let running = get_ok(&app, "/v1/instances?status=running", &me).await;
    assert_eq!(set(ids(&running)), of(&[running_budget, running_audit]));
    let budget = get_ok(&app, "/v1/instances?agent_id=budget", &me).await;
    assert_eq!(set(ids(&budget)), of(&[running_budget, failed_budget]));
    let both = get_ok(&app, "/v1/instances?agent_id=budget&status=failed", &me).await;
    assert_eq!(set(ids(&both)), of(&[failed_budget]));
    let none = get_ok(&app, "/v1/instances?status=cancelled", &me).await;
    assert_eq!(none, json!({"items": [], "next_cursor": null}));
}

#[tokio::test]
async fn the_timeline_pages_by_sequence() {
    let app = spawn_app().await;
    let id = insert_instance(&app, "user-1", "budget", "running", Utc::now()).await;
    insert_timeline(&app, id, "user-1", 5).await;
    let me = app.user("user-1", Tier::Free);
    let path = format!("/v1/instances/{id}/timeline");
    let sequences = |page: &Value| -> Vec<i64> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["sequence"].as_i64().unwrap())
            .collect()
    };

    let page = get_ok(&app, &format!("{path}?after_sequence=1&limit=2"), &me).await;
    assert_eq!(sequences(&page), [2, 3]);
    assert_eq!(page["next_after_sequence"], 3);
    assert_eq!(page["items"][0]["kind"], "agent_thinking");
    assert_eq!(page["items"][0]["display"], json!({"thought": "step 2"}));
    assert!(page["items"][0]["at"].is_string());
    let page = get_ok(&app, &format!("{path}?after_sequence=3&limit=2"), &me).await;
    assert_eq!(sequences(&page), [4, 5]);
    assert_eq!(page["next_after_sequence"], Value::Null);
    let page = get_ok(&app, &format!("{path}?after_sequence=5"), &me).await;
    assert_eq!(page, json!({"items": [], "next_after_sequence": null}));
    let page = get_ok(&app, &path, &me).await;
    assert_eq!(sequences(&page), [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn no_user_answer_carries_internal_detail() {
    let app = spawn_app().await;
    insert_agent(&app, "budget", "active", &["free"]).await;
    let id = insert_instance(&app, "user-1", "budget", "running", Utc::now()).await;
    insert_timeline(&app, id, "user-1", 2).await;
    let me = app.user("user-1", Tier::Free);
    for path in [
        "/v1/agents".to_owned(),
        "/v1/instances".to_owned(),
        format!("/v1/instances/{id}"),
        format!("/v1/instances/{id}/timeline"),
    ] {
        let text = get(&app, &path, &me).await.text().await.unwrap();
        for forbidden in ["last_internal", "internal", SECRET, "owner_id", "prompt"] {
            assert!(
                !text.contains(forbidden),
                "GET {path} shows {forbidden}: {text}"
            );
        }
    }
    // The admin does see it.
    let admin = get_ok(&app, "/v1/admin/instances", &app.admin()).await;
    assert_eq!(
        admin["items"][0]["last_internal"],
        json!({"prompt": SECRET})
    );
    assert_eq!(admin["items"][0]["owner_id"], "user-1");
}

#[tokio::test]
async fn admin_filters_runs_by_user_agent_status_and_time() {
    let app = spawn_app().await;
    let t0 = Utc::now() - Duration::days(3);
    let at = |days: i64| t0 + Duration::days(days);
    let a = insert_instance(&app, "user-1", "budget", "completed", at(0)).await;
    let b = insert_instance(&app, "user-1", "audit", "running", at(1)).await;
    let c = insert_instance(&app, "user-2", "budget", "running", at(2)).await;
    let d = insert_instance(&app, "user-3", "budget", "failed", at(3)).await;
    let admin = app.admin();
    let query = |q: &str| format!("/v1/admin/instances?{q}");
    let of = |list: &[Uuid]| list.iter().map(Uuid::to_string).collect::<Vec<_>>();

    let all = get_ok(&app, "/v1/admin/instances", &admin).await;
    assert_eq!(ids(&all), of(&[d, c, b, a]));
    let user = get_ok(&app, &query("user_id=user-1"), &admin).await;
    assert_eq!(ids(&user), of(&[b, a]));
    let agent = get_ok(&app, &query("agent_id=budget"), &admin).await;
    assert_eq!(ids(&agent), of(&[d, c, a]));
    let status = get_ok(&app, &query("status=running"), &admin).await;
    assert_eq!(ids(&status), of(&[c, b]));
    // `from` is inclusive, `to` exclusive.
    let range = format!("from={}&to={}", rfc3339(at(1)), rfc3339(at(3)));
    let window = get_ok(&app, &query(&range), &admin).await;
    assert_eq!(ids(&window), of(&[c, b]));
    let since = get_ok(&app, &query(&format!("from={}", rfc3339(at(2)))), &admin).await;
    assert_eq!(ids(&since), of(&[d, c]));
    let combined = format!("agent_id=budget&status=running&to={}", rfc3339(at(3)));
    let combined = get_ok(&app, &query(&combined), &admin).await;
    assert_eq!(ids(&combined), of(&[c]));

    // Paged, filters and all.
    let pages = all_pages(&app, &query("agent_id=budget&limit=2"), &admin).await;
    assert_eq!(pages.len(), 2);
    let paged: Vec<String> = pages.iter().flat_map(ids).collect();
    assert_eq!(paged, of(&[d, c, a]));
    assert_eq!(all["items"][0]["owner_id"], "user-3");
    assert_eq!(all["items"][0]["status"], "failed");
}

#[tokio::test]
async fn admin_agents_carry_their_run_statistics() {
    let app = spawn_app().await;
    insert_agent(&app, "budget", "active", &["free"]).await;
    insert_agent(&app, "fresh", "draft", &["mid"]).await;
    insert_agent(&app, "idle", "disabled", &["free"]).await;
    sqlx::query(
        "INSERT INTO rm_agent_stats (agent_id, runs_total, pending, running, completed, failed,
                                     cancelled, tool_calls, finished_runs, total_duration_ms)
         VALUES ('budget', 10, 1, 2, 4, 2, 1, 17, 7, 7000),
                ('idle', 1, 1, 0, 0, 0, 0, 0, 0, 0)",
    )
    .execute(&app.pool)
    .await
    .unwrap();

    let list = get_ok(&app, "/v1/admin/agents", &app.admin()).await;
    let items = list["items"].as_array().unwrap();
    let names: Vec<&str> = items.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(names, ["budget", "fresh", "idle"]);
    assert_eq!(
        items[0]["stats"],
        json!({
            "runs_total": 10,
            "runs_by_status": {"pending": 1, "running": 2, "completed": 4, "failed": 2, "cancelled": 1},
            "tool_calls": 17,
            "average_duration_ms": 1000,
        })
    );
    assert_eq!(items[0]["status"], "active");
    assert_eq!(items[0]["tiers"], json!(["free"]));
    assert_eq!(items[1]["status"], "draft");
    assert_eq!(items[1]["stats"]["runs_total"], 0);
    assert_eq!(items[1]["stats"]["average_duration_ms"], Value::Null);
    assert_eq!(items[2]["stats"]["runs_by_status"]["pending"], 1);
    assert_eq!(items[2]["stats"]["average_duration_ms"], Value::Null);
}

#[tokio::test]
async fn admin_reads_everyones_usage_and_one_users() {
    let app = spawn_app().await;
    for (user, instances) in [("user-c", 3), ("user-a", 1), ("user-b", 2)] {
        sqlx::query(
            "INSERT INTO rm_usage (user_id, instances, completed, failed, cancelled, thoughts,
                                   tool_calls, first_seen_at, last_seen_at)
             VALUES ($1, $2, 1, 0, 0, 4, 5, now() - interval '1 day', now())",
        )
        .bind(user)
        .bind(instances)
        .execute(&app.pool)
        .await
        .unwrap();
    }
    let admin = app.admin();
    let pages = all_pages(&app, "/v1/admin/usage?limit=2", &admin).await;
    assert_eq!(pages.len(), 2);
    let users: Vec<&str> = pages
        .iter()
        .flat_map(|p| p["items"].as_array().unwrap())
        .map(|u| u["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["user-a", "user-b", "user-c"]);

    let one = get_ok(&app, "/v1/admin/users/user-b/usage", &admin).await;
    assert_eq!(one["user_id"], "user-b");
    assert_eq!(one["instances"], 2);
    assert_eq!(one["completed"], 1);
    assert_eq!(one["thoughts"], 4);
    assert_eq!(one["tool_calls"], 5);
    assert!(one["first_seen_at"].is_string() && one["last_seen_at"].is_string());
    let r = get(&app, "/v1/admin/users/nobody/usage", &admin).await;
    assert_error(r, StatusCode::NOT_FOUND, "user_not_found").await;
}

#[tokio::test]
async fn projections_report_lag_counters_dead_letters_and_the_relay() {
    let app = spawn_app().await;
    // Real events, so the head position is the store's.
    app.active_agent("budget", &["search"], &["free"]).await;
    app.active_agent("audit", &["search"], &["free"]).await;
    let head: i64 = sqlx::query_scalar("SELECT max(position) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO projector_status (projector, last_position, last_recorded_at,
                                       last_applied_at, processed_total, skipped_total,
                                       repaired_total, retried_total)
         VALUES ('agents', $1, now() - interval '30 seconds', now(), 4, 1, 0, 2),
                ('instances', $1 - 3, now() - interval '90 seconds', now(), 7, 0, 2, 0),
                ('timeline', 0, NULL, NULL, 0, 0, 0, 0)",
    )
    .bind(head)
    .execute(&app.pool)
    .await
    .unwrap();
    for projector in ["instances", "instances", "agents"] {
        sqlx::query(
            "INSERT INTO dead_letters (projector, routing_key, reason, body)
             VALUES ($1, 'instance.created', 'undecodable', '{}')",
        )
        .bind(projector)
        .execute(&app.pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO relay_checkpoints (name, position, published_total)
         VALUES ('main', $1 - 1, 41)",
    )
    .bind(head)
    .execute(&app.pool)
    .await
    .unwrap();

    let status = get_ok(&app, "/v1/admin/projections", &app.admin()).await;
    assert_eq!(status["head_position"], head);
    let projectors = status["projectors"].as_array().unwrap();
    let names: Vec<&str> = projectors
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["agents", "instances", "timeline"]);
    let (agents, instances, timeline) = (&projectors[0], &projectors[1], &projectors[2]);

    assert_eq!(agents["last_position"], head);
    assert_eq!(agents["lag_events"], 0);
    assert_eq!(agents["processed_total"], 4);
    assert_eq!(agents["skipped_total"], 1);
    assert_eq!(agents["retried_total"], 2);
    assert_eq!(agents["dead_letters"], 1);
    let seconds = agents["lag_seconds"].as_f64().unwrap();
    assert!((29.0..120.0).contains(&seconds), "{seconds}");

    assert_eq!(instances["last_position"], head - 3);
    assert_eq!(instances["lag_events"], 3);
    assert_eq!(instances["repaired_total"], 2);
    assert_eq!(instances["dead_letters"], 2);
    assert!(instances["lag_seconds"].as_f64().unwrap() >= 89.0);

    assert_eq!(timeline["lag_events"], head);
    assert_eq!(timeline["lag_seconds"], Value::Null);
    assert_eq!(timeline["dead_letters"], 0);

    let relays = status["relays"].as_array().unwrap();
    assert_eq!(relays.len(), 1);
    assert_eq!(relays[0]["name"], "main");
    assert_eq!(relays[0]["position"], head - 1);
    assert_eq!(relays[0]["published_total"], 41);
    assert_eq!(relays[0]["lag_events"], 1);
    assert!(relays[0]["updated_at"].is_string());
}

#[tokio::test]
async fn each_query_route_admits_only_its_role() {
    let app = spawn_app().await;
    let id = insert_instance(&app, "user-1", "budget", "running", Utc::now()).await;
    let user_routes = [
        "/v1/agents".to_owned(),
        "/v1/instances".to_owned(),
        format!("/v1/instances/{id}"),
        format!("/v1/instances/{id}/timeline"),
    ];
    let admin_routes = [
        "/v1/admin/agents",
        "/v1/admin/instances",
        "/v1/admin/usage",
        "/v1/admin/users/user-1/usage",
        "/v1/admin/projections",
    ];
    let (user, admin, runner) = (app.user("user-1", Tier::Free), app.admin(), app.runner());
    for path in &user_routes {
        for token in [&admin, &runner] {
            let r = get(&app, path, token).await;
            assert_error(r, StatusCode::FORBIDDEN, "role_not_allowed").await;
        }
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_error(r, StatusCode::UNAUTHORIZED, "missing_token").await;
    }
    for path in admin_routes {
        for token in [&user, &runner] {
            let r = get(&app, path, token).await;
            assert_error(r, StatusCode::FORBIDDEN, "role_not_allowed").await;
        }
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_error(r, StatusCode::UNAUTHORIZED, "missing_token").await;
    }
    // The role is checked before the parameters.
    let r = get(&app, "/v1/admin/instances?status=bogus", &user).await;
    assert_error(r, StatusCode::FORBIDDEN, "role_not_allowed").await;
}

#[tokio::test]
async fn bad_query_parameters_are_refused_as_invalid_query() {
    let app = spawn_app().await;
    let id = insert_instance(&app, "user-1", "budget", "running", Utc::now()).await;
    let (user, admin) = (app.user("user-1", Tier::Free), app.admin());
    let usage_cursor = {
        for u in ["user-a", "user-b"] {
            sqlx::query(
                "INSERT INTO rm_usage (user_id, instances, first_seen_at, last_seen_at)
                 VALUES ($1, 1, now(), now())",
            )
            .bind(u)
            .execute(&app.pool)
            .await
            .unwrap();
        }
        let page = get_ok(&app, "/v1/admin/usage?limit=1", &admin).await;
        page["next_cursor"].as_str().unwrap().to_owned()
    };
    let user_cases = [
        "/v1/instances?status=bogus".to_owned(),
        "/v1/instances?status=".to_owned(),
        "/v1/instances?limit=0".to_owned(),
        "/v1/instances?limit=201".to_owned(),
        "/v1/instances?limit=-1".to_owned(),
        "/v1/instances?limit=ten".to_owned(),
        "/v1/instances?cursor=not-a-cursor".to_owned(),
        format!("/v1/instances?cursor={usage_cursor}"),
        "/v1/instances?limit=5&limit=6".to_owned(),
        "/v1/instances?owner_id=user-2".to_owned(),
        "/v1/agents?tier=enterprise".to_owned(),
        format!("/v1/instances/{id}?verbose=true"),
        format!("/v1/instances/{id}/timeline?after_sequence=-1"),
        format!("/v1/instances/{id}/timeline?after_sequence=x"),
        format!("/v1/instances/{id}/timeline?limit=500"),
        format!("/v1/instances/{id}/timeline?cursor=abc"),
    ];
    for path in &user_cases {
        let r = get(&app, path, &user).await;
        assert_error(r, StatusCode::BAD_REQUEST, "invalid_query").await;
    }
    let admin_cases = [
        "/v1/admin/instances?from=yesterday".to_owned(),
        "/v1/admin/instances?to=2026-13-01T00:00:00Z".to_owned(),
        "/v1/admin/instances?from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z".to_owned(),
        "/v1/admin/instances?status=done".to_owned(),
        format!("/v1/admin/instances?cursor={usage_cursor}"),
        "/v1/admin/instances?limit=1000".to_owned(),
        "/v1/admin/instances?owner=user-1".to_owned(),
        "/v1/admin/usage?cursor=zz".to_owned(),
        "/v1/admin/usage?limit=0".to_owned(),
        "/v1/admin/usage?user_id=user-a".to_owned(),
        "/v1/admin/agents?status=active".to_owned(),
        "/v1/admin/users/user-a/usage?x=1".to_owned(),
        "/v1/admin/projections?verbose=1".to_owned(),
    ];
    for path in &admin_cases {
        let r = get(&app, path, &admin).await;
        assert_error(r, StatusCode::BAD_REQUEST, "invalid_query").await;
    }
    // Valid values of the same parameters pass.
    get_ok(&app, "/v1/instances?status=running&limit=200", &user).await;
    get_ok(
        &app,
        "/v1/admin/instances?from=2026-01-01T00:00:00Z",
        &admin,
    )
    .await;
    get_ok(
        &app,
        &format!("/v1/admin/usage?cursor={usage_cursor}"),
        &admin,
    )
    .await;
}
