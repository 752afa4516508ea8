//! The served OpenAPI document describes every operation completely, and Swagger UI is served.

use std::collections::BTreeSet;

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TestApp, spawn_app};

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Error responses documented on purpose with another body than `ErrorBody`:
/// `(path, method, status, why)`.
const NOT_ERROR_BODY: [(&str, &str, &str, &str); 1] = [(
    "/health/ready",
    "get",
    "503",
    "the readiness probe answers its `Health` report, naming the failing dependency",
)];

async fn served_document(app: &TestApp) -> Value {
    let r = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    r.json().await.unwrap()
}

/// Every `(path, method, operation)` of the document.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = vec![];
    for (path, item) in doc["paths"].as_object().expect("the document has paths") {
        for method in METHODS {
            if let Some(operation) = item.get(method) {
                out.push((path.clone(), method.to_owned(), operation.clone()));
            }
        }
    }
    out
}

/// The schema of a JSON response, or of each line of an NDJSON stream (the audit export).
fn json_schema(response: &Value) -> Option<&Value> {
    ["application~1json", "application~1x-ndjson"]
        .iter()
        .find_map(|media| response.pointer(&format!("/content/{media}/schema")))
        .filter(|s| s.is_object())
}

/// The schema of a success body: JSON, or one of the non-JSON formats Apex serves on purpose.
fn success_schema(response: &Value) -> Option<&Value> {
    json_schema(response).or_else(|| {
        let content = response.get("content")?.as_object()?;
        content
            .iter()
            .filter(|(media, _)| {
                media.starts_with("text/plain") || media.starts_with("application/x-ndjson")
            })
            .find_map(|(_, c)| c.get("schema").filter(|s| s.is_object()))
    })
}

/// What is missing from one operation, as readable complaints.
fn offences(doc: &Value, path: &str, method: &str, op: &Value) -> Vec<String> {
    let mut out = vec![];
    let text = |key: &str| {
        op.get(key)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.trim().is_empty())
    };
    if !text("description") && !text("summary") {
        out.push("no description or summary".to_owned());
    }
    let declared: BTreeSet<&str> = doc["tags"]
        .as_array()
        .map(|tags| tags.iter().filter_map(|t| t["name"].as_str()).collect())
        .unwrap_or_default();
    match op["tags"].as_array() {
        Some(tags) if !tags.is_empty() => {
            for tag in tags {
                if !tag.as_str().is_some_and(|t| declared.contains(t)) {
                    out.push(format!("tag {tag} is not declared in the document's tags"));
                }
            }
        }
        _ => out.push("no tag".to_owned()),
    }
    let Some(responses) = op["responses"].as_object() else {
        out.push("no responses".to_owned());
        return out;
    };
    // A WebSocket endpoint succeeds with 101 Switching Protocols, which has no body.
    let upgrade = responses.contains_key("101");
    // Success bodies are JSON, except the Prometheus text format and the NDJSON export, which
    // must still declare their media type and schema.
    if !upgrade
        && !responses
            .iter()
            .any(|(status, r)| status.starts_with('2') && success_schema(r).is_some())
    {
        out.push("no 2xx response with a JSON schema".to_owned());
    }
    let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
    let mut required: Vec<&str> = vec![];
    if secured {
        required.extend(["401", "403"]);
    }
    if op.get("requestBody").is_some() {
        required.extend(["400", "413", "415", "422"]);
    }
    for status in required {
        if !responses.contains_key(status) {
            out.push(format!("no {status} response"));
        }
    }
    for (status, response) in responses {
        if !(status.starts_with('4') || status.starts_with('5')) {
            continue;
        }
        if response["description"]
            .as_str()
            .is_none_or(|d| d.trim().is_empty())
        {
            out.push(format!("{status} has no description"));
        }
        if NOT_ERROR_BODY
            .iter()
            .any(|(p, m, s, _)| *p == path && *m == method && *s == status.as_str())
        {
            continue;
        }
        let reference = json_schema(response).and_then(|s| s["$ref"].as_str());
        if reference != Some("#/components/schemas/ErrorBody") {
            out.push(format!(
                "{status} does not reference ErrorBody (schema: {reference:?})"
            ));
        }
    }
    out
}

#[tokio::test]
async fn every_operation_is_fully_documented() {
    let app = spawn_app().await;
    let doc = served_document(&app).await;
    let operations = operations(&doc);
    assert!(
        operations.len() >= 15,
        "only {} operations documented",
        operations.len()
    );
    let mut report = vec![];
    for (path, method, op) in &operations {
        for offence in offences(&doc, path, method, op) {
            report.push(format!("{} {path}: {offence}", method.to_uppercase()));
        }
    }
    assert!(
        report.is_empty(),
        "{} offence(s) in /openapi.json:\n{}",
        report.len(),
        report.join("\n")
    );
}

#[tokio::test]
async fn every_schema_reference_resolves() {
    let app = spawn_app().await;
    let doc = served_document(&app).await;
    let mut references = BTreeSet::new();
    collect_refs(&doc, &mut references);
    assert!(references.contains("#/components/schemas/ErrorBody"));
    let dangling: Vec<&String> = references
        .iter()
        .filter(|r| {
            r.strip_prefix('#')
                .and_then(|pointer| doc.pointer(pointer))
                .is_none()
        })
        .collect();
    assert!(dangling.is_empty(), "dangling $ref: {dangling:?}");
}

fn collect_refs(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                out.insert(r.clone());
            }
            map.values().for_each(|v| collect_refs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_served_document_is_the_one_the_code_generates() {
    let app = spawn_app().await;
    let served = served_document(&app).await;
    let generated = serde_json::to_value(apex_api::openapi()).unwrap();
    let paths = |doc: &Value| -> BTreeSet<String> {
        doc["paths"].as_object().unwrap().keys().cloned().collect()
    };
    assert_eq!(paths(&served), paths(&generated));
    for expected in [
        "/v1/instances",
        "/v1/instances/{id}/cancel",
        "/v1/runner/instances/{id}/start",
        "/v1/runner/instances/{id}/thoughts",
        "/v1/runner/instances/{id}/tools",
        "/v1/runner/instances/{id}/tools/{call_id}/complete",
        "/v1/runner/instances/{id}/complete",
        "/v1/runner/instances/{id}/fail",
        "/v1/admin/agents",
        "/v1/admin/agents/{id}",
        "/v1/admin/agents/{id}/activate",
        "/v1/admin/agents/{id}/disable",
        "/v1/admin/agents/{id}/retire",
        "/health/live",
        "/health/ready",
    ] {
        assert!(
            paths(&served).contains(expected),
            "{expected} is not documented"
        );
    }
    assert_eq!(served, generated);
    // Swagger UI reads the same document.
    let r = app
        .client
        .get(app.url("/docs/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), served);
}

#[tokio::test]
async fn swagger_ui_is_served_from_the_binary() {
    let app = spawn_app().await;
    let r = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let html = r.text().await.unwrap();
    assert!(html.to_lowercase().contains("swagger"), "{html}");
    // Its assets are embedded too.
    let r = app
        .client
        .get(app.url("/docs/swagger-ui-bundle.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.unwrap().len() > 100_000);
}

#[test]
fn the_documentation_check_names_every_gap_of_an_incomplete_operation() {
    let doc = serde_json::json!({"tags": [{"name": "runner"}]});
    let op = serde_json::json!({
        "tags": ["undeclared"],
        "requestBody": {"content": {}},
        "security": [{"bearer": []}],
        "responses": {
            "200": {"description": "ok"},
            "400": {"description": "bad", "content": {"application/json": {"schema": {"type": "object"}}}},
        },
    });
    let found = offences(&doc, "/x", "post", &op);
    for expected in [
        "no description or summary",
        "tag \"undeclared\" is not declared in the document's tags",
        "no 2xx response with a JSON schema",
        "no 401 response",
        "no 403 response",
        "no 413 response",
        "no 415 response",
        "no 422 response",
        "400 does not reference ErrorBody (schema: None)",
    ] {
        assert!(
            found.iter().any(|f| f == expected),
            "missing {expected:?} in {found:#?}"
        );
    }
    assert_eq!(found.len(), 9, "{found:#?}");
}
