//! Builds the application from settings: database, migrations, services, HTTP listener.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use apex_api::AppState;
use apex_api::auth::{Authenticator, KeyMaterial};
use apex_commands::{CommandService, RetryPolicy};
use apex_projections::ReadModel;
use apex_projections::projector::{self, ProjectorConfig, ProjectorGroup};
use apex_projections::relay::{self, RelayConfig};
use axum::serve::ListenerExt;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{DatabaseSettings, JwtAlgorithm, Settings};

/// Creates the database when missing (if allowed), connects and applies migrations; returns
/// the API's pool.
pub async fn prepare_database(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    let pool = apex_commands::connect(settings.options(), settings.max_connections);
    prepare(settings, pool).await
}

/// [`prepare_database`] for a process that runs only the relay or projectors: returns the
/// workers' pool ([`worker_pool`]), which also applies the migrations.
pub async fn prepare_worker_database(settings: &Settings) -> anyhow::Result<PgPool> {
    prepare(&settings.database, worker_pool(settings)).await
}

/// The pool of the relay and the projectors (see [`apex_commands::connect_workers`]).
pub fn worker_pool(settings: &Settings) -> PgPool {
    apex_commands::connect_workers(
        settings.database.options(),
        settings.database.max_connections,
    )
}

async fn prepare(settings: &DatabaseSettings, pool: PgPool) -> anyhow::Result<PgPool> {
    if settings.create_if_missing {
        create_database(settings).await?;
    }
    apex_commands::migrate(&pool)
        .await
        .with_context(|| format!("applying migrations to database {}", settings.name))?;
    Ok(pool)
}

async fn create_database(settings: &DatabaseSettings) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect_with(&settings.server_options())
        .await
        .with_context(|| {
            format!(
                "connecting to PostgreSQL at {}:{}",
                settings.host, settings.port
            )
        })?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&settings.name)
            .fetch_one(&mut conn)
            .await
            .context("checking whether the database exists")?;
    if !exists {
        let quoted = settings.name.replace('"', "\"\"");
        match sqlx::query(&format!("CREATE DATABASE \"{quoted}\""))
            .execute(&mut conn)
            .await
        {
            Ok(_) => tracing::info!(database = %settings.name, "created database"),
            // Another replica created it between the check and the create.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e).context(format!("creating database {}", settings.name)),
        }
    }
    Ok(())
}

/// The token verifier described by the settings.
pub fn authenticator(settings: &Settings) -> anyhow::Result<Authenticator> {
    let auth = &settings.auth;
    let keys = match auth.algorithm {
        JwtAlgorithm::HS256 => KeyMaterial::Hs256 {
            secret: auth.key.expose().as_bytes().to_vec(),
        },
        JwtAlgorithm::RS256 => KeyMaterial::Rs256 {
            public_key_pem: auth.key.expose().as_bytes().to_vec(),
        },
    };
    Authenticator::new(keys, &auth.issuer, &auth.audience)
        .map_err(|e| anyhow::anyhow!("auth settings (APEX_JWT_SECRET / APEX_JWT_PUBLIC_KEY): {e}"))
}

/// A built, bound, not yet running HTTP application.
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    /// The application state (for processes that run more than the API).
    pub state: AppState,
}

impl Application {
    /// Prepares the database and binds the listener (port 0 picks a free port).
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let pool = prepare_database(&settings.database).await?;
        Self::build_with_pool(settings, pool).await
    }

    /// Like [`Application::build`] over an existing, migrated pool.
    pub async fn build_with_pool(settings: &Settings, pool: PgPool) -> anyhow::Result<Self> {
        let state = AppState {
            commands: Arc::new(CommandService::new(pool.clone(), RetryPolicy::default())),
            pool,
            auth: Arc::new(authenticator(settings)?),
            body_limit: settings.http.body_limit_bytes,
            metrics: apex_api::metrics::install(),
            hub: apex_api::ws::hub::Hub::start(settings.amqp.config()),
            rate_limiter: Arc::new(apex_api::rate_limit::RateLimiter::new(
                settings.rate_limit.limits(),
            )),
        };
        let address = format!("{}:{}", settings.http.host, settings.http.port);
        let listener = TcpListener::bind(&address)
            .await
            .with_context(|| format!("binding {address} (http.host, http.port)"))?;
        Ok(Self {
            listener,
            router: apex_api::router(state.clone()),
            state,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(address = %self.listener.local_addr()?, "HTTP API listening");
        // Responses and WebSocket frames go out as soon as they are written: with Nagle's
        // algorithm a small write waits for the acknowledgement of the previous one.
        let listener = self.listener.tap_io(|stream| {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::warn!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
            }
        });
        // Each connection gets a clone of the router (a reference count). Served as the router
        // itself, axum would rebuild its route table per connection, cloning every route's
        // handler: memory per keep-alive connection and CPU per accepted one
        // (docs/benchmarks.md, change 56).
        axum::serve(listener, self.router.into_make_service())
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving HTTP")
    }
}

/// Parses `--only` projector group names; empty means all.
pub fn parse_groups(names: &[String]) -> anyhow::Result<Vec<ProjectorGroup>> {
    parse_names(names, &ProjectorGroup::ALL)
}

/// Parses read-model names; empty means all.
pub fn parse_models(names: &[String]) -> anyhow::Result<Vec<ReadModel>> {
    parse_names(names, &ReadModel::ALL)
}

/// Parses each of `names`; empty means `all`.
fn parse_names<T: Copy + std::str::FromStr<Err = String>>(
    names: &[String],
    all: &[T],
) -> anyhow::Result<Vec<T>> {
    if names.is_empty() {
        return Ok(all.to_vec());
    }
    names
        .iter()
        .map(|n| n.parse::<T>().map_err(|e| anyhow::anyhow!(e)))
        .collect()
}

/// Background workers: the relay and projectors, stopped together.
pub struct Workers {
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Workers {
    /// Starts the relay (when `relay`) and the projector `groups`.
    pub fn start(
        settings: &Settings,
        pool: PgPool,
        relay: bool,
        groups: &[ProjectorGroup],
    ) -> Self {
        Self::start_with_prefix(settings, pool, relay, groups, "apex.projector")
    }

    /// Like [`Workers::start`] with projector queues named `<queue_prefix>.<group>`.
    pub fn start_with_prefix(
        settings: &Settings,
        pool: PgPool,
        relay: bool,
        groups: &[ProjectorGroup],
        queue_prefix: &str,
    ) -> Self {
        let (shutdown, receiver) = watch::channel(false);
        let amqp = settings.amqp.config();
        let mut tasks = Vec::new();
        if relay {
            let mut config = RelayConfig::new(amqp.clone());
            config.projector_queue_prefix = queue_prefix.to_owned();
            tasks.push(tokio::spawn(relay::run(
                pool.clone(),
                config,
                receiver.clone(),
            )));
        }
        for group in groups {
            let mut config = ProjectorConfig::new(amqp.clone());
            config.queue_prefix = queue_prefix.to_owned();
            tasks.push(tokio::spawn(projector::run(
                pool.clone(),
                *group,
                config,
                receiver.clone(),
            )));
        }
        Self { shutdown, tasks }
    }

    /// Signals every worker to stop and waits for them.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "a worker task panicked");
            }
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested");
}
