//! The Agent aggregate: one agent definition in the catalogue.
//!
//! Status: `draft → active ⇄ disabled → retired` (retired is terminal; draft, active and
//! disabled may all retire). Every accepted change bumps `version`. Only admins change agents;
//! the role check is done by the edge and again here.

mod aggregate;
mod commands;
mod events;
#[cfg(test)]
mod tests;

pub use aggregate::{Agent, AgentStatus};
pub use commands::{AgentAction, AgentCommand, AgentDefinition, AgentPatch};
pub use events::AgentEvent;
