//! Inline projections: read-model rows written by the append's own statement, so they commit
//! with the events they come from (Marten's inline projections).
//!
//! The chat timeline (`rm_timeline`) is one: a chat update may leave as soon as its event is
//! committed (the relay announces it with the event), and a client that reads the timeline
//! or resumes its socket after an update always finds the step there. The rows are computed
//! from the events being appended with the same rule the rebuild replays
//! ([`apex_domain::timeline::timeline_entry`]); a run's owner comes from its creation (in the
//! same append, or the run's first timeline row).

use apex_domain::instance::{Instance, InstanceEvent};
use apex_domain::timeline::timeline_entry;
use cqrs_es::Aggregate;
use cqrs_es::persist::{PersistenceError, SerializedEvent};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

/// One `rm_timeline` row of an event being appended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TimelineRow {
    pub(crate) instance_id: Uuid,
    pub(crate) sequence: i64,
    /// `None`: the run's creation is stored already; the statement reads its owner there.
    pub(crate) owner_id: Option<String>,
    pub(crate) kind: &'static str,
    pub(crate) display: Value,
    pub(crate) traceparent: Option<String>,
}

/// The timeline rows of one command's events (none for other aggregates' events).
pub(crate) fn timeline_rows(
    aggregate_type: &str,
    events: &[SerializedEvent],
) -> Result<Vec<TimelineRow>, PersistenceError> {
    if aggregate_type != Instance::TYPE {
        return Ok(Vec::new());
    }
    let mut owner: Option<String> = None;
    let mut rows = Vec::with_capacity(events.len());
    for event in events {
        let instance_id = Uuid::parse_str(&event.aggregate_id).map_err(|e| invalid(event, e))?;
        let decoded = InstanceEvent::deserialize(&event.payload).map_err(|e| invalid(event, e))?;
        if let InstanceEvent::InstanceCreated { owner_id, .. } = &decoded {
            owner = Some(owner_id.clone());
        }
        let entry = timeline_entry(&decoded);
        rows.push(TimelineRow {
            instance_id,
            sequence: event.sequence as i64,
            owner_id: owner.clone(),
            kind: entry.kind,
            display: entry.display,
            traceparent: event
                .metadata
                .get("traceparent")
                .and_then(Value::as_str)
                .map(str::to_owned),
        });
    }
    Ok(rows)
}

fn invalid(event: &SerializedEvent, error: impl std::fmt::Display) -> PersistenceError {
    PersistenceError::UnknownError(
        format!(
            "instance event {} #{} has no timeline entry: {error}",
            event.aggregate_id, event.sequence
        )
        .into(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn serialized(id: &str, sequence: usize, payload: Value) -> SerializedEvent {
        SerializedEvent {
            aggregate_id: id.to_owned(),
            sequence,
            aggregate_type: "instance".to_owned(),
            event_type: String::new(),
            event_version: "1".to_owned(),
            payload,
            metadata: json!({ "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" }),
        }
    }

    #[test]
    fn a_creation_gives_its_owner_to_the_rest_of_the_command_and_no_internal_detail_leaks() {
        use apex_domain::Tier;
        use apex_domain::instance::{ThoughtDisplay, ThoughtInternal};

        let id = Uuid::new_v4();
        let created = InstanceEvent::InstanceCreated {
            owner_id: "user-1".to_owned(),
            owner_tier: Tier::Mid,
            agent_id: "triage".to_owned(),
            agent_version: 2,
            tools: vec!["sql".to_owned()],
            thread_id: "t-1".to_owned(),
            input: "why is my bill up?".to_owned(),
        };
        let thought = InstanceEvent::ThoughtRecorded {
            display: ThoughtDisplay {
                thought: "reading the invoices".to_owned(),
            },
            internal: ThoughtInternal {
                prompt: Some("SECRET PROMPT".to_owned()),
                raw: None,
            },
        };
        let events = [
            serialized(&id.to_string(), 1, serde_json::to_value(&created).unwrap()),
            serialized(&id.to_string(), 2, serde_json::to_value(&thought).unwrap()),
        ];
        let rows = timeline_rows("instance", &events).unwrap();
        let kinds: Vec<_> = rows.iter().map(|r| (r.sequence, r.kind)).collect();
        assert_eq!(kinds, [(1, "instance_created"), (2, "agent_thinking")]);
        assert!(rows.iter().all(|r| r.owner_id.as_deref() == Some("user-1")));
        assert!(rows.iter().all(|r| r.instance_id == id));
        assert_eq!(
            rows[1].display,
            json!({ "thought": "reading the invoices" })
        );
        assert!(
            !serde_json::to_string(&rows[1].display)
                .unwrap()
                .contains("SECRET")
        );
        assert_eq!(
            rows[1].traceparent.as_deref(),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
    }

    #[test]
    fn a_later_command_leaves_the_owner_to_the_store() {
        use apex_domain::instance::ThoughtDisplay;

        let thought = InstanceEvent::ThoughtRecorded {
            display: ThoughtDisplay {
                thought: "next".to_owned(),
            },
            internal: Default::default(),
        };
        let id = Uuid::new_v4().to_string();
        let event = serialized(&id, 7, serde_json::to_value(&thought).unwrap());
        let rows = timeline_rows("instance", &[event]).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].owner_id, None);
    }

    #[test]
    fn agent_events_have_no_timeline_rows() {
        let event = serialized("triage", 1, json!({ "AgentRetired": {} }));
        assert!(timeline_rows("agent", &[event]).unwrap().is_empty());
    }

    #[test]
    fn a_payload_that_is_no_instance_event_fails_the_append_with_its_name() {
        let id = Uuid::new_v4().to_string();
        let event = serialized(&id, 3, json!({ "NoSuchEvent": {} }));
        let err = timeline_rows("instance", &[event]).unwrap_err().to_string();
        assert!(err.contains(&format!("{id} #3")), "{err}");
    }
}
