//! `GET /v1/ws`: live chat updates for the authenticated user's runs.

pub mod connection;
pub mod hub;

use std::collections::HashMap;

use apex_domain::ActorRole;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::Response;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::bearer;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// The OpenAPI tag of this route.
pub const TAG: &str = "chat";

/// Largest frame a client may send.
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;
/// Read buffer of one socket; a larger client message is still read whole, in several reads.
const SOCKET_READ_BUFFER: usize = 4 * 1024;

/// The WebSocket route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(chat_socket))
}

/// The subprotocol of the chat socket. A browser, which cannot set the Authorization header on
/// a WebSocket, offers it together with [`BEARER_PROTOCOL`]`<token>`; the server selects it.
pub const CHAT_PROTOCOL: &str = "apex.chat.v1";

/// The prefix of the subprotocol that carries a bearer token (`apex.bearer.<token>`). Unlike a
/// query parameter, a header does not end up in proxies' and load balancers' access logs.
pub const BEARER_PROTOCOL: &str = "apex.bearer.";

/// Query parameters of `GET /v1/ws`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WsQuery {
    /// The bearer token, for clients that can set neither the Authorization header nor the
    /// subprotocols. Discouraged: a URL's query is written to the access logs of proxies and
    /// load balancers on the way. Prefer `Sec-WebSocket-Protocol: apex.chat.v1,
    /// apex.bearer.<token>`.
    pub token: Option<String>,
    /// Resume points: `<instance_id>:<last sequence seen>` pairs, comma separated.
    pub resume: Option<String>,
}

/// Live updates of your runs over WebSocket.
///
/// Authenticate (role user) with, in this order of precedence: the Authorization header; the
/// subprotocols, for browsers: offer `apex.chat.v1` and `apex.bearer.<token>` (in JavaScript,
/// `new WebSocket(url, ["apex.chat.v1", "apex.bearer." + token])`), and the server selects
/// `apex.chat.v1`; or the `token` query parameter (discouraged: proxies log URLs).
/// Server → client: `{"type": "agent_started" | "agent_thinking" | "tool_executing" |
/// "tool_completed" | "agent_completed" | "agent_failed" | "agent_cancelled", "instance_id",
/// "sequence", "at", "data"}` with display data only; `{"type":"error","code","message"}`;
/// `{"type":"resync_required"}` before closing with code 4008 when the client fell behind.
/// Client → server: `{"type":"resume","instances":{"<instance_id>": <last sequence seen>}}`
/// sends what was missed, then live updates, with no gap and no duplicate. On a connection
/// opened without `resume`, live steps of runs with earlier steps are held until the client's
/// first message (or for one second), so a resume sent right after connecting applies first.
#[utoipa::path(get, path = "/v1/ws", tag = TAG,
    params(WsQuery),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket upgrade request, or a malformed `resume` (`invalid_query`); a token offered as a subprotocol without `apex.chat.v1`, or more than one (`invalid_header`)", body = ErrorBody),
        (status = 401, description = "Missing, invalid or expired token (`missing_token`, `invalid_token`, `token_expired`)", body = ErrorBody),
        (status = 403, description = "Only users have a chat (`role_not_allowed`)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn chat_socket(
    State(state): State<AppState>,
    parts: Parts,
) -> Result<Response, ApiError> {
    let query: Query<WsQuery> =
        Query::try_from_uri(&parts.uri).map_err(|e| ApiError::InvalidQuery(e.body_text()))?;
    let token = match (bearer(&parts)?, protocol_token(&parts)?) {
        (Some(token), _) | (None, Some(token)) => token.to_owned(),
        (None, None) => query.token.clone().ok_or(ApiError::MissingToken)?,
    };
    let principal = state.auth.verify(&token)?;
    principal.require(&[ActorRole::User])?;
    let resume = parse_resume(query.resume.as_deref())?;
    let mut parts = parts;
    let upgrade =
        <WebSocketUpgrade as axum::extract::FromRequestParts<AppState>>::from_request_parts(
            &mut parts, &state,
        )
        .await
        .map_err(|e| {
            ApiError::InvalidQuery(format!("not a WebSocket upgrade: {}", e.body_text()))
        })?;
    let hub = state.hub.clone();
    let pool = state.pool.clone();
    let user = principal.actor.id;
    // Frames here are a few hundred bytes: tungstenite's default 128 KiB read and write buffers
    // per connection would cost 10,000 idle sockets over a gigabyte (docs/benchmarks.md).
    Ok(upgrade
        .protocols([CHAT_PROTOCOL])
        .read_buffer_size(SOCKET_READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| connection::serve(socket, hub, pool, user, resume)))
}

/// The token offered as the subprotocol `apex.bearer.<token>`, if any. It must come with
/// [`CHAT_PROTOCOL`]: a browser fails the handshake unless the server selects one of the
/// protocols it offered, and the server never echoes the token back.
fn protocol_token(parts: &Parts) -> Result<Option<&str>, ApiError> {
    let mut offered = Vec::new();
    for value in parts.headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let value = value
            .to_str()
            .map_err(|_| ApiError::InvalidHeader("Sec-WebSocket-Protocol is not ASCII"))?;
        offered.extend(value.split(',').map(str::trim));
    }
    let mut tokens = offered
        .iter()
        .filter_map(|p| p.strip_prefix(BEARER_PROTOCOL));
    let Some(token) = tokens.next() else {
        return Ok(None);
    };
    if tokens.next().is_some() {
        return Err(ApiError::InvalidHeader(
            "Sec-WebSocket-Protocol offers more than one apex.bearer.<token>",
        ));
    }
    if !offered.contains(&CHAT_PROTOCOL) {
        return Err(ApiError::InvalidHeader(
            "Sec-WebSocket-Protocol must offer apex.chat.v1 with apex.bearer.<token>",
        ));
    }
    Ok(Some(token))
}

fn parse_resume(raw: Option<&str>) -> Result<HashMap<Uuid, i64>, ApiError> {
    let mut out = HashMap::new();
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(out);
    };
    for pair in raw.split(',') {
        let parsed = pair
            .split_once(':')
            .and_then(|(id, seq)| Some((Uuid::parse_str(id).ok()?, seq.parse::<i64>().ok()?)));
        let Some((id, seq)) = parsed.filter(|(_, s)| *s >= 0) else {
            return Err(ApiError::InvalidQuery(format!(
                "resume must be <instance_id>:<sequence>[,...]; got `{pair}`"
            )));
        };
        out.insert(id, seq);
    }
    Ok(out)
}
