//! Typed domain errors with stable codes.
//!
//! Every rule breach is a variant here. `code()` is the stable, machine-readable identifier
//! clients match on; `kind()` tells the edge which family of 4xx it is. Messages are for humans
//! and may change; codes never do.

use serde::Serialize;

/// The family of a domain error; the HTTP edge maps each to one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrorKind {
    /// The input is malformed or breaks a size or format limit (422).
    Validation,
    /// The target does not exist or is not visible to the actor (404).
    NotFound,
    /// The actor may not do this (403).
    Forbidden,
    /// The aggregate's current state does not allow it (409).
    Conflict,
}

/// A broken business rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// A required text field is empty.
    #[error("{field} is required")]
    FieldRequired {
        /// The field.
        field: &'static str,
    },
    /// A text or JSON field is larger than its limit.
    #[error("{field} is longer than {max}")]
    FieldTooLong {
        /// The field.
        field: &'static str,
        /// The limit (characters for text, bytes for JSON).
        max: usize,
    },
    /// A field has the wrong format.
    #[error("{field} is invalid: {reason}")]
    FieldInvalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// An update that changes nothing.
    #[error("the update names no field to change")]
    EmptyUpdate,
    /// No agent with this id.
    #[error("agent {0} does not exist")]
    AgentNotFound(String),
    /// An agent with this id already exists.
    #[error("agent {0} already exists")]
    AgentAlreadyExists(String),
    /// The agent's status does not allow the transition.
    #[error("agent cannot go from {from} to {to}")]
    InvalidAgentTransition {
        /// Current status.
        from: &'static str,
        /// Requested status.
        to: &'static str,
    },
    /// A retired agent accepts no change.
    #[error("agent {0} is retired")]
    AgentRetired(String),
    /// The agent exists but is not active, so no run can start.
    #[error("agent {0} is not active")]
    AgentNotActive(String),
    /// The agent is not open to the owner's tier.
    #[error("agent {agent} is not available on the {tier} tier")]
    TierNotAllowed {
        /// The agent.
        agent: String,
        /// The owner's tier.
        tier: &'static str,
    },
    /// No instance with this id (or not visible to the actor).
    #[error("instance {0} does not exist")]
    InstanceNotFound(String),
    /// An instance with this id already exists.
    #[error("instance {0} already exists")]
    InstanceAlreadyExists(String),
    /// The instance's status does not allow the step.
    #[error("instance is {status}; {action} needs it to be {expected}")]
    InvalidInstanceTransition {
        /// Current status.
        status: &'static str,
        /// The attempted step.
        action: &'static str,
        /// The status(es) that would allow it.
        expected: &'static str,
    },
    /// The instance ended; terminal states accept nothing.
    #[error("instance is {0} and accepts no further steps")]
    InstanceTerminal(&'static str),
    /// The tool is not in the tool list copied from the agent.
    #[error("tool {0} is not in this run's tool list")]
    ToolNotAllowed(String),
    /// The call id was already used in this run.
    #[error("tool call id {0} is already used in this run")]
    DuplicateCallId(String),
    /// No open tool call with this id.
    #[error("no open tool call {0} in this run")]
    UnknownCallId(String),
    /// The call was already completed.
    #[error("tool call {0} is already completed")]
    CallAlreadyCompleted(String),
    /// The run cannot complete while tool calls are open.
    #[error("{0} tool call(s) are still open")]
    OpenToolCalls(usize),
    /// The actor's role may not issue this command.
    #[error("role {0} may not do this")]
    RoleNotAllowed(&'static str),
}

impl DomainError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            DomainError::FieldRequired { .. } => "field_required",
            DomainError::FieldTooLong { .. } => "field_too_long",
            DomainError::FieldInvalid { .. } => "field_invalid",
            DomainError::EmptyUpdate => "empty_update",
            DomainError::AgentNotFound(_) => "agent_not_found",
            DomainError::AgentAlreadyExists(_) => "agent_already_exists",
            DomainError::InvalidAgentTransition { .. } => "invalid_agent_transition",
            DomainError::AgentRetired(_) => "agent_retired",
            DomainError::AgentNotActive(_) => "agent_not_active",
            DomainError::TierNotAllowed { .. } => "tier_not_allowed",
            DomainError::InstanceNotFound(_) => "instance_not_found",
            DomainError::InstanceAlreadyExists(_) => "instance_already_exists",
            DomainError::InvalidInstanceTransition { .. } => "invalid_instance_transition",
            DomainError::InstanceTerminal(_) => "instance_terminal",
            DomainError::ToolNotAllowed(_) => "tool_not_allowed",
            DomainError::DuplicateCallId(_) => "duplicate_call_id",
            DomainError::UnknownCallId(_) => "unknown_call_id",
            DomainError::CallAlreadyCompleted(_) => "call_already_completed",
            DomainError::OpenToolCalls(_) => "open_tool_calls",
            DomainError::RoleNotAllowed(_) => "role_not_allowed",
        }
    }

    /// The family of the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DomainError::FieldRequired { .. }
            | DomainError::FieldTooLong { .. }
            | DomainError::FieldInvalid { .. }
            | DomainError::EmptyUpdate
            | DomainError::ToolNotAllowed(_) => ErrorKind::Validation,
            DomainError::AgentNotFound(_)
            | DomainError::InstanceNotFound(_)
            | DomainError::UnknownCallId(_) => ErrorKind::NotFound,
            DomainError::TierNotAllowed { .. } | DomainError::RoleNotAllowed(_) => {
                ErrorKind::Forbidden
            }
            DomainError::AgentAlreadyExists(_)
            | DomainError::InvalidAgentTransition { .. }
            | DomainError::AgentRetired(_)
            | DomainError::AgentNotActive(_)
            | DomainError::InstanceAlreadyExists(_)
            | DomainError::InvalidInstanceTransition { .. }
            | DomainError::InstanceTerminal(_)
            | DomainError::DuplicateCallId(_)
            | DomainError::CallAlreadyCompleted(_)
            | DomainError::OpenToolCalls(_) => ErrorKind::Conflict,
        }
    }
}
