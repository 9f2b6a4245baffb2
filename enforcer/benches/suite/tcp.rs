//! Section 6, TCP bulk from an agent's sandbox: what an agent's downloads and uploads see.
//! An agent namespace opens one or four TCP connections over its veth to the host side and
//! writes as fast as it can; a reader on the host side counts what arrives. The enforcer
//! sits on the host-side veth at tc (what `hook = "auto"` gives a veth) or at XDP (what a
//! NIC gets), beside no filter and an nftables ingress chain doing the same allow-listing.
//!
//! Any XDP program on a veth takes software GSO/TSO away from the peer (`veth_xdp_set`),
//! so the agent's stack cuts every segment itself; tc keeps it. The result records the
//! agent side's TSO as the kernel reports it during each configuration.
//!
//! The limited case puts a bytes/s limit on the agent and checks what the limiter lets
//! through while TSO hands it 64 KiB super-packets: the wire bytes it counted as passed per
//! second, and the goodput the reader saw turned into wire bytes, each against the limit.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use enforcer::{
    dataplane::{
        AttachMode, Dataplane, HookChoice, KernelMaps,
        compile::{self, Compiled, Limits},
    },
    lab::{self, BpffsMount, Netns},
    policy,
};
use enforcer_common::Reason;
use serde::{Deserialize, Serialize};

use super::{
    bed::{ETHTOOL_GTSO, offload},
    common::{Stat, check_interrupted, in_ns},
};

/// The configurations, in report order.
pub const CONFIGS: [&str; 4] = ["no_filter", "enforcer_tc", "enforcer_xdp", "nftables"];
/// Parallel connections per measurement.
pub const STREAMS: [usize; 2] = [1, 4];
/// The limited case's byte rate: 1 Gbit/s of Ethernet frames.
pub const LIMIT_BYTES_PER_SEC: u64 = 125_000_000;

const AGENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 1);
const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 2);
const PORT: u16 = 5201;
/// Bytes per `write`: what a bulk sender hands its socket at once.
const WRITE_BYTES: usize = 128 * 1024;
/// An Ethernet frame of a full TCP segment on a 1500-byte MTU, and the payload it carries
/// (Linux sends TCP timestamps: 12 bytes of options).
const FULL_FRAME: f64 = 1514.0;
const FULL_PAYLOAD: f64 = 1448.0;

/// What each configuration is, for the report.
pub fn describe(config: &str) -> &'static str {
    match config {
        "no_filter" => "no program, no rules",
        "enforcer_tc" => {
            "the enforcer at tc ingress of the host-side veth (`hook = \"tc\"`, what `auto` picks for a veth)"
        }
        "enforcer_xdp" => {
            "the enforcer at XDP, native mode, on the host-side veth (`hook = \"xdp\"`)"
        }
        "nftables" => {
            "nftables netdev ingress on the host-side veth: the agent's source set, its one allowed destination and port, a per-source byte meter at 10,000 Mbytes/s (80 Gbit/s, the most nft takes), far above the flow"
        }
        _ => "",
    }
}

/// One configuration with one number of connections, over all rounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TcpResult {
    /// Configuration (see [`CONFIGS`]).
    pub config: String,
    /// Parallel connections.
    pub streams: usize,
    /// Goodput the host-side reader received, Gbit/s.
    pub gbit_s: Stat,
    /// Whether the agent side's TSO was on while this configuration ran.
    pub agent_tso: bool,
}

/// The limited case at one hook, over all rounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TcpLimited {
    /// `tc` or `xdp`.
    pub hook: String,
    /// The agent's limit (bytes/s of Ethernet frames).
    pub limit_bytes_per_sec: u64,
    /// Wire bytes the enforcer counted as passed per second, over the limit.
    pub counted_ratio: Stat,
    /// Goodput turned into full-size Ethernet frames ([`FULL_FRAME`] per [`FULL_PAYLOAD`]
    /// bytes of payload) per second, over the limit: a check of the counting that does not
    /// rely on it (retransmissions and ACK-only segments make it a lower bound).
    pub goodput_wire_ratio: Stat,
}

/// Everything the section measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TcpSection {
    /// Measuring window per sample (ms), after a warm-up.
    pub window_ms: u64,
    /// Interleaved rounds.
    pub rounds: usize,
    /// Bulk throughput per configuration and number of connections.
    pub results: Vec<TcpResult>,
    /// The limited case, at tc and at XDP.
    pub limited: Vec<TcpLimited>,
}

/// The agent and host namespaces, their veth, the enforcer and the listener.
struct TcpBed {
    agent: Netns,
    host: Netns,
    agent_if: String,
    host_if: String,
    listener: TcpListener,
    dp: Dataplane,
    open: Compiled,
    limited: Compiled,
    nft_file: std::path::PathBuf,
    pins: BpffsMount,
}

fn policy_text(bytes_per_sec: u64) -> String {
    format!(
        "[[agents]]\nid = 1\nname = \"bulk\"\nprefixes = [\"{AGENT_ADDR}/32\"]\negress_default = \"deny\"\n\
         rate = {{ bytes_per_sec = {bytes_per_sec} }}\n\
         [[agents.egress]]\naction = \"allow\"\nproto = \"tcp\"\nports = \"{PORT}\"\nto = [\"{HOST_ADDR}\"]\n"
    )
}

fn compile_for(bytes_per_sec: u64, limits: &Limits) -> Compiled {
    let p = policy::parse("tcp.toml", &policy_text(bytes_per_sec)).expect("parsing");
    compile::compile(&p, limits, &|_| None).expect("compiling")
}

fn nft_ruleset(ifname: &str) -> String {
    format!(
        "table netdev enfbench_tcp {{\n\
         \tset agents {{ type ipv4_addr; elements = {{ {AGENT_ADDR} }} }}\n\
         \tset rates {{ type ipv4_addr; size 65536; flags dynamic,timeout; timeout 1m; }}\n\
         \tchain ingress {{\n\
         \t\ttype filter hook ingress device \"{ifname}\" priority 0; policy accept;\n\
         \t\tip saddr != @agents counter drop\n\
         \t\tip daddr != {HOST_ADDR} counter drop\n\
         \t\ttcp dport != {PORT} counter drop\n\
         \t\tupdate @rates {{ ip saddr limit rate over 10000 mbytes/second }} counter drop\n\
         \t\tcounter accept\n\
         \t}}\n\
         }}\n"
    )
}

impl TcpBed {
    fn new() -> TcpBed {
        let agent = Netns::create(&lab::unique_name("tagt")).expect("agent netns");
        let host = Netns::create(&lab::unique_name("thst")).expect("host netns");
        let agent_if = lab::unique_name("ta");
        let host_if = lab::unique_name("th");
        lab::veth_pair(
            &agent,
            &agent_if,
            &[&format!("{AGENT_ADDR}/24")],
            &host,
            &host_if,
            &[&format!("{HOST_ADDR}/24")],
        )
        .expect("veth pair");
        let listener = in_ns(&host, || TcpListener::bind((HOST_ADDR, PORT)))
            .expect("listening on the host side");
        let limits = Limits {
            max_agents: 16,
            max_interfaces: 16,
            max_source_prefixes: 16,
            max_destination_prefixes: 16,
            ..Limits::default()
        };
        let pins = BpffsMount::new().expect("bpffs");
        let mut dp = Dataplane::load(pins.path(), &limits).expect("loading the enforcer");
        dp.load_tc().expect("loading the tc programs");
        TcpBed {
            agent,
            host,
            agent_if,
            host_if,
            listener,
            dp,
            // A limit far above any flow: the limiter runs and never drops.
            open: compile_for(100_000_000_000, &limits),
            limited: compile_for(LIMIT_BYTES_PER_SEC, &limits),
            nft_file: std::env::temp_dir().join(format!("enfbench-tcp-{}.nft", std::process::id())),
            pins,
        }
    }

    fn attach_enforcer(&mut self, compiled: &Compiled, hook: HookChoice) {
        self.dp.apply(compiled).expect("applying");
        self.dp
            .maps()
            .reset_bucket(1)
            .expect("resetting the bucket");
        let ifname = self.host_if.clone();
        let dp = &mut self.dp;
        in_ns(&self.host, move || {
            dp.attach(&ifname, hook, AttachMode::Native)
        })
        .expect("attaching the enforcer");
    }

    fn setup(&mut self, config: &str) {
        match config {
            "no_filter" => {}
            "enforcer_tc" => self.attach_enforcer(&self.open.clone(), HookChoice::Tc),
            "enforcer_xdp" => self.attach_enforcer(&self.open.clone(), HookChoice::Xdp),
            "nftables" => {
                std::fs::write(&self.nft_file, nft_ruleset(&self.host_if)).expect("nft file");
                self.host
                    .exec(&["nft", "-f", &self.nft_file.to_string_lossy()])
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            other => panic!("unknown configuration {other}"),
        }
    }

    fn teardown(&mut self, config: &str) {
        match config {
            "enforcer_tc" | "enforcer_xdp" => {
                self.dp
                    .detach(&self.host_if)
                    .expect("detaching the enforcer");
            }
            "nftables" => {
                self.host
                    .exec(&["nft", "delete", "table", "netdev", "enfbench_tcp"])
                    .expect("deleting the nft table");
            }
            _ => {}
        }
    }

    fn agent_tso(&self) -> bool {
        let ifname = self.agent_if.clone();
        in_ns(&self.agent, move || offload(&ifname, ETHTOOL_GTSO))
    }

    /// Wire bytes the enforcer counted as passed for the agent so far.
    fn passed_bytes(&self) -> u64 {
        let maps = KernelMaps::from_pins(self.pins.path()).expect("opening pins");
        let rows = maps.counters_upto(1).expect("reading counters");
        rows.get(1)
            .map_or(0, |row| row[Reason::Allowed as usize].bytes)
    }

    /// Runs `streams` connections flat out for a warm-up and then `window`; returns the
    /// goodput (bytes/s) and, if `counted`, the passed wire bytes per second the enforcer
    /// counted, both over the window only.
    fn transfer(
        &self,
        streams: usize,
        warmup: Duration,
        window: Duration,
        counted: bool,
    ) -> (f64, f64) {
        let received = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let senders: Vec<TcpStream> = (0..streams)
            .map(|_| {
                in_ns(&self.agent, || TcpStream::connect((HOST_ADDR, PORT)))
                    .expect("connecting from the agent")
            })
            .collect();
        thread::scope(|s| {
            for _ in 0..streams {
                let (mut conn, _) = self.listener.accept().expect("accepting");
                let received = &received;
                s.spawn(move || {
                    let mut buf = vec![0u8; 256 * 1024];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                });
            }
            for mut conn in senders {
                let stop = &stop;
                s.spawn(move || {
                    let buf = vec![0x5au8; WRITE_BYTES];
                    conn.set_write_timeout(Some(Duration::from_millis(200)))
                        .expect("write timeout");
                    while !stop.load(Ordering::Relaxed) {
                        match conn.write(&buf) {
                            Ok(_) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                            Err(e) => panic!("sending: {e}"),
                        }
                    }
                    // Dropping the stream closes it: the reader sees the end.
                });
            }
            thread::sleep(warmup);
            let (b0, p0, t0) = (
                received.load(Ordering::Relaxed),
                if counted { self.passed_bytes() } else { 0 },
                Instant::now(),
            );
            thread::sleep(window);
            let (b1, p1, t1) = (
                received.load(Ordering::Relaxed),
                if counted { self.passed_bytes() } else { 0 },
                Instant::now(),
            );
            stop.store(true, Ordering::Relaxed);
            let secs = (t1 - t0).as_secs_f64();
            ((b1 - b0) as f64 / secs, (p1 - p0) as f64 / secs)
        })
    }
}

impl Drop for TcpBed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.nft_file);
    }
}

/// Measures the section: `rounds` interleaved rounds of every configuration with one and
/// four connections, then the limited case at tc and at XDP.
pub fn run(rounds: usize, window: Duration) -> TcpSection {
    let warmup = Duration::from_millis(500);
    let mut bed = TcpBed::new();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len() * STREAMS.len()];
    let mut tso = [true; CONFIGS.len()];
    for round in 0..rounds {
        for (ci, config) in CONFIGS.iter().enumerate() {
            check_interrupted();
            bed.setup(config);
            tso[ci] = bed.agent_tso();
            for (si, &streams) in STREAMS.iter().enumerate() {
                let (goodput, _) = bed.transfer(streams, warmup, window, false);
                let gbit = goodput * 8.0 / 1e9;
                println!(
                    "  round {}: {config:<13} {streams} stream(s): {gbit:6.2} Gbit/s (agent TSO {})",
                    round + 1,
                    if tso[ci] { "on" } else { "off" }
                );
                samples[ci * STREAMS.len() + si].push(gbit);
            }
            bed.teardown(config);
        }
    }
    let mut results = Vec::new();
    for (ci, config) in CONFIGS.iter().enumerate() {
        for (si, &streams) in STREAMS.iter().enumerate() {
            results.push(TcpResult {
                config: (*config).to_owned(),
                streams,
                gbit_s: Stat::of(&samples[ci * STREAMS.len() + si]),
                agent_tso: tso[ci],
            });
        }
    }
    let mut limited = Vec::new();
    for (hook, choice) in [("tc", HookChoice::Tc), ("xdp", HookChoice::Xdp)] {
        let mut counted = Vec::new();
        let mut wire = Vec::new();
        for round in 0..rounds {
            check_interrupted();
            let compiled = bed.limited.clone();
            bed.attach_enforcer(&compiled, choice);
            // A second of warm-up spends the burst and lets TCP find the rate.
            let (goodput, passed) = bed.transfer(1, Duration::from_secs(1), window, true);
            bed.dp.detach(&bed.host_if).expect("detaching the enforcer");
            let limit = LIMIT_BYTES_PER_SEC as f64;
            let c = passed / limit;
            let w = goodput * FULL_FRAME / FULL_PAYLOAD / limit;
            println!(
                "  round {}: limited at {hook}: passed {c:.4}x the limit, goodput as wire bytes {w:.4}x",
                round + 1
            );
            counted.push(c);
            wire.push(w);
        }
        limited.push(TcpLimited {
            hook: hook.to_owned(),
            limit_bytes_per_sec: LIMIT_BYTES_PER_SEC,
            counted_ratio: Stat::of(&counted),
            goodput_wire_ratio: Stat::of(&wire),
        });
    }
    TcpSection {
        window_ms: window.as_millis() as u64,
        rounds,
        results,
        limited,
    }
}
