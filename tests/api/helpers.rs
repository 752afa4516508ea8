//! `spawn_app()`: a fresh database and the real application on a random port.

use std::path::Path;

use apex::config::Settings;
use apex::startup::{self, Application};
use apex_domain::{ActorRole, Tier};
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

/// The dev HS256 secret used by tests.
pub const SECRET: &str = "apex-test-secret-0123456789-0123456789";

/// Settings for a test: the dev template with a fresh database name and port 0.
pub fn test_settings(database: &str) -> Settings {
    let text = include_str!("../../environments/dev/apex.toml");
    let vars = vec![
        ("APEX_DATABASE_PASSWORD".to_owned(), String::new()),
        ("APEX_AMQP_PASSWORD".to_owned(), "guest".to_owned()),
        ("APEX_JWT_SECRET".to_owned(), SECRET.to_owned()),
        ("APEX__HTTP__PORT".to_owned(), "0".to_owned()),
        ("APEX__DATABASE__NAME".to_owned(), database.to_owned()),
        ("APEX__DATABASE__MAX_CONNECTIONS".to_owned(), "8".to_owned()),
    ];
    Settings::from_toml(text, Path::new("environments/dev/apex.toml"), vars).unwrap()
}

/// A running application and its database.
pub struct TestApp {
    pub address: String,
    pub pool: PgPool,
    pub client: Client,
    pub settings: Settings,
    pub state: apex_api::AppState,
}

/// Creates `apex_test_<uuid>`, applies migrations and serves the app on a random port.
pub async fn spawn_app() -> TestApp {
    let name = format!("apex_test_{}", Uuid::new_v4().simple());
    spawn_app_with(test_settings(&name)).await
}

/// [`spawn_app`] with settings of the test's own (from [`test_settings`]).
pub async fn spawn_app_with(settings: Settings) -> TestApp {
    let app = Application::build(&settings).await.expect("app builds");
    let address = format!("http://{}", app.local_addr().unwrap());
    let state = app.state.clone();
    tokio::spawn(app.run_until(std::future::pending()));
    TestApp {
        address,
        pool: state.pool.clone(),
        client: Client::new(),
        settings,
        state,
    }
}

/// Connects to the server's maintenance database.
pub async fn server_connection(settings: &Settings) -> PgConnection {
    PgConnection::connect_with(&settings.database.server_options())
        .await
        .unwrap()
}

impl TestApp {
    pub fn token(&self, sub: &str, role: ActorRole, tier: Option<Tier>) -> String {
        startup::authenticator(&self.settings)
            .unwrap()
            .mint(sub, role, tier, 600)
            .unwrap()
    }

    pub fn admin(&self) -> String {
        self.token("admin-1", ActorRole::Admin, None)
    }

    pub fn runner(&self) -> String {
        self.token("runner-1", ActorRole::Runner, None)
    }

    pub fn user(&self, sub: &str, tier: Tier) -> String {
        self.token(sub, ActorRole::User, Some(tier))
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Response {
        self.client
            .post(format!("{}{}", self.address, path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Defines and activates an agent open to `tiers` with `tools`.
    pub async fn active_agent(&self, id: &str, tools: &[&str], tiers: &[&str]) {
        let admin = self.admin();
        let r = self
            .post(
                "/v1/admin/agents",
                &admin,
                json!({"id": id, "display_name": id, "description": "test agent", "tools": tools, "tiers": tiers}),
            )
            .await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        let r = self
            .post(
                &format!("/v1/admin/agents/{id}/activate"),
                &admin,
                json!({}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    }

    /// Creates an instance of `agent` for `user`; returns its id.
    pub async fn instance(&self, user_token: &str, agent: &str) -> String {
        let r = self
            .post(
                "/v1/instances",
                user_token,
                json!({"agent_id": agent, "input": "analyse my spend"}),
            )
            .await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        r.json::<Value>().await.unwrap()["instance_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// A created and started instance; returns its id.
    pub async fn running_instance(&self, user_token: &str, agent: &str) -> String {
        let id = self.instance(user_token, agent).await;
        let r = self
            .post(
                &format!("/v1/runner/instances/{id}/start"),
                &self.runner(),
                json!({}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
        id
    }

    /// Number of stored events.
    pub async fn event_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// `(sequence, event_type)` of one aggregate, in order.
    pub async fn events_of(&self, aggregate_id: &str) -> Vec<(i64, String)> {
        sqlx::query_as(
            "SELECT sequence, event_type FROM events WHERE aggregate_id = $1 ORDER BY sequence",
        )
        .bind(aggregate_id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }
}

/// Asserts status and error code of a response.
pub async fn assert_error(response: Response, status: StatusCode, code: &str) {
    let actual = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(actual, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

// ---- Added for the integration test files (append only) ----

/// One row of `events`, every column a test looks at (`transaction_id` as text).
#[derive(Debug, sqlx::FromRow)]
pub struct EventRow {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
    pub position: i64,
    pub transaction_id: String,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    pub event_id: Uuid,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    pub principal: String,
    pub principal_role: String,
}

/// A command context for the runner `runner-1`, for driving the command service directly.
pub fn runner_context() -> apex_commands::CommandContext {
    apex_commands::CommandContext::new(apex_domain::Actor::new("runner-1", ActorRole::Runner))
}

impl TestApp {
    /// The absolute URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// POSTs JSON with extra headers.
    pub async fn post_with(
        &self,
        path: &str,
        token: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> Response {
        let mut request = self
            .client
            .post(self.url(path))
            .bearer_auth(token)
            .json(&body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    /// POSTs raw bytes with an optional content type.
    pub async fn post_raw(
        &self,
        path: &str,
        token: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Response {
        let mut request = self.client.post(self.url(path)).bearer_auth(token);
        if let Some(content_type) = content_type {
            request = request.header(reqwest::header::CONTENT_TYPE, content_type);
        }
        request.body(body).send().await.unwrap()
    }

    /// Defines an agent and leaves it in draft.
    pub async fn draft_agent(&self, id: &str, tools: &[&str], tiers: &[&str]) {
        let r = self
            .post(
                "/v1/admin/agents",
                &self.admin(),
                json!({"id": id, "display_name": id, "tools": tools, "tiers": tiers}),
            )
            .await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
    }

    /// Records a thought on a running instance as `runner-1`.
    pub async fn think(&self, instance_id: &str, thought: &str) -> Response {
        self.post(
            &format!("/v1/runner/instances/{instance_id}/thoughts"),
            &self.runner(),
            json!({"thought": thought}),
        )
        .await
    }

    /// Every column of the events of one aggregate, in sequence order.
    pub async fn event_rows(&self, aggregate_id: &str) -> Vec<EventRow> {
        sqlx::query_as(
            "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, payload,
                    position, transaction_id::text AS transaction_id, recorded_at, event_id,
                    correlation_id, causation_id, principal, principal_role
               FROM events WHERE aggregate_id = $1 ORDER BY sequence",
        )
        .bind(aggregate_id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Number of distinct instances with at least one event.
    pub async fn instance_count(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(DISTINCT aggregate_id) FROM events WHERE aggregate_type = 'instance'",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }
}

/// Asserts that `sequences` (of one aggregate, in order) are exactly `1..=expected`.
pub fn assert_contiguous(sequences: impl IntoIterator<Item = i64>, expected: i64) {
    let sequences: Vec<i64> = sequences.into_iter().collect();
    assert_eq!(
        sequences,
        (1..=expected).collect::<Vec<_>>(),
        "sequences have a gap or duplicate"
    );
}

/// Asserts status and error code, and that the `events` table still holds `before` rows.
pub async fn assert_refused(
    app: &TestApp,
    before: i64,
    response: Response,
    status: StatusCode,
    code: &str,
) {
    assert_error(response, status, code).await;
    assert_eq!(
        app.event_count().await,
        before,
        "a refused request ({code}) appended events"
    );
}

/// GETs `path` with `token`.
pub async fn get(app: &TestApp, path: &str, token: &str) -> Response {
    app.client
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// GETs `path` and returns its JSON body, asserting a 200.
pub async fn get_ok(app: &TestApp, path: &str, token: &str) -> Value {
    let r = get(app, path, token).await;
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
    body
}
