//! One router per resource, merged into one by [`crate::router`].

pub mod admin;
pub mod agents;
pub mod audit;
pub mod audit_log;
pub mod health;
pub mod instances;
pub mod pagination;
pub mod projections;
pub mod queries;
pub mod responses;
pub mod runner;
