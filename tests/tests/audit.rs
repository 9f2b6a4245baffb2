//! The audit trail through the real XDP program: packets run with BPF_PROG_TEST_RUN against
//! a compiled policy, and the test reads what reached the `AUDIT` ring buffer and the
//! per-agent audit stats (in `COUNTERS`), then runs the reader task end to end into a hash-chained log.

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use enforcer::{
    dataplane::{
        Dataplane,
        compile::{self, Limits},
        testrun::run_xdp,
    },
    lab::{self, BpffsMount, require_root},
    node::{
        audit::{self, AuditContext, AuditLog, AuditRate, Record},
        daemon::agent_names,
        netlink::if_index,
    },
    policy,
};
use enforcer_common::{
    AUDIT_FAMILY_NONE, AUDIT_FAMILY_V4, AUDIT_FAMILY_V6, AuditEvent, AuditStats, Reason,
    UNKNOWN_AGENT, programs,
};
use etherparse::PacketBuilder;
use integration_tests::in_sandbox_netns;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// `lo`: the interface BPF_PROG_TEST_RUN reports when the run names none (index 1 in a new
/// network namespace).
const LO: u32 = 1;

const POLICY: &str = r#"
[defaults]
unknown = "drop"

[[agents]]
id = 1
name = "restricted"
prefixes = ["10.1.0.2", "fd01::2"]
egress_default = "deny"
[[agents.egress]]
action = "allow"
to = ["10.9.0.0/16", "fd09::/32"]
proto = "tcp"
ports = "443"

[[agents]]
id = 2
name = "other"
prefixes = ["10.2.0.2"]
egress_default = "deny"

[[agents]]
id = 3
name = "watched"
prefixes = ["10.3.0.2"]
mode = "monitor"
egress_default = "deny"

[[agents]]
id = 4
name = "sandbox"
interfaces = ["sbx0"]
egress_default = "deny"
"#;

fn v4(s: &str) -> [u8; 4] {
    s.parse::<Ipv4Addr>().unwrap().octets()
}

fn v6(s: &str) -> [u8; 16] {
    s.parse::<Ipv6Addr>().unwrap().octets()
}

/// `addr` as an event carries it: IPv4 in the first 4 bytes, the rest zero.
fn ev4(s: &str) -> [u8; 16] {
    let mut out = [0; 16];
    out[..4].copy_from_slice(&v4(s));
    out
}

fn tcp4(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(v4(src), v4(dst), 64)
        .tcp(sport, dport, 1, 1024)
        .write(&mut out, b"hello")
        .unwrap();
    out
}

fn udp4(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(v4(src), v4(dst), 64)
        .udp(sport, dport)
        .write(&mut out, b"hello")
        .unwrap();
    out
}

fn icmp4(src: &str, dst: &str) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(v4(src), v4(dst), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut out, b"ping")
        .unwrap();
    out
}

fn tcp6(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(v6(src), v6(dst), 64)
        .tcp(sport, dport, 1, 1024)
        .write(&mut out, b"hello")
        .unwrap();
    out
}

fn arp() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAC_B);
    out.extend_from_slice(&MAC_A);
    out.extend_from_slice(&0x0806u16.to_be_bytes());
    out.extend_from_slice(&[0; 28]);
    out
}

/// An IPv4 ethertype with only 10 bytes of IP header: nothing past Ethernet can be read.
fn cut_ipv4() -> Vec<u8> {
    let mut out = tcp4("10.4.0.2", 1, "10.9.0.1", 443);
    out.truncate(14 + 10);
    out
}

/// [`in_sandbox_netns`] for this file's tests.
fn in_test_netns(f: impl FnOnce() + Send + 'static) {
    in_sandbox_netns("aud", f);
}

/// The program with [`POLICY`] applied, its audit ring, and the applied generation.
struct Setup {
    dp: Dataplane,
    ring: RingBuf<MapData>,
    generation: u64,
    // Dropped last: removing the mount removes the pins.
    _bpffs: BpffsMount,
}

fn setup(limits: Limits) -> Setup {
    let bpffs = BpffsMount::new().unwrap();
    let policy = policy::parse("audit.toml", POLICY).unwrap();
    let compiled = compile::compile(&policy, &limits, &if_index).unwrap();
    let mut dp = Dataplane::load(bpffs.path(), &limits).unwrap();
    let generation = dp.apply(&compiled).unwrap();
    let ring = dp.take_audit_ring().unwrap();
    Setup {
        dp,
        ring,
        generation,
        _bpffs: bpffs,
    }
}

fn limits() -> Limits {
    Limits {
        max_agents: 16,
        ..Limits::default()
    }
}

impl Setup {
    /// Runs `packet` `repeat` times (on `ifindex`, or `lo`), asserting the verdict.
    fn run(&self, packet: &[u8], ifindex: Option<u32>, repeat: u32, verdict: u32) {
        let program = self.dp.program(programs::ENFORCE).unwrap();
        let result = run_xdp(program, packet, ifindex, repeat).unwrap();
        assert_eq!(result.return_value, verdict, "verdict");
    }

    /// Every event waiting in the ring.
    fn events(&mut self) -> Vec<AuditEvent> {
        let mut events = Vec::new();
        while let Some(item) = self.ring.next() {
            events.push(audit::decode(&item).expect("a ring record the size of an AuditEvent"));
        }
        events
    }

    /// The one event `packet` produced.
    fn one_event(&mut self, packet: &[u8], ifindex: Option<u32>, verdict: u32) -> AuditEvent {
        self.run(packet, ifindex, 1, verdict);
        let events = self.events();
        assert_eq!(events.len(), 1, "one event per audited packet: {events:?}");
        events[0]
    }

    fn stats(&mut self, agent: u32) -> AuditStats {
        self.dp.maps().audit_stats(agent).unwrap()
    }
}

#[test]
fn denied_packets_yield_one_event_each_with_their_tuple() {
    if !require_root("denied_packets_yield_one_event_each_with_their_tuple") {
        return;
    }
    in_test_netns(|| {
        let mut s = setup(limits());
        let generation = s.generation;
        let expect = |agent, reason: Reason, ifindex, packet: &[u8]| AuditEvent {
            generation,
            agent,
            reason: reason as u32,
            ifindex,
            len: packet.len() as u32,
            ..AuditEvent::default()
        };
        // The timestamp is the kernel's; everything else is checked field by field.
        let got = |mut e: AuditEvent| {
            assert!(e.time_ns > 0, "a CLOCK_MONOTONIC timestamp");
            e.time_ns = 0;
            e
        };

        let p = tcp4("10.1.0.2", 40000, "10.9.1.5", 80);
        let e = got(s.one_event(&p, None, XDP_DROP));
        assert_eq!(
            e,
            AuditEvent {
                family: AUDIT_FAMILY_V4,
                proto: 6,
                src: ev4("10.1.0.2"),
                dst: ev4("10.9.1.5"),
                src_port: 40000,
                dst_port: 80,
                ..expect(1, Reason::EgressDenied, LO, &p)
            }
        );

        let p = tcp6("fd01::2", 51000, "fd09::1", 22);
        let e = got(s.one_event(&p, None, XDP_DROP));
        assert_eq!(
            e,
            AuditEvent {
                family: AUDIT_FAMILY_V6,
                proto: 6,
                src: v6("fd01::2"),
                dst: v6("fd09::1"),
                src_port: 51000,
                dst_port: 22,
                ..expect(1, Reason::EgressDenied, LO, &p)
            }
        );

        let p = udp4("10.2.0.2", 5353, "1.1.1.1", 53);
        let e = got(s.one_event(&p, None, XDP_DROP));
        assert_eq!(
            e,
            AuditEvent {
                family: AUDIT_FAMILY_V4,
                proto: 17,
                src: ev4("10.2.0.2"),
                dst: ev4("1.1.1.1"),
                src_port: 5353,
                dst_port: 53,
                ..expect(2, Reason::EgressDenied, LO, &p)
            }
        );

        // No ports: both 0.
        let p = icmp4("10.1.0.2", "10.9.0.1");
        let e = got(s.one_event(&p, None, XDP_DROP));
        assert_eq!(
            e,
            AuditEvent {
                family: AUDIT_FAMILY_V4,
                proto: 1,
                src: ev4("10.1.0.2"),
                dst: ev4("10.9.0.1"),
                ..expect(1, Reason::EgressDenied, LO, &p)
            }
        );

        // Unknown traffic under `unknown = "drop"`: agent 0.
        let p = tcp4("192.0.2.7", 1234, "10.9.0.1", 443);
        let e = got(s.one_event(&p, None, XDP_DROP));
        assert_eq!(
            e,
            AuditEvent {
                family: AUDIT_FAMILY_V4,
                proto: 6,
                src: ev4("192.0.2.7"),
                dst: ev4("10.9.0.1"),
                src_port: 1234,
                dst_port: 443,
                ..expect(UNKNOWN_AGENT, Reason::UnknownDrop, LO, &p)
            }
        );

        // Identified by interface: the event carries that interface.
        let sbx0 = if_index("sbx0").unwrap();
        let p = tcp4("10.4.0.2", 40000, "8.8.8.8", 443);
        let e = got(s.one_event(&p, Some(sbx0), XDP_DROP));
        assert_eq!(
            e,
            AuditEvent {
                family: AUDIT_FAMILY_V4,
                proto: 6,
                src: ev4("10.4.0.2"),
                dst: ev4("8.8.8.8"),
                src_port: 40000,
                dst_port: 443,
                ..expect(4, Reason::EgressDenied, sbx0, &p)
            }
        );

        // No readable IP header: agent, reason, interface and length only.
        let p = cut_ipv4();
        let e = got(s.one_event(&p, Some(sbx0), XDP_DROP));
        assert_eq!(
            e,
            AuditEvent {
                family: AUDIT_FAMILY_NONE,
                ..expect(4, Reason::Malformed, sbx0, &p)
            }
        );

        for agent in 0..=4 {
            assert_eq!(s.stats(agent), AuditStats::default(), "agent {agent}");
        }
    });
}

#[test]
fn passed_packets_yield_no_event() {
    if !require_root("passed_packets_yield_no_event") {
        return;
    }
    in_test_netns(|| {
        let mut s = setup(limits());
        s.run(&tcp4("10.1.0.2", 40000, "10.9.1.5", 443), None, 1, XDP_PASS);
        s.run(&tcp6("fd01::2", 40000, "fd09::1", 443), None, 1, XDP_PASS);
        s.run(&arp(), None, 1, XDP_PASS);
        let sbx0 = if_index("sbx0").unwrap();
        s.run(&arp(), Some(sbx0), 1, XDP_PASS);
        // Many at once, too.
        s.run(
            &tcp4("10.1.0.2", 40000, "10.9.1.5", 443),
            None,
            500,
            XDP_PASS,
        );
        assert_eq!(s.events(), Vec::new());
        for agent in 0..=4 {
            assert_eq!(s.stats(agent), AuditStats::default(), "agent {agent}");
        }
    });
}

#[test]
fn monitor_mode_would_deny_yields_one_event() {
    if !require_root("monitor_mode_would_deny_yields_one_event") {
        return;
    }
    in_test_netns(|| {
        let mut s = setup(limits());
        let p = tcp4("10.3.0.2", 40000, "10.9.1.5", 443);
        let e = s.one_event(&p, None, XDP_PASS);
        assert_eq!(e.agent, 3);
        assert_eq!(e.reason, Reason::MonitorEgressDenied as u32);
        assert_eq!((e.src, e.dst), (ev4("10.3.0.2"), ev4("10.9.1.5")));
        assert_eq!((e.src_port, e.dst_port), (40000, 443));
    });
}

/// A packet agent 1 is denied.
fn p1() -> Vec<u8> {
    tcp4("10.1.0.2", 40000, "10.9.1.5", 80)
}

#[test]
fn flood_is_limited_per_agent_and_every_suppression_counted() {
    if !require_root("flood_is_limited_per_agent_and_every_suppression_counted") {
        return;
    }
    in_test_netns(|| {
        let mut s = setup(limits());
        // A slow sustained rate, so the burst is all a short flood can get: one more event
        // per whole second the flood takes.
        let rate = AuditRate {
            events_per_sec: 1,
            burst: 20,
        };
        s.dp.maps().set_audit_config(rate.config()).unwrap();
        let flood = 1000;
        let started = Instant::now();
        s.run(
            &tcp4("10.1.0.2", 40000, "10.9.1.5", 80),
            None,
            flood,
            XDP_DROP,
        );
        let refill = started.elapsed().as_secs() + 1;
        let events = s.events();
        let stats = s.stats(1);
        let n = events.len() as u64;
        assert!(
            n >= u64::from(rate.burst) && n <= u64::from(rate.burst) + refill,
            "{n} events for a burst of {} (+{refill} for the time the flood took)",
            rate.burst
        );
        assert!(events.iter().all(|e| e.agent == 1));
        assert_eq!(
            n + stats.suppressed,
            u64::from(flood),
            "every denial is an event or counted as suppressed"
        );
        assert_eq!(stats.lost, 0);

        // The flooding agent's exhausted budget is its own: another agent still reports.
        let p = udp4("10.2.0.2", 5353, "1.1.1.1", 53);
        let e = s.one_event(&p, None, XDP_DROP);
        assert_eq!(e.agent, 2);
        assert_eq!(s.stats(2), AuditStats::default());
        // And the flooder stays limited.
        s.run(&p1(), None, 1, XDP_DROP);
        let late = s.events().len() as u64;
        assert_eq!(late + s.stats(1).suppressed, stats.suppressed + 1);
        // Until its budget is back (here by a reset, as the sustained rate would in a second).
        s.dp.maps().reset_audit_limiter(1).unwrap();
        assert_eq!(s.one_event(&p1(), None, XDP_DROP).agent, 1);
    });
}

#[test]
fn full_ring_counts_every_lost_event() {
    if !require_root("full_ring_counts_every_lost_event") {
        return;
    }
    in_test_netns(|| {
        // The smallest ring (one page) and a budget the flood cannot exhaust: the ring
        // overflows and the rest must show up as lost.
        let mut s = setup(Limits {
            audit_ring_bytes: 4096,
            ..limits()
        });
        s.dp.maps()
            .set_audit_config(
                AuditRate {
                    events_per_sec: 1_000_000,
                    burst: 1_000_000,
                }
                .config(),
            )
            .unwrap();
        let flood = 1000;
        s.run(
            &tcp4("10.1.0.2", 40000, "10.9.1.5", 80),
            None,
            flood,
            XDP_DROP,
        );
        let events = s.events().len() as u64;
        let stats = s.stats(1);
        assert_eq!(stats.suppressed, 0);
        assert!(stats.lost > 0, "a 4 KiB ring cannot hold 1000 events");
        assert!(
            events > 0 && events <= 4096 / 80,
            "{events} events in a 4 KiB ring"
        );
        assert_eq!(events + stats.lost, u64::from(flood));
    });
}

/// A log path in a fresh directory, removed on drop.
struct LogDir(PathBuf);

impl LogDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(lab::unique_name("audit-log"));
        fs::create_dir_all(&dir).unwrap();
        LogDir(dir)
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn line_count(path: &std::path::Path) -> usize {
    fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

/// Waits (up to a generous deadline, which only a hung reader reaches) until the log has
/// `n` lines.
async fn wait_lines(path: &std::path::Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while line_count(path) < n {
        assert!(
            Instant::now() < deadline,
            "the reader wrote {} of {n} lines",
            line_count(path)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn reader_task_writes_a_verifiable_chained_log() {
    if !require_root("reader_task_writes_a_verifiable_chained_log") {
        return;
    }
    in_test_netns(|| {
        let s = setup(limits());
        let dir = LogDir::new();
        let path = dir.0.join("audit.log");
        let policy = policy::parse("audit.toml", POLICY).unwrap();
        let generation = s.generation;
        let context = AuditContext::new(generation, POLICY, agent_names(&policy));
        let digest = context.digest.clone();
        // The daemon publishes a policy's context after `apply` returns; until then the
        // reader knows only an older one.
        let (context_tx, context_rx) = tokio::sync::watch::channel(AuditContext::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let Setup {
            mut dp,
            ring,
            _bpffs,
            ..
        } = s;
        let program = dp.program(programs::ENFORCE).unwrap();
        let summary = runtime.block_on(async {
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let log = audit::Writer::new(
                AuditLog::open(&path).unwrap(),
                Vec::new(),
                None,
                audit::SharedHealth::default(),
            );
            let (user, user_rx) = audit::UserAudit::channel();
            let (_reopen, reopen_rx) = tokio::sync::mpsc::channel(1);
            let reader = tokio::spawn(audit::run(
                ring,
                log,
                context_rx,
                user_rx,
                reopen_rx,
                audit::GuardAudit::default(),
                async move {
                    let _ = stop_rx.await;
                },
            ));
            // Woken by the ring: events reach the log while the reader waits.
            let denied = tcp4("10.1.0.2", 40000, "10.9.1.5", 80);
            run_xdp(program, &denied, None, 1).unwrap();
            // The event's generation is newer than any context: the reader holds it until
            // the context arrives (timers on one runtime: this one fires well before the
            // reader's CONTEXT_WAIT gives up).
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                context_tx.send(context).unwrap();
                // Kept open until the end: a dropped sender is a daemon gone.
                std::future::pending::<()>().await;
            });
            let allowed = tcp4("10.1.0.2", 40000, "10.9.1.5", 443);
            run_xdp(program, &allowed, None, 1).unwrap();
            wait_lines(&path, 1).await;
            let watched = tcp6("fd01::2", 51000, "fd09::1", 22);
            run_xdp(program, &watched, None, 3).unwrap();
            wait_lines(&path, 4).await;
            // A user-space decision joins the same chain.
            user.record(audit::UserEvent {
                source: audit::UserSource::Dns,
                agent: 1,
                reason: "dns_refused",
                verdict: "drop",
                src: Some("10.1.0.2:5300".parse().unwrap()),
                dst: None,
                name: Some("evil.example".into()),
                detail: None,
                actor: None,
                mcp: None,
            });
            wait_lines(&path, 5).await;
            // Events still in the ring at shutdown are drained before the task returns.
            run_xdp(program, &udp4("10.2.0.2", 5353, "1.1.1.1", 53), None, 2).unwrap();
            stop_tx.send(()).unwrap();
            reader.await.unwrap().unwrap()
        });
        assert_eq!(summary.records, 7);
        assert_eq!(summary.malformed, 0);

        let report = audit::verify(&path).unwrap();
        assert_eq!((report.lines, report.last_seq), (7, 7));
        let mut lines = audit::tail(&path, 10).unwrap();
        assert_eq!(lines.len(), 7);
        let user_line: audit::UserRecord = serde_json::from_str(&lines.remove(4)).unwrap();
        assert_eq!(user_line.source, audit::UserSource::Dns);
        assert_eq!(user_line.agent_name.as_deref(), Some("restricted"));
        assert_eq!(user_line.reason, "dns_refused");
        assert_eq!(user_line.name.as_deref(), Some("evil.example"));
        assert_eq!(user_line.policy_generation, generation);
        let records: Vec<Record> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let r = &records[0];
        assert_eq!(r.agent, 1);
        assert_eq!(r.agent_name.as_deref(), Some("restricted"));
        assert_eq!(r.reason, "egress_denied");
        assert_eq!(r.verdict, "drop");
        assert_eq!(r.proto.as_deref(), Some("tcp"));
        assert_eq!(r.src.as_deref(), Some("10.1.0.2:40000"));
        assert_eq!(r.dst.as_deref(), Some("10.9.1.5:80"));
        assert_eq!(r.ifindex, LO);
        assert_eq!(r.policy_generation, generation);
        assert_eq!(r.policy_digest.as_deref(), Some(digest.as_str()));
        assert!(r.time.ends_with('Z') && r.time.len() == 30, "{}", r.time);
        assert_eq!(records[1].src.as_deref(), Some("[fd01::2]:51000"));
        assert_eq!(records[1].dst.as_deref(), Some("[fd09::1]:22"));
        assert_eq!(records[5].agent_name.as_deref(), Some("other"));
        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["prev"], audit::GENESIS);
        let names: BTreeMap<u32, String> = agent_names(&policy);
        let stats = audit::collect_stats(dp.maps(), &names).unwrap();
        assert_eq!(stats.len(), 5, "the unknown agent and four agents");
        assert_eq!(stats[0].id, UNKNOWN_AGENT);
        assert_eq!(stats[1].name.as_deref(), Some("restricted"));
        assert!(stats.iter().all(|a| a.suppressed == 0 && a.lost == 0));
    });
}

#[test]
fn pinned_ring_keeps_its_size_and_events_across_reloads() {
    if !require_root("pinned_ring_keeps_its_size_and_events_across_reloads") {
        return;
    }
    in_test_netns(|| {
        let small = Limits {
            audit_ring_bytes: 8192,
            ..limits()
        };
        let s = setup(small);
        // An event nobody reads before the daemon goes away.
        s.run(&tcp4("10.1.0.2", 40000, "10.9.1.5", 80), None, 1, XDP_DROP);
        let Setup {
            dp,
            ring,
            _bpffs: bpffs,
            ..
        } = s;
        drop(ring);
        drop(dp);
        // The next daemon asks for the default size; the pinned ring keeps its own, and
        // aya must map it with that size to read it.
        let mut dp = Dataplane::load(bpffs.path(), &limits()).unwrap();
        assert_eq!(dp.limits().audit_ring_bytes, 8192);
        let mut ring = dp.take_audit_ring().unwrap();
        let item = ring.next().expect("the event written before the reload");
        let e = audit::decode(&item).unwrap();
        assert_eq!((e.agent, e.reason), (1, Reason::EgressDenied as u32));
        drop(item);
        assert!(ring.next().is_none());
        assert!(matches!(
            dp.take_audit_ring(),
            Err(enforcer::dataplane::DataplaneError::MissingMap { .. })
        ));
    });
}
