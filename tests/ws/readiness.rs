//! An API replica's readiness follows its own broker session: the one that brings its sockets
//! their updates.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::broker::close_broker_connections;
use crate::helpers::{Stack, read_steps, stack, start_and_think};

async fn readiness(stack: &Stack) -> (StatusCode, Value) {
    let r = stack
        .client
        .get(format!("http://{}/health/ready", stack.replicas[0]))
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

fn check<'a>(body: &'a Value, name: &str) -> &'a Value {
    body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("readiness does not name {name}: {body}"))
}

/// Polls readiness until it answers `status`; returns the body of that answer.
async fn wait_for(stack: &Stack, status: StatusCode, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (got, body) = readiness(stack).await;
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never answered {status}; last {got}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The broker drops the replica's session: the replica reports unready, naming rabbitmq and
/// not postgres, until its hub consumes again; then it is ready without a restart, and a
/// socket connected throughout receives the steps of a run started afterwards.
#[tokio::test]
async fn a_replica_is_unready_while_its_broker_session_is_down_and_ready_again_on_its_own() {
    let stack = stack(1).await;
    stack.agent("triage").await;
    let body = wait_for(&stack, StatusCode::OK, Duration::from_secs(15)).await;
    assert_eq!(check(&body, "rabbitmq")["status"], "ok", "{body}");
    let alice = stack.user("alice");
    let mut socket = stack.connect(0, &alice, None).await;

    let closed = close_broker_connections(stack.states[0].hub.queue()).await;
    assert_eq!(closed, 1, "the replica's hub has one broker connection");
    let body = wait_for(
        &stack,
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_ne!(check(&body, "rabbitmq")["status"], "ok", "{body}");
    assert_eq!(check(&body, "postgres")["status"], "ok", "{body}");

    wait_for(&stack, StatusCode::OK, Duration::from_secs(15)).await;
    let run = stack.instance(&alice, "triage").await;
    start_and_think(&stack, &run, 1).await;
    let steps = read_steps(&mut socket, 2, Duration::from_secs(15)).await;
    let types: Vec<_> = steps.iter().map(|m| m["type"].as_str()).collect();
    assert_eq!(
        types,
        [Some("agent_started"), Some("agent_thinking")],
        "{steps:?}"
    );
    stack.stop().await;
}
