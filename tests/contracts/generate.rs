//! A deterministic generator of domain events: it drives both aggregates through random
//! command sequences (seeded, so every run produces the same events) and keeps every event the
//! aggregates decide. Commands the rules refuse are part of the mix; they emit nothing.

use std::collections::BTreeSet;

use apex_domain::agent::{
    Agent, AgentAction, AgentCommand, AgentDefinition, AgentEvent, AgentPatch,
};
use apex_domain::instance::{Instance, InstanceAction, InstanceCommand, InstanceEvent};
use apex_domain::{Actor, ActorRole, AgentId, Tier, limits};
use cqrs_es::Aggregate;
use serde_json::{Map, Value, json};

/// SplitMix64: tiny, seedable, good enough to pick test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const TEXTS: &[&str] = &[
    "",
    "x",
    "Why did our spend double?",
    "Ünïcödé — 中文 — emoji 🚀",
    "quotes \" and \\ backslashes",
    "line\nbreaks\tand tabs",
    "null",
    "{\"looks\": \"like json\"}",
];
const TOOLS: &[&str] = &[
    "search",
    "fetch_invoices",
    "create_ticket",
    "sql:query",
    "v2.tool-x",
];
const SLUGS: &[&str] = &["triage", "data", "optimization", "reporting-2"];

fn text(rng: &mut Rng, min: usize) -> String {
    let mut s = (*rng.pick(TEXTS)).to_owned();
    if rng.chance(10) {
        s = "long ".repeat(rng.below(400) + 1);
    }
    if s.chars().count() < min {
        s.push_str("text");
    }
    s
}

fn optional_text(rng: &mut Rng) -> Option<String> {
    rng.chance(70).then(|| text(rng, 0))
}

/// Any JSON value, nested up to `depth`.
pub fn json_value(rng: &mut Rng, depth: usize) -> Value {
    let kinds = if depth == 0 { 5 } else { 7 };
    match rng.below(kinds) {
        0 => Value::Null,
        1 => Value::Bool(rng.chance(50)),
        2 => json!(rng.next() as i64),
        3 => json!((rng.next() % 1_000_000) as f64 / 7.0),
        4 => Value::String(text(rng, 0)),
        5 => Value::Array(
            (0..rng.below(4))
                .map(|_| json_value(rng, depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.below(4))
                .map(|i| (format!("k{i}"), json_value(rng, depth - 1)))
                .collect::<Map<_, _>>(),
        ),
    }
}

fn optional_json(rng: &mut Rng) -> Option<Value> {
    rng.chance(60).then(|| json_value(rng, 3))
}

fn tiers(rng: &mut Rng) -> BTreeSet<Tier> {
    Tier::ALL.into_iter().filter(|_| rng.chance(50)).collect()
}

fn tools(rng: &mut Rng) -> Vec<String> {
    TOOLS
        .iter()
        .filter(|_| rng.chance(60))
        .map(|t| (*t).to_owned())
        .collect()
}

fn definition(rng: &mut Rng) -> AgentDefinition {
    AgentDefinition {
        display_name: text(rng, 1)
            .chars()
            .take(limits::DISPLAY_NAME_MAX)
            .collect(),
        description: text(rng, 0),
        tools: tools(rng),
        tiers: tiers(rng),
    }
}

fn agent_action(rng: &mut Rng) -> AgentAction {
    match rng.below(6) {
        0 | 1 => AgentAction::Define(definition(rng)),
        2 => AgentAction::Update(AgentPatch {
            display_name: rng.chance(50).then(|| text(rng, 1)),
            description: rng.chance(50).then(|| text(rng, 0)),
            tools: rng.chance(50).then(|| tools(rng)),
            tiers: rng.chance(50).then(|| tiers(rng)),
        }),
        3 => AgentAction::Activate,
        4 => AgentAction::Disable,
        _ => AgentAction::Retire,
    }
}

/// Runs `steps` random commands on one agent; returns its final state and every event.
pub fn agent_history(rng: &mut Rng, steps: usize) -> (Agent, Vec<AgentEvent>) {
    let slug = SLUGS[rng.below(SLUGS.len())];
    let id = AgentId::parse(slug).expect("slugs are valid");
    let mut agent = Agent::default();
    let mut events = Vec::new();
    for _ in 0..steps {
        let role = if rng.chance(95) {
            ActorRole::Admin
        } else {
            ActorRole::User
        };
        let command = AgentCommand {
            id: id.clone(),
            actor: Actor::new("admin-1", role),
            action: agent_action(rng),
        };
        if let Ok(decided) = agent.decide(command) {
            for event in decided {
                agent.apply(event.clone());
                events.push(event);
            }
        }
    }
    (agent, events)
}

fn call_id(rng: &mut Rng, instance: &Instance) -> String {
    let open: Vec<&String> = instance.open_calls.keys().collect();
    if !open.is_empty() && rng.chance(70) {
        return (*rng.pick(&open)).clone();
    }
    format!("call-{}", rng.below(8))
}

fn duration_ms(rng: &mut Rng) -> Option<u64> {
    match rng.below(5) {
        0 => None,
        1 => Some(0),
        2 => Some(limits::DURATION_MS_MAX),
        _ => Some(rng.next() % 600_000),
    }
}

/// Which action to try next: mostly one the run's state allows, sometimes any (refusals).
fn instance_choice(rng: &mut Rng, instance: &Instance) -> usize {
    use apex_domain::instance::InstanceStatus;
    if rng.chance(15) {
        return rng.below(10);
    }
    match instance.status {
        _ if !instance.created => 0,
        InstanceStatus::Pending => *rng.pick(&[1, 1, 1, 9]),
        _ if !instance.open_calls.is_empty() && rng.chance(50) => 5,
        _ => *rng.pick(&[2, 2, 3, 4, 5, 6, 2, 3, 7, 8, 9]),
    }
}

fn instance_action(rng: &mut Rng, instance: &Instance, agent: &Agent) -> InstanceAction {
    match instance_choice(rng, instance) {
        0 => InstanceAction::Create {
            agent_id: AgentId::parse(&agent.id)
                .unwrap_or_else(|_| AgentId::parse("missing").expect("a valid slug")),
            agent: Box::new(agent.clone()),
            owner_tier: *rng.pick(&Tier::ALL),
            thread_id: rng.chance(50).then(|| format!("thread-{}", rng.below(100))),
            input: text(rng, 1),
        },
        1 => InstanceAction::Start {
            message: optional_text(rng),
            prompt: optional_text(rng),
        },
        2 => InstanceAction::Think {
            thought: text(rng, 1),
            prompt: optional_text(rng),
            raw: optional_json(rng),
        },
        3 | 4 => InstanceAction::StartTool {
            call_id: format!("call-{}", rng.below(8)),
            tool: if instance.tools.is_empty() || rng.chance(10) {
                (*rng.pick(TOOLS)).to_owned()
            } else {
                rng.pick(&instance.tools).clone()
            },
            summary: optional_text(rng),
            arguments: json_value(rng, 3),
        },
        5 | 6 => InstanceAction::CompleteTool {
            call_id: call_id(rng, instance),
            is_error: rng.chance(20),
            summary: optional_text(rng),
            result: json_value(rng, 3),
            duration_ms: duration_ms(rng),
        },
        7 => InstanceAction::Complete {
            output: text(rng, 1),
            raw: optional_json(rng),
        },
        8 => InstanceAction::Fail {
            error: text(rng, 1),
            raw: optional_json(rng),
        },
        _ => InstanceAction::Cancel {
            reason: optional_text(rng),
        },
    }
}

fn instance_actor(rng: &mut Rng, action: &InstanceAction) -> Actor {
    let owner = Actor::new("user-1", ActorRole::User);
    match (action, rng.below(10)) {
        (_, 0) => Actor::new("admin-1", ActorRole::Admin),
        (_, 1) => Actor::new("user-2", ActorRole::User),
        (InstanceAction::Create { .. } | InstanceAction::Cancel { .. }, _) => owner,
        _ => Actor::new("runner-1", ActorRole::Runner),
    }
}

/// Runs `steps` random commands on one instance of `agent`; returns every event.
pub fn instance_history(rng: &mut Rng, agent: &Agent, steps: usize) -> Vec<InstanceEvent> {
    let mut instance = Instance::default();
    let mut events = Vec::new();
    for _ in 0..steps {
        let action = instance_action(rng, &instance, agent);
        let command = InstanceCommand {
            instance_id: "01936f3e-8a2b-7c4d-9e10-2f3a4b5c6d7e".to_owned(),
            actor: instance_actor(rng, &action),
            action,
        };
        if let Ok(decided) = instance.decide(command) {
            for event in decided {
                instance.apply(event.clone());
                events.push(event);
            }
        }
    }
    events
}

/// An agent defined (random definition, every tier) and activated through its own rules.
fn active_agent(rng: &mut Rng) -> Agent {
    let mut definition = definition(rng);
    definition.tiers = Tier::ALL.into_iter().collect();
    if definition.tools.is_empty() {
        definition.tools = vec!["search".to_owned()];
    }
    let slug = SLUGS[rng.below(SLUGS.len())];
    let id = AgentId::parse(slug).expect("slugs are valid");
    let mut agent = Agent::default();
    for action in [AgentAction::Define(definition), AgentAction::Activate] {
        let command = AgentCommand {
            id: id.clone(),
            actor: Actor::new("admin-1", ActorRole::Admin),
            action,
        };
        for event in agent.decide(command).expect("a valid definition") {
            agent.apply(event);
        }
    }
    agent
}

/// Every event of `runs` random agent and instance histories, from one fixed seed.
pub fn events(seed: u64, runs: usize) -> (Vec<AgentEvent>, Vec<InstanceEvent>) {
    let mut rng = Rng::new(seed);
    let mut agent_events = Vec::new();
    let mut instance_events = Vec::new();
    for _ in 0..runs {
        let steps = 4 + rng.below(12);
        let (agent, events) = agent_history(&mut rng, steps);
        agent_events.extend(events);
        // Mostly an agent open to runs, sometimes the random one (runs are then refused).
        let agent = if rng.chance(80) {
            active_agent(&mut rng)
        } else {
            agent
        };
        let steps = 4 + rng.below(30);
        instance_events.extend(instance_history(&mut rng, &agent, steps));
    }
    (agent_events, instance_events)
}
