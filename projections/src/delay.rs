//! How long after it was recorded an event reached a stage of the pipeline: the relay's
//! publish, each read model's commit, a replica's chat hub. Each stage records one histogram
//! observation per event, so the stages' distributions can be compared on `/metrics`.
//!
//! An event's `recorded_at` is the start of the transaction that appended it, on PostgreSQL's
//! clock; the stage's time is this process's clock. On one host the two agree; across hosts
//! the delay includes their clock offset.

use chrono::{DateTime, Utc};

/// Records the delay of each of `recorded` in `histogram`, measured once: the events of one
/// batch reach the stage together.
pub fn record(histogram: &metrics::Histogram, recorded: impl IntoIterator<Item = DateTime<Utc>>) {
    let now = Utc::now();
    for at in recorded {
        histogram.record((now - at).to_std().map_or(0.0, |d| d.as_secs_f64()));
    }
}
