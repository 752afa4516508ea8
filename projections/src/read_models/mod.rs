//! The read models and how each event changes them.
//!
//! Each read model but the timeline is fed by the projector group of its aggregate type (one
//! queue per group, offsets per read model). `apply` runs inside the read model's transaction,
//! together with the offset bookkeeping, so an event is applied to a read model exactly once or
//! not at all. The timeline is written by the appends themselves (`apex_commands::inline`);
//! its `apply` here serves its rebuild.

mod agent_stats;
mod agents;
mod instances;
mod timeline;
mod usage;

use std::fmt;
use std::str::FromStr;

use sqlx::PgConnection;

use crate::envelope::{DomainEvent, StoredEvent};

pub use timeline::{TimelineEntry, timeline_entry};

/// A read model (see `ProjectorGroup::of` for the group that maintains it, if any).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReadModel {
    /// `rm_agents`: the agent catalogue.
    Agents,
    /// `rm_instances`: one summary per run.
    Instances,
    /// `rm_timeline`: the chat timeline (display fields only).
    Timeline,
    /// `rm_agent_stats`: run statistics per agent.
    AgentStats,
    /// `rm_usage`: usage per user.
    Usage,
}

impl ReadModel {
    /// Every read model.
    pub const ALL: [ReadModel; 5] = [
        ReadModel::Agents,
        ReadModel::Instances,
        ReadModel::Timeline,
        ReadModel::AgentStats,
        ReadModel::Usage,
    ];

    /// The read model's name (its rows in `projector_status`, `projector_offsets` and
    /// `dead_letters`, its dead-letter queue `apex.projector.<name>.dlq`).
    pub fn name(self) -> &'static str {
        match self {
            ReadModel::Agents => "agents",
            ReadModel::Instances => "instances",
            ReadModel::Timeline => "timeline",
            ReadModel::AgentStats => "agent_stats",
            ReadModel::Usage => "usage",
        }
    }

    /// The aggregate type whose events this read model consumes.
    pub fn aggregate_type(self) -> &'static str {
        match self {
            ReadModel::Agents => "agent",
            _ => "instance",
        }
    }

    /// The tables this read model owns.
    pub fn tables(self) -> &'static [&'static str] {
        match self {
            ReadModel::Agents => &["rm_agents"],
            ReadModel::Instances => &["rm_instances"],
            ReadModel::Timeline => &["rm_timeline"],
            ReadModel::AgentStats => &["rm_agent_stats", "rm_agent_stats_runs"],
            ReadModel::Usage => &["rm_usage", "rm_usage_owners"],
        }
    }

    /// Applies one decoded event.
    pub async fn apply(
        self,
        conn: &mut PgConnection,
        stored: &StoredEvent,
        event: &DomainEvent,
    ) -> Result<(), sqlx::Error> {
        match (self, event) {
            (ReadModel::Agents, DomainEvent::Agent(e)) => agents::apply(conn, stored, e).await,
            (ReadModel::Instances, DomainEvent::Instance(e)) => {
                instances::apply(conn, stored, e).await
            }
            (ReadModel::Timeline, DomainEvent::Instance(e)) => {
                timeline::apply(conn, stored, e).await
            }
            (ReadModel::AgentStats, DomainEvent::Instance(e)) => {
                agent_stats::apply(conn, stored, e).await
            }
            (ReadModel::Usage, DomainEvent::Instance(e)) => usage::apply(conn, stored, e).await,
            // Events of another aggregate are not this read model's concern.
            _ => Ok(()),
        }
    }
}

impl fmt::Display for ReadModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ReadModel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReadModel::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = ReadModel::ALL.iter().map(|m| m.name()).collect();
                format!(
                    "unknown read model `{s}`; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Parses an instance aggregate id.
pub(crate) fn instance_uuid(stored: &StoredEvent) -> Result<uuid::Uuid, sqlx::Error> {
    uuid::Uuid::parse_str(&stored.aggregate_id).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}
