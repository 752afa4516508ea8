//! State and rules of the Agent aggregate.

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use serde::{Deserialize, Serialize};

use super::commands::{AgentAction, AgentCommand, AgentDefinition};
use super::events::AgentEvent;
use crate::common::{ActorRole, Tier};
use crate::error::DomainError;

/// Lifecycle of an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// Defined, not yet open for runs.
    #[default]
    Draft,
    /// Open for runs.
    Active,
    /// Temporarily closed for new runs.
    Disabled,
    /// Closed for good (terminal).
    Retired,
}

impl AgentStatus {
    /// The wire name of the status.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Draft => "draft",
            AgentStatus::Active => "active",
            AgentStatus::Disabled => "disabled",
            AgentStatus::Retired => "retired",
        }
    }
}

/// An agent definition in the catalogue.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    /// The slug; empty until defined.
    pub id: String,
    /// The current definition; `None` until defined.
    pub definition: Option<AgentDefinition>,
    /// Current status.
    pub status: AgentStatus,
    /// Bumped by every accepted change; 0 until defined.
    pub version: u32,
}

impl Agent {
    /// True once `AgentDefined` was applied.
    pub fn exists(&self) -> bool {
        self.definition.is_some()
    }

    /// True when a user of `tier` may start a run of this agent now.
    pub fn open_to(&self, tier: Tier) -> bool {
        self.status == AgentStatus::Active
            && self
                .definition
                .as_ref()
                .is_some_and(|d| d.tiers.contains(&tier))
    }

    /// Decides which events a command produces, without changing the aggregate.
    pub fn decide(&self, command: AgentCommand) -> Result<Vec<AgentEvent>, DomainError> {
        let AgentCommand { id, actor, action } = command;
        if actor.role != ActorRole::Admin {
            return Err(DomainError::RoleNotAllowed(actor.role.as_str()));
        }
        if let AgentAction::Define(definition) = action {
            if self.exists() {
                return Err(DomainError::AgentAlreadyExists(id.to_string()));
            }
            definition.validate()?;
            return Ok(vec![AgentEvent::AgentDefined {
                agent_id: id.to_string(),
                display_name: definition.display_name,
                description: definition.description,
                tools: definition.tools,
                tiers: definition.tiers,
                version: 1,
            }]);
        }
        let Some(current) = &self.definition else {
            return Err(DomainError::AgentNotFound(id.to_string()));
        };
        let version = self.version + 1;
        let event = match action {
            AgentAction::Define(_) => unreachable!("handled above"),
            AgentAction::Update(patch) => {
                if self.status == AgentStatus::Retired {
                    return Err(DomainError::AgentRetired(self.id.clone()));
                }
                if patch.is_empty() {
                    return Err(DomainError::EmptyUpdate);
                }
                let next = patch.applied_to(current);
                next.validate()?;
                if &next == current {
                    return Ok(vec![]);
                }
                AgentEvent::AgentUpdated {
                    display_name: next.display_name,
                    description: next.description,
                    tools: next.tools,
                    tiers: next.tiers,
                    version,
                }
            }
            AgentAction::Activate => {
                self.transition(
                    &[AgentStatus::Draft, AgentStatus::Disabled],
                    AgentStatus::Active,
                )?;
                AgentEvent::AgentActivated { version }
            }
            AgentAction::Disable => {
                self.transition(&[AgentStatus::Active], AgentStatus::Disabled)?;
                AgentEvent::AgentDisabled { version }
            }
            AgentAction::Retire => {
                self.transition(
                    &[
                        AgentStatus::Draft,
                        AgentStatus::Active,
                        AgentStatus::Disabled,
                    ],
                    AgentStatus::Retired,
                )?;
                AgentEvent::AgentRetired { version }
            }
        };
        Ok(vec![event])
    }

    fn transition(&self, allowed: &[AgentStatus], to: AgentStatus) -> Result<(), DomainError> {
        if self.status == AgentStatus::Retired {
            return Err(DomainError::AgentRetired(self.id.clone()));
        }
        if allowed.contains(&self.status) {
            Ok(())
        } else {
            Err(DomainError::InvalidAgentTransition {
                from: self.status.as_str(),
                to: to.as_str(),
            })
        }
    }
}

impl Aggregate for Agent {
    const TYPE: &'static str = "agent";
    type Command = AgentCommand;
    type Event = AgentEvent;
    type Error = DomainError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        // cqrs-es 0.5.0 applies sink events to the aggregate passed here and again when it
        // commits a snapshot; the state is left untouched and a scratch copy absorbs them.
        let mut scratch = Agent::default();
        for event in self.decide(command)? {
            sink.write(event, &mut scratch).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            AgentEvent::AgentDefined {
                agent_id,
                display_name,
                description,
                tools,
                tiers,
                version,
            } => {
                self.id = agent_id;
                self.definition = Some(AgentDefinition {
                    display_name,
                    description,
                    tools,
                    tiers,
                });
                self.status = AgentStatus::Draft;
                self.version = version;
            }
            AgentEvent::AgentUpdated {
                display_name,
                description,
                tools,
                tiers,
                version,
            } => {
                self.definition = Some(AgentDefinition {
                    display_name,
                    description,
                    tools,
                    tiers,
                });
                self.version = version;
            }
            AgentEvent::AgentActivated { version } => {
                self.status = AgentStatus::Active;
                self.version = version;
            }
            AgentEvent::AgentDisabled { version } => {
                self.status = AgentStatus::Disabled;
                self.version = version;
            }
            AgentEvent::AgentRetired { version } => {
                self.status = AgentStatus::Retired;
                self.version = version;
            }
        }
    }
}
