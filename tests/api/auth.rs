//! Authentication and authorization: refused requests answer 401/403 and append nothing.

use apex_domain::{ActorRole, Tier};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use reqwest::header::WWW_AUTHENTICATE;
use serde_json::{Map, Value, json};

use crate::helpers::{SECRET, TestApp, assert_refused, spawn_app};

/// An app with the active agent `triage`, open to the free tier.
async fn app_with_agent() -> TestApp {
    let app = spawn_app().await;
    app.active_agent("triage", &["search"], &["free"]).await;
    app
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Valid claims of the free-tier user `user-1`.
fn user_claims() -> Map<String, Value> {
    let now = now();
    let claims = json!({
        "sub": "user-1", "role": "user", "tier": "free",
        "exp": now + 600, "iat": now, "iss": "apex", "aud": "apex",
    });
    claims.as_object().unwrap().clone()
}

fn sign_with(algorithm: Algorithm, claims: &Map<String, Value>, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn sign(claims: &Map<String, Value>) -> String {
    sign_with(Algorithm::HS256, claims, SECRET)
}

/// `claims` with `key` set to `value` (removed when `value` is null).
fn with(key: &str, value: Value) -> Map<String, Value> {
    let mut claims = user_claims();
    if value.is_null() {
        claims.remove(key);
    } else {
        claims.insert(key.to_owned(), value);
    }
    claims
}

/// Unpadded base64url (RFC 4648 §5), as JWT segments use.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// A token whose header is replaced by `header`, keeping the claims and the signature.
fn with_header(token: &str, header: &str) -> String {
    let (_, rest) = token.split_once('.').unwrap();
    format!("{}.{rest}", base64url(header.as_bytes()))
}

/// Tries to start a run with `token`; asserts 401 with `code`, a `WWW-Authenticate: Bearer`
/// challenge, and that nothing was appended.
async fn assert_unauthorized(app: &TestApp, token: &str, code: &str) {
    let before = app.event_count().await;
    let r = app
        .post(
            "/v1/instances",
            token,
            json!({"agent_id": "triage", "input": "hi"}),
        )
        .await;
    assert_eq!(
        r.headers()
            .get(WWW_AUTHENTICATE)
            .map(|v| v.to_str().unwrap()),
        Some("Bearer")
    );
    assert_refused(app, before, r, StatusCode::UNAUTHORIZED, code).await;
}

/// Asserts `response` is 403 `role_not_allowed` and the events table still has `before` rows.
async fn assert_forbidden(app: &TestApp, before: i64, response: reqwest::Response) {
    assert_refused(
        app,
        before,
        response,
        StatusCode::FORBIDDEN,
        "role_not_allowed",
    )
    .await;
}

#[tokio::test]
async fn a_hand_minted_token_with_valid_claims_is_accepted() {
    // The control for every test below: only the defect each one adds is refused.
    let app = app_with_agent().await;
    let r = app
        .post(
            "/v1/instances",
            &sign(&user_claims()),
            json!({"agent_id": "triage", "input": "hi"}),
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    assert_eq!(app.instance_count().await, 1);
}

#[tokio::test]
async fn a_request_without_a_token_is_refused() {
    let app = app_with_agent().await;
    let before = app.event_count().await;
    let r = app
        .client
        .post(app.url("/v1/instances"))
        .json(&json!({"agent_id": "triage", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers().get(WWW_AUTHENTICATE).unwrap(), "Bearer");
    assert_refused(&app, before, r, StatusCode::UNAUTHORIZED, "missing_token").await;
}

#[tokio::test]
async fn a_malformed_authorization_header_is_refused() {
    let app = app_with_agent().await;
    let before = app.event_count().await;
    for value in [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer not-a-jwt",
        "Bearer a.b.c",
    ] {
        let r = app
            .client
            .post(app.url("/v1/instances"))
            .header("Authorization", value)
            .json(&json!({"agent_id": "triage", "input": "hi"}))
            .send()
            .await
            .unwrap();
        assert_refused(&app, before, r, StatusCode::UNAUTHORIZED, "invalid_token").await;
    }
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let app = app_with_agent().await;
    let token = sign(&with("exp", json!(now() - 3600)));
    assert_unauthorized(&app, &token, "token_expired").await;
}

#[tokio::test]
async fn a_token_signed_with_another_key_is_refused() {
    let app = app_with_agent().await;
    let token = sign_with(
        Algorithm::HS256,
        &user_claims(),
        "another-secret-0123456789-0123456789-xyz",
    );
    assert_unauthorized(&app, &token, "invalid_token").await;
}

#[tokio::test]
async fn an_unsigned_alg_none_token_is_refused() {
    let app = app_with_agent().await;
    let claims = serde_json::to_vec(&user_claims()).unwrap();
    let token = format!(
        "{}.{}.",
        base64url(br#"{"alg":"none","typ":"JWT"}"#),
        base64url(&claims)
    );
    assert_unauthorized(&app, &token, "invalid_token").await;
    // Keeping a valid signature does not help either.
    let signed = sign(&user_claims());
    assert_unauthorized(
        &app,
        &with_header(&signed, r#"{"alg":"none","typ":"JWT"}"#),
        "invalid_token",
    )
    .await;
}

#[tokio::test]
async fn a_token_whose_header_names_another_algorithm_is_refused() {
    let app = app_with_agent().await;
    let signed = sign(&user_claims());
    // The forged header is encoded exactly as jsonwebtoken encodes the real one.
    assert_eq!(
        signed.split('.').next().unwrap(),
        base64url(br#"{"typ":"JWT","alg":"HS256"}"#)
    );
    assert_unauthorized(
        &app,
        &with_header(&signed, r#"{"typ":"JWT","alg":"RS256"}"#),
        "invalid_token",
    )
    .await;
    // A genuine signature with the right secret under another HMAC algorithm is refused too:
    // the algorithm is pinned.
    let hs384 = sign_with(Algorithm::HS384, &user_claims(), SECRET);
    assert_unauthorized(&app, &hs384, "invalid_token").await;
}

#[tokio::test]
async fn a_token_that_is_not_valid_yet_is_refused() {
    let app = app_with_agent().await;
    let token = sign(&with("nbf", json!(now() + 3600)));
    assert_unauthorized(&app, &token, "invalid_token").await;
}

#[tokio::test]
async fn a_token_without_expiry_is_refused() {
    let app = app_with_agent().await;
    let token = sign(&with("exp", Value::Null));
    assert_unauthorized(&app, &token, "invalid_token").await;
}

#[tokio::test]
async fn a_token_for_another_issuer_or_audience_is_refused() {
    let app = app_with_agent().await;
    assert_unauthorized(&app, &sign(&with("iss", json!("evil"))), "invalid_token").await;
    assert_unauthorized(
        &app,
        &sign(&with("aud", json!("other-api"))),
        "invalid_token",
    )
    .await;
    assert_unauthorized(&app, &sign(&with("iss", Value::Null)), "invalid_token").await;
}

#[tokio::test]
async fn a_token_with_an_unknown_role_is_refused() {
    let app = app_with_agent().await;
    assert_unauthorized(
        &app,
        &sign(&with("role", json!("superuser"))),
        "invalid_token",
    )
    .await;
    assert_unauthorized(&app, &sign(&with("role", Value::Null)), "invalid_token").await;
}

#[tokio::test]
async fn a_token_with_an_unknown_tier_is_refused() {
    let app = app_with_agent().await;
    assert_unauthorized(&app, &sign(&with("tier", json!("gold"))), "invalid_token").await;
}

#[tokio::test]
async fn a_user_token_without_a_tier_is_refused() {
    let app = app_with_agent().await;
    assert_unauthorized(&app, &sign(&with("tier", Value::Null)), "invalid_token").await;
}

#[tokio::test]
async fn a_token_whose_subject_is_not_a_principal_id_is_refused() {
    let app = app_with_agent().await;
    assert_unauthorized(&app, &sign(&with("sub", json!("user 1"))), "invalid_token").await;
    assert_unauthorized(&app, &sign(&with("sub", json!(""))), "invalid_token").await;
}

#[tokio::test]
async fn a_user_may_not_report_runner_steps() {
    let app = app_with_agent().await;
    let user = app.user("user-1", Tier::Free);
    let id = app.instance(&user, "triage").await;
    let start = format!("/v1/runner/instances/{id}/start");
    let before = app.event_count().await;
    assert_forbidden(&app, before, app.post(&start, &user, json!({})).await).await;
    let id = app.running_instance(&user, "triage").await;
    let thoughts = format!("/v1/runner/instances/{id}/thoughts");
    let before = app.event_count().await;
    let r = app
        .post(&thoughts, &user, json!({"thought": "I am the agent now"}))
        .await;
    assert_forbidden(&app, before, r).await;
}

#[tokio::test]
async fn a_runner_may_not_manage_agents_or_start_runs() {
    let app = app_with_agent().await;
    let runner = app.runner();
    let before = app.event_count().await;
    let define = json!({"id": "rogue", "display_name": "Rogue", "tiers": ["free"]});
    assert_forbidden(
        &app,
        before,
        app.post("/v1/admin/agents", &runner, define).await,
    )
    .await;
    let r = app
        .post("/v1/admin/agents/triage/disable", &runner, json!({}))
        .await;
    assert_forbidden(&app, before, r).await;
    let r = app
        .post(
            "/v1/instances",
            &runner,
            json!({"agent_id": "triage", "input": "hi"}),
        )
        .await;
    assert_forbidden(&app, before, r).await;
}

#[tokio::test]
async fn a_user_may_not_manage_agents() {
    let app = app_with_agent().await;
    let user = app.user("user-1", Tier::Enterprise);
    let before = app.event_count().await;
    let define = json!({"id": "mine", "display_name": "Mine", "tiers": ["free"]});
    assert_forbidden(
        &app,
        before,
        app.post("/v1/admin/agents", &user, define).await,
    )
    .await;
    let r = app
        .client
        .patch(app.url("/v1/admin/agents/triage"))
        .bearer_auth(&user)
        .json(&json!({"tiers": ["free", "enterprise"]}))
        .send()
        .await
        .unwrap();
    assert_forbidden(&app, before, r).await;
    let r = app
        .post("/v1/admin/agents/triage/retire", &user, json!({}))
        .await;
    assert_forbidden(&app, before, r).await;
}

#[tokio::test]
async fn an_auditor_may_not_issue_commands() {
    let app = app_with_agent().await;
    let auditor = app.token("auditor-1", ActorRole::Auditor, None);
    let id = app
        .running_instance(&app.user("user-1", Tier::Free), "triage")
        .await;
    let before = app.event_count().await;
    let requests = [
        (
            "/v1/instances".to_owned(),
            json!({"agent_id": "triage", "input": "hi"}),
        ),
        (format!("/v1/instances/{id}/cancel"), json!({})),
        (
            format!("/v1/runner/instances/{id}/thoughts"),
            json!({"thought": "hm"}),
        ),
        (
            format!("/v1/runner/instances/{id}/fail"),
            json!({"error": "stop"}),
        ),
        (
            "/v1/admin/agents".to_owned(),
            json!({"id": "audit", "display_name": "Audit", "tiers": ["free"]}),
        ),
        ("/v1/admin/agents/triage/disable".to_owned(), json!({})),
    ];
    for (path, body) in requests {
        assert_forbidden(&app, before, app.post(&path, &auditor, body).await).await;
    }
}
