//! `stack()`: a fresh database, unique exchanges and queues, the API on port 0, the relay and
//! every projector; helpers to drive runs and compare read models (adapted from tests/bus).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use apex::config::Settings;
use apex::startup::{self, Application, Workers};
use apex_commands::{CommandContext, CommandService, RetryPolicy};
use apex_domain::agent::{AgentAction, AgentCommand, AgentDefinition};
use apex_domain::instance::InstanceAction;
use apex_domain::{Actor, ActorRole, AgentId, Tier};
use apex_projections::ProjectorGroup;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

/// A running stack.
pub struct Stack {
    pub settings: Settings,
    pub pool: PgPool,
    pub address: String,
    pub client: reqwest::Client,
    pub commands: CommandService,
    pub workers: Workers,
    queue_prefix: String,
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
        ("APEX__DATABASE__MAX_CONNECTIONS", "24".to_owned()),
        ("APEX__AMQP__EXCHANGE", format!("apex.test.{id}")),
        ("APEX__AMQP__CHAT_EXCHANGE", format!("apex.test.{id}.chat")),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    Settings::from_toml(text, Path::new("dev"), vars).unwrap()
}

/// Starts the API, the relay and every projector over a fresh database.
pub async fn stack() -> Stack {
    let settings = settings();
    let pool = startup::prepare_database(&settings.database).await.unwrap();
    let app = Application::build_with_pool(&settings, pool.clone())
        .await
        .unwrap();
    let address = format!("http://{}", app.local_addr().unwrap());
    tokio::spawn(app.run_until(std::future::pending()));
    let queue_prefix = format!("{}.projector", settings.amqp.exchange);
    let workers = Workers::start_with_prefix(
        &settings,
        pool.clone(),
        true,
        &apex_projections::ProjectorGroup::ALL,
        &queue_prefix,
    );
    Stack {
        commands: CommandService::new(pool.clone(), RetryPolicy::default()),
        settings,
        pool,
        address,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        workers,
        queue_prefix,
    }
}

impl Stack {
    pub fn token(&self, sub: &str, role: ActorRole, tier: Option<Tier>) -> String {
        startup::authenticator(&self.settings)
            .unwrap()
            .mint(sub, role, tier, 600)
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// Defines and activates an agent open to every tier.
    pub async fn agent(&self, id: &str, tools: &[&str]) {
        let admin = CommandContext::new(Actor::new("admin-1", ActorRole::Admin));
        for action in [
            AgentAction::Define(AgentDefinition {
                display_name: id.to_owned(),
                description: String::new(),
                tools: tools.iter().map(|t| (*t).to_owned()).collect(),
                tiers: Tier::ALL.into_iter().collect(),
            }),
            AgentAction::Activate,
        ] {
            let command = AgentCommand {
                id: AgentId::parse(id).unwrap(),
                actor: admin.actor.clone(),
                action,
            };
            self.commands.agent(command, &admin).await.unwrap();
        }
    }

    /// A whole run for `user`: created, started, `thoughts` thoughts, one tool call, then
    /// completed, failed or cancelled by `n % 3`. Returns its id.
    pub async fn full_run(&self, user: &str, agent: &str, thoughts: usize, n: usize) -> String {
        let ctx = CommandContext::new(Actor::new(user, ActorRole::User));
        let id = Uuid::now_v7().to_string();
        self.commands
            .create_instance(
                id.clone(),
                AgentId::parse(agent).unwrap(),
                Tier::Free,
                None,
                format!("run {n}"),
                &ctx,
            )
            .await
            .unwrap();
        let mut steps = vec![InstanceAction::Start {
            message: None,
            prompt: Some("system prompt".to_owned()),
        }];
        steps.extend((0..thoughts).map(|i| InstanceAction::Think {
            thought: format!("thought {i}"),
            prompt: None,
            raw: None,
        }));
        steps.push(InstanceAction::StartTool {
            call_id: "c1".to_owned(),
            tool: "search".to_owned(),
            summary: Some("searching".to_owned()),
            arguments: json!({"q": n}),
        });
        steps.push(InstanceAction::CompleteTool {
            call_id: "c1".to_owned(),
            is_error: false,
            summary: None,
            result: json!({"rows": n}),
            duration_ms: Some(12),
        });
        steps.push(match n % 3 {
            0 => InstanceAction::Complete {
                output: "done".to_owned(),
                raw: None,
            },
            1 => InstanceAction::Fail {
                error: "model timeout".to_owned(),
                raw: None,
            },
            _ => InstanceAction::Cancel { reason: None },
        });
        for action in steps {
            let runner = CommandContext::new(Actor::new("runner-1", ActorRole::Runner));
            let ctx = if matches!(action, InstanceAction::Cancel { .. }) {
                &ctx
            } else {
                &runner
            };
            self.commands.instance(&id, action, ctx).await.unwrap();
        }
        id
    }

    /// Waits until every projector has applied every event (offsets match the store).
    pub async fn wait_projected(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let behind: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM (SELECT aggregate_type, aggregate_id, max(sequence) AS s FROM events GROUP BY 1, 2) e
                   CROSS JOIN (SELECT unnest($1::text[]) AS projector) p
                   LEFT JOIN projector_offsets o
                     ON o.projector = p.projector AND o.aggregate_type = e.aggregate_type AND o.aggregate_id = e.aggregate_id
                  WHERE (e.aggregate_type = 'agent') = (p.projector = 'agents')
                    AND coalesce(o.last_sequence, 0) < e.s",
            )
            .bind(
                ProjectorGroup::projected()
                    .map(|m| m.name())
                    .collect::<Vec<_>>(),
            )
            .fetch_one(&self.pool)
            .await
            .unwrap();
            if behind == 0 {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let relay: Vec<(String, i64, i64)> =
                    sqlx::query_as("SELECT name, position, published_total FROM relay_checkpoints")
                        .fetch_all(&self.pool)
                        .await
                        .unwrap();
                let projectors: Vec<(String, i64, i64)> = sqlx::query_as(
                    "SELECT projector, processed_total, retried_total FROM projector_status",
                )
                .fetch_all(&self.pool)
                .await
                .unwrap();
                let dead: Vec<(String, String)> =
                    sqlx::query_as("SELECT projector, reason FROM dead_letters LIMIT 5")
                        .fetch_all(&self.pool)
                        .await
                        .unwrap();
                panic!(
                    "{behind} aggregate/projector pairs still behind; relay {relay:?}, \
                     projectors {projectors:?}, dead letters {dead:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every read-model row, as text, by table.
    /// Every read-model row, as text, by table.
    pub async fn read_models(&self) -> BTreeMap<&'static str, Vec<String>> {
        let mut conn = self.pool.acquire().await.unwrap();
        apex_projections::consistency::live(&mut conn)
            .await
            .unwrap()
    }

    /// The read models as a fresh replay of the store produces them (rolled back afterwards).
    pub async fn replayed_read_models(&self) -> BTreeMap<&'static str, Vec<String>> {
        apex_projections::consistency::replayed(&self.pool)
            .await
            .unwrap()
    }

    /// Stops the workers and deletes the test's queues and exchanges.
    pub async fn finish(self) {
        let stopped = tokio::time::timeout(Duration::from_secs(30), self.workers.stop()).await;
        assert!(stopped.is_ok(), "the workers did not stop");
        crate::broker::delete_topology(&self.settings.amqp.config(), &self.queue_prefix).await;
    }
}
