//! Latency samples and their percentiles.

use std::time::Duration;

use serde_json::{Value, json};

/// Recorded latencies (every sample is kept; sorted on demand).
#[derive(Debug, Default, Clone)]
pub(crate) struct Samples {
    values: Vec<Duration>,
}

impl Samples {
    /// Adds one sample.
    pub(crate) fn push(&mut self, d: Duration) {
        self.values.push(d);
    }

    /// Appends another set.
    pub(crate) fn extend(&mut self, other: Samples) {
        self.values.extend(other.values);
    }

    /// Number of samples.
    pub(crate) fn len(&self) -> usize {
        self.values.len()
    }

    /// The `p`-th percentile (0–100) in milliseconds, nearest-rank; 0 when empty.
    pub(crate) fn percentile_ms(&mut self, p: f64) -> f64 {
        if self.values.is_empty() {
            return 0.0;
        }
        self.values.sort_unstable();
        let rank = ((p / 100.0) * self.values.len() as f64).ceil() as usize;
        let index = rank.clamp(1, self.values.len()) - 1;
        self.values[index].as_secs_f64() * 1000.0
    }

    /// Count, p50, p90, p99, max and mean, in milliseconds.
    pub(crate) fn summary(&mut self) -> Value {
        let mean = if self.values.is_empty() {
            0.0
        } else {
            self.values.iter().map(Duration::as_secs_f64).sum::<f64>() * 1000.0
                / self.values.len() as f64
        };
        json!({
            "count": self.len(),
            "p50_ms": round(self.percentile_ms(50.0)),
            "p90_ms": round(self.percentile_ms(90.0)),
            "p99_ms": round(self.percentile_ms(99.0)),
            "max_ms": round(self.percentile_ms(100.0)),
            "mean_ms": round(mean),
        })
    }
}

/// Rounds to three decimals for the JSON file.
pub(crate) fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Events (or commands) per second.
pub(crate) fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut s = Samples::default();
        for ms in 1..=100 {
            s.push(Duration::from_millis(ms));
        }
        assert!((s.percentile_ms(50.0) - 50.0).abs() < 1e-9);
        assert!((s.percentile_ms(99.0) - 99.0).abs() < 1e-9);
        assert!((s.percentile_ms(100.0) - 100.0).abs() < 1e-9);
        assert_eq!(Samples::default().percentile_ms(99.0), 0.0);
    }
}
