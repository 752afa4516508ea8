//! Commands accepted by the Agent aggregate.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::common::{Actor, AgentId, Tier};
use crate::error::DomainError;
use crate::limits;

/// The editable definition of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentDefinition {
    /// Name shown in the catalogue.
    pub display_name: String,
    /// What the agent does.
    pub description: String,
    /// Tools the agent may call.
    pub tools: Vec<String>,
    /// Tiers allowed to run it.
    pub tiers: BTreeSet<Tier>,
}

impl AgentDefinition {
    /// Checks every field's size and format.
    pub fn validate(&self) -> Result<(), DomainError> {
        limits::text(
            "display_name",
            &self.display_name,
            1,
            limits::DISPLAY_NAME_MAX,
        )?;
        limits::text("description", &self.description, 0, limits::DESCRIPTION_MAX)?;
        validate_tools(&self.tools)?;
        if self.tiers.is_empty() {
            return Err(DomainError::FieldRequired { field: "tiers" });
        }
        Ok(())
    }
}

/// A partial update: absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPatch {
    /// New display name.
    pub display_name: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New tool list.
    pub tools: Option<Vec<String>>,
    /// New tier set.
    pub tiers: Option<BTreeSet<Tier>>,
}

impl AgentPatch {
    /// True when no field is given.
    pub fn is_empty(&self) -> bool {
        self.display_name.is_none()
            && self.description.is_none()
            && self.tools.is_none()
            && self.tiers.is_none()
    }

    /// The definition after this patch.
    pub fn applied_to(&self, current: &AgentDefinition) -> AgentDefinition {
        AgentDefinition {
            display_name: self
                .display_name
                .clone()
                .unwrap_or_else(|| current.display_name.clone()),
            description: self
                .description
                .clone()
                .unwrap_or_else(|| current.description.clone()),
            tools: self.tools.clone().unwrap_or_else(|| current.tools.clone()),
            tiers: self.tiers.clone().unwrap_or_else(|| current.tiers.clone()),
        }
    }
}

fn validate_tools(tools: &[String]) -> Result<(), DomainError> {
    if tools.len() > limits::TOOLS_MAX {
        return Err(DomainError::FieldTooLong {
            field: "tools",
            max: limits::TOOLS_MAX,
        });
    }
    let mut seen = BTreeSet::new();
    for tool in tools {
        limits::token("tools", tool, limits::TOOL_NAME_MAX)?;
        if !seen.insert(tool) {
            return Err(DomainError::FieldInvalid {
                field: "tools",
                reason: "must not repeat a tool",
            });
        }
    }
    Ok(())
}

/// A command on an agent: who does what to which agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentCommand {
    /// The target agent.
    pub id: AgentId,
    /// Who issues it.
    pub actor: Actor,
    /// What to do.
    pub action: AgentAction,
}

/// What a command does to an agent.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentAction {
    /// Add a new agent to the catalogue, in draft.
    Define(AgentDefinition),
    /// Change some fields of the definition.
    Update(AgentPatch),
    /// Open the agent for runs.
    Activate,
    /// Close the agent for new runs, reversibly.
    Disable,
    /// Close the agent for good.
    Retire,
}

impl AgentAction {
    /// The command's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            AgentAction::Define(_) => "DefineAgent",
            AgentAction::Update(_) => "UpdateAgent",
            AgentAction::Activate => "ActivateAgent",
            AgentAction::Disable => "DisableAgent",
            AgentAction::Retire => "RetireAgent",
        }
    }
}
