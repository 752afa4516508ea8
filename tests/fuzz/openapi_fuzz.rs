//! Generated hostile requests against every operation of the served OpenAPI document.
//!
//! `APEX_FUZZ_REQUESTS` (default 3000) sets how many requests are sent, round-robin over the
//! operations; `APEX_FUZZ_SEED` replays a run (the seed is printed). Requests are sent one at a
//! time so that the events count before and after each one says what it appended.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{self, ANSWER_WITHIN};
use crate::requests::{FuzzRequest, Generator};
use crate::rng::Rng;
use crate::schema::{self, Schemas};

/// Answers counted by status class.
#[derive(Debug, Default, Clone, Copy)]
struct Classes {
    ok: u64,
    client_error: u64,
    server_error: u64,
    other: u64,
    time: Duration,
}

impl Classes {
    fn add(&mut self, status: u16) {
        match status {
            200..=399 => self.ok += 1,
            400..=499 => self.client_error += 1,
            500..=599 => self.server_error += 1,
            _ => self.other += 1,
        }
    }
}

#[derive(Default)]
struct Summary {
    sent: u64,
    no_answer: u64,
    total: Classes,
    by_operation: BTreeMap<String, Classes>,
    by_code: BTreeMap<String, u64>,
    by_status: BTreeMap<u16, u64>,
    slowest: Duration,
    /// Distinct failures (by operation and kind of failure) with one example each.
    failures: BTreeMap<String, String>,
}

impl Summary {
    fn fail(&mut self, what: &str, request: &FuzzRequest, detail: String) {
        self.failures
            .entry(format!("{what}: {}", request.operation))
            .or_insert_with(|| format!("{}\n      -> {detail}", request.describe()));
    }

    fn print(&self, seed: u64, elapsed: Duration) {
        println!("fuzz summary (seed {seed}, {:.1} s)", elapsed.as_secs_f64());
        println!(
            "  requests sent: {}  answered: 2xx/3xx {}  4xx {}  5xx {}  other {}  no answer {}",
            self.sent,
            self.total.ok,
            self.total.client_error,
            self.total.server_error,
            self.total.other,
            self.no_answer
        );
        println!("  slowest answer: {:?}", self.slowest);
        let statuses: Vec<String> = self
            .by_status
            .iter()
            .map(|(s, n)| format!("{s}:{n}"))
            .collect();
        println!("  by status: {}", statuses.join(" "));
        let mut codes: Vec<(&String, &u64)> = self.by_code.iter().collect();
        codes.sort_by(|a, b| b.1.cmp(a.1));
        let codes: Vec<String> = codes.iter().map(|(c, n)| format!("{c}:{n}")).collect();
        println!("  4xx codes: {}", codes.join(" "));
        println!("  by operation (2xx/4xx/5xx, mean answer time):");
        for (op, c) in &self.by_operation {
            let n = (c.ok + c.client_error + c.server_error + c.other).max(1);
            println!(
                "    {op:<58} {:>4} {:>4} {:>3}  mean {:>4} ms",
                c.ok,
                c.client_error,
                c.server_error,
                (c.time / n as u32).as_millis()
            );
        }
        for (key, example) in &self.failures {
            println!("  FAILURE {key}\n      {example}");
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_documented_operation_survives_generated_hostile_requests() {
    let requests = env_u64("APEX_FUZZ_REQUESTS").unwrap_or(3000);
    let seed = env_u64("APEX_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let fuzzed = harness::spawn(harness::lift_rate_limits, true).await;
    let app = &fuzzed.app;
    let mut known = harness::seed(app).await;
    let doc: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let operations = schema::operations(&doc);
    assert!(
        operations.len() >= 25,
        "only {} operations",
        operations.len()
    );
    let tokens = harness::tokens(app);
    let mut generator = Generator {
        schemas: Schemas { doc: &doc },
        tokens: &tokens,
        base: app.address.clone(),
        keys: vec![],
    };
    let mut rng = Rng::new(seed);
    let mut summary = Summary::default();
    let started = Instant::now();
    let mut events = harness::events(app).await;

    // Every operation in turn; the ones that take no input at all (probes, metrics) get a
    // quarter of the share of the others.
    let takes_input = |op: &schema::Operation| {
        op.body.is_some() || !op.path_params.is_empty() || !op.query.is_empty() || op.secured
    };
    let schedule: Vec<&schema::Operation> = operations
        .iter()
        .flat_map(|op| std::iter::repeat_n(op, if takes_input(op) { 4 } else { 1 }))
        .collect();
    for i in 0..requests {
        let op = schedule[(i as usize) % schedule.len()];
        let request = generator.request(op, &mut rng, &known);
        summary.sent += 1;
        let answer = match harness::send(&app.client, &request).await {
            Ok(answer) => answer,
            Err(e) => {
                summary.no_answer += 1;
                summary.fail("no answer within the bound", &request, e);
                continue;
            }
        };
        summary.total.add(answer.status);
        let per_operation = summary
            .by_operation
            .entry(request.operation.clone())
            .or_default();
        per_operation.add(answer.status);
        per_operation.time += answer.took;
        *summary.by_status.entry(answer.status).or_default() += 1;
        summary.slowest = summary.slowest.max(answer.took);
        if answer.took > ANSWER_WITHIN {
            summary.fail("slow", &request, format!("{:?}", answer.took));
        }
        match answer.status {
            500..=599 => {
                let body = String::from_utf8_lossy(&answer.body).into_owned();
                summary.fail("5xx", &request, format!("{} {body}", answer.status));
            }
            400..=499 => {
                *summary
                    .by_code
                    .entry(harness::error_code(&answer.body))
                    .or_default() += 1;
                if let Some(problem) = harness::envelope_problem(&answer.body) {
                    summary.fail(
                        &format!("{} without envelope", answer.status),
                        &request,
                        problem,
                    );
                }
                let now = harness::events(app).await;
                if now != events {
                    summary.fail(
                        "4xx appended events",
                        &request,
                        format!("{} answered, events {events} -> {now}", answer.status),
                    );
                    events = now;
                }
            }
            _ => {
                if let Ok(value) = serde_json::from_slice::<Value>(&answer.body) {
                    known.harvest(&value);
                }
                events = harness::events(app).await;
            }
        }
    }
    summary.print(seed, started.elapsed());
    fuzzed.stop().await;
    assert_eq!(summary.sent, requests);
    assert!(
        summary.failures.is_empty(),
        "{} distinct failures (seed {seed}); see the summary above",
        summary.failures.len()
    );
    assert_eq!(summary.total.server_error, 0);
}
