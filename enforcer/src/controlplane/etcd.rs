//! The fleet's store in etcd: signed bundles, the fleet-wide version, and what each node
//! holds. Replicas (`enforcer control-plane serve` with `[etcd]`) keep no state of their own:
//! they read and watch this, and write what their nodes report. Only a publisher
//! (`enforcer control-plane publish`) holds the signing key; a replica relays signed bundles
//! and cannot make one.
//!
//! # Keys (under `prefix`, default `/enforcer/`)
//!
//! | key | value |
//! |---|---|
//! | `version` | the last version handed out, decimal: the compare-and-swap that makes versions fleet-wide monotonic |
//! | `bundles/all`, `bundles/node/<id>`, `bundles/selector/<k=v,...>` | the signed [`Bundle`] (protobuf) for that [`Target`] |
//! | `nodes/<id>` | the node's [`NodeStatus`] as JSON: versions, last ACK/NACK and reason, audit anchor |
//! | `connected/<id>` | `<replica>#<stream>` while a replica holds the node's stream, on that replica's lease |
//!
//! A bundle is written in the same transaction as the version it carries, guarded by the
//! version key's revision: two publishers racing both succeed, one after the other, with
//! different versions; neither can go back.
//!
//! `connected/<id>` lives on a lease the replica keeps alive: a replica that dies takes its
//! nodes' presence with it within the lease's TTL, and the nodes' failover writes it anew
//! from the replica they reach.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp, WatchOptions,
};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::controlplane::{
    NodeStatus,
    bundle::{BundleError, SigningKey, Target},
    now_unix_ms,
    proto::Bundle,
};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/enforcer/";

/// How long one etcd request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long connecting to an etcd member may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Compare-and-swap attempts before a publish gives up (each one lost to another publisher
/// that got a version in first).
const PUBLISH_ATTEMPTS: usize = 16;

/// Where etcd is and how to authenticate to it: the `[etcd]` table of a replica's
/// configuration, and `--etcd` on `enforcer control-plane publish`.
///
/// ```toml
/// [etcd]
/// endpoints = ["https://etcd-1:2379", "https://etcd-2:2379", "https://etcd-3:2379"]
/// # prefix = "/enforcer/"
/// # ca = "/etc/enforcer-cp/etcd-ca.pem"      # https endpoints: the CA of etcd's certificate
/// # cert = "/etc/enforcer-cp/etcd-client.pem" # etcd client-certificate auth
/// # key = "/etc/enforcer-cp/etcd-client.key"
/// ```
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members; requests go to whichever answers.
    pub endpoints: Vec<String>,
    /// Prefix of every key (default `/enforcer/`), so one etcd can hold several fleets.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// PEM CA of etcd's server certificate (https endpoints).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate for etcd, with `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn default_prefix() -> String {
    DEFAULT_PREFIX.into()
}

impl EtcdConfig {
    /// Plain endpoints with the default prefix and no TLS.
    pub fn plain(endpoints: Vec<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: default_prefix(),
            ca: None,
            cert: None,
            key: None,
        }
    }

    /// Makes relative paths relative to `base`.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        for path in [&mut self.ca, &mut self.cert, &mut self.key]
            .into_iter()
            .flatten()
        {
            *path = base.join(&*path);
        }
    }

    /// Checks the fields without touching the network.
    pub fn validate(&self) -> Result<(), EtcdError> {
        let invalid = |field, message: String| Err(EtcdError::Config { field, message });
        if self.endpoints.is_empty() {
            return invalid("etcd.endpoints", "expected at least one endpoint".into());
        }
        for endpoint in &self.endpoints {
            let https = endpoint.starts_with("https://");
            if !https && !endpoint.starts_with("http://") {
                return invalid(
                    "etcd.endpoints",
                    format!("expected http://host:port or https://host:port, got {endpoint:?}"),
                );
            }
            if https && self.ca.is_none() {
                return invalid(
                    "etcd.ca",
                    format!("{endpoint} needs the CA of etcd's certificate"),
                );
            }
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            return invalid(
                "etcd.prefix",
                format!(
                    "expected a prefix starting and ending with '/', got {:?}",
                    self.prefix
                ),
            );
        }
        if self.cert.is_some() != self.key.is_some() {
            return invalid("etcd.cert", "cert and key go together".into());
        }
        Ok(())
    }
}

/// Errors talking to etcd.
#[derive(Debug, Error)]
pub enum EtcdError {
    /// A configuration field is wrong.
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
        source: std::io::Error,
    },
    /// No etcd member could be reached, or a request failed.
    #[error("etcd ({endpoints}): {what}")]
    Etcd {
        /// What was being done.
        what: String,
        /// The endpoints tried.
        endpoints: String,
        /// The underlying error.
        #[source]
        source: etcd_client::Error,
    },
    /// A stored value is not what this version of the enforcer writes.
    #[error("etcd key {key}: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// The bundle could not be signed.
    #[error("signing the bundle")]
    Sign {
        /// Why.
        #[source]
        source: BundleError,
    },
    /// Every compare-and-swap lost to another publisher.
    #[error("publishing: {PUBLISH_ATTEMPTS} attempts lost to concurrent publishers")]
    Contended,
}

/// Operations per transaction: etcd's default limit (`--max-txn-ops`) is 128.
pub const MAX_TXN_OPS: usize = 100;

/// How often a request that met an unavailable member is repeated (with 50, 100, ... ms
/// between): enough to get past two dead members of a five-member cluster several times.
const RETRIES: u32 = 8;

/// Whether the request failed because of the member it reached, not the request: another
/// member may well answer.
fn unavailable(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        ),
        _ => false,
    }
}

/// A connection to the fleet's etcd.
#[derive(Clone)]
pub struct Store {
    client: Client,
    prefix: String,
    endpoints: String,
}

/// A bundle as stored, with the target its key names.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    /// The target, parsed from the key.
    pub target: Target,
    /// The signed bundle.
    pub bundle: Bundle,
}

/// A change to the stored bundles, from [`Store::watch_bundles`].
#[derive(Clone, Debug, PartialEq)]
pub enum BundleChange {
    /// A bundle was published for this target (replacing any before it).
    Put(Stored),
    /// The bundle for this target was removed.
    Deleted(Target),
}

impl Store {
    /// Connects to etcd (lazily: a member that is down now is tried again per request).
    pub async fn connect(cfg: &EtcdConfig) -> Result<Store, EtcdError> {
        cfg.validate()?;
        let endpoints = cfg.endpoints.join(",");
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        if let Some(ca) = &cfg.ca {
            let read = |field, path: &PathBuf| {
                std::fs::read(path).map_err(|source| EtcdError::ReadFile {
                    field,
                    path: path.clone(),
                    source,
                })
            };
            let mut tls =
                TlsOptions::new().ca_certificate(Certificate::from_pem(read("etcd.ca", ca)?));
            if let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) {
                tls = tls.identity(Identity::from_pem(
                    read("etcd.cert", cert)?,
                    read("etcd.key", key)?,
                ));
            }
            options = options.with_tls(tls);
        }
        let client = Client::connect(&cfg.endpoints, Some(options))
            .await
            .map_err(|source| EtcdError::Etcd {
                what: "connecting".into(),
                endpoints: endpoints.clone(),
                source,
            })?;
        Ok(Store {
            client,
            prefix: cfg.prefix.clone(),
            endpoints,
        })
    }

    /// The endpoints, comma-separated, for logs.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    fn failed(&self, what: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> EtcdError {
        let what = what.into();
        let endpoints = self.endpoints.clone();
        move |source| EtcdError::Etcd {
            what,
            endpoints,
            source,
        }
    }

    /// Runs `request` on the client, again when it failed only because the member it reached
    /// is down or has no leader: the client spreads requests over every endpoint, including
    /// a member that died, so one request in a few may meet it. Every request here is safe to
    /// repeat (reads, whole-value writes, and compare-and-swaps that fail when repeated).
    async fn retried<T, Fut>(
        &self,
        what: &str,
        mut request: impl FnMut(Client) -> Fut,
    ) -> Result<T, EtcdError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut attempt = 0u32;
        loop {
            match request(self.client.clone()).await {
                Ok(value) => return Ok(value),
                Err(e) if attempt < RETRIES && unavailable(&e) => {
                    attempt += 1;
                    tracing::debug!(what, attempt, error = %e, "etcd member unavailable; again");
                    tokio::time::sleep(Duration::from_millis(50) * attempt).await;
                }
                Err(e) => return Err(self.failed(what)(e)),
            }
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn bundle_key(&self, target: &Target) -> String {
        match target {
            Target::All => self.key("bundles/all"),
            Target::Node(id) => self.key(&format!("bundles/node/{id}")),
            Target::Selector(labels) => self.key(&format!(
                "bundles/selector/{}",
                crate::controlplane::bundle::labels_text(labels)
            )),
        }
    }

    /// The target a bundle key names, from the part after `bundles/`.
    fn target_of(rest: &str) -> Result<Target, String> {
        if rest == "all" {
            return Ok(Target::All);
        }
        if let Some(id) = rest.strip_prefix("node/") {
            return Target::parse(&format!("node:{id}"));
        }
        if let Some(pairs) = rest.strip_prefix("selector/") {
            return Target::selector(pairs);
        }
        Err("expected all, node/<id> or selector/<labels>".into())
    }

    /// Signs `policy` for `target` with the next fleet-wide version and stores it, in one
    /// compare-and-swap on the version key; retried when another publisher got in first.
    /// The version is above every version handed out before and at least the current time
    /// in milliseconds (so it also stays above what a single-process control plane issued).
    pub async fn publish(
        &self,
        key: &SigningKey,
        source: &str,
        target: &Target,
        policy: Vec<u8>,
    ) -> Result<Bundle, EtcdError> {
        let version_key = self.key("version");
        let bundle_key = self.bundle_key(target);
        for _ in 0..PUBLISH_ATTEMPTS {
            let current = self
                .retried("reading the fleet version", |mut c| {
                    let key = version_key.clone();
                    async move { c.get(key, None).await }
                })
                .await?;
            let (last, revision) = match current.kvs().first() {
                Some(kv) => {
                    let last = kv
                        .value_str()
                        .ok()
                        .and_then(|text| text.parse::<u64>().ok())
                        .ok_or_else(|| EtcdError::Corrupt {
                            key: version_key.clone(),
                            message: "expected a decimal version".into(),
                        })?;
                    (last, kv.mod_revision())
                }
                // A key that does not exist has revision 0: the first publish competes on it.
                None => (0, 0),
            };
            let now = now_unix_ms();
            let version = (last + 1).max(now.max(0) as u64);
            let bundle = key
                .sign(version, now, source, target, policy.clone())
                .map_err(|source| EtcdError::Sign { source })?;
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    version_key.as_str(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([
                    TxnOp::put(version_key.as_str(), version.to_string(), None),
                    TxnOp::put(bundle_key.as_str(), bundle.encode_to_vec(), None),
                ]);
            let done = self
                .retried("writing the bundle", |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            if done.succeeded() {
                return Ok(bundle);
            }
            tracing::debug!(version, "another publisher got a version in first; again");
        }
        Err(EtcdError::Contended)
    }

    /// Every stored bundle, and the revision to watch from.
    pub async fn bundles(&self) -> Result<(Vec<Stored>, i64), EtcdError> {
        let prefix = self.key("bundles/");
        let response = self
            .retried("reading the bundles", |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut stored = Vec::new();
        for kv in response.kvs() {
            match self.decode_bundle(kv.key(), kv.value()) {
                Ok(s) => stored.push(s),
                Err(e) => tracing::error!(error = %e, "skipping a stored bundle"),
            }
        }
        Ok((stored, revision))
    }

    fn decode_bundle(&self, key: &[u8], value: &[u8]) -> Result<Stored, EtcdError> {
        let key = String::from_utf8_lossy(key).into_owned();
        let corrupt = |message: String| EtcdError::Corrupt {
            key: key.clone(),
            message,
        };
        let rest = key
            .strip_prefix(&self.key("bundles/"))
            .ok_or_else(|| corrupt("outside the bundles prefix".into()))?;
        let target = Store::target_of(rest).map_err(corrupt)?;
        let bundle = Bundle::decode(value).map_err(|e| corrupt(format!("not a bundle: {e}")))?;
        Ok(Stored { target, bundle })
    }

    /// Watches the bundles from `revision` on; each item is one change, in order. The
    /// stream ends (with an error logged) when the watch fails: read [`Store::bundles`]
    /// again and watch anew.
    pub async fn watch_bundles(
        &self,
        revision: i64,
    ) -> Result<tokio::sync::mpsc::Receiver<BundleChange>, EtcdError> {
        let prefix = self.key("bundles/");
        let mut stream = self
            .retried("watching the bundles", |mut c| {
                let prefix = prefix.clone();
                async move {
                    c.watch(
                        prefix,
                        Some(
                            WatchOptions::new()
                                .with_prefix()
                                .with_start_revision(revision),
                        ),
                    )
                    .await
                }
            })
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let store = self.clone();
        tokio::spawn(async move {
            loop {
                let response = match stream.message().await {
                    Ok(Some(response)) => response,
                    Ok(None) => {
                        tracing::warn!("the etcd watch ended");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the etcd watch failed");
                        return;
                    }
                };
                if response.canceled() {
                    tracing::warn!(reason = %response.cancel_reason(), "etcd cancelled the watch");
                    return;
                }
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let change = match event.event_type() {
                        etcd_client::EventType::Put => {
                            match store.decode_bundle(kv.key(), kv.value()) {
                                Ok(stored) => BundleChange::Put(stored),
                                Err(e) => {
                                    tracing::error!(error = %e, "skipping a stored bundle");
                                    continue;
                                }
                            }
                        }
                        etcd_client::EventType::Delete => {
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            let rest = key.strip_prefix(&store.key("bundles/")).unwrap_or("");
                            match Store::target_of(rest) {
                                Ok(target) => BundleChange::Deleted(target),
                                Err(_) => continue,
                            }
                        }
                    };
                    if tx.send(change).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    /// What etcd holds about one node, if anything.
    pub async fn node(&self, node_id: &str) -> Result<Option<NodeStatus>, EtcdError> {
        let key = self.key(&format!("nodes/{node_id}"));
        let response = self
            .retried("reading a node's state", |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        response
            .kvs()
            .first()
            .map(|kv| {
                serde_json::from_slice(kv.value()).map_err(|e| EtcdError::Corrupt {
                    key: key.clone(),
                    message: format!("not a node state: {e}"),
                })
            })
            .transpose()
    }

    /// Writes nodes' states (everything but `connected` and `replica`, which are
    /// [`Store::set_connected`]'s), one transaction per [`MAX_TXN_OPS`] of them: a
    /// replica whose thousand nodes ACK at once writes them in ten round trips, not a
    /// thousand.
    pub async fn put_nodes(&self, nodes: &[NodeStatus]) -> Result<(), EtcdError> {
        for chunk in nodes.chunks(MAX_TXN_OPS) {
            let puts: Vec<TxnOp> = chunk
                .iter()
                .map(|status| {
                    let mut stored = status.clone();
                    stored.connected = false;
                    stored.replica = None;
                    let value = serde_json::to_vec(&stored).expect("a node state serializes");
                    TxnOp::put(self.key(&format!("nodes/{}", status.node_id)), value, None)
                })
                .collect();
            let txn = Txn::new().and_then(puts);
            self.retried("writing nodes' states", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        }
        Ok(())
    }

    /// Every node etcd knows, sorted by id, with `connected` and `replica` from the
    /// presence keys.
    pub async fn nodes(&self) -> Result<Vec<NodeStatus>, EtcdError> {
        let prefix = self.key("nodes/");
        let read = |what: &'static str, prefix: String| {
            self.retried(what, move |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
        };
        let response = read("reading the nodes", prefix).await?;
        let mut nodes = BTreeMap::new();
        for kv in response.kvs() {
            match serde_json::from_slice::<NodeStatus>(kv.value()) {
                Ok(node) => {
                    nodes.insert(node.node_id.clone(), node);
                }
                Err(e) => {
                    tracing::error!(key = %String::from_utf8_lossy(kv.key()), error = %e, "skipping a node state")
                }
            }
        }
        let prefix = self.key("connected/");
        let response = read("reading the node presence", prefix.clone()).await?;
        for kv in response.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            let Some(id) = key.strip_prefix(&prefix) else {
                continue;
            };
            if let Some(node) = nodes.get_mut(id) {
                node.connected = true;
                let holder = String::from_utf8_lossy(kv.value());
                node.replica = Some(holder.split('#').next().unwrap_or("").to_owned());
            }
        }
        Ok(nodes.into_values().collect())
    }

    /// Grants a lease of `ttl` seconds for presence keys; keep it with [`Store::keep_alive`].
    pub async fn grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        let response = self
            .retried("granting a lease", |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?;
        Ok(response.id())
    }

    /// Keeps `lease` alive every `every` until it cannot: returns when the lease is gone
    /// (expired, or etcd unreachable for longer than its TTL) or the keep-alive fails.
    pub async fn keep_alive(&self, lease: i64, every: Duration) -> EtcdError {
        let (mut keeper, mut stream) = match self.client.clone().lease_keep_alive(lease).await {
            Ok(pair) => pair,
            Err(e) => return self.failed("keeping the lease alive")(e),
        };
        loop {
            if let Err(e) = keeper.keep_alive().await {
                return self.failed("keeping the lease alive")(e);
            }
            match stream.message().await {
                Ok(Some(response)) if response.ttl() > 0 => {}
                Ok(_) => {
                    return EtcdError::Corrupt {
                        key: format!("lease {lease:x}"),
                        message: "the lease expired".into(),
                    };
                }
                Err(e) => return self.failed("keeping the lease alive")(e),
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Records that `holder` (`<replica>#<stream>`) has `node_id`'s stream, on `lease`.
    pub async fn set_connected(
        &self,
        node_id: &str,
        holder: &str,
        lease: i64,
    ) -> Result<(), EtcdError> {
        let key = self.key(&format!("connected/{node_id}"));
        self.retried("recording a node's presence", |mut c| {
            let (key, holder) = (key.clone(), holder.to_owned());
            async move {
                c.put(key, holder, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await?;
        Ok(())
    }

    /// Removes `node_id`'s presence if `holder` still has it (the node may already be on
    /// another replica's stream).
    pub async fn clear_connected(&self, node_id: &str, holder: &str) -> Result<(), EtcdError> {
        let key = self.key(&format!("connected/{node_id}"));
        let txn = Txn::new()
            .when([Compare::value(key.as_str(), CompareOp::Equal, holder)])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        self.retried("clearing a node's presence", |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_keys_name_their_targets() {
        for text in ["all", "node:edge-1", "selector:tier=gpu,zone=eu-1"] {
            let target = Target::parse(text).unwrap();
            let rest = match &target {
                Target::All => "all".to_string(),
                Target::Node(id) => format!("node/{id}"),
                Target::Selector(l) => {
                    format!("selector/{}", crate::controlplane::bundle::labels_text(l))
                }
            };
            assert_eq!(Store::target_of(&rest).unwrap(), target);
        }
        assert!(Store::target_of("nodes/x").is_err());
    }

    #[test]
    fn config_errors_name_the_field() {
        let mut cfg = EtcdConfig::plain(vec![]);
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .starts_with("etcd.endpoints:")
        );
        cfg.endpoints = vec!["127.0.0.1:2379".into()];
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .starts_with("etcd.endpoints:")
        );
        cfg.endpoints = vec!["https://127.0.0.1:2379".into()];
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .starts_with("etcd.ca:")
        );
        cfg.endpoints = vec!["http://127.0.0.1:2379".into()];
        cfg.prefix = "enforcer".into();
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .starts_with("etcd.prefix:")
        );
        cfg.prefix = "/e/".into();
        cfg.validate().unwrap();
    }
}
