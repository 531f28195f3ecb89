//! Least privilege in the database: the server runs as a role that owns no
//! schema and can only read and write convo's tables; migrations need a
//! privileged role (`convo migrate`).

use std::process::Stdio;

use convo::grpc::proto;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use tonic::Code;

use crate::helpers::{TestApp, append, create, expect_code, watch};

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
    let mut watch = watch(&mut alice, &created.id, 0).await;
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
    // The binary runs as that role too, checking the schema instead of migrating.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_convo"))
        .args([
            "serve",
            "--skip-migrations",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--database-url",
            &app_url,
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let channel = loop {
        if let Ok(channel) =
            tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect()
                .await
        {
            break channel;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "convo serve --skip-migrations did not start"
        );
        assert!(
            server.try_wait().unwrap().is_none(),
            "convo serve --skip-migrations exited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let served = proto::conversation_service_client::ConversationServiceClient::with_interceptor(
        channel,
        crate::helpers::UserHeader::new("bob"),
    )
    .create_conversation(proto::CreateConversationRequest::default())
    .await;
    assert!(served.is_ok(), "{served:?}");
    let _ = server.kill().await;
    drop_role_later(&owner, &role);
    drop(conn);
    drop(app);
}

/// Roles belong to the server, not the database: drop this one once the
/// test's database (which holds its grants) is gone.
fn drop_role_later(app: &TestApp, role: &str) {
    app.db.drop_role_on_drop(role);
}

pub(crate) mod transport {
    use std::{net::SocketAddr, time::Duration};

    use convo::{
        config::TlsSettings,
        grpc::proto::{self, conversation_service_client::ConversationServiceClient},
        startup::Application,
    };
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tokio::sync::oneshot;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    use tonic_health::pb::health_check_response::ServingStatus;

    use crate::helpers::{TestDb, UserHeader, health, test_settings};

    /// A certificate authority made for one test.
    pub(crate) struct Authority {
        pub(crate) pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    impl Authority {
        pub(crate) fn new(name: &str) -> Self {
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
        pub(crate) fn issue(&self, names: &[&str]) -> (String, String) {
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

    pub(crate) async fn tls_channel(
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

mod jwt {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    use convo::{config::JwtSettings, grpc::proto};
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    use serde_json::json;
    use tonic::{Code, Request};

    use crate::helpers::TestApp;

    const SECRET: &[u8] = b"a-test-secret-of-at-least-32-bytes!!";

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn hs256(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn settings() -> JwtSettings {
        JwtSettings {
            secret: Some(SECRET.to_vec()),
            issuer: Some("https://auth.example".into()),
            audience: Some("convo".into()),
            user_claim: "sub".into(),
            leeway: Duration::from_secs(5),
            public_key_pem: None,
            jwks_json: None,
        }
    }

    fn good_claims(user: &str) -> serde_json::Value {
        json!({"sub": user, "iss": "https://auth.example", "aud": "convo", "exp": now() + 300, "nbf": now() - 10})
    }

    async fn call(
        app: &TestApp,
        token: Option<&str>,
        asserted: Option<&str>,
    ) -> Result<proto::Conversation, tonic::Status> {
        let mut request = Request::new(proto::CreateConversationRequest {
            title: "jwt".into(),
            ..Default::default()
        });
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        if let Some(user) = asserted {
            request
                .metadata_mut()
                .insert("x-user-id", user.parse().unwrap());
        }
        proto::conversation_service_client::ConversationServiceClient::new(app.channel())
            .create_conversation(request)
            .await
            .map(|r| r.into_inner())
    }

    #[track_caller]
    fn refused(result: Result<proto::Conversation, tonic::Status>, why: &str) {
        let status = result.expect_err("the call must be refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(
            status.message().contains(why),
            "{:?} does not say {why:?}",
            status.message()
        );
    }

    #[tokio::test]
    async fn a_valid_token_names_the_caller_and_every_failed_check_is_named() {
        let app = TestApp::spawn_with(|s| s.jwt = Some(settings())).await;
        let created = call(&app, Some(&hs256(good_claims("alice"))), None)
            .await
            .expect("a valid token");
        assert_eq!(created.user_id, "alice");
        // A matching x-user-id is fine; a conflicting one is refused.
        assert!(
            call(&app, Some(&hs256(good_claims("alice"))), Some("alice"))
                .await
                .is_ok()
        );
        refused(
            call(&app, Some(&hs256(good_claims("alice"))), Some("mallory")).await,
            "does not match",
        );
        // x-user-id alone is no identity in this mode.
        refused(
            call(&app, None, Some("alice")).await,
            "missing authorization",
        );

        let mut expired = good_claims("alice");
        expired["exp"] = json!(now() - 60);
        refused(call(&app, Some(&hs256(expired)), None).await, "expired");
        let mut early = good_claims("alice");
        early["nbf"] = json!(now() + 600);
        refused(call(&app, Some(&hs256(early)), None).await, "not valid yet");
        let mut issuer = good_claims("alice");
        issuer["iss"] = json!("https://evil.example");
        refused(call(&app, Some(&hs256(issuer)), None).await, "issuer");
        let mut audience = good_claims("alice");
        audience["aud"] = json!("someone-else");
        refused(call(&app, Some(&hs256(audience)), None).await, "audience");
        let mut no_exp = good_claims("alice");
        no_exp.as_object_mut().unwrap().remove("exp");
        refused(call(&app, Some(&hs256(no_exp)), None).await, "exp");
        let mut no_sub = good_claims("alice");
        no_sub.as_object_mut().unwrap().remove("sub");
        refused(call(&app, Some(&hs256(no_sub)), None).await, "sub");
        let mut bad_user = good_claims("alice");
        bad_user["sub"] = json!("has space");
        refused(
            call(&app, Some(&hs256(bad_user)), None).await,
            "not a valid user id",
        );
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &good_claims("alice"),
            &EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!"),
        )
        .unwrap();
        refused(call(&app, Some(&forged), None).await, "signature");
        refused(call(&app, Some("not.a.jwt"), None).await, "");
        // Within the leeway, a just-expired token still passes.
        let mut skewed = good_claims("alice");
        skewed["exp"] = json!(now() - 2);
        assert!(call(&app, Some(&hs256(skewed)), None).await.is_ok());
    }

    #[tokio::test]
    async fn the_user_can_come_from_another_claim() {
        let app = TestApp::spawn_with(|s| {
            s.jwt = Some(JwtSettings {
                user_claim: "uid".into(),
                ..settings()
            });
        })
        .await;
        let mut claims = good_claims("ignored");
        claims["uid"] = json!("user-42");
        assert_eq!(
            call(&app, Some(&hs256(claims)), None)
                .await
                .unwrap()
                .user_id,
            "user-42"
        );
    }

    #[tokio::test]
    async fn es256_tokens_verify_with_a_public_key_or_a_jwks() {
        let key = rcgen::KeyPair::generate().unwrap(); // ECDSA P-256
        let signing = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("key-1".into());
        let token = encode(&header, &good_claims("bob"), &signing).unwrap();

        let with_pem = TestApp::spawn_with(|s| {
            s.jwt = Some(JwtSettings {
                secret: None,
                public_key_pem: Some(key.public_key_pem().into_bytes()),
                ..settings()
            });
        })
        .await;
        assert_eq!(
            call(&with_pem, Some(&token), None).await.unwrap().user_id,
            "bob"
        );
        // An HS256 token signed with the public key as a secret (algorithm
        // confusion) is refused.
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &good_claims("bob"),
            &EncodingKey::from_secret(key.public_key_pem().as_bytes()),
        )
        .unwrap();
        refused(call(&with_pem, Some(&confused), None).await, "algorithm");

        let raw = key.public_key_raw();
        let jwks = json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "key-1", "use": "sig", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        }]});
        let with_jwks = TestApp::spawn_with(|s| {
            s.jwt = Some(JwtSettings {
                secret: None,
                jwks_json: Some(jwks.to_string().into_bytes()),
                ..settings()
            });
        })
        .await;
        assert_eq!(
            call(&with_jwks, Some(&token), None).await.unwrap().user_id,
            "bob"
        );
        let mut unknown = Header::new(Algorithm::ES256);
        unknown.kid = Some("key-2".into());
        let unknown_kid = encode(&unknown, &good_claims("bob"), &signing).unwrap();
        refused(call(&with_jwks, Some(&unknown_kid), None).await, "no key");
    }

    #[tokio::test]
    async fn jwks_keys_are_used_only_for_what_they_say() {
        let key = rcgen::KeyPair::generate().unwrap(); // ECDSA P-256
        let signing = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("key-1".into());
        let token = encode(&header, &good_claims("bob"), &signing).unwrap();
        let raw = key.public_key_raw();
        let jwk = |extra: serde_json::Value| {
            let mut jwk = json!({
                "kty": "EC", "crv": "P-256", "kid": "key-1",
                "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
            });
            jwk.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            json!({ "keys": [jwk] }).to_string().into_bytes()
        };
        for (extra, accepted) in [
            (json!({}), true),
            (json!({"use": "sig", "alg": "ES256"}), true),
            (json!({"use": "enc"}), false),
            (json!({"alg": "ES384"}), false),
        ] {
            let app = TestApp::spawn_with(|s| {
                s.jwt = Some(JwtSettings {
                    secret: None,
                    jwks_json: Some(jwk(extra.clone())),
                    ..settings()
                });
            })
            .await;
            let result = call(&app, Some(&token), None).await;
            assert_eq!(result.is_ok(), accepted, "{extra}: {result:?}");
        }
    }

    #[test]
    fn jwt_mode_needs_an_issuer_and_an_audience() {
        for (issuer, audience) in [
            (None, Some("convo".to_owned())),
            (Some("https://auth.example".to_owned()), None),
            (None, None),
        ] {
            let refused = convo::grpc::JwtVerifier::new(&JwtSettings {
                issuer,
                audience,
                ..settings()
            })
            .expect_err("started without an expected issuer and audience");
            assert!(
                refused.contains("--jwt-issuer and --jwt-audience"),
                "{refused}"
            );
        }
    }

    #[tokio::test]
    async fn a_token_without_an_audience_or_issuer_is_refused() {
        let app = TestApp::spawn_with(|s| s.jwt = Some(settings())).await;
        for claim in ["aud", "iss"] {
            let mut claims = good_claims("bob");
            claims.as_object_mut().unwrap().remove(claim);
            let token = encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET),
            )
            .unwrap();
            assert!(call(&app, Some(&token), None).await.is_err(), "no {claim}");
        }
    }
}

/// A failed TLS handshake is logged at warn with its reason, so an operator
/// can see why a client cannot connect.
mod handshake_log {
    use std::time::Duration;

    use super::transport::Authority;
    use crate::helpers::TestDb;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_client_certificate_is_logged_at_warn_with_the_reason() {
        let db = TestDb::create().await;
        let dir =
            std::env::temp_dir().join(format!("convo-tls-log-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let server_ca = Authority::new("server CA");
        let client_ca = Authority::new("client CA");
        let stranger = Authority::new("another CA");
        let (cert, key) = server_ca.issue(&["localhost"]);
        for (name, pem) in [
            ("cert.pem", &cert),
            ("key.pem", &key),
            ("client-ca.pem", &client_ca.pem),
        ] {
            std::fs::write(dir.join(name), pem).unwrap();
        }
        let (mut server, addr) = crate::helpers::start_convo(|command| {
            command
                .args(["--log-format", "json", "--database-url", &db.url])
                .arg("--tls-cert")
                .arg(dir.join("cert.pem"))
                .arg("--tls-key")
                .arg(dir.join("key.pem"))
                .arg("--tls-client-ca")
                .arg(dir.join("client-ca.pem"));
        })
        .await;
        // A client whose certificate comes from a CA the server does not trust.
        let (bad_cert, bad_key) = stranger.issue(&["intruder"]);
        let refused =
            super::transport::tls_channel(addr, &server_ca.pem, Some((&bad_cert, &bad_key))).await;
        if let Ok(channel) = refused {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            assert!(
                health
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .is_err(),
                "a certificate from an unknown CA was accepted"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let log = crate::helpers::stop_and_read_json_log(&mut server).await;
        let failures: Vec<&serde_json::Value> = log
            .iter()
            .filter(|line| line["message"] == "TLS handshake failed")
            .collect();
        assert!(
            !failures.is_empty(),
            "no warning for the refused handshake: {log:?}"
        );
        assert_eq!(failures[0]["level"], "WARN");
        let reason = failures[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase();
        assert!(reason.contains("certificate"), "{}", failures[0]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// TLS between convo and PostgreSQL, from `sslmode`/`sslrootcert` in the URL.
mod database_tls {
    use std::time::Duration;

    use convo::{
        local_postgres::{Access, LocalPostgres, LocalPostgresOptions},
        startup::{self, Application},
    };
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
    use nix::unistd::{Uid, User, chown};

    use super::transport::Authority;
    use crate::helpers::{UserHeader, test_settings};

    #[derive(diesel::QueryableByName)]
    struct Encrypted {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        plain: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        encrypted: i64,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn convo_reaches_postgres_over_tls_and_checks_whom_it_reaches() {
        let dir =
            std::env::temp_dir().join(format!("convo-db-tls-{}", uuid::Uuid::now_v7().simple()));
        let cluster = LocalPostgres::start(&LocalPostgresOptions {
            data_dir: dir.clone(),
            fsync: false,
            access: Access::Loopback { port: None },
            relocate_if_unreachable: false,
        })
        .await
        .expect("a cluster to put TLS on");
        // A certificate for "localhost" from a CA made here, in the data
        // directory, readable by the cluster's account only.
        let ca = Authority::new("convo test database CA");
        let (cert, key) = ca.issue(&["localhost"]);
        for (name, pem) in [("server.crt", &cert), ("server.key", &key)] {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            if Uid::effective().is_root() {
                let postgres = User::from_name("postgres").unwrap().unwrap();
                chown(&path, Some(postgres.uid), Some(postgres.gid)).unwrap();
            }
        }
        let admin_url = cluster.url("postgres");
        let mut admin = AsyncPgConnection::establish(&admin_url).await.unwrap();
        for sql in [
            "ALTER SYSTEM SET ssl = on",
            "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
            "ALTER SYSTEM SET ssl_key_file = 'server.key'",
            "SELECT pg_reload_conf()",
        ] {
            diesel::sql_query(sql).execute(&mut admin).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let roots = dir.join("ca.pem");
        std::fs::write(&roots, &ca.pem).unwrap();
        let port = admin_url
            .rsplit(':')
            .next()
            .and_then(|rest| rest.split('/').next())
            .unwrap()
            .to_owned();
        let url =
            |host: &str, query: &str| format!("postgres://postgres@{host}:{port}/convo?{query}");
        let full = url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={}", roots.display()),
        );

        // Migrations and the server, over verified TLS.
        startup::prepare_database(&full)
            .await
            .expect("migrate over TLS");
        let app = Application::build(test_settings(&full))
            .await
            .expect("serve over TLS");
        let addr = app.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = convo::grpc::proto::conversation_service_client::ConversationServiceClient::with_interceptor(
            channel,
            UserHeader::new("alice"),
        );
        client
            .create_conversation(convo::grpc::proto::CreateConversationRequest::default())
            .await
            .expect("a call through a TLS pool");
        // Every session convo opened (pool and listener) is encrypted.
        let sessions: Encrypted = diesel::sql_query(
            "SELECT count(*) FILTER (WHERE NOT s.ssl) AS plain, count(*) FILTER (WHERE s.ssl) AS encrypted \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = 'convo'",
        )
        .get_result(&mut admin)
        .await
        .unwrap();
        assert_eq!(sessions.plain, 0);
        assert!(sessions.encrypted >= 2, "the pool and the listener");
        let _ = stop.send(());
        server.await.unwrap().unwrap();

        // Another CA: refused under verify-full and verify-ca.
        let stranger = Authority::new("someone else");
        let other_roots = dir.join("other-ca.pem");
        std::fs::write(&other_roots, &stranger.pem).unwrap();
        for mode in ["verify-full", "verify-ca"] {
            let wrong = url(
                "localhost",
                &format!("sslmode={mode}&sslrootcert={}", other_roots.display()),
            );
            let refused = startup::prepare_database(&wrong)
                .await
                .expect_err(&format!("{mode} accepted a certificate from an unknown CA"))
                .to_string();
            assert!(refused.to_lowercase().contains("certificate"), "{refused}");
        }
        // The right CA but another name: verify-full refuses, verify-ca does not
        // look at names; require encrypts without looking at all.
        let by_address = |query: &str| url("127.0.0.1", query);
        let refused = startup::prepare_database(&by_address(&format!(
            "sslmode=verify-full&sslrootcert={}",
            roots.display()
        )))
        .await
        .expect_err("verify-full accepted a certificate for another name")
        .to_string();
        assert!(refused.to_lowercase().contains("certificate"), "{refused}");
        startup::prepare_database(&by_address(&format!(
            "sslmode=verify-ca&sslrootcert={}",
            roots.display()
        )))
        .await
        .expect("verify-ca checks the chain, not the name");
        startup::prepare_database(&by_address("sslmode=require"))
            .await
            .expect("require encrypts without a root");

        drop(admin);
        cluster.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
