//! Section 3, rate accuracy: agents limited to R (packets/s, or bytes/s) are offered 2R and
//! 10R from both CPUs at once through the veth bed; admitted/R is measured per agent from
//! the enforcer's own counters over a window that starts after the burst is spent.

use std::{thread, time::Instant};

use enforcer::{
    dataplane::{
        AttachMode, Dataplane, HookChoice,
        compile::{self, Limits},
    },
    lab::BpffsMount,
    policy,
};
use enforcer_common::Reason;
use serde::{Deserialize, Serialize};

use super::{
    bed::{Bed, CpuMode, PORT, RCV_ADDR},
    common::{Stat, agent_v4, in_ns},
    generator::Kind,
    live::Timing,
};

/// Bytes the enforcer charges per generated frame (Ethernet + IPv4 + UDP + 18 bytes; the
/// program counts the frame from the Ethernet header, without FCS).
pub const FRAME_BYTES: u64 = 60;

/// One accuracy case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccuracyResult {
    /// Agents flooding at once.
    pub agents: u32,
    /// "packets" or "bytes".
    pub limit: String,
    /// The configured rate R per agent, in packets/s or bytes/s.
    pub rate: u64,
    /// Offered load as a multiple of R (per agent).
    pub offered_x: u32,
    /// Measured offered load per agent over R.
    pub offered_ratio: f64,
    /// admitted/R across agents (min, median, max).
    pub admitted_ratio: Stat,
}

fn policy_for(agents: u32, limit: &str, rate: u64) -> String {
    let mut s = String::new();
    for id in 1..=agents {
        let rate = if limit == "packets" {
            format!(
                "packets_per_sec = {rate}, packets_burst = {}",
                (rate / 10).max(1)
            )
        } else {
            format!(
                "bytes_per_sec = {rate}, bytes_burst = {}",
                (rate / 10).max(3000)
            )
        };
        s.push_str(&format!(
            "[[agents]]\nid = {id}\nname = \"a{id}\"\nprefixes = [\"{}\"]\negress_default = \"deny\"\n\
             rate = {{ {rate} }}\n\
             [[agents.egress]]\naction = \"allow\"\nproto = \"udp\"\nports = \"{PORT}\"\nto = [\"{RCV_ADDR}\"]\n",
            agent_v4(id)
        ));
    }
    s
}

/// Runs every case: {1, 1,000} agents × {packets, bytes} × {2R, 10R}, sent by `generator`.
pub fn run(timing: Timing, only_agents: Option<u32>, generator: Kind) -> Vec<AccuracyResult> {
    let mut bed = Bed::new(CpuMode::Same, generator);
    let limits = Limits {
        max_agents: 1024,
        max_interfaces: 16,
        max_source_prefixes: 2048,
        max_destination_prefixes: 2048,
        ..Limits::default()
    };
    let pins = BpffsMount::new().expect("bpffs");
    let mut dp = Dataplane::load(pins.path(), &limits).expect("loading the enforcer");
    {
        let ifname = bed.rcv_if.clone();
        let dp = &mut dp;
        in_ns(&bed.rcv, move || {
            dp.attach(&ifname, HookChoice::Xdp, AttachMode::Native)
        })
        .expect("attaching");
    }
    let mut out = Vec::new();
    for (agents, pps) in [(1u32, 20_000u64), (1_000, 200)] {
        if only_agents.is_some_and(|a| a != agents) {
            continue;
        }
        for limit in ["packets", "bytes"] {
            let rate = if limit == "packets" {
                pps
            } else {
                pps * FRAME_BYTES
            };
            let p =
                policy::parse("accuracy.toml", &policy_for(agents, limit, rate)).expect("parsing");
            dp.apply(&compile::compile(&p, &limits, &|_| None).expect("compiling"))
                .expect("applying");
            for offered_x in [2u32, 10] {
                super::common::check_interrupted();
                for id in 1..=agents {
                    dp.maps().reset_bucket(id).expect("reset");
                }
                // Offered per agent = offered_x * pps, spread over two CPUs.
                let total_pps = offered_x as u64 * pps * agents as u64;
                let interval_ns = 2 * 1_000_000_000 / total_pps;
                let maps = enforcer::dataplane::KernelMaps::from_pins(pins.path()).expect("pins");
                let ((a, b, sa, sb, dt), _) = bed.flood(&[0, 1], agents, interval_ns, |bed| {
                    thread::sleep(timing.warmup);
                    let t0 = Instant::now();
                    let sa = bed.sent();
                    let a = maps.counters_upto(agents).expect("counters");
                    thread::sleep(timing.window);
                    let b = maps.counters_upto(agents).expect("counters");
                    let sb = bed.sent();
                    (a, b, sa, sb, t0.elapsed().as_secs_f64())
                });
                let allowed = Reason::Allowed as usize;
                let per_agent: Vec<f64> = (1..=agents as usize)
                    .map(|id| {
                        let admitted = if limit == "packets" {
                            b[id][allowed].packets - a[id][allowed].packets
                        } else {
                            b[id][allowed].bytes - a[id][allowed].bytes
                        };
                        admitted as f64 / dt / rate as f64
                    })
                    .collect();
                let offered_ratio = (sb - sa) as f64 / dt / agents as f64 / pps as f64;
                let r = AccuracyResult {
                    agents,
                    limit: limit.to_owned(),
                    rate,
                    offered_x,
                    offered_ratio,
                    admitted_ratio: Stat::of(&per_agent),
                };
                println!(
                    "  {agents:>5} agents, {limit:<7} R = {rate:>8}/s, offered {offered_x:>2}R (measured {:.2}R): admitted/R median {:.4} [{:.4} .. {:.4}]",
                    r.offered_ratio,
                    r.admitted_ratio.median,
                    r.admitted_ratio.min,
                    r.admitted_ratio.max
                );
                out.push(r);
            }
        }
    }
    dp.detach(&bed.rcv_if).expect("detaching");
    out
}
