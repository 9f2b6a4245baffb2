//! Section 2, the packet path on a veth: a generator floods UDP from one source address
//! per agent into the receiver's veth, and each configuration's processed and admitted
//! packets per second are measured there, interleaved and repeated. Throughput only says
//! something when the generator outruns the receiver, so with the receiver on a CPU of its
//! own ("apart") each configuration is also offered one fixed, paced load and the CPU time
//! its receive path spends per packet is measured: that figure compares configurations
//! whatever the generator can do.

use std::{
    fs, thread,
    time::{Duration, Instant},
};

use aya::programs::{Xdp, xdp::XdpMode};
use enforcer::{
    dataplane::{
        AttachMode, Dataplane, HookChoice,
        compile::{self, Compiled, Limits},
    },
    lab::{BpffsMount, Netns},
    policy,
};
use enforcer_common::{Reason, bench as names};
use serde::{Deserialize, Serialize};

use super::{
    bed::{Bed, CpuMode, PORT, RCV_ADDR},
    common::{Stat, agent_v4, in_ns},
    generator::Kind,
    xdpfilter::{self, FLAG_SRC, XdpFilter},
};

/// Per-agent limit in the over-limit configurations (packets/s, burst a tenth).
pub const LIMIT_PPS: u64 = 100;

/// The configurations, in report order.
pub const CONFIGS: [&str; 10] = [
    "no_filter",
    "xdp_pass",
    "xdp_drop",
    "enforcer_over_limit",
    "enforcer_allowed",
    "enforcer_tc_over_limit",
    "enforcer_tc_allowed",
    "nftables_meter",
    "iptables_hashlimit",
    "xdp_filter",
];

/// What each configuration is, for the report.
pub fn describe(config: &str) -> &'static str {
    match config {
        "no_filter" => "no XDP program, no rules: into the stack, to a UDP socket",
        "xdp_pass" => {
            "a trivial XDP_PASS program: what any XDP program costs traffic that goes on into the stack"
        }
        "xdp_drop" => "an XDP program that counts and drops every frame",
        "enforcer_over_limit" => "the enforcer, every agent over its 100 packets/s limit",
        "enforcer_allowed" => "the enforcer, every packet allowed (limits far above the flood)",
        "enforcer_tc_over_limit" => {
            "the enforcer at tc ingress (`hook = \"tc\"`), every agent over its 100 packets/s limit"
        }
        "enforcer_tc_allowed" => {
            "the enforcer at tc ingress (`hook = \"tc\"`), every packet allowed"
        }
        "nftables_meter" => {
            "nftables netdev ingress: allow set of the agents, per-source `limit rate over 100/second` dynamic set"
        }
        "iptables_hashlimit" => {
            "iptables INPUT: agents' source range, `hashlimit --hashlimit-above 100/sec --hashlimit-mode srcip`"
        }
        "xdp_filter" => {
            "xdp-filter's program (xdpfilt_alw_ip) dropping every agent's source address"
        }
        _ => "",
    }
}

/// A throughput figure is generator-bound when the receiver processed at least this share of
/// what was offered: it kept up, so the rate is the generator's, not the configuration's.
pub const GENERATOR_BOUND: f64 = 0.97;

/// A generator the run asked for, whether it could be used and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GeneratorUse {
    /// Which generator.
    pub kind: Kind,
    /// Whether it ran.
    pub available: bool,
    /// Why it ran or did not (the kernel's answer to the probe).
    pub why: String,
}

/// One configuration in one CPU mode with one generator, over all repeats.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveResult {
    /// Configuration name (see [`CONFIGS`]).
    pub config: String,
    /// CPU mode.
    pub mode: CpuMode,
    /// The generator that sent (results written before there were two: live frames).
    #[serde(default = "frames_kind")]
    pub generator: Kind,
    /// Apart mode: whether the receiver kept up with the flood (processed >=
    /// [`GENERATOR_BOUND`] x offered in the median round): the throughput is then the
    /// generator's. Always false in same mode (see the report's note there).
    #[serde(default)]
    pub generator_bound: bool,
    /// Apart mode: CPU time of the receiving NAPI thread per frame it processed (ns) at the
    /// paced load ([`super::report::Settings::paced_pps`]).
    #[serde(default)]
    pub rx_cpu_ns: Stat,
    /// Apart mode: frames per second offered in the paced measurement.
    #[serde(default)]
    pub paced_offered_pps: Stat,
    /// Apart mode: frames per second the receiver processed in the paced measurement.
    #[serde(default)]
    pub paced_processed_pps: Stat,
    /// Frames the receiving veth processed per second (any verdict).
    pub processed_pps: Stat,
    /// Packets admitted into the stack per second (`Ip: InDelivers`).
    pub admitted_pps: Stat,
    /// Frames the generator sent per second.
    pub offered_pps: Stat,
    /// The same as processed, from the configuration's own counters (XDP program, nftables
    /// or iptables counters), where it has them.
    pub own_processed_pps: Stat,
    /// Admitted per second from the configuration's own counters.
    pub own_admitted_pps: Stat,
}

fn frames_kind() -> Kind {
    Kind::Frames
}

/// Everything the configurations need, set up once.
struct Fixtures {
    dp: Dataplane,
    over: Compiled,
    allowed: Compiled,
    agents: u32,
    xdpf: Option<XdpFilter>,
    nft_file: std::path::PathBuf,
    _pins: BpffsMount,
    _xdpf_pins: BpffsMount,
}

fn live_policy(agents: u32, pps: u64) -> String {
    let mut s = String::with_capacity(agents as usize * 200);
    for id in 1..=agents {
        s.push_str(&format!(
            "[[agents]]\nid = {id}\nname = \"a{id}\"\nprefixes = [\"{}\"]\negress_default = \"deny\"\n\
             rate = {{ packets_per_sec = {pps}, packets_burst = {} }}\n\
             [[agents.egress]]\naction = \"allow\"\nproto = \"udp\"\nports = \"{PORT}\"\nto = [\"{RCV_ADDR}\"]\n",
            agent_v4(id),
            (pps / 10).max(1)
        ));
    }
    s
}

fn compile_for(agents: u32, pps: u64, limits: &Limits) -> Compiled {
    let p = policy::parse("live.toml", &live_policy(agents, pps)).expect("parsing");
    compile::compile(&p, limits, &|_| None).expect("compiling")
}

impl Fixtures {
    fn new(agents: u32) -> Fixtures {
        let limits = Limits {
            max_agents: agents.max(16),
            max_interfaces: 16,
            max_source_prefixes: agents.max(16) * 2,
            max_destination_prefixes: agents.max(16) * 2,
            ..Limits::default()
        };
        let pins = BpffsMount::new().expect("bpffs");
        let dp = Dataplane::load(pins.path(), &limits).expect("loading the enforcer");
        let xdpf_pins = BpffsMount::new().expect("bpffs");
        let xdpf = xdpfilter::object_path().is_some().then(|| {
            let mut f = XdpFilter::load_object(xdpf_pins.path(), "xdpfilt_alw_ip", agents)
                .unwrap_or_else(|e| panic!("{e}"));
            for id in 1..=agents {
                f.add(agent_v4(id).into(), FLAG_SRC)
                    .expect("xdp-filter rule");
            }
            f
        });
        let nft_file = std::env::temp_dir().join(format!("enfbench-{}.nft", std::process::id()));
        Fixtures {
            dp,
            over: compile_for(agents, LIMIT_PPS, &limits),
            allowed: compile_for(agents, 1_000_000_000, &limits),
            agents,
            xdpf,
            nft_file,
            _pins: pins,
            _xdpf_pins: xdpf_pins,
        }
    }
}

impl Drop for Fixtures {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.nft_file);
    }
}

/// How a configuration counts for itself: (processed, admitted) totals.
type Own = Option<(u64, u64)>;

fn nft_ruleset(ifname: &str, agents: u32) -> String {
    let elements: Vec<String> = (1..=agents).map(|i| agent_v4(i).to_string()).collect();
    format!(
        "table netdev enfbench {{\n\
         \tset agents {{ type ipv4_addr; elements = {{ {} }} }}\n\
         \tset rates {{ type ipv4_addr; size 65536; flags dynamic,timeout; timeout 1m; }}\n\
         \tchain ingress {{\n\
         \t\ttype filter hook ingress device \"{ifname}\" priority 0; policy accept;\n\
         \t\tip saddr != @agents counter drop\n\
         \t\tupdate @rates {{ ip saddr limit rate over {LIMIT_PPS}/second burst {} packets }} counter drop\n\
         \t\tcounter accept\n\
         \t}}\n\
         }}\n",
        elements.join(", "),
        (LIMIT_PPS / 10).max(1)
    )
}

/// Packet counters of the rules of `nft -j list table netdev enfbench`, in order.
fn nft_counters(bed: &Bed) -> Vec<u64> {
    let out = bed
        .rcv
        .exec(&["nft", "-j", "list", "table", "netdev", "enfbench"])
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let mut counts = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        if let Some(exprs) = item["rule"]["expr"].as_array() {
            for e in exprs {
                if let Some(p) = e["counter"]["packets"].as_u64() {
                    counts.push(p);
                }
            }
        }
    }
    counts
}

/// Packet counters of the INPUT chain's rules, in order.
fn iptables_counters(bed: &Bed) -> Vec<u64> {
    let out = bed
        .rcv
        .exec(&["iptables", "-w", "-L", "INPUT", "-v", "-x", "-n"])
        .unwrap_or_default();
    out.lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

fn iptables(bed: &Bed, args: &[&str]) {
    let mut full = vec!["iptables", "-w"];
    full.extend_from_slice(args);
    bed.rcv.exec(&full).unwrap_or_else(|e| panic!("{e}"));
}

/// The configuration currently set up, so it can be torn down.
enum Active {
    Nothing,
    /// A program of the bench object, by name.
    Bench(&'static str, aya::programs::xdp::XdpLinkId),
    Enforcer,
    Nft,
    Iptables,
    XdpFilter(aya::programs::xdp::XdpLinkId),
}

fn attach(rcv: &Netns, ifname: &str, prog: &mut Xdp) -> aya::programs::xdp::XdpLinkId {
    in_ns(rcv, move || prog.attach(ifname, XdpMode::Driver)).expect("attaching in native mode")
}

fn setup(bed: &mut Bed, fx: &mut Fixtures, config: &str) -> Active {
    let active = match config {
        "no_filter" => Active::Nothing,
        "xdp_drop" | "xdp_pass" => {
            let name = if config == "xdp_drop" {
                names::PROG_DROP
            } else {
                names::PROG_PASS
            };
            let prog: &mut Xdp = bed
                .bench
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .expect("bench program");
            Active::Bench(name, attach(&bed.rcv, &bed.rcv_if, prog))
        }
        "enforcer_over_limit"
        | "enforcer_allowed"
        | "enforcer_tc_over_limit"
        | "enforcer_tc_allowed" => {
            let compiled = if config.ends_with("over_limit") {
                &fx.over
            } else {
                &fx.allowed
            };
            let hook = if config.starts_with("enforcer_tc") {
                HookChoice::Tc
            } else {
                HookChoice::Xdp
            };
            fx.dp.apply(compiled).expect("applying");
            for id in 1..=fx.agents {
                fx.dp.maps().reset_bucket(id).expect("resetting a bucket");
            }
            let ifname = bed.rcv_if.clone();
            let dp = &mut fx.dp;
            in_ns(&bed.rcv, move || {
                dp.attach(&ifname, hook, AttachMode::Native)
            })
            .expect("attaching the enforcer");
            Active::Enforcer
        }
        "nftables_meter" => {
            fs::write(&fx.nft_file, nft_ruleset(&bed.rcv_if, fx.agents)).expect("nft file");
            bed.rcv
                .exec(&["nft", "-f", &fx.nft_file.to_string_lossy()])
                .unwrap_or_else(|e| panic!("{e}"));
            Active::Nft
        }
        "iptables_hashlimit" => {
            let range = format!("{}-{}", agent_v4(1), agent_v4(fx.agents));
            let above = format!("{LIMIT_PPS}/sec");
            let burst = (LIMIT_PPS / 10).max(1).to_string();
            iptables(
                bed,
                &[
                    "-A",
                    "INPUT",
                    "-m",
                    "iprange",
                    "!",
                    "--src-range",
                    &range,
                    "-j",
                    "DROP",
                ],
            );
            #[rustfmt::skip]
            iptables(bed, &[
                "-A", "INPUT", "-p", "udp", "-m", "hashlimit", "--hashlimit-above", &above,
                "--hashlimit-burst", &burst, "--hashlimit-mode", "srcip",
                "--hashlimit-name", "enfbench", "--hashlimit-htable-size", "4096",
                "--hashlimit-htable-max", "65536", "-j", "DROP",
            ]);
            iptables(bed, &["-A", "INPUT", "-p", "udp", "-j", "ACCEPT"]);
            Active::Iptables
        }
        "xdp_filter" => match fx.xdpf.as_mut() {
            Some(f) => Active::XdpFilter(attach(&bed.rcv, &bed.rcv_if, f.program_mut())),
            None => Active::Nothing,
        },
        other => panic!("unknown configuration {other}"),
    };
    bed.pin_napi();
    active
}

fn teardown(bed: &mut Bed, fx: &mut Fixtures, active: Active) {
    match active {
        Active::Nothing => {}
        Active::Bench(name, id) => {
            let prog: &mut Xdp = bed
                .bench
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .expect("bench program");
            prog.detach(id).expect("detaching the bench program");
        }
        Active::Enforcer => fx.dp.detach(&bed.rcv_if).expect("detaching the enforcer"),
        Active::Nft => {
            bed.rcv
                .exec(&["nft", "delete", "table", "netdev", "enfbench"])
                .expect("deleting the nft table");
        }
        Active::Iptables => iptables(bed, &["-F", "INPUT"]),
        Active::XdpFilter(id) => {
            if let Some(f) = fx.xdpf.as_mut() {
                f.program_mut().detach(id).expect("detaching xdp-filter");
            }
        }
    }
}

fn own_counters(bed: &Bed, fx: &Fixtures, config: &str) -> Own {
    match config {
        "xdp_drop" => Some((bed.drops(), 0)),
        "enforcer_over_limit"
        | "enforcer_allowed"
        | "enforcer_tc_over_limit"
        | "enforcer_tc_allowed" => {
            let all = fx.dp_counters();
            Some(all)
        }
        "nftables_meter" => {
            let c = nft_counters(bed);
            (c.len() == 3).then(|| (c.iter().sum(), c[2]))
        }
        "iptables_hashlimit" => {
            let c = iptables_counters(bed);
            (c.len() == 3).then(|| (c.iter().sum(), c[2]))
        }
        "xdp_filter" => fx
            .xdpf
            .as_ref()
            .map(|f| (f.action_count(1) + f.action_count(2), f.action_count(2))),
        _ => None,
    }
}

impl Fixtures {
    /// (all frames counted, allowed frames) over every agent and unknown traffic.
    fn dp_counters(&self) -> (u64, u64) {
        // Counters are per CPU and summed; `maps()` needs &mut only for writes.
        let maps = self.dp_maps();
        let rows = maps.counters_upto(self.agents).expect("reading counters");
        let mut total = 0;
        let mut allowed = 0;
        for row in rows {
            for (i, c) in row.iter().enumerate() {
                total += c.packets;
                if i == Reason::Allowed as usize {
                    allowed += c.packets;
                }
            }
        }
        (total, allowed)
    }

    fn dp_maps(&self) -> enforcer::dataplane::KernelMaps {
        enforcer::dataplane::KernelMaps::from_pins(self._pins.path()).expect("opening pins")
    }
}

/// Timing of one measurement.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Flood before the window, so rings, caches and limiters settle.
    pub warmup: Duration,
    /// The measured window.
    pub window: Duration,
}

/// Finds out which of `wanted` generators this kernel can run, in order: the socket
/// generator always, live frames only if a probe succeeds.
pub fn plan_generators(wanted: &[Kind]) -> Vec<GeneratorUse> {
    let mut bed = None;
    wanted
        .iter()
        .map(|&kind| match kind {
            Kind::Socket => GeneratorUse {
                kind,
                available: true,
                why: "AF_PACKET works on every kernel; socket buffers are what agents send".into(),
            },
            Kind::Frames => {
                let bed = bed.get_or_insert_with(|| Bed::new(CpuMode::Same, Kind::Frames));
                match bed.probe_frames() {
                    Ok(()) => GeneratorUse {
                        kind,
                        available: true,
                        why: "this kernel allows BPF_PROG_TEST_RUN live frames".into(),
                    },
                    Err(e) => GeneratorUse {
                        kind,
                        available: false,
                        why: format!("this kernel refuses live frames ({e}); measured with the socket generator only"),
                    },
                }
            }
        })
        .collect()
}

/// How the packet-path section runs.
#[derive(Clone, Debug)]
pub struct Plan<'a> {
    /// Source addresses (agents) in the flood.
    pub agents: u32,
    /// Interleaved rounds per configuration, mode and generator.
    pub repeats: usize,
    /// Warm-up and window of every measurement.
    pub timing: Timing,
    /// Only these configurations (comma-separated), or all.
    pub only: Option<&'a str>,
    /// The generators to run, in order (those available).
    pub generators: &'a [Kind],
    /// The load offered in apart mode's CPU-per-packet measurement, frames/s.
    pub paced_pps: u64,
}

/// One measurement's differences: (seconds, rx_packets, in_delivers, offered frames,
/// own counters (processed, admitted) and their seconds, NAPI CPU ns).
struct Window {
    secs: f64,
    processed: u64,
    admitted: u64,
    offered_per_s: f64,
    own: Option<((u64, u64), f64)>,
    napi_ns: Option<u64>,
}

fn measure(
    bed: &mut Bed,
    fx: &Fixtures,
    config: &str,
    timing: Timing,
    agents: u32,
    interval_ns: u64,
) -> Window {
    let ((a, b, oa, ob, sa, sb, ca, cb), _) = bed.flood(&[0], agents, interval_ns, |bed| {
        thread::sleep(timing.warmup);
        let sa = (Instant::now(), bed.sent());
        let ca = bed.napi_cpu_ns();
        let a = bed.snapshot();
        let oa = (Instant::now(), own_counters(bed, fx, config));
        thread::sleep(timing.window);
        let sb = (Instant::now(), bed.sent());
        let cb = bed.napi_cpu_ns();
        let b = bed.snapshot();
        let ob = (Instant::now(), own_counters(bed, fx, config));
        (a, b, oa, ob, sa, sb, ca, cb)
    });
    let secs =
        b.at.expect("taken")
            .duration_since(a.at.expect("taken"))
            .as_secs_f64();
    Window {
        secs,
        processed: b.rx_packets.saturating_sub(a.rx_packets),
        admitted: b.in_delivers.saturating_sub(a.in_delivers),
        offered_per_s: sb.1.saturating_sub(sa.1) as f64 / sb.0.duration_since(sa.0).as_secs_f64(),
        own: match (oa.1, ob.1) {
            (Some(x), Some(y)) => Some((
                (y.0.saturating_sub(x.0), y.1.saturating_sub(x.1)),
                ob.0.duration_since(oa.0).as_secs_f64(),
            )),
            _ => None,
        },
        napi_ns: ca.zip(cb).map(|(x, y)| y.saturating_sub(x)),
    }
}

/// Samples of one configuration: processed, admitted, offered, own processed, own admitted,
/// receive CPU ns per frame, paced offered, paced processed.
type Samples = [Vec<f64>; 8];

/// Runs every configuration in both CPU modes with every generator of the plan,
/// `repeats` interleaved rounds each.
pub fn run(plan: &Plan<'_>) -> Vec<LiveResult> {
    let agents = plan.agents;
    let mut bed = Bed::new(
        CpuMode::Same,
        plan.generators.first().copied().unwrap_or(Kind::Socket),
    );
    let mut fx = Fixtures::new(agents);
    let configs: Vec<&str> = CONFIGS
        .iter()
        .copied()
        .filter(|c| plan.only.is_none_or(|o| o.split(',').any(|x| x == *c)))
        .filter(|c| *c != "xdp_filter" || fx.xdpf.is_some())
        .collect();
    let paced_interval = 1_000_000_000 / plan.paced_pps.max(1);
    let mut out = Vec::new();
    for &generator in plan.generators {
        bed.generator = generator;
        for mode in [CpuMode::Same, CpuMode::Apart] {
            bed.set_mode(mode);
            let mut samples: Vec<Samples> = vec![Default::default(); configs.len()];
            for rep in 0..plan.repeats {
                // Each round starts one configuration later, so none always runs first
                // (cold) or right after the same neighbour.
                let n = configs.len();
                for ci in (0..n).map(|i| (i + rep) % n) {
                    let config = configs[ci];
                    super::common::check_interrupted();
                    let active = setup(&mut bed, &mut fx, config);
                    let flat = measure(&mut bed, &fx, config, plan.timing, agents, 0);
                    // The receiver alone on CPU 1: its CPU per frame at one offered load.
                    let paced = (mode == CpuMode::Apart).then(|| {
                        measure(&mut bed, &fx, config, plan.timing, agents, paced_interval)
                    });
                    teardown(&mut bed, &mut fx, active);
                    let s = &mut samples[ci];
                    s[0].push(flat.processed as f64 / flat.secs);
                    s[1].push(flat.admitted as f64 / flat.secs);
                    s[2].push(flat.offered_per_s);
                    if let Some(((p, a), secs)) = flat.own {
                        s[3].push(p as f64 / secs);
                        s[4].push(a as f64 / secs);
                    }
                    let mut cpu_text = String::new();
                    if let Some(w) = &paced {
                        if let Some(ns) = w.napi_ns.filter(|_| w.processed > 0) {
                            let per = ns as f64 / w.processed as f64;
                            s[5].push(per);
                            cpu_text = format!(
                                " rx CPU {per:>5.0} ns/frame at {:.3} Mpps",
                                w.processed as f64 / w.secs / 1e6
                            );
                        }
                        s[6].push(w.offered_per_s);
                        s[7].push(w.processed as f64 / w.secs);
                    }
                    println!(
                        "  {} {mode:?} #{rep} {config:<20} processed {:>6.3} Mpps admitted {:>6.3} Mpps offered {:>6.3} Mpps{cpu_text}",
                        generator.name(),
                        s[0].last().copied().unwrap_or(0.0) / 1e6,
                        s[1].last().copied().unwrap_or(0.0) / 1e6,
                        s[2].last().copied().unwrap_or(0.0) / 1e6,
                    );
                }
            }
            for (ci, config) in configs.iter().enumerate() {
                let s = &samples[ci];
                let processed = Stat::of(&s[0]);
                let offered = Stat::of(&s[2]);
                out.push(LiveResult {
                    config: config.to_string(),
                    mode,
                    generator,
                    // Only apart mode has a receiver that could fall behind: on one shared
                    // CPU every frame sent is processed before the next is.
                    generator_bound: mode == CpuMode::Apart
                        && processed.median >= GENERATOR_BOUND * offered.median,
                    processed_pps: processed,
                    admitted_pps: Stat::of(&s[1]),
                    offered_pps: offered,
                    own_processed_pps: Stat::of(&s[3]),
                    own_admitted_pps: Stat::of(&s[4]),
                    rx_cpu_ns: Stat::of(&s[5]),
                    paced_offered_pps: Stat::of(&s[6]),
                    paced_processed_pps: Stat::of(&s[7]),
                });
            }
        }
    }
    out
}
