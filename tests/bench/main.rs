//! The benchmark harness in `--quick` mode: every scenario runs end to end against the real
//! PostgreSQL and RabbitMQ (own database, own exchanges and queues) and produces result rows
//! with a positive figure. Nothing about timing is asserted: that is what `apex bench` and
//! `docs/benchmarks.md` are for.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;

use apex::bench::{self, Options, Row, Scenario};
use apex::config::Settings;
use serde_json::Value;

fn settings() -> Settings {
    let text = include_str!("../../environments/dev/apex.toml");
    let vars = vec![
        ("APEX_DATABASE_PASSWORD".to_owned(), String::new()),
        ("APEX_AMQP_PASSWORD".to_owned(), "guest".to_owned()),
        (
            "APEX_JWT_SECRET".to_owned(),
            "apex-test-secret-0123456789-0123456789".to_owned(),
        ),
    ];
    Settings::from_toml(text, Path::new("dev"), vars).unwrap()
}

fn options() -> Options {
    Options {
        quick: true,
        apex_binary: Some(env!("CARGO_BIN_EXE_apex").into()),
    }
}

async fn quick(scenario: Scenario) -> Vec<Row> {
    let rows = bench::run(&settings(), scenario, &options()).await.unwrap();
    assert!(!rows.is_empty(), "{scenario:?} produced no row");
    for row in &rows {
        assert_eq!(row.scenario, scenario.name());
        assert!(
            row.result.is_finite() && row.result >= 0.0,
            "{scenario:?}: {} = {}",
            row.metric,
            row.result
        );
    }
    assert!(
        rows[0].result > 0.0,
        "{scenario:?}: {} = {}",
        rows[0].metric,
        rows[0].result
    );
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn the_write_scenario_prints_a_table_and_writes_json_with_its_ceiling() {
    let dir = std::env::temp_dir().join(format!("apex-bench-{}", uuid::Uuid::new_v4()));
    let out = dir.join("write.json");
    bench::main(&settings(), Scenario::Write, &options(), Some(out.clone()))
        .await
        .unwrap();
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(report["scenario"], "write");
    assert_eq!(report["quick"], true);
    let row = &report["rows"][0];
    assert_eq!(row["metric"], "commands/s");
    assert!(row["result"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["ceiling"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["ratio"].as_f64().unwrap() > 0.0, "{row}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_live_scenario_delivers_steps_to_sockets() {
    let rows = quick(Scenario::Live).await;
    let delivered = rows.iter().find(|r| r.metric == "delivered").unwrap();
    assert!(delivered.result > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_relay_scenario_publishes_a_backlog_against_a_bare_publish() {
    let rows = quick(Scenario::Relay).await;
    assert!(rows[0].ceiling.unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_project_scenario_streams_into_every_read_model() {
    let rows = quick(Scenario::Project).await;
    assert!(rows[0].ceiling.unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rebuild_scenario_replays_the_store_into_every_read_model() {
    let rows = quick(Scenario::Rebuild).await;
    assert!(rows[0].ceiling.unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_long_run_scenario_compares_a_long_run_with_short_ones() {
    let rows = quick(Scenario::LongRun).await;
    assert!(rows[0].ceiling.unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fan_out_scenario_delivers_to_every_socket_of_a_separate_replica() {
    let rows = quick(Scenario::FanOut).await;
    let memory = rows
        .iter()
        .find(|r| r.metric == "replica peak RSS")
        .unwrap();
    assert!(memory.result > 0.0);
}
