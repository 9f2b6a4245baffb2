//! Section 2, the packet path on a veth: a generator floods UDP from one source address
//! per agent into the receiver's veth, and each configuration's processed and admitted
//! packets per second are measured there, interleaved and repeated.

use std::{
    fs, thread,
    time::{Duration, Instant},
};

use aya::programs::{Xdp, xdp::XdpMode};
use enforcer::{
    compile::{self, Compiled, Limits},
    dataplane::{AttachMode, Dataplane},
    lab::{BpffsMount, Netns},
    policy,
};
use enforcer_common::{Reason, bench as names};
use serde::{Deserialize, Serialize};

use super::{
    bed::{Bed, CpuMode, PORT, RCV_ADDR},
    common::{Stat, agent_v4, in_ns},
    xdpfilter::{self, FLAG_SRC, XdpFilter},
};

/// Per-agent limit in the over-limit configurations (packets/s, burst a tenth).
pub const LIMIT_PPS: u64 = 100;

/// The configurations, in report order.
pub const CONFIGS: [&str; 8] = [
    "no_filter",
    "xdp_pass",
    "xdp_drop",
    "enforcer_over_limit",
    "enforcer_allowed",
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

/// One configuration in one CPU mode, over all repeats.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveResult {
    /// Configuration name (see [`CONFIGS`]).
    pub config: String,
    /// CPU mode.
    pub mode: CpuMode,
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
        "enforcer_over_limit" | "enforcer_allowed" => {
            let compiled = if config == "enforcer_over_limit" {
                &fx.over
            } else {
                &fx.allowed
            };
            fx.dp.apply(compiled).expect("applying");
            for id in 1..=fx.agents {
                fx.dp.maps().reset_bucket(id).expect("resetting a bucket");
            }
            let ifname = bed.rcv_if.clone();
            let dp = &mut fx.dp;
            in_ns(&bed.rcv, move || dp.attach(&ifname, AttachMode::Native))
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
        "enforcer_over_limit" | "enforcer_allowed" => {
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

/// Runs every configuration in both CPU modes, `repeats` interleaved rounds each.
pub fn run(agents: u32, repeats: usize, timing: Timing, only: Option<&str>) -> Vec<LiveResult> {
    let mut bed = Bed::new(CpuMode::Same);
    let mut fx = Fixtures::new(agents);
    let configs: Vec<&str> = CONFIGS
        .iter()
        .copied()
        .filter(|c| only.is_none_or(|o| o.split(',').any(|x| x == *c)))
        .filter(|c| *c != "xdp_filter" || fx.xdpf.is_some())
        .collect();
    let mut out = Vec::new();
    for mode in [CpuMode::Same, CpuMode::Apart] {
        bed.set_mode(mode);
        let mut samples: Vec<[Vec<f64>; 5]> = vec![Default::default(); configs.len()];
        for rep in 0..repeats {
            // Each round starts one configuration later, so none always runs first (cold)
            // or right after the same neighbour.
            let n = configs.len();
            for ci in (0..n).map(|i| (i + rep) % n) {
                let config = &configs[ci];
                super::common::check_interrupted();
                let active = setup(&mut bed, &mut fx, config);
                let fxr = &fx;
                let ((a, b, oa, ob, sa, sb), _) = bed.flood(&[0], agents, 0, |bed| {
                    thread::sleep(timing.warmup);
                    let sa = (Instant::now(), bed.sent());
                    let a = bed.snapshot();
                    let oa = (Instant::now(), own_counters(bed, fxr, config));
                    thread::sleep(timing.window);
                    let sb = (Instant::now(), bed.sent());
                    let b = bed.snapshot();
                    let ob = (Instant::now(), own_counters(bed, fxr, config));
                    (a, b, oa, ob, sa, sb)
                });
                teardown(&mut bed, &mut fx, active);
                let dt =
                    b.at.expect("taken")
                        .duration_since(a.at.expect("taken"))
                        .as_secs_f64();
                let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / dt;
                let s = &mut samples[ci];
                s[0].push(rate(a.rx_packets, b.rx_packets));
                s[1].push(rate(a.in_delivers, b.in_delivers));
                s[2].push(
                    (sb.1.saturating_sub(sa.1)) as f64 / sb.0.duration_since(sa.0).as_secs_f64(),
                );
                if let (Some(x), Some(y)) = (oa.1, ob.1) {
                    let odt = ob.0.duration_since(oa.0).as_secs_f64();
                    s[3].push(y.0.saturating_sub(x.0) as f64 / odt);
                    s[4].push(y.1.saturating_sub(x.1) as f64 / odt);
                }
                println!(
                    "  {mode:?} #{rep} {config:<20} processed {:>6.3} Mpps admitted {:>6.3} Mpps offered {:>6.3} Mpps",
                    s[0].last().copied().unwrap_or(0.0) / 1e6,
                    s[1].last().copied().unwrap_or(0.0) / 1e6,
                    s[2].last().copied().unwrap_or(0.0) / 1e6,
                );
            }
        }
        for (ci, config) in configs.iter().enumerate() {
            let s = &samples[ci];
            out.push(LiveResult {
                config: config.to_string(),
                mode,
                processed_pps: Stat::of(&s[0]),
                admitted_pps: Stat::of(&s[1]),
                offered_pps: Stat::of(&s[2]),
                own_processed_pps: Stat::of(&s[3]),
                own_admitted_pps: Stat::of(&s[4]),
            });
        }
    }
    out
}
