//! The chat timeline: the chat-visible form of each instance event.
//!
//! Display fields only: internal detail (prompts, raw tool arguments and results) never enters
//! it. The timeline is written with the events themselves (an inline projection), so the same
//! function serves the write side, the rebuild and the tests.

use serde::Serialize;
use serde_json::{Value, json};

use crate::instance::InstanceEvent;

/// One chat-visible step of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineEntry {
    /// `instance_created`, `agent_started`, `agent_thinking`, `tool_executing`,
    /// `tool_completed`, `agent_completed`, `agent_failed` or `agent_cancelled`.
    pub kind: &'static str,
    /// Display data.
    pub display: Value,
}

/// The chat-visible form of an instance event.
pub fn timeline_entry(event: &InstanceEvent) -> TimelineEntry {
    let (kind, display) = match event {
        InstanceEvent::InstanceCreated {
            agent_id,
            thread_id,
            input,
            ..
        } => (
            "instance_created",
            json!({ "agent_id": agent_id, "thread_id": thread_id, "input": input }),
        ),
        InstanceEvent::InstanceStarted { display, .. } => {
            ("agent_started", json!({ "message": display.message }))
        }
        InstanceEvent::ThoughtRecorded { display, .. } => {
            ("agent_thinking", json!({ "thought": display.thought }))
        }
        InstanceEvent::ToolCallStarted {
            call_id,
            tool,
            display,
            ..
        } => (
            "tool_executing",
            json!({ "call_id": call_id, "tool": tool, "summary": display.summary }),
        ),
        InstanceEvent::ToolCallCompleted {
            call_id,
            tool,
            is_error,
            display,
            ..
        } => (
            "tool_completed",
            json!({ "call_id": call_id, "tool": tool, "is_error": is_error, "summary": display.summary }),
        ),
        InstanceEvent::InstanceCompleted { display, .. } => {
            ("agent_completed", json!({ "output": display.output }))
        }
        InstanceEvent::InstanceFailed { display, .. } => {
            ("agent_failed", json!({ "error": display.error }))
        }
        InstanceEvent::InstanceCancelled { display, by } => (
            "agent_cancelled",
            json!({ "reason": display.reason, "by_role": by.role }),
        ),
    };
    TimelineEntry { kind, display }
}
