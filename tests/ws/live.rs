//! What a chat client sees.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;

#[tokio::test]
async fn a_run_driven_through_the_runner_api_reaches_a_connected_client_in_order() {
    let stack = stack(1).await;
    stack.agent("triage").await;
    let alice = stack.user("alice");
    let mut socket = stack.connect(0, &alice, None).await;
    let id = stack.instance(&alice, "triage").await;
    let started = Instant::now();
    let steps = script(&stack, &id, 5).await;
    let messages = read_steps(&mut socket, steps, Duration::from_secs(15)).await;
    assert!(started.elapsed() < Duration::from_secs(15));
    let types: Vec<String> = messages
        .iter()
        .map(|m| m["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(types, script_types(5));
    let sequences: Vec<i64> = keys(&messages).into_iter().map(|(_, s)| s).collect();
    assert_eq!(sequences, (2..=(steps as i64 + 1)).collect::<Vec<_>>());
    assert!(messages.iter().all(|m| m["instance_id"] == id.as_str()));
    assert_eq!(messages[1]["data"]["thought"], "thinking 0");
    assert_eq!(
        messages.last().unwrap()["data"]["output"],
        "Your bill is high because of X"
    );
    assert_no_internal(&messages);
    let extra = read_steps(&mut socket, 1, Duration::from_millis(500)).await;
    assert!(extra.is_empty(), "no duplicate: {extra:?}");
    stack.stop().await;
}

#[tokio::test]
async fn a_client_that_reconnects_with_its_last_sequence_misses_nothing_and_sees_nothing_twice() {
    let stack = stack(1).await;
    stack.agent("triage").await;
    let alice = stack.user("alice");
    let runner = stack.runner();
    let id = stack.instance(&alice, "triage").await;
    let base = format!("/v1/runner/instances/{id}");
    let mut socket = stack.connect(0, &alice, None).await;
    start_and_think(&stack, &id, 5).await;
    let first = read_steps(&mut socket, 3, Duration::from_secs(10)).await;
    assert_eq!(first.len(), 3);
    drop(socket);
    for i in 0..10 {
        stack.think(&id, &format!("b{i}")).await;
    }
    let last_seen = first.last().unwrap()["sequence"].as_i64().unwrap();
    let mut socket = stack
        .connect(0, &alice, Some(&format!("{id}:{last_seen}")))
        .await;
    stack
        .post(
            &format!("{base}/complete"),
            &runner,
            json!({"output": "done"}),
        )
        .await;
    // 1 start + 15 thoughts + 1 completion = sequences 2..=18.
    let rest = read_steps(
        &mut socket,
        (18 - last_seen) as usize,
        Duration::from_secs(15),
    )
    .await;
    let mut all = keys(&first);
    all.extend(keys(&rest));
    let sequences: Vec<i64> = all.iter().map(|(_, s)| *s).collect();
    assert_eq!(
        sequences,
        (2..=18).collect::<Vec<_>>(),
        "complete, ordered, no duplicate"
    );
    let extra = read_steps(&mut socket, 1, Duration::from_millis(500)).await;
    assert!(extra.is_empty(), "no duplicate: {extra:?}");

    // Resuming by message on an open socket works the same way.
    socket
        .send(Message::Text(
            json!({"type": "resume", "instances": {id.clone(): 15}})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    let again = read_steps(&mut socket, 1, Duration::from_millis(800)).await;
    assert!(again.is_empty(), "already sent on this socket: {again:?}");
    stack.stop().await;
}

#[tokio::test]
async fn each_user_sees_only_their_own_runs_and_no_internal_detail() {
    let stack = stack(1).await;
    stack.agent("triage").await;
    let (alice, bob) = (stack.user("alice"), stack.user("bob"));
    let mut alice_socket = stack.connect(0, &alice, None).await;
    let mut bob_socket = stack.connect(0, &bob, None).await;
    let alice_run = stack.instance(&alice, "triage").await;
    let bob_run = stack.instance(&bob, "triage").await;
    let (a, b) = tokio::join!(script(&stack, &alice_run, 2), script(&stack, &bob_run, 3));
    let alice_messages = read_steps(&mut alice_socket, a, Duration::from_secs(15)).await;
    let bob_messages = read_steps(&mut bob_socket, b, Duration::from_secs(15)).await;
    assert_eq!(alice_messages.len(), a);
    assert_eq!(bob_messages.len(), b);
    assert!(
        alice_messages
            .iter()
            .all(|m| m["instance_id"] == alice_run.as_str())
    );
    assert!(
        bob_messages
            .iter()
            .all(|m| m["instance_id"] == bob_run.as_str())
    );
    assert_no_internal(&alice_messages);
    assert_no_internal(&bob_messages);
    assert!(
        read_steps(&mut alice_socket, 1, Duration::from_millis(500))
            .await
            .is_empty()
    );

    // Bob cannot subscribe to Alice's run by resuming it.
    bob_socket
        .send(Message::Text(
            json!({"type": "resume", "instances": {alice_run.clone(): 0}})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    let answer = read_steps(&mut bob_socket, 1, Duration::from_secs(5)).await;
    assert_eq!(answer[0]["type"], "error");
    assert_eq!(answer[0]["code"], "instance_not_found");
    stack.stop().await;
}

#[tokio::test]
async fn clients_on_two_api_replicas_each_receive_their_own_updates() {
    let stack = stack(2).await;
    stack.agent("triage").await;
    let (alice, bob) = (stack.user("alice"), stack.user("bob"));
    let mut alice_socket = stack.connect(0, &alice, None).await;
    let mut bob_socket = stack.connect(1, &bob, None).await;
    let alice_run = stack.instance(&alice, "triage").await;
    let bob_run = stack.instance(&bob, "triage").await;
    let a = script(&stack, &alice_run, 3).await;
    let b = script(&stack, &bob_run, 3).await;
    let alice_messages = read_steps(&mut alice_socket, a, Duration::from_secs(15)).await;
    let bob_messages = read_steps(&mut bob_socket, b, Duration::from_secs(15)).await;
    assert_eq!(keys(&alice_messages).len(), a);
    assert_eq!(keys(&bob_messages).len(), b);
    assert!(
        bob_messages
            .iter()
            .all(|m| m["instance_id"] == bob_run.as_str())
    );
    assert!(
        alice_messages
            .iter()
            .all(|m| m["instance_id"] == alice_run.as_str())
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_delay_the_others() {
    let stack = stack(1).await;
    stack.agent("triage").await;
    let (alice, bob) = (stack.user("alice"), stack.user("bob"));
    // Alice opens a socket and never reads from it.
    let mut stalled = stack.connect(0, &alice, None).await;
    let mut fast = stack.connect(0, &bob, None).await;
    let alice_run = stack.instance(&alice, "triage").await;
    let bob_run = stack.instance(&bob, "triage").await;
    let runner = stack.runner();
    stack
        .post(
            &format!("/v1/runner/instances/{alice_run}/start"),
            &runner,
            json!({}),
        )
        .await;
    stack
        .post(
            &format!("/v1/runner/instances/{bob_run}/start"),
            &runner,
            json!({}),
        )
        .await;
    let big = "x".repeat(15_000);
    let mut worst = Duration::ZERO;
    // Flood Alice's run with large thoughts; measure Bob's latency meanwhile.
    for round in 0..40 {
        for _ in 0..25 {
            stack.think(&alice_run, &big).await;
        }
        let sent = Instant::now();
        stack.think(&bob_run, &format!("bob {round}")).await;
        let got = read_steps(
            &mut fast,
            if round == 0 { 2 } else { 1 },
            Duration::from_secs(10),
        )
        .await;
        assert!(!got.is_empty(), "bob got nothing in round {round}");
        worst = worst.max(sent.elapsed());
    }
    assert!(
        worst < Duration::from_secs(3),
        "bob's worst latency was {worst:?}"
    );
    // The stalled client was cut off (told to resync with close code 4008, or dropped when
    // even that could not be written) instead of being buffered for without bound.
    let mut received = 0;
    let mut close_code = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stalled.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => received += 1,
            Ok(Some(Ok(Message::Close(frame)))) => {
                close_code = frame.map(|f| u16::from(f.code));
                break;
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_))) | Ok(None) => break,
            Err(_) => panic!("the stalled client's connection was kept open"),
        }
    }
    assert!(
        close_code == Some(4008) || close_code.is_none(),
        "unexpected close code {close_code:?}"
    );
    assert!(
        received < 1000,
        "the stalled client was not cut off: {received} of 1001 steps buffered"
    );
    stack.stop().await;
}

#[tokio::test]
async fn the_socket_refuses_missing_bad_and_non_user_tokens_before_the_upgrade() {
    let stack = stack(1).await;
    assert_eq!(stack.handshake_status("", None).await, 401);
    assert_eq!(stack.handshake_status("?token=not-a-jwt", None).await, 401);
    let runner = stack.runner();
    assert_eq!(
        stack
            .handshake_status(&format!("?token={runner}"), None)
            .await,
        403
    );
    let admin = stack.token("admin-1", apex_domain::ActorRole::Admin, None);
    assert_eq!(
        stack
            .handshake_status("", Some(&format!("Bearer {admin}")))
            .await,
        403
    );
    let alice = stack.user("alice");
    assert_eq!(
        stack
            .handshake_status(&format!("?token={alice}&resume=garbage"), None)
            .await,
        400
    );
    assert_eq!(
        stack
            .handshake_status("", Some(&format!("Bearer {alice}")))
            .await,
        101
    );
    stack.stop().await;
}

/// A browser cannot set the Authorization header on a WebSocket: it offers its token as a
/// subprotocol beside the chat's, and the server selects the chat's, never the token.
#[tokio::test]
async fn a_browser_authenticates_with_its_token_as_a_subprotocol_and_gets_its_steps() {
    let stack = stack(1).await;
    stack.agent("triage").await;
    let alice = stack.user("alice");
    let (mut socket, selected) = stack
        .connect_with_protocols(0, &format!("apex.chat.v1, apex.bearer.{alice}"))
        .await;
    assert_eq!(selected.as_deref(), Some("apex.chat.v1"));
    let id = stack.instance(&alice, "triage").await;
    let steps = script(&stack, &id, 2).await;
    let messages = read_steps(&mut socket, steps, Duration::from_secs(15)).await;
    let types: Vec<String> = messages
        .iter()
        .map(|m| m["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(types, script_types(2));
    assert!(messages.iter().all(|m| m["instance_id"] == id.as_str()));

    // The token alone would leave the browser without a protocol to accept: refused, as are
    // two tokens, a bad token and a token of another role.
    let cases = [
        (format!("apex.bearer.{alice}"), 400, "invalid_header"),
        (
            format!("apex.chat.v1, apex.bearer.{alice}, apex.bearer.{alice}"),
            400,
            "invalid_header",
        ),
        (
            "apex.chat.v1, apex.bearer.not-a-jwt".to_owned(),
            401,
            "invalid_token",
        ),
        (
            format!("apex.chat.v1, apex.bearer.{}", stack.runner()),
            403,
            "role_not_allowed",
        ),
    ];
    for (protocols, status, code) in cases {
        assert_eq!(
            stack.protocol_handshake(&protocols).await,
            (
                reqwest::StatusCode::from_u16(status).unwrap(),
                Some(code.to_owned())
            ),
            "{protocols}"
        );
    }
    stack.stop().await;
}

/// A client that reconnects and resumes with a message (not in the handshake) while its run
/// goes on: a live step that reaches the new connection before the resume must not make the
/// server send the run from its first step (which the client already has).
#[tokio::test]
async fn a_client_that_resumes_by_message_after_a_live_step_sees_nothing_twice() {
    let stack = stack(1).await;
    let (alice, id) = a_run_seen_up_to_5_by_a_lost_client(&stack).await;
    let mut socket = stack.connect(0, &alice, None).await;
    stack.think(&id, "b").await;
    // Let the live step (sequence 6) reach the connection before the client's resume.
    tokio::time::sleep(Duration::from_millis(400)).await;
    resume_after(&mut socket, &id, 5).await;
    let rest = read_steps(&mut socket, 2, Duration::from_secs(3)).await;
    let sequences: Vec<i64> = keys(&rest).into_iter().map(|(_, s)| s).collect();
    assert_eq!(sequences, vec![6], "only the step the client missed, once");
    stack.stop().await;
}

/// A resume the server cannot read the timeline for (the database failing the query) is
/// answered `service_unavailable`, and the client's position still counts: the run's next live
/// step comes alone, not after the whole run again.
#[tokio::test]
async fn a_resume_that_cannot_read_the_timeline_still_sends_nothing_twice() {
    let stack = stack(1).await;
    let (alice, id) = a_run_seen_up_to_5_by_a_lost_client(&stack).await;

    // The timeline cannot be read while the client resumes: its table is renamed away
    // (nothing is appended meanwhile; the relay's reads fail, and it starts over).
    let pool = &stack.states[0].pool;
    sqlx::query("ALTER TABLE rm_timeline RENAME TO rm_timeline_away")
        .execute(pool)
        .await
        .unwrap();
    let mut socket = stack.connect(0, &alice, None).await;
    resume_after(&mut socket, &id, 5).await;
    let answer = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("the resume was not answered")
        .unwrap()
        .unwrap();
    let answer: serde_json::Value = serde_json::from_str(answer.to_text().unwrap()).unwrap();
    assert_eq!(answer["type"], "error", "{answer}");
    assert_eq!(answer["code"], "service_unavailable", "{answer}");
    sqlx::query("ALTER TABLE rm_timeline_away RENAME TO rm_timeline")
        .execute(pool)
        .await
        .unwrap();

    stack.think(&id, "after the outage").await;
    let rest = read_steps(&mut socket, 2, Duration::from_secs(3)).await;
    let sequences: Vec<i64> = keys(&rest).into_iter().map(|(_, s)| s).collect();
    assert_eq!(sequences, vec![6], "only the step the client missed, once");
    stack.stop().await;
}

/// Alice's run whose sequences 2..=5 a client saw before it lost its connection; returns
/// Alice's token and the run.
async fn a_run_seen_up_to_5_by_a_lost_client(stack: &Stack) -> (String, String) {
    stack.agent("triage").await;
    let alice = stack.user("alice");
    let id = stack.instance(&alice, "triage").await;
    let mut first = stack.connect(0, &alice, None).await;
    start_and_think(stack, &id, 3).await;
    let seen = read_steps(&mut first, 4, Duration::from_secs(10)).await;
    assert_eq!(keys(&seen).last().map(|(_, s)| *s), Some(5));
    (alice, id)
}

/// Sends a resume message: run `id` seen up to `sequence`.
async fn resume_after(socket: &mut Socket, id: &str, sequence: i64) {
    socket
        .send(Message::Text(
            json!({"type": "resume", "instances": {id: sequence}})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
}
