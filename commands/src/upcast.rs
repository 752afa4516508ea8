//! The domain upcasters as a cqrs-es [`EventUpcaster`], so aggregates load old events.
//!
//! cqrs-es hands an upcaster the stored row, whose payload is tagged with its event type
//! (`{"ToolCallCompleted": {...}}`). This adapter only checks versions and calls
//! [`apex_domain::upcast::upcast_tagged`]: the lifting steps themselves live in the domain and
//! are the same ones projectors and the audit replay run.

use std::marker::PhantomData;

use apex_domain::upcast;
use cqrs_es::Aggregate;
use cqrs_es::persist::{EventUpcaster, SerializedEvent};

/// Lifts every stored event of aggregate `A` older than its current version.
pub struct DomainUpcaster<A> {
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate + 'static> DomainUpcaster<A> {
    /// The upcaster list to give `PersistedEventStore::with_upcasters`.
    pub fn boxed() -> Vec<Box<dyn EventUpcaster>> {
        vec![Box::new(Self {
            _aggregate: PhantomData,
        })]
    }
}

impl<A: Aggregate> EventUpcaster for DomainUpcaster<A> {
    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
        // An unparsable or unknown version is passed on too, so `upcast` can log why it
        // is refused; the aggregate then fails to load instead of silently misreading it.
        match (
            upcast::current_version(A::TYPE, event_type),
            event_version.parse::<u32>(),
        ) {
            (Some(current), Ok(version)) => version != current,
            _ => true,
        }
    }

    fn upcast(&self, mut event: SerializedEvent) -> SerializedEvent {
        let payload = std::mem::take(&mut event.payload);
        match upcast::upcast_tagged(
            A::TYPE,
            &event.event_type,
            &event.event_version,
            payload.clone(),
        ) {
            Ok(lifted) => {
                event.payload = lifted;
                if let Some(current) = upcast::current_version(A::TYPE, &event.event_type) {
                    event.event_version = current.to_string();
                }
            }
            Err(error) => {
                // `EventUpcaster` cannot fail: keep the row as stored and let deserialization
                // refuse it, so the command fails loudly with this logged cause.
                tracing::error!(
                    %error,
                    aggregate_id = %event.aggregate_id,
                    sequence = event.sequence,
                    "stored event cannot be upcast"
                );
                event.payload = payload;
            }
        }
        event
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use apex_domain::instance::{Instance, InstanceEvent};
    use serde_json::json;

    use super::*;

    fn row(version: &str, payload: serde_json::Value) -> SerializedEvent {
        SerializedEvent::new(
            "i-1".to_owned(),
            5,
            "instance".to_owned(),
            "ToolCallCompleted".to_owned(),
            version.to_owned(),
            payload,
            json!({}),
        )
    }

    #[test]
    fn a_stored_v1_tool_completion_loads_as_the_current_event() {
        let upcasters = DomainUpcaster::<Instance>::boxed();
        let upcaster = &upcasters[0];
        assert!(upcaster.can_upcast("ToolCallCompleted", "1"));
        assert!(!upcaster.can_upcast("ToolCallCompleted", "2"));
        assert!(!upcaster.can_upcast("ThoughtRecorded", "1"));
        let v1 = json!({"ToolCallCompleted": {"call_id": "c", "tool": "search", "is_error": false,
            "display": {"summary": null}, "internal": {"result": [1]}}});
        let lifted = upcaster.upcast(row("1", v1));
        assert_eq!(lifted.event_version, "2");
        let event: InstanceEvent = serde_json::from_value(lifted.payload).unwrap();
        let InstanceEvent::ToolCallCompleted { internal, .. } = event else {
            panic!("not a tool completion: {event:?}");
        };
        assert_eq!((internal.result, internal.duration_ms), (json!([1]), None));
    }

    #[test]
    fn a_row_that_cannot_be_upcast_is_left_as_stored() {
        let upcasters = DomainUpcaster::<Instance>::boxed();
        let upcaster = &upcasters[0];
        assert!(upcaster.can_upcast("ToolCallCompleted", "9"));
        let stored = row("9", json!({"ToolCallCompleted": {}}));
        assert_eq!(upcaster.upcast(stored.clone()), stored);
    }
}
