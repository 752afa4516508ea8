//! Connection pool, migrations and the cqrs-es event stores.
//!
//! Both stores append through [`GroupCommitRepository`] (the appends of concurrent commands
//! share a transaction) and run the domain upcasters ([`crate::upcast::DomainUpcaster`]) when
//! they load events, so an aggregate always applies current-version events.

use std::time::Duration;

use apex_domain::{agent::Agent, instance::Instance};
use cqrs_es::persist::PersistedEventStore;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::group_commit::GroupCommitRepository;
use crate::upcast::DomainUpcaster;

/// An Instance snapshot is written every this many events, so loading a long run reads at most
/// this many events after the snapshot.
pub const INSTANCE_SNAPSHOT_EVERY: usize = 100;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Opens a pool. Connections are established lazily so a process can start (and report
/// unready) while the database is down. Every connection is checked (one round trip) before it
/// is handed out, so a request right after a database blip does not fail on a connection that
/// died while idle: the pool of the API, which answers users. (Appends do not use it: the
/// group commit's writer holds a connection of its own, see [`crate::group_commit`].)
pub fn connect(options: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy_with(options)
}

/// A worker's pooled connection idle for longer than this is checked before it is handed out;
/// one in steady use is not.
pub const CHECK_IDLE_AFTER: Duration = Duration::from_millis(500);

/// [`connect`] for the relay and the projectors, which retry a failed unit of work anyway: a
/// check before every use doubled the round trips of their short units of work, so only a
/// connection idle for [`CHECK_IDLE_AFTER`] is checked (and a dead one dropped and replaced).
/// One that died more recently fails its statement, which the caller retries as any transient
/// failure. Their hottest work does not come back to the pool between units at all: the relay
/// reads on its lock connection, and each read model keeps one connection for its batches.
pub fn connect_workers(options: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= CHECK_IDLE_AFTER {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options)
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// The Agent event store (agents have few events: no snapshots).
pub fn agent_store(pool: PgPool) -> PersistedEventStore<GroupCommitRepository, Agent> {
    PersistedEventStore::new_event_store(GroupCommitRepository::new(pool))
        .with_upcasters(DomainUpcaster::<Agent>::boxed())
}

/// The Instance event store, with snapshots every [`INSTANCE_SNAPSHOT_EVERY`] events.
pub fn instance_store(pool: PgPool) -> PersistedEventStore<GroupCommitRepository, Instance> {
    PersistedEventStore::new_snapshot_store(
        GroupCommitRepository::new(pool),
        INSTANCE_SNAPSHOT_EVERY,
    )
    .with_upcasters(DomainUpcaster::<Instance>::boxed())
}
