//! Every example of every schema version validates against that version and still loads:
//! through the upcasters into the current type (by both the projector path and the event-store
//! path), valid against the current schema, and applied to an aggregate.

use std::collections::BTreeMap;

use apex_commands::upcast::DomainUpcaster;
use apex_domain::agent::{Agent, AgentEvent, AgentStatus};
use apex_domain::instance::{Instance, InstanceEvent, InstanceStatus};
use apex_domain::upcast;
use apex_projections::envelope::{DomainEvent, StoredEvent};
use chrono::Utc;
use cqrs_es::Aggregate;
use cqrs_es::persist::{EventUpcaster, SerializedEvent};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::catalog::{self, Example};

fn stored(example: &Example) -> StoredEvent {
    let mut payload = serde_json::Map::new();
    payload.insert(example.event_type.to_owned(), example.data.clone());
    StoredEvent {
        event_id: Uuid::nil(),
        aggregate_type: example.aggregate.clone(),
        aggregate_id: "example".to_owned(),
        sequence: 1,
        event_type: example.event_type.to_owned(),
        event_version: example.version.to_string(),
        payload: Value::Object(payload),
        position: 1,
        transaction_id: 1,
        recorded_at: Utc::now(),
        correlation_id: Uuid::nil(),
        causation_id: Uuid::nil(),
        principal: String::new(),
        principal_role: String::new(),
        traceparent: None,
    }
}

/// The event as an aggregate loads it from the store: cqrs-es upcasters on the tagged row.
fn loaded_by_event_store(row: &StoredEvent) -> DomainEvent {
    let serialized = SerializedEvent::new(
        row.aggregate_id.clone(),
        1,
        row.aggregate_type.clone(),
        row.event_type.clone(),
        row.event_version.clone(),
        row.payload.clone(),
        json!({}),
    );
    let upcasters: Vec<Box<dyn EventUpcaster>> = match row.aggregate_type.as_str() {
        "agent" => DomainUpcaster::<Agent>::boxed(),
        _ => DomainUpcaster::<Instance>::boxed(),
    };
    let lifted = upcasters.iter().fold(serialized, |event, u| {
        if u.can_upcast(&event.event_type, &event.event_version) {
            u.upcast(event)
        } else {
            event
        }
    });
    let current = upcast::current_version(&row.aggregate_type, &row.event_type).unwrap();
    assert_eq!(lifted.event_version, current.to_string());
    match row.aggregate_type.as_str() {
        "agent" => DomainEvent::Agent(serde_json::from_value(lifted.payload).unwrap()),
        _ => DomainEvent::Instance(serde_json::from_value(lifted.payload).unwrap()),
    }
}

#[test]
fn every_example_validates_against_the_schema_of_its_version() {
    let schemas: BTreeMap<String, Value> = catalog::schema_files()
        .into_iter()
        .map(|f| (f.path, f.schema))
        .collect();
    let examples = catalog::examples();
    for path in schemas.keys() {
        let count = examples.iter().filter(|e| &e.schema_path == path).count();
        assert!(
            count >= 2,
            "{path} has {count} examples; give it at least two"
        );
    }
    for example in &examples {
        let schema = schemas
            .get(&example.schema_path)
            .unwrap_or_else(|| panic!("{} has no schema {}", example.path, example.schema_path));
        let errors = catalog::errors(&catalog::validator(schema), &example.data);
        assert!(errors.is_empty(), "{}: {errors:#?}", example.path);
    }
}

#[test]
fn every_example_of_every_version_loads_into_the_current_type_and_applies() {
    let current_schemas: BTreeMap<(String, String), Value> = catalog::schema_files()
        .into_iter()
        .filter(|f| upcast::current_version(&f.aggregate, f.event_type) == Some(f.version))
        .map(|f| ((f.aggregate, f.event_type.to_owned()), f.schema))
        .collect();
    let examples = catalog::examples();
    assert!(
        examples.iter().any(|e| e.version > 1),
        "no example of a bumped version"
    );
    for example in &examples {
        let row = stored(example);
        // Projector / audit path: StoredEvent::decode upcasts, then deserializes.
        let decoded = row
            .decode()
            .unwrap_or_else(|e| panic!("{} does not load: {e}", example.path));
        // Event-store path: the cqrs-es upcaster on the tagged payload gives the same event.
        assert_eq!(loaded_by_event_store(&row), decoded, "{}", example.path);
        // The lifted data is valid current-version data, and is what the current type writes.
        let lifted = upcast::upcast(
            &example.aggregate,
            example.event_type,
            &example.version.to_string(),
            example.data.clone(),
        )
        .unwrap();
        let schema = &current_schemas[&(example.aggregate.clone(), example.event_type.to_owned())];
        let errors = catalog::errors(&catalog::validator(schema), &lifted);
        assert!(errors.is_empty(), "{} upcast: {errors:#?}", example.path);
        let rewritten = match &decoded {
            DomainEvent::Agent(e) => serde_json::to_value(e).unwrap(),
            DomainEvent::Instance(e) => serde_json::to_value(e).unwrap(),
        };
        assert_eq!(rewritten[example.event_type], lifted, "{}", example.path);
        match decoded {
            DomainEvent::Agent(event) => applies_to_agent(event, &example.path),
            DomainEvent::Instance(event) => applies_to_instance(event, &example.path),
        }
    }
}

fn defined() -> AgentEvent {
    AgentEvent::AgentDefined {
        agent_id: "triage".to_owned(),
        display_name: "Triage".to_owned(),
        description: String::new(),
        tools: vec!["search".to_owned()],
        tiers: [apex_domain::Tier::Free].into(),
        version: 1,
    }
}

/// Applies `event` after a plausible history and checks the state it leads to.
fn applies_to_agent(event: AgentEvent, path: &str) {
    let mut agent = Agent::default();
    if !matches!(event, AgentEvent::AgentDefined { .. }) {
        agent.apply(defined());
    }
    agent.apply(event.clone());
    let ok = match event {
        AgentEvent::AgentDefined {
            agent_id, version, ..
        } => agent.id == agent_id && agent.version == version && agent.status == AgentStatus::Draft,
        AgentEvent::AgentUpdated {
            display_name,
            version,
            ..
        } => {
            agent.definition.map(|d| d.display_name) == Some(display_name)
                && agent.version == version
        }
        AgentEvent::AgentActivated { version } => {
            agent.status == AgentStatus::Active && agent.version == version
        }
        AgentEvent::AgentDisabled { version } => {
            agent.status == AgentStatus::Disabled && agent.version == version
        }
        AgentEvent::AgentRetired { version } => {
            agent.status == AgentStatus::Retired && agent.version == version
        }
    };
    assert!(ok, "{path} did not apply to an agent");
}

/// Applies `event` after a plausible history and checks the state it leads to.
fn applies_to_instance(event: InstanceEvent, path: &str) {
    let mut instance = Instance::default();
    let created = InstanceEvent::InstanceCreated {
        owner_id: "user-1".to_owned(),
        owner_tier: apex_domain::Tier::Free,
        agent_id: "triage".to_owned(),
        agent_version: 2,
        tools: vec!["search".to_owned()],
        thread_id: "thread-1".to_owned(),
        input: "hello".to_owned(),
    };
    let started = InstanceEvent::InstanceStarted {
        display: Default::default(),
        internal: Default::default(),
    };
    let history = match &event {
        InstanceEvent::InstanceCreated { .. } => vec![],
        InstanceEvent::InstanceStarted { .. } | InstanceEvent::InstanceCancelled { .. } => {
            vec![created]
        }
        InstanceEvent::ToolCallCompleted { call_id, tool, .. } => vec![
            created,
            started,
            InstanceEvent::ToolCallStarted {
                call_id: call_id.clone(),
                tool: tool.clone(),
                display: Default::default(),
                internal: Default::default(),
            },
        ],
        _ => vec![created, started],
    };
    for e in history {
        instance.apply(e);
    }
    instance.apply(event.clone());
    let ok = match event {
        InstanceEvent::InstanceCreated { owner_id, .. } => {
            instance.created && instance.owner_id == owner_id
        }
        InstanceEvent::InstanceStarted { .. } => instance.status == InstanceStatus::Running,
        InstanceEvent::ThoughtRecorded { .. } => instance.thoughts == 1,
        InstanceEvent::ToolCallStarted { call_id, .. } => {
            instance.open_calls.contains_key(&call_id)
        }
        InstanceEvent::ToolCallCompleted { call_id, .. } => {
            instance.open_calls.is_empty() && instance.completed_calls.contains(&call_id)
        }
        InstanceEvent::InstanceCompleted { .. } => instance.status == InstanceStatus::Completed,
        InstanceEvent::InstanceFailed { .. } => instance.status == InstanceStatus::Failed,
        InstanceEvent::InstanceCancelled { .. } => instance.status == InstanceStatus::Cancelled,
    };
    assert!(ok, "{path} did not apply to an instance");
}

#[test]
fn the_envelope_examples_match_the_envelope_and_their_dataschema_and_decode() {
    let dir = catalog::root().join("examples");
    let envelope = catalog::validator(&catalog::envelope_schema());
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let message = catalog::read_json(&path);
        let errors = catalog::errors(&envelope, &message);
        assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
        let schema = message["dataschema"]
            .as_str()
            .and_then(|s| s.strip_prefix("apex:event_schemas/"))
            .map(|p| catalog::read_json(&catalog::root().join(p)))
            .unwrap();
        let errors = catalog::errors(&catalog::validator(&schema), &message["data"]);
        assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
        let cloud_event: apex_projections::envelope::CloudEvent =
            serde_json::from_value(message).unwrap();
        cloud_event.into_stored().unwrap().decode().unwrap();
        count += 1;
    }
    assert!(count > 0, "no envelope example in {}", dir.display());
}
