//! Prometheus metrics: the recorder, HTTP request metrics, and `GET /metrics`.
//!
//! Counters are recorded where things happen (commands, relay, projectors, WebSocket). Lags
//! are read from the database at scrape time, so any API replica reports the whole system's
//! relay and projector lag.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::state::AppState;

/// The OpenAPI tag of this route.
pub const TAG: &str = "health";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The histograms of an event's delay from its recording to a stage of the pipeline (see
/// `apex_projections::delay`).
const PIPELINE_DELAYS: [&str; 3] = [
    "apex_relay_publish_delay_seconds",
    "apex_projector_apply_delay_seconds",
    "apex_chat_receive_delay_seconds",
];

/// Their buckets: fine where a live pipeline is (milliseconds), coarse where a backlog is.
const DELAY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03,
    0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Installs the process-wide recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PIPELINE_DELAYS
                .iter()
                .try_fold(PrometheusBuilder::new(), |builder, name| {
                    // A full name takes precedence over the suffix below.
                    builder.set_buckets_for_metric(Matcher::Full((*name).to_owned()), DELAY_BUCKETS)
                })
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Suffix("_seconds".to_owned()),
                        &[
                            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        ],
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let handle = match builder.install_recorder() {
                Ok(handle) => handle,
                Err(e) => {
                    // Another recorder is installed (a test harness): keep a detached one so
                    // /metrics still answers.
                    tracing::warn!(error = %e, "metrics recorder already installed");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            };
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// How often histogram observations are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds the histograms' raw observations into their buckets every [`UPKEEP_EVERY`]. The
/// recorder keeps every observation until then: with no upkeep, a process nobody scrapes would
/// hold every request's and every event's observation for ever. A thread of its own, so it
/// runs whatever runtime (or none) the process has.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the metrics upkeep thread: histograms grow until scraped");
    }
}

/// Records `apex_http_requests_total` and `apex_http_request_duration_seconds` by route.
pub async fn track_http(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("apex_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("apex_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The metrics route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(scrape))
}

/// Prometheus metrics in the text exposition format.
///
/// HTTP requests by route and status with latency histograms; commands by type and outcome;
/// relay publish rate and lag; per projector checkpoint, lag, processed, retried and
/// dead-lettered; WebSocket connections and messages sent and dropped. See
/// docs/operations/observability.md for every metric.
#[utoipa::path(get, path = "/metrics", tag = TAG,
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain; version=0.0.4", body = String),
        (status = 503, description = "The database is unreachable; lag gauges cannot be read (`service_unavailable`)", body = crate::error::ErrorBody),
    ))]
pub async fn scrape(State(state): State<AppState>) -> Result<Response, ApiError> {
    refresh_lag(&state).await?;
    let hub = &state.hub.stats;
    metrics::gauge!("apex_ws_connections")
        .set(hub.connections.load(std::sync::atomic::Ordering::Relaxed) as f64);
    let body = state.metrics.render();
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}

async fn refresh_lag(state: &AppState) -> Result<(), ApiError> {
    let head_at: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT recorded_at FROM events ORDER BY position DESC LIMIT 1")
            .fetch_optional(&state.pool)
            .await?;
    let relays: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT r.name, r.position, r.published_total,
                (SELECT count(*) FROM events e
                  WHERE (e.transaction_id, e.position) > (r.transaction_id, r.position))
           FROM relay_checkpoints r",
    )
    .fetch_all(&state.pool)
    .await?;
    for (name, position, total, lag) in relays {
        metrics::gauge!("apex_relay_checkpoint_position", "relay" => name.clone())
            .set(position as f64);
        metrics::gauge!("apex_relay_published_events", "relay" => name.clone()).set(total as f64);
        metrics::gauge!("apex_relay_lag_events", "relay" => name).set(lag as f64);
    }
    let projectors: Vec<ProjectorRow> = sqlx::query_as(
            "SELECT s.projector, s.last_position, s.last_recorded_at, s.processed_total,
                    s.skipped_total, s.retried_total,
                    (SELECT count(*) FROM dead_letters d WHERE d.projector = s.projector) AS dead_letters,
                    (SELECT count(*) FROM events e
                      WHERE e.position > s.last_position
                        AND e.aggregate_type = CASE WHEN s.projector = 'agents' THEN 'agent' ELSE 'instance' END) AS lag
               FROM projector_status s",
        )
        .fetch_all(&state.pool)
        .await?;
    for ProjectorRow {
        projector: name,
        last_position: position,
        last_recorded_at: recorded,
        processed_total: processed,
        skipped_total: skipped,
        retried_total: retried,
        dead_letters: dead,
        lag,
    } in projectors
    {
        // Seconds between the newest stored event and the newest one this projector applied:
        // 0 when caught up, however quiet the system is.
        let lag_seconds = match (head_at, recorded) {
            (Some(head), Some(seen)) if lag > 0 => {
                (head - seen).num_milliseconds().max(0) as f64 / 1000.0
            }
            _ => 0.0,
        };
        metrics::gauge!("apex_projector_checkpoint_position", "projector" => name.clone())
            .set(position as f64);
        metrics::gauge!("apex_projector_lag_events", "projector" => name.clone()).set(lag as f64);
        metrics::gauge!("apex_projector_lag_seconds", "projector" => name.clone()).set(lag_seconds);
        metrics::gauge!("apex_projector_processed_events", "projector" => name.clone())
            .set(processed as f64);
        metrics::gauge!("apex_projector_skipped_events", "projector" => name.clone())
            .set(skipped as f64);
        metrics::gauge!("apex_projector_retries", "projector" => name.clone()).set(retried as f64);
        metrics::gauge!("apex_projector_dead_letters", "projector" => name).set(dead as f64);
    }
    Ok(())
}

#[derive(sqlx::FromRow)]
struct ProjectorRow {
    projector: String,
    last_position: i64,
    last_recorded_at: Option<chrono::DateTime<chrono::Utc>>,
    processed_total: i64,
    skipped_total: i64,
    retried_total: i64,
    dead_letters: i64,
    lag: i64,
}
