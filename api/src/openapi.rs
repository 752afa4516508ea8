//! The OpenAPI document: tags, security scheme, and the routes collected by `utoipa-axum`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// Document metadata; the paths are added by the routers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Apex API",
        description = "Event-sourced backend of AI agent runs: commands, queries and live updates. Every error is `{\"error\":{\"code\",\"message\"}}` with a stable code."
    ),
    modifiers(&BearerAuth),
    components(schemas(crate::error::ErrorBody, crate::error::ErrorDetail)),
    tags(
        (name = "instances", description = "Runs of agents, as their owner sees them"),
        (name = "runner", description = "The agent runtime reports each step of a run (role runner)"),
        (name = "agents", description = "The agents you may run (role user)"),
        (name = "admin-agents", description = "The agent catalogue (role admin)"),
        (name = "admin", description = "Agents with statistics, every run, usage, projection lag and read-model rebuilds (role admin)"),
        (name = "audit", description = "The stored event history itself: the global log in commit order and its NDJSON export, one aggregate's history, its state at a version or time, and tamper verification of its hash chain (role auditor or admin)"),
        (name = "health", description = "Liveness and readiness probes"),
        (name = "chat", description = "Live updates of your runs over WebSocket (role user)"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "JWT with claims sub, role (user|runner|admin|auditor), tier (users), exp, iss, aud",
                    ))
                    .build(),
            ),
        );
    }
}
