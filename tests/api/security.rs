//! Least privilege in the database: the server runs as a role that owns no
//! schema and can only read and write convo's tables; migrations need a
//! privileged role (`convo migrate`).

use std::process::Stdio;

use convo::grpc::proto;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use tonic::Code;

use crate::helpers::{TestApp, append, create, expect_code};

/// The statements README's "Security" section gives for the application role.
fn grant_statements(role: &str, database: &str) -> String {
    format!(
        "CREATE ROLE {role} LOGIN; \
         GRANT CONNECT ON DATABASE {database} TO {role}; \
         GRANT USAGE ON SCHEMA public TO {role}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_runs_as_a_role_that_can_only_read_and_write_its_tables() {
    let owner = TestApp::spawn().await;
    let role = format!("app_{}", &owner.db.name["convo_test_".len()..]);
    owner.db.run_sql(&grant_statements(&role, &owner.db.name)).await;
    let app_url = owner.db.url.replacen("postgres@", &format!("{role}@"), 1);

    // Every RPC works as the unprivileged role.
    let app = TestApp::spawn_with_url(owner.db.clone(), &app_url).await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "least privilege").await;
    append(&mut alice, &created.id, "a needle").await;
    let mut watch = alice
        .watch_conversation(proto::WatchConversationRequest { conversation_id: created.id.clone(), after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tokio_stream::StreamExt::next(&mut watch).await.unwrap().unwrap().sequence, 1);
    let hits = alice
        .search_messages(proto::SearchMessagesRequest { query: "needle".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .hits;
    assert_eq!(hits.len(), 1);
    alice
        .fork_conversation(proto::ForkConversationRequest { conversation_id: created.id.clone(), ..Default::default() })
        .await
        .unwrap();
    let erased = alice.delete_user_data(proto::DeleteUserDataRequest {}).await.unwrap().into_inner();
    assert_eq!(erased.conversations_deleted, 2);
    expect_code(
        alice.get_conversation(proto::GetConversationRequest { conversation_id: created.id.clone() }).await,
        Code::NotFound,
    );

    // The role cannot change the schema: migrations are refused…
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_convo"))
        .args(["migrate", "--revert", "--database-url", &app_url])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success(), "the application role reverted a migration");
    // …and so is any DDL.
    let mut conn = AsyncPgConnection::establish(&app_url).await.unwrap();
    let ddl = conn.batch_execute("CREATE TABLE intruder (x int)").await;
    assert!(ddl.is_err(), "the application role created a table");
    let dropped = conn.batch_execute("DROP TABLE messages").await;
    assert!(dropped.is_err(), "the application role dropped a table");
    drop_role_later(&owner, &role);
    drop(conn);
    drop(app);
}

/// Roles belong to the server, not the database: drop this one once the
/// test's database (which holds its grants) is gone.
fn drop_role_later(app: &TestApp, role: &str) {
    app.db.drop_role_on_drop(role);
}
