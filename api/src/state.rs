//! Shared application state: one `Clone` value of `Arc`s.

use std::sync::Arc;

use apex_commands::CommandService;
use sqlx::PgPool;

use crate::auth::Authenticator;

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    /// The write side.
    pub commands: Arc<CommandService>,
    /// The database (read models, readiness).
    pub pool: PgPool,
    /// Token verification.
    pub auth: Arc<Authenticator>,
    /// Maximum request body size in bytes.
    pub body_limit: usize,
    /// Live chat updates for the WebSocket connections of this replica.
    pub hub: Arc<crate::ws::hub::Hub>,
    /// Renders the Prometheus metrics.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Per-principal command rate limits of this replica.
    pub rate_limiter: Arc<crate::rate_limit::RateLimiter>,
}
