//! One in-process lock per aggregate: commands on one aggregate queue, commands on different
//! aggregates never wait for each other.
//!
//! A lock exists only while someone holds or awaits it, so the table holds as many entries as
//! there are aggregates with a command in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as SyncMutex};

use tokio::sync::{Mutex, OwnedMutexGuard};

/// The locks of the aggregates with a command in flight.
#[derive(Default)]
pub(crate) struct AggregateLocks {
    held: SyncMutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// Holds an aggregate's lock; dropping it lets the next command on that aggregate run.
pub(crate) struct AggregateGuard<'a> {
    locks: &'a AggregateLocks,
    key: String,
    lock: Option<Arc<Mutex<()>>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl AggregateLocks {
    /// Waits until no other command of this process holds `aggregate_id`'s lock.
    ///
    /// Cancel-safe: a waiter dropped before it gets the lock leaves no entry behind.
    pub(crate) async fn lock(&self, aggregate_id: &str) -> AggregateGuard<'_> {
        let lock = self
            .table()
            .entry(aggregate_id.to_owned())
            .or_default()
            .clone();
        let mut waiting = AggregateGuard {
            locks: self,
            key: aggregate_id.to_owned(),
            lock: Some(lock.clone()),
            guard: None,
        };
        waiting.guard = Some(lock.lock_owned().await);
        waiting
    }

    /// Aggregates whose lock is held or awaited.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table().len()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Mutex<()>>>> {
        // The table is consistent after any panic: every change is a single insert or remove.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for AggregateGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        drop(self.lock.take());
        let mut table = self.locks.table();
        // Clones are only made under the table's lock, so a count of one (the table's own)
        // means nobody holds or awaits this lock any more.
        if table
            .get(&self.key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            table.remove(&self.key);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn commands_on_different_aggregates_never_wait_for_each_other() {
        // More aggregates than any fixed set of stripes could keep apart.
        let locks = AggregateLocks::default();
        let ids: Vec<String> = (0..5000).map(|n| format!("instance-{n}")).collect();
        let mut guards = Vec::new();
        for id in &ids {
            let guard = tokio::time::timeout(Duration::from_secs(1), locks.lock(id))
                .await
                .unwrap_or_else(|_| panic!("{id} waited for another aggregate's command"));
            guards.push(guard);
        }
        assert_eq!(locks.len(), ids.len());
        drop(guards);
        assert_eq!(locks.len(), 0, "released locks stay in the table");
    }

    #[tokio::test]
    async fn commands_on_one_aggregate_queue_and_the_next_runs_on_release() {
        let locks = Arc::new(AggregateLocks::default());
        let first = locks.lock("run-1").await;
        let second = tokio::spawn({
            let locks = locks.clone();
            async move {
                let _guard = locks.lock("run-1").await;
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !second.is_finished(),
            "a second command ran while the first held the lock"
        );
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), second)
            .await
            .unwrap_or_else(|_| panic!("the queued command never got the lock after its release"))
            .unwrap();
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn a_waiter_given_up_leaves_no_entry_and_blocks_nobody() {
        let locks = AggregateLocks::default();
        let held = locks.lock("run-1").await;
        // The waiter's request is cancelled (its client went away) while it queues.
        let gave_up = tokio::time::timeout(Duration::from_millis(20), locks.lock("run-1")).await;
        assert!(gave_up.is_err());
        assert_eq!(locks.len(), 1);
        drop(held);
        assert_eq!(locks.len(), 0, "the cancelled waiter left its entry behind");
        let again = tokio::time::timeout(Duration::from_secs(1), locks.lock("run-1")).await;
        assert!(
            again.is_ok(),
            "the lock stayed taken after its holder and waiter left"
        );
    }
}
