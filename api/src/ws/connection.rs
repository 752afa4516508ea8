//! One chat client's WebSocket: resume, live updates in sequence order, keep-alive.
//!
//! Per run the connection remembers the last sequence it sent. A live update at or below it is
//! a duplicate and dropped; one above it + 1 means updates were missed, and the missing ones
//! are read from the timeline read model first. So the client sees every step once, in order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use apex_projections::chat::ChatUpdate;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use chrono::{DateTime, Utc};
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use tracing::Instrument;
use uuid::Uuid;

use super::hub::{Hub, Signal};
use std::sync::Arc;

/// How often the server pings.
const PING_EVERY: Duration = Duration::from_secs(20);
/// A client silent for this long is considered dead.
const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// A client that does not take a frame within this time is stalled.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Close code: the client fell behind; reconnect and resume.
pub const CLOSE_RESYNC: u16 = 4008;
/// Most entries sent for one catch-up query.
const CATCH_UP_LIMIT: i64 = 10_000;
/// A connection opened without `resume` holds the live updates of runs with earlier steps it
/// has sent nothing of until the client's first message, or for this long. A client that
/// resumes with a message right after connecting would otherwise first be sent, from the
/// timeline, every step of a run that got a live update before its resume arrived: steps it
/// already has, again.
const RESUME_GRACE: Duration = Duration::from_secs(1);
/// Most live updates held during [`RESUME_GRACE`]; beyond, they are delivered at once.
const HELD_LIMIT: usize = 10_000;

/// A message to the client.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Outgoing<'a> {
    /// Control: an error about a client message.
    Error { code: &'a str, message: String },
    /// Control: the client fell behind and is being closed; reconnect with `resume`.
    ResyncRequired,
}

/// A timeline step as sent to the client.
#[derive(Debug, Serialize)]
struct StepMessage<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    instance_id: Uuid,
    sequence: i64,
    at: DateTime<Utc>,
    data: &'a Value,
}

/// A message from the client.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Incoming {
    /// Send what I missed after these sequences, then live updates.
    Resume { instances: HashMap<Uuid, i64> },
}

struct Conn {
    sink: SplitSink<WebSocket, Message>,
    pool: PgPool,
    user: String,
    last: HashMap<Uuid, i64>,
    since: DateTime<Utc>,
}

/// Serves one authenticated user's socket until it closes.
pub async fn serve(
    socket: WebSocket,
    hub: Arc<Hub>,
    pool: PgPool,
    user: String,
    resume: HashMap<Uuid, i64>,
) {
    // Register first: from here on every committed step reaches us live, so the catch-up
    // below plus the live stream leave no gap.
    let mut registration = hub.register(&user);
    let (sink, mut stream) = socket.split();
    let mut conn = Conn {
        sink,
        pool,
        user,
        last: HashMap::new(),
        since: Utc::now(),
    };
    let mut held = resume.is_empty().then(Vec::new);
    // A resync asked for while steps are held waits for the client's first message too: its
    // catch-up would otherwise send the runs the client may be about to resume from their
    // first step.
    let mut resync_held = false;
    if let Err(e) = conn.resume(resume).await {
        tracing::debug!(error = %e, "websocket closed during resume");
        return;
    }
    let grace = tokio::time::sleep(RESUME_GRACE);
    tokio::pin!(grace);
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    let mut last_heard = Instant::now();
    loop {
        let step: Result<bool, Closed> = tokio::select! {
            signal = registration.rx.recv() => match signal {
                Some(Signal::Update(update)) => match held.as_mut() {
                    // Only a run with earlier steps, none of them sent here, is held: a run's
                    // first step (sequence 2) has nothing before it to send twice.
                    Some(held)
                        if held.len() < HELD_LIMIT
                            && update.sequence > 2
                            && !conn.last.contains_key(&update.instance_id) =>
                    {
                        held.push(update);
                        Ok(true)
                    }
                    _ => conn.deliver(&update).await.map(|()| true),
                },
                Some(Signal::Resync) if held.is_some() => {
                    resync_held = true;
                    Ok(true)
                }
                Some(Signal::Resync) => conn.catch_up_all().await.map(|()| true),
                None => Ok(false),
            },
            () = &mut grace, if held.is_some() => {
                conn.release(&mut held, &mut resync_held).await.map(|()| true)
            }
            () = registration.overflow.notified() => {
                tracing::warn!(user = %conn.user, "chat client too slow; asking it to resync");
                let _ = conn.send_json(&Outgoing::ResyncRequired).await;
                let _ = conn.close(CLOSE_RESYNC, "too slow: reconnect and resume").await;
                Ok(false)
            },
            incoming = stream.next() => {
                last_heard = Instant::now();
                match conn.incoming(incoming).await {
                    // The client has spoken (a resume, if it sends one, is applied): what was
                    // held goes out now, less what the resume already sent.
                    Ok(true) => conn.release(&mut held, &mut resync_held).await.map(|()| true),
                    other => other,
                }
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > IDLE_LIMIT {
                    let _ = conn.close(1001, "no pong: connection considered dead").await;
                    Ok(false)
                } else {
                    conn.send(Message::Ping(Default::default())).await.map(|()| true)
                }
            },
        };
        match step {
            Ok(true) => {}
            Ok(false) => break,
            Err(Closed) => {
                tracing::info!(user = %conn.user, "chat client gone or stalled; connection dropped");
                break;
            }
        }
    }
}

/// The socket is gone or stalled.
#[derive(Debug)]
struct Closed;

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("websocket closed or stalled")
    }
}

impl Conn {
    async fn send(&mut self, message: Message) -> Result<(), Closed> {
        match tokio::time::timeout(SEND_TIMEOUT, self.sink.send(message)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Closed),
        }
    }

    async fn send_json<T: Serialize>(&mut self, value: &T) -> Result<(), Closed> {
        let text = serde_json::to_string(value).map_err(|_| Closed)?;
        self.send(Message::Text(Utf8Bytes::from(text))).await
    }

    async fn close(&mut self, code: u16, reason: &'static str) -> Result<(), Closed> {
        self.send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        })))
        .await
    }

    /// Handles a frame from the client; `Ok(false)` ends the connection.
    async fn incoming(
        &mut self,
        frame: Option<Result<Message, axum::Error>>,
    ) -> Result<bool, Closed> {
        match frame {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => Ok(false),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(true),
            Some(Ok(Message::Binary(_))) => {
                self.send_json(&Outgoing::Error {
                    code: "invalid_message",
                    message: "binary frames are not supported; send JSON text".to_owned(),
                })
                .await?;
                Ok(true)
            }
            Some(Ok(Message::Text(text))) => {
                match serde_json::from_str::<Incoming>(text.as_str()) {
                    Ok(Incoming::Resume { instances }) => self.resume(instances).await?,
                    Err(e) => {
                        self.send_json(&Outgoing::Error {
                            code: "invalid_message",
                            message: format!("expected {{\"type\":\"resume\",\"instances\":{{\"<id>\":<sequence>}}}}: {e}"),
                        })
                        .await?
                    }
                }
                Ok(true)
            }
        }
    }

    /// Sends what the client missed after the given sequences.
    ///
    /// The client's position is taken before anything is read: if the read fails, the client is
    /// told to resume again later, and meanwhile a live step of the run is sent with only what
    /// follows that position, not the run from its first step, which the client already has.
    async fn resume(&mut self, instances: HashMap<Uuid, i64>) -> Result<(), Closed> {
        for (instance, after) in instances {
            let known = self.last.get(&instance).copied();
            let after = after.max(known.unwrap_or(0));
            self.last.insert(instance, after.max(1));
            let owned: bool = match sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM rm_timeline WHERE instance_id = $1 AND owner_id = $2)",
            )
            .bind(instance)
            .bind(&self.user)
            .fetch_one(&self.pool)
            .await
            {
                Ok(owned) => owned,
                Err(e) => {
                    tracing::error!(error = %e, "websocket resume: read model query failed");
                    self.send_json(&Outgoing::Error {
                        code: "service_unavailable",
                        message: "cannot read the timeline now; resume again later".to_owned(),
                    })
                    .await?;
                    continue;
                }
            };
            if !owned {
                // Not one of the user's runs (no update of it ever comes here): forget it, so
                // made-up ids do not accumulate.
                if known.is_none() {
                    self.last.remove(&instance);
                }
                self.send_json(&Outgoing::Error {
                    code: "instance_not_found",
                    message: format!("instance {instance} does not exist"),
                })
                .await?;
                continue;
            }
            self.fill(instance, after, i64::MAX).await?;
        }
        Ok(())
    }

    /// Sends entries of `instance` with `after < sequence < before` not sent yet. `Ok(false)`
    /// when the timeline could not be read (the client has been told to resume).
    async fn fill(&mut self, instance: Uuid, after: i64, before: i64) -> Result<bool, Closed> {
        let rows: Vec<ChatUpdate> = match sqlx::query_as(
            "SELECT instance_id, sequence, owner_id, kind, at, display, traceparent FROM rm_timeline
              WHERE instance_id = $1 AND owner_id = $2 AND sequence > $3 AND sequence < $4
                AND kind <> 'instance_created'
              ORDER BY sequence LIMIT $5",
        )
        .bind(instance)
        .bind(&self.user)
        .bind(after)
        .bind(before)
        .bind(CATCH_UP_LIMIT)
        .fetch_all(&self.pool)
        .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "websocket catch-up: read model query failed");
                self.send_json(&Outgoing::Error {
                    code: "service_unavailable",
                    message: "cannot read the timeline now; reconnect and resume".to_owned(),
                })
                .await?;
                return Ok(false);
            }
        };
        for row in &rows {
            self.send_step(row).await?;
        }
        Ok(true)
    }

    /// Catches up every run of the user with entries since the connection opened.
    async fn catch_up_all(&mut self) -> Result<(), Closed> {
        let instances: Vec<Uuid> = sqlx::query_scalar(
            "SELECT DISTINCT instance_id FROM rm_timeline WHERE owner_id = $1 AND at >= $2",
        )
        .bind(&self.user)
        .bind(self.since - chrono::Duration::seconds(5))
        .fetch_all(&self.pool)
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "websocket resync: read model query failed");
            Vec::new()
        });
        for instance in instances {
            let after = self.last.get(&instance).copied().unwrap_or(1);
            self.fill(instance, after, i64::MAX).await?;
        }
        Ok(())
    }

    /// Delivers the live updates held since the connection opened, and holds no more; then
    /// the catch-up of a resync that came meanwhile (`resync`).
    async fn release(
        &mut self,
        held: &mut Option<Vec<Arc<ChatUpdate>>>,
        resync: &mut bool,
    ) -> Result<(), Closed> {
        for update in held.take().unwrap_or_default() {
            self.deliver(&update).await?;
        }
        if std::mem::take(resync) {
            self.catch_up_all().await?;
        }
        Ok(())
    }

    /// Sends a live update, first filling any gap before it, dropping it if already sent.
    async fn deliver(&mut self, update: &ChatUpdate) -> Result<(), Closed> {
        let last = self.last.get(&update.instance_id).copied().unwrap_or(1);
        if update.sequence <= last {
            return Ok(());
        }
        // The steps before it first. If they cannot be read, the update is not sent either: the
        // client keeps its position before the gap, so its resume (or the run's next update)
        // brings them all; sent alone, it would move the client's position over the gap.
        if update.sequence > last + 1
            && !self.fill(update.instance_id, last, update.sequence).await?
        {
            return Ok(());
        }
        self.send_step(update).await
    }

    async fn send_step(&mut self, row: &ChatUpdate) -> Result<(), Closed> {
        let last = self.last.get(&row.instance_id).copied().unwrap_or(1);
        if row.sequence <= last {
            return Ok(());
        }
        let message = StepMessage {
            kind: &row.kind,
            instance_id: row.instance_id,
            sequence: row.sequence,
            at: row.at,
            data: &row.display,
        };
        let span = tracing::info_span!(
            "ws.send",
            otel.kind = "producer",
            trace_id = apex_projections::trace::trace_id(row.traceparent.as_deref()),
            instance_id = %row.instance_id,
            sequence = row.sequence,
        );
        apex_projections::trace::follow(&span, row.traceparent.as_deref());
        self.send_json(&message).instrument(span.clone()).await?;
        metrics::counter!("apex_ws_messages_sent_total").increment(1);
        span.in_scope(|| tracing::debug!("sent to chat client"));
        self.last.insert(row.instance_id, row.sequence);
        Ok(())
    }
}
