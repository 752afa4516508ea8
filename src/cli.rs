//! The `apex` command line: one binary, one subcommand per process kind.

use anyhow::Context;
use apex_domain::{ActorRole, Tier};
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Settings;
use crate::startup::{self, Application};

/// Apex: event-sourced backend of AI agent runs.
#[derive(Debug, Parser)]
#[command(name = "apex", version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (applies migrations first).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Print a development token signed with the HS256 secret.
    Token {
        /// Role claim.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Subject (principal id).
        #[arg(long)]
        sub: String,
        /// Tier claim (required for users).
        #[arg(long, value_enum)]
        tier: Option<TierArg>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Publish the events table to RabbitMQ (one active replica; others stand by).
    Relay,
    /// Run the projectors that build the read models.
    Project {
        /// Only these projector groups: `agent` (agents), `instance` (instances, timeline,
        /// agent_stats, usage); default: both.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Development: API, relay and every projector in one process.
    All,
    /// Print the OpenAPI document.
    Openapi,
    /// Audit the event store.
    Audit {
        /// What to check.
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Rebuild read models from the event store, without downtime for readers.
    Rebuild {
        /// The read model (agents, instances, timeline, agent_stats, usage).
        projection: Option<String>,
        /// Rebuild every read model.
        #[arg(long, conflicts_with = "projection")]
        all: bool,
    },
    /// Mixed load while killing relays, projectors and API replicas and restarting RabbitMQ;
    /// then checks nothing was lost, duplicated or shown out of order.
    Chaos {
        /// The short CI variant.
        #[arg(long)]
        quick: bool,
        /// Stop after this many accepted commands (default 100000, or 3000 with --quick).
        #[arg(long)]
        commands: Option<u64>,
        /// Write the summary as JSON here.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Start a scripted run and print what a chat client receives (needs `apex all` running).
    Demo {
        /// Base URL of the API (default: the configured http.host and http.port).
        #[arg(long)]
        url: Option<String>,
    },
    /// Run a benchmark scenario against the real PostgreSQL and RabbitMQ (isolated database,
    /// exchanges and queues); prints a table and writes a JSON result.
    Bench {
        /// The scenario.
        #[arg(value_enum)]
        scenario: crate::bench::Scenario,
        /// Seconds instead of minutes: proves the harness works, asserts no timing.
        #[arg(long)]
        quick: bool,
        /// Where to write the JSON result (default: target/bench/<scenario>.json).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

/// Audit subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the hash chain of every stream; exits non-zero when history was altered.
    Verify,
    /// Load every aggregate through the current code (upcasters included); exits non-zero when
    /// an event no longer deserializes or applies.
    Replay,
}

/// Role argument.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    /// End user.
    User,
    /// Agent runtime.
    Runner,
    /// Administrator.
    Admin,
    /// Auditor.
    Auditor,
}

impl From<RoleArg> for ActorRole {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::User => ActorRole::User,
            RoleArg::Runner => ActorRole::Runner,
            RoleArg::Admin => ActorRole::Admin,
            RoleArg::Auditor => ActorRole::Auditor,
        }
    }
}

/// Tier argument.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TierArg {
    /// Free.
    Free,
    /// Early access.
    Early,
    /// Mid-market.
    Mid,
    /// Enterprise.
    Enterprise,
}

impl From<TierArg> for Tier {
    fn from(t: TierArg) -> Self {
        match t {
            TierArg::Free => Tier::Free,
            TierArg::Early => Tier::Early,
            TierArg::Mid => Tier::Mid,
            TierArg::Enterprise => Tier::Enterprise,
        }
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Openapi = cli.command {
        let doc = apex_api::openapi()
            .to_pretty_json()
            .context("serializing the OpenAPI document")?;
        println!("{doc}");
        return Ok(());
    }
    let settings = Settings::load().context("loading settings")?;
    match cli.command {
        Command::Openapi => unreachable!("handled above"),
        Command::Token {
            role,
            sub,
            tier,
            ttl,
        } => {
            let role = ActorRole::from(role);
            let tier = tier.map(Tier::from);
            if role == ActorRole::User && tier.is_none() {
                anyhow::bail!("--tier is required for --role user");
            }
            let auth = startup::authenticator(&settings)?;
            let token = auth
                .mint(&sub, role, tier, ttl)
                .map_err(|e| anyhow::anyhow!(e))?;
            println!("{token}");
            Ok(())
        }
        Command::Migrate => {
            crate::telemetry::init(&settings.log);
            startup::prepare_database(&settings.database).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Serve => {
            let telemetry = crate::telemetry::init_with_export(&settings.log, &settings.otlp)?;
            let app = Application::build(&settings).await?;
            let result = app.run_until(startup::shutdown_signal()).await;
            telemetry.shutdown();
            result
        }
        Command::Demo { url } => {
            let host = if settings.http.host == "0.0.0.0" {
                "127.0.0.1"
            } else {
                settings.http.host.as_str()
            };
            let url = url.unwrap_or_else(|| format!("http://{host}:{}", settings.http.port));
            crate::demo::run(&settings, &url).await
        }
        Command::Bench {
            scenario,
            quick,
            out,
        } => {
            crate::telemetry::init(&crate::config::LogSettings {
                format: settings.log.format,
                filter: "warn,sqlx::query=error,lapin::channels=off".to_owned(),
            });
            let options = crate::bench::Options {
                quick,
                apex_binary: None,
            };
            crate::bench::main(&settings, scenario, &options, out).await
        }
        Command::Audit { command } => {
            crate::telemetry::init(&settings.log);
            let pool = startup::prepare_database(&settings.database).await?;
            crate::maintenance::audit(&pool, command).await
        }
        Command::Rebuild { projection, all } => {
            crate::telemetry::init(&settings.log);
            let models = match (projection, all) {
                (_, true) => apex_projections::ReadModel::ALL.to_vec(),
                (Some(name), false) => startup::parse_models(&[name])?,
                (None, false) => anyhow::bail!("name a projection or pass --all"),
            };
            let pool = startup::prepare_database(&settings.database).await?;
            crate::maintenance::rebuild(&pool, &models).await
        }
        Command::Chaos {
            quick,
            commands,
            out,
        } => {
            let mut options = if quick {
                crate::chaos::ChaosOptions::quick()
            } else {
                crate::chaos::ChaosOptions::full()
            };
            if let Some(n) = commands {
                options.max_commands = n;
            }
            let summary = crate::chaos::run(&settings, options).await?;
            if let Some(path) = out {
                std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Command::Relay => {
            let telemetry = crate::telemetry::init_with_export(&settings.log, &settings.otlp)?;
            let pool = startup::prepare_worker_database(&settings).await?;
            let workers = startup::Workers::start(&settings, pool, true, &[]);
            startup::shutdown_signal().await;
            workers.stop().await;
            telemetry.shutdown();
            Ok(())
        }
        Command::Project { only } => {
            let telemetry = crate::telemetry::init_with_export(&settings.log, &settings.otlp)?;
            let groups = startup::parse_groups(&only)?;
            let pool = startup::prepare_worker_database(&settings).await?;
            let workers = startup::Workers::start(&settings, pool, false, &groups);
            startup::shutdown_signal().await;
            workers.stop().await;
            telemetry.shutdown();
            Ok(())
        }
        Command::All => {
            let telemetry = crate::telemetry::init_with_export(&settings.log, &settings.otlp)?;
            let app = Application::build(&settings).await?;
            let workers = startup::Workers::start(
                &settings,
                startup::worker_pool(&settings),
                true,
                &apex_projections::projector::ProjectorGroup::ALL,
            );
            let result = app.run_until(startup::shutdown_signal()).await;
            workers.stop().await;
            telemetry.shutdown();
            result
        }
    }
}
