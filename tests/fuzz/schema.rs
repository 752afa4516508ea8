//! Reads the operations out of the served OpenAPI document and generates JSON values from
//! their schemas: valid ones (often reusing known ids, so requests reach the business rules)
//! and hostile ones (wrong types, missing and unknown fields, huge strings, deep nesting).

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::rng::Rng;

const METHODS: [&str; 5] = ["get", "post", "patch", "put", "delete"];

/// One parameter of an operation.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub schema: Value,
}

/// One operation of the document.
#[derive(Debug, Clone)]
pub struct Operation {
    pub method: String,
    /// The path template, e.g. `/v1/instances/{id}/cancel`.
    pub path: String,
    pub path_params: Vec<Param>,
    pub query: Vec<Param>,
    /// The JSON schema of the request body, if it has one.
    pub body: Option<Value>,
    /// Needs a bearer token.
    pub secured: bool,
}

impl Operation {
    pub fn name(&self) -> String {
        format!("{} {}", self.method.to_uppercase(), self.path)
    }
}

/// Every operation of `doc`. A parameter documented `in: path` whose name is not in the
/// template is sent as a query parameter (that is where the server reads it).
pub fn operations(doc: &Value) -> Vec<Operation> {
    let mut out = vec![];
    for (path, item) in doc["paths"].as_object().expect("the document has paths") {
        for method in METHODS {
            let Some(op) = item.get(method) else { continue };
            let mut operation = Operation {
                method: method.to_owned(),
                path: path.clone(),
                path_params: vec![],
                query: vec![],
                body: op
                    .pointer("/requestBody/content/application~1json/schema")
                    .cloned(),
                secured: op["security"].as_array().is_some_and(|s| !s.is_empty()),
            };
            for p in op["parameters"].as_array().into_iter().flatten() {
                let param = Param {
                    name: p["name"].as_str().unwrap_or_default().to_owned(),
                    schema: p["schema"].clone(),
                };
                let in_template = path.contains(&format!("{{{}}}", param.name));
                match p["in"].as_str() {
                    Some("path") if in_template => operation.path_params.push(param),
                    Some("path" | "query") => operation.query.push(param),
                    _ => {}
                }
            }
            out.push(operation);
        }
    }
    out
}

/// Values the application knows, so generated requests hit real aggregates sometimes.
#[derive(Debug, Default)]
pub struct Known {
    pub agents: BTreeSet<String>,
    pub instances: BTreeSet<String>,
    pub call_ids: BTreeSet<String>,
    pub tools: BTreeSet<String>,
    pub users: BTreeSet<String>,
    pub cursors: BTreeSet<String>,
    pub projections: BTreeSet<String>,
}

impl Known {
    fn from(&self, rng: &mut Rng, set: &BTreeSet<String>) -> Option<String> {
        if set.is_empty() {
            return None;
        }
        set.iter().nth(rng.below(set.len())).cloned()
    }

    /// A known value fitting a field called `name`, if any.
    pub fn for_name(&self, rng: &mut Rng, name: &str) -> Option<String> {
        let set = match name {
            "agent_id" => &self.agents,
            "id" => {
                if rng.chance(50) {
                    &self.agents
                } else {
                    &self.instances
                }
            }
            "instance_id" => &self.instances,
            "call_id" => &self.call_ids,
            "tool" => &self.tools,
            "user_id" => &self.users,
            "cursor" | "after" => &self.cursors,
            "name" => &self.projections,
            _ => return None,
        };
        self.from(rng, set)
    }

    /// Remembers ids and cursors from a successful answer.
    pub fn harvest(&mut self, value: &Value) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    if let Some(s) = v.as_str() {
                        match key.as_str() {
                            "instance_id" => {
                                self.instances.insert(s.to_owned());
                            }
                            "agent_id" => {
                                self.agents.insert(s.to_owned());
                            }
                            "next_cursor" | "cursor" => {
                                self.cursors.insert(s.to_owned());
                            }
                            "owner_id" | "user_id" => {
                                self.users.insert(s.to_owned());
                            }
                            _ => {}
                        }
                    }
                    self.harvest(v);
                }
            }
            Value::Array(items) => items.iter().take(20).for_each(|v| self.harvest(v)),
            _ => {}
        }
    }
}

/// Schema lookups in one document.
pub struct Schemas<'a> {
    pub doc: &'a Value,
}

impl Schemas<'_> {
    /// Follows `$ref`s.
    pub fn resolve<'s>(&'s self, schema: &'s Value) -> &'s Value {
        let mut schema = schema;
        for _ in 0..16 {
            let Some(reference) = schema.get("$ref").and_then(Value::as_str) else {
                break;
            };
            let pointer = reference.trim_start_matches('#');
            match self.doc.pointer(pointer) {
                Some(target) => schema = target,
                None => break,
            }
        }
        schema
    }

    /// A value that matches `schema`; `name` is the field or parameter it is for.
    pub fn valid(&self, schema: &Value, name: &str, rng: &mut Rng, known: &Known) -> Value {
        self.valid_at(schema, name, rng, known, 0)
    }

    fn valid_at(
        &self,
        schema: &Value,
        name: &str,
        rng: &mut Rng,
        known: &Known,
        depth: usize,
    ) -> Value {
        let schema = self.resolve(schema);
        for key in ["oneOf", "anyOf"] {
            if let Some(options) = schema.get(key).and_then(Value::as_array)
                && !options.is_empty()
            {
                let choice = rng.pick(options);
                return self.valid_at(choice, name, rng, known, depth);
            }
        }
        if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
            let mut merged = Map::new();
            for part in all {
                if let Value::Object(m) = self.valid_at(part, name, rng, known, depth) {
                    merged.extend(m);
                }
            }
            return Value::Object(merged);
        }
        if let Some(values) = schema.get("enum").and_then(Value::as_array)
            && !values.is_empty()
        {
            return rng.pick(values).clone();
        }
        let kind = match &schema["type"] {
            Value::String(t) => t.clone(),
            Value::Array(types) => {
                let non_null: Vec<&str> = types
                    .iter()
                    .filter_map(Value::as_str)
                    .filter(|t| *t != "null")
                    .collect();
                if non_null.is_empty() || rng.chance(15) {
                    "null".to_owned()
                } else {
                    (*rng.pick(&non_null)).to_owned()
                }
            }
            _ if schema.get("properties").is_some() => "object".to_owned(),
            _ => "any".to_owned(),
        };
        match kind.as_str() {
            "null" => Value::Null,
            "boolean" => Value::Bool(rng.chance(50)),
            "integer" => {
                let low = schema["minimum"].as_i64().unwrap_or(0);
                let high = schema["maximum"].as_i64().unwrap_or(low + 50);
                json!(rng.between(low, high))
            }
            "number" => json!(rng.between(-1000, 1000) as f64 / 7.0),
            "string" => Value::String(self.string(schema, name, rng, known)),
            "array" => {
                let items = &schema["items"];
                let n = rng.below(4);
                Value::Array(
                    (0..n)
                        .map(|_| self.valid_at(items, name, rng, known, depth + 1))
                        .collect(),
                )
            }
            "object" => {
                let required: BTreeSet<&str> = schema["required"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let mut out = Map::new();
                for (field, field_schema) in schema["properties"].as_object().into_iter().flatten()
                {
                    if required.contains(field.as_str()) || rng.chance(60) {
                        let v = self.valid_at(field_schema, field, rng, known, depth + 1);
                        out.insert(field.clone(), v);
                    }
                }
                Value::Object(out)
            }
            _ => any_value(rng, depth),
        }
    }

    fn string(&self, schema: &Value, name: &str, rng: &mut Rng, known: &Known) -> String {
        if rng.chance(70)
            && let Some(v) = known.for_name(rng, name)
        {
            return v;
        }
        match schema["format"].as_str() {
            Some("uuid") => uuid::Uuid::new_v4().to_string(),
            Some("date-time") => {
                let at = chrono::Utc::now() + chrono::Duration::seconds(rng.between(-86400, 86400));
                at.to_rfc3339()
            }
            // Plain text: hostile text is the body mutators' job.
            _ => format!("fuzz-{}", rng.below(1000)),
        }
    }

    /// The names of the fields an object schema declares, and which are required.
    pub fn fields(&self, schema: &Value) -> (Vec<String>, Vec<String>) {
        let schema = self.resolve(schema);
        let schema = schema
            .get("oneOf")
            .and_then(Value::as_array)
            .and_then(|o| o.iter().find(|s| s.get("$ref").is_some()))
            .map_or(schema, |s| self.resolve(s));
        let fields = schema["properties"]
            .as_object()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        let required = schema["required"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        (fields, required)
    }
}

/// Any small JSON value.
pub fn any_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 3 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.chance(50)),
        2 => json!(rng.between(-1_000_000, 1_000_000)),
        3 => json!(rng.between(-1000, 1000) as f64 / 3.0),
        4 => Value::String(rng.text(20)),
        5 => Value::Array(
            (0..rng.below(4))
                .map(|_| any_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.below(4) {
                m.insert(rng.text(8), any_value(rng, depth + 1));
            }
            Value::Object(m)
        }
    }
}

/// A value of another JSON type than `value`.
pub fn wrong_type(rng: &mut Rng, value: &Value) -> Value {
    loop {
        let candidate = any_value(rng, 0);
        let same = std::mem::discriminant(&candidate) == std::mem::discriminant(value);
        if !same {
            return candidate;
        }
    }
}
