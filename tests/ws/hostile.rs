//! Hostile chat clients: protocol violations (a text frame that is not UTF-8, a frame over the
//! 64 KiB limit) end only the offending connection; garbage JSON, unknown message types and
//! binary frames get an `invalid_message` error and the connection stays usable; nobody can
//! subscribe to another user's run. Meanwhile a well-behaved client keeps getting its updates.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::helpers::{Socket, Stack, read_steps, script, script_types, stack};

/// How a connection ended.
#[derive(Debug)]
enum End {
    /// The server sent a close frame with this code.
    Closed(u16),
    /// The TCP connection ended without a close frame (what the client library said).
    Dropped(String),
}

impl End {
    /// Accepts a close frame with one of `codes`, or the connection simply ending.
    fn assert_clean(&self, what: &str, codes: &[u16]) {
        match self {
            End::Closed(code) => assert!(codes.contains(code), "{what}: close code {code}"),
            End::Dropped(how) => println!("{what}: connection ended without a close frame: {how}"),
        }
    }
}

/// Reads until the connection ends; panics if it is still open after 5 s.
async fn ended(socket: &mut Socket) -> End {
    let read = async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => {
                    return End::Closed(frame.map_or(1005, |f| u16::from(f.code)));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return End::Dropped(e.to_string()),
                None => return End::Dropped("end of stream".to_owned()),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("the server kept a hostile connection open")
}

/// Reads the next JSON text message (skipping pings).
async fn next_json(socket: &mut Socket) -> Value {
    let read = async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
                Some(Ok(Message::Ping(p))) => socket.send(Message::Pong(p)).await.unwrap(),
                Some(Ok(Message::Pong(_))) => {}
                other => panic!("expected a message, got {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("no answer within 5 s")
}

/// A well-behaved client on `stack`: runs a script for its own run and checks it got every
/// step, in order.
async fn bystander_gets_everything(stack: &Stack, socket: &mut Socket, user: &str, run: &str) {
    let steps = script(stack, run, 2).await;
    let messages = read_steps(socket, steps, Duration::from_secs(15)).await;
    let types: Vec<&str> = messages
        .iter()
        .map(|m| m["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, script_types(2), "{user} missed updates");
}

#[tokio::test]
async fn a_text_frame_that_is_not_utf8_ends_only_that_connection() {
    let stack = stack(1).await;
    stack.agent("triage").await;
    let bob = stack.user("bob");
    let mut bystander = stack.connect(0, &bob, None).await;
    let mut mallory = stack.connect(0, &stack.user("mallory"), None).await;
    let bad = Frame::message(
        vec![0x7b, 0xff, 0xfe, 0xc3, 0x28, 0x7d],
        OpCode::Data(Data::Text),
        true,
    );
    mallory.send(Message::Frame(bad)).await.unwrap();
    ended(&mut mallory)
        .await
        .assert_clean("invalid UTF-8", &[1002, 1007]);
    let run = stack.instance(&bob, "triage").await;
    bystander_gets_everything(&stack, &mut bystander, "bob", &run).await;
    stack.stop().await;
}

#[tokio::test]
async fn a_frame_over_64_kib_ends_only_that_connection() {
    let stack = stack(1).await;
    stack.agent("triage").await;
    let bob = stack.user("bob");
    let mut bystander = stack.connect(0, &bob, None).await;
    let mut mallory = stack.connect(0, &stack.user("mallory"), None).await;
    let huge = json!({"type": "resume", "instances": {}, "pad": "x".repeat(100 * 1024)});
    // The server may close while the frame is still being written.
    let _ = mallory.send(Message::Text(huge.to_string().into())).await;
    ended(&mut mallory)
        .await
        .assert_clean("frame over 64 KiB", &[1002, 1009]);
    let run = stack.instance(&bob, "triage").await;
    bystander_gets_everything(&stack, &mut bystander, "bob", &run).await;
    stack.stop().await;
}

#[tokio::test]
async fn garbage_and_unknown_messages_get_an_error_and_the_connection_stays_usable() {
    let stack = stack(1).await;
    stack.agent("triage").await;
    let alice = stack.user("alice");
    let mut socket = stack.connect(0, &alice, None).await;
    let garbage = [
        Message::Text("not json".into()),
        Message::Text("{\"type\":".into()),
        Message::Text(
            json!({"type": "subscribe", "instances": ["*"]})
                .to_string()
                .into(),
        ),
        Message::Text(json!({"type": "resume"}).to_string().into()),
        Message::Text(
            json!({"type": "resume", "instances": "all"})
                .to_string()
                .into(),
        ),
        Message::Text(
            json!({"type": "resume", "instances": {"not-a-uuid": 1}})
                .to_string()
                .into(),
        ),
        Message::Text(json!([1, 2, 3]).to_string().into()),
        Message::Text("[".repeat(10_000).into()),
        Message::Binary(vec![0u8, 159, 146, 150].into()),
    ];
    for message in garbage {
        let shown = format!("{message:?}").chars().take(80).collect::<String>();
        socket.send(message).await.unwrap();
        let answer = next_json(&mut socket).await;
        assert_eq!(answer["type"], "error", "{shown}: {answer}");
        assert_eq!(answer["code"], "invalid_message", "{shown}: {answer}");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Still usable: a valid resume of Alice's own run returns its steps.
    let run = stack.instance(&alice, "triage").await;
    let steps = script(&stack, &run, 1).await;
    let live = read_steps(&mut socket, steps, Duration::from_secs(15)).await;
    assert_eq!(live.len(), steps);
    socket
        .send(Message::Text(
            json!({"type": "resume", "instances": {run.clone(): 0}})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    // Everything was sent already on this socket: nothing is sent twice.
    let again = read_steps(&mut socket, 1, Duration::from_millis(800)).await;
    assert!(again.is_empty(), "{again:?}");
    stack.stop().await;
}

#[tokio::test]
async fn resuming_another_users_run_in_the_handshake_is_refused() {
    let stack = stack(1).await;
    stack.agent("triage").await;
    let alice = stack.user("alice");
    let run = stack.instance(&alice, "triage").await;
    script(&stack, &run, 1).await;
    // Wait until Alice can resume her own run, so the timeline has been projected.
    let mut own = stack.connect(0, &alice, Some(&format!("{run}:0"))).await;
    let steps = read_steps(&mut own, 4, Duration::from_secs(15)).await;
    assert_eq!(steps.len(), 4);

    let mut intruder = stack
        .connect(0, &stack.user("mallory"), Some(&format!("{run}:0")))
        .await;
    let answer = next_json(&mut intruder).await;
    assert_eq!(answer["type"], "error", "{answer}");
    assert_eq!(answer["code"], "instance_not_found", "{answer}");
    let leaked = read_steps(&mut intruder, 1, Duration::from_secs(1)).await;
    assert!(leaked.is_empty(), "another user's steps leaked: {leaked:?}");
    stack.stop().await;
}
