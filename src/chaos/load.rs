//! The chaos load: workers driving runs through the HTTP API with idempotency keys, and one
//! chat client per user that reconnects and resumes whenever its replica dies.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apex_domain::{ActorRole, Tier};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use super::ChaosOptions;
use super::cluster::Cluster;
use crate::startup;

/// A command answered 2xx.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The run.
    pub instance: String,
    /// The sequence the answer named.
    pub sequence: i64,
    /// The event type the command must have appended.
    pub event_type: &'static str,
}

/// What the workers saw.
#[derive(Debug, Default)]
pub struct Outcomes {
    pub accepted: Vec<Accepted>,
    pub replayed: u64,
    pub retried: u64,
    pub findings: Vec<String>,
}

/// What the chat clients saw.
#[derive(Debug, Default)]
pub struct Streams {
    pub reconnects: u64,
    pub messages: u64,
    pub findings: Vec<String>,
}

struct Shared {
    stop: AtomicBool,
    finishing: AtomicBool,
    accepted: AtomicU64,
    /// Runs created per user.
    runs: Mutex<HashMap<String, Vec<String>>>,
}

/// The load generator.
pub struct Load {
    api: Vec<String>,
    http: reqwest::Client,
    admin: String,
    runner: String,
    users: Vec<(String, String)>,
    shared: Arc<Shared>,
    pool: sqlx::PgPool,
}

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

impl Load {
    pub fn new(cluster: &Cluster, options: &ChaosOptions) -> anyhow::Result<Self> {
        let auth = startup::authenticator(&cluster.settings)?;
        let mint = |sub: &str, role, tier| {
            auth.mint(sub, role, tier, 24 * 3600)
                .map_err(|e| anyhow::anyhow!("minting a token: {e}"))
        };
        let users = (0..options.users)
            .map(|u| {
                let sub = format!("chaos-user-{u}");
                let token = mint(&sub, ActorRole::User, Some(Tier::Enterprise))?;
                Ok((sub, token))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            api: cluster.api.clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            admin: mint("chaos-admin", ActorRole::Admin, None)?,
            runner: mint("chaos-runner", ActorRole::Runner, None)?,
            users,
            shared: Arc::new(Shared {
                stop: AtomicBool::new(false),
                finishing: AtomicBool::new(false),
                accepted: AtomicU64::new(0),
                runs: Mutex::new(HashMap::new()),
            }),
            pool: cluster.pool.clone(),
        })
    }

    /// Defines and activates the agent every run uses.
    pub async fn prepare(&self) -> anyhow::Result<()> {
        let mut outcomes = Outcomes::default();
        let body = json!({"id": "chaos", "display_name": "Chaos", "tools": ["search", "sql"],
                          "tiers": ["free", "early", "mid", "enterprise"]});
        send(
            &self.http,
            &self.api,
            &self.admin,
            "/v1/admin/agents",
            body,
            &mut outcomes,
            1,
        )
        .await;
        send(
            &self.http,
            &self.api,
            &self.admin,
            "/v1/admin/agents/chaos/activate",
            json!({}),
            &mut outcomes,
            2,
        )
        .await;
        if !outcomes.findings.is_empty() {
            anyhow::bail!("preparing the agent failed: {:?}", outcomes.findings);
        }
        Ok(())
    }

    pub fn done(&self, started: Instant, options: &ChaosOptions) -> bool {
        started.elapsed() >= options.duration
            || self.shared.accepted.load(Ordering::Relaxed) >= options.max_commands
    }

    /// How far the run is, from 0 to 1: by time or by accepted commands, whichever is further.
    pub fn progress(&self, started: Instant, options: &ChaosOptions) -> f64 {
        let by_time = started.elapsed().as_secs_f64() / options.duration.as_secs_f64();
        let by_commands =
            self.shared.accepted.load(Ordering::Relaxed) as f64 / options.max_commands as f64;
        by_time.max(by_commands).min(1.0)
    }

    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }

    pub fn start_workers(&self, options: &ChaosOptions) -> Vec<JoinHandle<Outcomes>> {
        (0..options.workers)
            .map(|w| {
                let (user, token) = self.users[w % self.users.len()].clone();
                let http = self.http.clone();
                let api = self.api.clone();
                let runner = self.runner.clone();
                let shared = self.shared.clone();
                tokio::spawn(async move {
                    worker(w as u64, http, api, user, token, runner, shared).await
                })
            })
            .collect()
    }

    pub fn start_clients(&self) -> Vec<JoinHandle<Streams>> {
        self.users
            .iter()
            .enumerate()
            .map(|(i, (user, token))| {
                let base = self.api[i % self.api.len()].clone();
                let other = self.api[(i + 1) % self.api.len()].clone();
                let shared = self.shared.clone();
                let pool = self.pool.clone();
                let (user, token) = (user.clone(), token.clone());
                tokio::spawn(
                    async move { client(vec![base, other], user, token, shared, pool).await },
                )
            })
            .collect()
    }

    /// Lets every client catch up, then collects what they found.
    pub async fn finish_clients(
        &self,
        clients: Vec<JoinHandle<Streams>>,
        timeout: Duration,
    ) -> Streams {
        self.shared.finishing.store(true, Ordering::Relaxed);
        let mut out = Streams::default();
        for c in clients {
            match tokio::time::timeout(timeout, c).await {
                Ok(Ok(s)) => {
                    out.reconnects += s.reconnects;
                    out.messages += s.messages;
                    out.findings.extend(s.findings);
                }
                Ok(Err(e)) => out.findings.push(format!("a chat client panicked: {e}")),
                Err(_) => out
                    .findings
                    .push("a chat client did not catch up in time".to_owned()),
            }
        }
        out
    }
}

/// Waits for every worker.
pub async fn join(workers: Vec<JoinHandle<Outcomes>>) -> Outcomes {
    let mut out = Outcomes::default();
    for w in workers {
        match w.await {
            Ok(o) => {
                out.accepted.extend(o.accepted);
                out.replayed += o.replayed;
                out.retried += o.retried;
                out.findings.extend(o.findings);
            }
            Err(e) => out.findings.push(format!("a load worker panicked: {e}")),
        }
    }
    out
}

/// Sends a command until it is answered (retrying transport errors, 5xx and 429 with the same
/// idempotency key); returns the answer of a 2xx.
async fn send(
    http: &reqwest::Client,
    api: &[String],
    token: &str,
    path: &str,
    body: Value,
    outcomes: &mut Outcomes,
    salt: u64,
) -> Option<Value> {
    let key = Uuid::new_v4().to_string();
    let mut delay = Duration::from_millis(50);
    for attempt in 0..60u64 {
        let base = &api[((salt + attempt) % api.len() as u64) as usize];
        let result = http
            .post(format!("{base}{path}"))
            .bearer_auth(token)
            .header("idempotency-key", &key)
            .json(&body)
            .send()
            .await;
        match result {
            Ok(response) if response.status().is_success() => {
                if response.headers().contains_key("idempotent-replayed") {
                    outcomes.replayed += 1;
                }
                return response.json().await.ok();
            }
            Ok(response) if response.status().is_server_error() || response.status() == 429 => {}
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                outcomes
                    .findings
                    .push(format!("POST {path}: unexpected {status} {text}"));
                return None;
            }
            Err(_) => {}
        }
        outcomes.retried += 1;
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
    outcomes
        .findings
        .push(format!("POST {path}: no answer after 60 attempts"));
    None
}

async fn worker(
    w: u64,
    http: reqwest::Client,
    api: Vec<String>,
    user: String,
    token: String,
    runner: String,
    shared: Arc<Shared>,
) -> Outcomes {
    let mut out = Outcomes::default();
    let mut seed = 0x2545_f491_4f6c_dd1d ^ (w + 1).wrapping_mul(0x9e37_79b9);
    'runs: while !shared.stop.load(Ordering::Relaxed) {
        let accept = |out: &mut Outcomes,
                      answer: Option<Value>,
                      event_type: &'static str|
         -> Option<String> {
            let answer = answer?;
            let instance = answer["instance_id"].as_str()?.to_owned();
            let sequence = answer["sequence"].as_i64()?;
            out.accepted.push(Accepted {
                instance: instance.clone(),
                sequence,
                event_type,
            });
            shared.accepted.fetch_add(1, Ordering::Relaxed);
            Some(instance)
        };
        let salt = rng(&mut seed);
        let created = send(
            &http,
            &api,
            &token,
            "/v1/instances",
            json!({"agent_id": "chaos", "input": "chaos"}),
            &mut out,
            salt,
        )
        .await;
        let Some(id) = accept(&mut out, created, "InstanceCreated") else {
            continue;
        };
        shared
            .runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(user.clone())
            .or_default()
            .push(id.clone());
        let base = format!("/v1/runner/instances/{id}");
        let mut steps: Vec<(String, Value, &'static str)> = vec![(
            format!("{base}/start"),
            json!({"message": "go"}),
            "InstanceStarted",
        )];
        for t in 0..(1 + rng(&mut seed) % 8) {
            steps.push((
                format!("{base}/thoughts"),
                json!({"thought": format!("t{t}")}),
                "ThoughtRecorded",
            ));
        }
        for c in 0..(rng(&mut seed) % 3) {
            steps.push((
                format!("{base}/tools"),
                json!({"call_id": format!("c{c}"), "tool": "sql", "arguments": {"q": c}}),
                "ToolCallStarted",
            ));
            steps.push((
                format!("{base}/tools/c{c}/complete"),
                json!({"result": {"rows": c}}),
                "ToolCallCompleted",
            ));
        }
        let ending = rng(&mut seed) % 10;
        for (path, body, event_type) in steps {
            if shared.stop.load(Ordering::Relaxed) {
                break 'runs;
            }
            let answer = send(&http, &api, &runner, &path, body, &mut out, rng(&mut seed)).await;
            if accept(&mut out, answer, event_type).is_none() {
                continue 'runs;
            }
        }
        let (path, body, token, event_type) = match ending {
            0 => (
                format!("{base}/fail"),
                json!({"error": "boom"}),
                &runner,
                "InstanceFailed",
            ),
            1 => (
                format!("/v1/instances/{id}/cancel"),
                json!({"reason": "enough"}),
                &token,
                "InstanceCancelled",
            ),
            _ => (
                format!("{base}/complete"),
                json!({"output": "done"}),
                &runner,
                "InstanceCompleted",
            ),
        };
        let answer = send(&http, &api, token, &path, body, &mut out, rng(&mut seed)).await;
        accept(&mut out, answer, event_type);
    }
    out
}

/// One user's chat client: connects, resumes every run of the user, records every step;
/// reconnects on any failure. When the run finishes it catches up and checks its stream.
async fn client(
    api: Vec<String>,
    user: String,
    token: String,
    shared: Arc<Shared>,
    pool: sqlx::PgPool,
) -> Streams {
    let mut out = Streams::default();
    let mut received: HashMap<Uuid, Vec<i64>> = HashMap::new();
    let mut attempt = 0usize;
    let mut quiet_since: Option<Instant> = None;
    loop {
        let base = api[attempt % api.len()].replacen("http", "ws", 1);
        attempt += 1;
        let Ok(Ok((mut socket, _))) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(format!("{base}/v1/ws?token={token}")),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let runs: Vec<String> = shared
            .runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&user)
            .cloned()
            .unwrap_or_default();
        // Resume every run this client knows of: the user's runs and any it already received
        // steps of (a run the server is not told about starts from its first step).
        let known: std::collections::BTreeSet<Uuid> = runs
            .iter()
            .filter_map(|r| Uuid::parse_str(r).ok())
            .chain(received.keys().copied())
            .collect();
        let resume: BTreeMap<String, i64> = known
            .into_iter()
            .map(|r| {
                (
                    r.to_string(),
                    received
                        .get(&r)
                        .and_then(|v| v.last().copied())
                        .unwrap_or(1),
                )
            })
            .collect();
        let message = json!({"type": "resume", "instances": resume}).to_string();
        if socket.send(Message::Text(message.into())).await.is_err() {
            out.reconnects += 1;
            continue;
        }
        loop {
            let next = tokio::time::timeout(Duration::from_millis(500), socket.next()).await;
            match next {
                Ok(Some(Ok(Message::Text(text)))) => {
                    quiet_since = None;
                    let Ok(value) = serde_json::from_str::<Value>(&text) else {
                        continue;
                    };
                    let (Some(id), Some(seq)) = (
                        value["instance_id"]
                            .as_str()
                            .and_then(|i| Uuid::parse_str(i).ok()),
                        value["sequence"].as_i64(),
                    ) else {
                        continue; // control messages (e.g. a resume of a run not projected yet)
                    };
                    received.entry(id).or_default().push(seq);
                    out.messages += 1;
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) => {
                    out.reconnects += 1;
                    break;
                }
                Err(_) => {
                    if shared.finishing.load(Ordering::Relaxed) {
                        // After quiescence: one last resume on a fresh connection, then check.
                        let since = *quiet_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_secs(2) {
                            check(&pool, &user, &received, &mut out).await;
                            return out;
                        }
                        if since.elapsed() < Duration::from_millis(600) {
                            break; // reconnect and resume everything once more
                        }
                    }
                }
            }
        }
    }
}

async fn check(
    pool: &sqlx::PgPool,
    user: &str,
    received: &HashMap<Uuid, Vec<i64>>,
    out: &mut Streams,
) {
    let expected: Vec<(Uuid, i64)> = match sqlx::query_as(
        "SELECT instance_id, max(sequence) FROM rm_timeline WHERE owner_id = $1 GROUP BY 1",
    )
    .bind(user)
    .fetch_all(pool)
    .await
    {
        Ok(rows) => rows,
        Err(e) => {
            out.findings
                .push(format!("{user}: cannot read the timeline: {e}"));
            return;
        }
    };
    for (instance, last) in expected {
        let got = received.get(&instance).cloned().unwrap_or_default();
        let want: Vec<i64> = (2..=last).collect();
        if got != want {
            let dup = got.len() - {
                let mut s = got.clone();
                s.sort();
                s.dedup();
                s.len()
            };
            out.findings.push(format!(
                "{user} {instance}: chat stream has {} steps (want {}), {dup} duplicate(s), ordered: {}",
                got.len(),
                want.len(),
                got.windows(2).all(|w| w[0] < w[1])
            ));
        }
    }
}
