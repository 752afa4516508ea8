//! The schemas are the source of truth, and `event_schemas/schemas.lock.json` records the ones
//! accepted so far. A committed schema may only change in ways every reader of the full
//! history survives; anything else must be a new version with an upcaster.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::catalog;
use crate::compat::breaking_changes;

const LOCK: &str = "schemas.lock.json";
/// Set to `1` to record new or compatibly changed schemas in the lock.
const ACCEPT: &str = "APEX_ACCEPT_SCHEMAS";

const HOW_TO_BUMP: &str = "\
A published schema version is immutable for readers of the stored history. Revert this edit and \
instead add a new version: a new file event_schemas/<aggregate>/<event>.v<N+1>.json with \
examples, the event's current_version bumped to N+1 in the domain, and an upcaster step \
N -> N+1 in domain/src/upcast.rs. See docs/architecture/event_versioning.md.";

fn locked() -> BTreeMap<String, Value> {
    let lock = catalog::read_json(&catalog::root().join(LOCK));
    serde_json::from_value(lock["schemas"].clone()).expect("`schemas` maps paths to schemas")
}

/// Every breaking difference between the lock and the files, as readable lines.
fn breaking_against_lock() -> Vec<String> {
    let current = catalog::all_schemas();
    let mut out = Vec::new();
    for (path, old) in locked() {
        match current.get(&path) {
            None => out.push(format!(
                "event_schemas/{path}: removed; published schema versions must stay"
            )),
            Some(new) => out.extend(
                breaking_changes(&old, new)
                    .into_iter()
                    .map(|b| format!("event_schemas/{path}: {b}")),
            ),
        }
    }
    out
}

#[test]
fn committed_schemas_stay_backward_compatible_with_the_lock() {
    let breaking = breaking_against_lock();
    assert!(
        breaking.is_empty(),
        "\n\nBREAKING CHANGE to a committed event schema:\n  {}\n\n{HOW_TO_BUMP}\n",
        breaking.join("\n  ")
    );
}

#[test]
fn every_schema_is_recorded_in_the_lock() {
    let current = catalog::all_schemas();
    let lock = locked();
    let unrecorded: Vec<&String> = current
        .iter()
        .filter(|(path, schema)| lock.get(*path) != Some(*schema))
        .map(|(path, _)| path)
        .collect();
    if unrecorded.is_empty() {
        return;
    }
    let incompatible: Vec<&String> = unrecorded
        .iter()
        .copied()
        .filter(|path| {
            lock.get(*path)
                .is_some_and(|old| !breaking_changes(old, &current[*path]).is_empty())
        })
        .collect();
    assert!(
        incompatible.is_empty(),
        "\n\nThese schemas changed incompatibly and cannot be recorded in event_schemas/{LOCK}: \
         {incompatible:?}. See the failure of committed_schemas_stay_backward_compatible_with_the_lock.\n"
    );
    if std::env::var(ACCEPT).as_deref() == Ok("1") {
        let breaking = breaking_against_lock();
        assert!(
            breaking.is_empty(),
            "refusing to record breaking changes:\n  {}",
            breaking.join("\n  ")
        );
        let doc = json!({
            "comment": "Accepted event schemas: every committed schema must stay backward compatible with its entry here (tests/contracts/lock.rs). Written by APEX_ACCEPT_SCHEMAS=1; never edit by hand.",
            "schemas": current,
        });
        let text = serde_json::to_string_pretty(&doc).unwrap() + "\n";
        std::fs::write(catalog::root().join(LOCK), text).unwrap();
        return;
    }
    panic!(
        "\n\nThese schemas are new or changed (compatibly) and not yet recorded in \
         event_schemas/{LOCK}:\n  {}\n\nReview them, then record them with:\n  \
         {ACCEPT}=1 cargo nextest run -p apex --test contracts -E 'test(every_schema_is_recorded_in_the_lock)'\n",
        unrecorded
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}
