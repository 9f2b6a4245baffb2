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
    /// Keys that go to the hash map, with their values: those that did not fit their
    /// bucket, and the spilled ones (value 0).
    pub overflow: Vec<([u64; W], u32)>,
}

impl<const W: usize> Table<W> {
    /// Builds the table of `entries` (key, value; keys distinct, values not 0) with at most
    /// `1 << max_bits` buckets: the smallest power of two holding one key per bucket on
    /// average, so a bucket of [`TABLE_WAYS`] rarely fills. `spill` keys have no value the
    /// table can hold (a rule set beyond `RULES`): they go straight to the overflow.
    pub fn build(entries: &[([u64; W], u32)], spill: &[[u64; W]], max_bits: u32) -> Self {
        let keys = entries.len() + spill.len();
        if keys == 0 {
            return Table {
                seed: 0,
                bits: 0,
                buckets: Vec::new(),
                overflow: Vec::new(),
            };
        }
        let bits = keys
            .next_power_of_two()
            .trailing_zeros()
            .clamp(1, max_bits.clamp(1, MAX_TABLE_BITS));
        SEEDS
            .iter()
            .map(|&seed| Self::place(entries, spill, seed, bits))
            .min_by_key(|t| t.overflow.len())
            .expect("SEEDS is not empty")
    }

    fn place(entries: &[([u64; W], u32)], spill: &[[u64; W]], seed: u64, bits: u32) -> Self {
        let mut buckets = vec![TableBucket::<W>::default(); 1 << bits];
        let mut overflow = Vec::new();
        for &(key, value) in entries {
            debug_assert_ne!(value, 0);
            let bucket = &mut buckets[table_bucket(&key, seed, bits) as usize];
            match bucket.values.iter().position(|&v| v == 0) {
                Some(way) => {
                    bucket.keys[way] = key;
                    bucket.values[way] = value;
                }
                None => {
                    bucket.overflow = 1;
                    overflow.push((key, value));
                }
            }
        }
        for &key in spill {
            buckets[table_bucket(&key, seed, bits) as usize].overflow = 1;
            overflow.push((key, 0));
        }
        Table {
            seed,
            bits,
            buckets,
            overflow,
        }
    }

    /// The value the XDP program finds for `key`, looking in the overflow entries only when
    /// the key's bucket says so (a mirror of its probe, for tests).
    pub fn lookup(&self, key: [u64; W]) -> Option<u32> {
        if self.bits == 0 {
            return None;
        }
        let bucket = &self.buckets[table_bucket(&key, self.seed, self.bits) as usize];
        for way in 0..TABLE_WAYS {
            if bucket.values[way] != 0 && bucket.keys[way] == key {
                return Some(bucket.values[way]);
            }
        }
        if bucket.overflow == 0 {
            return None;
        }
        self.overflow
            .iter()
            .find(|(k, _)| *k == key)
            .map(|&(_, value)| value)
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

    #[test]
    fn every_key_is_found_and_nothing_else() {
        // Sequential addresses, the usual shape of an agent pool.
        let entries: Vec<_> = (0..10_000u32)
            .map(|i| (v4(0x6440_0000 + i), i + 1))
            .collect();
        let t = Table::build(&entries, &[], 20);
        assert_eq!(t.buckets.len(), 1 << t.bits);
        assert_eq!(t.bits, 14);
        for &(key, value) in &entries {
            assert_eq!(t.lookup(key), Some(value));
        }
        for n in [0, 0x6440_0000 - 1, 0x6440_0000 + 10_000, u32::MAX] {
            assert_eq!(t.lookup(v4(n)), None, "{n:#x}");
        }
        // One key per bucket on average: a bucket of four rarely overflows.
        assert!(t.overflow.len() < 50, "{} overflowed", t.overflow.len());
    }

    #[test]
    fn a_full_table_overflows_exactly() {
        // Eight times more keys than four-way buckets hold: the rest go to the overflow
        // entries, and every one is still found through them.
        let entries: Vec<_> = (0..64u32).map(|i| (v4(i * 7919), i + 1)).collect();
        let t = Table::build(&entries, &[], 1);
        assert_eq!(t.bits, 1);
        assert_eq!(t.overflow.len(), 64 - 2 * TABLE_WAYS);
        assert!(t.buckets.iter().all(|b| b.overflow == 1));
        for &(key, value) in &entries {
            assert_eq!(t.lookup(key), Some(value));
        }
        assert_eq!(t.lookup(v4(1)), None);
    }

    #[test]
    fn spilled_keys_mark_their_buckets() {
        let entries: Vec<_> = (0..100u32).map(|i| (v4(i), i + 1)).collect();
        let spill = [v4(1000), v4(2000)];
        let t = Table::build(&entries, &spill, 20);
        for key in spill {
            let bucket = &t.buckets[table_bucket(&key, t.seed, t.bits) as usize];
            assert_eq!(bucket.overflow, 1);
            assert!(t.overflow.contains(&(key, 0)));
            assert_eq!(t.lookup(key), Some(0));
        }
    }

    #[test]
    fn address_zero_is_a_key_like_any_other() {
        // A free entry has key 0 too; only its value tells it apart.
        let t = Table::build(&[(v4(0), 7)], &[], 4);
        assert_eq!(t.lookup(v4(0)), Some(7));
        let t = Table::build(&[(v4(5), 7)], &[], 4);
        assert_eq!(t.lookup(v4(0)), None);
    }

    #[test]
    fn ipv6_keys_use_both_halves() {
        let a: [u8; 16] = "2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let mut b = a;
        b[0] ^= 0x80;
        let t = Table::build(&[(src_key_v6(a), 3)], &[], 8);
        assert_eq!(t.lookup(src_key_v6(a)), Some(3));
        assert_eq!(t.lookup(src_key_v6(b)), None);
    }

    #[test]
    fn empty_and_sizes() {
        let t = Table::<1>::build(&[], &[], 10);
        assert_eq!((t.bits, t.buckets.len()), (0, 0));
        assert_eq!(t.lookup(v4(1)), None);
        assert_eq!(max_bits(0), 0);
        assert_eq!(max_bits(1), 0);
        assert_eq!(max_bits(2), 1);
        assert_eq!(max_bits(131_072), 17);
        assert_eq!(max_bits(131_073), 17);
    }
}
