//! The combined result: JSON, a Markdown summary with the targets, and SVG plots.

use std::{fmt::Write as _, fs, path::Path};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::{
    accuracy::AccuracyResult,
    bed::CpuMode,
    common::{Machine, Stat},
    fleet::{self, FleetResult},
    generator::Kind,
    inkernel::{CASES, Row},
    inspect::InspectResult,
    live::{self, LiveResult},
    scale::ScaleResult,
    tcp::{self, TcpSection},
};

/// How the run was configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// BPF_PROG_TEST_RUN repeat count per in-kernel sample.
    pub inkernel_repeat: u32,
    /// Interleaved in-kernel rounds.
    pub inkernel_runs: usize,
    /// Agents (source addresses) in the packet-path flood.
    pub live_agents: u32,
    /// Interleaved packet-path rounds per configuration and CPU mode.
    pub live_repeats: usize,
    /// Packet-path measuring window (ms), after a warm-up.
    pub live_window_ms: u64,
    /// Accuracy measuring window (ms), after a warm-up that spends the burst.
    pub accuracy_window_ms: u64,
    /// Offered load of the packet path's CPU-per-packet measurement (frames/s).
    #[serde(default)]
    pub paced_pps: u64,
}

/// One target from the issue, evaluated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    /// What is compared.
    pub name: String,
    /// The goal, as a sentence.
    pub goal: String,
    /// The measured value (a ratio).
    pub measured: f64,
    /// Whether the goal is met.
    pub met: bool,
    /// Why the figure may say nothing (a throughput the generator bounded), or empty.
    #[serde(default)]
    pub note: String,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Always "compare".
    pub benchmark: String,
    /// `YYYY-MM-DD`.
    pub date: String,
    /// Quick (CI) mode.
    pub quick: bool,
    /// The machine and its hygiene.
    pub machine: Machine,
    /// Run settings.
    pub settings: Settings,
    /// Section 1.
    pub inkernel: Vec<Row>,
    /// Section 2.
    pub live: Vec<LiveResult>,
    /// Section 3.
    pub accuracy: Vec<AccuracyResult>,
    /// The generators asked for, and whether each could run.
    #[serde(default)]
    pub generators: Vec<live::GeneratorUse>,
    /// Sections 4 and 5.
    pub scale: Option<ScaleResult>,
    /// Section 6 (results written before it existed have none).
    #[serde(default)]
    pub tcp: Option<TcpSection>,
    /// Section 7 (results written before it existed have none).
    #[serde(default)]
    pub fleet: Option<FleetResult>,
    /// Section 8 (results written before it existed have none).
    #[serde(default)]
    pub inspect: Option<InspectResult>,
    /// The targets, evaluated.
    pub targets: Vec<Target>,
    /// Wall time of the whole run (s).
    pub runtime_s: f64,
}

fn live_result<'a>(
    live: &'a [LiveResult],
    generator: Kind,
    config: &str,
    mode: CpuMode,
) -> Option<&'a LiveResult> {
    live.iter()
        .find(|r| r.generator == generator && r.config == config && r.mode == mode)
}

fn live_median(
    live: &[LiveResult],
    generator: Kind,
    config: &str,
    mode: CpuMode,
    admitted: bool,
) -> f64 {
    live_result(live, generator, config, mode).map_or(f64::NAN, |r| {
        if admitted {
            r.admitted_pps.median
        } else {
            r.processed_pps.median
        }
    })
}

/// Median receive CPU per frame (apart mode, paced load), ns.
fn rx_cpu(live: &[LiveResult], generator: Kind, config: &str) -> f64 {
    live_result(live, generator, config, CpuMode::Apart)
        .filter(|r| r.rx_cpu_ns.n > 0)
        .map_or(f64::NAN, |r| r.rx_cpu_ns.median)
}

/// The generators the packet-path results hold, in run order.
fn live_generators(live: &[LiveResult]) -> Vec<Kind> {
    let mut out: Vec<Kind> = Vec::new();
    for l in live {
        if !out.contains(&l.generator) {
            out.push(l.generator);
        }
    }
    out
}

/// Evaluates the targets on what was measured (missing data: no target).
pub fn targets(r: &Report) -> Vec<Target> {
    let mut t = Vec::new();
    let mut push = |name: String, goal: &str, measured: f64, met: bool, note: String| {
        if measured.is_finite() {
            t.push(Target {
                name,
                goal: goal.to_owned(),
                measured,
                met,
                note,
            });
        }
    };
    // The packet path: throughput (meaningful only where the receiver could not keep up
    // with the generator) and receive CPU per frame at one paced load (meaningful always).
    for g in live_generators(&r.live) {
        let gname = g.name();
        for mode in [CpuMode::Same, CpuMode::Apart] {
            let m = format!("{mode:?}").to_lowercase();
            let bound = |configs: &[&str]| {
                if mode == CpuMode::Same {
                    return "one CPU sends and receives: the rate is 1 / (generator + receiver cost per \
                            frame), so the ratio understates differences; see the CPU per frame"
                        .to_owned();
                }
                let bound: Vec<&str> = configs
                    .iter()
                    .copied()
                    .filter(|c| live_result(&r.live, g, c, mode).is_some_and(|l| l.generator_bound))
                    .collect();
                if bound.is_empty() {
                    String::new()
                } else {
                    format!(
                        "generator-bound ({} kept up with the generator): the ratio says nothing; see the CPU per frame",
                        bound.join(", ")
                    )
                }
            };
            let over = live_median(&r.live, g, "enforcer_over_limit", mode, false);
            let x = over / live_median(&r.live, g, "nftables_meter", mode, false);
            push(
                format!(
                    "{gname} generator: over-limit flood vs nftables meter ({m} CPU), throughput"
                ),
                ">= 3x the pps nftables processes",
                x,
                x >= 3.0,
                bound(&["enforcer_over_limit", "nftables_meter"]),
            );
            let x = over / live_median(&r.live, g, "xdp_drop", mode, false);
            push(
                format!(
                    "{gname} generator: over-limit flood vs bare XDP_DROP ({m} CPU), throughput"
                ),
                ">= 0.7x",
                x,
                x >= 0.7,
                bound(&["enforcer_over_limit", "xdp_drop"]),
            );
            let x = live_median(&r.live, g, "enforcer_allowed", mode, true)
                / live_median(&r.live, g, "no_filter", mode, true);
            push(
                format!("{gname} generator: allowed traffic vs no filter ({m} CPU), throughput"),
                ">= 0.9x the admitted pps",
                x,
                x >= 0.9,
                bound(&["enforcer_allowed", "no_filter"]),
            );
        }
        // The same goals in receive CPU per frame: a throughput ratio of x is a CPU ratio
        // of 1/x.
        let cpu = |c: &str| rx_cpu(&r.live, g, c);
        let x = cpu("nftables_meter") / cpu("enforcer_over_limit");
        push(
            format!("{gname} generator: over-limit flood vs nftables meter, receive CPU per frame"),
            ">= 3x (nftables' CPU per frame over the enforcer's)",
            x,
            x >= 3.0,
            String::new(),
        );
        let x = cpu("xdp_drop") / cpu("enforcer_over_limit");
        push(
            format!("{gname} generator: over-limit flood vs bare XDP_DROP, receive CPU per frame"),
            ">= 0.7x (XDP_DROP's CPU per frame over the enforcer's)",
            x,
            x >= 0.7,
            String::new(),
        );
        let x = cpu("no_filter") / cpu("enforcer_allowed");
        push(
            format!("{gname} generator: allowed traffic vs no filter, receive CPU per frame"),
            ">= 0.9x (no filter's CPU per frame over the enforcer's)",
            x,
            x >= 0.9,
            String::new(),
        );
        // At tc (the hook sandbox veths get): what allowed packets pay, and drops there
        // beside drops at XDP.
        let x = cpu("no_filter") / cpu("enforcer_tc_allowed");
        push(
            format!(
                "{gname} generator: allowed traffic through the tc enforcer vs no filter, receive CPU per frame"
            ),
            ">= 0.95x (no filter's CPU per frame over the tc enforcer's)",
            x,
            x >= 0.95,
            String::new(),
        );
        let x = cpu("enforcer_over_limit") / cpu("enforcer_tc_over_limit");
        push(
            format!(
                "{gname} generator: over-limit flood dropped at tc vs at XDP, receive CPU per frame"
            ),
            "reported side by side (XDP's CPU per frame over tc's; below 1: XDP drops cheaper)",
            x,
            true,
            format!(
                "XDP {:.0} ns, tc {:.0} ns per frame",
                cpu("enforcer_over_limit"),
                cpu("enforcer_tc_over_limit")
            ),
        );
    }
    if let Some(row) = r
        .inkernel
        .iter()
        .find(|row| row.agents == 100_000 && row.prefixes == 100_000)
    {
        for (fam, v) in &row.enforcer_ns {
            let worst = v[..3].iter().map(|s| s.median).fold(0.0, f64::max) / row.floor_ns.median;
            push(
                format!(
                    "in-kernel, 100k agents x 100k prefixes, {fam}, slowest of allowed/over-limit/denied"
                ),
                "<= 4x the XDP_PASS floor",
                worst,
                worst <= 4.0,
                String::new(),
            );
            // Issue 17: the guards at most double the floor.
            if let Some(g) = v.get(4) {
                let ratio = g.median / row.floor_ns.median;
                push(
                    format!(
                        "in-kernel, 100k x 100k, {fam}: an allowed new connection of an agent with every guard"
                    ),
                    "<= 2x the XDP_PASS floor",
                    ratio,
                    ratio <= 2.0,
                    format!(
                        "unguarded allowed: {:.2}x",
                        v[0].median / row.floor_ns.median
                    ),
                );
            }
            if let Some((_, x)) = row.xdp_filter_ns.iter().find(|(f, _)| f == fam) {
                let ratio = v[0].median / x[0].median;
                push(
                    format!(
                        "in-kernel, 100k x 100k, {fam}: enforcer allowed vs xdp-filter source-hit pass"
                    ),
                    "<= 1x (not slower than xdp-filter with as many rules)",
                    ratio,
                    ratio <= 1.0,
                    String::new(),
                );
            }
        }
    }
    if let Some(s) = &r.scale {
        // Issue 13: a scrape at 100,000 agents under 100 ms of CPU and 5 MB.
        let at = format!("{} agents", s.scrape_agents);
        push(
            format!("/metrics scrape at {at}, daemon CPU ms per scrape"),
            "< 100 (at 100000 agents)",
            s.cpu_ms_per_scrape,
            s.cpu_ms_per_scrape < 100.0,
            String::new(),
        );
        push(
            format!("/metrics scrape at {at}, MB per scrape"),
            "< 5 (at 100000 agents)",
            s.scrape_bytes as f64 / 1e6,
            (s.scrape_bytes as f64) < 5e6,
            String::new(),
        );
        // Issue 16: one agent added to enforcement at 100,000 agents in under 5 ms.
        if let Some(c) = &s.agent_change {
            for (what, t) in [("add", &c.add), ("remove", &c.remove)] {
                push(
                    format!(
                        "agent {what} at {} agents, ms to enforcement (median)",
                        c.agents
                    ),
                    "< 5 (at 100000 agents)",
                    t.to_enforcement_ms.median,
                    t.to_enforcement_ms.median < 5.0,
                    format!("max {:.1} ms", t.to_enforcement_ms.max),
                );
            }
        }
    }
    if let Some(section) = &r.tcp {
        tcp_targets(section, &mut push);
    }
    if let Some(f) = &r.fleet {
        // Issue 18: a publish reaches 1,000 nodes on two replicas with p99 under 2 s.
        push(
            format!(
                "fleet: {} nodes on two replicas, p99 s from publish to ACK",
                f.nodes
            ),
            &format!("< {} s", fleet::TARGET_P99_S),
            f.fleet.p99_ms / 1e3,
            f.fleet.p99_ms / 1e3 < fleet::TARGET_P99_S,
            format!(
                "{:.2}x one control plane's p99 in the same run",
                f.fleet.p99_ms / f.single.p99_ms
            ),
        );
    }
    if !r.accuracy.is_empty() {
        let lo = r
            .accuracy
            .iter()
            .map(|a| a.admitted_ratio.min)
            .fold(f64::INFINITY, f64::min);
        let hi = r
            .accuracy
            .iter()
            .map(|a| a.admitted_ratio.max)
            .fold(0.0, f64::max);
        push(
            "accuracy, lowest admitted/R of any agent in any case".into(),
            ">= 0.95",
            lo,
            lo >= 0.95,
            String::new(),
        );
        push(
            "accuracy, highest admitted/R of any agent in any case".into(),
            "<= 1.05",
            hi,
            hi <= 1.05,
            String::new(),
        );
    }
    t
}

/// Section 6's goals: TCP through the tc enforcer at least 0.9x no filter; XDP beside it;
/// the limited case within 1% of the limit, by the enforcer's count and by the goodput.
fn tcp_targets(section: &TcpSection, push: &mut impl FnMut(String, &str, f64, bool, String)) {
    let gbit = |config: &str, streams: usize| {
        section
            .results
            .iter()
            .find(|r| r.config == config && r.streams == streams)
            .map_or(f64::NAN, |r| r.gbit_s.median)
    };
    for streams in tcp::STREAMS {
        let none = gbit("no_filter", streams);
        let x = gbit("enforcer_tc", streams) / none;
        push(
            format!(
                "TCP bulk from an agent netns, {streams} stream(s): enforcer at tc vs no filter"
            ),
            ">= 0.9x the goodput",
            x,
            x >= 0.9,
            String::new(),
        );
        let x = gbit("enforcer_xdp", streams) / none;
        push(
            format!(
                "TCP bulk from an agent netns, {streams} stream(s): enforcer at XDP vs no filter"
            ),
            "reported beside tc (XDP takes the agent's TSO away)",
            x,
            true,
            String::new(),
        );
    }
    for l in &section.limited {
        let x = l.counted_ratio.max;
        push(
            format!(
                "TCP bulk with TSO against a {} Mbit/s limit at {}: wire bytes passed per second over the limit, highest round",
                l.limit_bytes_per_sec * 8 / 1_000_000,
                l.hook
            ),
            "<= 1.01",
            x,
            x <= 1.01,
            format!(
                "goodput as full-size frames: {:.3}x the limit (highest round {:.3}x)",
                l.goodput_wire_ratio.median, l.goodput_wire_ratio.max
            ),
        );
    }
}

/// Differences between measured cases that say what each step of the enforcer costs, so
/// a missed target comes with what limits it.
fn where_time_goes(r: &Report) -> String {
    let mut md = String::new();
    if let Some(row) = r.inkernel.last() {
        let _ = write!(
            md,
            "\n### Where the time goes\n\nIn-kernel, {} agents x {} prefixes (differences of medians, so \
             roughly): ",
            row.agents, row.prefixes
        );
        let mut parts = Vec::new();
        for (fam, v) in &row.enforcer_ns {
            let f = row.floor_ns.median;
            let [allowed, _, denied, unknown] =
                [v[0].median, v[1].median, v[2].median, v[3].median];
            let mut text = format!(
                "{fam}: parse + source lookup (miss) + count {:.0} ns over the floor; agent policy + \
                 destination lookup {:.0} ns more (denied); rule match + rate limiter (clock read and \
                 compare-and-swap) {:.0} ns more (allowed)",
                unknown - f,
                denied - unknown,
                allowed - denied
            );
            if let Some((_, x)) = row.xdp_filter_ns.iter().find(|(f, _)| f == fam) {
                let _ = write!(
                    text,
                    "; xdp-filter's two lookups {:.0} ns over the floor",
                    x[0].median - f
                );
            }
            parts.push(text);
        }
        md.push_str(&parts.join(". "));
        md.push_str(".\n");
    }
    // Receive CPU per frame at one paced load: the packet path's steps without the
    // generator's share.
    for g in live_generators(&r.live) {
        let ns = |config: &str| rx_cpu(&r.live, g, config);
        let over = ns("enforcer_over_limit") - ns("xdp_drop");
        let allowed = ns("enforcer_allowed") - ns("xdp_pass");
        let xdp = ns("xdp_pass") - ns("no_filter");
        if over.is_finite() && allowed.is_finite() {
            let _ = writeln!(
                md,
                "\nPacket path, {} generator, receive CPU per frame at {} kpps: the enforcer costs {:.0} ns per \
                 over-limit frame more than bare XDP_DROP ({:.0} ns), and {:.0} ns per allowed frame more than a \
                 trivial XDP_PASS program; having any XDP program on the veth costs allowed traffic {:.0} ns per \
                 frame against none (stack path {:.0} ns).",
                g.name(),
                r.settings.paced_pps / 1000,
                over,
                ns("xdp_drop"),
                allowed,
                xdp,
                ns("no_filter")
            );
        }
    }
    md
}

/// A ratio for a table cell: two decimals, or "-" where a side is missing.
fn ratio_text(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "-".into()
    }
}

fn stat_mpps(s: &Stat) -> String {
    if s.n == 0 {
        return "-".into();
    }
    format!(
        "{:.3} [{:.3}-{:.3}]",
        s.median / 1e6,
        s.min / 1e6,
        s.max / 1e6
    )
}

/// The Markdown summary.
pub fn markdown(r: &Report, stem: &str) -> String {
    let m = &r.machine;
    let mut md = format!(
        "# Comparison benchmark, {}{}\n\n{}, Linux {}, {} ({} CPUs). JIT {}, clocksource {}, \
         {} raw/packet sockets, load average {:.2} at the start and {:.2} at the end (the run's own \
         load included), hypervisor steal {:.1}%. Run time {:.0} s. Reproduce: `cargo xtask bench{}` (see [bench/README.md](../README.md)).\n\n",
        r.date,
        if r.quick { " (quick mode)" } else { "" },
        m.host,
        m.kernel,
        m.cpu,
        m.cpus,
        if m.bpf_jit_enable == "0" { "off" } else { "on" },
        m.clocksource,
        m.raw_sockets,
        m.load_start,
        m.load_end,
        m.steal_percent,
        r.runtime_s,
        if r.quick { " --quick" } else { "" },
    );
    for w in &m.warnings {
        let _ = writeln!(md, "> warning: {w}");
    }
    if !m.warnings.is_empty() {
        md.push('\n');
    }
    md.push_str("## Targets\n\nBenchmark goals from the issue, not test thresholds.\n\n| target | goal | measured | | note |\n|---|---|---:|---|---|\n");
    for t in &r.targets {
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {} | {} |",
            t.name,
            t.goal,
            t.measured,
            if t.met { "met" } else { "**missed**" },
            t.note
        );
    }
    md.push_str(&where_time_goes(r));

    if !r.inkernel.is_empty() {
        let _ = write!(
            md,
            "\n## 1. In-kernel cost\n\nBPF_PROG_TEST_RUN, repeat {} x {} interleaved rounds, median ns/packet \
             (ratio to the XDP_PASS floor from the same object). xdp-filter is Debian's `xdpfilt_dny_ip.o` \
             holding agents + prefixes address rules per family; \"src pass\" is a packet whose source is \
             listed (two lookups, passed), \"drop\" one that matches nothing (two lookups, dropped).\n\n\
             ![ns per packet](./{stem}-inkernel.svg)\n\n\
             | agents | prefixes | family | floor | allowed | over limit | denied | unknown agent | guarded | xdp-filter src pass | xdp-filter drop | apply ms |\n\
             |---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            r.settings.inkernel_repeat, r.settings.inkernel_runs
        );
        for row in &r.inkernel {
            for (fam, v) in &row.enforcer_ns {
                let _ = write!(
                    md,
                    "| {} | {} | {fam} | {:.0} |",
                    row.agents, row.prefixes, row.floor_ns.median
                );
                for s in v {
                    let _ = write!(
                        md,
                        " {:.0} ({:.2}x) |",
                        s.median,
                        s.median / row.floor_ns.median
                    );
                }
                match row.xdp_filter_ns.iter().find(|(f, _)| f == fam) {
                    Some((_, x)) => {
                        let _ = write!(md, " {:.0} | {:.0} |", x[0].median, x[1].median);
                    }
                    None => md.push_str(" - | - |"),
                }
                let _ = writeln!(md, " {:.0} |", row.apply_ms);
            }
        }
    }

    if !r.live.is_empty() {
        let _ = write!(
            md,
            "\n## 2. Packet path on a veth\n\nA generator floods 60-byte UDP frames from {} source addresses (one \
             per agent) into the receiver's veth. Generators (`--generators`; live frames only where the kernel \
             allows them):\n\n",
            r.settings.live_agents
        );
        for g in &r.generators {
            let _ = writeln!(
                md,
                "- `{}`: {}. {}: {}.",
                g.kind.name(),
                g.kind.describe(),
                if g.available { "Used" } else { "**Not used**" },
                g.why
            );
        }
        let _ = write!(
            md,
            "\n### Receive CPU per frame\n\nThe figure that compares configurations whatever the generator can do: \
             the generator on CPU 0 offers {} kpps (bursts of 64), the receiving veth's threaded NAPI runs alone \
             on CPU 1, and its CPU time (`/proc/PID/schedstat`) over the frames it processed is everything the \
             receive path spends per frame, from the XDP program to the UDP socket. The generator veth has TSO \
             off, so frames reach NAPI with and without an XDP program. Median [min-max] of {} rounds of {} ms, \
             ns per frame; ratios of medians.\n\n![receive CPU per frame](./{stem}-live.svg)\n\n\
             | configuration | generator | rx CPU ns/frame | vs no filter | vs bare XDP_DROP | vs nftables meter | processed at the paced load (Mpps) |\n\
             |---|---|---:|---:|---:|---:|---:|\n",
            r.settings.paced_pps / 1000,
            r.settings.live_repeats,
            r.settings.live_window_ms
        );
        for l in r.live.iter().filter(|l| l.mode == CpuMode::Apart) {
            let ratio =
                |other: &str| ratio_text(l.rx_cpu_ns.median / rx_cpu(&r.live, l.generator, other));
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                l.config,
                l.generator.name(),
                if l.rx_cpu_ns.n == 0 {
                    "-".to_owned()
                } else {
                    format!(
                        "{:.0} [{:.0}-{:.0}]",
                        l.rx_cpu_ns.median, l.rx_cpu_ns.min, l.rx_cpu_ns.max
                    )
                },
                ratio("no_filter"),
                ratio("xdp_drop"),
                ratio("nftables_meter"),
                stat_mpps(&l.paced_processed_pps),
            );
        }
        let _ = write!(
            md,
            "\n### Throughput\n\nThe generator flat out. Processed: frames the receiving veth's NAPI handled per \
             second (rx_packets); admitted: packets delivered to a transport protocol (`Ip: InDelivers`); own: the \
             configuration's own counters. Median [min-max] of {} interleaved rounds of {} ms, Mpps. \"same\": \
             generator and receive processing on one CPU (the rate is 1 / the cost of both); \"apart\": generator \
             on CPU 0, threaded NAPI on CPU 1. **bound** (apart only): the receiver processed at least {:.0}% \
             of what was offered, so the rate is the generator's and a ratio involving it says nothing.\n\n\
             | configuration | generator | CPU | processed | admitted | processed / bare XDP_DROP | processed / nftables meter | own processed | own admitted | offered | |\n\
             |---|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
            r.settings.live_repeats,
            r.settings.live_window_ms,
            live::GENERATOR_BOUND * 100.0
        );
        for l in &r.live {
            let ratio = |other: &str| {
                ratio_text(
                    l.processed_pps.median
                        / live_median(&r.live, l.generator, other, l.mode, false),
                )
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:?} | {} | {} | {} | {} | {} | {} | {} | {} |",
                l.config,
                l.generator.name(),
                l.mode,
                stat_mpps(&l.processed_pps),
                stat_mpps(&l.admitted_pps),
                ratio("xdp_drop"),
                ratio("nftables_meter"),
                stat_mpps(&l.own_processed_pps),
                stat_mpps(&l.own_admitted_pps),
                stat_mpps(&l.offered_pps),
                if l.generator_bound { "bound" } else { "" },
            );
        }
        md.push_str("\nConfigurations:\n\n");
        for c in live::CONFIGS {
            let _ = writeln!(md, "- `{c}`: {}", live::describe(c));
        }
    }

    if !r.accuracy.is_empty() {
        let _ = write!(
            md,
            "\n## 3. Rate accuracy\n\nEach agent limited to R, offered 2R or 10R by two generators (one per \
             CPU) at once; admitted/R per agent over a {} ms window after the burst is spent, from the \
             enforcer's counters.\n\n![accuracy](./{stem}-accuracy.svg)\n\n\
             | agents | limit | R per agent | offered (measured) | admitted/R median | min | max |\n\
             |---:|---|---:|---:|---:|---:|---:|\n",
            r.settings.accuracy_window_ms
        );
        for a in &r.accuracy {
            let _ = writeln!(
                md,
                "| {} | {} | {}/s | {}R ({:.2}R) | {:.4} | {:.4} | {:.4} |",
                a.agents,
                a.limit,
                a.rate,
                a.offered_x,
                a.offered_ratio,
                a.admitted_ratio.median,
                a.admitted_ratio.min,
                a.admitted_ratio.max
            );
        }
    }

    if let Some(s) = &r.scale {
        let _ = write!(
            md,
            "\n## 4. Policy scale\n\nThe real daemon (`enforcer run`, maps sized for {} agents, {} source and {} \
             destination prefixes) in its own namespace; `enforcer policy apply` of a policy whose agents each have \
             one source address and one allow rule. Enforcement is the flip of the program's active slot, \
             watched on the pinned state map.\n\n\
             | agents | to enforcement ms | command ms | daemon apply ms | daemon RSS MiB |\n|---:|---:|---:|---:|---:|\n",
            s.limits["max_agents"],
            s.limits["max_source_prefixes"],
            s.limits["max_destination_prefixes"]
        );
        for a in &s.applies {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} |",
                a.agents,
                a.to_enforcement_ms,
                a.command_ms,
                a.daemon_apply_ms,
                a.daemon_rss_kib as f64 / 1024.0
            );
        }
        if let Some(c) = &s.agent_change {
            let _ = write!(
                md,
                "\nOne agent added to and removed from enforcement at {} agents: `enforcer agent add` of an instance \
                 of a profile for an interface that does not exist (pending; its /32 source prefix enforced), then \
                 `enforcer agent remove`, alternately, {} times each after {} discarded (the first rewrites the slot \
                 the previous, smaller policy left). Milliseconds, median (max).\n\n\
                 | change | to enforcement | command | daemon apply |\n|---|---:|---:|---:|\n",
                c.agents, c.add.to_enforcement_ms.n, c.discarded
            );
            for (what, t) in [("agent add", &c.add), ("agent remove", &c.remove)] {
                let _ = writeln!(
                    md,
                    "| {what} | {:.1} ({:.1}) | {:.1} ({:.1}) | {:.1} ({:.1}) |",
                    t.to_enforcement_ms.median,
                    t.to_enforcement_ms.max,
                    t.command_ms.median,
                    t.command_ms.max,
                    t.daemon_apply_ms.median,
                    t.daemon_apply_ms.max
                );
            }
        }
        let _ = write!(
            md,
            "\nMap memory (kernel `memlock`; hash maps are preallocated, so this is by capacity): {:.0} bytes per \
             agent (policy in both slots, rate state, per-CPU counters for every reason, a source entry in both \
             slots), {:.0} bytes per destination prefix. All maps: {:.1} MiB.\n\n| map | entries | MiB |\n|---|---:|---:|\n",
            s.bytes_per_agent,
            s.bytes_per_prefix,
            s.maps.iter().map(|m| m.bytes).sum::<u64>() as f64 / 1048576.0
        );
        for m in &s.maps {
            let _ = writeln!(
                md,
                "| {} | {} | {:.1} |",
                m.name,
                m.max_entries,
                m.bytes as f64 / 1048576.0
            );
        }
        let _ = writeln!(
            md,
            "\n## 5. Daemon overhead\n\nCPU time of all the daemon's threads over {:.0} s. Idle: {:.3}% of one CPU. \
             One `/metrics` scrape per second with {} agents that all have traffic: {:.2}% of one CPU, \
             {:.1} ms CPU per scrape, latency {:.1} ms median, {} bytes per scrape.",
            s.seconds,
            s.idle_cpu_percent,
            s.scrape_agents,
            s.scrape_cpu_percent,
            s.cpu_ms_per_scrape,
            s.scrape_latency_ms.median,
            s.scrape_bytes
        );
        if let Some(f) = &s.flood {
            let _ = writeln!(
                md,
                "\n\nAudit flood: {} agents send denied packets flat out (test runs on the daemon's pinned program), \
                 each far over its own audit budget: {:.0} packets/s offered, {:.0} audit events/s delivered by the ring, \
                 {:.0}/s written as records of their own (the global budget), the rest in summaries. Daemon CPU {:.1}% of \
                 one CPU ({:.1}x idle in the same run), {:.1} ns per offered packet. Log growth {:.1} kB/s, {:.3}x what a \
                 record per event would write ({:.1} kB/s).",
                f.agents,
                f.offered_per_sec,
                f.events_per_sec,
                f.records_per_sec,
                f.cpu_percent,
                f.cpu_percent / f.idle_cpu_percent.max(1e-3),
                f.cpu_ns_per_offered,
                f.log_bytes_per_sec / 1e3,
                f.log_bytes_per_sec / f.per_event_log_bytes_per_sec.max(1.0),
                f.per_event_log_bytes_per_sec / 1e3
            );
        }
    }
    if let Some(t) = &r.tcp {
        let _ = write!(
            md,
            "\n## 6. TCP bulk from an agent's sandbox\n\nAn agent namespace writes flat out over one or four TCP \
             connections through its veth to a reader on the host side; goodput the reader received, {} rounds of \
             {} ms after a 500 ms warm-up, interleaved. The agent side's TSO as the kernel reported it during the \
             configuration: any XDP program on a veth takes it away.\n\n\
             | configuration | streams | Gbit/s median | min | max | vs no filter | agent TSO |\n\
             |---|---:|---:|---:|---:|---:|---|\n",
            t.rounds, t.window_ms
        );
        for res in &t.results {
            let none = t
                .results
                .iter()
                .find(|n| n.config == "no_filter" && n.streams == res.streams)
                .map_or(f64::NAN, |n| n.gbit_s.median);
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2}x | {} |",
                res.config,
                res.streams,
                res.gbit_s.median,
                res.gbit_s.min,
                res.gbit_s.max,
                res.gbit_s.median / none,
                if res.agent_tso { "on" } else { "off" }
            );
        }
        md.push_str("\nConfigurations:\n\n");
        for c in tcp::CONFIGS {
            let _ = writeln!(md, "- `{c}`: {}", tcp::describe(c));
        }
        md.push_str(
            "\nOne connection against a bytes/s limit on the agent, at each hook: the wire bytes the enforcer \
             counted as passed per second, and the reader's goodput turned into full-size Ethernet frames \
             (1514 bytes per 1448 of payload), each over the limit, after a 1 s warm-up that spends the burst.\n\n\
             | hook | limit | passed/limit median | min | max | goodput as frames/limit median | max |\n\
             |---|---:|---:|---:|---:|---:|---:|\n",
        );
        for l in &t.limited {
            let _ = writeln!(
                md,
                "| {} | {} Mbit/s | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |",
                l.hook,
                l.limit_bytes_per_sec * 8 / 1_000_000,
                l.counted_ratio.median,
                l.counted_ratio.min,
                l.counted_ratio.max,
                l.goodput_wire_ratio.median,
                l.goodput_wire_ratio.max
            );
        }
    }
    if let Some(f) = &r.fleet {
        md.push_str(&fleet_markdown(f));
    }
    if let Some(i) = &r.inspect {
        md.push_str(&inspect_markdown(i));
    }
    md
}

/// Section 8's text and tables.
fn inspect_markdown(i: &InspectResult) -> String {
    let mut md = format!(
        "\n## 8. Inspecting proxy\n\nCatalogue cost: `dlp::Detectors` searched through a `Scanner` in 16 KiB \
         reads (`feed`, then `finish`) over {} MiB corpora generated by xorshift: random bytes, base64 in \
         76-column lines, JSON lines of English-like words. Sets: none, the two literals of the inspect tests \
         (`sk-live-` block, `\"method\":\"tools/call\"` flag), the whole catalogue with its default actions. \
         Median of {} runs.\n\n\
         | corpus | set | detectors | MiB/s | µs per MiB | catalogue / this |\n\
         |---|---|---:|---:|---:|---:|\n",
        i.corpus_mib, i.runs
    );
    for r in &i.scan {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.0} | {} |",
            r.corpus,
            r.set,
            r.detectors,
            r.mib_s,
            r.us_per_mib,
            ratio_text(i.scan_ratio(&r.corpus, "catalogue", &r.set))
        );
    }
    let _ = write!(
        md,
        "\nInspected path against a plain relay: one upload of {} MiB (the JSON corpus repeated, 64 KiB body \
         frames) by a hyper client to a hyper server answering the byte count, over loopback TCP in one \
         process, through a `copy_bidirectional` relay (plain) or `inspect::http::serve` with the catalogue \
         in both directions (inspected). No TLS on either: this measures HTTP parsing and the search, not \
         encryption. Median of {} interleaved runs.\n\n\
         | protocol | path | MiB/s | min | max |\n|---|---|---:|---:|---:|\n",
        i.upload_mib, i.runs
    );
    for r in &i.paths {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.0} |",
            r.protocol, r.mode, r.mib_s, r.min_mib_s, r.max_mib_s
        );
    }
    for p in ["HTTP/1.1", "HTTP/2"] {
        let _ = writeln!(
            md,
            "| {p} | inspected / plain | {} | | |",
            ratio_text(i.path_ratio(p))
        );
    }
    md
}

/// Section 7's text and tables.
fn fleet_markdown(f: &FleetResult) -> String {
    let mut md = format!(
        "\n## 7. Control-plane fleet\n\n{} simulated nodes (the real node client, each with its own client \
         certificate, mTLS; all in one process on one tokio runtime) answer every bundle with an ACK at once. \
         Fleet: two replicas (`enforcer control-plane serve` processes) on {} etcd member, node i connected to \
         replica i mod 2 first; each publish is `etcd::Store::publish` of a {}-byte policy for all nodes. \
         Baseline, the same run: the same clients against one single-process control plane, published by \
         replacing its `default.toml` (directory scanned every {} ms). Per publish, each node's time runs from \
         the publish to its ACK; \"all ACKed\" is when the record (etcd for the fleet, the control plane's \
         `Nodes` for the baseline, polled every 20 ms once every node answered) shows every node ACKed. \
         One warm-up publish, then {} measured ones; percentiles over every node of every measured publish. \
         Every process shares the machine's CPUs with the 1,000 clients.\n\n\
         | setup | connect all s | ACK p50 ms | p99 ms | max ms | all ACKed ms median | max |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        f.nodes, f.etcd_members, f.policy_bytes, f.dir_poll_ms, f.rounds
    );
    for m in [&f.fleet, &f.single] {
        let _ = writeln!(
            md,
            "| {} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            m.mode,
            m.connect_s,
            m.p50_ms,
            m.p99_ms,
            m.max_ms,
            m.all_acked_ms.median,
            m.all_acked_ms.max
        );
    }
    let _ = writeln!(
        md,
        "| fleet / single | {} | {} | {} | {} | {} | |",
        ratio_text(f.fleet.connect_s / f.single.connect_s),
        ratio_text(f.fleet.p50_ms / f.single.p50_ms),
        ratio_text(f.fleet.p99_ms / f.single.p99_ms),
        ratio_text(f.fleet.max_ms / f.single.max_ms),
        ratio_text(f.fleet.all_acked_ms.median / f.single.all_acked_ms.median),
    );
    md.push_str(
        "\nPer publish (ms):\n\n| setup | publish | version | p50 | p99 | max | all ACKed |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for m in [&f.fleet, &f.single] {
        for (i, r) in m.rounds.iter().enumerate() {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
                m.mode,
                i + 1,
                r.version,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.all_acked_ms
            );
        }
    }
    md.push_str(
        "\nProcesses: user + system CPU while the nodes connected, and over the measured publishes (their 300 ms \
         pauses included); resident and peak resident memory afterwards.\n\n\
         | setup | process | nodes | connect CPU ms | CPU ms per publish | RSS MiB | peak MiB |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
    );
    for m in [&f.fleet, &f.single] {
        for p in &m.processes {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} |",
                m.mode,
                p.name,
                p.nodes,
                p.connect_cpu_ms,
                p.cpu_ms_per_publish,
                p.rss_kib as f64 / 1024.0,
                p.hwm_kib as f64 / 1024.0
            );
        }
    }
    md
}

/// Draws the three plots next to the summary; a plot that fails is reported, not fatal.
pub fn plots(r: &Report, dir: &Path, stem: &str) {
    type Plot = fn(&Report, &Path) -> PlotResult;
    let plots: [(&str, bool, Plot); 3] = [
        ("inkernel", !r.inkernel.is_empty(), plot_inkernel),
        ("live", !r.live.is_empty(), plot_live),
        ("accuracy", !r.accuracy.is_empty(), plot_accuracy),
    ];
    for (name, has_data, plot) in plots {
        if has_data && let Err(e) = plot(r, &dir.join(format!("{stem}-{name}.svg"))) {
            eprintln!("warning: {name} plot: {e}");
        }
    }
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

fn size_label(a: u32, p: u32) -> String {
    let k = |n: u32| {
        if n >= 1000 {
            format!("{}k", n / 1000)
        } else {
            n.to_string()
        }
    };
    format!("{}/{}", k(a), k(p))
}

fn plot_inkernel(r: &Report, path: &Path) -> PlotResult {
    let rows = &r.inkernel;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = rows
        .iter()
        .flat_map(|row| {
            row.enforcer_ns
                .iter()
                .flat_map(|(_, v)| v.iter().map(|s| s.median))
                .chain(
                    row.xdp_filter_ns
                        .iter()
                        .flat_map(|(_, x)| x.iter().map(|s| s.median)),
                )
        })
        .fold(0.0, f64::max)
        // Head room for the legend above the lines.
        * 2.3;
    let labels: Vec<String> = rows
        .iter()
        .map(|row| size_label(row.agents, row.prefixes))
        .collect();
    let n = rows.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "ns per packet (BPF_PROG_TEST_RUN) vs agents/prefixes",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            if (x - x.round()).abs() < 0.01 {
                labels.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("agents / prefixes")
        .y_desc("ns per packet")
        .draw()?;
    let mut series: Vec<(String, Vec<f64>)> = vec![(
        "XDP_PASS floor".into(),
        rows.iter().map(|x| x.floor_ns.median).collect(),
    )];
    for fam in ["ipv4", "ipv6"] {
        for (ci, case) in CASES.iter().enumerate() {
            series.push((
                format!("enforcer {case} {fam}"),
                rows.iter()
                    .map(|row| {
                        row.enforcer_ns
                            .iter()
                            .find(|(f, _)| f == fam)
                            .map_or(f64::NAN, |(_, v)| v[ci].median)
                    })
                    .collect(),
            ));
        }
        if rows.iter().any(|row| !row.xdp_filter_ns.is_empty()) {
            for (xi, what) in ["src pass", "drop"].iter().enumerate() {
                series.push((
                    format!("xdp-filter {what} {fam}"),
                    rows.iter()
                        .map(|row| {
                            row.xdp_filter_ns
                                .iter()
                                .find(|(f, _)| f == fam)
                                .map_or(f64::NAN, |(_, x)| x[xi].median)
                        })
                        .collect(),
                ));
            }
        }
    }
    for (i, (name, values)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let dashed = name.contains("ipv6");
        let points: Vec<(f64, f64)> = values
            .iter()
            .enumerate()
            .map(|(x, y)| (x as f64, *y))
            .filter(|p| p.1.is_finite())
            .collect();
        let style = ShapeStyle {
            color,
            filled: !dashed,
            stroke_width: if name.contains("floor") { 3 } else { 2 },
        };
        chart
            .draw_series(LineSeries::new(points.clone(), style))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], style));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, style)))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 11))
        .draw()?;
    root.present()?;
    Ok(())
}

fn plot_live(r: &Report, path: &Path) -> PlotResult {
    let configs: Vec<&str> = live::CONFIGS
        .iter()
        .copied()
        .filter(|c| r.live.iter().any(|l| l.config == *c))
        .collect();
    let generators = live_generators(&r.live);
    let root = SVGBackend::new(path, (1000, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = r
        .live
        .iter()
        .filter(|l| l.rx_cpu_ns.n > 0)
        .map(|l| l.rx_cpu_ns.max)
        .fold(0.0, f64::max)
        * 1.15;
    let n = configs.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "packet path on veth: receive CPU per frame at {} kpps (ns, lower is better)",
                r.settings.paced_pps / 1000
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..ymax.max(1.0))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            if (x - x.round()).abs() < 0.01 {
                configs.get(i).map(|c| c.to_string()).unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("ns per frame")
        .label_style(("sans-serif", 11))
        .draw()?;
    let width = 0.8 / generators.len().max(1) as f64;
    for (gi, &g) in generators.iter().enumerate() {
        let color = if gi == 0 { BLUE.mix(0.7) } else { RED.mix(0.7) };
        let off = -0.4 + width * (gi as f64 + 0.5);
        let mut first = true;
        for (i, c) in configs.iter().enumerate() {
            let Some(l) = live_result(&r.live, g, c, CpuMode::Apart).filter(|l| l.rx_cpu_ns.n > 0)
            else {
                continue;
            };
            let x = i as f64 + off;
            let bar = chart.draw_series(std::iter::once(Rectangle::new(
                [
                    (x - width * 0.4, 0.0),
                    (x + width * 0.4, l.rx_cpu_ns.median),
                ],
                color.filled(),
            )))?;
            if first {
                bar.label(format!("{} generator", g.name()))
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                    });
                first = false;
            }
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(x, l.rx_cpu_ns.min), (x, l.rx_cpu_ns.max)],
                BLACK.stroke_width(2),
            )))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn plot_accuracy(r: &Report, path: &Path) -> PlotResult {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let labels: Vec<String> = r
        .accuracy
        .iter()
        .map(|a| format!("{} ag {} {}R", a.agents, &a.limit[..1], a.offered_x))
        .collect();
    let n = labels.len();
    let lo = r
        .accuracy
        .iter()
        .map(|a| a.admitted_ratio.min)
        .fold(0.95, f64::min)
        - 0.02;
    let hi = r
        .accuracy
        .iter()
        .map(|a| a.admitted_ratio.max)
        .fold(1.05, f64::max)
        + 0.02;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "admitted / R per agent (median, min-max), target 0.95-1.05",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), lo..hi)?;
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            if (x - x.round()).abs() < 0.01 {
                labels.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 11))
        .y_desc("admitted / R")
        .draw()?;
    for y in [0.95, 1.0, 1.05] {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(-0.5, y), (n as f64 - 0.5, y)],
            if y == 1.0 {
                BLACK.mix(0.5).stroke_width(1)
            } else {
                RED.mix(0.6).stroke_width(1)
            },
        )))?;
    }
    for (i, a) in r.accuracy.iter().enumerate() {
        let x = i as f64;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(x, a.admitted_ratio.min), (x, a.admitted_ratio.max)],
            BLUE.stroke_width(2),
        )))?;
        chart.draw_series(std::iter::once(Circle::new(
            (x, a.admitted_ratio.median),
            4,
            BLUE.filled(),
        )))?;
    }
    root.present()?;
    Ok(())
}

/// Writes `<stem>.json`, `<stem>.md` and the plots under `dir`; returns the Markdown.
pub fn write(r: &Report, dir: &Path, stem: &str) -> String {
    fs::create_dir_all(dir).expect("creating bench/results");
    fs::write(
        dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(r).expect("json"),
    )
    .expect("writing the json");
    let md = markdown(r, stem);
    fs::write(dir.join(format!("{stem}.md")), &md).expect("writing the summary");
    plots(r, dir, stem);
    md
}
