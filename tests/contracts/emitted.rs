//! Every event the domain can emit validates against the schema of its current version, as
//! the relay would publish it (envelope and `data`).

use std::collections::BTreeMap;

use apex_domain::upcast;
use apex_projections::envelope::{DomainEvent, StoredEvent};
use chrono::{TimeZone, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::catalog::{self, AGGREGATES};
use crate::generate;

/// The generator's seed: fixed, so every run checks the same events.
const SEED: u64 = 0x00a9_e0c0_7ac7;
/// Random agent + instance histories per run.
const RUNS: usize = 400;

/// The stored row cqrs-es would write for `event` (payload tagged, as `serde_json` writes it).
fn stored<E: cqrs_es::DomainEvent + Serialize>(
    aggregate: &str,
    n: usize,
    event: &E,
) -> StoredEvent {
    let id = Uuid::from_u128(n as u128 + 1);
    StoredEvent {
        event_id: id,
        aggregate_type: aggregate.to_owned(),
        aggregate_id: "01936f3e-8a2b-7c4d-9e10-2f3a4b5c6d7e".to_owned(),
        sequence: n as i64 + 1,
        event_type: event.event_type(),
        event_version: event.event_version(),
        payload: serde_json::to_value(event).unwrap(),
        position: n as i64 + 1,
        transaction_id: 1,
        recorded_at: Utc.timestamp_opt(1_795_329_667, 123_456_000).unwrap(),
        correlation_id: id,
        causation_id: id,
        principal: "runner-1".to_owned(),
        principal_role: "runner".to_owned(),
        traceparent: n
            .is_multiple_of(2)
            .then(|| "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned()),
    }
}

fn generated() -> Vec<(StoredEvent, DomainEvent)> {
    let (agent_events, instance_events) = generate::events(SEED, RUNS);
    let agents = agent_events
        .into_iter()
        .map(|e| (stored("agent", 0, &e), DomainEvent::Agent(e)));
    let instances = instance_events
        .into_iter()
        .map(|e| (stored("instance", 0, &e), DomainEvent::Instance(e)));
    agents
        .chain(instances)
        .enumerate()
        .map(|(n, (mut row, event))| {
            row.sequence = n as i64 + 1;
            row.position = n as i64 + 1;
            (row, event)
        })
        .collect()
}

#[test]
fn every_event_the_domain_emits_validates_against_its_schema() {
    let envelope = catalog::validator(&catalog::envelope_schema());
    let validators: BTreeMap<String, jsonschema::Validator> = catalog::schema_files()
        .into_iter()
        .map(|f| (f.dataschema(), catalog::validator(&f.schema)))
        .collect();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    let events = generated();
    for (row, _) in &events {
        let message = serde_json::to_value(row.to_cloud_event().unwrap()).unwrap();
        *seen
            .entry(message["type"].as_str().unwrap().to_owned())
            .or_default() += 1;
        let mut errors = catalog::errors(&envelope, &message);
        match validators.get(message["dataschema"].as_str().unwrap()) {
            Some(data) => errors.extend(catalog::errors(data, &message["data"])),
            None => errors.push(format!("no schema file {}", message["dataschema"])),
        }
        if !errors.is_empty() {
            failures.push(format!(
                "{}\n  {}\n  {message}",
                message["type"],
                errors.join("\n  ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} generated events do not match their schema; first ones:\n{}",
        failures.len(),
        events.len(),
        failures[..failures.len().min(5)].join("\n")
    );
    // The generator must reach every event type, at its current version, many times.
    for (aggregate, types) in AGGREGATES {
        for event_type in types {
            let name = catalog::routing_name(aggregate, event_type).unwrap();
            let version = upcast::current_version(aggregate, event_type).unwrap();
            let kind = format!("apex.{aggregate}.{name}.v{version}");
            let count = seen.get(&kind).copied().unwrap_or(0);
            assert!(
                count >= 20,
                "only {count} generated {kind} events: {seen:?}"
            );
        }
    }
}

#[test]
fn every_event_the_domain_emits_decodes_back_to_itself() {
    // Compared as JSON: `Some(Value::Null)` and `None` both write `null`, by design.
    for (row, _) in generated() {
        let rewritten = match row.decode().unwrap() {
            DomainEvent::Agent(e) => serde_json::to_value(e).unwrap(),
            DomainEvent::Instance(e) => serde_json::to_value(e).unwrap(),
        };
        assert_eq!(rewritten, row.payload);
    }
}

#[test]
fn every_event_type_has_a_schema_for_every_version_up_to_the_current_one() {
    let files = catalog::schema_files();
    let mut expected = Vec::new();
    for (aggregate, types) in AGGREGATES {
        for event_type in types {
            let name = catalog::routing_name(aggregate, event_type)
                .unwrap_or_else(|| panic!("{event_type} has no routing name"));
            let current = upcast::current_version(aggregate, event_type).unwrap();
            expected.extend((1..=current).map(|v| format!("{aggregate}/{name}.v{v}.json")));
        }
    }
    expected.sort();
    let found: Vec<String> = files.iter().map(|f| f.path.clone()).collect();
    assert_eq!(
        found, expected,
        "event_schemas/ must hold exactly one schema per event type and version (1..=current)"
    );
    for file in &files {
        assert_eq!(
            file.schema["$id"],
            Value::from(file.dataschema()),
            "{}",
            file.path
        );
        catalog::validator(&file.schema);
    }
    catalog::validator(&catalog::envelope_schema());
}
