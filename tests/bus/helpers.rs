//! A fresh database, a unique exchange and queue prefix, and helpers to drive the bus.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use apex::config::Settings;
use apex::startup;
use apex_commands::{CommandContext, CommandService, RetryPolicy};
use apex_domain::agent::{AgentAction, AgentCommand, AgentDefinition};
use apex_domain::instance::InstanceAction;
use apex_domain::{Actor, ActorRole, AgentId, Tier};
use apex_projections::ProjectorGroup;
use apex_projections::amqp::{self, AmqpConfig};
use apex_projections::projector::{self, ProjectorConfig};
use apex_projections::relay::{self, RelayConfig};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

pub struct Bus {
    pub pool: PgPool,
    pub settings: Settings,
    pub amqp: AmqpConfig,
    pub prefix: String,
    pub commands: CommandService,
    pub shutdown: watch::Sender<bool>,
    pub connection: Connection,
    pub taps: std::sync::Mutex<Vec<String>>,
}

pub async fn bus() -> Bus {
    let id = Uuid::new_v4().simple().to_string();
    let name = format!("apex_test_{id}");
    let text = include_str!("../../environments/dev/apex.toml");
    let vars = vec![
        ("APEX_DATABASE_PASSWORD".to_owned(), String::new()),
        ("APEX_AMQP_PASSWORD".to_owned(), "guest".to_owned()),
        (
            "APEX_JWT_SECRET".to_owned(),
            "apex-test-secret-0123456789-0123456789".to_owned(),
        ),
        ("APEX__DATABASE__NAME".to_owned(), name),
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
    let settings = Settings::from_toml(text, Path::new("dev"), vars).unwrap();
    let pool = startup::prepare_database(&settings.database).await.unwrap();
    let amqp = settings.amqp.config();
    let connection = amqp::connect(&amqp, "apex-test").await.unwrap();
    let (shutdown, _) = watch::channel(false);
    Bus {
        commands: CommandService::new(pool.clone(), RetryPolicy::default()),
        pool,
        settings,
        amqp,
        prefix: format!("apex.test.{id}.projector"),
        shutdown,
        connection,
        taps: std::sync::Mutex::new(Vec::new()),
    }
}

impl Bus {
    pub fn relay_config(&self) -> RelayConfig {
        let mut config = RelayConfig::new(self.amqp.clone());
        config.name = format!("test-{}", &self.prefix[10..18]);
        config.poll_interval = Duration::from_millis(100);
        config.projector_queue_prefix = self.prefix.clone();
        config
    }

    pub fn projector_config(&self) -> ProjectorConfig {
        let mut config = ProjectorConfig::new(self.amqp.clone());
        config.queue_prefix = self.prefix.clone();
        config
    }

    /// Starts a relay task.
    pub fn spawn_relay(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(relay::run(
            self.pool.clone(),
            self.relay_config(),
            self.shutdown.subscribe(),
        ))
    }

    /// Declares every projector queue, so nothing published is lost before they consume.
    pub async fn declare_projectors(&self) {
        let channel = self.connection.create_channel().await.unwrap();
        for group in ProjectorGroup::ALL {
            projector::declare(&channel, &self.projector_config(), group)
                .await
                .unwrap();
        }
    }

    /// Starts one task per projector group.
    pub fn spawn_projectors(&self) -> Vec<tokio::task::JoinHandle<()>> {
        ProjectorGroup::ALL
            .into_iter()
            .map(|g| {
                tokio::spawn(projector::run(
                    self.pool.clone(),
                    g,
                    self.projector_config(),
                    self.shutdown.subscribe(),
                ))
            })
            .collect()
    }

    /// A queue bound to every routing key of the test exchange.
    pub async fn tap(&self, name: &str) -> (Channel, String) {
        let queue = format!("{}.tap.{name}", self.prefix);
        self.bound_tap(&self.amqp.exchange, queue, &["#"]).await
    }

    /// A queue bound to the chat exchange as an API replica binds it (key `updates`).
    pub async fn chat_tap(&self, name: &str) -> (Channel, String) {
        let queue = format!("{}.chat.{name}", self.prefix);
        let key = apex_projections::chat::BATCH_ROUTING_KEY;
        self.bound_tap(&self.amqp.chat_exchange, queue, &[key])
            .await
    }

    /// `queue` bound to `exchange` with `keys` (both declared), deleted by [`Bus::finish`].
    async fn bound_tap(&self, exchange: &str, queue: String, keys: &[&str]) -> (Channel, String) {
        let channel = self.connection.create_channel().await.unwrap();
        amqp::declare_exchange(&channel, exchange).await.unwrap();
        amqp::declare_bound_queue(&channel, exchange, &queue, amqp::QueueType::Classic, keys)
            .await
            .unwrap();
        self.taps.lock().unwrap().push(queue.clone());
        (channel, queue)
    }

    /// Reads messages from `queue` until `count` arrived or `timeout` passed.
    pub async fn drain(
        &self,
        channel: &Channel,
        queue: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<Value> {
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                format!("tap-{}", Uuid::new_v4()).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < count {
            let next = tokio::time::timeout_at(deadline, consumer.next()).await;
            let Ok(Some(Ok(delivery))) = next else { break };
            out.push(serde_json::from_slice(&delivery.data).unwrap());
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        out
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

    /// Creates and starts a run for `user`; returns its id.
    pub async fn run(&self, user: &str, agent: &str) -> String {
        let ctx = CommandContext::new(Actor::new(user, ActorRole::User));
        let id = Uuid::now_v7().to_string();
        self.commands
            .create_instance(
                id.clone(),
                AgentId::parse(agent).unwrap(),
                Tier::Free,
                None,
                "hello".to_owned(),
                &ctx,
            )
            .await
            .unwrap();
        self.step(
            &id,
            InstanceAction::Start {
                message: None,
                prompt: Some("system prompt".to_owned()),
            },
        )
        .await;
        id
    }

    pub async fn step(&self, id: &str, action: InstanceAction) {
        let ctx = CommandContext::new(Actor::new("runner-1", ActorRole::Runner));
        self.commands.instance(id, action, &ctx).await.unwrap();
    }

    pub async fn think(&self, id: &str, n: usize) {
        for i in 0..n {
            self.step(
                id,
                InstanceAction::Think {
                    thought: format!("thought {i}"),
                    prompt: None,
                    raw: None,
                },
            )
            .await;
        }
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
            assert!(
                tokio::time::Instant::now() < deadline,
                "{behind} aggregate/projector pairs still behind"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

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

    /// Stops the workers and deletes the test's queues and exchange.
    pub async fn finish(self, tasks: Vec<tokio::task::JoinHandle<()>>) {
        let _ = self.shutdown.send(true);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let channel = self.connection.create_channel().await.unwrap();
        for queue in self.projector_config().queues() {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let taps = self.taps.lock().unwrap().clone();
        for queue in taps {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in [&self.amqp.exchange, &self.amqp.chat_exchange] {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}

/// Appends one ThoughtRecorded row directly, in the caller's transaction.
pub async fn insert_raw(conn: &mut sqlx::PgConnection, aggregate_id: &str, sequence: i64) {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('instance', $1, $2, 'ThoughtRecorded', '1', $3, $4)",
    )
    .bind(aggregate_id)
    .bind(sequence)
    .bind(serde_json::json!({"ThoughtRecorded": {"display": {"thought": format!("t{sequence}")}, "internal": {"prompt": null, "raw": null}}}))
    .bind(serde_json::json!({"correlation_id": id, "causation_id": id, "principal": "runner-1", "principal_role": "runner"}))
    .execute(conn)
    .await
    .unwrap();
}
