use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};

use super::{
    Store, StoreError, changes,
    schema::{append_requests, conversations, messages, users},
};
use crate::domain::{Erased, UserId};

impl Store {
    /// Erases everything stored for `owner` in one transaction: messages,
    /// idempotency keys, conversations and the user row. Watchers on every
    /// replica are told. A second erasure finds nothing and returns zeros.
    pub async fn delete_user_data(&self, owner: &UserId) -> Result<Erased, StoreError> {
        self.with_conn(async |conn| {
            conn.transaction(async |conn| {
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
                let user = diesel::delete(users::table)
                    .filter(users::user_id.eq(owner.as_str()))
                    .execute(conn)
                    .await?;
                if user > 0 {
                    changes::notify(conn, &changes::user_changed(owner)).await?;
                }
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
