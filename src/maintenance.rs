//! Operator commands over the whole store: audit verification and replay, read-model rebuilds.
//! Each shows a progress bar and exits non-zero when something is wrong.

use std::time::Duration;

use anyhow::{Context, bail};
use apex_projections::ReadModel;
use apex_projections::{audit, rebuild};
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;

use crate::cli::AuditCommand;

fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{msg:>12} [{bar:40}] {pos}/{len} events ({per_sec}, {eta} left)",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

async fn event_count(pool: &PgPool) -> anyhow::Result<u64> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?;
    Ok(n.max(0) as u64)
}

/// `apex audit verify|replay`.
pub async fn audit(pool: &PgPool, command: AuditCommand) -> anyhow::Result<()> {
    let total = event_count(pool).await?;
    match command {
        AuditCommand::Verify => {
            let progress = bar(total, "verifying");
            let result = audit::verify(pool, None, |n| progress.set_position(n)).await?;
            progress.finish();
            println!(
                "checked {} events in {} streams",
                result.events_checked, result.aggregates_checked
            );
            if result.intact() {
                println!("history intact: every hash chain verifies");
                return Ok(());
            }
            for b in &result.breaks {
                println!(
                    "ALTERED: {}/{} at sequence {} ({:?})",
                    b.aggregate_type, b.aggregate_id, b.sequence, b.kind
                );
            }
            bail!("{} stream(s) were altered", result.breaks.len())
        }
        AuditCommand::Replay => {
            let progress = bar(total, "replaying");
            let result = audit::replay_all(pool, |n| progress.set_position(n)).await?;
            progress.finish();
            println!(
                "replayed {} events of {} aggregates through the current code",
                result.events_ok, result.aggregates
            );
            if result.failures.is_empty() {
                return Ok(());
            }
            for failure in &result.failures {
                println!("FAILS: {failure}");
            }
            bail!("{} event(s) no longer load", result.failures.len())
        }
    }
}

/// `apex rebuild <projection>|--all`.
///
/// Every named read model is rebuilt in one pass over the store (`rebuild::run_all`): each
/// batch is read and decoded once and applied to all the copies concurrently; each read model
/// is then swapped in under its own lock.
pub async fn rebuild(pool: &PgPool, models: &[ReadModel]) -> anyhow::Result<()> {
    let mut started = Vec::with_capacity(models.len());
    for model in models {
        started.push(
            rebuild::try_start(pool, *model)
                .await
                .with_context(|| format!("starting the rebuild of {}", model.name()))?,
        );
    }
    let names: Vec<&str> = models.iter().map(|m| m.name()).collect();
    let progress = bar(0, "store");
    let mut last_rate = 0.0;
    let done = rebuild::run_all(started, |p| {
        progress.set_length(p.total.max(p.done));
        progress.set_position(p.done);
        last_rate = p.per_second;
    })
    .await?;
    progress.finish();
    println!(
        "{}: rebuilt from {done} events ({last_rate:.0} events/s) and swapped in",
        names.join(", ")
    );
    Ok(())
}
