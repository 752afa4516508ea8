//! Keyset pagination shared by the query routes: the `limit` rule and the opaque cursors.
//!
//! A cursor names the last item of the previous page, so a page never shifts when rows are
//! inserted concurrently (newer rows sort before it, never into it). Cursors are hex-encoded,
//! versioned and typed: an instance cursor is refused where a user cursor is expected.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::ApiError;

/// Items per page when `limit` is absent.
pub const DEFAULT_LIMIT: i64 = 50;
/// Largest accepted `limit`.
pub const MAX_LIMIT: i64 = 200;

const INSTANCE_PREFIX: &str = "i1";
const KEY_PREFIX: &str = "k1";
const LOG_PREFIX: &str = "l1";

/// The page size: `limit` when in `1..=MAX_LIMIT`, [`DEFAULT_LIMIT`] when absent.
pub fn limit(raw: Option<i64>) -> Result<i64, ApiError> {
    match raw {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::InvalidQuery(format!(
            "limit must be between 1 and {MAX_LIMIT}, not {n}"
        ))),
    }
}

/// Cuts the `limit + 1` rows fetched for a page to `limit`, and returns the cursor of the next
/// page: that of the last kept row, or `None` when no row follows.
pub fn page<T, C>(mut rows: Vec<T>, limit: i64, cursor: impl Fn(&T) -> C) -> (Vec<T>, Option<C>) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if rows.len() <= limit {
        return (rows, None);
    }
    rows.truncate(limit);
    let next = rows.last().map(cursor);
    (rows, next)
}

/// Position in a list of instances ordered by `(created_at, instance_id)` descending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceCursor {
    /// `created_at` of the last item seen.
    pub created_at: DateTime<Utc>,
    /// `instance_id` of the last item seen.
    pub instance_id: Uuid,
}

impl InstanceCursor {
    /// The opaque form.
    pub fn encode(&self) -> String {
        let micros = self.created_at.timestamp_micros();
        hex::encode(format!("{INSTANCE_PREFIX}|{micros}|{}", self.instance_id))
    }

    /// Parses the opaque form; anything else is `invalid_query`.
    pub fn decode(raw: &str) -> Result<Self, ApiError> {
        let text = unwrap_cursor(raw, INSTANCE_PREFIX)?;
        let (micros, id) = text.split_once('|').ok_or_else(bad_cursor)?;
        let created_at = micros
            .parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_micros)
            .ok_or_else(bad_cursor)?;
        let instance_id = Uuid::parse_str(id).map_err(|_| bad_cursor())?;
        Ok(Self {
            created_at,
            instance_id,
        })
    }
}

/// Position in a list ordered by one text key ascending (e.g. `user_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCursor(pub String);

impl KeyCursor {
    /// The opaque form.
    pub fn encode(&self) -> String {
        hex::encode(format!("{KEY_PREFIX}|{}", self.0))
    }

    /// Parses the opaque form; anything else is `invalid_query`.
    pub fn decode(raw: &str) -> Result<Self, ApiError> {
        unwrap_cursor(raw, KEY_PREFIX).map(Self)
    }
}

/// Position in the event log ordered by `(transaction_id, position)` ascending (commit order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogCursor {
    /// `transaction_id` of the last event seen.
    pub transaction_id: i64,
    /// `position` of the last event seen.
    pub position: i64,
}

impl LogCursor {
    /// The opaque form.
    pub fn encode(&self) -> String {
        hex::encode(format!(
            "{LOG_PREFIX}|{}|{}",
            self.transaction_id, self.position
        ))
    }

    /// Parses the opaque form; anything else is `invalid_query`.
    pub fn decode(raw: &str) -> Result<Self, ApiError> {
        let text = unwrap_cursor(raw, LOG_PREFIX)?;
        let (transaction_id, position) = text.split_once('|').ok_or_else(bad_cursor)?;
        let parse = |s: &str| s.parse::<i64>().ok().filter(|n| *n >= 0);
        Ok(Self {
            transaction_id: parse(transaction_id).ok_or_else(bad_cursor)?,
            position: parse(position).ok_or_else(bad_cursor)?,
        })
    }
}

/// Decodes the hex, checks the prefix and returns what follows it.
fn unwrap_cursor(raw: &str, prefix: &str) -> Result<String, ApiError> {
    let bytes = hex::decode(raw).map_err(|_| bad_cursor())?;
    let text = String::from_utf8(bytes).map_err(|_| bad_cursor())?;
    text.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('|'))
        .map(str::to_owned)
        .ok_or_else(bad_cursor)
}

fn bad_cursor() -> ApiError {
    ApiError::InvalidQuery(
        "cursor is not a cursor this list returned; pass next_cursor unchanged".to_owned(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_instance_cursor_round_trips_to_the_microsecond() {
        let cursor = InstanceCursor {
            created_at: DateTime::from_timestamp_micros(1_790_000_000_123_456).unwrap(),
            instance_id: Uuid::now_v7(),
        };
        assert_eq!(InstanceCursor::decode(&cursor.encode()).unwrap(), cursor);
    }

    #[test]
    fn cursors_of_another_list_or_garbage_are_refused() {
        let key = KeyCursor("user-1".to_owned()).encode();
        assert_eq!(KeyCursor::decode(&key).unwrap().0, "user-1");
        for raw in [key.as_str(), "", "zz", "6931", &hex::encode("i1|x|y")] {
            let err = InstanceCursor::decode(raw).unwrap_err();
            assert_eq!(err.code(), "invalid_query", "{raw}");
        }
    }

    #[test]
    fn a_log_cursor_round_trips_and_refuses_other_cursors() {
        let cursor = LogCursor {
            transaction_id: 9_876_543_210,
            position: 42,
        };
        assert_eq!(LogCursor::decode(&cursor.encode()).unwrap(), cursor);
        let key = KeyCursor("user-1".to_owned()).encode();
        for raw in [key.as_str(), &hex::encode("l1|1"), &hex::encode("l1|-1|2")] {
            assert_eq!(LogCursor::decode(raw).unwrap_err().code(), "invalid_query");
        }
    }

    #[test]
    fn limit_defaults_and_bounds() {
        assert_eq!(limit(None).unwrap(), DEFAULT_LIMIT);
        assert_eq!(limit(Some(MAX_LIMIT)).unwrap(), MAX_LIMIT);
        assert!(limit(Some(0)).is_err());
        assert!(limit(Some(MAX_LIMIT + 1)).is_err());
    }

    #[test]
    fn a_page_has_a_next_cursor_only_when_more_rows_follow() {
        let (rows, next) = page(vec![1, 2, 3], 3, |n| n.to_string());
        assert_eq!((rows, next), (vec![1, 2, 3], None));
        let (rows, next) = page(vec![1, 2, 3, 4], 3, |n| n.to_string());
        assert_eq!((rows, next), (vec![1, 2, 3], Some("3".to_owned())));
    }
}
