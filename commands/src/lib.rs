//! Apex write side: the cqrs-es event stores over postgres-es and the command service.
//!
//! A command runs as: idempotency check → load the aggregate (snapshot + newer events) →
//! `handle` decides → append, group-committed with the appends of concurrent commands. Commands on one aggregate are serialized
//! within a process; across processes the primary key of `events` detects a concurrent append
//! and the command is re-run against fresh state, a bounded number of times.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod bus;
mod context;
mod error;
pub mod group_commit;
mod idempotency;
mod inline;
mod locks;
mod service;
pub mod store;
pub mod upcast;

pub use bus::{CommandBus, RetryPolicy};
pub use context::{CommandContext, CommandOutcome, IdempotencyKey};
pub use error::CommandError;
pub use service::CommandService;
pub use store::{INSTANCE_SNAPSHOT_EVERY, connect, connect_workers, migrate};
