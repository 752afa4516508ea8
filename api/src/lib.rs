//! Apex HTTP edge: axum routes, bearer-token auth, the error format and the OpenAPI document.
//!
//! Handlers are thin: authenticate, parse, call the command service, map the answer.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod auth;
pub mod console;
pub mod error;
pub mod extract;
pub mod metrics;
pub mod openapi;
pub mod rate_limit;
pub mod routes;
pub mod state;
pub mod ws;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

pub use state::AppState;

/// The OpenAPI document of every route.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_parts().1
}

/// The API routes and their document, completed with what layers add to every route.
fn api_parts() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (routes, mut doc) = api_router().split_for_parts();
    rate_limit::document(&mut doc);
    (routes, doc)
}

fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(routes::instances::router())
        .merge(routes::runner::router())
        .merge(routes::agents::router())
        .merge(routes::queries::router())
        .merge(routes::admin::router())
        .merge(routes::projections::router())
        .merge(routes::audit::router())
        .merge(routes::health::router())
        .merge(ws::router())
        .merge(metrics::router())
}

/// The whole application: API routes, `/openapi.json` and Swagger UI at `/docs`.
pub fn router(state: AppState) -> Router {
    let body_limit = state.body_limit;
    let (routes, doc) = api_parts();
    // Shared, not owned: every route's handler is cloned per request (and the whole route table
    // per connection by some ways of serving), and the document is megabytes of maps.
    let doc_json = Arc::new(doc.clone());
    routes
        // Only the API routes (a matched route): per-principal limits on commands.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            rate_limit::enforce,
        ))
        .route(
            "/openapi.json",
            get(move || async move { Json(doc_json.as_ref()).into_response() }),
        )
        .merge(console::router())
        .merge(SwaggerUi::new("/docs").url("/docs/openapi.json", doc))
        .fallback(|| async { error::ApiError::RouteNotFound })
        .layer(axum::middleware::from_fn(error::envelope_guard))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(metrics::track_http))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &axum::http::Request<_>| {
                let span = tracing::info_span!(
                    "http",
                    otel.kind = "server",
                    method = %request.method(),
                    path = %request.uri().path(),
                    trace_id = tracing::field::Empty,
                );
                // An invalid header is refused (400) by the command extractor; here it is
                // only not followed.
                let traceparent = request
                    .headers()
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .filter(|t| extract::valid_traceparent(t));
                apex_projections::trace::follow(&span, traceparent);
                span
            }),
        )
        .with_state(state)
}
