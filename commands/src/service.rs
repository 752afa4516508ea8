//! The command service: the entry point the HTTP edge calls for every write.

use apex_domain::agent::{Agent, AgentCommand};
use apex_domain::instance::{Instance, InstanceAction, InstanceCommand};
use apex_domain::{AgentId, Tier};
use sqlx::PgPool;

use crate::bus::{CommandBus, RetryPolicy};
use crate::context::{CommandContext, CommandOutcome};
use crate::error::CommandError;
use crate::store;

/// Instances kept in memory between commands (per process).
const AGGREGATE_CACHE: usize = 20_000;

/// Runs Agent and Instance commands.
pub struct CommandService {
    agents: CommandBus<Agent>,
    instances: CommandBus<Instance>,
}

impl CommandService {
    /// A service over `pool`.
    pub fn new(pool: PgPool, retry: RetryPolicy) -> Self {
        Self {
            agents: CommandBus::new(store::agent_store(pool.clone()), pool.clone(), retry),
            instances: CommandBus::new(store::instance_store(pool.clone()), pool, retry)
                .with_cache(AGGREGATE_CACHE, Some(store::INSTANCE_SNAPSHOT_EVERY)),
        }
    }

    /// Runs an agent command.
    pub async fn agent(
        &self,
        command: AgentCommand,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError> {
        let id = command.id.to_string();
        let name = command.action.name();
        self.agents.execute(&id, name, command, context).await
    }

    /// Creates a run. The Agent aggregate is loaded from its own event stream (not a read
    /// model) and handed to the Instance, which decides whether the run may start.
    pub async fn create_instance(
        &self,
        instance_id: String,
        agent_id: AgentId,
        owner_tier: Tier,
        thread_id: Option<String>,
        input: String,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError> {
        let (agent, _) = self.agents.load(agent_id.as_str()).await?;
        let command = InstanceCommand {
            instance_id: instance_id.clone(),
            actor: context.actor.clone(),
            action: InstanceAction::Create {
                agent_id,
                agent: Box::new(agent),
                owner_tier,
                thread_id,
                input,
            },
        };
        self.instances
            .execute(&instance_id, "CreateInstance", command, context)
            .await
    }

    /// Runs any other instance command.
    pub async fn instance(
        &self,
        instance_id: &str,
        action: InstanceAction,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError> {
        let name = action.name();
        let command = InstanceCommand {
            instance_id: instance_id.to_owned(),
            actor: context.actor.clone(),
            action,
        };
        self.instances
            .execute(instance_id, name, command, context)
            .await
    }

    /// Loads an instance's current state (for tests and tools).
    pub async fn load_instance(&self, instance_id: &str) -> Result<(Instance, u64), CommandError> {
        self.instances.load(instance_id).await
    }

    /// Loads an agent's current state.
    pub async fn load_agent(&self, agent_id: &str) -> Result<(Agent, u64), CommandError> {
        self.agents.load(agent_id).await
    }
}
