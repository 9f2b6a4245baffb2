//! The inspecting egress proxy: agents whose policy says `inspect = true` have their TLS
//! terminated here with a certificate from the node's CA ([`ca`]), the plaintext searched
//! by the policy's detectors and the shipped catalogue of secret formats ([`dlp`],
//! [`catalogue`]) in each direction, and a verified TLS connection of the proxy's own
//! carrying it upstream ([`proxy`]).
//!
//! Two ways in, configured in the daemon's `[inspect]` section ([`InspectConfig`]):
//! explicit `CONNECT host:port` on `listen`, and transparent interception of the
//! inspected agents' connections to the policy's `tls_ports`, redirected by an nftables
//! rule ([`redirect`]) to `transparent_port`.
//!
//! After both handshakes the plaintext is searched in user space ([`http`], [`relay`]).
//! The record layer under it is kernel TLS where the kernel has it ([`ktls`]: the
//! sessions' keys handed to the kernel, plaintext read and written through the sockets)
//! and rustls otherwise, chosen by `record_layer` ([`RecordLayer`]) at start
//! ([`InspectPath`], logged once and exported as `enforcer_inspect_path{path}`) and per
//! connection (`enforcer_inspect_record_layer_total{layer,reason}`). The sockmap
//! inspector that ran the detectors in the kernel was removed, because Linux refuses kTLS
//! keys on sockets in a sockmap.

pub mod body;
pub mod ca;
pub mod catalogue;
pub mod decode;
pub mod dlp;
pub mod http;
pub mod ktls;
pub mod mcp;
pub mod proxy;
pub mod redirect;
pub mod relay;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

/// The daemon's `[inspect]` section.
///
/// ```toml
/// [inspect]
/// listen = "0.0.0.0:3128"        # explicit CONNECT proxy; "" disables it
/// transparent_port = 3129        # where the agents' TLS ports are redirected; 0 disables it
/// upstream_roots = "/etc/ssl/certs/ca-certificates.crt"  # PEM roots the upstream certificates are verified with
/// ca_dir = "/var/lib/enforcer"   # where the node CA lives (default: state_dir); keep it on persistent storage
/// max_connections_per_agent = 256 # open proxied connections one agent may hold
/// max_connections = 4096         # open proxied connections in all; lowered to fit the descriptor limit
/// record_layer = "rustls"        # rustls | auto | ktls: who encrypts and decrypts the records
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InspectConfig {
    /// Address of the CONNECT listener, if any. Agents reach it through their gateway
    /// address, and their policy must allow that address and port.
    pub listen: Option<SocketAddr>,
    /// Port (on every IPv4 address of the node) that transparent interception redirects
    /// to, if any.
    pub transparent_port: Option<u16>,
    /// PEM file of the roots upstream certificates must chain to.
    pub upstream_roots: PathBuf,
    /// Directory of the node CA's files. It must outlive reboots: every sandbox trusts
    /// the CA, and a new one means provisioning them all again.
    pub ca_dir: PathBuf,
    /// Most open proxied connections one agent may hold; more are closed at once.
    pub max_connections_per_agent: usize,
    /// Most open proxied connections in all, before [`connection_cap`] fits it to the
    /// descriptor limit.
    pub max_connections: usize,
    /// Who encrypts and decrypts the TLS records once both handshakes are done.
    pub record_layer: RecordLayer,
}

/// `[inspect].record_layer`: where the proxied connections' TLS records are encrypted and
/// decrypted after the handshakes (rustls always does the handshakes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordLayer {
    /// Kernel TLS where the kernel has it and takes the connection's cipher, rustls
    /// otherwise.
    Auto,
    /// Kernel TLS: the daemon does not start on a kernel without it; a connection whose
    /// cipher the kernel does not take still stays on rustls.
    Ktls,
    /// rustls in user space for every connection: the default, because with the
    /// detectors in user space it measured as fast as kernel TLS on 6.12 and faster on
    /// 6.1 (bench/README.md, "Record layer in the VM").
    #[default]
    Rustls,
}

/// Default of `[inspect].max_connections_per_agent`.
pub const DEFAULT_MAX_CONNECTIONS_PER_AGENT: usize = 256;
/// Default of `[inspect].max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Descriptors kept for the daemon itself (maps, status and audit files, the API, the
/// resolver) whatever the proxy holds: an agent filling the proxy must not stop the daemon
/// from writing `status.json` or answering a legitimate CONNECT of another agent.
pub const DESCRIPTOR_RESERVE: u64 = 512;

/// The total cap in force: `configured`, lowered so that two descriptors per connection
/// (the agent's and the upstream's) plus [`DESCRIPTOR_RESERVE`] fit in `nofile`, the soft
/// `RLIMIT_NOFILE`; at least 1.
pub fn connection_cap(configured: usize, nofile: u64) -> usize {
    let fits = nofile.saturating_sub(DESCRIPTOR_RESERVE) / 2;
    configured
        .min(usize::try_from(fits).unwrap_or(usize::MAX))
        .max(1)
}

/// The soft descriptor limit of this process (`None` if unlimited or unknown).
pub fn descriptor_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid struct.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Open proxied connections, per agent and in all, against their caps. A [`Slot`] is
/// held for a connection's life and gives its place back when dropped.
#[derive(Debug)]
pub struct Slots {
    per_agent: usize,
    total: usize,
    open: Mutex<(usize, BTreeMap<u32, usize>)>,
}

/// Which cap refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapHit {
    /// The agent holds `max_connections_per_agent`.
    Agent(usize),
    /// The proxy holds `max_connections` (after fitting the descriptor limit).
    Total(usize),
}

impl std::fmt::Display for CapHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CapHit::Agent(n) => write!(
                f,
                "the agent holds {n} proxied connections (max_connections_per_agent)"
            ),
            CapHit::Total(n) => write!(f, "the proxy holds {n} connections (max_connections)"),
        }
    }
}

impl Slots {
    /// Caps of `per_agent` connections per agent and `total` in all.
    pub fn new(per_agent: usize, total: usize) -> Slots {
        Slots {
            per_agent,
            total,
            open: Mutex::new((0, BTreeMap::new())),
        }
    }

    /// A place for one more connection of `agent`, or the cap that is full.
    pub fn acquire(self: &std::sync::Arc<Self>, agent: u32) -> Result<Slot, CapHit> {
        let mut open = self.open.lock().expect("slots lock");
        let held = open.1.get(&agent).copied().unwrap_or(0);
        if held >= self.per_agent {
            return Err(CapHit::Agent(held));
        }
        if open.0 >= self.total {
            return Err(CapHit::Total(open.0));
        }
        open.0 += 1;
        *open.1.entry(agent).or_default() += 1;
        Ok(Slot {
            slots: self.clone(),
            agent,
        })
    }
}

/// One connection's place in [`Slots`].
#[derive(Debug)]
pub struct Slot {
    slots: std::sync::Arc<Slots>,
    agent: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().expect("slots lock");
        open.0 -= 1;
        if let Some(held) = open.1.get_mut(&self.agent) {
            *held -= 1;
            if *held == 0 {
                open.1.remove(&self.agent);
            }
        }
    }
}

/// Default of `[inspect].listen`.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:3128";
/// Default of `[inspect].transparent_port`.
pub const DEFAULT_TRANSPARENT_PORT: u16 = 3129;
/// Default of `[inspect].upstream_roots`: the Debian/Ubuntu system bundle.
pub const DEFAULT_UPSTREAM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The record layer new connections start on, chosen once at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InspectPath {
    /// Kernel TLS ([`ktls`]), for the (version, cipher) pairs the kernel takes.
    Ktls {
        /// What the probe found the kernel takes.
        kernel: ktls::KernelTls,
    },
    /// rustls in user space for every connection.
    Rustls {
        /// Why, as the `reason` of each connection.
        reason: ktls::Fallback,
        /// Why, for the one log line at start.
        why: String,
    },
}

impl InspectPath {
    /// The `path` label of `enforcer_inspect_path`.
    pub fn name(&self) -> &'static str {
        match self {
            InspectPath::Ktls { .. } => "ktls",
            InspectPath::Rustls { .. } => "rustls",
        }
    }

    /// Chooses the record layer for this run: `auto` probes the kernel and falls back to
    /// rustls, saying why; `ktls` on a kernel without it is an error.
    pub fn choose(layer: RecordLayer) -> Result<InspectPath, ktls::KtlsError> {
        match layer {
            RecordLayer::Rustls => Ok(InspectPath::Rustls {
                reason: ktls::Fallback::Configured,
                why: "record_layer = \"rustls\"".into(),
            }),
            RecordLayer::Auto => Ok(match ktls::KernelTls::probe() {
                Ok(kernel) => InspectPath::Ktls { kernel },
                Err(e) => InspectPath::Rustls {
                    reason: ktls::Fallback::NoKernelTls,
                    why: crate::error::error_chain(&e),
                },
            }),
            RecordLayer::Ktls => {
                ktls::KernelTls::probe().map(|kernel| InspectPath::Ktls { kernel })
            }
        }
    }

    /// Whether a connection moves to kernel TLS after its handshakes, or why it stays on
    /// rustls ([`ktls::KernelTls::admit`] under kTLS).
    pub fn admit(
        &self,
        agent: &tokio_rustls::server::TlsStream<ktls::HandshakeCork>,
        upstream: &tokio_rustls::client::TlsStream<ktls::HandshakeCork>,
    ) -> Result<(), ktls::Fallback> {
        match self {
            InspectPath::Ktls { kernel } => kernel.admit(agent, upstream),
            InspectPath::Rustls { reason, .. } => Err(*reason),
        }
    }
}

/// The record layer one connection took, for `enforcer_inspect_record_layer_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Layer {
    /// Handed to kernel TLS.
    Ktls,
    /// Admitted to kernel TLS, but the hand-off failed and the connection was lost.
    KtlsFailed,
    /// Stayed on rustls, and why.
    Rustls(ktls::Fallback),
}

impl Layer {
    /// The `layer` and `reason` labels.
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            Layer::Ktls => ("ktls", "kernel"),
            Layer::KtlsFailed => ("ktls", "handoff_failed"),
            Layer::Rustls(why) => ("rustls", why.name()),
        }
    }
}

/// How a proxied connection ended, for `enforcer_inspect_connections_total{result}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Relayed to the end.
    Relayed,
    /// Closed by a block detector.
    Blocked,
    /// Refused: the name (CONNECT host or SNI) is not allowed for the agent.
    NameDenied,
    /// Refused: the agent's egress rules do not allow the address the proxy would dial.
    EgressDenied,
    /// Refused: no inspected agent owns the connection.
    AgentDenied,
    /// Closed at once: the agent's or the proxy's connection cap is full.
    CapRefused,
    /// The upstream connection or its certificate failed.
    UpstreamFailed,
    /// The agent's side failed (handshake, protocol, reset).
    AgentFailed,
}

impl Outcome {
    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Relayed => "relayed",
            Outcome::Blocked => "blocked",
            Outcome::NameDenied => "name_denied",
            Outcome::EgressDenied => "egress_denied",
            Outcome::AgentDenied => "agent_denied",
            Outcome::CapRefused => "cap_refused",
            Outcome::UpstreamFailed => "upstream_failed",
            Outcome::AgentFailed => "agent_failed",
        }
    }
}

/// The proxy's counters, shared with the metrics endpoint.
#[derive(Debug, Default)]
pub struct Stats {
    path: Mutex<Option<&'static str>>,
    /// Hits by (agent id, detector name, action).
    hits: Mutex<BTreeMap<(u32, String, &'static str), u64>>,
    /// Connections by (agent id, outcome).
    connections: Mutex<BTreeMap<(u32, Outcome), u64>>,
    /// MCP requests the gate recorded, by (agent id, reason, verdict).
    mcp: Mutex<BTreeMap<(u32, &'static str, &'static str), u64>>,
    /// The path chosen at start, and why (the kernel's ciphers, or why not kTLS).
    path_detail: Mutex<Option<String>>,
    /// Connections by the record layer they took.
    layers: Mutex<BTreeMap<Layer, u64>>,
    /// Plaintext bytes relayed from agents.
    pub up_bytes: AtomicU64,
    /// Plaintext bytes relayed to agents.
    pub down_bytes: AtomicU64,
    /// Of those bytes, the ones spliced in the kernel (byte streams on kernel TLS, in a
    /// direction without detectors).
    pub spliced_bytes: AtomicU64,
}

impl Stats {
    /// Records the path in use.
    pub fn set_path(&self, path: &InspectPath) {
        *self.path.lock().expect("stats lock") = Some(path.name());
        *self.path_detail.lock().expect("stats lock") = Some(match path {
            InspectPath::Ktls { kernel } => format!("kernel TLS takes {}", kernel.describe()),
            InspectPath::Rustls { why, .. } => why.clone(),
        });
    }

    /// Counts the record layer a connection took.
    pub fn layer(&self, layer: Layer) {
        *self
            .layers
            .lock()
            .expect("stats lock")
            .entry(layer)
            .or_default() += 1;
    }

    /// Connections by record layer so far.
    pub fn layers(&self) -> BTreeMap<Layer, u64> {
        self.layers.lock().expect("stats lock").clone()
    }

    /// The proxy's part of `enforcer status`: the record layer chosen at start and why,
    /// and the connections by the layer they took.
    pub fn status(&self) -> serde_json::Value {
        let connections: Vec<serde_json::Value> = self
            .layers()
            .into_iter()
            .map(|(layer, n)| {
                let (layer, reason) = layer.labels();
                serde_json::json!({"layer": layer, "reason": reason, "connections": n})
            })
            .collect();
        serde_json::json!({
            "record_layer": self.path(),
            "record_layer_detail": self.path_detail.lock().expect("stats lock").clone(),
            "connections_by_layer": connections,
        })
    }

    /// The path in use, once the proxy started.
    pub fn path(&self) -> Option<&'static str> {
        *self.path.lock().expect("stats lock")
    }

    /// Counts a detector hit.
    pub fn hit(&self, agent: u32, detector: &str, action: &'static str) {
        *self
            .hits
            .lock()
            .expect("stats lock")
            .entry((agent, detector.to_string(), action))
            .or_default() += 1;
    }

    /// Counts a finished connection.
    pub fn connection(&self, agent: u32, outcome: Outcome) {
        *self
            .connections
            .lock()
            .expect("stats lock")
            .entry((agent, outcome))
            .or_default() += 1;
    }

    /// Counts an MCP request the gate recorded (`reason`: `mcp_call`, `mcp_shadow`, ...;
    /// `verdict`: `pass` or `drop`).
    pub fn mcp(&self, agent: u32, reason: &'static str, verdict: &'static str) {
        *self
            .mcp
            .lock()
            .expect("stats lock")
            .entry((agent, reason, verdict))
            .or_default() += 1;
    }

    /// MCP requests so far: ((agent, reason, verdict), count).
    pub fn mcp_requests(&self) -> Vec<((u32, &'static str, &'static str), u64)> {
        let mcp = self.mcp.lock().expect("stats lock");
        mcp.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Hits so far: ((agent, detector, action), count).
    pub fn hits(&self) -> Vec<((u32, String, &'static str), u64)> {
        let hits = self.hits.lock().expect("stats lock");
        hits.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Connections so far: ((agent, outcome), count).
    pub fn connections(&self) -> Vec<((u32, Outcome), u64)> {
        let connections = self.connections.lock().expect("stats lock");
        connections.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Adds relayed byte counts.
    pub fn relayed(&self, up: u64, down: u64) {
        self.up_bytes.fetch_add(up, Ordering::Relaxed);
        self.down_bytes.fetch_add(down, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PathLabel {
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct HitLabels {
    agent: String,
    agent_id: u32,
    detector: String,
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ConnectionLabels {
    agent: String,
    agent_id: u32,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct McpLabels {
    agent: String,
    agent_id: u32,
    reason: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct KernelTlsLabels {
    direction: String,
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct LayerLabels {
    layer: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct DirectionLabel {
    direction: String,
}

/// Adds the proxy's families to a scrape: `enforcer_inspect_path{path}` (1 for the path in
/// use), detector hits and connections by agent, relayed plaintext bytes by direction.
pub fn register_metrics(
    registry: &mut prometheus_client::registry::Registry,
    stats: &Stats,
    agents: &BTreeMap<u32, String>,
) {
    use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
    let agent_name = |id: u32| match id {
        0 => "(unknown)".to_string(),
        id => agents
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("agent-{id}")),
    };
    let path = Family::<PathLabel, Gauge>::default();
    if let Some(name) = stats.path() {
        path.get_or_create(&PathLabel { path: name.into() }).set(1);
    }
    registry.register(
        "inspect_path",
        "1 for the record layer new proxied connections start on: ktls (kernel TLS, for the \
         ciphers the kernel takes) or rustls (user space)",
        path,
    );
    let layers = Family::<LayerLabels, Counter>::default();
    for (layer, n) in stats.layers() {
        let (layer, reason) = layer.labels();
        layers
            .get_or_create(&LayerLabels {
                layer: layer.into(),
                reason: reason.into(),
            })
            .inc_by(n);
    }
    registry.register(
        "inspect_record_layer",
        "Proxied connections by the record layer they took after both handshakes: ktls \
         (reason kernel, or handoff_failed when the hand-off lost the connection) or rustls \
         (reason configured, no_ktls, cipher: a side's cipher the kernel does not take, ulp: \
         the kernel refused the socket)",
        layers,
    );
    let hits = Family::<HitLabels, Counter>::default();
    for ((agent, detector, action), n) in stats.hits() {
        hits.get_or_create(&HitLabels {
            agent: agent_name(agent),
            agent_id: agent,
            detector,
            action: action.into(),
        })
        .inc_by(n);
    }
    registry.register(
        "inspect_detector_hits",
        "Detector matches in inspected traffic, by agent, detector and action",
        hits,
    );
    let connections = Family::<ConnectionLabels, Counter>::default();
    for ((agent, outcome), n) in stats.connections() {
        connections
            .get_or_create(&ConnectionLabels {
                agent: agent_name(agent),
                agent_id: agent,
                result: outcome.name().into(),
            })
            .inc_by(n);
    }
    registry.register(
        "inspect_connections",
        "Connections the inspecting proxy finished, by agent and result",
        connections,
    );
    let mcp = Family::<McpLabels, Counter>::default();
    for ((agent, reason, verdict), n) in stats.mcp_requests() {
        mcp.get_or_create(&McpLabels {
            agent: agent_name(agent),
            agent_id: agent,
            reason: reason.into(),
            verdict: verdict.into(),
        })
        .inc_by(n);
    }
    registry.register(
        "inspect_mcp_requests",
        "MCP requests the proxy's gate recorded, by agent, reason (mcp_call: a tools/call \
         passed; mcp_shadow, mcp_tool_denied, mcp_rate_limited, mcp_quota, mcp_malformed) \
         and verdict (drop: refused; pass: passed or flagged)",
        mcp,
    );
    let bytes = Family::<DirectionLabel, Counter>::default();
    for (direction, counter) in [("up", &stats.up_bytes), ("down", &stats.down_bytes)] {
        bytes
            .get_or_create(&DirectionLabel {
                direction: direction.into(),
            })
            .inc_by(counter.load(Ordering::Relaxed));
    }
    registry.register(
        "inspect_bytes",
        "Plaintext bytes relayed by the inspecting proxy (up: to servers, down: to agents)",
        bytes,
    );
    if stats.path() == Some("ktls")
        && let Some(counters) = ktls::kernel_counters()
    {
        let sockets = Family::<KernelTlsLabels, Counter>::default();
        let open = Family::<KernelTlsLabels, Gauge>::default();
        for (direction, mode, total, current) in [
            ("tx", "sw", "TlsTxSw", "TlsCurrTxSw"),
            ("rx", "sw", "TlsRxSw", "TlsCurrRxSw"),
            ("tx", "device", "TlsTxDevice", "TlsCurrTxDevice"),
            ("rx", "device", "TlsRxDevice", "TlsCurrRxDevice"),
        ] {
            let labels = KernelTlsLabels {
                direction: direction.into(),
                mode: mode.into(),
            };
            if let Some(n) = counters.get(total) {
                sockets.get_or_create(&labels).inc_by(*n);
            }
            if let Some(n) = counters.get(current) {
                open.get_or_create(&labels)
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
        }
        registry.register(
            "inspect_ktls_sockets",
            "Sockets the kernel set up for kernel TLS in the daemon's namespace, by direction \
             and mode (sw: the kernel's crypto; device: the NIC's TLS offload), from \
             /proc/net/tls_stat",
            sockets,
        );
        registry.register(
            "inspect_ktls_open_sockets",
            "Kernel TLS sockets open now in the daemon's namespace, by direction and mode",
            open,
        );
        if let Some(n) = counters.get("TlsDecryptError") {
            let errors = Counter::<u64>::default();
            errors.inc_by(*n);
            registry.register(
                "inspect_ktls_decrypt_errors",
                "TLS records kernel TLS failed to decrypt (a peer's bad record, or keys out \
                 of step) in the daemon's namespace",
                errors,
            );
        }
    }
    let spliced = Counter::<u64>::default();
    spliced.inc_by(stats.spliced_bytes.load(Ordering::Relaxed));
    registry.register(
        "inspect_spliced_bytes",
        "Of inspect_bytes, those spliced in the kernel: byte streams (not HTTP) on kernel \
         TLS, in a direction no detector searches",
        spliced,
    );
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// `rustls` is chosen without asking the kernel; `auto` takes kTLS exactly when the
    /// probe finds it and otherwise says why; `ktls` without it is an error. The metric
    /// and the status follow the choice.
    #[test]
    fn the_record_layer_follows_the_setting_and_the_kernel() {
        let rustls = InspectPath::choose(RecordLayer::Rustls).unwrap();
        assert!(matches!(
            rustls,
            InspectPath::Rustls {
                reason: ktls::Fallback::Configured,
                ..
            }
        ));
        let probe = ktls::KernelTls::probe();
        let auto = InspectPath::choose(RecordLayer::Auto).unwrap();
        match (&probe, &auto) {
            (Ok(kernel), InspectPath::Ktls { kernel: chosen }) => {
                assert_eq!(kernel, chosen);
                assert!(InspectPath::choose(RecordLayer::Ktls).is_ok());
            }
            (Err(e), InspectPath::Rustls { reason, why }) => {
                assert_eq!(why, &crate::error::error_chain(e));
                assert_eq!(*reason, ktls::Fallback::NoKernelTls);
                let refused = InspectPath::choose(RecordLayer::Ktls).unwrap_err();
                assert!(
                    refused.to_string().contains("kernel has no kTLS"),
                    "{refused}"
                );
            }
            other => panic!("auto chose against the probe: {other:?}"),
        }
        let stats = Stats::default();
        stats.set_path(&rustls);
        stats.layer(Layer::Rustls(ktls::Fallback::Configured));
        stats.layer(Layer::Rustls(ktls::Fallback::Configured));
        stats.layer(Layer::Ktls);
        assert_eq!(stats.path(), Some("rustls"));
        assert_eq!(
            stats.status(),
            serde_json::json!({
                "record_layer": "rustls",
                "record_layer_detail": "record_layer = \"rustls\"",
                "connections_by_layer": [
                    {"layer": "ktls", "reason": "kernel", "connections": 1},
                    {"layer": "rustls", "reason": "configured", "connections": 2},
                ],
            })
        );
    }

    #[test]
    fn one_agent_at_its_cap_is_refused_while_another_connects() {
        let slots = Arc::new(Slots::new(2, 3));
        let a1 = slots.acquire(1).unwrap();
        let a2 = slots.acquire(1).unwrap();
        assert_eq!(slots.acquire(1).unwrap_err(), CapHit::Agent(2));
        let b1 = slots.acquire(2).unwrap();
        // Three in all: the total cap refuses agent 3 too.
        assert_eq!(slots.acquire(3).unwrap_err(), CapHit::Total(3));
        // A closed connection gives its place back.
        drop(a1);
        let a3 = slots.acquire(1).unwrap();
        drop((a2, a3, b1));
        assert_eq!(*slots.open.lock().unwrap(), (0, BTreeMap::new()));
    }

    #[test]
    fn the_total_cap_leaves_descriptors_for_the_daemon() {
        // Two descriptors a connection, DESCRIPTOR_RESERVE kept back.
        assert_eq!(connection_cap(4096, 1024), 256);
        assert_eq!(connection_cap(4096, 1 << 20), 4096);
        assert_eq!(connection_cap(100, 1 << 20), 100);
        assert_eq!(connection_cap(4096, 100), 1);
    }
}
