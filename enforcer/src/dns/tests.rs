//! The resolver's logic against a scripted upstream on loopback and [`FakeSink`]: no root,
//! no kernel.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, CNAME},
    },
};
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::{mpsc, watch},
};

use super::{message::tests::query_bytes, *};
use crate::{
    node::audit::UserEvent,
    policy::{PortRange, Proto},
};

const POLICY: &str = r#"
[[agents]]
id = 1
name = "coder"
interfaces = ["gwa1"]

[[agents.egress]]
action = "allow"
to = ["api.example.test", "*.cdn.example.test", "10.0.2.0/24"]
proto = "tcp"
ports = "443"

[[agents.egress]]
action = "allow"
to = ["api.example.test"]
proto = "tcp"
ports = "80"

[[agents]]
id = 2
name = "plain"
prefixes = ["10.9.0.0/24"]

[[agents.egress]]
action = "allow"
to = ["10.0.2.0/24"]

[[agents]]
id = 3
name = "trial"
prefixes = ["10.8.0.2"]
mode = "monitor"

[[agents.egress]]
action = "allow"
to = ["api.example.test"]
proto = "tcp"
ports = "443"

[[agents]]
id = 4
name = "neighbour"
prefixes = ["10.7.0.0/24"]

[[agents.egress]]
action = "allow"
to = ["*.cdn.example.test"]
proto = "tcp"
ports = "443"
"#;

const TCP443: (Proto, PortRange) = (Proto::Tcp, PortRange { lo: 443, hi: 443 });
const TCP80: (Proto, PortRange) = (Proto::Tcp, PortRange { lo: 80, hi: 80 });

fn n(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn a(name: &str, ttl: u32, ip: [u8; 4]) -> Record {
    Record::from_rdata(n(name), ttl, RData::A(A(Ipv4Addr::from(ip))))
}

/// A scripted upstream on 127.0.0.1, UDP and TCP on one port: answers names from a table,
/// sets TC over UDP for names listed as too big, counts the queries it got.
struct Upstream {
    addr: SocketAddr,
    udp_queries: Arc<AtomicU64>,
    tcp_queries: Arc<AtomicU64>,
    /// Every query's id and question name as received, and whether it came over TCP.
    asked: Arc<Mutex<Vec<(u16, String, bool)>>>,
}

impl Upstream {
    async fn start(table: BTreeMap<&'static str, Vec<Record>>, tcp_only: &[&'static str]) -> Self {
        let table = Arc::new(table);
        let tcp_only: Arc<Vec<&'static str>> = Arc::new(tcp_only.to_vec());
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let (udp_queries, tcp_queries) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let answer = {
            let (table, asked) = (table.clone(), asked.clone());
            move |bytes: &[u8], truncate: bool, tcp: bool| {
                let query = Message::from_vec(bytes).unwrap();
                asked.lock().unwrap().push((
                    query.metadata.id,
                    query.queries[0].name.to_ascii(),
                    tcp,
                ));
                let mut response = Message::response(query.metadata.id, query.metadata.op_code);
                response.metadata.recursion_desired = query.metadata.recursion_desired;
                response.add_queries(query.queries.iter().cloned());
                let q = &query.queries[0];
                let key = q.name.to_ascii().to_ascii_lowercase();
                match table.get(key.trim_end_matches('.')) {
                    Some(records) if truncate => {
                        let _ = records;
                        response.metadata.truncation = true;
                    }
                    Some(records) => {
                        response.add_answers(
                            records
                                .iter()
                                .filter(|r| {
                                    q.query_type == RecordType::ANY
                                        || r.record_type() == q.query_type
                                        || r.record_type() == RecordType::CNAME
                                })
                                .cloned(),
                        );
                    }
                    None => response.metadata.response_code = ResponseCode::NXDomain,
                }
                response.to_vec().unwrap()
            }
        };
        {
            let (answer, count, tcp_only) = (answer.clone(), udp_queries.clone(), tcp_only.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok((len, from)) = udp.recv_from(&mut buf).await {
                    count.fetch_add(1, Ordering::Relaxed);
                    // Names compare ignoring case: the resolver randomizes it (0x20).
                    let name = Message::from_vec(&buf[..len]).unwrap().queries[0]
                        .name
                        .to_ascii()
                        .to_ascii_lowercase();
                    let truncate = tcp_only.contains(&name.trim_end_matches('.'));
                    let _ = udp
                        .send_to(&answer(&buf[..len], truncate, false), from)
                        .await;
                }
            });
        }
        {
            let count = tcp_queries.clone();
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = tcp.accept().await {
                    count.fetch_add(1, Ordering::Relaxed);
                    let query = net::read_framed(&mut stream).await.unwrap().unwrap();
                    net::write_framed(&mut stream, &answer(&query, false, true))
                        .await
                        .unwrap();
                }
            });
        }
        Upstream {
            addr,
            udp_queries,
            tcp_queries,
            asked,
        }
    }

    fn queries(&self) -> u64 {
        self.udp_queries.load(Ordering::Relaxed) + self.tcp_queries.load(Ordering::Relaxed)
    }
}

struct Rig {
    resolver: Resolver<FakeSink>,
    audit: mpsc::Receiver<UserEvent>,
    policy: watch::Sender<Option<Arc<Policy>>>,
    metrics: DnsMetrics,
}

fn rig(upstreams: Vec<SocketAddr>, grace_secs: u64, max_ttl_secs: u32) -> Rig {
    capped_rig(
        upstreams,
        grace_secs,
        max_ttl_secs,
        DEFAULT_MAX_LEARNED_PER_AGENT,
    )
}

fn capped_rig(
    upstreams: Vec<SocketAddr>,
    grace_secs: u64,
    max_ttl_secs: u32,
    max_learned_per_agent: usize,
) -> Rig {
    let policy = crate::policy::parse("policy.toml", POLICY).unwrap();
    let (policy_tx, policy_rx) = watch::channel(Some(Arc::new(policy)));
    let (audit, audit_rx) = UserAudit::channel();
    let metrics = DnsMetrics::default();
    let config = DnsConfig {
        listen: vec!["10.200.0.53:53".parse().unwrap()],
        upstreams,
        grace: Duration::from_secs(grace_secs),
        max_ttl_secs,
        case_randomization: true,
        max_learned_per_agent,
    };
    Rig {
        resolver: Resolver::new(
            config,
            FakeSink::default(),
            policy_rx,
            (
                audit,
                crate::node::audit::AuditRate {
                    events_per_sec: 1,
                    burst: 3,
                },
            ),
            metrics.clone(),
        ),
        audit: audit_rx,
        policy: policy_tx,
        metrics,
    }
}

fn from_agent1() -> Origin {
    Origin {
        interface: Some("gwa1".into()),
        src: "10.200.1.2:5353".parse().unwrap(),
        tcp: false,
    }
}

fn from_src(src: &str, tcp: bool) -> Origin {
    Origin {
        interface: Some("eth9".into()),
        src: src.parse().unwrap(),
        tcp,
    }
}

fn table() -> BTreeMap<&'static str, Vec<Record>> {
    BTreeMap::from([
        (
            "api.example.test",
            vec![a("api.example.test.", 7200, [192, 0, 2, 10])],
        ),
        (
            "img.cdn.example.test",
            vec![
                Record::from_rdata(
                    n("img.cdn.example.test."),
                    300,
                    RData::CNAME(CNAME(n("edge.provider.test."))),
                ),
                a("edge.provider.test.", 20, [192, 0, 2, 20]),
                a("edge.provider.test.", 20, [192, 0, 2, 21]),
            ],
        ),
        ("other.test", vec![a("other.test.", 60, [192, 0, 2, 10])]),
        (
            "big.cdn.example.test",
            (0..40)
                .map(|i| a("big.cdn.example.test.", 60, [198, 51, 100, i]))
                .collect(),
        ),
    ])
}

/// The id every query of the agent carries in these tests.
const AGENT_ID: u16 = 0x4242;

async fn ask(rig: &Rig, name: &str, qtype: RecordType, origin: &Origin) -> Message {
    let bytes = rig
        .resolver
        .answer(&query_bytes(AGENT_ID, name, qtype), origin)
        .await
        .expect("an answer");
    let answer = Message::from_vec(&bytes).unwrap();
    assert_eq!(answer.metadata.id, AGENT_ID);
    answer
}

#[tokio::test]
async fn an_allowed_name_is_admitted_before_it_is_answered_with_capped_ttls() {
    let up = Upstream::start(table(), &[]).await;
    let rig = rig(vec![up.addr], 5, 60);
    let before = net::monotonic_ns();
    let answer = ask(&rig, "API.example.test.", RecordType::A, &from_agent1()).await;
    let after = net::monotonic_ns();
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert_eq!(answer.answers.len(), 1);
    assert_eq!(answer.answers[0].ttl, 60, "7200 capped at max_ttl");
    rig.resolver.with_state(|learned, sink| {
        let addr: IpAddr = "192.0.2.10".parse().unwrap();
        let (expires, rules) = &sink.entries[&(1, addr)];
        // min(7200, 60) + 5 s of grace after the query.
        assert!(*expires >= before + 65_000_000_000 && *expires <= after + 65_000_000_000);
        assert_eq!(rules, &vec![TCP443, TCP80], "every rule naming the host");
        assert_eq!(learned.names(1, addr).len(), 1);
    });
    assert_eq!(rig.metrics.queries("coder", 1, "answered"), 1);
    assert_eq!(rig.metrics.learned.get(), 1);
}

#[tokio::test]
async fn a_wildcard_admits_a_subdomain_through_its_cname_chain() {
    let up = Upstream::start(table(), &[]).await;
    let rig = rig(vec![up.addr], 5, 3600);
    let answer = ask(&rig, "img.cdn.example.test.", RecordType::A, &from_agent1()).await;
    assert_eq!(answer.answers.len(), 3);
    rig.resolver.with_state(|learned, sink| {
        assert_eq!(sink.entries.len(), 2);
        for ip in ["192.0.2.20", "192.0.2.21"] {
            let addr: IpAddr = ip.parse().unwrap();
            assert_eq!(
                sink.entries[&(1, addr)].1,
                vec![TCP443],
                "wildcard rule only"
            );
            assert_eq!(learned.names(1, addr)[0].0, "img.cdn.example.test");
        }
    });
}

#[tokio::test]
async fn a_denied_name_is_refused_audited_and_never_forwarded() {
    let up = Upstream::start(table(), &[]).await;
    let mut rig = rig(vec![up.addr], 5, 3600);
    // Same address as an allowed name: refused all the same, nothing admitted.
    let answer = ask(&rig, "other.test.", RecordType::A, &from_agent1()).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::Refused);
    assert!(answer.answers.is_empty());
    assert_eq!(up.queries(), 0);
    let event = rig.audit.try_recv().unwrap();
    assert_eq!(event.reason, "dns_refused");
    assert_eq!(event.verdict, "drop");
    assert_eq!(event.agent, 1);
    assert_eq!(event.name.as_deref(), Some("other.test"));
    assert_eq!(event.src, Some(from_agent1().src));
    // The bare suffix of a wildcard is not allowed either.
    let answer = ask(&rig, "cdn.example.test.", RecordType::A, &from_agent1()).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::Refused);
    rig.resolver
        .with_state(|_, sink| assert!(sink.entries.is_empty()));
    assert_eq!(rig.metrics.queries("coder", 1, "refused"), 2);
}

#[tokio::test]
async fn refusals_beyond_the_audit_budget_are_counted_not_logged() {
    let up = Upstream::start(table(), &[]).await;
    let mut rig = rig(vec![up.addr], 5, 3600);
    let started = std::time::Instant::now();
    for _ in 0..10 {
        let answer = ask(&rig, "other.test.", RecordType::A, &from_agent1()).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::Refused);
    }
    let mut logged = 0;
    while rig.audit.try_recv().is_ok() {
        logged += 1;
    }
    // A burst of 3, then 1 a second for as long as the queries took.
    let accrued = started.elapsed().as_secs() + 1;
    assert!(logged >= 3 && logged <= 3 + accrued, "{logged} logged");
    let suppressed = rig
        .metrics
        .suppressed
        .get_or_create(&AgentLabel {
            agent: "coder".into(),
            agent_id: 1,
        })
        .get();
    assert_eq!(suppressed, 10 - logged);
    assert_eq!(rig.metrics.queries("coder", 1, "refused"), 10);
}

#[tokio::test]
async fn https_and_svcb_get_nodata_so_no_ech_config_reaches_the_agent() {
    let up = Upstream::start(table(), &[]).await;
    let rig = rig(vec![up.addr], 5, 3600);
    for qtype in [RecordType::HTTPS, RecordType::SVCB] {
        let answer = ask(&rig, "api.example.test.", qtype, &from_agent1()).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(answer.answers.is_empty());
        assert_eq!(answer.queries[0].query_type, qtype);
    }
    assert_eq!(up.queries(), 0);
}

#[tokio::test]
async fn unknown_sources_are_refused_and_agents_without_names_are_relayed() {
    let up = Upstream::start(table(), &[]).await;
    let rig = rig(vec![up.addr], 5, 3600);
    let stranger = from_src("10.77.0.1:1000", false);
    let answer = ask(&rig, "api.example.test.", RecordType::A, &stranger).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::Refused);
    assert_eq!(rig.metrics.queries("(unknown)", 0, "refused"), 1);
    // Agent 2 (by source prefix) has no name rules: any name, answer as the upstream sent
    // it (TTL untouched), nothing admitted.
    let plain = from_src("10.9.0.7:1000", false);
    let answer = ask(&rig, "other.test.", RecordType::A, &plain).await;
    assert_eq!(answer.answers[0].ttl, 60);
    let answer = ask(&rig, "api.example.test.", RecordType::A, &plain).await;
    assert_eq!(answer.answers[0].ttl, 7200);
    rig.resolver
        .with_state(|_, sink| assert!(sink.entries.is_empty()));
    assert_eq!(rig.metrics.queries("plain", 2, "answered"), 2);
    assert_eq!(up.queries(), 2);
}

#[tokio::test]
async fn monitor_mode_forwards_a_denied_name_and_audits_a_pass() {
    let up = Upstream::start(table(), &[]).await;
    let mut rig = rig(vec![up.addr], 5, 3600);
    let trial = from_src("10.8.0.2:1000", false);
    let answer = ask(&rig, "other.test.", RecordType::A, &trial).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    let event = rig.audit.try_recv().unwrap();
    assert_eq!((event.agent, event.verdict), (3, "pass"));
    rig.resolver
        .with_state(|_, sink| assert!(sink.entries.is_empty(), "a denied name is not admitted"));
}

#[tokio::test]
async fn a_truncated_udp_answer_is_asked_again_over_tcp_and_fully_admitted() {
    let up = Upstream::start(table(), &["big.cdn.example.test"]).await;
    let rig = rig(vec![up.addr], 5, 3600);
    let answer = ask(&rig, "big.cdn.example.test.", RecordType::A, &from_agent1()).await;
    assert_eq!(up.tcp_queries.load(Ordering::Relaxed), 1);
    rig.resolver
        .with_state(|_, sink| assert_eq!(sink.entries.len(), 40));
    // 40 A records (about 660 bytes) do not fit the agent's 512: TC, so it asks over TCP.
    assert!(answer.metadata.truncation);
    let over_tcp = from_src("10.200.1.2:4000", true);
    let over_tcp = Origin {
        interface: Some("gwa1".into()),
        ..over_tcp
    };
    let answer = ask(&rig, "big.cdn.example.test.", RecordType::A, &over_tcp).await;
    assert_eq!(answer.answers.len(), 40);
    assert!(!answer.metadata.truncation);
}

#[tokio::test]
async fn a_dead_upstream_is_skipped_and_no_upstream_means_servfail() {
    // A closed port on loopback: the connected UDP socket gets ECONNREFUSED at once.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let up = Upstream::start(table(), &[]).await;
    let rig = rig(vec![dead_addr, up.addr], 5, 3600);
    let answer = ask(&rig, "api.example.test.", RecordType::A, &from_agent1()).await;
    assert_eq!(answer.answers.len(), 1, "the second upstream answered");
    let rig = self::rig(vec![dead_addr], 5, 3600);
    let answer = ask(&rig, "api.example.test.", RecordType::A, &from_agent1()).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(rig.metrics.queries("coder", 1, "servfail"), 1);
    rig.resolver
        .with_state(|_, sink| assert!(sink.entries.is_empty()));
}

#[tokio::test]
async fn entries_expire_at_ttl_plus_grace_and_new_policies_prune() {
    let up = Upstream::start(table(), &[]).await;
    // Grace 0 and max TTL 0: the admitted address is due at once.
    let rig = rig(vec![up.addr], 0, 0);
    ask(&rig, "img.cdn.example.test.", RecordType::A, &from_agent1()).await;
    rig.resolver
        .with_state(|_, sink| assert_eq!(sink.entries.len(), 2));
    assert_eq!(rig.resolver.sweep(), 2);
    rig.resolver
        .with_state(|_, sink| assert!(sink.entries.is_empty()));
    assert_eq!(rig.metrics.expired.get(), 2);
    assert_eq!(rig.metrics.learned.get(), 0);

    let rig = self::rig(vec![up.addr], 5, 3600);
    ask(&rig, "api.example.test.", RecordType::A, &from_agent1()).await;
    ask(&rig, "img.cdn.example.test.", RecordType::A, &from_agent1()).await;
    // The new policy drops the wildcard and port 80.
    let narrower = POLICY
        .replace("\"*.cdn.example.test\", ", "")
        .replace("ports = \"80\"", "ports = \"443\"");
    let policy = crate::policy::parse("policy.toml", &narrower).unwrap();
    rig.policy.send_replace(Some(Arc::new(policy)));
    let current = rig.resolver.policy.borrow().clone();
    rig.resolver.reconcile(current.as_deref());
    rig.resolver.with_state(|_, sink| {
        assert_eq!(
            sink.entries.keys().collect::<Vec<_>>(),
            vec![&(1, "192.0.2.10".parse::<IpAddr>().unwrap())]
        );
        assert_eq!(sink.entries.values().next().unwrap().1, vec![TCP443]);
    });
    // No policy at all (ours was rejected at start-up): everything is withdrawn, and
    // queries are refused.
    rig.policy.send_replace(None);
    rig.resolver.reconcile(None);
    rig.resolver
        .with_state(|_, sink| assert!(sink.entries.is_empty()));
    let answer = ask(&rig, "api.example.test.", RecordType::A, &from_agent1()).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn the_sweeper_withdraws_on_time_and_follows_the_policy() {
    let up = Upstream::start(table(), &[]).await;
    let rig = Arc::new(rig(vec![up.addr], 1, 0));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let maintain = {
        let rig = rig.clone();
        tokio::spawn(async move {
            rig.resolver
                .maintain(async move {
                    let _ = stop_rx.await;
                })
                .await;
        })
    };
    ask(&rig, "api.example.test.", RecordType::A, &from_agent1()).await;
    let expires = rig.resolver.with_state(|_, sink| {
        assert_eq!(sink.entries.len(), 1);
        sink.entries.values().next().unwrap().0
    });
    // Due after the 1 s grace; the sweeper wakes for it without being asked.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while rig.resolver.with_state(|_, sink| !sink.entries.is_empty()) {
        assert!(tokio::time::Instant::now() < deadline, "never withdrawn");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        net::monotonic_ns() >= expires,
        "withdrawn before its expiry"
    );
    assert_eq!(rig.metrics.expired.get(), 1);
    let _ = stop_tx.send(());
    maintain.await.unwrap();
}

/// Subdomains under agent 1's and agent 4's wildcard, one address each (`n.cdn.example.test`
/// → 192.0.2.10n), and `two.cdn.example.test` with two.
fn subdomains() -> BTreeMap<&'static str, Vec<Record>> {
    let mut table = table();
    for (name, ip) in [
        ("n1.cdn.example.test", 101),
        ("n2.cdn.example.test", 102),
        ("n3.cdn.example.test", 103),
    ] {
        table.insert(name, vec![a(&format!("{name}."), 60, [192, 0, 2, ip])]);
    }
    table.insert(
        "two.cdn.example.test",
        vec![
            a("two.cdn.example.test.", 60, [192, 0, 2, 111]),
            a("two.cdn.example.test.", 60, [192, 0, 2, 112]),
        ],
    );
    table
}

fn neighbour() -> Origin {
    from_src("10.7.0.9:1000", false)
}

#[tokio::test]
async fn an_agent_at_its_learned_cap_is_refused_and_others_are_not() {
    let up = Upstream::start(subdomains(), &[]).await;
    let mut rig = capped_rig(vec![up.addr], 5, 3600, 2);
    let code = |m: Message| m.metadata.response_code;
    assert_eq!(
        code(ask(&rig, "n1.cdn.example.test.", RecordType::A, &from_agent1()).await),
        ResponseCode::NoError
    );
    // Renewing a name it holds is no new entry.
    assert_eq!(
        code(ask(&rig, "n1.cdn.example.test.", RecordType::A, &from_agent1()).await),
        ResponseCode::NoError
    );
    rig.resolver
        .with_state(|learned, _| assert_eq!(learned.held(1), 1, "a renewal counted twice"));
    // Two new addresses with one free: the whole answer is refused, none admitted.
    assert_eq!(
        code(ask(&rig, "two.cdn.example.test.", RecordType::A, &from_agent1()).await),
        ResponseCode::Refused
    );
    assert_eq!(
        code(ask(&rig, "n2.cdn.example.test.", RecordType::A, &from_agent1()).await),
        ResponseCode::NoError
    );
    // At the cap: a renewal still answers, a new name does not.
    assert_eq!(
        code(ask(&rig, "n2.cdn.example.test.", RecordType::A, &from_agent1()).await),
        ResponseCode::NoError
    );
    let refused = ask(&rig, "n3.cdn.example.test.", RecordType::A, &from_agent1()).await;
    assert_eq!(code(refused.clone()), ResponseCode::Refused);
    assert!(refused.answers.is_empty(), "no address the agent could use");
    let n3: IpAddr = "192.0.2.103".parse().unwrap();
    rig.resolver.with_state(|learned, sink| {
        assert_eq!(learned.held(1), 2);
        assert_eq!(
            sink.entries.keys().filter(|(agent, _)| *agent == 1).count(),
            2
        );
        assert!(!sink.entries.contains_key(&(1, n3)));
    });
    assert_eq!(rig.metrics.cap_refusals("coder", 1), 2);
    assert_eq!(rig.metrics.queries("coder", 1, "refused"), 2);
    for name in ["two.cdn.example.test", "n3.cdn.example.test"] {
        let event = rig.audit.try_recv().unwrap();
        assert_eq!(
            (event.reason, event.verdict, event.agent),
            ("dns_learned_cap", "drop", 1)
        );
        assert_eq!(event.name.as_deref(), Some(name));
    }
    assert!(rig.audit.try_recv().is_err());

    // Another agent with the same wildcard (and the same cap) is not held to the first
    // one's count: the name refused to agent 1, and one agent 1 holds.
    for name in ["n3.cdn.example.test.", "n1.cdn.example.test."] {
        let answer = ask(&rig, name, RecordType::A, &neighbour()).await;
        assert_eq!(
            answer.metadata.response_code,
            ResponseCode::NoError,
            "{name}"
        );
        assert!(!answer.answers.is_empty());
    }
    rig.resolver.with_state(|learned, sink| {
        assert_eq!((learned.held(1), learned.held(4)), (2, 2));
        assert_eq!(sink.entries[&(4, n3)].1, vec![TCP443]);
    });
    assert_eq!(rig.metrics.cap_refusals("neighbour", 4), 0);
}

#[tokio::test]
async fn expired_learned_entries_free_room_under_the_cap() {
    let up = Upstream::start(subdomains(), &[]).await;
    // Grace 0 and max TTL 0: what is admitted is due at once.
    let rig = capped_rig(vec![up.addr], 0, 0, 1);
    let code = |m: Message| m.metadata.response_code;
    assert_eq!(
        code(ask(&rig, "n1.cdn.example.test.", RecordType::A, &from_agent1()).await),
        ResponseCode::NoError
    );
    assert_eq!(
        code(ask(&rig, "n2.cdn.example.test.", RecordType::A, &from_agent1()).await),
        ResponseCode::Refused
    );
    assert_eq!(rig.resolver.sweep(), 1);
    rig.resolver
        .with_state(|learned, _| assert_eq!(learned.held(1), 0));
    assert_eq!(
        code(ask(&rig, "n2.cdn.example.test.", RecordType::A, &from_agent1()).await),
        ResponseCode::NoError
    );
    rig.resolver.with_state(|_, sink| {
        assert_eq!(
            sink.entries.keys().collect::<Vec<_>>(),
            vec![&(1, "192.0.2.102".parse::<IpAddr>().unwrap())]
        );
    });
    assert_eq!(rig.metrics.cap_refusals("coder", 1), 1);
}

/// `question` with `edit` applied (hickory's `Query` is non-exhaustive).
fn edited(
    question: &hickory_proto::op::Query,
    edit: impl FnOnce(&mut hickory_proto::op::Query),
) -> hickory_proto::op::Query {
    let mut question = question.clone();
    edit(&mut question);
    question
}

#[tokio::test]
async fn upstream_queries_carry_fresh_ids_and_random_case_and_the_agent_gets_its_own_back() {
    let up = Upstream::start(table(), &[]).await;
    let rig = rig(vec![up.addr], 5, 3600);
    let over_tcp = Origin {
        tcp: true,
        ..from_agent1()
    };
    for origin in [from_agent1(), over_tcp] {
        for _ in 0..3 {
            // `ask` checks the answer carries AGENT_ID.
            let answer = ask(&rig, "Api.Example.Test.", RecordType::A, &origin).await;
            assert_eq!(answer.queries[0].name.to_ascii(), "Api.Example.Test.");
            assert_eq!(answer.answers[0].name.to_ascii(), "Api.Example.Test.");
            assert_eq!(
                answer.answers[0].data,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 10)))
            );
        }
    }
    let asked = up.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 6, "{asked:?}");
    for tcp in [false, true] {
        let (ids, names): (Vec<u16>, Vec<&str>) = asked
            .iter()
            .filter(|(_, _, t)| *t == tcp)
            .map(|(id, name, _)| (*id, name.as_str()))
            .unzip();
        // Random: any one may hit the agent's id or case by chance, not all three.
        assert!(ids.iter().any(|&id| id != AGENT_ID), "tcp {tcp}: {ids:?}");
        assert!(ids.iter().any(|&id| id != ids[0]), "tcp {tcp}: {ids:?}");
        assert!(
            names.iter().any(|&n| n != "Api.Example.Test."),
            "tcp {tcp}: {names:?}"
        );
        for name in names {
            assert!(name.eq_ignore_ascii_case("api.example.test."), "{name}");
        }
    }
    assert_eq!(
        rig.metrics.rejected("id") + rig.metrics.rejected("question"),
        0
    );
}

/// An upstream on 127.0.0.1 that answers each query with forgeries first, each carrying
/// `FORGED`, then the genuine answer with `GENUINE`: a wrong id; the right id with the
/// name's case flipped, with another type, with another class; a query instead of a
/// response; bytes that are no DNS message; and a perfect copy from another port.
/// Returns its address and the queries it got.
async fn spoofing_upstream() -> (SocketAddr, Arc<Mutex<Vec<Message>>>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let other_port = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let seen = asked.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok((len, from)) = socket.recv_from(&mut buf).await {
            let query = Message::from_vec(&buf[..len]).unwrap();
            seen.lock().unwrap().push(query.clone());
            let answer = |id: u16, question: hickory_proto::op::Query, ip: [u8; 4]| {
                let mut m = Message::response(id, query.metadata.op_code);
                m.add_answer(a(&question.name.to_ascii(), 60, ip));
                m.add_query(question);
                m
            };
            let (id, question) = (query.metadata.id, query.queries[0].clone());
            let flipped = {
                let text: String = question
                    .name
                    .to_ascii()
                    .chars()
                    .map(|c| match c {
                        c if c.is_ascii_lowercase() => c.to_ascii_uppercase(),
                        c => c.to_ascii_lowercase(),
                    })
                    .collect();
                edited(&question, |q| q.name = n(&text))
            };
            let other_type = edited(&question, |q| q.query_type = RecordType::AAAA);
            let other_class = edited(&question, |q| {
                q.query_class = hickory_proto::rr::DNSClass::CH
            });
            let mut not_a_response = answer(id, question.clone(), FORGED);
            not_a_response.metadata.message_type = hickory_proto::op::MessageType::Query;
            for forged in [
                answer(id ^ 1, question.clone(), FORGED),
                answer(id, flipped, FORGED),
                answer(id, other_type, FORGED),
                answer(id, other_class, FORGED),
                not_a_response,
            ] {
                socket
                    .send_to(&forged.to_vec().unwrap(), from)
                    .await
                    .unwrap();
            }
            socket.send_to(&[0x12], from).await.unwrap();
            let copy = answer(id, question.clone(), FORGED).to_vec().unwrap();
            other_port.send_to(&copy, from).await.unwrap();
            let genuine = answer(id, question, GENUINE).to_vec().unwrap();
            socket.send_to(&genuine, from).await.unwrap();
        }
    });
    (addr, asked)
}

const GENUINE: [u8; 4] = [192, 0, 2, 10];
const FORGED: [u8; 4] = [203, 0, 113, 66];

#[tokio::test]
async fn forged_upstream_answers_are_rejected_and_only_the_genuine_address_is_admitted() {
    let (upstream, asked) = spoofing_upstream().await;
    let rig = rig(vec![upstream], 5, 3600);
    let answer = ask(&rig, "api.example.test.", RecordType::A, &from_agent1()).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert_eq!(answer.queries[0].name.to_ascii(), "api.example.test.");
    assert_eq!(
        answer
            .answers
            .iter()
            .map(|r| r.data.clone())
            .collect::<Vec<_>>(),
        vec![RData::A(A(Ipv4Addr::from(GENUINE)))]
    );
    rig.resolver.with_state(|_, sink| {
        assert_eq!(
            sink.entries.keys().collect::<Vec<_>>(),
            vec![&(1, IpAddr::from(GENUINE))],
            "the forged address is not admitted"
        );
    });
    // The copy from another port never reaches the resolver: its socket is connected.
    for (reason, count) in [
        ("id", 1),
        ("question", 3),
        ("not_a_response", 1),
        ("malformed", 1),
        ("source", 0),
    ] {
        assert_eq!(rig.metrics.rejected(reason), count, "{reason}");
    }
    let asked = asked.lock().unwrap();
    assert_eq!(
        asked.len(),
        1,
        "one query: the forgeries did not end the wait"
    );
    assert_eq!(asked[0].queries[0].query_type, RecordType::A);
}

mod matching {
    use hickory_proto::{
        op::{MessageType, OpCode, Query as Question},
        rr::DNSClass,
    };

    use super::*;
    use crate::dns::message::{Rejected, UpstreamQuery, restore};

    const AGENT: &str = "api.Example.test.";

    fn agent_query() -> Vec<u8> {
        query_bytes(AGENT_ID, AGENT, RecordType::A)
    }

    /// Every letter's case from alternating 0x00 (upper) and 0x20 (lower).
    fn alternating() -> Vec<u8> {
        (0..255)
            .map(|i| if i % 2 == 0 { 0x00 } else { 0x20 })
            .collect()
    }

    fn answer_to(id: u16, question: Question) -> Message {
        let mut m = Message::response(id, OpCode::Query);
        m.add_answer(a(&question.name.to_ascii(), 60, GENUINE));
        m.add_query(question);
        m
    }

    #[test]
    fn an_upstream_query_changes_only_the_id_and_the_case_of_the_name() {
        let agent = agent_query();
        let asked = UpstreamQuery::new(&agent, 0x1234, Some(&alternating())).unwrap();
        assert_eq!(asked.id, 0x1234);
        assert_eq!(asked.bytes[..2], [0x12, 0x34]);
        // By offset in the name on the wire, length octets included: 1 `a` odd (lower),
        // 2 `p` even (upper), ...
        assert_eq!(asked.question.name.to_ascii(), "aPi.eXaMpLe.tEsT.");
        assert_eq!(asked.bytes.len(), agent.len());
        assert_eq!(asked.bytes[2..12], agent[2..12], "flags and counts");
        let name_end = 12 + "api.example.test.".len() + 1;
        assert_eq!(
            asked.bytes[name_end..],
            agent[name_end..],
            "type, class, EDNS"
        );
        assert!(asked.exact_case);

        let plain = UpstreamQuery::new(&agent, 0x1234, None).unwrap();
        assert_eq!(plain.question.name.to_ascii(), AGENT);
        assert_eq!(plain.bytes[2..], agent[2..]);
        assert!(!plain.exact_case);
    }

    #[test]
    fn an_answer_must_echo_the_id_and_the_question_byte_for_byte() {
        let asked = UpstreamQuery::new(&agent_query(), 0x1234, Some(&alternating())).unwrap();
        let question = asked.question.clone();
        assert_eq!(asked.check(&answer_to(0x1234, question.clone())), Ok(()));
        assert_eq!(
            asked.check(&answer_to(AGENT_ID, question.clone())),
            Err(Rejected::Id),
            "the agent's id is not the one asked"
        );
        let lower = edited(&question, |q| q.name = n("api.example.test."));
        assert_eq!(
            asked.check(&answer_to(0x1234, lower.clone())),
            Err(Rejected::Question),
            "under 0x20 the case must be the one sent"
        );
        for other in [
            edited(&question, |q| q.query_type = RecordType::AAAA),
            edited(&question, |q| q.query_class = DNSClass::CH),
            edited(&question, |q| q.name = n("api.example.test.evil.")),
        ] {
            assert_eq!(
                asked.check(&answer_to(0x1234, other.clone())),
                Err(Rejected::Question),
                "{other:?}"
            );
        }
        let mut none = answer_to(0x1234, question.clone());
        none.queries.clear();
        assert_eq!(asked.check(&none), Err(Rejected::Question));
        let mut two = answer_to(0x1234, question.clone());
        two.add_query(question.clone());
        assert_eq!(asked.check(&two), Err(Rejected::Question));
        let mut query = answer_to(0x1234, question);
        query.metadata.message_type = MessageType::Query;
        assert_eq!(asked.check(&query), Err(Rejected::NotAResponse));

        // Without 0x20 the case is not part of the match.
        let plain = UpstreamQuery::new(&agent_query(), 0x1234, None).unwrap();
        assert_eq!(plain.check(&answer_to(0x1234, lower)), Ok(()));
    }

    #[test]
    fn the_agent_gets_its_id_and_question_back_in_its_own_case() {
        let agent = message::parse_query(&agent_query()).unwrap().message;
        let asked = UpstreamQuery::new(&agent_query(), 0x1234, Some(&alternating())).unwrap();
        let mut answer = answer_to(0x1234, asked.question.clone());
        // hickory compresses the record's owner name to a pointer at the question.
        let mut raw = answer.to_vec().unwrap();
        restore(&mut answer, &mut raw, &agent);
        for restored in [answer, Message::from_vec(&raw).unwrap()] {
            assert_eq!(restored.metadata.id, AGENT_ID);
            assert_eq!(restored.queries[0].name.to_ascii(), AGENT);
            assert_eq!(restored.answers[0].name.to_ascii(), AGENT);
            assert_eq!(restored.queries, agent.queries);
        }
    }
}
