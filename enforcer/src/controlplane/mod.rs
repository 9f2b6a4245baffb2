//! The control plane: serves signed policy bundles to enforcer nodes over gRPC
//! (`enforcer.v1.PolicySync`) and reports what each node holds.
//!
//! # Policy directory
//!
//! ```text
//! <dir>/default.toml          every node without a file of its own
//! <dir>/nodes/<node_id>.toml  that node only
//! ```
//!
//! A node gets `nodes/<node_id>.toml` when that file exists (even while it is invalid:
//! falling back to the default would silently hand the node a policy meant for others),
//! else `default.toml`, else nothing. The directory is polled (every 300 ms by default);
//! a file whose content hash changed is validated with [`policy::parse`] and, if valid,
//! signed as a new bundle and pushed to every connected node it applies to. An invalid file
//! is logged with `file:line:column` and not published: the previous version stays
//! published. A deleted file stops being published; nodes keep what they enforce.
//!
//! # Versions
//!
//! One counter for everything this server publishes: each new bundle gets
//! `max(previous + 1, now in Unix milliseconds)`, so versions also increase across restarts
//! of the control plane (given a sane clock). A node whose `Hello` reports a version newer
//! than the bundle it should get (it switched from `nodes/<id>.toml` back to
//! `default.toml`, or the control plane restarted with a clock behind) would reject that
//! bundle as a rollback, so the bundle is re-signed with a version above the node's.
//!
//! # Per node
//!
//! On each stream the server sends the node's bundle if it is newer than what the node
//! holds and was not sent on this stream yet, and records every ACK and NACK. A NACKed
//! version is not re-sent on the same stream; a reconnecting node gets it again. `Nodes`
//! lists every node seen since the server started.
//!
//! # A fleet: replicas on etcd
//!
//! With an `[etcd]` table instead of `dir` and `signing_key`, the process is a *replica*
//! ([`etcd`]): it holds no state of its own and cannot sign. Bundles are published into etcd
//! by `enforcer control-plane publish` (which holds the key) for a [`Target`]: one node,
//! the nodes matching a label selector, or all. A replica watches etcd and gives each node
//! connected to it the most specific bundle that targets it (its own, then the selector with
//! the most labels, then `all`; the newest among equals). Nodes report to any replica; what
//! they hold, their last ACK or NACK and their audit chain head go to etcd, so
//! `control-plane nodes` shows the whole fleet from any replica. A replica never re-signs:
//! a node holding a newer version than its bundle waits for the next publish.
//!
//! # Node identity
//!
//! With `client_ca` set, every node presents a client certificate and its `Hello` must name
//! a node the certificate is valid for (its DNS subject alternative names); any other
//! `Hello` is refused with `PERMISSION_DENIED`, so a node gets only bundles meant for it. A
//! replica requires `client_ca`.

pub mod bundle;
pub mod certs;
pub mod etcd;
pub mod proto;
pub mod sync;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ring::digest;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{
    Request, Response, Status, Streaming,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
};

use crate::{
    controlplane::{
        bundle::{KeyError, SigningKey, Target},
        etcd::{BundleChange, EtcdConfig, EtcdError, Store},
        proto::{
            Bundle, NodeMessage, NodesRequest, NodesResponse,
            node_message::Kind,
            policy_sync_client::PolicySyncClient,
            policy_sync_server::{PolicySync, PolicySyncServer},
        },
        sync::{ClientEndpoint, SyncError},
    },
    policy,
};

/// Default interval between two scans of the policy directory.
pub const DEFAULT_POLL_INTERVAL_MS: u64 = 300;

/// The policy every node without its own file gets.
pub const DEFAULT_SOURCE: &str = "default.toml";

/// How long a new stream may take to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 pings to each node, so a node that vanished without closing its connection is
/// shown as disconnected.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// How long a ping may go unanswered.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Versions reported by nodes further than this ahead of the clock are not honoured: a
/// buggy or hostile node must not be able to push every version towards `u64::MAX`.
const MAX_FUTURE_VERSION_MS: u64 = 24 * 3600 * 1000;

/// Deadline for the `Nodes` call of [`nodes`].
const NODES_TIMEOUT: Duration = Duration::from_secs(10);

/// The control plane's configuration.
///
/// ```toml
/// dir = "/etc/enforcer-cp/policies"   # default.toml and nodes/<node_id>.toml
/// signing_key = "/etc/enforcer-cp/signing.key"
/// listen = "0.0.0.0:7443"
/// tls_cert = "/etc/enforcer-cp/server.pem"
/// tls_key = "/etc/enforcer-cp/server.key"
/// client_ca = "/etc/enforcer-cp/ca.pem"  # optional: require client certificates (mTLS)
/// # insecure = false                   # true: plaintext, only without tls_cert/tls_key
/// poll_interval_ms = 300
/// ```
///
/// The signing key and the TLS key are `signing_key` and `tls_key`: two fields both called
/// `key` could not live in one table.
///
/// A replica of a fleet has `[etcd]` instead of `dir` and `signing_key` (see [`etcd`]), and
/// must have `client_ca`:
///
/// ```toml
/// listen = "0.0.0.0:7443"
/// tls_cert = "/etc/enforcer-cp/server.pem"
/// tls_key = "/etc/enforcer-cp/server.key"
/// client_ca = "/etc/enforcer-cp/ca.pem"
/// # name = "cp-1"                        # shown as the replica a node is on (default: host:port)
/// [etcd]
/// endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"]
/// ```
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// The policy directory (single-process control plane).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// The Ed25519 signing key (`signing.key` from [`crate::controlplane::bundle::keygen`]),
    /// with `dir`.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// The fleet's etcd: this process is a replica (no `dir`, no `signing_key`).
    #[serde(default)]
    pub etcd: Option<EtcdConfig>,
    /// This replica's name in `control-plane nodes` (default: the host name and port).
    #[serde(default)]
    pub name: Option<String>,
    /// Address to listen on (only read by [`serve`]; [`serve_on`] takes a listener).
    pub listen: SocketAddr,
    /// PEM server certificate chain.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// PEM CA that client certificates must chain to; when set, every node needs one.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Serve plaintext HTTP/2 without TLS (tests, labs). Bundles stay signed.
    #[serde(default)]
    pub insecure: bool,
    /// Milliseconds between scans of `dir` (default 300).
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
}

fn default_poll_interval_ms() -> u64 {
    DEFAULT_POLL_INTERVAL_MS
}

impl ControlPlaneConfig {
    /// Makes relative paths relative to `base` (the configuration file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        for path in [
            &mut self.dir,
            &mut self.signing_key,
            &mut self.tls_cert,
            &mut self.tls_key,
            &mut self.client_ca,
        ]
        .into_iter()
        .flatten()
        {
            *path = base.join(&*path);
        }
        if let Some(etcd) = &mut self.etcd {
            etcd.resolve_paths(base);
        }
    }

    /// Checks the fields without reading files.
    pub fn validate(&self) -> Result<(), ControlPlaneError> {
        let invalid = |field, message: &str| {
            Err(ControlPlaneError::Config {
                field,
                message: message.into(),
            })
        };
        match (&self.tls_cert, &self.tls_key, self.insecure) {
            (Some(_), Some(_), false) | (None, None, true) => {}
            (Some(_), None, _) | (None, Some(_), _) => {
                return invalid("tls_cert", "tls_cert and tls_key go together");
            }
            (None, None, false) => {
                return invalid(
                    "tls_cert",
                    "expected tls_cert and tls_key (or insecure = true for plaintext)",
                );
            }
            (Some(_), Some(_), true) => {
                return invalid("insecure", "insecure = true cannot be used with tls_cert");
            }
        }
        if self.client_ca.is_some() && self.insecure {
            return invalid("client_ca", "client certificates need TLS");
        }
        match (&self.dir, &self.signing_key, &self.etcd) {
            (Some(_), Some(_), None) => {}
            (None, None, Some(etcd)) => {
                etcd.validate().map_err(|e| ControlPlaneError::Config {
                    field: "etcd",
                    message: e.to_string(),
                })?;
                if self.client_ca.is_none() {
                    return invalid(
                        "client_ca",
                        "a replica serves nodes by their client certificate: client_ca is required with [etcd]",
                    );
                }
            }
            (Some(_), None, None) => return invalid("signing_key", "dir needs signing_key"),
            (None, Some(_), None) => return invalid("dir", "signing_key needs dir"),
            (_, _, Some(_)) => {
                return invalid(
                    "etcd",
                    "a replica relays what is published into etcd: remove dir and signing_key",
                );
            }
            (None, None, None) => {
                return invalid(
                    "dir",
                    "expected dir and signing_key (one control plane) or [etcd] (a replica)",
                );
            }
        }
        if self.poll_interval_ms < 10 {
            return invalid("poll_interval_ms", "expected at least 10");
        }
        Ok(())
    }

    fn server_tls(&self) -> Result<Option<ServerTlsConfig>, ControlPlaneError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let read = |field, path: &Path| {
            fs::read(path).map_err(|source| ControlPlaneError::ReadFile {
                field,
                path: path.to_owned(),
                source,
            })
        };
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
            read("tls_cert", cert)?,
            read("tls_key", key)?,
        ));
        if let Some(ca) = &self.client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read("client_ca", ca)?));
        }
        Ok(Some(tls))
    }
}

/// Errors starting or running the control plane, or querying it.
#[derive(Debug, Error)]
pub enum ControlPlaneError {
    /// A configuration field has an impossible value.
    #[error("{field}: {message}")]
    Config {
        /// The field.
        field: &'static str,
        /// What was expected.
        message: String,
    },
    /// A certificate or key file could not be read.
    #[error("reading {field} {}", path.display())]
    ReadFile {
        /// The field naming the file.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The signing key could not be loaded.
    #[error("loading the signing key")]
    SigningKey {
        /// Why.
        #[source]
        source: KeyError,
    },
    /// The policy directory could not be read.
    #[error("reading the policy directory {}", path.display())]
    PolicyDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The listening socket could not be bound.
    #[error("listening on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The TLS settings were refused, or the server failed.
    #[error("serving gRPC")]
    Serve {
        /// The underlying error.
        #[source]
        source: tonic::transport::Error,
    },
    /// Connecting to a control plane (for [`nodes`]) failed.
    #[error(transparent)]
    Client {
        /// Why.
        #[from]
        source: SyncError,
    },
    /// etcd could not be reached or refused a request.
    #[error(transparent)]
    Etcd {
        /// Why.
        #[from]
        source: EtcdError,
    },
    /// The control plane answered a query with an error.
    #[error("querying {url}")]
    Query {
        /// The control plane.
        url: String,
        /// Its answer.
        #[source]
        source: Status,
    },
}

/// What the control plane knows about one node ([`nodes`] and `enforcer control-plane
/// nodes`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeStatus {
    /// The node's id.
    pub node_id: String,
    /// Labels from its latest `Hello`.
    pub labels: BTreeMap<String, String>,
    /// Whether it has a stream open now.
    pub connected: bool,
    /// The policy file it is assigned, if any.
    pub source: Option<String>,
    /// The version it reported holding in its latest `Hello`.
    pub version_reported: u64,
    /// Latest version sent to it (0: none).
    pub version_sent: u64,
    /// Latest version it applied (0: none).
    pub version_acked: u64,
    /// Latest version it rejected (0: none).
    pub version_nacked: u64,
    /// Why it rejected `version_nacked`.
    pub last_nack_reason: Option<String>,
    /// When the server last heard from it, Unix milliseconds.
    pub last_seen_unix_ms: i64,
    /// Remote address of its latest stream.
    pub peer: Option<String>,
    /// Target of the bundle it is assigned (`node:<id>`, `selector:...`, `all`).
    #[serde(default)]
    pub target: Option<String>,
    /// Head of its audit hash chain (hex) reported with its latest ACK: an anchor kept off
    /// the node (`enforcer audit verify --anchor`).
    #[serde(default)]
    pub audit_head: Option<String>,
    /// Records in that chain then.
    #[serde(default)]
    pub audit_records: u64,
    /// The replica holding its stream now (fleets only).
    #[serde(default)]
    pub replica: Option<String>,
}

impl From<proto::NodeStatus> for NodeStatus {
    fn from(p: proto::NodeStatus) -> Self {
        let some = |s: String| (!s.is_empty()).then_some(s);
        NodeStatus {
            node_id: p.node_id,
            labels: p.labels,
            connected: p.connected,
            source: some(p.source),
            version_reported: p.version_reported,
            version_sent: p.version_sent,
            version_acked: p.version_acked,
            version_nacked: p.version_nacked,
            last_nack_reason: some(p.last_nack_reason),
            last_seen_unix_ms: p.last_seen_unix_ms,
            peer: some(p.peer),
            target: some(p.target),
            audit_head: some(p.audit_head),
            audit_records: p.audit_records,
            replica: some(p.replica),
        }
    }
}

impl From<NodeStatus> for proto::NodeStatus {
    fn from(n: NodeStatus) -> Self {
        proto::NodeStatus {
            node_id: n.node_id,
            labels: n.labels,
            connected: n.connected,
            version_sent: n.version_sent,
            version_acked: n.version_acked,
            last_nack_reason: n.last_nack_reason.unwrap_or_default(),
            last_seen_unix_ms: n.last_seen_unix_ms,
            version_reported: n.version_reported,
            version_nacked: n.version_nacked,
            source: n.source.unwrap_or_default(),
            peer: n.peer.unwrap_or_default(),
            target: n.target.unwrap_or_default(),
            audit_head: n.audit_head.unwrap_or_default(),
            audit_records: n.audit_records,
            replica: n.replica.unwrap_or_default(),
        }
    }
}

/// Asks the control plane at `endpoint` for every node it has seen, sorted by id.
pub async fn nodes(endpoint: &ClientEndpoint) -> Result<Vec<NodeStatus>, ControlPlaneError> {
    let url = endpoint.url.clone();
    let channel = endpoint
        .prepare()?
        .timeout(NODES_TIMEOUT)
        .connect()
        .await
        .map_err(|source| SyncError::Connect {
            url: url.clone(),
            source,
        })?;
    let response = PolicySyncClient::new(channel)
        .nodes(NodesRequest {})
        .await
        .map_err(|source| ControlPlaneError::Query { url, source })?;
    Ok(response
        .into_inner()
        .nodes
        .into_iter()
        .map(NodeStatus::from)
        .collect())
}

/// Binds `cfg.listen` and runs [`serve_on`] until `shutdown` completes.
pub async fn serve(
    cfg: ControlPlaneConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControlPlaneError> {
    cfg.validate()?;
    let listener =
        TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ControlPlaneError::Bind {
                addr: cfg.listen,
                source,
            })?;
    serve_on(cfg, listener, shutdown).await
}

/// Runs the control plane on an already bound listener (tests bind port 0 and read the
/// address back) until `shutdown` completes. Configuration problems (files, keys, the
/// policy directory, etcd unreachable) are reported before anything is served. On shutdown
/// every open stream is ended with `UNAVAILABLE`, so nodes reconnect elsewhere at once, and
/// the call returns when the connections have closed.
pub async fn serve_on(
    cfg: ControlPlaneConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControlPlaneError> {
    cfg.validate()?;
    let tls = cfg.server_tls()?;
    let local = listener.local_addr().ok();
    let (stop_tx, stop) = watch::channel(false);
    let (changed, _) = watch::channel(0u64);
    let replica = cfg.name.clone().unwrap_or_else(|| {
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into());
        match local {
            Some(addr) => format!("{host}:{}", addr.port()),
            None => host,
        }
    });
    let (origin, first) = match (&cfg.dir, &cfg.signing_key, &cfg.etcd) {
        (Some(dir), Some(key), _) => {
            let key =
                SigningKey::load(key).map_err(|source| ControlPlaneError::SigningKey { source })?;
            // Fail at start on a missing directory; later scan errors are logged and retried.
            let first = scan(dir.clone()).await?;
            (
                Origin::Dir {
                    dir: dir.clone(),
                    key,
                },
                Ok(first),
            )
        }
        (_, _, Some(etcd)) => {
            let store = Store::connect(etcd).await?;
            let (fleet, queues) = Fleet::start(store, replica.clone()).await?;
            (Origin::Etcd(Box::new(fleet)), Err(queues))
        }
        _ => unreachable!("validate requires dir and signing_key, or etcd"),
    };
    let shared = Arc::new(Shared {
        origin,
        require_identity: cfg.client_ca.is_some(),
        state: Mutex::new(State::default()),
        changed,
        stop,
    });
    let watcher = match (&shared.origin, first) {
        (Origin::Dir { dir, .. }, Ok(first)) => {
            shared.apply_scan(first);
            tracing::info!(
                listen = ?local,
                dir = %dir.display(),
                tls = tls.is_some(),
                mtls = cfg.client_ca.is_some(),
                "control plane serving"
            );
            tokio::spawn(poll(
                Arc::clone(&shared),
                Duration::from_millis(cfg.poll_interval_ms),
            ))
        }
        (Origin::Etcd(fleet), Err((dirty, presence))) => {
            tracing::info!(listen = ?local, replica, etcd = %fleet.store.endpoints(), tls = tls.is_some(), "control-plane replica serving");
            tokio::spawn(write_nodes(Arc::clone(&shared), dirty));
            tokio::spawn(presence_task(
                fleet.store.clone(),
                presence,
                shared.stop.clone(),
            ));
            tokio::spawn(follow(Arc::clone(&shared)))
        }
        _ => unreachable!("a directory is scanned, a replica has its queues"),
    };

    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|source| ControlPlaneError::Serve { source })?;
    }
    let signal = {
        let stop_tx = stop_tx.clone();
        async move {
            shutdown.await;
            tracing::info!("control plane shutting down; ending every node stream");
            stop_tx.send_replace(true);
        }
    };
    let served = builder.serve_with_incoming_shutdown(
        PolicySyncServer::new(Service {
            shared: Arc::clone(&shared),
        }),
        TcpListenerStream::new(listener),
        signal,
    );
    // After the streams were ended, connections get SHUTDOWN_GRACE to close: a node that
    // does not answer (hung, partitioned) must not hold the stop up for its keep-alive.
    let mut stopping = shared.stop.clone();
    let served = tokio::select! {
        served = served => served,
        () = async {
            stopped(&mut stopping).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("connections still open after the shutdown grace; closing them");
            Ok(())
        }
    };
    stop_tx.send_replace(true);
    let _ = watcher.await;
    served.map_err(|source| ControlPlaneError::Serve { source })
}

/// How long connections may take to close once the control plane is stopping.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Where bundles come from.
enum Origin {
    /// A policy directory, signed here.
    Dir {
        /// The directory.
        dir: PathBuf,
        /// The key.
        key: SigningKey,
    },
    /// etcd, signed by publishers (boxed: the store's client is large and there is one).
    Etcd(Box<Fleet>),
}

/// A replica's links to etcd: the store, and the tasks writing node state and presence.
struct Fleet {
    store: Store,
    /// Node ids whose state changed, for the writer task.
    dirty: mpsc::UnboundedSender<String>,
    /// Presence changes, for the lease task.
    presence: mpsc::UnboundedSender<Presence>,
    /// `<replica>#` prefix of presence values.
    replica: String,
}

/// A presence change: a stream took or left a node.
enum Presence {
    /// `holder` now has the node's stream.
    Connected { node_id: String, holder: String },
    /// `holder` no longer has it.
    Gone { node_id: String, holder: String },
}

/// TTL of a replica's presence lease: how long a dead replica's nodes still show connected.
const PRESENCE_TTL_SECS: i64 = 10;

/// What a replica's background tasks take: node ids whose state changed, and presence
/// changes.
type FleetQueues = (
    mpsc::UnboundedReceiver<String>,
    mpsc::UnboundedReceiver<Presence>,
);

impl Fleet {
    /// Checks that etcd answers (a replica that cannot read the bundles must not start as if
    /// there were none) and makes the queues of the node-state writer and the presence lease.
    async fn start(
        store: Store,
        replica: String,
    ) -> Result<(Fleet, FleetQueues), ControlPlaneError> {
        store.bundles().await?;
        let (dirty, dirty_rx) = mpsc::unbounded_channel();
        let (presence, presence_rx) = mpsc::unbounded_channel();
        Ok((
            Fleet {
                store,
                dirty,
                presence,
                replica,
            },
            (dirty_rx, presence_rx),
        ))
    }
}

/// Polls the policy directory until shutdown.
async fn poll(shared: Arc<Shared>, interval: Duration) {
    let Origin::Dir { dir, .. } = &shared.origin else {
        return;
    };
    let mut stop = shared.stop.clone();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stopped(&mut stop) => return,
        }
        match scan(dir.clone()).await {
            Ok(files) => shared.apply_scan(files),
            Err(e) => tracing::warn!(
                error = %crate::error::error_chain(&e),
                "policy directory unreadable; published policies stay as they are"
            ),
        }
    }
}

/// Completes once the server is shutting down. (`wait_for` yields a lock guard, which must
/// not be held across the `select!` arms' awaits.)
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens once serving is over.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// One scan: source name (`default.toml`, `nodes/<id>.toml`) to content. A file that
/// exists but cannot be read is `Err`, so its published version is kept.
type Scan = BTreeMap<String, Result<Vec<u8>, io::Error>>;

async fn scan(dir: PathBuf) -> Result<Scan, ControlPlaneError> {
    tokio::task::spawn_blocking(move || scan_blocking(&dir))
        .await
        .expect("the directory scan does not panic")
}

fn scan_blocking(dir: &Path) -> Result<Scan, ControlPlaneError> {
    let dir_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ControlPlaneError::PolicyDir { path, source }
    };
    fs::read_dir(dir).map_err(dir_err(dir))?;
    let mut files = Scan::new();
    let mut read = |source: String, path: &Path| match fs::read(path) {
        Ok(bytes) => {
            files.insert(source, Ok(bytes));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            files.insert(source, Err(e));
        }
    };
    read(DEFAULT_SOURCE.to_owned(), &dir.join(DEFAULT_SOURCE));
    let nodes = dir.join("nodes");
    match fs::read_dir(&nodes) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(dir_err(&nodes))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                // Editors' temporary files and anything else that is not `<id>.toml`.
                if name.starts_with('.') || !name.ends_with(".toml") {
                    continue;
                }
                read(format!("nodes/{name}"), &entry.path());
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(dir_err(&nodes)(e)),
    }
    Ok(files)
}

/// Follows etcd's bundles until shutdown: reads them all, then watches from there; when
/// the watch breaks (etcd lost its leader, the member went away), reads and watches again.
async fn follow(shared: Arc<Shared>) {
    let Origin::Etcd(fleet) = &shared.origin else {
        return;
    };
    let mut stop = shared.stop.clone();
    let mut retry = Duration::from_millis(100);
    loop {
        let start = async {
            let (bundles, revision) = fleet.store.bundles().await?;
            let changes = fleet.store.watch_bundles(revision + 1).await?;
            Ok::<_, EtcdError>((bundles, changes))
        };
        let started = tokio::select! {
            started = start => started,
            () = stopped(&mut stop) => return,
        };
        match started {
            Ok((bundles, mut changes)) => {
                retry = Duration::from_millis(100);
                shared.replace_bundles(bundles);
                loop {
                    let change = tokio::select! {
                        change = changes.recv() => change,
                        () = stopped(&mut stop) => return,
                    };
                    match change {
                        Some(change) => shared.apply_change(change),
                        None => break,
                    }
                }
                tracing::warn!("lost the etcd watch; reading the bundles again");
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), retry_ms = retry.as_millis() as u64, "etcd unreachable; nodes keep what they have");
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    () = stopped(&mut stop) => return,
                }
                retry = (retry * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Writes the state of nodes that changed to etcd, coalescing bursts: the latest state of
/// each node is written once per round. A failed write is retried with the next round.
async fn write_nodes(shared: Arc<Shared>, mut dirty: mpsc::UnboundedReceiver<String>) {
    let Origin::Etcd(fleet) = &shared.origin else {
        return;
    };
    let mut pending = BTreeSet::new();
    loop {
        if pending.is_empty() {
            match dirty.recv().await {
                Some(id) => {
                    pending.insert(id);
                }
                None => return,
            }
        }
        while let Ok(id) = dirty.try_recv() {
            pending.insert(id);
        }
        let round: Vec<NodeStatus> = {
            let state = shared.state.lock().unwrap();
            pending
                .iter()
                .filter_map(|id| state.nodes.get(id).cloned())
                .collect()
        };
        match fleet.store.put_nodes(&round).await {
            Ok(()) => {
                for node in &round {
                    pending.remove(&node.node_id);
                }
            }
            Err(e) => {
                tracing::warn!(nodes = round.len(), error = %crate::error::error_chain(&e), "writing nodes' states to etcd; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Keeps this replica's presence lease and the `connected/<id>` keys on it. When the lease
/// is lost (etcd unreachable longer than its TTL), a new one is granted and every node this
/// replica still holds is put on it again.
async fn presence_task(
    store: Store,
    mut changes: mpsc::UnboundedReceiver<Presence>,
    mut stop: watch::Receiver<bool>,
) {
    let mut held: BTreeMap<String, String> = BTreeMap::new();
    'lease: loop {
        let lease = match store.grant(PRESENCE_TTL_SECS).await {
            Ok(lease) => lease,
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), "granting the presence lease; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue 'lease,
                    () = stopped(&mut stop) => return,
                }
            }
        };
        for (node_id, holder) in &held {
            if let Err(e) = store.set_connected(node_id, holder, lease).await {
                tracing::warn!(error = %crate::error::error_chain(&e), "recording presence");
                continue 'lease;
            }
        }
        let keep = store.keep_alive(lease, Duration::from_secs(PRESENCE_TTL_SECS as u64 / 3));
        tokio::pin!(keep);
        loop {
            tokio::select! {
                error = &mut keep => {
                    tracing::warn!(error = %crate::error::error_chain(&error), "the presence lease was lost; granting a new one");
                    continue 'lease;
                }
                change = changes.recv() => {
                    let result = match change {
                        None => return,
                        Some(Presence::Connected { node_id, holder }) => {
                            let r = store.set_connected(&node_id, &holder, lease).await;
                            held.insert(node_id, holder);
                            r
                        }
                        Some(Presence::Gone { node_id, holder }) => {
                            if held.get(&node_id) == Some(&holder) {
                                held.remove(&node_id);
                            }
                            store.clear_connected(&node_id, &holder).await
                        }
                    };
                    if let Err(e) = result {
                        tracing::warn!(error = %crate::error::error_chain(&e), "recording presence");
                    }
                }
                () = stopped(&mut stop) => return,
            }
        }
    }
}

/// What the service tasks share.
struct Shared {
    origin: Origin,
    /// Whether nodes present client certificates whose names their `Hello` must match.
    require_identity: bool,
    state: Mutex<State>,
    /// Bumped whenever a bundle is published; every stream re-evaluates its node.
    changed: watch::Sender<u64>,
    /// Becomes `true` on shutdown.
    stop: watch::Receiver<bool>,
}

#[derive(Default)]
struct State {
    /// The last version handed out.
    last_version: u64,
    /// Sources present in the last scan, valid or not.
    present: BTreeSet<String>,
    /// Valid policies, signed.
    published: BTreeMap<String, Published>,
    /// Hash of the content last rejected per source, so it is reported once.
    rejected: BTreeMap<String, Vec<u8>>,
    nodes: BTreeMap<String, NodeStatus>,
    /// Which stream owns each node's `connected` flag (a node may reconnect before its
    /// old stream is noticed dead).
    streams: BTreeMap<String, u64>,
    next_stream: u64,
}

struct Published {
    /// Hash of the file the bundle was signed from (directory mode).
    hash: Vec<u8>,
    /// Whom it is for.
    target: Target,
    bundle: Bundle,
}

/// A stored bundle as the replica serves it.
fn published(stored: etcd::Stored) -> Published {
    Published {
        hash: Vec::new(),
        target: stored.target,
        bundle: stored.bundle,
    }
}

/// The target of a policy file of the directory: `nodes/<id>.toml` is that node's,
/// `default.toml` everyone's.
fn dir_target(source: &str) -> Target {
    match source
        .strip_prefix("nodes/")
        .and_then(|name| name.strip_suffix(".toml"))
    {
        Some(id) => Target::Node(id.to_owned()),
        None => Target::All,
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Shared {
    /// Takes every bundle etcd holds now (after a watch broke, some changes may be missed).
    fn replace_bundles(&self, bundles: Vec<etcd::Stored>) {
        let mut state = self.state.lock().unwrap();
        state.published = bundles
            .into_iter()
            .map(|stored| (stored.target.to_string(), published(stored)))
            .collect();
        state.present = state.published.keys().cloned().collect();
        drop(state);
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// Takes one change from the etcd watch.
    fn apply_change(&self, change: BundleChange) {
        let mut state = self.state.lock().unwrap();
        match change {
            BundleChange::Put(stored) => {
                tracing::info!(target = %stored.target, version = stored.bundle.version, "bundle published");
                let key = stored.target.to_string();
                state.present.insert(key.clone());
                state.published.insert(key, published(stored));
            }
            BundleChange::Deleted(target) => {
                tracing::info!(%target, "bundle removed; its nodes keep what they enforce");
                let key = target.to_string();
                state.present.remove(&key);
                state.published.remove(&key);
            }
        }
        drop(state);
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// Queues a node's state for etcd (replicas only).
    fn persist(&self, node_id: &str) {
        if let Origin::Etcd(fleet) = &self.origin {
            let _ = fleet.dirty.send(node_id.to_owned());
        }
    }

    /// Publishes what changed in a scan.
    fn apply_scan(&self, files: Scan) {
        let Origin::Dir { dir, key } = &self.origin else {
            return;
        };
        let mut state = self.state.lock().unwrap();
        let mut changed = false;
        state.present = files.keys().cloned().collect();
        for (source, content) in files {
            let path = dir.join(&source);
            let content = match content {
                Ok(content) => content,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "reading a policy file; its published version stays");
                    continue;
                }
            };
            let hash = digest::digest(&digest::SHA256, &content).as_ref().to_vec();
            if state.published.get(&source).is_some_and(|p| p.hash == hash)
                || state.rejected.get(&source) == Some(&hash)
            {
                continue;
            }
            let valid = std::str::from_utf8(&content)
                .map_err(|e| format!("{}: not UTF-8 ({e})", path.display()))
                .and_then(|text| {
                    policy::parse(&path.display().to_string(), text)
                        .map_err(|e| e.to_string().replace('\n', "; "))
                });
            if let Err(error) = valid {
                let kept = state.published.get(&source).map(|p| p.bundle.version);
                tracing::error!(%error, kept_version = ?kept, "policy rejected; not publishing it");
                state.rejected.insert(source, hash);
                continue;
            }
            let version = state.next_version(0);
            let target = dir_target(&source);
            match key.sign(version, now_unix_ms(), &source, &target, content) {
                Ok(bundle) => {
                    tracing::info!(file = %path.display(), version, "policy published");
                    state.rejected.remove(&source);
                    state.published.insert(
                        source,
                        Published {
                            hash,
                            target,
                            bundle,
                        },
                    );
                    changed = true;
                }
                Err(error) => {
                    tracing::error!(file = %path.display(), %error, "signing the policy");
                    state.rejected.insert(source, hash);
                }
            }
        }
        let gone: Vec<String> = state
            .published
            .keys()
            .filter(|s| !state.present.contains(*s))
            .cloned()
            .collect();
        for source in gone {
            tracing::info!(file = %dir.join(&source).display(), "policy file removed; no longer published");
            state.published.remove(&source);
            changed = true;
        }
        let State {
            rejected, present, ..
        } = &mut *state;
        rejected.retain(|s, _| present.contains(s));
        drop(state);
        if changed {
            self.changed.send_modify(|generation| *generation += 1);
        }
    }

    /// Decides what to send a node that holds version `held` and was last sent version
    /// `sent` on this stream; re-signs the node's bundle above `held` when it is older.
    /// With `floor_only` the node does not enforce `held` (only refuses versions up to it),
    /// so a bundle of that very version is due too, re-signed above it.
    fn due(&self, node_id: &str, held: u64, sent: u64, floor_only: bool) -> Option<Bundle> {
        let mut state = self.state.lock().unwrap();
        let source = match &self.origin {
            Origin::Dir { .. } => state.source_for(node_id),
            Origin::Etcd(_) => state.target_for(node_id),
        };
        let target = source
            .as_ref()
            .and_then(|s| state.published.get(s))
            .map(|p| p.target.to_string());
        if let Some(node) = state.nodes.get_mut(node_id) {
            node.target = target;
        }
        let source = source?;
        let current = state.published.get(&source)?.bundle.clone();
        if let Some(node) = state.nodes.get_mut(node_id) {
            node.source = Some(current.source.clone());
        }
        let version = current.version;
        // Equality, not order, for `sent`: after a switch of source the node may be due a
        // bundle older than the last one sent (which it may have rejected).
        if version == sent || (version == held && !floor_only) {
            return None;
        }
        if version > held {
            return Some(current);
        }
        let Origin::Dir { key, .. } = &self.origin else {
            // A replica cannot sign: the node waits for the next publish.
            tracing::warn!(
                node_id,
                held,
                version,
                "node holds a newer version than its bundle; it gets the next one published"
            );
            return None;
        };
        // The node holds a newer version than this bundle (it had another source, or this
        // server restarted behind the clock): re-sign above it, or it would reject this
        // bundle as a rollback. Every node on this source gets the new version.
        let horizon = (now_unix_ms().max(0) as u64).saturating_add(MAX_FUTURE_VERSION_MS);
        if held > horizon.max(state.last_version) {
            tracing::warn!(
                node_id,
                held,
                "node reports a version from the future; not re-signing above it"
            );
            return None;
        }
        let next = state.next_version(held);
        let target = dir_target(&source);
        let resigned = key.sign(next, now_unix_ms(), &source, &target, current.policy);
        match resigned {
            Ok(bundle) => {
                tracing::info!(node_id, held, version = next, %source, "re-signed above the node's version");
                let entry = state.published.get_mut(&source).expect("looked up above");
                entry.bundle = bundle.clone();
                drop(state);
                self.changed.send_modify(|generation| *generation += 1);
                Some(bundle)
            }
            Err(error) => {
                tracing::error!(%source, %error, "re-signing the policy");
                None
            }
        }
    }
}

impl Shared {
    fn record_sent(&self, node_id: &str, version: u64) {
        if let Some(node) = self.state.lock().unwrap().nodes.get_mut(node_id) {
            node.version_sent = version;
        }
    }
}

impl State {
    /// A version above everything handed out so far, above `floor`, and at least the
    /// current time in milliseconds.
    fn next_version(&mut self, floor: u64) -> u64 {
        let now = now_unix_ms().max(0) as u64;
        let version = (self.last_version + 1).max(now).max(floor + 1);
        self.last_version = version;
        version
    }

    /// The key of the most specific published bundle that targets the node (its own, then
    /// the selector with the most labels, then `all`; the newest among equals).
    fn target_for(&self, node_id: &str) -> Option<String> {
        let empty = BTreeMap::new();
        let labels = self.nodes.get(node_id).map_or(&empty, |n| &n.labels);
        self.published
            .iter()
            .filter(|(_, p)| p.target.matches(node_id, labels))
            .max_by_key(|(_, p)| (p.target.specificity(), p.bundle.version))
            .map(|(key, _)| key.clone())
    }

    fn source_for(&self, node_id: &str) -> Option<String> {
        let own = format!("nodes/{node_id}.toml");
        if self.present.contains(&own) {
            Some(own)
        } else if self.present.contains(DEFAULT_SOURCE) {
            Some(DEFAULT_SOURCE.to_owned())
        } else {
            None
        }
    }
}

/// The gRPC service.
struct Service {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl PolicySync for Service {
    type SyncStream = ReceiverStream<Result<Bundle, Status>>;

    async fn sync(
        &self,
        request: Request<Streaming<NodeMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let peer = request.remote_addr();
        let certificate = request
            .peer_certs()
            .and_then(|chain| chain.first().cloned());
        if self.shared.require_identity && certificate.is_none() {
            return Err(Status::unauthenticated("a client certificate is required"));
        }
        let inbound = request.into_inner();
        let (outbound, rx) = mpsc::channel(4);
        tokio::spawn(stream_task(
            Arc::clone(&self.shared),
            inbound,
            outbound,
            peer,
            certificate,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn nodes(&self, _: Request<NodesRequest>) -> Result<Response<NodesResponse>, Status> {
        let nodes = match &self.shared.origin {
            Origin::Etcd(fleet) => fleet
                .store
                .nodes()
                .await
                .map_err(|e| Status::unavailable(crate::error::error_chain(&e)))?,
            Origin::Dir { .. } => {
                let state = self.shared.state.lock().unwrap();
                state.nodes.values().cloned().collect()
            }
        };
        Ok(Response::new(NodesResponse {
            nodes: nodes.into_iter().map(Into::into).collect(),
        }))
    }
}

/// Serves one node's stream: waits for `Hello`, then sends bundles as they become due and
/// records ACKs and NACKs, until either side ends it or the server shuts down.
async fn stream_task(
    shared: Arc<Shared>,
    mut inbound: Streaming<NodeMessage>,
    outbound: mpsc::Sender<Result<Bundle, Status>>,
    peer: Option<SocketAddr>,
    certificate: Option<CertificateDer<'static>>,
) {
    let mut stop = shared.stop.clone();
    let first = tokio::select! {
        first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message()) => first,
        () = stopped(&mut stop) => return,
    };
    let hello = match first {
        Ok(Ok(Some(NodeMessage {
            kind: Some(Kind::Hello(hello)),
        }))) if !hello.node_id.is_empty() => hello,
        Ok(Ok(Some(_))) => {
            let _ = outbound
                .send(Err(Status::invalid_argument(
                    "the first message must be a Hello with a node_id",
                )))
                .await;
            return;
        }
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Err(_) => {
            let _ = outbound
                .send(Err(Status::deadline_exceeded("no Hello received")))
                .await;
            return;
        }
    };
    let node_id = hello.node_id.clone();
    if shared.require_identity
        && let Err(refusal) = certificate_names(certificate.as_ref(), &node_id)
    {
        tracing::warn!(node_id, ?peer, %refusal, "refusing a node whose certificate is not its own");
        let _ = outbound.send(Err(Status::permission_denied(refusal))).await;
        return;
    }
    // A replica starts from what etcd holds about the node (it may come from another
    // replica), so its record keeps the last ACK, NACK and audit anchor.
    if let Origin::Etcd(fleet) = &shared.origin {
        match fleet.store.node(&node_id).await {
            // etcd's record wins over this replica's memory: the node may have been on
            // another replica since it was last here.
            Ok(Some(known)) => {
                let mut state = shared.state.lock().unwrap();
                state.nodes.insert(node_id.clone(), known);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(node_id, error = %crate::error::error_chain(&e), "reading the node's state from etcd; starting afresh")
            }
        }
    }
    let stream_id = {
        let mut state = shared.state.lock().unwrap();
        state.next_stream += 1;
        let id = state.next_stream;
        state.streams.insert(node_id.clone(), id);
        let node = state.nodes.entry(node_id.clone()).or_default();
        node.node_id.clone_from(&node_id);
        node.labels = hello.labels.clone();
        node.connected = true;
        node.version_reported = hello.version;
        node.last_seen_unix_ms = now_unix_ms();
        node.peer = peer.map(|p| p.to_string());
        id
    };
    let holder = match &shared.origin {
        Origin::Etcd(fleet) => {
            let holder = format!("{}#{stream_id}", fleet.replica);
            let _ = fleet.presence.send(Presence::Connected {
                node_id: node_id.clone(),
                holder: holder.clone(),
            });
            Some(holder)
        }
        Origin::Dir { .. } => None,
    };
    shared.persist(&node_id);
    tracing::info!(node_id, held = hello.version, ?peer, "node connected");

    let mut held = hello.version;
    // Until the node applies a bundle, it enforces its local file whatever it holds.
    let mut floor_only = hello.floor_only;
    let mut sent = 0u64;
    let mut changed = shared.changed.subscribe();
    changed.mark_changed();
    let ended = loop {
        tokio::select! {
            _ = changed.changed() => {
                if let Some(bundle) = shared.due(&node_id, held, sent, floor_only) {
                    sent = bundle.version;
                    tracing::info!(node_id, version = sent, source = %bundle.source, "sending bundle");
                    shared.record_sent(&node_id, sent);
                    shared.persist(&node_id);
                    if outbound.send(Ok(bundle)).await.is_err() {
                        break "the response stream closed";
                    }
                }
            }
            message = inbound.message() => {
                let kind = match message {
                    Ok(Some(NodeMessage { kind: Some(kind) })) => kind,
                    Ok(Some(NodeMessage { kind: None })) => continue,
                    Ok(None) => break "the node closed the stream",
                    Err(status) => {
                        tracing::debug!(node_id, %status, "node stream failed");
                        break "the node stream failed";
                    }
                };
                let mut state = shared.state.lock().unwrap();
                let Some(node) = state.nodes.get_mut(&node_id) else { continue };
                node.last_seen_unix_ms = now_unix_ms();
                match kind {
                    Kind::Ack(ack) => {
                        tracing::info!(node_id, version = ack.version, audit_records = ack.audit_records, "node applied bundle");
                        node.version_acked = ack.version;
                        if !ack.audit_head.is_empty() {
                            node.audit_head = Some(ack.audit_head);
                            node.audit_records = ack.audit_records;
                        }
                        held = held.max(ack.version);
                        floor_only = false;
                    }
                    Kind::Nack(nack) => {
                        tracing::warn!(node_id, version = nack.version, reason = %nack.reason, "node rejected bundle");
                        node.version_nacked = nack.version;
                        node.last_nack_reason = Some(nack.reason);
                    }
                    Kind::Hello(_) => {
                        tracing::warn!(node_id, "ignoring a second Hello on one stream");
                    }
                }
                drop(state);
                shared.persist(&node_id);
            }
            () = stopped(&mut stop) => {
                let _ = outbound
                    .send(Err(Status::unavailable("the control plane is shutting down")))
                    .await;
                break "the control plane is shutting down";
            }
            () = outbound.closed() => break "the node went away",
        }
    };
    let mut state = shared.state.lock().unwrap();
    if state.streams.get(&node_id) == Some(&stream_id) {
        state.streams.remove(&node_id);
        if let Some(node) = state.nodes.get_mut(&node_id) {
            node.connected = false;
            node.last_seen_unix_ms = now_unix_ms();
        }
    }
    drop(state);
    if let (Origin::Etcd(fleet), Some(holder)) = (&shared.origin, holder) {
        let _ = fleet.presence.send(Presence::Gone {
            node_id: node_id.clone(),
            holder,
        });
        shared.persist(&node_id);
    }
    tracing::info!(node_id, reason = ended, "node disconnected");
}

/// Checks that a verified client certificate is valid for the name `node_id` (one of its
/// DNS subject alternative names), with webpki's own name matching.
fn certificate_names(
    certificate: Option<&CertificateDer<'static>>,
    node_id: &str,
) -> Result<(), String> {
    let certificate = certificate.ok_or("no client certificate")?;
    let parsed = webpki::EndEntityCert::try_from(certificate)
        .map_err(|e| format!("unreadable client certificate ({e})"))?;
    let name = ServerName::try_from(node_id)
        .map_err(|_| format!("node_id {node_id:?} cannot be a certificate name"))?;
    parsed.verify_is_valid_for_subject_name(&name).map_err(|_| {
        let names: Vec<&str> = parsed.valid_dns_names().collect();
        format!(
            "node_id {node_id:?} is not the client certificate's (it names {})",
            names.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(dir: &Path) -> Shared {
        let (changed, _) = watch::channel(0);
        let (_, stop) = watch::channel(false);
        Shared {
            origin: Origin::Dir {
                dir: dir.to_owned(),
                key: SigningKey::generate().unwrap(),
            },
            require_identity: false,
            state: Mutex::new(State::default()),
            changed,
            stop,
        }
    }

    const GOOD: &str = "[[agents]]\nid = 1\nname = \"a\"\nprefixes = [\"10.0.0.1\"]\n";

    #[test]
    fn selection_validation_and_versions() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared(dir.path());
        fs::write(dir.path().join("default.toml"), GOOD).unwrap();
        shared.apply_scan(scan_blocking(dir.path()).unwrap());
        let first = shared.due("n1", 0, 0, false).unwrap();
        assert_eq!(first.source, "default.toml");
        assert!(first.version >= now_unix_ms() as u64 - 60_000);
        // Held or already sent: nothing due.
        assert!(shared.due("n1", first.version, 0, false).is_none());
        assert!(shared.due("n1", 0, first.version, false).is_none());

        // An invalid node file is not published, and the node does not fall back.
        fs::create_dir(dir.path().join("nodes")).unwrap();
        fs::write(dir.path().join("nodes/n1.toml"), "[[agents]]\nid = 0\n").unwrap();
        shared.apply_scan(scan_blocking(dir.path()).unwrap());
        assert!(shared.due("n1", 0, 0, false).is_none());
        assert_eq!(
            shared.due("n2", 0, 0, false).unwrap().version,
            first.version
        );

        // Fixed: published with a higher version.
        fs::write(
            dir.path().join("nodes/n1.toml"),
            GOOD.replace("\"a\"", "\"b\""),
        )
        .unwrap();
        shared.apply_scan(scan_blocking(dir.path()).unwrap());
        let own = shared.due("n1", first.version, 0, false).unwrap();
        assert_eq!(own.source, "nodes/n1.toml");
        assert!(own.version > first.version);

        // Removed again: back to the default, re-signed above what the node holds.
        fs::remove_file(dir.path().join("nodes/n1.toml")).unwrap();
        shared.apply_scan(scan_blocking(dir.path()).unwrap());
        let back = shared.due("n1", own.version, own.version, false).unwrap();
        assert_eq!(back.source, "default.toml");
        assert!(back.version > own.version);
        assert_eq!(back.policy, GOOD.as_bytes());
        // Unchanged content is not re-published by a scan.
        shared.apply_scan(scan_blocking(dir.path()).unwrap());
        assert_eq!(shared.due("n2", 0, 0, false).unwrap().version, back.version);

        // A version from the far future is not honoured.
        assert!(shared.due("n3", u64::MAX, 0, false).is_none());
    }

    #[test]
    fn a_node_on_its_floor_only_gets_its_bundle_re_signed_above_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared(dir.path());
        fs::write(dir.path().join("default.toml"), GOOD).unwrap();
        shared.apply_scan(scan_blocking(dir.path()).unwrap());
        let current = shared.due("n1", 0, 0, false).unwrap();
        // The node refuses everything up to the version it holds, yet enforces its local
        // file: the same bundle, re-signed above its floor.
        let again = shared.due("n1", current.version, 0, true).unwrap();
        assert!(again.version > current.version);
        assert_eq!(again.policy, current.policy);
        // Once it applied that, the usual rule: nothing due.
        assert!(
            shared
                .due("n1", again.version, again.version, false)
                .is_none()
        );
    }
}
