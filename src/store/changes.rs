//! Live changes across replicas, through PostgreSQL LISTEN/NOTIFY.
//!
//! A write that others may watch sends `pg_notify` inside its own transaction,
//! so a notification exists only for committed data. Each process keeps one
//! dedicated listening connection and fans notifications out, in memory, to
//! the watchers of the conversation that moved. A notification carries only
//! which conversation (or which user's data) changed: watchers read the rows
//! themselves, so payload size never matters and nothing uncommitted is seen.
//!
//! Watchers are woken through `tokio::sync::watch` channels, which hold one
//! value and never block the sender: a slow watcher cannot slow appends or
//! other watchers; it simply reads more rows when it gets to them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use diesel_async::{
    AsyncPgConnection, SimpleAsyncConnection, pooled_connection::PoolableConnection,
};
use tokio::{sync::watch, task::JoinHandle};
use tokio_stream::StreamExt;

use crate::domain::{ConversationId, UserId};

/// The channel every replica LISTENs on.
const CHANNEL: &str = "convo_changes";

/// The payload announcing that a conversation changed.
pub(super) fn conversation_changed(id: ConversationId) -> String {
    format!("c:{id}")
}

/// The payload announcing that all of a user's data changed (erasure).
pub(super) fn user_changed(user: &UserId) -> String {
    format!("u:{user}")
}

/// How often the listener checks its connection when nothing arrives.
const LISTENER_CHECK: Duration = Duration::from_secs(1);
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Registry {
    /// Per conversation: its owner and the channel its watchers wait on.
    conversations: HashMap<ConversationId, (UserId, watch::Sender<u64>)>,
}

struct Shared {
    registry: Mutex<Registry>,
    /// Bumped whenever notifications may have been missed (the listener
    /// reconnected): every watcher re-reads from the database.
    resync: watch::Sender<u64>,
    /// Set when the server shuts down: watch streams end.
    closing: watch::Sender<bool>,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves the map usable.
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn dispatch(&self, payload: &str) {
        metrics::counter!("convo_notifications_received_total").increment(1);
        let registry = self.registry();
        match payload.split_once(':') {
            Some(("c", id)) => {
                if let Ok(id) = ConversationId::parse("payload", id)
                    && let Some((_, sender)) = registry.conversations.get(&id)
                {
                    sender.send_modify(|version| *version += 1);
                }
            }
            Some(("u", user)) => {
                for (owner, sender) in registry.conversations.values() {
                    if owner.as_str() == user {
                        sender.send_modify(|version| *version += 1);
                    }
                }
            }
            _ => tracing::warn!(payload, "ignoring an unknown change notification"),
        }
    }
}

/// The process's view of changes made by every replica. Cheap to clone; the
/// listener stops when the last clone is dropped.
#[derive(Clone)]
pub struct ChangeFeed {
    shared: Arc<Shared>,
    _listener: Arc<AbortOnDrop>,
}

impl std::fmt::Debug for ChangeFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeFeed")
            .field("watched_conversations", &self.watched_conversations())
            .finish()
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ChangeFeed {
    /// Starts the listener on its own connection to `database_url` (never a
    /// pooled one: a LISTEN must stay on one session). It connects in the
    /// background and reconnects whenever the connection is lost.
    pub fn start(database_url: &str) -> Self {
        let shared = Arc::new(Shared {
            registry: Mutex::default(),
            resync: watch::Sender::new(0),
            closing: watch::Sender::new(false),
        });
        let url = listener_url(database_url);
        let listener = tokio::spawn(listen(url, shared.clone()));
        Self {
            shared,
            _listener: Arc::new(AbortOnDrop(listener)),
        }
    }

    /// Starts following one conversation. Subscribe *before* reading what is
    /// already stored: a change committed after that read wakes the
    /// subscription, so nothing falls between the two.
    pub fn subscribe(&self, owner: &UserId, conversation: ConversationId) -> Subscription {
        let changed = {
            let mut registry = self.shared.registry();
            registry
                .conversations
                .entry(conversation)
                .or_insert_with(|| (owner.clone(), watch::Sender::new(0)))
                .1
                .subscribe()
        };
        Subscription {
            conversation,
            changed,
            resync: self.shared.resync.subscribe(),
            closing: self.shared.closing.subscribe(),
            shared: self.shared.clone(),
        }
    }

    /// Ends every watch stream: called when the server begins to shut down.
    pub fn close(&self) {
        self.shared.closing.send_replace(true);
    }

    /// How many conversations have at least one watcher in this process.
    pub fn watched_conversations(&self) -> usize {
        self.shared.registry().conversations.len()
    }
}

/// Why a subscription woke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The conversation may have changed: read it again.
    Changed,
    /// The server is shutting down: end the stream.
    Closing,
}

/// One watcher's interest in one conversation.
pub struct Subscription {
    conversation: ConversationId,
    changed: watch::Receiver<u64>,
    resync: watch::Receiver<u64>,
    closing: watch::Receiver<bool>,
    shared: Arc<Shared>,
}

impl Subscription {
    /// Waits for the next change to read, or for shutdown. Changes that came
    /// while the watcher was busy are not lost: they wake it at once.
    pub async fn next(&mut self) -> Wake {
        if *self.closing.borrow() {
            return Wake::Closing;
        }
        tokio::select! {
            _ = self.changed.changed() => Wake::Changed,
            _ = self.resync.changed() => Wake::Changed,
            _ = self.closing.changed() => Wake::Closing,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut registry = self.shared.registry();
        // This subscription's own receiver is still alive here: one means it
        // was the last watcher of the conversation.
        if let Some((_, sender)) = registry.conversations.get(&self.conversation)
            && sender.receiver_count() <= 1
        {
            registry.conversations.remove(&self.conversation);
        }
    }
}

/// Names the listener's session so operators (and tests) can find it in
/// `pg_stat_activity`.
fn listener_url(database_url: &str) -> String {
    super::pool::session_url(database_url, Some("convo-listener"))
}

/// How long the listener may take to connect before it tries again.
const LISTENER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

async fn listen(url: String, shared: Arc<Shared>) {
    // The pool was built from the same URL, so it parses; were it not to,
    // there would be nothing to listen to.
    let target = match super::tls::DatabaseTarget::parse(&url) {
        Ok(target) => target,
        Err(why) => {
            tracing::error!(%why, "the change listener cannot use the database URL");
            return;
        }
    };
    let mut delay = Duration::from_millis(50);
    loop {
        match super::pool::connect(&target, LISTENER_CONNECT_TIMEOUT).await {
            Ok(mut conn) => match conn.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                Ok(()) => {
                    delay = Duration::from_millis(50);
                    // Anything committed while no one listened is read now.
                    shared.resync.send_modify(|epoch| *epoch += 1);
                    tracing::info!("listening for changes from every replica");
                    receive(&mut conn, &shared).await;
                    tracing::warn!("lost the change listener's connection; reconnecting");
                }
                Err(error) => tracing::warn!(%error, "could not LISTEN for changes"),
            },
            Err(error) => tracing::debug!(%error, "change listener cannot connect yet"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RECONNECT_DELAY);
    }
}

/// Dispatches notifications until the connection is lost.
async fn receive(conn: &mut AsyncPgConnection, shared: &Shared) {
    loop {
        let next = {
            let notifications = conn.notifications_stream();
            tokio::pin!(notifications);
            tokio::time::timeout(LISTENER_CHECK, notifications.next()).await
        };
        match next {
            Ok(Some(Ok(notification))) => shared.dispatch(&notification.payload),
            Ok(Some(Err(error))) => {
                tracing::warn!(%error, "change listener failed");
                return;
            }
            Ok(None) => return,
            // Quiet for a while: make sure the session is still there (a dead
            // peer may not close the socket).
            Err(_) => {
                // A peer that vanished without closing the socket would leave
                // the probe waiting for ever: bound it.
                if conn.is_broken() {
                    return;
                }
                let probe = tokio::time::timeout(LISTENER_CHECK, conn.batch_execute("SELECT 1"));
                if !matches!(probe.await, Ok(Ok(()))) {
                    return;
                }
            }
        }
    }
}

/// Announces a change to every replica. Call it inside the transaction that
/// makes the change: PostgreSQL delivers it only if that transaction commits.
pub(super) async fn notify(
    conn: &mut AsyncPgConnection,
    payload: &str,
) -> Result<(), super::StoreError> {
    use diesel::sql_types::Text;
    use diesel_async::RunQueryDsl;
    diesel::sql_query("SELECT pg_notify($1, $2)")
        .bind::<Text, _>(CHANNEL)
        .bind::<Text, _>(payload)
        .execute(conn)
        .await?;
    Ok(())
}

/// Announces several changes in one statement, like [`notify`].
pub(super) async fn notify_all(
    conn: &mut AsyncPgConnection,
    payloads: &[String],
) -> Result<(), super::StoreError> {
    use diesel::sql_types::{Array, Text};
    use diesel_async::RunQueryDsl;
    if payloads.is_empty() {
        return Ok(());
    }
    diesel::sql_query("SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload")
        .bind::<Text, _>(CHANNEL)
        .bind::<Array<Text>, _>(payloads)
        .execute(conn)
        .await?;
    Ok(())
}
