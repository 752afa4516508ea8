//! The replica's hub: receives live chat updates from RabbitMQ and hands those of the users
//! connected to this replica to their connections without ever waiting on a client.
//!
//! * One exclusive queue per replica, bound to the chat exchange's batches of updates (one
//!   message per relay batch); an update whose owner has no connection here is dropped.
//! * Each connection has a bounded buffer; when it is full the connection is told to resync and
//!   closed, so a slow client never delays the others.
//! * When the broker connection drops, the hub reconnects, rebinds, and tells every connection
//!   to catch up from the timeline read model (updates published meanwhile were missed); the
//!   first session does the same for connections registered before it bound its queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apex_projections::amqp::{self, AmqpConfig, Backoff, BusError};
use apex_projections::chat::{self, ChatUpdate};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio::sync::{Notify, mpsc};

/// Updates a connection may have queued before it is considered stalled.
pub const CONNECTION_BUFFER: usize = 256;

/// What the hub tells a connection.
#[derive(Debug, Clone)]
pub enum Signal {
    /// A new timeline entry of one of the user's runs.
    Update(Arc<ChatUpdate>),
    /// Live updates may have been missed: catch up from the read model.
    Resync,
}

struct Handle {
    tx: mpsc::Sender<Signal>,
    overflow: Arc<Notify>,
}

/// Counters for observability.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Updates handed to connections.
    pub delivered: AtomicU64,
    /// Updates dropped because a connection's buffer was full.
    pub dropped: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
}

/// The per-replica hub.
pub struct Hub {
    config: AmqpConfig,
    queue: String,
    users: Mutex<HashMap<String, HashMap<u64, Handle>>>,
    next_id: AtomicU64,
    /// Whether a broker session is consuming the replica's queue now.
    consuming: AtomicBool,
    /// Counters.
    pub stats: HubStats,
}

/// A connection's registration; unregisters on drop.
pub struct Registration {
    hub: Arc<Hub>,
    user: String,
    id: u64,
    /// Signals for this connection.
    pub rx: mpsc::Receiver<Signal>,
    /// Notified when the buffer overflowed.
    pub overflow: Arc<Notify>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut users = self.hub.users.lock().unwrap_or_else(|p| p.into_inner());
        let empty = users.get_mut(&self.user).is_some_and(|conns| {
            conns.remove(&self.id);
            conns.is_empty()
        });
        if empty {
            users.remove(&self.user);
        }
        self.hub.stats.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Hub {
    /// Starts the hub's broker session in the background.
    pub fn start(config: AmqpConfig) -> Arc<Self> {
        let hub = Arc::new(Self {
            config,
            queue: format!("apex.chat.replica.{}", uuid::Uuid::new_v4().simple()),
            users: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            consuming: AtomicBool::new(false),
            stats: HubStats::default(),
        });
        tokio::spawn(hub.clone().run());
        hub
    }

    /// Registers a connection of `user`: from now on the user's updates reaching this replica
    /// are handed to it (while the broker is down none reach it; the next session asks every
    /// connection to resync).
    pub fn register(self: &Arc<Self>, user: &str) -> Registration {
        let (tx, rx) = mpsc::channel(CONNECTION_BUFFER);
        let overflow = Arc::new(Notify::new());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
            users.entry(user.to_owned()).or_default().insert(
                id,
                Handle {
                    tx,
                    overflow: overflow.clone(),
                },
            );
        }
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        Registration {
            hub: self.clone(),
            user: user.to_owned(),
            id,
            rx,
            overflow,
        }
    }

    /// The replica's queue (`apex.chat.replica.<id>`), also in its broker connection's name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Whether the hub is consuming its queue now: updates published from here on reach this
    /// replica. False before the first session and from a session's end until the next one
    /// consumes (the broker is unreachable or refused the queue).
    pub fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }

    /// Hands the updates of a message to the connections of their owners, in order.
    fn dispatch_all(&self, delivery: &Delivery) {
        let kind = delivery.properties.kind().as_ref().map(|k| k.as_str());
        if kind != Some(chat::BATCH_TYPE) {
            tracing::error!(kind = ?kind, "chat message of an unknown type dropped");
            return;
        }
        let updates: Vec<ChatUpdate> = match serde_json::from_slice(&delivery.data) {
            Ok(updates) => updates,
            Err(e) => {
                tracing::error!(error = %e, "malformed chat updates dropped");
                return;
            }
        };
        apex_projections::delay::record(
            &metrics::histogram!("apex_chat_receive_delay_seconds"),
            updates.iter().map(|u| u.at),
        );
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        for update in updates {
            if let Some(conns) = users.get(&update.owner_id) {
                self.dispatch(conns, Arc::new(update));
            }
        }
    }

    fn dispatch(&self, conns: &HashMap<u64, Handle>, update: Arc<ChatUpdate>) {
        for handle in conns.values() {
            match handle.tx.try_send(Signal::Update(update.clone())) {
                Ok(()) => {
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("apex_ws_messages_dropped_total").increment(1);
                    handle.overflow.notify_one();
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    fn broadcast_resync(&self) {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        for handle in users.values().flat_map(HashMap::values) {
            if handle.tx.try_send(Signal::Resync).is_err() {
                handle.overflow.notify_one();
            }
        }
    }

    async fn run(self: Arc<Self>) {
        let initial = Duration::from_millis(200);
        let mut backoff = Backoff::new(initial, Duration::from_secs(10));
        loop {
            let result = self.session(&mut backoff, initial).await;
            self.consuming.store(false, Ordering::Relaxed);
            let delay = backoff.next_delay();
            match result {
                Ok(()) => {
                    tracing::warn!(retry_in = ?delay, "chat hub consumer ended; reconnecting")
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?delay, "chat hub session failed; reconnecting")
                }
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn session(&self, backoff: &mut Backoff, initial: Duration) -> Result<(), BusError> {
        // Named after the replica's queue: an operator (or a test) can tell replicas apart.
        let name = format!("apex-chat-hub {}", self.queue);
        let connection = amqp::connect(&self.config, &name).await?;
        let channel = connection.create_channel().await?;
        amqp::declare_exchange(&channel, &self.config.chat_exchange).await?;
        channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.config.chat_exchange.as_str().into(),
                chat::BATCH_ROUTING_KEY.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                "apex-chat-hub".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        // Whatever was published while we were away is in the read model, not in our queue;
        // so is what was published before the first session bound the queue, which a
        // connection registered meanwhile (the replica was not ready yet) would miss.
        // Connections that missed nothing find nothing new.
        self.broadcast_resync();
        backoff.reset(initial);
        self.consuming.store(true, Ordering::Relaxed);
        tracing::info!(queue = %self.queue, "chat hub consuming");
        while let Some(delivery) = consumer.next().await {
            self.dispatch_all(&delivery?);
        }
        Ok(())
    }
}
