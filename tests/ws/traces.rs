//! With `[otlp]` switched on, one trace runs from the HTTP command through the relay's publish
//! and every projector's update to the WebSocket send, and reaches a collector over OTLP/HTTP.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apex::config::{OtlpProtocol, OtlpSettings};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use serde_json::{Value, json};

use crate::helpers::*;

/// A minimal OTLP/HTTP collector: keeps every JSON export request it receives.
struct Collector {
    url: String,
    requests: Arc<Mutex<Vec<Value>>>,
}

impl Collector {
    async fn start() -> Self {
        let requests: Arc<Mutex<Vec<Value>>> = Arc::default();
        let app = Router::new()
            .route(
                "/v1/traces",
                post(
                    |State(requests): State<Arc<Mutex<Vec<Value>>>>, body: Bytes| async move {
                        let value: Value = serde_json::from_slice(&body).unwrap();
                        requests.lock().unwrap().push(value);
                        axum::Json(json!({}))
                    },
                ),
            )
            .with_state(requests.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, requests }
    }

    /// Every exported span of `trace_id`, with the `service.name` of its resource.
    fn spans(&self, trace_id: &str) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for request in self.requests.lock().unwrap().iter() {
            for resource in request["resourceSpans"].as_array().into_iter().flatten() {
                let service = resource["resource"]["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|a| a["key"] == "service.name")
                    .and_then(|a| a["value"]["stringValue"].as_str())
                    .unwrap_or_default()
                    .to_owned();
                for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                    for span in scope["spans"].as_array().into_iter().flatten() {
                        if span["traceId"] == trace_id {
                            out.push((service.clone(), span.clone()));
                        }
                    }
                }
            }
        }
        out
    }
}

fn attribute<'a>(span: &'a Value, key: &str) -> Option<&'a str> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)?["value"]["stringValue"]
        .as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_command_through_the_bus_to_the_websocket_send() {
    let collector = Collector::start().await;
    let stack = stack(1).await;
    let telemetry = apex::telemetry::init_with_export(
        &stack.settings.log,
        &OtlpSettings {
            enabled: true,
            endpoint: collector.url.clone(),
            protocol: OtlpProtocol::HttpJson,
            service_name: "apex-under-test".to_owned(),
            timeout_ms: 5_000,
        },
    )
    .unwrap();
    assert!(telemetry.exporting());
    stack.agent("triage").await;
    let alice = stack.user("alice");
    let mut socket = stack.connect(0, &alice, None).await;
    let id = stack.instance(&alice, "triage").await;

    // The caller's own span: the request continues its trace.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let response = stack
        .client
        .post(format!(
            "http://{}/v1/runner/instances/{id}/start",
            stack.replicas[0]
        ))
        .bearer_auth(stack.runner())
        .header("traceparent", format!("00-{trace_id}-{caller}-01"))
        .json(&json!({"message": "On it"}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    // The creation's message comes from another trace; the start is the second step.
    let steps = read_steps(&mut socket, 1, Duration::from_secs(15)).await;
    assert_eq!(steps.len(), 1, "the chat client saw the run start");
    assert_eq!(steps[0]["type"], "agent_started");

    // Every stage that handles the start event exports a span of the caller's trace.
    let projectors: BTreeSet<&str> = ["instances", "agent_stats", "usage"].into();
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        tokio::task::block_in_place(|| telemetry.flush());
        let spans = collector.spans(trace_id);
        let names: BTreeSet<String> = spans
            .iter()
            .map(|(_, s)| s["name"].as_str().unwrap_or_default().to_owned())
            .collect();
        let projected: BTreeSet<&str> = spans
            .iter()
            .filter(|(_, s)| s["name"] == "project")
            .filter_map(|(_, s)| attribute(s, "projector"))
            .collect();
        let complete = ["http", "command", "relay.publish", "ws.send"]
            .iter()
            .all(|n| names.contains(*n))
            && projected == projectors;
        if complete || Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let named = |name: &str| -> Vec<&Value> {
        spans
            .iter()
            .filter(|(_, s)| s["name"] == name)
            .map(|(_, s)| s)
            .collect()
    };
    assert!(
        spans
            .iter()
            .all(|(service, _)| service == "apex-under-test"),
        "every span names the configured service"
    );
    let http = named("http");
    assert_eq!(http.len(), 1, "one request span: {spans:#?}");
    let http = http[0];
    assert_eq!(
        http["parentSpanId"], caller,
        "the request continues the caller's span"
    );
    let http_span = http["spanId"].as_str().unwrap();
    let command = named("command");
    assert_eq!(command.len(), 1, "{spans:#?}");
    assert_eq!(command[0]["parentSpanId"], http_span);
    assert_eq!(attribute(command[0], "command"), Some("StartInstance"));
    // Out of process in production: they link to the request through the stored traceparent.
    for stage in ["relay.publish", "ws.send"] {
        let found = named(stage);
        assert_eq!(found.len(), 1, "{stage}: {spans:#?}");
        assert_eq!(found[0]["parentSpanId"], http_span, "{stage}");
    }
    let project = named("project");
    assert_eq!(project.len(), projectors.len(), "{spans:#?}");
    for span in project {
        assert_eq!(span["parentSpanId"], http_span);
    }
    tokio::task::block_in_place(|| telemetry.shutdown());
    stack.stop().await;
}
