//! An isolated stack per scenario: its own database `apex_bench_<uuid>`, its own exchanges and
//! projector queues, an API on port 0, the relay and projectors in-process; all dropped at the
//! end.

use std::net::SocketAddr;

use anyhow::Context;
use apex_api::AppState;
use apex_domain::{ActorRole, Tier};
use apex_projections::ProjectorGroup;
use apex_projections::amqp::{self, AmqpConfig};
use apex_projections::projector::ProjectorConfig;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions, QueuePurgeOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::config::{JwtAlgorithm, Secret, Settings};
use crate::startup::{self, Application, Workers};

/// Rate limits high enough never to apply.
pub(crate) const UNLIMITED: u32 = 1_000_000;

/// One scenario's isolated resources.
pub(crate) struct Stack {
    /// Settings pointing at the isolated database and exchanges.
    pub settings: Settings,
    /// A pool on the isolated database.
    pub pool: PgPool,
    /// Projector queues are `<queue_prefix>.<read model>`.
    pub queue_prefix: String,
    apps: Vec<oneshot::Sender<()>>,
    workers: Option<Workers>,
}

/// A running API.
pub(crate) struct App {
    /// Its base URL.
    pub url: String,
    /// Its state (the command service, for seeding without HTTP).
    pub state: AppState,
}

impl Stack {
    /// Creates and migrates the database; `pool_size` connections for the scenario's pool
    /// (and for each API it starts).
    pub(crate) async fn create(base: &Settings, pool_size: u32) -> anyhow::Result<Self> {
        let id = Uuid::new_v4().simple().to_string();
        let mut settings = base.clone();
        settings.database.name = format!("apex_bench_{id}");
        settings.database.create_if_missing = true;
        settings.database.max_connections = pool_size;
        settings.amqp.exchange = format!("apex.bench.{id}");
        settings.amqp.chat_exchange = format!("apex.bench.{id}.chat");
        settings.http.host = "127.0.0.1".to_owned();
        settings.http.port = 0;
        // The bench measures capacity; the per-principal rate limiter is a policy on top.
        settings.rate_limit.commands_per_second = UNLIMITED;
        settings.rate_limit.burst = UNLIMITED;
        settings.rate_limit.runner_commands_per_second = UNLIMITED;
        settings.rate_limit.runner_burst = UNLIMITED;
        // Tokens are minted here, so the bench always signs with its own HS256 secret.
        settings.auth.algorithm = JwtAlgorithm::HS256;
        settings.auth.key = Secret::new(format!(
            "{}{}",
            Uuid::new_v4().simple(),
            Uuid::new_v4().simple()
        ));
        let pool = startup::prepare_database(&settings.database)
            .await
            .context("creating the bench database")?;
        let queue_prefix = format!("{}.projector", settings.amqp.exchange);
        Ok(Self {
            settings,
            pool,
            queue_prefix,
            apps: Vec::new(),
            workers: None,
        })
    }

    /// Starts an API in this process over the stack's database.
    pub(crate) async fn app(&mut self) -> anyhow::Result<App> {
        let pool = apex_commands::connect(
            self.settings.database.options(),
            self.settings.database.max_connections,
        );
        let app = Application::build_with_pool(&self.settings, pool).await?;
        let address: SocketAddr = app.local_addr()?;
        let state = app.state.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = app.run_until(shutdown).await {
                tracing::error!(error = %format!("{e:#}"), "bench API stopped");
            }
        });
        self.apps.push(stop);
        Ok(App {
            url: format!("http://{address}"),
            state,
        })
    }

    /// Starts the relay (when `relay`) and the projector `groups`.
    pub(crate) fn workers(&mut self, relay: bool, groups: &[ProjectorGroup]) {
        self.workers = Some(Workers::start_with_prefix(
            &self.settings,
            startup::worker_pool(&self.settings),
            relay,
            groups,
            &self.queue_prefix,
        ));
    }

    /// Stops the relay and projectors.
    pub(crate) async fn stop_workers(&mut self) {
        if let Some(workers) = self.workers.take() {
            workers.stop().await;
        }
    }

    /// The broker settings of the stack.
    pub(crate) fn amqp(&self) -> AmqpConfig {
        self.settings.amqp.config()
    }

    /// The projector settings of the stack (its queue names).
    pub(crate) fn projector_config(&self) -> ProjectorConfig {
        let mut config = ProjectorConfig::new(self.amqp());
        config.queue_prefix = self.queue_prefix.clone();
        config
    }

    /// A token signed with the stack's secret.
    pub(crate) fn token(
        &self,
        sub: &str,
        role: ActorRole,
        tier: Option<Tier>,
    ) -> anyhow::Result<String> {
        startup::authenticator(&self.settings)?
            .mint(sub, role, tier, 24 * 3600)
            .map_err(|e| anyhow::anyhow!("minting a bench token: {e}"))
    }

    /// Empties every projector queue (between two phases of a scenario).
    pub(crate) async fn purge_queues(&self) -> anyhow::Result<()> {
        let connection = amqp::connect(&self.amqp(), "apex-bench-purge").await?;
        let channel = connection.create_channel().await?;
        let config = self.projector_config();
        for queue in config.queues() {
            // A queue that does not exist closes the channel; purge what exists.
            let _ = channel
                .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
                .await;
        }
        let _ = connection.close(200, "purged".into()).await;
        Ok(())
    }

    /// Stops everything and drops the database, the queues and the exchanges.
    pub(crate) async fn teardown(mut self) -> anyhow::Result<()> {
        self.stop_workers().await;
        for stop in self.apps.drain(..) {
            let _ = stop.send(());
        }
        self.pool.close().await;
        if let Err(e) = self.delete_broker_objects().await {
            tracing::warn!(error = %format!("{e:#}"), "bench: cannot delete queues/exchanges");
        }
        let mut conn = PgConnection::connect_with(&self.settings.database.server_options())
            .await
            .context("connecting to drop the bench database")?;
        let name = self.settings.database.name.replace('"', "\"\"");
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("dropping database {name}"))?;
        let _ = conn.close().await;
        Ok(())
    }

    async fn delete_broker_objects(&self) -> anyhow::Result<()> {
        let connection = amqp::connect(&self.amqp(), "apex-bench-teardown").await?;
        let config = self.projector_config();
        for queue in config.queues() {
            // Each delete on its own channel: deleting a missing queue is fine in RabbitMQ,
            // but a failure must not stop the rest.
            let channel = connection.create_channel().await?;
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in [
            &self.settings.amqp.exchange,
            &self.settings.amqp.chat_exchange,
        ] {
            let channel = connection.create_channel().await?;
            let _ = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = connection.close(200, "bench done".into()).await;
        Ok(())
    }
}

/// Tears `stack` down, then returns `result` (the scenario's error first, if any).
pub(crate) async fn finish<T>(stack: Stack, result: anyhow::Result<T>) -> anyhow::Result<T> {
    let teardown = stack.teardown().await;
    let value = result?;
    teardown?;
    Ok(value)
}

/// Waits until every instance projector has applied at least `events` events (or `timeout`).
pub(crate) async fn wait_projected(
    pool: &PgPool,
    events: i64,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let done = min_instance_processed(pool).await?;
        if done >= events {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("projectors applied {done} of {events} events within {timeout:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The fewest events any instance projector has applied (0 before they all started).
pub(crate) async fn min_instance_processed(pool: &PgPool) -> anyhow::Result<i64> {
    let (count, min): (i64, Option<i64>) = sqlx::query_as(
        "SELECT count(*), min(processed_total) FROM projector_status
          WHERE projector IN ('instances', 'agent_stats', 'usage')",
    )
    .fetch_one(pool)
    .await?;
    Ok(if count < 3 { 0 } else { min.unwrap_or(0) })
}
