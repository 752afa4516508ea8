//! Tamper evidence: the append-only triggers refuse changes to `events`; a DBA who bypasses
//! them (`session_replication_role = replica`) to edit a payload, delete an event or swap two
//! sequences is caught by the hash chain, both by `audit::verify` over the whole store and by
//! `GET /v1/audit/{type}/{id}/verify`, which name the aggregate and the first broken sequence.

use apex_projections::audit::{self, BreakKind, ChainBreak};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use crate::audit::{auditor, seed};
use crate::helpers::{TestApp, spawn_app};
use crate::helpers::{get, get_ok};

/// Runs `statements` in one transaction of a connection of its own, with the triggers
/// bypassed the way a superuser would.
async fn tamper(app: &TestApp, statements: &[String]) {
    let options = app.settings.database.options();
    let mut conn = PgConnection::connect_with(&options).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    for statement in statements {
        let done = sqlx::query(statement).execute(&mut *tx).await.unwrap();
        assert_eq!(done.rows_affected(), 1, "{statement}");
    }
    tx.commit().await.unwrap();
}

/// Verifies the whole store and one aggregate through the API; returns both answers.
async fn verify(app: &TestApp, id: &str) -> (Vec<ChainBreak>, Value) {
    let whole = audit::verify(&app.pool, None, |_| {}).await.unwrap();
    let path = format!("/v1/audit/instance/{id}/verify");
    (whole.breaks, get_ok(app, &path, &auditor(app)).await)
}

fn expected(id: &str, sequence: i64, kind: BreakKind) -> Vec<ChainBreak> {
    vec![ChainBreak {
        aggregate_type: "instance".to_owned(),
        aggregate_id: id.to_owned(),
        sequence,
        kind,
    }]
}

/// Three runs of 7 events; the middle one is the victim.
async fn store() -> (TestApp, Vec<String>) {
    let app = spawn_app().await;
    let ids = seed(&app, 3).await;
    (app, ids)
}

#[tokio::test]
async fn an_untouched_store_verifies_intact_and_the_triggers_refuse_changes() {
    let (app, ids) = store().await;
    let whole = audit::verify(&app.pool, None, |_| {}).await.unwrap();
    assert!(whole.intact(), "{:?}", whole.breaks);
    assert_eq!(whole.events_checked, 2 + 3 * 7);
    assert_eq!(whole.aggregates_checked, 4);
    let answer = get_ok(
        &app,
        &format!("/v1/audit/instance/{}/verify", ids[1]),
        &auditor(&app),
    )
    .await;
    assert_eq!(
        answer,
        json!({"aggregate_type": "instance", "aggregate_id": ids[1], "intact": true,
               "events_checked": 7, "first_break": null})
    );
    let agent = get_ok(&app, "/v1/audit/agent/budget/verify", &auditor(&app)).await;
    assert_eq!(agent["intact"], true);
    assert_eq!(agent["events_checked"], 2);

    for statement in [
        format!(
            "UPDATE events SET payload = '{{}}' WHERE aggregate_id = '{}'",
            ids[1]
        ),
        format!(
            "DELETE FROM events WHERE aggregate_id = '{}' AND sequence = 7",
            ids[1]
        ),
        "TRUNCATE events".to_owned(),
    ] {
        let err = sqlx::query(&statement)
            .execute(&app.pool)
            .await
            .unwrap_err();
        let code = err.as_database_error().and_then(|e| e.code()).unwrap();
        assert_eq!(code, "42501", "{statement}: {err}");
    }
    assert!(
        audit::verify(&app.pool, None, |_| {})
            .await
            .unwrap()
            .intact()
    );
}

#[tokio::test]
async fn an_edited_payload_is_detected_at_its_sequence() {
    let (app, ids) = store().await;
    let victim = &ids[1];
    tamper(
        &app,
        &[format!(
            "UPDATE events SET payload = jsonb_set(payload, '{{ThoughtRecorded,display,thought}}', '\"nothing to see\"')
              WHERE aggregate_id = '{victim}' AND sequence = 4"
        )],
    )
    .await;
    let (breaks, answer) = verify(&app, victim).await;
    assert_eq!(breaks, expected(victim, 4, BreakKind::HashMismatch));
    assert_eq!(answer["intact"], false);
    assert_eq!(
        answer["first_break"],
        json!({"sequence": 4, "kind": "hash_mismatch"})
    );
    // The other runs are intact.
    for other in [&ids[0], &ids[2]] {
        let path = format!("/v1/audit/instance/{other}/verify");
        assert_eq!(get_ok(&app, &path, &auditor(&app)).await["intact"], true);
    }
}

#[tokio::test]
async fn a_deleted_event_is_detected_as_a_missing_sequence() {
    let (app, ids) = store().await;
    let victim = &ids[1];
    tamper(
        &app,
        &[format!(
            "DELETE FROM events WHERE aggregate_id = '{victim}' AND sequence = 3"
        )],
    )
    .await;
    let (breaks, answer) = verify(&app, victim).await;
    assert_eq!(breaks, expected(victim, 3, BreakKind::MissingSequence));
    assert_eq!(answer["intact"], false);
    assert_eq!(answer["events_checked"], 6);
    assert_eq!(
        answer["first_break"],
        json!({"sequence": 3, "kind": "missing_sequence"})
    );
}

#[tokio::test]
async fn two_swapped_sequences_are_detected_at_the_first_of_them() {
    let (app, ids) = store().await;
    let victim = &ids[1];
    let set = |from: i64, to: i64| {
        format!(
            "UPDATE events SET sequence = {to} WHERE aggregate_id = '{victim}' AND sequence = {from}"
        )
    };
    tamper(&app, &[set(3, 1000), set(4, 3), set(1000, 4)]).await;
    let history = get_ok(
        &app,
        &format!("/v1/audit/instance/{victim}/events"),
        &auditor(&app),
    )
    .await;
    assert_eq!(
        history["items"].as_array().unwrap().len(),
        7,
        "still 7 events"
    );
    let (breaks, answer) = verify(&app, victim).await;
    assert_eq!(breaks, expected(victim, 3, BreakKind::HashMismatch));
    assert_eq!(
        answer["first_break"],
        json!({"sequence": 3, "kind": "hash_mismatch"})
    );
    assert_eq!(
        get_ok(&app, "/v1/audit/agent/budget/verify", &auditor(&app)).await["intact"],
        true
    );
    let r = get(&app, "/v1/audit/instance/nope/verify", &auditor(&app)).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}
