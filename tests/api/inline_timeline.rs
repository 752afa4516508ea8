//! The chat timeline is written by the append itself (an inline projection): no projector runs
//! in these tests, and a step is in the timeline as soon as its command is answered.

use apex_domain::Tier;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

fn timeline_path(id: &str) -> String {
    format!("/v1/instances/{id}/timeline")
}

#[tokio::test]
async fn a_step_is_in_the_timeline_as_soon_as_its_command_is_answered() {
    let app = spawn_app().await;
    app.active_agent("triage", &["search"], &["free"]).await;
    let alice = app.user("alice", Tier::Free);
    let id = app.running_instance(&alice, "triage").await;
    let r = app.think(&id, "reading the invoices").await;
    assert_eq!(r.status(), StatusCode::OK);

    let page = get_ok(&app, &timeline_path(&id), &alice).await;
    let steps: Vec<(i64, &str)> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["sequence"].as_i64().unwrap(), s["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [
            (1, "instance_created"),
            (2, "agent_started"),
            (3, "agent_thinking")
        ]
    );
    assert_eq!(
        page["items"][2]["display"],
        json!({ "thought": "reading the invoices" })
    );
    // Each row was written by its event's transaction: same run, sequence and time.
    let mismatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events e
           FULL JOIN rm_timeline t ON t.instance_id::text = e.aggregate_id AND t.sequence = e.sequence
          WHERE e.aggregate_type = 'instance' AND (t.at IS DISTINCT FROM e.recorded_at OR t.owner_id <> 'alice')
             OR e.event_id IS NULL",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(mismatched, 0);
    // Another user does not see it.
    let bob = app.user("bob", Tier::Free);
    let r = get(&app, &timeline_path(&id), &bob).await;
    assert_error(r, StatusCode::NOT_FOUND, "instance_not_found").await;
}

/// A step whose timeline row cannot be written (its run's creation row is gone, so it has no
/// owner) is refused as a whole: the event is not stored without its step.
#[tokio::test]
async fn an_append_whose_timeline_row_cannot_be_written_stores_nothing() {
    let app = spawn_app().await;
    app.active_agent("triage", &["search"], &["free"]).await;
    let alice = app.user("alice", Tier::Free);
    let id = app.running_instance(&alice, "triage").await;
    sqlx::query("DELETE FROM rm_timeline WHERE instance_id = $1::uuid AND sequence = 1")
        .bind(&id)
        .execute(&app.pool)
        .await
        .unwrap();
    let before = app.event_count().await;

    let r = app.think(&id, "lost").await;
    assert_error(r, StatusCode::INTERNAL_SERVER_ERROR, "internal_error").await;

    assert_eq!(app.event_count().await, before);
    let steps: i64 =
        sqlx::query_scalar("SELECT count(*) FROM rm_timeline WHERE instance_id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(steps, 1, "only the start is left");
}
