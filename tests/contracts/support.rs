//! A fresh database and a uniquely named exchange per test, removed again by [`Env::finish`].

use std::path::Path;

use apex::config::Settings;
use apex::startup;
use apex_commands::{CommandContext, CommandService, RetryPolicy};
use apex_domain::agent::{AgentAction, AgentCommand, AgentDefinition};
use apex_domain::instance::InstanceAction;
use apex_domain::{Actor, ActorRole, AgentId, Tier};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

pub struct Env {
    pub id: String,
    pub settings: Settings,
    pub pool: PgPool,
    pub commands: CommandService,
}

pub async fn env() -> Env {
    let id = Uuid::new_v4().simple().to_string();
    let text = include_str!("../../environments/dev/apex.toml");
    let vars = vec![
        ("APEX_DATABASE_PASSWORD".to_owned(), String::new()),
        ("APEX_AMQP_PASSWORD".to_owned(), "guest".to_owned()),
        (
            "APEX_JWT_SECRET".to_owned(),
            "apex-test-secret-0123456789-0123456789".to_owned(),
        ),
        ("APEX__DATABASE__NAME".to_owned(), format!("apex_test_{id}")),
        ("APEX__DATABASE__MAX_CONNECTIONS".to_owned(), "8".to_owned()),
        ("APEX__AMQP__EXCHANGE".to_owned(), format!("apex.test.{id}")),
        (
            "APEX__AMQP__CHAT_EXCHANGE".to_owned(),
            format!("apex.test.{id}.chat"),
        ),
    ];
    let settings = Settings::from_toml(text, Path::new("dev"), vars).unwrap();
    let pool = startup::prepare_database(&settings.database).await.unwrap();
    Env {
        id,
        commands: CommandService::new(pool.clone(), RetryPolicy::default()),
        settings,
        pool,
    }
}

impl Env {
    pub async fn admin(&self, agent: &str, action: AgentAction) {
        let ctx = CommandContext::new(Actor::new("admin-1", ActorRole::Admin));
        let command = AgentCommand {
            id: AgentId::parse(agent).unwrap(),
            actor: ctx.actor.clone(),
            action,
        };
        self.commands.agent(command, &ctx).await.unwrap();
    }

    pub async fn define(&self, agent: &str, tools: &[&str]) {
        let definition = AgentDefinition {
            display_name: agent.to_owned(),
            description: "contract test agent".to_owned(),
            tools: tools.iter().map(|t| (*t).to_owned()).collect(),
            tiers: Tier::ALL.into_iter().collect(),
        };
        self.admin(agent, AgentAction::Define(definition)).await;
    }

    /// Creates a run for `user-1`; returns its id.
    pub async fn create(&self, agent: &str) -> String {
        let ctx = CommandContext::new(Actor::new("user-1", ActorRole::User));
        let id = Uuid::now_v7().to_string();
        self.commands
            .create_instance(
                id.clone(),
                AgentId::parse(agent).unwrap(),
                Tier::Mid,
                None,
                "Why did our spend double?".to_owned(),
                &ctx,
            )
            .await
            .unwrap();
        id
    }

    pub async fn step(&self, id: &str, role: ActorRole, action: InstanceAction) {
        let principal = if role == ActorRole::User {
            "user-1"
        } else {
            "runner-1"
        };
        let ctx = CommandContext::new(Actor::new(principal, role));
        self.commands.instance(id, action, &ctx).await.unwrap();
    }

    /// Closes the pool and drops the test database.
    pub async fn finish(self) {
        self.pool.close().await;
        let mut conn = PgConnection::connect_with(&self.settings.database.server_options())
            .await
            .unwrap();
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.settings.database.name
        ))
        .execute(&mut conn)
        .await
        .unwrap();
    }
}
