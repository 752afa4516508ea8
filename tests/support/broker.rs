//! Broker-side actions of the tests (shared by the test crates that include it; each uses
//! some of them).
#![allow(dead_code)]

use apex_projections::amqp::AmqpConfig;
use apex_projections::projector::ProjectorConfig;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};

/// Closes, from the broker side, every connection whose name contains `needle`.
pub async fn close_broker_connections(needle: &str) -> usize {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(needle)) {
        let pid = line.split_whitespace().next().unwrap();
        let status = tokio::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "test closes the connection"])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        closed += 1;
    }
    closed
}

/// Deletes what a test's stack declared on the broker: the projector queues under
/// `queue_prefix` and the two exchanges of `amqp` (the replicas' chat queues go with their
/// connections).
pub async fn delete_topology(amqp: &AmqpConfig, queue_prefix: &str) {
    let connection = apex_projections::amqp::connect(amqp, "apex-test-cleanup")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut projectors = ProjectorConfig::new(amqp.clone());
    projectors.queue_prefix = queue_prefix.to_owned();
    for name in projectors.queues() {
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in [&amqp.exchange, &amqp.chat_exchange] {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "test done".into()).await;
}
