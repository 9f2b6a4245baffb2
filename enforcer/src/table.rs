//! The source tables the XDP program probes before the hash maps (see
//! [`enforcer_common::SourceBucket`]): built here from a compiled policy's exact source
//! addresses, a pure function of them, then written by [`crate::dataplane`].

use enforcer_common::{MAX_TABLE_BITS, SourceBucket, TABLE_WAYS, UNKNOWN_AGENT, table_bucket};

/// Seeds tried per build; the one that leaves the fewest keys to the overflow map wins
/// (the first, on a tie), so a build is deterministic.
pub const SEEDS: [u64; 4] = [
    0,
    0x5851_f42d_4c95_7f2d,
    0x1405_7b7e_f767_814f,
    0x2545_f491_4f6c_dd1d,
];

/// One slot's source table for one address family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceTable<const W: usize> {
    /// Hash seed.
    pub seed: u64,
    /// `buckets.len() == 1 << bits`; 0 when there are no keys (and no buckets).
    pub bits: u32,
    /// The buckets, in index order.
    pub buckets: Vec<SourceBucket<W>>,
    /// Keys that did not fit their bucket, with their agents: they go to the hash map.
    pub overflow: Vec<([u64; W], u32)>,
}

impl<const W: usize> SourceTable<W> {
    /// Builds the table of `entries` (key, agent id; keys distinct, agents not
    /// [`UNKNOWN_AGENT`]) with at most `1 << max_bits` buckets: the smallest power of two
    /// holding one key per bucket on average, so a bucket of [`TABLE_WAYS`] rarely fills.
    pub fn build(entries: &[([u64; W], u32)], max_bits: u32) -> Self {
        if entries.is_empty() {
            return SourceTable {
                seed: 0,
                bits: 0,
                buckets: Vec::new(),
                overflow: Vec::new(),
            };
        }
        let bits = entries
            .len()
            .next_power_of_two()
            .trailing_zeros()
            .clamp(1, max_bits.clamp(1, MAX_TABLE_BITS));
        SEEDS
            .iter()
            .map(|&seed| Self::place(entries, seed, bits))
            .min_by_key(|t| t.overflow.len())
            .expect("SEEDS is not empty")
    }

    fn place(entries: &[([u64; W], u32)], seed: u64, bits: u32) -> Self {
        let mut buckets = vec![SourceBucket::<W>::default(); 1 << bits];
        let mut overflow = Vec::new();
        for &(key, agent) in entries {
            debug_assert_ne!(agent, UNKNOWN_AGENT);
            let bucket = &mut buckets[table_bucket(&key, seed, bits) as usize];
            match bucket.agents.iter().position(|&a| a == UNKNOWN_AGENT) {
                Some(way) => {
                    bucket.keys[way] = key;
                    bucket.agents[way] = agent;
                }
                None => {
                    bucket.overflow = 1;
                    overflow.push((key, agent));
                }
            }
        }
        SourceTable {
            seed,
            bits,
            buckets,
            overflow,
        }
    }

    /// What the XDP program finds for `key`: the agent, looking in the overflow entries
    /// only when the key's bucket says so (a mirror of its probe, for tests).
    pub fn lookup(&self, key: [u64; W]) -> u32 {
        if self.bits == 0 {
            return UNKNOWN_AGENT;
        }
        let bucket = &self.buckets[table_bucket(&key, self.seed, self.bits) as usize];
        for way in 0..TABLE_WAYS {
            if bucket.agents[way] != UNKNOWN_AGENT && bucket.keys[way] == key {
                return bucket.agents[way];
            }
        }
        if bucket.overflow == 0 {
            return UNKNOWN_AGENT;
        }
        self.overflow
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(UNKNOWN_AGENT, |&(_, agent)| agent)
    }
}

/// The bits of the largest table a map of `buckets_per_slot` buckets per slot holds.
pub fn max_bits(buckets_per_slot: u32) -> u32 {
    if buckets_per_slot == 0 {
        return 0;
    }
    (31 - buckets_per_slot.leading_zeros()).min(MAX_TABLE_BITS)
}

#[cfg(test)]
mod tests {
    use enforcer_common::{table_key_v4, table_key_v6};

    use super::*;

    fn v4(n: u32) -> [u64; 1] {
        table_key_v4(n.to_be_bytes())
    }

    #[test]
    fn every_key_is_found_and_nothing_else() {
        // Sequential addresses, the usual shape of an agent pool.
        let entries: Vec<_> = (0..10_000u32)
            .map(|i| (v4(0x6440_0000 + i), i + 1))
            .collect();
        let t = SourceTable::build(&entries, 20);
        assert_eq!(t.buckets.len(), 1 << t.bits);
        assert_eq!(t.bits, 14);
        for &(key, agent) in &entries {
            assert_eq!(t.lookup(key), agent);
        }
        for n in [0, 0x6440_0000 - 1, 0x6440_0000 + 10_000, u32::MAX] {
            assert_eq!(t.lookup(v4(n)), UNKNOWN_AGENT, "{n:#x}");
        }
        // One key per bucket on average: a bucket of four rarely overflows.
        assert!(t.overflow.len() < 50, "{} overflowed", t.overflow.len());
    }

    #[test]
    fn a_full_table_overflows_exactly() {
        // Eight times more keys than four-way buckets hold: half go to the overflow
        // entries, and every one is still found through them.
        let entries: Vec<_> = (0..64u32).map(|i| (v4(i * 7919), i + 1)).collect();
        let t = SourceTable::build(&entries, 1);
        assert_eq!(t.bits, 1);
        assert_eq!(t.overflow.len(), 64 - 2 * TABLE_WAYS);
        assert!(t.buckets.iter().all(|b| b.overflow == 1));
        for &(key, agent) in &entries {
            assert_eq!(t.lookup(key), agent);
        }
        assert_eq!(t.lookup(v4(1)), UNKNOWN_AGENT);
    }

    #[test]
    fn address_zero_is_a_key_like_any_other() {
        // A free entry has key 0 too; only its agent tells it apart.
        let t = SourceTable::build(&[(v4(0), 7)], 4);
        assert_eq!(t.lookup(v4(0)), 7);
        let t = SourceTable::build(&[(v4(5), 7)], 4);
        assert_eq!(t.lookup(v4(0)), UNKNOWN_AGENT);
    }

    #[test]
    fn ipv6_keys_use_both_halves() {
        let a: [u8; 16] = "2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let mut b = a;
        b[0] ^= 0x80;
        let t = SourceTable::build(&[(table_key_v6(a), 3)], 8);
        assert_eq!(t.lookup(table_key_v6(a)), 3);
        assert_eq!(t.lookup(table_key_v6(b)), UNKNOWN_AGENT);
    }

    #[test]
    fn empty_and_sizes() {
        let t = SourceTable::<1>::build(&[], 10);
        assert_eq!((t.bits, t.buckets.len()), (0, 0));
        assert_eq!(t.lookup(v4(1)), UNKNOWN_AGENT);
        assert_eq!(max_bits(0), 0);
        assert_eq!(max_bits(1), 0);
        assert_eq!(max_bits(2), 1);
        assert_eq!(max_bits(131_072), 17);
        assert_eq!(max_bits(131_073), 17);
    }
}
