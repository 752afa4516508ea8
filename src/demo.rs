//! `apex demo`: drives a scripted agent run through the public API and prints, as they arrive,
//! the messages a chat client receives on its WebSocket. A first look at Apex, and a smoke test.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use apex_domain::{ActorRole, Tier};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::config::Settings;
use crate::startup;

/// Runs the demo against the API at `base` (e.g. `http://127.0.0.1:8080`).
pub async fn run(settings: &Settings, base: &str) -> anyhow::Result<()> {
    let auth = startup::authenticator(settings)?;
    let mint = |sub: &str, role, tier| {
        auth.mint(sub, role, tier, 3600)
            .map_err(|e| anyhow::anyhow!(e))
    };
    let admin = mint("demo-admin", ActorRole::Admin, None)?;
    let user = mint("demo-user", ActorRole::User, Some(Tier::Enterprise))?;
    let runner = mint("demo-runner", ActorRole::Runner, None)?;
    let api = Api {
        http: reqwest::Client::new(),
        base: base.to_owned(),
    };
    let agent = "spend-analyst";
    let (status, body) = api
        .post(
            "/v1/admin/agents",
            &admin,
            json!({
                "id": agent, "display_name": "Spend analyst",
                "description": "Finds where your AI spend goes", "tools": ["query_costs"],
                "tiers": ["free", "early", "mid", "enterprise"]
            }),
        )
        .await?;
    if !status.is_success() && body["error"]["code"] != "agent_already_exists" {
        bail!("defining the demo agent failed: {status} {body}");
    }
    let (status, body) = api
        .post(
            &format!("/v1/admin/agents/{agent}/activate"),
            &admin,
            json!({}),
        )
        .await?;
    if !status.is_success() && body["error"]["code"] != "invalid_agent_transition" {
        bail!("activating the demo agent failed: {status} {body}");
    }

    let ws_base = base.replacen("http", "ws", 1);
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("{ws_base}/v1/ws?token={user}"))
        .await
        .context("connecting the chat WebSocket")?;
    let (status, body) = api
        .post(
            "/v1/instances",
            &user,
            json!({"agent_id": agent, "input": "Why did my AI bill double last month?"}),
        )
        .await?;
    if !status.is_success() {
        bail!("starting a run failed: {status} {body}");
    }
    let id = body["instance_id"]
        .as_str()
        .context("no instance_id in the answer")?
        .to_owned();
    println!("run {id} created; chat client messages follow\n");

    let script = tokio::spawn({
        let api = api.clone();
        let base_path = format!("/v1/runner/instances/{id}");
        async move {
            let steps = [
                (
                    "start",
                    json!({"message": "Looking at your usage", "prompt": "internal system prompt"}),
                ),
                (
                    "thoughts",
                    json!({"thought": "Comparing this month's token usage with last month's"}),
                ),
                (
                    "tools",
                    json!({"call_id": "q1", "tool": "query_costs", "summary": "Querying costs by model", "arguments": {"sql": "internal"}}),
                ),
                (
                    "tools/q1/complete",
                    json!({"summary": "Found 3 models; gpt-large is 81% of spend", "result": {"rows": "internal"}}),
                ),
                (
                    "thoughts",
                    json!({"thought": "Usage of gpt-large tripled after the 12th"}),
                ),
                (
                    "complete",
                    json!({"output": "Your bill doubled because a new workflow sends long prompts to gpt-large. Routing it to a smaller model would save about 60%."}),
                ),
            ];
            for (step, body) in steps {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let (status, answer) = api
                    .post(&format!("{base_path}/{step}"), &runner, body)
                    .await?;
                if !status.is_success() {
                    bail!("runner step {step} failed: {status} {answer}");
                }
            }
            Ok(())
        }
    });

    let started = Instant::now();
    let deadline = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            message = socket.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    let value: Value = serde_json::from_str(&text).context("a non-JSON message")?;
                    println!("+{:>5} ms  {}", started.elapsed().as_millis(), value);
                    if matches!(value["type"].as_str(), Some("agent_completed" | "agent_failed" | "agent_cancelled")) {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("the WebSocket failed: {e}"),
                None => bail!("the server closed the WebSocket"),
            },
            () = &mut deadline => bail!("no completion within 30 s: are the relay and projectors running (`apex all`)?"),
        }
    }
    script.await.context("the runner script panicked")??;
    println!("\nrun {id} finished");
    Ok(())
}

#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn post(
        &self,
        path: &str,
        token: &str,
        body: Value,
    ) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .post(&url)
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST {url} (is `apex all` running?)"))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }
}
