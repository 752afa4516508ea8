//! End-to-end tests of the HTTP API over the real PostgreSQL: each test gets its own database
//! and its own app on port 0.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod helpers;
#[path = "../support/metrics.rs"]
mod metrics_text;

mod audit;
mod audit_history;
mod audit_tamper;
mod auth;
mod commands;
mod concurrency;
mod connections;
mod database_tls;
mod group_commit;
mod inline_timeline;
mod openapi;
mod outage;
mod queries;
mod rebuild;
mod sessions;
mod snapshots;
