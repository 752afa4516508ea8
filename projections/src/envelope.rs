//! Stored events and their CloudEvents form on the bus.
//!
//! A message is a CloudEvent in structured JSON mode (`application/cloudevents+json`):
//! `type` is `apex.<aggregate>.<event>.v<N>`, `subject` the aggregate id, `data` the event's
//! payload, `dataschema` the JSON Schema in `event_schemas/`. Extensions carry the aggregate
//! sequence, the global position, the correlation and causation ids and the W3C trace context.

use apex_domain::agent::AgentEvent;
use apex_domain::instance::InstanceEvent;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// The CloudEvents `source` of every Apex event.
pub const SOURCE: &str = "/apex/event-store";
/// The CloudEvents content type.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// One row of the `events` table.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Unique event id.
    pub event_id: Uuid,
    /// `agent` or `instance`.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// 1-based sequence within the aggregate.
    pub sequence: i64,
    /// E.g. `ToolCallCompleted`.
    pub event_type: String,
    /// Schema version of the payload, e.g. `1`.
    pub event_version: String,
    /// The payload as stored (externally tagged: `{"<EventType>": {...}}`).
    pub payload: Value,
    /// Global insert position.
    pub position: i64,
    /// The appending transaction.
    pub transaction_id: i64,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
    /// Correlation id.
    pub correlation_id: Uuid,
    /// Causation id.
    pub causation_id: Uuid,
    /// Acting principal.
    pub principal: String,
    /// Role of the acting principal.
    pub principal_role: String,
    /// W3C `traceparent` of the command, when it had one.
    pub traceparent: Option<String>,
}

/// A decoded domain event of either aggregate.
#[derive(Debug, Clone, PartialEq)]
pub enum DomainEvent {
    /// An Agent event.
    Agent(AgentEvent),
    /// An Instance event.
    Instance(InstanceEvent),
}

/// Why an event could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not a CloudEvent Apex understands.
    #[error("not an Apex CloudEvent: {0}")]
    Envelope(String),
    /// A version this build cannot upcast.
    #[error(transparent)]
    Version(apex_domain::upcast::UpcastError),
    /// Unknown aggregate or event type.
    #[error("unknown event type {0}")]
    UnknownType(String),
    /// The payload does not match the event type.
    #[error("payload of {event_type} v{version} does not decode: {source}")]
    Payload {
        /// The event type.
        event_type: String,
        /// Its version.
        version: String,
        /// The serde error.
        source: serde_json::Error,
    },
}

impl StoredEvent {
    /// The routing key: `<aggregate>.<event>`, e.g. `instance.tool_completed`.
    pub fn routing_key(&self) -> Result<String, DecodeError> {
        Ok(format!(
            "{}.{}",
            self.aggregate_type,
            routing_name(&self.aggregate_type, &self.event_type)?
        ))
    }

    /// The payload without its variant tag: the CloudEvent `data`.
    pub fn data(&self) -> Value {
        match &self.payload {
            Value::Object(map) if map.len() == 1 => {
                map.values().next().cloned().unwrap_or_default()
            }
            other => other.clone(),
        }
    }

    /// Decodes the payload into the current domain type, upcasting older versions.
    pub fn decode(&self) -> Result<DomainEvent, DecodeError> {
        self.decode_data(self.data())
    }

    /// [`decode`](Self::decode), moving the payload out instead of copying it: `payload` is
    /// `Null` afterwards. For readers that keep only the decoded event (a rebuild's replay).
    pub fn decode_taking_payload(&mut self) -> Result<DomainEvent, DecodeError> {
        let data = match std::mem::take(&mut self.payload) {
            Value::Object(map) if map.len() == 1 => {
                map.into_iter().next().map(|(_, v)| v).unwrap_or_default()
            }
            other => other,
        };
        self.decode_data(data)
    }

    fn decode_data(&self, data: Value) -> Result<DomainEvent, DecodeError> {
        let upcast = apex_domain::upcast::upcast(
            &self.aggregate_type,
            &self.event_type,
            &self.event_version,
            data,
        )
        .map_err(DecodeError::Version)?;
        let mut tagged = Map::new();
        tagged.insert(self.event_type.clone(), upcast);
        let tagged = Value::Object(tagged);
        let payload_err = |source| DecodeError::Payload {
            event_type: self.event_type.clone(),
            version: self.event_version.clone(),
            source,
        };
        match self.aggregate_type.as_str() {
            "agent" => serde_json::from_value(tagged)
                .map(DomainEvent::Agent)
                .map_err(payload_err),
            "instance" => serde_json::from_value(tagged)
                .map(DomainEvent::Instance)
                .map_err(payload_err),
            other => Err(DecodeError::UnknownType(other.to_owned())),
        }
    }

    /// The CloudEvent published for this event.
    pub fn to_cloud_event(&self) -> Result<CloudEvent, DecodeError> {
        let name = routing_name(&self.aggregate_type, &self.event_type)?;
        Ok(CloudEvent {
            specversion: "1.0".to_owned(),
            id: self.event_id,
            source: SOURCE.to_owned(),
            kind: format!(
                "apex.{}.{}.v{}",
                self.aggregate_type, name, self.event_version
            ),
            subject: self.aggregate_id.clone(),
            time: self.recorded_at,
            datacontenttype: "application/json".to_owned(),
            dataschema: format!(
                "apex:event_schemas/{}/{}.v{}.json",
                self.aggregate_type, name, self.event_version
            ),
            data: self.data(),
            sequence: self.sequence,
            position: self.position,
            correlationid: self.correlation_id,
            causationid: self.causation_id,
            traceparent: self.traceparent.clone(),
        })
    }
}

fn routing_name(aggregate_type: &str, event_type: &str) -> Result<&'static str, DecodeError> {
    let name = match aggregate_type {
        "agent" => AgentEvent::routing_name(event_type),
        "instance" => InstanceEvent::routing_name(event_type),
        _ => None,
    };
    name.ok_or_else(|| DecodeError::UnknownType(format!("{aggregate_type}/{event_type}")))
}

/// A CloudEvents 1.0 event in structured JSON mode, as published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudEvent {
    /// Always `1.0`.
    pub specversion: String,
    /// The event id (unique; consumers may deduplicate on it).
    pub id: Uuid,
    /// Always [`SOURCE`].
    pub source: String,
    /// `apex.<aggregate>.<event>.v<N>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The aggregate id.
    pub subject: String,
    /// When the event was recorded.
    pub time: DateTime<Utc>,
    /// Always `application/json`.
    pub datacontenttype: String,
    /// `apex:event_schemas/<aggregate>/<event>.v<N>.json`.
    pub dataschema: String,
    /// The payload.
    pub data: Value,
    /// Extension: the aggregate sequence (1-based, gap-free per aggregate).
    pub sequence: i64,
    /// Extension: the global store position.
    pub position: i64,
    /// Extension: correlation id.
    pub correlationid: Uuid,
    /// Extension: causation id.
    pub causationid: Uuid,
    /// Extension: W3C trace context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl CloudEvent {
    /// Splits `type` into (aggregate type, stored event type, version).
    pub fn parse_type(&self) -> Result<(String, String, String), DecodeError> {
        let bad = || {
            DecodeError::Envelope(format!(
                "type `{}` is not apex.<aggregate>.<event>.v<N>",
                self.kind
            ))
        };
        let rest = self.kind.strip_prefix("apex.").ok_or_else(bad)?;
        let (aggregate, rest) = rest.split_once('.').ok_or_else(bad)?;
        let (name, version) = rest.rsplit_once(".v").ok_or_else(bad)?;
        if version.is_empty() || !version.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        let types: &[&str] = match aggregate {
            "agent" => &AgentEvent::TYPES,
            "instance" => &InstanceEvent::TYPES,
            _ => return Err(DecodeError::UnknownType(self.kind.clone())),
        };
        let event_type = types
            .iter()
            .find(|t| routing_name(aggregate, t).is_ok_and(|n| n == name))
            .ok_or_else(|| DecodeError::UnknownType(self.kind.clone()))?;
        Ok((
            aggregate.to_owned(),
            (*event_type).to_owned(),
            version.to_owned(),
        ))
    }

    /// Rebuilds the stored event (position-level fields the bus does not carry are defaulted).
    pub fn into_stored(self) -> Result<StoredEvent, DecodeError> {
        let (aggregate_type, event_type, event_version) = self.parse_type()?;
        if self.sequence < 1 {
            return Err(DecodeError::Envelope(
                "sequence must be positive".to_owned(),
            ));
        }
        let mut payload = Map::new();
        payload.insert(event_type.clone(), self.data);
        Ok(StoredEvent {
            event_id: self.id,
            aggregate_type,
            aggregate_id: self.subject,
            sequence: self.sequence,
            event_type,
            event_version,
            payload: Value::Object(payload),
            position: self.position,
            transaction_id: 0,
            recorded_at: self.time,
            correlation_id: self.correlationid,
            causation_id: self.causationid,
            principal: String::new(),
            principal_role: String::new(),
            traceparent: self.traceparent,
        })
    }
}
