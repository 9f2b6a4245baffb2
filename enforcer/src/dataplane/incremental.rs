//! Incremental apply: rewriting a slot from the policy it holds to a new one by touching only
//! the entries that differ (see [`super::apply`]).
//!
//! A slot's content is known exactly when this process wrote it: the [`Compiled`] written
//! there (its *image*, kept by [`super::Slots`]) and, for the destination tables, which
//! `RULES` index each distinct rule set holds ([`RuleIndex`]). From the image and the new
//! policy, [`KernelMaps::update_in_place`] removes what the new policy lacks and writes what it
//! adds or changes, map by map. Exact-match tables keep the seed their last whole build
//! chose, and their size, which is their map's: a removed key frees its way, a new key takes
//! a free way of its bucket or goes to the overflow hash map and marks the bucket, as a
//! whole build places it. A table would hold more than two keys per bucket on average only
//! past its map's capacity; then, or when so many agents change that writing everything in
//! batches is cheaper ([`super::PolicyMaps::update_slot`]), the slot is written whole.

use std::collections::{HashMap as StdHashMap, HashSet, hash_map::Entry};

use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, lpm_trie::Key};
use enforcer_common::{
    AGENT_DST_LPM_V4, AGENT_DST_LPM_V6, AgentPolicy, DstV4Key, DstV6Key, HostV4Key, HostV6Key,
    IfaceKey, LpmV4, LpmV6, OWNER_BITS, RuleSet, SniKey, TABLE_DST_V4, TABLE_DST_V6, TABLE_SRC_V4,
    TABLE_SRC_V6, TableBucket, TableConfig, dst_key_v4, dst_key_v6,
    guard::{GuardPolicy, MAX_SHARED_GROUPS, SharedPolicy},
    maps, owner, owner_word, src_key_v4, src_key_v6, table_bucket,
};

use super::{KernelMaps, MapsError, err, slot_config};
use crate::dataplane::compile::{Compiled, Prefix};

/// Which `RULES` index each distinct rule set holds in one slot, and how many table entries
/// point at it. Only entries placed in a table bucket hold an index; an entry in the overflow
/// hash map carries its rule set itself.
#[derive(Clone, Debug, Default)]
pub(super) struct RuleIndex {
    by_set: StdHashMap<RuleSet, (u32, u32)>,
    free: Vec<u32>,
    next: u32,
    room: u32,
}

impl RuleIndex {
    /// An empty index for a `RULES` map of `room` sets per slot (index 0 unused).
    pub(super) fn new(room: u32) -> Self {
        RuleIndex {
            by_set: StdHashMap::new(),
            free: Vec::new(),
            next: 1,
            room,
        }
    }

    /// The index `rules` has, or a new one (`true`: its `RULES` entry must be written);
    /// `None` when the map is full.
    pub(super) fn acquire(&mut self, rules: &RuleSet) -> Option<(u32, bool)> {
        match self.by_set.entry(*rules) {
            Entry::Occupied(mut e) => {
                e.get_mut().1 += 1;
                Some((e.get().0, false))
            }
            Entry::Vacant(e) => {
                let index = match self.free.pop() {
                    Some(i) => i,
                    None if self.next < self.room => {
                        self.next += 1;
                        self.next - 1
                    }
                    None => return None,
                };
                e.insert((index, 1));
                Some((index, true))
            }
        }
    }

    /// Drops one reference to `rules`; the index is free again at none.
    pub(super) fn release(&mut self, rules: &RuleSet) {
        if let Entry::Occupied(mut e) = self.by_set.entry(*rules) {
            e.get_mut().1 -= 1;
            if e.get().1 == 0 {
                self.free.push(e.get().0);
                e.remove();
            }
        }
    }

    /// Every rule set holding an index, with it.
    pub(super) fn sets(&self) -> impl Iterator<Item = (&RuleSet, u32)> {
        self.by_set.iter().map(|(set, &(i, _))| (set, i))
    }

    /// Rule sets holding an index.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_set.len()
    }
}

/// Walks two sorted lists and reports what `new` removes from `old` and what it adds or
/// changes: `removed` gets every old item whose key is gone or whose item changed, `added`
/// every new item whose key is new or whose item changed (`same` compares two items of one
/// key).
pub(super) fn diff_sorted<'a, T, K: Ord>(
    old: &'a [T],
    new: &'a [T],
    key: impl Fn(&T) -> K,
    same: impl Fn(&T, &T) -> bool,
    mut removed: impl FnMut(&'a T),
    mut added: impl FnMut(&'a T),
) {
    let (mut i, mut j) = (0, 0);
    while i < old.len() && j < new.len() {
        match key(&old[i]).cmp(&key(&new[j])) {
            std::cmp::Ordering::Less => {
                removed(&old[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                added(&new[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                if !same(&old[i], &new[j]) {
                    removed(&old[i]);
                    added(&new[j]);
                }
                i += 1;
                j += 1;
            }
        }
    }
    old[i..].iter().for_each(&mut removed);
    new[j..].iter().for_each(&mut added);
}

/// Whether a table of `bits` holds `keys` well enough to be updated in place: at most two
/// keys per bucket on average (a fresh build sizes it at one or fewer).
fn fits(bits: u32, keys: usize) -> bool {
    bits > 0 && keys <= 2 << bits
}

/// The buckets of one table in one slot that an update read or changed, written back at the
/// end: each bucket is read at most once and written at most once.
struct Buckets<'m, const W: usize>
where
    TableBucket<W>: aya::Pod,
{
    map: &'m mut Array<MapData, TableBucket<W>>,
    name: &'static str,
    slot: u32,
    seed: u64,
    bits: u32,
    touched: StdHashMap<u32, (TableBucket<W>, bool)>,
}

/// Where a table operation put or found a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// In a way of its bucket.
    Bucket,
    /// In the overflow hash map (the bucket is marked).
    Overflow,
}

impl<'m, const W: usize> Buckets<'m, W>
where
    TableBucket<W>: aya::Pod,
{
    fn new(
        map: &'m mut Array<MapData, TableBucket<W>>,
        name: &'static str,
        slot: u32,
        config: &TableConfig,
        which: usize,
    ) -> Self {
        Buckets {
            map,
            name,
            slot,
            seed: config.seeds[which],
            bits: config.bits[which],
            touched: StdHashMap::new(),
        }
    }

    fn bucket(&mut self, key: &[u64; W]) -> Result<&mut (TableBucket<W>, bool), MapsError> {
        let b = table_bucket(key, self.seed, self.bits);
        Ok(match self.touched.entry(b) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let bucket = self
                    .map
                    .get(&(b << 1 | self.slot), 0)
                    .map_err(err("reading", self.name))?;
                e.insert((bucket, false))
            }
        })
    }

    /// Takes `key` out of its bucket if it is there; otherwise it is in the overflow map.
    fn remove(&mut self, key: &[u64; W]) -> Result<Place, MapsError> {
        let (bucket, dirty) = self.bucket(key)?;
        for way in 0..bucket.values.len() {
            if bucket.values[way] != 0 && bucket.keys[way] == *key {
                bucket.values[way] = 0;
                bucket.keys[way] = [0; W];
                *dirty = true;
                return Ok(Place::Bucket);
            }
        }
        Ok(Place::Overflow)
    }

    /// Puts `key` in a free way of its bucket, or marks the bucket for the overflow map
    /// (also for a key without a value the table can hold).
    fn insert(&mut self, key: &[u64; W], value: Option<u32>) -> Result<Place, MapsError> {
        let (bucket, dirty) = self.bucket(key)?;
        *dirty = true;
        if let Some(value) = value
            && let Some(way) = bucket.values.iter().position(|&v| v == 0)
        {
            bucket.keys[way] = *key;
            bucket.values[way] = value;
            return Ok(Place::Bucket);
        }
        bucket.overflow = 1;
        Ok(Place::Overflow)
    }

    fn write(self) -> Result<(), MapsError> {
        for (b, (bucket, dirty)) in self.touched {
            if dirty {
                self.map
                    .set(b << 1 | self.slot, bucket, 0)
                    .map_err(err("writing", self.name))?;
            }
        }
        Ok(())
    }
}

/// Removes a key from a hash or LPM map; one already absent is not an error.
fn gone(result: Result<(), MapError>, map: &'static str) -> Result<(), MapsError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(err("removing", map)(e)),
    }
}

/// One map's entries in the slot's image and in the new policy.
type FromTo<'a, T> = (&'a [T], &'a [T]);

/// Rewrites one family's exact sources: table ways, or the overflow hash map.
fn update_hosts<const W: usize, A: Copy + Ord, K: aya::Pod>(
    mut table: Buckets<'_, W>,
    (hash, name): (&mut HashMap<MapData, K, u32>, &'static str),
    (from, to): FromTo<'_, (A, u32)>,
    table_key: impl Fn(A) -> [u64; W],
    hash_key: impl Fn(A) -> K,
) -> Result<(), MapsError>
where
    TableBucket<W>: aya::Pod,
{
    let (mut out, mut put) = (Vec::new(), Vec::new());
    diff_sorted(
        from,
        to,
        |(addr, _)| *addr,
        |a, b| a == b,
        |&(addr, _)| out.push(addr),
        |&entry| put.push(entry),
    );
    for addr in out {
        if table.remove(&table_key(addr))? == Place::Overflow {
            gone(hash.remove(&hash_key(addr)), name)?;
        }
    }
    for (addr, agent) in put {
        if table.insert(&table_key(addr), Some(agent))? == Place::Overflow {
            hash.insert(hash_key(addr), agent, 0)
                .map_err(err("writing", name))?;
        }
    }
    table.write()
}

/// Rewrites one family's source prefixes in their LPM trie.
fn update_prefixes<const N: usize, L: aya::Pod>(
    (trie, name): (&mut LpmTrie<MapData, L, u32>, &'static str),
    (from, to): FromTo<'_, (Prefix<N>, u32)>,
    key: impl Fn(Prefix<N>) -> Key<L>,
) -> Result<(), MapsError> {
    let (mut out, mut put) = (Vec::new(), Vec::new());
    diff_sorted(
        from,
        to,
        |(p, _)| *p,
        |a, b| a == b,
        |&(p, _)| out.push(p),
        |&entry| put.push(entry),
    );
    for p in out {
        gone(trie.remove(&key(p)), name)?;
    }
    for (p, agent) in put {
        trie.insert(&key(p), agent, 0)
            .map_err(err("writing", name))?;
    }
    Ok(())
}

/// The maps one family's destinations live in, and the slot's rule sets.
struct Destinations<'m, 'i, const W: usize, L: aya::Pod, H: aya::Pod>
where
    TableBucket<W>: aya::Pod,
{
    table: Buckets<'m, W>,
    lpm: (&'m mut LpmTrie<MapData, L, RuleSet>, &'static str),
    hash: (&'m mut HashMap<MapData, H, RuleSet>, &'static str),
    rules_map: (&'m mut Array<MapData, RuleSet>, u32),
    index: &'i mut RuleIndex,
}

/// Rewrites one family's destinations: in the LPM trie for agents with too many prefix
/// lengths, else in the table (with a `RULES` index) or its overflow hash map (with the
/// rule set itself).
fn update_destinations<const W: usize, const N: usize, L: aya::Pod, H: aya::Pod>(
    maps_of: Destinations<'_, '_, W, L, H>,
    (from, to): FromTo<'_, (u32, Prefix<N>, RuleSet)>,
    (lpm_from, lpm_to): (&HashSet<u32>, &HashSet<u32>),
    lpm_key: impl Fn(u32, Prefix<N>) -> Key<L>,
    table_key: impl Fn(u32, Prefix<N>) -> [u64; W],
    hash_key: impl Fn(u32, Prefix<N>) -> H,
) -> Result<(), MapsError>
where
    TableBucket<W>: aya::Pod,
{
    let Destinations {
        mut table,
        lpm: (trie, trie_name),
        hash: (hash, hash_name),
        rules_map: (rules_map, slot),
        index,
    } = maps_of;
    let (mut out, mut put) = (Vec::new(), Vec::new());
    diff_sorted(
        from,
        to,
        |(agent, p, _)| (*agent, *p),
        |a, b| a.2 == b.2 && lpm_from.contains(&a.0) == lpm_to.contains(&b.0),
        |e| out.push((lpm_from.contains(&e.0), e)),
        |e| put.push((lpm_to.contains(&e.0), e)),
    );
    for (lpm, &(agent, p, ref set)) in out {
        if lpm {
            gone(trie.remove(&lpm_key(agent, p)), trie_name)?;
        } else if table.remove(&table_key(agent, p))? == Place::Bucket {
            index.release(set);
        } else {
            gone(hash.remove(&hash_key(agent, p)), hash_name)?;
        }
    }
    let mut new_sets = Vec::new();
    for (lpm, &(agent, p, ref set)) in put {
        if lpm {
            trie.insert(&lpm_key(agent, p), set, 0)
                .map_err(err("writing", trie_name))?;
            continue;
        }
        let held = index.acquire(set);
        if let Some((i, true)) = held {
            new_sets.push((i, *set));
        }
        if table.insert(&table_key(agent, p), held.map(|(i, _)| i))? == Place::Overflow {
            // In the hash map the entry carries its rule set: it holds no index.
            if held.is_some() {
                index.release(set);
            }
            hash.insert(hash_key(agent, p), set, 0)
                .map_err(err("writing", hash_name))?;
        }
    }
    // The rule sets before the buckets that point at them (both in the inactive slot, so
    // the order matters only to a reader of a half-written slot, which nothing is).
    for (i, set) in new_sets {
        rules_map
            .set(i << 1 | slot, set, 0)
            .map_err(err("writing", maps::RULES))?;
    }
    table.write()
}

impl KernelMaps {
    /// Rewrites `slot`, which holds `from` (written by this process, see
    /// [`super::Slots`]), to hold `to`, touching only entries that differ. `Ok(false)`, before
    /// any write, when the slot cannot be updated in place (no rule index for it, or a table
    /// too full): the caller rewrites it whole.
    pub(super) fn update_in_place(
        &mut self,
        slot: u32,
        from: &Compiled,
        to: &Compiled,
    ) -> Result<bool, MapsError> {
        let Some(mut rules) = self.rule_index[slot as usize].take() else {
            return Ok(false);
        };
        let config = self
            .tables
            .get(&slot, 0)
            .map_err(err("reading", maps::TABLES))?;
        // Agents whose destinations of a family live in the LPM trie rather than the table.
        let lpm_agents = |c: &Compiled, flag| -> HashSet<u32> {
            c.agents
                .iter()
                .filter(|(_, p)| p.flags & flag != 0)
                .map(|(id, _)| *id)
                .collect()
        };
        let (lpm_from_v4, lpm_to_v4) = (
            lpm_agents(from, AGENT_DST_LPM_V4),
            lpm_agents(to, AGENT_DST_LPM_V4),
        );
        let (lpm_from_v6, lpm_to_v6) = (
            lpm_agents(from, AGENT_DST_LPM_V6),
            lpm_agents(to, AGENT_DST_LPM_V6),
        );
        let in_table = |c: &Compiled, lpm: &HashSet<u32>, v6: bool| {
            if v6 {
                c.destinations_v6
                    .iter()
                    .filter(|(a, _, _)| !lpm.contains(a))
                    .count()
            } else {
                c.destinations_v4
                    .iter()
                    .filter(|(a, _, _)| !lpm.contains(a))
                    .count()
            }
        };
        let room = [
            fits(config.bits[TABLE_SRC_V4], to.source_hosts_v4.len()),
            fits(config.bits[TABLE_SRC_V6], to.source_hosts_v6.len()),
            fits(config.bits[TABLE_DST_V4], in_table(to, &lpm_to_v4, false)),
            fits(config.bits[TABLE_DST_V6], in_table(to, &lpm_to_v6, true)),
        ];
        // A table without keys at the last build has no buckets: rewrite when it gets any.
        let empty_ok = [
            to.source_hosts_v4.is_empty(),
            to.source_hosts_v6.is_empty(),
            in_table(to, &lpm_to_v4, false) == 0,
            in_table(to, &lpm_to_v6, true) == 0,
        ];
        if room.iter().zip(empty_ok).any(|(&ok, empty)| !ok && !empty) {
            return Ok(false);
        }
        let result = self.update_entries(
            slot,
            from,
            to,
            &config,
            &mut rules,
            [(&lpm_from_v4, &lpm_to_v4), (&lpm_from_v6, &lpm_to_v6)],
        );
        if result.is_ok() {
            self.rule_index[slot as usize] = Some(rules);
        }
        result.map(|()| true)
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one pass per map, in the order a full write takes them"
    )]
    fn update_entries(
        &mut self,
        slot: u32,
        from: &Compiled,
        to: &Compiled,
        config: &TableConfig,
        rules: &mut RuleIndex,
        [(lpm_from_v4, lpm_to_v4), (lpm_from_v6, lpm_to_v6)]: [(&HashSet<u32>, &HashSet<u32>); 2],
    ) -> Result<(), MapsError> {
        let base = slot * self.stride;
        // Agents: a removed one is zeroed, an added or changed one written.
        let mut zero = Vec::new();
        let mut write = Vec::new();
        diff_sorted(
            &from.agents,
            &to.agents,
            |(id, _)| *id,
            |a, b| a.1 == b.1,
            |(id, _)| zero.push(*id),
            |(id, p)| write.push((*id, *p)),
        );
        for id in zero {
            if !write.iter().any(|(w, _)| *w == id) {
                self.agents
                    .set(base + id, AgentPolicy::default(), 0)
                    .map_err(err("clearing", maps::AGENTS))?;
            }
        }
        for (id, policy) in write {
            self.agents
                .set(base + id, policy, 0)
                .map_err(err("writing", maps::AGENTS))?;
        }

        // Guards at the agents' indices: an agent that lost its guards is zeroed.
        let mut zero = Vec::new();
        let mut write = Vec::new();
        diff_sorted(
            &from.guards,
            &to.guards,
            |(id, _)| *id,
            |a, b| a.1 == b.1,
            |(id, _)| zero.push(*id),
            |(id, g)| write.push((*id, *g)),
        );
        for id in zero {
            if !write.iter().any(|(w, _)| *w == id) {
                self.guard_policy
                    .set(base + id, GuardPolicy::default(), 0)
                    .map_err(err("clearing", maps::GUARD_POLICY))?;
            }
        }
        for (id, guards) in write {
            self.guard_policy
                .set(base + id, guards, 0)
                .map_err(err("writing", maps::GUARD_POLICY))?;
        }

        // Shared groups, at `group << 1 | slot`.
        let mut zero = Vec::new();
        let mut write = Vec::new();
        diff_sorted(
            &from.shared,
            &to.shared,
            |(group, _)| *group,
            |a, b| a.1 == b.1,
            |(group, _)| zero.push(*group),
            |(group, p)| write.push((*group, *p)),
        );
        let shared_key = |group: u16| u32::from(group) << 1 | slot;
        for group in zero {
            if !write.iter().any(|(w, _)| *w == group) {
                self.shared_policy
                    .set(shared_key(group), SharedPolicy::default(), 0)
                    .map_err(err("clearing", maps::SHARED_POLICY))?;
            }
        }
        for (group, policy) in write {
            self.shared_policy
                .set(shared_key(group), policy, 0)
                .map_err(err("writing", maps::SHARED_POLICY))?;
        }

        // Interfaces.
        let (mut out, mut put) = (Vec::new(), Vec::new());
        diff_sorted(
            &from.interfaces,
            &to.interfaces,
            |(ifindex, _)| *ifindex,
            |a, b| a == b,
            |&(ifindex, _)| out.push(ifindex),
            |&entry| put.push(entry),
        );
        for ifindex in out {
            gone(
                self.ifaces.remove(&IfaceKey { slot, ifindex }),
                maps::IFACES,
            )?;
        }
        for (ifindex, agent) in put {
            self.ifaces
                .insert(IfaceKey { slot, ifindex }, agent, 0)
                .map_err(err("writing", maps::IFACES))?;
        }

        // Exact sources: removals first, so their ways are free for what comes.
        update_hosts(
            Buckets::new(
                &mut self.src_table_v4,
                maps::SRC_TABLE_V4,
                slot,
                config,
                TABLE_SRC_V4,
            ),
            (&mut self.src_host_v4, maps::SRC_HOST_V4),
            (&from.source_hosts_v4, &to.source_hosts_v4),
            src_key_v4,
            |addr| HostV4Key { slot, addr },
        )?;
        update_hosts(
            Buckets::new(
                &mut self.src_table_v6,
                maps::SRC_TABLE_V6,
                slot,
                config,
                TABLE_SRC_V6,
            ),
            (&mut self.src_host_v6, maps::SRC_HOST_V6),
            (&from.source_hosts_v6, &to.source_hosts_v6),
            src_key_v6,
            |addr| HostV6Key { slot, addr },
        )?;

        // Source prefixes.
        let owner_bytes = slot.to_be_bytes();
        update_prefixes(
            (&mut self.src_v4, maps::SRC_V4),
            (&from.source_prefixes_v4, &to.source_prefixes_v4),
            |p| {
                Key::new(
                    OWNER_BITS + u32::from(p.len),
                    LpmV4 {
                        owner: owner_bytes,
                        addr: p.addr,
                    },
                )
            },
        )?;
        update_prefixes(
            (&mut self.src_v6, maps::SRC_V6),
            (&from.source_prefixes_v6, &to.source_prefixes_v6),
            |p| {
                Key::new(
                    OWNER_BITS + u32::from(p.len),
                    LpmV6 {
                        owner: owner_bytes,
                        addr: p.addr,
                    },
                )
            },
        )?;

        // Destinations: where an entry lives (LPM trie or table) follows its agent's flag, so
        // an entry whose agent moved between them counts as changed.
        let rules_map = (&mut self.rules, slot);
        update_destinations(
            Destinations {
                table: Buckets::new(
                    &mut self.dst_table_v4,
                    maps::DST_TABLE_V4,
                    slot,
                    config,
                    TABLE_DST_V4,
                ),
                lpm: (&mut self.dst_v4, maps::DST_V4),
                hash: (&mut self.dst_hash_v4, maps::DST_HASH_V4),
                rules_map,
                index: rules,
            },
            (&from.destinations_v4, &to.destinations_v4),
            (lpm_from_v4, lpm_to_v4),
            |agent, p| {
                Key::new(
                    OWNER_BITS + u32::from(p.len),
                    LpmV4 {
                        owner: owner(slot, agent),
                        addr: p.addr,
                    },
                )
            },
            |agent, p| {
                dst_key_v4(
                    owner_word(slot, agent),
                    u32::from(p.len),
                    u32::from_be_bytes(p.addr),
                )
            },
            |agent, p| DstV4Key {
                owner: owner_word(slot, agent),
                len: u32::from(p.len),
                addr: p.addr,
            },
        )?;
        update_destinations(
            Destinations {
                table: Buckets::new(
                    &mut self.dst_table_v6,
                    maps::DST_TABLE_V6,
                    slot,
                    config,
                    TABLE_DST_V6,
                ),
                lpm: (&mut self.dst_v6, maps::DST_V6),
                hash: (&mut self.dst_hash_v6, maps::DST_HASH_V6),
                rules_map: (&mut self.rules, slot),
                index: rules,
            },
            (&from.destinations_v6, &to.destinations_v6),
            (lpm_from_v6, lpm_to_v6),
            |agent, p| {
                Key::new(
                    OWNER_BITS + u32::from(p.len),
                    LpmV6 {
                        owner: owner(slot, agent),
                        addr: p.addr,
                    },
                )
            },
            |agent, p| {
                // The address's halves, as the source key has them.
                let [hi, lo] = src_key_v6(p.addr);
                dst_key_v6(owner_word(slot, agent), u32::from(p.len), hi, lo)
            },
            |agent, p| DstV6Key {
                owner: owner_word(slot, agent),
                len: u32::from(p.len),
                addr: p.addr,
            },
        )?;

        // Server names.
        let (mut out, mut put) = (Vec::new(), Vec::new());
        diff_sorted(
            &from.server_names,
            &to.server_names,
            |(agent, kind, name, _)| (*agent, *kind, name.clone()),
            |a, b| a.3 == b.3,
            |e| out.push(e),
            |e| put.push(e),
        );
        for (agent, kind, name, _) in out {
            let key = SniKey::new(slot, *agent, *kind, name.as_bytes())
                .expect("policy names fit an SNI key");
            gone(self.sni.remove(&key), maps::SNI)?;
        }
        for (agent, kind, name, set) in put {
            let key = SniKey::new(slot, *agent, *kind, name.as_bytes())
                .expect("policy names fit an SNI key");
            self.sni
                .insert(key, set, 0)
                .map_err(err("writing", maps::SNI))?;
        }

        self.tls_ports
            .set(slot, to.tls_ports, 0)
            .map_err(err("writing", maps::TLS_PORTS))?;
        self.slots
            .set(slot, slot_config(to), 0)
            .map_err(err("writing", maps::SLOTS))
    }
}

impl KernelMaps {
    /// Clears what the kernel keeps for agent `id` outside the policy slots: its rate
    /// buckets (full again), its counters and audit budget (zero), the addresses learned
    /// for it. For an id handed to a new agent, which must not inherit any of it; called
    /// before the apply that introduces the agent.
    pub fn reset_agent(&mut self, id: u32) -> Result<(), MapsError> {
        self.reset_bucket(id)?;
        self.reset_audit_limiter(id)?;
        self.reset_guards(id)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| MapsError::Batch {
            map: maps::COUNTERS,
            source,
        })?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![
            enforcer_common::AgentCounters::default(
            );
            cpus
        ])
        .map_err(|source| MapsError::Batch {
            map: maps::COUNTERS,
            source,
        })?;
        self.counters
            .set(id, zeros, 0)
            .map_err(err("writing", maps::COUNTERS))?;
        let stale_v4: Vec<_> = self
            .names_v4
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.agent == id)
            .collect();
        for key in stale_v4 {
            gone(self.names_v4.remove(&key), maps::NAMES_V4)?;
        }
        let stale_v6: Vec<_> = self
            .names_v6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.agent == id)
            .collect();
        for key in stale_v6 {
            gone(self.names_v6.remove(&key), maps::NAMES_V6)?;
        }
        Ok(())
    }
}

/// Everything a slot holds that the program can reach, as mappings rather than placement:
/// two slots holding one policy give equal `SlotEntries` whatever their table seeds, sizes
/// and `RULES` indices. What the churn tests compare and count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotEntries {
    /// Non-empty `AGENTS` entries: (agent id, policy).
    pub agents: Vec<(u32, AgentPolicy)>,
    /// `IFACES`: (ifindex, agent id).
    pub interfaces: Vec<(u32, u32)>,
    /// Exact IPv4 sources, table and overflow map together: (table key, agent id).
    pub sources_v4: Vec<([u64; 1], u32)>,
    /// Exact IPv6 sources likewise.
    pub sources_v6: Vec<([u64; 2], u32)>,
    /// Source prefix entries of both families: (prefix length, address bytes, agent id).
    pub source_prefixes: Vec<(u32, Vec<u8>, u32)>,
    /// Hash-probed IPv4 destinations, table and overflow map together: (table key, rules).
    pub destinations_v4: Vec<([u64; 1], RuleSet)>,
    /// Hash-probed IPv6 destinations likewise.
    pub destinations_v6: Vec<([u64; 3], RuleSet)>,
    /// LPM destinations of both families: (prefix length, owner and address bytes, rules).
    pub destination_prefixes: Vec<(u32, Vec<u8>, RuleSet)>,
    /// `SNI`: (agent id, kind, name bytes, rules).
    pub server_names: Vec<(u32, u32, Vec<u8>, RuleSet)>,
    /// Non-empty `GUARD_POLICY` entries: (agent id, guards).
    pub guards: Vec<(u32, GuardPolicy)>,
    /// Non-empty `SHARED_POLICY` entries: (group id, shared limit).
    pub shared: Vec<(u16, SharedPolicy)>,
    /// Entries of the hash and LPM maps in this slot, each counted once (tables excluded).
    pub map_entries: usize,
}

/// The (key, value) pairs of a table's first `1 << bits` buckets in `slot`.
fn table_pairs<const W: usize>(
    map: &Array<MapData, TableBucket<W>>,
    name: &'static str,
    slot: u32,
    bits: u32,
) -> Result<Vec<([u64; W], u32)>, MapsError>
where
    TableBucket<W>: aya::Pod,
{
    let mut out = Vec::new();
    if bits == 0 {
        return Ok(out);
    }
    for b in 0..1u32 << bits {
        let bucket = map.get(&(b << 1 | slot), 0).map_err(err("reading", name))?;
        for way in 0..bucket.values.len() {
            if bucket.values[way] != 0 {
                out.push((bucket.keys[way], bucket.values[way]));
            }
        }
    }
    Ok(out)
}

impl KernelMaps {
    /// What `slot` holds (see [`SlotEntries`]), read back from the maps.
    pub fn slot_entries(&self, slot: u32) -> Result<SlotEntries, MapsError> {
        let mut e = SlotEntries::default();
        let config = self
            .tables
            .get(&slot, 0)
            .map_err(err("reading", maps::TABLES))?;
        for id in 0..self.stride {
            let policy = self
                .agents
                .get(&(slot * self.stride + id), 0)
                .map_err(err("reading", maps::AGENTS))?;
            if policy != AgentPolicy::default() {
                e.agents.push((id, policy));
            }
            let guards = self
                .guard_policy
                .get(&(slot * self.stride + id), 0)
                .map_err(err("reading", maps::GUARD_POLICY))?;
            if guards != GuardPolicy::default() {
                e.guards.push((id, guards));
            }
        }
        for group in 0..MAX_SHARED_GROUPS {
            let policy = self
                .shared_policy
                .get(&(group << 1 | slot), 0)
                .map_err(err("reading", maps::SHARED_POLICY))?;
            if policy != SharedPolicy::default() {
                // Below MAX_SHARED_GROUPS, so it fits.
                e.shared.push((group as u16, policy));
            }
        }
        for item in self.ifaces.iter() {
            let (k, v) = item.map_err(err("listing", maps::IFACES))?;
            if k.slot == slot {
                e.interfaces.push((k.ifindex, v));
                e.map_entries += 1;
            }
        }
        e.sources_v4 = table_pairs(
            &self.src_table_v4,
            maps::SRC_TABLE_V4,
            slot,
            config.bits[TABLE_SRC_V4],
        )?;
        for item in self.src_host_v4.iter() {
            let (k, v) = item.map_err(err("listing", maps::SRC_HOST_V4))?;
            if k.slot == slot {
                e.sources_v4.push((src_key_v4(k.addr), v));
                e.map_entries += 1;
            }
        }
        e.sources_v6 = table_pairs(
            &self.src_table_v6,
            maps::SRC_TABLE_V6,
            slot,
            config.bits[TABLE_SRC_V6],
        )?;
        for item in self.src_host_v6.iter() {
            let (k, v) = item.map_err(err("listing", maps::SRC_HOST_V6))?;
            if k.slot == slot {
                e.sources_v6.push((src_key_v6(k.addr), v));
                e.map_entries += 1;
            }
        }
        let owner_bytes = slot.to_be_bytes();
        for item in self.src_v4.iter() {
            let (k, v) = item.map_err(err("listing", maps::SRC_V4))?;
            if k.data().owner == owner_bytes {
                e.source_prefixes
                    .push((k.prefix_len(), k.data().addr.to_vec(), v));
                e.map_entries += 1;
            }
        }
        for item in self.src_v6.iter() {
            let (k, v) = item.map_err(err("listing", maps::SRC_V6))?;
            if k.data().owner == owner_bytes {
                e.source_prefixes
                    .push((k.prefix_len(), k.data().addr.to_vec(), v));
                e.map_entries += 1;
            }
        }
        let rule_set = |i: u32| {
            self.rules
                .get(&(i << 1 | slot), 0)
                .map_err(err("reading", maps::RULES))
        };
        for (key, i) in table_pairs(
            &self.dst_table_v4,
            maps::DST_TABLE_V4,
            slot,
            config.bits[TABLE_DST_V4],
        )? {
            e.destinations_v4.push((key, rule_set(i)?));
        }
        for item in self.dst_hash_v4.iter() {
            let (k, v) = item.map_err(err("listing", maps::DST_HASH_V4))?;
            if k.owner >> 31 == slot {
                let key = dst_key_v4(k.owner, k.len, u32::from_be_bytes(k.addr));
                e.destinations_v4.push((key, v));
                e.map_entries += 1;
            }
        }
        for (key, i) in table_pairs(
            &self.dst_table_v6,
            maps::DST_TABLE_V6,
            slot,
            config.bits[TABLE_DST_V6],
        )? {
            e.destinations_v6.push((key, rule_set(i)?));
        }
        for item in self.dst_hash_v6.iter() {
            let (k, v) = item.map_err(err("listing", maps::DST_HASH_V6))?;
            if k.owner >> 31 == slot {
                let [hi, lo] = src_key_v6(k.addr);
                e.destinations_v6
                    .push((dst_key_v6(k.owner, k.len, hi, lo), v));
                e.map_entries += 1;
            }
        }
        for item in self.dst_v4.iter() {
            let (k, v) = item.map_err(err("listing", maps::DST_V4))?;
            if u32::from(k.data().owner[0] >> 7) == slot {
                let mut bytes = k.data().owner.to_vec();
                bytes.extend(k.data().addr);
                e.destination_prefixes.push((k.prefix_len(), bytes, v));
                e.map_entries += 1;
            }
        }
        for item in self.dst_v6.iter() {
            let (k, v) = item.map_err(err("listing", maps::DST_V6))?;
            if u32::from(k.data().owner[0] >> 7) == slot {
                let mut bytes = k.data().owner.to_vec();
                bytes.extend(k.data().addr);
                e.destination_prefixes.push((k.prefix_len(), bytes, v));
                e.map_entries += 1;
            }
        }
        for item in self.sni.iter() {
            let (k, v) = item.map_err(err("listing", maps::SNI))?;
            if k.slot == slot {
                e.server_names.push((k.agent, k.kind, k.name.to_vec(), v));
                e.map_entries += 1;
            }
        }
        e.interfaces.sort();
        e.sources_v4.sort();
        e.sources_v6.sort();
        e.source_prefixes.sort();
        e.destinations_v4.sort_by_key(|(k, _)| *k);
        e.destinations_v6.sort_by_key(|(k, _)| *k);
        e.destination_prefixes
            .sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        e.server_names
            .sort_by(|a, b| (a.0, a.1, &a.2).cmp(&(b.0, b.1, &b.2)));
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_reports_removed_added_and_changed() {
        let old = [(1, 'a'), (2, 'b'), (4, 'd')];
        let new = [(2, 'B'), (3, 'c'), (4, 'd'), (5, 'e')];
        let (mut removed, mut added) = (Vec::new(), Vec::new());
        diff_sorted(
            &old,
            &new,
            |e| e.0,
            |a, b| a == b,
            |e| removed.push(*e),
            |e| added.push(*e),
        );
        assert_eq!(removed, [(1, 'a'), (2, 'b')]);
        assert_eq!(added, [(2, 'B'), (3, 'c'), (5, 'e')]);
    }

    #[test]
    fn rule_indices_are_shared_counted_and_reused() {
        let set = |n: u32| RuleSet {
            len: n,
            ..RuleSet::default()
        };
        let mut index = RuleIndex::new(3);
        assert_eq!(index.acquire(&set(1)), Some((1, true)));
        assert_eq!(index.acquire(&set(1)), Some((1, false)));
        assert_eq!(index.acquire(&set(2)), Some((2, true)));
        // Room for indices 1 and 2 only (0 is never used).
        assert_eq!(index.acquire(&set(3)), None);
        index.release(&set(1));
        assert_eq!(index.len(), 2, "one reference to set 1 is left");
        index.release(&set(1));
        assert_eq!(index.acquire(&set(3)), Some((1, true)), "index 1 was freed");
    }
}
