//! `enforcer demo`: the enforcer's main job on an embedded default. Three agents live in
//! their own network namespaces behind a gateway namespace where the real daemon runs with
//! the embedded policy (`demo/policy.toml`); a server namespace answers on a private
//! address, a cloud-metadata address and a public one. The demo sends real traffic, prints
//! what got through and the daemon's counters, then removes everything it created.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use enforcer_common::{Counter, Reason};

use crate::{
    dataplane::{KernelMaps, stats},
    lab::{self, BpffsMount, ChildGuard, Netns, TcpEchoServer, UdpSink},
    node::daemon::Status,
    out, outln,
};

/// The demo's policy, also a worked example of the policy format.
pub const POLICY: &str = include_str!("../../demo/policy.toml");

const SERVER: &str = "10.77.100.2";
const METADATA: &str = "169.254.169.254";
const PUBLIC: &str = "198.18.0.2";

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("literal address"), port)
}

struct Topology {
    gw: Netns,
    server: Netns,
    agents: Vec<(String, Netns)>,
}

fn build() -> anyhow::Result<Topology> {
    let gw = Netns::create("enfdemo-gw")?;
    let server = Netns::create("enfdemo-srv")?;
    lab::set_forwarding(&gw)?;
    lab::veth_pair(
        &gw,
        "gws",
        &["10.77.100.1/24"],
        &server,
        "eth0",
        &[&format!("{SERVER}/24")],
    )?;
    for extra in [METADATA, PUBLIC] {
        lab::add_address(&server, "lo", &format!("{extra}/32"))?;
        lab::add_route(&gw, &format!("{extra}/32"), SERVER)?;
    }
    lab::add_route(&server, "default", "10.77.100.1")?;
    let mut agents = Vec::new();
    for (i, name) in ["coder", "browser", "intern"].into_iter().enumerate() {
        let i = i + 1;
        let ns = Netns::create(&format!("enfdemo-{name}"))?;
        lab::veth_pair(
            &gw,
            &format!("demo-{name}"),
            &[&format!("10.77.{i}.1/24")],
            &ns,
            "eth0",
            &[&format!("10.77.{i}.2/24")],
        )?;
        lab::add_route(&ns, "default", &format!("10.77.{i}.1"))?;
        agents.push((name.to_string(), ns));
    }
    Ok(Topology { gw, server, agents })
}

/// Runs the demo for `seconds` of flood traffic.
pub fn run(flood: Duration) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads XDP programs: run it as root");
    }
    outln!("== building the lab: 3 agents -> gateway (enforcer) -> server");
    let topo = build().context("building the demo network namespaces")?;
    let bpffs = BpffsMount::new().context("mounting a private bpffs for the demo's pins")?;
    let dir = std::env::temp_dir().join(lab::unique_name("enfdemo"));
    fs::create_dir_all(&dir)?;
    let _cleanup = RemoveDir(dir.clone());
    fs::write(dir.join("policy.toml"), POLICY)?;
    let config = dir.join("enforcer.toml");
    fs::write(
        &config,
        format!(
            "policy = \"policy.toml\"\nbpffs = \"{}\"\nstate_dir = \"state\"\nruntime_dir = \"run\"\naudit_log = \"audit.jsonl\"\n",
            bpffs.path().display()
        ),
    )?;

    let exe = std::env::current_exe()?;
    outln!(
        "== starting `enforcer run --config {}` in the gateway",
        config.display()
    );
    let mut daemon = ChildGuard::new(
        topo.gw
            .command(&exe)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .spawn()
            .context("starting the daemon")?,
    );
    let runtime_dir = dir.join("run");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Status::read(&runtime_dir).is_none_or(|s| s.pid != daemon.id()) {
        if daemon.wait_timeout(Duration::from_millis(20))?.is_some() {
            bail!("the daemon exited during start-up (see its log above)");
        }
        if Instant::now() > deadline {
            bail!("the daemon did not report ready within 30 s");
        }
    }

    let _echo = TcpEchoServer::spawn(&topo.server, sa("0.0.0.0", 8080))?;
    let sink = UdpSink::spawn(&topo.server, sa("0.0.0.0", 9000))?;
    let agent = |name: &str| {
        &topo
            .agents
            .iter()
            .find(|(n, _)| n == name)
            .expect("demo agent")
            .1
    };

    outln!("\n== egress allow-lists (TCP connect + echo, 1 s timeout)");
    let checks = [
        ("coder", SERVER, "allowed: the team API", true),
        ("coder", METADATA, "denied: not on its list", false),
        ("browser", PUBLIC, "allowed: public internet", true),
        ("browser", SERVER, "denied: @private preset", false),
        ("browser", METADATA, "denied: @metadata preset", false),
        (
            "intern",
            METADATA,
            "monitor mode: passes, counted as would-deny",
            true,
        ),
    ];
    let mut surprises = 0;
    for (name, dst, what, expect) in checks {
        let got = lab::tcp_probe(agent(name), sa(dst, 8080), Duration::from_secs(1));
        let mark = if got == expect { "ok " } else { "!! " };
        if got != expect {
            surprises += 1;
        }
        outln!(
            "  {mark}{name:<8} -> {dst:<16} {:<9} ({what})",
            if got { "connected" } else { "blocked" }
        );
    }

    outln!(
        "\n== rate limit: `coder` floods UDP from both CPUs for {} s (limit 5000 packets/s)",
        flood.as_secs()
    );
    let bpffs_path = bpffs.path().to_path_buf();
    let before = allowed(&bpffs_path)?;
    let started = Instant::now();
    let sent = lab::udp_flood(agent("coder"), sa(SERVER, 9000), 64, flood, &[0, 1], None)?;
    let secs = started.elapsed().as_secs_f64();
    let admitted = allowed(&bpffs_path)?.packets - before.packets;
    thread::sleep(Duration::from_millis(200));
    let (received, _) = sink.stop();
    outln!(
        "  sent {:.0}/s, admitted {:.0}/s by XDP, server received {:.0}/s",
        sent as f64 / secs,
        admitted as f64 / secs,
        received as f64 / secs
    );

    outln!("\n== `enforcer stats`");
    let maps = KernelMaps::from_pins(&bpffs_path)?;
    let names = Status::read(&runtime_dir)
        .map(|s| s.agents)
        .unwrap_or_default();
    out!(
        "{}",
        crate::cli::table::stats(&stats::collect(&maps, &names)?)
    );

    outln!(
        "\n== stopping the daemon (SIGTERM leaves the pinned program enforcing) and cleaning up"
    );
    daemon.terminate(Duration::from_secs(5))?;

    // The daemon drained the ring into the log on exit: show the trail and prove it.
    let log = dir.join("audit.jsonl");
    outln!("\n== audit trail ({}), last 3 records", log.display());
    // As `enforcer audit tail` shows them.
    outln!("  {}", super::audit::tail_header());
    for line in crate::node::audit::tail(&log, 3)? {
        outln!("  {}", super::audit::tail_row(&line));
    }
    let report = crate::node::audit::verify(&log)?;
    outln!(
        "  `enforcer audit verify`: ok, {} records, hash chain intact\n",
        report.lines
    );
    drop(topo);
    drop(bpffs);
    if surprises > 0 {
        bail!("{surprises} demo checks did not behave as the policy says");
    }
    outln!("done: namespaces, pins and files removed");
    Ok(())
}

/// The coder agent's (id 1) allowed counter.
fn allowed(bpffs: &std::path::Path) -> anyhow::Result<Counter> {
    Ok(KernelMaps::from_pins(bpffs)?.counter(1, Reason::Allowed)?)
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
