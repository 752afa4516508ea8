//! Event-bus tests over the real PostgreSQL and RabbitMQ: relay order and recovery, projector
//! idempotence, gap repair, dead letters. Each test has its own database and its own uniquely
//! named exchange and queues.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../support/broker.rs"]
mod broker;
mod helpers;

mod projector;
mod relay;
