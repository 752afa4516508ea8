//! Per-principal rate limits on command routes: beyond its burst a principal is answered
//! `429 rate_limited` with `Retry-After`, nothing is stored, and nobody else is affected.

use std::time::{Duration, Instant};

use apex::config::Settings;
use apex_domain::Tier;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{self, Fuzzed};
use crate::helpers::{assert_error, assert_refused};

/// Users: 1 command per second, 3 at once; runners: 10 per second, 40 at once.
fn tight(settings: &mut Settings) {
    settings.rate_limit.commands_per_second = 1;
    settings.rate_limit.burst = 3;
    settings.rate_limit.runner_commands_per_second = 10;
    settings.rate_limit.runner_burst = 40;
}

async fn app() -> Fuzzed {
    let fuzzed = harness::spawn(tight, false).await;
    // Set up as the admin spends tokens: let the admin's bucket refill before the test.
    fuzzed
        .app
        .active_agent("triage", &["search"], &["free"])
        .await;
    fuzzed
}

fn create() -> serde_json::Value {
    json!({"agent_id": "triage", "input": "hi"})
}

#[tokio::test]
async fn a_user_beyond_their_burst_gets_429_with_retry_after_and_nothing_is_stored() {
    let fuzzed = app().await;
    let app = &fuzzed.app;
    let alice = app.user("alice", Tier::Free);
    for _ in 0..3 {
        let r = app.post("/v1/instances", &alice, create()).await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let before = app.event_count().await;
    let r = app.post("/v1/instances", &alice, create()).await;
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    assert_refused(
        app,
        before,
        r,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
    )
    .await;
    // Every write route counts, whatever it would have answered; reads are not limited.
    let r = app
        .post_raw(
            "/v1/instances",
            &alice,
            Some("application/json"),
            "not json",
        )
        .await;
    assert_error(r, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    let r = app
        .client
        .get(app.url("/v1/instances"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // After Retry-After, Alice may send again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let r = app.post("/v1/instances", &alice, create()).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    fuzzed.stop().await;
}

#[tokio::test]
async fn one_principal_at_its_limit_does_not_slow_down_others() {
    let fuzzed = app().await;
    let app = &fuzzed.app;
    let alice = app.user("alice", Tier::Free);
    let bob = app.user("bob", Tier::Free);
    let mut refused = 0;
    for _ in 0..10 {
        let r = app.post("/v1/instances", &alice, create()).await;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            refused += 1;
        }
    }
    assert!(refused >= 6, "only {refused} of 10 refused");
    // Bob is unaffected; the same sub with another tier is the same principal, still limited.
    let r = app.post("/v1/instances", &bob, create()).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let alice_enterprise = app.user("alice", Tier::Enterprise);
    let r = app.post("/v1/instances", &alice_enterprise, create()).await;
    assert_error(r, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    fuzzed.stop().await;
}

#[tokio::test]
async fn the_runner_has_its_own_higher_limit() {
    let fuzzed = app().await;
    let app = &fuzzed.app;
    let user = app.user("alice", Tier::Free);
    let id = app.running_instance(&user, "triage").await;
    let started = Instant::now();
    let mut accepted = 0;
    let mut refused = false;
    for i in 0..500 {
        let r = app.think(&id, &format!("thought {i}")).await;
        match r.status() {
            StatusCode::OK => accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                refused = true;
                break;
            }
            other => panic!("{other}"),
        }
    }
    assert!(refused, "the runner was never limited");
    // Far beyond a user's burst: its 40 at once (minus the start already taken), plus what
    // refilled at 10 per second meanwhile.
    let refilled = (started.elapsed().as_secs_f64() * 10.0).ceil() as i32;
    assert!(
        (39..=39 + refilled).contains(&accepted),
        "{accepted} accepted in {:?}",
        started.elapsed()
    );
    let thoughts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'ThoughtRecorded'",
    )
    .bind(&id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(thoughts, i64::from(accepted));
    fuzzed.stop().await;
}
