//! Appends to one conversation take turns in the replica before they take a
//! connection.
//!
//! Every append locks its conversation's row until it commits, so appends to
//! one conversation run one after another whatever the replica does. Left to
//! PostgreSQL, each of them holds a pooled connection while it waits for the
//! lock, and each commit wakes every waiter to race for the row again. A
//! conversation written by many callers at once (an agent's parallel tool
//! results, a retry storm) would then hold most of the pool, and every other
//! caller of this replica would wait for a connection behind it.
//!
//! Here at most [`IN_DATABASE`] appends to a conversation are in the
//! database at a time; the rest wait in the replica, in arrival order,
//! holding no connection. Two, not one: the second sends its statement while
//! the first commits and is the one waiter the commit wakes, so the row is
//! never idle for a round trip. Other replicas' appends still meet these at
//! the row lock, which is what keeps sequences gapless; this only keeps one
//! replica from queueing in the database.
//!
//! The wait is bounded by the session's `lock_timeout`, the bound it had when
//! it was a wait for the row (zero: no bound, as in PostgreSQL), and fails
//! the same way.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::StoreError;
use crate::domain::{ConversationId, UserId};

/// How many appends to one conversation a replica lets into the database at
/// a time.
const IN_DATABASE: usize = 2;

/// A conversation's appends, as the caller names it: the same id asked for by
/// another user (who will find nothing) does not queue with the owner's.
type Key = (UserId, ConversationId);

/// The conversations with appends under way in this replica, each with its
/// turns. An entry lives while someone holds or waits for a turn.
#[derive(Default)]
pub(super) struct AppendTurns {
    conversations: Mutex<HashMap<Key, Arc<Semaphore>>>,
}

/// A turn to append to one conversation; the next waiter's when dropped.
pub(super) struct Turn<'a> {
    // Fields drop in order: the permit goes back before the ticket checks
    // whether anyone still needs the entry.
    _permit: OwnedSemaphorePermit,
    _ticket: Ticket<'a>,
}

/// A claim on a conversation's entry, held while waiting and while appending.
struct Ticket<'a> {
    turns: &'a AppendTurns,
    key: Key,
    semaphore: Arc<Semaphore>,
}

impl AppendTurns {
    /// Waits, up to `timeout` (zero: without bound), for a turn to append to
    /// `conversation`.
    pub async fn take(
        &self,
        owner: &UserId,
        conversation: ConversationId,
        timeout: Duration,
    ) -> Result<Turn<'_>, StoreError> {
        let key = (owner.clone(), conversation);
        let semaphore = Arc::clone(
            self.lock()
                .entry(key.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(IN_DATABASE))),
        );
        let ticket = Ticket {
            turns: self,
            key,
            semaphore,
        };
        // Free permits mean no one waits: a release hands its permit to the
        // first waiter, so taking one here keeps the arrival order.
        let permit = match Arc::clone(&ticket.semaphore).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                metrics::counter!("convo_append_turn_waits_total").increment(1);
                let waiting = Arc::clone(&ticket.semaphore).acquire_owned();
                // Zero is PostgreSQL's "no lock timeout": wait as long as the
                // row wait would.
                let acquired = if timeout.is_zero() {
                    Ok(waiting.await)
                } else {
                    tokio::time::timeout(timeout, waiting).await
                };
                acquired
                    .map_err(|_| {
                        StoreError::TimedOut(format!(
                            "waited longer than {} ms for the conversation's earlier appends",
                            timeout.as_millis()
                        ))
                    })?
                    // Never closed: the semaphore lives as long as its entry.
                    .map_err(|_| StoreError::Unavailable("the store is closing".to_owned()))?
            }
        };
        Ok(Turn {
            _permit: permit,
            _ticket: ticket,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Semaphore>>> {
        // The map is consistent between statements; a panic elsewhere while
        // it was held leaves nothing half-done.
        self.conversations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// How many conversations have an entry (for the tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut conversations = self.turns.lock();
        // Everyone else with a reference holds a ticket of their own (made
        // under this lock) besides any permit, and this ticket's permit is
        // gone: two references, the map's and this one, mean no one else
        // holds or waits for a turn.
        if Arc::strong_count(&self.semaphore) == 2 {
            conversations.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(name: &str) -> UserId {
        UserId::parse(name).expect("a valid user id")
    }

    const LONG: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn two_appends_to_a_conversation_at_a_time_and_the_rest_wait() {
        let turns = AppendTurns::default();
        let (alice, conversation) = (owner("alice"), ConversationId::generate());
        let first = turns.take(&alice, conversation, LONG).await.expect("turn");
        let second = turns.take(&alice, conversation, LONG).await.expect("turn");
        let third = turns
            .take(&alice, conversation, Duration::from_millis(20))
            .await;
        assert!(
            matches!(third, Err(StoreError::TimedOut(_))),
            "a third append must wait for a turn"
        );
        drop(first);
        let third = turns.take(&alice, conversation, LONG).await.expect("turn");
        drop((second, third));
        assert_eq!(turns.len(), 0, "the entry goes with the last turn");
    }

    #[tokio::test]
    async fn a_zero_timeout_waits_without_bound_as_postgresql_does() {
        let turns = Arc::new(AppendTurns::default());
        let (alice, conversation) = (owner("alice"), ConversationId::generate());
        let first = turns.take(&alice, conversation, LONG).await.expect("turn");
        let _second = turns.take(&alice, conversation, LONG).await.expect("turn");
        let waiter = {
            let (turns, alice) = (Arc::clone(&turns), alice.clone());
            tokio::spawn(async move {
                turns
                    .take(&alice, conversation, Duration::ZERO)
                    .await
                    .map(drop)
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "a zero timeout is no bound");
        drop(first);
        waiter
            .await
            .expect("waiter")
            .expect("the turn comes when one is free");
    }

    #[tokio::test]
    async fn other_conversations_and_other_callers_do_not_wait() {
        let turns = AppendTurns::default();
        let (alice, bob, conversation) = (owner("alice"), owner("bob"), ConversationId::generate());
        let _held = (
            turns.take(&alice, conversation, LONG).await.expect("turn"),
            turns.take(&alice, conversation, LONG).await.expect("turn"),
        );
        let short = Duration::from_millis(20);
        turns
            .take(&alice, ConversationId::generate(), short)
            .await
            .expect("another conversation has turns of its own");
        turns
            .take(&bob, conversation, short)
            .await
            .expect("another caller naming the same id does not queue with its owner");
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_no_entry_behind() {
        let turns = AppendTurns::default();
        let (alice, conversation) = (owner("alice"), ConversationId::generate());
        let held = (
            turns.take(&alice, conversation, LONG).await.expect("turn"),
            turns.take(&alice, conversation, LONG).await.expect("turn"),
        );
        // Timed out, and a cancelled waiter (its future dropped mid-wait).
        assert!(
            turns
                .take(&alice, conversation, Duration::from_millis(10))
                .await
                .is_err()
        );
        let cancelled = tokio::time::timeout(
            Duration::from_millis(10),
            turns.take(&alice, conversation, LONG),
        )
        .await;
        assert!(cancelled.is_err(), "the waiter was cut off while waiting");
        drop(held);
        assert_eq!(turns.len(), 0);
    }

    #[tokio::test]
    async fn waiters_get_their_turns_in_arrival_order() {
        let turns = Arc::new(AppendTurns::default());
        let (alice, conversation) = (owner("alice"), ConversationId::generate());
        let held = (
            turns.take(&alice, conversation, LONG).await.expect("turn"),
            turns.take(&alice, conversation, LONG).await.expect("turn"),
        );
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for n in 0..4 {
            let (turns, order, alice) = (Arc::clone(&turns), Arc::clone(&order), alice.clone());
            waiters.push(tokio::spawn(async move {
                let _turn = turns.take(&alice, conversation, LONG).await.expect("turn");
                order.lock().expect("order").push(n);
            }));
            // On the test's one thread, the waiter runs until it queues.
            tokio::task::yield_now().await;
        }
        drop(held);
        for waiter in waiters {
            waiter.await.expect("waiter");
        }
        assert_eq!(*order.lock().expect("order"), vec![0, 1, 2, 3]);
    }
}
