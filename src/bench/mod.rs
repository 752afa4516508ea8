//! `apex bench <scenario>`: performance scenarios against the real PostgreSQL and RabbitMQ.
//!
//! Every scenario starts an isolated stack (its own database `apex_bench_<uuid>`, its own
//! exchanges and queues, dropped at the end), measures its *ceiling* in the same run (what the
//! machine does with the bare tool: single-row INSERTs, a bare pipelined publish, a bare
//! consume…), then the real thing, and reports the ratio, so the result holds on a noisy
//! 2-core machine. `--quick` shrinks every scenario to seconds: it proves the harness works
//! and asserts no timing. See `docs/benchmarks.md`.

mod ceilings;
mod client;
mod fan_out;
mod live;
mod long_run;
mod project;
mod rebuild;
mod relay;
mod replica;
mod report;
mod seed;
mod stack;
mod stages;
mod stats;
mod write;

use std::path::PathBuf;

use clap::ValueEnum;

use crate::config::Settings;

pub use report::{Machine, Report, Row, Target};

/// A benchmark scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Runner commands over HTTP, 32 concurrent clients on distinct instances.
    Write,
    /// Command accepted → message received on a connected WebSocket client.
    Live,
    /// A backlog of events published and confirmed by the relay.
    Relay,
    /// A steady stream through RabbitMQ into every read model.
    Project,
    /// The store replayed into every read model.
    Rebuild,
    /// Command latency on an instance with 10 vs 10,000 events.
    LongRun,
    /// 10,000 WebSocket connections on one replica, one run each.
    FanOut,
    /// Every scenario, one after the other.
    All,
}

impl Scenario {
    /// Every single scenario, in the order `all` runs them.
    pub const EACH: [Scenario; 7] = [
        Scenario::Write,
        Scenario::Live,
        Scenario::Relay,
        Scenario::Project,
        Scenario::Rebuild,
        Scenario::LongRun,
        Scenario::FanOut,
    ];

    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Write => "write",
            Scenario::Live => "live",
            Scenario::Relay => "relay",
            Scenario::Project => "project",
            Scenario::Rebuild => "rebuild",
            Scenario::LongRun => "long-run",
            Scenario::FanOut => "fan-out",
            Scenario::All => "all",
        }
    }
}

/// How to run the scenarios.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds instead of minutes: proves the harness, asserts nothing about timing.
    pub quick: bool,
    /// The `apex` binary, started as the separate replica of the fan-out scenario (so its
    /// memory and file descriptors are its own). `None`: the running executable.
    pub apex_binary: Option<PathBuf>,
}

/// Runs `scenario` (every one for [`Scenario::All`]) and returns the result rows.
pub async fn run(
    settings: &Settings,
    scenario: Scenario,
    options: &Options,
) -> anyhow::Result<Vec<Row>> {
    let scenarios: Vec<Scenario> = match scenario {
        Scenario::All => Scenario::EACH.to_vec(),
        one => vec![one],
    };
    let mut rows = Vec::new();
    for scenario in scenarios {
        eprintln!("bench: {} ({})", scenario.name(), mode(options));
        let started = std::time::Instant::now();
        let mut result = run_one(settings, scenario, options).await?;
        eprintln!(
            "bench: {} done in {:.1} s",
            scenario.name(),
            started.elapsed().as_secs_f64()
        );
        rows.append(&mut result);
    }
    Ok(rows)
}

fn mode(options: &Options) -> &'static str {
    if options.quick { "quick" } else { "full" }
}

async fn run_one(
    settings: &Settings,
    scenario: Scenario,
    options: &Options,
) -> anyhow::Result<Vec<Row>> {
    match scenario {
        Scenario::Write => write::run(settings, options).await,
        Scenario::Live => live::run(settings, options).await,
        Scenario::Relay => relay::run(settings, options).await,
        Scenario::Project => project::run(settings, options).await,
        Scenario::Rebuild => rebuild::run(settings, options).await,
        Scenario::LongRun => long_run::run(settings, options).await,
        Scenario::FanOut => fan_out::run(settings, options).await,
        Scenario::All => anyhow::bail!("`all` is not a single scenario"),
    }
}

/// `apex bench`: runs, prints the table and writes the JSON result to `out`
/// (default `target/bench/<scenario>.json`).
pub async fn main(
    settings: &Settings,
    scenario: Scenario,
    options: &Options,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let started_at = chrono::Utc::now();
    let rows = run(settings, scenario, options).await?;
    let machine = Machine::detect(settings).await;
    let report = Report {
        scenario: scenario.name().to_owned(),
        quick: options.quick,
        started_at,
        finished_at: chrono::Utc::now(),
        machine,
        rows,
    };
    println!("{}", report.table());
    let out = out
        .unwrap_or_else(|| PathBuf::from("target/bench").join(format!("{}.json", scenario.name())));
    report.write(&out)?;
    println!("result written to {}", out.display());
    Ok(())
}
