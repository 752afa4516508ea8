//! Liveness and readiness probes.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

/// The OpenAPI tag of these routes.
pub const TAG: &str = "health";

/// Health routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(live))
        .routes(routes!(ready))
}

/// Probe answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `unavailable`.
    pub status: &'static str,
    /// Per dependency: `ok` or why not.
    pub checks: Vec<Check>,
}

/// One dependency check.
#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    /// The dependency.
    pub name: &'static str,
    /// `ok` or the failure.
    pub status: String,
}

/// The process is up.
#[utoipa::path(get, path = "/health/live", tag = TAG,
    responses((status = 200, description = "The process is alive", body = Health)))]
pub async fn live() -> Json<Health> {
    Json(Health {
        status: "ok",
        checks: vec![],
    })
}

/// The process can serve: PostgreSQL answers and the replica consumes chat updates from RabbitMQ.
#[utoipa::path(get, path = "/health/ready", tag = TAG,
    responses(
        (status = 200, description = "Every dependency answers", body = Health),
        (status = 503, description = "A dependency does not answer; `checks` says which", body = Health),
    ))]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let postgres = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool),
    )
    .await;
    let postgres = match postgres {
        Ok(Ok(_)) => "ok".to_owned(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: PostgreSQL check failed");
            format!("error: {e}")
        }
        Err(_) => "error: timed out".to_owned(),
    };
    // The replica's own broker session, not a probe connection: what readiness promises is
    // that live updates reach this replica's sockets.
    let rabbitmq = if state.hub.is_consuming() {
        "ok".to_owned()
    } else {
        tracing::warn!("readiness: the chat hub is not consuming from RabbitMQ");
        "error: not consuming chat updates from RabbitMQ (reconnecting)".to_owned()
    };
    let ok = postgres == "ok" && rabbitmq == "ok";
    let health = Health {
        status: if ok { "ok" } else { "unavailable" },
        checks: vec![
            Check {
                name: "postgres",
                status: postgres,
            },
            Check {
                name: "rabbitmq",
                status: rabbitmq,
            },
        ],
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(health))
}
