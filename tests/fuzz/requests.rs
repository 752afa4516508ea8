//! Builds one generated request for an operation: who sends it (every role, no token, bad
//! tokens), its path and query parameters (valid, unknown, malformed), its headers and its body
//! (valid or mutated).

use serde_json::{Map, Value, json};

use crate::rng::Rng;
use crate::schema::{Known, Operation, Schemas, any_value, wrong_type};

/// The bearer tokens a request may carry, by name.
pub struct Tokens {
    pub valid: Vec<(&'static str, String)>,
    pub bad: Vec<(&'static str, Vec<u8>)>,
}

/// A request ready to send, and what kind of request it is (for the summary and for failures).
#[derive(Debug, Clone)]
pub struct FuzzRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Option<Vec<u8>>,
    pub operation: String,
    pub kind: String,
}

impl FuzzRequest {
    /// A one-line description (bodies are shortened).
    pub fn describe(&self) -> String {
        let body = self.body.as_deref().map_or_else(String::new, |b| {
            let text = String::from_utf8_lossy(&b[..b.len().min(160)]).into_owned();
            format!(" body({} bytes)={text:?}", b.len())
        });
        let url: String = self.url.chars().take(200).collect();
        format!(
            "{} {} [{}]{body}",
            self.method.to_uppercase(),
            url,
            self.kind
        )
    }
}

const GARBAGE_SEGMENTS: [&str; 24] = [
    "",
    " ",
    ".",
    "..",
    "%2e%2e",
    "%00",
    "%FF",
    "%C3%28",
    "%ZZ",
    "%",
    "a/b",
    "%2F",
    "x?y=1",
    "#frag",
    "-1",
    "0",
    "9223372036854775808",
    "null",
    "<script>",
    "'%20OR%201=1--",
    "日本語",
    "🙂",
    "%F0%9F%99%82",
    "00000000-0000-0000-0000-000000000000",
];

const GARBAGE_VALUES: [&str; 16] = [
    "",
    "abc",
    "-1",
    "0",
    "201",
    "1.5",
    "99999999999999999999",
    "%FF",
    "%ZZ",
    "%00",
    "true",
    "null",
    "2024-13-45T99:99:99Z",
    "not-a-cursor",
    "日本",
    "%E2%80%AE",
];

/// Percent-encodes everything but unreserved characters.
pub fn encode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Which part of a request is hostile; the others are valid, so that each mutation reaches
/// the layer that must refuse it (a bad token alone never gets past authentication).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Focus {
    /// Everything valid (the role may still be the wrong one for the route).
    Clean,
    Auth,
    Path,
    Query,
    Headers,
    Body,
}

impl Focus {
    fn pick(rng: &mut Rng) -> Self {
        match rng.below(100) {
            0..=24 => Focus::Clean,
            25..=39 => Focus::Auth,
            40..=54 => Focus::Path,
            55..=66 => Focus::Query,
            67..=74 => Focus::Headers,
            _ => Focus::Body,
        }
    }
}

/// The role a route is meant for (its token is used most of the time).
fn natural_role(path: &str) -> &'static str {
    if path.starts_with("/v1/runner/") {
        "runner"
    } else if path.starts_with("/v1/admin/") {
        "admin"
    } else if path.starts_with("/v1/audit/") {
        "auditor"
    } else {
        "user-free"
    }
}

/// The name under which known values for a path parameter are found.
fn hint<'a>(path: &str, param: &'a str) -> &'a str {
    if param != "id" {
        param
    } else if path.contains("/agents/{id}") {
        "agent_id"
    } else if path.contains("/instances/{id}") {
        "instance_id"
    } else if path.contains("/users/{id}") {
        "user_id"
    } else {
        param
    }
}

/// Generates requests for one application.
pub struct Generator<'a> {
    pub schemas: Schemas<'a>,
    pub tokens: &'a Tokens,
    pub base: String,
    /// Idempotency keys already used, reused on purpose now and then.
    pub keys: Vec<String>,
}

impl Generator<'_> {
    pub fn request(&mut self, op: &Operation, rng: &mut Rng, known: &Known) -> FuzzRequest {
        let focus = Focus::pick(rng);
        let mut kinds = vec![format!("focus={focus:?}")];
        let mut headers: Vec<(String, Vec<u8>)> = vec![];

        // Who.
        if focus == Focus::Auth {
            let (name, value) = rng.pick(&self.tokens.bad);
            kinds.push(format!("auth={name}"));
            if !value.is_empty() {
                headers.push(("authorization".to_owned(), value.clone()));
            }
        } else {
            let natural = natural_role(&op.path);
            let (name, token) = if rng.chance(70) {
                let found = self.tokens.valid.iter().find(|(n, _)| *n == natural);
                found.unwrap_or_else(|| rng.pick(&self.tokens.valid))
            } else {
                rng.pick(&self.tokens.valid)
            };
            kinds.push(format!("auth={name}"));
            headers.push((
                "authorization".to_owned(),
                format!("Bearer {token}").into_bytes(),
            ));
        }

        // Where.
        let mut path = op.path.clone();
        for param in &op.path_params {
            let name = hint(&op.path, &param.name);
            let segment = if focus != Focus::Path {
                let v = self.schemas.valid(&param.schema, name, rng, known);
                encode(&scalar(&v))
            } else if rng.chance(25) {
                uuid::Uuid::new_v4().to_string()
            } else if rng.chance(15) {
                "a".repeat(rng.between(300, 9000) as usize)
            } else {
                (*rng.pick(&GARBAGE_SEGMENTS)).to_owned()
            };
            path = path.replace(&format!("{{{}}}", param.name), &segment);
        }

        let (query, query_kind) = self.query(op, rng, known, focus == Focus::Query);
        kinds.push(query_kind);
        let url = format!("{}{}{}", self.base, path, query);

        // Headers: valid ones sometimes, hostile ones when in focus.
        let hostile = focus == Focus::Headers;
        if rng.chance(35) || hostile {
            let key = if !self.keys.is_empty() && (hostile || rng.chance(10)) && rng.chance(50) {
                rng.pick(&self.keys).clone().into_bytes()
            } else if hostile && rng.chance(50) {
                match rng.below(4) {
                    0 => vec![],
                    1 => vec![b'k'; 256],
                    2 => vec![0xFF, 0xFE, b'k'],
                    _ => b"  ".to_vec(),
                }
            } else {
                let key = uuid::Uuid::new_v4().to_string();
                self.keys.push(key.clone());
                if self.keys.len() > 50 {
                    self.keys.remove(0);
                }
                key.into_bytes()
            };
            headers.push(("idempotency-key".to_owned(), key));
        }
        if rng.chance(if hostile { 50 } else { 10 }) {
            let v = if hostile {
                rng.text(40)
            } else {
                uuid::Uuid::new_v4().to_string()
            };
            headers.push(("x-correlation-id".to_owned(), v.into_bytes()));
        }
        if rng.chance(if hostile { 50 } else { 10 }) {
            let v = if !hostile {
                format!(
                    "00-{}-{}-01",
                    uuid::Uuid::new_v4().simple(),
                    &uuid::Uuid::new_v4().simple().to_string()[..16]
                )
            } else {
                (*rng.pick(&[
                    "00-00000000000000000000000000000000-0000000000000000-01",
                    "garbage",
                    "00-xyz-abc-01",
                    "",
                ]))
                .to_owned()
            };
            headers.push(("traceparent".to_owned(), v.into_bytes()));
        }

        // What.
        let body = if op.body.is_some() || (focus == Focus::Body && rng.chance(30)) {
            let (body, content_type, kind) = self.body(op, rng, known, focus == Focus::Body);
            kinds.push(format!("body={kind}"));
            if let Some(ct) = content_type {
                headers.push(("content-type".to_owned(), ct.as_bytes().to_vec()));
            }
            Some(body)
        } else {
            None
        };

        FuzzRequest {
            method: op.method.clone(),
            url,
            headers,
            body,
            operation: op.name(),
            kind: kinds.join(" "),
        }
    }

    fn query(
        &self,
        op: &Operation,
        rng: &mut Rng,
        known: &Known,
        hostile: bool,
    ) -> (String, String) {
        let mut pairs: Vec<String> = vec![];
        let mut kind = "query=valid";
        for param in &op.query {
            if rng.chance(45) {
                let v = self.schemas.valid(&param.schema, &param.name, rng, known);
                pairs.push(format!("{}={}", param.name, encode(&scalar(&v))));
            } else if hostile && rng.chance(40) {
                kind = "query=malformed";
                let v = if rng.chance(10) {
                    "x".repeat(rng.between(1000, 20000) as usize)
                } else {
                    (*rng.pick(&GARBAGE_VALUES)).to_owned()
                };
                pairs.push(format!("{}={v}", param.name));
            }
        }
        if hostile && (op.query.is_empty() || rng.chance(25)) {
            kind = "query=unknown";
            pairs.push(format!(
                "{}={}",
                encode(&rng.text(10)),
                encode(&rng.text(10))
            ));
        }
        if hostile && rng.chance(15) && !pairs.is_empty() {
            kind = "query=repeated";
            let again = pairs[rng.below(pairs.len())].clone();
            pairs.push(again);
        }
        if hostile && rng.chance(15) {
            kind = "query=raw-garbage";
            pairs.push((*rng.pick(&["%ZZ", "a=%FF", "&&&=", "=", "a[b]=1", "%00=%00"])).to_owned());
        }
        if pairs.is_empty() {
            (String::new(), "query=none".to_owned())
        } else {
            (format!("?{}", pairs.join("&")), kind.to_owned())
        }
    }

    /// A body, its content type and what kind of body it is.
    fn body(
        &self,
        op: &Operation,
        rng: &mut Rng,
        known: &Known,
        hostile: bool,
    ) -> (Vec<u8>, Option<&'static str>, &'static str) {
        const JSON: Option<&str> = Some("application/json");
        let schema = op.body.clone().unwrap_or(json!({"type": "object"}));
        let valid = self.schemas.valid(&schema, "", rng, known);
        let mut object = match &valid {
            Value::Object(m) => m.clone(),
            _ => Map::new(),
        };
        let (fields, required) = self.schemas.fields(&schema);
        let to_vec = |v: &Value| serde_json::to_vec(v).unwrap_or_default();
        if !hostile {
            return (to_vec(&valid), JSON, "valid");
        }
        match rng.below(20) {
            0..=5 => {
                // Valid in shape, hostile in content: every string field gets awkward text.
                for v in object.values_mut() {
                    if v.is_string() {
                        let len = rng.below(3) * 200 + 5;
                        *v = Value::String(rng.text(len));
                    }
                }
                (to_vec(&Value::Object(object)), JSON, "awkward-strings")
            }
            6 => {
                if let Some(field) = required.get(rng.below(required.len().max(1))) {
                    object.remove(field);
                }
                (to_vec(&Value::Object(object)), JSON, "missing-required")
            }
            7 => {
                object.insert(rng.text(12), any_value(rng, 0));
                (to_vec(&Value::Object(object)), JSON, "unknown-field")
            }
            8 => {
                if let Some(field) = fields.get(rng.below(fields.len().max(1))) {
                    let current = object.get(field).cloned().unwrap_or(Value::Null);
                    object.insert(field.clone(), wrong_type(rng, &current));
                }
                (to_vec(&Value::Object(object)), JSON, "wrong-type")
            }
            9 => {
                let size = if rng.chance(30) {
                    rng.between(1_048_577, 1_300_000)
                } else {
                    rng.between(5_000, 400_000)
                } as usize;
                let field = fields
                    .get(rng.below(fields.len().max(1)))
                    .cloned()
                    .unwrap_or_else(|| "x".to_owned());
                object.insert(field, Value::String("é".repeat(size / 2)));
                (to_vec(&Value::Object(object)), JSON, "huge-string")
            }
            10 => {
                let depth = rng.between(100, 20_000) as usize;
                let (open, close) = if rng.chance(50) {
                    ("[", "]")
                } else {
                    ("{\"a\":", "}")
                };
                let body = format!("{}1{}", open.repeat(depth), close.repeat(depth));
                (body.into_bytes(), JSON, "deep-nesting")
            }
            11 => {
                let n = rng.below(2000);
                (rng.bytes(n), JSON, "random-bytes")
            }
            12 => {
                let mut body = b"{\"".to_vec();
                body.extend(fields.first().map_or("x", String::as_str).as_bytes());
                body.extend(b"\":\"\xff\xfe\xc3\x28\"}");
                (body, JSON, "invalid-utf8")
            }
            13 => (to_vec(&any_value(rng, 0)), JSON, "not-an-object"),
            14 => (vec![], None, "empty"),
            15 => {
                let text = to_vec(&valid);
                let cut = rng.below(text.len().max(1));
                (text[..cut].to_vec(), JSON, "truncated")
            }
            16 => {
                let ct = *rng.pick(&[
                    "text/plain",
                    "application/x-www-form-urlencoded",
                    "multipart/form-data; boundary=x",
                    "application/xml",
                    "application/jsonx",
                    "",
                ]);
                let ct: &'static str = ct;
                (to_vec(&valid), Some(ct), "wrong-content-type")
            }
            17 => {
                let field = fields.first().map_or("x", String::as_str);
                let body = format!(
                    "{{\"{field}\":\"\\ud800\",\"{field}\":1e400,\"n\":-0,\"m\":18446744073709551616}}"
                );
                (body.into_bytes(), JSON, "bad-escapes-and-numbers")
            }
            18 => {
                let field = fields.first().map_or("x", String::as_str);
                let body = format!("{{\"{field}\":\"a\",\"{field}\":\"b\"}}");
                (body.into_bytes(), JSON, "duplicate-keys")
            }
            _ => (b"null".to_vec(), JSON, "json-null"),
        }
    }
}

/// A JSON value as it appears in a URL (strings without quotes).
fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}
