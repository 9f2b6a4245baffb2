//! Real traffic: agents in their own network namespaces send TCP and UDP through veths into a
//! gateway where the `enforcer` daemon has attached the XDP program; servers in another
//! namespace count what arrives.

use std::{
    thread,
    time::{Duration, Instant},
};

use enforcer::{
    lab::{self, Netns, TcpEchoServer, UdpSink, require_root, tcp_probe, udp_send},
    node::daemon::Status,
};
use enforcer_common::Reason;
use integration_tests::{Lab, METADATA, PUBLIC, SERVER_V4, SERVER_V6, sa};

const DENIED_WAIT: Duration = Duration::from_millis(800);

fn policy_two_agents() -> String {
    r#"
[[agents]]
id = 1
name = "coder"
interfaces = ["gwa1"]
egress_default = "deny"
[[agents.egress]]
action = "allow"
to = ["10.200.100.2", "fd20:100::2"]
proto = "tcp"
ports = "8080"
[[agents.egress]]
action = "allow"
to = ["10.200.100.2"]
proto = "udp"
ports = "9000"

[[agents]]
id = 2
name = "browser"
interfaces = ["gwa2"]
egress_default = "allow"
[[agents.egress]]
action = "deny"
to = ["@private", "@metadata"]
"#
    .to_string()
}

/// Agent `ns` sends 20 datagrams to UDP 9000 (allowed) and 20 to 9001 (denied) on the
/// server: every allowed one arrives, no denied one does.
fn udp_to_9000_arrives_and_to_9001_does_not(lab: &Lab, ns: &Netns) {
    let udp_ok = UdpSink::spawn(&lab.server, sa("0.0.0.0", 9000)).unwrap();
    let udp_no = UdpSink::spawn(&lab.server, sa("0.0.0.0", 9001)).unwrap();
    for (port, payload) in [(9000, b"ok"), (9001, b"no")] {
        udp_send(
            ns,
            sa(SERVER_V4, port),
            None,
            payload,
            20,
            Duration::from_millis(1),
        )
        .unwrap();
    }
    thread::sleep(Duration::from_millis(200));
    assert_eq!(udp_ok.stop().0, 20, "every allowed datagram arrives");
    assert_eq!(udp_no.stop().0, 0, "no denied datagram arrives");
}

/// The default on sandbox veths: `hook = "auto"` puts the enforcer at tc ingress.
#[test]
fn allowed_traffic_flows_and_denied_does_not() {
    if !require_root("allowed_traffic_flows_and_denied_does_not") {
        return;
    }
    allowed_and_denied("auto", "tc", tc_mode());
}

/// The same traffic with the enforcer at XDP, native mode, as on a NIC.
#[test]
fn allowed_traffic_flows_and_denied_does_not_at_xdp() {
    if !require_root("allowed_traffic_flows_and_denied_does_not_at_xdp") {
        return;
    }
    allowed_and_denied("xdp", "xdp", "native");
}

/// The daemon with only the capabilities the systemd unit grants (no CAP_SYS_ADMIN, so it
/// cannot list or open programs by id) enforces at both hooks, and `status` names its
/// program. Under these capabilities stage pruning once removed the live program's stages,
/// and tc passed everything (found by the systemd VM test).
#[test]
fn the_units_capabilities_suffice_to_enforce_at_both_hooks() {
    if !require_root("the_units_capabilities_suffice_to_enforce_at_both_hooks") {
        return;
    }
    for hook in ["auto", "xdp"] {
        let mut lab = Lab::new(1);
        lab.set_hook(hook);
        // (Agent 2's gwa2 does not exist in a one-agent lab: pending.)
        lab.write_policy(&policy_two_agents());
        lab.start_daemon_wrapped(
            &[
                "setpriv",
                "--bounding-set",
                "-all,+bpf,+net_admin,+perfmon",
                "--",
            ],
            std::iter::empty::<(&str, &str)>(),
        );
        udp_to_9000_arrives_and_to_9001_does_not(&lab, lab.agent(1));
        let hooks = lab.hooks();
        let gwa1 = &hooks["gwa1"];
        assert_eq!(gwa1["ours"], true, "{hook}: {gwa1}");
        assert!(gwa1["problem"].is_null(), "{hook}: {gwa1}");
    }
}

/// What tc ingress uses on this kernel: a tcx link from Linux 6.6, a clsact filter before.
fn tc_mode() -> &'static str {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.trim().split(['.', '-']);
    let major: u32 = parts.next().unwrap().parse().unwrap();
    let minor: u32 = parts.next().unwrap().parse().unwrap();
    if (major, minor) >= (6, 6) {
        "tcx"
    } else {
        "clsact"
    }
}

fn allowed_and_denied(hook: &str, want_hook: &str, want_mode: &str) {
    let mut lab = Lab::new(2);
    lab.set_hook(hook);
    lab.write_policy(&policy_two_agents());
    lab.start_daemon();
    // Dual-stack listeners: one socket answers IPv4 and IPv6.
    let echo = TcpEchoServer::spawn(&lab.server, sa("::", 8080)).unwrap();
    let echo_other = TcpEchoServer::spawn(&lab.server, sa("::", 8081)).unwrap();

    let a1 = lab.agent(1);
    assert!(
        tcp_probe(a1, sa(SERVER_V4, 8080), Duration::from_secs(3)),
        "allowed tcp/8080"
    );
    assert!(
        tcp_probe(a1, sa(SERVER_V6, 8080), Duration::from_secs(3)),
        "allowed v6 tcp/8080"
    );
    assert!(
        !tcp_probe(a1, sa(SERVER_V4, 8081), DENIED_WAIT),
        "tcp/8081 must be dropped"
    );
    assert!(
        !tcp_probe(a1, sa(METADATA, 8080), DENIED_WAIT),
        "metadata is not allowed"
    );
    udp_to_9000_arrives_and_to_9001_does_not(&lab, a1);

    // Agent 2: everything but private ranges and metadata.
    let a2 = lab.agent(2);
    assert!(
        tcp_probe(a2, sa(PUBLIC, 8080), Duration::from_secs(3)),
        "public address allowed"
    );
    assert!(
        !tcp_probe(a2, sa(SERVER_V4, 8080), DENIED_WAIT),
        "@private blocks 10/8"
    );
    assert!(
        !tcp_probe(a2, sa(METADATA, 8080), DENIED_WAIT),
        "@metadata blocked"
    );

    // The kernel reports the hook and mode it runs the program in, and that it is this
    // daemon's.
    for (interface, h) in lab.hooks() {
        assert_eq!(h["hook"], want_hook, "{interface}: {h}");
        assert_eq!(h["mode"], want_mode, "{interface}: {h}");
        assert_eq!(h["ours"], true, "{interface}: {h}");
    }

    let maps = lab.maps();
    assert!(maps.counter(1, Reason::Allowed).unwrap().packets > 0);
    assert!(maps.counter(1, Reason::EgressDenied).unwrap().packets >= 20 + 2);
    assert!(maps.counter(2, Reason::EgressDenied).unwrap().packets >= 2);
    assert!(maps.counter(2, Reason::Allowed).unwrap().packets > 0);
    assert!(
        echo.accepted() >= 3,
        "three allowed connections reached the server"
    );
    assert_eq!(echo_other.accepted(), 0);

    // The CLI reads the same counters from the pins.
    let out = lab.cli(&[
        "stats",
        "--json",
        "--config",
        lab.config_path().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let coder = stats["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == 1)
        .unwrap();
    assert_eq!(coder["name"], "coder");
    assert!(
        coder["reasons"]["egress_denied"]["packets"]
            .as_u64()
            .unwrap()
            >= 22
    );
}

/// Generic (skb) XDP, the mode `xdp_mode = "auto"` falls back to on a driver without
/// native XDP: the same program must allow, deny and rate-limit real sockets' traffic, and
/// `status` must say which mode the kernel runs.
#[test]
fn generic_xdp_enforces_real_traffic() {
    if !require_root("generic_xdp_enforces_real_traffic") {
        return;
    }
    let mut lab = Lab::new(2);
    lab.set_hook("xdp");
    lab.set_xdp_mode("generic");
    lab.write_policy(
        r#"
[[agents]]
id = 1
name = "coder"
interfaces = ["gwa1"]
egress_default = "deny"
[[agents.egress]]
action = "allow"
to = ["10.200.100.2", "fd20:100::2"]
proto = "tcp"
ports = "8080"
[[agents.egress]]
action = "allow"
to = ["10.200.100.2"]
proto = "udp"
ports = "9000"

[[agents]]
id = 2
name = "looper"
interfaces = ["gwa2"]
egress_default = "allow"
rate = { packets_per_sec = 100, packets_burst = 50 }
"#,
    );
    lab.start_daemon();
    let hooks = lab.hooks();
    assert_eq!(hooks.len(), 2, "{hooks:?}");
    for (interface, hook) in &hooks {
        assert_eq!(hook["mode"], "generic", "{interface}: {hook}");
        assert_eq!(hook["ours"], true, "{interface}: {hook}");
        assert!(hook["problem"].is_null(), "{interface}: {hook}");
    }
    let out = lab.cli(&["status", "--config", lab.config_path().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    for interface in ["gwa1", "gwa2"] {
        assert!(
            text.lines().any(|l| l.contains(interface)
                && l.contains("xdp generic")
                && l.contains("this daemon's program")),
            "status names {interface}'s mode:\n{text}"
        );
    }

    let echo = TcpEchoServer::spawn(&lab.server, sa("::", 8080)).unwrap();
    let a1 = lab.agent(1);
    assert!(tcp_probe(a1, sa(SERVER_V4, 8080), Duration::from_secs(3)));
    assert!(tcp_probe(a1, sa(SERVER_V6, 8080), Duration::from_secs(3)));
    assert!(!tcp_probe(a1, sa(SERVER_V4, 8081), DENIED_WAIT));
    udp_to_9000_arrives_and_to_9001_does_not(&lab, a1);
    assert_eq!(echo.accepted(), 2);

    // Agent 2 floods: the burst passes, then about 100 a second. One datagram first, so
    // the neighbour entry exists and no datagram waits in (or overflows) its queue.
    let sink = UdpSink::spawn(&lab.server, sa("0.0.0.0", 9002)).unwrap();
    let a2 = lab.agent(2);
    udp_send(a2, sa(SERVER_V4, 9002), None, b"warm", 1, Duration::ZERO).unwrap();
    thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let sent = 1 + udp_send(a2, sa(SERVER_V4, 9002), None, b"x", 2000, Duration::ZERO).unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(200));
    let received = sink.stop().0;
    let maps = lab.maps();
    let limited = maps.counter(2, Reason::RateLimitedPackets).unwrap().packets;
    eprintln!("sent {sent} in {elapsed:.3} s, received {received}, rate-limited {limited}");
    assert_eq!(sent, 2001);
    assert!(received >= 50, "the burst passes: {received}");
    assert!(
        received as f64 <= 50.0 + 100.0 * (elapsed + 0.4) + 1.0,
        "at most burst + rate x time: {received} in {elapsed:.3} s"
    );
    assert_eq!(
        limited,
        sent - received,
        "every datagram not received was rate-limited"
    );
    // 20 datagrams and at least one SYN to 8081.
    assert!(maps.counter(1, Reason::EgressDenied).unwrap().packets > 20);
}

#[test]
fn monitor_mode_passes_and_counts() {
    if !require_root("monitor_mode_passes_and_counts") {
        return;
    }
    let mut lab = Lab::new(1);
    lab.write_policy(
        r#"
[[agents]]
id = 1
name = "watched"
prefixes = ["10.200.1.2"]
mode = "monitor"
egress_default = "deny"
"#,
    );
    lab.start_daemon();
    let _echo = TcpEchoServer::spawn(&lab.server, sa("0.0.0.0", 8080)).unwrap();
    let a1 = lab.agent(1);
    assert!(
        tcp_probe(a1, sa(SERVER_V4, 8080), Duration::from_secs(3)),
        "monitor mode passes"
    );
    let maps = lab.maps();
    let would = maps.counter(1, Reason::MonitorEgressDenied).unwrap();
    assert!(
        would.packets >= 3,
        "handshake and data counted as would-deny: {would:?}"
    );
    assert_eq!(maps.counter(1, Reason::EgressDenied).unwrap().packets, 0);
}

/// Floods from two CPUs at several times the limit and checks the admitted rate over the
/// steady state (burst excluded) is within 5% of the configured rate. `coarse` is whether
/// the compile step let the agent use the coarse clock (bursts of 40 ms or more).
fn flood_accuracy(
    policy: &str,
    payload: usize,
    expected_per_sec: f64,
    unit: fn(enforcer_common::Counter) -> u64,
    coarse: bool,
) {
    let mut lab = Lab::new(1);
    lab.write_policy(policy);
    lab.start_daemon();
    let flags = lab.maps().agent_policy(1).unwrap().flags;
    assert_eq!(
        flags & enforcer_common::AGENT_COARSE_CLOCK != 0,
        coarse,
        "clock choice"
    );
    let sink = UdpSink::spawn(&lab.server, sa("0.0.0.0", 9000)).unwrap();
    let agent = lab.agent(1).name().to_owned();
    let flood_ns = lab.agent(1);
    let bpffs = lab.bpffs().to_owned();
    let duration = Duration::from_secs(7);
    let sampler = thread::spawn(move || {
        let maps = enforcer::dataplane::KernelMaps::from_pins(&bpffs).unwrap();
        // The two CPUs are flooding, so this thread can be preempted mid-read (once by
        // 350 ms, which skewed a 5 s window by 7%): a sample counts only if the clock
        // read before and after its counters is at most 5 ms apart.
        let read = |maps: &enforcer::dataplane::KernelMaps| loop {
            let before = Instant::now();
            let allowed = unit(maps.counter(1, Reason::Allowed).unwrap());
            let limited = unit(maps.counter(1, Reason::RateLimitedPackets).unwrap())
                + unit(maps.counter(1, Reason::RateLimitedBytes).unwrap());
            let after = Instant::now();
            if after - before <= Duration::from_millis(5) {
                return (before + (after - before) / 2, allowed, limited);
            }
        };
        // Skip the first second: the burst and the senders' ramp-up.
        thread::sleep(Duration::from_millis(1500));
        let start = read(&maps);
        thread::sleep(Duration::from_secs(5));
        let end = read(&maps);
        (start, end)
    });
    let sent = enforcer::lab::udp_flood(
        flood_ns,
        sa(SERVER_V4, 9000),
        payload,
        duration,
        &[0, 1],
        None,
    )
    .unwrap();
    let ((t0, a0, l0), (t1, a1, l1)) = sampler.join().unwrap();
    let received = sink.stop();
    let secs = (t1 - t0).as_secs_f64();
    let admitted = (a1 - a0) as f64 / secs;
    let offered = admitted + (l1 - l0) as f64 / secs;
    let ratio = admitted / expected_per_sec;
    eprintln!(
        "{agent}: sent {sent} datagrams; admitted {admitted:.0}/s, offered {offered:.0}/s, \
         limit {expected_per_sec:.0}/s, ratio {ratio:.4}; server received {received:?}"
    );
    assert!(
        offered >= 2.0 * expected_per_sec,
        "flood too weak to test the limit: {offered:.0}/s"
    );
    assert!(
        (0.95..=1.05).contains(&ratio),
        "admitted/limit = {ratio:.4}, outside 0.95..=1.05"
    );
}

#[test]
fn udp_flood_from_two_cpus_is_held_to_the_packet_rate() {
    if !require_root("udp_flood_from_two_cpus_is_held_to_the_packet_rate") {
        return;
    }
    flood_accuracy(
        r#"
[[agents]]
id = 1
name = "flooder"
interfaces = ["gwa1"]
egress_default = "allow"
rate = { packets_per_sec = 20000, packets_burst = 2000 }
"#,
        64,
        20_000.0,
        |c| c.packets,
        true,
    );
}

#[test]
fn udp_flood_with_a_small_burst_is_held_to_the_rate_on_the_precise_clock() {
    if !require_root("udp_flood_with_a_small_burst_is_held_to_the_rate_on_the_precise_clock") {
        return;
    }
    // A 5 ms burst: shorter than a few ticks, so the limiter reads the precise clock.
    flood_accuracy(
        r#"
[[agents]]
id = 1
name = "flooder"
interfaces = ["gwa1"]
egress_default = "allow"
rate = { packets_per_sec = 20000, packets_burst = 100 }
"#,
        64,
        20_000.0,
        |c| c.packets,
        false,
    );
}

#[test]
fn udp_flood_from_two_cpus_is_held_to_the_byte_rate() {
    if !require_root("udp_flood_from_two_cpus_is_held_to_the_byte_rate") {
        return;
    }
    // 1000-byte payloads make 1042-byte frames; 20 MB/s admits about 19,200 of them a second.
    flood_accuracy(
        r#"
[[agents]]
id = 1
name = "flooder"
interfaces = ["gwa1"]
egress_default = "allow"
rate = { bytes_per_sec = 20000000, bytes_burst = 2000000 }
"#,
        1000,
        20_000_000.0,
        |c| c.bytes,
        true,
    );
}

#[test]
fn restart_keeps_enforcing_throughout() {
    if !require_root("restart_keeps_enforcing_throughout") {
        return;
    }
    let mut lab = Lab::new(1);
    lab.write_policy(
        policy_two_agents()
            .split("[[agents]]\nid = 2")
            .next()
            .unwrap(),
    );
    lab.start_daemon();
    let allowed = UdpSink::spawn(&lab.server, sa("0.0.0.0", 9000)).unwrap();
    let denied = UdpSink::spawn(&lab.server, sa("0.0.0.0", 9001)).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let a1 = lab.agent(1);
    // Probe continuously on both ports while the daemon goes away and comes back.
    let prober = {
        let stop = stop.clone();
        let ns_path = a1.path();
        thread::spawn(move || {
            let file = std::fs::File::open(ns_path).unwrap();
            // SAFETY: setns on this thread only, with an fd we own.
            assert_eq!(
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) },
                0
            );
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let (mut sent_allowed, mut sent_denied) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if socket.send_to(b"a", sa(SERVER_V4, 9000)).is_ok() {
                    sent_allowed += 1;
                }
                if socket.send_to(b"d", sa(SERVER_V4, 9001)).is_ok() {
                    sent_denied += 1;
                }
                thread::sleep(Duration::from_micros(500));
            }
            (sent_allowed, sent_denied)
        })
    };
    thread::sleep(Duration::from_millis(300));
    // SIGTERM: the daemon exits, the pinned program keeps enforcing.
    lab.stop_daemon(libc::SIGTERM);
    let during_gap = allowed.counts().0;
    thread::sleep(Duration::from_millis(500));
    assert!(
        allowed.counts().0 > during_gap,
        "allowed traffic keeps flowing with no daemon"
    );
    // Restart: the pinned link is switched to the new program atomically.
    lab.start_daemon();
    thread::sleep(Duration::from_millis(300));
    // SIGKILL: no clean-up at all, still enforcing.
    lab.stop_daemon(libc::SIGKILL);
    thread::sleep(Duration::from_millis(300));
    lab.start_daemon();
    thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent_allowed, sent_denied) = prober.join().unwrap();
    thread::sleep(Duration::from_millis(100));
    let (ok, _) = allowed.stop();
    let (leaked, _) = denied.stop();
    eprintln!(
        "sent {sent_allowed} allowed, {sent_denied} denied; received {ok} allowed, {leaked} denied"
    );
    assert_eq!(leaked, 0, "a denied datagram got through during a restart");
    assert_eq!(ok, sent_allowed, "allowed traffic was interrupted");
    assert_eq!(
        lab.maps().counter(1, Reason::EgressDenied).unwrap().packets,
        sent_denied
    );
}

#[test]
fn reload_applies_and_rejects_atomically() {
    if !require_root("reload_applies_and_rejects_atomically") {
        return;
    }
    let mut lab = Lab::new(1);
    let deny_all = "[[agents]]\nid = 1\nname = \"coder\"\ninterfaces = [\"gwa1\"]\negress_default = \"deny\"\n";
    lab.write_policy(deny_all);
    lab.start_daemon();
    let _echo = TcpEchoServer::spawn(&lab.server, sa("0.0.0.0", 8080)).unwrap();
    let a1 = lab.agent(1);
    assert!(!tcp_probe(a1, sa(SERVER_V4, 8080), DENIED_WAIT));
    let generation = lab.status().generation;

    // `policy apply` with a policy that allows the server: the daemon reloads.
    let allow = lab.write_file(
        "allow.toml",
        &format!("{deny_all}[[agents.egress]]\naction = \"allow\"\nto = [\"10.200.100.0/24\"]\nproto = \"tcp\"\nports = \"8080\"\n"),
    );
    let config = lab.config_path();
    let out = lab.cli(&[
        "policy",
        "apply",
        allow.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lab.status().generation, generation + 1);
    assert!(
        tcp_probe(a1, sa(SERVER_V4, 8080), Duration::from_secs(3)),
        "allowed after apply"
    );
    // What enforces is the policy file, so a SIGHUP or a restart keeps it.
    let policy_file = lab.dir.join("policy.toml");
    let applied = std::fs::read_to_string(&allow).unwrap();
    assert_eq!(std::fs::read_to_string(&policy_file).unwrap(), applied);

    // A policy that parses but does not fit the maps (max_agents is 64) is refused, and
    // the policy file stays the enforcing one.
    let too_big = lab.write_file("too-big.toml", &deny_all.replace("id = 1", "id = 999"));
    let out = lab.cli(&[
        "policy",
        "apply",
        too_big.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has id 999"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lab.status().generation, generation + 1);
    assert_eq!(std::fs::read_to_string(&policy_file).unwrap(), applied);

    // A bad policy is refused by the CLI with file, line and field, exit code 2; the running
    // policy keeps enforcing.
    let bad = lab.write_file(
        "bad.toml",
        &format!("{deny_all}[[agents.egress]]\naction = \"allow\"\nto = [\"10.200.100.0/33\"]\n"),
    );
    let out = lab.cli(&[
        "policy",
        "apply",
        bad.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml:8:"),
        "error names file and line: {stderr}"
    );
    assert_eq!(lab.status().generation, generation + 1);
    assert!(
        tcp_probe(a1, sa(SERVER_V4, 8080), Duration::from_secs(3)),
        "still enforcing the last good policy"
    );

    // A policy file that breaks behind the daemon's back is rejected on SIGHUP, the same way.
    let attempts = lab.status().attempts;
    // (An agent id beyond the lab's max_agents of 64.)
    lab.write_policy("[[agents]]\nid = 999\nname = \"coder\"\ninterfaces = [\"gwa1\"]\n");
    lab.signal_daemon(libc::SIGHUP);
    let status = lab.wait_attempts(attempts);
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("has id 999"),
        "{status:?}"
    );
    assert_eq!(status.generation, generation + 1);
    assert!(
        tcp_probe(a1, sa(SERVER_V4, 8080), Duration::from_secs(3)),
        "last good policy still enforcing"
    );

    // SIGHUP with a good file applies it.
    lab.write_policy(deny_all);
    lab.signal_daemon(libc::SIGHUP);
    let status = lab.wait_attempts(attempts + 1);
    assert_eq!(status.last_error, None);
    assert_eq!(status.generation, generation + 2);
    assert!(
        !tcp_probe(a1, sa(SERVER_V4, 8080), DENIED_WAIT),
        "denied again after reload"
    );
}

/// A sandbox's interface that does not exist when the daemon starts is pending, not an
/// error: the daemon starts and enforces the other agents, attaches when rtnetlink reports
/// the interface, forgets it when it is deleted, and attaches again when it comes back under
/// a new index. Each time the sandbox's traffic is judged by its policy.
#[test]
fn a_late_interface_is_pending_then_enforced_across_recreation() {
    if !require_root("a_late_interface_is_pending_then_enforced_across_recreation") {
        return;
    }
    let mut lab = Lab::new(2);
    lab.gw.ip(&["link", "del", "gwa1"]).unwrap();
    lab.write_policy(&policy_two_agents());
    lab.start_daemon();
    let status = lab.status();
    assert_eq!(status.pending, ["gwa1"], "{status:?}");
    assert_eq!(status.interfaces, ["gwa2"], "{status:?}");
    let wait_for = |what: &str, done: &dyn Fn(&Status) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = lab.status();
            if done(&status) {
                return status;
            }
            assert!(Instant::now() < deadline, "{what}: {status:?}");
            thread::sleep(Duration::from_millis(20));
        }
    };
    let mut indexes = Vec::new();
    for _ in 0..2 {
        lab::veth_pair(
            &lab.gw,
            "gwa1",
            &["10.200.1.1/24", "fd20:1::1/64"],
            lab.agent(1),
            "eth0",
            &["10.200.1.2/24", "fd20:1::2/64"],
        )
        .unwrap();
        lab::add_route(lab.agent(1), "default", "10.200.1.1").unwrap();
        indexes.push(lab::ifindex(&lab.gw, "gwa1").unwrap());
        wait_for("gwa1 attached", &|s| {
            s.pending.is_empty() && s.interfaces.contains(&"gwa1".to_string())
        });
        udp_to_9000_arrives_and_to_9001_does_not(&lab, lab.agent(1));
        lab.gw.ip(&["link", "del", "gwa1"]).unwrap();
        wait_for("gwa1 pending again", &|s| {
            s.pending == ["gwa1"] && !s.interfaces.contains(&"gwa1".to_string())
        });
    }
    assert_ne!(indexes[0], indexes[1], "the second sandbox had a new index");
    // Agent 2 (private addresses denied) was enforced all along; the daemon never restarted.
    let sink = UdpSink::spawn(&lab.server, sa("0.0.0.0", 9000)).unwrap();
    let sent = udp_send(
        lab.agent(2),
        sa(SERVER_V4, 9000),
        None,
        b"no",
        20,
        Duration::from_millis(1),
    )
    .unwrap();
    assert_eq!(sent, 20);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(sink.stop().0, 0, "agent 2 is still enforced");
    assert!(lab.status().daemon_alive());
}

/// VLAN-tagged frames from an agent's namespace, written to its veth by an `AF_PACKET`
/// socket (socket buffers through `veth_xmit`, as the agent's stack sends; no 8021q module
/// needed) with one, two and three 802.1Q tags in the frame. Before tc the gateway's
/// receive path moves the outer tag into the socket buffer's metadata, so at tc the parser
/// must count that tag as if it were in the frame; XDP on the veth sees every tag in the
/// frame. At both hooks one- and two-tag frames are judged by their IP header (allowed, or
/// denied by the rules) and three tags, one more than the parser follows, are malformed
/// for a restricted agent: the counters say which.
#[test]
fn vlan_tagged_frames_are_judged_alike_at_both_hooks() {
    if !require_root("vlan_tagged_frames_are_judged_alike_at_both_hooks") {
        return;
    }
    for hook in ["tc", "xdp"] {
        let mut lab = Lab::new(1);
        lab.set_hook(hook);
        lab.write_policy(
            r#"
[[agents]]
id = 1
name = "tagged"
interfaces = ["gwa1"]
egress_default = "deny"
[[agents.egress]]
action = "allow"
to = ["10.200.100.2"]
proto = "udp"
ports = "9000"
"#,
        );
        lab.start_daemon();
        let h = lab.hooks();
        assert_eq!(h["gwa1"]["hook"], hook, "{h:?}");
        let a1 = lab.agent(1);
        let maps = lab.maps();
        let count = |reason| maps.counter(1, reason).unwrap().packets;
        for (tags, port, reason) in [
            (1, 9000, Reason::Allowed),
            (1, 9001, Reason::EgressDenied),
            (2, 9000, Reason::Allowed),
            (2, 9001, Reason::EgressDenied),
            (3, 9000, Reason::Malformed),
        ] {
            let before = count(reason);
            send_frames(a1, "eth0", &tagged_udp4(tags, port), 20);
            let deadline = Instant::now() + Duration::from_secs(2);
            while count(reason) < before + 20 && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(
                count(reason) - before,
                20,
                "{hook}: {tags} tag(s) to udp/{port} counted as {reason:?}"
            );
        }
    }
}

/// A UDP datagram from agent 1 to the server's `port`, in a frame with `tags` 802.1Q tags
/// (VLAN ids 10, 20, 30 from the outside in).
fn tagged_udp4(tags: usize, port: u16) -> Vec<u8> {
    let mut frame = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 200, 1, 2], [10, 200, 100, 2], 64)
        .udp(40000, port)
        .write(&mut frame, b"tagged")
        .unwrap();
    // Innermost first, each at offset 12: the frame's ethertype ends up after the last.
    for id in [10u16, 20, 30][..tags].iter().rev() {
        let tag = [0x81, 0x00, (id >> 8) as u8, *id as u8];
        frame.splice(12..12, tag);
    }
    frame
}

/// Writes `frame` `count` times to `ifname` in `ns` through an `AF_PACKET` socket.
fn send_frames(ns: &Netns, ifname: &str, frame: &[u8], count: usize) {
    let frame = frame.to_vec();
    let ifname = std::ffi::CString::new(ifname).unwrap();
    enforcer::lab::in_netns(ns, move || {
        // SAFETY: plain socket calls on a descriptor this closure owns and closes; the
        // address and buffers live across each call.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = libc::if_nametoindex(ifname.as_ptr()) as i32;
            addr.sll_halen = 6;
            for _ in 0..count {
                let n = libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(
                    n,
                    frame.len() as isize,
                    "{}",
                    std::io::Error::last_os_error()
                );
            }
            libc::close(fd);
        }
    });
}

fn policy_reject() -> String {
    r#"
[[agents]]
id = 1
name = "coder"
interfaces = ["gwa1"]
egress_default = "allow"
[[agents.egress]]
action = "reject"
to = ["10.200.100.2", "fd20:100::2"]
proto = "tcp"
ports = "8081"
[[agents.egress]]
action = "reject"
to = ["10.200.100.2", "fd20:100::2"]
proto = "udp"
ports = "9001"
[[agents.egress]]
action = "deny"
to = ["10.200.100.2"]
proto = "tcp"
ports = "8082"
"#
    .to_string()
}

/// The error a connected UDP socket in `ns` reports after sending one datagram to `dst`
/// (`None`: no error, the datagram went unanswered for 2 s or was answered).
fn udp_error_after_send(ns: &Netns, dst: std::net::SocketAddr) -> Option<i32> {
    lab::in_netns(ns, move || {
        let bind = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let socket = std::net::UdpSocket::bind(bind).unwrap();
        socket.connect(dst).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        socket.send(b"knock").unwrap();
        let mut buf = [0u8; 64];
        match socket.recv(&mut buf) {
            Ok(_) => None,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => e.raw_os_error(),
        }
    })
}

/// `connect()` from `ns` to `dst` with a timeout, as its error kind (`None`: connected).
fn connect_error(
    ns: &Netns,
    dst: std::net::SocketAddr,
    timeout: Duration,
) -> Option<std::io::ErrorKind> {
    lab::in_netns(ns, move || {
        std::net::TcpStream::connect_timeout(&dst, timeout)
            .err()
            .map(|e| e.kind())
    })
}

/// A `reject` rule makes the agent's calls fail at once: `connect()` is refused by the RST
/// the enforcer sends back, and a connected UDP socket gets the ICMP unreachable's error,
/// while a `deny` rule to a listening port times out. Servers listen on every rejected
/// port, so a refusal can only come from the enforcer.
fn rejects_fail_calls_at_once(hook: &str, xdp_mode: &str) {
    let mut lab = Lab::new(1);
    lab.set_hook(hook);
    lab.set_xdp_mode(xdp_mode);
    lab.write_policy(&policy_reject());
    lab.start_daemon();
    let want = if hook == "auto" { "tc" } else { "xdp" };
    let hooks = lab.hooks();
    assert_eq!(hooks["gwa1"]["hook"], want, "{hooks:?}");
    let rejected = TcpEchoServer::spawn(&lab.server, sa("::", 8081)).unwrap();
    let denied = TcpEchoServer::spawn(&lab.server, sa("::", 8082)).unwrap();
    let open = TcpEchoServer::spawn(&lab.server, sa("::", 8080)).unwrap();
    // Dual-stack, like the TCP listeners.
    let sink = UdpSink::spawn(&lab.server, sa("::", 9001)).unwrap();
    let a1 = lab.agent(1);
    let what = format!("hook {hook}, xdp_mode {xdp_mode}");

    assert_eq!(
        connect_error(a1, sa(SERVER_V4, 8080), Duration::from_secs(5)),
        None,
        "{what}: allowed tcp/8080 connects"
    );
    for server in [SERVER_V4, SERVER_V6] {
        assert_eq!(
            connect_error(a1, sa(server, 8081), Duration::from_secs(5)),
            Some(std::io::ErrorKind::ConnectionRefused),
            "{what}: rejected tcp/8081 on {server} is refused at once"
        );
    }
    // Linux reports ICMP "administratively prohibited" as EHOSTUNREACH on IPv4 and its
    // ICMPv6 counterpart as EACCES (icmp_err_convert, icmpv6_err_convert).
    assert_eq!(
        udp_error_after_send(a1, sa(SERVER_V4, 9001)),
        Some(libc::EHOSTUNREACH),
        "{what}: rejected udp/9001"
    );
    assert_eq!(
        udp_error_after_send(a1, sa(SERVER_V6, 9001)),
        Some(libc::EACCES),
        "{what}: rejected udp/9001 over IPv6"
    );
    assert_eq!(
        connect_error(a1, sa(SERVER_V4, 8082), Duration::from_secs(1)),
        Some(std::io::ErrorKind::TimedOut),
        "{what}: denied tcp/8082 times out"
    );

    assert_eq!(rejected.accepted(), 0, "{what}");
    assert_eq!(denied.accepted(), 0, "{what}");
    assert!(open.accepted() >= 1, "{what}");
    assert_eq!(sink.stop().0, 0, "{what}");
    let maps = lab.maps();
    assert!(
        maps.counter(1, Reason::EgressDenied).unwrap().packets >= 5,
        "{what}"
    );
}

/// At tc, the default on sandbox veths: the reply is redirected out of the veth it came in on.
#[test]
fn rejects_fail_calls_at_once_at_tc() {
    if !require_root("rejects_fail_calls_at_once_at_tc") {
        return;
    }
    rejects_fail_calls_at_once("auto", "native");
}

/// At XDP, generic mode: the reply leaves with XDP_TX. Not native mode on these veths: a
/// veth queues an XDP_TX frame for its peer and wakes the peer's NAPI only when the peer
/// has an XDP program of its own (`veth_xdp_flush`), so the agent's side would see the
/// reply only with its next received packet; on a NIC, XDP_TX sends at once.
#[test]
fn rejects_fail_calls_at_once_at_xdp() {
    if !require_root("rejects_fail_calls_at_once_at_xdp") {
        return;
    }
    rejects_fail_calls_at_once("xdp", "generic");
}
