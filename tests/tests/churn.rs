//! Agents that come and go: incremental applies checked against whole writes, in real maps;
//! sandboxes created and destroyed under a profile while traffic flows; agents a runtime
//! adds and removes itself.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use enforcer::{
    dataplane::{
        Dataplane, SlotWrite,
        compile::{self, Compiled, Limits},
    },
    lab::{self, BpffsMount, Netns, UdpSink, require_root, udp_send},
    policy,
};
use integration_tests::{Lab, SERVER_V4, check_schema, in_sandbox_netns, sa};

/// A small deterministic generator (xorshift), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One agent of the generated policies: its id and a version that changes its rules.
fn agent_text(id: u32, version: u64) -> String {
    let mut t = format!(
        "[[agents]]\nid = {id}\nname = \"a{id}\"\nprefixes = [\"10.{}.{}.1\", \"fd00::{id:x}\"]\n",
        id / 256,
        id % 256
    );
    if id.is_multiple_of(5) {
        t += &format!("interfaces = [\"if{id}\"]\n");
    }
    if id.is_multiple_of(7) {
        t += &format!("prefixes = [\"10.200.{}.0/24\"]\n", id % 256);
        // A second `prefixes` key is a TOML error: replace the first instead.
        t = t.replacen(
            &format!(
                "prefixes = [\"10.{}.{}.1\", \"fd00::{id:x}\"]\n",
                id / 256,
                id % 256
            ),
            "",
            1,
        );
    }
    // Guards of their own on some agents, changing with the version: GUARD_POLICY entries
    // come, go and change.
    match id % 4 {
        1 => t += &format!("connections = {{ per_sec = {} }}\n", 10 + version),
        2 => t += &format!("breaker = {{ drops = {} }}\n", 5 + version % 2),
        _ => {}
    }
    if version % 3 == 0 && id.is_multiple_of(5) {
        t += "quota = { bytes_per_hour = 1_000_000 }\n";
    }
    if version % 4 == 3 {
        // Unrestricted: no destination entries at all.
        t += "egress_default = \"allow\"\n";
        return t;
    }
    t += "egress_default = \"deny\"\n";
    t += &format!(
        "[[agents.egress]]\naction = \"allow\"\nto = [\"192.0.2.{}\", \"198.51.100.0/24\", \"2001:db8::{id:x}\"]\nproto = \"tcp\"\nports = \"{}\"\n",
        id % 250,
        443 + version % 3
    );
    // Guarded through a rule only: a shared group (which exists whenever an agent does) or
    // an always-allowed rule.
    if id % 6 == 0 {
        t += "shared = \"g0\"\n";
    } else if id % 6 == 3 && version % 2 == 0 {
        t += "always = true\n";
    }
    if id.is_multiple_of(3) {
        // Nine prefix lengths: this agent's IPv4 destinations live in the LPM trie.
        let to: Vec<String> = (0..9)
            .map(|k| format!("\"{}.{}.0.0/{}\"", 20 + k, id % 250, 16 + k))
            .collect();
        t += &format!(
            "[[agents.egress]]\naction = \"allow\"\nto = [{}]\nproto = \"udp\"\n",
            to.join(", ")
        );
    }
    if version % 2 == 1 {
        t += &format!(
            "[[agents.egress]]\naction = \"allow\"\nto = [\"api{version}.example.com\", \"*.svc{id}.example\"]\nproto = \"tcp\"\nports = \"443\"\n"
        );
    }
    t
}

fn compiled(agents: &BTreeMap<u32, u64>, limits: &Limits) -> Compiled {
    let mut text = String::new();
    if agents.is_empty() {
        text += "agents = []\n";
    }
    text += "[defaults]\nunknown = \"drop\"\n";
    // One to three shared groups whose limits follow the policy, none without agents:
    // SHARED_POLICY entries come, go and change.
    if !agents.is_empty() {
        let groups = 1 + agents.values().sum::<u64>() % 3;
        for k in 0..groups {
            text += &format!(
                "[[shared]]\nname = \"g{k}\"\nconnections = {{ per_sec = {} }}\n",
                10 + agents.len() as u64 + k
            );
        }
    }
    for (&id, &version) in agents {
        text += &agent_text(id, version);
    }
    let policy = policy::parse("churn.toml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    // Interface names resolve to made-up indices: only the maps are under test here.
    let resolve = |name: &str| name.strip_prefix("if").and_then(|n| n.parse::<u32>().ok());
    compile::compile(&policy, limits, &|name| resolve(name).map(|n| n + 1000)).unwrap()
}

#[test]
fn incremental_applies_leave_both_slots_as_whole_writes_would() {
    if !require_root("incremental_applies_leave_both_slots_as_whole_writes_would") {
        return;
    }
    in_sandbox_netns("churn", || {
        // Small tables, so buckets overflow into the hash maps.
        let limits = Limits {
            max_agents: 512,
            max_interfaces: 256,
            max_source_prefixes: 1024,
            max_destination_prefixes: 4096,
            ..Limits::default()
        };
        let (pins, reference_pins) = (BpffsMount::new().unwrap(), BpffsMount::new().unwrap());
        let mut dp = Dataplane::load(pins.path(), &limits).unwrap();
        let mut reference = Dataplane::load(reference_pins.path(), &limits).unwrap();
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut agents: BTreeMap<u32, u64> = (1..=40).map(|id| (id, 0)).collect();
        let mut previous = None;
        let mut changes = 0;
        for step in 0..60 {
            // Some agents go, some come (ids reused), some change their rules.
            let moves = if step % 20 == 10 {
                150
            } else {
                1 + rng.below(6)
            };
            for _ in 0..moves {
                let id = 1 + rng.below(300) as u32;
                match rng.below(3) {
                    0 => {
                        agents.remove(&id);
                    }
                    1 => {
                        agents.insert(id, rng.below(8));
                    }
                    _ => {
                        if let Some(v) = agents.get_mut(&id) {
                            *v += 1;
                        }
                    }
                }
            }
            let c = compiled(&agents, &limits);
            dp.apply(&c).unwrap();
            if dp.last_write() == Some(SlotWrite::Changes) {
                changes += 1;
            }
            reference.forget_slots();
            reference.apply(&c).unwrap();
            let active = dp.maps().current_state().unwrap().active_slot;
            let theirs = reference.maps().current_state().unwrap().active_slot;
            let mut got = dp.maps().slot_entries(active).unwrap();
            let mut want = reference.maps().slot_entries(theirs).unwrap();
            // The test covers the guards only if the policies have them.
            assert!(!want.guards.is_empty() && !want.shared.is_empty() || agents.is_empty());
            // Overflow placement depends on seeds and history; the mappings must not.
            (got.map_entries, want.map_entries) = (0, 0);
            assert_eq!(
                got, want,
                "step {step}: the active slot differs from a whole write"
            );
            // The other slot still holds the previous policy exactly.
            if let Some(previous) = previous.replace(want) {
                let mut other = dp.maps().slot_entries(active ^ 1).unwrap();
                other.map_entries = 0;
                assert_eq!(
                    other, previous,
                    "step {step}: the inactive slot was disturbed"
                );
            }
        }
        assert!(
            changes >= 50,
            "only {changes} of 60 applies were incremental"
        );
        // Everything goes: nothing may be left behind in either slot.
        for _ in 0..2 {
            dp.apply(&compiled(&BTreeMap::new(), &limits)).unwrap();
        }
        for slot in 0..2 {
            let left = dp.maps().slot_entries(slot).unwrap();
            assert_eq!(left.map_entries, 0, "slot {slot}: {left:?}");
            assert_eq!(
                left,
                enforcer::dataplane::SlotEntries::default(),
                "slot {slot} kept entries"
            );
        }
    });
}

/// Sandboxes of one profile: UDP to the server's 9000 allowed (burst 20 at 50/s), 9001
/// denied; the long-lived one sends to 9002, allowed too.
const PROFILE_POLICY: &str = r#"
agents = []

[defaults]
unknown = "pass"

[[profiles]]
name = "sbx"
interfaces = ["sbx*"]
egress_default = "deny"
rate = { packets_per_sec = 50, packets_burst = 20 }
[[profiles.egress]]
action = "allow"
to = ["10.200.100.2"]
proto = "udp"
ports = "9000"
[[profiles.egress]]
action = "allow"
to = ["10.200.100.2"]
proto = "udp"
ports = "9002"
"#;

/// A sandbox: a namespace whose `eth0` is the peer of `host_if` in the lab's gateway, on
/// 10.201.`n`.0/24. The host side stays down until [`Sandbox::up`]: a runtime brings it up
/// once `enforcer agent wait` says the agent is enforced.
struct Sandbox {
    ns: Netns,
    host_if: String,
}

impl Sandbox {
    fn create(lab: &Lab, host_if: &str, n: u32) -> Sandbox {
        let ns = Netns::create(&lab::unique_name("sbx")).unwrap();
        lab.gw
            .ip(&[
                "link",
                "add",
                host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ])
            .unwrap();
        lab::add_address(&lab.gw, host_if, &format!("10.201.{n}.1/24")).unwrap();
        lab::add_address(&ns, "eth0", &format!("10.201.{n}.2/24")).unwrap();
        ns.ip(&["link", "set", "eth0", "up"]).unwrap();
        lab::add_route(&ns, "default", &format!("10.201.{n}.1")).unwrap();
        Sandbox {
            ns,
            host_if: host_if.to_owned(),
        }
    }

    fn up(&self, lab: &Lab) {
        lab.gw.ip(&["link", "set", &self.host_if, "up"]).unwrap();
    }
}

/// A lab with no agent of its own and room for `max_agents` ids, running [`PROFILE_POLICY`].
fn profile_lab(max_agents: u32) -> Lab {
    let mut lab = Lab::new(0);
    let config = std::fs::read_to_string(lab.config_path()).unwrap();
    std::fs::write(
        lab.config_path(),
        config.replace("max_agents = 64", &format!("max_agents = {max_agents}")),
    )
    .unwrap();
    lab.write_policy(PROFILE_POLICY);
    lab.start_daemon();
    lab
}

/// Waits with `enforcer agent wait` and returns the agent's id and name.
fn wait_enforced(lab: &Lab, interface: &str) -> (u32, String) {
    let (code, v) = lab.run_cli_json(&["agent", "wait", interface, "--timeout", "10"]);
    assert_eq!(code, 0, "agent wait {interface}: {v}");
    check_schema("agent-wait", &v);
    (
        v["id"].as_u64().unwrap() as u32,
        v["name"].as_str().unwrap().to_owned(),
    )
}

/// Packets of the agent that an allow rule passed, and that a deny or the rate limit
/// dropped, by its counters (ARP and neighbour discovery count apart).
fn passed_dropped(lab: &Lab, agent: &str) -> (u64, u64) {
    let v = lab.cli_json(&["agent", agent]);
    let packets = |reason: &str| v["counters"][reason]["packets"].as_u64().unwrap_or(0);
    (
        packets("allowed"),
        packets("egress_denied") + packets("rate_limited_packets"),
    )
}

/// Whether every counter of the agent is zero.
fn untouched(lab: &Lab, agent: &str) -> bool {
    lab.cli_json(&["agent", agent])["counters"]
        .as_object()
        .unwrap()
        .is_empty()
}

#[test]
fn sandboxes_come_and_go_under_a_profile_while_traffic_flows() {
    if !require_root("sandboxes_come_and_go_under_a_profile_while_traffic_flows") {
        return;
    }
    // Eight ids for fifty sandboxes: ids are reused many times.
    let lab = profile_lab(8);
    let allowed = UdpSink::spawn(&lab.server, sa("0.0.0.0", 9000)).unwrap();
    let denied = UdpSink::spawn(&lab.server, sa("0.0.0.0", 9001)).unwrap();
    let steady = UdpSink::spawn(&lab.server, sa("0.0.0.0", 9002)).unwrap();

    // One sandbox lives through the churn, sending all along.
    let keeper = Sandbox::create(&lab, "sbxkeep", 250);
    let (keeper_id, keeper_name) = wait_enforced(&lab, "sbxkeep");
    keeper.up(&lab);
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        let ns = keeper.ns;
        thread::spawn(move || {
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                sent += udp_send(&ns, sa(SERVER_V4, 9002), None, b"k", 1, Duration::ZERO).unwrap();
                sent += udp_send(&ns, sa(SERVER_V4, 9001), None, b"k", 1, Duration::ZERO).unwrap();
                thread::sleep(Duration::from_millis(20));
            }
            (sent, ns)
        })
    };

    let mut ids = Vec::new();
    for n in 0..50u32 {
        let name = format!("sbx{n}");
        let sandbox = Sandbox::create(&lab, &name, n + 1);
        let (id, agent) = wait_enforced(&lab, &name);
        assert_eq!(agent, format!("sbx/{name}"));
        assert_ne!(id, keeper_id);
        // A reused id starts from zero counters (and, below, a full bucket).
        assert!(untouched(&lab, &agent), "{agent}: id {id} kept counters");
        sandbox.up(&lab);
        // Denied first: none of it may pass. Then a burst over the limit: a full bucket
        // passes at least its 20.
        let before = allowed.counts().0;
        udp_send(
            &sandbox.ns,
            sa(SERVER_V4, 9001),
            None,
            b"d",
            10,
            Duration::ZERO,
        )
        .unwrap();
        udp_send(
            &sandbox.ns,
            sa(SERVER_V4, 9000),
            None,
            b"a",
            40,
            Duration::ZERO,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while allowed.counts().0 - before < 20 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        let (passed, dropped) = passed_dropped(&lab, &agent);
        assert!(
            (20..40).contains(&passed),
            "{agent} (id {id}): {passed} allowed packets passed, expected the burst of 20 and a few more"
        );
        assert!(dropped >= 10, "{agent}: {dropped} dropped");
        ids.push(id);
        drop(sandbox);
    }
    stop.store(true, Ordering::Relaxed);
    let (keeper_sent, _keeper_ns) = sender.join().unwrap();

    let reused = ids.len() - ids.iter().collect::<BTreeSet<_>>().len();
    assert!(reused >= 40, "only {reused} of 50 ids were reused: {ids:?}");
    assert_eq!(denied.stop().0, 0, "a denied datagram passed");
    assert!(allowed.stop().0 >= 50 * 20);
    let (steady_got, _) = steady.stop();
    assert!(
        steady_got * 2 >= keeper_sent / 2,
        "the long-lived sandbox's traffic stalled: {steady_got} of {} arrived",
        keeper_sent / 2
    );
    assert_eq!(wait_enforced(&lab, "sbxkeep"), (keeper_id, keeper_name));

    // After the churn only the keeper is left, in the daemon and in the maps.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let agents = lab.cli_json(&["agents"]);
        if agents.as_array().unwrap().len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "agents left: {agents}");
        thread::sleep(Duration::from_millis(50));
    }
    let maps = lab.maps();
    let active = maps.current_state().unwrap().active_slot;
    let left = maps.slot_entries(active).unwrap();
    assert_eq!(
        left.agents.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [keeper_id]
    );
    assert_eq!(left.interfaces.len(), 1, "{left:?}");
    assert_eq!(left.destinations_v4.len(), 1, "{left:?}");
    assert_eq!(
        left.map_entries, 1,
        "only the keeper's interface entry: {left:?}"
    );
    let status = lab.cli_json(&["status"]);
    assert_eq!(
        status["interfaces"],
        serde_json::json!(["sbxkeep"]),
        "{status}"
    );
}

#[test]
fn runtime_added_agents_are_enforced_kept_across_restarts_and_audited() {
    if !require_root("runtime_added_agents_are_enforced_kept_across_restarts_and_audited") {
        return;
    }
    let mut lab = profile_lab(64);
    // A profile pattern does not match "rt1": only `agent add` makes its agent, before the
    // interface exists.
    let (code, added) = lab.run_cli_json(&[
        "agent",
        "add",
        "--profile",
        "sbx",
        "--interface",
        "rt1",
        "--prefix",
        "10.202.0.0/24",
    ]);
    assert_eq!(code, 0, "{added}");
    check_schema("agent-change", &added);
    assert_eq!(added["name"], "sbx/rt1");
    assert_eq!(added["pending"], true, "{added}");
    let id = added["id"].as_u64().unwrap();
    let shown = lab.cli_json(&["agent", "sbx/rt1"]);
    assert_eq!(shown["profile"], "sbx");
    assert_eq!(shown["pending_interfaces"], serde_json::json!(["rt1"]));
    let table = lab.run_cli(&["agents"]).stdout;
    assert!(table.contains("rt1 (pending)"), "{table}");
    let sandbox = Sandbox::create(&lab, "rt1", 1);
    assert_eq!(wait_enforced(&lab, "rt1").0 as u64, id);
    sandbox.up(&lab);
    let denied = UdpSink::spawn(&lab.server, sa("0.0.0.0", 9001)).unwrap();
    udp_send(
        &sandbox.ns,
        sa(SERVER_V4, 9001),
        None,
        b"d",
        5,
        Duration::ZERO,
    )
    .unwrap();
    thread::sleep(Duration::from_millis(200));
    assert_eq!(denied.stop().0, 0);
    assert_eq!(passed_dropped(&lab, "sbx/rt1").1, 5);

    // Kept across a restart, with its id; and a policy applied with no daemon running
    // (straight into the pinned maps) keeps it enforced.
    lab.stop_daemon(libc::SIGTERM);
    let file = lab.write_file("again.toml", PROFILE_POLICY);
    let (code, applied) = lab.run_cli_json(&["policy", "apply", file.to_str().unwrap()]);
    assert_eq!(
        (code, &applied["to"]),
        (0, &serde_json::json!("pinned maps")),
        "{applied}"
    );
    let maps = lab.maps();
    let active = maps.current_state().unwrap().active_slot;
    let held = maps.slot_entries(active).unwrap();
    assert!(
        held.agents.iter().any(|(a, _)| u64::from(*a) == id),
        "{held:?}"
    );
    lab.start_daemon();
    assert_eq!(wait_enforced(&lab, "rt1").0 as u64, id);
    let shown = lab.cli_json(&["agent", "sbx/rt1"]);
    assert_eq!(shown["prefixes"], serde_json::json!(["10.202.0.0/24"]));
    assert_eq!(shown["pending_interfaces"], serde_json::json!([]));

    // Bad requests name what is wrong and change nothing.
    let run = lab.run_cli(&["agent", "add", "--profile", "nope", "--interface", "rt2"]);
    assert_ne!(run.code, 0);
    assert!(run.output().contains("nope"), "{}", run.output());
    let run = lab.run_cli(&["agent", "add", "--profile", "sbx", "--interface", "rt1"]);
    assert_ne!(run.code, 0);
    assert!(run.output().contains("rt1"), "{}", run.output());

    let (code, removed) = lab.run_cli_json(&["agent", "remove", "sbx/rt1"]);
    assert_eq!(code, 0, "{removed}");
    check_schema("agent-change", &removed);
    assert_eq!(removed["id"].as_u64(), Some(id));
    assert!(
        lab.run_cli(&["agent", "rt1"]).code != 0,
        "the agent is gone"
    );
    assert_eq!(
        lab.cli_json(&["status"])["interfaces"],
        serde_json::json!([])
    );
    // Audited with who asked, in the hash chain.
    let log = std::fs::read_to_string(lab.dir.join("audit.jsonl")).unwrap();
    for reason in ["agent_add", "agent_remove"] {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("\"reason\":\"{reason}\"")) && l.contains("\"applied\""))
            .unwrap_or_else(|| panic!("no {reason} record in {log}"));
        assert!(line.contains("\"uid\":0"), "{line}");
    }
    lab.stop_daemon(libc::SIGTERM);
    lab.start_daemon();
    assert!(lab.run_cli(&["agent", "rt1"]).code != 0, "removed for good");
}
