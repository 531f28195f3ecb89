//! Large cases are seeded in the database in bulk (`generate_series`), not
//! through a million RPCs. The rows are shaped exactly as convo writes them.

use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use uuid::Uuid;

use crate::BoxError;

async fn connect(database_url: &str) -> Result<AsyncPgConnection, BoxError> {
    Ok(AsyncPgConnection::establish(database_url).await?)
}

#[derive(diesel::QueryableByName)]
struct Present {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    present: bool,
}

async fn has_running_byte_totals(conn: &mut AsyncPgConnection) -> Result<bool, BoxError> {
    let found: Vec<Present> = diesel::sql_query(
        "SELECT EXISTS (SELECT FROM information_schema.columns \
                         WHERE table_name = 'messages' AND column_name = 'bytes_through') AS present",
    )
    .load(conn)
    .await?;
    Ok(found.iter().any(|row| row.present))
}

async fn ensure_user(conn: &mut AsyncPgConnection, user: &str) -> Result<(), BoxError> {
    diesel::sql_query("INSERT INTO users (user_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind::<Text, _>(user)
        .execute(conn)
        .await?;
    Ok(())
}

/// A conversation of `user` holding `length` messages of about 200 bytes.
pub async fn conversation(database_url: &str, user: &str, length: i64) -> Result<Uuid, BoxError> {
    let mut conn = connect(database_url).await?;
    ensure_user(&mut conn, user).await?;
    let id = Uuid::now_v7();
    diesel::sql_query(
        "INSERT INTO conversations (user_id, id, title, create_time, update_time, message_count) \
         VALUES ($1, $2::uuid, 'seeded', now(), now(), $3)",
    )
    .bind::<Text, _>(user)
    .bind::<Text, _>(id.to_string())
    .bind::<BigInt, _>(length)
    .execute(&mut conn)
    .await?;
    // The running byte totals are written with the rows, as the append
    // writes them (updating them afterwards would leave every row twice in
    // the primary key until a vacuum), where the schema has them: a build
    // from before them is seeded by the same convo-bench when compare.sh
    // runs both.
    let totals = has_running_byte_totals(&mut conn).await?;
    let (column, value) = if totals {
        (
            ", bytes_through",
            ", sum(octet_length(content)) OVER (ORDER BY s)",
        )
    } else {
        ("", "")
    };
    let rows = format!(
        "INSERT INTO messages (user_id, conversation_id, sequence, id, role, content, \
                               create_time{column}) \
         SELECT $1, $2::uuid, s, gen_random_uuid(), 1 + (s % 2)::smallint, content, \
                now() - make_interval(secs => ($3 - s) / 1000.0){value} \
         FROM (SELECT s, 'message ' || s || ': ' || repeat('lorem ipsum dolor sit amet ', 7) \
               FROM generate_series(1, $3) AS s) AS g (s, content)"
    );
    let insert = if totals {
        format!(
            "WITH rows AS ({rows} RETURNING bytes_through) \
             UPDATE conversations SET total_bytes = (SELECT coalesce(max(bytes_through), 0) FROM rows) \
             WHERE user_id = $1 AND id = $2::uuid"
        )
    } else {
        rows
    };
    diesel::sql_query(insert)
        .bind::<Text, _>(user)
        .bind::<Text, _>(id.to_string())
        .bind::<BigInt, _>(length)
        .execute(&mut conn)
        .await?;
    conn.batch_execute("ANALYZE conversations; ANALYZE messages")
        .await?;
    Ok(id)
}

/// `count` empty conversations of `user`, updated one millisecond apart.
pub async fn conversations(database_url: &str, user: &str, count: i64) -> Result<(), BoxError> {
    let mut conn = connect(database_url).await?;
    ensure_user(&mut conn, user).await?;
    diesel::sql_query(
        "INSERT INTO conversations (user_id, id, title, create_time, update_time) \
         SELECT $1, gen_random_uuid(), 'seeded ' || s, \
                now() - make_interval(secs => s / 1000.0), now() - make_interval(secs => s / 1000.0) \
         FROM generate_series(1, $2) AS s",
    )
    .bind::<Text, _>(user)
    .bind::<BigInt, _>(count)
    .execute(&mut conn)
    .await?;
    conn.batch_execute("ANALYZE conversations").await?;
    Ok(())
}

/// The conversations pgbench's append script writes to: one per client, with
/// ids derived from pgbench's `client_id` (0-based).
pub async fn pgbench_conversations(database_url: &str, clients: usize) -> Result<(), BoxError> {
    let mut conn = connect(database_url).await?;
    ensure_user(&mut conn, "pgbench").await?;
    diesel::sql_query(
        "INSERT INTO conversations (user_id, id, title, create_time, update_time) \
         SELECT 'pgbench', ('00000000-0000-0000-0000-' || lpad(c::text, 12, '0'))::uuid, \
                'pgbench ' || c, now(), now() \
         FROM generate_series(0, $1 - 1) AS c \
         ON CONFLICT DO NOTHING",
    )
    .bind::<BigInt, _>(clients as i64)
    .execute(&mut conn)
    .await?;
    Ok(())
}
