//! Errors of the write side, kept apart: a broken rule is not a store failure.

use apex_domain::DomainError;

/// Why a command was not applied.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// A business rule refused it; nothing was stored.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Concurrent commands kept winning the race for this aggregate; retry later.
    #[error("the aggregate kept changing concurrently; gave up after {attempts} attempts")]
    Conflict {
        /// Attempts made.
        attempts: u32,
    },
    /// The idempotency key was already used for a different request.
    #[error("the Idempotency-Key was already used for a different request")]
    IdempotencyKeyReused,
    /// The database could not be reached.
    #[error("the event store is unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Anything else (a bug or corrupt data); logged with its cause chain at the edge.
    #[error("the event store failed")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl CommandError {
    pub(crate) fn from_sqlx(err: sqlx::Error) -> Self {
        if is_unavailable(&err) {
            Self::Unavailable(Box::new(err))
        } else if is_unstorable_text(&err) {
            // A NUL character reached the append: the transaction failed, nothing is stored,
            // and it is the request's fault, not the store's.
            tracing::info!(error = %err, "the store refused text with a NUL character");
            Self::Domain(DomainError::FieldInvalid {
                field: "text",
                reason: "may not contain the NUL character (U+0000)",
            })
        } else {
            Self::Store(Box::new(err))
        }
    }

    /// Classifies an error a store call returned, looking for a connection failure.
    pub(crate) fn from_store(err: Box<dyn std::error::Error + Send + Sync>) -> Self {
        let err = match err.downcast::<sqlx::Error>() {
            Ok(sqlx) => return Self::from_sqlx(*sqlx),
            Err(other) => other,
        };
        // A group append that failed for every command of its batch at once.
        match err.downcast::<crate::group_commit::SharedError>() {
            Ok(shared) if is_unavailable(&shared.0) => Self::Unavailable(shared),
            Ok(shared) => Self::Store(shared),
            Err(other) => Self::Store(other),
        }
    }

    /// True when `err` means the database is unreachable (or refusing work) rather than a
    /// statement failing: the edge answers `503 service_unavailable` for these, on reads too.
    pub fn is_connection_failure(err: &sqlx::Error) -> bool {
        is_unavailable(err)
    }

    /// True when PostgreSQL refused a value because text cannot hold it: the NUL character
    /// (U+0000) in a text parameter (SQLSTATE 22021) or as `\u0000` in a `jsonb` value
    /// (22P05). It comes from the request, so the edge answers it as a client error.
    pub fn is_unstorable_text(err: &sqlx::Error) -> bool {
        is_unstorable_text(err)
    }
}

fn is_unstorable_text(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().is_some_and(|c| c == "22021" || c == "22P05"))
}

/// True when `err` means the database is unreachable rather than a statement failing:
/// no connection within the acquire timeout (`PoolTimedOut`, which is also what a refused
/// connection becomes), a socket or TLS failure, a closed pool, or a server-side SQLSTATE of
/// class 08 (connection exception), 53 (insufficient resources, e.g. too many connections) or
/// 57P (operator intervention: shutdown, restart, terminated backend).
pub(crate) fn is_unavailable(err: &sqlx::Error) -> bool {
    matches!(
        err,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    ) || matches!(err, sqlx::Error::Database(db) if db.code().is_some_and(|c| {
        c.starts_with("57P") || c.starts_with("08") || c.starts_with("53")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_failures_are_unavailable_and_statement_failures_are_not() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(is_unavailable(&sqlx::Error::Io(refused)));
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(is_unavailable(&sqlx::Error::PoolClosed));
        assert!(matches!(
            CommandError::from_sqlx(sqlx::Error::PoolTimedOut),
            CommandError::Unavailable(_)
        ));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
        assert!(matches!(
            CommandError::from_sqlx(sqlx::Error::RowNotFound),
            CommandError::Store(_)
        ));
    }

    #[test]
    fn a_pool_timeout_inside_a_store_error_is_found() {
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(sqlx::Error::PoolTimedOut);
        assert!(matches!(
            CommandError::from_store(boxed),
            CommandError::Unavailable(_)
        ));
    }
}
