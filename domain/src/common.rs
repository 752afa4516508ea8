//! Value types shared by both aggregates: tiers, agent ids, the acting principal.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::DomainError;
use crate::limits;

/// A customer tier; agents are opened to a set of tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Free plan.
    Free,
    /// Early-access plan.
    Early,
    /// Mid-market plan.
    Mid,
    /// Enterprise plan.
    Enterprise,
}

impl Tier {
    /// Every tier, in ascending order.
    pub const ALL: [Tier; 4] = [Tier::Free, Tier::Early, Tier::Mid, Tier::Enterprise];

    /// The wire name of the tier.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Early => "early",
            Tier::Mid => "mid",
            Tier::Enterprise => "enterprise",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Tier {
    type Err = DomainError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tier::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or(DomainError::FieldInvalid {
                field: "tier",
                reason: "must be one of free, early, mid, enterprise",
            })
    }
}

/// The id of an agent: a slug (`[a-z][a-z0-9-]*`, at most 64 chars), unique by construction
/// because it is the aggregate id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AgentId(String);

impl AgentId {
    /// Validates a slug.
    pub fn parse(value: &str) -> Result<Self, DomainError> {
        limits::text("agent_id", value, 1, limits::AGENT_ID_MAX)?;
        let mut chars = value.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if first_ok && rest_ok && !value.ends_with('-') && !value.contains("--") {
            Ok(Self(value.to_owned()))
        } else {
            Err(DomainError::FieldInvalid {
                field: "agent_id",
                reason: "must be a slug: a lowercase letter, then lowercase letters, digits and single dashes",
            })
        }
    }

    /// The slug.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The role of the principal acting on an aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorRole {
    /// An end user (customer).
    User,
    /// The trusted agent runtime.
    Runner,
    /// A platform administrator.
    Admin,
    /// An auditor (read only).
    Auditor,
}

impl ActorRole {
    /// The wire name of the role.
    pub fn as_str(self) -> &'static str {
        match self {
            ActorRole::User => "user",
            ActorRole::Runner => "runner",
            ActorRole::Admin => "admin",
            ActorRole::Auditor => "auditor",
        }
    }
}

/// Who issues a command: the authenticated principal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The principal id (`sub` claim).
    pub id: String,
    /// The principal's role.
    pub role: ActorRole,
}

impl Actor {
    /// A new actor.
    pub fn new(id: impl Into<String>, role: ActorRole) -> Self {
        Self {
            id: id.into(),
            role,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_are_slugs() {
        for ok in ["triage", "data-2", "a"] {
            assert!(AgentId::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Triage",
            "2data",
            "data_x",
            "x-",
            "a b",
            &"a".repeat(65),
        ] {
            assert!(AgentId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tiers_round_trip() {
        for t in Tier::ALL {
            assert_eq!(t.as_str().parse::<Tier>().ok(), Some(t));
        }
        assert!("gold".parse::<Tier>().is_err());
    }
}
