//! Live changes across replicas, with nothing on the commit path (ADR 0010).
//!
//! A write commits first; then the service announces it here, and three
//! paths carry it to watchers:
//! - **this process**: its watchers are woken at once, and an append hands
//!   them the messages it wrote, so a watcher that is up to date delivers
//!   them without a read;
//! - **other replicas**: a publisher task sends PostgreSQL NOTIFYs on its own
//!   connection, outside any write transaction, gathering every change of an
//!   interval into one transaction (many conversations per payload). A
//!   transaction holding a NOTIFY takes a lock that serializes commits across
//!   the whole instance; sending them from writes would cap every writer of
//!   the database, which is why they are sent here, at most a bounded number
//!   of times per second;
//! - **catch-up**: once per interval, one query reads the count and update
//!   time of every conversation watched in this process and wakes those that
//!   moved. A notification lost to a crash between a commit and its publish,
//!   or to a listener that reconnected, delays delivery; it never loses it.
//!   A listener that falls behind re-reads too: its session holds a bounded
//!   backlog of notifications and drops the rest (see `tls::Notifications`).
//!
//! A wake-up only says "read again" (or hands over an append that exactly
//! continues the stream): watchers read committed rows themselves, so a
//! payload's size never matters and nothing uncommitted is seen. Watchers
//! wait on `tokio::sync::watch` channels, which hold one value and never block
//! the sender: a slow watcher cannot slow appends or other watchers.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use chrono::{DateTime, Utc};
use diesel_async::{
    AsyncPgConnection, SimpleAsyncConnection, pooled_connection::PoolableConnection,
};
use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};
use uuid::Uuid;

use super::{
    Store,
    statement::{fixed, fixed_text},
    tls::{DatabaseTarget, Notice, Opened},
};
use crate::domain::{ConversationId, Message, MessageId, UserId};

/// The channel every replica LISTENs on.
const CHANNEL: &str = "convo_changes";

/// PostgreSQL refuses payloads of 8000 bytes or more; stay well below.
const MAX_PAYLOAD_BYTES: usize = 7_000;

/// Past this many unsent conversations (the database unreachable for a
/// while), the publisher stops listing them and tells every replica to
/// re-read all its watchers instead.
const MAX_OUTBOX: usize = 50_000;

/// How often the listener checks its connection when nothing arrives.
const LISTENER_CHECK: Duration = Duration::from_secs(1);
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);
/// How long a shutdown waits for the listener to end its session: its
/// UNLISTEN gets [`LISTENER_CHECK`], its goodbye about as long.
const STOP_LISTENING: Duration = Duration::from_secs(2);

/// How long the listener or the publisher may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How changes travel between replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedSettings {
    /// The publisher sends at most one NOTIFY transaction per interval; the
    /// changes of an interval share it.
    pub publish_interval: Duration,
    /// How often watched conversations are checked for changes that no
    /// notification announced.
    pub catch_up_interval: Duration,
    /// How many notifications the listener's session holds while the
    /// listener is busy; past that it drops them and every watcher re-reads
    /// (memory stays bounded, no message is lost).
    pub backlog: usize,
}

impl Default for FeedSettings {
    fn default() -> Self {
        Self {
            publish_interval: Duration::from_millis(10),
            catch_up_interval: Duration::from_secs(1),
            backlog: super::tls::NOTIFICATION_BACKLOG,
        }
    }
}

/// Messages an append in this process wrote, as handed to its watchers.
#[derive(Debug)]
pub struct Appended {
    /// The id of the message just before them, when known.
    pub follows: Option<MessageId>,
    /// Consecutive messages, in sequence order.
    pub messages: Vec<Message>,
}

/// What a conversation looked like at the last catch-up read: its count and
/// update time, or `None` when it no longer exists.
type Version = Option<(i64, DateTime<Utc>)>;

struct Watched {
    owner: UserId,
    wake: watch::Sender<Option<Arc<Appended>>>,
    /// `None` until the first catch-up read.
    seen: Option<Version>,
}

impl Watched {
    fn wake(&self, appended: Option<Arc<Appended>>) {
        self.wake.send_replace(appended);
    }
}

/// Changes made here that other replicas have not been told of yet.
#[derive(Default)]
struct Outbox {
    conversations: HashSet<ConversationId>,
    users: HashSet<UserId>,
    /// Too much to list: every replica re-reads every watcher.
    everything: bool,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        !self.everything && self.conversations.is_empty() && self.users.is_empty()
    }

    fn of_conversation(id: ConversationId) -> Self {
        Self {
            conversations: HashSet::from([id]),
            ..Self::default()
        }
    }

    fn of_user(user: &UserId) -> Self {
        Self {
            users: HashSet::from([user.clone()]),
            ..Self::default()
        }
    }

    fn merge(&mut self, other: Outbox) {
        self.everything |= other.everything;
        self.conversations.extend(other.conversations);
        self.users.extend(other.users);
        if self.conversations.len() + self.users.len() > MAX_OUTBOX {
            self.conversations.clear();
            self.users.clear();
            self.everything = true;
        }
    }

    /// The payloads that announce this outbox, from `replica`:
    /// `C:<replica>:<id>,<id>,…`, `U:<replica>:<user>`, `A:<replica>`.
    fn payloads(&self, replica: &str) -> Vec<String> {
        if self.everything {
            return vec![format!("A:{replica}")];
        }
        let mut payloads = Vec::new();
        let head = format!("C:{replica}:");
        let mut current = head.clone();
        for id in &self.conversations {
            if current.len() + 37 > MAX_PAYLOAD_BYTES {
                payloads.push(std::mem::replace(&mut current, head.clone()));
            }
            if current.len() > head.len() {
                current.push(',');
            }
            current.push_str(&id.to_string());
        }
        if current.len() > head.len() {
            payloads.push(current);
        }
        payloads.extend(self.users.iter().map(|user| format!("U:{replica}:{user}")));
        payloads
    }
}

/// A payload received from some replica.
#[derive(Debug, PartialEq)]
enum Announcement<'a> {
    Conversations(Vec<ConversationId>),
    User(&'a str),
    Everything,
}

/// Parses a payload; `None` for our own (already dispatched here) and for
/// what this version does not know.
fn parse_payload<'a>(payload: &'a str, own_replica: &str) -> Option<Announcement<'a>> {
    let conversations = |list: &str| {
        Announcement::Conversations(
            list.split(',')
                .filter_map(|id| ConversationId::parse("payload", id).ok())
                .collect(),
        )
    };
    let (kind, rest) = payload.split_once(':').unwrap_or((payload, ""));
    let (replica, body) = match kind {
        // From a version that notified inside its write transactions.
        "c" => return Some(conversations(rest)),
        "u" => return Some(Announcement::User(rest)),
        "A" => (rest, ""),
        _ => rest.split_once(':')?,
    };
    if replica == own_replica {
        return None;
    }
    match kind {
        "C" => Some(conversations(body)),
        "U" => Some(Announcement::User(body)),
        "A" => Some(Announcement::Everything),
        _ => None,
    }
}

struct Shared {
    /// This process's name in the payloads it sends, so it can skip them when
    /// they come back.
    replica: String,
    registry: Mutex<HashMap<ConversationId, Watched>>,
    outbox: Mutex<Outbox>,
    outbox_filled: Notify,
    /// Bumped whenever notifications may have been missed (the listener
    /// reconnected): every watcher re-reads from the database.
    resync: watch::Sender<u64>,
    /// Set when the server shuts down: watch streams end, and the listener
    /// ends its session.
    closing: watch::Sender<bool>,
    /// Set by the listener once it has ended its session for the shutdown.
    stopped_listening: watch::Sender<bool>,
}

/// A mutex whose holder panicked is still usable: every update here leaves
/// the data consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// Every watcher in this process reads again: notifications may have
    /// been missed.
    fn everyone_rereads(&self) {
        self.resync.send_modify(|epoch| *epoch += 1);
    }

    fn receive(&self, payload: &str) {
        metrics::counter!("convo_notifications_received_total").increment(1);
        let Some(announcement) = parse_payload(payload, &self.replica) else {
            return;
        };
        let registry = lock(&self.registry);
        match announcement {
            Announcement::Conversations(ids) => {
                for id in ids {
                    if let Some(watched) = registry.get(&id) {
                        watched.wake(None);
                    }
                }
            }
            Announcement::User(user) => {
                for watched in registry.values() {
                    if watched.owner.as_str() == user {
                        watched.wake(None);
                    }
                }
            }
            Announcement::Everything => {
                for watched in registry.values() {
                    watched.wake(None);
                }
            }
        }
    }

    /// Queues changes for the publisher and wakes it.
    fn post(&self, more: Outbox) {
        lock(&self.outbox).merge(more);
        self.outbox_filled.notify_one();
    }
}

/// The process's view of changes made by every replica. Cheap to clone; its
/// tasks stop when the last clone is dropped.
#[derive(Clone)]
pub struct ChangeFeed {
    shared: Arc<Shared>,
    _tasks: Arc<[AbortOnDrop; 3]>,
}

impl std::fmt::Debug for ChangeFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeFeed")
            .field("replica", &self.shared.replica)
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
    /// Starts the listener and the publisher, each on its own session to
    /// `store`'s database (a LISTEN must stay on one session, and a publish
    /// must not wait behind the pool), and the catch-up reads on its pool.
    /// They connect in the background and reconnect whenever a connection is
    /// lost.
    pub fn start(store: Store, settings: FeedSettings) -> Self {
        let shared = Arc::new(Shared {
            replica: Uuid::now_v7().simple().to_string(),
            registry: Mutex::default(),
            outbox: Mutex::default(),
            outbox_filled: Notify::new(),
            resync: watch::Sender::new(0),
            closing: watch::Sender::new(false),
            stopped_listening: watch::Sender::new(false),
        });
        let listener = tokio::spawn(listen(
            store
                .target()
                .named("convo-listener")
                .holding(settings.backlog),
            shared.clone(),
        ));
        let publisher = tokio::spawn(publish(
            store.target().named("convo-publisher"),
            shared.clone(),
            settings.publish_interval,
        ));
        let catch_up = tokio::spawn(catch_up(store, shared.clone(), settings.catch_up_interval));
        Self {
            shared,
            _tasks: Arc::new([
                AbortOnDrop(listener),
                AbortOnDrop(publisher),
                AbortOnDrop(catch_up),
            ]),
        }
    }

    /// Starts following one conversation. Subscribe *before* reading what is
    /// already stored: a change committed after that read wakes the
    /// subscription, so nothing falls between the two.
    pub fn subscribe(&self, owner: &UserId, conversation: ConversationId) -> Subscription {
        let changed = lock(&self.shared.registry)
            .entry(conversation)
            .or_insert_with(|| Watched {
                owner: owner.clone(),
                wake: watch::Sender::new(None),
                seen: None,
            })
            .wake
            .subscribe();
        Subscription {
            conversation,
            changed,
            resync: self.shared.resync.subscribe(),
            closing: self.shared.closing.subscribe(),
            shared: self.shared.clone(),
        }
    }

    /// Announces an append that committed: this process's watchers get the
    /// messages at once, other replicas are told by the publisher.
    pub fn appended(
        &self,
        conversation: ConversationId,
        messages: &[Message],
        follows: Option<MessageId>,
    ) {
        {
            let mut registry = lock(&self.shared.registry);
            if let Some(watched) = registry.get_mut(&conversation)
                && let Some(last) = messages.last()
            {
                watched.seen = Some(Some((last.sequence, last.create_time)));
                watched.wake(Some(Arc::new(Appended {
                    follows,
                    messages: messages.to_vec(),
                })));
            }
        }
        self.shared.post(Outbox::of_conversation(conversation));
    }

    /// Announces any other change to a conversation that committed (a
    /// truncation, a deletion): its watchers read it again.
    pub fn changed(&self, conversation: ConversationId) {
        if let Some(watched) = lock(&self.shared.registry).get(&conversation) {
            watched.wake(None);
        }
        self.shared.post(Outbox::of_conversation(conversation));
    }

    /// Announces that all of a user's data changed (an erasure).
    pub fn user_changed(&self, owner: &UserId) {
        for watched in lock(&self.shared.registry).values() {
            if watched.owner == *owner {
                watched.wake(None);
            }
        }
        self.shared.post(Outbox::of_user(owner));
    }

    /// Ends every watch stream: called when the server begins to shut down.
    pub fn close(&self) {
        self.shared.closing.send_replace(true);
    }

    /// Closes (see [`Self::close`]) and waits until the listener has ended
    /// its session: dropped while listening, it could only hang up on
    /// notifications still on their way, which PostgreSQL logs as a reset
    /// or a broken pipe.
    pub async fn shut_down(&self) {
        self.close();
        let mut stopped = self.shared.stopped_listening.subscribe();
        let waited = tokio::time::timeout(STOP_LISTENING, stopped.wait_for(|stopped| *stopped));
        if !matches!(waited.await, Ok(Ok(_))) {
            tracing::warn!(
                waited = ?STOP_LISTENING,
                "the change listener did not end its session in time (notifications still arriving?); \
                 PostgreSQL may log its end as a reset"
            );
        }
    }

    /// Whether a watcher in this process follows the conversation. One that
    /// subscribes after this answered false reads what it missed.
    pub fn is_watched(&self, conversation: ConversationId) -> bool {
        lock(&self.shared.registry).contains_key(&conversation)
    }

    /// How many conversations have at least one watcher in this process.
    pub fn watched_conversations(&self) -> usize {
        lock(&self.shared.registry).len()
    }
}

/// Why a subscription woke.
#[derive(Debug, Clone)]
pub enum Wake {
    /// The conversation may have changed: read it again, unless the append
    /// handed over continues exactly where the watcher stands.
    Changed(Option<Arc<Appended>>),
    /// The server is shutting down: end the stream.
    Closing,
}

/// One watcher's interest in one conversation.
pub struct Subscription {
    conversation: ConversationId,
    changed: watch::Receiver<Option<Arc<Appended>>>,
    resync: watch::Receiver<u64>,
    closing: watch::Receiver<bool>,
    shared: Arc<Shared>,
}

impl Subscription {
    /// Waits for the next change to read, or for shutdown. Changes that came
    /// while the watcher was busy are not lost: they wake it at once (with
    /// the latest append, if the last change was one).
    pub async fn next(&mut self) -> Wake {
        if *self.closing.borrow() {
            return Wake::Closing;
        }
        tokio::select! {
            _ = self.changed.changed() => {
                Wake::Changed(self.changed.borrow_and_update().clone())
            }
            _ = self.resync.changed() => Wake::Changed(None),
            _ = self.closing.changed() => Wake::Closing,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut registry = lock(&self.shared.registry);
        // This subscription's own receiver is still alive here: one means it
        // was the last watcher of the conversation.
        if let Some(watched) = registry.get(&self.conversation)
            && watched.wake.receiver_count() <= 1
        {
            registry.remove(&self.conversation);
        }
    }
}

/// Listens until the server begins to shut down, then says it has stopped.
async fn listen(target: DatabaseTarget, shared: Arc<Shared>) {
    follow(&target, &shared).await;
    shared.stopped_listening.send_replace(true);
}

/// Dispatches notifications, reconnecting whenever the session is lost,
/// until the server begins to shut down.
async fn follow(target: &DatabaseTarget, shared: &Shared) {
    let mut closing = shared.closing.subscribe();
    let mut delay = Duration::from_millis(50);
    while !*closing.borrow() {
        if let Some(mut session) = listening_session(target).await {
            delay = Duration::from_millis(50);
            // Anything committed while no one listened is read now.
            shared.everyone_rereads();
            tracing::info!("listening for changes from every replica");
            tokio::select! {
                () = receive(&mut session, shared) => {
                    tracing::warn!("lost the change listener's connection; reconnecting");
                }
                () = shutting_down(&mut closing) => {
                    stop_listening(session).await;
                    return;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutting_down(&mut closing) => return,
        }
        delay = (delay * 2).min(MAX_RECONNECT_DELAY);
    }
}

/// A session that LISTENs on the channel, or none yet (the reason logged).
async fn listening_session(target: &DatabaseTarget) -> Option<Opened> {
    let mut session = match super::pool::open(target, CONNECT_TIMEOUT).await {
        Ok(session) => session,
        Err(error) => {
            tracing::debug!(%error, "change listener cannot connect yet");
            return None;
        }
    };
    match session
        .conn
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
    {
        Ok(()) => Some(session),
        Err(error) => {
            tracing::warn!(%error, "could not LISTEN for changes");
            None
        }
    }
}

/// Completes once the server has begun to shut down.
async fn shutting_down(closing: &mut watch::Receiver<bool>) {
    // The sender lives in `Shared`, beside the receiver's holder.
    let _ = closing.wait_for(|closing| *closing).await;
}

/// Ends the listener's session so that PostgreSQL sees a goodbye, not a
/// reset: once UNLISTEN is answered, every notification sent before it has
/// been read and no more will come, so the goodbye finds nothing unread on
/// either side.
async fn stop_listening(mut session: Opened) {
    let unlisten = session.conn.batch_execute("UNLISTEN *");
    if matches!(
        tokio::time::timeout(LISTENER_CHECK, unlisten).await,
        Ok(Ok(()))
    ) {
        session.close().await;
    }
}

/// Dispatches notifications until the connection is lost.
async fn receive(session: &mut Opened, shared: &Shared) {
    loop {
        match tokio::time::timeout(LISTENER_CHECK, session.notifications.recv()).await {
            Ok(Some(Notice::Payload(payload))) => shared.receive(&payload),
            // Announcements were dropped while this task was behind: what
            // they announced is read again, as after a reconnect.
            Ok(Some(Notice::Missed)) => {
                tracing::debug!("the change listener fell behind; every watcher re-reads");
                shared.everyone_rereads();
            }
            // The session's driver ended: the connection is gone.
            Ok(None) => return,
            // Quiet for a while: make sure the session is still there (a dead
            // peer may not close the socket).
            Err(_) => {
                let conn = &mut session.conn;
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

/// Sends what the outbox holds, one transaction per `interval` at most,
/// until the task is dropped. What could not be sent stays for the next try.
async fn publish(target: DatabaseTarget, shared: Arc<Shared>, interval: Duration) {
    let mut conn: Option<AsyncPgConnection> = None;
    let mut delay = Duration::from_millis(50);
    loop {
        shared.outbox_filled.notified().await;
        loop {
            let outbox = std::mem::take(&mut *lock(&shared.outbox));
            if outbox.is_empty() {
                break;
            }
            let payloads = outbox.payloads(&shared.replica);
            // The interval runs from the start of a send, so the send's own
            // round trip is not added to the wait of what comes next.
            let next_send = tokio::time::Instant::now() + interval;
            match send(&mut conn, &target, &payloads).await {
                Ok(()) => {
                    delay = Duration::from_millis(50);
                    metrics::counter!("convo_notify_transactions_total").increment(1);
                    metrics::counter!("convo_notifications_sent_total")
                        .increment(payloads.len() as u64);
                    tokio::time::sleep_until(next_send).await;
                }
                Err(error) => {
                    conn = None;
                    lock(&shared.outbox).merge(outbox);
                    metrics::counter!("convo_notify_failures_total").increment(1);
                    tracing::warn!(%error, "could not tell other replicas of changes; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RECONNECT_DELAY);
                }
            }
        }
    }
}

/// The publisher's own session. A NOTIFY transaction writes nothing worth an
/// fsync, so its commit need not wait for the WAL flush (and holds the
/// instance-wide notification lock for less time); should the server crash
/// before the flush, the catch-up read delivers the changes.
async fn publisher_session(target: &DatabaseTarget) -> Result<AsyncPgConnection, String> {
    let mut conn = super::pool::connect(target, CONNECT_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    conn.batch_execute("SET synchronous_commit = off")
        .await
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// One NOTIFY transaction carrying every payload.
async fn send(
    conn: &mut Option<AsyncPgConnection>,
    target: &DatabaseTarget,
    payloads: &[String],
) -> Result<(), String> {
    use diesel::sql_types::{Array, Text};
    use diesel_async::RunQueryDsl;
    if conn.as_mut().is_some_and(|c| c.is_broken()) {
        *conn = None;
    }
    let conn = match conn {
        Some(conn) => conn,
        slot => slot.insert(publisher_session(target).await?),
    };
    let sent =
        fixed::<SendPayloads, _>(|q| q.bind::<Text, _>(CHANNEL).bind::<Array<Text>, _>(payloads))
            .execute(conn);
    match tokio::time::timeout(CONNECT_TIMEOUT, sent).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
    }
}

fixed_text!(
    /// Sends each payload on the channel, in one statement.
    SendPayloads = "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload"
);

/// Once per `interval`, reads the version of every conversation watched here
/// and wakes the watchers of those that moved since the last read (or that
/// were not read before).
async fn catch_up(store: Store, shared: Arc<Shared>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let watched: Vec<(UserId, ConversationId)> = lock(&shared.registry)
            .iter()
            .map(|(id, watched)| (watched.owner.clone(), *id))
            .collect();
        if watched.is_empty() {
            continue;
        }
        let versions = match store.conversation_versions(&watched).await {
            Ok(versions) => versions,
            Err(error) => {
                tracing::debug!(%error, "catch-up read failed; trying at the next interval");
                continue;
            }
        };
        let mut woken = 0u64;
        let mut registry = lock(&shared.registry);
        for (_, id) in watched {
            let Some(entry) = registry.get_mut(&id) else {
                continue;
            };
            let now: Version = versions.get(&id).copied();
            if entry.seen != Some(now) {
                if entry.seen.is_some() {
                    woken += 1;
                }
                entry.seen = Some(now);
                entry.wake(None);
            }
        }
        metrics::counter!("convo_watch_catch_up_wakes_total").increment(woken);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> ConversationId {
        ConversationId::from_uuid(Uuid::from_u128(n))
    }

    #[test]
    fn payloads_list_many_conversations_and_stay_under_the_limit() {
        let outbox = Outbox {
            conversations: (1..=1_000).map(id).collect(),
            users: HashSet::from([UserId::parse("ada").unwrap()]),
            everything: false,
        };
        let payloads = outbox.payloads("r1");
        assert!(payloads.iter().all(|p| p.len() < MAX_PAYLOAD_BYTES));
        let mut seen = HashSet::new();
        for payload in &payloads {
            match parse_payload(payload, "other").unwrap() {
                Announcement::Conversations(ids) => seen.extend(ids),
                Announcement::User(user) => assert_eq!(user, "ada"),
                Announcement::Everything => panic!("nothing overflowed"),
            }
        }
        assert_eq!(seen.len(), 1_000);
        // A replica skips its own.
        assert!(payloads.iter().all(|p| parse_payload(p, "r1").is_none()));
    }

    #[test]
    fn an_overfull_outbox_becomes_everything() {
        let mut outbox = Outbox::default();
        outbox.merge(Outbox {
            conversations: (0..=MAX_OUTBOX as u128).map(id).collect(),
            ..Outbox::default()
        });
        assert!(outbox.everything && outbox.conversations.is_empty());
        assert_eq!(outbox.payloads("r1"), vec!["A:r1".to_owned()]);
        assert_eq!(parse_payload("A:r1", "r2"), Some(Announcement::Everything));
        assert_eq!(parse_payload("A:r1", "r1"), None);
    }

    #[test]
    fn payloads_of_the_previous_version_are_understood() {
        let one = id(7);
        assert_eq!(
            parse_payload(&format!("c:{one}"), "r1"),
            Some(Announcement::Conversations(vec![one]))
        );
        assert_eq!(
            parse_payload("u:ada:x", "r1"),
            Some(Announcement::User("ada:x"))
        );
        assert_eq!(
            parse_payload("U:r2:ada:x", "r1"),
            Some(Announcement::User("ada:x"))
        );
        assert_eq!(parse_payload("?", "r1"), None);
    }
}
