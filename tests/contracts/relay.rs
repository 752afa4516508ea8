//! Real messages, published by the real relay to RabbitMQ, match the envelope schema and the
//! schema their `dataschema` names.

use std::collections::BTreeSet;
use std::time::Duration;

use apex_domain::ActorRole;
use apex_domain::agent::{AgentAction, AgentPatch};
use apex_domain::instance::InstanceAction;
use apex_projections::amqp;
use apex_projections::projector::ProjectorConfig;
use apex_projections::relay::{self, RelayConfig};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::catalog::{self, AGGREGATES};
use crate::support::{self, Env};

/// Stores at least one event of every type, through the command service.
async fn every_kind_of_event(env: &Env) {
    env.define("triage", &["search", "fetch"]).await;
    let patch = AgentPatch {
        description: Some("Finds where the spend goes.".to_owned()),
        ..AgentPatch::default()
    };
    env.admin("triage", AgentAction::Update(patch)).await;
    env.admin("triage", AgentAction::Activate).await;
    let runner = ActorRole::Runner;
    let completed = env.create("triage").await;
    for action in [
        InstanceAction::Start {
            message: Some("on it".to_owned()),
            prompt: Some("system".to_owned()),
        },
        InstanceAction::Think {
            thought: "compare models".to_owned(),
            prompt: None,
            raw: Some(json!({"t": 1})),
        },
        InstanceAction::StartTool {
            call_id: "call-1".to_owned(),
            tool: "search".to_owned(),
            summary: Some("searching".to_owned()),
            arguments: json!({"q": "spend"}),
        },
        InstanceAction::CompleteTool {
            call_id: "call-1".to_owned(),
            is_error: false,
            summary: Some("3 rows".to_owned()),
            result: json!({"rows": 3}),
            duration_ms: Some(1834),
        },
        InstanceAction::StartTool {
            call_id: "call-2".to_owned(),
            tool: "fetch".to_owned(),
            summary: None,
            arguments: json!(null),
        },
        InstanceAction::CompleteTool {
            call_id: "call-2".to_owned(),
            is_error: true,
            summary: None,
            result: json!("timeout"),
            duration_ms: None,
        },
        InstanceAction::Complete {
            output: "gpt-large is 81% of spend".to_owned(),
            raw: None,
        },
    ] {
        env.step(&completed, runner, action).await;
    }
    let failed = env.create("triage").await;
    env.step(
        &failed,
        runner,
        InstanceAction::Start {
            message: None,
            prompt: None,
        },
    )
    .await;
    env.step(
        &failed,
        runner,
        InstanceAction::Fail {
            error: "no data".to_owned(),
            raw: None,
        },
    )
    .await;
    let cancelled = env.create("triage").await;
    env.step(
        &cancelled,
        ActorRole::User,
        InstanceAction::Cancel {
            reason: Some("later".to_owned()),
        },
    )
    .await;
    env.admin("triage", AgentAction::Disable).await;
    env.admin("triage", AgentAction::Retire).await;
}

/// Checks one delivery; returns its CloudEvents `type`.
fn check(delivery: &Delivery, envelope: &jsonschema::Validator) -> String {
    let body: Value = serde_json::from_slice(&delivery.data).unwrap();
    let errors = catalog::errors(envelope, &body);
    assert!(errors.is_empty(), "envelope: {errors:#?}\n{body:#}");
    let kind = body["type"].as_str().unwrap().to_owned();
    let path = body["dataschema"]
        .as_str()
        .unwrap()
        .strip_prefix("apex:event_schemas/")
        .expect("dataschema names a file in event_schemas/");
    let schema = catalog::read_json(&catalog::root().join(path));
    let errors = catalog::errors(&catalog::validator(&schema), &body["data"]);
    assert!(errors.is_empty(), "{path}: {errors:#?}\n{body:#}");
    // Routing key and AMQP properties agree with the body.
    let (aggregate, name) = path
        .trim_end_matches(".json")
        .rsplit_once(".v")
        .unwrap()
        .0
        .split_once('/')
        .unwrap();
    assert_eq!(delivery.routing_key.as_str(), format!("{aggregate}.{name}"));
    let props = &delivery.properties;
    assert_eq!(
        props.content_type().as_ref().map(|s| s.as_str()),
        Some("application/cloudevents+json")
    );
    assert_eq!(
        props.kind().as_ref().map(|s| s.as_str()),
        Some(kind.as_str())
    );
    assert_eq!(
        props.message_id().as_ref().map(|s| s.as_str()),
        body["id"].as_str()
    );
    kind
}

#[tokio::test]
async fn messages_the_relay_publishes_match_the_envelope_and_their_dataschema() {
    let env = support::env().await;
    let amqp_config = env.settings.amqp.config();
    let exchange = amqp_config.exchange.clone();
    let connection = amqp::connect(&amqp_config, "apex-contract-test")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    amqp::declare_exchange(&channel, &exchange).await.unwrap();
    let tap = format!("apex.test.{}.contracts", env.id);
    amqp::declare_bound_queue(&channel, &exchange, &tap, amqp::QueueType::Classic, &["#"])
        .await
        .unwrap();

    every_kind_of_event(&env).await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&env.pool)
        .await
        .unwrap();

    let mut config = RelayConfig::new(amqp_config.clone());
    config.name = format!("contracts-{}", &env.id[..8]);
    config.poll_interval = Duration::from_millis(100);
    config.projector_queue_prefix = format!("apex.test.{}.projector", env.id);
    let (shutdown, _) = watch::channel(false);
    let relay = tokio::spawn(relay::run(
        env.pool.clone(),
        config.clone(),
        shutdown.subscribe(),
    ));

    let envelope = catalog::validator(&catalog::envelope_schema());
    let mut consumer = channel
        .basic_consume(
            tap.as_str().into(),
            "contracts".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut kinds = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while (kinds.len() as i64) < stored {
        let Ok(Some(Ok(delivery))) = tokio::time::timeout_at(deadline, consumer.next()).await
        else {
            break;
        };
        kinds.push(check(&delivery, &envelope));
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(kinds.len() as i64, stored, "messages received: {kinds:?}");
    let seen: BTreeSet<&str> = kinds.iter().map(String::as_str).collect();
    for (aggregate, types) in AGGREGATES {
        for event_type in types {
            let name = catalog::routing_name(aggregate, event_type).unwrap();
            let version = apex_domain::upcast::current_version(aggregate, event_type).unwrap();
            let kind = format!("apex.{aggregate}.{name}.v{version}");
            assert!(
                seen.contains(kind.as_str()),
                "no {kind} message among {seen:?}"
            );
        }
    }

    let _ = shutdown.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), relay).await;
    let projectors = ProjectorConfig {
        queue_prefix: config.projector_queue_prefix.clone(),
        ..ProjectorConfig::new(amqp_config)
    };
    let mut queues = vec![tap];
    queues.extend(projectors.queues());
    for queue in queues {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = connection.close(200, "contract test done".into()).await;
    env.finish().await;
}
