//! Events of the Instance aggregate.
//!
//! Each step event has a `display` part (what the chat may show) and an `internal` part
//! (raw tool arguments and results, prompts) that only admins and auditors see.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::common::{Actor, Tier};

/// Chat-visible part of `InstanceStarted`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StartedDisplay {
    /// Optional status line.
    pub message: Option<String>,
}

/// Internal part of `InstanceStarted`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StartedInternal {
    /// The system prompt the runtime used.
    pub prompt: Option<String>,
}

/// Chat-visible part of `ThoughtRecorded`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ThoughtDisplay {
    /// The thought.
    pub thought: String,
}

/// Internal part of `ThoughtRecorded`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ThoughtInternal {
    /// The prompt that produced it.
    pub prompt: Option<String>,
    /// Raw model output.
    pub raw: Option<Value>,
}

/// Chat-visible part of the tool events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolDisplay {
    /// A one-line summary.
    pub summary: Option<String>,
}

/// Internal part of `ToolCallStarted`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolCallInternal {
    /// Raw arguments.
    pub arguments: Value,
}

/// Internal part of `ToolCallCompleted`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolResultInternal {
    /// Raw result.
    pub result: Value,
    /// How long the tool ran, in milliseconds, as measured by the runtime; `None` when the
    /// runtime did not say (and for every event stored as version 1). Added in version 2.
    pub duration_ms: Option<u64>,
}

/// Chat-visible part of `InstanceCompleted`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletedDisplay {
    /// The final answer.
    pub output: String,
}

/// Chat-visible part of `InstanceFailed`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FailedDisplay {
    /// What the chat shows about the failure.
    pub error: String,
}

/// Internal part of `InstanceCompleted` and `InstanceFailed`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RawInternal {
    /// Raw detail.
    pub raw: Option<Value>,
}

/// Chat-visible part of `InstanceCancelled`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CancelledDisplay {
    /// Why it was cancelled.
    pub reason: Option<String>,
}

/// Something that happened to a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum InstanceEvent {
    /// The run was created, pending.
    InstanceCreated {
        /// The owning user.
        owner_id: String,
        /// The owner's tier at creation.
        owner_tier: Tier,
        /// The agent run.
        agent_id: String,
        /// The agent version copied at creation.
        agent_version: u32,
        /// The agent's tool list copied at creation.
        tools: Vec<String>,
        /// The chat thread.
        thread_id: String,
        /// The user's input (chat-visible).
        input: String,
    },
    /// The runtime picked the run up.
    InstanceStarted {
        /// Chat-visible.
        display: StartedDisplay,
        /// Internal detail.
        internal: StartedInternal,
    },
    /// The agent thought.
    ThoughtRecorded {
        /// Chat-visible.
        display: ThoughtDisplay,
        /// Internal detail.
        internal: ThoughtInternal,
    },
    /// A tool call began.
    ToolCallStarted {
        /// Unique within the run.
        call_id: String,
        /// The tool.
        tool: String,
        /// Chat-visible.
        display: ToolDisplay,
        /// Internal detail.
        internal: ToolCallInternal,
    },
    /// A tool call finished.
    ToolCallCompleted {
        /// The call.
        call_id: String,
        /// The tool.
        tool: String,
        /// Whether the tool reported an error.
        is_error: bool,
        /// Chat-visible.
        display: ToolDisplay,
        /// Internal detail.
        internal: ToolResultInternal,
    },
    /// The run finished.
    InstanceCompleted {
        /// Chat-visible.
        display: CompletedDisplay,
        /// Internal detail.
        internal: RawInternal,
    },
    /// The run failed.
    InstanceFailed {
        /// Chat-visible.
        display: FailedDisplay,
        /// Internal detail.
        internal: RawInternal,
    },
    /// The run was stopped by its owner or an admin.
    InstanceCancelled {
        /// Who cancelled it.
        by: Actor,
        /// Chat-visible.
        display: CancelledDisplay,
    },
}

impl InstanceEvent {
    /// Every event type name, as stored in `events.event_type`.
    pub const TYPES: [&'static str; 8] = [
        "InstanceCreated",
        "InstanceStarted",
        "ThoughtRecorded",
        "ToolCallStarted",
        "ToolCallCompleted",
        "InstanceCompleted",
        "InstanceFailed",
        "InstanceCancelled",
    ];

    /// The current schema version of `event_type` (`None` for an unknown type). Bumping it
    /// needs a new schema file and an upcaster step: see `docs/architecture/event_versioning.md`.
    pub fn current_version(event_type: &str) -> Option<u32> {
        match event_type {
            "ToolCallCompleted" => Some(2),
            other if Self::TYPES.contains(&other) => Some(1),
            _ => None,
        }
    }

    /// The short name used in routing keys (`instance.<name>`) and schema file names.
    pub fn routing_name(event_type: &str) -> Option<&'static str> {
        Some(match event_type {
            "InstanceCreated" => "created",
            "InstanceStarted" => "started",
            "ThoughtRecorded" => "thought_recorded",
            "ToolCallStarted" => "tool_started",
            "ToolCallCompleted" => "tool_completed",
            "InstanceCompleted" => "completed",
            "InstanceFailed" => "failed",
            "InstanceCancelled" => "cancelled",
            _ => return None,
        })
    }
}

impl DomainEvent for InstanceEvent {
    fn event_type(&self) -> String {
        match self {
            InstanceEvent::InstanceCreated { .. } => "InstanceCreated",
            InstanceEvent::InstanceStarted { .. } => "InstanceStarted",
            InstanceEvent::ThoughtRecorded { .. } => "ThoughtRecorded",
            InstanceEvent::ToolCallStarted { .. } => "ToolCallStarted",
            InstanceEvent::ToolCallCompleted { .. } => "ToolCallCompleted",
            InstanceEvent::InstanceCompleted { .. } => "InstanceCompleted",
            InstanceEvent::InstanceFailed { .. } => "InstanceFailed",
            InstanceEvent::InstanceCancelled { .. } => "InstanceCancelled",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        let event_type = self.event_type();
        Self::current_version(&event_type).unwrap_or(1).to_string()
    }
}
