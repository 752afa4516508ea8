//! The bench's clients: HTTP commands with JWTs, chat WebSockets that timestamp every step
//! they receive, and an open-loop (paced) command generator.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use super::stats::{Samples, rate};

/// The agent every scenario runs.
pub(crate) const AGENT: &str = "bench-agent";

/// An HTTP client of one API.
#[derive(Clone)]
pub(crate) struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    /// A client of the API at `base` (`http://host:port`).
    pub(crate) fn new(base: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(30))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            base: base.to_owned(),
        })
    }

    /// The base URL.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// POSTs JSON; returns the status and the body.
    pub(crate) async fn post(
        &self,
        path: &str,
        token: &str,
        body: &Value,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = response.status();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// POSTs JSON and fails unless the answer is a success.
    pub(crate) async fn post_ok(
        &self,
        path: &str,
        token: &str,
        body: &Value,
    ) -> anyhow::Result<Value> {
        let (status, answer) = self.post(path, token, body).await?;
        if !status.is_success() {
            bail!("POST {path}: {status} {answer}");
        }
        Ok(answer)
    }

    /// Defines and activates [`AGENT`], open to every tier.
    pub(crate) async fn agent(&self, admin: &str) -> anyhow::Result<()> {
        self.post_ok(
            "/v1/admin/agents",
            admin,
            &json!({
                "id": AGENT, "display_name": "Bench agent", "description": "benchmarks",
                "tools": ["search", "sql"], "tiers": ["free", "early", "mid", "enterprise"]
            }),
        )
        .await?;
        self.post_ok(
            &format!("/v1/admin/agents/{AGENT}/activate"),
            admin,
            &json!({}),
        )
        .await?;
        Ok(())
    }

    /// Creates a run of [`AGENT`] for the user of `token`; returns its id.
    pub(crate) async fn instance(&self, token: &str) -> anyhow::Result<String> {
        let answer = self
            .post_ok(
                "/v1/instances",
                token,
                &json!({"agent_id": AGENT, "input": "why is my AI bill so high?"}),
            )
            .await?;
        answer["instance_id"]
            .as_str()
            .map(str::to_owned)
            .context("no instance_id in the answer")
    }

    /// Moves a run to running.
    pub(crate) async fn start(&self, runner: &str, instance: &str) -> anyhow::Result<()> {
        self.post_ok(
            &format!("/v1/runner/instances/{instance}/start"),
            runner,
            &json!({"message": "On it"}),
        )
        .await?;
        Ok(())
    }
}

/// One keep-alive HTTP/1.1 connection to the API that POSTs JSON: the `write` scenario's load
/// generator. Lean as a dedicated load tool is (no pool, no URL parsing, the token's header
/// built once), so the little CPU the machine has goes to Apex rather than to its client.
pub(crate) struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: HeaderValue,
    authorization: HeaderValue,
}

impl Connection {
    /// Connects to the API at `base` (`http://host:port`) as the holder of `token`.
    pub(crate) async fn open(base: &str, token: &str) -> anyhow::Result<Self> {
        let address = base
            .strip_prefix("http://")
            .with_context(|| format!("{base} is not an http:// address"))?;
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .with_context(|| format!("connecting to {address}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "bench HTTP connection failed");
            }
        });
        Ok(Self {
            sender,
            host: HeaderValue::from_str(address)?,
            authorization: HeaderValue::from_str(&format!("Bearer {token}"))?,
        })
    }

    /// POSTs `body` (JSON) to `path`; returns the status once the whole answer is read.
    pub(crate) async fn post(&mut self, path: &str, body: Vec<u8>) -> anyhow::Result<StatusCode> {
        self.sender.ready().await?;
        let request = hyper::Request::post(path)
            .header(header::HOST, self.host.clone())
            .header(header::AUTHORIZATION, self.authorization.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        response.into_body().collect().await?;
        Ok(status)
    }
}

/// The body of a `thoughts` command.
pub(crate) fn thought(n: u64) -> Value {
    json!({"thought": format!("Comparing this month's token usage with last month's ({n})"),
           "prompt": "internal prompt"})
}

/// Steps received by chat clients: `(instance, sequence)` → when it arrived.
#[derive(Default)]
pub(crate) struct Inbox {
    seen: Mutex<HashMap<(Uuid, i64), Instant>>,
    /// Sockets the server closed or that failed.
    pub closed: AtomicU64,
}

impl Inbox {
    fn record(&self, key: (Uuid, i64), at: Instant) {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_insert(at);
    }

    fn get(&self, key: &(Uuid, i64)) -> Option<Instant> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
    }
}

#[derive(Deserialize)]
struct StepMessage {
    instance_id: Option<Uuid>,
    sequence: Option<i64>,
}

/// Opens a chat socket at `base` (`http://…`) for `token` and records what it receives in
/// `inbox` until the socket closes or the task is aborted.
pub(crate) async fn listen(
    base: &str,
    token: &str,
    inbox: Arc<Inbox>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let url = format!("{}/v1/ws?token={token}", base.replacen("http", "ws", 1));
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .context("opening a chat WebSocket")?;
    Ok(tokio::spawn(async move {
        while let Some(message) = socket.next().await {
            match message {
                Ok(Message::Text(text)) => {
                    let at = Instant::now();
                    if let Ok(StepMessage {
                        instance_id: Some(id),
                        sequence: Some(seq),
                    }) = serde_json::from_str::<StepMessage>(&text)
                    {
                        inbox.record((id, seq), at);
                    }
                }
                Ok(Message::Ping(payload)) => {
                    if socket.send(Message::Pong(payload)).await.is_err() {
                        break;
                    }
                }
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        inbox.closed.fetch_add(1, Ordering::Relaxed);
    }))
}

/// One command of a paced run: a path and a body.
pub(crate) struct Command {
    pub path: String,
    pub body: Value,
}

/// What a paced run measured.
pub(crate) struct Deliveries {
    /// Command accepted (HTTP answer received) → step received on the socket.
    pub accepted_to_received: Samples,
    /// Request sent → step received.
    pub sent_to_received: Samples,
    /// HTTP command latency.
    pub command: Samples,
    /// Commands accepted.
    pub accepted: usize,
    /// Commands refused or failed.
    pub failed: usize,
    /// Accepted steps that reached a socket.
    pub delivered: usize,
    /// Steps that arrived before the client had even read the HTTP answer.
    pub before_answer: usize,
    /// Commands per second actually offered.
    pub offered_rate: f64,
}

struct Accepted {
    key: (Uuid, i64),
    sent: Instant,
    answered: Instant,
}

/// Sends `commands` at `per_second` (open loop: the schedule does not wait for answers, at
/// most `in_flight` outstanding), then waits up to `wait` for every accepted step to reach a
/// socket of `inbox`.
pub(crate) async fn paced(
    api: &Api,
    token: &str,
    commands: Vec<Command>,
    per_second: f64,
    in_flight: usize,
    inbox: &Inbox,
    wait: Duration,
) -> anyhow::Result<Deliveries> {
    let accepted = Arc::new(Mutex::new(Vec::with_capacity(commands.len())));
    let failed = Arc::new(AtomicU64::new(0));
    let permits = Arc::new(Semaphore::new(in_flight));
    let token: Arc<str> = Arc::from(token);
    let mut tasks = JoinSet::new();
    let start = tokio::time::Instant::now();
    let total = commands.len();
    for (i, command) in commands.into_iter().enumerate() {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / per_second)).await;
        let permit = permits.clone().acquire_owned().await?;
        let (api, token, accepted, failed) =
            (api.clone(), token.clone(), accepted.clone(), failed.clone());
        tasks.spawn(async move {
            let sent = Instant::now();
            let result = api.post(&command.path, &token, &command.body).await;
            let answered = Instant::now();
            drop(permit);
            let key = match result {
                Ok((status, body)) if status.is_success() => body["instance_id"]
                    .as_str()
                    .and_then(|id| Uuid::parse_str(id).ok())
                    .zip(body["sequence"].as_i64()),
                Ok((status, body)) => {
                    tracing::warn!(%status, %body, "bench: command refused");
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "bench: command failed");
                    None
                }
            };
            match key {
                Some(key) => accepted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Accepted {
                        key,
                        sent,
                        answered,
                    }),
                None => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let offered_rate = rate(total as u64, start.elapsed());
    let accepted = std::mem::take(&mut *accepted.lock().unwrap_or_else(|p| p.into_inner()));
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline && accepted.iter().any(|a| inbox.get(&a.key).is_none()) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut out = Deliveries {
        accepted_to_received: Samples::default(),
        sent_to_received: Samples::default(),
        command: Samples::default(),
        accepted: accepted.len(),
        failed: failed.load(Ordering::Relaxed) as usize,
        delivered: 0,
        before_answer: 0,
        offered_rate,
    };
    for a in &accepted {
        out.command.push(a.answered - a.sent);
        let Some(received) = inbox.get(&a.key) else {
            continue;
        };
        out.delivered += 1;
        if received < a.answered {
            out.before_answer += 1;
        }
        out.accepted_to_received
            .push(received.saturating_duration_since(a.answered));
        out.sent_to_received
            .push(received.saturating_duration_since(a.sent));
    }
    Ok(out)
}
