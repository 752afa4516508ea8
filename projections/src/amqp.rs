//! RabbitMQ connection and topology.

use std::time::Duration;

use lapin::options::{
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

/// Where and how to reach the broker.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:port/vhost`.
    pub uri: String,
    /// The durable topic exchange events are published to.
    pub exchange: String,
    /// The topic exchange of live chat updates, routed by `user.<id>`.
    pub chat_exchange: String,
}

/// A broker failure.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The client library reported an error.
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker did not answer in time.
    #[error("RabbitMQ did not answer within {0:?}")]
    Timeout(Duration),
    /// The broker refused a published message (negative confirm).
    #[error("RabbitMQ refused (nacked) a published message")]
    Nacked,
    /// The broker ended our consumer (queue deleted, connection closed).
    #[error("RabbitMQ closed the consumer")]
    ConsumerClosed,
    /// A message could not be encoded.
    #[error("cannot encode a message: {0}")]
    Encode(String),
}

/// Opens a connection named after the process.
pub async fn connect(config: &AmqpConfig, name: &str) -> Result<Connection, BusError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let timeout = Duration::from_secs(10);
    tokio::time::timeout(timeout, Connection::connect(&config.uri, properties))
        .await
        .map_err(|_| BusError::Timeout(timeout))?
        .map_err(BusError::from)
}

/// Declares the durable topic exchange.
pub async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<(), BusError> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// A channel in publisher-confirm mode.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, BusError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Declares a durable queue bound to `routing_keys` on `exchange`.
pub async fn declare_bound_queue(
    channel: &Channel,
    exchange: &str,
    queue: &str,
    routing_keys: &[&str],
) -> Result<(), BusError> {
    declare_queue(channel, queue).await?;
    for key in routing_keys {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                (*key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Declares a durable queue.
pub async fn declare_queue(channel: &Channel, queue: &str) -> Result<(), BusError> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Exponential backoff with a cap, for reconnect loops.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { next: initial, max }
    }

    /// The delay to wait now; the following one doubles.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Back to the initial delay after a success.
    pub fn reset(&mut self, initial: Duration) {
        self.next = initial;
    }
}
