//! The per-agent DNS resolver that makes host-name allow rules work.
//!
//! Agents reach hosts by name, and one CDN address serves thousands of names, so an
//! address allow-list alone both misses names and admits strangers. The resolver sits on
//! the configured `[dns] listen` addresses (UDP and TCP), the only DNS servers the XDP
//! program lets an agent with name rules reach (`dns_bypass` drops the rest), and for each
//! query:
//!
//! 1. identifies the agent exactly as the data plane does: the interface the query arrived
//!    on (UDP: `IP_PKTINFO`; TCP: the interface whose subnet holds the peer, the one the
//!    handshake's answers left by), then the source address, then source prefix;
//! 2. refuses (`REFUSED`) queries from no known agent: the resolver is the agents', not an
//!    open resolver. Agents without name rules get their queries forwarded unchanged;
//! 3. for an agent with name rules, answers a name that no allow pattern matches with
//!    `REFUSED`, a `dns_refused` audit record and a metric (in monitor mode the query is
//!    forwarded and the record says `pass`); answers HTTPS/SVCB queries (types 65/64) for
//!    allowed names with NODATA, so no ECH configuration reaches the agent (the XDP SNI
//!    check drops ECH ClientHellos, whose outer name is not the real one); and forwards
//!    the rest to the upstreams (UDP with a timeout, each upstream in turn, the list
//!    twice; TCP when the answer is truncated or the agent asked over TCP). Each upstream
//!    query carries a fresh random id, never the agent's, and with `case_randomization`
//!    its name's letters in random case (0x20); an answer counts only from the address
//!    and port asked, with that id and that question (byte for byte under 0x20), and
//!    other datagrams do not end the wait. The agent gets its own id and question back;
//! 4. takes every A/AAAA record of the answer that the question's CNAME chain reaches and
//!    admits its address for the agent in the kernel (`learn_name`) until now + min(TTL,
//!    `max_ttl_secs`) + `grace_secs`, with the protocols and ports of every rule whose
//!    pattern matches the question's name, and only then sends the answer, with its TTLs
//!    capped at `max_ttl_secs`, so the agent cannot race its own connection. An agent
//!    already holding `max_learned_per_agent` (name, address) pairs gets `REFUSED` for an
//!    answer that would add more (a `dns_learned_cap` audit record and a metric): random
//!    subdomains under an allowed wildcard would otherwise pile up until one agent filled
//!    the kernel map all agents share. Renewing a pair it holds adds nothing.
//!
//! What was admitted is kept in [`learned::Learned`]; a sweeper removes each name at its
//! expiry (narrowing the kernel entry when other names still hold the address) and a new
//! policy forgets or narrows what it no longer allows. The kernel entry carries the expiry
//! too, so the program never admits past it even if the sweeper lags.

pub mod learned;
pub mod message;
pub mod net;
#[cfg(test)]
mod tests;

use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::RecordType,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use ring::rand::{SecureRandom, SystemRandom};
use thiserror::Error;
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{Notify, Semaphore, watch},
    task::JoinSet,
};

pub use self::learned::{FakeSink, Learned, NameSink, Rules};
use self::message::UpstreamQuery;
use crate::{
    node::audit::{UserAudit, UserEvent, UserSource},
    policy::{Agent, Mode, Policy},
};

/// How long one upstream gets to answer before the next is asked.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries over UDP being answered at once; more are dropped (the client retries).
const MAX_UDP_IN_FLIGHT: usize = 512;
/// TCP connections served at once; more are closed at accept.
const MAX_TCP_CONNECTIONS: usize = 64;
/// A TCP connection with no query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// The `[dns]` section of the daemon configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// Where the resolver answers, UDP and TCP. Specific addresses: the XDP program lets
    /// agents with names reach DNS at exactly these.
    pub listen: Vec<SocketAddr>,
    /// Where queries are forwarded, in order of preference.
    pub upstreams: Vec<SocketAddr>,
    /// Added to each answer's TTL before an admitted address expires, so an agent that
    /// connects right at the end of the TTL is not cut off.
    pub grace: Duration,
    /// Longest TTL an answer keeps (and an address stays admitted before the grace).
    pub max_ttl_secs: u32,
    /// Whether upstream queries carry their name's letters in random case (0x20), which
    /// the answer must echo exactly: more for a forger to guess than the id alone. Off
    /// only for an upstream that does not echo the question as asked.
    pub case_randomization: bool,
    /// Most (name, address) pairs one agent may hold learned at once; an answer that
    /// would take it past this is refused. Each kernel entry holds at least one pair, so
    /// this also bounds the agent's share of the learned-address map every agent shares.
    pub max_learned_per_agent: usize,
}

/// Default for [`DnsConfig::max_learned_per_agent`]: room for a busy agent's working set
/// (hundreds of names, a few addresses each), while 64 agents at the cap together hold at
/// most the 65,536 entries of the kernel map.
pub const DEFAULT_MAX_LEARNED_PER_AGENT: usize = 1024;

/// Errors of the resolver.
#[derive(Debug, Error)]
pub enum DnsError {
    /// A listen address could not be bound.
    #[error(
        "binding the DNS resolver on {proto} {addr} (the address must be assigned to an interface of this namespace, e.g. `ip addr add {ip}/32 dev lo`)",
        ip = addr.ip()
    )]
    Bind {
        /// `udp` or `tcp`.
        proto: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// The resolver's metric families, shared with the `/metrics` endpoint.
#[derive(Clone, Debug, Default)]
pub struct DnsMetrics {
    queries: Family<QueryLabels, Counter>,
    suppressed: Family<AgentLabel, Counter>,
    learned: Gauge,
    expired: Counter,
    rejected: Family<RejectedLabel, Counter>,
    cap_refusals: Family<AgentLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectedLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabel {
    agent: String,
    agent_id: u32,
}

fn agent_label(agent: &Agent) -> AgentLabel {
    AgentLabel {
        agent: agent.name.clone(),
        agent_id: agent.id,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    agent: String,
    agent_id: u32,
    outcome: &'static str,
}

impl DnsMetrics {
    /// Adds the families to a scrape's registry (they share their values with this).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "dns_queries",
            "Queries the resolver answered, by agent and outcome (answered, refused, servfail)",
            self.queries.clone(),
        );
        registry.register(
            "dns_audit_suppressed",
            "Refusals not written to the audit log because the agent's audit budget was spent",
            self.suppressed.clone(),
        );
        registry.register(
            "dns_learned_entries",
            "Addresses admitted by DNS answers now, one per (agent, address)",
            self.learned.clone(),
        );
        registry.register(
            "dns_learned_expired",
            "Names whose admitted address expired (TTL plus grace) and was withdrawn",
            self.expired.clone(),
        );
        registry.register(
            "dns_upstream_answers_rejected",
            "Datagrams from upstreams dropped as no answer to the query asked, by reason (source, malformed, not_a_response, id, question)",
            self.rejected.clone(),
        );
        registry.register(
            "dns_learned_cap_refusals",
            "Answers not admitted because the agent held max_learned_per_agent learned (name, address) pairs, by agent",
            self.cap_refusals.clone(),
        );
    }

    /// Answers refused to `agent_id` at its learned cap so far (tests read this).
    pub fn cap_refusals(&self, agent: &str, agent_id: u32) -> u64 {
        self.cap_refusals
            .get_or_create(&AgentLabel {
                agent: agent.to_string(),
                agent_id,
            })
            .get()
    }

    /// Upstream datagrams rejected for `reason` so far (tests read this).
    pub fn rejected(&self, reason: &'static str) -> u64 {
        self.rejected.get_or_create(&RejectedLabel { reason }).get()
    }

    /// Queries counted for `agent_id` with `outcome` so far (tests read this).
    pub fn queries(&self, agent: &str, agent_id: u32, outcome: &'static str) -> u64 {
        self.queries
            .get_or_create(&QueryLabels {
                agent: agent.to_string(),
                agent_id,
                outcome,
            })
            .get()
    }

    fn count(&self, agent: Option<&Agent>, outcome: &'static str) {
        let (agent, agent_id) = match agent {
            Some(a) => (a.name.clone(), a.id),
            None => ("(unknown)".to_string(), 0),
        };
        self.queries
            .get_or_create(&QueryLabels {
                agent,
                agent_id,
                outcome,
            })
            .inc();
    }
}

/// Where a query came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The interface it arrived on (UDP) or whose subnet holds the peer (TCP), if known.
    pub interface: Option<String>,
    /// The agent's address and port.
    pub src: SocketAddr,
    /// Whether it came over TCP (then it is answered in full, and asked upstream over TCP).
    pub tcp: bool,
}

/// The agent `origin` belongs to under `policy`, in the data plane's order: interface,
/// then exact source address, then longest source prefix.
pub fn identify<'p>(policy: &'p Policy, origin: &Origin) -> Option<&'p Agent> {
    origin
        .interface
        .as_deref()
        .and_then(|i| policy.agent_by_interface(i))
        .or_else(|| policy.agent_by_source(origin.src.ip()))
}

/// The per-agent audit budget for refusals, the same `audit_events_per_sec` and
/// `audit_burst` the kernel applies to its own events: an agent looping over denied names
/// must not flood the log. Refusals over budget are still refused and counted in
/// `enforcer_dns_audit_suppressed_total`.
#[derive(Debug)]
struct AuditBudget {
    rate: crate::node::audit::AuditRate,
    /// Per agent: tokens left and when they were last topped up.
    agents: Mutex<std::collections::HashMap<u32, (f64, std::time::Instant)>>,
}

impl AuditBudget {
    fn take(&self, agent: u32) -> bool {
        let (rate, burst) = (
            f64::from(self.rate.events_per_sec),
            f64::from(self.rate.burst),
        );
        if rate == 0.0 || burst == 0.0 {
            return false;
        }
        let now = std::time::Instant::now();
        let mut agents = self.agents.lock().expect("audit budget lock");
        let (tokens, at) = agents.entry(agent).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The learned table and the sink it writes through, behind one lock: every learn is a
/// map write that must finish before the answer leaves.
struct State<S> {
    learned: Learned,
    sink: S,
}

/// The resolver: settings, the enforcing policy, the learned state. Generic over the
/// [`NameSink`] so its logic runs in unit tests against [`FakeSink`].
pub struct Resolver<S> {
    config: DnsConfig,
    policy: watch::Receiver<Option<Arc<Policy>>>,
    state: Mutex<State<S>>,
    audit: UserAudit,
    budget: AuditBudget,
    metrics: DnsMetrics,
    /// Wakes the sweeper when an entry with an earlier expiry than it sleeps for appears.
    learned_changed: Notify,
    /// The upstream queries' ids and 0x20 case: the kernel's CSPRNG (`getrandom`).
    random: SystemRandom,
}

/// What the resolver does with a query before any upstream is asked.
enum Plan {
    /// Answer at once with this message.
    Answer(Message),
    /// Forward and relay the answer unchanged (agents without names; monitor mode).
    Relay,
    /// Forward, admit the answer's addresses with these rules, cap TTLs.
    Learn(Rules),
}

/// What became of an answer's addresses.
enum Admission {
    /// All admitted (or there were none).
    Admitted,
    /// None admitted: the agent holds `held` pairs and the answer would add `new`.
    OverCap { held: usize, new: usize },
}

impl<S: NameSink> Resolver<S> {
    /// A resolver writing admitted addresses through `sink` and refusals to `audit`, at
    /// most `audit_rate` of them per agent.
    pub fn new(
        config: DnsConfig,
        sink: S,
        policy: watch::Receiver<Option<Arc<Policy>>>,
        audit: (UserAudit, crate::node::audit::AuditRate),
        metrics: DnsMetrics,
    ) -> Self {
        let (audit, rate) = audit;
        Resolver {
            config,
            policy,
            state: Mutex::new(State {
                learned: Learned::default(),
                sink,
            }),
            audit,
            budget: AuditBudget {
                rate,
                agents: Mutex::default(),
            },
            metrics,
            learned_changed: Notify::new(),
            random: SystemRandom::new(),
        }
    }

    /// Runs `f` on the learned table and the sink (tests inspect both through this).
    pub fn with_state<T>(&self, f: impl FnOnce(&mut Learned, &mut S) -> T) -> T {
        let mut state = self.state.lock().expect("resolver state lock");
        let State { learned, sink } = &mut *state;
        f(learned, sink)
    }

    /// Answers one query; `None` when it deserves no answer (a response, or bytes
    /// without even an id).
    pub async fn answer(&self, bytes: &[u8], origin: &Origin) -> Option<Vec<u8>> {
        let policy = self.policy.borrow().clone();
        let agent = policy.as_deref().and_then(|p| identify(p, origin));
        let query = match message::parse_query(bytes) {
            Ok(q) => q,
            Err((None, _)) => return None,
            Err((Some(_), message::MessageError::Unsupported("not a query"))) => return None,
            Err((Some(id), e)) => {
                let code = match e {
                    message::MessageError::Malformed(_) => ResponseCode::FormErr,
                    message::MessageError::Unsupported(_) => ResponseCode::NotImp,
                };
                tracing::debug!(src = %origin.src, error = %e, "query not answered");
                return self.finish(agent, message::error_for_id(id, code), origin, 512);
            }
        };
        let payload = query.message.max_payload();
        let plan = match agent {
            // No policy of ours yet, or no agent of it: not an open resolver.
            None => Plan::Answer(message::empty_answer(&query.message, ResponseCode::Refused)),
            Some(agent) => self.plan(agent, &query, origin),
        };
        let rules = match plan {
            Plan::Answer(answer) => return self.finish(agent, answer, origin, payload),
            Plan::Relay => None,
            Plan::Learn(rules) => Some(rules),
        };
        let Some((mut answer, mut raw)) = self.forward(bytes, origin.tcp).await else {
            let answer = message::empty_answer(&query.message, ResponseCode::ServFail);
            return self.finish(agent, answer, origin, payload);
        };
        message::restore(&mut answer, &mut raw, &query.message);
        let (Some(agent), Some(rules)) = (agent, rules) else {
            // Relayed as the upstream sent it (but for the agent's id and question): an
            // agent without names is governed by its address rules alone.
            self.metrics
                .count(agent, outcome(answer.metadata.response_code));
            if origin.tcp {
                return Some(raw);
            }
            return message::fit_udp(&answer, raw, payload).ok();
        };
        let question = &query.message.queries[0].name;
        let name = query.name.as_deref().expect("a planned name is valid");
        match self.admit(agent.id, name, question, &answer, rules) {
            Ok(Admission::Admitted) => {}
            Ok(Admission::OverCap { held, new }) => {
                let monitor = agent.mode == Mode::Monitor;
                self.metrics
                    .cap_refusals
                    .get_or_create(&agent_label(agent))
                    .inc();
                self.audit_refusal(
                    agent,
                    UserEvent {
                        source: UserSource::Dns,
                        agent: agent.id,
                        reason: "dns_learned_cap",
                        verdict: if monitor { "pass" } else { "drop" },
                        src: Some(origin.src),
                        dst: None,
                        name: Some(query.raw_name.clone()),
                        detail: Some(format!(
                            "agent holds {held} learned (name, address) pairs, the answer would add {new}, max_learned_per_agent is {}",
                            self.config.max_learned_per_agent
                        )),
                        actor: None,
                        mcp: None,
                    },
                );
                // REFUSED, not SERVFAIL (which admit errors get): this is the resolver's
                // policy for this agent, as for a name not allowed, not a server failure;
                // and caching resolvers may keep a SERVFAIL for a while (RFC 2308 §7.1,
                // RFC 9520) when the cap lifts as soon as an expiry frees room. In monitor
                // mode the answer goes out unadmitted, as a denied name's does.
                if !monitor {
                    let answer = message::empty_answer(&query.message, ResponseCode::Refused);
                    return self.finish(Some(agent), answer, origin, payload);
                }
            }
            Err(e) => {
                tracing::error!(agent = agent.id, name, error = %crate::error::error_chain(&e), "admitting the answer's addresses");
                let answer = message::empty_answer(&query.message, ResponseCode::ServFail);
                return self.finish(Some(agent), answer, origin, payload);
            }
        }
        message::cap_ttls(&mut answer, self.config.max_ttl_secs);
        self.finish(Some(agent), answer, origin, payload)
    }

    /// Decides what to do with an identified agent's query.
    fn plan(&self, agent: &Agent, query: &message::Query, origin: &Origin) -> Plan {
        if !agent.has_names() {
            return Plan::Relay;
        }
        let rules = query
            .name
            .as_deref()
            .map(|n| agent.name_rules(n))
            .unwrap_or_default();
        if rules.is_empty() {
            let monitor = agent.mode == Mode::Monitor;
            self.audit_refusal(
                agent,
                UserEvent {
                    source: UserSource::Dns,
                    agent: agent.id,
                    reason: "dns_refused",
                    verdict: if monitor { "pass" } else { "drop" },
                    src: Some(origin.src),
                    dst: None,
                    name: Some(query.raw_name.clone()),
                    detail: Some(format!(
                        "no allow rule names this host (query type {})",
                        query.qtype
                    )),
                    actor: None,
                    mcp: None,
                },
            );
            return if monitor {
                Plan::Relay
            } else {
                Plan::Answer(message::empty_answer(&query.message, ResponseCode::Refused))
            };
        }
        if matches!(query.qtype, RecordType::HTTPS | RecordType::SVCB) {
            return Plan::Answer(message::empty_answer(&query.message, ResponseCode::NoError));
        }
        Plan::Learn(rules)
    }

    /// Writes `event` to the audit log if `agent`'s audit budget allows, else counts it
    /// as suppressed.
    fn audit_refusal(&self, agent: &Agent, event: UserEvent) {
        if self.budget.take(agent.id) {
            self.audit.record(event);
        } else {
            self.metrics
                .suppressed
                .get_or_create(&agent_label(agent))
                .inc();
        }
    }

    /// Admits every address the answer gives for `question` and wakes the sweeper, or
    /// none of them when that would take the agent past `max_learned_per_agent`: the
    /// check and the writes happen under one lock, so concurrent answers cannot both
    /// slip under the cap.
    fn admit(
        &self,
        agent: u32,
        name: &str,
        question: &hickory_proto::rr::Name,
        answer: &Message,
        rules: Rules,
    ) -> Result<Admission, crate::dataplane::MapsError> {
        let addresses = message::addresses(question, answer);
        if addresses.is_empty() {
            return Ok(Admission::Admitted);
        }
        let now = net::monotonic_ns();
        let grace = self.config.grace.as_nanos() as u64;
        let admission = self.with_state(|learned, sink| {
            let addrs: Vec<_> = addresses.iter().map(|&(addr, _)| addr).collect();
            let (held, new) = (learned.held(agent), learned.new_pairs(agent, name, &addrs));
            if new > 0 && held + new > self.config.max_learned_per_agent {
                return Ok(Admission::OverCap { held, new });
            }
            for (addr, ttl) in addresses {
                let ttl = u64::from(ttl.min(self.config.max_ttl_secs)) * 1_000_000_000;
                learned.learn(sink, agent, addr, name, now + ttl + grace, rules.clone())?;
            }
            self.metrics.learned.set(learned.len() as i64);
            Ok::<_, crate::dataplane::MapsError>(Admission::Admitted)
        })?;
        if matches!(admission, Admission::Admitted) {
            self.learned_changed.notify_one();
        }
        Ok(admission)
    }

    /// Serializes an answer for the agent's transport (over UDP, `payload` is the most the
    /// agent's query said it takes) and counts it.
    fn finish(
        &self,
        agent: Option<&Agent>,
        answer: Message,
        origin: &Origin,
        payload: u16,
    ) -> Option<Vec<u8>> {
        let encoded = message::encode(&answer).and_then(|bytes| {
            if origin.tcp {
                Ok(bytes)
            } else {
                message::fit_udp(&answer, bytes, payload)
            }
        });
        match encoded {
            Ok(bytes) => {
                self.metrics
                    .count(agent, outcome(answer.metadata.response_code));
                Some(bytes)
            }
            Err(e) => {
                tracing::warn!(error = %e, "encoding an answer");
                self.metrics.count(agent, "servfail");
                let fail = message::error_for_id(answer.metadata.id, ResponseCode::ServFail);
                message::encode(&fail).ok()
            }
        }
    }

    /// Asks the upstreams the agent's query `bytes`: each in turn with
    /// [`UPSTREAM_TIMEOUT`], the whole list twice, each time as a new [`UpstreamQuery`]
    /// (fresh id and case). Over TCP when the agent asked over TCP or a UDP answer came back
    /// truncated. The answer still carries the id and question sent.
    async fn forward(&self, bytes: &[u8], tcp: bool) -> Option<(Message, Vec<u8>)> {
        for round in 0..2 {
            for &upstream in &self.config.upstreams {
                let rejected = |why: message::Rejected| {
                    self.metrics
                        .rejected
                        .get_or_create(&RejectedLabel {
                            reason: why.reason(),
                        })
                        .inc();
                    tracing::debug!(%upstream, reason = why.reason(), "upstream datagram rejected");
                };
                let result = if tcp {
                    let query = self.upstream_query(bytes)?;
                    net::ask_tcp(upstream, &query, UPSTREAM_TIMEOUT, &rejected).await
                } else {
                    let query = self.upstream_query(bytes)?;
                    match net::ask_udp(upstream, &query, UPSTREAM_TIMEOUT, &rejected).await {
                        Ok((answer, _)) if answer.metadata.truncation => {
                            let query = self.upstream_query(bytes)?;
                            net::ask_tcp(upstream, &query, UPSTREAM_TIMEOUT, &rejected).await
                        }
                        other => other,
                    }
                };
                match result {
                    Ok(answer) => return Some(answer),
                    Err(e) => tracing::debug!(%upstream, round, error = %e, "upstream failed"),
                }
            }
        }
        tracing::warn!(upstreams = ?self.config.upstreams, "no upstream answered");
        None
    }

    /// The agent's query `bytes` as one upstream attempt: a random id and, with
    /// `case_randomization`, random letter case. `None` (answered SERVFAIL) when the
    /// kernel gives no random bytes or the name cannot be rewritten in place.
    fn upstream_query(&self, bytes: &[u8]) -> Option<UpstreamQuery> {
        // Two bytes of id, then one per byte of the longest name (255, RFC 1035 2.3.4).
        let mut random = [0u8; 2 + 255];
        if self.random.fill(&mut random).is_err() {
            tracing::error!("no random bytes from the kernel for an upstream query id");
            return None;
        }
        let id = u16::from_be_bytes([random[0], random[1]]);
        let case = self.config.case_randomization.then_some(&random[2..]);
        UpstreamQuery::new(bytes, id, case)
            .inspect_err(|e| tracing::debug!(error = %e, "query not forwarded"))
            .ok()
    }

    /// Withdraws every name whose time has come; returns how many expired.
    fn sweep(&self) -> usize {
        let now = net::monotonic_ns();
        let (expired, len) = self.with_state(|learned, sink| {
            let expired = learned.sweep(sink, now).unwrap_or_else(|e| {
                tracing::error!(error = %crate::error::error_chain(&e), "withdrawing expired addresses");
                0
            });
            (expired, learned.len())
        });
        self.metrics.expired.inc_by(expired as u64);
        self.metrics.learned.set(len as i64);
        expired
    }

    /// Brings the learned state in line with a new policy.
    fn reconcile(&self, policy: Option<&Policy>) {
        let dropped = self.with_state(|learned, sink| {
            learned.reconcile(sink, |agent, name| {
                policy
                    .and_then(|p| p.agents().iter().find(|a| a.id == agent))
                    .map(|a| a.name_rules(name))
                    .unwrap_or_default()
            })
        });
        match dropped {
            Ok(n) if n > 0 => {
                tracing::info!(names = n, "new policy: withdrew names it no longer allows")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %crate::error::error_chain(&e), "applying a new policy to learned addresses")
            }
        }
        let len = self.with_state(|learned, _| learned.len());
        self.metrics.learned.set(len as i64);
    }

    /// The sweeper and policy follower: removes each name at its expiry (waking at least
    /// every second) and reconciles on every new policy, until `shutdown`.
    pub async fn maintain(&self, shutdown: impl Future<Output = ()>) {
        let mut policy = self.policy.clone();
        tokio::pin!(shutdown);
        loop {
            let wait = self
                .with_state(|learned, _| learned.next_expiry())
                .map_or(Duration::from_secs(1), |at| {
                    Duration::from_nanos(at.saturating_sub(net::monotonic_ns()))
                })
                .min(Duration::from_secs(1));
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.learned_changed.notified() => {}
                changed = policy.changed() => {
                    if changed.is_ok() {
                        let current = policy.borrow_and_update().clone();
                        self.reconcile(current.as_deref());
                    }
                }
            }
            self.sweep();
        }
    }
}

fn outcome(code: ResponseCode) -> &'static str {
    match code {
        ResponseCode::Refused => "refused",
        ResponseCode::ServFail => "servfail",
        _ => "answered",
    }
}

/// The resolver's sockets, bound before the daemon reports ready so a wrong address fails
/// start-up with a clear error.
pub struct Bound {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

/// Binds every listen address, UDP and TCP. Needs a tokio runtime.
pub fn bind(config: &DnsConfig) -> Result<Bound, DnsError> {
    let mut bound = Bound {
        udp: Vec::new(),
        tcp: Vec::new(),
    };
    for &addr in &config.listen {
        let err = |proto| {
            move |source| DnsError::Bind {
                proto,
                addr,
                source,
            }
        };
        let udp = std::net::UdpSocket::bind(addr).map_err(err("udp"))?;
        net::enable_pktinfo(&udp, addr.is_ipv6()).map_err(err("udp"))?;
        udp.set_nonblocking(true).map_err(err("udp"))?;
        bound
            .udp
            .push(UdpSocket::from_std(udp).map_err(err("udp"))?);
        let tcp = std::net::TcpListener::bind(addr).map_err(err("tcp"))?;
        tcp.set_nonblocking(true).map_err(err("tcp"))?;
        bound
            .tcp
            .push(TcpListener::from_std(tcp).map_err(err("tcp"))?);
    }
    Ok(bound)
}

/// Serves queries on the bound sockets and keeps the learned state until `shutdown`.
pub async fn run<S: NameSink + Send + 'static>(
    bound: Bound,
    resolver: Arc<Resolver<S>>,
    shutdown: impl Future<Output = ()>,
) {
    let mut tasks = JoinSet::new();
    let in_flight = Arc::new(Semaphore::new(MAX_UDP_IN_FLIGHT));
    for socket in bound.udp {
        tasks.spawn(serve_udp(
            Arc::new(socket),
            resolver.clone(),
            in_flight.clone(),
        ));
    }
    let connections = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    for listener in bound.tcp {
        tasks.spawn(serve_tcp(listener, resolver.clone(), connections.clone()));
    }
    resolver.maintain(shutdown).await;
    tasks.shutdown().await;
}

async fn serve_udp<S: NameSink + Send + 'static>(
    socket: Arc<UdpSocket>,
    resolver: Arc<Resolver<S>>,
    in_flight: Arc<Semaphore>,
) {
    let mut buf = vec![0u8; net::MAX_UDP];
    loop {
        let (n, src, ifindex) = match net::recv_with_ifindex(&socket, &mut buf).await {
            Ok(received) => received,
            Err(e) => {
                tracing::warn!(error = %e, "receiving a DNS query");
                continue;
            }
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            tracing::debug!(%src, "too many queries in flight; dropped (the client retries)");
            continue;
        };
        let query = buf[..n].to_vec();
        let (socket, resolver) = (socket.clone(), resolver.clone());
        tokio::spawn(async move {
            let origin = Origin {
                interface: ifindex.and_then(net::if_name),
                src,
                tcp: false,
            };
            if let Some(answer) = resolver.answer(&query, &origin).await
                && let Err(e) = socket.send_to(&answer, src).await
            {
                tracing::debug!(%src, error = %e, "sending a DNS answer");
            }
            drop(permit);
        });
    }
}

async fn serve_tcp<S: NameSink + Send + 'static>(
    listener: TcpListener,
    resolver: Arc<Resolver<S>>,
    connections: Arc<Semaphore>,
) {
    loop {
        let (stream, src) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a DNS connection");
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::debug!(%src, "too many DNS connections; closed");
            continue;
        };
        let resolver = resolver.clone();
        tokio::spawn(async move {
            let origin = Origin {
                interface: net::interface_for_peer(src.ip()),
                src,
                tcp: true,
            };
            if let Err(e) = serve_connection(stream, &resolver, &origin).await {
                tracing::debug!(%src, error = %e, "DNS connection ended");
            }
            drop(permit);
        });
    }
}

async fn serve_connection<S: NameSink>(
    mut stream: TcpStream,
    resolver: &Resolver<S>,
    origin: &Origin,
) -> io::Result<()> {
    loop {
        let Ok(query) = tokio::time::timeout(TCP_IDLE, net::read_framed(&mut stream)).await else {
            return Ok(());
        };
        let Some(query) = query? else {
            return Ok(());
        };
        if let Some(answer) = resolver.answer(&query, origin).await {
            net::write_framed(&mut stream, &answer).await?;
        }
    }
}
