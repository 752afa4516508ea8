//! An API replica in a process of its own: `apex serve` on the stack's database and exchanges.
//!
//! A scenario that measures the API drives it from the bench process over loopback, as a load
//! generator would: the replica's runtime serves requests only, and its memory and file
//! descriptors are its own.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command as Process};

use super::Options;
use super::stack::UNLIMITED;
use crate::config::{JwtAlgorithm, Settings};

/// `apex serve` in its own process, killed when stopped or dropped.
pub(crate) struct Replica {
    child: Child,
    pid: u32,
    /// Its base URL.
    pub url: String,
}

impl Replica {
    /// Starts the replica (the `apex` binary of `options`, else this one) with a pool of
    /// `settings.database.max_connections`, and waits until it serves.
    pub(crate) async fn spawn(options: &Options, settings: &Settings) -> anyhow::Result<Self> {
        let binary = match &options.apex_binary {
            Some(path) => path.clone(),
            None => std::env::current_exe().context("locating the apex binary")?,
        };
        if settings.auth.algorithm != JwtAlgorithm::HS256 {
            bail!("the bench signs its own tokens with HS256");
        }
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?.port()
        };
        let db = &settings.database;
        let amqp = &settings.amqp;
        let log = std::env::temp_dir().join(format!("apex-bench-replica-{port}.log"));
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("creating the replica log {}", log.display()))?;
        let config_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("environments");
        let mut child = Process::new(&binary)
            .arg("serve")
            .env("APEX_ENV", "dev")
            .env("APEX_CONFIG_DIR", config_dir)
            .env("APEX__HTTP__HOST", "127.0.0.1")
            .env("APEX__HTTP__PORT", port.to_string())
            .env("APEX__DATABASE__HOST", &db.host)
            .env("APEX__DATABASE__PORT", db.port.to_string())
            .env("APEX__DATABASE__USER", &db.user)
            .env("APEX__DATABASE__NAME", &db.name)
            .env(
                "APEX__DATABASE__MAX_CONNECTIONS",
                db.max_connections.to_string(),
            )
            .env("APEX__DATABASE__CREATE_IF_MISSING", "false")
            .env("APEX__AMQP__HOST", &amqp.host)
            .env("APEX__AMQP__PORT", amqp.port.to_string())
            .env("APEX__AMQP__VHOST", &amqp.vhost)
            .env("APEX__AMQP__USER", &amqp.user)
            .env("APEX__AMQP__EXCHANGE", &amqp.exchange)
            .env("APEX__AMQP__CHAT_EXCHANGE", &amqp.chat_exchange)
            .env("APEX__AUTH__ALGORITHM", "HS256")
            .env("APEX__AUTH__ISSUER", &settings.auth.issuer)
            .env("APEX__AUTH__AUDIENCE", &settings.auth.audience)
            .env(
                "APEX__RATE_LIMIT__COMMANDS_PER_SECOND",
                UNLIMITED.to_string(),
            )
            .env("APEX__RATE_LIMIT__BURST", UNLIMITED.to_string())
            .env(
                "APEX__RATE_LIMIT__RUNNER_COMMANDS_PER_SECOND",
                UNLIMITED.to_string(),
            )
            .env("APEX__RATE_LIMIT__RUNNER_BURST", UNLIMITED.to_string())
            .env("APEX__LOG__FILTER", "warn")
            .env("RUST_LOG", "warn")
            .env("APEX_DATABASE_PASSWORD", db.password.expose())
            .env("APEX_AMQP_PASSWORD", amqp.password.expose())
            .env("APEX_JWT_SECRET", settings.auth.key.expose())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the replica {}", binary.display()))?;
        let pid = child.id().context("the replica exited at once")?;
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(format!("{url}/health/live")).send().await
                && r.status().is_success()
            {
                break;
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the replica exited ({status}) before it served; see {}",
                    log.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the replica did not serve within 60 s; see {}",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self { child, pid, url })
    }

    /// Resident memory now, MB.
    pub(crate) fn memory(&self) -> anyhow::Result<f64> {
        self.status_kib("VmRSS:").map(|k| k / 1024.0)
    }

    /// Peak resident memory, MB.
    pub(crate) fn peak_memory(&self) -> anyhow::Result<f64> {
        self.status_kib("VmHWM:").map(|k| k / 1024.0)
    }

    fn status_kib(&self, field: &str) -> anyhow::Result<f64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .context("reading the replica's /proc status")?;
        text.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .with_context(|| format!("no {field} in the replica's /proc status"))
    }

    /// Stops the replica.
    pub(crate) async fn stop(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}
