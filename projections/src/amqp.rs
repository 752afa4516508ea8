//! RabbitMQ connection and topology.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use lapin::options::{
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

/// Where and how to reach the broker.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:port/vhost`.
    pub uri: String,
    /// The durable topic exchange events are published to.
    pub exchange: String,
    /// The topic exchange of live chat updates (one message per relay batch).
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

/// Runs `publishes` (the `basic_publish` futures of one channel, in the order they must reach
/// the broker) pipelined and returns their results in order.
///
/// A publish queues its frames and takes its confirm's delivery tag when first polled, then
/// waits until the connection's I/O thread has written it. Awaiting each in turn costs a
/// round trip to that thread (two thread wake-ups) per message; here each is polled once as it
/// is created — so the frames and tags keep the iterator's order — and only then awaited.
pub async fn publish_pipelined<F, T>(
    publishes: impl IntoIterator<Item = F>,
) -> Result<Vec<T>, BusError>
where
    F: Future<Output = Result<T, lapin::Error>>,
{
    let mut started = Vec::new();
    for publish in publishes {
        let mut publish = Box::pin(publish);
        let first = futures::poll!(publish.as_mut());
        started.push((publish, first));
    }
    let mut results = Vec::with_capacity(started.len());
    for (publish, first) in started {
        results.push(match first {
            Poll::Ready(result) => result?,
            Poll::Pending => publish.await?,
        });
    }
    Ok(results)
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

/// How a durable queue keeps its messages (the `x-queue-type` it is declared with). A queue's
/// type is fixed when it is created: declaring an existing queue with another type is refused
/// by the broker (`PRECONDITION_FAILED`), so a queue changes type only under a new name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// A classic queue (no argument): the dead-letter queues, and queues of earlier versions.
    Classic,
    /// A quorum queue: a Raft log on disk. The projector groups' queues: under a steady
    /// stream its work is spread over several broker processes (log writer, queue, segment
    /// writer) where a classic queue's is one process, so it takes and delivers more messages
    /// per second on the same cores (docs/benchmarks.md, change 53).
    Quorum,
}

impl QueueType {
    /// The declaration's arguments.
    pub fn arguments(self) -> FieldTable {
        let mut arguments = FieldTable::default();
        if self == QueueType::Quorum {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        arguments
    }
}

/// Declares a durable queue of `kind` bound to `routing_keys` on `exchange`.
pub async fn declare_bound_queue(
    channel: &Channel,
    exchange: &str,
    queue: &str,
    kind: QueueType,
    routing_keys: &[&str],
) -> Result<(), BusError> {
    declare_queue(channel, queue, kind).await?;
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

/// Declares a durable queue of `kind`.
pub async fn declare_queue(
    channel: &Channel,
    queue: &str,
    kind: QueueType,
) -> Result<(), BusError> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            kind.arguments(),
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
