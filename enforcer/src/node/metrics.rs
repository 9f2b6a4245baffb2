//! The Prometheus endpoint (default `127.0.0.1:9464/metrics`). Each scrape reads the
//! pinned counters in batches (a few syscalls whatever the number of agents) and encodes
//! typed families with `prometheus-client`; series of reasons an agent never hit are
//! omitted, so the output grows with the traffic seen, not with agents x reasons.
//! Packet and byte series carry a `verdict` label ("pass" or "drop") beside the reason, so
//! `sum by (verdict)` needs no list of which reasons drop.

use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr, path::PathBuf};

use enforcer_common::{AgentCounters, Reason};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};
use tokio::{net::TcpListener, sync::watch};

use crate::dataplane::KernelMaps;

/// What the daemon tells the metrics endpoint besides the counters in the maps.
#[derive(Clone, Debug, Default)]
pub struct DaemonInfo {
    /// Agent names by id (shared: every scrape clones this info, at 100,000 agents a copy
    /// of the names cost milliseconds).
    pub agents: std::sync::Arc<BTreeMap<u32, String>>,
    /// Policy generation enforcing now.
    pub generation: u64,
    /// Unix time of the last successful apply, seconds.
    pub applied_at: f64,
    /// Duration of the last successful apply, seconds.
    pub apply_seconds: f64,
    /// Applies that succeeded.
    pub reloads_ok: u64,
    /// Policies rejected (the previous one kept enforcing).
    pub reloads_rejected: u64,
    /// Entries in use and capacity per map, per slot.
    pub map_fill: Vec<(&'static str, u64, u64)>,
    /// Agents with per-agent series: the busiest N by packets judged.
    pub top_agents: usize,
    /// Interfaces the enforcer is attached to, and those named but not present yet.
    pub interfaces_attached: u64,
    /// See `interfaces_attached`.
    pub interfaces_pending: u64,
    /// Control-plane connection: 1 connected, 0 not (absent when not configured).
    pub control_plane_connected: Option<bool>,
    /// The DNS resolver's families, when it runs.
    pub dns: Option<crate::dns::DnsMetrics>,
    /// The inspecting proxy's counters, when it runs.
    pub inspect: Option<std::sync::Arc<crate::inspect::Stats>>,
    /// How writing the audit log goes.
    pub audit: Option<crate::node::audit::SharedHealth>,
    /// Guard transitions the audit reader saw.
    pub guard_transitions: crate::node::guards::GuardTransitions,
}

/// A verdict reason and what it did to the packet.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
    verdict: Verdict,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentReason {
    agent: String,
    agent_id: u32,
    reason: String,
    verdict: Verdict,
}

/// The `verdict` label: whether the reason passes the packet or drops it (monitor mode's
/// would-drops pass, under reasons of their own).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop,
}

// By hand: the derive writes the variant's name as it is spelled (`Pass`), and label values
// are lowercase like the reasons beside them.
impl EncodeLabelValue for Verdict {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            Verdict::Pass => "pass",
            Verdict::Drop => "drop",
        })
    }
}

impl From<Reason> for Verdict {
    fn from(reason: Reason) -> Self {
        if reason.is_drop() {
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabel {
    agent: String,
    agent_id: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

/// The first 16 hex digits of the SHA-256 of the embedded eBPF object: two builds with the
/// same version but another data plane tell apart. Computed once.
fn object_digest() -> &'static str {
    static DIGEST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIGEST.get_or_init(|| {
        let d = ring::digest::digest(&ring::digest::SHA256, crate::dataplane::EBPF_OBJECT);
        d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
    })
}

/// The `n` agents (not 0, unknown traffic) with the most packets judged, kept while the
/// counters stream past: a min-heap of `n`, so a scrape at 100,000 agents keeps 100 of them,
/// not all. Ties go to the lower id, so the choice is stable.
struct Busiest {
    n: usize,
    heap: std::collections::BinaryHeap<Ranked>,
}

/// An agent in [`Busiest`]: ordered so that the heap's top is the one to drop first (fewest
/// packets; among equals, the higher id).
struct Ranked {
    packets: u64,
    id: u32,
    counters: AgentCounters,
}

impl Ranked {
    fn key(&self) -> (std::cmp::Reverse<u64>, u32) {
        (std::cmp::Reverse(self.packets), self.id)
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl Busiest {
    fn new(n: usize) -> Self {
        Busiest {
            n,
            heap: std::collections::BinaryHeap::with_capacity(n + 1),
        }
    }

    /// Offers agent `id`; agents that judged nothing are never among the busiest.
    fn offer(&mut self, id: u32, counters: &AgentCounters) {
        let packets = counters.by_reason.iter().map(|c| c.packets).sum();
        if packets == 0 || self.n == 0 {
            return;
        }
        let candidate = Ranked {
            packets,
            id,
            counters: *counters,
        };
        if self.heap.len() == self.n {
            match self.heap.peek() {
                Some(worst) if candidate < *worst => {
                    self.heap.pop();
                }
                _ => return,
            }
        }
        self.heap.push(candidate);
    }

    /// The chosen agents by id.
    fn into_sorted(self) -> Vec<(u32, AgentCounters)> {
        let mut out: Vec<_> = self.heap.into_iter().map(|r| (r.id, r.counters)).collect();
        out.sort_unstable_by_key(|&(id, _)| id);
        out
    }
}

/// Renders one scrape in the Prometheus text format.
pub fn render(maps: &KernelMaps, info: &DaemonInfo) -> Result<String, crate::dataplane::MapsError> {
    let mut registry = Registry::with_prefix("enforcer");
    let packets = Family::<AgentReason, Counter>::default();
    let bytes = Family::<AgentReason, Counter>::default();
    registry.register(
        "packets",
        "Packets the enforcer judged (at XDP or tc; a GSO super-packet counts as its segments), by agent and verdict reason: unknown traffic and the busiest metrics_top_agents agents",
        packets.clone(),
    );
    registry.register(
        "bytes",
        "Bytes of the Ethernet frames the enforcer judged (a GSO super-packet counts the frames it leaves as), by agent and verdict reason: unknown traffic and the busiest metrics_top_agents agents",
        bytes.clone(),
    );
    // Ids are dense from 1: read up to the highest agent the policy names (agents removed
    // from the policy keep their counters in the map but are no longer reported). One walk
    // of the counters gives the sums, unknown traffic and the busiest agents; nothing of
    // the other agents is kept.
    let mut unknown = AgentCounters::default();
    let mut sums = AgentCounters::default();
    let mut busiest = Busiest::new(info.top_agents);
    maps.visit_counters(
        info.agents.last_key_value().map_or(0, |(&id, _)| id),
        |id, c| {
            if id == 0 {
                unknown = *c;
                return;
            }
            sums.add(c);
            busiest.offer(id, c);
        },
    )?;
    // Every agent is in the sums; only the busiest have series of their own, so a scrape
    // stays small at 100,000 agents (a series per agent and reason would be megabytes).
    let all_packets = Family::<ReasonLabel, Counter>::default();
    let all_bytes = Family::<ReasonLabel, Counter>::default();
    registry.register(
        "agents_packets",
        "Packets judged for all agents together (unknown traffic excluded), by verdict reason",
        all_packets.clone(),
    );
    registry.register(
        "agents_bytes",
        "Bytes judged for all agents together (unknown traffic excluded), by verdict reason",
        all_bytes.clone(),
    );
    for reason in Reason::ALL {
        let c = sums.by_reason[reason as usize];
        if c.packets == 0 {
            continue;
        }
        let label = ReasonLabel {
            reason: reason.name().to_string(),
            verdict: reason.into(),
        };
        all_packets.get_or_create(&label).inc_by(c.packets);
        all_bytes.get_or_create(&label).inc_by(c.bytes);
    }
    let reported: Vec<(u32, AgentCounters)> = std::iter::once((0, unknown))
        .chain(busiest.into_sorted())
        .collect();
    let agent_name = |id: u32| {
        if id == 0 {
            "(unknown)".to_string()
        } else {
            info.agents
                .get(&id)
                .cloned()
                .unwrap_or_else(|| format!("agent-{id}"))
        }
    };
    for (id, c) in &reported {
        let name = agent_name(*id);
        for reason in Reason::ALL {
            let c = c.by_reason[reason as usize];
            if c.packets == 0 {
                continue;
            }
            let labels = AgentReason {
                agent: name.clone(),
                agent_id: *id,
                reason: reason.name().to_string(),
                verdict: reason.into(),
            };
            packets.get_or_create(&labels).inc_by(c.packets);
            bytes.get_or_create(&labels).inc_by(c.bytes);
        }
    }

    registry.register(
        "build",
        "This daemon's build: version, and a digest of the eBPF object it loads",
        Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("object_sha256", object_digest().to_owned()),
        ]),
    );

    let generation = Gauge::<i64>::default();
    generation.set(info.generation as i64);
    registry.register(
        "policy_generation",
        "Generation of the enforcing policy",
        generation,
    );
    let applied = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    applied.set(info.applied_at);
    registry.register(
        "policy_applied_timestamp_seconds",
        "Unix time of the last successful policy apply",
        applied,
    );
    let apply = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    apply.set(info.apply_seconds);
    registry.register(
        "policy_apply_duration_seconds",
        "Time the last successful apply took",
        apply,
    );
    let reloads = Family::<ResultLabel, Counter>::default();
    registry.register(
        "policy_reloads",
        "Policy applies by result (rejected ones left the previous policy enforcing)",
        reloads.clone(),
    );
    reloads
        .get_or_create(&ResultLabel {
            result: "ok".into(),
        })
        .inc_by(info.reloads_ok);
    reloads
        .get_or_create(&ResultLabel {
            result: "rejected".into(),
        })
        .inc_by(info.reloads_rejected);

    let entries = Family::<MapLabel, Gauge>::default();
    let capacity = Family::<MapLabel, Gauge>::default();
    registry.register(
        "map_entries",
        "Entries of the enforcing policy per map (one slot)",
        entries.clone(),
    );
    registry.register(
        "map_capacity",
        "Capacity per map and slot",
        capacity.clone(),
    );
    for (map, used, cap) in &info.map_fill {
        let label = MapLabel {
            map: (*map).to_string(),
        };
        entries.get_or_create(&label).set(*used as i64);
        capacity.get_or_create(&label).set(*cap as i64);
    }

    let interfaces = Family::<StateLabel, Gauge>::default();
    registry.register(
        "interfaces",
        "Interfaces named by the configuration or policy: attached, or pending until they appear",
        interfaces.clone(),
    );
    for (state, n) in [
        ("attached", info.interfaces_attached),
        ("pending", info.interfaces_pending),
    ] {
        interfaces
            .get_or_create(&StateLabel {
                state: state.into(),
            })
            .set(n as i64);
    }

    if let Some(connected) = info.control_plane_connected {
        let g = Gauge::<i64>::default();
        g.set(i64::from(connected));
        registry.register(
            "control_plane_connected",
            "1 while the policy stream from the control plane is up",
            g,
        );
    }

    let suppressed = Family::<AgentLabel, Counter>::default();
    let lost = Family::<AgentLabel, Counter>::default();
    registry.register(
        "audit_events_suppressed",
        "Audit events not emitted because of the per-agent event limit",
        suppressed.clone(),
    );
    registry.register(
        "audit_events_lost",
        "Audit events lost because the ring buffer was full",
        lost.clone(),
    );
    // As for packets: series for unknown traffic and the busiest agents, sums for all.
    let (all_suppressed, all_lost) = (sums.audit.suppressed, sums.audit.lost);
    for (id, c) in &reported {
        if c.audit == enforcer_common::AuditStats::default() {
            continue;
        }
        let label = AgentLabel {
            agent: agent_name(*id),
            agent_id: *id,
        };
        suppressed.get_or_create(&label).inc_by(c.audit.suppressed);
        lost.get_or_create(&label).inc_by(c.audit.lost);
    }

    for (name, help, n) in [
        (
            "agents_audit_events_suppressed",
            "Audit events of all agents together not emitted because of the per-agent event limit",
            all_suppressed,
        ),
        (
            "agents_audit_events_lost",
            "Audit events of all agents together lost because the ring buffer was full",
            all_lost,
        ),
    ] {
        let c = Counter::<u64>::default();
        c.inc_by(n);
        registry.register(name, help, c);
    }

    // Guards: transitions as the audit reader saw them, breakers by state and the trips of
    // every agent the policy names, from one batch read of GUARDS.
    let transitions = Family::<EventLabel, Counter>::default();
    registry.register(
        "guard_transitions",
        "Guard transitions reported by the data plane, by event (breaker_opened, breaker_half_open, breaker_closed, quota_exhausted)",
        transitions.clone(),
    );
    for (event, n) in info.guard_transitions.snapshot() {
        transitions
            .get_or_create(&EventLabel {
                event: event.into(),
            })
            .inc_by(n);
    }
    let last = info.agents.last_key_value().map_or(0, |(&id, _)| id);
    let (open, half_open, trips) = crate::node::guards::breaker_totals(maps, last)?;
    let breakers = Family::<StateLabel, Gauge>::default();
    registry.register(
        "breakers",
        "Agents whose circuit breaker is open or half-open now",
        breakers.clone(),
    );
    for (state, n) in [("open", open), ("half_open", half_open)] {
        breakers
            .get_or_create(&StateLabel {
                state: state.into(),
            })
            .set(n as i64);
    }
    let tripped = Counter::<u64>::default();
    tripped.inc_by(trips);
    registry.register(
        "breaker_trips",
        "Times the circuit breakers of the policy's agents opened, summed",
        tripped,
    );

    if let Some(health) = &info.audit {
        register_audit_writer(&mut registry, &health.get());
    }
    if let Some(dns) = &info.dns {
        dns.register(&mut registry);
    }
    if let Some(stats) = &info.inspect {
        crate::inspect::register_metrics(&mut registry, stats, &info.agents);
    }

    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    Ok(out)
}

/// The audit writer's families: whether writing fails, what it cost, and the chain's head
/// (its `seq`, and the first 52 bits of its hash as a number a collector can keep; the
/// full hash is in `status`).
fn register_audit_writer(registry: &mut Registry, health: &crate::node::audit::Health) {
    let gauge = |v: i64| {
        let g = Gauge::<i64>::default();
        g.set(v);
        g
    };
    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    registry.register(
        "audit_log_failing",
        "1 while appending to the audit log fails (see status for the error); events are counted, not written",
        gauge(i64::from(health.last_error.is_some())),
    );
    registry.register(
        "audit_log_write_errors",
        "Attempts to append to the audit log that failed, retries included",
        counter(health.write_errors),
    );
    registry.register(
        "audit_events_unwritten",
        "Audit events not written because appending to the log failed; the chain records each gap",
        counter(health.events_unwritten),
    );
    registry.register(
        "audit_events_summarized",
        "Audit events over the global budget, counted in summary records instead of written alone",
        counter(health.events_summarized),
    );
    registry.register(
        "audit_summaries",
        "Summary records written (one per agent and reason per interval while over the global budget)",
        counter(health.summaries),
    );
    registry.register(
        "audit_chain_seq",
        "seq of the last record in the audit log's hash chain",
        gauge(i64::try_from(health.seq).unwrap_or(i64::MAX)),
    );
    let prefix = health
        .head
        .get(..13)
        .and_then(|h| i64::from_str_radix(h, 16).ok())
        .unwrap_or(0);
    registry.register(
        "audit_chain_head_prefix",
        "The first 13 hex digits (52 bits) of the hash of the audit log's last record, as a number",
        gauge(prefix),
    );
    registry.register(
        "audit_chain_head_saved_seq",
        "seq of the chain head last saved outside the log (state_dir/audit-head.json)",
        gauge(i64::try_from(health.head_saved_seq).unwrap_or(i64::MAX)),
    );
}

/// Serves `GET /metrics` on `listen` until the task is dropped, reading the maps pinned
/// under `bpffs` and the daemon's `info`.
pub async fn serve(listener: TcpListener, bpffs: PathBuf, info: watch::Receiver<DaemonInfo>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let bpffs = bpffs.clone();
        let info = info.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let bpffs = bpffs.clone();
                let info = info.borrow().clone();
                async move {
                    if request.uri().path() != "/metrics" {
                        return Ok::<_, Infallible>(
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"see /metrics\n")))
                                .expect("static response"),
                        );
                    }
                    // Map reads are syscalls: keep them off the async threads.
                    let rendered = tokio::task::spawn_blocking(move || {
                        let maps = KernelMaps::from_pins(&bpffs)
                            .map_err(|e| crate::error::error_chain(&e))?;
                        render(&maps, &info).map_err(|e| crate::error::error_chain(&e))
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                    Ok(match rendered {
                        Ok(text) => Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(text)))
                            .expect("valid response"),
                        Err(e) => Response::builder()
                            .status(StatusCode::INTERNAL_SERVER_ERROR)
                            .body(Full::new(Bytes::from(format!("reading the maps: {e}\n"))))
                            .expect("valid response"),
                    })
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_series_carry_their_verdict() {
        let mut registry = Registry::default();
        let packets = Family::<AgentReason, Counter>::default();
        registry.register("packets", "test", packets.clone());
        for reason in [Reason::Allowed, Reason::EgressDenied] {
            packets
                .get_or_create(&AgentReason {
                    agent: "coder".into(),
                    agent_id: 1,
                    reason: reason.name().into(),
                    verdict: reason.into(),
                })
                .inc_by(3);
        }
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                r#"packets_total{agent="coder",agent_id="1",reason="allowed",verdict="pass"} 3"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"packets_total{agent="coder",agent_id="1",reason="egress_denied",verdict="drop"} 3"#
            ),
            "{text}"
        );
    }

    #[test]
    fn busiest_agents_by_packets_with_ties_to_the_lower_id() {
        let busiest = |n| {
            let mut b = Busiest::new(n);
            for (id, packets) in [(1, 5), (2, 50), (3, 0), (4, 50), (5, 7)] {
                let mut c = AgentCounters::default();
                c.by_reason[Reason::Allowed as usize].packets = packets;
                b.offer(id, &c);
            }
            b.into_sorted()
                .into_iter()
                .map(|(id, c)| {
                    assert!(c.by_reason[Reason::Allowed as usize].packets > 0);
                    id
                })
                .collect::<Vec<u32>>()
        };
        // Agent 3 judged nothing.
        assert_eq!(busiest(10), [1, 2, 4, 5]);
        assert_eq!(busiest(3), [2, 4, 5]);
        assert_eq!(busiest(2), [2, 4]);
        assert_eq!(busiest(1), [2]);
        assert_eq!(busiest(0), Vec::<u32>::new());
    }
}
