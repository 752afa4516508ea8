//! Events of the Agent aggregate.

use std::collections::BTreeSet;

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use crate::common::Tier;

/// Something that happened to an agent. Every event carries the agent version it produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentEvent {
    /// The agent was added to the catalogue, in draft.
    AgentDefined {
        /// The slug.
        agent_id: String,
        /// Name shown in the catalogue.
        display_name: String,
        /// What the agent does.
        description: String,
        /// Tools it may call.
        tools: Vec<String>,
        /// Tiers allowed to run it.
        tiers: BTreeSet<Tier>,
        /// Always 1.
        version: u32,
    },
    /// The definition changed; the event carries the whole new definition.
    AgentUpdated {
        /// Name shown in the catalogue.
        display_name: String,
        /// What the agent does.
        description: String,
        /// Tools it may call.
        tools: Vec<String>,
        /// Tiers allowed to run it.
        tiers: BTreeSet<Tier>,
        /// The new version.
        version: u32,
    },
    /// The agent is open for runs.
    AgentActivated {
        /// The new version.
        version: u32,
    },
    /// The agent is closed for new runs.
    AgentDisabled {
        /// The new version.
        version: u32,
    },
    /// The agent is closed for good.
    AgentRetired {
        /// The new version.
        version: u32,
    },
}

impl AgentEvent {
    /// Every event type name, as stored in `events.event_type`.
    pub const TYPES: [&'static str; 5] = [
        "AgentDefined",
        "AgentUpdated",
        "AgentActivated",
        "AgentDisabled",
        "AgentRetired",
    ];

    /// The current schema version of `event_type` (`None` for an unknown type). Bumping it
    /// needs a new schema file and an upcaster step: see `docs/architecture/event_versioning.md`.
    pub fn current_version(event_type: &str) -> Option<u32> {
        Self::TYPES.contains(&event_type).then_some(1)
    }

    /// The short name used in routing keys (`agent.<name>`) and schema file names.
    pub fn routing_name(event_type: &str) -> Option<&'static str> {
        Some(match event_type {
            "AgentDefined" => "defined",
            "AgentUpdated" => "updated",
            "AgentActivated" => "activated",
            "AgentDisabled" => "disabled",
            "AgentRetired" => "retired",
            _ => return None,
        })
    }
}

impl DomainEvent for AgentEvent {
    fn event_type(&self) -> String {
        match self {
            AgentEvent::AgentDefined { .. } => "AgentDefined",
            AgentEvent::AgentUpdated { .. } => "AgentUpdated",
            AgentEvent::AgentActivated { .. } => "AgentActivated",
            AgentEvent::AgentDisabled { .. } => "AgentDisabled",
            AgentEvent::AgentRetired { .. } => "AgentRetired",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        let event_type = self.event_type();
        Self::current_version(&event_type).unwrap_or(1).to_string()
    }
}
