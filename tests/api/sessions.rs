//! A transaction left open on one of Apex's connections is ended by PostgreSQL after
//! `database.idle_in_transaction_timeout_seconds`, so it can neither hold its locks nor hold
//! back the relay's snapshot horizon for long; the app goes on serving.

use std::time::Duration;

use apex_domain::Tier;
use uuid::Uuid;

use crate::helpers::{spawn_app_with, test_settings};

#[tokio::test]
async fn a_transaction_left_idle_is_ended_by_the_database_and_the_app_goes_on() {
    let mut settings = test_settings(&format!("apex_test_{}", Uuid::new_v4().simple()));
    settings.database.idle_in_transaction_timeout_seconds = 1;
    let app = spawn_app_with(settings).await;

    // A transaction that took a lock on `events` and then was forgotten.
    let mut forgotten = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *forgotten)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let err = sqlx::query("SELECT 1")
        .execute(&mut *forgotten)
        .await
        .expect_err("the idle transaction outlived the timeout");
    let message = err.to_string();
    assert!(
        message.contains("idle-in-transaction timeout") || matches!(err, sqlx::Error::Io(_)),
        "{message}"
    );
    drop(forgotten);

    // Its lock is gone: a command appends at once.
    app.active_agent("triage", &["search"], &["free"]).await;
    let user = app.user("user-1", Tier::Free);
    let run = tokio::time::timeout(
        Duration::from_secs(5),
        app.running_instance(&user, "triage"),
    )
    .await
    .expect("a command waited on the forgotten transaction's lock");
    assert!(!run.is_empty());
}
