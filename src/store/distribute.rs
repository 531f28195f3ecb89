//! Spreading the schema over a Citus cluster: every table that has a
//! `user_id` is distributed by it and co-located with `users`, so each call's
//! rows are on one worker; a table with no owner (`page_token_keys`) becomes
//! a reference table, copied to every node. `__diesel_schema_migrations`
//! stays on the coordinator.
//!
//! A separate step (`convo distribute`), not a migration, so the same
//! migrations run unchanged on plain PostgreSQL. Once a cluster is
//! distributed, `convo migrate` (and `serve`) distribute any table a new
//! migration added, before a call can write it.

use diesel::{
    QueryableByName,
    sql_types::{Bool, Text},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

use super::{migrations::quote_literal, pool::OneRow};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The table the others are co-located with: every row of a user lives on
/// the worker that holds the user's `users` row.
const ANCHOR: &str = "users";

/// What a distribution step changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Distribution {
    /// Tables distributed by `user_id` in this step, in order.
    pub distributed: Vec<String>,
    /// Tables made reference tables in this step.
    pub reference: Vec<String>,
}

/// Where the database stands with Citus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// No `citus` extension: one PostgreSQL.
    Plain,
    /// A Citus coordinator whose tables are not distributed yet.
    Undistributed,
    /// A Citus coordinator with `users` distributed.
    Distributed,
}

#[derive(QueryableByName)]
struct Flag {
    #[diesel(sql_type = Bool)]
    flag: bool,
}

#[derive(QueryableByName)]
struct Table {
    #[diesel(sql_type = Text)]
    name: String,
    /// Has a `user_id` column.
    #[diesel(sql_type = Bool)]
    owned: bool,
    /// Already in Citus's metadata.
    #[diesel(sql_type = Bool)]
    done: bool,
}

#[derive(QueryableByName)]
struct Reference {
    #[diesel(sql_type = Text)]
    from: String,
    #[diesel(sql_type = Text)]
    to: String,
}

async fn flag(conn: &mut AsyncPgConnection, sql: &str) -> Result<bool, BoxError> {
    Ok(diesel::sql_query(sql).one_row::<Flag>(conn).await?.flag)
}

/// Plain PostgreSQL, or a Citus coordinator (distributed or not). A Citus
/// worker is refused: distribution is decided on the coordinator.
pub async fn topology(conn: &mut AsyncPgConnection) -> Result<Topology, BoxError> {
    if !flag(
        conn,
        "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') AS flag",
    )
    .await?
    {
        return Ok(Topology::Plain);
    }
    if !flag(conn, "SELECT citus_is_coordinator() AS flag").await? {
        return Err("this database is a Citus worker: connect to the coordinator".into());
    }
    let distributed = flag(
        conn,
        &format!(
            "SELECT EXISTS (SELECT FROM pg_dist_partition \
             WHERE logicalrelid = to_regclass('public.{ANCHOR}')) AS flag"
        ),
    )
    .await?;
    Ok(if distributed {
        Topology::Distributed
    } else {
        Topology::Undistributed
    })
}

/// On a Citus coordinator ([`topology`] says which), distributes every
/// table of convo's schema not yet distributed, in an order Citus accepts (a
/// referenced table before the tables that reference it), and installs the
/// append's function. Running it again changes no table.
pub async fn distribute_tables(
    conn: &mut AsyncPgConnection,
    shard_count: Option<u32>,
) -> Result<Distribution, BoxError> {
    let tables: Vec<Table> = diesel::sql_query(
        "SELECT c.relname::text AS name, \
                EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid \
                        AND a.attname = 'user_id' AND NOT a.attisdropped) AS owned, \
                EXISTS (SELECT FROM pg_dist_partition p WHERE p.logicalrelid = c.oid) AS done \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') \
           AND c.relname <> '__diesel_schema_migrations' \
         ORDER BY c.relname",
    )
    .load(conn)
    .await?;
    let references: Vec<Reference> = diesel::sql_query(
        "SELECT conrelid::regclass::text AS from, confrelid::regclass::text AS to \
         FROM pg_constraint \
         WHERE contype = 'f' AND connamespace = 'public'::regnamespace \
           AND conrelid <> confrelid",
    )
    .load(conn)
    .await?;

    let mut pending: Vec<&Table> = tables.iter().filter(|t| !t.done).collect();
    let mut done: Vec<&str> = tables
        .iter()
        .filter(|t| t.done)
        .map(|t| t.name.as_str())
        .collect();
    let mut outcome = Distribution::default();
    while !pending.is_empty() {
        // Reference tables first, then the anchor, then whatever references
        // only tables already distributed.
        let ready = pending
            .iter()
            .position(|t| !t.owned)
            .or_else(|| pending.iter().position(|t| t.name == ANCHOR))
            .or_else(|| {
                pending.iter().position(|t| {
                    references
                        .iter()
                        .filter(|r| r.from == t.name)
                        .all(|r| done.contains(&r.to.as_str()))
                })
            })
            .ok_or_else(|| {
                let names: Vec<&str> = pending.iter().map(|t| t.name.as_str()).collect();
                format!(
                    "cannot order {} for distribution: their foreign keys form a cycle",
                    names.join(", ")
                )
            })?;
        let table = pending.remove(ready);
        let name = quote_literal(&table.name);
        let sql = if !table.owned {
            outcome.reference.push(table.name.clone());
            format!("SELECT create_reference_table({name})")
        } else {
            outcome.distributed.push(table.name.clone());
            let colocation = if table.name == ANCHOR {
                match shard_count {
                    Some(n) => format!("colocate_with => 'none', shard_count => {n}"),
                    None => "colocate_with => 'none'".to_owned(),
                }
            } else {
                format!("colocate_with => {}", quote_literal(ANCHOR))
            };
            format!("SELECT create_distributed_table({name}, 'user_id', {colocation})")
        };
        conn.batch_execute(&sql)
            .await
            .map_err(|e| format!("{}: {e}", table.name))?;
        done.push(table.name.as_str());
    }
    // The append's function, replaced at every run (a new version of convo
    // may bring a new body), and run by Citus where the user's shard is.
    conn.batch_execute(super::append::APPEND_FUNCTION)
        .await
        .map_err(|e| format!("convo_append_v1: {e}"))?;
    conn.batch_execute(&format!(
        "SELECT create_distributed_function(oid::regprocedure, 'p_user', \
                                            colocate_with => {}) \
         FROM pg_proc WHERE proname = 'convo_append_v1'",
        quote_literal(ANCHOR)
    ))
    .await
    .map_err(|e| format!("convo_append_v1: {e}"))?;
    // Rows that were in the tables were copied into their shards; the
    // coordinator's own copies are no longer read. Emptied last, referencing
    // tables first, once no local table references them.
    for table in outcome.distributed.iter().rev() {
        conn.batch_execute(&format!(
            "SELECT truncate_local_data_after_distributing_table({})",
            quote_literal(table)
        ))
        .await
        .map_err(|e| format!("{table}: {e}"))?;
    }
    Ok(outcome)
}
