//! A structural backward-compatibility checker for JSON Schemas.
//!
//! "Compatible" means: every document the old schema accepted (the stored history) is still
//! accepted by the new one, and nothing a reader relied on is gone. Breaking: a removed
//! property, a changed or narrowed type, a newly required property, a removed enum value, a
//! tightened constraint, extra properties no longer allowed. Fine: an added optional property,
//! a widened type, relaxed constraints, changed annotations (`title`, `description`, ...).
//! Keywords the checker does not understand must stay equal: it never guesses.

use serde_json::{Map, Value};

/// One breaking difference, at a JSON pointer into the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaking {
    pub at: String,
    pub what: String,
}

impl std::fmt::Display for Breaking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = if self.at.is_empty() { "/" } else { &self.at };
        write!(f, "{at}: {}", self.what)
    }
}

/// Keywords that only document.
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$defs",
    "$comment",
    "title",
    "description",
    "examples",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
];
/// Keywords compared structurally below.
const HANDLED: &[&str] = &[
    "$ref",
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minimum",
    "exclusiveMinimum",
    "minLength",
    "minItems",
    "minProperties",
    "maximum",
    "exclusiveMaximum",
    "maxLength",
    "maxItems",
    "maxProperties",
    "pattern",
    "format",
    "multipleOf",
    "uniqueItems",
];
const LOWER_BOUNDS: &[&str] = &[
    "minimum",
    "exclusiveMinimum",
    "minLength",
    "minItems",
    "minProperties",
];
const UPPER_BOUNDS: &[&str] = &[
    "maximum",
    "exclusiveMaximum",
    "maxLength",
    "maxItems",
    "maxProperties",
];

/// Every breaking change from `old` to `new` (empty when `new` is compatible).
pub fn breaking_changes(old: &Value, new: &Value) -> Vec<Breaking> {
    let mut checker = Checker {
        old_root: old,
        new_root: new,
        out: Vec::new(),
    };
    checker.compare("", old, new, 0);
    checker.out
}

struct Checker<'a> {
    old_root: &'a Value,
    new_root: &'a Value,
    out: Vec<Breaking>,
}

/// Follows local `$ref`s (`#/...`); a non-local one is left for the caller to compare as text.
fn resolve<'a>(root: &'a Value, mut node: &'a Value) -> &'a Value {
    for _ in 0..32 {
        match node.get("$ref").and_then(Value::as_str) {
            Some(r) if r.starts_with('#') => match root.pointer(&r[1..]) {
                Some(target) => node = target,
                None => return node,
            },
            _ => return node,
        }
    }
    node
}

fn object(schema: &Value) -> Map<String, Value> {
    match schema {
        Value::Object(map) => map.clone(),
        // `true` accepts anything, `false` nothing.
        Value::Bool(false) => Map::from_iter([("not".to_owned(), Value::Object(Map::new()))]),
        _ => Map::new(),
    }
}

fn types(schema: &Map<String, Value>) -> Option<Vec<String>> {
    match schema.get("type")? {
        Value::String(t) => Some(vec![t.clone()]),
        Value::Array(ts) => Some(
            ts.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
        ),
        _ => Some(Vec::new()),
    }
}

fn allowed_values(schema: &Map<String, Value>) -> Option<Vec<Value>> {
    if let Some(c) = schema.get("const") {
        return Some(vec![c.clone()]);
    }
    schema.get("enum").and_then(Value::as_array).cloned()
}

fn strings(schema: &Map<String, Value>, key: &str) -> Vec<String> {
    schema
        .get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

impl Checker<'_> {
    fn breaking(&mut self, at: &str, what: String) {
        self.out.push(Breaking {
            at: at.to_owned(),
            what,
        });
    }

    fn compare(&mut self, at: &str, old: &Value, new: &Value, depth: usize) {
        if depth > 64 {
            return self.breaking(at, "schema nests too deeply to check".to_owned());
        }
        let (old, new) = (
            object(resolve(self.old_root, old)),
            object(resolve(self.new_root, new)),
        );
        self.compare_types(at, &old, &new);
        self.compare_values(at, &old, &new);
        self.compare_properties(at, &old, &new, depth);
        if old.contains_key("items") || new.contains_key("items") {
            let any = Value::Bool(true);
            let (o, n) = (
                old.get("items").unwrap_or(&any),
                new.get("items").unwrap_or(&any),
            );
            self.compare(&format!("{at}/[]"), o, n, depth + 1);
        }
        self.compare_constraints(at, &old, &new);
        let unknown = old
            .keys()
            .chain(new.keys())
            .filter(|k| !ANNOTATIONS.contains(&k.as_str()) && !HANDLED.contains(&k.as_str()))
            .filter(|k| !k.starts_with("x-"));
        let mut reported = Vec::new();
        for key in unknown {
            if old.get(key) != new.get(key) && !reported.contains(key) {
                reported.push(key.clone());
            }
        }
        for key in reported {
            self.breaking(
                at,
                format!("`{key}` changed (the checker cannot prove it compatible)"),
            );
        }
    }

    fn compare_types(&mut self, at: &str, old: &Map<String, Value>, new: &Map<String, Value>) {
        match (types(old), types(new)) {
            (_, None) => {}
            (None, Some(n)) => self.breaking(at, format!("type narrowed from any to {n:?}")),
            (Some(o), Some(n)) => {
                let covered = |t: &String| {
                    n.contains(t) || (t == "integer" && n.iter().any(|x| x == "number"))
                };
                if !o.iter().all(covered) {
                    self.breaking(at, format!("type changed from {o:?} to {n:?}"));
                }
            }
        }
    }

    fn compare_values(&mut self, at: &str, old: &Map<String, Value>, new: &Map<String, Value>) {
        match (allowed_values(old), allowed_values(new)) {
            (_, None) => {}
            (None, Some(n)) => self.breaking(at, format!("restricted to the values {n:?}")),
            (Some(o), Some(n)) => {
                for value in o.iter().filter(|v| !n.contains(v)) {
                    self.breaking(at, format!("value {value} is no longer allowed"));
                }
            }
        }
    }

    fn compare_properties(
        &mut self,
        at: &str,
        old: &Map<String, Value>,
        new: &Map<String, Value>,
        depth: usize,
    ) {
        let empty = Map::new();
        let old_props = old
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let new_props = new
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        for (name, old_schema) in old_props {
            let path = format!("{at}/{name}");
            match new_props.get(name) {
                None => self.breaking(&path, "property removed (or renamed)".to_owned()),
                Some(new_schema) => self.compare(&path, old_schema, new_schema, depth + 1),
            }
        }
        let old_required = strings(old, "required");
        for name in strings(new, "required") {
            if old_required.contains(&name) {
                continue;
            }
            let what = if old_props.contains_key(&name) {
                "optional property became required"
            } else {
                "new property is required (old events do not have it)"
            };
            self.breaking(&format!("{at}/{name}"), what.to_owned());
        }
        let closed =
            |s: &Map<String, Value>| s.get("additionalProperties") == Some(&Value::Bool(false));
        if closed(new) && !closed(old) {
            self.breaking(at, "additional properties are no longer allowed".to_owned());
        }
        if let (Some(o @ Value::Object(_)), Some(n @ Value::Object(_))) = (
            old.get("additionalProperties"),
            new.get("additionalProperties"),
        ) {
            self.compare(&format!("{at}/*"), o, n, depth + 1);
        }
    }

    fn compare_constraints(
        &mut self,
        at: &str,
        old: &Map<String, Value>,
        new: &Map<String, Value>,
    ) {
        let number = |s: &Map<String, Value>, k: &str| s.get(k).and_then(Value::as_f64);
        for key in LOWER_BOUNDS {
            if let Some(n) = number(new, key)
                && number(old, key).is_none_or(|o| n > o)
            {
                self.breaking(at, format!("`{key}` tightened to {n}"));
            }
        }
        for key in UPPER_BOUNDS {
            if let Some(n) = number(new, key)
                && number(old, key).is_none_or(|o| n < o)
            {
                self.breaking(at, format!("`{key}` tightened to {n}"));
            }
        }
        for key in ["pattern", "format", "multipleOf"] {
            if new.contains_key(key) && new.get(key) != old.get(key) {
                self.breaking(at, format!("`{key}` added or changed"));
            }
        }
        let unique = |s: &Map<String, Value>| s.get("uniqueItems") == Some(&Value::Bool(true));
        if unique(new) && !unique(old) {
            self.breaking(at, "items must now be unique".to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::breaking_changes;

    fn base() -> Value {
        json!({
            "$defs": {"tier": {"type": "string", "enum": ["free", "mid"]}},
            "type": "object", "additionalProperties": false,
            "required": ["call_id", "internal"],
            "properties": {
                "call_id": {"type": "string", "description": "The call."},
                "summary": {"type": ["string", "null"]},
                "tier": {"$ref": "#/$defs/tier"},
                "count": {"type": "integer", "minimum": 0},
                "internal": {"type": "object", "properties": {"result": {}}}
            }
        })
    }

    /// The breaking changes as text, sorted (map order depends on serde_json features).
    fn what(old: &Value, new: &Value) -> Vec<String> {
        let mut out: Vec<String> = breaking_changes(old, new)
            .iter()
            .map(ToString::to_string)
            .collect();
        out.sort();
        out
    }

    fn sorted<const N: usize>(expected: [&str; N]) -> Vec<String> {
        let mut out: Vec<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        out.sort();
        out
    }

    #[test]
    fn an_identical_schema_or_a_changed_annotation_is_compatible() {
        let mut new = base();
        new["properties"]["call_id"]["description"] = json!("Reworded.");
        new["title"] = json!("New title");
        assert_eq!(what(&base(), &base()), Vec::<String>::new());
        assert_eq!(what(&base(), &new), Vec::<String>::new());
    }

    #[test]
    fn an_added_optional_property_or_a_widened_type_is_compatible() {
        let mut new = base();
        new["properties"]["duration_ms"] = json!({"type": ["integer", "null"]});
        new["properties"]["count"] = json!({"type": ["number", "null"]});
        new["$defs"]["tier"]["enum"] = json!(["free", "mid", "enterprise"]);
        new["required"] = json!(["internal"]);
        assert_eq!(what(&base(), &new), Vec::<String>::new());
    }

    #[test]
    fn a_removed_or_renamed_property_is_breaking() {
        let mut new = base();
        let props = new["properties"].as_object_mut().unwrap();
        let call_id = props.remove("call_id").unwrap();
        props.insert("id".to_owned(), call_id);
        new["properties"]["internal"]["properties"] = json!({});
        assert_eq!(
            what(&base(), &new),
            sorted([
                "/call_id: property removed (or renamed)",
                "/internal/result: property removed (or renamed)",
            ])
        );
    }

    #[test]
    fn a_changed_type_is_breaking() {
        let mut new = base();
        new["properties"]["summary"] = json!({"type": "string"});
        new["properties"]["count"] = json!({"type": "string"});
        new["properties"]["internal"]["properties"]["result"] = json!({"type": "object"});
        assert_eq!(
            what(&base(), &new),
            sorted([
                "/summary: type changed from [\"string\", \"null\"] to [\"string\"]",
                "/count: type changed from [\"integer\"] to [\"string\"]",
                "/internal/result: type narrowed from any to [\"object\"]",
            ])
        );
    }

    #[test]
    fn a_newly_required_property_is_breaking() {
        let mut new = base();
        new["properties"]["duration_ms"] = json!({"type": "integer"});
        new["required"] = json!(["call_id", "internal", "summary", "duration_ms"]);
        assert_eq!(
            what(&base(), &new),
            sorted([
                "/summary: optional property became required",
                "/duration_ms: new property is required (old events do not have it)",
            ])
        );
    }

    #[test]
    fn narrowed_values_and_tightened_constraints_are_breaking() {
        let mut new = base();
        new["$defs"]["tier"]["enum"] = json!(["free"]);
        new["properties"]["count"]["minimum"] = json!(1);
        new["properties"]["call_id"]["pattern"] = json!("^c");
        new["properties"]["internal"]["additionalProperties"] = json!(false);
        new["properties"]["internal"]["if"] = json!({});
        assert_eq!(
            what(&base(), &new),
            sorted([
                "/tier: value \"mid\" is no longer allowed",
                "/call_id: `pattern` added or changed",
                "/count: `minimum` tightened to 1",
                "/internal: additional properties are no longer allowed",
                "/internal: `if` changed (the checker cannot prove it compatible)",
            ])
        );
    }
}
