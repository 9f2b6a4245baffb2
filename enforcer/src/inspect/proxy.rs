//! The listeners and the life of one proxied connection.
//!
//! **Who is asking.** The agent is found the way the XDP program finds it: the interface
//! first, then the source address. The interface is the one owning the address the agent
//! connected to (after a transparent redirect, the primary address of the interface the
//! packet came in on; for CONNECT, the gateway address the agent uses as its proxy). Only
//! agents with `inspect = true` are served.
//!
//! **Which names.** The server name must be one the agent's policy allows for TCP to the
//! destination port ([`Agent::allows_name`]), and the upstream certificate is verified
//! against that same name with the configured roots, so neither a forged SNI nor an
//! address serving someone else's certificate gets through.
//!
//! - Transparent: the name is the ClientHello's SNI (required); the upstream address is
//!   the connection's original destination (`SO_ORIGINAL_DST`).
//! - `CONNECT name:port`: the name is checked before anything else (403 otherwise), then
//!   resolved with the system resolver; a ClientHello SNI, if any, must be the same name.
//! - `CONNECT ip:port`: accepted only with an SNI naming an allowed host; the proxy
//!   connects to that address and verifies the certificate against the SNI, so the
//!   address cannot be used to reach anything that is not that host.
//!
//! **Which addresses.** The proxy dials from the host, where the XDP program never sees the
//! connection, so before dialling it judges the exact address and port (TCP) with the
//! agent's own compiled egress rules ([`DestinationRules`], the entries the program reads):
//! the address must be one the program would let a packet of the agent's reach, or one the
//! allowed name resolved to; a rule that denies the address (`@private`, `@metadata`, ...)
//! wins over the name. Refusals are `proxy_egress_denied` records naming the address.
//!
//! - `CONNECT name:port`: each address the host's resolver gives is admitted by the name
//!   unless a rule denies it; none left is a 403.
//! - `CONNECT ip:port`: a 403 if a rule denies it; allowed by a rule or the default, it is
//!   dialled; otherwise it is admitted only if the SNI's name resolves to it.
//! - Transparent: the program already judged the original destination (learned addresses
//!   included) before the redirect, so it counts as name-admitted; a denying rule still
//!   refuses it (an agent in monitor mode gets that far).
//!
//! **Handshakes.** The agent's ClientHello is read first (rustls' lazy acceptor), the
//! upstream handshake is done with the agent's ALPN list, and only then is the agent's
//! handshake finished with a leaf for the name and the protocol the upstream chose, so
//! both sides speak the same protocol.

use std::{
    collections::{BTreeSet, HashSet},
    ffi::CStr,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, ServerName, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::{LazyConfigAcceptor, StartHandshake, TlsConnector};

use super::{
    CapHit, InspectConfig, InspectPath, Layer, Outcome, Slots, Stats,
    body::Found,
    ca::{CaError, NodeCa},
    dlp::{DetectError, DetectorSet, Detectors},
    http::{self, Event, Protocol},
    ktls::{self, HandshakeCork},
    mcp::Gate,
    redirect,
    relay::{self, Direction, RelayStream},
};
use crate::{
    dataplane::compile::{DestinationRules, Judgement},
    node::audit::{UserAudit, UserEvent, UserSource},
    policy::{Agent, DetectorAction, Mode, Policy, Proto, normalize_name},
};

/// Longest CONNECT request head accepted.
const MAX_HEAD: usize = 8192;
/// Bound on each step that waits for a peer before data flows: the agent's request head
/// and ClientHello, the upstream connection and handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors starting the proxy.
#[derive(Debug, Error)]
pub enum InspectError {
    /// The node CA could not be loaded or created.
    #[error("loading the inspection CA")]
    Ca(#[from] CaError),
    /// The upstream roots could not be read.
    #[error("reading upstream roots {}: {message}", path.display())]
    Roots {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("configuring TLS")]
    Tls(#[source] rustls::Error),
    /// A listener could not be bound.
    #[error("binding the inspecting proxy on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The detectors could not be compiled.
    #[error(transparent)]
    Detect(#[from] DetectError),
    /// The transparent redirect could not be installed.
    #[error("installing the transparent redirect")]
    Redirect(#[from] redirect::RedirectError),
    /// The proxy's runtime or thread could not be started.
    #[error("starting the proxy's runtime")]
    Runtime(#[source] std::io::Error),
    /// `record_layer = "ktls"` on a kernel without kernel TLS.
    #[error("inspect.record_layer = \"ktls\", but this kernel cannot take the connections")]
    Ktls(#[source] ktls::KtlsError),
}

/// Most worker threads the proxy's runtime gets.
const MAX_WORKERS: usize = 4;

/// Starts the proxy on a multi-threaded runtime of its own, on its own thread, and returns
/// once it listens (or failed to start). Encryption is CPU work: on the daemon's
/// single-threaded runtime a large transfer would delay policy applies and API answers,
/// and it could use only one core.
pub async fn spawn(
    config: InspectConfig,
    audit: UserAudit,
    stats: Arc<Stats>,
    policy: watch::Receiver<Option<Arc<Policy>>>,
) -> Result<(), InspectError> {
    let workers = std::thread::available_parallelism()
        .map_or(2, usize::from)
        .min(MAX_WORKERS);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("inspect")
        .enable_all()
        .build()
        .map_err(InspectError::Runtime)?;
    let (started_tx, started) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("inspect".into())
        .spawn(move || {
            runtime.block_on(async move {
                match Proxy::start(&config, audit, stats, policy).await {
                    Ok(proxy) => {
                        let _ = started_tx.send(Ok(()));
                        proxy.serve().await;
                    }
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                    }
                }
            })
        })
        .map_err(InspectError::Runtime)?;
    started.await.unwrap_or_else(|_| {
        Err(InspectError::Runtime(std::io::Error::other(
            "the proxy thread ended during start-up",
        )))
    })
}

/// The running proxy: its listeners and what every connection shares.
pub struct Proxy {
    shared: Arc<Shared>,
    connect: Option<TcpListener>,
    transparent: Option<TcpListener>,
    transparent_port: u16,
    policy: watch::Receiver<Option<Arc<Policy>>>,
    /// The ruleset last installed, to skip identical reinstalls.
    installed: Option<String>,
}

struct Shared {
    ca: NodeCa,
    /// The agent-facing config; cloned per connection for its leaf and ALPN.
    server: Arc<ServerConfig>,
    upstream: TlsConnector,
    audit: UserAudit,
    stats: Arc<Stats>,
    /// What the daemon publishes after every apply.
    policy: watch::Receiver<Option<Arc<Policy>>>,
    /// The newest policy seen and its compiled detectors (see [`Shared::current`]).
    current: Mutex<Current>,
    /// Open connections against `max_connections_per_agent` and `max_connections`.
    slots: Arc<Slots>,
    /// The record layer chosen at start.
    path: InspectPath,
}

/// The enforcing policy and its detectors (the policy's and the catalogue's).
struct Current {
    policy: Option<Arc<Policy>>,
    /// The detectors as written.
    enforce: DetectorSet,
    /// The same with `block` turned into `flag`, for agents in monitor mode: a would-be
    /// block is audited and counted, and the bytes pass.
    monitor: DetectorSet,
    /// The MCP gate of the policy; its buckets carry over to the next policy.
    gate: Option<Arc<Gate>>,
}

impl Current {
    /// `policy` compiled; `gate` is the previous policy's gate, updated in place so that
    /// a new policy does not refill every MCP bucket.
    fn new(policy: Option<Arc<Policy>>, gate: Option<Arc<Gate>>) -> Result<Current, DetectError> {
        let gate = match (policy.as_deref(), gate) {
            (Some(p), Some(gate)) => {
                gate.update(p);
                Some(gate)
            }
            (Some(p), None) => Some(Arc::new(Gate::new(p))),
            (None, _) => None,
        };
        Ok(Current {
            enforce: DetectorSet::compile(policy.as_deref(), false)?,
            monitor: DetectorSet::compile(policy.as_deref(), true)?,
            policy,
            gate,
        })
    }
}

/// A certificate resolver that always answers with one leaf (the one minted for the name
/// this connection was admitted for, whatever the SNI says).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Reads a PEM bundle of root certificates.
pub fn load_roots(path: &Path) -> Result<RootCertStore, InspectError> {
    let bad = |message: String| InspectError::Roots {
        path: path.to_path_buf(),
        message,
    };
    let pem = fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM bundle: {e}")))?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(bad("no usable certificate in it".into()));
    }
    Ok(roots)
}

impl Proxy {
    /// Loads the CA and the roots, binds the listeners and installs the transparent
    /// redirect for the policy `policy` holds now.
    pub async fn start(
        config: &InspectConfig,
        audit: UserAudit,
        stats: Arc<Stats>,
        policy: watch::Receiver<Option<Arc<Policy>>>,
    ) -> Result<Proxy, InspectError> {
        fs::create_dir_all(&config.ca_dir).map_err(|source| {
            InspectError::Ca(CaError::Io {
                op: "creating",
                path: config.ca_dir.clone(),
                source,
            })
        })?;
        let ca = NodeCa::load_or_create(&config.ca_dir)?;
        let roots = load_roots(&config.upstream_roots)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(InspectError::Tls)?
            .with_no_client_auth()
            // Replaced per connection by the leaf of the admitted name.
            .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new()));
        // The kTLS path needs the session keys of both connections.
        server.enable_secret_extraction = true;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(InspectError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.enable_secret_extraction = true;

        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| InspectError::Bind { addr, source })
        };
        let connect = match config.listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let transparent = match config.transparent_port {
            Some(port) => Some(bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)).await?),
            None => None,
        };

        let path = InspectPath::choose(config.record_layer).map_err(InspectError::Ktls)?;
        match &path {
            InspectPath::Ktls { kernel } => tracing::info!(
                path = path.name(),
                ciphers = %kernel.describe(),
                "inspecting proxy: records are encrypted and decrypted by kernel TLS; the \
                 plaintext is inspected in user space"
            ),
            InspectPath::Rustls { why, .. } => tracing::info!(
                path = path.name(),
                why = %why,
                "inspecting proxy: records are encrypted and decrypted by rustls in user space"
            ),
        }
        stats.set_path(&path);
        let current = Current::new(policy.borrow().clone(), None)?;
        let total = super::connection_cap(
            config.max_connections,
            super::descriptor_limit().unwrap_or(u64::MAX),
        );
        if total < config.max_connections {
            tracing::warn!(
                configured = config.max_connections,
                total,
                "inspecting proxy: max_connections lowered to fit the descriptor limit"
            );
        }
        let mut proxy = Proxy {
            shared: Arc::new(Shared {
                ca,
                server: Arc::new(server),
                upstream: TlsConnector::from(Arc::new(client)),
                audit,
                stats,
                policy: policy.clone(),
                current: Mutex::new(current),
                slots: Arc::new(Slots::new(config.max_connections_per_agent, total)),
                path,
            }),
            connect,
            transparent,
            transparent_port: config.transparent_port.unwrap_or(0),
            policy,
            installed: None,
        };
        proxy.update_redirect()?;
        Ok(proxy)
    }

    /// The CONNECT listener's address, if it listens.
    pub fn connect_addr(&self) -> Option<SocketAddr> {
        self.connect.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Installs the redirect for the inspected agents of the current policy, if it changed.
    fn update_redirect(&mut self) -> Result<(), redirect::RedirectError> {
        if self.transparent.is_none() {
            return Ok(());
        }
        let rules = {
            let current = self.shared.current();
            current.policy.as_ref().and_then(|p| {
                let interfaces: Vec<String> = p
                    .agents()
                    .iter()
                    .filter(|a| a.inspect)
                    .flat_map(|a| a.interfaces.iter().cloned())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                redirect::ruleset(&interfaces, p.tls_ports(), self.transparent_port)
            })
        };
        if rules == self.installed {
            return Ok(());
        }
        redirect::install(rules.as_deref())?;
        self.installed = rules;
        Ok(())
    }

    /// Serves until the task is dropped. Connections keep the detectors they started
    /// with; a new policy applies to the next ones.
    pub async fn serve(mut self) {
        loop {
            tokio::select! {
                changed = self.policy.changed() => {
                    if changed.is_err() {
                        // The daemon is going away.
                        std::future::pending::<()>().await;
                    }
                    self.policy.borrow_and_update();
                    if let Err(e) = self.update_redirect() {
                        tracing::error!(error = %crate::error::error_chain(&e), "updating the transparent redirect");
                    }
                }
                accepted = accept(self.connect.as_ref()) => {
                    if let Ok((tcp, peer)) = accepted {
                        let shared = self.shared.clone();
                        tokio::spawn(async move { shared.connect_mode(tcp, peer).await });
                    }
                }
                accepted = accept(self.transparent.as_ref()) => {
                    if let Ok((tcp, peer)) = accepted {
                        let shared = self.shared.clone();
                        tokio::spawn(async move { shared.transparent_mode(tcp, peer).await });
                    }
                }
            }
        }
    }
}

/// Accepts on `listener`, or waits forever when there is none.
async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// What a connection was admitted as.
struct Admitted {
    agent: Agent,
    peer: SocketAddr,
    /// The agent's destination rules, which every address the proxy dials for it must
    /// pass (see [`Admitted::judge`]).
    rules: DestinationRules,
}

impl Admitted {
    /// `agent`'s connection from `peer`, with its rules compiled; `None` (logged) if they
    /// do not compile, which the daemon's own compile of the same policy rules out.
    fn new(agent: Agent, peer: SocketAddr) -> Option<Admitted> {
        match DestinationRules::new(&agent) {
            Ok(rules) => Some(Admitted { agent, peer, rules }),
            Err(e) => {
                tracing::error!(agent = agent.name, error = %e, "proxy: compiling the agent's egress rules");
                None
            }
        }
    }

    /// The XDP program's verdict for a TCP packet of this agent to `addr`: the proxy dials
    /// from the host, where the program does not see it, so it applies the same rules
    /// itself. `learned`: an allowed name this connection asked for resolved to `addr`.
    fn judge(&self, addr: SocketAddr, learned: bool) -> Judgement {
        self.rules
            .judge(addr.ip(), Proto::Tcp, addr.port(), learned)
    }
}

/// The target of a CONNECT request.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Name(String, u16),
    Addr(SocketAddr),
}

impl Shared {
    /// The newest policy and its detectors, recompiled here when the daemon has published
    /// another one: a connection accepted right after an apply returned is judged by it,
    /// whenever the serve loop gets to the change.
    fn current(&self) -> std::sync::MutexGuard<'_, Current> {
        let mut current = self.current.lock().expect("policy lock");
        let latest = self.policy.borrow().clone();
        let same = match (&current.policy, &latest) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            match Current::new(latest, current.gate.clone()) {
                Ok(newer) => *current = newer,
                // Not reachable within the policy's limits on detectors; say so loudly.
                Err(e) => tracing::error!(
                    error = %crate::error::error_chain(&e),
                    "compiling the detectors; keeping the previous ones"
                ),
            }
        }
        current
    }

    /// The inspected agent a connection belongs to (see the module documentation).
    fn agent_for(&self, local: SocketAddr, peer: SocketAddr) -> Option<Agent> {
        let current = self.current();
        let policy = current.policy.as_ref()?;
        let by_interface =
            interface_of(local.ip().to_canonical()).and_then(|i| policy.agent_by_interface(&i));
        by_interface
            .or_else(|| policy.agent_by_source(peer.ip().to_canonical()))
            .filter(|a| a.inspect)
            .cloned()
    }

    fn record(&self, event: UserEvent) {
        self.audit.record(event);
    }

    /// Audits and counts a refused name.
    fn deny_name(&self, who: &Admitted, name: Option<String>, dst: String, why: String) {
        tracing::debug!(agent = who.agent.name, ?name, why, "proxy: name refused");
        self.record(UserEvent {
            source: UserSource::Proxy,
            agent: who.agent.id,
            reason: "proxy_name_denied",
            verdict: "drop",
            src: Some(who.peer),
            dst: Some(dst),
            name,
            detail: Some(why),
            actor: None,
            mcp: None,
        });
        self.stats.connection(who.agent.id, Outcome::NameDenied);
    }

    /// Audits and counts a connection closed because a cap is full.
    fn refuse_cap(&self, who: &Admitted, hit: CapHit) {
        tracing::debug!(agent = who.agent.name, %hit, "proxy: connection cap");
        self.record(UserEvent {
            source: UserSource::Proxy,
            agent: who.agent.id,
            reason: "proxy_connection_cap",
            verdict: "drop",
            src: Some(who.peer),
            dst: None,
            name: None,
            detail: Some(hit.to_string()),
            actor: None,
            mcp: None,
        });
        self.stats.connection(who.agent.id, Outcome::CapRefused);
    }

    /// Audits and counts an address the agent's egress rules do not let the proxy dial.
    fn deny_egress(&self, who: &Admitted, name: Option<String>, addr: SocketAddr, why: Judgement) {
        let why = format!("{addr}: {}", why.describe());
        tracing::debug!(agent = who.agent.name, ?name, why, "proxy: address refused");
        self.record(UserEvent {
            source: UserSource::Proxy,
            agent: who.agent.id,
            reason: "proxy_egress_denied",
            verdict: "drop",
            src: Some(who.peer),
            dst: Some(addr.to_string()),
            name,
            detail: Some(why),
            actor: None,
            mcp: None,
        });
        self.stats.connection(who.agent.id, Outcome::EgressDenied);
    }

    async fn connect_mode(self: Arc<Self>, mut tcp: TcpStream, peer: SocketAddr) {
        let local = match tcp.local_addr() {
            Ok(a) => a,
            Err(_) => return,
        };
        let Some(agent) = self.agent_for(local, peer) else {
            self.stats.connection(0, Outcome::AgentDenied);
            let _ = respond(&mut tcp, 403, "no inspected agent owns this connection").await;
            return;
        };
        let Some(who) = Admitted::new(agent, peer) else {
            self.stats.connection(0, Outcome::AgentDenied);
            let _ = respond(&mut tcp, 403, "the agent's egress rules do not compile").await;
            return;
        };
        // Held until the connection ends; refused ones are closed before anything is read.
        let _slot = match self.slots.acquire(who.agent.id) {
            Ok(slot) => slot,
            Err(hit) => {
                self.refuse_cap(&who, hit);
                return;
            }
        };
        let head = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_head(&mut tcp)).await {
            Ok(Ok(head)) => head,
            Ok(Err(message)) => {
                self.stats.connection(who.agent.id, Outcome::AgentFailed);
                let _ = respond(&mut tcp, 400, &message).await;
                return;
            }
            Err(_) => {
                self.stats.connection(who.agent.id, Outcome::AgentFailed);
                return;
            }
        };
        let target = match parse_connect(&head) {
            Ok(t) => t,
            Err((status, message)) => {
                self.stats.connection(who.agent.id, Outcome::AgentFailed);
                let _ = respond(&mut tcp, status, &message).await;
                return;
            }
        };
        // Every address is judged before the 200: explicit denies and addresses no rule
        // allows are refused with a 403. A literal address that only an allowed name could
        // admit (`needs_name`) waits for the SNI.
        let (name, addrs, needs_name) = match &target {
            Target::Name(name, port) => {
                let dst = format!("{name}:{port}");
                if !who.agent.allows_name(name, Proto::Tcp, *port) {
                    let why = format!("{name} is not an allowed name for tcp/{port}");
                    let _ = respond(&mut tcp, 403, &why).await;
                    self.deny_name(&who, Some(name.clone()), dst, why);
                    return;
                }
                let resolved = match tokio::net::lookup_host((name.as_str(), *port)).await {
                    Ok(addrs) => addrs.collect::<Vec<_>>(),
                    Err(e) => {
                        self.stats.connection(who.agent.id, Outcome::UpstreamFailed);
                        let _ = respond(&mut tcp, 502, &format!("resolving {name}: {e}")).await;
                        return;
                    }
                };
                // The allowed name resolved to these, so each is admitted unless a rule
                // for it denies it.
                let (allowed, denied): (Vec<_>, Vec<_>) = resolved
                    .into_iter()
                    .partition(|a| who.judge(*a, true).allowed());
                if let (true, Some(first)) = (allowed.is_empty(), denied.first()) {
                    let why = who.judge(*first, true);
                    let message = format!("{first}: {}", why.describe());
                    let _ = respond(&mut tcp, 403, &message).await;
                    self.deny_egress(&who, Some(name.clone()), *first, why);
                    return;
                }
                (Some(name.clone()), allowed, false)
            }
            Target::Addr(addr) => {
                let as_named = who.judge(*addr, true);
                if !as_named.allowed() {
                    // Denied even if an allowed name resolved to it.
                    let message = format!("{addr}: {}", as_named.describe());
                    let _ = respond(&mut tcp, 403, &message).await;
                    self.deny_egress(&who, None, *addr, as_named);
                    return;
                }
                (None, vec![*addr], !who.judge(*addr, false).allowed())
            }
        };
        if respond(&mut tcp, 200, "").await.is_err() {
            return;
        }
        let port = addrs.first().map_or(0, SocketAddr::port);
        let dst = match &target {
            Target::Name(name, port) => format!("{name}:{port}"),
            Target::Addr(addr) => addr.to_string(),
        };
        let Some((start, sni)) = self.client_hello(&who, tcp).await else {
            return;
        };
        let name = match (name, sni) {
            (Some(name), Some(sni)) if sni != name => {
                let why = format!("the TLS server name {sni} is not the CONNECT host {name}");
                self.deny_name(&who, Some(sni), dst, why);
                return;
            }
            (Some(name), _) => name,
            (None, Some(sni)) => {
                if !who.agent.allows_name(&sni, Proto::Tcp, port) {
                    let why = format!("{sni} is not an allowed name for tcp/{port}");
                    self.deny_name(&who, Some(sni), dst, why);
                    return;
                }
                if let (true, Some(addr)) = (needs_name, addrs.first().copied()) {
                    // Admitted only if the allowed name resolves to it, as the kernel
                    // admits only addresses learned for an allowed name.
                    let learned = match tokio::net::lookup_host((sni.as_str(), port)).await {
                        Ok(mut resolved) => {
                            resolved.any(|a| a.ip().to_canonical() == addr.ip().to_canonical())
                        }
                        Err(_) => false,
                    };
                    let why = who.judge(addr, learned);
                    if !why.allowed() {
                        self.deny_egress(&who, Some(sni), addr, why);
                        return;
                    }
                }
                sni
            }
            (None, None) => {
                let why = "CONNECT to an address needs a TLS server name (SNI)".to_string();
                self.deny_name(&who, None, dst, why);
                return;
            }
        };
        self.intercept(who, start, name, addrs).await;
    }

    async fn transparent_mode(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let (Ok(local), Ok(original)) = (tcp.local_addr(), original_dst(&tcp)) else {
            self.stats.connection(0, Outcome::AgentFailed);
            return;
        };
        let Some(agent) = self.agent_for(local, peer) else {
            self.stats.connection(0, Outcome::AgentDenied);
            return;
        };
        let Some(who) = Admitted::new(agent, peer) else {
            self.stats.connection(0, Outcome::AgentDenied);
            return;
        };
        let _slot = match self.slots.acquire(who.agent.id) {
            Ok(slot) => slot,
            Err(hit) => {
                self.refuse_cap(&who, hit);
                return;
            }
        };
        // The XDP program judged this destination before the redirect, learned addresses
        // included, so it counts as learned here; a rule denying it still wins (an agent
        // in monitor mode gets that far).
        let why = who.judge(original, true);
        if !why.allowed() {
            self.deny_egress(&who, None, original, why);
            return;
        }
        let Some((start, sni)) = self.client_hello(&who, tcp).await else {
            return;
        };
        let Some(name) = sni else {
            let why = "no TLS server name (SNI)".to_string();
            self.deny_name(&who, None, original.to_string(), why);
            return;
        };
        if !who.agent.allows_name(&name, Proto::Tcp, original.port()) {
            let why = format!("{name} is not an allowed name for tcp/{}", original.port());
            self.deny_name(&who, Some(name), original.to_string(), why);
            return;
        }
        self.intercept(who, start, name, vec![original]).await;
    }

    /// Reads the agent's ClientHello; returns it with its normalized SNI (`Some(None)`
    /// without one). A bad SNI is refused here.
    async fn client_hello(
        &self,
        who: &Admitted,
        tcp: TcpStream,
    ) -> Option<(StartHandshake<HandshakeCork>, Option<String>)> {
        // The cork keeps rustls from reading past a record, so the session can move to
        // kernel TLS after the handshake.
        let acceptor =
            LazyConfigAcceptor::new(rustls::server::Acceptor::default(), HandshakeCork::new(tcp));
        let start = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor).await {
            Ok(Ok(start)) => start,
            _ => {
                self.stats.connection(who.agent.id, Outcome::AgentFailed);
                return None;
            }
        };
        let sni = start.client_hello().server_name().map(str::to_string);
        match sni
            .map(|s| normalize_name(&s).map_err(|e| (s, e)))
            .transpose()
        {
            Ok(sni) => Some((start, sni)),
            Err((sni, e)) => {
                self.deny_name(who, Some(sni), String::new(), e.to_string());
                None
            }
        }
    }

    /// Both handshakes, then the relay.
    async fn intercept(
        self: &Arc<Self>,
        who: Admitted,
        start: StartHandshake<HandshakeCork>,
        name: String,
        addrs: Vec<SocketAddr>,
    ) {
        let alpn: Vec<Vec<u8>> = start
            .client_hello()
            .alpn()
            .map(|protocols| protocols.map(<[u8]>::to_vec).collect())
            .unwrap_or_default();
        let upstream = match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            self.connect_upstream(&name, &addrs, alpn),
        )
        .await
        {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(message)) => {
                tracing::warn!(agent = who.agent.name, name, error = %message, "proxy: upstream failed");
                self.stats.connection(who.agent.id, Outcome::UpstreamFailed);
                return;
            }
            Err(_) => {
                tracing::warn!(agent = who.agent.name, name, "proxy: upstream timed out");
                self.stats.connection(who.agent.id, Outcome::UpstreamFailed);
                return;
            }
        };
        let dst = upstream
            .get_ref()
            .0
            .tcp()
            .peer_addr()
            .map_or_else(|_| name.clone(), |a| a.to_string());
        let leaf = match self.ca.leaf(&name) {
            Ok(leaf) => leaf,
            Err(e) => {
                tracing::error!(name, error = %crate::error::error_chain(&e), "proxy: minting a leaf");
                self.stats.connection(who.agent.id, Outcome::AgentFailed);
                return;
            }
        };
        let mut config = (*self.server).clone();
        config.cert_resolver = Arc::new(Fixed(leaf));
        // Offer the agent exactly what the upstream chose (or nothing), so both sides
        // speak the same protocol over the relay.
        config.alpn_protocols = upstream
            .get_ref()
            .1
            .alpn_protocol()
            .map(|p| vec![p.to_vec()])
            .unwrap_or_default();
        let agent_tls = match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            start.into_stream(Arc::new(config)),
        )
        .await
        {
            Ok(Ok(tls)) => tls,
            _ => {
                self.stats.connection(who.agent.id, Outcome::AgentFailed);
                return;
            }
        };

        let protocol = Protocol::from_alpn(agent_tls.get_ref().1.alpn_protocol());
        match self.path.admit(&agent_tls, &upstream) {
            Ok(()) => match ktls::hand_off(agent_tls, upstream).await {
                Ok((agent, upstream)) => {
                    self.stats.layer(Layer::Ktls);
                    self.exchange(who, name, dst, agent, upstream, protocol)
                        .await;
                }
                Err(e) => {
                    self.stats.layer(Layer::KtlsFailed);
                    tracing::warn!(
                        agent = who.agent.name,
                        name,
                        error = %crate::error::error_chain(&e),
                        "proxy: handing the connection to kernel TLS failed; it is lost"
                    );
                    self.stats.connection(who.agent.id, Outcome::AgentFailed);
                }
            },
            Err(why) => {
                self.stats.layer(Layer::Rustls(why));
                let (mut agent_tls, mut upstream) = (agent_tls, upstream);
                agent_tls.get_mut().0.uncork();
                upstream.get_mut().0.uncork();
                self.exchange(who, name, dst, agent_tls, upstream, protocol)
                    .await;
            }
        }
    }

    /// After both handshakes: the HTTP layer or the byte-stream relay over the
    /// connection's plaintext, on whichever record layer carries it.
    async fn exchange<A, U>(
        self: &Arc<Self>,
        who: Admitted,
        name: String,
        dst: String,
        agent: A,
        upstream: U,
        protocol: Option<Protocol>,
    ) where
        A: RelayStream,
        U: RelayStream,
    {
        let (detectors, gate) = {
            let current = self.current();
            let detectors = match who.agent.mode {
                Mode::Enforce => current.enforce.clone(),
                Mode::Monitor => current.monitor.clone(),
            };
            // Only agents with `[agents.mcp]` have their MCP judged.
            let gate = current
                .gate
                .clone()
                .filter(|_| who.agent.mcp().is_some())
                .map(|gate| (gate, who.agent.id));
            (detectors, gate)
        };
        let session = Arc::new(Session {
            shared: self.clone(),
            agent: who.agent.id,
            agent_name: who.agent.name.clone(),
            peer: who.peer,
            name: name.clone(),
            dst,
            up: detectors.up.clone(),
            down: detectors.down.clone(),
            audited: Mutex::new(HashSet::new()),
        });
        let events: Arc<dyn Fn(Event) + Send + Sync> = {
            let session = session.clone();
            Arc::new(move |event| session.event(event))
        };
        let (agent, upstream, protocol) = match protocol {
            Some(protocol) => (
                Prefixed::new(agent, Vec::new()),
                Prefixed::new(upstream, Vec::new()),
                Some(protocol),
            ),
            None => sniff(agent, upstream).await,
        };
        let blocked = match protocol {
            Some(protocol) => {
                let exchange = http::Exchange::new(
                    name,
                    session.up.clone(),
                    session.down.clone(),
                    who.agent.mode == Mode::Monitor,
                    gate,
                    events,
                );
                let report = http::serve(agent, upstream, protocol, exchange).await;
                self.stats.relayed(report.up_bytes, report.down_bytes);
                if let Some(e) = &report.error {
                    tracing::debug!(agent = who.agent.name, error = %e, "proxy: HTTP ended with an error");
                }
                report.blocked > 0
            }
            None => {
                let report = relay::relay(
                    agent,
                    upstream,
                    session.up.clone(),
                    session.down.clone(),
                    |detector, direction| {
                        events(Event::Hit {
                            found: Found {
                                detector,
                                direction,
                            },
                            blocked: false,
                        })
                    },
                )
                .await;
                self.stats.relayed(report.up_bytes, report.down_bytes);
                self.stats
                    .spliced_bytes
                    .fetch_add(report.spliced_bytes, std::sync::atomic::Ordering::Relaxed);
                if let Some(e) = &report.error {
                    tracing::debug!(agent = who.agent.name, error = %e, "proxy: relay ended with an error");
                }
                if let Some(hit) = report.hit {
                    events(Event::Hit {
                        found: Found {
                            detector: hit.detector,
                            direction: hit.direction,
                        },
                        blocked: true,
                    });
                }
                report.hit.is_some()
            }
        };
        let outcome = if blocked {
            Outcome::Blocked
        } else {
            Outcome::Relayed
        };
        self.stats.connection(who.agent.id, outcome);
    }

    async fn connect_upstream(
        &self,
        name: &str,
        addrs: &[SocketAddr],
        alpn: Vec<Vec<u8>>,
    ) -> Result<tokio_rustls::client::TlsStream<HandshakeCork>, String> {
        let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
        let mut last = format!("no address for {name}");
        for addr in addrs {
            let tcp = match TcpStream::connect(addr).await {
                Ok(tcp) => tcp,
                Err(e) => {
                    last = format!("connecting to {addr}: {e}");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            return self
                .upstream
                .with_alpn(alpn)
                .connect(server_name, HandshakeCork::new(tcp))
                .await
                .map_err(|e| format!("TLS with {name} at {addr}: {e}"));
        }
        Err(last)
    }
}

/// One intercepted connection, as its events are recorded.
struct Session {
    shared: Arc<Shared>,
    agent: u32,
    agent_name: String,
    peer: SocketAddr,
    name: String,
    dst: String,
    /// Detectors in force for each direction.
    up: Arc<Detectors>,
    down: Arc<Detectors>,
    /// Flag detectors already audited on this connection: a marker repeated in a stream
    /// is counted, not logged each time.
    audited: Mutex<HashSet<(&'static str, usize)>>,
}

impl Session {
    fn event(&self, event: Event) {
        let mut mcp = None;
        let (reason, verdict, detail) = match event {
            Event::Hit { found, blocked } => {
                let detectors = match found.direction {
                    Direction::Up => &self.up,
                    Direction::Down => &self.down,
                };
                let detector = detectors.name(found.detector).to_string();
                let direction = found.direction.name();
                if blocked {
                    tracing::info!(
                        agent = self.agent_name,
                        detector,
                        direction,
                        name = self.name,
                        "proxy: detector hit, stopped"
                    );
                    self.shared.stats.hit(self.agent, &detector, "block");
                    ("detector_block", "drop", detector)
                } else {
                    // A monitor-mode agent's would-be block is a block in the records.
                    let (reason, action) = match detectors.written_action(found.detector) {
                        DetectorAction::Block => ("detector_block", "block"),
                        DetectorAction::Flag => ("detector_flag", "flag"),
                    };
                    self.shared.stats.hit(self.agent, &detector, action);
                    tracing::info!(
                        agent = self.agent_name,
                        detector,
                        direction,
                        name = self.name,
                        "proxy: detector hit, passed"
                    );
                    let first = self
                        .audited
                        .lock()
                        .expect("audited lock")
                        .insert((direction, found.detector));
                    if !first {
                        return;
                    }
                    (reason, "pass", detector)
                }
            }
            Event::Undecodable {
                direction,
                error,
                blocked,
            } => {
                tracing::info!(
                    agent = self.agent_name,
                    direction = direction.name(),
                    error,
                    blocked,
                    name = self.name,
                    "proxy: a body could not be decoded to be searched"
                );
                let verdict = if blocked { "drop" } else { "pass" };
                let detail = format!("{} body: {error}", direction.name());
                ("dlp_undecodable", verdict, detail)
            }
            Event::Mcp {
                reason,
                blocked,
                detail,
                message,
            } => {
                tracing::info!(agent = self.agent_name, reason, blocked, server = ?detail.server, method = detail.method, tool = ?detail.tool, "proxy: MCP request");
                let verdict = if blocked { "drop" } else { "pass" };
                self.shared.stats.mcp(self.agent, reason, verdict);
                mcp = Some(detail);
                (reason, verdict, message.unwrap_or_default())
            }
            Event::Misdirected { host } => {
                tracing::info!(
                    agent = self.agent_name,
                    host,
                    name = self.name,
                    "proxy: request for another host refused"
                );
                (
                    "proxy_misdirected",
                    "drop",
                    format!("a request for {host} on a connection for {}", self.name),
                )
            }
        };
        self.shared.record(UserEvent {
            source: UserSource::Proxy,
            agent: self.agent,
            reason,
            verdict,
            src: Some(self.peer),
            dst: Some(self.dst.clone()),
            name: Some(self.name.clone()),
            detail: (!detail.is_empty()).then_some(detail),
            actor: None,
            mcp,
        });
    }
}

/// Without an ALPN choice, the first bytes decide: an HTTP/1 request from the agent is
/// served as HTTP (an agent cannot skip the HTTP checks by leaving ALPN out), anything
/// else, or a server that speaks first, is relayed as a byte stream. What was read is
/// put back in front of each stream.
async fn sniff<A, U>(mut agent: A, mut upstream: U) -> (Prefixed<A>, Prefixed<U>, Option<Protocol>)
where
    A: AsyncRead + Unpin,
    U: AsyncRead + Unpin,
{
    let mut from_agent = vec![0; 16 * 1024];
    let mut from_upstream = vec![0; 16 * 1024];
    // Both reads are cancel-safe: the one that loses the race has taken nothing.
    let (agent_first, upstream_first) = tokio::select! {
        read = agent.read(&mut from_agent) => (read.unwrap_or(0), 0),
        read = upstream.read(&mut from_upstream) => (0, read.unwrap_or(0)),
    };
    from_agent.truncate(agent_first);
    from_upstream.truncate(upstream_first);
    let protocol = Protocol::sniff_http1(&from_agent).then_some(Protocol::Http1);
    (
        Prefixed::new(agent, from_agent),
        Prefixed::new(upstream, from_upstream),
        protocol,
    )
}

/// A stream with bytes already read from it put back in front.
struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(inner: S, prefix: Vec<u8>) -> Self {
        Prefixed {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.at);
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: RelayStream> RelayStream for Prefixed<S> {
    fn into_ktls(self) -> Result<ktls::KtlsStream, Self> {
        let Prefixed { prefix, at, inner } = self;
        match inner.into_ktls() {
            Ok(mut stream) => {
                stream.unread(&prefix[at..]);
                Ok(stream)
            }
            Err(inner) => Err(Prefixed { prefix, at, inner }),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads a request head up to the blank line, one byte at a time so that nothing after
/// it (the agent's ClientHello) is consumed.
async fn read_head(tcp: &mut TcpStream) -> Result<String, String> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(format!("request head longer than {MAX_HEAD} bytes"));
        }
        match tcp.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return Err("connection closed in the request head".into()),
        }
    }
    String::from_utf8(head).map_err(|_| "request head is not UTF-8".into())
}

/// The target of `CONNECT host:port HTTP/1.x`, or the status and message to refuse with.
fn parse_connect(head: &str) -> Result<Target, (u16, String)> {
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, authority, version) = (parts.next(), parts.next(), parts.next());
    if method != Some("CONNECT") {
        return Err((405, "only CONNECT is served".into()));
    }
    if !version.is_some_and(|v| v.starts_with("HTTP/1.")) || parts.next().is_some() {
        return Err((400, format!("malformed request line {line:?}")));
    }
    let authority = authority.unwrap_or_default();
    let bad = || {
        (
            400,
            format!("expected CONNECT host:port, got {authority:?}"),
        )
    };
    let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Target::Addr(SocketAddr::new(ip, port)));
    }
    let name = normalize_name(host).map_err(|e| (400, e.to_string()))?;
    Ok(Target::Name(name, port))
}

async fn respond(tcp: &mut TcpStream, status: u16, message: &str) -> std::io::Result<()> {
    let text = match status {
        200 => "Connection established",
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        _ => "Bad Gateway",
    };
    let response = if status == 200 {
        format!("HTTP/1.1 200 {text}\r\n\r\n")
    } else {
        let body = format!("{message}\n");
        format!(
            "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    tcp.write_all(response.as_bytes()).await
}

/// The destination a connection had before the nftables redirect.
fn original_dst(tcp: &TcpStream) -> std::io::Result<SocketAddr> {
    // SAFETY: zeroed sockaddr_in is a valid value; getsockopt writes at most `len` bytes
    // into it and `len` is its size.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: see above; the descriptor is the live socket of `tcp`.
    let rc = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&raw mut addr).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(SocketAddr::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)).into(),
        u16::from_be(addr.sin_port),
    ))
}

/// The interface that holds address `ip`.
fn interface_of(ip: IpAddr) -> Option<String> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates the list and stores its head in `list`.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points at a sockaddr of the family it names.
        let addr = unsafe {
            match i32::from((*entry.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let a = &*entry.ifa_addr.cast::<libc::sockaddr_in>();
                    Some(IpAddr::from(Ipv4Addr::from(u32::from_be(
                        a.sin_addr.s_addr,
                    ))))
                }
                libc::AF_INET6 => {
                    let a = &*entry.ifa_addr.cast::<libc::sockaddr_in6>();
                    Some(IpAddr::from(a.sin6_addr.s6_addr))
                }
                _ => None,
            }
        };
        if addr == Some(ip) {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            found = Some(
                unsafe { CStr::from_ptr(entry.ifa_name) }
                    .to_string_lossy()
                    .into_owned(),
            );
            break;
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_targets() {
        let t = |head: &str| parse_connect(head);
        assert_eq!(
            t("CONNECT API.Example.test:443 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(Target::Name("api.example.test".into(), 443))
        );
        assert_eq!(
            t("CONNECT 10.0.0.1:8443 HTTP/1.1\r\n\r\n"),
            Ok(Target::Addr("10.0.0.1:8443".parse().unwrap()))
        );
        assert_eq!(
            t("CONNECT [fd00::1]:443 HTTP/1.0\r\n\r\n"),
            Ok(Target::Addr("[fd00::1]:443".parse().unwrap()))
        );
        assert_eq!(t("GET / HTTP/1.1\r\n\r\n").unwrap_err().0, 405);
        assert_eq!(t("CONNECT host HTTP/1.1\r\n\r\n").unwrap_err().0, 400);
        assert_eq!(t("CONNECT host:99999 HTTP/1.1\r\n\r\n").unwrap_err().0, 400);
        assert_eq!(
            t("CONNECT bad!name:443 HTTP/1.1\r\n\r\n").unwrap_err().0,
            400
        );
    }

    #[test]
    fn loopback_belongs_to_lo() {
        assert_eq!(
            interface_of(Ipv4Addr::LOCALHOST.into()).as_deref(),
            Some("lo")
        );
        assert_eq!(interface_of("192.0.2.77".parse().unwrap()), None);
    }
}
