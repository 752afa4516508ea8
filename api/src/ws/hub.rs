//! The replica's hub: receives live chat updates from RabbitMQ for the users connected to this
//! replica and hands them to their connections without ever waiting on a client.
//!
//! * One exclusive queue per replica, bound to `user.<id>` while that user has a connection here.
//! * Each connection has a bounded buffer; when it is full the connection is told to resync and
//!   closed, so a slow client never delays the others.
//! * When the broker connection drops, the hub reconnects, rebinds, and tells every connection
//!   to catch up from the timeline read model (updates published meanwhile were missed).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apex_projections::amqp::{self, AmqpConfig, Backoff, BusError};
use apex_projections::chat::{self, ChatUpdate};
use futures::StreamExt;
use lapin::Channel;
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
    bound: tokio::sync::Mutex<HashSet<String>>,
    channel: tokio::sync::Mutex<Option<Channel>>,
    next_id: AtomicU64,
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
        let empty = {
            let mut users = self.hub.users.lock().unwrap_or_else(|p| p.into_inner());
            let empty = users.get_mut(&self.user).is_some_and(|conns| {
                conns.remove(&self.id);
                conns.is_empty()
            });
            if empty {
                users.remove(&self.user);
            }
            empty
        };
        self.hub.stats.connections.fetch_sub(1, Ordering::Relaxed);
        if empty {
            let hub = self.hub.clone();
            let user = std::mem::take(&mut self.user);
            tokio::spawn(async move { hub.unbind_if_unused(&user).await });
        }
    }
}

impl Hub {
    /// Starts the hub's broker session in the background.
    pub fn start(config: AmqpConfig) -> Arc<Self> {
        let hub = Arc::new(Self {
            config,
            queue: format!("apex.chat.replica.{}", uuid::Uuid::new_v4().simple()),
            users: Mutex::new(HashMap::new()),
            bound: tokio::sync::Mutex::new(HashSet::new()),
            channel: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
            stats: HubStats::default(),
        });
        tokio::spawn(hub.clone().run());
        hub
    }

    /// Registers a connection of `user`; returns once the user's updates are routed here (or
    /// the broker is down, in which case the next session binds it and asks for a resync).
    pub async fn register(self: &Arc<Self>, user: &str) -> Registration {
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
        if let Err(e) = self.bind(user).await {
            tracing::warn!(error = %e, "cannot bind a user's chat updates now; the next broker session will");
        }
        Registration {
            hub: self.clone(),
            user: user.to_owned(),
            id,
            rx,
            overflow,
        }
    }

    async fn bind(&self, user: &str) -> Result<(), BusError> {
        let mut bound = self.bound.lock().await;
        if bound.contains(user) {
            return Ok(());
        }
        let channel = self.channel.lock().await.clone();
        let Some(channel) = channel else {
            return Ok(());
        };
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.config.chat_exchange.as_str().into(),
                chat::routing_key(user).as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        bound.insert(user.to_owned());
        Ok(())
    }

    async fn unbind_if_unused(&self, user: &str) {
        let mut bound = self.bound.lock().await;
        let in_use = self
            .users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(user);
        if in_use || !bound.contains(user) {
            return;
        }
        let channel = self.channel.lock().await.clone();
        if let Some(channel) = channel
            && let Err(e) = channel
                .queue_unbind(
                    self.queue.as_str().into(),
                    self.config.chat_exchange.as_str().into(),
                    chat::routing_key(user).as_str().into(),
                    FieldTable::default(),
                )
                .await
        {
            tracing::warn!(error = %e, "cannot unbind a user's chat updates");
            return;
        }
        bound.remove(user);
    }

    fn dispatch(&self, update: ChatUpdate) {
        let update = Arc::new(update);
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let Some(conns) = users.get(&update.owner_id) else {
            return;
        };
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
        let mut first = true;
        loop {
            let result = self.session(&mut first, &mut backoff, initial).await;
            *self.channel.lock().await = None;
            self.bound.lock().await.clear();
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

    async fn session(
        &self,
        first: &mut bool,
        backoff: &mut Backoff,
        initial: Duration,
    ) -> Result<(), BusError> {
        let connection = amqp::connect(&self.config, "apex-chat-hub").await?;
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
        *self.channel.lock().await = Some(channel);
        let users: Vec<String> = self
            .users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for user in users {
            self.bind(&user).await?;
        }
        if !*first {
            // Whatever was published while we were away is in the read model, not in our queue.
            self.broadcast_resync();
        }
        *first = false;
        backoff.reset(initial);
        tracing::info!(queue = %self.queue, "chat hub consuming");
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery?;
            match serde_json::from_slice::<ChatUpdate>(&delivery.data) {
                Ok(update) => self.dispatch(update),
                Err(e) => tracing::error!(error = %e, "malformed chat update dropped"),
            }
        }
        Ok(())
    }
}
