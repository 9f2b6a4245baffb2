//! Sections 4 and 5, policy scale and daemon overhead, measured on the real daemon
//! (`enforcer run`) in a namespace of its own:
//! - time from `enforcer policy apply` to enforcement (the moment the program's active
//!   slot flips, which every packet after it sees) for 100, 10,000 and 100,000 agents;
//! - memory of the maps (kernel `memlock` accounting per map, so per agent and per
//!   prefix), and the daemon's resident memory at 100,000 agents;
//! - the daemon's CPU time while idle and while Prometheus scrapes `/metrics` every
//!   second with 10,000 agents that all have traffic.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use enforcer::{
    dataplane::{Dataplane, KernelMaps, compile::Limits, testrun::run_xdp},
    lab::{self, BpffsMount, ChildGuard, Netns},
    node::daemon::Status,
};
use enforcer_common::programs;
use serde::{Deserialize, Serialize};

use super::common::{
    Agent1, Stat, agent_v4, in_ns, other_dst_v4, policy_text, prefix_v4, profile_text, tcp_v4,
};

/// The daemon under test, from this build.
const ENFORCER: &str = env!("CARGO_BIN_EXE_enforcer");
/// Where the daemon serves metrics inside its namespace.
const METRICS: (Ipv4Addr, u16) = (Ipv4Addr::LOCALHOST, 9464);

/// One `policy apply`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyResult {
    /// Agents in the applied policy (each with one source address and one allow rule).
    pub agents: u32,
    /// From starting `enforcer policy apply` to the flip of the active slot (ms).
    pub to_enforcement_ms: f64,
    /// Until the command returned (ms).
    pub command_ms: f64,
    /// The daemon's own measure of its apply (ms).
    pub daemon_apply_ms: f64,
    /// The daemon's resident memory afterwards (KiB).
    pub daemon_rss_kib: u64,
}

/// The profile the largest policy carries for [`agent_changes`].
const PROFILE: &str = "bench";
/// Adds (and as many removes) measured after the discarded ones.
const AGENT_ROUNDS: usize = 12;
/// Changes after the largest apply that are not counted: the first rewrites the slot the
/// previous, smaller policy left, not one that differs by an agent.
const AGENT_DISCARDED: usize = 2;

/// Runs `cli`, a command that changes the policy: from its start, the time to the flip of
/// the active slot (the generation on the pinned state map moves on, polled every `poll`),
/// the time to its exit, and its standard output. Panics if it fails or takes over 120 s.
fn timed(
    maps: &KernelMaps,
    mut cli: std::process::Command,
    poll: Duration,
    what: &str,
) -> (Duration, Duration, Vec<u8>) {
    let before = maps.current_state().expect("state").generation;
    let started = Instant::now();
    let mut cli = ChildGuard::new(
        cli.stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}")),
    );
    // Read aside, so an output longer than the pipe holds never stops the command.
    let mut stdout = cli.child_mut().stdout.take().expect("piped");
    let reader = thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let deadline = started + Duration::from_secs(120);
    let mut enforced = None;
    let mut exited = None;
    while enforced.is_none() || exited.is_none() {
        if enforced.is_none() && maps.current_state().expect("state").generation > before {
            enforced = Some(started.elapsed());
        }
        if exited.is_none()
            && let Ok(Some(status)) = cli.wait_timeout(Duration::ZERO)
        {
            assert!(status.success(), "enforcer {what} failed: {status}");
            exited = Some(started.elapsed());
        }
        assert!(Instant::now() < deadline, "{what} took over 120 s");
        thread::sleep(poll);
    }
    let out = reader.join().expect("reading the output");
    (enforced.expect("set"), exited.expect("set"), out)
}

/// `agent add` and `agent remove` of one instance of [`PROFILE`], alternately, with
/// `agents` agents enforcing; each names a new interface that does not exist and a /32 no
/// agent has.
fn agent_changes(
    lab: &DaemonLab,
    config: &std::path::Path,
    maps: &KernelMaps,
    agents: u32,
) -> AgentChangeResult {
    let mut samples: [[Vec<f64>; 3]; 2] = Default::default();
    for round in 0..AGENT_ROUNDS + AGENT_DISCARDED / 2 {
        super::common::check_interrupted();
        let interface = format!("bch{round}");
        let name = format!("{PROFILE}/{interface}");
        let prefix = format!("{}/32", agent_v4(agents + 1 + round as u32));
        for (kind, add) in [(0, true), (1, false)] {
            let mut cli = lab.ns.command(ENFORCER);
            cli.args(["--json", "--config"]).arg(config).args(["agent"]);
            let what = if add {
                cli.args(["add", "--profile", PROFILE, "--interface", &interface])
                    .args(["--prefix", &prefix]);
                "agent add"
            } else {
                cli.args(["remove", &name]);
                "agent remove"
            };
            // Polled more often than an apply: the whole change should take milliseconds.
            let (enforced, exited, out) = timed(maps, cli, Duration::from_micros(100), what);
            let answer: serde_json::Value =
                serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{what} answer: {e}"));
            assert_eq!(answer["name"], name.as_str(), "{what} answered {answer}");
            if add {
                assert_eq!(
                    answer["pending"], true,
                    "{what}: {interface} does not exist, so the agent should be pending"
                );
            }
            let status = Status::read(&lab.dir.join("state")).expect("status");
            assert_eq!(
                Some(status.generation),
                answer["generation"].as_u64(),
                "status.json is of another apply than {what}'s"
            );
            if round * 2 + kind < AGENT_DISCARDED {
                continue;
            }
            let s = &mut samples[kind];
            s[0].push(enforced.as_secs_f64() * 1e3);
            s[1].push(exited.as_secs_f64() * 1e3);
            s[2].push(status.apply_micros as f64 / 1e3);
        }
    }
    let times = |s: &[Vec<f64>; 3]| ChangeTimes {
        to_enforcement_ms: Stat::of(&s[0]),
        command_ms: Stat::of(&s[1]),
        daemon_apply_ms: Stat::of(&s[2]),
    };
    let r = AgentChangeResult {
        agents,
        discarded: AGENT_DISCARDED,
        add: times(&samples[0]),
        remove: times(&samples[1]),
    };
    for (what, t) in [("add", &r.add), ("remove", &r.remove)] {
        println!(
            "  agent {what} at {agents} agents: enforced after {:.1} ms median (max {:.1}), command {:.1} ms, daemon apply {:.1} ms",
            t.to_enforcement_ms.median,
            t.to_enforcement_ms.max,
            t.command_ms.median,
            t.daemon_apply_ms.median
        );
    }
    r
}

/// One map's kernel memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapMemory {
    /// Map name.
    pub name: String,
    /// Capacity.
    pub max_entries: u32,
    /// Bytes the kernel charges for it (`memlock` in fdinfo); hash maps preallocate.
    pub bytes: u64,
}

/// Sections 4 and 5.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleResult {
    /// Map sizes the daemon was configured with.
    pub limits: BTreeMap<String, u32>,
    /// One row per policy size.
    pub applies: Vec<ApplyResult>,
    /// Every map of the daemon.
    pub maps: Vec<MapMemory>,
    /// Map bytes per agent: its policy in both slots, rate state, counters on every CPU,
    /// and a source address's share of the source table and its hash map in both slots.
    pub bytes_per_agent: f64,
    /// Map bytes per destination prefix: its share of the destination table and its hash
    /// map in both slots (`RULES` holds rule sets, which prefixes share, and is not counted).
    pub bytes_per_prefix: f64,
    /// Daemon CPU while idle, percent of one CPU.
    pub idle_cpu_percent: f64,
    /// Daemon CPU with one scrape per second, percent of one CPU.
    pub scrape_cpu_percent: f64,
    /// CPU time per scrape (ms).
    pub cpu_ms_per_scrape: f64,
    /// Scrape latency seen by the client (ms).
    pub scrape_latency_ms: Stat,
    /// Size of one scrape (bytes).
    pub scrape_bytes: usize,
    /// Agents with traffic during the scrapes.
    pub scrape_agents: u32,
    /// Length of the idle and scrape measurements (s).
    pub seconds: f64,
    /// The daemon under an audit flood (`None` in results of older runs).
    #[serde(default)]
    pub flood: Option<FloodResult>,
    /// One agent added and removed at the largest policy (`None` in results of older runs).
    #[serde(default)]
    pub agent_change: Option<AgentChangeResult>,
}

/// Times of one kind of agent change (`agent add` or `agent remove`), over the rounds kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeTimes {
    /// From starting the command to the flip of the active slot (ms).
    pub to_enforcement_ms: Stat,
    /// Until the command returned (ms).
    pub command_ms: Stat,
    /// The daemon's own measure of its apply (ms).
    pub daemon_apply_ms: Stat,
}

/// One agent added to and removed from enforcement at the largest policy (issue 16: an
/// added agent enforced in under 5 ms at 100,000 agents): `enforcer agent add` of an
/// instance of a profile, for an interface that does not exist (the agent is pending, its
/// source prefix enforced), then `enforcer agent remove`, alternately.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentChangeResult {
    /// Agents of the policy enforcing when one is added.
    pub agents: u32,
    /// Changes made and not counted: the first applies after the daemon's start write each
    /// slot whole.
    pub discarded: usize,
    /// `agent add`.
    pub add: ChangeTimes,
    /// `agent remove`.
    pub remove: ChangeTimes,
}

/// The daemon while agents flood denied traffic, every one over its own audit budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FloodResult {
    /// Agents flooding.
    pub agents: u32,
    /// Denied packets offered per second (test runs on the daemon's pinned program).
    pub offered_per_sec: f64,
    /// Audit events the ring delivered per second (per-agent budgets spent).
    pub events_per_sec: f64,
    /// Of those, written as records of their own (the global budget).
    pub records_per_sec: f64,
    /// Daemon CPU, percent of one CPU.
    pub cpu_percent: f64,
    /// Daemon CPU per offered packet (ns).
    pub cpu_ns_per_offered: f64,
    /// Audit log growth (bytes/s).
    pub log_bytes_per_sec: f64,
    /// What a record per event would have written (bytes/s): events x the mean size of a
    /// record of one event in the same log.
    pub per_event_log_bytes_per_sec: f64,
    /// Daemon CPU while idle in the same run, percent of one CPU (the baseline).
    pub idle_cpu_percent: f64,
}

/// CPU time of every thread of `pid` (ns), from schedstat.
fn cpu_ns(pid: u32) -> u64 {
    let mut total = 0;
    for t in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let s = fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        total += s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The maps `pid` holds open, with the kernel's memory accounting.
fn map_memory(pid: u32) -> Vec<MapMemory> {
    let names: BTreeMap<u32, String> = aya::maps::loaded_maps()
        .flatten()
        .map(|m| (m.id(), m.name_as_str().unwrap_or("").to_owned()))
        .collect();
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for fd in fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = fs::read_to_string(fd.path()).unwrap_or_default();
        let field = |k: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse().ok())
        };
        let (Some(id), Some(bytes), Some(max)) =
            (field("map_id:"), field("memlock:"), field("max_entries:"))
        else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        out.push(MapMemory {
            name: names.get(&(id as u32)).cloned().unwrap_or_default(),
            max_entries: max as u32,
            bytes,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn per_entry(maps: &[MapMemory], name: &str) -> f64 {
    // Kernel map names are cut at 15 bytes.
    let short = &name[..name.len().min(15)];
    maps.iter()
        .find(|m| m.name == short)
        .map_or(0.0, |m| m.bytes as f64 / f64::from(m.max_entries.max(1)))
}

fn scrape(ns: &Netns) -> (f64, usize) {
    in_ns(ns, || {
        let started = Instant::now();
        let mut s = TcpStream::connect(METRICS).expect("connecting to /metrics");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .expect("sending the request");
        let mut body = Vec::new();
        s.read_to_end(&mut body).expect("reading /metrics");
        (started.elapsed().as_secs_f64() * 1e3, body.len())
    })
}

/// Everything the daemon run needs, removed on drop (daemon first, then pins, then the
/// namespace and the directory).
struct DaemonLab {
    daemon: Option<ChildGuard>,
    dir: PathBuf,
    pins: BpffsMount,
    ns: Netns,
}

impl Drop for DaemonLab {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.terminate(Duration::from_secs(5));
        }
        let _ = enforcer::dataplane::remove_pins(self.pins.path());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn wait_ready(lab: &mut DaemonLab) {
    let pid = lab.daemon.as_ref().expect("started").id();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if Status::read(&lab.dir.join("state")).is_some_and(|s| s.pid == pid) {
            return;
        }
        if let Ok(Some(exit)) = lab
            .daemon
            .as_mut()
            .expect("started")
            .wait_timeout(Duration::from_millis(20))
        {
            panic!("enforcer run exited during start-up: {exit}");
        }
        assert!(
            Instant::now() < deadline,
            "enforcer run did not report ready in 60 s"
        );
    }
}

fn limits() -> Limits {
    Limits {
        // One id beyond the largest policy's, for the agent `agent_changes` adds.
        max_agents: 100_000 + 1,
        max_interfaces: 16,
        max_source_prefixes: 131_072,
        max_destination_prefixes: 131_072,
        ..Limits::default()
    }
}

/// Runs both sections. `seconds` is the length of the idle and scrape measurements.
pub fn run(sizes: &[u32], seconds: f64) -> ScaleResult {
    let limits = limits();
    let ns = Netns::create(&lab::unique_name("bscale")).expect("netns");
    let dir = std::env::temp_dir().join(lab::unique_name("enf-scale"));
    fs::create_dir_all(dir.join("state")).expect("state dir");
    let pins = BpffsMount::new().expect("bpffs");
    let mut lab = DaemonLab {
        daemon: None,
        dir,
        pins,
        ns,
    };
    let config = lab.dir.join("enforcer.toml");
    fs::write(
        &config,
        format!(
            "policy = \"policy.toml\"\nbpffs = \"{}\"\nstate_dir = \"state\"\nruntime_dir = \"state\"\naudit_log = \"audit.jsonl\"\nmetrics_listen = \"{}:{}\"\n\n\
             [limits]\nmax_agents = {}\nmax_interfaces = {}\nmax_source_prefixes = {}\nmax_destination_prefixes = {}\n",
            lab.pins.path().display(),
            METRICS.0,
            METRICS.1,
            limits.max_agents,
            limits.max_interfaces,
            limits.max_source_prefixes,
            limits.max_destination_prefixes
        ),
    )
    .expect("config");
    let no_v6 = Agent1 { pps: 0, v6: false };
    fs::write(lab.dir.join("policy.toml"), policy_text(1, 10, no_v6)).expect("policy");
    let child = lab
        .ns
        .command(ENFORCER)
        .args(["run", "--config"])
        .arg(&config)
        .env("ENFORCER_LOG", "warn")
        .spawn()
        .expect("starting enforcer run");
    lab.daemon = Some(ChildGuard::new(child));
    wait_ready(&mut lab);
    let pid = lab.daemon.as_ref().expect("started").id();
    let maps = KernelMaps::from_pins(lab.pins.path()).expect("opening the pinned maps");

    let largest = sizes.iter().copied().max().unwrap_or(0);
    let mut applies = Vec::new();
    let mut agent_change = None;
    for &agents in sizes {
        super::common::check_interrupted();
        let file = lab.dir.join(format!("p{agents}.toml"));
        let mut text = policy_text(agents, 10, no_v6);
        if agents == largest {
            // Nothing is made of it until `agent add`: the row measures the agents alone.
            text.push_str(&profile_text(PROFILE, other_dst_v4(agents + 1)));
        }
        fs::write(&file, text).expect("policy");
        let mut cli = lab.ns.command(ENFORCER);
        cli.args(["policy", "apply"])
            .arg(&file)
            .arg("--config")
            .arg(&config);
        let (enforced, exited, _) = timed(&maps, cli, Duration::from_micros(500), "policy apply");
        let status = Status::read(&lab.dir.join("state")).expect("status");
        let r = ApplyResult {
            agents,
            to_enforcement_ms: enforced.as_secs_f64() * 1e3,
            command_ms: exited.as_secs_f64() * 1e3,
            daemon_apply_ms: status.apply_micros as f64 / 1e3,
            daemon_rss_kib: rss_kib(pid),
        };
        println!(
            "  policy apply, {agents:>6} agents: enforced after {:.0} ms (command {:.0} ms, daemon apply {:.0} ms), daemon RSS {} MiB",
            r.to_enforcement_ms,
            r.command_ms,
            r.daemon_apply_ms,
            r.daemon_rss_kib / 1024
        );
        applies.push(r);
        if agents == largest {
            agent_change = Some(agent_changes(&lab, &config, &maps, agents));
        }
    }
    let memory = map_memory(pid);
    let stride = f64::from(limits.max_agents + 1);
    let mem = |n: &str| {
        memory
            .iter()
            .find(|m| m.name == n)
            .map_or(0.0, |m| m.bytes as f64)
    };
    // Tables hold both slots at up to one key per bucket: their bytes per key of capacity.
    let bytes_per_agent = (mem("AGENTS") + mem("BUCKETS") + mem("COUNTERS")) / stride
        + 2.0 * per_entry(&memory, "SRC_HOST_V4")
        + mem("SRC_TABLE_V4") / f64::from(limits.max_source_prefixes);
    let bytes_per_prefix = 2.0 * per_entry(&memory, "DST_HASH_V4")
        + mem("DST_TABLE_V4") / f64::from(limits.max_destination_prefixes);

    super::common::check_interrupted();
    // Section 5 with the largest policy (100,000 agents in the suite), every agent with
    // traffic under two reasons: /metrics must stay cheap at that size.
    let scrape_agents = sizes.iter().copied().max().unwrap_or(10_000);
    let file = lab.dir.join("scrape.toml");
    fs::write(&file, policy_text(scrape_agents, 10, no_v6)).expect("policy");
    let out = lab
        .ns
        .command(ENFORCER)
        .args(["policy", "apply"])
        .arg(&file)
        .arg("--config")
        .arg(&config)
        .output()
        .expect("policy apply");
    assert!(
        out.status.success(),
        "policy apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    {
        // Another loader on the daemon's pins: the same maps, so test runs count there.
        let dp = Dataplane::load(lab.pins.path(), &limits).expect("loading on the pins");
        let prog = dp.program(programs::ENFORCE).expect("loaded");
        for id in 1..=scrape_agents {
            let dst = if id == 1 {
                Ipv4Addr::from(u32::from(prefix_v4(0)) + 7)
            } else {
                other_dst_v4(id)
            };
            run_xdp(prog, &tcp_v4(agent_v4(id), dst), None, 1).expect("test run");
            run_xdp(
                prog,
                &tcp_v4(agent_v4(id), Ipv4Addr::new(192, 0, 2, 99)),
                None,
                1,
            )
            .expect("test run");
        }
    }
    let period = Duration::from_secs_f64(seconds);
    let c0 = cpu_ns(pid);
    thread::sleep(period);
    let idle_cpu_percent = (cpu_ns(pid) - c0) as f64 / period.as_nanos() as f64 * 100.0;
    let (_, scrape_bytes) = scrape(&lab.ns);
    let scrapes = seconds.round().max(1.0) as usize;
    let c1 = cpu_ns(pid);
    let t1 = Instant::now();
    let mut latencies = Vec::new();
    for i in 0..scrapes {
        let (ms, _) = scrape(&lab.ns);
        latencies.push(ms);
        let next = t1 + Duration::from_secs(i as u64 + 1);
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let busy = (cpu_ns(pid) - c1) as f64;
    let elapsed = t1.elapsed().as_nanos() as f64;
    super::common::check_interrupted();
    let flood = flood(
        &lab,
        &config,
        &limits,
        pid,
        scrape_agents.min(1000),
        period,
        idle_cpu_percent,
    );
    let result = ScaleResult {
        limits: BTreeMap::from([
            ("max_agents".to_owned(), limits.max_agents),
            ("max_source_prefixes".to_owned(), limits.max_source_prefixes),
            (
                "max_destination_prefixes".to_owned(),
                limits.max_destination_prefixes,
            ),
        ]),
        applies,
        maps: memory,
        bytes_per_agent,
        bytes_per_prefix,
        idle_cpu_percent,
        scrape_cpu_percent: busy / elapsed * 100.0,
        cpu_ms_per_scrape: busy / 1e6 / scrapes as f64,
        scrape_latency_ms: Stat::of(&latencies),
        scrape_bytes,
        scrape_agents,
        seconds,
        flood: Some(flood.clone()),
        agent_change,
    };
    println!(
        "  audit flood from {} agents: {:.0} packets/s offered, {:.0} events/s delivered, {:.0} written alone; daemon CPU {:.1}% ({:.1}x idle, {:.0} ns per offered packet); log {:.0} kB/s ({:.3}x a record per event)",
        flood.agents,
        flood.offered_per_sec,
        flood.events_per_sec,
        flood.records_per_sec,
        flood.cpu_percent,
        flood.cpu_percent / flood.idle_cpu_percent.max(1e-3),
        flood.cpu_ns_per_offered,
        flood.log_bytes_per_sec / 1e3,
        flood.log_bytes_per_sec / flood.per_event_log_bytes_per_sec.max(1.0)
    );
    println!(
        "  maps: {:.0} bytes per agent, {:.0} bytes per prefix; daemon CPU idle {:.3}%, scraping {} agents every second {:.2}% ({:.1} ms CPU per scrape, latency {:.1} ms, {} bytes)",
        result.bytes_per_agent,
        result.bytes_per_prefix,
        result.idle_cpu_percent,
        result.scrape_agents,
        result.scrape_cpu_percent,
        result.cpu_ms_per_scrape,
        result.scrape_latency_ms.median,
        result.scrape_bytes
    );
    result
}

/// The daemon's audit health from `enforcer status`.
fn audit_health(lab: &DaemonLab, config: &std::path::Path) -> serde_json::Value {
    let out = lab
        .ns
        .command(ENFORCER)
        .args(["--json", "--config"])
        .arg(config)
        .arg("status")
        .output()
        .expect("enforcer status");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    status["audit"].clone()
}

/// `agents` agents send denied packets flat out for `period`, each far over its own audit
/// budget: the daemon's CPU and the log's growth under the global budget.
fn flood(
    lab: &DaemonLab,
    config: &std::path::Path,
    limits: &Limits,
    pid: u32,
    agents: u32,
    period: Duration,
    idle_cpu_percent: f64,
) -> FloodResult {
    let log = lab.dir.join("audit.jsonl");
    let dp = Dataplane::load(lab.pins.path(), limits).expect("loading on the pins");
    let prog = dp.program(programs::ENFORCE).expect("loaded");
    let packets: Vec<Vec<u8>> = (1..=agents)
        .map(|id| tcp_v4(agent_v4(id), Ipv4Addr::new(192, 0, 2, 99)))
        .collect();
    // A second of flood first: every agent's audit burst is spent before the measurement.
    let flood_for = |d: Duration| {
        let start = Instant::now();
        let mut offered = 0u64;
        while start.elapsed() < d {
            for p in &packets {
                run_xdp(prog, p, None, 20).expect("test run");
                offered += 20;
            }
        }
        offered
    };
    flood_for(Duration::from_secs(1));
    thread::sleep(Duration::from_millis(500));
    let h0 = audit_health(lab, config);
    let (b0, c0, t0) = (
        fs::metadata(&log).map_or(0, |m| m.len()),
        cpu_ns(pid),
        Instant::now(),
    );
    let offered = flood_for(period);
    // The reader catches up with what the ring holds; its summaries close within their
    // interval (10 s by default), written after the window, so the bytes are of records
    // alone plus the summaries that closed inside it.
    thread::sleep(Duration::from_millis(500));
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = (cpu_ns(pid) - c0) as f64;
    let bytes = fs::metadata(&log).map_or(0, |m| m.len()) - b0;
    let h1 = audit_health(lab, config);
    let count = |h: &serde_json::Value, k: &str| h[k].as_u64().unwrap_or(0);
    let summarized = count(&h1, "events_summarized") - count(&h0, "events_summarized");
    let records =
        count(&h1, "seq") - count(&h0, "seq") - (count(&h1, "summaries") - count(&h0, "summaries"));
    // The mean size of a record of one event, from the log's last lines.
    let tail = enforcer::node::audit::tail(&log, 200).unwrap_or_default();
    let singles: Vec<usize> = tail
        .iter()
        .filter(|l| l.contains("\"reason\":\"egress_denied\""))
        .map(|l| l.len() + 1)
        .collect();
    let mean = singles.iter().sum::<usize>() as f64 / singles.len().max(1) as f64;
    let events = (records + summarized) as f64;
    FloodResult {
        agents,
        offered_per_sec: offered as f64 / elapsed,
        events_per_sec: events / elapsed,
        records_per_sec: records as f64 / elapsed,
        cpu_percent: cpu / (elapsed * 1e9) * 100.0,
        cpu_ns_per_offered: cpu / offered.max(1) as f64,
        log_bytes_per_sec: bytes as f64 / elapsed,
        per_event_log_bytes_per_sec: events * mean / elapsed,
        idle_cpu_percent,
    }
}
