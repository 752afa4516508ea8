//! What an open HTTP connection costs the server: keep-alive clients (a load balancer, an agent
//! runtime's connection pool) hold hundreds of them.
//!
//! Each test runs in a process of its own (nextest), which is also the server's process, so the
//! process's resident memory is the server's plus this test's few buffers.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::spawn_app;

/// Connections the test holds open at once.
const CONNECTIONS: usize = 200;

/// Resident memory of this process, in KiB.
fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Opens a connection and has one request answered on it, leaving it open (keep-alive).
async fn open(address: &str) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: apex\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    // The head and the small body arrive together; read until the blank line and the body.
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("no answer within 10 s")
            .unwrap();
        assert!(n > 0, "the server closed a keep-alive connection");
        answer.extend_from_slice(&chunk[..n]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_keep_alive_connection_costs_the_server_kilobytes_not_megabytes() {
    let app = spawn_app().await;
    let address = app.address.trim_start_matches("http://").to_owned();
    // Warm up: the first connections allocate what every later one reuses (runtime, pools).
    let warm: Vec<TcpStream> = futures::future::join_all((0..8).map(|_| open(&address))).await;
    drop(warm);
    let before = resident_kib();
    let mut held = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        held.push(open(&address).await);
    }
    let grown = resident_kib().saturating_sub(before);
    let per_connection = grown / CONNECTIONS as u64;
    // Each connection used to hold its own deep copy of the route table, the OpenAPI document
    // among the handlers (about 2 MB): 200 connections were 400 MB.
    assert!(
        per_connection <= 100,
        "{CONNECTIONS} open connections grew the server by {grown} KiB ({per_connection} KiB each)"
    );
    drop(held);
}
