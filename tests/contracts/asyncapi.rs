//! `docs/asyncapi.json` describes exactly the schemas in `event_schemas/`: one message per
//! schema file referencing it, one channel per routing key, nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

use crate::catalog::{self, AGGREGATES};

fn asyncapi() -> Value {
    catalog::read_json(&Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/asyncapi.json"))
}

/// Follows a local `$ref` (`#/...`) in `doc`.
fn deref<'a>(doc: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(r) => doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling $ref {r}")),
        None => node,
    }
}

/// `../event_schemas/<path>` → `<path>`.
fn schema_ref(node: &Value) -> Option<&str> {
    node.get("$ref")?
        .as_str()?
        .strip_prefix("../event_schemas/")
}

#[test]
fn the_asyncapi_document_describes_every_schema_and_nothing_else() {
    let doc = asyncapi();
    assert_eq!(doc["asyncapi"], "3.0.0");
    let files = catalog::schema_files();
    let messages = doc["components"]["messages"]
        .as_object()
        .expect("components.messages");

    // Message ↔ schema file, both ways.
    let mut described = BTreeMap::new();
    for (id, message) in messages {
        let parts = message["payload"]["schema"]["allOf"]
            .as_array()
            .unwrap_or_else(|| panic!("message {id}: payload.schema.allOf missing"));
        assert_eq!(
            schema_ref(&parts[0]),
            Some("cloudevent.json"),
            "message {id}: envelope"
        );
        let data = schema_ref(&parts[1]["properties"]["data"])
            .unwrap_or_else(|| panic!("message {id}: data does not reference event_schemas/"));
        described.insert(data.to_owned(), (id.clone(), message));
    }
    let paths: BTreeSet<String> = files.iter().map(|f| f.path.clone()).collect();
    let described_paths: BTreeSet<String> = described.keys().cloned().collect();
    assert_eq!(
        described_paths, paths,
        "docs/asyncapi.json messages and event_schemas/ files differ: add (or remove) the message"
    );
    for file in &files {
        let (id, message) = &described[&file.path];
        let kind = format!("apex.{}.{}.v{}", file.aggregate, file.name, file.version);
        assert_eq!(
            id,
            &format!("{}.{}.v{}", file.aggregate, file.name, file.version)
        );
        let props = &message["payload"]["schema"]["allOf"][1]["properties"];
        assert_eq!(props["type"]["const"], kind.as_str(), "{id}");
        assert_eq!(
            props["dataschema"]["const"],
            file.dataschema().as_str(),
            "{id}"
        );
        assert_eq!(
            message["bindings"]["amqp"]["messageType"],
            kind.as_str(),
            "{id}"
        );
        assert_eq!(
            message["contentType"], "application/cloudevents+json",
            "{id}"
        );
    }

    // Channel addresses are exactly the routing keys; each lists every version's message.
    let routing_keys: BTreeSet<String> = AGGREGATES
        .iter()
        .flat_map(|(aggregate, types)| {
            types.iter().map(move |t| {
                format!(
                    "{aggregate}.{}",
                    catalog::routing_name(aggregate, t).unwrap()
                )
            })
        })
        .collect();
    let channels = doc["channels"].as_object().expect("channels");
    let addresses: BTreeSet<String> = channels
        .values()
        .map(|c| c["address"].as_str().expect("channel address").to_owned())
        .collect();
    assert_eq!(
        addresses, routing_keys,
        "channel addresses must equal the routing keys"
    );
    assert_eq!(
        addresses.len(),
        channels.len(),
        "one channel per routing key"
    );
    for (channel_id, channel) in channels {
        let address = channel["address"].as_str().unwrap_or_default();
        let listed: BTreeSet<String> = channel["messages"]
            .as_object()
            .expect("channel messages")
            .values()
            .map(|m| {
                deref(&doc, m)["name"]
                    .as_str()
                    .expect("message name")
                    .to_owned()
            })
            .collect();
        let expected: BTreeSet<String> = files
            .iter()
            .filter(|f| f.routing_key() == address)
            .map(|f| format!("{address}.v{}", f.version))
            .collect();
        assert_eq!(listed, expected, "channel {channel_id} ({address})");
        assert_eq!(
            channel["bindings"]["amqp"]["is"], "routingKey",
            "{channel_id}"
        );
        assert_eq!(
            channel["bindings"]["amqp"]["exchange"]["type"], "topic",
            "{channel_id}"
        );
    }

    // The relay sends on every channel.
    let operations = doc["operations"].as_object().expect("operations");
    let sent: BTreeSet<String> = operations
        .values()
        .filter(|op| op["action"] == "send")
        .map(|op| {
            deref(&doc, &op["channel"])["address"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(sent, routing_keys, "one send operation per channel");
}

#[test]
fn every_file_the_asyncapi_document_references_exists() {
    fn walk(node: &Value, out: &mut Vec<String>) {
        match node {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref")
                    && !r.starts_with('#')
                {
                    out.push(r.clone());
                }
                map.values().for_each(|v| walk(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut refs = Vec::new();
    walk(&asyncapi(), &mut refs);
    assert!(!refs.is_empty());
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    for r in refs {
        assert!(
            docs.join(&r).is_file(),
            "docs/asyncapi.json references missing {r}"
        );
    }
}
