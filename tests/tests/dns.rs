//! The per-agent DNS resolver end to end: the real daemon in the lab's gateway answers the
//! agent (real `dig`) from dnsmasq in the server namespace, admits the answers' addresses
//! in the kernel until TTL + grace, refuses names no rule allows, and the XDP program drops
//! the agent's DNS to anywhere else.
//!
//! dnsmasq runs with `--no-resolv --no-hosts --conf-file=/dev/null`, bound to the server
//! namespace's address only: it reads nothing of the host's and answers only the names the
//! test gives it. One test puts a forging upstream of its own in dnsmasq's place.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, UdpSocket},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use enforcer::lab::{self, ChildGuard, Netns, TcpEchoServer};
use enforcer_common::Reason;
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RData, Record, RecordType, rdata::A},
};
use integration_tests::{Lab, PUBLIC, SERVER_V4, sa};

/// Where the daemon's resolver listens (on the gateway's loopback).
const RESOLVER: &str = "10.200.0.53";
/// dnsmasq's TTL for every name it serves, in seconds.
const TTL: u32 = 4;
/// The resolver's grace after a TTL, in seconds.
const GRACE: u32 = 1;
/// A port outside `tls_ports`, so connections to admitted addresses are not SNI-checked.
const PORT: u16 = 8080;

const POLICY: &str = r#"
[[agents]]
id = 1
name = "coder"
interfaces = ["gwa1"]

[[agents.egress]]
action = "allow"
to = ["api.example.test", "*.cdn.example.test"]
proto = "tcp"
ports = "8080"

[[agents.egress]]
action = "allow"
to = ["api.example.test"]
proto = "tcp"
ports = "443"
"#;

/// The lab with the resolver configured and dnsmasq serving in the server namespace.
struct DnsLab {
    // Field order: dnsmasq and the echo server stop before the lab's namespaces go.
    _dnsmasq: Option<ChildGuard>,
    _echo: TcpEchoServer,
    lab: Lab,
}

impl DnsLab {
    fn start() -> DnsLab {
        Self::start_with_dnsmasq(true)
    }

    /// Without dnsmasq the test serves `SERVER_V4:53`, the configured upstream, itself.
    fn start_with_dnsmasq(dnsmasq: bool) -> DnsLab {
        Self::build(1, dnsmasq, "", POLICY)
    }

    /// `agents` agents under `policy`, with `dns_extra` appended to the `[dns]` section.
    fn build(agents: usize, dnsmasq: bool, dns_extra: &str, policy: &str) -> DnsLab {
        let mut lab = Lab::new(agents);
        lab::add_address(&lab.gw, "lo", &format!("{RESOLVER}/32")).unwrap();
        let mut config = fs::read_to_string(lab.config_path()).unwrap();
        config.push_str(&format!(
            "\n[dns]\nlisten = [\"{RESOLVER}:53\"]\nupstreams = [\"{SERVER_V4}:53\"]\ngrace_secs = {GRACE}\nmax_ttl_secs = 3600\n{dns_extra}"
        ));
        fs::write(lab.config_path(), config).unwrap();
        lab.write_policy(policy);
        let dnsmasq = dnsmasq.then(|| start_dnsmasq(&lab.server, &lab.dir));
        let echo = TcpEchoServer::spawn(&lab.server, sa("0.0.0.0", PORT)).unwrap();
        lab.start_daemon();
        DnsLab {
            _dnsmasq: dnsmasq,
            _echo: echo,
            lab,
        }
    }

    fn agent(&self) -> &Netns {
        self.lab.agent(1)
    }

    /// Whether a TCP round trip from the agent to `ip:PORT` gets through.
    fn reaches(&self, ip: &str) -> bool {
        lab::tcp_probe(self.agent(), sa(ip, PORT), Duration::from_secs(2))
    }

    /// One sample of a metric from the daemon's `/metrics` (in the gateway namespace).
    fn metric(&self, series: &str) -> f64 {
        let out = self
            .lab
            .gw
            .command("curl")
            .args(["-sf", "http://127.0.0.1:9464/metrics"])
            .output()
            .unwrap();
        assert!(out.status.success(), "fetching /metrics: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }
}

/// The agent namespace's resolv.conf, pointing at the enforcer's resolver:
/// `ip netns exec` bind-mounts `/etc/netns/NAME/resolv.conf` over `/etc/resolv.conf`, so
/// curl in the agent resolves through the resolver. Removed on drop.
struct NetnsResolvConf(std::path::PathBuf);

impl NetnsResolvConf {
    fn new(ns: &Netns) -> Self {
        let dir = std::path::Path::new("/etc/netns").join(ns.name());
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {RESOLVER}\noptions timeout:2 attempts:1\n"),
        )
        .unwrap();
        NetnsResolvConf(dir)
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
        let _ = fs::remove_dir(self.0.parent().unwrap());
    }
}

/// `openssl s_server` in the server namespace on port 443 with one self-signed
/// certificate for both names: two names, one address, as behind a CDN.
fn start_https(lab: &Lab) -> ChildGuard {
    let (cert, key) = (lab.dir.join("cert.pem"), lab.dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=api.example.test"])
        .args([
            "-addext",
            "subjectAltName=DNS:api.example.test,DNS:other.example.test",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "openssl req: {made:?}");
    let child = lab
        .server
        .command("openssl")
        .args(["s_server", "-quiet", "-www", "-accept", "443"])
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let guard = ChildGuard::new(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lab::try_in_netns(&lab.server, || {
        std::net::TcpStream::connect((SERVER_V4, 443)).is_ok()
    })
    .unwrap()
    {
        assert!(Instant::now() < deadline, "s_server did not listen in 20 s");
        thread::sleep(Duration::from_millis(50));
    }
    guard
}

/// `curl https://NAME/` from the agent (certificate not verified: the test is about
/// what reaches the server); whether it got an HTTP answer.
fn curl(ns: &Netns, name: &str, extra: &[&str]) -> bool {
    ns.command("curl")
        .args(["-sk", "-o", "/dev/null", "--max-time", "5"])
        .args(extra)
        .arg(format!("https://{name}/"))
        .status()
        .unwrap()
        .success()
}

fn start_dnsmasq(server: &Netns, dir: &std::path::Path) -> ChildGuard {
    let child = server
        .command("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={SERVER_V4}"),
            "--port=53",
            &format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
            &format!("--local-ttl={TTL}"),
            // Several names on one address, as behind a CDN.
            &format!("--host-record=api.example.test,{SERVER_V4}"),
            &format!("--host-record=other.example.test,{SERVER_V4}"),
            &format!("--host-record=img.cdn.example.test,{PUBLIC}"),
            // Every name under flood.test, as a wildcard zone would answer.
            &format!("--address=/flood.test/{PUBLIC}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq (cargo xtask setup installs dnsmasq-base)");
    let mut guard = ChildGuard::new(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while dig(server, SERVER_V4, &["api.example.test", "+short"]).trim() != SERVER_V4 {
        if let Ok(Some(exit)) = guard.wait_timeout(Duration::ZERO) {
            panic!("dnsmasq exited: {exit}");
        }
        assert!(Instant::now() < deadline, "dnsmasq did not answer in 20 s");
        thread::sleep(Duration::from_millis(50));
    }
    guard
}

/// `dig @server args...` inside `ns`, one try of two seconds; stdout.
fn dig(ns: &Netns, server: &str, args: &[&str]) -> String {
    let out = ns
        .command("dig")
        .arg(format!("@{server}"))
        .args(["+tries=1", "+time=2"])
        .args(args)
        .output()
        .expect("dig (cargo xtask setup installs bind9-dnsutils)");
    String::from_utf8(out.stdout).unwrap()
}

/// The `status:` of a dig answer (`NOERROR`, `REFUSED`, ...), `None` when none came.
fn status(ns: &Netns, server: &str, args: &[&str]) -> Option<String> {
    let out = dig(ns, server, &[args, &["+noall", "+comments"]].concat());
    let line = out.lines().find(|l| l.contains("status: "))?;
    let status = line.split("status: ").nth(1)?.split(',').next()?;
    Some(status.to_string())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_answer_admits_its_address_until_ttl_plus_grace() {
    if !lab::require_root("an_answer_admits_its_address_until_ttl_plus_grace") {
        return;
    }
    let lab = DnsLab::start();
    assert!(
        !lab.reaches(SERVER_V4),
        "no rule admits the server's address before a DNS answer"
    );

    let answer = dig(lab.agent(), RESOLVER, &["api.example.test", "A", "+short"]);
    assert_eq!(answer.trim(), SERVER_V4, "answered through the resolver");
    assert!(
        lab.reaches(SERVER_V4),
        "the answer's address is admitted on the rule's port"
    );
    assert_eq!(lab.metric("enforcer_dns_learned_entries"), 1.0);
    assert_eq!(
        lab.metric(
            "enforcer_dns_queries_total{agent=\"coder\",agent_id=\"1\",outcome=\"answered\"}"
        ),
        1.0
    );

    // TTL + grace later the sweeper withdraws it and the same connection is dropped.
    wait_until("the admitted address expiring", || !lab.reaches(SERVER_V4));
    assert_eq!(lab.metric("enforcer_dns_learned_entries"), 0.0);
    assert_eq!(lab.metric("enforcer_dns_learned_expired_total"), 1.0);

    // Over TCP too (identity from the interface whose subnet holds the peer), and again
    // admitted.
    let answer = dig(
        lab.agent(),
        RESOLVER,
        &["api.example.test", "A", "+tcp", "+short"],
    );
    assert_eq!(answer.trim(), SERVER_V4);
    assert!(lab.reaches(SERVER_V4));
}

#[test]
fn a_wildcard_rule_admits_a_subdomain() {
    if !lab::require_root("a_wildcard_rule_admits_a_subdomain") {
        return;
    }
    let lab = DnsLab::start();
    assert!(!lab.reaches(PUBLIC));
    let answer = dig(
        lab.agent(),
        RESOLVER,
        &["img.cdn.example.test", "A", "+short"],
    );
    assert_eq!(answer.trim(), PUBLIC);
    assert!(lab.reaches(PUBLIC));
    // The bare suffix is not covered by `*.cdn.example.test`.
    assert_eq!(
        status(lab.agent(), RESOLVER, &["cdn.example.test", "A"]).as_deref(),
        Some("REFUSED")
    );
}

#[test]
fn denied_names_are_refused_and_direct_dns_is_dropped() {
    if !lab::require_root("denied_names_are_refused_and_direct_dns_is_dropped") {
        return;
    }
    let lab = DnsLab::start();
    // Same address as an allowed name, but not allowed: refused, audited, not admitted.
    assert_eq!(
        status(lab.agent(), RESOLVER, &["other.example.test", "A"]).as_deref(),
        Some("REFUSED")
    );
    assert!(!lab.reaches(SERVER_V4));
    assert_eq!(
        lab.metric(
            "enforcer_dns_queries_total{agent=\"coder\",agent_id=\"1\",outcome=\"refused\"}"
        ),
        1.0
    );
    let log = lab.lab.dir.join("audit.jsonl");
    wait_until("the refusal in the audit log", || {
        fs::read_to_string(&log).is_ok_and(|t| {
            t.lines().any(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["reason"] == "dns_refused"
                    && v["source"] == "dns"
                    && v["verdict"] == "drop"
                    && v["agent"] == 1
                    && v["name"] == "other.example.test"
            })
        })
    });
    // HTTPS records never reach a name-restricted agent: NODATA.
    let https = dig(
        lab.agent(),
        RESOLVER,
        &[
            "api.example.test",
            "TYPE65",
            "+noall",
            "+comments",
            "+answer",
        ],
    );
    assert!(https.contains("status: NOERROR"), "{https}");
    assert!(
        !https.contains("IN\tHTTPS") && !https.contains("TYPE65\t"),
        "{https}"
    );

    // The agent asking dnsmasq directly: dropped in XDP, over UDP and TCP.
    let before = lab
        .lab
        .maps()
        .counter(1, Reason::DnsBypass)
        .unwrap()
        .packets;
    assert_eq!(
        status(lab.agent(), SERVER_V4, &["api.example.test", "A"]),
        None
    );
    assert_eq!(
        status(lab.agent(), SERVER_V4, &["api.example.test", "A", "+tcp"]),
        None
    );
    let after = lab
        .lab
        .maps()
        .counter(1, Reason::DnsBypass)
        .unwrap()
        .packets;
    assert!(
        after >= before + 2,
        "dns_bypass counted {before} -> {after}"
    );
    // While through the resolver the same name resolves.
    let answer = dig(lab.agent(), RESOLVER, &["api.example.test", "A", "+short"]);
    assert_eq!(answer.trim(), SERVER_V4);
}

#[test]
fn https_by_name_passes_and_another_name_on_the_same_address_is_dropped_at_sni() {
    if !lab::require_root(
        "https_by_name_passes_and_another_name_on_the_same_address_is_dropped_at_sni",
    ) {
        return;
    }
    let lab = DnsLab::start();
    let _resolv = NetnsResolvConf::new(lab.agent());
    let _https = start_https(&lab.lab);
    // curl resolves through the enforcer's resolver (the agent's resolv.conf), which
    // admits the address for port 443 before curl connects.
    assert!(
        curl(lab.agent(), "api.example.test", &[]),
        "allowed name over HTTPS"
    );
    let handshake = lab
        .agent()
        .command("openssl")
        .args(["s_client", "-connect", &format!("{SERVER_V4}:443")])
        .args(["-servername", "api.example.test", "-brief"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        handshake.status.success(),
        "s_client with the allowed name: {handshake:?}"
    );

    // Another name on the same, now admitted, address: its ClientHello is dropped.
    let before = lab
        .lab
        .maps()
        .counter(1, Reason::SniDenied)
        .unwrap()
        .packets;
    assert!(!curl(
        lab.agent(),
        "other.example.test",
        &["--resolve", &format!("other.example.test:443:{SERVER_V4}")]
    ));
    let after = lab
        .lab
        .maps()
        .counter(1, Reason::SniDenied)
        .unwrap()
        .packets;
    assert!(after > before, "sni_denied counted {before} -> {after}");
    // And its name is refused by the resolver in the first place.
    assert!(!curl(lab.agent(), "other.example.test", &[]));
}

/// The id the agent gives its own queries in the spoofing test.
const AGENT_ID: u16 = 0x4242;

/// An upstream at `SERVER_V4:53` (the resolver's configured one, in dnsmasq's place) that
/// answers every query first with forgeries that put [`PUBLIC`] under the name asked, then
/// with the genuine answer, [`SERVER_V4`]: what an accomplice spraying answers at the
/// resolver would try, made easy by sending them after each query. The forgeries: the
/// wrong id; the right id with the name's letter case flipped; the right id with another
/// query type; and a perfect copy from another port of the server.
struct SpoofingUpstream {
    stop: Arc<AtomicBool>,
    asked: Arc<Mutex<Vec<Message>>>,
    thread: Option<thread::JoinHandle<()>>,
}

/// Forgeries per query that reach the resolver's socket (the copy from another port is
/// dropped by the kernel: the socket is connected to the upstream).
const FORGERIES_DELIVERED: u64 = 3;

impl SpoofingUpstream {
    fn spawn(server: &Netns) -> SpoofingUpstream {
        let (socket, other_port) = lab::in_netns(server, || {
            (
                UdpSocket::bind(sa(SERVER_V4, 53)).unwrap(),
                UdpSocket::bind(sa(SERVER_V4, 0)).unwrap(),
            )
        });
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let thread = thread::spawn({
            let (stop, asked) = (stop.clone(), asked.clone());
            move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let query = Message::from_vec(&buf[..len]).unwrap();
                    asked.lock().unwrap().push(query.clone());
                    let (id, question) = (query.metadata.id, query.queries[0].clone());
                    let flipped = Name::from_ascii(flip_case(&question.name.to_ascii())).unwrap();
                    let mut other_type = question.clone();
                    other_type.query_type = RecordType::AAAA;
                    let mut flipped_question = question.clone();
                    flipped_question.name = flipped;
                    for forged in [
                        answer(id ^ 0x8000, &question, PUBLIC),
                        answer(id, &flipped_question, PUBLIC),
                        answer(id, &other_type, PUBLIC),
                    ] {
                        socket.send_to(&forged, from).unwrap();
                    }
                    other_port
                        .send_to(&answer(id, &question, PUBLIC), from)
                        .unwrap();
                    socket
                        .send_to(&answer(id, &question, SERVER_V4), from)
                        .unwrap();
                }
            }
        });
        SpoofingUpstream {
            stop,
            asked,
            thread: Some(thread),
        }
    }

    /// The queries it got, in order.
    fn asked(&self) -> Vec<Message> {
        self.asked.lock().unwrap().clone()
    }
}

impl Drop for SpoofingUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn flip_case(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_lowercase() {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// A response with `id` and `question`, giving `ip` for the question's name.
fn answer(id: u16, question: &Query, ip: &str) -> Vec<u8> {
    let mut m = Message::response(id, OpCode::Query);
    m.metadata.recursion_available = true;
    m.add_query(question.clone());
    let ip: Ipv4Addr = ip.parse().unwrap();
    m.add_answer(Record::from_rdata(
        question.name.clone(),
        TTL,
        RData::A(A(ip)),
    ));
    m.to_vec().unwrap()
}

/// The agent's own query, id [`AGENT_ID`], for `name` (type A) to the resolver over UDP;
/// the answer it gets.
fn ask_as_agent(ns: &Netns, name: &str) -> Message {
    let mut query = Message::new(AGENT_ID, MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let bytes = query.to_vec().unwrap();
    let answer = lab::in_netns(ns, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        socket.connect(sa(RESOLVER, 53)).unwrap();
        socket.send(&bytes).unwrap();
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("an answer from the resolver");
        buf[..n].to_vec()
    });
    Message::from_vec(&answer).unwrap()
}

#[test]
fn forged_upstream_answers_are_rejected_and_only_the_genuine_address_is_admitted() {
    if !lab::require_root(
        "forged_upstream_answers_are_rejected_and_only_the_genuine_address_is_admitted",
    ) {
        return;
    }
    let lab = DnsLab::start_with_dnsmasq(false);
    let upstream = SpoofingUpstream::spawn(&lab.lab.server);
    assert!(!lab.reaches(SERVER_V4) && !lab.reaches(PUBLIC));

    // Twice, the same id from the agent each time: the resolver's ids are its own.
    const ASKED: &str = "Api.Example.Test.";
    for _ in 0..2 {
        let answer = ask_as_agent(lab.agent(), ASKED);
        let addresses: Vec<IpAddr> = answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })
            .collect();
        assert_eq!(
            addresses,
            vec![SERVER_V4.parse::<IpAddr>().unwrap()],
            "the genuine answer, not a forged one"
        );
        assert_eq!(answer.metadata.id, AGENT_ID, "the agent's id comes back");
        assert_eq!(
            answer.queries[0].name.to_ascii(),
            ASKED,
            "the agent's question comes back, in its own case"
        );
    }

    let learned: Vec<(u32, IpAddr)> = lab
        .lab
        .maps()
        .learned_names()
        .unwrap()
        .into_iter()
        .map(|(agent, addr, _)| (agent, addr))
        .collect();
    assert_eq!(learned, vec![(1, SERVER_V4.parse().unwrap())]);
    assert!(lab.reaches(SERVER_V4), "the genuine address is admitted");
    assert!(!lab.reaches(PUBLIC), "the forged address is not");

    let asked = upstream.asked();
    assert_eq!(
        asked.len(),
        2,
        "one upstream query per agent query: no forgery ended a wait"
    );
    let ids: Vec<u16> = asked.iter().map(|q| q.metadata.id).collect();
    // Random ids: one may equal the agent's by chance, both only once in 2^32 runs.
    assert!(ids.iter().any(|&id| id != AGENT_ID), "upstream saw {ids:?}");
    for q in &asked {
        let name = q.queries[0].name.to_ascii();
        assert!(name.eq_ignore_ascii_case(ASKED), "{name}");
    }
    let rejected: f64 = ["id", "question", "source", "not_a_response", "malformed"]
        .iter()
        .map(|reason| {
            lab.metric(&format!(
                "enforcer_dns_upstream_answers_rejected_total{{reason=\"{reason}\"}}"
            ))
        })
        .sum();
    assert_eq!(rejected, (2 * FORGERIES_DELIVERED) as f64);
    assert_eq!(
        lab.metric("enforcer_dns_upstream_answers_rejected_total{reason=\"id\"}"),
        2.0
    );
}

#[test]
fn an_agent_flooding_subdomains_hits_its_learned_cap_while_another_still_resolves() {
    if !lab::require_root(
        "an_agent_flooding_subdomains_hits_its_learned_cap_while_another_still_resolves",
    ) {
        return;
    }
    let policy = r#"
[[agents]]
id = 1
name = "flooder"
interfaces = ["gwa1"]

[[agents.egress]]
action = "allow"
to = ["*.flood.test"]
proto = "tcp"
ports = "8080"

[[agents]]
id = 2
name = "neighbour"
interfaces = ["gwa2"]

[[agents.egress]]
action = "allow"
to = ["*.flood.test"]
proto = "tcp"
ports = "8080"
"#;
    let lab = DnsLab::build(2, true, "max_learned_per_agent = 3\n", policy);
    let (flooder, neighbour) = (lab.lab.agent(1), lab.lab.agent(2));
    // Well within TTL + grace (5 s), so nothing expires to make room meanwhile.
    for i in 1..=3 {
        let name = format!("x{i}.flood.test");
        assert_eq!(
            status(flooder, RESOLVER, &[&name, "A"]).as_deref(),
            Some("NOERROR"),
            "{name}"
        );
    }
    // Asked again, a held name is renewed, not counted again.
    assert_eq!(
        status(flooder, RESOLVER, &["x1.flood.test", "A"]).as_deref(),
        Some("NOERROR")
    );
    assert_eq!(
        status(flooder, RESOLVER, &["x4.flood.test", "A"]).as_deref(),
        Some("REFUSED")
    );
    assert_eq!(
        lab.metric("enforcer_dns_learned_cap_refusals_total{agent=\"flooder\",agent_id=\"1\"}"),
        1.0
    );
    // The other agent's names still resolve and are admitted in the kernel.
    assert_eq!(
        dig(neighbour, RESOLVER, &["x4.flood.test", "A", "+short"]).trim(),
        PUBLIC
    );
    assert!(lab::tcp_probe(
        neighbour,
        sa(PUBLIC, PORT),
        Duration::from_secs(2)
    ));
    assert_eq!(
        lab.metric("enforcer_dns_learned_cap_refusals_total{agent=\"neighbour\",agent_id=\"2\"}"),
        0.0
    );
    let log = lab.lab.dir.join("audit.jsonl");
    wait_until("the cap refusal in the audit log", || {
        fs::read_to_string(&log).is_ok_and(|t| {
            t.lines().any(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["reason"] == "dns_learned_cap" && v["agent"] == 1 && v["name"] == "x4.flood.test"
            })
        })
    });
}
