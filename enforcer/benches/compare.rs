//! The enforcer side by side with what users would pick instead: in-kernel cost, the packet
//! path on a veth, rate accuracy, policy scale, daemon overhead, TCP bulk from an agent
//! namespace, a control-plane fleet of 1,000 nodes and the inspecting proxy's cost, in one run, written to
//! `bench/results/<date>-<host>[-quick].{json,md}` with SVG plots. Needs root. `--quick` is
//! the short variant CI runs; `--sections inkernel,live,accuracy,scale,tcp,fleet,inspect` runs a
//! subset (nothing is written then unless every section ran, so a partial run never replaces
//! a summary). See `bench/README.md`.

mod suite;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use suite::{
    accuracy,
    common::{self, Machine},
    fleet,
    generator::Kind,
    inkernel, inspect, live,
    report::{self, Report, Settings},
    scale, tcp,
};

fn arg_value(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

const ALL_SECTIONS: &str = "inkernel,live,accuracy,scale,tcp,fleet,inspect";

/// The load offered in the packet path's CPU-per-packet measurement (frames/s): below what
/// the slowest configuration's receive path handles on one CPU of these machines, and what
/// the socket generator reaches from one CPU, so every configuration sees the same load.
const PACED_PPS: u64 = 400_000;

/// `--render FILE.json`: writes the summary and plots of an earlier run again, next to it,
/// from its JSON (after a change to the report, without measuring again).
fn render(json: &str) {
    let path = PathBuf::from(json);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {json}: {e}"));
    let mut r: Report =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {json}: {e}"));
    r.targets = report::targets(&r);
    let dir = path.parent().map(PathBuf::from).unwrap_or_default();
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    report::write(&r, &dir, &stem);
    println!("rendered {}/{stem}.md and its plots", dir.display());
}

fn main() {
    if let Some(json) = arg_value("--render") {
        render(&json);
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "the comparison benchmark loads XDP programs and makes network namespaces: run it as root"
        );
        std::process::exit(1);
    }
    let sections = arg_value("--sections").unwrap_or_else(|| ALL_SECTIONS.into());
    let want = |s: &str| sections.split(',').any(|x| x == s);
    common::install_interrupt_handler();
    common::sweep_stale();
    let mut machine = Machine::probe();
    println!("machine: {}", machine.describe());
    for w in &machine.warnings {
        println!("warning: {w}");
    }
    let started = Instant::now();
    let settings = Settings {
        inkernel_repeat: if quick { 100_000 } else { 1_000_000 },
        // `--rounds N`: more interleaved rounds for focused work on the program.
        inkernel_runs: arg_value("--rounds")
            .map(|n| n.parse().expect("--rounds takes a number"))
            .unwrap_or(if quick { 3 } else { 9 }),
        live_agents: 1_000,
        live_repeats: if quick { 1 } else { 7 },
        live_window_ms: if quick { 400 } else { 1_000 },
        accuracy_window_ms: if quick { 1_000 } else { 3_000 },
        paced_pps: PACED_PPS,
    };
    // `--generators socket,frames`: which generators send, in order; live frames only
    // where the kernel allows them (probed), the socket generator everywhere.
    let wanted: Vec<Kind> = arg_value("--generators")
        .unwrap_or_else(|| "socket,frames".into())
        .split(',')
        .map(|name| {
            Kind::parse(name).unwrap_or_else(|| {
                panic!("--generators takes socket and/or frames, comma-separated, not {name:?}")
            })
        })
        .collect();
    let mut generators = Vec::new();
    if want("live") || want("accuracy") {
        generators = live::plan_generators(&wanted);
        for g in &generators {
            println!(
                "generator {}: {} ({})",
                g.kind.name(),
                if g.available { "used" } else { "NOT USED" },
                g.why
            );
        }
    }
    let mut usable: Vec<Kind> = generators
        .iter()
        .filter(|g| g.available)
        .map(|g| g.kind)
        .collect();
    if usable.is_empty() {
        // The next-best way, said above: sockets work on every kernel.
        usable.push(Kind::Socket);
    }
    // `--only AGENTS:PREFIXES`: one size of the in-kernel sweep.
    let only = arg_value("--only").map(|v| {
        v.split_once(':')
            .and_then(|(a, p)| Some((a.parse().ok()?, p.parse().ok()?)))
            .expect("--only takes AGENTS:PREFIXES")
    });
    let mut inkernel_rows = Vec::new();
    if want("inkernel") {
        println!(
            "\n1. in-kernel cost: BPF_PROG_TEST_RUN, repeat {} x {} interleaved rounds",
            settings.inkernel_repeat, settings.inkernel_runs
        );
        inkernel_rows = inkernel::run(
            quick,
            settings.inkernel_repeat,
            settings.inkernel_runs,
            only,
        );
    }
    let mut live_results = Vec::new();
    if want("live") {
        common::check_interrupted();
        println!(
            "\n2. packet path on veth: {} agents, {} rounds of {} ms",
            settings.live_agents, settings.live_repeats, settings.live_window_ms
        );
        let timing = live::Timing {
            warmup: Duration::from_millis(if quick { 200 } else { 300 }),
            window: Duration::from_millis(settings.live_window_ms),
        };
        let only = arg_value("--config");
        live_results = live::run(&live::Plan {
            agents: settings.live_agents,
            repeats: settings.live_repeats,
            timing,
            only: only.as_deref(),
            generators: &usable,
            paced_pps: settings.paced_pps,
        });
    }
    let mut accuracy_results = Vec::new();
    if want("accuracy") {
        common::check_interrupted();
        println!(
            "\n3. rate accuracy: {} ms windows, {} generator",
            settings.accuracy_window_ms,
            usable[0].name()
        );
        let timing = live::Timing {
            warmup: Duration::from_millis(if quick { 300 } else { 500 }),
            window: Duration::from_millis(settings.accuracy_window_ms),
        };
        accuracy_results = accuracy::run(timing, None, usable[0]);
    }
    let mut scale_result = None;
    if want("scale") {
        common::check_interrupted();
        println!("\n4-5. policy scale and daemon overhead (the real daemon)");
        scale_result = Some(scale::run(
            &[100, 10_000, 100_000],
            if quick { 2.0 } else { 10.0 },
        ));
    }
    let mut tcp_result = None;
    if want("tcp") {
        common::check_interrupted();
        println!("\n6. TCP bulk from an agent netns");
        tcp_result = Some(tcp::run(
            if quick { 1 } else { 3 },
            Duration::from_millis(if quick { 1_000 } else { 3_000 }),
        ));
    }
    let mut fleet_result = None;
    if want("fleet") {
        common::check_interrupted();
        let rounds = if quick { 3 } else { 10 };
        println!(
            "\n7. control-plane fleet: 1000 nodes, two replicas on etcd vs one control plane, {rounds} publishes each"
        );
        fleet_result = fleet::run(1_000, rounds);
    }
    let mut inspect_result = None;
    if want("inspect") {
        common::check_interrupted();
        let (corpus, upload) = if quick { (8, 32) } else { (32, 256) };
        println!(
            "\n8. inspecting proxy: detector catalogue per MiB ({corpus} MiB corpora), inspected HTTP path vs plain relay ({upload} MiB uploads)"
        );
        inspect_result = Some(inspect::run(corpus, upload, 3));
    }
    machine.finish();
    let mut r = Report {
        benchmark: "compare".to_owned(),
        date: common::today(),
        quick,
        machine,
        settings,
        inkernel: inkernel_rows,
        live: live_results,
        accuracy: accuracy_results,
        generators,
        scale: scale_result,
        tcp: tcp_result,
        fleet: fleet_result,
        inspect: inspect_result,
        targets: Vec::new(),
        runtime_s: started.elapsed().as_secs_f64(),
    };
    r.targets = report::targets(&r);
    let complete = ALL_SECTIONS.split(',').all(want);
    let dir = arg_value("--out").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/results"),
        PathBuf::from,
    );
    let stem = format!(
        "{}-{}{}{}",
        r.date,
        r.machine.host,
        if quick { "-quick" } else { "" },
        if complete { "" } else { "-partial" }
    );
    let md = report::write(&r, &dir, &stem);
    println!(
        "\n{md}\nwritten to {}/{stem}.{{json,md}} and {stem}-*.svg",
        dir.display()
    );
    println!("done in {:.0} s", r.runtime_s);
}
