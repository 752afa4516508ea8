//! The role matrix, read from the OpenAPI document so that every route added later is covered:
//! admin routes (`/v1/admin/*`) and audit routes (`/v1/audit/*`) refuse users and runners;
//! runner routes (`/v1/runner/*`) refuse users, admins and auditors. Each refusal is
//! `403 role_not_allowed` and appends nothing, even with a well-formed body and real targets.

use apex_domain::{ActorRole, Tier};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness;
use crate::helpers::assert_refused;
use crate::rng::Rng;
use crate::schema::{self, Known, Schemas};

/// The roles each route family refuses.
fn refused_roles(path: &str) -> &'static [&'static str] {
    if path.starts_with("/v1/admin/") || path.starts_with("/v1/audit/") {
        &["user", "runner"]
    } else if path.starts_with("/v1/runner/") {
        &["user", "admin", "auditor"]
    } else {
        &[]
    }
}

/// A path parameter value naming something that exists.
fn real(name: &str, instance: &str) -> String {
    match name {
        "aggregate_type" => "instance".to_owned(),
        "name" => "instances".to_owned(),
        "call_id" => "c1".to_owned(),
        "id" => instance.to_owned(),
        other => other.to_owned(),
    }
}

#[tokio::test]
async fn admin_audit_and_runner_routes_refuse_every_other_role_and_append_nothing() {
    let fuzzed = harness::spawn(harness::lift_rate_limits, false).await;
    let app = &fuzzed.app;
    app.active_agent("triage", &["search"], &["free"]).await;
    let instance = app
        .running_instance(&app.user("user-1", Tier::Free), "triage")
        .await;
    let doc: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let tokens = [
        ("user", app.user("user-1", Tier::Free)),
        ("runner", app.runner()),
        ("admin", app.admin()),
        ("auditor", app.token("auditor-1", ActorRole::Auditor, None)),
    ];
    let schemas = Schemas { doc: &doc };
    let mut rng = Rng::new(7);
    let known = Known::default();
    let before = app.event_count().await;
    let (mut checked, mut audit_routes) = (0, 0);
    for op in schema::operations(&doc) {
        let refused = refused_roles(&op.path);
        if refused.is_empty() {
            continue;
        }
        if op.path.starts_with("/v1/audit/") {
            audit_routes += 1;
        }
        let mut path = op.path.clone();
        for param in &op.path_params {
            path = path.replace(
                &format!("{{{}}}", param.name),
                &real(&param.name, &instance),
            );
        }
        // A body that matches the schema, so only the role can be the reason to refuse.
        let body = op
            .body
            .as_ref()
            .map(|s| schemas.valid(s, "", &mut rng, &known))
            .filter(|b| b.is_object())
            .unwrap_or_else(|| json!({}));
        for (role, token) in tokens.iter().filter(|(r, _)| refused.contains(r)) {
            let method = reqwest::Method::from_bytes(op.method.to_uppercase().as_bytes()).unwrap();
            let mut request = app
                .client
                .request(method, app.url(&path))
                .bearer_auth(token);
            if op.body.is_some() {
                request = request.json(&body);
            }
            let response = request.send().await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::FORBIDDEN,
                "{} as {role} with {body}",
                op.name()
            );
            assert_refused(
                app,
                before,
                response,
                StatusCode::FORBIDDEN,
                "role_not_allowed",
            )
            .await;
            checked += 1;
        }
    }
    println!("authz: {checked} (route, role) refusals checked, {audit_routes} audit routes");
    assert!(checked >= 30, "only {checked} refusals checked");
    fuzzed.stop().await;
}
