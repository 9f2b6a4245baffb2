//! The node's policy-sync client: keeps one gRPC stream open to the control plane, checks
//! every bundle it receives, hands the good ones to the daemon and answers the control
//! plane with an ACK or a NACK for each, as xDS does.
//!
//! The node is *fail-static*: whatever goes wrong (the control plane unreachable, a forged
//! or old bundle, a policy the daemon rejects), the daemon keeps enforcing what it has.
//!
//! # Protocol, node side
//!
//! 1. Connect (TLS with the control plane's CA pinned; a client certificate when
//!    configured), open `PolicySync.Sync`, send `Hello { node_id, labels, version,
//!    floor_only }` with the version the node holds ([`Held`]).
//! 2. For each `Bundle`: [`Verifier::verify`] it against the trusted keys and the held
//!    version. A rejected bundle is NACKed with the reason and never reaches the daemon.
//!    A verified one goes to the daemon as a [`PolicyUpdate`]; the client waits for the
//!    daemon's reply and ACKs (`Ok`, the held version becomes the bundle's) or NACKs
//!    (`Err(reason)`).
//! 3. When the stream ends or fails, publish [`ConnectionState::Backoff`], sleep with
//!    exponential backoff and jitter ([`Backoff`]), and start again at 1 with the held
//!    version in `Hello`.
//!
//! # Daemon integration
//!
//! The daemon owns persistence: [`BundleStore`](crate::controlplane::bundle::BundleStore) in its state
//! directory. It saves a bundle *before* applying it and puts the previous one back if the
//! apply fails, so an ACK means "enforcing and on disk" and a NACK neither, and the held
//! version the client tracks never runs ahead of the store. It also raises the store's
//! rollback floor, kept in a file of its own: a stored bundle that stops verifying (its key
//! rotated out) must not reopen the door to older bundles. (The client cannot do this
//! itself: only the daemon knows whether the apply succeeded, and a node without a control
//! plane still restarts from the store.)
//!
//! ```ignore
//! let verifier = Verifier::new(&cfg.trusted_keys)?;
//! let store = BundleStore::new(&config.state_dir);
//! // Fail-static start: enforce the last good bundle before the control plane answers.
//! let held = match store.load(&verifier) {
//!     Ok(Some(bundle)) => { apply(bundle.parse_policy()?)?; bundle.version() }
//!     Ok(None) => 0,
//!     Err(e) => { tracing::error!(error = %error_chain(&e), "ignoring stored bundle"); 0 }
//! };
//! let (updates_tx, mut updates) = tokio::sync::mpsc::channel(1);
//! let (state_tx, state) = tokio::sync::watch::channel(ConnectionState::default());
//! tokio::spawn(sync::run(cfg, Held { version: held, floor_only: false }, updates_tx, state_tx));
//! while let Some(PolicyUpdate { bundle, reply }) = updates.recv().await {
//!     let outcome = bundle
//!         .parse_policy()
//!         .map_err(|e| e.to_string()) // "malformed policy: default.toml@v42:3:1: ..."
//!         .and_then(|policy| compile_and_apply(&policy).map_err(|e| error_chain(&e)));
//!     let _ = reply.send(outcome); // Ok(generation) or Err(reason)
//! }
//! ```
//!
//! [`run`] returns `Err` only for configuration it can never succeed with (bad URL, an
//! unreadable CA or client certificate, invalid trusted keys), so the daemon can exit
//! early with its bad-configuration code; and `Ok(())` once the daemon drops its
//! `PolicyUpdate` receiver. Otherwise it runs until its task is dropped or aborted, which
//! is always safe.

use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use ring::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Status,
    codegen::http::Uri,
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};

use crate::controlplane::{
    bundle::{KeyError, NodeIdentity, VerifiedBundle, Verifier},
    proto::{
        Ack, Bundle, Hello, Nack, NodeMessage, node_message::Kind,
        policy_sync_client::PolicySyncClient,
    },
};

/// Default shortest wait before reconnecting.
pub const DEFAULT_BACKOFF_MIN_MS: u64 = 200;

/// Default longest wait before reconnecting.
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 30_000;

/// How long a TCP connect plus TLS handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 pings on an idle stream, so a control plane that vanished without closing the
/// connection (a partition, a powered-off host) is noticed instead of waited on forever.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// How long a ping may go unanswered before the connection counts as dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The `[control_plane]` table of the daemon's configuration.
///
/// ```toml
/// [control_plane]
/// url = "https://cp.example:7443"         # or http://... with insecure = true
/// # urls = ["https://cp-1.example:7443", "https://cp-2.example:7443"]  # replicas, instead of url
/// ca = "/etc/enforcer/cp-ca.pem"          # the control plane's CA, pinned (https only)
/// client_cert = "/etc/enforcer/node.pem"  # optional, with client_key: mTLS
/// client_key = "/etc/enforcer/node.key"
/// # server_name = "cp.example"           # optional: name to verify instead of the URL's host
/// node_id = "edge-1"
/// labels = { region = "eu-west", tier = "gpu" }
/// trusted_keys = ["base64 of signing.pub", "..."]   # more than one while rotating
/// backoff_min_ms = 200
/// backoff_max_ms = 30000
/// # insecure = false                     # true allows http:// without TLS (tests, labs)
/// ```
///
/// Paths are taken as given; [`SyncConfig::resolve_paths`] anchors relative ones.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// `https://host:port` of the control plane (`http://` only with `insecure`). Give
    /// either `url` or `urls`.
    #[serde(default)]
    pub url: String,
    /// Control-plane replicas, tried in turn: when one refuses or its stream ends the next
    /// is tried at once, and the backoff grows only after a whole round failed.
    #[serde(default)]
    pub urls: Vec<String>,
    /// PEM file with the CA that signed the control plane's certificate; the only CA
    /// trusted for it (the system roots are not). Required for `https://`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate for mTLS; needs `client_key`.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Name the server certificate must carry, when it differs from the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// This node's id; the control plane serves it `nodes/<node_id>.toml` if present. With
    /// mTLS it must be the name in the client certificate: the control plane refuses a
    /// `Hello` that claims another. Bundles must target it ([`crate::controlplane::bundle::Target`]).
    pub node_id: String,
    /// Labels reported in `Hello`, and matched against selector bundles' targets.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Base64 Ed25519 public keys (`signing.pub`) whose bundles are accepted.
    pub trusted_keys: Vec<String>,
    /// Shortest wait before reconnecting, in milliseconds (default 200).
    #[serde(default = "default_backoff_min_ms")]
    pub backoff_min_ms: u64,
    /// Longest wait before reconnecting, in milliseconds (default 30000).
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Allow an `http://` URL: no TLS, so no server authentication. Bundles are still
    /// verified, so a network attacker can withhold policy but not forge it.
    #[serde(default)]
    pub insecure: bool,
}

fn default_backoff_min_ms() -> u64 {
    DEFAULT_BACKOFF_MIN_MS
}

fn default_backoff_max_ms() -> u64 {
    DEFAULT_BACKOFF_MAX_MS
}

impl SyncConfig {
    /// Makes relative `ca`, `client_cert` and `client_key` paths relative to `base` (the
    /// directory of the configuration file).
    pub fn resolve_paths(&mut self, base: &Path) {
        for path in [&mut self.ca, &mut self.client_cert, &mut self.client_key]
            .into_iter()
            .flatten()
        {
            *path = base.join(&*path);
        }
    }

    /// The replicas' URLs, `url` or `urls`.
    pub fn all_urls(&self) -> Vec<String> {
        if self.urls.is_empty() {
            vec![self.url.clone()]
        } else {
            self.urls.clone()
        }
    }

    /// How to reach the control plane (the first replica).
    pub fn endpoint(&self) -> ClientEndpoint {
        self.endpoints().swap_remove(0)
    }

    /// How to reach each replica, in order.
    pub fn endpoints(&self) -> Vec<ClientEndpoint> {
        self.all_urls()
            .into_iter()
            .map(|url| ClientEndpoint {
                url,
                ca: self.ca.clone(),
                client_cert: self.client_cert.clone(),
                client_key: self.client_key.clone(),
                server_name: self.server_name.clone(),
                insecure: self.insecure,
            })
            .collect()
    }

    /// This node as bundle targets see it.
    pub fn identity(&self) -> NodeIdentity {
        NodeIdentity {
            node_id: self.node_id.clone(),
            labels: self.labels.clone(),
        }
    }

    /// Checks every field without touching the network (the URL and TLS settings, the
    /// node id, the backoff bounds) and returns the verifier built from `trusted_keys`.
    /// Files are read later, by [`ClientEndpoint::prepare`].
    pub fn validate(&self) -> Result<Verifier, SyncError> {
        match (self.url.is_empty(), self.urls.is_empty()) {
            (true, true) => return Err(config_error("url", "expected url or urls")),
            (false, false) => {
                return Err(config_error(
                    "urls",
                    "give url (one control plane) or urls (replicas), not both",
                ));
            }
            _ => {}
        }
        for endpoint in self.endpoints() {
            endpoint.validate()?;
        }
        if self.node_id.trim().is_empty() {
            return Err(config_error("node_id", "expected a non-empty node id"));
        }
        if self.backoff_min_ms == 0 || self.backoff_min_ms > self.backoff_max_ms {
            return Err(config_error(
                "backoff_min_ms",
                format!(
                    "expected 1..=backoff_max_ms ({}), got {}",
                    self.backoff_max_ms, self.backoff_min_ms
                ),
            ));
        }
        Verifier::new(&self.trusted_keys, self.identity())
            .map_err(|source| SyncError::TrustedKeys { source })
    }

    /// The reconnect schedule these settings describe.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(
            Duration::from_millis(self.backoff_min_ms),
            Duration::from_millis(self.backoff_max_ms),
        )
    }
}

/// Where the control plane is and how to authenticate it (and, with mTLS, ourselves).
/// Shared by the node client and `enforcer control-plane nodes`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientEndpoint {
    /// `https://host:port`, or `http://host:port` with `insecure`.
    pub url: String,
    /// PEM CA of the control plane (required for `https://`).
    pub ca: Option<PathBuf>,
    /// PEM client certificate (mTLS).
    pub client_cert: Option<PathBuf>,
    /// PEM key of the client certificate.
    pub client_key: Option<PathBuf>,
    /// Name to verify the server certificate against instead of the URL's host.
    pub server_name: Option<String>,
    /// Allow `http://`.
    pub insecure: bool,
}

impl ClientEndpoint {
    /// Checks the settings without reading files.
    pub fn validate(&self) -> Result<(), SyncError> {
        let uri: Uri = self.url.parse().map_err(|e| {
            config_error(
                "url",
                format!("expected https://host:port, got {:?} ({e})", self.url),
            )
        })?;
        if uri.host().is_none() {
            return Err(config_error(
                "url",
                format!("expected https://host:port, got {:?}", self.url),
            ));
        }
        match (uri.scheme_str(), self.insecure) {
            (Some("https"), false) => {
                if self.ca.is_none() {
                    return Err(config_error(
                        "ca",
                        "an https:// url needs the control plane's CA certificate (PEM file)",
                    ));
                }
            }
            (Some("https"), true) => {
                return Err(config_error(
                    "insecure",
                    "insecure = true is only for http:// urls; remove it to use TLS",
                ));
            }
            (Some("http"), true) => {}
            (Some("http"), false) => {
                return Err(config_error(
                    "url",
                    "http:// is unencrypted and unauthenticated; use https:// or set insecure = true",
                ));
            }
            _ => {
                return Err(config_error(
                    "url",
                    format!("expected an https:// url, got {:?}", self.url),
                ));
            }
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(config_error(
                "client_cert",
                "client_cert and client_key go together (mTLS needs both)",
            ));
        }
        if self.insecure && (self.client_cert.is_some() || self.ca.is_some()) {
            return Err(config_error(
                "insecure",
                "ca, client_cert and client_key need TLS; remove them or use https://",
            ));
        }
        Ok(())
    }

    /// Validates, reads the PEM files and builds the tonic endpoint (TLS with only `ca`
    /// trusted, the client identity when configured, connect timeout and keep-alive).
    pub fn prepare(&self) -> Result<Endpoint, SyncError> {
        self.validate()?;
        let endpoint = Endpoint::from_shared(self.url.clone())
            .map_err(|source| SyncError::Endpoint {
                url: self.url.clone(),
                source,
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        if self.insecure {
            return Ok(endpoint);
        }
        let read = |field: &'static str, path: &Path| {
            fs::read(path).map_err(|source| SyncError::ReadFile {
                field,
                path: path.to_owned(),
                source,
            })
        };
        let ca = self
            .ca
            .as_deref()
            .expect("validate requires a CA for https");
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("ca", ca)?));
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            tls = tls.identity(Identity::from_pem(
                read("client_cert", cert)?,
                read("client_key", key)?,
            ));
        }
        endpoint
            .tls_config(tls)
            .map_err(|source| SyncError::Endpoint {
                url: self.url.clone(),
                source,
            })
    }
}

fn config_error(field: &'static str, message: impl Into<String>) -> SyncError {
    SyncError::Config {
        field,
        message: message.into(),
    }
}

/// Errors of the sync client. The configuration variants are permanent; the others end one
/// connection and are retried.
#[derive(Debug, Error)]
pub enum SyncError {
    /// A field of `[control_plane]` has an impossible value.
    #[error("control_plane.{field}: {message}")]
    Config {
        /// The field.
        field: &'static str,
        /// What was expected.
        message: String,
    },
    /// A trusted key does not decode.
    #[error("control_plane.trusted_keys")]
    TrustedKeys {
        /// Which entry and why.
        #[source]
        source: KeyError,
    },
    /// A certificate or key file could not be read.
    #[error("reading control_plane.{field} {}", path.display())]
    ReadFile {
        /// The field naming the file.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The URL or TLS settings were refused (a PEM file without a certificate, say).
    #[error("configuring the connection to {url}")]
    Endpoint {
        /// The control plane.
        url: String,
        /// The underlying error.
        #[source]
        source: tonic::transport::Error,
    },
    /// TCP, TLS or HTTP/2 failed.
    #[error("connecting to {url}")]
    Connect {
        /// The control plane.
        url: String,
        /// The underlying error; its sources carry the TLS alert or socket error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The control plane refused the `Sync` call.
    #[error("opening the sync stream on {url}")]
    Open {
        /// The control plane.
        url: String,
        /// The status it returned.
        #[source]
        source: Status,
    },
    /// The stream failed while waiting for a bundle.
    #[error("receiving from {url}")]
    Receive {
        /// The control plane.
        url: String,
        /// The status.
        #[source]
        source: Status,
    },
    /// The control plane ended the stream.
    #[error("{url} closed the sync stream")]
    Closed {
        /// The control plane.
        url: String,
    },
    /// An ACK or NACK could not be sent because the stream is gone.
    #[error("sending to {url}: the stream is closed")]
    Send {
        /// The control plane.
        url: String,
    },
}

impl SyncError {
    /// Whether retrying cannot help (the configuration is wrong).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            SyncError::Config { .. }
                | SyncError::TrustedKeys { .. }
                | SyncError::ReadFile { .. }
                | SyncError::Endpoint { .. }
        )
    }
}

/// What the client is doing, published on a `watch` channel for status and tests.
#[derive(Clone, Debug, Default)]
pub enum ConnectionState {
    /// [`run`] has not started yet.
    #[default]
    Idle,
    /// Connecting; `attempt` counts from 1 since the last established stream.
    Connecting {
        /// This attempt's number.
        attempt: u32,
    },
    /// A stream is open and `Hello` was sent.
    Connected {
        /// When the stream opened.
        since: SystemTime,
        /// The control plane's URL.
        server: String,
    },
    /// Waiting before reconnecting.
    Backoff {
        /// Consecutive failures so far (1 after a stream that was up ends).
        attempt: u32,
        /// How long until the next attempt.
        retry_in: Duration,
        /// Why the last attempt or stream failed.
        last_error: Arc<SyncError>,
    },
}

impl fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectionState::Idle => write!(f, "idle"),
            ConnectionState::Connecting { attempt } => write!(f, "connecting (attempt {attempt})"),
            ConnectionState::Connected { server, .. } => write!(f, "connected to {server}"),
            ConnectionState::Backoff {
                attempt,
                retry_in,
                last_error,
            } => write!(
                f,
                "retrying in {} ms after {attempt} failure(s): {}",
                retry_in.as_millis(),
                error_text(&**last_error)
            ),
        }
    }
}

/// A verified bundle for the daemon to apply. Reply exactly once: `Ok(Applied)` after
/// applying (and saving) it, or `Err(reason)` (one lowercase line, sent as the NACK reason)
/// if it was rejected; dropping `reply` NACKs it too.
#[derive(Debug)]
pub struct PolicyUpdate {
    /// The bundle, signature, target and version already checked.
    pub bundle: VerifiedBundle,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<Applied, String>>,
}

/// What the daemon reports after applying a bundle; goes into the ACK.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The policy generation now enforcing.
    pub generation: u64,
    /// The audit chain's head then: hex SHA-256 of the last record, and its `seq` (the
    /// number of records). `None` when the node keeps no audit log.
    pub audit: Option<(String, u64)>,
}

/// Exponential backoff with jitter: after failure `n` (from 1) the wait is drawn uniformly
/// from `[min, min(max, min * 2^(n-1))]`. Drawing from the whole range ("full jitter")
/// spreads a fleet of nodes that lost the control plane at the same moment; the floor of
/// `min` keeps a refused connection from being retried in a tight loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// A schedule between `min` and `max` (`max` is raised to `min` if smaller).
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
        }
    }

    /// The longest wait after failure `attempt` (from 1).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        // Past 2^31 the ceiling is far beyond any sensible max anyway.
        let doublings = attempt.saturating_sub(1).min(31);
        self.min
            .checked_mul(1u32 << doublings)
            .map_or(self.max, |d| d.min(self.max))
    }

    /// A random wait after failure `attempt`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let mut bytes = [0u8; 8];
        // The system RNG failing is as good as no jitter: fall back to the ceiling.
        let sample = match SystemRandom::new().fill(&mut bytes) {
            Ok(()) => u64::from_le_bytes(bytes),
            Err(_) => u64::MAX,
        };
        self.delay_for_sample(attempt, sample)
    }

    /// The wait after failure `attempt` for a uniform random `sample`: 0 gives `min`,
    /// `u64::MAX` the ceiling.
    pub fn delay_for_sample(&self, attempt: u32, sample: u64) -> Duration {
        let low = self.min.as_nanos();
        let span = self.ceiling(attempt).as_nanos() - low;
        let offset = span * u128::from(sample) / u128::from(u64::MAX);
        Duration::from_nanos((low + offset) as u64)
    }
}

/// Runs the client: connects, streams, verifies, hands bundles to the daemon through
/// `updates` and reconnects forever, publishing progress on `state`.
///
/// `held` is what the daemon holds (see [`Held`]), normally the
/// stored bundle's. Returns `Err` at once if the configuration can never work, `Ok(())`
/// when the `updates` receiver is dropped; see the module documentation.
pub async fn run(
    cfg: SyncConfig,
    held: Held,
    updates: mpsc::Sender<PolicyUpdate>,
    state: watch::Sender<ConnectionState>,
) -> Result<(), SyncError> {
    let verifier = cfg.validate()?;
    let endpoints = cfg
        .endpoints()
        .iter()
        .map(|e| e.prepare().map(|prepared| (e.url.clone(), prepared)))
        .collect::<Result<Vec<_>, _>>()?;
    let backoff = cfg.backoff();
    let mut client = Client {
        cfg,
        verifier,
        held: held.version,
        floor_only: held.floor_only,
        updates,
        state,
    };
    // Failures since the last stream that was up; the next replica is tried after each, and
    // the wait grows with the number of whole rounds that failed.
    let mut failures = 0u32;
    let mut next = 0usize;
    let rounds = |failures: u32| failures.div_ceil(endpoints.len() as u32);
    loop {
        client.state.send_replace(ConnectionState::Connecting {
            attempt: failures + 1,
        });
        let (url, endpoint) = &endpoints[next % endpoints.len()];
        next = next.wrapping_add(1);
        let end = client.session(url, endpoint).await;
        let (error, was_connected) = match end {
            SessionEnd::DaemonGone => {
                tracing::info!("the daemon stopped taking policy updates; sync client exiting");
                return Ok(());
            }
            SessionEnd::Failed {
                error,
                was_connected,
            } => (error, was_connected),
        };
        failures = if was_connected { 1 } else { failures + 1 };
        // Within a round the next replica is tried after the shortest wait; a failed round
        // backs off as one failure did with one control plane.
        let retry_in = if !was_connected && !(failures as usize).is_multiple_of(endpoints.len()) {
            backoff.delay(1)
        } else {
            backoff.delay(rounds(failures))
        };
        tracing::warn!(
            error = %error_text(&error),
            attempt = failures,
            retry_in_ms = retry_in.as_millis() as u64,
            "control plane unavailable; the current policy keeps enforcing"
        );
        client.state.send_replace(ConnectionState::Backoff {
            attempt: failures,
            retry_in,
            last_error: Arc::new(error),
        });
        tokio::select! {
            () = tokio::time::sleep(retry_in) => {}
            () = client.updates.closed() => {
                tracing::info!("the daemon stopped taking policy updates; sync client exiting");
                return Ok(());
            }
        }
    }
}

/// Why one connection ended.
enum SessionEnd {
    /// The daemon dropped its receiver: stop for good.
    DaemonGone,
    /// Reconnect.
    Failed {
        error: SyncError,
        /// Whether the stream had been established (resets the backoff).
        was_connected: bool,
    },
}

/// What the node holds when the client starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// The version of the bundle the node enforces; with `floor_only`, its rollback floor
    /// (the highest version it ever accepted) instead. Bundles up to it are refused.
    pub version: u64,
    /// The node enforces its local policy file, not bundle `version` (the stored bundle
    /// failed verification): the control plane sends its bundle even at this version.
    pub floor_only: bool,
}

struct Client {
    cfg: SyncConfig,
    verifier: Verifier,
    held: u64,
    /// See [`Held::floor_only`]; false once a bundle was applied.
    floor_only: bool,
    updates: mpsc::Sender<PolicyUpdate>,
    state: watch::Sender<ConnectionState>,
}

impl Client {
    /// One connection: connect, say hello, then answer bundles until something fails.
    async fn session(&mut self, url: &str, endpoint: &Endpoint) -> SessionEnd {
        let url = url.to_owned();
        let failed = |error| SessionEnd::Failed {
            error,
            was_connected: false,
        };
        let channel = tokio::select! {
            connected = endpoint.connect() => match connected {
                Ok(channel) => channel,
                Err(source) => return failed(SyncError::Connect { url, source }),
            },
            () = self.updates.closed() => return SessionEnd::DaemonGone,
        };
        let mut client = PolicySyncClient::new(channel);
        // Capacity 2 is enough: one Hello, then one ACK or NACK per bundle in turn.
        let (outbound, outbound_rx) = mpsc::channel(2);
        let hello = message(Kind::Hello(Hello {
            node_id: self.cfg.node_id.clone(),
            labels: self.cfg.labels.clone(),
            version: self.held,
            floor_only: self.floor_only,
        }));
        outbound
            .try_send(hello)
            .expect("a fresh channel has room for the hello");
        let mut inbound = match client.sync(ReceiverStream::new(outbound_rx)).await {
            Ok(response) => response.into_inner(),
            Err(source) => return failed(SyncError::Open { url, source }),
        };
        tracing::info!(%url, node_id = %self.cfg.node_id, held = self.held, "connected to the control plane");
        self.state.send_replace(ConnectionState::Connected {
            since: SystemTime::now(),
            server: url.clone(),
        });
        let failed = |error| SessionEnd::Failed {
            error,
            was_connected: true,
        };
        loop {
            let received = tokio::select! {
                received = inbound.message() => received,
                () = self.updates.closed() => return SessionEnd::DaemonGone,
            };
            let bundle = match received {
                Ok(Some(bundle)) => bundle,
                Ok(None) => return failed(SyncError::Closed { url }),
                Err(source) => return failed(SyncError::Receive { url, source }),
            };
            let answer = match self.handle(bundle).await {
                Some(answer) => answer,
                None => return SessionEnd::DaemonGone,
            };
            if outbound.send(answer).await.is_err() {
                return failed(SyncError::Send { url });
            }
        }
    }

    /// Verifies a bundle and, if good, waits for the daemon's verdict. Returns the ACK or
    /// NACK to send, or `None` if the daemon is gone.
    async fn handle(&mut self, bundle: Bundle) -> Option<NodeMessage> {
        let version = bundle.version;
        let nack = |reason: String| message(Kind::Nack(Nack { version, reason }));
        let verified = match self.verifier.verify(&bundle, self.held) {
            Ok(verified) => verified,
            Err(e) => {
                tracing::warn!(version, source = %bundle.source, reason = %e, "bundle rejected");
                return Some(nack(e.to_string()));
            }
        };
        tracing::info!(version, source = %verified.source(), key_id = %verified.key_id(), "verified bundle; handing it to the daemon");
        let (reply, outcome) = oneshot::channel();
        let update = PolicyUpdate {
            bundle: verified,
            reply,
        };
        if self.updates.send(update).await.is_err() {
            return None;
        }
        match outcome.await {
            Ok(Ok(applied)) => {
                tracing::info!(version, generation = applied.generation, "bundle applied");
                self.held = version;
                self.floor_only = false;
                let (audit_head, audit_records) = applied.audit.unwrap_or_default();
                Some(message(Kind::Ack(Ack {
                    version,
                    audit_head,
                    audit_records,
                })))
            }
            Ok(Err(reason)) => {
                tracing::warn!(version, %reason, "the daemon rejected the bundle");
                Some(nack(reason))
            }
            Err(_) => Some(nack(
                "the daemon dropped the update without applying it".into(),
            )),
        }
    }
}

/// Renders an error and its sources on one line, like [`error_chain`](crate::error::error_chain), but readable for
/// gRPC errors: a [`Status`] shows as `code: message` (its own `Display` embeds the `Debug`
/// of its source), and a source whose text the line already ends with is not repeated
/// (rustls errors reach us wrapped in I/O errors that display the same text).
pub fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    fn one(error: &(dyn std::error::Error + 'static)) -> String {
        match error.downcast_ref::<Status>() {
            Some(status) => format!("{:?}: {}", status.code(), status.message()),
            None => error.to_string(),
        }
    }
    let mut out = one(error);
    let mut source = error.source();
    while let Some(e) = source {
        let text = one(e);
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

fn message(kind: Kind) -> NodeMessage {
    NodeMessage { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::error_chain;

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn parse(text: &str) -> SyncConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn config_defaults() {
        let cfg = parse(&format!(
            "url = \"https://127.0.0.1:7443\"\nca = \"ca.pem\"\nnode_id = \"n1\"\ntrusted_keys = [\"{KEY}\"]\n"
        ));
        assert_eq!(cfg.backoff_min_ms, 200);
        assert_eq!(cfg.backoff_max_ms, 30_000);
        assert!(!cfg.insecure);
        assert!(cfg.labels.is_empty());
        cfg.validate().unwrap();
        let mut resolved = cfg.clone();
        resolved.resolve_paths(Path::new("/etc/enforcer"));
        assert_eq!(resolved.ca, Some(PathBuf::from("/etc/enforcer/ca.pem")));
    }

    #[test]
    fn config_errors_name_the_field() {
        let base = format!("node_id = \"n1\"\ntrusted_keys = [\"{KEY}\"]\n");
        let cases = [
            (
                "url = \"https://h:1\"\n",
                "control_plane.ca: an https:// url needs",
            ),
            (
                "url = \"http://h:1\"\n",
                "control_plane.url: http:// is unencrypted",
            ),
            (
                "url = \"https://h:1\"\nca = \"c\"\ninsecure = true\n",
                "control_plane.insecure: insecure = true is only for http://",
            ),
            (
                "url = \"ftp://h:1\"\n",
                "control_plane.url: expected an https:// url",
            ),
            (
                "url = \"https://h:1\"\nca = \"c\"\nclient_cert = \"x\"\n",
                "control_plane.client_cert: client_cert and client_key go together",
            ),
            (
                "url = \"https://h:1\"\nca = \"c\"\nbackoff_min_ms = 0\n",
                "control_plane.backoff_min_ms: expected 1..=backoff_max_ms (30000), got 0",
            ),
        ];
        for (extra, expected) in cases {
            let e = parse(&format!("{base}{extra}")).validate().unwrap_err();
            assert!(e.to_string().starts_with(expected), "{extra}: {e}");
            assert!(e.is_config());
        }
        parse(&format!("{base}url = \"http://h:1\"\ninsecure = true\n"))
            .validate()
            .unwrap();
        let e = parse(
            "url = \"http://h:1\"\ninsecure = true\nnode_id = \"n\"\ntrusted_keys = [\"eA==\"]\n",
        )
        .validate()
        .unwrap_err();
        assert_eq!(
            error_chain(&e),
            "control_plane.trusted_keys: trusted_keys[0]: expected a 32-byte Ed25519 public key, got 1 bytes"
        );
        assert!(toml::from_str::<SyncConfig>(&format!("{base}url = \"x\"\nbogus = 1\n")).is_err());
    }

    #[test]
    fn missing_ca_file_is_named() {
        let endpoint = ClientEndpoint {
            url: "https://127.0.0.1:1".into(),
            ca: Some("/nonexistent/ca.pem".into()),
            ..ClientEndpoint::default()
        };
        let e = endpoint.prepare().unwrap_err();
        assert_eq!(
            e.to_string(),
            "reading control_plane.ca /nonexistent/ca.pem"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_bound() {
        let b = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let ceilings: Vec<u64> = (1..=10).map(|n| b.ceiling(n).as_millis() as u64).collect();
        assert_eq!(
            ceilings,
            [
                200, 400, 800, 1600, 3200, 6400, 12_800, 25_600, 30_000, 30_000
            ]
        );
        assert_eq!(b.ceiling(0), Duration::from_millis(200));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(30));
        assert_eq!(
            Backoff::new(Duration::from_secs(5), Duration::from_secs(1)).ceiling(3),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn jitter_spans_floor_to_ceiling() {
        let b = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        for attempt in [1, 2, 5, 9, 40] {
            assert_eq!(b.delay_for_sample(attempt, 0), Duration::from_millis(200));
            assert_eq!(b.delay_for_sample(attempt, u64::MAX), b.ceiling(attempt));
            let mid = b.delay_for_sample(attempt, u64::MAX / 2);
            let expected = (200 + b.ceiling(attempt).as_millis() as u64) / 2;
            assert!(
                mid.as_millis().abs_diff(u128::from(expected)) <= 1,
                "{mid:?}"
            );
        }
        // Random draws stay in range and are not all the same.
        let draws: Vec<Duration> = (0..200).map(|_| b.delay(6)).collect();
        assert!(
            draws
                .iter()
                .all(|d| (Duration::from_millis(200)..=Duration::from_millis(6400)).contains(d))
        );
        assert!(draws.iter().any(|d| *d != draws[0]));
    }
}
