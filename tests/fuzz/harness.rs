//! The application under fuzz: its own database, exchanges and queues, the relay and every
//! projector (so queries have data), rate limits lifted (they have their own tests), seed data,
//! and the tokens of every role plus bad ones.

use std::time::{Duration, Instant};

use apex::config::Settings;
use apex::startup::{Application, Workers};
use apex_domain::{ActorRole, Tier};
use apex_projections::ReadModel;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Client;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{SECRET, TestApp, test_settings};
use crate::requests::{FuzzRequest, Tokens};
use crate::schema::Known;

/// Every answer must arrive within this time.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// A running application with its workers.
pub struct Fuzzed {
    pub app: TestApp,
    workers: Option<Workers>,
    id: String,
}

/// Sets every rate limit far above what a test sends.
pub fn lift_rate_limits(settings: &mut Settings) {
    settings.rate_limit.commands_per_second = 1_000_000;
    settings.rate_limit.burst = 1_000_000;
    settings.rate_limit.runner_commands_per_second = 1_000_000;
    settings.rate_limit.runner_burst = 1_000_000;
}

/// Starts the application with settings adjusted by `configure`, and with the relay and the
/// projectors when `workers`.
pub async fn spawn(configure: impl FnOnce(&mut Settings), workers: bool) -> Fuzzed {
    let id = Uuid::new_v4().simple().to_string();
    let mut settings = test_settings(&format!("apex_test_{id}"));
    settings.amqp.exchange = format!("apex.test.{id}");
    settings.amqp.chat_exchange = format!("apex.test.{id}.chat");
    configure(&mut settings);
    let app = Application::build(&settings).await.expect("app builds");
    let address = format!("http://{}", app.local_addr().unwrap());
    let state = app.state.clone();
    tokio::spawn(app.run_until(std::future::pending()));
    let workers = workers.then(|| {
        Workers::start_with_prefix(
            &settings,
            state.pool.clone(),
            true,
            &apex_projections::ProjectorGroup::ALL,
            &format!("apex.test.{id}.projector"),
        )
    });
    Fuzzed {
        app: TestApp {
            address,
            pool: state.pool.clone(),
            // A fresh connection per request: an answer sent before the body was read may
            // close the connection, and a reused one would then fail for the next request.
            client: Client::builder()
                .timeout(ANSWER_WITHIN)
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            settings,
            state,
        },
        workers,
        id,
    }
}

impl Fuzzed {
    /// Stops the workers and deletes the test's queues and exchanges.
    pub async fn stop(mut self) {
        if let Some(workers) = self.workers.take() {
            workers.stop().await;
        }
        let prefix = format!("apex.test.{}.projector", self.id);
        crate::broker::delete_topology(&self.app.settings.amqp.config(), &prefix).await;
    }
}

fn sign(claims: &Value, algorithm: Algorithm, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Valid tokens of every role (users of two tiers) and a range of bad ones.
pub fn tokens(app: &TestApp) -> Tokens {
    let now = apex_api::auth::now_seconds();
    let claims = |exp: u64| {
        json!({"sub": "fuzz-user-1", "role": "user", "tier": "free", "exp": exp, "iat": now,
               "iss": "apex", "aud": "apex"})
    };
    let valid = vec![
        ("user-free", app.user("fuzz-user-1", Tier::Free)),
        ("user-enterprise", app.user("fuzz-user-2", Tier::Enterprise)),
        ("runner", app.runner()),
        ("admin", app.admin()),
        ("auditor", app.token("auditor-1", ActorRole::Auditor, None)),
    ];
    let expired = sign(&claims(now - 3600), Algorithm::HS256, SECRET);
    let foreign = sign(
        &claims(now + 600),
        Algorithm::HS256,
        "another-secret-0123456789-0123456789",
    );
    let hs512 = sign(&claims(now + 600), Algorithm::HS512, SECRET);
    let mut no_tier = claims(now + 600);
    no_tier.as_object_mut().unwrap().remove("tier");
    let no_tier = sign(&no_tier, Algorithm::HS256, SECRET);
    let bearer = |t: &str| format!("Bearer {t}").into_bytes();
    let bad = vec![
        ("none", vec![]),
        ("garbage", bearer("garbage")),
        ("empty-bearer", b"Bearer ".to_vec()),
        ("basic", b"Basic Zm9vOmJhcg==".to_vec()),
        ("expired", bearer(&expired)),
        ("foreign-key", bearer(&foreign)),
        ("hs512", bearer(&hs512)),
        ("user-without-tier", bearer(&no_tier)),
        ("alg-none", bearer("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.")),
        ("non-ascii", b"Bearer \xff\xfe\xfd".to_vec()),
        ("huge", bearer(&"a".repeat(20_000))),
    ];
    Tokens { valid, bad }
}

/// Agents in every status, runs in several states, for two users.
pub async fn seed(app: &TestApp) -> Known {
    let mut known = Known::default();
    app.active_agent("triage", &["search", "sql"], &["free", "enterprise"])
        .await;
    app.active_agent("reporting", &["search"], &["enterprise"])
        .await;
    app.draft_agent("drafty", &["sql"], &["free"]).await;
    app.draft_agent("gone", &[], &["free"]).await;
    let r = app
        .post("/v1/admin/agents/gone/retire", &app.admin(), json!({}))
        .await;
    assert!(r.status().is_success());
    for agent in ["triage", "reporting", "drafty", "gone", "no-such-agent"] {
        known.agents.insert(agent.to_owned());
    }
    for (user, tier) in [
        ("fuzz-user-1", Tier::Free),
        ("fuzz-user-2", Tier::Enterprise),
    ] {
        let token = app.user(user, tier);
        known.users.insert(user.to_owned());
        for _ in 0..3 {
            known.instances.insert(app.instance(&token, "triage").await);
        }
        let running = app.running_instance(&token, "triage").await;
        let r = app
            .post(
                &format!("/v1/runner/instances/{running}/tools"),
                &app.runner(),
                json!({"call_id": "c1", "tool": "sql", "arguments": {"q": 1}}),
            )
            .await;
        assert!(r.status().is_success());
        known.instances.insert(running);
    }
    for v in ["c1", "c2", "call-9"] {
        known.call_ids.insert(v.to_owned());
    }
    for v in ["search", "sql", "rm -rf"] {
        known.tools.insert(v.to_owned());
    }
    for model in ReadModel::ALL {
        known.projections.insert(model.name().to_owned());
    }
    known.projections.insert("nope".to_owned());
    known
}

/// What one request got.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    pub took: Duration,
}

/// Sends a request; `Err` when it got no answer within [`ANSWER_WITHIN`] or the connection broke.
pub async fn send(client: &Client, request: &FuzzRequest) -> Result<Answer, String> {
    let method = reqwest::Method::from_bytes(request.method.to_uppercase().as_bytes())
        .map_err(|e| e.to_string())?;
    let mut headers = HeaderMap::new();
    for (name, value) in &request.headers {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let mut builder = client.request(method, &request.url).headers(headers);
    if let Some(body) = &request.body {
        builder = builder.body(body.clone());
    }
    let started = Instant::now();
    let response = builder.send().await.map_err(|e| {
        let kind = if e.is_timeout() {
            "timed out"
        } else {
            "failed"
        };
        format!(
            "{kind} after {:?}: {}",
            started.elapsed(),
            apex_api::error::cause_chain(&e)
        )
    })?;
    let status = response.status().as_u16();
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("body broken: {}", apex_api::error::cause_chain(&e)))?;
    Ok(Answer {
        status,
        body: body.to_vec(),
        took: started.elapsed(),
    })
}

/// Why a 4xx answer does not carry the error envelope, if it does not.
pub fn envelope_problem(body: &[u8]) -> Option<String> {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Some(format!(
            "body is not JSON: {:?}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ));
    };
    let code = value.pointer("/error/code").and_then(Value::as_str);
    let message = value.pointer("/error/message").and_then(Value::as_str);
    match (code, message) {
        (Some(c), Some(m)) if !c.is_empty() && !m.is_empty() => None,
        _ => Some(format!("no error envelope: {value}")),
    }
}

/// The error code of a 4xx answer.
pub fn error_code(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/code")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| "-".to_owned())
}

/// Stored events (the write side's only output).
pub async fn events(app: &TestApp) -> i64 {
    app.event_count().await
}
