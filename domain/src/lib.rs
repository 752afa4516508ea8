//! Apex domain: the Agent and Instance aggregates and their rules.
//!
//! Pure code, no I/O. Every decision lives in an aggregate's `handle`; `apply` only folds
//! events into state. Everything an aggregate needs from the outside world (the Agent a new
//! Instance runs, the acting principal) is looked up by the command layer and passed in the
//! command, so the tests here are plain given/when/then.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod agent;
pub mod common;
pub mod error;
pub mod instance;
pub mod limits;
pub mod timeline;
pub mod upcast;

pub use common::{Actor, ActorRole, AgentId, Tier};
pub use error::{DomainError, ErrorKind};
