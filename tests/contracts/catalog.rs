//! The committed contract files: event schemas, their examples, the envelope schema, the lock.
//!
//! Everything is read from `event_schemas/` at the repository root, or from the folder named by
//! `APEX_EVENT_SCHEMAS_DIR` (used to try a change on a scratch copy).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use apex_domain::agent::AgentEvent;
use apex_domain::instance::InstanceEvent;
use jsonschema::Validator;
use serde_json::Value;

/// The aggregates, with their stored event types.
pub const AGGREGATES: [(&str, &[&str]); 2] = [
    ("agent", &AgentEvent::TYPES),
    ("instance", &InstanceEvent::TYPES),
];

/// The contract folder.
pub fn root() -> PathBuf {
    std::env::var_os("APEX_EVENT_SCHEMAS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("event_schemas"))
}

/// The routing short name of a stored event type.
pub fn routing_name(aggregate: &str, event_type: &str) -> Option<&'static str> {
    match aggregate {
        "agent" => AgentEvent::routing_name(event_type),
        "instance" => InstanceEvent::routing_name(event_type),
        _ => None,
    }
}

/// The stored event type of a routing short name.
pub fn event_type(aggregate: &str, name: &str) -> Option<&'static str> {
    let (_, types) = AGGREGATES.iter().find(|(a, _)| *a == aggregate)?;
    types
        .iter()
        .copied()
        .find(|t| routing_name(aggregate, t) == Some(name))
}

/// One `event_schemas/<aggregate>/<name>.v<N>.json` file.
#[derive(Debug, Clone)]
pub struct SchemaFile {
    pub aggregate: String,
    pub name: String,
    pub version: u32,
    /// The stored event type, e.g. `ToolCallCompleted`.
    pub event_type: &'static str,
    /// Relative to the contract folder, e.g. `instance/tool_completed.v1.json`.
    pub path: String,
    pub schema: Value,
}

impl SchemaFile {
    /// `apex:event_schemas/<path>`, the CloudEvents `dataschema` of this version.
    pub fn dataschema(&self) -> String {
        format!("apex:event_schemas/{}", self.path)
    }

    /// `<aggregate>.<name>`.
    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.aggregate, self.name)
    }
}

/// Splits `name.v3.json` (or `name.v3.label.json`) into (`name`, 3, label).
pub fn parse_file_name(file: &str) -> Option<(String, u32, Option<String>)> {
    let stem = file.strip_suffix(".json")?;
    let (name, rest) = stem.split_once(".v")?;
    let (version, label) = match rest.split_once('.') {
        Some((v, label)) => (v, Some(label.to_owned())),
        None => (rest, None),
    };
    let version = version.parse().ok().filter(|v| *v > 0)?;
    Some((name.to_owned(), version, label))
}

pub fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a readable directory entry").path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Every event schema file, sorted by path. Panics on a file that does not name a known
/// event type and version.
pub fn schema_files() -> Vec<SchemaFile> {
    let mut out = Vec::new();
    for (aggregate, _) in AGGREGATES {
        for path in json_files(&root().join(aggregate)) {
            let file = file_name(&path);
            let Some((name, version, None)) = parse_file_name(&file) else {
                panic!("{aggregate}/{file} is not named <event>.v<N>.json");
            };
            let event_type = event_type(aggregate, &name).unwrap_or_else(|| {
                panic!("{aggregate}/{file}: no {aggregate} event routes as {name}")
            });
            out.push(SchemaFile {
                aggregate: aggregate.to_owned(),
                name,
                version,
                event_type,
                path: format!("{aggregate}/{file}"),
                schema: read_json(&path),
            });
        }
    }
    out
}

/// One `event_schemas/<aggregate>/examples/<name>.v<N>.<label>.json` payload.
#[derive(Debug, Clone)]
pub struct Example {
    pub aggregate: String,
    pub event_type: &'static str,
    pub version: u32,
    /// Relative to the contract folder.
    pub path: String,
    /// The schema this example is written against, relative to the contract folder.
    pub schema_path: String,
    pub data: Value,
}

/// Every example, sorted by path.
pub fn examples() -> Vec<Example> {
    let mut out = Vec::new();
    for (aggregate, _) in AGGREGATES {
        for path in json_files(&root().join(aggregate).join("examples")) {
            let file = file_name(&path);
            let Some((name, version, Some(_))) = parse_file_name(&file) else {
                panic!("{aggregate}/examples/{file} is not named <event>.v<N>.<label>.json");
            };
            let event_type = event_type(aggregate, &name).unwrap_or_else(|| {
                panic!("{aggregate}/examples/{file}: no {aggregate} event routes as {name}")
            });
            out.push(Example {
                aggregate: aggregate.to_owned(),
                event_type,
                version,
                path: format!("{aggregate}/examples/{file}"),
                schema_path: format!("{aggregate}/{name}.v{version}.json"),
                data: read_json(&path),
            });
        }
    }
    out
}

/// The CloudEvents envelope schema.
pub fn envelope_schema() -> Value {
    read_json(&root().join("cloudevent.json"))
}

/// Every schema under contract, by path: the event schemas and the envelope.
pub fn all_schemas() -> BTreeMap<String, Value> {
    let mut out: BTreeMap<String, Value> = schema_files()
        .into_iter()
        .map(|f| (f.path, f.schema))
        .collect();
    out.insert("cloudevent.json".to_owned(), envelope_schema());
    out
}

/// A draft 2020-12 validator that also asserts `format`; no remote references.
pub fn validator(schema: &Value) -> Validator {
    jsonschema::draft202012::meta::validate(schema)
        .unwrap_or_else(|e| panic!("not a draft 2020-12 schema: {e}"));
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(schema)
        .unwrap_or_else(|e| panic!("schema does not compile: {e}"))
}

/// Every validation error, as `<instance path>: <message>`.
pub fn errors(validator: &Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}
