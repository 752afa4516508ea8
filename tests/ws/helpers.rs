//! A full stack per test: own database, own exchanges and queues, API replicas on port 0, the
//! relay and the projectors in-process.

use std::path::Path;
use std::time::{Duration, Instant};

use apex::config::Settings;
use apex::startup::{self, Application, Workers};
use apex_domain::{ActorRole, Tier};
use futures::{SinkExt, StreamExt};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Stack {
    pub settings: Settings,
    pub replicas: Vec<String>,
    /// Each replica's state (its hub, its pool).
    pub states: Vec<apex_api::state::AppState>,
    pub client: Client,
    pub workers: Option<Workers>,
}

fn settings() -> Settings {
    let id = Uuid::new_v4().simple().to_string();
    let text = include_str!("../../environments/dev/apex.toml");
    let vars = vec![
        ("APEX_DATABASE_PASSWORD".to_owned(), String::new()),
        ("APEX_AMQP_PASSWORD".to_owned(), "guest".to_owned()),
        (
            "APEX_JWT_SECRET".to_owned(),
            "apex-test-secret-0123456789-0123456789".to_owned(),
        ),
        ("APEX__HTTP__PORT".to_owned(), "0".to_owned()),
        ("APEX__DATABASE__NAME".to_owned(), format!("apex_test_{id}")),
        (
            "APEX__DATABASE__MAX_CONNECTIONS".to_owned(),
            "16".to_owned(),
        ),
        ("APEX__AMQP__EXCHANGE".to_owned(), format!("apex.test.{id}")),
        (
            "APEX__AMQP__CHAT_EXCHANGE".to_owned(),
            format!("apex.test.{id}.chat"),
        ),
    ];
    Settings::from_toml(text, Path::new("dev"), vars).unwrap()
}

/// Starts `replicas` API replicas over one database, plus the relay and every projector.
pub async fn stack(replicas: usize) -> Stack {
    let settings = settings();
    let pool = startup::prepare_database(&settings.database).await.unwrap();
    let (mut addresses, mut states) = (Vec::new(), Vec::new());
    for _ in 0..replicas {
        let app = Application::build_with_pool(&settings, pool.clone())
            .await
            .unwrap();
        addresses.push(app.local_addr().unwrap().to_string());
        states.push(app.state.clone());
        tokio::spawn(app.run_until(std::future::pending()));
    }
    let workers = Workers::start_with_prefix(
        &settings,
        pool.clone(),
        true,
        &apex_projections::ProjectorGroup::ALL,
        &format!("{}.projector", settings.amqp.exchange),
    );
    Stack {
        settings,
        replicas: addresses,
        states,
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

    pub fn runner(&self) -> String {
        self.token("runner-1", ActorRole::Runner, None)
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Value {
        let response = self
            .client
            .post(format!("http://{}{}", self.replicas[0], path))
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

    /// Records `thought` on run `id` through the runner API.
    pub async fn think(&self, id: &str, thought: &str) {
        self.post(
            &format!("/v1/runner/instances/{id}/thoughts"),
            &self.runner(),
            json!({ "thought": thought }),
        )
        .await;
    }

    pub async fn agent(&self, id: &str) {
        let admin = self.token("admin-1", ActorRole::Admin, None);
        self.post(
            "/v1/admin/agents",
            &admin,
            json!({"id": id, "display_name": id, "tools": ["search", "sql"], "tiers": ["free"]}),
        )
        .await;
        self.post(
            &format!("/v1/admin/agents/{id}/activate"),
            &admin,
            json!({}),
        )
        .await;
    }

    pub async fn instance(&self, user_token: &str, agent: &str) -> String {
        let body = self
            .post(
                "/v1/instances",
                user_token,
                json!({"agent_id": agent, "input": "why is my bill high?"}),
            )
            .await;
        body["instance_id"].as_str().unwrap().to_owned()
    }

    /// Opens a chat socket on replica `replica`, optionally resuming.
    pub async fn connect(&self, replica: usize, token: &str, resume: Option<&str>) -> Socket {
        let mut url = format!("ws://{}/v1/ws?token={token}", self.replicas[replica]);
        if let Some(resume) = resume {
            url.push_str(&format!("&resume={resume}"));
        }
        let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        socket
    }

    /// A socket to `replica` authenticated as a browser does: the token offered as a
    /// subprotocol (`protocols`, as the `Sec-WebSocket-Protocol` header); also returns the
    /// protocol the server selected.
    pub async fn connect_with_protocols(
        &self,
        replica: usize,
        protocols: &str,
    ) -> (Socket, Option<String>) {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{}/v1/ws", self.replicas[replica])
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("sec-websocket-protocol", protocols.parse().unwrap());
        let (socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
        let selected = response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap().to_owned());
        (socket, selected)
    }

    /// The HTTP status and error code a WebSocket handshake offering `protocols` gets.
    pub async fn protocol_handshake(&self, protocols: &str) -> (StatusCode, Option<String>) {
        let response = self
            .upgrade_request("")
            .header("sec-websocket-protocol", protocols)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let code = response
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|body| body["error"]["code"].as_str().map(str::to_owned));
        (status, code)
    }

    /// A WebSocket upgrade request to replica 0 with `query`, sent over plain HTTP so the
    /// test sees the refusal's status and body.
    fn upgrade_request(&self, query: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("http://{}/v1/ws{query}", self.replicas[0]))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    }

    /// The HTTP status a WebSocket handshake gets.
    pub async fn handshake_status(&self, query: &str, header: Option<&str>) -> StatusCode {
        let mut request = self.upgrade_request(query);
        if let Some(h) = header {
            request = request.header("authorization", h);
        }
        request.send().await.unwrap().status()
    }

    /// Stops the workers and deletes the stack's queues and exchanges.
    pub async fn stop(mut self) {
        if let Some(w) = self.workers.take() {
            w.stop().await;
        }
        let amqp = self.settings.amqp.config();
        crate::broker::delete_topology(&amqp, &format!("{}.projector", amqp.exchange)).await;
    }
}

/// Starts run `id` and records `thoughts` thoughts (`thinking 0`, …) through the runner API.
pub async fn start_and_think(stack: &Stack, id: &str, thoughts: usize) {
    let runner = stack.runner();
    let base = format!("/v1/runner/instances/{id}");
    stack
        .post(
            &format!("{base}/start"),
            &runner,
            json!({"message": "On it", "prompt": "SECRET SYSTEM PROMPT"}),
        )
        .await;
    for i in 0..thoughts {
        stack
            .post(
                &format!("{base}/thoughts"),
                &runner,
                json!({"thought": format!("thinking {i}"), "prompt": "SECRET PROMPT"}),
            )
            .await;
    }
}

/// The scripted steps of a run, through the runner API; returns how many events it appended.
pub async fn script(stack: &Stack, id: &str, thoughts: usize) -> usize {
    let runner = stack.runner();
    let base = format!("/v1/runner/instances/{id}");
    start_and_think(stack, id, thoughts).await;
    stack.post(&format!("{base}/tools"), &runner, json!({"call_id": "c1", "tool": "sql", "summary": "Querying costs", "arguments": {"query": "SECRET SQL"}})).await;
    stack
        .post(
            &format!("{base}/tools/c1/complete"),
            &runner,
            json!({"summary": "3 rows", "result": {"rows": "SECRET ROWS"}}),
        )
        .await;
    stack
        .post(
            &format!("{base}/complete"),
            &runner,
            json!({"output": "Your bill is high because of X", "raw": {"secret": "SECRET RAW"}}),
        )
        .await;
    thoughts + 4
}

/// The step types `script` produces, in order.
pub fn script_types(thoughts: usize) -> Vec<String> {
    let mut types = vec!["agent_started".to_owned()];
    types.extend(std::iter::repeat_n("agent_thinking".to_owned(), thoughts));
    types.extend(["tool_executing", "tool_completed", "agent_completed"].map(str::to_owned));
    types
}

/// Reads step messages until `count` arrived or `timeout` passed.
pub async fn read_steps(socket: &mut Socket, count: usize, timeout: Duration) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => out.push(serde_json::from_str(&text).unwrap()),
            Ok(Some(Ok(Message::Ping(p)))) => socket.send(Message::Pong(p)).await.unwrap(),
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    out
}

/// `(instance, sequence)` of step messages.
pub fn keys(messages: &[Value]) -> Vec<(String, i64)> {
    messages
        .iter()
        .map(|m| {
            (
                m["instance_id"].as_str().unwrap().to_owned(),
                m["sequence"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Fails when any message carries internal detail.
pub fn assert_no_internal(messages: &[Value]) {
    for m in messages {
        let text = m.to_string();
        assert!(!text.contains("SECRET"), "internal detail leaked: {text}");
        for key in [
            "internal",
            "prompt",
            "arguments",
            "result",
            "raw",
            "owner_id",
        ] {
            assert!(
                m["data"].get(key).is_none() && m.get(key).is_none(),
                "{key} leaked: {text}"
            );
        }
    }
}
