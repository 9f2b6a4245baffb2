//! The exact-match tables the XDP program probes before the hash maps (see
//! [`enforcer_common::TableBucket`]): built here from a compiled policy's exact source
//! addresses and destination prefixes, a pure function of them, then written by
//! [`crate::dataplane`].

use enforcer_common::{MAX_TABLE_BITS, TABLE_WAYS, TableBucket, table_bucket};

/// Seeds tried per build; the one that leaves the fewest keys to the overflow map wins
/// (the first, on a tie), so a build is deterministic.
pub const SEEDS: [u64; 4] = [
    0,
    0x5851_f42d_4c95_7f2d,
    0x1405_7b7e_f767_814f,
    0x2545_f491_4f6c_dd1d,
];

/// One slot's table of one kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table<const W: usize> {
    /// Hash seed.
    pub seed: u64,
    /// `buckets.len() == 1 << bits`; 0 when there are no keys (and no buckets).
    pub bits: u32,
    /// The buckets, in index order.
    pub buckets: Vec<TableBucket<W>>,
    /// Positions (in the entries built from) of the entries that go to the hash map: those
    /// that did not fit their bucket, and those without a value the table can hold.
    pub overflow: Vec<usize>,
}

/// What the XDP program's probe of a table finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The key's value, in its bucket.
    Found(u32),
    /// Not in its bucket, which sends the program on to the hash map.
    Overflow,
    /// Not there at all.
    Missing,
}

impl<const W: usize> Table<W> {
    /// Builds the table of `entries` (keys distinct; values not 0, `None` for a key whose
    /// value the table cannot hold, such as a rule set beyond `RULES`, which goes straight
    /// to the hash map) with `1 << bits` buckets (`bits` clamped to 1..=[`MAX_TABLE_BITS`]),
    /// none when there are no entries.
    ///
    /// The caller gives the size its map holds rather than the smallest that fits the
    /// keys, so a later apply adds keys to the table in place (see
    /// [`crate::dataplane::incremental`]) instead of rewriting it at a larger size.
    pub fn build(entries: &[([u64; W], Option<u32>)], bits: u32) -> Self {
        if entries.is_empty() {
            return Table {
                seed: 0,
                bits: 0,
                buckets: Vec::new(),
                overflow: Vec::new(),
            };
        }
        let bits = bits.clamp(1, MAX_TABLE_BITS);
        // The first seed with the fewest overflows wins. Keys without a value overflow under
        // every seed: a seed that overflows no others cannot be beaten, so the search stops
        // there (the usual case in a table sized for its map's capacity).
        let floor = entries.iter().filter(|(_, value)| value.is_none()).count();
        let mut best: Option<Self> = None;
        for &seed in &SEEDS {
            let table = Self::place(entries, seed, bits);
            if best
                .as_ref()
                .is_none_or(|b| table.overflow.len() < b.overflow.len())
            {
                best = Some(table);
            }
            if best.as_ref().is_some_and(|b| b.overflow.len() == floor) {
                break;
            }
        }
        best.expect("SEEDS is not empty")
    }

    fn place(entries: &[([u64; W], Option<u32>)], seed: u64, bits: u32) -> Self {
        let mut buckets = vec![TableBucket::<W>::default(); 1 << bits];
        let mut overflow = Vec::new();
        for (at, &(key, value)) in entries.iter().enumerate() {
            let bucket = &mut buckets[table_bucket(&key, seed, bits) as usize];
            let free = bucket.values.iter().position(|&v| v == 0);
            match (value, free) {
                (Some(value), Some(way)) => {
                    debug_assert_ne!(value, 0);
                    bucket.keys[way] = key;
                    bucket.values[way] = value;
                }
                _ => {
                    bucket.overflow = 1;
                    overflow.push(at);
                }
            }
        }
        Table {
            seed,
            bits,
            buckets,
            overflow,
        }
    }

    /// What the XDP program's probe finds for `key` (a mirror of it, for tests).
    pub fn probe(&self, key: [u64; W]) -> Probe {
        if self.bits == 0 {
            return Probe::Overflow;
        }
        let bucket = &self.buckets[table_bucket(&key, self.seed, self.bits) as usize];
        for way in 0..TABLE_WAYS {
            if bucket.values[way] != 0 && bucket.keys[way] == key {
                return Probe::Found(bucket.values[way]);
            }
        }
        if bucket.overflow == 0 {
            Probe::Missing
        } else {
            Probe::Overflow
        }
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
    use enforcer_common::{src_key_v4, src_key_v6};

    use super::*;

    fn v4(n: u32) -> [u64; 1] {
        src_key_v4(n.to_be_bytes())
    }

    /// What a lookup through the table and then the hash map finds: the program's answer.
    fn lookup<const W: usize>(
        t: &Table<W>,
        entries: &[([u64; W], Option<u32>)],
        key: [u64; W],
    ) -> Option<u32> {
        match t.probe(key) {
            Probe::Found(value) => Some(value),
            Probe::Missing => None,
            Probe::Overflow => t
                .overflow
                .iter()
                .map(|&at| entries[at])
                .find(|(k, _)| *k == key)
                .map(|(_, value)| value.unwrap_or(0)),
        }
    }

    #[test]
    fn every_key_is_found_and_nothing_else() {
        // Sequential addresses, the usual shape of an agent pool.
        let entries: Vec<_> = (0..10_000u32)
            .map(|i| (v4(0x6440_0000 + i), Some(i + 1)))
            .collect();
        // The smallest table with a bucket per key, the size a map for 10,000 keys has.
        let t = Table::build(&entries, 14);
        assert_eq!(t.bits, 14);
        assert_eq!(t.buckets.len(), 1 << 14);
        for &(key, value) in &entries {
            assert_eq!(lookup(&t, &entries, key), value);
        }
        for n in [0, 0x6440_0000 - 1, 0x6440_0000 + 10_000, u32::MAX] {
            assert_eq!(lookup(&t, &entries, v4(n)), None, "{n:#x}");
        }
        // One key per bucket on average: a bucket of four rarely overflows.
        assert!(t.overflow.len() < 50, "{} overflowed", t.overflow.len());
    }

    #[test]
    fn a_full_table_overflows_exactly() {
        // Eight times more keys than four-way buckets hold: the rest go to the overflow
        // entries, and every one is still found through them.
        let entries: Vec<_> = (0..64u32).map(|i| (v4(i * 7919), Some(i + 1))).collect();
        let t = Table::build(&entries, 1);
        assert_eq!(t.bits, 1);
        assert_eq!(t.overflow.len(), 64 - 2 * TABLE_WAYS);
        assert!(t.buckets.iter().all(|b| b.overflow == 1));
        for &(key, value) in &entries {
            assert_eq!(lookup(&t, &entries, key), value);
        }
        assert_eq!(lookup(&t, &entries, v4(1)), None);
    }

    #[test]
    fn spilled_keys_mark_their_buckets() {
        let mut entries: Vec<_> = (0..100u32).map(|i| (v4(i), Some(i + 1))).collect();
        entries.extend([(v4(1000), None), (v4(2000), None)]);
        let t = Table::build(&entries, 10);
        for at in [100, 101] {
            let key = entries[at].0;
            let bucket = &t.buckets[table_bucket(&key, t.seed, t.bits) as usize];
            assert_eq!(bucket.overflow, 1);
            assert!(t.overflow.contains(&at));
            assert_eq!(t.probe(key), Probe::Overflow);
        }
        // Only the keys without a value overflow: the first seed did as well as any.
        assert_eq!(t.overflow, [100, 101]);
        assert_eq!(t.seed, SEEDS[0]);
    }

    #[test]
    fn address_zero_is_a_key_like_any_other() {
        // A free entry has key 0 too; only its value tells it apart.
        let t = Table::build(&[(v4(0), Some(7))], 4);
        assert_eq!(t.probe(v4(0)), Probe::Found(7));
        let t = Table::build(&[(v4(5), Some(7))], 4);
        assert_eq!(t.probe(v4(0)), Probe::Missing);
    }

    #[test]
    fn ipv6_keys_use_both_halves() {
        let a: [u8; 16] = "2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let mut b = a;
        b[0] ^= 0x80;
        let t = Table::build(&[(src_key_v6(a), Some(3))], 8);
        assert_eq!(t.probe(src_key_v6(a)), Probe::Found(3));
        assert_eq!(t.probe(src_key_v6(b)), Probe::Missing);
    }

    #[test]
    fn a_table_has_the_size_asked_whatever_its_keys() {
        // Sized for its map, not its keys: later keys go in place.
        let entries: Vec<_> = (0..100u32).map(|i| (v4(i), Some(i + 1))).collect();
        let t = Table::build(&entries, 16);
        assert_eq!((t.bits, t.buckets.len()), (16, 1 << 16));
        assert!(t.overflow.is_empty());
        // Plenty of room: the first seed places every key, and the search stops there.
        assert_eq!(t.seed, SEEDS[0]);
        for &(key, value) in &entries {
            assert_eq!(lookup(&t, &entries, key), value);
        }
        assert_eq!(Table::build(&entries, 0).bits, 1);
    }

    #[test]
    fn empty_and_sizes() {
        let t = Table::<1>::build(&[], 10);
        assert_eq!((t.bits, t.buckets.len()), (0, 0));
        // No table: the program looks in the hash map alone.
        assert_eq!(t.probe(v4(1)), Probe::Overflow);
        assert_eq!(max_bits(0), 0);
        assert_eq!(max_bits(1), 0);
        assert_eq!(max_bits(2), 1);
        assert_eq!(max_bits(131_072), 17);
        assert_eq!(max_bits(131_073), 17);
    }
}
