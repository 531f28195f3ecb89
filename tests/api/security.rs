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
    owner
        .db
        .run_sql(&grant_statements(&role, &owner.db.name))
        .await;
    let app_url = owner.db.url.replacen("postgres@", &format!("{role}@"), 1);

    // Every RPC works as the unprivileged role.
    let app = TestApp::spawn_with_url(owner.db.clone(), &app_url).await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "least privilege").await;
    append(&mut alice, &created.id, "a needle").await;
    let mut watch = alice
        .watch_conversation(proto::WatchConversationRequest {
            conversation_id: created.id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        tokio_stream::StreamExt::next(&mut watch)
            .await
            .unwrap()
            .unwrap()
            .sequence,
        1
    );
    let hits = alice
        .search_messages(proto::SearchMessagesRequest {
            query: "needle".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .hits;
    assert_eq!(hits.len(), 1);
    alice
        .fork_conversation(proto::ForkConversationRequest {
            conversation_id: created.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let erased = alice
        .delete_user_data(proto::DeleteUserDataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(erased.conversations_deleted, 2);
    expect_code(
        alice
            .get_conversation(proto::GetConversationRequest {
                conversation_id: created.id.clone(),
            })
            .await,
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
    assert!(
        !refused.status.success(),
        "the application role reverted a migration"
    );
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

mod transport {
    use std::{net::SocketAddr, time::Duration};

    use convo::{
        grpc::proto::{self, conversation_service_client::ConversationServiceClient},
        startup::{Application, TlsSettings},
    };
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tokio::sync::oneshot;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    use tonic_health::pb::health_check_response::ServingStatus;

    use crate::helpers::{TestDb, UserHeader, health, test_settings};

    /// A certificate authority made for one test.
    struct Authority {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    impl Authority {
        fn new(name: &str) -> Self {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let pem = params.self_signed(&key).unwrap().pem();
            Self {
                pem,
                issuer: Issuer::new(params, key),
            }
        }

        /// A certificate and key (PEM) for `names`.
        fn issue(&self, names: &[&str]) -> (String, String) {
            let params =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                    .unwrap();
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    struct TlsServer {
        addr: SocketAddr,
        health_addr: SocketAddr,
        _db: TestDb,
        _stop: oneshot::Sender<()>,
    }

    async fn start(tls: TlsSettings) -> TlsServer {
        let db = TestDb::create().await;
        let health_addr: SocketAddr = {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            format!("127.0.0.1:{port}").parse().unwrap()
        };
        let mut settings = test_settings(&db.url);
        settings.tls = Some(tls);
        settings.health_listen = Some(health_addr);
        let app = Application::build(settings).await.unwrap();
        let addr = app.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        TlsServer {
            addr,
            health_addr,
            _db: db,
            _stop: stop,
        }
    }

    async fn tls_channel(
        addr: SocketAddr,
        ca: &str,
        identity: Option<(&str, &str)>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Channel::from_shared(format!("https://localhost:{}", addr.port()))
            .unwrap()
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
    }

    async fn create(channel: Channel) -> Result<proto::Conversation, tonic::Status> {
        ConversationServiceClient::with_interceptor(channel, UserHeader::new("alice"))
            .create_conversation(proto::CreateConversationRequest {
                title: "over tls".into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_serves_clients_that_trust_the_server_and_refuses_plaintext() {
        let authority = Authority::new("convo test CA");
        let (cert, key) = authority.issue(&["localhost", "127.0.0.1"]);
        let server = start(TlsSettings {
            cert_pem: cert.into_bytes(),
            key_pem: key.into_bytes(),
            client_ca_pem: None,
        })
        .await;

        let channel = tls_channel(server.addr, &authority.pem, None)
            .await
            .expect("a TLS connection");
        assert_eq!(
            create(channel).await.expect("a call over TLS").title,
            "over tls"
        );

        // A plaintext client gets nowhere.
        let plaintext = Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await;
        if let Ok(channel) = plaintext {
            assert!(
                create(channel).await.is_err(),
                "a plaintext call was served"
            );
        }
        // A client that does not trust the server's CA refuses it.
        let stranger = Authority::new("another CA");
        let untrusted = tls_channel(server.addr, &stranger.pem, None).await;
        if let Ok(channel) = untrusted {
            assert!(
                create(channel).await.is_err(),
                "a server from an untrusted CA was accepted"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_client_ca() {
        let server_ca = Authority::new("convo server CA");
        let client_ca = Authority::new("orchestrator CA");
        let (cert, key) = server_ca.issue(&["localhost"]);
        let server = start(TlsSettings {
            cert_pem: cert.into_bytes(),
            key_pem: key.into_bytes(),
            client_ca_pem: Some(client_ca.pem.clone().into_bytes()),
        })
        .await;

        let (client_cert, client_key) = client_ca.issue(&["orchestrator"]);
        let trusted = tls_channel(
            server.addr,
            &server_ca.pem,
            Some((&client_cert, &client_key)),
        )
        .await
        .expect("connect");
        assert_eq!(
            create(trusted)
                .await
                .expect("the orchestrator is served")
                .title,
            "over tls"
        );

        // No client certificate, or one from another CA: refused.
        let rogue_ca = Authority::new("rogue CA");
        let (rogue_cert, rogue_key) = rogue_ca.issue(&["orchestrator"]);
        for identity in [None, Some((rogue_cert.as_str(), rogue_key.as_str()))] {
            if let Ok(channel) = tls_channel(server.addr, &server_ca.pem, identity).await {
                let refused = create(channel).await;
                assert!(
                    refused.is_err(),
                    "served a client with {:?}",
                    identity.map(|_| "a rogue certificate")
                );
            }
        }

        // Probes reach health in plaintext on their own address, and only health.
        let probe = Channel::from_shared(format!("http://{}", server.health_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        assert_eq!(health(probe.clone(), "").await, ServingStatus::Serving);
        assert!(
            create(probe).await.is_err(),
            "the probe address served convo.v1"
        );
    }
}
