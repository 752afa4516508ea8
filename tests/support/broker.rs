//! Broker-side actions of the tests (shared by the test crates that include it).

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
