//! Per-principal rate limits on command routes: one token bucket per `(role, sub)`.
//!
//! Every write request (POST, PATCH, PUT, DELETE) of an authenticated principal takes one token
//! from its bucket; an empty bucket answers `429 rate_limited` with `Retry-After` before the
//! body is read or the store is touched. Runners (the trusted agent runtime) have their own,
//! much higher rate: one runtime token reports the steps of many runs at once, but a runtime
//! stuck in a loop must still not flood the event store.
//!
//! Buckets live in this process: each API replica limits on its own, so a principal spread
//! over `n` replicas by the load balancer may reach up to `n` times the configured rate.
//! Memory stays bounded: a bucket that has refilled completely holds no information (a new
//! bucket starts full), so such buckets are dropped by a periodic sweep. A bucket therefore
//! outlives its principal's last command by at most `burst / rate` seconds.
//!
//! Requests without a valid token pass through untouched; the handler answers them `401`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use apex_domain::{Actor, ActorRole};
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::{Verified, bearer};
use crate::error::ApiError;
use crate::state::AppState;

/// Sweep idle (full) buckets at least this often.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// ... or as soon as the table has grown to twice its size after the last sweep (at least this).
const SWEEP_MIN_LEN: usize = 1024;

/// The configured limits (from the `[rate_limit]` settings).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    /// Sustained commands per second of one user, admin or auditor.
    pub commands_per_second: u32,
    /// Commands one user, admin or auditor may send at once after being idle.
    pub burst: u32,
    /// Sustained commands per second of one runner principal.
    pub runner_commands_per_second: u32,
    /// Commands one runner principal may send at once after being idle.
    pub runner_burst: u32,
}

/// One bucket's refill rate and capacity.
#[derive(Debug, Clone, Copy)]
struct Rate {
    per_second: f64,
    capacity: f64,
}

impl Rate {
    fn new(per_second: u32, burst: u32) -> Self {
        Self {
            per_second: f64::from(per_second.max(1)),
            capacity: f64::from(burst.max(1)),
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
    rate: Rate,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate.per_second).min(self.rate.capacity);
        self.updated = now;
    }

    /// Full again by `now`: indistinguishable from a fresh bucket.
    fn is_idle(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens + elapsed * self.rate.per_second >= self.rate.capacity
    }
}

#[derive(Debug)]
struct Table {
    buckets: HashMap<(ActorRole, String), Bucket>,
    last_sweep: Instant,
    sweep_at_len: usize,
}

/// The buckets of this replica.
#[derive(Debug)]
pub struct RateLimiter {
    user: Rate,
    runner: Rate,
    table: Mutex<Table>,
}

impl RateLimiter {
    /// A limiter with no buckets yet.
    pub fn new(limits: RateLimits) -> Self {
        Self {
            user: Rate::new(limits.commands_per_second, limits.burst),
            runner: Rate::new(limits.runner_commands_per_second, limits.runner_burst),
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                last_sweep: Instant::now(),
                sweep_at_len: SWEEP_MIN_LEN,
            }),
        }
    }

    /// Takes one token from `actor`'s bucket, or says how long until one is available.
    pub fn check(&self, actor: &Actor) -> Result<(), Duration> {
        self.check_at(actor, Instant::now())
    }

    /// Buckets held now (for tests and diagnostics).
    pub fn tracked(&self) -> usize {
        self.lock().buckets.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave a bucket half-updated in a way that
        // matters (worst case one token), so a poisoned lock is used as is.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_at(&self, actor: &Actor, now: Instant) -> Result<(), Duration> {
        let rate = match actor.role {
            ActorRole::Runner => self.runner,
            _ => self.user,
        };
        let mut table = self.lock();
        if table.buckets.len() >= table.sweep_at_len
            || now.saturating_duration_since(table.last_sweep) >= SWEEP_EVERY
        {
            table.buckets.retain(|_, bucket| !bucket.is_idle(now));
            table.last_sweep = now;
            table.sweep_at_len = (table.buckets.len() * 2).max(SWEEP_MIN_LEN);
        }
        let bucket = table
            .buckets
            .entry((actor.role, actor.id.clone()))
            .or_insert(Bucket {
                tokens: rate.capacity,
                updated: now,
                rate,
            });
        bucket.refill(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / bucket.rate.per_second,
            ))
        }
    }
}

/// Methods that run a command.
fn is_write(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PATCH | Method::PUT | Method::DELETE
    )
}

/// Middleware on the API routes: refuses a principal's write beyond its rate.
pub async fn enforce(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !is_write(request.method()) {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let principal = match bearer(&parts) {
        Ok(Some(token)) => state.auth.verify(token).ok(),
        _ => None,
    };
    let Some(principal) = principal else {
        return next.run(Request::from_parts(parts, body)).await;
    };
    // The handler's extractor takes the principal from here instead of verifying the token
    // a second time.
    parts.extensions.insert(Verified(principal.clone()));
    let request = Request::from_parts(parts, body);
    match state.rate_limiter.check(&principal.actor) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            metrics::counter!("apex_rate_limited_total", "role" => principal.actor.role.as_str())
                .increment(1);
            ApiError::RateLimited {
                retry_after_seconds: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            }
            .into_response()
        }
    }
}

/// Documents the limiter on every write operation: the `429` response of
/// [`crate::routes::responses::WriteErrors`] is copied to the write operations that list their
/// own error responses instead (the limiter applies to them all the same).
pub fn document(doc: &mut utoipa::openapi::OpenApi) {
    let template = doc.paths.paths.values().find_map(|item| {
        [&item.post, &item.patch, &item.put, &item.delete]
            .into_iter()
            .flatten()
            .find_map(|op| op.responses.responses.get("429").cloned())
    });
    let Some(template) = template else {
        return;
    };
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.post,
            &mut item.patch,
            &mut item.put,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        {
            op.responses
                .responses
                .entry("429".to_owned())
                .or_insert_with(|| template.clone());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const LIMITS: RateLimits = RateLimits {
        commands_per_second: 2,
        burst: 4,
        runner_commands_per_second: 100,
        runner_burst: 200,
    };

    fn user(id: &str) -> Actor {
        Actor::new(id, ActorRole::User)
    }

    #[test]
    fn a_principal_may_send_its_burst_at_once_then_waits_for_the_refill() {
        let limiter = RateLimiter::new(LIMITS);
        let t0 = Instant::now();
        for _ in 0..4 {
            limiter.check_at(&user("u1"), t0).unwrap();
        }
        let wait = limiter.check_at(&user("u1"), t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Half a second later exactly one more token has arrived.
        let t1 = t0 + Duration::from_millis(500);
        limiter.check_at(&user("u1"), t1).unwrap();
        assert!(limiter.check_at(&user("u1"), t1).is_err());
    }

    #[test]
    fn each_principal_has_its_own_bucket() {
        let limiter = RateLimiter::new(LIMITS);
        let t0 = Instant::now();
        for _ in 0..4 {
            limiter.check_at(&user("u1"), t0).unwrap();
        }
        assert!(limiter.check_at(&user("u1"), t0).is_err());
        limiter.check_at(&user("u2"), t0).unwrap();
        // The same sub with another role is another principal.
        limiter
            .check_at(&Actor::new("u1", ActorRole::Admin), t0)
            .unwrap();
    }

    #[test]
    fn runners_have_their_own_higher_limit() {
        let limiter = RateLimiter::new(LIMITS);
        let t0 = Instant::now();
        let runner = Actor::new("runner-1", ActorRole::Runner);
        for _ in 0..200 {
            limiter.check_at(&runner, t0).unwrap();
        }
        let wait = limiter.check_at(&runner, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(10));
    }

    #[test]
    fn a_long_idle_principal_gets_no_more_than_its_burst() {
        let limiter = RateLimiter::new(LIMITS);
        let t0 = Instant::now();
        limiter.check_at(&user("u1"), t0).unwrap();
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..4 {
            limiter.check_at(&user("u1"), later).unwrap();
        }
        assert!(limiter.check_at(&user("u1"), later).is_err());
    }

    #[test]
    fn refilled_buckets_are_evicted_and_busy_ones_kept() {
        let limiter = RateLimiter::new(LIMITS);
        let t0 = Instant::now();
        for _ in 0..4 {
            limiter.check_at(&user("busy"), t0).unwrap();
        }
        for i in 1..SWEEP_MIN_LEN {
            limiter.check_at(&user(&format!("idle-{i}")), t0).unwrap();
        }
        assert_eq!(limiter.tracked(), SWEEP_MIN_LEN);
        // One second later the idle buckets (one token short) are full again; the busy one
        // (four tokens short, two back) is not.
        let t1 = t0 + Duration::from_secs(1);
        limiter.check_at(&user("newcomer"), t1).unwrap();
        assert_eq!(limiter.tracked(), 2);
        limiter.check_at(&user("busy"), t1).unwrap();
        limiter.check_at(&user("busy"), t1).unwrap();
        assert!(limiter.check_at(&user("busy"), t1).is_err());
    }

    #[test]
    fn every_write_operation_documents_429() {
        let doc = serde_json::to_value(crate::openapi()).unwrap();
        let mut writes = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in ["post", "patch", "put", "delete"] {
                if let Some(op) = item.get(method) {
                    writes += 1;
                    let schema = &op["responses"]["429"]["content"]["application/json"]["schema"];
                    assert_eq!(
                        schema["$ref"], "#/components/schemas/ErrorBody",
                        "{method} {path}"
                    );
                }
            }
        }
        assert!(writes >= 14, "{writes}");
    }

    #[test]
    fn the_table_is_swept_periodically_even_when_small() {
        let limiter = RateLimiter::new(LIMITS);
        let t0 = Instant::now();
        limiter.check_at(&user("u1"), t0).unwrap();
        limiter
            .check_at(&user("u2"), t0 + SWEEP_EVERY + Duration::from_secs(1))
            .unwrap();
        assert_eq!(limiter.tracked(), 1);
    }
}
