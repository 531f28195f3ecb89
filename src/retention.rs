//! The optional retention policy: conversations idle for longer than the
//! period are deleted by a background sweeper, in small batches. Several
//! replicas may sweep at once: each row is deleted once, by whichever
//! sweeper locks it first (`store/retention.rs`).

use std::time::Duration;

use crate::store::{ChangeFeed, Store};

/// How long a conversation may stay idle, and how the sweeper works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Conversations not updated for this long are deleted.
    pub idle_for: Duration,
    /// Pause between sweeps.
    pub interval: Duration,
    /// Conversations deleted per transaction.
    pub batch: u32,
}

/// Sweeps forever (until the task is dropped): each sweep deletes batches
/// until one comes back short, then waits `interval`.
pub async fn sweep(store: Store, changes: ChangeFeed, policy: RetentionPolicy) {
    let mut ticker = tokio::time::interval(policy.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Ok(idle_for) = chrono::Duration::from_std(policy.idle_for) else {
            return;
        };
        let cutoff = chrono::Utc::now() - idle_for;
        let mut deleted = 0;
        loop {
            match store.delete_idle_conversations(cutoff, policy.batch).await {
                Ok(ids) => {
                    let n = ids.len();
                    // Their watchers end with NOT_FOUND.
                    for id in ids {
                        changes.changed(id);
                    }
                    deleted += n;
                    metrics::counter!("convo_retention_deleted_conversations_total")
                        .increment(n as u64);
                    if n < policy.batch as usize {
                        break;
                    }
                }
                Err(error) => {
                    metrics::counter!("convo_retention_failures_total").increment(1);
                    tracing::warn!(%error, "retention sweep failed; retrying at the next interval");
                    break;
                }
            }
        }
        metrics::counter!("convo_retention_sweeps_total").increment(1);
        if deleted > 0 {
            tracing::info!(deleted, ?policy.idle_for, "retention: deleted idle conversations");
        }
    }
}
