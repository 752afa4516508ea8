//! The event store loads events stored at an old version: the cqrs-es upcasters lift them
//! before the aggregate applies them. Stored rows are never rewritten.

use apex_commands::{CommandService, RetryPolicy};
use apex_domain::ActorRole;
use apex_domain::agent::AgentAction;
use apex_domain::instance::{InstanceAction, InstanceEvent};
use apex_projections::envelope::DomainEvent;
use serde_json::json;
use uuid::Uuid;

use crate::support;

#[tokio::test]
async fn a_run_with_a_v1_tool_completion_in_its_history_still_loads_and_completes() {
    let env = support::env().await;
    env.define("triage", &["search"]).await;
    env.admin("triage", AgentAction::Activate).await;
    let id = env.create("triage").await;
    env.step(
        &id,
        ActorRole::Runner,
        InstanceAction::Start {
            message: None,
            prompt: None,
        },
    )
    .await;
    env.step(
        &id,
        ActorRole::Runner,
        InstanceAction::StartTool {
            call_id: "call-1".to_owned(),
            tool: "search".to_owned(),
            summary: None,
            arguments: json!({"q": "spend"}),
        },
    )
    .await;
    // A tool completion as a build before the v2 bump stored it.
    let v1 = json!({"ToolCallCompleted": {"call_id": "call-1", "tool": "search", "is_error": false,
        "display": {"summary": "3 rows"}, "internal": {"result": {"rows": 3}}}});
    let meta = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('instance', $1, 4, 'ToolCallCompleted', '1', $2, $3)",
    )
    .bind(&id)
    .bind(&v1)
    .bind(json!({"correlation_id": meta, "causation_id": meta, "principal": "runner-1", "principal_role": "runner"}))
    .execute(&env.pool)
    .await
    .unwrap();

    // A fresh service (no cached state) loads the history through the upcasters: the call is
    // closed, so the run may complete.
    let commands = CommandService::new(env.pool.clone(), RetryPolicy::default());
    let (instance, sequence) = commands.load_instance(&id).await.unwrap();
    assert_eq!(sequence, 4);
    assert!(instance.open_calls.is_empty(), "{instance:?}");
    assert!(instance.completed_calls.contains("call-1"));
    let ctx =
        apex_commands::CommandContext::new(apex_domain::Actor::new("runner-1", ActorRole::Runner));
    commands
        .instance(
            &id,
            InstanceAction::Complete {
                output: "done".to_owned(),
                raw: None,
            },
            &ctx,
        )
        .await
        .unwrap();

    // The row keeps its version and payload; the read side decodes it to the current type.
    let mut conn = env.pool.acquire().await.unwrap();
    let rows = apex_projections::store::aggregate_range(&mut conn, "instance", &id, 4, 4)
        .await
        .unwrap();
    drop(conn);
    assert_eq!(
        (rows[0].event_version.as_str(), &rows[0].payload),
        ("1", &v1)
    );
    let DomainEvent::Instance(InstanceEvent::ToolCallCompleted { internal, .. }) =
        rows[0].decode().unwrap()
    else {
        panic!("not a tool completion");
    };
    assert_eq!(
        (internal.result, internal.duration_ms),
        (json!({"rows": 3}), None)
    );
    env.finish().await;
}
