//! State and rules of the Instance aggregate.

use std::collections::{BTreeMap, BTreeSet};

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::commands::{InstanceAction, InstanceCommand};
use super::events::*;
use crate::common::{Actor, ActorRole, Tier};
use crate::error::DomainError;
use crate::limits;

/// Lifecycle of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// Created, waiting for the runtime.
    #[default]
    Pending,
    /// The runtime is executing it.
    Running,
    /// Finished with an answer (terminal).
    Completed,
    /// Finished with an error (terminal).
    Failed,
    /// Stopped by its owner or an admin (terminal).
    Cancelled,
}

impl InstanceStatus {
    /// The wire name of the status.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Pending => "pending",
            InstanceStatus::Running => "running",
            InstanceStatus::Completed => "completed",
            InstanceStatus::Failed => "failed",
            InstanceStatus::Cancelled => "cancelled",
        }
    }

    /// True for completed, failed and cancelled.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            InstanceStatus::Completed | InstanceStatus::Failed | InstanceStatus::Cancelled
        )
    }
}

/// One run of one agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// True once `InstanceCreated` was applied.
    pub created: bool,
    /// The owning user.
    pub owner_id: String,
    /// The owner's tier at creation.
    pub owner_tier: Option<Tier>,
    /// The agent run.
    pub agent_id: String,
    /// The agent version copied at creation.
    pub agent_version: u32,
    /// The tool list copied at creation.
    pub tools: Vec<String>,
    /// The chat thread.
    pub thread_id: String,
    /// Current status.
    pub status: InstanceStatus,
    /// Open tool calls: call id → tool.
    pub open_calls: BTreeMap<String, String>,
    /// Tool calls already completed.
    pub completed_calls: BTreeSet<String>,
    /// Thoughts recorded.
    pub thoughts: u64,
}

impl Instance {
    /// Decides which events a command produces, without changing the aggregate.
    pub fn decide(&self, command: InstanceCommand) -> Result<Vec<InstanceEvent>, DomainError> {
        let InstanceCommand {
            instance_id,
            actor,
            action,
        } = command;
        if let InstanceAction::Create {
            agent_id,
            agent,
            owner_tier,
            thread_id,
            input,
        } = action
        {
            require_role(&actor, &[ActorRole::User])?;
            if self.created {
                return Err(DomainError::InstanceAlreadyExists(instance_id));
            }
            limits::text("input", &input, 1, limits::INPUT_MAX)?;
            if let Some(thread) = &thread_id {
                limits::token("thread_id", thread, limits::THREAD_ID_MAX)?;
            }
            let Some(definition) = agent
                .definition
                .as_ref()
                .filter(|_| agent.id == agent_id.as_str())
            else {
                return Err(DomainError::AgentNotFound(agent_id.to_string()));
            };
            if !agent.open_to(owner_tier) {
                if agent.status != crate::agent::AgentStatus::Active {
                    return Err(DomainError::AgentNotActive(agent_id.to_string()));
                }
                return Err(DomainError::TierNotAllowed {
                    agent: agent_id.to_string(),
                    tier: owner_tier.as_str(),
                });
            }
            return Ok(vec![InstanceEvent::InstanceCreated {
                owner_id: actor.id,
                owner_tier,
                agent_id: agent_id.to_string(),
                agent_version: agent.version,
                tools: definition.tools.clone(),
                thread_id: thread_id.unwrap_or_else(|| instance_id.clone()),
                input,
            }]);
        }

        if !self.created {
            return Err(DomainError::InstanceNotFound(instance_id));
        }
        if let InstanceAction::Cancel { reason } = action {
            match actor.role {
                ActorRole::Admin => {}
                ActorRole::User if actor.id == self.owner_id => {}
                // Another user's run is not visible to them at all.
                ActorRole::User => return Err(DomainError::InstanceNotFound(instance_id)),
                other => return Err(DomainError::RoleNotAllowed(other.as_str())),
            }
            self.not_terminal()?;
            limits::optional_text("reason", reason.as_deref(), limits::DISPLAY_TEXT_MAX)?;
            return Ok(vec![InstanceEvent::InstanceCancelled {
                by: actor,
                display: CancelledDisplay { reason },
            }]);
        }

        require_role(&actor, &[ActorRole::Runner])?;
        self.not_terminal()?;
        let event = match action {
            InstanceAction::Create { .. } | InstanceAction::Cancel { .. } => {
                unreachable!("handled above")
            }
            InstanceAction::Start { message, prompt } => {
                self.require(InstanceStatus::Pending, "start")?;
                limits::optional_text("message", message.as_deref(), limits::DISPLAY_TEXT_MAX)?;
                limits::optional_text("prompt", prompt.as_deref(), limits::PROMPT_MAX)?;
                InstanceEvent::InstanceStarted {
                    display: StartedDisplay { message },
                    internal: StartedInternal { prompt },
                }
            }
            InstanceAction::Think {
                thought,
                prompt,
                raw,
            } => {
                self.require(InstanceStatus::Running, "record a thought")?;
                limits::text("thought", &thought, 1, limits::DISPLAY_TEXT_MAX)?;
                limits::optional_text("prompt", prompt.as_deref(), limits::PROMPT_MAX)?;
                optional_json("raw", raw.as_ref())?;
                InstanceEvent::ThoughtRecorded {
                    display: ThoughtDisplay { thought },
                    internal: ThoughtInternal { prompt, raw },
                }
            }
            InstanceAction::StartTool {
                call_id,
                tool,
                summary,
                arguments,
            } => {
                self.require(InstanceStatus::Running, "start a tool call")?;
                limits::token("call_id", &call_id, limits::CALL_ID_MAX)?;
                limits::token("tool", &tool, limits::TOOL_NAME_MAX)?;
                limits::optional_text("summary", summary.as_deref(), limits::DISPLAY_TEXT_MAX)?;
                limits::internal_json("arguments", &arguments)?;
                if !self.tools.contains(&tool) {
                    return Err(DomainError::ToolNotAllowed(tool));
                }
                if self.open_calls.contains_key(&call_id) || self.completed_calls.contains(&call_id)
                {
                    return Err(DomainError::DuplicateCallId(call_id));
                }
                InstanceEvent::ToolCallStarted {
                    call_id,
                    tool,
                    display: ToolDisplay { summary },
                    internal: ToolCallInternal { arguments },
                }
            }
            InstanceAction::CompleteTool {
                call_id,
                is_error,
                summary,
                result,
                duration_ms,
            } => {
                self.require(InstanceStatus::Running, "complete a tool call")?;
                limits::token("call_id", &call_id, limits::CALL_ID_MAX)?;
                limits::optional_text("summary", summary.as_deref(), limits::DISPLAY_TEXT_MAX)?;
                limits::internal_json("result", &result)?;
                limits::optional_duration_ms("duration_ms", duration_ms)?;
                if self.completed_calls.contains(&call_id) {
                    return Err(DomainError::CallAlreadyCompleted(call_id));
                }
                let Some(tool) = self.open_calls.get(&call_id) else {
                    return Err(DomainError::UnknownCallId(call_id));
                };
                InstanceEvent::ToolCallCompleted {
                    tool: tool.clone(),
                    call_id,
                    is_error,
                    display: ToolDisplay { summary },
                    internal: ToolResultInternal {
                        result,
                        duration_ms,
                    },
                }
            }
            InstanceAction::Complete { output, raw } => {
                self.require(InstanceStatus::Running, "complete")?;
                limits::text("output", &output, 1, limits::DISPLAY_TEXT_MAX)?;
                optional_json("raw", raw.as_ref())?;
                if !self.open_calls.is_empty() {
                    return Err(DomainError::OpenToolCalls(self.open_calls.len()));
                }
                InstanceEvent::InstanceCompleted {
                    display: CompletedDisplay { output },
                    internal: RawInternal { raw },
                }
            }
            InstanceAction::Fail { error, raw } => {
                self.require(InstanceStatus::Running, "fail")?;
                limits::text("error", &error, 1, limits::DISPLAY_TEXT_MAX)?;
                optional_json("raw", raw.as_ref())?;
                InstanceEvent::InstanceFailed {
                    display: FailedDisplay { error },
                    internal: RawInternal { raw },
                }
            }
        };
        Ok(vec![event])
    }

    fn not_terminal(&self) -> Result<(), DomainError> {
        if self.status.is_terminal() {
            Err(DomainError::InstanceTerminal(self.status.as_str()))
        } else {
            Ok(())
        }
    }

    fn require(&self, expected: InstanceStatus, action: &'static str) -> Result<(), DomainError> {
        if self.status == expected {
            Ok(())
        } else {
            Err(DomainError::InvalidInstanceTransition {
                status: self.status.as_str(),
                action,
                expected: expected.as_str(),
            })
        }
    }
}

fn require_role(actor: &Actor, allowed: &[ActorRole]) -> Result<(), DomainError> {
    if allowed.contains(&actor.role) {
        Ok(())
    } else {
        Err(DomainError::RoleNotAllowed(actor.role.as_str()))
    }
}

fn optional_json(field: &'static str, value: Option<&Value>) -> Result<(), DomainError> {
    value.map_or(Ok(()), |v| limits::internal_json(field, v))
}

impl Aggregate for Instance {
    const TYPE: &'static str = "instance";
    type Command = InstanceCommand;
    type Event = InstanceEvent;
    type Error = DomainError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        // cqrs-es 0.5.0 applies sink events to the aggregate passed here and again when it
        // commits a snapshot, so a snapshot would count every event twice. The state is left
        // untouched here and a throwaway aggregate absorbs the sink's apply.
        let mut scratch = Instance::default();
        for event in self.decide(command)? {
            sink.write(event, &mut scratch).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            InstanceEvent::InstanceCreated {
                owner_id,
                owner_tier,
                agent_id,
                agent_version,
                tools,
                thread_id,
                input: _,
            } => {
                self.created = true;
                self.owner_id = owner_id;
                self.owner_tier = Some(owner_tier);
                self.agent_id = agent_id;
                self.agent_version = agent_version;
                self.tools = tools;
                self.thread_id = thread_id;
                self.status = InstanceStatus::Pending;
            }
            InstanceEvent::InstanceStarted { .. } => self.status = InstanceStatus::Running,
            InstanceEvent::ThoughtRecorded { .. } => self.thoughts += 1,
            InstanceEvent::ToolCallStarted { call_id, tool, .. } => {
                self.open_calls.insert(call_id, tool);
            }
            InstanceEvent::ToolCallCompleted { call_id, .. } => {
                self.open_calls.remove(&call_id);
                self.completed_calls.insert(call_id);
            }
            InstanceEvent::InstanceCompleted { .. } => self.status = InstanceStatus::Completed,
            InstanceEvent::InstanceFailed { .. } => self.status = InstanceStatus::Failed,
            InstanceEvent::InstanceCancelled { .. } => self.status = InstanceStatus::Cancelled,
        }
    }
}
