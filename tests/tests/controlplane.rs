//! Policy sync end to end: a real control plane (`controlplane::serve_on`) and a real node
//! client (`sync::run`) over TLS on 127.0.0.1, with certificates from `certs::generate` and
//! a signing key from `bundle::keygen` in a temporary directory. The test plays the daemon:
//! it receives each `PolicyUpdate` and replies. A hand-written `PolicySync` server sends
//! crafted bundles the real control plane never would.
//!
//! No root needed. Every wait has a generous deadline that only turns a hang into a
//! failure; nothing asserts on timing.

use std::{future::Future, net::SocketAddr, path::PathBuf, time::Duration};

use enforcer::controlplane::{
    self, ControlPlaneConfig, ControlPlaneError, NodeStatus,
    bundle::{self, SigningKey},
    certs::{self, CertPaths},
    proto::{
        Ack, NodeMessage, node_message::Kind, policy_sync_client::PolicySyncClient,
        policy_sync_server::PolicySyncServer,
    },
    sync::{self, ClientEndpoint, ConnectionState, PolicyUpdate, SyncConfig, SyncError},
};
use integration_tests::CraftedControlPlane;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

/// Turns a hang into a failure; far above anything these tests need.
const DEADLINE: Duration = Duration::from_secs(60);

const POLICY_A: &str = r#"[[agents]]
id = 1
name = "coder"
prefixes = ["10.77.1.2"]
egress_default = "deny"
"#;

const POLICY_B: &str = r#"[[agents]]
id = 1
name = "coder"
prefixes = ["10.77.1.2"]
egress_default = "allow"
"#;

/// What the daemon reports after applying generation `generation` (no audit log here).
fn applied(generation: u64) -> sync::Applied {
    sync::Applied {
        generation,
        audit: None,
    }
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A temporary directory with certificates, a signing key and a policy directory.
struct Env {
    dir: tempfile::TempDir,
    certs: CertPaths,
    signing_key: PathBuf,
    public_key: String,
}

impl Env {
    fn new() -> Env {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let certs = certs::generate(
            &dir.path().join("certs"),
            &["localhost", "127.0.0.1"],
            &["node-1"],
        )
        .unwrap();
        let keys = bundle::keygen(&dir.path().join("keys")).unwrap();
        let public_key = std::fs::read_to_string(&keys.public_key).unwrap();
        std::fs::create_dir_all(dir.path().join("policies/nodes")).unwrap();
        Env {
            dir,
            certs,
            signing_key: keys.private_key,
            public_key,
        }
    }

    fn policies(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    fn write_policy(&self, name: &str, text: &str) {
        // Write then rename, as editors and config management do, so a scan never sees a
        // half-written file.
        let path = self.policies().join(name);
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    fn server_config(&self) -> ControlPlaneConfig {
        ControlPlaneConfig {
            dir: Some(self.policies()),
            signing_key: Some(self.signing_key.clone()),
            etcd: None,
            name: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            tls_cert: Some(self.certs.server.cert.clone()),
            tls_key: Some(self.certs.server.key.clone()),
            client_ca: None,
            insecure: false,
            poll_interval_ms: 50,
        }
    }

    fn client_config(&self, addr: SocketAddr, node_id: &str) -> SyncConfig {
        SyncConfig {
            url: format!("https://{addr}"),
            urls: Vec::new(),
            ca: Some(self.certs.ca.cert.clone()),
            client_cert: None,
            client_key: None,
            server_name: None,
            node_id: node_id.into(),
            labels: [("zone".to_string(), "test".to_string())].into(),
            trusted_keys: vec![self.public_key.clone()],
            backoff_min_ms: 20,
            backoff_max_ms: 500,
            insecure: false,
        }
    }

    /// How the CLI would reach a server of this environment.
    fn endpoint(&self, addr: SocketAddr) -> ClientEndpoint {
        ClientEndpoint {
            url: format!("https://{addr}"),
            ca: Some(self.certs.ca.cert.clone()),
            ..ClientEndpoint::default()
        }
    }
}

/// A control plane running in a task.
struct RunningServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ControlPlaneError>>,
}

impl RunningServer {
    async fn start(cfg: ControlPlaneConfig) -> RunningServer {
        let listener = TcpListener::bind(cfg.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, signal) = oneshot::channel::<()>();
        let task = tokio::spawn(controlplane::serve_on(cfg, listener, async {
            let _ = signal.await;
        }));
        RunningServer {
            addr,
            shutdown: Some(shutdown),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        within("the control plane to shut down", self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

/// A node client running in a task; the test holds the daemon's side of its channels.
struct RunningClient {
    updates: mpsc::Receiver<PolicyUpdate>,
    state: watch::Receiver<ConnectionState>,
    task: JoinHandle<Result<(), SyncError>>,
}

impl RunningClient {
    fn start(cfg: SyncConfig, held_version: u64) -> RunningClient {
        let (updates_tx, updates) = mpsc::channel(1);
        let (state_tx, state) = watch::channel(ConnectionState::default());
        let task = tokio::spawn(sync::run(
            cfg,
            sync::Held {
                version: held_version,
                floor_only: false,
            },
            updates_tx,
            state_tx,
        ));
        RunningClient {
            updates,
            state,
            task,
        }
    }

    async fn next_update(&mut self) -> PolicyUpdate {
        within("a policy update", self.updates.recv())
            .await
            .expect("the sync client stopped")
    }

    async fn wait_state(
        &mut self,
        what: &str,
        mut pred: impl FnMut(&ConnectionState) -> bool,
    ) -> ConnectionState {
        within(what, self.state.wait_for(|s| pred(s)))
            .await
            .unwrap()
            .clone()
    }

    async fn wait_backoff(&mut self) -> String {
        match self
            .wait_state("backoff", |s| matches!(s, ConnectionState::Backoff { .. }))
            .await
        {
            ConnectionState::Backoff { last_error, .. } => sync::error_text(&*last_error),
            _ => unreachable!(),
        }
    }

    /// Drops the daemon side: the client returns `Ok(())`.
    async fn stop(self) {
        let RunningClient { updates, task, .. } = self;
        drop(updates);
        within("the sync client to exit", task)
            .await
            .unwrap()
            .unwrap();
    }
}

/// Polls `Nodes` until `node_id` satisfies `pred`.
async fn wait_node(
    endpoint: &ClientEndpoint,
    node_id: &str,
    what: &str,
    pred: impl Fn(&NodeStatus) -> bool,
) -> NodeStatus {
    within(what, async {
        loop {
            let nodes = controlplane::nodes(endpoint).await.unwrap();
            if let Some(node) = nodes.into_iter().find(|n| n.node_id == node_id)
                && pred(&node)
            {
                return node;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test]
async fn bundle_reaches_node_verified_and_is_acked() {
    let env = Env::new();
    env.write_policy("default.toml", POLICY_A);
    let server = RunningServer::start(env.server_config()).await;
    let mut client = RunningClient::start(env.client_config(server.addr, "node-1"), 0);

    let update = client.next_update().await;
    let version = update.bundle.version();
    assert_eq!(update.bundle.policy(), POLICY_A.as_bytes());
    assert_eq!(update.bundle.source(), "default.toml");
    let policy = update.bundle.parse_policy().unwrap();
    assert_eq!(policy.agents()[0].name, "coder");
    update.reply.send(Ok(applied(1))).unwrap();

    let endpoint = env.endpoint(server.addr);
    let node = wait_node(&endpoint, "node-1", "the ack", |n| {
        n.version_acked == version
    })
    .await;
    assert!(node.connected);
    assert_eq!(node.version_sent, version);
    assert_eq!(node.version_reported, 0);
    assert_eq!(node.source.as_deref(), Some("default.toml"));
    assert_eq!(node.labels["zone"], "test");
    assert_eq!(node.last_nack_reason, None);
    assert!(matches!(
        &*client.state.borrow(),
        ConnectionState::Connected { server, .. } if *server == format!("https://{}", server_addr(&endpoint))
    ));

    client.stop().await;
    wait_node(&endpoint, "node-1", "the disconnect", |n| !n.connected).await;
    server.stop().await;
}

fn server_addr(endpoint: &ClientEndpoint) -> &str {
    endpoint.url.trim_start_matches("https://")
}

#[tokio::test]
async fn changing_the_file_pushes_a_new_version() {
    let env = Env::new();
    env.write_policy("default.toml", POLICY_A);
    let server = RunningServer::start(env.server_config()).await;
    let mut client = RunningClient::start(env.client_config(server.addr, "node-1"), 0);

    let first = client.next_update().await;
    let v1 = first.bundle.version();
    first.reply.send(Ok(applied(1))).unwrap();

    env.write_policy("default.toml", POLICY_B);
    let second = client.next_update().await;
    let v2 = second.bundle.version();
    assert!(v2 > v1, "{v2} after {v1}");
    assert_eq!(second.bundle.policy(), POLICY_B.as_bytes());
    second.reply.send(Ok(applied(2))).unwrap();

    // A node file takes precedence over the default.
    env.write_policy("nodes/node-1.toml", POLICY_A);
    let third = client.next_update().await;
    assert!(third.bundle.version() > v2);
    assert_eq!(third.bundle.source(), "nodes/node-1.toml");
    third.reply.send(Ok(applied(3))).unwrap();

    // An invalid edit is not published: nothing reaches the node, the last version stays.
    env.write_policy("nodes/node-1.toml", "[[agents]]\nid = 0\n");
    let endpoint = env.endpoint(server.addr);
    let node = wait_node(&endpoint, "node-1", "the third ack", |n| {
        n.version_acked == third.bundle.version()
    })
    .await;
    assert_eq!(node.version_sent, third.bundle.version());

    client.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn daemon_rejection_is_nacked_with_its_reason() {
    let env = Env::new();
    env.write_policy("default.toml", POLICY_A);
    let server = RunningServer::start(env.server_config()).await;
    let mut client = RunningClient::start(env.client_config(server.addr, "node-1"), 0);

    let update = client.next_update().await;
    let version = update.bundle.version();
    let reason = "compiling the policy: interface veth-coder does not exist";
    update.reply.send(Err(reason.into())).unwrap();

    let endpoint = env.endpoint(server.addr);
    let node = wait_node(&endpoint, "node-1", "the nack", |n| {
        n.version_nacked == version
    })
    .await;
    assert_eq!(node.last_nack_reason.as_deref(), Some(reason));
    assert_eq!(node.version_acked, 0);
    assert_eq!(node.version_sent, version);

    // The rejected version was not applied, so the next one is checked against version 0
    // (the held version did not move) and is delivered.
    env.write_policy("default.toml", POLICY_B);
    let next = client.next_update().await;
    assert!(next.bundle.version() > version);
    next.reply.send(Ok(applied(1))).unwrap();
    wait_node(&endpoint, "node-1", "the ack", |n| {
        n.version_acked == next.bundle.version()
    })
    .await;

    client.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn client_with_the_wrong_ca_cannot_connect() {
    let env = Env::new();
    env.write_policy("default.toml", POLICY_A);
    let other = certs::generate(&env.dir.path().join("other-ca"), &["127.0.0.1"], &[]).unwrap();
    let server = RunningServer::start(env.server_config()).await;
    let mut cfg = env.client_config(server.addr, "node-1");
    cfg.ca = Some(other.ca.cert.clone());
    let mut client = RunningClient::start(cfg, 0);

    let error = client.wait_backoff().await;
    assert!(
        error.starts_with(&format!("connecting to https://{}", server.addr)),
        "{error}"
    );
    assert!(error.contains("invalid peer certificate"), "{error}");
    // Still failing on later attempts, and nothing ever reached the daemon side.
    client
        .wait_state(
            "a later attempt",
            |s| matches!(s, ConnectionState::Backoff { attempt, .. } if *attempt >= 2),
        )
        .await;
    assert!(client.updates.try_recv().is_err());
    let nodes = controlplane::nodes(&env.endpoint(server.addr))
        .await
        .unwrap();
    assert!(nodes.is_empty(), "{nodes:?}");

    client.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn mtls_server_rejects_clients_without_a_certificate() {
    let env = Env::new();
    env.write_policy("default.toml", POLICY_A);
    let mut server_cfg = env.server_config();
    server_cfg.client_ca = Some(env.certs.ca.cert.clone());
    let server = RunningServer::start(server_cfg).await;

    let mut anonymous = RunningClient::start(env.client_config(server.addr, "anonymous"), 0);
    let error = anonymous.wait_backoff().await;
    assert!(
        error.contains(&format!("https://{}", server.addr)),
        "{error}"
    );
    // TLS 1.3: the client finishes its handshake before the server checks for a
    // certificate, so the refusal arrives as an alert on the first read.
    assert!(error.contains("CertificateRequired"), "{error}");
    anonymous
        .wait_state(
            "a later attempt",
            |s| matches!(s, ConnectionState::Backoff { attempt, .. } if *attempt >= 2),
        )
        .await;
    assert!(anonymous.updates.try_recv().is_err());

    let mut cfg = env.client_config(server.addr, "node-1");
    cfg.client_cert = Some(env.certs.clients["node-1"].cert.clone());
    cfg.client_key = Some(env.certs.clients["node-1"].key.clone());
    let mut client = RunningClient::start(cfg, 0);
    let update = client.next_update().await;
    let version = update.bundle.version();
    update.reply.send(Ok(applied(1))).unwrap();

    // The CLI needs a client certificate too.
    let mut endpoint = env.endpoint(server.addr);
    assert!(controlplane::nodes(&endpoint).await.is_err());
    endpoint.client_cert = Some(env.certs.clients["node-1"].cert.clone());
    endpoint.client_key = Some(env.certs.clients["node-1"].key.clone());
    wait_node(&endpoint, "node-1", "the ack", |n| {
        n.version_acked == version
    })
    .await;
    let nodes = controlplane::nodes(&endpoint).await.unwrap();
    assert!(nodes.iter().all(|n| n.node_id != "anonymous"), "{nodes:?}");
    // What `enforcer control-plane nodes --json` prints: these nodes, serialized.
    integration_tests::check_schema("nodes", &serde_json::to_value(&nodes).unwrap());

    anonymous.stop().await;
    client.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_node_gets_nothing_under_another_name_or_with_a_foreign_certificate() {
    let env = Env::new();
    env.write_policy("default.toml", POLICY_A);
    env.write_policy("nodes/node-2.toml", POLICY_B);
    let mut server_cfg = env.server_config();
    server_cfg.client_ca = Some(env.certs.ca.cert.clone());
    let server = RunningServer::start(server_cfg).await;
    let with_cert = |node_id: &str, pair: &certs::CertKeyPaths| {
        let mut cfg = env.client_config(server.addr, node_id);
        cfg.client_cert = Some(pair.cert.clone());
        cfg.client_key = Some(pair.key.clone());
        cfg
    };

    // node-1's certificate claiming to be node-2 (to get node-2's policy): refused after
    // the handshake, with the reason, and never served.
    let mut impostor = RunningClient::start(with_cert("node-2", &env.certs.clients["node-1"]), 0);
    let error = impostor.wait_backoff().await;
    assert!(error.contains("PermissionDenied"), "{error}");
    assert!(
        error.contains("node_id \"node-2\" is not the client certificate's (it names node-1)"),
        "{error}"
    );
    assert!(impostor.updates.try_recv().is_err());

    // A certificate from another CA, even with the right name: no handshake.
    let foreign =
        certs::generate(&env.dir.path().join("foreign"), &["localhost"], &["node-1"]).unwrap();
    let mut stranger = RunningClient::start(with_cert("node-1", &foreign.clients["node-1"]), 0);
    let error = stranger.wait_backoff().await;
    assert!(error.contains("https://"), "{error}");
    assert!(stranger.updates.try_recv().is_err());

    // The rightful node-1 is served, and the fleet view knows no node-2.
    let mut client = RunningClient::start(with_cert("node-1", &env.certs.clients["node-1"]), 0);
    let update = client.next_update().await;
    assert_eq!(update.bundle.policy(), POLICY_A.as_bytes());
    update.reply.send(Ok(applied(1))).unwrap();
    let mut endpoint = env.endpoint(server.addr);
    endpoint.client_cert = Some(env.certs.clients["node-1"].cert.clone());
    endpoint.client_key = Some(env.certs.clients["node-1"].key.clone());
    let nodes = controlplane::nodes(&endpoint).await.unwrap();
    assert!(nodes.iter().all(|n| n.node_id == "node-1"), "{nodes:?}");

    impostor.stop().await;
    stranger.stop().await;
    client.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn crafted_bundles_are_nacked_and_never_delivered() {
    let env = Env::new();
    let key = SigningKey::load(&env.signing_key).unwrap();
    let stranger = SigningKey::generate().unwrap();
    let sign = |key: &SigningKey, version| {
        key.sign(
            version,
            1_700_000_000_000,
            "default.toml",
            &bundle::Target::All,
            POLICY_A.into(),
        )
        .unwrap()
    };
    let mut unsigned = sign(&key, 200);
    unsigned.signature.clear();
    let unknown_key = sign(&stranger, 201);
    let mut bad_signature = sign(&key, 202);
    bad_signature.policy = POLICY_B.into();
    let old = sign(&key, 50);
    let good = sign(&key, 300);
    let (heard_tx, mut heard) = mpsc::unbounded_channel();
    let crafted = CraftedControlPlane {
        bundles: vec![unsigned, unknown_key, bad_signature, old, good],
        heard: heard_tx,
    };

    // Plaintext this time, which also covers `insecure = true`.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, signal) = oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder().serve_with_incoming_shutdown(
            PolicySyncServer::new(crafted),
            TcpListenerStream::new(listener),
            async {
                let _ = signal.await;
            },
        ),
    );
    let mut cfg = env.client_config(addr, "node-1");
    cfg.url = format!("http://{addr}");
    cfg.ca = None;
    cfg.insecure = true;
    let mut client = RunningClient::start(cfg, 100);

    let mut next = async || {
        within("a message from the node", heard.recv())
            .await
            .unwrap()
    };
    let expected = [
        (
            200,
            "unsigned bundle: version 200 has an empty signature".to_string(),
        ),
        (
            201,
            format!(
                "unknown key id {:?} on version 201 (trusted: {})",
                stranger.public_key().key_id(),
                key.public_key().key_id()
            ),
        ),
        (
            202,
            format!(
                "bad signature on version 202 (key id {})",
                key.public_key().key_id()
            ),
        ),
        (
            50,
            "rollback: version 50 is not newer than the held version 100".to_string(),
        ),
    ];
    match next().await {
        Kind::Hello(hello) => {
            assert_eq!(hello.node_id, "node-1");
            assert_eq!(hello.version, 100);
        }
        other => panic!("expected the hello, got {other:?}"),
    }
    for (version, reason) in expected {
        match next().await {
            Kind::Nack(nack) => {
                assert_eq!(nack.version, version);
                assert_eq!(nack.reason, reason);
            }
            other => panic!("expected a nack of {version}, got {other:?}"),
        }
    }
    // Only the good bundle reaches the daemon side.
    let update = client.next_update().await;
    assert_eq!(update.bundle.version(), 300);
    update.reply.send(Ok(applied(1))).unwrap();
    match next().await {
        Kind::Ack(ack) => assert_eq!(ack.version, 300),
        other => panic!("expected the ack of 300, got {other:?}"),
    }
    assert!(client.updates.try_recv().is_err());

    client.stop().await;
    let _ = shutdown.send(());
    within("the crafted server to stop", server)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn client_reconnects_to_a_restarted_server_with_its_held_version() {
    let env = Env::new();
    env.write_policy("default.toml", POLICY_A);
    let server = RunningServer::start(env.server_config()).await;
    let addr = server.addr;
    let mut client = RunningClient::start(env.client_config(addr, "node-1"), 0);
    let first = client.next_update().await;
    let v1 = first.bundle.version();
    first.reply.send(Ok(applied(1))).unwrap();
    wait_node(&env.endpoint(addr), "node-1", "the ack", |n| {
        n.version_acked == v1
    })
    .await;

    server.stop().await;
    let error = client.wait_backoff().await;
    assert!(error.contains(&addr.to_string()), "{error}");

    let mut cfg = env.server_config();
    cfg.listen = addr;
    let server = RunningServer::start(cfg).await;
    let node = wait_node(&env.endpoint(addr), "node-1", "the reconnect", |n| {
        n.connected
    })
    .await;
    assert_eq!(node.version_reported, v1);
    // The new server signs the same file with a fresh (newer) version; the node takes it.
    let again = client.next_update().await;
    assert!(again.bundle.version() > v1);
    assert_eq!(again.bundle.policy(), POLICY_A.as_bytes());
    again.reply.send(Ok(applied(2))).unwrap();
    wait_node(&env.endpoint(addr), "node-1", "the second ack", |n| {
        n.version_acked == again.bundle.version()
    })
    .await;

    client.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_stream_must_start_with_hello() {
    let env = Env::new();
    env.write_policy("default.toml", POLICY_A);
    let server = RunningServer::start(env.server_config()).await;
    let channel = env
        .endpoint(server.addr)
        .prepare()
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = PolicySyncClient::new(channel);
    let (tx, rx) = mpsc::channel(1);
    tx.send(NodeMessage {
        kind: Some(Kind::Ack(Ack {
            version: 1,
            ..Ack::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound = client
        .sync(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let status = within("the refusal", inbound.message()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "the first message must be a Hello with a node_id"
    );
    drop(tx);
    let nodes = controlplane::nodes(&env.endpoint(server.addr))
        .await
        .unwrap();
    assert!(nodes.is_empty(), "{nodes:?}");
    server.stop().await;
}

/// The bundle store, as the daemon will use it: the last applied bundle survives a
/// restart and gives the held version for `Hello`.
#[tokio::test]
async fn stored_bundle_gives_the_held_version_after_a_restart() {
    let env = Env::new();
    env.write_policy("default.toml", POLICY_A);
    let server = RunningServer::start(env.server_config()).await;
    let state_dir = env.dir.path().join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    let store = bundle::BundleStore::new(&state_dir);
    let verifier = bundle::Verifier::new(
        &[env.public_key.as_str()],
        bundle::NodeIdentity {
            node_id: "node-1".into(),
            ..Default::default()
        },
    )
    .unwrap();

    let mut client = RunningClient::start(env.client_config(server.addr, "node-1"), 0);
    let update = client.next_update().await;
    store.save(&update.bundle).unwrap();
    let v1 = update.bundle.version();
    update.reply.send(Ok(applied(1))).unwrap();
    client.stop().await;

    let stored = store.load(&verifier).unwrap().unwrap();
    assert_eq!(stored.version(), v1);
    let mut client =
        RunningClient::start(env.client_config(server.addr, "node-1"), stored.version());
    wait_node(&env.endpoint(server.addr), "node-1", "the reconnect", |n| {
        n.connected && n.version_reported == v1
    })
    .await;
    // Same server, same file: the node already holds it, so nothing is re-sent (a re-sent
    // v1 would come first and be NACKed as a rollback); the next change arrives as usual.
    env.write_policy("default.toml", POLICY_B);
    let update = client.next_update().await;
    assert_eq!(update.bundle.policy(), POLICY_B.as_bytes());
    let v2 = update.bundle.version();
    update.reply.send(Ok(applied(2))).unwrap();
    let node = wait_node(&env.endpoint(server.addr), "node-1", "the ack", |n| {
        n.version_acked == v2
    })
    .await;
    assert_eq!(node.version_nacked, 0);
    assert_eq!(node.last_nack_reason, None);

    client.stop().await;
    server.stop().await;
}
