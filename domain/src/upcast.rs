//! Upcasters: turn any stored version of an event payload into the current version.
//!
//! Stored events are never rewritten. A payload written as version N is lifted step by step
//! (N → N+1 → … → current) when it is read: by the event store when an aggregate loads
//! (`apex_commands::store` wraps [`upcast_tagged`] in a cqrs-es `EventUpcaster`), and by
//! projectors and the audit replay (`StoredEvent::decode` calls [`upcast`]). Both paths run
//! the same [`STEPS`]. Every version ever published has a schema and examples in
//! `event_schemas/`; the rules are in `docs/architecture/event_versioning.md`.

use serde_json::Value;

use crate::agent::AgentEvent;
use crate::instance::InstanceEvent;

/// Why a payload cannot be upcast.
#[derive(Debug, thiserror::Error)]
pub enum UpcastError {
    /// The event type is not known to this build.
    #[error("{aggregate_type}/{event_type} is not an event type known to this build")]
    UnknownType {
        /// Aggregate type.
        aggregate_type: String,
        /// Event type.
        event_type: String,
    },
    /// The version is newer than this code, or not a version at all.
    #[error("{aggregate_type}/{event_type} version {version} is not known to this build")]
    UnknownVersion {
        /// Aggregate type.
        aggregate_type: String,
        /// Event type.
        event_type: String,
        /// The version found.
        version: String,
    },
    /// The payload does not have the shape of the version it was stored as.
    #[error("{aggregate_type}/{event_type} version {version} cannot be upcast: {reason}")]
    Malformed {
        /// Aggregate type.
        aggregate_type: String,
        /// Event type.
        event_type: String,
        /// The version whose payload is malformed.
        version: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// One upcaster step: lifts the untagged `data` of one event type from `from` to `from + 1`.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// `agent` or `instance`.
    pub aggregate_type: &'static str,
    /// The stored event type, e.g. `ToolCallCompleted`.
    pub event_type: &'static str,
    /// The version this step reads; it writes `from + 1`.
    pub from: u32,
    /// The lifting function; `Err` names what is malformed.
    pub lift: fn(Value) -> Result<Value, &'static str>,
}

/// Every upcaster step. For each event type there is exactly one step from every version
/// below the current one (a test checks the chain is complete).
pub const STEPS: &[Step] = &[Step {
    aggregate_type: "instance",
    event_type: "ToolCallCompleted",
    from: 1,
    lift: tool_call_completed_v1_to_v2,
}];

/// The current version of an event type, `None` for an unknown aggregate or event type.
pub fn current_version(aggregate_type: &str, event_type: &str) -> Option<u32> {
    match aggregate_type {
        "agent" => AgentEvent::current_version(event_type),
        "instance" => InstanceEvent::current_version(event_type),
        _ => None,
    }
}

/// Lifts `data` (the untagged payload) of `event_type` at `version` to the current version.
pub fn upcast(
    aggregate_type: &str,
    event_type: &str,
    version: &str,
    data: Value,
) -> Result<Value, UpcastError> {
    let current =
        current_version(aggregate_type, event_type).ok_or_else(|| UpcastError::UnknownType {
            aggregate_type: aggregate_type.to_owned(),
            event_type: event_type.to_owned(),
        })?;
    let unknown = || UpcastError::UnknownVersion {
        aggregate_type: aggregate_type.to_owned(),
        event_type: event_type.to_owned(),
        version: version.to_owned(),
    };
    let from: u32 = version.parse().map_err(|_| unknown())?;
    if from == 0 || from > current {
        return Err(unknown());
    }
    let mut data = data;
    for at in from..current {
        let step = STEPS
            .iter()
            .find(|s| {
                s.aggregate_type == aggregate_type && s.event_type == event_type && s.from == at
            })
            .ok_or_else(unknown)?;
        data = (step.lift)(data).map_err(|reason| UpcastError::Malformed {
            aggregate_type: aggregate_type.to_owned(),
            event_type: event_type.to_owned(),
            version: at.to_string(),
            reason,
        })?;
    }
    Ok(data)
}

/// [`upcast`] for the payload as the event store keeps it, tagged with its event type:
/// `{"<EventType>": data}`. Returns the tagged payload at the current version.
pub fn upcast_tagged(
    aggregate_type: &str,
    event_type: &str,
    version: &str,
    payload: Value,
) -> Result<Value, UpcastError> {
    let Value::Object(mut map) = payload else {
        return Err(not_tagged(aggregate_type, event_type, version));
    };
    let data = match map.remove(event_type) {
        Some(data) if map.is_empty() => data,
        _ => return Err(not_tagged(aggregate_type, event_type, version)),
    };
    map.insert(
        event_type.to_owned(),
        upcast(aggregate_type, event_type, version, data)?,
    );
    Ok(Value::Object(map))
}

fn not_tagged(aggregate_type: &str, event_type: &str, version: &str) -> UpcastError {
    UpcastError::Malformed {
        aggregate_type: aggregate_type.to_owned(),
        event_type: event_type.to_owned(),
        version: version.to_owned(),
        reason: "the stored payload is not an object tagged with its event type",
    }
}

/// `ToolCallCompleted` v1 → v2: v2 adds `internal.duration_ms`. A v1 event never measured the
/// duration, so it becomes `null` (unknown), never a made-up number.
fn tool_call_completed_v1_to_v2(mut data: Value) -> Result<Value, &'static str> {
    let internal = data
        .get_mut("internal")
        .and_then(Value::as_object_mut)
        .ok_or("`internal` is not an object")?;
    internal.entry("duration_ms").or_insert(Value::Null);
    Ok(data)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn v1_tool_completed() -> Value {
        json!({"call_id": "c", "tool": "search", "is_error": false,
               "display": {"summary": null}, "internal": {"result": {"rows": 3}}})
    }

    #[test]
    fn a_v1_tool_completion_gains_an_unknown_duration() {
        let lifted = upcast("instance", "ToolCallCompleted", "1", v1_tool_completed()).unwrap();
        assert_eq!(
            lifted["internal"],
            json!({"result": {"rows": 3}, "duration_ms": null})
        );
    }

    #[test]
    fn the_current_version_passes_through_unchanged() {
        let mut v2 = v1_tool_completed();
        v2["internal"]["duration_ms"] = json!(40);
        let same = upcast("instance", "ToolCallCompleted", "2", v2.clone()).unwrap();
        assert_eq!(same, v2);
    }

    #[test]
    fn the_tagged_form_is_lifted_by_the_same_step() {
        let tagged = json!({"ToolCallCompleted": v1_tool_completed()});
        let lifted = upcast_tagged("instance", "ToolCallCompleted", "1", tagged).unwrap();
        assert_eq!(
            lifted["ToolCallCompleted"],
            upcast("instance", "ToolCallCompleted", "1", v1_tool_completed()).unwrap()
        );
        let untagged = upcast_tagged("instance", "ToolCallCompleted", "1", v1_tool_completed());
        assert!(matches!(untagged, Err(UpcastError::Malformed { .. })));
    }

    #[test]
    fn unknown_versions_types_and_shapes_are_refused() {
        for version in ["0", "3", "x", ""] {
            let r = upcast("instance", "ToolCallCompleted", version, json!({}));
            assert!(
                matches!(r, Err(UpcastError::UnknownVersion { .. })),
                "{version}"
            );
        }
        let r = upcast("instance", "Teleported", "1", json!({}));
        assert!(matches!(r, Err(UpcastError::UnknownType { .. })));
        let r = upcast("instance", "ToolCallCompleted", "1", json!({"internal": 3}));
        assert!(matches!(r, Err(UpcastError::Malformed { .. })));
    }

    #[test]
    fn every_event_type_has_a_complete_chain_of_steps() {
        let types = AgentEvent::TYPES
            .iter()
            .map(|t| ("agent", *t))
            .chain(InstanceEvent::TYPES.iter().map(|t| ("instance", *t)));
        for (aggregate, event_type) in types {
            let current = current_version(aggregate, event_type).unwrap();
            for from in 1..current {
                let steps = STEPS
                    .iter()
                    .filter(|s| {
                        s.aggregate_type == aggregate
                            && s.event_type == event_type
                            && s.from == from
                    })
                    .count();
                assert_eq!(steps, 1, "{aggregate}/{event_type} step from v{from}");
            }
        }
        for step in STEPS {
            let current = current_version(step.aggregate_type, step.event_type).unwrap();
            assert!(
                step.from < current,
                "{step:?} lifts past the current version"
            );
        }
    }
}
