//! In-kernel cost of the enforcer: ns per packet through BPF_PROG_TEST_RUN for allowed,
//! rate-limited, denied and unknown-agent packets, at 1 / 1,000 / 100,000 agents and
//! 10 / 1,000 / 100,000 allow-list prefixes, as ratios to a trivial XDP_PASS program from
//! the same object measured in the same run. Writes `bench/results/<date>-<host>-dataplane`
//! JSON and Markdown. Needs root. `--quick` is the short variant; `--only AGENTS:PREFIXES`
//! measures one size. `cargo xtask bench` runs the comparison benchmark (`compare.rs`),
//! which measures all of this and more; this one stays for focused in-kernel work.

use std::{
    collections::HashSet,
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use enforcer::{
    compile::{self, Limits},
    dataplane::Dataplane,
    lab::BpffsMount,
    policy,
    testrun::run_xdp,
};
use enforcer_common::programs;
use etherparse::PacketBuilder;

const AGENTS: [u32; 3] = [1, 1_000, 100_000];
const PREFIXES: [u32; 3] = [10, 1_000, 100_000];
const CASES: [&str; 4] = ["allowed", "rate_limited", "denied", "unknown_agent"];

/// Source address of agent `id`: 100.64.0.0/10 counted up.
fn agent_addr(id: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + id)
}

/// The `k`-th allow-list prefix of agent 1: distinct /24s spread over the address space
/// (an odd multiplier is a bijection modulo 2^24).
fn prefix(k: u32) -> Ipv4Addr {
    Ipv4Addr::from((k.wrapping_mul(2_654_435_761) & 0x00ff_ffff) << 8)
}

/// A policy with `agents` agents. Agent 1 is the measured one: `prefixes` allow rules
/// (TCP 443) and the given packets/s limit; every other agent has one source address and
/// one allow rule, so the maps hold `agents` sources and `prefixes + agents - 1`
/// destinations.
fn policy_text(agents: u32, prefixes: u32, agent1_pps: u64) -> String {
    let mut s = String::with_capacity(agents as usize * 160 + prefixes as usize * 20);
    let burst = if agent1_pps == 1 { 1 } else { agent1_pps / 10 };
    let _ = write!(
        s,
        "[[agents]]\nid = 1\nname = \"a1\"\nprefixes = [\"{}\"]\negress_default = \"deny\"\n\
         rate = {{ packets_per_sec = {agent1_pps}, packets_burst = {burst} }}\n\
         [[agents.egress]]\naction = \"allow\"\nproto = \"tcp\"\nports = \"443\"\nto = [",
        agent_addr(1)
    );
    for k in 0..prefixes {
        let _ = write!(s, "\"{}/24\",", prefix(k));
    }
    s.push_str("]\n");
    for id in 2..=agents {
        let _ = write!(
            s,
            "[[agents]]\nid = {id}\nname = \"a{id}\"\nprefixes = [\"{}\"]\negress_default = \"deny\"\n\
             [[agents.egress]]\naction = \"allow\"\nto = [\"{}\"]\n",
            agent_addr(id),
            Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + id)
        );
    }
    s
}

fn tcp(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(40000, 443, 1, 1024)
        .write(&mut out, &[0u8; 18])
        .unwrap();
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Options {
    quick: bool,
    repeat: u32,
    runs: usize,
}

fn measure(dp: &Dataplane, program: &str, packet: &[u8], o: &Options) -> f64 {
    let program = dp.program(program).unwrap();
    median(
        (0..o.runs)
            .map(|_| {
                run_xdp(program, packet, None, o.repeat)
                    .unwrap()
                    .duration
                    .as_nanos() as f64
            })
            .collect(),
    )
}

struct Row {
    agents: u32,
    prefixes: u32,
    floor_ns: f64,
    ns: [f64; 4],
    apply_ms: f64,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    if geteuid() != 0 {
        eprintln!("the dataplane benchmark loads XDP programs: run it as root");
        std::process::exit(1);
    }
    let o = Options {
        quick,
        repeat: if quick { 100_000 } else { 1_000_000 },
        runs: if quick { 3 } else { 5 },
    };
    let limits = Limits {
        max_agents: 100_000,
        max_interfaces: 16,
        max_source_prefixes: 131_072,
        max_destination_prefixes: 262_144,
        ..Limits::default()
    };
    let bpffs = BpffsMount::new().expect("mounting a private bpffs");
    let mut dp = Dataplane::load(bpffs.path(), &limits).expect("loading the XDP object");
    println!(
        "in-kernel cost, BPF_PROG_TEST_RUN, repeat {} x {} runs (median){}",
        o.repeat,
        o.runs,
        if o.quick { ", quick" } else { "" }
    );
    let mut rows = Vec::new();
    // `--only AGENTS:PREFIXES` measures one size (for quick experiments).
    let only: Option<(u32, u32)> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .and_then(|v| {
            v.split_once(':')
                .map(|(a, p)| (a.parse().unwrap(), p.parse().unwrap()))
        });
    for &agents in &AGENTS {
        for &prefixes in &PREFIXES {
            if only.is_some_and(|o| o != (agents, prefixes)) {
                continue;
            }
            let started = Instant::now();
            let open =
                policy::parse("bench.toml", &policy_text(agents, prefixes, 1_000_000_000)).unwrap();
            let compiled = compile::compile(&open, &limits, &|_| None).unwrap();
            dp.apply(&compiled).unwrap();
            let apply_ms = started.elapsed().as_secs_f64() * 1e3;

            let taken: HashSet<u32> = (0..prefixes).map(|k| u32::from(prefix(k))).collect();
            let allowed_dst = Ipv4Addr::from(u32::from(prefix(prefixes / 2)) + 7);
            let denied_dst = (1..)
                .map(|n: u32| Ipv4Addr::from((n << 8) | 9))
                .find(|a| !taken.contains(&(u32::from(*a) & 0xffff_ff00)))
                .unwrap();
            let allowed = tcp(agent_addr(1), allowed_dst);
            let denied = tcp(agent_addr(1), denied_dst);
            let unknown = tcp(Ipv4Addr::new(192, 0, 2, 1), allowed_dst);

            let floor_ns = measure(&dp, programs::PASS_FLOOR, &allowed, &o);
            let allowed_ns = measure(&dp, programs::ENFORCE, &allowed, &o);
            let denied_ns = measure(&dp, programs::ENFORCE, &denied, &o);
            let unknown_ns = measure(&dp, programs::ENFORCE, &unknown, &o);

            // Same maps, but agent 1 limited to 1 packet/s: every packet after the first is
            // over the limit.
            let limited = policy::parse("bench.toml", &policy_text(agents, prefixes, 1)).unwrap();
            dp.apply(&compile::compile(&limited, &limits, &|_| None).unwrap())
                .unwrap();
            let limited_ns = measure(&dp, programs::ENFORCE, &allowed, &o);

            let row = Row {
                agents,
                prefixes,
                floor_ns,
                ns: [allowed_ns, limited_ns, denied_ns, unknown_ns],
                apply_ms,
            };
            println!(
                "agents {:>6} prefixes {:>6}: floor {:>5.1} ns | {} | apply {:.0} ms",
                agents,
                prefixes,
                floor_ns,
                CASES
                    .iter()
                    .zip(row.ns)
                    .map(|(c, ns)| format!("{c} {ns:.0} ns ({:.2}x)", ns / floor_ns))
                    .collect::<Vec<_>>()
                    .join(" | "),
                apply_ms
            );
            rows.push(row);
        }
    }
    let scrapes = if only.is_none() {
        scrape_cost(&mut dp, &limits, &o)
    } else {
        Vec::new()
    };
    write_results(&rows, &scrapes, &o);
}

/// One metrics-scrape measurement.
struct Scrape {
    agents: u32,
    millis: f64,
    bytes: usize,
    series: usize,
}

/// Time to render `/metrics` with 100, 1,000 and 10,000 agents that each have traffic
/// under two reasons (one allowed and one denied packet per agent, run through the
/// program), median of several renders.
fn scrape_cost(dp: &mut Dataplane, limits: &Limits, o: &Options) -> Vec<Scrape> {
    let mut out = Vec::new();
    for agents in [100u32, 1_000, 10_000] {
        let policy = policy::parse("bench.toml", &policy_text(agents, 10, 1_000_000_000)).unwrap();
        let compiled = compile::compile(&policy, limits, &|_| None).unwrap();
        dp.apply(&compiled).unwrap();
        let names = enforcer::daemon::agent_names(&policy);
        let program = dp.program(programs::ENFORCE).unwrap();
        for id in 1..=agents {
            let allowed_dst = if id == 1 {
                Ipv4Addr::from(u32::from(prefix(0)) + 7)
            } else {
                Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + id)
            };
            run_xdp(program, &tcp(agent_addr(id), allowed_dst), None, 1).unwrap();
            run_xdp(
                program,
                &tcp(agent_addr(id), Ipv4Addr::new(192, 0, 2, 99)),
                None,
                1,
            )
            .unwrap();
        }
        let info = enforcer::metrics::DaemonInfo {
            agents: names,
            ..Default::default()
        };
        let mut text = String::new();
        let times: Vec<f64> = (0..o.runs)
            .map(|_| {
                let started = Instant::now();
                text = enforcer::metrics::render(dp.maps(), &info).unwrap();
                started.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        let scrape = Scrape {
            agents,
            millis: median(times),
            bytes: text.len(),
            series: text.lines().filter(|l| !l.starts_with('#')).count(),
        };
        println!(
            "metrics scrape with {:>6} agents: {:.1} ms, {} series, {} bytes",
            scrape.agents, scrape.millis, scrape.series, scrape.bytes
        );
        out.push(scrape);
    }
    out
}

fn geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

fn machine() -> (String, String, String) {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    (host, kernel, cpu)
}

fn write_results(rows: &[Row], scrapes: &[Scrape], o: &Options) {
    let (host, kernel, cpu) = machine();
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // `time::Date` displays as YYYY-MM-DD.
    let date = time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .map_or_else(|_| "unknown-date".to_string(), |t| t.date().to_string());
    let json = serde_json::json!({
        "benchmark": "dataplane",
        "date": date,
        "host": host,
        "kernel": kernel,
        "cpu": cpu,
        "repeat": o.repeat,
        "runs": o.runs,
        "quick": o.quick,
        "rows": rows.iter().map(|r| serde_json::json!({
            "agents": r.agents,
            "prefixes": r.prefixes,
            "floor_ns": r.floor_ns,
            "apply_ms": r.apply_ms,
            "cases": CASES.iter().zip(r.ns).map(|(c, ns)| serde_json::json!({
                "case": c, "ns": ns, "ratio": ns / r.floor_ns,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "metrics_scrape": scrapes.iter().map(|s| serde_json::json!({
            "agents": s.agents, "millis": s.millis, "series": s.series, "bytes": s.bytes,
        })).collect::<Vec<_>>(),
    });
    let mut md = format!(
        "# Dataplane benchmark, {date}\n\n{host}, Linux {kernel}, {cpu}.\n\
         BPF_PROG_TEST_RUN, repeat {} x {} runs, median; ratio to a trivial XDP_PASS program measured in the same run{}.\n\n\
         | agents | prefixes | XDP_PASS ns | allowed | rate-limited | denied | unknown agent | apply ms |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
        o.repeat,
        o.runs,
        if o.quick { " (quick mode)" } else { "" }
    );
    for r in rows {
        let _ = write!(md, "| {} | {} | {:.0} |", r.agents, r.prefixes, r.floor_ns);
        for ns in r.ns {
            let _ = write!(md, " {:.0} ns ({:.2}x) |", ns, ns / r.floor_ns);
        }
        let _ = writeln!(md, " {:.0} |", r.apply_ms);
    }
    if !scrapes.is_empty() {
        let _ = write!(
            md,
            "\n## Metrics scrape\n\nRendering `/metrics` (counters read with BPF_MAP_LOOKUP_BATCH over maps sized for {} agents), every agent with traffic under two reasons; median of {} renders.\n\n| agents | ms per scrape | series | bytes |\n|---:|---:|---:|---:|\n",
            AGENTS[2], o.runs
        );
        for s in scrapes {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {} | {} |",
                s.agents, s.millis, s.series, s.bytes
            );
        }
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    fs::create_dir_all(&dir).unwrap();
    // `-dataplane`: `<date>-<host>.json` is the comparison benchmark's combined result.
    let stem = format!(
        "{date}-{host}-dataplane{}",
        if o.quick { "-quick" } else { "" }
    );
    fs::write(
        dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    fs::write(dir.join(format!("{stem}.md")), &md).unwrap();
    println!("\n{md}\nwritten to bench/results/{stem}.{{json,md}}");
}
