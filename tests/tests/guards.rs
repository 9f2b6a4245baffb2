//! Guards against runaway agents with real traffic from agent namespaces through the real
//! daemon: a looping client trips the breaker, is refused for the cooldown, probes, is
//! refused again for a longer cooldown when the loop goes on, and is let back once calm; a
//! destination group's limit holds for ten agents together; a quota's use survives a
//! daemon restart.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use enforcer::{
    dataplane::KernelMaps,
    lab::{self, Netns, TcpEchoServer, UdpSink, require_root},
};
use enforcer_common::{
    Reason, TIME_SHIFT,
    guard::{
        BREAKER_CLOSED, BREAKER_HALF_OPEN, BREAKER_OPEN, QUOTA_BYTES_HOUR, breaker_parts,
        quota_parts,
    },
};
use integration_tests::{Lab, SERVER_V4, sa};

/// CLOCK_MONOTONIC in the limiters' time units, as the kernel's guard times are kept.
fn now_units() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64) << TIME_SHIFT
}

fn units(d: Duration) -> u64 {
    (d.as_nanos() as u64) << TIME_SHIFT
}

/// The breaker of agent `id`: (state, cooldown level, time), and how often it opened.
fn breaker(maps: &KernelMaps, id: u32) -> (u64, u64, u64, u64) {
    let state = maps.guard_state(id).unwrap();
    let (kind, level, time) = breaker_parts(state.breaker);
    (kind, level, time, state.trips)
}

/// Sleeps until CLOCK_MONOTONIC is past `time` (limiter units) plus `margin`: the kernel's
/// tick clock lags by up to a tick.
fn sleep_past(time: u64, margin: Duration) {
    let now = now_units();
    if time + units(margin) > now {
        thread::sleep(Duration::from_nanos(
            (time + units(margin) - now) >> TIME_SHIFT,
        ));
    }
}

/// One connection attempt from `ns`: Ok, or the error's kind.
fn connect(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<(), ErrorKind> {
    lab::in_netns(ns, move || {
        TcpStream::connect_timeout(&addr, timeout)
            .map(drop)
            .map_err(|e| e.kind())
    })
}

/// A client that opens and closes connections to `addr` as fast as it can until stopped:
/// the looping agent. Returns how many attempts it made.
struct Looper {
    stop: Arc<AtomicBool>,
    thread: Option<lab::NetnsThread<u64>>,
}

impl Looper {
    fn start(ns: &Netns, addr: SocketAddr) -> Looper {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = lab::spawn_in_netns(ns, move || {
            let mut attempts = 0;
            while !flag.load(Ordering::Relaxed) {
                let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(100));
                attempts += 1;
            }
            attempts
        })
        .unwrap();
        Looper {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Looper {
    /// A failed assertion must not leave the thread running in the agent's namespace.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const LOOPER_POLICY: &str = r#"
[[agents]]
id = 1
name = "looper"
interfaces = ["gwa1"]
egress_default = "deny"
connections = { per_sec = 10, burst = 10 }
breaker = { drops = 5, within_secs = 60, cooldown_secs = 2, max_cooldown_secs = 8, probe_per_sec = 1, probe_burst = 1, calm_secs = 2, action = "reject" }
[[agents.egress]]
action = "allow"
to = ["10.200.100.2"]
proto = "tcp"
ports = 7000
"#;

/// Polls `cond` every 20 ms for at most `limit` (a bound on a broken build, not a measured
/// time: the wait ends as soon as the condition holds).
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    cond()
}

#[test]
fn a_looping_client_trips_the_breaker_is_refused_probes_and_is_let_back_when_calm() {
    if !require_root(
        "a_looping_client_trips_the_breaker_is_refused_probes_and_is_let_back_when_calm",
    ) {
        return;
    }
    let mut lab = Lab::new(1);
    lab.write_policy(LOOPER_POLICY);
    lab.start_daemon();
    let server = TcpEchoServer::spawn(&lab.server, sa("0.0.0.0", 7000)).unwrap();
    let addr = sa(SERVER_V4, 7000);
    let maps = lab.maps();
    let agent = lab.agent(1);
    assert_eq!(
        connect(agent, addr, Duration::from_secs(2)),
        Ok(()),
        "a calm agent connects"
    );

    // The loop: past 10 connections a second, every SYN is a drop, and the sixth drop
    // within the minute opens the breaker.
    let looper = Looper::start(agent, addr);
    assert!(
        wait_for(Duration::from_secs(30), || breaker(&maps, 1).0
            == BREAKER_OPEN),
        "the breaker never opened: {:?}",
        breaker(&maps, 1)
    );
    let attempts = looper.stop();
    let (_, level, until, trips) = breaker(&maps, 1);
    assert_eq!((level, trips), (0, 1), "opened once, at the first cooldown");
    let first_until = until;
    let strikes = maps.counter(1, Reason::ConnRateLimited).unwrap().packets;
    // Five drops are the budget; the sixth opens it (one more if the loop outlasted the
    // twelve seconds a strike takes to drain).
    assert!(
        (6..=7).contains(&strikes),
        "opened after {strikes} drops ({attempts} attempts)"
    );

    // Open: refused at once with a reset, not left to time out.
    assert_eq!(
        connect(agent, addr, Duration::from_secs(5)),
        Err(ErrorKind::ConnectionRefused),
        "an open breaker rejects"
    );
    assert!(maps.counter(1, Reason::BreakerOpen).unwrap().packets >= 1);

    // The cooldown ends: half-open lets one probe through.
    sleep_past(until, Duration::from_millis(50));
    assert_eq!(
        connect(agent, addr, Duration::from_secs(2)),
        Ok(()),
        "the probe connects"
    );
    assert_eq!(breaker(&maps, 1).0, BREAKER_HALF_OPEN);

    // The loop comes back: past the probe rate, the breaker opens again, for twice as long.
    let looper = Looper::start(agent, addr);
    assert!(
        wait_for(Duration::from_secs(30), || breaker(&maps, 1).0
            == BREAKER_OPEN),
        "the breaker did not reopen: {:?}",
        breaker(&maps, 1)
    );
    looper.stop();
    let (_, level, until, trips) = breaker(&maps, 1);
    assert_eq!(
        (level, trips),
        (1, 2),
        "reopened at the next cooldown level"
    );
    let second_until = until;

    // Calm: after the cooldown, the probe passes; after the calm period it closes.
    sleep_past(until, Duration::from_millis(50));
    assert_eq!(
        connect(agent, addr, Duration::from_secs(2)),
        Ok(()),
        "the probe connects"
    );
    let (state, _, since, _) = breaker(&maps, 1);
    assert_eq!(state, BREAKER_HALF_OPEN);
    sleep_past(
        since + units(Duration::from_secs(2)),
        Duration::from_millis(50),
    );
    assert_eq!(connect(agent, addr, Duration::from_secs(2)), Ok(()));
    let (state, level, _, trips) = breaker(&maps, 1);
    assert_eq!(
        (state, level, trips),
        (BREAKER_CLOSED, 0, 2),
        "closed after a calm period"
    );
    // Closed: the connection rate alone applies again.
    for i in 0..5 {
        assert_eq!(
            connect(agent, addr, Duration::from_secs(2)),
            Ok(()),
            "connection {i}"
        );
    }
    server.stop();

    // The audit trail has every transition, in order, and each cooldown is what the
    // policy says (2 s, then 4 s), counted from the transition's own kernel timestamp:
    // the deadline is the tick clock's now plus the cooldown, the timestamp the precise
    // clock's, at most a tick later.
    let mut transitions = Vec::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            transitions = audit_transitions(&lab);
            transitions.len() >= 5
        }),
        "{transitions:?}"
    );
    let events: Vec<(&str, u64)> = transitions
        .iter()
        .map(|r| {
            (
                r["event"].as_str().unwrap(),
                r["cooldown_level"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            ("breaker_opened", 0),
            ("breaker_half_open", 0),
            ("breaker_opened", 1),
            ("breaker_half_open", 1),
            ("breaker_closed", 1),
        ],
        "{transitions:#?}"
    );
    assert_eq!(transitions[0]["reason"], "conn_rate_limited");
    for (record, until, cooldown) in [
        (&transitions[0], first_until, 2i64),
        (&transitions[2], second_until, 4),
    ] {
        let opened = record["ktime_ns"].as_u64().unwrap() as i64;
        let lead = (until >> TIME_SHIFT) as i64 - opened;
        let want = cooldown * 1_000_000_000;
        assert!(
            (want - 20_000_000..=want).contains(&lead),
            "cooldown ends {lead} ns after the opening, want {want} ns less at most a tick: \
             {record}"
        );
    }
}

/// The guard transitions in the daemon's audit log, oldest first.
fn audit_transitions(lab: &Lab) -> Vec<serde_json::Value> {
    let tail = lab.run_cli(&["--json", "audit", "tail", "-n", "200"]);
    tail.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| {
            r["event"]
                .as_str()
                .is_some_and(|e| e.starts_with("breaker_"))
        })
        .collect()
}

/// Ten agents flood one destination group together at several times its shared limit: the
/// admitted rate, summed over the agents, is the group's limit within 1%.
#[test]
fn a_shared_destination_limit_holds_for_ten_agents_together() {
    if !require_root("a_shared_destination_limit_holds_for_ten_agents_together") {
        return;
    }
    const AGENTS: usize = 10;
    const LIMIT: u64 = 2000;
    let mut policy = format!(
        "[[shared]]\nname = \"mcp\"\nrate = {{ packets_per_sec = {LIMIT}, packets_burst = 200 }}\n"
    );
    for i in 1..=AGENTS {
        policy.push_str(&format!(
            "\n[[agents]]\nid = {i}\nname = \"swarm-{i}\"\ninterfaces = [\"gwa{i}\"]\n\
             egress_default = \"deny\"\n[[agents.egress]]\naction = \"allow\"\n\
             to = [\"10.200.100.2\"]\nproto = \"udp\"\nports = 9000\nshared = \"mcp\"\n"
        ));
    }
    let mut lab = Lab::new(AGENTS);
    lab.write_policy(&policy);
    lab.start_daemon();
    let sink = UdpSink::spawn(&lab.server, sa("0.0.0.0", 9000)).unwrap();
    let bpffs = lab.bpffs().to_owned();
    let sampler = thread::spawn(move || {
        let maps = KernelMaps::from_pins(&bpffs).unwrap();
        // A sample counts only if its reads took at most 5 ms (see traffic.rs).
        let read = |maps: &KernelMaps| loop {
            let before = Instant::now();
            let mut allowed = 0;
            let mut limited = 0;
            for id in 1..=AGENTS as u32 {
                allowed += maps.counter(id, Reason::Allowed).unwrap().packets;
                limited += maps.counter(id, Reason::SharedLimited).unwrap().packets;
            }
            let after = Instant::now();
            if after - before <= Duration::from_millis(5) {
                return (before + (after - before) / 2, allowed, limited);
            }
        };
        thread::sleep(Duration::from_millis(1500));
        let start = read(&maps);
        thread::sleep(Duration::from_secs(5));
        (start, read(&maps))
    });
    let sent: u64 = thread::scope(|s| {
        let floods: Vec<_> = (1..=AGENTS)
            .map(|i| {
                let ns = lab.agent(i);
                s.spawn(move || {
                    lab::udp_flood(
                        ns,
                        sa(SERVER_V4, 9000),
                        32,
                        Duration::from_secs(7),
                        &[i % 2],
                        None,
                    )
                    .unwrap()
                })
            })
            .collect();
        floods.into_iter().map(|f| f.join().unwrap()).sum()
    });
    let ((t0, a0, l0), (t1, a1, l1)) = sampler.join().unwrap();
    let received = sink.stop();
    let secs = (t1 - t0).as_secs_f64();
    let admitted = (a1 - a0) as f64 / secs;
    let offered = admitted + (l1 - l0) as f64 / secs;
    let ratio = admitted / LIMIT as f64;
    eprintln!(
        "{AGENTS} agents sent {sent}: admitted {admitted:.0}/s of {offered:.0}/s offered, \
         limit {LIMIT}/s, ratio {ratio:.4}; server received {received:?}"
    );
    assert!(
        offered >= 2.0 * LIMIT as f64,
        "flood too weak to test the limit: {offered:.0}/s"
    );
    assert!(
        (0.99..=1.01).contains(&ratio),
        "admitted/limit = {ratio:.4}, outside 1%"
    );
    // Every agent was held by the group, none by a limit of its own.
    for id in 1..=AGENTS as u32 {
        assert!(
            lab.maps()
                .counter(id, Reason::SharedLimited)
                .unwrap()
                .packets
                > 0,
            "agent {id}"
        );
    }
}

/// A quota's use lives in the pinned maps: a daemon restart neither resets nor loses it,
/// and what was refused before is refused after.
#[test]
fn a_quota_survives_a_daemon_restart() {
    if !require_root("a_quota_survives_a_daemon_restart") {
        return;
    }
    let mut lab = Lab::new(1);
    lab.write_policy(
        r#"
[[agents]]
id = 1
name = "metered"
interfaces = ["gwa1"]
egress_default = "deny"
quota = { bytes_per_hour = 20000 }
[[agents.egress]]
action = "allow"
to = ["10.200.100.2"]
proto = "udp"
ports = 9000
"#,
    );
    lab.start_daemon();
    let sink = UdpSink::spawn(&lab.server, sa("0.0.0.0", 9000)).unwrap();
    let send = |lab: &Lab, n| {
        lab::udp_send(
            lab.agent(1),
            sa(SERVER_V4, 9000),
            None,
            &[7; 958],
            n,
            Duration::from_millis(2),
        )
        .unwrap()
    };
    // 1000-byte frames (958 bytes of payload, 42 of headers): 20 fit in 20,000 bytes.
    send(&lab, 12);
    let used = |lab: &Lab| quota_parts(lab.maps().guard_state(1).unwrap().quota[QUOTA_BYTES_HOUR]);
    let (_, exhausted, before) = used(&lab);
    assert_eq!((exhausted, before), (false, 12_000), "twelve frames used");
    lab.stop_daemon(libc::SIGTERM);
    lab.start_daemon();
    let (_, _, after) = used(&lab);
    assert_eq!(after, before, "the use survives the restart");
    send(&lab, 12);
    let (_, exhausted, used_now) = used(&lab);
    assert_eq!(
        (exhausted, used_now),
        (true, 20_000),
        "eight more fit, then the quota refuses"
    );
    let maps = lab.maps();
    assert_eq!(maps.counter(1, Reason::Allowed).unwrap().packets, 20);
    assert_eq!(maps.counter(1, Reason::QuotaExhausted).unwrap().packets, 4);
    assert!(
        wait_for(Duration::from_secs(5), || sink.counts().0 == 20),
        "{:?}",
        sink.counts()
    );
}
