//! The processes under test: API replicas, relays and projectors as children of this binary,
//! over their own database and RabbitMQ vhost, with logs in `target/chaos/<id>/`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::PgPool;
use tokio::process::{Child, Command};

use crate::config::Settings;
use crate::startup;

struct Proc {
    name: String,
    subcommand: &'static str,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

/// A running chaos cluster.
pub struct Cluster {
    /// The cluster's database.
    pub pool: PgPool,
    /// Its name.
    pub database: String,
    /// Settings pointing at the cluster (for tokens).
    pub settings: Settings,
    /// Base URLs of the API replicas.
    pub api: Vec<String>,
    vhost: String,
    exe: PathBuf,
    logs: PathBuf,
    procs: Vec<Proc>,
    seed: u64,
}

async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .context("running rabbitmqctl (is RabbitMQ installed here?)")?;
    if !status.success() {
        bail!("rabbitmqctl {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Cluster {
    /// Creates the database and vhost and starts every process.
    pub async fn start(base: &Settings, id: &str) -> anyhow::Result<Self> {
        let database = format!("apex_chaos_{id}");
        let vhost = format!("apex_chaos_{id}");
        rabbitmqctl(&["add_vhost", &vhost]).await?;
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost,
            &base.amqp.user,
            ".*",
            ".*",
            ".*",
        ])
        .await?;
        let mut settings = base.clone();
        settings.database.name = database.clone();
        settings.database.create_if_missing = true;
        settings.amqp.vhost = vhost.clone();
        let pool = startup::prepare_database(&settings.database).await?;
        let logs = PathBuf::from("target/chaos").join(id);
        std::fs::create_dir_all(&logs).context("creating the chaos log directory")?;
        let common = vec![
            ("APEX__DATABASE__NAME".to_owned(), database.clone()),
            (
                "APEX__DATABASE__CREATE_IF_MISSING".to_owned(),
                "false".to_owned(),
            ),
            ("APEX__AMQP__VHOST".to_owned(), vhost.clone()),
        ];
        let mut procs = Vec::new();
        let mut api = Vec::new();
        for i in 0..2 {
            let port = free_port()?;
            api.push(format!("http://127.0.0.1:{port}"));
            let mut env = common.clone();
            env.push(("APEX__HTTP__HOST".to_owned(), "127.0.0.1".to_owned()));
            env.push(("APEX__HTTP__PORT".to_owned(), port.to_string()));
            procs.push(Proc {
                name: format!("api-{i}"),
                subcommand: "serve",
                env,
                child: None,
            });
        }
        for i in 0..2 {
            procs.push(Proc {
                name: format!("relay-{i}"),
                subcommand: "relay",
                env: common.clone(),
                child: None,
            });
            procs.push(Proc {
                name: format!("project-{i}"),
                subcommand: "project",
                env: common.clone(),
                child: None,
            });
        }
        let mut cluster = Self {
            pool,
            database,
            settings,
            api,
            vhost,
            exe: std::env::current_exe().context("locating the apex binary")?,
            logs,
            procs,
            seed: 0x9e37_79b9_7f4a_7c15,
        };
        for i in 0..cluster.procs.len() {
            cluster.spawn(i)?;
        }
        println!("chaos cluster {id}: logs in {}", cluster.logs.display());
        Ok(cluster)
    }

    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let proc = &mut self.procs[index];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{}.log", proc.name)))?;
        let child = Command::new(&self.exe)
            .arg(proc.subcommand)
            .envs(proc.env.iter().cloned())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", proc.name))?;
        proc.child = Some(child);
        Ok(())
    }

    fn random(&mut self) -> u64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed
    }

    /// SIGKILLs one process and restarts it after a random pause: relay, projector and API
    /// replica in turn, and for each kind its replicas in turn, so the active relay and the
    /// standby are both killed (the standby then takes over), as are both projector processes
    /// and both API replicas.
    pub async fn kill_random(&mut self, round: usize) -> anyhow::Result<()> {
        let kind = ["relay", "project", "api"][round % 3];
        let candidates: Vec<usize> = (0..self.procs.len())
            .filter(|i| self.procs[*i].name.starts_with(kind))
            .collect();
        let index = candidates[(round / 3) % candidates.len()];
        let name = self.procs[index].name.clone();
        if let Some(mut child) = self.procs[index].child.take() {
            child
                .start_kill()
                .with_context(|| format!("killing {name}"))?;
            let _ = child.wait().await;
        }
        println!("fault: SIGKILL {name}");
        tokio::time::sleep(Duration::from_millis(300 + self.random() % 700)).await;
        self.spawn(index)
    }

    /// Stops and starts the RabbitMQ application: every connection drops.
    pub async fn restart_broker(&mut self) -> anyhow::Result<()> {
        println!("fault: restarting RabbitMQ");
        rabbitmqctl(&["stop_app"]).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        rabbitmqctl(&["start_app"]).await?;
        Ok(())
    }

    /// PostgreSQL terminates every connection to the cluster's database (but the one asking):
    /// the API replicas' append writers and pools, the relays' lock connections and listeners
    /// and the projectors' pools all lose theirs under load, with statements in flight.
    pub async fn drop_database_connections(&self) -> anyhow::Result<()> {
        let dropped: i64 = sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
               FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(&self.pool)
        .await
        .context("terminating the cluster's database connections")?;
        println!("fault: PostgreSQL dropped {dropped} connections");
        Ok(())
    }

    /// Restarts any process that exited.
    pub async fn ensure_running(&mut self) -> anyhow::Result<()> {
        for i in 0..self.procs.len() {
            let exited = match self.procs[i].child.as_mut() {
                Some(child) => child.try_wait()?.is_some(),
                None => true,
            };
            if exited {
                println!("{} had exited; restarting it", self.procs[i].name);
                self.spawn(i)?;
            }
        }
        Ok(())
    }

    /// Waits until every API replica is ready.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        for base in &self.api {
            loop {
                let ready = http
                    .get(format!("{base}/health/ready"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ready {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{base} not ready within {timeout:?}; see {}",
                        self.logs.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// Waits until the relay has published everything and every projector applied everything.
    /// A backlog may take a while after a heavy load; the wait fails only when it stops
    /// shrinking for `stalled` (something is stuck), printing progress meanwhile.
    pub async fn wait_quiescent(&self, stalled: Duration) -> anyhow::Result<()> {
        let mut best = i64::MAX;
        let mut improved = Instant::now();
        let mut reported = Instant::now();
        loop {
            let behind: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM events e, relay_checkpoints r
                          WHERE r.name = 'main' AND (e.transaction_id, e.position) > (r.transaction_id, r.position))
                      + (SELECT count(*) FROM (SELECT aggregate_type, aggregate_id, max(sequence) AS s FROM events GROUP BY 1, 2) e
                           CROSS JOIN (VALUES ('agents'), ('instances'), ('agent_stats'), ('usage')) AS p(projector)
                           LEFT JOIN projector_offsets o
                             ON o.projector = p.projector AND o.aggregate_type = e.aggregate_type AND o.aggregate_id = e.aggregate_id
                          WHERE (e.aggregate_type = 'agent') = (p.projector = 'agents')
                            AND coalesce(o.last_sequence, 0) < e.s)",
            )
            .fetch_one(&self.pool)
            .await?;
            if behind == 0 {
                return Ok(());
            }
            if behind < best {
                best = behind;
                improved = Instant::now();
            }
            if improved.elapsed() > stalled {
                bail!(
                    "still {behind} event(s) or offsets behind, no progress for {stalled:?}; see {}",
                    self.logs.display()
                );
            }
            if reported.elapsed() > Duration::from_secs(10) {
                println!("catching up: {behind} event(s) or offsets behind");
                reported = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Kills every process.
    pub async fn stop(&mut self) {
        for proc in &mut self.procs {
            if let Some(mut child) = proc.child.take() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }

    /// Kills every process and removes the database and the vhost.
    pub async fn destroy(&mut self) {
        self.stop().await;
        self.pool.close().await;
        if let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect_with(
            &self.settings.database.server_options(),
        )
        .await
        {
            let _: Result<_, _> = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            ))
            .execute(&mut conn)
            .await;
            let _: Result<(), _> = sqlx::Connection::close(conn).await;
        }
        if let Err(e) = rabbitmqctl(&["delete_vhost", &self.vhost]).await {
            eprintln!("could not delete vhost {}: {e}", self.vhost);
        }
    }
}
