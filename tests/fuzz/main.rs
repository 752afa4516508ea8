//! Hostile clients against the real application (own database, exchanges and queues per test):
//! generated requests for every operation of the OpenAPI document, the role matrix of the
//! admin, audit and runner routes, and per-principal rate limits.
//!
//! `APEX_FUZZ_REQUESTS=<n>` sets the number of generated requests (default 3000);
//! `APEX_FUZZ_SEED=<seed>` replays a run.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;

#[path = "../support/broker.rs"]
mod broker;
mod harness;
mod requests;
mod rng;
mod schema;

mod authz;
mod openapi_fuzz;
mod rate_limit;
mod regressions;
