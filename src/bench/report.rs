//! Result rows, the printed table and the JSON file.

use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::config::Settings;

/// What a row must reach.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Target {
    /// `result / ceiling >= x`.
    RatioAtLeast(f64),
    /// `result / baseline <= x` (latency against a baseline latency).
    RatioAtMost(f64),
    /// `result >= x`.
    AtLeast(f64),
    /// `result <= x`.
    AtMost(f64),
    /// Reported, no target.
    Reported,
}

impl Target {
    fn describe(self, unit: &str) -> String {
        match self {
            Target::RatioAtLeast(x) => format!("≥ {x} × ceiling"),
            Target::RatioAtMost(x) => format!("≤ {x} × baseline"),
            Target::AtLeast(x) => format!("≥ {} {unit}", number(x)),
            Target::AtMost(x) => format!("≤ {} {unit}", number(x)),
            Target::Reported => "reported".to_owned(),
        }
    }
}

/// One measured figure of a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The scenario (`write`, `live`…).
    pub scenario: String,
    /// What was measured, e.g. `commands/s` or `latency p99`.
    pub metric: String,
    /// The measured value.
    pub result: f64,
    /// Its unit.
    pub unit: String,
    /// The ceiling (or baseline) measured in the same run, in the same unit.
    pub ceiling: Option<f64>,
    /// What the ceiling is.
    pub ceiling_is: Option<String>,
    /// `result / ceiling`.
    pub ratio: Option<f64>,
    /// The target.
    pub target: Target,
    /// Whether the target was met (`None` when only reported).
    pub met: Option<bool>,
    /// Scenario detail: sizes, rates, percentiles, notes.
    pub details: Value,
}

impl Row {
    /// A row; the ratio and `met` are computed.
    pub fn new(
        scenario: &str,
        metric: &str,
        result: f64,
        unit: &str,
        ceiling: Option<(f64, &str)>,
        target: Target,
    ) -> Self {
        let ratio = ceiling.and_then(|(c, _)| (c > 0.0).then_some(result / c));
        let met = match target {
            Target::RatioAtLeast(x) => ratio.map(|r| r >= x),
            Target::RatioAtMost(x) => ratio.map(|r| r <= x),
            Target::AtLeast(x) => Some(result >= x),
            Target::AtMost(x) => Some(result <= x),
            Target::Reported => None,
        };
        Self {
            scenario: scenario.to_owned(),
            metric: metric.to_owned(),
            result,
            unit: unit.to_owned(),
            ceiling: ceiling.map(|(c, _)| c),
            ceiling_is: ceiling.map(|(_, what)| what.to_owned()),
            ratio,
            target,
            met,
            details: Value::Null,
        }
    }

    /// Attaches scenario detail.
    pub fn with(mut self, details: Value) -> Self {
        self.details = details;
        self
    }
}

/// Where the numbers were taken.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical CPUs.
    pub cpus: usize,
    /// Total memory, MiB.
    pub memory_mib: u64,
    /// `SELECT version()`.
    pub postgres: String,
    /// Whether the binary was built with optimizations.
    pub release_build: bool,
}

impl Machine {
    /// Looks at this machine and the configured PostgreSQL server.
    pub async fn detect(settings: &Settings) -> Self {
        let postgres = async {
            use sqlx::Connection;
            let mut conn =
                sqlx::PgConnection::connect_with(&settings.database.server_options()).await?;
            let v: String = sqlx::query_scalar("SELECT version()")
                .fetch_one(&mut conn)
                .await?;
            let _ = conn.close().await;
            Ok::<_, sqlx::Error>(v)
        }
        .await
        .unwrap_or_else(|e| format!("unknown ({e})"));
        Self {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_mib: meminfo_total_kib().unwrap_or(0) / 1024,
            postgres,
            release_build: !cfg!(debug_assertions),
        }
    }
}

fn meminfo_total_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A whole run: what, where, and the rows.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario asked for (`all` for every one).
    pub scenario: String,
    /// Quick mode (harness check, numbers mean nothing).
    pub quick: bool,
    /// Start.
    pub started_at: DateTime<Utc>,
    /// End.
    pub finished_at: DateTime<Utc>,
    /// The machine.
    pub machine: Machine,
    /// Results.
    pub rows: Vec<Row>,
}

impl Report {
    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let header = [
            "scenario", "metric", "result", "ceiling", "ratio", "target", "met?",
        ];
        let mut lines: Vec<[String; 7]> = vec![header.map(str::to_owned)];
        for row in &self.rows {
            lines.push([
                row.scenario.clone(),
                row.metric.clone(),
                format!("{} {}", number(row.result), row.unit),
                match (&row.ceiling, &row.ceiling_is) {
                    (Some(c), Some(what)) => format!("{} ({what})", number(*c)),
                    _ => "—".to_owned(),
                },
                row.ratio.map_or("—".to_owned(), |r| format!("{r:.2}")),
                row.target.describe(&row.unit),
                match row.met {
                    Some(true) => "yes".to_owned(),
                    Some(false) => "NO".to_owned(),
                    None => "—".to_owned(),
                },
            ]);
        }
        let widths: Vec<usize> = (0..7)
            .map(|i| {
                lines
                    .iter()
                    .map(|l| l[i].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for (n, line) in lines.iter().enumerate() {
            let cells: Vec<String> = line
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}", w = *w))
                .collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
            if n == 0 {
                let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
                out.push_str(&format!("|-{}-|\n", rule.join("-|-")));
            }
        }
        if self.quick {
            out.push_str("(quick mode: proves the harness works; the numbers mean nothing)\n");
        }
        out
    }

    /// Writes the report as pretty JSON, creating the directory.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let json = serde_json::to_string_pretty(self).context("serializing the report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
    }
}

/// A number for humans: thousands as `12.3k`, small values with two decimals.
pub(crate) fn number(x: f64) -> String {
    if x.abs() >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}
