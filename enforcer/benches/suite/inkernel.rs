//! Section 1, in-kernel cost: ns per packet through `BPF_PROG_TEST_RUN` for the enforcer's
//! verdicts (IPv4 and IPv6), a trivial XDP_PASS program from the same object, and
//! xdp-filter's program holding as many address rules, all in the same run, interleaved.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use aya::maps::{Array, Map, MapData};
use enforcer::{
    dataplane::{
        Dataplane,
        compile::{self, Limits},
        testrun::run_xdp,
    },
    lab::BpffsMount,
    policy,
};
use enforcer_common::{Bucket, TIME_SHIFT, maps, programs};
use serde::{Deserialize, Serialize};

use super::{
    common::{Agent1, Stat, agent_v4, agent_v6, policy_text, prefix_v4, prefix_v6, tcp_v4, tcp_v6},
    xdpfilter::{self, FLAG_DST, FLAG_SRC, XdpFilter},
};

/// The enforcer's measured verdicts, in report order. `guarded` is an allowed new
/// connection of an agent with every guard (breaker, connection rate, four quotas): the
/// guard stage's tail call, second parse, rule lookup and compare-and-swaps.
pub const CASES: [&str; 5] = [
    "allowed",
    "over_limit",
    "denied",
    "unknown_agent",
    "guarded",
];

/// One map size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// Agents in the policy.
    pub agents: u32,
    /// Agent 1's allow-list prefixes per family.
    pub prefixes: u32,
    /// ns/packet of the XDP_PASS floor.
    pub floor_ns: Stat,
    /// Per family ("ipv4", "ipv6"): the enforcer's cases in [`CASES`] order.
    pub enforcer_ns: Vec<(String, Vec<Stat>)>,
    /// Per family: xdp-filter passing on a source hit (two lookups) and dropping on a
    /// double miss (two lookups); empty when xdp-filter is not installed.
    pub xdp_filter_ns: Vec<(String, [Stat; 2])>,
    /// Entries per family in xdp-filter's map (= agents + prefixes).
    pub xdp_filter_rules: u32,
    /// Time to parse, compile and apply the policy in process (ms).
    pub apply_ms: f64,
}

/// Map sizes swept: full run, or the two corners in quick mode.
pub fn sizes(quick: bool) -> Vec<(u32, u32)> {
    if quick {
        vec![(1, 10), (100_000, 100_000)]
    } else {
        let mut v = Vec::new();
        for a in [1, 1_000, 100_000] {
            for p in [10, 1_000, 100_000] {
                v.push((a, p));
            }
        }
        v
    }
}

/// Limits for the in-kernel maps: room for 100,000 agents and 100,000 prefixes per family,
/// and the guarded agent after them.
pub fn limits() -> Limits {
    Limits {
        max_agents: 100_001,
        max_interfaces: 16,
        max_source_prefixes: 131_072,
        max_destination_prefixes: 262_144,
        ..Limits::default()
    }
}

/// The pinned rate-limiter state of the loaded enforcer.
fn buckets(bpffs: &std::path::Path) -> Array<MapData, Bucket> {
    let data = MapData::from_pin(bpffs.join("maps").join(maps::BUCKETS)).expect("BUCKETS pin");
    Array::try_from(Map::from_map_data(data).expect("map")).expect("array of buckets")
}

/// A bucket whose packets limiter is an hour ahead of the program's clock
/// (CLOCK_MONOTONIC, in the limiter's 1/16 ns units).
fn over_limit_bucket() -> Bucket {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64 + 3_600 * 1_000_000_000;
    Bucket {
        packet_tat: ns << TIME_SHIFT,
        byte_tat: 0,
    }
}

/// The guarded agent: every guard set, none near its limit, so every packet takes the
/// whole guard path and passes (an allowed new connection: the connection rate and both
/// connection quotas are charged too).
fn guarded_agent_text(id: u32, to4: Ipv4Addr, to6: Ipv6Addr) -> String {
    format!(
        "[[agents]]\nid = {id}\nname = \"guarded\"\nprefixes = [\"{}\", \"{}\"]\n\
         egress_default = \"deny\"\n\
         connections = {{ per_sec = 1_000_000_000, burst = 1_000_000_000 }}\n\
         quota = {{ bytes_per_hour = 8_000_000_000_000, bytes_per_day = 8_000_000_000_000, \
         connections_per_hour = 8_000_000_000_000, connections_per_day = 8_000_000_000_000 }}\n\
         breaker = {{ drops = 1_000_000, within_secs = 1 }}\n\
         [[agents.egress]]\naction = \"allow\"\nproto = \"tcp\"\nports = \"443\"\n\
         to = [\"{to4}/24\", \"{to6}/48\"]\n",
        agent_v4(id),
        agent_v6(id),
    )
}

/// `frame` with the TCP header at `l4` turned into a SYN (a new connection). The test run
/// does not check checksums.
fn syn(mut frame: Vec<u8>, l4: usize) -> Vec<u8> {
    frame[l4 + 13] = 0x02;
    frame
}

/// Runs the sweep. `repeat` is BPF_PROG_TEST_RUN's repeat count, `runs` the interleaved
/// rounds whose median is reported.
pub fn run(quick: bool, repeat: u32, runs: usize, only: Option<(u32, u32)>) -> Vec<Row> {
    let limits = limits();
    let bpffs = BpffsMount::new().expect("mounting a private bpffs");
    let mut dp = Dataplane::load(bpffs.path(), &limits).expect("loading the XDP object");
    let have_xdpf = xdpfilter::object_path().is_some();
    if !have_xdpf {
        eprintln!("warning: xdp-filter's object not found (apt install libxdp1); skipping it");
    }
    let mut rows = Vec::new();
    for (agents, prefixes) in sizes(quick) {
        super::common::check_interrupted();
        if only.is_some_and(|o| o != (agents, prefixes)) {
            continue;
        }
        let started = Instant::now();
        // Allowed packets go through the limiter (one CAS) like a real agent's: a limit far
        // above what the test run sends.
        let text = policy_text(
            agents,
            prefixes,
            Agent1 {
                pps: 1_000_000_000,
                v6: true,
            },
        );
        let guarded = agents + 1;
        let text =
            text + &guarded_agent_text(guarded, prefix_v4(prefixes / 2), prefix_v6(prefixes / 2));
        let open = policy::parse("bench.toml", &text).expect("parsing the bench policy");
        let compiled = compile::compile(&open, &limits, &|_| None).expect("compiling");
        dp.apply(&compiled).expect("applying");
        let apply_ms = started.elapsed().as_secs_f64() * 1e3;
        let taken: HashSet<u32> = (0..prefixes).map(|k| u32::from(prefix_v4(k))).collect();
        let allowed4 = Ipv4Addr::from(u32::from(prefix_v4(prefixes / 2)) + 7);
        let denied4 = (1..)
            .map(|n: u32| Ipv4Addr::from((n << 8) | 9))
            .find(|a| !taken.contains(&(u32::from(*a) & 0xffff_ff00)))
            .expect("a free /24");
        let allowed6 = Ipv6Addr::from(u128::from(prefix_v6(prefixes / 2)) + 7);
        // 2001:db8::/32 is outside 2400::/16, where every prefix lives.
        let denied6: Ipv6Addr = "2001:db8::9".parse().expect("literal");
        let v4 = [
            tcp_v4(agent_v4(1), allowed4),
            tcp_v4(agent_v4(1), denied4),
            tcp_v4(Ipv4Addr::new(192, 0, 2, 1), allowed4),
            syn(tcp_v4(agent_v4(guarded), allowed4), 14 + 20),
        ];
        let v6 = [
            tcp_v6(agent_v6(1), allowed6),
            tcp_v6(agent_v6(1), denied6),
            tcp_v6("2001:db8::1".parse().expect("literal"), allowed6),
            syn(tcp_v6(agent_v6(guarded), allowed6), 14 + 40),
        ];

        // xdp-filter with the same number of address rules per family.
        let xdpf_pins = BpffsMount::new().expect("mounting a bpffs for xdp-filter");
        let xdpf = have_xdpf.then(|| {
            let mut f = XdpFilter::load(xdpf_pins.path(), agents + prefixes)
                .unwrap_or_else(|e| panic!("{e}"));
            for id in 1..=agents {
                f.add(IpAddr::V4(agent_v4(id)), FLAG_SRC).unwrap();
                f.add(IpAddr::V6(agent_v6(id)), FLAG_SRC).unwrap();
            }
            for k in 0..prefixes {
                f.add(IpAddr::V4(prefix_v4(k)), FLAG_DST).unwrap();
                f.add(IpAddr::V6(prefix_v6(k)), FLAG_DST).unwrap();
            }
            f
        });
        // xdp-filter: source listed, destination not (two lookups, pass); neither (drop).
        let xv4 = [
            tcp_v4(agent_v4(1), denied4),
            tcp_v4(Ipv4Addr::new(192, 0, 2, 1), denied4),
        ];
        let xv6 = [
            tcp_v6(agent_v6(1), denied6),
            tcp_v6("2001:db8::1".parse().expect("literal"), denied6),
        ];

        // Interleaved rounds: every case once per round, so drift hits all alike.
        let mut s_floor = Vec::new();
        let mut s_enf = vec![vec![Vec::new(); CASES.len()]; 2];
        let mut s_xdpf = vec![vec![Vec::new(); 2]; 2];
        let ns = |prog: &aya::programs::Xdp, pkt: &[u8]| {
            run_xdp(prog, pkt, None, repeat)
                .expect("BPF_PROG_TEST_RUN")
                .duration
                .as_nanos() as f64
        };
        // Over the limit without another apply (which takes seconds at 100,000 agents): the
        // same policy, agent 1's packets limiter pushed an hour into the future, so every
        // packet takes the real over-limit path (GCRA refuses, nothing written).
        let mut buckets = buckets(bpffs.path());
        for _ in 0..runs {
            buckets
                .set(1, Bucket::default(), 0)
                .expect("resetting agent 1's bucket");
            let enforce = dp.program(programs::ENFORCE).expect("loaded");
            let floor = dp.program(programs::PASS_FLOOR).expect("loaded");
            s_floor.push(ns(floor, &v4[0]));
            for (fam, pkts) in [&v4, &v6].into_iter().enumerate() {
                s_enf[fam][0].push(ns(enforce, &pkts[0]));
                s_enf[fam][2].push(ns(enforce, &pkts[1]));
                s_enf[fam][3].push(ns(enforce, &pkts[2]));
                s_enf[fam][4].push(ns(enforce, &pkts[3]));
            }
            if let Some(f) = &xdpf {
                for (fam, pkts) in [&xv4, &xv6].into_iter().enumerate() {
                    s_xdpf[fam][0].push(ns(f.program(), &pkts[0]));
                    s_xdpf[fam][1].push(ns(f.program(), &pkts[1]));
                }
            }
            buckets
                .set(1, over_limit_bucket(), 0)
                .expect("filling agent 1's bucket");
            let enforce = dp.program(programs::ENFORCE).expect("loaded");
            for (fam, pkts) in [&v4, &v6].into_iter().enumerate() {
                s_enf[fam][1].push(ns(enforce, &pkts[0]));
            }
        }
        let fams = ["ipv4", "ipv6"];
        let row = Row {
            agents,
            prefixes,
            floor_ns: Stat::of(&s_floor),
            enforcer_ns: fams
                .iter()
                .zip(&s_enf)
                .map(|(f, v)| (f.to_string(), v.iter().map(|s| Stat::of(s)).collect()))
                .collect(),
            xdp_filter_ns: if xdpf.is_some() {
                fams.iter()
                    .zip(&s_xdpf)
                    .map(|(f, v)| (f.to_string(), [Stat::of(&v[0]), Stat::of(&v[1])]))
                    .collect()
            } else {
                Vec::new()
            },
            xdp_filter_rules: agents + prefixes,
            apply_ms,
        };
        for (fam, v) in &row.enforcer_ns {
            println!(
                "  agents {agents:>6} prefixes {prefixes:>6} {fam}: floor {:.0} ns | {} | xdp-filter {}",
                row.floor_ns.median,
                CASES
                    .iter()
                    .zip(v)
                    .map(|(c, s)| format!(
                        "{c} {:.0} ({:.2}x)",
                        s.median,
                        s.median / row.floor_ns.median
                    ))
                    .collect::<Vec<_>>()
                    .join(" "),
                row.xdp_filter_ns.iter().find(|(f, _)| f == fam).map_or(
                    "-".into(),
                    |(_, x)| format!("pass {:.0} drop {:.0}", x[0].median, x[1].median)
                )
            );
        }
        rows.push(row);
        // The xdp-filter object (and its pins) goes before the next size loads a new one.
        drop(xdpf);
        drop(xdpf_pins);
    }
    rows
}
