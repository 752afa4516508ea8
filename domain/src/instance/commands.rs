//! Commands accepted by the Instance aggregate.

use serde_json::Value;

use crate::agent::Agent;
use crate::common::{Actor, AgentId, Tier};

/// A command on an instance: who does what to which run.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceCommand {
    /// The target instance.
    pub instance_id: String,
    /// Who issues it.
    pub actor: Actor,
    /// What to do.
    pub action: InstanceAction,
}

/// What a command does to an instance.
#[derive(Debug, Clone, PartialEq)]
pub enum InstanceAction {
    /// Create a run (user). `agent` is the Agent aggregate as loaded from the store when the
    /// command was issued (a default, non-existent agent when there is none).
    Create {
        /// The agent requested.
        agent_id: AgentId,
        /// The agent's current state, from its own event stream.
        agent: Box<Agent>,
        /// The owner's tier (from the token).
        owner_tier: Tier,
        /// The chat thread; a new thread when absent.
        thread_id: Option<String>,
        /// The user's input.
        input: String,
    },
    /// The runtime picked the run up (runner).
    Start {
        /// Chat-visible message.
        message: Option<String>,
        /// Internal: the system prompt used.
        prompt: Option<String>,
    },
    /// The agent thought something (runner).
    Think {
        /// Chat-visible thought.
        thought: String,
        /// Internal: the prompt that produced it.
        prompt: Option<String>,
        /// Internal: raw model output.
        raw: Option<Value>,
    },
    /// A tool call began (runner).
    StartTool {
        /// Unique within the run.
        call_id: String,
        /// Must be in the run's tool list.
        tool: String,
        /// Chat-visible summary.
        summary: Option<String>,
        /// Internal: raw arguments.
        arguments: Value,
    },
    /// A tool call finished (runner).
    CompleteTool {
        /// An open call of this run.
        call_id: String,
        /// Whether the tool reported an error.
        is_error: bool,
        /// Chat-visible summary.
        summary: Option<String>,
        /// Internal: raw result.
        result: Value,
        /// Internal: how long the tool ran, in milliseconds (at most
        /// [`crate::limits::DURATION_MS_MAX`]).
        duration_ms: Option<u64>,
    },
    /// The run finished (runner).
    Complete {
        /// Chat-visible answer.
        output: String,
        /// Internal: raw final model output.
        raw: Option<Value>,
    },
    /// The run failed (runner).
    Fail {
        /// Chat-visible error.
        error: String,
        /// Internal: raw failure detail.
        raw: Option<Value>,
    },
    /// The run is stopped by its owner or an admin.
    Cancel {
        /// Chat-visible reason.
        reason: Option<String>,
    },
}

impl InstanceAction {
    /// The command's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            InstanceAction::Create { .. } => "CreateInstance",
            InstanceAction::Start { .. } => "StartInstance",
            InstanceAction::Think { .. } => "RecordThought",
            InstanceAction::StartTool { .. } => "StartToolCall",
            InstanceAction::CompleteTool { .. } => "CompleteToolCall",
            InstanceAction::Complete { .. } => "CompleteInstance",
            InstanceAction::Fail { .. } => "FailInstance",
            InstanceAction::Cancel { .. } => "CancelInstance",
        }
    }
}
