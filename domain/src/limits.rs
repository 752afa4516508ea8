//! Size limits on every text and JSON field the domain accepts.
//!
//! Limits are in Unicode scalar values (`char`s) for text and in serialized bytes for JSON, so
//! a client can check them before sending. They are part of the published contract
//! (`docs/architecture/agents.md`).

use serde_json::Value;

use crate::error::DomainError;

/// Longest agent id (a slug).
pub const AGENT_ID_MAX: usize = 64;
/// Longest agent display name.
pub const DISPLAY_NAME_MAX: usize = 120;
/// Longest agent description.
pub const DESCRIPTION_MAX: usize = 4_000;
/// Most tools an agent may list.
pub const TOOLS_MAX: usize = 64;
/// Longest tool name.
pub const TOOL_NAME_MAX: usize = 64;
/// Longest chat thread id.
pub const THREAD_ID_MAX: usize = 128;
/// Longest user input that starts a run.
pub const INPUT_MAX: usize = 32_000;
/// Longest chat-visible text of one step (a thought, a summary, an output, an error).
pub const DISPLAY_TEXT_MAX: usize = 16_000;
/// Longest tool call id.
pub const CALL_ID_MAX: usize = 128;
/// Largest internal-detail JSON document of one step, serialized.
pub const INTERNAL_JSON_MAX_BYTES: usize = 256 * 1024;
/// Deepest nesting of an internal-detail JSON document.
pub const INTERNAL_JSON_MAX_DEPTH: usize = 32;
/// Longest prompt recorded as internal detail.
pub const PROMPT_MAX: usize = 64_000;
/// Longest principal id (`sub` claim).
pub const PRINCIPAL_MAX: usize = 128;
/// Largest duration in milliseconds: 2^53 - 1, the largest integer every JSON reader (a
/// JavaScript one included) holds exactly.
pub const DURATION_MS_MAX: u64 = (1 << 53) - 1;

/// Checks that `value` has between `min` and `max` characters.
pub fn text(field: &'static str, value: &str, min: usize, max: usize) -> Result<(), DomainError> {
    let len = value.chars().count();
    if len < min {
        return Err(DomainError::FieldRequired { field });
    }
    if len > max {
        return Err(DomainError::FieldTooLong { field, max });
    }
    Ok(())
}

/// Checks that an optional text fits `max` characters.
pub fn optional_text(
    field: &'static str,
    value: Option<&str>,
    max: usize,
) -> Result<(), DomainError> {
    value.map_or(Ok(()), |v| text(field, v, 0, max))
}

/// Checks an identifier-like token: 1..=max chars of `[A-Za-z0-9_.:-]`.
pub fn token(field: &'static str, value: &str, max: usize) -> Result<(), DomainError> {
    text(field, value, 1, max)?;
    if value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))
    {
        Ok(())
    } else {
        Err(DomainError::FieldInvalid {
            field,
            reason: "may only contain letters, digits and _ . : -",
        })
    }
}

/// Checks that an optional duration in milliseconds is at most [`DURATION_MS_MAX`].
pub fn optional_duration_ms(field: &'static str, value: Option<u64>) -> Result<(), DomainError> {
    match value {
        Some(ms) if ms > DURATION_MS_MAX => Err(DomainError::FieldInvalid {
            field,
            reason: "must be at most 9007199254740991 (2^53 - 1) milliseconds",
        }),
        _ => Ok(()),
    }
}

/// Checks the size and nesting depth of an internal-detail JSON document.
pub fn internal_json(field: &'static str, value: &Value) -> Result<(), DomainError> {
    if depth(value) > INTERNAL_JSON_MAX_DEPTH {
        return Err(DomainError::FieldInvalid {
            field,
            reason: "nested too deeply",
        });
    }
    let bytes = serde_json::to_vec(value)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if bytes > INTERNAL_JSON_MAX_BYTES {
        return Err(DomainError::FieldTooLong {
            field,
            max: INTERNAL_JSON_MAX_BYTES,
        });
    }
    Ok(())
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_counts_characters_not_bytes() {
        assert!(text("f", &"é".repeat(10), 1, 10).is_ok());
        assert_eq!(
            text("f", &"é".repeat(11), 1, 10).unwrap_err().code(),
            "field_too_long"
        );
        assert_eq!(text("f", "", 1, 10).unwrap_err().code(), "field_required");
    }

    #[test]
    fn deep_json_is_rejected() {
        let mut v = json!(1);
        for _ in 0..40 {
            v = json!([v]);
        }
        assert_eq!(internal_json("f", &v).unwrap_err().code(), "field_invalid");
        assert!(internal_json("f", &json!({"a": [1, 2, {"b": null}]})).is_ok());
    }

    #[test]
    fn tokens_reject_spaces() {
        assert!(token("call_id", "call-1:a.b_c", 20).is_ok());
        assert!(token("call_id", "call 1", 10).is_err());
    }
}
