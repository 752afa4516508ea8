//! The Instance aggregate: one run of one agent for one user in one chat thread.
//!
//! Status: `pending → running → completed | failed | cancelled`; cancel is also allowed
//! from pending. Terminal states accept nothing. Each step of a run is one event; every event
//! keeps what the chat may show (`display`) apart from internal detail (`internal`: raw tool
//! arguments and results, prompts), which users never see.

mod aggregate;
mod commands;
mod events;
#[cfg(test)]
mod tests;

pub use aggregate::{Instance, InstanceStatus};
pub use commands::{InstanceAction, InstanceCommand};
pub use events::*;
