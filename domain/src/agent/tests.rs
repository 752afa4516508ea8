//! Given/when/then tests of the Agent aggregate, plus the apply/replay path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use cqrs_es::test::{AggregateTestExecutor, TestFramework};

use super::{
    Agent, AgentAction, AgentCommand, AgentDefinition, AgentEvent, AgentPatch, AgentStatus,
};
use crate::common::{Actor, ActorRole, AgentId, Tier};
use crate::error::{DomainError, ErrorKind};
use crate::limits;

const AGENT: &str = "triage";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn given(events: Vec<AgentEvent>) -> AggregateTestExecutor<Agent> {
    TestFramework::<Agent>::with(()).given(events)
}

fn given_nothing() -> AggregateTestExecutor<Agent> {
    TestFramework::<Agent>::with(()).given_no_previous_events()
}

fn command_as(role: ActorRole, action: AgentAction) -> AgentCommand {
    AgentCommand {
        id: AgentId::parse(AGENT).unwrap(),
        actor: Actor::new(format!("{}-1", role.as_str()), role),
        action,
    }
}

fn command(action: AgentAction) -> AgentCommand {
    command_as(ActorRole::Admin, action)
}

fn tiers(list: &[Tier]) -> BTreeSet<Tier> {
    list.iter().copied().collect()
}

fn tools(list: &[&str]) -> Vec<String> {
    list.iter().map(|t| (*t).to_owned()).collect()
}

fn definition() -> AgentDefinition {
    AgentDefinition {
        display_name: "Triage".to_owned(),
        description: "Sorts incoming tickets".to_owned(),
        tools: tools(&["search", "create_ticket"]),
        tiers: tiers(&[Tier::Free, Tier::Mid]),
    }
}

fn define(definition: AgentDefinition) -> AgentCommand {
    command(AgentAction::Define(definition))
}

fn update(patch: AgentPatch) -> AgentCommand {
    command(AgentAction::Update(patch))
}

fn rename(display_name: &str) -> AgentPatch {
    AgentPatch {
        display_name: Some(display_name.to_owned()),
        ..AgentPatch::default()
    }
}

fn defined() -> AgentEvent {
    let d = definition();
    AgentEvent::AgentDefined {
        agent_id: AGENT.to_owned(),
        display_name: d.display_name,
        description: d.description,
        tools: d.tools,
        tiers: d.tiers,
        version: 1,
    }
}

fn updated(definition: AgentDefinition, version: u32) -> AgentEvent {
    AgentEvent::AgentUpdated {
        display_name: definition.display_name,
        description: definition.description,
        tools: definition.tools,
        tiers: definition.tiers,
        version,
    }
}

fn activated(version: u32) -> AgentEvent {
    AgentEvent::AgentActivated { version }
}

fn disabled(version: u32) -> AgentEvent {
    AgentEvent::AgentDisabled { version }
}

fn retired(version: u32) -> AgentEvent {
    AgentEvent::AgentRetired { version }
}

/// Histories ending in draft, active, disabled and retired, each with its last version.
fn draft_history() -> Vec<AgentEvent> {
    vec![defined()]
}

fn active_history() -> Vec<AgentEvent> {
    vec![defined(), activated(2)]
}

fn disabled_history() -> Vec<AgentEvent> {
    vec![defined(), activated(2), disabled(3)]
}

fn retired_history() -> Vec<AgentEvent> {
    vec![defined(), activated(2), retired(3)]
}

fn replay(events: Vec<AgentEvent>) -> Agent {
    let mut agent = Agent::default();
    for event in events {
        agent.apply(event);
    }
    agent
}

fn invalid_transition(from: &'static str, to: &'static str) -> DomainError {
    DomainError::InvalidAgentTransition { from, to }
}

fn retired_error() -> DomainError {
    DomainError::AgentRetired(AGENT.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Define
// ---------------------------------------------------------------------------------------------

#[test]
fn defining_a_new_agent_records_it_in_draft_at_version_one() {
    given_nothing()
        .when(define(definition()))
        .then_expect_events(vec![defined()]);
}

#[test]
fn an_agent_may_be_defined_without_tools_and_without_a_description() {
    let bare = AgentDefinition {
        display_name: "Bare".to_owned(),
        description: String::new(),
        tools: vec![],
        tiers: tiers(&[Tier::Enterprise]),
    };
    given_nothing()
        .when(define(bare))
        .then_expect_events(vec![AgentEvent::AgentDefined {
            agent_id: AGENT.to_owned(),
            display_name: "Bare".to_owned(),
            description: String::new(),
            tools: vec![],
            tiers: tiers(&[Tier::Enterprise]),
            version: 1,
        }]);
}

#[test]
fn defining_an_agent_that_already_exists_is_refused() {
    for history in [draft_history(), active_history(), disabled_history()] {
        given(history)
            .when(define(definition()))
            .then_expect_error(DomainError::AgentAlreadyExists(AGENT.to_owned()));
    }
}

#[test]
fn defining_over_a_retired_agent_is_refused_because_the_id_stays_taken() {
    given(retired_history())
        .when(define(definition()))
        .then_expect_error(DomainError::AgentAlreadyExists(AGENT.to_owned()));
}

#[test]
fn defining_with_an_empty_display_name_is_refused() {
    let d = AgentDefinition {
        display_name: String::new(),
        ..definition()
    };
    given_nothing()
        .when(define(d))
        .then_expect_error(DomainError::FieldRequired {
            field: "display_name",
        });
}

#[test]
fn a_display_name_at_the_limit_is_accepted_and_one_over_is_refused() {
    let at_limit = AgentDefinition {
        display_name: "n".repeat(limits::DISPLAY_NAME_MAX),
        ..definition()
    };
    assert!(
        given_nothing()
            .when(define(at_limit))
            .inspect_result()
            .is_ok()
    );

    let over = AgentDefinition {
        display_name: "n".repeat(limits::DISPLAY_NAME_MAX + 1),
        ..definition()
    };
    given_nothing()
        .when(define(over))
        .then_expect_error(DomainError::FieldTooLong {
            field: "display_name",
            max: limits::DISPLAY_NAME_MAX,
        });
}

#[test]
fn defining_with_a_too_long_description_is_refused() {
    let d = AgentDefinition {
        description: "d".repeat(limits::DESCRIPTION_MAX + 1),
        ..definition()
    };
    given_nothing()
        .when(define(d))
        .then_expect_error(DomainError::FieldTooLong {
            field: "description",
            max: limits::DESCRIPTION_MAX,
        });
}

#[test]
fn defining_with_a_duplicate_tool_is_refused() {
    let d = AgentDefinition {
        tools: tools(&["search", "create_ticket", "search"]),
        ..definition()
    };
    given_nothing()
        .when(define(d))
        .then_expect_error(DomainError::FieldInvalid {
            field: "tools",
            reason: "must not repeat a tool",
        });
}

#[test]
fn defining_with_a_malformed_tool_name_is_refused() {
    let d = AgentDefinition {
        tools: tools(&["search", "rm -rf"]),
        ..definition()
    };
    given_nothing()
        .when(define(d))
        .then_expect_error(DomainError::FieldInvalid {
            field: "tools",
            reason: "may only contain letters, digits and _ . : -",
        });
}

#[test]
fn defining_with_an_empty_or_too_long_tool_name_is_refused() {
    let empty = AgentDefinition {
        tools: tools(&[""]),
        ..definition()
    };
    given_nothing()
        .when(define(empty))
        .then_expect_error(DomainError::FieldRequired { field: "tools" });

    let long = AgentDefinition {
        tools: vec!["t".repeat(limits::TOOL_NAME_MAX + 1)],
        ..definition()
    };
    given_nothing()
        .when(define(long))
        .then_expect_error(DomainError::FieldTooLong {
            field: "tools",
            max: limits::TOOL_NAME_MAX,
        });
}

#[test]
fn defining_with_more_tools_than_the_limit_is_refused() {
    let many = |n: usize| AgentDefinition {
        tools: (0..n).map(|i| format!("tool_{i}")).collect(),
        ..definition()
    };
    assert!(
        given_nothing()
            .when(define(many(limits::TOOLS_MAX)))
            .inspect_result()
            .is_ok()
    );
    given_nothing()
        .when(define(many(limits::TOOLS_MAX + 1)))
        .then_expect_error(DomainError::FieldTooLong {
            field: "tools",
            max: limits::TOOLS_MAX,
        });
}

#[test]
fn defining_with_no_tier_is_refused() {
    let d = AgentDefinition {
        tiers: BTreeSet::new(),
        ..definition()
    };
    given_nothing()
        .when(define(d))
        .then_expect_error(DomainError::FieldRequired { field: "tiers" });
}

// ---------------------------------------------------------------------------------------------
// Roles
// ---------------------------------------------------------------------------------------------

fn every_action() -> Vec<AgentAction> {
    vec![
        AgentAction::Define(definition()),
        AgentAction::Update(rename("Renamed")),
        AgentAction::Activate,
        AgentAction::Disable,
        AgentAction::Retire,
    ]
}

#[test]
fn only_admins_may_act_on_agents_whatever_the_action_or_state() {
    let histories = [
        vec![],
        draft_history(),
        active_history(),
        disabled_history(),
        retired_history(),
    ];
    for role in [ActorRole::User, ActorRole::Runner, ActorRole::Auditor] {
        for history in &histories {
            for action in every_action() {
                let name = action.name();
                let result = given(history.clone())
                    .when(command_as(role, action))
                    .inspect_result();
                assert_eq!(
                    result,
                    Err(DomainError::RoleNotAllowed(role.as_str())),
                    "{} doing {name} after {} events",
                    role.as_str(),
                    history.len()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Update
// ---------------------------------------------------------------------------------------------

#[test]
fn updating_bumps_the_version_and_carries_the_full_new_definition() {
    let expected = AgentDefinition {
        display_name: "Ticket triage".to_owned(),
        ..definition()
    };
    given(draft_history())
        .when(update(rename("Ticket triage")))
        .then_expect_events(vec![updated(expected, 2)]);
}

#[test]
fn updating_every_field_at_once_replaces_the_whole_definition() {
    let next = AgentDefinition {
        display_name: "Support".to_owned(),
        description: String::new(),
        tools: tools(&["lookup"]),
        tiers: tiers(&[Tier::Enterprise]),
    };
    let patch = AgentPatch {
        display_name: Some(next.display_name.clone()),
        description: Some(next.description.clone()),
        tools: Some(next.tools.clone()),
        tiers: Some(next.tiers.clone()),
    };
    given(disabled_history())
        .when(update(patch))
        .then_expect_events(vec![updated(next, 4)]);
}

#[test]
fn updating_an_active_agent_keeps_counting_versions() {
    let expected = AgentDefinition {
        tools: vec![],
        ..definition()
    };
    let patch = AgentPatch {
        tools: Some(vec![]),
        ..AgentPatch::default()
    };
    given(active_history())
        .when(update(patch))
        .then_expect_events(vec![updated(expected, 3)]);
}

#[test]
fn an_update_naming_no_field_is_refused() {
    given(draft_history())
        .when(update(AgentPatch::default()))
        .then_expect_error(DomainError::EmptyUpdate);
}

#[test]
fn an_update_that_changes_nothing_records_no_event() {
    let same = AgentPatch {
        display_name: Some(definition().display_name),
        tiers: Some(definition().tiers),
        ..AgentPatch::default()
    };
    given(active_history())
        .when(update(same))
        .then_expect_events(vec![]);
}

#[test]
fn an_update_that_breaks_a_limit_is_refused() {
    let no_tiers = AgentPatch {
        tiers: Some(BTreeSet::new()),
        ..AgentPatch::default()
    };
    given(draft_history())
        .when(update(no_tiers))
        .then_expect_error(DomainError::FieldRequired { field: "tiers" });

    given(draft_history())
        .when(update(rename("")))
        .then_expect_error(DomainError::FieldRequired {
            field: "display_name",
        });

    let repeated = AgentPatch {
        tools: Some(tools(&["a", "a"])),
        ..AgentPatch::default()
    };
    given(draft_history())
        .when(update(repeated))
        .then_expect_error(DomainError::FieldInvalid {
            field: "tools",
            reason: "must not repeat a tool",
        });
}

#[test]
fn updating_a_retired_agent_is_refused() {
    given(retired_history())
        .when(update(rename("Again")))
        .then_expect_error(retired_error());
    // Retirement is reported before the patch is even looked at.
    given(retired_history())
        .when(update(AgentPatch::default()))
        .then_expect_error(retired_error());
}

#[test]
fn updating_a_missing_agent_is_refused() {
    given_nothing()
        .when(update(rename("Ghost")))
        .then_expect_error(DomainError::AgentNotFound(AGENT.to_owned()));
}

// ---------------------------------------------------------------------------------------------
// Activate / disable / retire
// ---------------------------------------------------------------------------------------------

#[test]
fn a_draft_agent_can_be_activated() {
    given(draft_history())
        .when(command(AgentAction::Activate))
        .then_expect_events(vec![activated(2)]);
}

#[test]
fn a_disabled_agent_can_be_activated_again() {
    given(disabled_history())
        .when(command(AgentAction::Activate))
        .then_expect_events(vec![activated(4)]);
}

#[test]
fn activating_an_active_agent_is_an_invalid_transition() {
    given(active_history())
        .when(command(AgentAction::Activate))
        .then_expect_error(invalid_transition("active", "active"));
}

#[test]
fn an_active_agent_can_be_disabled() {
    given(active_history())
        .when(command(AgentAction::Disable))
        .then_expect_events(vec![disabled(3)]);
}

#[test]
fn disabling_a_draft_agent_is_an_invalid_transition() {
    given(draft_history())
        .when(command(AgentAction::Disable))
        .then_expect_error(invalid_transition("draft", "disabled"));
}

#[test]
fn disabling_a_disabled_agent_is_an_invalid_transition() {
    given(disabled_history())
        .when(command(AgentAction::Disable))
        .then_expect_error(invalid_transition("disabled", "disabled"));
}

#[test]
fn a_draft_agent_can_be_retired() {
    given(draft_history())
        .when(command(AgentAction::Retire))
        .then_expect_events(vec![retired(2)]);
}

#[test]
fn an_active_agent_can_be_retired() {
    given(active_history())
        .when(command(AgentAction::Retire))
        .then_expect_events(vec![retired(3)]);
}

#[test]
fn a_disabled_agent_can_be_retired() {
    given(disabled_history())
        .when(command(AgentAction::Retire))
        .then_expect_events(vec![retired(4)]);
}

#[test]
fn a_retired_agent_accepts_no_change() {
    for action in [
        AgentAction::Update(rename("Again")),
        AgentAction::Activate,
        AgentAction::Disable,
        AgentAction::Retire,
    ] {
        let name = action.name();
        let result = given(retired_history())
            .when(command(action))
            .inspect_result();
        assert_eq!(result, Err(retired_error()), "{name}");
    }
}

#[test]
fn a_draft_agent_retired_straight_away_also_accepts_no_change() {
    given(vec![defined(), retired(2)])
        .when(command(AgentAction::Activate))
        .then_expect_error(retired_error());
}

#[test]
fn lifecycle_commands_on_a_missing_agent_are_refused() {
    for action in [
        AgentAction::Activate,
        AgentAction::Disable,
        AgentAction::Retire,
    ] {
        let name = action.name();
        let result = given_nothing().when(command(action)).inspect_result();
        assert_eq!(
            result,
            Err(DomainError::AgentNotFound(AGENT.to_owned())),
            "{name}"
        );
    }
}

#[test]
fn every_accepted_change_bumps_the_version_by_one() {
    let script = [
        AgentAction::Define(definition()),
        AgentAction::Update(rename("v2")),
        AgentAction::Activate,
        AgentAction::Update(rename("v4")),
        AgentAction::Disable,
        AgentAction::Activate,
        AgentAction::Disable,
        AgentAction::Retire,
    ];
    let mut agent = Agent::default();
    for (i, action) in script.into_iter().enumerate() {
        let events = agent.decide(command(action)).unwrap();
        assert_eq!(events.len(), 1);
        for event in events {
            agent.apply(event);
        }
        assert_eq!(agent.version, u32::try_from(i + 1).unwrap());
    }
    assert_eq!(agent.status, AgentStatus::Retired);
    assert_eq!(agent.version, 8);
}

// ---------------------------------------------------------------------------------------------
// Apply / replay
// ---------------------------------------------------------------------------------------------

#[test]
fn a_fresh_aggregate_does_not_exist() {
    let agent = Agent::default();
    assert!(!agent.exists());
    assert_eq!(agent.version, 0);
    assert!(!agent.open_to(Tier::Free));
}

#[test]
fn replaying_the_definition_gives_a_draft_agent() {
    let agent = replay(draft_history());
    assert!(agent.exists());
    assert_eq!(agent.id, AGENT);
    assert_eq!(agent.status, AgentStatus::Draft);
    assert_eq!(agent.version, 1);
    assert_eq!(agent.definition, Some(definition()));
    assert!(!agent.open_to(Tier::Free), "a draft is open to nobody");
}

#[test]
fn replaying_lifecycle_events_tracks_status_and_version() {
    let cases = [
        (active_history(), AgentStatus::Active, 2),
        (disabled_history(), AgentStatus::Disabled, 3),
        (retired_history(), AgentStatus::Retired, 3),
    ];
    for (history, status, version) in cases {
        let agent = replay(history);
        assert_eq!(agent.status, status);
        assert_eq!(agent.version, version);
    }
}

#[test]
fn an_active_agent_is_open_only_to_its_tiers() {
    let agent = replay(active_history());
    assert!(agent.open_to(Tier::Free));
    assert!(agent.open_to(Tier::Mid));
    assert!(!agent.open_to(Tier::Early));
    assert!(!agent.open_to(Tier::Enterprise));
    assert!(!replay(disabled_history()).open_to(Tier::Free));
    assert!(!replay(retired_history()).open_to(Tier::Free));
}

#[test]
fn replaying_an_update_replaces_the_definition_and_keeps_the_status() {
    let next = AgentDefinition {
        display_name: "Next".to_owned(),
        tiers: tiers(&[Tier::Early]),
        ..definition()
    };
    let mut history = active_history();
    history.push(updated(next.clone(), 3));
    let agent = replay(history);
    assert_eq!(agent.definition, Some(next));
    assert_eq!(agent.status, AgentStatus::Active);
    assert_eq!(agent.version, 3);
    assert!(agent.open_to(Tier::Early));
    assert!(!agent.open_to(Tier::Free));
}

#[tokio::test]
async fn handle_writes_events_to_the_sink_without_mutating_the_aggregate() {
    let mut agent = replay(active_history());
    let before = agent.clone();
    let sink = EventSink::<Agent>::default();
    agent
        .handle(command(AgentAction::Disable), &(), &sink)
        .await
        .unwrap();
    assert_eq!(agent, before, "handle must leave the aggregate as it was");
    assert_eq!(sink.collect().await, vec![disabled(3)]);
}

#[tokio::test]
async fn handle_of_a_definition_leaves_a_fresh_aggregate_fresh() {
    let mut agent = Agent::default();
    let sink = EventSink::<Agent>::default();
    agent
        .handle(define(definition()), &(), &sink)
        .await
        .unwrap();
    assert_eq!(agent, Agent::default());
    assert!(!agent.exists());
    assert_eq!(sink.collect().await, vec![defined()]);
}

#[tokio::test]
async fn a_refused_command_writes_nothing_and_changes_nothing() {
    let mut agent = replay(draft_history());
    let before = agent.clone();
    let sink = EventSink::<Agent>::default();
    let result = agent
        .handle(command(AgentAction::Disable), &(), &sink)
        .await;
    assert_eq!(result, Err(invalid_transition("draft", "disabled")));
    assert_eq!(agent, before);
    assert!(sink.collect().await.is_empty());
}

#[tokio::test]
async fn applying_the_handled_events_once_gives_the_replayed_state() {
    // What the store does after handle: apply each committed event exactly once.
    let mut agent = replay(active_history());
    let sink = EventSink::<Agent>::default();
    agent
        .handle(update(rename("Once")), &(), &sink)
        .await
        .unwrap();
    for event in sink.collect().await {
        agent.apply(event);
    }
    let mut expected_history = active_history();
    expected_history.push(updated(
        AgentDefinition {
            display_name: "Once".to_owned(),
            ..definition()
        },
        3,
    ));
    assert_eq!(agent, replay(expected_history));
    assert_eq!(agent.version, 3);
}

// ---------------------------------------------------------------------------------------------
// Errors and events: stable names
// ---------------------------------------------------------------------------------------------

#[test]
fn agent_errors_have_stable_codes_and_kinds() {
    let cases = [
        (
            DomainError::FieldRequired { field: "tiers" },
            "field_required",
            ErrorKind::Validation,
        ),
        (
            DomainError::FieldTooLong {
                field: "description",
                max: 1,
            },
            "field_too_long",
            ErrorKind::Validation,
        ),
        (
            DomainError::FieldInvalid {
                field: "tools",
                reason: "x",
            },
            "field_invalid",
            ErrorKind::Validation,
        ),
        (
            DomainError::EmptyUpdate,
            "empty_update",
            ErrorKind::Validation,
        ),
        (
            DomainError::AgentNotFound(AGENT.to_owned()),
            "agent_not_found",
            ErrorKind::NotFound,
        ),
        (
            DomainError::AgentAlreadyExists(AGENT.to_owned()),
            "agent_already_exists",
            ErrorKind::Conflict,
        ),
        (
            invalid_transition("draft", "disabled"),
            "invalid_agent_transition",
            ErrorKind::Conflict,
        ),
        (retired_error(), "agent_retired", ErrorKind::Conflict),
        (
            DomainError::RoleNotAllowed("user"),
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
fn agent_error_messages_name_the_agent_and_the_transition() {
    assert_eq!(
        invalid_transition("draft", "disabled").to_string(),
        "agent cannot go from draft to disabled"
    );
    assert_eq!(retired_error().to_string(), "agent triage is retired");
}

#[test]
fn agent_event_types_and_routing_names_line_up() {
    use cqrs_es::DomainEvent;
    let events = [
        defined(),
        updated(definition(), 2),
        activated(2),
        disabled(3),
        retired(4),
    ];
    let types: Vec<String> = events.iter().map(DomainEvent::event_type).collect();
    assert_eq!(types, AgentEvent::TYPES.map(str::to_owned).to_vec());
    for event in &events {
        assert_eq!(event.event_version(), "1");
        assert!(AgentEvent::routing_name(&event.event_type()).is_some());
    }
    assert_eq!(AgentEvent::routing_name("AgentDefined"), Some("defined"));
    assert_eq!(AgentEvent::routing_name("Nope"), None);
}

#[test]
fn agent_statuses_and_actions_have_wire_names() {
    let statuses = [
        AgentStatus::Draft,
        AgentStatus::Active,
        AgentStatus::Disabled,
        AgentStatus::Retired,
    ];
    let names: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
    assert_eq!(names, ["draft", "active", "disabled", "retired"]);
    assert_eq!(AgentStatus::default(), AgentStatus::Draft);
    let actions: Vec<&str> = every_action().iter().map(AgentAction::name).collect();
    assert_eq!(
        actions,
        [
            "DefineAgent",
            "UpdateAgent",
            "ActivateAgent",
            "DisableAgent",
            "RetireAgent"
        ]
    );
}
