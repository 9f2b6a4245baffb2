//! What the resolver has admitted: per (agent, address), the names whose answers carried
//! that address, each with its own expiry and the rules its patterns allow. The kernel
//! holds one entry per (agent, address) with the union of the rules and the latest expiry;
//! this table is what lets that entry be narrowed when one of several names expires or a
//! new policy stops allowing it, and removed when the last one goes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::{
    dataplane::MapsError,
    policy::{PortRange, Proto},
};

/// The rules one admitted address carries: protocol and destination ports.
pub type Rules = Vec<(Proto, PortRange)>;

/// Where learned addresses go: the kernel's map ([`crate::dataplane::KernelMaps`]), or
/// [`FakeSink`] in unit tests, so the resolver's bookkeeping is tested without root.
pub trait NameSink {
    /// Admits `addr` for `agent` on `rules` until `expires_ns` (CLOCK_MONOTONIC).
    fn learn_name(
        &mut self,
        agent: u32,
        addr: IpAddr,
        expires_ns: u64,
        rules: &[(Proto, PortRange)],
    ) -> Result<(), MapsError>;

    /// Withdraws `addr` from `agent`.
    fn forget_name(&mut self, agent: u32, addr: IpAddr) -> Result<(), MapsError>;
}

impl NameSink for crate::dataplane::KernelMaps {
    fn learn_name(
        &mut self,
        agent: u32,
        addr: IpAddr,
        expires_ns: u64,
        rules: &[(Proto, PortRange)],
    ) -> Result<(), MapsError> {
        crate::dataplane::KernelMaps::learn_name(self, agent, addr, expires_ns, rules)
    }

    fn forget_name(&mut self, agent: u32, addr: IpAddr) -> Result<(), MapsError> {
        crate::dataplane::KernelMaps::forget_name(self, agent, addr)
    }
}

/// An in-memory [`NameSink`]: the entries as the kernel would hold them, and every call.
#[derive(Debug, Default)]
pub struct FakeSink {
    /// The current entries: (agent, address) → (expiry, rules).
    pub entries: BTreeMap<(u32, IpAddr), (u64, Rules)>,
    /// Every call in order, `learn` or `forget`, for tests that check the ordering.
    pub calls: Vec<(&'static str, u32, IpAddr)>,
}

impl NameSink for FakeSink {
    fn learn_name(
        &mut self,
        agent: u32,
        addr: IpAddr,
        expires_ns: u64,
        rules: &[(Proto, PortRange)],
    ) -> Result<(), MapsError> {
        self.calls.push(("learn", agent, addr));
        self.entries
            .insert((agent, addr), (expires_ns, rules.to_vec()));
        Ok(())
    }

    fn forget_name(&mut self, agent: u32, addr: IpAddr) -> Result<(), MapsError> {
        self.calls.push(("forget", agent, addr));
        self.entries.remove(&(agent, addr));
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct NameEntry {
    expires_ns: u64,
    rules: Rules,
}

/// The learned table. Every change goes through the sink before the method returns, so the
/// kernel never holds less than an answer the agent has already received.
#[derive(Debug, Default)]
pub struct Learned {
    entries: BTreeMap<(u32, IpAddr), BTreeMap<String, NameEntry>>,
    /// (expiry, agent, address, name), ordered so the sweeper finds what is due in order.
    expiries: BTreeSet<(u64, u32, IpAddr, String)>,
    /// Per agent, the (name, address) pairs it holds: what `[dns] max_learned_per_agent`
    /// caps. Kept as a count so the check before each admission costs no walk.
    held: BTreeMap<u32, usize>,
}

impl Learned {
    /// (agent, address) entries held, as the kernel holds them.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is learned.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The (name, address) pairs `agent` holds now. Each kernel entry holds at least one,
    /// so this also bounds the agent's share of the kernel map.
    pub fn held(&self, agent: u32) -> usize {
        self.held.get(&agent).copied().unwrap_or(0)
    }

    /// How many (name, address) pairs learning `name` with `addrs` would add for `agent`:
    /// a pair already held is a renewal and adds nothing, and a repeated address counts
    /// once.
    pub fn new_pairs(&self, agent: u32, name: &str, addrs: &[IpAddr]) -> usize {
        addrs
            .iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|&&addr| {
                !self
                    .entries
                    .get(&(agent, addr))
                    .is_some_and(|names| names.contains_key(name))
            })
            .count()
    }

    /// The earliest expiry, for the sweeper to sleep until.
    pub fn next_expiry(&self) -> Option<u64> {
        self.expiries.first().map(|e| e.0)
    }

    /// The names `agent` has learned `addr` through, with their expiries.
    pub fn names(&self, agent: u32, addr: IpAddr) -> Vec<(String, u64)> {
        self.entries
            .get(&(agent, addr))
            .map(|names| {
                names
                    .iter()
                    .map(|(n, e)| (n.clone(), e.expires_ns))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records that an answer for `name` gave `agent` the address `addr` until
    /// `expires_ns`, with the rules the name's patterns allow, and writes the (agent,
    /// address) entry through `sink`. A shorter expiry than one already held for the same
    /// name does not shorten it: the earlier answer is still in the agent's cache.
    pub fn learn(
        &mut self,
        sink: &mut impl NameSink,
        agent: u32,
        addr: IpAddr,
        name: &str,
        expires_ns: u64,
        rules: Rules,
    ) -> Result<(), MapsError> {
        let names = self.entries.entry((agent, addr)).or_default();
        let entry = names.entry(name.to_string()).or_insert_with(|| {
            *self.held.entry(agent).or_default() += 1;
            NameEntry {
                expires_ns,
                rules: Rules::new(),
            }
        });
        self.expiries
            .remove(&(entry.expires_ns, agent, addr, name.to_string()));
        entry.expires_ns = entry.expires_ns.max(expires_ns);
        entry.rules = rules;
        self.expiries
            .insert((entry.expires_ns, agent, addr, name.to_string()));
        self.write(sink, agent, addr)
    }

    /// Drops every name whose expiry is at or before `now_ns`, narrowing or forgetting the
    /// kernel entries they held. Returns how many names expired. A sink error stops the
    /// sweep (the rest stays due, so the next sweep retries it).
    pub fn sweep(&mut self, sink: &mut impl NameSink, now_ns: u64) -> Result<usize, MapsError> {
        let mut touched = BTreeSet::new();
        let mut expired = 0;
        while let Some(first) = self.expiries.first()
            && first.0 <= now_ns
        {
            let (_, agent, addr, name) = self.expiries.pop_first().expect("non-empty");
            if let Some(names) = self.entries.get_mut(&(agent, addr))
                && names.remove(&name).is_some()
            {
                release(&mut self.held, agent);
            }
            touched.insert((agent, addr));
            expired += 1;
        }
        for (agent, addr) in touched {
            self.write(sink, agent, addr)?;
        }
        Ok(expired)
    }

    /// Applies a new policy: `rules(agent, name)` gives the rules the new policy allows
    /// `name` for `agent` (empty: no longer allowed). Names no longer allowed are dropped,
    /// the others take the new rules, and changed kernel entries are rewritten.
    pub fn reconcile(
        &mut self,
        sink: &mut impl NameSink,
        rules: impl Fn(u32, &str) -> Rules,
    ) -> Result<usize, MapsError> {
        let mut touched = Vec::new();
        let mut dropped = 0;
        for (&(agent, addr), names) in &mut self.entries {
            let mut changed = false;
            names.retain(|name, entry| {
                let now = rules(agent, name);
                if now.is_empty() {
                    self.expiries
                        .remove(&(entry.expires_ns, agent, addr, name.clone()));
                    release(&mut self.held, agent);
                    dropped += 1;
                    changed = true;
                    false
                } else {
                    changed |= now != entry.rules;
                    entry.rules = now;
                    true
                }
            });
            if changed {
                touched.push((agent, addr));
            }
        }
        for (agent, addr) in touched {
            self.write(sink, agent, addr)?;
        }
        Ok(dropped)
    }

    /// Writes the (agent, address) entry as the table now has it: the latest expiry and
    /// the union of the rules of its names, or a forget when no name is left.
    fn write(
        &mut self,
        sink: &mut impl NameSink,
        agent: u32,
        addr: IpAddr,
    ) -> Result<(), MapsError> {
        let Some(names) = self.entries.get(&(agent, addr)) else {
            return Ok(());
        };
        if names.is_empty() {
            self.entries.remove(&(agent, addr));
            return sink.forget_name(agent, addr);
        }
        let expires = names.values().map(|e| e.expires_ns).max().unwrap_or(0);
        let mut union = Rules::new();
        for rule in names.values().flat_map(|e| e.rules.iter()) {
            if !union.contains(rule) {
                union.push(*rule);
            }
        }
        sink.learn_name(agent, addr, expires, &union)
    }
}

/// One (name, address) pair of `agent` is gone from `held`.
fn release(held: &mut BTreeMap<u32, usize>, agent: u32) {
    if let Some(count) = held.get_mut(&agent) {
        *count -= 1;
        if *count == 0 {
            held.remove(&agent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP443: (Proto, PortRange) = (Proto::Tcp, PortRange { lo: 443, hi: 443 });
    const TCP80: (Proto, PortRange) = (Proto::Tcp, PortRange { lo: 80, hi: 80 });

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn learn_then_expire_exactly_at_expiry() {
        let (mut t, mut sink) = (Learned::default(), FakeSink::default());
        t.learn(&mut sink, 1, ip("10.0.0.1"), "a.test", 1_000, vec![TCP443])
            .unwrap();
        assert_eq!(
            sink.entries[&(1, ip("10.0.0.1"))],
            (1_000, vec![TCP443]),
            "the kernel entry carries the expiry and the rules"
        );
        assert_eq!(t.next_expiry(), Some(1_000));
        assert_eq!(t.sweep(&mut sink, 999).unwrap(), 0);
        assert_eq!(sink.entries.len(), 1, "not due yet");
        assert_eq!(t.sweep(&mut sink, 1_000).unwrap(), 1);
        assert!(sink.entries.is_empty(), "forgotten at expiry");
        assert!(t.is_empty());
        assert_eq!(t.next_expiry(), None);
        assert_eq!(sink.calls.last(), Some(&("forget", 1, ip("10.0.0.1"))));
    }

    #[test]
    fn two_names_on_one_address_narrow_when_one_expires() {
        let (mut t, mut sink) = (Learned::default(), FakeSink::default());
        let addr = ip("10.0.0.1");
        t.learn(&mut sink, 1, addr, "a.test", 1_000, vec![TCP443])
            .unwrap();
        t.learn(&mut sink, 1, addr, "b.test", 2_000, vec![TCP80, TCP443])
            .unwrap();
        assert_eq!(sink.entries[&(1, addr)], (2_000, vec![TCP443, TCP80]));
        t.learn(&mut sink, 1, addr, "a.test", 3_000, vec![TCP443])
            .unwrap();
        assert_eq!(sink.entries[&(1, addr)].0, 3_000, "latest expiry wins");
        assert_eq!(t.sweep(&mut sink, 2_000).unwrap(), 1);
        assert_eq!(
            sink.entries[&(1, addr)],
            (3_000, vec![TCP443]),
            "b.test's port 80 goes with it"
        );
        assert_eq!(t.names(1, addr), vec![("a.test".to_string(), 3_000)]);
    }

    #[test]
    fn a_shorter_answer_does_not_shorten_an_entry() {
        let (mut t, mut sink) = (Learned::default(), FakeSink::default());
        let addr = ip("2001:db8::1");
        t.learn(&mut sink, 2, addr, "a.test", 5_000, vec![TCP443])
            .unwrap();
        t.learn(&mut sink, 2, addr, "a.test", 4_000, vec![TCP443])
            .unwrap();
        assert_eq!(sink.entries[&(2, addr)].0, 5_000);
        assert_eq!(t.next_expiry(), Some(5_000), "one expiry per name");
        assert_eq!(t.sweep(&mut sink, 4_500).unwrap(), 0);
    }

    #[test]
    fn agents_are_kept_apart() {
        let (mut t, mut sink) = (Learned::default(), FakeSink::default());
        let addr = ip("10.0.0.1");
        t.learn(&mut sink, 1, addr, "a.test", 1_000, vec![TCP443])
            .unwrap();
        t.learn(&mut sink, 2, addr, "a.test", 2_000, vec![TCP80])
            .unwrap();
        assert_eq!(t.len(), 2);
        t.sweep(&mut sink, 1_500).unwrap();
        assert!(!sink.entries.contains_key(&(1, addr)));
        assert_eq!(sink.entries[&(2, addr)], (2_000, vec![TCP80]));
    }

    #[test]
    fn held_counts_each_name_and_address_once_until_it_goes() {
        let (mut t, mut sink) = (Learned::default(), FakeSink::default());
        let (x, y) = (ip("10.0.0.1"), ip("10.0.0.2"));
        t.learn(&mut sink, 1, x, "a.test", 1_000, vec![TCP443])
            .unwrap();
        assert_eq!(
            t.new_pairs(1, "a.test", &[x, x]),
            0,
            "a renewal adds nothing"
        );
        assert_eq!(t.new_pairs(1, "a.test", &[x, y, y]), 1);
        assert_eq!(
            t.new_pairs(1, "b.test", &[x]),
            1,
            "another name on x is another pair"
        );
        assert_eq!(
            t.new_pairs(2, "a.test", &[x]),
            1,
            "agents are counted apart"
        );
        t.learn(&mut sink, 1, x, "a.test", 2_000, vec![TCP443])
            .unwrap();
        t.learn(&mut sink, 1, x, "b.test", 1_000, vec![TCP443])
            .unwrap();
        t.learn(&mut sink, 1, y, "b.test", 3_000, vec![TCP443])
            .unwrap();
        t.learn(&mut sink, 2, x, "a.test", 1_000, vec![TCP443])
            .unwrap();
        assert_eq!((t.held(1), t.held(2)), (3, 1));
        assert_eq!(t.sweep(&mut sink, 1_000).unwrap(), 2);
        assert_eq!((t.held(1), t.held(2)), (2, 0));
        t.reconcile(&mut sink, |_, name| match name {
            "a.test" => vec![TCP443],
            _ => vec![],
        })
        .unwrap();
        assert_eq!(t.held(1), 1);
        assert_eq!(t.sweep(&mut sink, 3_000).unwrap(), 1);
        assert_eq!(t.held(1), 0);
    }

    #[test]
    fn a_new_policy_forgets_or_narrows() {
        let (mut t, mut sink) = (Learned::default(), FakeSink::default());
        let (x, y) = (ip("10.0.0.1"), ip("10.0.0.2"));
        t.learn(&mut sink, 1, x, "a.test", 1_000, vec![TCP443, TCP80])
            .unwrap();
        t.learn(&mut sink, 1, x, "b.test", 1_000, vec![TCP443])
            .unwrap();
        t.learn(&mut sink, 1, y, "b.test", 1_000, vec![TCP443])
            .unwrap();
        sink.calls.clear();
        // The new policy drops b.test and narrows a.test to port 443.
        let dropped = t
            .reconcile(&mut sink, |_, name| match name {
                "a.test" => vec![TCP443],
                _ => vec![],
            })
            .unwrap();
        assert_eq!(dropped, 2);
        assert_eq!(sink.entries[&(1, x)], (1_000, vec![TCP443]));
        assert!(!sink.entries.contains_key(&(1, y)));
        assert_eq!(t.len(), 1);
        assert_eq!(t.next_expiry(), Some(1_000));
        // A second reconcile with the same policy changes nothing.
        sink.calls.clear();
        t.reconcile(&mut sink, |_, _| vec![TCP443]).unwrap();
        assert!(sink.calls.is_empty(), "{:?}", sink.calls);
        // Expiry still removes what reconcile kept.
        assert_eq!(t.sweep(&mut sink, 1_000).unwrap(), 1);
        assert!(sink.entries.is_empty());
    }
}
