use diesel::{
    prelude::*,
    sql_types::{BigInt, Text},
};
use diesel_async::{AsyncConnection, RunQueryDsl};

use super::{
    Store, StoreError,
    pool::OneRow,
    statement::{fixed, fixed_text},
};
use crate::domain::{Erased, UserId};

/// Locks the user row and then each of the user's conversations, in id order.
const LOCK_ERASED: &str = "\
    WITH owner AS (SELECT user_id FROM users WHERE user_id = $1 FOR UPDATE) \
    SELECT c.id FROM conversations c \
    WHERE c.user_id = $1 AND EXISTS (SELECT 1 FROM owner) \
    ORDER BY c.id FOR UPDATE OF c";

/// Deletes everything of the user, locked by [`LOCK_ERASED`], and counts
/// it. Each table is deleted from by name so that each count is exact; the
/// cascade from `users` would remove the same rows without counting them
/// (and finds nothing left when it runs, at the end of the statement). One
/// statement, where it was four round trips.
const ERASE: &str = "\
    WITH removed_messages AS (DELETE FROM messages WHERE user_id = $1 RETURNING 1), \
         forgotten AS (DELETE FROM append_requests WHERE user_id = $1), \
         removed_conversations AS (DELETE FROM conversations WHERE user_id = $1 RETURNING 1), \
         removed_user AS (DELETE FROM users WHERE user_id = $1) \
    SELECT (SELECT count(*) FROM removed_conversations) AS conversations, \
           (SELECT count(*) FROM removed_messages) AS messages";

fixed_text!(LockErased = LOCK_ERASED);
fixed_text!(Erase = ERASE);

/// What [`ERASE`] counts.
#[derive(QueryableByName)]
struct ErasedRows {
    #[diesel(sql_type = BigInt)]
    conversations: i64,
    #[diesel(sql_type = BigInt)]
    messages: i64,
}

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
                fixed::<LockErased, _>(|q| q.bind::<Text, _>(owner.as_str()))
                    .execute(conn)
                    .await?;
                let erased: ErasedRows = fixed::<Erase, _>(|q| q.bind::<Text, _>(owner.as_str()))
                    .one_row(conn)
                    .await?;
                Ok(Erased {
                    conversations: erased.conversations,
                    messages: erased.messages,
                })
            })
            .await
        })
        .await
    }
}
