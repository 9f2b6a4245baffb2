//! Agents that come and go: incremental applies checked against whole writes, in real maps.

use std::collections::BTreeMap;

use enforcer::{
    dataplane::{
        Dataplane, SlotWrite,
        compile::{self, Compiled, Limits},
    },
    lab::{BpffsMount, require_root},
    policy,
};
use integration_tests::in_sandbox_netns;

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
        // Small tables, so buckets overflow into the hash maps and tables outgrow their size.
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
