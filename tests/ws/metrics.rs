//! `/metrics` counts exactly what a scripted run did.

use std::collections::HashMap;
use std::time::Duration;

use crate::helpers::*;
use crate::metrics_text::scrape;

#[tokio::test]
async fn metrics_count_exactly_the_commands_and_events_of_a_run() {
    let stack = stack(1).await;
    stack.agent("triage").await; // 2 agent events
    let alice = stack.user("alice");
    let mut socket = stack.connect(0, &alice, None).await;
    let id = stack.instance(&alice, "triage").await;
    let steps = script(&stack, &id, 4).await; // start, 4 thoughts, tool, tool done, complete
    let received = read_steps(&mut socket, steps, Duration::from_secs(15)).await;
    assert_eq!(received.len(), steps);
    let instance_events = steps as f64 + 1.0; // + creation

    let mut m = HashMap::new();
    for _ in 0..50 {
        m = scrape(
            &stack.client,
            &format!("http://{}/metrics", stack.replicas[0]),
        )
        .await;
        // Every projector, the agents' too: its group consumes a queue of its own, at its
        // own pace.
        let caught_up = [
            ("instances", instance_events),
            ("usage", instance_events),
            ("agent_stats", instance_events),
            ("agents", 2.0),
        ]
        .iter()
        .all(|(p, events)| {
            m.get(&format!(r#"apex_projector_lag_events{{projector="{p}"}}"#)) == Some(&0.0)
                && m.get(&format!(
                    r#"apex_projector_processed_total{{projector="{p}"}}"#
                )) == Some(events)
        });
        if caught_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
    let cmd = |c: &str, o: &str| {
        let aggregate = if c.ends_with("Agent") {
            "agent"
        } else {
            "instance"
        };
        get(&format!(
            r#"apex_commands_total{{aggregate="{aggregate}",command="{c}",outcome="{o}"}}"#
        ))
    };
    assert_eq!(cmd("DefineAgent", "accepted"), 1.0);
    assert_eq!(cmd("ActivateAgent", "accepted"), 1.0);
    assert_eq!(cmd("CreateInstance", "accepted"), 1.0);
    assert_eq!(cmd("StartInstance", "accepted"), 1.0);
    assert_eq!(cmd("RecordThought", "accepted"), 4.0);
    assert_eq!(cmd("StartToolCall", "accepted"), 1.0);
    assert_eq!(cmd("CompleteToolCall", "accepted"), 1.0);
    assert_eq!(cmd("CompleteInstance", "accepted"), 1.0);
    assert_eq!(get("apex_relay_published_total"), instance_events + 2.0);
    for projector in ["instances", "usage", "agent_stats"] {
        assert_eq!(
            get(&format!(
                r#"apex_projector_processed_total{{projector="{projector}"}}"#
            )),
            instance_events,
            "{projector}"
        );
        assert_eq!(
            get(&format!(
                r#"apex_projector_lag_events{{projector="{projector}"}}"#
            )),
            0.0
        );
    }
    assert_eq!(
        get(r#"apex_projector_processed_total{projector="agents"}"#),
        2.0
    );
    // Each stage's delay is observed once per event that passed it, and is no longer than
    // the run took.
    let delays = [
        (
            "apex_relay_publish_delay_seconds".to_owned(),
            instance_events + 2.0,
        ),
        ("apex_chat_receive_delay_seconds".to_owned(), steps as f64),
        (
            r#"apex_projector_apply_delay_seconds{projector="agents"}"#.to_owned(),
            2.0,
        ),
    ]
    .into_iter()
    .chain(["instances", "usage", "agent_stats"].map(|p| {
        (
            format!(r#"apex_projector_apply_delay_seconds{{projector="{p}"}}"#),
            instance_events,
        )
    }));
    for (histogram, events) in delays {
        let (name, labels) = histogram
            .split_once('{')
            .map_or((histogram.as_str(), String::new()), |(n, l)| {
                (n, format!("{{{l}"))
            });
        assert_eq!(get(&format!("{name}_count{labels}")), events, "{histogram}");
        let mean = get(&format!("{name}_sum{labels}")) / events;
        assert!(mean > 0.0 && mean < 15.0, "{histogram}: mean {mean} s");
    }
    assert_eq!(get("apex_ws_messages_sent_total"), steps as f64);
    assert_eq!(get("apex_ws_connections"), 1.0);
    assert_eq!(
        get(
            r#"apex_http_requests_total{method="POST",route="/v1/runner/instances/{id}/thoughts",status="200"}"#
        ),
        4.0
    );
    assert!(
        get(r#"apex_http_request_duration_seconds_count{method="POST",route="/v1/instances"}"#)
            >= 1.0
    );
    stack.stop().await;
}
