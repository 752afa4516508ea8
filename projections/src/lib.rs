//! Apex read side: the relay that publishes the events table to RabbitMQ, the projectors that
//! build the read models from it, and the read models themselves.
//!
//! ```text
//! events (outbox) ──relay──► topic exchange ──► one durable queue per projector group ──► rm_* tables
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod amqp;
pub mod audit;
pub mod chat;
pub mod consistency;
pub mod delay;
pub mod envelope;
pub mod projector;
pub mod read_models;
pub mod rebuild;
pub mod relay;
pub mod store;
pub mod trace;

pub use envelope::{CloudEvent, StoredEvent};
pub use projector::ProjectorGroup;
pub use read_models::ReadModel;
