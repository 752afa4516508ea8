//! What travels with a command besides its payload: who, why, and the idempotency key.

use std::collections::HashMap;

use apex_domain::Actor;
use uuid::Uuid;

/// An `Idempotency-Key` with the fingerprint of the request it was first used for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// The client's key (unique per principal).
    pub key: String,
    /// SHA-256 of the request (method, path, body); a reuse with another request is refused.
    pub request_hash: String,
}

/// Metadata recorded with every event a command appends.
#[derive(Debug, Clone)]
pub struct CommandContext {
    /// The authenticated principal.
    pub actor: Actor,
    /// Ties together everything done on behalf of one user action.
    pub correlation_id: Uuid,
    /// The direct cause of the events: the command (request) id.
    pub causation_id: Uuid,
    /// Optional idempotency key.
    pub idempotency: Option<IdempotencyKey>,
    /// W3C trace context of the request, carried to the broker by the relay.
    pub traceparent: Option<String>,
}

impl CommandContext {
    /// A context for `actor` with fresh correlation and causation ids.
    pub fn new(actor: Actor) -> Self {
        let id = Uuid::now_v7();
        Self {
            actor,
            correlation_id: id,
            causation_id: id,
            idempotency: None,
            traceparent: None,
        }
    }

    pub(crate) fn metadata(&self) -> HashMap<String, String> {
        let mut metadata = HashMap::from([
            ("correlation_id".to_owned(), self.correlation_id.to_string()),
            ("causation_id".to_owned(), self.causation_id.to_string()),
            ("principal".to_owned(), self.actor.id.clone()),
            (
                "principal_role".to_owned(),
                self.actor.role.as_str().to_owned(),
            ),
        ]);
        if let Some(key) = &self.idempotency {
            metadata.insert("idempotency_key".to_owned(), key.key.clone());
            metadata.insert("request_hash".to_owned(), key.request_hash.clone());
        }
        if let Some(traceparent) = &self.traceparent {
            metadata.insert("traceparent".to_owned(), traceparent.clone());
        }
        metadata
    }
}

/// What a successful command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    /// The aggregate acted on.
    pub aggregate_id: String,
    /// Sequence of the aggregate after the command (its last event).
    pub sequence: u64,
    /// Number of events appended (0 for a no-op or a replayed idempotent request).
    pub appended: usize,
    /// True when the answer was replayed from an earlier request with the same key.
    pub replayed: bool,
}
