//! The hot statements read by key whatever PostgreSQL knows of the tables.
//!
//! convo prepares each statement once per session and runs its generic plan
//! (`plan_cache_mode = force_generic_plan`), so a plan made when the session
//! first ran it, on a database not yet analyzed, is the plan for as long as
//! the session lives or until an ANALYZE. Such a plan once read every message
//! of the user on each append (the `(user_id, id)` index looked as good as
//! the primary key on a table thought tiny) and every message of the
//! conversation on each resume: appends slowed as the user's history grew,
//! and an open-loop load collapsed within seconds. These checks run on a
//! database fresh from the migrations, never analyzed.

use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

use crate::helpers::TestDb;

#[derive(QueryableByName)]
struct PlanLine {
    #[diesel(sql_type = diesel::sql_types::Text, column_name = "QUERY PLAN")]
    line: String,
}

/// Every scan in `plan` is an index scan (or a bitmap scan of an index)
/// bounded to one conversation: the
/// conversation row and earlier requests by primary key, messages by a
/// sequence range of the primary key (a listing of conversations: the
/// owner's, in the order of the update-time index; a create's retry: by its
/// request_id). Tool calls may be read through either
/// of their indexes (both lead with the conversation): before statistics
/// exist the planner cannot tell them apart, and either reads one
/// conversation's calls only.
fn assert_reads_by_key(name: &str, sql: &str, plan: &[String]) {
    let text = plan.join("\n");
    let mut message_scans = 0;
    for (at, line) in plan.iter().enumerate() {
        let Some(table) = ["messages", "conversations", "tool_calls", "append_requests"]
            .into_iter()
            .find(|table| line.contains("Scan") && line.contains(&format!(" on {table} ")))
        else {
            continue;
        };
        // A bitmap scan names its index and condition on the lines below it.
        let (line, condition) = if line.contains("Bitmap Heap Scan") {
            let below = |what: &str| {
                plan[at + 1..]
                    .iter()
                    .find(|l| l.contains(what))
                    .map(String::as_str)
                    .unwrap_or_default()
            };
            (below("Bitmap Index Scan"), below("Index Cond"))
        } else {
            let next = plan.get(at + 1).map(String::as_str).unwrap_or_default();
            (line.as_str(), next)
        };
        assert!(
            line.contains("Index Scan")
                && condition.contains("Index Cond")
                && condition.contains("user_id"),
            "{name}: {table} read other than through an index:\n{text}"
        );
        match table {
            "tool_calls" => assert!(
                condition.contains("conversation_id"),
                "{name}: tool calls read beyond one conversation:\n{text}"
            ),
            "messages" => {
                message_scans += 1;
                assert!(
                    line.contains("messages_pkey")
                        && condition.contains("conversation_id")
                        && condition.contains("sequence"),
                    "{name}: messages read other than by a range of one conversation:\n{text}"
                );
            }
            // A listing of conversations walks the owner's in update order,
            // already sorted for its ORDER BY and LIMIT.
            // A create's retry reads the conversation its request_id made.
            "conversations" if name == "create conversation" => assert!(
                line.contains("conversations_request_id_key") && condition.contains("request_id"),
                "{name}: a retry read other than by its request_id:\n{text}"
            ),
            "conversations" if name.starts_with("list conversations") => assert!(
                line.contains("conversations_by_update_time") && !text.contains("Sort"),
                "{name}: conversations listed other than in index order:\n{text}"
            ),
            _ => assert!(
                line.contains(&format!("{table}_pkey")),
                "{name}: {table} read other than by its primary key:\n{text}"
            ),
        }
    }
    // A statement that reads messages shows the read in its plan (not only
    // an insert); the lean append reads none.
    if sql.contains("FROM messages") {
        assert!(message_scans > 0, "{name}: no read of messages in:\n{text}");
    }
}

/// PREPAREs every hot statement on `conn` and checks its generic plan.
async fn check_hot_statements(conn: &mut AsyncPgConnection) {
    conn.batch_execute("SET plan_cache_mode = force_generic_plan")
        .await
        .unwrap();
    for (index, (name, sql, binds)) in convo::store::hot_statements(false).into_iter().enumerate() {
        conn.batch_execute(&format!("PREPARE hot_{index} AS {sql}"))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}\n{sql}"));
        let nulls = vec!["NULL"; binds].join(", ");
        let plan: Vec<PlanLine> =
            diesel::sql_query(format!("EXPLAIN EXECUTE hot_{index}({nulls})"))
                .load(conn)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        let plan: Vec<String> = plan.into_iter().map(|l| l.line).collect();
        assert_reads_by_key(&name, &sql, &plan);
    }
}

#[tokio::test]
async fn hot_statements_read_by_key_on_a_database_never_analyzed() {
    if crate::helpers::on_citus() {
        // A Citus coordinator plans each call with its values (store/pool.rs);
        // citus.rs checks those plans stay on one shard.
        eprintln!("skipped on Citus: sessions there use custom plans");
        return;
    }
    let db = TestDb::create().await;
    check_hot_statements(&mut db.connect().await).await;
}

/// The same plans on an analyzed database where a few users hold the rows,
/// unevenly (every table holds some: an analyzed empty table is planned as
/// a scan of nothing, and the first ANALYZE after it fills replans). A generic plan estimates one owner's rows as the table's share
/// per distinct user: with three users, a third of the table. The listing
/// of conversations then once walked an index on `update_time` alone,
/// newest first, filtering out every newer conversation of the other users
/// (46,978 rows for one page of 51, 28 ms instead of 0.07).
#[tokio::test]
async fn hot_statements_read_by_key_when_few_users_hold_the_rows() {
    if crate::helpers::on_citus() {
        eprintln!("skipped on Citus: sessions there use custom plans");
        return;
    }
    let db = TestDb::create().await;
    let mut conn = db.connect().await;
    conn.batch_execute(
        "INSERT INTO users (user_id) VALUES ('few'), ('many'), ('idle'); \
         INSERT INTO conversations (user_id, id, create_time, update_time) \
         SELECT 'few', gen_random_uuid(), t, t \
           FROM generate_series(now() - interval '2 days', now() - interval '1 day', \
                                interval '20 minutes') AS t; \
         INSERT INTO conversations (user_id, id, create_time, update_time) \
         SELECT 'many', gen_random_uuid(), t, t \
           FROM generate_series(now() - interval '1 day', now(), interval '5 seconds') AS t; \
         INSERT INTO conversations (user_id, id, create_time, update_time) \
         VALUES ('idle', gen_random_uuid(), now() - interval '3 days', now() - interval '3 days'); \
         INSERT INTO messages (user_id, conversation_id, sequence, id, role, content, create_time) \
         SELECT c.user_id, c.id, s, gen_random_uuid(), 1 + (s % 2)::smallint, 'message ' || s, now() \
           FROM (SELECT user_id, id FROM conversations WHERE user_id = 'many' LIMIT 20) AS c \
          CROSS JOIN generate_series(1, 1000) AS s; \
         INSERT INTO messages (user_id, conversation_id, sequence, id, role, content, create_time) \
         SELECT c.user_id, c.id, s, gen_random_uuid(), 1, 'message ' || s, now() \
           FROM (SELECT user_id, id FROM conversations WHERE user_id = 'few' LIMIT 1) AS c \
          CROSS JOIN generate_series(1, 10) AS s; \
         UPDATE conversations c SET message_count = m.n \
           FROM (SELECT user_id, conversation_id, count(*) AS n FROM messages GROUP BY 1, 2) AS m \
          WHERE c.user_id = m.user_id AND c.id = m.conversation_id; \
         INSERT INTO append_requests (user_id, conversation_id, request_id, first_sequence, \
                                      message_count, create_time) \
         SELECT user_id, conversation_id, 'r' || sequence, sequence, 1, now() FROM messages; \
         INSERT INTO tool_calls (user_id, conversation_id, tool_call_id, sequence) \
         SELECT user_id, conversation_id, 'call_' || sequence, sequence FROM messages; \
         ANALYZE",
    )
    .await
    .unwrap();
    check_hot_statements(&mut conn).await;
}
