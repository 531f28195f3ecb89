use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};

use super::{
    Store, StoreError,
    schema::{append_requests, conversations, messages, users},
    statement::{fixed, fixed_text},
};
use crate::domain::{Erased, UserId};

/// Locks the user row and then each of the user's conversations, in id order.
const LOCK_ERASED: &str = "\
    WITH owner AS (SELECT user_id FROM users WHERE user_id = $1 FOR UPDATE) \
    SELECT c.id FROM conversations c \
    WHERE c.user_id = $1 AND EXISTS (SELECT 1 FROM owner) \
    ORDER BY c.id FOR UPDATE OF c";

fixed_text!(LockErased = LOCK_ERASED);

impl Store {
    /// Erases everything stored for `owner` in one transaction: messages,
    /// idempotency keys, conversations and the user row. Watchers are told by
    /// the caller, after the commit. A second erasure finds nothing and returns zeros.
    pub async fn delete_user_data(&self, owner: &UserId) -> Result<Erased, StoreError> {
        self.with_conn(async |conn| {
            conn.transaction(async |conn| {
                self.bound_lock_waits(conn).await?;
                // One lock order for every multi-row delete: the user row,
                // then its conversations (in id order), then their messages.
                // Deleting a conversation (one, or the retention sweep's
                // batch) locks the conversation before its messages too, so
                // an erasure running beside them waits instead of
                // deadlocking, and a create waits on the user row.
                fixed::<LockErased, _>(|q| q.bind::<diesel::sql_types::Text, _>(owner.as_str()))
                    .execute(conn)
                    .await?;
                // Deleted child-first so each count is exact; the cascade from
                // `users` would remove the same rows without counting them.
                let messages = diesel::delete(messages::table)
                    .filter(messages::user_id.eq(owner.as_str()))
                    .execute(conn)
                    .await?;
                diesel::delete(append_requests::table)
                    .filter(append_requests::user_id.eq(owner.as_str()))
                    .execute(conn)
                    .await?;
                let conversations = diesel::delete(conversations::table)
                    .filter(conversations::user_id.eq(owner.as_str()))
                    .execute(conn)
                    .await?;
                diesel::delete(users::table)
                    .filter(users::user_id.eq(owner.as_str()))
                    .execute(conn)
                    .await?;
                Ok(Erased {
                    conversations: conversations as i64,
                    messages: messages as i64,
                })
            })
            .await
        })
        .await
    }
}
