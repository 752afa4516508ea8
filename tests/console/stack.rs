//! The whole stack in-process for the browser test: its own database, its own exchanges and
//! queues, the API on port 0, the relay and every projector.

use std::path::Path;
use std::time::{Duration, Instant};

use apex::config::Settings;
use apex::startup::{self, Application, Workers};
use apex_domain::{ActorRole, Tier};
use reqwest::Client;
use serde_json::{Value, json};
use uuid::Uuid;

/// A running stack.
pub struct Stack {
    pub settings: Settings,
    pub base_url: String,
    pub client: Client,
    pub workers: Option<Workers>,
}

fn settings() -> Settings {
    let id = Uuid::new_v4().simple().to_string();
    let text = include_str!("../../environments/dev/apex.toml");
    let vars = [
        ("APEX_DATABASE_PASSWORD", String::new()),
        ("APEX_AMQP_PASSWORD", "guest".to_owned()),
        (
            "APEX_JWT_SECRET",
            "apex-test-secret-0123456789-0123456789".to_owned(),
        ),
        ("APEX__HTTP__PORT", "0".to_owned()),
        ("APEX__DATABASE__NAME", format!("apex_test_{id}")),
        ("APEX__AMQP__EXCHANGE", format!("apex.test.{id}")),
        ("APEX__AMQP__CHAT_EXCHANGE", format!("apex.test.{id}.chat")),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    Settings::from_toml(text, Path::new("dev"), vars).unwrap()
}

/// Starts one API replica over a fresh database, plus the relay and every projector.
pub async fn start() -> Stack {
    let settings = settings();
    let pool = startup::prepare_database(&settings.database).await.unwrap();
    let app = Application::build_with_pool(&settings, pool.clone())
        .await
        .unwrap();
    let base_url = format!("http://{}", app.local_addr().unwrap());
    tokio::spawn(app.run_until(std::future::pending()));
    let workers = Workers::start_with_prefix(
        &settings,
        pool,
        true,
        &apex_projections::ProjectorGroup::ALL,
        &format!("{}.projector", settings.amqp.exchange),
    );
    Stack {
        settings,
        base_url,
        client: Client::new(),
        workers: Some(workers),
    }
}

impl Stack {
    pub fn token(&self, sub: &str, role: ActorRole, tier: Option<Tier>) -> String {
        startup::authenticator(&self.settings)
            .unwrap()
            .mint(sub, role, tier, 600)
            .unwrap()
    }

    pub fn user(&self, sub: &str) -> String {
        self.token(sub, ActorRole::User, Some(Tier::Free))
    }

    pub fn admin(&self) -> String {
        self.token("admin-1", ActorRole::Admin, None)
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base_url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// POSTs and fails unless the answer is a success.
    pub async fn post(&self, path: &str, token: &str, body: Value) -> Value {
        let response = self
            .client
            .post(format!("{}{path}", self.base_url))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    }

    /// Defines and activates an agent open to every tier, then waits until users can see it.
    pub async fn agent(&self, id: &str, name: &str, description: &str) {
        let admin = self.admin();
        let body = json!({
            "id": id, "display_name": name, "description": description,
            "tools": ["query_costs"], "tiers": ["free", "early", "mid", "enterprise"],
        });
        self.post("/v1/admin/agents", &admin, body).await;
        self.post(
            &format!("/v1/admin/agents/{id}/activate"),
            &admin,
            json!({}),
        )
        .await;
        let user = self.user("catalogue-check");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let catalogue: Value = self.get("/v1/agents", &user).await.json().await.unwrap();
            if catalogue["items"]
                .as_array()
                .is_some_and(|items| items.iter().any(|a| a["id"] == id))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent {id} never reached the catalogue"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Posts one runner step of `instance` (`start`, `thoughts`, `tools`, …).
    pub async fn step(&self, instance: &str, step: &str, body: Value) {
        let runner = self.token("runner-1", ActorRole::Runner, None);
        self.post(
            &format!("/v1/runner/instances/{instance}/{step}"),
            &runner,
            body,
        )
        .await;
    }

    /// Stops the workers and deletes the stack's queues and exchanges.
    pub async fn stop(mut self) {
        if let Some(workers) = self.workers.take() {
            workers.stop().await;
        }
        let amqp = self.settings.amqp.config();
        crate::broker::delete_topology(&amqp, &format!("{}.projector", amqp.exchange)).await;
    }
}
