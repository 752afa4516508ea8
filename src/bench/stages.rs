//! Where an event's time goes on its way to the chat: the pipeline's delay histograms (the
//! relay's publish of the event and its chat update, each projected read model's commit, the
//! chat hub's receipt; see
//! `docs/operations/observability.md`), read from this process's metrics before and after a
//! measurement. The bench runs the API, the relay and the projectors in its own process, so
//! their observations are all here.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::stats::round;

/// The stages, in pipeline order: (name in the report, metric, label set).
const STAGES: [(&str, &str, &str); 5] = [
    ("relay_published", "apex_relay_publish_delay_seconds", ""),
    (
        "instances_committed",
        "apex_projector_apply_delay_seconds",
        r#"projector="instances""#,
    ),
    (
        "agent_stats_committed",
        "apex_projector_apply_delay_seconds",
        r#"projector="agent_stats""#,
    ),
    (
        "usage_committed",
        "apex_projector_apply_delay_seconds",
        r#"projector="usage""#,
    ),
    ("chat_received", "apex_chat_receive_delay_seconds", ""),
];

/// One histogram: sum, count and cumulative bucket counts by upper bound.
#[derive(Debug, Default, Clone)]
struct Histogram {
    sum: f64,
    count: f64,
    buckets: Vec<(f64, f64)>,
}

/// The stages' histograms at one instant.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    series: BTreeMap<(String, String), Histogram>,
}

/// Reads the stages' histograms now.
pub(crate) fn snapshot() -> Snapshot {
    parse(&apex_api::metrics::install().render())
}

/// Per stage, the delay from an event's recording to that stage for the events observed
/// between `before` and `after`: count, mean and the bucket-interpolated p50 and p90, in ms.
pub(crate) fn breakdown(before: &Snapshot, after: &Snapshot) -> Value {
    let mut stages = serde_json::Map::new();
    for (name, metric, labels) in STAGES {
        let key = (metric.to_owned(), labels.to_owned());
        let Some(now) = after.series.get(&key) else {
            continue;
        };
        let then = before.series.get(&key).cloned().unwrap_or_default();
        let count = now.count - then.count;
        if count <= 0.0 {
            continue;
        }
        let buckets: Vec<(f64, f64)> = now
            .buckets
            .iter()
            .map(|(le, c)| {
                let earlier = then
                    .buckets
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |(_, c)| *c);
                (*le, c - earlier)
            })
            .collect();
        stages.insert(
            name.to_owned(),
            json!({
                "count": count,
                "mean_ms": round((now.sum - then.sum) / count * 1000.0),
                "p50_ms": round(quantile(&buckets, count, 0.5) * 1000.0),
                "p90_ms": round(quantile(&buckets, count, 0.9) * 1000.0),
            }),
        );
    }
    Value::Object(stages)
}

/// One line for the console: each stage's p50 in pipeline order.
pub(crate) fn line(breakdown: &Value) -> String {
    let parts: Vec<String> = STAGES
        .iter()
        .filter_map(|(name, _, _)| {
            let p50 = breakdown.get(*name)?.get("p50_ms")?.as_f64()?;
            Some(format!("{name} {p50:.1}"))
        })
        .collect();
    format!("ms after recording, p50: {}", parts.join(", "))
}

/// The `q` quantile of a histogram, interpolated linearly inside its bucket (as Prometheus's
/// `histogram_quantile` does); the highest finite bound when it lies beyond.
fn quantile(buckets: &[(f64, f64)], count: f64, q: f64) -> f64 {
    let rank = q * count;
    let mut lower = (0.0, 0.0);
    for &(le, cumulative) in buckets {
        if cumulative >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let width = cumulative - lower.1;
            let into = if width > 0.0 {
                (rank - lower.1) / width
            } else {
                0.0
            };
            return lower.0 + (le - lower.0) * into;
        }
        lower = (le, cumulative);
    }
    lower.0
}

/// The histograms of the Prometheus text exposition `text`, by (metric, labels without `le`).
fn parse(text: &str) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut le = None;
        let rest: Vec<&str> = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .filter(|l| match l.strip_prefix("le=") {
                Some(bound) => {
                    le = bound.trim_matches('"').parse::<f64>().ok();
                    false
                }
                None => true,
            })
            .collect();
        let labels = rest.join(",");
        let (metric, part) = if let Some(m) = name.strip_suffix("_bucket") {
            (m, "bucket")
        } else if let Some(m) = name.strip_suffix("_sum") {
            (m, "sum")
        } else if let Some(m) = name.strip_suffix("_count") {
            (m, "count")
        } else {
            continue;
        };
        if !STAGES.iter().any(|(_, m, _)| *m == metric) {
            continue;
        }
        let histogram = snapshot
            .series
            .entry((metric.to_owned(), labels))
            .or_default();
        match (part, le) {
            ("bucket", Some(le)) => histogram.buckets.push((le, value)),
            ("sum", _) => histogram.sum = value,
            ("count", _) => histogram.count = value,
            _ => {}
        }
    }
    snapshot
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# TYPE apex_chat_receive_delay_seconds histogram
apex_chat_receive_delay_seconds_bucket{le="0.005"} 10
apex_chat_receive_delay_seconds_bucket{le="0.01"} 10
apex_chat_receive_delay_seconds_bucket{le="+Inf"} 10
apex_chat_receive_delay_seconds_sum 0.03
apex_chat_receive_delay_seconds_count 10
"#;

    const AFTER: &str = r#"# TYPE apex_chat_receive_delay_seconds histogram
apex_chat_receive_delay_seconds_bucket{le="0.005"} 30
apex_chat_receive_delay_seconds_bucket{le="0.01"} 110
apex_chat_receive_delay_seconds_bucket{le="+Inf"} 110
apex_chat_receive_delay_seconds_sum 0.73
apex_chat_receive_delay_seconds_count 110
apex_projector_apply_delay_seconds_bucket{projector="usage",le="0.005"} 4
apex_projector_apply_delay_seconds_bucket{projector="usage",le="+Inf"} 4
apex_projector_apply_delay_seconds_sum{projector="usage"} 0.008
apex_projector_apply_delay_seconds_count{projector="usage"} 4
apex_http_requests_total{route="/x"} 3
"#;

    #[test]
    fn the_breakdown_covers_only_what_was_observed_between_the_snapshots() {
        let stages = breakdown(&parse(BEFORE), &parse(AFTER));
        let chat = &stages["chat_received"];
        // 100 observations in between: 20 up to 5 ms, 80 between 5 and 10 ms.
        assert_eq!(chat["count"], 100.0);
        assert_eq!(chat["mean_ms"], 7.0);
        // The 50th of 100 is the 30th of the 80 in (5, 10] ms.
        assert_eq!(chat["p50_ms"], 6.875);
        assert_eq!(chat["p90_ms"], 9.375);
        let usage = &stages["usage_committed"];
        assert_eq!(usage["count"], 4.0);
        assert_eq!(usage["mean_ms"], 2.0);
        assert!(stages.get("relay_published").is_none());
    }
}
