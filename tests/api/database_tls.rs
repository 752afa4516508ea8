//! TLS to PostgreSQL follows `database.ssl_mode`, whatever libpq's environment says: what the
//! server reports about Apex's own connections.

use apex::config::DatabaseSslMode;
use sqlx::{Connection, PgConnection};

use crate::helpers::{server_connection, test_settings};

/// Whether the server sees `conn` as a TLS connection.
async fn encrypted(conn: &mut PgConnection) -> bool {
    sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn connections_use_tls_exactly_as_the_settings_say() {
    let mut settings = test_settings("apex_tls_check");
    settings.database.ssl_mode = DatabaseSslMode::Disable;
    let mut plain = server_connection(&settings).await;
    assert!(!encrypted(&mut plain).await, "disable: still TLS");
    let offered: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&mut plain)
        .await
        .unwrap();
    let offered = offered == "on";

    settings.database.ssl_mode = DatabaseSslMode::Prefer;
    let mut preferred = server_connection(&settings).await;
    assert_eq!(encrypted(&mut preferred).await, offered, "prefer");

    settings.database.ssl_mode = DatabaseSslMode::Require;
    let required = PgConnection::connect_with(&settings.database.server_options()).await;
    if offered {
        assert!(encrypted(&mut required.unwrap()).await, "require: plain");
        // The server's certificate is self-signed: no trusted authority vouches for it.
        settings.database.ssl_mode = DatabaseSslMode::VerifyFull;
        let verified = PgConnection::connect_with(&settings.database.server_options()).await;
        assert!(
            verified.is_err(),
            "verify-full accepted a certificate no trusted authority signed"
        );
    } else {
        assert!(required.is_err(), "require: connected without TLS");
    }
}
