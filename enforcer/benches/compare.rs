//! The enforcer side by side with what users would pick instead: in-kernel cost, the packet
//! path on a veth, rate accuracy, policy scale and daemon overhead, in one run, written to
//! `bench/results/<date>-<host>.{json,md}` with SVG plots. Needs root. `--quick` is the
//! short variant CI runs; see `bench/README.md`.

mod suite;

use std::time::{Duration, Instant};

use suite::{accuracy, common::Machine, inkernel, live};

fn arg_value(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the comparison benchmark loads XDP programs and makes namespaces: run it as root");
        std::process::exit(1);
    }
    let sections = arg_value("--sections").unwrap_or_else(|| "inkernel,live".into());
    let want = |s: &str| sections.split(',').any(|x| x == s);
    let machine = Machine::probe();
    println!("machine: {}", machine.describe());
    for w in &machine.warnings {
        println!("warning: {w}");
    }
    let started = Instant::now();
    if want("inkernel") {
        let (repeat, runs) = if quick { (100_000, 3) } else { (1_000_000, 5) };
        println!("in-kernel cost, BPF_PROG_TEST_RUN repeat {repeat} x {runs} interleaved rounds");
        let rows = inkernel::run(quick, repeat, runs, None);
        println!("{} rows", rows.len());
    }
    if want("live") {
        let timing = if quick {
            live::Timing { warmup: Duration::from_millis(200), window: Duration::from_millis(400) }
        } else {
            live::Timing { warmup: Duration::from_millis(300), window: Duration::from_secs(1) }
        };
        let res = live::run(1000, if quick { 1 } else { 5 }, timing, arg_value("--config").as_deref());
        for r in &res {
            println!("{:?} {} processed {:.3} admitted {:.3} own {:.3}/{:.3}", r.mode, r.config, r.processed_pps.median/1e6, r.admitted_pps.median/1e6, r.own_processed_pps.median/1e6, r.own_admitted_pps.median/1e6);
        }
    }
    if want("accuracy") {
        let timing = if quick {
            live::Timing { warmup: Duration::from_millis(300), window: Duration::from_secs(1) }
        } else {
            live::Timing { warmup: Duration::from_millis(500), window: Duration::from_secs(3) }
        };
        let res = accuracy::run(timing, None);
        println!("{} accuracy cases", res.len());
    }
    println!("done in {:.0} s", started.elapsed().as_secs_f64());
}
