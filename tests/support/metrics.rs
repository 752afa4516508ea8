//! `/metrics` as the tests read it (shared by the test crates that include it).
#![allow(dead_code)]

use std::collections::HashMap;

/// The Prometheus text exposition at `url`, as `series → value` (series with their labels,
/// as printed).
pub async fn scrape(client: &reqwest::Client, url: &str) -> HashMap<String, f64> {
    let text = client.get(url).send().await.unwrap().text().await.unwrap();
    parse(&text)
}

/// Parses the Prometheus text format into `series → value`.
pub fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}
