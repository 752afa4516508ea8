//! Given/when/then tests of the Instance aggregate, plus the apply/replay path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use cqrs_es::event_sink::EventSink;
use cqrs_es::test::{AggregateTestExecutor, TestFramework};
use cqrs_es::{Aggregate, DomainEvent};
use serde_json::{Value, json};

use super::*;
use crate::agent::{Agent, AgentDefinition, AgentStatus};
use crate::common::{Actor, ActorRole, AgentId, Tier};
use crate::error::{DomainError, ErrorKind};
use crate::limits;

const INSTANCE: &str = "inst-1";
const OWNER: &str = "user-1";
const AGENT: &str = "triage";
const AGENT_VERSION: u32 = 7;
const INPUT: &str = "Sort my inbox";
const TOKEN_REASON: &str = "may only contain letters, digits and _ . : -";

// ---------------------------------------------------------------------------------------------
// Helpers: actors, agents, commands
// ---------------------------------------------------------------------------------------------

fn owner() -> Actor {
    Actor::new(OWNER, ActorRole::User)
}

fn other_user() -> Actor {
    Actor::new("user-2", ActorRole::User)
}

fn runner() -> Actor {
    Actor::new("runner-1", ActorRole::Runner)
}

fn admin() -> Actor {
    Actor::new("admin-1", ActorRole::Admin)
}

fn auditor() -> Actor {
    Actor::new("auditor-1", ActorRole::Auditor)
}

fn agent_tools() -> Vec<String> {
    vec!["search".to_owned(), "create_ticket".to_owned()]
}

fn agent(status: AgentStatus) -> Agent {
    Agent {
        id: AGENT.to_owned(),
        definition: Some(AgentDefinition {
            display_name: "Triage".to_owned(),
            description: String::new(),
            tools: agent_tools(),
            tiers: [Tier::Free, Tier::Mid].into_iter().collect(),
        }),
        status,
        version: AGENT_VERSION,
    }
}

fn active_agent() -> Agent {
    agent(AgentStatus::Active)
}

fn command(actor: Actor, action: InstanceAction) -> InstanceCommand {
    InstanceCommand {
        instance_id: INSTANCE.to_owned(),
        actor,
        action,
    }
}

fn by_runner(action: InstanceAction) -> InstanceCommand {
    command(runner(), action)
}

fn create_action(agent: Agent, tier: Tier, thread: Option<&str>, input: &str) -> InstanceAction {
    InstanceAction::Create {
        agent_id: AgentId::parse(AGENT).unwrap(),
        agent: Box::new(agent),
        owner_tier: tier,
        thread_id: thread.map(str::to_owned),
        input: input.to_owned(),
    }
}

fn create_with(agent: Agent) -> InstanceCommand {
    command(owner(), create_action(agent, Tier::Free, None, INPUT))
}

fn create() -> InstanceCommand {
    create_with(active_agent())
}

fn start() -> InstanceAction {
    InstanceAction::Start {
        message: Some("Working on it".to_owned()),
        prompt: Some("You are a triage agent".to_owned()),
    }
}

fn think(thought: &str) -> InstanceAction {
    InstanceAction::Think {
        thought: thought.to_owned(),
        prompt: None,
        raw: None,
    }
}

fn start_tool_with(call_id: &str, tool: &str, arguments: Value) -> InstanceAction {
    InstanceAction::StartTool {
        call_id: call_id.to_owned(),
        tool: tool.to_owned(),
        summary: Some(format!("calling {tool}")),
        arguments,
    }
}

fn start_tool(call_id: &str, tool: &str) -> InstanceAction {
    start_tool_with(call_id, tool, json!({"q": "printer"}))
}

fn complete_tool(call_id: &str) -> InstanceAction {
    InstanceAction::CompleteTool {
        call_id: call_id.to_owned(),
        is_error: false,
        summary: Some("done".to_owned()),
        result: json!({"hits": 3}),
        duration_ms: Some(42),
    }
}

fn complete(output: &str) -> InstanceAction {
    InstanceAction::Complete {
        output: output.to_owned(),
        raw: None,
    }
}

fn fail(error: &str) -> InstanceAction {
    InstanceAction::Fail {
        error: error.to_owned(),
        raw: None,
    }
}

fn cancel() -> InstanceAction {
    InstanceAction::Cancel {
        reason: Some("no longer needed".to_owned()),
    }
}

/// Every runner step, valid on a running instance with an open `call-1`.
fn runner_actions() -> Vec<InstanceAction> {
    vec![
        start(),
        think("hmm"),
        start_tool("call-9", "search"),
        complete_tool("call-1"),
        complete("done"),
        fail("boom"),
    ]
}

// ---------------------------------------------------------------------------------------------
// Helpers: events and histories
// ---------------------------------------------------------------------------------------------

fn created_with(thread_id: &str) -> InstanceEvent {
    InstanceEvent::InstanceCreated {
        owner_id: OWNER.to_owned(),
        owner_tier: Tier::Free,
        agent_id: AGENT.to_owned(),
        agent_version: AGENT_VERSION,
        tools: agent_tools(),
        thread_id: thread_id.to_owned(),
        input: INPUT.to_owned(),
    }
}

fn created() -> InstanceEvent {
    created_with(INSTANCE)
}

fn started() -> InstanceEvent {
    InstanceEvent::InstanceStarted {
        display: StartedDisplay {
            message: Some("Working on it".to_owned()),
        },
        internal: StartedInternal {
            prompt: Some("You are a triage agent".to_owned()),
        },
    }
}

fn thought_recorded(thought: &str) -> InstanceEvent {
    InstanceEvent::ThoughtRecorded {
        display: ThoughtDisplay {
            thought: thought.to_owned(),
        },
        internal: ThoughtInternal::default(),
    }
}

fn tool_started(call_id: &str, tool: &str) -> InstanceEvent {
    InstanceEvent::ToolCallStarted {
        call_id: call_id.to_owned(),
        tool: tool.to_owned(),
        display: ToolDisplay {
            summary: Some(format!("calling {tool}")),
        },
        internal: ToolCallInternal {
            arguments: json!({"q": "printer"}),
        },
    }
}

fn tool_completed(call_id: &str, tool: &str) -> InstanceEvent {
    InstanceEvent::ToolCallCompleted {
        call_id: call_id.to_owned(),
        tool: tool.to_owned(),
        is_error: false,
        display: ToolDisplay {
            summary: Some("done".to_owned()),
        },
        internal: ToolResultInternal {
            result: json!({"hits": 3}),
            duration_ms: Some(42),
        },
    }
}

fn completed(output: &str) -> InstanceEvent {
    InstanceEvent::InstanceCompleted {
        display: CompletedDisplay {
            output: output.to_owned(),
        },
        internal: RawInternal::default(),
    }
}

fn failed(error: &str) -> InstanceEvent {
    InstanceEvent::InstanceFailed {
        display: FailedDisplay {
            error: error.to_owned(),
        },
        internal: RawInternal::default(),
    }
}

fn cancelled_by(by: Actor) -> InstanceEvent {
    InstanceEvent::InstanceCancelled {
        by,
        display: CancelledDisplay {
            reason: Some("no longer needed".to_owned()),
        },
    }
}

fn pending() -> Vec<InstanceEvent> {
    vec![created()]
}

fn running() -> Vec<InstanceEvent> {
    vec![created(), started()]
}

fn running_with(more: Vec<InstanceEvent>) -> Vec<InstanceEvent> {
    let mut events = running();
    events.extend(more);
    events
}

/// Running, with `call-1` (search) open.
fn with_open_call() -> Vec<InstanceEvent> {
    running_with(vec![tool_started("call-1", "search")])
}

/// Every terminal history, with the status name it ends in.
fn terminal_histories() -> Vec<(Vec<InstanceEvent>, &'static str)> {
    vec![
        (running_with(vec![completed("done")]), "completed"),
        (running_with(vec![failed("boom")]), "failed"),
        (vec![created(), cancelled_by(owner())], "cancelled"),
        (
            running_with(vec![
                tool_started("call-1", "search"),
                cancelled_by(admin()),
            ]),
            "cancelled",
        ),
    ]
}

fn given(events: Vec<InstanceEvent>) -> AggregateTestExecutor<Instance> {
    TestFramework::<Instance>::with(()).given(events)
}

fn given_nothing() -> AggregateTestExecutor<Instance> {
    TestFramework::<Instance>::with(()).given_no_previous_events()
}

fn outcome(
    events: Vec<InstanceEvent>,
    cmd: InstanceCommand,
) -> Result<Vec<InstanceEvent>, DomainError> {
    given(events).when(cmd).inspect_result()
}

fn replay(events: Vec<InstanceEvent>) -> Instance {
    let mut instance = Instance::default();
    for event in events {
        instance.apply(event);
    }
    instance
}

fn transition(status: &'static str, action: &'static str, expected: &'static str) -> DomainError {
    DomainError::InvalidInstanceTransition {
        status,
        action,
        expected,
    }
}

fn nested(depth: usize) -> Value {
    let mut value = json!(1);
    for _ in 0..depth {
        value = json!([value]);
    }
    value
}

fn oversized() -> Value {
    json!("x".repeat(limits::INTERNAL_JSON_MAX_BYTES))
}

// ---------------------------------------------------------------------------------------------
// Create
// ---------------------------------------------------------------------------------------------

#[test]
fn creating_a_run_copies_the_agent_tools_and_version_and_uses_the_instance_id_as_thread() {
    given_nothing()
        .when(create())
        .then_expect_events(vec![created()]);
}

#[test]
fn creating_a_run_in_a_given_thread_keeps_that_thread() {
    given_nothing()
        .when(command(
            owner(),
            create_action(active_agent(), Tier::Free, Some("thread-42"), INPUT),
        ))
        .then_expect_events(vec![created_with("thread-42")]);
}

#[test]
fn creating_a_run_of_a_missing_agent_is_refused() {
    given_nothing()
        .when(create_with(Agent::default()))
        .then_expect_error(DomainError::AgentNotFound(AGENT.to_owned()));
}

#[test]
fn creating_a_run_of_an_agent_that_is_not_active_is_refused() {
    for status in [
        AgentStatus::Draft,
        AgentStatus::Disabled,
        AgentStatus::Retired,
    ] {
        let result = outcome(vec![], create_with(agent(status)));
        assert_eq!(
            result,
            Err(DomainError::AgentNotActive(AGENT.to_owned())),
            "{}",
            status.as_str()
        );
    }
}

#[test]
fn an_inactive_agent_is_reported_as_not_active_even_on_a_foreign_tier() {
    given_nothing()
        .when(command(
            owner(),
            create_action(agent(AgentStatus::Disabled), Tier::Enterprise, None, INPUT),
        ))
        .then_expect_error(DomainError::AgentNotActive(AGENT.to_owned()));
}

#[test]
fn creating_a_run_on_a_tier_the_agent_is_not_open_to_is_refused() {
    given_nothing()
        .when(command(
            owner(),
            create_action(active_agent(), Tier::Enterprise, None, INPUT),
        ))
        .then_expect_error(DomainError::TierNotAllowed {
            agent: AGENT.to_owned(),
            tier: "enterprise",
        });
}

#[test]
fn creating_a_run_on_another_allowed_tier_records_that_tier() {
    let result = outcome(
        vec![],
        command(
            owner(),
            create_action(active_agent(), Tier::Mid, None, INPUT),
        ),
    )
    .unwrap();
    assert!(matches!(
        result.as_slice(),
        [InstanceEvent::InstanceCreated {
            owner_tier: Tier::Mid,
            ..
        }]
    ));
}

#[test]
fn only_users_may_create_runs() {
    for actor in [runner(), admin(), auditor()] {
        let role = actor.role.as_str();
        let result = outcome(
            vec![],
            command(
                actor,
                create_action(active_agent(), Tier::Free, None, INPUT),
            ),
        );
        assert_eq!(result, Err(DomainError::RoleNotAllowed(role)), "{role}");
    }
}

#[test]
fn creating_a_run_that_already_exists_is_refused() {
    given(pending())
        .when(create())
        .then_expect_error(DomainError::InstanceAlreadyExists(INSTANCE.to_owned()));
    for (history, status) in terminal_histories() {
        assert_eq!(
            outcome(history, create()),
            Err(DomainError::InstanceAlreadyExists(INSTANCE.to_owned())),
            "{status}"
        );
    }
}

#[test]
fn creating_a_run_with_empty_input_is_refused() {
    given_nothing()
        .when(command(
            owner(),
            create_action(active_agent(), Tier::Free, None, ""),
        ))
        .then_expect_error(DomainError::FieldRequired { field: "input" });
}

#[test]
fn creating_a_run_with_input_over_the_limit_is_refused() {
    let at_limit = "i".repeat(limits::INPUT_MAX);
    assert!(
        outcome(
            vec![],
            command(
                owner(),
                create_action(active_agent(), Tier::Free, None, &at_limit)
            ),
        )
        .is_ok()
    );
    let over = "i".repeat(limits::INPUT_MAX + 1);
    given_nothing()
        .when(command(
            owner(),
            create_action(active_agent(), Tier::Free, None, &over),
        ))
        .then_expect_error(DomainError::FieldTooLong {
            field: "input",
            max: limits::INPUT_MAX,
        });
}

#[test]
fn creating_a_run_with_a_malformed_thread_id_is_refused() {
    let create_in = |thread: &str| {
        command(
            owner(),
            create_action(active_agent(), Tier::Free, Some(thread), INPUT),
        )
    };
    given_nothing()
        .when(create_in("thread 42"))
        .then_expect_error(DomainError::FieldInvalid {
            field: "thread_id",
            reason: TOKEN_REASON,
        });
    given_nothing()
        .when(create_in(""))
        .then_expect_error(DomainError::FieldRequired { field: "thread_id" });
    given_nothing()
        .when(create_in(&"t".repeat(limits::THREAD_ID_MAX + 1)))
        .then_expect_error(DomainError::FieldTooLong {
            field: "thread_id",
            max: limits::THREAD_ID_MAX,
        });
}

// ---------------------------------------------------------------------------------------------
// Start
// ---------------------------------------------------------------------------------------------

#[test]
fn the_runner_starts_a_pending_run() {
    given(pending())
        .when(by_runner(start()))
        .then_expect_events(vec![started()]);
}

#[test]
fn a_run_may_start_without_message_or_prompt() {
    given(pending())
        .when(by_runner(InstanceAction::Start {
            message: None,
            prompt: None,
        }))
        .then_expect_events(vec![InstanceEvent::InstanceStarted {
            display: StartedDisplay::default(),
            internal: StartedInternal::default(),
        }]);
}

#[test]
fn starting_a_running_run_is_refused() {
    given(running())
        .when(by_runner(start()))
        .then_expect_error(transition("running", "start", "pending"));
}

#[test]
fn starting_with_a_too_long_message_is_refused() {
    given(pending())
        .when(by_runner(InstanceAction::Start {
            message: Some("m".repeat(limits::DISPLAY_TEXT_MAX + 1)),
            prompt: None,
        }))
        .then_expect_error(DomainError::FieldTooLong {
            field: "message",
            max: limits::DISPLAY_TEXT_MAX,
        });
}

#[test]
fn only_the_runner_may_take_run_steps() {
    for actor in [owner(), other_user(), admin(), auditor()] {
        for action in runner_actions() {
            let name = action.name();
            let role = actor.role.as_str();
            let history = if matches!(action, InstanceAction::Start { .. }) {
                pending()
            } else {
                with_open_call()
            };
            assert_eq!(
                outcome(history, command(actor.clone(), action)),
                Err(DomainError::RoleNotAllowed(role)),
                "{role} doing {name}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Thoughts
// ---------------------------------------------------------------------------------------------

#[test]
fn a_running_run_records_a_thought() {
    given(running())
        .when(by_runner(think("Looking for similar tickets")))
        .then_expect_events(vec![thought_recorded("Looking for similar tickets")]);
}

#[test]
fn a_thought_keeps_its_internal_prompt_and_raw_output() {
    given(running())
        .when(by_runner(InstanceAction::Think {
            thought: "t".to_owned(),
            prompt: Some("p".to_owned()),
            raw: Some(json!({"tokens": 12})),
        }))
        .then_expect_events(vec![InstanceEvent::ThoughtRecorded {
            display: ThoughtDisplay {
                thought: "t".to_owned(),
            },
            internal: ThoughtInternal {
                prompt: Some("p".to_owned()),
                raw: Some(json!({"tokens": 12})),
            },
        }]);
}

#[test]
fn a_pending_run_cannot_record_a_thought() {
    given(pending())
        .when(by_runner(think("too early")))
        .then_expect_error(transition("pending", "record a thought", "running"));
}

#[test]
fn an_empty_thought_is_refused() {
    given(running())
        .when(by_runner(think("")))
        .then_expect_error(DomainError::FieldRequired { field: "thought" });
}

#[test]
fn a_too_long_thought_is_refused() {
    given(running())
        .when(by_runner(think(&"t".repeat(limits::DISPLAY_TEXT_MAX + 1))))
        .then_expect_error(DomainError::FieldTooLong {
            field: "thought",
            max: limits::DISPLAY_TEXT_MAX,
        });
}

#[test]
fn a_thought_with_too_deep_raw_output_is_refused() {
    given(running())
        .when(by_runner(InstanceAction::Think {
            thought: "t".to_owned(),
            prompt: None,
            raw: Some(nested(limits::INTERNAL_JSON_MAX_DEPTH + 1)),
        }))
        .then_expect_error(DomainError::FieldInvalid {
            field: "raw",
            reason: "nested too deeply",
        });
}

// ---------------------------------------------------------------------------------------------
// Tool calls
// ---------------------------------------------------------------------------------------------

#[test]
fn a_running_run_starts_a_tool_call_from_its_tool_list() {
    given(running())
        .when(by_runner(start_tool("call-1", "search")))
        .then_expect_events(vec![tool_started("call-1", "search")]);
}

#[test]
fn a_pending_run_cannot_start_a_tool_call() {
    given(pending())
        .when(by_runner(start_tool("call-1", "search")))
        .then_expect_error(transition("pending", "start a tool call", "running"));
}

#[test]
fn a_tool_outside_the_runs_tool_list_is_refused() {
    given(running())
        .when(by_runner(start_tool("call-1", "shell")))
        .then_expect_error(DomainError::ToolNotAllowed("shell".to_owned()));
}

#[test]
fn a_malformed_tool_name_is_refused_before_the_tool_list_is_checked() {
    given(running())
        .when(by_runner(start_tool("call-1", "rm -rf")))
        .then_expect_error(DomainError::FieldInvalid {
            field: "tool",
            reason: TOKEN_REASON,
        });
}

#[test]
fn reusing_the_id_of_an_open_tool_call_is_refused() {
    given(with_open_call())
        .when(by_runner(start_tool("call-1", "create_ticket")))
        .then_expect_error(DomainError::DuplicateCallId("call-1".to_owned()));
}

#[test]
fn reusing_the_id_of_a_completed_tool_call_is_refused() {
    given(running_with(vec![
        tool_started("call-1", "search"),
        tool_completed("call-1", "search"),
    ]))
    .when(by_runner(start_tool("call-1", "search")))
    .then_expect_error(DomainError::DuplicateCallId("call-1".to_owned()));
}

#[test]
fn a_malformed_call_id_is_refused() {
    given(running())
        .when(by_runner(start_tool("call 1", "search")))
        .then_expect_error(DomainError::FieldInvalid {
            field: "call_id",
            reason: TOKEN_REASON,
        });
    given(running())
        .when(by_runner(start_tool("", "search")))
        .then_expect_error(DomainError::FieldRequired { field: "call_id" });
    given(running())
        .when(by_runner(start_tool(
            &"c".repeat(limits::CALL_ID_MAX + 1),
            "search",
        )))
        .then_expect_error(DomainError::FieldTooLong {
            field: "call_id",
            max: limits::CALL_ID_MAX,
        });
}

#[test]
fn tool_arguments_nested_too_deeply_are_refused() {
    assert!(
        outcome(
            running(),
            by_runner(start_tool_with(
                "call-1",
                "search",
                nested(limits::INTERNAL_JSON_MAX_DEPTH)
            )),
        )
        .is_ok()
    );
    given(running())
        .when(by_runner(start_tool_with(
            "call-1",
            "search",
            nested(limits::INTERNAL_JSON_MAX_DEPTH + 1),
        )))
        .then_expect_error(DomainError::FieldInvalid {
            field: "arguments",
            reason: "nested too deeply",
        });
}

#[test]
fn tool_arguments_over_the_size_limit_are_refused() {
    given(running())
        .when(by_runner(start_tool_with("call-1", "search", oversized())))
        .then_expect_error(DomainError::FieldTooLong {
            field: "arguments",
            max: limits::INTERNAL_JSON_MAX_BYTES,
        });
}

#[test]
fn completing_an_open_tool_call_carries_the_tool_name() {
    given(running_with(vec![
        tool_started("call-1", "search"),
        tool_started("call-2", "create_ticket"),
    ]))
    .when(by_runner(InstanceAction::CompleteTool {
        call_id: "call-2".to_owned(),
        is_error: true,
        summary: None,
        result: json!({"error": "quota"}),
        duration_ms: None,
    }))
    .then_expect_events(vec![InstanceEvent::ToolCallCompleted {
        call_id: "call-2".to_owned(),
        tool: "create_ticket".to_owned(),
        is_error: true,
        display: ToolDisplay { summary: None },
        internal: ToolResultInternal {
            result: json!({"error": "quota"}),
            duration_ms: None,
        },
    }]);
}

#[test]
fn completing_an_unknown_tool_call_is_refused() {
    given(with_open_call())
        .when(by_runner(complete_tool("call-404")))
        .then_expect_error(DomainError::UnknownCallId("call-404".to_owned()));
}

#[test]
fn completing_a_tool_call_twice_is_refused() {
    given(running_with(vec![
        tool_started("call-1", "search"),
        tool_completed("call-1", "search"),
    ]))
    .when(by_runner(complete_tool("call-1")))
    .then_expect_error(DomainError::CallAlreadyCompleted("call-1".to_owned()));
}

#[test]
fn a_tool_result_over_the_size_limit_is_refused() {
    given(with_open_call())
        .when(by_runner(InstanceAction::CompleteTool {
            call_id: "call-1".to_owned(),
            is_error: false,
            summary: None,
            result: oversized(),
            duration_ms: None,
        }))
        .then_expect_error(DomainError::FieldTooLong {
            field: "result",
            max: limits::INTERNAL_JSON_MAX_BYTES,
        });
}

#[test]
fn a_tool_duration_beyond_an_exact_json_integer_is_refused() {
    let with_duration = |ms| {
        by_runner(InstanceAction::CompleteTool {
            call_id: "call-1".to_owned(),
            is_error: false,
            summary: None,
            result: json!(null),
            duration_ms: Some(ms),
        })
    };
    given(with_open_call())
        .when(with_duration(limits::DURATION_MS_MAX + 1))
        .then_expect_error(DomainError::FieldInvalid {
            field: "duration_ms",
            reason: "must be at most 9007199254740991 (2^53 - 1) milliseconds",
        });
    given(with_open_call())
        .when(with_duration(limits::DURATION_MS_MAX))
        .then_expect_events(vec![InstanceEvent::ToolCallCompleted {
            call_id: "call-1".to_owned(),
            tool: "search".to_owned(),
            is_error: false,
            display: ToolDisplay { summary: None },
            internal: ToolResultInternal {
                result: json!(null),
                duration_ms: Some(limits::DURATION_MS_MAX),
            },
        }]);
}

#[test]
fn a_pending_run_cannot_complete_a_tool_call() {
    given(pending())
        .when(by_runner(complete_tool("call-1")))
        .then_expect_error(transition("pending", "complete a tool call", "running"));
}

// ---------------------------------------------------------------------------------------------
// Complete / fail
// ---------------------------------------------------------------------------------------------

#[test]
fn completing_with_an_open_tool_call_is_refused() {
    given(with_open_call())
        .when(by_runner(complete("done")))
        .then_expect_error(DomainError::OpenToolCalls(1));
}

#[test]
fn completing_reports_how_many_tool_calls_are_open() {
    given(running_with(vec![
        tool_started("call-1", "search"),
        tool_started("call-2", "create_ticket"),
        tool_started("call-3", "search"),
        tool_completed("call-2", "create_ticket"),
    ]))
    .when(by_runner(complete("done")))
    .then_expect_error(DomainError::OpenToolCalls(2));
}

#[test]
fn completing_once_every_tool_call_is_closed_is_accepted() {
    given(running_with(vec![
        thought_recorded("let me search"),
        tool_started("call-1", "search"),
        tool_completed("call-1", "search"),
    ]))
    .when(by_runner(complete("Ticket routed to billing")))
    .then_expect_events(vec![completed("Ticket routed to billing")]);
}

#[test]
fn completing_a_run_that_called_no_tool_is_accepted() {
    given(running())
        .when(by_runner(InstanceAction::Complete {
            output: "42".to_owned(),
            raw: Some(json!({"finish": "stop"})),
        }))
        .then_expect_events(vec![InstanceEvent::InstanceCompleted {
            display: CompletedDisplay {
                output: "42".to_owned(),
            },
            internal: RawInternal {
                raw: Some(json!({"finish": "stop"})),
            },
        }]);
}

#[test]
fn completing_with_an_empty_output_is_refused() {
    given(running())
        .when(by_runner(complete("")))
        .then_expect_error(DomainError::FieldRequired { field: "output" });
}

#[test]
fn a_pending_run_cannot_complete() {
    given(pending())
        .when(by_runner(complete("done")))
        .then_expect_error(transition("pending", "complete", "running"));
}

#[test]
fn a_running_run_can_fail_even_with_open_tool_calls() {
    given(with_open_call())
        .when(by_runner(fail("model timeout")))
        .then_expect_events(vec![failed("model timeout")]);
}

#[test]
fn a_pending_run_cannot_fail() {
    given(pending())
        .when(by_runner(fail("boom")))
        .then_expect_error(transition("pending", "fail", "running"));
}

#[test]
fn failing_with_an_empty_or_too_long_error_is_refused() {
    given(running())
        .when(by_runner(fail("")))
        .then_expect_error(DomainError::FieldRequired { field: "error" });
    given(running())
        .when(by_runner(fail(&"e".repeat(limits::DISPLAY_TEXT_MAX + 1))))
        .then_expect_error(DomainError::FieldTooLong {
            field: "error",
            max: limits::DISPLAY_TEXT_MAX,
        });
}

// ---------------------------------------------------------------------------------------------
// Cancel
// ---------------------------------------------------------------------------------------------

#[test]
fn the_owner_cancels_a_pending_run() {
    given(pending())
        .when(command(owner(), cancel()))
        .then_expect_events(vec![cancelled_by(owner())]);
}

#[test]
fn the_owner_cancels_a_running_run_even_with_open_tool_calls() {
    given(with_open_call())
        .when(command(owner(), cancel()))
        .then_expect_events(vec![cancelled_by(owner())]);
}

#[test]
fn an_admin_cancels_anyones_run() {
    for history in [pending(), running()] {
        assert_eq!(
            outcome(history, command(admin(), cancel())),
            Ok(vec![cancelled_by(admin())])
        );
    }
}

#[test]
fn a_cancel_without_reason_is_accepted() {
    given(running())
        .when(command(owner(), InstanceAction::Cancel { reason: None }))
        .then_expect_events(vec![InstanceEvent::InstanceCancelled {
            by: owner(),
            display: CancelledDisplay { reason: None },
        }]);
}

#[test]
fn a_cancel_reason_over_the_limit_is_refused() {
    given(running())
        .when(command(
            owner(),
            InstanceAction::Cancel {
                reason: Some("r".repeat(limits::DISPLAY_TEXT_MAX + 1)),
            },
        ))
        .then_expect_error(DomainError::FieldTooLong {
            field: "reason",
            max: limits::DISPLAY_TEXT_MAX,
        });
}

#[test]
fn another_user_cannot_see_let_alone_cancel_a_run() {
    for history in [pending(), running()] {
        assert_eq!(
            outcome(history, command(other_user(), cancel())),
            Err(DomainError::InstanceNotFound(INSTANCE.to_owned()))
        );
    }
}

#[test]
fn another_user_gets_not_found_even_on_a_finished_run() {
    for (history, status) in terminal_histories() {
        assert_eq!(
            outcome(history, command(other_user(), cancel())),
            Err(DomainError::InstanceNotFound(INSTANCE.to_owned())),
            "{status}"
        );
    }
}

#[test]
fn the_runner_and_auditors_may_not_cancel() {
    given(running())
        .when(command(runner(), cancel()))
        .then_expect_error(DomainError::RoleNotAllowed("runner"));
    given(running())
        .when(command(auditor(), cancel()))
        .then_expect_error(DomainError::RoleNotAllowed("auditor"));
}

// ---------------------------------------------------------------------------------------------
// Terminal states and missing instances
// ---------------------------------------------------------------------------------------------

#[test]
fn every_step_on_every_terminal_state_is_refused_as_terminal() {
    for (history, status) in terminal_histories() {
        let mut commands: Vec<InstanceCommand> =
            runner_actions().into_iter().map(by_runner).collect();
        commands.push(command(owner(), cancel()));
        commands.push(command(admin(), cancel()));
        for cmd in commands {
            let name = cmd.action.name();
            let who = cmd.actor.role.as_str();
            assert_eq!(
                outcome(history.clone(), cmd),
                Err(DomainError::InstanceTerminal(status)),
                "{who} doing {name} on {status}"
            );
        }
    }
}

#[test]
fn every_step_on_a_run_that_was_never_created_is_not_found() {
    let mut commands: Vec<InstanceCommand> = runner_actions().into_iter().map(by_runner).collect();
    for actor in [owner(), admin(), runner(), auditor()] {
        commands.push(command(actor, cancel()));
    }
    for cmd in commands {
        let name = cmd.action.name();
        let who = cmd.actor.role.as_str();
        assert_eq!(
            outcome(vec![], cmd),
            Err(DomainError::InstanceNotFound(INSTANCE.to_owned())),
            "{who} doing {name}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Apply / replay
// ---------------------------------------------------------------------------------------------

#[test]
fn a_fresh_instance_is_not_created() {
    let instance = Instance::default();
    assert!(!instance.created);
    assert_eq!(instance.status, InstanceStatus::Pending);
}

#[test]
fn replaying_the_creation_gives_a_pending_run_with_the_copied_agent_data() {
    let instance = replay(vec![created_with("thread-42")]);
    assert_eq!(
        instance,
        Instance {
            created: true,
            owner_id: OWNER.to_owned(),
            owner_tier: Some(Tier::Free),
            agent_id: AGENT.to_owned(),
            agent_version: AGENT_VERSION,
            tools: agent_tools(),
            thread_id: "thread-42".to_owned(),
            status: InstanceStatus::Pending,
            open_calls: BTreeMap::new(),
            completed_calls: BTreeSet::new(),
            thoughts: 0,
        }
    );
}

#[test]
fn replaying_steps_tracks_status_open_calls_and_thoughts() {
    let instance = replay(running_with(vec![
        thought_recorded("one"),
        tool_started("call-1", "search"),
        thought_recorded("two"),
        tool_started("call-2", "create_ticket"),
        tool_completed("call-1", "search"),
        thought_recorded("three"),
    ]));
    assert_eq!(instance.status, InstanceStatus::Running);
    assert_eq!(instance.thoughts, 3);
    assert_eq!(
        instance.open_calls,
        BTreeMap::from([("call-2".to_owned(), "create_ticket".to_owned())])
    );
    assert_eq!(
        instance.completed_calls,
        BTreeSet::from(["call-1".to_owned()])
    );
}

#[test]
fn replaying_a_terminal_event_gives_the_terminal_status() {
    let cases = [
        (
            running_with(vec![completed("ok")]),
            InstanceStatus::Completed,
        ),
        (running_with(vec![failed("no")]), InstanceStatus::Failed),
        (
            vec![created(), cancelled_by(owner())],
            InstanceStatus::Cancelled,
        ),
    ];
    for (history, status) in cases {
        let instance = replay(history);
        assert_eq!(instance.status, status);
        assert!(instance.status.is_terminal());
    }
    assert!(!InstanceStatus::Pending.is_terminal());
    assert!(!InstanceStatus::Running.is_terminal());
}

#[test]
fn a_whole_run_decided_and_applied_step_by_step_ends_completed() {
    let script = [
        create(),
        by_runner(start()),
        by_runner(think("plan")),
        by_runner(start_tool("call-1", "search")),
        by_runner(start_tool("call-2", "create_ticket")),
        by_runner(complete_tool("call-2")),
        by_runner(complete_tool("call-1")),
        by_runner(think("wrap up")),
        by_runner(complete("done")),
    ];
    let mut instance = Instance::default();
    for cmd in script {
        let name = cmd.action.name();
        let events = instance
            .decide(cmd)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(events.len(), 1, "{name}");
        for event in events {
            instance.apply(event);
        }
    }
    assert_eq!(instance.status, InstanceStatus::Completed);
    assert_eq!(instance.thoughts, 2);
    assert!(instance.open_calls.is_empty());
    assert_eq!(instance.completed_calls.len(), 2);
}

#[tokio::test]
async fn handle_writes_events_to_the_sink_without_mutating_the_aggregate() {
    let mut instance = replay(running());
    let before = instance.clone();
    let sink = EventSink::<Instance>::default();
    instance
        .handle(by_runner(start_tool("call-1", "search")), &(), &sink)
        .await
        .unwrap();
    assert_eq!(
        instance, before,
        "handle must leave the aggregate as it was"
    );
    assert!(instance.open_calls.is_empty());
    assert_eq!(sink.collect().await, vec![tool_started("call-1", "search")]);
}

#[tokio::test]
async fn handle_of_a_creation_leaves_a_fresh_aggregate_fresh() {
    let mut instance = Instance::default();
    let sink = EventSink::<Instance>::default();
    instance.handle(create(), &(), &sink).await.unwrap();
    assert_eq!(instance, Instance::default());
    assert_eq!(sink.collect().await, vec![created()]);
}

#[tokio::test]
async fn applying_handled_events_once_counts_each_thought_once() {
    // The double-apply bug would show as a thought counted twice after a commit.
    let mut instance = replay(running());
    for thought in ["a", "b"] {
        let sink = EventSink::<Instance>::default();
        instance
            .handle(by_runner(think(thought)), &(), &sink)
            .await
            .unwrap();
        for event in sink.collect().await {
            instance.apply(event);
        }
    }
    assert_eq!(instance.thoughts, 2);
    assert_eq!(
        instance,
        replay(running_with(vec![
            thought_recorded("a"),
            thought_recorded("b")
        ]))
    );
}

#[tokio::test]
async fn a_refused_command_writes_nothing_and_changes_nothing() {
    let mut instance = replay(with_open_call());
    let before = instance.clone();
    let sink = EventSink::<Instance>::default();
    let result = instance
        .handle(by_runner(complete("done")), &(), &sink)
        .await;
    assert_eq!(result, Err(DomainError::OpenToolCalls(1)));
    assert_eq!(instance, before);
    assert!(sink.collect().await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Errors and events: stable names
// ---------------------------------------------------------------------------------------------

#[test]
fn instance_errors_have_stable_codes_and_kinds() {
    let cases = [
        (
            DomainError::AgentNotActive(AGENT.to_owned()),
            "agent_not_active",
            ErrorKind::Conflict,
        ),
        (
            DomainError::TierNotAllowed {
                agent: AGENT.to_owned(),
                tier: "enterprise",
            },
            "tier_not_allowed",
            ErrorKind::Forbidden,
        ),
        (
            DomainError::InstanceNotFound(INSTANCE.to_owned()),
            "instance_not_found",
            ErrorKind::NotFound,
        ),
        (
            DomainError::InstanceAlreadyExists(INSTANCE.to_owned()),
            "instance_already_exists",
            ErrorKind::Conflict,
        ),
        (
            transition("pending", "complete", "running"),
            "invalid_instance_transition",
            ErrorKind::Conflict,
        ),
        (
            DomainError::InstanceTerminal("completed"),
            "instance_terminal",
            ErrorKind::Conflict,
        ),
        (
            DomainError::ToolNotAllowed("shell".to_owned()),
            "tool_not_allowed",
            ErrorKind::Validation,
        ),
        (
            DomainError::DuplicateCallId("c".to_owned()),
            "duplicate_call_id",
            ErrorKind::Conflict,
        ),
        (
            DomainError::UnknownCallId("c".to_owned()),
            "unknown_call_id",
            ErrorKind::NotFound,
        ),
        (
            DomainError::CallAlreadyCompleted("c".to_owned()),
            "call_already_completed",
            ErrorKind::Conflict,
        ),
        (
            DomainError::OpenToolCalls(2),
            "open_tool_calls",
            ErrorKind::Conflict,
        ),
        (
            DomainError::RoleNotAllowed("runner"),
            "role_not_allowed",
            ErrorKind::Forbidden,
        ),
    ];
    for (error, code, kind) in cases {
        assert_eq!(error.code(), code, "{error}");
        assert_eq!(error.kind(), kind, "{error}");
    }
}

#[test]
fn instance_error_messages_explain_the_refusal() {
    assert_eq!(
        transition("pending", "complete", "running").to_string(),
        "instance is pending; complete needs it to be running"
    );
    assert_eq!(
        DomainError::InstanceTerminal("failed").to_string(),
        "instance is failed and accepts no further steps"
    );
    assert_eq!(
        DomainError::OpenToolCalls(2).to_string(),
        "2 tool call(s) are still open"
    );
}

#[test]
fn instance_event_types_and_routing_names_line_up() {
    let events = [
        created(),
        started(),
        thought_recorded("t"),
        tool_started("c", "search"),
        tool_completed("c", "search"),
        completed("o"),
        failed("e"),
        cancelled_by(owner()),
    ];
    let types: Vec<String> = events.iter().map(DomainEvent::event_type).collect();
    assert_eq!(types, InstanceEvent::TYPES.map(str::to_owned).to_vec());
    for event in &events {
        let expected = if event.event_type() == "ToolCallCompleted" {
            "2"
        } else {
            "1"
        };
        assert_eq!(event.event_version(), expected, "{}", event.event_type());
        assert_eq!(
            InstanceEvent::current_version(&event.event_type()),
            expected.parse().ok()
        );
        assert!(InstanceEvent::routing_name(&event.event_type()).is_some());
    }
    assert_eq!(InstanceEvent::current_version("Nope"), None);
    assert_eq!(
        InstanceEvent::routing_name("ToolCallStarted"),
        Some("tool_started")
    );
    assert_eq!(InstanceEvent::routing_name("Nope"), None);
}

#[test]
fn instance_statuses_have_wire_names() {
    let names: Vec<&str> = [
        InstanceStatus::Pending,
        InstanceStatus::Running,
        InstanceStatus::Completed,
        InstanceStatus::Failed,
        InstanceStatus::Cancelled,
    ]
    .iter()
    .map(|s| s.as_str())
    .collect();
    assert_eq!(
        names,
        ["pending", "running", "completed", "failed", "cancelled"]
    );
}
