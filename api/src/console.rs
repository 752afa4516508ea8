//! The operator console at `GET /console`: one static page (HTML, JavaScript, CSS) compiled into
//! the binary, so `apex serve` needs no other files and the browser loads nothing from elsewhere.
//!
//! The page talks to the public API with the token pasted into it: users start runs and watch
//! them over the chat WebSocket; admins see agents, running instances and projector lag. It is
//! not part of the API, so it is not in the OpenAPI document. Every answer carries a strict
//! Content-Security-Policy: scripts, styles and requests from this origin only (plus WebSocket).

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// The page.
const INDEX_HTML: &str = include_str!("../console/index.html");
/// Its script.
const CONSOLE_JS: &str = include_str!("../console/console.js");
/// Its style sheet.
const CONSOLE_CSS: &str = include_str!("../console/console.css");

/// Same origin only; `ws:`/`wss:` for the chat socket (CSP `'self'` did not always cover them).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self' ws: wss:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// `GET /console` (and `/console/`), `/console/console.js`, `/console/console.css`.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/console", get(page))
        .route("/console/", get(page))
        .route("/console/console.js", get(script))
        .route("/console/console.css", get(style))
}

async fn page() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", CONSOLE_JS)
}

async fn style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", CONSOLE_CSS)
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    let headers: [(HeaderName, HeaderValue); 5] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        // The page holds a bearer token: never leak its address, never cache it stale.
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    (headers, body)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use axum::body::{Body, to_bytes};
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;

    async fn get(path: &str) -> (StatusCode, String, String, String) {
        let response = router::<()>()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let header = |name| {
            response
                .headers()
                .get(name)
                .map(|v: &HeaderValue| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        let (content_type, csp) = (
            header(header::CONTENT_TYPE),
            header(header::CONTENT_SECURITY_POLICY),
        );
        let status = response.status();
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (
            status,
            content_type,
            csp,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    #[tokio::test]
    async fn each_asset_is_served_with_its_content_type_and_a_strict_policy() {
        for (path, kind) in [
            ("/console", "text/html"),
            ("/console/", "text/html"),
            ("/console/console.js", "text/javascript"),
            ("/console/console.css", "text/css"),
        ] {
            let (status, content_type, csp, body) = get(path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert!(content_type.starts_with(kind), "{path}: {content_type}");
            assert_eq!(csp, CONTENT_SECURITY_POLICY, "{path}");
            assert!(!body.is_empty(), "{path}");
        }
    }

    #[tokio::test]
    async fn the_page_loads_nothing_from_another_origin() {
        for asset in [INDEX_HTML, CONSOLE_JS, CONSOLE_CSS] {
            for needle in ["http://", "https://", "//cdn", "@import"] {
                assert!(!asset.contains(needle), "an asset mentions {needle}");
            }
        }
        let (_, _, _, html) = get("/console").await;
        assert!(html.contains(r#"src="/console/console.js""#));
        assert!(html.contains(r#"href="/console/console.css""#));
    }
}
