//! Full-stack audit and rebuild tests: their own database, uniquely named exchanges and queues,
//! the API on port 0, the relay and every projector in-process.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../support/broker.rs"]
mod broker;
mod helpers;

mod rebuild;
